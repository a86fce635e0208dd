//! CNI ADD/DEL latency: meshward-cni against Debian's bridge + host-local,
//! same machine, same run, cycles interleaved.
//!
//! `cargo bench -p meshward-cni --bench add_del` (root). Each cycle creates a
//! fresh pod namespace (untimed), times ADD and DEL of one plugin as a
//! runtime sees them (process spawn to exit, config on stdin, DEL with the
//! ADD result as prevResult), then deletes the namespace (untimed). A test
//! namespace acts as the node; addresses come from 198.18.0.0/15 only.
//!
//! MESHWARD_BENCH_CYCLES (default 200) cycles per plugin, stopped early
//! after MESHWARD_BENCH_MAX_SECS (default 300) seconds.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{exec_plugin, find_plugin, Attachment, Chain, PodPlugin};
use meshward_testkit::{Netns, TempDir};
use serde_json::{json, Value};

const WARMUP: usize = 3;
const MAX_CYCLES: usize = 100_000;

struct Subject {
    label: &'static str,
    chain: Chain,
    bin: PathBuf,
    add: Vec<Duration>,
    del: Vec<Duration>,
    _state: TempDir,
}

impl Subject {
    fn new(label: &'static str, plugin: PodPlugin, cidr: &str, bridge: &str) -> Subject {
        let state = TempDir::new();
        let conf = plugin.config(cidr, state.path(), bridge);
        let cni_path = PodPlugin::cni_path();
        let bin = find_plugin(plugin.type_name(), &cni_path)
            .unwrap_or_else(|| panic!("{} not found in {cni_path:?}", plugin.type_name()));
        let chain = Chain::new(
            json!({ "cniVersion": "1.0.0", "name": format!("mwtbench-{label}"), "plugins": [conf] }),
            cni_path,
            json!({}),
        );
        Subject {
            label,
            chain,
            bin,
            add: Vec::new(),
            del: Vec::new(),
            _state: state,
        }
    }

    /// One ADD + DEL in a fresh pod namespace; returns (add, del) latency.
    fn cycle(&self, host: &Netns, n: usize) -> (Duration, Duration) {
        let pod = Netns::new("p");
        let att = Attachment::new(&format!("{}-{}-{n}", pod.name(), self.label), pod.path());
        let plugin = &self.chain.conflist["plugins"][0];
        let add_conf = self.chain.plugin_config(plugin, None);
        let add = exec_plugin(
            host,
            &self.bin,
            "ADD",
            &att,
            &add_conf,
            &self.chain.cni_path,
        )
        .unwrap_or_else(|e| panic!("{} ADD (cycle {n}): {e}", self.label));
        let result: Option<Value> = add.result;
        let del_conf = self.chain.plugin_config(plugin, result.as_ref());
        let del = exec_plugin(
            host,
            &self.bin,
            "DEL",
            &att,
            &del_conf,
            &self.chain.cni_path,
        )
        .unwrap_or_else(|e| panic!("{} DEL (cycle {n}): {e}", self.label));
        drop(pod);
        (add.elapsed, del.elapsed)
    }
}

struct Stats {
    n: usize,
    p50: f64,
    p99: f64,
    mean: f64,
    min: f64,
    max: f64,
}

fn stats(samples: &[Duration]) -> Stats {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    // nearest rank
    let pct = |p: f64| ms[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
    Stats {
        n,
        p50: pct(0.50),
        p99: pct(0.99),
        mean: ms.iter().sum::<f64>() / n as f64,
        min: ms[0],
        max: ms[n - 1],
    }
}

fn env_usize(key: &str, default: usize) -> usize {
    match std::env::var(key) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{key}={v}: not a number")),
        Err(_) => default,
    }
}

fn main() {
    meshward_testkit::require_root();
    let cycles = env_usize("MESHWARD_BENCH_CYCLES", 200).clamp(1, MAX_CYCLES);
    let budget = Duration::from_secs(env_usize("MESHWARD_BENCH_MAX_SECS", 300) as u64);

    let host = Netns::new("h");
    // "ours" is meshward-cni; MESHWARD_TEST_PLUGIN=bridge turns the run into
    // a bridge-vs-bridge calibration (ratios should be ~1).
    let ours = PodPlugin::under_test();
    let mut subjects = [
        Subject::new(ours.type_name(), ours, "198.19.251.0/24", "mwtbench1"),
        Subject::new(
            "debian-bridge",
            PodPlugin::Bridge,
            "198.19.252.0/24",
            "mwtbench0",
        ),
    ];
    println!(
        "add_del: {cycles} ADD+DEL cycles per plugin (+{WARMUP} warm-up), node netns {}, budget {budget:?}",
        host.name()
    );
    for s in &subjects {
        for n in 0..WARMUP {
            s.cycle(&host, n);
        }
    }

    let start = Instant::now();
    let mut done = 0;
    for i in 0..cycles {
        if start.elapsed() > budget {
            println!("time budget reached after {done} cycles");
            break;
        }
        // Alternate which plugin goes first so neither always runs warm.
        let order: [usize; 2] = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let (add, del) = subjects[k].cycle(&host, WARMUP + i);
            subjects[k].add.push(add);
            subjects[k].del.push(del);
        }
        done += 1;
    }
    println!(
        "measured {done} cycles per plugin in {:.1?}",
        start.elapsed()
    );
    if done == 0 {
        eprintln!("no cycle measured (budget {budget:?})");
        std::process::exit(1);
    }

    println!(
        "{:<14} {:<4} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "plugin", "op", "n", "p50 ms", "p99 ms", "mean ms", "min ms", "max ms"
    );
    let mut summary = serde_json::Map::new();
    for s in &subjects {
        for (op, samples) in [("ADD", &s.add), ("DEL", &s.del)] {
            let st = stats(samples);
            println!(
                "{:<14} {:<4} {:>6} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                s.label, op, st.n, st.p50, st.p99, st.mean, st.min, st.max
            );
            summary.insert(
                format!("{}_{}", s.label, op.to_lowercase()),
                json!({ "n": st.n, "p50_ms": st.p50, "p99_ms": st.p99, "mean_ms": st.mean }),
            );
        }
    }
    for (op, ours, theirs) in [
        ("ADD", &subjects[0].add, &subjects[1].add),
        ("DEL", &subjects[0].del, &subjects[1].del),
    ] {
        let (a, b) = (stats(ours), stats(theirs));
        println!(
            "ratio {}/debian-bridge {op}: p50 {:.2}  p99 {:.2}  mean {:.2}",
            subjects[0].label,
            a.p50 / b.p50,
            a.p99 / b.p99,
            a.mean / b.mean
        );
        summary.insert(
            format!("ratio_{}", op.to_lowercase()),
            json!({ "p50": a.p50 / b.p50, "p99": a.p99 / b.p99, "mean": a.mean / b.mean }),
        );
    }
    println!("json: {}", Value::Object(summary));
}
