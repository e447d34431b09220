//! Pods to cgroups and back, from the kubelet's cgroup layout alone.
//!
//! The kubelet puts each pod in a cgroup named after its UID, and each container in a
//! child named after its container id. Under the cgroupfs driver:
//! `kubepods/<qos>/pod<uid>/<container id>`. Under the systemd driver:
//! `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice/<runtime>-<container id>.scope`
//! (guaranteed pods sit directly under `kubepods`, without a QoS level).

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Result;
use serde::Serialize;

use crate::{
    cgroupfs,
    kubelet_cgroups::{DEFAULT_KUBEPODS, pod_uid_in},
};

/// A pod's cgroups on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodCgroups {
    pub pod_uid: String,
    pub pod: CgroupRef,
    pub containers: Vec<ContainerCgroup>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupRef {
    pub path: PathBuf,
    pub id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerCgroup {
    pub container_id: String,
    pub cgroup: CgroupRef,
}

/// Where the kubelet keeps pods: the first of `kubepods.slice` or `kubepods` under the
/// mount (a kubelet with another `--cgroup-root` is configured with `cluster.kubepods_cgroup`).
pub fn kubepods(mount: &Path) -> Option<PathBuf> {
    DEFAULT_KUBEPODS.iter().map(|name| crate::cgroupfs::resolve(mount, name)).find(|dir| dir.is_dir())
}

/// The cgroups of the pod with `pod_uid` under `root` (the kubepods cgroup), or None if
/// it has none on this node.
pub fn find_pod(root: &Path, pod_uid: &str) -> Result<Option<PodCgroups>> {
    if !root.is_dir() {
        return Ok(None);
    }
    // The pod directory is at most two levels below kubepods (QoS level, then the pod).
    let mut candidates = vec![root.to_path_buf()];
    for entry in fs::read_dir(root)?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            candidates.push(entry.path());
        }
    }
    let root_name = root.to_string_lossy();
    for parent in candidates {
        // Another pod's directory removed since the listing is not this pod's: skipped,
        // not an error that would leave this pod unresolved. Any other error is one.
        let entries = match fs::read_dir(&parent) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !entry.file_type().is_ok_and(|t| t.is_dir())
                || pod_uid_in(&root_name, &path.to_string_lossy()).as_deref() != Some(pod_uid)
            {
                continue;
            }
            let mut containers = Vec::new();
            for child in fs::read_dir(&path)?.flatten() {
                let child_name = child.file_name().to_string_lossy().into_owned();
                if let (true, Some(container_id)) =
                    (child.file_type().is_ok_and(|t| t.is_dir()), container_id_of(&child_name))
                {
                    // A container that ended since the listing (an init container) is
                    // not one of the pod's any more.
                    let id = match cgroupfs::cgroup_id(&child.path()) {
                        Ok(id) => id,
                        Err(_) if !child.path().exists() => continue,
                        Err(e) => return Err(e),
                    };
                    let cgroup = CgroupRef { id, path: child.path() };
                    containers.push(ContainerCgroup { container_id, cgroup });
                }
            }
            containers.sort_by(|a, b| a.container_id.cmp(&b.container_id));
            let pod = CgroupRef { id: cgroupfs::cgroup_id(&path)?, path };
            return Ok(Some(PodCgroups { pod_uid: pod_uid.into(), pod, containers }));
        }
    }
    Ok(None)
}

/// The container id in a container cgroup's name: `<id>` (cgroupfs driver) or
/// `<runtime>-<id>.scope` (systemd driver: cri-containerd, crio, docker).
pub fn container_id_of(name: &str) -> Option<String> {
    let id = name.strip_suffix(".scope").map_or(name, |scope| scope.rsplit('-').next().unwrap_or(scope));
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// Pod UID and container id of a cgroup path (relative to the mount), where it is in
/// the kubelet's pod hierarchy: `kubepods` (relative to the mount), or by default the
/// mount's own `kubepods` or `kubepods.slice`.
pub fn pod_of_cgroup(kubepods: Option<&str>, path: &str) -> (Option<String>, Option<String>) {
    let pod = match kubepods {
        Some(root) => pod_uid_in(root, path),
        None => DEFAULT_KUBEPODS.iter().find_map(|root| pod_uid_in(root, path)),
    };
    let container = pod.as_ref().and(path.rsplit('/').next()).and_then(container_id_of);
    (pod, container)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "0f3c2a1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b";
    const OTHER: &str = "11111111-2222-3333-4444-555555555555";

    fn container(n: u8) -> String {
        format!("{:064x}", n)
    }

    #[test]
    fn finds_a_pod_and_its_containers_under_the_cgroupfs_driver() {
        let mount = tempfile::tempdir().unwrap();
        let pod = mount.path().join(format!("kubepods/burstable/pod{POD}"));
        for dir in [
            pod.join(container(1)),
            pod.join(container(2)),
            mount.path().join(format!("kubepods/besteffort/pod{OTHER}")),
        ] {
            fs::create_dir_all(dir).unwrap();
        }
        let found = find_pod(&kubepods(mount.path()).unwrap(), POD).unwrap().expect("the pod");
        assert_eq!(found.pod.path, pod);
        assert_eq!(found.pod.id, cgroupfs::cgroup_id(&pod).unwrap());
        let ids: Vec<&str> = found.containers.iter().map(|c| c.container_id.as_str()).collect();
        assert_eq!(ids, [container(1), container(2)]);
        assert_eq!(found.containers[0].cgroup.id, cgroupfs::cgroup_id(&pod.join(container(1))).unwrap());
        assert!(find_pod(&kubepods(mount.path()).unwrap(), "99999999-9999-9999-9999-999999999999").unwrap().is_none());
    }

    #[test]
    fn finds_guaranteed_and_besteffort_pods_under_the_systemd_driver() {
        let mount = tempfile::tempdir().unwrap();
        let underscored = POD.replace('-', "_");
        let guaranteed = mount.path().join(format!("kubepods.slice/kubepods-pod{underscored}.slice"));
        fs::create_dir_all(guaranteed.join(format!("cri-containerd-{}.scope", container(7)))).unwrap();
        let besteffort = mount.path().join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            OTHER.replace('-', "_")
        ));
        fs::create_dir_all(besteffort.join(format!("crio-{}.scope", container(8)))).unwrap();
        let root = kubepods(mount.path()).unwrap();
        let found = find_pod(&root, POD).unwrap().expect("the guaranteed pod");
        assert_eq!(found.pod.path, guaranteed);
        assert_eq!(found.containers[0].container_id, container(7));
        let other = find_pod(&root, OTHER).unwrap().expect("the besteffort pod");
        assert_eq!(other.containers[0].container_id, container(8));
    }

    #[test]
    fn a_cgroup_path_names_its_pod_and_container() {
        let path = format!("/kubepods/burstable/pod{POD}/{}", container(3));
        assert_eq!(pod_of_cgroup(None, &path), (Some(POD.to_string()), Some(container(3))));
        let nested = format!("/nested{path}");
        assert_eq!(pod_of_cgroup(Some("/nested/kubepods"), &nested), (Some(POD.to_string()), Some(container(3))));
        assert_eq!(pod_of_cgroup(None, &nested), (None, None), "a pod-shaped path outside the kubelet's root");
        let delegated =
            format!("/user.slice/user-1000.slice/user@1000.service/app.slice/pod{POD}.scope/{}", container(3));
        assert_eq!(pod_of_cgroup(None, &delegated), (None, None));
        assert_eq!(pod_of_cgroup(None, "/system.slice/kubelet.service"), (None, None));
        assert_eq!(container_id_of("docker-short.scope"), None);
    }
}
