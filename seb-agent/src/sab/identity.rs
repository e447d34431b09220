//! Who is calling the SAB: the URI SAN of the client certificate the TLS handshake
//! verified, never anything in the request body.
//!
//! `seb://node/<node>/cgroup/<path>`: an agent on a node, bound to a cgroup (the path
//! relative to the cgroup2 mount). Its certificates bind `agent.node` and `agent.cgroup`,
//! so only processes in that cgroup (or below it) can present them to the broker: the
//! interpreter it runs or a helper it starts elsewhere cannot.
//! `seb://approver/<name>`: a person who approves or denies requests.

use anyhow::{Result, bail};
use serde::Serialize;
use x509_parser::prelude::*;

const SCHEME: &str = "seb://";
const MAX_SEGMENT: usize = 255;
const MAX_URI: usize = 4096;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Caller {
    Agent(Agent),
    Approver { uri: String },
}

/// An agent, as its certificate (and in cluster mode its ServiceAccount token) says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Agent {
    pub uri: String,
    pub node: String,
    /// The cgroup path with a leading `/`, as /proc/<pid>/cgroup shows it.
    pub cgroup: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl Caller {
    pub fn uri(&self) -> &str {
        match self {
            Self::Agent(agent) => &agent.uri,
            Self::Approver { uri } => uri,
        }
    }

    /// From the one `seb://` URI SAN of a verified client certificate (DER).
    pub fn of_certificate(der: &[u8]) -> Result<Self> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| anyhow::anyhow!("unreadable certificate: {e}"))?;
        let names = cert.subject_alternative_name().map_err(|e| anyhow::anyhow!("subjectAltName: {e}"))?;
        let uris: Vec<&str> = names
            .iter()
            .flat_map(|san| san.value.general_names.iter())
            .filter_map(|name| if let GeneralName::URI(uri) = name { Some(*uri) } else { None })
            .filter(|uri| uri.starts_with(SCHEME))
            .collect();
        match uris.as_slice() {
            [uri] => Self::parse(uri),
            [] => bail!("the client certificate has no seb:// URI SAN naming the caller"),
            _ => bail!("the client certificate has {} seb:// URI SANs; exactly one names the caller", uris.len()),
        }
    }

    pub fn parse(uri: &str) -> Result<Self> {
        if uri.len() > MAX_URI {
            bail!("identity URI of {} bytes; at most {MAX_URI}", uri.len());
        }
        let Some(rest) = uri.strip_prefix(SCHEME) else { bail!("`{uri}` is not a seb:// identity") };
        let segments: Vec<&str> = rest.split('/').collect();
        match segments.as_slice() {
            ["approver", name] => {
                check_segment("approver name", name)?;
                Ok(Self::Approver { uri: uri.into() })
            }
            ["node", node, "cgroup", path @ ..] if !path.is_empty() => {
                check_segment("node", node)?;
                for segment in path {
                    check_segment("cgroup path segment", segment)?;
                }
                Ok(Self::Agent(Agent {
                    uri: uri.into(),
                    node: (*node).into(),
                    cgroup: format!("/{}", path.join("/")),
                    pod_uid: None,
                    service_account: None,
                    namespace: None,
                }))
            }
            _ => bail!("`{uri}` is neither seb://node/<node>/cgroup/<path> nor seb://approver/<name>"),
        }
    }
}

/// One path segment: not empty, not `.` or `..`, visible ASCII without `/`.
pub fn check_segment(what: &str, segment: &str) -> Result<()> {
    if segment.is_empty() || segment == "." || segment == ".." {
        bail!("{what} `{segment}` is empty, `.` or `..`");
    }
    if segment.len() > MAX_SEGMENT {
        bail!("{what} is {} bytes long; at most {MAX_SEGMENT}", segment.len());
    }
    if let Some(c) = segment.chars().find(|c| !c.is_ascii_graphic() || *c == '/') {
        bail!("{what} `{}` contains {c:?}", segment.escape_debug());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_and_approvers_are_told_apart() {
        let Caller::Agent(agent) = Caller::parse("seb://node/n1/cgroup/system.slice/agent.service").unwrap() else {
            panic!("an agent");
        };
        assert_eq!((agent.node.as_str(), agent.cgroup.as_str()), ("n1", "/system.slice/agent.service"));
        assert!(matches!(Caller::parse("seb://approver/alice").unwrap(), Caller::Approver { .. }));
    }

    #[test]
    fn malformed_identities_are_refused_with_what_is_wrong() {
        for (uri, problem) in [
            ("https://node/n1/cgroup/a", "not a seb://"),
            ("seb://node/n1/cgroup", "neither"),
            ("seb://node/n1/cgroup/a/../b", "`..`"),
            ("seb://node/n1/cgroup/a//b", "empty"),
            ("seb://node/n 1/cgroup/a", "contains ' '"),
            ("seb://approver/a/b", "neither"),
        ] {
            let error = Caller::parse(uri).unwrap_err().to_string();
            assert!(error.contains(problem), "{uri}: {error}");
        }
    }
}
