//! Types shared by seb's eBPF programs (kernel side) and `seb-agent` (user side).
//!
//! Every type here is `#[repr(C)]` with explicit padding, so both sides agree on the
//! layout byte for byte. Changing a layout changes the pinned maps' value sizes: the
//! agent then refuses to adopt the old pins and says so.
#![no_std]

/// Names of the maps in the eBPF object; the agent opens them by these names and pins
/// them under `<pin_path>/maps/<NAME>`.
pub mod map_names {
    pub const PROTECTED_V4: &str = "SEB_PROTECTED_V4";
    pub const PROTECTED_V6: &str = "SEB_PROTECTED_V6";
    pub const BROKER_SOCKETS: &str = "SEB_BROKER_SOCKETS";
    pub const EXEMPT_CGROUPS: &str = "SEB_EXEMPT_CGROUPS";
    pub const DENIALS: &str = "SEB_DENIALS";
    pub const COUNTERS: &str = "SEB_COUNTERS";
    pub const CUT_SOCKETS: &str = "SEB_CUT_SOCKETS";
    pub const CUT_PENDING: &str = "SEB_CUT_PENDING";
    pub const BROKER_PROCESSES: &str = "SEB_BROKER_PROCESSES";
    pub const EXEMPT_SOCKETS: &str = "SEB_EXEMPT_SOCKETS";
    pub const SCOPE_CGROUPS: &str = "SEB_SCOPE_CGROUPS";
    pub const LOCAL_PROTECTED: &str = "SEB_LOCAL_PROTECTED";
    pub const SCOPED_TASKS: &str = "SEB_SCOPED_TASKS";
    pub const KERNEL_LAYOUT: &str = "SEB_KERNEL_LAYOUT";
    pub const DOOMED_TASKS: &str = "SEB_DOOMED_TASKS";
    pub const DOOMED_RINGS: &str = "SEB_DOOMED_RINGS";
    pub const UNFOLLOWED_SEEN: &str = "SEB_UNFOLLOWED_SEEN";
    pub const DEVICE_MAJORS: &str = "SEB_DEVICE_MAJORS";
    pub const AGENT: &str = "SEB_AGENT";
}

/// Slots of `SEB_AGENT`: the running agent, whose `bpf()` calls (and those of processes
/// in its cgroup) are its own business. Zero while no agent runs.
pub mod agent_slots {
    pub const TGID: u32 = 0;
    /// The agent's cgroup id, named by the kernel at the agent's first `bpf()` call with
    /// [`UNARMED`] set: moves into it are judged from then on, but its processes are
    /// spared only once the agent, having killed those that got there before it, clears
    /// the bit.
    pub const CGROUP: u32 = 1;
    pub const LEN: u32 = 2;
    /// Set in the cgroup slot until the agent arms it (cgroup ids never reach bit 63).
    pub const UNARMED: u64 = 1 << 63;
}

/// Values of `SEB_UNFOLLOWED_SEEN`: where the processes of the scope are tracked.
pub mod unfollowed {
    /// Every one in `SEB_SCOPED_TASKS`.
    pub const NONE: u32 = 0;
    /// Some only in `SEB_DOOMED_TASKS` (the first map was full).
    pub const SOME_DOOMED: u32 = 1;
    /// Some in neither (both were full, or the agent could not mark one at start).
    pub const SOME_UNMARKED: u32 = 2;
}

/// Slots of `SEB_DEVICE_MAJORS`: the character-device majors, on this node
/// (`/proc/devices`), of drivers whose devices send packets past the egress hooks
/// (macvtap, ipvtap, VFIO, RDMA verbs beyond the fixed ones, vhost-vdpa), 0 where the
/// kernel has none.
pub const DEVICE_MAJOR_SLOTS: u32 = 6;

/// The drivers of `SEB_DEVICE_MAJORS`'s slots, in order, as `/proc/devices` names them.
pub const DEVICE_MAJOR_DRIVERS: [&str; DEVICE_MAJOR_SLOTS as usize] =
    ["macvtap", "ipvtap", "vfio", "vfio-dev", "infiniband_verbs", "vhost-vdpa"];

/// RDMA verbs' fixed numbers (`IB_UVERBS_MAJOR`, minors from `IB_UVERBS_BASE_MINOR`, 32
/// devices; more get a dynamic major, named `infiniband_verbs` in `/proc/devices`). The
/// same major holds `umad`'s minors below, which carry no IP.
pub const UVERBS_MAJOR: u32 = 231;
pub const UVERBS_FIXED_MINORS: core::ops::Range<u32> = 192..224;

/// Capacity of the protected-endpoint tries (per address family).
pub const MAX_PROTECTED_PREFIXES: u32 = 65_536;
/// How many broker sockets may be registered at once.
pub const MAX_BROKER_SOCKETS: u32 = 16_384;
/// How many broker processes may hold registrations at once (the agent, and the tools
/// that register as it does in tests).
pub const MAX_BROKER_PROCESSES: u32 = 64;
/// Sockets created in exempt cgroups, remembered so that an exemption follows the
/// socket, not the task that happens to use it. Removed when the socket closes; a full
/// map exempts no new socket, which fails closed.
pub const MAX_EXEMPT_SOCKETS: u32 = 65_536;
/// Network namespaces with a protected endpoint on a local address.
pub const MAX_LOCAL_NAMESPACES: u32 = 64;
/// A local prefix only its own network namespace reaches (loopback).
pub const LOCAL_LOOPBACK: u8 = 1;
/// A local prefix other namespaces reach too, by routing (a node address).
pub const LOCAL_ROUTED: u8 = 2;
/// A local group address (broadcast, multicast): the kernel delivers what is sent there
/// to every socket on the port, so no one socket's address decides; reached from other
/// namespaces too.
pub const LOCAL_GROUP: u8 = 3;
/// `SEB_LOCAL_PROTECTED` key of the rules that hold for callers in any other network
/// namespace (no namespace has cookie 0).
pub const ANY_OTHER_NAMESPACE: u64 = 0;
/// Local address prefixes tracked per family.
/// How many cgroups may be enforced (the scope, and the pods selected in cluster mode).
pub const MAX_SCOPE_CGROUPS: u32 = 16_384;
/// How many cgroups may be exempted.
pub const MAX_EXEMPT_CGROUPS: u32 = 4_096;
/// Cgroup ancestry levels checked for an exemption (a cgroup v2 tree is rarely deeper).
pub const MAX_CGROUP_DEPTH: u32 = 16;
/// Processes that have been in the scope (created, exec'd or moved there), by tgid.
pub const MAX_SCOPED_TASKS: u32 = 65_536;
/// Scoped processes placed outside the scope by another process, killed at their next
/// system call.
pub const MAX_DOOMED_TASKS: u32 = 4_096;
/// io_uring rings that made a link-layer socket for the scope, remembered at once (least
/// recently used forgotten first; a ring is forgotten when its address is reused).
pub const MAX_DOOMED_RINGS: u32 = 4_096;

/// The executable's path is reported as up to this many path components, leaf first,
/// each truncated to `EXE_COMPONENT_LEN - 1` bytes.
pub const EXE_COMPONENTS: usize = 8;
pub const EXE_COMPONENT_LEN: usize = 48;

/// Byte offsets of the kernel structure fields the tracing programs read, indexes into
/// `SEB_KERNEL_LAYOUT`. The agent fills them from the running kernel's BTF before it
/// attaches anything; `VALID` is 1 once it has.
pub mod layout {
    pub const TASK_TGID: u32 = 0;
    pub const TASK_MM: u32 = 1;
    pub const TASK_CGROUPS: u32 = 2;
    pub const MM_EXE_FILE: u32 = 3;
    /// `file.f_path.dentry`
    pub const FILE_DENTRY: u32 = 4;
    /// `dentry.d_name.name`
    pub const DENTRY_NAME: u32 = 5;
    pub const DENTRY_PARENT: u32 = 6;
    /// `css_set.dfl_cgrp`
    pub const CSS_SET_DFL_CGROUP: u32 = 7;
    pub const CGROUP_LEVEL: u32 = 8;
    pub const CGROUP_ANCESTORS: u32 = 9;
    pub const CGROUP_KN: u32 = 10;
    pub const KERNFS_NODE_ID: u32 = 11;
    pub const VALID: u32 = 12;
    /// `task_struct.thread_info.status` (x86_64: `TS_COMPAT` marks a 32-bit system call);
    /// `u32::MAX` where the architecture has none.
    pub const TASK_THREAD_STATUS: u32 = 13;
    /// `bpf_sock_addr_kern.sk`: the socket behind a sock_addr program's context.
    pub const SOCK_ADDR_KERN_SK: u32 = 14;
    /// `sock.sk_cgrp_data.cgroup`: the cgroup a socket was made in.
    pub const SOCK_CGROUP: u32 = 15;
    /// `io_kiocb.opcode`; this and the next two are `u32::MAX` on a kernel without
    /// io_uring.
    pub const IO_KIOCB_OPCODE: u32 = 16;
    /// `io_kiocb.cmd` + `io_socket.domain`: the family an `IORING_OP_SOCKET` asks for.
    pub const IO_SOCKET_DOMAIN: u32 = 17;
    /// `io_kiocb.cmd` + `io_socket.type`.
    pub const IO_SOCKET_TYPE: u32 = 18;
    pub const TASK_SIGNAL: u32 = 19;
    /// `signal_struct.live`: the threads of a process not yet exiting.
    pub const SIGNAL_LIVE: u32 = 20;
    /// `task_struct.files`: a process's descriptor table, shared by `CLONE_FILES`.
    pub const TASK_FILES: u32 = 21;
    /// `files_struct.fdt`, `fdtable.max_fds`, `fdtable.fd`: from a descriptor to its file.
    pub const FILES_FDT: u32 = 22;
    pub const FDTABLE_MAX_FDS: u32 = 23;
    pub const FDTABLE_FD: u32 = 24;
    /// `dentry.d_sb` and `super_block.s_magic`: which filesystem a file is on.
    pub const DENTRY_SB: u32 = 25;
    pub const SUPER_MAGIC: u32 = 26;
    /// `io_kiocb.flags`, `io_kiocb.cqe.fd` (the descriptor or fixed-file index until the
    /// request completes) and `io_kiocb.ctx`: which file an io_uring request names.
    /// These and the next three are `u32::MAX` where the kernel lacks them.
    pub const IO_KIOCB_FLAGS: u32 = 27;
    pub const IO_KIOCB_FD: u32 = 28;
    pub const IO_KIOCB_CTX: u32 = 29;
    /// `io_ring_ctx.file_table.data.{nr,nodes}`: a ring's fixed files (kernel 6.13 on).
    pub const IO_CTX_FILES_NR: u32 = 30;
    pub const IO_CTX_FILES_NODES: u32 = 31;
    /// `io_rsrc_node.file_ptr`: a fixed file, its two low bits flags.
    pub const IO_RSRC_NODE_FILE: u32 = 32;
    /// `file.f_inode`, `inode.i_mode` and `inode.i_rdev`: which device a file is.
    pub const FILE_INODE: u32 = 33;
    pub const INODE_MODE: u32 = 34;
    pub const INODE_RDEV: u32 = 35;
    /// `io_ring_ctx.submit_state.link.head`: set while a ring submits a chain of linked
    /// requests, whose later members are issued after the earlier complete.
    pub const IO_CTX_LINK_HEAD: u32 = 36;
    /// `cgroup.root`: the hierarchy a cgroup belongs to (v1 controllers beside v2).
    pub const CGROUP_ROOT: u32 = 37;
    pub const LEN: u32 = 38;
}
/// Size of the denial ring buffer in bytes (a power of two, a multiple of the page size).
pub const DENIAL_RING_BYTES: u32 = 1 << 20;

/// Refusals (not kills) of one cgroup the kernel puts in the ring buffer per second;
/// the rest are only counted (`counters::OVER_RATE`), so one flooding cgroup cannot
/// fill the ring (about 2,200 events) that every other cgroup's denials and kills share.
/// Above the recorder's per-cgroup budget, which decides what is recorded in full.
pub const DENIALS_PER_CGROUP_SECOND: u32 = 256;
/// Kills of one cgroup a second put in the ring buffer, counted apart from its refusals:
/// a process that first spends its cgroup's refusals is still named when it is killed.
pub const KILLS_PER_CGROUP_SECOND: u32 = 64;
/// Cgroups whose rate the kernel follows at once (least recently denied forgotten first).
pub const MAX_RATED_CGROUPS: u32 = 4_096;

/// A cgroup's refusals and kills in the current second, in `SEB_DENIAL_RATE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DenialRate {
    /// Boot time in whole seconds.
    pub second: u64,
    pub sent: u32,
    pub kills: u32,
}

/// Port/protocol rules attached to one prefix in a protected-endpoint trie.
pub const MAX_RULES_PER_PREFIX: usize = 8;

/// `PortRule::port` value meaning "every port".
pub const ANY_PORT: u16 = 0;
/// `PortRule::protocol` value meaning "every IP protocol" (TCP, UDP, raw, ...).
pub const ANY_PROTOCOL: u8 = 0;

/// One (protocol, port) pair protected for a prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRule {
    /// Destination port in host byte order; `ANY_PORT` matches all.
    pub port: u16,
    /// IP protocol number (6 TCP, 17 UDP, ...); `ANY_PROTOCOL` matches all.
    pub protocol: u8,
    pub _pad: u8,
}

impl PortRule {
    #[inline(always)]
    pub fn matches(&self, protocol: u8, port: u16) -> bool {
        (self.protocol == ANY_PROTOCOL || self.protocol == protocol) && (self.port == ANY_PORT || self.port == port)
    }
}

/// Value of a protected-endpoint trie entry.
///
/// The agent stores in each prefix the rules of every configured prefix that covers it,
/// so the longest-prefix match alone decides: one trie lookup per packet or connect.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointRules {
    pub count: u8,
    /// Non-zero when the prefix is an address local to the agent's network namespace
    /// while a protected endpoint is local there too: a wildcard listener may answer.
    /// [`LOCAL_LOOPBACK`], [`LOCAL_ROUTED`] or [`LOCAL_GROUP`].
    pub local: u8,
    pub _pad: [u8; 2],
    pub rules: [PortRule; MAX_RULES_PER_PREFIX],
}

impl EndpointRules {
    #[inline(always)]
    pub fn matches(&self, protocol: u8, port: u16) -> bool {
        let mut i = 0;
        while i < MAX_RULES_PER_PREFIX {
            if i >= self.count as usize {
                return false;
            }
            if self.rules[i].matches(protocol, port) {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Whether any rule applies to `protocol` when the packet does not show a port (a
    /// later fragment, a transport without ports). `ANY_PROTOCOL` here means the
    /// protocol itself is unknown (IPv6 extension headers): every rule applies.
    #[inline(always)]
    pub fn matches_protocol(&self, protocol: u8) -> bool {
        let mut i = 0;
        while i < MAX_RULES_PER_PREFIX {
            if i >= self.count as usize {
                return false;
            }
            let rule = self.rules[i];
            if protocol == ANY_PROTOCOL || rule.protocol == ANY_PROTOCOL || rule.protocol == protocol {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Value of a broker-socket registration, keyed by the socket cookie (`SO_COOKIE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BrokerSocket {
    /// Thread-group id of the broker that registered the socket. Connects through the
    /// socket from any other process (a forked child holding an inherited fd) are denied.
    pub tgid: u32,
    pub _pad: u32,
    /// The registering process's generation in `SEB_BROKER_PROCESSES`. The kernel drops
    /// that entry when the process exits, so the registration dies with it, even if a
    /// later process gets the same PID and holds a duplicate of the socket.
    pub generation: u64,
}

/// Which hook denied a connection.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Connect4 = 1,
    Connect6 = 2,
    Sendmsg4 = 3,
    Sendmsg6 = 4,
    Egress4 = 5,
    Egress6 = 6,
    /// A `socket()` call for a family that bypasses the IP hooks (`AF_PACKET`, `AF_XDP`):
    /// the caller was killed before the call returned.
    SockCreate = 7,
    /// A process that had been in the scope moved itself out of it (or into an exempt
    /// cgroup), or moved another such process out.
    Migrate = 8,
    /// A process of the scope the kernel could not follow (`SEB_SCOPED_TASKS` was full),
    /// killed at its first `socket()` or io_uring call.
    Unfollowed = 9,
    /// A process of the scope that took another process's descriptor (`pidfd_getfd`),
    /// attached to one (`ptrace`) or wrote into its memory (`process_vm_writev`).
    ProcessAccess = 10,
    /// A process of the scope that made another process sharing its descriptor table
    /// (`CLONE_FILES` without `CLONE_THREAD`); the other is killed at its first socket call.
    SharedDescriptors = 11,
    /// A process of the scope that made or attached to a tun/tap device (`TUNSETIFF`),
    /// wrote to a packet device (tun/tap, macvtap, ipvtap) or opened one: what it writes
    /// there enters the stack as received, or leaves below it, past every egress hook.
    TunDevice = 12,
    /// A process of the scope that made a `bpf()` call: with CAP_BPF it could edit seb's
    /// maps or detach its links (this kernel loads no BPF-LSM program to refuse that).
    Bpf = 13,
}

impl Hook {
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Connect4,
            2 => Self::Connect6,
            3 => Self::Sendmsg4,
            4 => Self::Sendmsg6,
            5 => Self::Egress4,
            6 => Self::Egress6,
            7 => Self::SockCreate,
            8 => Self::Migrate,
            9 => Self::Unfollowed,
            10 => Self::ProcessAccess,
            11 => Self::SharedDescriptors,
            12 => Self::TunDevice,
            13 => Self::Bpf,
            _ => return None,
        })
    }

    /// The name used in audit records and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Connect4 => "connect4",
            Self::Connect6 => "connect6",
            Self::Sendmsg4 => "sendmsg4",
            Self::Sendmsg6 => "sendmsg6",
            Self::Egress4 => "egress4",
            Self::Egress6 => "egress6",
            Self::SockCreate => "socket_syscall",
            Self::Migrate => "cgroup_migration",
            Self::Unfollowed => "scope_table_full",
            Self::ProcessAccess => "process_access",
            Self::SharedDescriptors => "shared_descriptors",
            Self::TunDevice => "tun_device",
            Self::Bpf => "bpf_syscall",
        }
    }
}

/// `DenialEvent::family` for IPv4 destinations (including IPv4-mapped IPv6 ones).
pub const FAMILY_V4: u8 = 4;
/// `DenialEvent::family` for IPv6 destinations.
pub const FAMILY_V6: u8 = 6;
/// `DenialEvent::family` for a socket creation denial (no destination).
pub const FAMILY_NONE: u8 = 0;
/// `DenialEvent::family` for a refused open (or `mknod`) of a character device: `daddr`
/// holds its major, then its minor, as native-endian 32-bit words.
pub const FAMILY_DEVICE: u8 = 1;

/// Socket families that emit frames without passing the IP stack's hooks: denied at
/// socket creation in the enforced scope.
pub const AF_PACKET: u32 = 17;
pub const AF_XDP: u32 = 44;

/// One kernel denial, sent to the agent through the `SEB_DENIALS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DenialEvent {
    /// `bpf_ktime_get_boot_ns()` at the denial.
    pub boot_ns: u64,
    /// `bpf_get_current_pid_tgid()`; zero where the hook has no task context (egress).
    pub pid_tgid: u64,
    /// `bpf_get_current_uid_gid()`, or the socket owner's uid on egress.
    pub uid_gid: u64,
    /// Cgroup v2 id of the calling task; zero where the hook has no task context (egress).
    pub cgroup_id: u64,
    /// Cgroup v2 id of the socket: the cgroup whose programs judged it. It differs from
    /// the task's when the task moved, or was handed the socket, after creating it.
    pub socket_cgroup_id: u64,
    pub socket_cookie: u64,
    /// Destination address, network byte order; IPv4 in the first four bytes.
    pub daddr: [u8; 16],
    /// Destination port in host byte order (0 where the protocol has none).
    pub dport: u16,
    pub family: u8,
    pub protocol: u8,
    /// A `Hook` value.
    pub hook: u8,
    /// For `Hook::SockCreate`: the socket's family and type (`AF_PACKET`, `SOCK_RAW`).
    pub socket_family: u8,
    pub socket_type: u8,
    /// 1 when the caller asked for the unspecified address (`0.0.0.0`, `::`) and
    /// `daddr` is the local address the kernel would have connected it to.
    pub unspecified: u8,
    pub comm: [u8; 16],
    /// The caller's executable as the kernel knew it at the denial: path components of
    /// `mm->exe_file` within its filesystem, leaf first, each NUL-terminated; empty
    /// where there is no task context (a packet) or no executable (a kernel thread).
    pub exe: [[u8; EXE_COMPONENT_LEN]; EXE_COMPONENTS],
}

/// Indexes into the per-CPU `SEB_COUNTERS` array.
pub mod counters {
    /// Denials that could not be written to the ring buffer (it was full).
    pub const RING_DROPS: u32 = 0;
    /// All denials, delivered or not.
    pub const DENIALS: u32 = 1;
    /// Refusals not put in the ring buffer: their cgroup was past its rate
    /// ([`super::DENIALS_PER_CGROUP_SECOND`]).
    pub const OVER_RATE: u32 = 2;
    pub const LEN: u32 = 3;
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain-old-data, `#[repr(C)]` with explicit padding and no pointers.
    unsafe impl aya::Pod for PortRule {}
    unsafe impl aya::Pod for EndpointRules {}
    unsafe impl aya::Pod for BrokerSocket {}
    unsafe impl aya::Pod for DenialEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_protocol_and_port_wildcards() {
        let mut rules = EndpointRules::default();
        rules.rules[0] = PortRule { port: 443, protocol: 6, _pad: 0 };
        rules.rules[1] = PortRule { port: ANY_PORT, protocol: 17, _pad: 0 };
        rules.count = 2;
        assert!(rules.matches(6, 443));
        assert!(!rules.matches(6, 80));
        assert!(rules.matches(17, 53));
        assert!(!rules.matches(1, 0));
        rules.rules[2] = PortRule { port: ANY_PORT, protocol: ANY_PROTOCOL, _pad: 0 };
        rules.count = 3;
        assert!(rules.matches(1, 0));
    }

    #[test]
    fn unknown_port_matches_every_rule_of_the_protocol() {
        let mut rules = EndpointRules::default();
        rules.rules[0] = PortRule { port: 443, protocol: 6, _pad: 0 };
        rules.count = 1;
        assert!(rules.matches_protocol(6));
        assert!(!rules.matches_protocol(17));
        assert!(rules.matches_protocol(ANY_PROTOCOL), "an unknown protocol fails closed");
    }

    #[test]
    fn rules_beyond_count_are_ignored() {
        let mut rules = EndpointRules::default();
        rules.rules[1] = PortRule { port: 443, protocol: 6, _pad: 0 };
        rules.count = 1; // rules[0] is the zero rule "any/any"...
        assert!(rules.matches(6, 443));
        rules.count = 0; // ...and with count 0 nothing matches
        assert!(!rules.matches(6, 443));
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<PortRule>(), 4);
        assert_eq!(core::mem::size_of::<EndpointRules>(), 4 + 4 * MAX_RULES_PER_PREFIX);
        assert_eq!(core::mem::size_of::<BrokerSocket>(), 16);
        assert_eq!(
            core::mem::size_of::<DenialEvent>(),
            8 * 6 + 16 + 2 + 1 + 1 + 1 + 3 + 16 + EXE_COMPONENTS * EXE_COMPONENT_LEN
        );
    }
}
