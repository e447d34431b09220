//! Processes the agent acts on by itself (forged brokers, entrants of its own cgroup):
//! whether one is of the scope, killing one without hitting a later holder of its PID,
//! and naming them in a finding.

use std::{
    borrow::Borrow,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::maps::{HashMap, MapData};

use super::loader::AttachTargets;
use crate::cgroupfs;

/// Whether `tgid` is a process of the scope: followed by the kernel, or (should root have
/// deleted its entry) in an enforced cgroup outside the exempt ones. `None` when that
/// cannot be told (its cgroup is unreadable: it exited); each caller decides which way
/// that fails (a kill spares it, an administrator check refuses it).
pub fn scope_membership<T: Borrow<MapData>>(
    scoped: &HashMap<T, u32, u64>,
    mount: &Path,
    scope: &AttachTargets,
    tgid: u32,
) -> Option<bool> {
    if scoped.get(&tgid, 0).is_ok() {
        return Some(true);
    }
    let cgroup = cgroupfs::cgroup_of(&tgid.to_string()).ok()?;
    Some(in_scope(scope, &cgroupfs::resolve(mount, &cgroup)))
}

/// [`scope_membership`], a process that cannot be told counted as not of the scope (what
/// is killed for being of the scope must be known to be).
pub fn of_the_scope<T: Borrow<MapData>>(
    scoped: &HashMap<T, u32, u64>,
    mount: &Path,
    scope: &AttachTargets,
    tgid: u32,
) -> bool {
    scope_membership(scoped, mount, scope, tgid).unwrap_or(false)
}

/// Whether the cgroup directory `dir` is enforced: under a scope, not under an exemption.
pub fn in_scope(scope: &AttachTargets, dir: &Path) -> bool {
    scope.scopes.iter().any(|enforced| dir.starts_with(enforced))
        && !scope.exempt.iter().any(|exempt| dir.starts_with(exempt))
}

/// SIGKILL the process `tgid` if `still` holds once it is pinned by a pidfd: `still`
/// checks what made it a target, so a PID reused after the target exited is never hit
/// (the signal goes to the pinned process, which is either the one checked or gone).
/// The pidfd of the killed process, which becomes readable once it has exited.
pub fn kill_pinned(tgid: u32, still: impl FnOnce() -> bool) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, tgid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new descriptor this function owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    if !still() {
        return None;
    }
    // SAFETY: a valid pidfd, no siginfo.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        ) == 0
    };
    sent.then_some(pidfd)
}

/// Wait until every process behind `pidfds` has exited, for at most `limit`.
pub fn wait_exited(pidfds: &[OwnedFd], limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    for pidfd in pidfds {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut poll = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd; the result is not needed (a timeout ends the wait).
        unsafe { libc::poll(&mut poll, 1, left.as_millis().min(i32::MAX as u128) as i32) };
    }
}

/// Whether process `tgid` descends from process `ancestor`, as far as /proc shows.
pub fn descends_from(tgid: u32, ancestor: u32) -> bool {
    let mut pid = tgid;
    for _ in 0..MAX_GENERATIONS {
        match parent_of(pid) {
            Some(parent) if parent == ancestor => return true,
            Some(parent) if parent > 1 => pid = parent,
            _ => return false,
        }
    }
    false
}

/// How far a process's ancestry is followed (a PID namespace's processes are rarely
/// more than a few generations deep).
const MAX_GENERATIONS: usize = 64;

/// The processes that started this one (parent, grandparent, ... up to the PID
/// namespace's first), as far as /proc shows them.
pub fn ancestors_of_this_process() -> Vec<u32> {
    let mut found: Vec<u32> = Vec::new();
    let mut pid = std::process::id();
    while let Some(parent) = parent_of(pid).filter(|parent| *parent != 0 && !found.contains(parent)) {
        found.push(parent);
        pid = parent;
        if found.len() == MAX_GENERATIONS {
            break;
        }
    }
    found
}

/// Read cgroup paths as the host does: join the cgroup namespace of the outermost
/// process this one can see of PID 1 and its own ancestors (the host's init, with the
/// host's PIDs as the DaemonSet has them; else the outermost ancestor whose namespace
/// can be opened: a container's parent, the runtime's shim, is the host's) when this
/// process is in another. Inside a container's own cgroup namespace /proc shows every
/// cgroup relative to the container's (`/../../kubepods-…/…`), so a caller's cgroup
/// would never match a contract's. Called before any thread starts: threads created
/// after inherit it. Returns the process whose namespace was joined, if one was; fails
/// when one was needed and could not be joined (the start must then fail).
pub fn join_host_cgroup_namespace() -> anyhow::Result<Option<u32>> {
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::metadata("/proc/self/ns/cgroup")?;
    let mut outermost = ancestors_of_this_process();
    outermost.reverse();
    let reference = std::iter::once(1).chain(outermost).find_map(|pid| {
        let path = format!("/proc/{pid}/ns/cgroup");
        Some((pid, std::fs::metadata(&path).ok()?, std::fs::File::open(&path).ok()?))
    });
    // None readable (no /proc of others): nothing tells another namespace apart.
    let Some((pid, theirs, namespace)) = reference else { return Ok(None) };
    if (own.dev(), own.ino()) == (theirs.dev(), theirs.ino()) {
        return Ok(None);
    }
    nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWCGROUP)
        .map_err(|e| anyhow::anyhow!("joining the cgroup namespace of process {pid} (needs CAP_SYS_ADMIN): {e}"))?;
    Ok(Some(pid))
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parent_in_stat(&stat)
}

/// `ppid`, the fourth field of /proc/<pid>/stat.
fn parent_in_stat(stat: &str) -> Option<u32> {
    stat_fields_from_state(stat)?.nth(1)?.parse().ok()
}

/// The fields of a /proc/<pid>/stat text from the third (`state`) on: the command name
/// before them may hold spaces and parentheses, so they start after the last ')'.
pub fn stat_fields_from_state(stat: &str) -> Option<std::str::Split<'_, char>> {
    Some(stat.get(stat.rfind(')')? + 2..)?.split(' '))
}

/// At most this many processes are named in a finding; the rest are counted.
const NAMED_PROCESSES: usize = 4;

/// Who the processes are, for a tamper record: tgid, executable and cgroup, while they
/// run.
pub fn describe(tgids: &[u32]) -> String {
    let mut named: Vec<String> = tgids
        .iter()
        .take(NAMED_PROCESSES)
        .map(|tgid| {
            let exe = std::fs::read_link(format!("/proc/{tgid}/exe"));
            let cgroup = cgroupfs::cgroup_of(&tgid.to_string()).unwrap_or_else(|_| "unknown".into());
            match exe {
                Ok(exe) => format!("tgid {tgid} ({}, cgroup {cgroup})", exe.display()),
                Err(_) => format!("tgid {tgid} (not running)"),
            }
        })
        .collect();
    if tgids.len() > NAMED_PROCESSES {
        named.push(format!("and {} more", tgids.len() - NAMED_PROCESSES));
    }
    named.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_is_read_past_a_command_name_with_spaces_and_parentheses() {
        assert_eq!(parent_in_stat("42 (a) b) (c) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parent_in_stat("42 (x"), None);
    }

    #[test]
    fn this_process_descends_from_its_parent_and_its_child_from_it() {
        let ancestors = ancestors_of_this_process();
        assert_eq!(ancestors.first(), Some(&std::os::unix::process::parent_id()));
        assert!(!ancestors.contains(&std::process::id()));
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        assert!(descends_from(child.id(), std::process::id()));
        assert!(descends_from(child.id(), std::os::unix::process::parent_id()));
        assert!(!descends_from(std::process::id(), child.id()));
        let pidfd = kill_pinned(child.id(), || true).expect("killed");
        wait_exited(&[pidfd], std::time::Duration::from_secs(5));
        assert!(child.try_wait().unwrap().is_some(), "the pidfd was readable before the child exited");
    }
}
