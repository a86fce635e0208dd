//! End to end: flow events over TCP (`observeAddress`, `observeTokenFile`,
//! `meshward observe --server --token-file`) between lab namespaces: the
//! token file is checked, a wrong token is refused, the right one streams
//! (filters, --follow), nothing but observe is served, and bad clients do
//! not hurt the agent.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const TOKEN: &str = "lab-observe-token-0123456789";
const ADDRESS: &str = "198.18.0.1:4245";

fn token_file(lab: &TestLab, name: &str, text: &str, mode: u32) -> PathBuf {
    let dir = lab.state_dir().join("observe-test");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// `meshward observe --server ADDRESS --token-file FILE ARGS` run in node2's
/// namespace (node1's agent serves the events).
fn remote_observe(lab: &TestLab, token: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec![
        "exec",
        "node2",
        MESHWARD,
        "observe",
        "--server",
        ADDRESS,
        "--token-file",
        token.to_str().unwrap(),
    ];
    all.extend(args);
    lab.run(&all)
}

/// Opens a TCP connection to node1's observe port from node2's namespace.
fn connect(lab: &TestLab) -> TcpStream {
    let stream = in_ns(&lab.ns("node2"), || TcpStream::connect(ADDRESS)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
}

/// Sends `lines` and returns every line the agent sends until it closes.
fn exchange(lab: &TestLab, lines: &[&[u8]]) -> Vec<String> {
    let mut stream = connect(lab);
    for line in lines {
        // the agent may close before taking everything (oversized lines)
        if stream.write_all(line).is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    for line in BufReader::new(stream).lines() {
        match line {
            Ok(l) => out.push(l),
            Err(_) => break,
        }
    }
    out
}

const POLICY: &str = r#"
apiVersion: meshward.io/v1alpha1
kind: MeshNetworkPolicy
metadata: {name: client-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [198.18.100.10/32]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"#;

#[test]
fn observe_over_tcp_needs_the_token_and_serves_only_observe() {
    let lab = TestLab::new("ot");
    lab.up_with(2, 1, &["--pod-labels", "node1-pod1=app=client"]);
    let config = lab.agent_config("node1");
    let good = token_file(&lab, "token", &format!("{TOKEN}\n"), 0o600);
    let mut yaml = std::fs::read_to_string(&config).unwrap();
    yaml += &format!(
        "observeAddress: {ADDRESS}\nobserveTokenFile: {}\n",
        good.display()
    );
    std::fs::write(&config, yaml).unwrap();

    // a world-readable token file is refused, by --check and at start-up
    std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o644)).unwrap();
    let check = bounded(Command::new(MESHWARD).args([
        "agent",
        "--check",
        "--config",
        config.to_str().unwrap(),
    ]));
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success());
    assert!(
        stderr.contains("observeTokenFile: token file")
            && stderr.contains("readable or writable by others (mode 0644)"),
        "{stderr}"
    );
    lab.ok(&["agent", "stop", "node1"]);
    lab.ok(&["agent", "start", "node1", "--no-wait"]);
    eventually(
        "node1's agent to refuse the token file",
        Duration::from_secs(20),
        || {
            lab.log_tail("node1")
                .contains("readable or writable by others (mode 0644)")
        },
    );
    std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o600)).unwrap();
    let checked = lab.meshward(&["agent", "--check", "--config", config.to_str().unwrap()]);
    assert!(
        checked.contains(&format!("observeAddress: {ADDRESS}\n")),
        "{checked}"
    );
    assert!(!checked.contains(TOKEN), "--check never prints the token");
    lab.ok(&["agent", "stop", "node1"]);
    lab.ok(&["agent", "start", "node1"]);

    // the right token: node1's mesh events (its session with node2 came up)
    let mut events = Vec::new();
    eventually("node1's peer-up over TCP", Duration::from_secs(20), || {
        let out = remote_observe(&lab, &good, &["-o", "json", "--type", "mesh"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        events = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect();
        events.iter().any(|e| e["mesh"]["event"] == "peer-up")
    });
    assert!(events
        .iter()
        .all(|e| e["node"] == "node1" && e["type"] == "mesh"));
    // filters apply: no DNS events happened
    let out = remote_observe(&lab, &good, &["-o", "json", "--type", "dns"]);
    assert!(out.status.success());
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // a wrong token: refused
    let wrong = token_file(&lab, "wrong", "lab-observe-token-9876543210\n", 0o600);
    let out = remote_observe(&lab, &wrong, &["--type", "mesh"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("the agent at {ADDRESS} refused: wrong token")),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());

    // --follow streams what happens next: a policy drop on node1
    let policy = lab.state_dir().join("observe-test").join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    lab.ok(&["apply", policy.to_str().unwrap()]);
    eventually(
        "the policy to isolate node1-pod1",
        Duration::from_secs(20),
        || !lab.ping_once("node1-pod1", "198.18.100.11"),
    );
    let mut follower = Command::new(MESHWARD)
        .args([
            "lab", "--name", &lab.name, "exec", "node2", MESHWARD, "observe",
        ])
        .args(["--server", ADDRESS, "--token-file", good.to_str().unwrap()])
        .args(["--follow", "-o", "json", "--verdict", "dropped"])
        .args(["--from-pod", "default/node1-pod1", "--since", "1s"])
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
    // give the follower a moment to connect before the drop happens
    thread::sleep(Duration::from_secs(2));
    assert!(!lab.ping_once("node1-pod1", "198.18.100.12"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("the follower saw no drop to 198.18.100.12");
        let e: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(e["verdict"], "dropped", "{line}");
        assert_eq!(e["source"]["pod"], "node1-pod1", "{line}");
        if e["destination"]["ip"] == "198.18.100.12" {
            assert_eq!(e["protocol"], "ICMP", "{line}");
            break;
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();

    // nothing but observe is served over TCP
    let auth = format!("{{\"op\":\"auth\",\"token\":\"{TOKEN}\"}}\n");
    for (request, want) in [
        ("{\"op\":\"status\"}\n", "status is not served over TCP"),
        ("{\"op\":\"rotate\"}\n", "rotate is not served over TCP"),
    ] {
        let lines = exchange(&lab, &[auth.as_bytes(), request.as_bytes()]);
        assert_eq!(lines.len(), 2, "{request}: {lines:?}");
        assert_eq!(lines[0], "{\"ok\":true}");
        assert!(lines[1].contains(want), "{request}: {lines:?}");
    }
    let key_before = lab.agent_status("node1")["publicKey"].clone();
    let lines = exchange(&lab, &[b"{\"op\":\"rotate\"}\n"]);
    assert!(lines[0].contains("authenticate first"), "{lines:?}");
    assert_eq!(
        lab.agent_status("node1")["publicKey"],
        key_before,
        "no rotation"
    );

    // garbage, oversized and silent clients are closed; the agent carries on
    let big = vec![b'a'; 100_000];
    let lines = exchange(&lab, &[&big]);
    assert!(lines[0].contains("request line too long"), "{lines:?}");
    let lines = exchange(&lab, &[&[0xff, 0xfe, 0x00, b'\n']]);
    assert!(lines[0].contains("request is not JSON"), "{lines:?}");
    let lines = exchange(&lab, &[auth.as_bytes(), &big]);
    assert!(lines[1].contains("request line too long"), "{lines:?}");
    let mut silent = connect(&lab);
    let started = Instant::now();
    let mut answer = String::new();
    silent.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("no authentication within"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(14));
    // half a line, then the client goes away
    let mut half = connect(&lab);
    half.write_all(b"{\"op\":\"au").unwrap();
    drop(half);
    // many connections at once: the excess is told and closed
    let held: Vec<TcpStream> = (0..20).map(|_| connect(&lab)).collect();
    let readers: Vec<_> = held
        .into_iter()
        .map(|mut s| {
            thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut buf = [0u8; 256];
                let n = s.read(&mut buf).unwrap_or(0);
                String::from_utf8_lossy(&buf[..n]).contains("too many observe connections")
            })
        })
        .collect();
    let refused = readers
        .into_iter()
        .filter_map(|r| r.join().ok())
        .filter(|told| *told)
        .count();
    assert!(refused >= 4, "{refused} of 20 told there are too many");
    // still serving, over TCP and on the control socket
    let out = remote_observe(&lab, &good, &["-o", "json", "--type", "mesh"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty());
    let status = lab.agent_status("node1");
    assert!(status["flowEvents"]["published"].as_u64().unwrap() >= 1);
}

#[test]
fn flow_events_off_runs_no_producer_and_keeps_metrics() {
    let lab = TestLab::new("of");
    lab.up(2, 1);
    for node in ["node1", "node2"] {
        let config = lab.agent_config(node);
        let mut yaml = std::fs::read_to_string(&config).unwrap();
        yaml += "flowEvents: false\n";
        std::fs::write(&config, yaml).unwrap();
    }
    lab.ok(&["agent", "restart"]);
    let config = lab.agent_config("node1");
    let out =
        bounded(Command::new(MESHWARD).args(["observe", "--config", config.to_str().unwrap()]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("flow events are off"), "{stderr}");
    assert!(lab.log_tail("node1").contains("flow events are off"));
    // no nflog listener, no mesh watcher threads
    let pid = lab.agent_status("node1")["pid"].as_u64().unwrap();
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    assert!(!threads.iter().any(|t| t == "mw-nflog"), "{threads:?}");
    // status and metrics still work, without the flow-event parts
    let status = lab.agent_status("node1");
    assert!(status.get("flowEvents").is_none(), "{status:#}");
    let remote = lab.ip("node2-pod1");
    assert!(lab.reaches("node1-pod1", &remote));
    let metrics = lab.ok(&["metrics", "node1"]);
    assert!(
        metrics.contains("meshward_peer_packets_total{peer=\"node2\",direction=\"tx\"}"),
        "{metrics}"
    );
    assert!(!metrics.contains("meshward_flow_events_total"), "{metrics}");
}
