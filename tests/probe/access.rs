//! Reaching into another process: what a process of the scope is killed for.

use std::{fs::File, io::Write, os::fd::AsRawFd};

use anyhow::{Context, Result};
use clap::ValueEnum;
use nix::unistd::{ForkResult, Pid, fork, pipe, read};
use serde_json::{Value, json};

use crate::{CloneArgs, Method, attempt, outcome};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Access {
    /// `pidfd_getfd()` of a child's TCP socket.
    Getfd,
    /// `ptrace(PTRACE_SEIZE)` of a child.
    Ptrace,
    /// `ptrace(PTRACE_SEIZE)` of a child through the 32-bit entry (`int 0x80`), the
    /// request register's high half set: the kernel reads only its low half.
    Ptrace32,
    /// `process_vm_writev()` into a child's memory.
    VmWrite,
    /// A child made with `CLONE_FILES`, sharing this process's descriptor table; it waits
    /// for this process to end, then tries TCP to `addr`.
    SharedFiles,
}

/// A word both sides of a fork have at the same address.
static TARGET_WORD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Reach into a child as `how` says; `{"result": "ok"}` if this process lived through it.
pub fn reach_into_child(how: Access, addr: std::net::SocketAddr) -> Result<Value> {
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
            // SAFETY: leave without running the parent's destructors.
            unsafe { libc::_exit(0) };
        }
        ForkResult::Parent { child } => child,
    };
    drop((ready_write, hold_read));
    let mut fd = [0u8; 4];
    read(ready_read.as_raw_fd(), &mut fd)?;
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
            Access::SharedFiles => unreachable!("handled by share_descriptors_with_child"),
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
