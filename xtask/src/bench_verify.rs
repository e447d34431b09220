//! `cargo xtask bench verify`: records per second of `seb-agent audit verify` (the release
//! binary, every signature checked, the head file given) over a 100,000-record store.
//!
//! Two stores are written through the broker's own ledger:
//! - **busy**: 64 writers at once, the way a loaded broker writes, so many records share a
//!   group commit and its one signed head;
//! - **quiet**: one writer, each record committed (and so signed) alone: the worst case
//!   for the verifier, one signature per record.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, ensure};
use seb_agent::audit::{Ledger, LedgerFiles, keys};
use serde_json::{Value, json};

use crate::stats::median;

const BUSY_RECORDS: usize = 100_000;
const QUIET_RECORDS: usize = 10_000;
const WRITERS: usize = 64;
const RUNS: usize = 5;
const TARGET_PER_SECOND: f64 = 100_000.0;

pub fn run() -> Result<()> {
    let tools = crate::release_tools()?;
    let dir = tempfile_dir()?;
    let result = measure(&tools.agent, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let (busy, quiet) = result?;
    let per_second = busy["records_per_second"].as_f64().unwrap_or(0.0);
    let verified = busy["ok"] == true && quiet["ok"] == true;
    let report = json!({
        "bench": "verify",
        "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
        "what": "wall time of `seb-agent audit verify --json --head` (release), every record's hash and link \
                 and every signed group head checked; median of runs",
        "busy": busy,
        "quiet": quiet,
        "target_records_per_second": TARGET_PER_SECOND,
        "meets_target": per_second >= TARGET_PER_SECOND,
    });
    crate::stats::publish("verify", &report)?;
    ensure!(verified, "audit verify refused a store the ledger wrote");
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("seb-bench-verify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn measure(agent: &Path, dir: &Path) -> Result<(Value, Value)> {
    eprintln!("xtask: writing {BUSY_RECORDS} records from {WRITERS} writers at once");
    let busy = write_store(&dir.join("busy"), BUSY_RECORDS, WRITERS)?;
    eprintln!("xtask: writing {QUIET_RECORDS} records from one writer, one commit each");
    let quiet = write_store(&dir.join("quiet"), QUIET_RECORDS, 1)?;
    Ok((time_verify(agent, &busy)?, time_verify(agent, &quiet)?))
}

/// A store's files.
struct Store {
    database: PathBuf,
    key: PathBuf,
    records: usize,
}

/// `records` decision-sized records, appended by `writers` concurrent writers through the
/// broker's ledger.
fn write_store(dir: &Path, records: usize, writers: usize) -> Result<Store> {
    let key_path = dir.join("broker.key");
    let key = keys::load_or_create(&key_path)?;
    let database = dir.join("audit.db");
    let (ledger, thread) =
        Ledger::start(&LedgerFiles::new(&database, &key_path), key, seb_agent::admission::state::DERIVED)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let tasks: Vec<_> = (0..writers)
            .map(|writer| {
                let ledger = ledger.clone();
                let count = records / writers + usize::from(writer < records % writers);
                tokio::spawn(async move {
                    for i in 0..count {
                        let body = decision_body(writer, i);
                        ledger.run(move |batch| batch.append("decision", seb_agent::audit::now_ns(), &body)).await?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        anyhow::Ok(())
    })?;
    drop(ledger);
    thread.join().map_err(|_| anyhow::anyhow!("the ledger thread panicked"))?;
    Ok(Store { database, key: key_path, records })
}

/// A body shaped and sized like an admission decision record.
fn decision_body(writer: usize, i: usize) -> Value {
    json!({
        "decision_id": format!("{writer:08x}-0000-4000-8000-{i:012x}"),
        "admitted": true,
        "reason": "admitted",
        "message": "every admission predicate holds",
        "caller": {"uid": 0, "gid": 0, "pid": 4242, "exe": "/usr/local/bin/agent",
                   "cgroup": "/kubepods.slice/kubepods-besteffort.slice/agent.scope", "pod_uid": null},
        "serial": format!("{writer:016x}{i:016x}"),
        "contract_id": "c-bench",
        "request": {"provider": "aws", "operation": "s3:PutObject", "target": "arn:aws:s3:::seb-bench/object",
                    "digest": "sha256:6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b"},
        "identity": {"aws_role": {"role_arn": "arn:aws:iam::123456789012:role/seb-bench"}},
        "active_epochs": {"policy": 1, "revocation": 1},
    })
}

/// Run the verifier `RUNS` times; records/s from the median wall time.
fn time_verify(agent: &Path, store: &Store) -> Result<Value> {
    let public = keys::public_key_path(&store.key);
    let head = seb_agent::audit::head::path_for(&store.key);
    let mut seconds = Vec::new();
    let mut report = Value::Null;
    for _ in 0..RUNS {
        let started = Instant::now();
        let output = Command::new(agent)
            .args(["audit", "verify", "--json", "--database"])
            .arg(&store.database)
            .arg("--public-key")
            .arg(&public)
            .arg("--head")
            .arg(&head)
            .output()
            .context("running seb-agent audit verify")?;
        seconds.push(started.elapsed().as_secs_f64());
        report = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        if !output.status.success() {
            // Reported, not fatal yet: an older verifier (SEB_BENCH_BINARIES) may know only
            // one signature per record.
            return Ok(json!({"ok": false, "report": report, "stderr": String::from_utf8_lossy(&output.stderr)}));
        }
    }
    let verified = report["records"].as_u64().unwrap_or(0);
    ensure!(verified as usize >= store.records, "verify saw {verified} records, {} were written", store.records);
    let median_s = median(&seconds);
    let signed = signed_heads(&store.database)?;
    Ok(json!({
        "ok": true,
        "records": verified,
        "signed_group_heads": signed,
        "records_per_signature": verified as f64 / signed.max(1) as f64,
        "seconds_median": median_s,
        "seconds_min": seconds.iter().copied().fold(f64::INFINITY, f64::min),
        "records_per_second": verified as f64 / median_s,
    }))
}

/// Records that carry a signature (group heads).
fn signed_heads(database: &Path) -> Result<u64> {
    let conn = rusqlite::Connection::open_with_flags(database, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    Ok(conn.query_row("SELECT count(*) FROM records WHERE length(signature) > 0", [], |row| row.get(0))?)
}
