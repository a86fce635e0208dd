//! L7 redirect plumbing in a real kernel: TCP on a port with L7 rules
//! (egress of the sending pod, ingress of the receiving one) reaches a
//! transparent listener on the node's loopback with the original
//! destination as its local address, after the same L3/L4 checks forwarded
//! traffic gets; other ports are forwarded untouched.

mod common;

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use meshward_egress::{PolicyConfig, PolicyTables};
use meshward_policy::{L7Allow, L7Rule, PortMatch};
use socket2::{Domain, Protocol, Socket, Type};

const PORT: u16 = 15801;
const TCP: meshward_policy::L4Protocol = meshward_policy::L4Protocol::Tcp;

fn l7(nets: &[&str], port: u16) -> L7Allow {
    L7Allow {
        nets: nets.iter().map(|n| n.parse().unwrap()).collect(),
        fqdns: Vec::new(),
        port,
        rule: L7Rule::AllowAll,
        policy: policy("p"),
    }
}

fn transparent_listener(bind: SocketAddr) -> TcpListener {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_ip_transparent_v4(true).unwrap();
    s.bind(&bind.into()).unwrap();
    s.listen(64).unwrap();
    let l: TcpListener = s.into();
    l.set_nonblocking(true).unwrap();
    l
}

/// The next connection the proxy listener accepts within `wait`:
/// (peer, local address = original destination).
fn accepted(l: &TcpListener, wait: Duration) -> Option<(SocketAddr, SocketAddr)> {
    let end = Instant::now() + wait;
    while Instant::now() < end {
        match l.accept() {
            Ok((s, peer)) => return Some((peer, s.local_addr().unwrap())),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    None
}

/// Starts a connect from `ns` to `dst` on a thread (the SYN goes out
/// whatever happens to it); returns whether it connected within 1.5 s.
fn connect_from(ns: &meshward_testkit::Netns, dst: &str) -> bool {
    let dst: SocketAddr = dst.parse().unwrap();
    ns.run(|| TcpStream::connect_timeout(&dst, Duration::from_millis(1500)))
        .is_ok()
}

#[test]
fn l7_ports_reach_the_proxy_after_l4_checks() {
    let lab = Lab::new(&["198.19.1.2", "198.19.1.3"]);
    let (client, server) = (lab.ip(0), lab.ip(1));
    let mut t = lab
        .node
        .run(|| {
            PolicyTables::new(PolicyConfig {
                l7_proxy_port: Some(PORT),
                ..PolicyConfig::default()
            })
        })
        .expect("install with L7 redirect");
    // pod0: egress to EXT on 80 (L7) and 81 (L4 only), to pod1 on 8080.
    let mut egress = rules(vec![
        allow(
            &[&format!("{EXT}/32")],
            &[PortMatch::single(TCP, 80), PortMatch::single(TCP, 81)],
        ),
        allow(&["198.19.1.3/32"], &[PortMatch::single(TCP, 8080)]),
    ]);
    egress.l7 = vec![l7(&[&format!("{EXT}/32")], 80)];
    // pod1: ingress from pod0 only, on 8080 (L7).
    let mut ingress = rules(vec![allow(
        &["198.19.1.2/32"],
        &[PortMatch::single(TCP, 8080)],
    )]);
    ingress.l7 = vec![l7(&["198.19.1.2/32"], 8080)];
    t.apply_policy(&state(vec![
        Ep {
            ip: client,
            egress: Some(egress),
            ingress: None,
            dns: false,
        },
        Ep {
            ip: server,
            egress: None,
            ingress: Some(ingress),
            dns: false,
        },
    ]))
    .unwrap();
    let listing = lab.set_listing("l7_egress4");
    assert!(listing.contains("198.19.1.2 . 80"), "{listing}");
    let listing = lab.set_listing("l7_ingress4");
    assert!(listing.contains("198.19.1.3 . 8080"), "{listing}");

    let proxy = lab
        .node
        .run(|| transparent_listener(format!("127.0.0.1:{PORT}").parse().unwrap()));
    let wait = Duration::from_secs(3);

    // Egress L7 port: to the proxy, with the original destination.
    assert!(connect_from(lab.pod(0), &format!("{EXT}:80")));
    let (peer, orig) = accepted(&proxy, wait).expect("egress L7 connection redirected");
    assert_eq!(peer.ip(), client);
    assert_eq!(orig, format!("{EXT}:80").parse::<SocketAddr>().unwrap());

    // A port without L7 rules is forwarded to the real server.
    tcp_echo(&lab.ext, &format!("{EXT}:81"), Duration::from_secs(20));
    assert!(tcp_works(lab.pod(0), &format!("{EXT}:81")));
    assert!(accepted(&proxy, Duration::from_millis(300)).is_none());

    // An L7 port towards a peer L4 policy does not admit: the SYN is
    // dropped (egress check on the redirected packet), the proxy never
    // sees it, and the drop is counted like any other.
    assert!(!connect_from(lab.pod(0), &format!("{EXT2}:80")));
    assert!(accepted(&proxy, Duration::from_millis(300)).is_none());
    let drops = lab.nft(&["list", "set", "inet", "meshward", "egress4_drops"]);
    assert!(drops.contains("198.19.1.2"), "{drops}");

    // Ingress L7 port: pod0 -> pod1:8080 goes to the proxy (pod0's egress
    // admits it at L4 and has no L7 rule on 8080; pod1's ingress has).
    assert!(connect_from(lab.pod(0), "198.19.1.3:8080"));
    let (peer, orig) = accepted(&proxy, wait).expect("ingress L7 connection redirected");
    assert_eq!(peer.ip(), client);
    assert_eq!(orig, "198.19.1.3:8080".parse::<SocketAddr>().unwrap());

    // Through a Service address (DNAT, as kube-proxy or portmap do it, at
    // dstnat priority): judged by the pod and port it is translated to, so
    // it reaches the proxy with pod1:8080 as the original destination.
    lab.nft(&["add", "table", "ip", "svc"]);
    lab.nft(&[
        "add",
        "chain",
        "ip",
        "svc",
        "pre",
        "{ type nat hook prerouting priority dstnat; }",
    ]);
    lab.nft(&[
        "add",
        "rule",
        "ip",
        "svc",
        "pre",
        "ip",
        "daddr",
        "198.18.200.1",
        "tcp",
        "dport",
        "80",
        "dnat",
        "to",
        "198.19.1.3:8080",
    ]);
    assert!(connect_from(lab.pod(0), "198.18.200.1:80"));
    let (peer, orig) = accepted(&proxy, wait).expect("Service connection redirected");
    assert_eq!(peer.ip(), client);
    assert_eq!(orig, "198.19.1.3:8080".parse::<SocketAddr>().unwrap());

    // From outside, pod1's ingress does not admit it: dropped before the
    // proxy (ingress check of the original destination).
    assert!(!connect_from(&lab.ext, "198.19.1.3:8080"));
    assert!(accepted(&proxy, Duration::from_millis(300)).is_none());
    let drops = lab.nft(&["list", "set", "inet", "meshward", "ingress4_drops"]);
    assert!(drops.contains("198.19.1.3"), "{drops}");

    // Removing the L7 rules stops the redirect: the connection is
    // forwarded (nothing listens on pod1, so it is refused, not proxied).
    let egress = rules(vec![allow(
        &[&format!("{EXT}/32")],
        &[PortMatch::single(TCP, 80)],
    )]);
    t.apply_policy(&state(vec![Ep {
        ip: client,
        egress: Some(egress),
        ingress: None,
        dns: false,
    }]))
    .unwrap();
    tcp_echo(&lab.ext, &format!("{EXT}:80"), Duration::from_secs(20));
    assert!(tcp_works(lab.pod(0), &format!("{EXT}:80")));
    assert!(accepted(&proxy, Duration::from_millis(300)).is_none());
    let listing = lab.set_listing("l7_egress4");
    assert!(!listing.contains("198.19.1.2"), "{listing}");
}

/// Fail closed: a connection on an L7 port that no proxy socket takes (the
/// proxy does not listen on that family, or is between restarts) is reset
/// in the L7 chain: the connect is refused at once instead of hanging.
/// Without that rule the mark, set before TPROXY broke off, has the policy
/// routing deliver the SYN to the node itself, where a socket on the
/// wildcard address and that port takes the connection past the HTTP
/// rules (the control). IPv6, where any such socket completes the
/// handshake (over IPv4 only a transparent one could answer from the
/// original destination's address).
/// The fail-closed chains (TPROXY, then the reset), per family and direction.
const L7_TPROXY_CHAINS: [&str; 4] = [
    "l7_tproxy_egress4",
    "l7_tproxy_ingress4",
    "l7_tproxy_egress6",
    "l7_tproxy_ingress6",
];

#[test]
fn l7_connections_without_a_proxy_socket_are_reset() {
    let lab = Lab::new(&["198.19.1.2"]);
    add_ipv6(&lab);
    let mut t = lab
        .node
        .run(|| {
            PolicyTables::new(PolicyConfig {
                l7_proxy_port: Some(PORT),
                ..PolicyConfig::default()
            })
        })
        .expect("install with L7 redirect");
    let ext6 = "fd00:198:18:100::1/128";
    let mut egress = rules(vec![allow(&[ext6], &[PortMatch::single(TCP, 80)])]);
    egress.l7 = vec![l7(&[ext6], 80)];
    let mut st = state(vec![Ep {
        ip: lab.ip(0),
        egress: Some(egress),
        ingress: None,
        dns: false,
    }]);
    let ep = st.rules.endpoints.values_mut().next().unwrap();
    ep.ips.push(POD6.parse().unwrap());
    t.apply_policy(&st).unwrap();
    let listing = lab.set_listing("l7_egress6");
    assert!(listing.contains(POD6), "{listing}");

    let dst: SocketAddr = "[fd00:198:18:100::1]:80".parse().unwrap();
    let node_socket = lab.node.run(|| TcpListener::bind("[::]:80")).unwrap();
    node_socket.set_nonblocking(true).unwrap();
    let attempt = || {
        lab.pod(0)
            .run(|| TcpStream::connect_timeout(&dst, Duration::from_millis(1500)))
            .map(drop)
            .map_err(|e| e.kind())
    };
    // No proxy listener: the SYN is answered with a reset (the connect is
    // refused, well before its time limit) and the node's socket gets
    // nothing.
    assert_eq!(attempt(), Err(ErrorKind::ConnectionRefused));
    assert!(accepted(&node_socket, Duration::from_millis(300)).is_none());
    // Counted (and logged) in the egress IPv6 chain only.
    for chain in L7_TPROXY_CHAINS {
        let listed = lab.nft(&["list", "chain", "inet", "meshward", chain]);
        let resets: Vec<&str> = listed
            .lines()
            .filter(|l| l.contains(" reject with tcp reset"))
            .collect();
        assert_eq!(resets.len(), 1, "{listed}");
        let direction = if chain.contains("egress") {
            "egress"
        } else {
            "ingress"
        };
        assert!(
            resets[0].contains(&format!(
                "log prefix \"meshward-drop l7-proxy {direction}\" group "
            )),
            "{listed}"
        );
        assert_eq!(
            !resets[0].contains("counter packets 0 "),
            chain == "l7_tproxy_egress6",
            "{listed}"
        );
    }

    // The control: without the fail-closed rules the connection falls
    // through to the node's socket.
    assert_eq!(lab.delete_fail_closed_rules(&L7_TPROXY_CHAINS), 4);
    assert_eq!(attempt(), Ok(()), "control: connect");
    let (peer, local) =
        accepted(&node_socket, Duration::from_secs(3)).expect("control: the node's socket");
    assert_eq!(peer.ip(), POD6.parse::<std::net::IpAddr>().unwrap());
    assert_eq!(local, dst);
}
