//! A bound on how many records of one sort outsiders can make a second: kernel denials
//! (`denial_budget`) and refused requests on the broker's socket (`refusal_budget`).
//! Each is free to its caller and a signed, fsynced row to the node.
//!
//! In each second, each kind is recorded in full at most `per_kind` times, each group (a
//! cgroup, a uid) at most `per_group` times, and at most `per_second` in all, but for the
//! first `reserved_per_group` of each group (of up to `reserved_groups`), which are
//! recorded even then. Two pools keep their budgets apart (refusals and kills): a flood
//! of one cannot hide the other. The rest are counted, never dropped: each second that
//! suppressed any ends in one summary with the total and the largest counts by kind.

use std::{collections::HashMap, hash::Hash};

use serde::{Deserialize, Serialize};

/// Kinds named in a summary; the rest are summed into `others`.
pub const NAMED_IN_SUMMARY: usize = 16;
/// Kinds counted one by one in a second; records of further kinds go straight to
/// `others` (a scan of many ports makes a kind per port).
pub const COUNTED_KINDS: usize = 1024;

pub const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// The bounds of one budget.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_kind: u32,
    pub per_group: u32,
    pub per_second: u32,
    pub reserved_per_group: u32,
    pub reserved_groups: usize,
}

/// Which of the two pools a record draws on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    First,
    Second,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuppressedKind<K> {
    #[serde(flatten)]
    pub kind: K,
    pub count: u64,
}

/// One second's records that were counted but not written in full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suppressed<K> {
    /// The second, as nanoseconds since the Unix epoch at its start.
    pub second_ns: u64,
    pub suppressed: u64,
    /// The largest counts, largest first.
    pub kinds: Vec<SuppressedKind<K>>,
    /// Suppressed records of kinds not named above.
    pub others: u64,
}

/// Full records of one second in one pool.
#[derive(Default)]
pub(crate) struct PoolBudget {
    pub(crate) recorded: u32,
    /// At most `per_second` or `reserved_groups` groups: only recorded ones enter.
    by_group: HashMap<u64, u32>,
}

impl PoolBudget {
    fn take(&mut self, group: u64, limits: &Limits) -> bool {
        let taken = self.by_group.get(&group).copied().unwrap_or(0);
        let reserved = taken < limits.reserved_per_group && (taken > 0 || self.by_group.len() < limits.reserved_groups);
        if taken >= limits.per_group || (self.recorded >= limits.per_second && !reserved) {
            return false;
        }
        self.by_group.insert(group, taken + 1);
        self.recorded += 1;
        true
    }
}

/// The budget of the current second.
pub struct RecordBudget<K> {
    limits: Limits,
    second: Option<u64>,
    pub(crate) first: PoolBudget,
    pub(crate) second_pool: PoolBudget,
    recorded_by_kind: HashMap<K, u32>,
    pub(crate) suppressed: HashMap<K, u64>,
    /// Suppressed records of kinds past `COUNTED_KINDS`.
    pub(crate) uncounted: u64,
}

impl<K: Clone + Eq + Hash + Ord> RecordBudget<K> {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            second: None,
            first: PoolBudget::default(),
            second_pool: PoolBudget::default(),
            recorded_by_kind: HashMap::new(),
            suppressed: HashMap::new(),
            uncounted: 0,
        }
    }

    /// Whether a record of `kind`, in `group`, stamped `time_ns`, is written in full. A
    /// record of a later second first closes the current one, whose summary is returned;
    /// one stamped earlier (another CPU's, a little late) counts against the current
    /// second.
    pub fn admit(&mut self, time_ns: u64, group: u64, pool: Pool, kind: K) -> (bool, Option<Suppressed<K>>) {
        let second = time_ns / NANOS_PER_SECOND;
        let closed = if self.second.is_some_and(|current| moved_on(current, second)) { self.close() } else { None };
        self.second.get_or_insert(second);
        let by_kind = self.recorded_by_kind.get(&kind).copied().unwrap_or(0);
        let limits = self.limits;
        let pool = match pool {
            Pool::First => &mut self.first,
            Pool::Second => &mut self.second_pool,
        };
        let admitted = by_kind < limits.per_kind && pool.take(group, &limits);
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
    pub fn close_if_past(&mut self, now_ns: u64) -> Option<Suppressed<K>> {
        let current = self.second?;
        moved_on(current, now_ns / NANOS_PER_SECOND).then(|| self.close()).flatten()
    }

    /// End the current second: its summary if it suppressed any, and a fresh budget.
    pub fn close(&mut self) -> Option<Suppressed<K>> {
        let second = self.second.take()?;
        (self.first, self.second_pool) = Default::default();
        self.recorded_by_kind.clear();
        let uncounted = std::mem::take(&mut self.uncounted);
        if self.suppressed.is_empty() {
            return None;
        }
        let mut kinds: Vec<SuppressedKind<K>> =
            self.suppressed.drain().map(|(kind, count)| SuppressedKind { kind, count }).collect();
        kinds.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.kind.cmp(&b.kind)));
        let suppressed = kinds.iter().map(|k| k.count).sum::<u64>() + uncounted;
        let others = kinds.iter().skip(NAMED_IN_SUMMARY).map(|k| k.count).sum::<u64>() + uncounted;
        kinds.truncate(NAMED_IN_SUMMARY);
        Some(Suppressed { second_ns: second * NANOS_PER_SECOND, suppressed, kinds, others })
    }
}

/// Seconds a record may be stamped before the current one and still count against it
/// (stamped on another CPU, a little late).
const LATE_STAMP_SECONDS: u64 = 2;

/// Whether `second` ends the current second `current`: later, or so much earlier that
/// the clock stepped back (else every record would count against a second that does not
/// end until the clock catches up, unrecorded and unsummarised until then).
fn moved_on(current: u64, second: u64) -> bool {
    second > current || second + LATE_STAMP_SECONDS < current
}

/// A budget shared by the tasks that answer callers, whose closed seconds wait for the
/// next flush to be recorded.
pub struct SharedBudget<K> {
    budget: std::sync::Mutex<RecordBudget<K>>,
    closed: std::sync::Mutex<Vec<Suppressed<K>>>,
}

impl<K: Clone + Eq + Hash + Ord> SharedBudget<K> {
    pub fn new(limits: Limits) -> Self {
        Self { budget: std::sync::Mutex::new(RecordBudget::new(limits)), closed: std::sync::Mutex::new(Vec::new()) }
    }

    /// Whether a record of `kind`, in `group`, now, is written in full.
    pub fn admit(&self, group: u64, kind: K, now_ns: u64) -> bool {
        let (admitted, closed) =
            self.budget.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).admit(now_ns, group, Pool::First, kind);
        if let Some(closed) = closed {
            self.closed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(closed);
        }
        admitted
    }

    /// Record each summary due (see [`Self::summaries`]) as a `kind` record in `ledger`,
    /// waiting for room in its queue: what was counted is not lost.
    pub async fn record_summaries(&self, ledger: &crate::audit::Ledger, kind: &'static str, all: bool)
    where
        K: Serialize + Send + 'static,
    {
        for summary in self.summaries(crate::audit::now_ns() as u64, all) {
            tracing::warn!(
                kind,
                suppressed = summary.suppressed,
                "records past their budget were counted, not written one by one"
            );
            let written = ledger.run(move |batch| batch.append(kind, crate::audit::now_ns(), &summary)).await;
            if let Err(e) = written {
                tracing::error!(kind, error = %format!("{e:#}"), "a summary of records past their budget could not be recorded");
            }
        }
    }

    /// Record the summaries due each second until `stop` (never in the middle of a write:
    /// what was taken from the budget is recorded).
    pub async fn record_summaries_each_second(
        &self,
        ledger: &crate::audit::Ledger,
        kind: &'static str,
        stop: &tokio_util::sync::CancellationToken,
    ) where
        K: Serialize + Send + 'static,
    {
        let mut ticks = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = ticks.tick() => self.record_summaries(ledger, kind, false).await,
                _ = stop.cancelled() => return,
            }
        }
    }

    /// The summaries to record: seconds closed since the last call, and the current one
    /// if `now_ns` is past it (or in any case, with `all`, at shutdown).
    pub fn summaries(&self, now_ns: u64, all: bool) -> Vec<Suppressed<K>> {
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

    const LIMITS: Limits =
        Limits { per_kind: 1, per_group: 1, per_second: 1, reserved_per_group: 0, reserved_groups: 0 };

    #[test]
    fn a_clock_stepped_back_starts_a_new_second() {
        let mut budget = RecordBudget::<u32>::new(LIMITS);
        let at = |second: u64| second * NANOS_PER_SECOND;
        assert!(budget.admit(at(10_000), 1, Pool::First, 1).0);
        // A little late: counted against second 10,000, past its budget.
        assert!(!budget.admit(at(9_999), 1, Pool::First, 1).0);
        // The clock went back an hour: second 10,000 is closed and summarised, and the new
        // second has its budget.
        let (admitted, closed) = budget.admit(at(10_000 - 3600), 1, Pool::First, 1);
        assert!(admitted);
        assert_eq!(closed.map(|c| (c.second_ns, c.suppressed)), Some((at(10_000), 1)));
        // And the periodic close sees the step as well.
        assert!(!budget.admit(at(10_000 - 3600), 1, Pool::First, 1).0);
        assert!(budget.close_if_past(at(10_000 - 3600 - 10)).is_some());
    }
}
