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

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::audit::KernelDenial;

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
/// Kinds named in a summary; the rest are summed into `others`.
pub const NAMED_IN_SUMMARY: usize = 16;
/// Kinds counted one by one in a second; denials of further kinds go straight to
/// `others` (a scan of many ports makes a kind per port).
pub const COUNTED_KINDS: usize = 1024;

const NANOS_PER_SECOND: u64 = 1_000_000_000;

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuppressedKind {
    #[serde(flatten)]
    pub kind: DenialKind,
    pub count: u64,
}

/// One second's denials that were counted but not recorded in full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suppressed {
    /// The second, as nanoseconds since the Unix epoch at its start.
    pub second_ns: u64,
    pub suppressed: u64,
    /// The largest counts, largest first.
    pub kinds: Vec<SuppressedKind>,
    /// Suppressed denials of kinds not named above.
    pub others: u64,
}

/// Full records of one second, refusals or kills.
#[derive(Default)]
struct Pool {
    recorded: u32,
    /// At most `PER_SECOND` or `RESERVED_CGROUPS` cgroups: only recorded denials enter.
    by_cgroup: HashMap<u64, u32>,
}

impl Pool {
    fn take(&mut self, cgroup_id: u64) -> bool {
        let taken = self.by_cgroup.get(&cgroup_id).copied().unwrap_or(0);
        let reserved = taken < RESERVED_PER_CGROUP && (taken > 0 || self.by_cgroup.len() < RESERVED_CGROUPS);
        if taken >= PER_CGROUP || (self.recorded >= PER_SECOND && !reserved) {
            return false;
        }
        self.by_cgroup.insert(cgroup_id, taken + 1);
        self.recorded += 1;
        true
    }
}

/// The budget of the current second.
#[derive(Default)]
pub struct DenialBudget {
    second: Option<u64>,
    refusals: Pool,
    kills: Pool,
    recorded_by_kind: HashMap<DenialKind, u32>,
    suppressed: HashMap<DenialKind, u64>,
    /// Suppressed denials of kinds past `COUNTED_KINDS`.
    uncounted: u64,
}

impl DenialBudget {
    /// Whether `denial` is recorded in full. A denial of a later second first closes the
    /// current one, whose summary is returned; one stamped earlier (another CPU's, a
    /// little late) counts against the current second.
    pub fn admit(&mut self, denial: &KernelDenial) -> (bool, Option<Suppressed>) {
        let second = denial.time_ns / NANOS_PER_SECOND;
        let closed = if self.second.is_some_and(|current| second > current) { self.close() } else { None };
        self.second.get_or_insert(second);
        let kind = DenialKind::of(denial);
        let by_kind = self.recorded_by_kind.get(&kind).copied().unwrap_or(0);
        let pool = if denial.action == "killed" { &mut self.kills } else { &mut self.refusals };
        let admitted = by_kind < PER_KEY && pool.take(denial.cgroup_id);
        if admitted {
            self.recorded_by_kind.insert(kind, by_kind + 1);
        } else if let Some(count) = self.suppressed.get_mut(&kind) {
            *count += 1;
        } else if self.suppressed.len() < COUNTED_KINDS {
            self.suppressed.insert(kind, 1);
        } else {
            self.uncounted += 1;
        }
        (admitted, closed)
    }

    /// Close the current second if `now_ns` is past it; its summary, if it suppressed any.
    pub fn close_if_past(&mut self, now_ns: u64) -> Option<Suppressed> {
        let current = self.second?;
        (now_ns / NANOS_PER_SECOND > current).then(|| self.close()).flatten()
    }

    /// End the current second: its summary if it suppressed any, and a fresh budget.
    pub fn close(&mut self) -> Option<Suppressed> {
        let second = self.second.take()?;
        (self.refusals, self.kills) = Default::default();
        self.recorded_by_kind.clear();
        let uncounted = std::mem::take(&mut self.uncounted);
        if self.suppressed.is_empty() {
            return None;
        }
        let mut kinds: Vec<SuppressedKind> =
            self.suppressed.drain().map(|(kind, count)| SuppressedKind { kind, count }).collect();
        kinds.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.kind.cmp(&b.kind)));
        let suppressed = kinds.iter().map(|k| k.count).sum::<u64>() + uncounted;
        let others = kinds.iter().skip(NAMED_IN_SUMMARY).map(|k| k.count).sum::<u64>() + uncounted;
        kinds.truncate(NAMED_IN_SUMMARY);
        Some(Suppressed { second_ns: second * NANOS_PER_SECOND, suppressed, kinds, others })
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
        assert_eq!(budget.suppressed.len(), COUNTED_KINDS, "memory stays bounded");
        let summary = budget.close().unwrap();
        assert_eq!(summary.suppressed, (total - PER_SECOND as usize) as u64);
        let named: u64 = summary.kinds.iter().map(|k| k.count).sum();
        assert_eq!(named + summary.others, summary.suppressed, "every suppressed denial is counted once");
        assert_eq!(budget.uncounted, 0, "a fresh second");
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
            budget.refusals.recorded,
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
