//! One handler per request kind.
//!
//! Requests that act on the caller's identity (a proposal, a read, the administrator's
//! requests) first check that the process which opened the connection is still alive; a
//! caller that has exited (its PID perhaps another process's by now) is refused, and the
//! refusal recorded.

use tracing::{debug, info, warn};

use super::{Broker, error, read_gate, read_records};
use crate::{
    admission::{
        self, Caller, Peer, Pending, Proposal,
        state::{self, RevocationTarget},
    },
    audit::{is_busy, now_ns, store},
    cert::MutationRequest,
    config::parse_socket_addr,
    enforcement::{broker_sockets::Retired, maps},
    execute::passthrough,
    metrics::Limit,
    propose::propose,
    protocol::{ErrorCode, Request, Response, StatusReport},
    recorder::recorded_loss_total,
};

/// Record kind of passthrough reads.
pub const READ_KIND: &str = "read";
/// Record kind of administrator requests refused because their caller had exited.
pub const REFUSAL_KIND: &str = "refusal";

pub async fn handle(request: Request, peer: &Peer, broker: &Broker) -> Response {
    match request {
        Request::Ping => Response::Pong { version: env!("CARGO_PKG_VERSION").into() },
        Request::Propose { certificate, request } => {
            handle_propose(Proposal { certificate, request }, peer, broker).await
        }
        Request::Read { request } => handle_read(request, peer, broker).await,
        Request::Revoke { target, value, reason } => match administrator(peer, broker, "revoke").await {
            Ok(()) => handle_revoke(target, value, reason.unwrap_or_default(), broker).await,
            Err(refusal) => refusal,
        },
        Request::SetEpochs { policy, revocation } => match administrator(peer, broker, "set_epochs").await {
            Ok(()) => handle_set_epochs(policy, revocation, broker).await,
            Err(refusal) => refusal,
        },
        Request::GetEpochs => match broker.ledger.try_run(|batch| state::epochs(batch.conn())).await {
            Ok(epochs) => Response::Epochs(epochs),
            Err(e) => ledger_error(broker, e),
        },
        Request::Status => match administrator(peer, broker, "status").await {
            Ok(()) => handle_status(broker).await,
            Err(refusal) => refusal,
        },
        Request::ProbeEgress { addr } => match administrator(peer, broker, "probe_egress").await {
            Ok(()) => handle_probe_egress(addr, broker).await,
            Err(refusal) => refusal,
        },
    }
}

async fn handle_propose(proposal: Proposal, peer: &Peer, broker: &Broker) -> Response {
    let started = std::time::Instant::now();
    let decision = match peer.identify() {
        Ok(caller) => {
            let Broker { admission, executors, ledger, metrics, .. } = broker;
            propose(admission, executors, ledger, metrics, &caller, &proposal, started).await
        }
        // Still a decision: denied, and recorded before the answer.
        Err(e) => {
            let pending = Pending::unidentified(peer.unidentified(), &proposal, format!("{e:#}"));
            let decision = match pending.past_budget(&broker.admission.refusals) {
                Some(unrecorded) => Ok(unrecorded),
                None => admission::record(&broker.ledger, pending).await,
            };
            if let Ok(decision) = &decision {
                broker.metrics.decided(decision, started.elapsed());
            }
            decision
        }
    };
    let Ok(decision) = decision else {
        broker.metrics.count_limit(Limit::LedgerQueue);
        return busy();
    };
    log_decision(&decision, peer.pid);
    Response::Decision(Box::new(decision))
}

/// The ledger holds every decision. A denial is also logged, for operators who watch the
/// log; an admission only at debug level: formatting and writing a line for each would
/// cost the broker, and its log reader, more than the admission's other work.
fn log_decision(decision: &admission::Decision, pid: i32) {
    if decision.admitted {
        debug!(decision_id = %decision.decision_id, pid, "admission decision: admitted");
    } else {
        info!(
            decision_id = %decision.decision_id,
            admitted = false,
            reason = %decision.reason,
            pid,
            "admission decision"
        );
    }
}

async fn handle_read(request: MutationRequest, peer: &Peer, broker: &Broker) -> Response {
    // Turned away before anything is minted or recorded: a caller may ask again.
    let pass = match broker.read_gate.enter(peer.uid) {
        Ok(pass) => pass,
        Err(why) => {
            broker.metrics.count_limit(Limit::PassthroughReads);
            return error(ErrorCode::Busy, format!("{why}; ask again shortly"));
        }
    };
    let read_id = uuid::Uuid::new_v4().to_string();
    // An unidentifiable reader is refused, and the refusal recorded like any other.
    let (caller, result) = match peer.identify() {
        Ok(Caller { identity, .. }) => {
            let may_mint = || pass.may_mint().inspect_err(|_| broker.metrics.count_limit(Limit::PassthroughReads));
            let reading = passthrough::read(&broker.passthrough, &broker.executors, &request, &read_id, may_mint);
            // A server that stalls mid-answer must not hold one of the few read places.
            let read = tokio::time::timeout(passthrough::READ_DEADLINE, reading).await.unwrap_or_else(|_| {
                Err(anyhow::anyhow!("the read took over {} s", passthrough::READ_DEADLINE.as_secs()))
            });
            (identity, read)
        }
        Err(e) => (peer.unidentified(), Err(e)),
    };
    // Past the second's mints: busy, nothing minted or recorded, as at the gate.
    if let Err(Some(spent)) = result.as_ref().map_err(|e| e.downcast_ref::<read_gate::MintsSpent>()) {
        return error(ErrorCode::Busy, spent.to_string());
    }
    // Anyone who reaches the socket has a read recorded: what it sent is kept in part.
    let field = |text: &str| crate::audit::clipped(text, 1024);
    let record = serde_json::json!({
        "read_id": read_id,
        "caller": caller,
        "provider": request.provider,
        "operation": field(&request.operation),
        "target": field(&request.target),
        "status": result.as_ref().ok().map(|r| r.status),
        "state_digest": result.as_ref().ok().map(|r| r.state_digest.clone()),
        "error": result.as_ref().err().map(|e| crate::audit::clipped(&format!("{e:#}"), crate::audit::MESSAGE_CLIP)),
    });
    // Recorded, served or refused, before the caller hears anything; past the uid's
    // record budget (its reads of that target, or its refusals) it is counted instead.
    let recorded = match &result {
        Ok(_) => read_records::admit(&broker.reads, caller.uid, &request.target, now_ns() as u64),
        Err(_) => broker.admission.refusals.admit(caller.uid, "read", "forbidden", now_ns() as u64),
    };
    if recorded && let Err(e) = broker.ledger.try_run(move |batch| batch.append(READ_KIND, now_ns(), &record)).await {
        return ledger_error(broker, e.context("the read could not be recorded"));
    }
    match result {
        Ok(read) => Response::Read(read),
        Err(e) if recorded => error(ErrorCode::Forbidden, format!("{e:#}")),
        Err(e) => error(ErrorCode::Forbidden, admission::refusals::unrecorded(&format!("{e:#}"))),
    }
}

async fn handle_revoke(target: RevocationTarget, value: String, reason: String, broker: &Broker) -> Response {
    let normalised = match state::normalise(target, &value) {
        Ok(normalised) => normalised,
        Err(e) => return error(ErrorCode::Malformed, format!("{e:#}")),
    };
    let logged_reason = reason.clone();
    let recorded = broker.ledger.try_run(move |batch| state::revoke(batch, target, &value, &reason)).await;
    let record_seq = match recorded {
        Ok(record_seq) => record_seq,
        Err(e) => return ledger_error(broker, e),
    };
    let what = match target {
        RevocationTarget::Serial => "serial",
        RevocationTarget::ContractId => "contract",
    };
    info!(revoked = what, value = %normalised, reason = %logged_reason, record_seq, "revoked");
    let retired = match target {
        RevocationTarget::Serial => Retired { serials: [normalised].into(), ..Default::default() },
        RevocationTarget::ContractId => Retired { contract_ids: [normalised].into(), ..Default::default() },
    };
    match broker.sockets.cut(&retired) {
        Ok(_) => Response::Revoked { record_seq },
        Err(e) => error(ErrorCode::Internal, format!("{e:#}")),
    }
}

async fn handle_set_epochs(policy: Option<u64>, revocation: Option<u64>, broker: &Broker) -> Response {
    if broker.admission.follows_cluster() {
        return error(
            ErrorCode::Forbidden,
            "this broker follows the cluster's SebPolicy and SebRevocation: set epochs there (seb-agent epoch --cluster)",
        );
    }
    let epochs = match broker.ledger.try_run(move |batch| state::set_epochs(batch, policy, revocation)).await {
        Ok(epochs) => epochs,
        Err(e) if is_busy(&e) => return ledger_error(broker, e),
        Err(e) => return error(ErrorCode::Malformed, format!("{e:#}")),
    };
    info!(policy_epoch = epochs.policy, revocation_epoch = epochs.revocation, "epochs set");
    let retired = Retired { revocation_epoch: epochs.revocation, policy_epoch: epochs.policy, ..Default::default() };
    match broker.sockets.cut(&retired) {
        Ok(_) => Response::Epochs(epochs),
        Err(e) => error(ErrorCode::Internal, format!("{e:#}")),
    }
}

async fn handle_status(broker: &Broker) -> Response {
    let map_entries = match maps::entry_counts(&broker.layout) {
        Ok(counts) => counts,
        Err(e) => return error(ErrorCode::Internal, format!("{e:#}")),
    };
    let read = broker
        .ledger
        .try_run(|batch| {
            let last_denial = store::last_body(batch.conn(), crate::audit::denial::KIND)?
                .map(|body| serde_json::from_str(&body))
                .transpose()?;
            Ok((state::epochs(batch.conn())?, last_denial, recorded_loss_total(batch.conn())?))
        })
        .await;
    let (epochs, last_denial, ring_lost_total) = match read {
        Ok(read) => read,
        Err(e) => return ledger_error(broker, e),
    };
    Response::Status(Box::new(StatusReport {
        version: env!("CARGO_PKG_VERSION").into(),
        ready: broker.readiness.ready(),
        links: broker.enforcer.links(),
        integrity: broker.enforcer.integrity(),
        map_entries,
        epochs,
        ring_lost_total,
        last_denial,
        cluster: broker.admission.cluster_status(),
    }))
}

async fn handle_probe_egress(addr: String, broker: &Broker) -> Response {
    let target = match parse_socket_addr(&addr) {
        Ok(target) => target,
        Err(problem) => return error(ErrorCode::Malformed, problem),
    };
    let result = broker.sockets.connect_tcp(target).await;
    info!(%addr, connected = result.is_ok(), "broker egress probe");
    Response::ProbeEgress { addr, connected: result.is_ok(), error: result.err().map(|e| format!("{e:#}")) }
}

/// Administrator requests: uid 0 outside the enforced scope, in the broker's pid
/// namespace and in no pod but the broker's own, and the process that connected is still
/// alive (a refusal of any of these is recorded). Root in a pod of the scope is uid 0
/// here too (no user namespace), and must not move epochs, revoke others' certificates
/// or probe protected endpoints through the broker; nor may root in a container the
/// kubelet's layout does not name (another runtime's, a kubelet with its own cgroup
/// root): a container has its own pid namespace, the node's administrator has the
/// broker's (the DaemonSet runs with the host's).
async fn administrator(peer: &Peer, broker: &Broker, what: &str) -> Result<(), Response> {
    if peer.uid != 0 {
        return Err(error(ErrorCode::Forbidden, format!("{what} is for the node's administrator (uid 0)")));
    }
    // Everything read first, then liveness: a process that exits in between (its PID
    // reused by another) is refused as gone, never judged by what its successor shows.
    let of_the_scope = u32::try_from(peer.pid).map_or(true, |tgid| broker.enforcer.is_of_the_scope(tgid));
    let cgroup =
        std::fs::File::open(format!("/proc/{}/cgroup", peer.pid)).ok().and_then(crate::cgroupfs::unified_cgroup);
    let pid_namespace_shared = peer.shares_pid_namespace();
    let (reason, message) = if !peer.alive() {
        (
            admission::Reason::CallerChanged,
            format!("the process that opened this connection (pid {}) has exited", peer.pid),
        )
    } else if of_the_scope {
        (
            admission::Reason::CallerMismatch,
            format!(
                "{what} is for the node's administrator: the caller (pid {}) is a process of the enforced scope",
                peer.pid
            ),
        )
    } else if let Some(pod) = another_pod(cgroup.as_deref()) {
        (
            admission::Reason::CallerMismatch,
            format!(
                "{what} is for the node's administrator: the caller (pid {}) runs in pod {pod}, neither on the node \
                 nor in the broker's own pod",
                peer.pid
            ),
        )
    } else if !pid_namespace_shared {
        (
            admission::Reason::CallerMismatch,
            format!(
                "{what} is for the node's administrator: the caller (pid {}) runs in another pid namespace (a \
                 container), not in the broker's",
                peer.pid
            ),
        )
    } else {
        return Ok(());
    };
    let record = serde_json::json!({
        "request": what,
        "caller": peer.unidentified(),
        "reason": reason,
        "message": message,
    });
    if let Err(e) = broker.ledger.try_run(move |batch| batch.append(REFUSAL_KIND, now_ns(), &record)).await {
        warn!(error = %format!("{e:#}"), "a refused administrator request could not be recorded");
    }
    Err(error(ErrorCode::Forbidden, message))
}

/// The pod the caller runs in, when it is a pod other than the broker's own: root in any
/// pod that can reach the socket (one not enforced, a labelled one before its
/// enforcement is attached) is uid 0 here. An unreadable cgroup counts as another pod.
fn another_pod(cgroup: Option<&str>) -> Option<String> {
    static OWN_POD: std::sync::LazyLock<Option<String>> = std::sync::LazyLock::new(|| {
        let cgroup = std::fs::File::open("/proc/self/cgroup").ok().and_then(crate::cgroupfs::unified_cgroup);
        cgroup.as_deref().and_then(crate::kubelet_cgroups::pod_uid_of_caller)
    });
    let Some(cgroup) = cgroup else { return Some("(cgroup unreadable)".into()) };
    pod_other_than(crate::kubelet_cgroups::pod_uid_of_caller(cgroup), OWN_POD.as_deref())
}

/// `caller`'s pod, unless it is `own` (or no pod: the node).
fn pod_other_than(caller: Option<String>, own: Option<&str>) -> Option<String> {
    caller.filter(|pod| Some(pod.as_str()) != own)
}

/// A ledger failure as an answer: `busy` for a full queue (counted), else `internal`.
fn ledger_error(broker: &Broker, e: anyhow::Error) -> Response {
    if is_busy(&e) {
        broker.metrics.count_limit(Limit::LedgerQueue);
        return busy();
    }
    error(ErrorCode::Internal, format!("{e:#}"))
}

fn busy() -> Response {
    error(ErrorCode::Busy, crate::audit::LedgerBusy.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn administrators_are_on_the_node_or_in_the_brokers_own_pod() {
        let pod = |uid: &str| {
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-1.scope",
                uid.replace('-', "_")
            )
        };
        let (broker, tenant) = ("11111111-2222-3333-4444-555555555555", "99999999-2222-3333-4444-555555555555");
        let of = |cgroup: &str| crate::kubelet_cgroups::pod_uid_of_caller(cgroup);
        assert_eq!(pod_other_than(of(&pod(tenant)), Some(broker)).as_deref(), Some(tenant), "root in a tenant's pod");
        assert_eq!(pod_other_than(of(&pod(broker)), Some(broker)), None, "kubectl exec into the broker's pod");
        assert_eq!(pod_other_than(of("/system.slice/sshd.service"), Some(broker)), None, "the node");
        assert_eq!(pod_other_than(of(&pod(tenant)), None).as_deref(), Some(tenant), "a broker outside any pod");
    }

    /// Where the test's log lines go.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn decision(id: &str, admitted: bool) -> admission::Decision {
        admission::Decision {
            decision_id: id.into(),
            admitted,
            reason: if admitted { admission::Reason::Admitted } else { admission::Reason::Replayed },
            message: String::new(),
            record_seq: 1,
            serial: None,
            contract_id: None,
            outcome: None,
        }
    }

    #[test]
    fn at_the_default_level_denials_are_logged_and_admissions_are_not() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber =
            tracing_subscriber::fmt().with_max_level(tracing::Level::INFO).with_writer(move || writer.clone()).finish();
        tracing::subscriber::with_default(subscriber, || {
            log_decision(&decision("admitted-one", true), 7);
            log_decision(&decision("denied-one", false), 7);
        });
        let lines = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(lines.contains("denied-one") && lines.contains("replayed"), "{lines}");
        assert!(!lines.contains("admitted-one"), "{lines}");
    }
}
