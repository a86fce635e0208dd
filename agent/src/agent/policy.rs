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
//! - The cache is saved (crash-safe) to the state directory at most once a
//!   second and on shutdown, and restored at start before the proxy
//!   serves, so learned names stay allowed across restarts.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use meshward_dns_proxy::{
    CacheConfig, CacheEntry, Decision, DenyRcode, DnsPolicy, DnsProxy, FqdnCache, LearnHook,
    Learned, Listeners, ProxyConfig, QueryInfo, Stats,
};
use meshward_egress::{FqdnElement, PolicyConfig, PolicyState, PolicyTables};
use meshward_policy::{Compiler, Fqdn, NodeRules, PolicyError};
use parking_lot::Mutex;
use tracing::{error, info, warn};

use super::protocol::PolicyStatus;
use crate::config::PolicySettings;
use crate::datastore::Cluster;

/// Expired entries are swept (and a failed save retried) this often.
const SAVE_INTERVAL: Duration = Duration::from_secs(1);
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
            ..PolicyConfig::default()
        })
        .context("installing the policy tables")?;
        let cache_config = CacheConfig {
            ttl_floor: settings.fqdn_min_ttl,
            per_name_cap: settings.fqdn_max_ips_per_name,
            global_cap: settings.fqdn_max_entries,
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
        let (save_now, wake) = std::sync::mpsc::sync_channel(1);
        let shared = Arc::new(Shared {
            rules: ArcSwap::from_pointee(NodeRules::default()),
            tables: Mutex::new(tables),
            cache: Mutex::new(cache),
            dirty: AtomicBool::new(false),
            save_now,
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
        // The proxy sees the new rules once the kernel has them.
        let result = self.shared.tables.lock().apply_policy(&state);
        match result {
            Ok(()) => {
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
    /// (where nftables TPROXYs the redirected pods' DNS).
    pub fn start_dns_proxy(&mut self, settings: &PolicySettings) -> Result<()> {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), settings.dns_proxy_port);
        let listeners = Listeners::bind(addr)
            .with_context(|| format!("binding the DNS proxy to {addr} (udp and tcp)"))?;
        let config = ProxyConfig {
            deny_rcode: if settings.dns_deny_nxdomain {
                DenyRcode::NxDomain
            } else {
                DenyRcode::Refused
            },
            hold_timeout: settings.dns_hold_timeout,
            ..ProxyConfig::default()
        };
        let policy = RulesPolicy(self.shared.clone());
        let proxy = DnsProxy::new(config, policy, Learner(self.shared.clone()));
        self.proxy = Some(proxy.clone());
        std::thread::Builder::new()
            .name("mw-dns-proxy".into())
            .spawn(move || {
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
                if let Err(e) = runtime.block_on(proxy.serve(listeners)) {
                    // Fail closed and loudly: the supervisor restarts us.
                    error!("the DNS proxy stopped: {e}");
                    std::process::abort();
                }
            })
            .context("starting the DNS proxy thread")?;
        info!(%addr, "DNS proxy serving");
        Ok(())
    }

    /// Saves the cache if it changed and forgets expired entries (the
    /// kernel's elements expire by themselves).
    pub fn tick(&self) {
        if !self
            .shared
            .cache
            .lock()
            .expire(SystemTime::now())
            .is_empty()
        {
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
        PolicyStatus {
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
            errors: self.errors.iter().map(|e| e.to_string()).collect(),
            learned_entries: self.shared.cache.lock().len(),
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
        self.0.rules.load().check(query)
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
    let update = shared.cache.lock().insert(&learned, now);
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
    shared
        .tables
        .lock()
        .add_fqdn(&elements)
        .map_err(|e| format!("programming {} learned peers: {e}", elements.len()))
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
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}
