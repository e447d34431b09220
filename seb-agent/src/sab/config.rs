//! The SAB's configuration file (TOML).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SabConfig {
    /// Address of the HTTPS API.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory of `*.cedar` policy files, validated against the SAB's schema.
    pub policies: PathBuf,
    /// How often the policy directory is checked for changes, in milliseconds.
    #[serde(default = "default_reload_interval_ms")]
    pub reload_interval_ms: u64,
    /// Validity of an issued certificate, in seconds (a policy's `@ttl` may shorten it).
    #[serde(default = "default_certificate_ttl")]
    pub certificate_ttl_seconds: u64,
    /// How long a request waits for its approvals before it expires, in seconds.
    #[serde(default = "default_approval_timeout")]
    pub approval_timeout_seconds: u64,
    /// Requests kept (pending and decided, for reading back); the oldest decided go first.
    #[serde(default = "default_max_requests")]
    pub max_requests: usize,
    /// Pending requests at once, at most; more are refused until some are decided.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// Pending requests of one requester at once, at most: one agent cannot fill the
    /// queue every other agent's approvals wait in.
    #[serde(default = "default_max_pending_per_requester")]
    pub max_pending_per_requester: usize,
    /// HTTPS connections served at once, at most.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    pub tls: TlsConfig,
    pub issuer: IssuerConfig,
    pub audit: SabAuditConfig,
    /// Node-local mode: the one node whose agents this SAB serves, and its broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeConfig>,
    /// Cluster mode: callers also present a ServiceAccount token, checked by TokenReview.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The SAB's server certificate chain (PEM).
    pub certificate: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
    /// The CA that issues callers' client certificates (PEM); only its certificates connect.
    pub client_ca: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The SAB CA certificate (PEM): what brokers trust as `admission.trust_anchors`.
    pub ca_cert: PathBuf,
    /// Its key (PEM).
    pub ca_key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SabAuditConfig {
    /// The SAB's own signed, hash-chained log (`seb-agent audit verify --database` reads it).
    pub database: PathBuf,
    /// Its Ed25519 signing key (created if missing; the public key is written beside it).
    pub signing_key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's name, as agents' identities (`seb://node/<name>/...`) give it.
    pub name: String,
    /// The broker's socket: the SAB reads the revocation epoch there and sets the policy
    /// epoch at each policy load (as an administrator, uid 0).
    pub broker_socket: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The SebPolicy object whose `spec.epoch` the SAB sets at each policy load.
    #[serde(default = "default_object")]
    pub policy: String,
    /// The SebRevocation object whose epoch certificates carry.
    #[serde(default = "default_object")]
    pub revocation: String,
    /// The audience an agent's ServiceAccount token must be issued for (a projected
    /// token): a token made for the API server, or for another service the pod talks
    /// to, is refused.
    #[serde(default = "default_token_audience")]
    pub token_audience: String,
}

fn default_token_audience() -> String {
    "seb-sab".into()
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
fn default_reload_interval_ms() -> u64 {
    1000
}
fn default_certificate_ttl() -> u64 {
    120
}
fn default_approval_timeout() -> u64 {
    900
}
fn default_max_requests() -> usize {
    10_000
}
fn default_max_pending() -> usize {
    1_000
}
fn default_max_pending_per_requester() -> usize {
    50
}
fn default_max_connections() -> usize {
    256
}
fn default_object() -> String {
    "default".into()
}

/// Longest validity the SAB issues: certificates are for one action, now.
pub const MAX_CERTIFICATE_TTL: Duration = Duration::from_secs(3600);

impl SabConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("{}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let config: Self = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        match (&self.node, &self.cluster) {
            (None, None) => bail!("give either [node] (node-local mode) or [cluster] (cluster mode)"),
            (Some(_), Some(_)) => bail!("[node] and [cluster] exclude each other: a SAB serves one node or a cluster"),
            _ => {}
        }
        if let Some(node) = &self.node {
            super::identity::check_segment("node.name", &node.name)?;
        }
        let ttl = self.certificate_ttl_seconds;
        if ttl == 0 || ttl > MAX_CERTIFICATE_TTL.as_secs() {
            bail!("certificate_ttl_seconds must be from 1 to {} (it is {ttl})", MAX_CERTIFICATE_TTL.as_secs());
        }
        for (field, value) in [
            ("approval_timeout_seconds", self.approval_timeout_seconds as usize),
            ("reload_interval_ms", self.reload_interval_ms as usize),
            ("max_requests", self.max_requests),
            ("max_pending", self.max_pending),
            ("max_pending_per_requester", self.max_pending_per_requester),
            ("max_connections", self.max_connections),
        ] {
            if value == 0 {
                bail!("{field} must be at least 1");
            }
        }
        if self.max_pending > self.max_requests {
            bail!("max_pending ({}) cannot exceed max_requests ({})", self.max_pending, self.max_requests);
        }
        Ok(())
    }

    pub fn certificate_ttl(&self) -> Duration {
        Duration::from_secs(self.certificate_ttl_seconds)
    }

    pub fn approval_timeout(&self) -> Duration {
        Duration::from_secs(self.approval_timeout_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
policies = "/etc/seb/sab/policies"
[tls]
certificate = "s.pem"
key = "s.key"
client_ca = "c.pem"
[issuer]
ca_cert = "ca.pem"
ca_key = "ca.key"
[audit]
database = "sab.db"
signing_key = "sab.key"
"#;

    #[test]
    fn one_mode_exactly() {
        let error = SabConfig::parse(BASE).unwrap_err().to_string();
        assert!(error.contains("[node]"), "{error}");
        let node = format!("{BASE}[node]\nname = \"n1\"\nbroker_socket = \"/run/seb/broker.sock\"\n");
        let config = SabConfig::parse(&node).unwrap();
        assert_eq!(config.certificate_ttl_seconds, 120);
        let both = format!("{node}[cluster]\n");
        assert!(SabConfig::parse(&both).unwrap_err().to_string().contains("exclude"));
    }

    #[test]
    fn lifetimes_are_bounded() {
        let long = format!("certificate_ttl_seconds = 86400\n{BASE}[cluster]\n");
        assert!(SabConfig::parse(&long).unwrap_err().to_string().contains("certificate_ttl_seconds"));
    }
}
