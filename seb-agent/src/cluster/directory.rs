//! The pods on this node and the namespaces' labels, as the watchers last saw them: which
//! pods the policy's selectors enforce, and whose a denied cgroup is.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde::{Deserialize, Serialize};

use super::crd::EnforcementScopeSpec;

/// What a denial record says of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    #[serde(skip)]
    pub labels: BTreeMap<String, String>,
    /// Container names by container id (without the runtime prefix).
    #[serde(skip)]
    pub containers: BTreeMap<String, String>,
    /// Its phase is Succeeded or Failed: its containers will not run again.
    #[serde(skip)]
    pub finished: bool,
}

impl PodInfo {
    pub fn of(pod: &Pod) -> Option<Self> {
        let metadata = &pod.metadata;
        let containers = pod
            .status
            .iter()
            .flat_map(|status| {
                status.container_statuses.iter().flatten().chain(status.init_container_statuses.iter().flatten())
            })
            .filter_map(|container| {
                let id = container.container_id.as_deref()?;
                // `containerd://<id>`, `cri-o://<id>`, `docker://<id>`.
                let id = id.rsplit_once("://").map_or(id, |(_, id)| id);
                Some((id.to_ascii_lowercase(), container.name.clone()))
            })
            .collect();
        Some(Self {
            uid: metadata.uid.clone()?,
            namespace: metadata.namespace.clone()?,
            name: metadata.name.clone()?,
            labels: metadata.labels.clone().unwrap_or_default(),
            containers,
            finished: pod
                .status
                .as_ref()
                .and_then(|status| status.phase.as_deref())
                .is_some_and(|phase| phase == "Succeeded" || phase == "Failed"),
        })
    }
}

#[derive(Debug, Default)]
pub struct PodDirectory {
    pods: HashMap<String, PodInfo>,
    namespaces: HashMap<String, BTreeMap<String, String>>,
}

/// Shared between the watchers (writers) and the denial recorder (reader).
pub type SharedDirectory = Arc<RwLock<PodDirectory>>;

impl PodDirectory {
    pub fn upsert_pod(&mut self, pod: &Pod) {
        if let Some(info) = PodInfo::of(pod) {
            self.pods.insert(info.uid.clone(), info);
        }
    }

    pub fn remove_pod(&mut self, pod: &Pod) {
        if let Some(uid) = &pod.metadata.uid {
            self.pods.remove(uid);
        }
    }

    /// A watcher's full relist: everything not in it is gone.
    pub fn replace_pods(&mut self, pods: &[Pod]) {
        self.pods = pods.iter().filter_map(PodInfo::of).map(|info| (info.uid.clone(), info)).collect();
    }

    pub fn upsert_namespace(&mut self, namespace: &Namespace) {
        if let Some(name) = &namespace.metadata.name {
            self.namespaces.insert(name.clone(), namespace.metadata.labels.clone().unwrap_or_default());
        }
    }

    pub fn remove_namespace(&mut self, namespace: &Namespace) {
        if let Some(name) = &namespace.metadata.name {
            self.namespaces.remove(name);
        }
    }

    pub fn replace_namespaces(&mut self, namespaces: &[Namespace]) {
        self.namespaces.clear();
        for namespace in namespaces {
            self.upsert_namespace(namespace);
        }
    }

    pub fn pod(&self, uid: &str) -> Option<&PodInfo> {
        self.pods.get(uid)
    }

    /// The pods the scope enforces: those whose labels match the pod selector, or whose
    /// namespace's labels match the namespace selector. An empty selector selects nothing.
    pub fn selected(&self, scope: &EnforcementScopeSpec) -> Vec<&PodInfo> {
        let mut pods: Vec<&PodInfo> = self
            .pods
            .values()
            .filter(|pod| {
                let by_pod = matches(&scope.pod_selector, &pod.labels);
                let by_namespace = self
                    .namespaces
                    .get(&pod.namespace)
                    .is_some_and(|labels| matches(&scope.namespace_selector, labels));
                by_pod || by_namespace
            })
            .collect();
        pods.sort_by(|a, b| a.uid.cmp(&b.uid));
        pods
    }
}

/// Every selector label present with the same value; an empty selector matches nothing.
fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(key, value)| labels.get(key) == Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    pub fn pod(uid: &str, namespace: &str, labels: &[(&str, &str)]) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "uid": uid, "namespace": namespace, "name": format!("pod-{uid}"),
                "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
            },
            "status": {"containerStatuses": [{
                "name": "agent", "containerID": format!("containerd://{:064x}", 7), "image": "i", "imageID": "",
                "ready": true, "restartCount": 0
            }]}
        }))
        .unwrap()
    }

    fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn scope(pods: &[(&str, &str)], namespaces: &[(&str, &str)]) -> EnforcementScopeSpec {
        let map = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        EnforcementScopeSpec { cgroups: Vec::new(), pod_selector: map(pods), namespace_selector: map(namespaces) }
    }

    #[test]
    fn pods_are_selected_by_their_labels_or_their_namespaces_labels() {
        let mut directory = PodDirectory::default();
        directory.upsert_pod(&pod("a", "agents", &[("seb.io/enforce", "true")]));
        directory.upsert_pod(&pod("b", "agents", &[("seb.io/enforce", "false")]));
        directory.upsert_pod(&pod("c", "ai", &[]));
        directory.upsert_namespace(&namespace("ai", &[("seb.io/enforce", "true")]));
        directory.upsert_namespace(&namespace("agents", &[]));
        let uids = |scope| directory.selected(&scope).iter().map(|p| p.uid.clone()).collect::<Vec<_>>();
        assert_eq!(uids(scope(&[("seb.io/enforce", "true")], &[])), ["a"]);
        assert_eq!(uids(scope(&[], &[("seb.io/enforce", "true")])), ["c"]);
        assert_eq!(uids(scope(&[("seb.io/enforce", "true")], &[("seb.io/enforce", "true")])), ["a", "c"]);
        assert!(uids(scope(&[], &[])).is_empty(), "an empty selector selects nothing");
    }

    #[test]
    fn deleted_and_relisted_pods_leave_the_directory() {
        let mut directory = PodDirectory::default();
        let (a, b) = (pod("a", "x", &[]), pod("b", "x", &[]));
        directory.upsert_pod(&a);
        directory.upsert_pod(&b);
        assert_eq!(directory.pod("a").unwrap().containers[&format!("{:064x}", 7)], "agent");
        directory.remove_pod(&a);
        assert!(directory.pod("a").is_none());
        directory.replace_pods(std::slice::from_ref(&a));
        assert!(directory.pod("a").is_some() && directory.pod("b").is_none());
    }
}
