//! `seb-agent run`: bring enforcement up (or adopt it), then serve the broker socket.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use tokio::{signal::unix::SignalKind, sync::watch};
use tracing::{info, warn};

use crate::{
    admission::Admission,
    audit::{Ledger, keys},
    cert::{TrustAnchors, ValidityPolicy},
    cgroupfs::{self, CgroupNames},
    config::Config,
    enforcement::{BrokerSockets, LinkState, PinLayout, loader, maps, policy},
    execute::{
        Executors, aws::AwsExecutor, broker_http::BrokerHttp, https::HttpsExecutor, kubernetes::KubernetesExecutor,
        reconcile::reconcile,
    },
    metrics::{self, EpochLabels, MapLabels, Metrics, Readiness},
    recorder::Recorder,
    server::{self, Broker},
};

/// The cgroups of the config, resolved against the cgroup2 mount. A missing one is a
/// config error: enforcing less than asked for is not an option.
pub struct ResolvedCgroups {
    pub mount: PathBuf,
    pub scopes: Vec<PathBuf>,
    pub exempt_ids: Vec<u64>,
}

pub fn resolve_cgroups(config: &Config) -> Result<ResolvedCgroups> {
    let mount = cgroupfs::cgroup2_mount()?;
    let mut scopes = Vec::new();
    for (i, relative) in config.enforcement.scope.iter().enumerate() {
        let dir = cgroupfs::resolve(&mount, relative);
        cgroupfs::cgroup_id(&dir).with_context(|| format!("config field `enforcement.scope[{i}]`"))?;
        scopes.push(dir);
    }
    let mut exempt_ids = Vec::new();
    for (i, relative) in config.enforcement.exempt_cgroups.iter().enumerate() {
        let dir = cgroupfs::resolve(&mount, relative);
        exempt_ids.push(
            cgroupfs::cgroup_id(&dir).with_context(|| format!("config field `enforcement.exempt_cgroups[{i}]`"))?,
        );
    }
    Ok(ResolvedCgroups { mount, scopes, exempt_ids })
}

/// Enforcement in place: policy written, programs attached and pinned.
pub struct Enforced {
    pub ebpf: aya::Ebpf,
    pub links: Vec<LinkState>,
    pub layout: PinLayout,
}

/// Write the policy, then attach: the programs never run against an empty policy that
/// is about to be filled.
pub fn enforce(config: &Config, cgroups: &ResolvedCgroups) -> Result<Enforced> {
    let endpoints = config.endpoints()?;
    let compiled = policy::compile(&endpoints).context("config field `enforcement.protected`")?;
    let layout = PinLayout::new(&config.bpf.pin_path);
    let mut ebpf = loader::load(&layout)?;
    maps::write_policy(&mut ebpf, &compiled)?;
    maps::write_exemptions(&mut ebpf, &cgroups.exempt_ids)?;
    let links = loader::attach_all(&mut ebpf, &layout, &cgroups.scopes)?;
    info!(
        prefixes_v4 = compiled.v4.len(),
        prefixes_v6 = compiled.v6.len(),
        exempt = cgroups.exempt_ids.len(),
        "policy applied"
    );
    Ok(Enforced { ebpf, links, layout })
}

pub async fn run(config: Config) -> Result<()> {
    let cgroups = resolve_cgroups(&config)?;
    let mut enforced = enforce(&config, &cgroups)?;
    let adopted = enforced.links.iter().filter(|l| l.origin == loader::LinkOrigin::Adopted).count();
    info!(links = enforced.links.len(), adopted, pin_path = %enforced.layout.root.display(), "kernel enforcement active");

    let key = keys::load_or_create(&config.audit.signing_key)?;
    let (ledger, ledger_thread) = Ledger::start(&config.audit.database, key)?;
    let admission = admission_from(&config)?;
    // Start-up reads the ledger synchronously; allowed on a runtime worker this way.
    let names = CgroupNames::new(cgroups.mount.clone());
    let metrics = Arc::new(Metrics::new());
    let recorder =
        tokio::task::block_in_place(|| Recorder::new(&mut enforced.ebpf, ledger.clone(), names, metrics.clone()))?;
    let stop_recorder = Arc::new(AtomicBool::new(false));
    let recorder = recorder.spawn(stop_recorder.clone());

    let sockets = BrokerSockets::open(&enforced.layout)?;
    let executors = executors_from(&config, &sockets)?;
    let listener = server::bind(&config.broker.socket, config.broker.socket_group.as_deref())?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Before serving: every admitted decision gets its outcome, even across a crash.
    reconcile(&ledger, &executors).await?;
    let passthrough = config.passthrough.clone();
    let readiness = Readiness { pins: enforced.links.iter().map(|link| link.pin.clone()).collect() };
    let broker = Arc::new(Broker {
        sockets,
        admission,
        executors,
        passthrough,
        ledger: ledger.clone(),
        metrics: metrics.clone(),
        links: enforced.links.clone(),
        layout: enforced.layout.clone(),
        readiness: readiness.clone(),
    });
    if config.metrics.enabled {
        metrics::serve(config.metrics.listen, metrics.clone(), readiness, shutdown_rx.clone()).await?;
        tokio::spawn(refresh_gauges(metrics, ledger, enforced.layout.clone(), shutdown_rx.clone()));
    }
    let serving = tokio::spawn(server::serve(listener, broker, shutdown_rx));
    info!(socket = %config.broker.socket.display(), "broker ready");

    wait_for_shutdown_signal().await?;
    info!("shutting down; kernel enforcement stays pinned");
    let _ = shutdown_tx.send(true);
    let _ = serving.await;
    stop_recorder.store(true, Ordering::Release);
    recorder.join().map_err(|_| anyhow!("the recorder thread panicked"))?;
    // Every ledger handle is gone now; the ledger finishes its queue and stops.
    ledger_thread.join().map_err(|_| anyhow!("the ledger thread panicked"))?;
    Ok(())
}

/// Map sizes and epochs, for the gauges; every few seconds.
async fn refresh_gauges(metrics: Arc<Metrics>, ledger: Ledger, layout: PinLayout, mut shutdown: watch::Receiver<bool>) {
    loop {
        if let Ok(counts) = maps::entry_counts(&layout) {
            for (map, count) in counts {
                metrics.map_entries.get_or_create(&MapLabels { map }).set(count as i64);
            }
        }
        if let Ok(epochs) = ledger.run(|batch| crate::admission::state::epochs(batch.conn())).await {
            for (epoch, value) in [("policy", epochs.policy), ("revocation", epochs.revocation)] {
                metrics.epochs.get_or_create(&EpochLabels { epoch: epoch.into() }).set(value.map_or(-1, |v| v as i64));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn executors_from(config: &Config, sockets: &BrokerSockets) -> Result<Executors> {
    let http = BrokerHttp::new(sockets.clone());
    let aws = config.aws.clone().map(|aws| AwsExecutor::new(aws, http.clone())).transpose()?;
    let https = config.http.clone().map(|config| HttpsExecutor::new(config, http.clone())).transpose()?;
    let kubernetes =
        config.kubernetes.clone().map(|config| KubernetesExecutor::new(config, http.clone())).transpose()?;
    Ok(Executors { aws, https, kubernetes })
}

fn admission_from(config: &Config) -> Result<Admission> {
    let anchors = match &config.admission.trust_anchors {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("config field `admission.trust_anchors`: cannot read {}", path.display()))?;
            Some(
                TrustAnchors::from_pem(&pem)
                    .with_context(|| format!("config field `admission.trust_anchors` ({})", path.display()))?,
            )
        }
        None => {
            warn!("admission.trust_anchors is not set: every proposal will be denied");
            None
        }
    };
    let validity = ValidityPolicy {
        max_ttl: Duration::from_secs(config.admission.max_ttl_seconds),
        clock_skew: Duration::from_secs(config.admission.clock_skew_seconds),
    };
    Ok(Admission::new(anchors, validity))
}

async fn wait_for_shutdown_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}
