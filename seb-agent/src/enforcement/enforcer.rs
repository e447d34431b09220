//! The kernel enforcement the agent holds, and what it is built from.
//!
//! What is enforced is a function of its sources: the config (always), and, as they
//! arrive, the cluster's `SebPolicy`, the API server's discovered addresses, resolved
//! host names and the pods on this node that the policy selects. Every change of a
//! source recomputes the whole [`Desired`] state and applies the difference: policy first
//! (entries added before stale ones go), then links (new ones attached before unwanted
//! ones are unpinned), so no change opens a window.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use tracing::{info, warn};

use super::{
    BrokerSockets, LinkState, PinLayout,
    agent_cgroup::AgentEntry,
    integrity::{self, Finding, Integrity},
    kernel_btf,
    loader::{self, AttachTargets},
    local::{self, LocalProtection},
    maps,
    packet_devices::{self, DeviceMajors},
    policy,
    scope_walk::{self, Walked},
};
use crate::{
    cgroupfs,
    config::{Endpoint, SyscallTables},
};

/// How long after the walk its marks are settled a second time.
const SETTLE_AGAIN_AFTER: Duration = Duration::from_millis(400);

/// Where the protected endpoints came from; each source replaces only its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EndpointSource {
    Config,
    Policy,
    ApiServer,
    HostNames,
}

/// Everything enforcement is computed from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub endpoints: BTreeMap<EndpointSource, Vec<Endpoint>>,
    /// Enforced cgroup subtrees, relative to the cgroup2 mount: the config's, the policy's.
    pub scope: BTreeSet<String>,
    pub cluster_scope: BTreeSet<String>,
    /// Enforced pod cgroups, absolute (the pods the policy's selectors pick).
    pub pod_scopes: BTreeSet<PathBuf>,
    /// Exempt cgroups, relative to the cgroup2 mount: the config's, the policy's.
    pub exempt: BTreeSet<String>,
    pub cluster_exempt: BTreeSet<String>,
    /// Keep what an earlier run put in the kernel (links, protected prefixes) that the
    /// sources do not name (yet): in cluster mode, until every watcher has listed once.
    pub keep_previous: bool,
    /// Protected host names are not resolved yet (at start): the protected prefixes an
    /// earlier run put in the kernel (those names' addresses among them) are kept, and
    /// the agent is not ready, until every name has been answered once.
    pub hosts_pending: bool,
    pub syscall_tables: SyscallTables,
}

/// The state to put into the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub policy: policy::CompiledPolicy,
    pub targets: AttachTargets,
    /// Ids of `targets.scopes`, for the hooks that are not attached to a cgroup.
    pub scope_ids: Vec<u64>,
    pub exempt_ids: Vec<u64>,
    pub local: LocalProtection,
    /// The packet-device drivers' majors, read again at each check: a module loaded later
    /// registers its major then.
    pub device_majors: DeviceMajors,
    pub keep_previous: bool,
    /// Protected prefixes no source names are kept (see `Sources::hosts_pending`).
    pub keep_previous_endpoints: bool,
    /// Scope cgroups the config names that do not exist.
    pub missing_scopes: Vec<PathBuf>,
}

impl Sources {
    /// Resolve against the cgroup tree. A cgroup that does not exist on this node is
    /// left out with a warning (a pod that just went, a slice this node lacks); the config's
    /// own cgroups were checked at start.
    pub fn desired(&self, mount: &std::path::Path) -> Result<Desired> {
        let endpoints: Vec<Endpoint> = self.endpoints.values().flatten().copied().collect();
        let local = local::current(&endpoints).context("finding the protected endpoints local to this node")?;
        let (local_prefixes, groups) = if local.rules.is_some() {
            (local.prefixes.as_slice(), local.groups.as_slice())
        } else {
            (&[][..], &[][..])
        };
        let policy = policy::compile_widening(&endpoints, local_prefixes, groups);
        let mut scopes: Vec<PathBuf> = Vec::new();
        // The config's own scope cgroups were there at start; one gone (a systemd unit
        // restarted) is made again with a new id, unenforced until a check attaches to
        // it: reported by each check while it is missing (see `Enforcer::verify`).
        let mut missing_scopes: Vec<PathBuf> = Vec::new();
        for dir in self.scope.iter().map(|relative| cgroupfs::resolve(mount, relative)) {
            if dir.is_dir() { scopes.push(dir) } else { missing_scopes.push(dir) }
        }
        let cluster = self.cluster_scope.iter().map(|relative| cgroupfs::resolve(mount, relative));
        for dir in cluster.chain(self.pod_scopes.iter().cloned()) {
            if dir.is_dir() {
                scopes.push(dir);
            } else {
                warn!(cgroup = %dir.display(), "an enforced cgroup does not exist on this node");
            }
        }
        scopes.sort();
        scopes.dedup();
        let mut exempt_ids = Vec::new();
        let mut exempt = Vec::new();
        for relative in self.exempt.iter().chain(&self.cluster_exempt) {
            let dir = cgroupfs::resolve(mount, relative);
            match cgroupfs::cgroup_id(&dir) {
                Ok(id) => {
                    exempt_ids.push(id);
                    exempt.push(dir);
                }
                Err(e) => warn!(cgroup = %relative, error = %e, "an exempt cgroup does not exist on this node"),
            }
        }
        exempt_ids.sort_unstable();
        exempt.sort();
        exempt.dedup();
        let scope_ids = scopes.iter().map(|dir| cgroupfs::cgroup_id(dir)).collect::<Result<Vec<_>>>()?;
        Ok(Desired {
            policy,
            scope_ids,
            targets: AttachTargets { scopes, exempt, syscall_tables: self.syscall_tables },
            exempt_ids,
            local,
            device_majors: packet_devices::current()?,
            keep_previous: self.keep_previous,
            keep_previous_endpoints: self.keep_previous || self.hosts_pending,
            missing_scopes,
        })
    }
}

/// The loaded programs and maps, and the links attached for the current scope.
pub struct Enforcer {
    ebpf: aya::Ebpf,
    layout: PinLayout,
    mount: PathBuf,
    links: Vec<LinkState>,
    applied: Option<Desired>,
    kernel_layout: [u32; seb_common::layout::LEN as usize],
    agent: AgentEntry,
    /// Found outside a check (processes expelled from the agent's cgroup at start), for
    /// the next check to report.
    pending_findings: Vec<Finding>,
    /// The highest `SEB_UNFOLLOWED_SEEN` level seen: the kernel never lowers it.
    unfollowed_seen: u32,
    /// Processes marked by the last walk of the scope (and when), still running when it
    /// was settled; settled once more at a later check.
    unsettled: (Instant, Vec<Walked>),
    /// The maps pinned at load, with the ids their pins must keep naming.
    pinned_maps: Vec<(String, u32)>,
}

impl Enforcer {
    /// Load (reusing pinned maps) without touching what is enforced yet.
    pub fn load(layout: PinLayout, mount: PathBuf, max_scoped_processes: u32) -> Result<Self> {
        let kernel_layout = kernel_btf::kernel_layout()?;
        let mut ebpf = loader::load(&layout, max_scoped_processes)?;
        maps::write_kernel_layout(&mut ebpf, &kernel_layout)?;
        let agent = AgentEntry::this_process();
        maps::write_agent(&mut ebpf, agent.tgid, agent.cgroup_slot()).context("entering this process as the agent")?;
        let unfollowed_seen = maps::read_unfollowed_seen(&mut ebpf)?;
        let pinned_maps = integrity::pinned_map_ids(&ebpf, &layout.maps());
        Ok(Self {
            ebpf,
            layout,
            mount,
            links: Vec::new(),
            applied: None,
            kernel_layout,
            agent,
            pending_findings: Vec::new(),
            unfollowed_seen,
            unsettled: (Instant::now(), Vec::new()),
            pinned_maps,
        })
    }

    pub fn ebpf_mut(&mut self) -> &mut aya::Ebpf {
        &mut self.ebpf
    }
    pub fn links(&self) -> &[LinkState] {
        &self.links
    }

    /// Bring the kernel to what `sources` say. Policy is written before links are
    /// attached, so no program ever runs against a policy about to be filled.
    /// Returns whether anything changed.
    pub fn apply(&mut self, sources: &Sources) -> Result<bool> {
        let desired = sources.desired(&self.mount)?;
        if self.applied.as_ref() == Some(&desired) {
            return Ok(false);
        }
        maps::write_policy(&mut self.ebpf, &desired.policy, desired.keep_previous_endpoints)?;
        maps::write_local(&mut self.ebpf, &desired.local)?;
        maps::write_device_majors(&mut self.ebpf, &desired.device_majors)?;
        maps::write_exemptions(&mut self.ebpf, &desired.exempt_ids)?;
        let scope_ids =
            desired.targets.scopes.iter().map(|dir| cgroupfs::cgroup_id(dir)).collect::<Result<Vec<_>>>()?;
        maps::write_scope(&mut self.ebpf, &scope_ids, desired.keep_previous)?;
        maps::write_kernel_layout(&mut self.ebpf, &self.kernel_layout)?;
        maps::write_agent(&mut self.ebpf, self.agent.tgid, self.agent.cgroup_slot())?;
        self.links = loader::attach_all(&mut self.ebpf, &self.layout, &desired.targets, desired.keep_previous)?;
        self.pending_findings.extend(self.agent.learn_cgroup(&mut self.ebpf, &self.mount, &desired.targets));
        // After the fork, exec and migration hooks are attached, so no process slips
        // between this walk and them.
        let scoped = scope_walk::scoped_processes(&desired.targets.scopes, &desired.targets.exempt);
        maps::mark_scoped(&mut self.ebpf, &scoped)?;
        let walked = scoped.len();
        // Settled now, and the rest again at the next check.
        self.unsettled = (Instant::now(), maps::settle_scoped(&mut self.ebpf, scoped)?);
        info!(
            scoped_processes = walked,
            prefixes_v4 = desired.policy.v4.len(),
            prefixes_v6 = desired.policy.v6.len(),
            exempt = desired.exempt_ids.len(),
            cgroups = desired.targets.scopes.len(),
            local_rules = desired.local.rules.map_or(0, |rules| rules.count),
            "enforcement applied"
        );
        self.applied = Some(desired);
        Ok(true)
    }

    /// Every way the kernel differs from what was last applied.
    pub fn verify(&mut self) -> Vec<Finding> {
        // A process may take a while to end once past the exit tracepoint: not settled
        // again in the check that walked it, but in a later one.
        if self.unsettled.0.elapsed() >= SETTLE_AGAIN_AFTER {
            let unsettled = std::mem::take(&mut self.unsettled.1);
            if let Err(e) = maps::settle_scoped(&mut self.ebpf, unsettled) {
                warn!(error = %format!("{e:#}"), "settling the marks of processes that left the scope's walk");
            }
        }
        let mut findings = std::mem::take(&mut self.pending_findings);
        if let Some(desired) = &self.applied {
            findings.extend(integrity::check(&mut self.ebpf, &self.links, desired));
            findings.extend(integrity::check_kernel_layout(&mut self.ebpf, &self.kernel_layout));
            findings.extend(integrity::check_agent(&mut self.ebpf, &mut self.agent, &self.mount, &desired.targets));
            findings.extend(integrity::check_unfollowed_seen(&mut self.ebpf, &mut self.unfollowed_seen));
        }
        findings.extend(integrity::check_map_pins(&self.layout.maps(), &self.pinned_maps));
        if let Some(desired) = &self.applied {
            findings.extend(desired.missing_scopes.iter().map(|dir| Finding::missing_scope(dir)));
        }
        findings
    }

    /// Write and attach everything again, whatever was applied before.
    pub fn reapply(&mut self, sources: &Sources) -> Result<()> {
        if maps::read_unfollowed_seen(&mut self.ebpf)? < self.unfollowed_seen {
            maps::write_unfollowed_seen(&mut self.ebpf, self.unfollowed_seen)?;
        }
        self.applied = None;
        self.apply(sources).map(drop)
    }
}

/// The enforcer and its sources, shared by everything that changes a source.
#[derive(Clone)]
pub struct SharedEnforcer {
    inner: Arc<Mutex<(Enforcer, Sources)>>,
    integrity: Arc<Mutex<Integrity>>,
}

impl SharedEnforcer {
    pub fn new(enforcer: Enforcer, sources: Sources) -> Self {
        // Just applied, and every adopted link verified: intact until a check says not.
        let integrity = Integrity { intact: true, ..Default::default() };
        Self { inner: Arc::new(Mutex::new((enforcer, sources))), integrity: Arc::new(Mutex::new(integrity)) }
    }

    /// Check the kernel against what was applied, and repair what differs. Returns the
    /// findings; the kernel counts as intact again only after a later check finds none.
    /// Changes of the node itself (a new local address) are applied first, quietly.
    pub fn check_integrity(&self, sockets: &BrokerSockets) -> Result<Vec<Finding>> {
        let mut guard = self.inner.lock().map_err(|_| anyhow!("the enforcer lock is poisoned"))?;
        let (enforcer, sources) = &mut *guard;
        // Not applied is not enforced: a finding like any divergence, and the kernel is
        // still checked against what was applied before.
        let applied = enforcer.apply(sources);
        let mut findings = enforcer.verify();
        if let Err(e) = applied {
            findings.push(Finding::not_applied(&e));
        }
        let repaired = if findings.is_empty() { Ok(()) } else { enforcer.reapply(sources) };
        let nothing_applied = AttachTargets::default();
        let scope = enforcer.applied.as_ref().map_or(&nothing_applied, |desired| &desired.targets);
        let (registrations, registrations_held) =
            sockets.check_registrations(&enforcer.mount, scope, enforcer.agent.dir.as_deref());
        findings.extend(registrations);
        let mut repaired = repaired.and(registrations_held);
        if findings.iter().any(|finding| finding.kind == "program") {
            repaired = repaired.and(Err(anyhow!("the agent cannot unload another's program")));
        }
        if findings.iter().any(|finding| finding.kind == "scope") {
            repaired = repaired.and(Err(anyhow!("a scope cgroup the config names does not exist")));
        }
        let mut integrity = self.integrity.lock().map_err(|_| anyhow!("the integrity state is poisoned"))?;
        let now = crate::audit::format_time(crate::audit::now_ns());
        integrity.checked_at = now.clone();
        integrity.intact = findings.is_empty();
        if !findings.is_empty() {
            integrity.last_findings = findings.clone();
            integrity.last_findings_at = now;
            integrity.repaired = repaired.is_ok();
            integrity.tampered_checks += 1;
        }
        repaired.map(|()| findings)
    }

    pub fn integrity(&self) -> Integrity {
        self.integrity.lock().map(|guard| guard.clone()).unwrap_or_default()
    }

    /// Change the sources and apply the result at once. If it cannot be applied (an
    /// invalid policy, a full map), the sources stay as they were and so does the kernel.
    pub fn update(&self, change: impl FnOnce(&mut Sources)) -> Result<bool> {
        let mut guard = self.inner.lock().map_err(|_| anyhow!("the enforcer lock is poisoned"))?;
        let (enforcer, sources) = &mut *guard;
        let mut next = sources.clone();
        change(&mut next);
        let changed = enforcer.apply(&next)?;
        *sources = next;
        Ok(changed)
    }

    /// Replace one source's endpoints.
    pub fn set_endpoints(&self, source: EndpointSource, endpoints: Vec<Endpoint>) -> Result<bool> {
        self.update(|sources| {
            sources.endpoints.insert(source, endpoints);
        })
    }

    pub fn links(&self) -> Vec<LinkState> {
        self.inner.lock().map(|guard| guard.0.links().to_vec()).unwrap_or_default()
    }

    /// Protected host names not yet resolved (see `Sources::hosts_pending`).
    pub fn hosts_pending(&self) -> bool {
        self.inner.lock().map_or(true, |guard| guard.1.hosts_pending)
    }

    /// Whether process `tgid` may be of the enforced scope: followed by the kernel, in an
    /// enforced cgroup, or not known to be neither (a poisoned lock, a missing map, a
    /// cgroup that cannot be read: a process that exited). What depends on the answer
    /// refuses the scope's processes, so it fails towards "of the scope"; check that the
    /// pinned process is still alive after asking, so the answer was about it.
    pub fn is_of_the_scope(&self, tgid: u32) -> bool {
        let Ok(guard) = self.inner.lock() else { return true };
        let enforcer = &guard.0;
        let nothing_applied = AttachTargets::default();
        let scope = enforcer.applied.as_ref().map_or(&nothing_applied, |desired| &desired.targets);
        let Some(Ok(scoped)) =
            enforcer.ebpf.map(seb_common::map_names::SCOPED_TASKS).map(aya::maps::HashMap::<_, u32, u64>::try_from)
        else {
            return true;
        };
        super::processes::scope_membership(&scoped, &enforcer.mount, scope, tgid).unwrap_or(true)
    }
}
