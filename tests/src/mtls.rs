//! An internal API that demands mutual TLS, for the HTTPS executor: a key-value store
//! in the sandbox's namespace that accepts only client certificates from the broker's
//! issuing CA, and remembers who called.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use seb_agent::cert::ca::{self, CaFiles};
use tokio_rustls::rustls::{
    RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

use crate::tls_server::{self, Peer};

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
    /// How long a GET's answer is held back (it is read on arrival): widens the window
    /// between a drift read and the write after it.
    pub read_delay: Arc<Mutex<Duration>>,
    /// When set, a write is made and then answered with a body this long (past what the
    /// broker reads): the exchange fails after the server took the request.
    pub write_answer_bytes: Arc<Mutex<Option<usize>>>,
    /// When set, a write is made and then answered with this status (a gateway that lost
    /// the answer, or an API refusing after the fact).
    pub write_status: Arc<Mutex<Option<StatusCode>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Start the API on `addr` inside `netns`; certificates are written under `dir`.
pub fn start(netns: &str, addr: SocketAddr, dir: &Path) -> Result<InternalApi> {
    let (server_ca, cert, key) = tls_server::server_identity(dir, "internal", addr)?;
    let client_ca = CaFiles { cert: dir.join("client-ca.pem"), key: dir.join("client-ca.key") };
    ca::create(&client_ca, "seb broker client CA", &rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut client_roots = RootCertStore::empty();
    for der in CertificateDer::pem_file_iter(&client_ca.cert)? {
        client_roots.add(der?)?;
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(client_roots), provider).build()?;
    let tls = tls_server::config(cert, key, Some(verifier))?;
    let store = Arc::new(Mutex::new(HashMap::new()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let read_delay = Arc::new(Mutex::new(Duration::ZERO));
    let write_answer_bytes = Arc::new(Mutex::new(None));
    let write_status = Arc::new(Mutex::new(None));
    let (store2, seen2, read_delay2, answer2, status2) =
        (store.clone(), seen.clone(), read_delay.clone(), write_answer_bytes.clone(), write_status.clone());
    let stop = tls_server::spawn(netns, addr, tls, move |request, peer| {
        let read = request.method() == hyper::Method::GET;
        let delay = if read { *read_delay2.lock().unwrap() } else { Duration::ZERO };
        let answer = if read { None } else { *answer2.lock().unwrap() };
        let mut response = handle(request, &store2, &seen2, peer);
        if let Some(bytes) = answer {
            *response.body_mut() = Full::new(Bytes::from(vec![b'x'; bytes]));
        }
        if let Some(status) = (!read).then(|| *status2.lock().unwrap()).flatten() {
            *response.status_mut() = status;
        }
        async move {
            tokio::time::sleep(delay).await;
            response
        }
    })?;
    Ok(InternalApi {
        server_ca: server_ca.cert,
        client_ca,
        store,
        seen,
        read_delay,
        write_answer_bytes,
        write_status,
        _stop: stop,
    })
}

fn handle(
    request: Request<Bytes>,
    store: &Mutex<HashMap<String, Bytes>>,
    seen: &Mutex<Vec<Seen>>,
    peer: Peer,
) -> Response<Full<Bytes>> {
    let (method, path) = (request.method().to_string(), request.uri().path().to_string());
    seen.lock().unwrap().push(Seen {
        method: method.clone(),
        path: path.clone(),
        client_subject: peer.subject,
        client_uris: peer.uris,
    });
    let mut store = store.lock().unwrap();
    let (status, body) = match method.as_str() {
        "GET" => match store.get(&path) {
            Some(value) => (StatusCode::OK, value.clone()),
            None => (StatusCode::NOT_FOUND, Bytes::new()),
        },
        "PUT" => {
            store.insert(path, request.into_body());
            (StatusCode::OK, Bytes::new())
        }
        "DELETE" => {
            store.remove(&path);
            (StatusCode::NO_CONTENT, Bytes::new())
        }
        _ => (StatusCode::METHOD_NOT_ALLOWED, Bytes::new()),
    };
    Response::builder().status(status).body(Full::new(body)).expect("response")
}
