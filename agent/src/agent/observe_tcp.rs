//! `observe` over TCP (`observeAddress`, `observeTokenFile`): flow events
//! for a collector that is not on the node, guarded by a token.
//!
//! The control protocol's JSON lines, cut down to reading events:
//!
//! ```text
//! → {"op":"auth","token":"…"}      the first line, within FIRST_LINE_WAIT
//! ← {"ok":true}                     or {"ok":false,"error":"wrong token"}, then close
//! → {"op":"observe","filter":{…},"follow":true}
//! ← {"ok":true,"event":{…}} …       as on the control socket (`protocol.rs`)
//! ```
//!
//! Any other request (`status`, `rotate`, anything unknown) gets an error
//! line and the connection is closed: nothing that changes the agent's
//! state, and nothing beyond the events, is served here. Bounds: at most
//! [`MAX_UNAUTHENTICATED`] connections that have not authenticated yet and
//! [`MAX_CONNECTIONS`] that have (more are told so and closed: strangers
//! holding idle connections cannot crowd out collectors), lines of at
//! most [`MAX_LINE`] bytes, the first line within [`FIRST_LINE_WAIT`], a
//! wrong token answered only after [`WRONG_TOKEN_DELAY`] (so guessing is
//! slow). Tokens are compared as SHA-256 digests, in constant time.
//!
//! The transport is plain TCP: bind `observeAddress` to an address only
//! trusted networks reach.
//!
//! [`serve`] works on any byte stream, so its tests use in-memory pipes;
//! the client half ([`observe`]) is synchronous, as `protocol.rs`'s is.

use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, BufReader as AsyncBufReader};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::control::{read_line, reply, stream_events, Line};
use super::events::{EventHub, FlowEvent, HubStats};
use super::protocol::{self, Observe, Request, Response, StreamError};

/// Authenticated connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Connections not yet authenticated, at once (each lasts at most
/// [`FIRST_LINE_WAIT`], or [`WRONG_TOKEN_DELAY`] after a wrong token).
pub const MAX_UNAUTHENTICATED: usize = 8;
/// Longest request line (an auth or observe request is far shorter).
pub const MAX_LINE: usize = 16 << 10;
/// The first line (auth) must arrive within this.
pub const FIRST_LINE_WAIT: Duration = Duration::from_secs(5);
/// After a successful auth, the request must arrive within this.
const REQUEST_WAIT: Duration = Duration::from_secs(10);
/// A wrong token is answered this late.
pub const WRONG_TOKEN_DELAY: Duration = Duration::from_secs(1);
/// The shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;
/// A token file larger than this is no token file.
const MAX_TOKEN_FILE: u64 = 4096;
/// Wrong tokens are logged at most this often.
const WRONG_TOKEN_LOG_EVERY_SECS: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token file {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("token file {}: {message}", path.display())]
    Bad { path: PathBuf, message: String },
}

/// Reads a token file: a regular file (symlinks followed, as Kubernetes
/// mounts Secrets) that others cannot read or write, holding at least
/// [`MIN_TOKEN_LEN`] bytes of UTF-8 text; surrounding whitespace (the
/// trailing newline) is not part of the token.
pub fn read_token(path: &Path) -> Result<String, TokenError> {
    let io = |source| TokenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |message: String| TokenError::Bad {
        path: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    // the opened file's own metadata: what is checked is what is read
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err(bad(format!(
            "readable or writable by others (mode {mode:04o}): the token would not be secret; \
             chmod 0600 (or 0640) it"
        )));
    }
    if meta.len() > MAX_TOKEN_FILE {
        return Err(bad(format!(
            "{} bytes: a token file holds one token (at most {MAX_TOKEN_FILE} bytes)",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    Read::take(&mut file, MAX_TOKEN_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(bad("empty: it must hold the token".into()));
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err(bad(format!(
            "the token is {} bytes, too short to be secret: use at least {MIN_TOKEN_LEN} \
             (e.g. `head -c 32 /dev/urandom | base64`)",
            token.len()
        )));
    }
    Ok(token.to_string())
}

/// The token the server accepts, kept as its SHA-256 digest only.
#[derive(Clone)]
pub struct Token {
    digest: [u8; 32],
}

impl Token {
    pub fn new(text: &str) -> Token {
        Token {
            digest: Sha256::digest(text.as_bytes()).into(),
        }
    }

    /// Constant time in the presented token's content (digests are
    /// compared, every byte of them).
    pub fn matches(&self, presented: &str) -> bool {
        let other: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let diff = self
            .digest
            .iter()
            .zip(&other)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// Time limits of one connection (shortened in tests).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub first_line: Duration,
    pub request: Duration,
    pub wrong_token_delay: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            first_line: FIRST_LINE_WAIT,
            request: REQUEST_WAIT,
            wrong_token_delay: WRONG_TOKEN_DELAY,
        }
    }
}

/// The listener.
pub struct Server {
    task: JoinHandle<()>,
}

impl Server {
    /// Binds `address` and serves it on the current runtime.
    pub async fn start(
        address: SocketAddr,
        token: Token,
        hub: Arc<EventHub>,
    ) -> io::Result<Server> {
        let listener = TcpListener::bind(address).await?;
        info!(%address, "flow events served over TCP (observeAddress)");
        let task = tokio::spawn(accept(listener, Arc::new(token), hub));
        Ok(Server { task })
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, token: Arc<Token>, hub: Arc<EventHub>) {
    let pending = Arc::new(Semaphore::new(MAX_UNAUTHENTICATED));
    let authenticated = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!("observe over TCP: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = pending.clone().try_acquire_owned() else {
            // told without waiting for the client (a full send buffer just
            // loses the message), then closed
            let mut line = serde_json::to_vec(&Response::error(format!(
                "too many observe connections waiting to authenticate (at most {MAX_UNAUTHENTICATED}); try again later"
            )))
            .unwrap_or_default();
            line.push(b'\n');
            let _ = stream.try_write(&line);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let token = token.clone();
        let hub = hub.clone();
        let authenticated = authenticated.clone();
        tokio::spawn(async move {
            let slots = (slot, authenticated);
            serve(
                stream,
                &peer.to_string(),
                &token,
                &hub,
                Limits::default(),
                slots,
            )
            .await;
        });
    }
}

/// The first line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Auth {
    op: String,
    token: String,
}

/// The token a first line presents, or what to answer.
fn presented_token(line: &[u8]) -> Result<String, String> {
    const WANT: &str = "authenticate first: {\"op\":\"auth\",\"token\":\"...\"}";
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("request is not JSON: {e}"))?;
    if value.get("op").and_then(|o| o.as_str()) != Some("auth") {
        return Err(WANT.into());
    }
    let auth: Auth = serde_json::from_value(value).map_err(|e| format!("{WANT} ({e})"))?;
    debug_assert_eq!(auth.op, "auth");
    Ok(auth.token)
}

/// Serves one connection: auth, then one `observe`. `slots`: the
/// connection's unauthenticated slot, given back once it authenticates, and
/// the pool it then needs a slot of.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: &str,
    token: &Token,
    hub: &EventHub,
    limits: Limits,
    slots: (OwnedSemaphorePermit, Arc<Semaphore>),
) {
    let (pending, authenticated) = slots;
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = AsyncBufReader::new(read);
    let mut line = Vec::new();
    let refuse = |message: &str| Response::error(message);
    match read_line(&mut reader, &mut line, MAX_LINE, limits.first_line).await {
        Line::Read => {}
        Line::TooLong => {
            let _ = reply(&mut write, &refuse("request line too long")).await;
            return;
        }
        Line::TimedOut => {
            let message = format!("no authentication within {:?}", limits.first_line);
            let _ = reply(&mut write, &refuse(&message)).await;
            return;
        }
        Line::Closed | Line::Failed(_) => return,
    }
    match presented_token(&line) {
        Err(message) => {
            let _ = reply(&mut write, &refuse(&message)).await;
            return;
        }
        Ok(presented) if !token.matches(&presented) => {
            log_wrong_token(peer);
            tokio::time::sleep(limits.wrong_token_delay).await;
            let _ = reply(&mut write, &refuse("wrong token")).await;
            return;
        }
        Ok(_) => {}
    }
    drop(pending);
    let Ok(_slot) = authenticated.try_acquire_owned() else {
        let message =
            format!("too many observe connections (at most {MAX_CONNECTIONS}); try again later");
        let _ = reply(&mut write, &refuse(&message)).await;
        return;
    };
    if reply(&mut write, &Response::default_ok()).await.is_err() {
        return;
    }
    match read_line(&mut reader, &mut line, MAX_LINE, limits.request).await {
        Line::Read => {}
        Line::TooLong => {
            let _ = reply(&mut write, &refuse("request line too long")).await;
            return;
        }
        Line::TimedOut => {
            let message = format!("no request within {:?}", limits.request);
            let _ = reply(&mut write, &refuse(&message)).await;
            return;
        }
        Line::Closed | Line::Failed(_) => return,
    }
    let response = match serde_json::from_slice::<Request>(&line) {
        Ok(Request::Observe(observe)) => {
            stream_events(hub, &observe, reader, write).await;
            return;
        }
        Ok(Request::Status) => refuse(
            "status is not served over TCP (only observe): ask the control socket on the node",
        ),
        Ok(Request::Rotate) => refuse(
            "rotate is not served over TCP (only observe): ask the control socket on the node",
        ),
        // never deserialized (serde skips the variant); listed for the match
        Ok(Request::Cni(_)) => refuse("CNI events are not served over TCP"),
        Err(e) => refuse(&format!(
            "bad request ({e}); only {{\"op\":\"observe\",...}} is served over TCP"
        )),
    };
    let _ = reply(&mut write, &response).await;
}

/// Logs a wrong token, at most once per [`WRONG_TOKEN_LOG_EVERY_SECS`]
/// (a guesser must not fill the log).
fn log_wrong_token(peer: &str) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    static SINCE: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let skipped = SINCE.fetch_add(1, Relaxed);
    let last = LAST.load(Relaxed);
    if now >= last + WRONG_TOKEN_LOG_EVERY_SECS
        && LAST.compare_exchange(last, now, Relaxed, Relaxed).is_ok()
    {
        SINCE.store(0, Relaxed);
        warn!(
            %peer,
            others_since_last_report = skipped,
            "observe over TCP: a client presented a wrong token"
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{server}: not HOST:PORT, or the name does not resolve: {source}")]
    Resolve { server: String, source: io::Error },
    #[error("cannot reach the agent at {server}: {source} (is observeAddress set to it?)")]
    Connect { server: String, source: io::Error },
    #[error("talking to the agent at {server}: {source}")]
    Io { server: String, source: io::Error },
    #[error("the agent at {server} sent a bad response: {message}")]
    BadResponse { server: String, message: String },
    #[error("the agent at {server} refused: {message}")]
    Refused { server: String, message: String },
}

/// `observe` over TCP: authenticates with `token`, then as
/// [`protocol::observe`]. Without follow each read is bounded by
/// `timeout`; with follow reads wait indefinitely (connecting and the
/// auth answer are bounded either way).
pub fn observe(
    server: &str,
    token: &str,
    request: &Observe,
    timeout: Duration,
    on_event: impl FnMut(FlowEvent) -> bool,
) -> Result<Option<HubStats>, RemoteError> {
    let name = || server.to_string();
    let io = |source| RemoteError::Io {
        server: name(),
        source,
    };
    let from_stream = |e: StreamError| match e {
        StreamError::Io(source) => io(source),
        StreamError::Bad(message) => RemoteError::BadResponse {
            server: name(),
            message,
        },
        StreamError::Refused(message) => RemoteError::Refused {
            server: name(),
            message,
        },
    };
    let addresses: Vec<SocketAddr> = server
        .to_socket_addrs()
        .map_err(|source| RemoteError::Resolve {
            server: name(),
            source,
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    let mut connected = None;
    for address in addresses {
        match TcpStream::connect_timeout(&address, timeout) {
            Ok(stream) => {
                connected = Some(stream);
                break;
            }
            Err(e) => last = e,
        }
    }
    let stream = connected.ok_or_else(|| RemoteError::Connect {
        server: name(),
        source: last,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut reader = BufReader::new(&stream);
    send(&stream, &serde_json::json!({"op": "auth", "token": token})).map_err(io)?;
    if protocol::read_response(&mut reader)
        .map_err(from_stream)?
        .is_none()
    {
        return Err(from_stream(StreamError::Bad(
            "the connection closed without an answer".into(),
        )));
    }
    send(&stream, &Request::Observe(request.clone())).map_err(io)?;
    if request.follow {
        stream.set_read_timeout(None).map_err(io)?;
    }
    protocol::read_events(&mut reader, on_event).map_err(from_stream)
}

fn send(mut stream: &TcpStream, message: &impl serde::Serialize) -> io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    stream.flush()
}

/// For the tests: the first line a client sends.
#[cfg(test)]
fn auth_line(token: &str) -> String {
    format!("{}\n", serde_json::json!({"op": "auth", "token": token}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::events::{Filter, FlowType, Verdict};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, DuplexStream};

    const TOKEN: &str = "0123456789abcdef-secret";

    fn limits() -> Limits {
        Limits {
            first_line: Duration::from_millis(300),
            request: Duration::from_millis(300),
            wrong_token_delay: Duration::from_millis(50),
        }
    }

    fn hub() -> Arc<EventHub> {
        let hub = EventHub::new("node1", 64);
        for (kind, verdict) in [
            (FlowType::Dns, Verdict::Allowed),
            (FlowType::L4, Verdict::Dropped),
            (FlowType::Dns, Verdict::Denied),
        ] {
            hub.publish(FlowEvent::new(kind, verdict));
        }
        hub
    }

    /// A server on one end of a pipe; the test holds the other.
    fn connect(hub: &Arc<EventHub>) -> (DuplexStream, JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let hub = hub.clone();
        let task = tokio::spawn(async move {
            let slots = (
                Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(),
                Arc::new(Semaphore::new(1)),
            );
            serve(server, "test", &Token::new(TOKEN), &hub, limits(), slots).await;
        });
        (client, task)
    }

    /// Every line the server sends until it closes (bounded in time).
    async fn lines_until_closed(client: DuplexStream) -> Vec<serde_json::Value> {
        let mut reader = tokio::io::BufReader::new(client);
        let mut out = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            let n = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
                .await
                .expect("the server closes in time")
                .unwrap();
            if n == 0 {
                return out;
            }
            out.push(serde_json::from_str(&line).unwrap());
        }
    }

    async fn next_line(reader: &mut tokio::io::BufReader<DuplexStream>) -> serde_json::Value {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
            .await
            .expect("a line in time")
            .unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    #[tokio::test]
    async fn the_right_token_is_turned_away_when_every_authenticated_slot_is_taken() {
        let hub = hub();
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let pending = Arc::new(Semaphore::new(1));
        let full = Arc::new(Semaphore::new(0));
        let slot = pending.clone().try_acquire_owned().unwrap();
        let task = tokio::spawn(async move {
            serve(
                server,
                "test",
                &Token::new(TOKEN),
                &hub,
                limits(),
                (slot, full),
            )
            .await;
        });
        client.write_all(auth_line(TOKEN).as_bytes()).await.unwrap();
        let lines = lines_until_closed(client).await;
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0]["error"]
                .as_str()
                .unwrap()
                .starts_with("too many observe connections"),
            "{lines:?}"
        );
        task.await.unwrap();
        // its unauthenticated slot was given back on authentication
        assert_eq!(pending.available_permits(), 1);
    }

    #[tokio::test]
    async fn a_wrong_token_is_refused_and_the_connection_closed() {
        let hub = hub();
        let (mut client, task) = connect(&hub);
        client
            .write_all(auth_line("0123456789abcdef-guess").as_bytes())
            .await
            .unwrap();
        client.write_all(b"{\"op\":\"observe\"}\n").await.unwrap();
        let lines = lines_until_closed(client).await;
        assert_eq!(
            lines,
            [serde_json::json!({"ok": false, "error": "wrong token"})]
        );
        task.await.unwrap();
    }

    #[tokio::test]
    async fn the_right_token_streams_filtered_events() {
        let hub = hub();
        let (mut client, _task) = connect(&hub);
        client.write_all(auth_line(TOKEN).as_bytes()).await.unwrap();
        let request = Request::Observe(Observe {
            filter: Filter {
                kind: Some(FlowType::Dns),
                ..Filter::default()
            },
            follow: false,
            limit: None,
        });
        let mut text = serde_json::to_string(&request).unwrap();
        text.push('\n');
        client.write_all(text.as_bytes()).await.unwrap();
        let lines = lines_until_closed(client).await;
        assert_eq!(lines[0], serde_json::json!({"ok": true}));
        let events: Vec<&serde_json::Value> =
            lines[1..].iter().filter_map(|l| l.get("event")).collect();
        assert_eq!(events.len(), 2, "{lines:?}");
        assert!(events.iter().all(|e| e["type"] == "dns"), "{lines:?}");
        assert_eq!(events[0]["verdict"], "allowed");
        assert_eq!(events[1]["verdict"], "denied");
        assert_eq!(lines.last().unwrap()["end"]["published"], 3, "{lines:?}");
    }

    #[tokio::test]
    async fn follow_streams_new_events_until_the_client_closes() {
        let hub = hub();
        let (mut client, task) = connect(&hub);
        client.write_all(auth_line(TOKEN).as_bytes()).await.unwrap();
        client
            .write_all(
                b"{\"op\":\"observe\",\"follow\":true,\"filter\":{\"verdict\":\"dropped\"}}\n",
            )
            .await
            .unwrap();
        let mut reader = tokio::io::BufReader::new(client);
        assert_eq!(
            next_line(&mut reader).await,
            serde_json::json!({"ok": true})
        );
        // the buffered drop, then a new one (a new allowed one is filtered out)
        assert_eq!(next_line(&mut reader).await["event"]["type"], "l4");
        hub.publish(FlowEvent::new(FlowType::Dns, Verdict::Allowed));
        hub.publish(FlowEvent::new(FlowType::Mesh, Verdict::Dropped));
        let e = next_line(&mut reader).await;
        assert_eq!(e["event"]["type"], "mesh", "{e}");
        assert_eq!(e["event"]["verdict"], "dropped", "{e}");
        drop(reader);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the stream ends when the client goes")
            .unwrap();
    }

    #[tokio::test]
    async fn status_rotate_and_other_requests_are_refused() {
        let hub = hub();
        for (request, want) in [
            ("{\"op\":\"status\"}", "status is not served over TCP"),
            ("{\"op\":\"rotate\"}", "rotate is not served over TCP"),
            ("{\"op\":\"reboot\"}", "bad request"),
            ("{\"event\":\"add\"}", "bad request"),
            ("not json", "bad request"),
        ] {
            let (mut client, task) = connect(&hub);
            client.write_all(auth_line(TOKEN).as_bytes()).await.unwrap();
            client
                .write_all(format!("{request}\n").as_bytes())
                .await
                .unwrap();
            let lines = lines_until_closed(client).await;
            assert_eq!(lines.len(), 2, "{request}: {lines:?}");
            assert_eq!(lines[0], serde_json::json!({"ok": true}));
            assert_eq!(lines[1]["ok"], false, "{request}");
            let error = lines[1]["error"].as_str().unwrap();
            assert!(error.contains(want), "{request}: {error}");
            task.await.unwrap();
        }
        // rotate (or anything else) instead of auth: refused before any token check
        let (mut client, _task) = connect(&hub);
        client.write_all(b"{\"op\":\"rotate\"}\n").await.unwrap();
        let lines = lines_until_closed(client).await;
        assert_eq!(lines.len(), 1);
        assert!(lines[0]["error"]
            .as_str()
            .unwrap()
            .starts_with("authenticate first"));
    }

    #[tokio::test]
    async fn garbage_oversized_and_silent_clients_are_closed() {
        let hub = hub();
        // oversized first line (no newline at all)
        let (mut client, task) = connect(&hub);
        let writer = tokio::spawn(async move {
            let junk = vec![b'x'; MAX_LINE + 100];
            let _ = client.write_all(&junk).await;
            client
        });
        let client = writer.await.unwrap();
        let lines = lines_until_closed(client).await;
        assert_eq!(
            lines,
            [serde_json::json!({"ok": false, "error": "request line too long"})]
        );
        task.await.unwrap();
        // binary garbage
        let (mut client, task) = connect(&hub);
        client.write_all(&[0xff, 0x00, 0x81, b'\n']).await.unwrap();
        let lines = lines_until_closed(client).await;
        assert!(lines[0]["error"]
            .as_str()
            .unwrap()
            .starts_with("request is not JSON"));
        task.await.unwrap();
        // a token of the wrong type, extra fields
        for line in [
            "{\"op\":\"auth\",\"token\":5}\n",
            "{\"op\":\"auth\",\"token\":\"x\",\"follow\":true}\n",
            "{\"op\":\"auth\"}\n",
        ] {
            let (mut client, task) = connect(&hub);
            client.write_all(line.as_bytes()).await.unwrap();
            let lines = lines_until_closed(client).await;
            assert_eq!(lines.len(), 1, "{line}");
            assert!(
                lines[0]["error"]
                    .as_str()
                    .unwrap()
                    .starts_with("authenticate first"),
                "{line}: {lines:?}"
            );
            task.await.unwrap();
        }
        // says nothing: told and closed after the first-line limit
        let (client, task) = connect(&hub);
        let lines = lines_until_closed(client).await;
        assert_eq!(lines.len(), 1);
        assert!(lines[0]["error"]
            .as_str()
            .unwrap()
            .starts_with("no authentication within"));
        task.await.unwrap();
        // authenticates, then says nothing
        let (mut client, task) = connect(&hub);
        client.write_all(auth_line(TOKEN).as_bytes()).await.unwrap();
        let lines = lines_until_closed(client).await;
        assert_eq!(lines.len(), 2);
        assert!(lines[1]["error"]
            .as_str()
            .unwrap()
            .starts_with("no request within"));
        task.await.unwrap();
    }

    #[test]
    fn tokens_match_exactly() {
        let t = Token::new(TOKEN);
        assert!(t.matches(TOKEN));
        assert!(!t.matches(""));
        assert!(!t.matches(&TOKEN[1..]));
        assert!(!t.matches(&format!("{TOKEN} ")));
        assert_eq!(format!("{t:?}"), "Token(..)");
    }

    #[test]
    fn token_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &[u8], mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let good = write("good", format!("  {TOKEN}\n").as_bytes(), 0o600);
        assert_eq!(read_token(&good).unwrap(), TOKEN);
        let group = write("group", TOKEN.as_bytes(), 0o640);
        assert_eq!(read_token(&group).unwrap(), TOKEN);
        // followed through a symlink, as a mounted Secret is
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        assert_eq!(read_token(&link).unwrap(), TOKEN);
        for (path, want) in [
            (
                write("world", TOKEN.as_bytes(), 0o644),
                "readable or writable by others (mode 0644)",
            ),
            (write("worldw", TOKEN.as_bytes(), 0o602), "mode 0602"),
            (write("empty", b"\n \n", 0o600), "empty"),
            (
                write("short", b"abc\n", 0o600),
                "the token is 3 bytes, too short",
            ),
            (write("binary", &[0xff, 0xfe, b'a'], 0o600), "not UTF-8"),
            (write("big", &[b'a'; 5000], 0o600), "5000 bytes"),
            (dir.path().to_path_buf(), "not a regular file"),
        ] {
            let e = read_token(&path).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("token file {}: ", path.display())) && e.contains(want),
                "{e}"
            );
        }
        let missing = dir.path().join("missing");
        let e = read_token(&missing).unwrap_err().to_string();
        assert!(e.contains("No such file"), "{e}");
    }
}
