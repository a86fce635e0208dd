//! End to end: `toPorts[].rules.http` enforced by the node agents' L7
//! proxy (nftables TPROXY on the ports with HTTP rules), egress to the
//! lab's external HTTP servers and ingress to a server in a pod reached
//! from another node through the mesh; denials as flow events and metrics.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// `curl` in a pod: (HTTP status, body), or None when no HTTP answer came
/// (connection dropped or refused).
fn http(lab: &TestLab, pod: &str, args: &[&str]) -> Option<(u16, String)> {
    let mut all = vec![
        "exec",
        pod,
        "curl",
        "-sS",
        "--connect-timeout",
        "1",
        "-m",
        "4",
        "-w",
        "\n%{http_code}",
    ];
    all.extend_from_slice(args);
    let out = lab.run(&all);
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_string()))
}

fn get(lab: &TestLab, pod: &str, url: &str) -> Option<(u16, String)> {
    http(lab, pod, &[url])
}

/// A tiny HTTP/1.1 server in a pod's namespace (the test thread only opens
/// the socket there): answers `200 served PATH` to every request, one per
/// connection, until `stop`.
fn pod_server(lab: &TestLab, pod: &str, port: u16) -> Arc<AtomicBool> {
    let addr: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let listener = in_ns(&lab.ns(pod), || TcpListener::bind(addr).unwrap());
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = stop.clone();
    thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(600);
        while !done.load(Ordering::Relaxed) && Instant::now() < end {
            let Ok((mut s, _)) = listener.accept() else {
                thread::sleep(Duration::from_millis(10));
                continue;
            };
            thread::spawn(move || {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head);
                let path = text.split(' ').nth(1).unwrap_or("?").to_string();
                let body = format!("served {path}");
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    stop
}

/// The seed's frontend policy: HTTP rules on 198.18.100.10:80, plain L4
/// on port 8080 of the same server.
const FRONTEND: &str = r#"
apiVersion: meshward.io/v1alpha1
kind: MeshNetworkPolicy
metadata: {name: frontend, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  egress:
  - toCIDR: [198.18.100.10/32]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - method: GET
          path: "/api/v1/products.*"
        - method: POST
          path: /api/v1/orders
          headerMatches: [{name: Content-Type, value: application/json}]
        - method: GET
          path: /healthz
  - toCIDR: [198.18.100.10/32]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
  - toEndpoints: [{matchLabels: {app: backend}}]
    toPorts:
    - ports: [{port: "9090", protocol: TCP}]
      rules:
        http:
        - method: GET
          path: "/public/.*"
"#;

/// The backend (on the other node) admits the frontend only: the proxy's
/// onward connection must come from the frontend's address.
const BACKEND_INGRESS: &str = r#"
apiVersion: meshward.io/v1alpha1
kind: MeshNetworkPolicy
metadata: {name: backend, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts:
    - ports: [{port: "9090", protocol: TCP}]
"#;

const API_INGRESS: &str = r#"
apiVersion: meshward.io/v1alpha1
kind: MeshNetworkPolicy
metadata: {name: api, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http:
        - method: GET
          path: "/public/.*"
"#;

const DENIED: (u16, &str) = (403, "Access denied");

#[test]
fn http_rules_egress_and_ingress_through_the_proxy() {
    let lab = TestLab::new("l7");
    lab.up_with(
        2,
        2,
        &[
            "--pod-labels",
            "node1-pod1=app=frontend",
            "--pod-labels",
            "node1-pod2=app=api",
            "--pod-labels",
            "node2-pod1=app=web",
            "--pod-labels",
            "node2-pod2=app=backend",
        ],
    );
    let _server = pod_server(&lab, "node1-pod2", 8080);
    let _backend = pod_server(&lab, "node2-pod2", 9090);
    let backend_url = |path: &str| format!("http://{}:9090{path}", lab.ip("node2-pod2"));
    let api = lab.ip("node1-pod2");
    let api_url = |path: &str| format!("http://{api}:8080{path}");
    // before any policy: everything reachable, nothing judged (retried: the
    // first connection of a fresh lab can miss curl's 1 s connect timeout
    // on a loaded machine)
    eventually(
        "the external server answering",
        Duration::from_secs(20),
        || get(&lab, "node1-pod1", "http://198.18.100.10/nothing").map(|r| r.0) == Some(404),
    );
    assert_eq!(
        get(&lab, "node2-pod2", &api_url("/private")).map(|r| r.0),
        Some(200)
    );

    apply(&lab, "frontend.yaml", FRONTEND);
    apply(&lab, "api.yaml", API_INGRESS);
    apply(&lab, "backend.yaml", BACKEND_INGRESS);
    eventually("the HTTP rules to apply", Duration::from_secs(20), || {
        get(&lab, "node1-pod1", "http://198.18.100.10/nothing")
            .is_some_and(|(c, b)| (c, b.as_str()) == DENIED)
    });

    // --- egress: allowed requests reach the server (busybox answers 404
    // for paths it has no file for), the rest gets the proxy's 403
    let fe = "node1-pod1";
    let srv = "http://198.18.100.10";
    assert_eq!(
        get(&lab, fe, &format!("{srv}/api/v1/products/42")).map(|r| r.0),
        Some(404)
    );
    assert_eq!(
        get(&lab, fe, &format!("{srv}/healthz")).map(|r| r.0),
        Some(404)
    );
    let orders = format!("{srv}/api/v1/orders");
    let json_post = http(
        &lab,
        fe,
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            "{}",
            &orders,
        ],
    )
    .expect("an answer");
    assert_ne!(json_post.0, 403, "{json_post:?}");
    let plain_post = http(
        &lab,
        fe,
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: text/plain",
            "-d",
            "x",
            &orders,
        ],
    )
    .expect("an answer");
    assert_eq!((plain_post.0, plain_post.1.as_str()), DENIED);
    let delete = http(
        &lab,
        fe,
        &["-X", "DELETE", &format!("{srv}/api/v1/products/1")],
    )
    .expect("an answer");
    assert_eq!((delete.0, delete.1.as_str()), DENIED);
    // a path outside the rules; dot segments are normalised first
    let r = get(&lab, fe, &format!("{srv}/admin")).expect("an answer");
    assert_eq!((r.0, r.1.as_str()), DENIED);
    let r = http(
        &lab,
        fe,
        &[
            "--path-as-is",
            &format!("{srv}/api/v1/products/../../admin"),
        ],
    )
    .expect("an answer");
    assert_eq!((r.0, r.1.as_str()), DENIED);

    // a port without L7 rules is not proxied: the server's own answer
    // for any path, and no L7 decision counted
    let judged_before = metric(
        &lab,
        "node1",
        "meshward_l7_requests_total{verdict=\"denied\"}",
    ) + metric(
        &lab,
        "node1",
        "meshward_l7_requests_total{verdict=\"allowed\"}",
    );
    let r = get(&lab, fe, "http://198.18.100.10:8080/admin").expect("an answer");
    assert_eq!(r.0, 404, "{r:?}");
    let judged_after = metric(
        &lab,
        "node1",
        "meshward_l7_requests_total{verdict=\"denied\"}",
    ) + metric(
        &lab,
        "node1",
        "meshward_l7_requests_total{verdict=\"allowed\"}",
    );
    assert_eq!(judged_before, judged_after);
    // an L4-denied destination on the L7 port: dropped, no HTTP answer
    assert_eq!(get(&lab, fe, "http://198.18.100.12/api/v1/products"), None);
    // unselected pods are not proxied
    assert_eq!(
        get(&lab, "node2-pod2", "http://198.18.100.10/admin").map(|r| r.0),
        Some(404)
    );

    // --- egress L7 to a pod on the other node whose ingress admits only
    // the frontend: the onward connection leaves from the frontend's own
    // address (transparent), so node2 lets it in
    let r = get(&lab, fe, &backend_url("/public/a")).expect("an answer");
    assert_eq!((r.0, r.1.as_str()), (200, "served /public/a"));
    let r = get(&lab, fe, &backend_url("/secret")).expect("an answer");
    assert_eq!((r.0, r.1.as_str()), DENIED);
    // anyone else is dropped there
    assert_eq!(get(&lab, "node1-pod2", &backend_url("/public/a")), None);

    // --- ingress: from node2 through the mesh to the server pod on node1
    let r = get(&lab, "node2-pod1", &api_url("/public/x")).expect("an answer");
    assert_eq!((r.0, r.1.as_str()), (200, "served /public/x"));
    let r = get(&lab, "node2-pod1", &api_url("/private")).expect("an answer");
    assert_eq!((r.0, r.1.as_str()), DENIED);
    let r = http(
        &lab,
        "node2-pod1",
        &["-X", "POST", "-d", "x", &api_url("/public/x")],
    )
    .expect("an answer");
    assert_eq!((r.0, r.1.as_str()), DENIED);
    // a peer the ingress rule does not admit is dropped at L4
    assert_eq!(get(&lab, "node2-pod2", &api_url("/public/x")), None);

    // --- denials as flow events, with pods and the policy
    let denied = observe(&lab, &["--type", "l7", "--verdict", "denied"]);
    let post = denied
        .iter()
        .find(|e| e["l7"]["method"] == "POST" && e["l7"]["path"] == "/api/v1/orders")
        .unwrap_or_else(|| panic!("no denied POST in {denied:#?}"));
    assert_eq!(post["source"]["pod"], "node1-pod1");
    assert_eq!(post["destination"]["ip"], "198.18.100.10");
    assert_eq!(post["destination"]["port"], 80);
    assert_eq!(post["direction"], "egress");
    assert_eq!(post["l7"]["status"], 403);
    assert_eq!(
        post["policies"],
        serde_json::json!(["MeshNetworkPolicy default/frontend"])
    );
    let private = denied
        .iter()
        .find(|e| e["l7"]["path"] == "/private")
        .unwrap_or_else(|| panic!("no denied /private in {denied:#?}"));
    assert_eq!(private["source"]["pod"], "node2-pod1");
    assert_eq!(private["destination"]["pod"], "node1-pod2");
    assert_eq!(private["direction"], "ingress");
    assert_eq!(
        private["policies"],
        serde_json::json!(["MeshNetworkPolicy default/api"])
    );
    let allowed = observe(&lab, &["--type", "l7", "--verdict", "allowed"]);
    assert!(
        allowed
            .iter()
            .any(|e| e["l7"]["path"] == "/api/v1/products/42"
                && e["source"]["pod"] == "node1-pod1"),
        "{allowed:#?}"
    );
    let text = lab.ok(&["observe", "--type", "l7", "--verdict", "denied"]);
    assert!(
        text.lines().any(
            |l| l.contains("DENIED l7 default/node1-pod1 -> 198.18.100.10:80")
                && l.contains("DELETE /api/v1/products/1 403")
        ),
        "{text}"
    );
    // the counters moved
    assert!(
        metric(
            &lab,
            "node1",
            "meshward_l7_requests_total{verdict=\"denied\"}"
        ) >= 6.0
    );
    assert!(
        metric(
            &lab,
            "node1",
            "meshward_l7_requests_total{verdict=\"allowed\"}"
        ) >= 3.0
    );

    // status lists the L7 ports per pod and direction
    let status = lab.agent_status("node1");
    let ports = &status["policy"]["l7Ports"];
    assert!(
        ports
            .as_array()
            .is_some_and(|l| l.contains(&serde_json::json!(
                {"pod": "default/node1-pod1", "direction": "egress", "ports": [80, 9090]}
            )) && l.contains(&serde_json::json!(
                {"pod": "default/node1-pod2", "direction": "ingress", "ports": [8080]}
            ))),
        "{status:#}"
    );

    // --- removing the HTTP rules stops the proxying
    lab.ok(&[
        "delete",
        lab.state_dir()
            .join("test-manifests/frontend.yaml")
            .to_str()
            .unwrap(),
    ]);
    eventually("the frontend policy to go", Duration::from_secs(20), || {
        get(&lab, fe, &format!("{srv}/admin")).is_some_and(|r| r.0 == 404)
    });
}

/// toFQDNs peers: HTTP rules and the TLS server-name check apply to the
/// addresses learned for the rule's names (through the node's DNS proxy).
const FQDN_L7: &str = r#"
apiVersion: meshward.io/v1alpha1
kind: MeshNetworkPolicy
metadata: {name: fqdn-l7, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: tls}}
  egress:
  - toCIDR: [198.18.100.53/32]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "**.example.test"}]
  - toFQDNs: [{matchName: api.example.test}]
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
      rules: {tls: sni}
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http: [{method: GET, path: /ok}]
"#;

#[test]
fn fqdn_peers_get_http_rules_and_the_sni_check() {
    let lab = TestLab::new("l7f");
    lab.up_with(1, 1, &["--pod-labels", "node1-pod1=app=tls"]);
    apply(&lab, "fqdn-l7.yaml", FQDN_L7);
    let pod = "node1-pod1";
    eventually("the policy to apply", Duration::from_secs(20), || {
        get(&lab, pod, "http://198.18.100.11:8080/ok").is_none()
    });
    // resolved through the proxy, then the HTTP rules of the name apply
    // (busybox answers 404: allowed through; 403: the proxy)
    assert_eq!(
        get(&lab, pod, "http://api.example.test:8080/ok").map(|r| r.0),
        Some(404)
    );
    let r = get(&lab, pod, "http://api.example.test:8080/other").expect("an answer");
    assert_eq!((r.0, r.1.as_str()), DENIED);
    // TLS to the learned address: the ClientHello's name is checked before
    // anything goes upstream (nothing serves 443 there, so both fail for
    // the client; the decisions tell them apart)
    assert_eq!(get(&lab, pod, "https://api.example.test/"), None);
    assert_eq!(
        http(
            &lab,
            pod,
            &[
                "--resolve",
                "evil.example.test:443:198.18.100.10",
                "https://evil.example.test/"
            ]
        ),
        None
    );
    let tls = observe(&lab, &["--type", "l7", "--pod", pod]);
    let verdict_for = |name: &str| {
        tls.iter()
            .find(|e| e["protocol"] == "TLS" && e["l7"]["path"] == name)
            .map(|e| e["verdict"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(
        verdict_for("api.example.test").as_deref(),
        Some("allowed"),
        "{tls:#?}"
    );
    assert_eq!(
        verdict_for("evil.example.test").as_deref(),
        Some("denied"),
        "{tls:#?}"
    );
    let http_denied = tls
        .iter()
        .find(|e| e["l7"]["path"] == "/other")
        .unwrap_or_else(|| panic!("no /other in {tls:#?}"));
    assert_eq!(http_denied["verdict"], "denied");
    assert_eq!(
        http_denied["policies"],
        serde_json::json!(["MeshNetworkPolicy default/fqdn-l7"])
    );
}
