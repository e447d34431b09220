//! The processes already in the scope when enforcement is applied.
//!
//! The kernel follows a process of the scope from its fork to its exit; the ones that
//! were there before the programs were attached are found by walking the scope's
//! `cgroup.procs` and marked by the agent. A process may exit between the walk and its
//! mark: its exit already passed the tracepoint that forgets a process, so the mark
//! would stay, and the next process given that PID, anywhere on the node, would be
//! taken for one of the scope that moved out (and be killed at its first `socket()`). So
//! each walked process is pinned by its start time and, once marked, settled: a mark
//! whose process has gone is removed, at once and again at the next check (a process
//! may be between the tracepoint and its end for a while, closing its files).

use std::path::PathBuf;

use crate::cgroupfs;

/// A process found in the scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walked {
    pub tgid: u32,
    /// The cgroup it was found in.
    pub cgroup_id: u64,
    /// Its start time (clock ticks since boot): what tells it from a later holder of
    /// its PID.
    pub start: u64,
}

/// What became of a walked process.
#[derive(Debug, PartialEq, Eq)]
pub enum Fate {
    Running,
    /// Exited: its PID is free, or it is a zombie.
    Gone,
    /// Another process holds its PID now; whatever the kernel noted for it stands.
    Replaced,
}

/// The processes in the enforced cgroups and their descendants, outside exempt ones. A
/// cgroup or process that vanishes during the walk is skipped.
pub fn scoped_processes(scopes: &[PathBuf], exempt: &[PathBuf]) -> Vec<Walked> {
    let mut found = Vec::new();
    let mut pending: Vec<PathBuf> = scopes.to_vec();
    while let Some(dir) = pending.pop() {
        if exempt.contains(&dir) {
            continue;
        }
        let Ok(cgroup_id) = cgroupfs::cgroup_id(&dir) else { continue };
        if let Ok(procs) = cgroupfs::processes_in(&dir) {
            found.extend(procs.into_iter().filter_map(|tgid| {
                let (start, running) = stat(tgid)?;
                running.then_some(Walked { tgid, cgroup_id, start })
            }));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            pending.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
    }
    found
}

impl Walked {
    pub fn fate(&self) -> Fate {
        match stat(self.tgid) {
            None => Fate::Gone,
            Some((start, _)) if start != self.start => Fate::Replaced,
            Some((_, running)) => {
                if running {
                    Fate::Running
                } else {
                    Fate::Gone
                }
            }
        }
    }
}

/// A process's start time, and whether it is still running (not a zombie), from
/// /proc/<tgid>/stat; `None` when no process has that PID. A leader that ended alone is
/// a zombie while its other threads run: the process runs while any of its threads do.
fn stat(tgid: u32) -> Option<(u64, bool)> {
    let (start, leader_running) = parse_stat(&std::fs::read_to_string(format!("/proc/{tgid}/stat")).ok()?)?;
    Some((start, leader_running || any_thread_running(tgid)))
}

/// Whether a thread of `tgid` other than an exited leader is still running.
fn any_thread_running(tgid: u32) -> bool {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{tgid}/task")) else { return false };
    threads.flatten().any(|thread| {
        let stat = std::fs::read_to_string(thread.path().join("stat")).unwrap_or_default();
        parse_stat(&stat).is_some_and(|(_, running)| running)
    })
}

fn parse_stat(text: &str) -> Option<(u64, bool)> {
    let mut fields = super::processes::stat_fields_from_state(text)?;
    let state = fields.next()?;
    // `starttime` is field 22; `state` was field 3.
    let start = fields.nth(18)?.parse().ok()?;
    Some((start, !matches!(state, "Z" | "X" | "x")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walked_process_is_running_then_gone_once_it_exits() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let (start, running) = stat(child.id()).unwrap();
        assert!(running);
        let walked = Walked { tgid: child.id(), cgroup_id: 1, start };
        assert_eq!(walked.fate(), Fate::Running);
        child.kill().unwrap();
        // Killed, not yet reaped: a zombie.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while walked.fate() == Fate::Running {
            assert!(std::time::Instant::now() < deadline, "never became a zombie");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(walked.fate(), Fate::Gone, "a zombie");
        child.wait().unwrap();
        assert_eq!(walked.fate(), Fate::Gone, "reaped");
        let later = Walked { start: start.wrapping_sub(1), ..walked };
        let me = Walked { tgid: std::process::id(), ..later };
        assert_eq!(me.fate(), Fate::Replaced, "another start time under the PID");
    }

    /// A process whose first thread (its leader) ended alone shows a zombie leader while
    /// its other threads run: it is running, until they end too.
    #[test]
    fn a_process_whose_leader_ended_alone_runs_on() {
        // The main thread ends alone (`exit`, not `exit_group`); a thread sleeps on.
        let script = format!(
            "import ctypes, sys, threading, time\n\
             threading.Thread(target=time.sleep, args=(30,)).start()\n\
             print('ready', flush=True)\n\
             ctypes.CDLL(None).syscall({}, 0)\n",
            libc::SYS_exit
        );
        let mut child = std::process::Command::new("python3")
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        let pid = child.id();
        let leader = || parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while leader().1 {
            assert!(std::time::Instant::now() < deadline, "the leader never ended");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let walked = Walked { tgid: pid, cgroup_id: 1, start: leader().0 };
        assert_eq!(walked.fate(), Fate::Running, "its other thread runs");
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(walked.fate(), Fate::Gone, "reaped");
    }

    #[test]
    fn the_stat_line_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let line =
            "42 (a) b (c)) S 1 42 42 0 -1 4194560 90 0 0 0 0 0 0 0 20 0 1 0 123456 1000 100 18446744073709551615";
        assert_eq!(parse_stat(line), Some((123456, true)));
        assert_eq!(parse_stat(&line.replace(") S ", ") Z ")), Some((123456, false)));
        assert_eq!(parse_stat("42 (truncated"), None);
        let (start, running) = stat(std::process::id()).unwrap();
        assert!(running && start > 0);
    }
}
