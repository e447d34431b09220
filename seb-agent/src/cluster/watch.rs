//! The node's watchers (kube-rs runtime): the `SebPolicy` and `SebRevocation` this node
//! follows, the pods on this node and the namespaces' labels, and the API server's own
//! Service and EndpointSlices ([`super::config`] says which, with what selectors). Each
//! change is applied as it arrives; the followed objects through their ordered path
//! ([`super::order`]), which the probe ([`super::probe`]) shares.

use std::{
    fmt::Debug,
    future::Future,
    sync::{Arc, Mutex},
};

use anyhow::Result;
use futures::{StreamExt, pin_mut};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use tokio::{sync::watch as signal, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{
    config::{self, ClusterConfig},
    crd::{SebPolicy, SebRevocation},
    directory::PodDirectory,
    discovery::{self, ApiServerAddresses},
    order::{Observed, Outcome, Source},
    probe,
    sync::ClusterSync,
};
use crate::enforcement::EndpointSource;

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
    // Whether the last list, or a change since, was applied.
    let mut applied_since_list = false;
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
                // Only the followed objects' own events count as having read them, and
                // only those the API server sent: kube's watcher makes `Init` itself,
                // before each list, also before each retry of a list that keeps failing.
                let from_the_server = sent_by_the_server(&event);
                match kind.as_str() {
                    "SebPolicy" if from_the_server => sync.freshness().read(super::freshness::Resource::Policy),
                    "SebRevocation" if from_the_server => sync.freshness().read(super::freshness::Resource::Revocation),
                    _ => {}
                }
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
            // Listed once the first list, or the first change after a list that could
            // not be applied (a followed object missing or invalid then, made later),
            // is applied: a watcher relists only after an error, so waiting for the next
            // list would leave the node unsettled for good.
            Ok(()) if relisted || !applied_since_list => match sync.listed(&kind) {
                Ok(()) => applied_since_list = true,
                Err(e) => {
                    applied_since_list = false;
                    sync.error(&kind, &e)
                }
            },
            Ok(()) => {}
            Err(e) => {
                applied_since_list &= !relisted;
                sync.error(&kind, &e)
            }
        }
    }
}

/// Whether a watcher event carries what the API server sent: every one but `Init`, which
/// kube's watcher makes itself before each list, the failed ones' retries included.
fn sent_by_the_server<K>(event: &watcher::Event<K>) -> bool {
    !matches!(event, watcher::Event::Init)
}

/// The one object of a kind this node follows: each change goes through its ordered
/// path; its absence or a failed apply makes admissions wait (fail closed).
async fn follow_one<K, F, Fut>(
    client: Client,
    config: watcher::Config,
    sync: ClusterSync,
    shutdown: signal::Receiver<bool>,
    offer: F,
) where
    K: Resource<Scope = kube::core::ClusterResourceScope> + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
    F: Fn(ClusterSync, Observed<K>) -> Fut + Clone,
    Fut: Future<Output = Result<Outcome>>,
{
    let kind = K::kind(&Default::default()).to_string();
    let handler_sync = sync.clone();
    follow(Api::<K>::all(client), config, sync, shutdown, move |change| {
        let (sync, offer, kind) = (handler_sync.clone(), offer.clone(), kind.clone());
        async move {
            let observed = match change {
                Change::Relisted(objects) => objects.into_iter().next().map_or(Observed::Absent, Observed::Present),
                Change::Applied(object) => Observed::Present(object),
                Change::Deleted(object) => Observed::Deleted(object),
            };
            match offer(sync, observed).await? {
                Outcome::Applied => Ok(()),
                Outcome::Stale => {
                    debug!(kind, "the watcher delivered a version older than one already applied");
                    Ok(())
                }
                Outcome::Gone => {
                    anyhow::bail!("the followed {kind} does not exist: admissions are denied until it does")
                }
            }
        }
    })
    .await
}

async fn offer_revocation(sync: ClusterSync, observed: Observed<SebRevocation>) -> Result<Outcome> {
    sync.offer_revocation(Source::Watcher, observed).await
}

async fn offer_policy(sync: ClusterSync, observed: Observed<SebPolicy>) -> Result<Outcome> {
    sync.offer_policy(Source::Watcher, observed).await
}

/// Look again for the cgroups of selected pods the kubelet had not made yet, every
/// [`super::sync::UNRESOLVED_RETRY`] while any is missing, rather than at the next pod
/// event or probe (seconds later, while the pod's first containers may already run);
/// and choose again once an enforced pod's cgroup is gone.
async fn resolve_selected_pods(sync: ClusterSync, mut shutdown: signal::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(super::sync::UNRESOLVED_RETRY) => {}
            _ = shutdown.changed() => return,
        }
        if (sync.has_unresolved_pods() || sync.has_departed_pods())
            && let Err(e) = sync.pods_changed()
        {
            warn!(error = %format!("{e:#}"), "choosing the selected pods' cgroups again");
        }
    }
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
    sync.require_lists(config.required_lists());
    let mut tasks = vec![
        tokio::spawn(follow_one::<SebRevocation, _, _>(
            client.clone(),
            config.revocation_watch(),
            sync.clone(),
            shutdown.clone(),
            offer_revocation,
        )),
        tokio::spawn(follow_one::<SebPolicy, _, _>(
            client.clone(),
            config.policy_watch(),
            sync.clone(),
            shutdown.clone(),
            offer_policy,
        )),
        tokio::spawn(follow_directory(
            Api::<Pod>::all(client.clone()),
            config::pods_on(node),
            sync.clone(),
            shutdown.clone(),
            record_pods,
        )),
        tokio::spawn(follow_directory(
            Api::<Namespace>::all(client.clone()),
            config::namespaces(),
            sync.clone(),
            shutdown.clone(),
            record_namespaces,
        )),
        tokio::spawn(probe::run(client.clone(), config.clone(), sync.clone(), shutdown.clone())),
        tokio::spawn(resolve_selected_pods(sync.clone(), shutdown.clone())),
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
            {
                let mut directory = sync.directory().write().map_err(|_| anyhow::anyhow!("pod directory poisoned"))?;
                record(&mut directory, &change);
                // Under the same lock the recorder counts under (see `denial_metric`).
                sync.metrics().kernel_denials.forget_departed(&directory);
            }
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
    let service_task = follow(services, config::api_server_service(), sync.clone(), shutdown.clone(), move |change| {
        let (sync, addresses) = (service_sync.clone(), service_addresses.clone());
        async move { update_addresses(&sync, &addresses, "service/", change, discovery::service_endpoints) }
    });
    let (slice_sync, slice_addresses) = (sync.clone(), addresses);
    let slice_task = follow(slices, config::api_server_slices(), sync, shutdown, move |change| {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_the_api_server_sent_counts_as_a_read() {
        assert!(!sent_by_the_server::<()>(&watcher::Event::Init));
        for event in [
            watcher::Event::InitApply(()),
            watcher::Event::InitDone,
            watcher::Event::Apply(()),
            watcher::Event::Delete(()),
        ] {
            assert!(sent_by_the_server(&event));
        }
    }
}
