//! Compiling protected endpoints into LPM-trie entries.
//!
//! The kernel does one longest-prefix match per connect and then scans that prefix's
//! rules. For that to be exact, every prefix carries the rules of each configured prefix
//! that covers it: with `10.0.0.0/8 any` and `10.1.2.3/32 tcp:443`, a connect to
//! 10.1.2.3:80 matches the /32 and must still be denied by the /8's rule.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv6Addr,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use seb_common::{ANY_PORT, EndpointRules, LOCAL_GROUP, LOCAL_LOOPBACK, LOCAL_ROUTED, MAX_RULES_PER_PREFIX, PortRule};

use crate::config::Endpoint;

/// One trie entry: prefix length, the network's address bytes, and its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrieEntry<const N: usize, R = EndpointRules> {
    pub prefix_len: u32,
    pub addr: [u8; N],
    pub rules: R,
}

/// The compiled policy for both address families.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub v4: Vec<TrieEntry<4>>,
    pub v6: Vec<TrieEntry<16>>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "protected prefix {prefix} needs {count} port rules (its own and those of covering prefixes); the most one prefix can hold is {max}"
)]
pub struct TooManyRules {
    pub prefix: IpNet,
    pub count: usize,
    pub max: usize,
}

/// The well-known NAT64 prefix (RFC 6052, section 2.1). Behind DNS64, an IPv6-only pod
/// reaches IPv4 address `a.b.c.d` at `64:ff9b::a.b.c.d`, through a NAT64 gateway the
/// IPv4 hooks never see; so every protected IPv4 prefix is protected there too.
pub const NAT64_WELL_KNOWN: Ipv6Addr = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0);

/// `v4` as reached through the well-known NAT64 prefix: its address in the last 32 bits.
fn through_nat64(v4: Ipv4Net) -> IpNet {
    let mut octets = NAT64_WELL_KNOWN.octets();
    octets[12..].copy_from_slice(&v4.network().octets());
    IpNet::V6(Ipv6Net::new(Ipv6Addr::from(octets), 96 + v4.prefix_len()).expect("a prefix of at most 128 bits"))
}

/// An IPv4-mapped prefix (`::ffff:a.b.c.d/n`, n ≥ 96) as the IPv4 prefix it is: the
/// kernel judges a connect to a mapped address as IPv4, so a v6 entry would never match.
pub(crate) fn unmapped(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new(v4, v6.prefix_len() - 96).expect("a prefix of at most 32 bits")),
            None => net,
        },
        _ => net,
    }
}

/// Compile `endpoints`, each IPv4 one also as reached through NAT64; `local` are the
/// prefixes local to the agent's network namespace when a protected endpoint is local
/// there (else empty). Each becomes an entry too, marked local, so one lookup tells a
/// destination that may reach a wildcard listener serving a protected endpoint from one
/// that cannot.
pub fn compile(endpoints: &[Endpoint], local: &[IpNet], groups: &[IpNet]) -> Result<CompiledPolicy, TooManyRules> {
    compile_with(endpoints, local, groups, Overflow::Refuse)
}

/// [`compile`] for what is put in the kernel, where the sources combine (the config, the
/// SebPolicy, the API server's addresses, host names): a prefix needing more rules than
/// one entry holds is protected on every port and protocol, broader and never narrower,
/// rather than refusing the whole update (which kept every later change of every source
/// out: an EndpointSlice address with nine ports froze the API server's addresses).
/// What an operator writes (the config, a SebPolicy) is still refused with the reason.
pub fn compile_widening(endpoints: &[Endpoint], local: &[IpNet], groups: &[IpNet]) -> CompiledPolicy {
    compile_with(endpoints, local, groups, Overflow::Widen).expect("widening never runs out of rules")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Overflow {
    Refuse,
    Widen,
}

fn compile_with(
    endpoints: &[Endpoint],
    local: &[IpNet],
    groups: &[IpNet],
    overflow: Overflow,
) -> Result<CompiledPolicy, TooManyRules> {
    let mut own: BTreeMap<IpNet, BTreeSet<PortRule>> = BTreeMap::new();
    for endpoint in endpoints {
        let rule = PortRule { port: endpoint.port.unwrap_or(ANY_PORT), protocol: endpoint.protocol.number(), _pad: 0 };
        let net = unmapped(endpoint.net.trunc());
        own.entry(net).or_default().insert(rule);
        if let IpNet::V4(v4) = net {
            own.entry(through_nat64(v4)).or_default().insert(rule);
        }
    }
    let mut nets: BTreeSet<IpNet> = own.keys().copied().collect();
    nets.extend(local.iter().map(IpNet::trunc));
    let mut policy = CompiledPolicy::default();
    for net in &nets {
        let rules = inherited_rules(net, &own);
        let mut rules = encode(*net, rules, overflow)?;
        rules.local = local_kind(net, local, groups);
        match net {
            IpNet::V4(v4) => {
                policy.v4.push(TrieEntry { prefix_len: v4.prefix_len().into(), addr: v4.network().octets(), rules })
            }
            IpNet::V6(v6) => {
                policy.v6.push(TrieEntry { prefix_len: v6.prefix_len().into(), addr: v6.network().octets(), rules })
            }
        }
    }
    Ok(policy)
}

/// How `net` is local: not at all, a group address (every socket on the port gets what
/// is sent there), on loopback (reached from this namespace alone), or at an address
/// other namespaces reach by routing.
fn local_kind(net: &IpNet, local: &[IpNet], groups: &[IpNet]) -> u8 {
    if !local.iter().any(|local| local.contains(net)) {
        0
    } else if groups.iter().any(|group| group.contains(net)) {
        LOCAL_GROUP
    } else if net.network().is_loopback() {
        LOCAL_LOOPBACK
    } else {
        LOCAL_ROUTED
    }
}

/// The rules of `net` and of every configured prefix that contains it: at most one
/// map probe per shorter prefix length, so compiling 10,000 CIDRs stays fast.
fn inherited_rules(net: &IpNet, own: &BTreeMap<IpNet, BTreeSet<PortRule>>) -> BTreeSet<PortRule> {
    let mut rules = BTreeSet::new();
    for len in 0..=net.prefix_len() {
        let Ok(cover) = IpNet::new(net.addr(), len) else { continue };
        if let Some(cover_rules) = own.get(&cover.trunc()) {
            rules.extend(cover_rules.iter().copied());
        }
    }
    rules
}

/// Pack a rule set, dropping rules another one already covers.
fn encode(net: IpNet, rules: BTreeSet<PortRule>, overflow: Overflow) -> Result<EndpointRules, TooManyRules> {
    let covers = |wide: &PortRule, narrow: &PortRule| wide != narrow && wide.matches(narrow.protocol, narrow.port);
    let mut kept: Vec<PortRule> =
        rules.iter().filter(|rule| !rules.iter().any(|other| covers(other, rule))).copied().collect();
    if kept.len() > MAX_RULES_PER_PREFIX {
        if overflow == Overflow::Refuse {
            return Err(TooManyRules { prefix: net, count: kept.len(), max: MAX_RULES_PER_PREFIX });
        }
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(prefix = %net, rules = kept.len(), "a protected prefix needs more port rules than one entry holds: it is protected on every port and protocol");
        }
        kept = vec![PortRule { port: ANY_PORT, protocol: seb_common::ANY_PROTOCOL, _pad: 0 }];
    }
    let mut packed = EndpointRules { count: kept.len() as u8, ..Default::default() };
    packed.rules[..kept.len()].copy_from_slice(&kept);
    Ok(packed)
}

/// A trie entry as compared: prefix length, address bytes, rules and local mark.
pub type TrieKey = (u32, Vec<u8>, RulesKey);
pub type RulesKey = (Vec<(u16, u8)>, u8);

/// The rules an entry really holds (slots past `count` are ignored by the kernel), and
/// its local mark.
pub fn rules_key(rules: &EndpointRules) -> RulesKey {
    let count = (rules.count as usize).min(rules.rules.len());
    (rules.rules[..count].iter().map(|rule| (rule.port, rule.protocol)).collect(), rules.local)
}

/// Whether `entry`, more specific than the wanted prefixes covering it, would let the
/// longest-prefix match allow what the longest of them denies: a rule of it not covered
/// by the entry's, or its local mark changed.
pub fn weakens(entry: &TrieKey, wanted: &BTreeSet<TrieKey>) -> bool {
    let (len, addr, (rules, local)) = entry;
    // The set is ordered by prefix length, then address: the first entry at or after
    // (length, address, the least rules) is the one at that prefix, if any.
    let covering = (0..*len).rev().find_map(|shorter| {
        let lowest: TrieKey = (shorter, masked(addr, shorter), (Vec::new(), 0));
        wanted.range(&lowest..).next().filter(|(l, a, _)| *l == shorter && *a == lowest.1)
    });
    let Some((_, _, (covering_rules, covering_local))) = covering else { return false };
    let covered = |(port, protocol): &(u16, u8)| {
        rules.iter().any(|(p, pr)| PortRule { port: *p, protocol: *pr, _pad: 0 }.matches(*protocol, *port))
    };
    !covering_rules.iter().all(covered) || (*covering_local != 0 && covering_local != local)
}

/// `addr` with only its first `len` bits kept.
fn masked(addr: &[u8], len: u32) -> Vec<u8> {
    addr.iter()
        .enumerate()
        .map(|(i, byte)| {
            let kept = len.saturating_sub(8 * i as u32).min(8);
            if kept == 0 { 0 } else { byte & (0xffu8 << (8 - kept)) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;
    use seb_common::ANY_PROTOCOL;

    fn compile_remote(endpoints: &[Endpoint]) -> Result<CompiledPolicy, TooManyRules> {
        compile(endpoints, &[], &[])
    }

    #[test]
    fn too_many_rules_for_one_prefix_are_refused_or_widened_to_every_port() {
        let many: Vec<Endpoint> =
            (0..=MAX_RULES_PER_PREFIX as u16).map(|i| endpoint("10.0.0.1/32", Some(6443 + i), Protocol::Tcp)).collect();
        assert!(compile_remote(&many).is_err(), "what an operator writes is refused");
        let widened = compile_widening(&many, &[], &[]);
        assert!(kernel_denies(&widened, [10, 0, 0, 1], 6, 6443));
        assert!(kernel_denies(&widened, [10, 0, 0, 1], 17, 53), "every port and protocol");
        assert!(!kernel_denies(&widened, [10, 0, 0, 2], 6, 6443));
    }

    fn endpoint(cidr: &str, port: Option<u16>, protocol: Protocol) -> Endpoint {
        Endpoint { net: cidr.parse().unwrap(), port, protocol }
    }

    /// What the kernel does with the compiled tries: longest prefix, then the rules.
    fn kernel_denies(policy: &CompiledPolicy, addr: [u8; 4], protocol: u8, port: u16) -> bool {
        let best = policy
            .v4
            .iter()
            .filter(|e| {
                let net = ipnet::Ipv4Net::new(e.addr.into(), e.prefix_len as u8).unwrap();
                net.contains(&std::net::Ipv4Addr::from(addr))
            })
            .max_by_key(|e| e.prefix_len);
        best.is_some_and(|e| e.rules.matches(protocol, port))
    }

    #[test]
    fn a_longer_prefix_keeps_the_rules_of_the_prefixes_covering_it() {
        let policy = compile_remote(&[
            endpoint("10.0.0.0/8", None, Protocol::Any),
            endpoint("10.1.2.3/32", Some(443), Protocol::Tcp),
        ])
        .unwrap();
        assert!(kernel_denies(&policy, [10, 1, 2, 3], 6, 80), "the /8 rule still applies");
        assert!(kernel_denies(&policy, [10, 9, 9, 9], 17, 53));
        assert!(!kernel_denies(&policy, [11, 1, 2, 3], 6, 443));
        // The /32 inherited "any", which covers its own tcp:443, so one rule remains.
        let host = policy.v4.iter().find(|e| e.prefix_len == 32).unwrap();
        assert_eq!(host.rules.count, 1);
    }

    /// `::ffff:127.0.0.2` (as `ss` prints a dual-stack peer) is the IPv4 host it maps:
    /// the kernel judges mapped destinations as IPv4, so only an IPv4 entry can match.
    #[test]
    fn an_ipv4_mapped_prefix_is_compiled_as_ipv4() {
        let policy = compile_remote(&[
            endpoint("::ffff:127.0.0.2/128", Some(8443), Protocol::Tcp),
            endpoint("::ffff:10.0.0.0/104", None, Protocol::Any),
        ])
        .unwrap();
        assert!(kernel_denies(&policy, [127, 0, 0, 2], 6, 8443));
        assert!(kernel_denies(&policy, [10, 200, 0, 1], 17, 53));
        assert!(!kernel_denies(&policy, [127, 0, 0, 3], 6, 8443));
        // Only the NAT64 forms of the two IPv4 prefixes remain in the IPv6 trie.
        assert!(policy.v6.iter().all(|e| e.addr[..12] == NAT64_WELL_KNOWN.octets()[..12]), "{:?}", policy.v6);
    }

    /// Local prefixes become entries marked local, carrying the rules of the protected
    /// prefixes covering them; protected prefixes inside a local one are marked too.
    #[test]
    fn local_prefixes_are_marked_and_keep_covering_rules() {
        let local: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "10.1.2.3/32".parse().unwrap()];
        let endpoints =
            [endpoint("127.0.0.2/32", None, Protocol::Any), endpoint("10.0.0.0/8", Some(443), Protocol::Tcp)];
        let policy = compile(&endpoints, &local, &[]).unwrap();
        let entry = |len: u32, addr: [u8; 4]| policy.v4.iter().find(|e| e.prefix_len == len && e.addr == addr).unwrap();
        assert_eq!((entry(8, [127, 0, 0, 0]).rules.local, entry(8, [127, 0, 0, 0]).rules.count), (LOCAL_LOOPBACK, 0));
        assert_eq!(entry(32, [127, 0, 0, 2]).rules.local, LOCAL_LOOPBACK, "protected and local");
        let node = entry(32, [10, 1, 2, 3]);
        assert_eq!(node.rules.local, LOCAL_ROUTED, "other namespaces reach a node address");
        assert!(kernel_denies(&policy, [10, 1, 2, 3], 6, 443), "the covering /8's rule still applies");
        assert_eq!(entry(8, [10, 0, 0, 0]).rules.local, 0, "remote");
        assert_eq!(compile_remote(&endpoints).unwrap().v4.len(), 2, "no local protection, no local entries");
    }

    #[test]
    fn ports_and_protocols_are_exact() {
        let policy = compile_remote(&[
            endpoint("192.0.2.0/24", Some(443), Protocol::Tcp),
            endpoint("192.0.2.10/32", Some(6443), Protocol::Tcp),
        ])
        .unwrap();
        assert!(kernel_denies(&policy, [192, 0, 2, 10], 6, 443));
        assert!(kernel_denies(&policy, [192, 0, 2, 10], 6, 6443));
        assert!(!kernel_denies(&policy, [192, 0, 2, 10], 17, 443));
        assert!(!kernel_denies(&policy, [192, 0, 2, 11], 6, 6443));
    }

    #[test]
    fn ipv4_prefixes_are_protected_through_nat64_too() {
        let policy = compile_remote(&[endpoint("10.1.0.0/16", Some(443), Protocol::Tcp)]).unwrap();
        assert_eq!(policy.v6.len(), 1);
        let entry = &policy.v6[0];
        assert_eq!(entry.prefix_len, 96 + 16);
        assert_eq!(entry.addr, "64:ff9b::a01:0".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(entry.rules, policy.v4[0].rules);
    }

    #[test]
    fn ipv6_prefixes_compile_to_the_v6_trie() {
        let policy = compile_remote(&[endpoint("2001:db8::/32", None, Protocol::Any)]).unwrap();
        assert!(policy.v4.is_empty());
        assert_eq!(policy.v6.len(), 1);
        assert_eq!(policy.v6[0].prefix_len, 32);
        assert_eq!(&policy.v6[0].addr[..4], &[0x20, 0x01, 0x0d, 0xb8]);
    }

    #[test]
    fn too_many_rules_on_one_prefix_is_an_error_naming_it() {
        let endpoints: Vec<_> = (1..=9).map(|port| endpoint("198.51.100.7/32", Some(port), Protocol::Tcp)).collect();
        let error = compile_remote(&endpoints).unwrap_err();
        assert_eq!(error.prefix.to_string(), "198.51.100.7/32");
    }

    #[test]
    fn ten_thousand_cidrs_compile() {
        let endpoints: Vec<_> = (0..10_000u32)
            .map(|i| {
                let addr = std::net::Ipv4Addr::from(0x0a00_0000 | (i << 8));
                endpoint(&format!("{addr}/24"), Some(443), Protocol::Tcp)
            })
            .collect();
        let policy = compile_remote(&endpoints).unwrap();
        assert_eq!(policy.v4.len(), 10_000);
    }

    fn entry(len: u32, addr: [u8; 4], rules: &[(u16, u8)], local: u8) -> TrieKey {
        (len, addr.to_vec(), (rules.to_vec(), local))
    }

    /// Kept from an earlier policy, a /32 with no rules under a protected /8 would make
    /// the longest-prefix match allow the /32: a finding; one that protects more is not.
    #[test]
    fn an_extra_entry_is_a_finding_only_when_it_weakens_the_prefix_covering_it() {
        let wanted: BTreeSet<TrieKey> = [entry(8, [10, 0, 0, 0], &[(443, 6)], 0)].into();
        assert!(weakens(&entry(32, [10, 1, 2, 3], &[], 0), &wanted), "no rules under tcp:443");
        assert!(weakens(&entry(32, [10, 1, 2, 3], &[(80, 6)], 0), &wanted), "another port only");
        assert!(!weakens(&entry(32, [10, 1, 2, 3], &[(443, 6), (53, 17)], 0), &wanted), "more");
        assert!(!weakens(&entry(32, [10, 1, 2, 3], &[(ANY_PORT, ANY_PROTOCOL)], 0), &wanted), "everything");
        assert!(!weakens(&entry(32, [11, 1, 2, 3], &[], 0), &wanted), "under no wanted prefix");
        let local: BTreeSet<TrieKey> = [entry(8, [127, 0, 0, 0], &[], 1)].into();
        assert!(weakens(&entry(32, [127, 0, 0, 9], &[], 0), &local), "the local mark dropped");
        assert_eq!(masked(&[10, 1, 2, 3], 12), [10, 0, 0, 0]);
        assert_eq!(masked(&[192, 168, 255, 3], 20), [192, 168, 240, 0]);
    }
}
