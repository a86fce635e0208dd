//! Shared by the egress benches: a node namespace between a pod and an
//! external namespace (wired as the CNI does), and percentiles.

#![allow(dead_code)]

use std::time::Duration;

use meshward_testkit::{veth, Netns};

pub const POD: &str = "198.19.1.2";
pub const EXT: &str = "198.18.100.1";

pub struct Bed {
    pub node: Netns,
    pub pod: Netns,
    pub ext: Netns,
}

impl Bed {
    pub fn new() -> Bed {
        let node = Netns::new("n");
        let pod = Netns::new("p");
        let ext = Netns::new("e");
        node.must(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        veth(
            &node,
            "ext0",
            "198.18.100.254/24",
            &ext,
            "eth0",
            &format!("{EXT}/24"),
        );
        ext.ip(&["route", "add", "default", "via", "198.18.100.254"]);
        meshward_testkit::sh(&[
            "ip", "-n", &node.name, "link", "add", "pod0", "type", "veth", "peer", "name", "eth0",
            "netns", &pod.name,
        ]);
        node.ip(&["link", "set", "pod0", "up"]);
        node.must(&["sysctl", "-qw", "net.ipv4.conf.pod0.proxy_arp=1"]);
        node.ip(&["route", "add", &format!("{POD}/32"), "dev", "pod0"]);
        pod.ip(&["addr", "add", &format!("{POD}/32"), "dev", "eth0"]);
        pod.ip(&["link", "set", "eth0", "up"]);
        let v = node.ip_json(&["link", "show", "pod0"]);
        let mac = v[0]["address"].as_str().unwrap().to_string();
        pod.ip(&[
            "neigh",
            "replace",
            "169.254.1.1",
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        pod.ip(&[
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ]);
        pod.ip(&[
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ]);
        Bed { node, pod, ext }
    }
}

/// The q-quantile (0..=1) of sorted samples.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
