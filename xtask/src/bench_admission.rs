//! `cargo xtask bench admission`: admission latency over the broker socket and
//! admissions per second with 64 concurrent clients, every decision durably recorded
//! (chained, signed with its group commit, committed) before its reply. The proposals
//! come from `seb-load`, built optimised like the broker.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, ensure};
use seb_agent::cert::{
    ExecutionContract, MutationRequest,
    contract::{AgentIdentity, ScopedIdentity},
    dev_sab::{self, Algorithm, IssueOptions},
};
use seb_sandbox::{
    Sandbox,
    broker::{certified, this_process},
};
use serde_json::json;

use crate::stats::percentile;

const SEQUENTIAL: usize = 2_000;
const CLIENTS: usize = 64;
const PER_CLIENT: usize = 150;
const TARGET_P99_US: f64 = 1_000.0;
const TARGET_PER_SECOND: f64 = 10_000.0;

pub fn run() -> Result<()> {
    let tools = crate::release_tools()?;
    let load = tools.probe.with_file_name("seb-load");
    let mut sandbox = Sandbox::new("benchadm", tools.clone())?;
    let ca = dev_sab::create_ca(&sandbox.dir.join("sab"), "seb bench SAB", Algorithm::Ed25519)?;
    sandbox.write_config(&format!("[admission]\ntrust_anchors = \"{}\"\n", ca.cert.display()))?;
    sandbox.start_agent()?;
    let epochs = sandbox.agent_cli(&["epoch", "--policy", "1", "--revocation", "1"])?;
    ensure!(epochs.status.success(), "setting epochs: {}", String::from_utf8_lossy(&epochs.stderr));

    let request = bench_request();
    let request_file = sandbox.dir.join("request.json");
    std::fs::write(&request_file, serde_json::to_vec(&request)?)?;
    let total = SEQUENTIAL + CLIENTS * PER_CLIENT;
    eprintln!("xtask: issuing {total} single-use certificates");
    let contract = bench_contract(&request, &load)?;
    let certificates: Vec<String> =
        (0..total).map(|_| dev_sab::issue(&ca, &contract, &IssueOptions::default())).collect::<Result<_>>()?;
    let (first, rest) = certificates.split_at(SEQUENTIAL);

    let broker = sandbox.agent_pid().context("the broker is not running")?;
    eprintln!("xtask: {SEQUENTIAL} admissions from one client");
    let (sequential, _) = propose_all(&load, &sandbox, first, 1, &request_file)?;
    eprintln!("xtask: {} admissions from {CLIENTS} concurrent clients", rest.len());
    let cpu_before = cpu_seconds(broker)?;
    let (concurrent_latencies, seconds) = propose_all(&load, &sandbox, rest, CLIENTS, &request_file)?;
    let broker_cpu = cpu_seconds(broker)? - cpu_before;
    let per_second = concurrent_latencies.len() as f64 / seconds;
    let verify = sandbox.agent_cli(&["audit", "verify", "--json"])?;
    ensure!(verify.status.success(), "the audit chain must verify after the run");

    let report = json!({
        "bench": "admission",
        "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
        "durability": "each decision hash-chained, its group commit signed and committed (SQLite WAL, \
                       synchronous=FULL) before its reply",
        "single_client": summary(&sequential),
        "concurrent": {
            "clients": CLIENTS,
            "admissions": concurrent_latencies.len(),
            "seconds": seconds,
            "admissions_per_second": per_second,
            "latency": summary(&concurrent_latencies),
            // What the rate needs of the CPUs, however busy the machine was otherwise.
            "broker_cpu_us_per_admission": broker_cpu * 1e6 / concurrent_latencies.len() as f64,
        },
        "targets": {"p99_us": TARGET_P99_US, "admissions_per_second": TARGET_PER_SECOND},
        "meets_p99_target": percentile(&sequential, 0.99) < TARGET_P99_US,
        "meets_throughput_target": per_second >= TARGET_PER_SECOND,
        "audit_chain": serde_json::from_slice::<serde_json::Value>(&verify.stdout).unwrap_or_default(),
    });
    crate::stats::publish("admission", &report)
}

/// Propose every certificate once through `seb-load` (release, like the broker) from
/// `clients` connections; each latency in microseconds, and the wall time in seconds.
fn propose_all(
    load: &Path,
    sandbox: &Sandbox,
    certificates: &[String],
    clients: usize,
    request: &Path,
) -> Result<(Vec<f64>, f64)> {
    let file = sandbox.dir.join(format!("certificates-{clients}.jsonl"));
    let lines: Vec<String> = certificates.iter().map(serde_json::to_string).collect::<Result<_, _>>()?;
    std::fs::write(&file, lines.join("\n"))?;
    let output = Command::new(load)
        .arg("admission")
        .arg("--socket")
        .arg(&sandbox.socket)
        .arg("--certificates")
        .arg(&file)
        .arg("--request")
        .arg(request)
        .args(["--clients", &clients.to_string()])
        .output()
        .with_context(|| format!("running {}", load.display()))?;
    ensure!(output.status.success(), "seb-load failed: {}", String::from_utf8_lossy(&output.stderr));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let latencies = serde_json::from_value(result["latencies_us"].clone())?;
    Ok((latencies, result["seconds"].as_f64().context("seb-load reported no wall time")?))
}

/// CPU time (user and system, every thread) that process `pid` has used, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces:
    // utime and stime are the 14th and 15th fields, in clock ticks.
    let after_name = stat.rsplit_once(')').context("/proc/<pid>/stat has no command name")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> { Ok(fields.get(i).context("/proc/<pid>/stat is short")?.parse::<f64>()?) };
    // SAFETY: sysconf reads a constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / per_second)
}

fn bench_request() -> MutationRequest {
    serde_json::from_value(json!({
        "provider": "aws", "operation": "s3:PutObject",
        "target": "arn:aws:s3:::seb-bench/object", "params": {"body": "x"}
    }))
    .expect("valid request")
}

/// Certified for `seb-load` run by this user.
fn bench_contract(request: &MutationRequest, load: &Path) -> Result<ExecutionContract> {
    let role = ScopedIdentity::AwsRole { role_arn: "arn:aws:iam::123456789012:role/seb-bench".into() };
    let exe = load.canonicalize().with_context(|| format!("{} (is it built?)", load.display()))?;
    let agent = AgentIdentity { exe: Some(exe.to_string_lossy().into_owned()), ..this_process() };
    Ok(certified("c-bench", agent, request, "sha256:00", role))
}

fn summary(latencies: &[f64]) -> serde_json::Value {
    json!({
        "n": latencies.len(),
        "p50_us": percentile(latencies, 0.50),
        "p99_us": percentile(latencies, 0.99),
        "max_us": percentile(latencies, 1.0),
    })
}
