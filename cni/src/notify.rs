//! Best-effort notification of the node agent over its Unix socket.
//!
//! The agent learns about pods from its datastore anyway; this only makes it
//! react sooner. So a missing or slow agent never fails or delays a CNI
//! command by more than the short timeouts below.

use std::io::Write;
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
