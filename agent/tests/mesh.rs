//! The encrypted mesh end to end: real `meshward agent`s in lab nodes,
//! real pods, real traffic, and a capture on the fabric bridge. Every lab is
//! torn down by a drop guard, also on failure.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::process::Command;

use common::*;
use serde_json::Value;

const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;
const MARKER: &[u8] = b"MESHWARD-PLAINTEXT-MARKER";

/// Echo servers (TCP and UDP) in a set of pods, stopped on drop.
struct EchoServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServers {
    fn start(lab: &TestLab, pods: &[String]) -> EchoServers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for pod in pods {
            let (tcp, udp) = in_ns(&lab.ns(pod), || {
                let tcp = TcpListener::bind(("0.0.0.0", TCP_PORT)).expect("tcp bind");
                let udp = UdpSocket::bind(("0.0.0.0", UDP_PORT)).expect("udp bind");
                (tcp, udp)
            });
            tcp.set_nonblocking(true).unwrap();
            udp.set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            let s = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !s.load(Ordering::Relaxed) {
                    if let Ok((mut conn, _)) = tcp.accept() {
                        conn.set_nonblocking(false).unwrap();
                        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        if let Ok(n) = conn.read(&mut buf) {
                            let _ = conn.write_all(&buf[..n]);
                        }
                    }
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(&buf[..n], from);
                    }
                }
            }));
        }
        EchoServers { stop, threads }
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn tcp_echo(to: Ipv4Addr, message: &str) -> Result<String, String> {
    let addr = SocketAddr::from((to, TCP_PORT));
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    conn.write_all(message.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; message.len()];
    conn.read_exact(&mut buf)
        .map_err(|e| format!("read: {e}"))?;
    Ok(String::from_utf8_lossy(&buf).to_string())
}

fn udp_echo(to: Ipv4Addr, message: &str) -> Result<String, String> {
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 2048];
    for _ in 0..3 {
        sock.send_to(message.as_bytes(), (to, UDP_PORT))
            .map_err(|e| format!("send: {e}"))?;
        if let Ok(n) = sock.recv(&mut buf) {
            return Ok(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    Err(format!("no UDP echo from {to} in 3 tries"))
}

/// Every pod name of a `nodes` x `pods` lab.
fn pods(nodes: u8, pods: u8) -> Vec<String> {
    (1..=nodes)
        .flat_map(|n| (1..=pods).map(move |p| format!("node{n}-pod{p}")))
        .collect()
}

fn node_of(pod: &str) -> &str {
    pod.split('-').next().unwrap()
}

fn drops(status: &Value, reason: &str) -> u64 {
    status["drops"][reason].as_u64().unwrap_or(0)
}

fn peers_up(status: &Value) -> usize {
    status["peers"]
        .as_array()
        .map(|p| p.iter().filter(|p| p["sessionUp"] == true).count())
        .unwrap_or(0)
}

fn peer_names(status: &Value) -> Vec<String> {
    status["peers"]
        .as_array()
        .map(|p| {
            p.iter()
                .map(|p| p["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_pod_reaches_every_pod_on_other_nodes_with_icmp_tcp_and_udp() {
    let lab = TestLab::new("mx");
    lab.up(3, 2);
    let all = pods(3, 2);
    let _servers = EchoServers::start(&lab, &all);
    let mut failures = Vec::new();
    for from in &all {
        for to in all.iter().filter(|to| node_of(to) != node_of(from)) {
            let ip = lab.addr(to);
            if !lab.reaches(from, &ip.to_string()) {
                failures.push(format!("ICMP {from} -> {to}"));
            }
            let message = format!("hello {to}, {from} here");
            let m = message.clone();
            match in_ns(&lab.ns(from), move || tcp_echo(ip, &m)) {
                Ok(echo) if echo == message => {}
                other => failures.push(format!("TCP {from} -> {to}: {other:?}")),
            }
            let m = message.clone();
            match in_ns(&lab.ns(from), move || udp_echo(ip, &m)) {
                Ok(echo) if echo == message => {}
                other => failures.push(format!("UDP {from} -> {to}: {other:?}")),
            }
        }
    }
    assert!(failures.is_empty(), "failed: {failures:#?}");
    // and the nodes themselves reach remote pods (from their mw0 address)
    assert!(lab.reaches("node1", &lab.ip("node3-pod2")));
    for node in ["node1", "node2", "node3"] {
        let status = lab.agent_status(node);
        assert_eq!(peers_up(&status), 2, "{node}: {status:#}");
        assert_eq!(drops(&status, "cryptokey_routing"), 0, "{node}: {status:#}");
        let data_plane = &status["dataPlane"];
        assert!(
            data_plane["udpDatagramsSent"].as_u64().unwrap() > 0
                && data_plane["tunPacketsWritten"].as_u64().unwrap() > 0,
            "{node}: {status:#}"
        );
    }
}

/// UDP datagrams carrying [`MARKER`] from every pod to every pod on other
/// nodes, every 20 ms, until stopped; counts what arrives.
struct MarkerTraffic {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl MarkerTraffic {
    fn start(lab: &TestLab, all: &[String]) -> MarkerTraffic {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for from in all {
            let targets: Vec<Ipv4Addr> = all
                .iter()
                .filter(|to| node_of(to) != node_of(from))
                .map(|to| lab.addr(to))
                .collect();
            let sock = in_ns(&lab.ns(from), || {
                UdpSocket::bind(("0.0.0.0", UDP_PORT)).expect("bind")
            });
            sock.set_read_timeout(Some(Duration::from_millis(5)))
                .unwrap();
            let (s, r) = (stop.clone(), received.clone());
            threads.push(std::thread::spawn(move || {
                let mut payload = MARKER.to_vec();
                payload.extend_from_slice(&[0u8; 64]);
                let mut buf = [0u8; 2048];
                let mut next = Instant::now();
                while !s.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        for t in &targets {
                            let _ = sock.send_to(&payload, (*t, UDP_PORT));
                        }
                        next += Duration::from_millis(20);
                    }
                    if let Ok(n) = sock.recv(&mut buf) {
                        if buf[..n].starts_with(MARKER) {
                            r.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        MarkerTraffic {
            stop,
            received,
            threads,
        }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.received()
    }
}

impl Drop for MarkerTraffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Waits until marker datagrams keep arriving (the mesh carries traffic).
fn wait_flowing(traffic: &MarkerTraffic, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let before = traffic.received();
    while traffic.received() < before + 50 {
        assert!(
            Instant::now() < deadline,
            "traffic did not flow again after {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_all_meshed(lab: &TestLab, nodes: &[&str], what: &str) {
    for node in nodes {
        lab.wait_status(node, what, Duration::from_secs(30), |s| {
            peers_up(s) == nodes.len() - 1
        });
    }
}

#[test]
fn the_fabric_only_ever_carries_wireguard() {
    let lab = TestLab::new("cap");
    lab.up_with(3, 2, &["--no-agents"]);
    let nodes = ["node1", "node2", "node3"];
    let all = pods(3, 2);
    let dir = meshward_testkit::TempDir::new();
    let capture = Capture::start(&lab, &dir.join("br0.pcap"));
    // pods send before any agent runs: refused, never in the clear
    let traffic = MarkerTraffic::start(&lab, &all);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        traffic.received(),
        0,
        "pod traffic crossed without the mesh"
    );

    // the agents' first start (new keys, first handshakes), then steady state
    lab.ok(&["agent", "start"]);
    wait_flowing(&traffic, "the agents started");
    std::thread::sleep(Duration::from_secs(1));

    // an agent stopped (SIGTERM) and started again
    lab.ok(&["agent", "stop", "node2"]);
    std::thread::sleep(Duration::from_secs(1));
    lab.ok(&["agent", "start", "node2"]);
    wait_all_meshed(&lab, &nodes, "the mesh after node2's agent started");
    wait_flowing(&traffic, "node2's agent started");

    // an agent killed with SIGKILL and restarted
    lab.ok(&["agent", "stop", "--kill", "node3"]);
    std::thread::sleep(Duration::from_secs(1));
    lab.ok(&["agent", "start", "node3"]);
    wait_all_meshed(&lab, &nodes, "the mesh after node3's agent restarted");
    wait_flowing(&traffic, "node3's agent restarted");

    // a peer removed from the datastore, then restored
    let manifest = lab.manifest("node2");
    let saved = std::fs::read(&manifest).unwrap();
    std::fs::remove_file(&manifest).unwrap();
    for node in ["node1", "node3"] {
        lab.wait_status(node, "node2 removed", Duration::from_secs(10), |s| {
            !peer_names(s).contains(&"node2".to_string())
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    std::fs::write(&manifest, &saved).unwrap();
    wait_all_meshed(&lab, &nodes, "the mesh after node2 came back");
    wait_flowing(&traffic, "node2 came back");

    // key rotation
    let config = lab.agent_config("node1");
    lab.meshward(&[
        "keys",
        "rotate",
        "--config",
        config.to_str().unwrap(),
        "--wait",
        "--timeout",
        "90",
    ]);
    wait_flowing(&traffic, "the key rotation");
    std::thread::sleep(Duration::from_secs(1));

    let delivered = traffic.stop();
    let frames = capture.stop();
    let underlay = classify(&frames, MARKER);
    eprintln!(
        "{} frames: {} WireGuard, {} ICMP about WireGuard, {} ARP, {} IPv6 link-local; {delivered} datagrams delivered",
        frames.len(),
        underlay.wireguard,
        underlay.icmp_about_wireguard,
        underlay.arp,
        underlay.ipv6_link_local
    );
    assert!(
        underlay.violations.is_empty(),
        "{} frames not WireGuard on the fabric (of {}): {:#?}",
        underlay.violations.len(),
        frames.len(),
        &underlay.violations[..underlay.violations.len().min(20)]
    );
    assert!(
        delivered > 1000,
        "only {delivered} marker datagrams arrived"
    );
    // (UDP GSO may carry several datagrams in one captured frame)
    assert!(
        underlay.wireguard > 1000,
        "only {} WireGuard frames for {delivered} delivered datagrams: was the capture on?",
        underlay.wireguard
    );
}

/// The capture check itself: a pod address or the marker in a frame is
/// caught, WireGuard is not.
#[test]
fn the_capture_check_catches_plaintext() {
    let frame = |src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]| {
        let mut f = vec![0u8; 14];
        f[12] = 0x08;
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        ip.extend(src);
        ip.extend(dst);
        f.extend(ip);
        f.extend(sport.to_be_bytes());
        f.extend(dport.to_be_bytes());
        f.extend([0, 0, 0, 0]);
        f.extend(payload);
        f
    };
    let wg = frame(
        [198, 18, 0, 1],
        [198, 18, 0, 2],
        MESH_PORT,
        MESH_PORT,
        &[4, 0, 0, 0],
    );
    let clear = frame([198, 19, 1, 2], [198, 19, 2, 2], 40000, UDP_PORT, b"x");
    let marked = frame(
        [198, 18, 0, 1],
        [198, 18, 0, 2],
        MESH_PORT,
        MESH_PORT,
        MARKER,
    );
    let other = frame([198, 18, 0, 1], [198, 18, 0, 2], 53, 53, b"");
    let u = classify(&[wg.clone(), wg], MARKER);
    assert_eq!((u.wireguard, u.violations.len()), (2, 0));
    let u = classify(&[clear, marked, other], MARKER);
    assert_eq!(u.wireguard, 0);
    assert_eq!(u.violations.len(), 3, "{:?}", u.violations);
    assert!(u.violations[0].contains("pod address in the clear"));
    assert!(u.violations[1].contains("marker"));
}

/// Sends one UDP packet from a raw socket (we write the IPv4 header) in the
/// calling thread's namespace.
fn send_raw_udp(src: Ipv4Addr, dst: Ipv4Addr, port: u16, payload: &[u8]) -> std::io::Result<()> {
    let len = 20 + 8 + payload.len();
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&port.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    // SAFETY: plain socket calls on a descriptor we own and close.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        let n = libc::sendto(
            fd,
            p.as_ptr().cast(),
            p.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if n < 0 {
            return Err(err);
        }
    }
    Ok(())
}

fn checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn a_packet_with_another_nodes_pod_address_is_dropped_and_counted() {
    let lab = TestLab::new("frg");
    lab.up(3, 1);
    let target = lab.addr("node1-pod1");
    // A receiver in node1-pod1 that records the sources of what arrives.
    let seen = Arc::new(Mutex::new(Vec::<Ipv4Addr>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (s, st) = (seen.clone(), stop.clone());
    let sock = in_ns(&lab.ns("node1-pod1"), || {
        UdpSocket::bind(("0.0.0.0", UDP_PORT)).unwrap()
    });
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !st.load(Ordering::Relaxed) {
            if let Ok((_, SocketAddr::V4(from))) = sock.recv_from(&mut buf) {
                s.lock().unwrap().push(*from.ip());
            }
        }
    });
    let before = drops(&lab.agent_status("node1"), "cryptokey_routing");

    // node2 sends through its tunnel, once as itself (198.19.2.1), then
    // pretending to be a pod of node3 (198.19.3.77) and of node1 itself.
    let legit: Ipv4Addr = "198.19.2.1".parse().unwrap();
    let forged: [Ipv4Addr; 2] = [
        "198.19.3.77".parse().unwrap(),
        "198.19.1.77".parse().unwrap(),
    ];
    in_ns(&lab.ns("node2"), move || {
        for _ in 0..5 {
            send_raw_udp(legit, target, UDP_PORT, b"legit").unwrap();
            for src in forged {
                send_raw_udp(src, target, UDP_PORT, b"forged").unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let status = lab.wait_status(
        "node1",
        "forged packets counted",
        Duration::from_secs(5),
        |s| drops(s, "cryptokey_routing") >= before + 10,
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    receiver.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.contains(&legit),
        "the legitimate packets did not arrive: {seen:?}"
    );
    assert!(
        seen.iter().all(|s| *s == legit),
        "a forged packet was delivered: {seen:?}"
    );
    assert_eq!(
        drops(&status, "cryptokey_routing"),
        before + 10,
        "{status:#}"
    );
    // the readable status shows it too
    let text = lab.meshward(&[
        "status",
        "--config",
        lab.agent_config("node1").to_str().unwrap(),
    ]);
    assert!(text.contains("cryptokey_routing 10"), "{text}");
}

#[test]
fn garbage_datagrams_to_the_mesh_port_do_not_break_traffic() {
    let lab = TestLab::new("gb");
    lab.up(2, 1);
    let before = lab.agent_status("node1");
    let pinger = lab.pinger("node2-pod1", &lab.ip("node1-pod1"), "0.05", 80);
    let mut senders = Vec::new();
    for member in ["external", "node2"] {
        let sock = in_ns(&lab.ns(member), || UdpSocket::bind("0.0.0.0:0").unwrap());
        senders.push(std::thread::spawn(move || {
            let mut rng = 0x2545_f491_4f6c_dd1du64;
            let mut next = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            for i in 0..3000u32 {
                let len = (next() % 300) as usize;
                let mut d: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                // every other one looks like a WireGuard message of each type
                if i % 2 == 0 && len >= 4 {
                    d[0] = 1 + (i / 2 % 4) as u8;
                    d[1..4].fill(0);
                    if d[0] == 1 {
                        d.resize(148, 0xaa);
                    }
                }
                let _ = sock.send_to(&d, ("198.18.0.1", MESH_PORT));
                if i % 100 == 0 {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }));
    }
    for s in senders {
        s.join().unwrap();
    }
    let (tx, rx) = pinger.finish(Duration::from_secs(30));
    assert_eq!((tx, rx), (80, 80), "pings lost while garbage arrived");
    let after = lab.agent_status("node1");
    let total = |s: &Value| -> u64 {
        s["drops"]
            .as_object()
            .map(|d| d.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0)
    };
    assert!(
        total(&after) >= total(&before) + 5000,
        "garbage not counted as drops: {after:#}"
    );
    assert_eq!(peers_up(&after), 1);
    assert!(lab.reaches("node1-pod1", &lab.ip("node2-pod1")));
}

#[test]
fn key_rotation_under_a_continuous_flow_loses_nothing() {
    let lab = TestLab::new("rot");
    lab.up(3, 2);
    let node1 = lab.agent_status("node1");
    let old_key = node1["publicKey"].as_str().unwrap().to_string();

    // 20 pings/s node1-pod1 -> node2-pod1, and a numbered UDP stream of
    // 200 datagrams/s node3-pod1 -> node1-pod2, for 6 s each
    let pinger = lab.pinger("node1-pod1", &lab.ip("node2-pod1"), "0.05", 120);
    let dst = lab.addr("node1-pod2");
    let got = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (g, st) = (got.clone(), stop.clone());
    let sock = in_ns(&lab.ns("node1-pod2"), || {
        UdpSocket::bind(("0.0.0.0", UDP_PORT)).unwrap()
    });
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !st.load(Ordering::Relaxed) {
            if let Ok(n) = sock.recv(&mut buf) {
                if n == 4 {
                    g.lock()
                        .unwrap()
                        .insert(u32::from_be_bytes(buf[..4].try_into().unwrap()));
                }
            }
        }
    });
    const SENT: u32 = 1200;
    let sock = in_ns(&lab.ns("node3-pod1"), || {
        UdpSocket::bind("0.0.0.0:0").unwrap()
    });
    let sender = std::thread::spawn(move || {
        let start = Instant::now();
        for seq in 0..SENT {
            let due = start + Duration::from_millis(5) * seq;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            sock.send_to(&seq.to_be_bytes(), (dst, UDP_PORT)).unwrap();
        }
    });

    std::thread::sleep(Duration::from_millis(1500));
    let config = lab.agent_config("node1");
    let new_key = lab
        .meshward(&["keys", "rotate", "--config", config.to_str().unwrap()])
        .trim()
        .to_string();
    assert_ne!(new_key, old_key);

    sender.join().unwrap();
    let (tx, rx) = pinger.finish(Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    receiver.join().unwrap();
    let got = got.lock().unwrap();
    let missing: Vec<u32> = (0..SENT).filter(|s| !got.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "{} datagrams lost: {missing:?}",
        missing.len()
    );
    assert_eq!((tx, rx), (120, 120), "pings lost during the rotation");

    // the new key is published, used by the peers, shown by `keys show`;
    // the old one is forgotten once no session needs it
    let shown = lab.meshward(&["keys", "show", "--config", config.to_str().unwrap()]);
    assert_eq!(shown.trim(), new_key);
    let manifest = std::fs::read_to_string(lab.manifest("node1")).unwrap();
    assert!(manifest.contains(&new_key), "{manifest}");
    for node in ["node2", "node3"] {
        lab.wait_status(node, "node1's new key", Duration::from_secs(10), |s| {
            s["peers"].as_array().unwrap().iter().any(|p| {
                p["name"] == "node1" && p["publicKey"] == new_key.as_str() && p["sessionUp"] == true
            })
        });
    }
    lab.wait_status(
        "node1",
        "the rotation to complete",
        Duration::from_secs(90),
        |s| s["previousPublicKey"].is_null(),
    );
    assert!(!lab.node_dir("node1").join("key.previous").exists());
}

#[test]
fn a_tcp_stream_survives_kill_9_and_restart_of_both_agents() {
    let lab = TestLab::new("tcp");
    lab.up(2, 1);
    let server_ip = lab.addr("node2-pod1");
    let received = Arc::new(AtomicU64::new(0));
    let r = received.clone();
    let listener = in_ns(&lab.ns("node2-pod1"), || {
        TcpListener::bind(("0.0.0.0", TCP_PORT)).expect("bind")
    });
    let mut conn = in_ns(&lab.ns("node1-pod1"), || {
        TcpStream::connect_timeout(
            &SocketAddr::from((server_ip, TCP_PORT)),
            Duration::from_secs(5),
        )
        .expect("connect")
    });
    let (mut accepted, _) = listener.accept().expect("accept");
    // The server checks that the bytes are the counter sequence, in order.
    let server = std::thread::spawn(move || -> Result<u64, String> {
        accepted
            .set_read_timeout(Some(Duration::from_secs(40)))
            .unwrap();
        let mut expected = 0u32;
        let mut buf = vec![0u8; 65536];
        let mut pending = Vec::new();
        loop {
            let n = accepted
                .read(&mut buf)
                .map_err(|e| format!("server read: {e}"))?;
            if n == 0 {
                return Ok(u64::from(expected));
            }
            pending.extend_from_slice(&buf[..n]);
            let whole = pending.len() / 4 * 4;
            for chunk in pending[..whole].chunks(4) {
                let v = u32::from_be_bytes(chunk.try_into().unwrap());
                if v != expected {
                    return Err(format!("got {v}, expected {expected}"));
                }
                expected += 1;
            }
            pending.drain(..whole);
            r.store(u64::from(expected), Ordering::Relaxed);
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let client = std::thread::spawn(move || -> Result<u32, String> {
        conn.set_write_timeout(Some(Duration::from_secs(40)))
            .unwrap();
        let mut next = 0u32;
        while !st.load(Ordering::Relaxed) {
            let chunk: Vec<u8> = (next..next + 256).flat_map(u32::to_be_bytes).collect();
            conn.write_all(&chunk)
                .map_err(|e| format!("client write: {e}"))?;
            next += 256;
            std::thread::sleep(Duration::from_millis(5));
        }
        conn.shutdown(std::net::Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
        Ok(next)
    });

    let progress = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        let start = received.load(Ordering::Relaxed);
        while received.load(Ordering::Relaxed) < start + 10_000 {
            assert!(Instant::now() < deadline, "the stream stalled after {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    progress("the start");
    for node in ["node1", "node2"] {
        lab.ok(&["agent", "restart", "--kill", node]);
        progress(&format!("kill -9 of {node}'s agent"));
    }
    stop.store(true, Ordering::Relaxed);
    let sent = client.join().unwrap().expect("client");
    let got = server.join().unwrap().expect("server");
    assert_eq!(got, u64::from(sent), "bytes lost");
}

#[test]
fn restart_keeps_the_key_and_stop_keeps_strict_mode() {
    let lab = TestLab::new("rs");
    lab.up(2, 1);
    let before = lab.agent_status("node1");
    let key = before["publicKey"].as_str().unwrap().to_string();
    let cache = lab.node_dir("node1").join("peers.json");
    let cached: Value = serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    assert_eq!(
        cached["peers"]["node2"]["publicKey"],
        before["peers"][0]["publicKey"]
    );

    // SIGTERM: the tunnel and its routes go, strict mode stays, traffic fails closed
    lab.ok(&["agent", "stop", "node1"]);
    let table = lab.ok(&[
        "exec", "node1", "--", "nft", "list", "table", "inet", "meshward",
    ]);
    assert!(table.contains("strict_forward"), "{table}");
    let routes = lab.ok(&["exec", "node1", "--", "ip", "route"]);
    assert!(
        !routes
            .lines()
            .any(|l| l.split_whitespace().any(|w| w == "mw0")),
        "{routes}"
    );
    assert!(!lab.ping_once("node1-pod1", &lab.ip("node2-pod1")));
    assert!(!lab.node_dir("node1").join("agent.sock").exists());

    // start again: the same key, and sessions at once
    lab.ok(&["agent", "start", "node1"]);
    let after = lab.agent_status("node1");
    // a second agent for the same node refuses to start
    let config = lab.agent_config("node1");
    let second = lab.run(&[
        "exec",
        "node1",
        "--",
        MESHWARD,
        "agent",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("another meshward agent is running"),
        "{stderr}"
    );
    assert!(lab.reaches("node1-pod1", &lab.ip("node2-pod1")));
    assert_eq!(after["publicKey"], key.as_str());
    assert!(lab.reaches("node1-pod1", &lab.ip("node2-pod1")));
    let manifest = std::fs::read_to_string(lab.manifest("node1")).unwrap();
    assert!(manifest.contains(&key));

    // the CLI: keys show never prints the private key; status is readable
    let shown = lab.meshward(&["keys", "show", "--config", config.to_str().unwrap()]);
    assert_eq!(shown.trim(), key);
    let private = std::fs::read_to_string(lab.node_dir("node1").join("key")).unwrap();
    assert!(!shown.contains(private.trim()));
    let text = lab.meshward(&["status", "--config", config.to_str().unwrap()]);
    assert!(text.contains("peers         1 of 1 up"), "{text}");
    assert!(text.contains("198.19.2.0/24"), "{text}");
    assert!(!text.contains(private.trim()));

    // the lab's status shows the agents
    let status = lab.status();
    assert_eq!(member(&status, "node1")["agent"]["peersUp"], 1);
    assert_eq!(member(&status, "node1")["agent"]["state"], "running");
}

#[test]
fn peers_follow_the_datastore_and_bad_peer_data_is_refused() {
    let lab = TestLab::new("pr");
    lab.up(3, 1);
    let pod3 = lab.ip("node3-pod1");

    // node3 removed: node1 drops the peer and its route; traffic fails closed
    let manifest = lab.manifest("node3");
    let saved = std::fs::read(&manifest).unwrap();
    std::fs::remove_file(&manifest).unwrap();
    lab.wait_status("node1", "node3 removed", Duration::from_secs(10), |s| {
        peer_names(s) == ["node2"]
    });
    let routes = lab.ok(&["exec", "node1", "--", "ip", "route"]);
    assert!(!routes.contains("198.19.3.0/24"), "{routes}");
    assert!(!lab.ping_once("node1-pod1", &pod3));
    assert!(lab.reaches("node1-pod1", &lab.ip("node2-pod1")));

    // restored: back at once
    std::fs::write(&manifest, &saved).unwrap();
    lab.wait_status("node1", "node3 back", Duration::from_secs(20), |s| {
        peers_up(s) == 2
    });
    assert!(lab.reaches("node1-pod1", &pod3));

    // a new Node claiming node2's key, another claiming node1's pod range:
    // refused, named in the status, and nothing else changes
    let node2_key = lab.agent_status("node2")["publicKey"]
        .as_str()
        .unwrap()
        .to_string();
    let datastore = lab.state_dir().join("datastore");
    std::fs::write(
        datastore.join("node-node8.yaml"),
        node_manifest(
            "node8",
            "198.19.8.0/24",
            Some((&node2_key, "198.18.0.8:51871")),
        ),
    )
    .unwrap();
    let stranger = meshward_keys::NodeKey::generate().public().to_string();
    std::fs::write(
        datastore.join("node-node9.yaml"),
        node_manifest(
            "node9",
            "198.19.1.0/25",
            Some((&stranger, "198.18.0.9:51871")),
        ),
    )
    .unwrap();
    let status = lab.wait_status(
        "node1",
        "the problems reported",
        Duration::from_secs(10),
        |s| s["problems"].as_array().is_some_and(|p| p.len() == 2),
    );
    let problems = status["problems"].to_string();
    assert!(
        problems.contains("node node8") && problems.contains("same public key as node node2"),
        "{problems}"
    );
    assert!(
        problems.contains("node node9") && problems.contains("overlaps this node's own"),
        "{problems}"
    );
    assert_eq!(peer_names(&status), ["node2", "node3"]);
    assert_eq!(peers_up(&status), 2);
    assert!(lab.reaches("node1-pod1", &lab.ip("node2-pod1")));
    let log = std::fs::read_to_string(lab.node_dir("node1").join("agent.log")).unwrap();
    assert!(log.contains("bad peer data"), "{log}");
}

#[test]
fn an_overdue_scheduled_rotation_happens_soon_after_start() {
    let lab = TestLab::new("sch");
    lab.up(2, 1);
    let old = lab.agent_status("node1")["publicKey"]
        .as_str()
        .unwrap()
        .to_string();
    let config = lab.agent_config("node1");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("keyRotationInterval: 1h\n");
    std::fs::write(&config, text).unwrap();
    // the key is two hours old: the rotation is overdue
    let key = lab.node_dir("node1").join("key");
    let out = bounded(Command::new("touch").args(["-d", "2 hours ago"]).arg(&key));
    assert!(out.status.success());
    lab.ok(&["agent", "restart", "node1"]);
    let rotated = lab.wait_status(
        "node1",
        "the scheduled rotation",
        Duration::from_secs(40),
        |s| s["publicKey"] != old.as_str(),
    );
    let new = rotated["publicKey"].as_str().unwrap().to_string();
    lab.wait_status("node2", "node1's new key", Duration::from_secs(20), |s| {
        s["peers"][0]["publicKey"] == new.as_str() && s["peers"][0]["sessionUp"] == true
    });
    lab.wait_status(
        "node1",
        "the rotation to complete",
        Duration::from_secs(90),
        |s| s["previousPublicKey"].is_null(),
    );
    assert!(lab.reaches("node1-pod1", &lab.ip("node2-pod1")));
    let log = std::fs::read_to_string(lab.node_dir("node1").join("agent.log")).unwrap();
    assert!(log.contains("scheduled key rotation"), "{log}");
}

#[test]
fn lab_up_fails_with_the_agent_logs_when_the_mesh_does_not_form() {
    let lab = TestLab::new("lf");
    let stderr = lab.fails(&["up", "--nodes", "2", "--pods", "0", "--agent-timeout", "0"]);
    assert!(stderr.contains("did not form the mesh"), "{stderr}");
    assert!(
        stderr.contains("--- node1 (") && stderr.contains("agent.log"),
        "{stderr}"
    );
    // and the half-built lab was removed, agents included
    assert_eq!(lab.namespaces(), Vec::<String>::new());
}
