//! The L7 view of the compiled rules (`toPorts[].rules.http`, `rules.tls`):
//! which (endpoint, direction, port) goes through the proxy, which rules
//! apply to which peer, and the union with L4-only rules, as truth tables on
//! the e2e cluster.

mod common;

use common::*;
use meshward_policy::{DirectionRules, Fqdn, FqdnSelector, L7Applies, PortMatch};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Egress,
    Ingress,
}

fn rules<'w>(w: &'w World, pod: &str, dir: Dir) -> Option<&'w DirectionRules> {
    let ep = w.endpoint(pod);
    match dir {
        Dir::Egress => ep.egress.as_deref(),
        Dir::Ingress => ep.ingress.as_deref(),
    }
}

/// What the proxy applies on `pod`'s side to `peer` on TCP `port`:
/// `-` (not redirected), `deny`, `all`, `http:<paths>` or `sni:<names>`.
fn applies(w: &World, pod: &str, dir: Dir, peer: &str, names: &[&str], port: u16) -> String {
    let Some(r) = rules(w, pod, dir) else {
        return "-".into();
    };
    if !r.l7_ports().contains(&port) {
        return "-".into();
    }
    let names: Vec<Fqdn> = names.iter().map(|n| fqdn(n)).collect();
    let peer = w.addr(peer, Family::V4);
    let matching = r.l7_matching(peer, &names, port);
    match r.l7_combine(&matching) {
        L7Applies::Nothing => "deny".into(),
        L7Applies::AllowAll(_) => "all".into(),
        L7Applies::Http(rules) => {
            let mut paths: Vec<String> = rules
                .iter()
                .map(|(r, _)| r.path.clone().unwrap_or_default())
                .collect();
            paths.sort();
            paths.dedup();
            format!("http:{}", paths.join(","))
        }
        L7Applies::Sni(sels) => {
            let mut names: Vec<String> = sels
                .iter()
                .map(|(s, _)| match s {
                    FqdnSelector::MatchName(n) => n.as_str().to_string(),
                    FqdnSelector::MatchPattern(p) => p.to_string(),
                })
                .collect();
            names.sort();
            format!("sni:{}", names.join(","))
        }
    }
}

const FRONTEND: &str = "
metadata: {name: frontend, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toCIDR: [198.18.100.0/24]
    toPorts:
    - ports: [{port: '80', protocol: TCP}]
      rules:
        http:
        - {method: GET, path: '/api/v1/products.*'}
        - method: POST
          path: /api/v1/orders
          headerMatches: [{name: Content-Type, value: application/json}]
        - {method: GET, path: /healthz}
  - toEndpoints: [{matchLabels: {pod: b}}]
    toPorts:
    - ports: [{port: '80'}, {port: '81'}]
";

#[test]
fn egress_http_rules_redirect_their_port_only() {
    let mut c = Cluster::e2e();
    c.mesh(FRONTEND);
    let w = c.compile();
    // x/a's egress: port 80 redirected, 81 not (no L7 rules there).
    let r = rules(&w, "x/a", Dir::Egress).expect("isolated");
    assert_eq!(r.l7_ports().into_iter().collect::<Vec<_>>(), vec![80]);
    assert_eq!(
        applies(&w, "x/a", Dir::Egress, EXT, &[], 80),
        "http:/api/v1/orders,/api/v1/products.*,/healthz"
    );
    // x/b is admitted on 80 by an L4-only rule: allow-all at L7 (union).
    assert_eq!(applies(&w, "x/a", Dir::Egress, "x/b", &[], 80), "all");
    assert_eq!(applies(&w, "x/a", Dir::Egress, "x/b", &[], 81), "-");
    // A peer no rule admits on 80 (the kernel drops it): deny.
    assert_eq!(applies(&w, "x/a", Dir::Egress, "x/c", &[], 80), "deny");
    // Not the ingress side, and not other pods.
    assert_eq!(applies(&w, "x/a", Dir::Ingress, "x/b", &[], 80), "-");
    assert_eq!(applies(&w, "x/b", Dir::Egress, EXT, &[], 80), "-");
    // L3/L4 stays in the allow list: the kernel still enforces it.
    assert!(w.verdict("x/a", EXT, TCP, 80));
    assert!(!w.verdict("x/a", EXT, TCP, 443));
    assert!(!w.verdict("x/a", "x/c", TCP, 80));
}

#[test]
fn rules_of_several_policies_are_unioned() {
    let mut c = Cluster::e2e();
    c.mesh(FRONTEND).mesh(
        "
metadata: {name: more, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toCIDR: [198.18.100.10/32]
    toPorts:
    - ports: [{port: '80'}]
      rules:
        http: [{path: /more}]
  - toCIDR: [198.18.100.99/32]
    toPorts:
    - ports: [{port: '80'}]
",
    );
    let w = c.compile();
    assert_eq!(
        applies(&w, "x/a", Dir::Egress, EXT, &[], 80),
        "http:/api/v1/orders,/api/v1/products.*,/healthz,/more"
    );
    // .99 is in FRONTEND's /24 (HTTP rules) and in an L4-only rule: all.
    assert_eq!(
        applies(&w, "x/a", Dir::Egress, "198.18.100.99", &[], 80),
        "all"
    );
    assert_eq!(
        applies(&w, "x/a", Dir::Egress, "198.18.100.11", &[], 80),
        "http:/api/v1/orders,/api/v1/products.*,/healthz"
    );
    // The policy ref travels with each rule.
    let r = rules(&w, "x/a", Dir::Egress).expect("isolated");
    let m = r.l7_matching(w.addr(EXT, Family::V4), &[], 80);
    let L7Applies::Http(list) = r.l7_combine(&m) else {
        panic!("http")
    };
    let policies: std::collections::BTreeSet<String> =
        list.iter().map(|(_, p)| p.to_string()).collect();
    assert_eq!(
        policies.into_iter().collect::<Vec<_>>(),
        vec![
            "MeshNetworkPolicy x/frontend".to_string(),
            "MeshNetworkPolicy x/more".to_string()
        ]
    );
}

#[test]
fn ingress_http_rules_and_named_ports() {
    let mut c = Cluster::e2e();
    c.mesh(
        "
metadata: {name: api, namespace: y}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: x}}]
    toPorts:
    - ports: [{port: web, protocol: TCP}]
      rules:
        http: [{method: GET, path: /public}]
  - fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: z, pod: a}}]
    toPorts:
    - ports: [{port: '8080'}]
",
    );
    let w = c.compile();
    // `web` is 8080 on pods a, 8081 on pods b, absent on pods c.
    let table = [
        ("y/a", "x/b", 8080, "http:/public"),
        ("y/a", "z/a", 8080, "all"),
        ("y/a", "z/b", 8080, "deny"),
        ("y/a", "x/b", 8081, "-"),
        ("y/b", "x/a", 8081, "http:/public"),
        ("y/b", "x/a", 8080, "-"),
        // z/a is admitted on 8080 only; 8081 is y/b's L7 port: deny.
        ("y/b", "z/a", 8081, "deny"),
        ("y/c", "x/a", 8080, "-"),
        ("y/c", "x/a", 8081, "-"),
    ];
    for (pod, peer, port, want) in table {
        assert_eq!(
            applies(&w, pod, Dir::Ingress, peer, &[], port),
            want,
            "{peer} -> {pod}:{port}"
        );
    }
    // Egress of the clients is not redirected.
    assert_eq!(applies(&w, "x/b", Dir::Egress, "y/a", &[], 8080), "-");
}

#[test]
fn egress_named_port_resolves_on_the_destination() {
    let mut c = Cluster::e2e();
    c.mesh(
        "
metadata: {name: to-web, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: c}}
  egress:
  - toEndpoints: [{}]
    toPorts:
    - ports: [{port: web}]
      rules:
        http: [{path: /w}]
",
    );
    let w = c.compile();
    let r = rules(&w, "x/c", Dir::Egress).expect("isolated");
    assert_eq!(
        r.l7_ports().into_iter().collect::<Vec<_>>(),
        vec![8080, 8081]
    );
    assert_eq!(applies(&w, "x/c", Dir::Egress, "x/a", &[], 8080), "http:/w");
    assert_eq!(applies(&w, "x/c", Dir::Egress, "x/b", &[], 8081), "http:/w");
    // x/b does not serve `web` on 8080.
    assert_eq!(applies(&w, "x/c", Dir::Egress, "x/b", &[], 8080), "deny");
}

#[test]
fn fqdn_peers_http_and_sni() {
    let mut c = Cluster::e2e();
    c.mesh(
        "
metadata: {name: web, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toFQDNs: [{matchName: api.example.test}]
    toPorts:
    - ports: [{port: '80'}]
      rules:
        http: [{path: /v1/.*}]
    - ports: [{port: '443'}]
      rules: {tls: sni}
  - toFQDNs: [{matchPattern: '*.cdn.test'}]
    toPorts:
    - ports: [{port: '443'}, {port: '80'}]
  - toPorts:
    - ports: [{port: '53', protocol: ANY}]
      rules:
        dns: [{matchPattern: '*'}]
",
    );
    let w = c.compile();
    let r = rules(&w, "x/a", Dir::Egress).expect("isolated");
    assert_eq!(r.l7_ports().into_iter().collect::<Vec<_>>(), vec![80, 443]);
    let peer = "198.18.100.20";
    let table: [(&[&str], u16, &str); 7] = [
        (&["api.example.test"], 80, "http:/v1/.*"),
        (&["api.example.test"], 443, "sni:api.example.test."),
        (&["edge.cdn.test"], 80, "all"),
        (&["edge.cdn.test"], 443, "all"),
        // Both names on one address: the L4-only rule wins (union).
        (&["api.example.test", "edge.cdn.test"], 80, "all"),
        (&["other.test"], 80, "deny"),
        (&[], 443, "deny"),
    ];
    for (names, port, want) in table {
        assert_eq!(
            applies(&w, "x/a", Dir::Egress, peer, names, port),
            want,
            "{names:?}:{port}"
        );
    }
    // The L4 part stays: toFQDNs ports as before.
    let ports = w.fqdn_ports("x/a", "api.example.test");
    for port in [80, 443] {
        assert!(ports.contains(&PortMatch::single(TCP, port)), "{ports:?}");
    }
    // DNS on 53 is not an L7 (HTTP) port.
    assert!(!r.l7_ports().contains(&53));
}

#[test]
fn kubernetes_policies_and_plain_mesh_policies_have_no_l7() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: deny, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  egress:
  - ports: [{port: 80}]
",
    )
    .mesh(
        "
metadata: {name: l4, namespace: y}
spec:
  endpointSelector: {}
  ingress:
  - toPorts:
    - ports: [{port: '80'}]
",
    );
    let w = c.compile();
    for pod in PODS {
        let ep = w.endpoint(pod);
        for d in [&ep.egress, &ep.ingress].into_iter().flatten() {
            assert!(d.l7.is_empty(), "{pod}");
        }
    }
}

#[test]
fn tls_rule_errors_name_the_field() {
    let mut c = Cluster::e2e();
    c.mesh(
        "
metadata: {name: bad-tls, namespace: x}
spec:
  endpointSelector: {}
  egress:
  - toCIDR: [198.18.100.0/24]
    toPorts:
    - ports: [{port: '443'}]
      rules: {tls: sni}
",
    );
    let w = c.compile_with_errors();
    let e: Vec<String> = w.errors().iter().map(|e| e.to_string()).collect();
    assert_eq!(
        e,
        vec!["MeshNetworkPolicy x/bad-tls: spec.egress[0].toPorts[0].rules.tls: TLS rules need toFQDNs in the same rule (the allowed server names)".to_string()]
    );
    // Skipped whole: x is not isolated by it.
    assert!(w.endpoint("x/a").egress.is_none());
}

#[test]
fn the_example_policy_compiles_with_http_rules_on_port_80() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/policies/l7-http.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("metadata:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut c = Cluster::e2e();
    c.view.namespaces.push(meshward_policy::NamespaceInfo {
        name: "default".into(),
        labels: labels(&[]),
    });
    c.add_pod(
        "default",
        "fe",
        "n1",
        &["198.19.1.99"],
        &[("app", "frontend")],
    );
    c.mesh(&body);
    let w = c.compile();
    assert_eq!(
        applies(&w, "default/fe", Dir::Egress, "198.18.100.10", &[], 80),
        "http:/api/v1/orders,/api/v1/products.*,/healthz"
    );
    assert_eq!(
        applies(&w, "default/fe", Dir::Egress, "198.18.100.10", &[], 8080),
        "-"
    );
    assert!(w.verdict("default/fe", "198.18.100.10", TCP, 8080));
    assert!(!w.verdict("default/fe", "198.18.100.11", TCP, 80));
}
