//! A TLS HTTP/1.1 server inside a sandbox namespace, for stand-in APIs.

use std::{future::Future, net::SocketAddr, os::fd::AsFd, path::Path, sync::Arc};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Request, Response, service::service_fn};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair, SanType};
use seb_agent::cert::ca::{self, CaFiles};
use tokio_rustls::rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::danger::ClientCertVerifier,
};
use x509_parser::prelude::*;

/// Who connected: the client certificate's common name and URI SANs, if any.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub subject: String,
    pub uris: Vec<String>,
}

/// A CA under `dir` and a server certificate from it for `addr`'s IP; returns the CA.
pub fn server_identity(
    dir: &Path,
    name: &str,
    addr: SocketAddr,
) -> Result<(CaFiles, CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let ca = CaFiles { cert: dir.join(format!("{name}-ca.pem")), key: dir.join(format!("{name}-ca.key")) };
    ca::create(&ca, &format!("{name} CA"), &rcgen::PKCS_ECDSA_P256_SHA256)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![SanType::IpAddress(addr.ip())];
    let cert = params.signed_by(&key, &ca.issuer()?)?;
    Ok((ca, cert.der().clone(), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))))
}

/// TLS configuration; with `clients`, only certificates it accepts may connect.
pub fn config(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    clients: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(Arc::new(tokio_rustls::rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?;
    let builder = match clients {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    Ok(builder.with_single_cert(vec![cert], key)?)
}

/// Serve `handler` on `addr` inside `netns` until the returned sender is dropped.
pub fn spawn<H, Fut, B>(
    netns: &str,
    addr: SocketAddr,
    tls: ServerConfig,
    handler: H,
) -> Result<tokio::sync::oneshot::Sender<()>>
where
    H: Fn(Request<Bytes>, Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let serve = || -> Result<()> {
            nix::sched::setns(std::fs::File::open(&path)?.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr).await?;
                let _ = ready_tx.send(());
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
                let accept_loop = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else { continue };
                        let (acceptor, handler) = (acceptor.clone(), handler.clone());
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(stream).await else { return };
                            let peer = peer_of(&tls);
                            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                                let (handler, peer) = (handler.clone(), peer.clone());
                                async move {
                                    let (parts, body) = request.into_parts();
                                    let body = body.collect().await?.to_bytes();
                                    Ok::<_, hyper::Error>(handler(Request::from_parts(parts, body), peer).await)
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tls), service)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept_loop => {},
                    _ = stopped => {},
                }
                Ok::<_, anyhow::Error>(())
            })
        };
        if let Err(e) = serve() {
            eprintln!("stand-in server on {addr}: {e:#}");
        }
    });
    ready.recv_timeout(std::time::Duration::from_secs(10)).context("the server did not start")?;
    Ok(stop)
}

fn peer_of(tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Peer {
    let Some(der) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) else { return Peer::default() };
    let Ok((_, cert)) = X509Certificate::from_der(der) else { return Peer::default() };
    let subject =
        cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or_default().to_string();
    let uris = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| if let GeneralName::URI(uri) = name { Some(uri.to_string()) } else { None })
                .collect()
        })
        .unwrap_or_default();
    Peer { subject, uris }
}
