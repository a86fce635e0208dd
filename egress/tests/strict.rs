//! Strict mode in a real kernel: a node namespace forwarding a pod's packets
//! to a remote pod CIDR drops them unless they leave through the tunnel
//! interface.

use meshward_egress::{apply_strict, disarm_strict, StrictMode, STRICT_CHAIN, TABLE};
use meshward_testkit::{veth, Netns};

/// Counts packets to `dst` arriving in `ns` (a prerouting counter).
fn watch(ns: &Netns, dst: &str) {
    ns.must(&["nft", "add", "table", "ip", "watch"]);
    ns.must(&[
        "nft",
        "add",
        "chain",
        "ip",
        "watch",
        "in",
        "{ type filter hook prerouting priority -300 ; }",
    ]);
    ns.must(&[
        "nft", "add", "rule", "ip", "watch", "in", "ip", "daddr", dst, "counter",
    ]);
}

fn seen(ns: &Netns) -> u64 {
    let out = ns.must(&["nft", "list", "chain", "ip", "watch", "in"]);
    packets(&out)
}

fn packets(nft_listing: &str) -> u64 {
    nft_listing
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

struct Topology {
    node: Netns,
    pod: Netns,
    underlay: Netns,
    tunnel: Netns,
}

/// pod --veth-- node --eth0-- underlay
///                   --mw0--- tunnel   (a veth standing in for the TUN)
fn topology() -> Topology {
    let node = Netns::new("n");
    let pod = Netns::new("p");
    let underlay = Netns::new("u");
    let tunnel = Netns::new("t");
    veth(
        &node,
        "pod0",
        "198.19.1.1/25",
        &pod,
        "eth0",
        "198.19.1.2/25",
    );
    pod.ip(&["route", "add", "default", "via", "198.19.1.1"]);
    veth(
        &node,
        "eth0",
        "198.18.0.1/24",
        &underlay,
        "eth0",
        "198.18.0.2/24",
    );
    veth(
        &node,
        "mw0",
        "198.18.1.1/30",
        &tunnel,
        "eth0",
        "198.18.1.2/30",
    );
    node.must(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    // The remote node's pods, reached (for now) over the underlay.
    node.ip(&["route", "add", "198.19.2.0/24", "via", "198.18.0.2"]);
    watch(&underlay, "198.19.2.5");
    watch(&tunnel, "198.19.2.5");
    Topology {
        node,
        pod,
        underlay,
        tunnel,
    }
}

fn strict() -> StrictMode {
    StrictMode {
        tunnel_ifname: "mw0".into(),
        local_pod_cidrs: vec!["198.19.1.0/24".parse().unwrap()],
        remote_pod_cidrs: vec!["198.19.0.0/16".parse().unwrap()],
    }
}

#[test]
fn strict_mode_drops_plaintext_and_passes_the_tunnel() {
    let t = topology();
    // Without strict mode the packet crosses the underlay in the clear.
    t.pod.ping("198.19.2.5");
    assert!(
        seen(&t.underlay) >= 1,
        "baseline: nothing reached the underlay"
    );

    t.node
        .run(|| apply_strict(&strict()))
        .expect("apply strict mode");
    let before = seen(&t.underlay);
    for _ in 0..3 {
        t.pod.ping("198.19.2.5");
    }
    assert_eq!(
        seen(&t.underlay),
        before,
        "plaintext leaked past strict mode"
    );
    let rule = t
        .node
        .must(&["nft", "list", "chain", "inet", TABLE, STRICT_CHAIN]);
    assert!(
        packets(&rule) >= 3,
        "strict rule did not count the drops: {rule}"
    );

    // Through the tunnel interface the same traffic passes. (A veth needs a
    // next hop; the real TUN is point-to-point.)
    t.node.ip(&[
        "route",
        "replace",
        "198.19.2.0/24",
        "via",
        "198.18.1.2",
        "dev",
        "mw0",
    ]);
    t.pod.ping("198.19.2.5");
    assert!(seen(&t.tunnel) >= 1, "strict mode blocked the tunnel");
    assert_eq!(seen(&t.underlay), before);
}

#[test]
fn strict_mode_is_idempotent_and_keeps_local_traffic() {
    let t = topology();
    let other_pod = Netns::new("p");
    veth(
        &t.node,
        "pod1",
        "198.19.1.129/25",
        &other_pod,
        "eth0",
        "198.19.1.130/25",
    );
    other_pod.ip(&["route", "add", "default", "via", "198.19.1.129"]);
    // A remote node's CIDR learned later overlaps the cluster range: merged.
    let mut s = strict();
    t.node.run(|| apply_strict(&s)).unwrap();
    s.remote_pod_cidrs.push("198.19.2.0/24".parse().unwrap());
    t.node.run(|| apply_strict(&s)).unwrap();
    t.node.run(|| apply_strict(&s)).unwrap();
    let table = t.node.must(&["nft", "list", "table", "inet", TABLE]);
    assert_eq!(table.matches("drop").count(), 1, "rule duplicated: {table}");
    // Pod to pod on the same node is not remote traffic.
    assert!(
        t.pod.ping("198.19.1.130"),
        "strict mode broke local pod traffic"
    );
    // And the table stays when the caller goes away: nothing removes it.
    drop(s);
    assert!(t.node.must(&["nft", "list", "tables"]).contains(TABLE));
}

#[test]
fn disarming_lets_plaintext_through_and_creates_nothing_where_none_was() {
    let t = topology();
    // Nothing there: nothing created.
    assert!(!t.node.run(disarm_strict).unwrap());
    assert!(!t.node.must(&["nft", "list", "tables"]).contains(TABLE));
    // A mesh-mode predecessor's strict mode drops plaintext ...
    t.node.run(|| apply_strict(&strict())).unwrap();
    let before = seen(&t.underlay);
    t.pod.ping("198.19.2.5");
    assert_eq!(seen(&t.underlay), before, "strict mode is not in force");
    // ... until a policy-only agent disarms it.
    assert!(t.node.run(disarm_strict).unwrap());
    t.pod.ping("198.19.2.5");
    assert!(
        seen(&t.underlay) > before,
        "plaintext still dropped after disarming"
    );
}
