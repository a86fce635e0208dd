//! lab.json: what `lab up` built, for `status`, `ip` and later issues (the
//! agents of the nodes, the mesh). Lives in /run/meshward-lab/NAME/.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::topology::LabName;

/// Root of every lab's state directory.
pub const STATE_ROOT: &str = "/run/meshward-lab";
/// The format version written into lab.json.
pub const VERSION: u32 = 1;

/// /run/meshward-lab/NAME
pub fn state_dir(lab: &LabName) -> PathBuf {
    Path::new(STATE_ROOT).join(lab.as_str())
}

/// /run/meshward-lab/NAME/lab.json
pub fn state_file(lab: &LabName) -> PathBuf {
    state_dir(lab).join("lab.json")
}

/// /run/meshward-lab/NAME/nodeI
pub fn node_dir(lab: &LabName, node: u8) -> PathBuf {
    state_dir(lab).join(super::topology::node_name(node))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lab {
    pub version: u32,
    pub name: String,
    /// The `meshward-cni` binary pods were created with (none without pods).
    pub cni_bin: Option<PathBuf>,
    pub fabric: Fabric,
    pub external: External,
    pub nodes: Vec<Node>,
    /// Agents run with `mesh: false` and the fabric routes pod CIDRs in
    /// plaintext, as a cloud VPC does for its own CNI's pods.
    #[serde(default)]
    pub policy_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fabric {
    pub namespace: String,
    pub bridge: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct External {
    pub namespace: String,
    pub interface: String,
    pub address: Ipv4Net,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub name: String,
    pub index: u8,
    pub namespace: String,
    pub interface: String,
    pub address: Ipv4Net,
    pub pod_cidr: Ipv4Net,
    /// The CNI plugin's IPAM `stateDir` for this node's pods.
    pub ipam_dir: PathBuf,
    /// The `agentSocket` given to the CNI plugin (nothing listens yet).
    pub agent_socket: PathBuf,
    pub pods: Vec<Pod>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub container_id: String,
    pub interface: String,
    pub address: Ipv4Net,
    /// The CNI ADD result, as the plugin printed it.
    pub cni_result: serde_json::Value,
    /// The Kubernetes namespace the pod's Pod object is in.
    #[serde(default = "default_k8s_namespace")]
    pub k8s_namespace: String,
    /// The Pod object's labels (`--pod-labels`, `lab apply`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

fn default_k8s_namespace() -> String {
    "default".into()
}

impl Lab {
    /// Reads lab.json of `lab`; `Ok(None)` when the lab is not up.
    pub fn load(lab: &LabName) -> Result<Option<Lab>> {
        let file = state_file(lab);
        let text = match fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        };
        let state: Lab =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
        if state.version != VERSION {
            bail!(
                "{} has format version {}, this meshward reads version {VERSION}: run `meshward lab --name {lab} down`",
                file.display(),
                state.version
            );
        }
        Ok(Some(state))
    }

    /// Writes lab.json atomically (temporary file, then rename).
    pub fn save(&self, lab: &LabName) -> Result<()> {
        let file = state_file(lab);
        let tmp = file.with_extension("json.tmp");
        let mut text = serde_json::to_vec_pretty(self).context("encoding lab.json")?;
        text.push(b'\n');
        fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&text).and_then(|()| f.sync_all()))
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &file)
            .with_context(|| format!("renaming {} to {}", tmp.display(), file.display()))
    }

    /// The node with index `index`.
    pub fn node(&self, index: u8) -> Option<&Node> {
        self.nodes.iter().find(|n| n.index == index)
    }
}
