//! Writing policy into the kernel maps and reading the kernel's counters.
//!
//! Updates write entries first, longest prefix first, and remove stale ones last,
//! shortest first, so a change never opens a window in which an endpoint both the old
//! and the new policy protect is unprotected (`trie_updates`).

use std::{
    collections::{BTreeSet, HashSet},
    os::fd::{AsFd, AsRawFd},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
};
use seb_common::{EndpointRules, agent_slots, counters, layout, map_names, unfollowed};

use super::{
    local::LocalProtection,
    packet_devices::DeviceMajors,
    policy::{CompiledPolicy, TrieEntry, TrieKey, rules_key, weakens},
    scope_walk::{Fate, Walked},
};

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Map> {
    ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} is missing from the object"))
}

/// Write the compiled policy; with `keep_stale`, entries it does not name stay.
pub fn write_policy(ebpf: &mut Ebpf, policy: &CompiledPolicy, keep_stale: bool) -> Result<()> {
    write_trie(map_mut(ebpf, map_names::PROTECTED_V4)?, &policy.v4, keep_stale)
        .context("updating the IPv4 protected endpoints")?;
    write_trie(map_mut(ebpf, map_names::PROTECTED_V6)?, &policy.v6, keep_stale)
        .context("updating the IPv6 protected endpoints")?;
    Ok(())
}

fn write_trie<const N: usize>(map: &mut Map, entries: &[TrieEntry<N>], keep_stale: bool) -> Result<()>
where
    [u8; N]: Pod,
{
    let mut trie: LpmTrie<&mut MapData, [u8; N], EndpointRules> = LpmTrie::try_from(map)?;
    let existing: Vec<TrieEntry<N>> = trie
        .iter()
        .map(|entry| entry.map(|(key, rules)| TrieEntry { prefix_len: key.prefix_len(), addr: key.data(), rules }))
        .collect::<Result<_, _>>()?;
    for update in trie_updates(&existing, entries, keep_stale) {
        match update {
            TrieUpdate::Write(entry) => trie.insert(&Key::new(entry.prefix_len, entry.addr), entry.rules, 0)?,
            TrieUpdate::Remove(entry) => trie.remove(&Key::new(entry.prefix_len, entry.addr))?,
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TrieUpdate<const N: usize> {
    Write(TrieEntry<N>),
    Remove(TrieEntry<N>),
}

/// The writes and removals that take a trie holding `existing` to `entries` (keeping,
/// with `keep_stale`, the stale entries that weaken nothing), ordered so that at no
/// moment between them is an address allowed that both policies deny. Entries are
/// written longest prefix first: an address whose longest match is an entry already
/// written gets the new policy's answer (every longer entry of it is written), one
/// matching an entry not yet written the old policy's. Stale entries are removed
/// shortest first, by the same reasoning. In the other order, a covering prefix
/// rewritten before the longer one that inherits its rules left the longer one's
/// addresses judged by the narrower rules for a moment.
fn trie_updates<const N: usize>(
    existing: &[TrieEntry<N>],
    entries: &[TrieEntry<N>],
    keep_stale: bool,
) -> Vec<TrieUpdate<N>> {
    let mut writes: Vec<TrieEntry<N>> = entries.to_vec();
    writes.sort_by_key(|entry| std::cmp::Reverse(entry.prefix_len));
    let wanted: HashSet<(u32, [u8; N])> = entries.iter().map(|e| (e.prefix_len, e.addr)).collect();
    let wanted_keys: BTreeSet<TrieKey> =
        entries.iter().map(|e| (e.prefix_len, e.addr.to_vec(), rules_key(&e.rules))).collect();
    let mut removals: Vec<TrieEntry<N>> = existing
        .iter()
        .filter(|entry| !wanted.contains(&(entry.prefix_len, entry.addr)))
        // A stale entry kept may protect more than wanted, never less.
        .filter(|entry| {
            !keep_stale || weakens(&(entry.prefix_len, entry.addr.to_vec(), rules_key(&entry.rules)), &wanted_keys)
        })
        .cloned()
        .collect();
    removals.sort_by_key(|entry| entry.prefix_len);
    writes.into_iter().map(TrieUpdate::Write).chain(removals.into_iter().map(TrieUpdate::Remove)).collect()
}

/// Write which protected rules are local to the agent's network namespace, and the same
/// under `ANY_OTHER_NAMESPACE` for callers elsewhere (a pod reaching a node address);
/// entries of other namespaces, or stale ones, are removed last. The local addresses
/// themselves are marked in the protected-endpoint tries (see `policy::compile`).
pub fn write_local(ebpf: &mut Ebpf, local: &LocalProtection) -> Result<()> {
    let mut rules: HashMap<&mut MapData, u64, EndpointRules> =
        HashMap::try_from(map_mut(ebpf, map_names::LOCAL_PROTECTED)?)?;
    let stale: Vec<u64> = rules.keys().collect::<Result<_, _>>()?;
    let keys = [local.netns_cookie, seb_common::ANY_OTHER_NAMESPACE];
    if let Some(local_rules) = &local.rules {
        for key in keys {
            rules.insert(key, local_rules, 0).context("writing the local protected rules")?;
        }
    }
    for cookie in stale {
        if local.rules.is_none() || !keys.contains(&cookie) {
            rules.remove(&cookie)?;
        }
    }
    Ok(())
}

pub fn write_exemptions(ebpf: &mut Ebpf, cgroup_ids: &[u64]) -> Result<()> {
    write_cgroup_set(ebpf, map_names::EXEMPT_CGROUPS, cgroup_ids, false)
}

/// The enforced cgroups, for the LSM hooks (which run for every task on the node); with
/// `keep_stale`, cgroups no longer named stay enforced.
pub fn write_scope(ebpf: &mut Ebpf, cgroup_ids: &[u64], keep_stale: bool) -> Result<()> {
    write_cgroup_set(ebpf, map_names::SCOPE_CGROUPS, cgroup_ids, keep_stale)
}

fn write_cgroup_set(ebpf: &mut Ebpf, name: &str, cgroup_ids: &[u64], keep_stale: bool) -> Result<()> {
    let mut map: HashMap<&mut MapData, u64, u8> = HashMap::try_from(map_mut(ebpf, name)?)?;
    let existing: Vec<u64> = map.keys().collect::<Result<_, _>>()?;
    for id in cgroup_ids {
        map.insert(id, 1, 0)?;
    }
    if keep_stale {
        return Ok(());
    }
    for id in existing.iter().filter(|id| !cgroup_ids.contains(id)) {
        map.remove(id)?;
    }
    Ok(())
}

/// The packet-device drivers' majors (0: none), for the programs that judge opens and writes.
pub fn write_device_majors(ebpf: &mut Ebpf, majors: &DeviceMajors) -> Result<()> {
    let mut array: Array<&mut MapData, u32> = Array::try_from(map_mut(ebpf, map_names::DEVICE_MAJORS)?)?;
    for (slot, major) in majors.iter().enumerate() {
        array.set(slot as u32, major, 0).with_context(|| format!("writing {}", map_names::DEVICE_MAJORS))?;
    }
    Ok(())
}

/// The packet-device drivers' majors as the map holds them.
pub fn read_device_majors(ebpf: &mut Ebpf) -> Result<DeviceMajors> {
    let array: Array<&mut MapData, u32> = Array::try_from(map_mut(ebpf, map_names::DEVICE_MAJORS)?)?;
    let mut majors = DeviceMajors::default();
    for (slot, major) in majors.iter_mut().enumerate() {
        *major = array.get(&(slot as u32), 0)?;
    }
    Ok(majors)
}

/// Field offsets for the tracing programs; written before any of them is attached.
///
/// Then the map is frozen (`BPF_MAP_FREEZE`): no system call can change it any more, root's
/// included, while the programs go on reading it. A wrong offset there would make them
/// misread tasks and requests (a 32-bit call taken for a 64-bit one, say). A map already
/// holding these values (pins adopted by a restart) is only frozen.
pub fn write_kernel_layout(ebpf: &mut Ebpf, values: &[u32; layout::LEN as usize]) -> Result<()> {
    let unchanged = read_kernel_layout(ebpf)? == values;
    let mut array: Array<&mut MapData, u32> = Array::try_from(map_mut(ebpf, map_names::KERNEL_LAYOUT)?)?;
    if !unchanged {
        for (index, value) in values.iter().enumerate() {
            array.set(index as u32, value, 0).with_context(|| {
                format!(
                    "writing the kernel layout into {} (frozen with other values? run `seb-agent unload`)",
                    map_names::KERNEL_LAYOUT
                )
            })?;
        }
    }
    match freeze(aya::maps::IterableMap::map(&array)) {
        Ok(()) => Ok(()),
        // Frozen before (a restart, or the agent's own earlier call): the kernel refuses to
        // freeze it again, and refuses this write of the value it already holds.
        Err(_) if array.set(0, values[0], 0).is_err() => Ok(()),
        Err(e) => Err(e).context("freezing the kernel layout"),
    }
}

/// `BPF_MAP_FREEZE`.
fn freeze(map: &MapData) -> std::io::Result<()> {
    const BPF_MAP_FREEZE: libc::c_long = 22;
    #[repr(C)]
    struct MapFd {
        map_fd: u32,
    }
    let attr = MapFd { map_fd: map.fd().as_fd().as_raw_fd() as u32 };
    // SAFETY: BPF_MAP_FREEZE reads `map_fd` only, from an attribute of the size given.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_FREEZE, &attr as *const MapFd, size_of::<MapFd>()) };
    if ret == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// The kernel layout as the map holds it.
pub fn read_kernel_layout(ebpf: &mut Ebpf) -> Result<Vec<u32>> {
    let array: Array<&mut MapData, u32> = Array::try_from(map_mut(ebpf, map_names::KERNEL_LAYOUT)?)?;
    (0..layout::LEN).map(|index| Ok(array.get(&index, 0)?)).collect()
}

/// Mark processes already in the scope as scoped (those created, exec'd or moved there
/// later are marked by the kernel itself): tgid -> the cgroup they are in.
///
/// One that cannot be marked (the map is full) raises `SEB_UNFOLLOWED_SEEN` first,
/// so the checks that look only in the map fall back to the cgroup walk.
pub fn mark_scoped(ebpf: &mut Ebpf, processes: &[Walked]) -> Result<()> {
    let mut map: HashMap<&mut MapData, u32, u64> = HashMap::try_from(map_mut(ebpf, map_names::SCOPED_TASKS)?)?;
    let unmarked = processes.iter().find(|walked| map.insert(walked.tgid, walked.cgroup_id, 0).is_err());
    if let Some(Walked { tgid, .. }) = unmarked {
        write_unfollowed_seen(ebpf, unfollowed::SOME_UNMARKED).context("noting an unmarked process of the scope")?;
        bail!("marking process {tgid} as scoped: {} refused it (full?)", map_names::SCOPED_TASKS);
    }
    Ok(())
}

/// Remove the marks of walked processes that have gone since (see `scope_walk`);
/// the rest are returned, still to be settled. A mark the kernel has since changed (the
/// PID's new holder, forked in the scope) is left alone.
pub fn settle_scoped(ebpf: &mut Ebpf, walked: Vec<Walked>) -> Result<Vec<Walked>> {
    let mut map: HashMap<&mut MapData, u32, u64> = HashMap::try_from(map_mut(ebpf, map_names::SCOPED_TASKS)?)?;
    let mut running = Vec::new();
    for process in walked {
        match process.fate() {
            Fate::Running => running.push(process),
            Fate::Replaced => {}
            Fate::Gone => match map.get(&process.tgid, 0) {
                Ok(cgroup_id) if cgroup_id == process.cgroup_id => map.remove(&process.tgid)?,
                Ok(_) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            },
        }
    }
    Ok(running)
}

/// Name `tgid` as the running agent, whose `bpf()` calls (and those of processes in its
/// cgroup) the kernel lets through. Without `cgroup`, the kernel fills it in at the
/// agent's next call: inside a container's cgroup namespace the agent cannot name it.
pub fn write_agent(ebpf: &mut Ebpf, tgid: u32, cgroup_slot: u64) -> Result<()> {
    let mut array: Array<&mut MapData, u64> = Array::try_from(map_mut(ebpf, map_names::AGENT)?)?;
    array.set(agent_slots::CGROUP, cgroup_slot, 0)?;
    Ok(array.set(agent_slots::TGID, u64::from(tgid), 0)?)
}

/// `SEB_AGENT`: the tgid it names (0: none) and that agent's cgroup slot (the cgroup id,
/// with `agent_slots::UNARMED` set until the agent arms it; the bare bit before the
/// kernel named it).
pub fn read_agent(ebpf: &mut Ebpf) -> Result<(u64, u64)> {
    let array: Array<&mut MapData, u64> = Array::try_from(map_mut(ebpf, map_names::AGENT)?)?;
    Ok((array.get(&agent_slots::TGID, 0)?, array.get(&agent_slots::CGROUP, 0)?))
}

/// `SEB_UNFOLLOWED_SEEN`: how far the kernel lost track of processes of the scope.
pub fn read_unfollowed_seen(ebpf: &mut Ebpf) -> Result<u32> {
    let seen: Array<&mut MapData, u32> = Array::try_from(map_mut(ebpf, map_names::UNFOLLOWED_SEEN)?)?;
    Ok(seen.get(&0, 0)?)
}

pub fn write_unfollowed_seen(ebpf: &mut Ebpf, level: u32) -> Result<()> {
    let mut seen: Array<&mut MapData, u32> = Array::try_from(map_mut(ebpf, map_names::UNFOLLOWED_SEEN)?)?;
    Ok(seen.set(0, level, 0)?)
}

/// The kernel's per-CPU counters, summed.
pub struct Counters {
    array: PerCpuArray<MapData, u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CounterValues {
    pub denials: u64,
    pub ring_drops: u64,
    /// Refusals the kernel did not queue: their cgroup was past its rate.
    pub over_rate: u64,
}

impl Counters {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let map =
            ebpf.take_map(map_names::COUNTERS).ok_or_else(|| anyhow!("map {} is missing", map_names::COUNTERS))?;
        Ok(Self { array: PerCpuArray::try_from(map)? })
    }

    /// Which counter this is: the boot and the map's kernel id. A reboot or a reinstall
    /// makes a new one, counting from zero.
    pub fn instance(&self) -> Result<String> {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").context("reading the boot id")?;
        let map = aya::maps::IterableMap::map(&self.array).info()?.id();
        Ok(format!("{}/{map}", boot.trim()))
    }

    pub fn read(&self) -> Result<CounterValues> {
        let sum = |index| -> Result<u64> { Ok(self.array.get(&index, 0)?.iter().sum()) };
        Ok(CounterValues {
            denials: sum(counters::DENIALS)?,
            ring_drops: sum(counters::RING_DROPS)?,
            over_rate: sum(counters::OVER_RATE)?,
        })
    }
}

/// Entries in each pinned map that holds policy or registrations.
pub fn entry_counts(layout: &super::PinLayout) -> Result<std::collections::BTreeMap<String, u64>> {
    use aya::maps::Map;
    let open = |name: &str| -> Result<MapData> { Ok(MapData::from_pin(layout.map(name))?) };
    let mut counts = std::collections::BTreeMap::new();
    let v4: LpmTrie<MapData, [u8; 4], EndpointRules> = LpmTrie::try_from(Map::LpmTrie(open(map_names::PROTECTED_V4)?))?;
    counts.insert(map_names::PROTECTED_V4.to_string(), v4.keys().count() as u64);
    let v6: LpmTrie<MapData, [u8; 16], EndpointRules> =
        LpmTrie::try_from(Map::LpmTrie(open(map_names::PROTECTED_V6)?))?;
    counts.insert(map_names::PROTECTED_V6.to_string(), v6.keys().count() as u64);
    let sockets: HashMap<MapData, u64, seb_common::BrokerSocket> =
        HashMap::try_from(Map::HashMap(open(map_names::BROKER_SOCKETS)?))?;
    counts.insert(map_names::BROKER_SOCKETS.to_string(), sockets.keys().count() as u64);
    let exempt: HashMap<MapData, u64, u8> = HashMap::try_from(Map::HashMap(open(map_names::EXEMPT_CGROUPS)?))?;
    counts.insert(map_names::EXEMPT_CGROUPS.to_string(), exempt.keys().count() as u64);
    let cut: HashMap<MapData, u64, u8> = HashMap::try_from(Map::HashMap(open(map_names::CUT_SOCKETS)?))?;
    counts.insert(map_names::CUT_SOCKETS.to_string(), cut.keys().count() as u64);
    Ok(counts)
}

#[cfg(test)]
mod trie_update_tests {
    use seb_common::{ANY_PORT, ANY_PROTOCOL, MAX_RULES_PER_PREFIX, PortRule};

    use super::*;

    fn rules(list: &[(u8, u16)]) -> EndpointRules {
        let mut rules = EndpointRules { count: list.len() as u8, ..Default::default() };
        for (i, (protocol, port)) in list.iter().enumerate().take(MAX_RULES_PER_PREFIX) {
            rules.rules[i] = PortRule { port: *port, protocol: *protocol, _pad: 0 };
        }
        rules
    }

    fn entry(addr: [u8; 4], prefix_len: u32, list: &[(u8, u16)]) -> TrieEntry<4> {
        TrieEntry { prefix_len, addr, rules: rules(list) }
    }

    /// Whether the trie's longest match for `addr` protects `(protocol, port)`.
    fn protects(trie: &[TrieEntry<4>], addr: [u8; 4], protocol: u8, port: u16) -> bool {
        let matches = |e: &&TrieEntry<4>| {
            let mask = if e.prefix_len == 0 { 0 } else { u32::MAX << (32 - e.prefix_len) };
            u32::from_be_bytes(e.addr) & mask == u32::from_be_bytes(addr) & mask
        };
        trie.iter().filter(matches).max_by_key(|e| e.prefix_len).is_some_and(|e| e.rules.matches(protocol, port))
    }

    /// Replays the updates on a model of the trie: after each, everything both policies
    /// protect is protected.
    fn assert_no_window(old: Vec<TrieEntry<4>>, new: Vec<TrieEntry<4>>) {
        let probes = [[10, 1, 2, 3], [10, 1, 5, 5], [10, 9, 9, 9], [11, 0, 0, 1]];
        let services = [(6, 443), (6, 80), (17, 53)];
        let mut trie = old.clone();
        for update in trie_updates(&old, &new, false) {
            match &update {
                TrieUpdate::Write(e) => {
                    trie.retain(|t| (t.prefix_len, t.addr) != (e.prefix_len, e.addr));
                    trie.push(e.clone());
                }
                TrieUpdate::Remove(e) => trie.retain(|t| (t.prefix_len, t.addr) != (e.prefix_len, e.addr)),
            }
            for addr in probes {
                for (protocol, port) in services {
                    let both = protects(&old, addr, protocol, port) && protects(&new, addr, protocol, port);
                    assert!(
                        !both || protects(&trie, addr, protocol, port),
                        "{addr:?} {protocol}/{port} unprotected after {update:?}"
                    );
                }
            }
        }
        let sorted = |mut v: Vec<TrieEntry<4>>| {
            v.sort_by_key(|e| (e.prefix_len, e.addr));
            v
        };
        assert_eq!(sorted(trie), sorted(new));
    }

    #[test]
    fn an_update_never_leaves_unprotected_what_both_policies_protect() {
        let any = &[(ANY_PROTOCOL, ANY_PORT)];
        // A covering prefix narrowed while a longer one inherits what it protected.
        assert_no_window(
            vec![entry([10, 0, 0, 0], 8, any)],
            vec![entry([10, 0, 0, 0], 8, &[(6, 443)]), entry([10, 1, 0, 0], 16, any)],
        );
        // Longer prefixes folded into a covering one that protects everything.
        assert_no_window(
            vec![entry([10, 1, 0, 0], 16, &[(6, 80)]), entry([10, 1, 2, 0], 24, &[(6, 443)])],
            vec![entry([10, 0, 0, 0], 8, any)],
        );
    }
}
