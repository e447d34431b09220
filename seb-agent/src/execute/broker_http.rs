//! HTTP requests from the broker's own, kernel-registered sockets.
//!
//! Every request opens a fresh connection through [`BrokerSockets`], so it is the one
//! kind of connection the kernel lets through to a protected endpoint, and no connection
//! (nor a credential riding on it) outlives the mutation. `https` uses rustls with the
//! webpki roots.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::enforcement::BrokerSockets;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Sends requests as the broker.
#[derive(Clone)]
pub struct BrokerHttp {
    sockets: BrokerSockets,
    tls: Arc<ClientConfig>,
}

/// The CA certificates in the PEM file `path`, which the config field `field` names;
/// errors say which field and what is wrong.
pub fn roots_from_pem_file(path: &std::path::Path, field: &str) -> Result<RootCertStore> {
    use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path)
        .with_context(|| format!("config field `{field}`: cannot read {}", path.display()))?
    {
        roots.add(cert.with_context(|| format!("config field `{field}`: not a PEM certificate"))?)?;
    }
    anyhow::ensure!(!roots.is_empty(), "config field `{field}`: {} holds no PEM certificate", path.display());
    Ok(roots)
}

/// rustls with the ring provider and its default protocol versions.
pub fn tls_builder() -> tokio_rustls::rustls::ConfigBuilder<ClientConfig, tokio_rustls::rustls::WantsVerifier> {
    ClientConfig::builder_with_provider(Arc::new(tokio_rustls::rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
}

impl BrokerHttp {
    pub fn new(sockets: BrokerSockets) -> Self {
        let roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        let tls = tls_builder().with_root_certificates(roots).with_no_client_auth();
        Self { sockets, tls: Arc::new(tls) }
    }

    pub async fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>> {
        self.send_with(request, self.tls.clone()).await
    }

    /// Send with a TLS configuration of the caller's (its own roots, a client certificate).
    pub async fn send_with(&self, request: Request<Bytes>, tls: Arc<ClientConfig>) -> Result<Response<Bytes>> {
        tokio::time::timeout(TIMEOUT, self.send_inner(request, tls)).await.context("the request timed out")?
    }

    async fn send_inner(&self, request: Request<Bytes>, tls: Arc<ClientConfig>) -> Result<Response<Bytes>> {
        let uri = request.uri().clone();
        let response = self.open_inner(request.map(Full::new), tls).await?;
        collect(response).await.with_context(|| format!("reading the response of {uri}"))
    }

    /// Send, and hand back the response as it streams (a watch): the connection and its
    /// kernel registration last until the body is read to its end or dropped. Only the
    /// response head is bound by the timeout.
    pub async fn open(&self, request: Request<Full<Bytes>>, tls: Arc<ClientConfig>) -> Result<Response<Incoming>> {
        tokio::time::timeout(TIMEOUT, self.open_inner(request, tls)).await.context("the request timed out")?
    }

    async fn open_inner(
        &self,
        request: Request<Full<Bytes>>,
        tls_config: Arc<ClientConfig>,
    ) -> Result<Response<Incoming>> {
        let uri = request.uri().clone();
        let (host, port, tls) = endpoint_of(&uri).context(NotSent)?;
        let addr = resolve(&host, port).await.context(NotSent)?;
        let (stream, registration) = self.sockets.connect_tcp(addr).await.context(NotSent)?.into_parts();
        let response = if tls {
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.clone())
                .with_context(|| format!("`{host}` is not a valid TLS server name"))
                .context(NotSent)?;
            let stream = tokio_rustls::TlsConnector::from(tls_config).connect(name, stream).await.context(NotSent)?;
            start_exchange(stream, request, registration).await
        } else {
            start_exchange(stream, request, registration).await
        };
        response.with_context(|| format!("request to {uri}"))
    }
}

/// Context of an error that came before any of the request was written: it was not
/// sent. Any other error of an exchange (a timeout, a reset, an answer too large) may
/// come after the server took the request.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the request was not sent")]
pub struct NotSent;

/// Whether `error` came before its request was sent (see [`NotSent`]).
pub fn was_not_sent(error: &anyhow::Error) -> bool {
    error.downcast_ref::<NotSent>().is_some()
}

/// One HTTP/1.1 exchange on an already connected stream, the response read whole.
pub async fn exchange<S>(stream: S, request: Request<Bytes>) -> Result<Response<Bytes>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    collect(start_exchange(stream, request.map(Full::new), ()).await?).await
}

/// The largest response body the broker takes: an API answer is kilobytes, and one
/// that is not (a multi-gigabyte object read through a passthrough, which needs no
/// certificate) would otherwise be held whole, then copied, in the broker's memory.
pub const MAX_RESPONSE: usize = 16 << 20;

async fn collect(response: Response<Incoming>) -> Result<Response<Bytes>> {
    let (parts, body) = response.into_parts();
    let body = http_body_util::Limited::new(body, MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("the response body could not be read whole within {MAX_RESPONSE} bytes: {e}"))?;
    Ok(Response::from_parts(parts, body.to_bytes()))
}

/// Send one HTTP/1.1 request on a connected stream. The connection task owns `keep` (the
/// socket's kernel registration), so it is removed exactly when the connection ends.
async fn start_exchange<S, K>(stream: S, request: Request<Full<Bytes>>, keep: K) -> Result<Response<Incoming>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    K: Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context(NotSent)?;
    tokio::spawn(async move {
        let _ = connection.await;
        drop(keep);
    });
    Ok(sender.send_request(request).await?)
}

fn endpoint_of(uri: &Uri) -> Result<(String, u16, bool)> {
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        Some(other) => bail!("unsupported scheme `{other}` in {uri}: use https or http"),
        None => bail!("no scheme in {uri}: use https or http"),
    };
    let host = uri.host().with_context(|| format!("no host in {uri}"))?.trim_matches(['[', ']']).to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok((host, port, tls))
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A server on the other end of an in-memory stream answering with a `len`-byte body.
    async fn answer_with(len: usize) -> Result<Response<Bytes>> {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut request = [0; 1024];
            let _ = server.read(&mut request).await;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
            server.write_all(head.as_bytes()).await?;
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = len;
            while left > 0 {
                let n = left.min(chunk.len());
                server.write_all(&chunk[..n]).await?;
                left -= n;
            }
            std::io::Result::Ok(())
        });
        let request = Request::get("http://api.test/object").header("host", "api.test").body(Bytes::new())?;
        exchange(client, request).await
    }

    #[tokio::test]
    async fn a_response_larger_than_the_bound_is_refused_not_held() {
        assert_eq!(answer_with(MAX_RESPONSE).await.unwrap().body().len(), MAX_RESPONSE);
        let error = format!("{:#}", answer_with(MAX_RESPONSE + 1).await.unwrap_err());
        assert!(error.contains("could not be read whole within"), "{error}");
    }
}
