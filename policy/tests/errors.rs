//! Bad policies: every problem is reported with the policy and the field,
//! the bad policy is skipped as a whole, everything else still compiles,
//! and no input panics.

mod common;

use std::sync::Arc;

use common::*;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use meshward_policy::{compile, PolicyKind, PolicyObject, PolicyRef};

/// A valid policy isolating x/a, allowing only x/b in.
const GOOD: &str = "
metadata: {name: good, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
";

/// Compiles GOOD plus one bad policy built from `spec` (under `spec:`,
/// indented by two) and checks the error, that the bad policy is skipped
/// and that GOOD still applies.
fn k8s_error(spec: &str, field: &str, message: &str) {
    let mut c = Cluster::e2e();
    c.k8s(GOOD);
    // Each bad policy would also admit everything into y/a if applied.
    c.k8s(&format!(
        "metadata: {{name: bad, namespace: y}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n{spec}"
    ));
    expect_error(&c, "NetworkPolicy y/bad", field, message);
}

fn expect_error(c: &Cluster, policy: &str, field: &str, message: &str) {
    let w = c.compile_with_errors();
    for (node, compiled) in &w.nodes {
        let errs = &compiled.errors;
        assert!(
            errs.iter().any(|e| e.policy.to_string() == policy
                && e.field == field
                && e.message.contains(message)),
            "{node}: wanted {policy}: {field}: ...{message}...\ngot {errs:#?}"
        );
        assert!(
            errs.iter().all(|e| e.policy.to_string() == policy),
            "only the bad policy is reported: {errs:#?}"
        );
    }
    // The bad policy is skipped: y/a stays unisolated; GOOD applies.
    assert!(w.endpoint("y/a").ingress.is_none(), "bad policy applied");
    assert!(w.endpoint("y/a").egress.is_none(), "bad policy applied");
    w.check(TCP, 80, |from, to| to != "x/a" || from == "x/b");
}

#[test]
fn invalid_cidrs() {
    k8s_error(
        "  ingress:\n  - from:\n    - podSelector: {}\n    - ipBlock: {cidr: 10.0.0.0/33}\n",
        "spec.ingress[0].from[1].ipBlock.cidr",
        "not a CIDR",
    );
    k8s_error(
        "  ingress:\n  - from:\n    - ipBlock: {cidr: 10.1.2.3}\n",
        "spec.ingress[0].from[0].ipBlock.cidr",
        "not a CIDR",
    );
    k8s_error(
        "  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}\n",
        "spec.egress[0].to[0].ipBlock.except[0]",
        "strict subset",
    );
    k8s_error(
        "  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 11.0.0.0/16]}\n",
        "spec.ingress[0].from[0].ipBlock.except[1]",
        "strict subset",
    );
    k8s_error(
        "  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/8, except: ['::/64']}\n",
        "spec.ingress[0].from[0].ipBlock.except[0]",
        "strict subset",
    );
    k8s_error(
        "  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [nope]}\n",
        "spec.ingress[0].from[0].ipBlock.except[0]",
        "not a CIDR",
    );
}

#[test]
fn bad_selectors() {
    k8s_error(
        "  ingress:\n  - from:\n    - podSelector:\n        matchExpressions: [{key: pod, operator: Has}]\n",
        "spec.ingress[0].from[0].podSelector.matchExpressions[0].operator",
        "unknown operator",
    );
    k8s_error(
        "  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions: [{key: ns, operator: In}]\n",
        "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values",
        "needs values",
    );
    k8s_error(
        "  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions: [{key: ns, operator: Exists, values: [x]}]\n",
        "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values",
        "takes no values",
    );
    k8s_error(
        "  ingress:\n  - from:\n    - podSelector: {matchLabels: {'k8s:pod': b}}\n",
        "spec.ingress[0].from[0].podSelector.matchLabels",
        "':' is not allowed",
    );
    k8s_error(
        "  ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: 'not ok'}}\n",
        "spec.ingress[0].from[0].podSelector.matchLabels",
        "value",
    );
    // The subject selector too.
    let mut c = Cluster::e2e();
    c.k8s(GOOD).k8s(
        "
metadata: {name: bad, namespace: y}
spec:
  podSelector:
    matchExpressions: [{key: pod, operator: in, values: [a]}]
",
    );
    expect_error(
        &c,
        "NetworkPolicy y/bad",
        "spec.podSelector.matchExpressions[0].operator",
        "unknown operator",
    );
}

#[test]
fn bad_ports() {
    k8s_error(
        "  ingress:\n  - ports: [{port: 0}]\n",
        "spec.ingress[0].ports[0].port",
        "not a port",
    );
    k8s_error(
        "  ingress:\n  - ports: [{port: 80}, {port: 65536}]\n",
        "spec.ingress[0].ports[1].port",
        "not a port",
    );
    k8s_error(
        "  ingress:\n  - ports: [{port: Web_1}]\n",
        "spec.ingress[0].ports[0].port",
        "not a valid named port",
    );
    k8s_error(
        "  ingress:\n  - ports: [{port: '80'}]\n",
        "spec.ingress[0].ports[0].port",
        "not a valid named port",
    );
    k8s_error(
        "  ingress:\n  - ports: [{port: 80, protocol: ICMP}]\n",
        "spec.ingress[0].ports[0].protocol",
        "unknown protocol",
    );
    k8s_error(
        "  ingress:\n  - ports: [{port: 80, protocol: tcp}]\n",
        "spec.ingress[0].ports[0].protocol",
        "unknown protocol",
    );
}

#[test]
fn end_port_misuse() {
    k8s_error(
        "  ingress:\n  - ports: [{port: 8080, endPort: 80}]\n",
        "spec.ingress[0].ports[0].endPort",
        "less than port 8080",
    );
    k8s_error(
        "  ingress:\n  - ports: [{port: web, endPort: 9000}]\n",
        "spec.ingress[0].ports[0].endPort",
        "numeric port",
    );
    k8s_error(
        "  policyTypes: [Egress]\n  egress:\n  - ports: [{endPort: 9000}]\n",
        "spec.egress[0].ports[0].endPort",
        "numeric port",
    );
    k8s_error(
        "  ingress:\n  - ports: [{port: 80, endPort: 70000}]\n",
        "spec.ingress[0].ports[0].endPort",
        "not a port",
    );
}

#[test]
fn bad_peers_and_policy_types() {
    k8s_error(
        "  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/8}\n      podSelector: {}\n",
        "spec.ingress[0].from[0]",
        "cannot be combined",
    );
    k8s_error(
        "  ingress:\n  - from:\n    - {}\n",
        "spec.ingress[0].from[0]",
        "a peer needs",
    );
    k8s_error(
        "  policyTypes: [Ingress, egress]\n",
        "spec.policyTypes[1]",
        "unknown policy type",
    );
    // Egress rules are checked even when policyTypes leaves them out.
    k8s_error(
        "  policyTypes: [Ingress]\n  egress:\n  - ports: [{port: 0}]\n",
        "spec.egress[0].ports[0].port",
        "not a port",
    );
}

#[test]
fn missing_metadata() {
    let mut c = Cluster::e2e();
    c.k8s(GOOD).k8s(
        "
metadata: {name: nowhere}
spec:
  podSelector: {}
",
    );
    let w = c.compile_with_errors();
    assert_eq!(w.errors().len(), 1, "{:#?}", w.errors());
    assert_eq!(w.errors()[0].field, "metadata.namespace");
    assert!(w.endpoint("y/a").ingress.is_none());
}

#[test]
fn mesh_policy_failing_validation() {
    let mut c = Cluster::e2e();
    c.k8s(GOOD).mesh(
        "
metadata: {name: bad, namespace: y}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  egress:
  - toCIDR: [10.0.0.0/8]
  - toFQDNs:
    - matchPattern: 'a..example'
  ingress:
  - fromCIDRSet: [{cidr: 10.0.0.0/8, except: [192.168.0.0/16]}]
  - toPorts: [{ports: [{port: '80', endPort: 79}]}]
  - fromEndpoints: [{matchExpressions: [{key: pod, operator: Has}]}]
",
    );
    for (field, msg) in [
        ("spec.egress[1].toFQDNs[0].matchPattern", "empty label"),
        ("spec.ingress[0].fromCIDRSet[0].except[0]", "not inside"),
        (
            "spec.ingress[1].toPorts[0].ports[0].endPort",
            "less than port",
        ),
        (
            "spec.ingress[2].fromEndpoints[0].matchExpressions[0].operator",
            "unknown operator",
        ),
    ] {
        expect_error(&c, "MeshNetworkPolicy y/bad", field, msg);
    }
    assert_eq!(c.compile_with_errors().errors().len(), 4);

    let mut c = Cluster::e2e();
    c.k8s(GOOD).clusterwide(
        "
metadata: {name: bad-cw}
spec:
  endpointSelector: {}
  egress:
  - toFQDNs: [{matchName: 'bad name.test'}]
",
    );
    let w = c.compile_with_errors();
    let e = &w.errors()[0];
    assert_eq!(e.field, "spec.egress[0].toFQDNs[0].matchName");
    assert_eq!(
        e.to_string(),
        format!(
            "MeshClusterwideNetworkPolicy bad-cw: spec.egress[0].toFQDNs[0].matchName: {}",
            e.message
        )
    );
    assert!(w.endpoint("y/a").egress.is_none());
    w.check(TCP, 80, |from, to| to != "x/a" || from == "x/b");
}

#[test]
fn error_display_names_policy_and_field() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: bad, namespace: y}
spec:
  podSelector: {}
  ingress:
  - from:
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/4]}
",
    );
    let w = c.compile_with_errors();
    let e = &w.errors()[0];
    assert_eq!(
        e.policy,
        PolicyRef {
            kind: PolicyKind::NetworkPolicy,
            namespace: "y".into(),
            name: "bad".into()
        }
    );
    assert_eq!(
        e.to_string(),
        "NetworkPolicy y/bad: spec.ingress[0].from[0].ipBlock.except[0]: \
         \"10.0.0.0/4\" must be a strict subset of cidr \"10.0.0.0/8\""
    );
}

#[test]
fn every_problem_of_a_policy_is_reported() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: many, namespace: y}
spec:
  podSelector: {}
  policyTypes: [Sideways]
  ingress:
  - from: [{ipBlock: {cidr: x}}]
    ports: [{port: 0}, {protocol: GRE}]
",
    );
    let w = c.compile_with_errors();
    let fields: Vec<&str> = w.errors().iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.policyTypes[0]",
            "spec.ingress[0].from[0].ipBlock.cidr",
            "spec.ingress[0].ports[0].port",
            "spec.ingress[0].ports[1].protocol",
        ]
    );
}

/// A small deterministic generator (no dependency needed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    /// True one time in `n`, roughly.
    fn one_in(&mut self, n: u64) -> bool {
        self.next().is_multiple_of(n)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        let n = items.len() as u64;
        &items[(self.next() % n) as usize]
    }
}

fn random_policy(r: &mut Lcg, i: usize) -> NetworkPolicy {
    let keys = [
        "pod",
        "ns",
        "",
        "a/b",
        "k8s:pod",
        "-x",
        "kubernetes.io/metadata.name",
    ];
    let values = ["a", "b", "", "x", "not ok", "y"];
    let ops = ["In", "NotIn", "Exists", "DoesNotExist", "Has", ""];
    let cidrs = [
        "0.0.0.0/0",
        "::/0",
        "198.19.1.0/24",
        "198.19.1.21/32",
        "10.0.0.0/33",
        "x",
        "",
        "2001:db8::/32",
        "2001:db8:1::21/128",
        "198.19.0.0/15",
    ];
    let ints = [0, 1, 53, 80, 81, 65535, 65536, -1, i32::MIN, i32::MAX];
    let names = [
        "web",
        "serve-80-tcp",
        "Web",
        "",
        "a-very-long-port-name",
        "80",
    ];
    let protos = [None, Some("TCP"), Some("UDP"), Some("SCTP"), Some("ICMP")];
    let mut sel = |r: &mut Lcg| -> Option<LabelSelector> {
        if r.one_in(4) {
            return None;
        }
        let mut s = LabelSelector::default();
        if r.one_in(2) {
            s.match_labels = Some(
                [(r.pick(&keys).to_string(), r.pick(&values).to_string())]
                    .into_iter()
                    .collect(),
            );
        }
        if r.one_in(2) {
            s.match_expressions = Some(vec![LabelSelectorRequirement {
                key: r.pick(&keys).to_string(),
                operator: r.pick(&ops).to_string(),
                values: (!r.one_in(3))
                    .then(|| vec![r.pick(&values).to_string(), r.pick(&values).to_string()]),
            }]);
        }
        Some(s)
    };
    let peers = |r: &mut Lcg, sel: &mut dyn FnMut(&mut Lcg) -> Option<LabelSelector>| {
        (!r.one_in(3)).then(|| {
            (0..r.next() % 3)
                .map(|_| NetworkPolicyPeer {
                    pod_selector: sel(r),
                    namespace_selector: sel(r),
                    ip_block: r.one_in(2).then(|| IPBlock {
                        cidr: r.pick(&cidrs).to_string(),
                        except: r.one_in(2).then(|| {
                            (0..r.next() % 4)
                                .map(|_| r.pick(&cidrs).to_string())
                                .collect()
                        }),
                    }),
                })
                .collect()
        })
    };
    let ports = |r: &mut Lcg| {
        r.one_in(2).then(|| {
            (0..r.next() % 3)
                .map(|_| NetworkPolicyPort {
                    port: match r.next() % 3 {
                        0 => None,
                        1 => Some(IntOrString::Int(*r.pick(&ints))),
                        _ => Some(IntOrString::String(r.pick(&names).to_string())),
                    },
                    end_port: r.one_in(3).then(|| *r.pick(&ints)),
                    protocol: r.pick(&protos).map(str::to_string),
                })
                .collect()
        })
    };
    let spec = NetworkPolicySpec {
        pod_selector: sel(r),
        policy_types: r.one_in(2).then(|| {
            (0..r.next() % 3)
                .map(|_| r.pick(&["Ingress", "Egress", "Both"]).to_string())
                .collect()
        }),
        ingress: (!r.one_in(4)).then(|| {
            (0..r.next() % 3)
                .map(|_| NetworkPolicyIngressRule {
                    from: peers(r, &mut sel),
                    ports: ports(r),
                })
                .collect()
        }),
        egress: (!r.one_in(3)).then(|| {
            (0..r.next() % 3)
                .map(|_| NetworkPolicyEgressRule {
                    to: peers(r, &mut sel),
                    ports: ports(r),
                })
                .collect()
        }),
    };
    NetworkPolicy {
        metadata: ObjectMeta {
            name: (!r.one_in(8)).then(|| format!("p{i}")),
            namespace: (!r.one_in(8)).then(|| r.pick(&["x", "y", "z", "w"]).to_string()),
            ..Default::default()
        },
        spec: (!r.one_in(8)).then_some(spec),
    }
}

#[test]
fn random_policies_never_panic_and_errors_name_their_policy() {
    let mut r = Lcg(0x6d65_7368_7761_7264);
    let mut c = Cluster::e2e();
    let (mut valid, mut invalid) = (0, 0);
    for round in 0..40 {
        c.view.policies.clear();
        for i in 0..50 {
            let np = random_policy(&mut r, round * 50 + i);
            c.view.policies.push(PolicyObject::Kubernetes(Arc::new(np)));
        }
        for node in NODES {
            let out = compile(&c.view, node);
            let bad: std::collections::BTreeSet<String> =
                out.errors.iter().map(|e| e.policy.to_string()).collect();
            invalid += bad.len();
            valid += 50 - bad.len();
            for e in &out.errors {
                assert!(!e.field.is_empty() && !e.message.is_empty(), "{e}");
            }
            // Every endpoint is isolated only by valid policies.
            for ep in out.rules.endpoints.values() {
                for d in [&ep.ingress, &ep.egress].into_iter().flatten() {
                    assert!(!d.policies.is_empty());
                    assert!(d.policies.iter().all(|p| !bad.contains(&p.to_string())));
                }
            }
        }
    }
    // The generator exercises both paths.
    assert!(
        valid > 100 && invalid > 100,
        "valid {valid}, invalid {invalid}"
    );
}
