//! io_uring paths to a socket: requests a ring runs without the system calls that would
//! otherwise make or use the socket.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd},
    time::{Duration, Instant},
};

use io_uring::{
    IoUring, cqueue, opcode, squeue,
    types::{self, Fd},
};
use socket2::Socket;

/// An `IORING_OP_CONNECT` of `socket` to `addr`.
pub fn connect(socket: &Socket, addr: SocketAddr) -> std::io::Result<()> {
    let mut ring = IoUring::new(4)?;
    let sockaddr = socket2::SockAddr::from(addr);
    let entry = opcode::Connect::new(Fd(socket.as_raw_fd()), sockaddr.as_ptr().cast(), sockaddr.len()).build();
    // The sockaddr outlives the request, which completes before this returns.
    result(run(&mut ring, &entry)?).map(drop)
}

/// A socket made by an `IORING_OP_SOCKET` request: no `socket()` system call.
pub fn socket(family: i32, kind: i32, protocol: i32) -> std::io::Result<Socket> {
    let mut ring = IoUring::new(4)?;
    let fd = result(run(&mut ring, &opcode::Socket::new(family, kind, protocol).build())?)?;
    // SAFETY: the descriptor was just made for this process and is owned by nobody else.
    Ok(unsafe { Socket::from_raw_fd(fd) })
}

/// A ring with a kernel submission thread (SQPOLL), set up where the process is now, then
/// used after `moved` returns: a TCP socket made by `IORING_OP_SOCKET` and connected to
/// `addr` by `IORING_OP_CONNECT`, both submitted by the ring's thread without any
/// `io_uring_enter()`.
pub fn sqpoll_connect_after(moved: impl FnOnce() -> anyhow::Result<()>, addr: SocketAddr) -> anyhow::Result<()> {
    // The thread starts asleep; woken by a first request, it stays awake for 10 s
    // without work, so nothing after the move needs a wakeup call.
    let mut ring = IoUring::builder().setup_sqpoll(10_000).build(4)?;
    result(run(&mut ring, &opcode::Nop::new().build())?)?;
    moved()?;
    let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let fd = result(submit_polled(&mut ring, &opcode::Socket::new(domain, libc::SOCK_STREAM, 0).build())?)?;
    // SAFETY: as in `socket`.
    let socket = unsafe { Socket::from_raw_fd(fd) };
    connect_polled(&mut ring, &socket, addr)
}

fn connect_polled(ring: &mut IoUring, socket: &Socket, addr: SocketAddr) -> anyhow::Result<()> {
    let sockaddr = socket2::SockAddr::from(addr);
    let entry = opcode::Connect::new(Fd(socket.as_raw_fd()), sockaddr.as_ptr().cast(), sockaddr.len()).build();
    result(submit_polled(ring, &entry)?)?;
    Ok(())
}

/// An `IORING_OP_WRITE` of `bytes` at `offset` of `file`; with `fixed`, the file is
/// registered with the ring first and named by its index there.
pub fn write_at(file: &std::fs::File, fixed: bool, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    let mut ring = IoUring::new(4)?;
    let entry = if fixed {
        ring.submitter().register_files(&[file.as_raw_fd()])?;
        opcode::Write::new(types::Fixed(0), bytes.as_ptr(), bytes.len() as u32).offset(offset).build()
    } else {
        opcode::Write::new(Fd(file.as_raw_fd()), bytes.as_ptr(), bytes.len() as u32).offset(offset).build()
    };
    // The buffer outlives the request, which completes before this returns.
    result(run(&mut ring, &entry)?).map(drop)
}

/// Submit one request and wait for it with system calls.
fn run(ring: &mut IoUring, entry: &squeue::Entry) -> std::io::Result<cqueue::Entry> {
    // SAFETY: every buffer the request names outlives its completion, awaited here.
    unsafe { ring.submission().push(entry).map_err(std::io::Error::other)? };
    ring.submit_and_wait(1)?;
    ring.completion().next().ok_or_else(|| std::io::Error::other("no completion"))
}

/// Submit one request to an SQPOLL ring and spin on the completion queue: the kernel
/// thread takes it from shared memory, so this makes no io_uring system call.
fn submit_polled(ring: &mut IoUring, entry: &squeue::Entry) -> anyhow::Result<cqueue::Entry> {
    // SAFETY: as in `run`.
    unsafe { ring.submission().push(entry).map_err(std::io::Error::other)? };
    ring.submission().sync();
    anyhow::ensure!(!ring.submission().need_wakeup(), "the ring's thread went to sleep");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(completion) = ring.completion().next() {
            return Ok(completion);
        }
        anyhow::ensure!(Instant::now() < deadline, "no completion in 5 s");
        std::hint::spin_loop();
    }
}

fn result(completion: cqueue::Entry) -> std::io::Result<i32> {
    match completion.result() {
        fd if fd >= 0 => Ok(fd),
        errno => Err(std::io::Error::from_raw_os_error(-errno)),
    }
}
