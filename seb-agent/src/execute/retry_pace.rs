//! A certificate whose live-state check failed (drift, or the state could not be read)
//! is not prepared again at once. Each preparation mints an identity (an STS
//! AssumeRole on the broker's base credentials, a Kubernetes Secret and token, a client
//! certificate) and reads the target; a caller re-proposing a stale certificate in a loop
//! would spend the broker's API quotas, which every other agent shares, for as long as
//! the certificate lives. One preparation per certificate per [`RETRY_AFTER`].

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// How long after a failed preparation the same certificate may be prepared again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Certificates remembered at once; past it the oldest failures are forgotten first (a
/// failure older than [`RETRY_AFTER`] is forgotten anyway).
const REMEMBERED: usize = 10_000;

/// When each recently failed certificate (by serial) was last prepared.
#[derive(Default)]
pub struct RetryPace {
    failed: Mutex<HashMap<String, Instant>>,
}

impl RetryPace {
    /// How long `serial` must still wait before it is prepared again, if at all.
    pub fn wait_for(&self, serial: &str, now: Instant) -> Option<Duration> {
        let failed = self.failed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let since = now.saturating_duration_since(*failed.get(serial)?);
        RETRY_AFTER.checked_sub(since).filter(|left| !left.is_zero())
    }

    /// `serial`'s preparation failed at `now`.
    pub fn failed(&self, serial: &str, now: Instant) {
        let mut failed = self.failed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if failed.len() >= REMEMBERED {
            failed.retain(|_, at| now.saturating_duration_since(*at) < RETRY_AFTER);
        }
        if failed.len() >= REMEMBERED {
            // Every entry is recent: forget the oldest.
            let oldest = failed.iter().min_by_key(|(_, at)| **at).map(|(serial, _)| serial.clone());
            if let Some(oldest) = oldest {
                failed.remove(&oldest);
            }
        }
        failed.insert(serial.to_string(), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_certificate_waits_and_others_do_not() {
        let pace = RetryPace::default();
        let start = Instant::now();
        assert_eq!(pace.wait_for("aa", start), None, "never failed");
        pace.failed("aa", start);
        let left = pace.wait_for("aa", start + Duration::from_millis(300)).unwrap();
        assert_eq!(left, Duration::from_millis(700));
        assert_eq!(pace.wait_for("bb", start), None, "another certificate");
        assert_eq!(pace.wait_for("aa", start + RETRY_AFTER), None, "after the pause");
    }

    #[test]
    fn the_memory_is_bounded() {
        let pace = RetryPace::default();
        let start = Instant::now();
        for i in 0..REMEMBERED + 5 {
            pace.failed(&i.to_string(), start + Duration::from_micros(i as u64));
        }
        let failed = pace.failed.lock().unwrap();
        assert_eq!(failed.len(), REMEMBERED);
        assert!(!failed.contains_key("0") && failed.contains_key(&(REMEMBERED + 4).to_string()));
    }
}
