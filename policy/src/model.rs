//! What the policy compiler reads: the cluster as plain data.
//!
//! Datastores (file, Kubernetes) translate their objects into these types;
//! the compiler never sees a datastore, a socket or a clock.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::crd::{MeshClusterwideNetworkPolicy, MeshNetworkPolicy};

/// Transport protocol of a port (Kubernetes spelling `TCP`/`UDP`/`SCTP`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum L4Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl L4Protocol {
    /// The IP protocol number (6, 17, 132).
    pub fn number(self) -> u8 {
        match self {
            L4Protocol::Tcp => 6,
            L4Protocol::Udp => 17,
            L4Protocol::Sctp => 132,
        }
    }
}

impl fmt::Display for L4Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            L4Protocol::Tcp => "TCP",
            L4Protocol::Udp => "UDP",
            L4Protocol::Sctp => "SCTP",
        })
    }
}

/// A named container port (`containerPort` with a `name`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: L4Protocol,
}

/// A pod as the compiler needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`; empty when unknown (a manifest without one). Tells a
    /// pod from an earlier one of the same name.
    pub uid: String,
    /// The node it runs on (`spec.nodeName`); empty when not scheduled.
    pub node: String,
    /// Pod IPs (`status.podIPs`); a pod without IPs is neither selected
    /// nor a peer.
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// Named container ports, for named ports in rules.
    pub ports: Vec<NamedPort>,
    /// Host-network pods are never policy endpoints (as in Kubernetes).
    pub host_network: bool,
}

/// A namespace and its labels (`kubernetes.io/metadata.name` is implied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// One policy object of any supported kind.
#[derive(Clone, Debug, PartialEq)]
pub enum PolicyObject {
    /// `networking.k8s.io/v1` NetworkPolicy.
    Kubernetes(Arc<NetworkPolicy>),
    /// `meshward.io/v1alpha1` MeshNetworkPolicy (namespaced).
    Mesh(Arc<MeshNetworkPolicy>),
    /// `meshward.io/v1alpha1` MeshClusterwideNetworkPolicy.
    Clusterwide(Arc<MeshClusterwideNetworkPolicy>),
}

impl PolicyObject {
    /// Which policy this is.
    pub fn policy_ref(&self) -> PolicyRef {
        let (kind, meta) = match self {
            PolicyObject::Kubernetes(p) => (PolicyKind::NetworkPolicy, &p.metadata),
            PolicyObject::Mesh(p) => (PolicyKind::MeshNetworkPolicy, &p.metadata),
            PolicyObject::Clusterwide(p) => (PolicyKind::MeshClusterwideNetworkPolicy, &p.metadata),
        };
        let namespace = match kind {
            PolicyKind::MeshClusterwideNetworkPolicy => String::new(),
            _ => meta.namespace.clone().unwrap_or_else(|| "default".into()),
        };
        PolicyRef {
            kind,
            namespace,
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// Which policy a rule came from, for drop attribution and flow events.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRef {
    pub kind: PolicyKind,
    /// Empty for cluster-wide policies.
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    NetworkPolicy,
    MeshNetworkPolicy,
    MeshClusterwideNetworkPolicy,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::MeshNetworkPolicy => "MeshNetworkPolicy",
            PolicyKind::MeshClusterwideNetworkPolicy => "MeshClusterwideNetworkPolicy",
        };
        if self.namespace.is_empty() {
            write!(f, "{kind} {}", self.name)
        } else {
            write!(f, "{kind} {}/{}", self.namespace, self.name)
        }
    }
}

/// A pod's identity in outputs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Everything the compiler reads, for one node.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    pub pods: Vec<PodInfo>,
    pub namespaces: Vec<NamespaceInfo>,
    pub policies: Vec<PolicyObject>,
}
