//! Answer-to-rule-in-kernel latency: `PolicyTables::add_fqdn` of one
//! learned peer at a time, 1,000 adds paced at 1,000 per second, into an
//! empty set and into one already holding 100,000 elements; against the
//! same adds through `nft add element` (one exec per element), in the same
//! run. Needs root. `cargo bench -p meshward-egress --bench fqdn_latency`
//! (MW_BENCH_ADDS to change the count).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::*;
use meshward_egress::{FqdnElement, PolicyConfig, PolicyState, PolicyTables};
use meshward_policy::{L4Protocol, PortMatch};

fn element(i: u32) -> FqdnElement {
    FqdnElement {
        src: POD.parse().unwrap(),
        // Distinct addresses of 198.18.0.0/15 (set elements only: no
        // packet is sent to them).
        dst: IpAddr::V4(Ipv4Addr::from(0xc612_0000 + (i % (1 << 17)))),
        ports: PortMatch::single(L4Protocol::Tcp, 443),
        timeout: Duration::from_secs(300),
    }
}

fn paced(n: u32, offset: u32, mut add: impl FnMut(u32)) -> Vec<Duration> {
    let start = Instant::now();
    let mut samples = Vec::with_capacity(n as usize);
    for i in 0..n {
        let due = start + Duration::from_millis(u64::from(i));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let t = Instant::now();
        add(offset + i);
        samples.push(t.elapsed());
    }
    samples.sort();
    samples
}

fn report(name: &str, s: &[Duration]) -> (f64, f64) {
    let (p50, p99) = (us(quantile(s, 0.5)), us(quantile(s, 0.99)));
    println!(
        "{name:<44} n={:<5} p50 {p50:>8.1} us   p99 {p99:>8.1} us   max {:>8.1} us",
        s.len(),
        us(*s.last().unwrap_or(&Duration::ZERO))
    );
    (p50, p99)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not,
    // and must not start a minute of iperf3.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n: u32 = std::env::var("MW_BENCH_ADDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
        .clamp(1, 1000);
    let bed = Bed::new();
    let mut t = bed
        .node
        .run(|| PolicyTables::new(PolicyConfig::default()))
        .expect("install policy tables");
    t.apply_policy(&PolicyState::default()).unwrap();

    println!("add_fqdn: one learned peer per call, {n} calls at 1000/s");
    let netlink_empty = paced(n, 0, |i| t.add_fqdn(&[element(i)]).unwrap());
    let (_, nl_p99) = report("netlink, set empty at start", &netlink_empty);

    // The same through nft: one process per element, as the nftables crate does.
    let nft_samples = paced(n, 1_000, |i| {
        let e = element(i);
        let spec = format!("{{ {} . {} . tcp . 443 timeout 300s }}", e.src, e.dst);
        let out = bed
            .node
            .command("nft")
            .args([
                "add",
                "element",
                "inet",
                "meshward",
                "egress4_fqdn_port",
                &spec,
            ])
            .output()
            .expect("run nft");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let (_, nft_p99) = report("nft exec (baseline)", &nft_samples);

    // 100,000 learned peers already loaded (one apply), then the same adds.
    let st = PolicyState {
        fqdn: (0..100_000).map(|i| element(2_000 + i)).collect(),
        ..PolicyState::default()
    };
    let t0 = Instant::now();
    t.apply_policy(&st).unwrap();
    println!(
        "apply_policy with 100,000 learned peers: {:.0} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let netlink_full = paced(n, 102_000, |i| t.add_fqdn(&[element(i)]).unwrap());
    let (_, full_p99) = report("netlink, set holding 100,000 at start", &netlink_full);
    println!(
        "p99 nft / netlink: {:.0}x (empty set), {:.0}x (100k set); goal p99 <= 2000 us: {}",
        nft_p99 / nl_p99,
        nft_p99 / full_p99,
        if nl_p99.max(full_p99) <= 2000.0 {
            "met"
        } else {
            "NOT met"
        }
    );
}
