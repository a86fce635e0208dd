//! iperf3 pod -> external through the node's policy chains, the pod
//! egress-isolated and the flow allowed:
//! - by one learned peer, with 0 or 100,000 other learned peers;
//! - by one CIDR/port-range policy, with 0 or 999 other policies' elements
//!   (host and /28 peers, single ports and a UDP range: about 3,000
//!   interval elements and 1,000 hash elements);
//! - by one CIDR policy (/24) with a single port, with 0 or 999 other
//!   policies' CIDR peers of 7 other prefix lengths (/25../31), distinct
//!   and never adjacent to one of the same shape (nothing merges), half
//!   with a single port, half with every port.
//!
//! Each case runs in two modes: `ct` as deployed (established flows are
//! accepted before any set lookup, so one long flow never touches the
//! sets), and `per-packet`, where the bench traffic is untracked so every
//! packet goes through all the lookups: the cost a new flow's first packet
//! pays. TCP 1 stream (Gbit/s) in both; UDP 64-byte datagrams (received
//! kpps) per packet. Ratios are case with many elements / case with few.
//! The few/many cases of a pair alternate, MW_BENCH_REPS times (default
//! 3), and the medians are printed (a shared 2-core machine is noisy).
//!
//! Needs root and iperf3. `cargo bench -p meshward-egress --bench
//! forward_throughput`; MW_BENCH_SECS (default 3) per measurement;
//! MW_BENCH_ONLY=text runs only the cases whose name contains it.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::process::Child;
use std::time::Duration;

use common::*;
use meshward_egress::{FqdnElement, PolicyConfig, PolicyState, PolicyTables};
use meshward_policy::{
    Allow, DirectionRules, EndpointRules, L4Protocol, NodeRules, PodRef, PolicyKind, PolicyRef,
    PortMatch,
};
use meshward_testkit::{run, Netns};
use std::sync::Arc;

fn policy(i: usize) -> PolicyRef {
    PolicyRef {
        kind: PolicyKind::NetworkPolicy,
        namespace: "bench".into(),
        name: format!("p{i}"),
    }
}

fn state(allow: Vec<Allow>, fqdn: Vec<FqdnElement>) -> PolicyState {
    let pod = PodRef {
        namespace: "bench".into(),
        name: "pod".into(),
    };
    let ep = EndpointRules {
        pod: pod.clone(),
        ips: vec![POD.parse().unwrap()],
        egress: Some(Arc::new(DirectionRules {
            policies: vec![policy(0)],
            allow,
            fqdn: Vec::new(),
            l7: Vec::new(),
        })),
        ingress: None,
        dns: None,
    };
    PolicyState {
        rules: NodeRules {
            endpoints: [(pod, ep)].into_iter().collect(),
        },
        fqdn,
    }
}

fn learned(dst: IpAddr, ports: PortMatch) -> FqdnElement {
    FqdnElement {
        src: POD.parse().unwrap(),
        dst,
        ports,
        timeout: Duration::from_secs(3600),
    }
}

fn bench_flow_learned() -> Vec<FqdnElement> {
    [L4Protocol::Tcp, L4Protocol::Udp]
        .map(|p| learned(EXT.parse().unwrap(), PortMatch::single(p, 5201)))
        .to_vec()
}

fn other_learned(n: u32) -> Vec<FqdnElement> {
    // Distinct addresses of 198.18.0.0/15 other than the bench peer's /24;
    // no packet goes to them.
    (0..1u32 << 17)
        .map(|i| 0xc612_0000 + i)
        .filter(|a| a >> 8 != 0x00c6_1264)
        .take(n as usize)
        .map(|a| {
            learned(
                IpAddr::V4(Ipv4Addr::from(a)),
                PortMatch::single(L4Protocol::Tcp, 443),
            )
        })
        .collect()
}

fn bench_flow_policy() -> Allow {
    let range = |protocol| PortMatch::Ports {
        protocol,
        first: 5000,
        last: 5300,
    };
    Allow {
        nets: vec!["198.18.100.0/28".parse().unwrap()],
        ports: vec![range(L4Protocol::Tcp), range(L4Protocol::Udp)],
        policy: policy(0),
    }
}

fn other_policies(n: usize) -> Vec<Allow> {
    (1..=n)
        .map(|i| {
            // Non-adjacent /28s in 198.19.128.0/17 (so nothing merges) and
            // a host in 198.18.200.0/21.
            let base = 0xc613_8000u32 + (i as u32) * 32;
            let host = 0xc612_c800u32 + i as u32;
            Allow {
                nets: vec![
                    format!("{}/28", Ipv4Addr::from(base)).parse().unwrap(),
                    format!("{}/32", Ipv4Addr::from(host)).parse().unwrap(),
                ],
                ports: vec![
                    PortMatch::single(L4Protocol::Tcp, 8000 + i as u16),
                    PortMatch::Ports {
                        protocol: L4Protocol::Udp,
                        first: 10_000,
                        last: 10_100,
                    },
                ],
                policy: policy(i),
            }
        })
        .collect()
}

fn bench_flow_cidr_port() -> Allow {
    Allow {
        nets: vec!["198.18.100.0/24".parse().unwrap()],
        ports: vec![
            PortMatch::single(L4Protocol::Tcp, 5201),
            PortMatch::single(L4Protocol::Udp, 5201),
        ],
        policy: policy(0),
    }
}

fn other_cidr_policies(n: usize) -> Vec<Allow> {
    // Consecutive networks from 198.19.64.0 (each aligned to its size);
    // every other policy allows every port, so two every-port networks are
    // never adjacent and nothing merges.
    let mut cursor = 0xc613_4000u32;
    (1..=n)
        .map(|i| {
            let len = 25 + (i % 7) as u32;
            let size = 1u32 << (32 - len);
            cursor = cursor.div_ceil(size) * size;
            let net: ipnet::IpNet = format!("{}/{len}", Ipv4Addr::from(cursor)).parse().unwrap();
            cursor += size;
            assert!(cursor <= 0xc614_0000, "bench networks left 198.19.0.0/16");
            let port = if i % 2 == 0 {
                PortMatch::Any
            } else {
                PortMatch::single(L4Protocol::Tcp, 8000 + i as u16)
            };
            Allow {
                nets: vec![net],
                ports: vec![port],
                policy: policy(i),
            }
        })
        .collect()
}

fn iperf(bed: &Bed, secs: u64, udp: bool) -> f64 {
    let mut server: Child = bed
        .ext
        .command("iperf3")
        .args(["-s", "-1", "-B", EXT])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start iperf3 server");
    std::thread::sleep(Duration::from_millis(300));
    let secs_s = secs.to_string();
    let mut args = vec!["-c", EXT, "-t", &secs_s, "-J"];
    if udp {
        args.extend(["-u", "-b", "0", "-l", "64"]);
    }
    let out = run(
        bed.pod.command("iperf3").args(&args),
        b"",
        Duration::from_secs(secs + 20),
    )
    .expect("run iperf3");
    let _ = server.kill();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    if udp {
        let s = &v["end"]["sum"];
        let packets = s["packets"].as_f64().unwrap_or(0.0);
        let lost = s["lost_percent"].as_f64().unwrap_or(100.0);
        let secs = s["seconds"].as_f64().unwrap_or(1.0).max(0.001);
        packets * (1.0 - lost / 100.0) / secs / 1e3
    } else {
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e9
    }
}

fn untracked(node: &Netns, on: bool) {
    let _ = node.exec(&["nft", "delete", "table", "inet", "mwbench"]);
    if on {
        node.must(&[
            "nft",
            "add table inet mwbench; add chain inet mwbench raw { type filter hook prerouting priority raw; }; add rule inet mwbench raw ip saddr 198.19.1.2 notrack; add rule inet mwbench raw ip daddr 198.19.1.2 notrack",
        ]);
    }
}

#[derive(Default)]
struct Row {
    ct_tcp: Vec<f64>,
    pp_tcp: Vec<f64>,
    pp_udp: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn measure(
    bed: &Bed,
    t: &mut PolicyTables,
    name: &str,
    st: &PolicyState,
    secs: u64,
    row: &mut Row,
) {
    t.apply_policy(st).expect("apply");
    let counts = t.element_counts();
    let nonempty: Vec<String> = counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| format!("{s}={n}"))
        .collect();
    eprintln!("[{name}] {}", nonempty.join(" "));
    untracked(&bed.node, false);
    row.ct_tcp.push(iperf(bed, secs, false));
    untracked(&bed.node, true);
    row.pp_tcp.push(iperf(bed, secs, false));
    row.pp_udp.push(iperf(bed, secs, true));
    untracked(&bed.node, false);
}

fn env(name: &str, default: u64, max: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .clamp(1, max)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not,
    // and must not start a minute of iperf3.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let secs = env("MW_BENCH_SECS", 3, 60);
    let reps = env("MW_BENCH_REPS", 3, 20);
    let bed = Bed::new();
    let mut t = bed
        .node
        .run(|| PolicyTables::new(PolicyConfig::default()))
        .expect("install policy tables");

    let fqdn_few = state(vec![], bench_flow_learned());
    let mut many = bench_flow_learned();
    many.extend(other_learned(100_000));
    let fqdn_many = state(vec![], many);
    let pol_one = state(vec![bench_flow_policy()], vec![]);
    let mut allows = vec![bench_flow_policy()];
    allows.extend(other_policies(999));
    let pol_many = state(allows, vec![]);
    let cidr_one = state(vec![bench_flow_cidr_port()], vec![]);
    let mut allows = vec![bench_flow_cidr_port()];
    allows.extend(other_cidr_policies(999));
    let cidr_many = state(allows, vec![]);

    let cases = [
        (
            "1 learned peer",
            &fqdn_few,
            "100,001 learned peers",
            &fqdn_many,
        ),
        (
            "1 policy (CIDR, port range)",
            &pol_one,
            "1,000 policies",
            &pol_many,
        ),
        (
            "1 policy (CIDR, single port)",
            &cidr_one,
            "1,000 CIDR policies",
            &cidr_many,
        ),
    ];
    println!(
        "{:<30} {:>12} {:>16} {:>16}   (medians of {reps} x {secs} s)",
        "allowed by", "ct TCP Gb/s", "per-pkt TCP Gb/s", "per-pkt UDP kpps"
    );
    let only = std::env::var("MW_BENCH_ONLY").unwrap_or_default();
    for (few_name, few, many_name, many) in cases {
        if !few_name.contains(&only) && !many_name.contains(&only) {
            continue;
        }
        let (mut a, mut b) = (Row::default(), Row::default());
        for _ in 0..reps {
            measure(&bed, &mut t, few_name, few, secs, &mut a);
            measure(&bed, &mut t, many_name, many, secs, &mut b);
        }
        for (name, r) in [(few_name, &a), (many_name, &b)] {
            println!(
                "{:<30} {:>12.2} {:>16.2} {:>16.1}",
                name,
                median(&r.ct_tcp),
                median(&r.pp_tcp),
                median(&r.pp_udp)
            );
        }
        println!(
            "ratio {many_name} / {few_name}: ct TCP {:.2}x, per-packet TCP {:.2}x, per-packet UDP {:.2}x",
            median(&b.ct_tcp) / median(&a.ct_tcp),
            median(&b.pp_tcp) / median(&a.pp_tcp),
            median(&b.pp_udp) / median(&a.pp_udp)
        );
    }
}
