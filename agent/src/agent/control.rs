//! The control socket's server half (the protocol is in `protocol.rs`).
//!
//! The socket is created with mode 0600 (under a umask, so it is never
//! reachable by others, not even for an instant) and every connection's
//! peer credentials are checked: only root or the agent's own user may
//! talk to it. Requests go to the agent's main loop one at a time, so a
//! rotation and a status never interleave. `observe` is answered here,
//! from the event hub, without the main loop: a follower holds its
//! connection open for as long as it likes.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::stat::{umask, Mode};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::events::{EventHub, FlowEvent};
use super::protocol::{CniEvent, Observe, Request, Response, MAX_LINE};
use super::ControlRequest;

/// A connection idle this long is closed.
const IDLE: Duration = Duration::from_secs(30);
/// Longest a request waits for the main loop (a rotation fsyncs and publishes).
const ANSWER_WAIT: Duration = Duration::from_secs(30);
/// A CNI ADD waits for its pod's policy as long as the plugin may
/// (`agentWaitSeconds`); the plugin's own deadline ends it sooner.
const CNI_ANSWER_WAIT: Duration =
    Duration::from_secs(meshward_cni::spec::MAX_AGENT_WAIT_SECONDS + 5);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("another agent is already listening on {}", .0.display())]
    InUse(PathBuf),
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
}

pub struct Server {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl Server {
    /// Binds the socket (replacing a stale one left by a dead agent) and
    /// serves it on the current runtime.
    pub async fn start(
        path: &Path,
        tx: mpsc::Sender<ControlRequest>,
        events: Option<Arc<EventHub>>,
    ) -> Result<Server, ControlError> {
        let io = |action: &'static str| {
            let path = path.to_path_buf();
            move |source| ControlError::Io {
                action,
                path,
                source,
            }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(io("creating the directory of"))?;
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).await.is_ok() {
                    return Err(ControlError::InUse(path.to_path_buf()));
                }
                std::fs::remove_file(path).map_err(io("removing the stale socket"))?;
            }
            Ok(_) => return Err(ControlError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("inspecting")(e)),
        }
        // Created with no access for group and others from the start.
        let old = umask(Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(path);
        umask(old);
        let listener = bound.map_err(io("binding"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io("setting mode 0600 on"))?;
        info!(socket = %path.display(), "control socket listening");
        let task = tokio::spawn(accept(listener, tx, events));
        Ok(Server {
            path: path.to_path_buf(),
            task,
        })
    }

    /// Stops serving and removes the socket.
    pub fn stop(self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept(
    listener: UnixListener,
    tx: mpsc::Sender<ControlRequest>,
    events: Option<Arc<EventHub>>,
) {
    let me = nix::unistd::geteuid().as_raw();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!("control socket: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == 0 || cred.uid() == me => {}
            Ok(cred) => {
                warn!(
                    uid = cred.uid(),
                    "control socket: refusing a connection from another user"
                );
                continue;
            }
            Err(e) => {
                warn!("control socket: no peer credentials: {e}");
                continue;
            }
        }
        tokio::spawn(serve(stream, tx.clone(), events.clone()));
    }
}

async fn serve(
    stream: UnixStream,
    tx: mpsc::Sender<ControlRequest>,
    events: Option<Arc<EventHub>>,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        match read_line(&mut reader, &mut line, MAX_LINE, IDLE).await {
            Line::Read => {}
            Line::TooLong => {
                let _ = reply(&mut write, &Response::error("request line too long")).await;
                return;
            }
            Line::Closed | Line::TimedOut => return,
            Line::Failed(e) => {
                debug!("control connection: {e}");
                return;
            }
        }
        if let Some(observe) = observe_request(&line) {
            let Some(hub) = &events else {
                let _ = reply(&mut write, &Response::error("flow events are off")).await;
                return;
            };
            // the connection is the stream's from here on
            stream_events(hub, &observe, reader, write).await;
            return;
        }
        let response = answer(&line, &tx).await;
        if reply(&mut write, &response).await.is_err() {
            return;
        }
    }
}

/// What [`read_line`] got.
pub(super) enum Line {
    /// A line (with its newline, unless the peer closed after it).
    Read,
    /// The peer closed without sending anything more.
    Closed,
    /// Longer than allowed: the caller answers and closes.
    TooLong,
    TimedOut,
    Failed(io::Error),
}

/// Reads one line into `line` (cleared first): at most `max` bytes,
/// within `wait`.
pub(super) async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
    wait: Duration,
) -> Line {
    line.clear();
    let mut limited = reader.take(max as u64 + 1);
    match tokio::time::timeout(wait, limited.read_until(b'\n', line)).await {
        Ok(Ok(0)) => Line::Closed,
        Ok(Ok(_)) if line.len() > max => Line::TooLong,
        Ok(Ok(_)) => Line::Read,
        Ok(Err(e)) => Line::Failed(e),
        Err(_) => Line::TimedOut,
    }
}

fn observe_request(line: &[u8]) -> Option<Observe> {
    match serde_json::from_slice::<Request>(line) {
        Ok(Request::Observe(o)) => Some(o),
        _ => None,
    }
}

/// Sends the buffered events `observe` selects, then (follow) every new
/// one until the client closes its end; else an `end` line.
pub(super) async fn stream_events<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    hub: &EventHub,
    observe: &Observe,
    mut reader: R,
    mut write: W,
) {
    // subscribe first, so nothing falls between the backlog and the stream
    let mut live = observe.follow.then(|| hub.subscribe());
    let backlog = hub.recent(&observe.filter, observe.limit.unwrap_or(usize::MAX));
    let last_time = backlog.last().map(|e| e.time);
    for event in &backlog {
        if reply(&mut write, &Response::event(FlowEvent::clone(event)))
            .await
            .is_err()
        {
            return;
        }
    }
    let Some(live) = live.as_mut() else {
        let _ = reply(&mut write, &Response::end(hub.stats())).await;
        return;
    };
    let mut skip_until = last_time;
    let mut scratch = [0u8; 256];
    loop {
        tokio::select! {
            received = live.recv() => match received {
                Ok(event) => {
                    // the backlog may already hold the first few
                    if let Some(t) = skip_until {
                        if event.time <= t && backlog.iter().any(|b| Arc::ptr_eq(b, &event)) {
                            continue;
                        }
                        skip_until = None;
                    }
                    if !observe.filter.matches(&event) {
                        continue;
                    }
                    if reply(&mut write, &Response::event(FlowEvent::clone(&event))).await.is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    debug!(skipped = n, "an observe follower fell behind");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            // the client closing its end ends the stream
            read = reader.read(&mut scratch) => {
                if !matches!(read, Ok(n) if n > 0) {
                    return;
                }
            }
        }
    }
}

/// The answer to one line.
async fn answer(line: &[u8], tx: &mpsc::Sender<ControlRequest>) -> Response {
    let value: serde_json::Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return Response::error(format!("request is not JSON: {e}")),
    };
    let request = if value.get("event").is_some() {
        match serde_json::from_value::<CniEvent>(value) {
            Ok(event) => {
                debug!(?event, "pod event from meshward-cni");
                Request::Cni(event)
            }
            Err(e) => return Response::error(format!("bad CNI event: {e}")),
        }
    } else {
        match serde_json::from_value::<Request>(value) {
            Ok(r) => r,
            Err(e) => {
                return Response::error(format!(
                    "bad request ({e}); want {{\"op\":\"status\"}} or {{\"op\":\"rotate\"}}"
                ))
            }
        }
    };
    let wait = match request {
        Request::Cni(_) => CNI_ANSWER_WAIT,
        _ => ANSWER_WAIT,
    };
    let (reply_tx, reply_rx) = oneshot::channel();
    if tx.send((request, reply_tx)).await.is_err() {
        return Response::error("the agent is shutting down");
    }
    match tokio::time::timeout(wait, reply_rx).await {
        Ok(Ok(response)) => response,
        Ok(Err(_)) => Response::error("the agent is shutting down"),
        Err(_) => Response::error("the agent did not answer in time"),
    }
}

/// Writes one response line (bounded in time: a client that stops reading
/// is given up on).
pub(super) async fn reply<W: AsyncWrite + Unpin>(
    write: &mut W,
    response: &Response,
) -> io::Result<()> {
    let mut text = serde_json::to_vec(response).map_err(io::Error::other)?;
    text.push(b'\n');
    tokio::time::timeout(IDLE, write.write_all(&text))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "write timed out"))?
}
