//! A node namespace forwarding between pod namespaces (wired as meshward's
//! CNI does: host veth without an IPv4 address, proxy ARP, the pod's
//! gateway 169.254.1.1 a permanent neighbour) and an "external" namespace;
//! plus small TCP/UDP clients and servers run inside namespaces.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use meshward_egress::{PolicyState, TABLE};
use meshward_policy::{
    Allow, DirectionRules, DnsRules, EndpointRules, NodeRules, PodRef, PolicyKind, PolicyRef,
    PortMatch,
};
use meshward_testkit::{veth, Netns};

pub const EXT: &str = "198.18.100.1";
pub const EXT2: &str = "198.18.100.2";

pub struct Lab {
    pub node: Netns,
    pub ext: Netns,
    pub pods: Vec<(Netns, String)>,
}

impl Lab {
    /// `pods`: their IPv4 addresses (198.19.1.x).
    pub fn new(pods: &[&str]) -> Lab {
        let node = Netns::new("n");
        let ext = Netns::new("e");
        node.must(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        veth(
            &node,
            "ext0",
            "198.18.100.254/24",
            &ext,
            "eth0",
            &format!("{EXT}/24"),
        );
        ext.ip(&["addr", "add", &format!("{EXT2}/24"), "dev", "eth0"]);
        ext.ip(&["route", "add", "default", "via", "198.18.100.254"]);
        let mut out = Vec::new();
        for (i, ip) in pods.iter().enumerate() {
            let pod = Netns::new("p");
            let host_if = format!("pod{i}");
            meshward_testkit::sh(&[
                "ip", "-n", &node.name, "link", "add", &host_if, "type", "veth", "peer", "name",
                "eth0", "netns", &pod.name,
            ]);
            node.ip(&["link", "set", &host_if, "up"]);
            node.must(&[
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.{host_if}.proxy_arp=1"),
            ]);
            node.must(&[
                "sysctl",
                "-qw",
                &format!("net.ipv4.neigh.{host_if}.proxy_delay=0"),
            ]);
            node.ip(&["route", "add", &format!("{ip}/32"), "dev", &host_if]);
            pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
            pod.ip(&["link", "set", "eth0", "up"]);
            let mac = node.mac(&host_if);
            pod.ip(&[
                "neigh",
                "replace",
                "169.254.1.1",
                "lladdr",
                &mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ]);
            pod.ip(&[
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ]);
            pod.ip(&[
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ]);
            out.push((pod, ip.to_string()));
        }
        Lab {
            node,
            ext,
            pods: out,
        }
    }

    pub fn pod(&self, i: usize) -> &Netns {
        &self.pods[i].0
    }

    pub fn ip(&self, i: usize) -> IpAddr {
        self.pods[i].1.parse().unwrap()
    }

    pub fn nft(&self, args: &[&str]) -> String {
        let mut cmd = vec!["nft"];
        cmd.extend_from_slice(args);
        self.node.must(&cmd)
    }

    /// Deletes the fail-closed rules (those ending in `drop` or a
    /// `reject`) of our chains `chains`, for a test's control; returns how
    /// many there were.
    pub fn delete_fail_closed_rules(&self, chains: &[&str]) -> usize {
        let mut deleted = 0;
        for chain in chains {
            let listed = self.nft(&["-a", "list", "chain", "inet", TABLE, chain]);
            let handles: Vec<&str> = listed
                .lines()
                .filter(|l| l.contains(" drop ") || l.contains(" reject "))
                .filter_map(|l| l.rsplit("# handle ").next())
                .collect();
            for h in &handles {
                self.nft(&["delete", "rule", "inet", TABLE, chain, "handle", h.trim()]);
            }
            deleted += handles.len();
        }
        deleted
    }

    /// Elements of one of our sets, as `nft` lists them (one per line).
    pub fn set_listing(&self, set: &str) -> String {
        self.nft(&["list", "set", "inet", TABLE, set])
    }
}

pub fn policy(name: &str) -> PolicyRef {
    PolicyRef {
        kind: PolicyKind::MeshNetworkPolicy,
        namespace: "default".into(),
        name: name.into(),
    }
}

pub fn allow(nets: &[&str], ports: &[PortMatch]) -> Allow {
    Allow {
        nets: nets.iter().map(|n| n.parse().unwrap()).collect(),
        ports: ports.to_vec(),
        policy: policy("p"),
    }
}

pub fn rules(allows: Vec<Allow>) -> DirectionRules {
    DirectionRules {
        policies: vec![policy("p")],
        allow: allows,
        fqdn: Vec::new(),
        l7: Vec::new(),
    }
}

pub struct Ep {
    pub ip: IpAddr,
    pub egress: Option<DirectionRules>,
    pub ingress: Option<DirectionRules>,
    pub dns: bool,
}

pub fn state(eps: Vec<Ep>) -> PolicyState {
    let mut endpoints = BTreeMap::new();
    for (i, ep) in eps.into_iter().enumerate() {
        let pod = PodRef {
            namespace: "default".into(),
            name: format!("pod{i}"),
        };
        endpoints.insert(
            pod.clone(),
            EndpointRules {
                pod,
                ips: vec![ep.ip],
                egress: ep.egress.map(Arc::new),
                ingress: ep.ingress.map(Arc::new),
                dns: ep.dns.then(|| Arc::new(DnsRules::default())),
            },
        );
    }
    PolicyState {
        rules: NodeRules { endpoints },
        fqdn: Vec::new(),
    }
}

/// Serves TCP echo (one line per connection, then keeps echoing until the
/// peer closes) on `addr` inside `ns`, for at most `life`.
pub fn tcp_echo(ns: &Netns, addr: &str, life: Duration) {
    let addr: SocketAddr = addr.parse().unwrap();
    let listener = ns.run(|| TcpListener::bind(addr)).expect("bind tcp");
    listener.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        let end = Instant::now() + life;
        while Instant::now() < end {
            match listener.accept() {
                Ok((mut s, _)) => {
                    thread::spawn(move || {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                        let mut buf = [0u8; 1024];
                        for _ in 0..1000 {
                            match s.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
    });
}

/// A UDP socket bound in `ns` that reports what it receives.
pub fn udp_sink(ns: &Netns, addr: &str) -> UdpSocket {
    let addr: SocketAddr = addr.parse().unwrap();
    let s = ns.run(|| UdpSocket::bind(addr)).expect("bind udp");
    s.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    s
}

/// Whether `sink` gets a datagram `pod` sends to it (IPv4 or IPv6).
pub fn udp_passes(pod: &Netns, sink: &UdpSocket, dst: &str) -> bool {
    let dst: SocketAddr = dst.parse().unwrap();
    let tag = format!("probe-{}", Instant::now().elapsed().as_nanos());
    pod.run(|| {
        let any: SocketAddr = if dst.is_ipv6() {
            "[::]:0".parse().unwrap()
        } else {
            "0.0.0.0:0".parse().unwrap()
        };
        let s = UdpSocket::bind(any).unwrap();
        s.send_to(tag.as_bytes(), dst).unwrap();
    });
    let mut buf = [0u8; 256];
    // Earlier probes may still be queued: look for ours.
    for _ in 0..5 {
        match sink.recv_from(&mut buf) {
            Ok((n, _)) if buf[..n] == *tag.as_bytes() => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
    false
}

/// Connects from `pod` to `dst` (1 s limit) and checks an echo.
pub fn tcp_works(pod: &Netns, dst: &str) -> bool {
    let dst: SocketAddr = dst.parse().unwrap();
    match pod.run(|| TcpStream::connect_timeout(&dst, Duration::from_secs(1))) {
        Ok(mut s) => echo(&mut s),
        Err(_) => false,
    }
}

/// Opens a connection from `pod` that the test keeps.
pub fn tcp_open(pod: &Netns, dst: &str) -> TcpStream {
    let dst: SocketAddr = dst.parse().unwrap();
    let mut s = pod
        .run(|| TcpStream::connect_timeout(&dst, Duration::from_secs(1)))
        .expect("connect");
    assert!(echo(&mut s), "fresh connection does not echo");
    s
}

pub fn echo(s: &mut TcpStream) -> bool {
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"ping\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).is_ok() && &buf == b"ping\n"
}

/// Pod 0's IPv6 address after [`add_ipv6`].
pub const POD6: &str = "fd00:198:18:1::2";

/// Gives pod 0 of `lab` an IPv6 ULA (fd00:198:18::/48, only inside the
/// test's namespaces) routed through the node to the external namespace,
/// which gets fd00:198:18:100::1.
pub fn add_ipv6(lab: &Lab) {
    let add = |ns: &meshward_testkit::Netns, addr: &str, dev: &str| {
        ns.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"]);
    };
    lab.node
        .must(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    add(&lab.node, "fd00:198:18:1::1/64", "pod0");
    add(lab.pod(0), &format!("{POD6}/64"), "eth0");
    add(&lab.node, "fd00:198:18:100::254/64", "ext0");
    add(&lab.ext, "fd00:198:18:100::1/64", "eth0");
    lab.pod(0)
        .ip(&["-6", "route", "add", "default", "via", "fd00:198:18:1::1"]);
    lab.ext.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        "fd00:198:18:100::254",
    ]);
    // Permanent neighbours: neighbour discovery right after the links
    // came up (link-local addresses still tentative) takes seconds.
    lab.pod(0)
        .neigh6_permanent("fd00:198:18:1::1", &lab.node.mac("pod0"), "eth0");
    lab.node
        .neigh6_permanent(POD6, &lab.pod(0).mac("eth0"), "pod0");
    lab.node
        .neigh6_permanent("fd00:198:18:100::1", &lab.ext.mac("eth0"), "ext0");
    lab.ext
        .neigh6_permanent("fd00:198:18:100::254", &lab.node.mac("ext0"), "eth0");
    // Bounded wait until the path answers.
    for attempt in 1..=15 {
        let (ok, out) = lab
            .pod(0)
            .exec(&["ping", "-6", "-c1", "-W2", "fd00:198:18:100::1"]);
        if ok {
            return;
        }
        assert!(attempt < 15, "no IPv6 path from the pod: {out}");
    }
}
