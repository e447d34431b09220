//! The audit chain against direct tampering with the SQLite file: `seb-agent audit verify`
//! must fail and name the first bad record, offline, from the file and the public key
//! (and the head file, for removed newest records); the broker must refuse to start on
//! such a store, and never admit a used certificate again.

use std::path::Path;

use rusqlite::{Connection, params};
use seb_agent::{
    admission::Reason,
    cert::{ExecutionContract, MutationRequest, contract::ScopedIdentity, dev_sab::IssueOptions},
};
use seb_sandbox::{
    Sandbox, Tools,
    broker::{Broker, certified, this_process},
};
use serde_json::Value;

fn tools() -> Tools {
    Tools::for_tests(env!("CARGO_BIN_EXE_seb-probe"))
}

/// A stopped broker whose store holds epoch, revocation, decision and kernel-denial records.
fn populated_store() -> Sandbox {
    let mut sandbox = Sandbox::new("audit", tools()).unwrap();
    sandbox.write_config("[[enforcement.protected]]\ncidr = \"127.0.0.2/32\"\n").unwrap();
    sandbox.start_agent().unwrap();
    let run = |args: &[&str]| sandbox.agent_cli(args).unwrap();
    assert!(run(&["epoch", "--policy", "1", "--revocation", "1"]).status.success());
    assert!(run(&["revoke", "--serial", "0a0b0c"]).status.success());
    let garbage = sandbox.dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let request = sandbox.dir.join("request.json");
    std::fs::write(&request, r#"{"provider":"http","operation":"POST","target":"https://api.internal/x"}"#).unwrap();
    for _ in 0..4 {
        let denied = run(&["propose", "--cert", garbage.to_str().unwrap(), "--request", request.to_str().unwrap()]);
        assert_eq!(denied.status.code(), Some(1), "{}", String::from_utf8_lossy(&denied.stderr));
    }
    let outcome = sandbox.attempt("workload", "tcp", "127.0.0.2:80").unwrap();
    assert_eq!(outcome["result"], "EPERM");
    sandbox.wait_for_denial(outcome["cookie"].as_u64().unwrap()).unwrap();
    sandbox.stop_agent().unwrap();
    sandbox
}

/// `audit verify --json` on a database file.
fn verify(sandbox: &Sandbox, database: &Path) -> (i32, Value) {
    let output = std::process::Command::new(&sandbox.tools.agent)
        .args(["audit", "verify", "--json", "--database"])
        .arg(database)
        .arg("--public-key")
        .arg(sandbox.public_key())
        .arg("--no-head")
        .output()
        .unwrap();
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
    });
    (output.status.code().unwrap_or(-1), report)
}

/// A copy of the store with `tamper` applied directly to the file.
fn tampered(sandbox: &Sandbox, name: &str, tamper: impl FnOnce(&Connection)) -> std::path::PathBuf {
    let copy = sandbox.dir.join(format!("{name}.db"));
    seb_sandbox::snapshot_store(&sandbox.database, &copy).unwrap();
    let conn = Connection::open(&copy).unwrap();
    tamper(&conn);
    drop(conn);
    copy
}

#[test]
fn verify_passes_untouched_and_names_the_first_tampered_record() {
    let sandbox = populated_store();
    let (code, report) = verify(&sandbox, &sandbox.database);
    assert_eq!(code, 0, "{report}");
    let records = report["records"].as_i64().unwrap();
    assert!(records >= 7, "{report}");
    // The report names the key it verified with; a key kept off the node can be demanded,
    // and a `.pub` replaced beside the store is then refused.
    let key = report["public_key"].as_str().expect("the key verified with").to_string();
    let expecting = |expected: &str| {
        std::process::Command::new(&sandbox.tools.agent)
            .args(["audit", "verify", "--json", "--no-head", "--expect-key", expected, "--database"])
            .arg(&sandbox.database)
            .arg("--public-key")
            .arg(sandbox.public_key())
            .output()
            .unwrap()
    };
    assert!(expecting(&key.to_uppercase()).status.success());
    let other = expecting(&"ab".repeat(32));
    let error = String::from_utf8_lossy(&other.stderr);
    assert_eq!(other.status.code(), Some(2), "{error}");
    assert!(error.contains(&format!("is {key}, not the expected {}", "ab".repeat(32))), "{error}");

    // A changed record: a denial rewritten as an admission.
    let changed = tampered(&sandbox, "changed", |c| {
        c.execute(
            "UPDATE records SET body = replace(body, '\"admitted\":false', '\"admitted\":true') WHERE seq = 4",
            [],
        )
        .unwrap();
    });
    let (code, report) = verify(&sandbox, &changed);
    assert_eq!((code, report["first_bad_record"].as_i64()), (1, Some(4)), "{report}");
    assert!(report["problem"].as_str().unwrap().contains("modified"), "{report}");

    let deleted = tampered(&sandbox, "deleted", |c| {
        c.execute("DELETE FROM records WHERE seq = 3", []).unwrap();
    });
    let (code, report) = verify(&sandbox, &deleted);
    assert_eq!((code, report["first_bad_record"].as_i64()), (1, Some(4)), "{report}");
    assert!(report["problem"].as_str().unwrap().contains("record 3 is missing"), "{report}");

    // Two records swapped, sequence numbers kept: the chain breaks at the first.
    let reordered = tampered(&sandbox, "reordered", |c| {
        c.execute_batch(
            "UPDATE records SET seq = -5 WHERE seq = 5;
             UPDATE records SET seq = 5 WHERE seq = 6;
             UPDATE records SET seq = 6 WHERE seq = -5;",
        )
        .unwrap();
    });
    let (code, report) = verify(&sandbox, &reordered);
    assert_eq!((code, report["first_bad_record"].as_i64()), (1, Some(5)), "{report}");

    // A record inserted in the middle (later ones renumbered), hashes copied from its neighbour.
    let inserted = tampered(&sandbox, "inserted", |c| {
        c.execute_batch(
            "UPDATE records SET seq = -seq WHERE seq >= 3;
             UPDATE records SET seq = -seq + 1 WHERE seq < 0;
             INSERT INTO records (seq, kind, time_ns, body, prev_hash, hash, signature)
                 SELECT 3, kind, time_ns, body, prev_hash, hash, signature FROM records WHERE seq = 4;",
        )
        .unwrap();
    });
    let (code, report) = verify(&sandbox, &inserted);
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["first_bad_record"].as_i64(), Some(4), "{report}");

    // A record appended at the end, correctly linked and hashed, but not signed by the broker.
    let appended = tampered(&sandbox, "appended", |c| {
        let (seq, hash): (i64, Vec<u8>) = c
            .query_row("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        let body = r#"{"admitted":true}"#;
        let prev: [u8; 32] = hash.clone().try_into().unwrap();
        let forged = seb_agent::audit::chain::record_hash(seq + 1, &prev, "decision", 1, body);
        c.execute(
            "INSERT INTO records (seq, kind, time_ns, body, prev_hash, hash, signature) VALUES (?1, 'decision', 1, ?2, ?3, ?4, ?5)",
            params![seq + 1, body, hash, &forged[..], &[7u8; 64][..]],
        )
        .unwrap();
    });
    let (code, report) = verify(&sandbox, &appended);
    assert_eq!((code, report["first_bad_record"].as_i64()), (1, Some(records + 1)), "{report}");
    assert!(report["problem"].as_str().unwrap().contains("signature"), "{report}");
}

#[test]
fn every_decision_and_kernel_denial_is_a_record() {
    let sandbox = populated_store();
    let output = sandbox.agent_cli(&["audit", "list", "--json"]).unwrap();
    let records: Vec<Value> =
        String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let count = |kind: &str| records.iter().filter(|r| r["kind"] == kind).count();
    assert_eq!(count("epoch_change"), 1);
    assert_eq!(count("revocation"), 1);
    assert_eq!(count("decision"), 4);
    assert_eq!(count("kernel_denial"), 1);
    let decision = records.iter().find(|r| r["kind"] == "decision").unwrap();
    // This broker has no trust anchors configured: every proposal is denied, and says why.
    assert_eq!(decision["body"]["reason"], "untrusted_issuer");
    assert!(decision["body"]["message"].as_str().unwrap().contains("no SAB trust anchors"), "{decision}");
    assert_eq!(decision["body"]["caller"]["uid"], 0);
}

/// `audit verify --json` with the head file the broker kept beside its key.
fn verify_with_head(sandbox: &Sandbox, database: &Path) -> (i32, Value) {
    let output = std::process::Command::new(&sandbox.tools.agent)
        .args(["audit", "verify", "--json", "--database"])
        .arg(database)
        .arg("--public-key")
        .arg(sandbox.public_key())
        .arg("--head")
        .arg(sandbox.head_file())
        .output()
        .unwrap();
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
    });
    (output.status.code().unwrap_or(-1), report)
}

#[test]
fn verify_with_the_head_file_detects_removed_newest_records_and_names_an_unreadable_record() {
    let sandbox = populated_store();
    let (code, report) = verify_with_head(&sandbox, &sandbox.database);
    assert_eq!(code, 0, "{report}");
    let records = report["records"].as_i64().unwrap();
    assert_eq!(report["head_file_seq"].as_i64(), Some(records), "the head file names the newest record: {report}");

    // The two newest records removed: the rest still chains, but the head file's record is gone.
    let truncated = tampered(&sandbox, "truncated", |c| {
        c.execute("DELETE FROM records WHERE seq > ?1", [records - 2]).unwrap();
    });
    let (code, report) = verify_with_head(&sandbox, &truncated);
    assert_eq!((code, report["first_bad_record"].as_i64()), (1, Some(records)), "{report}");
    assert!(report["problem"].as_str().unwrap().contains("the newest records were removed"), "{report}");
    // Without the head file nothing is claimed about the newest records.
    let (code, report) = verify(&sandbox, &truncated);
    assert_eq!((code, &report["head_file_seq"]), (0, &Value::Null), "{report}");

    // A body stored as a BLOB: the record is named, not a generic read error.
    let blob = tampered(&sandbox, "blob", |c| {
        c.execute("UPDATE records SET body = CAST(body AS BLOB) WHERE seq = 3", []).unwrap();
    });
    let (code, report) = verify(&sandbox, &blob);
    assert_eq!((code, report["first_bad_record"].as_i64()), (1, Some(3)), "{report}");
    assert!(report["problem"].as_str().unwrap().contains("cannot be read"), "{report}");
}

/// A broker trusting a fresh dev SAB, epochs 1/1, and an AWS request certified for this
/// process (no executor: admission only).
fn admitting_broker(label: &str) -> (Broker, MutationRequest, ExecutionContract) {
    let broker = Broker::start(Sandbox::new(label, tools()).unwrap(), "", true).unwrap();
    let request: MutationRequest = serde_json::from_value(serde_json::json!({
        "provider": "aws", "operation": "s3:PutObject", "target": "arn:aws:s3:::seb-demo/config.json",
        "params": {"body": "replicas=3"}
    }))
    .unwrap();
    let role = ScopedIdentity::AwsRole { role_arn: "arn:aws:iam::123456789012:role/seb-demo".into() };
    let contract = certified(&format!("c-{label}"), this_process(), &request, "sha256:00", role);
    (broker, request, contract)
}

fn remove_store(database: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut path = database.as_os_str().to_os_string();
        path.push(suffix);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("removing {path:?}: {e}"),
            _ => {}
        }
    }
}

/// Start the stopped broker on a tampered store: it must refuse, saying why.
#[track_caller]
fn assert_refused(broker: &mut Broker, case: &str, why: &str) {
    let error = match broker.sandbox.start_agent() {
        Ok(_) => panic!("{case}: the broker started on the tampered store"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("refusing to start") && error.contains(why), "{case}: {error}");
}

#[test]
fn state_tampering_is_refused_at_start_and_never_admits_a_certificate_twice() {
    let (mut f, request, contract) = admitting_broker("replaystate");
    let certificate = f.issue(&contract, &IssueOptions::default());
    let admitted = f.propose(&certificate, &request);
    assert!(admitted.admitted, "{admitted:?}");
    let (seq, serial) = (admitted.record_seq, admitted.serial.clone().unwrap());
    assert_eq!(f.propose(&certificate, &request).reason, Reason::Replayed);
    f.sandbox.stop_agent().unwrap();
    let pristine = f.sandbox.dir.join("pristine.db");
    seb_sandbox::snapshot_store(&f.sandbox.database, &pristine).unwrap();
    let restore = |f: &Broker| {
        remove_store(&f.sandbox.database);
        std::fs::copy(&pristine, &f.sandbox.database).unwrap();
    };

    // Each way to forget that the serial was used: the decision record that used it
    // deleted, its serial changed by one character, the admission turned into a denial,
    // the newest records cut off.
    let flipped = format!("{}{}", &serial[..serial.len() - 1], if serial.ends_with('0') { '1' } else { '0' });
    let edits = [
        ("decision deleted", format!("DELETE FROM records WHERE seq = {seq}"), format!("record {} is missing", seq)),
        (
            "serial changed",
            format!("UPDATE records SET body = replace(body, '\"{serial}\"', '\"{flipped}\"') WHERE seq = {seq}"),
            format!("record {seq}: its content does not match its hash"),
        ),
        (
            "admission turned into a denial",
            format!(
                "UPDATE records SET body = replace(body, '\"admitted\":true', '\"admitted\":false') WHERE seq = {seq}"
            ),
            format!("record {seq}: its content does not match its hash"),
        ),
        (
            "newest records truncated",
            format!("DELETE FROM records WHERE seq >= {seq}"),
            "the newest records were removed".into(),
        ),
    ];
    for (case, sql, why) in edits {
        restore(&f);
        let conn = Connection::open(&f.sandbox.database).unwrap();
        assert!(conn.execute(&sql, []).unwrap() > 0, "{case}");
        drop(conn);
        assert_refused(&mut f, case, &why);
    }
    remove_store(&f.sandbox.database);
    assert_refused(&mut f, "store deleted while stopped", "does not exist, but the head file");

    // The untouched store: the certificate stays used.
    restore(&f);
    f.sandbox.start_agent().unwrap();
    assert_eq!(f.propose(&certificate, &request).reason, Reason::Replayed);
}

#[test]
fn a_store_deleted_while_the_broker_runs_records_nothing_and_is_refused_at_restart() {
    let (mut f, request, contract) = admitting_broker("deletedlive");
    let certificate = f.issue(&contract, &IssueOptions::default());
    assert!(f.propose(&certificate, &request).admitted);

    remove_store(&f.sandbox.database);
    let next = f.decide(&contract, &request);
    assert!(!next.admitted && next.reason == Reason::Internal, "{next:?}");
    assert!(next.message.contains("was deleted while the broker ran"), "{next:?}");
    assert_eq!(f.propose(&certificate, &request).reason, Reason::Internal, "still failing closed");

    f.sandbox.kill_agent().unwrap();
    assert_refused(&mut f, "store deleted while running", "does not exist, but the head file");
}

#[test]
fn a_store_file_sqlite_cannot_write_is_refused_at_start_naming_it() {
    let (mut f, _, _) = admitting_broker("immutable");
    f.sandbox.stop_agent().unwrap();
    let mut shm = f.sandbox.database.as_os_str().to_os_string();
    shm.push("-shm");
    let shm = std::path::PathBuf::from(shm);
    std::fs::write(&shm, []).unwrap();
    let chattr = |flag: &str| {
        let status = std::process::Command::new("chattr").arg(flag).arg(&shm).status().unwrap();
        assert!(status.success(), "chattr {flag} {}", shm.display());
    };
    chattr("+i");
    let started = f.sandbox.start_agent();
    chattr("-i");
    let error = format!("{:#}", started.expect_err("the broker started with an immutable -shm file"));
    assert!(error.contains(&format!("{} cannot be opened for writing", shm.display())), "{error}");
}

#[test]
fn a_shm_file_cut_short_under_the_running_broker_is_reported_before_it_dies() {
    use std::os::unix::process::ExitStatusExt;
    let sandbox = Sandbox::new("sigbus", tools()).unwrap();
    sandbox.write_config("").unwrap();
    let log = sandbox.dir.join("agent.stderr");
    let mut agent = sandbox.agent_command().stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !sandbox.agent_cli(&["epoch", "--policy", "1", "--revocation", "1"]).unwrap().status.success() {
        assert!(std::time::Instant::now() < deadline, "the broker did not answer");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    let mut shm = sandbox.database.as_os_str().to_os_string();
    shm.push("-shm");
    std::fs::OpenOptions::new().write(true).open(&shm).unwrap().set_len(0).unwrap();
    assert!(!sandbox.agent_cli(&["epoch", "--policy", "2"]).unwrap().status.success());
    let status = agent.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status}");
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(stderr.contains("fatal SIGBUS") && stderr.contains("-shm"), "{stderr}");
}

/// `seb-agent audit follow --json --since SINCE`, its records as they arrive.
struct Follower {
    child: std::process::Child,
    records: std::sync::mpsc::Receiver<Value>,
}

impl Follower {
    fn start(sandbox: &Sandbox, since: &str) -> Self {
        let mut child = std::process::Command::new(&sandbox.tools.agent)
            .args(["audit", "follow", "--json", "--since", since, "--config"])
            .arg(&sandbox.config)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let (sender, records) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if sender.send(serde_json::from_str(&line).expect("a followed record is JSON")).is_err() {
                    break;
                }
            }
        });
        Self { child, records }
    }

    /// Records up to and including `seq`.
    fn until(&self, seq: i64) -> Vec<Value> {
        let mut records = Vec::new();
        while records.last().is_none_or(|r: &Value| r["seq"].as_i64().unwrap() < seq) {
            let timeout = std::time::Duration::from_secs(10);
            records.push(self.records.recv_timeout(timeout).unwrap_or_else(|e| panic!("waiting for {seq}: {e}")));
        }
        records
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sequence number of the last record.
fn head(sandbox: &Sandbox) -> i64 {
    let output = sandbox.agent_cli(&["audit", "list", "--json"]).unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    serde_json::from_str::<Value>(text.lines().last().unwrap()).unwrap()["seq"].as_i64().unwrap()
}

#[test]
fn audit_follow_streams_records_and_resumes_after_restarts_without_gaps_or_repeats() {
    let mut sandbox = populated_store();
    let first = Follower::start(&sandbox, "0");
    let mut seen = first.until(head(&sandbox));
    // The shipper stops; while it is away the broker restarts and records more.
    drop(first);
    sandbox.start_agent().unwrap();
    let run = |args: &[&str]| assert!(sandbox.agent_cli(args).unwrap().status.success(), "{args:?}");
    run(&["epoch", "--policy", "2"]);
    let resume_from = seen.last().unwrap()["seq"].as_i64().unwrap();
    let second = Follower::start(&sandbox, &resume_from.to_string());
    // And records written while it follows arrive too.
    run(&["revoke", "--contract", "c-followed"]);
    seen.extend(second.until(head(&sandbox)));
    let seqs: Vec<i64> = seen.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    let expected: Vec<i64> = (1..=*seqs.last().unwrap()).collect();
    assert_eq!(seqs, expected, "every record once, in order");
    let last = seen.last().unwrap();
    assert_eq!((last["kind"].as_str(), last["body"]["value"].as_str()), (Some("revocation"), Some("c-followed")));
    assert!(seen.iter().any(|r| r["kind"] == "decision" && r["body"]["reason"] == "untrusted_issuer"));
}

#[test]
fn a_record_planted_far_ahead_stops_a_follower_instead_of_blinding_it() {
    let sandbox = populated_store();
    let last = head(&sandbox);
    // Written straight into the file: a reader that skips to it would read nothing after
    // it, ever, and a forged record deleted later leaves `verify` clean.
    let conn = Connection::open(&sandbox.database).unwrap();
    conn.execute(
        "INSERT INTO records (seq, kind, time_ns, body, prev_hash, hash, signature) \
         VALUES (9223372036854775807, 'decision', 0, '{}', x'00', x'00', x'')",
        [],
    )
    .unwrap();
    drop(conn);
    let mut follow = std::process::Command::new(&sandbox.tools.agent)
        .args(["audit", "follow", "--json", "--since", "0", "--config"])
        .arg(&sandbox.config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while follow.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = follow.kill();
            panic!("the follower went on past the planted record");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let output = follow.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains(&format!("record {} is missing", last + 1)), "{stderr}");
    // Every real record was printed first, each with its chain fields.
    let printed: Vec<Value> =
        String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(printed.last().unwrap()["seq"], last);
    assert_eq!(printed.last().unwrap()["hash"].as_str().map(str::len), Some(64));
    // A listing, and the denials, fail the same way.
    let listed = sandbox.agent_cli(&["audit", "list"]).unwrap();
    assert!(!listed.status.success() && String::from_utf8_lossy(&listed.stderr).contains("is missing"));
    let denials = sandbox.agent_cli(&["denials"]).unwrap();
    assert!(!denials.status.success() && String::from_utf8_lossy(&denials.stderr).contains("is missing"));
}

/// Recompute every link and hash from record `from` on, as an attacker without the key can.
fn rehash_from(conn: &Connection, from: i64) {
    use seb_agent::audit::chain::Head;
    let before: Vec<u8> = conn.query_row("SELECT hash FROM records WHERE seq = ?1", [from - 1], |r| r.get(0)).unwrap();
    let mut head = Head { seq: from - 1, hash: before.try_into().unwrap() };
    let rows: Vec<(i64, String, i64, String)> = conn
        .prepare("SELECT seq, kind, time_ns, body FROM records WHERE seq >= ?1 ORDER BY seq")
        .unwrap()
        .query_map([from], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (seq, kind, time_ns, body) in rows {
        let next = head.next(&kind, time_ns, &body);
        conn.execute(
            "UPDATE records SET prev_hash = ?1, hash = ?2 WHERE seq = ?3",
            params![&head.hash[..], &next.hash[..], seq],
        )
        .unwrap();
        head = next;
    }
}

#[test]
fn a_record_of_a_group_commit_tampered_is_named_even_with_the_chain_rehashed() {
    let (mut f, request, contract) = admitting_broker("groupsig");
    let decision = f.decide(&contract, &request);
    assert!(decision.admitted, "{decision:?}");
    let (seq, outcome_seq) = (decision.record_seq, decision.outcome.as_ref().unwrap().record_seq);
    assert_eq!(outcome_seq, seq + 1, "with no executor the outcome is recorded with its decision");
    f.sandbox.stop_agent().unwrap();

    // One commit, one signature: on the outcome, which ends the group and covers the decision.
    let conn = Connection::open(&f.sandbox.database).unwrap();
    let signature = |seq: i64| -> i64 {
        conn.query_row("SELECT length(signature) FROM records WHERE seq = ?1", [seq], |r| r.get(0)).unwrap()
    };
    assert_eq!((signature(seq), signature(outcome_seq)), (0, 64));
    drop(conn);
    let (code, report) = verify(&f.sandbox, &f.sandbox.database);
    assert_eq!(code, 0, "{report}");

    // The admission turned into a denial: its hash names it.
    let denial =
        format!("UPDATE records SET body = replace(body, '\"admitted\":true', '\"admitted\":false') WHERE seq = {seq}");
    let changed = tampered(&f.sandbox, "groupchanged", |c| assert_eq!(c.execute(&denial, []).unwrap(), 1));
    let (code, report) = verify(&f.sandbox, &changed);
    assert_eq!((code, report["first_bad_record"].as_i64()), (1, Some(seq)), "{report}");
    assert!(report["problem"].as_str().unwrap().contains("modified"), "{report}");

    // The same with every later hash recomputed: the group's signature no longer holds,
    // and the group is named from its first record.
    let forged = tampered(&f.sandbox, "groupforged", |c| {
        assert_eq!(c.execute(&denial, []).unwrap(), 1);
        rehash_from(c, seq);
    });
    let (code, report) = verify(&f.sandbox, &forged);
    assert_eq!((code, report["first_bad_record"].as_i64()), (1, Some(seq)), "{report}");
    let problem = report["problem"].as_str().unwrap();
    assert!(problem.contains(&format!("the signature on record {outcome_seq}")), "{report}");
}

/// The head file made immutable, then writable again, however the test ends.
struct Immutable<'a>(&'a Path);

impl<'a> Immutable<'a> {
    fn set(path: &'a Path) -> Self {
        let status = std::process::Command::new("chattr").arg("+i").arg(path).status().unwrap();
        assert!(status.success(), "chattr +i (needs root)");
        Self(path)
    }
}

impl Drop for Immutable<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr").arg("-i").arg(self.0).status();
    }
}

#[test]
fn denials_drained_while_the_store_refuses_writes_are_written_once_it_takes_them_again() {
    let mut sandbox = Sandbox::new("backlog", tools()).unwrap();
    sandbox.write_config("[[enforcement.protected]]\ncidr = \"127.0.0.2/32\"\n").unwrap();
    sandbox.start_agent().unwrap();
    let head = sandbox.head_file();
    let cookie = |outcome: Value| {
        assert_eq!(outcome["result"], "EPERM", "{outcome}");
        outcome["cookie"].as_u64().unwrap()
    };
    let ledger_refused_writes = {
        // A head file that takes no write: the commit after the next one is refused
        // (the ledger will not run ahead of its head file).
        let _immutable = Immutable::set(&head);
        let first = cookie(sandbox.attempt("workload", "tcp", "127.0.0.2:80").unwrap());
        sandbox.wait_for_denial(first).unwrap();
        let refused = cookie(sandbox.attempt("workload", "tcp", "127.0.0.2:81").unwrap());
        // Drained, and its write refused (the recorder drains within 200 ms).
        std::thread::sleep(std::time::Duration::from_secs(2));
        assert!(
            !sandbox.denials().unwrap().iter().any(|d| d["socket_cookie"] == refused),
            "written although the store refused writes"
        );
        refused
    };
    // Writable again: the kept denial is written with the recorder's next write.
    let found = sandbox.wait_for_denial(ledger_refused_writes).expect("the denial drained while writes failed");
    assert_eq!(found["port"], 81, "{found}");
    sandbox.stop_agent().unwrap();
}
