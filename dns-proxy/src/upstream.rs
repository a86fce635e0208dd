//! UDP exchanges with upstream servers over a small pool of connected
//! sockets per server.
//!
//! A fresh socket per query costs about eight system calls (socket,
//! connect, two epoll registrations, close...) and a buffer; at tens of
//! thousands of queries a second that was most of the proxy's time. Each
//! server instead gets a few connected sockets, each with one receive task
//! that hands every answer to the query waiting for its ID (and question).
//!
//! - Only the server can answer: the sockets are connected, so the kernel
//!   drops datagrams from any other address or port.
//! - The local port still changes: a socket serves at most
//!   [`QUERIES_PER_SOCKET`] queries and lives at most [`SOCKET_LIFETIME`];
//!   then it is retired (it stops taking queries, answers the ones in
//!   flight, and closes) and a socket on a new random port replaces it.
//! - Two in-flight queries with the same ID never share a socket; when
//!   every socket has that ID in flight a new socket joins the pool (up to
//!   [`MAX_SOCKETS_PER_SERVER`]; past that the query fails: SERVFAIL).
//! - A socket nobody used for [`SOCKET_LIFETIME`] closes itself, so
//!   servers that are no longer asked cost nothing.
//! - An ICMP error (nothing listens on the server) fails every query in
//!   flight on that socket: they all asked the same server.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::oneshot;

use crate::core::{PendingQuery, ResponseOutcome};
use crate::learn::Learned;
use crate::stats::{bump, Stats};

/// Queries a socket serves before it is replaced by one on a new port.
pub(crate) const QUERIES_PER_SOCKET: u32 = 1000;
/// Longest a socket takes new queries, and how long an unused one stays.
pub(crate) const SOCKET_LIFETIME: Duration = Duration::from_secs(30);
/// Sockets kept per server in the normal case.
const SOCKETS_PER_SERVER: usize = 4;
/// Bound on sockets per server when clients reuse IDs concurrently.
pub(crate) const MAX_SOCKETS_PER_SERVER: usize = 64;
/// Servers with sockets at once (more: the map is emptied and refilled).
const MAX_SERVERS: usize = 4096;
/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

/// A message that answers a query.
#[derive(Debug)]
pub(crate) struct Answer {
    pub bytes: Vec<u8>,
    pub learned: Option<Learned>,
    pub truncated: bool,
    pub unparsed: bool,
}

#[derive(Debug)]
pub(crate) enum Exchange {
    Answer(Answer),
    Timeout,
    Failed(io::Error),
}

struct Waiter {
    pending: Arc<PendingQuery>,
    tx: oneshot::Sender<io::Result<Answer>>,
}

struct PooledSocket {
    sock: UdpSocket,
    waiters: Mutex<HashMap<u16, Waiter>>,
    uses: AtomicU32,
    born: Instant,
    /// Last time a query was sent on it (for the idle close).
    last_use: Mutex<Instant>,
    retired: AtomicBool,
    server: Weak<ServerSockets>,
}

impl PooledSocket {
    fn takes_queries(&self) -> bool {
        !self.retired.load(Relaxed)
            && self.uses.load(Relaxed) < QUERIES_PER_SOCKET
            && self.born.elapsed() < SOCKET_LIFETIME
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Waiter>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops taking queries and leaves the server's list.
    fn retire(self: &Arc<Self>) {
        self.retired.store(true, Relaxed);
        if let Some(server) = self.server.upgrade() {
            server.lock().retain(|s| !Arc::ptr_eq(s, self));
        }
    }
}

struct ServerSockets {
    addr: SocketAddr,
    socks: Mutex<Vec<Arc<PooledSocket>>>,
}

impl ServerSockets {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<PooledSocket>>> {
        self.socks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) struct UdpUpstreams {
    servers: Mutex<HashMap<SocketAddr, Arc<ServerSockets>>>,
    stats: Arc<Stats>,
}

impl UdpUpstreams {
    pub(crate) fn new(stats: Arc<Stats>) -> Self {
        UdpUpstreams {
            servers: Mutex::new(HashMap::new()),
            stats,
        }
    }

    fn server(&self, addr: SocketAddr) -> Arc<ServerSockets> {
        let mut map = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(&addr) {
            return s.clone();
        }
        if map.len() >= MAX_SERVERS {
            map.clear();
        }
        let s = Arc::new(ServerSockets {
            addr,
            socks: Mutex::new(Vec::new()),
        });
        map.insert(addr, s.clone());
        s
    }

    /// Registers the query on a socket where its ID is free.
    fn register(
        &self,
        pending: &Arc<PendingQuery>,
    ) -> io::Result<(Arc<PooledSocket>, oneshot::Receiver<io::Result<Answer>>)> {
        let server = self.server(pending.server());
        let id = pending.id();
        let mut socks = server.lock();
        // Retire what has served its share (it finishes its queries alone).
        socks.retain(|s| {
            let keep = s.takes_queries();
            if !keep {
                s.retired.store(true, Relaxed);
            }
            keep
        });
        let free = socks
            .iter()
            .filter(|s| !s.waiters().contains_key(&id))
            .min_by_key(|s| s.uses.load(Relaxed))
            .cloned();
        let sock = match free {
            Some(s) if socks.len() >= SOCKETS_PER_SERVER => s,
            _ if socks.len() >= MAX_SOCKETS_PER_SERVER => {
                return Err(io::Error::other(format!(
                    "{MAX_SOCKETS_PER_SERVER} upstream sockets to {} have query ID {id} in flight",
                    server.addr
                )))
            }
            _ => {
                let s = self.open(&server)?;
                socks.push(s.clone());
                s
            }
        };
        // Still under the server's lock: no other query can take this ID
        // on this socket meanwhile.
        let (tx, rx) = oneshot::channel();
        sock.waiters().insert(
            id,
            Waiter {
                pending: pending.clone(),
                tx,
            },
        );
        drop(socks);
        sock.uses.fetch_add(1, Relaxed);
        *sock.last_use.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        Ok((sock, rx))
    }

    fn open(&self, server: &Arc<ServerSockets>) -> io::Result<Arc<PooledSocket>> {
        let local: SocketAddr = match server.addr.ip() {
            IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let std_sock = std::net::UdpSocket::bind(local)?;
        std_sock.connect(server.addr)?;
        std_sock.set_nonblocking(true)?;
        let sock = Arc::new(PooledSocket {
            sock: UdpSocket::from_std(std_sock)?,
            waiters: Mutex::new(HashMap::new()),
            uses: AtomicU32::new(0),
            born: Instant::now(),
            last_use: Mutex::new(Instant::now()),
            retired: AtomicBool::new(false),
            server: Arc::downgrade(server),
        });
        tokio::spawn(receive(sock.clone(), self.stats.clone()));
        Ok(sock)
    }

    /// Sends `query` (the client's bytes) to the pending query's server and
    /// waits at most `timeout` for its answer.
    pub(crate) async fn exchange(
        &self,
        pending: &Arc<PendingQuery>,
        query: &[u8],
        timeout: Duration,
    ) -> Exchange {
        let (sock, rx) = match self.register(pending) {
            Ok(r) => r,
            Err(e) => return Exchange::Failed(e),
        };
        let id = pending.id();
        let forget = || {
            sock.waiters().remove(&id);
        };
        if let Err(e) = sock.sock.send(query).await {
            forget();
            return Exchange::Failed(e);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(answer))) => Exchange::Answer(answer),
            Ok(Ok(Err(e))) => Exchange::Failed(e),
            // The socket's task ended (cannot happen while we wait on it).
            Ok(Err(_)) => Exchange::Failed(io::Error::other("upstream socket closed")),
            Err(_) => {
                forget();
                Exchange::Timeout
            }
        }
    }
}

/// Reads one socket: hands answers to their queries, counts the rest,
/// closes the socket once it is retired and idle.
async fn receive(sock: Arc<PooledSocket>, stats: Arc<Stats>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let tick = SOCKET_LIFETIME / 4;
    loop {
        let received = tokio::time::timeout(tick, sock.sock.recv(&mut buf)).await;
        match received {
            Err(_) => {
                let idle = sock
                    .last_use
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .elapsed()
                    >= SOCKET_LIFETIME;
                if idle && sock.waiters().is_empty() {
                    sock.retire();
                }
            }
            Ok(Err(e)) => {
                // An ICMP error (e.g. port unreachable) reported on the
                // connected socket: every query on it asked that server.
                let waiters: Vec<Waiter> = sock.waiters().drain().map(|(_, w)| w).collect();
                for w in waiters {
                    let _ = w.tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                }
            }
            Ok(Ok(n)) => dispatch(&sock, &stats, &buf[..n]),
        }
        if sock.retired.load(Relaxed) && sock.waiters().is_empty() {
            sock.retire();
            return;
        }
    }
}

fn dispatch(sock: &PooledSocket, stats: &Stats, msg: &[u8]) {
    let Some(id) = msg.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
        bump(&stats.responses_mismatched);
        return;
    };
    let Some(pending) = sock.waiters().get(&id).map(|w| w.pending.clone()) else {
        // No query with this ID: late (timed out) or forged.
        bump(&stats.responses_mismatched);
        return;
    };
    // Parsing happens outside the lock.
    match pending.accept_response(pending.server(), msg) {
        ResponseOutcome::Ignore(_) => bump(&stats.responses_mismatched),
        ResponseOutcome::Relay {
            learned,
            truncated,
            unparsed,
        } => {
            let mut waiters = sock.waiters();
            // The query may have timed out meanwhile and a new one taken its ID.
            if !waiters
                .get(&id)
                .is_some_and(|w| Arc::ptr_eq(&w.pending, &pending))
            {
                bump(&stats.responses_mismatched);
                return;
            }
            if let Some(w) = waiters.remove(&id) {
                drop(waiters);
                let _ = w.tx.send(Ok(Answer {
                    bytes: msg.to_vec(),
                    learned,
                    truncated,
                    unparsed,
                }));
            }
        }
    }
}
