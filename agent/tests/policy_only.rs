//! End to end: the agents with `mesh: false` (policy only), as on a cloud
//! whose own CNI addresses and routes pods (`lab up --policy-only`: the
//! fabric routes pod CIDRs in plaintext, like a VPC). No tunnel, no routes,
//! no strict mode, no key published; NetworkPolicy, toFQDNs and the DNS
//! proxy are enforced all the same.

mod common;

use std::time::Duration;

use common::*;

fn pod_ip(lab: &TestLab, pod: &str) -> String {
    lab.ip(pod).trim().split('/').next().unwrap().to_string()
}

#[test]
fn policy_only_agents_enforce_without_the_mesh() {
    let lab = TestLab::new("po");
    lab.up_with(
        2,
        2,
        &[
            "--policy-only",
            "--pod-labels",
            "node1-pod1=app=client",
            "--pod-labels",
            "node2-pod1=app=db",
        ],
    );

    // No mesh: no tunnel, no key annotation, status says so.
    for node in ["node1", "node2"] {
        let status = lab.agent_status(node);
        assert_eq!(status["mesh"], false, "{status}");
        assert_eq!(status["publicKey"], "", "{status}");
        let key_file = lab.node_dir(node).join("key");
        assert!(!key_file.exists(), "{} was written", key_file.display());
        assert!(status["peers"].as_array().unwrap().is_empty(), "{status}");
        let links = lab.ok(&["exec", node, "ip", "-o", "link"]);
        // (pod veths are named mw + hex, which may start with 0: compare names)
        let tunnel = links
            .lines()
            .any(|l| l.split(": ").nth(1).and_then(|n| n.split('@').next()) == Some("mw0"));
        assert!(!tunnel, "{node} has a tunnel:\n{links}");
        let ruleset = lab.ok(&["exec", node, "nft", "list", "table", "inet", "meshward"]);
        assert!(
            !ruleset.contains("strict"),
            "{node} has strict mode:\n{ruleset}"
        );
        let text = lab.meshward(&[
            "status",
            "--socket",
            lab.node_dir(node).join("agent.sock").to_str().unwrap(),
        ]);
        assert!(text.contains("mesh          off"), "{text}");
    }
    let manifest = std::fs::read_to_string(lab.manifest("node1")).unwrap();
    assert!(
        !manifest.contains("meshward.io/public-key"),
        "policy-only agents publish no key:\n{manifest}"
    );
    let rotate = bounded(std::process::Command::new(MESHWARD).args([
        "keys",
        "rotate",
        "--socket",
        lab.node_dir("node1").join("agent.sock").to_str().unwrap(),
    ]));
    assert!(!rotate.status.success());
    assert!(
        String::from_utf8_lossy(&rotate.stderr).contains("mesh is off"),
        "{}",
        String::from_utf8_lossy(&rotate.stderr)
    );

    // Cross-node pod traffic is routed by the fabric (in plaintext).
    lab.ok(&[
        "exec",
        "node2-pod1",
        "busybox",
        "httpd",
        "-p",
        "80",
        "-h",
        "/etc",
    ]);
    let url = format!("http://{}/hostname", pod_ip(&lab, "node2-pod1"));
    eventually("the db server", Duration::from_secs(10), || {
        curl(&lab, "node1-pod2", &url).is_some()
    });

    // Ingress: a NetworkPolicy isolates the db across nodes.
    apply(
        &lab,
        "db-ingress.yaml",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-client, namespace: default}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
"#,
    );
    eventually("db to be isolated", Duration::from_secs(20), || {
        curl(&lab, "node1-pod2", &url).is_none()
    });
    assert!(
        curl(&lab, "node1-pod1", &url).is_some(),
        "client may reach db"
    );
    assert!(
        curl(&lab, "node2-pod2", &url).is_none(),
        "same-node pods are isolated too"
    );

    // Egress by name: the DNS proxy learns, nftables admits what it learnt.
    apply(
        &lab,
        "client-egress.yaml",
        r#"
apiVersion: meshward.io/v1alpha1
kind: MeshNetworkPolicy
metadata: {name: client-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [198.18.100.53/32]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "**.example.test"}]
  - toFQDNs: [{matchName: api.example.test}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
  - toEndpoints: [{matchLabels: {app: db}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"#,
    );
    eventually(
        "the egress policy to isolate the client",
        Duration::from_secs(20),
        || curl(&lab, "node1-pod1", "http://198.18.100.11/").is_none(),
    );
    assert_eq!(
        curl(&lab, "node1-pod1", "http://api.example.test/").as_deref(),
        Some("hello from 198.18.100.10\n")
    );
    assert!(curl(&lab, "node1-pod1", "http://other.example.test/").is_none());
    assert!(
        curl(&lab, "node1-pod1", &url).is_some(),
        "egress and ingress both allow client -> db"
    );
    assert!(
        curl(&lab, "node1-pod2", "http://198.18.100.11/").is_some(),
        "unselected pods stay open"
    );
}
