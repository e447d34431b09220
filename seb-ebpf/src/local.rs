//! Destinations the kernel turns into local ones.
//!
//! - The unspecified address (`0.0.0.0`, `::`, `::ffff:0.0.0.0`) is not a destination:
//!   Linux connects it to the source address asked for, else the bound one, else
//!   loopback. Each of those is judged, and the first protected one is what the caller
//!   reaches.
//! - A listener bound to the wildcard address answers on every local address. Where a
//!   protected endpoint's address is local to the caller's network namespace, reaching
//!   its port through any other local address (loopback, the node's own IP, a broadcast
//!   or multicast address) reaches the protected service: such a destination is judged
//!   as that service, unless the socket that would answer is bound to that very address
//!   (never at a broadcast or multicast address, where every socket on the port gets
//!   the datagram).
//!   When no socket is found (one bound to a device is invisible to the lookup), the
//!   destination is judged as the service: fail closed; a connect to a port where nothing
//!   listens loses nothing.
//! - From another network namespace (a pod), the agent's routed local addresses are
//!   reached too, and what answers there cannot be looked up from the caller's namespace:
//!   such a destination on a port of a local protected endpoint is judged as the service.

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_sock, bpf_sock_addr, bpf_sock_tuple},
    helpers::generated::{bpf_get_netns_cookie, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
    programs::SockAddrContext,
};
use seb_common::{ANY_OTHER_NAMESPACE, FAMILY_V4, Hook, LOCAL_GROUP, LOCAL_LOOPBACK, LOCAL_ROUTED};

use crate::{LOCAL_PROTECTED, decision::Destination};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const LOOPBACK_V4: [u8; 4] = [127, 0, 0, 1];
/// Look sockets up in the namespace of the socket being connected.
const CURRENT_NETNS: u64 = u64::MAX;

/// Where an unspecified destination really goes, in the kernel's order of preference;
/// `None` for a destination that is specified.
#[inline(always)]
pub fn resolve_unspecified(ctx: &SockAddrContext, dest: &Destination, hook: Hook) -> Option<[Destination; 3]> {
    if !dest.is_unspecified() {
        return None;
    }
    let port = dest.port.unwrap_or(0);
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sk` is a full socket in sock_addr programs; msg_src_* is readable in the
    // sendmsg hooks only, which is where it is read.
    let (bound4, bound6, asked4, asked6) = unsafe {
        let sk: *mut bpf_sock = (*sa).__bindgen_anon_1.sk;
        let bound6 = [(*sk).src_ip6[0], (*sk).src_ip6[1], (*sk).src_ip6[2], (*sk).src_ip6[3]];
        let (asked4, asked6) = match hook {
            Hook::Sendmsg4 => ((*sa).msg_src_ip4, [0; 4]),
            Hook::Sendmsg6 => {
                (0, [(*sa).msg_src_ip6[0], (*sa).msg_src_ip6[1], (*sa).msg_src_ip6[2], (*sa).msg_src_ip6[3]])
            }
            _ => (0, [0; 4]),
        };
        ((*sk).src_ip4, bound6, asked4, asked6)
    };
    let mut candidates = if dest.family == FAMILY_V4 {
        [
            Destination::v4(asked4.to_ne_bytes(), port, dest.protocol),
            Destination::v4(bound4.to_ne_bytes(), port, dest.protocol),
            Destination::v4(LOOPBACK_V4, port, dest.protocol),
        ]
    } else {
        // `::` is sent to ::1 (or to 127.0.0.1 from a socket bound to a mapped address).
        [
            Destination::from_v6_words(asked6, port, dest.protocol),
            Destination::from_v6_words(bound6, port, dest.protocol),
            Destination::from_v6_words([0, 0, 0, u32::to_be(1)], port, dest.protocol),
        ]
    };
    for candidate in candidates.iter_mut() {
        candidate.unspecified = true;
    }
    Some(candidates)
}

/// Whether a listener that also serves a local protected endpoint may answer at `dest`,
/// an address the trie marks local (`local` is its kind). Costs one hash lookup unless
/// the port is one of a local protected endpoint.
#[inline(always)]
pub fn reaches_local_protected(ctx: &SockAddrContext, dest: &Destination, local: u8) -> bool {
    let Some(port) = dest.port else { return false };
    // SAFETY: helper valid in sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only use within this program run.
    if let Some(rules) = unsafe { LOCAL_PROTECTED.get(&netns) } {
        return rules.matches(dest.protocol, port) && !answered_only_by_its_own_address(ctx, dest, port, local);
    }
    // Another namespace: its loopback is its own; the rest is the agent's, by routing
    // (a group address: a datagram crosses into the agent's namespace with the link's).
    (local == LOCAL_ROUTED || local == LOCAL_GROUP) && on_local_protected_port(dest)
}

/// Whether a packet to `dest`, a local address of kind `local` (loopback for any address
/// a packet out through loopback carries), may reach a local protected endpoint: as
/// `reaches_local_protected` judges a connect, in the packet's network namespace.
/// `looped`: the packet leaves through loopback.
#[inline(always)]
pub fn packet_reaches_local_protected<C: EbpfContext>(ctx: &C, dest: &Destination, local: u8, looped: bool) -> bool {
    // SAFETY: helper valid in cgroup_skb programs, on this program's own skb.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only use within this program run.
    if let Some(rules) = unsafe { LOCAL_PROTECTED.get(&netns) } {
        let on_port = match dest.port {
            Some(port) => rules.matches(dest.protocol, port),
            None => rules.matches_protocol(dest.protocol),
        };
        return on_port && !dest.port.is_some_and(|port| answered_only_by_its_own_address(ctx, dest, port, local));
    }
    // Another namespace: its loopback is its own, and so is whatever it sends out through
    // it; the rest is the agent's, by routing (a loopback address too, routed out of an
    // interface by a namespace's administrator, to a node that takes it).
    (local == LOCAL_ROUTED || local == LOCAL_GROUP || (local == LOCAL_LOOPBACK && !looped))
        && on_local_protected_port(dest)
}

/// Whether only a socket bound to `dest` itself would take what is sent there. Never at
/// a group address: the kernel delivers a broadcast or multicast datagram to every
/// socket on the port (a wildcard listener too), while the lookup finds one, which the
/// sender may have bound there as a decoy.
#[inline(always)]
fn answered_only_by_its_own_address<C: EbpfContext>(ctx: &C, dest: &Destination, port: u16, local: u8) -> bool {
    local != LOCAL_GROUP && answered_by_its_own_address(ctx, dest, port)
}

/// Whether `dest` is on a port of any local protected endpoint; without a port (a later
/// fragment), any rule of its protocol counts.
#[inline(always)]
fn on_local_protected_port(dest: &Destination) -> bool {
    // A key on the stack: a reference to the constant itself would be read from
    // `.rodata`, an extra map the pinned links do not hold.
    let key = ANY_OTHER_NAMESPACE;
    // SAFETY: read-only use within this program run.
    let Some(rules) = (unsafe { LOCAL_PROTECTED.get(&key) }) else { return false };
    match dest.port {
        Some(port) => rules.matches(dest.protocol, port),
        None => rules.matches_protocol(dest.protocol),
    }
}

/// Look up the socket that would take a connection to `dest` and tell whether it is
/// bound to that address itself (not the wildcard). No socket found is no such socket.
#[inline(always)]
fn answered_by_its_own_address<C: EbpfContext>(ctx: &C, dest: &Destination, port: u16) -> bool {
    // SAFETY: an all-zero tuple is valid; only the family's half is read by the kernel.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if dest.family == FAMILY_V4 {
        // SAFETY: writing the IPv4 variant of a plain-data union.
        unsafe {
            let v4 = &mut tuple.__bindgen_anon_1.ipv4;
            v4.daddr = u32::from_ne_bytes([dest.addr[0], dest.addr[1], dest.addr[2], dest.addr[3]]);
            v4.dport = port.to_be();
        }
        core::mem::size_of::<u32>() * 2 + core::mem::size_of::<u16>() * 2
    } else {
        // SAFETY: as above, the IPv6 variant.
        unsafe {
            let v6 = &mut tuple.__bindgen_anon_1.ipv6;
            let a = &dest.addr;
            v6.daddr = [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            ];
            v6.dport = port.to_be();
        }
        core::mem::size_of::<u32>() * 8 + core::mem::size_of::<u16>() * 2
    };
    let tuple_ptr = &mut tuple as *mut bpf_sock_tuple;
    // SAFETY: helpers valid in sock_addr programs; a found socket is released below.
    let sk = unsafe {
        match dest.protocol {
            IPPROTO_TCP => bpf_sk_lookup_tcp(ctx.as_ptr(), tuple_ptr, size as u32, CURRENT_NETNS, 0),
            IPPROTO_UDP => bpf_sk_lookup_udp(ctx.as_ptr(), tuple_ptr, size as u32, CURRENT_NETNS, 0),
            _ => return false,
        }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is a referenced full socket until released.
    let wildcard = unsafe {
        match (*sk).family {
            // Found by an IPv4 lookup, a dual-stack socket is judged by its IPv4 address
            // (`sk_rcv_saddr`): bound to `::` or to `::ffff:0.0.0.0`, whose IPv6 words
            // are not all zero, it answers on every local IPv4 address.
            _ if dest.family == FAMILY_V4 => (*sk).src_ip4 == 0,
            AF_INET => (*sk).src_ip4 == 0,
            // One test of all four words: a chain of tests ending in a load like the
            // IPv4 arm's lets the compiler merge the two loads into one at a computed
            // offset, which the verifier refuses on a socket pointer.
            AF_INET6 => ((*sk).src_ip6[0] | (*sk).src_ip6[1] | (*sk).src_ip6[2] | (*sk).src_ip6[3]) == 0,
            // Never found by an inet lookup.
            _ => false,
        }
    };
    // SAFETY: releases the reference taken by the lookup.
    unsafe { bpf_sk_release(sk.cast()) };
    !wildcard
}
