//! Reconciling, on start, decisions whose outcome was never recorded (the broker stopped
//! in between): the live state of the target is read, and the outcome is recorded as
//! `unknown` with that state's digest. Nothing admitted is ever left without an outcome.

use anyhow::Result;
use tracing::{info, warn};

use super::{Executors, OUTCOME_KIND, Outcome, OutcomeStatus, Timings};
use crate::{
    admission::{DECISION_KIND, DecisionRecord},
    audit::{Ledger, now_ns},
};

/// Admitted decisions with no outcome record: (decision seq, the decision).
async fn orphans(ledger: &Ledger) -> Result<Vec<(i64, DecisionRecord)>> {
    ledger
        .run(|batch| {
            let mut query = batch.conn().prepare(
                "SELECT seq, body FROM records WHERE kind = ?1 AND json_extract(body, '$.admitted') = 1
                 AND seq NOT IN (SELECT json_extract(body, '$.decision_seq') FROM records WHERE kind = ?2)
                 ORDER BY seq",
            )?;
            let rows = query.query_map([DECISION_KIND, OUTCOME_KIND], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })?;
            let mut found = Vec::new();
            for row in rows {
                let (seq, body) = row?;
                found.push((seq, serde_json::from_str(&body)?));
            }
            Ok(found)
        })
        .await
}

/// Record an `unknown` outcome for every orphaned decision; returns how many.
pub async fn reconcile(ledger: &Ledger, executors: &Executors) -> Result<usize> {
    let orphans = orphans(ledger).await?;
    for (seq, decision) in &orphans {
        let (identity, digest, error) = match live_state(executors, decision).await {
            Ok((identity, digest)) => (identity, Some(digest), None),
            Err(e) => (None, None, Some(format!("the live state could not be read: {e:#}"))),
        };
        let note = "the broker stopped between the decision and its outcome; the outcome was reconciled on restart";
        let outcome = Outcome {
            decision_id: decision.decision_id.clone(),
            decision_seq: *seq,
            status: OutcomeStatus::Unknown,
            identity,
            api_status: None,
            resulting_state_digest: digest,
            duration_ms: 0.0,
            timings: Timings::default(),
            error: Some(error.map_or(note.to_string(), |e| format!("{note}; {e}"))),
            record_seq: 0,
        };
        ledger.run(move |batch| batch.append(OUTCOME_KIND, now_ns(), &outcome)).await?;
        warn!(decision_id = %decision.decision_id, decision_seq = seq, "reconciled a decision without an outcome");
    }
    if !orphans.is_empty() {
        info!(count = orphans.len(), "outcomes reconciled");
    }
    Ok(orphans.len())
}

async fn live_state(
    executors: &Executors,
    decision: &DecisionRecord,
) -> Result<(Option<super::MintedIdentity>, String)> {
    let identity = decision.identity.as_ref().ok_or_else(|| anyhow::anyhow!("the decision names no identity"))?;
    let (minted, digest) = executors.read_live_state(&decision.request, identity, &decision.decision_id).await?;
    Ok((Some(minted), digest))
}
