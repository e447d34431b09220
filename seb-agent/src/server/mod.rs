//! The broker's Unix socket: agents' requests come in here.
//!
//! Everything an outsider can hold here is bounded ([`limits`]): connections, in all and
//! per uid; time, idle and per request; memory for large requests while they arrive.
//! The caller is pinned at accept (SO_PEERPIDFD). On shutdown the socket drains: idle
//! and half-sent connections close at once, requests under way get the grace period.

mod accept;
mod connection;
mod frames;
pub mod handlers;
pub mod limits;
pub mod read_gate;
pub mod read_records;

use std::{
    os::{fd::AsFd, unix::fs::PermissionsExt},
    path::Path,
    sync::Arc,
};

use anyhow::{Context, Result};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::watch,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use handlers::READ_KIND;
use limits::{Connections, FrameMemory, Refused, SocketLimits};

use crate::{
    admission::{Admission, Peer},
    audit::Ledger,
    enforcement::{BrokerSockets, PinLayout, SharedEnforcer},
    execute::{Executors, passthrough::PassthroughConfig},
    metrics::{Limit, Metrics, Readiness},
    protocol::{ErrorCode, Response},
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
    pub limits: SocketLimits,
    pub frame_memory: FrameMemory,
    /// Full records of successful reads, bounded per uid and target.
    pub reads: read_records::ReadBudget,
    /// Passthrough reads under way and started each second.
    pub read_gate: read_gate::ReadGate,
}

/// Bind the socket: mode 0660, owned by `group` when given.
pub fn bind(path: &Path, group: Option<nix::unistd::Gid>) -> Result<UnixListener> {
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
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(gid)).with_context(|| {
            format!("config field `broker.socket_group`: giving {} to gid {gid} (the broker must be in that group, or have CAP_CHOWN)", path.display())
        })?;
    }
    Ok(listener)
}

/// `broker.socket_group`: a numeric gid as is (an image without /etc/group, a pod's
/// `supplementalGroups`), else a group name looked up in the group database.
pub fn socket_gid(group: &str) -> Result<nix::unistd::Gid> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(gid));
    }
    Ok(nix::unistd::Group::from_name(group)?
        .with_context(|| {
            format!("config field `broker.socket_group`: no group named `{group}` (a numeric gid needs no name)")
        })?
        .gid)
}

/// Serve until `shutdown` flips, then drain: connections waiting for a request close at
/// once, requests under way get `broker.shutdown_grace_seconds`, and whatever is left
/// then is cut. Returns when no connection is left.
pub async fn serve(listener: UnixListener, broker: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    let connections = Connections::new(broker.limits, broker.metrics.clone());
    let drain = CancellationToken::new();
    let summaries = tokio::spawn(record_suppressed_each_second(broker.clone(), drain.clone()));
    let mut tasks = JoinSet::new();
    let mut backoff = accept::AcceptBackoff::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff.reset();
                    if let Some(serving) = open(stream, &broker, &connections, &drain) {
                        tasks.spawn(serving);
                        // Let the new connection read the request it may already have sent
                        // (and so become busy) before a burst of newer ones can displace it.
                        tokio::task::yield_now().await;
                    }
                }
                Err(e) => {
                    let pause = backoff.pause_after(&e, &broker.metrics);
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.changed() => break,
                    }
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    drain.cancel();
    let grace = broker.limits.shutdown_grace;
    let drained = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(
            cut = tasks.len(),
            grace_s = grace.as_secs(),
            "requests still under way after the shutdown grace period were cut"
        );
        tasks.shutdown().await;
    }
    let _ = summaries.await;
    broker.admission.refusals.record_summaries(&broker.ledger, true).await;
    broker.reads.record_summaries(&broker.ledger, read_records::SUPPRESSED_KIND, true).await;
    info!("broker socket closed");
}

/// Each second, the summaries of the refusals and the reads past their budgets (see
/// `admission::refusals` and `read_records`), until the socket drains.
async fn record_suppressed_each_second(broker: Arc<Broker>, drain: CancellationToken) {
    tokio::join!(
        broker.admission.refusals.record_summaries_each_second(&broker.ledger, &drain),
        broker.reads.record_summaries_each_second(&broker.ledger, read_records::SUPPRESSED_KIND, &drain),
    );
}

/// Pin the caller and find the connection a place; `None` if it is refused.
fn open(
    stream: UnixStream,
    broker: &Arc<Broker>,
    connections: &Arc<Connections>,
    drain: &CancellationToken,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    let peer = match Peer::of_socket(stream.as_fd()) {
        Ok(peer) => peer,
        Err(e) => {
            // No descriptor for the pidfd is the same exhaustion as a failed accept.
            if e.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error) == Some(libc::EMFILE) {
                broker.metrics.count_limit(Limit::FileDescriptors);
            }
            debug!(error = %format!("{e:#}"), "a broker connection whose caller cannot be pinned was dropped");
            return None;
        }
    };
    match connections.open(peer.uid, drain) {
        Ok(slot) => Some(connection::serve(stream, peer, broker.clone(), slot)),
        Err(Refused(limit)) => {
            // Best effort, never waiting: the connection is closed either way.
            let message = format!("every broker connection is serving a request ({})", limit.as_str());
            let _ = connection::try_reply(&stream, error(ErrorCode::Busy, message));
            None
        }
    }
}

/// An error answer. Its message may quote what the caller sent (serde names an unknown
/// field or variant): kept to 4 KiB, as records keep it, so that a 1 MiB request is not
/// echoed whole.
fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error { code, message: crate::audit::clipped(&message.into(), crate::audit::MESSAGE_CLIP) }
}
