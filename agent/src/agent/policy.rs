//! Policy enforcement on this node: the compiler's rules into nftables, and
//! the transparent DNS proxy whose answers open toFQDNs peers.
//!
//! - On every datastore snapshot the policies are compiled for this node
//!   ([`meshward_policy::Compiler`]); when the rules change, the kernel's
//!   policy sets are brought to exactly the rules plus every learned peer,
//!   in one transaction ([`PolicyTables::apply_policy`]).
//! - The DNS proxy runs on a thread of its own (its own tokio runtime), so
//!   a busy reconcile never delays an answer. It checks each query against
//!   the current rules and, before releasing an answer with addresses,
//!   learns them: the global cache (name → address, expiry) is updated and
//!   every local endpoint whose toFQDNs selectors match a name of the
//!   answer gets the addresses on that rule's ports, in one netlink batch.
//!   As in Cilium, what one pod learned counts for every pod whose policy
//!   names it.
//! - The L7 proxy (`l7.rs`) gets each new rule set before the kernel does,
//!   and the names learned per address (for toFQDNs peers of L7 rules).
//! - The cache is saved (crash-safe) to the state directory at most once a
//!   second and on shutdown, and restored at start before the proxy
//!   serves, so learned names stay allowed across restarts.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use meshward_dns_proxy::{
    AnswerCacheConfig, CacheConfig, CacheEntry, Decision, DenyRcode, DnsPolicy, DnsProxy,
    FqdnCache, LearnHook, Learned, Listeners, ProxyConfig, QueryInfo, Stats,
};
use meshward_egress::{FqdnElement, PolicyConfig, PolicyState, PolicyTables};
use meshward_policy::{Compiler, Fqdn, NodeRules, PolicyError};
use parking_lot::Mutex;
use tracing::{error, info, warn};

use super::events::{EventHub, FlowEvent, FlowType, Verdict};
use super::l7::L7Shared;
use super::metrics;
use super::protocol::{LearnedName, PolicyStatus};
use crate::config::PolicySettings;
use crate::datastore::Cluster;

/// Expired entries are swept (and a failed save retried) this often.
const SAVE_INTERVAL: Duration = Duration::from_secs(1);
/// Headroom on learned entries' expiry: answers within it confirm an
/// entry without a kernel update (see `CacheConfig::refresh_slack`).
const FQDN_REFRESH_SLACK: Duration = Duration::from_secs(1);

/// A learned answer is on disk this soon after it reached the kernel, so
/// a restart (even after kill -9) finds it.
const SAVE_DEBOUNCE: Duration = Duration::from_millis(10);

/// What the DNS proxy thread and the reconcile loop share.
struct Shared {
    rules: ArcSwap<NodeRules>,
    tables: Mutex<PolicyTables>,
    cache: Mutex<FqdnCache>,
    /// The cache changed since it was last saved.
    dirty: AtomicBool,
    /// Wakes the saver thread.
    save_now: std::sync::mpsc::SyncSender<()>,
    /// Flow events, once observability is wired (`PolicyEngine::observe`).
    events: OnceLock<Arc<EventHub>>,
    /// What the L7 proxy reads.
    l7: Arc<L7Shared>,
}

/// Policy enforcement of one node.
pub struct PolicyEngine {
    node: String,
    state_dir: PathBuf,
    compiler: Compiler,
    errors: Vec<PolicyError>,
    shared: Arc<Shared>,
    proxy: Option<DnsProxy<RulesPolicy, Learner>>,
}

impl PolicyEngine {
    /// Installs the policy structure (sets, chains, the DNS redirect and its
    /// routing) and restores the learned-name cache. The kernel's sets keep
    /// what a predecessor left until the first [`PolicyEngine::update`].
    pub fn start(node: &str, state_dir: PathBuf, settings: &PolicySettings) -> Result<Self> {
        let tables = PolicyTables::new(PolicyConfig {
            nflog_group: settings.nflog_group,
            dns_proxy_port: Some(settings.dns_proxy_port),
            l7_proxy_port: Some(settings.l7_proxy_port),
            ..PolicyConfig::default()
        })
        .context("installing the policy tables")?;
        let cache_config = CacheConfig {
            ttl_floor: settings.fqdn_min_ttl,
            per_name_cap: settings.fqdn_max_ips_per_name,
            global_cap: settings.fqdn_max_entries,
            // a name answered again and again (every pod's resolver
            // asking) is re-programmed at most once a second, not per answer
            refresh_slack: FQDN_REFRESH_SLACK,
        };
        let (cache, report) = FqdnCache::load(&state_dir, cache_config, SystemTime::now())
            .context("loading the learned-name cache")?;
        if let Some((aside, why)) = &report.corrupt {
            error!(moved_to = %aside.display(), "the learned-name cache was corrupt ({why}); starting empty");
        }
        info!(
            restored = report.restored,
            expired = report.expired,
            evicted = report.evicted,
            "learned-name cache loaded"
        );
        let l7 = Arc::new(L7Shared::default());
        for entry in cache.entries() {
            l7.names.add(&entry.name, entry.ip);
        }
        let (save_now, wake) = std::sync::mpsc::sync_channel(1);
        let shared = Arc::new(Shared {
            rules: ArcSwap::from_pointee(NodeRules::default()),
            tables: Mutex::new(tables),
            cache: Mutex::new(cache),
            dirty: AtomicBool::new(false),
            save_now,
            events: OnceLock::new(),
            l7,
        });
        let saver = shared.clone();
        let dir = state_dir.clone();
        std::thread::Builder::new()
            .name("mw-fqdn-save".into())
            .spawn(move || {
                // Ends when the engine (the only other sender holder) is gone.
                while wake.recv().is_ok() {
                    // let a burst of answers share one write
                    std::thread::sleep(SAVE_DEBOUNCE);
                    save(&saver, &dir);
                }
            })
            .context("starting the cache saver thread")?;
        Ok(PolicyEngine {
            node: node.to_string(),
            state_dir,
            compiler: Compiler::new(),
            errors: Vec::new(),
            shared,
            proxy: None,
        })
    }

    /// Compiles the policies of `cluster` for this node and, when the rules
    /// changed (or `force`), brings the kernel in line. Returns whether the
    /// kernel now holds the rules.
    pub fn update(&mut self, cluster: &Cluster, force: bool) -> bool {
        let compiled = self.compiler.compile(&cluster.policy_view(), &self.node);
        if compiled.errors != self.errors {
            for e in compiled.errors.iter().filter(|e| !self.errors.contains(e)) {
                warn!("policy skipped: {e}");
            }
            self.errors = compiled.errors;
        }
        let current = self.shared.rules.load_full();
        if !force && *current == compiled.rules {
            return true;
        }
        let rules = Arc::new(compiled.rules);
        let fqdn = {
            let cache = self.shared.cache.lock();
            fqdn_elements(&rules, cache.entries(), SystemTime::now())
        };
        let state = PolicyState {
            rules: (*rules).clone(),
            fqdn,
        };
        // The DNS proxy sees the new rules once the kernel has them; the L7
        // proxy before, so no port is redirected to it without its rules.
        self.shared.l7.set_rules(&rules);
        let start = Instant::now();
        let result = self.shared.tables.lock().apply_policy(&state);
        metrics::observe_policy_apply(start.elapsed());
        match result {
            Ok(()) => {
                self.shared.l7.commit();
                self.shared.rules.store(rules.clone());
                info!(
                    endpoints = rules.endpoints.len(),
                    learned = state.fqdn.len(),
                    "policy applied"
                );
                true
            }
            Err(e) => {
                error!("applying policy to the kernel failed: {e}; keeping what it holds, retrying on the next pass");
                false
            }
        }
    }

    /// Starts the DNS proxy on its own thread, listening on 127.0.0.1:port
    /// and [::1]:port (where nftables TPROXYs the redirected pods' IPv4 and
    /// IPv6 DNS); IPv4 only when the kernel has no IPv6 (`ipv6.disable=1`;
    /// the DNS chain then drops redirected IPv6 DNS, resetting TCP).
    pub async fn start_dns_proxy(&mut self, settings: &PolicySettings) -> Result<()> {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), settings.dns_proxy_port);
        let addr6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), settings.dns_proxy_port);
        // Not kept by the socket keeper: across a restart the DNS chain
        // drops redirected IPv6 DNS (UDP: the client retries; TCP: reset),
        // never forwards it.
        let listeners6 = bind_loopback6(addr6)?;
        // from the socket keeper when it held them while no agent ran; its
        // answers can take seconds: not on the agent's runtime
        let (mode, state_dir) = (settings.dns_socket_keeper, self.state_dir.clone());
        let super::keeper::Taken {
            listeners,
            replaced,
        } = super::blocking("fetching the DNS sockets", move || {
            super::keeper::listeners(addr, mode, &state_dir)
        })
        .await??;
        let config = ProxyConfig {
            deny_rcode: if settings.dns_deny_nxdomain {
                DenyRcode::NxDomain
            } else {
                DenyRcode::Refused
            },
            hold_timeout: settings.dns_hold_timeout,
            answer_cache: AnswerCacheConfig::with_entries(settings.dns_answer_cache_entries),
            ..ProxyConfig::default()
        };
        let has_v6 = listeners6.is_some();
        let policy = RulesPolicy(self.shared.clone());
        let proxy = DnsProxy::new(config, policy, Learner(self.shared.clone()));
        self.proxy = Some(proxy.clone());
        std::thread::Builder::new()
            .name("mw-dns-proxy".into())
            .spawn(move || {
                // One thread: two workers were measured slower (more CPU per
                // query, cross-thread wake-ups) on two cores shared with the
                // resolver and the pods (bench/README.md, dns-proxy).
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        error!("the DNS proxy cannot start a runtime: {e}");
                        std::process::abort();
                    }
                };
                let served = runtime.block_on(async {
                    if let Some(old) = replaced {
                        let (datagrams, connections) = proxy.drain(old);
                        info!(
                            datagrams,
                            connections, "answered the DNS queries queued on the old port"
                        );
                    }
                    serve_listeners(&proxy, listeners, listeners6).await
                });
                if let Err(e) = served {
                    // Fail closed and loudly: the supervisor restarts us.
                    error!("the DNS proxy stopped: {e:#}");
                    std::process::abort();
                }
            })
            .context("starting the DNS proxy thread")?;
        info!(%addr, ipv6 = has_v6, "DNS proxy serving");
        Ok(())
    }

    /// The L7 proxy's shared state (rules, learned names, events).
    pub fn l7(&self) -> Arc<L7Shared> {
        self.shared.l7.clone()
    }

    /// Saves the cache if it changed and forgets expired entries (the
    /// kernel's elements expire by themselves).
    pub fn tick(&self) {
        // the name index changes under the cache's lock, as in `learn`, so
        // the two never disagree (a TTL-0 answer expiring as it is learned)
        let mut cache = self.shared.cache.lock();
        let expired = cache.expire(SystemTime::now());
        for (name, ip) in &expired {
            self.shared.l7.names.remove(name, *ip);
        }
        drop(cache);
        if !expired.is_empty() {
            self.shared.dirty.store(true, Ordering::Relaxed);
        }
        save(&self.shared, &self.state_dir);
    }

    pub fn save_interval() -> Duration {
        SAVE_INTERVAL
    }

    /// For `meshward status`.
    pub fn status(&self) -> PolicyStatus {
        let rules = self.shared.rules.load();
        // each takes the cache lock: not inside one expression
        let learned_entries = self.shared.cache.lock().len();
        let learned = learned_names(&self.shared, LEARNED_SHOWN);
        let in_force: std::collections::BTreeSet<String> = rules
            .endpoints
            .values()
            .flat_map(|e| e.egress.iter().chain(&e.ingress))
            .flat_map(|d| d.policies.iter().map(ToString::to_string))
            .collect();
        PolicyStatus {
            // the engine sees compiled rules only; the agent fills this in
            policies_loaded: 0,
            in_force: in_force.into_iter().collect(),
            endpoints: rules.endpoints.len(),
            isolated_egress: rules
                .endpoints
                .values()
                .filter(|e| e.egress.is_some())
                .count(),
            isolated_ingress: rules
                .endpoints
                .values()
                .filter(|e| e.ingress.is_some())
                .count(),
            dns_redirected: rules.endpoints.values().filter(|e| e.dns.is_some()).count(),
            l7_ports: super::l7::status_ports(&rules),
            l7_requests: super::l7::counts(),
            errors: self.errors.iter().map(|e| e.to_string()).collect(),
            learned_entries,
            learned,
            dns: self
                .proxy
                .as_ref()
                .map(|p| dns_counters(&p.stats()))
                .unwrap_or_default(),
        }
    }
}

/// The DNS proxy's view of the rules: the snapshot the kernel holds.
struct RulesPolicy(Arc<Shared>);

impl DnsPolicy for RulesPolicy {
    fn check(&self, query: &QueryInfo<'_>) -> Decision {
        let rules = self.0.rules.load();
        let decision = rules.check(query);
        if decision == Decision::Deny {
            if let Some(hub) = self.0.events.get() {
                hub.publish(dns_denied_event(hub, &rules, query));
            }
        }
        decision
    }
}

/// Writes the cache if it changed since the last write.
fn save(shared: &Shared, dir: &std::path::Path) {
    if !shared.dirty.swap(false, Ordering::Relaxed) {
        return;
    }
    if let Err(e) = shared.cache.lock().save(dir, SystemTime::now()) {
        shared.dirty.store(true, Ordering::Relaxed);
        warn!("saving the learned-name cache: {e}");
    }
}

/// The learn hook.
struct Learner(Arc<Shared>);

impl LearnHook for Learner {
    type Error = String;

    fn learn(&self, learned: Learned) -> impl Future<Output = Result<(), String>> + Send {
        std::future::ready(learn(&self.0, learned))
    }
}

/// Cache, then kernel, before the answer is released.
fn learn(shared: &Shared, learned: Learned) -> Result<(), String> {
    let now = SystemTime::now();
    let update = {
        // the name index follows the cache under its lock (see `tick`)
        let mut cache = shared.cache.lock();
        let update = cache.insert(&learned, now);
        for (name, ip) in &update.evicted {
            shared.l7.names.remove(name, *ip);
        }
        for e in &update.upserted {
            shared.l7.names.add(&e.name, e.ip);
        }
        update
    };
    if update.upserted.is_empty() {
        return Ok(());
    }
    shared.dirty.store(true, Ordering::Relaxed);
    // a full channel means a save is already due
    let _ = shared.save_now.try_send(());
    let rules = shared.rules.load();
    let elements = fqdn_elements(&rules, update.upserted.into_iter(), now);
    if elements.is_empty() {
        return Ok(());
    }
    let start = Instant::now();
    let result = shared
        .tables
        .lock()
        .add_fqdn(&elements)
        .map_err(|e| format!("programming {} learned peers: {e}", elements.len()));
    metrics::observe_programming(start.elapsed());
    result
}

/// The kernel elements for learned entries: for every local endpoint whose
/// toFQDNs selectors match an entry's name, its address on that rule's
/// ports, from each of the endpoint's addresses of the same family.
fn fqdn_elements(
    rules: &NodeRules,
    entries: impl Iterator<Item = CacheEntry>,
    now: SystemTime,
) -> Vec<FqdnElement> {
    let with_fqdn: Vec<_> = rules
        .endpoints
        .values()
        .filter(|e| e.egress.as_ref().is_some_and(|d| !d.fqdn.is_empty()))
        .collect();
    if with_fqdn.is_empty() {
        return Vec::new();
    }
    // Selectors are matched once per (endpoint, name), not per address.
    let mut by_name: BTreeMap<Fqdn, Vec<(IpAddr, Duration)>> = BTreeMap::new();
    for entry in entries {
        let Ok(left) = entry.expires.duration_since(now) else {
            continue;
        };
        if left.is_zero() {
            continue;
        }
        by_name
            .entry(entry.name)
            .or_default()
            .push((entry.ip, left));
    }
    let mut out = Vec::new();
    for (name, addresses) in &by_name {
        for endpoint in &with_fqdn {
            let ports = endpoint.fqdn_ports(name);
            if ports.is_empty() {
                continue;
            }
            for &(dst, timeout) in addresses {
                for src in endpoint.ips.iter().filter(|s| s.is_ipv4() == dst.is_ipv4()) {
                    for (port, _) in &ports {
                        out.push(FqdnElement {
                            src: *src,
                            dst,
                            ports: *port,
                            timeout,
                        });
                    }
                }
            }
        }
    }
    out
}

/// The proxy's counters by name, for `meshward status`.
fn dns_counters(stats: &Stats) -> BTreeMap<String, u64> {
    let s = stats.snapshot();
    [
        ("queriesAllowed", s.queries_allowed),
        ("queriesDenied", s.queries_denied),
        (
            "queriesMalformed",
            s.queries_formerr + s.queries_notimp + s.queries_dropped,
        ),
        ("queriesOverload", s.queries_overload),
        ("responsesRelayed", s.responses_relayed),
        ("responsesMismatched", s.responses_mismatched),
        ("upstreamTimeouts", s.upstream_timeouts),
        ("upstreamErrors", s.upstream_errors),
        ("holds", s.holds),
        ("holdTimeouts", s.hold_timeouts),
        ("learnErrors", s.learn_errors),
        ("holdMaxMicros", s.hold_us_max),
        ("answerCacheHits", s.answer_cache_hits),
        ("answerCacheMisses", s.answer_cache_misses),
        ("answerCacheInserts", s.answer_cache_inserts),
        ("answerCacheEvictions", s.answer_cache_evictions),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

// --- observability -----------------------------------------------------------

/// Learned names listed in `meshward status` at most.
const LEARNED_SHOWN: usize = 200;

impl PolicyEngine {
    /// Wires flow events: denied queries (from the DNS policy), relayed
    /// answers (from the proxy). Call after `start_dns_proxy`.
    pub fn observe(&self, hub: Arc<EventHub>) {
        let _ = self.shared.events.set(hub.clone());
        self.shared.l7.set_events(hub.clone());
        if let Some(proxy) = &self.proxy {
            proxy.set_observer(Arc::new(DnsEvents {
                shared: self.shared.clone(),
                hub,
            }));
        }
    }

    /// What metrics and the nflog listener read.
    pub fn handle(&self) -> PolicyHandle {
        PolicyHandle {
            shared: self.shared.clone(),
            proxy: self.proxy.clone(),
        }
    }
}

/// The DNS proxy's listeners on `addr` ([::1]:port), or `None` when the
/// node has no IPv6 (see [`ipv6_missing`]), which is warned about. Any
/// other error (the port taken, say) fails the start, as it does for IPv4.
fn bind_loopback6(addr: SocketAddr) -> Result<Option<Listeners>> {
    match Listeners::bind(addr) {
        Ok(l) => Ok(Some(l)),
        Err(e) if ipv6_missing(&e) => {
            warn!("the DNS proxy does not listen on {addr} ({e}): no IPv6 on this node; redirected IPv6 DNS is dropped (TCP reset)");
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("binding the DNS proxy to {addr} (udp and tcp)")),
    }
}

/// A bind error saying the node has no IPv6: the family is not there
/// (`ipv6.disable=1`) or the address not available. (A transparent socket
/// binds [::1] even where IPv6 is disabled by sysctl: it listens, and no
/// IPv6 packet comes.)
pub(super) fn ipv6_missing(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

/// Serves the IPv4 listeners and the IPv6 ones, when there are any, on the
/// calling runtime (the DNS proxy's one thread); returns when either stops
/// serving (an error naming its address: the caller treats it as fatal).
async fn serve_listeners<P: DnsPolicy, H: LearnHook>(
    proxy: &DnsProxy<P, H>,
    v4: Listeners,
    v6: Option<Listeners>,
) -> Result<()> {
    let name = |l: &Listeners| {
        l.udp()
            .local_addr()
            .map_or_else(|e| format!("(unknown address: {e})"), |a| a.to_string())
    };
    let addr4 = name(&v4);
    let Some(v6) = v6 else {
        return proxy
            .serve(v4)
            .await
            .with_context(|| format!("serving on {addr4}"));
    };
    let addr6 = name(&v6);
    tokio::select! {
        r = proxy.serve(v4) => r.with_context(|| format!("serving on {addr4}")),
        r = proxy.serve(v6) => r.with_context(|| format!("serving on {addr6}")),
    }
}

/// A cheap, shareable view of the engine for other threads.
#[derive(Clone)]
pub struct PolicyHandle {
    shared: Arc<Shared>,
    proxy: Option<DnsProxy<RulesPolicy, Learner>>,
}

impl PolicyHandle {
    /// The rules the kernel holds.
    pub fn rules(&self) -> Arc<NodeRules> {
        self.shared.rules.load_full()
    }

    pub fn dns_stats(&self) -> Option<meshward_dns_proxy::StatsSnapshot> {
        self.proxy.as_ref().map(|p| p.stats().snapshot())
    }

    /// Per-endpoint drop counters from the kernel.
    pub fn drop_counters(&self) -> Result<Vec<meshward_egress::DropCount>> {
        Ok(self.shared.tables.lock().drop_counters()?)
    }

    /// Elements per policy set.
    pub fn element_counts(&self) -> BTreeMap<String, usize> {
        self.shared.tables.lock().element_counts()
    }

    pub fn learned_entries(&self) -> usize {
        self.shared.cache.lock().len()
    }
}

/// The learned names (soonest expiry last), each with its addresses and
/// the seconds until the last of them expires.
fn learned_names(shared: &Shared, limit: usize) -> Vec<LearnedName> {
    let now = SystemTime::now();
    let mut by_name: BTreeMap<String, (Vec<String>, u64)> = BTreeMap::new();
    for entry in shared.cache.lock().entries() {
        let left = entry
            .expires
            .duration_since(now)
            .unwrap_or_default()
            .as_secs();
        let slot = by_name.entry(entry.name.to_string()).or_default();
        slot.0.push(entry.ip.to_string());
        slot.1 = slot.1.max(left);
    }
    let mut out: Vec<LearnedName> = by_name
        .into_iter()
        .map(|(name, (mut ips, ttl))| {
            ips.sort();
            LearnedName {
                name,
                ips,
                ttl_secs: ttl,
            }
        })
        .collect();
    out.sort_by(|a, b| b.ttl_secs.cmp(&a.ttl_secs).then(a.name.cmp(&b.name)));
    out.truncate(limit);
    out
}

fn qtype_name(qtype: u16) -> String {
    match qtype {
        1 => "A".into(),
        5 => "CNAME".into(),
        28 => "AAAA".into(),
        33 => "SRV".into(),
        16 => "TXT".into(),
        12 => "PTR".into(),
        n => format!("TYPE{n}"),
    }
}

fn rcode_name(rcode: u8) -> String {
    match rcode {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("RCODE{n}"),
    }
}

fn dns_denied_event(hub: &EventHub, rules: &NodeRules, q: &QueryInfo<'_>) -> FlowEvent {
    let mut e = FlowEvent::new(FlowType::Dns, Verdict::Denied);
    e.direction = Some("egress".into());
    e.source = Some(hub.endpoint(q.client, None));
    e.destination = Some(hub.endpoint(q.server.ip(), Some(q.server.port())));
    e.protocol = Some(super::events::protocol_name(q.transport.protocol()));
    e.dns = Some(super::events::DnsInfo {
        query: q.name.to_string(),
        qtype: qtype_name(q.qtype),
        rcode: Some("REFUSED".into()),
        ..Default::default()
    });
    match rules.endpoint_by_ip(q.client) {
        None => e.reason = Some("not a local endpoint".into()),
        Some(ep) => {
            e.policies = ep
                .egress
                .iter()
                .flat_map(|d| d.policies.iter().map(ToString::to_string))
                .collect();
            e.reason = Some("no DNS rule allows this name".into());
        }
    }
    e
}

/// Relayed answers as `allowed` DNS events.
struct DnsEvents {
    shared: Arc<Shared>,
    hub: Arc<EventHub>,
}

impl meshward_dns_proxy::DnsObserver for DnsEvents {
    fn relayed(&self, a: &meshward_dns_proxy::Relayed<'_>) {
        let q = a.query;
        let mut e = FlowEvent::new(FlowType::Dns, Verdict::Allowed);
        e.direction = Some("egress".into());
        e.source = Some(self.hub.endpoint(q.client, None));
        e.destination = Some(self.hub.endpoint(q.server.ip(), Some(q.server.port())));
        e.protocol = Some(super::events::protocol_name(q.transport.protocol()));
        let rules = self.shared.rules.load();
        if let Some(dns) = rules
            .endpoint_by_ip(q.client)
            .and_then(|ep| ep.dns.as_ref())
        {
            if let meshward_policy::DnsVerdict::Allowed(p) = dns.query_allowed(
                q.server.ip(),
                q.transport.protocol(),
                q.server.port(),
                a.name,
            ) {
                e.policies = vec![p.to_string()];
            }
        }
        e.dns = Some(super::events::DnsInfo {
            query: a.name.to_string(),
            qtype: qtype_name(a.qtype),
            rcode: Some(rcode_name(a.rcode)),
            answers: a
                .learned
                .map(|l| l.ips.iter().map(|(ip, _)| ip.to_string()).collect())
                .unwrap_or_default(),
            ttl: a.learned.and_then(|l| l.ips.iter().map(|(_, t)| *t).min()),
            hold_micros: a
                .hold
                .map(|h| u64::try_from(h.as_micros()).unwrap_or(u64::MAX)),
        });
        self.hub.publish(e);
    }
}

#[cfg(test)]
mod tests {
    //! The DNS proxy's IPv6 listeners as the agent starts them, in network
    //! namespaces (root): a pod with an IPv4 and an IPv6 ULA address
    //! (fd00:198:18::/48, only inside the test's namespaces), the node with
    //! meshward's nftables layout, dnsmasq behind it.
    //!
    //! ```text
    //! pod 198.19.1.2 fd00:198:18:1::2 ── pod0 [node: inet meshward, proxy] ext0 ── ext 198.18.100.53 fd00:198:18:100::53
    //! ```
    use super::*;
    use meshward_policy::{
        DnsAllow, DnsRules, EndpointRules, FqdnSelector, L4Protocol, PodRef, PolicyKind, PolicyRef,
        PortMatch,
    };
    use meshward_testkit::{veth, Netns};
    use std::process::{Child, Stdio};

    const PORT: u16 = 15353;
    const POD4: &str = "198.19.1.2";
    const POD6: &str = "fd00:198:18:1::2";
    const DNS4: &str = "198.18.100.53";
    const DNS6: &str = "fd00:198:18:100::53";

    #[test]
    fn only_a_missing_ipv6_is_a_warning() {
        let err = std::io::Error::from_raw_os_error;
        assert!(ipv6_missing(&err(libc::EAFNOSUPPORT)));
        assert!(ipv6_missing(&err(libc::EADDRNOTAVAIL)));
        assert!(!ipv6_missing(&err(libc::EADDRINUSE)));
        assert!(!ipv6_missing(&err(libc::EPERM)));
        assert!(!ipv6_missing(&std::io::Error::other("no errno")));
    }

    #[test]
    fn ipv6_loopback_binds_and_a_taken_port_is_an_error() {
        let ns = Netns::new("d");
        let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), PORT);
        let bound = ns.run(|| bind_loopback6(addr)).expect("bind [::1]");
        let bound = bound.expect("the namespace has IPv6 loopback");
        assert_eq!(bound.udp().local_addr().unwrap(), addr);
        assert_eq!(bound.tcp().local_addr().unwrap(), addr);
        // Taken (our own listeners still hold it): an error, not IPv4 only.
        let taken = ns.run(|| bind_loopback6(addr)).map(|l| l.is_some());
        let e = format!("{:#}", taken.expect_err("port taken"));
        assert!(e.contains("[::1]:15353"), "{e}");
        drop(bound);
        // IPv6 disabled by sysctl: the transparent sockets still bind.
        ns.must(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        ns.must(&["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"]);
        let lo = ns.ip(&["-6", "addr", "show", "dev", "lo"]);
        assert!(!lo.contains("::1"), "{lo}");
        let bound = ns.run(|| bind_loopback6(addr)).expect("bind [::1]");
        assert!(bound.is_some());
    }

    fn pod_ref() -> PodRef {
        PodRef {
            namespace: "default".into(),
            name: "client".into(),
        }
    }

    /// The pod may ask the lab's server (both addresses) for
    /// `allowed.example.test` only.
    fn rules() -> NodeRules {
        let policy = PolicyRef {
            kind: PolicyKind::MeshNetworkPolicy,
            namespace: "default".into(),
            name: "dns".into(),
        };
        let dns = DnsRules {
            allow: vec![DnsAllow {
                servers: vec![
                    format!("{DNS4}/32").parse().unwrap(),
                    format!("{DNS6}/128").parse().unwrap(),
                ],
                ports: vec![
                    PortMatch::single(L4Protocol::Udp, 53),
                    PortMatch::single(L4Protocol::Tcp, 53),
                ],
                names: Some(vec![
                    FqdnSelector::match_name("allowed.example.test").unwrap()
                ]),
                policy,
            }],
        };
        let mut endpoints = BTreeMap::new();
        endpoints.insert(
            pod_ref(),
            EndpointRules {
                pod: pod_ref(),
                ips: vec![POD4.parse().unwrap(), POD6.parse().unwrap()],
                egress: None,
                ingress: None,
                dns: Some(Arc::new(dns)),
            },
        );
        NodeRules { endpoints }
    }

    struct Lab {
        dnsmasq: Option<Child>,
        proxy: Option<(
            tokio::sync::oneshot::Sender<()>,
            std::thread::JoinHandle<()>,
        )>,
        learned: Arc<Mutex<Vec<Learned>>>,
        _tables: PolicyTables,
        pod: Netns,
        node: Netns,
        ext: Netns,
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            if let Some((stop, thread)) = self.proxy.take() {
                let _ = stop.send(());
                let _ = thread.join();
            }
            if let Some(mut c) = self.dnsmasq.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    impl Lab {
        fn new() -> Lab {
            let pod = Netns::new("p");
            let node = Netns::new("n");
            let ext = Netns::new("e");
            veth(
                &pod,
                "eth0",
                &format!("{POD4}/24"),
                &node,
                "pod0",
                "198.19.1.1/24",
            );
            veth(
                &node,
                "ext0",
                "198.18.100.1/24",
                &ext,
                "eth0",
                &format!("{DNS4}/24"),
            );
            pod.ip(&["route", "add", "default", "via", "198.19.1.1"]);
            ext.ip(&["route", "add", "default", "via", "198.18.100.1"]);
            node.must(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            node.must(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
            let add6 = |ns: &Netns, addr: &str, dev: &str| {
                ns.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"]);
            };
            add6(&pod, &format!("{POD6}/64"), "eth0");
            add6(&node, "fd00:198:18:1::1/64", "pod0");
            add6(&node, "fd00:198:18:100::1/64", "ext0");
            add6(&ext, &format!("{DNS6}/64"), "eth0");
            pod.ip(&["-6", "route", "add", "default", "via", "fd00:198:18:1::1"]);
            ext.ip(&["-6", "route", "add", "default", "via", "fd00:198:18:100::1"]);
            // Permanent neighbours (discovery right after link-up is slow).
            pod.neigh6_permanent("fd00:198:18:1::1", &node.mac("pod0"), "eth0");
            node.neigh6_permanent(POD6, &pod.mac("eth0"), "pod0");
            node.neigh6_permanent(DNS6, &ext.mac("eth0"), "ext0");
            ext.neigh6_permanent("fd00:198:18:100::1", &node.mac("ext0"), "eth0");

            let mut tables = node
                .run(|| {
                    PolicyTables::new(PolicyConfig {
                        dns_proxy_port: Some(PORT),
                        ..PolicyConfig::default()
                    })
                })
                .expect("meshward's tables");
            tables
                .apply_policy(&PolicyState {
                    rules: rules(),
                    fqdn: Vec::new(),
                })
                .expect("apply");

            let dnsmasq = ext
                .command("dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--pid-file=",
                    "--no-resolv",
                    "--no-hosts",
                    "--port=53",
                    "--bind-interfaces",
                    "--local-ttl=300",
                    &format!("--listen-address={DNS4}"),
                    &format!("--listen-address={DNS6}"),
                    "--address=/allowed.example.test/fd00:198:18:200::10",
                    "--address=/allowed.example.test/198.18.100.10",
                    "--address=/denied.example.test/fd00:198:18:200::12",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("dnsmasq (apt-get install dnsmasq-base)");
            let mut lab = Lab {
                dnsmasq: Some(dnsmasq),
                proxy: None,
                learned: Arc::new(Mutex::new(Vec::new())),
                _tables: tables,
                pod,
                node,
                ext,
            };
            lab.wait_for_dnsmasq();
            lab.start_proxy();
            lab
        }

        fn wait_for_dnsmasq(&self) {
            for _ in 0..50 {
                let (ok, out) = self.ext.exec(&[
                    "dig",
                    &format!("@{DNS6}"),
                    "allowed.example.test",
                    "AAAA",
                    "+short",
                    "+time=1",
                    "+tries=1",
                ]);
                if ok && out.contains("fd00:198:18:200::10") {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            panic!("dnsmasq did not come up");
        }

        /// What the agent runs: IPv4 and IPv6 listeners served together on
        /// one current-thread runtime, on a thread inside the node.
        fn start_proxy(&mut self) {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let (ready_tx, ready) = std::sync::mpsc::channel::<Result<bool, String>>();
            let learned = self.learned.clone();
            let node = self.node.path();
            let thread = std::thread::spawn(move || {
                let file = std::fs::File::open(node).unwrap();
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let v4 = Listeners::bind(SocketAddr::from(([127, 0, 0, 1], PORT)));
                let v6 = bind_loopback6(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), PORT));
                let (v4, v6) = match (v4, v6) {
                    (Ok(v4), Ok(v6)) => (v4, v6),
                    (v4, v6) => {
                        let _ = ready_tx.send(Err(format!("{:?} {:?}", v4.err(), v6.err())));
                        return;
                    }
                };
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let hook = move |l: Learned| {
                    learned.lock().push(l);
                    std::future::ready(Ok::<(), String>(()))
                };
                let proxy = DnsProxy::new(ProxyConfig::default(), rules(), hook);
                let _ = ready_tx.send(Ok(v6.is_some()));
                runtime.block_on(async {
                    tokio::select! {
                        r = serve_listeners(&proxy, v4, v6) => panic!("the proxy stopped: {r:?}"),
                        _ = stopped => {}
                    }
                });
            });
            let has_v6 = ready
                .recv_timeout(Duration::from_secs(10))
                .expect("proxy thread")
                .expect("binding the proxy");
            assert!(has_v6, "the node namespace has IPv6 loopback");
            self.proxy = Some((stop, thread));
        }

        fn dig(&self, server: &str, args: &[&str]) -> String {
            let mut cmd = vec!["dig", server, "+time=4", "+tries=2"];
            cmd.extend_from_slice(args);
            self.pod.exec(&cmd).1
        }
    }

    fn status(dig: &str) -> &str {
        dig.split("status: ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or("(no status)")
    }

    /// A redirected pod's IPv6 DNS goes through the proxy on [::1]: the
    /// allowed name is answered and learned for the pod's IPv6 address, the
    /// other name refused, over UDP and TCP; IPv4 beside it.
    #[test]
    fn redirected_ipv6_dns_is_judged_by_the_proxy() {
        let lab = Lab::new();
        let server6 = format!("@{DNS6}");
        for transport in ["+notcp", "+tcp"] {
            let out = lab.dig(&server6, &["allowed.example.test", "AAAA", transport]);
            assert_eq!(status(&out), "NOERROR", "{transport}: {out}");
            assert!(out.contains("fd00:198:18:200::10"), "{transport}: {out}");
            let out = lab.dig(&server6, &["denied.example.test", "AAAA", transport]);
            assert_eq!(status(&out), "REFUSED", "{transport}: {out}");
            assert!(!out.contains("fd00:198:18:200::12"), "{transport}: {out}");
        }
        let out = lab.dig(
            &format!("@{DNS4}"),
            &["allowed.example.test", "A", "+short"],
        );
        assert_eq!(out.trim(), "198.18.100.10", "{out}");
        let out = lab.dig(&format!("@{DNS4}"), &["denied.example.test", "A"]);
        assert_eq!(status(&out), "REFUSED", "{out}");
        let learned = lab.learned.lock().clone();
        let from6: Vec<&Learned> = learned
            .iter()
            .filter(|l| l.client == POD6.parse::<IpAddr>().unwrap())
            .collect();
        assert_eq!(from6.len(), 2, "{learned:?}");
        for l in from6 {
            assert_eq!(l.qname.as_str(), "allowed.example.test.");
            assert_eq!(l.ips, vec![("fd00:198:18:200::10".parse().unwrap(), 300)]);
        }
        assert!(
            learned
                .iter()
                .all(|l| l.qname.as_str() != "denied.example.test."),
            "{learned:?}"
        );
    }
}
