//! Watching the kernel for tampering: a check of every link, policy map and broker
//! registration, at least once a second, each divergence repaired, recorded in the audit
//! log and counted.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, error, warn};

use crate::{
    audit::{Ledger, now_ns},
    enforcement::{BrokerSockets, SharedEnforcer, integrity::Finding},
    metrics::{Metrics, TamperLabels},
};

/// Record kind of tamper findings in the audit store.
pub const KIND: &str = "tamper";

/// How often the kernel is checked.
pub const INTERVAL: Duration = Duration::from_millis(500);

/// How often a divergence the agent cannot repair is recorded again while it lasts.
pub const UNREPAIRED_RECORD_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize)]
struct TamperRecord<'a> {
    findings: &'a [Finding],
    /// Everything was written and attached again.
    repaired: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    repair_error: Option<String>,
    /// Checks since the previous record that found the same unrepaired divergence.
    #[serde(skip_serializing_if = "is_zero")]
    unrecorded_repeats: u64,
}

fn is_zero(count: &u64) -> bool {
    *count == 0
}

/// Which findings become records. A divergence that was repaired is recorded each time
/// (each is a new act). One the agent cannot repair (another's program on its maps) is
/// found by every check while it lasts: it is recorded when first found, then once per
/// [`UNREPAIRED_RECORD_INTERVAL`] with the count of checks in between, so that it
/// neither goes quiet nor grows the audit store twice a second.
#[derive(Debug, Default)]
struct RecordPacing {
    unrepaired: Option<Unrepaired>,
}

#[derive(Debug)]
struct Unrepaired {
    findings: Vec<Finding>,
    recorded_at: Instant,
    repeats: u64,
}

impl RecordPacing {
    /// `Some(repeats)` to record this check's findings now, `None` to count them only.
    fn admit(&mut self, findings: &[Finding], repaired: bool, now: Instant) -> Option<u64> {
        let previous = self.unrepaired.take();
        if repaired {
            return Some(0);
        }
        let repeats = match previous {
            Some(mut same) if same.findings == findings => {
                if now.duration_since(same.recorded_at) < UNREPAIRED_RECORD_INTERVAL {
                    same.repeats += 1;
                    self.unrepaired = Some(same);
                    return None;
                }
                same.repeats
            }
            _ => 0,
        };
        self.unrepaired = Some(Unrepaired { findings: findings.to_vec(), recorded_at: now, repeats: 0 });
        Some(repeats)
    }
}

/// Check until `shutdown` flips.
pub async fn watch(
    enforcer: SharedEnforcer,
    sockets: BrokerSockets,
    ledger: Ledger,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut pacing = RecordPacing::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
        let (checker, registry) = (enforcer.clone(), sockets.clone());
        let checked = match tokio::task::spawn_blocking(move || checker.check_integrity(&registry)).await {
            Ok(checked) => checked,
            Err(e) => {
                error!(error = %e, "the kernel integrity check panicked");
                continue;
            }
        };
        let integrity = enforcer.integrity();
        if integrity.intact {
            pacing.admit(&[], true, Instant::now());
            continue;
        }
        let findings = integrity.last_findings;
        for finding in &findings {
            metrics.tamper_findings.get_or_create(&TamperLabels { kind: finding.kind.clone() }).inc();
        }
        let Some(unrecorded_repeats) = pacing.admit(&findings, checked.is_ok(), Instant::now()) else {
            debug!(findings = findings.len(), "the same unrepaired divergence as the last tamper record");
            continue;
        };
        for finding in &findings {
            warn!(object = %finding.object, problem = %finding.problem, "the kernel differs from what the agent installed");
        }
        let record = serde_json::to_value(TamperRecord {
            findings: &findings,
            repaired: checked.is_ok(),
            repair_error: checked.err().map(|e| format!("{e:#}")),
            unrecorded_repeats,
        });
        let written = match record {
            Ok(record) => ledger.run(move |batch| batch.append(KIND, now_ns(), &record).map(drop)).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = written {
            error!(error = %format!("{e:#}"), "recording a tamper finding failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program_finding() -> Vec<Finding> {
        vec![Finding { kind: "program".into(), object: "prog 7".into(), problem: "uses SEB_BROKER_SOCKETS".into() }]
    }

    #[test]
    fn an_unrepaired_divergence_is_recorded_once_then_once_per_interval_with_its_count() {
        let mut pacing = RecordPacing::default();
        let start = Instant::now();
        let found = program_finding();
        assert_eq!(pacing.admit(&found, false, start), Some(0));
        for check in 1..=3 {
            assert_eq!(pacing.admit(&found, false, start + INTERVAL * check), None);
        }
        assert_eq!(pacing.admit(&found, false, start + UNREPAIRED_RECORD_INTERVAL), Some(3));
        assert_eq!(pacing.admit(&found, false, start + UNREPAIRED_RECORD_INTERVAL + INTERVAL), None);
    }

    #[test]
    fn a_different_or_repaired_divergence_and_one_after_a_clean_check_are_recorded_at_once() {
        let mut pacing = RecordPacing::default();
        let now = Instant::now();
        let found = program_finding();
        assert_eq!(pacing.admit(&found, false, now), Some(0));
        let mut other = found.clone();
        other[0].object = "prog 8".into();
        assert_eq!(pacing.admit(&other, false, now), Some(0));
        assert_eq!(pacing.admit(&other, true, now), Some(0), "repaired: a new act each time");
        assert_eq!(pacing.admit(&other, true, now), Some(0));
        assert_eq!(pacing.admit(&other, false, now), Some(0));
        pacing.admit(&[], true, now);
        assert_eq!(pacing.admit(&other, false, now), Some(0), "gone, then back: found again");
    }
}
