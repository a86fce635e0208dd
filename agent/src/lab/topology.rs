//! The lab's names and address plan: pure functions, no I/O.
//!
//! Every lab namespace is called `mwl-NAME-...`, so several labs (or tests)
//! never collide and `lab down` can find what a killed lab left behind.
//! Addresses come only from the benchmarking range 198.18.0.0/15:
//!
//! | what                   | address                  |
//! |------------------------|--------------------------|
//! | underlay (fabric)      | 198.18.0.0/24, node I is 198.18.0.I |
//! | external namespace     | 198.18.100.1/24          |
//! | pods of node I         | 198.19.I.0/24            |

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;

/// Largest node count: node I owns 198.18.0.I and 198.19.I.0/24.
pub const MAX_NODES: u8 = 254;
/// Largest pod count per node: a /24 minus network, broadcast and the node's
/// reserved first address.
pub const MAX_PODS_PER_NODE: u8 = 253;
/// Longest lab name; keeps namespace names short (`mwl-` + name + at most
/// `-node254-pod253`).
pub const MAX_NAME_LEN: usize = 12;

/// The underlay subnet the fabric bridge carries.
pub const UNDERLAY: Ipv4Net = net(198, 18, 0, 0, 24);
/// The subnet of outside services, reachable from every node.
pub const EXTERNAL_NET: Ipv4Net = net(198, 18, 100, 0, 24);
/// The external namespace's own address.
pub const EXTERNAL_ADDRESS: Ipv4Net = net(198, 18, 100, 1, 24);
/// All pod CIDRs together. Nodes route it `unreachable` so pod traffic to
/// another node fails closed until the encrypted mesh adds its routes.
pub const POD_SUPERNET: Ipv4Net = net(198, 19, 0, 0, 16);

/// The bridge in the fabric namespace.
pub const BRIDGE: &str = "br0";
/// The underlay interface inside node and external namespaces.
pub const UNDERLAY_IFNAME: &str = "eth0";
/// The interface the CNI plugin creates inside every pod.
pub const POD_IFNAME: &str = "eth0";
/// The external namespace's port on the fabric bridge.
pub const EXTERNAL_PORT: &str = "ext";

const fn net(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Net {
    match Ipv4Net::new(Ipv4Addr::new(a, b, c, d), prefix) {
        Ok(n) => n,
        Err(_) => panic!("invalid constant prefix length"),
    }
}

/// A validated lab name: 1 to 12 characters of `[a-z0-9]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabName(String);

impl LabName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The prefix of every namespace of this lab. Lab names have no `-`, so
    /// the prefix of one lab is never a prefix of another's.
    pub fn prefix(&self) -> String {
        format!("mwl-{}-", self.0)
    }

    pub fn fabric_ns(&self) -> String {
        format!("{}fabric", self.prefix())
    }

    pub fn external_ns(&self) -> String {
        format!("{}ext", self.prefix())
    }

    pub fn node_ns(&self, node: u8) -> String {
        format!("{}{}", self.prefix(), node_name(node))
    }

    pub fn pod_ns(&self, node: u8, pod: u8) -> String {
        format!("{}{}", self.prefix(), pod_name(node, pod))
    }

    /// The namespace of a target, named as `lab exec` and `lab ip` take it.
    pub fn target_ns(&self, target: Target) -> String {
        match target {
            Target::Fabric => self.fabric_ns(),
            Target::External => self.external_ns(),
            Target::Node(n) => self.node_ns(n),
            Target::Pod(n, p) => self.pod_ns(n, p),
        }
    }
}

impl fmt::Display for LabName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for LabName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > MAX_NAME_LEN {
            return Err(format!(
                "lab name {s:?} must be 1 to {MAX_NAME_LEN} characters long"
            ));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        {
            return Err(format!(
                "lab name {s:?} contains {c:?}: only lowercase letters a-z and digits 0-9 are allowed"
            ));
        }
        Ok(LabName(s.to_string()))
    }
}

/// `nodeI`
pub fn node_name(node: u8) -> String {
    format!("node{node}")
}

/// `nodeI-podJ`
pub fn pod_name(node: u8, pod: u8) -> String {
    format!("node{node}-pod{pod}")
}

/// Node I's underlay address, 198.18.0.I/24.
pub fn node_address(node: u8) -> Ipv4Net {
    net(198, 18, 0, node, 24)
}

/// Node I's pod CIDR, 198.19.I.0/24.
pub fn pod_cidr(node: u8) -> Ipv4Net {
    net(198, 19, node, 0, 24)
}

/// Node I's port on the fabric bridge, `nI`.
pub fn fabric_port(node: u8) -> String {
    format!("n{node}")
}

/// Checks `lab up` sizes against the address plan.
pub fn check_size(nodes: u32, pods_per_node: u32) -> Result<(u8, u8), String> {
    let nodes = u8::try_from(nodes)
        .ok()
        .filter(|n| (1..=MAX_NODES).contains(n))
        .ok_or_else(|| {
            format!("--nodes {nodes} is out of range: a lab has 1 to {MAX_NODES} nodes")
        })?;
    let pods = u8::try_from(pods_per_node)
        .ok()
        .filter(|p| *p <= MAX_PODS_PER_NODE)
        .ok_or_else(|| {
            format!(
                "--pods {pods_per_node} is out of range: a node has 0 to {MAX_PODS_PER_NODE} pods"
            )
        })?;
    Ok((nodes, pods))
}

/// What `lab exec` and `lab ip` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Fabric,
    External,
    Node(u8),
    Pod(u8, u8),
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "unknown lab target {s:?}: expected a pod (node1-pod1), a node (node1), `external` or `fabric`"
            )
        };
        match s {
            "fabric" => return Ok(Target::Fabric),
            "external" | "ext" => return Ok(Target::External),
            _ => {}
        }
        let rest = s.strip_prefix("node").ok_or_else(bad)?;
        let (node, pod) = match rest.split_once("-pod") {
            Some((node, pod)) => (node, Some(pod)),
            None => (rest, None),
        };
        let node = parse_index(node).filter(|n| *n >= 1).ok_or_else(bad)?;
        match pod {
            None => Ok(Target::Node(node)),
            Some(pod) => {
                let pod = parse_index(pod).filter(|p| *p >= 1).ok_or_else(bad)?;
                Ok(Target::Pod(node, pod))
            }
        }
    }
}

/// A decimal index without sign or leading zeros (so every target has one
/// spelling).
fn parse_index(s: &str) -> Option<u8> {
    if s.is_empty() || s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Fabric => f.write_str("fabric"),
            Target::External => f.write_str("external"),
            Target::Node(n) => f.write_str(&node_name(*n)),
            Target::Pod(n, p) => f.write_str(&pod_name(*n, *p)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names() {
        assert!("lab".parse::<LabName>().is_ok());
        assert!("t12345abc".parse::<LabName>().is_ok());
        for bad in ["", "Lab", "a-b", "a_b", "a b", "abcdefghijklm", "é"] {
            assert!(bad.parse::<LabName>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn namespace_names() {
        let lab: LabName = "x".parse().unwrap();
        assert_eq!(lab.prefix(), "mwl-x-");
        assert_eq!(lab.fabric_ns(), "mwl-x-fabric");
        assert_eq!(lab.external_ns(), "mwl-x-ext");
        assert_eq!(lab.node_ns(3), "mwl-x-node3");
        assert_eq!(lab.pod_ns(3, 12), "mwl-x-node3-pod12");
        let long: LabName = "abcdefghijkl".parse().unwrap();
        assert!(long.pod_ns(MAX_NODES, MAX_PODS_PER_NODE).len() <= 40);
    }

    #[test]
    fn address_plan() {
        assert_eq!(node_address(7).to_string(), "198.18.0.7/24");
        assert_eq!(pod_cidr(7).to_string(), "198.19.7.0/24");
        assert!(UNDERLAY.contains(&node_address(MAX_NODES)));
        assert!(POD_SUPERNET.contains(&pod_cidr(MAX_NODES)));
        assert!(!UNDERLAY.contains(&EXTERNAL_ADDRESS.addr()));
        assert_eq!(EXTERNAL_ADDRESS.trunc(), EXTERNAL_NET);
    }

    #[test]
    fn sizes() {
        assert_eq!(check_size(2, 3), Ok((2, 3)));
        assert_eq!(check_size(1, 0), Ok((1, 0)));
        assert!(check_size(0, 1).is_err());
        assert!(check_size(255, 1).is_err());
        assert!(check_size(1, 254).is_err());
        assert!(check_size(u32::MAX, 1).is_err());
    }

    #[test]
    fn targets() {
        assert_eq!("fabric".parse(), Ok(Target::Fabric));
        assert_eq!("external".parse(), Ok(Target::External));
        assert_eq!("node2".parse(), Ok(Target::Node(2)));
        assert_eq!("node2-pod10".parse(), Ok(Target::Pod(2, 10)));
        for bad in [
            "",
            "node",
            "node0",
            "node01",
            "node1-pod",
            "node1-pod0",
            "pod1",
            "node1x",
            "node300",
            "node+1",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(Target::Pod(2, 10).to_string(), "node2-pod10");
    }
}
