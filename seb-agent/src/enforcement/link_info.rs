//! What the kernel says a link is attached to (`BPF_OBJ_GET_INFO_BY_FD`).
//!
//! aya's `LinkInfo` names the program but not the cgroup, and a detached cgroup link
//! still names its program: only the cgroup id (0 once detached) tells whether it still
//! enforces anything. Likewise a raw or syscall tracepoint program can be linked to any
//! tracepoint: only the tracepoint's name tells whether a link pinned in seb's place
//! runs where seb attached it.

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
const BPF_LINK_TYPE_RAW_TRACEPOINT: u32 = 1;
const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_PERF_EVENT: u32 = 7;
const BPF_PERF_EVENT_TRACEPOINT: u32 = 5;
/// Longer than any tracepoint name seb attaches to (`sys_enter_process_vm_writev`).
const NAME_BUFFER: usize = 64;

/// `struct bpf_link_info` with 48 bytes of its union: enough for the cgroup, raw
/// tracepoint and perf event members (the kernel fills what fits in the length given).
#[repr(C)]
#[derive(Default)]
struct RawLinkInfo {
    kind: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    union: [u64; 6],
}

impl RawLinkInfo {
    /// `cgroup.cgroup_id`.
    fn cgroup_id(&self) -> u64 {
        self.union[0]
    }
    /// `perf_event.type` (the low half of the union's first word, little or big endian).
    fn perf_event_type(&self) -> u32 {
        u32::from_ne_bytes(self.union[0].to_ne_bytes()[..4].try_into().expect("four bytes"))
    }
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelLink {
    pub id: u32,
    pub program_id: u32,
    /// The cgroup a cgroup link is attached to; `None` for other kinds, `Some(0)` for a
    /// cgroup link that was detached.
    pub cgroup_id: Option<u64>,
    pub tracepoint: Tracepoint,
}

/// The tracepoint a link runs its program on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tracepoint {
    /// A raw tracepoint (`sched_process_exit`) or a trace event (`sys_enter_socket`).
    Named(String),
    /// A perf event link this kernel does not describe (before Linux 6.6).
    Unreported,
    /// Not a tracepoint link.
    None,
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
    // A first read with no name buffer tells the kind; the name buffer's place in the
    // union depends on it.
    let mut info = RawLinkInfo::default();
    link_info(fd, &mut info)?;
    let tracepoint = match info.kind {
        BPF_LINK_TYPE_RAW_TRACEPOINT => Tracepoint::Named(tracepoint_name(fd, 0, 1)?),
        BPF_LINK_TYPE_PERF_EVENT if info.perf_event_type() == BPF_PERF_EVENT_TRACEPOINT => {
            Tracepoint::Named(tracepoint_name(fd, 1, 2)?)
        }
        BPF_LINK_TYPE_PERF_EVENT if info.perf_event_type() == 0 => Tracepoint::Unreported,
        _ => Tracepoint::None,
    };
    Ok(KernelLink {
        id: info.id,
        program_id: info.prog_id,
        cgroup_id: (info.kind == BPF_LINK_TYPE_CGROUP).then_some(info.cgroup_id()),
        tracepoint,
    })
}

/// The tracepoint name of a link whose union holds the name's address at word
/// `address_word` and its length (in the low half) at word `length_word`:
/// `raw_tracepoint.tp_name` and `.tp_name_len`, or `perf_event.tracepoint.tp_name` and
/// `.name_len`.
fn tracepoint_name(fd: BorrowedFd<'_>, address_word: usize, length_word: usize) -> Result<String> {
    let mut name = [0u8; NAME_BUFFER];
    let mut info = RawLinkInfo::default();
    info.union[address_word] = name.as_mut_ptr() as u64;
    info.union[length_word] =
        u64::from_ne_bytes([(NAME_BUFFER as u32).to_ne_bytes(), [0; 4]].concat().try_into().expect("eight bytes"));
    link_info(fd, &mut info)?;
    let end = name.iter().position(|&byte| byte == 0).unwrap_or(NAME_BUFFER);
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

fn link_info(fd: BorrowedFd<'_>, info: &mut RawLinkInfo) -> Result<()> {
    let attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<RawLinkInfo>() as u32,
        info: info as *mut RawLinkInfo as u64,
    };
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD writes at most `info_len` bytes into `info`, and a
    // name at most the length set in it into the buffer its address names.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &attr as *const InfoAttr, size_of::<InfoAttr>())
    };
    if rc != 0 {
        bail!("reading link info: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
