//! Kubernetes NetworkPolicy truth tables, reconstructed from the published
//! semantics and the cases of the upstream e2e suite
//! (test/e2e/network/netpol): three namespaces x, y, z with pods a, b, c,
//! served on 80/81 over TCP, UDP and SCTP, plus an external address.

mod common;

use std::sync::Arc;

use common::*;

fn any_proto_port() -> [(meshward_policy::L4Protocol, u16); 4] {
    [(TCP, 80), (TCP, 81), (UDP, 80), (SCTP, 81)]
}

#[test]
fn no_policy_allows_everything() {
    let w = Cluster::e2e().compile();
    for (proto, port) in any_proto_port() {
        w.check(proto, port, |_, _| true);
    }
    for id in PODS {
        let e = w.endpoint(id);
        assert!(e.ingress.is_none() && e.egress.is_none() && e.dns.is_none());
    }
}

#[test]
fn only_pods_with_ips_off_the_host_network_are_endpoints() {
    let w = Cluster::e2e().compile();
    let n1: Vec<String> = w.nodes["n1"]
        .rules
        .endpoints
        .keys()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(n1, ["x/a", "x/c", "y/b", "z/a", "z/c"]);
    let n2: Vec<String> = w.nodes["n2"]
        .rules
        .endpoints
        .keys()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(n2, ["x/b", "y/a", "y/c", "z/b"]);
    let e = w.endpoint("y/b");
    assert_eq!(e.ips, w.cluster.pod("y/b").ips);
    assert_eq!(
        w.nodes["n1"]
            .rules
            .endpoint_by_ip(w.addr("y/b", Family::V6))
            .map(|e| e.pod.to_string()),
        Some("y/b".to_string())
    );
}

#[test]
fn default_deny_ingress() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: deny-ingress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
",
    );
    let w = c.compile();
    for (proto, port) in any_proto_port() {
        w.check(proto, port, |_, to| ns_of(to) != "x");
    }
    assert!(w.endpoint("x/a").egress.is_none());
    let ing = w.endpoint("x/a").ingress.clone().expect("isolated");
    assert!(ing.allow.is_empty());
    assert_eq!(ing.policies.len(), 1);
    assert_eq!(ing.policies[0].to_string(), "NetworkPolicy x/deny-ingress");
}

#[test]
fn default_deny_all() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: deny-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
",
    );
    let w = c.compile();
    for (proto, port) in any_proto_port() {
        w.check(proto, port, |from, to| {
            ns_of(from) != "x" && ns_of(to) != "x"
        });
    }
}

#[test]
fn allow_from_same_namespace_by_pod_selector() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: same-ns, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - podSelector: {}
",
    );
    let w = c.compile();
    for (proto, port) in any_proto_port() {
        w.check(proto, port, |from, to| to != "x/a" || ns_of(from) == "x");
    }
    // The host-network pod and the pod without IPs are never peers.
    let ing = w.endpoint("x/a").ingress.clone().expect("isolated");
    assert!(ing.allows(ip("198.18.0.1"), 6, 80).is_none());
}

#[test]
fn allow_from_all_namespaces() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: all-ns, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {}
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| to != "x/a" || from != EXT);
    w.check_in(Family::V6, UDP, 81, |from, to| to != "x/a" || from != EXT);
}

#[test]
fn allow_from_other_namespace_by_namespace_selector() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: from-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| to != "x/a" || ns_of(from) == "y");
}

#[test]
fn namespace_selector_on_the_implicit_name_label() {
    let mut c = Cluster::e2e();
    // Remove the custom labels: only the implicit one is left.
    for ns in ["x", "y", "z"] {
        c.ns_mut(ns).labels.clear();
    }
    c.k8s(
        "
metadata: {name: from-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
",
    )
    .k8s(
        "
metadata: {name: from-not-xy, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions:
        - {key: kubernetes.io/metadata.name, operator: NotIn, values: [x, y]}
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| match to {
        "x/a" => ns_of(from) == "y",
        "x/b" => ns_of(from) == "z",
        _ => true,
    });
}

#[test]
fn pod_selector_with_match_expressions() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: expr, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - podSelector:
        matchExpressions:
        - {key: pod, operator: In, values: [b]}
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| to != "x/a" || from == "x/b");
}

#[test]
fn namespace_selector_with_match_expressions() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: expr, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions:
        - {key: ns, operator: NotIn, values: [x]}
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| {
        to != "x/a" || (from != EXT && ns_of(from) != "x")
    });
}

#[test]
fn exists_and_does_not_exist() {
    let mut c = Cluster::e2e();
    c.pod_mut("y/b").labels.insert("tier".into(), "db".into());
    c.pod_mut("z/c").labels.insert("tier".into(), "web".into());
    c.k8s(
        "
metadata: {name: tiered, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {}
      podSelector:
        matchExpressions:
        - {key: tier, operator: Exists}
",
    )
    .k8s(
        "
metadata: {name: untiered, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress:
  - from:
    - namespaceSelector: {}
      podSelector:
        matchExpressions:
        - {key: tier, operator: DoesNotExist}
        - {key: pod, operator: NotIn, values: [c]}
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| match to {
        "x/a" => from == "y/b" || from == "z/c",
        "x/b" => from != EXT && from != "y/b" && pod_of(from) != "c",
        _ => true,
    });
}

#[test]
fn pod_selector_or_namespace_selector() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: or, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
    - podSelector: {matchLabels: {pod: b}}
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| {
        to != "x/a" || ns_of(from) == "y" || from == "x/b"
    });
}

#[test]
fn pod_selector_and_namespace_selector() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: and, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
      podSelector: {matchLabels: {pod: b}}
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| to != "x/a" || from == "y/b");
}

#[test]
fn multiple_pod_and_namespace_selectors() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: multi, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions: [{key: ns, operator: In, values: [y, z]}]
      podSelector:
        matchExpressions: [{key: pod, operator: In, values: [a, b]}]
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| {
        to != "x/a" || (ns_of(from) != "x" && from != EXT && pod_of(from) != "c")
    });
}

#[test]
fn ports_limit_what_a_rule_admits() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: port-80, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
    ports:
    - port: 80
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| to != "x/a" || from == "x/b");
    w.check(TCP, 81, |_, to| to != "x/a");
    // Protocol defaults to TCP.
    w.check(UDP, 80, |_, to| to != "x/a");
}

#[test]
fn stacked_policies_union() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: a-80-from-x, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {}}]
    ports: [{port: 80}]
",
    )
    .k8s(
        "
metadata: {name: a-81-from-y, namespace: x}
spec:
  podSelector:
    matchExpressions: [{key: pod, operator: In, values: [a, b]}]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: 81}]
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| match to {
        "x/a" => ns_of(from) == "x",
        "x/b" => false,
        _ => true,
    });
    w.check(TCP, 81, |from, to| match to {
        "x/a" | "x/b" => ns_of(from) == "y",
        _ => true,
    });
    let ing = w.endpoint("x/a").ingress.clone().expect("isolated");
    assert_eq!(ing.policies.len(), 2);
    assert_eq!(
        w.endpoint("x/a")
            .ingress
            .as_ref()
            .and_then(|i| i.allows(w.addr("y/c", Family::V4), 6, 81))
            .map(|p| p.name.as_str()),
        Some("a-81-from-y")
    );
}

#[test]
fn allow_all_ingress_wins_over_deny_all() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: deny, namespace: x}
spec:
  podSelector: {}
",
    )
    .k8s(
        "
metadata: {name: allow-all, namespace: x}
spec:
  podSelector: {}
  ingress:
  - {}
",
    );
    let w = c.compile();
    for (proto, port) in any_proto_port() {
        w.check(proto, port, |_, _| true);
    }
    // Isolated nonetheless, by both policies.
    assert_eq!(
        w.endpoint("x/b").ingress.as_ref().map(|i| i.policies.len()),
        Some(2)
    );
}

#[test]
fn allow_all_egress_wins_over_deny_all_egress() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: deny, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
",
    )
    .k8s(
        "
metadata: {name: allow-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - {}
",
    );
    let w = c.compile();
    for (proto, port) in any_proto_port() {
        w.check(proto, port, |_, _| true);
    }
    w.check_in(Family::V6, TCP, 80, |_, _| true);
}

#[test]
fn named_port_on_ingress() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: named, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports:
    - port: serve-80-tcp
",
    );
    let w = c.compile();
    w.check(TCP, 80, |_, _| true);
    w.check(TCP, 81, |_, to| to != "x/a");
    w.check(UDP, 80, |_, to| to != "x/a");
}

#[test]
fn named_port_from_namespace() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: named, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports:
    - {port: serve-81-udp, protocol: UDP}
",
    );
    let w = c.compile();
    w.check(UDP, 81, |from, to| to != "x/a" || ns_of(from) == "y");
    w.check(UDP, 80, |_, to| to != "x/a");
    w.check(TCP, 81, |_, to| to != "x/a");
}

#[test]
fn named_port_is_resolved_on_each_selected_pod() {
    // `web` is 8080 on pods a, 8081 on pods b, absent on pods c.
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: web, namespace: x}
spec:
  podSelector: {}
  ingress:
  - ports: [{port: web}]
",
    );
    let w = c.compile();
    w.check(TCP, 8080, |_, to| ns_of(to) != "x" || to == "x/a");
    w.check(TCP, 8081, |_, to| ns_of(to) != "x" || to == "x/b");
    // x/a and x/c are on n1, selected by the same policy, but resolve `web`
    // differently: they do not share rules.
    let (a, cc) = (w.endpoint("x/a"), w.endpoint("x/c"));
    let (a, cc) = (
        a.ingress.clone().expect("a"),
        cc.ingress.clone().expect("c"),
    );
    assert!(!Arc::ptr_eq(&a, &cc));
    assert!(cc.allow.is_empty(), "{cc:?}");
    // A named port matches a container port of the same protocol only.
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: web-udp, namespace: x}
spec:
  podSelector: {}
  ingress:
  - ports: [{port: web, protocol: UDP}]
",
    );
    let w = c.compile();
    w.check(TCP, 8080, |_, to| ns_of(to) != "x");
    w.check(UDP, 8080, |_, to| ns_of(to) != "x");
}

#[test]
fn named_port_on_egress_is_resolved_on_each_destination() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: egress-web, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - ports: [{port: web}]
",
    )
    .k8s(
        "
metadata: {name: egress-serve-81, namespace: y}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {}}]
    ports: [{port: serve-81-udp, protocol: UDP}]
",
    );
    let w = c.compile();
    w.check(TCP, 8080, |from, to| match from {
        "x/a" => pod_of(to) == "a",
        "y/a" => false,
        _ => true,
    });
    w.check(TCP, 8081, |from, to| match from {
        "x/a" => pod_of(to) == "b",
        "y/a" => false,
        _ => true,
    });
    w.check(UDP, 81, |from, to| match from {
        "x/a" => false,
        "y/a" => ns_of(to) == "y",
        _ => true,
    });
    // Per destination pod: only host prefixes of pods defining the name.
    let eg = w.endpoint("x/a").egress.clone().expect("isolated");
    for a in &eg.allow {
        assert!(
            a.nets.iter().all(|n| n.prefix_len() == n.max_prefix_len()),
            "{a:?}"
        );
    }
    assert!(eg.allows(w.addr("y/b", Family::V6), 6, 8081).is_some());
}

#[test]
fn named_port_with_ip_block_peer_matches_nothing_on_egress() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: block-named, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 0.0.0.0/0}}]
    ports: [{port: serve-80-tcp}, {port: 81}]
",
    );
    let w = c.compile();
    // Decision: only pods have named ports; an ipBlock peer never resolves
    // one, even where the block covers pods.
    w.check(TCP, 80, |from, _| from != "x/a");
    w.check(TCP, 81, |_, _| true);
}

#[test]
fn end_port_ranges() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: range-in, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports: [{port: 80, endPort: 81}]
",
    )
    .k8s(
        "
metadata: {name: range-out, namespace: y}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - ports: [{port: 81, endPort: 90, protocol: UDP}]
",
    );
    let w = c.compile();
    for port in [80, 81] {
        w.check(TCP, port, |from, _| from != "y/a");
    }
    w.check(TCP, 82, |from, to| to != "x/a" && from != "y/a");
    w.check(TCP, 79, |from, to| to != "x/a" && from != "y/a");
    w.check(UDP, 80, |from, to| to != "x/a" && from != "y/a");
    for port in [81, 85, 90] {
        w.check(UDP, port, |_, to| to != "x/a");
    }
    w.check(UDP, 91, |from, to| to != "x/a" && from != "y/a");
}

#[test]
fn egress_deny_all() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: deny-egress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
",
    );
    let w = c.compile();
    for (proto, port) in any_proto_port() {
        w.check(proto, port, |from, _| ns_of(from) != "x");
    }
    assert!(w.endpoint("x/a").ingress.is_none());
}

#[test]
fn deny_egress_by_pod_selector() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: deny-egress-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, _| from != "x/a");
}

#[test]
fn egress_to_dns_only() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: dns-only, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
",
    );
    let w = c.compile();
    w.check(UDP, 53, |_, _| true);
    w.check(TCP, 53, |_, _| true);
    w.check(UDP, 80, |from, _| ns_of(from) != "x");
    w.check(SCTP, 53, |from, _| ns_of(from) != "x");
    // A NetworkPolicy never sends DNS through the proxy.
    assert!(w.endpoint("x/a").dns.is_none());
}

#[test]
fn sctp_never_admits_tcp() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: sctp, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports: [{port: 80, protocol: SCTP}]
",
    )
    .k8s(
        "
metadata: {name: udp, namespace: y}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports: [{port: 81, protocol: UDP}]
",
    );
    let w = c.compile();
    w.check(SCTP, 80, |_, to| to != "y/a");
    w.check(TCP, 80, |_, to| to != "x/a" && to != "y/a");
    w.check(UDP, 81, |_, to| to != "x/a");
    w.check(TCP, 81, |_, to| to != "x/a" && to != "y/a");
}

#[test]
fn any_port_on_one_protocol() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: udp-any, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports: [{protocol: UDP}]
",
    );
    let w = c.compile();
    for port in [1, 80, 65535] {
        w.check(UDP, port, |_, _| true);
        w.check(TCP, port, |_, to| to != "x/a");
    }
}

#[test]
fn policy_types_defaulting() {
    // Egress rules, no policyTypes: Ingress and Egress.
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: both, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  egress:
  - to: [{podSelector: {}}]
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| {
        to != "x/a" && (from != "x/a" || ns_of(to) == "x")
    });

    // policyTypes [Egress] with ingress rules: the ingress rules are
    // ignored and ingress is not isolated.
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: egress-only, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
  egress:
  - to: [{namespaceSelector: {matchLabels: {ns: y}}}]
",
    );
    let w = c.compile();
    assert!(w.endpoint("x/a").ingress.is_none());
    w.check(TCP, 80, |from, to| from != "x/a" || ns_of(to) == "y");

    // Ingress rules only, no policyTypes: egress not isolated. An empty
    // egress list does not make it Egress either.
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: ingress-only, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
  egress: []
",
    );
    let w = c.compile();
    assert!(w.endpoint("x/a").egress.is_none());
    w.check(TCP, 80, |from, to| to != "x/a" || from == "x/b");

    // An empty policyTypes list is defaulted too.
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: empty-types, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: []
",
    );
    let w = c.compile();
    assert!(w.endpoint("x/a").ingress.is_some());
    assert!(w.endpoint("x/a").egress.is_none());
}

#[test]
fn ingress_and_egress_independently() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: in, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
",
    )
    .k8s(
        "
metadata: {name: out, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {pod: c}}}]
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| {
        (to != "x/a" || from == "x/b") && (from != "x/a" || to == "x/c")
    });
}

#[test]
fn client_side_egress_deny_beats_server_allow() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: deny-out, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
",
    )
    .k8s(
        "
metadata: {name: allow-in, namespace: y}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: a}}}]
",
    );
    let w = c.compile();
    assert!(!w.verdict("x/a", "y/b", TCP, 80));
    w.check(TCP, 80, |from, to| {
        // y/b admits x/a only, which may send nothing.
        from != "x/a" && to != "y/b"
    });
}

#[test]
fn egress_to_pod_in_other_namespace() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: to-y-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector: {matchLabels: {ns: y}}
      podSelector: {matchLabels: {pod: b}}
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| from != "x/a" || to == "y/b");
    w.check_in(Family::V6, TCP, 80, |from, to| from != "x/a" || to == "y/b");
}

#[test]
fn ip_block_egress() {
    // y/b is 198.19.1.21 (n1).
    let mut c = Cluster::e2e();
    assert_eq!(w_addr(&c, "y/b"), "198.19.1.21");
    c.k8s(
        "
metadata: {name: to-block, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 198.19.1.21/32}}]
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| from != "x/a" || to == "y/b");
}

fn w_addr(c: &Cluster, id: &str) -> String {
    c.pod(id).ips[0].to_string()
}

#[test]
fn ip_block_except() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: except, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 198.18.0.0/15, except: [198.19.1.21/32, 198.18.100.0/24]}
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| {
        from != "x/a" || (to != "y/b" && to != EXT)
    });
    // The except covers the whole /24, not only ext.
    assert!(!w.verdict("x/a", "198.18.100.200", TCP, 80));
    assert!(w.verdict("x/a", "198.18.101.1", TCP, 80));
    assert!(!w.verdict("x/a", "198.20.0.1", TCP, 80));
}

#[test]
fn ip_block_union_across_peers_readmits_an_except() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: overlap, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 198.19.0.0/16, except: [198.19.1.0/24]}
    - ipBlock: {cidr: 198.19.1.21/32}
",
    );
    let w = c.compile();
    // n1's pods are 198.19.1.x, n2's 198.19.2.x.
    w.check(TCP, 80, |from, to| {
        from != "x/a" || to == "y/b" || (to != EXT && w_addr(&c, to).starts_with("198.19.2."))
    });
}

#[test]
fn ip_block_ingress_v6() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: v6, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - ipBlock: {cidr: '2001:db8::/32', except: ['2001:db8:2::/48']}
",
    );
    let w = c.compile();
    // v6: everything but n2's pods; v4: nothing.
    w.check_in(Family::V6, TCP, 80, |from, to| {
        to != "x/a" || from == EXT || w.cluster.pod(from).node == "n1"
    });
    w.check(TCP, 80, |_, to| to != "x/a");
}

#[test]
fn label_changes_are_re_evaluated() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: from-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
",
    )
    .k8s(
        "
metadata: {name: from-team, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: blue}}}]
",
    )
    .k8s(
        "
metadata: {name: isolate-target, namespace: y}
spec:
  podSelector: {matchLabels: {target: 'yes'}}
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| to != "x/a" || from == "x/b");

    // Updated pod: x/c becomes pod=b and is admitted.
    c.pod_mut("x/c").labels.insert("pod".into(), "b".into());
    // Updated namespace: z joins team blue.
    c.ns_mut("z").labels.insert("team".into(), "blue".into());
    // Updated target: y/a becomes selected and isolated.
    c.pod_mut("y/a")
        .labels
        .insert("target".into(), "yes".into());
    let w = c.compile();
    w.check(TCP, 80, |from, to| match to {
        "x/a" => from == "x/b" || from == "x/c" || ns_of(from) == "z",
        "y/a" => false,
        _ => true,
    });

    // And back.
    c.pod_mut("x/c").labels.insert("pod".into(), "c".into());
    c.ns_mut("z").labels.remove("team");
    c.pod_mut("y/a").labels.remove("target");
    let w = c.compile();
    w.check(TCP, 80, |from, to| to != "x/a" || from == "x/b");
}

#[test]
fn deleting_policies_stops_enforcement() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: deny, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| ns_of(from) != "x" && ns_of(to) != "x");
    c.view.policies.clear();
    let w = c.compile();
    w.check(TCP, 80, |_, _| true);
}

#[test]
fn pods_selected_by_the_same_policies_share_rules() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress: [{from: [{podSelector: {}}]}]
  egress: [{to: [{podSelector: {}}], ports: [{port: serve-80-tcp}]}]
",
    )
    .k8s(
        "
metadata: {name: only-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{}]
",
    );
    let w = c.compile();
    let (a, cc) = (w.endpoint("x/a"), w.endpoint("x/c"));
    let eg = |e: &meshward_policy::EndpointRules| e.egress.clone().expect("egress");
    let ing = |e: &meshward_policy::EndpointRules| e.ingress.clone().expect("ingress");
    assert!(Arc::ptr_eq(&eg(a), &eg(cc)), "egress shared");
    assert!(
        !Arc::ptr_eq(&ing(a), &ing(cc)),
        "different ingress policies"
    );
    // Named ports on egress resolve on destinations: still shared.
    assert!(eg(a).allows(w.addr("x/b", Family::V4), 6, 80).is_some());
    assert!(eg(a).allows(w.addr("x/b", Family::V4), 6, 81).is_none());
}

#[test]
fn pods_without_a_namespace_object_still_match() {
    let mut c = Cluster::e2e();
    c.add_pod("w", "lone", "n1", &["198.19.1.99"], &[("pod", "a")]);
    c.k8s(
        "
metadata: {name: from-w, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: w}}}]
",
    )
    .k8s(
        "
metadata: {name: isolate, namespace: w}
spec:
  podSelector: {}
",
    );
    let w = c.compile();
    assert!(w.verdict("w/lone", "x/a", TCP, 80));
    assert!(!w.verdict("y/a", "x/a", TCP, 80));
    assert!(w.endpoint("w/lone").ingress.is_some());
}

#[test]
#[should_panic(expected = "verdicts differ from the expected truth table")]
fn a_wrong_truth_table_fails() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: deny, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
",
    );
    // Claims x/a is still reachable: must fail.
    c.compile().check(TCP, 80, |_, _| true);
}

#[test]
fn any_of_several_pod_selectors() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: b-or-c, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
    - podSelector: {matchLabels: {pod: c}}
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| {
        to != "x/a" || from == "x/b" || from == "x/c"
    });
}

#[test]
fn updated_policy_is_enforced() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {}}]}]
",
    );
    let w = c.compile();
    w.check(TCP, 80, |from, to| to != "x/a" || from != EXT);
    // The same policy, updated: only x/b on 81.
    c.view.policies.clear();
    c.k8s(
        "
metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: 81}]}]
",
    );
    let w = c.compile();
    w.check(TCP, 80, |_, to| to != "x/a");
    w.check(TCP, 81, |from, to| to != "x/a" || from == "x/b");
}
