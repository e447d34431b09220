//! The audit chain against direct tampering with the SQLite file: `seb-agent audit verify`
//! must fail and name the first bad record, offline, from the file and the public key.

use std::path::Path;

use rusqlite::{Connection, params};
use seb_sandbox::{Sandbox, Tools};
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
    std::fs::copy(&sandbox.database, &copy).unwrap();
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
