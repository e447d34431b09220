//! A client of the SAB API, with a client certificate: for the CLI and tests.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio_rustls::{
    TlsConnector,
    rustls::{
        ClientConfig, RootCertStore,
        pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    },
};

const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read from the SAB: a certificate, a request's state, or a list of them.
pub const MAX_REPLY: usize = 32 << 20;

/// A request id as the SAB issues them (letters, digits, `-`): anything else is refused
/// before it is put in a path, where `R/approve?` would turn a deny into an approval.
pub fn request_id(text: &str) -> Result<String> {
    if text.is_empty() || text.len() > 64 || !text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        bail!("`{text}` is not a request id (letters, digits and `-`)");
    }
    Ok(text.to_owned())
}

pub struct SabClient {
    host: String,
    port: u16,
    tls: Arc<ClientConfig>,
    bearer: Option<Bearer>,
}

/// The ServiceAccount token sent in cluster mode: given, or read from its file at each
/// connection (a projected token is rotated in place).
#[derive(Debug, Clone)]
enum Bearer {
    Token(String),
    File(std::path::PathBuf),
}

impl SabClient {
    /// `url` is `https://host[:port]`; `ca` verifies the SAB, `cert` and `key` are ours.
    pub fn new(url: &str, cert: &Path, key: &Path, ca: &Path) -> Result<Self> {
        let uri: http::Uri = url.parse().with_context(|| format!("`{url}` is not a URL"))?;
        if uri.scheme_str() != Some("https") {
            bail!("the SAB URL must be https://, not `{url}`");
        }
        let host = uri.host().context("the SAB URL names no host")?.trim_matches(['[', ']']).to_string();
        let mut roots = RootCertStore::empty();
        for der in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))? {
            roots.add(der?)?;
        }
        let chain = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("reading {}", cert.display()))?
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let tls = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&tokio_rustls::rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok(Self { host, port: uri.port_u16().unwrap_or(443), tls: Arc::new(tls), bearer: None })
    }

    /// Also send `Authorization: Bearer <token>` (cluster mode: the pod's ServiceAccount token).
    pub fn with_bearer(mut self, token: &str) -> Self {
        self.bearer = Some(Bearer::Token(token.into()));
        self
    }

    /// Also send the token in `file` (a projected ServiceAccount token for the SAB's
    /// audience), read again for each connection.
    pub fn with_bearer_file(mut self, file: &Path) -> Self {
        self.bearer = Some(Bearer::File(file.to_path_buf()));
        self
    }

    /// One request on a new connection: the status and the JSON body.
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        tokio::time::timeout(TIMEOUT, self.call_once(method, path, body))
            .await
            .with_context(|| format!("the SAB did not answer within {} s", TIMEOUT.as_secs()))?
    }

    async fn call_once(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        self.session().await?.call(method, path, body).await
    }

    /// A connection for many requests, one after another.
    pub async fn session(&self) -> Result<Session> {
        let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("connecting to the SAB at {}:{}", self.host, self.port))?;
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        let name = ServerName::try_from(self.host.clone())?;
        let tls = TlsConnector::from(self.tls.clone()).connect(name, stream).await.context("TLS with the SAB")?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        let bearer = match &self.bearer {
            None => None,
            Some(Bearer::Token(token)) => Some(token.clone()),
            Some(Bearer::File(file)) => Some(
                std::fs::read_to_string(file)
                    .with_context(|| format!("reading the ServiceAccount token {}", file.display()))?
                    .trim()
                    .to_owned(),
            ),
        };
        Ok(Session { sender, host: self.host.clone(), bearer })
    }
}

/// One kept-alive connection to the SAB.
pub struct Session {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
    bearer: Option<String>,
}

impl Session {
    pub async fn call(&mut self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host)
            .header("content-type", "application/json");
        if let Some(token) = &self.bearer {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(Full::new(body))?;
        // A kept-alive connection takes the next request only once the last one is done.
        self.sender.ready().await.context("the connection to the SAB")?;
        let response = self.sender.send_request(request).await.context("the SAB's answer")?;
        let status = response.status().as_u16();
        let bytes = match Limited::new(response.into_body(), MAX_REPLY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                bail!("the SAB answered {status} with a body over {} MiB; refusing to read more", MAX_REPLY >> 20)
            }
            Err(e) => return Err(anyhow::anyhow!("reading the SAB's answer ({status}): {e}")),
        };
        let value = serde_json::from_slice(&bytes)
            .with_context(|| format!("the SAB answered {status} with a body that is not JSON"))?;
        Ok((status, value))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::StreamBody;
    use hyper::body::Frame;

    use super::*;
    use crate::sab::{config::TlsConfig, http::tls_config, pki};

    #[test]
    fn a_request_id_cannot_carry_a_path() {
        assert!(request_id("0b5e3f0c-6f1e-4c3a-9d57-2f8b1c9e4a10").is_ok());
        for forged in ["R/approve?", "R%2Fapprove", "../x", "", "a b", "R#"] {
            assert!(request_id(forged).is_err(), "{forged}");
        }
    }

    /// A server (with the SAB's TLS) that answers every request with an endless body:
    /// the client stops at its bound instead of buffering until memory runs out.
    #[tokio::test]
    async fn an_answer_over_the_bound_is_refused_not_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let layout = pki::Layout::new(dir.path());
        pki::init(&layout, &["127.0.0.1".into()]).unwrap();
        let (certificate, key) = layout.server();
        let tls = tls_config(&TlsConfig { certificate, key, client_ca: layout.tls_ca().cert }).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(stream).await.unwrap();
            let service = hyper::service::service_fn(|_| async {
                let chunk = Bytes::from(vec![b' '; 1 << 16]);
                let endless = futures::stream::repeat_with(move || Ok::<_, Infallible>(Frame::data(chunk.clone())));
                Ok::<_, Infallible>(hyper::Response::new(StreamBody::new(endless)))
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
        });
        let out = dir.path().join("approver");
        pki::client_certificate(&layout.tls_ca(), "seb://approver/a", Duration::from_secs(60), &out).unwrap();
        let url = format!("https://127.0.0.1:{port}");
        let client =
            SabClient::new(&url, &out.with_extension("pem"), &out.with_extension("key"), &layout.tls_ca().cert)
                .unwrap();
        let error = format!("{:#}", client.call("GET", "/v1/requests", None).await.unwrap_err());
        assert!(error.contains("body over 32 MiB"), "{error}");
    }
}
