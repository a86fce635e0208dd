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
pub(crate) fn listener(addr: SocketAddr, transparent: bool) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if transparent {
        match addr {
            SocketAddr::V4(_) => sock.set_ip_transparent_v4(true)?,
            SocketAddr::V6(_) => sock.set_ip_transparent_v6(true)?,
        }
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

/// Connects to `dst` within `timeout`, with SO_MARK `mark` when given and,
/// with `client`, from the client's address (IP_TRANSPARENT; a port other
/// than the client's own, so the onward connection never has the 5-tuple
/// of the intercepted one).
pub(crate) async fn connect(
    dst: SocketAddr,
    client: Option<SocketAddr>,
    mark: Option<u32>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let client = client.map(unmap).filter(|c| c.is_ipv4() == dst.is_ipv4());
    let mut attempts = 0;
    let sock = loop {
        let sock = match dst {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        let Some(client) = client else { break sock };
        match client {
            SocketAddr::V4(_) => SockRef::from(&sock).set_ip_transparent_v4(true)?,
            SocketAddr::V6(_) => SockRef::from(&sock).set_ip_transparent_v6(true)?,
        }
        sock.bind(SocketAddr::new(client.ip(), 0))?;
        attempts += 1;
        if sock.local_addr()?.port() != client.port() || attempts >= 4 {
            break sock;
        }
    };
    if let Some(mark) = mark {
        SockRef::from(&sock).set_mark(mark)?;
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
