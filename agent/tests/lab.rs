//! Integration tests of `meshward lab`: they run the built `meshward`
//! binary as root, each on a lab of its own name, and always take it down.
//!
//! Pod tests need the real `meshward-cni` binary next to `meshward` in the
//! target directory (`cargo build --workspace` puts it there).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

#[test]
fn nodes_and_external_reach_each_other_over_the_fabric() {
    let lab = TestLab::new("fab");
    // without agents: nothing routes the pod CIDRs yet
    lab.up_with(3, 0, &["--no-agents"]);
    assert_eq!(lab.ip("node2"), "198.18.0.2");
    assert_eq!(lab.ip("external"), "198.18.100.1");

    assert!(lab.reaches("node1", "198.18.0.2"), "node1 -> node2");
    assert!(lab.reaches("node3", "198.18.0.1"), "node3 -> node1");
    assert!(lab.reaches("external", "198.18.0.3"), "external -> node3");
    assert!(lab.reaches("node2", "198.18.100.1"), "node2 -> external");

    // Pod CIDRs of other nodes fail closed until the mesh routes them.
    let out = lab.run(&[
        "exec",
        "node1",
        "--",
        "ip",
        "-4",
        "route",
        "get",
        "198.19.2.7",
    ]);
    assert!(!out.status.success(), "node1 has a route to node2's pods");

    // Nothing routes out of the lab.
    for member in ["fabric", "external", "node1", "node2", "node3"] {
        let routes = lab.ok(&["exec", member, "--", "ip", "-4", "route", "show", "default"]);
        assert!(
            routes.trim().is_empty(),
            "{member} has a default route: {routes}"
        );
        let out = lab.run(&[
            "exec",
            member,
            "--",
            "ip",
            "-4",
            "route",
            "get",
            "192.0.2.1",
        ]);
        assert!(!out.status.success(), "{member} routes 192.0.2.1");
    }
}

#[test]
fn status_describes_the_lab() {
    let lab = TestLab::new("st");
    lab.up(2, 0);

    let status = lab.status();
    assert_eq!(status["lab"], lab.name.as_str());
    let kinds: Vec<(&str, &str)> = members(&status)
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("fabric", "fabric"),
            ("external", "external"),
            ("node1", "node"),
            ("node2", "node")
        ]
    );
    let node2 = member(&status, "node2");
    assert_eq!(node2["namespace"], format!("{}node2", lab.prefix()));
    assert_eq!(node2["address"], "198.18.0.2/24");
    assert_eq!(node2["podCidr"], "198.19.2.0/24");
    assert_eq!(member(&status, "external")["address"], "198.18.100.1/24");
    assert!(members(&status).iter().all(|m| m["state"] == "ok"));
    assert_eq!(status["strayNamespaces"], serde_json::json!([]));

    let table = lab.ok(&["status"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "KIND",
            "NAMESPACE",
            "ADDRESS",
            "NODE",
            "STATE",
            "AGENT"
        ]
    );
    assert!(table.contains("198.18.0.1/24"), "{table}");

    // A namespace that vanished shows as missing.
    let gone = format!("{}node2", lab.prefix());
    let out = Command::new("ip")
        .args(["netns", "delete", &gone])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(member(&lab.status(), "node2")["state"], "missing namespace");
    // down still stops everything of the lab, agents in a lost namespace too
    lab.ok(&["down"]);
    let state_dir = lab.state_dir().display().to_string();
    let left = processes_mentioning(&state_dir);
    assert!(
        left.is_empty(),
        "processes of the lab left running: {left:?}"
    );
}

#[test]
fn down_removes_everything() {
    let lab = TestLab::new("dn");
    lab.up(2, 0);
    assert_eq!(
        lab.namespaces(),
        ["ext", "fabric", "node1", "node2"].map(|n| format!("{}{n}", lab.prefix()))
    );
    let state_dir = PathBuf::from("/run/meshward-lab").join(&lab.name);
    assert!(state_dir.join("lab.json").is_file());

    lab.ok(&["down"]);
    assert_eq!(lab.namespaces(), Vec::<String>::new());
    assert!(!state_dir.exists(), "{} left behind", state_dir.display());
    assert!(lab.fails(&["status"]).contains("is not up"));
    assert!(lab.ok(&["down"]).contains("nothing to remove"));
}

#[test]
fn down_cleans_up_after_a_killed_lab() {
    let lab = TestLab::new("kil");
    // What a lab killed half-way leaves: a namespace, a process inside, no lab.json.
    let stray = format!("{}node9", lab.prefix());
    let out = Command::new("ip")
        .args(["netns", "add", &stray])
        .output()
        .unwrap();
    assert!(out.status.success(), "ip netns add {stray}");
    let mut sleeper = Command::new("ip")
        .args(["netns", "exec", &stray, "sleep", "300"])
        .spawn()
        .unwrap();

    assert!(lab.fails(&["status"]).contains("left namespaces behind"));
    let refused = lab.fails(&["up", "--nodes", "1", "--pods", "0"]);
    assert!(
        refused.contains("already exists") && refused.contains("down"),
        "{refused}"
    );

    lab.ok(&["down"]);
    assert_eq!(lab.namespaces(), Vec::<String>::new());
    let status = sleeper.wait().unwrap();
    assert!(
        !status.success(),
        "the process inside the stray namespace was not stopped"
    );
}

#[test]
fn up_on_an_existing_lab_needs_down_or_replace() {
    let lab = TestLab::new("rep");
    lab.up(1, 0);
    let refused = lab.fails(&["up", "--nodes", "2", "--pods", "0"]);
    assert!(refused.contains("already exists"), "{refused}");
    assert_eq!(
        members(&lab.status()).len(),
        3,
        "the refused up changed the lab"
    );

    lab.ok(&["up", "--replace", "--nodes", "2", "--pods", "0"]);
    assert_eq!(lab.ip("node2"), "198.18.0.2");
    assert!(lab.reaches("node2", "198.18.0.1"));
}

#[test]
fn exec_passes_the_exit_code_through() {
    let lab = TestLab::new("ex");
    lab.up(1, 0);
    let out = lab.run(&["exec", "node1", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    let out = lab.run(&[
        "exec", "external", "--", "ip", "-4", "-o", "addr", "show", "eth0",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("198.18.100.1/24"));
    let out = lab.run(&["exec", "node1", "--", "/nonexistent/program"]);
    assert_eq!(out.status.code(), Some(127));
}

#[test]
fn invalid_arguments_get_clear_errors() {
    let lab = TestLab::new("inv");

    let bad_name = Command::new(MESHWARD)
        .args(["lab", "--name", "Bad-Name", "status"])
        .output()
        .unwrap();
    assert!(!bad_name.status.success());
    assert!(String::from_utf8_lossy(&bad_name.stderr).contains("lab name"));

    assert!(lab.fails(&["up", "--nodes", "0"]).contains("--nodes 0"));
    assert!(lab.fails(&["up", "--nodes", "300"]).contains("1 to 254"));
    assert!(lab
        .fails(&["up", "--nodes", "1", "--pods", "254"])
        .contains("0 to 253"));
    assert!(lab.fails(&["up", "--nodes", "two"]).contains("--nodes"));
    let no_cni = lab.fails(&[
        "up",
        "--nodes",
        "1",
        "--pods",
        "1",
        "--cni-bin",
        "/nonexistent/cni",
    ]);
    assert!(no_cni.contains("/nonexistent/cni"), "{no_cni}");
    assert!(lab
        .fails(&["exec", "pod1", "--", "true"])
        .contains("unknown lab target"));
    assert!(lab.fails(&["exec", "node1"]).contains("required"));
    assert!(lab.fails(&["ip", "node1"]).contains("is not up"));
    assert!(lab
        .fails(&["exec", "node1", "--", "true"])
        .contains("does not exist"));
    assert_eq!(
        lab.namespaces(),
        Vec::<String>::new(),
        "a failed command left namespaces"
    );

    lab.up(1, 0);
    assert!(lab.fails(&["ip", "node2"]).contains("has no node2"));
    assert!(lab.fails(&["ip", "fabric"]).contains("no address"));
    assert!(lab
        .fails(&["exec", "node5", "--", "true"])
        .contains("has no node5"));
}

// --- pods: these call the real meshward-cni ---

#[test]
fn pods_get_addresses_from_their_node() {
    let lab = TestLab::new("pa");
    lab.up(2, 2);
    let status = lab.status();
    for (pod, node, cidr) in [
        ("node1-pod1", "node1", "198.19.1."),
        ("node1-pod2", "node1", "198.19.1."),
        ("node2-pod1", "node2", "198.19.2."),
        ("node2-pod2", "node2", "198.19.2."),
    ] {
        let m = member(&status, pod);
        assert_eq!(m["kind"], "pod");
        assert_eq!(m["node"], node);
        assert_eq!(m["state"], "ok");
        assert_eq!(m["namespace"], format!("{}{pod}", lab.prefix()));
        let address = m["address"].as_str().unwrap();
        assert!(
            address.starts_with(cidr) && address.ends_with("/32"),
            "{pod}: {address}"
        );
        assert_eq!(lab.ip(pod), address.trim_end_matches("/32"));
    }
    assert_ne!(lab.ip("node1-pod1"), lab.ip("node1-pod2"));
}

#[test]
fn pods_reach_pods_on_their_node_and_their_node() {
    let lab = TestLab::new("pl");
    lab.up(2, 2);
    let pod2 = lab.ip("node1-pod2");
    assert!(lab.reaches("node1-pod1", &pod2), "node1-pod1 -> node1-pod2");
    assert!(
        lab.reaches("node2-pod2", &lab.ip("node2-pod1")),
        "node2-pod2 -> node2-pod1"
    );
    assert!(
        lab.reaches("node1-pod1", "198.18.0.1"),
        "node1-pod1 -> node1"
    );
    assert!(lab.reaches("node1", &pod2), "node1 -> node1-pod2");
}

#[test]
fn cross_node_pod_traffic_fails_closed_without_the_mesh() {
    let lab = TestLab::new("px");
    lab.up_with(2, 1, &["--no-agents"]);
    assert!(
        lab.reaches("node1-pod1", "198.18.0.1"),
        "the pod works at all"
    );
    let remote = lab.ip("node2-pod1");
    assert!(
        !lab.ping_once("node1-pod1", &remote),
        "node1-pod1 -> node2-pod1 flowed in plaintext"
    );
    assert!(
        !lab.ping_once("node2-pod1", &lab.ip("node1-pod1")),
        "node2-pod1 -> node1-pod1 flowed in plaintext"
    );
    assert!(
        !lab.ping_once("node1", &remote),
        "node1 -> node2-pod1 flowed in plaintext"
    );
}

#[test]
fn up_writes_the_cluster_for_the_agents() {
    let lab = TestLab::new("ag");
    lab.up_with(2, 0, &["--no-agents"]);
    let manifest = std::fs::read_to_string(lab.manifest("node2")).unwrap();
    assert!(manifest.contains("name: node2"), "{manifest}");
    assert!(manifest.contains("podCIDR: 198.19.2.0/24"), "{manifest}");
    let config = std::fs::read_to_string(lab.agent_config("node1")).unwrap();
    for line in [
        "nodeName: node1".to_string(),
        "endpoint: 198.18.0.1:51871".to_string(),
        "clusterCIDR: 198.19.0.0/16".to_string(),
        format!("datastore: dir:{}/datastore", lab.state_dir().display()),
        format!("socketPath: {}/node1/agent.sock", lab.state_dir().display()),
    ] {
        assert!(
            config.lines().any(|l| l == line),
            "{line} missing:\n{config}"
        );
    }
    let status = lab.status();
    assert_eq!(member(&status, "node1")["agent"]["state"], "not running");
    assert_eq!(member(&status, "fabric")["agent"], serde_json::Value::Null);
    assert!(lab
        .ok(&["agent", "stop"])
        .contains("node2: agent was not running"));
    assert!(lab
        .fails(&["agent", "stop", "node1-pod1"])
        .contains("not a node"));
    assert!(lab
        .fails(&["agent", "start", "node7"])
        .contains("has no node7"));
}

#[test]
fn pods_resolve_the_labs_names_and_reach_its_http_servers() {
    let lab = TestLab::new("svc");
    lab.up_with(
        1,
        1,
        &[
            "--no-agents",
            "--pod-labels",
            "node1-pod1=app=web,tier=front",
        ],
    );
    let dig = |name: &str| lab.ok(&["exec", "node1-pod1", "dig", "+short", "+time=2", name]);
    assert_eq!(dig("api.example.test").trim(), "198.18.100.10");
    let mut multi: Vec<String> = dig("multi.example.test")
        .lines()
        .map(String::from)
        .collect();
    multi.sort();
    assert_eq!(multi, ["198.18.100.12", "198.18.100.13", "198.18.100.14"]);
    // the CNAME chain ends at edge.cdn.test
    assert_eq!(
        dig("www.example.test").lines().collect::<Vec<_>>(),
        ["alias.example.test.", "edge.cdn.test.", "198.18.100.17"]
    );
    // unknown names are NXDOMAIN, never forwarded anywhere
    let nx = lab.ok(&["exec", "node1-pod1", "dig", "+time=2", "nope.example.test"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    // resolv.conf names the lab's server, so plain names work
    let body = lab.ok(&[
        "exec",
        "node1-pod1",
        "curl",
        "-sS",
        "-m",
        "5",
        "http://api.example.test/",
    ]);
    assert_eq!(body, "hello from 198.18.100.10\n");

    let pods = std::fs::read_to_string(lab.state_dir().join("datastore/pods.yaml")).unwrap();
    let pods: serde_json::Value = serde_json::from_str(&pods).unwrap();
    let pod = &pods["items"][0];
    assert_eq!(pod["metadata"]["labels"]["tier"], "front");
    assert_eq!(
        pod["status"]["podIP"],
        lab.ip("node1-pod1").split('/').next().unwrap()
    );

    // `lab apply`: a Pod named like a lab pod relabels it; the rest is applied as is
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shop.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: node1-pod1, namespace: shop, labels: {app: db}}\n\
         ---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
    )
    .unwrap();
    lab.ok(&["apply", file.to_str().unwrap()]);
    let pods = std::fs::read_to_string(lab.state_dir().join("datastore/pods.yaml")).unwrap();
    let pods: serde_json::Value = serde_json::from_str(&pods).unwrap();
    assert_eq!(pods["items"][0]["metadata"]["namespace"], "shop");
    assert_eq!(
        pods["items"][0]["metadata"]["labels"],
        serde_json::json!({"app": "db"})
    );
    let applied = lab.state_dir().join("datastore/applied-shop.yaml");
    let text = std::fs::read_to_string(&applied).unwrap();
    assert!(text.contains("\"Namespace\""), "{text}");
    assert!(!text.contains("node1-pod1"), "{text}");
    lab.ok(&["delete", file.to_str().unwrap()]);
    assert!(!applied.exists());
    assert!(lab
        .fails(&["apply", "/nonexistent.yaml"])
        .contains("/nonexistent.yaml"));
}
