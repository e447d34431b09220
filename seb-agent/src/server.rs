//! The broker's Unix socket: agents' requests come in here.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc};

use anyhow::{Context, Result};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::watch,
};
use tracing::{debug, info, warn};

use tokio::net::unix::UCred;

use crate::{
    admission::{
        self, Admission, Caller, CallerIdentity, Pending, Proposal,
        state::{self, RevocationTarget},
    },
    audit::Ledger,
    audit::{now_ns, store},
    config::parse_socket_addr,
    enforcement::{BrokerSockets, broker_sockets::Retired},
    enforcement::{PinLayout, SharedEnforcer, maps},
    execute::{
        Executors,
        passthrough::{self, PassthroughConfig},
    },
    metrics::{AdmissionLabels, ExecutionLabels, Metrics, Readiness},
    propose::propose,
    protocol::{Envelope, ErrorCode, FrameError, Request, Response, StatusReport, VERSION, read_frame, write_frame},
    recorder::recorded_loss_total,
};

/// What request handlers need.
pub struct Broker {
    pub sockets: BrokerSockets,
    pub admission: Admission,
    pub executors: Executors,
    pub passthrough: PassthroughConfig,
    pub ledger: Ledger,
    pub metrics: Arc<Metrics>,
    pub enforcer: SharedEnforcer,
    pub layout: PinLayout,
    pub readiness: Readiness,
}

/// Record kind of passthrough reads.
pub const READ_KIND: &str = "read";

/// Bind the socket: mode 0660, owned by `group` when given.
pub fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => debug!(path = %path.display(), "removed a stale broker socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(group) = group {
        let gid = nix::unistd::Group::from_name(group)?
            .with_context(|| format!("config field `broker.socket_group`: no group named `{group}`"))?
            .gid;
        nix::unistd::chown(path, None, Some(gid))?;
    }
    Ok(listener)
}

/// Serve until `shutdown` flips.
pub async fn serve(listener: UnixListener, broker: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let broker = broker.clone();
                    tokio::spawn(async move { handle_connection(stream, broker).await });
                }
                Err(e) => warn!(error = %e, "accepting a broker connection failed"),
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Serve one connection; a bad message gets an error reply and closes this connection only.
async fn handle_connection(mut stream: UnixStream, broker: Arc<Broker>) {
    let Ok(peer) = stream.peer_cred() else {
        warn!("a broker connection without peer credentials was dropped");
        return;
    };
    loop {
        let frame = match read_frame(&mut stream).await {
            Ok(frame) => frame,
            Err(FrameError::Closed) => return,
            Err(e @ FrameError::TooLarge(_)) => {
                let _ = reply(&mut stream, error(ErrorCode::TooLarge, e.to_string())).await;
                return;
            }
            Err(e) => {
                debug!(error = %e, "dropping a connection with a truncated message");
                return;
            }
        };
        let response = match parse_request(&frame) {
            Ok(request) => handle(request, &peer, &broker).await,
            Err(response) => {
                let _ = reply(&mut stream, response).await;
                return;
            }
        };
        if reply(&mut stream, response).await.is_err() {
            return;
        }
    }
}

fn parse_request(frame: &[u8]) -> Result<Request, Response> {
    let value: serde_json::Value = serde_json::from_slice(frame)
        .map_err(|e| error(ErrorCode::Malformed, format!("the message is not JSON: {e}")))?;
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => {
            return Err(error(
                ErrorCode::UnsupportedVersion,
                format!("protocol version {v} is not supported; this broker speaks {VERSION}"),
            ));
        }
        None => return Err(error(ErrorCode::Malformed, "the message has no protocol version field `v`")),
    }
    let envelope: Envelope<Request> =
        serde_json::from_value(value).map_err(|e| error(ErrorCode::Malformed, format!("invalid request: {e}")))?;
    Ok(envelope.body)
}

async fn handle(request: Request, peer: &UCred, broker: &Broker) -> Response {
    let admin = peer.uid() == 0;
    let forbidden = |what: &str| error(ErrorCode::Forbidden, format!("{what} is for the node's administrator (uid 0)"));
    match request {
        Request::Ping => Response::Pong { version: env!("CARGO_PKG_VERSION").into() },
        Request::Propose { certificate, request } => {
            let proposal = Proposal { certificate, request };
            let decision = match identify(peer) {
                Ok(caller) => propose(&broker.admission, &broker.executors, &broker.ledger, &caller, &proposal).await,
                // Still a decision: denied, and recorded before the answer.
                Err(message) => {
                    let pending = Pending::unidentified(unidentified(peer), &proposal, message);
                    admission::record(&broker.ledger, pending).await
                }
            };
            let verdict = if decision.admitted { "admitted" } else { "denied" };
            let labels = AdmissionLabels { decision: verdict.into(), reason: decision.reason.as_str().into() };
            broker.metrics.admissions.get_or_create(&labels).inc();
            if let Some(outcome) = &decision.outcome {
                let status = serde_json::to_value(outcome.status)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                let provider = format!("{:?}", proposal.request.provider).to_lowercase();
                let labels = ExecutionLabels { provider, status };
                broker.metrics.execution_seconds.get_or_create(&labels).observe(outcome.duration_ms / 1e3);
            }
            info!(
                decision_id = %decision.decision_id,
                admitted = decision.admitted,
                reason = %decision.reason,
                pid = ?peer.pid(),
                "admission decision"
            );
            Response::Decision(Box::new(decision))
        }
        Request::Read { request } => {
            let read_id = uuid::Uuid::new_v4().to_string();
            // An unidentifiable reader is refused, and the refusal recorded like any other.
            let (caller, result) = match identify(peer) {
                Ok(caller) => (
                    caller.identity,
                    passthrough::read(&broker.passthrough, &broker.executors, &request, &read_id).await,
                ),
                Err(message) => (unidentified(peer), Err(anyhow::anyhow!(message))),
            };
            let record = serde_json::json!({
                "read_id": read_id,
                "caller": caller,
                "provider": request.provider,
                "operation": request.operation,
                "target": request.target,
                "status": result.as_ref().ok().map(|r| r.status),
                "state_digest": result.as_ref().ok().map(|r| r.state_digest.clone()),
                "error": result.as_ref().err().map(|e| format!("{e:#}")),
            });
            // Recorded, refused or not, before the caller hears anything.
            if let Err(e) = broker.ledger.run(move |batch| batch.append(READ_KIND, now_ns(), &record)).await {
                return error(ErrorCode::Internal, format!("the read could not be recorded: {e:#}"));
            }
            match result {
                Ok(read) => Response::Read(read),
                Err(e) => error(ErrorCode::Forbidden, format!("{e:#}")),
            }
        }
        Request::Revoke { target, value, reason } => {
            if !admin {
                return forbidden("revoke");
            }
            let reason = reason.unwrap_or_default();
            let normalised = state::normalise(target, &value);
            let recorded = broker.ledger.run(move |batch| state::revoke(batch, target, &value, &reason)).await;
            let retired = match target {
                RevocationTarget::Serial => Retired { serials: [normalised].into(), ..Default::default() },
                RevocationTarget::ContractId => Retired { contract_ids: [normalised].into(), ..Default::default() },
            };
            match recorded.and_then(|record_seq| {
                broker.sockets.cut(&retired)?;
                Ok(record_seq)
            }) {
                Ok(record_seq) => Response::Revoked { record_seq },
                Err(e) => error(ErrorCode::Internal, format!("{e:#}")),
            }
        }
        Request::SetEpochs { policy, revocation } => {
            if !admin {
                return forbidden("set_epochs");
            }
            if broker.admission.follows_cluster() {
                return error(
                    ErrorCode::Forbidden,
                    "this broker follows the cluster's SebPolicy and SebRevocation: set epochs there (seb-agent epoch --cluster)",
                );
            }
            match broker.ledger.run(move |batch| state::set_epochs(batch, policy, revocation)).await {
                Ok(epochs) => {
                    let retired = Retired {
                        revocation_epoch: epochs.revocation,
                        policy_epoch: epochs.policy,
                        ..Default::default()
                    };
                    if let Err(e) = broker.sockets.cut(&retired) {
                        return error(ErrorCode::Internal, format!("{e:#}"));
                    }
                    Response::Epochs(epochs)
                }
                Err(e) => error(ErrorCode::Malformed, format!("{e:#}")),
            }
        }
        Request::Status => {
            if !admin {
                return forbidden("status");
            }
            match status(broker).await {
                Ok(report) => Response::Status(Box::new(report)),
                Err(e) => error(ErrorCode::Internal, format!("{e:#}")),
            }
        }
        Request::GetEpochs => match broker.ledger.run(|batch| state::epochs(batch.conn())).await {
            Ok(epochs) => Response::Epochs(epochs),
            Err(e) => error(ErrorCode::Internal, format!("{e:#}")),
        },
        Request::ProbeEgress { addr } => {
            if !admin {
                return forbidden("probe_egress");
            }
            let target = match parse_socket_addr(&addr) {
                Ok(target) => target,
                Err(problem) => return error(ErrorCode::Malformed, problem),
            };
            let result = broker.sockets.connect_tcp(target).await;
            info!(%addr, connected = result.is_ok(), "broker egress probe");
            Response::ProbeEgress { addr, connected: result.is_ok(), error: result.err().map(|e| format!("{e:#}")) }
        }
    }
}

/// The caller behind SO_PEERCRED, pinned and read from /proc.
fn identify(peer: &UCred) -> Result<Caller, String> {
    let pid = peer.pid().ok_or("the caller's pid is unknown (SO_PEERCRED)")?;
    Caller::identify(peer.uid(), peer.gid(), pid).map_err(|e| format!("the caller cannot be identified: {e:#}"))
}

fn unidentified(peer: &UCred) -> CallerIdentity {
    CallerIdentity::unidentified(peer.uid(), peer.gid(), peer.pid().unwrap_or(0))
}

async fn status(broker: &Broker) -> anyhow::Result<StatusReport> {
    let map_entries = maps::entry_counts(&broker.layout)?;
    let (epochs, last_denial, ring_lost_total) = broker
        .ledger
        .run(|batch| {
            let last_denial = store::last_body(batch.conn(), crate::audit::denial::KIND)?
                .map(|body| serde_json::from_str(&body))
                .transpose()?;
            Ok((state::epochs(batch.conn())?, last_denial, recorded_loss_total(batch.conn())?))
        })
        .await?;
    Ok(StatusReport {
        version: env!("CARGO_PKG_VERSION").into(),
        ready: broker.readiness.ready(),
        links: broker.enforcer.links(),
        integrity: broker.enforcer.integrity(),
        map_entries,
        epochs,
        ring_lost_total,
        last_denial,
        cluster: broker.admission.cluster_status(),
    })
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error { code, message: message.into() }
}

async fn reply(stream: &mut UnixStream, response: Response) -> std::io::Result<()> {
    let body = serde_json::to_vec(&Envelope { v: VERSION, body: response }).map_err(std::io::Error::other)?;
    write_frame(stream, &body).await
}
