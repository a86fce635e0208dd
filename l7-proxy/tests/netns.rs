//! The proxy in a node namespace, reached through a real nftables TPROXY
//! rule by real clients (curl, openssl, raw sockets) in a client namespace,
//! forwarding to a real server namespace.
//!
//! ```text
//!  client ns                     node ns                          server ns
//!  198.18.1.2 (frontend) ─veth─ 198.18.1.1 │ 198.18.2.1 ─veth─ 198.18.2.2
//!  198.18.1.3 (grpc-client)     tproxy :8080,:8443 → 127.0.0.1:15001   hyper :8080
//!                                                                      openssl s_server :8443
//! ```

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshward_l7_proxy::{
    Direction, HttpRuleSet, L7Event, L7Proxy, PortPolicy, ProxyConfig, SniRuleSet, Verdict,
};
use meshward_policy::crd::{HeaderMatch, HttpRule};
use meshward_policy::fqdn::FqdnSelector;
use meshward_testkit::{in_netns, run, veth, Netns};

#[path = "support/lab.rs"]
mod lab_support;
use lab_support::*;

const FRONTEND: &str = "198.18.1.2";
const GRPC_CLIENT: &str = "198.18.1.3";
const SERVER: &str = "198.18.2.2";
/// The server's port where it answers as soon as it has a request head,
/// before any body (an early response), then reads the body away.
const EARLY_PORT: u16 = 8081;
/// The early response's body.
const EARLY_BODY: &str = "too large\n";

/// What the upstream server saw: method, path and query, headers, body length.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    headers: http::HeaderMap,
    body_len: usize,
}

type Log = Arc<Mutex<Vec<Seen>>>;

async fn upstream(req: Request<Incoming>, log: Log) -> Result<Response<Full<Bytes>>, Infallible> {
    let (mut parts, body) = req.into_parts();
    // A test's way to hold the response back for a while.
    if let Some(ms) = parts
        .headers
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms.min(5000))).await;
    }
    let upgrade = parts.headers.contains_key("upgrade");
    let mut req = Request::from_parts(parts.clone(), body);
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let body = req.into_body();
    let body_len = if upgrade {
        0
    } else {
        body.collect()
            .await
            .map(|b| b.to_bytes().len())
            .unwrap_or(0)
    };
    log.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        target: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: std::mem::take(&mut parts.headers),
        body_len,
    });
    if let Some(on) = on_upgrade {
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 64];
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                if let Ok(n) = io.read(&mut buf).await {
                    let _ = io.write_all(&buf[..n]).await;
                }
            }
        });
        return Ok(Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    let mut resp = Response::new(Full::new(Bytes::from(format!(
        "ok {} {} {body_len}\n",
        parts.method,
        parts.uri.path()
    ))));
    if parts.headers.is_empty() {
        resp.headers_mut().insert("x-empty", "1".parse().unwrap());
    }
    Ok(resp)
}

fn rule(method: &str, path: &str) -> HttpRule {
    HttpRule {
        method: Some(method.into()),
        path: Some(path.into()),
        ..Default::default()
    }
}

/// The seed example.
fn policy_source() -> impl Fn(IpAddr, SocketAddr, Direction) -> PortPolicy {
    let mut orders = rule("POST", "/api/v1/orders");
    orders.header_matches = Some(vec![HeaderMatch {
        name: "content-type".into(),
        value: Some("application/json".into()),
    }]);
    let frontend_rules = [
        rule("GET", "/api/v1/products.*"),
        orders,
        rule("GET", "/healthz"),
        rule("GET", "/ws"),
    ];
    let frontend = Arc::new(
        HttpRuleSet::new(
            frontend_rules
                .iter()
                .map(|r| (r, "MeshNetworkPolicy shop/frontend-l7")),
        )
        .unwrap(),
    );
    let grpc_rule = rule("POST", "/com.example.OrderService/.*");
    let grpc = Arc::new(
        HttpRuleSet::new([(&grpc_rule, "MeshNetworkPolicy shop/grpc-client-l7")]).unwrap(),
    );
    let sni = Arc::new(SniRuleSet::new([(
        FqdnSelector::match_name("api.example.test").unwrap(),
        "MeshNetworkPolicy shop/tls".to_string(),
    )]));
    move |src: IpAddr, dst: SocketAddr, dir: Direction| {
        if dir == Direction::Ingress {
            return PortPolicy::AllowAll;
        }
        match (src.to_string().as_str(), dst.port()) {
            (_, 8443) => PortPolicy::Sni(sni.clone()),
            (FRONTEND, 8080 | EARLY_PORT) => PortPolicy::Http(frontend.clone()),
            (GRPC_CLIENT, 8080) => PortPolicy::Http(grpc.clone()),
            _ => PortPolicy::AllowAll,
        }
    }
}

struct Lab {
    client: Netns,
    _node: Netns,
    server: Netns,
    log: Log,
    events: Arc<Mutex<Vec<L7Event<'static>>>>,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
    tls_server: Option<Child>,
    _dir: meshward_testkit::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for s in self.stop.drain(..) {
            let _ = s.send(());
        }
        if let Some(mut c) = self.tls_server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `fut` on its own runtime on a thread inside `ns`, until stopped.
fn spawn_in(
    ns: &Netns,
    make: impl FnOnce(
            tokio::sync::oneshot::Receiver<()>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>
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

/// Answers 413 once a request head is in and what came with it (within
/// 300 ms) is read, without waiting for the rest of its body; then reads
/// whatever comes (bounded) until the peer closes.
async fn early_responder(mut s: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        match s.read(&mut buf).await {
            Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(300), async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let resp = format!(
        "HTTP/1.1 413 Content Too Large\r\ncontent-length: {}\r\n\r\n{EARLY_BODY}",
        EARLY_BODY.len()
    );
    if s.write_all(resp.as_bytes()).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

fn lab() -> Lab {
    let client = Netns::new("c");
    let node = Netns::new("n");
    let server = Netns::new("s");
    veth(&client, "c0", "198.18.1.2/24", &node, "n0", "198.18.1.1/24");
    veth(&node, "n1", "198.18.2.1/24", &server, "s0", "198.18.2.2/24");
    client.ip(&["addr", "add", "198.18.1.3/24", "dev", "c0"]);
    client.ip(&["route", "add", "default", "via", "198.18.1.1"]);
    server.ip(&["route", "add", "default", "via", "198.18.2.1"]);
    node.must(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    tproxy_routing(&node, false);
    let ruleset = "table inet l7test {
  chain pre {
    type filter hook prerouting priority mangle; policy accept;
    ip saddr 198.18.1.0/24 tcp dport { 8080, 8081, 8443 } meta mark set meta mark | 0x400000 tproxy ip to 127.0.0.1:15001 accept
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

    let log: Log = Arc::default();
    let events: Arc<Mutex<Vec<L7Event<'static>>>> = Arc::default();
    let mut stop = Vec::new();

    let l = log.clone();
    stop.push(spawn_in(&server, move |mut rx| {
        Box::pin(async move {
            let listener = tokio::net::TcpListener::bind((SERVER, 8080)).await.unwrap();
            loop {
                tokio::select! {
                    _ = &mut rx => return,
                    Ok((s, _)) = listener.accept() => {
                        let l = l.clone();
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req| upstream(req, l.clone()));
                            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                .serve_connection_with_upgrades(TokioIo::new(s), svc)
                                .await;
                        });
                    }
                }
            }
        })
    }));

    stop.push(spawn_in(&server, move |mut rx| {
        Box::pin(async move {
            let listener = tokio::net::TcpListener::bind((SERVER, EARLY_PORT))
                .await
                .unwrap();
            loop {
                tokio::select! {
                    _ = &mut rx => return,
                    Ok((s, _)) = listener.accept() => { tokio::spawn(early_responder(s)); }
                }
            }
        })
    }));

    let ev = events.clone();
    stop.push(spawn_in(&node, move |rx| {
        let proxy = L7Proxy::bind(
            ProxyConfig {
                header_read_timeout: Duration::from_secs(2),
                ..ProxyConfig::default()
            },
            Arc::new(policy_source()),
            Arc::new(move |e: L7Event<'_>| ev.lock().unwrap().push(e.into_owned())),
        )
        .unwrap();
        Box::pin(async move {
            proxy
                .run_until(async move {
                    let _ = rx.await;
                })
                .await
        })
    }));

    // TLS server: openssl s_server with a throwaway certificate.
    let dir = meshward_testkit::TempDir::new();
    let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
    let gen = run(
        Command::new("openssl").args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=api.example.test",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]),
        b"",
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(gen.success(), "openssl req: {}", gen.stderr);
    let tls_server = server
        .command("openssl")
        .args([
            "s_server",
            "-quiet",
            "-www",
            "-accept",
            "198.18.2.2:8443",
            "-key",
            key.to_str().unwrap(),
            "-cert",
            cert.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lab = Lab {
        client,
        _node: node,
        server,
        log,
        events,
        stop,
        tls_server: Some(tls_server),
        _dir: dir,
    };
    wait_port(&lab.server, "198.18.2.2:8080");
    wait_port(&lab.server, "198.18.2.2:8443");
    wait_port(&lab.server, &format!("{SERVER}:{EARLY_PORT}"));
    lab
}

/// Sends raw bytes from `src` in the client namespace; returns what came back.
fn raw(lab: &Lab, src: &str, bytes: &[u8]) -> String {
    let src: IpAddr = src.parse().unwrap();
    let bytes = bytes.to_vec();
    lab.client.run(move || {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&SocketAddr::new(src, 0).into()).unwrap();
        let dst: SocketAddr = "198.18.2.2:8080".parse().unwrap();
        sock.connect_timeout(&dst.into(), Duration::from_secs(2))
            .unwrap();
        let mut s: TcpStream = sock.into();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&bytes).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
}

fn seen_targets(lab: &Lab) -> Vec<String> {
    lab.log
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.target.clone())
        .collect()
}

const URL: &str = "http://198.18.2.2:8080";

#[test]
fn seed_policy_over_http1_and_http2() {
    let lab = lab();
    let u = |p: &str| format!("{URL}{p}");
    for flags in [&["--http1.1"][..], &["--http2-prior-knowledge"][..]] {
        let mut args = flags.to_vec();
        let url = u("/api/v1/products/42?x=1");
        args.push(&url);
        let (status, out) = curl(&lab.client, &args);
        assert_eq!(status, 200, "{flags:?}: {out}");
        assert!(out.contains("ok GET /api/v1/products/42"), "{out}");

        let url = u("/healthz");
        let (status, _) = curl(&lab.client, &[flags[0], &url]);
        assert_eq!(status, 200);

        let url = u("/api/v1/orders");
        let (status, out) = curl(
            &lab.client,
            &[
                flags[0],
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "--data",
                "{}",
                &url,
            ],
        );
        assert_eq!(status, 200, "{out}");
        let (status, out) = curl(
            &lab.client,
            &[
                flags[0],
                "-X",
                "POST",
                "-H",
                "content-type: text/plain",
                "--data",
                "{}",
                &url,
            ],
        );
        assert_eq!(status, 403, "{out}");
        assert!(out.ends_with("Access denied"), "{out}");

        let url = u("/admin");
        let (status, out) = curl(&lab.client, &[flags[0], &url]);
        assert_eq!(status, 403, "{out}");
        let url = u("/api/v1/products");
        let (status, _) = curl(&lab.client, &[flags[0], "-X", "DELETE", &url]);
        assert_eq!(status, 403);
    }
    // HTTP/2: a path in normal form goes on as it came, query and all; one
    // that is not goes on normalised, with its query.
    for (path, seen) in [
        (
            "/api/v1/products/7?a=1&b=%2F",
            "/api/v1/products/7?a=1&b=%2F",
        ),
        ("/api/v2/../v1/products//8?c=3", "/api/v1/products/8?c=3"),
    ] {
        let url = u(path);
        let (status, out) = curl(
            &lab.client,
            &["--http2-prior-knowledge", "--path-as-is", &url],
        );
        assert_eq!(status, 200, "{path}: {out}");
        assert!(seen_targets(&lab).contains(&seen.to_string()), "{path}");
    }
    // Nothing denied reached the server.
    for t in seen_targets(&lab) {
        assert!(!t.starts_with("/admin"), "{t}");
    }
    let events = lab.events.lock().unwrap();
    let denied: Vec<_> = events
        .iter()
        .filter(|e| e.verdict == Verdict::Denied)
        .collect();
    assert_eq!(denied.len(), 6, "{events:#?}");
    assert!(denied.iter().any(|e| e.path == "/admin"
        && e.method == "GET"
        && e.src.ip().to_string() == FRONTEND
        && e.dst.to_string() == "198.18.2.2:8080"
        && e.policy.as_deref() == Some("MeshNetworkPolicy shop/frontend-l7")));
    let allowed = events
        .iter()
        .filter(|e| e.verdict == Verdict::Allowed)
        .count();
    // Three per protocol, and the two HTTP/2 targets.
    assert_eq!(allowed, 8);
}

#[test]
fn grpc_denied_with_permission_denied() {
    let lab = lab();
    let url = format!("{URL}/com.example.OrderService/Place");
    let grpc = |src: &str| {
        curl(
            &lab.client,
            &[
                "--http2-prior-knowledge",
                "--interface",
                src,
                "-X",
                "POST",
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "--data-binary",
                "hello",
                &url,
            ],
        )
    };
    let (status, out) = grpc(GRPC_CLIENT);
    assert_eq!(status, 200, "{out}");
    assert!(!out.contains("grpc-status"), "{out}");
    assert!(seen_targets(&lab).contains(&"/com.example.OrderService/Place".to_string()));
    let seen = lab.log.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.headers["te"], "trailers");
    assert_eq!(seen.body_len, 5);
    assert_eq!(seen.method, "POST");

    let (status, out) = grpc(FRONTEND);
    assert_eq!(status, 200, "{out}");
    assert!(out.contains("grpc-status: 7"), "{out}");
    assert!(
        out.contains("grpc-message: denied by policy: MeshNetworkPolicy shop/frontend-l7"),
        "{out}"
    );
    // grpc-client may not do what frontend may.
    let (status, _) = curl(
        &lab.client,
        &["--interface", GRPC_CLIENT, &format!("{URL}/healthz")],
    );
    assert_eq!(status, 403);
}

#[test]
fn bypass_attempts_denied_or_refused() {
    let lab = lab();
    let deny = [
        "/api/v1/../admin",
        "/api/v1/%2e%2e/admin",
        "/api/v1/%2E%2E/%2e%2e/admin",
        "//admin",
        "/API/v1/products",
        "/Healthz",
    ];
    for p in deny {
        let (status, out) = curl(&lab.client, &["--path-as-is", &format!("{URL}{p}")]);
        assert_eq!(status, 403, "{p}: {out}");
    }
    for p in [
        "/api/v1/products%2F..%2F..%2Fadmin",
        "/api/v1/products/%00",
        "/api/v1/products/..;/x",
    ] {
        let (status, out) = curl(&lab.client, &["--path-as-is", &format!("{URL}{p}")]);
        assert_eq!(status, 400, "{p}: {out}");
    }
    // A path that only normalises into the allowed prefix is fine, and the
    // server sees the normalised form.
    let (status, out) = curl(
        &lab.client,
        &["--path-as-is", &format!("{URL}/api/v2/../v1/products//a")],
    );
    assert_eq!(status, 200, "{out}");
    assert!(seen_targets(&lab).contains(&"/api/v1/products/a".to_string()));

    // Request smuggling: CL + TE, duplicate CL, bad chunking, header injection.
    let smuggle = [
        &b"POST /api/v1/orders HTTP/1.1\r\nHost: s\r\nContent-Type: application/json\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: s\r\n\r\n"[..],
        b"POST /api/v1/orders HTTP/1.1\r\nHost: s\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}GET /admin HTTP/1.1\r\nHost: s\r\n\r\n",
        b"POST /api/v1/orders HTTP/1.1\r\nHost: s\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}GET /admin HTTP/1.1\r\nHost: s\r\n\r\n",
        b"POST /api/v1/orders HTTP/1.1\r\nHost: s\r\nContent-Type: application/json\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: s\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: s\r\nX-A: a\rGET /admin HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: s\r\nX-A: a\r\n folded\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: s\r\nHost: evil\r\n\r\n",
    ];
    for req in smuggle {
        let out = raw(&lab, FRONTEND, req);
        assert!(
            out.starts_with("HTTP/1.1 400"),
            "{}: {out}",
            String::from_utf8_lossy(req)
        );
    }
    // Invalid chunking after an allowed head: the upstream never gets a
    // complete request, nor the smuggled one.
    let before = lab.log.lock().unwrap().len();
    let out = raw(
        &lab,
        FRONTEND,
        b"POST /api/v1/orders HTTP/1.1\r\nHost: s\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: s\r\n\r\n",
    );
    assert!(!out.contains("200 OK"), "{out}");
    std::thread::sleep(Duration::from_millis(200));
    let after: Vec<Seen> = lab.log.lock().unwrap()[before..].to_vec();
    assert!(
        after
            .iter()
            .all(|s| s.target != "/admin" && s.body_len == 0),
        "{after:?}"
    );
    assert!(!seen_targets(&lab).iter().any(|t| t.contains("admin")));
}

#[test]
fn streaming_bodies_and_websocket_upgrade() {
    let lab = lab();
    // 4 MiB upload through the proxy.
    let big = lab._dir.join("big");
    std::fs::write(&big, vec![b'x'; 4 << 20]).unwrap();
    let url = format!("{URL}/api/v1/orders");
    let data = format!("@{}", big.display());
    let (status, out) = curl(
        &lab.client,
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data-binary",
            &data,
            &url,
        ],
    );
    assert_eq!(status, 200, "{out}");
    assert!(
        out.contains(&format!("ok POST /api/v1/orders {}", 4 << 20)),
        "{out}"
    );
    // Same upload chunked.
    let (status, out) = curl(
        &lab.client,
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-H",
            "transfer-encoding: chunked",
            "--data-binary",
            &data,
            &url,
        ],
    );
    assert_eq!(status, 200, "{out}");
    assert!(out.contains(&format!("{}", 4 << 20)), "{out}");

    // WebSocket-style upgrade, then bytes both ways.
    let out = raw(
        &lab,
        FRONTEND,
        b"GET /ws HTTP/1.1\r\nHost: s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nping",
    );
    assert!(out.starts_with("HTTP/1.1 101"), "{out}");
    assert!(out.ends_with("ping"), "{out}");
    // A denied upgrade never reaches the server.
    let out = raw(
        &lab,
        FRONTEND,
        b"GET /admin HTTP/1.1\r\nHost: s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    // An h2c upgrade is not passed on: the server sees a plain request
    // (and so the connection stays HTTP/1.1 under the proxy's eyes).
    let before = lab.log.lock().unwrap().len();
    let out = raw(
        &lab,
        FRONTEND,
        b"GET /healthz HTTP/1.1\r\nHost: s\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let seen = lab.log.lock().unwrap()[before..].to_vec();
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].headers.contains_key("upgrade"), "{seen:?}");
    assert!(!seen[0].headers.contains_key("http2-settings"), "{seen:?}");
}

#[test]
fn keep_alive_reuses_upstream_connections() {
    let lab = lab();
    let url = format!("{URL}/healthz");
    // 20 sequential requests on one client connection each, 5 times.
    for _ in 0..5 {
        let mut args = vec!["--http1.1"];
        for _ in 0..20 {
            args.push(&url);
        }
        let (status, out) = curl(&lab.client, &args);
        assert_eq!(status, 200, "{out}");
        assert_eq!(out.matches("ok GET /healthz").count(), 20, "{out}");
    }
    // The server side saw few connections: count ESTABLISHED/TIME_WAIT
    // sockets on :8080 from the node.
    let (_, ss) = lab.server.exec(&["ss", "-Htan", "sport", "= :8080"]);
    let conns = ss.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(
        conns <= 5,
        "{conns} upstream connections for 100 requests:\n{ss}"
    );
    // Kept for the next client of the same source only while idle under
    // the limit (4 s by default): then closed, none outlives it for long.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, ss) = lab
            .server
            .exec(&["ss", "-Htn", "state", "established", "sport", "= :8080"]);
        if ss.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "upstream connections outlive their clients:\n{ss}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Upstream connections of the server, established now.
fn upstream_established(lab: &Lab) -> usize {
    let (_, ss) = lab
        .server
        .exec(&["ss", "-Htn", "state", "established", "sport", "= :8080"]);
    ss.lines().filter(|l| !l.trim().is_empty()).count()
}

#[test]
fn only_idempotent_bodiless_requests_take_kept_upstream_connections() {
    let lab = lab();
    // A client connection per request (curl exits). The GET's upstream
    // connection is kept (4 s) for the next client.
    let (status, out) = curl(&lab.client, &[&format!("{URL}/healthz")]);
    assert_eq!(status, 200, "{out}");
    assert_eq!(upstream_established(&lab), 1);
    // A bodiless POST is not one a proxy may send twice: it must not ride a
    // kept connection (which could turn out closed), so it gets its own.
    let (status, out) = curl(
        &lab.client,
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-H",
            "content-length: 0",
            &format!("{URL}/api/v1/orders"),
        ],
    );
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        upstream_established(&lab),
        2,
        "the POST took the kept connection"
    );
    // A GET takes a kept one: still two.
    let (status, out) = curl(&lab.client, &[&format!("{URL}/healthz")]);
    assert_eq!(status, 200, "{out}");
    assert_eq!(upstream_established(&lab), 2, "the GET did not reuse one");
}

#[test]
fn tls_server_name_checked() {
    let lab = lab();
    let ok = curl(
        &lab.client,
        &[
            "-k",
            "--resolve",
            "api.example.test:8443:198.18.2.2",
            "https://api.example.test:8443/",
        ],
    );
    assert_eq!(ok.0, 200, "{}", ok.1);
    let bad = curl(
        &lab.client,
        &[
            "-k",
            "--resolve",
            "evil.example.test:8443:198.18.2.2",
            "https://evil.example.test:8443/",
        ],
    );
    assert_eq!(bad.0, 0, "{}", bad.1);
    assert!(bad.1.to_lowercase().contains("reset"), "{}", bad.1);
    // No SNI at all (an IP literal): reset too.
    let bare = curl(&lab.client, &["-k", "https://198.18.2.2:8443/"]);
    assert_eq!(bare.0, 0, "{}", bare.1);
    let events = lab.events.lock().unwrap();
    assert!(events.iter().any(|e| e.verdict == Verdict::Denied
        && e.host.as_deref() == Some("evil.example.test")
        && e.policy.as_deref() == Some("MeshNetworkPolicy shop/tls")));
    assert!(events
        .iter()
        .any(|e| e.verdict == Verdict::Allowed && e.host.as_deref() == Some("api.example.test")));
}

#[test]
fn slow_header_client_is_cut_off() {
    let lab = lab();
    // Opens, sends half a head, then stalls past the 2 s header timeout.
    let start = Instant::now();
    let out = lab.client.run(|| {
        let mut s =
            TcpStream::connect_timeout(&"198.18.2.2:8080".parse().unwrap(), Duration::from_secs(2))
                .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: s\r\n")
            .unwrap();
        let mut out = Vec::new();
        let r = s.read_to_end(&mut out);
        (r.is_ok(), String::from_utf8_lossy(&out).into_owned())
    });
    assert!(
        out.0,
        "the proxy closed the connection (no read timeout): {out:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(8));
    assert!(!out.1.contains("200"), "{out:?}");
}

#[test]
fn early_response_says_connection_close() {
    let lab = lab();
    // A POST whose body (1 MB announced) has barely begun when the
    // upstream answers 413: the proxy must tell the client it closes the
    // connection, then close it.
    // The head of that POST, with `extra` headers, and its first 1000
    // bytes, on a new connection.
    let early_post = |extra: &str| {
        let dst: SocketAddr = format!("{SERVER}:{EARLY_PORT}").parse().unwrap();
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = format!(
            "POST /api/v1/orders HTTP/1.1\r\nHost: s\r\ncontent-type: application/json\r\n{extra}content-length: 1000000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&[b'x'; 1000]).unwrap();
        s
    };
    let out = lab.client.run(|| {
        let mut s = early_post("");
        // Everything until the proxy closes (it must: nothing more is sent).
        let mut out = Vec::new();
        let closed = s.read_to_end(&mut out).is_ok();
        (closed, String::from_utf8_lossy(&out).into_owned())
    });
    let (closed, text) = out;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    let head = text.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    assert!(
        head.lines().any(|l| l == "connection: close"),
        "early response without Connection: close: {text:?}"
    );
    assert!(text.ends_with(EARLY_BODY), "{text:?}");
    assert!(closed, "the proxy did not close the connection: {text:?}");

    // The same from a client that said close: its last request, but the
    // rest of its body may still come, so the proxy lingers (reading it
    // away) instead of closing, which would answer it with a reset.
    let (text, more) = lab.client.run(|| {
        let mut s = early_post("connection: close\r\n");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let mut more = Ok(());
        for _ in 0..5 {
            more = s.write_all(&[b'x'; 1000]);
            if more.is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        (String::from_utf8_lossy(&out).into_owned(), more)
    });
    assert!(text.starts_with("HTTP/1.1 413"), "{text:?}");
    more.expect("the rest of the body met a reset: the proxy closed instead of lingering");

    // A body sent whole before the response keeps the connection open:
    // two requests on one connection, both answered, no close.
    let url = format!("{URL}/api/v1/orders");
    let (status, out) = curl(
        &lab.client,
        &[
            "--http1.1",
            "-H",
            "content-type: application/json",
            "--data-binary",
            "{}",
            &url,
            "-H",
            "content-type: application/json",
            "--data-binary",
            "{}",
            &url,
        ],
    );
    assert_eq!(status, 200, "{out}");
    assert!(
        !out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
}

#[test]
fn close_after_the_last_request_lingers_only_for_unread_input() {
    let lab = lab();
    let dst: SocketAddr = format!("{SERVER}:8080").parse().unwrap();
    let request = b"GET /healthz HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n";
    let connect = move || {
        let s = TcpStream::connect_timeout(&dst, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    let (after_close, buffered, unread) = lab.client.run(move || {
        // 1. The client said close and sent nothing more: once the
        // response is out the proxy closes its socket at once (a FIN), not
        // after a lingering wait (up to 2 s) for the client's FIN. Bytes
        // the client sends afterwards then meet a closed socket, which
        // resets.
        let mut s = connect();
        s.write_all(request).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert!(
            String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"),
            "{out:?}"
        );
        let deadline = Instant::now() + Duration::from_millis(1500);
        let after_close = loop {
            let w = s.write_all(b"x");
            if w.is_err() || Instant::now() > deadline {
                break w;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        // The proxy must not close with the client's bytes unread in the
        // kernel: that resets the connection, and a reset can destroy the
        // response on its way. It lingers instead, and the client reads
        // the whole response and a clean end.
        let finish = |mut s: TcpStream| {
            let mut out = Vec::new();
            let end = s.read_to_end(&mut out).map(|_| ());
            (end, String::from_utf8_lossy(&out).into_owned())
        };
        // 2. More bytes past the request than the proxy reads at once.
        let mut s = connect();
        let mut bytes = request.to_vec();
        bytes.extend_from_slice(&[b'y'; 64 * 1024]);
        s.write_all(&bytes).unwrap();
        let buffered = finish(s);
        // 3. Bytes that come after the proxy has read the request, while
        // the server holds its response back: only the kernel knows of
        // them when the response is out.
        let mut s = connect();
        s.write_all(
            b"GET /healthz HTTP/1.1\r\nHost: s\r\nConnection: close\r\nx-delay-ms: 600\r\n\r\n",
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        s.write_all(b"zz").unwrap();
        let unread = finish(s);
        (after_close, buffered, unread)
    });
    let err = after_close.expect_err("the proxy kept the closed connection open (lingered)");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{err}"
    );
    for (what, (end, text)) in [("buffered", buffered), ("unread", unread)] {
        assert!(text.starts_with("HTTP/1.1 200"), "{what}: {text:?}");
        assert!(text.ends_with("ok GET /healthz 0\n"), "{what}: {text:?}");
        end.unwrap_or_else(|e| panic!("{what}: a reset after the response, not a clean end: {e}"));
    }
}
