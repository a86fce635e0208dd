//! Socket options the transparent proxy needs (Linux): IP_TRANSPARENT
//! binds, and the original destination of redirected UDP datagrams
//! (IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR).

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrLike, SockaddrStorage,
};
use socket2::{Domain, Protocol, Socket, Type};

fn socket(addr: SocketAddr, ty: Type, protocol: Protocol) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
    sock.set_reuse_address(true)?;
    match addr {
        SocketAddr::V4(_) => sock.set_ip_transparent_v4(true)?,
        SocketAddr::V6(_) => sock.set_ip_transparent_v6(true)?,
    }
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// A UDP socket with IP_TRANSPARENT bound to `addr` (which need not be a
/// local address): the listener, or a socket that answers from a server's
/// address.
pub(crate) fn transparent_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let sock = socket(addr, Type::DGRAM, Protocol::UDP)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// A TCP listener with IP_TRANSPARENT on `addr`: accepted connections'
/// local address is the client's original destination.
pub(crate) fn transparent_tcp_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = socket(addr, Type::STREAM, Protocol::TCP)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

/// Asks the kernel for each datagram's original destination.
pub(crate) fn enable_orig_dst<F: AsFd>(sock: &F, addr: SocketAddr) -> io::Result<()> {
    match addr {
        SocketAddr::V4(_) => setsockopt(sock, sockopt::Ipv4OrigDstAddr, &true)?,
        SocketAddr::V6(_) => {
            setsockopt(sock, sockopt::Ipv6OrigDstAddr, &true)?;
            // A dual-stack socket also receives IPv4 (mapped) datagrams.
            let _ = setsockopt(sock, sockopt::Ipv4OrigDstAddr, &true);
        }
    }
    Ok(())
}

/// One datagram: its length, source and original destination (`None` when
/// the kernel gave none: not a redirected datagram).
pub(crate) fn recv_orig_dst<F: AsRawFd>(
    sock: &F,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )?;
    let mut orig = None;
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::Ipv4OrigDstAddr(sin) => {
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                orig = Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))));
            }
            ControlMessageOwned::Ipv6OrigDstAddr(sin6) => {
                let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                orig = Some(SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    u16::from_be(sin6.sin6_port),
                    0,
                    sin6.sin6_scope_id,
                )));
            }
            _ => {}
        }
    }
    let len = msg.bytes;
    let from = msg
        .address
        .as_ref()
        .and_then(storage_to_std)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "datagram without a source address"))?;
    Ok((len, from, orig.map(unmap)))
}

fn storage_to_std(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::new(v4.ip(), v4.port())));
    }
    let v6 = s.as_sockaddr_in6()?;
    let _ = s.family();
    Some(unmap(SocketAddr::V6(SocketAddrV6::new(
        v6.ip(),
        v6.port(),
        v6.flowinfo(),
        v6.scope_id(),
    ))))
}

/// `::ffff:a.b.c.d` → `a.b.c.d`, so policies see one form.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}
