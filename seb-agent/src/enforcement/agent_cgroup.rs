//! The running agent's own cgroup, as the kernel named it.
//!
//! The kernel spares processes there: their `bpf()` calls (`seb_bpf_call`) and their
//! broker registrations (the integrity check keeps the agent's peers). While an agent
//! runs, a process of the scope entering it is killed at the move. One put there while
//! no agent ran (between a crash and the restart) must not be spared from the moment
//! this agent is named: so the kernel names the cgroup *unarmed* (moves into it judged,
//! nothing there spared), the agent kills every process there but itself, those that
//! started it (a supervisor) and those it started, and only then arms the name. Whether
//! such a process is of the scope is not asked: it could have deleted its own entry in
//! `SEB_SCOPED_TASKS` while no agent judged its `bpf()` calls.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::Ebpf;
use seb_common::{agent_slots, map_names};
use tracing::warn;

use super::{integrity::Finding, maps, processes};
use crate::cgroupfs::{self, CgroupNames};

/// Killing and listing again, at most this many times, until the cgroup holds no other
/// process (each pass takes the children the last one's processes forked meanwhile).
const EXPEL_PASSES: usize = 8;

/// How long one pass waits for the processes it killed to exit.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// This process as `SEB_AGENT` must name it, and its cgroup once named and armed.
pub struct AgentEntry {
    pub tgid: u32,
    /// The cgroup's id, once armed; kept and compared from then on.
    pub cgroup: Option<u64>,
    /// Its directory under the mount.
    pub dir: Option<PathBuf>,
}

impl AgentEntry {
    pub fn this_process() -> Self {
        Self { tgid: std::process::id(), cgroup: None, dir: None }
    }

    /// With `seb_bpf_call` attached, the kernel names this process's cgroup, unarmed, at
    /// its next `bpf()` call (this read's). Once it has, the processes there that are not
    /// this agent's own are killed and the name armed. Until that has all succeeded the
    /// name stays unarmed (nothing there is spared), a finding says why, and the next
    /// check tries again.
    pub fn learn_cgroup(&mut self, ebpf: &mut Ebpf, mount: &Path) -> Option<Finding> {
        if self.cgroup.is_some() {
            return None;
        }
        self.arm(ebpf, mount).unwrap_or_else(|(object, e)| {
            Some(Finding::process(
                &object,
                format!("{e:#}: not armed, so nothing there is spared; tried again at the next check"),
            ))
        })
    }

    /// Learn, expel and arm; on failure, the object concerned and why.
    fn arm(&mut self, ebpf: &mut Ebpf, mount: &Path) -> Result<Option<Finding>, (String, anyhow::Error)> {
        let (_, named) = maps::read_agent(ebpf).map_err(|e| (map_names::AGENT.to_string(), e))?;
        let cgroup = named & !agent_slots::UNARMED;
        if cgroup == 0 {
            return Ok(None);
        }
        let object = format!("cgroup {cgroup}");
        let dir = directory(mount, cgroup).map_err(|e| (object.clone(), e))?;
        let expelled = expel_others(&dir).map_err(|e| (object.clone(), e))?;
        if expelled.remaining == 0 {
            maps::write_agent(ebpf, self.tgid, Some(cgroup))
                .context("arming the agent's cgroup")
                .map_err(|e| (object, e))?;
            self.cgroup = Some(cgroup);
            self.dir = Some(dir.clone());
        }
        Ok(expelled.finding(&dir))
    }
}

/// The directory of the cgroup with id `id` (the kernel's name for the agent's cgroup),
/// found under the mount: inside a container's cgroup namespace, /proc/self/cgroup names
/// it relative to the namespace, not to the mount the agent enforces through.
fn directory(mount: &Path, id: u64) -> Result<PathBuf> {
    let relative = CgroupNames::new(mount.to_path_buf())
        .path_of(id)
        .with_context(|| format!("no cgroup with id {id} under {}", mount.display()))?;
    Ok(cgroupfs::resolve(mount, &relative))
}

/// What [`expel_others`] did.
#[derive(Default)]
struct Expelled {
    /// The processes found (over every pass), named while they ran.
    described: Vec<String>,
    found: usize,
    killed: usize,
    /// Others still there after the last pass.
    remaining: usize,
}

impl Expelled {
    fn finding(&self, dir: &Path) -> Option<Finding> {
        if self.found == 0 {
            return None;
        }
        let mut problem = format!(
            "{} other processes were in the agent's cgroup when it started (they would be spared at bpf() and as \
             brokers): {}; {} killed",
            self.found,
            self.described.join(", "),
            self.killed
        );
        if self.remaining > 0 {
            problem.push_str(&format!(
                "; {} still there after {EXPEL_PASSES} passes: not armed, so nothing there is spared; tried again at \
                 the next check",
                self.remaining
            ));
        }
        Some(Finding::process(&dir.display().to_string(), problem))
    }
}

/// Kill every process in `dir` but this one, those that started it and those it
/// started, each pinned by a pidfd while it is still there; list again once they have
/// exited, until none is left or the passes run out.
fn expel_others(dir: &Path) -> Result<Expelled> {
    let agent = std::process::id();
    let ancestors = processes::ancestors_of_this_process();
    let is_own = |tgid: u32| tgid == agent || ancestors.contains(&tgid) || processes::descends_from(tgid, agent);
    let others =
        || -> Result<Vec<u32>> { Ok(cgroupfs::processes_in(dir)?.into_iter().filter(|tgid| !is_own(*tgid)).collect()) };
    let mut expelled = Expelled::default();
    for _ in 0..EXPEL_PASSES {
        let found = others()?;
        if found.is_empty() {
            return Ok(expelled);
        }
        // Described before they are killed, while /proc still shows them.
        expelled.described.push(processes::describe(&found));
        expelled.found += found.len();
        warn!(cgroup = %dir.display(), processes = ?found, "killing processes found in the agent's cgroup at start");
        let still_there = |tgid: u32| cgroupfs::processes_in(dir).is_ok_and(|procs| procs.contains(&tgid));
        let killed: Vec<OwnedFd> =
            found.iter().filter_map(|tgid| processes::kill_pinned(*tgid, || still_there(*tgid))).collect();
        expelled.killed += killed.len();
        processes::wait_exited(&killed, EXIT_WAIT);
    }
    expelled.remaining = others()?.len();
    Ok(expelled)
}
