//! Reading the destination of an egress packet for the backstop hook.

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock},
    helpers::generated::bpf_sk_fullsock,
    programs::SkBuffContext,
};

use seb_common::ANY_PROTOCOL;

use crate::decision::Destination;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const TCP_SYN_SENT: u32 = 2;
const TCP_LISTEN: u32 = 10;

/// The socket an egress packet leaves from, as far as the backstop cares.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// A TCP socket past its SYN: connect4/6 judged its peer, and NAT maps a connection
    /// at its first packet, which was judged below (a mapping changed mid-stream would
    /// hand the other end segments of a connection it never accepted). Only one opened
    /// before seb watched its cgroup was judged by neither, so its destination is
    /// looked up again (`decision::judge_established`).
    TcpConnected,
    /// A TCP socket sending its SYN, or a UDP socket: connect4/6 or sendmsg4/6 judged the
    /// address asked for; NAT, or an ancestor cgroup's connect program, may have sent the
    /// packet elsewhere since.
    Hooked,
    /// Another kind of socket (raw, ICMP): nothing judged it.
    Unhooked,
    /// A reply the kernel makes for a connection a peer opened: a SYN-ACK (from the
    /// listener or its request socket), an ACK or RST from a time-wait socket; or no
    /// socket at all.
    Kernel,
}

/// Which kind of socket sends the packet (`full`, from `full_socket`).
#[inline(always)]
pub fn sender(full: Option<*mut bpf_sock>) -> Sender {
    let Some(full) = full else { return Sender::Kernel };
    // SAFETY: `full` is a full socket bpf_sk_fullsock vouched for.
    let (kind, protocol, state) = unsafe { ((*full).type_, (*full).protocol, (*full).state) };
    if kind == SOCK_STREAM && protocol == IPPROTO_TCP as u32 {
        return match state {
            TCP_LISTEN => Sender::Kernel,
            TCP_SYN_SENT => Sender::Hooked,
            _ => Sender::TcpConnected,
        };
    }
    if kind == SOCK_DGRAM && protocol == IPPROTO_UDP as u32 { Sender::Hooked } else { Sender::Unhooked }
}

/// Loopback's interface index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Whether the packet leaves through the loopback device: it is then delivered in this
/// network namespace whatever address it carries (a socket bound to `lo`, `IP_UNICAST_IF`
/// or `IP_PKTINFO` naming it, a source bound with `IP_TRANSPARENT` sent to `0.0.0.0`).
#[inline(always)]
pub fn leaves_through_loopback(skb: *mut __sk_buff) -> bool {
    // SAFETY: `ifindex` is a readable field of the context in cgroup_skb programs.
    unsafe { (*skb).ifindex == LOOPBACK_IFINDEX }
}

/// The packet's full socket; none for a request or time-wait socket, or no socket.
#[inline(always)]
pub fn full_socket(skb: *mut __sk_buff) -> Option<*mut bpf_sock> {
    // SAFETY: `sk` is a readable context field in cgroup_skb programs; the pointer is
    // only dereferenced after bpf_sk_fullsock vouches for it.
    unsafe {
        let sk: *mut bpf_sock = (*skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return None;
        }
        let full = bpf_sk_fullsock(sk);
        if full.is_null() { None } else { Some(full) }
    }
}

/// The smallest IP header: a bounds test for a field inside it tests for all of it. (A
/// one-byte read at offset 0 would be tested as `data < data_end`, which the verifier
/// does not take as a bound.)
const MIN_IP_HEADER: usize = 20;

/// `T` at a constant `offset` inside the IP header: read in place where the linear data
/// holds the header (no helper call), else copied out by `bpf_skb_load_bytes`.
#[inline(always)]
fn read<T: Copy>(ctx: &SkBuffContext, offset: usize) -> Option<T> {
    let skb = ctx.skb.skb;
    let window = if offset + core::mem::size_of::<T>() < MIN_IP_HEADER {
        MIN_IP_HEADER
    } else {
        offset + core::mem::size_of::<T>()
    };
    // SAFETY: `data` and `data_end` are readable context fields of cgroup_skb programs;
    // the verifier checks the bounds test below before the load.
    unsafe {
        let (data, end) = ((*skb).data as usize, (*skb).data_end as usize);
        if data + window <= end {
            return Some(((data + offset) as *const T).read_unaligned());
        }
    }
    ctx.load(offset).ok()
}

/// `T` at an `offset` known only at run time (past the IP header): the bounds test is
/// made on the field's own address, which is what the verifier follows.
#[inline(always)]
fn read_past_header<T: Copy>(ctx: &SkBuffContext, offset: usize) -> Option<T> {
    let skb = ctx.skb.skb;
    // SAFETY: as in `read`.
    unsafe {
        let (data, end) = ((*skb).data as usize, (*skb).data_end as usize);
        let field = data + offset;
        if field + core::mem::size_of::<T>() <= end {
            return Some((field as *const T).read_unaligned());
        }
    }
    ctx.load(offset).ok()
}

/// The destination from the IP header; the skb starts at the network header here.
#[inline(always)]
pub fn destination(ctx: &SkBuffContext) -> Option<Destination> {
    let first: u8 = read(ctx, 0)?;
    match first >> 4 {
        4 => destination_v4(ctx, first),
        6 => destination_v6(ctx),
        _ => None,
    }
}

#[inline(always)]
fn destination_v4(ctx: &SkBuffContext, first: u8) -> Option<Destination> {
    let header_len = ((first & 0x0f) as usize) * 4;
    let frag: u16 = u16::from_be(read(ctx, 6)?);
    let protocol: u8 = read(ctx, 9)?;
    let addr: [u8; 4] = read(ctx, 16)?;
    let mut dest = Destination::v4(addr, 0, protocol);
    // Only the first fragment carries ports; a later one matches any port (fail closed).
    let first_fragment = frag & 0x1fff == 0;
    dest.port = if first_fragment { transport_port(ctx, protocol, header_len) } else { None };
    Some(dest)
}

#[inline(always)]
fn destination_v6(ctx: &SkBuffContext) -> Option<Destination> {
    let next_header: u8 = read(ctx, 6)?;
    let addr: [u8; 16] = read(ctx, 24)?;
    let words = [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ];
    // Extension headers are not walked: the transport is then unknown and every rule
    // of the prefix applies (fail closed).
    let protocol = match next_header {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6 => next_header,
        _ => ANY_PROTOCOL,
    };
    let mut dest = Destination::from_v6_words(words, 0, protocol);
    dest.port = transport_port(ctx, protocol, 40);
    Some(dest)
}

/// Whether the packet's IP header says it carries another packet: IP in IP (4, 94),
/// IPv6 in IP (41), GRE (47), EtherIP (97), L2TP (115), MPLS in IP (137). An IPv6
/// extension header before one is not walked.
#[inline(always)]
pub fn is_tunnel(ctx: &SkBuffContext) -> bool {
    let Some(first) = read::<u8>(ctx, 0) else { return false };
    let protocol = match first >> 4 {
        4 => read::<u8>(ctx, 9),
        6 => read::<u8>(ctx, 6),
        _ => None,
    };
    matches!(protocol, Some(4 | 41 | 47 | 94 | 97 | 115 | 137))
}

#[inline(always)]
fn transport_port(ctx: &SkBuffContext, protocol: u8, offset: usize) -> Option<u16> {
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return None;
    }
    let port: u16 = read_past_header(ctx, offset + 2)?;
    Some(u16::from_be(port))
}
