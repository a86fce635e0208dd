//! The HTTP/1.1 relay's async shell around [`crate::h1`]: one task per
//! client connection, its own upstream connection (dialled on the first
//! allowed request, reused for keep-alive, closed with the client), two
//! reusable read buffers and one head buffer. Each request head is parsed
//! in place, decided on, and written onward in one write together with the
//! body bytes already read; bodies are relayed by their framing while the
//! response is read, so 100-continue and early responses work; pipelined
//! requests wait in the client buffer and are served in order. A WebSocket
//! upgrade that the upstream accepts (101) becomes a byte copy both ways.

use std::borrow::Cow;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use crate::decide::{decide_request, is_grpc_in, Decision, RequestInfo, GRPC_PERMISSION_DENIED};
use crate::h1::{
    header_slots, parse_request, parse_response, split_target, write_request_head,
    write_response_head, Body, BodyDecoder, FramingError, HeadError, ResponseError,
};
use crate::pool::PoolKey;
use crate::proxy::Shared;
use crate::rules::Headers;
use crate::{sock, Direction, L7Event, L7Protocol, Verdict};

/// A connection's read buffer: `data[start..end]` is unread.
pub(crate) struct Buf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

/// First size of a read buffer; it grows (up to the head limit) only for
/// a head that does not fit.
const INITIAL_BUF: usize = 16 * 1024;

impl Buf {
    pub(crate) fn new() -> Self {
        Buf {
            data: vec![0; INITIAL_BUF],
            start: 0,
            end: 0,
        }
    }

    pub(crate) fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads once, after making room (compacting, or growing up to
    /// `limit`); `Ok(0)` at the end of the stream.
    pub(crate) async fn read_from<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        limit: usize,
    ) -> io::Result<usize> {
        if self.end == self.data.len() {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let size = (self.data.len() * 2).min(limit.max(INITIAL_BUF));
                if size <= self.data.len() {
                    return Err(io::Error::other("buffer full"));
                }
                self.data.resize(size, 0);
            }
        }
        let n = r.read(&mut self.data[self.end..]).await?;
        self.end += n;
        Ok(n)
    }
}

/// Writes `a` then `b` with as few (vectored) writes as possible.
async fn write_two<W: AsyncWrite + Unpin>(w: &mut W, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = if a.is_empty() {
            w.write(b).await?
        } else if b.is_empty() {
            w.write(a).await?
        } else {
            w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
                .await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let k = n.min(a.len());
        a = &a[k..];
        b = &b[n - k..];
    }
    Ok(())
}

/// Where a relay failed.
#[derive(Debug)]
enum Failure {
    Client(io::Error),
    /// The client's body broke its framing.
    ClientFraming(FramingError),
    /// The client ended before its body did.
    ClientTruncated,
    Upstream(io::Error),
    UpstreamHead(ResponseError),
    UpstreamFraming(FramingError),
    /// The upstream closed before the response ended (`any`: bytes of it
    /// had arrived).
    UpstreamClosed {
        any: bool,
    },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Client(e) => write!(f, "client: {e}"),
            Failure::ClientFraming(e) => write!(f, "client body: {e}"),
            Failure::ClientTruncated => f.write_str("client ended inside its body"),
            Failure::Upstream(e) => write!(f, "upstream: {e}"),
            Failure::UpstreamHead(e) => write!(f, "upstream: {e}"),
            Failure::UpstreamFraming(e) => write!(f, "upstream body: {e}"),
            Failure::UpstreamClosed { .. } => f.write_str("upstream closed before the response"),
        }
    }
}

/// How an exchange ended.
enum Outcome {
    /// Response relayed; `close`: the client connection ends (it was told
    /// so); `reuse`: the upstream connection may carry the next request;
    /// `body_not_relayed`: the response came before the request body had
    /// gone onward whole (the client may still be sending it).
    Done {
        close: bool,
        reuse: bool,
        body_not_relayed: bool,
    },
    /// 101 relayed: both sides are joined byte for byte.
    Switched,
}

/// Moves one body from `r` to `w` by its framing: first what `buf` holds,
/// then reads; `prefix` (a head) goes out with the first bytes.
async fn relay_body<R, W>(
    r: &mut R,
    w: &mut W,
    buf: &mut Buf,
    dec: &mut BodyDecoder,
    prefix: &[u8],
    activity: &AtomicU64,
    from_client: bool,
) -> Result<(), Failure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    type Wrap = fn(io::Error) -> Failure;
    let (read_err, write_err): (Wrap, Wrap) = if from_client {
        (Failure::Client, Failure::Upstream)
    } else {
        (Failure::Upstream, Failure::Client)
    };
    let mut prefix = prefix;
    loop {
        let n = if buf.filled().is_empty() {
            0
        } else {
            dec.advance(buf.filled()).map_err(|e| {
                if from_client {
                    Failure::ClientFraming(e)
                } else {
                    Failure::UpstreamFraming(e)
                }
            })?
        };
        if n > 0 || !prefix.is_empty() {
            write_two(w, prefix, &buf.filled()[..n])
                .await
                .map_err(write_err)?;
            bump(activity);
            buf.consume(n);
            prefix = &[];
        }
        if dec.is_done() {
            return Ok(());
        }
        let got = buf.read_from(r, INITIAL_BUF).await.map_err(read_err)?;
        bump(activity);
        if got == 0 {
            return if dec.is_close_delimited() {
                Ok(())
            } else if from_client {
                Err(Failure::ClientTruncated)
            } else {
                Err(Failure::UpstreamClosed { any: true })
            };
        }
    }
}

fn bump(activity: &AtomicU64) {
    activity.store(
        activity.load(Ordering::Relaxed).wrapping_add(1),
        Ordering::Relaxed,
    );
}

/// Reads the response(s) to one request from upstream and relays them:
/// 1xx heads as they come, then the final head and its body. A final
/// response that starts before the request body has been relayed whole
/// (`request_done` still false: an early response) carries
/// `Connection: close`, as the client connection cannot be kept in step
/// after it (RFC 9112 9.6).
#[allow(clippy::too_many_arguments)]
async fn relay_response<R, W>(
    ur: &mut R,
    cw: &mut W,
    ubuf: &mut Buf,
    out: &mut Vec<u8>,
    max_head: usize,
    head_request: bool,
    upgrade: bool,
    client_close: bool,
    started: &AtomicU64,
    request_done: &AtomicBool,
    activity: &AtomicU64,
) -> Result<Outcome, Failure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let parsed = {
            let mut slots = header_slots();
            match parse_response(ubuf.filled(), &mut slots, max_head, head_request) {
                Ok(Some(head)) => {
                    let code = head.code;
                    let info = !matches!(code, 101) && (100..200).contains(&code);
                    if code == 101 && !upgrade {
                        return Err(Failure::UpstreamHead(ResponseError::Syntax(
                            "101 to a request without an upgrade",
                        )));
                    }
                    let close = !info
                        && (client_close || head.close || !request_done.load(Ordering::Relaxed));
                    write_response_head(out, &head, close);
                    Some((head.len, head.body, code, info, close, head.close))
                }
                Ok(None) => None,
                Err(e) => return Err(Failure::UpstreamHead(e)),
            }
        };
        let Some((len, body, code, info, close, up_close)) = parsed else {
            let n = ubuf
                .read_from(ur, max_head)
                .await
                .map_err(Failure::Upstream)?;
            bump(activity);
            if n == 0 {
                return Err(Failure::UpstreamClosed {
                    any: started.load(Ordering::Relaxed) > 0 || !ubuf.filled().is_empty(),
                });
            }
            continue;
        };
        ubuf.consume(len);
        started.store(1, Ordering::Relaxed);
        if info {
            cw.write_all(out).await.map_err(Failure::Client)?;
            bump(activity);
            continue;
        }
        if code == 101 {
            cw.write_all(out).await.map_err(Failure::Client)?;
            return Ok(Outcome::Switched);
        }
        let mut dec = BodyDecoder::new(body);
        relay_body(ur, cw, ubuf, &mut dec, out, activity, false).await?;
        return Ok(Outcome::Done {
            close: close || body == Body::Close,
            reuse: !up_close && body != Body::Close,
            body_not_relayed: false,
        });
    }
}

/// Canned responses of the proxy itself.
fn simple_response(out: &mut Vec<u8>, status: &str, body: &str, close: bool) {
    use std::io::Write;
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
        body.len(),
        if close { "connection: close\r\n" } else { "" }
    );
}

fn grpc_denied(out: &mut Vec<u8>, policies: &str, close: bool) {
    use std::io::Write;
    out.clear();
    let message = crate::decide::grpc_percent_encode(&format!("denied by policy: {policies}"));
    let _ = write!(
        out,
        "HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ngrpc-status: {GRPC_PERMISSION_DENIED}\r\ngrpc-message: {message}\r\ncontent-length: 0\r\n{}\r\n",
        if close { "connection: close\r\n" } else { "" }
    );
}

/// What to do with a parsed request head.
enum Plan {
    Forward {
        body: Body,
        upgrade: bool,
        close: bool,
        head_request: bool,
        /// A method a proxy may send again (RFC 9110 9.2.2).
        idempotent: bool,
        /// HTTP/1.0: forwarded as 1.0, after which the server closes.
        http10: bool,
    },
    /// Answered by the proxy (`out` holds the response); its body (if
    /// any) is skipped; `close` ends the connection after it.
    Answer { body: Body, close: bool },
    /// 400/431 (in `out`), then close.
    Refuse,
}

/// Bytes of a denied request's body read and dropped before the
/// connection is closed instead.
const MAX_DRAIN: u64 = 1 << 20;

pub(crate) struct Relay<'a> {
    pub shared: &'a Shared,
    pub peer: SocketAddr,
    pub dst: SocketAddr,
    pub client: TcpStream,
    pub cbuf: Buf,
    /// When the first head must be complete.
    pub first_deadline: Instant,
    pub activity: &'a AtomicU64,
}

/// What the connection turned into when the relay loop ended.
pub(crate) enum End {
    Closed,
    /// Lingering close: the client may still be sending.
    Linger(TcpStream),
    /// Upgraded: copy both ways (outside the idle watchdog).
    Tunnel {
        client: TcpStream,
        upstream: TcpStream,
        to_client: Vec<u8>,
        to_upstream: Vec<u8>,
    },
}

/// How [`Relay::serve`] ended; [`Relay::run`] turns it into an [`End`].
enum Finish {
    Closed,
    Linger,
    Tunnel {
        upstream: TcpStream,
        to_client: Vec<u8>,
        to_upstream: Vec<u8>,
    },
}

/// The relay's upstream connection: `idle` while no exchange is under way
/// on it and nothing of it is unread (then it may serve another client).
#[derive(Default)]
struct Upstream {
    conn: Option<TcpStream>,
    idle: bool,
}

impl Relay<'_> {
    pub(crate) async fn run(mut self) -> End {
        let mut up = Upstream::default();
        let finish = self.serve(&mut up).await;
        if let (Some(conn), true) = (up.conn.take(), up.idle) {
            // Kept for the next client from the same source; when the pool
            // is full it closes here (the rare TIME-WAIT on the node).
            let _ = self.shared.pool.put(self.pool_key(), conn);
        }
        match finish {
            Finish::Closed => End::Closed,
            Finish::Linger => End::Linger(self.client),
            Finish::Tunnel {
                upstream,
                to_client,
                to_upstream,
            } => End::Tunnel {
                client: self.client,
                upstream,
                to_client,
                to_upstream,
            },
        }
    }

    fn pool_key(&self) -> PoolKey {
        PoolKey {
            source: self
                .shared
                .config
                .transparent_upstream
                .then(|| self.peer.ip()),
            dst: self.dst,
        }
    }

    async fn serve(&mut self, upstream: &mut Upstream) -> Finish {
        let shared = self.shared;
        let cfg = &shared.config;
        let max_head = cfg.max_header_bytes.max(8192);
        let up = &mut upstream.conn;
        let mut ubuf: Option<Buf> = None;
        let mut out: Vec<u8> = Vec::with_capacity(1024);
        let mut rout: Vec<u8> = Vec::with_capacity(1024);
        let mut first = true;
        loop {
            // 1. A complete head.
            let mut deadline = first.then_some(self.first_deadline);
            let plan = loop {
                let step = {
                    let mut slots = header_slots();
                    match parse_request(self.cbuf.filled(), &mut slots, max_head) {
                        Ok(Some(head)) => Some(self.plan(&head, &mut out)),
                        Ok(None) => None,
                        Err(e) => Some(self.refuse(e, &mut out)),
                    }
                };
                if let Some(s) = step {
                    break s;
                }
                if !self.cbuf.filled().is_empty() && deadline.is_none() {
                    deadline = Some(Instant::now() + cfg.header_read_timeout);
                }
                let read = self.cbuf.read_from(&mut self.client, max_head);
                let n = match deadline {
                    Some(d) => match tokio::time::timeout_at(d, read).await {
                        Ok(r) => r,
                        Err(_) => {
                            debug!(peer = %self.peer, "l7 request head timed out");
                            return Finish::Closed;
                        }
                    },
                    None => read.await,
                };
                bump(self.activity);
                match n {
                    Ok(n) if n > 0 => {}
                    _ => return Finish::Closed,
                }
            };
            first = false;
            let (head_len, plan) = plan;
            self.cbuf.consume(head_len);
            let (body, upgrade, client_close, head_request, idempotent, http10) = match plan {
                Plan::Refuse => {
                    let _ = self.client.write_all(&out).await;
                    return Finish::Linger;
                }
                Plan::Answer { body, close } => {
                    if self.client.write_all(&out).await.is_err() {
                        return Finish::Closed;
                    }
                    bump(self.activity);
                    if close || !self.skip_body(body).await {
                        return Finish::Linger;
                    }
                    continue;
                }
                Plan::Forward {
                    body,
                    upgrade,
                    close,
                    head_request,
                    idempotent,
                    http10,
                } => (body, upgrade, close, head_request, idempotent, http10),
            };
            // 2. The upstream connection (kept, from the pool for a
            // bodiless idempotent request — the one kind sent again when a
            // kept connection turns out closed —, or dialled now).
            let ubuf = ubuf.get_or_insert_with(Buf::new);
            let resendable = body == Body::None && idempotent;
            if up.is_none() && resendable {
                // Never one from the client's own port: its 5-tuple would
                // be the client connection's (as for a fresh one, see
                // `sock::connect`).
                let own_port = |c: &TcpStream| {
                    cfg.transparent_upstream
                        && c.local_addr().map(|a| a.port()).ok() == Some(self.peer.port())
                };
                if let Some(conn) = shared.pool.take(&self.pool_key()) {
                    if !own_port(&conn) {
                        *up = Some(conn);
                        ubuf.clear();
                    }
                }
            }
            upstream.idle = false;
            let mut reused = up.is_some();
            let mut attempt = 0;
            let result = loop {
                attempt += 1;
                if up.is_none() {
                    match sock::connect(
                        self.dst,
                        cfg.transparent_upstream.then_some(self.peer),
                        cfg.upstream_mark,
                        cfg.connect_timeout,
                        true,
                    )
                    .await
                    {
                        Ok(s) => {
                            *up = Some(s);
                            ubuf.clear();
                        }
                        Err(e) => {
                            debug!(dst = %self.dst, error = %e, "l7 upstream connect failed");
                            simple_response(
                                &mut rout,
                                "503 Service Unavailable",
                                "Upstream unavailable\n",
                                true,
                            );
                            let _ = self.client.write_all(&rout).await;
                            return Finish::Linger;
                        }
                    }
                }
                let Some(upstream) = up.as_mut() else {
                    return Finish::Closed;
                };
                let r = exchange(
                    &mut self.client,
                    upstream,
                    &mut self.cbuf,
                    ubuf,
                    &out,
                    &mut rout,
                    Exchange {
                        body,
                        upgrade,
                        client_close,
                        head_request,
                        max_head,
                    },
                    self.activity,
                )
                .await;
                match r {
                    // A kept connection the upstream had closed: once more
                    // on a fresh one, only for a bodiless idempotent
                    // request of which no response byte came (a proxy must
                    // not send others again, RFC 9112 9.3.1).
                    Err((Failure::UpstreamClosed { any: false } | Failure::Upstream(_), false))
                        if reused && attempt == 1 && resendable && ubuf.filled().is_empty() =>
                    {
                        *up = None;
                        reused = false;
                    }
                    r => break r,
                }
            };
            match result {
                Ok(Outcome::Done {
                    close,
                    reuse,
                    body_not_relayed,
                }) => {
                    if !ubuf.filled().is_empty() {
                        // Bytes after the response: never read as the
                        // next one.
                        *up = None;
                    } else if !reuse || http10 {
                        // The server closes (it said so, or the request
                        // was HTTP/1.0): after its FIN, ours.
                        if let Some(u) = up.take() {
                            tokio::spawn(await_upstream_close(u));
                        }
                    }
                    upstream.idle = up.is_some();
                    if close {
                        // The client said this was its last request
                        // (RFC 9112 9.6: it sends no more), everything it
                        // sent has been read and the kernel holds nothing
                        // more from it: closing sends a FIN, not a reset,
                        // so close at once, as nginx does when nothing is
                        // left to read. Else linger: a keep-alive client
                        // the server's close surprised may be pipelining.
                        let nothing_left = client_close
                            && !body_not_relayed
                            && self.cbuf.filled().is_empty()
                            && sock::pending(&self.client) != sock::Pending::DataOrError;
                        return if nothing_left {
                            Finish::Closed
                        } else {
                            Finish::Linger
                        };
                    }
                }
                Ok(Outcome::Switched) => {
                    let Some(upstream) = up.take() else {
                        return Finish::Closed;
                    };
                    return Finish::Tunnel {
                        upstream,
                        to_client: ubuf.filled().to_vec(),
                        to_upstream: self.cbuf.filled().to_vec(),
                    };
                }
                Err((e, responded)) => {
                    debug!(peer = %self.peer, dst = %self.dst, error = %e, "l7 exchange failed");
                    if !responded && !matches!(e, Failure::Client(_)) {
                        let (status, text) = match e {
                            Failure::ClientFraming(_) | Failure::ClientTruncated => {
                                ("400 Bad Request", "Bad request: invalid body framing\n")
                            }
                            _ => ("502 Bad Gateway", "Upstream unavailable\n"),
                        };
                        simple_response(&mut rout, status, text, true);
                        let _ = self.client.write_all(&rout).await;
                    }
                    return Finish::Linger;
                }
            }
        }
    }

    /// Decides on a parsed head: the onward head into `out` (Forward) or
    /// the proxy's answer into `out`; the head's length.
    fn plan(&self, head: &crate::h1::RequestHead<'_, '_>, out: &mut Vec<u8>) -> (usize, Plan) {
        let shared = self.shared;
        let headers = Headers::Raw(head.headers);
        let grpc = is_grpc_in(headers);
        let mut event = L7Event {
            time: SystemTime::now(),
            verdict: Verdict::Allowed,
            protocol: if grpc {
                L7Protocol::Grpc
            } else {
                L7Protocol::Http1
            },
            src: self.peer,
            dst: self.dst,
            method: Cow::Borrowed(head.method),
            path: Cow::Borrowed(""),
            host: None,
            policy: None,
            reason: None,
        };
        let Some((path, query, authority)) = split_target(head.target) else {
            event.path = Cow::Borrowed(head.target);
            event.verdict = Verdict::Malformed;
            let e = if head.method == "CONNECT" {
                crate::decide::BadRequest::Connect.to_string()
            } else {
                "unsupported request target".to_owned()
            };
            simple_response(out, "400 Bad Request", &format!("Bad request: {e}\n"), true);
            event.reason = Some(e);
            shared.emit(event);
            return (head.len, Plan::Refuse);
        };
        let egress = shared
            .policy
            .lookup(self.peer.ip(), self.dst, Direction::Egress);
        let ingress = shared
            .policy
            .lookup(self.peer.ip(), self.dst, Direction::Ingress);
        let info = RequestInfo {
            method: head.method,
            path,
            query,
            authority,
            headers,
        };
        let (decision, summary) = decide_request(&info, &egress, &ingress);
        event.path = summary.path;
        event.host = summary.host;
        match decision {
            Decision::Malformed(e) => {
                event.verdict = Verdict::Malformed;
                simple_response(out, "400 Bad Request", &format!("Bad request: {e}\n"), true);
                event.reason = Some(e.to_string());
                shared.emit(event);
                (head.len, Plan::Refuse)
            }
            Decision::Deny { policies } => {
                // A body the client waits to be asked for (100-continue)
                // never comes: close after the denial.
                let close = head.close || (head.expect_continue && head.body != Body::None);
                if grpc {
                    grpc_denied(out, &policies, close);
                } else {
                    simple_response(out, "403 Forbidden", crate::decide::DENIED_BODY, close);
                }
                event.verdict = Verdict::Denied;
                event.policy = Some(policies);
                shared.emit(event);
                (
                    head.len,
                    Plan::Answer {
                        body: head.body,
                        close,
                    },
                )
            }
            Decision::Forward { policy } => {
                write_request_head(out, head, &event.path, query, authority);
                event.policy = policy;
                shared.emit(event);
                (
                    head.len,
                    Plan::Forward {
                        body: head.body,
                        upgrade: head.upgrade,
                        close: head.close,
                        head_request: head.method == "HEAD",
                        idempotent: matches!(
                            head.method,
                            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
                        ),
                        http10: head.minor == 0,
                    },
                )
            }
        }
    }

    fn refuse(&self, e: HeadError, out: &mut Vec<u8>) -> (usize, Plan) {
        let (status, text) = match &e {
            HeadError::TooLarge => (
                "431 Request Header Fields Too Large",
                "Bad request: request head too large\n".to_owned(),
            ),
            e => ("400 Bad Request", format!("Bad request: {e}\n")),
        };
        simple_response(out, status, &text, true);
        self.shared.emit(L7Event {
            time: SystemTime::now(),
            verdict: Verdict::Malformed,
            protocol: L7Protocol::Http1,
            src: self.peer,
            dst: self.dst,
            method: Cow::Borrowed(""),
            path: Cow::Borrowed(""),
            host: None,
            policy: None,
            reason: Some(e.to_string()),
        });
        (0, Plan::Refuse)
    }

    /// Reads and drops a body the proxy answered itself (bounded);
    /// `false`: the connection should close instead.
    async fn skip_body(&mut self, body: Body) -> bool {
        let mut dec = BodyDecoder::new(body);
        let mut left = MAX_DRAIN;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if !self.cbuf.filled().is_empty() {
                match dec.advance(self.cbuf.filled()) {
                    Ok(n) => {
                        self.cbuf.consume(n);
                        match left.checked_sub(n as u64) {
                            Some(l) => left = l,
                            None => return false,
                        }
                    }
                    Err(_) => return false,
                }
            }
            if dec.is_done() {
                return true;
            }
            match tokio::time::timeout_at(
                deadline,
                self.cbuf.read_from(&mut self.client, INITIAL_BUF),
            )
            .await
            {
                Ok(Ok(n)) if n > 0 => bump(self.activity),
                _ => return false,
            }
        }
    }
}

struct Exchange {
    body: Body,
    upgrade: bool,
    client_close: bool,
    head_request: bool,
    max_head: usize,
}

/// One request onward and its response back: the head (in `head`, with
/// the body bytes already buffered) in one write, then the request body
/// and the response concurrently. The error says whether the client got
/// any response bytes.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    cbuf: &mut Buf,
    ubuf: &mut Buf,
    head: &[u8],
    rout: &mut Vec<u8>,
    x: Exchange,
    activity: &AtomicU64,
) -> Result<Outcome, (Failure, bool)> {
    let started = AtomicU64::new(0);
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let mut dec = BodyDecoder::new(x.body);
    let responded = |s: &AtomicU64| s.load(Ordering::Relaxed) > 0;
    let has_body = !dec.is_done();
    // Whether the request (head and body) has gone onward whole.
    let request_done = AtomicBool::new(!has_body);
    if !has_body {
        // No body: the head alone, then the response.
        uw.write_all(head)
            .await
            .map_err(|e| (Failure::Upstream(e), false))?;
        bump(activity);
    }
    let response = relay_response(
        &mut ur,
        &mut cw,
        ubuf,
        rout,
        x.max_head,
        x.head_request,
        x.upgrade,
        x.client_close,
        &started,
        &request_done,
        activity,
    );
    if !has_body {
        return response.await.map_err(|e| (e, responded(&started)));
    }
    let request = async {
        relay_body(&mut cr, &mut uw, cbuf, &mut dec, head, activity, true).await?;
        request_done.store(true, Ordering::Relaxed);
        Ok::<(), Failure>(())
    };
    tokio::pin!(request, response);
    let mut sent = false;
    loop {
        tokio::select! {
            biased;
            r = &mut response => {
                return match r {
                    // The response ended before the request body (it
                    // started before, so its head said `Connection:
                    // close`): the client connection cannot be kept in
                    // step; it closes, and the upstream one is not reused.
                    Ok(Outcome::Done { close, reuse, .. }) => {
                        let done = request_done.load(Ordering::Relaxed);
                        Ok(Outcome::Done {
                            close: close || !done,
                            reuse: reuse && done,
                            body_not_relayed: !done,
                        })
                    }
                    Ok(o) => Ok(o),
                    Err(e) => Err((e, responded(&started))),
                };
            }
            r = &mut request, if !sent => match r {
                Ok(()) => sent = true,
                // The upstream stopped reading: its response may still
                // come (an early error); the client connection closes.
                Err(Failure::Upstream(_)) => sent = true,
                Err(e) => return Err((e, responded(&started))),
            },
        }
    }
}

/// Joins an upgraded connection's two sides (after what either side sent
/// past the 101 exchange).
pub(crate) async fn tunnel(
    mut client: TcpStream,
    mut upstream: TcpStream,
    to_client: Vec<u8>,
    to_upstream: Vec<u8>,
) {
    if !to_client.is_empty() && client.write_all(&to_client).await.is_err() {
        return;
    }
    if !to_upstream.is_empty() && upstream.write_all(&to_upstream).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Closes after a final response while the client may still be sending:
/// no more writes, unread input drained for a moment, so the kernel does
/// not answer it with a reset that could destroy the response in flight.
pub(crate) async fn linger(mut client: TcpStream) {
    let _ = client.shutdown().await;
    drain_to_end(&mut client, 256 * 1024, Duration::from_secs(2)).await;
}

/// Ends an upstream connection that is not reused, after its response:
/// the server closes first when it said it would (or the request was
/// HTTP/1.0), so its FIN is awaited briefly before ours. Closing first
/// would leave the TIME-WAIT on the node, holding one of its ports to that
/// server for a minute: with a new connection per request that runs a node
/// out of ephemeral ports within seconds, where a direct client never
/// would.
async fn await_upstream_close(mut upstream: TcpStream) {
    drain_to_end(&mut upstream, 64 * 1024, UPSTREAM_CLOSE_WAIT).await;
}

/// Reads and drops until the peer's FIN, at most `limit` bytes and `wait`.
async fn drain_to_end(stream: &mut TcpStream, limit: usize, wait: Duration) {
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(wait, async {
        let mut left = limit;
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 || n >= left {
                break;
            }
            left -= n;
        }
    })
    .await;
}

/// How long an unused upstream connection may take to close after its
/// response.
const UPSTREAM_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// The HTTP/2 connection preface (prior knowledge).
pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Completes once `activity` has not moved for about `idle` (checked in
/// quarters, so between `idle` and 1.25 x `idle`): one timer per quarter,
/// none per read or write.
pub(crate) async fn idle_watch(activity: &AtomicU64, idle: Duration) {
    let tick = (idle / 4).max(Duration::from_millis(1));
    let mut last = activity.load(Ordering::Relaxed);
    let mut quiet = 0;
    loop {
        tokio::time::sleep(tick).await;
        let now = activity.load(Ordering::Relaxed);
        if now == last {
            quiet += 1;
            if quiet >= 4 {
                return;
            }
        } else {
            quiet = 0;
            last = now;
        }
    }
}
