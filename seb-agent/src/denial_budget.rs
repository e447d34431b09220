//! A bound on how many kernel denials become audit records.
//!
//! Any process of the scope can be denied as fast as it can call `connect()`: hundreds of
//! thousands of times a second, each one a signed audit row and a log line, until the
//! disk that also holds the admission decisions is full. So in each second of denial
//! time, each kind of denial (same cgroup, process, hook, destination, action) is
//! recorded in full at most `PER_KEY` times, each cgroup at most `PER_CGROUP` times, and
//! at most `PER_SECOND` denials are recorded in all, but for the first
//! `RESERVED_PER_CGROUP` of each cgroup (of up to `RESERVED_CGROUPS`), which are recorded
//! even then. Kills have a budget of their own: floods of refused connects from a few
//! pods can hide neither another pod's first denials nor a process killed. The rest are
//! counted, never dropped: each second that suppressed any ends in one
//! `denials_suppressed` record with the total and the largest counts by kind.

use serde::{Deserialize, Serialize};

#[cfg(test)]
use crate::record_budget::{COUNTED_KINDS, NAMED_IN_SUMMARY, NANOS_PER_SECOND};
use crate::{
    audit::KernelDenial,
    record_budget::{Limits, Pool, RecordBudget},
};

/// Record kind of the per-second summary of denials not recorded in full.
pub const SUPPRESSED_KIND: &str = "denials_suppressed";
/// Full records per kind of denial per second.
pub const PER_KEY: u32 = 5;
/// Full records per cgroup per second (the judged cgroup: a pod's container).
pub const PER_CGROUP: u32 = 50;
/// Full records per second, all kinds together: as many again for kills.
pub const PER_SECOND: u32 = 200;
/// Full records each cgroup gets per second even once `PER_SECOND` is spent: four
/// flooding cgroups would spend it all.
pub const RESERVED_PER_CGROUP: u32 = 2;
/// Cgroups whose reserve a second serves, at most (a node's pods, with room): the bound
/// in all is `PER_SECOND + RESERVED_PER_CGROUP * RESERVED_CGROUPS` per pool.
pub const RESERVED_CGROUPS: usize = 256;

const LIMITS: Limits = Limits {
    per_kind: PER_KEY,
    per_group: PER_CGROUP,
    per_second: PER_SECOND,
    reserved_per_group: RESERVED_PER_CGROUP,
    reserved_groups: RESERVED_CGROUPS,
};

/// What makes two denials the same kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DenialKind {
    pub cgroup_id: u64,
    pub tgid: Option<u32>,
    pub comm: Option<String>,
    pub hook: String,
    pub address: String,
    pub port: u16,
    pub action: String,
}

impl DenialKind {
    fn of(denial: &KernelDenial) -> Self {
        Self {
            cgroup_id: denial.cgroup_id,
            tgid: denial.tgid,
            comm: denial.comm.clone(),
            hook: denial.hook.clone(),
            address: denial.address.clone(),
            port: denial.port,
            action: denial.action.clone(),
        }
    }
}

pub type SuppressedKind = crate::record_budget::SuppressedKind<DenialKind>;
/// One second's denials that were counted but not recorded in full.
pub type Suppressed = crate::record_budget::Suppressed<DenialKind>;

/// The budget of the current second: refusals draw on one pool, kills on the other.
pub struct DenialBudget(RecordBudget<DenialKind>);

impl Default for DenialBudget {
    fn default() -> Self {
        Self(RecordBudget::new(LIMITS))
    }
}

impl DenialBudget {
    /// Whether `denial` is recorded in full, and the summary of a second it closed.
    pub fn admit(&mut self, denial: &KernelDenial) -> (bool, Option<Suppressed>) {
        let pool = if denial.action == "killed" { Pool::Second } else { Pool::First };
        self.0.admit(denial.time_ns, denial.cgroup_id, pool, DenialKind::of(denial))
    }

    /// Close the current second if `now_ns` is past it; its summary, if it suppressed any.
    pub fn close_if_past(&mut self, now_ns: u64) -> Option<Suppressed> {
        self.0.close_if_past(now_ns)
    }

    /// End the current second: its summary if it suppressed any, and a fresh budget.
    pub fn close(&mut self) -> Option<Suppressed> {
        self.0.close()
    }
}

#[cfg(test)]
mod tests {
    use seb_common::{DenialEvent, FAMILY_V4, Hook};

    use super::*;

    fn denial(time_ns: u64, tgid: u32, port: u16) -> KernelDenial {
        // SAFETY: DenialEvent is plain old data; all zeroes is a valid value.
        let mut event: DenialEvent = unsafe { std::mem::zeroed() };
        event.family = FAMILY_V4;
        event.daddr[..4].copy_from_slice(&[192, 0, 2, 1]);
        event.dport = port;
        event.hook = Hook::Connect4 as u8;
        event.pid_tgid = (u64::from(tgid) << 32) | u64::from(tgid);
        // Each process in a cgroup of its own.
        event.cgroup_id = u64::from(tgid);
        KernelDenial::from_event(&event, time_ns)
    }

    #[test]
    fn each_kind_is_recorded_a_few_times_a_second_and_the_rest_counted() {
        let mut budget = DenialBudget::default();
        let admitted = (0..1000).filter(|i| budget.admit(&denial(5 * NANOS_PER_SECOND + i, 7, 443)).0).count();
        assert_eq!(admitted, PER_KEY as usize);
        // Another kind still has its own budget.
        assert!(budget.admit(&denial(5 * NANOS_PER_SECOND, 8, 443)).0);
        let (admitted, closed) = budget.admit(&denial(6 * NANOS_PER_SECOND, 7, 443));
        assert!(admitted, "a new second, a new budget");
        let closed = closed.expect("the first second suppressed denials");
        assert_eq!(closed.second_ns, 5 * NANOS_PER_SECOND);
        assert_eq!(closed.suppressed, 1000 - u64::from(PER_KEY));
        assert_eq!(closed.kinds.len(), 1);
        assert_eq!((closed.kinds[0].kind.tgid, closed.kinds[0].count), (Some(7), closed.suppressed));
        assert_eq!(budget.close(), None, "nothing suppressed in the second second");
    }

    #[test]
    fn all_kinds_together_are_bounded_and_the_summary_names_the_largest() {
        let mut budget = DenialBudget::default();
        let total = 10 * PER_SECOND as u64;
        let admitted =
            (0..total).filter(|i| budget.admit(&denial(NANOS_PER_SECOND, (*i % 16) as u32, *i as u16)).0).count();
        assert_eq!(admitted, PER_SECOND as usize);
        let summary = budget.close_if_past(2 * NANOS_PER_SECOND).unwrap();
        assert_eq!(summary.suppressed, total - u64::from(PER_SECOND));
        assert_eq!(summary.kinds.len(), NAMED_IN_SUMMARY);
        let named: u64 = summary.kinds.iter().map(|k| k.count).sum();
        assert_eq!(named + summary.others, summary.suppressed, "every suppressed denial is counted once");
    }

    #[test]
    fn kinds_past_the_counted_ones_are_summed_not_kept() {
        let mut budget = DenialBudget::default();
        let total = PER_SECOND as usize + COUNTED_KINDS + 500;
        for port in 0..total {
            budget.admit(&denial(NANOS_PER_SECOND, (port % 16) as u32, port as u16));
        }
        assert_eq!(budget.0.suppressed.len(), COUNTED_KINDS, "memory stays bounded");
        let summary = budget.close().unwrap();
        assert_eq!(summary.suppressed, (total - PER_SECOND as usize) as u64);
        let named: u64 = summary.kinds.iter().map(|k| k.count).sum();
        assert_eq!(named + summary.others, summary.suppressed, "every suppressed denial is counted once");
        assert_eq!(budget.0.uncounted, 0, "a fresh second");
    }

    /// One pod flooding refused connects (many kinds, to escape the per-kind bound)
    /// spends its cgroup's share, not the second's: another pod's denial and a kill in
    /// the flooding pod are still recorded in full.
    #[test]
    fn a_flood_from_one_cgroup_hides_neither_other_cgroups_nor_kills() {
        let mut budget = DenialBudget::default();
        let flood = (0..1000u16).filter(|port| budget.admit(&denial(NANOS_PER_SECOND, 7, *port)).0).count();
        assert_eq!(flood, PER_CGROUP as usize);
        assert!(budget.admit(&denial(NANOS_PER_SECOND, 8, 443)).0, "another cgroup's denial");
        let mut kill = denial(NANOS_PER_SECOND, 7, 0);
        kill.action = "killed".into();
        assert!(budget.admit(&kill).0, "a kill in the flooding cgroup");
        let summary = budget.close().unwrap();
        assert_eq!(summary.kinds[0].kind.cgroup_id, 7, "the summary names the flooding cgroup");
    }

    /// Four cgroups flooding at their own bound spend the second's: a fifth cgroup's
    /// first denials are still recorded in full, and the reserve itself is bounded.
    #[test]
    fn floods_from_a_few_cgroups_leave_every_other_cgroup_its_first_records() {
        let mut budget = DenialBudget::default();
        for flooder in 1..=4 {
            let admitted = (0..100u16).filter(|port| budget.admit(&denial(NANOS_PER_SECOND, flooder, *port)).0).count();
            assert_eq!(admitted, PER_CGROUP as usize);
        }
        assert!(!budget.admit(&denial(NANOS_PER_SECOND, 1, 9999)).0, "a flooder past its own bound");
        let quiet: Vec<bool> = (0..3).map(|port| budget.admit(&denial(NANOS_PER_SECOND, 5, port)).0).collect();
        assert_eq!(quiet, [true, true, false], "the reserve, then the spent second");
        let others = (6..6 + 2 * RESERVED_CGROUPS as u32)
            .filter(|cgroup| budget.admit(&denial(NANOS_PER_SECOND, *cgroup, 443)).0)
            .count();
        assert_eq!(others, RESERVED_CGROUPS - 5, "cgroups the reserve serves, at most");
        assert_eq!(
            budget.0.first.recorded,
            PER_SECOND + RESERVED_PER_CGROUP + (RESERVED_CGROUPS as u32 - 5),
            "the bound in all"
        );
    }

    #[test]
    fn a_late_stamp_counts_against_the_current_second() {
        let mut budget = DenialBudget::default();
        for _ in 0..PER_KEY {
            assert!(budget.admit(&denial(9 * NANOS_PER_SECOND, 3, 80)).0);
        }
        let (admitted, closed) = budget.admit(&denial(8 * NANOS_PER_SECOND, 3, 80));
        assert!(!admitted && closed.is_none());
        assert_eq!(budget.close_if_past(9 * NANOS_PER_SECOND + 1), None, "the second is not over");
        assert_eq!(budget.close().unwrap().suppressed, 1);
    }
}
