//! `cargo xtask bench revocation`: from a revocation being applied on a node (the
//! SebRevocation change handed to the node's cluster sync, as its watcher does) to the
//! next admission being denied and to the kernel map being updated. The broker's real
//! pieces run in this process (kernel programs on a sandbox cgroup, the ledger with
//! durable commits, admission); an admission loop and a map poller run alongside, and
//! each round revokes the contract they are using.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use seb_agent::{admission::Reason, enforcement::broker_sockets::ExecutionTag};
use seb_sandbox::{
    moto,
    revocation::{ENDPOINT, Rig},
};
use serde_json::json;

use crate::stats::{percentile, publish};

const ROUNDS: usize = 60;
/// Certificates per round: the loop uses them one by one until one is denied.
const PER_ROUND: usize = 200;
const TARGET_MS: f64 = 10.0;

pub fn run() -> Result<()> {
    let rig = Rig::new("benchrev", crate::release_tools()?)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (mut kernel_ms, mut admission_ms, mut applied_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut revoked = Vec::new();
    for round in 0..ROUNDS {
        let contract = format!("c-rev-{round}");
        let proposals = (0..PER_ROUND).map(|_| rig.proposal(&contract)).collect::<Result<Vec<_>>>()?;
        // A connection of this contract's execution, in flight.
        let (sockets, tag) = (rig.sockets.clone(), Rig::tag(&format!("d-{round}"), "00", &contract, 1));
        let (_stream, _registration, cookie) = moto::in_netns(&rig.sandbox.netns, move || async move {
            let stream = ExecutionTag::within(Some(tag), sockets.connect_tcp(ENDPOINT.parse()?)).await?;
            let cookie = stream.cookie()?;
            let (stream, registration) = stream.into_parts();
            Ok((stream.into_std()?, registration, cookie))
        })?;
        let sockets = rig.sockets.clone();
        let poller = thread::spawn(move || -> Result<Instant> {
            while sockets.is_registered(cookie)? {
                thread::yield_now();
            }
            Ok(Instant::now())
        });
        let (admission, ledger) = (rig.admission.clone(), rig.ledger.clone());
        let admissions = runtime.spawn(async move {
            let caller = Rig::caller()?;
            for proposal in proposals {
                let decision = admission.decide(&ledger, &caller, &proposal).await?;
                match decision.reason {
                    Reason::ContractRevoked => return Ok(Instant::now()),
                    Reason::Admitted => {}
                    other => bail!("unexpected decision {other}: {}", decision.message),
                }
            }
            bail!("every certificate of the round was admitted before the revocation")
        });
        thread::sleep(Duration::from_millis(3));
        revoked.push(contract);
        let ids: Vec<&str> = revoked.iter().map(String::as_str).collect();
        let object = Rig::revocation(1, &ids);
        let started = Instant::now();
        let report = runtime.block_on(rig.sync.revocation(&object))?;
        applied_ms.push(started.elapsed().as_secs_f64() * 1e3);
        ensure!(report.cut == [cookie], "the round's connection was not cut: {:?}", report.cut);
        let denied = runtime.block_on(admissions)??;
        let unregistered = poller.join().map_err(|_| anyhow::anyhow!("the map poller panicked"))??;
        admission_ms.push(denied.duration_since(started).as_secs_f64() * 1e3);
        kernel_ms.push(unregistered.duration_since(started).as_secs_f64() * 1e3);
    }
    let summary = |values: &[f64]| json!({"p50_ms": percentile(values, 0.5), "p99_ms": percentile(values, 0.99), "max_ms": percentile(values, 1.0)});
    let report = json!({
        "bench": "revocation",
        "cpus": thread::available_parallelism().map(usize::from).unwrap_or(0),
        "rounds": ROUNDS,
        "measured_from": "the SebRevocation change handed to the node's cluster sync, as its watcher does (watch delivery from the API server not included)",
        "kernel_map_updated": summary(&kernel_ms),
        "next_admission_denied": summary(&admission_ms),
        "apply_returned": summary(&applied_ms),
        "notes": "the admission loop runs continuously: the denial includes finishing the admission in flight when the revocation lands; every revocation and decision is committed durably",
        "target_ms": TARGET_MS,
        "meets_target": percentile(&kernel_ms, 0.99) < TARGET_MS && percentile(&admission_ms, 0.99) < TARGET_MS,
    });
    publish("revocation", &report).context("writing the report")
}
