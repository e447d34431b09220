//! Reading the destination of an egress packet for the backstop hook.

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock},
    helpers::generated::bpf_sk_fullsock,
    programs::SkBuffContext,
};

use seb_common::{ANY_PROTOCOL, FAMILY_V4};

use crate::decision::Destination;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const TCP_LISTEN: u32 = 10;

/// What judged a packet's destination before it reached the backstop.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Judged {
    /// A TCP or UDP socket sending to the peer it connected to: connect4/6 judged it.
    AtConnect,
    /// A TCP or UDP socket sending elsewhere: an unconnected datagram (sendmsg4/6 judged
    /// the address asked for), or a destination that NAT rewrote after the hook.
    Elsewhere,
    /// Nothing: another kind of socket (raw, ICMP).
    Never,
    /// A reply the kernel makes for a connection a peer opened: a SYN-ACK (from the
    /// listener or its request socket), an ACK or RST from a time-wait socket; or no
    /// socket at all.
    Kernel,
}

/// Whether the packet's socket passed an address hook for this destination. The
/// connected peer is compared with the packet's header, so a packet NAT sent elsewhere
/// than where connect() was judged is judged again here.
#[inline(always)]
pub fn judged_before(skb: *mut __sk_buff, dest: &Destination) -> Judged {
    // SAFETY: `sk` is a readable context field in cgroup_skb programs; the pointer is
    // only dereferenced after bpf_sk_fullsock vouches for it.
    unsafe {
        let sk: *mut bpf_sock = (*skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return Judged::Kernel;
        }
        let full = bpf_sk_fullsock(sk);
        if full.is_null() {
            return Judged::Kernel;
        }
        let (kind, protocol) = ((*full).type_, (*full).protocol);
        let hooked = (kind == SOCK_STREAM && protocol == IPPROTO_TCP as u32)
            || (kind == SOCK_DGRAM && protocol == IPPROTO_UDP as u32);
        if !hooked {
            return Judged::Never;
        }
        if kind == SOCK_STREAM && (*full).state == TCP_LISTEN {
            return Judged::Kernel;
        }
        let Some(port) = dest.port else { return Judged::Elsewhere };
        if (*full).dst_port != port.to_be() {
            return Judged::Elsewhere;
        }
        let a = &dest.addr;
        // An IPv4 packet of an IPv6 socket connected to a mapped address: the kernel keeps
        // the IPv4 peer in `dst_ip4` as well.
        let same_peer = if dest.family == FAMILY_V4 {
            (*full).dst_ip4 == u32::from_ne_bytes([a[0], a[1], a[2], a[3]])
        } else {
            (*full).dst_ip6[0] == u32::from_ne_bytes([a[0], a[1], a[2], a[3]])
                && (*full).dst_ip6[1] == u32::from_ne_bytes([a[4], a[5], a[6], a[7]])
                && (*full).dst_ip6[2] == u32::from_ne_bytes([a[8], a[9], a[10], a[11]])
                && (*full).dst_ip6[3] == u32::from_ne_bytes([a[12], a[13], a[14], a[15]])
        };
        if same_peer { Judged::AtConnect } else { Judged::Elsewhere }
    }
}

/// The destination from the IP header; the skb starts at the network header here.
#[inline(always)]
pub fn destination(ctx: &SkBuffContext) -> Option<Destination> {
    let first: u8 = ctx.load(0).ok()?;
    match first >> 4 {
        4 => destination_v4(ctx, first),
        6 => destination_v6(ctx),
        _ => None,
    }
}

#[inline(always)]
fn destination_v4(ctx: &SkBuffContext, first: u8) -> Option<Destination> {
    let header_len = ((first & 0x0f) as usize) * 4;
    let frag: u16 = u16::from_be(ctx.load(6).ok()?);
    let protocol: u8 = ctx.load(9).ok()?;
    let addr: [u8; 4] = ctx.load(16).ok()?;
    let mut dest = Destination::v4(addr, 0, protocol);
    // Only the first fragment carries ports; a later one matches any port (fail closed).
    let first_fragment = frag & 0x1fff == 0;
    dest.port = if first_fragment { transport_port(ctx, protocol, header_len) } else { None };
    Some(dest)
}

#[inline(always)]
fn destination_v6(ctx: &SkBuffContext) -> Option<Destination> {
    let next_header: u8 = ctx.load(6).ok()?;
    let addr: [u8; 16] = ctx.load(24).ok()?;
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

#[inline(always)]
fn transport_port(ctx: &SkBuffContext, protocol: u8, offset: usize) -> Option<u16> {
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return None;
    }
    let port: u16 = ctx.load(offset + 2).ok()?;
    Some(u16::from_be(port))
}
