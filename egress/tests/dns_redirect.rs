//! DNS redirect plumbing in a real kernel: a selected pod's UDP and TCP
//! port-53 traffic reaches a transparent socket on the node's loopback
//! (the node's pod-side veth has no IPv4 address, as with meshward's CNI),
//! which sees the original destination and answers as that server.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::*;
use meshward_egress::{PolicyConfig, PolicyTables, TABLE};
use socket2::{Domain, Protocol, Socket, Type};

const PORT: u16 = 15353;
const SERVER: &str = "198.18.100.53:53";

fn transparent(ty: Type, bind: SocketAddr) -> Socket {
    let proto = if ty == Type::DGRAM {
        Protocol::UDP
    } else {
        Protocol::TCP
    };
    let s = Socket::new(Domain::IPV4, ty, Some(proto)).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_ip_transparent_v4(true).unwrap();
    s.bind(&bind.into()).unwrap();
    s
}

fn setsockopt_on(fd: i32, level: i32, name: i32) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt {name}: {}",
        std::io::Error::last_os_error()
    );
}

/// recvmsg with IP_ORIGDSTADDR: (payload, source, original destination).
fn recv_with_orig_dst(fd: i32) -> Option<(Vec<u8>, SocketAddrV4, SocketAddrV4)> {
    let mut data = [0u8; 512];
    let mut control = [0u8; 128];
    // SAFETY: plain C structs, zero is a valid value for each field.
    let mut src: libc::sockaddr_in = unsafe { zeroed() };
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&mut src as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    // SAFETY: msg points at live buffers of the stated sizes.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return None;
    }
    let mut orig = None;
    // SAFETY: walking the control buffer the kernel filled, with libc's macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_IP && (*c).cmsg_type == libc::IP_ORIGDSTADDR {
                let sin = *(libc::CMSG_DATA(c) as *const libc::sockaddr_in);
                orig = Some(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    u16::from_be(sin.sin_port),
                ));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let from = SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(src.sin_addr.s_addr)),
        u16::from_be(src.sin_port),
    );
    Some((data[..n as usize].to_vec(), from, orig?))
}

/// What the proxy should bind: 127.0.0.1 (the rule's TPROXY address; not
/// reachable from pods directly).
#[test]
fn selected_pods_dns_reaches_a_transparent_socket_on_loopback() {
    redirect_to("127.0.0.1");
}

/// A wildcard socket receives it too (the TPROXY lookup for 127.0.0.1
/// matches it), but would also be reachable on the node's other addresses.
#[test]
fn a_wildcard_transparent_socket_receives_it_as_well() {
    redirect_to("0.0.0.0");
}

fn redirect_to(bind_ip: &str) {
    let lab = Lab::new(&["198.19.1.2", "198.19.1.3"]);
    let mut t = lab
        .node
        .run(|| {
            PolicyTables::new(PolicyConfig {
                dns_proxy_port: Some(PORT),
                ..PolicyConfig::default()
            })
        })
        .expect("install with DNS redirect");
    // The selected pod is also egress-isolated with nothing allowed:
    // redirected DNS is the proxy's to judge, not the forward chain's.
    t.apply_policy(&state(vec![Ep {
        ip: lab.ip(0),
        egress: Some(rules(vec![])),
        ingress: None,
        dns: true,
    }]))
    .unwrap();
    // Idempotent routing: a second handle adds no second rule.
    drop(lab.node.run(|| {
        PolicyTables::new(PolicyConfig {
            dns_proxy_port: Some(PORT),
            ..PolicyConfig::default()
        })
    }));
    let rules = lab.node.ip(&["rule", "show"]);
    assert_eq!(
        rules.matches("fwmark 0x400000/0x400000 lookup 109").count(),
        1,
        "{rules}"
    );
    let routes = lab.node.ip(&["route", "show", "table", "109"]);
    assert!(routes.contains("local default dev lo"), "{routes}");
    let routes6 = lab.node.ip(&["-6", "route", "show", "table", "109"]);
    assert!(routes6.contains("local default dev lo"), "{routes6}");

    let proxy_addr: SocketAddr = format!("{bind_ip}:{PORT}").parse().unwrap();
    let (udp, tcp) = lab.node.run(|| {
        let udp = transparent(Type::DGRAM, proxy_addr);
        setsockopt_on(udp.as_raw_fd(), libc::SOL_IP, libc::IP_RECVORIGDSTADDR);
        udp.set_read_timeout(Some(Duration::from_millis(800)))
            .unwrap();
        let tcp = transparent(Type::STREAM, proxy_addr);
        tcp.listen(16).unwrap();
        (udp, tcp)
    });

    // UDP: the proxy sees the pod and the server it asked, and answers as
    // that server from a second transparent socket bound to its address.
    let server: SocketAddr = SERVER.parse().unwrap();
    let pod_sock = lab.pod(0).run(|| UdpSocket::bind("0.0.0.0:0")).unwrap();
    pod_sock
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    pod_sock.send_to(b"query", server).unwrap();
    let (data, from, orig) = recv_with_orig_dst(udp.as_raw_fd()).expect("redirected UDP query");
    assert_eq!(data, b"query");
    assert_eq!(*from.ip(), Ipv4Addr::new(198, 19, 1, 2));
    assert_eq!(SocketAddr::V4(orig), server);
    let reply = lab.node.run(|| transparent(Type::DGRAM, server));
    reply
        .send_to(b"answer", &SocketAddr::V4(from).into())
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, answered_by) = pod_sock
        .recv_from(&mut buf)
        .expect("answer reaches the pod");
    assert_eq!(&buf[..n], b"answer");
    assert_eq!(
        answered_by, server,
        "the answer must come from the server the pod asked"
    );

    // TCP: the accepted connection's local address is the original server.
    let mut client = lab
        .pod(0)
        .run(|| TcpStream::connect_timeout(&server, Duration::from_secs(2)))
        .expect("redirected TCP connect");
    let listener: TcpListener = tcp.into();
    let (mut conn, peer) = listener.accept().unwrap();
    assert_eq!(conn.local_addr().unwrap(), server);
    assert_eq!(peer.ip(), lab.ip(0));
    client.write_all(b"q").unwrap();
    let mut one = [0u8; 1];
    conn.read_exact(&mut one).unwrap();
    conn.write_all(b"a").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    client.read_exact(&mut one).unwrap();
    assert_eq!(&one, b"a");

    // An unselected pod's DNS is forwarded as usual, not redirected.
    let other = lab.pod(1).run(|| UdpSocket::bind("0.0.0.0:0")).unwrap();
    other.send_to(b"query", server).unwrap();
    assert!(
        recv_with_orig_dst(udp.as_raw_fd()).is_none(),
        "unselected pod redirected"
    );
    // Nor is the selected pod's traffic to other ports.
    let sink = udp_sink(&lab.ext, &format!("{EXT}:5353"));
    assert!(!udp_passes(lab.pod(0), &sink, &format!("{EXT}:5353")));
    assert!(recv_with_orig_dst(udp.as_raw_fd()).is_none());
}

/// The fail-closed chains (TPROXY, then the verdict), one per family.
const DNS_TPROXY_CHAINS: [&str; 2] = ["dns_tproxy4", "dns_tproxy6"];
const SERVER6: &str = "[fd00:198:18:100::1]:53";

/// How a TCP connect from `ns` to `dst` ends (a generous limit: a reset
/// answers at once, a drop lets it time out).
fn tcp_connect(ns: &meshward_testkit::Netns, dst: SocketAddr) -> Result<(), ErrorKind> {
    ns.run(|| TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
        .map(drop)
        .map_err(|e| e.kind())
}

/// Fail closed: redirected DNS that no proxy socket takes (none listens on
/// [::1], or on 127.0.0.1 between restarts) ends in the DNS chain: UDP is
/// dropped (no ICMP error either), TCP is reset (the connect is refused at
/// once rather than timing out); it reaches neither the server the pod
/// asked nor a port-53 socket on the node — either would skip the DNS
/// rules and the learning. The pod is not egress-isolated, so only the DNS
/// chain stands in the way. With the fail-closed rules deleted (the layout
/// before them) the node's socket takes the queries (the control).
#[test]
fn redirected_dns_without_a_proxy_socket_fails_closed() {
    let lab = Lab::new(&["198.19.1.2"]);
    add_ipv6(&lab);
    let mut t = lab
        .node
        .run(|| {
            PolicyTables::new(PolicyConfig {
                dns_proxy_port: Some(PORT),
                ..PolicyConfig::default()
            })
        })
        .expect("install with DNS redirect");
    let mut st = state(vec![Ep {
        ip: lab.ip(0),
        egress: None,
        ingress: None,
        dns: true,
    }]);
    let ep = st.rules.endpoints.values_mut().next().unwrap();
    ep.ips.push(POD6.parse().unwrap());
    t.apply_policy(&st).unwrap();
    let redirect6 = lab.set_listing("dns_redirect6");
    assert!(redirect6.contains(POD6), "{redirect6}");

    let server6: SocketAddr = SERVER6.parse().unwrap();
    let server4: SocketAddr = format!("{EXT}:53").parse().unwrap();
    let sink6 = udp_sink(&lab.ext, SERVER6);
    let sink4 = udp_sink(&lab.ext, &server4.to_string());
    let _tcp6 = lab.ext.run(|| TcpListener::bind(server6)).unwrap();
    let _tcp4 = lab.ext.run(|| TcpListener::bind(server4)).unwrap();
    // The paths work: other ports are forwarded on both families.
    let other6 = udp_sink(&lab.ext, "[fd00:198:18:100::1]:5353");
    assert!(udp_passes(lab.pod(0), &other6, "[fd00:198:18:100::1]:5353"));
    assert!(udp_passes(
        lab.pod(0),
        &udp_sink(&lab.ext, &format!("{EXT}:5353")),
        &format!("{EXT}:5353")
    ));

    // With a transparent socket on [::1] the pod's IPv6 query goes there.
    let listener6: SocketAddr = format!("[::1]:{PORT}").parse().unwrap();
    let proxy6 = lab.node.run(|| {
        let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        s.set_ip_transparent_v6(true).unwrap();
        s.bind(&listener6.into()).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(800)))
            .unwrap();
        UdpSocket::from(s)
    });
    lab.pod(0).run(|| {
        let s = UdpSocket::bind("[::]:0").unwrap();
        s.send_to(b"query6", server6).unwrap();
    });
    let mut buf = [0u8; 64];
    let (n, from) = proxy6.recv_from(&mut buf).expect("redirected to [::1]");
    assert_eq!(
        (&buf[..n], from.ip()),
        (&b"query6"[..], POD6.parse().unwrap())
    );
    drop(proxy6);

    // No proxy socket on either family: nothing reaches the server, nor
    // a DNS server the node runs on the wildcard address.
    let node_udp = udp_sink(&lab.node, "[::]:53");
    let node_tcp = lab.node.run(|| TcpListener::bind("[::]:53")).unwrap();
    node_tcp.set_nonblocking(true).unwrap();
    let reached = |sink: &UdpSocket, to: SocketAddr| -> bool {
        let direct = udp_passes(lab.pod(0), sink, &to.to_string());
        direct || node_udp_got(&node_udp)
    };
    for _ in 0..2 {
        assert!(!reached(&sink6, server6), "IPv6 UDP DNS got through");
        assert!(!reached(&sink4, server4), "IPv4 UDP DNS got through");
    }
    // Dropped, not refused: a connected client gets no ICMP error, it
    // waits and retries (across an agent restart, say).
    for server in [server4, server6] {
        let err = lab.pod(0).run(|| {
            let any: SocketAddr = if server.is_ipv6() {
                "[::]:0".parse().unwrap()
            } else {
                "0.0.0.0:0".parse().unwrap()
            };
            let s = UdpSocket::bind(any).unwrap();
            s.connect(server).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(700)))
                .unwrap();
            s.send(b"q-connected").unwrap();
            s.recv(&mut [0u8; 64]).unwrap_err().kind()
        });
        assert!(
            matches!(err, ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{server}: {err:?}"
        );
        assert!(!node_udp_got(&node_udp), "{server}: reached the node");
    }
    // TCP is reset: refused at once, not left to time out.
    assert_eq!(
        tcp_connect(lab.pod(0), server6),
        Err(ErrorKind::ConnectionRefused),
        "IPv6 TCP DNS"
    );
    assert_eq!(
        tcp_connect(lab.pod(0), server4),
        Err(ErrorKind::ConnectionRefused),
        "IPv4 TCP DNS"
    );
    assert!(node_tcp.accept().is_err(), "the node's listener took one");
    // Both verdicts counted (and logged, which the agent's nflog tests
    // follow) in each family's chain.
    for chain in DNS_TPROXY_CHAINS {
        let listed = lab.nft(&["list", "chain", "inet", TABLE, chain]);
        let verdicts: Vec<&str> = listed
            .lines()
            .filter(|l| l.contains(" log prefix \"meshward-drop dns-proxy\" "))
            .collect();
        assert_eq!(verdicts.len(), 2, "{listed}");
        assert!(
            verdicts.iter().all(|l| !l.contains("counter packets 0 ")),
            "a verdict not counted: {listed}"
        );
    }

    // The control: without the fail-closed rules TPROXY's miss falls
    // through (the family's chain ends, the hook's policy accepts). The
    // rule set the mark before TPROXY broke off, so the policy routing
    // still delivers the packet locally (it is not forwarded to the
    // server), where whatever listens on port 53 on the node's wildcard
    // address takes it: a node-local resolver would answer the pod past
    // the DNS rules and the learning.
    assert_eq!(lab.delete_fail_closed_rules(&DNS_TPROXY_CHAINS), 4);
    assert!(
        !udp_passes(lab.pod(0), &sink6, &server6.to_string()),
        "control: IPv6 forwarded"
    );
    assert!(
        node_udp_got(&node_udp),
        "control: IPv6 UDP not delivered on the node"
    );
    assert!(
        !udp_passes(lab.pod(0), &sink4, &server4.to_string()),
        "control: IPv4 forwarded"
    );
    assert!(
        node_udp_got(&node_udp),
        "control: IPv4 UDP not delivered on the node"
    );
    assert!(
        lab.pod(0)
            .run(|| TcpStream::connect_timeout(&server6, Duration::from_secs(5)))
            .is_ok(),
        "control: IPv6 TCP"
    );
    // The server side may finish the handshake after the client's connect
    // returned: poll, bounded.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while node_tcp.accept().is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "control: the node's listener"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // (IPv4 TCP does not complete against this non-transparent listener:
    // no IPv4 TCP control.)
}

/// Whether a datagram (from the test's probes) waits on the node's socket.
fn node_udp_got(sock: &UdpSocket) -> bool {
    let mut buf = [0u8; 256];
    // `udp_passes` probes and the connected client's query.
    matches!(sock.recv_from(&mut buf),
        Ok((n, _)) if buf[..n].starts_with(b"probe-") || buf[..n].starts_with(b"q-"))
}

/// Loads an `nft -f` script into `ns` (bounded in time).
fn nft_script(ns: &meshward_testkit::Netns, script: &str) {
    let run = meshward_testkit::run(
        ns.command("nft").args(["-f", "-"]),
        script.as_bytes(),
        Duration::from_secs(20),
    )
    .expect("run nft");
    assert!(run.success(), "nft -f:\n{script}\n{run}");
}

/// Our chains' rules, as `nft list chain` shows them (without counters).
fn rules_of(ns: &meshward_testkit::Netns, chain: &str) -> Vec<String> {
    ns.must(&["nft", "list", "chain", "inet", TABLE, chain])
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("table") && !l.starts_with("chain") && *l != "}"
        })
        .filter(|l| !l.starts_with("type filter hook"))
        .map(|l| {
            l.replace(" counter packets 0 bytes 0", " counter")
                .to_string()
        })
        .collect()
}

/// An agent restarting over its predecessor's layout: the old shape of the
/// DNS and L7 chains (each TPROXY rule followed by a `counter drop` of the
/// same match, no per-family chains) is rewritten in place, in the one
/// transaction of a normal start; and when a set's definition changed (the
/// teardown path) the fail-closed chains are removed and made anew with
/// the rest. Either way every chain ends up with one copy of its rules.
#[test]
fn a_predecessors_layout_is_replaced_by_the_fail_closed_chains() {
    let node = meshward_testkit::Netns::new("u");
    let cfg = PolicyConfig {
        dns_proxy_port: Some(PORT),
        l7_proxy_port: Some(15001),
        ..PolicyConfig::default()
    };
    let start = || {
        node.run(|| PolicyTables::new(cfg.clone()))
            .expect("install the structure")
    };
    drop(start());
    let expected: Vec<(&str, Vec<String>)> = ["dns_prerouting", "l7_prerouting"]
        .into_iter()
        .chain(DNS_TPROXY_CHAINS)
        .chain([
            "l7_tproxy_egress4",
            "l7_tproxy_ingress4",
            "l7_tproxy_egress6",
            "l7_tproxy_ingress6",
        ])
        .map(|c| (c, rules_of(&node, c)))
        .collect();
    assert!(
        expected[0].1[0].ends_with("goto dns_tproxy4"),
        "{expected:?}"
    );

    // The layout before the per-family chains.
    let mut old = format!(
        "flush chain inet {TABLE} dns_prerouting\nflush chain inet {TABLE} l7_prerouting\n"
    );
    for (chain, _) in &expected[2..] {
        old.push_str(&format!(
            "flush chain inet {TABLE} {chain}\ndelete chain inet {TABLE} {chain}\n"
        ));
    }
    old.push_str(&format!(
        r#"table inet {TABLE} {{
  chain dns_prerouting {{
    ip saddr @dns_redirect4 meta l4proto {{ tcp, udp }} th dport 53 meta mark set meta mark | 0x00400000 tproxy ip to 127.0.0.1:{PORT} accept
    ip saddr @dns_redirect4 meta l4proto {{ tcp, udp }} th dport 53 counter drop
    ip6 saddr @dns_redirect6 meta l4proto {{ tcp, udp }} th dport 53 meta mark set meta mark | 0x00400000 tproxy ip6 to [::1]:{PORT} accept
    ip6 saddr @dns_redirect6 meta l4proto {{ tcp, udp }} th dport 53 counter drop
  }}
  chain l7_prerouting {{
    meta mark & 0x00400000 == 0x00400000 return
    iifname "lo" return
    meta l4proto tcp socket transparent 1 meta mark set meta mark | 0x00400000 accept
    meta l4proto tcp ct direction original ip saddr . tcp dport @l7_egress4 meta mark set meta mark | 0x00400000 tproxy ip to 127.0.0.1:15001 accept
    meta l4proto tcp ct direction original ip saddr . tcp dport @l7_egress4 counter drop
    meta l4proto tcp ct direction original ip6 daddr . tcp dport @l7_ingress6 meta mark set meta mark | 0x00400000 tproxy ip6 to [::1]:15001 accept
    meta l4proto tcp ct direction original ip6 daddr . tcp dport @l7_ingress6 counter drop
  }}
}}
"#
    ));
    nft_script(&node, &old);
    let table = node.must(&["nft", "list", "table", "inet", TABLE]);
    assert!(!table.contains("dns_tproxy") && !table.contains("l7_tproxy"));
    // Its four fail-closed drops, and the four check chains' drops.
    assert_eq!(table.matches(" drop").count(), 4 + 4, "{table}");

    // A restart over it: rewritten in place.
    let t = start();
    for (chain, rules) in &expected {
        assert_eq!(&rules_of(&node, chain), rules, "{chain} after the upgrade");
    }
    drop(t);

    // A set whose definition changed: the first transaction fails on it,
    // the teardown removes our chains (the fail-closed ones among them)
    // and sets, and the structure is made anew.
    nft_script(
        &node,
        &format!(
            "flush chain inet {TABLE} egress4\ndelete set inet {TABLE} egress4_drops\n\
             add set inet {TABLE} egress4_drops {{ type ipv6_addr; }}\n"
        ),
    );
    let _t = start();
    let drops = node.must(&["nft", "list", "set", "inet", TABLE, "egress4_drops"]);
    assert!(drops.contains("type ipv4_addr"), "{drops}");
    for (chain, rules) in &expected {
        assert_eq!(&rules_of(&node, chain), rules, "{chain} after the rebuild");
    }
}
