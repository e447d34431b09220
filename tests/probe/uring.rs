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

/// How an io_uring write names its file and when the kernel takes it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum UringWrite {
    /// The descriptor.
    Descriptor,
    /// The file registered with the ring, by its index.
    Fixed,
    /// The descriptor, `IOSQE_ASYNC`: an io-wq worker takes the file later.
    DescriptorAsync,
    /// The same with the fixed file.
    FixedAsync,
    /// The descriptor an `IORING_OP_OPENAT` linked before it will return (the lowest
    /// free one): at submission it is not open yet.
    AfterLinkedOpen,
    /// The fixed file, linked behind an `IORING_OP_FILES_UPDATE` that puts it there: at
    /// submission the slot holds /dev/null.
    FixedAfterLinkedUpdate,
}

/// An `IORING_OP_WRITE` of `bytes` at `offset` of the file at `path`, as `how` says.
pub fn write_to(path: &std::path::Path, how: UringWrite, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    let mut ring = IoUring::new(4)?;
    let write = |fd: squeue::Entry| {
        fd.flags(if matches!(how, UringWrite::DescriptorAsync | UringWrite::FixedAsync) {
            squeue::Flags::ASYNC
        } else {
            squeue::Flags::empty()
        })
    };
    if how == UringWrite::AfterLinkedOpen {
        let next = lowest_free_descriptor()?;
        let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
        let open = opcode::OpenAt::new(Fd(libc::AT_FDCWD), path.as_ptr()).flags(libc::O_RDWR).build();
        let entry =
            opcode::Write::new(Fd(next), bytes.as_ptr(), bytes.len() as u32).offset(offset).build().user_data(1);
        return run_linked(&mut ring, &open.flags(squeue::Flags::IO_LINK), &entry);
    }
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    let fixed = matches!(how, UringWrite::Fixed | UringWrite::FixedAsync | UringWrite::FixedAfterLinkedUpdate);
    let null = std::fs::File::options().write(true).open("/dev/null")?;
    let entry = if fixed {
        let registered = if how == UringWrite::FixedAfterLinkedUpdate { &null } else { &file };
        ring.submitter().register_files(&[registered.as_raw_fd()])?;
        opcode::Write::new(types::Fixed(0), bytes.as_ptr(), bytes.len() as u32).offset(offset).build()
    } else {
        opcode::Write::new(Fd(file.as_raw_fd()), bytes.as_ptr(), bytes.len() as u32).offset(offset).build()
    };
    if how == UringWrite::FixedAfterLinkedUpdate {
        let update = [file.as_raw_fd()];
        let swap = opcode::FilesUpdate::new(update.as_ptr(), 1).build().flags(squeue::Flags::IO_LINK);
        return run_linked(&mut ring, &swap, &entry.user_data(1));
    }
    // The buffer outlives the request, which completes before this returns.
    result(run(&mut ring, &write(entry))?).map(drop)
}

/// Submit `first`, linked to `then` (user data 1), and wait for both: `then`'s outcome.
fn run_linked(ring: &mut IoUring, first: &squeue::Entry, then: &squeue::Entry) -> std::io::Result<()> {
    // SAFETY: every buffer the requests name outlives their completions, awaited here.
    unsafe {
        let mut queue = ring.submission();
        queue.push(first).map_err(std::io::Error::other)?;
        queue.push(then).map_err(std::io::Error::other)?;
    }
    ring.submit_and_wait(2)?;
    let done = ring.completion().find(|entry| entry.user_data() == 1);
    result(done.ok_or_else(|| std::io::Error::other("no completion"))?).map(drop)
}

/// The descriptor the next open will get: the lowest free one.
fn lowest_free_descriptor() -> std::io::Result<i32> {
    let probe = std::fs::File::open("/dev/null")?;
    Ok(probe.as_raw_fd())
}

/// A ring with a fixed-file table, shared with a forked child that makes a packet socket
/// into its slot 0 (`IORING_OP_SOCKET` with a file index) and exits; then this process
/// turns the slot into a descriptor of its own (`IORING_OP_FIXED_FD_INSTALL`). The child's
/// wait status, and the descriptor.
pub fn packet_socket_left_in_a_shared_ring() -> anyhow::Result<(String, i32)> {
    let mut ring = IoUring::new(8)?;
    ring.submitter().register_files_sparse(4)?;
    // SAFETY: the child only submits one request and exits.
    let child = match unsafe { nix::unistd::fork()? } {
        nix::unistd::ForkResult::Child => {
            let slot = types::DestinationSlot::try_from_slot_target(0).expect("slot 0");
            let entry = opcode::Socket::new(libc::AF_PACKET, libc::SOCK_RAW, 0).file_index(Some(slot)).build();
            let code = match run(&mut ring, &entry.user_data(1)).map(result) {
                Ok(Ok(_)) => 0,
                _ => 3,
            };
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    let status = format!("{:?}", nix::sys::wait::waitpid(child, None)?);
    let install = opcode::FixedFdInstall::new(types::Fixed(0), 0).build().user_data(2);
    // SAFETY: the request names no buffer.
    unsafe { ring.submission().push(&install).map_err(std::io::Error::other)? };
    // The child's completion may still be queued: wait for this one by its tag.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        ring.submit_and_wait(1)?;
        if let Some(done) = ring.completion().find(|entry| entry.user_data() == 2) {
            return Ok((status, result(done)?));
        }
        anyhow::ensure!(Instant::now() < deadline, "no completion in 5 s");
    }
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
