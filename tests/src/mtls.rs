//! An internal API that demands mutual TLS, for the HTTPS executor: a key-value store
//! in the sandbox's namespace that accepts only client certificates from the broker's
//! issuing CA, and remembers who called.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, service::service_fn};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair, SanType};
use seb_agent::cert::ca::{self, CaFiles};
use tokio_rustls::rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use x509_parser::prelude::*;

/// One request as the API saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub client_subject: String,
    pub client_uris: Vec<String>,
}

pub struct InternalApi {
    /// The CA the API's server certificate chains to (the broker's `http.trust_anchors`).
    pub server_ca: PathBuf,
    /// The broker's issuing CA, the only one the API accepts clients from.
    pub client_ca: CaFiles,
    pub store: Arc<Mutex<HashMap<String, Bytes>>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Start the API on `addr` inside `netns`; certificates are written under `dir`.
pub fn start(netns: &str, addr: SocketAddr, dir: &Path) -> Result<InternalApi> {
    let server_ca = CaFiles { cert: dir.join("internal-ca.pem"), key: dir.join("internal-ca.key") };
    ca::create(&server_ca, "internal API CA", &rcgen::PKCS_ECDSA_P256_SHA256)?;
    let client_ca = CaFiles { cert: dir.join("client-ca.pem"), key: dir.join("client-ca.key") };
    ca::create(&client_ca, "seb broker client CA", &rcgen::PKCS_ECDSA_P256_SHA256)?;

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![SanType::IpAddress(addr.ip())];
    let cert = params.signed_by(&key, &server_ca.issuer()?)?;
    let mut client_roots = RootCertStore::empty();
    for der in CertificateDer::pem_file_iter(&client_ca.cert)? {
        client_roots.add(der?)?;
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(client_roots), provider.clone()).build()?;
    let tls = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )?;

    let store = Arc::new(Mutex::new(HashMap::new()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let (path, store2, seen2) = (format!("/run/netns/{netns}"), store.clone(), seen.clone());
    std::thread::spawn(move || {
        let serve = || -> Result<()> {
            nix::sched::setns(std::fs::File::open(&path)?.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr).await?;
                let _ = ready_tx.send(());
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
                let accept_loop = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else { continue };
                        let (acceptor, store, seen) = (acceptor.clone(), store2.clone(), seen2.clone());
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(stream).await else { return };
                            let (subject, uris) = client_identity(&tls);
                            let service = service_fn(move |request| {
                                handle(request, store.clone(), seen.clone(), subject.clone(), uris.clone())
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
            eprintln!("internal API: {e:#}");
        }
    });
    ready.recv_timeout(std::time::Duration::from_secs(10)).context("the internal API did not start")?;
    Ok(InternalApi { server_ca: server_ca.cert, client_ca, store, seen, _stop: stop })
}

fn client_identity(tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> (String, Vec<String>) {
    let Some(der) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
        return (String::new(), Vec::new());
    };
    let Ok((_, cert)) = X509Certificate::from_der(der) else { return (String::new(), Vec::new()) };
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
    (subject, uris)
}

async fn handle(
    request: Request<hyper::body::Incoming>,
    store: Arc<Mutex<HashMap<String, Bytes>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    client_subject: String,
    client_uris: Vec<String>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    seen.lock().unwrap().push(Seen { method: method.to_string(), path: path.clone(), client_subject, client_uris });
    let body = request.into_body().collect().await?.to_bytes();
    let mut store = store.lock().unwrap();
    let (status, body) = match method.as_str() {
        "GET" => match store.get(&path) {
            Some(value) => (StatusCode::OK, value.clone()),
            None => (StatusCode::NOT_FOUND, Bytes::new()),
        },
        "PUT" => {
            store.insert(path, body);
            (StatusCode::OK, Bytes::new())
        }
        "DELETE" => {
            store.remove(&path);
            (StatusCode::NO_CONTENT, Bytes::new())
        }
        _ => (StatusCode::METHOD_NOT_ALLOWED, Bytes::new()),
    };
    Ok(Response::builder().status(status).body(Full::new(body)).expect("response"))
}
