//! The tokio shell around [`crate::core`]: transparent UDP and TCP
//! listeners, upstream exchanges, hold-until-programmed, counters.
//!
//! - UDP: one listener socket (IP_TRANSPARENT, IP_RECVORIGDSTADDR) receives
//!   every redirected datagram with its original destination, and the
//!   listener's task handles each query inline (the policy decision is
//!   synchronous): denied ones are answered at once, allowed ones sent
//!   upstream over a pooled socket connected to that destination
//!   (`upstream.rs`: only the server can answer, ports rotate) and left in
//!   that socket's table; the socket's receive task finishes them (answer
//!   checked, held for the learn hook, relayed; or SERVFAIL at the
//!   timeout). No task, channel or timer per query: a task only for an
//!   answer whose learn hook has to wait (the kernel being programmed).
//!   An upstream socket's receive task handles every answer queued (up to
//!   a bound) before the replies go out, one `sendmmsg` per reply socket
//!   (`upstream::Outbox`); the listener likewise takes what queued with one
//!   `recvmmsg` and sends the allowed queries with one `sendmmsg` per
//!   pooled socket.
//!   Replies reach the client from the server's own address and port
//!   through a transparent socket bound to it (one per server, kept).
//! - [`DnsProxy::drain`]: what queued on listeners being replaced is
//!   answered before they close.
//! - TCP: an accepted connection's local address is the original
//!   destination; the proxy opens one upstream connection per client
//!   connection and answers queries in order (RFC 7766 framing, several
//!   queries per connection, an idle timeout).
//! - Hold: before an allowed answer carrying addresses is released, the
//!   [`LearnHook`] runs (the agent programs the kernel there). The answer
//!   waits for it at most [`ProxyConfig::hold_timeout`]; after that it is
//!   released with a warning and the hook keeps running to completion.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use std::pin::Pin;
use tokio::io::Interest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::answers::{AnswerCache, AnswerCacheConfig, CacheKey, Lookup};
use crate::core::{
    handle_query, DenyRcode, DnsPolicy, LocalAnswer, PendingQuery, QueryContext, QueryOutcome,
    ResponseOutcome, Transport,
};
use crate::learn::Learned;
use crate::sock;
use crate::stats::{bump, Stats};
use crate::upstream::{Exchange, Finish, InFlight, Outbox, Target, UdpUpstreams};
use meshward_policy::Fqdn;

/// Largest DNS message (UDP payload or TCP frame).
const MAX_MESSAGE: usize = 65_535;
/// Reply sockets kept (one per server address a client asked).
const MAX_REPLY_SOCKETS: usize = 4096;
/// The listener's datagrams per `Outbox` in `drain` (a batch per flush).
const RECV_BURST: usize = 32;
/// Most datagrams the listener takes with one `recvmmsg`.
const LISTEN_BATCH: usize = 32;
/// Most datagrams, and most connections, [`DnsProxy::drain`] takes.
pub const MAX_DRAINED: usize = 65_536;

/// Tunables of the proxy shell.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Answer to denied queries (REFUSED by default).
    pub deny_rcode: DenyRcode,
    /// How long an upstream server has to answer before the client gets
    /// SERVFAIL.
    pub upstream_timeout: Duration,
    /// Upper bound on holding an answer for the learn hook (Cilium: 100 ms).
    pub hold_timeout: Duration,
    /// A client TCP connection with no query for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// UDP queries waiting for upstream at once; more are dropped (the
    /// client retries).
    pub max_udp_in_flight: usize,
    /// Client TCP connections at once; more are closed at accept.
    pub max_tcp_connections: usize,
    /// The answer cache (`answers.rs`); off by default (0 entries).
    pub answer_cache: AnswerCacheConfig,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            deny_rcode: DenyRcode::Refused,
            upstream_timeout: Duration::from_secs(4),
            hold_timeout: Duration::from_millis(100),
            tcp_idle_timeout: Duration::from_secs(10),
            max_udp_in_flight: 4096,
            max_tcp_connections: 1024,
            answer_cache: AnswerCacheConfig::default(),
        }
    }
}

/// Called with the addresses of an allowed answer before it is released;
/// the answer waits until the future completes (or the hold bound).
/// Typically programs the client's allow-set. The future runs on its own
/// task: it is never cancelled half-way, even when the hold times out.
pub trait LearnHook: Send + Sync + 'static {
    type Error: Display + Send + 'static;
    fn learn(&self, learned: Learned) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

impl<F, Fut, E> LearnHook for F
where
    F: Fn(Learned) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: Display + Send + 'static,
{
    type Error = E;
    fn learn(&self, learned: Learned) -> impl Future<Output = Result<(), E>> + Send {
        self(learned)
    }
}

/// Told about every answer relayed to a client, after its hold (for flow
/// events). Runs on the proxy's thread before the answer is sent: keep it
/// quick and non-blocking. Denied queries never reach the shell's
/// exchange: the [`DnsPolicy`] sees those.
pub trait DnsObserver: Send + Sync + 'static {
    fn relayed(&self, answer: &Relayed<'_>);
}

/// One relayed answer.
#[derive(Debug)]
pub struct Relayed<'a> {
    pub query: &'a QueryContext,
    pub name: &'a Fqdn,
    pub qtype: u16,
    /// The answer's RCODE (header bits only).
    pub rcode: u8,
    /// The addresses it carried, if any.
    pub learned: Option<&'a Learned>,
    /// How long it was held for the learn hook (when it was).
    pub hold: Option<Duration>,
}

/// The proxy's listening sockets: UDP and TCP on one address. Made by
/// [`Listeners::bind`] or from existing sockets ([`Listeners::from_std`],
/// e.g. descriptors handed over by a previous agent process).
#[derive(Debug)]
pub struct Listeners {
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
}

impl Listeners {
    /// Binds transparent UDP and TCP sockets to `addr` (e.g.
    /// `127.0.0.1:15053` or `0.0.0.0:15053`, where the TPROXY rule sends
    /// port-53 traffic). Needs CAP_NET_ADMIN.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let udp = sock::transparent_udp(addr)?;
        let tcp = sock::transparent_tcp_listener(addr)?;
        Self::from_std(udp, tcp)
    }

    /// Takes sockets made elsewhere; they must already be bound with
    /// IP_TRANSPARENT (and the TCP one listening). Asks for original
    /// destinations on the UDP socket and makes both non-blocking.
    pub fn from_std(udp: std::net::UdpSocket, tcp: std::net::TcpListener) -> io::Result<Self> {
        let addr = udp.local_addr()?;
        sock::enable_orig_dst(&udp, addr)?;
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        Ok(Listeners { udp, tcp })
    }

    pub fn udp(&self) -> &std::net::UdpSocket {
        &self.udp
    }

    pub fn tcp(&self) -> &std::net::TcpListener {
        &self.tcp
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// The sockets, e.g. to hand their descriptors to the next agent
    /// process (which takes them back with [`Listeners::from_std`]).
    pub fn into_std(self) -> (std::net::UdpSocket, std::net::TcpListener) {
        (self.udp, self.tcp)
    }
}

struct Inner<P, H> {
    config: ProxyConfig,
    policy: P,
    hook: Arc<H>,
    stats: Arc<Stats>,
    upstreams: UdpUpstreams,
    tcp_slots: Arc<Semaphore>,
    reply_sockets: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>,
    observer: OnceLock<Arc<dyn DnsObserver>>,
    /// The answer cache, when on.
    answers: Option<Mutex<AnswerCache>>,
}

/// The transparent DNS proxy. Cheap to clone (shared state).
pub struct DnsProxy<P, H> {
    inner: Arc<Inner<P, H>>,
}

impl<P, H> Clone for DnsProxy<P, H> {
    fn clone(&self) -> Self {
        DnsProxy {
            inner: self.inner.clone(),
        }
    }
}

impl<P: DnsPolicy, H: LearnHook> DnsProxy<P, H> {
    pub fn new(config: ProxyConfig, policy: P, hook: H) -> Self {
        let tcp_slots = Arc::new(Semaphore::new(config.max_tcp_connections));
        let stats = Arc::new(Stats::default());
        let upstreams = UdpUpstreams::new(
            stats.clone(),
            config.upstream_timeout,
            config.max_udp_in_flight,
        );
        let answers = (config.answer_cache.entries > 0)
            .then(|| Mutex::new(AnswerCache::new(config.answer_cache.clone())));
        DnsProxy {
            inner: Arc::new(Inner {
                answers,
                config,
                policy,
                hook: Arc::new(hook),
                upstreams,
                stats,
                tcp_slots,
                reply_sockets: Mutex::new(HashMap::new()),
                observer: OnceLock::new(),
            }),
        }
    }

    /// The proxy's counters (shared: keep it for a metrics endpoint).
    pub fn stats(&self) -> Arc<Stats> {
        self.inner.stats.clone()
    }

    pub fn policy(&self) -> &P {
        &self.inner.policy
    }

    /// Sets the observer of relayed answers (once; later calls are
    /// ignored and return false).
    pub fn set_observer(&self, observer: Arc<dyn DnsObserver>) -> bool {
        self.inner.observer.set(observer).is_ok()
    }

    /// Serves both listeners until one fails for good (or the future is
    /// dropped). Must run inside a tokio runtime with time and I/O enabled.
    pub async fn serve(&self, listeners: Listeners) -> io::Result<()> {
        let udp = UdpSocket::from_std(listeners.udp)?;
        let tcp = TcpListener::from_std(listeners.tcp)?;
        tokio::select! {
            r = self.clone().udp_loop(udp) => r,
            r = self.clone().tcp_loop(tcp) => r,
        }
    }

    async fn udp_loop(self, sock: UdpSocket) -> io::Result<()> {
        let mut batch = sock::RecvBatch::new(LISTEN_BATCH, MAX_MESSAGE);
        let mut errors_in_a_row = 0u32;
        let finish: Arc<dyn Finish> = self.inner.clone();
        let mut out = Outbox::default();
        let fd = sock.as_raw_fd();
        loop {
            let got = match sock
                .async_io(Interest::READABLE, || {
                    sock::recv_batch(fd, &mut batch, true)
                })
                .await
            {
                Ok(got) => {
                    errors_in_a_row = 0;
                    got
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    errors_in_a_row += 1;
                    if errors_in_a_row > 1000 {
                        return Err(e);
                    }
                    warn!(error = %e, "receiving on the DNS proxy's UDP listener");
                    continue;
                }
            };
            // What queued meanwhile came in one recvmmsg; the queries go
            // upstream together (one sendmmsg per pooled socket).
            for i in 0..got {
                let Some(d) = batch.get(i) else { break };
                match d.from {
                    Some(client) => self.udp_query(d.bytes, client, d.orig, &finish, &mut out),
                    None => bump(&self.inner.stats.queries_dropped),
                }
            }
            out.flush(&finish, &self.inner.stats);
        }
    }

    /// One datagram from the UDP listener, handled inline: answered at
    /// once, sent upstream (finished later by the upstream socket's task)
    /// or dropped.
    fn udp_query(
        &self,
        query: &[u8],
        client: SocketAddr,
        orig: Option<SocketAddr>,
        finish: &Arc<dyn Finish>,
        out: &mut Outbox,
    ) {
        let inner = &self.inner;
        let Some(server) = orig else {
            // Sent to the listener itself, not redirected: no server.
            bump(&inner.stats.queries_dropped);
            return;
        };
        let ctx = QueryContext {
            client: client.ip(),
            server,
            transport: Transport::Udp,
        };
        match handle_query(&inner.policy, inner.config.deny_rcode, ctx, query) {
            QueryOutcome::Forward(pending) => {
                let cache_key = match inner.cache_lookup(&ctx, query) {
                    Cached::Hit(reply, learned) => {
                        bump(&inner.stats.queries_allowed);
                        inner.release_udp(pending, client, &reply, learned, None, (), out);
                        return;
                    }
                    Cached::Miss(key) => key,
                };
                let Some(slot) = inner.upstreams.slot() else {
                    bump(&inner.stats.queries_overload);
                    return;
                };
                bump(&inner.stats.queries_allowed);
                let query_state = InFlight {
                    pending,
                    client,
                    cache_key,
                    _slot: slot,
                };
                inner.upstreams.start(query_state, query, finish, out);
            }
            QueryOutcome::Answer { reply, why } => {
                self.count_local(why);
                inner.reply_udp(server, client, &reply, out);
            }
            QueryOutcome::Drop(_) => bump(&inner.stats.queries_dropped),
        }
    }

    /// Answers what queued on listeners that are being replaced (sockets
    /// on an old address after `dnsProxyPort` changed, say): every
    /// datagram waiting in the UDP socket is handled as [`DnsProxy::serve`]
    /// would, every connection waiting in the TCP backlog is accepted and
    /// served on a task of its own; then the listeners close. At most
    /// [`MAX_DRAINED`] of each (the kernel should no longer send there).
    /// Returns how many datagrams and connections it took. Call it inside
    /// the proxy's runtime (it spawns tasks).
    pub fn drain(&self, listeners: Listeners) -> (usize, usize) {
        let finish: Arc<dyn Finish> = self.inner.clone();
        let mut out = Outbox::default();
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut datagrams = 0;
        while datagrams < MAX_DRAINED {
            match sock::recv_orig_dst(&listeners.udp, &mut buf) {
                Ok((n, client, orig)) => {
                    datagrams += 1;
                    self.udp_query(&buf[..n], client, orig, &finish, &mut out);
                    if out.len() >= RECV_BURST {
                        out.flush(&finish, &self.inner.stats);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!(error = %e, "draining a replaced DNS UDP listener");
                    break;
                }
            }
        }
        out.flush(&finish, &self.inner.stats);
        let mut connections = 0;
        while connections < MAX_DRAINED {
            let stream = match listeners.tcp.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!(error = %e, "draining a replaced DNS TCP listener");
                    break;
                }
            };
            connections += 1;
            let stream = match stream
                .set_nonblocking(true)
                .and_then(|()| TcpStream::from_std(stream))
            {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "a drained DNS TCP connection");
                    continue;
                }
            };
            self.spawn_tcp_connection(stream);
        }
        (datagrams, connections)
    }

    fn count_local(&self, why: LocalAnswer) {
        let s = &self.inner.stats;
        bump(match why {
            LocalAnswer::Denied => &s.queries_denied,
            LocalAnswer::FormatError => &s.queries_formerr,
            LocalAnswer::NotImplemented => &s.queries_notimp,
        });
    }

    /// Counts an answer about to be relayed, holds it for the learn hook
    /// and tells the observer (TCP: the connection's task waits).
    async fn relay(
        &self,
        pending: &PendingQuery,
        bytes: &[u8],
        learned: Option<Learned>,
        truncated: bool,
        unparsed: bool,
    ) {
        self.inner.count_relayed(truncated, unparsed);
        self.hold_and_observe(pending, bytes, learned).await;
    }

    /// Holds an answer for the learn hook and tells the observer (TCP: the
    /// connection's task waits).
    async fn hold_and_observe(
        &self,
        pending: &PendingQuery,
        bytes: &[u8],
        learned: Option<Learned>,
    ) {
        let inner = &self.inner;
        let seen = inner.seen(&learned);
        let hold = match learned {
            None => None,
            Some(learned) => Some(match inner.begin_hold(learned, pending.name()) {
                Hold::Done(took) => took,
                Hold::Waiting(fut, start) => inner.wait_hold(fut, start, pending.name()).await,
            }),
        };
        inner.observe(pending, bytes, seen.as_ref(), hold);
    }

    /// The answer if `bytes` is one (after holding it for the hook), `None`
    /// to keep waiting.
    async fn take_response(
        &self,
        pending: &PendingQuery,
        from: SocketAddr,
        bytes: &[u8],
        cache_key: &mut Option<CacheKey>,
    ) -> Option<Vec<u8>> {
        let s = &self.inner.stats;
        match pending.accept_response(from, bytes) {
            ResponseOutcome::Ignore(why) => {
                debug!(server = %pending.server(), id = pending.id(), ?why, "ignoring upstream message");
                bump(&s.responses_mismatched);
                None
            }
            ResponseOutcome::Relay {
                learned,
                truncated,
                unparsed,
            } => {
                // Cached once held: no hit is served before the hook has
                // run for this answer.
                let for_cache = cache_key.take().map(|key| (key, learned.clone()));
                self.relay(pending, bytes, learned, truncated, unparsed)
                    .await;
                if let Some((key, learned)) = for_cache {
                    self.inner.cache_insert(key, bytes, learned.as_ref());
                }
                Some(bytes.to_vec())
            }
        }
    }

    async fn tcp_loop(self, listener: TcpListener) -> io::Result<()> {
        let mut errors_in_a_row = 0u32;
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(c) => {
                    errors_in_a_row = 0;
                    c
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    errors_in_a_row += 1;
                    if errors_in_a_row > 1000 {
                        return Err(e);
                    }
                    warn!(error = %e, "accepting on the DNS proxy's TCP listener");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            self.spawn_tcp_connection(stream);
        }
    }

    /// Serves one client connection on a task (unless too many are open).
    fn spawn_tcp_connection(&self, stream: TcpStream) {
        let Ok(permit) = self.inner.tcp_slots.clone().try_acquire_owned() else {
            bump(&self.inner.stats.queries_overload);
            return;
        };
        bump(&self.inner.stats.tcp_connections);
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.tcp_connection(stream).await {
                debug!(error = %e, "DNS TCP connection");
            }
            drop(permit);
        });
    }

    async fn tcp_connection(&self, mut client: TcpStream) -> io::Result<()> {
        let peer = client.peer_addr()?;
        // The original destination (TPROXY keeps it as our local address).
        let server = client.local_addr()?;
        let _ = client.set_nodelay(true);
        let mut upstream: Option<TcpStream> = None;
        let idle = self.inner.config.tcp_idle_timeout;
        loop {
            let query = match tokio::time::timeout(idle, read_frame(&mut client)).await {
                Ok(Ok(Some(q))) => q,
                // Idle, closed, or a broken frame.
                _ => return Ok(()),
            };
            let ctx = QueryContext {
                client: peer.ip(),
                server,
                transport: Transport::Tcp,
            };
            let reply = match handle_query(
                &self.inner.policy,
                self.inner.config.deny_rcode,
                ctx,
                &query,
            ) {
                QueryOutcome::Forward(pending) => {
                    bump(&self.inner.stats.queries_allowed);
                    match self.inner.cache_lookup(&ctx, &query) {
                        Cached::Hit(reply, learned) => {
                            self.hold_and_observe(&pending, &reply, learned).await;
                            reply
                        }
                        Cached::Miss(mut key) => {
                            self.tcp_exchange(&pending, &mut upstream, &query, &mut key)
                                .await
                        }
                    }
                }
                QueryOutcome::Answer { reply, why } => {
                    self.count_local(why);
                    reply
                }
                QueryOutcome::Drop(_) => {
                    bump(&self.inner.stats.queries_dropped);
                    return Ok(());
                }
            };
            let framed = frame(&reply);
            match tokio::time::timeout(idle, client.write_all(&framed)).await {
                Ok(Ok(())) => {}
                _ => {
                    bump(&self.inner.stats.client_send_errors);
                    return Ok(());
                }
            }
        }
    }

    /// One query over the connection's upstream TCP connection (opened or
    /// re-opened as needed): the answer after the hold, or SERVFAIL.
    async fn tcp_exchange(
        &self,
        pending: &PendingQuery,
        upstream: &mut Option<TcpStream>,
        query: &[u8],
        cache_key: &mut Option<CacheKey>,
    ) -> Vec<u8> {
        let server = pending.server();
        let deadline = tokio::time::Instant::now() + self.inner.config.upstream_timeout;
        let framed = frame(query);
        // A kept connection the server has closed meanwhile fails on first
        // use: then one fresh connection is tried.
        for attempt in 0..2 {
            let reused = upstream.is_some();
            if upstream.is_none() {
                match tokio::time::timeout_at(deadline, TcpStream::connect(server)).await {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        *upstream = Some(s);
                    }
                    Ok(Err(e)) => {
                        debug!(%server, error = %e, "connecting upstream");
                        bump(&self.inner.stats.upstream_errors);
                        return pending.servfail();
                    }
                    Err(_) => {
                        bump(&self.inner.stats.upstream_timeouts);
                        return pending.servfail();
                    }
                }
            }
            let Some(conn) = upstream.as_mut() else {
                break;
            };
            let result = tokio::time::timeout_at(deadline, async {
                conn.write_all(&framed).await?;
                loop {
                    let Some(msg) = read_frame(conn).await? else {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "upstream closed",
                        ));
                    };
                    if let Some(reply) = self.take_response(pending, server, &msg, cache_key).await
                    {
                        return Ok(reply);
                    }
                }
            })
            .await;
            match result {
                Ok(Ok(reply)) => return reply,
                Ok(Err(e)) => {
                    *upstream = None;
                    if reused && attempt == 0 {
                        continue;
                    }
                    debug!(%server, error = %e, "upstream TCP exchange");
                    bump(&self.inner.stats.upstream_errors);
                    return pending.servfail();
                }
                Err(_) => {
                    // A late answer must not be taken for the next query's.
                    *upstream = None;
                    bump(&self.inner.stats.upstream_timeouts);
                    return pending.servfail();
                }
            }
        }
        bump(&self.inner.stats.upstream_errors);
        pending.servfail()
    }
}

/// The learn hook's future, boxed so that it can move to a task.
type HookFuture<E> = Pin<Box<dyn Future<Output = Result<(), E>> + Send>>;

/// A hold that finished at once, or the hook still running.
enum Hold<E> {
    Done(Duration),
    Waiting(HookFuture<E>, Instant),
}

/// What the answer cache says about a query.
enum Cached {
    /// The reply and the addresses it carries.
    Hit(Vec<u8>, Option<Learned>),
    /// Ask upstream; with a key, offer the answer to the cache.
    Miss(Option<CacheKey>),
}

impl<P: DnsPolicy, H: LearnHook> Inner<P, H> {
    /// Looks `query` (allowed by policy) up in the answer cache.
    fn cache_lookup(&self, ctx: &QueryContext, query: &[u8]) -> Cached {
        let Some(cache) = &self.answers else {
            return Cached::Miss(None);
        };
        let found = cache.lock().unwrap_or_else(|e| e.into_inner()).lookup(
            ctx.server,
            ctx.transport,
            query,
            ctx.client,
            Instant::now(),
        );
        match found {
            Lookup::Hit(hit) => {
                bump(&self.stats.answer_cache_hits);
                Cached::Hit(hit.reply, hit.learned)
            }
            Lookup::Miss(key) => {
                bump(&self.stats.answer_cache_misses);
                Cached::Miss(Some(key))
            }
            Lookup::Bypass => {
                bump(&self.stats.answer_cache_misses);
                Cached::Miss(None)
            }
        }
    }

    /// Offers an upstream answer (that matched its query) to the cache.
    fn cache_insert(&self, key: CacheKey, bytes: &[u8], learned: Option<&Learned>) {
        let Some(cache) = &self.answers else {
            return;
        };
        let done = cache.lock().unwrap_or_else(|e| e.into_inner()).insert(
            key,
            bytes,
            learned,
            Instant::now(),
        );
        if done.stored {
            bump(&self.stats.answer_cache_inserts);
        }
        if done.evicted > 0 {
            self.stats
                .answer_cache_evictions
                .fetch_add(done.evicted as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The end of an allowed UDP query, its answer from upstream or from
    /// the cache: held for the learn hook, told to the observer, queued
    /// for `client` (or, when the hook has to wait, sent later from a task
    /// of its own). An upstream answer with a `cache_key` is offered to the
    /// answer cache once held, so that no hit is served before the hook
    /// has run for it. `keep` lives until the reply is sent.
    #[allow(clippy::too_many_arguments)]
    fn release_udp<K: Send + 'static>(
        self: &Arc<Self>,
        pending: Box<PendingQuery>,
        client: SocketAddr,
        bytes: &[u8],
        learned: Option<Learned>,
        cache_key: Option<CacheKey>,
        keep: K,
        out: &mut Outbox,
    ) {
        let for_cache = cache_key.map(|key| (key, learned.clone()));
        let seen = self.seen(&learned);
        let hold = match learned {
            None => None,
            Some(learned) => match self.begin_hold(learned, pending.name()) {
                Hold::Done(took) => Some(took),
                Hold::Waiting(fut, start) => {
                    // The answer waits on a task of its own; this one goes
                    // on with the other queries or answers.
                    let bytes = bytes.to_vec();
                    let this = self.clone();
                    tokio::spawn(async move {
                        let took = this.wait_hold(fut, start, pending.name()).await;
                        if let Some((key, learned)) = for_cache {
                            this.cache_insert(key, &bytes, learned.as_ref());
                        }
                        this.observe(&pending, &bytes, seen.as_ref(), Some(took));
                        this.reply_udp_now(pending.server(), client, &bytes);
                        drop(keep);
                    });
                    return;
                }
            },
        };
        if let Some((key, learned)) = for_cache {
            self.cache_insert(key, bytes, learned.as_ref());
        }
        self.observe(&pending, bytes, seen.as_ref(), hold);
        self.reply_udp(pending.server(), client, bytes, out);
    }

    fn count_relayed(&self, truncated: bool, unparsed: bool) {
        let s = &self.stats;
        bump(&s.responses_relayed);
        if truncated {
            bump(&s.responses_truncated);
        }
        if unparsed {
            bump(&s.responses_unparsed);
        }
    }

    /// A copy of what the observer will be told, only when someone watches.
    fn seen(&self, learned: &Option<Learned>) -> Option<Learned> {
        self.observer.get().and(learned.clone())
    }

    fn observe(
        &self,
        pending: &PendingQuery,
        bytes: &[u8],
        learned: Option<&Learned>,
        hold: Option<Duration>,
    ) {
        if let Some(observer) = self.observer.get() {
            observer.relayed(&Relayed {
                query: pending.context(),
                name: pending.name(),
                qtype: pending.qtype(),
                rcode: bytes.get(3).map_or(0, |b| b & 0x0f),
                learned,
                hold,
            });
        }
    }

    /// Runs the learn hook. Most calls find nothing new to program and
    /// finish when first polled: no task then. Otherwise the caller awaits
    /// [`Inner::wait_hold`].
    fn begin_hold(&self, learned: Learned, name: &Fqdn) -> Hold<H::Error> {
        let start = Instant::now();
        let hook = self.hook.clone();
        let mut fut: HookFuture<H::Error> = Box::pin(async move { hook.learn(learned).await });
        match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(r) => {
                if let Err(e) = r {
                    warn!(%name, error = %e, "learn hook failed: releasing the answer");
                    bump(&self.stats.learn_errors);
                }
                let took = start.elapsed();
                self.stats.record_hold(took);
                Hold::Done(took)
            }
            Poll::Pending => Hold::Waiting(fut, start),
        }
    }

    /// Waits for a hook that did not finish at once, at most the hold
    /// bound (it keeps running on its own task after that). Returns how
    /// long the answer was held.
    async fn wait_hold(&self, fut: HookFuture<H::Error>, start: Instant, name: &Fqdn) -> Duration {
        let task = tokio::spawn(fut);
        let left = self.config.hold_timeout.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                warn!(%name, error = %e, "learn hook failed: releasing the answer");
                bump(&self.stats.learn_errors);
            }
            Ok(Err(join)) => {
                warn!(%name, error = %join, "learn hook panicked");
                bump(&self.stats.learn_errors);
            }
            Err(_) => {
                warn!(
                    %name,
                    bound = ?self.config.hold_timeout,
                    "learn hook still running at the hold bound: releasing the answer"
                );
                bump(&self.stats.hold_timeouts);
            }
        }
        let took = start.elapsed();
        self.stats.record_hold(took);
        took
    }

    /// Queues `reply` to `client` from `server`'s address in `out`.
    fn reply_udp(&self, server: SocketAddr, client: SocketAddr, reply: &[u8], out: &mut Outbox) {
        match self.reply_socket(server) {
            Ok(sock) => out.push(Target::Reply { sock, client }, reply),
            Err(e) => {
                warn!(%server, error = %e, "cannot bind a reply socket to the server's address");
                bump(&self.stats.client_send_errors);
            }
        }
    }

    /// Sends `reply` to `client` from `server`'s address now, without
    /// waiting (a full socket buffer: on a task).
    fn reply_udp_now(&self, server: SocketAddr, client: SocketAddr, reply: &[u8]) {
        let sock = match self.reply_socket(server) {
            Ok(s) => s,
            Err(e) => {
                warn!(%server, error = %e, "cannot bind a reply socket to the server's address");
                bump(&self.stats.client_send_errors);
                return;
            }
        };
        match sock.try_send_to(reply, client) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let reply = reply.to_vec();
                let stats = self.stats.clone();
                tokio::spawn(async move {
                    if let Err(e) = sock.send_to(&reply, client).await {
                        debug!(%client, error = %e, "sending the reply");
                        bump(&stats.client_send_errors);
                    }
                });
            }
            Err(e) => {
                debug!(%client, error = %e, "sending the reply");
                bump(&self.stats.client_send_errors);
            }
        }
    }

    fn reply_socket(&self, server: SocketAddr) -> io::Result<Arc<UdpSocket>> {
        let mut map = self.reply_sockets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(&server) {
            return Ok(s.clone());
        }
        if map.len() >= MAX_REPLY_SOCKETS {
            map.clear();
        }
        let sock = Arc::new(UdpSocket::from_std(sock::transparent_udp(server)?)?);
        map.insert(server, sock.clone());
        Ok(sock)
    }
}

/// The UDP path's end: an upstream socket's receive task hands over each
/// answer (or timeout, or failure) here.
impl<P: DnsPolicy, H: LearnHook> Finish for Inner<P, H> {
    fn finish(self: Arc<Self>, query: InFlight, outcome: Exchange<'_>, out: &mut Outbox) {
        let InFlight {
            pending,
            client,
            cache_key,
            _slot: slot,
        } = query;
        let answer = match outcome {
            Exchange::Answer(a) => a,
            Exchange::Timeout => {
                bump(&self.stats.upstream_timeouts);
                let reply = pending.servfail();
                return self.reply_udp(pending.server(), client, &reply, out);
            }
            Exchange::Failed(e) => {
                debug!(server = %pending.server(), error = %e, "UDP exchange with upstream");
                bump(&self.stats.upstream_errors);
                let reply = pending.servfail();
                return self.reply_udp(pending.server(), client, &reply, out);
            }
        };
        self.count_relayed(answer.truncated, answer.unparsed);
        self.release_udp(
            pending,
            client,
            answer.bytes,
            answer.learned,
            cache_key,
            slot,
            out,
        );
    }
}

/// A DNS message with its two-octet TCP length prefix.
fn frame(msg: &[u8]) -> Vec<u8> {
    let len = u16::try_from(msg.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&msg[..usize::from(len)]);
    out
}

/// One length-prefixed message; `None` at a clean end of stream.
async fn read_frame(s: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut msg).await?;
    Ok(Some(msg))
}
