//! A bound on the records successful passthrough reads make. A caller allowed a read can
//! repeat it as fast as the broker serves it, and each is a signed, fsynced row on the
//! disk the admissions also need. Per caller uid and target, a second's first reads are
//! recorded in full (see `record_budget` for the bounds); the rest are served as usual
//! and counted, and each second that suppressed any ends in one `reads_suppressed` record
//! naming the largest counts by uid and target. Refused reads have the refusals' budget.

use serde::{Deserialize, Serialize};

use crate::record_budget::{Limits, SharedBudget};

/// Record kind of the per-second summary of reads not recorded in full.
pub const SUPPRESSED_KIND: &str = "reads_suppressed";

/// The bounds of a second's full read records: of one uid and target, of one uid, in
/// all, and each uid's reserve.
pub const LIMITS: Limits =
    Limits { per_kind: 20, per_group: 100, per_second: 500, reserved_per_group: 2, reserved_groups: 256 };

/// How much of a target a summary keeps (a target may be long; a summary names 16).
const TARGET_IN_SUMMARY: usize = 256;

/// What makes two reads the same kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReadKind {
    pub uid: u32,
    pub target: String,
}

/// Full records and counts of successful reads, by uid and target.
pub type ReadBudget = SharedBudget<ReadKind>;

pub fn budget() -> ReadBudget {
    SharedBudget::new(LIMITS)
}

/// Whether a successful read of `target` by `uid`, now, is recorded in full.
pub fn admit(budget: &ReadBudget, uid: u32, target: &str, now_ns: u64) -> bool {
    let target = crate::audit::clipped(target, TARGET_IN_SUMMARY);
    budget.admit(uid.into(), ReadKind { uid, target }, now_ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record_budget::NANOS_PER_SECOND;

    #[test]
    fn a_uids_reads_of_one_target_are_recorded_in_full_up_to_the_bound_then_summed() {
        let budget = budget();
        let second = 7 * NANOS_PER_SECOND;
        let recorded = (0..50).filter(|_| admit(&budget, 1000, "https://api/v1/x", second)).count();
        assert_eq!(recorded, LIMITS.per_kind as usize);
        assert!(admit(&budget, 1000, "https://api/v1/y", second), "another target of the same uid");
        assert!(admit(&budget, 1001, "https://api/v1/x", second), "another uid");
        let summaries = budget.summaries(second + NANOS_PER_SECOND, false);
        assert_eq!(summaries.len(), 1);
        assert_eq!(summaries[0].suppressed, 30);
        assert_eq!(summaries[0].kinds[0].kind, ReadKind { uid: 1000, target: "https://api/v1/x".into() });
    }
}
