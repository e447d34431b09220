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

use crate::{cert::contract::AgentIdentity, cgroupfs, kubelet_cgroups::pod_uid_of_caller};

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

    /// Whether the process is in the broker's mount namespace: read from /proc, then the
    /// process checked to be the pinned one. False if it cannot be read (the link needs
    /// ptrace access, which an AppArmor profile may deny), or the process is gone.
    pub fn shares_mounts(&self) -> bool {
        let namespace = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
        let theirs = namespace(&self.pid.to_string());
        theirs.is_some() && theirs == namespace("self") && self.alive()
    }

    /// Whether the process is in the broker's pid namespace: as deep below this /proc's
    /// namespace as the broker (its `NSpid` line lists its pid in each namespace from
    /// there down; `status` needs no ptrace access, unlike `ns/pid`), then checked to be
    /// the pinned one. A process this /proc sees is in that namespace or below it, so at
    /// the broker's depth of one it is in the broker's. False if it cannot be read, if the
    /// broker is not at depth one itself, or the process is gone.
    pub fn shares_pid_namespace(&self) -> bool {
        let depth = |pid: &str| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            status.lines().find_map(|line| line.strip_prefix("NSpid:")).map(|pids| pids.split_whitespace().count())
        };
        // The broker itself in this /proc's namespace (as with the host's, `hostPID`):
        // deeper, a sibling namespace at its depth would compare equal.
        depth("self") == Some(1) && depth(&self.pid.to_string()) == Some(1) && self.alive()
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

    /// Whether the caller sees the broker's mounts (its mount namespace is the broker's),
    /// so that its executable's path names the file it names for the broker. Read when
    /// a contract needs it; false if it cannot be read, or the caller is gone.
    fn shares_mounts(&self) -> bool {
        self.peer.shares_mounts()
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
        if wanted.exe.is_some() && wanted.cgroup.is_none() && wanted.pod_uid.is_none() && !self.shares_mounts() {
            return Err(
                "the contract binds the caller by its executable's path alone, and the caller runs in another \
                        mount namespace, where that path names whatever that namespace mounts there (bind a cgroup or \
                        a pod as well)"
                    .into(),
            );
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

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A caller in its own mount namespace may have anything mounted at the contract's
    /// path: a contract binding the executable alone does not admit it, one binding a
    /// cgroup as well does.
    #[test]
    fn an_executable_path_alone_binds_no_caller_in_another_mount_namespace() {
        let mut child = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sleep", "30"])
            .spawn()
            .expect("unshare (util-linux)");
        let pid = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let other = loop {
            let caller = Caller::identify(0, 0, pid).unwrap();
            if caller.identity.exe.as_deref().is_some_and(|exe| exe.ends_with("/sleep")) {
                break caller;
            }
            assert!(std::time::Instant::now() < deadline, "unshare never ran sleep: {:?}", caller.identity);
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let exe = other.identity.exe.clone();
        let refused = other.matches(&AgentIdentity { exe: exe.clone(), ..Default::default() }).unwrap_err();
        assert!(refused.contains("another mount namespace"), "{refused}");
        let cgroup = other.identity.cgroup.clone();
        other.matches(&AgentIdentity { exe, cgroup, ..Default::default() }).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        // The same binding for a caller in the broker's own mount namespace.
        let me = Caller::identify(0, 0, std::process::id() as i32).unwrap();
        me.matches(&AgentIdentity { exe: me.identity.exe.clone(), ..Default::default() }).unwrap();
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
