//! Watching the kernel for tampering: a check of every link, policy map and broker
//! registration, at least once a second, each divergence repaired, recorded in the audit
//! log and counted.

use std::{sync::Arc, time::Duration};

use serde::Serialize;
use tokio::sync::watch;
use tracing::{error, warn};

use crate::{
    audit::{Ledger, now_ns},
    enforcement::{BrokerSockets, SharedEnforcer, integrity::Finding},
    metrics::{Metrics, TamperLabels},
};

/// Record kind of tamper findings in the audit store.
pub const KIND: &str = "tamper";

/// How often the kernel is checked.
pub const INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Serialize)]
struct TamperRecord<'a> {
    findings: &'a [Finding],
    /// Everything was written and attached again.
    repaired: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    repair_error: Option<String>,
}

/// Check until `shutdown` flips.
pub async fn watch(
    enforcer: SharedEnforcer,
    sockets: BrokerSockets,
    ledger: Ledger,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
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
            continue;
        }
        let findings = integrity.last_findings;
        for finding in &findings {
            warn!(object = %finding.object, problem = %finding.problem, "the kernel differs from what the agent installed");
            metrics.tamper_findings.get_or_create(&TamperLabels { kind: finding.kind.clone() }).inc();
        }
        let record = serde_json::to_value(TamperRecord {
            findings: &findings,
            repaired: checked.is_ok(),
            repair_error: checked.err().map(|e| format!("{e:#}")),
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
