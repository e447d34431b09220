//! seb's kernel programs: deny egress to protected production endpoints from every
//! process except the broker, and report each denial to the agent.
//!
//! Attached as cgroup v2 links to the enforcement scope:
//! - `connect4`/`connect6`: TCP and connected UDP (and io_uring connects, which take the
//!   same kernel path). `connect6` also checks IPv4-mapped addresses against the IPv4
//!   trie, since the kernel hands those to the IPv4 path where `connect4` never runs.
//! - `sendmsg4`/`sendmsg6`: unconnected UDP (`sendto`, QUIC).
//! - `egress`: a `cgroup_skb/egress` backstop for sockets with no connect or sendmsg
//!   hook (raw, ping, SCTP, ...), judged on the packet's real IP header; and for broker
//!   connections cut by a revocation, whose packets it drops whatever their kind.
//!
//! The fast path, a destination that is not protected, is one LPM-trie lookup.
#![no_std]
#![no_main]

mod decision;
mod packet;

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock_addr},
    macros::{cgroup_skb, cgroup_sock_addr, map},
    maps::{HashMap, LpmTrie, PerCpuArray, RingBuf},
    programs::{SkBuffContext, SockAddrContext},
};
use seb_common::{
    BrokerSocket, DENIAL_RING_BYTES, EndpointRules, FAMILY_V4, Hook, MAX_BROKER_SOCKETS, MAX_EXEMPT_CGROUPS,
    MAX_PROTECTED_PREFIXES, counters,
};

use crate::decision::Destination;

/// BPF_F_NO_PREALLOC: required for LPM tries.
const NO_PREALLOC: u32 = 1;

#[map(name = "SEB_PROTECTED_V4")]
static PROTECTED_V4: LpmTrie<[u8; 4], EndpointRules> = LpmTrie::pinned(MAX_PROTECTED_PREFIXES, NO_PREALLOC);

#[map(name = "SEB_PROTECTED_V6")]
static PROTECTED_V6: LpmTrie<[u8; 16], EndpointRules> = LpmTrie::pinned(MAX_PROTECTED_PREFIXES, NO_PREALLOC);

#[map(name = "SEB_BROKER_SOCKETS")]
static BROKER_SOCKETS: HashMap<u64, BrokerSocket> = HashMap::pinned(MAX_BROKER_SOCKETS, 0);

#[map(name = "SEB_EXEMPT_CGROUPS")]
static EXEMPT_CGROUPS: HashMap<u64, u8> = HashMap::pinned(MAX_EXEMPT_CGROUPS, 0);

/// Broker sockets whose decision was revoked while they were open.
#[map(name = "SEB_CUT_SOCKETS")]
static CUT_SOCKETS: HashMap<u64, u8> = HashMap::pinned(MAX_BROKER_SOCKETS, 0);

#[map(name = "SEB_DENIALS")]
static DENIALS: RingBuf = RingBuf::pinned(DENIAL_RING_BYTES, 0);

#[map(name = "SEB_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counters::LEN, 0);

/// Verdicts of cgroup programs.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn seb_connect4(ctx: SockAddrContext) -> i32 {
    sock_addr_v4(&ctx, Hook::Connect4)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn seb_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_addr_v4(&ctx, Hook::Sendmsg4)
}

#[cgroup_sock_addr(connect6)]
pub fn seb_connect6(ctx: SockAddrContext) -> i32 {
    sock_addr_v6(&ctx, Hook::Connect6)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn seb_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_addr_v6(&ctx, Hook::Sendmsg6)
}

#[cgroup_skb(egress)]
pub fn seb_egress(ctx: SkBuffContext) -> i32 {
    egress(&ctx)
}

#[inline(always)]
fn sock_addr_v4(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the verifier permits these context reads for sock_addr programs.
    let (ip, port, protocol) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let dest = Destination::v4(ip.to_ne_bytes(), port_from_ctx(port), protocol as u8);
    decision::judge_sock_addr(ctx, &dest, hook)
}

#[inline(always)]
fn sock_addr_v6(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: as above; user_ip6 must be read one 32-bit word at a time.
    let (w0, w1, w2, w3, port, protocol) = unsafe {
        ((*sa).user_ip6[0], (*sa).user_ip6[1], (*sa).user_ip6[2], (*sa).user_ip6[3], (*sa).user_port, (*sa).protocol)
    };
    let dest = Destination::from_v6_words([w0, w1, w2, w3], port_from_ctx(port), protocol as u8);
    decision::judge_sock_addr(ctx, &dest, hook)
}

/// `user_port` holds the port in network byte order in its low 16 bits.
#[inline(always)]
fn port_from_ctx(port: u32) -> u16 {
    u16::from_be(port as u16)
}

#[inline(always)]
fn egress(ctx: &SkBuffContext) -> i32 {
    let skb: *mut __sk_buff = ctx.skb.skb;
    if packet::socket_has_address_hooks(skb) {
        // TCP and UDP sockets were already judged at connect() or sendmsg(), except a
        // broker connection cut since.
        return decision::judge_cut(ctx, skb);
    }
    let Some(dest) = packet::destination(ctx) else {
        return ALLOW;
    };
    let hook = if dest.family == FAMILY_V4 { Hook::Egress4 } else { Hook::Egress6 };
    decision::judge_packet(ctx, skb, &dest, hook)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
