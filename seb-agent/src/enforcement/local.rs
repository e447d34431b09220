//! Protected endpoints whose address is local to this network namespace.
//!
//! A listener bound to the wildcard address answers on every local address, so where a
//! protected endpoint's address is local (a host-network API server, a protected
//! loopback address), its port is reachable through any other local address too. The
//! kernel programs judge such destinations as the protected service; they need to know
//! which rules are local here and which addresses are local.
//!
//! Local addresses are read with getifaddrs: an address on a loopback interface makes
//! its whole prefix local (Linux routes all of 127.0.0.0/8 to `lo`), any other address
//! only itself, and an interface's broadcast address too. Datagrams to the limited
//! broadcast address, to multicast groups (every interface joins the all-hosts group)
//! and to the IPv6 anycast addresses the kernel answers (`/proc/net/anycast6`, a
//! router's subnet anycast) reach a wildcard listener as well: all are local. This is
//! the agent's own network namespace: the node's, for a host-network DaemonSet, which is
//! where a protected endpoint can be local.

use std::net::IpAddr;

use anyhow::{Context, Result};
use ipnet::IpNet;
use nix::{ifaddrs::getifaddrs, net::if_::InterfaceFlags};
use seb_common::{ANY_PORT, ANY_PROTOCOL, EndpointRules, MAX_RULES_PER_PREFIX, PortRule};
use std::collections::BTreeSet;

use crate::config::Endpoint;

/// What the kernel needs to judge local destinations in one network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalProtection {
    pub netns_cookie: u64,
    /// Local address prefixes.
    pub prefixes: Vec<IpNet>,
    /// Those of them the kernel delivers to every socket on the port (broadcast and
    /// multicast): no one socket answers there, so none is looked up.
    pub groups: Vec<IpNet>,
    /// Rules of protected endpoints on a local address; `None` when there are none.
    pub rules: Option<EndpointRules>,
}

/// Read this namespace's local addresses and pick the protected endpoints among them.
pub fn current(endpoints: &[Endpoint]) -> Result<LocalProtection> {
    let (prefixes, groups) = local_prefixes()?;
    Ok(LocalProtection {
        netns_cookie: own_netns_cookie()?,
        rules: local_rules(endpoints, &prefixes),
        prefixes,
        groups,
    })
}

/// Destinations every namespace delivers locally, whatever its addresses: the limited
/// broadcast address and the multicast ranges.
const ALWAYS_LOCAL: [&str; 3] = ["255.255.255.255/32", "224.0.0.0/4", "ff00::/8"];

/// Every local prefix, and the group prefixes among them.
fn local_prefixes() -> Result<(Vec<IpNet>, Vec<IpNet>)> {
    let mut groups: BTreeSet<IpNet> = ALWAYS_LOCAL.iter().map(|net| net.parse().expect("a valid prefix")).collect();
    let mut prefixes: BTreeSet<IpNet> = anycast_v6()?.into_iter().collect();
    for interface in getifaddrs().context("listing local addresses (getifaddrs)")? {
        if let Some(broadcast) = interface.broadcast.as_ref().and_then(|b| b.as_sockaddr_in()) {
            groups.insert(IpNet::from(IpAddr::from(broadcast.ip())));
        }
        let Some(address) = interface.address.as_ref() else { continue };
        let ip: IpAddr = if let Some(v4) = address.as_sockaddr_in() {
            v4.ip().into()
        } else if let Some(v6) = address.as_sockaddr_in6() {
            v6.ip().into()
        } else {
            continue;
        };
        let mask_len = interface.netmask.as_ref().and_then(netmask_len).unwrap_or(host_len(ip));
        let prefix_len = if interface.flags.contains(InterfaceFlags::IFF_LOOPBACK) { mask_len } else { host_len(ip) };
        if let Some(broadcast) = subnet_broadcast(ip, mask_len) {
            groups.insert(broadcast);
        }
        if let Ok(net) = IpNet::new(ip, prefix_len) {
            prefixes.insert(net.trunc());
        }
    }
    prefixes.extend(&groups);
    Ok((prefixes.into_iter().collect(), groups.into_iter().collect()))
}

/// The IPv6 anycast addresses the kernel answers in this namespace (`/proc/net/anycast6`:
/// index, interface, address in 32 hex digits, users); none where IPv6 is off.
fn anycast_v6() -> Result<Vec<IpNet>> {
    let text = match std::fs::read_to_string("/proc/net/anycast6") {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context("reading /proc/net/anycast6"),
    };
    Ok(text
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2))
        .filter_map(parse_hex_v6)
        .map(IpNet::from)
        .collect())
}

fn parse_hex_v6(hex: &str) -> Option<IpAddr> {
    let bits = u128::from_str_radix(hex, 16).ok().filter(|_| hex.len() == 32)?;
    Some(IpAddr::from(std::net::Ipv6Addr::from(bits)))
}

/// The broadcast address Linux routes locally for an IPv4 subnet shorter than /31,
/// whether or not the address was given one (loopback's `127.255.255.255` too).
fn subnet_broadcast(ip: IpAddr, prefix_len: u8) -> Option<IpNet> {
    match ip {
        IpAddr::V4(v4) if prefix_len < 31 => {
            let net = ipnet::Ipv4Net::new(v4, prefix_len).ok()?;
            Some(IpNet::from(IpAddr::from(net.broadcast())))
        }
        _ => None,
    }
}

fn host_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn netmask_len(mask: &nix::sys::socket::SockaddrStorage) -> Option<u8> {
    if let Some(v4) = mask.as_sockaddr_in() {
        return Some(u32::from(v4.ip()).count_ones() as u8);
    }
    mask.as_sockaddr_in6().map(|v6| u128::from(v6.ip()).count_ones() as u8)
}

/// The rules of every protected endpoint whose prefix overlaps a local prefix. More
/// distinct rules than one entry holds collapse to "every port and protocol": broader,
/// never narrower.
pub fn local_rules(endpoints: &[Endpoint], prefixes: &[IpNet]) -> Option<EndpointRules> {
    let overlaps = |a: &IpNet, b: &IpNet| a.contains(&b.network()) || b.contains(&a.network());
    // A protected `::ffff:a.b.c.d` is the IPv4 address it maps (as the tries hold it).
    let rules: BTreeSet<PortRule> = endpoints
        .iter()
        .filter(|endpoint| prefixes.iter().any(|local| overlaps(&super::policy::unmapped(endpoint.net.trunc()), local)))
        .map(|endpoint| PortRule {
            port: endpoint.port.unwrap_or(ANY_PORT),
            protocol: endpoint.protocol.number(),
            _pad: 0,
        })
        .collect();
    if rules.is_empty() {
        return None;
    }
    let mut encoded = EndpointRules::default();
    if rules.len() > MAX_RULES_PER_PREFIX {
        encoded.rules[0] = PortRule { port: ANY_PORT, protocol: ANY_PROTOCOL, _pad: 0 };
        encoded.count = 1;
        return Some(encoded);
    }
    for (slot, rule) in encoded.rules.iter_mut().zip(&rules) {
        *slot = *rule;
    }
    encoded.count = rules.len() as u8;
    Some(encoded)
}

/// `SO_NETNS_COOKIE` of a socket made here: the id `bpf_get_netns_cookie` returns. Read
/// once (the agent never changes namespace) from an unbound socket: binding one would
/// need a free port, and whoever shares the namespace can take them all.
fn own_netns_cookie() -> Result<u64> {
    static COOKIE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    if let Some(cookie) = COOKIE.get() {
        return Ok(*cookie);
    }
    use std::os::fd::AsFd;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .or_else(|_| socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None))
        .context("opening a socket to read the network namespace cookie")?;
    let cookie = super::broker_sockets::socket_u64(socket.as_fd(), libc::SO_NETNS_COOKIE)
        .context("getsockopt(SO_NETNS_COOKIE)")?;
    Ok(*COOKIE.get_or_init(|| cookie))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;

    fn endpoint(net: &str, port: Option<u16>) -> Endpoint {
        Endpoint { net: net.parse().unwrap(), port, protocol: Protocol::Tcp }
    }

    #[test]
    fn anycast_addresses_are_read_from_procfs_lines() {
        assert_eq!(parse_hex_v6("20010db8000100000000000000000000"), Some("2001:db8:1::".parse::<IpAddr>().unwrap()));
        assert_eq!(parse_hex_v6("2001"), None);
        assert_eq!(parse_hex_v6("zz010db8000100000000000000000000"), None);
    }

    #[test]
    fn a_subnets_broadcast_address_is_local() {
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(subnet_broadcast(ip, 24), Some("198.51.100.255/32".parse().unwrap()));
        assert_eq!(subnet_broadcast(ip, 31), None);
        assert_eq!(subnet_broadcast("127.0.0.1".parse().unwrap(), 8), Some("127.255.255.255/32".parse().unwrap()));
        assert_eq!(subnet_broadcast("2001:db8::1".parse().unwrap(), 64), None);
    }

    #[test]
    fn broadcast_and_multicast_are_always_local_groups() {
        let (prefixes, groups) = local_prefixes().unwrap();
        for net in ALWAYS_LOCAL {
            assert!(prefixes.contains(&net.parse().unwrap()), "{net} in {prefixes:?}");
            assert!(groups.contains(&net.parse().unwrap()), "{net} in {groups:?}");
        }
        assert!(groups.iter().all(|group| prefixes.contains(group)));
    }

    #[test]
    fn only_endpoints_on_local_prefixes_count() {
        let local: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "10.0.0.5/32".parse().unwrap()];
        let rules = local_rules(
            &[endpoint("127.0.0.2/32", Some(8443)), endpoint("10.0.0.0/24", Some(6443)), endpoint("10.1.0.0/16", None)],
            &local,
        )
        .unwrap();
        assert_eq!(rules.count, 2);
        assert!(rules.matches(6, 8443) && rules.matches(6, 6443));
        assert!(!rules.matches(6, 443), "10.1.0.0/16 is not local");
        assert_eq!(local_rules(&[endpoint("192.0.2.0/24", None)], &local), None);
        // An endpoint given in its IPv4-mapped form is the IPv4 address it maps (before,
        // found by review, it was never local, and a local wildcard listener was reached).
        let mapped = local_rules(&[endpoint("::ffff:127.0.0.2/128", Some(8443))], &local).unwrap();
        assert!(mapped.matches(6, 8443));
    }

    #[test]
    fn too_many_local_rules_collapse_to_everything() {
        let local: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        let many: Vec<Endpoint> =
            (0..=MAX_RULES_PER_PREFIX as u16).map(|i| endpoint("127.0.0.9/32", Some(1000 + i))).collect();
        let rules = local_rules(&many, &local).unwrap();
        assert!(rules.matches(17, 1), "collapsed to every port and protocol");
    }

    #[test]
    fn this_namespace_has_loopback_and_a_cookie() {
        let view = current(&[endpoint("127.0.0.2/32", Some(1))]).unwrap();
        assert!(view.netns_cookie != 0);
        assert!(view.prefixes.iter().any(|p| p.contains(&"127.0.0.2".parse::<IpAddr>().unwrap())), "{view:?}");
        assert!(view.rules.is_some());
    }
}
