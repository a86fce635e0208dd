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

/// Room for one IP_ORIGDSTADDR / IPV6_ORIGDSTADDR control message
/// (a `sockaddr_in6` and its header), in 8-byte words so it is aligned.
const CMSG_WORDS: usize = 8;

/// Buffers for receiving up to `slots` datagrams with one `recvmmsg(2)`:
/// each its bytes, source and (on a listener) original destination.
pub(crate) struct RecvBatch {
    size: usize,
    data: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    cmsgs: Vec<[u64; CMSG_WORDS]>,
    lens: Vec<usize>,
    control_lens: Vec<usize>,
    name_lens: Vec<libc::socklen_t>,
    count: usize,
}

/// One datagram of a [`RecvBatch`].
pub(crate) struct Received<'a> {
    pub bytes: &'a [u8],
    /// Its source (`None` when the kernel gave none).
    pub from: Option<SocketAddr>,
    /// Its original destination (only when asked for and given).
    pub orig: Option<SocketAddr>,
}

impl RecvBatch {
    /// `slots` datagrams of at most `size` bytes each (larger ones are cut:
    /// use the largest datagram the socket can carry).
    pub(crate) fn new(slots: usize, size: usize) -> Self {
        let slots = slots.max(1);
        RecvBatch {
            size,
            data: vec![0; slots * size],
            // SAFETY: an all-zero sockaddr_storage is a valid (AF_UNSPEC) value.
            names: vec![unsafe { std::mem::zeroed() }; slots],
            cmsgs: vec![[0; CMSG_WORDS]; slots],
            lens: vec![0; slots],
            control_lens: vec![0; slots],
            name_lens: vec![0; slots],
            count: 0,
        }
    }

    /// The `i`th datagram of the last [`recv_batch`].
    pub(crate) fn get(&self, i: usize) -> Option<Received<'_>> {
        if i >= self.count {
            return None;
        }
        let start = i * self.size;
        let bytes = &self.data[start..start + self.lens[i].min(self.size)];
        let from = sockaddr_to_std(&self.names[i], self.name_lens[i]);
        let orig = orig_dst_of(&self.cmsgs[i], self.control_lens[i]);
        Some(Received { bytes, from, orig })
    }
}

/// Receives what is queued on `fd` (non-blocking), up to the batch's
/// slots, with one `recvmmsg(2)`; `orig_dst`: also read each datagram's
/// original destination. Returns how many came (WouldBlock: none).
pub(crate) fn recv_batch(fd: RawFd, batch: &mut RecvBatch, orig_dst: bool) -> io::Result<usize> {
    batch.count = 0;
    let slots = batch.lens.len();
    let size = batch.size;
    let base = batch.data.as_mut_ptr();
    let mut iovs: Vec<libc::iovec> = (0..slots)
        .map(|i| libc::iovec {
            // SAFETY: slot `i` lies inside `data` (slots * size bytes).
            iov_base: unsafe { base.add(i * size) } as *mut libc::c_void,
            iov_len: size,
        })
        .collect();
    let mut hdrs: Vec<libc::mmsghdr> = Vec::with_capacity(slots);
    for (i, iov) in iovs.iter_mut().enumerate() {
        // SAFETY: an all-zero msghdr is valid; the fields set below point
        // at live buffers owned by `batch` (or `iovs`).
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_name = (&mut batch.names[i]) as *mut libc::sockaddr_storage as *mut libc::c_void;
        hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        hdr.msg_iov = iov;
        hdr.msg_iovlen = 1;
        if orig_dst {
            hdr.msg_control = batch.cmsgs[i].as_mut_ptr() as *mut libc::c_void;
            hdr.msg_controllen = std::mem::size_of::<[u64; CMSG_WORDS]>() as _;
        }
        hdrs.push(libc::mmsghdr {
            msg_hdr: hdr,
            msg_len: 0,
        });
    }
    let count = u32::try_from(slots).unwrap_or(u32::MAX);
    let got = loop {
        // SAFETY: `hdrs` holds `count` headers whose buffers outlive the call.
        let got = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                count,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if got >= 0 {
            break got as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    for (i, h) in hdrs.iter().take(got).enumerate() {
        batch.lens[i] = h.msg_len as usize;
        batch.name_lens[i] = h.msg_hdr.msg_namelen;
        batch.control_lens[i] = if orig_dst {
            // size_t in glibc, socklen_t in musl
            #[allow(clippy::unnecessary_cast)]
            let len = h.msg_hdr.msg_controllen as usize;
            len
        } else {
            0
        };
    }
    batch.count = got;
    Ok(got)
}

/// A `sockaddr_storage` the kernel filled in (`len` bytes of it).
fn sockaddr_to_std(s: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match i32::from(s.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(s as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
            Some(sockaddr_in_to_std(sin))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 =
                unsafe { &*(s as *const libc::sockaddr_storage as *const libc::sockaddr_in6) };
            Some(unmap(sockaddr_in6_to_std(sin6)))
        }
        _ => None,
    }
}

fn sockaddr_in_to_std(sin: &libc::sockaddr_in) -> SocketAddr {
    let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
    SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port)))
}

fn sockaddr_in6_to_std(sin6: &libc::sockaddr_in6) -> SocketAddr {
    let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
    SocketAddr::V6(SocketAddrV6::new(
        ip,
        u16::from_be(sin6.sin6_port),
        0,
        sin6.sin6_scope_id,
    ))
}

/// The original destination in one datagram's control data (`len` bytes
/// of `buf`, as the kernel left them), unmapped.
fn orig_dst_of(buf: &[u64; CMSG_WORDS], len: usize) -> Option<SocketAddr> {
    let total = std::mem::size_of_val(buf);
    let len = len.min(total);
    let bytes = buf.as_ptr() as *const u8;
    let hdr_len = std::mem::size_of::<libc::cmsghdr>();
    let mut off = 0usize;
    let mut found = None;
    while off + hdr_len <= len {
        // SAFETY: `off + hdr_len <= len <= total`; read_unaligned copes
        // with any alignment.
        let c: libc::cmsghdr =
            unsafe { std::ptr::read_unaligned(bytes.add(off) as *const libc::cmsghdr) };
        let c_len = c.cmsg_len as usize;
        if c_len < hdr_len || off + c_len > len {
            break;
        }
        // SAFETY: CMSG_LEN(0) is the data's offset within the message.
        let data_off = off + unsafe { libc::CMSG_LEN(0) } as usize;
        let data_len = off + c_len - data_off.min(off + c_len);
        let data = unsafe { bytes.add(data_off) };
        match (c.cmsg_level, c.cmsg_type) {
            (libc::SOL_IP, libc::IP_ORIGDSTADDR)
                if data_len >= std::mem::size_of::<libc::sockaddr_in>() =>
            {
                // SAFETY: the kernel wrote a sockaddr_in here (length checked).
                let sin: libc::sockaddr_in =
                    unsafe { std::ptr::read_unaligned(data as *const libc::sockaddr_in) };
                found = Some(sockaddr_in_to_std(&sin));
            }
            (libc::SOL_IPV6, libc::IPV6_ORIGDSTADDR)
                if data_len >= std::mem::size_of::<libc::sockaddr_in6>() =>
            {
                // SAFETY: the kernel wrote a sockaddr_in6 here (length checked).
                let sin6: libc::sockaddr_in6 =
                    unsafe { std::ptr::read_unaligned(data as *const libc::sockaddr_in6) };
                found = Some(sockaddr_in6_to_std(&sin6));
            }
            _ => {}
        }
        // The next header starts at the next multiple of the word size.
        off += c_len.next_multiple_of(std::mem::size_of::<usize>());
    }
    found.map(unmap)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recv_batch_takes_every_queued_datagram_with_its_source() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut batch = RecvBatch::new(2, 64);
        let err = recv_batch(rx.as_raw_fd(), &mut batch, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        for msg in [&b"one"[..], b"two", b"three"] {
            tx.send_to(msg, to).unwrap();
        }
        // Two slots: the first call takes two, the next the third.
        let mut got = Vec::new();
        for _ in 0..50 {
            match recv_batch(rx.as_raw_fd(), &mut batch, false) {
                Ok(n) => {
                    for i in 0..n {
                        let d = batch.get(i).unwrap();
                        assert_eq!(d.from, Some(tx.local_addr().unwrap()));
                        assert_eq!(d.orig, None);
                        got.push(d.bytes.to_vec());
                    }
                    assert!(batch.get(n).is_none());
                    if got.len() == 3 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => panic!("recv_batch: {e}"),
            }
        }
        assert_eq!(got, [&b"one"[..], b"two", b"three"]);
    }

    #[test]
    fn a_datagram_larger_than_its_slot_is_cut_to_the_slot() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&[7u8; 100], rx.local_addr().unwrap()).unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut probe = [0u8; 1];
        // wait until it is queued (peek), then take it without blocking
        let _ = rx.peek(&mut probe);
        let mut batch = RecvBatch::new(4, 10);
        let n = recv_batch(rx.as_raw_fd(), &mut batch, false).unwrap();
        assert_eq!(n, 1);
        assert_eq!(batch.get(0).unwrap().bytes, &[7u8; 10]);
    }
}
