//! A reused `Compiler` gives exactly what `compile` gives, across pod,
//! namespace and policy changes.

mod common;

use std::sync::Arc;

use common::*;
use meshward_policy::{compile, Compiler, PolicyObject};

fn same(compiler: &mut Compiler, c: &Cluster) {
    for node in NODES {
        assert_eq!(
            compiler.compile(&c.view, node),
            compile(&c.view, node),
            "{node}"
        );
    }
}

#[test]
fn reused_compiler_matches_compile() {
    let mut c = Cluster::e2e();
    c.k8s(
        "
metadata: {name: from-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: web}]}]
",
    )
    .mesh(
        "
metadata: {name: fqdn, namespace: y}
spec:
  endpointSelector: {}
  egress:
  - toFQDNs: [{matchName: api.example.test}]
  - toPorts: [{ports: [{port: '53'}], rules: {dns: [{matchPattern: '*'}]}}]
",
    )
    .k8s(
        "
metadata: {name: broken, namespace: z}
spec:
  podSelector: {}
  ingress: [{ports: [{port: 0}]}]
",
    );
    let mut compiler = Compiler::new();
    same(&mut compiler, &c);
    // Errors are reported on every compile, not only the first.
    assert_eq!(compiler.compile(&c.view, "n1").errors.len(), 1);

    // Pod and namespace label changes.
    c.pod_mut("x/c").labels.insert("pod".into(), "b".into());
    c.ns_mut("y").labels.insert("team".into(), "blue".into());
    same(&mut compiler, &c);

    // A changed policy is a new Arc: parsed again.
    let fixed = k8s("
metadata: {name: broken, namespace: z}
spec:
  podSelector: {}
  ingress: [{ports: [{port: 80}]}]
");
    c.view.policies[2] = PolicyObject::Kubernetes(Arc::new(fixed));
    same(&mut compiler, &c);
    let out = compiler.compile(&c.view, "n1");
    assert!(out.errors.is_empty());
    let w = c.compile();
    // z admits TCP 80 only; x/a its `web` port from pods b; y sends DNS only.
    w.check(TCP, 80, |from, to| to != "x/a" && ns_of(from) != "y");
    w.check(TCP, 81, |from, to| {
        to != "x/a" && ns_of(to) != "z" && ns_of(from) != "y"
    });
    // from-b's podSelector means namespace x: x/b and the relabelled x/c.
    w.check(TCP, 8080, |from, to| {
        (to != "x/a" || from == "x/b" || from == "x/c") && ns_of(from) != "y" && ns_of(to) != "z"
    });

    // Removed policies are gone.
    c.view.policies.truncate(1);
    same(&mut compiler, &c);
    c.view.policies.clear();
    same(&mut compiler, &c);
    assert!(compiler
        .compile(&c.view, "n1")
        .rules
        .endpoints
        .values()
        .all(|e| e.ingress.is_none() && e.egress.is_none()));
}
