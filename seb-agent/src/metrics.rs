//! Prometheus metrics (OpenMetrics text at `/metrics`), and the liveness and readiness
//! endpoints (`/healthz`, `/readyz`: ready only while every program is attached).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::sync::watch;

use crate::{cluster::freshness::Freshness, denial_metric::DenialCounter, enforcement::SharedEnforcer};
use tracing::warn;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub decision: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `admitted` or `denied`.
    pub decision: &'static str,
}

/// What this binary is: one series, value 1.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    /// The source's git commit at build time, or `unknown`.
    pub git_commit: &'static str,
    pub rustc: &'static str,
}

impl BuildLabels {
    pub const THIS: BuildLabels = BuildLabels {
        version: env!("CARGO_PKG_VERSION"),
        git_commit: env!("SEB_GIT_COMMIT"),
        rustc: env!("SEB_RUSTC_VERSION"),
    };
}

/// Upper bounds (seconds) for the broker's own latencies: admission and audit commits,
/// from 100 µs (a decision without an fsync wait) to seconds (a stalled disk).
const LOCAL_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
/// Upper bounds (seconds) for executions, which call a remote API.
const EXECUTION_BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Upper bounds for records per group commit.
const GROUP_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExecutionLabels {
    pub provider: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EpochLabels {
    pub epoch: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TamperLabels {
    /// `link` or `map`.
    pub kind: String,
}

/// A limit on the broker socket that bit: a fixed set, so the label stays bounded.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Limit {
    /// `broker.max_connections`: a waiting connection was displaced, or a new one refused.
    Connections,
    /// `broker.max_connections_per_uid`: the same, within one uid.
    ConnectionsPerUid,
    /// `broker.idle_timeout_seconds`.
    IdleTimeout,
    /// `broker.frame_timeout_seconds`, reading a request or writing its reply.
    FrameTimeout,
    /// `broker.frame_memory_mib`.
    FrameMemory,
    /// The audit ledger's queue was full.
    LedgerQueue,
    /// The process ran out of file descriptors (EMFILE, ENFILE) accepting a connection.
    FileDescriptors,
    /// Passthrough reads at once or per second (`server::read_gate`).
    PassthroughReads,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::ConnectionsPerUid => "connections_per_uid",
            Self::IdleTimeout => "idle_timeout",
            Self::FrameTimeout => "frame_timeout",
            Self::FrameMemory => "frame_memory",
            Self::LedgerQueue => "ledger_queue",
            Self::FileDescriptors => "file_descriptors",
            Self::PassthroughReads => "passthrough_reads",
        }
    }
}

impl EncodeLabelValue for Limit {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: Limit,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    /// From a proposal's arrival to its decision being durably recorded.
    pub admission_seconds: Family<DecisionLabels, Histogram>,
    /// One group commit of the audit ledger: COMMIT and its fsync.
    pub audit_commit_seconds: Histogram,
    /// Records per group commit.
    pub audit_commit_records: Histogram,
    /// Divergences between the kernel and what the agent installed, found and repaired.
    pub tamper_findings: Family<TamperLabels, Counter>,
    pub admissions: Family<AdmissionLabels, Counter>,
    pub execution_seconds: Family<ExecutionLabels, Histogram>,
    pub kernel_denials: DenialCounter,
    pub ring_lost: Counter,
    /// Kernel denials past the recording budget: counted in a summary record instead.
    pub denials_suppressed: Counter,
    pub map_entries: Family<MapLabels, Gauge>,
    pub epochs: Family<EpochLabels, Gauge>,
    /// From a revocation being written to the API to this node applying it.
    pub revocation_propagation: Histogram,
    /// Seconds since the API server last answered (cluster mode); -1 before it ever did.
    pub cluster_state_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub cluster_sync_errors: Family<ResourceLabels, Counter>,
    /// Broker connections cut because their decision's certificate was revoked.
    pub sockets_cut: Counter,
    /// Open connections on the broker socket.
    pub connections: Gauge,
    /// Times a limit on the broker socket refused, displaced or cut something.
    pub limited: Family<LimitLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let admissions = Family::<AdmissionLabels, Counter>::default();
        let execution_seconds =
            Family::<ExecutionLabels, Histogram>::new_with_constructor(|| Histogram::new(EXECUTION_BUCKETS));
        let admission_seconds =
            Family::<DecisionLabels, Histogram>::new_with_constructor(|| Histogram::new(LOCAL_BUCKETS));
        let audit_commit_seconds = Histogram::new(LOCAL_BUCKETS);
        let audit_commit_records = Histogram::new(GROUP_BUCKETS);
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info.get_or_create(&BuildLabels::THIS).set(1);
        let kernel_denials = DenialCounter::default();
        let ring_lost = Counter::default();
        let denials_suppressed = Counter::default();
        let map_entries = Family::<MapLabels, Gauge>::default();
        let epochs = Family::<EpochLabels, Gauge>::default();
        let revocation_propagation =
            Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]);
        let cluster_state_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        cluster_state_age.set(-1.0);
        let cluster_sync_errors = Family::<ResourceLabels, Counter>::default();
        let sockets_cut = Counter::default();
        let tamper_findings = Family::<TamperLabels, Counter>::default();
        let connections = Gauge::default();
        let limited = Family::<LimitLabels, Counter>::default();
        let mut registry = Registry::with_prefix("seb");
        registry.register(
            "tamper_findings",
            "Links or maps found differing from what the agent installed (each repaired and recorded)",
            tamper_findings.clone(),
        );
        registry.register("admissions", "Admission decisions by decision and reason code", admissions.clone());
        registry.register("build_info", "This binary: version, git commit and compiler; value 1", build_info);
        registry.register(
            "admission_duration_seconds",
            "From a proposal's arrival to its decision being durably recorded (the precondition read and identity \
             minting included), by decision",
            admission_seconds.clone(),
        );
        registry.register(
            "execution_duration_seconds",
            "The mutation and the read of the resulting state, with the minted identity, by provider and status",
            execution_seconds.clone(),
        );
        registry.register(
            "audit_commit_duration_seconds",
            "One group commit of the audit ledger: its COMMIT and fsync",
            audit_commit_seconds.clone(),
        );
        registry.register("audit_commit_records", "Records per audit group commit", audit_commit_records.clone());
        registry.register(
            "kernel_denials",
            "Connections and packets the kernel denied, by hook and (for this node's known pods) pod",
            kernel_denials.family(),
        );
        registry.register("ringbuf_lost_events", "Kernel denials lost to a full ring buffer", ring_lost.clone());
        registry.register(
            "denials_suppressed",
            "Kernel denials past the recording budget, counted in a summary record",
            denials_suppressed.clone(),
        );
        registry.register("map_entries", "Entries in the kernel maps", map_entries.clone());
        registry.register("active_epoch", "The active policy and revocation epochs", epochs.clone());
        registry.register(
            "revocation_propagation_seconds",
            "From a SebRevocation change being written to this node applying it",
            revocation_propagation.clone(),
        );
        registry.register(
            "cluster_state_age_seconds",
            "Seconds since the API server last answered this node's broker",
            cluster_state_age.clone(),
        );
        registry.register(
            "cluster_sync_errors",
            "Cluster resources that could not be read or applied",
            cluster_sync_errors.clone(),
        );
        registry.register("revoked_connections_cut", "Broker connections cut by a revocation", sockets_cut.clone());
        registry.register("broker_connections", "Open connections on the broker socket", connections.clone());
        registry.register(
            "broker_limited",
            "Times a broker socket limit refused, displaced or cut a connection or request",
            limited.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            admission_seconds,
            audit_commit_seconds,
            audit_commit_records,
            tamper_findings,
            admissions,
            execution_seconds,
            kernel_denials,
            ring_lost,
            denials_suppressed,
            map_entries,
            epochs,
            revocation_propagation,
            cluster_state_age,
            cluster_sync_errors,
            sockets_cut,
            connections,
            limited,
        }
    }

    /// A decision, durably recorded `elapsed` after its proposal arrived.
    pub fn decided(&self, decision: &crate::admission::Decision, elapsed: std::time::Duration) {
        let verdict = if decision.admitted { "admitted" } else { "denied" };
        let labels = AdmissionLabels { decision: verdict.into(), reason: decision.reason.as_str().into() };
        self.admissions.get_or_create(&labels).inc();
        self.admission_seconds.get_or_create(&DecisionLabels { decision: verdict }).observe(elapsed.as_secs_f64());
    }

    /// A group commit of the audit ledger.
    pub fn committed(&self, commit: &crate::audit::Commit) {
        self.audit_commit_seconds.observe(commit.duration.as_secs_f64());
        self.audit_commit_records.observe(commit.records as f64);
    }

    /// Count one bite of `limit`.
    pub fn count_limit(&self, limit: Limit) {
        self.limited.get_or_create(&LimitLabels { limit }).inc();
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Ok(registry) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        }
        text
    }
}

/// Readiness: every link the agent attached is still pinned, and in cluster mode the
/// cluster state has been read and is not stale (a broker past its staleness bound
/// refuses every admission; where the policy selects no pod here, no link is needed).
#[derive(Clone)]
pub struct Readiness {
    pub enforcer: SharedEnforcer,
    pub cluster: Option<Freshness>,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        let links = self.enforcer.links();
        // The last check of the kernel found everything as installed (a repaired
        // divergence counts only once a later check confirms the repair).
        // Protected host names not resolved yet are not protected yet (an earlier run's
        // addresses are kept, but a first start has none).
        let attached = links.iter().all(|link| link.pin.exists())
            && self.enforcer.integrity().intact
            && !self.enforcer.hosts_pending();
        match &self.cluster {
            None => attached && !links.is_empty(),
            // `stale()` is also `Some` until both resources were read.
            Some(freshness) => {
                attached && freshness.is_settled() && freshness.stale().is_none() && freshness.are_pods_enforced()
            }
        }
    }
}

/// Scrape and probe connections open at once, at most, and per source address (more are
/// closed at accept).
pub const MAX_SCRAPE_CONNECTIONS: usize = 256;
pub const SCRAPE_CONNECTIONS_PER_SOURCE: usize = 8;
/// Time for a request's headers.
const SCRAPE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// A connection's whole life: a scraper that keeps one alive reconnects.
const SCRAPE_CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);

/// Serve `/metrics`, `/healthz` and `/readyz` until `shutdown` flips.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("config field `metrics.listen`: binding {addr}"))?;
    // Anyone who reaches the port (every pod, with hostNetwork and 0.0.0.0) may connect:
    // connections are few and short, so holding them open costs the broker nothing it
    // needs (its descriptors, its memory). When all places are taken, a new connection
    // displaces the oldest open one: connections held open from many addresses cannot
    // keep the kubelet's probe out (it would restart a healthy agent).
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPE_CONNECTIONS));
    let sources = Arc::new(crate::connection_shares::Shares::<std::net::IpAddr>::default());
    let open = Arc::new(std::sync::Mutex::new(OpenConnections::default()));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            // Out of descriptors, say: the connection stays queued, so
                            // retrying at once would spin.
                            warn!(error = %e, "metrics accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    // Per source first: one pod holding connections leaves the kubelet's
                    // probes and the scraper theirs. A source at its bound gives up its
                    // oldest connection: one sharing the kubelet's address (a host-network
                    // pod) cannot hold the probes out either.
                    let source = peer.ip().to_canonical();
                    let share = match sources.take(&source, SCRAPE_CONNECTIONS_PER_SOURCE) {
                        Some(share) => share,
                        None => {
                            open.lock().unwrap_or_else(|p| p.into_inner()).displace_oldest_of(source);
                            let mut share = None;
                            for _ in 0..20 {
                                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                                share = sources.take(&source, SCRAPE_CONNECTIONS_PER_SOURCE);
                                if share.is_some() {
                                    break;
                                }
                            }
                            let Some(share) = share else { continue };
                            share
                        }
                    };
                    let slot = match slots.clone().try_acquire_owned() {
                        Ok(slot) => slot,
                        Err(_) => {
                            open.lock().unwrap_or_else(|p| p.into_inner()).displace_oldest();
                            let freed = slots.clone().acquire_owned();
                            match tokio::time::timeout(std::time::Duration::from_millis(200), freed).await {
                                Ok(Ok(slot)) => slot,
                                _ => continue,
                            }
                        }
                    };
                    let (metrics, readiness) = (metrics.clone(), readiness.clone());
                    let (seq, displaced) = open.lock().unwrap_or_else(|p| p.into_inner()).add(source);
                    let open = open.clone();
                    tokio::spawn(async move {
                        let _held = (slot, share);
                        let service = service_fn(move |request: Request<Incoming>| {
                            let response = respond(request.uri().path(), &metrics, &readiness);
                            async move { Ok::<_, Infallible>(response) }
                        });
                        let serving = hyper::server::conn::http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(SCRAPE_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service);
                        tokio::select! {
                            served = tokio::time::timeout(SCRAPE_CONNECTION_LIFETIME, serving) => {
                                if let Ok(Err(e)) = served {
                                    warn!(error = %e, "metrics connection failed");
                                }
                            }
                            () = displaced.cancelled() => {}
                        }
                        open.lock().unwrap_or_else(|p| p.into_inner()).remove(seq);
                    });
                }
                _ = shutdown.changed() => return,
            }
        }
    });
    Ok(())
}

/// The open connections, oldest first, with their source addresses.
#[derive(Default)]
struct OpenConnections {
    next: u64,
    by_age: std::collections::BTreeMap<u64, (std::net::IpAddr, tokio_util::sync::CancellationToken)>,
}

impl OpenConnections {
    fn add(&mut self, source: std::net::IpAddr) -> (u64, tokio_util::sync::CancellationToken) {
        self.next += 1;
        let token = tokio_util::sync::CancellationToken::new();
        self.by_age.insert(self.next, (source, token.clone()));
        (self.next, token)
    }

    /// Displace `source`'s oldest open connection.
    fn displace_oldest_of(&mut self, source: std::net::IpAddr) {
        let oldest = self.by_age.iter().find(|(_, (from, _))| *from == source).map(|(seq, _)| *seq);
        if let Some((_, token)) = oldest.and_then(|seq| self.by_age.remove(&seq)) {
            token.cancel();
        }
    }

    fn remove(&mut self, seq: u64) {
        self.by_age.remove(&seq);
    }

    fn displace_oldest(&mut self) {
        if let Some((_, (_, token))) = self.by_age.pop_first() {
            token.cancel();
        }
    }
}

fn respond(path: &str, metrics: &Metrics, readiness: &Readiness) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (200, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.encode()),
        "/healthz" => (200, "text/plain", "ok\n".to_string()),
        "/readyz" if readiness.ready() => (200, "text/plain", "ready\n".to_string()),
        "/readyz" => (
            503,
            "text/plain",
            "not ready: kernel programs are not all attached, the cluster state is not read, or a selected pod is \
             not enforced\n"
                .to_string(),
        ),
        _ => (404, "text/plain", "not found\n".to_string()),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}
