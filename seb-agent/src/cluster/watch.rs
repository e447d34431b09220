//! The node's watchers (kube-rs runtime): the `SebPolicy` and `SebRevocation` this node
//! follows, the pods on this node and the namespaces' labels, and the API server's own
//! Service and EndpointSlices. Each change is applied as it arrives. A probe reads both
//! resources every third of the staleness bound, so a quiet cluster still counts as
//! heard from, and a watch that stalled without an error is caught up.

use std::{
    fmt::Debug,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use futures::{StreamExt, pin_mut};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::{sync::watch as signal, task::JoinHandle};
use tracing::{info, warn};

use super::{
    crd::{SebPolicy, SebRevocation},
    directory::PodDirectory,
    discovery::{self, ApiServerAddresses},
    freshness::Resource as Tracked,
    sync::ClusterSync,
};
use crate::enforcement::EndpointSource;

/// `[cluster]`: this node's part in the cluster.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name; default: the `NODE_NAME` environment variable (the DaemonSet sets
    /// it from `spec.nodeName`).
    #[serde(default)]
    pub node_name: Option<String>,
    /// The `SebPolicy` this node follows.
    #[serde(default = "default_object")]
    pub policy: String,
    /// The `SebRevocation` this node follows.
    #[serde(default = "default_object")]
    pub revocation: String,
    /// Admissions are denied when the API server has not answered for this long.
    #[serde(default = "default_staleness")]
    pub staleness_seconds: u64,
    /// Deny contracts that bind neither `agent.node` nor `agent.pod_uid`.
    #[serde(default = "default_true")]
    pub require_node_binding: bool,
    /// Protect the `kubernetes` Service's ClusterIPs and its EndpointSlices' addresses.
    #[serde(default = "default_true")]
    pub discover_api_server: bool,
    /// The kubelet's pod cgroup (relative to the cgroup2 mount); default: `/kubepods.slice`
    /// or `/kubepods`, whichever exists.
    #[serde(default)]
    pub kubepods_cgroup: Option<String>,
}

fn default_object() -> String {
    "default".into()
}
fn default_staleness() -> u64 {
    30
}
fn default_true() -> bool {
    true
}

impl ClusterConfig {
    pub fn node_name(&self) -> Result<String> {
        self.node_name.clone().or_else(|| std::env::var("NODE_NAME").ok()).filter(|name| !name.is_empty()).context(
            "config field `cluster.node_name` is not set and neither is NODE_NAME (the DaemonSet sets it from spec.nodeName)",
        )
    }

    /// The kubepods cgroup directory on this node.
    pub fn kubepods(&self, mount: &std::path::Path) -> Option<std::path::PathBuf> {
        match &self.kubepods_cgroup {
            Some(relative) => Some(crate::cgroupfs::resolve(mount, relative)),
            None => super::pods::kubepods(mount),
        }
    }

    pub fn staleness(&self) -> Duration {
        Duration::from_secs(self.staleness_seconds)
    }
}

/// A watcher's events, as the node uses them.
enum Change<K> {
    /// The full set, after a (re)list.
    Relisted(Vec<K>),
    Applied(K),
    Deleted(K),
}

/// Follow `api` until shutdown, handing each change to `handle`; errors are counted and
/// retried with kube's default backoff.
async fn follow<K, F, Fut>(
    api: Api<K>,
    config: watcher::Config,
    sync: ClusterSync,
    mut shutdown: signal::Receiver<bool>,
    mut handle: F,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
    F: FnMut(Change<K>) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let kind = K::kind(&Default::default()).to_string();
    let stream = watcher(api, config).default_backoff();
    pin_mut!(stream);
    let mut listed = Vec::new();
    loop {
        let event = tokio::select! {
            event = stream.next() => event,
            _ = shutdown.changed() => return,
        };
        let change = match event {
            None => return,
            Some(Err(e)) => {
                sync.error(&kind, &anyhow::Error::new(e));
                continue;
            }
            Some(Ok(event)) => {
                sync.freshness().contact();
                match event {
                    watcher::Event::Init => {
                        listed.clear();
                        continue;
                    }
                    watcher::Event::InitApply(object) => {
                        listed.push(object);
                        continue;
                    }
                    watcher::Event::InitDone => Change::Relisted(std::mem::take(&mut listed)),
                    watcher::Event::Apply(object) => Change::Applied(object),
                    watcher::Event::Delete(object) => Change::Deleted(object),
                }
            }
        };
        let relisted = matches!(change, Change::Relisted(_));
        match handle(change).await {
            Ok(()) if relisted => {
                if let Err(e) = sync.listed(&kind) {
                    sync.error(&kind, &e);
                }
            }
            Ok(()) => {}
            Err(e) => sync.error(&kind, &e),
        }
    }
}

/// One named, cluster-scoped object: applied when it changes; its absence or a failed
/// apply makes admissions wait (fail closed).
async fn follow_one<K, F, Fut>(
    client: Client,
    name: String,
    tracked: Tracked,
    sync: ClusterSync,
    shutdown: signal::Receiver<bool>,
    apply: F,
) where
    K: Resource<Scope = kube::core::ClusterResourceScope> + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
    F: Fn(ClusterSync, K) -> Fut + Clone,
    Fut: Future<Output = Result<()>>,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let kind = K::kind(&Default::default()).to_string();
    let handler_sync = sync.clone();
    follow(Api::<K>::all(client), config, sync, shutdown, move |change| {
        let (sync, apply, name, kind) = (handler_sync.clone(), apply.clone(), name.clone(), kind.clone());
        async move {
            let object = match change {
                Change::Relisted(objects) => objects.into_iter().next(),
                Change::Applied(object) => Some(object),
                Change::Deleted(_) => None,
            };
            let Some(object) = object else {
                sync.freshness().unsynced(tracked);
                anyhow::bail!("{kind} {name} does not exist: admissions are denied until it does");
            };
            let version = object.resource_version();
            if let Err(e) = apply(sync.clone(), object).await {
                sync.freshness().unsynced(tracked);
                return Err(e);
            }
            sync.applied_version(tracked, version);
            Ok(())
        }
    })
    .await
}

async fn apply_revocation(sync: ClusterSync, object: SebRevocation) -> Result<()> {
    sync.revocation(&object).await.map(drop)
}

async fn apply_policy(sync: ClusterSync, object: SebPolicy) -> Result<()> {
    sync.policy(&object).await
}

/// Start every watcher; they run until `shutdown` flips.
pub fn spawn(
    client: Client,
    config: &ClusterConfig,
    node: &str,
    sync: ClusterSync,
    shutdown: signal::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    // Before any watcher starts, so none can settle the node early.
    let mut kinds = vec!["SebRevocation", "SebPolicy", "Pod", "Namespace"];
    if config.discover_api_server {
        kinds.extend(["Service", "EndpointSlice"]);
    }
    sync.require_lists(kinds.into_iter().map(String::from));
    let mut tasks = vec![
        tokio::spawn(follow_one::<SebRevocation, _, _>(
            client.clone(),
            config.revocation.clone(),
            Tracked::Revocation,
            sync.clone(),
            shutdown.clone(),
            apply_revocation,
        )),
        tokio::spawn(follow_one::<SebPolicy, _, _>(
            client.clone(),
            config.policy.clone(),
            Tracked::Policy,
            sync.clone(),
            shutdown.clone(),
            apply_policy,
        )),
        tokio::spawn(follow_directory(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={node}")),
            sync.clone(),
            shutdown.clone(),
            record_pods,
        )),
        tokio::spawn(follow_directory(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            sync.clone(),
            shutdown.clone(),
            record_namespaces,
        )),
        tokio::spawn(probe(client.clone(), config.clone(), sync.clone(), shutdown.clone())),
    ];
    if config.discover_api_server {
        tasks.extend(discover_api_server(client, sync, shutdown));
    }
    info!(node, policy = %config.policy, revocation = %config.revocation, "watching the cluster state");
    tasks
}

/// Pods or namespaces: each change is recorded in the directory, then the pods the
/// policy selects are enforced again.
async fn follow_directory<K>(
    api: Api<K>,
    config: watcher::Config,
    sync: ClusterSync,
    shutdown: signal::Receiver<bool>,
    record: fn(&mut PodDirectory, &Change<K>),
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let handler_sync = sync.clone();
    follow(api, config, sync, shutdown, move |change| {
        let sync = handler_sync.clone();
        async move {
            record(&mut *sync.directory().write().map_err(|_| anyhow::anyhow!("pod directory poisoned"))?, &change);
            sync.pods_changed().map(drop)
        }
    })
    .await
}

fn record_pods(directory: &mut PodDirectory, change: &Change<Pod>) {
    match change {
        Change::Relisted(pods) => directory.replace_pods(pods),
        Change::Applied(pod) => directory.upsert_pod(pod),
        Change::Deleted(pod) => directory.remove_pod(pod),
    }
}

fn record_namespaces(directory: &mut PodDirectory, change: &Change<Namespace>) {
    match change {
        Change::Relisted(namespaces) => directory.replace_namespaces(namespaces),
        Change::Applied(namespace) => directory.upsert_namespace(namespace),
        Change::Deleted(namespace) => directory.remove_namespace(namespace),
    }
}

/// The `kubernetes` Service and its EndpointSlices, kept protected as they change.
fn discover_api_server(client: Client, sync: ClusterSync, shutdown: signal::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let addresses = Arc::new(Mutex::new(ApiServerAddresses::default()));
    let services = Api::<Service>::namespaced(client.clone(), discovery::NAMESPACE);
    let slices = Api::<EndpointSlice>::namespaced(client, discovery::NAMESPACE);
    let (service_sync, service_addresses) = (sync.clone(), addresses.clone());
    let service_task = follow(
        services,
        watcher::Config::default().fields(&format!("metadata.name={}", discovery::SERVICE)),
        sync.clone(),
        shutdown.clone(),
        move |change| {
            let (sync, addresses) = (service_sync.clone(), service_addresses.clone());
            async move { update_addresses(&sync, &addresses, "service/", change, discovery::service_endpoints) }
        },
    );
    let (slice_sync, slice_addresses) = (sync.clone(), addresses);
    let slice_task =
        follow(slices, watcher::Config::default().labels(discovery::SLICE_LABEL), sync, shutdown, move |change| {
            let (sync, addresses) = (slice_sync.clone(), slice_addresses.clone());
            async move { update_addresses(&sync, &addresses, "slice/", change, discovery::slice_endpoints) }
        });
    vec![tokio::spawn(service_task), tokio::spawn(slice_task)]
}

/// Record a Service or EndpointSlice change and protect the resulting addresses. The lock
/// is held until they are applied, so the two watchers never apply each other's stale view.
fn update_addresses<K: ResourceExt>(
    sync: &ClusterSync,
    addresses: &Mutex<ApiServerAddresses>,
    prefix: &str,
    change: Change<K>,
    endpoints: fn(&K) -> Vec<crate::config::Endpoint>,
) -> Result<()> {
    let mut addresses = addresses.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let key = |object: &K| format!("{prefix}{}", object.name_any());
    match change {
        Change::Relisted(objects) => {
            addresses.replace(prefix, objects.iter().map(|object| (key(object), endpoints(object))).collect())
        }
        Change::Applied(object) => addresses.set(key(&object), endpoints(&object)),
        Change::Deleted(object) => addresses.remove(&key(&object)),
    }
    let enforcer = sync.enforcer();
    tokio::task::block_in_place(|| enforcer.set_endpoints(EndpointSource::ApiServer, addresses.endpoints())).map(drop)
}

/// Read both resources every third of the staleness bound: an answer is contact, and a
/// version the watchers have not applied is applied here.
async fn probe(client: Client, config: ClusterConfig, sync: ClusterSync, mut shutdown: signal::Receiver<bool>) {
    let interval = (config.staleness() / 3).max(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        let revocation = Api::<SebRevocation>::all(client.clone()).get_opt(&config.revocation).await;
        let policy = Api::<SebPolicy>::all(client.clone()).get_opt(&config.policy).await;
        match (revocation, policy) {
            (Ok(revocation), Ok(policy)) => {
                sync.freshness().contact();
                if let Some(object) = revocation.filter(|o| !sync.is_applied(Tracked::Revocation, o.resource_version()))
                {
                    warn!("the probe found a SebRevocation version the watcher had not applied");
                    let version = object.resource_version();
                    match sync.revocation(&object).await {
                        Ok(_) => sync.applied_version(Tracked::Revocation, version),
                        Err(e) => sync.error("SebRevocation", &e),
                    }
                }
                if let Some(object) = policy.filter(|o| !sync.is_applied(Tracked::Policy, o.resource_version())) {
                    warn!("the probe found a SebPolicy version the watcher had not applied");
                    let version = object.resource_version();
                    match sync.policy(&object).await {
                        Ok(()) => sync.applied_version(Tracked::Policy, version),
                        Err(e) => sync.error("SebPolicy", &e),
                    }
                }
            }
            (Err(e), _) | (_, Err(e)) => sync.error("probe", &anyhow::Error::new(e)),
        }
        // Pods whose cgroups the kubelet has made since they were listed.
        if let Err(e) = sync.pods_changed() {
            sync.error("Pod", &e);
        }
    }
}
