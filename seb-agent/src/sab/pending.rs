//! Requests awaiting approvals survive a restart: they are state derived from the SAB's
//! signed log (a temporary table of the log's connection), rebuilt from the verified
//! records at each start and kept current by the jobs that append them. Nothing decides
//! from anything the log does not hold: the `sab_pending` record carries the request as
//! received and its deadline; accepted approvals, later pending decisions (a policy
//! change), denials, decisions and expiries follow it.

use std::time::SystemTime;

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Deserialize;

use super::{
    evidence::Approval,
    records::{APPROVAL_KIND, DECISION_KIND, EXPIRY_KIND, PENDING_KIND, PendingRecord},
    requests::{Draft, Entry, Status},
};
use crate::{
    audit::{Derived, chain::StoredRecord},
    cert::contract::digest_of,
};

/// The derived state the SAB's log is opened with.
pub const DERIVED: Derived = Derived { schema: SCHEMA, apply, at_start: "" };

const SCHEMA: &str = "
CREATE TEMP TABLE IF NOT EXISTS sab_pending (
    request_id         TEXT    PRIMARY KEY,
    seq                INTEGER NOT NULL,
    pending            TEXT    NOT NULL,
    approvals          TEXT    NOT NULL,
    approvals_required INTEGER NOT NULL,
    approvers          TEXT    NOT NULL
);
";

/// What the other records say of a request.
#[derive(Deserialize)]
struct Step {
    request_id: String,
    #[serde(default)]
    decision: Option<String>,
    #[serde(default)]
    verdict: Option<String>,
    #[serde(default)]
    accepted: bool,
    #[serde(default)]
    approver: Option<String>,
    #[serde(default)]
    at: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    approvals_required: u32,
    #[serde(default)]
    approvers: Vec<String>,
}

/// How one record changes the requests awaiting approvals.
pub fn apply(conn: &Connection, record: &StoredRecord) -> Result<()> {
    match record.kind.as_str() {
        PENDING_KIND => {
            let pending: PendingRecord = serde_json::from_str(&record.body)?;
            conn.prepare_cached(
                "INSERT OR REPLACE INTO sab_pending (request_id, seq, pending, approvals, approvals_required, approvers)
                 VALUES (?1, ?2, ?3, '[]', ?4, ?5)",
            )?
            .execute(params![
                pending.request_id,
                record.seq,
                record.body,
                pending.approvals_required,
                serde_json::to_string(&pending.approvers)?
            ])?;
        }
        APPROVAL_KIND | DECISION_KIND | EXPIRY_KIND => {
            let step: Step = serde_json::from_str(&record.body)?;
            let approvals: Option<String> = conn
                .prepare_cached("SELECT approvals FROM sab_pending WHERE request_id = ?1")?
                .query_row([&step.request_id], |row| row.get(0))
                .optional()?;
            let Some(approvals) = approvals else { return Ok(()) };
            match (record.kind.as_str(), step.decision.as_deref(), step.verdict.as_deref()) {
                (APPROVAL_KIND, _, Some("approve")) if step.accepted => {
                    let mut approvals: Vec<Approval> = serde_json::from_str(&approvals)?;
                    approvals.push(Approval {
                        approver: step.approver.unwrap_or_default(),
                        at: step.at.unwrap_or_default(),
                        reason: step.reason,
                    });
                    conn.prepare_cached("UPDATE sab_pending SET approvals = ?2 WHERE request_id = ?1")?
                        .execute(params![step.request_id, serde_json::to_string(&approvals)?])?;
                }
                (APPROVAL_KIND, _, _) if !step.accepted => {}
                // Approvals counted, but the policies now in force ask for others.
                (DECISION_KIND, Some("pending"), _) => {
                    conn.prepare_cached(
                        "UPDATE sab_pending SET approvals_required = ?2, approvers = ?3 WHERE request_id = ?1",
                    )?
                    .execute(params![
                        step.request_id,
                        step.approvals_required,
                        serde_json::to_string(&step.approvers)?
                    ])?;
                }
                // Denied, issued, refused or expired: no longer awaiting anything.
                _ => {
                    conn.prepare_cached("DELETE FROM sab_pending WHERE request_id = ?1")?
                        .execute([&step.request_id])?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// The requests awaiting approvals, oldest first.
pub fn load(conn: &Connection) -> Result<Vec<Entry>> {
    let mut statement =
        conn.prepare("SELECT seq, pending, approvals, approvals_required, approvers FROM sab_pending ORDER BY seq")?;
    let rows = statement.query_map([], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, u32>(3)?,
            row.get::<_, String>(4)?,
        ))
    })?;
    let mut entries = Vec::new();
    for row in rows {
        let (seq, pending, approvals, approvals_required, approvers) = row?;
        let entry = (|| {
            let bytes = pending.len();
            let pending: PendingRecord = serde_json::from_str(&pending)?;
            let expires = humantime::parse_rfc3339(&pending.expires_at)
                .with_context(|| format!("expires_at `{}`", pending.expires_at))?;
            Ok::<_, anyhow::Error>(Entry {
                id: pending.request_id,
                requester: pending.requester,
                draft: Draft {
                    request: pending.request,
                    precondition: pending.precondition,
                    live_state_digest: pending.live_state.as_ref().map(digest_of),
                    live_state: pending.live_state,
                    intent: pending.intent,
                },
                bytes,
                expires,
                status: Status::Pending,
                approvals: serde_json::from_str(&approvals)?,
                approvals_required,
                approvers: serde_json::from_str(&approvers)?,
                reasons: Vec::new(),
                issued: None,
            })
        })()
        .with_context(|| format!("the pending request of record {seq}"))?;
        entries.push(entry);
    }
    Ok(entries)
}

/// The deadline as the record holds it: exact, so a restart neither shortens nor extends it.
pub fn format_deadline(deadline: SystemTime) -> String {
    humantime::format_rfc3339_nanos(deadline).to_string()
}
