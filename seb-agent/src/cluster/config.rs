//! `[cluster]`: this node's part in the cluster, and what its watchers follow (each
//! kind, and the selector that narrows it to what this node needs).

use std::time::Duration;

use anyhow::{Context, Result};
use kube::runtime::watcher;
use serde::{Deserialize, Serialize};

use super::discovery;

/// `[cluster]`: this node's part in the cluster.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name; default: the `NODE_NAME` environment variable (the DaemonSet sets
    /// it from `spec.nodeName`).
    #[serde(default)]
    pub node_name: Option<String>,
    /// The `SebPolicy` this node follows.
    #[serde(default = "default_object")]
    pub policy: String,
    /// The `SebRevocation` this node follows.
    #[serde(default = "default_object")]
    pub revocation: String,
    /// Admissions are denied when the API server has not answered for this long.
    #[serde(default = "default_staleness")]
    pub staleness_seconds: u64,
    /// Deny contracts that bind neither `agent.node` nor `agent.pod_uid`.
    #[serde(default = "default_true")]
    pub require_node_binding: bool,
    /// Protect the `kubernetes` Service's ClusterIPs and its EndpointSlices' addresses.
    #[serde(default = "default_true")]
    pub discover_api_server: bool,
    /// The kubelet's pod cgroup (relative to the cgroup2 mount); default: `/kubepods.slice`
    /// or `/kubepods`, whichever exists.
    #[serde(default)]
    pub kubepods_cgroup: Option<String>,
}

fn default_object() -> String {
    "default".into()
}
fn default_staleness() -> u64 {
    30
}
fn default_true() -> bool {
    true
}

impl ClusterConfig {
    pub fn node_name(&self) -> Result<String> {
        self.node_name.clone().or_else(|| std::env::var("NODE_NAME").ok()).filter(|name| !name.is_empty()).context(
            "config field `cluster.node_name` is not set and neither is NODE_NAME (the DaemonSet sets it from spec.nodeName)",
        )
    }

    /// The kubepods cgroup directory on this node.
    pub fn kubepods(&self, mount: &std::path::Path) -> Option<std::path::PathBuf> {
        match &self.kubepods_cgroup {
            Some(relative) => Some(crate::cgroupfs::resolve(mount, relative)),
            None => super::pods::kubepods(mount),
        }
    }

    pub fn staleness(&self) -> Duration {
        Duration::from_secs(self.staleness_seconds)
    }
}

/// What this node's watchers follow, with their selectors.
impl ClusterConfig {
    /// The kinds whose first list must be applied before the node is settled.
    pub fn required_lists(&self) -> Vec<String> {
        let mut kinds = vec!["SebRevocation", "SebPolicy", "Pod", "Namespace"];
        if self.discover_api_server {
            kinds.extend(["Service", "EndpointSlice"]);
        }
        kinds.into_iter().map(String::from).collect()
    }

    /// The one `SebPolicy` this node follows.
    pub fn policy_watch(&self) -> watcher::Config {
        by_name(&self.policy)
    }

    /// The one `SebRevocation` this node follows.
    pub fn revocation_watch(&self) -> watcher::Config {
        by_name(&self.revocation)
    }
}

fn by_name(name: &str) -> watcher::Config {
    watcher::Config::default().fields(&format!("metadata.name={name}"))
}

/// The pods scheduled on `node`.
pub fn pods_on(node: &str) -> watcher::Config {
    watcher::Config::default().fields(&format!("spec.nodeName={node}"))
}

/// Every namespace (their labels select pods).
pub fn namespaces() -> watcher::Config {
    watcher::Config::default()
}

/// The API server's own `kubernetes` Service.
pub fn api_server_service() -> watcher::Config {
    by_name(discovery::SERVICE)
}

/// The EndpointSlices of the `kubernetes` Service.
pub fn api_server_slices() -> watcher::Config {
    watcher::Config::default().labels(discovery::SLICE_LABEL)
}
