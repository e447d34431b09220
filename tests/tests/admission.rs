//! Certificate admission through the real broker socket: every predicate admits a good
//! proposal and denies a bad one with its own reason code, with real certificates from
//! the dev SAB and hand-built malformed ones.

use std::{path::PathBuf, time::Duration};

use seb_agent::{
    admission::{Decision, Reason, state::RevocationTarget},
    cert::{
        ExecutionContract, MutationRequest, Provider,
        contract::{AgentIdentity, ScopedIdentity},
        dev_sab::{self, Algorithm, IssueOptions},
    },
    protocol::{Request, Response},
};
use seb_sandbox::{
    Sandbox, Tools,
    broker::{Broker, certified, this_process},
};

fn tools() -> Tools {
    Tools::for_tests(env!("CARGO_BIN_EXE_seb-probe"))
}

/// A sandboxed broker trusting a fresh dev SAB, with epochs 1/1 unless told otherwise.
fn broker(label: &str, set_epochs: bool) -> Broker {
    Broker::start(Sandbox::new(label, tools()).unwrap(), "", set_epochs).unwrap()
}

fn request() -> MutationRequest {
    serde_json::from_value(serde_json::json!({
        "provider": "aws",
        "operation": "s3:PutObject",
        "target": "arn:aws:s3:::seb-demo/config.json",
        "params": {"body": "replicas=3"}
    }))
    .unwrap()
}

/// The contract certifying `request()` for this test process.
fn contract() -> ExecutionContract {
    let role = ScopedIdentity::AwsRole { role_arn: "arn:aws:iam::123456789012:role/seb-demo".into() };
    certified(&format!("c-{}", uuid_like()), this_process(), &request(), "sha256:00", role)
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

#[track_caller]
fn assert_admitted(decision: &Decision) {
    assert!(decision.admitted, "expected admission: {decision:?}");
    assert_eq!(decision.reason, Reason::Admitted);
    assert!(decision.record_seq > 0, "an admission is recorded: {decision:?}");
}

#[track_caller]
fn assert_denied(decision: &Decision, reason: Reason) {
    assert!(!decision.admitted, "expected a denial ({reason}): {decision:?}");
    assert_eq!(decision.reason, reason, "{decision:?}");
    assert!(decision.record_seq > 0, "a denial is recorded: {decision:?}");
}

#[test]
fn certificate_predicates_each_admit_and_deny() {
    let f = broker("certs", true);
    let (contract, request) = (contract(), request());

    // Ed25519 and ECDSA P-256 certificates from the trusted SAB are admitted.
    assert_admitted(&f.decide(&contract, &request));
    let p256 = IssueOptions { algorithm: Algorithm::P256, ..Default::default() };
    assert_admitted(&f.propose(&f.issue(&contract, &p256), &request));

    // A certificate from another CA with the very same name: the signature fails.
    let impostor = dev_sab::create_ca(&f.sandbox.dir.join("impostor"), "seb test SAB", Algorithm::Ed25519).unwrap();
    let forged = dev_sab::issue(&impostor, &contract, &IssueOptions::default()).unwrap();
    assert_denied(&f.propose(&forged, &request), Reason::UntrustedIssuer);

    // The critical contract extension altered after signing.
    let genuine = f.issue(&contract, &IssueOptions::default());
    assert_denied(&f.propose(&alter_contract(&genuine), &request), Reason::UntrustedIssuer);

    let expired = IssueOptions { start_offset_secs: -3000, ttl: Duration::from_secs(600), ..Default::default() };
    assert_denied(&f.propose(&f.issue(&contract, &expired), &request), Reason::Expired);
    let early = IssueOptions { start_offset_secs: 600, ..Default::default() };
    assert_denied(&f.propose(&f.issue(&contract, &early), &request), Reason::NotYetValid);
    let long = IssueOptions { ttl: Duration::from_secs(7200), ..Default::default() };
    assert_denied(&f.propose(&f.issue(&contract, &long), &request), Reason::TtlExceedsMaximum);
    let unknown = IssueOptions { unknown_critical_extension: true, ..Default::default() };
    assert_denied(&f.propose(&f.issue(&contract, &unknown), &request), Reason::UnsupportedCriticalExtension);
    let missing = IssueOptions { omit_contract: true, ..Default::default() };
    assert_denied(&f.propose(&f.issue(&contract, &missing), &request), Reason::MissingContract);
    let not_critical = IssueOptions { contract_critical: false, ..Default::default() };
    assert_denied(&f.propose(&f.issue(&contract, &not_critical), &request), Reason::MalformedContract);
    assert_denied(
        &f.propose("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", &request),
        Reason::MalformedCertificate,
    );
}

/// Flip one byte inside the contract JSON of a PEM certificate; the rest stays intact.
fn alter_contract(pem: &str) -> String {
    let block = ::pem::parse(pem).unwrap();
    let mut der = block.contents().to_vec();
    let needle = b"s3:PutObject";
    let at = der.windows(needle.len()).position(|w| w == needle).expect("contract in the DER");
    der[at + needle.len() - 1] = b'X';
    ::pem::encode(&::pem::Pem::new("CERTIFICATE", der))
}

#[test]
fn caller_and_request_predicates_each_admit_and_deny() {
    let f = broker("request", true);
    let (contract, request) = (contract(), request());
    assert_admitted(&f.decide(&contract, &request));

    let other_uid =
        ExecutionContract { agent: AgentIdentity { uid: Some(1000), ..Default::default() }, ..contract.clone() };
    assert_denied(&f.decide(&other_uid, &request), Reason::CallerMismatch);
    let other_exe = ExecutionContract {
        agent: AgentIdentity { exe: Some("/usr/local/bin/some-other-agent".into()), ..Default::default() },
        ..contract.clone()
    };
    assert_denied(&f.decide(&other_exe, &request), Reason::CallerMismatch);
    let my_cgroup = ExecutionContract {
        agent: AgentIdentity { cgroup: Some(own_cgroup()), ..Default::default() },
        ..contract.clone()
    };
    assert_admitted(&f.decide(&my_cgroup, &request));

    let k8s = MutationRequest { provider: Provider::Kubernetes, ..request.clone() };
    assert_denied(&f.decide(&contract, &k8s), Reason::ProviderMismatch);
    let delete = MutationRequest { operation: "s3:DeleteObject".into(), ..request.clone() };
    assert_denied(&f.decide(&contract, &delete), Reason::OperationMismatch);
    let elsewhere = MutationRequest { target: "arn:aws:s3:::seb-demo/other.json".into(), ..request.clone() };
    assert_denied(&f.decide(&contract, &elsewhere), Reason::TargetMismatch);
    let mut tampered = request.clone();
    tampered.params["body"] = "replicas=300".into();
    assert_denied(&f.decide(&contract, &tampered), Reason::RequestMismatch);
}

fn own_cgroup() -> String {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    text.lines().find_map(|l| l.strip_prefix("0::")).unwrap().to_string()
}

#[test]
fn epoch_revocation_and_replay_predicates_each_admit_and_deny() {
    let f = broker("state", false);
    let (contract, request) = (contract(), request());

    // No epochs known yet: fail closed.
    assert_denied(&f.decide(&contract, &request), Reason::EpochsUnset);
    f.admin(Request::SetEpochs { policy: Some(1), revocation: Some(1) });
    assert_admitted(&f.decide(&contract, &request));

    let other_policy = ExecutionContract { policy_epoch: 2, ..contract.clone() };
    assert_denied(&f.decide(&other_policy, &request), Reason::PolicyEpochMismatch);
    let ahead = ExecutionContract { revocation_epoch: 2, ..contract.clone() };
    assert_denied(&f.decide(&ahead, &request), Reason::RevocationStateBehind);

    // Revoke a serial: the very next admission of it is denied; other serials pass.
    let certificate = f.issue(&contract, &IssueOptions::default());
    let serial = dev_serial(&certificate);
    f.admin(Request::Revoke { target: RevocationTarget::Serial, value: serial, reason: Some("test".into()) });
    assert_denied(&f.propose(&certificate, &request), Reason::SerialRevoked);
    assert_admitted(&f.decide(&contract, &request));

    // Revoke a contract id: every certificate of it is denied.
    let doomed = ExecutionContract { contract_id: "c-doomed".into(), ..contract.clone() };
    assert_admitted(&f.decide(&doomed, &request));
    f.admin(Request::Revoke { target: RevocationTarget::ContractId, value: "c-doomed".into(), reason: None });
    assert_denied(&f.decide(&doomed, &request), Reason::ContractRevoked);

    // Moving the revocation epoch on retires older certificates.
    f.admin(Request::SetEpochs { policy: None, revocation: Some(2) });
    assert_denied(&f.decide(&contract, &request), Reason::RevocationEpochStale);
    assert_admitted(&f.decide(&ahead, &request));
    let backwards = f.call(Request::SetEpochs { policy: None, revocation: Some(1) });
    assert!(matches!(backwards, Response::Error { .. }), "the revocation epoch must not go back: {backwards:?}");
}

fn dev_serial(pem: &str) -> String {
    let path = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(path.path(), pem).unwrap();
    seb_agent::cli::cert::inspect(path.path()).unwrap()["serial"].as_str().unwrap().to_string()
}

#[test]
fn a_used_serial_is_refused_again_even_after_a_broker_restart() {
    let mut f = broker("replay", true);
    let (contract, request) = (contract(), request());
    let certificate = f.issue(&contract, &IssueOptions::default());
    assert_admitted(&f.propose(&certificate, &request));
    assert_denied(&f.propose(&certificate, &request), Reason::Replayed);

    f.sandbox.kill_agent().unwrap();
    f.sandbox.start_agent().unwrap();
    assert_denied(&f.propose(&certificate, &request), Reason::Replayed);
    // Epochs and revocations persist too: a new certificate is admitted without setup.
    assert_admitted(&f.decide(&contract, &request));
}

#[test]
fn the_cli_propose_prints_the_decision_and_exits_non_zero_on_denial() {
    let f = broker("cli", true);
    let agent = f.sandbox.tools.agent.to_string_lossy().into_owned();
    let contract = ExecutionContract {
        agent: AgentIdentity { uid: Some(0), exe: Some(agent), ..Default::default() },
        ..contract()
    };
    let dir = &f.sandbox.dir;
    let (cert_path, request_path): (PathBuf, PathBuf) = (dir.join("cert.pem"), dir.join("request.json"));
    std::fs::write(&cert_path, f.issue(&contract, &IssueOptions::default())).unwrap();
    std::fs::write(&request_path, serde_json::to_string(&request()).unwrap()).unwrap();
    let propose = || {
        f.sandbox
            .agent_cli(&["propose", "--cert", cert_path.to_str().unwrap(), "--request", request_path.to_str().unwrap()])
            .unwrap()
    };
    let first = propose();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let decision: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(decision["reason"], "admitted");
    let second = propose();
    assert_eq!(second.status.code(), Some(1));
    let decision: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(decision["reason"], "replayed");
}

/// Raw frames over a blocking socket, to send what no well-behaved client would.
mod raw {
    use std::{
        io::{Read, Write},
        os::unix::net::UnixStream,
    };

    pub fn send(stream: &mut UnixStream, declared_len: u32, body: &[u8]) {
        stream.write_all(&declared_len.to_be_bytes()).unwrap();
        stream.write_all(body).unwrap();
    }

    /// The next reply, or None if the broker closed the connection.
    pub fn reply(stream: &mut UnixStream) -> Option<serde_json::Value> {
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).ok()?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        stream.read_exact(&mut body).ok()?;
        Some(serde_json::from_slice(&body).unwrap())
    }
}

#[test]
fn bad_input_gets_a_clear_error_and_closes_only_that_connection() {
    use std::os::unix::net::UnixStream;
    let f = broker("protocol", true);
    let socket = &f.sandbox.socket;
    let mut bystander = UnixStream::connect(socket).unwrap();

    let cases: [(&str, u32, Vec<u8>, Option<&str>); 5] = [
        ("oversized", 2 << 20, Vec::new(), Some("too_large")),
        ("not JSON", 9, b"{not json".to_vec(), Some("malformed")),
        ("no version", 15, br#"{"type":"ping"}"#.to_vec(), Some("malformed")),
        ("future version", 22, br#"{"v":99,"type":"ping"}"#.to_vec(), Some("unsupported_version")),
        ("unknown type", 31, br#"{"v":1,"type":"launch_missiles"}"#.to_vec(), Some("malformed")),
    ];
    for (what, len, body, code) in cases {
        let mut stream = UnixStream::connect(socket).unwrap();
        raw::send(&mut stream, len, &body);
        let reply = raw::reply(&mut stream).unwrap_or_else(|| panic!("{what}: no error reply"));
        assert_eq!(reply["type"], "error", "{what}: {reply}");
        assert_eq!(reply["code"].as_str(), code, "{what}: {reply}");
        assert!(!reply["message"].as_str().unwrap().is_empty(), "{what}: {reply}");
        assert!(raw::reply(&mut stream).is_none(), "{what}: the connection must be closed after the error");
    }

    // Truncated: fewer bytes than declared, then end of input. Closed without a reply.
    let mut truncated = UnixStream::connect(socket).unwrap();
    raw::send(&mut truncated, 100, b"{\"v\":1");
    truncated.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(raw::reply(&mut truncated).is_none());

    // The other connection was never disturbed, and can make several requests in turn.
    for _ in 0..2 {
        raw::send(&mut bystander, 21, br#"{"v":1,"type":"ping"}"#);
        assert_eq!(raw::reply(&mut bystander).unwrap()["type"], "pong");
    }
}
