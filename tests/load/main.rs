//! `seb-load`: the client side of `cargo xtask bench admission` and `bench sab`, built
//! optimised like the broker and the SAB, so the measurement is not bounded by the load
//! generator.
//!
//! `seb-load admission` sends each certificate of `--certificates` (JSON lines of PEM
//! strings) once, with the request in `--request`, from `--clients` connections at once,
//! each proposal after the previous answer on its connection. Every answer must be an
//! admission.
//!
//! `seb-load sab` sends the certify body in `--body` to a SAB: `--warmup` then `--count`
//! times on one kept-alive connection, then `--count` times shared out between
//! `--clients` connections at once. Every answer must be a certificate.
//!
//! Both print JSON: every latency in microseconds and the wall time of the concurrent part.

use std::{path::PathBuf, time::Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use seb_agent::{
    cert::MutationRequest,
    protocol::{Envelope, Request, VERSION, encode_frame, read_frame},
    sab::client::{SabClient, Session},
};
use serde_json::{Value, json};
use tokio::{io::AsyncWriteExt, net::UnixStream};

/// The broker's allocator, so the load generator costs the shared CPUs no more than it must.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Proposals to a broker.
    Admission(Admission),
    /// Certify requests to a SAB.
    Sab(SabLoad),
}

#[derive(clap::Args)]
struct SabLoad {
    /// `https://host:port`.
    #[arg(long)]
    url: String,
    /// The client certificate, its key, and the CA of the SAB's server certificate (PEM).
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long)]
    ca: PathBuf,
    /// The certify body (JSON).
    #[arg(long)]
    body: PathBuf,
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    #[arg(long, default_value_t = 2000)]
    count: usize,
    #[arg(long, default_value_t = 8)]
    clients: usize,
}

#[derive(clap::Args)]
struct Admission {
    #[arg(long)]
    socket: PathBuf,
    /// One JSON string (a PEM certificate) per line, each used once.
    #[arg(long)]
    certificates: PathBuf,
    /// The certified request (JSON).
    #[arg(long)]
    request: PathBuf,
    /// Connections proposing at once; the certificates are shared out between them.
    #[arg(long, default_value_t = 1)]
    clients: usize,
}

fn main() -> Result<()> {
    match Cli::parse().mode {
        Mode::Admission(admission) => admission.run(),
        Mode::Sab(sab) => sab.run(),
    }
}

impl SabLoad {
    fn run(self) -> Result<()> {
        let body: Value = serde_json::from_slice(&std::fs::read(&self.body)?).context("reading the certify body")?;
        let client = SabClient::new(&self.url, &self.cert, &self.key, &self.ca)?;
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let result = runtime.block_on(async {
            let mut session = client.session().await?;
            certify_many(&mut session, &body, self.warmup).await?;
            let sequential = certify_many(&mut session, &body, self.count).await?;
            // Connect first, so the clock measures certifies only.
            let mut sessions = Vec::new();
            for _ in 0..self.clients.max(1) {
                sessions.push(client.session().await?);
            }
            let per_client = self.count.div_ceil(sessions.len());
            let started = Instant::now();
            let tasks: Vec<_> = sessions
                .into_iter()
                .map(|mut session| {
                    let body = body.clone();
                    tokio::spawn(async move { certify_many(&mut session, &body, per_client).await })
                })
                .collect();
            let mut concurrent = Vec::new();
            for task in tasks {
                concurrent.extend(task.await??);
            }
            let seconds = started.elapsed().as_secs_f64();
            anyhow::Ok(json!({"sequential_us": sequential, "concurrent_us": concurrent, "seconds": seconds}))
        })?;
        println!("{result}");
        Ok(())
    }
}

/// `count` certifies one after another on `session`; each latency in microseconds.
async fn certify_many(session: &mut Session, body: &Value, count: usize) -> Result<Vec<f64>> {
    let mut latencies = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let (status, reply) = session.call("POST", "/v1/certify", Some(body)).await?;
        latencies.push(started.elapsed().as_secs_f64() * 1e6);
        ensure!(status == 200, "a certificate was expected: {reply}");
    }
    Ok(latencies)
}

impl Admission {
    fn run(self) -> Result<()> {
        let cli = self;
        let request: MutationRequest = serde_json::from_slice(&std::fs::read(&cli.request)?)?;
        let certificates: Vec<String> = std::fs::read_to_string(&cli.certificates)?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .context("reading the certificates")?;
        // Encoded before the clock starts: the broker's work is measured, not this one's.
        let proposals: Vec<Vec<u8>> = certificates
            .into_iter()
            .map(|certificate| {
                encode_frame(&Envelope { v: VERSION, body: Request::Propose { certificate, request: request.clone() } })
            })
            .collect::<Result<_, _>>()?;
        let per_client = proposals.len().div_ceil(cli.clients.max(1));
        // One thread: the clients mostly wait, and the broker gets the other core.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (latencies, seconds) = runtime.block_on(async {
            // Connect first, so the clock measures proposals only.
            let mut streams = Vec::new();
            for _ in proposals.chunks(per_client) {
                streams.push(UnixStream::connect(&cli.socket).await.context("connecting to the broker")?);
            }
            let started = Instant::now();
            let tasks: Vec<_> = proposals
                .chunks(per_client)
                .zip(streams)
                .map(|(chunk, stream)| tokio::spawn(client(stream, chunk.to_vec())))
                .collect();
            let mut latencies = Vec::with_capacity(proposals.len());
            for task in tasks {
                latencies.extend(task.await??);
            }
            anyhow::Ok((latencies, started.elapsed().as_secs_f64()))
        })?;
        println!("{}", json!({"latencies_us": latencies, "seconds": seconds}));
        Ok(())
    }
}

/// The part of a broker's answer that tells an admission.
#[derive(serde::Deserialize)]
struct Answer<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    admitted: Option<bool>,
}

/// Encoded proposals (frames) one after another on one connection; each latency in
/// microseconds.
async fn client(mut stream: UnixStream, proposals: Vec<Vec<u8>>) -> Result<Vec<f64>> {
    let mut latencies = Vec::with_capacity(proposals.len());
    for frame in proposals {
        let started = Instant::now();
        stream.write_all(&frame).await?;
        let reply = read_frame(&mut stream).await?;
        latencies.push(started.elapsed().as_secs_f64() * 1e6);
        // Only what tells an admission: the broker's work is measured, not this one's.
        let answer: Answer = serde_json::from_slice(&reply)?;
        if answer.kind != "decision" || answer.admitted != Some(true) {
            bail!("an admission was expected: {}", String::from_utf8_lossy(&reply));
        }
    }
    Ok(latencies)
}
