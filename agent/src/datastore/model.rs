//! The agent's own model of cluster objects, independent of where they come
//! from. Every datastore converts Kubernetes objects into these types the same
//! way (`TryFrom<&k8s_openapi::…>`), so the rest of the agent never sees a
//! Kubernetes type.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use meshward_policy::{L4Protocol, NamedPort, NamespaceInfo, PodInfo};

/// Annotation on a Node: the node's WireGuard public key, standard base64.
pub const ANNOTATION_PUBLIC_KEY: &str = "meshward.io/public-key";
/// Annotation on a Node: the node's underlay endpoint, `ip:port`.
pub const ANNOTATION_ENDPOINT: &str = "meshward.io/endpoint";

/// What the agent knows about one Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// `spec.podCIDRs`, or `spec.podCIDR` when only that is set.
    pub pod_cidrs: Vec<IpNet>,
    /// `meshward.io/public-key`, as published (`wg` base64 of 32 bytes,
    /// checked with `meshward_keys::PublicKey`).
    pub public_key: Option<String>,
    /// `meshward.io/endpoint`.
    pub endpoint: Option<SocketAddr>,
    pub labels: BTreeMap<String, String>,
}

impl NodeInfo {
    /// Whether this node has published what a peer needs (key and endpoint).
    pub fn is_peerable(&self) -> bool {
        self.public_key.is_some() && self.endpoint.is_some()
    }
}

/// A problem with one field of one object: the object is rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.podCIDRs[1]` or
    /// `metadata.annotations["meshward.io/endpoint"]`.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field {}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

fn annotation_field(key: &str) -> String {
    format!("metadata.annotations[\"{key}\"]")
}

impl TryFrom<&Node> for NodeInfo {
    type Error = FieldError;

    fn try_from(node: &Node) -> Result<Self, FieldError> {
        let name = node
            .metadata
            .name
            .as_deref()
            .ok_or_else(|| FieldError::new("metadata.name", "missing"))?;
        validate_node_name(name).map_err(|m| FieldError::new("metadata.name", m))?;

        let spec = node.spec.as_ref();
        let single = spec.and_then(|s| s.pod_cidr.as_deref());
        let multi = spec.and_then(|s| s.pod_cidrs.as_deref()).unwrap_or(&[]);
        let mut pod_cidrs = Vec::new();
        if multi.is_empty() {
            if let Some(text) = single {
                pod_cidrs.push(parse_cidr(text).map_err(|m| FieldError::new("spec.podCIDR", m))?);
            }
        } else {
            for (i, text) in multi.iter().enumerate() {
                let net = parse_cidr(text)
                    .map_err(|m| FieldError::new(format!("spec.podCIDRs[{i}]"), m))?;
                if pod_cidrs.contains(&net) {
                    return Err(FieldError::new(
                        format!("spec.podCIDRs[{i}]"),
                        format!("{net} is listed twice"),
                    ));
                }
                pod_cidrs.push(net);
            }
            if let Some(text) = single {
                // Kubernetes requires podCIDR == podCIDRs[0] when both are set.
                let net = parse_cidr(text).map_err(|m| FieldError::new("spec.podCIDR", m))?;
                if net != pod_cidrs[0] {
                    return Err(FieldError::new(
                        "spec.podCIDR",
                        format!("{net} differs from spec.podCIDRs[0] {}", pod_cidrs[0]),
                    ));
                }
            }
        }

        let annotations = node.metadata.annotations.as_ref();
        let public_key = match annotations.and_then(|a| a.get(ANNOTATION_PUBLIC_KEY)) {
            None => None,
            Some(text) => Some(
                parse_public_key(text)
                    .map_err(|m| FieldError::new(annotation_field(ANNOTATION_PUBLIC_KEY), m))?,
            ),
        };
        let endpoint = match annotations.and_then(|a| a.get(ANNOTATION_ENDPOINT)) {
            None => None,
            Some(text) => Some(
                parse_endpoint(text)
                    .map_err(|m| FieldError::new(annotation_field(ANNOTATION_ENDPOINT), m))?,
            ),
        };

        Ok(NodeInfo {
            name: name.to_string(),
            pod_cidrs,
            public_key,
            endpoint,
            labels: node.metadata.labels.clone().unwrap_or_default(),
        })
    }
}

/// A Pod as the policy compiler reads it. Pods without a namespace are in
/// `default`, as `kubectl apply` would put them.
pub fn pod_info(pod: &Pod) -> Result<PodInfo, FieldError> {
    let name = pod
        .metadata
        .name
        .as_deref()
        .ok_or_else(|| FieldError::new("metadata.name", "missing"))?;
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    validate_node_name(namespace).map_err(|m| FieldError::new("metadata.namespace", m))?;
    let spec = pod.spec.as_ref();
    let mut ports = Vec::new();
    for (c, container) in spec
        .map(|s| s.containers.as_slice())
        .unwrap_or(&[])
        .iter()
        .enumerate()
    {
        for (i, port) in container.ports.as_deref().unwrap_or(&[]).iter().enumerate() {
            let Some(port_name) = &port.name else {
                continue;
            };
            let at = format!("spec.containers[{c}].ports[{i}]");
            let number = u16::try_from(port.container_port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    FieldError::new(
                        format!("{at}.containerPort"),
                        format!("{} is not a port (1-65535)", port.container_port),
                    )
                })?;
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => L4Protocol::Tcp,
                "UDP" => L4Protocol::Udp,
                "SCTP" => L4Protocol::Sctp,
                other => {
                    return Err(FieldError::new(
                        format!("{at}.protocol"),
                        format!("{other:?} is not TCP, UDP or SCTP"),
                    ))
                }
            };
            ports.push(NamedPort {
                name: port_name.clone(),
                port: number,
                protocol,
            });
        }
    }
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = Vec::new();
    let listed = status.and_then(|s| s.pod_ips.as_deref()).unwrap_or(&[]);
    for (i, entry) in listed.iter().enumerate() {
        let ip = entry.ip.parse().map_err(|_| {
            FieldError::new(
                format!("status.podIPs[{i}].ip"),
                format!("{:?} is not an IP address", entry.ip),
            )
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if let Some(text) = status.and_then(|s| s.pod_ip.as_deref()) {
        let ip: IpAddr = text.parse().map_err(|_| {
            FieldError::new("status.podIP", format!("{text:?} is not an IP address"))
        })?;
        if !ips.contains(&ip) {
            ips.insert(0, ip);
        }
    }
    Ok(PodInfo {
        namespace: namespace.to_string(),
        name: name.to_string(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        ips,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ports,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
    })
}

/// A Namespace and its labels.
pub fn namespace_info(ns: &Namespace) -> Result<NamespaceInfo, FieldError> {
    let name = ns
        .metadata
        .name
        .as_deref()
        .ok_or_else(|| FieldError::new("metadata.name", "missing"))?;
    validate_node_name(name).map_err(|m| FieldError::new("metadata.name", m))?;
    Ok(NamespaceInfo {
        name: name.to_string(),
        labels: ns.metadata.labels.clone().unwrap_or_default(),
    })
}

/// A Node name: a DNS subdomain (RFC 1123), as Kubernetes requires.
pub fn validate_node_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty".into());
    }
    if name.len() > 253 {
        return Err(format!("{name:?} is longer than 253 characters"));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "{name:?} is not a valid node name (lowercase letters, digits, '-' and '.', \
                 each dot-separated part starting and ending with a letter or digit)"
            ));
        }
    }
    Ok(())
}

/// A pod CIDR: a network address with its prefix length (no host bits).
fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let net: IpNet = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a CIDR (want e.g. 10.244.1.0/24)"))?;
    if net.trunc() != net {
        return Err(format!(
            "{text:?} has host bits set (did you mean {}?)",
            net.trunc()
        ));
    }
    Ok(net)
}

/// An underlay endpoint `ip:port` (IPv6 as `[addr]:port`).
pub fn parse_endpoint(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not ip:port (e.g. 198.18.0.1:51871)"))?;
    check_endpoint(addr)?;
    Ok(addr)
}

/// An endpoint peers can send to: a unicast, specified address and a port.
pub fn check_endpoint(addr: SocketAddr) -> Result<(), String> {
    let ip = addr.ip();
    if ip.is_unspecified() || ip.is_multicast() || ip == std::net::Ipv4Addr::BROADCAST {
        return Err(format!("{ip} is not a unicast address peers can reach"));
    }
    if addr.port() == 0 {
        return Err(format!("{addr}: port 0"));
    }
    Ok(())
}

/// A WireGuard public key as published: `wg`'s base64 of 32 bytes,
/// checked by `meshward-keys`. Returned trimmed.
pub fn parse_public_key(text: &str) -> Result<String, String> {
    let text = text.trim();
    meshward_keys::PublicKey::from_wg_base64(text).map_err(|e| e.to_string())?;
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const KEY_A: &str = "WAmgVYXkbT2bCtdcDwolI88/iVi/aV3/PHcUBTQSYmo=";

    fn node(yaml: &str) -> Node {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn converts_a_full_node() {
        let n = node(&format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n  labels: {{zone: a}}\n  \
             annotations:\n    meshward.io/public-key: {KEY_A}\n    \
             meshward.io/endpoint: 198.18.0.1:51871\nspec:\n  podCIDR: 198.19.1.0/24\n  \
             podCIDRs: [198.19.1.0/24, 'fd00:1::/64']\n"
        ));
        let info = NodeInfo::try_from(&n).unwrap();
        assert_eq!(info.name, "node1");
        assert_eq!(
            info.pod_cidrs,
            vec![
                "198.19.1.0/24".parse::<IpNet>().unwrap(),
                "fd00:1::/64".parse().unwrap()
            ]
        );
        assert_eq!(info.public_key.as_deref(), Some(KEY_A));
        assert_eq!(info.endpoint, Some("198.18.0.1:51871".parse().unwrap()));
        assert_eq!(info.labels.get("zone").map(String::as_str), Some("a"));
        assert!(info.is_peerable());
    }

    #[test]
    fn a_bare_node_has_nothing_to_peer_with() {
        let info = NodeInfo::try_from(&node("metadata: {name: n2}\n")).unwrap();
        assert_eq!(info.pod_cidrs, vec![]);
        assert!(!info.is_peerable());
        let info = NodeInfo::try_from(&node("metadata: {name: n2}\nspec: {podCIDR: 10.0.0.0/8}\n"))
            .unwrap();
        assert_eq!(info.pod_cidrs, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
    }

    #[test]
    fn field_errors_name_the_field() {
        let cases = [
            ("metadata: {}\n", "metadata.name"),
            ("metadata: {name: Node_1}\n", "metadata.name"),
            ("metadata: {name: n}\nspec: {podCIDR: x}\n", "spec.podCIDR"),
            (
                "metadata: {name: n}\nspec: {podCIDR: 10.0.0.1/24}\n",
                "spec.podCIDR",
            ),
            (
                "metadata: {name: n}\nspec: {podCIDRs: [10.0.0.0/24, bad]}\n",
                "spec.podCIDRs[1]",
            ),
            (
                "metadata: {name: n}\nspec: {podCIDRs: [10.0.0.0/24, 10.0.0.0/24]}\n",
                "spec.podCIDRs[1]",
            ),
            (
                "metadata: {name: n}\nspec: {podCIDR: 10.0.1.0/24, podCIDRs: [10.0.0.0/24]}\n",
                "spec.podCIDR",
            ),
            (
                "metadata: {name: n, annotations: {meshward.io/endpoint: 198.18.0.1}}\n",
                "metadata.annotations[\"meshward.io/endpoint\"]",
            ),
            (
                "metadata: {name: n, annotations: {meshward.io/endpoint: '0.0.0.0:1'}}\n",
                "metadata.annotations[\"meshward.io/endpoint\"]",
            ),
            (
                "metadata: {name: n, annotations: {meshward.io/public-key: abc}}\n",
                "metadata.annotations[\"meshward.io/public-key\"]",
            ),
        ];
        for (yaml, field) in cases {
            let err = NodeInfo::try_from(&node(yaml)).unwrap_err();
            assert_eq!(err.field, field, "{yaml}: {err}");
            assert!(err.to_string().contains(field));
        }
    }

    #[test]
    fn public_keys_are_checked() {
        assert!(parse_public_key(KEY_A).is_ok());
        assert!(parse_public_key(&format!(" {KEY_A}\n")).is_ok());
        assert!(parse_public_key(&KEY_A.replace('=', "A")).is_err());
        assert!(parse_public_key(&KEY_A[1..]).is_err());
        // non-canonical: the last character carries non-zero padding bits
        assert!(parse_public_key("WAmgVYXkbT2bCtdcDwolI88/iVi/aV3/PHcUBTQSYmp=").is_err());
        assert!(parse_public_key("WAmgVYXkbT2bCtdcDwolI88/iVi/aV3/PHcUBTQSYm*=").is_err());
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(parse_endpoint("[fd00::1]:51871").is_ok());
        assert!(parse_endpoint("198.18.0.1:0").is_err());
        assert!(parse_endpoint("224.0.0.1:1").is_err());
        assert!(parse_endpoint("host:1").is_err());
    }

    #[test]
    fn node_names() {
        assert!(validate_node_name("node-1.example").is_ok());
        for bad in ["", "-a", "a-", "A", "a..b", "a_b", &"a".repeat(254)] {
            assert!(validate_node_name(bad).is_err(), "{bad}");
        }
    }
}
