//! A stand-in for the SAB's HTTPS API (v1) in a sandbox namespace, for the clients'
//! tests: mutual TLS against its own client CA, `POST /v1/certify` issues a dev-SAB
//! certificate binding the caller's cgroup (from its `seb://node/<node>/cgroup/<path>`
//! URI SAN) and the precondition it was shown, `GET /v1/requests/{id}` reads it back.
//! It evaluates no policy: every certify is issued.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use rcgen::{CertificateParams, DnType, KeyPair, SanType};
use seb_agent::cert::{
    MutationRequest,
    ca::{self, CaFiles},
    contract::{AgentIdentity, ScopedIdentity},
    dev_sab::{self, IssueOptions},
};
use serde_json::{Value, json};
use tokio_rustls::rustls::{
    RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

use crate::{
    broker::certified,
    tls_server::{self, Peer},
};

/// The files a SAB client needs.
#[derive(Debug, Clone)]
pub struct ClientFiles {
    pub url: String,
    pub server_ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct SabStandin {
    pub url: String,
    pub server_ca: PathBuf,
    client_ca: CaFiles,
    dir: PathBuf,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Start the stand-in on `addr` inside `netns`, issuing with `sab` (the CA the broker
/// trusts) for the identity `role_arn`.
pub fn start(netns: &str, addr: SocketAddr, dir: &Path, sab: CaFiles, role_arn: &str) -> Result<SabStandin> {
    let (server_ca, cert, key) = tls_server::server_identity(dir, "sab-server", addr)?;
    let client_ca = CaFiles { cert: dir.join("sab-client-ca.pem"), key: dir.join("sab-client-ca.key") };
    ca::create(&client_ca, "seb SAB client CA", &rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut roots = RootCertStore::empty();
    for der in CertificateDer::pem_file_iter(&client_ca.cert)? {
        roots.add(der?)?;
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
    let tls = tls_server::config(cert, key, Some(verifier))?;
    let requests: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
    let role = ScopedIdentity::AwsRole { role_arn: role_arn.into() };
    let stop = tls_server::spawn(netns, addr, tls, move |request, peer| {
        let response = handle(request, &peer, &sab, &role, &requests);
        async move { response }
    })?;
    Ok(SabStandin {
        url: format!("https://{addr}"),
        server_ca: server_ca.cert,
        client_ca,
        dir: dir.into(),
        _stop: stop,
    })
}

impl SabStandin {
    /// A client certificate for an agent in `cgroup` (relative to the cgroup2 mount).
    pub fn agent(&self, name: &str, cgroup: &str) -> Result<ClientFiles> {
        self.client(name, &format!("seb://node/local/cgroup/{}", cgroup.trim_start_matches('/')))
    }

    fn client(&self, name: &str, uri: &str) -> Result<ClientFiles> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.client_ca.issuer()?)?;
        let files = ClientFiles {
            url: self.url.clone(),
            server_ca: self.server_ca.clone(),
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }
}

fn handle(
    request: Request<Bytes>,
    peer: &Peer,
    sab: &CaFiles,
    role: &ScopedIdentity,
    requests: &Mutex<HashMap<String, Value>>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_string();
    let (status, body) = match (request.method(), path.as_str()) {
        (&Method::POST, "/v1/certify") => match certify(request.body(), peer, sab, role) {
            Ok(issued) => {
                requests
                    .lock()
                    .unwrap()
                    .insert(issued["request_id"].as_str().unwrap_or_default().into(), issued.clone());
                (StatusCode::OK, issued)
            }
            Err(e) => (StatusCode::BAD_REQUEST, error("invalid_request", &format!("{e:#}"))),
        },
        (&Method::GET, "/v1/healthz") => (StatusCode::OK, json!({"status": "ok", "policy_epoch": 1})),
        (&Method::GET, _) if path.starts_with("/v1/requests/") => {
            match requests.lock().unwrap().get(&path["/v1/requests/".len()..]) {
                Some(state) => (StatusCode::OK, state.clone()),
                None => (StatusCode::NOT_FOUND, error("not_found", "no such request")),
            }
        }
        _ => (StatusCode::NOT_FOUND, error("not_found", "no such endpoint")),
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

fn certify(body: &[u8], peer: &Peer, sab: &CaFiles, role: &ScopedIdentity) -> Result<Value> {
    let draft: Value = serde_json::from_slice(body)?;
    let request: MutationRequest = serde_json::from_value(draft["request"].clone())?;
    let precondition = draft["precondition"].as_str().ok_or_else(|| anyhow::anyhow!("no precondition"))?;
    let cgroup = peer
        .uris
        .iter()
        .find_map(|uri| uri.strip_prefix("seb://node/local/cgroup/"))
        .ok_or_else(|| anyhow::anyhow!("the client certificate names no agent cgroup"))?;
    let agent = AgentIdentity { cgroup: Some(format!("/{cgroup}")), ..Default::default() };
    let request_id = uuid_like();
    let contract = certified(&request_id, agent, &request, precondition, role.clone());
    let certificate = dev_sab::issue(sab, &contract, &IssueOptions::default())?;
    Ok(json!({
        "status": "issued", "request_id": request_id, "certificate": certificate,
        "contract": contract, "evidence_digest": contract.evidence_digest, "approvals": [],
    }))
}

fn uuid_like() -> String {
    ca::random_serial().iter().map(|byte| format!("{byte:02x}")).collect()
}

fn error(code: &str, message: &str) -> Value {
    json!({"error": {"code": code, "message": message}})
}
