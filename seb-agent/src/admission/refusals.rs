//! A bound on the records refused requests make. Anyone who reaches the socket can send a
//! proposal with a made-up certificate, or a read of something not served, as fast as it
//! can write: each would be a signed, fsynced decision or read record, until the disk the
//! admissions also need is full. Per caller uid, a second's first refusals are recorded
//! in full (see `record_budget` for the bounds); the rest are answered as usual and
//! counted, and each second that suppressed any ends in one `refusals_suppressed` record
//! naming the largest counts by uid, request and reason.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::record_budget::{Limits, Pool, RecordBudget, Suppressed};

/// Record kind of the per-second summary of refusals not recorded in full.
pub const SUPPRESSED_KIND: &str = "refusals_suppressed";

const LIMITS: Limits = Limits {
    // Of one uid, request and reason.
    per_kind: 10,
    // Of one uid.
    per_group: 20,
    per_second: 200,
    reserved_per_group: 2,
    reserved_groups: 256,
};

/// What makes two refusals the same kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RefusalKind {
    pub uid: u32,
    /// `propose` or `read`.
    pub request: String,
    pub reason: String,
}

/// Summaries of seconds past, waiting to be recorded.
pub type RefusalsSuppressed = Suppressed<RefusalKind>;

pub struct RefusalBudget {
    budget: Mutex<RecordBudget<RefusalKind>>,
    /// Seconds closed by a later refusal, until the next flush records them.
    closed: Mutex<Vec<RefusalsSuppressed>>,
}

impl Default for RefusalBudget {
    fn default() -> Self {
        Self { budget: Mutex::new(RecordBudget::new(LIMITS)), closed: Mutex::new(Vec::new()) }
    }
}

impl RefusalBudget {
    /// Whether a refusal of `uid`'s `request`, for `reason`, now, is recorded in full.
    pub fn admit(&self, uid: u32, request: &str, reason: &str, now_ns: u64) -> bool {
        let kind = RefusalKind { uid, request: request.into(), reason: reason.into() };
        let (admitted, closed) = self.budget.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).admit(
            now_ns,
            uid.into(),
            Pool::First,
            kind,
        );
        if let Some(closed) = closed {
            self.closed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(closed);
        }
        admitted
    }

    /// The summaries to record: seconds closed since the last call, and the current one
    /// if `now_ns` is past it (or in any case, with `all`, at shutdown).
    pub fn summaries(&self, now_ns: u64, all: bool) -> Vec<RefusalsSuppressed> {
        let mut budget = self.budget.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = if all { budget.close() } else { budget.close_if_past(now_ns) };
        let mut closed = std::mem::take(&mut *self.closed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        closed.extend(current);
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record_budget::NANOS_PER_SECOND;

    #[test]
    fn one_uids_flood_is_counted_and_others_are_still_recorded() {
        let budget = RefusalBudget::default();
        let second = 7 * NANOS_PER_SECOND;
        let recorded = (0..1000).filter(|_| budget.admit(1000, "propose", "malformed_certificate", second)).count();
        assert_eq!(recorded, 10, "one kind of one uid");
        let reasons = ["caller_mismatch", "replayed", "expired", "drift"];
        let more = (0..1000).filter(|i| budget.admit(1000, "read", reasons[i % 4], second)).count();
        assert_eq!(more, 10, "the uid's share, whatever it varies");
        assert!(budget.admit(1001, "propose", "malformed_certificate", second), "another uid");
        assert!(budget.summaries(second + 1, false).is_empty(), "the second is not over");
        let summaries = budget.summaries(second + NANOS_PER_SECOND, false);
        assert_eq!(summaries.len(), 1);
        assert_eq!(summaries[0].suppressed, 2000 - 20);
        assert_eq!(summaries[0].kinds[0].kind.uid, 1000);
        // A refusal of a later second closes the one before; the flush records it.
        budget.admit(1000, "propose", "malformed_certificate", second + 2 * NANOS_PER_SECOND);
        assert!(budget.summaries(second + 2 * NANOS_PER_SECOND, true).is_empty(), "nothing was suppressed");
    }
}
