//! `seb-agent audit`: reading and verifying the audit store, offline.

use std::{io::Write, path::Path};

use anyhow::{Context, Result, bail};
use serde_json::json;
use tracing::warn;

use crate::audit::{AuditStore, Record, format_time, head, keys, verify};

const PAGE: usize = 1000;

fn record_json(record: &Record) -> serde_json::Value {
    let body: serde_json::Value =
        serde_json::from_str(&record.body).unwrap_or(serde_json::Value::String(record.body.clone()));
    json!({"seq": record.seq, "kind": record.kind, "time": format_time(record.time_ns), "body": body})
}

/// Every record (or those of one kind), oldest first.
pub fn list(database: &Path, kind: Option<&str>, json: bool) -> Result<()> {
    let store = AuditStore::open_read_only(database)?;
    let mut out = std::io::stdout().lock();
    let mut after = 0;
    loop {
        let records = store.records_after(kind, after, PAGE)?;
        for record in &records {
            if json {
                writeln!(out, "{}", record_json(record))?;
            } else {
                writeln!(
                    out,
                    "{:>8}  {}  {:<14}  {}",
                    record.seq,
                    format_time(record.time_ns),
                    record.kind,
                    summary(record)
                )?;
            }
            after = record.seq;
        }
        if records.len() < PAGE {
            return Ok(());
        }
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

pub fn show(database: &Path, seq: i64) -> Result<()> {
    let store = AuditStore::open_read_only(database)?;
    let Some(record) = store.get(seq)? else { bail!("there is no record {seq}") };
    println!("{}", serde_json::to_string_pretty(&record_json(&record))?);
    Ok(())
}

/// Every record with its chain fields, one JSON object per line: enough to verify
/// elsewhere, and to keep as an external witness of the chain's head.
pub fn export(database: &Path) -> Result<()> {
    let store = AuditStore::open_read_only(database)?;
    let mut out = std::io::stdout().lock();
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
/// (the first bad record is printed).
pub fn verify(database: &Path, public_key: &Path, head_file: Option<&Path>, json: bool) -> Result<bool> {
    let key = keys::load_public(public_key)?;
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
            "ok": true, "records": verified.records, "checkpoints": verified.checkpoints,
            "head_hash": verified.head_hash, "head_file_seq": verified.head_file_seq,
        }),
        Err(failure) => json!({"ok": false, "first_bad_record": failure.seq, "problem": failure.fault.to_string()}),
    };
    if json {
        println!("{report}");
    } else {
        match &outcome {
            Ok(v) => {
                let newest = match v.head_file_seq {
                    Some(seq) => format!("holds the head file's record {seq}"),
                    None => "no head file given: removal of the newest records is not checked".into(),
                };
                println!(
                    "audit chain OK: {} records, {} checkpoints, head {}; {newest}",
                    v.records, v.checkpoints, v.head_hash
                )
            }
            Err(failure) => println!("audit chain BROKEN at record {}: {}", failure.seq, failure.fault),
        }
    }
    Ok(outcome.is_ok())
}

/// Verify the store fully and record its head as the trusted one.
pub fn adopt(database: &Path, signing_key: &Path) -> Result<()> {
    let key = keys::load(signing_key)?;
    let path = head::path_for(signing_key);
    let previous = head::read(&path, &key.verifying_key()).ok().flatten();
    let store = AuditStore::open_read_only(database)?;
    let verified = match verify::verify(&store, &key.verifying_key(), None)? {
        Ok(verified) => verified,
        Err(failure) => bail!("the audit store {} fails verification at {failure}: not adopted", database.display()),
    };
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
