//! How current this node's copy of the cluster state is. Admissions fail closed until
//! both resources have been read once, and again whenever either has not been read
//! within the staleness bound: a revocation this broker cannot see must not be outrun.
//! Each is counted as read by its own watcher's events or a probe's GET of it, never by
//! another watcher's (a tenant restarting pods on this node must not keep a stalled
//! SebRevocation watch looking current).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// The resources admission depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Policy,
    Revocation,
}

#[derive(Clone)]
pub struct Freshness {
    inner: Arc<Inner>,
}

struct Inner {
    origin: Instant,
    bound: Duration,
    /// Milliseconds after `origin` each resource was last read; `u64::MAX`: never.
    policy_read_ms: AtomicU64,
    revocation_read_ms: AtomicU64,
    policy_synced: AtomicBool,
    revocation_synced: AtomicBool,
    /// Every watcher has listed once: what the kernel enforces is the cluster's, not a
    /// previous run's.
    settled: AtomicBool,
    /// The last choice of the selected pods found each one's cgroup (or is waiting for
    /// the kubelet to make it) and reached the kernel.
    pods_enforced: AtomicBool,
}

impl Freshness {
    pub fn new(bound: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                origin: Instant::now(),
                bound,
                policy_read_ms: AtomicU64::new(u64::MAX),
                revocation_read_ms: AtomicU64::new(u64::MAX),
                policy_synced: AtomicBool::new(false),
                revocation_synced: AtomicBool::new(false),
                settled: AtomicBool::new(false),
                pods_enforced: AtomicBool::new(true),
            }),
        }
    }

    /// The API server answered with `resource`'s state (an event of its watcher, or the
    /// probe's read of it).
    pub fn read(&self, resource: Resource) {
        let now = self.inner.origin.elapsed().as_millis() as u64;
        match resource {
            Resource::Policy => self.inner.policy_read_ms.store(now, Ordering::Release),
            Resource::Revocation => self.inner.revocation_read_ms.store(now, Ordering::Release),
        }
    }

    /// A resource's full state has been read and applied.
    pub fn synced(&self, resource: Resource) {
        match resource {
            Resource::Policy => self.inner.policy_synced.store(true, Ordering::Release),
            Resource::Revocation => self.inner.revocation_synced.store(true, Ordering::Release),
        }
        self.read(resource);
    }

    /// A resource is gone or could not be applied: admissions wait until it is back.
    pub fn unsynced(&self, resource: Resource) {
        match resource {
            Resource::Policy => self.inner.policy_synced.store(false, Ordering::Release),
            Resource::Revocation => self.inner.revocation_synced.store(false, Ordering::Release),
        }
    }

    /// Both resources have been read and applied (readiness).
    pub fn is_synced(&self) -> bool {
        self.inner.policy_synced.load(Ordering::Acquire) && self.inner.revocation_synced.load(Ordering::Acquire)
    }

    pub fn settle(&self) {
        self.inner.settled.store(true, Ordering::Release);
    }

    pub fn is_settled(&self) -> bool {
        self.inner.settled.load(Ordering::Acquire)
    }

    /// Whether the selected pods were all enforced at the last choice of them.
    pub fn pods_enforced(&self, enforced: bool) {
        self.inner.pods_enforced.store(enforced, Ordering::Release);
    }

    pub fn are_pods_enforced(&self) -> bool {
        self.inner.pods_enforced.load(Ordering::Acquire)
    }

    /// Time since the staler of the two resources was last read, if both ever were.
    pub fn age(&self) -> Option<Duration> {
        let policy = self.inner.policy_read_ms.load(Ordering::Acquire);
        let revocation = self.inner.revocation_read_ms.load(Ordering::Acquire);
        let last = policy.min(revocation);
        (policy != u64::MAX && revocation != u64::MAX)
            .then(|| self.inner.origin.elapsed().saturating_sub(Duration::from_millis(last)))
    }

    /// Why admissions must be denied now, if they must.
    pub fn stale(&self) -> Option<String> {
        for (synced, name) in
            [(&self.inner.policy_synced, "SebPolicy"), (&self.inner.revocation_synced, "SebRevocation")]
        {
            if !synced.load(Ordering::Acquire) {
                return Some(format!("this broker has not read the cluster's {name} yet"));
            }
        }
        match self.age() {
            Some(age) if age <= self.inner.bound => None,
            Some(age) => Some(format!(
                "the cluster's SebPolicy or SebRevocation was last read {:.1} s ago, beyond the staleness bound of {} s",
                age.as_secs_f64(),
                self.inner.bound.as_secs()
            )),
            None => Some("the API server has not been reached".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_until_both_resources_are_synced_and_again_past_the_bound() {
        let freshness = Freshness::new(Duration::from_millis(50));
        assert!(freshness.stale().unwrap().contains("SebPolicy"));
        freshness.synced(Resource::Policy);
        assert!(freshness.stale().unwrap().contains("SebRevocation"));
        freshness.synced(Resource::Revocation);
        assert_eq!(freshness.stale(), None);
        std::thread::sleep(Duration::from_millis(80));
        assert!(freshness.stale().unwrap().contains("staleness bound"), "{:?}", freshness.stale());
        // Hearing of the policy alone does not make a revocation view current.
        freshness.read(Resource::Policy);
        assert!(freshness.stale().unwrap().contains("staleness bound"), "{:?}", freshness.stale());
        freshness.read(Resource::Revocation);
        assert_eq!(freshness.stale(), None);
        freshness.unsynced(Resource::Revocation);
        assert!(freshness.stale().unwrap().contains("SebRevocation"));
    }
}
