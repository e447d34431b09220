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
//! - `sock_create`: remembers the cgroup each of the scope's sockets is made in.
//! - `socket_call` (`syscalls/sys_enter_socket`): kills a task in the scope that asks for
//!   a socket of a family that emits frames without passing the IP hooks (`AF_PACKET`,
//!   `AF_XDP`), and a process that left the scope; `uring_setup`/`uring_enter` kill the
//!   latter too.
//! - `exempt_origin`: attached to exempt cgroups only; remembers the sockets created
//!   there, so an exemption belongs to the socket's origin and the task alike.
//! - `process_exit`: a raw tracepoint on process exit that retires a dead broker's
//!   registrations at once, whatever later reuses its PID, and forgets the process.
//! - `process_fork`, `process_exec`, `cgroup_migrate`: follow processes that have been
//!   in the scope (see `lineage`), so leaving it for an exempt or unenforced cgroup
//!   escapes nothing.
//!
//! The fast path, a destination that is neither protected nor local where a protected
//! endpoint is, is one LPM-trie lookup that finds nothing.
#![no_std]
#![feature(core_intrinsics)]
#![allow(internal_features)]
#![no_main]

mod decision;
mod lineage;
mod local;
mod packet;
mod task;

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock_addr},
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    },
    macros::{
        btf_tracepoint, cgroup_device, cgroup_skb, cgroup_sock, cgroup_sock_addr, map, raw_tracepoint, tracepoint,
    },
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::{
        BtfTracePointContext, DeviceContext, RawTracePointContext, SkBuffContext, SockAddrContext, SockContext,
        TracePointContext,
    },
};
use seb_common::{
    BrokerSocket, DENIAL_RING_BYTES, DEVICE_MAJOR_SLOTS, DenialRate, EndpointRules, FAMILY_V4, Hook,
    MAX_BROKER_PROCESSES, MAX_BROKER_SOCKETS, MAX_DOOMED_RINGS, MAX_DOOMED_TASKS, MAX_EXEMPT_CGROUPS,
    MAX_EXEMPT_SOCKETS, MAX_LOCAL_NAMESPACES, MAX_PROTECTED_PREFIXES, MAX_RATED_CGROUPS, MAX_SCOPE_CGROUPS,
    MAX_SCOPED_TASKS, agent_slots, counters, layout,
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

/// Live broker processes: tgid -> generation. The exit tracepoint removes a process's
/// entry as it dies, which invalidates every registration made under it.
#[map(name = "SEB_BROKER_PROCESSES")]
static BROKER_PROCESSES: HashMap<u32, u64> = HashMap::pinned(MAX_BROKER_PROCESSES, 0);

/// Cookies of sockets created in an exempt cgroup.
/// Value: the exempt cgroup the socket was made in.
#[map(name = "SEB_EXEMPT_SOCKETS")]
static EXEMPT_SOCKETS: HashMap<u64, u64> = HashMap::pinned(MAX_EXEMPT_SOCKETS, 0);

/// The enforced cgroups, for the hooks that are not attached to a cgroup (LSM).
#[map(name = "SEB_SCOPE_CGROUPS")]
static SCOPE_CGROUPS: HashMap<u64, u8> = HashMap::pinned(MAX_SCOPE_CGROUPS, 0);

/// Per network namespace (by cookie): the rules of protected endpoints whose address is
/// local there, so a wildcard listener serving them answers on every local address.
#[map(name = "SEB_LOCAL_PROTECTED")]
static LOCAL_PROTECTED: HashMap<u64, EndpointRules> = HashMap::pinned(MAX_LOCAL_NAMESPACES, 0);

/// Broker sockets whose decision was revoked while they were open.
#[map(name = "SEB_CUT_SOCKETS")]
static CUT_SOCKETS: HashMap<u64, u8> = HashMap::pinned(MAX_BROKER_SOCKETS, 0);

/// Non-zero once the agent may have cut a socket (it sets it before the first cut and
/// clears it at start when none is left), so TCP and UDP packets skip the lookup in
/// `SEB_CUT_SOCKETS` while nothing is cut.
#[map(name = "SEB_CUT_PENDING")]
static CUT_PENDING: Array<u64> = Array::pinned(1, 0);

/// Processes that have been in the scope: tgid -> the cgroup they were scoped in.
/// Entries leave when the process's last thread exits.
#[map(name = "SEB_SCOPED_TASKS")]
static SCOPED_TASKS: HashMap<u32, u64> = HashMap::pinned(MAX_SCOPED_TASKS, NO_PREALLOC);

/// io_uring rings (`struct io_ring_ctx *`) that made a link-layer socket for the scope:
/// the family and type asked for (`decision::judge_uring_socket`).
#[map(name = "SEB_DOOMED_RINGS")]
static DOOMED_RINGS: LruHashMap<u64, u64> = LruHashMap::pinned(MAX_DOOMED_RINGS, 0);

/// Scoped processes placed outside the scope by another: tgid -> the cgroup they were
/// scoped in. Killed at their first `socket()` or io_uring call.
#[map(name = "SEB_DOOMED_TASKS")]
static DOOMED_TASKS: HashMap<u32, u64> = HashMap::pinned(MAX_DOOMED_TASKS, 0);

/// Slot 0 says where the processes of the scope are: 0, all in `SEB_SCOPED_TASKS`; 1,
/// some only in `SEB_DOOMED_TASKS` (the first map was full); 2, some in neither (both were
/// full, or the agent could not mark one at start). Until it is 0 no more, a check that
/// needs every process of the scope looks in one map, not two, and no cgroup walk.
#[map(name = "SEB_UNFOLLOWED_SEEN")]
static UNFOLLOWED_SEEN: Array<u32> = Array::pinned(1, 0);

/// The character-device majors of the packet-device drivers on this node (0: none;
/// `seb_common::DEVICE_MAJOR_SLOTS`).
#[map(name = "SEB_DEVICE_MAJORS")]
static DEVICE_MAJORS: Array<u32> = Array::pinned(DEVICE_MAJOR_SLOTS, 0);

/// The running agent's tgid and cgroup (`seb_common::agent_slots`), written by the agent,
/// cleared when its process ends.
#[map(name = "SEB_AGENT")]
static AGENT: Array<u64> = Array::pinned(agent_slots::LEN, 0);

/// Field offsets of kernel structures (`seb_common::layout`), from the kernel's BTF.
#[map(name = "SEB_KERNEL_LAYOUT")]
static KERNEL_LAYOUT: Array<u32> = Array::pinned(layout::LEN, 0);

#[map(name = "SEB_DENIALS")]
static DENIALS: RingBuf = RingBuf::pinned(DENIAL_RING_BYTES, 0);

#[map(name = "SEB_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counters::LEN, 0);

/// Each denied cgroup's refusals this second (`decision::Report::send`).
#[map(name = "SEB_DENIAL_RATE")]
static DENIAL_RATE: LruHashMap<u64, DenialRate> = LruHashMap::pinned(MAX_RATED_CGROUPS, 0);

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
// In the program itself, as `seb_sys_enter`'s body is.
#[inline(always)]
pub fn seb_egress(ctx: SkBuffContext) -> i32 {
    egress(&ctx)
}

/// Forget a closed socket of an exempt cgroup. Entries are removed here rather than
/// evicted, which keeps `sock_create` to one plain hash insert.
#[cgroup_sock(sock_release)]
pub fn seb_exempt_release(ctx: SockContext) -> i32 {
    decision::forget_socket(&ctx, &EXEMPT_SOCKETS)
}

#[cgroup_sock(sock_create)]
pub fn seb_exempt_origin(ctx: SockContext) -> i32 {
    // SAFETY: helpers valid in cgroup sock programs.
    let (cookie, cgroup_id) = unsafe { (bpf_get_socket_cookie(ctx.as_ptr()), bpf_get_current_cgroup_id()) };
    // A process that has been in the scope makes no exempt socket.
    if lineage::is_scoped((bpf_get_current_pid_tgid() >> 32) as u32) {
        return ALLOW;
    }
    // A full map takes no more: the new socket is not exempt (fail closed).
    let _ = EXEMPT_SOCKETS.insert(&cookie, &cgroup_id, 0);
    ALLOW
}

/// `socket()`, from every task on the node: a syscall tracepoint, so no other system
/// call runs it. AF_PACKET sockets never reach the cgroup `sock_create` hook (only inet
/// sockets run it), and this kernel refuses BPF-LSM and `fmod_ret` programs, which could
/// fail the call with EPERM: the caller is killed before the call returns, so the socket
/// never reaches user space. A process that left the scope is killed here too.
#[tracepoint(category = "syscalls", name = "sys_enter_socket")]
pub fn seb_socket_call(ctx: TracePointContext) -> i32 {
    if lineage::kill_if_escaped() {
        return 0;
    }
    // SAFETY: the record layout of every syscall tracepoint: each argument a 64-bit slot
    // after the common header and the syscall number (events/syscalls/*/format).
    let (family, kind) = unsafe { (ctx.read_at::<u64>(16), ctx.read_at::<u64>(24)) };
    match (family, kind) {
        (Ok(family), Ok(kind)) => decision::judge_socket_call(family as u32, kind as u32, false),
        _ => 0,
    }
}

/// `io_uring_setup()` and `io_uring_enter()`: a ring submits socket operations without
/// `socket()`, so a process that left the scope is killed here as well.
#[tracepoint(category = "syscalls", name = "sys_enter_io_uring_setup")]
pub fn seb_uring_setup(_ctx: TracePointContext) -> i32 {
    lineage::kill_if_escaped();
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_io_uring_enter")]
pub fn seb_uring_enter(_ctx: TracePointContext) -> i32 {
    lineage::kill_if_escaped();
    0
}

/// `pidfd_getfd()`, `ptrace()` and `process_vm_writev()`: a process of the scope that
/// reaches into another is killed (see `decision::judge_process_access`).
#[tracepoint(category = "syscalls", name = "sys_enter_pidfd_getfd")]
pub fn seb_getfd_call(_ctx: TracePointContext) -> i32 {
    decision::judge_process_access();
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_ptrace")]
pub fn seb_ptrace_call(ctx: TracePointContext) -> i32 {
    // SAFETY: the first argument's slot, as for `socket()` above.
    if unsafe { ctx.read_at::<u64>(16) }.is_ok_and(decision::ptrace_attaches) {
        decision::judge_process_access();
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_process_vm_writev")]
pub fn seb_vm_write_call(_ctx: TracePointContext) -> i32 {
    decision::judge_process_access();
    0
}

/// `bpf()`: a process of the scope that makes any call while the agent runs is killed,
/// but for the agent's cgroup and live brokers (see `decision::judge_bpf_call`).
#[tracepoint(category = "syscalls", name = "sys_enter_bpf")]
pub fn seb_bpf_call(_ctx: TracePointContext) -> i32 {
    decision::judge_bpf_call();
    0
}

/// The writes: one to another process's memory (`/proc/<pid>/mem`) or to a packet device
/// (tun/tap, vhost-net, macvtap, ipvtap) from a process of the scope kills it (see
/// `decision::judge_write_to`).
#[tracepoint(category = "syscalls", name = "sys_enter_write")]
pub fn seb_write_call(ctx: TracePointContext) -> i32 {
    judge_write_at(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_enter_pwrite64")]
pub fn seb_pwrite_call(ctx: TracePointContext) -> i32 {
    judge_write_at(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_enter_writev")]
pub fn seb_writev_call(ctx: TracePointContext) -> i32 {
    judge_write_at(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_enter_pwritev")]
pub fn seb_pwritev_call(ctx: TracePointContext) -> i32 {
    judge_write_at(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_enter_pwritev2")]
pub fn seb_pwritev2_call(ctx: TracePointContext) -> i32 {
    judge_write_at(&ctx)
}

#[inline(always)]
fn judge_write_at(ctx: &TracePointContext) -> i32 {
    // SAFETY: the first argument's slot, as for `socket()` above.
    // The kernel takes the descriptor's low 32 bits (`unsigned int`, or an `int` in the
    // vectored calls), so only those may be judged.
    if let Ok(fd) = unsafe { ctx.read_at::<u64>(16) } {
        decision::judge_write(fd as u32 as u64);
    }
    0
}

/// Opening (or making) a character device from an enforced cgroup: a packet device is
/// refused with EPERM (see `decision::judge_device`).
#[cgroup_device]
pub fn seb_device(ctx: DeviceContext) -> i32 {
    decision::judge_device(&ctx)
}

/// `ioctl()`: `TUNSETIFF` from a process of the scope kills it (see
/// `decision::judge_tun_device`). Every other request costs one comparison.
#[tracepoint(category = "syscalls", name = "sys_enter_ioctl")]
pub fn seb_ioctl_call(ctx: TracePointContext) -> i32 {
    // SAFETY: the second argument's slot, as for `socket()` above.
    if unsafe { ctx.read_at::<u64>(24) }.is_ok_and(|request| request as u32 == decision::TUNSETIFF) {
        decision::judge_tun_device();
    }
    0
}

/// `io_uring_submit_req`: every request a ring submits, in the submitting task (the
/// caller of `io_uring_enter()`, or a ring's SQPOLL thread, which submits without any
/// system call). A process that left the scope is killed here, and so is a task of the
/// scope whose `IORING_OP_SOCKET` asks for a link-layer family (that request makes a
/// socket without `socket()`), or that submits to a ring which made one, or whose write
/// to a fixed file goes to another process's memory or a packet device. The kill comes
/// before the request runs; requests already in
/// the same submission may still run before the process dies (see the README).
#[btf_tracepoint(function = "io_uring_submit_req")]
#[inline(always)]
pub fn seb_uring_submit(ctx: BtfTracePointContext) -> i32 {
    if lineage::kill_if_escaped() {
        return 0;
    }
    let req: u64 = ctx.arg(0);
    let Some(opcode) = task::uring_opcode(req) else { return 0 };
    if decision::judge_uring_socket(req, task::uring_socket_request(req, opcode)) {
        return 0;
    }
    if task::uring_opcode_writes(opcode) && lineage::current_may_be_judged() {
        decision::judge_write_to(task::uring_fixed_write_sink(req));
    }
    0
}

/// `io_uring_create`: a new ring, whose address may be a freed one's that made a
/// link-layer socket (`SEB_DOOMED_RINGS`).
#[btf_tracepoint(function = "io_uring_create")]
pub fn seb_uring_create(ctx: BtfTracePointContext) -> i32 {
    decision::forget_ring(ctx.arg(1));
    0
}

/// `io_uring_file_get`: a request takes the file behind its descriptor, when it is issued
/// (at once, or later: linked, drained, forced async, by an io-wq worker). A write from a
/// process of the scope to a sink is judged here, on the file it takes, not at submission
/// when the descriptor may not even be open yet.
#[btf_tracepoint(function = "io_uring_file_get")]
pub fn seb_uring_file_get(ctx: BtfTracePointContext) -> i32 {
    let req: u64 = ctx.arg(0);
    let fd: u64 = ctx.arg(1);
    // The issuing task (the submitter, an io-wq worker, a polling thread) shares the
    // process's descriptor table; the descriptor is an `int`.
    if task::uring_opcode(req).is_some_and(task::uring_opcode_writes) && lineage::current_may_be_judged() {
        decision::judge_write_to(task::current_fd_sink(fd as u32 as u64));
    }
    0
}

/// `sys_enter`, attached instead of the three syscall tracepoints above where the kernel
/// takes 32-bit system calls too: `int 0x80` from any 64-bit process reaches `socket()`
/// and io_uring through the i386 table, which the syscall tracepoints never see. One
/// program for both tables costs less than the tracepoints plus a second program.
#[btf_tracepoint(function = "sys_enter")]
// The body goes into the program itself: kept out of line, it would be a function named
// after the crate's build, and the object must build byte for byte anywhere.
#[inline(always)]
pub fn seb_sys_enter(ctx: BtfTracePointContext) -> i32 {
    let id: i64 = ctx.arg(1);
    if !decision::is_watched_call(id) {
        return 0;
    }
    let regs: *const u8 = ctx.arg(0);
    decision::judge_sys_enter(id, regs)
}

/// `sched_process_exit` runs in each exiting thread; the last one ends the process, and
/// with it any broker registration it held and its scoping. (Not the leader's exit: a
/// leader can end alone with `exit()` while its other threads go on, and a process must
/// not shed its scoping that way.)
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn seb_process_exit(_ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, pid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !task::current_process_is_gone().unwrap_or(tgid == pid) {
        return 0;
    }
    // SAFETY: the values are only tested for presence.
    if unsafe { BROKER_PROCESSES.get(&tgid) }.is_some() {
        let _ = BROKER_PROCESSES.remove(&tgid);
    }
    if lineage::is_scoped(tgid) {
        let _ = SCOPED_TASKS.remove(&tgid);
    }
    lineage::forget_doomed(tgid);
    decision::forget_agent(tgid);
    0
}

/// `sched_process_fork`: a process created by a scoped parent, or placed in the scope
/// by any parent, is scoped.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
// In the program itself, as `seb_sys_enter`'s body is.
#[inline(always)]
pub fn seb_process_fork(ctx: RawTracePointContext) -> i32 {
    lineage::on_fork(&ctx)
}

/// `sched_process_exec`: an exec in the scope scopes the process.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn seb_process_exec(_ctx: RawTracePointContext) -> i32 {
    lineage::on_exec()
}

/// `cgroup_attach_task`: a move into the scope scopes the process; a scoped process
/// moving out, or into the running agent's cgroup, is killed.
#[btf_tracepoint(function = "cgroup_attach_task")]
// In the program itself, as `seb_sys_enter`'s body is.
#[inline(always)]
pub fn seb_cgroup_migrate(ctx: BtfTracePointContext) -> i32 {
    lineage::on_migrate(&ctx)
}

use aya_ebpf::EbpfContext;

#[inline(always)]
fn sock_addr_v4(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the verifier permits these context reads for sock_addr programs.
    let (ip, port, protocol) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let dest = Destination::v4(ip.to_ne_bytes(), port_from_ctx(port), protocol as u8);
    decision::judge_sock_addr(ctx, dest, hook)
}

#[inline(always)]
fn sock_addr_v6(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: as above; user_ip6 must be read one 32-bit word at a time.
    let (w0, w1, w2, w3, port, protocol) = unsafe {
        ((*sa).user_ip6[0], (*sa).user_ip6[1], (*sa).user_ip6[2], (*sa).user_ip6[3], (*sa).user_port, (*sa).protocol)
    };
    let dest = Destination::from_v6_words([w0, w1, w2, w3], port_from_ctx(port), protocol as u8);
    decision::judge_sock_addr(ctx, dest, hook)
}

/// `user_port` holds the port in network byte order in its low 16 bits.
#[inline(always)]
fn port_from_ctx(port: u32) -> u16 {
    u16::from_be(port as u16)
}

#[inline(always)]
fn egress(ctx: &SkBuffContext) -> i32 {
    let skb: *mut __sk_buff = ctx.skb.skb;
    let sender = packet::sender(packet::full_socket(skb));
    if sender == packet::Sender::TcpConnected {
        // Judged at connect() (its SYN too, below), so only a protected destination can
        // be refused now: a broker connection cut since, or a connection opened before
        // seb watched this cgroup or protected this address, which nothing judged.
        if decision::judge_cut(ctx, skb) == DENY {
            return DENY;
        }
        let Some(dest) = packet::destination(ctx) else { return ALLOW };
        let hook = if dest.family == FAMILY_V4 { Hook::Egress4 } else { Hook::Egress6 };
        return decision::judge_established(ctx, skb, &dest, hook);
    }
    let Some(dest) = packet::destination(ctx) else {
        // Not IP: the cgroup egress hook sees IP only. A cut broker socket stays cut.
        return if sender == packet::Sender::Hooked { decision::judge_cut(ctx, skb) } else { ALLOW };
    };
    let hook = if dest.family == FAMILY_V4 { Hook::Egress4 } else { Hook::Egress6 };
    match sender {
        // Judged where it really goes, even when that is the peer connect4/6 saw: a
        // connect program of an ancestor cgroup runs after seb's and may have rewritten
        // the address it judged (a socket load balancer does exactly that).
        packet::Sender::Hooked => {
            if decision::judge_packet(ctx, skb, &dest, hook, true) == DENY {
                return DENY;
            }
        }
        // The kernel's replies answer a peer that connected here: the address, not what
        // listens behind it, is judged.
        packet::Sender::Kernel => return decision::judge_packet(ctx, skb, &dest, hook, false),
        // A raw socket's tunnel packet (IP in IP, GRE, ...) carries another packet that
        // a tunnel device where it arrives (the node's own, another node's) sends on,
        // unjudged: refused wherever it goes.
        _ if packet::is_tunnel(ctx) => return decision::refuse_packet(ctx, skb, &dest, hook),
        _ => return decision::judge_packet(ctx, skb, &dest, hook, true),
    }
    decision::judge_cut(ctx, skb)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
