//! The SAB (Sovereign Assurance Boundary): the authority that certifies one proposed
//! action. Agents send a contract draft and its evidence over mutually authenticated
//! HTTPS; Cedar policies decide (deny by default), people approve where policy says so,
//! and the SAB issues a short-lived certificate binding the exact contract, with the
//! validity, epochs, scoped identity and agent binding it chooses. Every step is a
//! record in its own signed, hash-chained log.

pub mod client;
pub mod config;
pub mod epochs;
pub mod evidence;
pub mod http;
pub mod identity;
pub mod issuer;
pub mod pending;
pub mod pki;
pub mod policy;
pub mod records;
pub mod requests;
pub mod schema;
pub mod service;
pub mod token_review;
mod write_stall;

use anyhow::{Context, Result};

pub use config::SabConfig;
pub use service::Sab;

/// `seb-agent sab serve`: load, then serve the API and watch the policies until stopped.
/// Returns the log's thread: it ends, the log closed, once the runtime (holding the
/// last handles) is shut down.
pub async fn serve(config: SabConfig) -> Result<std::thread::JoinHandle<()>> {
    let tls = http::tls_config(&config.tls)?;
    let listen = config.listen;
    // The port is bound only once the log is verified and the policies loaded: a TCP
    // probe that connects finds a SAB that can answer.
    let (sab, ledger_thread) = Sab::start(config).await?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
    let watcher = tokio::spawn(service::watch_policies(sab.clone()));
    let stop_summaries = tokio_util::sync::CancellationToken::new();
    let summaries = tokio::spawn(sab.clone().record_suppressed_refusals_each_second(stop_summaries.clone()));
    let result = tokio::select! {
        result = http::serve(sab.clone(), listener, tls) => result,
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminated() => Ok(()),
    };
    watcher.abort();
    stop_summaries.cancel();
    let _ = summaries.await;
    sab.record_suppressed_refusals(true).await;
    result.map(|()| ledger_thread)
}

async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut signal) => {
            signal.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
