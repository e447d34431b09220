//! Who is on the other end of the broker socket.
//!
//! At accept, SO_PEERCRED names the connecting process and SO_PEERPIDFD pins it: the
//! pidfd refers to that very process for the life of the connection, even once its PID
//! names another process. What cannot change while the connection lives is kept from
//! accept: the PID and the credentials the socket recorded at connect. What can change
//! (the executable, by execve; the cgroup, by a move; so the pod) is read from
//! /proc/<pid> for each request, and only then is the pidfd checked to still refer to a
//! live process: if it does, the PID was that process's throughout the read (a PID is
//! not reused while its process, zombie or not, still exists). A caller that has exited
//! is refused. The pidfd is checked again before a decision is recorded.

use std::{
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{cert::contract::AgentIdentity, cgroupfs};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CallerIdentity {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    pub exe: Option<String>,
    pub cgroup: Option<String>,
    pub pod_uid: Option<String>,
}

impl CallerIdentity {
    /// What SO_PEERCRED alone says, for a caller /proc could not tell more about.
    pub fn unidentified(uid: u32, gid: u32, pid: i32) -> Self {
        Self { uid, gid, pid, exe: None, cgroup: None, pod_uid: None }
    }
}

/// The process that opened a connection, pinned by a pidfd.
#[derive(Debug, Clone)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    pidfd: Arc<OwnedFd>,
}

/// `SO_PEERPIDFD` (Linux 6.5): a pidfd for the peer process, taken at connect time.
const SO_PEERPIDFD: libc::c_int = 77;

impl Peer {
    /// The process at the other end of a connected Unix socket.
    pub fn of_socket(socket: BorrowedFd<'_>) -> Result<Self> {
        let cred: libc::ucred = getsockopt(socket, libc::SO_PEERCRED).context("SO_PEERCRED")?;
        let fd: libc::c_int = getsockopt(socket, SO_PEERPIDFD).context("SO_PEERPIDFD (needs Linux 6.5 or later)")?;
        // SAFETY: the kernel just created this descriptor for us.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { uid: cred.uid, gid: cred.gid, pid: cred.pid, pidfd: Arc::new(pidfd) })
    }

    /// A process named by its PID (pinned now, so only as good as the PID is now): this
    /// process, for tests and tools.
    pub fn of_pid(uid: u32, gid: u32, pid: i32) -> Result<Self> {
        // SAFETY: plain syscall; the returned fd is owned here.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("pidfd_open({pid})"));
        }
        // SAFETY: fd is a fresh, valid descriptor.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Self { uid, gid, pid, pidfd: Arc::new(pidfd) })
    }

    /// The pinned process has not exited, so its PID is still its own. A pidfd becomes
    /// readable when its process exits; polling it needs no permission over the process
    /// (signal 0 would: without CAP_KILL it fails with EPERM for every caller of another
    /// uid, as in the DaemonSet). Anything but "not readable" counts as gone.
    pub fn alive(&self) -> bool {
        let mut poll = libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, no wait.
        unsafe { libc::poll(&mut poll, 1, 0) == 0 }
    }

    /// Read the process's identity from /proc, then check it is still the pinned one.
    pub fn identify(&self) -> Result<Caller> {
        let pid = self.pid;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok().map(|p| p.to_string_lossy().into_owned());
        let cgroup = std::fs::File::open(format!("/proc/{pid}/cgroup")).ok().and_then(cgroupfs::unified_cgroup);
        if !self.alive() {
            bail!(
                "the process that opened this connection (pid {pid}) has exited; what /proc/{pid} shows now is not the caller"
            );
        }
        let pod_uid = cgroup.as_deref().and_then(pod_uid_of_caller);
        let identity = CallerIdentity { uid: self.uid, gid: self.gid, pid, exe, cgroup, pod_uid };
        Ok(Caller { identity, peer: self.clone() })
    }

    /// What SO_PEERCRED alone says.
    pub fn unidentified(&self) -> CallerIdentity {
        CallerIdentity::unidentified(self.uid, self.gid, self.pid)
    }
}

fn getsockopt<T: Copy>(socket: BorrowedFd<'_>, option: libc::c_int) -> std::io::Result<T> {
    let mut value = std::mem::MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` has room for `len` bytes; the kernel writes at most that many.
    let ret =
        unsafe { libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, option, value.as_mut_ptr().cast(), &mut len) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if len as usize != size_of::<T>() {
        return Err(std::io::Error::other(format!("getsockopt returned {len} bytes, {} expected", size_of::<T>())));
    }
    // SAFETY: the kernel filled all of it.
    Ok(unsafe { value.assume_init() })
}

/// A caller identified for one request.
#[derive(Debug)]
pub struct Caller {
    pub identity: CallerIdentity,
    peer: Peer,
}

impl Caller {
    /// This process, identified as the broker identifies a caller (tests and tools).
    pub fn identify(uid: u32, gid: u32, pid: i32) -> Result<Self> {
        Peer::of_pid(uid, gid, pid)?.identify()
    }

    /// Still the same live process as when identified (the pidfd pins it: its PID
    /// cannot name another process while it lives).
    pub fn still_same(&self) -> bool {
        self.peer.alive()
    }

    /// Whether the caller is the agent the contract names; `Err` says what differs.
    pub fn matches(&self, wanted: &AgentIdentity) -> Result<(), String> {
        let me = &self.identity;
        if let Some(uid) = wanted.uid
            && uid != me.uid
        {
            return Err(format!("the contract is for uid {uid}, the caller is uid {}", me.uid));
        }
        if let Some(exe) = &wanted.exe
            && me.exe.as_deref() != Some(exe)
        {
            return Err(format!("the contract is for executable {exe}, the caller runs {}", known(me.exe.as_deref())));
        }
        if let Some(cgroup) = &wanted.cgroup {
            let inside = me
                .cgroup
                .as_deref()
                .is_some_and(|c| c == cgroup || c.starts_with(&format!("{}/", cgroup.trim_end_matches('/'))));
            if !inside {
                return Err(format!(
                    "the contract is for cgroup {cgroup}, the caller is in {}",
                    known(me.cgroup.as_deref())
                ));
            }
        }
        if let Some(pod) = &wanted.pod_uid
            && me.pod_uid.as_deref() != Some(pod)
        {
            return Err(format!(
                "the contract is for pod {pod}, the caller is in {}",
                me.pod_uid.as_deref().unwrap_or("no pod")
            ));
        }
        Ok(())
    }
}

/// A caller's attribute in a message: what was read, or that it could not be.
fn known(value: Option<&str>) -> &str {
    value.unwrap_or("(unknown)")
}

/// The caller's pod UID, only where the kubelet puts pods: under the
/// hierarchy's own `kubepods` (cgroupfs driver: `/kubepods[/burstable|/besteffort]/pod<uid>`)
/// or `kubepods.slice` (systemd driver: `/kubepods.slice[/kubepods-<qos>.slice]/
/// kubepods[-<qos>]-pod<uid_with_underscores>.slice`). Seen from inside a cgroup namespace
/// (a path starting with `..`, the namespace's root being in that hierarchy), from the
/// QoS level or the pod itself. Anywhere else (a user's delegated subtree, where anyone
/// may make `kubepods/pod<uid>`, or `systemd-run --user --unit=pod<uid>`), none.
pub fn pod_uid_of_caller(cgroup: &str) -> Option<String> {
    let segments: Vec<&str> = cgroup.split('/').filter(|s| !s.is_empty()).collect();
    let above = segments.iter().take_while(|s| **s == "..").count();
    let path = &segments[above..];
    match path.first() {
        Some(&root @ ("kubepods" | "kubepods.slice")) => pod_below(Some(root), &path[1..]),
        _ if above > 0 => pod_below(None, path),
        _ => None,
    }
}

/// The pod UID of `cgroup` where it lies in the kubelet's pod hierarchy `kubepods` (both
/// relative to the mount, as the kernel names cgroups): `<kubepods>[/<qos>]/<pod>[/...]`.
/// For naming what a cgroup holds (denials, this node's pod cgroups) under a kubelet
/// root that may be configured (`cluster.kubepods_cgroup`); nowhere else (a delegated
/// subtree's `pod<uid>` names no pod).
pub fn pod_uid_in(kubepods: &str, cgroup: &str) -> Option<String> {
    let root: Vec<&str> = kubepods.split('/').filter(|s| !s.is_empty()).collect();
    let segments: Vec<&str> = cgroup.split('/').filter(|s| !s.is_empty()).collect();
    let rest = segments.strip_prefix(root.as_slice())?;
    pod_below(Some(root.last()?), rest)
}

/// The pod named by `rest`, the segments below the kubepods cgroup `root` (None: below
/// a cgroup namespace's root inside the hierarchy, at the QoS level or the pod).
fn pod_below(root: Option<&str>, mut rest: &[&str]) -> Option<String> {
    let systemd = root.map_or_else(|| rest.first().is_some_and(|s| s.ends_with(".slice")), |r| r.ends_with(".slice"));
    // A systemd slice repeats its parent's name: `<root>-<qos>.slice`, `<root>[-<qos>]-pod<uid>.slice`.
    let root_name = root.map_or("kubepods", |r| r.trim_end_matches(".slice"));
    let levels =
        ["burstable", "besteffort"].map(|qos| if systemd { format!("{root_name}-{qos}.slice") } else { qos.into() });
    let mut prefixes: Vec<String> = match root {
        Some(_) => vec![root_name.into()],
        None => ["", "-burstable", "-besteffort"].iter().map(|qos| format!("kubepods{qos}")).collect(),
    };
    if let Some(level) = rest.first().filter(|s| levels.iter().any(|l| l == *s)) {
        prefixes = vec![level.trim_end_matches(".slice").into()];
        rest = &rest[1..];
    }
    let pod = rest.first()?;
    let uid = if systemd {
        prefixes
            .iter()
            .find_map(|prefix| pod.strip_prefix(prefix.as_str())?.strip_prefix("-pod")?.strip_suffix(".slice"))?
            .replace('_', "-")
    } else {
        pod.strip_prefix("pod")?.to_string()
    };
    well_formed_uid(uid)
}

/// `uid` if it is a UUID in its hyphenated form, as the kubelet names pods.
fn well_formed_uid(uid: String) -> Option<String> {
    let well_formed = uid.len() == 36
        && uid
            .chars()
            .enumerate()
            .all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == '-' } else { c.is_ascii_hexdigit() });
    well_formed.then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_uids_are_found_under_both_cgroup_drivers() {
        let uid = "0f3c2a1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b";
        assert_eq!(pod_uid_of_caller(&format!("/kubepods/burstable/pod{uid}/abc123")).as_deref(), Some(uid));
        let systemd = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-1.scope",
            uid.replace('-', "_")
        );
        assert_eq!(pod_uid_of_caller(&systemd).as_deref(), Some(uid));
        assert_eq!(pod_uid_of_caller(&format!("/kubepods/pod{uid}/abc")).as_deref(), Some(uid));
        let guaranteed = format!("/kubepods.slice/kubepods-pod{}.slice/cri-containerd-1.scope", uid.replace('-', "_"));
        assert_eq!(pod_uid_of_caller(&guaranteed).as_deref(), Some(uid));
        // Seen from a cgroup namespace whose root is a container of another pod.
        let relative = format!("/../../kubepods-besteffort-pod{}.slice/cri-containerd-2.scope", uid.replace('-', "_"));
        assert_eq!(pod_uid_of_caller(&relative).as_deref(), Some(uid));
        assert_eq!(pod_uid_of_caller("/system.slice/kubelet.service"), None);
        // Naming what a cgroup holds, under a configured kubelet root.
        assert_eq!(
            pod_uid_in("/nested/kubepods", &format!("/nested/kubepods/burstable/pod{uid}/abc")).as_deref(),
            Some(uid)
        );
        assert_eq!(pod_uid_in("nested/kubepods/", &format!("/nested/kubepods/pod{uid}")).as_deref(), Some(uid));
        // kind's kubelet: `--cgroup-root=/kubelet` under the systemd driver.
        let kind = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{}.slice/x",
            uid.replace('-', "_")
        );
        assert_eq!(pod_uid_in("/kubelet.slice/kubelet-kubepods.slice", &kind).as_deref(), Some(uid));
    }

    #[test]
    fn a_pod_uid_is_not_taken_from_outside_the_kubelets_hierarchy() {
        let uid = "0f3c2a1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b";
        let forged = [
            // systemd-run --user --scope --unit=pod<uid>
            format!("/user.slice/user-1000.slice/user@1000.service/app.slice/pod{uid}.scope"),
            // mkdir in a user's delegated subtree
            format!("/user.slice/user-1000.slice/user@1000.service/kubepods/pod{uid}/x"),
            format!(
                "/user.slice/user-1000.slice/user@1000.service/kubepods.slice/kubepods-pod{}.slice/x",
                uid.replace('-', "_")
            ),
            format!("/../../../user.slice/user-1000.slice/user@1000.service/kubepods/pod{uid}"),
            format!("/kubepods/burstable/notapod{uid}/x"),
        ];
        for path in &forged {
            assert_eq!(pod_uid_of_caller(path), None, "{path}");
        }
        // Nor for naming a denied cgroup, under the default or a configured root.
        for root in ["/kubepods", "/kubepods.slice", "/nested/kubepods", "/user.slice"] {
            for path in &forged {
                assert_eq!(pod_uid_in(root, path), None, "{root} {path}");
            }
        }
        let outside = format!("/nested/kubepodsx/pod{uid}");
        assert_eq!(pod_uid_in("/nested/kubepods", &outside), None);
        assert_eq!(pod_uid_in("/nested/kubepods", &format!("/nested/kubepods/burstable/x/pod{uid}")), None);
    }

    #[test]
    fn the_caller_is_this_process_and_matches_only_its_own_identity() {
        let me = Caller::identify(0, 0, std::process::id() as i32).unwrap();
        assert!(me.still_same());
        let exe = std::env::current_exe().unwrap().to_string_lossy().into_owned();
        assert_eq!(me.identity.exe.as_deref(), Some(exe.as_str()));
        assert!(me.matches(&AgentIdentity { uid: Some(0), exe: Some(exe), ..Default::default() }).is_ok());
        assert!(me.matches(&AgentIdentity { uid: Some(1000), ..Default::default() }).is_err());
        assert!(me.matches(&AgentIdentity { exe: Some("/usr/bin/other".into()), ..Default::default() }).is_err());
    }

    #[test]
    fn a_socket_peer_is_pinned_at_connect_and_refused_once_it_exits() {
        use std::os::{fd::AsFd, unix::net::UnixStream};
        let (ours, theirs) = UnixStream::pair().unwrap();
        let peer = Peer::of_socket(ours.as_fd()).unwrap();
        assert_eq!(peer.pid, std::process::id() as i32);
        assert!(peer.identify().is_ok());
        drop(theirs);

        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let peer = Peer::of_pid(0, 0, child.id() as i32).unwrap();
        assert!(peer.identify().is_ok());
        child.kill().unwrap();
        child.wait().unwrap();
        let error = peer.identify().unwrap_err().to_string();
        assert!(error.contains("has exited"), "{error}");
    }

    #[test]
    fn the_executable_is_read_again_for_each_request() {
        use std::io::Write;
        // A shell that replaces itself with `sleep` once told to: same PID, new executable.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read go; exec sleep 5"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let peer = Peer::of_pid(0, 0, child.id() as i32).unwrap();
        let before = peer.identify().unwrap().identity.exe.unwrap();
        assert!(!before.ends_with("/sleep"), "{before}");
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let after = loop {
            let exe = peer.identify().unwrap().identity.exe.unwrap();
            if exe != before || std::time::Instant::now() > deadline {
                break exe;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(after.ends_with("/sleep"), "after execve the caller runs {after}, not sleep");
    }

    #[test]
    fn a_process_that_exited_is_no_longer_the_same_caller() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let caller = Caller::identify(0, 0, child.id() as i32).unwrap();
        assert!(caller.still_same());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!caller.still_same());
    }
}
