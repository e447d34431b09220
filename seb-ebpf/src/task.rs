//! Reads of kernel structures the helpers do not expose: another task's tgid and cgroup,
//! and the executable of the current task. Field offsets come from the running kernel's
//! BTF, written by the agent into `SEB_KERNEL_LAYOUT` before it attaches anything, so
//! one object serves every kernel build.

use aya_ebpf::helpers::{
    bpf_probe_read_kernel,
    generated::{bpf_get_current_task, bpf_probe_read_kernel_str},
};
use seb_common::{
    DEVICE_MAJOR_SLOTS, EXE_COMPONENT_LEN, EXE_COMPONENTS, MAX_CGROUP_DEPTH, UVERBS_FIXED_MINORS, UVERBS_MAJOR, layout,
};

use crate::{DEVICE_MAJORS, KERNEL_LAYOUT};

/// The offset of a field, or `None` until the agent has filled the layout.
#[inline(always)]
fn offset(field: u32) -> Option<u64> {
    let valid = KERNEL_LAYOUT.get(layout::VALID).copied().unwrap_or(0);
    if valid != 1 {
        return None;
    }
    KERNEL_LAYOUT.get(field).map(|offset| *offset as u64)
}

/// Read a pointer-sized or smaller value at `base + offset(field)`.
#[inline(always)]
fn read<T: Copy>(base: u64, field: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    let at = base + offset(field)?;
    // SAFETY: a probing read; a bad address makes the helper fail, never fault.
    unsafe { bpf_probe_read_kernel(at as *const T) }.ok()
}

/// The tgid of a `struct task_struct *`.
#[inline(always)]
pub fn tgid(task: u64) -> Option<u32> {
    read::<i32>(task, layout::TASK_TGID).map(|tgid| tgid as u32)
}

/// A task's descriptor table (`files_struct *`).
#[inline(always)]
pub fn files(task: u64) -> Option<u64> {
    read::<u64>(task, layout::TASK_FILES).filter(|files| *files != 0)
}

/// procfs's `s_magic`.
const PROC_SUPER_MAGIC: u64 = 0x9fa0;
/// "mem" and its NUL as one word, compared as an immediate.
const MEM_NAME: u32 = u32::from_le_bytes(*b"mem\0");

/// What a write from the scope must not reach.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// Another process's memory (`/proc/<pid>/mem`).
    ProcessMemory,
    /// A tun/tap, vhost-net, macvtap or ipvtap device: a frame written there enters the
    /// stack as received, or leaves through the device under it, past every egress hook.
    PacketDevice,
    /// A file that cannot be known when the write is judged (an io_uring request that
    /// takes its fixed file later): judged as the stricter, another process's memory.
    Unknown,
}

/// `S_IFMT` and the two kinds of file a sink can be.
const S_IFMT: u16 = 0o170_000;
const S_IFREG: u16 = 0o100_000;
const S_IFCHR: u16 = 0o020_000;
/// `/dev/net/tun` (character 10:200, fixed by the kernel), as the kernel's `dev_t`: the
/// major above 20 bits of minor.
const TUN_DEVICE: u32 = 10 << 20 | 200;
/// `/dev/vhost-net` (10:238): given a tap descriptor, its worker sends the frames.
const VHOST_NET_DEVICE: u32 = 10 << 20 | 238;

/// The sink behind descriptor `fd` of the current task, if it is one.
#[inline(always)]
pub fn current_fd_sink(fd: u64) -> Option<Sink> {
    // SAFETY: plain helper call.
    let task = unsafe { bpf_get_current_task() };
    files(task).and_then(|files| descriptor_file(files, fd)).and_then(file_sink)
}

/// The sink a `struct file *` is, if any: the inode says which kind of file first, so a
/// pipe, a socket or a terminal ends after two reads.
#[inline(always)]
fn file_sink(file: u64) -> Option<Sink> {
    let inode = read::<u64>(file, layout::FILE_INODE)?;
    let mode = read::<u16>(inode, layout::INODE_MODE)?;
    if mode & S_IFMT == S_IFCHR {
        let device = read::<u32>(inode, layout::INODE_RDEV)?;
        return is_packet_device(device).then_some(Sink::PacketDevice);
    }
    (mode & S_IFMT == S_IFREG && file_is_process_memory(file)).then_some(Sink::ProcessMemory)
}

/// Whether a character device (`dev_t`) sends packets past the egress hooks: tun/tap,
/// vhost-net, RDMA verbs, or a driver whose major the agent reads from `/proc/devices`
/// (assigned at boot or module load; `seb_common::DEVICE_MAJOR_SLOTS`).
#[inline(always)]
pub fn is_packet_device(device: u32) -> bool {
    let (major, minor) = (device >> 20, device & 0xf_ffff);
    if device == TUN_DEVICE || device == VHOST_NET_DEVICE {
        return true;
    }
    // RDMA verbs (`/dev/infiniband/uverbs0` to `uverbs31`): a raw-packet queue pair
    // sends frames from the adapter itself, past the kernel's stack.
    if major == UVERBS_MAJOR && UVERBS_FIXED_MINORS.contains(&minor) {
        return true;
    }
    let mut slot = 0;
    while slot < DEVICE_MAJOR_SLOTS {
        if DEVICE_MAJORS.get(slot).is_some_and(|driver| *driver != 0 && *driver == major) {
            return true;
        }
        slot += 1;
    }
    false
}

/// The file behind descriptor `fd` of a descriptor table (`files_struct *`).
#[inline(always)]
fn descriptor_file(files: u64, fd: u64) -> Option<u64> {
    let fdt = read::<u64>(files, layout::FILES_FDT)?;
    if fd >= u64::from(read::<u32>(fdt, layout::FDTABLE_MAX_FDS)?) {
        return None;
    }
    let slots = read::<u64>(fdt, layout::FDTABLE_FD)?;
    // SAFETY: a probing read of the descriptor's slot, within `max_fds`.
    unsafe { bpf_probe_read_kernel((slots + fd * 8) as *const u64) }.ok().filter(|file| *file != 0)
}

/// Whether a regular file is another process's memory: a file named `mem` on procfs
/// (`/proc/<pid>/mem`, `/proc/<pid>/task/<tid>/mem`; procfs has no other file of that
/// name, and no one can make one there). The file is the one the kernel will use, so a
/// symlink, a bind mount or a renamed path changes nothing.
#[inline(always)]
fn file_is_process_memory(file: u64) -> bool {
    let Some(dentry) = read::<u64>(file, layout::FILE_DENTRY) else { return false };
    let on_procfs = read::<u64>(dentry, layout::DENTRY_SB).and_then(|sb| read::<u64>(sb, layout::SUPER_MAGIC));
    if on_procfs != Some(PROC_SUPER_MAGIC) {
        return false;
    }
    let Some(name) = read::<u64>(dentry, layout::DENTRY_NAME) else { return false };
    // SAFETY: a probing read; a shorter name has its NUL where "mem" has a letter.
    unsafe { bpf_probe_read_kernel(name as *const u32) }.is_ok_and(|word| word == MEM_NAME)
}

/// io_uring's writes to a file (`enum io_uring_op`, uapi): `WRITEV`, `WRITE_FIXED`,
/// `WRITE` and `WRITEV_FIXED`.
const IORING_OP_WRITEV: u8 = 2;
const IORING_OP_WRITE_FIXED: u8 = 5;
const IORING_OP_WRITE: u8 = 23;
const IORING_OP_WRITEV_FIXED: u8 = 61;
/// `REQ_F_FIXED_FILE`: the request names a fixed file by index (uapi `IOSQE_FIXED_FILE`).
const REQ_F_FIXED_FILE: u64 = 1;
/// `REQ_F_IO_DRAIN`, `REQ_F_LINK`, `REQ_F_HARDLINK`, `REQ_F_FORCE_ASYNC` (uapi
/// `IOSQE_IO_DRAIN`, `IOSQE_IO_LINK`, `IOSQE_IO_HARDLINK`, `IOSQE_ASYNC`): the request is
/// issued later than its submission, or holds back a chain that is.
const REQ_F_ISSUED_LATER: u64 = 1 << 1 | 1 << 2 | 1 << 3 | 1 << 4;
/// The flag bits in a fixed file's pointer (`FFS_NOWAIT`, `FFS_ISREG`).
const FIXED_FILE_FLAGS: u64 = 3;

/// An io_uring request's (`struct io_kiocb *`) opcode.
#[inline(always)]
pub fn uring_opcode(req: u64) -> Option<u8> {
    read::<u8>(req, layout::IO_KIOCB_OPCODE)
}

/// Whether an io_uring opcode writes to a file.
#[inline(always)]
pub fn uring_opcode_writes(opcode: u8) -> bool {
    opcode == IORING_OP_WRITE
        || opcode == IORING_OP_WRITEV
        || opcode == IORING_OP_WRITE_FIXED
        || opcode == IORING_OP_WRITEV_FIXED
}

/// For a writing io_uring request (`uring_opcode_writes`) that names a fixed file, as
/// it is submitted: the sink it writes to, if it is one. The request takes its file when
/// it is issued; issued at once, that is under the ring's lock the submission holds, so
/// the slot read here is the one it takes. Issued later (linked behind another request,
/// holding back a chain, `IOSQE_ASYNC`, `IOSQE_IO_DRAIN`), the slot may have changed by
/// then, and the request is `Sink::Unknown`. (A request naming a descriptor is judged
/// when it takes its file: `io_uring_file_get`.)
#[inline(always)]
pub fn uring_fixed_write_sink(req: u64) -> Option<Sink> {
    let flags = read::<u64>(req, layout::IO_KIOCB_FLAGS)?;
    if flags & REQ_F_FIXED_FILE == 0 {
        return None;
    }
    let ring = read::<u64>(req, layout::IO_KIOCB_CTX)?;
    if flags & REQ_F_ISSUED_LATER != 0 || read::<u64>(ring, layout::IO_CTX_LINK_HEAD)? != 0 {
        return Some(Sink::Unknown);
    }
    let index = u64::try_from(read::<i32>(req, layout::IO_KIOCB_FD)?).ok()?;
    fixed_file(ring, index).and_then(file_sink)
}

/// The file at `index` in the fixed files of a ring (`struct io_ring_ctx *`).
#[inline(always)]
fn fixed_file(ring: u64, index: u64) -> Option<u64> {
    if index >= u64::from(read::<u32>(ring, layout::IO_CTX_FILES_NR)?) {
        return None;
    }
    let nodes = read::<u64>(ring, layout::IO_CTX_FILES_NODES)?;
    // SAFETY: a probing read of the slot, within the table's size.
    let node = unsafe { bpf_probe_read_kernel((nodes + index * 8) as *const u64) }.ok().filter(|n| *n != 0)?;
    read::<u64>(node, layout::IO_RSRC_NODE_FILE).map(|file| file & !FIXED_FILE_FLAGS).filter(|file| *file != 0)
}

/// Whether the exiting current task is the last thread of its process: `do_exit` has
/// counted it out of `signal->live` before `sched_process_exit`. `None` if unreadable.
#[inline(always)]
pub fn current_process_is_gone() -> Option<bool> {
    // SAFETY: plain helper call.
    process_is_gone(unsafe { bpf_get_current_task() })
}

/// x86_64's `TS_COMPAT`: the current system call came through the 32-bit gate.
const TS_COMPAT: u32 = 0x0002;

/// Whether the current task's system call is a 32-bit one (`int 0x80` works from any
/// 64-bit process where the kernel runs 32-bit code).
#[inline(always)]
pub fn current_syscall_is_compat() -> bool {
    // SAFETY: plain helper call.
    let task = unsafe { bpf_get_current_task() };
    match read::<u32>(task, layout::TASK_THREAD_STATUS) {
        Some(status) => status & TS_COMPAT != 0,
        None => false,
    }
}

/// The cgroup v2 (default hierarchy) cgroup of a task, as a `struct cgroup *`.
#[inline(always)]
pub fn default_cgroup(task: u64) -> Option<u64> {
    let css_set = read::<u64>(task, layout::TASK_CGROUPS)?;
    read::<u64>(css_set, layout::CSS_SET_DFL_CGROUP)
}

/// Whether `cgroup` is of the unified (v2) hierarchy, the one the current task's default
/// cgroup is of: on a hybrid node a move between v1 cgroups changes nothing judged here.
#[inline(always)]
pub fn is_unified_hierarchy(cgroup: u64) -> bool {
    // SAFETY: plain helper call.
    let current = unsafe { bpf_get_current_task() };
    let unified = default_cgroup(current).and_then(|own| read::<u64>(own, layout::CGROUP_ROOT));
    let root = read::<u64>(cgroup, layout::CGROUP_ROOT);
    root.is_some() && root == unified
}

/// Whether every thread of `task`'s process has exited (`signal->live` counted down to
/// 0): a zombie, which no move takes. `None` if unreadable.
#[inline(always)]
pub fn process_is_gone(task: u64) -> Option<bool> {
    let signal = read::<u64>(task, layout::TASK_SIGNAL)?;
    read::<i32>(signal, layout::SIGNAL_LIVE).map(|live| live == 0)
}

/// The id of a `struct cgroup *` (its kernfs node's), 0 if unreadable.
#[inline(always)]
pub fn cgroup_id(cgroup: u64) -> u64 {
    read::<u64>(cgroup, layout::CGROUP_KN).and_then(|node| read::<u64>(node, layout::KERNFS_NODE_ID)).unwrap_or(0)
}

/// The id of `cgroup`'s ancestor at `level` (0 is the root), 0 past the cgroup itself:
/// what `bpf_get_current_ancestor_cgroup_id` gives for the current task.
#[inline(always)]
pub fn ancestor_cgroup_id(cgroup: u64, level: i32) -> u64 {
    let Some(own_level) = read::<i32>(cgroup, layout::CGROUP_LEVEL) else { return 0 };
    if level > own_level || level < 0 || level as u32 >= MAX_CGROUP_DEPTH {
        return 0;
    }
    let Some(ancestors) = offset(layout::CGROUP_ANCESTORS) else { return 0 };
    let slot = cgroup + ancestors + level as u64 * 8;
    // SAFETY: a probing read, as above.
    let Ok(ancestor) = (unsafe { bpf_probe_read_kernel(slot as *const u64) }) else { return 0 };
    cgroup_id(ancestor)
}

/// The id of the cgroup a socket was made in, from a sock_addr program's context (the
/// kernel's `bpf_sock_addr_kern`); 0 if unreadable. Those programs may not call
/// `bpf_sk_cgroup_id`, and reading it here costs nothing until a denial.
#[inline(always)]
pub fn socket_cgroup_id(ctx: *mut core::ffi::c_void) -> u64 {
    let Some(sk) = read::<u64>(ctx as u64, layout::SOCK_ADDR_KERN_SK) else { return 0 };
    read::<u64>(sk, layout::SOCK_CGROUP).map_or(0, cgroup_id)
}

/// The ring (`struct io_ring_ctx *`) an io_uring request was submitted to.
#[inline(always)]
pub fn uring_ring(req: u64) -> Option<u64> {
    read::<u64>(req, layout::IO_KIOCB_CTX).filter(|ring| *ring != 0)
}

/// `IORING_OP_SOCKET` in `enum io_uring_op` (uapi).
const IORING_OP_SOCKET: u8 = 45;

/// The family and type an io_uring request (`struct io_kiocb *`, whose `opcode` the
/// caller read) asks for if it is an `IORING_OP_SOCKET`; `None` for any other request. Read after the kernel prepared the
/// request from its submission entry, so the submitter cannot change them any more.
#[inline(always)]
pub fn uring_socket_request(req: u64, opcode: u8) -> Option<(u32, u32)> {
    if opcode != IORING_OP_SOCKET {
        return None;
    }
    Some((read::<i32>(req, layout::IO_SOCKET_DOMAIN)? as u32, read::<i32>(req, layout::IO_SOCKET_TYPE)? as u32))
}

/// Write the current task's executable into `out`: the names of `mm->exe_file`'s dentry
/// and its parents, leaf first, up to the filesystem's root or `EXE_COMPONENTS` names.
/// A kernel thread, or a layout not yet filled, leaves `out` as it is.
///
/// # Safety
/// `out` must point to writable memory of the event being reported.
#[inline(always)]
pub unsafe fn write_current_exe(out: *mut [[u8; EXE_COMPONENT_LEN]; EXE_COMPONENTS]) {
    // SAFETY: plain helper call.
    let task = unsafe { bpf_get_current_task() };
    let Some(mm) = read::<u64>(task, layout::TASK_MM) else { return };
    let Some(file) = read::<u64>(mm, layout::MM_EXE_FILE) else { return };
    let Some(mut dentry) = read::<u64>(file, layout::FILE_DENTRY) else { return };
    let mut i = 0;
    while i < EXE_COMPONENTS {
        let Some(name) = read::<u64>(dentry, layout::DENTRY_NAME) else { return };
        // SAFETY: `out` is valid per the contract; the helper bounds the copy.
        unsafe {
            let slot = (*out)[i].as_mut_ptr();
            bpf_probe_read_kernel_str(slot.cast(), EXE_COMPONENT_LEN as u32, name as *const _);
        }
        let Some(parent) = read::<u64>(dentry, layout::DENTRY_PARENT) else { return };
        // A filesystem's root dentry is its own parent.
        if parent == dentry {
            return;
        }
        dentry = parent;
        i += 1;
    }
}
