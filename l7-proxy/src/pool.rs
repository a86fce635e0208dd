//! Idle upstream HTTP/1.1 connections kept for the next client connection
//! with the same source and destination, as haproxy's `http-reuse` and
//! Envoy's connection pools (partitioned by original source) do. Without
//! it a client that opens a connection per request costs a new upstream
//! connection per request too, and the proxy, closing it, holds the
//! TIME-WAIT and one of the node's ports to that server for a minute.
//!
//! One pool per listener and thread (no contention on its lock). A
//! connection goes in only after a complete exchange with nothing unread;
//! it comes out only while its idle time is under the limit and the socket
//! shows no end or stray bytes. The relay's retry of bodiless requests on
//! a kept connection that turns out closed covers the race with a server
//! closing it at that moment; requests with a body never take one.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// Where an upstream connection goes from: the client's address when the
/// proxy connects from it (`transparent_upstream`), else the node's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub source: Option<IpAddr>,
    pub dst: SocketAddr,
}

/// Most idle connections per (source, destination).
const MAX_PER_KEY: usize = 128;
/// Most idle connections of one pool.
const MAX_TOTAL: usize = 1024;

pub(crate) struct Pool {
    idle_timeout: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Oldest first.
    by_key: HashMap<PoolKey, Vec<(TcpStream, Instant)>>,
    total: usize,
}

impl Pool {
    /// A pool keeping connections idle for at most `idle_timeout` (zero:
    /// none are kept).
    pub(crate) fn new(idle_timeout: Duration) -> Pool {
        Pool {
            idle_timeout,
            inner: Mutex::default(),
        }
    }

    /// The most recently returned usable connection for `key`, if any.
    pub(crate) fn take(&self, key: &PoolKey) -> Option<TcpStream> {
        let mut inner = self.lock();
        let now = Instant::now();
        let mut found = None;
        let mut dropped = 0;
        if let Some(list) = inner.by_key.get_mut(key) {
            while let Some((stream, since)) = list.pop() {
                dropped += 1;
                if now.duration_since(since) < self.idle_timeout && quiet(&stream) {
                    found = Some(stream);
                    break;
                }
            }
            if list.is_empty() {
                inner.by_key.remove(key);
            }
        }
        inner.total -= dropped;
        found
    }

    /// Keeps `stream` (idle, its exchange complete) for `key`; gives it back
    /// when the pool is full or keeps nothing.
    pub(crate) fn put(&self, key: PoolKey, stream: TcpStream) -> Result<(), TcpStream> {
        if self.idle_timeout.is_zero() {
            return Err(stream);
        }
        let mut inner = self.lock();
        if inner.total >= MAX_TOTAL {
            return Err(stream);
        }
        let list = inner.by_key.entry(key).or_default();
        if list.len() >= MAX_PER_KEY {
            return Err(stream);
        }
        list.push((stream, Instant::now()));
        inner.total += 1;
        Ok(())
    }

    /// Closes the connections idle for longer than the limit, and those the
    /// server closed (call now and then).
    pub(crate) fn sweep(&self) {
        let mut inner = self.lock();
        let now = Instant::now();
        let timeout = self.idle_timeout;
        let mut closed = 0;
        inner.by_key.retain(|_, list| {
            let before = list.len();
            list.retain(|(s, since)| now.duration_since(*since) < timeout && quiet(s));
            closed += before - list.len();
            !list.is_empty()
        });
        inner.total -= closed;
    }

    /// How long idle connections are kept.
    pub(crate) fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An idle connection is usable when reading would block: no FIN, no
/// reset, no bytes the server was not asked for.
fn quiet(stream: &TcpStream) -> bool {
    crate::sock::pending(stream) == crate::sock::Pending::Nothing
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn keeps_usable_connections_per_key_until_idle_too_long() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(Duration::from_millis(300));
        let key = PoolKey {
            source: None,
            dst: l.local_addr().unwrap(),
        };
        let other = PoolKey {
            source: Some("198.18.0.9".parse().unwrap()),
            dst: key.dst,
        };
        let (a, _a_server) = pair(&l).await;
        let (b, mut b_server) = pair(&l).await;
        let (c, c_server) = pair(&l).await;
        let a_port = a.local_addr().unwrap().port();
        let c_port = c.local_addr().unwrap().port();
        pool.put(key, a).unwrap();
        pool.put(key, b).unwrap();
        pool.put(key, c).unwrap();
        assert_eq!(pool.len(), 3);
        assert!(pool.take(&other).is_none(), "another source's key");
        // c's server closed, b's sent bytes nobody asked for: both skipped,
        // even before the runtime has seen either (no await in between; a
        // thread sleep lets loopback deliver without a reactor turn).
        drop(c_server);
        b_server.write_all(b"stray").await.unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let got = pool.take(&key).expect("a usable one");
        assert_eq!(got.local_addr().unwrap().port(), a_port);
        assert_ne!(a_port, c_port);
        assert_eq!(pool.len(), 0);
        assert!(pool.take(&key).is_none());
        // Idle too long: swept.
        pool.put(key, got).unwrap();
        tokio::time::sleep(Duration::from_millis(350)).await;
        pool.sweep();
        assert_eq!(pool.len(), 0);
        assert!(pool.take(&key).is_none());
    }

    #[tokio::test]
    async fn bounded_and_off_at_zero() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let key = PoolKey {
            source: None,
            dst: l.local_addr().unwrap(),
        };
        let off = Pool::new(Duration::ZERO);
        let (a, _s) = pair(&l).await;
        assert!(off.put(key, a).is_err());
        let pool = Pool::new(Duration::from_secs(60));
        let mut servers = Vec::new();
        for _ in 0..MAX_PER_KEY {
            let (c, s) = pair(&l).await;
            servers.push(s);
            pool.put(key, c).unwrap();
        }
        let (c, _s) = pair(&l).await;
        assert!(pool.put(key, c).is_err(), "more than MAX_PER_KEY kept");
        assert_eq!(pool.len(), MAX_PER_KEY);
    }
}
