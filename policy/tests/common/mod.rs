//! A small two-node cluster modelled on the upstream Kubernetes network
//! policy e2e suite (namespaces x, y, z; pods a, b, c in each), and a
//! verdict helper that combines the source's egress rules with the
//! destination's ingress rules, each taken from the node the pod runs on.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use meshward_policy::{
    compile, ClusterView, Compiled, EndpointRules, Fqdn, L4Protocol, MeshClusterwideNetworkPolicy,
    MeshNetworkPolicy, NamedPort, NamespaceInfo, PodInfo, PodRef, PolicyObject, PolicyRef,
    PortMatch,
};

pub const TCP: L4Protocol = L4Protocol::Tcp;
pub const UDP: L4Protocol = L4Protocol::Udp;
pub const SCTP: L4Protocol = L4Protocol::Sctp;

pub const NODES: [&str; 2] = ["n1", "n2"];
/// The external endpoint of the truth tables.
pub const EXT: &str = "ext";
pub const EXT_V4: &str = "198.18.100.10";
pub const EXT_V6: &str = "2001:db8:100::10";

/// The e2e suite's pods, in table order.
pub const PODS: [&str; 9] = [
    "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c",
];

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

pub fn fqdn(s: &str) -> Fqdn {
    Fqdn::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

pub fn ns_of(id: &str) -> &str {
    id.split_once('/').map_or("", |(n, _)| n)
}

pub fn pod_of(id: &str) -> &str {
    id.split_once('/').map_or("", |(_, p)| p)
}

#[derive(Clone, Default)]
pub struct Cluster {
    pub view: ClusterView,
}

impl Cluster {
    /// Namespaces x, y, z (label `ns=<name>`), pods a, b, c in each (label
    /// `pod=<name>`), dual-stack, spread over n1 and n2: x/a, x/c, y/b,
    /// z/a, z/c on n1. Every pod serves the e2e named ports
    /// `serve-{80,81}-{tcp,udp,sctp}`; pods a also name TCP 8080 `web`,
    /// pods b name TCP 8081 `web`, pods c have no `web`.
    /// Plus, on n1, a host-network pod `x/host` and a pod without IPs
    /// `x/pending`, both labelled `pod=a`.
    pub fn e2e() -> Self {
        let mut c = Cluster::default();
        for (n, ns) in ["x", "y", "z"].iter().enumerate() {
            c.view.namespaces.push(NamespaceInfo {
                name: ns.to_string(),
                labels: labels(&[("ns", ns)]),
            });
            for (p, pod) in ["a", "b", "c"].iter().enumerate() {
                let node = (n + p) % 2;
                let host = 10 + 10 * n + p;
                let mut ports = Vec::new();
                for port in [80u16, 81] {
                    for (proto, pname) in [(TCP, "tcp"), (UDP, "udp"), (SCTP, "sctp")] {
                        ports.push(NamedPort {
                            name: format!("serve-{port}-{pname}"),
                            port,
                            protocol: proto,
                        });
                    }
                }
                match *pod {
                    "a" => ports.push(NamedPort {
                        name: "web".into(),
                        port: 8080,
                        protocol: TCP,
                    }),
                    "b" => ports.push(NamedPort {
                        name: "web".into(),
                        port: 8081,
                        protocol: TCP,
                    }),
                    _ => {}
                }
                c.view.pods.push(PodInfo {
                    namespace: ns.to_string(),
                    name: pod.to_string(),
                    uid: String::new(),
                    node: NODES[node].to_string(),
                    ips: vec![
                        ip(&format!("198.19.{}.{host}", node + 1)),
                        ip(&format!("2001:db8:{}::{host}", node + 1)),
                    ],
                    labels: labels(&[("pod", pod)]),
                    ports,
                    host_network: false,
                });
            }
        }
        c.view.pods.push(PodInfo {
            namespace: "x".into(),
            name: "host".into(),
            uid: String::new(),
            node: "n1".into(),
            ips: vec![ip("198.18.0.1")],
            labels: labels(&[("pod", "a")]),
            ports: Vec::new(),
            host_network: true,
        });
        c.view.pods.push(PodInfo {
            namespace: "x".into(),
            name: "pending".into(),
            uid: String::new(),
            node: "n1".into(),
            ips: Vec::new(),
            labels: labels(&[("pod", "a")]),
            ports: Vec::new(),
            host_network: false,
        });
        c
    }

    pub fn pod(&self, id: &str) -> &PodInfo {
        self.view
            .pods
            .iter()
            .find(|p| p.namespace == ns_of(id) && p.name == pod_of(id))
            .unwrap_or_else(|| panic!("no pod {id}"))
    }

    pub fn pod_mut(&mut self, id: &str) -> &mut PodInfo {
        self.view
            .pods
            .iter_mut()
            .find(|p| p.namespace == ns_of(id) && p.name == pod_of(id))
            .unwrap_or_else(|| panic!("no pod {id}"))
    }

    pub fn ns_mut(&mut self, name: &str) -> &mut NamespaceInfo {
        self.view
            .namespaces
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no namespace {name}"))
    }

    pub fn add_pod(&mut self, ns: &str, name: &str, node: &str, ips: &[&str], l: &[(&str, &str)]) {
        self.view.pods.push(PodInfo {
            namespace: ns.into(),
            name: name.into(),
            uid: String::new(),
            node: node.into(),
            ips: ips.iter().map(|s| ip(s)).collect(),
            labels: labels(l),
            ports: Vec::new(),
            host_network: false,
        });
    }

    /// Adds a NetworkPolicy from YAML (`metadata:` and `spec:`).
    pub fn k8s(&mut self, yaml: &str) -> &mut Self {
        self.view
            .policies
            .push(PolicyObject::Kubernetes(Arc::new(k8s(yaml))));
        self
    }

    /// Adds a MeshNetworkPolicy from YAML (`metadata:` and `spec:`).
    pub fn mesh(&mut self, yaml: &str) -> &mut Self {
        self.view
            .policies
            .push(PolicyObject::Mesh(Arc::new(mesh(yaml))));
        self
    }

    /// Adds a MeshClusterwideNetworkPolicy from YAML (`metadata:` and `spec:`).
    pub fn clusterwide(&mut self, yaml: &str) -> &mut Self {
        self.view
            .policies
            .push(PolicyObject::Clusterwide(Arc::new(clusterwide(yaml))));
        self
    }

    /// Compiles for both nodes; every policy must be valid.
    pub fn compile(&self) -> World {
        let world = self.compile_with_errors();
        for (node, c) in &world.nodes {
            assert!(
                c.errors.is_empty(),
                "{node}: unexpected errors {:#?}",
                c.errors
            );
        }
        world
    }

    pub fn compile_with_errors(&self) -> World {
        World {
            nodes: NODES
                .iter()
                .map(|n| (n.to_string(), compile(&self.view, n)))
                .collect(),
            cluster: self.clone(),
        }
    }
}

pub fn k8s(yaml: &str) -> NetworkPolicy {
    let doc = format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n{yaml}");
    serde_saphyr::from_str(&doc).unwrap_or_else(|e| panic!("{e}\n{doc}"))
}

pub fn mesh(yaml: &str) -> MeshNetworkPolicy {
    let doc = format!("apiVersion: meshward.io/v1alpha1\nkind: MeshNetworkPolicy\n{yaml}");
    serde_saphyr::from_str(&doc).unwrap_or_else(|e| panic!("{e}\n{doc}"))
}

pub fn clusterwide(yaml: &str) -> MeshClusterwideNetworkPolicy {
    let doc =
        format!("apiVersion: meshward.io/v1alpha1\nkind: MeshClusterwideNetworkPolicy\n{yaml}");
    serde_saphyr::from_str(&doc).unwrap_or_else(|e| panic!("{e}\n{doc}"))
}

/// The compiled rules of every node.
pub struct World {
    pub nodes: BTreeMap<String, Compiled>,
    pub cluster: Cluster,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Family {
    V4,
    V6,
}

impl World {
    /// The rules of a pod (`"x/a"`), from the node it runs on.
    pub fn endpoint(&self, id: &str) -> &EndpointRules {
        let pod = self.cluster.pod(id);
        let key = PodRef {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
        };
        self.nodes
            .get(&pod.node)
            .and_then(|c| c.rules.endpoints.get(&key))
            .unwrap_or_else(|| panic!("{id} is not an endpoint on {}", pod.node))
    }

    pub fn errors(&self) -> &[meshward_policy::PolicyError] {
        &self.nodes["n1"].errors
    }

    fn is_pod(id: &str) -> bool {
        id.contains('/')
    }

    /// The address of an end: a pod's address of the family, `ext`, or an
    /// IP literal.
    pub fn addr(&self, id: &str, family: Family) -> IpAddr {
        if id == EXT {
            return ip(if family == Family::V4 { EXT_V4 } else { EXT_V6 });
        }
        if !Self::is_pod(id) {
            return ip(id);
        }
        let pod = self.cluster.pod(id);
        pod.ips
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == (family == Family::V4))
            .unwrap_or_else(|| panic!("{id} has no {family:?} address"))
    }

    /// May `src` send a packet to `dst` (pods as `"x/a"`, `ext`, or IP
    /// literals)? The source pod's egress AND the destination pod's
    /// ingress; external ends are not enforced on.
    pub fn verdict_in(
        &self,
        family: Family,
        src: &str,
        dst: &str,
        proto: L4Protocol,
        port: u16,
    ) -> bool {
        let (s, d) = (self.addr(src, family), self.addr(dst, family));
        let p = proto.number();
        let egress_ok = !Self::is_pod(src)
            || self
                .endpoint(src)
                .egress
                .as_ref()
                .is_none_or(|e| e.allows(d, p, port).is_some());
        let ingress_ok = !Self::is_pod(dst)
            || self
                .endpoint(dst)
                .ingress
                .as_ref()
                .is_none_or(|i| i.allows(s, p, port).is_some());
        egress_ok && ingress_ok
    }

    pub fn verdict(&self, src: &str, dst: &str, proto: L4Protocol, port: u16) -> bool {
        self.verdict_in(Family::V4, src, dst, proto, port)
    }

    /// Which policy allowed `src`'s egress to `dst` (None: not isolated or denied).
    pub fn egress_by(
        &self,
        src: &str,
        dst: &str,
        proto: L4Protocol,
        port: u16,
    ) -> Option<PolicyRef> {
        let d = self.addr(dst, Family::V4);
        self.endpoint(src)
            .egress
            .as_ref()?
            .allows(d, proto.number(), port)
            .cloned()
    }

    /// Ports a name learned by `src` opens.
    pub fn fqdn_ports(&self, src: &str, name: &str) -> Vec<PortMatch> {
        self.endpoint(src)
            .fqdn_ports(&fqdn(name))
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    }

    /// Checks the full truth table (the nine pods and `ext`, both ways;
    /// a pod to itself is loopback and not checked) against `expect`.
    pub fn check(&self, proto: L4Protocol, port: u16, expect: impl Fn(&str, &str) -> bool) {
        self.check_in(Family::V4, proto, port, expect)
    }

    pub fn check_in(
        &self,
        family: Family,
        proto: L4Protocol,
        port: u16,
        expect: impl Fn(&str, &str) -> bool,
    ) {
        let ends: Vec<&str> = PODS.iter().copied().chain([EXT]).collect();
        let mut table = String::from("from\\to");
        for to in &ends {
            let _ = write!(table, " {to:>4}");
        }
        table.push('\n');
        let mut wrong = 0;
        for from in &ends {
            let _ = write!(table, "{from:>7}");
            for to in &ends {
                if from == to {
                    table.push_str("    -");
                    continue;
                }
                let got = self.verdict_in(family, from, to, proto, port);
                let want = expect(from, to);
                let mark = match (got, want == got) {
                    (true, true) => ".",
                    (false, true) => "X",
                    (true, false) => "!.",
                    (false, false) => "!X",
                };
                if want != got {
                    wrong += 1;
                }
                let _ = write!(table, " {mark:>4}");
            }
            table.push('\n');
        }
        assert!(
            wrong == 0,
            "{family:?} {proto} {port}: {wrong} verdicts differ from the expected truth table \
             (. allowed, X denied, ! wrong):\n{table}"
        );
    }
}
