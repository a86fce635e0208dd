//! Small network checks run from inside a test namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// HTTP/1.0 GET / from a socket opened in `ns`; returns the body. Retried
/// for at most 5 s (a server may still be starting); each attempt has 2 s
/// connect and read timeouts.
pub fn http_get(ns: &Netns, dst: SocketAddr) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = String::new();
    for _ in 0..50 {
        let attempt = ns.run(|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            Ok(resp)
        });
        match attempt {
            Ok(resp) => {
                return resp
                    .split_once("\r\n\r\n")
                    .map(|(_, body)| body.to_owned())
                    .ok_or(resp)
            }
            Err(e) => last = format!("{dst}: {e}"),
        }
        if Instant::now() > deadline {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener};

    use super::*;

    #[test]
    fn http_get_reads_the_body_from_inside_the_namespace() {
        let ns = Netns::new("w");
        ns.ip(&["addr", "add", "198.18.253.1/32", "dev", "lo"]);
        let addr = SocketAddr::from((Ipv4Addr::new(198, 18, 253, 1), 18081));
        let listener = ns.run(|| TcpListener::bind(addr)).expect("listen");
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 256];
            let _ = conn.read(&mut buf);
            conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                .unwrap();
        });
        assert_eq!(http_get(&ns, addr).as_deref(), Ok("ok\n"));
        server.join().unwrap();
        // Nothing listens any more: a bounded error, not a hang.
        let start = Instant::now();
        assert!(http_get(&ns, addr).is_err());
        assert!(start.elapsed() < Duration::from_secs(15));
    }
}
