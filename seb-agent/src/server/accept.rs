//! Accept errors without a spinning loop or a flood of logs.
//!
//! Out of file descriptors (EMFILE, ENFILE) or kernel memory, `accept` fails at once for
//! as long as the condition lasts, and the listener stays readable: retrying at once would
//! spin a core. The loop backs off (10 ms doubling to 1 s) and logs one line per 10 s.

use std::time::{Duration, Instant};

use tracing::warn;

use crate::metrics::{Limit, Metrics};

const FIRST_PAUSE: Duration = Duration::from_millis(10);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);
const REPORT_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct AcceptBackoff {
    pause: Option<Duration>,
    last_report: Option<Instant>,
    unreported: u64,
}

impl AcceptBackoff {
    /// An accept succeeded: the condition is over.
    pub fn reset(&mut self) {
        self.pause = None;
    }

    /// How long to pause after `error` (zero for a connection that failed on its own).
    pub fn pause_after(&mut self, error: &std::io::Error, metrics: &Metrics) -> Duration {
        let exhausted =
            matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM));
        if exhausted {
            metrics.count_limit(Limit::FileDescriptors);
        }
        self.unreported += 1;
        if self.last_report.is_none_or(|at| at.elapsed() >= REPORT_EVERY) {
            warn!(
                error = %error,
                failures = self.unreported,
                "accepting broker connections failed; backing off (one line per 10 s)"
            );
            self.last_report = Some(Instant::now());
            self.unreported = 0;
        }
        if !exhausted {
            return Duration::ZERO;
        }
        let pause = self.pause.map_or(FIRST_PAUSE, |pause| (pause * 2).min(LONGEST_PAUSE));
        self.pause = Some(pause);
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_exhaustion_backs_off_doubling_to_a_ceiling() {
        let metrics = Metrics::new();
        let mut backoff = AcceptBackoff::default();
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let pauses: Vec<Duration> = (0..9).map(|_| backoff.pause_after(&emfile, &metrics)).collect();
        assert_eq!(pauses[0], FIRST_PAUSE);
        assert_eq!(pauses[1], FIRST_PAUSE * 2);
        assert_eq!(pauses[8], LONGEST_PAUSE);
        assert!(metrics.encode().contains(r#"seb_broker_limited_total{limit="file_descriptors"} 9"#));
        backoff.reset();
        assert_eq!(backoff.pause_after(&emfile, &metrics), FIRST_PAUSE);
        let aborted = std::io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(backoff.pause_after(&aborted, &metrics), Duration::ZERO);
    }
}
