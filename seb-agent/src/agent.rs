//! `seb-agent run`: bring enforcement up (or adopt it), then serve the broker socket.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use tokio::{signal::unix::SignalKind, sync::watch};
use tracing::{info, warn};

use crate::{
    admission::ClusterGate,
    audit::{Commit, Ledger, LedgerFiles, LedgerOptions, keys},
    cgroupfs::CgroupNames,
    cluster::{self, directory::SharedDirectory, freshness::Freshness, sync::ClusterSync},
    config::Config,
    enforcement::{BrokerSockets, Enforcer, PinLayout, SharedEnforcer, hostnames, loader, maps},
    execute::{
        Executors, aws::AwsExecutor, broker_http::BrokerHttp, https::HttpsExecutor, kubernetes::KubernetesExecutor,
        reconcile::reconcile,
    },
    kube_api::{KubeApi, Token},
    metrics::{self, EpochLabels, MapLabels, Metrics, Readiness},
    preflight::{self, Checked},
    recorder::Recorder,
    server::{
        self, Broker,
        limits::{FrameMemory, SocketLimits},
    },
    tamper,
};

/// Beyond the grace period, for the ledger to commit what is queued and the threads to stop.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(2);

/// The broker's state derived from its ledger: the admission state, and at start the
/// decisions to reconcile.
pub const BROKER_STATE: crate::audit::Derived =
    crate::audit::Derived { at_start: crate::execute::reconcile::ORPHANS_AT_START, ..crate::admission::state::DERIVED };

pub async fn run(config: Config) -> Result<()> {
    let limits = SocketLimits::from_config(&config.broker);
    report_sigbus()?;
    // Nothing reaches the kernel before the config's files, cgroups and audit store check out.
    let Checked { mount, sources, mut admission, socket_gid, descriptors } = preflight::check(&config)?;
    // Named to the kernel first (`SEB_AGENT`): from then on a process of the scope moving
    // this one dies for it, and the cgroup the kernel names is the one it started in. The
    // ledger's start (verifying the whole store) can take seconds.
    let layout = PinLayout::new(&config.bpf.pin_path);
    let mut enforcer = Enforcer::load(layout.clone(), mount.clone(), config.enforcement.max_scoped_processes)?;
    let key = keys::load_or_create(&config.audit.signing_key)?;
    let files = LedgerFiles::new(&config.audit.database, &config.audit.signing_key);
    let metrics = Arc::new(Metrics::new());
    let on_commit = {
        let metrics = metrics.clone();
        Box::new(move |commit: &Commit| metrics.committed(commit))
    };
    let options = LedgerOptions { on_commit: Some(on_commit), ..LedgerOptions::default() };
    let (ledger, ledger_thread) = Ledger::start_with(&files, key, BROKER_STATE, options)?;

    enforcer.apply(&sources)?;
    let adopted = enforcer.links().iter().filter(|l| l.origin == loader::LinkOrigin::Adopted).count();
    info!(links = enforcer.links().len(), adopted, pin_path = %layout.root.display(), "kernel enforcement active");

    // Start-up reads the ledger synchronously; allowed on a runtime worker this way.
    let names = CgroupNames::new(mount.clone());
    let directory = SharedDirectory::default();
    // Denials name a pod only in the kubelet's hierarchy (a configured one, or the default).
    let kubepods = config.cluster.as_ref().and_then(|cluster| cluster.kubepods_cgroup.clone());
    let recorder = tokio::task::block_in_place(|| {
        Recorder::new(enforcer.ebpf_mut(), ledger.clone(), names, metrics.clone(), (directory.clone(), kubepods))
    })?;
    let stop_recorder = Arc::new(AtomicBool::new(false));
    let recorder = recorder.spawn(stop_recorder.clone());
    let enforcer = SharedEnforcer::new(enforcer, sources);

    let sockets = BrokerSockets::open(&layout)?;
    let executors = executors_from(&config, &sockets)?;
    let listener = server::bind(&config.broker.socket, socket_gid)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut freshness = None;
    if let (Some(cluster), Some(kubernetes)) = (&config.cluster, &config.kubernetes) {
        let node = cluster.node_name()?;
        let fresh = Freshness::new(cluster.staleness());
        admission = admission.with_cluster(ClusterGate {
            node_name: node.clone(),
            require_node_binding: cluster.require_node_binding,
            freshness: fresh.clone(),
            pods: directory.clone(),
        });
        let api = KubeApi::new(kubernetes, BrokerHttp::new(sockets.clone()))?;
        let sync = ClusterSync::new(
            ledger.clone(),
            enforcer.clone(),
            sockets.clone(),
            fresh.clone(),
            metrics.clone(),
            directory.clone(),
            {
                let (cluster, mount) = (cluster.clone(), mount.clone());
                move || cluster.kubepods(&mount)
            },
        );
        tasks.extend(cluster::watch::spawn(
            api.client(Token::Broker, "default"),
            cluster,
            &node,
            sync,
            shutdown_rx.clone(),
        ));
        freshness = Some(fresh);
    }
    if !config.enforcement.protected_hosts.is_empty() {
        let resolver = hostnames::resolver(config.enforcement.resolver)?;
        let hosts = config.enforcement.protected_hosts.clone();
        tasks.push(tokio::spawn(hostnames::follow(hosts, resolver, enforcer.clone(), shutdown_rx.clone())));
    }
    // Before serving: every admitted decision gets its outcome, even across a crash.
    reconcile(&ledger, &executors).await?;
    let passthrough = config.passthrough.clone();
    let passthrough_mints = (passthrough.mints_per_second, passthrough.mints_per_uid_per_second);
    tasks.push(tokio::spawn(tamper::watch(
        enforcer.clone(),
        sockets.clone(),
        ledger.clone(),
        metrics.clone(),
        shutdown_rx.clone(),
    )));
    let readiness = Readiness { enforcer: enforcer.clone(), cluster: freshness.clone() };
    let broker = Arc::new(Broker {
        sockets,
        admission,
        executors,
        passthrough,
        ledger: ledger.clone(),
        metrics: metrics.clone(),
        enforcer,
        layout: layout.clone(),
        readiness: readiness.clone(),
        limits,
        frame_memory: FrameMemory::new(limits.frame_memory),
        reads: crate::server::read_records::budget(),
        read_gate: crate::server::read_gate::ReadGate::new(passthrough_mints.0, passthrough_mints.1),
    });
    if config.metrics.enabled {
        metrics::serve(config.metrics.listen, metrics.clone(), readiness, shutdown_rx.clone()).await?;
        tasks.push(tokio::spawn(refresh_gauges(metrics, ledger.clone(), layout, freshness, shutdown_rx.clone())));
    }
    let serving = tokio::spawn(server::serve(listener, broker, shutdown_rx));
    info!(
        socket = %config.broker.socket.display(),
        max_connections = limits.max_connections,
        max_connections_per_uid = limits.max_connections_per_uid,
        descriptors,
        "broker ready"
    );

    wait_for_shutdown_signal().await?;
    info!(grace_s = limits.shutdown_grace.as_secs(), "shutting down; kernel enforcement stays pinned");
    let deadline = Instant::now() + limits.shutdown_grace + SHUTDOWN_SLACK;
    let _ = shutdown_tx.send(true);
    // The socket drains within the grace period; background tasks get the same time.
    let _ = serving.await;
    for task in tasks {
        let abort = task.abort_handle();
        if tokio::time::timeout_at(deadline.into(), task).await.is_err() {
            abort.abort();
        }
    }
    stop_recorder.store(true, Ordering::Release);
    recorder.join().map_err(|_| anyhow!("the recorder thread panicked"))?;
    // The last handle: the ledger commits what is queued, then stops.
    drop(ledger);
    let ledger_stopped = tokio::task::spawn_blocking(move || ledger_thread.join());
    match tokio::time::timeout_at(deadline.into(), ledger_stopped).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(_) => Err(anyhow!("the ledger thread panicked")),
        Err(_) => {
            warn!("the audit ledger did not stop in time; what it committed is kept");
            Ok(())
        }
    }
}

/// Map sizes and epochs, for the gauges; every few seconds.
async fn refresh_gauges(
    metrics: Arc<Metrics>,
    ledger: Ledger,
    layout: PinLayout,
    freshness: Option<Freshness>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if let Some(age) = freshness.as_ref().and_then(Freshness::age) {
            metrics.cluster_state_age.set(age.as_secs_f64());
        }
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
    Ok(Executors { aws, https, kubernetes, targets: Default::default(), retries: Default::default() })
}

/// A memory-mapped file cut short under the broker (SQLite's `-shm`, truncated while it
/// runs) kills it with SIGBUS. Say so on stderr first: a signal handler can do nothing
/// else safely. The handler is reset on entry, so the faulting access, run again, then
/// ends the process as before.
fn report_sigbus() -> Result<()> {
    extern "C" fn on_sigbus(_: libc::c_int) {
        const MESSAGE: &[u8] = b"seb-agent: fatal SIGBUS: a memory-mapped file was cut short or made unreadable \
under the broker (the audit store's -shm file?)\n";
        // SAFETY: write(2) is async-signal-safe; the buffer is static.
        unsafe { libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len()) };
    }
    let action = SigAction::new(SigHandler::Handler(on_sigbus), SaFlags::SA_RESETHAND, SigSet::empty());
    // SAFETY: the handler only calls write(2).
    unsafe { sigaction(Signal::SIGBUS, &action) }.context("installing the SIGBUS handler")?;
    Ok(())
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
