//! The one ordered path by which a followed object (`SebPolicy`, `SebRevocation`) is
//! applied, whether the watcher or the probe read it: an object older than one already
//! seen is never applied after it.
//!
//! The order, as the Kubernetes API allows it:
//! - The same object (same `metadata.uid`, or either has none): the higher
//!   `metadata.generation` is newer (the API server raises it on every spec change).
//!   For an equal or missing generation, the resourceVersions decide when both are
//!   integers (etcd's revisions and the stand-in's counter); otherwise they are ordered
//!   only when equal.
//! - Another object of the same name (deleted and created again): only the resourceVersions
//!   order them, as above; a generation starts again at 1.
//! - Unordered versions: the watcher's object is applied (a watch delivers events in the
//!   API server's order); the probe's is not (a GET can be older than what the watcher has
//!   already delivered). The probe applies only what is provably newer, or retries the
//!   version whose application failed.
//! - A deletion is a version too: the probe never revives an object the watcher saw
//!   deleted. An absence the watcher learned from a relist carries no version, so until
//!   the watcher sees the object again the probe applies nothing.
//!
//! The lock is held while the object is applied, so two applies never interleave.

use std::{cmp::Ordering, future::Future};

use anyhow::Result;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::Mutex;

use super::freshness::{Freshness, Resource};

/// Who read the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Watcher,
    Probe,
}

/// Where an object stands in the API server's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    uid: Option<String>,
    generation: Option<i64>,
    resource_version: Option<String>,
}

impl Version {
    pub fn of(metadata: &ObjectMeta) -> Self {
        Self {
            uid: metadata.uid.clone(),
            generation: metadata.generation,
            resource_version: metadata.resource_version.clone(),
        }
    }

    /// `self` against `other`; None when the API gives no order.
    pub fn order(&self, other: &Version) -> Option<Ordering> {
        let same_object = match (&self.uid, &other.uid) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        if same_object
            && let (Some(a), Some(b)) = (self.generation, other.generation)
            && a != b
        {
            return Some(a.cmp(&b));
        }
        let (a, b) = (self.resource_version.as_deref()?, other.resource_version.as_deref()?);
        match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(a), Ok(b)) => Some(a.cmp(&b)),
            _ => (a == b).then_some(Ordering::Equal),
        }
    }
}

/// What the watcher or the probe read.
#[derive(Debug)]
pub enum Observed<K> {
    Present(K),
    /// The watcher saw the object deleted (the object as it was deleted).
    Deleted(K),
    /// A relist did not hold the object.
    Absent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Applied,
    Failed,
    Gone,
}

/// The newest version seen, and what became of it.
#[derive(Debug, Default)]
struct Seen {
    last: Option<(Option<Version>, State)>,
}

/// Whether an object read by `source` goes on to be applied.
fn admits(seen: &Seen, source: Source, candidate: &Version) -> bool {
    let Some((last, state)) = &seen.last else { return true };
    let order = last.as_ref().and_then(|last| candidate.order(last));
    match source {
        Source::Watcher => order != Some(Ordering::Less),
        Source::Probe => match order {
            Some(Ordering::Greater) => true,
            Some(Ordering::Equal) => *state == State::Failed,
            _ => false,
        },
    }
}

/// What [`Gate::offer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Older than (or the same as) a version already seen.
    Stale,
    /// Deleted or absent: the caller fails closed.
    Gone,
}

/// One followed object's ordered path.
pub struct Gate {
    seen: Mutex<Seen>,
    freshness: Freshness,
    resource: Resource,
}

impl Gate {
    pub fn new(freshness: Freshness, resource: Resource) -> Self {
        Self { seen: Mutex::default(), freshness, resource }
    }

    /// Apply `observed` with `apply` unless it is older than a version already seen.
    /// A deletion, an absence or a failed apply makes admissions wait (fail closed), under
    /// the same lock; an error from `apply` is returned, and that version may be retried.
    pub async fn offer<K, F, Fut>(&self, source: Source, observed: Observed<K>, apply: F) -> Result<Outcome>
    where
        K: kube::Resource,
        F: FnOnce(K) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let mut seen = self.seen.lock().await;
        let (object, version) = match observed {
            Observed::Present(object) => {
                let version = Version::of(object.meta());
                (object, version)
            }
            Observed::Deleted(object) => {
                let version = Version::of(object.meta());
                if !admits(&seen, source, &version) {
                    return Ok(Outcome::Stale);
                }
                seen.last = Some((Some(version), State::Gone));
                self.freshness.unsynced(self.resource);
                return Ok(Outcome::Gone);
            }
            Observed::Absent => {
                if source == Source::Watcher {
                    seen.last = Some((None, State::Gone));
                    self.freshness.unsynced(self.resource);
                }
                return Ok(Outcome::Gone);
            }
        };
        if !admits(&seen, source, &version) {
            return Ok(Outcome::Stale);
        }
        let result = apply(object).await;
        let state = if result.is_ok() { State::Applied } else { State::Failed };
        if result.is_err() {
            self.freshness.unsynced(self.resource);
        }
        seen.last = Some((Some(version), state));
        result.map(|()| Outcome::Applied)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex as StdMutex};

    use kube::Resource as _;

    use super::*;
    use crate::cluster::crd::{SebPolicy, SebPolicySpec};

    fn gate() -> Gate {
        Gate::new(Freshness::new(std::time::Duration::from_secs(30)), Resource::Policy)
    }

    fn policy(uid: &str, generation: Option<i64>, resource_version: &str, epoch: u64) -> SebPolicy {
        let mut object = SebPolicy::new("default", SebPolicySpec { policy_epoch: epoch, ..Default::default() });
        object.metadata.uid = Some(uid.into());
        object.metadata.generation = generation;
        object.metadata.resource_version = Some(resource_version.into());
        object
    }

    /// Offer objects in turn; returns the policy epochs applied, in order.
    async fn run(gate: &Gate, offers: Vec<(Source, Observed<SebPolicy>)>) -> Vec<u64> {
        let applied = Arc::new(StdMutex::new(Vec::new()));
        for (source, observed) in offers {
            let applied = applied.clone();
            gate.offer(source, observed, |object: SebPolicy| async move {
                applied.lock().unwrap().push(object.spec.policy_epoch);
                Ok(())
            })
            .await
            .unwrap();
        }
        Arc::try_unwrap(applied).unwrap().into_inner().unwrap()
    }

    #[tokio::test]
    async fn the_probe_never_applies_an_object_older_than_the_watchers() {
        // The probe read X (rv 5) before the watcher applied Y (rv 6).
        let gate = gate();
        let (x, y) = (policy("a", None, "5", 1), policy("a", None, "6", 2));
        let applied = run(
            &gate,
            vec![
                (Source::Watcher, Observed::Present(x.clone())),
                (Source::Watcher, Observed::Present(y)),
                (Source::Probe, Observed::Present(x)),
            ],
        )
        .await;
        assert_eq!(applied, [1, 2], "X must not be applied again after Y");
    }

    #[tokio::test]
    async fn the_probe_catches_up_a_stalled_watcher_and_the_watcher_then_does_not_go_back() {
        let gate = gate();
        let (x, y) = (policy("a", Some(1), "5", 1), policy("a", Some(2), "6", 2));
        let applied = run(
            &gate,
            vec![
                (Source::Watcher, Observed::Present(x.clone())),
                (Source::Probe, Observed::Present(y.clone())),
                (Source::Watcher, Observed::Present(x)),
                (Source::Watcher, Observed::Present(y.clone())),
                (Source::Probe, Observed::Present(y)),
            ],
        )
        .await;
        // The watcher re-applies an equal version (a relist); the probe does not.
        assert_eq!(applied, [1, 2, 2]);
    }

    #[tokio::test]
    async fn a_deleted_object_is_not_revived_by_the_probe_but_a_new_one_is_applied() {
        let gate = gate();
        let old = policy("a", Some(4), "5", 1);
        let mut deleted = old.clone();
        deleted.metadata.resource_version = Some("7".into());
        let recreated = policy("b", Some(1), "9", 3);
        let outcome = gate.offer(Source::Watcher, Observed::Deleted(deleted), |_| async { Ok(()) }).await.unwrap();
        assert_eq!(outcome, Outcome::Gone);
        let applied =
            run(&gate, vec![(Source::Probe, Observed::Present(old)), (Source::Probe, Observed::Present(recreated))])
                .await;
        assert_eq!(applied, [3], "only the object created after the deletion");
    }

    #[tokio::test]
    async fn after_a_relist_without_the_object_only_the_watcher_brings_it_back() {
        let gate = gate();
        let x = policy("a", Some(1), "5", 1);
        run(&gate, vec![(Source::Watcher, Observed::Absent)]).await;
        assert!(run(&gate, vec![(Source::Probe, Observed::Present(x.clone()))]).await.is_empty());
        assert_eq!(run(&gate, vec![(Source::Watcher, Observed::Present(x))]).await, [1]);
    }

    #[tokio::test]
    async fn a_failed_version_is_retried_by_the_probe() {
        let gate = gate();
        let x = policy("a", None, "5", 1);
        let failed =
            gate.offer(Source::Watcher, Observed::Present(x.clone()), |_| async { anyhow::bail!("invalid") }).await;
        assert!(failed.is_err());
        assert_eq!(run(&gate, vec![(Source::Probe, Observed::Present(x))]).await, [1]);
    }

    #[test]
    fn versions_order_by_generation_then_integer_resource_version() {
        let v = |uid: &str, generation, rv: &str| Version::of(policy(uid, generation, rv, 0).meta());
        assert_eq!(v("a", Some(3), "10").order(&v("a", Some(2), "90")), Some(Ordering::Greater));
        assert_eq!(v("a", Some(2), "10").order(&v("a", Some(2), "9")), Some(Ordering::Greater));
        assert_eq!(v("b", Some(1), "10").order(&v("a", Some(5), "9")), Some(Ordering::Greater), "recreated");
        assert_eq!(v("a", None, "opaque-1").order(&v("a", None, "opaque-2")), None);
        assert_eq!(v("a", None, "opaque-1").order(&v("a", None, "opaque-1")), Some(Ordering::Equal));
    }
}
