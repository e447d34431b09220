//! `cargo xtask bench sab`: certify latency and certificates per second through the
//! SAB's HTTPS API (TLS 1.3, mutual; kept-alive connections), with 1 and with 1,000
//! policies. Each certify is evaluated, signed, and recorded (request, decision,
//! issuance: signed, chained, committed in one transaction) before its reply. The
//! requests come from `seb-load sab`, built optimised like the SAB, so its TLS and JSON
//! are not in the figures. The Cedar evaluation alone is measured beside it, in process.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use seb_agent::{
    cert::contract::digest_of,
    sab::{
        identity::{Agent, Caller},
        policy::{PolicyBook, Verdict},
        schema::Facts,
    },
};
use seb_sandbox::{Sandbox, sab::Sab};
use serde_json::{Value, json};

use crate::stats::percentile;

const WARMUP: usize = 200;
const COUNT: usize = 2_000;
const CLIENTS: usize = 8;
const EVALUATIONS: usize = 20_000;
const TARGET_P99_US: f64 = 2_000.0;

pub fn run() -> Result<()> {
    let tools = crate::release_tools()?;
    let mut sandbox = Sandbox::new("benchsab", tools.clone())?;
    let issuing = sandbox.dir.join("sab-issuing");
    seb_agent::cert::dev_sab::create_ca(&issuing, "seb bench SAB", seb_agent::cert::dev_sab::Algorithm::Ed25519)?;
    sandbox.write_config(&format!(
        "[admission]\ntrust_anchors = \"{}\"\nnode_name = \"{}\"\n",
        issuing.join("sab-ca.pem").display(),
        seb_sandbox::NODE_NAME
    ))?;
    sandbox.start_agent()?;
    let epochs = sandbox.agent_cli(&["epoch", "--policy", "1", "--revocation", "1"])?;
    ensure!(epochs.status.success(), "setting epochs: {}", String::from_utf8_lossy(&epochs.stderr));

    let mut results = Vec::new();
    for count in [1, 1_000] {
        eprintln!("xtask: bench sab with {count} policies");
        let text = policies(count);
        let evaluation = evaluation_us(&text)?;
        let sab = Sab::start(&sandbox, &issuing, &text, "certificate_ttl_seconds = 60")?;
        let agent = sab.agent_identity(&sandbox, "workload");
        let cert = sab.identity_cert(&agent)?;
        let body = sandbox.dir.join("certify.json");
        let precondition = digest_of(&json!({"status": 404}));
        std::fs::write(
            &body,
            json!({"request": request(), "precondition": precondition, "intent": "bench"}).to_string(),
        )?;
        let output = Command::new(tools.probe.with_file_name("seb-load"))
            .args(["sab", "--url", &sab.url, "--cert"])
            .arg(cert.with_extension("pem"))
            .arg("--key")
            .arg(cert.with_extension("key"))
            .arg("--ca")
            .arg(sab.dir.join("tls-ca.pem"))
            .arg("--body")
            .arg(&body)
            .args(["--warmup", &WARMUP.to_string(), "--count", &COUNT.to_string(), "--clients", &CLIENTS.to_string()])
            .output()
            .context("running seb-load")?;
        ensure!(output.status.success(), "seb-load failed: {}", String::from_utf8_lossy(&output.stderr));
        let load: Value = serde_json::from_slice(&output.stdout)?;
        let sequential: Vec<f64> = serde_json::from_value(load["sequential_us"].clone())?;
        let concurrent: Vec<f64> = serde_json::from_value(load["concurrent_us"].clone())?;
        let elapsed = Duration::from_secs_f64(load["seconds"].as_f64().context("seb-load reported no wall time")?);
        let verify = std::process::Command::new(&tools.agent)
            .args(["audit", "verify", "--json", "--database"])
            .arg(&sab.database)
            .arg("--public-key")
            .arg(sab.signing_key.with_extension("key.pub"))
            .arg("--head")
            .arg(sab.signing_key.with_extension("key.head"))
            .output()?;
        ensure!(verify.status.success(), "the SAB log must verify after the run");
        results.push(json!({
            "policies": count,
            "cedar_evaluation_us": evaluation,
            "single_client": summary(&sequential),
            "concurrent": {
                "clients": CLIENTS,
                "certificates": concurrent.len(),
                "certificates_per_second": concurrent.len() as f64 / elapsed.as_secs_f64(),
                "latency": summary(&concurrent),
            },
            "meets_p99_target": percentile(&sequential, 0.99) < TARGET_P99_US,
        }));
    }
    sandbox.stop_agent()?;
    let report = json!({
        "bench": "sab",
        "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
        "client": "seb-load sab (release)",
        "path": "HTTPS (TLS 1.3, client certificate, kept-alive connection) -> Cedar -> Ed25519 leaf signed by the SAB CA -> three records signed, chained and committed in one transaction (SQLite WAL, synchronous=FULL; group commit) -> reply",
        "policy_shape": "one permit per resource (resource == ...), all for the benchmarked action: indexed by action and resource, each certify evaluates the one policy naming its resource",
        "target_p99_us": TARGET_P99_US,
        "runs": results,
    });
    crate::stats::publish("sab", &report)
}

/// `count` permits, one per resource; the benchmarked request matches the last.
fn policies(count: usize) -> String {
    (0..count)
        .map(|i| {
            format!(
                "@id(\"app-{i}\")\n@identity(\"x509_client:seb-executor@app-{i}\")\n\
                 permit (principal in Seb::Node::\"node-a\", action == Seb::Action::\"http::PUT\", \
                 resource == Seb::HttpsEndpoint::\"https://127.0.0.3:9443/v1/app-{i}\");\n"
            )
        })
        .collect()
}

/// The benchmarked request: permitted by `app-0`, present in every set.
fn request() -> Value {
    json!({"provider": "http", "operation": "PUT", "target": "https://127.0.0.3:9443/v1/app-0", "params": {"body": {"replicas": 3}}})
}

/// Cedar evaluation (entities, context, authorization) of the benchmarked request, in
/// this process: only meaningful when xtask itself is optimised.
fn evaluation_us(text: &str) -> Result<Value> {
    if cfg!(debug_assertions) {
        return Ok(json!({"not_measured": "xtask is built without optimisations; the SAB process is (release)"}));
    }
    let book = PolicyBook::from_sources(&[("bench.cedar".into(), text.into())], Duration::from_secs(60))?;
    let Caller::Agent(agent) = Caller::parse("seb://node/node-a/cgroup/bench/workload")? else { unreachable!() };
    let agent: Agent = agent;
    let request = serde_json::from_value(request())?;
    let facts = Facts {
        request: &request,
        precondition: "sha256:00",
        intent: "bench",
        live_state_digest: None,
        now: std::time::SystemTime::now(),
    };
    let mut samples = Vec::with_capacity(EVALUATIONS);
    for _ in 0..EVALUATIONS {
        let started = Instant::now();
        let verdict = book.evaluate(&agent, &facts);
        samples.push(started.elapsed().as_secs_f64() * 1e6);
        ensure!(matches!(verdict, Verdict::Permit { .. }), "{verdict:?}");
    }
    Ok(summary(&samples))
}

fn summary(values: &[f64]) -> Value {
    json!({
        "count": values.len(),
        "p50_us": percentile(values, 0.50),
        "p99_us": percentile(values, 0.99),
        "max_us": percentile(values, 1.0),
    })
}
