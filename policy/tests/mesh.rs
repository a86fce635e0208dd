//! MeshNetworkPolicy / MeshClusterwideNetworkPolicy truth tables (Cilium
//! semantics), on the same e2e cluster as the NetworkPolicy tests.

mod common;

use std::sync::Arc;

use common::*;
use meshward_policy::{DnsVerdict, NamespaceInfo, PortMatch};

/// The e2e cluster plus kube-system/dns (198.19.2.53, on n2).
fn with_dns() -> Cluster {
    let mut c = Cluster::e2e();
    c.view.namespaces.push(NamespaceInfo {
        name: "kube-system".into(),
        labels: labels(&[]),
    });
    c.add_pod(
        "kube-system",
        "dns",
        "n2",
        &["198.19.2.53", "2001:db8:2::53"],
        &[("k8s-app", "kube-dns")],
    );
    c
}

#[test]
fn endpoints_default_to_the_policy_namespace() {
    let mut c = Cluster::e2e();
    c.mesh(
        "
metadata: {name: from-b, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints: [{matchLabels: {pod: b}}]
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| to != "x/a" || from == "x/b");
    assert!(w.endpoint("x/a").egress.is_none());
    assert_eq!(
        w.endpoint("x/a")
            .ingress
            .as_ref()
            .map(|i| i.policies[0].to_string()),
        Some("MeshNetworkPolicy x/from-b".to_string())
    );
}

#[test]
fn namespace_pseudo_label_selects_other_namespaces() {
    let mut c = Cluster::e2e();
    c.mesh(
        "
metadata: {name: from-y-b, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints:
    - matchLabels: {k8s:io.kubernetes.pod.namespace: y, pod: b}
",
    )
    .mesh(
        "
metadata: {name: from-z, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints:
    - matchLabels: {io.kubernetes.pod.namespace: z}
",
    )
    .mesh(
        "
metadata: {name: from-any-c, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: b}}
  ingress:
  - fromEndpoints:
    - matchLabels: {pod: c}
      matchExpressions:
      - {key: k8s:io.kubernetes.pod.namespace, operator: Exists}
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| match to {
        "x/a" => from == "y/b" || ns_of(from) == "z",
        "x/b" => pod_of(from) == "c",
        _ => true,
    });
}

#[test]
fn source_prefixes_are_stripped() {
    let mut c = Cluster::e2e();
    c.mesh(
        "
metadata: {name: k8s-prefix, namespace: y}
spec:
  endpointSelector: {matchLabels: {k8s:pod: a}}
  ingress:
  - fromEndpoints: [{matchLabels: {any:pod: b}}]
",
    )
    .mesh(
        "
metadata: {name: reserved, namespace: z}
spec:
  endpointSelector: {matchLabels: {reserved:pod: a}}
  ingress: []
",
    );
    let w = c.compile();
    // Only k8s: and any: are pod labels: reserved:pod selects no pod, z is
    // untouched.
    w.check(TCP, 80, |from, to| to != "y/a" || from == "y/b");
}

#[test]
fn namespace_labels_pseudo_label() {
    let mut c = Cluster::e2e();
    c.clusterwide(
        "
metadata: {name: from-ns-z}
spec:
  endpointSelector: {matchLabels: {io.kubernetes.pod.namespace: x, pod: a}}
  ingress:
  - fromEndpoints:
    - matchLabels: {k8s:io.cilium.k8s.namespace.labels.ns: z}
",
    )
    .mesh(
        "
metadata: {name: own-ns-only, namespace: y}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints:
    - matchLabels: {io.cilium.k8s.namespace.labels.ns: z}
",
    );
    let w = c.compile();
    // In a namespaced policy the selector still means its own namespace,
    // whose labels say ns=y: nothing matches (as in Cilium).
    w.check(TCP, 80, |from, to| match to {
        "x/a" => ns_of(from) == "z",
        "y/a" => false,
        _ => true,
    });
}

#[test]
fn namespace_selector_extension() {
    let mut c = Cluster::e2e();
    c.mesh(
        "
metadata: {name: from-y, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - namespaceSelector: {matchLabels: {ns: y}}
",
    )
    .mesh(
        "
metadata: {name: from-yz-b, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: b}}
  egress:
  - namespaceSelector:
      matchExpressions: [{key: k8s:kubernetes.io/metadata.name, operator: In, values: [y, z]}]
    toEndpoints: [{matchLabels: {pod: b}}]
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| {
        (to != "x/a" || ns_of(from) == "y")
            && (from != "x/b" || (pod_of(to) == "b" && ns_of(to) != "x"))
    });
}

#[test]
fn clusterwide_policy_spans_namespaces() {
    let mut c = Cluster::e2e();
    c.clusterwide(
        "
metadata: {name: a-to-a}
spec:
  endpointSelector:
    matchExpressions: [{key: io.kubernetes.pod.namespace, operator: NotIn, values: [z]}]
  egress:
  - toEndpoints: [{matchLabels: {pod: a}}]
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| {
        from == EXT || ns_of(from) == "z" || pod_of(to) == "a"
    });
    let p = w
        .endpoint("y/c")
        .egress
        .as_ref()
        .map(|e| e.policies[0].to_string());
    assert_eq!(p.as_deref(), Some("MeshClusterwideNetworkPolicy a-to-a"));
}

#[test]
fn cidr_and_cidr_set_except() {
    let mut c = Cluster::e2e();
    c.mesh(
        "
metadata: {name: world, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toCIDRSet:
    - cidr: 198.18.100.0/24
      except: [198.18.100.10/32]
    - cidr: '2001:db8:100::/48'
      except: ['2001:db8:100::/64']
  - toCIDR: [198.19.2.20, '2001:db8:1::21']
",
    );
    let w = c.compile();
    // y/a is 198.19.2.20 (n2), y/b is 2001:db8:1::21 (n1).
    w.check(TCP, 80, |from, to| from != "x/a" || to == "y/a");
    w.check_in(Family::V6, TCP, 80, |from, to| from != "x/a" || to == "y/b");
    assert!(w.verdict("x/a", "198.18.100.11", UDP, 9));
    assert!(!w.verdict_in(Family::V6, "x/a", "2001:db8:100::11", UDP, 9));
    assert!(w.verdict_in(Family::V6, "x/a", "2001:db8:100:1::11", UDP, 9));
}

#[test]
fn to_ports_protocols_and_ranges() {
    let mut c = Cluster::e2e();
    c.mesh(
        "
metadata: {name: ports, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toCIDR: [198.18.100.10/32]
    toPorts:
    - ports:
      - {port: '443'}
      - {port: '8000', endPort: 8002, protocol: UDP}
  - toEndpoints: [{}]
    toPorts:
    - ports: [{port: '80', protocol: TCP}]
",
    );
    let w = c.compile();
    for proto in [TCP, UDP, SCTP] {
        w.check(proto, 443, |from, to| from != "x/a" || to == EXT);
    }
    for port in [8000, 8002] {
        w.check(UDP, port, |from, to| from != "x/a" || to == EXT);
    }
    w.check(UDP, 8003, |from, _| from != "x/a");
    w.check(TCP, 8000, |from, _| from != "x/a");
    w.check(TCP, 80, |from, to| from != "x/a" || ns_of(to) == "x");
    w.check(UDP, 80, |from, _| from != "x/a");
}

#[test]
fn l4_only_rule_admits_every_peer_and_empty_rule_nothing() {
    let mut c = Cluster::e2e();
    c.mesh(
        "
metadata: {name: l4-only, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toPorts: [{ports: [{port: '80', protocol: TCP}]}]
",
    )
    .mesh(
        "
metadata: {name: deny-in, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: b}}
  ingress:
  - {}
",
    )
    .mesh(
        "
metadata: {name: deny-out, namespace: y}
spec:
  endpointSelector: {}
  egress: []
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| to != "x/b" && ns_of(from) != "y");
    w.check(TCP, 81, |from, to| {
        from != "x/a" && to != "x/b" && ns_of(from) != "y"
    });
    w.check_in(Family::V6, TCP, 80, |from, to| {
        to != "x/b" && ns_of(from) != "y"
    });
}

#[test]
fn http_rules_are_allowed_at_l4_here() {
    let mut c = Cluster::e2e();
    c.mesh(
        "
metadata: {name: http, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints: [{}]
    toPorts:
    - ports: [{port: '80', protocol: TCP}]
      rules:
        http: [{method: GET, path: /api/.*}]
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| to != "x/a" || ns_of(from) == "x");
    w.check(TCP, 81, |_, to| to != "x/a");
}

#[test]
fn named_ports_in_mesh_policies() {
    let mut c = Cluster::e2e();
    c.mesh(
        "
metadata: {name: web-out, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: c}}
  egress:
  - toEndpoints: [{matchExpressions: [{key: io.kubernetes.pod.namespace, operator: Exists}]}]
    toPorts: [{ports: [{port: web}]}]
",
    )
    .mesh(
        "
metadata: {name: web-in, namespace: y}
spec:
  endpointSelector: {}
  ingress:
  - toPorts: [{ports: [{port: web, protocol: TCP}]}]
",
    );
    let w = c.compile();
    w.check(TCP, 8080, |from, to| {
        (from != "x/c" || pod_of(to) == "a") && (ns_of(to) != "y" || to == "y/a")
    });
    w.check(TCP, 8081, |from, to| {
        (from != "x/c" || pod_of(to) == "b") && (ns_of(to) != "y" || to == "y/b")
    });
}

#[test]
fn to_fqdns_opens_ports_for_learned_names() {
    let mut c = with_dns();
    c.mesh(
        "
metadata: {name: api, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toFQDNs:
    - matchName: api.example.test
    - matchPattern: '*.cdn.example.test'
    toPorts:
    - ports: [{port: '443', protocol: TCP}, {port: '80', protocol: TCP}]
  - toFQDNs: [{matchPattern: '**.any.example.test'}]
",
    );
    let w = c.compile();
    let tcp = |p| PortMatch::single(TCP, p);
    assert_eq!(
        w.fqdn_ports("x/a", "api.example.test"),
        vec![tcp(80), tcp(443)]
    );
    assert_eq!(
        w.fqdn_ports("x/a", "API.Example.Test."),
        vec![tcp(80), tcp(443)]
    );
    assert_eq!(
        w.fqdn_ports("x/a", "img.cdn.example.test"),
        vec![tcp(80), tcp(443)]
    );
    assert!(w.fqdn_ports("x/a", "cdn.example.test").is_empty());
    assert!(w.fqdn_ports("x/a", "a.b.cdn.example.test").is_empty());
    assert_eq!(
        w.fqdn_ports("x/a", "a.b.any.example.test"),
        vec![PortMatch::Any]
    );
    assert!(w.fqdn_ports("x/a", "any.example.test").is_empty());
    assert!(w.fqdn_ports("x/a", "other.test").is_empty());
    // Unselected pods open nothing (and are not isolated).
    assert!(w.fqdn_ports("x/b", "api.example.test").is_empty());
    // No static allow: only learned addresses are reachable.
    w.check(TCP, 443, |from, _| from != "x/a");
    // toFQDNs alone gives DNS redirection, with no query allowed yet.
    let dns = w.endpoint("x/a").dns.clone().expect("dns redirected");
    assert!(dns.allow.is_empty());
    assert!(w.endpoint("x/b").dns.is_none());
}

#[test]
fn dns_rules_restrict_queries_and_allow_the_port() {
    let mut c = with_dns();
    c.mesh(
        "
metadata: {name: dns, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toEndpoints:
    - matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}
    toPorts:
    - ports: [{port: '53', protocol: ANY}]
      rules:
        dns:
        - matchPattern: '*.example.test'
  - toFQDNs: [{matchName: api.example.test}]
    toPorts: [{ports: [{port: '80', protocol: TCP}]}]
",
    );
    let w = c.compile();
    let e = w.endpoint("x/a");
    let dns = e.dns.clone().expect("dns redirected");
    let server = ip("198.19.2.53");
    let allowed = |s, proto: meshward_policy::L4Protocol, port, name: &str| {
        matches!(
            dns.query_allowed(s, proto.number(), port, &fqdn(name)),
            DnsVerdict::Allowed(_)
        )
    };
    assert!(allowed(server, UDP, 53, "api.example.test"));
    assert!(allowed(server, TCP, 53, "a.example.test"));
    assert!(allowed(ip("2001:db8:2::53"), UDP, 53, "a.example.test"));
    assert!(!allowed(server, UDP, 53, "example.test"));
    assert!(!allowed(server, UDP, 53, "evil.test"));
    assert!(!allowed(server, UDP, 5353, "a.example.test"));
    assert!(!allowed(ip("198.18.100.53"), UDP, 53, "a.example.test"));
    // The port-53 traffic itself is allowed to the server, nothing else.
    assert!(w.verdict("x/a", "198.19.2.53", UDP, 53));
    assert!(w.verdict("x/a", "198.19.2.53", TCP, 53));
    assert!(!w.verdict("x/a", "198.19.2.53", TCP, 80));
    assert!(!w.verdict("x/a", "198.18.100.53", UDP, 53));
    assert_eq!(
        w.fqdn_ports("x/a", "api.example.test"),
        vec![PortMatch::single(TCP, 80)]
    );
}

#[test]
fn other_port_53_allows_become_unrestricted_dns() {
    let mut c = with_dns();
    c.mesh(
        "
metadata: {name: fqdn, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toEndpoints:
    - matchLabels: {io.kubernetes.pod.namespace: kube-system}
    toPorts:
    - ports: [{port: '53', protocol: UDP}]
      rules:
        dns: [{matchName: api.example.test}]
",
    )
    .k8s(
        "
metadata: {name: resolver, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 198.18.100.53/32}}]
    ports: [{port: 53, protocol: UDP}, {port: 80}]
  - to: [{ipBlock: {cidr: 198.18.100.80/32}}]
    ports: [{port: 80}]
",
    );
    let w = c.compile();
    let dns = w.endpoint("x/a").dns.clone().expect("dns");
    let v = |s: &str, port, name: &str| dns.query_allowed(ip(s), 17, port, &fqdn(name));
    // The resolver reachable on 53 without DNS rules: any name.
    match v("198.18.100.53", 53, "anything.test") {
        DnsVerdict::Allowed(p) => assert_eq!(p.name, "resolver"),
        other => panic!("{other:?}"),
    }
    // kube-dns: only the listed name.
    assert!(matches!(
        v("198.19.2.53", 53, "api.example.test"),
        DnsVerdict::Allowed(_)
    ));
    assert_eq!(v("198.19.2.53", 53, "other.test"), DnsVerdict::Denied);
    // Allows not admitting 53 are not DNS paths.
    assert_eq!(v("198.18.100.80", 53, "anything.test"), DnsVerdict::Denied);
    assert!(dns
        .allow
        .iter()
        .filter(|a| a.names.is_none())
        .all(|a| a.ports == vec![PortMatch::single(UDP, 53)]));
    // x/b has the NetworkPolicy only: no DNS redirection.
    assert!(w.endpoint("x/b").dns.is_none());
}

#[test]
fn dns_rule_without_peers_covers_every_server() {
    let mut c = with_dns();
    c.clusterwide(
        "
metadata: {name: dns-anywhere}
spec:
  endpointSelector: {matchLabels: {pod: b}}
  egress:
  - toPorts:
    - ports: [{port: '53'}]
      rules:
        dns: [{matchPattern: '*'}]
",
    );
    let w = c.compile();
    let dns = w.endpoint("z/b").dns.clone().expect("dns");
    for server in ["198.18.100.53", "2001:db8:100::53", "198.19.2.53"] {
        assert!(matches!(
            dns.query_allowed(ip(server), 6, 53, &fqdn("x.test")),
            DnsVerdict::Allowed(_)
        ));
    }
    w.check(UDP, 53, |_, _| true);
    w.check(UDP, 54, |from, _| pod_of(from) != "b");
}

#[test]
fn empty_dns_rules_are_plain_l4() {
    let mut c = with_dns();
    c.mesh(
        "
metadata: {name: empty-dns, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toPorts:
    - ports: [{port: '53', protocol: UDP}]
      rules: {dns: []}
",
    );
    let w = c.compile();
    assert!(w.endpoint("x/a").dns.is_none());
    assert!(w.verdict("x/a", "198.18.100.53", UDP, 53));
}

#[test]
fn kubernetes_and_mesh_policies_union() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: k8s-from-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
",
    )
    .mesh(
        "
metadata: {name: mesh-from-y, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - namespaceSelector: {matchLabels: {ns: y}}
    toPorts: [{ports: [{port: '81', protocol: TCP}]}]
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| to != "x/a" || from == "x/b");
    w.check(TCP, 81, |from, to| {
        to != "x/a" || from == "x/b" || ns_of(from) == "y"
    });
    let ing = w.endpoint("x/a").ingress.clone().expect("isolated");
    assert_eq!(ing.policies.len(), 2);
}

#[test]
fn mesh_rules_are_shared_across_pods() {
    let mut c = Cluster::e2e();
    c.clusterwide(
        "
metadata: {name: everyone}
spec:
  endpointSelector: {}
  egress:
  - toFQDNs: [{matchName: api.example.test}]
  ingress:
  - fromEndpoints: [{}]
",
    );
    let w = c.compile();
    let (a, b) = (w.endpoint("x/a"), w.endpoint("z/c"));
    let (ea, eb) = (a.egress.clone().expect("a"), b.egress.clone().expect("b"));
    assert!(Arc::ptr_eq(&ea, &eb));
    let (da, db) = (a.dns.clone().expect("a"), b.dns.clone().expect("b"));
    assert!(Arc::ptr_eq(&da, &db));
    assert!(Arc::ptr_eq(
        a.ingress.as_ref().expect("a"),
        b.ingress.as_ref().expect("b")
    ));
    w.check(TCP, 80, |from, to| from == EXT && to == EXT);
}
