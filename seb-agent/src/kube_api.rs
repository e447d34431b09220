//! kube-rs clients that reach the API server only through the broker's own,
//! kernel-registered sockets: the API server is a protected endpoint like any other.
//! The Kubernetes executor uses them with minted tokens; cluster mode watches its
//! resources with the broker's own ServiceAccount token.

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use kube::Client;
use serde::{Deserialize, Serialize};
use tokio_rustls::rustls::ClientConfig;

use crate::{
    enforcement::broker_sockets::ExecutionTag,
    execute::broker_http::{BrokerHttp, roots_from_pem_file, tls_builder},
};

/// `[kubernetes]`: how the broker reaches the API server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The API server, e.g. `https://10.96.0.1:443`; by default the one the kubelet names
    /// to every pod in `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_server: Option<String>,
    /// CA bundle of the API server.
    #[serde(default = "default_ca")]
    pub ca_file: PathBuf,
    /// The broker's own ServiceAccount token (allowed to create Secrets and tokens for
    /// the ServiceAccounts it brokers, and to read the cluster state it watches).
    #[serde(default = "default_token")]
    pub token_file: PathBuf,
}

impl KubernetesConfig {
    /// The API server's URL: `api_server`, or in a pod what its environment says (the
    /// in-cluster convention client-go and kube-rs follow).
    pub fn api_server(&self) -> Result<Uri> {
        let url = match &self.api_server {
            Some(url) => url.clone(),
            None => in_cluster_url(
                std::env::var("KUBERNETES_SERVICE_HOST").ok().as_deref(),
                std::env::var("KUBERNETES_SERVICE_PORT").ok().as_deref(),
            )?,
        };
        url.parse().with_context(|| format!("config field `kubernetes.api_server`: `{url}` is not a URL"))
    }
}

fn in_cluster_url(host: Option<&str>, port: Option<&str>) -> Result<String> {
    let (Some(host), Some(port)) = (host.filter(|h| !h.is_empty()), port.filter(|p| !p.is_empty())) else {
        anyhow::bail!(
            "config field `kubernetes.api_server` is not set, and KUBERNETES_SERVICE_HOST and \
             KUBERNETES_SERVICE_PORT (which the kubelet sets in every pod) are not both in the environment"
        );
    };
    // An IPv6 address goes in brackets in a URL.
    let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
    Ok(format!("https://{host}:{port}"))
}

fn default_ca() -> PathBuf {
    PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
}
fn default_token() -> PathBuf {
    PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
}

/// Which bearer token a client sends.
#[derive(Clone)]
pub enum Token {
    /// The broker's own, read from `token_file` for every request (kubelet rotates it).
    Broker,
    /// A token minted for one decision.
    Minted(String),
}

/// The API server, reached as the broker.
#[derive(Clone)]
pub struct KubeApi {
    http: BrokerHttp,
    tls: Arc<ClientConfig>,
    base: Uri,
    token_file: PathBuf,
}

impl KubeApi {
    pub fn new(config: &KubernetesConfig, http: BrokerHttp) -> Result<Self> {
        let roots = roots_from_pem_file(&config.ca_file, "kubernetes.ca_file")?;
        let base = config.api_server()?;
        let tls = Arc::new(tls_builder().with_root_certificates(roots).with_no_client_auth());
        Ok(Self { http, tls, base, token_file: config.token_file.clone() })
    }

    fn bearer(&self, token: &Token) -> Result<String> {
        match token {
            Token::Minted(token) => Ok(token.clone()),
            Token::Broker => Ok(std::fs::read_to_string(&self.token_file)
                .with_context(|| format!("reading the broker's token {}", self.token_file.display()))?
                .trim()
                .to_string()),
        }
    }

    /// A kube client sending `token`. Responses stream (watches work); each request
    /// opens its own broker socket. The decision being executed, if any, goes with every
    /// request, since kube runs them on a worker task of its own.
    pub fn client(&self, token: Token, namespace: &str) -> Client {
        self.client_reading(token, namespace, usize::MAX, ExecutionTag::current())
    }

    /// The same, reading at most `max_response` bytes of each response (not for
    /// watches): an executor's object or token, never a body without end.
    pub fn bounded_client(&self, token: Token, namespace: &str) -> Client {
        self.client_reading(token, namespace, crate::execute::broker_http::MAX_RESPONSE, ExecutionTag::current())
    }

    /// As [`Self::bounded_client`], its connections carrying no decision's tag: for what
    /// must still be done once the decision is revoked (deleting its token's Secret),
    /// which the revocation would otherwise refuse a connection.
    pub fn client_outside_decision(&self, token: Token, namespace: &str) -> Client {
        self.client_reading(token, namespace, crate::execute::broker_http::MAX_RESPONSE, None)
    }

    fn client_reading(&self, token: Token, namespace: &str, max_response: usize, tag: Option<ExecutionTag>) -> Client {
        let api = self.clone();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let (api, token, tag) = (api.clone(), token.clone(), tag.clone());
            ExecutionTag::within(tag, async move {
                let (mut parts, body) = request.into_parts();
                let path = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
                parts.uri = format!("{}{path}", api.base.to_string().trim_end_matches('/')).parse()?;
                parts.headers.insert(http::header::AUTHORIZATION, format!("Bearer {}", api.bearer(&token)?).parse()?);
                parts
                    .headers
                    .insert(http::header::HOST, api.base.authority().map(|a| a.as_str()).unwrap_or_default().parse()?);
                let body = body.collect().await?.to_bytes();
                parts.headers.insert(http::header::CONTENT_LENGTH, body.len().into());
                let response = api.http.open(Request::from_parts(parts, Full::new(body)), api.tls.clone()).await?;
                Ok::<_, tower::BoxError>(response.map(|body| http_body_util::Limited::new(body, max_response)))
            })
        });
        Client::new(service, namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::in_cluster_url;

    #[test]
    fn in_cluster_url_from_the_pod_environment() {
        assert_eq!(in_cluster_url(Some("10.96.0.1"), Some("443")).unwrap(), "https://10.96.0.1:443");
        assert_eq!(in_cluster_url(Some("fd00::1"), Some("443")).unwrap(), "https://[fd00::1]:443");
        let missing = in_cluster_url(None, Some("443")).unwrap_err().to_string();
        assert!(missing.contains("KUBERNETES_SERVICE_HOST"), "{missing}");
        assert!(in_cluster_url(Some("10.96.0.1"), Some("")).is_err());
    }
}
