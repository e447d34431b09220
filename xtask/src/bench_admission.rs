//! `cargo xtask bench admission`: admission latency over the broker socket and
//! admissions per second with 64 concurrent clients, every decision durably recorded
//! (signed, chained, committed) before its reply.

use std::{path::PathBuf, time::Instant};

use anyhow::{Context, Result, bail, ensure};
use seb_agent::{
    cert::{
        ExecutionContract, MutationRequest,
        contract::ScopedIdentity,
        dev_sab::{self, Algorithm, IssueOptions},
    },
    protocol::{Envelope, Request, Response, VERSION, read_frame, write_frame},
};
use seb_sandbox::{
    Sandbox,
    broker::{certified, this_process},
};
use serde_json::json;
use tokio::net::UnixStream;

use crate::stats::percentile;

const SEQUENTIAL: usize = 2_000;
const CLIENTS: usize = 64;
const PER_CLIENT: usize = 150;
const TARGET_P99_US: f64 = 1_000.0;
const TARGET_PER_SECOND: f64 = 10_000.0;

pub fn run() -> Result<()> {
    let tools = crate::release_tools()?;
    let mut sandbox = Sandbox::new("benchadm", tools.clone())?;
    let ca = dev_sab::create_ca(&sandbox.dir.join("sab"), "seb bench SAB", Algorithm::Ed25519)?;
    sandbox.write_config(&format!("[admission]\ntrust_anchors = \"{}\"\n", ca.cert.display()))?;
    sandbox.start_agent()?;
    let epochs = sandbox.agent_cli(&["epoch", "--policy", "1", "--revocation", "1"])?;
    ensure!(epochs.status.success(), "setting epochs: {}", String::from_utf8_lossy(&epochs.stderr));

    let request = bench_request();
    let total = SEQUENTIAL + CLIENTS * PER_CLIENT;
    eprintln!("xtask: issuing {total} single-use certificates");
    let contract = bench_contract(&request)?;
    let certificates: Vec<String> =
        (0..total).map(|_| dev_sab::issue(&ca, &contract, &IssueOptions::default())).collect::<Result<_>>()?;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let socket = sandbox.socket.clone();
    let (sequential, concurrent) = runtime.block_on(async {
        let (first, rest) = certificates.split_at(SEQUENTIAL);
        eprintln!("xtask: {SEQUENTIAL} admissions from one client");
        let sequential = client(socket.clone(), first.to_vec(), request.clone()).await?;
        eprintln!("xtask: {} admissions from {CLIENTS} concurrent clients", rest.len());
        let started = Instant::now();
        let tasks: Vec<_> = rest
            .chunks(PER_CLIENT)
            .map(|chunk| tokio::spawn(client(socket.clone(), chunk.to_vec(), request.clone())))
            .collect();
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await??);
        }
        Ok::<_, anyhow::Error>((sequential, (latencies, started.elapsed())))
    })?;
    let (concurrent_latencies, elapsed) = concurrent;
    let per_second = concurrent_latencies.len() as f64 / elapsed.as_secs_f64();
    let verify = sandbox.agent_cli(&["audit", "verify", "--json"])?;
    ensure!(verify.status.success(), "the audit chain must verify after the run");

    let report = json!({
        "bench": "admission",
        "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
        "durability": "each decision signed, hash-chained and committed (SQLite WAL, synchronous=FULL) before its reply; group commit",
        "single_client": summary(&sequential),
        "concurrent": {
            "clients": CLIENTS,
            "admissions": concurrent_latencies.len(),
            "seconds": elapsed.as_secs_f64(),
            "admissions_per_second": per_second,
            "latency": summary(&concurrent_latencies),
        },
        "targets": {"p99_us": TARGET_P99_US, "admissions_per_second": TARGET_PER_SECOND},
        "meets_p99_target": percentile(&sequential, 0.99) < TARGET_P99_US,
        "meets_throughput_target": per_second >= TARGET_PER_SECOND,
        "audit_chain": serde_json::from_slice::<serde_json::Value>(&verify.stdout).unwrap_or_default(),
    });
    crate::stats::publish("admission", &report)
}

/// One connection, proposals one after another; returns each latency in microseconds.
async fn client(socket: PathBuf, certificates: Vec<String>, request: MutationRequest) -> Result<Vec<f64>> {
    let mut stream = UnixStream::connect(&socket).await.context("connecting to the broker")?;
    let mut latencies = Vec::with_capacity(certificates.len());
    for certificate in certificates {
        let body = serde_json::to_vec(&Envelope {
            v: VERSION,
            body: Request::Propose { certificate, request: request.clone() },
        })?;
        let started = Instant::now();
        write_frame(&mut stream, &body).await?;
        let reply = read_frame(&mut stream).await?;
        latencies.push(started.elapsed().as_secs_f64() * 1e6);
        let envelope: Envelope<Response> = serde_json::from_slice(&reply)?;
        match envelope.body {
            Response::Decision(decision) if decision.admitted => {}
            other => bail!("an admission was expected: {other:?}"),
        }
    }
    Ok(latencies)
}

fn bench_request() -> MutationRequest {
    serde_json::from_value(json!({
        "provider": "aws", "operation": "s3:PutObject",
        "target": "arn:aws:s3:::seb-bench/object", "params": {"body": "x"}
    }))
    .expect("valid request")
}

/// Certified for this process (the bench client).
fn bench_contract(request: &MutationRequest) -> Result<ExecutionContract> {
    let role = ScopedIdentity::AwsRole { role_arn: "arn:aws:iam::123456789012:role/seb-bench".into() };
    Ok(certified("c-bench", this_process(), request, "sha256:00", role))
}

fn summary(latencies: &[f64]) -> serde_json::Value {
    json!({
        "n": latencies.len(),
        "p50_us": percentile(latencies, 0.50),
        "p99_us": percentile(latencies, 0.99),
        "max_us": percentile(latencies, 1.0),
    })
}
