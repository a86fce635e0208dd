//! The proxy between real clients (dig) and a real server (dnsmasq), with
//! traffic redirected by an nftables TPROXY rule, in network namespaces:
//!
//! ```text
//! pod 198.19.1.2 ── pod0 198.19.1.1 [node: nft tproxy → proxy] 198.18.100.1 ── ext 198.18.100.53 (dnsmasq)
//! ```
//!
//! Needs root, nft, dig (dnsutils) and dnsmasq (dnsmasq-base).

use std::fs::File;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use meshward_dns_proxy::{
    Decision, DnsProxy, Learned, Listeners, ProxyConfig, QueryInfo, StatsSnapshot,
};
use meshward_testkit::{veth, Netns};
use nix::sched::{setns, CloneFlags};
use tokio::sync::oneshot;

const PROXY_PORT: u16 = 15053;
const DNS: &str = "198.18.100.53";
/// Answers with ICMP port unreachable (nothing listens).
const DNS_CLOSED: &str = "198.18.100.54";
/// Drops everything (no answer at all).
const DNS_BLACKHOLE: &str = "198.18.100.55";
/// A test-owned server that sends a spoofed answer before the real one.
const DNS_SPOOFING: &str = "198.18.100.56";
const MANY: usize = 60;

/// What the learn hook saw, with when it finished.
type LearnLog = Arc<Mutex<Vec<(Learned, Instant)>>>;

struct Lab {
    pod: Netns,
    node: Netns,
    ext: Netns,
    dnsmasq: Option<Child>,
    proxy: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
    stats: Arc<Mutex<Option<Box<dyn Fn() -> StatsSnapshot + Send>>>>,
    learned: LearnLog,
}

struct Options {
    bind: &'static str,
    hold_timeout: Duration,
    /// The hook waits this long before it returns.
    hook_delay: Duration,
    upstream_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bind: "127.0.0.1",
            hold_timeout: Duration::from_secs(3),
            hook_delay: Duration::ZERO,
            upstream_timeout: Duration::from_secs(1),
        }
    }
}

fn policy(q: &QueryInfo<'_>) -> Decision {
    if q.name.as_str().ends_with("blocked.example.test.") {
        Decision::Deny
    } else {
        Decision::Allow
    }
}

impl Lab {
    fn new(opts: Options) -> Lab {
        let pod = Netns::new("p");
        let node = Netns::new("n");
        let ext = Netns::new("e");
        veth(&pod, "eth0", "198.19.1.2/24", &node, "pod0", "198.19.1.1/24");
        veth(&node, "ext0", "198.18.100.1/24", &ext, "eth0", "198.18.100.53/24");
        for extra in [DNS_CLOSED, DNS_BLACKHOLE, DNS_SPOOFING] {
            ext.ip(&["addr", "add", &format!("{extra}/32"), "dev", "eth0"]);
        }
        pod.ip(&["route", "add", "default", "via", "198.19.1.1"]);
        ext.ip(&["route", "add", "default", "via", "198.18.100.1"]);
        node.must(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        ext.must(&[
            "nft",
            &format!("add table ip bh; add chain ip bh in {{ type filter hook input priority 0; }}; add rule ip bh in ip daddr {DNS_BLACKHOLE} drop"),
        ]);

        // The redirect: pod port-53 traffic to the proxy, whatever its destination.
        let port = PROXY_PORT;
        let bind = opts.bind;
        node.must(&[
            "nft",
            &format!(
                "add table ip mwtest; \
                 add chain ip mwtest pre {{ type filter hook prerouting priority mangle; }}; \
                 add rule ip mwtest pre iifname pod0 udp dport 53 tproxy to {bind}:{port} meta mark set 0x1 accept; \
                 add rule ip mwtest pre iifname pod0 tcp dport 53 tproxy to {bind}:{port} meta mark set 0x1 accept"
            ),
        ]);
        node.ip(&["rule", "add", "fwmark", "0x1", "lookup", "109"]);
        node.ip(&["route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "109"]);

        let mut lab = Lab {
            pod,
            node,
            ext,
            dnsmasq: None,
            proxy: None,
            stats: Arc::new(Mutex::new(None)),
            learned: Arc::new(Mutex::new(Vec::new())),
        };
        lab.start_dnsmasq();
        lab.start_proxy(opts);
        lab
    }

    fn start_dnsmasq(&mut self) {
        let mut args = vec![
            "--keep-in-foreground".to_string(),
            "--conf-file=/dev/null".into(),
            "--pid-file=".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--port=53".into(),
            format!("--listen-address={DNS}"),
            "--bind-interfaces".into(),
            "--local-ttl=300".into(),
            "--address=/api.example.test/198.18.100.10".into(),
            "--address=/api.blocked.example.test/198.18.100.12".into(),
            "--host-record=edge.example.test,198.18.100.11".into(),
            "--cname=alias.example.test,edge.example.test".into(),
            "--cname=www.example.test,alias.example.test".into(),
        ];
        for i in 1..=MANY {
            args.push(format!("--host-record=many.example.test,198.18.101.{i}"));
        }
        let child = self
            .ext
            .command("dnsmasq")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (apt-get install dnsmasq-base)");
        self.dnsmasq = Some(child);
        for _ in 0..50 {
            let (ok, out) = self.ext.exec(&["dig", &format!("@{DNS}"), "api.example.test", "+short", "+time=1", "+tries=1"]);
            if ok && out.contains("198.18.100.10") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("dnsmasq did not come up");
    }

    fn stop_dnsmasq(&mut self) {
        if let Some(mut c) = self.dnsmasq.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The proxy on its own runtime, on threads inside the node namespace
    /// (so the sockets it opens later live there too).
    fn start_proxy(&mut self, opts: Options) {
        let ns = File::open(self.node.path()).unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let learned = self.learned.clone();
        let stats_slot = self.stats.clone();
        let bind: SocketAddr = format!("{}:{PROXY_PORT}", opts.bind).parse().unwrap();
        let handle = std::thread::spawn(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns");
            drop(ns);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let delay = opts.hook_delay;
                let hook = move |l: Learned| {
                    let learned = learned.clone();
                    async move {
                        tokio::time::sleep(delay).await;
                        learned.lock().unwrap().push((l, Instant::now()));
                        Ok::<(), String>(())
                    }
                };
                let config = ProxyConfig {
                    hold_timeout: opts.hold_timeout,
                    upstream_timeout: opts.upstream_timeout,
                    ..ProxyConfig::default()
                };
                let proxy = DnsProxy::new(config, policy, hook);
                let listeners = match Listeners::bind(bind) {
                    Ok(l) => l,
                    Err(e) => {
                        ready_tx.send(Err(e.to_string())).unwrap();
                        return;
                    }
                };
                let p2 = proxy.clone();
                *stats_slot.lock().unwrap() = Some(Box::new(move || p2.stats().snapshot()));
                ready_tx.send(Ok(())).unwrap();
                tokio::select! {
                    r = proxy.serve(listeners) => panic!("proxy stopped: {r:?}"),
                    _ = stop_rx => {}
                }
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("proxy thread")
            .expect("binding the proxy");
        self.proxy = Some((stop_tx, handle));
    }

    fn stats(&self) -> StatsSnapshot {
        (self.stats.lock().unwrap().as_ref().unwrap())()
    }

    /// `dig @server ARGS` in the pod; its output.
    fn dig(&self, server: &str, args: &[&str]) -> String {
        let mut cmd = vec!["dig".to_string(), format!("@{server}"), "+time=4".into(), "+tries=1".into()];
        cmd.extend(args.iter().map(|s| s.to_string()));
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        self.pod.exec(&cmd).1
    }

    fn learned_for(&self, qname: &str) -> Vec<(Learned, Instant)> {
        self.learned
            .lock()
            .unwrap()
            .iter()
            .filter(|(l, _)| l.qname.as_str() == qname)
            .cloned()
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.proxy.take() {
            let _ = stop.send(());
            let _ = handle.join();
        }
        self.stop_dnsmasq();
        let _ = (&self.pod, &self.node);
    }
}

fn status(dig_output: &str) -> &str {
    dig_output
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("(no status)")
}

fn answers(dig_output: &str) -> Vec<String> {
    dig_output
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn allowed_answers_are_learned_before_they_reach_the_pod() {
    for bind in ["127.0.0.1", "0.0.0.0"] {
        let lab = Lab::new(Options {
            bind,
            hook_delay: Duration::from_millis(300),
            ..Options::default()
        });
        let out = lab.dig(DNS, &["api.example.test", "+short"]);
        let dig_done = Instant::now();
        assert_eq!(out.trim(), "198.18.100.10", "bind {bind}: {out}");
        let learned = lab.learned_for("api.example.test.");
        assert_eq!(learned.len(), 1, "{learned:?}");
        let (l, hook_done) = &learned[0];
        assert_eq!(l.client, ip("198.19.1.2"));
        assert_eq!(l.ips, vec![(ip("198.18.100.10"), 300)]);
        assert!(*hook_done <= dig_done, "the answer reached the pod before the hook finished");
        let s = lab.stats();
        assert_eq!((s.queries_allowed, s.responses_relayed, s.holds, s.hold_timeouts), (1, 1, 1, 0), "{s:?}");
        assert!(s.hold_us_max >= 300_000, "{s:?}");
    }
}

#[test]
fn cname_chain_is_attributed_to_every_name() {
    let lab = Lab::new(Options::default());
    let out = lab.dig(DNS, &["www.example.test", "+noall", "+answer"]);
    let rows = answers(&out);
    assert_eq!(rows.len(), 3, "{out}");
    assert!(rows[2].ends_with("A 198.18.100.11"), "{out}");
    let learned = lab.learned_for("www.example.test.");
    assert_eq!(learned.len(), 1);
    let names: Vec<&str> = learned[0].0.names.iter().map(|n| n.as_str()).collect();
    assert_eq!(names, ["www.example.test.", "alias.example.test.", "edge.example.test."]);
    assert_eq!(learned[0].0.ips, vec![(ip("198.18.100.11"), 300)]);
}

#[test]
fn denied_names_are_refused_over_udp_and_tcp() {
    let lab = Lab::new(Options::default());
    let out = lab.dig(DNS, &["api.blocked.example.test"]);
    assert_eq!(status(&out), "REFUSED", "{out}");
    assert!(out.contains("QUESTION SECTION"), "{out}");
    // EDNS0 (dig sends an OPT record) is answered with one.
    assert!(out.contains("OPT PSEUDOSECTION"), "{out}");
    let out = lab.dig(DNS, &["api.blocked.example.test", "+tcp"]);
    assert_eq!(status(&out), "REFUSED", "{out}");
    // Nothing was asked upstream or learned.
    assert!(lab.learned.lock().unwrap().is_empty());
    let s = lab.stats();
    assert_eq!((s.queries_denied, s.queries_allowed, s.tcp_connections), (2, 0, 1), "{s:?}");
}

#[test]
fn truncated_udp_answers_are_retried_over_tcp() {
    let lab = Lab::new(Options::default());
    // No EDNS: 60 A records do not fit 512 octets; dig retries over TCP.
    let out = lab.dig(DNS, &["many.example.test", "+noedns", "+noall", "+answer"]);
    let rows = answers(&out);
    assert_eq!(rows.len(), MANY, "{out}");
    let s = lab.stats();
    assert!(s.responses_truncated >= 1 && s.tcp_connections >= 1, "{s:?}");
    let learned = lab.learned_for("many.example.test.");
    assert_eq!(learned.len(), 1, "only the full (TCP) answer teaches");
    assert_eq!(learned[0].0.ips.len(), MANY);
}

#[test]
fn several_queries_on_one_tcp_connection() {
    let lab = Lab::new(Options::default());
    let out = lab.dig(
        DNS,
        &["+tcp", "+keepopen", "+short", "api.example.test", "edge.example.test", "api.blocked.example.test"],
    );
    assert!(out.contains("198.18.100.10") && out.contains("198.18.100.11"), "{out}");
    let s = lab.stats();
    assert_eq!((s.tcp_connections, s.queries_allowed, s.queries_denied), (1, 2, 1), "{s:?}");
}

#[test]
fn hold_bound_releases_the_answer() {
    let lab = Lab::new(Options {
        hold_timeout: Duration::from_millis(200),
        hook_delay: Duration::from_secs(2),
        ..Options::default()
    });
    let out = lab.dig(DNS, &["api.example.test", "+short"]);
    assert_eq!(out.trim(), "198.18.100.10", "{out}");
    let s = lab.stats();
    assert_eq!((s.holds, s.hold_timeouts), (1, 1), "{s:?}");
    // The hook was not cancelled: it finishes later.
    let start = Instant::now();
    while lab.learned.lock().unwrap().is_empty() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(lab.learned_for("api.example.test.").len(), 1);
}

#[test]
fn upstream_failures_give_servfail() {
    let mut lab = Lab::new(Options::default());
    // Nothing listens: ICMP port unreachable.
    let out = lab.dig(DNS_CLOSED, &["api.example.test"]);
    assert_eq!(status(&out), "SERVFAIL", "{out}");
    // No answer at all: the upstream timeout (1 s here).
    let out = lab.dig(DNS_BLACKHOLE, &["api.example.test"]);
    assert_eq!(status(&out), "SERVFAIL", "{out}");
    let out = lab.dig(DNS_BLACKHOLE, &["api.example.test", "+tcp"]);
    assert_eq!(status(&out), "SERVFAIL", "{out}");
    // The server goes away.
    lab.stop_dnsmasq();
    let out = lab.dig(DNS, &["api.example.test", "+tcp"]);
    assert_eq!(status(&out), "SERVFAIL", "{out}");
    let s = lab.stats();
    assert_eq!(s.upstream_timeouts, 2, "{s:?}");
    assert_eq!(s.upstream_errors, 2, "{s:?}");
    assert!(lab.learned.lock().unwrap().is_empty());
}

#[test]
fn spoofed_answers_are_ignored() {
    let lab = Lab::new(Options::default());
    // A server that first answers with a wrong ID and a wrong question,
    // then with the right answer.
    let sock = lab
        .ext
        .run(|| UdpSocket::bind((DNS_SPOOFING, 53)).unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        let q = &buf[..n];
        let answer = |id: [u8; 2], qname_byte: Option<u8>| {
            let mut r = q.to_vec();
            r[..2].copy_from_slice(&id);
            r[2] |= 0x80; // QR
            r[3] = 0x80; // RA, NOERROR
            r[10] = 0; // no additional (drop the OPT record)
            r[11] = 0;
            let qend = 12 + q[12..].iter().position(|&b| b == 0).unwrap() + 1 + 4;
            r.truncate(qend);
            if let Some(b) = qname_byte {
                r[13] = b;
            }
            r[7] = 1; // one answer: pointer to the question name, A 198.18.100.66
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 18, 100, 66]);
            r
        };
        let id = [q[0], q[1]];
        let wrong_id = [q[0] ^ 0x55, q[1]];
        sock.send_to(&answer(wrong_id, None), from).unwrap();
        sock.send_to(&answer(id, Some(b'x')), from).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        sock.send_to(&answer(id, None), from).unwrap();
    });
    let out = lab.dig(DNS_SPOOFING, &["api.example.test", "+short"]);
    server.join().unwrap();
    assert_eq!(out.trim(), "198.18.100.66", "{out}");
    let s = lab.stats();
    assert_eq!(s.responses_mismatched, 2, "{s:?}");
    assert_eq!(lab.learned_for("api.example.test.")[0].0.ips, vec![(ip("198.18.100.66"), 60)]);
}
