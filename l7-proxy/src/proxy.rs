//! The async shell: accept TPROXYed connections, serve HTTP/1.1 and
//! HTTP/2 (prior knowledge) with hyper, apply [`crate::decide`], forward
//! allowed requests to the original destination over the client
//! connection's own upstream connection, polled by the same task (no
//! per-request hop between tasks), with bodies streamed both ways, pass
//! upgrades (WebSocket) through once allowed, and check TLS server names.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::task::AtomicWaker;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::decide::{
    bad_request_response, decide, denied_response, is_grpc, path_and_query, Decision,
};
use crate::pool::Pool;
use crate::relay::{self, idle_watch, Buf, End, Relay, H2_PREFACE};
use crate::sni::{parse_client_hello, Hello, SniVerdict, MAX_CLIENT_HELLO};
use crate::{sock, Direction, EventSink, L7Event, L7Protocol, PolicySource, PortPolicy, Verdict};

/// Listener address, limits and timeouts. [`Default`] gives the defaults.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where TPROXY delivers connections (default `127.0.0.1:15001`).
    pub listen: SocketAddr,
    /// Set IP_TRANSPARENT on the listener (needed for TPROXY; default on).
    pub transparent: bool,
    /// Largest request head (HTTP/1 buffer, HTTP/2 header list), bytes
    /// (default 64 KiB; HTTP/1 needs at least 8 KiB).
    pub max_header_bytes: usize,
    /// Time a client has to send a complete HTTP/1 request head (slowloris;
    /// default 10 s).
    pub header_read_timeout: Duration,
    /// A client connection with no bytes either way for this long is closed
    /// (default 300 s).
    pub idle_timeout: Duration,
    /// Upstream connect timeout (default 5 s).
    pub connect_timeout: Duration,
    /// Set SO_REUSEPORT on the listener, so that several proxies (one per
    /// thread) share the address and the kernel spreads connections over
    /// them (default off).
    pub reuse_port: bool,
    /// SO_MARK on upstream sockets (so nftables can skip the proxy's own
    /// traffic); default none.
    pub upstream_mark: Option<u32>,
    /// Connect upstream from the client's address (IP_TRANSPARENT bind), so
    /// the destination and the policies on its way see the real client;
    /// replies must then be delivered to the proxy (nftables `socket
    /// transparent` + policy routing). Default off: the node's address.
    pub transparent_upstream: bool,
    /// Time a TLS client has to send its ClientHello (default 10 s).
    pub tls_hello_timeout: Duration,
    /// Concurrent HTTP/2 streams per client connection (default 256).
    pub max_concurrent_streams: u32,
    /// How long an idle HTTP/1.1 upstream connection is kept for the next
    /// client connection with the same source and destination (default
    /// 4 s, under the 5 s keep-alive of common servers; zero keeps none).
    pub upstream_idle_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 15001)),
            transparent: true,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(5),
            reuse_port: false,
            upstream_mark: None,
            transparent_upstream: false,
            tls_hello_timeout: Duration::from_secs(10),
            max_concurrent_streams: 256,
            upstream_idle_timeout: Duration::from_secs(4),
        }
    }
}

pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    pub(crate) policy: Arc<dyn PolicySource>,
    events: EventSink,
    local: SocketAddr,
    epoch: Instant,
    /// Idle upstream connections of this listener's thread.
    pub(crate) pool: Pool,
}

/// The proxy: a bound listener and what it needs to serve.
pub struct L7Proxy {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl L7Proxy {
    /// Binds the listener (call inside a tokio runtime, in the node's
    /// network namespace).
    pub fn bind(
        config: ProxyConfig,
        policy: Arc<dyn PolicySource>,
        events: EventSink,
    ) -> io::Result<Self> {
        let std = sock::listener(config.listen, config.transparent, config.reuse_port)?;
        Self::from_std(std, config, policy, events)
    }

    /// A proxy on a listener bound by [`sock::listener`] (inside a tokio
    /// runtime).
    fn from_std(
        std: std::net::TcpListener,
        config: ProxyConfig,
        policy: Arc<dyn PolicySource>,
        events: EventSink,
    ) -> io::Result<Self> {
        let listener = TcpListener::from_std(std)?;
        let local = listener.local_addr()?;
        Ok(L7Proxy {
            listener,
            shared: Arc::new(Shared {
                pool: Pool::new(config.upstream_idle_timeout),
                config,
                policy,
                events,
                local,
                epoch: Instant::now(),
            }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local
    }

    /// Serves until the task is dropped.
    pub async fn run(self) {
        self.run_until(std::future::pending()).await
    }

    /// Serves until `shutdown` completes (open connections finish on their
    /// own tasks).
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        // Idle upstream connections past their time (or closed by their
        // server) are let go at least this often.
        let sweep_every = (self.shared.pool.idle_timeout() / 2).max(Duration::from_millis(100));
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = sweep.tick() => self.shared.pool.sweep(),
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let shared = self.shared.clone();
                        tokio::spawn(async move { shared.connection(stream, sock::unmap(peer)).await });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "l7 proxy accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }
}

/// Proxy threads started by [`spawn_threads`].
pub struct ProxyThreads {
    /// One per thread; a thread ends only by panicking.
    pub handles: Vec<std::thread::JoinHandle<()>>,
    /// The address each served config listens on (port 0 resolved).
    pub listening: Vec<SocketAddr>,
    /// Configs (after the first) that could not be bound, with the error.
    pub skipped: Vec<(SocketAddr, io::Error)>,
}

/// Serves every config of `configs` (one listener each) on `threads`
/// threads (at least one), each with its own current-thread tokio runtime
/// and its own listening sockets: with more than one thread they share the
/// address through SO_REUSEPORT, the kernel spreads connections over them,
/// and a connection is served by one thread from accept to close (no locks
/// or wake-ups between threads per request). Every socket is bound before
/// this returns: a failure on the first config is the error; a later
/// config that cannot be bound is left out (`skipped`).
pub fn spawn_threads(
    threads: usize,
    configs: Vec<ProxyConfig>,
    policy: Arc<dyn PolicySource>,
    events: EventSink,
    name: &str,
) -> io::Result<ProxyThreads> {
    let threads = threads.max(1);
    let mut per_thread: Vec<Vec<(std::net::TcpListener, ProxyConfig)>> =
        (0..threads).map(|_| Vec::new()).collect();
    let mut listening = Vec::new();
    let mut skipped = Vec::new();
    for (index, mut config) in configs.into_iter().enumerate() {
        config.reuse_port |= threads > 1;
        let bound = (|| {
            let first = sock::listener(config.listen, config.transparent, config.reuse_port)?;
            // Port 0: the others take the port the first one got.
            let addr = first.local_addr()?;
            let mut all = vec![first];
            for _ in 1..threads {
                all.push(sock::listener(addr, config.transparent, true)?);
            }
            Ok::<_, io::Error>((addr, all))
        })();
        match bound {
            Ok((addr, all)) => {
                listening.push(addr);
                for (t, l) in all.into_iter().enumerate() {
                    per_thread[t].push((l, config.clone()));
                }
            }
            Err(e) if index == 0 => return Err(e),
            Err(e) => skipped.push((config.listen, e)),
        }
    }
    // Runtimes and registrations here, so that their errors are this
    // call's; the threads only serve.
    let mut ready = Vec::new();
    for listeners in per_thread {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let proxies = {
            let _in = runtime.enter();
            listeners
                .into_iter()
                .map(|(std, config)| L7Proxy::from_std(std, config, policy.clone(), events.clone()))
                .collect::<io::Result<Vec<_>>>()?
        };
        ready.push((runtime, proxies));
    }
    let mut handles = Vec::new();
    for (t, (runtime, proxies)) in ready.into_iter().enumerate() {
        let handle = std::thread::Builder::new()
            .name(format!("{name}-{t}"))
            .spawn(move || {
                runtime.block_on(futures::future::join_all(
                    proxies.into_iter().map(L7Proxy::run),
                ));
            })?;
        handles.push(handle);
    }
    Ok(ProxyThreads {
        handles,
        listening,
        skipped,
    })
}

impl Shared {
    pub(crate) fn emit(&self, e: L7Event) {
        (self.events)(e)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let Ok(dst) = stream.local_addr().map(sock::unmap) else {
            return;
        };
        if dst == self.local {
            // Not redirected: connected to the listener itself; forwarding
            // would loop.
            debug!(%peer, "direct connection to the l7 proxy refused");
            return;
        }
        let _ = stream.set_nodelay(true);
        let egress = self.policy.lookup(peer.ip(), dst, Direction::Egress);
        let ingress = self.policy.lookup(peer.ip(), dst, Direction::Ingress);
        let tls = matches!(egress, PortPolicy::Sni(_)) || matches!(ingress, PortPolicy::Sni(_));
        let allow_all =
            matches!(egress, PortPolicy::AllowAll) && matches!(ingress, PortPolicy::AllowAll);
        if tls {
            self.tls(stream, peer, dst, [egress, ingress]).await
        } else if allow_all {
            self.passthrough(stream, peer, dst, Vec::new()).await
        } else {
            self.http(stream, peer, dst).await
        }
    }

    async fn passthrough(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        first: Vec<u8>,
    ) {
        let cfg = &self.config;
        let Ok(mut upstream) = sock::connect(
            dst,
            self.source(peer),
            cfg.upstream_mark,
            cfg.connect_timeout,
            !first.is_empty(),
        )
        .await
        else {
            sock::reset(client);
            return;
        };
        if !first.is_empty() && upstream.write_all(&first).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }

    async fn tls(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        policies: [PortPolicy; 2],
    ) {
        let mut buf = Vec::with_capacity(2048);
        let deadline = tokio::time::Instant::now() + self.config.tls_hello_timeout;
        let event = |verdict, host: Option<String>, policy, reason: Option<String>| L7Event {
            time: SystemTime::now(),
            verdict,
            protocol: L7Protocol::Tls,
            src: peer,
            dst,
            method: "".into(),
            path: "".into(),
            host: host.map(Into::into),
            policy,
            reason,
        };
        let sni = loop {
            match parse_client_hello(&buf) {
                Ok(Hello::Complete(sni)) => break sni,
                Ok(Hello::Incomplete) => {}
                Err(e) => {
                    self.emit(event(Verdict::Malformed, None, None, Some(e.to_string())));
                    return sock::reset(stream);
                }
            }
            let mut chunk = [0u8; 4096];
            let want = (MAX_CLIENT_HELLO + 1 - buf.len()).min(chunk.len());
            match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want])).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => {
                    self.emit(event(
                        Verdict::Malformed,
                        None,
                        None,
                        Some("no complete ClientHello".into()),
                    ));
                    return sock::reset(stream);
                }
            }
        };
        let mut allowed_by = None;
        for p in &policies {
            let verdict = match p {
                PortPolicy::AllowAll => continue,
                PortPolicy::Sni(rules) => rules.check(sni.as_deref()),
                // HTTP rules cannot be checked inside TLS.
                PortPolicy::Http(_) => SniVerdict::Denied("HTTP rules on a TLS connection".into()),
            };
            match verdict {
                SniVerdict::Allowed(p) => allowed_by = Some(p),
                SniVerdict::Denied(p) => {
                    self.emit(event(Verdict::Denied, sni, Some(p), None));
                    return sock::reset(stream);
                }
            }
        }
        self.emit(event(Verdict::Allowed, sni, allowed_by, None));
        self.passthrough(stream, peer, dst, buf).await
    }

    /// HTTP: h2 prior knowledge (the preface) is served by hyper; anything
    /// else by the HTTP/1.1 relay ([`crate::relay`]).
    async fn http(self: Arc<Self>, mut stream: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        let cfg = &self.config;
        let max_head = cfg.max_header_bytes.max(8192);
        let first_deadline = tokio::time::Instant::now() + cfg.header_read_timeout;
        let mut buf = Buf::new();
        loop {
            let d = buf.filled();
            let maybe_h2 = d.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(d);
            if !d.is_empty() && !maybe_h2 {
                break;
            }
            match tokio::time::timeout_at(first_deadline, buf.read_from(&mut stream, max_head))
                .await
            {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
        if buf.filled().starts_with(H2_PREFACE) {
            let prefix = buf.filled().to_vec();
            return self.h2(stream, peer, dst, prefix).await;
        }
        let activity = AtomicU64::new(0);
        let relay = Relay {
            shared: &self,
            peer,
            dst,
            client: stream,
            cbuf: buf,
            first_deadline,
            activity: &activity,
        };
        // Biased: the relay first, no random pick on every wake-up.
        let end = tokio::select! {
            biased;
            end = relay.run() => end,
            _ = idle_watch(&activity, cfg.idle_timeout) => {
                debug!(%peer, %dst, "l7 client connection idle, closed");
                End::Closed
            }
        };
        match end {
            End::Closed => {}
            End::Linger(client) => relay::linger(client).await,
            End::Tunnel {
                client,
                upstream,
                to_client,
                to_upstream,
            } => relay::tunnel(client, upstream, to_client, to_upstream).await,
        }
    }

    async fn h2(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        prefix: Vec<u8>,
    ) {
        let cfg = &self.config;
        let activity = Arc::new(AtomicU64::new(self.now_ms()));
        let io = TokioIo::new(ActivityIo {
            inner: stream,
            activity: activity.clone(),
            epoch: self.epoch,
            prefix,
            pos: 0,
        });
        let exec = LocalExec::default();
        // What every stream of the connection needs, behind one Arc (one
        // reference count per stream).
        let route = Arc::new(Route {
            shared: self.clone(),
            peer,
            dst,
            exec: exec.clone(),
            h2: tokio::sync::Mutex::new(None),
        });
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let route = route.clone();
            async move { Ok::<_, Infallible>(route.shared.request(req, &route).await) }
        });
        let conn = hyper::server::conn::http2::Builder::new(exec.clone())
            .timer(TokioTimer::new())
            .max_header_list_size(cfg.max_header_bytes.min(u32::MAX as usize) as u32)
            .max_concurrent_streams(cfg.max_concurrent_streams)
            .serve_connection(io, svc);
        tokio::pin!(conn);
        // The client connection, its HTTP/2 streams and its upstream
        // connections are all polled here, by this one task.
        let mut tasks = FuturesUnordered::new();
        let wakers = exec.wakers();
        let mut drive =
            std::future::poll_fn(|cx| exec.drive(&mut tasks, conn.as_mut(), &wakers, cx));
        let idle = cfg.idle_timeout;
        let idle_ms = idle.as_millis() as u64;
        loop {
            tokio::select! {
                // The connection first, no random pick on every wake-up.
                biased;
                r = &mut drive => {
                    if let Err(e) = r {
                        debug!(%peer, %dst, error = %e, "l7 client connection ended");
                    }
                    break;
                }
                _ = tokio::time::sleep(idle) => {
                    let quiet = self.now_ms().saturating_sub(activity.load(Ordering::Relaxed));
                    if quiet >= idle_ms {
                        debug!(%peer, %dst, "l7 client connection idle, closed");
                        break;
                    }
                }
            }
        }
        // Futures spawned but never polled hold the executor (through the
        // connection's Route): drop them (outside the lock), or the
        // executor and they would keep each other alive.
        let unpolled = std::mem::take(&mut *lock(&exec.0.spawned));
        drop(unpolled);
    }

    async fn request(&self, req: Request<Incoming>, route: &Route) -> Response<RespBody> {
        // The decision is synchronous: across the await this future holds
        // only the forwarding, which keeps it (and hyper's box around it
        // per stream) small.
        let req = match self.admit(req, route) {
            Ok(req) => req,
            Err(answer) => return answer,
        };
        match self.forward(req, route).await {
            Ok(mut resp) => {
                strip_hop_by_hop(resp.headers_mut(), false, false);
                resp.map(Either::Left)
            }
            Err(e) => {
                debug!(dst = %route.dst, error = %e, "l7 upstream failed");
                let status = if e.connect {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::BAD_GATEWAY
                };
                simple(status, "Upstream unavailable\n")
            }
        }
    }

    /// The decision on a request, with its event: the request to forward
    /// (target normalised, hop-by-hop headers stripped), or the answer.
    // The Err is the answer to send, taken once by `request`, not an
    // error passed up through `?`.
    #[allow(clippy::result_large_err)]
    fn admit(
        &self,
        req: Request<Incoming>,
        route: &Route,
    ) -> Result<Request<Incoming>, Response<RespBody>> {
        let (peer, dst) = (route.peer, route.dst);
        let (mut parts, body) = req.into_parts();
        let egress = self.policy.lookup(peer.ip(), dst, Direction::Egress);
        let ingress = self.policy.lookup(peer.ip(), dst, Direction::Ingress);
        let grpc = is_grpc(&parts.headers);
        let protocol = if grpc {
            L7Protocol::Grpc
        } else if parts.version == Version::HTTP_2 {
            L7Protocol::Http2
        } else {
            L7Protocol::Http1
        };
        let (decision, summary) = decide(&parts, &egress, &ingress);
        let mut event = L7Event {
            time: SystemTime::now(),
            verdict: Verdict::Allowed,
            protocol,
            src: peer,
            dst,
            method: summary.method.into(),
            path: summary.path,
            host: summary.host,
            policy: None,
            reason: None,
        };
        let path_and_query = match decision {
            Decision::Malformed(e) => {
                event.verdict = Verdict::Malformed;
                event.reason = Some(e.to_string());
                self.emit(event);
                return Err(bad_request_response(&e).map(Either::Right));
            }
            Decision::Deny { policies } => {
                event.verdict = Verdict::Denied;
                event.policy = Some(policies.clone());
                self.emit(event);
                drain(body);
                return Err(denied_response(grpc, &policies).map(Either::Right));
            }
            Decision::Forward { policy } => {
                // A path borrowed from the target is already in normal
                // form: the target goes on as it is.
                let pq = match &event.path {
                    Cow::Borrowed(_) => None,
                    Cow::Owned(p) => Some(path_and_query(p, parts.uri.query())),
                };
                event.policy = policy;
                self.emit(event);
                pq
            }
        };
        if let Some(path_and_query) = path_and_query {
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.path_and_query = PathAndQuery::try_from(path_and_query).ok();
            match Uri::from_parts(uri) {
                Ok(u) => parts.uri = u,
                Err(_) => return Err(simple(StatusCode::BAD_REQUEST, "Bad request: target\n")),
            }
        }
        strip_hop_by_hop(&mut parts.headers, false, true);
        Ok(Request::from_parts(parts, body))
    }

    /// The address upstream connections of `peer` leave from (`None`: the
    /// node's, chosen by routing).
    fn source(&self, peer: SocketAddr) -> Option<std::net::SocketAddr> {
        self.config.transparent_upstream.then_some(peer)
    }

    async fn connect(
        &self,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> Result<TokioIo<TcpStream>, UpstreamError> {
        let cfg = &self.config;
        sock::connect(
            dst,
            self.source(peer),
            cfg.upstream_mark,
            cfg.connect_timeout,
            true,
        )
        .await
        .map(TokioIo::new)
        .map_err(|e| UpstreamError::connect(e.to_string()))
    }

    /// Sends an allowed request on the client connection's own upstream
    /// HTTP/2 connection (dialled on first use, again when it closed),
    /// whose future runs on the client connection's task.
    async fn forward(
        &self,
        req: Request<Incoming>,
        route: &Route,
    ) -> Result<Response<Incoming>, UpstreamError> {
        // The usual case, a live connection and no dial under way, without
        // waiting on the lock; dialling is boxed, off the per-stream
        // future (which hyper boxes per stream: a small one is cheaper).
        let live = match route.h2.try_lock() {
            Ok(slot) => slot.as_ref().filter(|s| !s.is_closed()).cloned(),
            Err(_) => None,
        };
        let mut sender = match live {
            Some(s) => s,
            None => Box::pin(self.sender(route)).await?,
        };
        sender.send_request(req).await.map_err(UpstreamError::other)
    }

    /// The upstream HTTP/2 connection's sender, dialled when there is
    /// none or it closed. Streams arriving while it is dialled wait for
    /// it and share it.
    async fn sender(&self, route: &Route) -> Result<http2::SendRequest<Incoming>, UpstreamError> {
        let mut slot = route.h2.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let io = self.connect(route.peer, route.dst).await?;
        let (sender, conn) = http2::Builder::new(route.exec.clone())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(UpstreamError::other)?;
        route.exec.spawn(async move {
            let _ = conn.await;
        });
        *slot = Some(sender.clone());
        Ok(sender)
    }
}

type RespBody = Either<Incoming, Full<Bytes>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads and discards what is left of a denied request's body (bounded in
/// bytes and time) so the client can finish sending and read the denial
/// instead of seeing its stream reset.
fn drain(body: Incoming) {
    tokio::spawn(async move {
        let mut body = body;
        let mut left: usize = 1 << 20;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(frame)) = body.frame().await {
                let n = frame.data_ref().map_or(0, |d| d.len());
                if n >= left {
                    return;
                }
                left -= n;
            }
        })
        .await;
    });
}

fn simple(status: StatusCode, body: &'static str) -> Response<RespBody> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *r.status_mut() = status;
    r
}

#[derive(Debug)]
struct UpstreamError {
    connect: bool,
    message: String,
}

impl UpstreamError {
    fn connect(message: String) -> Self {
        UpstreamError {
            connect: true,
            message,
        }
    }
    fn other(e: hyper::Error) -> Self {
        UpstreamError {
            connect: false,
            message: e.to_string(),
        }
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Removes connection-specific headers (RFC 9110 7.6.1), keeping
/// `Connection`/`Upgrade` for an upgrade and `TE: trailers` for HTTP/2
/// (gRPC needs it).
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool, h2: bool) {
    if !upgrade && !has_hop_by_hop(h, h2) {
        // The usual message: one look at each name, no removals.
        return;
    }
    strip_all_hop_by_hop(h, upgrade, h2)
}

/// [`strip_hop_by_hop`] without the quick look first.
fn strip_all_hop_by_hop(h: &mut HeaderMap, upgrade: bool, h2: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in ["keep-alive", "proxy-connection"] {
        h.remove(n);
    }
    h.remove(header::TRANSFER_ENCODING);
    h.remove(header::TRAILER);
    let te_trailers = h2
        && h.get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    h.remove(header::TE);
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

/// Whether [`strip_hop_by_hop`] (without an upgrade) would change `h`:
/// a connection-specific header is present, other than (HTTP/2) a single
/// `TE: trailers`, which it keeps as it is.
fn has_hop_by_hop(h: &HeaderMap, h2: bool) -> bool {
    h.keys().any(|n| {
        if n == header::TE {
            let mut te = h.get_all(header::TE).iter();
            let kept = h2 && te.next().is_some_and(|v| v == "trailers") && te.next().is_none();
            return !kept;
        }
        n == header::CONNECTION
            || n == header::TRANSFER_ENCODING
            || n == header::TRAILER
            || n == header::UPGRADE
            || matches!(n.as_str(), "keep-alive" | "proxy-connection")
    })
}

/// One HTTP/2 client connection: where its allowed requests go, and how.
struct Route {
    shared: Arc<Shared>,
    peer: SocketAddr,
    dst: SocketAddr,
    exec: LocalExec,
    /// The connection's upstream HTTP/2 connection (the destination of a
    /// transparently intercepted connection is fixed, so each client
    /// connection has its own; it closes with it). Held while it is
    /// dialled.
    h2: tokio::sync::Mutex<Option<http2::SendRequest<Incoming>>>,
}

type LocalFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// hyper's executor for one client connection: what hyper spawns (HTTP/2
/// streams, request body pipes) and the upstream connections are polled
/// by the connection's own task ([`LocalExec::drive`]), so a request and
/// its response never hop between tasks or threads. Wake-ups among them
/// while the task runs are rounds of the same poll, not trips through the
/// scheduler.
#[derive(Clone)]
struct LocalExec(Arc<LocalState>);

struct LocalState {
    spawned: Mutex<Vec<LocalFuture>>,
    /// [`INSIDE`] while `drive` polls; [`MAIN`] / [`TASKS`]: the
    /// connection / a spawned future was woken and is due a poll.
    state: AtomicU8,
    /// The task that drives, woken when a wake-up comes from outside.
    task: AtomicWaker,
}

const INSIDE: u8 = 1;
const MAIN: u8 = 2;
const TASKS: u8 = 4;
/// Rounds of one poll before the task yields to others.
const MAX_ROUNDS: usize = 16;

/// Wakes `drive` for one side ([`MAIN`] or [`TASKS`]).
struct SideWaker(Arc<LocalState>, u8);

impl std::task::Wake for SideWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.wake(self.1)
    }
}

impl LocalState {
    fn wake(&self, side: u8) {
        if self.state.fetch_or(side, Ordering::AcqRel) & INSIDE == 0 {
            self.task.wake();
        }
    }
}

impl Default for LocalExec {
    fn default() -> Self {
        LocalExec(Arc::new(LocalState {
            spawned: Mutex::new(Vec::new()),
            // The first poll polls both.
            state: AtomicU8::new(MAIN | TASKS),
            task: AtomicWaker::new(),
        }))
    }
}

impl LocalExec {
    /// The wakers the connection and the spawned futures are polled with.
    fn wakers(&self) -> (Waker, Waker) {
        (
            Waker::from(Arc::new(SideWaker(self.0.clone(), MAIN))),
            Waker::from(Arc::new(SideWaker(self.0.clone(), TASKS))),
        )
    }

    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        lock(&self.0.spawned).push(Box::pin(fut));
        self.0.wake(TASKS);
    }

    /// Polls `main` and everything spawned here, each only when woken,
    /// until `main` completes.
    fn drive<F: Future>(
        &self,
        tasks: &mut FuturesUnordered<LocalFuture>,
        mut main: Pin<&mut F>,
        wakers: &(Waker, Waker),
        cx: &mut Context<'_>,
    ) -> Poll<F::Output> {
        let state = &self.0.state;
        self.0.task.register(cx.waker());
        for _ in 0..MAX_ROUNDS {
            // Take what was woken; wake-ups during this round set it again
            // (INSIDE: without waking the task) for another round.
            let due = state.swap(INSIDE, Ordering::AcqRel);
            if due & (MAIN | TASKS) == 0 {
                if state
                    .compare_exchange(INSIDE, 0, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return Poll::Pending;
                }
                continue;
            }
            if due & TASKS != 0 {
                tasks.extend(lock(&self.0.spawned).drain(..));
                let mut inner = Context::from_waker(&wakers.1);
                while let Poll::Ready(Some(())) = tasks.poll_next_unpin(&mut inner) {}
            }
            if due & MAIN != 0 {
                let mut inner = Context::from_waker(&wakers.0);
                if let Poll::Ready(out) = main.as_mut().poll(&mut inner) {
                    state.store(0, Ordering::Release);
                    return Poll::Ready(out);
                }
            }
        }
        // Still busy: let other tasks run; what is due stays due.
        state.fetch_and(!INSIDE, Ordering::AcqRel);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        self.spawn(fut)
    }
}

/// A client socket that records when it last moved bytes (idle timeout).
struct ActivityIo {
    inner: TcpStream,
    activity: Arc<AtomicU64>,
    epoch: Instant,
    /// Bytes read before hyper took over (the preface), served first.
    prefix: Vec<u8>,
    pos: usize,
}

impl ActivityIo {
    fn touch(&self) {
        self.activity
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl AsyncRead for ActivityIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            buf.put_slice(&self.prefix[self.pos..self.pos + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for ActivityIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_removed() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("content-type", "application/json"),
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false, false);
        let names: Vec<&str> = plain.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type"]);
        let mut h2 = h.clone();
        strip_hop_by_hop(&mut h2, false, true);
        assert_eq!(h2["te"], "trailers");
        let mut up = h.clone();
        strip_hop_by_hop(&mut up, true, false);
        assert_eq!(up["upgrade"], "websocket");
        assert_eq!(up["connection"], "upgrade");
        assert!(!up.contains_key("x-secret"));
    }

    /// The quick look ([`has_hop_by_hop`]) says "nothing to do" exactly
    /// when stripping would leave the headers as they are.
    #[test]
    fn hop_by_hop_quick_look_agrees() {
        let extra: [&[(&str, &str)]; 12] = [
            &[],
            &[("te", "trailers")],
            &[("te", "Trailers")],
            &[("te", "trailers"), ("te", "gzip")],
            &[("te", "gzip")],
            &[("connection", "x-a")],
            &[("keep-alive", "1")],
            &[("proxy-connection", "keep-alive")],
            &[("transfer-encoding", "chunked")],
            &[("trailer", "x-b")],
            &[("upgrade", "websocket")],
            &[("x-keep-alive", "1"), ("grpc-timeout", "1S")],
        ];
        for e in extra {
            for h2 in [false, true] {
                let mut h = HeaderMap::new();
                h.append(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
                h.append("x-a", HeaderValue::from_static("1"));
                for (n, v) in e {
                    h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
                }
                let sorted = |h: &HeaderMap| {
                    let mut v: Vec<(String, Vec<u8>)> = h
                        .iter()
                        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                        .collect();
                    v.sort();
                    v
                };
                let before = sorted(&h);
                let mut full = h.clone();
                strip_all_hop_by_hop(&mut full, false, h2);
                let quick = has_hop_by_hop(&h, h2);
                assert_eq!(quick, sorted(&full) != before, "{e:?} h2 {h2}");
            }
        }
        // gRPC's single `te: trailers` over HTTP/2 is kept untouched.
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        assert!(!has_hop_by_hop(&h, true));
        strip_hop_by_hop(&mut h, false, true);
        assert_eq!(h[header::TE], "trailers");
    }
}
