//! Flow events: every verdict the node makes, as a structured record.
//!
//! Producers (the DNS proxy thread, the nflog listener, the mesh watcher)
//! call [`EventHub::publish`] from any thread. The hub resolves addresses
//! to pods from the latest datastore snapshot, keeps the most recent
//! events in a bounded ring ([`Ring`]: when full, the oldest goes and is
//! counted) and hands each event to followers over a bounded broadcast
//! channel (a follower too slow to keep up skips events and is told how
//! many). Memory therefore stays bounded whatever the event rate.
//!
//! [`Filter`] and [`render_line`] are pure: the control socket, `meshward
//! observe` and `meshward lab observe` share them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::datastore::Cluster;

/// Events kept unless configured otherwise.
pub const DEFAULT_CAPACITY: usize = 4096;
/// Events a follower may fall behind before it skips some.
const FOLLOW_BUFFER: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FlowType {
    /// A DNS query seen by the proxy.
    Dns,
    /// A packet judged by the nftables policy.
    L4,
    /// An HTTP request judged by the L7 proxy.
    L7,
    /// Tunnel peers and tunnel packets.
    Mesh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allowed,
    /// A packet dropped (by policy, or as invalid by the mesh).
    Dropped,
    /// A request refused with an answer (DNS REFUSED, HTTP 403).
    Denied,
    /// A state change, no packet judged (a mesh peer up or down).
    Info,
}

impl FlowType {
    fn as_str(self) -> &'static str {
        match self {
            FlowType::Dns => "dns",
            FlowType::L4 => "l4",
            FlowType::L7 => "l7",
            FlowType::Mesh => "mesh",
        }
    }
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "ALLOWED",
            Verdict::Dropped => "DROPPED",
            Verdict::Denied => "DENIED",
            Verdict::Info => "INFO",
        }
    }
}

/// One side of a flow: a pod when the address is one, else the address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The node the pod runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl Endpoint {
    /// `namespace/pod`, or the address.
    pub fn display_name(&self) -> String {
        match (&self.namespace, &self.pod) {
            (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
            _ => self.ip.clone(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsInfo {
    pub query: String,
    /// A, AAAA, ... (or the number).
    pub qtype: String,
    /// NOERROR, NXDOMAIN, REFUSED, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rcode: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<String>,
    /// Smallest TTL of the answer's addresses, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
    /// How long the answer was held while the kernel learned it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_micros: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct L7Info {
    pub method: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshInfo {
    /// The peer (node) concerned, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// peer-up, peer-down, invalid-packets.
    pub event: String,
    /// Packets this event stands for (invalid packets are summed per reason
    /// and interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// One verdict. Field names are stable (camelCase); absent fields are
/// left out of the JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowEvent {
    /// Unix time in milliseconds.
    pub time: u64,
    /// The node whose agent saw it.
    pub node: String,
    #[serde(rename = "type")]
    pub kind: FlowType,
    pub verdict: Verdict,
    /// egress or ingress (seen from the pod the policy selects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Endpoint>,
    /// TCP, UDP, ICMP, ... (or the number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l7: Option<L7Info>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshInfo>,
    /// For a drop: every policy that isolates the pod in that direction
    /// (any of them could have allowed it). For an allow: the one that did.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl FlowEvent {
    /// An event of `kind` and `verdict` now, every other field empty.
    pub fn new(kind: FlowType, verdict: Verdict) -> FlowEvent {
        FlowEvent {
            time: unix_ms(SystemTime::now()),
            node: String::new(),
            kind,
            verdict,
            direction: None,
            source: None,
            destination: None,
            protocol: None,
            dns: None,
            l7: None,
            mesh: None,
            policies: Vec::new(),
            reason: None,
        }
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Protocol numbers by name.
pub fn protocol_name(proto: u8) -> String {
    match proto {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        58 => "ICMPv6".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
    }
}

/// Which events a reader wants. Pods are `NAME` (any namespace) or
/// `NAMESPACE/NAME`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Filter {
    /// Either side in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Either side is this pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "type")]
    pub kind: Option<FlowType>,
    /// Only events at or after this Unix time in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
}

fn pod_matches(want: &str, e: Option<&Endpoint>) -> bool {
    let Some(e) = e else { return false };
    let Some(pod) = &e.pod else { return false };
    match want.split_once('/') {
        Some((ns, name)) => e.namespace.as_deref() == Some(ns) && pod == name,
        None => pod == want,
    }
}

impl Filter {
    pub fn matches(&self, e: &FlowEvent) -> bool {
        let (src, dst) = (e.source.as_ref(), e.destination.as_ref());
        if let Some(ns) = &self.namespace {
            let in_ns = |x: Option<&Endpoint>| x.and_then(|x| x.namespace.as_deref()) == Some(ns);
            if !in_ns(src) && !in_ns(dst) {
                return false;
            }
        }
        if let Some(p) = &self.pod {
            if !pod_matches(p, src) && !pod_matches(p, dst) {
                return false;
            }
        }
        if let Some(p) = &self.from_pod {
            if !pod_matches(p, src) {
                return false;
            }
        }
        if let Some(p) = &self.to_pod {
            if !pod_matches(p, dst) {
                return false;
            }
        }
        self.verdict.is_none_or(|v| v == e.verdict)
            && self.kind.is_none_or(|k| k == e.kind)
            && self.since.is_none_or(|s| e.time >= s)
    }
}

/// The readable one-line form:
/// `12:00:01.123 DROPPED l4 default/node1-pod1 -> 198.18.100.11:80/TCP policy MeshNetworkPolicy default/client-egress`.
pub fn render_line(e: &FlowEvent, with_node: bool) -> String {
    let mut out = String::new();
    let ms = e.time % 86_400_000;
    let _ = write!(
        out,
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        (ms / 60_000) % 60,
        (ms / 1000) % 60,
        ms % 1000
    );
    if with_node {
        let _ = write!(out, " {}", e.node);
    }
    let _ = write!(out, " {} {}", e.verdict.as_str(), e.kind.as_str());
    let side = |x: &Endpoint, port: bool| {
        let mut s = x.display_name();
        if let (true, Some(p)) = (port, x.port) {
            let _ = write!(s, ":{p}");
        }
        s
    };
    match (&e.source, &e.destination) {
        (Some(s), Some(d)) => {
            let _ = write!(out, " {} -> {}", side(s, false), side(d, true));
        }
        (Some(s), None) => {
            let _ = write!(out, " {}", side(s, false));
        }
        (None, Some(d)) => {
            let _ = write!(out, " -> {}", side(d, true));
        }
        (None, None) => {}
    }
    if let Some(p) = &e.protocol {
        let _ = write!(out, "/{p}");
    }
    if let Some(d) = &e.dns {
        let _ = write!(out, " {} {}", d.qtype, d.query);
        if let Some(rcode) = &d.rcode {
            let _ = write!(out, " {rcode}");
        }
        if !d.answers.is_empty() {
            let _ = write!(out, " [{}]", d.answers.join(","));
        }
        if let Some(ttl) = d.ttl {
            let _ = write!(out, " ttl {ttl}s");
        }
        if let Some(h) = d.hold_micros {
            let _ = write!(out, " held {h}µs");
        }
    }
    if let Some(l) = &e.l7 {
        let _ = write!(out, " {} {}", l.method, l.path);
        if let Some(s) = l.status {
            let _ = write!(out, " {s}");
        }
    }
    if let Some(m) = &e.mesh {
        let _ = write!(out, " {}", m.event);
        if let Some(p) = &m.peer {
            let _ = write!(out, " peer {p}");
        }
        if let Some(n) = m.count {
            let _ = write!(out, " x{n}");
        }
    }
    if let Some(d) = &e.direction {
        let _ = write!(out, " {d}");
    }
    for p in &e.policies {
        let _ = write!(out, " policy {p}");
    }
    if let Some(r) = &e.reason {
        let _ = write!(out, " ({r})");
    }
    out
}

/// The most recent events, at most `capacity`; older ones are evicted and
/// counted.
#[derive(Debug)]
pub struct Ring<T> {
    items: VecDeque<T>,
    capacity: usize,
    evicted: u64,
}

impl<T> Ring<T> {
    pub fn new(capacity: usize) -> Ring<T> {
        let capacity = capacity.max(1);
        Ring {
            // grown on demand: a large configured ring costs nothing idle
            items: VecDeque::new(),
            capacity,
            evicted: 0,
        }
    }

    pub fn push(&mut self, item: T) {
        if self.items.len() == self.capacity {
            self.items.pop_front();
            self.evicted += 1;
        }
        self.items.push_back(item);
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Items pushed out by newer ones.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &T> + '_ {
        self.items.iter()
    }
}

/// Pods by address, rebuilt per datastore snapshot.
#[derive(Default)]
struct PodIndex {
    generation: u64,
    by_ip: HashMap<IpAddr, Arc<Endpoint>>,
}

/// Counters of the hub.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubStats {
    pub published: u64,
    /// Pushed out of the ring by newer events.
    pub evicted: u64,
    /// Lost before they were recorded (e.g. the kernel's nflog queue
    /// overflowed).
    pub lost: u64,
    pub buffered: usize,
    pub capacity: usize,
}

/// The node's event hub: ring buffer, followers, pod resolution.
pub struct EventHub {
    node: String,
    ring: Mutex<Ring<Arc<FlowEvent>>>,
    followers: broadcast::Sender<Arc<FlowEvent>>,
    pods: ArcSwap<PodIndex>,
    published: AtomicU64,
    lost: AtomicU64,
}

impl EventHub {
    pub fn new(node: &str, capacity: usize) -> Arc<EventHub> {
        let (followers, _) = broadcast::channel(FOLLOW_BUFFER);
        Arc::new(EventHub {
            node: node.to_string(),
            ring: Mutex::new(Ring::new(capacity)),
            followers,
            pods: ArcSwap::from_pointee(PodIndex::default()),
            published: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        })
    }

    /// Takes the pods of a new snapshot (cheap when nothing changed).
    pub fn set_cluster(&self, cluster: &Cluster) {
        if self.pods.load().generation == cluster.generation() && cluster.generation() != 0 {
            return;
        }
        let mut by_ip = HashMap::new();
        for pod in cluster.pods() {
            let e = Arc::new(Endpoint {
                ip: String::new(),
                port: None,
                pod: Some(pod.name.clone()),
                namespace: Some(pod.namespace.clone()),
                labels: pod.labels.clone(),
                node: (!pod.node.is_empty()).then(|| pod.node.clone()),
            });
            for ip in &pod.ips {
                by_ip.insert(*ip, e.clone());
            }
        }
        self.pods.store(Arc::new(PodIndex {
            generation: cluster.generation(),
            by_ip,
        }));
    }

    /// `ip` (and `port`) as an endpoint, with its pod when it is one.
    pub fn endpoint(&self, ip: IpAddr, port: Option<u16>) -> Endpoint {
        let mut e = match self.pods.load().by_ip.get(&ip) {
            Some(pod) => (**pod).clone(),
            None => Endpoint::default(),
        };
        e.ip = ip.to_string();
        e.port = port;
        e
    }

    /// Records an event (any thread; never blocks on readers).
    pub fn publish(&self, mut event: FlowEvent) {
        if event.node.is_empty() {
            event.node.clone_from(&self.node);
        }
        let event = Arc::new(event);
        self.published.fetch_add(1, Relaxed);
        self.ring.lock().push(event.clone());
        // no followers is fine
        let _ = self.followers.send(event);
    }

    /// Events lost before they reached the hub.
    pub fn count_lost(&self, n: u64) {
        self.lost.fetch_add(n, Relaxed);
    }

    /// The buffered events `filter` admits, oldest first, at most `limit`
    /// (the most recent ones).
    pub fn recent(&self, filter: &Filter, limit: usize) -> Vec<Arc<FlowEvent>> {
        let ring = self.ring.lock();
        let mut out: Vec<Arc<FlowEvent>> = ring
            .iter()
            .rev()
            .filter(|e| filter.matches(e))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// Events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FlowEvent>> {
        self.followers.subscribe()
    }

    pub fn stats(&self) -> HubStats {
        let ring = self.ring.lock();
        HubStats {
            published: self.published.load(Relaxed),
            evicted: ring.evicted(),
            lost: self.lost.load(Relaxed),
            buffered: ring.len(),
            capacity: ring.capacity(),
        }
    }
}

/// `--since 5m` → the Unix time in ms that many ago.
pub fn since(ago: Duration) -> u64 {
    unix_ms(SystemTime::now().checked_sub(ago).unwrap_or(UNIX_EPOCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str) -> Endpoint {
        Endpoint {
            ip: "198.19.1.2".into(),
            pod: Some(name.into()),
            namespace: Some(ns.into()),
            ..Endpoint::default()
        }
    }

    fn drop_event() -> FlowEvent {
        let mut e = FlowEvent::new(FlowType::L4, Verdict::Dropped);
        e.time = 12 * 3_600_000 + 1123;
        e.node = "node1".into();
        e.direction = Some("egress".into());
        e.source = Some(pod("default", "node1-pod1"));
        e.destination = Some(Endpoint {
            ip: "198.18.100.11".into(),
            port: Some(80),
            ..Endpoint::default()
        });
        e.protocol = Some("TCP".into());
        e.policies = vec!["MeshNetworkPolicy default/client-egress".into()];
        e
    }

    #[test]
    fn a_flood_keeps_the_ring_bounded_and_counts_what_it_evicted() {
        let mut ring = Ring::new(1000);
        for i in 0..1_000_000u64 {
            ring.push(i);
            assert!(ring.len() <= 1000);
        }
        assert_eq!(ring.len(), 1000);
        assert_eq!(ring.evicted(), 999_000);
        // the most recent ones stay, in order
        assert_eq!(ring.iter().next(), Some(&999_000));
        assert_eq!(ring.iter().last(), Some(&999_999));
    }

    #[test]
    fn a_flood_through_the_hub_stays_bounded() {
        let hub = EventHub::new("node1", 4096);
        let mut slow = hub.subscribe();
        let event = drop_event();
        for _ in 0..1_000_000 {
            hub.publish(event.clone());
        }
        let s = hub.stats();
        assert_eq!((s.published, s.buffered), (1_000_000, 4096));
        assert_eq!(s.evicted, 1_000_000 - 4096);
        // the follower that never read lags by everything past its buffer
        match slow.try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                assert_eq!(n, 1_000_000 - FOLLOW_BUFFER as u64)
            }
            other => panic!("expected a lag, got {other:?}"),
        }
        assert_eq!(
            hub.recent(&Filter::default(), usize::MAX).len(),
            4096,
            "recent() returns at most the ring"
        );
    }

    #[test]
    fn filters_select_by_pod_side_namespace_verdict_type_and_time() {
        let e = drop_event();
        let f = |f: Filter| f.matches(&e);
        assert!(f(Filter::default()));
        assert!(f(Filter {
            pod: Some("node1-pod1".into()),
            ..Filter::default()
        }));
        assert!(f(Filter {
            pod: Some("default/node1-pod1".into()),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            pod: Some("other/node1-pod1".into()),
            ..Filter::default()
        }));
        assert!(f(Filter {
            from_pod: Some("node1-pod1".into()),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            to_pod: Some("node1-pod1".into()),
            ..Filter::default()
        }));
        assert!(f(Filter {
            namespace: Some("default".into()),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            namespace: Some("kube-system".into()),
            ..Filter::default()
        }));
        assert!(f(Filter {
            verdict: Some(Verdict::Dropped),
            kind: Some(FlowType::L4),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            verdict: Some(Verdict::Allowed),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            kind: Some(FlowType::Dns),
            ..Filter::default()
        }));
        assert!(f(Filter {
            since: Some(e.time),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            since: Some(e.time + 1),
            ..Filter::default()
        }));
    }

    #[test]
    fn renders_a_readable_line_and_stable_json() {
        let e = drop_event();
        assert_eq!(
            render_line(&e, false),
            "12:00:01.123 DROPPED l4 default/node1-pod1 -> 198.18.100.11:80/TCP egress \
             policy MeshNetworkPolicy default/client-egress"
        );
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["type"], "l4");
        assert_eq!(json["verdict"], "dropped");
        assert_eq!(json["source"]["pod"], "node1-pod1");
        assert_eq!(json["destination"]["port"], 80);
        assert!(json.get("dns").is_none(), "absent fields are left out");
        let back: FlowEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn resolves_pod_addresses_from_the_snapshot() {
        let hub = EventHub::new("node1", 8);
        let unknown = hub.endpoint("198.18.100.11".parse().unwrap(), Some(80));
        assert_eq!(unknown.display_name(), "198.18.100.11");
        assert!(unknown.pod.is_none());
    }
}
