//! A revocation applied through the cluster path (what the SebRevocation watcher hands to
//! the node) reaches both places it must: the admission state, atomically in the ledger,
//! and the kernel, where the broker connections of the revoked decision lose their
//! registration and their next packet is dropped. Real kernel programs, in a sandbox
//! cgroup this test process moves into (it is alone in its binary for that reason).

use std::{
    io::Write,
    time::{Duration, Instant},
};

use seb_agent::{
    admission::{self, Reason},
    cluster::crd::{SebPolicy, SebPolicySpec},
    enforcement::broker_sockets::ExecutionTag,
};
use seb_sandbox::{
    Tools, moto,
    revocation::{ENDPOINT, Rig},
};

#[test]
fn a_cluster_revocation_reaches_the_admission_state_and_the_kernel_maps() {
    let mut rig = Rig::new("revoke", Tools::for_tests(env!("CARGO_BIN_EXE_seb-probe"))).unwrap();
    let (sync, sockets, ledger, admission) =
        (rig.sync.clone(), rig.sockets.clone(), rig.ledger.clone(), rig.admission.clone());
    let revoked_proposal = rig.proposal("c-revoked").unwrap();
    let kept_proposal = rig.proposal("c-kept").unwrap();
    let netns = rig.sandbox.netns.clone();
    let in_flight = moto::in_netns(&netns, move || async move {
        let addr = ENDPOINT.parse()?;
        // Two executions in flight, each on its own registered broker connection.
        let revoked_tag = Rig::tag("d-1", "a1", "c-revoked", 1);
        let kept_tag = Rig::tag("d-2", "b2", "c-kept", 1);
        let revoked = ExecutionTag::within(Some(revoked_tag.clone()), sockets.connect_tcp(addr)).await?;
        let kept = ExecutionTag::within(Some(kept_tag), sockets.connect_tcp(addr)).await?;
        let (revoked_cookie, kept_cookie) = (revoked.cookie()?, kept.cookie()?);
        assert!(sockets.is_registered(revoked_cookie)? && sockets.is_registered(kept_cookie)?);

        let report = sync.revocation(&Rig::revocation(1, &["c-revoked"])).await?;
        assert_eq!(report.cut, [revoked_cookie], "only the revoked decision's connection is cut");
        assert!(!sockets.is_registered(revoked_cookie)?, "the kernel's registry no longer holds it");
        assert!(sockets.is_registered(kept_cookie)?);

        // No new connection is opened for the revoked decision either.
        let refused = ExecutionTag::within(Some(revoked_tag), sockets.connect_tcp(addr)).await;
        let error = format!("{:#}", refused.err().expect("a revoked decision opens no connection"));
        assert!(error.contains("was revoked"), "{error}");
        let (stream, registration) = revoked.into_parts();
        let (kept, kept_registration) = kept.into_parts();
        Ok(((stream.into_std()?, registration), (kept.into_std()?, kept_registration), revoked_cookie, kept_cookie))
    })
    .unwrap();
    let ((mut stream, _registration), (mut kept, _kept_registration), revoked_cookie, kept_cookie) = in_flight;
    // Its next packet is the kernel's to drop: the egress program denies it.
    let denials_before = rig.kernel_denials().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream.write_all(b"after the revocation").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while rig.kernel_denials().unwrap() == denials_before {
        assert!(Instant::now() < deadline, "the kernel dropped no packet of the cut connection");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_ne!(revoked_cookie, kept_cookie);
    // The kept decision's connection still delivers; the cut one delivered nothing,
    // retransmissions included.
    kept.set_nonblocking(false).unwrap();
    kept.write_all(b"kept").unwrap();
    std::thread::sleep(Duration::from_secs(1));

    // The admission state: the revoked contract is denied, the other one admitted.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let caller = Rig::caller().unwrap();
    let denied = runtime.block_on(admission.decide(&ledger, &caller, &revoked_proposal)).unwrap();
    assert_eq!(denied.reason, Reason::ContractRevoked, "{denied:?}");
    let admitted = runtime.block_on(admission.decide(&ledger, &caller, &kept_proposal)).unwrap();
    assert!(admitted.admitted, "{admitted:?}");
    // The revocation is an audit record naming the object it came from.
    let body = ledger
        .run_blocking(|batch| seb_agent::audit::store::last_body(batch.conn(), admission::state::REVOCATION_KIND))
        .unwrap()
        .expect("a revocation record");
    assert!(body.contains("c-revoked") && body.contains("SebRevocation/default"), "{body}");

    // A higher epoch retires every decision certified under an older one, in flight too.
    let proposal = rig.proposal("c-old-epoch").unwrap();
    let report = runtime.block_on(rig.sync.revocation(&Rig::revocation(2, &["c-revoked"]))).unwrap();
    assert_eq!(report.cut, [kept_cookie], "the connection certified under epoch 1 is cut");
    let stale = runtime.block_on(admission.decide(&ledger, &caller, &proposal)).unwrap();
    assert_eq!(stale.reason, Reason::RevocationEpochStale, "{stale:?}");

    // So does a new policy epoch.
    let sockets = rig.sockets.clone();
    let (_current, current_cookie) = moto::in_netns(&netns, move || async move {
        let tag = Rig::tag("d-3", "c3", "c-current", 2);
        let stream = ExecutionTag::within(Some(tag), sockets.connect_tcp(ENDPOINT.parse()?)).await?;
        let cookie = stream.cookie()?;
        let (stream, registration) = stream.into_parts();
        Ok(((stream.into_std()?, registration), cookie))
    })
    .unwrap();
    assert!(rig.sockets.is_registered(current_cookie).unwrap());
    let sync = rig.sync.clone();
    let policy = SebPolicy::new("default", SebPolicySpec { policy_epoch: 2, ..Default::default() });
    runtime.block_on(runtime.spawn(async move { sync.policy(&policy).await })).unwrap().unwrap();
    assert!(!rig.sockets.is_registered(current_cookie).unwrap(), "certified under policy epoch 1, now 2");
    let epochs = ledger.run_blocking(|batch| admission::state::epochs(batch.conn())).unwrap();
    assert_eq!((epochs.policy, epochs.revocation), (Some(2), Some(2)));
    // Per connection, in order: the one cut at the revocation, the kept one (written to
    // after that revocation), the one opened under the new epoch.
    let received = rig.received();
    assert_eq!(received, [b"".to_vec(), b"kept".to_vec(), b"".to_vec()], "what reached the endpoint");
}
