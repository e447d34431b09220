//! `seb-load`: the proposing side of `cargo xtask bench admission`, built optimised like
//! the broker, so the measurement is not bounded by the load generator.
//!
//! It sends each certificate of `--certificates` (JSON lines of PEM strings) once, with
//! the request in `--request`, from `--clients` connections at once, each proposal after
//! the previous answer on its connection, and prints JSON: every latency in microseconds
//! and the wall time. Every answer must be an admission.

use std::{path::PathBuf, time::Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use seb_agent::{
    cert::MutationRequest,
    protocol::{Envelope, Request, Response, VERSION, read_frame, write_frame},
};
use serde_json::json;
use tokio::net::UnixStream;

#[derive(Parser)]
struct Cli {
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
    let cli = Cli::parse();
    let request: MutationRequest = serde_json::from_slice(&std::fs::read(&cli.request)?)?;
    let certificates: Vec<String> = std::fs::read_to_string(&cli.certificates)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("reading the certificates")?;
    let per_client = certificates.len().div_ceil(cli.clients.max(1));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (latencies, seconds) = runtime.block_on(async {
        // Connect first, so the clock measures proposals only.
        let mut streams = Vec::new();
        for _ in certificates.chunks(per_client) {
            streams.push(UnixStream::connect(&cli.socket).await.context("connecting to the broker")?);
        }
        let started = Instant::now();
        let tasks: Vec<_> = certificates
            .chunks(per_client)
            .zip(streams)
            .map(|(chunk, stream)| tokio::spawn(client(stream, chunk.to_vec(), request.clone())))
            .collect();
        let mut latencies = Vec::with_capacity(certificates.len());
        for task in tasks {
            latencies.extend(task.await??);
        }
        anyhow::Ok((latencies, started.elapsed().as_secs_f64()))
    })?;
    println!("{}", json!({"latencies_us": latencies, "seconds": seconds}));
    Ok(())
}

/// Proposals one after another on one connection; each latency in microseconds.
async fn client(mut stream: UnixStream, certificates: Vec<String>, request: MutationRequest) -> Result<Vec<f64>> {
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
        match serde_json::from_slice::<Envelope<Response>>(&reply)?.body {
            Response::Decision(decision) if decision.admitted => {}
            other => bail!("an admission was expected: {other:?}"),
        }
    }
    Ok(latencies)
}
