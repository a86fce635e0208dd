//! UDP exchanges with upstream servers over a small pool of connected
//! sockets per server, with no task per query.
//!
//! A fresh socket per query costs about eight system calls (socket,
//! connect, two epoll registrations, close...) and a buffer; at tens of
//! thousands of queries a second that was most of the proxy's time. Each
//! server instead gets a few connected sockets, each with one receive task
//! that finishes every answer itself: the query's state (its
//! [`PendingQuery`], the client, the deadline) sits in the socket's table
//! under its ID, and the answer is checked, held for the learn hook and
//! relayed to the client by that task ([`Finish`]), without a task, a
//! channel or a timer per query.
//!
//! - Only the server can answer: the sockets are connected, so the kernel
//!   drops datagrams from any other address or port.
//! - The local port still changes: a socket serves at most
//!   [`QUERIES_PER_SOCKET`] queries and lives at most [`SOCKET_LIFETIME`];
//!   then it is retired (it stops taking queries, answers the ones in
//!   flight, and closes) and a socket on a new random port replaces it.
//! - The query goes upstream under an ID the proxy draws at random (a
//!   CSPRNG), free on its socket, not the client's: the answer gets the
//!   client's ID back before it is checked and relayed. A pod knows its
//!   own IDs, so with them a pod able to forge the server's address would
//!   only have to guess the port to plant an answer in the shared answer
//!   cache (and in other pods' allow-sets); now it must guess 16 bits
//!   more, as against any resolver. A socket holds at most
//!   [`IDS_PER_SOCKET`] queries in flight; more join the pool (up to
//!   [`MAX_SOCKETS_PER_SERVER`]; past that the query fails: SERVFAIL).
//! - Timeouts: the upstream timeout is the same for every query, so each
//!   socket keeps its deadlines in sending order (a queue) and its receive
//!   task wakes for the oldest, at most [`TIMEOUT_SLACK_DIVISOR`]th of the
//!   timeout late, instead of arming a timer per query.
//! - A socket nobody used for [`SOCKET_LIFETIME`] closes itself, so
//!   servers that are no longer asked cost nothing.
//! - An ICMP error (nothing listens on the server) fails every query in
//!   flight on that socket: they all asked the same server.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use std::os::fd::{AsRawFd, RawFd};

use socket2::SockAddr;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::core::{PendingQuery, ResponseOutcome};
use crate::learn::Learned;
use crate::sock;
use crate::stats::{bump, Stats};
use tracing::debug;

/// Queries a socket serves before it is replaced by one on a new port.
pub(crate) const QUERIES_PER_SOCKET: u32 = 1000;
/// Longest a socket takes new queries, and how long an unused one stays.
pub(crate) const SOCKET_LIFETIME: Duration = Duration::from_secs(30);
/// Sockets kept per server in the normal case.
const SOCKETS_PER_SERVER: usize = 4;
/// Bound on sockets per server under a flood of queries in flight.
pub(crate) const MAX_SOCKETS_PER_SERVER: usize = 64;
/// Queries in flight on one socket at most: 1/64 of the ID space, so a
/// random ID is free at the first draw nearly always.
const IDS_PER_SOCKET: usize = 1024;
/// Random draws for a free ID before the socket counts as full.
const ID_DRAWS: usize = 32;
/// Servers with sockets at once (more: the map is emptied and refilled).
const MAX_SERVERS: usize = 4096;
/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;
/// A timed-out query gets its SERVFAIL at most timeout / this late.
pub(crate) const TIMEOUT_SLACK_DIVISOR: u32 = 16;
/// Answers read per wake-up before other tasks get a turn.
const RECV_BURST: usize = 64;
/// Answers read with one `recvmmsg`.
const RECV_BATCH: usize = 16;

/// A message that answers a query.
#[derive(Debug)]
pub(crate) struct Answer<'a> {
    pub bytes: &'a [u8],
    pub learned: Option<Learned>,
    pub truncated: bool,
    pub unparsed: bool,
}

#[derive(Debug)]
pub(crate) enum Exchange<'a> {
    Answer(Answer<'a>),
    Timeout,
    Failed(io::Error),
}

/// One UDP query in flight: what finishing it needs.
pub(crate) struct InFlight {
    pub pending: Box<PendingQuery>,
    /// Where the answer goes.
    pub client: SocketAddr,
    /// Where the answer cache keeps the answer, when it may.
    pub cache_key: Option<crate::answers::CacheKey>,
    /// Counts the query in flight until dropped (after its reply is sent).
    pub _slot: Slot,
}

/// One of [`UdpUpstreams::max_in_flight`] places; freed on drop.
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Finishes queries: relays the answer (or SERVFAIL) to the client. Runs
/// on the socket's receive task: must not block; what has to wait (a
/// learn hook still programming) goes to a task of its own.
pub(crate) trait Finish: Send + Sync + 'static {
    fn finish(self: Arc<Self>, query: InFlight, outcome: Exchange<'_>, out: &mut Outbox);
}

struct Waiter {
    query: InFlight,
    /// Matches the deadline queue's entry.
    seq: u64,
}

#[derive(Default)]
struct Table {
    waiters: HashMap<u16, Waiter>,
    /// (deadline, ID, seq) in sending order, so in deadline order; entries
    /// of answered queries are skipped when they come up.
    deadlines: VecDeque<(Instant, u16, u64)>,
    next_seq: u64,
}

pub(crate) struct PooledSocket {
    sock: UdpSocket,
    table: Mutex<Table>,
    /// Wakes the receive task when a deadline is queued on an empty queue.
    wake: Notify,
    uses: AtomicU32,
    born: Instant,
    /// Last time a query was sent on it (for the idle close).
    last_use: Mutex<Instant>,
    retired: AtomicBool,
    server: Weak<ServerSockets>,
}

impl PooledSocket {
    fn takes_queries(&self, now: Instant) -> bool {
        !self.retired.load(Relaxed)
            && self.uses.load(Relaxed) < QUERIES_PER_SOCKET
            && now.saturating_duration_since(self.born) < SOCKET_LIFETIME
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
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
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<PooledSocket>>> {
        self.socks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) struct UdpUpstreams {
    servers: Mutex<HashMap<SocketAddr, Arc<ServerSockets>>>,
    stats: Arc<Stats>,
    timeout: Duration,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
}

impl UdpUpstreams {
    pub(crate) fn new(stats: Arc<Stats>, timeout: Duration, max_in_flight: usize) -> Self {
        UdpUpstreams {
            servers: Mutex::new(HashMap::new()),
            stats,
            timeout,
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight,
        }
    }

    /// A place for one more query in flight, unless all are taken.
    pub(crate) fn slot(&self) -> Option<Slot> {
        let taken = self.in_flight.fetch_add(1, Relaxed);
        let slot = Slot(self.in_flight.clone());
        (taken < self.max_in_flight).then_some(slot)
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

    /// Queues `query` (the client's bytes) in `out` for the query's server
    /// and leaves it in flight: `finish` gets its answer, or its timeout or
    /// failure, later on a socket's receive task. A query that cannot be
    /// registered is finished at once.
    pub(crate) fn start(
        &self,
        query: InFlight,
        bytes: &[u8],
        finish: &Arc<dyn Finish>,
        out: &mut Outbox,
    ) {
        match self.register(query, finish) {
            Ok((sock, id)) => out.push_with_id(Target::Upstream { sock, id }, bytes, id),
            Err((query, e)) => finish.clone().finish(query, Exchange::Failed(e), out),
        }
    }

    /// Registers the query on a socket of its server under a random ID
    /// free there: the socket and the ID to send it with.
    fn register(
        &self,
        query: InFlight,
        finish: &Arc<dyn Finish>,
    ) -> Result<(Arc<PooledSocket>, u16), (InFlight, io::Error)> {
        let server = self.server(query.pending.server());
        let now = Instant::now();
        let mut socks = server.lock();
        // Retire what has served its share (it finishes its queries alone).
        socks.retain(|s| {
            let keep = s.takes_queries(now);
            if !keep {
                s.retired.store(true, Relaxed);
                s.wake.notify_one();
            }
            keep
        });
        let free = socks
            .iter()
            .filter(|s| s.table().waiters.len() < IDS_PER_SOCKET)
            .min_by_key(|s| s.uses.load(Relaxed))
            .cloned();
        let sock = match free {
            Some(s) if socks.len() >= SOCKETS_PER_SERVER => s,
            _ if socks.len() >= MAX_SOCKETS_PER_SERVER => {
                let e = io::Error::other(format!(
                    "{MAX_SOCKETS_PER_SERVER} upstream sockets to {} each have {IDS_PER_SOCKET} queries in flight",
                    server.addr
                ));
                return Err((query, e));
            }
            _ => match self.open(&server, finish) {
                Ok(s) => {
                    socks.push(s.clone());
                    s
                }
                Err(e) => return Err((query, e)),
            },
        };
        // Still under the server's lock: no other query can take this ID
        // on this socket meanwhile.
        let (was_idle, id) = {
            let mut table = sock.table();
            let drawn = (0..ID_DRAWS)
                .map(|_| rand::random::<u16>())
                .find(|id| !table.waiters.contains_key(id));
            let Some(id) = drawn else {
                drop(table);
                let e = io::Error::other(format!(
                    "no free query ID on an upstream socket to {} in {ID_DRAWS} draws",
                    server.addr
                ));
                return Err((query, e));
            };
            let seq = table.next_seq;
            table.next_seq += 1;
            let was_idle = table.deadlines.is_empty();
            table.deadlines.push_back((now + self.timeout, id, seq));
            table.waiters.insert(id, Waiter { query, seq });
            (was_idle, id)
        };
        drop(socks);
        if was_idle {
            sock.wake.notify_one();
        }
        sock.uses.fetch_add(1, Relaxed);
        *sock.last_use.lock().unwrap_or_else(|e| e.into_inner()) = now;
        Ok((sock, id))
    }

    fn open(
        &self,
        server: &Arc<ServerSockets>,
        finish: &Arc<dyn Finish>,
    ) -> io::Result<Arc<PooledSocket>> {
        let local: SocketAddr = match server.addr.ip() {
            IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let std_sock = std::net::UdpSocket::bind(local)?;
        std_sock.connect(server.addr)?;
        std_sock.set_nonblocking(true)?;
        let sock = Arc::new(PooledSocket {
            sock: UdpSocket::from_std(std_sock)?,
            table: Mutex::new(Table::default()),
            wake: Notify::new(),
            uses: AtomicU32::new(0),
            born: Instant::now(),
            last_use: Mutex::new(Instant::now()),
            retired: AtomicBool::new(false),
            server: Arc::downgrade(server),
        });
        tokio::spawn(receive(
            sock.clone(),
            self.stats.clone(),
            finish.clone(),
            self.timeout,
        ));
        Ok(sock)
    }
}

/// Fails the query with this ID on `sock` (sending it failed).
fn fail_one(
    sock: &PooledSocket,
    id: u16,
    e: io::Error,
    finish: &Arc<dyn Finish>,
    out: &mut Outbox,
) {
    let waiter = sock.table().waiters.remove(&id);
    if let Some(w) = waiter {
        finish.clone().finish(w.query, Exchange::Failed(e), out);
    }
}

/// Reads one socket: finishes queries with their answers or at their
/// deadline, counts the rest, closes the socket once it is retired and
/// idle.
async fn receive(
    sock: Arc<PooledSocket>,
    stats: Arc<Stats>,
    finish: Arc<dyn Finish>,
    timeout: Duration,
) {
    let mut batch = sock::RecvBatch::new(RECV_BATCH, MAX_DATAGRAM);
    let idle_tick = SOCKET_LIFETIME / 4;
    let late = (timeout / TIMEOUT_SLACK_DIVISOR).max(Duration::from_millis(1));
    let sleep = tokio::time::sleep(idle_tick);
    tokio::pin!(sleep);
    let mut out = Outbox::default();
    let mut scratch = Vec::with_capacity(512);
    loop {
        tokio::select! {
            biased;
            ready = sock.sock.ready(Interest::READABLE | Interest::ERROR) => {
                let ready = match ready {
                    Ok(r) => r,
                    Err(e) => {
                        // The socket is unusable: fail what waits and stop.
                        fail_all(&sock, &finish, e.kind(), &e.to_string(), &mut out);
                        out.flush(&finish, &stats);
                        sock.retire();
                        return;
                    }
                };
                if ready.is_error() {
                    // An ICMP error (e.g. port unreachable) reported on the
                    // connected socket: every query on it asked that server.
                    if let Ok(Some(e)) = sock.sock.take_error() {
                        fail_all(&sock, &finish, e.kind(), &e.to_string(), &mut out);
                    }
                    let _ = sock.sock.try_io(Interest::ERROR, || {
                        Err::<(), _>(io::ErrorKind::WouldBlock.into())
                    });
                }
                let fd = sock.sock.as_raw_fd();
                for _ in 0..RECV_BURST / RECV_BATCH {
                    match sock
                        .sock
                        .try_io(Interest::READABLE, || sock::recv_batch(fd, &mut batch, false))
                    {
                        Ok(got) => {
                            for i in 0..got {
                                if let Some(d) = batch.get(i) {
                                    dispatch(&sock, &stats, &finish, d.bytes, &mut scratch, &mut out);
                                }
                            }
                            if got < RECV_BATCH {
                                // drained (the next call would only see EAGAIN)
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            fail_all(&sock, &finish, e.kind(), &e.to_string(), &mut out);
                            break;
                        }
                    }
                }
            }
            () = &mut sleep => {
                expire(&sock, &finish, &mut out);
            }
            () = sock.wake.notified() => {}
        }
        // Answers arriving without pause must not starve the deadlines.
        let due = sleep.deadline() <= Instant::now();
        if due && !sleep.is_elapsed() {
            expire(&sock, &finish, &mut out);
        }
        out.flush(&finish, &stats);
        let (front, empty) = {
            let table = sock.table();
            (
                table.deadlines.front().map(|d| d.0),
                table.waiters.is_empty(),
            )
        };
        let now = Instant::now();
        if empty && sock.retired.load(Relaxed) {
            sock.retire();
            return;
        }
        if front.is_none() && sleep.is_elapsed() {
            let idle = sock
                .last_use
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed()
                >= SOCKET_LIFETIME;
            if idle && empty {
                sock.retire();
                return;
            }
        }
        // Wake for the oldest deadline, no more often than `late`.
        let next = match front {
            Some(d) => d.max(now + late),
            None => now + idle_tick,
        };
        if due || sleep.is_elapsed() || next < sleep.deadline() {
            sleep.as_mut().reset(next);
        }
    }
}

/// Finishes the queries whose deadline passed with a timeout.
fn expire(sock: &PooledSocket, finish: &Arc<dyn Finish>, out: &mut Outbox) {
    let now = Instant::now();
    let mut expired = Vec::new();
    {
        let mut table = sock.table();
        while let Some(&(deadline, id, seq)) = table.deadlines.front() {
            if deadline > now {
                break;
            }
            table.deadlines.pop_front();
            if table.waiters.get(&id).is_some_and(|w| w.seq == seq) {
                if let Some(w) = table.waiters.remove(&id) {
                    expired.push(w.query);
                }
            }
        }
    }
    for query in expired {
        finish.clone().finish(query, Exchange::Timeout, out);
    }
}

fn fail_all(
    sock: &PooledSocket,
    finish: &Arc<dyn Finish>,
    kind: io::ErrorKind,
    why: &str,
    out: &mut Outbox,
) {
    let waiters: Vec<Waiter> = {
        let mut table = sock.table();
        table.deadlines.clear();
        table.waiters.drain().map(|(_, w)| w).collect()
    };
    for w in waiters {
        finish
            .clone()
            .finish(w.query, Exchange::Failed(io::Error::new(kind, why)), out);
    }
}

/// Finishes the query that `msg` answers. `scratch` holds the answer with
/// the client's ID in place of the one the query went upstream with.
fn dispatch(
    sock: &PooledSocket,
    stats: &Stats,
    finish: &Arc<dyn Finish>,
    msg: &[u8],
    scratch: &mut Vec<u8>,
    out: &mut Outbox,
) {
    let Some(id) = msg.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
        bump(&stats.responses_mismatched);
        return;
    };
    // Checked under the table's lock (only registering a query on this
    // socket contends for it), so no other query takes the ID meanwhile.
    let mut table = sock.table();
    let Some(waiter) = table.waiters.get(&id) else {
        // No query with this ID: late (timed out) or forged.
        drop(table);
        bump(&stats.responses_mismatched);
        return;
    };
    let pending = &waiter.query.pending;
    scratch.clear();
    scratch.extend_from_slice(msg);
    scratch[..2].copy_from_slice(&pending.id().to_be_bytes());
    let msg = &scratch[..];
    match pending.accept_response(pending.server(), msg) {
        ResponseOutcome::Ignore(_) => {
            drop(table);
            bump(&stats.responses_mismatched);
        }
        ResponseOutcome::Relay {
            learned,
            truncated,
            unparsed,
        } => {
            let Some(waiter) = table.waiters.remove(&id) else {
                return;
            };
            drop(table);
            finish.clone().finish(
                waiter.query,
                Exchange::Answer(Answer {
                    bytes: msg,
                    learned,
                    truncated,
                    unparsed,
                }),
                out,
            );
        }
    }
}

/// Where an outgoing datagram goes.
pub(crate) enum Target {
    /// A reply to a client, from a server's address.
    Reply {
        sock: Arc<UdpSocket>,
        client: SocketAddr,
    },
    /// A query to its server on a pooled (connected) socket.
    Upstream { sock: Arc<PooledSocket>, id: u16 },
}

impl Target {
    fn fd(&self) -> RawFd {
        match self {
            Target::Reply { sock, .. } => sock.as_raw_fd(),
            Target::Upstream { sock, .. } => sock.sock.as_raw_fd(),
        }
    }
}

/// Datagrams collected while handling a burst of received ones, sent
/// together: one `sendmmsg` per run of datagrams for the same socket
/// (every reply to one server's clients; every query to one pooled
/// socket), so a burst of N costs a few system calls and wake-ups of the
/// receivers, not N.
#[derive(Default)]
pub(crate) struct Outbox {
    data: Vec<u8>,
    msgs: Vec<(Target, std::ops::Range<usize>)>,
}

/// Most datagrams per `sendmmsg`.
const SEND_BATCH: usize = 64;

impl Outbox {
    /// Datagrams queued.
    pub(crate) fn len(&self) -> usize {
        self.msgs.len()
    }

    pub(crate) fn push(&mut self, target: Target, bytes: &[u8]) {
        let start = self.data.len();
        self.data.extend_from_slice(bytes);
        self.msgs.push((target, start..self.data.len()));
    }

    /// Queues `bytes` (a DNS message) sent under the ID `id`.
    fn push_with_id(&mut self, target: Target, bytes: &[u8], id: u16) {
        let start = self.data.len();
        self.push(target, bytes);
        if let Some(header) = self.data.get_mut(start..start + 2) {
            header.copy_from_slice(&id.to_be_bytes());
        }
    }

    /// Sends everything queued. A query that cannot be sent fails
    /// (SERVFAIL, queued and sent in turn); a full socket buffer leaves the
    /// rest to a task that waits for room.
    pub(crate) fn flush(&mut self, finish: &Arc<dyn Finish>, stats: &Arc<Stats>) {
        // failing a query queues its SERVFAIL: a second round sends those
        for _ in 0..3 {
            if self.msgs.is_empty() {
                return;
            }
            let mut msgs = std::mem::take(&mut self.msgs);
            let data = std::mem::take(&mut self.data);
            // One run per socket (a stable sort keeps each socket's order):
            // the queries of a burst spread over the pooled sockets.
            if msgs.len() > 1 {
                msgs.sort_by_key(|(target, _)| target.fd());
            }
            let mut failed = Vec::new();
            let mut i = 0;
            while i < msgs.len() {
                let fd = msgs[i].0.fd();
                let mut end = i + 1;
                while end < msgs.len() && end - i < SEND_BATCH && msgs[end].0.fd() == fd {
                    end += 1;
                }
                let addrs: Vec<Option<SockAddr>> = msgs[i..end]
                    .iter()
                    .map(|(t, _)| match t {
                        Target::Reply { client, .. } => Some(SockAddr::from(*client)),
                        Target::Upstream { .. } => None,
                    })
                    .collect();
                let batch: Vec<(&[u8], Option<&SockAddr>)> = msgs[i..end]
                    .iter()
                    .zip(&addrs)
                    .map(|((_, range), addr)| (&data[range.clone()], addr.as_ref()))
                    .collect();
                match sock::send_many(fd, &batch) {
                    Ok(n) if n > 0 => i += n,
                    Ok(_) => i = end,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // no room now: the rest of this run waits on a task
                        for (target, range) in &msgs[i..end] {
                            send_later(target, data[range.clone()].to_vec(), finish, stats);
                        }
                        i = end;
                    }
                    Err(e) => {
                        failed.push((i, e));
                        i += 1;
                    }
                }
            }
            for (at, e) in failed {
                match &msgs[at].0 {
                    Target::Reply { client, .. } => {
                        debug!(%client, error = %e, "sending the reply");
                        bump(&stats.client_send_errors);
                    }
                    Target::Upstream { sock, id } => fail_one(sock, *id, e, finish, self),
                }
            }
            // keep the buffer's room for the next burst
            let mut data = data;
            data.clear();
            if self.data.is_empty() {
                self.data = data;
            }
        }
        // still failing after three rounds: give up on what is left
        self.msgs.clear();
        self.data.clear();
    }
}

/// Sends one datagram once its socket has room (on a task).
fn send_later(target: &Target, bytes: Vec<u8>, finish: &Arc<dyn Finish>, stats: &Arc<Stats>) {
    match target {
        Target::Reply { sock, client } => {
            let (sock, client) = (sock.clone(), *client);
            let stats = stats.clone();
            tokio::spawn(async move {
                if let Err(e) = sock.send_to(&bytes, client).await {
                    debug!(%client, error = %e, "sending the reply");
                    bump(&stats.client_send_errors);
                }
            });
        }
        Target::Upstream { sock, id } => {
            let (sock, id, finish, stats) = (sock.clone(), *id, finish.clone(), stats.clone());
            tokio::spawn(async move {
                if let Err(e) = sock.sock.send(&bytes).await {
                    let mut out = Outbox::default();
                    fail_one(&sock, id, e, &finish, &mut out);
                    out.flush(&finish, &stats);
                }
            });
        }
    }
}
