//! `lab status`: one row per lab member, as a table or a JSON document.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::agents::AgentState;
use super::state::Lab;

/// The JSON document of `lab status -o json`. Field names and order are
/// stable; fields that do not apply to a row are null.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub lab: String,
    pub state_dir: String,
    pub members: Vec<Row>,
    /// Lab namespaces in /run/netns that lab.json does not describe.
    pub stray_namespaces: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub name: String,
    /// `fabric`, `external`, `node` or `pod`.
    pub kind: &'static str,
    pub namespace: String,
    /// CIDR notation; null for the fabric, which has no address.
    pub address: Option<String>,
    /// The node a pod runs on.
    pub node: Option<String>,
    /// A node's pod CIDR.
    pub pod_cidr: Option<String>,
    /// `ok` or `missing namespace`.
    pub state: &'static str,
    /// A node's agent.
    pub agent: Option<AgentState>,
}

impl Status {
    /// Builds the status of `lab`, given which namespaces exist
    /// (`lab_namespaces`: every /run/netns name with the lab's prefix that
    /// has a namespace mounted; `agents`: each node's agent by node name).
    pub fn new(
        lab: &Lab,
        state_dir: String,
        lab_namespaces: &BTreeSet<String>,
        agents: &BTreeMap<String, AgentState>,
    ) -> Status {
        let state = |ns: &str| {
            if lab_namespaces.contains(ns) {
                "ok"
            } else {
                "missing namespace"
            }
        };
        let mut members = vec![
            Row {
                name: "fabric".into(),
                kind: "fabric",
                namespace: lab.fabric.namespace.clone(),
                address: None,
                node: None,
                pod_cidr: None,
                state: state(&lab.fabric.namespace),
                agent: None,
            },
            Row {
                name: "external".into(),
                kind: "external",
                namespace: lab.external.namespace.clone(),
                address: Some(lab.external.address.to_string()),
                node: None,
                pod_cidr: None,
                state: state(&lab.external.namespace),
                agent: None,
            },
        ];
        for node in &lab.nodes {
            members.push(Row {
                name: node.name.clone(),
                kind: "node",
                namespace: node.namespace.clone(),
                address: Some(node.address.to_string()),
                node: None,
                pod_cidr: Some(node.pod_cidr.to_string()),
                state: state(&node.namespace),
                agent: agents.get(&node.name).cloned(),
            });
            for pod in &node.pods {
                members.push(Row {
                    name: pod.name.clone(),
                    kind: "pod",
                    namespace: pod.namespace.clone(),
                    address: Some(pod.address.to_string()),
                    node: Some(node.name.clone()),
                    pod_cidr: None,
                    state: state(&pod.namespace),
                    agent: None,
                });
            }
        }
        let known: BTreeSet<&str> = members.iter().map(|r| r.namespace.as_str()).collect();
        let stray_namespaces = lab_namespaces
            .iter()
            .filter(|ns| !known.contains(ns.as_str()))
            .cloned()
            .collect();
        Status {
            lab: lab.name.clone(),
            state_dir,
            members,
            stray_namespaces,
        }
    }

    /// The table form: NAME KIND NAMESPACE ADDRESS NODE STATE AGENT.
    pub fn table(&self) -> String {
        let header = [
            "NAME",
            "KIND",
            "NAMESPACE",
            "ADDRESS",
            "NODE",
            "STATE",
            "AGENT",
        ];
        let agents: Vec<String> = self
            .members
            .iter()
            .map(|r| r.agent.as_ref().map_or("-".into(), AgentState::summary))
            .collect();
        let rows: Vec<[&str; 7]> = self
            .members
            .iter()
            .zip(&agents)
            .map(|(r, agent)| {
                [
                    r.name.as_str(),
                    r.kind,
                    r.namespace.as_str(),
                    r.address.as_deref().unwrap_or("-"),
                    r.node.as_deref().unwrap_or("-"),
                    r.state,
                    agent.as_str(),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&rows) {
            let line: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            out += line.join("  ").trim_end();
            out.push('\n');
        }
        for ns in &self.stray_namespaces {
            out += &format!(
                "warning: stray namespace {ns} is not part of lab {} (`lab down` removes it)\n",
                self.lab
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::state::{External, Fabric, Node, Pod};

    fn lab() -> Lab {
        Lab {
            version: 1,
            name: "x".into(),
            cni_bin: None,
            policy_only: false,
            fabric: Fabric {
                namespace: "mwl-x-fabric".into(),
                bridge: "br0".into(),
            },
            external: External {
                namespace: "mwl-x-ext".into(),
                interface: "eth0".into(),
                address: "198.18.100.1/24".parse().unwrap(),
            },
            nodes: vec![Node {
                name: "node1".into(),
                index: 1,
                namespace: "mwl-x-node1".into(),
                interface: "eth0".into(),
                address: "198.18.0.1/24".parse().unwrap(),
                pod_cidr: "198.19.1.0/24".parse().unwrap(),
                ipam_dir: "/run/meshward-lab/x/node1/ipam".into(),
                agent_socket: "/run/meshward-lab/x/node1/agent.sock".into(),
                pods: vec![Pod {
                    name: "node1-pod1".into(),
                    namespace: "mwl-x-node1-pod1".into(),
                    container_id: "mwl-x-node1-pod1".into(),
                    interface: "eth0".into(),
                    address: "198.19.1.2/32".parse().unwrap(),
                    cni_result: serde_json::json!({}),
                    k8s_namespace: "default".into(),
                    labels: Default::default(),
                }],
            }],
        }
    }

    #[test]
    fn rows_states_and_strays() {
        let present: BTreeSet<String> = ["mwl-x-fabric", "mwl-x-ext", "mwl-x-node1", "mwl-x-node7"]
            .map(String::from)
            .into();
        let agents: BTreeMap<String, AgentState> = [(
            "node1".to_string(),
            AgentState {
                state: "running",
                pid: Some(77),
                public_key: Some("K=".into()),
                peers: Some(2),
                peers_up: Some(1),
                error: None,
            },
        )]
        .into();
        let status = Status::new(&lab(), "/run/meshward-lab/x".into(), &present, &agents);
        let rows: Vec<(&str, &str, &str)> = status
            .members
            .iter()
            .map(|r| (r.name.as_str(), r.kind, r.state))
            .collect();
        assert_eq!(
            rows,
            [
                ("fabric", "fabric", "ok"),
                ("external", "external", "ok"),
                ("node1", "node", "ok"),
                ("node1-pod1", "pod", "missing namespace"),
            ]
        );
        assert_eq!(status.stray_namespaces, ["mwl-x-node7"]);

        let table = status.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "NAME        KIND      NAMESPACE         ADDRESS          NODE   STATE              AGENT"
        );
        assert_eq!(
            lines[3],
            "node1       node      mwl-x-node1       198.18.0.1/24    -      ok                 pid 77, 1/2 peers up"
        );
        assert_eq!(
            lines[4],
            "node1-pod1  pod       mwl-x-node1-pod1  198.19.1.2/32    node1  missing namespace  -"
        );
        assert!(lines[5].contains("stray namespace mwl-x-node7"));

        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["members"][2]["podCidr"], "198.19.1.0/24");
        assert_eq!(json["members"][3]["node"], "node1");
        assert_eq!(json["members"][0]["address"], serde_json::Value::Null);
        assert_eq!(json["members"][2]["agent"]["peersUp"], 1);
        assert_eq!(json["members"][2]["agent"]["state"], "running");
    }
}
