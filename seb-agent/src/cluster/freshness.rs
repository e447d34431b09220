//! How current this node's copy of the cluster state is. Admissions fail closed until
//! both resources have been read once, and again whenever the API server has not been
//! heard from within the staleness bound: a revocation this broker cannot see must not
//! be outrun.

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
    /// Milliseconds after `origin` of the last answer from the API server; `u64::MAX`: never.
    last_contact_ms: AtomicU64,
    policy_synced: AtomicBool,
    revocation_synced: AtomicBool,
    /// Every watcher has listed once: what the kernel enforces is the cluster's, not a
    /// previous run's.
    settled: AtomicBool,
}

impl Freshness {
    pub fn new(bound: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                origin: Instant::now(),
                bound,
                last_contact_ms: AtomicU64::new(u64::MAX),
                policy_synced: AtomicBool::new(false),
                revocation_synced: AtomicBool::new(false),
                settled: AtomicBool::new(false),
            }),
        }
    }

    /// The API server answered.
    pub fn contact(&self) {
        let now = self.inner.origin.elapsed().as_millis() as u64;
        self.inner.last_contact_ms.store(now, Ordering::Release);
    }

    /// A resource's full state has been read and applied.
    pub fn synced(&self, resource: Resource) {
        match resource {
            Resource::Policy => self.inner.policy_synced.store(true, Ordering::Release),
            Resource::Revocation => self.inner.revocation_synced.store(true, Ordering::Release),
        }
        self.contact();
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

    /// Time since the API server last answered, if it ever did.
    pub fn age(&self) -> Option<Duration> {
        let last = self.inner.last_contact_ms.load(Ordering::Acquire);
        (last != u64::MAX).then(|| self.inner.origin.elapsed().saturating_sub(Duration::from_millis(last)))
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
                "the API server was last heard from {:.1} s ago, beyond the staleness bound of {} s",
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
        freshness.contact();
        assert_eq!(freshness.stale(), None);
        freshness.unsynced(Resource::Revocation);
        assert!(freshness.stale().unwrap().contains("SebRevocation"));
    }
}
