//! The agent's control protocol over its Unix socket (`socketPath`, mode
//! 0600, root only): one JSON object per line each way.
//!
//! ```text
//! → {"op":"status"}
//! ← {"ok":true,"status":{"node":"node1","publicKey":"…","peers":[…],…}}
//! → {"op":"rotate"}
//! ← {"ok":true,"rotation":{"publicKey":"…","previousPublicKey":"…"}}
//! ← {"ok":false,"error":"…"}            (any request that failed)
//! → {"op":"observe","filter":{…},"follow":false,"limit":1000}
//! ← {"ok":true,"event":{…}}              (one line per buffered event)
//! ← {"ok":true,"end":{"published":…}}    (without follow: the last line)
//! ```
//!
//! `observe` is also served over TCP with a token (`observeAddress`; the
//! TCP side serves nothing else): see `observe_tcp.rs`.
//!
//! A connection may carry several requests; each gets one response line, in
//! order. Lines from `meshward-cni` (`{"event":"add",…}` / `"del"`, sent to
//! the same socket when the CNI's `agentSocket` points here) are answered
//! `{"ok":true}` once the pod's policy is in the kernel (ADD with
//! `agentWaitSeconds` waits for that line), or with an error. The client half here is synchronous: `meshward keys rotate`,
//! `meshward status` and the lab use it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::events::{Filter, FlowEvent, HubStats};

/// Longest request or response line accepted.
pub const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Request {
    Status,
    Rotate,
    /// Recent flow events; with `follow`, then every new one until the
    /// client closes the connection.
    Observe(Observe),
    /// A line from `meshward-cni` (`{"event":…}`), never an `op`.
    #[serde(skip)]
    Cni(CniEvent),
}

/// What `meshward-cni` sends on ADD and DEL (its `notify::Event`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniEvent {
    /// `add` or `del`.
    pub event: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    pub ip: std::net::IpAddr,
    #[serde(default)]
    pub pod_namespace: Option<String>,
    #[serde(default)]
    pub pod_name: Option<String>,
    /// `K8S_POD_UID`: tells the pod from an earlier one of the same name.
    #[serde(default)]
    pub pod_uid: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Observe {
    #[serde(default)]
    pub filter: Filter,
    #[serde(default)]
    pub follow: bool,
    /// Buffered events sent at most (the most recent); none: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Rotation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<FlowEvent>,
    /// The end of an `observe` without follow: the hub's counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<HubStats>,
}

impl Response {
    /// `{"ok":true}`: a request that needs no more answer (TCP auth).
    pub fn default_ok() -> Response {
        Response {
            ok: true,
            ..Response::default()
        }
    }

    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(message.into()),
            ..Response::default()
        }
    }

    pub fn status(status: Status) -> Response {
        Response {
            ok: true,
            status: Some(status),
            ..Response::default()
        }
    }

    pub fn rotation(rotation: Rotation) -> Response {
        Response {
            ok: true,
            rotation: Some(rotation),
            ..Response::default()
        }
    }

    pub fn event(event: FlowEvent) -> Response {
        Response {
            ok: true,
            event: Some(event),
            ..Response::default()
        }
    }

    pub fn end(stats: HubStats) -> Response {
        Response {
            ok: true,
            end: Some(stats),
            ..Response::default()
        }
    }
}

/// The answer to `rotate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    /// The new key, already in use and published.
    pub public_key: String,
    /// The key it replaces, accepted until every peer moved over.
    pub previous_public_key: String,
}

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub node: String,
    pub pid: u32,
    pub public_key: String,
    /// Set while a rotation is in progress: until no session needs the
    /// previous key and it is deleted from the state directory.
    pub previous_public_key: Option<String>,
    pub endpoint: String,
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
    /// This node's address on the tunnel interface.
    pub address: String,
    pub interface: String,
    /// `false`: policy only (`mesh: false`), no tunnel on this node.
    #[serde(default = "yes")]
    pub mesh: bool,
    pub strict_mode: bool,
    pub datastore: DatastoreStatus,
    /// The data plane's own counters (the mesh's are in `peers` and `drops`).
    #[serde(default)]
    pub data_plane: Option<DataPlaneStatus>,
    pub peers: Vec<PeerStatus>,
    /// Dropped packets and datagrams by reason (only reasons with drops).
    pub drops: BTreeMap<String, u64>,
    /// Problems with other Nodes' data, as last planned.
    pub problems: Vec<String>,
    /// Policy enforcement and the DNS proxy.
    #[serde(default)]
    pub policy: Option<PolicyStatus>,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_address: Option<String>,
    /// The flow-event buffer's counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_events: Option<HubStats>,
}

/// What policy enforcement is doing on this node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// Policy objects in the datastore (every kind), whether or not they
    /// select a pod here.
    #[serde(default)]
    pub policies_loaded: usize,
    /// The policies isolating a local pod (in force on this node).
    #[serde(default)]
    pub in_force: Vec<String>,
    /// Local pods the compiler saw.
    pub endpoints: usize,
    pub isolated_egress: usize,
    pub isolated_ingress: usize,
    /// Pods whose DNS goes through the proxy.
    pub dns_redirected: usize,
    /// Policies skipped, with why.
    pub errors: Vec<String>,
    /// Learned (name, address) entries.
    pub learned_entries: usize,
    /// DNS proxy counters by name.
    pub dns: BTreeMap<String, u64>,
    /// Learned names (the longest-lived first, at most a few hundred).
    #[serde(default)]
    pub learned: Vec<LearnedName>,
    /// Ports whose traffic goes through the L7 proxy, per pod and direction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub l7_ports: Vec<L7Ports>,
    /// L7 proxy decisions since start: allowed, denied.
    #[serde(default)]
    pub l7_requests: (u64, u64),
}

/// The L7 ports of one pod in one direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct L7Ports {
    /// `namespace/name`.
    pub pod: String,
    /// egress or ingress.
    pub direction: String,
    pub ports: Vec<u16>,
}

/// A name the DNS proxy learned, with what it resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LearnedName {
    pub name: String,
    pub ips: Vec<String>,
    /// Seconds until the last of its addresses expires.
    pub ttl_secs: u64,
}

impl Status {
    /// Peers with a working session.
    pub fn peers_up(&self) -> usize {
        self.peers.iter().filter(|p| p.session_up).count()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataPlaneStatus {
    /// The TUN has virtio-net offloads (GSO/GRO).
    pub offload: bool,
    pub udp_datagrams_sent: u64,
    pub udp_datagrams_received: u64,
    pub tun_packets_read: u64,
    pub tun_packets_written: u64,
    /// I/O errors of the data plane (it keeps going).
    pub errors: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatastoreStatus {
    pub spec: String,
    pub synced: bool,
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    pub name: String,
    pub public_key: String,
    pub endpoint: Option<String>,
    #[serde(rename = "allowedIPs")]
    pub allowed_ips: Vec<String>,
    pub session_up: bool,
    /// Unix time in milliseconds of the last completed handshake.
    pub last_handshake_unix_ms: Option<u64>,
    /// Seconds since then, when the status was taken.
    pub last_handshake_secs_ago: Option<f64>,
    pub handshakes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// A new session (our key or theirs changed) is handshaking.
    pub key_change_pending: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {}: {source} (is `meshward agent` running, and are you root?)", socket.display())]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the agent at {}: {source}", socket.display())]
    Io {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent at {} sent a bad response: {message}", socket.display())]
    BadResponse { socket: PathBuf, message: String },
    #[error("the agent refused: {0}")]
    Refused(String),
}

/// Sends one request and reads its response, each step bounded by `timeout`.
/// A response with `ok: false` becomes [`ClientError::Refused`].
pub fn request(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let io = |source| ClientError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        socket: socket.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(request).map_err(|e| ClientError::BadResponse {
        socket: socket.to_path_buf(),
        message: format!("encoding the request: {e}"),
    })?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io)?;
    let mut reader = BufReader::new(&stream).take(MAX_LINE as u64);
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(io)?;
    if !answer.ends_with('\n') {
        return Err(ClientError::BadResponse {
            socket: socket.to_path_buf(),
            message: if answer.is_empty() {
                "the connection closed without an answer".into()
            } else {
                "the answer is not one complete line".into()
            },
        });
    }
    let response: Response =
        serde_json::from_str(&answer).map_err(|e| ClientError::BadResponse {
            socket: socket.to_path_buf(),
            message: e.to_string(),
        })?;
    if !response.ok {
        return Err(ClientError::Refused(
            response.error.unwrap_or_else(|| "no reason given".into()),
        ));
    }
    Ok(response)
}

/// `status` through [`request`].
pub fn status(socket: &Path, timeout: Duration) -> Result<Status, ClientError> {
    request(socket, &Request::Status, timeout)?
        .status
        .ok_or_else(|| ClientError::BadResponse {
            socket: socket.to_path_buf(),
            message: "no status in the answer".into(),
        })
}

/// `observe`: calls `on_event` for each event until the agent ends the
/// stream (without follow) or `on_event` returns false. Without follow each
/// read is bounded by `timeout`; with follow reads wait indefinitely.
pub fn observe(
    socket: &Path,
    observe: &Observe,
    timeout: Duration,
    on_event: impl FnMut(FlowEvent) -> bool,
) -> Result<Option<HubStats>, ClientError> {
    let io = |source| ClientError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    let bad = |message: String| ClientError::BadResponse {
        socket: socket.to_path_buf(),
        message,
    };
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        socket: socket.to_path_buf(),
        source,
    })?;
    stream
        .set_read_timeout((!observe.follow).then_some(timeout))
        .map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(&Request::Observe(observe.clone()))
        .map_err(|e| bad(format!("encoding the request: {e}")))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io)?;
    read_events(&mut BufReader::new(&stream), on_event).map_err(|e| match e {
        StreamError::Io(e) => io(e),
        StreamError::Bad(message) => bad(message),
        StreamError::Refused(message) => ClientError::Refused(message),
    })
}

/// What went wrong reading an `observe` answer, whatever the transport.
#[derive(Debug)]
pub(crate) enum StreamError {
    Io(std::io::Error),
    Bad(String),
    Refused(String),
}

/// Reads one response line; `ok: false` becomes [`StreamError::Refused`],
/// a closed connection `None`.
pub(crate) fn read_response(reader: &mut impl BufRead) -> Result<Option<Response>, StreamError> {
    let mut answer = String::new();
    let n = reader
        .take(MAX_LINE as u64)
        .read_line(&mut answer)
        .map_err(StreamError::Io)?;
    if n == 0 {
        return Ok(None);
    }
    let response: Response =
        serde_json::from_str(&answer).map_err(|e| StreamError::Bad(e.to_string()))?;
    if !response.ok {
        return Err(StreamError::Refused(
            response.error.unwrap_or_else(|| "no reason given".into()),
        ));
    }
    Ok(Some(response))
}

/// The answer to an `observe` request: `on_event` for each event until the
/// agent ends the stream (`Some(end)`), closes it or `on_event` returns
/// false (`None`).
pub(crate) fn read_events(
    reader: &mut impl BufRead,
    mut on_event: impl FnMut(FlowEvent) -> bool,
) -> Result<Option<HubStats>, StreamError> {
    loop {
        // the agent went away: a follow ends here
        let Some(response) = read_response(reader)? else {
            return Ok(None);
        };
        if let Some(end) = response.end {
            return Ok(Some(end));
        }
        if let Some(event) = response.event {
            if !on_event(event) {
                return Ok(None);
            }
        }
    }
}

fn yes() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"op":"status"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"rotate"}"#).unwrap(),
            Request::Rotate
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
        let r = serde_json::to_string(&Response::error("nope")).unwrap();
        assert_eq!(r, r#"{"ok":false,"error":"nope"}"#);
        let o: Request = serde_json::from_str(
            r#"{"op":"observe","filter":{"verdict":"dropped","type":"l4","fromPod":"default/a"},"follow":true}"#,
        )
        .unwrap();
        let Request::Observe(o) = o else {
            panic!("not observe")
        };
        assert!(o.follow);
        assert_eq!(o.filter.from_pod.as_deref(), Some("default/a"));
        assert_eq!(
            o.filter.verdict,
            Some(super::super::events::Verdict::Dropped)
        );
    }
}
