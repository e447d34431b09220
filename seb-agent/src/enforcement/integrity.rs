//! Checking that the kernel still enforces what the agent put there.
//!
//! Root can detach a link (`BPF_LINK_DETACH`), unpin it, or rewrite a map entry; a
//! detached cgroup link keeps its pin and its program but enforces nothing. So the agent
//! asks the kernel, at least once a second, for each link: is it pinned, attached to
//! the cgroup it was made for, running this agent's program on its maps; and for each map
//! that holds policy (local-address rules included): does it hold exactly what was
//! written; and for each pinned map: does its pin still name the agent's map. Any
//! divergence is a
//! finding: the caller records it, reports not ready, and repairs by writing and
//! attaching everything again.

use std::{collections::BTreeSet, path::Path};

use aya::{
    Ebpf, Pod,
    maps::{HashMap, LpmTrie, MapData},
};
use seb_common::{ANY_OTHER_NAMESPACE, EndpointRules, map_names};
use serde::{Deserialize, Serialize};

use super::{
    LinkState,
    agent_cgroup::AgentEntry,
    enforcer::Desired,
    loader::{self, AttachTargets},
    local::LocalProtection,
    packet_devices::DeviceMajors,
    policy::{TrieEntry, TrieKey, rules_key, weakens},
};

/// One way the kernel differs from what the agent installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// `link`, `map`, `program`, `registration`, `process`, `scope` or `apply`: a bounded label for
    /// metrics.
    pub kind: String,
    /// The link's pin, or the map's name.
    pub object: String,
    pub problem: String,
}

impl Finding {
    fn link(state: &LinkState, problem: impl std::fmt::Display) -> Self {
        Self { kind: "link".into(), object: state.pin.display().to_string(), problem: problem.to_string() }
    }
    fn map(name: &str, problem: impl Into<String>) -> Self {
        Self { kind: "map".into(), object: name.into(), problem: problem.into() }
    }
    /// What the agent means to enforce could not be written to the kernel.
    pub(super) fn not_applied(error: &anyhow::Error) -> Self {
        Self { kind: "apply".into(), object: "enforcement".into(), problem: format!("{error:#}") }
    }
    /// Processes the agent killed for where they were (`object`: that cgroup).
    pub(super) fn process(object: &str, problem: impl Into<String>) -> Self {
        Self { kind: "process".into(), object: object.into(), problem: problem.into() }
    }
    /// A scope cgroup the config names is missing: made again, it is a new cgroup the
    /// links are not attached to until a check finds it.
    pub(super) fn missing_scope(dir: &Path) -> Self {
        Self {
            kind: "scope".into(),
            object: dir.display().to_string(),
            problem: "the configured scope cgroup does not exist; processes put in it when it is made again are \
                      unenforced until the next check attaches to it"
                .into(),
        }
    }
    /// A broker process or socket registration the agent did not make.
    pub(super) fn registration(name: &str, problem: impl Into<String>) -> Self {
        Self { kind: "registration".into(), object: name.into(), problem: problem.into() }
    }
}

/// The maps pinned in `dir` at load, by name, with the id of the map each pin named then
/// (the map the agent holds: it reused that pin, or made the map and pinned it).
pub fn pinned_map_ids(ebpf: &Ebpf, dir: &Path) -> Vec<(String, u32)> {
    ebpf.maps().filter_map(|(name, _)| Some((name.to_string(), pinned_map_id(&dir.join(name))?))).collect()
}

fn pinned_map_id(pin: &Path) -> Option<u32> {
    MapData::from_pin(pin).ok()?.info().ok().map(|info| info.id())
}

/// Each map pin still names the map the agent holds. A pin removed or replaced (an
/// `unlink` on bpffs needs no `bpf()` call) would have the next start make fresh maps:
/// the processes followed out of the scope, the denials queued while no agent ran and
/// the loss counters forgotten. Such a pin is a finding, and is pinned again at once.
pub fn check_map_pins(dir: &Path, pinned: &[(String, u32)]) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (name, id) in pinned {
        let pin = dir.join(name);
        let problem = match pinned_map_id(&pin) {
            Some(found) if found == *id => continue,
            Some(found) => format!("its pin names map {found}, not the agent's map {id}"),
            None => "its pin was removed (or is no map)".to_string(),
        };
        let pinned_again = (|| -> anyhow::Result<()> {
            if pin.symlink_metadata().is_ok() {
                std::fs::remove_file(&pin)?;
            }
            MapData::from_id(*id)?.pin(&pin)?;
            Ok(())
        })();
        let outcome = match pinned_again {
            Ok(()) => "; pinned again".to_string(),
            Err(e) => format!("; pinning it again failed: {e:#}"),
        };
        findings.push(Finding::map(name, format!("{problem}{outcome}")));
    }
    findings
}

/// Every divergence between the kernel and `desired`, as installed through `links`.
pub fn check(ebpf: &mut Ebpf, links: &[LinkState], desired: &Desired) -> Vec<Finding> {
    let loaded = loader::LoadedPrograms::read();
    let mut findings: Vec<Finding> = loader::verify_links(links, &loaded)
        .into_iter()
        .map(|(link, why)| Finding::link(link, format!("{why:#}")))
        .collect();
    // Every program this agent loaded is its own, linked or not (the exempt programs are
    // loaded whether or not a cgroup is exempt): by id, so a copy loaded by another is not.
    let own_loaded: BTreeSet<u32> =
        ebpf.programs().filter_map(|(_, program)| Some(program.info().ok()?.id())).collect();
    findings.extend(foreign_programs(links, &own_loaded, &loaded));
    let exact = !desired.keep_previous;
    let exact_endpoints = !desired.keep_previous_endpoints;
    findings.extend(check_trie(ebpf, map_names::PROTECTED_V4, &desired.policy.v4, exact_endpoints));
    findings.extend(check_trie(ebpf, map_names::PROTECTED_V6, &desired.policy.v6, exact_endpoints));
    findings.extend(check_set(ebpf, map_names::EXEMPT_CGROUPS, &desired.exempt_ids, true));
    findings.extend(check_set(ebpf, map_names::SCOPE_CGROUPS, &desired.scope_ids, exact));
    findings.extend(check_device_majors(ebpf, &desired.device_majors));
    findings.extend(check_local(ebpf, &desired.local));
    findings
}

/// Programs bound to this agent's maps that are not its own (another tag): root can load
/// one to write the maps from inside the kernel (a forged broker registration, a forged
/// or swallowed denial) without a system call on them. The agent cannot unload another's
/// program: each is a finding while it lasts.
fn foreign_programs(links: &[LinkState], own_loaded: &BTreeSet<u32>, loaded: &loader::LoadedPrograms) -> Vec<Finding> {
    let own_tags: BTreeSet<u64> = links.iter().map(|link| link.identity.tag).collect();
    let own_maps: BTreeSet<u32> = links.iter().flat_map(|link| link.identity.maps.iter().copied()).collect();
    let mut foreign: Vec<Finding> = loaded
        .0
        .iter()
        .filter(|(id, program)| !own_tags.contains(&program.identity.tag) && !own_loaded.contains(*id))
        .filter_map(|(id, program)| {
            let shared: Vec<u32> = program.identity.maps.intersection(&own_maps).copied().collect();
            (!shared.is_empty()).then(|| Finding {
                kind: "program".into(),
                object: format!("program {id} ({})", program.name),
                problem: format!(
                    "uses this agent's maps {shared:?} and is not one of its programs (tag {:016x})",
                    program.identity.tag
                ),
            })
        })
        .collect();
    foreign.sort_by(|a, b| a.object.cmp(&b.object));
    foreign
}

/// Without its entries a wildcard or device-bound listener serving a protected endpoint
/// on a local address would answer connects to any local address.
fn check_local(ebpf: &mut Ebpf, wanted: &LocalProtection) -> Option<Finding> {
    let name = map_names::LOCAL_PROTECTED;
    let map = ebpf.map_mut(name)?;
    let entries: Result<Vec<(u64, EndpointRules)>, _> =
        HashMap::<&mut MapData, u64, EndpointRules>::try_from(map).and_then(|m| m.iter().collect());
    let entries = match entries {
        Ok(entries) => entries,
        Err(e) => return Some(Finding::map(name, format!("cannot be read: {e}"))),
    };
    let actual: BTreeSet<(u64, _)> = entries.iter().map(|(key, rules)| (*key, rules_key(rules))).collect();
    let expected: BTreeSet<(u64, _)> = match &wanted.rules {
        Some(rules) => {
            [wanted.netns_cookie, ANY_OTHER_NAMESPACE].into_iter().map(|key| (key, rules_key(rules))).collect()
        }
        None => BTreeSet::new(),
    };
    (actual != expected).then(|| {
        Finding::map(
            name,
            format!("holds {} entries, {} of them as written", actual.len(), actual.intersection(&expected).count()),
        )
    })
}

/// A zeroed or rewritten major would let opens of and writes to packet devices through.
fn check_device_majors(ebpf: &mut Ebpf, wanted: &DeviceMajors) -> Option<Finding> {
    let name = map_names::DEVICE_MAJORS;
    match super::maps::read_device_majors(ebpf) {
        Ok(actual) if actual == *wanted => None,
        Ok(actual) => Some(Finding::map(name, format!("holds majors {actual:?}, /proc/devices says {wanted:?}"))),
        Err(e) => Some(Finding::map(name, format!("cannot be read: {e:#}"))),
    }
}

fn check_trie<const N: usize>(ebpf: &mut Ebpf, name: &str, wanted: &[TrieEntry<N>], exact: bool) -> Option<Finding>
where
    [u8; N]: Pod,
{
    let map = ebpf.map_mut(name)?;
    let trie: LpmTrie<&mut MapData, [u8; N], EndpointRules> = match LpmTrie::try_from(map) {
        Ok(trie) => trie,
        Err(e) => return Some(Finding::map(name, format!("cannot be read: {e}"))),
    };
    let mut actual = BTreeSet::new();
    for entry in trie.iter() {
        match entry {
            Ok((key, rules)) => {
                actual.insert((key.prefix_len(), key.data().to_vec(), rules_key(&rules)));
            }
            Err(e) => return Some(Finding::map(name, format!("cannot be read: {e}"))),
        }
    }
    let wanted: BTreeSet<_> = wanted.iter().map(|e| (e.prefix_len, e.addr.to_vec(), rules_key(&e.rules))).collect();
    let missing = wanted.difference(&actual).count();
    let extra: Vec<&TrieKey> = actual.difference(&wanted).collect();
    // Kept from an earlier policy (cluster mode, before every watcher has listed), an
    // entry may protect more than is wanted, never less than the prefixes covering it.
    let extra = if exact { extra.len() } else { extra.into_iter().filter(|entry| weakens(entry, &wanted)).count() };
    (missing + extra > 0).then(|| {
        let not_ours = if exact {
            "not written by the agent"
        } else {
            "not written by the agent and weaker than the prefixes covering them"
        };
        Finding::map(name, format!("{missing} protected prefixes missing or changed, {extra} {not_ours}"))
    })
}

fn check_set(ebpf: &mut Ebpf, name: &str, wanted: &[u64], exact: bool) -> Option<Finding> {
    let map = ebpf.map_mut(name)?;
    let set: HashMap<&mut MapData, u64, u8> = match HashMap::try_from(map) {
        Ok(set) => set,
        Err(e) => return Some(Finding::map(name, format!("cannot be read: {e}"))),
    };
    let actual: BTreeSet<u64> = match set.keys().collect::<Result<_, _>>() {
        Ok(actual) => actual,
        Err(e) => return Some(Finding::map(name, format!("cannot be read: {e}"))),
    };
    let wanted: BTreeSet<u64> = wanted.iter().copied().collect();
    let missing = wanted.difference(&actual).count();
    let extra = if exact { actual.difference(&wanted).count() } else { 0 };
    (missing + extra > 0)
        .then(|| Finding::map(name, format!("{missing} cgroups missing, {extra} not written by the agent")))
}

/// The field offsets the tracing programs read must be the running kernel's: a rewritten
/// offset would make them follow the wrong process or cgroup.
pub fn check_kernel_layout(ebpf: &mut Ebpf, wanted: &[u32]) -> Option<Finding> {
    let name = map_names::KERNEL_LAYOUT;
    match super::maps::read_kernel_layout(ebpf) {
        Ok(actual) if actual == wanted => None,
        Ok(_) => Some(Finding::map(name, "the kernel field offsets differ from the kernel's BTF")),
        Err(e) => Some(Finding::map(name, format!("cannot be read: {e:#}"))),
    }
}

/// `SEB_AGENT` names this process and, once the kernel named it, its cgroup (kept, then
/// armed): changed, the kernel would spare another process's or cgroup's `bpf()` calls.
pub fn check_agent(ebpf: &mut Ebpf, agent: &mut AgentEntry, mount: &Path, scope: &AttachTargets) -> Vec<Finding> {
    let name = map_names::AGENT;
    // Named by the kernel at the agent's first `bpf()` call after its links: armed at
    // apply, or here should that have failed or come first.
    let mut findings: Vec<Finding> = agent.learn_cgroup(ebpf, mount, scope).into_iter().collect();
    let (tgid, cgroup) = match super::maps::read_agent(ebpf) {
        Ok(entry) => entry,
        Err(e) => return vec![Finding::map(name, format!("cannot be read: {e:#}"))],
    };
    if tgid != u64::from(agent.tgid) {
        findings.push(Finding::map(name, format!("names tgid {tgid}, not this agent (tgid {})", agent.tgid)));
    }
    if agent.named.is_some() && cgroup != agent.cgroup_slot() {
        findings.push(Finding::map(
            name,
            format!("names cgroup slot {cgroup:#x}, not this agent's ({:#x})", agent.cgroup_slot()),
        ));
    }
    findings
}

/// `SEB_UNFOLLOWED_SEEN` only ever rises in the kernel: lowered, it would let processes
/// of the scope the kernel could not track pass the write pre-check unjudged. `highest`
/// is the highest level seen so far, raised to the current one.
pub fn check_unfollowed_seen(ebpf: &mut Ebpf, highest: &mut u32) -> Option<Finding> {
    let name = map_names::UNFOLLOWED_SEEN;
    match super::maps::read_unfollowed_seen(ebpf) {
        Ok(level) if level >= *highest => {
            *highest = level;
            None
        }
        Ok(level) => Some(Finding::map(name, format!("lowered from {highest} to {level}; the kernel only raises it"))),
        Err(e) => Some(Finding::map(name, format!("cannot be read: {e:#}"))),
    }
}

/// What the last check found, for `status` and `/readyz`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Integrity {
    /// When the kernel was last checked (RFC 3339); empty before the first check.
    pub checked_at: String,
    /// The last check found the kernel as installed.
    pub intact: bool,
    /// What the most recent check with findings found, and whether it was repaired.
    pub last_findings: Vec<Finding>,
    pub last_findings_at: String,
    pub repaired: bool,
    /// Checks that found a divergence since the agent started.
    pub tampered_checks: u64,
}
