//! A client of the SAB's HTTPS API (v1), for agents: mutual TLS with the agent's own
//! certificate (its identity to the SAB), JSON in and out, answers bounded in size.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_rustls::rustls::{
    ClientConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};

use crate::{
    cert::MutationRequest,
    execute::{broker_http, passthrough::ReadResult},
};

/// Largest answer read from the SAB: a certificate chain and its contract fit many times.
const MAX_ANSWER: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(30);

/// Where the SAB is and who this agent is to it.
#[derive(Debug, Clone, clap::Args)]
pub struct SabOptions {
    /// The SAB's URL, https://host:port.
    #[arg(long = "sab-url", env = "SEB_SAB_URL")]
    pub url: String,
    /// This agent's client certificate for the SAB (PEM), issued by the SAB's client CA.
    #[arg(long = "sab-cert", env = "SEB_SAB_CERT")]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long = "sab-key", env = "SEB_SAB_KEY")]
    pub key: PathBuf,
    /// The CA certificates the SAB's server certificate chains to (PEM).
    #[arg(long = "sab-ca", env = "SEB_SAB_CA")]
    pub ca: PathBuf,
}

/// The body of `POST /v1/certify`: what the agent wants, on what state, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Draft {
    pub request: MutationRequest,
    pub precondition: String,
    pub live_state: ReadResult,
    pub intent: String,
}

/// What the SAB answered a certify with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Certified {
    Issued {
        request_id: String,
        certificate: String,
        #[serde(default)]
        contract: Value,
        #[serde(default)]
        evidence_digest: Option<String>,
        #[serde(default)]
        not_after: Option<String>,
    },
    Refused {
        request_id: String,
        #[serde(default)]
        reasons: Vec<String>,
    },
    Pending {
        request_id: String,
        #[serde(default)]
        approvals_required: u32,
        #[serde(default)]
        approvers: Vec<String>,
    },
}

pub struct SabClient {
    uri: Uri,
    host: String,
    port: u16,
    tls: Arc<ClientConfig>,
}

impl SabClient {
    pub fn new(options: &SabOptions) -> Result<Self> {
        let uri: Uri = options.url.parse().with_context(|| format!("the SAB URL `{}` is not a URL", options.url))?;
        if uri.scheme_str() != Some("https") {
            bail!("the SAB URL `{}` must be https://", options.url);
        }
        let host = uri.host().context("the SAB URL has no host")?.trim_matches(['[', ']']).to_string();
        let port = uri.port_u16().unwrap_or(443);
        let roots = broker_http::roots_from_pem_file(&options.ca, "--sab-ca")?;
        let chain = CertificateDer::pem_file_iter(&options.cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("reading the SAB client certificate {}", options.cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(&options.key)
            .with_context(|| format!("reading the SAB client key {}", options.key.display()))?;
        let tls = broker_http::tls_builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .context("the SAB client certificate and key do not match")?;
        Ok(Self { uri, host, port, tls: Arc::new(tls) })
    }

    pub async fn certify(&self, draft: &Draft) -> Result<Certified> {
        let (status, body) = self.call(Method::POST, "/v1/certify", Some(serde_json::to_vec(draft)?)).await?;
        match status {
            StatusCode::OK | StatusCode::ACCEPTED | StatusCode::FORBIDDEN if body.get("status").is_some() => {
                serde_json::from_value(body).context("the SAB's certify answer is not valid")
            }
            _ => bail!(api_error(status, &body)),
        }
    }

    /// `GET /v1/requests/{id}`: the request's state as the SAB reports it.
    pub async fn request(&self, request_id: &str) -> Result<Value> {
        if request_id.is_empty() || !request_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("`{request_id}` is not a request id");
        }
        let (status, body) = self.call(Method::GET, &format!("/v1/requests/{request_id}"), None).await?;
        if status != StatusCode::OK {
            bail!(api_error(status, &body));
        }
        Ok(body)
    }

    async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<(StatusCode, Value)> {
        tokio::time::timeout(TIMEOUT, self.exchange(method, path, body))
            .await
            .with_context(|| format!("the SAB at {} did not answer within {TIMEOUT:?}", self.uri))?
            .with_context(|| format!("calling the SAB at {}", self.uri))
    }

    async fn exchange(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<(StatusCode, Value)> {
        let base = self.uri.path().trim_end_matches('/');
        let request = Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .header(http::header::HOST, format!("{}:{}", self.host, self.port))
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
        let name = ServerName::try_from(self.host.clone())?;
        let stream = tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, stream).await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let response = sender.send_request(request).await?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the answer (at most {MAX_ANSWER} bytes): {e}"))?
            .to_bytes();
        let value =
            serde_json::from_slice(&bytes).with_context(|| format!("the SAB's answer ({status}) is not JSON"))?;
        Ok((status, value))
    }
}

/// `{"error":{"code","message"}}` as one line for people (and language models).
fn api_error(status: StatusCode, body: &Value) -> String {
    let code = body["error"]["code"].as_str().unwrap_or("error");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    format!("the SAB answered {status}: {code}: {message}")
}
