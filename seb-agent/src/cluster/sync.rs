//! Applying the cluster's resources to this node: `SebRevocation` to the admission state
//! (one ledger transaction, so the next admission sees it) and to the kernel (the broker
//! connections of revoked decisions are cut); `SebPolicy` to the policy epoch and to the
//! enforcement sources (endpoints, scope, exemptions, pod selectors).

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use kube::ResourceExt;
use tracing::{info, warn};

use super::{
    crd::{EnforcementScopeSpec, SebPolicy, SebRevocation},
    directory::SharedDirectory,
    freshness::{Freshness, Resource},
    order::{Gate, Observed, Outcome, Source},
};
use crate::{
    admission::state::{self, RevocationApplied, RevocationState},
    audit::Ledger,
    config::ProtectedEndpoint,
    enforcement::{BrokerSockets, EndpointSource, SharedEnforcer, broker_sockets::Retired},
    metrics::{Metrics, ResourceLabels},
};

/// Annotation the CLI sets on every write: when the change was made, for the
/// propagation-lag metric.
pub const WRITTEN_AT: &str = "seb.io/written-at";

/// What one revocation update did on this node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RevocationReport {
    pub applied: RevocationApplied,
    /// Cookies of the broker connections cut.
    pub cut: Vec<u64>,
}

#[derive(Clone)]
pub struct ClusterSync {
    inner: Arc<Inner>,
}

struct Inner {
    ledger: Ledger,
    enforcer: SharedEnforcer,
    sockets: BrokerSockets,
    freshness: Freshness,
    metrics: Arc<Metrics>,
    directory: SharedDirectory,
    /// The policy's pod and namespace selectors, for choosing pods as they change.
    scope: Mutex<EnforcementScopeSpec>,
    /// The kubelet's pod cgroup, looked for again while it is missing.
    kubepods: Box<dyn Fn() -> Option<std::path::PathBuf> + Send + Sync>,
    /// The ordered paths by which the watcher and the probe apply the followed objects.
    policy_gate: Gate,
    revocation_gate: Gate,
    /// Kinds whose watchers have listed once, and those that must have.
    listed: Mutex<(BTreeSet<String>, BTreeSet<String>)>,
    /// Selected pods (by UID) whose cgroup was not there at the last choice, since when:
    /// looked for again every [`UNRESOLVED_RETRY`] for [`UNRESOLVED_FAST_FOR`].
    unresolved: Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// The pod cgroups enforced at the last choice, with their pods' UIDs: one whose pod
    /// is no longer listed, or not found for a moment, stays enforced while it exists.
    enforced_pods: Mutex<std::collections::BTreeMap<std::path::PathBuf, String>>,
}

/// How soon a selected pod's cgroup is looked for again: its first process runs
/// unjudged until the links are on it, and the kubelet makes the pod cgroup before any
/// container of the pod starts.
pub const UNRESOLVED_RETRY: std::time::Duration = std::time::Duration::from_millis(100);
/// For how long: a pod still without its cgroup then (finished, or a static pod, whose
/// cgroup is named by another UID than its mirror's) waits for the next pod event or
/// probe like any change.
pub const UNRESOLVED_FAST_FOR: std::time::Duration = std::time::Duration::from_secs(30);

impl ClusterSync {
    pub fn new(
        ledger: Ledger,
        enforcer: SharedEnforcer,
        sockets: BrokerSockets,
        freshness: Freshness,
        metrics: Arc<Metrics>,
        directory: SharedDirectory,
        kubepods: impl Fn() -> Option<std::path::PathBuf> + Send + Sync + 'static,
    ) -> Self {
        let inner = Inner {
            policy_gate: Gate::new(freshness.clone(), Resource::Policy),
            revocation_gate: Gate::new(freshness.clone(), Resource::Revocation),
            ledger,
            enforcer,
            sockets,
            freshness,
            metrics,
            directory,
            scope: Mutex::default(),
            kubepods: Box::new(kubepods),
            listed: Mutex::default(),
            unresolved: Default::default(),
            enforced_pods: Default::default(),
        };
        Self { inner: Arc::new(inner) }
    }

    pub fn freshness(&self) -> &Freshness {
        &self.inner.freshness
    }
    pub fn directory(&self) -> &SharedDirectory {
        &self.inner.directory
    }
    pub fn enforcer(&self) -> &SharedEnforcer {
        &self.inner.enforcer
    }
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The kinds whose first list must be applied before the node is settled.
    pub fn require_lists(&self, kinds: impl IntoIterator<Item = String>) {
        if let Ok(mut listed) = self.inner.listed.lock() {
            listed.1.extend(kinds);
        }
    }

    /// A watcher's list was applied. Once every one has been, what an earlier run left
    /// in the kernel and the cluster no longer names is removed.
    pub fn listed(&self, kind: &str) -> Result<()> {
        let settled = {
            let mut listed = self.inner.listed.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            listed.0.insert(kind.to_string());
            listed.1.is_subset(&listed.0)
        };
        if settled && !self.inner.freshness.is_settled() {
            let enforcer = self.inner.enforcer.clone();
            tokio::task::block_in_place(|| enforcer.update(|sources| sources.keep_previous = false))?;
            self.inner.freshness.settle();
            info!("every watcher has listed: the kernel enforces the cluster's state alone");
        }
        Ok(())
    }

    /// The watcher's or the probe's `SebPolicy`, through its ordered path ([`super::order`]).
    pub async fn offer_policy(&self, source: Source, observed: Observed<SebPolicy>) -> Result<Outcome> {
        self.inner.policy_gate.offer(source, observed, |object| async move { self.policy(&object).await }).await
    }

    /// The watcher's or the probe's `SebRevocation`, through its ordered path.
    pub async fn offer_revocation(&self, source: Source, observed: Observed<SebRevocation>) -> Result<Outcome> {
        self.inner
            .revocation_gate
            .offer(source, observed, |object| async move { self.revocation(&object).await.map(drop) })
            .await
    }

    pub fn error(&self, resource: &str, error: &anyhow::Error) {
        warn!(resource, error = %format!("{error:#}"), "cluster state not applied");
        self.inner.metrics.cluster_sync_errors.get_or_create(&ResourceLabels { resource: resource.into() }).inc();
    }

    /// Apply a `SebRevocation`: the kernel first (cutting connections is only ever more
    /// restrictive, so it need not wait), then the admission state, durably in the ledger.
    pub async fn revocation(&self, object: &SebRevocation) -> Result<RevocationReport> {
        // Connections of decisions certified under an epoch older than the listed one go
        // too; an epoch behind this node's changes nothing (epochs only move forward).
        let cut = self.inner.sockets.cut(&Retired {
            serials: object
                .spec
                .serials
                .iter()
                .filter_map(|s| state::normalise(state::RevocationTarget::Serial, s).ok())
                .collect(),
            contract_ids: object.spec.contract_ids.iter().cloned().collect(),
            revocation_epoch: Some(object.spec.revocation_epoch),
            policy_epoch: None,
        })?;
        self.inner.metrics.sockets_cut.inc_by(cut.len() as u64);
        let update = RevocationState {
            epoch: object.spec.revocation_epoch,
            serials: object.spec.serials.clone(),
            contract_ids: object.spec.contract_ids.clone(),
            source: format!(
                "SebRevocation/{} resourceVersion {}",
                object.name_any(),
                object.resource_version().unwrap_or_default()
            ),
        };
        let applied = self
            .inner
            .ledger
            .run(move |batch| state::apply_revocations(batch, &update))
            .await
            .context("recording the revocation state")?;
        if let Some(behind) = applied.epoch_behind {
            warn!(
                object = %object.name_any(),
                listed = behind,
                active = applied.epochs.revocation,
                "the SebRevocation's epoch is behind this node's; epochs only move forward"
            );
        }
        self.inner.freshness.synced(Resource::Revocation);
        if let Some(lag) = written_ago(object) {
            self.inner.metrics.revocation_propagation.observe(lag.as_secs_f64());
        }
        if !applied.newly_revoked.is_empty() || !cut.is_empty() {
            info!(
                revoked = applied.newly_revoked.len(),
                cut = cut.len(),
                epoch = applied.epochs.revocation,
                "revocation applied"
            );
        }
        Ok(RevocationReport { applied, cut })
    }

    /// Apply a `SebPolicy`. An invalid one changes nothing (neither epoch nor kernel).
    pub async fn policy(&self, object: &SebPolicy) -> Result<()> {
        let spec = object.spec.clone();
        let endpoints = validate_policy(object)?;
        // An epoch the ledger would refuse (behind this node's, or past what a contract
        // carries) refuses the whole policy before the kernel sees any of it.
        let epoch = spec.policy_epoch;
        let current = self.inner.ledger.run(|batch| state::epochs(batch.conn())).await?;
        state::check_policy_epoch(current, epoch).with_context(|| format!("SebPolicy {}", object.name_any()))?;
        {
            // Held while pods are chosen and applied, so a pod change racing this policy
            // change sees either both old or both new.
            let mut current = self.inner.scope.lock().map_err(|_| anyhow::anyhow!("the policy scope is poisoned"))?;
            let (pod_scopes, all_found) = self.selected_pod_cgroups(&spec.scope);
            let (scope, exempt) = (spec.scope.cgroups.clone(), spec.exempt_cgroups.clone());
            let enforcer = self.inner.enforcer.clone();
            let applied = tokio::task::block_in_place(|| {
                enforcer.update(|sources| {
                    sources.endpoints.insert(EndpointSource::Policy, endpoints);
                    sources.cluster_scope = scope.into_iter().collect();
                    sources.cluster_exempt = exempt.into_iter().collect();
                    sources.pod_scopes = pod_scopes;
                })
            });
            self.freshness().pods_enforced(all_found && applied.is_ok());
            applied.with_context(|| format!("applying SebPolicy {} to the kernel", object.name_any()))?;
            *current = spec.scope.clone();
        }
        // As for revocations: the kernel first, the durable record second.
        let cut = self.inner.sockets.cut(&Retired { policy_epoch: Some(epoch), ..Default::default() })?;
        self.inner.metrics.sockets_cut.inc_by(cut.len() as u64);
        self.inner
            .ledger
            .run(move |batch| state::apply_policy_epoch(batch, epoch))
            .await
            .context("recording the policy epoch")?;
        self.inner.freshness.synced(Resource::Policy);
        info!(policy = %object.name_any(), policy_epoch = epoch, cut = cut.len(), "policy applied");
        Ok(())
    }

    /// The pods on this node changed (or a namespace's labels): enforce the selected ones.
    pub fn pods_changed(&self) -> Result<bool> {
        let scope = self.inner.scope.lock().map_err(|_| anyhow::anyhow!("the policy scope is poisoned"))?;
        let (pod_scopes, all_found) = self.selected_pod_cgroups(&scope);
        let enforcer = self.inner.enforcer.clone();
        let applied = tokio::task::block_in_place(|| enforcer.update(|sources| sources.pod_scopes = pod_scopes));
        self.freshness().pods_enforced(all_found && applied.is_ok());
        applied
    }

    /// Whether a selected pod's cgroup was missing at the last choice, for less than
    /// [`UNRESOLVED_FAST_FOR`].
    pub fn has_unresolved_pods(&self) -> bool {
        let Ok(unresolved) = self.inner.unresolved.lock() else { return false };
        unresolved.values().any(|since| since.elapsed() < UNRESOLVED_FAST_FOR)
    }

    /// Whether an enforced pod cgroup is gone since the last choice (its links can go).
    pub fn has_departed_pods(&self) -> bool {
        let Ok(enforced) = self.inner.enforced_pods.lock() else { return false };
        enforced.keys().any(|dir| !dir.is_dir())
    }

    /// The pod-level cgroups of the selected pods that exist on this node, and whether
    /// every selected pod's was found or is yet to be made (false: no kubepods cgroup, or
    /// one could not be resolved, so a selected pod may run unenforced).
    fn selected_pod_cgroups(&self, scope: &EnforcementScopeSpec) -> (BTreeSet<std::path::PathBuf>, bool) {
        let Ok(directory) = self.inner.directory.read() else { return (BTreeSet::new(), false) };
        let mut all_found = true;
        let selected = directory.selected(scope);
        let selected_uids: BTreeSet<String> = selected.iter().map(|pod| pod.uid.clone()).collect();
        let mut missing = Vec::new();
        // The kubepods root is looked for (in the cgroup filesystem) only when a pod is selected.
        let root = if selected.is_empty() { None } else { (self.inner.kubepods)() };
        let mut found = match root {
            _ if selected.is_empty() => std::collections::BTreeMap::new(),
            None => {
                warn!(pods = selected.len(), "pods are selected, but this node has no kubepods cgroup");
                all_found = false;
                std::collections::BTreeMap::new()
            }
            Some(root) => selected
                .iter()
                .filter_map(|pod| match super::pods::find_pod(&root, &pod.uid) {
                    Ok(Some(cgroups)) => Some((cgroups.pod.path, pod.uid.clone())),
                    // The kubelet has not made its cgroup yet: looked for again shortly
                    // (a finished pod's is gone for good).
                    Ok(None) => {
                        if !pod.finished {
                            missing.push(pod.uid.clone());
                        }
                        None
                    }
                    Err(e) => {
                        warn!(pod = %format!("{}/{}", pod.namespace, pod.name), error = %e, "resolving a pod's cgroup");
                        all_found = false;
                        None
                    }
                })
                .collect(),
        };
        // A pod once enforced stays enforced while its cgroup exists when it is no longer
        // listed (a forced delete removes the object while its containers run out their
        // grace period) or, still selected, was not found for a moment: detached, the
        // sockets its processes opened while enforced would be judged by nothing. A pod
        // still listed and no longer selected is released (the policy's choice).
        if let Ok(mut enforced) = self.inner.enforced_pods.lock() {
            for (dir, uid) in enforced.iter() {
                let unlisted = directory.pod(uid).is_none();
                if (unlisted || selected_uids.contains(uid)) && dir.is_dir() {
                    found.entry(dir.clone()).or_insert_with(|| uid.clone());
                }
            }
            enforced.clone_from(&found);
        }
        let found: BTreeSet<std::path::PathBuf> = found.into_keys().collect();
        if let Ok(mut unresolved) = self.inner.unresolved.lock() {
            let now = std::time::Instant::now();
            let previous = std::mem::take(&mut *unresolved);
            *unresolved = missing
                .into_iter()
                .map(|uid| {
                    let since = previous.get(&uid).copied().unwrap_or(now);
                    (uid, since)
                })
                .collect();
            // A cgroup the kubelet has not made for so long is not one it is about to make.
            all_found &= unresolved.values().all(|since| since.elapsed() < UNRESOLVED_FAST_FOR);
        }
        (found, all_found)
    }
}

/// Check a `SebPolicy` as the broker will apply it; returns its protected endpoints.
/// Errors name the object and the field.
pub fn validate_policy(object: &SebPolicy) -> Result<Vec<crate::config::Endpoint>> {
    let name = object.name_any();
    let spec = &object.spec;
    let endpoints = spec
        .protected
        .iter()
        .enumerate()
        .map(|(i, endpoint)| {
            let protocol = match endpoint.protocol.as_deref() {
                None => Ok(Default::default()),
                Some(text) => serde_json::from_value(serde_json::Value::String(text.into())).with_context(|| {
                    format!("SebPolicy {name}: spec.protected[{i}].protocol `{text}` is not tcp, udp or any")
                }),
            }?;
            let endpoint = ProtectedEndpoint { cidr: endpoint.cidr.clone(), port: endpoint.port, protocol };
            endpoint.parse("spec.protected", i).with_context(|| format!("SebPolicy {name}"))
        })
        .collect::<Result<Vec<_>>>()?;
    crate::enforcement::policy::compile(&endpoints, &[], &[]).with_context(|| format!("SebPolicy {name}"))?;
    let cgroups = spec.scope.cgroups.iter().enumerate().map(|(i, path)| (format!("spec.scope.cgroups[{i}]"), path));
    let exempt = spec.exempt_cgroups.iter().enumerate().map(|(i, path)| (format!("spec.exemptCgroups[{i}]"), path));
    for (field, path) in cgroups.chain(exempt) {
        crate::config::check_cgroup_path(&field, path).with_context(|| format!("SebPolicy {name}"))?;
    }
    Ok(endpoints)
}

/// How long ago the object's latest change was written: the CLI's annotation, else the
/// newest managed-fields time (second resolution).
fn written_ago(object: &SebRevocation) -> Option<Duration> {
    let written =
        object.annotations().get(WRITTEN_AT).and_then(|text| humantime::parse_rfc3339(text).ok()).or_else(|| {
            object
                .managed_fields()
                .iter()
                .filter_map(|entry| entry.time.as_ref())
                .map(|time| SystemTime::from(time.0))
                .max()
        })?;
    SystemTime::now().duration_since(written).ok()
}
