//! Kernel denials drained from the ring buffer whose write failed (a full disk, a store
//! held past its busy timeout, a store replaced under the broker): they are out of the
//! ring, so they are kept here and written with the next batch that commits. Bounded:
//! past [`MAX_KEPT`] full records the rest are only counted, and that count is recorded
//! (an `unwritten_denials` record) in the first write that succeeds. Nothing drained is
//! ever dropped silently.

use serde::{Deserialize, Serialize};

use crate::{audit::KernelDenial, denial_budget::Suppressed};

/// Record kind: how many denials were drained but could not be kept in full while the
/// store refused writes.
pub const UNWRITTEN_KIND: &str = "unwritten_denials";

/// Full records kept while writes fail (about 1 KiB each).
pub const MAX_KEPT: usize = 8192;
/// Per-second summaries kept while writes fail (an hour of them).
pub const MAX_SUMMARIES: usize = 3600;

/// What an `unwritten_denials` record holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unwritten {
    /// Denials (full records or suppressed ones) drained but not kept.
    pub denials: u64,
    /// When the first and the last of them were drained (ns since the epoch).
    pub from_ns: u64,
    pub to_ns: u64,
}

/// One write's worth: full records (time, denial), summaries, and what was not kept.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub records: Vec<(i64, KernelDenial)>,
    pub summaries: Vec<Suppressed>,
    pub unwritten: Option<Unwritten>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.summaries.is_empty() && self.unwritten.is_none()
    }
}

/// What failed to be written, waiting for the next write.
#[derive(Debug, Default)]
pub struct Backlog {
    kept: Batch,
}

impl Backlog {
    /// What to write now: what is kept, then `records` and `summaries`.
    pub fn with(&mut self, records: Vec<(i64, KernelDenial)>, summaries: Vec<Suppressed>) -> Batch {
        let mut batch = std::mem::take(&mut self.kept);
        batch.records.extend(records);
        batch.summaries.extend(summaries);
        batch
    }

    /// `batch` could not be written: keep it for the next write, the oldest first, and
    /// count what does not fit.
    pub fn keep(&mut self, mut batch: Batch, now_ns: u64) {
        let mut not_kept = Vec::new();
        if batch.records.len() > MAX_KEPT {
            not_kept.extend(batch.records.drain(MAX_KEPT..).map(|(time_ns, _)| (time_ns.max(0) as u64, 1)));
        }
        if batch.summaries.len() > MAX_SUMMARIES {
            not_kept.extend(batch.summaries.drain(MAX_SUMMARIES..).map(|s| (s.second_ns, s.suppressed)));
        }
        for (time_ns, denials) in not_kept {
            let time_ns = if time_ns == 0 { now_ns } else { time_ns };
            let unwritten = batch.unwritten.get_or_insert(Unwritten { denials: 0, from_ns: time_ns, to_ns: time_ns });
            unwritten.denials += denials;
            unwritten.from_ns = unwritten.from_ns.min(time_ns);
            unwritten.to_ns = unwritten.to_ns.max(time_ns);
        }
        self.kept = batch;
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial(port: u16) -> KernelDenial {
        // SAFETY: a plain #[repr(C)] struct of integers and byte arrays; zero is valid.
        let event: seb_common::DenialEvent = unsafe { std::mem::zeroed() };
        let mut denial = KernelDenial::from_event(&event, 0);
        denial.port = port;
        denial
    }

    #[test]
    fn a_failed_write_is_written_with_the_next_and_what_does_not_fit_is_counted() {
        let mut backlog = Backlog::default();
        let first = backlog.with(vec![(10, denial(1))], Vec::new());
        assert_eq!(first.records.len(), 1);
        // The write fails: kept, and written first with the next batch.
        backlog.keep(first, 99);
        assert!(!backlog.is_empty());
        let second = backlog.with(vec![(20, denial(2))], Vec::new());
        let ports: Vec<u16> = second.records.iter().map(|(_, d)| d.port).collect();
        assert_eq!(ports, [1, 2]);
        assert!(backlog.is_empty());

        // Past the bound, the newest are counted, not kept; the count is written with the
        // batch that finally commits.
        let flood: Vec<_> = (0..MAX_KEPT + 5).map(|i| (1000 + i as i64, denial(3))).collect();
        let third = backlog.with(flood, Vec::new());
        backlog.keep(third, 99);
        let fourth = backlog.with(Vec::new(), Vec::new());
        assert_eq!(fourth.records.len(), MAX_KEPT);
        let last = 1000 + (MAX_KEPT + 4) as u64;
        assert_eq!(fourth.unwritten, Some(Unwritten { denials: 5, from_ns: 1000 + MAX_KEPT as u64, to_ns: last }));
        // Failing again keeps the count, and adds what does not fit again.
        backlog.keep(fourth, 99);
        let fifth = backlog.with(vec![(5, denial(4))], Vec::new());
        assert_eq!((fifth.unwritten.as_ref().map(|u| u.denials), fifth.records.len()), (Some(5), MAX_KEPT + 1));
        backlog.keep(fifth, 99);
        let sixth = backlog.with(Vec::new(), Vec::new());
        assert_eq!((sixth.unwritten.as_ref().map(|u| u.denials), sixth.records.len()), (Some(6), MAX_KEPT));
    }
}
