//! A cgroup device program's link, made and pinned with the `bpf()` system call: aya 0.14
//! makes such a link (`BPF_LINK_CREATE`) but offers no pinnable `FdLink` for it, and
//! every link of this agent is pinned so that it outlives the agent.

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use anyhow::{Context, Result};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_CGROUP_DEVICE: u32 = 6;

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Attach the loaded device program `program` to `cgroup` and pin the link at `pin`.
/// An existing pin is replaced after the new link is attached, so there is no gap.
pub fn attach_and_pin(program: BorrowedFd<'_>, cgroup: BorrowedFd<'_>, pin: &Path) -> Result<()> {
    let attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        flags: 0,
    };
    // SAFETY: BPF_LINK_CREATE reads the attribute of the size given.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, &attr as *const LinkCreateAttr, size_of::<LinkCreateAttr>())
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("attaching the device program (BPF_LINK_CREATE)");
    }
    // SAFETY: the kernel just returned this descriptor to this process.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    if pin.exists() {
        std::fs::remove_file(pin).with_context(|| format!("unpinning {}", pin.display()))?;
    }
    let path = CString::new(pin.as_os_str().as_bytes()).context("a pin path with a NUL byte")?;
    let attr = ObjPinAttr { pathname: path.as_ptr() as u64, bpf_fd: link.as_raw_fd() as u32, file_flags: 0 };
    // SAFETY: BPF_OBJ_PIN reads the path and the descriptor; both outlive the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, &attr as *const ObjPinAttr, size_of::<ObjPinAttr>()) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("pinning {}", pin.display()));
    }
    Ok(())
}
