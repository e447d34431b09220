//! The allow/deny decision shared by every hook, and the denial report.

use aya_ebpf::{
    EbpfContext,
    bindings::__sk_buff,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_get_socket_uid,
            bpf_ktime_get_boot_ns, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
        },
    },
    maps::lpm_trie::Key,
};
use seb_common::{DenialEvent, EndpointRules, FAMILY_V4, FAMILY_V6, Hook, MAX_CGROUP_DEPTH, counters};

use crate::{ALLOW, BROKER_SOCKETS, COUNTERS, CUT_SOCKETS, DENIALS, DENY, EXEMPT_CGROUPS, PROTECTED_V4, PROTECTED_V6};

/// Where a connection or packet is going.
pub struct Destination {
    pub family: u8,
    /// Network byte order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
    /// Host byte order; `None` where the packet does not show it (a non-first fragment,
    /// an unknown transport). Then every rule of the protocol applies: fail closed.
    pub port: Option<u16>,
    pub protocol: u8,
}

impl Destination {
    #[inline(always)]
    pub fn v4(addr: [u8; 4], port: u16, protocol: u8) -> Self {
        let mut full = [0u8; 16];
        full[..4].copy_from_slice(&addr);
        Self { family: FAMILY_V4, addr: full, port: Some(port), protocol }
    }

    /// From the four network-order words of a sockaddr_in6, unwrapping IPv4-mapped
    /// addresses (`::ffff:a.b.c.d`) to IPv4.
    #[inline(always)]
    pub fn from_v6_words(words: [u32; 4], port: u16, protocol: u8) -> Self {
        if words[0] == 0 && words[1] == 0 && words[2] == u32::to_be(0x0000_ffff) {
            return Self::v4(words[3].to_ne_bytes(), port, protocol);
        }
        let mut addr = [0u8; 16];
        addr[0..4].copy_from_slice(&words[0].to_ne_bytes());
        addr[4..8].copy_from_slice(&words[1].to_ne_bytes());
        addr[8..12].copy_from_slice(&words[2].to_ne_bytes());
        addr[12..16].copy_from_slice(&words[3].to_ne_bytes());
        Self { family: FAMILY_V6, addr, port: Some(port), protocol }
    }

    /// Whether a protected-endpoint rule covers this destination.
    #[inline(always)]
    fn is_protected(&self) -> bool {
        let rules: Option<&EndpointRules> = if self.family == FAMILY_V4 {
            let mut data = [0u8; 4];
            data.copy_from_slice(&self.addr[..4]);
            PROTECTED_V4.get(Key::new(32, data))
        } else {
            PROTECTED_V6.get(Key::new(128, self.addr))
        };
        match (rules, self.port) {
            (None, _) => false,
            (Some(rules), Some(port)) => rules.matches(self.protocol, port),
            (Some(rules), None) => rules.matches_protocol(self.protocol),
        }
    }
}

/// Decision for connect()/sendmsg(): the caller is the current task.
#[inline(always)]
pub fn judge_sock_addr<C: EbpfContext>(ctx: &C, dest: &Destination, hook: Hook) -> i32 {
    if !dest.is_protected() {
        return ALLOW;
    }
    // SAFETY: helpers valid in sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if is_broker_socket(cookie, Some(tgid)) || current_task_is_exempt() {
        return ALLOW;
    }
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    report(dest, hook, cookie, bpf_get_current_pid_tgid(), bpf_get_current_uid_gid(), cgroup_id, true);
    DENY
}

/// Decision for an egress packet: the caller is the socket's owner, since the packet
/// may leave from another task's context (softirq, a retransmit timer).
#[inline(always)]
pub fn judge_packet<C: EbpfContext>(ctx: &C, skb: *mut __sk_buff, dest: &Destination, hook: Hook) -> i32 {
    if !dest.is_protected() {
        return ALLOW;
    }
    // SAFETY: helpers valid in cgroup_skb programs, on this program's own skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if is_broker_socket(cookie, None) || socket_cgroup_is_exempt(skb) {
        return ALLOW;
    }
    let (uid, cgroup_id) = unsafe { (bpf_get_socket_uid(skb) as u64, bpf_skb_cgroup_id(skb)) };
    report(dest, hook, cookie, 0, uid | (uid << 32), cgroup_id, false);
    DENY
}

/// Decision for a packet of a TCP or UDP socket: dropped only if the broker cut the
/// socket (its decision was revoked while the connection was open).
#[inline(always)]
pub fn judge_cut(ctx: &aya_ebpf::programs::SkBuffContext, skb: *mut __sk_buff) -> i32 {
    // SAFETY: helper valid in cgroup_skb programs, on this program's own skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is only tested for presence.
    if unsafe { CUT_SOCKETS.get(&cookie) }.is_none() {
        return ALLOW;
    }
    let dest = crate::packet::destination(ctx).unwrap_or(Destination::v4([0; 4], 0, 0));
    let hook = if dest.family == FAMILY_V4 { Hook::Egress4 } else { Hook::Egress6 };
    let (uid, cgroup_id) = unsafe { (bpf_get_socket_uid(skb) as u64, bpf_skb_cgroup_id(skb)) };
    report(&dest, hook, cookie, 0, uid | (uid << 32), cgroup_id, false);
    DENY
}

/// A socket the running broker registered. With `tgid`, the caller must also be the
/// registering process, so a child holding an inherited fd is refused.
#[inline(always)]
fn is_broker_socket(cookie: u64, tgid: Option<u32>) -> bool {
    // SAFETY: the value is only read, and only within this program run.
    match unsafe { BROKER_SOCKETS.get(&cookie) } {
        None => false,
        Some(registered) => match tgid {
            Some(tgid) => registered.tgid == tgid,
            None => true,
        },
    }
}

/// Whether the caller's cgroup, or one of its ancestors, is exempt. `ancestor(level)`
/// gives the id at that depth, 0 past the cgroup itself.
#[inline(always)]
fn is_exempt(ancestor: impl Fn(i32) -> u64) -> bool {
    let mut level = 0;
    while level < MAX_CGROUP_DEPTH {
        let id = ancestor(level as i32);
        if id == 0 {
            return false;
        }
        // SAFETY: the value is only tested for presence.
        if unsafe { EXEMPT_CGROUPS.get(&id) }.is_some() {
            return true;
        }
        level += 1;
    }
    false
}

#[inline(always)]
fn current_task_is_exempt() -> bool {
    // SAFETY: plain helper call.
    is_exempt(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) })
}

#[inline(always)]
fn socket_cgroup_is_exempt(skb: *mut __sk_buff) -> bool {
    // SAFETY: helper call on this program's own skb.
    is_exempt(|level| unsafe { bpf_skb_ancestor_cgroup_id(skb, level) })
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *counter += 1 };
    }
}

/// Send a denial to the agent; a full ring buffer is counted, never silent.
#[inline(always)]
fn report(
    dest: &Destination,
    hook: Hook,
    cookie: u64,
    pid_tgid: u64,
    uid_gid: u64,
    cgroup_id: u64,
    task_context: bool,
) {
    bump(counters::DENIALS);
    let Some(mut entry) = DENIALS.reserve::<DenialEvent>(0) else {
        bump(counters::RING_DROPS);
        return;
    };
    let comm = if task_context { bpf_get_current_comm().unwrap_or([0; 16]) } else { [0; 16] };
    entry.write(DenialEvent {
        // SAFETY: plain helper call.
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        pid_tgid,
        uid_gid,
        cgroup_id,
        socket_cookie: cookie,
        daddr: dest.addr,
        dport: dest.port.unwrap_or(0),
        family: dest.family,
        protocol: dest.protocol,
        hook: hook as u8,
        _pad: [0; 3],
        comm,
    });
    entry.submit(0);
}
