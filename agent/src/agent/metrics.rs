//! Prometheus metrics (prometheus-client, OpenMetrics text) for the health
//! endpoint's `/metrics`.
//!
//! Most values are counters other parts already keep (the mesh's per-peer
//! traffic and drops, the DNS proxy's counters, the kernel's per-endpoint
//! drop counters), so a scrape reads snapshots of them into a fresh
//! registry ([`render`]); nothing is counted twice and the data path gains
//! no work. The one value measured here is how long programming learned
//! peers into the kernel takes ([`observe_programming`], a histogram).

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use meshward_mesh::Mesh;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::events::EventHub;
use super::policy::PolicyHandle;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;

/// add_fqdn latency: 10 µs .. ~80 ms.
static PROGRAMMING: LazyLock<Histogram> =
    LazyLock::new(|| Histogram::new(exponential_buckets(0.000_01, 2.0, 14)));

/// Records one programming of learned peers into the kernel.
pub fn observe_programming(took: Duration) {
    PROGRAMMING.observe(took.as_secs_f64());
}

/// apply_policy latency (compiled rules into the kernel): 100 µs .. ~13 s.
static POLICY_APPLY: LazyLock<Histogram> =
    LazyLock::new(|| Histogram::new(exponential_buckets(0.000_1, 2.0, 18)));

/// Records one application of compiled policy rules to the kernel.
pub fn observe_policy_apply(took: Duration) {
    POLICY_APPLY.observe(took.as_secs_f64());
}

/// What a scrape reads, once start-up got that far.
#[derive(Clone)]
pub struct Sources {
    pub mesh: Arc<Mesh>,
    pub policy: Option<PolicyHandle>,
    /// None with `flowEvents: false`.
    pub events: Option<Arc<EventHub>>,
}

/// A histogram whose buckets were counted elsewhere.
#[derive(Debug)]
struct BucketHistogram {
    sum: f64,
    count: u64,
    /// (upper bound, count in this bucket alone)
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for BucketHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn counter_family() -> Family<Labels, Counter> {
    Family::default()
}

fn gauge_family() -> Family<Labels, Gauge> {
    Family::default()
}

/// Resident set size of this process, from /proc/self/statm.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok().filter(|p| *p > 0).unwrap_or(4096))
}

/// The metrics text for one scrape.
pub fn render(ready: bool, sources: Option<&Sources>) -> String {
    let mut registry = Registry::default();

    let ready_g = Gauge::<i64>::default();
    ready_g.set(i64::from(ready));
    registry.register(
        "meshward_agent_ready",
        "Whether the agent has started and its datastore has synced",
        ready_g,
    );
    let build = gauge_family();
    build
        .get_or_create(&labels(&[("version", env!("CARGO_PKG_VERSION"))]))
        .set(1);
    registry.register("meshward_build_info", "The running meshward version", build);
    if let Some(rss) = rss_bytes() {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(rss).unwrap_or(i64::MAX));
        registry.register(
            "meshward_process_resident_memory_bytes",
            "Resident memory of the agent process",
            g,
        );
    }
    registry.register(
        "meshward_fqdn_programming_seconds",
        "Time to program the peers of one DNS answer into the kernel",
        PROGRAMMING.clone(),
    );
    registry.register(
        "meshward_policy_apply_seconds",
        "Time to bring the kernel's policy rules in line with a changed policy (one transaction)",
        POLICY_APPLY.clone(),
    );
    // Decisions of the L7 proxy since start (malformed count as denied).
    let l7 = counter_family();
    let (allowed, denied) = super::l7::counts();
    for (verdict, n) in [("allowed", allowed), ("denied", denied)] {
        l7.get_or_create(&labels(&[("verdict", verdict)])).inc_by(n);
    }
    registry.register(
        "meshward_l7_requests",
        "HTTP requests judged by the L7 proxy, by verdict",
        l7,
    );

    if let Some(s) = sources {
        mesh_metrics(&mut registry, &s.mesh);
        if let Some(policy) = &s.policy {
            policy_metrics(&mut registry, policy);
        }
    }
    if let Some(h) = sources.and_then(|s| s.events.as_ref()).map(|e| e.stats()) {
        let events = counter_family();
        events
            .get_or_create(&labels(&[("outcome", "published")]))
            .inc_by(h.published);
        events
            .get_or_create(&labels(&[("outcome", "evicted")]))
            .inc_by(h.evicted);
        events
            .get_or_create(&labels(&[("outcome", "lost")]))
            .inc_by(h.lost);
        registry.register(
            "meshward_flow_events",
            "Flow events published, evicted from the ring, or lost before it",
            events,
        );
    }

    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out = "# encoding the metrics failed\n# EOF\n".into();
    }
    out
}

fn mesh_metrics(registry: &mut Registry, mesh: &Mesh) {
    let stats = mesh.stats();
    let packets = counter_family();
    let bytes = counter_family();
    let handshakes = counter_family();
    let up = gauge_family();
    let last = gauge_family();
    for p in &stats.peers {
        let tx = labels(&[("peer", &p.name), ("direction", "tx")]);
        let rx = labels(&[("peer", &p.name), ("direction", "rx")]);
        packets.get_or_create(&tx).inc_by(p.tx_packets);
        packets.get_or_create(&rx).inc_by(p.rx_packets);
        bytes.get_or_create(&tx).inc_by(p.tx_bytes);
        bytes.get_or_create(&rx).inc_by(p.rx_bytes);
        let peer = labels(&[("peer", &p.name)]);
        handshakes.get_or_create(&peer).inc_by(p.handshakes);
        up.get_or_create(&peer).set(i64::from(p.session_up));
        if let Some(t) = p.last_handshake {
            let secs = t
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                .unwrap_or(0);
            last.get_or_create(&peer).set(secs);
        }
    }
    registry.register(
        "meshward_peer_packets",
        "Tunnel data packets per peer",
        packets,
    );
    registry.register("meshward_peer_bytes", "Tunnel data bytes per peer", bytes);
    registry.register(
        "meshward_peer_handshakes",
        "Completed WireGuard handshakes per peer",
        handshakes,
    );
    registry.register("meshward_peer_up", "Whether the peer's session is up", up);
    registry.register(
        "meshward_peer_last_handshake_timestamp_seconds",
        "Unix time of the peer's last completed handshake",
        last,
    );
    let drops = counter_family();
    for (reason, n) in stats.drops.iter() {
        drops
            .get_or_create(&labels(&[("reason", reason.as_str())]))
            .inc_by(n);
    }
    registry.register(
        "meshward_mesh_dropped_packets",
        "Tunnel packets and datagrams dropped (invalid, forged, unroutable) by reason",
        drops,
    );
}

fn policy_metrics(registry: &mut Registry, policy: &PolicyHandle) {
    if let Some(d) = policy.dns_stats() {
        let queries = counter_family();
        for (verdict, n) in [
            ("allowed", d.queries_allowed),
            ("denied", d.queries_denied),
            (
                "malformed",
                d.queries_formerr + d.queries_notimp + d.queries_dropped,
            ),
            ("overload", d.queries_overload),
        ] {
            queries
                .get_or_create(&labels(&[("verdict", verdict)]))
                .inc_by(n);
        }
        registry.register(
            "meshward_dns_queries",
            "DNS queries seen by the proxy, by verdict",
            queries,
        );
        let upstream = counter_family();
        upstream
            .get_or_create(&labels(&[("error", "timeout")]))
            .inc_by(d.upstream_timeouts);
        upstream
            .get_or_create(&labels(&[("error", "error")]))
            .inc_by(d.upstream_errors);
        registry.register(
            "meshward_dns_upstream_failures",
            "Queries answered SERVFAIL because upstream failed",
            upstream,
        );
        let cache = counter_family();
        for (result, n) in [
            ("hit", d.answer_cache_hits),
            ("miss", d.answer_cache_misses),
        ] {
            cache
                .get_or_create(&labels(&[("result", result)]))
                .inc_by(n);
        }
        registry.register(
            "meshward_dns_answer_cache_lookups",
            "Allowed queries answered from the proxy's answer cache (hit) or sent upstream while it is on (miss)",
            cache,
        );
        let cache_changes = counter_family();
        for (change, n) in [
            ("insert", d.answer_cache_inserts),
            ("eviction", d.answer_cache_evictions),
        ] {
            cache_changes
                .get_or_create(&labels(&[("change", change)]))
                .inc_by(n);
        }
        registry.register(
            "meshward_dns_answer_cache_changes",
            "Answers stored in, and entries evicted from, the proxy's answer cache",
            cache_changes,
        );
        let mut buckets: Vec<(f64, u64)> = meshward_dns_proxy::HOLD_BUCKETS_US
            .iter()
            .map(|us| (*us as f64 / 1e6, 0))
            .chain(std::iter::once((f64::INFINITY, 0)))
            .collect();
        for (slot, n) in buckets.iter_mut().zip(&d.hold_us_buckets) {
            slot.1 = *n;
        }
        registry.register(
            "meshward_dns_hold_seconds",
            "How long answers were held while their addresses were programmed",
            BucketHistogram {
                sum: d.hold_us_total as f64 / 1e6,
                count: d.holds,
                buckets,
            },
        );
    }
    let learned = Gauge::<i64>::default();
    learned.set(i64::try_from(policy.learned_entries()).unwrap_or(i64::MAX));
    registry.register(
        "meshward_fqdn_learned_entries",
        "Learned (name, address) entries",
        learned,
    );
    let elements = gauge_family();
    for (set, n) in policy.element_counts() {
        elements
            .get_or_create(&labels(&[("set", &set)]))
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    registry.register(
        "meshward_nftables_elements",
        "Elements per nftables policy set",
        elements,
    );
    match policy.drop_counters() {
        Ok(counts) => {
            let rules = policy.rules();
            let mut by_policy: BTreeMap<(String, &'static str), (u64, u64)> = BTreeMap::new();
            for c in counts {
                let egress = c.direction == meshward_egress::Direction::Egress;
                let dir = if egress { "egress" } else { "ingress" };
                let isolating = rules.endpoint_by_ip(c.ip).and_then(|ep| {
                    if egress {
                        ep.egress.clone()
                    } else {
                        ep.ingress.clone()
                    }
                });
                let names: Vec<String> = match isolating {
                    Some(d) if !d.policies.is_empty() => {
                        d.policies.iter().map(ToString::to_string).collect()
                    }
                    // the pod or its policy is gone; the counter stays a day
                    _ => vec!["unknown".into()],
                };
                for name in names {
                    let slot = by_policy.entry((name, dir)).or_default();
                    slot.0 += c.packets;
                    slot.1 += c.bytes;
                }
            }
            let packets = counter_family();
            let bytes = counter_family();
            for ((name, dir), (p, b)) in by_policy {
                let l = labels(&[("policy", &name), ("direction", dir)]);
                packets.get_or_create(&l).inc_by(p);
                bytes.get_or_create(&l).inc_by(b);
            }
            registry.register(
                "meshward_policy_dropped_packets",
                "Packets dropped by policy; a drop counts for every policy isolating the pod in that direction",
                packets,
            );
            registry.register(
                "meshward_policy_dropped_bytes",
                "Bytes dropped by policy (attributed as the packets are)",
                bytes,
            );
        }
        Err(e) => tracing::debug!("metrics: reading drop counters: {e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_sources_the_basics_are_there() {
        let text = render(true, None);
        assert!(text.contains("\nmeshward_agent_ready 1\n"), "{text}");
        assert!(
            text.contains("# TYPE meshward_l7_requests counter"),
            "{text}"
        );
        assert!(
            // other tests of this binary may have counted decisions
            text.contains("meshward_l7_requests_total{verdict=\"denied\"} "),
            "{text}"
        );
        assert!(
            text.contains("meshward_process_resident_memory_bytes "),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn programming_latency_lands_in_its_histogram() {
        observe_programming(Duration::from_micros(15));
        let text = render(false, None);
        let count: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("meshward_fqdn_programming_seconds_count "))
            .expect("a count line")
            .parse()
            .unwrap();
        assert!(count >= 1, "{text}");
    }

    #[test]
    fn policy_apply_latency_lands_in_its_histogram() {
        observe_policy_apply(Duration::from_millis(3));
        let text = render(false, None);
        let count: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("meshward_policy_apply_seconds_count "))
            .expect("a count line")
            .parse()
            .unwrap();
        assert!(count >= 1, "{text}");
    }

    #[test]
    fn bucket_histograms_encode_cumulatively() {
        let mut registry = Registry::default();
        registry.register(
            "h_seconds",
            "h",
            BucketHistogram {
                sum: 0.5,
                count: 3,
                buckets: vec![(0.1, 1), (1.0, 2), (f64::INFINITY, 0)],
            },
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("h_seconds_bucket{le=\"1.0\"} 3"), "{out}");
        assert!(out.contains("h_seconds_bucket{le=\"+Inf\"} 3"), "{out}");
    }

    #[test]
    fn rss_is_read() {
        assert!(rss_bytes().unwrap() > 0);
    }
}
