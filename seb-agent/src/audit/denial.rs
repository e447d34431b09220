//! A kernel denial as recorded for a security team.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use seb_common::{AF_PACKET, AF_XDP, DenialEvent, FAMILY_DEVICE, FAMILY_NONE, FAMILY_V4, Hook};
use serde::{Deserialize, Serialize};

use crate::config::Protocol;

/// Record kind of kernel denials in the audit store.
pub const KIND: &str = "kernel_denial";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelDenial {
    /// Wall-clock time of the denial, RFC 3339.
    pub time: String,
    /// Nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// Process and thread ids; absent when the packet left outside the task's context.
    pub pid: Option<u32>,
    pub tgid: Option<u32>,
    pub uid: u32,
    pub gid: Option<u32>,
    pub comm: Option<String>,
    /// The executable, as the kernel knew it at the denial (its path within its
    /// filesystem), completed from /proc when the process is still there and runs it.
    pub exe: Option<String>,
    /// The cgroup that was judged: the socket's (its programs ran). For a socket
    /// creation, the creating task's.
    pub cgroup_id: u64,
    /// Path relative to the cgroup2 mount, when the cgroup still exists.
    pub cgroup_path: Option<String>,
    /// The calling task's cgroup, when it is not the socket's (the task moved after
    /// creating the socket, or was handed it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_cgroup_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_cgroup_path: Option<String>,
    /// The Kubernetes pod UID and container id, when the cgroup belongs to a pod.
    #[serde(default)]
    pub pod_uid: Option<String>,
    #[serde(default)]
    pub container_id: Option<String>,
    /// The pod's namespace and name and the container's name, when the node's pod
    /// watcher knows the pod (cluster mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// The protected destination that was judged (empty for a socket creation).
    pub address: String,
    pub port: u16,
    pub protocol: String,
    /// The caller asked for the unspecified address (`0.0.0.0`, `::`); `address` is the
    /// local address the kernel would have connected it to.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unspecified: bool,
    /// For a socket creation: the family (`packet`, `xdp`) and type number refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_family: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_type: Option<u8>,
    /// For a refused device open: the character device, `major:minor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The kernel hook that denied: connect4, connect6, sendmsg4, sendmsg6, egress4,
    /// egress6, socket_syscall, cgroup_migration or scope_table_full (the caller was killed:
    /// see `action`).
    pub hook: String,
    /// What the kernel did: `refused` (the call failed with EPERM, or the packet was
    /// dropped) or `killed` (the caller was killed before the call returned).
    #[serde(default = "refused")]
    pub action: String,
    pub socket_cookie: u64,
}

fn refused() -> String {
    "refused".into()
}

/// The executable path the kernel reported, components leaf first, joined root first.
/// Past `EXE_COMPONENTS` names the path is marked as truncated with a leading `...`.
fn kernel_exe(event: &DenialEvent) -> Option<String> {
    let names: Vec<String> = event
        .exe
        .iter()
        .map(|component| {
            let len = component.iter().position(|&b| b == 0).unwrap_or(component.len());
            String::from_utf8_lossy(&component[..len]).into_owned()
        })
        .take_while(|name| !name.is_empty())
        .collect();
    if names.is_empty() {
        return None;
    }
    let reached_root = names.last().is_some_and(|name| name == "/");
    let mut parts: Vec<&str> = names.iter().rev().filter(|name| *name != "/").map(String::as_str).collect();
    if !reached_root {
        parts.insert(0, "...");
    }
    Some(format!("/{}", parts.join("/")).replacen("/...", "...", 1))
}

/// The executable to record: /proc's full path when the process still runs the file the
/// kernel named (the kernel's path stops at its filesystem's root), else the kernel's.
pub fn best_exe(kernel: Option<String>, proc_exe: Option<String>) -> Option<String> {
    match (kernel, proc_exe) {
        (Some(kernel), Some(proc_exe)) if proc_exe.ends_with(kernel.trim_start_matches("...")) => Some(proc_exe),
        (Some(kernel), _) => Some(kernel),
        (None, proc_exe) => proc_exe,
    }
}

impl KernelDenial {
    /// Name the pod and container the denied cgroup belongs to, as far as they are known:
    /// only a cgroup in the kubelet's hierarchy (`kubepods`, relative to the mount, or
    /// the default places) names a pod.
    pub fn attribute(&mut self, directory: &crate::cluster::directory::PodDirectory, kubepods: Option<&str>) {
        let Some(path) = &self.cgroup_path else { return };
        (self.pod_uid, self.container_id) = crate::cluster::pods::pod_of_cgroup(kubepods, path);
        if let Some(pod) = self.pod_uid.as_deref().and_then(|uid| directory.pod(uid)) {
            self.pod_namespace = Some(pod.namespace.clone());
            self.pod_name = Some(pod.name.clone());
            self.container_name = self.container_id.as_ref().and_then(|id| pod.containers.get(id)).cloned();
        }
    }

    /// From a ring-buffer event; `time_ns` already converted from boot time.
    pub fn from_event(event: &DenialEvent, time_ns: u64) -> Self {
        let address = match event.family {
            FAMILY_NONE | FAMILY_DEVICE => String::new(),
            FAMILY_V4 => {
                IpAddr::from(Ipv4Addr::new(event.daddr[0], event.daddr[1], event.daddr[2], event.daddr[3])).to_string()
            }
            _ => IpAddr::from(Ipv6Addr::from(event.daddr)).to_string(),
        };
        let judged_cgroup = if event.socket_cgroup_id != 0 { event.socket_cgroup_id } else { event.cgroup_id };
        let socket_creation = event.family == FAMILY_NONE && event.hook == Hook::SockCreate as u8;
        let killed = event.family == FAMILY_NONE;
        let has_task = event.pid_tgid != 0;
        let comm_len = event.comm.iter().position(|&b| b == 0).unwrap_or(event.comm.len());

        Self {
            time: super::format_time(time_ns as i64),
            time_ns,
            pid: has_task.then_some(event.pid_tgid as u32),
            tgid: has_task.then_some((event.pid_tgid >> 32) as u32),
            uid: event.uid_gid as u32,
            gid: has_task.then_some((event.uid_gid >> 32) as u32),
            comm: (comm_len > 0).then(|| String::from_utf8_lossy(&event.comm[..comm_len]).into_owned()),
            exe: kernel_exe(event),
            cgroup_id: judged_cgroup,
            cgroup_path: None,
            task_cgroup_id: (event.cgroup_id != 0 && event.cgroup_id != judged_cgroup).then_some(event.cgroup_id),
            task_cgroup_path: None,
            pod_uid: None,
            container_id: None,
            pod_namespace: None,
            pod_name: None,
            container_name: None,
            address,
            port: event.dport,
            protocol: Protocol::from_number(event.protocol),
            unspecified: event.unspecified != 0,
            socket_family: socket_creation.then(|| match u32::from(event.socket_family) {
                AF_PACKET => "packet".to_string(),
                AF_XDP => "xdp".to_string(),
                other => format!("family-{other}"),
            }),
            socket_type: socket_creation.then_some(event.socket_type),
            device: (event.family == FAMILY_DEVICE).then(|| {
                let word = |at: usize| u32::from_ne_bytes([0, 1, 2, 3].map(|i| event.daddr[at + i]));
                format!("{}:{}", word(0), word(4))
            }),
            hook: Hook::from_u8(event.hook).map_or_else(|| format!("hook-{}", event.hook), |h| h.name().into()),
            action: if killed { "killed".into() } else { refused() },
            socket_cookie: event.socket_cookie,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use seb_common::{EXE_COMPONENT_LEN, EXE_COMPONENTS};

    fn event_with_exe(names: &[&str]) -> DenialEvent {
        let mut exe = [[0u8; EXE_COMPONENT_LEN]; EXE_COMPONENTS];
        for (slot, name) in exe.iter_mut().zip(names) {
            slot[..name.len()].copy_from_slice(name.as_bytes());
        }
        // SAFETY: DenialEvent is plain old data; all zeroes is a valid value.
        let mut event: DenialEvent = unsafe { std::mem::zeroed() };
        event.exe = exe;
        event
    }

    #[test]
    fn the_kernels_components_make_a_path_root_first() {
        assert_eq!(
            kernel_exe(&event_with_exe(&["python3.11", "bin", "usr", "/"])).as_deref(),
            Some("/usr/bin/python3.11")
        );
        assert_eq!(kernel_exe(&event_with_exe(&[])), None, "no task context, no executable");
        let deep = ["h", "g", "f", "e", "d", "c", "b", "a"];
        assert_eq!(
            kernel_exe(&event_with_exe(&deep)).as_deref(),
            Some(".../a/b/c/d/e/f/g/h"),
            "truncated, and says so"
        );
    }

    #[test]
    fn a_refused_device_open_names_the_device_and_no_address() {
        let mut event = event_with_exe(&[]);
        event.family = FAMILY_DEVICE;
        event.hook = Hook::TunDevice as u8;
        event.daddr[..4].copy_from_slice(&246u32.to_ne_bytes());
        event.daddr[4..8].copy_from_slice(&1u32.to_ne_bytes());
        let denial = KernelDenial::from_event(&event, 0);
        assert_eq!(denial.device.as_deref(), Some("246:1"));
        assert_eq!((denial.address.as_str(), denial.action.as_str()), ("", "refused"));
        assert_eq!(KernelDenial::from_event(&event_with_exe(&[]), 0).device, None, "a kill names no device");
    }

    #[test]
    fn proc_completes_the_kernels_path_only_for_the_same_file() {
        let kernel = Some("/bin/python3".to_string());
        assert_eq!(best_exe(kernel.clone(), Some("/usr/bin/python3".into())).as_deref(), Some("/usr/bin/python3"));
        assert_eq!(
            best_exe(kernel.clone(), Some("/usr/bin/bash".into())).as_deref(),
            Some("/bin/python3"),
            "a reused pid"
        );
        assert_eq!(best_exe(kernel, None).as_deref(), Some("/bin/python3"), "the process is gone");
        assert_eq!(best_exe(None, Some("/x".into())).as_deref(), Some("/x"));
    }
}
