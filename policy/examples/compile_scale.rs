//! Scale sanity for the policy compiler: 5,000 pods in 50 namespaces on
//! 10 nodes, 1,000 policies (NetworkPolicies and mesh policies with
//! selectors, ipBlocks, named ports, toFQDNs and DNS rules). Prints how
//! long compiling takes; asserts nothing about time.
//!
//! `cargo run -p meshward-policy --release --example compile_scale [pods] [policies]`

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use meshward_policy::{
    compile, ClusterView, Compiler, L4Protocol, MeshNetworkPolicy, NamedPort, NamespaceInfo,
    PodInfo, PolicyObject,
};

const NAMESPACES: usize = 50;
const NODES: usize = 10;
const APPS: usize = 40;

fn labels(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn view(pods: usize, policies: usize) -> ClusterView {
    let mut v = ClusterView::default();
    for n in 0..NAMESPACES {
        v.namespaces.push(NamespaceInfo {
            name: format!("ns{n}"),
            labels: labels(&[("team", format!("team{}", n % 10))]),
        });
    }
    for i in 0..pods {
        let ip = Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250) as u8 + 1);
        v.pods.push(PodInfo {
            namespace: format!("ns{}", i % NAMESPACES),
            name: format!("pod{i}"),
            uid: String::new(),
            node: format!("node{}", i % NODES),
            ips: vec![IpAddr::V4(ip)],
            labels: labels(&[
                ("app", format!("app{}", i % APPS)),
                ("tier", ["web", "api", "db"][i % 3].to_string()),
            ]),
            ports: vec![NamedPort {
                name: "http".into(),
                port: 8000 + (i % 7) as u16,
                protocol: L4Protocol::Tcp,
            }],
            host_network: false,
        });
    }
    for p in 0..policies {
        let ns = format!("ns{}", p % NAMESPACES);
        let app = format!("app{}", p % APPS);
        let peer = format!("app{}", (p * 7 + 3) % APPS);
        let team = format!("team{}", p % 10);
        let yaml = if p % 5 == 4 {
            format!(
                "apiVersion: meshward.io/v1alpha1
kind: MeshNetworkPolicy
metadata: {{name: mesh{p}, namespace: {ns}}}
spec:
  endpointSelector: {{matchLabels: {{app: {app}}}}}
  egress:
  - toEndpoints:
    - matchLabels: {{k8s:io.kubernetes.pod.namespace: ns0, app: app0}}
    toPorts:
    - ports: [{{port: '53', protocol: ANY}}]
      rules:
        dns: [{{matchPattern: '*.svc{p}.example.test'}}]
  - toFQDNs: [{{matchName: api{p}.example.test}}, {{matchPattern: '*.cdn{p}.example.test'}}]
    toPorts: [{{ports: [{{port: '443', protocol: TCP}}]}}]
  - toCIDRSet: [{{cidr: 198.18.0.0/16, except: [198.18.{}.0/24]}}]
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: {peer}}}}}]
    toPorts: [{{ports: [{{port: http}}]}}]
",
                p % 250
            )
        } else {
            format!(
                "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: np{p}, namespace: {ns}}}
spec:
  podSelector:
    matchLabels: {{app: {app}}}
    matchExpressions: [{{key: tier, operator: In, values: [web, api]}}]
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {{matchLabels: {{app: {peer}}}}}
    - namespaceSelector: {{matchLabels: {{team: {team}}}}}
      podSelector: {{matchLabels: {{tier: web}}}}
    - ipBlock: {{cidr: 198.18.0.0/15, except: [198.19.{}.0/24]}}
    ports: [{{port: http}}, {{port: 9000, endPort: 9100}}]
  egress:
  - to:
    - namespaceSelector: {{matchLabels: {{team: {team}}}}}
    ports: [{{port: http}}, {{port: 5432}}]
  - ports: [{{port: 53, protocol: UDP}}, {{port: 53, protocol: TCP}}]
",
                p % 20
            )
        };
        let obj = if p % 5 == 4 {
            let m: MeshNetworkPolicy = serde_saphyr::from_str(&yaml).expect("mesh policy");
            PolicyObject::Mesh(Arc::new(m))
        } else {
            PolicyObject::Kubernetes(Arc::new(serde_saphyr::from_str(&yaml).expect("policy")))
        };
        v.policies.push(obj);
    }
    v
}

fn main() {
    let mut args = std::env::args().skip(1);
    let pods: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5_000);
    let policies: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let t = Instant::now();
    let v = view(pods, policies);
    println!(
        "built view: {pods} pods, {policies} policies, {NODES} nodes in {:?}",
        t.elapsed()
    );

    // A node without pods: parsing and checking every policy, nothing else
    // (best of 5: the machine may be shared).
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            let out = compile(&v, "no-such-node");
            assert!(out.rules.endpoints.is_empty());
            t.elapsed()
        })
        .min()
        .unwrap_or_default();
    println!("parse/check only (a node without pods): {best:?}");

    // Cold: `compile` parses every policy each time. Warm: a `Compiler`
    // reused across compiles (here across nodes; in the agent across pod
    // changes) parses each policy once.
    let mut total = std::time::Duration::ZERO;
    let mut warm_total = std::time::Duration::ZERO;
    let mut compiler = Compiler::new();
    compiler.compile(&v, "no-such-node");
    for n in 0..NODES {
        let node = format!("node{n}");
        let t = Instant::now();
        let out = compile(&v, &node);
        let took = t.elapsed();
        total += took;
        let t = Instant::now();
        let warm = compiler.compile(&v, &node);
        warm_total += t.elapsed();
        assert!(out.errors.is_empty(), "{:?}", out.errors.first());
        assert_eq!(warm.rules.endpoints.len(), out.rules.endpoints.len());
        if n == 0 {
            let eps = &out.rules.endpoints;
            let distinct = |f: &dyn Fn(&meshward_policy::EndpointRules) -> Option<usize>| {
                eps.values().filter_map(f).collect::<HashSet<_>>().len()
            };
            let ing = distinct(&|e| e.ingress.as_ref().map(|a| Arc::as_ptr(a) as usize));
            let eg = distinct(&|e| e.egress.as_ref().map(|a| Arc::as_ptr(a) as usize));
            println!(
                "node0: {} endpoints, {ing} distinct ingress and {eg} distinct egress rule sets, \
                 compiled in {took:?}",
                eps.len()
            );
        }
    }
    println!(
        "all {NODES} nodes: cold {total:?} ({:?} per node), warm {warm_total:?} ({:?} per node)",
        total / NODES as u32,
        warm_total / NODES as u32
    );
}
