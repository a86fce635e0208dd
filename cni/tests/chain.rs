//! meshward-cni chained with Debian's `bandwidth` and `portmap` plugins,
//! driven the way libcni drives a conflist (see `common::Chain`): ADD in
//! order with prevResult, DEL in reverse with the cached result, the
//! `bandwidth` and `portMappings` capabilities filled from runtimeConfig.
//!
//! A fresh namespace plays the node ("host"); another plays the pod. Debian's
//! portmap 1.1.1 programs NAT through the `iptables` binary (go-iptables),
//! which on Debian 12 is iptables-nft: its chains (CNI-HOSTPORT-DNAT,
//! CNI-DN-<hash>, ...) live in nftables' `ip nat` table of the node
//! namespace and are read back here with iptables-save.
//!
//! CHECK: Debian's bandwidth CHECK dereferences the bandwidth runtime config
//! (it panics without it), so CHECK always carries the capability; portmap
//! CHECK fails on IPv4-only setups (it also checks the ip6tables side), so it
//! is run on its own and only reported.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{Attachment, Chain, PodPlugin};
use meshward_testkit::{files_mentioning, http_get, run, Netns, TempDir, CMD_TIMEOUT};
use serde_json::{json, Value};

const NODE_ADDR: &str = "198.18.240.1";
const POD_CIDR: &str = "198.19.240.0/24";
const NETWORK: &str = "mwtchain";
/// What the runtimes we meet speak (Debian's plugins: up to 1.0.0).
const CNI_VERSION: &str = "1.0.0";
const HOST_PORT: u16 = 18080;
const CONTAINER_PORT: u16 = 80;
const RATE_BPS: u64 = 10_000_000;
const BURST_BITS: u64 = 1_000_000;

fn pod_plugin_config(plugin: PodPlugin, state: &TempDir) -> Value {
    let mut conf = plugin.config(POD_CIDR, state.path(), "mwtbr0");
    if plugin == PodPlugin::Meshward {
        conf["mtu"] = json!(1420);
    }
    conf
}

fn conflist(plugins: Vec<Value>) -> Value {
    conflist_v(CNI_VERSION, plugins)
}

fn conflist_v(version: &str, plugins: Vec<Value>) -> Value {
    json!({ "cniVersion": version, "name": NETWORK, "plugins": plugins })
}

fn bandwidth() -> Value {
    json!({ "type": "bandwidth", "capabilities": { "bandwidth": true } })
}

fn portmap() -> Value {
    json!({ "type": "portmap", "capabilities": { "portMappings": true }, "snat": true })
}

fn runtime_config() -> Value {
    json!({
        "bandwidth": {
            "ingressRate": RATE_BPS, "ingressBurst": BURST_BITS,
            "egressRate": RATE_BPS, "egressBurst": BURST_BITS
        },
        "portMappings": [
            { "hostPort": HOST_PORT, "containerPort": CONTAINER_PORT, "protocol": "tcp" }
        ]
    })
}

fn nat_rules(host: &Netns) -> String {
    host.must(&["iptables-save", "-t", "nat"])
}

/// The pod's IPv4 address and the host-side interface named in a result.
fn parse_result(result: &Value, pod: &Netns) -> (Ipv4Addr, Vec<String>) {
    parse_result_v(result, pod, CNI_VERSION)
}

fn parse_result_v(result: &Value, pod: &Netns, version: &str) -> (Ipv4Addr, Vec<String>) {
    assert_eq!(result["cniVersion"], version, "result: {result}");
    let ips = result["ips"].as_array().expect("ips");
    assert_eq!(ips.len(), 1, "one IPv4 address expected: {result}");
    let ip = &ips[0];
    let (addr, _) = ip["address"]
        .as_str()
        .and_then(|a| a.split_once('/'))
        .expect("ips[0].address");
    let addr: Ipv4Addr = addr.parse().expect("IPv4 address");
    let net: ipnet::Ipv4Net = POD_CIDR.parse().unwrap();
    assert!(net.contains(&addr), "{addr} not in {POD_CIDR}");
    let ifaces = result["interfaces"].as_array().expect("interfaces");
    let idx = ip["interface"].as_u64().expect("ips[0].interface") as usize;
    let pod_if = ifaces.get(idx).expect("ips[0].interface in range");
    assert_eq!(pod_if["name"], "eth0", "result: {result}");
    assert_eq!(
        pod_if["sandbox"].as_str(),
        pod.path().to_str(),
        "result: {result}"
    );
    let host_ifs = ifaces
        .iter()
        .filter(|i| i["sandbox"].as_str().unwrap_or("").is_empty())
        .filter_map(|i| i["name"].as_str().map(str::to_owned))
        .collect();
    (addr, host_ifs)
}

const BODY: &str = "meshward-pod\n";

/// A tiny HTTP server listening in the pod namespace; stops on drop (and
/// after 60 s at the latest).
struct PodHttp {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl PodHttp {
    fn start(pod: &Netns) -> PodHttp {
        let listener = pod
            .run(|| TcpListener::bind(("0.0.0.0", CONTAINER_PORT)))
            .expect("listen in the pod namespace");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !flag.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 1024];
                        let _ = conn.read(&mut buf);
                        let _ = write!(
                            conn,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{BODY}",
                            BODY.len()
                        );
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        PodHttp {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for PodHttp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn chain_with_bandwidth_and_portmap() {
    let plugin = PodPlugin::under_test();
    let host = Netns::new("h");
    host.ip(&["addr", "add", &format!("{NODE_ADDR}/32"), "dev", "lo"]);
    let pod = Netns::new("p");
    let state = TempDir::new();
    let cni_path = PodPlugin::cni_path();
    let chain = Chain::new(
        conflist(vec![
            pod_plugin_config(plugin, &state),
            bandwidth(),
            portmap(),
        ]),
        cni_path.clone(),
        runtime_config(),
    );
    let cid = format!("{}-chain", pod.name());
    let att = Attachment::new(&cid, pod.path());

    // ADD: every plugin succeeds, the final result still carries ours.
    let results = chain
        .add_all(&host, &att)
        .unwrap_or_else(|e| panic!("chain ADD: {e}"));
    let (first, last) = (&results[0], results.last().unwrap());
    eprintln!("pod plugin result: {first}\nfinal result: {last}");
    assert_eq!(last["ips"], first["ips"], "chain lost our ips");
    // bandwidth appends its ifb; ours must stay first, unchanged, so the
    // ips[].interface indices still point at them.
    let ours = first["interfaces"].as_array().expect("interfaces");
    let all = last["interfaces"].as_array().expect("final interfaces");
    assert!(
        all.len() >= ours.len() && all[..ours.len()] == ours[..],
        "chain lost or reordered our interfaces: {last}"
    );
    assert_eq!(last["routes"], first["routes"], "chain lost our routes");
    let (addr, host_ifs) = parse_result(last, &pod);

    let veths = host.links_of_type("veth");
    assert_eq!(veths.len(), 1, "one host veth expected: {veths:?}");
    let host_veth = veths[0].clone();
    assert!(
        host_ifs.contains(&host_veth),
        "result does not name host veth {host_veth}: {last}"
    );
    if let Some(expected) = plugin.host_veth(&cid, "eth0") {
        assert_eq!(host_veth, expected, "host veth name (contract)");
    }

    // bandwidth: tbf on the host veth (pod ingress) and on an ifb that the
    // host veth's ingress is mirrored to (pod egress).
    let kinds = host.qdisc_kinds(&host_veth);
    assert!(
        kinds.iter().any(|k| k == "tbf"),
        "no tbf on {host_veth}: {kinds:?}"
    );
    assert!(
        kinds.iter().any(|k| k == "ingress"),
        "no ingress qdisc on {host_veth}: {kinds:?}"
    );
    let ifbs = host.links_of_type("ifb");
    assert_eq!(ifbs.len(), 1, "one ifb expected: {ifbs:?}");
    let ifb_kinds = host.qdisc_kinds(&ifbs[0]);
    assert!(
        ifb_kinds.iter().any(|k| k == "tbf"),
        "no tbf on {}: {ifb_kinds:?}",
        ifbs[0]
    );

    // portmap: DNAT chains in the node namespace (iptables-nft).
    let nat = nat_rules(&host);
    assert!(
        nat.contains(":CNI-HOSTPORT-DNAT"),
        "no CNI-HOSTPORT-DNAT chain:\n{nat}"
    );
    assert!(nat.contains(&cid), "no rule for container {cid}:\n{nat}");
    assert!(
        nat.contains(&format!("--to-destination {addr}:{CONTAINER_PORT}")),
        "no DNAT to {addr}:{CONTAINER_PORT}:\n{nat}"
    );
    let nft = host.must(&["nft", "list", "table", "ip", "nat"]);
    assert!(
        nft.contains("CNI-HOSTPORT-DNAT"),
        "iptables-nft rules not in nftables:\n{nft}"
    );

    // The data path works through the chain: node -> pod directly, and
    // node -> hostPort -> (portmap DNAT) -> pod.
    let server = PodHttp::start(&pod);
    let direct = http_get(&host, SocketAddr::from((addr, CONTAINER_PORT)));
    assert_eq!(
        direct.as_deref(),
        Ok(BODY),
        "node -> pod {addr}:{CONTAINER_PORT}"
    );
    let node: Ipv4Addr = NODE_ADDR.parse().unwrap();
    let mapped = http_get(&host, SocketAddr::from((node, HOST_PORT)));
    assert_eq!(
        mapped.as_deref(),
        Ok(BODY),
        "node -> hostPort {HOST_PORT} (portmap DNAT)"
    );
    drop(server);

    // CHECK (bandwidth always with its capability; portmap on its own).
    let check_chain = Chain::new(
        conflist(vec![pod_plugin_config(plugin, &state), bandwidth()]),
        cni_path.clone(),
        runtime_config(),
    );
    check_chain
        .check(&host, &att, last)
        .unwrap_or_else(|e| panic!("CHECK of {} + bandwidth: {e}", plugin.type_name()));
    let portmap_only = Chain::new(
        conflist(vec![portmap()]),
        cni_path.clone(),
        runtime_config(),
    );
    match portmap_only.check(&host, &att, last) {
        Ok(()) => eprintln!("portmap CHECK passed"),
        // Debian's portmap 1.1.1 checks the IPv6 DNAT chain even without an
        // IPv6 address; failing there means its IPv4 checks passed.
        Err(e) => {
            let msg = e.run.as_ref().map(|r| r.stdout.as_str()).unwrap_or("");
            assert!(msg.contains("ipv6"), "portmap CHECK failed on IPv4: {e}");
            eprintln!("portmap CHECK: IPv4 fine, known IPv6-only failure: {msg}");
        }
    }

    // DEL in reverse order removes everything.
    chain
        .del(&host, &att, Some(last))
        .unwrap_or_else(|e| panic!("chain DEL: {e}"));
    assert!(host.links_of_type("veth").is_empty(), "host veth left");
    assert!(host.links_of_type("ifb").is_empty(), "ifb left");
    let nat = nat_rules(&host);
    assert!(!nat.contains(&cid), "portmap rules for {cid} left:\n{nat}");
    assert!(
        !nat.contains(":CNI-DN-"),
        "per-container DNAT chain left:\n{nat}"
    );
    let pod_links = pod.ip(&["-br", "link"]);
    assert!(!pod_links.contains("eth0"), "eth0 left in pod: {pod_links}");
    let held = files_mentioning(state.path(), &cid);
    assert!(held.is_empty(), "IPAM state still lists {cid}: {held:?}");
    let route = host.ip(&["-4", "route", "show", &format!("{addr}/32")]);
    assert!(route.trim().is_empty(), "route to {addr} left: {route}");

    // DEL is idempotent: again with the namespace present, and once more
    // after the namespace is gone (the spec asks DEL to succeed then too).
    chain
        .del(&host, &att, Some(last))
        .unwrap_or_else(|e| panic!("second DEL: {e}"));
    let pod_path = pod.path();
    drop(pod);
    let gone = Attachment::new(&cid, &pod_path);
    chain
        .del(&host, &gone, Some(last))
        .unwrap_or_else(|e| panic!("DEL after the netns is gone: {e}"));
}

/// The same address comes back after DEL and can be reused by the next pod;
/// two pods get different addresses; a DEL without prevResult (a runtime
/// that lost its cache) still releases the address.
#[test]
fn chain_add_del_reuse_and_del_without_prev_result() {
    let plugin = PodPlugin::under_test();
    let host = Netns::new("h");
    let state = TempDir::new();
    let chain = Chain::new(
        conflist(vec![
            pod_plugin_config(plugin, &state),
            bandwidth(),
            portmap(),
        ]),
        PodPlugin::cni_path(),
        runtime_config(),
    );
    let pod_a = Netns::new("p");
    let pod_b = Netns::new("p");
    let att_a = Attachment::new(&format!("{}-a", pod_a.name()), pod_a.path());
    let att_b = Attachment::new(&format!("{}-b", pod_b.name()), pod_b.path());
    let ra = chain
        .add(&host, &att_a)
        .unwrap_or_else(|e| panic!("ADD a: {e}"));
    let rb = chain
        .add(&host, &att_b)
        .unwrap_or_else(|e| panic!("ADD b: {e}"));
    let (a, _) = parse_result(&ra, &pod_a);
    let (b, _) = parse_result(&rb, &pod_b);
    assert_ne!(a, b, "two pods share an address");
    assert_eq!(host.links_of_type("veth").len(), 2);

    // pod a -> pod b across the node (needs forwarding in the node netns).
    let r = run(
        pod_a
            .command("/bin/busybox")
            .args(["ping", "-c", "2", "-W", "2", &b.to_string()]),
        b"",
        CMD_TIMEOUT,
    )
    .unwrap();
    assert!(r.success(), "pod a {a} -> pod b {b}: {r}");

    chain
        .del(&host, &att_a, None)
        .unwrap_or_else(|e| panic!("DEL a without prevResult: {e}"));
    assert!(files_mentioning(state.path(), &att_a.container_id).is_empty());
    chain
        .del(&host, &att_b, Some(&rb))
        .unwrap_or_else(|e| panic!("DEL b: {e}"));
    assert!(host.links_of_type("veth").is_empty());
    assert!(host.links_of_type("ifb").is_empty());
    assert!(!nat_rules(&host).contains(":CNI-DN-"));
    assert!(files_mentioning(state.path(), &att_b.container_id).is_empty());
}

/// Runtimes still speaking 0.3.1 / 0.4.0 (containerd 1.6 configs, older
/// kubelets' conflists): the same chain works and results keep the
/// requested version; CHECK exists from 0.4.0 on.
#[test]
fn chain_with_older_spec_versions() {
    let plugin = PodPlugin::under_test();
    for version in ["0.3.1", "0.4.0"] {
        let host = Netns::new("h");
        let pod = Netns::new("p");
        let state = TempDir::new();
        let chain = Chain::new(
            conflist_v(
                version,
                vec![pod_plugin_config(plugin, &state), bandwidth(), portmap()],
            ),
            PodPlugin::cni_path(),
            runtime_config(),
        );
        let cid = format!("{}-v{version}", pod.name());
        let att = Attachment::new(&cid, pod.path());
        let last = chain
            .add(&host, &att)
            .unwrap_or_else(|e| panic!("{version} ADD: {e}"));
        let (addr, _) = parse_result_v(&last, &pod, version);
        let veths = host.links_of_type("veth");
        assert_eq!(veths.len(), 1, "{version}: {veths:?}");
        assert!(host.qdisc_kinds(&veths[0]).iter().any(|k| k == "tbf"));
        assert!(nat_rules(&host).contains(&format!("--to-destination {addr}:{CONTAINER_PORT}")));
        if version == "0.4.0" {
            let check = Chain::new(
                conflist_v(
                    version,
                    vec![pod_plugin_config(plugin, &state), bandwidth()],
                ),
                PodPlugin::cni_path(),
                runtime_config(),
            );
            check
                .check(&host, &att, &last)
                .unwrap_or_else(|e| panic!("{version} CHECK: {e}"));
        }
        for round in ["DEL", "second DEL"] {
            chain
                .del(&host, &att, Some(&last))
                .unwrap_or_else(|e| panic!("{version} {round}: {e}"));
        }
        assert!(host.links_of_type("veth").is_empty());
        assert!(!nat_rules(&host).contains(&cid));
        assert!(files_mentioning(state.path(), &cid).is_empty());
    }
}
