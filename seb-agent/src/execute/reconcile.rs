//! Reconciling, on start, decisions whose outcome was never recorded (the broker stopped
//! in between): the live state of the target is read, and the outcome is recorded as
//! `unknown` with that state's digest. Nothing admitted is ever left without an outcome.

use anyhow::Result;
use tracing::{info, warn};

use super::{Executors, OUTCOME_KIND, Outcome, OutcomeStatus, Timings};
use crate::{
    admission::DecisionRecord,
    audit::{Ledger, now_ns},
};

/// Taken in the transaction that verified the store at start (see
/// [`crate::audit::Derived::at_start`]): the admitted decisions with no outcome record.
/// Read later from the store itself, a decision row written after verification (by
/// anyone who can write the file) would be "reconciled": an identity minted for it and
/// its target read.
pub const ORPHANS_AT_START: &str = "
DROP TABLE IF EXISTS temp.orphans_at_start;
CREATE TEMP TABLE orphans_at_start AS
    SELECT seq, body FROM main.records WHERE kind = 'decision' AND json_extract(body, '$.admitted') = 1
    AND seq NOT IN (SELECT json_extract(body, '$.decision_seq') FROM main.records WHERE kind = 'outcome');
";

/// Admitted decisions with no outcome record, as verified at start: (decision seq, the
/// decision).
async fn orphans(ledger: &Ledger) -> Result<Vec<(i64, DecisionRecord)>> {
    ledger
        .run(|batch| {
            let mut query = batch.conn().prepare("SELECT seq, body FROM temp.orphans_at_start ORDER BY seq")?;
            let rows = query.query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)))?;
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

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use serde_json::json;

    use super::*;
    use crate::{
        admission::DECISION_KIND,
        audit::{Derived, LedgerFiles},
    };

    const STATE: Derived = Derived { at_start: ORPHANS_AT_START, ..Derived::NOTHING };

    fn decision(id: &str) -> serde_json::Value {
        json!({
            "decision_id": id, "admitted": true, "reason": "admitted", "message": "",
            "caller": {"uid": 0, "gid": 0, "pid": 1, "exe": null, "cgroup": null, "pod_uid": null},
            "serial": "01", "contract_id": null,
            "request": {"provider": "http", "operation": "POST", "target": "https://127.0.0.1/x", "digest": "00"},
            "active_epochs": {"policy": null, "revocation": null},
        })
    }

    #[tokio::test]
    async fn a_decision_written_into_the_store_after_its_verification_is_not_reconciled() {
        let dir = tempfile::tempdir().unwrap();
        let files = LedgerFiles::new(&dir.path().join("audit.db"), &dir.path().join("broker.key"));
        let key = || SigningKey::from_bytes(&[9; 32]);
        crate::audit::head::write(
            &files.head,
            &crate::audit::chain::Head::EMPTY,
            &key(),
            crate::audit::head::Flush::Now,
        )
        .unwrap();
        let (ledger, thread) = Ledger::start(&files, key(), STATE).unwrap();
        ledger.run(|batch| batch.append(DECISION_KIND, now_ns(), &decision("signed")).map(drop)).await.unwrap();
        drop(ledger);
        thread.join().unwrap();

        // Restarted: the signed decision is an orphan. Then someone who can write the file
        // adds an admitted decision of their own, as the broker would reconcile it.
        let (ledger, thread) = Ledger::start(&files, key(), STATE).unwrap();
        let forged = rusqlite::Connection::open(&files.database).unwrap();
        forged
            .execute(
                "INSERT INTO records (seq, kind, time_ns, body, prev_hash, hash, signature) VALUES (1000000000, ?1, 0, ?2, x'', x'', x'')",
                [DECISION_KIND, &decision("forged").to_string()],
            )
            .unwrap();
        let found = orphans(&ledger).await.unwrap();
        let ids: Vec<&str> = found.iter().map(|(_, d)| d.decision_id.as_str()).collect();
        assert_eq!(ids, ["signed"]);
        drop(ledger);
        thread.join().unwrap();
    }

    #[test]
    fn the_orphan_query_names_the_kinds_records_are_written_with() {
        assert!(ORPHANS_AT_START.contains(&format!("kind = '{DECISION_KIND}'")));
        assert!(ORPHANS_AT_START.contains(&format!("kind = '{OUTCOME_KIND}'")));
    }
}
