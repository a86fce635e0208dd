//! The async shell: accept TPROXYed connections, serve HTTP/1.1 and
//! HTTP/2 (prior knowledge) with hyper, apply [`crate::decide`], forward
//! allowed requests over pooled upstream connections to the original
//! destination with bodies streamed both ways, pass upgrades (WebSocket)
//! through once allowed, and check TLS server names.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::decide::{bad_request_response, decide, denied_response, is_grpc, BadRequest, Decision};
use crate::h1scan::HeadScanner;
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
    /// Pooled upstream connections unused for this long are dropped
    /// (default 30 s).
    pub upstream_idle_timeout: Duration,
    /// Upstream HTTP/1 connections kept per destination (default 256).
    pub max_pooled_per_upstream: usize,
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
            upstream_idle_timeout: Duration::from_secs(30),
            max_pooled_per_upstream: 256,
            upstream_mark: None,
            transparent_upstream: false,
            tls_hello_timeout: Duration::from_secs(10),
            max_concurrent_streams: 256,
        }
    }
}

struct Shared {
    config: ProxyConfig,
    policy: Arc<dyn PolicySource>,
    events: EventSink,
    pool: Pool,
    local: SocketAddr,
    epoch: Instant,
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
        let std = sock::listener(config.listen, config.transparent)?;
        let listener = TcpListener::from_std(std)?;
        let local = listener.local_addr()?;
        Ok(L7Proxy {
            listener,
            shared: Arc::new(Shared {
                config,
                policy,
                events,
                pool: Pool::default(),
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
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
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

impl Shared {
    fn emit(&self, e: L7Event) {
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
            method: String::new(),
            path: String::new(),
            host,
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

    async fn http(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        let cfg = &self.config;
        let activity = Arc::new(AtomicU64::new(self.now_ms()));
        let scanner = Arc::new(Mutex::new(HeadScanner::new(cfg.max_header_bytes.max(8192))));
        let io = TokioIo::new(ActivityIo {
            inner: stream,
            activity: activity.clone(),
            epoch: self.epoch,
            scanner: scanner.clone(),
        });
        let shared = self.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let shared = shared.clone();
            let framing = if req.version() < Version::HTTP_2 {
                lock(&scanner).next_request()
            } else {
                None
            };
            async move { Ok::<_, Infallible>(shared.request(req, peer, dst, framing).await) }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(cfg.header_read_timeout)
            .max_buf_size(cfg.max_header_bytes.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(cfg.max_header_bytes.min(u32::MAX as usize) as u32)
            .max_concurrent_streams(cfg.max_concurrent_streams);
        let conn = builder.serve_connection_with_upgrades(io, svc);
        tokio::pin!(conn);
        let idle = cfg.idle_timeout;
        let idle_ms = idle.as_millis() as u64;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(%peer, %dst, error = %e, "l7 client connection ended");
                    }
                    return;
                }
                _ = tokio::time::sleep(idle) => {
                    let quiet = self.now_ms().saturating_sub(activity.load(Ordering::Relaxed));
                    if quiet >= idle_ms {
                        debug!(%peer, %dst, "l7 client connection idle, closed");
                        return;
                    }
                }
            }
        }
    }

    async fn request(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        dst: SocketAddr,
        framing: Option<BadRequest>,
    ) -> Response<RespBody> {
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
        let (mut decision, summary) = decide(&parts, &egress, &ingress);
        if let Some(e) = framing {
            decision = Decision::Malformed(e);
        }
        let mut event = L7Event {
            time: SystemTime::now(),
            verdict: Verdict::Allowed,
            protocol,
            src: peer,
            dst,
            method: summary.method,
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
                return bad_request_response(&e).map(Either::Right);
            }
            Decision::Deny { policies } => {
                event.verdict = Verdict::Denied;
                event.policy = Some(policies.clone());
                self.emit(event);
                drain(body);
                return denied_response(grpc, &policies).map(Either::Right);
            }
            Decision::Forward {
                path_and_query,
                policy,
            } => {
                event.policy = policy;
                self.emit(event);
                path_and_query
            }
        };
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.path_and_query = PathAndQuery::try_from(path_and_query).ok();
        match Uri::from_parts(uri) {
            Ok(u) => parts.uri = u,
            Err(_) => return simple(StatusCode::BAD_REQUEST, "Bad request: target\n"),
        }
        let upgrade = parts.version <= Version::HTTP_11 && wants_upgrade(&parts.headers);
        strip_hop_by_hop(
            &mut parts.headers,
            upgrade,
            parts.version == Version::HTTP_2,
        );
        let req = Request::from_parts(parts, body);
        let result = if upgrade {
            self.forward_upgrade(req, peer, dst).await
        } else {
            self.forward(req, peer, dst).await
        };
        match result {
            Ok(mut resp) => {
                let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                strip_hop_by_hop(resp.headers_mut(), switching, false);
                resp.map(Either::Left)
            }
            Err(e) => {
                debug!(%dst, error = %e, "l7 upstream failed");
                let status = if e.connect {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::BAD_GATEWAY
                };
                simple(status, "Upstream unavailable\n")
            }
        }
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
        )
        .await
        .map(TokioIo::new)
        .map_err(|e| UpstreamError::connect(e.to_string()))
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let h2 = req.version() == Version::HTTP_2;
        let key = (self.source(peer).map(|s| s.ip()), dst, h2);
        let now = Instant::now();
        let max_idle = self.config.upstream_idle_timeout;
        if h2 {
            let mut sender = match self.pool.take_h2(key) {
                Some(s) => s,
                None => {
                    // One dial at a time per destination: requests arriving
                    // meanwhile (a client's burst of streams) wait for it and
                    // share the connection instead of each opening one. A
                    // waiter that waits longer than a connect dials itself.
                    let dial = self.pool.h2_dial_lock(key);
                    let _dialing = tokio::time::timeout(self.config.connect_timeout, dial.lock())
                        .await
                        .ok();
                    match self.pool.take_h2(key) {
                        Some(s) => s,
                        None => {
                            let io = self.connect(peer, dst).await?;
                            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                                .timer(TokioTimer::new())
                                .handshake(io)
                                .await
                                .map_err(UpstreamError::other)?;
                            tokio::spawn(conn);
                            self.pool.put(
                                key,
                                Sender::H2(sender.clone()),
                                now,
                                self.config.max_pooled_per_upstream,
                            );
                            sender
                        }
                    }
                }
            };
            let fut = sender.send_request(req);
            self.pool.put(
                key,
                Sender::H2(sender),
                now,
                self.config.max_pooled_per_upstream,
            );
            return fut.await.map_err(UpstreamError::other);
        }
        let mut sender = match self.pool.take_h1(key, now, max_idle) {
            Some(s) => s,
            None => {
                let io = self.connect(peer, dst).await?;
                let (sender, conn) = http1::Builder::new()
                    .handshake(io)
                    .await
                    .map_err(UpstreamError::other)?;
                tokio::spawn(conn);
                sender
            }
        };
        let fut = sender.send_request(req);
        // Back into the pool at once: it is taken again only once its
        // response has been read to the end (is_ready).
        self.pool.put(
            key,
            Sender::H1(sender),
            now,
            self.config.max_pooled_per_upstream,
        );
        fut.await.map_err(UpstreamError::other)
    }

    /// An upgrade (WebSocket, h2c is not offered upstream) on a connection
    /// of its own; on 101 both sides are joined byte for byte.
    async fn forward_upgrade(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let client = hyper::upgrade::on(&mut req);
        let io = self.connect(peer, dst).await?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(UpstreamError::other)?;
        tokio::spawn(conn.with_upgrades());
        let mut resp = sender
            .send_request(req)
            .await
            .map_err(UpstreamError::other)?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let (Ok(c), Ok(u)) = tokio::join!(client, upstream) else {
                    return;
                };
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u)).await;
            });
        }
        Ok(resp)
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

/// A WebSocket upgrade (the only upgrade passed through). Others, h2c
/// above all, would turn the rest of the connection into requests the
/// proxy never sees, so their Upgrade header is dropped and the request is
/// forwarded as a plain one.
fn wants_upgrade(h: &HeaderMap) -> bool {
    let websocket = h.get(header::UPGRADE).is_some_and(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .all(|t| t.trim().eq_ignore_ascii_case("websocket"))
        })
    });
    websocket
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Removes connection-specific headers (RFC 9110 7.6.1), keeping
/// `Connection`/`Upgrade` for an upgrade and `TE: trailers` for HTTP/2
/// (gRPC needs it).
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool, h2: bool) {
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

enum Sender {
    H1(http1::SendRequest<Incoming>),
    H2(http2::SendRequest<Incoming>),
}

/// (source address when transparent, destination, h2).
type PoolKey = (Option<std::net::IpAddr>, SocketAddr, bool);

/// Upstream connections by [`PoolKey`]. HTTP/2: one
/// shared connection. HTTP/1: a stack of connections, each taken when it
/// is ready for another request.
#[derive(Default)]
struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<(Sender, Instant)>>>,
    /// Held while an HTTP/2 connection to the key is being dialled.
    h2_dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
}

impl Pool {
    fn h2_dial_lock(&self, key: PoolKey) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.h2_dialing).entry(key).or_default().clone()
    }

    fn take_h2(&self, key: PoolKey) -> Option<http2::SendRequest<Incoming>> {
        let mut map = lock(&self.conns);
        let list = map.get_mut(&key)?;
        list.retain(|(s, _)| match s {
            Sender::H2(s) => !s.is_closed(),
            Sender::H1(_) => false,
        });
        match list.last() {
            Some((Sender::H2(s), _)) => Some(s.clone()),
            _ => None,
        }
    }

    fn take_h1(
        &self,
        key: PoolKey,
        now: Instant,
        max_idle: Duration,
    ) -> Option<http1::SendRequest<Incoming>> {
        let mut map = lock(&self.conns);
        let list = map.get_mut(&key)?;
        list.retain(|(s, used)| match s {
            Sender::H1(s) => {
                let stale = s.is_ready() && now.duration_since(*used) > max_idle;
                !s.is_closed() && !stale
            }
            Sender::H2(_) => false,
        });
        let i = list.iter().rposition(|(s, _)| match s {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(_) => false,
        })?;
        match list.swap_remove(i).0 {
            Sender::H1(s) => Some(s),
            Sender::H2(_) => None,
        }
    }

    fn put(&self, key: PoolKey, sender: Sender, now: Instant, max: usize) {
        let mut map = lock(&self.conns);
        let list = map.entry(key).or_default();
        match sender {
            Sender::H2(s) => {
                // One shared connection: keep the newest.
                list.clear();
                list.push((Sender::H2(s), now));
            }
            Sender::H1(s) => {
                if list.len() < max {
                    list.push((Sender::H1(s), now));
                }
            }
        }
    }
}

/// A client socket that records when it last moved bytes (idle timeout).
struct ActivityIo {
    inner: TcpStream,
    activity: Arc<AtomicU64>,
    epoch: Instant,
    scanner: Arc<Mutex<HeadScanner>>,
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
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
            lock(&self.scanner).feed(&buf.filled()[before..]);
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

    #[test]
    fn upgrade_detection() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!wants_upgrade(&h));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(wants_upgrade(&h));
    }
}
