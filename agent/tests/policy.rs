//! End to end: policies applied to a lab (`lab apply`) and enforced by the
//! node agents (nftables, the transparent DNS proxy), checked with real
//! clients (dig, curl) in pods against the lab's dnsmasq and HTTP servers.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;

/// `dig` in a pod: (status, answers).
fn dig(lab: &TestLab, pod: &str, name: &str) -> (String, Vec<String>) {
    let out = lab.ok(&["exec", pod, "dig", "+time=2", "+tries=1", name]);
    let status = out
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or("").to_string())
        .unwrap_or_else(|| format!("no status in: {out}"));
    let short = lab.ok(&["exec", pod, "dig", "+short", "+time=2", "+tries=1", name]);
    (status, short.lines().map(String::from).collect())
}

const DNS_AND_API: &str = r#"
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
        dns: [{matchPattern: "**.example.test"}, {matchPattern: "*.fresh.test"}]
  - toFQDNs: [{matchName: api.example.test}, {matchPattern: "*.svc.example.test"}, {matchName: www.example.test}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}, {port: "7000", protocol: TCP}]
"#;

#[test]
fn fqdn_egress_allows_only_what_was_resolved_for_allowed_names() {
    let lab = TestLab::new("fq");
    lab.up_with(2, 2, &["--pod-labels", "node1-pod1=app=client"]);
    // before any policy: everything reachable (retried: the first
    // connection pays for neighbour resolution and the mesh's handshake,
    // which a loaded machine can stretch past curl's 1 s connect timeout)
    eventually(
        "node1-pod1 to reach 198.18.100.11 before any policy",
        Duration::from_secs(20),
        || curl(&lab, "node1-pod1", "http://198.18.100.11/").is_some(),
    );
    apply(&lab, "dns-and-api.yaml", DNS_AND_API);
    eventually(
        "the policy to isolate node1-pod1",
        Duration::from_secs(20),
        || curl(&lab, "node1-pod1", "http://198.18.100.11/").is_none(),
    );

    // an allowed name: resolved through the proxy, then reachable
    assert_eq!(
        curl(&lab, "node1-pod1", "http://api.example.test/").as_deref(),
        Some("hello from 198.18.100.10\n")
    );
    // a name the DNS rules allow but toFQDNs does not: resolves, unreachable
    let (status, answers) = dig(&lab, "node1-pod1", "other.example.test");
    assert_eq!(
        (status.as_str(), answers.as_slice()),
        ("NOERROR", &["198.18.100.11".to_string()][..])
    );
    assert!(curl(&lab, "node1-pod1", "http://other.example.test/").is_none());
    // a name outside the DNS rules: REFUSED by the proxy
    let (status, _) = dig(&lab, "node1-pod1", "edge.cdn.test");
    assert_eq!(status, "REFUSED");
    // `*.` matches exactly one label
    assert!(curl(&lab, "node1-pod1", "http://a.svc.example.test/").is_some());
    assert!(curl(&lab, "node1-pod1", "http://b.c.svc.example.test/").is_none());
    // a CNAME chain: the addresses count for the queried name
    assert_eq!(
        curl(&lab, "node1-pod1", "http://www.example.test/").as_deref(),
        Some("hello from 198.18.100.17\n")
    );
    // a port the rule does not name
    assert!(curl(&lab, "node1-pod1", "http://api.example.test:8080/").is_none());
    // unselected pods stay unrestricted, on this node and the other
    assert!(curl(&lab, "node1-pod2", "http://198.18.100.11/").is_some());
    assert!(curl(&lab, "node2-pod1", "http://198.18.100.11/").is_some());

    // `**.` matches one or more labels: after the change b.c.svc works
    apply(
        &lab,
        "dns-and-api.yaml",
        &DNS_AND_API.replace("\"*.svc.example.test\"", "\"**.svc.example.test\""),
    );
    eventually("the ** pattern to apply", Duration::from_secs(20), || {
        curl(&lab, "node1-pod1", "http://b.c.svc.example.test/").is_some()
    });
    assert!(curl(&lab, "node1-pod1", "http://a.svc.example.test/").is_some());

    // removing the policy lifts the isolation
    lab.ok(&[
        "delete",
        lab.state_dir()
            .join("test-manifests/dns-and-api.yaml")
            .to_str()
            .unwrap(),
    ]);
    eventually("isolation to end", Duration::from_secs(20), || {
        curl(&lab, "node1-pod1", "http://198.18.100.11/").is_some()
    });
}

#[test]
fn freshly_resolved_addresses_pass_on_the_first_packet() {
    let lab = TestLab::new("fr");
    lab.up_with(1, 1, &["--pod-labels", "node1-pod1=app=client"]);
    apply(
        &lab,
        "fresh.yaml",
        r#"
apiVersion: meshward.io/v1alpha1
kind: MeshNetworkPolicy
metadata: {name: fresh, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [198.18.100.53/32]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules: {dns: [{matchPattern: "*.fresh.test"}]}
  - toFQDNs: [{matchPattern: "*.fresh.test"}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#,
    );
    eventually(
        "the policy to isolate node1-pod1",
        Duration::from_secs(20),
        || curl(&lab, "node1-pod1", "http://198.18.100.11/").is_none(),
    );
    // 1000 names never resolved before, each connected to right after its
    // answer arrives. A dropped first SYN is retransmitted by the pod's
    // kernel, which counts it (TcpExt TCPSynRetrans of the pod's network
    // namespace): the count must not move. Timing plays no part, so a slow
    // machine cannot fail this; a drop cannot pass it.
    let before = syn_retransmissions(&lab, "node1-pod1");
    let script = "ok=0; fail=0; i=1; while [ $i -le 1000 ]; do \
        if curl -s -o /dev/null --connect-timeout 5 -m 10 http://n$i.fresh.test:8080/; \
        then ok=$((ok+1)); else fail=$((fail+1)); echo failed n$i >&2; fi; i=$((i+1)); done; \
        echo ok=$ok fail=$fail";
    let out = lab.ok(&["exec", "node1-pod1", "sh", "-c", script]);
    assert_eq!(out.trim(), "ok=1000 fail=0");
    let retransmitted = syn_retransmissions(&lab, "node1-pod1") - before;
    assert_eq!(
        retransmitted, 0,
        "SYNs retransmitted: first packets dropped"
    );
    // and the name never resolved is still dropped
    // n1000: learned last, so its TTL (60 s) outlasts a slow loop; n1's
    // may have run out by now on a loaded machine
    assert!(curl(&lab, "node1-pod1", "http://198.18.107.232:8080/").is_some());
    assert!(curl(&lab, "node1-pod1", "http://198.18.107.240:8080/").is_none()); // never asked
}

/// The pod's count of retransmitted SYNs (`/proc/net/netstat` is per
/// network namespace).
fn syn_retransmissions(lab: &TestLab, pod: &str) -> u64 {
    let text = lab.ok(&["exec", pod, "cat", "/proc/net/netstat"]);
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let column = names
        .split_whitespace()
        .position(|n| n == "TCPSynRetrans")
        .expect("TCPSynRetrans in /proc/net/netstat");
    values
        .split_whitespace()
        .nth(column)
        .unwrap()
        .parse()
        .unwrap()
}

/// An echo server on `addr` inside the external namespace.
fn echo_server(lab: &TestLab, addr: SocketAddr) -> Arc<AtomicBool> {
    let listener = in_ns(&lab.ns("external"), || TcpListener::bind(addr).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    listener.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    thread::spawn(move || {
                        let mut buf = [0u8; 256];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    stop
}

#[test]
fn agent_kill_and_restart_keeps_flows_and_learned_names() {
    let lab = TestLab::new("rs");
    lab.up_with(1, 1, &["--pod-labels", "node1-pod1=app=client"]);
    apply(&lab, "dns-and-api.yaml", DNS_AND_API);
    eventually(
        "the policy to isolate node1-pod1",
        Duration::from_secs(20),
        || curl(&lab, "node1-pod1", "http://198.18.100.11/").is_none(),
    );
    let stop = echo_server(&lab, "198.18.100.10:7000".parse().unwrap());
    let (status, answers) = dig(&lab, "node1-pod1", "api.example.test");
    assert_eq!((status.as_str(), answers.len()), ("NOERROR", 1));
    let mut stream = in_ns(&lab.ns("node1-pod1"), || {
        TcpStream::connect_timeout(
            &"198.18.100.10:7000".parse().unwrap(),
            Duration::from_secs(2),
        )
    })
    .expect("connecting to the learned address");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut roundtrip = |i: u32| {
        let msg = format!("ping {i}\n");
        stream.write_all(msg.as_bytes()).unwrap();
        let mut buf = vec![0u8; msg.len()];
        stream
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("echo {i}: {e}"));
        assert_eq!(buf, msg.as_bytes());
    };
    roundtrip(0);

    lab.ok(&["agent", "stop", "node1", "--kill"]);
    // while the agent is down: the established flow goes on, policy stays
    for i in 1..=10 {
        roundtrip(i);
        thread::sleep(Duration::from_millis(50));
    }
    assert!(curl(&lab, "node1-pod1", "http://198.18.100.11/").is_none());
    lab.ok(&["agent", "start", "node1"]);
    for i in 11..=20 {
        roundtrip(i);
        thread::sleep(Duration::from_millis(50));
    }
    // the learned name survived the restart: a new connection by address
    assert_eq!(
        curl(&lab, "node1-pod1", "http://198.18.100.10/").as_deref(),
        Some("hello from 198.18.100.10\n")
    );
    assert!(curl(&lab, "node1-pod1", "http://198.18.100.11/").is_none());
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn kubernetes_network_policy_isolates_ingress_across_nodes() {
    let lab = TestLab::new("np");
    lab.up_with(
        2,
        2,
        &[
            "--pod-labels",
            "node1-pod1=app=web",
            "--pod-labels",
            "node2-pod1=app=db",
        ],
    );
    // a server in node2-pod1 (busybox httpd daemonizes; lab down stops it)
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
    let db = lab.ip("node2-pod1");
    let db = db.trim().split('/').next().unwrap().to_string();
    let url = format!("http://{db}/hostname");
    eventually("the db server", Duration::from_secs(10), || {
        curl(&lab, "node1-pod2", &url).is_some()
    });
    apply(
        &lab,
        "db-ingress.yaml",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-web, namespace: default}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 80}]
"#,
    );
    eventually("db to be isolated", Duration::from_secs(20), || {
        curl(&lab, "node1-pod2", &url).is_none()
    });
    assert!(curl(&lab, "node1-pod1", &url).is_some(), "web may reach db");
    assert!(
        curl(&lab, "node2-pod2", &url).is_none(),
        "same-node pods are isolated too"
    );
    // the db's node may always reach it
    let out = lab.run(&[
        "exec",
        "node2",
        "curl",
        "-sS",
        "--connect-timeout",
        "1",
        &url,
    ]);
    assert!(out.status.success(), "the node reaches its pod");
    // relabelling node1-pod2 as web lets it in
    apply(
        &lab,
        "relabel.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: node1-pod2, labels: {app: web}}\n",
    );
    eventually("node1-pod2 to be admitted", Duration::from_secs(20), || {
        curl(&lab, "node1-pod2", &url).is_some()
    });
}
