//! Real gRPC through the proxy: a tonic server and a tonic client (h2c
//! prior knowledge, as every plaintext gRPC client speaks it) in separate
//! namespaces, the proxy reached through a real nftables TPROXY rule, with
//! the issue's rule "grpc-client may POST /com.example.OrderService/.*".
//!
//! ```text
//!  client ns                     node ns                          server ns
//!  198.18.1.2 (frontend) ─veth─ 198.18.1.1 │ 198.18.2.1 ─veth─ 198.18.2.2
//!  198.18.1.3 (grpc-client)     tproxy :8080 → 127.0.0.1:15001      tonic :8080
//! ```
//!
//! The services and messages are in `support/orders.rs` (shared with the
//! bench server); the client is tonic's generic `client::Grpc` over a
//! `Channel` with `ProstCodec`, so no `protoc` is needed.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use meshward_l7_proxy::{
    Direction, HttpRuleSet, L7Event, L7Protocol, L7Proxy, PortPolicy, ProxyConfig, Verdict,
};
use meshward_policy::crd::HttpRule;
use meshward_testkit::{in_netns, run, veth, Netns};
use tokio_stream::StreamExt;
use tonic::codegen::Service;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};
use tonic_prost::ProstCodec;

#[path = "support/orders.rs"]
mod orders;
use orders::*;

#[path = "support/lab.rs"]
mod lab_support;
use lab_support::*;

const FRONTEND: &str = "198.18.1.2";
const GRPC_CLIENT: &str = "198.18.1.3";
const SERVER: &str = "198.18.2.2:8080";
/// The node's address on the server side: the proxy's upstream source.
const NODE: &str = "198.18.2.1";
const FRONTEND_POLICY: &str = "MeshNetworkPolicy shop/frontend-l7";
const GRPC_POLICY: &str = "MeshNetworkPolicy shop/grpc-client-l7";

/// Connects from a chosen source address (both client identities live in
/// one namespace) and counts its connections.
#[derive(Clone)]
struct FromSource {
    src: IpAddr,
    dst: SocketAddr,
    connects: Arc<AtomicUsize>,
}

impl Service<http::Uri> for FromSource {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, std::io::Error>> + Send>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (src, dst) = (self.src, self.dst);
        self.connects.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(SocketAddr::new(src, 0))?;
            let s = tokio::time::timeout(Duration::from_secs(5), sock.connect(dst))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))??;
            s.set_nodelay(true)?;
            Ok(TokioIo::new(s))
        })
    }
}

/// A tonic client on one HTTP/2 connection (a `Channel`).
struct Client {
    grpc: tonic::client::Grpc<Channel>,
    connects: Arc<AtomicUsize>,
}

impl Client {
    async fn connect(src: &str) -> Client {
        let connects = Arc::new(AtomicUsize::new(0));
        let connector = FromSource {
            src: src.parse().unwrap(),
            dst: SERVER.parse().unwrap(),
            connects: connects.clone(),
        };
        let channel = Endpoint::from_shared(format!("http://{SERVER}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(connector)
            .await
            .expect("connect to the tonic server through the proxy");
        let grpc = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Client { grpc, connects }
    }

    async fn unary<Req, Rep>(&self, path: &'static str, req: Req) -> Result<Rep, Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Rep: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = self.grpc.clone();
        let call = async move {
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            grpc.unary(
                Request::new(req),
                PathAndQuery::from_static(path),
                ProstCodec::<Req, Rep>::default(),
            )
            .await
            .map(Response::into_inner)
        };
        tokio::time::timeout(Duration::from_secs(60), call)
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded(format!("{path}: no answer"))))
    }

    /// All replies of a server-streaming call.
    async fn list(&self, req: ListRequest) -> Result<Vec<OrderReply>, Status> {
        let mut grpc = self.grpc.clone();
        let call = async move {
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let mut stream = grpc
                .server_streaming(
                    Request::new(req),
                    PathAndQuery::from_static(LIST_ORDERS),
                    ProstCodec::<ListRequest, OrderReply>::default(),
                )
                .await?
                .into_inner();
            let mut out = Vec::new();
            while let Some(reply) = stream.message().await? {
                out.push(reply);
            }
            Ok(out)
        };
        tokio::time::timeout(Duration::from_secs(60), call)
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("ListOrders: no answer")))
    }
}

fn rule(method: &str, path: &str) -> HttpRule {
    HttpRule {
        method: Some(method.into()),
        path: Some(path.into()),
        ..Default::default()
    }
}

/// grpc-client may POST /com.example.OrderService/.*; frontend has only
/// plain HTTP rules; ingress is open.
fn policy_source() -> impl Fn(IpAddr, SocketAddr, Direction) -> PortPolicy {
    let frontend_rules = [rule("GET", "/api/v1/products.*"), rule("GET", "/healthz")];
    let frontend =
        Arc::new(HttpRuleSet::new(frontend_rules.iter().map(|r| (r, FRONTEND_POLICY))).unwrap());
    let grpc_rule = rule("POST", "/com.example.OrderService/.*");
    let grpc = Arc::new(HttpRuleSet::new([(&grpc_rule, GRPC_POLICY)]).unwrap());
    move |src: IpAddr, dst: SocketAddr, dir: Direction| {
        if dir == Direction::Ingress || dst.port() != 8080 {
            return PortPolicy::AllowAll;
        }
        match src.to_string().as_str() {
            FRONTEND => PortPolicy::Http(frontend.clone()),
            GRPC_CLIENT => PortPolicy::Http(grpc.clone()),
            _ => PortPolicy::AllowAll,
        }
    }
}

struct Lab {
    client: Netns,
    _node: Netns,
    _server: Netns,
    calls: Arc<Calls>,
    events: Arc<Mutex<Vec<L7Event<'static>>>>,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for s in self.stop.drain(..) {
            let _ = s.send(());
        }
    }
}

/// Runs `fut` on its own runtime on a thread inside `ns`, until stopped.
fn spawn_in(
    ns: &Netns,
    make: impl FnOnce(tokio::sync::oneshot::Receiver<()>) -> Pin<Box<dyn std::future::Future<Output = ()>>>
        + Send
        + 'static,
) -> tokio::sync::oneshot::Sender<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let path = ns.path();
    std::thread::spawn(move || {
        in_netns(&path, move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let fut = make(rx);
                ready_tx.send(()).unwrap();
                fut.await
            });
        })
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    tx
}

fn lab() -> Lab {
    let client = Netns::new("gc");
    let node = Netns::new("gn");
    let server = Netns::new("gs");
    veth(&client, "c0", "198.18.1.2/24", &node, "n0", "198.18.1.1/24");
    veth(&node, "n1", "198.18.2.1/24", &server, "s0", "198.18.2.2/24");
    client.ip(&["addr", "add", "198.18.1.3/24", "dev", "c0"]);
    client.ip(&["route", "add", "default", "via", "198.18.1.1"]);
    server.ip(&["route", "add", "default", "via", "198.18.2.1"]);
    node.must(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    tproxy_routing(&node, false);
    let ruleset = "table inet l7grpc {
  chain pre {
    type filter hook prerouting priority mangle; policy accept;
    ip saddr 198.18.1.0/24 tcp dport 8080 meta mark set meta mark | 0x400000 tproxy ip to 127.0.0.1:15001 accept
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

    let calls = Arc::new(Calls::default());
    let events: Arc<Mutex<Vec<L7Event<'static>>>> = Arc::default();
    let mut stop = Vec::new();

    let c = calls.clone();
    stop.push(spawn_in(&server, move |rx| {
        Box::pin(async move {
            let listener = tokio::net::TcpListener::bind(SERVER).await.unwrap();
            let accepted = c.clone();
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(
                move |conn: std::io::Result<tokio::net::TcpStream>| {
                    // Only the proxy's (wait_port probes from the server
                    // namespace itself).
                    if conn
                        .as_ref()
                        .is_ok_and(|s| s.peer_addr().is_ok_and(|p| p.ip().to_string() == NODE))
                    {
                        accepted.accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    conn
                },
            );
            tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(Services(c), incoming, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        })
    }));

    let ev = events.clone();
    stop.push(spawn_in(&node, move |rx| {
        let proxy = L7Proxy::bind(
            ProxyConfig::default(),
            Arc::new(policy_source()),
            Arc::new(move |e: L7Event<'_>| ev.lock().unwrap().push(e.into_owned())),
        )
        .unwrap();
        Box::pin(async move {
            proxy
                .run_until(async {
                    let _ = rx.await;
                })
                .await
        })
    }));

    wait_port(&server, SERVER);
    Lab {
        client,
        _node: node,
        _server: server,
        calls,
        events,
        stop,
    }
}

/// Runs `f` on a fresh runtime in the client namespace.
fn in_client<T: Send + 'static>(
    lab: &Lab,
    f: impl FnOnce() -> Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
) -> T {
    lab.client.run(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
}

fn order(item: &str, quantity: u32, note: Vec<u8>) -> OrderRequest {
    OrderRequest {
        item: item.into(),
        quantity,
        note,
    }
}

fn events_with(lab: &Lab, verdict: Verdict) -> Vec<L7Event<'static>> {
    lab.events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.verdict == verdict)
        .cloned()
        .collect()
}

#[test]
fn order_service_allowed_admin_service_permission_denied() {
    let lab = lab();
    let (placed, listed, admin, frontend, connects) = in_client(&lab, || {
        Box::pin(async {
            let c = Client::connect(GRPC_CLIENT).await;
            let placed: Result<OrderReply, Status> = c
                .unary(PLACE_ORDER, order("widget", 3, b"gift wrap".to_vec()))
                .await;
            let listed = c
                .list(ListRequest {
                    item: "widget".into(),
                    count: 20,
                    payload_bytes: 1000,
                })
                .await;
            let admin: Result<ResetReply, Status> =
                c.unary(RESET, ResetRequest { hard: true }).await;
            // The same connection still works after a denial.
            let again: Result<OrderReply, Status> =
                c.unary(PLACE_ORDER, order("gadget", 1, Vec::new())).await;
            assert_eq!(again.expect("PlaceOrder after a denial").item, "gadget");
            // frontend has no gRPC rules at all.
            let f = Client::connect(FRONTEND).await;
            let frontend: Result<OrderReply, Status> =
                f.unary(PLACE_ORDER, order("widget", 1, Vec::new())).await;
            let connects = c.connects.load(Ordering::Relaxed);
            (placed, listed, admin, frontend, connects)
        })
    });

    let placed = placed.expect("PlaceOrder through the proxy");
    assert_eq!(placed.item, "widget");
    assert_eq!(placed.quantity, 3);
    assert_eq!(placed.note_len, 9);
    assert_eq!(placed.note_sum, checksum(b"gift wrap"));
    assert!(placed.id.starts_with("order-"), "{placed:?}");

    let listed = listed.expect("ListOrders through the proxy");
    assert_eq!(listed.len(), 20);
    for (i, r) in listed.iter().enumerate() {
        assert_eq!(r.id, format!("widget-{i}"));
        assert_eq!(r.quantity, i as u32);
        assert_eq!(r.payload, pattern(i as u32, 1000), "reply {i}");
    }

    let denied = admin.expect_err("AdminService/Reset must be denied");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains(GRPC_POLICY), "{denied:?}");
    let denied = frontend.expect_err("frontend may not call OrderService");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains(FRONTEND_POLICY), "{denied:?}");

    assert_eq!(connects, 1, "the tonic client reconnected");
    // Denied calls never reached the server.
    assert_eq!(lab.calls.reset.load(Ordering::Relaxed), 0);
    assert_eq!(lab.calls.place.load(Ordering::Relaxed), 2);
    assert_eq!(lab.calls.list.load(Ordering::Relaxed), 1);

    // The same denied path as plain HTTP gets HTTP's answer: 403.
    for flag in ["--http1.1", "--http2-prior-knowledge"] {
        let r = run(
            lab.client.command("curl").args([
                "-sS",
                "-i",
                "--max-time",
                "5",
                flag,
                "--interface",
                GRPC_CLIENT,
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "--data",
                "{}",
                &format!("http://{SERVER}{RESET}"),
            ]),
            b"",
            Duration::from_secs(10),
        )
        .unwrap();
        let head = r.stdout.lines().next().unwrap_or_default().to_string();
        assert!(head.contains(" 403"), "{flag}: {}{}", r.stdout, r.stderr);
        assert!(r.stdout.ends_with("Access denied"), "{flag}: {}", r.stdout);
        assert!(!r.stdout.contains("grpc-status"), "{flag}: {}", r.stdout);
    }
    assert_eq!(lab.calls.reset.load(Ordering::Relaxed), 0);

    let denied: Vec<_> = events_with(&lab, Verdict::Denied)
        .into_iter()
        .filter(|e| e.protocol == L7Protocol::Grpc)
        .collect();
    assert_eq!(denied.len(), 2, "{denied:#?}");
    assert!(denied.iter().all(|e| e.protocol == L7Protocol::Grpc));
    assert!(denied.iter().any(|e| e.path == RESET
        && e.method == "POST"
        && e.src.ip().to_string() == GRPC_CLIENT
        && e.dst.to_string() == SERVER
        && e.policy.as_deref() == Some(GRPC_POLICY)));
    assert!(denied
        .iter()
        .any(|e| e.path == PLACE_ORDER && e.policy.as_deref() == Some(FRONTEND_POLICY)));
    let allowed = events_with(&lab, Verdict::Allowed);
    assert_eq!(allowed.len(), 3, "{allowed:#?}");
    assert!(allowed
        .iter()
        .all(|e| e.protocol == L7Protocol::Grpc && e.policy.as_deref() == Some(GRPC_POLICY)));
}

#[test]
fn many_concurrent_calls_on_one_connection() {
    let lab = lab();
    const CALLS: u32 = 200;
    let (results, connects) = in_client(&lab, || {
        Box::pin(async {
            let c = Arc::new(Client::connect(GRPC_CLIENT).await);
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..CALLS {
                let c = c.clone();
                tasks.spawn(async move {
                    let note = pattern(i, 64 + i as usize);
                    let r: Result<OrderReply, Status> = if i % 10 == 9 {
                        // Denied calls interleaved with allowed ones.
                        c.unary::<ResetRequest, ResetReply>(RESET, ResetRequest { hard: false })
                            .await
                            .map(|_| OrderReply::default())
                    } else {
                        c.unary(PLACE_ORDER, order(&format!("item-{i}"), i, note))
                            .await
                    };
                    (i, r)
                });
            }
            let mut results = Vec::new();
            while let Some(r) = tasks.join_next().await {
                results.push(r.expect("call task"));
            }
            (results, c.connects.load(Ordering::Relaxed))
        })
    });
    assert_eq!(results.len(), CALLS as usize);
    let mut ok = 0;
    for (i, r) in results {
        if i % 10 == 9 {
            let e = r.expect_err("Reset must be denied");
            assert_eq!(e.code(), Code::PermissionDenied, "call {i}: {e:?}");
            continue;
        }
        let r = r.unwrap_or_else(|e| panic!("call {i}: {e:?}"));
        let note = pattern(i, 64 + i as usize);
        assert_eq!(r.item, format!("item-{i}"));
        assert_eq!(r.quantity, i);
        assert_eq!(r.note_len, note.len() as u64);
        assert_eq!(r.note_sum, checksum(&note), "call {i}");
        ok += 1;
    }
    assert_eq!(ok, 180);
    assert_eq!(connects, 1, "all calls on one client connection");
    assert_eq!(lab.calls.place.load(Ordering::Relaxed), 180);
    assert_eq!(lab.calls.reset.load(Ordering::Relaxed), 0);
    // The proxy multiplexed them upstream too: one h2 connection.
    assert_eq!(
        lab.calls.accepted.load(Ordering::Relaxed),
        1,
        "upstream connections for {CALLS} concurrent calls"
    );
}

#[test]
fn large_messages_stream_through() {
    let lab = lab();
    const BIG: usize = 6 << 20;
    let (unary, listed) = in_client(&lab, || {
        Box::pin(async {
            let c = Client::connect(GRPC_CLIENT).await;
            // A 6 MiB request message...
            let unary: Result<OrderReply, Status> = c
                .unary(PLACE_ORDER, order("bulk", 1, pattern(7, BIG)))
                .await;
            // ... and server-streamed replies: 3 x 4 MiB, then 200 x 16 KiB.
            let big = c
                .list(ListRequest {
                    item: "big".into(),
                    count: 3,
                    payload_bytes: 4 << 20,
                })
                .await;
            let many = c
                .list(ListRequest {
                    item: "many".into(),
                    count: 200,
                    payload_bytes: 16 << 10,
                })
                .await;
            (unary, big.and_then(|b| many.map(|m| (b, m))))
        })
    });
    // Replies are told apart by their payloads too.
    assert_ne!(pattern(0, 64), pattern(1, 64));
    let unary = unary.expect("6 MiB PlaceOrder");
    assert_eq!(unary.note_len, BIG as u64);
    assert_eq!(unary.note_sum, checksum(&pattern(7, BIG)));
    let (big, many) = listed.expect("streamed replies");
    assert_eq!(big.len(), 3);
    for (i, r) in big.iter().enumerate() {
        assert_eq!(r.payload.len(), 4 << 20);
        assert!(r.payload == pattern(i as u32, 4 << 20), "big reply {i}");
    }
    assert_eq!(many.len(), 200);
    for (i, r) in many.iter().enumerate() {
        assert_eq!(r.id, format!("many-{i}"));
        assert!(r.payload == pattern(i as u32, 16 << 10), "reply {i}");
    }
}
