//! End to end: flow events (`meshward lab observe`, `meshward observe
//! --follow`) and metrics (`meshward lab metrics`) of lab agents while a
//! policy drops connections and refuses DNS queries.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Whether `curl` in the pod got an answer.
fn reaches(lab: &TestLab, pod: &str, url: &str) -> bool {
    curl(lab, pod, url).is_some()
}

fn dig_status(lab: &TestLab, pod: &str, name: &str) -> String {
    let out = lab.ok(&["exec", pod, "dig", "+time=2", "+tries=1", name]);
    out.lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or("").to_string())
        .unwrap_or_default()
}

const POLICY: &str = r#"
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
"#;

#[test]
fn drops_and_refusals_show_with_pods_and_policies_and_metrics_move() {
    let lab = TestLab::new("ob");
    lab.up_with(2, 2, &["--pod-labels", "node1-pod1=app=client"]);
    apply(&lab, "policy.yaml", POLICY);
    eventually(
        "the policy to isolate node1-pod1",
        Duration::from_secs(20),
        || !reaches(&lab, "node1-pod1", "http://198.18.100.11/"),
    );
    let drops_before = metric(
        &lab,
        "node1",
        "meshward_policy_dropped_packets_total{policy=\"MeshNetworkPolicy default/client-egress\",direction=\"egress\"}",
    );
    assert!(drops_before >= 1.0, "the isolating probe was counted");

    // a follower started now sees what happens next
    let config = lab.agent_config("node1");
    let mut follower = Command::new(MESHWARD)
        .args(["observe", "--config", config.to_str().unwrap()])
        .args(["--follow", "-o", "json", "--from-pod", "default/node1-pod1"])
        .args(["--type", "l4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = follower.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // a denied connection: dropped, with pod names and the policy
    assert!(!reaches(&lab, "node1-pod1", "http://198.18.100.12/"));
    let drops = observe(&lab, &["--verdict", "dropped", "--type", "l4"]);
    let drop = drops
        .iter()
        .find(|e| e["destination"]["ip"] == "198.18.100.12")
        .unwrap_or_else(|| panic!("no drop to 198.18.100.12 in {drops:#?}"));
    assert_eq!(drop["node"], "node1");
    assert_eq!(drop["direction"], "egress");
    assert_eq!(drop["source"]["pod"], "node1-pod1");
    assert_eq!(drop["source"]["namespace"], "default");
    assert_eq!(drop["source"]["labels"]["app"], "client");
    assert_eq!(drop["destination"]["port"], 80);
    assert_eq!(drop["protocol"], "TCP");
    assert_eq!(
        drop["policies"],
        serde_json::json!(["MeshNetworkPolicy default/client-egress"])
    );
    // the follower got it too, and nothing its filters exclude
    let deadline = Instant::now() + Duration::from_secs(10);
    let followed: Value = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("the follower saw no drop");
        let e: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(e["type"], "l4", "{line}");
        assert_eq!(e["source"]["pod"], "node1-pod1", "{line}");
        if e["destination"]["ip"] == "198.18.100.12" {
            break e;
        }
    };
    assert_eq!(followed["verdict"], "dropped");
    let _ = follower.kill();
    let _ = follower.wait();

    // a refused DNS query: denied, with the pod and the policy
    assert_eq!(dig_status(&lab, "node1-pod1", "edge.cdn.test"), "REFUSED");
    let denied = observe(
        &lab,
        &[
            "--verdict",
            "denied",
            "--type",
            "dns",
            "--pod",
            "node1-pod1",
        ],
    );
    let refusal = denied
        .iter()
        .find(|e| e["dns"]["query"] == "edge.cdn.test.")
        .unwrap_or_else(|| panic!("no refusal in {denied:#?}"));
    assert_eq!(refusal["source"]["pod"], "node1-pod1");
    assert_eq!(refusal["dns"]["rcode"], "REFUSED");
    assert_eq!(
        refusal["policies"],
        serde_json::json!(["MeshNetworkPolicy default/client-egress"])
    );
    // an allowed name: its answer and hold time, then the connection works
    assert!(reaches(&lab, "node1-pod1", "http://api.example.test/"));
    let allowed = observe(&lab, &["--verdict", "allowed", "--type", "dns"]);
    let answer = allowed
        .iter()
        .find(|e| e["dns"]["query"] == "api.example.test." && e["dns"]["qtype"] == "A")
        .unwrap_or_else(|| panic!("no allowed answer in {allowed:#?}"));
    assert_eq!(
        answer["dns"]["answers"],
        serde_json::json!(["198.18.100.10"])
    );
    assert!(answer["dns"]["holdMicros"].as_u64().is_some(), "{answer}");
    // other filters exclude them
    assert!(observe(&lab, &["--verdict", "denied", "--namespace", "kube-system"]).is_empty());
    assert!(observe(&lab, &["--type", "dns", "--to-pod", "node1-pod1"]).is_empty());
    // the readable form names pod, peer and policy
    let text = lab.ok(&["observe", "--verdict", "dropped", "--type", "l4"]);
    assert!(
        text.lines().any(|l| l.contains(
            "DROPPED l4 default/node1-pod1 -> 198.18.100.12:80/TCP egress policy MeshNetworkPolicy default/client-egress"
        )),
        "{text}"
    );

    // metrics moved with the traffic
    let drops_after = metric(
        &lab,
        "node1",
        "meshward_policy_dropped_packets_total{policy=\"MeshNetworkPolicy default/client-egress\",direction=\"egress\"}",
    );
    assert!(
        drops_after > drops_before,
        "{drops_before} -> {drops_after}"
    );
    assert!(
        metric(
            &lab,
            "node1",
            "meshward_dns_queries_total{verdict=\"denied\"}"
        ) >= 1.0
    );
    assert!(
        metric(
            &lab,
            "node1",
            "meshward_dns_queries_total{verdict=\"allowed\"}"
        ) >= 1.0
    );
    assert!(metric(&lab, "node1", "meshward_dns_hold_seconds_count") >= 1.0);
    assert!(metric(&lab, "node1", "meshward_fqdn_programming_seconds_count") >= 1.0);
    let tx_before = metric(
        &lab,
        "node1",
        "meshward_peer_packets_total{peer=\"node2\",direction=\"tx\"}",
    );
    let remote = lab.ip("node2-pod1");
    assert!(lab.reaches("node1-pod2", &remote));
    let tx_after = metric(
        &lab,
        "node1",
        "meshward_peer_packets_total{peer=\"node2\",direction=\"tx\"}",
    );
    assert!(tx_after > tx_before, "{tx_before} -> {tx_after}");
    assert!(metric(&lab, "node1", "meshward_process_resident_memory_bytes") > 0.0);

    // status shows the learned name with its TTL
    let status = lab.agent_status("node1");
    let learned = status["policy"]["learned"].as_array().unwrap();
    assert!(
        learned.iter().any(|l| l["name"] == "api.example.test."
            && l["ips"] == serde_json::json!(["198.18.100.10"])
            && l["ttlSecs"].as_u64().is_some()),
        "{learned:?}"
    );
}

#[test]
fn mesh_peers_going_down_and_up_show_as_events() {
    let lab = TestLab::new("om");
    lab.up(2, 0);
    // node1's session with node2 came up when the lab started (the
    // watcher looks once a second)
    eventually("node1's peer-up", Duration::from_secs(10), || {
        observe(&lab, &["--type", "mesh", "--verdict", "info"])
            .iter()
            .any(|e| {
                e["node"] == "node1"
                    && e["mesh"]["peer"] == "node2"
                    && e["mesh"]["event"] == "peer-up"
            })
    });
    let restarted = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    lab.ok(&["agent", "stop", "node2"]);
    lab.ok(&["agent", "start", "node2"]);
    // the restarted agent reports its session with node1 coming up
    eventually("node2's peer-up", Duration::from_secs(30), || {
        observe(&lab, &["--type", "mesh", "--since", "1h"])
            .iter()
            .any(|e| {
                e["node"] == "node2"
                    && e["mesh"]["event"] == "peer-up"
                    && e["mesh"]["peer"] == "node1"
                    && e["time"].as_u64().unwrap() >= restarted
            })
    });
}
