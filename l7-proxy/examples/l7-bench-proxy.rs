//! The proxy with the seed rules (frontend's) for every source, and
//! the gRPC rule for destination port 8091, for bench/l7-proxy:
//! `l7-bench-proxy [LISTEN]` (default 127.0.0.1:15001, transparent). Run it
//! in the namespace whose nftables TPROXYs to it.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use meshward_l7_proxy::{
    spawn_threads, Direction, HttpRuleSet, L7Proxy, PortPolicy, ProxyConfig, Verdict,
};
use meshward_policy::crd::{HeaderMatch, HttpRule};

/// Destination port whose rules are the gRPC ones.
const GRPC_PORT: u16 = 8091;

fn rule(method: &str, path: &str) -> HttpRule {
    HttpRule {
        method: Some(method.into()),
        path: Some(path.into()),
        ..Default::default()
    }
}

fn main() -> std::io::Result<()> {
    let listen: SocketAddr = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("LISTEN must be ip:port"))
        .unwrap_or_else(|| ProxyConfig::default().listen);
    let mut orders = rule("POST", "/api/v1/orders");
    orders.header_matches = Some(vec![HeaderMatch {
        name: "content-type".into(),
        value: Some("application/json".into()),
    }]);
    let rules = [
        rule("GET", "/api/v1/products.*"),
        orders,
        rule("GET", "/healthz"),
    ];
    let set = Arc::new(
        HttpRuleSet::new(
            rules
                .iter()
                .map(|r| (r, "MeshNetworkPolicy bench/frontend")),
        )
        .expect("rules compile"),
    );
    // gRPC (bench/l7-proxy's h2load part, destination port 8091): the
    // issue's "may POST /com.example.OrderService/.*".
    let grpc_rule = rule("POST", "/com.example.OrderService/.*");
    let grpc = Arc::new(
        HttpRuleSet::new([(&grpc_rule, "MeshNetworkPolicy bench/grpc-client")])
            .expect("rules compile"),
    );
    let policy = move |_src: IpAddr, dst: SocketAddr, dir: Direction| match dir {
        Direction::Egress if dst.port() == GRPC_PORT => PortPolicy::Http(grpc.clone()),
        Direction::Egress => PortPolicy::Http(set.clone()),
        Direction::Ingress => PortPolicy::AllowAll,
    };
    let denied = Arc::new(AtomicU64::new(0));
    let d = denied.clone();
    let events = Arc::new(move |e: meshward_l7_proxy::L7Event<'_>| {
        if e.verdict != Verdict::Allowed {
            d.fetch_add(1, Ordering::Relaxed);
        }
    });
    // MW_BENCH_PROXY_THREADS: proxy threads (default: one per core);
    // MW_BENCH_PROXY_RUNTIME=multi: one multi-thread tokio runtime with that
    // many workers and one listener instead of a current-thread runtime and
    // an SO_REUSEPORT listener per thread (the proxy's own way).
    let threads = std::env::var("MW_BENCH_PROXY_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let config = ProxyConfig {
        listen,
        ..ProxyConfig::default()
    };
    if std::env::var("MW_BENCH_PROXY_RUNTIME").as_deref() == Ok("multi") {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?;
        return rt.block_on(async move {
            let proxy = L7Proxy::bind(config, Arc::new(policy), events)?;
            eprintln!(
                "l7-bench-proxy listening on {} (multi-thread runtime, {threads} workers)",
                proxy.local_addr()
            );
            proxy.run().await;
            Ok(())
        });
    }
    let running = spawn_threads(threads, vec![config], Arc::new(policy), events, "l7-bench")?;
    eprintln!(
        "l7-bench-proxy listening on {} ({threads} threads)",
        running.listening[0]
    );
    for h in running.handles {
        let _ = h.join();
    }
    Ok(())
}
