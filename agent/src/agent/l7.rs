//! The node's L7 proxy ([`meshward_l7_proxy::L7Proxy`]) wired to the
//! compiled policy: nftables TPROXYs TCP on ports with `rules.http` /
//! `rules.tls` (per endpoint and direction) to it, it asks [`L7Rules`]
//! what applies, and every decision becomes an `l7` flow event and a
//! `meshward_l7_requests_total` count.
//!
//! - Rules: when the policy engine's rules change (before the kernel gets
//!   them), [`L7Shared::set_rules`] rebuilds a table (local endpoint
//!   address, direction) → port → the endpoint's [`DirectionRules`] and
//!   swaps it in ([`ArcSwap`]); a lookup is two hash lookups plus a scan
//!   of that port's few entries. The proxy's rule sets (compiled regexes)
//!   are built once per distinct set of matching entries and memoised per
//!   (rules, port). The proxy listens before the first apply; until the
//!   first rules arrive (the kernel may still hold a predecessor's redirect
//!   sets) every request is denied: fail closed for those milliseconds.
//! - Learned peers: an entry with toFQDNs selectors covers an address when
//!   a name learned for that address (from any pod's DNS, Cilium's
//!   semantics as for the kernel's sets) matches them. The policy engine
//!   keeps an address → names index beside its cache ([`PeerNames`]),
//!   updated on every learn, eviction and expiry.
//! - The proxy runs on threads of its own (`l7ProxyThreads`, default one
//!   per core), each a current-thread tokio runtime with its own
//!   SO_REUSEPORT listeners, as the DNS proxy runs apart (a busy reconcile
//!   never delays a request); a proxy that cannot start fails the start, one
//!   that panics or stops aborts the process (fail loud; the supervisor
//!   restarts the agent).
//! - Onward connections originate on the node (output hook), so they pass
//!   no prerouting rule and are not redirected again. They leave from the
//!   client's address (IP_TRANSPARENT bind, `transparent_upstream`), so a
//!   remote destination node enforces its pod's ingress policy on the real
//!   client; replies are delivered to the proxy by the `socket transparent`
//!   rule of the L7 chain and the TPROXY policy routing.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use meshward_l7_proxy::{
    Direction, EventSink, HttpRuleSet, L7Event, L7Protocol, PolicySource, PortPolicy, ProxyConfig,
    SniRuleSet, Verdict as L7Verdict,
};
use meshward_policy::{DirectionRules, Fqdn, L7Applies, L7Rule, NodeRules};
use parking_lot::Mutex;
use tracing::{error, info, warn};

use super::events::{EventHub, FlowEvent, FlowType, L7Info, Verdict};
use crate::config::PolicySettings;

/// Requests (or TLS connections) judged, by outcome, since start.
static ALLOWED: AtomicU64 = AtomicU64::new(0);
static DENIED: AtomicU64 = AtomicU64::new(0);

/// (allowed, denied) decisions of the L7 proxy since start (malformed
/// requests count as denied).
pub fn counts() -> (u64, u64) {
    (
        ALLOWED.load(Ordering::Relaxed),
        DENIED.load(Ordering::Relaxed),
    )
}

/// The L7 ports of every local endpoint and direction, for status.
pub fn status_ports(rules: &NodeRules) -> Vec<super::protocol::L7Ports> {
    let mut out = Vec::new();
    for ep in rules.endpoints.values() {
        for (direction, dir) in [("egress", &ep.egress), ("ingress", &ep.ingress)] {
            let ports: Vec<u16> = dir.iter().flat_map(|d| d.l7_ports()).collect();
            if !ports.is_empty() {
                out.push(super::protocol::L7Ports {
                    pod: format!("{}/{}", ep.pod.namespace, ep.pod.name),
                    direction: direction.into(),
                    ports,
                });
            }
        }
    }
    out
}

/// Memoised proxy rule sets per (rules, port) at most; beyond, the memo
/// starts over (distinct sets are few: one per combination of entries).
const MEMO_CAP: usize = 1024;

/// One L7 port of one endpoint direction.
struct PortTable {
    rules: Arc<DirectionRules>,
    port: u16,
    has_fqdn: bool,
    /// The compiled HTTP rules of each entry on this port (by index into
    /// `rules.l7`), compiled when the table is built (by the policy engine,
    /// not the proxy).
    compiled: HashMap<usize, Result<Arc<HttpRuleSet>, String>>,
    /// Matching entry indices → the proxy's policy (unions of `compiled`).
    memo: Mutex<HashMap<Vec<usize>, PortPolicy>>,
}

impl PortTable {
    fn new(rules: Arc<DirectionRules>, port: u16) -> PortTable {
        let mut compiled = HashMap::new();
        for (i, entry) in rules.l7.iter().enumerate() {
            if entry.port != port {
                continue;
            }
            if let L7Rule::Http(list) = &entry.rule {
                let policy = entry.policy.to_string();
                let set = HttpRuleSet::new(list.iter().map(|r| (r, policy.as_str())))
                    .map(Arc::new)
                    .map_err(|e| e.to_string());
                compiled.insert(i, set);
            }
        }
        PortTable {
            has_fqdn: rules
                .l7
                .iter()
                .any(|a| a.port == port && !a.fqdns.is_empty()),
            rules,
            port,
            compiled,
            memo: Mutex::new(HashMap::new()),
        }
    }

    fn policy(&self, peer: IpAddr, names: &[Fqdn]) -> PortPolicy {
        let matching = self.rules.l7_matching(peer, names, self.port);
        if let Some(p) = self.memo.lock().get(&matching) {
            return p.clone();
        }
        let policy = self.build(&matching);
        let mut memo = self.memo.lock();
        if memo.len() >= MEMO_CAP {
            memo.clear();
        }
        memo.insert(matching, policy.clone());
        policy
    }

    fn build(&self, matching: &[usize]) -> PortPolicy {
        let all_policies = || {
            self.rules
                .policies
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.rules.l7_combine(matching) {
            L7Applies::Nothing => {
                PortPolicy::Http(Arc::new(HttpRuleSet::deny_all(&all_policies())))
            }
            L7Applies::AllowAll(_) => PortPolicy::AllowAll,
            L7Applies::Http(_) => {
                let mut sets = Vec::new();
                for i in matching {
                    match self.compiled.get(i) {
                        Some(Ok(set)) => sets.push(set.as_ref()),
                        Some(Err(e)) => {
                            // The CRD validation checks the same fields; deny
                            // rather than widen.
                            error!(
                                "an HTTP rule cannot be compiled, denying on port {}: {e}",
                                self.port
                            );
                            return PortPolicy::Http(Arc::new(HttpRuleSet::deny_all(
                                &all_policies(),
                            )));
                        }
                        None => {}
                    }
                }
                PortPolicy::Http(Arc::new(HttpRuleSet::union(sets)))
            }
            L7Applies::Sni(list) => PortPolicy::Sni(Arc::new(SniRuleSet::new(
                list.into_iter().map(|(s, p)| (s.clone(), p.to_string())),
            ))),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Side {
    Egress,
    Ingress,
}

/// The proxy's view of the rules: (local address, side) → port → table.
#[derive(Default)]
pub struct L7Rules {
    by_endpoint: HashMap<(IpAddr, Side), HashMap<u16, Arc<PortTable>>>,
}

impl L7Rules {
    /// Builds the tables of `rules` (tables are shared by endpoints that
    /// share their `DirectionRules`). A table whose rules and port are
    /// those of one in `previous` is that table, compiled rules and memo
    /// included: a change elsewhere compiles nothing again here, and
    /// nothing is ever compiled on the proxy's threads.
    pub fn build(rules: &NodeRules, previous: Option<&L7Rules>) -> L7Rules {
        let mut old: HashMap<u16, Vec<&Arc<PortTable>>> = HashMap::new();
        for table in previous
            .iter()
            .flat_map(|p| p.by_endpoint.values())
            .flat_map(|t| t.values())
        {
            let same = old.entry(table.port).or_default();
            if !same.iter().any(|t| Arc::ptr_eq(t, table)) {
                same.push(table);
            }
        }
        let mut shared: HashMap<(usize, u16), Arc<PortTable>> = HashMap::new();
        let mut by_endpoint = HashMap::new();
        for ep in rules.endpoints.values() {
            for (side, dir) in [(Side::Egress, &ep.egress), (Side::Ingress, &ep.ingress)] {
                let Some(dir) = dir else { continue };
                let ports = dir.l7_ports();
                if ports.is_empty() {
                    continue;
                }
                let mut tables = HashMap::new();
                for port in ports {
                    let key = (Arc::as_ptr(dir) as usize, port);
                    let table = shared.entry(key).or_insert_with(|| {
                        let kept = old.get(&port).and_then(|same| {
                            same.iter()
                                .find(|t| Arc::ptr_eq(&t.rules, dir) || *t.rules == **dir)
                        });
                        match kept {
                            Some(t) => Arc::clone(t),
                            None => Arc::new(PortTable::new(dir.clone(), port)),
                        }
                    });
                    tables.insert(port, table.clone());
                }
                for ip in &ep.ips {
                    by_endpoint.insert((*ip, side), tables.clone());
                }
            }
        }
        L7Rules { by_endpoint }
    }

    fn table(&self, local: IpAddr, side: Side, port: u16) -> Option<&Arc<PortTable>> {
        self.by_endpoint.get(&(local, side))?.get(&port)
    }

    /// L7 ports per local address and side.
    #[cfg(test)]
    fn ports(&self) -> std::collections::BTreeMap<(IpAddr, &'static str), Vec<u16>> {
        self.by_endpoint
            .iter()
            .map(|((ip, side), ports)| {
                let mut p: Vec<u16> = ports.keys().copied().collect();
                p.sort_unstable();
                let side = match side {
                    Side::Egress => "egress",
                    Side::Ingress => "ingress",
                };
                ((*ip, side), p)
            })
            .collect()
    }
}

/// Names learned for each address (the reverse of the FQDN cache).
#[derive(Default)]
pub struct PeerNames {
    by_ip: Mutex<HashMap<IpAddr, Vec<Fqdn>>>,
}

impl PeerNames {
    pub fn add(&self, name: &Fqdn, ip: IpAddr) {
        let mut map = self.by_ip.lock();
        let names = map.entry(ip).or_default();
        if !names.contains(name) {
            names.push(name.clone());
        }
    }

    pub fn remove(&self, name: &Fqdn, ip: IpAddr) {
        let mut map = self.by_ip.lock();
        if let Some(names) = map.get_mut(&ip) {
            names.retain(|n| n != name);
            if names.is_empty() {
                map.remove(&ip);
            }
        }
    }

    pub fn names(&self, ip: IpAddr) -> Vec<Fqdn> {
        self.by_ip.lock().get(&ip).cloned().unwrap_or_default()
    }
}

/// What the proxy thread and the policy engine share.
#[derive(Default)]
pub struct L7Shared {
    rules: ArcSwap<L7Rules>,
    /// What the kernel still enforces while newer rules are on their way to
    /// it (set by [`L7Shared::set_rules`], cleared by [`L7Shared::commit`]):
    /// a port the kernel still redirects under these rules but the new ones
    /// no longer list is judged by these, not let through.
    previous: arc_swap::ArcSwapOption<L7Rules>,
    /// False until the first [`L7Shared::set_rules`]: connections the
    /// kernel redirects meanwhile (a predecessor's sets) are denied.
    loaded: std::sync::atomic::AtomicBool,
    pub names: PeerNames,
    events: OnceLock<Arc<EventHub>>,
}

impl L7Shared {
    /// Publishes new rules to the proxy, before the kernel gets them (so no
    /// port is redirected without its rules); until [`L7Shared::commit`],
    /// the rules the kernel has still judge the ports only they list.
    pub fn set_rules(&self, rules: &NodeRules) {
        let built = L7Rules::build(rules, Some(&self.rules.load()));
        let old = self.rules.swap(Arc::new(built));
        // After a failed apply the kernel still has the oldest uncommitted.
        if self.loaded.load(Ordering::Acquire) && self.previous.load().is_none() {
            self.previous.store(Some(old));
        }
        self.loaded.store(true, Ordering::Release);
    }

    /// The kernel has the rules of the last [`L7Shared::set_rules`].
    pub fn commit(&self) {
        self.previous.store(None);
    }

    pub fn set_events(&self, hub: Arc<EventHub>) {
        let _ = self.events.set(hub);
    }

    #[cfg(test)]
    fn rules(&self) -> Arc<L7Rules> {
        self.rules.load_full()
    }

    fn lookup_side(&self, src: IpAddr, dst: SocketAddr, side: Side) -> PortPolicy {
        if !self.loaded.load(Ordering::Acquire) {
            return PortPolicy::Http(Arc::new(HttpRuleSet::deny_all(
                "meshward (rules not loaded yet)",
            )));
        }
        let rules = self.rules.load();
        let previous = self.previous.load();
        let (local, peer) = match side {
            Side::Egress => (src, dst.ip()),
            Side::Ingress => (dst.ip(), src),
        };
        let table = rules.table(local, side, dst.port()).or_else(|| {
            previous
                .as_ref()
                .and_then(|p| p.table(local, side, dst.port()))
        });
        let Some(table) = table else {
            return PortPolicy::AllowAll;
        };
        let names = if table.has_fqdn {
            self.names.names(peer)
        } else {
            Vec::new()
        };
        table.policy(peer, &names)
    }

    /// Which side's L7 rules judged a connection (for the event's
    /// direction): egress when the source has L7 rules on the port.
    fn side_of(&self, src: IpAddr, dst: SocketAddr) -> &'static str {
        if self
            .rules
            .load()
            .table(src, Side::Egress, dst.port())
            .is_some()
        {
            "egress"
        } else {
            "ingress"
        }
    }

    fn event(&self, e: L7Event<'_>) {
        match e.verdict {
            L7Verdict::Allowed => ALLOWED.fetch_add(1, Ordering::Relaxed),
            L7Verdict::Denied | L7Verdict::Malformed => DENIED.fetch_add(1, Ordering::Relaxed),
        };
        let Some(hub) = self.events.get() else {
            return;
        };
        hub.publish(flow_event(hub, &e, self.side_of(e.src.ip(), e.dst)));
    }
}

/// An L7 decision as a flow event.
fn flow_event(hub: &EventHub, e: &L7Event<'_>, direction: &str) -> FlowEvent {
    let verdict = match e.verdict {
        L7Verdict::Allowed => Verdict::Allowed,
        L7Verdict::Denied | L7Verdict::Malformed => Verdict::Denied,
    };
    let mut f = FlowEvent::new(FlowType::L7, verdict);
    f.time = super::events::unix_ms(e.time);
    f.direction = Some(direction.into());
    f.source = Some(hub.endpoint(e.src.ip(), None));
    f.destination = Some(hub.endpoint(e.dst.ip(), Some(e.dst.port())));
    f.protocol = Some(
        match e.protocol {
            L7Protocol::Http1 => "HTTP/1.1",
            L7Protocol::Http2 => "HTTP/2",
            L7Protocol::Grpc => "gRPC",
            L7Protocol::Tls => "TLS",
        }
        .into(),
    );
    let tls = e.protocol == L7Protocol::Tls;
    f.l7 = Some(L7Info {
        method: if tls {
            "TLS".into()
        } else {
            e.method.to_string()
        },
        path: if tls {
            e.host.as_deref().unwrap_or_default().to_owned()
        } else {
            e.path.to_string()
        },
        status: match (e.verdict, tls) {
            (_, true) => None,
            (L7Verdict::Denied, false) => Some(403),
            (L7Verdict::Malformed, false) => Some(400),
            (L7Verdict::Allowed, false) => None,
        },
    });
    f.policies = e
        .policy
        .as_deref()
        .map(|p| p.split(", ").map(str::to_string).collect())
        .unwrap_or_default();
    f.reason = match (&e.reason, e.verdict, tls) {
        (Some(r), _, _) => Some(r.clone()),
        (None, L7Verdict::Denied, false) => Some("no HTTP rule matched".into()),
        (None, L7Verdict::Denied, true) => Some("server name not allowed".into()),
        _ => None,
    };
    f
}

/// The `PolicySource` the proxy calls.
struct Source(Arc<L7Shared>);

impl PolicySource for Source {
    fn lookup(&self, src: IpAddr, dst: SocketAddr, direction: Direction) -> PortPolicy {
        let side = match direction {
            Direction::Egress => Side::Egress,
            Direction::Ingress => Side::Ingress,
        };
        self.0.lookup_side(src, dst, side)
    }
}

/// Starts the proxy on `l7ProxyThreads` threads (default one per core;
/// each its own current-thread runtime and SO_REUSEPORT listeners),
/// listening on 127.0.0.1:port (and [::1]:port when the node has IPv6
/// loopback); returns once they listen. A proxy thread that ends (a panic)
/// aborts the process.
pub fn start(shared: Arc<L7Shared>, settings: &PolicySettings) -> Result<()> {
    let config = ProxyConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], settings.l7_proxy_port)),
        max_header_bytes: settings.l7_max_header_bytes,
        header_read_timeout: settings.l7_header_timeout,
        idle_timeout: settings.l7_idle_timeout,
        upstream_idle_timeout: settings.l7_upstream_idle_timeout,
        transparent_upstream: true,
        ..ProxyConfig::default()
    };
    let v6 = ProxyConfig {
        listen: SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), settings.l7_proxy_port),
        ..config.clone()
    };
    let threads = match settings.l7_proxy_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let addr = config.listen;
    let source: Arc<dyn PolicySource> = Arc::new(Source(shared.clone()));
    let sink: EventSink = Arc::new(move |e| shared.event(e));
    let running =
        meshward_l7_proxy::spawn_threads(threads, vec![config, v6], source, sink, "mw-l7-proxy")
            .with_context(|| format!("the L7 proxy cannot start: binding {addr}"))?;
    for (addr, e) in &running.skipped {
        // As for the DNS proxy: only a kernel without IPv6 is a reason to
        // go on without [::1] (the L7 chains then reset IPv6 connections on
        // L7 ports); a taken port is an error to see, not a silent refusal.
        if !super::policy::ipv6_missing(e) {
            anyhow::bail!("the L7 proxy cannot listen on {addr}: {e}");
        }
        warn!("the L7 proxy does not listen on {addr} ({e}): IPv6 connections on L7 ports are reset (fail closed)");
    }
    for handle in running.handles {
        std::thread::Builder::new()
            .name("mw-l7-watch".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                // The threads serve forever: ending means a panic.
                let _ = handle.join();
                error!("an L7 proxy thread stopped");
                std::process::abort();
            })
            .context("starting the L7 proxy watcher")?;
    }
    info!(%addr, threads, "L7 proxy serving");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshward_policy::{compile, ClusterView, MeshNetworkPolicy, PodInfo, PolicyObject};

    fn view() -> ClusterView {
        let pod = |name: &str, ip: &str, node: &str, app: &str| PodInfo {
            namespace: "shop".into(),
            name: name.into(),
            uid: String::new(),
            node: node.into(),
            ips: vec![ip.parse().unwrap()],
            labels: [("app".to_string(), app.to_string())].into(),
            ports: Vec::new(),
            host_network: false,
        };
        let policy: MeshNetworkPolicy = serde_saphyr::from_str(
            "
apiVersion: meshward.io/v1alpha1
kind: MeshNetworkPolicy
metadata: {name: frontend, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  egress:
  - toCIDR: [198.18.100.0/24]
    toPorts:
    - ports: [{port: '80', protocol: TCP}]
      rules:
        http: [{method: GET, path: /healthz}]
  - toFQDNs: [{matchName: api.example.test}]
    toPorts:
    - ports: [{port: '443'}]
      rules: {tls: sni}
",
        )
        .unwrap();
        ClusterView {
            pods: vec![
                pod("frontend", "198.19.1.2", "n1", "frontend"),
                pod("other", "198.19.1.3", "n1", "other"),
            ],
            namespaces: Vec::new(),
            policies: vec![PolicyObject::Mesh(Arc::new(policy))],
        }
    }

    /// [::1]:port already taken: the start fails (before, IPv6 L7
    /// connections would be refused by the fail-closed L7 chains).
    #[test]
    fn a_taken_ipv6_port_fails_the_start() {
        let ns = meshward_testkit::Netns::new("l7s");
        let port = 15071;
        let _taken = ns
            .run(|| std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, port)))
            .expect("take [::1]:port");
        let settings = PolicySettings {
            l7_proxy_port: port,
            l7_proxy_threads: 1,
            ..PolicySettings::default()
        };
        let e = ns
            .run(|| start(Arc::new(L7Shared::default()), &settings))
            .expect_err("[::1] taken");
        assert!(format!("{e:#}").contains("[::1]:15071"), "{e:#}");
    }

    fn shared() -> L7Shared {
        let compiled = compile(&view(), "n1");
        assert!(compiled.errors.is_empty(), "{:?}", compiled.errors);
        let s = L7Shared::default();
        s.set_rules(&compiled.rules);
        s
    }

    #[test]
    fn rules_the_kernel_still_has_judge_until_the_new_ones_are_committed() {
        let s = shared();
        s.commit();
        let fe: IpAddr = "198.19.1.2".parse().unwrap();
        let ext: SocketAddr = "198.18.100.10:80".parse().unwrap();
        // The policy goes: the proxy learns first, the kernel may still
        // redirect port 80 (the apply is on its way, or failed).
        let mut empty = view();
        empty.policies.clear();
        s.set_rules(&compile(&empty, "n1").rules);
        assert!(
            matches!(s.lookup_side(fe, ext, Side::Egress), PortPolicy::Http(_)),
            "the old rules must judge, not let through"
        );
        // A second change before the kernel took the first: still the rules
        // the kernel has.
        s.set_rules(&compile(&empty, "n1").rules);
        assert!(matches!(
            s.lookup_side(fe, ext, Side::Egress),
            PortPolicy::Http(_)
        ));
        // Once the kernel has them, the port is no longer redirected: no
        // rules left for it.
        s.commit();
        assert!(matches!(
            s.lookup_side(fe, ext, Side::Egress),
            PortPolicy::AllowAll
        ));
    }

    #[test]
    fn unchanged_rules_keep_their_compiled_sets() {
        let s = shared();
        s.commit();
        let fe: IpAddr = "198.19.1.2".parse().unwrap();
        let ext: SocketAddr = "198.18.100.10:80".parse().unwrap();
        let PortPolicy::Http(before) = s.lookup_side(fe, ext, Side::Egress) else {
            panic!("frontend has HTTP rules on port 80");
        };
        // Another change (here: the same rules compiled again, new Arcs):
        // the table, its compiled rules and memo are kept, so the proxy
        // builds nothing for this port again.
        let compiled = compile(&view(), "n1");
        s.set_rules(&compiled.rules);
        s.commit();
        let PortPolicy::Http(after) = s.lookup_side(fe, ext, Side::Egress) else {
            panic!("frontend has HTTP rules on port 80");
        };
        assert!(Arc::ptr_eq(&before, &after));
        // Changed rules: a new table.
        let mut other = view();
        other.policies.clear();
        s.set_rules(&compile(&other, "n1").rules);
        s.commit();
        s.set_rules(&compiled.rules);
        s.commit();
        let PortPolicy::Http(rebuilt) = s.lookup_side(fe, ext, Side::Egress) else {
            panic!("frontend has HTTP rules on port 80");
        };
        assert!(!Arc::ptr_eq(&before, &rebuilt));
    }

    #[test]
    fn lookups_follow_the_compiled_rules() {
        let fresh = L7Shared::default();
        let any: SocketAddr = "198.18.100.10:80".parse().unwrap();
        match fresh.lookup_side("198.19.1.9".parse().unwrap(), any, Side::Egress) {
            PortPolicy::Http(set) => assert!(set.is_empty()),
            other => panic!("before the first rules: {other:?}"),
        }
        let s = shared();
        let fe: IpAddr = "198.19.1.2".parse().unwrap();
        let ext: SocketAddr = "198.18.100.10:80".parse().unwrap();
        assert!(matches!(
            s.lookup_side(fe, ext, Side::Egress),
            PortPolicy::Http(_)
        ));
        // Not an L7 port, not an endpoint with L7 rules, not the ingress side.
        let other_port: SocketAddr = "198.18.100.10:81".parse().unwrap();
        assert!(matches!(
            s.lookup_side(fe, other_port, Side::Egress),
            PortPolicy::AllowAll
        ));
        assert!(matches!(
            s.lookup_side("198.19.1.3".parse().unwrap(), ext, Side::Egress),
            PortPolicy::AllowAll
        ));
        assert!(matches!(
            s.lookup_side(fe, ext, Side::Ingress),
            PortPolicy::AllowAll
        ));
        // A learned peer on the TLS port: SNI only once its name is known;
        // before, fail closed (an HTTP set that denies everything).
        let api: SocketAddr = "198.18.100.20:443".parse().unwrap();
        match s.lookup_side(fe, api, Side::Egress) {
            PortPolicy::Http(set) => assert!(set.is_empty()),
            other => panic!("{other:?}"),
        }
        s.names
            .add(&Fqdn::parse("api.example.test").unwrap(), api.ip());
        match s.lookup_side(fe, api, Side::Egress) {
            PortPolicy::Sni(set) => assert!(matches!(
                set.check(Some("api.example.test")),
                meshward_l7_proxy::sni::SniVerdict::Allowed(_)
            )),
            other => panic!("{other:?}"),
        }
        s.names
            .remove(&Fqdn::parse("api.example.test").unwrap(), api.ip());
        assert!(s.names.names(api.ip()).is_empty());
        let ports = s.rules().ports();
        assert_eq!(ports.get(&(fe, "egress")), Some(&vec![80, 443]));
    }

    #[test]
    fn decisions_become_flow_events_and_counts() {
        let s = shared();
        let hub = EventHub::new("n1", 16);
        s.set_events(hub.clone());
        let (_, denied_before) = counts();
        s.event(L7Event {
            time: std::time::SystemTime::now(),
            verdict: L7Verdict::Denied,
            protocol: L7Protocol::Http1,
            src: "198.19.1.2:40000".parse().unwrap(),
            dst: "198.18.100.10:80".parse().unwrap(),
            method: "DELETE".into(),
            path: "/api".into(),
            host: Some("198.18.100.10".into()),
            policy: Some("MeshNetworkPolicy shop/frontend, MeshNetworkPolicy shop/x".into()),
            reason: None,
        });
        assert!(counts().1 > denied_before);
        let events = hub.recent(&Default::default(), 10);
        let e = events.last().expect("one event");
        assert_eq!(e.kind, FlowType::L7);
        assert_eq!(e.verdict, Verdict::Denied);
        assert_eq!(e.direction.as_deref(), Some("egress"));
        assert_eq!(
            e.l7,
            Some(L7Info {
                method: "DELETE".into(),
                path: "/api".into(),
                status: Some(403)
            })
        );
        assert_eq!(e.policies.len(), 2);
        assert_eq!(e.destination.as_ref().and_then(|d| d.port), Some(80));
    }
}
