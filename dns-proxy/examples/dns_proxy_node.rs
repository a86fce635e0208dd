//! A standalone proxy for benchmarks and manual tests: the transparent
//! listeners, a name-suffix policy and a learn hook that records answers in
//! an [`FqdnCache`] (returning at once for names already learned, as the
//! agent's hook does when nothing new needs programming).
//!
//! ```text
//! dns_proxy_node [--listen 127.0.0.1:15053] [--workers N] [--deny-suffix S]...
//!                [--hold-timeout-ms MS] [--program-delay-us US]
//!                [--answer-cache-entries N]
//! ```
//! `--answer-cache-entries` turns the answer cache on with that many
//! entries (default 0: off; the environment variable
//! `MW_DNS_ANSWER_CACHE_ENTRIES` sets the default).
//! `--program-delay-us` makes the hook wait that long for each new entry
//! batch (a stand-in for the kernel update). On SIGTERM or SIGINT it prints
//! its counters as JSON on stdout and exits.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshward_dns_proxy::{
    AnswerCacheConfig, CacheConfig, Decision, DnsProxy, FqdnCache, Learned, Listeners, ProxyConfig,
    QueryInfo,
};

struct Args {
    listen: SocketAddr,
    workers: usize,
    deny_suffixes: Vec<String>,
    hold_timeout: Duration,
    program_delay: Duration,
    answer_cache_entries: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: "127.0.0.1:15053".parse().unwrap(),
        workers: 0,
        deny_suffixes: Vec::new(),
        hold_timeout: Duration::from_millis(100),
        program_delay: Duration::ZERO,
        answer_cache_entries: match std::env::var("MW_DNS_ANSWER_CACHE_ENTRIES") {
            Ok(v) => v
                .trim()
                .parse()
                .map_err(|e| format!("MW_DNS_ANSWER_CACHE_ENTRIES={v:?}: {e}"))?,
            Err(_) => 0,
        },
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => args.listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--workers" => {
                args.workers = value()?.parse().map_err(|e| format!("--workers: {e}"))?
            }
            "--deny-suffix" => args.deny_suffixes.push(value()?),
            "--hold-timeout-ms" => {
                args.hold_timeout =
                    Duration::from_millis(value()?.parse().map_err(|e| format!("{flag}: {e}"))?)
            }
            "--program-delay-us" => {
                args.program_delay =
                    Duration::from_micros(value()?.parse().map_err(|e| format!("{flag}: {e}"))?)
            }
            "--answer-cache-entries" => {
                args.answer_cache_entries = value()?.parse().map_err(|e| format!("{flag}: {e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("dns_proxy_node: {e}");
            std::process::exit(2);
        }
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.workers > 0 {
        rt.worker_threads(args.workers);
    }
    let rt = rt.enable_all().build().expect("tokio runtime");
    // On a worker, like the agent's task: with one worker everything runs
    // on one thread (no cross-thread wake-ups per query).
    rt.block_on(async { tokio::spawn(run(args)).await.expect("proxy task") });
}

async fn run(args: Args) {
    let deny = args.deny_suffixes.clone();
    let policy = move |q: &QueryInfo<'_>| {
        if deny.iter().any(|s| q.name.as_str().ends_with(s.as_str())) {
            Decision::Deny
        } else {
            Decision::Allow
        }
    };
    let cache = Arc::new(Mutex::new(FqdnCache::new(CacheConfig {
        refresh_slack: Duration::from_secs(1),
        ..CacheConfig::default()
    })));
    let delay = args.program_delay;
    let hook = move |learned: Learned| {
        let update = cache.lock().unwrap().insert(&learned, SystemTime::now());
        async move {
            if !update.is_empty() && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok::<(), std::convert::Infallible>(())
        }
    };
    let config = ProxyConfig {
        hold_timeout: args.hold_timeout,
        answer_cache: AnswerCacheConfig::with_entries(args.answer_cache_entries),
        ..ProxyConfig::default()
    };
    let proxy = DnsProxy::new(config, policy, hook);
    let listeners = Listeners::bind(args.listen).unwrap_or_else(|e| {
        eprintln!("dns_proxy_node: binding {}: {e}", args.listen);
        std::process::exit(1);
    });
    eprintln!("dns_proxy_node: listening on {}", args.listen);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        r = proxy.serve(listeners) => {
            eprintln!("dns_proxy_node: stopped: {r:?}");
            std::process::exit(1);
        }
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    println!(
        "{}",
        serde_json::to_string(&proxy.stats().snapshot()).expect("stats JSON")
    );
}
