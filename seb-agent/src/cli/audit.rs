//! `seb-agent audit`: reading and verifying the audit store, offline.

use std::{io::Write, path::Path};

use anyhow::{Context, Result, bail};
use serde_json::json;
use tracing::warn;

use super::output::{Output, Stdout, printable};
use crate::{
    admission::{
        DECISION_KIND,
        state::{EPOCH_KIND, REVOCATION_KIND},
    },
    audit::{AuditStore, CheckedReader, Record, denial, format_time, head, keys, ledger::CHECKPOINT_KIND, verify},
    denial_budget::SUPPRESSED_KIND,
    execute::OUTCOME_KIND,
    recorder::RING_LOSS_KIND,
    sab,
    server::handlers::{READ_KIND, REFUSAL_KIND},
    tamper,
};

/// Every kind of record the broker and the SAB write.
pub const KINDS: [&str; 22] = [
    DECISION_KIND,
    OUTCOME_KIND,
    READ_KIND,
    crate::server::read_records::SUPPRESSED_KIND,
    REFUSAL_KIND,
    EPOCH_KIND,
    REVOCATION_KIND,
    denial::KIND,
    SUPPRESSED_KIND,
    crate::denial_backlog::UNWRITTEN_KIND,
    crate::admission::refusals::SUPPRESSED_KIND,
    RING_LOSS_KIND,
    tamper::KIND,
    CHECKPOINT_KIND,
    sab::records::CERTIFY_KIND,
    sab::records::DECISION_KIND,
    sab::records::PENDING_KIND,
    sab::records::APPROVAL_KIND,
    sab::records::ISSUANCE_KIND,
    sab::records::EXPIRY_KIND,
    sab::records::POLICY_KIND,
    sab::records::REFUSALS_SUPPRESSED_KIND,
];

/// A `--kind` the broker never writes would list nothing, silently: refuse it.
fn check_kind(kind: &str) -> Result<()> {
    if !KINDS.contains(&kind) {
        bail!("there is no record kind `{kind}`; the kinds are {}", KINDS.join(", "));
    }
    Ok(())
}

const PAGE: usize = 1000;

fn record_json(record: &Record) -> serde_json::Value {
    let body: serde_json::Value =
        serde_json::from_str(&record.body).unwrap_or(serde_json::Value::String(record.body.clone()));
    json!({"seq": record.seq, "kind": record.kind, "time": format_time(record.time_ns), "body": body})
}

/// Where `audit follow` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// After this sequence number (the last one a reader has): nothing twice, nothing missed.
    Seq(i64),
    /// From the first record written at or after this time (nanoseconds since the epoch).
    TimeNs(i64),
}

impl std::str::FromStr for Since {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Ok(seq) = text.parse::<i64>() {
            return if seq >= 0 { Ok(Self::Seq(seq)) } else { Err("a sequence number is not negative".into()) };
        }
        let time = humantime::parse_rfc3339_weak(text)
            .map_err(|_| format!("`{text}` is neither a record sequence number nor an RFC 3339 time"))?;
        let ns = time.duration_since(std::time::UNIX_EPOCH).map_err(|_| format!("`{text}` is before 1970"))?;
        Ok(Self::TimeNs(i64::try_from(ns.as_nanos()).map_err(|_| format!("`{text}` is too far ahead"))?))
    }
}

/// How long `audit follow` waits before looking for new records again.
const FOLLOW_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// Every record (or those of one kind), oldest first.
pub fn list(database: &Path, kind: Option<&str>, output: Output) -> Result<()> {
    print_records(database, kind, Since::Seq(0), false, output)
}

/// Every record after `since`, then each new one as it is written, until stopped.
pub fn follow(database: &Path, kind: Option<&str>, since: Since, output: Output) -> Result<()> {
    print_records(database, kind, since, true, output)
}

/// Print records as they are read, each checked to link to the one before it
/// ([`CheckedReader`]). Signatures are `audit verify`'s.
fn print_records(database: &Path, kind: Option<&str>, since: Since, follow: bool, output: Output) -> Result<()> {
    kind.map(check_kind).transpose()?;
    let store = AuditStore::open_read_only(database)?;
    let mut out = Stdout::lock();
    let (after, mut from_time) = match since {
        Since::Seq(seq) => (seq, None),
        Since::TimeNs(time_ns) => (0, Some(time_ns)),
    };
    let mut reader = CheckedReader::after(&store, after)?;
    loop {
        // Sequence numbers are given in commit order by the one writer, so reading after the
        // last one printed misses nothing and repeats nothing.
        let records = reader.next_page(PAGE)?;
        for stored in &records {
            if kind.is_some_and(|kind| stored.kind != kind) || from_time.is_some_and(|time_ns| stored.time_ns < time_ns)
            {
                continue;
            }
            from_time = None;
            let record = &Record::from(stored);
            if output.json {
                let mut line = record_json(record);
                line["hash"] = json!(hex::encode(&stored.hash));
                line["prev_hash"] = json!(hex::encode(&stored.prev_hash));
                line["signature"] = json!(hex::encode(&stored.signature));
                writeln!(out, "{line}")?;
            } else {
                let line = format!(
                    "{:>8}  {}  {:<14}  {}",
                    record.seq,
                    format_time(record.time_ns),
                    record.kind,
                    summary(record)
                );
                writeln!(out, "{}", printable(&line))?;
            }
        }
        out.flush()?;
        if records.len() == PAGE {
            continue;
        }
        if !follow {
            return reader.intact();
        }
        std::thread::sleep(FOLLOW_INTERVAL);
    }
}

fn summary(record: &Record) -> String {
    let body: serde_json::Value = serde_json::from_str(&record.body).unwrap_or_default();
    match record.kind.as_str() {
        "decision" => format!(
            "{} {} {} {} (decision {})",
            if body["admitted"] == true { "ADMIT" } else { "DENY " },
            body["reason"].as_str().unwrap_or("?"),
            body["request"]["operation"].as_str().unwrap_or("?"),
            body["request"]["target"].as_str().unwrap_or("?"),
            body["decision_id"].as_str().unwrap_or("?"),
        ),
        "kernel_denial" => format!(
            "{} {}:{} {} by {} (pid {})",
            body["hook"].as_str().unwrap_or("?"),
            body["address"].as_str().unwrap_or("?"),
            body["port"],
            body["protocol"].as_str().unwrap_or("?"),
            body["comm"].as_str().unwrap_or("-"),
            body["tgid"],
        ),
        "outcome" => format!(
            "{} HTTP {} as {} for decision {} (record {})",
            body["status"].as_str().unwrap_or("?").to_uppercase(),
            body["api_status"],
            body["identity"]["role_session_name"].as_str().unwrap_or("-"),
            body["decision_id"].as_str().unwrap_or("?"),
            body["decision_seq"],
        ),
        _ => record.body.clone(),
    }
}

pub fn show(database: &Path, seq: i64, output: Output) -> Result<()> {
    let store = AuditStore::open_read_only(database)?;
    let Some(record) = store.get(seq)? else { bail!("there is no record {seq}") };
    let value = record_json(&record);
    output.show(&value, |out| {
        writeln!(out, "record {} ({}) at {}", record.seq, printable(&record.kind), format_time(record.time_ns))?;
        writeln!(out, "{}", serde_json::to_string_pretty(&value["body"]).map_err(std::io::Error::other)?)
    })
}

/// Every record with its chain fields, one JSON object per line: enough to verify
/// elsewhere, and to keep as an external witness of the chain's head.
pub fn export(database: &Path) -> Result<()> {
    let store = AuditStore::open_read_only(database)?;
    let mut out = Stdout::lock();
    store.for_each_stored(|record| {
        let record = record.map_err(|e| anyhow::anyhow!("record {}: cannot be read: {}", e.seq, e.problem))?;
        writeln!(
            out,
            "{}",
            json!({
                "seq": record.seq, "kind": record.kind, "time_ns": record.time_ns, "body": record.body,
                "prev_hash": hex::encode(&record.prev_hash), "hash": hex::encode(&record.hash),
                "signature": hex::encode(&record.signature),
            })
        )?;
        Ok(true)
    })
}

/// Verify the chain, and against the head file when given; `Ok(false)` when it is broken
/// (the first bad record is printed). The report names the key it verified with; with
/// `expected_key`, any other key is refused before the store is read.
pub fn verify(
    database: &Path,
    public_key: &Path,
    expected_key: Option<&str>,
    head_file: Option<&Path>,
    output: Output,
) -> Result<bool> {
    let key = keys::load_public(public_key)?;
    let key_hex = hex::encode(key.to_bytes());
    if let Some(expected) = expected_key
        && !expected.trim().eq_ignore_ascii_case(&key_hex)
    {
        bail!(
            "the public key {} is {key_hex}, not the expected {}: the records are not verified against a key              that is not the broker's",
            public_key.display(),
            expected.trim()
        );
    }
    let trusted = match head_file {
        Some(path) => {
            Some(head::read(path, &key)?.with_context(|| format!("the head file {} does not exist", path.display()))?)
        }
        None => None,
    };
    let store = AuditStore::open_read_only(database)?;
    let outcome = verify::verify(&store, &key, trusted)?;
    let report = match &outcome {
        Ok(verified) => json!({
            "ok": true, "public_key": key_hex, "public_key_file": public_key, "key_expected": expected_key.is_some(),
            "records": verified.records, "checkpoints": verified.checkpoints,
            "signed_heads": verified.signed_heads, "head_hash": verified.head_hash,
            "head_file_seq": verified.head_file_seq, "newest_records_checked": verified.head_file_seq.is_some(),
        }),
        Err(failure) => json!({"ok": false, "first_bad_record": failure.seq, "problem": failure.problem()}),
    };
    output.show(&report, |out| match &outcome {
        Ok(v) => {
            let newest = match v.head_file_seq {
                Some(seq) => format!("holds the head file's record {seq}"),
                None => "no head file given: removal of the newest records is not checked".into(),
            };
            let key = if expected_key.is_some() {
                format!("the expected key {key_hex}")
            } else {
                format!(
                    "key {key_hex} read from {} (check it against a copy kept off the node, or give --expect-key)",
                    public_key.display()
                )
            };
            writeln!(
                out,
                "audit chain OK: {} records in {} signed groups, {} checkpoints, head {}; {newest}; signed by {key}",
                v.records, v.signed_heads, v.checkpoints, v.head_hash
            )
        }
        Err(failure) => writeln!(out, "audit chain BROKEN at record {}: {}", failure.seq, failure.problem()),
    })?;
    Ok(outcome.is_ok())
}

/// Verify the store fully and record its head as the trusted one. A store that does not
/// hold the head already trusted (cut, or another store) is adopted only with `force`:
/// adopting it would complete a rollback (used serials and revocations forgotten). So
/// is any store when no head can be read (missing or damaged): nothing then says it was
/// not cut.
pub fn adopt(database: &Path, signing_key: &Path, force: bool) -> Result<()> {
    let key = keys::load(signing_key)?;
    let path = head::path_for(signing_key);
    let previous = match head::read(&path, &key.verifying_key()) {
        Ok(Some(head)) => Some(head),
        Ok(None) if force => None,
        Ok(None) => bail!(
            "there is no head file {}, so nothing shows that the store {} was not cut: not adopted. For a store \
             written by a version without head files, or a deliberate recovery, `--force` adopts it",
            path.display(),
            database.display()
        ),
        Err(e) if force => {
            warn!(head_file = %path.display(), error = %format!("{e:#}"), "the head file is unreadable; adopting anyway");
            None
        }
        Err(e) => {
            return Err(e.context(format!(
                "the head file {} cannot be trusted, so nothing shows that the store was not cut: not adopted \
                 (`--force` adopts it anyway)",
                path.display()
            )));
        }
    };
    let store = AuditStore::open_read_only(database)?;
    let verified = match verify::verify(&store, &key.verifying_key(), None)? {
        Ok(verified) => verified,
        Err(failure) => bail!("the audit store {} fails verification at {failure}: not adopted", database.display()),
    };
    if let Some(previous) = previous.filter(|_| !force)
        && let Err(failure) = verify::verify(&store, &key.verifying_key(), Some(previous))?
    {
        bail!(
            "the audit store {} does not hold the head the broker trusts (record {}): {failure}. Adopting it would \
             roll the node back (used serials and revocations forgotten); not adopted. `--force` adopts it anyway",
            database.display(),
            previous.seq
        );
    }
    head::write(&path, &verified.head, &key, head::Flush::Now)?;
    let replaced = previous.map_or("none".into(), |h| format!("record {} ({})", h.seq, hex::encode(h.hash)));
    warn!(
        database = %database.display(),
        head_file = %path.display(),
        records = verified.records,
        head = %verified.head_hash,
        replaced_head = %replaced,
        "audit store adopted: its current head is now the trusted one"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_cut_behind_the_trusted_head_is_adopted_only_with_force() {
        use crate::audit::{Derived, Ledger, LedgerFiles};
        let dir = tempfile::tempdir().unwrap();
        let signing_key = dir.path().join("broker.key");
        let key = keys::load_or_create(&signing_key).unwrap();
        let files = LedgerFiles { database: dir.path().join("audit.db"), head: head::path_for(&signing_key) };
        head::write(&files.head, &crate::audit::chain::Head::EMPTY, &key, head::Flush::Now).unwrap();
        let (ledger, thread) = Ledger::start(&files, key, Derived::NOTHING).unwrap();
        for i in 0..3 {
            ledger.run_blocking(move |batch| batch.append("test", 1, &i)).unwrap();
        }
        drop(ledger);
        thread.join().unwrap();
        adopt(&files.database, &signing_key, false).expect("a store holding its head is adopted");
        let conn = rusqlite::Connection::open(&files.database).unwrap();
        conn.execute("DELETE FROM records WHERE seq = 3", []).unwrap();
        drop(conn);
        let error = format!("{:#}", adopt(&files.database, &signing_key, false).unwrap_err());
        assert!(error.contains("does not hold the head the broker trusts (record 3)"), "{error}");
        adopt(&files.database, &signing_key, true).expect("--force adopts it");
        // No head file (deleted, as the broker's own refusal would then suggest adopt).
        std::fs::remove_file(&files.head).unwrap();
        let error = format!("{:#}", adopt(&files.database, &signing_key, false).unwrap_err());
        assert!(error.contains("there is no head file"), "{error}");
        adopt(&files.database, &signing_key, true).expect("--force adopts it");
        // A damaged one.
        std::fs::write(&files.head, b"garbage").unwrap();
        let error = format!("{:#}", adopt(&files.database, &signing_key, false).unwrap_err());
        assert!(error.contains("cannot be trusted"), "{error}");
    }

    #[test]
    fn every_summary_kind_can_be_listed_and_no_kind_twice() {
        for kind in ["denials_suppressed", "refusals_suppressed", "reads_suppressed", "sab_refusals_suppressed"] {
            check_kind(kind).unwrap();
        }
        assert!(check_kind("suppressed").is_err());
        let distinct: std::collections::BTreeSet<_> = KINDS.iter().collect();
        assert_eq!(distinct.len(), KINDS.len());
    }

    #[test]
    fn since_is_a_sequence_number_or_a_time() {
        assert_eq!("42".parse(), Ok(Since::Seq(42)));
        assert_eq!("1970-01-01T00:00:01Z".parse(), Ok(Since::TimeNs(1_000_000_000)));
        assert!("-1".parse::<Since>().is_err());
        let error = "yesterday".parse::<Since>().unwrap_err();
        assert!(error.contains("`yesterday`"), "{error}");
    }
}
