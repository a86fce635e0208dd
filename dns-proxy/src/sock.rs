//! Socket options the transparent proxy needs (Linux): IP_TRANSPARENT
//! binds, and the original destination of redirected UDP datagrams
//! (IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR).

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrLike, SockaddrStorage,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

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
                orig = Some(SocketAddr::V4(SocketAddrV4::new(
                    ip,
                    u16::from_be(sin.sin_port),
                )));
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
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "datagram without a source address",
            )
        })?;
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

/// Sends `msgs` on `fd` with one `sendmmsg(2)` (non-blocking): each its
/// bytes and destination (`None` on a connected socket). Returns how many
/// went out; an error only when the first one failed.
pub(crate) fn send_many(fd: RawFd, msgs: &[(&[u8], Option<&SockAddr>)]) -> io::Result<usize> {
    if msgs.is_empty() {
        return Ok(0);
    }
    let mut iovs: Vec<libc::iovec> = msgs
        .iter()
        .map(|(bytes, _)| libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        })
        .collect();
    let mut hdrs: Vec<libc::mmsghdr> = Vec::with_capacity(msgs.len());
    for (iov, (_, dst)) in iovs.iter_mut().zip(msgs) {
        // SAFETY: an all-zero msghdr is valid (no name, no iovec, no
        // control); the fields set below point at live data.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        if let Some(dst) = dst {
            hdr.msg_name = dst.as_ptr() as *mut libc::c_void;
            hdr.msg_namelen = dst.len();
        }
        hdr.msg_iov = iov;
        hdr.msg_iovlen = 1;
        hdrs.push(libc::mmsghdr {
            msg_hdr: hdr,
            msg_len: 0,
        });
    }
    let count = u32::try_from(hdrs.len()).unwrap_or(u32::MAX);
    loop {
        // SAFETY: `hdrs` holds `count` headers whose buffers and addresses
        // (in `msgs` and `iovs`) outlive the call.
        let sent = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), count, libc::MSG_DONTWAIT) };
        if sent >= 0 {
            return Ok(sent as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
