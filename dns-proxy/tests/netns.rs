//! The proxy between real clients (dig) and a real server (dnsmasq), with
//! traffic redirected by an nftables TPROXY rule, in network namespaces:
//!
//! ```text
//! pod 198.19.1.2 ── pod0 198.19.1.1 [node: nft tproxy → proxy] 198.18.100.1 ── ext 198.18.100.53 (dnsmasq)
//! ```
//!
//! With `Options::ipv6` the same links also carry a ULA (fd00:198:18::/48,
//! inside the test's namespaces only): pod fd00:198:18:1::2, server
//! fd00:198:18:100::53, redirected to a second listener on [::1].
//!
//! Needs root, nft, dig (dnsutils) and dnsmasq (dnsmasq-base).

use std::fs::File;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use meshward_dns_proxy::{
    AnswerCacheConfig, Decision, DnsProxy, Learned, Listeners, ProxyConfig, QueryInfo, Stats,
    StatsSnapshot,
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
/// A test-owned server that records source ports and answers in its own order.
const DNS_SCRIPTED: &str = "198.18.100.57";
const MANY: usize = 60;
const POD6: &str = "fd00:198:18:1::2";
const DNS6: &str = "fd00:198:18:100::53";

/// What the learn hook saw, with when it finished.
type LearnLog = Arc<Mutex<Vec<(Learned, Instant)>>>;

struct Lab {
    pod: Netns,
    node: Netns,
    ext: Netns,
    dnsmasq: Option<Child>,
    proxy: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
    stats: Arc<OnceLock<Arc<Stats>>>,
    learned: LearnLog,
    ipv6: bool,
    /// With `Options::drain`: tells the proxy to drain its parked
    /// listeners; answers how many datagrams and connections it took.
    #[allow(clippy::type_complexity)]
    drain: Mutex<
        Option<(
            oneshot::Sender<()>,
            std::sync::mpsc::Receiver<(usize, usize)>,
        )>,
    >,
}

struct Options {
    bind: &'static str,
    hold_timeout: Duration,
    /// The hook waits this long before it returns.
    hook_delay: Duration,
    upstream_timeout: Duration,
    /// Serve sockets taken over from another owner (dup'ed descriptors)
    /// rather than the ones bound.
    handover: bool,
    /// Bind the listeners but do not serve them: queries queue until
    /// [`Lab::drain`] has the proxy drain them.
    drain: bool,
    /// IPv6 too (see the module documentation).
    ipv6: bool,
    /// Entries of the answer cache (0: off).
    answer_cache: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bind: "127.0.0.1",
            hold_timeout: Duration::from_secs(3),
            hook_delay: Duration::ZERO,
            upstream_timeout: Duration::from_secs(1),
            handover: false,
            drain: false,
            ipv6: false,
            answer_cache: 0,
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
        veth(
            &pod,
            "eth0",
            "198.19.1.2/24",
            &node,
            "pod0",
            "198.19.1.1/24",
        );
        veth(
            &node,
            "ext0",
            "198.18.100.1/24",
            &ext,
            "eth0",
            "198.18.100.53/24",
        );
        for extra in [DNS_CLOSED, DNS_BLACKHOLE, DNS_SPOOFING, DNS_SCRIPTED] {
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
        node.ip(&[
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "109",
        ]);

        if opts.ipv6 {
            let add = |ns: &Netns, addr: &str, dev: &str| {
                ns.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"]);
            };
            add(&pod, &format!("{POD6}/64"), "eth0");
            add(&node, "fd00:198:18:1::1/64", "pod0");
            add(&node, "fd00:198:18:100::1/64", "ext0");
            add(&ext, &format!("{DNS6}/64"), "eth0");
            pod.ip(&["-6", "route", "add", "default", "via", "fd00:198:18:1::1"]);
            ext.ip(&["-6", "route", "add", "default", "via", "fd00:198:18:100::1"]);
            node.must(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
            node.must(&[
                "nft",
                &format!(
                    "add table ip6 mwtest6; \
                     add chain ip6 mwtest6 pre {{ type filter hook prerouting priority mangle; }}; \
                     add rule ip6 mwtest6 pre iifname pod0 udp dport 53 tproxy to [::1]:{port} meta mark set 0x1 accept; \
                     add rule ip6 mwtest6 pre iifname pod0 tcp dport 53 tproxy to [::1]:{port} meta mark set 0x1 accept"
                ),
            ]);
            node.ip(&["-6", "rule", "add", "fwmark", "0x1", "lookup", "109"]);
            node.ip(&[
                "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "109",
            ]);
        }

        let mut lab = Lab {
            pod,
            node,
            ext,
            dnsmasq: None,
            proxy: None,
            stats: Arc::new(OnceLock::new()),
            learned: Arc::new(Mutex::new(Vec::new())),
            ipv6: opts.ipv6,
            drain: Mutex::new(None),
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
        if self.ipv6 {
            args.push(format!("--listen-address={DNS6}"));
            args.push("--host-record=six.example.test,fd00:198:18:200::10".into());
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
            let (ok, out) = self.ext.exec(&[
                "dig",
                &format!("@{DNS}"),
                "api.example.test",
                "+short",
                "+time=1",
                "+tries=1",
            ]);
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
        let (drain_tx, drain_rx) = oneshot::channel::<()>();
        let (drained_tx, drained_rx) = std::sync::mpsc::channel();
        if opts.drain {
            *self.drain.lock().unwrap() = Some((drain_tx, drained_rx));
        }
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
                    answer_cache: AnswerCacheConfig::with_entries(opts.answer_cache),
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
                let listeners = if opts.handover {
                    // What the next agent process gets: duplicates of the
                    // descriptors, the originals closed.
                    let (udp, tcp) = listeners.into_std();
                    let dup = (udp.try_clone().unwrap(), tcp.try_clone().unwrap());
                    drop((udp, tcp));
                    Listeners::from_std(dup.0, dup.1).unwrap()
                } else {
                    listeners
                };
                let listeners6 = if opts.ipv6 {
                    match Listeners::bind((std::net::Ipv6Addr::LOCALHOST, PROXY_PORT).into()) {
                        Ok(l) => Some(l),
                        Err(e) => {
                            ready_tx.send(Err(format!("[::1]: {e}"))).unwrap();
                            return;
                        }
                    }
                } else {
                    None
                };
                let _ = stats_slot.set(proxy.stats());
                ready_tx.send(Ok(())).unwrap();
                if opts.drain {
                    // parked: the kernel queues what arrives
                    let mut stop_rx = stop_rx;
                    tokio::select! {
                        _ = drain_rx => {}
                        _ = &mut stop_rx => return,
                    }
                    drained_tx.send(proxy.drain(listeners)).unwrap();
                    // the drained queries finish on the runtime meanwhile
                    let _ = stop_rx.await;
                    return;
                }
                let serve6 = async {
                    match listeners6 {
                        Some(l) => proxy.serve(l).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = proxy.serve(listeners) => panic!("proxy stopped: {r:?}"),
                    r = serve6 => panic!("proxy stopped on [::1]: {r:?}"),
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

    /// Has the proxy drain its parked listeners (`Options::drain`): how
    /// many datagrams and connections it took.
    fn drain(&self) -> (usize, usize) {
        let (go, taken) = self
            .drain
            .lock()
            .unwrap()
            .take()
            .expect("a lab with Options::drain");
        go.send(()).unwrap();
        taken
            .recv_timeout(Duration::from_secs(10))
            .expect("the proxy drained")
    }

    fn stats(&self) -> StatsSnapshot {
        self.stats.get().expect("proxy started").snapshot()
    }

    /// `dig @server ARGS` in the pod; its output.
    fn dig(&self, server: &str, args: &[&str]) -> String {
        let mut cmd = vec![
            "dig".to_string(),
            format!("@{server}"),
            "+time=4".into(),
            "+tries=1".into(),
        ];
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
        assert!(
            *hook_done <= dig_done,
            "the answer reached the pod before the hook finished"
        );
        let s = lab.stats();
        assert_eq!(
            (
                s.queries_allowed,
                s.responses_relayed,
                s.holds,
                s.hold_timeouts
            ),
            (1, 1, 1, 0),
            "{s:?}"
        );
        assert!(s.hold_us_max >= 300_000, "{s:?}");
    }
}

#[test]
fn listeners_handed_over_keep_serving() {
    let lab = Lab::new(Options {
        handover: true,
        ..Options::default()
    });
    let out = lab.dig(DNS, &["api.example.test", "+short"]);
    assert_eq!(out.trim(), "198.18.100.10", "{out}");
    let out = lab.dig(DNS, &["api.example.test", "+short", "+tcp"]);
    assert_eq!(out.trim(), "198.18.100.10", "{out}");
    assert_eq!(lab.stats().queries_allowed, 2);
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
    assert_eq!(
        names,
        [
            "www.example.test.",
            "alias.example.test.",
            "edge.example.test."
        ]
    );
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
    assert_eq!(
        (s.queries_denied, s.queries_allowed, s.tcp_connections),
        (2, 0, 1),
        "{s:?}"
    );
}

#[test]
fn truncated_udp_answers_are_retried_over_tcp() {
    let lab = Lab::new(Options::default());
    // No EDNS: 60 A records do not fit 512 octets; dig retries over TCP.
    let out = lab.dig(DNS, &["many.example.test", "+noedns", "+noall", "+answer"]);
    let rows = answers(&out);
    assert_eq!(rows.len(), MANY, "{out}");
    let s = lab.stats();
    assert!(
        s.responses_truncated >= 1 && s.tcp_connections >= 1,
        "{s:?}"
    );
    let learned = lab.learned_for("many.example.test.");
    assert_eq!(learned.len(), 1, "only the full (TCP) answer teaches");
    assert_eq!(learned[0].0.ips.len(), MANY);
}

#[test]
fn several_queries_on_one_tcp_connection() {
    let lab = Lab::new(Options::default());
    let out = lab.dig(
        DNS,
        &[
            "+tcp",
            "+keepopen",
            "+short",
            "api.example.test",
            "edge.example.test",
            "api.blocked.example.test",
        ],
    );
    assert!(
        out.contains("198.18.100.10") && out.contains("198.18.100.11"),
        "{out}"
    );
    let s = lab.stats();
    assert_eq!(
        (s.tcp_connections, s.queries_allowed, s.queries_denied),
        (1, 2, 1),
        "{s:?}"
    );
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
    let sock = lab.ext.run(|| UdpSocket::bind((DNS_SPOOFING, 53)).unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        let q = &buf[..n];
        let answer = |id: [u8; 2], qname_byte: Option<u8>| {
            let mut r = answer_to(q, [198, 18, 100, 66]);
            r[..2].copy_from_slice(&id);
            if let Some(b) = qname_byte {
                r[13] = b;
            }
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
    assert_eq!(
        lab.learned_for("api.example.test.")[0].0.ips,
        vec![(ip("198.18.100.66"), 60)]
    );
}

#[test]
fn an_answer_forged_with_the_clients_id_is_ignored() {
    // A pod knows its own query IDs. Were they sent upstream, a pod able
    // to forge the server's address could answer its own query before the
    // server does (and fill the node's answer cache for every pod).
    let lab = Lab::new(Options {
        answer_cache: 100,
        ..Options::default()
    });
    let sock = lab.ext.run(|| UdpSocket::bind((DNS_SPOOFING, 53)).unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        let q = buf[..n].to_vec();
        // the forgery: right source, right question, the pod's own ID
        let mut forged = answer_to(&q, [198, 18, 100, 99]);
        forged[..2].copy_from_slice(&0x4242u16.to_be_bytes());
        sock.send_to(&forged, from).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        sock.send_to(&answer_to(&q, [198, 18, 100, 67]), from)
            .unwrap();
        u16::from_be_bytes([q[0], q[1]])
    });
    let pod = lab.pod.run(|| UdpSocket::bind("198.19.1.2:0").unwrap());
    pod.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    pod.connect((DNS_SPOOFING, 53)).unwrap();
    pod.send(&query_for(0x4242, "api.example.test")).unwrap();
    let mut buf = [0u8; 1500];
    let n = pod.recv(&mut buf).unwrap();
    let upstream_id = server.join().unwrap();
    assert_ne!(upstream_id, 0x4242, "the pod's ID went upstream");
    assert_eq!(buf[..2], 0x4242u16.to_be_bytes());
    assert_eq!(&buf[n - 4..n], &[198, 18, 100, 67], "the forged answer won");
    let s = lab.stats();
    assert_eq!(s.responses_mismatched, 1, "{s:?}");
    assert_eq!(
        lab.learned_for("api.example.test.")[0].0.ips,
        vec![(ip("198.18.100.67"), 60)]
    );
    // and the cache holds the real answer: asked again, with the server gone
    pod.send(&query_for(0x0101, "api.example.test")).unwrap();
    let n = pod.recv(&mut buf).unwrap();
    assert_eq!(buf[..2], 0x0101u16.to_be_bytes());
    assert_eq!(&buf[n - 4..n], &[198, 18, 100, 67]);
    assert_eq!(lab.stats().answer_cache_hits, 1);
}

/// An answer to query `q`: its header and question, one A record (owner: a
/// pointer to the question's name), no additional records.
fn answer_to(q: &[u8], ip: [u8; 4]) -> Vec<u8> {
    let qend = 12 + q[12..].iter().position(|&b| b == 0).unwrap() + 1 + 4;
    let mut r = q[..qend].to_vec();
    r[2] |= 0x80; // QR
    r[3] = 0x80; // RA, NOERROR
    r[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
    r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    r.extend_from_slice(&ip);
    r
}

/// A query for `name` (dotted, no trailing dot) with this ID, type A.
fn query_for(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The question name of a message (uncompressed, as our queries are).
fn qname_of(m: &[u8]) -> String {
    let mut labels = Vec::new();
    let mut i = 12;
    while m[i] != 0 {
        let len = m[i] as usize;
        labels.push(String::from_utf8_lossy(&m[i + 1..i + 1 + len]).into_owned());
        i += 1 + len;
    }
    labels.join(".")
}

#[test]
fn one_id_from_two_clients_at_once_and_rotating_ports() {
    // More than the pool's sockets (4) can serve before each is replaced
    // by one on a new port (1000 queries each).
    const SEQUENTIAL: usize = 4400;
    let lab = Lab::new(Options::default());
    let server_sock = lab.ext.run(|| UdpSocket::bind((DNS_SCRIPTED, 53)).unwrap());
    server_sock
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        let mut ports = std::collections::BTreeSet::new();
        // The two queries with one ID: answered in reverse order.
        let mut first = Vec::new();
        for _ in 0..2 {
            let (n, from) = server_sock.recv_from(&mut buf).unwrap();
            first.push((buf[..n].to_vec(), from));
        }
        // The proxy's own random IDs went upstream, not the clients' 7.
        assert!(
            first[0].0[..2] != [0, 7] || first[1].0[..2] != [0, 7],
            "the clients' ID went upstream"
        );
        for (q, from) in first.iter().rev() {
            server_sock
                .send_to(&answer_to(q, [198, 18, 100, 77]), from)
                .unwrap();
        }
        for _ in 0..SEQUENTIAL {
            let (n, from) = server_sock.recv_from(&mut buf).unwrap();
            ports.insert(from.port());
            server_sock
                .send_to(&answer_to(&buf[..n], [198, 18, 100, 78]), from)
                .unwrap();
        }
        ports
    });

    let (a, b) = lab.pod.run(|| {
        (
            UdpSocket::bind("198.19.1.2:0").unwrap(),
            UdpSocket::bind("198.19.1.2:0").unwrap(),
        )
    });
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.connect((DNS_SCRIPTED, 53)).unwrap();
    }
    a.send(&query_for(7, "a.example.test")).unwrap();
    // Let the first one reach the server first.
    std::thread::sleep(Duration::from_millis(100));
    b.send(&query_for(7, "b.example.test")).unwrap();
    let mut buf = [0u8; 1500];
    let n = a.recv(&mut buf).unwrap();
    assert_eq!(qname_of(&buf[..n]), "a.example.test");
    assert_eq!(buf[..2], [0, 7], "the client's ID comes back");
    let n = b.recv(&mut buf).unwrap();
    assert_eq!(qname_of(&buf[..n]), "b.example.test");
    assert_eq!(buf[..2], [0, 7], "the client's ID comes back");

    for i in 0..SEQUENTIAL {
        let name = format!("n{i}.example.test");
        a.send(&query_for(i as u16, &name)).unwrap();
        let n = a.recv(&mut buf).unwrap();
        assert_eq!(qname_of(&buf[..n]), name);
        assert_eq!(buf[..2], (i as u16).to_be_bytes());
        assert_eq!(&buf[n - 4..n], &[198, 18, 100, 78]);
    }
    let ports = server.join().unwrap();
    assert!(ports.len() > 4, "upstream ports never rotated: {ports:?}");
    let s = lab.stats();
    assert_eq!(s.responses_relayed as usize, SEQUENTIAL + 2, "{s:?}");
    assert_eq!(s.responses_mismatched, 0, "{s:?}");
}

#[test]
fn queries_queued_on_replaced_listeners_are_drained_and_answered() {
    // What the agent does with the keeper's sockets on an old port after
    // dnsProxyPort changed: the queries that waited there get answers.
    let lab = Lab::new(Options {
        drain: true,
        ..Options::default()
    });
    let (taken, udp, tcp) = std::thread::scope(|scope| {
        let udp = scope.spawn(|| lab.dig(DNS, &["api.example.test", "+short"]));
        let tcp = scope.spawn(|| lab.dig(DNS, &["www.example.test", "+short", "+tcp"]));
        // Both wait in the parked sockets (the datagram in the receive
        // queue, the connection in the accept backlog) until the drain.
        let deadline = Instant::now() + Duration::from_secs(3);
        while !queued(&lab.node, PROXY_PORT) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let taken = lab.drain();
        (taken, udp.join().unwrap(), tcp.join().unwrap())
    });
    assert_eq!(taken, (1, 1), "udp: {udp}\ntcp: {tcp}");
    assert_eq!(udp.trim(), "198.18.100.10", "{udp}");
    assert!(tcp.trim().ends_with("198.18.100.11"), "{tcp}");
    let s = lab.stats();
    assert_eq!((s.queries_allowed, s.responses_relayed), (2, 2), "{s:?}");
}

/// Whether the node's UDP socket on `port` has a datagram queued and its
/// TCP listener a connection waiting (`ss`: Recv-Q).
fn queued(node: &Netns, port: u16) -> bool {
    let (_, udp) = node.exec(&["ss", "-Hnul", "sport", &format!("= :{port}")]);
    let (_, tcp) = node.exec(&["ss", "-Hntl", "sport", &format!("= :{port}")]);
    let recv_q = |out: &str| {
        out.lines()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>()
    };
    recv_q(&udp) > 0 && recv_q(&tcp) > 0
}

#[test]
fn ipv6_transport_aaaa_learned_and_answered_denied_refused() {
    let lab = Lab::new(Options {
        ipv6: true,
        ..Options::default()
    });
    for transport in ["+notcp", "+tcp"] {
        let out = lab.dig(DNS6, &["six.example.test", "AAAA", "+short", transport]);
        assert_eq!(out.trim(), "fd00:198:18:200::10", "{transport}: {out}");
    }
    let learned = lab.learned_for("six.example.test.");
    assert_eq!(learned.len(), 2, "{learned:?}");
    for (l, _) in &learned {
        assert_eq!(l.client, ip(POD6));
        assert_eq!(l.ips, vec![(ip("fd00:198:18:200::10"), 300)]);
    }
    // The policy applies over IPv6 as over IPv4: a denied name is
    // refused by the proxy, never asked upstream, nothing learned.
    for transport in ["+notcp", "+tcp"] {
        let out = lab.dig(DNS6, &["api.blocked.example.test", "AAAA", transport]);
        assert_eq!(status(&out), "REFUSED", "{transport}: {out}");
    }
    assert!(lab.learned_for("api.blocked.example.test.").is_empty());
    // IPv4 still works beside it.
    let out = lab.dig(DNS, &["api.example.test", "+short"]);
    assert_eq!(out.trim(), "198.18.100.10", "{out}");
    let s = lab.stats();
    assert_eq!(
        (s.queries_allowed, s.responses_relayed, s.queries_denied),
        (3, 3, 2),
        "{s:?}"
    );
}

/// The TTL of the first answer record in dig's output.
fn first_ttl(dig_output: &str) -> u32 {
    let line = answers(dig_output)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no answer: {dig_output}"));
    line.split(' ')
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no TTL in {line:?}"))
}

#[test]
fn answer_cache_serves_repeats_after_the_hold() {
    let mut lab = Lab::new(Options {
        hook_delay: Duration::from_millis(300),
        answer_cache: 100,
        ..Options::default()
    });
    // dig sends an EDNS cookie by default: such queries bypass the cache.
    let plain = ["+nocookie", "+noall", "+answer"];
    let dig = |lab: &Lab, extra: &[&str]| {
        let mut args = plain.to_vec();
        args.extend_from_slice(extra);
        lab.dig(DNS, &args)
    };
    let out = dig(&lab, &["api.example.test"]);
    assert_eq!(first_ttl(&out), 300, "{out}");
    let s = lab.stats();
    assert_eq!(
        (
            s.answer_cache_misses,
            s.answer_cache_inserts,
            s.answer_cache_hits
        ),
        (1, 1, 0),
        "{s:?}"
    );

    // Upstream goes away: the repeats can only come from the cache.
    lab.stop_dnsmasq();
    std::thread::sleep(Duration::from_millis(1100));
    let asked = Instant::now();
    // Another letter case (as 0x20 randomisation would send): echoed.
    let out = dig(&lab, &["API.Example.TEST"]);
    let dig_done = Instant::now();
    let line = answers(&out).into_iter().next().unwrap_or_default();
    assert!(line.starts_with("API.Example.TEST. "), "{out}");
    assert!(line.ends_with("198.18.100.10"), "{out}");
    let ttl = first_ttl(&out);
    assert!((1..300).contains(&ttl), "TTL not decreased: {out}");

    // The hit went through the learn hook (300 ms) before it was sent.
    let learned = lab.learned_for("api.example.test.");
    assert_eq!(learned.len(), 2, "{learned:?}");
    let (l, hook_done) = &learned[1];
    assert_eq!(l.client, ip("198.19.1.2"));
    assert_eq!(l.ips.len(), 1);
    assert_eq!(l.ips[0].0, ip("198.18.100.10"));
    assert!(l.ips[0].1 < 300, "{l:?}");
    assert!(*hook_done <= dig_done, "the cached answer beat the hook");
    assert!(*hook_done >= asked + Duration::from_millis(300));

    // Over TCP too.
    let out = dig(&lab, &["api.example.test", "+tcp"]);
    assert!(first_ttl(&out) < 300, "{out}");

    // Other questions, and queries with EDNS options, still go upstream
    // (which is gone): SERVFAIL.
    let out = lab.dig(DNS, &["api.example.test", "AAAA", "+nocookie"]);
    assert_eq!(status(&out), "SERVFAIL", "{out}");
    let out = lab.dig(DNS, &["api.example.test", "+cookie"]);
    assert_eq!(status(&out), "SERVFAIL", "{out}");

    let s = lab.stats();
    assert_eq!(
        (
            s.answer_cache_hits,
            s.answer_cache_misses,
            s.answer_cache_inserts,
            s.responses_relayed,
            s.holds,
        ),
        (2, 3, 1, 1, 3),
        "{s:?}"
    );
}

#[test]
fn denied_queries_are_refused_before_the_cache() {
    let lab = Lab::new(Options {
        answer_cache: 100,
        ..Options::default()
    });
    for _ in 0..2 {
        let out = lab.dig(DNS, &["api.blocked.example.test", "+nocookie"]);
        assert_eq!(status(&out), "REFUSED", "{out}");
    }
    let s = lab.stats();
    assert_eq!(
        (s.queries_denied, s.answer_cache_hits, s.answer_cache_misses),
        (2, 0, 0),
        "{s:?}"
    );
}
