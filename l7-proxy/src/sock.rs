//! Sockets: the transparent listener (TPROXY delivers connections for any
//! address to it), upstream connections (optionally marked so nftables
//! can tell the proxy's own traffic apart), and resets.

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// A listening socket on `addr`; with `transparent`, IP_TRANSPARENT is set
/// so TPROXY can hand it connections addressed elsewhere (then an accepted
/// socket's local address is the client's original destination).
pub(crate) fn listener(
    addr: SocketAddr,
    transparent: bool,
    reuse_port: bool,
) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    if transparent {
        match addr {
            SocketAddr::V4(_) => sock.set_ip_transparent_v4(true)?,
            SocketAddr::V6(_) => sock.set_ip_transparent_v6(true)?,
        }
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    // As haproxy's tcp-smart-accept: the accepted connections start
    // without quick ACKs, so a request is acknowledged by the response
    // (or after the delayed-ACK timer) instead of by a segment of its own.
    // After listen(), which resets the listener's ACK state.
    sock.set_tcp_quickack(false)?;
    Ok(sock.into())
}

/// Connects to `dst` within `timeout`, with SO_MARK `mark` when given and,
/// with `client`, from the client's address (IP_TRANSPARENT). With
/// `data_follows` (the caller sends at once: a request, a ClientHello),
/// the handshake's last ACK leaves with those bytes, as haproxy's
/// tcp-smart-connect; otherwise (a server may speak first) at once.
///
/// The source port is never the client's own: the onward connection must
/// not have the 5-tuple of the intercepted one (conntrack would take both
/// for one flow). `bind(ip, 0)` hands out a port no other socket on that
/// address holds, so when it returns the client's port, that socket is
/// kept bound while a second bind gets another port (or fails when none is
/// free: then no connection is made).
pub(crate) async fn connect(
    dst: SocketAddr,
    client: Option<SocketAddr>,
    mark: Option<u32>,
    timeout: Duration,
    data_follows: bool,
) -> io::Result<TcpStream> {
    let client = client.map(unmap).filter(|c| c.is_ipv4() == dst.is_ipv4());
    let new = || match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    };
    let bound = |client: SocketAddr| -> io::Result<TcpSocket> {
        let sock = new()?;
        match client {
            SocketAddr::V4(_) => SockRef::from(&sock).set_ip_transparent_v4(true)?,
            SocketAddr::V6(_) => SockRef::from(&sock).set_ip_transparent_v6(true)?,
        }
        sock.bind(SocketAddr::new(client.ip(), 0))?;
        Ok(sock)
    };
    let sock = match client {
        None => new()?,
        Some(client) => {
            let first = bound(client)?;
            if first.local_addr()?.port() != client.port() {
                first
            } else {
                // `first` holds the client's port until the second bind.
                let second = bound(client).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("no source port for {client} other than its own: {e}"),
                    )
                })?;
                drop(first);
                second
            }
        }
    };
    if let Some(mark) = mark {
        SockRef::from(&sock).set_mark(mark)?;
    }
    if data_follows {
        SockRef::from(&sock).set_tcp_quickack(false)?;
    }
    let stream = tokio::time::timeout(timeout, sock.connect(dst))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {dst} timed out"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// What [`pending`] found on a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pending {
    /// Nothing: a read would block.
    Nothing,
    /// The peer's FIN, with no byte before it.
    End,
    /// Bytes, or an error (a reset).
    DataOrError,
}

/// What reading `stream` would give now, asked of the kernel (a peek that
/// takes nothing), not of the runtime's readiness, which lags until its
/// next turn.
pub(crate) fn pending(stream: &TcpStream) -> Pending {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    // The socket is non-blocking (the runtime's), so a peek never waits.
    match SockRef::from(stream).peek(&mut probe) {
        Ok(0) => Pending::End,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Pending::Nothing,
        _ => Pending::DataOrError,
    }
}

/// Closes with a TCP reset instead of a FIN.
pub(crate) fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// `::ffff:a.b.c.d` → `a.b.c.d`, so policies see one form.
pub(crate) fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Instant;

    /// `pending` once it is no longer `Nothing` (loopback delivers within
    /// the sender's call, but a loaded machine may defer it), within 5 s.
    fn settled(s: &TcpStream) -> Pending {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let p = pending(s);
            if p != Pending::Nothing || Instant::now() > deadline {
                return p;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn pending_tells_nothing_a_bare_fin_and_data_or_a_reset_apart() {
        let ns = meshward_testkit::Netns::new("k");
        ns.run(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = l.local_addr().unwrap();
                let mut accepted = Vec::new();
                for _ in 0..4 {
                    let c = std::net::TcpStream::connect(addr).unwrap();
                    let (s, _) = l.accept().await.unwrap();
                    accepted.push((c, s));
                }
                let mut pairs = accepted.into_iter();

                let (_quiet, s) = pairs.next().unwrap();
                assert_eq!(pending(&s), Pending::Nothing);

                let (c, s) = pairs.next().unwrap();
                c.shutdown(std::net::Shutdown::Write).unwrap();
                assert_eq!(settled(&s), Pending::End);
                assert_eq!(pending(&s), Pending::End, "a peek takes nothing");

                let (mut c, s) = pairs.next().unwrap();
                c.write_all(b"x").unwrap();
                c.shutdown(std::net::Shutdown::Write).unwrap();
                assert_eq!(settled(&s), Pending::DataOrError, "a byte before the FIN");

                let (c, s) = pairs.next().unwrap();
                SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
                drop(c);
                assert_eq!(settled(&s), Pending::DataOrError, "a reset");
            });
        });
    }
}
