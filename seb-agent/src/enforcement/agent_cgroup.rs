//! The running agent's own cgroup, as the kernel named it.
//!
//! The kernel spares processes there: their `bpf()` calls (`seb_bpf_call`) and their
//! broker registrations (the integrity check keeps the agent's peers). While an agent
//! runs, a process of the scope entering it is killed at the move. One put there while
//! no agent ran (between a crash and the restart) must not be spared from the moment
//! this agent is named. So the kernel names the cgroup *unarmed* (moves into it judged,
//! nothing there spared); the agent kills every process of the scope there but itself,
//! those that started it (a supervisor) and those it started, and only then arms the
//! name.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use seb_common::{agent_slots, map_names};
use tracing::warn;

use super::{integrity::Finding, loader::AttachTargets, maps, processes};
use crate::cgroupfs::{self, CgroupNames};

/// Killing and listing again, at most this many times, until the cgroup holds no other
/// process of the scope (each pass takes the children the last one's forked meanwhile).
const EXPEL_PASSES: usize = 8;

/// How long one pass waits for the processes it killed to exit.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// This process as `SEB_AGENT` must name it, and its cgroup as the kernel named it.
pub struct AgentEntry {
    pub tgid: u32,
    /// The cgroup the kernel named first: kept, so that the agent moved elsewhere later
    /// never has that cgroup named instead.
    pub named: Option<u64>,
    /// Whether the agent armed it.
    pub armed: bool,
    /// Its directory under the mount, once armed.
    pub dir: Option<PathBuf>,
}

impl AgentEntry {
    pub fn this_process() -> Self {
        Self { tgid: std::process::id(), named: None, armed: false, dir: None }
    }

    /// What `SEB_AGENT`'s cgroup slot must hold: the armed cgroup, the named one unarmed,
    /// or (not named yet) the bare unarmed bit, which the kernel names at this agent's
    /// next `bpf()` call.
    pub fn cgroup_slot(&self) -> u64 {
        match (self.named, self.armed) {
            (Some(cgroup), true) => cgroup,
            (Some(cgroup), false) => cgroup | agent_slots::UNARMED,
            (None, _) => agent_slots::UNARMED,
        }
    }

    /// Learn the cgroup the kernel named (unarmed, at this agent's first `bpf()` call
    /// with `seb_bpf_call` attached), kill the processes of the scope found there that
    /// are not this agent's own, and arm it. Until that has all succeeded the name stays
    /// unarmed (nothing there is spared), a finding says why, and the next check tries
    /// again.
    pub fn learn_cgroup(&mut self, ebpf: &mut Ebpf, mount: &Path, scope: &AttachTargets) -> Option<Finding> {
        if self.armed {
            return None;
        }
        self.arm(ebpf, mount, scope).unwrap_or_else(|(object, e)| {
            Some(Finding::process(
                &object,
                format!("{e:#}: not armed, so nothing there is spared; tried again at the next check"),
            ))
        })
    }

    /// Learn, check, expel and arm; on failure, the object concerned and why.
    fn arm(
        &mut self,
        ebpf: &mut Ebpf,
        mount: &Path,
        scope: &AttachTargets,
    ) -> Result<Option<Finding>, (String, anyhow::Error)> {
        if self.named.is_none() {
            let (_, slot) = maps::read_agent(ebpf).map_err(|e| (map_names::AGENT.to_string(), e))?;
            let cgroup = slot & !agent_slots::UNARMED;
            if cgroup == 0 {
                return Ok(None);
            }
            self.named = Some(cgroup);
        }
        let cgroup = self.named.expect("named above");
        let object = format!("cgroup {cgroup}");
        let dir = directory(mount, cgroup).map_err(|e| (object.clone(), e))?;
        let expelled = expel_others(ebpf, mount, scope, &dir).map_err(|e| (object.clone(), e))?;
        if expelled.remaining == 0 {
            self.armed = true;
            maps::write_agent(ebpf, self.tgid, self.cgroup_slot())
                .context("arming the agent's cgroup")
                .map_err(|e| (object, e))?;
            self.dir = Some(dir.clone());
        }
        Ok(expelled.finding(&dir))
    }
}

/// The directory of the cgroup with id `id` (the kernel's name for the agent's cgroup),
/// found under the mount: /proc/self/cgroup names it relative to the agent's cgroup
/// namespace, which need not be where the mount begins.
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
            "{} processes of the scope were in the agent's cgroup when it started (they would be spared at bpf() and \
             as brokers): {}; {} killed",
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

/// Kill every process of the scope in `dir` but this one, those that started it and
/// those it started, each pinned by a pidfd while it is still there and of the scope;
/// list again once they have exited, until none is left or the passes run out.
fn expel_others(ebpf: &Ebpf, mount: &Path, scope: &AttachTargets, dir: &Path) -> Result<Expelled> {
    let scoped: HashMap<&MapData, u32, u64> = HashMap::try_from(
        ebpf.map(map_names::SCOPED_TASKS).with_context(|| format!("map {} missing", map_names::SCOPED_TASKS))?,
    )?;
    // The whole cgroup is of the scope when it is enforced (the DaemonSet's pod may be).
    let enforced = processes::in_scope(scope, dir);
    let agent = std::process::id();
    let target = |tgid: u32| {
        // 0: a process outside this agent's PID namespace, which it cannot pin. Ancestry is
        // read at each call, so the check made once `tgid` is pinned sees its process, not
        // an ancestor that held the PID before it exited.
        tgid != 0
            && tgid != agent
            && !processes::ancestors_of_this_process().contains(&tgid)
            && !processes::descends_from(tgid, agent)
            && (enforced || processes::of_the_scope(&scoped, mount, scope, tgid))
    };
    let targets =
        || -> Result<Vec<u32>> { Ok(cgroupfs::processes_in(dir)?.into_iter().filter(|t| target(*t)).collect()) };
    let mut expelled = Expelled::default();
    for _ in 0..EXPEL_PASSES {
        let found = targets()?;
        if found.is_empty() {
            return Ok(expelled);
        }
        // Described before they are killed, while /proc still shows them.
        expelled.described.push(processes::describe(&found));
        expelled.found += found.len();
        warn!(cgroup = %dir.display(), processes = ?found, "killing processes of the scope found in the agent's cgroup");
        let still_a_target =
            |tgid: u32| cgroupfs::processes_in(dir).is_ok_and(|procs| procs.contains(&tgid)) && target(tgid);
        let killed: Vec<OwnedFd> =
            found.iter().filter_map(|tgid| processes::kill_pinned(*tgid, || still_a_target(*tgid))).collect();
        expelled.killed += killed.len();
        processes::wait_exited(&killed, EXIT_WAIT);
    }
    expelled.remaining = targets()?.len();
    Ok(expelled)
}
