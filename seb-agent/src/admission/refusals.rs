//! A bound on the records refused requests make. Anyone who reaches the socket can send a
//! proposal with a made-up certificate, or a read of something not served, as fast as it
//! can write: each would be a signed, fsynced decision or read record, until the disk the
//! admissions also need is full. Per caller uid, a second's first refusals are recorded
//! in full (see `record_budget` for the bounds); the rest are answered as usual and
//! counted, and each second that suppressed any ends in one `refusals_suppressed` record
//! naming the largest counts by uid, request and reason.

use serde::{Deserialize, Serialize};

use crate::record_budget::{Limits, SharedBudget, Suppressed};

/// Record kind of the per-second summary of refusals not recorded in full.
pub const SUPPRESSED_KIND: &str = "refusals_suppressed";

/// The bounds of a second's full records: of one kind (one uid, request and reason), of
/// one group (a uid), in all, and each group's reserve.
pub const LIMITS: Limits =
    Limits { per_kind: 10, per_group: 20, per_second: 200, reserved_per_group: 2, reserved_groups: 256 };

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

pub struct RefusalBudget(SharedBudget<RefusalKind>);

impl Default for RefusalBudget {
    fn default() -> Self {
        Self(SharedBudget::new(LIMITS))
    }
}

impl RefusalBudget {
    /// Whether a refusal of `uid`'s `request`, for `reason`, now, is recorded in full.
    pub fn admit(&self, uid: u32, request: &str, reason: &str, now_ns: u64) -> bool {
        self.0.admit(uid.into(), RefusalKind { uid, request: request.into(), reason: reason.into() }, now_ns)
    }

    /// See [`SharedBudget::summaries`].
    pub fn summaries(&self, now_ns: u64, all: bool) -> Vec<RefusalsSuppressed> {
        self.0.summaries(now_ns, all)
    }

    /// Record the summaries due as `refusals_suppressed` records (with `all`, the current
    /// second's too: at shutdown).
    pub async fn record_summaries(&self, ledger: &crate::audit::Ledger, all: bool) {
        self.0.record_summaries(ledger, SUPPRESSED_KIND, all).await
    }

    /// The same each second, until `stop`.
    pub async fn record_summaries_each_second(
        &self,
        ledger: &crate::audit::Ledger,
        stop: &tokio_util::sync::CancellationToken,
    ) {
        self.0.record_summaries_each_second(ledger, SUPPRESSED_KIND, stop).await
    }
}

/// What a caller is told of a refusal its budget left unrecorded, after why it was refused.
pub fn unrecorded(message: &str) -> String {
    format!(
        "{message} (not recorded one by one: this uid's refusals are past their per-second record budget, and are \
         counted in a {SUPPRESSED_KIND} record)"
    )
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
