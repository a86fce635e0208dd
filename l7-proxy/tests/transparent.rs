//! The proxy as the agent runs it: several threads (SO_REUSEPORT
//! listeners on 127.0.0.1 and [::1]), onward connections from the client's
//! own address (`transparent_upstream`), over IPv4 and IPv6. The server
//! answers with the address it saw the connection come from.
//!
//! ```text
//!  client ns                        node ns                                 server ns
//!  198.18.1.2         ─veth─ 198.18.1.1 │ 198.18.2.1         ─veth─ 198.18.2.2
//!  fd00:198:18:1::2          fd00:198:18:1::1 │ fd00:198:18:2::1    fd00:198:18:2::2
//!                            tproxy :8080 → 127.0.0.1 / [::1]:15001   hyper :8080
//! ```

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshward_l7_proxy::{
    spawn_threads, Direction, HttpRuleSet, L7Event, PortPolicy, ProxyConfig, Verdict,
};
use meshward_policy::crd::HttpRule;
use meshward_testkit::{in_netns, run, veth, Netns};

#[path = "support/lab.rs"]
mod lab_support;
use lab_support::*;

const SERVER4: &str = "198.18.2.2";
const SERVER6: &str = "fd00:198:18:2::2";
const CLIENT6: &str = "fd00:198:18:1::2";

struct Lab {
    client: Netns,
    node: Netns,
    _server: Netns,
    events: Arc<Mutex<Vec<L7Event<'static>>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The lab, with the proxy keeping idle upstream connections for
/// `upstream_idle` (zero: none).
fn lab(upstream_idle: Duration) -> Lab {
    let client = Netns::new("c");
    let node = Netns::new("n");
    let server = Netns::new("s");
    veth(&client, "c0", "198.18.1.2/24", &node, "n0", "198.18.1.1/24");
    veth(&node, "n1", "198.18.2.1/24", &server, "s0", "198.18.2.2/24");
    // IPv6 (test-only ULAs), without duplicate address detection so the
    // addresses are usable at once.
    for (ns, addr, dev) in [
        (&client, "fd00:198:18:1::2/64", "c0"),
        (&node, "fd00:198:18:1::1/64", "n0"),
        (&node, "fd00:198:18:2::1/64", "n1"),
        (&server, "fd00:198:18:2::2/64", "s0"),
    ] {
        ns.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"]);
    }
    client.ip(&["route", "add", "default", "via", "198.18.1.1"]);
    client.ip(&["-6", "route", "add", "default", "via", "fd00:198:18:1::1"]);
    server.ip(&["route", "add", "default", "via", "198.18.2.1"]);
    server.ip(&["-6", "route", "add", "default", "via", "fd00:198:18:2::1"]);
    tproxy_routing(&node, true);
    // As the agent's L7 chain: redirected connections to the proxy, and
    // the server's replies to the proxy's transparent onward sockets.
    let ruleset = "table inet l7transparent {
  chain pre {
    type filter hook prerouting priority mangle; policy accept;
    meta l4proto tcp socket transparent 1 meta mark set meta mark | 0x400000 accept
    ip saddr 198.18.1.0/24 tcp dport 8080 meta mark set meta mark | 0x400000 tproxy ip to 127.0.0.1:15001 accept
    ip6 saddr fd00:198:18:1::/64 tcp dport 8080 meta mark set meta mark | 0x400000 tproxy ip6 to [::1]:15001 accept
  }
}
";
    let r = run(
        node.command("nft").args(["-f", "-"]),
        ruleset.as_bytes(),
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(r.success(), "nft: {}", r.stderr);

    // The server: answers every request with the peer it saw.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let path = server.path();
    std::thread::spawn(move || {
        in_netns(&path, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let v4 = tokio::net::TcpListener::bind((SERVER4, 8080))
                    .await
                    .unwrap();
                let v6 = tokio::net::TcpListener::bind((SERVER6, 8080))
                    .await
                    .unwrap();
                ready_tx.send(()).unwrap();
                let serve = |l: tokio::net::TcpListener| async move {
                    while let Ok((s, peer)) = l.accept().await {
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(
                                move |_req: Request<Incoming>| async move {
                                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                                        format!("peer {peer}\n"),
                                    ))))
                                },
                            );
                            let _ =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection(TokioIo::new(s), svc)
                                    .await;
                        });
                    }
                };
                tokio::select! {
                    _ = stopped => {}
                    _ = serve(v4) => {}
                    _ = serve(v6) => {}
                }
            });
        })
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    // The proxy: two threads, as the agent starts it (they serve until the
    // test process ends; the namespace's name is removed with the lab).
    let events: Arc<Mutex<Vec<L7Event<'static>>>> = Arc::default();
    let ev = events.clone();
    let products = HttpRule {
        method: Some("GET".into()),
        path: Some("/api/v1/products.*".into()),
        ..Default::default()
    };
    let rules =
        Arc::new(HttpRuleSet::new([(&products, "MeshNetworkPolicy shop/frontend")]).unwrap());
    let policy = move |_src: IpAddr, _dst: SocketAddr, dir: Direction| match dir {
        Direction::Egress => PortPolicy::Http(rules.clone()),
        Direction::Ingress => PortPolicy::AllowAll,
    };
    let v4 = ProxyConfig {
        transparent_upstream: true,
        upstream_idle_timeout: upstream_idle,
        ..ProxyConfig::default()
    };
    let v6 = ProxyConfig {
        listen: "[::1]:15001".parse().unwrap(),
        ..v4.clone()
    };
    let running = node.run(move || {
        spawn_threads(
            2,
            vec![v4, v6],
            Arc::new(policy),
            Arc::new(move |e: L7Event<'_>| ev.lock().unwrap().push(e.into_owned())),
            "l7-test",
        )
        .unwrap()
    });
    assert!(running.skipped.is_empty(), "{:?}", running.skipped);
    assert_eq!(running.handles.len(), 2);
    let lab = Lab {
        client,
        node,
        _server: server,
        events,
        stop: Some(stop),
    };
    for addr in ["198.18.2.2:8080", "[fd00:198:18:2::2]:8080"] {
        wait_port(&lab._server, addr);
    }
    lab
}

#[test]
fn ipv6_requests_judged_and_forwarded_from_the_client_address() {
    let lab = lab(Duration::from_secs(4));
    let url = format!("http://[{SERVER6}]:8080");
    // Several connections, so both proxy threads are likely to serve some.
    for _ in 0..4 {
        let (status, out) = curl(&lab.client, &["-6", &format!("{url}/api/v1/products/7")]);
        assert_eq!(status, 200, "{out}");
        assert!(
            out.contains(&format!("peer [{CLIENT6}]:")),
            "the server must see the client's address: {out}"
        );
    }
    let (status, out) = curl(&lab.client, &["-6", &format!("{url}/admin")]);
    assert_eq!(status, 403, "{out}");
    assert!(out.contains("Access denied"), "{out}");
    // Path normalisation applies to IPv6 requests too.
    let (status, out) = curl(
        &lab.client,
        &[
            "-6",
            "--path-as-is",
            &format!("{url}/api/v1/products/../../admin"),
        ],
    );
    assert_eq!(status, 403, "{out}");
    // IPv4 on the same proxy threads.
    let (status, out) = curl(
        &lab.client,
        &[&format!("http://{SERVER4}:8080/api/v1/products/1")],
    );
    assert_eq!(status, 200, "{out}");
    assert!(out.contains("peer 198.18.1.2:"), "{out}");
    let events = lab.events.lock().unwrap();
    let v6: Vec<&L7Event<'static>> = events.iter().filter(|e| e.src.is_ipv6()).collect();
    assert_eq!(v6.len(), 6, "{events:?}");
    assert_eq!(
        v6.iter().filter(|e| e.verdict == Verdict::Denied).count(),
        2
    );
    assert!(v6.iter().all(|e| e.src.ip().to_string() == CLIENT6
        && e.dst == format!("[{SERVER6}]:8080").parse::<SocketAddr>().unwrap()));
}

#[test]
fn onward_source_port_is_never_the_clients_own() {
    // Fresh onward connections only (a kept one would have an earlier
    // round's port).
    let lab = lab(Duration::ZERO);
    // Two ephemeral ports on the node: a bind to port 0 tries the second
    // (odd offset) first, the port the client connects from. A new pair
    // each time (the client's port stays in TIME_WAIT).
    for (i, v6) in [(0, false), (1, false), (2, true)] {
        let base = 40000 + 10 * i;
        let range = format!("net.ipv4.ip_local_port_range={base} {}", base + 1);
        lab.node.must(&["sysctl", "-qw", &range]);
        let (url, seen) = if v6 {
            (
                format!("http://[{SERVER6}]:8080/api/v1/products/1"),
                format!("peer [{CLIENT6}]:{base}\n"),
            )
        } else {
            (
                format!("http://{SERVER4}:8080/api/v1/products/1"),
                format!("peer 198.18.1.2:{base}\n"),
            )
        };
        let client_port = (base + 1).to_string();
        let (status, out) = curl(&lab.client, &["--local-port", &client_port, &url]);
        assert_eq!(status, 200, "{out}");
        assert!(
            out.contains(&seen),
            "the onward connection must leave from the client's address on another port ({seen:?}): {out}"
        );
    }
}

/// The server's view of one request: the peer it saw.
fn peer_of(lab: &Lab, args: &[&str]) -> SocketAddr {
    let (status, out) = curl(&lab.client, args);
    assert_eq!(status, 200, "{out}");
    let peer = out
        .lines()
        .find_map(|l| l.strip_prefix("peer "))
        .unwrap_or_else(|| panic!("no peer in {out}"));
    peer.trim().parse().unwrap()
}

#[test]
fn short_client_connections_share_upstream_connections_of_their_source() {
    let lab = lab(Duration::from_secs(5));
    lab.client
        .ip(&["addr", "add", "198.18.1.3/24", "dev", "c0"]);
    let url = format!("http://{SERVER4}:8080/api/v1/products/1");
    // A new client connection per request (curl closes at exit; every
    // other one also says so): the proxy's onward connections are kept and
    // reused, at most one per proxy thread, all from the client's address.
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..8 {
        let args: &[&str] = if i % 2 == 0 {
            &[&url]
        } else {
            &["-H", "Connection: close", &url]
        };
        let peer = peer_of(&lab, args);
        assert_eq!(peer.ip().to_string(), "198.18.1.2");
        ports.insert(peer.port());
    }
    assert!(
        ports.len() <= 2,
        "8 short connections used {} onward connections: {ports:?}",
        ports.len()
    );
    // Another source never gets them: the server sees its own address.
    let other = peer_of(&lab, &["--interface", "198.18.1.3", &url]);
    assert_eq!(other.ip().to_string(), "198.18.1.3");
    // Idle for longer than the limit: let go, a fresh one is dialled.
    std::thread::sleep(Duration::from_millis(6500));
    for _ in 0..2 {
        let peer = peer_of(&lab, &[&url]);
        assert!(
            !ports.contains(&peer.port()),
            "a connection idle past its limit was used again: {peer}"
        );
    }
}
