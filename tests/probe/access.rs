//! Reaching into another process: what a process of the scope is killed for.

use std::{fs::File, io::Write, os::fd::AsRawFd};

use anyhow::{Context, Result};
use clap::ValueEnum;
use nix::unistd::{ForkResult, Pid, fork, pipe, read};
use serde_json::{Value, json};

use crate::{CloneArgs, Method, attempt, outcome, uring::UringWrite};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Access {
    /// `pidfd_getfd()` of a child's TCP socket.
    Getfd,
    /// `ptrace(PTRACE_SEIZE)` of a child.
    Ptrace,
    /// `ptrace(PTRACE_SEIZE)` of a child through the 32-bit entry (`int 0x80`), the
    /// request register's high half set: the kernel reads only its low half.
    Ptrace32,
    /// `process_vm_writev()` of a 1 into a word of a child's memory; the child prints the
    /// word (`{"target_word": n}`) once this process is done with it or dead.
    VmWrite,
    /// A write of a 1 into the same word through `/proc/<child>/mem`, with `write()`; the
    /// child prints the word as for `vm-write`. The variants below use the other calls.
    MemWrite,
    MemPwrite,
    MemWritev,
    MemPwritev,
    MemPwritev2,
    /// `write()` through the 32-bit gate.
    MemWrite32,
    /// io_uring `IORING_OP_WRITE` to the descriptor, and to the file registered with the
    /// ring (a fixed file); each also with `IOSQE_ASYNC` (an io-wq worker takes the file
    /// later); to the descriptor an `OPENAT` linked before it returns; to the fixed slot
    /// a `FILES_UPDATE` linked before it fills (with /dev/null there at submission).
    MemUring,
    MemUringFixed,
    MemUringAsync,
    MemUringFixedAsync,
    MemUringAfterOpen,
    MemUringFixedLinked,
    /// `write()` with the descriptor's register high half set (the kernel reads 32 bits).
    MemWriteHighFd,
    /// A child made with `CLONE_FILES`, sharing this process's descriptor table; it waits
    /// for this process to end, then tries TCP to `addr`.
    SharedFiles,
}

/// A word both sides of a fork have at the same address.
static TARGET_WORD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Reach into a child as `how` says; `{"result": "ok"}` if this process lived through it.
pub fn reach_into_child(how: Access, addr: std::net::SocketAddr, wait: bool) -> Result<Value> {
    if how == Access::SharedFiles {
        return share_descriptors_with_child(addr);
    }
    let (ready_read, ready_write) = pipe()?;
    let (hold_read, hold_write) = pipe()?;
    // SAFETY: the child only makes a socket, reports, waits and exits.
    let child = match unsafe { fork()? } {
        ForkResult::Child => {
            drop((ready_read, hold_write));
            let socket = std::net::TcpListener::bind("127.0.0.1:0");
            let fd = socket.as_ref().map_or(-1, |s| s.as_raw_fd());
            let _ = File::from(ready_write).write_all(&fd.to_ne_bytes());
            let _ = read(hold_read.as_raw_fd(), &mut [0u8; 1]);
            if how.writes_memory() {
                // What the parent's write left here, seen once the parent is done or dead.
                let word = TARGET_WORD.load(std::sync::atomic::Ordering::SeqCst);
                let _ = crate::print(json!({"target_word": word}));
            }
            // SAFETY: leave without running the parent's destructors.
            unsafe { libc::_exit(0) };
        }
        ForkResult::Parent { child } => child,
    };
    drop((ready_write, hold_read));
    let mut fd = [0u8; 4];
    read(ready_read.as_raw_fd(), &mut fd)?;
    if wait {
        crate::print(json!({"waiting": std::process::id()}))?;
        std::io::stdin().read_line(&mut String::new())?;
    }
    let result = reach(how, child, i32::from_ne_bytes(fd));
    drop(hold_write);
    nix::sys::wait::waitpid(child, None)?;
    Ok(json!({"result": outcome(result)}))
}

fn reach(how: Access, child: Pid, fd: i32) -> std::io::Result<()> {
    let check = |rc: libc::c_long| if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) };
    // SAFETY: plain system calls on a child this process made; the buffers outlive them.
    unsafe {
        match how {
            Access::Getfd => {
                let pidfd = check(libc::syscall(libc::SYS_pidfd_open, child.as_raw(), 0))?;
                check(libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0))?;
            }
            Access::Ptrace => {
                check(libc::ptrace(libc::PTRACE_SEIZE, child.as_raw(), 0, 0))?;
            }
            Access::Ptrace32 => {
                // i386 `ptrace` (26): request, pid, address, data.
                let request = libc::PTRACE_SEIZE as u64 | 1 << 32;
                crate::compat::int80(26, [request, child.as_raw() as u64, 0, 0])?;
            }
            Access::VmWrite => {
                let value: u64 = 1;
                let local = libc::iovec { iov_base: (&value as *const u64).cast_mut().cast(), iov_len: 8 };
                let remote = libc::iovec { iov_base: TARGET_WORD.as_ptr().cast(), iov_len: 8 };
                check(libc::process_vm_writev(child.as_raw(), &local, 1, &remote, 1, 0) as libc::c_long)?;
            }
            Access::MemWrite
            | Access::MemPwrite
            | Access::MemWritev
            | Access::MemPwritev
            | Access::MemPwritev2
            | Access::MemWrite32
            | Access::MemUring
            | Access::MemUringFixed
            | Access::MemUringAsync
            | Access::MemUringFixedAsync
            | Access::MemUringAfterOpen
            | Access::MemUringFixedLinked
            | Access::MemWriteHighFd => write_through_proc_mem(how, child)?,
            Access::SharedFiles => unreachable!("handled by share_descriptors_with_child"),
        }
    }
    Ok(())
}

impl Access {
    /// Whether this way writes a 1 into the child's `TARGET_WORD`.
    fn writes_memory(self) -> bool {
        !matches!(self, Access::Getfd | Access::Ptrace | Access::Ptrace32 | Access::SharedFiles)
    }
}

/// Write a 1 into the child's `TARGET_WORD` through its `/proc/<pid>/mem`, as `how` says.
fn write_through_proc_mem(how: Access, child: Pid) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let path = std::path::PathBuf::from(format!("/proc/{child}/mem"));
    let through_ring = match how {
        Access::MemUring => Some(UringWrite::Descriptor),
        Access::MemUringFixed => Some(UringWrite::Fixed),
        Access::MemUringAsync => Some(UringWrite::DescriptorAsync),
        Access::MemUringFixedAsync => Some(UringWrite::FixedAsync),
        Access::MemUringAfterOpen => Some(UringWrite::AfterLinkedOpen),
        Access::MemUringFixedLinked => Some(UringWrite::FixedAfterLinkedUpdate),
        _ => None,
    };
    if let Some(ring) = through_ring {
        return crate::uring::write_to(&path, ring, &1u64.to_ne_bytes(), TARGET_WORD.as_ptr() as u64);
    }
    let mem = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
    let (fd, at) = (mem.as_raw_fd(), TARGET_WORD.as_ptr() as u64);
    let value: u64 = 1;
    let iov = libc::iovec { iov_base: (&value as *const u64).cast_mut().cast(), iov_len: 8 };
    let check = |rc: isize| if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
    // SAFETY: plain system calls on a descriptor this function owns; the buffers outlive them.
    unsafe {
        match how {
            Access::MemPwrite => mem.write_all_at(&value.to_ne_bytes(), at)?,
            Access::MemPwritev => check(libc::pwritev(fd, &iov, 1, at as i64))?,
            Access::MemPwritev2 => check(libc::pwritev2(fd, &iov, 1, at as i64, 0))?,
            Access::MemWriteHighFd => {
                check(libc::lseek(fd, at as i64, libc::SEEK_SET) as isize)?;
                let high = fd as i64 | 1 << 32;
                check(libc::syscall(libc::SYS_write, high, (&value as *const u64).cast::<u8>(), 8) as isize)?
            }
            _ => {
                check(libc::lseek(fd, at as i64, libc::SEEK_SET) as isize)?;
                match how {
                    Access::MemWritev => check(libc::writev(fd, &iov, 1))?,
                    Access::MemWrite32 => {
                        let buffer = crate::compat::low_page()?;
                        buffer.cast::<u64>().write(value);
                        // i386 `write` (4): descriptor, buffer, length.
                        crate::compat::int80(4, [fd as u64, buffer as u64, 8, 0])?;
                    }
                    _ => check(libc::write(fd, iov.iov_base, 8))?,
                }
            }
        }
    }
    Ok(())
}

/// See `Access::SharedFiles`. The child prints its own outcome if it gets one.
fn share_descriptors_with_child(addr: std::net::SocketAddr) -> Result<Value> {
    let parent = std::process::id();
    let args = CloneArgs { flags: libc::CLONE_FILES as u64, exit_signal: libc::SIGCHLD as u64, ..Default::default() };
    let ret = crate::fork_like_clone3(&args).context("clone3(CLONE_FILES)")?;
    if ret == 0 {
        // The parent's death is seen as the parent pid changing (it may be dead already).
        while std::os::unix::process::parent_id() == parent {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = crate::print(attempt(Method::Tcp, addr));
        // SAFETY: leave without running the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    Ok(json!({"result": "ok", "child": ret}))
}
