//! Prometheus metrics (OpenMetrics text at `/metrics`), and the liveness and readiness
//! endpoints (`/healthz`, `/readyz`: ready only while every program is attached).

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::sync::watch;
use tracing::warn;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub decision: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExecutionLabels {
    pub provider: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub hook: String,
    pub destination: String,
    pub cgroup: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EpochLabels {
    pub epoch: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub admissions: Family<AdmissionLabels, Counter>,
    pub execution_seconds: Family<ExecutionLabels, Histogram>,
    pub kernel_denials: Family<DenialLabels, Counter>,
    pub ring_lost: Counter,
    pub map_entries: Family<MapLabels, Gauge>,
    pub epochs: Family<EpochLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let admissions = Family::<AdmissionLabels, Counter>::default();
        let execution_seconds = Family::<ExecutionLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
        });
        let kernel_denials = Family::<DenialLabels, Counter>::default();
        let ring_lost = Counter::default();
        let map_entries = Family::<MapLabels, Gauge>::default();
        let epochs = Family::<EpochLabels, Gauge>::default();
        let mut registry = Registry::with_prefix("seb");
        registry.register("admissions", "Admission decisions by decision and reason code", admissions.clone());
        registry.register("execution_duration_seconds", "Broker time per executed mutation", execution_seconds.clone());
        registry.register("kernel_denials", "Connections and packets the kernel denied", kernel_denials.clone());
        registry.register("ringbuf_lost_events", "Kernel denials lost to a full ring buffer", ring_lost.clone());
        registry.register("map_entries", "Entries in the kernel maps", map_entries.clone());
        registry.register("active_epoch", "The active policy and revocation epochs", epochs.clone());
        Self {
            registry: Mutex::new(registry),
            admissions,
            execution_seconds,
            kernel_denials,
            ring_lost,
            map_entries,
            epochs,
        }
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Ok(registry) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        }
        text
    }
}

/// Readiness: every link the agent attached is still pinned.
#[derive(Clone)]
pub struct Readiness {
    pub pins: Vec<PathBuf>,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        !self.pins.is_empty() && self.pins.iter().all(|pin| pin.exists())
    }
}

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
    tokio::spawn(async move {
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let (metrics, readiness) = (metrics.clone(), readiness.clone());
                    tokio::spawn(async move {
                        let service = service_fn(move |request: Request<Incoming>| {
                            let response = respond(request.uri().path(), &metrics, &readiness);
                            async move { Ok::<_, Infallible>(response) }
                        });
                        if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                            warn!(error = %e, "metrics connection failed");
                        }
                    });
                }
                _ = shutdown.changed() => return,
            }
        }
    });
    Ok(())
}

fn respond(path: &str, metrics: &Metrics, readiness: &Readiness) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (200, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.encode()),
        "/healthz" => (200, "text/plain", "ok\n".to_string()),
        "/readyz" if readiness.ready() => (200, "text/plain", "ready\n".to_string()),
        "/readyz" => (503, "text/plain", "not ready: kernel programs are not all attached\n".to_string()),
        _ => (404, "text/plain", "not found\n".to_string()),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}
