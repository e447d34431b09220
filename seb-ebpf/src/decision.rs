//! The allow/deny decision shared by every hook, and the denial report.

use aya_ebpf::{
    EbpfContext,
    bindings::__sk_buff,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_probe_read_user,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_get_socket_uid,
            bpf_ktime_get_boot_ns, bpf_send_signal, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
        },
    },
    maps::{HashMap, lpm_trie::Key},
    programs::{DeviceContext, SockAddrContext, SockContext},
};
use seb_common::{
    AF_PACKET, AF_XDP, DENIALS_PER_CGROUP_SECOND, DenialEvent, DenialRate, EndpointRules, FAMILY_DEVICE, FAMILY_NONE,
    FAMILY_V4, FAMILY_V6, Hook, KILLS_PER_CGROUP_SECOND, LOCAL_LOOPBACK, MAX_CGROUP_DEPTH, agent_slots, counters,
};

use crate::{
    AGENT, ALLOW, BROKER_PROCESSES, BROKER_SOCKETS, COUNTERS, CUT_PENDING, CUT_SOCKETS, DENIAL_RATE, DENIALS, DENY,
    DOOMED_RINGS, EXEMPT_CGROUPS, EXEMPT_SOCKETS, PROTECTED_V4, PROTECTED_V6, SCOPE_CGROUPS, lineage, local, task,
};

/// Where a connection or packet is going.
#[derive(Clone, Copy)]
pub struct Destination {
    pub family: u8,
    /// Network byte order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
    /// Host byte order; `None` where the packet does not show it (a non-first fragment,
    /// an unknown transport). Then every rule of the protocol applies: fail closed.
    pub port: Option<u16>,
    pub protocol: u8,
    /// The caller asked for the unspecified address; `addr` is where it really goes.
    pub unspecified: bool,
}

impl Destination {
    #[inline(always)]
    pub fn v4(addr: [u8; 4], port: u16, protocol: u8) -> Self {
        let mut full = [0u8; 16];
        full[..4].copy_from_slice(&addr);
        Self { family: FAMILY_V4, addr: full, port: Some(port), protocol, unspecified: false }
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
        Self { family: FAMILY_V6, addr, port: Some(port), protocol, unspecified: false }
    }

    #[inline(always)]
    pub fn is_unspecified(&self) -> bool {
        let words = if self.family == FAMILY_V4 { 4 } else { 16 };
        let mut i = 0;
        while i < 16 {
            if i < words && self.addr[i] != 0 {
                return false;
            }
            i += 1;
        }
        true
    }

    /// The trie entry for this destination: its protected rules, and whether the address
    /// is local where a protected endpoint is. `None` is the fast path: nothing to judge.
    #[inline(always)]
    pub fn entry(&self) -> Option<&'static EndpointRules> {
        if self.family == FAMILY_V4 {
            let mut data = [0u8; 4];
            data.copy_from_slice(&self.addr[..4]);
            PROTECTED_V4.get(Key::new(32, data))
        } else {
            PROTECTED_V6.get(Key::new(128, self.addr))
        }
    }

    /// Whether `rules` (this destination's entry) cover it.
    #[inline(always)]
    pub fn covered_by(&self, rules: &EndpointRules) -> bool {
        match self.port {
            Some(port) => rules.matches(self.protocol, port),
            None => rules.matches_protocol(self.protocol),
        }
    }

    /// Whether a protected-endpoint rule covers this destination.
    #[inline(always)]
    pub fn is_protected(&self) -> bool {
        self.entry().is_some_and(|rules| self.covered_by(rules))
    }
}

/// Decision for connect()/sendmsg(): the caller is the current task; the socket is the
/// one whose cgroup attached these programs.
#[inline(always)]
pub fn judge_sock_addr(ctx: &SockAddrContext, dest: Destination, hook: Hook) -> i32 {
    let Some(judged) = protected_destination(ctx, dest, hook) else {
        return ALLOW;
    };
    // SAFETY: helpers valid in sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if is_live_broker_socket(cookie, Some(tgid)) || task_and_socket_exempt(tgid, cookie) {
        return ALLOW;
    }
    // SAFETY: plain helper call; the origin is only read.
    let task_cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let socket_cgroup_id = task::socket_cgroup_id(ctx.as_ptr());
    let report_to = Report { cookie, pid_tgid: bpf_get_current_pid_tgid(), uid_gid: bpf_get_current_uid_gid() };
    report_to.send(&judged, hook, task_cgroup_id, socket_cgroup_id, true);
    DENY
}

/// The protected destination a connect or send would reach, if any: the address given,
/// what an unspecified address turns into, or a local wildcard listener that also serves
/// a protected endpoint.
#[inline(always)]
fn protected_destination(ctx: &SockAddrContext, dest: Destination, hook: Hook) -> Option<Destination> {
    let Some(candidates) = local::resolve_unspecified(ctx, &dest, hook) else {
        let rules = dest.entry()?;
        if dest.covered_by(rules) || (rules.local != 0 && local::reaches_local_protected(ctx, &dest, rules.local)) {
            return Some(dest);
        }
        return None;
    };
    for candidate in candidates {
        if candidate.is_protected() {
            return Some(candidate);
        }
    }
    // The kernel connects to the first specified candidate (asked-for source, bound
    // source, loopback); judge what answers there.
    for candidate in candidates {
        if !candidate.is_unspecified() {
            let local = candidate.entry().map_or(0, |rules| rules.local);
            if local != 0 && local::reaches_local_protected(ctx, &candidate, local) {
                return Some(candidate);
            }
            return None;
        }
    }
    None
}

/// An exemption needs the task in an exempt cgroup, never in the scope before (it would
/// have moved there), and a socket made in an exempt cgroup.
#[inline(always)]
fn task_and_socket_exempt(tgid: u32, cookie: u64) -> bool {
    current_task_is_exempt() && socket_is_exempt(cookie) && !lineage::is_scoped(tgid)
}

/// At `sock_release`: drop the closed socket's entry from `sockets`.
#[inline(always)]
pub fn forget_socket(ctx: &SockContext, sockets: &HashMap<u64, u64>) -> i32 {
    // SAFETY: helper valid in cgroup sock programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = sockets.remove(&cookie);
    ALLOW
}

/// Socket families and types `socket()` is judged by.
const AF_INET: u32 = 2;
const SOCK_PACKET: u32 = 10;
const SOCK_TYPE_MASK: u32 = 0xf;
const SIGKILL: u32 = 9;

/// The current task is judged: it is in an enforced cgroup that is not exempt, or it
/// has been (then an exempt cgroup does not exempt it).
#[inline(always)]
fn current_task_is_judged() -> bool {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    lineage::is_scoped(tgid) || (current_task_in_scope() && !current_task_is_exempt())
}

/// Decision at `socket()` for every task on the node: a link-layer family requested from
/// the scope (and not exempt) kills the caller before the call returns. (`socketpair()`
/// makes no link-layer socket: the packet and XDP families refuse it.)
#[inline(always)]
pub fn judge_socket_call(family: u32, kind: u32, any_family: bool) -> i32 {
    if !(is_link_layer(family, kind) || any_family) || !current_task_is_judged() {
        return 0;
    }
    // SAFETY: plain helper calls; the signal goes to the calling process.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    unsafe { bpf_send_signal(SIGKILL) };
    let mut dest = Destination::v4([0; 4], 0, 0);
    dest.family = FAMILY_NONE;
    let report_to = Report::current_task();
    report_to.send_socket(&dest, family as u8, (kind & SOCK_TYPE_MASK) as u8, cgroup_id);
    0
}

/// Whether `socket(family, kind)` makes a link-layer socket.
#[inline(always)]
pub fn is_link_layer(family: u32, kind: u32) -> bool {
    // socket(AF_INET, SOCK_PACKET) is turned into a packet socket by the kernel.
    family == AF_PACKET || family == AF_XDP || (family == AF_INET && kind & SOCK_TYPE_MASK == SOCK_PACKET)
}

/// Decision at an io_uring request (`req`) that a ring submits. An `IORING_OP_SOCKET` for
/// a link-layer family from the scope kills the submitter as `socket()` does, but the
/// request still runs (the kill is pending until the submitter returns to user space):
/// made into the ring's fixed-file table, the socket outlives the submitter in a ring
/// another process may hold. So the ring is remembered, and every later request a task of
/// the scope submits to it (using the socket, installing it as a descriptor) is judged as
/// that socket request again. Whether the request was judged so.
#[inline(always)]
pub fn judge_uring_socket(req: u64, request: Option<(u32, u32)>) -> bool {
    let ring = task::uring_ring(req);
    // SAFETY: the value is copied out at once.
    let doomed = ring.and_then(|ring| unsafe { DOOMED_RINGS.get(&ring) }.copied());
    let (family, kind) = match (request, doomed) {
        (Some((family, kind)), _) if is_link_layer(family, kind) => (family, kind),
        (_, Some(socket)) => ((socket >> 32) as u32, socket as u32),
        _ => return false,
    };
    if !current_task_is_judged() {
        return false;
    }
    if let (Some(ring), None) = (ring, doomed) {
        let _ = DOOMED_RINGS.insert(&ring, &(u64::from(family) << 32 | u64::from(kind)), 0);
    }
    judge_socket_call(family, kind, false);
    true
}

/// `io_uring_create`: a ring made at `ring` is not one remembered at that address before.
#[inline(always)]
pub fn forget_ring(ring: u64) {
    let _ = DOOMED_RINGS.remove(&ring);
}

/// `ptrace` requests that take control of another process.
const PTRACE_ATTACH: u64 = 16;
const PTRACE_SEIZE: u64 = 0x4206;

/// Whether a `ptrace(request, ...)` takes control of another process.
#[inline(always)]
pub fn ptrace_attaches(request: u64) -> bool {
    request == PTRACE_ATTACH || request == PTRACE_SEIZE
}

/// Decision at `pidfd_getfd()`, `ptrace()` attach, `process_vm_writev()` and a write to
/// `/proc/<pid>/mem`: a process of the scope reaching into another is killed before the
/// call returns. The other may be outside the scope (its sockets are never judged, and it
/// could be made to connect), or a child killed for a link-layer socket whose descriptor
/// outlives it until it returns to user space. The target is not resolved: these calls
/// have no place in the scope. The kill is pending before the kernel pins the target's
/// pages, and pinning stops at a pending kill, so the memory writes write nothing.
#[inline(always)]
pub fn judge_process_access() {
    kill_judged_caller(Hook::ProcessAccess);
}

/// Decision at a `bpf()` call: while the agent runs, a process of the scope outside the
/// agent's cgroup that is not a live broker is killed before the call returns, whatever
/// the command. With CAP_BPF (root in a privileged pod) it could otherwise take seb's
/// maps and links by id or by pin and edit them: delete its own entry from the processes
/// followed out of the scope, enter itself as a broker, detach a link. Without BPF-LSM
/// the call itself is not refused: it completes, and the process dies before it runs
/// again, so a descriptor it took is never used. Agents have no use for `bpf()`. The
/// agent may run in the scope (a pod of the DaemonSet); while none runs, the one starting
/// must open its pins. A doomed process is killed wherever it is. (Entering the agent's
/// cgroup from the scope kills, see `lineage::on_migrate`.)
#[inline(always)]
pub fn judge_bpf_call() {
    // Slot keys on the stack: a reference to a constant would be read from `.rodata`.
    let (tgid_slot, cgroup_slot) = (agent_slots::TGID, agent_slots::CGROUP);
    let agent = AGENT.get(tgid_slot).copied().unwrap_or(0);
    if agent == 0 {
        return;
    }
    // SAFETY: plain helper calls.
    let (cgroup_id, tgid) = unsafe { (bpf_get_current_cgroup_id(), (bpf_get_current_pid_tgid() >> 32) as u32) };
    if u64::from(tgid) == agent {
        // The agent's cgroup as the kernel sees it at its first call: inside its
        // container (a cgroup namespace) the agent cannot name it. Only while unnamed:
        // moved elsewhere by another, the agent must not take that cgroup's processes
        // with it into the spared set (its check keeps the first value).
        // Named unarmed: processes already there are spared only once the agent has
        // killed those that entered while no agent ran, and armed it.
        // An empty slot, or the bare bit the agent writes at start (so that an older
        // program, which names only an empty slot, names nothing).
        let slot = AGENT.get(cgroup_slot).copied().unwrap_or(0);
        if slot == 0 || slot == agent_slots::UNARMED {
            let unarmed = cgroup_id | agent_slots::UNARMED;
            let _ = AGENT.set(cgroup_slot, &unarmed, 0);
        }
        return;
    }
    // Unarmed, it matches no cgroup; once a doom was lost, the cgroup spares nobody.
    let agent_cgroup = AGENT.get(cgroup_slot).copied().unwrap_or(0);
    let in_agent_cgroup = cgroup_id == agent_cgroup && lineage::all_dooms_held();
    // One moved into the agent's cgroup by a process of the scope is doomed, not spared;
    // so is one the kernel could not follow (it may have left the scope unjudged).
    let doomed = lineage::is_doomed(tgid);
    if (in_agent_cgroup || current_is_live_broker()) && !doomed {
        return;
    }
    if doomed {
        // SAFETY: the signal goes to the calling process.
        unsafe { bpf_send_signal(SIGKILL) };
        report_kill(Hook::Bpf, cgroup_id);
        return;
    }
    kill_judged_caller(Hook::Bpf);
}

/// Whether `cgroup_id` is the running agent's cgroup, armed or not; never while no agent
/// runs, or before its first `bpf()` call named its cgroup.
#[inline(always)]
pub fn is_running_agent_cgroup(cgroup_id: u64) -> bool {
    // Slot keys on the stack: a reference to a constant would be read from `.rodata`.
    let (tgid_slot, cgroup_slot) = (agent_slots::TGID, agent_slots::CGROUP);
    if AGENT.get(tgid_slot).copied().unwrap_or(0) == 0 {
        return false;
    }
    let named = AGENT.get(cgroup_slot).copied().unwrap_or(0) & !agent_slots::UNARMED;
    named != 0 && named == cgroup_id
}

/// Whether the calling process is a live broker (the agent is one): spared where the
/// agent's cgroup is, so that a rewritten `SEB_AGENT` alone does not kill the agent at
/// its next call, before its check writes the entry back.
#[inline(always)]
pub fn current_is_live_broker() -> bool {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: the value is only tested for presence.
    unsafe { BROKER_PROCESSES.get(&tgid) }.is_some()
}

/// Whether `tgid` is the running agent.
#[inline(always)]
pub fn is_running_agent(tgid: u32) -> bool {
    let tgid_slot = agent_slots::TGID;
    AGENT.get(tgid_slot).copied().is_some_and(|agent| agent != 0 && agent == u64::from(tgid))
}

/// The agent's process ended: no agent runs until the next one enters itself.
#[inline(always)]
pub fn forget_agent(tgid: u32) {
    let (tgid_slot, cgroup_slot) = (agent_slots::TGID, agent_slots::CGROUP);
    if AGENT.get(tgid_slot).copied() == Some(u64::from(tgid)) {
        // A value on the stack, not a constant in `.rodata`.
        let none: u64 = 0;
        let _ = AGENT.set(cgroup_slot, &none, 0);
        let _ = AGENT.set(tgid_slot, &none, 0);
    }
}

/// Decision at a write to descriptor `fd` (`write`, `pwrite64`, `writev`, `pwritev`,
/// `pwritev2`); see `judge_write_to`.
#[inline(always)]
pub fn judge_write(fd: u64) {
    // Nearly every write on the node is by a process outside the scope: one map lookup,
    // not the several reads that find the file.
    if lineage::current_may_be_judged() {
        judge_write_to(task::current_fd_sink(fd));
    }
}

/// Decision at a write to `sink`: to another process's memory (procfs `mem`), as
/// `judge_process_access`; to a packet device, as `judge_tun_device`: a macvtap or
/// ipvtap device is opened and written without any `ioctl`, and a tun descriptor may
/// have been made outside the scope.
#[inline(always)]
pub fn judge_write_to(sink: Option<task::Sink>) {
    match sink {
        Some(task::Sink::ProcessMemory | task::Sink::Unknown) => judge_process_access(),
        Some(task::Sink::PacketDevice) => judge_tun_device(),
        None => {}
    }
}

/// `ioctl(TUNSETIFF)`: makes a tun/tap device or attaches to one.
pub const TUNSETIFF: u32 = 0x4004_54ca;

/// Decision at `ioctl(TUNSETIFF)` and at a write to a packet device: a process of the
/// scope is killed before the call returns. What it would write to a tun device enters
/// the stack as a received packet, which no egress hook sees, and is delivered locally or
/// forwarded; what it writes to a macvtap or ipvtap device leaves through the device
/// under it.
#[inline(always)]
pub fn judge_tun_device() {
    kill_judged_caller(Hook::TunDevice);
}

/// `bpf_cgroup_dev_ctx.access_type`'s low half for a character device.
const BPF_DEVCG_DEV_CHAR: u32 = 2;

/// Decision at an open or `mknod` of a device by a task of an enforced cgroup (a cgroup
/// device program, which can refuse): a packet device (tun/tap, vhost-net, macvtap,
/// ipvtap, VFIO, RDMA verbs, vhost-vdpa: `task::is_packet_device`) is refused with EPERM
/// for a judged task, and recorded. Refused at the open, no
/// descriptor of it reaches the scope, so no write, aio or io_uring request can follow. A
/// scoped process outside the enforced cgroups meets the `TUNSETIFF` and write checks
/// instead.
#[inline(always)]
pub fn judge_device(ctx: &DeviceContext) -> i32 {
    // SAFETY: the context the kernel passes a cgroup device program.
    let (access, major, minor) = unsafe { ((*ctx.device).access_type, (*ctx.device).major, (*ctx.device).minor) };
    if access & 0xffff != BPF_DEVCG_DEV_CHAR || !task::is_packet_device(major << 20 | minor) {
        return ALLOW;
    }
    if !current_task_is_judged() {
        return ALLOW;
    }
    let mut device = Destination::v4([0; 4], 0, 0);
    device.family = FAMILY_DEVICE;
    device.addr[..4].copy_from_slice(&major.to_ne_bytes());
    device.addr[4..8].copy_from_slice(&minor.to_ne_bytes());
    // SAFETY: plain helper call.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let report_to = Report::current_task();
    report_to.send(&device, Hook::TunDevice, cgroup_id, cgroup_id, true);
    DENY
}

/// Kill the calling process if it is judged, with a record naming `hook`.
#[inline(always)]
fn kill_judged_caller(hook: Hook) {
    if current_task_is_judged() {
        // SAFETY: the signal goes to the calling process.
        unsafe { bpf_send_signal(SIGKILL) };
        // SAFETY: plain helper call.
        report_kill(hook, unsafe { bpf_get_current_cgroup_id() });
    }
}

/// System call numbers (x86_64, then i386; io_uring's and `pidfd_getfd`'s are the same in
/// both tables), and where their arguments sit in `struct pt_regs`.
const NR_SOCKET: i64 = 41;
const IA32_SOCKETCALL: i64 = 102;
const IA32_SOCKET: i64 = 359;
const NR_IO_URING_SETUP: i64 = 425;
const NR_IO_URING_ENTER: i64 = 426;
const NR_PTRACE: i64 = 101;
const IA32_PTRACE: i64 = 26;
const NR_PROCESS_VM_WRITEV: i64 = 311;
const IA32_PROCESS_VM_WRITEV: i64 = 348;
const NR_PIDFD_GETFD: i64 = 438;
const NR_BPF: i64 = 321;
const IA32_BPF: i64 = 357;
const NR_IOCTL: i64 = 16;
const IA32_IOCTL: i64 = 54;
/// `write`, `pwrite64`, `writev`, `pwritev`, `pwritev2`: the descriptor is the first
/// argument of each.
const NR_WRITE: i64 = 1;
const NR_PWRITE64: i64 = 18;
const NR_WRITEV: i64 = 20;
const NR_PWRITEV: i64 = 296;
const NR_PWRITEV2: i64 = 328;
const IA32_WRITE: i64 = 4;
const IA32_PWRITE64: i64 = 181;
const IA32_WRITEV: i64 = 146;
const IA32_PWRITEV: i64 = 334;
const IA32_PWRITEV2: i64 = 379;
/// `socketcall()`'s `SYS_SOCKET`.
const SOCKETCALL_SOCKET: u32 = 1;
const PT_REGS_BX: usize = 40;
const PT_REGS_CX: usize = 88;
const PT_REGS_SI: usize = 104;
const PT_REGS_DI: usize = 112;

/// Whether `id`, in either table, may make a socket, submit io_uring work, reach into
/// another process (a write may be to its memory) or make a tun device: the only test
/// most system calls meet.
#[inline(always)]
pub fn is_watched_call(id: i64) -> bool {
    is_write_call(id, false) || is_write_call(id, true) || is_other_watched_call(id)
}

/// A write in the table the task uses (`compat`: i386).
#[inline(always)]
fn is_write_call(id: i64, compat: bool) -> bool {
    if compat {
        id == IA32_WRITE || id == IA32_PWRITE64 || id == IA32_WRITEV || id == IA32_PWRITEV || id == IA32_PWRITEV2
    } else {
        id == NR_WRITE || id == NR_PWRITE64 || id == NR_WRITEV || id == NR_PWRITEV || id == NR_PWRITEV2
    }
}

/// The watched calls that are not writes.
#[inline(always)]
fn is_other_watched_call(id: i64) -> bool {
    id == NR_SOCKET
        || id == IA32_SOCKETCALL
        || id == IA32_SOCKET
        || id == NR_IO_URING_SETUP
        || id == NR_IO_URING_ENTER
        || id == NR_PTRACE
        || id == IA32_PTRACE
        || id == NR_PROCESS_VM_WRITEV
        || id == IA32_PROCESS_VM_WRITEV
        || id == NR_PIDFD_GETFD
        || id == NR_IOCTL
        || id == IA32_IOCTL
        || id == NR_BPF
        || id == IA32_BPF
}

/// A system call that `is_watched_call`, from either table: the decisions the syscall
/// tracepoints make for `socket()`, io_uring, `ptrace()`, `process_vm_writev()`,
/// `pidfd_getfd()`, `ioctl()` and `bpf()`.
#[inline(always)]
pub fn judge_sys_enter(id: i64, regs: *const u8) -> i32 {
    if id == NR_IO_URING_SETUP || id == NR_IO_URING_ENTER {
        lineage::kill_if_escaped();
        return 0;
    }
    if id == NR_PIDFD_GETFD {
        judge_process_access();
        return 0;
    }
    if (id == NR_IOCTL || id == IA32_IOCTL) && !tunsetiff_in_either_table(regs) {
        // Nearly every ioctl on the node ends here, before the table is looked up.
        return 0;
    }
    if (is_write_call(id, false) || is_write_call(id, true)) && !lineage::current_may_be_judged() {
        // So does nearly every write, whichever table it came through.
        return 0;
    }
    // The same number means another call in the other table (41 is i386 `dup`, 102 is
    // x86_64 `getuid`, 26 x86_64 `msync`, 101 i386 `ioperm`, 311 i386 `set_robust_list`,
    // 16 i386 `lchown`, 54 x86_64 `setsockopt`, 321 i386 `signalfd`).
    let compat = task::current_syscall_is_compat();
    if id == if compat { IA32_BPF } else { NR_BPF } {
        judge_bpf_call();
        return 0;
    }
    // SAFETY: `regs` is the kernel's BTF-typed `struct pt_regs *`; the verifier checks
    // each load against its layout.
    let (first, second) = unsafe {
        if compat {
            (*(regs.add(PT_REGS_BX) as *const u64), *(regs.add(PT_REGS_CX) as *const u64))
        } else {
            (*(regs.add(PT_REGS_DI) as *const u64), *(regs.add(PT_REGS_SI) as *const u64))
        }
    };
    if id == if compat { IA32_PTRACE } else { NR_PTRACE } {
        // A 32-bit call's argument is the register's low half: the kernel ignores the rest.
        if ptrace_attaches(if compat { first as u32 as u64 } else { first }) {
            judge_process_access();
        }
        return 0;
    }
    if id == if compat { IA32_PROCESS_VM_WRITEV } else { NR_PROCESS_VM_WRITEV } {
        judge_process_access();
        return 0;
    }
    if is_write_call(id, compat) {
        // The kernel reads the descriptor's low 32 bits in either table (an `unsigned int`,
        // or an `int` in the vectored calls); the caller passed the scope test.
        judge_write_to(task::current_fd_sink(first as u32 as u64));
        return 0;
    }
    if id == if compat { IA32_IOCTL } else { NR_IOCTL } {
        // The request is 32 bits in either table.
        if second as u32 == TUNSETIFF {
            judge_tun_device();
        }
        return 0;
    }
    let socket_call = if compat { id == IA32_SOCKET || id == IA32_SOCKETCALL } else { id == NR_SOCKET };
    if !socket_call {
        return 0;
    }
    if id == IA32_SOCKETCALL && first as u32 != SOCKETCALL_SOCKET {
        return 0;
    }
    if lineage::kill_if_escaped() {
        return 0;
    }
    if id != IA32_SOCKETCALL {
        return judge_socket_call(first as u32, second as u32, false);
    }
    // socketcall(SYS_SOCKET, args): `args` points to (family, type, protocol) as 32-bit
    // words in the caller's memory, where another thread can change them after this
    // read. So a task in the scope is refused whatever they say; the read names the
    // family in the record.
    // SAFETY: a probing read of user memory; a bad address makes the helper fail.
    let [family, kind] = unsafe { bpf_probe_read_user((second as u32 as u64) as *const [u32; 2]) }.unwrap_or([0, 0]);
    judge_socket_call(family, kind, true)
}

/// Whether the request register of an `ioctl` in either table (rsi for x86_64, ecx for
/// i386) holds `TUNSETIFF`.
#[inline(always)]
fn tunsetiff_in_either_table(regs: *const u8) -> bool {
    // SAFETY: as in `judge_sys_enter`.
    let (native, compat) = unsafe { (*(regs.add(PT_REGS_SI) as *const u64), *(regs.add(PT_REGS_CX) as *const u64)) };
    native as u32 == TUNSETIFF || compat as u32 == TUNSETIFF
}

/// Decision for an egress packet: the caller is the socket's owner, since the packet
/// may leave from another task's context (softirq, a retransmit timer).
#[inline(always)]
pub fn judge_packet<C: EbpfContext>(
    ctx: &C,
    skb: *mut __sk_buff,
    dest: &Destination,
    hook: Hook,
    local_rule: bool,
) -> i32 {
    // Out through loopback, any address is local: what takes the packet is a listener
    // here, judged as at a local address.
    let looped = local_rule && crate::packet::leaves_through_loopback(skb);
    let local = match dest.entry() {
        Some(rules) if dest.covered_by(rules) => return refuse_packet(ctx, skb, dest, hook),
        Some(rules) if rules.local != 0 => rules.local,
        _ if looped => LOCAL_LOOPBACK,
        _ => 0,
    };
    if local_rule && local != 0 && local::packet_reaches_local_protected(ctx, dest, local, looped) {
        return refuse_packet(ctx, skb, dest, hook);
    }
    ALLOW
}

/// Drop and report a packet, unless its socket is a live broker's or exempt.
#[inline(always)]
pub fn refuse_packet<C: EbpfContext>(ctx: &C, skb: *mut __sk_buff, dest: &Destination, hook: Hook) -> i32 {
    // SAFETY: helpers valid in cgroup_skb programs, on this program's own skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The socket's cgroup is exempt and so was its creator when it made it.
    if is_live_broker_socket(cookie, None) || (socket_cgroup_is_exempt(skb) && socket_is_exempt(cookie)) {
        return ALLOW;
    }
    report_dropped(cookie, skb, dest, hook)
}

/// Decision for a packet of an established TCP connection to `dest`: connect4/6 let it
/// through, unless it was opened before seb watched its cgroup or protected `dest`. A
/// live broker's passes, and so does one whose socket was made in an exempt cgroup
/// (`EXEMPT_SOCKETS` knows only those made since seb ran; a socket made in the scope
/// and then carried into an exempt cgroup keeps its own cgroup, and is refused).
#[inline(always)]
pub fn judge_established<C: EbpfContext>(ctx: &C, skb: *mut __sk_buff, dest: &Destination, hook: Hook) -> i32 {
    if !dest.is_protected() {
        return ALLOW;
    }
    // SAFETY: helper valid in cgroup_skb programs, on this program's own skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if is_live_broker_socket(cookie, None) || socket_cgroup_is_exempt(skb) {
        return ALLOW;
    }
    report_dropped(cookie, skb, dest, hook)
}

/// Report a dropped packet of socket `cookie`, as its owner's.
#[inline(always)]
fn report_dropped(cookie: u64, skb: *mut __sk_buff, dest: &Destination, hook: Hook) -> i32 {
    // SAFETY: helpers valid in cgroup_skb programs, on this program's own skb.
    let (uid, cgroup_id) = unsafe { (bpf_get_socket_uid(skb) as u64, bpf_skb_cgroup_id(skb)) };
    Report { cookie, pid_tgid: 0, uid_gid: uid | (uid << 32) }.send(dest, hook, 0, cgroup_id, false);
    DENY
}

/// Decision for a packet of a TCP or UDP socket: dropped only if the broker cut the
/// socket (its decision was revoked while the connection was open).
#[inline(always)]
pub fn judge_cut(ctx: &aya_ebpf::programs::SkBuffContext, skb: *mut __sk_buff) -> i32 {
    if CUT_PENDING.get(0).copied().unwrap_or(1) == 0 {
        return ALLOW;
    }
    // SAFETY: helper valid in cgroup_skb programs, on this program's own skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is only tested for presence.
    if unsafe { CUT_SOCKETS.get(&cookie) }.is_none() {
        return ALLOW;
    }
    let dest = crate::packet::destination(ctx).unwrap_or(Destination::v4([0; 4], 0, 0));
    let hook = if dest.family == FAMILY_V4 { Hook::Egress4 } else { Hook::Egress6 };
    let (uid, cgroup_id) = unsafe { (bpf_get_socket_uid(skb) as u64, bpf_skb_cgroup_id(skb)) };
    Report { cookie, pid_tgid: 0, uid_gid: uid | (uid << 32) }.send(&dest, hook, 0, cgroup_id, false);
    DENY
}

/// A socket registered by a broker process that is still alive (its generation still
/// in `BROKER_PROCESSES`). With `tgid`, the caller must also be the registering
/// process, so a child holding an inherited fd is refused.
#[inline(always)]
fn is_live_broker_socket(cookie: u64, tgid: Option<u32>) -> bool {
    // SAFETY: the values are only read, and only within this program run.
    let Some(registered) = (unsafe { BROKER_SOCKETS.get(&cookie) }) else { return false };
    if tgid.is_some_and(|tgid| registered.tgid != tgid) {
        return false;
    }
    // SAFETY: as above.
    match unsafe { BROKER_PROCESSES.get(&registered.tgid) } {
        Some(generation) => *generation == registered.generation,
        None => false,
    }
}

/// Whether the socket was created in an exempt cgroup: an exemption covers a socket
/// and a task only together, so neither a socket handed to an exempt process nor a
/// process moved into an exempt cgroup with its socket gets through.
#[inline(always)]
fn socket_is_exempt(cookie: u64) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { EXEMPT_SOCKETS.get(&cookie) }.is_some()
}

/// Whether the caller's cgroup, or one of its ancestors, is exempt. `ancestor(level)`
/// gives the id at that depth, 0 past the cgroup itself.
#[inline(always)]
fn is_exempt(ancestor: impl Fn(i32) -> u64) -> bool {
    any_ancestor_in(&EXEMPT_CGROUPS, ancestor)
}

/// Whether the caller's cgroup, or one of its ancestors, is enforced.
#[inline(always)]
pub fn current_task_in_scope() -> bool {
    // SAFETY: plain helper call.
    any_ancestor_in(&SCOPE_CGROUPS, |level| unsafe { bpf_get_current_ancestor_cgroup_id(level) })
}

/// Whether a cgroup on the path from the root (`ancestor(0)`) down to the cgroup itself
/// is in `set`.
#[inline(always)]
fn any_ancestor_in(set: &HashMap<u64, u8>, ancestor: impl Fn(i32) -> u64) -> bool {
    let mut level = 0;
    while level < MAX_CGROUP_DEPTH {
        let id = ancestor(level as i32);
        if id == 0 {
            return false;
        }
        // SAFETY: the value is only tested for presence.
        if unsafe { set.get(&id) }.is_some() {
            return true;
        }
        level += 1;
    }
    false
}

#[inline(always)]
pub fn current_task_is_exempt() -> bool {
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

/// Whether `cgroup` may put one more refusal, or with `kill` one more kill, in the ring
/// buffer this second: each within its own share, so that refusals spent first cannot
/// keep a kill unnamed. A kill past the rate still kills; only its record is counted
/// instead (one process making children that were killed at `socket(AF_PACKET)` filled
/// the ring while kills were not rated). The count is taken atomically; only at a
/// second's turn may CPUs racing to start it let a few more through.
#[inline(always)]
fn within_rate(cgroup: u64, kill: bool) -> bool {
    // SAFETY: plain helper call.
    let second = unsafe { bpf_ktime_get_boot_ns() } / 1_000_000_000;
    match DENIAL_RATE.get_ptr_mut(cgroup) {
        // SAFETY: the map's own value, shared by every CPU: the counts change atomically.
        Some(rate) => unsafe {
            if (*rate).second != second {
                (*rate).second = second;
                (*rate).sent = u32::from(!kill);
                (*rate).kills = u32::from(kill);
                return true;
            }
            let (count, bound) = match kill {
                true => (core::ptr::addr_of_mut!((*rate).kills), KILLS_PER_CGROUP_SECOND),
                false => (core::ptr::addr_of_mut!((*rate).sent), DENIALS_PER_CGROUP_SECOND),
            };
            // `core` has no atomic types for BPF; the add is the kernel's atomic `xadd`
            // (its old value unused, so no BPF_FETCH is needed), the read after it plain.
            core::intrinsics::atomic_xadd::<u32, u32, { core::intrinsics::AtomicOrdering::Relaxed }>(count, 1);
            count.read_volatile() <= bound
        },
        None => {
            // A full map forgets its least recently denied cgroup.
            let rate = DenialRate { second, sent: u32::from(!kill), kills: u32::from(kill) };
            let _ = DENIAL_RATE.insert(cgroup, rate, 0);
            true
        }
    }
}

/// `within_rate`; past it, the denial is counted (`DENIALS`, `OVER_RATE`) instead.
#[inline(always)]
fn within_rate_or_counted(cgroup: u64, kill: bool) -> bool {
    if within_rate(cgroup, kill) {
        return true;
    }
    bump(counters::DENIALS);
    bump(counters::OVER_RATE);
    false
}

/// Who a denial is reported for.
struct Report {
    cookie: u64,
    pid_tgid: u64,
    uid_gid: u64,
}

impl Report {
    /// For a decision in the calling task's context, about no socket.
    #[inline(always)]
    fn current_task() -> Self {
        Self { cookie: 0, pid_tgid: bpf_get_current_pid_tgid(), uid_gid: bpf_get_current_uid_gid() }
    }

    /// A refusal: put in the ring buffer within its cgroup's rate, else only counted.
    #[inline(always)]
    fn send(&self, dest: &Destination, hook: Hook, cgroup_id: u64, socket_cgroup_id: u64, task_context: bool) {
        // The judged cgroup; the caller's where the socket's could not be read.
        if !within_rate_or_counted(if socket_cgroup_id != 0 { socket_cgroup_id } else { cgroup_id }, false) {
            return;
        }
        self.write(dest, hook, cgroup_id, socket_cgroup_id, (0, 0), task_context);
    }

    #[inline(always)]
    fn send_socket(&self, dest: &Destination, family: u8, kind: u8, cgroup_id: u64) {
        if within_rate_or_counted(cgroup_id, true) {
            self.write(dest, Hook::SockCreate, cgroup_id, cgroup_id, (family, kind), true);
        }
    }

    #[inline(always)]
    fn send_kill(&self, hook: Hook, cgroup_id: u64, scoped_in: u64) {
        if !within_rate_or_counted(cgroup_id, true) {
            return;
        }
        let mut dest = Destination::v4([0; 4], 0, 0);
        dest.family = FAMILY_NONE;
        self.write(&dest, hook, cgroup_id, scoped_in, (0, 0), true);
    }

    /// Send a denial to the agent; a full ring buffer is counted, never silent.
    #[inline(always)]
    fn write(
        &self,
        dest: &Destination,
        hook: Hook,
        cgroup_id: u64,
        socket_cgroup_id: u64,
        (socket_family, socket_type): (u8, u8),
        task_context: bool,
    ) {
        bump(counters::DENIALS);
        let Some(mut entry) = DENIALS.reserve::<DenialEvent>(0) else {
            bump(counters::RING_DROPS);
            return;
        };
        let comm = if task_context { bpf_get_current_comm().unwrap_or([0; 16]) } else { [0; 16] };
        // SAFETY: plain helper call.
        let boot_ns = unsafe { bpf_ktime_get_boot_ns() };
        let event = entry.as_mut_ptr();
        // SAFETY: `event` is the reserved ring-buffer slot, written whole before submit;
        // the event is too large for the BPF stack, so it is built in place.
        unsafe {
            event.write_bytes(0, 1);
            (*event).boot_ns = boot_ns;
            (*event).pid_tgid = self.pid_tgid;
            (*event).uid_gid = self.uid_gid;
            (*event).cgroup_id = cgroup_id;
            (*event).socket_cgroup_id = socket_cgroup_id;
            (*event).socket_cookie = self.cookie;
            (*event).daddr = dest.addr;
            (*event).dport = dest.port.unwrap_or(0);
            (*event).family = dest.family;
            (*event).protocol = dest.protocol;
            (*event).hook = hook as u8;
            (*event).socket_family = socket_family;
            (*event).socket_type = socket_type;
            (*event).unspecified = dest.unspecified as u8;
            (*event).comm = comm;
            if task_context {
                task::write_current_exe(core::ptr::addr_of_mut!((*event).exe));
            }
        }
        entry.submit(0);
    }
}

/// Report the calling process killed: `scoped_in` is the cgroup it was scoped in.
#[inline(always)]
pub fn report_kill(hook: Hook, scoped_in: u64) {
    // SAFETY: plain helper call.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let report_to = Report::current_task();
    report_to.send_kill(hook, cgroup_id, scoped_in);
}
