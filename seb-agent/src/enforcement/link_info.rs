//! What the kernel says a link is attached to (`BPF_OBJ_GET_INFO_BY_FD`).
//!
//! aya's `LinkInfo` names the program but not the cgroup, and a detached cgroup link
//! still names its program: only the cgroup id (0 once detached) tells whether it still
//! enforces anything.

use std::{
    ffi::CString,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use anyhow::{Context, Result, bail};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// `struct bpf_link_info`, up to the cgroup member of its union (the kernel fills what
/// fits in the length given).
#[repr(C)]
#[derive(Default)]
struct RawLinkInfo {
    kind: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _pad2: u32,
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// A link as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelLink {
    pub id: u32,
    pub program_id: u32,
    /// The cgroup a cgroup link is attached to; `None` for other kinds, `Some(0)` for a
    /// cgroup link that was detached.
    pub cgroup_id: Option<u64>,
}

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// The link pinned at `pin`, as the kernel reports it.
pub fn pinned_link(pin: &Path) -> Result<KernelLink> {
    kernel_link(open_pinned_link(pin)?.as_fd())
}

/// A descriptor of the link pinned at `pin` (`BPF_OBJ_GET`).
pub fn open_pinned_link(pin: &Path) -> Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes()).context("a pin path with a NUL byte")?;
    let attr = ObjGetAttr { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: BPF_OBJ_GET reads the NUL-terminated path and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &attr as *const ObjGetAttr, size_of::<ObjGetAttr>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("opening pinned link {}", pin.display()));
    }
    // SAFETY: a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn kernel_link(fd: BorrowedFd<'_>) -> Result<KernelLink> {
    let mut info = RawLinkInfo::default();
    let attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<RawLinkInfo>() as u32,
        info: &mut info as *mut RawLinkInfo as u64,
    };
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD writes at most `info_len` bytes into `info`.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &attr as *const InfoAttr, size_of::<InfoAttr>())
    };
    if rc != 0 {
        bail!("reading link info: {}", std::io::Error::last_os_error());
    }
    Ok(KernelLink {
        id: info.id,
        program_id: info.prog_id,
        cgroup_id: (info.kind == BPF_LINK_TYPE_CGROUP).then_some(info.cgroup_id),
    })
}
