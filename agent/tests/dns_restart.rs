//! End to end: pods' DNS keeps resolving across agent restarts (kill -9
//! and SIGTERM) because the DNS socket keeper holds the proxy's sockets
//! while no agent runs; a query sent then is answered by the next agent,
//! which learns the answer before releasing it. Without the keeper the
//! same query is lost (the control that shows the test can fail).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

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
  - toFQDNs: [{matchName: api.example.test}, {matchPattern: "*.svc.example.test"}, {matchName: multi.example.test}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"#;

fn apply(lab: &TestLab, yaml: &str) {
    let dir = lab.state_dir().join("test-manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policy.yaml");
    std::fs::write(&file, yaml).unwrap();
    lab.ok(&["apply", file.to_str().unwrap()]);
}

/// A lab with one node and one pod (app=client) under [`POLICY`].
fn isolated_lab(tag: &str) -> TestLab {
    let lab = TestLab::new(tag);
    lab.up_with(1, 1, &["--pod-labels", "node1-pod1=app=client"]);
    apply(&lab, POLICY);
    eventually(
        "the policy to isolate node1-pod1",
        Duration::from_secs(30),
        || curl(&lab, "node1-pod1", "http://198.18.100.11/").is_none(),
    );
    lab
}

fn keeper_socket(lab: &TestLab) -> PathBuf {
    lab.node_dir("node1").join("dns-sockets.sock")
}

/// Pids of the DNS socket keeper of the lab's node1.
fn keepers(lab: &TestLab) -> Vec<u32> {
    processes_mentioning(keeper_socket(lab).to_str().unwrap())
}

/// Where the descriptors of process `pid` point (`socket:[…]`, paths).
fn descriptors(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits for one keeper holding its listener and the proxy's two sockets,
/// and nothing of the agent's; returns its pid.
fn keeper_holding_the_sockets(lab: &TestLab) -> u32 {
    let mut last = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let [pid] = keepers(lab)[..] {
            last = descriptors(pid);
            if last.iter().filter(|l| l.starts_with("socket:")).count() == 3 {
                for link in &last {
                    assert!(
                        link.starts_with("socket:")
                            || link == "/dev/null"
                            || link.ends_with("/node1/dns-keeper.log"),
                        "the keeper holds {link} (all: {last:?})"
                    );
                }
                return pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no keeper holding the DNS sockets (keepers {:?}, descriptors {last:?}); log:\n{}",
            keepers(lab),
            lab.log_tail("node1")
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// `dig +tries=1 +timeout=4 NAME` in node1-pod1, started in the background
/// (one query, no retry: answered within 4 s or not at all).
fn dig_in_background(lab: &TestLab, name: &str, extra: &[&str]) -> Child {
    Command::new(MESHWARD)
        .args(["lab", "--name", &lab.name, "exec", "node1-pod1", "--"])
        .args(["dig", "+tries=1", "+timeout=4"])
        .args(extra)
        .arg(name)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running dig")
}

/// dig's output once it ended (bounded), and when it ended.
fn finish(child: Child) -> (String, Instant) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut child = child;
    while child.try_wait().expect("waiting for dig").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("dig did not end within 20 s");
        }
        thread::sleep(Duration::from_millis(10));
    }
    let ended = Instant::now();
    let out = child.wait_with_output().expect("dig output");
    (
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        ended,
    )
}

fn answered(out: &str, address: &str) -> bool {
    out.contains("status: NOERROR") && out.lines().any(|l| l.ends_with(address))
}

/// dig's "Query time: N msec".
fn query_time(out: &str) -> Option<u64> {
    out.lines()
        .find_map(|l| l.split("Query time: ").nth(1))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Times of one query across a restart.
struct Took {
    /// From the stop (signal sent) to dig's end.
    from_stop: Duration,
    /// From `lab agent start` to dig's end.
    from_start: Duration,
}

impl std::fmt::Display for Took {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "answered {} ms after the stop, {} ms after the new agent was started",
            self.from_stop.as_millis(),
            self.from_start.as_millis()
        )
    }
}

/// Stops node1's agent (`--kill`: SIGKILL), sends a query (`dig` with
/// `extra` arguments) while it is down, starts the agent again; returns
/// dig's output and the times.
fn query_across_restart(lab: &TestLab, kill: bool, name: &str, extra: &[&str]) -> (String, Took) {
    let stopped = Instant::now();
    if kill {
        lab.ok(&["agent", "stop", "node1", "--kill"]);
    } else {
        lab.ok(&["agent", "stop", "node1"]);
    }
    let dig = dig_in_background(lab, name, extra);
    // the query leaves while no agent runs
    thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    lab.ok(&["agent", "start", "node1"]);
    let (out, ended) = finish(dig);
    let took = Took {
        from_stop: ended - stopped,
        from_start: ended - started,
    };
    (out, took)
}

#[test]
fn queries_sent_while_the_agent_is_down_are_answered_by_the_next_one() {
    let lab = isolated_lab("dk");
    // the keeper holds its listener and the proxy's two sockets, and none
    // of the agent's files (lock, TUN, log, netlink sockets)
    let keeper = vec![keeper_holding_the_sockets(&lab)];
    let mode = std::fs::metadata(keeper_socket(&lab)).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    // nothing learned yet: the address is not admitted
    assert!(curl(&lab, "node1-pod1", "http://198.18.100.10/").is_none());

    // kill -9: the query waits in the keeper's socket
    let (out, took) = query_across_restart(&lab, true, "api.example.test", &[]);
    assert!(
        answered(&out, "198.18.100.10"),
        "no answer after kill -9: {out}\nagent log:\n{}",
        lab.log_tail("node1")
    );
    eprintln!(
        "kill -9, UDP: {took} (dig's query time {} ms)",
        query_time(&out).map_or("?".into(), |t| t.to_string())
    );
    // the answer was learned before it was released: the address is admitted
    assert_eq!(
        curl(&lab, "node1-pod1", "http://198.18.100.10/").as_deref(),
        Some("hello from 198.18.100.10\n")
    );
    assert_eq!(keepers(&lab), keeper, "the keeper was replaced");
    assert!(lab
        .log_tail("node1")
        .contains("DNS proxy sockets taken over from the keeper"));

    // SIGTERM: the same
    assert!(curl(&lab, "node1-pod1", "http://198.18.100.15/").is_none());
    let (out, took) = query_across_restart(&lab, false, "a.svc.example.test", &[]);
    assert!(
        answered(&out, "198.18.100.15"),
        "no answer after SIGTERM: {out}\nagent log:\n{}",
        lab.log_tail("node1")
    );
    eprintln!(
        "SIGTERM, UDP: {took} (dig's query time {} ms)",
        query_time(&out).map_or("?".into(), |t| t.to_string())
    );

    // over TCP: the connection waits in the listener's accept backlog
    let (out, took) = query_across_restart(&lab, true, "b.c.svc.example.test", &["+tcp"]);
    assert!(
        answered(&out, "198.18.100.16"),
        "no TCP answer after kill -9: {out}\nagent log:\n{}",
        lab.log_tail("node1")
    );
    eprintln!("kill -9, TCP: {took}");
    assert_eq!(
        curl(&lab, "node1-pod1", "http://198.18.100.15/").as_deref(),
        Some("hello from 198.18.100.15\n")
    );

    // dnsProxyPort changes while the agent is down: the query that waited
    // on the old port (in the keeper's sockets) is answered by the next
    // agent, which binds new sockets, drains the old ones and hands the
    // new ones to the keeper; a kill -9 after that is covered on the new
    // port
    lab.ok(&["agent", "stop", "node1", "--kill"]);
    let config = lab.agent_config("node1");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}dnsProxyPort: 10054\n")).unwrap();
    let dig = dig_in_background(&lab, "api.example.test", &[]);
    thread::sleep(Duration::from_millis(500));
    lab.ok(&["agent", "start", "node1"]);
    let (out, _) = finish(dig);
    assert!(
        answered(&out, "198.18.100.10"),
        "the query queued on the old port got no answer: {out}\nagent log:\n{}",
        lab.log_tail("node1")
    );
    assert!(lab
        .log_tail("node1")
        .contains("answered the DNS queries queued on the old port"));
    eventually(
        "the keeper to hold the sockets on the new port",
        Duration::from_secs(20),
        || {
            lab.log_tail("node1")
                .contains("DNS proxy sockets handed to the keeper")
        },
    );
    assert!(lab.log_tail("node1").contains("dnsProxyPort changed"));
    assert!(curl(&lab, "node1-pod1", "http://198.18.100.12/").is_none());
    let (out, took) = query_across_restart(&lab, true, "multi.example.test", &[]);
    assert!(
        out.contains("status: NOERROR") && out.contains("198.18.100.12"),
        "no answer after kill -9 on the new port: {out}\nagent log:\n{}",
        lab.log_tail("node1")
    );
    eprintln!("kill -9 after a dnsProxyPort change, UDP: {took}");
    assert_eq!(
        curl(&lab, "node1-pod1", "http://198.18.100.12/").as_deref(),
        Some("hello from 198.18.100.12\n")
    );
    assert_eq!(keepers(&lab), keeper, "the keeper was replaced");

    // a keeper killed while the agent runs is replaced within seconds and
    // gets the sockets again
    let killed = keeper[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(killed as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("a new keeper", Duration::from_secs(20), || {
        keepers(&lab).first().is_some_and(|p| *p != killed)
    });
    keeper_holding_the_sockets(&lab);
    let (out, took) = query_across_restart(&lab, true, "api.example.test", &[]);
    assert!(
        answered(&out, "198.18.100.10"),
        "no answer with the replacement keeper: {out}\nagent log:\n{}",
        lab.log_tail("node1")
    );
    eprintln!("kill -9 with a replacement keeper, UDP: {took}");

    // lab down stops the keeper with everything else
    let socket = keeper_socket(&lab);
    lab.ok(&["down"]);
    assert!(keepers(&lab).is_empty(), "the keeper outlived lab down");
    assert!(!socket.exists());
}

#[test]
fn without_the_keeper_queries_sent_while_the_agent_is_down_are_lost() {
    let lab = isolated_lab("dn");
    eventually(
        "the DNS socket keeper to run",
        Duration::from_secs(20),
        || keepers(&lab).len() == 1,
    );
    // dnsSocketKeeper: off — the next agent takes the sockets and stops it
    let config = lab.agent_config("node1");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}dnsSocketKeeper: off\n")).unwrap();
    lab.ok(&["agent", "restart", "node1"]);
    eventually("the keeper to stop", Duration::from_secs(20), || {
        keepers(&lab).is_empty()
    });
    assert!(lab.log_tail("node1").contains("dnsSocketKeeper is off"));
    // DNS works while the agent runs
    let out = lab.ok(&[
        "exec",
        "node1-pod1",
        "dig",
        "+tries=1",
        "+timeout=4",
        "other.example.test",
    ]);
    assert!(answered(&out, "198.18.100.11"), "{out}");

    let (out, took) = query_across_restart(&lab, true, "api.example.test", &[]);
    assert!(
        !out.contains("status: NOERROR"),
        "answered without a keeper: {out}"
    );
    eprintln!(
        "without a keeper: dig gave up {} ms after the kill: {}",
        took.from_stop.as_millis(),
        out.lines()
            .find(|l| l.contains("timed out") || l.contains("refused") || l.contains("reached"))
            .unwrap_or("(no reason printed)")
    );
    // the new agent serves again
    eventually("DNS after the restart", Duration::from_secs(20), || {
        answered(
            &lab.ok(&[
                "exec",
                "node1-pod1",
                "dig",
                "+tries=1",
                "+timeout=2",
                "api.example.test",
            ]),
            "198.18.100.10",
        )
    });
    assert!(keepers(&lab).is_empty());
}

/// A process of this test, killed on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `dnsSocketKeeper: external` (the chart's setup): the agent starts no
/// keeper but hands its sockets to `meshward dns-keeper --state-dir`, run
/// by someone else, and takes them back after a kill -9.
#[test]
fn an_external_keeper_holds_the_sockets_across_a_kill() {
    let lab = TestLab::new("de");
    lab.up_with(
        1,
        1,
        &["--pod-labels", "node1-pod1=app=client", "--no-agents"],
    );
    let config = lab.agent_config("node1");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}dnsSocketKeeper: external\n")).unwrap();
    let log = std::fs::File::create(lab.node_dir("node1").join("external-keeper.log")).unwrap();
    let mut keeper = Guard(
        Command::new(MESHWARD)
            .args(["dns-keeper", "--state-dir"])
            .arg(lab.node_dir("node1"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting meshward dns-keeper"),
    );
    lab.ok(&["agent", "start", "node1"]);
    apply(&lab, POLICY);
    eventually(
        "the policy to isolate node1-pod1",
        Duration::from_secs(30),
        || curl(&lab, "node1-pod1", "http://198.18.100.11/").is_none(),
    );
    eventually(
        "the agent to hand its sockets to the external keeper",
        Duration::from_secs(20),
        || {
            lab.log_tail("node1")
                .contains("DNS proxy sockets handed to the keeper")
        },
    );
    // the agent started no keeper of its own
    assert!(keepers(&lab).is_empty());

    let (out, took) = query_across_restart(&lab, true, "api.example.test", &[]);
    assert!(
        answered(&out, "198.18.100.10"),
        "no answer after kill -9 with an external keeper: {out}\nagent log:\n{}",
        lab.log_tail("node1")
    );
    eprintln!("kill -9 with an external keeper, UDP: {took}");
    assert_eq!(
        curl(&lab, "node1-pod1", "http://198.18.100.10/").as_deref(),
        Some("hello from 198.18.100.10\n")
    );
    assert!(keeper.0.try_wait().unwrap().is_none(), "the keeper exited");

    // SIGTERM ends the keeper at once, exit status 0 (by a handler, which
    // is what also lets it exit as a container's PID 1)
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(keeper.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = keeper.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the keeper ignored SIGTERM");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}
