//! Admission state: epochs, revocations and used serials. Derived from the signed audit
//! records alone: rebuilt from the verified chain at each start, into temporary tables
//! of the ledger's connection that no other process can reach, and changed only by
//! the jobs that append the records it derives from. Read and written only inside
//! ledger transactions, so every admission sees every change committed before it.

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::{DECISION_KIND, Reason, Rejection};
use crate::{
    audit::{Batch, chain::StoredRecord, ledger::Derived, now_ns},
    cert::{Verified, ijson::MAX_SAFE_INTEGER},
};

pub const EPOCH_KIND: &str = "epoch_change";
pub const REVOCATION_KIND: &str = "revocation";

/// Tables of these names in the store file (where earlier versions kept the state,
/// outside the signed chain) are dropped.
const SCHEMA: &str = "
DROP TABLE IF EXISTS main.used_serials;
DROP TABLE IF EXISTS main.revoked;
DROP TABLE IF EXISTS main.epochs;
CREATE TEMP TABLE used_serials (
    serial       TEXT PRIMARY KEY,
    decision_seq INTEGER NOT NULL
);
CREATE TEMP TABLE revoked (
    kind       TEXT    NOT NULL,
    value      TEXT    NOT NULL,
    record_seq INTEGER NOT NULL,
    PRIMARY KEY (kind, value)
);
CREATE TEMP TABLE epochs (
    name       TEXT PRIMARY KEY,
    value      INTEGER NOT NULL,
    record_seq INTEGER NOT NULL
);
";

/// The admission state, for [`crate::audit::Ledger::start`].
pub const DERIVED: Derived = Derived { schema: SCHEMA, apply, at_start: "" };

/// What an epoch change record holds.
#[derive(Debug, Serialize, Deserialize)]
struct EpochChange {
    previous: Epochs,
    current: Epochs,
}

/// What a revocation record holds.
#[derive(Debug, Serialize, Deserialize)]
struct Revocation {
    target: RevocationTarget,
    value: String,
    reason: String,
}

/// The part of a decision record the state derives from.
#[derive(Debug, Deserialize)]
struct Consumption {
    admitted: bool,
    serial: Option<String>,
}

/// Change the state as `record` says; the one place a record becomes state, at start
/// and while running.
fn apply(conn: &Connection, record: &StoredRecord) -> Result<()> {
    let parse_error = || format!("record {} is not a readable {}", record.seq, record.kind);
    match record.kind.as_str() {
        DECISION_KIND => {
            let decision: Consumption = serde_json::from_str(&record.body).with_context(parse_error)?;
            if let (true, Some(serial)) = (decision.admitted, decision.serial) {
                conn.prepare_cached("INSERT OR IGNORE INTO used_serials (serial, decision_seq) VALUES (?1, ?2)")?
                    .execute(params![serial, record.seq])?;
            }
        }
        EPOCH_KIND => {
            let change: EpochChange = serde_json::from_str(&record.body).with_context(parse_error)?;
            for (name, value) in [("policy", change.current.policy), ("revocation", change.current.revocation)] {
                if let Some(value) = value {
                    conn.prepare_cached(
                        "INSERT INTO epochs (name, value, record_seq) VALUES (?1, ?2, ?3)
                         ON CONFLICT(name) DO UPDATE SET value = excluded.value, record_seq = excluded.record_seq",
                    )?
                    .execute(params![name, value as i64, record.seq])?;
                }
            }
        }
        REVOCATION_KIND => {
            let revocation: Revocation = serde_json::from_str(&record.body).with_context(parse_error)?;
            // In today's spelling: a serial recorded by an older version without the `00`
            // DER gives a leading byte of 0x80 or more matched no certificate.
            let value = normalise(revocation.target, &revocation.value).unwrap_or(revocation.value);
            conn.prepare_cached("INSERT OR IGNORE INTO revoked (kind, value, record_seq) VALUES (?1, ?2, ?3)")?
                .execute(params![revocation.target.column(), value, record.seq])?;
        }
        _ => {}
    }
    Ok(())
}

/// Append a record and apply it to the state, in the same savepoint.
fn append_applied<T: Serialize>(batch: &mut Batch<'_>, kind: &str, body: &T) -> Result<i64> {
    let record = batch.append_record(kind, now_ns(), body)?;
    apply(batch.conn(), &record)?;
    Ok(record.seq)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epochs {
    pub policy: Option<u64>,
    pub revocation: Option<u64>,
}

pub fn epochs(conn: &Connection) -> Result<Epochs> {
    let get = |name: &str| -> Result<Option<u64>> {
        Ok(conn
            .prepare_cached("SELECT value FROM epochs WHERE name = ?1")?
            .query_row([name], |row| row.get::<_, i64>(0))
            .optional()?
            .map(|v| v as u64))
    };
    Ok(Epochs { policy: get("policy")?, revocation: get("revocation")? })
}

/// Set epochs. Both only move forward: going back would revive certificates the SAB
/// retired (a revocation epoch they are behind, a policy epoch since changed). Both stay
/// within what a contract can carry (I-JSON integers): one past it would make every
/// certificate stale for good.
pub fn set_epochs(batch: &mut Batch<'_>, policy: Option<u64>, revocation: Option<u64>) -> Result<Epochs> {
    let current = epochs(batch.conn())?;
    for (name, new, old) in [("policy", policy, current.policy), ("revocation", revocation, current.revocation)] {
        if let Some(new) = new {
            check_epoch(name, old, new)?;
        }
    }
    let next = Epochs { policy: policy.or(current.policy), revocation: revocation.or(current.revocation) };
    append_applied(batch, EPOCH_KIND, &EpochChange { previous: current, current: next })?;
    Ok(next)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationTarget {
    Serial,
    ContractId,
}

impl RevocationTarget {
    fn column(self) -> &'static str {
        match self {
            Self::Serial => "serial",
            Self::ContractId => "contract_id",
        }
    }
}

pub fn revoke(batch: &mut Batch<'_>, target: RevocationTarget, value: &str, reason: &str) -> Result<i64> {
    let revocation = Revocation { target, value: normalise(target, value)?, reason: reason.into() };
    append_applied(batch, REVOCATION_KIND, &revocation)
}

/// A revocation state to converge to, from the cluster's `SebRevocation`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationState {
    pub epoch: u64,
    pub serials: Vec<String>,
    pub contract_ids: Vec<String>,
    /// Named in each record: which object, at which resourceVersion.
    pub source: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationApplied {
    pub epochs: Epochs,
    /// Serials and contract ids revoked by this update (already revoked ones are not).
    pub newly_revoked: Vec<(RevocationTarget, String)>,
    /// The state's epoch when it is behind this node's: not applied, since epochs only
    /// move forward.
    pub epoch_behind: Option<u64>,
}

/// Converge to `state` in one transaction: the epoch moves forward, and every serial and
/// contract id it lists is revoked. Nothing is un-revoked: a revocation is final.
pub fn apply_revocations(batch: &mut Batch<'_>, state: &RevocationState) -> Result<RevocationApplied> {
    let current = epochs(batch.conn())?;
    let mut applied = RevocationApplied { epochs: current, ..Default::default() };
    match current.revocation {
        Some(active) if state.epoch < active => applied.epoch_behind = Some(state.epoch),
        Some(active) if state.epoch == active => {}
        _ => applied.epochs = set_epochs(batch, None, Some(state.epoch))?,
    }
    let reason = format!("listed in {}", state.source);
    let targets = state
        .serials
        .iter()
        .map(|serial| (RevocationTarget::Serial, serial))
        .chain(state.contract_ids.iter().map(|id| (RevocationTarget::ContractId, id)));
    for (target, value) in targets {
        // A hand-written entry that names no serial revokes nothing; the others apply.
        let value = match normalise(target, value) {
            Ok(value) => value,
            Err(e) => {
                tracing::warn!(source = %state.source, error = %format!("{e:#}"), "a listed serial was skipped");
                continue;
            }
        };
        if !is_revoked(batch.conn(), target, &value)? {
            revoke(batch, target, &value, &reason)?;
            applied.newly_revoked.push((target, value));
        }
    }
    Ok(applied)
}

/// Whether epoch `name` may go from `old` to `new`: forward only, within what a contract
/// can carry.
fn check_epoch(name: &str, old: Option<u64>, new: u64) -> Result<()> {
    if new > MAX_SAFE_INTEGER {
        bail!("the {name} epoch {new} is beyond what a contract can carry ({MAX_SAFE_INTEGER})");
    }
    if let Some(old) = old
        && new < old
    {
        bail!("the {name} epoch only moves forward: it is {old}, {new} was asked");
    }
    Ok(())
}

/// Whether the policy epoch may become `policy` (see [`set_epochs`]).
pub fn check_policy_epoch(current: Epochs, policy: u64) -> Result<()> {
    check_epoch("policy", current.policy, policy)
}

/// Set the policy epoch if it differs; returns the epochs in force.
pub fn apply_policy_epoch(batch: &mut Batch<'_>, policy: u64) -> Result<Epochs> {
    let current = epochs(batch.conn())?;
    if current.policy == Some(policy) {
        return Ok(current);
    }
    set_epochs(batch, Some(policy), None)
}

/// A serial as the broker compares it: the hex of its DER integer's content bytes, as a
/// certificate's `raw_serial` is (lower case, minimal, with the `00` a leading byte of
/// 0x80 or more takes), written with or without `0x`, `:` or spaces between bytes, the
/// leading `00` or either case. Anything else is an error, never a serial: dropping
/// what is not hex would have made `4660 (0x1234)` revoke `466001234`. Contract ids are
/// as written.
pub fn normalise(target: RevocationTarget, value: &str) -> Result<String> {
    let RevocationTarget::Serial = target else { return Ok(value.to_string()) };
    let trimmed = value.trim();
    let digits = trimmed.strip_prefix("0x").or_else(|| trimmed.strip_prefix("0X")).unwrap_or(trimmed);
    let digits: String = digits.chars().filter(|c| *c != ':' && !c.is_ascii_whitespace()).collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("`{value}` is not a serial in hex (such as 0x1a2b or 1a:2b)");
    }
    let digits = digits.to_ascii_lowercase();
    let padded = if digits.len() % 2 == 1 { format!("0{digits}") } else { digits };
    let mut bytes = hex::decode(&padded).expect("hex digits");
    let leading_zeros = bytes.iter().take(bytes.len() - 1).take_while(|b| **b == 0).count();
    bytes.drain(..leading_zeros);
    if bytes == [0] {
        bail!("`{value}` is serial 0, and serials are positive");
    }
    if bytes[0] >= 0x80 {
        bytes.insert(0, 0);
    }
    Ok(hex::encode(bytes))
}

fn is_revoked(conn: &Connection, target: RevocationTarget, value: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM revoked WHERE kind = ?1 AND value = ?2")?
        .query_row(params![target.column(), value], |_| Ok(()))
        .optional()?
        .is_some())
}

/// The stateful predicates, in order. Unknown state denies (fail closed).
pub fn check(conn: &Connection, verified: &Verified) -> Result<Result<(), Rejection>> {
    check_under(conn, epochs(conn)?, verified)
}

/// The same, with `active` the epochs just read from `conn` (for a caller that records
/// them too).
pub fn check_under(conn: &Connection, active: Epochs, verified: &Verified) -> Result<Result<(), Rejection>> {
    let contract = &verified.contract;
    let reject = |reason, message: String| Ok(Err(Rejection { reason, message }));
    let Epochs { policy: Some(policy), revocation: Some(revocation) } = active else {
        return reject(
            Reason::EpochsUnset,
            "the broker has no active policy and revocation epochs (seb-agent epoch)".into(),
        );
    };
    if contract.policy_epoch != policy {
        return reject(
            Reason::PolicyEpochMismatch,
            format!("certified under policy epoch {}, the active one is {policy}", contract.policy_epoch),
        );
    }
    if contract.revocation_epoch < revocation {
        return reject(
            Reason::RevocationEpochStale,
            format!("certified at revocation epoch {}, the active one is {revocation}", contract.revocation_epoch),
        );
    }
    if contract.revocation_epoch > revocation {
        return reject(
            Reason::RevocationStateBehind,
            format!(
                "certified at revocation epoch {}, but this broker only knows {revocation}: its revocation state may be missing entries",
                contract.revocation_epoch
            ),
        );
    }
    if is_revoked(conn, RevocationTarget::Serial, &verified.serial)? {
        return reject(Reason::SerialRevoked, format!("certificate serial {} is revoked", verified.serial));
    }
    if is_revoked(conn, RevocationTarget::ContractId, &contract.contract_id)? {
        return reject(Reason::ContractRevoked, format!("contract {} is revoked", contract.contract_id));
    }
    let used: Option<i64> = conn
        .prepare_cached("SELECT decision_seq FROM used_serials WHERE serial = ?1")?
        .query_row([&verified.serial], |row| row.get(0))
        .optional()?;
    if let Some(seq) = used {
        return reject(
            Reason::Replayed,
            format!("certificate serial {} was already used (decision record {seq})", verified.serial),
        );
    }
    Ok(Ok(()))
}

/// Record a decision; an admission consumes its serial, in the same savepoint.
pub fn record_decision<T: Serialize>(batch: &mut Batch<'_>, decision: &T) -> Result<i64> {
    append_applied(batch, DECISION_KIND, decision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_serial_is_named_one_way_whatever_its_prefix_separators_or_case() {
        let serial = |written: &str| normalise(RevocationTarget::Serial, written).map_err(|e| e.to_string());
        for written in ["0a0b0c", "0x0a0b0c", "0X0A:0B:0C", " 0a:0b:0c ", "a0b0c", "00:0a:0b:0c", "0a 0b 0c"] {
            assert_eq!(serial(written).unwrap(), "0a0b0c", "{written}");
        }
        // As DER writes it: a leading byte of 0x80 or more takes a 00, with or without it.
        for written in ["8f01", "008f01", "0x00:8F:01"] {
            assert_eq!(serial(written).unwrap(), "008f01", "{written}");
        }
        assert!(serial("00").unwrap_err().contains("serials are positive"));
        for refused in ["4660 (0x1234)", "O1", "zz", "", "0x", "12-34"] {
            assert!(serial(refused).unwrap_err().contains("is not a serial in hex"), "{refused}");
        }
        assert_eq!(normalise(RevocationTarget::ContractId, "0xC-1").unwrap(), "0xC-1", "contract ids are as written");
    }

    #[test]
    fn a_serial_normalised_is_the_certificates_raw_serial() {
        for bytes in [vec![0x01], vec![0x00, 0x80], vec![0x7f, 0xff, 0x00], vec![0x00, 0xff, 0x01, 0x02]] {
            let raw = hex::encode(&bytes);
            assert_eq!(normalise(RevocationTarget::Serial, &raw).unwrap(), raw);
        }
    }
}
