//! Reads of kernel structures the helpers do not expose: another task's tgid and cgroup,
//! and the executable of the current task. Field offsets come from the running kernel's
//! BTF, written by the agent into `SEB_KERNEL_LAYOUT` before it attaches anything, so
//! one object serves every kernel build.

use aya_ebpf::helpers::{
    bpf_probe_read_kernel,
    generated::{bpf_get_current_task, bpf_probe_read_kernel_str},
};
use seb_common::{EXE_COMPONENT_LEN, EXE_COMPONENTS, MAX_CGROUP_DEPTH, layout};

use crate::KERNEL_LAYOUT;

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

/// Whether the exiting current task is the last thread of its process: `do_exit` has
/// counted it out of `signal->live` before `sched_process_exit`. `None` if unreadable.
#[inline(always)]
pub fn current_process_is_gone() -> Option<bool> {
    // SAFETY: plain helper call.
    let task = unsafe { bpf_get_current_task() };
    let signal = read::<u64>(task, layout::TASK_SIGNAL)?;
    read::<i32>(signal, layout::SIGNAL_LIVE).map(|live| live == 0)
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

/// `IORING_OP_SOCKET` in `enum io_uring_op` (uapi).
const IORING_OP_SOCKET: u8 = 45;

/// The family and type an io_uring request (`struct io_kiocb *`) asks for if it is an
/// `IORING_OP_SOCKET`; `None` for any other request. Read after the kernel prepared the
/// request from its submission entry, so the submitter cannot change them any more.
#[inline(always)]
pub fn uring_socket_request(req: u64) -> Option<(u32, u32)> {
    if read::<u8>(req, layout::IO_KIOCB_OPCODE)? != IORING_OP_SOCKET {
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
