//! `agent.toml`: the agent's configuration. Every field and its default is documented in
//! the README; an error names the field and what is wrong with it, and the agent refuses
//! to start rather than run unenforced.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub bpf: BpfConfig,
    #[serde(default)]
    pub enforcement: EnforcementConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub broker: BrokerConfig,
    #[serde(default)]
    pub admission: AdmissionConfig,
    /// The AWS executor; without this table AWS proposals are admitted but not executed.
    #[serde(default)]
    pub aws: Option<crate::execute::aws::AwsConfig>,
    /// The HTTPS executor for internal APIs (mutual TLS with minted client certificates).
    #[serde(default)]
    pub http: Option<crate::execute::https::HttpConfig>,
    /// The Kubernetes executor (TokenRequest per decision).
    #[serde(default)]
    pub kubernetes: Option<crate::kube_api::KubernetesConfig>,
    /// Reads that go through the broker without a certificate.
    #[serde(default)]
    pub passthrough: crate::execute::passthrough::PassthroughConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Cluster mode: follow the cluster's SebPolicy and SebRevocation, enforce the pods the
    /// policy selects, protect the API server's addresses. Needs `[kubernetes]`.
    #[serde(default)]
    pub cluster: Option<crate::cluster::config::ClusterConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics`, `/healthz` and `/readyz`.
    #[serde(default = "default_metrics_enabled")]
    pub enabled: bool,
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
}

fn default_metrics_enabled() -> bool {
    true
}
fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: default_metrics_enabled(), listen: default_metrics_listen() }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionConfig {
    /// PEM file with the trusted SAB CA certificates. Without it every proposal is denied.
    #[serde(default)]
    pub trust_anchors: Option<PathBuf>,
    /// Longest certificate validity accepted, in seconds.
    #[serde(default = "default_max_ttl")]
    pub max_ttl_seconds: u64,
    /// Clock difference tolerated at both ends of the validity window, in seconds.
    #[serde(default = "default_clock_skew")]
    pub clock_skew_seconds: u64,
    /// Certificate verifications running at once; omitted means
    /// one per CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel_verifications: Option<usize>,
    /// This node's name, as certificates bind it (`agent.node`; a node-local SAB's `[node]
    /// name`): a contract bound to another node is refused. Default: the host name. In
    /// cluster mode, `cluster.node_name` is used instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

fn default_max_ttl() -> u64 {
    3600
}
fn default_clock_skew() -> u64 {
    30
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            trust_anchors: None,
            max_ttl_seconds: default_max_ttl(),
            clock_skew_seconds: default_clock_skew(),
            max_parallel_verifications: None,
            node_name: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BpfConfig {
    /// Directory on a bpffs where programs' links and maps are pinned.
    #[serde(default = "default_pin_path")]
    pub pin_path: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EnforcementConfig {
    /// Cgroup v2 directories (relative to the cgroup2 mount) whose whole subtree is
    /// enforced. `"/"` is the node's entire tree.
    #[serde(default = "default_scope")]
    pub scope: Vec<String>,
    /// Cgroup v2 directories (relative to the cgroup2 mount) whose processes, and their
    /// descendants', are never denied: the kubelet, the CNI, system daemons.
    #[serde(default)]
    pub exempt_cgroups: Vec<String>,
    /// Production endpoints that only the broker may reach.
    #[serde(default)]
    pub protected: Vec<ProtectedEndpoint>,
    /// Production host names: their addresses are protected, refreshed as their DNS
    /// records expire.
    #[serde(default)]
    pub protected_hosts: Vec<crate::enforcement::hostnames::ProtectedHost>,
    /// The DNS server for `protected_hosts` (`addr:port`); default: the system's resolver.
    #[serde(default)]
    pub resolver: Option<SocketAddr>,
    /// Which system call tables are watched for sockets the IP hooks never see.
    #[serde(default)]
    pub syscall_tables: SyscallTables,
    /// How many live processes that have been in the scope the kernel can follow
    /// (`SEB_SCOPED_TASKS`). Past it, a new one is killed at its first `socket()` or
    /// io_uring call rather than go unfollowed. Changing it takes effect after `unload`.
    #[serde(default = "default_max_scoped_processes")]
    pub max_scoped_processes: u32,
}

fn default_max_scoped_processes() -> u32 {
    seb_common::MAX_SCOPED_TASKS
}

/// `auto` watches every table the kernel takes calls through. `native` watches only the
/// 64-bit one, with the syscall tracepoints (cheaper), even where `int 0x80` runs: that
/// leaves a way to make packet sockets in the scope, so the agent warns at start.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SyscallTables {
    #[default]
    Auto,
    Native,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProtectedEndpoint {
    /// An address or CIDR, IPv4 or IPv6.
    pub cidr: String,
    /// A destination port; omitted means every port.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    /// Every IP protocol, raw packets included.
    #[default]
    Any,
}

impl Protocol {
    /// The IP protocol number, `ANY_PROTOCOL` for `Any`.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Any => seb_common::ANY_PROTOCOL,
        }
    }

    pub fn from_number(number: u8) -> String {
        match number {
            6 => "tcp".into(),
            17 => "udp".into(),
            1 => "icmp".into(),
            58 => "icmpv6".into(),
            255 => "raw".into(),
            seb_common::ANY_PROTOCOL => "unknown".into(),
            other => format!("ip-proto-{other}"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The SQLite audit store.
    #[serde(default = "default_database")]
    pub database: PathBuf,
    /// The broker's Ed25519 signing key (PKCS#8 PEM), created on first start; its public
    /// half is written beside it as `<file>.pub`.
    #[serde(default = "default_signing_key")]
    pub signing_key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// The Unix socket agents propose on.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Group that owns the socket (mode 0660); omitted keeps root's group.
    #[serde(default)]
    pub socket_group: Option<String>,
    /// Open connections, at most. At the limit a new connection displaces the one that
    /// has waited longest for its next request.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Open connections per caller uid, at most (the same rule, within that uid).
    #[serde(default = "default_max_connections_per_uid")]
    pub max_connections_per_uid: usize,
    /// A connection with no request for this long is closed, in seconds.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_seconds: u64,
    /// A request must arrive whole, and its reply be taken, within this long, in seconds.
    #[serde(default = "default_frame_timeout")]
    pub frame_timeout_seconds: u64,
    /// Memory for requests larger than 16 KiB that are still arriving, all connections
    /// together, in MiB; a request that does not fit is answered `busy`.
    #[serde(default = "default_frame_memory")]
    pub frame_memory_mib: usize,
    /// On SIGTERM, requests under way get this long to finish, in seconds.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_seconds: u64,
}

fn default_max_connections() -> usize {
    1024
}
fn default_max_connections_per_uid() -> usize {
    256
}
fn default_idle_timeout() -> u64 {
    60
}
fn default_frame_timeout() -> u64 {
    10
}
fn default_frame_memory() -> usize {
    64
}
fn default_shutdown_grace() -> u64 {
    10
}

fn default_pin_path() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/seb")
}
fn default_scope() -> Vec<String> {
    vec!["/".into()]
}
fn default_database() -> PathBuf {
    PathBuf::from("/var/lib/seb/audit.db")
}
fn default_signing_key() -> PathBuf {
    PathBuf::from("/var/lib/seb/broker.key")
}
fn default_socket() -> PathBuf {
    PathBuf::from("/run/seb/broker.sock")
}

impl Default for BpfConfig {
    fn default() -> Self {
        Self { pin_path: default_pin_path() }
    }
}
impl Default for EnforcementConfig {
    fn default() -> Self {
        Self {
            scope: default_scope(),
            exempt_cgroups: Vec::new(),
            protected: Vec::new(),
            protected_hosts: Vec::new(),
            resolver: None,
            syscall_tables: SyscallTables::Auto,
            max_scoped_processes: default_max_scoped_processes(),
        }
    }
}
impl Default for AuditConfig {
    fn default() -> Self {
        Self { database: default_database(), signing_key: default_signing_key() }
    }
}
impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            socket: default_socket(),
            socket_group: None,
            max_connections: default_max_connections(),
            max_connections_per_uid: default_max_connections_per_uid(),
            idle_timeout_seconds: default_idle_timeout(),
            frame_timeout_seconds: default_frame_timeout(),
            frame_memory_mib: default_frame_memory(),
            shutdown_grace_seconds: default_shutdown_grace(),
        }
    }
}

/// A configuration error: which field, and what is wrong.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config field `{}`: {}", self.field, self.problem)
    }
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError { field: field.into(), problem: problem.into() }
}

/// A protected endpoint after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub net: IpNet,
    pub port: Option<u16>,
    pub protocol: Protocol,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid("<file>", format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| toml_error(&e, text))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.bpf.pin_path.is_absolute() {
            return Err(invalid("bpf.pin_path", "must be an absolute path on a bpffs"));
        }
        if self.enforcement.scope.is_empty() && self.cluster.is_none() {
            return Err(invalid(
                "enforcement.scope",
                "is empty: nothing would be enforced; use [\"/\"] for the whole cgroup tree (only cluster mode, where the SebPolicy selects pods, may leave it empty)",
            ));
        }
        if let Some(cluster) = &self.cluster {
            if self.kubernetes.is_none() {
                return Err(invalid(
                    "cluster",
                    "cluster mode needs the `[kubernetes]` table (how to reach the API server)",
                ));
            }
            if cluster.staleness_seconds == 0 {
                return Err(invalid("cluster.staleness_seconds", "must be at least 1"));
            }
        }
        if !(MIN_SCOPED_PROCESSES..=MAX_SCOPED_PROCESSES).contains(&self.enforcement.max_scoped_processes) {
            return Err(invalid(
                "enforcement.max_scoped_processes",
                format!("must be between {MIN_SCOPED_PROCESSES} and {MAX_SCOPED_PROCESSES}"),
            ));
        }
        for (i, path) in self.enforcement.scope.iter().enumerate() {
            check_cgroup_path(&format!("enforcement.scope[{i}]"), path)?;
        }
        for (i, path) in self.enforcement.exempt_cgroups.iter().enumerate() {
            check_cgroup_path(&format!("enforcement.exempt_cgroups[{i}]"), path)?;
        }
        self.endpoints()?;
        for (i, host) in self.enforcement.protected_hosts.iter().enumerate() {
            let field = |name: &str| format!("enforcement.protected_hosts[{i}].{name}");
            if host.host.is_empty() || host.host.parse::<std::net::IpAddr>().is_ok() {
                return Err(invalid(field("host"), "must be a DNS name (addresses go in `enforcement.protected`)"));
            }
            check_port(field("port"), field("protocol"), host.port, host.protocol)?;
        }
        if !self.audit.database.is_absolute() {
            return Err(invalid("audit.database", "must be an absolute path"));
        }
        if !self.broker.socket.is_absolute() {
            return Err(invalid("broker.socket", "must be an absolute path"));
        }
        self.broker.validate()?;
        let passthrough = &self.passthrough;
        if passthrough.mints_per_second == 0 || passthrough.mints_per_uid_per_second == 0 {
            return Err(invalid("passthrough.mints_per_second", "and mints_per_uid_per_second must be at least 1"));
        }
        if self.admission.max_parallel_verifications == Some(0) {
            return Err(invalid(
                "admission.max_parallel_verifications",
                "must be at least 1 (omit it for one per CPU)",
            ));
        }
        if !self.audit.signing_key.is_absolute() {
            return Err(invalid("audit.signing_key", "must be an absolute path"));
        }
        if self.admission.max_ttl_seconds == 0 {
            return Err(invalid("admission.max_ttl_seconds", "must be at least 1"));
        }
        if self.admission.clock_skew_seconds > 600 {
            return Err(invalid(
                "admission.clock_skew_seconds",
                "more than 600 s of skew would blur the validity window",
            ));
        }
        Ok(())
    }

    /// The protected endpoints, parsed.
    pub fn endpoints(&self) -> Result<Vec<Endpoint>, ConfigError> {
        self.enforcement
            .protected
            .iter()
            .enumerate()
            .map(|(i, endpoint)| endpoint.parse("enforcement.protected", i))
            .collect()
    }
}

impl BrokerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let at_least_one = [
            ("broker.max_connections", self.max_connections as u64),
            ("broker.max_connections_per_uid", self.max_connections_per_uid as u64),
            ("broker.idle_timeout_seconds", self.idle_timeout_seconds),
            ("broker.frame_timeout_seconds", self.frame_timeout_seconds),
            ("broker.frame_memory_mib", self.frame_memory_mib as u64),
            ("broker.shutdown_grace_seconds", self.shutdown_grace_seconds),
        ];
        for (field, value) in at_least_one {
            if value == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if self.max_connections > MAX_CONNECTIONS {
            return Err(invalid("broker.max_connections", format!("must be at most {MAX_CONNECTIONS}")));
        }
        if self.max_connections_per_uid > self.max_connections {
            return Err(invalid(
                "broker.max_connections_per_uid",
                format!("{} exceeds `broker.max_connections` ({})", self.max_connections_per_uid, self.max_connections),
            ));
        }
        if self.frame_memory_mib > 4096 {
            return Err(invalid("broker.frame_memory_mib", "must be at most 4096"));
        }
        if self.shutdown_grace_seconds > 300 {
            return Err(invalid("broker.shutdown_grace_seconds", "must be at most 300"));
        }
        Ok(())
    }
}

/// The largest `broker.max_connections` accepted (each connection holds two descriptors:
/// its socket and its caller's pidfd).
pub const MAX_CONNECTIONS: usize = 65_536;
/// Bounds of `enforcement.max_scoped_processes`: the kernel's own ceiling on process ids
/// (`PID_MAX_LIMIT` on 64-bit), and a floor no real scope is below.
const MIN_SCOPED_PROCESSES: u32 = 16;
const MAX_SCOPED_PROCESSES: u32 = 4_194_304;

impl ProtectedEndpoint {
    /// Validate the entry at `list[index]`; errors name that field.
    pub fn parse(&self, list: &str, index: usize) -> Result<Endpoint, ConfigError> {
        let field = format!("{list}[{index}].cidr");
        let net = parse_net(&self.cidr).map_err(|problem| invalid(&field, problem))?;
        if net.trunc() != net {
            return Err(invalid(field, format!("`{}` has host bits set; did you mean `{}`?", self.cidr, net.trunc())));
        }
        check_port(format!("{list}[{index}].port"), format!("{list}[{index}].protocol"), self.port, self.protocol)?;
        Ok(Endpoint { net, port: self.port, protocol: self.protocol })
    }
}

fn check_port(
    port_field: String,
    protocol_field: String,
    port: Option<u16>,
    protocol: Protocol,
) -> Result<(), ConfigError> {
    if port == Some(0) {
        return Err(invalid(port_field, "0 is not a port; omit the field to protect every port"));
    }
    if port.is_some() && protocol == Protocol::Any {
        return Err(invalid(protocol_field, "a port needs protocol \"tcp\" or \"udp\""));
    }
    Ok(())
}

/// An address alone means a single host (/32 or /128).
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net);
    }
    match text.parse::<std::net::IpAddr>() {
        Ok(addr) => Ok(IpNet::from(addr)),
        Err(_) => Err(format!("`{text}` is not an IP address or CIDR")),
    }
}

pub fn check_cgroup_path(field: &str, path: &str) -> Result<(), ConfigError> {
    if !path.starts_with('/') {
        return Err(invalid(field, format!("`{path}` must start with `/` (relative to the cgroup2 mount)")));
    }
    if path.split('/').any(|part| part == "..") {
        return Err(invalid(field, format!("`{path}` must not contain `..`")));
    }
    Ok(())
}

/// Turn a TOML/serde error into one that names the field.
fn toml_error(error: &toml::de::Error, text: &str) -> ConfigError {
    let message = error.message().to_string();
    // serde's messages name unknown fields and bad values; keep them, add the location.
    let field = message
        .split('`')
        .nth(1)
        .filter(|_| message.starts_with("unknown field") || message.starts_with("missing field"))
        .unwrap_or("<toml>")
        .to_string();
    let location = error
        .span()
        .map(|span| {
            let (line, column) = line_column(text, span.start);
            format!(" (at line {line}, column {column})")
        })
        .unwrap_or_default();
    invalid(field, format!("{message}{location}"))
}

/// The 1-based line and column (in characters) of a byte offset into `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (before.matches('\n').count() + 1, before[line_start..].chars().count() + 1)
}

/// Parse `host:port` for the egress probe.
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| format!("`{text}` is not an address:port (IPv6 as [addr]:port)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_to_an_empty_file() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.bpf.pin_path, PathBuf::from("/sys/fs/bpf/seb"));
        assert_eq!(config.enforcement.scope, vec!["/".to_string()]);
        assert!(config.enforcement.protected.is_empty());
        let broker = &config.broker;
        assert_eq!((broker.max_connections, broker.max_connections_per_uid), (1024, 256));
        assert_eq!((broker.idle_timeout_seconds, broker.frame_timeout_seconds), (60, 10));
        assert_eq!((broker.frame_memory_mib, broker.shutdown_grace_seconds), (64, 10));
    }

    #[test]
    fn endpoints_parse_cidrs_addresses_and_ports() {
        let config = Config::parse(
            r#"
            [[enforcement.protected]]
            cidr = "10.0.0.0/8"
            [[enforcement.protected]]
            cidr = "2001:db8::1"
            port = 443
            protocol = "tcp"
            "#,
        )
        .unwrap();
        let endpoints = config.endpoints().unwrap();
        assert_eq!(endpoints[0].net, "10.0.0.0/8".parse::<IpNet>().unwrap());
        assert_eq!(endpoints[0].protocol, Protocol::Any);
        assert_eq!(endpoints[1].net, "2001:db8::1/128".parse::<IpNet>().unwrap());
        assert_eq!(endpoints[1].port, Some(443));
    }

    #[test]
    fn syntax_and_type_errors_give_the_line_and_column() {
        let error = Config::parse("[broker]\n# the socket\nsocket = 3\n").unwrap_err().to_string();
        assert!(error.contains("(at line 3, column 10)"), "{error}");
        let error = Config::parse("[audit]\ndatabase = \"é\" x\n").unwrap_err().to_string();
        assert!(error.contains("(at line 2, column 16)"), "{error}");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("[bpf]\npin_path = \"relative\"", "bpf.pin_path"),
            ("[enforcement]\nscope = []", "enforcement.scope"),
            ("[enforcement]\nmax_scoped_processes = 1", "enforcement.max_scoped_processes"),
            ("[enforcement]\nscope = [\"kubepods\"]", "enforcement.scope[0]"),
            ("[enforcement]\nexempt_cgroups = [\"/a/../b\"]", "enforcement.exempt_cgroups[0]"),
            ("[[enforcement.protected]]\ncidr = \"10.0.0.300/32\"", "enforcement.protected[0].cidr"),
            ("[[enforcement.protected]]\ncidr = \"10.0.0.1/8\"", "enforcement.protected[0].cidr"),
            (
                "[[enforcement.protected]]\ncidr = \"10.0.0.1\"\nport = 0\nprotocol = \"tcp\"",
                "enforcement.protected[0].port",
            ),
            ("[[enforcement.protected]]\ncidr = \"10.0.0.1\"\nport = 443", "enforcement.protected[0].protocol"),
            ("[enforcement]\nsope = [\"/\"]", "sope"),
            ("[[enforcement.protected]]\nport = 443", "cidr"),
            ("[[enforcement.protected_hosts]]\nhost = \"10.0.0.1\"", "enforcement.protected_hosts[0].host"),
            (
                "[[enforcement.protected_hosts]]\nhost = \"sts.amazonaws.com\"\nport = 443",
                "enforcement.protected_hosts[0].protocol",
            ),
            ("[cluster]\nnode_name = \"n\"", "cluster"),
            ("[broker]\nmax_connections = 0", "broker.max_connections"),
            ("[broker]\nmax_connections = 10\nmax_connections_per_uid = 11", "broker.max_connections_per_uid"),
            ("[broker]\nidle_timeout_seconds = 0", "broker.idle_timeout_seconds"),
            ("[broker]\nframe_timeout_seconds = 0", "broker.frame_timeout_seconds"),
            ("[broker]\nframe_memory_mib = 0", "broker.frame_memory_mib"),
            ("[broker]\nshutdown_grace_seconds = 0", "broker.shutdown_grace_seconds"),
            ("[admission]\nmax_parallel_verifications = 0", "admission.max_parallel_verifications"),
        ];
        for (text, field) in cases {
            let error = Config::parse(text).expect_err(text);
            assert_eq!(error.field, field, "{text}: {error}");
        }
    }

    #[test]
    fn a_bad_protocol_is_reported_with_its_value() {
        let error = Config::parse("[[enforcement.protected]]\ncidr = \"10.0.0.1\"\nprotocol = \"sctp\"").unwrap_err();
        assert!(error.to_string().contains("sctp"), "{error}");
    }
}
