//! Link-layer egress: AF_PACKET sockets and tap devices, which hand frames to the device
//! without passing the IP stack, its routing or any cgroup socket-address hook.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use socket2::{Domain, Socket, Type};

const ETH_P_IP: u16 = 0x0800;

/// An AF_PACKET socket for IPv4 frames (needs CAP_NET_RAW).
pub fn socket(kind: Type) -> std::io::Result<Socket> {
    Socket::new(Domain::PACKET, kind, Some((ETH_P_IP.to_be() as i32).into()))
}

/// An AF_PACKET SOCK_RAW socket made by an io_uring `IORING_OP_SOCKET` request.
pub fn uring_socket() -> std::io::Result<Socket> {
    crate::uring::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(ETH_P_IP.to_be()))
}

/// An AF_PACKET SOCK_RAW socket made through the 32-bit system call gate: i386
/// `socket` (359), or `socketcall(SYS_SOCKET)` (102) with its arguments in low memory.
#[cfg(target_arch = "x86_64")]
pub fn compat_socket(socketcall: bool) -> std::io::Result<Socket> {
    use std::os::fd::FromRawFd;
    let (family, kind, protocol) = (libc::AF_PACKET as u32, libc::SOCK_RAW as u32, u32::from(ETH_P_IP.to_be()));
    let (number, first, second) = if socketcall {
        let args = crate::compat::low_page()?;
        // SAFETY: the page holds far more than three u32s.
        unsafe { std::ptr::copy_nonoverlapping([family, kind, protocol].as_ptr(), args.cast::<u32>(), 3) };
        (102, 1, args as u64)
    } else {
        (359, u64::from(family), u64::from(kind))
    };
    // SAFETY: a socket-creating system call; its only pointer is in the low page.
    let result = unsafe { crate::compat::int80(number, [first, second, u64::from(protocol), 0]) }?;
    // SAFETY: a new descriptor owned by nobody else.
    Ok(unsafe { Socket::from_raw_fd(result as i32) })
}

/// Send one UDP datagram to `addr` out of `lo`: with `ethernet`, a whole frame; else
/// the IP packet, the kernel adding the link header.
pub fn send(socket: &Socket, ethernet: bool, addr: SocketAddr) -> std::io::Result<()> {
    let IpAddr::V4(destination) = addr.ip() else {
        return Err(std::io::Error::other("the packet probe speaks IPv4 only"));
    };
    let mut packet = ipv4_udp([127, 0, 0, 1], destination.octets(), addr.port());
    if ethernet {
        // Loopback frames: zero MACs, then the ethertype.
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
        frame.append(&mut packet);
        packet = frame;
    }
    let index = nix::net::if_::if_nametoindex("lo").map_err(std::io::Error::from)?;
    // SAFETY: a zeroed sockaddr_ll filled with valid values.
    let mut link: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    link.sll_family = libc::AF_PACKET as u16;
    link.sll_protocol = ETH_P_IP.to_be();
    link.sll_ifindex = index as i32;
    link.sll_halen = 6;
    // SAFETY: sendto with a valid buffer and a sockaddr_ll of its size.
    let sent = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&link as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if sent < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Write one Ethernet frame to a tap character device (macvtap, ipvtap): a UDP datagram
/// from `source` to `addr`, to the link address `mac`. No ioctl is needed to use one.
/// `opened` runs between the open and the write.
pub fn write_to_tap(
    device: &std::path::Path,
    mac: [u8; 6],
    source: Ipv4Addr,
    addr: SocketAddr,
    opened: impl FnOnce(&std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let IpAddr::V4(destination) = addr.ip() else {
        return Err(std::io::Error::other("the packet probe speaks IPv4 only"));
    };
    // A tap device opens with IFF_VNET_HDR on: each frame follows a `virtio_net_hdr`
    // (10 bytes; zero asks for no offload).
    let mut frame = vec![0u8; 10];
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0x5e, 0xb0]); // a locally administered source
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
    frame.append(&mut ipv4_udp(source.octets(), destination.octets(), addr.port()));
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(device)?;
    opened(&file)?;
    std::io::Write::write_all(&mut file, &frame)
}

/// `source` -> `destination`, UDP from port 40000, payload "seb".
pub fn ipv4_udp(source: [u8; 4], destination: [u8; 4], port: u16) -> Vec<u8> {
    let payload = b"seb";
    let udp_len = 8 + payload.len() as u16;
    let total = 20 + udp_len;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip.extend_from_slice(&source);
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&destination);
    let checksum = !ones_complement_sum(&ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    ip.extend_from_slice(&40000u16.to_be_bytes());
    ip.extend_from_slice(&port.to_be_bytes());
    ip.extend_from_slice(&udp_len.to_be_bytes());
    ip.extend_from_slice(&0u16.to_be_bytes()); // no UDP checksum (allowed over IPv4)
    ip.extend_from_slice(payload);
    ip
}

fn ones_complement_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 =
        bytes.chunks(2).map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}
