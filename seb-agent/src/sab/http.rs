//! The HTTPS API (v1): TLS 1.3 with client certificates from the SAB's client CA; the
//! caller is the certificate's identity URI. A client without a certificate (the
//! kubelet's readiness probe) gets one answer per connection, and only to
//! `GET /v1/healthz`, without the epochs. Bounded: handshakes and connections at once
//! (and connections per caller), handshake, header and body time, body size.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        RootCertStore, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
        version::TLS13,
    },
};
use tracing::{debug, info, warn};

use super::{
    config::TlsConfig,
    identity::Caller,
    service::{Answer, Reply, Sab},
    token_review::{Mismatch, TokenReviewer},
};

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A body announced in the headers must have arrived this long after them.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// A client without a certificate (a probe) sends its one request at once.
const UNIDENTIFIED_HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// Connections at once of clients without an identity, per source address.
const UNIDENTIFIED_PER_SOURCE: usize = 2;
/// The key all connections without an identity share.
const UNIDENTIFIED: &str = "(no identity)";

/// Connections of one caller (client certificate), and handshakes of one source address,
/// at once: a quarter of `max_connections`, at most 16, so that one caller, or a few
/// pods holding handshakes open, cannot keep the others out.
pub fn per_caller(max_connections: usize) -> usize {
    (max_connections / 4).clamp(1, 16)
}

/// TLS 1.3; a client certificate, when one is presented, must chain to `client_ca`.
pub fn tls_config(tls: &TlsConfig) -> Result<ServerConfig> {
    let chain = CertificateDer::pem_file_iter(&tls.certificate)
        .with_context(|| format!("reading {}", tls.certificate.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).with_context(|| format!("reading {}", tls.key.display()))?;
    let mut roots = RootCertStore::empty();
    for der in
        CertificateDer::pem_file_iter(&tls.client_ca).with_context(|| format!("reading {}", tls.client_ca.display()))?
    {
        roots.add(der?)?;
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    // Without a certificate a client reaches nothing but the health answer (`route`).
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    Ok(ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?)
}

/// Serve the API on `listener` until the task is dropped.
pub async fn serve(sab: Arc<Sab>, listener: TcpListener, tls: ServerConfig) -> Result<()> {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let max_connections = sab.config().max_connections;
    // Handshakes (anyone who can reach the port) and established connections (callers
    // with a certificate) take from separate pools: a flood of stalled handshakes delays
    // new connections, never the ones established.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let established = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let callers = Arc::new(crate::connection_shares::Shares::<String>::default());
    // One address's handshakes take at most a caller's share of their pool: handshakes
    // begun and never finished from one host delay no other host's.
    let sources = Arc::new(crate::connection_shares::Shares::<std::net::IpAddr>::default());
    info!(addr = %listener.local_addr()?, "SAB ready");
    loop {
        let handshake = handshakes.clone().acquire_owned().await?;
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(source_share) = sources.take(&peer.ip(), per_caller(max_connections)) else {
            debug!(%peer, "connection closed: its address has its share of handshakes under way");
            continue;
        };
        // A reply goes out as soon as it is written, not after the client's delayed ACK.
        if let Err(e) = stream.set_nodelay(true) {
            warn!(%peer, error = %e, "TCP_NODELAY could not be set");
        }
        let (acceptor, sab, established, callers) =
            (acceptor.clone(), sab.clone(), established.clone(), callers.clone());
        tokio::spawn(async move {
            // Under TLS, where each write to the socket that moves any bytes is progress
            // (rustls flushes its buffer in a loop that returns pending until all is out).
            let stream = super::write_stall::WriteStallLimit::new(stream);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return warn!(%peer, error = %e, "TLS handshake refused"),
                Err(_) => return warn!(%peer, "TLS handshake timed out"),
            };
            drop((handshake, source_share));
            let caller = match tls.get_ref().1.peer_certificates().and_then(|chain| chain.first()) {
                Some(der) => Caller::of_certificate(der).map_err(|e| Refused::Identity(format!("{e:#}"))),
                None => Err(Refused::NoCertificate),
            };
            // A client without an identity (a probe) is answered once, then closed.
            let keep_alive = caller.is_ok();
            let Ok(_connection) = established.try_acquire_owned() else {
                return warn!(%peer, "connection refused: {max_connections} connections are open");
            };
            // Callers by their identity; clients without one (probes) by their address,
            // a few each, so that no one holds the kubelet's probe out from elsewhere.
            let (name, share) = match &caller {
                Ok(caller) => (caller.uri().to_owned(), per_caller(max_connections)),
                Err(_) => (format!("no identity from {}", peer.ip()), UNIDENTIFIED_PER_SOURCE),
            };
            let Some(_caller_slot) = callers.take(&name, share) else {
                return warn!(%peer, caller = %name, "connection refused: the caller has its share of connections open");
            };
            // And all of them together no more than one caller's share of the pool that
            // callers with an identity need.
            let _unidentified_slot = match &caller {
                Ok(_) => None,
                Err(_) => match callers.take(&UNIDENTIFIED.to_string(), per_caller(max_connections)) {
                    Some(slot) => Some(slot),
                    None => return warn!(%peer, "connection refused: clients without an identity hold their share"),
                },
            };
            let caller = Arc::new(caller);
            let service = service_fn(move |request| {
                let (sab, caller) = (sab.clone(), caller.clone());
                async move { Ok::<_, hyper::Error>(respond(route(&sab, &caller, request).await)) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(if keep_alive { HEADER_TIMEOUT } else { UNIDENTIFIED_HEADER_TIMEOUT })
                .keep_alive(keep_alive)
                .serve_connection(TokioIo::new(tls), service)
                .await;
            if let Err(e) = served {
                warn!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

fn respond(reply: Reply) -> Response<Full<Bytes>> {
    Response::builder()
        .status(reply.status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(reply.body.to_string())))
        .expect("a valid response")
}

/// Why a connection has no caller.
enum Refused {
    NoCertificate,
    /// A certificate of the client CA that names no caller.
    Identity(String),
}

async fn route(sab: &Sab, caller: &Result<Caller, Refused>, request: Request<Incoming>) -> Reply {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let caller = match caller {
        Ok(caller) => caller,
        Err(Refused::NoCertificate) if method == Method::GET && path == "/v1/healthz" => {
            return sab.health(false).await;
        }
        Err(Refused::NoCertificate) => {
            return Reply::error(
                401,
                "certificate_required",
                "only GET /v1/healthz is answered without a client certificate",
            );
        }
        Err(Refused::Identity(e)) => {
            return Reply::error(403, "bad_identity", format!("the client certificate names no caller: {e}"));
        }
    };
    let query = request.uri().query().map(str::to_string);
    let bearer = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::to_string);
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let body = match read_body(request).await {
        Ok(body) => body,
        Err(reply) => return reply,
    };
    match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "healthz"]) => sab.health(true).await,
        (&Method::POST, ["v1", "certify"]) => match sab.reviewer() {
            None => sab.certify(caller, &body).await,
            Some(reviewer) => match reviewed(reviewer, caller, bearer.as_deref()).await {
                Ok(caller) => sab.certify(&caller, &body).await,
                Err(reply) => reply,
            },
        },
        (&Method::GET, ["v1", "requests"]) => {
            let param = |name: &str| {
                let prefix = format!("{name}=");
                query
                    .as_deref()
                    .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix(&prefix)).map(str::to_string))
            };
            let offset = match param("offset").map(|text| text.parse::<usize>()) {
                None => 0,
                Some(Ok(offset)) => offset,
                Some(Err(_)) => return Reply::error(400, "malformed", "offset is a count of requests to skip"),
            };
            sab.list(caller, param("status").as_deref(), offset).await
        }
        (&Method::GET, ["v1", "requests", id]) => sab.get(caller, id).await,
        (&Method::POST, ["v1", "requests", id, action @ ("approve" | "deny")]) => {
            let reason = match reason_of(&body) {
                Ok(reason) => reason,
                Err(reply) => return reply,
            };
            let answer = if *action == "approve" { Answer::Approve } else { Answer::Deny };
            sab.decide(caller, id, answer, reason).await
        }
        (_, ["v1", "healthz"] | ["v1", "certify"] | ["v1", "requests", ..]) => {
            Reply::error(405, "method_not_allowed", format!("{method} is not allowed on {path}"))
        }
        _ => Reply::error(404, "not_found", format!("no endpoint {path}")),
    }
}

/// Cluster mode: the certificate's agent, bound to the pod its ServiceAccount token names.
async fn reviewed(reviewer: &TokenReviewer, caller: &Caller, token: Option<&str>) -> Result<Caller, Reply> {
    let Caller::Agent(agent) = caller else { return Ok(caller.clone()) };
    let Some(token) = token else {
        return Err(Reply::error(
            401,
            "token_required",
            "in cluster mode an agent sends Authorization: Bearer <ServiceAccount token>",
        ));
    };
    let pod = reviewer.review(token).await.map_err(|e| Reply::error(401, "token_refused", format!("{e:#}")))?;
    pod.bind(agent.clone()).map(Caller::Agent).map_err(|mismatch| match mismatch {
        Mismatch::Node(message) => Reply::error(403, "wrong_node", message),
        Mismatch::Pod(message) => Reply::error(403, "wrong_pod", message),
    })
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, Reply> {
    let reading = tokio::time::timeout(BODY_TIMEOUT, Limited::new(request.into_body(), MAX_BODY).collect()).await;
    let Ok(read) = reading else {
        return Err(Reply::error(
            408,
            "timeout",
            format!("the body did not arrive within {} s", BODY_TIMEOUT.as_secs()),
        ));
    };
    match read {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(Reply::error(413, "too_large", format!("the body exceeds {MAX_BODY} bytes")))
        }
        Err(e) => Err(Reply::error(400, "malformed", format!("reading the body: {e}"))),
    }
}

/// `{"reason": "..."}`, or an empty body.
fn reason_of(body: &[u8]) -> Result<Option<String>, Reply> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        #[serde(default)]
        reason: Option<String>,
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let body: Body = serde_json::from_slice(body)
        .map_err(|e| Reply::error(400, "malformed", format!("the body is not {{\"reason\": \"...\"}}: {e}")))?;
    match body.reason {
        Some(reason) if reason.len() > 4096 => Err(Reply::error(400, "malformed", "reason exceeds 4096 bytes")),
        reason => Ok(reason),
    }
}
