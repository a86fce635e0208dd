//! The underlay UDP sockets: one per worker, all bound to the listen port
//! with `SO_REUSEPORT`, batched through quinn-udp (`recvmmsg` with UDP GRO,
//! `sendmsg` with UDP GSO). Non-blocking; workers wait in `poll` (see `wake`).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::Duration;

use nix::poll::PollFlags;
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};

use super::wake::{Stop, Wait};
use super::IoLog;

/// Socket buffers large enough to absorb a burst of 64 KiB GSO batches from
/// every worker (what wireguard-go asks for too).
const SOCKET_BUFFER: usize = 7 << 20;

/// Largest UDP payload one `sendmsg` may carry (a GSO batch is one IP
/// datagram to the kernel until it segments it): 65535 minus IP and UDP headers.
pub(crate) fn max_batch_bytes(to: &SocketAddr) -> usize {
    match to {
        SocketAddr::V4(_) => 65535 - 20 - 8,
        SocketAddr::V6(_) => 65535 - 8,
    }
}

pub(crate) struct Udp {
    pub socket: UdpSocket,
    pub state: UdpSocketState,
}

impl Udp {
    /// Adopts a bound UDP socket (also the path for sockets handed over by a
    /// previous agent): makes it non-blocking and turns on GRO.
    pub fn from_socket(socket: UdpSocket) -> io::Result<Udp> {
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        socket.set_nonblocking(true)?;
        Ok(Udp { socket, state })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// How many equal-size datagrams one send may carry.
    pub fn max_segments(&self) -> usize {
        self.state.max_gso_segments().max(1)
    }

    /// `recvmmsg`: fills `bufs`/`meta`, each buffer holding one datagram or
    /// a GRO train of `meta.stride`-sized ones. `WouldBlock` when dry.
    pub fn recv(
        &self,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        self.state.recv(UdpSockRef::from(&self.socket), bufs, meta)
    }

    /// Sends `contents` (one datagram, or equal-size `segment`-byte datagrams
    /// with a shorter last one) to `to`. Waits out a full send buffer; gives
    /// up (logged, rate-limited) on anything else: the tunnelled protocols
    /// retransmit, and one bad destination must not stall the others.
    /// Returns false when the device is stopping.
    pub fn send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
        stop: &Stop,
        log: &IoLog,
    ) -> bool {
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: segment.filter(|s| *s < contents.len()),
            src_ip: None,
        };
        let mut nobufs = 0u32;
        let mut full = 0u32;
        loop {
            match self
                .state
                .try_send(UdpSockRef::from(&self.socket), &transmit)
            {
                Ok(()) => return true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Send buffer full: wait until the kernel drained some
                    // (a buffer that stays full for 2 s: drop and move on).
                    full += 1;
                    if full > 10 {
                        log.error("udp send", &e, Some(to));
                        return true;
                    }
                    if stop.wait(
                        self.socket.as_fd(),
                        PollFlags::POLLOUT,
                        Some(Duration::from_millis(200)),
                    ) == Wait::Stop
                    {
                        return false;
                    }
                }
                // The qdisc or the device queue is full: back off briefly
                // (as the kernel's own senders do), then drop.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) && nobufs < 20 => {
                    nobufs += 1;
                    if stop.sleep(Duration::from_micros(50 << nobufs.min(6))) {
                        return false;
                    }
                }
                // quinn-udp turned GSO off after this error (a device that
                // cannot segment): resend the batch one datagram at a time.
                Err(e)
                    if transmit.segment_size.is_some()
                        && matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL)) =>
                {
                    let size = transmit.segment_size.unwrap_or(contents.len());
                    for datagram in contents.chunks(size) {
                        if !self.send(to, datagram, None, stop, log) {
                            return false;
                        }
                    }
                    return true;
                }
                Err(e) => {
                    log.error("udp send", &e, Some(to));
                    return true;
                }
            }
        }
    }
}

/// How long a bind keeps retrying "address in use" before it is believed.
/// A child forked by another thread of this process (the agent spawns its
/// DNS socket keeper while the mesh starts) holds a copy of every descriptor
/// until it execs; for that moment our own closed probe still owns the port.
const BIND_RETRY: Duration = Duration::from_secs(2);

/// Binds `count` sockets to `listen` in one `SO_REUSEPORT` group. Refuses a
/// port some other socket already holds (a second agent would otherwise
/// silently share it), and resolves port 0 once for the whole group.
pub(crate) fn bind_group(listen: SocketAddr, count: usize) -> io::Result<Vec<Udp>> {
    let deadline = std::time::Instant::now() + BIND_RETRY;
    loop {
        match try_bind_group(listen, count) {
            Err(e)
                if e.kind() == io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

fn try_bind_group(listen: SocketAddr, count: usize) -> io::Result<Vec<Udp>> {
    if listen.port() != 0 {
        let probe = new_socket(listen, false)?;
        probe
            .bind(&listen.into())
            .map_err(|e| io::Error::new(e.kind(), format!("cannot bind UDP {listen}: {e}")))?;
    }
    let mut port = listen.port();
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = new_socket(listen, true)?;
        let mut addr = listen;
        addr.set_port(port);
        socket
            .bind(&addr.into())
            .map_err(|e| io::Error::new(e.kind(), format!("cannot bind UDP {addr}: {e}")))?;
        let socket: UdpSocket = socket.into();
        port = socket.local_addr()?.port();
        sockets.push(Udp::from_socket(socket)?);
    }
    Ok(sockets)
}

fn new_socket(listen: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    // socket2 opens it with SOCK_CLOEXEC.
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if listen.is_ipv6() {
        // Underlay addresses are configured per family; no v4-mapped surprises.
        socket.set_only_v6(true)?;
    }
    // As root the FORCE variants pass net.core.{r,w}mem_max; else take what we get.
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    }
    if setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    }
    Ok(socket)
}
