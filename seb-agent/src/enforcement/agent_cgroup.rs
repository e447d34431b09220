//! The running agent's own cgroup, as the kernel named it.
//!
//! The kernel spares processes there: their `bpf()` calls (`seb_bpf_call`) and their
//! broker registrations (the integrity check keeps the agent's peers). While an agent
//! runs, a process of the scope entering it is killed at the move. One put there while
//! no agent ran (between a crash and the restart) would be spared from the moment this
//! agent is named, free to edit seb's maps. So at start every process there that is of
//! the scope, but the agent and those that started it (a supervisor), is killed and
//! recorded. When the agent's cgroup is itself enforced (the DaemonSet's pod may be),
//! that is every other process there: at start any other one outlived the agent it was
//! beside (a restart within the same cgroup) or was put there.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use seb_common::map_names;

use super::{integrity::Finding, loader::AttachTargets, processes};
use crate::cgroupfs::{self, CgroupNames};

/// This process as `SEB_AGENT` must name it, and its cgroup once the kernel named it.
pub struct AgentEntry {
    pub tgid: u32,
    /// The cgroup's id, from the kernel's first naming on; kept and compared.
    pub cgroup: Option<u64>,
    /// Its directory under the mount, when found.
    pub dir: Option<PathBuf>,
}

impl AgentEntry {
    pub fn this_process() -> Self {
        Self { tgid: std::process::id(), cgroup: None, dir: None }
    }

    /// With `seb_bpf_call` attached, the kernel names this process's cgroup in `SEB_AGENT`
    /// at its next `bpf()` call (this read's). The first naming is kept from then on, and
    /// the processes of the scope found there then are expelled: what they did is in the
    /// finding returned.
    pub fn learn_cgroup(&mut self, ebpf: &mut Ebpf, mount: &Path, scope: &AttachTargets) -> Result<Option<Finding>> {
        if self.cgroup.is_some() {
            return Ok(None);
        }
        let (_, cgroup) = super::maps::read_agent(ebpf)?;
        if cgroup == 0 {
            return Ok(None);
        }
        self.cgroup = Some(cgroup);
        let dir = match directory(mount, cgroup) {
            Ok(dir) => dir,
            Err(e) => {
                let problem = format!("{e:#}: the processes there were not checked");
                return Ok(Some(Finding::process(&format!("cgroup {cgroup}"), problem)));
            }
        };
        let finding = expel_entrants(ebpf, mount, &dir, scope)?;
        self.dir = Some(dir);
        Ok(finding)
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

/// Kill every process in `dir` (the agent's cgroup) that is of the scope, but this one
/// and those that started it (a supervisor), each pinned by a pidfd while it is still
/// there. A finding names them, if any.
fn expel_entrants(ebpf: &mut Ebpf, mount: &Path, dir: &Path, scope: &AttachTargets) -> Result<Option<Finding>> {
    let mut spared = processes::ancestors_of_this_process();
    spared.push(std::process::id());
    let scoped: HashMap<&MapData, u32, u64> = HashMap::try_from(
        ebpf.map(map_names::SCOPED_TASKS).with_context(|| format!("map {} missing", map_names::SCOPED_TASKS))?,
    )?;
    // The whole cgroup is of the scope when it is enforced (the DaemonSet's pod may be).
    let enforced = processes::in_scope(scope, dir);
    let of_the_scope = |tgid: u32| enforced || processes::of_the_scope(&scoped, mount, scope, tgid);
    let entrants: Vec<u32> =
        cgroupfs::processes_in(dir)?.into_iter().filter(|tgid| !spared.contains(tgid) && of_the_scope(*tgid)).collect();
    if entrants.is_empty() {
        return Ok(None);
    }
    // Described before they are killed, while /proc still shows them.
    let described = processes::describe(&entrants);
    let still_there =
        |tgid: u32| cgroupfs::processes_in(dir).is_ok_and(|procs| procs.contains(&tgid)) && of_the_scope(tgid);
    let killed = entrants.iter().filter(|tgid| processes::kill_pinned(**tgid, || still_there(**tgid))).count();
    Ok(Some(Finding::process(
        &dir.display().to_string(),
        format!(
            "{} processes of the scope were in the agent's cgroup when it started (put there while no agent ran, \
             where their bpf() calls and broker registrations would be spared): {described}; {killed} killed",
            entrants.len()
        ),
    )))
}
