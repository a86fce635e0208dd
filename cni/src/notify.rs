//! Telling the node agent about attachments over its Unix socket.
//!
//! By default best effort: the agent learns pods from its datastore anyway,
//! this only makes it react sooner, so a missing or slow agent never fails or
//! delays a CNI command by more than the short timeouts below. With
//! `agentWaitSeconds`, ADD instead waits for the agent's answer that the
//! pod's policy is in the kernel ([`confirm`]), as Cilium's CNI waits for the
//! endpoint's regeneration: a pod must not run before its policy does.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::ipam::{Allocation, AttachmentKey, PodMeta};
use crate::spec::Attachment;

const WRITE_TIMEOUT: Duration = Duration::from_millis(100);

/// One line of JSON sent to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub event: &'static str,
    pub network: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    pub ip: String,
    pub host_ifname: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

impl Event {
    pub fn add(network: &str, key: &AttachmentKey, att: &Attachment, pod: &PodMeta) -> Event {
        Event {
            event: "add",
            network: network.to_string(),
            container_id: key.container_id.clone(),
            ifname: key.ifname.clone(),
            ip: att.ip.to_string(),
            host_ifname: att.host_ifname.clone(),
            netns: Some(att.netns.clone()),
            pod_namespace: pod.namespace.clone(),
            pod_name: pod.name.clone(),
            pod_uid: pod.uid.clone(),
        }
    }

    pub fn del(network: &str, alloc: &Allocation) -> Event {
        Event {
            event: "del",
            network: network.to_string(),
            container_id: alloc.key.container_id.clone(),
            ifname: alloc.key.ifname.clone(),
            ip: alloc.ip.to_string(),
            host_ifname: alloc.host_ifname.clone(),
            netns: None,
            pod_namespace: alloc.pod.namespace.clone(),
            pod_name: alloc.pod.name.clone(),
            pod_uid: alloc.pod.uid.clone(),
        }
    }
}

/// Sends `event` if an agent listens on `socket`; failures are ignored.
pub fn send(socket: &Path, event: &Event) {
    let Ok(mut line) = serde_json::to_vec(event) else {
        return;
    };
    line.push(b'\n');
    // connect(2) on a Unix socket fails at once when nobody listens.
    if let Ok(mut stream) = UnixStream::connect(socket) {
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let _ = stream.write_all(&line);
    }
}

/// Longest answer line read from the agent.
const MAX_ANSWER: u64 = 64 * 1024;

/// Sends `event` and waits up to `wait` for the agent's `{"ok":true}`.
/// Fails when no agent listens, it answers an error, or it does not answer
/// in time; the message says which.
pub fn confirm(socket: &Path, event: &Event, wait: Duration) -> Result<(), String> {
    let mut line = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    line.push(b'\n');
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the meshward agent at {}: {e}",
            socket.display()
        )
    })?;
    let timed_out = |e: std::io::Error| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            format!(
                "the meshward agent at {} did not confirm the pod's policy within {}s",
                socket.display(),
                wait.as_secs_f64()
            )
        } else {
            format!("talking to the meshward agent at {}: {e}", socket.display())
        }
    };
    stream
        .set_write_timeout(Some(wait.max(WRITE_TIMEOUT)))
        .and_then(|()| stream.set_read_timeout(Some(wait.max(Duration::from_millis(1)))))
        .map_err(timed_out)?;
    stream.write_all(&line).map_err(timed_out)?;
    let mut answer = Vec::new();
    BufReader::new((&stream).take(MAX_ANSWER))
        .read_until(b'\n', &mut answer)
        .map_err(timed_out)?;
    if answer.is_empty() {
        return Err(format!(
            "the meshward agent at {} closed the connection without an answer (an agent older than this plugin?)",
            socket.display()
        ));
    }
    let reply: Answer = serde_json::from_slice(&answer).map_err(|e| {
        format!(
            "the meshward agent at {} answered something else than JSON: {e}",
            socket.display()
        )
    })?;
    if reply.ok {
        Ok(())
    } else {
        Err(reply
            .error
            .unwrap_or_else(|| "the meshward agent refused without a reason".into()))
    }
}

#[derive(serde::Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn event() -> Event {
        Event {
            event: "add",
            network: "meshward".into(),
            container_id: "c1".into(),
            ifname: "eth0".into(),
            ip: "198.19.1.7".into(),
            host_ifname: "mw0123".into(),
            netns: None,
            pod_namespace: Some("shop".into()),
            pod_name: Some("web-1".into()),
            pod_uid: Some("4f1c".into()),
        }
    }

    /// An agent on a socket in a fresh directory answering `answer` (or
    /// nothing) to the first line.
    fn agent(
        answer: Option<&'static str>,
    ) -> (std::path::PathBuf, std::thread::JoinHandle<Vec<u8>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let _dir = dir;
            let (stream, _) = listener.accept().unwrap();
            let mut line = Vec::new();
            BufReader::new(&stream)
                .read_until(b'\n', &mut line)
                .unwrap();
            match answer {
                Some(a) => (&stream).write_all(a.as_bytes()).unwrap(),
                None => std::thread::sleep(Duration::from_millis(1500)),
            }
            line
        });
        (path, handle)
    }

    #[test]
    fn confirm_returns_the_agents_verdict() {
        let (path, agent_thread) = agent(Some("{\"ok\":true}\n"));
        confirm(&path, &event(), Duration::from_secs(5)).unwrap();
        let line = agent_thread.join().unwrap();
        let sent: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(sent["event"], "add");
        assert_eq!(sent["podName"], "web-1");

        let (path, agent_thread) =
            agent(Some("{\"ok\":false,\"error\":\"scheduled elsewhere\"}\n"));
        let err = confirm(&path, &event(), Duration::from_secs(5)).unwrap_err();
        assert_eq!(err, "scheduled elsewhere");
        agent_thread.join().unwrap();
    }

    #[test]
    fn confirm_fails_when_no_agent_listens_or_it_stays_silent() {
        let err = confirm(
            Path::new("/run/meshward-no-such-dir/agent.sock"),
            &event(),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(err.contains("cannot reach the meshward agent"), "{err}");

        let (path, agent_thread) = agent(None);
        let err = confirm(&path, &event(), Duration::from_millis(200)).unwrap_err();
        assert!(err.contains("did not confirm"), "{err}");
        agent_thread.join().unwrap();

        let (path, agent_thread) = agent(Some("not json\n"));
        let err = confirm(&path, &event(), Duration::from_secs(5)).unwrap_err();
        assert!(err.contains("something else than JSON"), "{err}");
        agent_thread.join().unwrap();
    }
}
