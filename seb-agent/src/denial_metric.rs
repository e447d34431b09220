//! `seb_kernel_denials_total`, with a bounded label set: the hook (a fixed set) and, for
//! a pod this node's pod directory knows, its namespace and name. A pod's series are
//! removed when it leaves the directory (deleted, or gone from a relist), so the series
//! are bounded by the hooks times the pods on this node. Destinations and cgroups are in
//! the audit log's denial records, not in labels.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use seb_common::Hook;

use crate::cluster::directory::{PodDirectory, PodInfo};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    /// `connect4`, `connect6`, `sendmsg4`, `sendmsg6`, `egress4`, `egress6`,
    /// `socket_syscall`; `unknown` for any other value.
    pub hook: String,
    /// Empty unless the denied cgroup is a known pod's.
    pub namespace: String,
    pub pod: String,
}

#[derive(Default)]
pub struct DenialCounter {
    family: Family<DenialLabels, Counter>,
    /// The label sets each pod (by UID) has in `family`.
    by_pod: Mutex<HashMap<String, HashSet<DenialLabels>>>,
}

impl DenialCounter {
    /// The family, for registration.
    pub fn family(&self) -> Family<DenialLabels, Counter> {
        self.family.clone()
    }

    /// Count one denial. `pod` must come from the directory under its lock, so a pod
    /// cannot leave between being found and being counted (its series would then outlive it).
    pub fn count(&self, hook: &str, pod: Option<&PodInfo>) {
        let hook = bounded_hook(hook);
        let Some(pod) = pod else {
            self.family.get_or_create(&DenialLabels { hook, namespace: String::new(), pod: String::new() }).inc();
            return;
        };
        let labels = DenialLabels { hook, namespace: pod.namespace.clone(), pod: pod.name.clone() };
        if let Ok(mut by_pod) = self.by_pod.lock() {
            by_pod.entry(pod.uid.clone()).or_default().insert(labels.clone());
        }
        self.family.get_or_create(&labels).inc();
    }

    /// Remove the series of pods no longer in `directory` (called with its write lock
    /// held, right after it changed). A series another pod with the same namespace and
    /// name (a StatefulSet's replacement) still counts into is kept.
    pub fn forget_departed(&self, directory: &PodDirectory) {
        let Ok(mut by_pod) = self.by_pod.lock() else { return };
        let departed: Vec<String> = by_pod.keys().filter(|uid| directory.pod(uid).is_none()).cloned().collect();
        for uid in departed {
            for labels in by_pod.remove(&uid).unwrap_or_default() {
                if !by_pod.values().any(|sets| sets.contains(&labels)) {
                    self.family.remove(&labels);
                }
            }
        }
    }

    /// The number of series (for tests and the bound's check).
    pub fn series(&self) -> usize {
        let Ok(by_pod) = self.by_pod.lock() else { return 0 };
        by_pod.values().map(HashSet::len).sum()
    }
}

/// The hook's name if it is one the kernel programs have, else `unknown`.
fn bounded_hook(name: &str) -> String {
    let known = (0..=u8::MAX).filter_map(Hook::from_u8).any(|hook| hook.name() == name);
    if known { name } else { "unknown" }.to_string()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use prometheus_client::{encoding::text::encode, registry::Registry};

    use super::*;

    fn pod(uid: &str, name: &str) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"uid": uid, "namespace": "agents", "name": name}}))
            .unwrap()
    }

    fn exposition(counter: &DenialCounter) -> String {
        let mut registry = Registry::default();
        registry.register("kernel_denials", "denials", counter.family());
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn a_pods_series_go_when_it_leaves_the_directory_and_hooks_stay_a_fixed_set() {
        let counter = DenialCounter::default();
        let mut directory = PodDirectory::default();
        let (a, b, a_again) = (pod("uid-a", "agent-0"), pod("uid-b", "web-0"), pod("uid-a2", "agent-0"));
        directory.upsert_pod(&a);
        directory.upsert_pod(&b);
        counter.count("connect4", directory.pod("uid-a"));
        counter.count("connect6", directory.pod("uid-a"));
        counter.count("connect4", directory.pod("uid-b"));
        counter.count("hook-99", None);
        let text = exposition(&counter);
        assert!(text.contains(r#"kernel_denials_total{hook="connect4",namespace="agents",pod="agent-0"} 1"#), "{text}");
        assert!(text.contains(r#"kernel_denials_total{hook="unknown",namespace="",pod=""} 1"#), "{text}");

        directory.remove_pod(&b);
        counter.forget_departed(&directory);
        let text = exposition(&counter);
        assert!(!text.contains("web-0"), "a deleted pod's series remain:\n{text}");
        assert!(text.contains("agent-0"), "{text}");

        // A replacement with the same name keeps the series it shares with the old pod.
        directory.upsert_pod(&a_again);
        counter.count("connect4", directory.pod("uid-a2"));
        directory.remove_pod(&a);
        counter.forget_departed(&directory);
        let text = exposition(&counter);
        assert!(text.contains(r#"{hook="connect4",namespace="agents",pod="agent-0"} 2"#), "{text}");
        assert!(!text.contains(r#"hook="connect6""#), "only the departed pod counted this one:\n{text}");
        assert_eq!(counter.series(), 1);
    }
}
