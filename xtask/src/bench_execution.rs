//! `cargo xtask bench execution`: what the broker adds to one AWS mutation (admission,
//! STS minting concurrent with the precondition read, durable records) against the same
//! request sent directly with static credentials, for an S3 preset and a generic DynamoDB
//! request. Both run in one sandbox against moto on loopback, interleaved in rounds; every
//! call opens a fresh connection either way.

use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use seb_agent::{
    admission::Decision,
    cert::MutationRequest,
    cert::{
        contract::ScopedIdentity,
        dev_sab::{self, Algorithm, IssueOptions},
    },
    execute::{
        aws::{AwsOperation, sign::sign_request},
        broker_http::exchange,
    },
    protocol::{Envelope, Request, Response, VERSION, read_frame, write_frame},
};
use seb_sandbox::{
    Sandbox,
    broker::{certified, this_process},
    moto::{self, put_item, put_object},
};
use serde_json::json;

use crate::{stats::percentile, toolchain};

const ROUNDS: usize = 20;
const PER_ROUND: usize = 10;
const API: &str = "127.0.0.2:8443";

/// One kind of mutation measured: its name, the IAM service it signs for, and the
/// request for the `i`-th mutation by `who` ("direct" or "broker").
struct Case {
    name: &'static str,
    service: &'static str,
    request: RequestFor,
}

type RequestFor = Box<dyn Fn(&str, usize) -> MutationRequest>;

pub fn run() -> Result<()> {
    toolchain::ensure_moto()?;
    let tools = crate::release_tools()?;
    let mut sandbox = Sandbox::new("benchexec", tools.clone())?;
    let _moto = moto::start(&sandbox.netns, API.parse()?)?;
    let aws = moto::seed(&sandbox.netns, &format!("http://{API}"))?;
    let ca = dev_sab::create_ca(&sandbox.dir.join("sab"), "seb bench SAB", Algorithm::Ed25519)?;
    let credentials = sandbox.dir.join("aws-broker.json");
    std::fs::write(&credentials, serde_json::to_string(&aws.broker)?)?;
    sandbox.write_config(&format!(
        "[[enforcement.protected]]\ncidr = \"127.0.0.2\"\nport = 8443\nprotocol = \"tcp\"\n\n\
         [admission]\ntrust_anchors = \"{}\"\n\n[aws]\nendpoint = \"http://{API}\"\ncredentials_file = \"{}\"\n\
         read_role_arn = \"{}\"\n",
        ca.cert.display(),
        credentials.display(),
        aws.reader_role_arn,
    ))?;
    sandbox.start_agent()?;
    let epochs = sandbox.agent_cli(&["epoch", "--policy", "1", "--revocation", "1"])?;
    ensure!(epochs.status.success(), "setting epochs");

    // Every mutation writes a new object or item, so every precondition is "absent".
    let (bucket, table) = (aws.bucket.clone(), aws.table.clone());
    let cases = [
        Case {
            name: "s3:PutObject (preset) of a new object",
            service: "s3",
            request: Box::new(move |who, i| put_object(&bucket, &format!("bench/{who}-{i}"), "x")),
        },
        Case {
            name: "dynamodb:PutItem (generic json-protocol request) of a new item",
            service: "dynamodb",
            request: Box::new(move |who, i| {
                put_item(&table, json!({"id": {"S": format!("{who}-{i}")}, "replicas": {"N": "3"}}))
            }),
        },
    ];
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut broker = runtime.block_on(tokio::net::UnixStream::connect(&sandbox.socket))?;
    let mut reports = Vec::new();
    for case in &cases {
        reports.push(measure(case, &sandbox, &ca, &aws, &runtime, &mut broker)?);
    }
    let report = json!({
        "bench": "execution",
        "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
        "api": "moto (AWS API emulator) on loopback, SigV4 and IAM enforced",
        "mutations_each": ROUNDS * PER_ROUND,
        "target": "broker overhead p50 <= 1.2 x the direct call's p50",
        "cases": reports,
        "included_in_broker": "socket round trip, certificate and caller checks, state checks, STS AssumeRole concurrent \
                               with the precondition read (read-only role, kept session), mutation, decision and \
                               outcome records (signed, chained, fsynced); no resulting-state read (no postcondition)",
    });
    crate::stats::publish("execution", &report)
}

/// Direct calls with static credentials and brokered ones, interleaved in rounds.
fn measure(
    case: &Case,
    sandbox: &Sandbox,
    ca: &dev_sab::CaFiles,
    aws: &moto::AwsWorld,
    runtime: &tokio::runtime::Runtime,
    broker: &mut tokio::net::UnixStream,
) -> Result<serde_json::Value> {
    let absent = moto::live_digest(&sandbox.netns, aws, &(case.request)("probe", 0))?;
    let total = ROUNDS * PER_ROUND;
    let certificates: Vec<(String, _)> = (0..total)
        .map(|i| {
            let request = (case.request)("broker", i);
            let role = ScopedIdentity::AwsRole { role_arn: aws.role_arn.clone() };
            let contract = certified(&format!("c-bench-{}-{i}", case.service), this_process(), &request, &absent, role);
            Ok((dev_sab::issue(ca, &contract, &IssueOptions::default())?, request))
        })
        .collect::<Result<_>>()?;
    let (mut direct_ms, mut broker_ms, mut stages) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let requests: Vec<_> = (0..PER_ROUND).map(|i| (case.request)("direct", round * PER_ROUND + i)).collect();
        let (endpoint, writer, service) = (aws.endpoint.clone(), aws.static_writer.clone(), case.service);
        direct_ms.extend(moto::in_netns(&sandbox.netns, move || async move {
            let mut times = Vec::new();
            for request in requests {
                let started = Instant::now();
                let mut http = AwsOperation::parse(&request)?.mutation.http_request(&endpoint)?;
                sign_request(&mut http, &writer, service, moto::REGION)?;
                let stream = tokio::net::TcpStream::connect(API).await?;
                let response = exchange(stream, http).await?;
                ensure!(response.status().is_success(), "a direct call failed: {}", response.status());
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
            Ok(times)
        })?);
        for (certificate, request) in &certificates[round * PER_ROUND..(round + 1) * PER_ROUND] {
            let started = Instant::now();
            let decision = runtime.block_on(propose(broker, certificate.clone(), request.clone()))?;
            broker_ms.push(started.elapsed().as_secs_f64() * 1e3);
            let outcome = decision.outcome.with_context(|| format!("no outcome: {}", decision.message))?;
            ensure!(
                decision.admitted && outcome.api_status == Some(200),
                "a brokered mutation failed: {:?}",
                outcome.error
            );
            stages.push(outcome.timings);
        }
    }
    let direct_p50 = percentile(&direct_ms, 0.5);
    let overhead_p50 = percentile(&broker_ms, 0.5) - direct_p50;
    // A difference of two distributions' p99s, not the p99 of a per-call overhead.
    let p99_difference = percentile(&broker_ms, 0.99) - percentile(&direct_ms, 0.99);
    let median_of =
        |f: fn(&seb_agent::execute::Timings) -> f64| percentile(&stages.iter().map(f).collect::<Vec<_>>(), 0.5);
    Ok(json!({
        "operation": case.name,
        "direct_static_credentials_ms": {"p50": direct_p50, "p99": percentile(&direct_ms, 0.99)},
        "through_broker_ms": {"p50": percentile(&broker_ms, 0.5), "p99": percentile(&broker_ms, 0.99)},
        "broker_overhead_ms": {"p50": overhead_p50, "p99_difference": p99_difference},
        "overhead_p50_over_direct_p50": overhead_p50 / direct_p50,
        "target_met": overhead_p50 <= 1.2 * direct_p50,
        "broker_stage_medians_ms": {
            "sts_assume_role": median_of(|t| t.mint_ms),
            "precondition_read_concurrent": median_of(|t| t.drift_check_ms),
            "mutation": median_of(|t| t.execute_ms),
        },
    }))
}

async fn propose(
    stream: &mut tokio::net::UnixStream,
    certificate: String,
    request: seb_agent::cert::MutationRequest,
) -> Result<Decision> {
    let body = serde_json::to_vec(&Envelope { v: VERSION, body: Request::Propose { certificate, request } })?;
    write_frame(stream, &body).await?;
    let reply: Envelope<Response> = serde_json::from_slice(&read_frame(stream).await?)?;
    match reply.body {
        Response::Decision(decision) => Ok(*decision),
        other => bail!("expected a decision: {other:?}"),
    }
}
