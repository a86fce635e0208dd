//! [`PolicyTables`]: the policy back end's handle on the kernel.
//!
//! The structure (sets, chains, rules) is written once by `nft` when the
//! handle is made; from then on only set elements change, each change one
//! netlink batch (one transaction) computed from an in-memory model of what
//! the kernel holds: a full flush and refill the first time, a difference
//! afterwards. The exception are the per-prefix sets (IPv4 CIDR peers,
//! one pair of hash sets per prefix length in use): a length coming into
//! use gets its sets and lookups in one `nft` transaction before the
//! element batch fills them; a length going out of use is emptied by the
//! batch and then loses its lookups and sets, again in one transaction. At
//! no point is a packet the old or the new policy allows dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Bound;
use std::os::fd::AsRawFd as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshward_policy::PortMatch;

use crate::layout::{self, Direction, Family, SetId, Structure};
use crate::nfnl::{self, Conn, NetlinkError, Op, WireElem};
use crate::routing::{ensure_tproxy_routing, TproxyRouting};
use crate::translate::{
    check_fqdn, desired_state, expiry, normalize_ports, range_piece, Contents, Desired, Elem,
    FqdnElement, PolicyState, RangeGroup,
};
use crate::{EgressError, TABLE};

/// How the policy back end is set up on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// nflog group dropped packets are sent to.
    pub nflog_group: u16,
    /// The node's DNS proxy port: `Some` installs the TPROXY redirect of
    /// selected pods' port-53 traffic to 127.0.0.1/::1 on this port, and
    /// the policy routing it needs.
    pub dns_proxy_port: Option<u16>,
    /// The node's L7 proxy port: `Some` installs the TPROXY redirect of the
    /// TCP ports with L7 rules (sets `l7_egress*` / `l7_ingress*`) to
    /// 127.0.0.1/::1 on this port, and the policy routing it needs.
    pub l7_proxy_port: Option<u16>,
    /// Mark (and mask) of redirected packets.
    pub tproxy_mark: u32,
    /// Routing table delivering marked packets locally.
    pub route_table: u32,
    /// Priority of the `ip rule` pointing at that table.
    pub rule_priority: u32,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            nflog_group: 109,
            dns_proxy_port: None,
            l7_proxy_port: None,
            tproxy_mark: 0x0040_0000,
            route_table: 109,
            rule_priority: 100,
        }
    }
}

/// Drops of one local endpoint address in one direction since its counter
/// appeared (counters vanish a day after their last drop).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropCount {
    pub ip: IpAddr,
    pub direction: Direction,
    pub packets: u64,
    pub bytes: u64,
}

/// Learned elements expired longer ago than this leave the model.
const PRUNE_GRACE: Duration = Duration::from_secs(2);
/// Model expiries this close count as equal (a re-sent state differs from
/// the model only by the time it took to compute).
const EXPIRY_SLACK: Duration = Duration::from_secs(1);
const PRUNE_EVERY: u32 = 4096;

/// The policy sets of table `inet meshward` in one network namespace.
pub struct PolicyTables {
    cfg: PolicyConfig,
    conn: Conn,
    /// What the kernel holds as far as we know. Every set is present.
    model: Desired,
    /// False until a full flush-and-refill succeeded (the kernel may hold a
    /// predecessor's elements we know nothing of).
    synced: bool,
    since_prune: u32,
    /// Per-prefix sets (with their lookups) in the kernel.
    prefix_sets: BTreeSet<SetId>,
    /// The network namespace the handle was made in (`nft` runs there).
    netns: File,
}

fn structure_of(cfg: &PolicyConfig) -> Structure {
    Structure {
        nflog_group: cfg.nflog_group,
        dns_proxy_port: cfg.dns_proxy_port,
        l7_proxy_port: cfg.l7_proxy_port,
        tproxy_mark: cfg.tproxy_mark,
    }
}

fn nft(script: &str, args: &[&str]) -> Result<String, String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("write to nft: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("wait for nft: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Runs `nft` in the network namespace `netns`, from a thread of its own
/// (entering a namespace changes only the calling thread's).
fn nft_in(netns: &File, script: &str, args: &[&str]) -> Result<String, String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: a plain syscall on a live descriptor; it changes
                // only this short-lived thread's namespace.
                let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(format!(
                        "enter the policy's network namespace: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                nft(script, args)
            })
            .join()
            .unwrap_or_else(|_| Err("the nft thread panicked".to_string()))
    })
}

/// Creates what is missing and replaces our chains' rules, in one
/// transaction, keeping the lookups of the per-prefix sets that exist (a
/// predecessor's policy stays enforced until the first apply); if our sets
/// exist with other definitions (an upgrade), removes our chains and sets
/// and creates them anew in one transaction. Returns the per-prefix sets
/// now in the kernel.
fn install_structure(netns: &File, s: &Structure) -> Result<BTreeSet<SetId>, EgressError> {
    let nft = |script: &str, args: &[&str]| nft_in(netns, script, args);
    let listing = nft("", &["-j", "-t", "list", "table", "inet", TABLE]).unwrap_or_default();
    let (chains, sets) = existing_objects(&listing);
    let prefix_sets: BTreeSet<SetId> = sets
        .iter()
        .filter_map(|name| SetId::prefix_set_named(name))
        .collect();
    let script = layout::structure_ruleset(s, &prefix_sets);
    let first = match nft(&script, &["-f", "-"]) {
        Ok(_) => return Ok(prefix_sets),
        Err(e) => e,
    };
    let rebuild = format!("{}{script}", layout::teardown(&chains, &sets));
    nft(&rebuild, &["-f", "-"]).map_err(|second| {
        EgressError::Nft(format!(
            "installing the policy structure failed ({first}); rebuilding it failed too: {second}"
        ))
    })?;
    Ok(prefix_sets)
}

/// Chain and set names in an `nft -j list table` output.
fn existing_objects(json: &str) -> (Vec<String>, Vec<String>) {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let mut chains = Vec::new();
    let mut sets = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        if let Some(name) = item["chain"]["name"].as_str() {
            chains.push(name.to_string());
        }
        if let Some(name) = item["set"]["name"].as_str() {
            sets.push(name.to_string());
        }
    }
    (chains, sets)
}

fn wire(elem: &Elem, expiry: Option<Instant>, now: Instant) -> WireElem {
    let (key, key_end) = elem.encode();
    WireElem {
        key,
        key_end,
        timeout: expiry.map(|e| e.saturating_duration_since(now)),
    }
}

/// Per set: elements to remove and to (re)add, after an optional flush.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct SetPlan {
    pub flush: bool,
    pub destroy: Vec<Elem>,
    pub add: Vec<(Elem, Option<Instant>)>,
}

fn close(a: Option<Instant>, b: Option<Instant>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            let d = if a > b { a - b } else { b - a };
            d <= EXPIRY_SLACK
        }
        _ => false,
    }
}

/// What turns `current` (`None`: unknown) into `desired`. Learned elements
/// already expired are not added.
pub(crate) fn plan(
    current: Option<&Desired>,
    desired: &Desired,
    now: Instant,
) -> BTreeMap<SetId, SetPlan> {
    let live = |exp: &Option<Instant>| exp.is_none_or(|e| e > now);
    let mut out = BTreeMap::new();
    for (set, want) in desired {
        let mut p = SetPlan::default();
        match current.and_then(|c| c.get(set)) {
            None => {
                p.flush = true;
                p.add = want
                    .iter()
                    .filter(|(_, x)| live(x))
                    .map(|(e, x)| (*e, *x))
                    .collect();
            }
            Some(have) => {
                p.destroy = have
                    .keys()
                    .filter(|e| !want.contains_key(e))
                    .copied()
                    .collect();
                p.add = want
                    .iter()
                    .filter(|(e, x)| live(x) && !have.get(e).is_some_and(|h| close(*h, **x)))
                    .map(|(e, x)| (*e, *x))
                    .collect();
            }
        }
        out.insert(*set, p);
    }
    out
}

fn batch_of(conn: &mut Conn, plans: &BTreeMap<SetId, SetPlan>, now: Instant) -> nfnl::Batch {
    let mut batch = conn.batch(TABLE);
    // Removals before additions: an interval element may only go in once
    // the one it overlaps is gone (both in this same transaction).
    for (set, p) in plans {
        if p.flush {
            batch.flush(&set.name());
        }
    }
    for (set, p) in plans {
        if !p.destroy.is_empty() {
            let elems: Vec<WireElem> = p.destroy.iter().map(|e| wire(e, None, now)).collect();
            batch.elems(Op::Destroy, &set.name(), &elems);
        }
    }
    for (set, p) in plans {
        if !p.add.is_empty() {
            let elems: Vec<WireElem> = p.add.iter().map(|(e, x)| wire(e, *x, now)).collect();
            batch.elems(Op::Add, &set.name(), &elems);
        }
    }
    batch
}

fn empty_model() -> Desired {
    SetId::all()
        .into_iter()
        .map(|s| (s, Contents::new()))
        .collect()
}

fn group_range(group: RangeGroup) -> (Elem, Elem) {
    let (src, dst, proto) = group;
    (
        range_piece(src, dst, proto, 0, 0),
        range_piece(src, dst, proto, u16::MAX, u16::MAX),
    )
}

/// The pieces of a learned port-range group in the model.
fn group_pieces(contents: &Contents, group: RangeGroup) -> Vec<(Elem, Option<Instant>)> {
    let (lo, hi) = group_range(group);
    contents
        .range((Bound::Included(lo), Bound::Included(hi)))
        .map(|(e, x)| (*e, *x))
        .collect()
}

fn piece_ports(e: &Elem) -> (u16, u16) {
    match e {
        Elem::PortRange { ports, .. } => *ports,
        _ => (0, 0),
    }
}

impl PolicyTables {
    /// Installs the structure (creating table `inet meshward` if strict
    /// mode has not yet) and, with a DNS proxy port, the policy routing
    /// TPROXY needs; opens the netlink socket. Everything happens in the
    /// calling thread's network namespace, and later calls act on that one
    /// whatever thread makes them. Existing set contents are kept until the
    /// first [`PolicyTables::apply_policy`].
    pub fn new(cfg: PolicyConfig) -> Result<PolicyTables, EgressError> {
        let netns = File::open("/proc/thread-self/ns/net")
            .map_err(|e| EgressError::Nft(format!("open /proc/thread-self/ns/net: {e}")))?;
        let prefix_sets = install_structure(&netns, &structure_of(&cfg))?;
        if cfg.dns_proxy_port.is_some() || cfg.l7_proxy_port.is_some() {
            ensure_tproxy_routing(&TproxyRouting {
                mark: cfg.tproxy_mark,
                table: cfg.route_table,
                rule_priority: cfg.rule_priority,
            })?;
        }
        let conn = Conn::open().map_err(|e| EgressError::Netlink(NetlinkError::Io(e)))?;
        Ok(PolicyTables {
            cfg,
            conn,
            model: empty_model(),
            synced: false,
            since_prune: 0,
            prefix_sets,
            netns,
        })
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// Makes the policy sets hold exactly `state`, in one transaction. The
    /// first call flushes and refills every set (reconciling whatever a
    /// predecessor left); later calls send only the difference. Established
    /// flows are accepted before any set is consulted, so none is cut while
    /// this runs. Learned elements in `state` replace those added before.
    pub fn apply_policy(&mut self, state: &PolicyState) -> Result<(), EgressError> {
        let now = Instant::now();
        let desired = desired_state(state, now)?;
        match self.commit_with_prefix_sets(desired.clone(), now) {
            Err(EgressError::Netlink(e)) if e.errno() == Some(libc::ENOENT) => {
                // Someone removed our table or sets: put them back and refill.
                self.prefix_sets = install_structure(&self.netns, &structure_of(&self.cfg))?;
                self.synced = false;
                self.commit_with_prefix_sets(desired, Instant::now())
            }
            other => other,
        }
    }

    /// Commits `desired`, first adding the per-prefix sets it needs and
    /// afterwards removing those it no longer needs (emptied by the batch).
    fn commit_with_prefix_sets(
        &mut self,
        mut desired: Desired,
        now: Instant,
    ) -> Result<(), EgressError> {
        let needed: BTreeSet<SetId> = desired
            .keys()
            .copied()
            .filter(|s| s.prefix().is_some())
            .collect();
        let wanted: BTreeSet<SetId> = self.prefix_sets.union(&needed).copied().collect();
        if wanted != self.prefix_sets {
            self.rewrite_structure(wanted, &[])?;
        }
        for set in &self.prefix_sets {
            desired.entry(*set).or_default();
        }
        self.commit_state(&desired, now)?;
        let stale: Vec<SetId> = self.prefix_sets.difference(&needed).copied().collect();
        if !stale.is_empty() {
            self.rewrite_structure(needed, &stale)?;
            for set in &stale {
                self.model.remove(set);
            }
        }
        Ok(())
    }

    /// One transaction: the structure with lookups of `prefix_sets` (created
    /// if missing), and `delete` (no longer looked up) removed.
    fn rewrite_structure(
        &mut self,
        prefix_sets: BTreeSet<SetId>,
        delete: &[SetId],
    ) -> Result<(), EgressError> {
        let mut script = layout::structure_ruleset(&structure_of(&self.cfg), &prefix_sets);
        for set in delete {
            let _ = writeln!(script, "delete set inet {TABLE} {}", set.name());
        }
        nft_in(&self.netns, &script, &["-f", "-"])
            .map_err(|e| EgressError::Nft(format!("changing the per-prefix sets: {e}")))?;
        self.prefix_sets = prefix_sets;
        Ok(())
    }

    fn commit_state(&mut self, desired: &Desired, now: Instant) -> Result<(), EgressError> {
        let current = self.synced.then_some(&self.model);
        let plans = plan(current, desired, now);
        let batch = batch_of(&mut self.conn, &plans, now);
        if let Err(e) = self.conn.commit(batch) {
            self.synced = false;
            return Err(EgressError::Netlink(e));
        }
        let live = |x: &Option<Instant>| x.is_none_or(|e| e > now);
        self.model = desired
            .iter()
            .map(|(s, c)| {
                (
                    *s,
                    c.iter()
                        .filter(|(_, x)| live(x))
                        .map(|(e, x)| (*e, *x))
                        .collect(),
                )
            })
            .collect();
        self.synced = true;
        Ok(())
    }

    /// Allows learned peers now, in one transaction (returns once the
    /// kernel has them). An element already allowed for longer is left as
    /// it is; a longer timeout refreshes it. Port ranges of one source,
    /// destination and protocol are kept as disjoint pieces, each expiring
    /// with the latest answer covering it.
    pub fn add_fqdn(&mut self, elements: &[FqdnElement]) -> Result<(), EgressError> {
        self.change_fqdn(elements, true)
    }

    /// Withdraws learned peers (their timeouts are ignored), in one
    /// transaction. Removing part of a port range keeps the rest.
    pub fn remove_fqdn(&mut self, elements: &[FqdnElement]) -> Result<(), EgressError> {
        self.change_fqdn(elements, false)
    }

    fn change_fqdn(&mut self, elements: &[FqdnElement], add: bool) -> Result<(), EgressError> {
        for e in elements {
            check_fqdn(e)?;
        }
        let now = Instant::now();
        let mut plans: BTreeMap<SetId, SetPlan> = BTreeMap::new();
        let mut groups: HashMap<RangeGroup, Vec<(u16, u16, Instant)>> = HashMap::new();
        for e in elements {
            let fam = Family::of(&e.src);
            let exp = expiry(now, e.timeout);
            let (set, elem) = match e.ports {
                PortMatch::Any => (
                    SetId::FqdnAny(fam),
                    Elem::Pair {
                        local: e.src,
                        peer: e.dst,
                    },
                ),
                PortMatch::Ports {
                    protocol,
                    first,
                    last,
                } if first == last => (
                    SetId::FqdnPort(fam),
                    Elem::Port {
                        local: e.src,
                        peer: e.dst,
                        proto: protocol.number(),
                        port: first,
                    },
                ),
                PortMatch::Ports {
                    protocol,
                    first,
                    last,
                } => {
                    groups
                        .entry((e.src, e.dst, protocol.number()))
                        .or_default()
                        .push((first, last, exp));
                    continue;
                }
            };
            let p = plans.entry(set).or_default();
            if add {
                let have = self
                    .model
                    .get(&set)
                    .and_then(|c| c.get(&elem))
                    .copied()
                    .flatten();
                if have.is_none_or(|h| h < exp) {
                    p.add.retain(|(x, _)| *x != elem);
                    p.add.push((elem, Some(exp)));
                }
            } else {
                p.destroy.push(elem);
            }
        }
        for (group, changes) in groups {
            let set = SetId::FqdnRange(Family::of(&group.0));
            let old = group_pieces(self.model.get(&set).unwrap_or(&Contents::new()), group);
            let live: Vec<(u16, u16, Instant)> = old
                .iter()
                .filter_map(|(e, x)| {
                    let x = (*x)?;
                    let (lo, hi) = piece_ports(e);
                    (x > now).then_some((lo, hi, x))
                })
                .collect();
            let new: Vec<(u16, u16, Instant)> = if add {
                normalize_ports(&[live, changes].concat())
            } else {
                subtract(&live, &changes)
            };
            let new: BTreeMap<Elem, Instant> = new
                .into_iter()
                .map(|(lo, hi, x)| (range_piece(group.0, group.1, group.2, lo, hi), x))
                .collect();
            let p = plans.entry(set).or_default();
            // Pieces keeping their bounds with a new expiry are re-added
            // (the kernel then refreshes the timeout), the rest replaced.
            for (e, _) in &old {
                if !new.contains_key(e) {
                    p.destroy.push(*e);
                }
            }
            for (e, x) in &new {
                let same = old.iter().any(|(o, ox)| o == e && *ox == Some(*x));
                if !same {
                    p.add.push((*e, Some(*x)));
                }
            }
        }
        plans.retain(|_, p| !p.destroy.is_empty() || !p.add.is_empty());
        if plans.is_empty() {
            return Ok(());
        }
        let batch = batch_of(&mut self.conn, &plans, now);
        self.conn.commit(batch).map_err(|e| {
            if e.errno() == Some(libc::ENOENT) {
                self.synced = false;
            }
            EgressError::Netlink(e)
        })?;
        for (set, p) in plans {
            let contents = self.model.entry(set).or_default();
            for e in p.destroy {
                contents.remove(&e);
            }
            for (e, x) in p.add {
                contents.insert(e, x);
            }
        }
        self.since_prune += 1;
        if self.since_prune >= PRUNE_EVERY {
            self.prune(now);
        }
        Ok(())
    }

    /// Forgets learned elements the kernel has let expire.
    fn prune(&mut self, now: Instant) {
        self.since_prune = 0;
        let Some(cutoff) = now.checked_sub(PRUNE_GRACE) else {
            return;
        };
        for (set, contents) in self.model.iter_mut() {
            if set.timeout() {
                contents.retain(|_, x| x.is_none_or(|x| x > cutoff));
            }
        }
    }

    /// Drop counters of every local endpoint address that dropped packets.
    pub fn drop_counters(&mut self) -> Result<Vec<DropCount>, EgressError> {
        let mut out = Vec::new();
        for fam in [Family::V4, Family::V6] {
            for dir in [Direction::Egress, Direction::Ingress] {
                let set = layout::drops_set(dir, fam);
                let elems = self
                    .conn
                    .dump_set(TABLE, &set)
                    .map_err(EgressError::Netlink)?;
                for raw in elems {
                    if let Some((ip, packets, bytes)) = parse_counter_elem(&raw, fam) {
                        out.push(DropCount {
                            ip,
                            direction: dir,
                            packets,
                            bytes,
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// Number of elements the model holds per set (for logs and tests).
    pub fn element_counts(&self) -> BTreeMap<String, usize> {
        self.model
            .iter()
            .map(|(s, c)| (s.name(), c.len()))
            .collect()
    }
}

/// `live` minus the port ranges of `removed` (expiries kept).
fn subtract(
    live: &[(u16, u16, Instant)],
    removed: &[(u16, u16, Instant)],
) -> Vec<(u16, u16, Instant)> {
    let mut pieces: Vec<(u16, u16, Instant)> = live.to_vec();
    for &(rlo, rhi, _) in removed {
        let mut next = Vec::new();
        for (lo, hi, x) in pieces {
            if hi < rlo || lo > rhi {
                next.push((lo, hi, x));
                continue;
            }
            if lo < rlo {
                next.push((lo, rlo - 1, x));
            }
            if hi > rhi {
                next.push((rhi + 1, hi, x));
            }
        }
        pieces = next;
    }
    pieces
}

const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_EXPR: u16 = 7;
const NFTA_SET_ELEM_EXPRESSIONS: u16 = 11;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;

fn attr(data: &[u8], ty: u16) -> Option<&[u8]> {
    nfnl::attributes(data)
        .into_iter()
        .find(|(t, _)| t & 0x3fff == ty)
        .map(|(_, d)| d)
}

fn be_u64(data: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(data.get(..8)?.try_into().ok()?))
}

fn counter_of(expr: &[u8]) -> Option<(u64, u64)> {
    let name = attr(expr, NFTA_EXPR_NAME)?;
    if name.strip_suffix(b"\0").unwrap_or(name) != b"counter" {
        return None;
    }
    let data = attr(expr, NFTA_EXPR_DATA)?;
    Some((
        be_u64(attr(data, NFTA_COUNTER_PACKETS)?)?,
        be_u64(attr(data, NFTA_COUNTER_BYTES)?)?,
    ))
}

/// (address, packets, bytes) of one dumped drop-counter element.
fn parse_counter_elem(raw: &[u8], fam: Family) -> Option<(IpAddr, u64, u64)> {
    let key = attr(attr(raw, NFTA_SET_ELEM_KEY)?, 1)?;
    let ip = match fam {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(key.get(..4)?).ok()?)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(key.get(..16)?).ok()?)),
    };
    let (packets, bytes) = if let Some(expr) = attr(raw, NFTA_SET_ELEM_EXPR) {
        counter_of(expr)?
    } else {
        let list = attr(raw, NFTA_SET_ELEM_EXPRESSIONS)?;
        nfnl::attributes(list)
            .into_iter()
            .find_map(|(_, e)| counter_of(e))?
    };
    Some((ip, packets, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn first_plan_flushes_everything_later_plans_send_differences() {
        let now = Instant::now();
        let a = Elem::Addr(ip("198.19.1.2"));
        let b = Elem::Addr(ip("198.19.1.3"));
        let set = SetId::Isolated(Direction::Egress, Family::V4);
        let mut desired = empty_model();
        desired.get_mut(&set).unwrap().insert(a, None);
        let first = plan(None, &desired, now);
        assert!(first.values().all(|p| p.flush));
        assert_eq!(first[&set].add, [(a, None)]);

        let mut next = empty_model();
        next.get_mut(&set).unwrap().insert(b, None);
        let diff = plan(Some(&desired), &next, now);
        assert!(diff.values().all(|p| !p.flush));
        assert_eq!(diff[&set].destroy, [a]);
        assert_eq!(diff[&set].add, [(b, None)]);
        assert!(plan(Some(&next), &next, now)
            .values()
            .all(|p| *p == SetPlan::default()));
    }

    #[test]
    fn learned_elements_are_resent_only_when_their_expiry_moved() {
        let now = Instant::now();
        let set = SetId::FqdnAny(Family::V4);
        let e = Elem::Pair {
            local: ip("198.19.1.2"),
            peer: ip("198.18.100.1"),
        };
        let mut have = empty_model();
        have.get_mut(&set)
            .unwrap()
            .insert(e, Some(now + Duration::from_secs(60)));
        let mut want = empty_model();
        want.get_mut(&set)
            .unwrap()
            .insert(e, Some(now + Duration::from_millis(60_300)));
        assert!(plan(Some(&have), &want, now)[&set].add.is_empty());
        want.get_mut(&set)
            .unwrap()
            .insert(e, Some(now + Duration::from_secs(300)));
        assert_eq!(plan(Some(&have), &want, now)[&set].add.len(), 1);
        // Already expired: not sent at all.
        want.get_mut(&set).unwrap().insert(e, Some(now));
        let p = plan(None, &want, now + Duration::from_millis(1));
        assert!(p[&set].add.is_empty());
    }

    #[test]
    fn subtract_keeps_the_rest_of_a_range() {
        let x = Instant::now();
        assert_eq!(
            subtract(&[(80, 443, x)], &[(100, 200, x)]),
            [(80, 99, x), (201, 443, x)]
        );
        assert_eq!(subtract(&[(80, 443, x)], &[(0, 65535, x)]), []);
        assert_eq!(subtract(&[(80, 80, x)], &[(81, 90, x)]), [(80, 80, x)]);
    }

    #[test]
    fn counter_elements_parse_from_netlink_attributes() {
        // KEY{VALUE 198.19.1.2}, EXPR{NAME "counter", DATA{BYTES 168, PACKETS 2}}
        fn a(ty: u16, data: &[u8]) -> Vec<u8> {
            let mut v = ((4 + data.len()) as u16).to_ne_bytes().to_vec();
            v.extend_from_slice(&ty.to_ne_bytes());
            v.extend_from_slice(data);
            while !v.len().is_multiple_of(4) {
                v.push(0);
            }
            v
        }
        let key = a(NFTA_SET_ELEM_KEY | 0x8000, &a(1, &[198, 19, 1, 2]));
        let data = [
            a(NFTA_COUNTER_BYTES, &168u64.to_be_bytes()),
            a(NFTA_COUNTER_PACKETS, &2u64.to_be_bytes()),
        ]
        .concat();
        let expr = [
            a(NFTA_EXPR_NAME, b"counter\0"),
            a(NFTA_EXPR_DATA | 0x8000, &data),
        ]
        .concat();
        let raw = [key.clone(), a(NFTA_SET_ELEM_EXPR | 0x8000, &expr)].concat();
        assert_eq!(
            parse_counter_elem(&raw, Family::V4),
            Some((ip("198.19.1.2"), 2, 168))
        );
        let raw = [
            key,
            a(NFTA_SET_ELEM_EXPRESSIONS | 0x8000, &a(1 | 0x8000, &expr)),
        ]
        .concat();
        assert_eq!(
            parse_counter_elem(&raw, Family::V4),
            Some((ip("198.19.1.2"), 2, 168))
        );
        assert_eq!(parse_counter_elem(&[1, 2, 3], Family::V4), None);
    }

    #[test]
    fn existing_objects_are_read_from_nft_json() {
        let json = r#"{"nftables":[{"metainfo":{}},{"table":{"name":"meshward"}},
            {"set":{"name":"egress4_any"}},{"chain":{"name":"policy_forward"}}]}"#;
        assert_eq!(
            existing_objects(json),
            (
                vec!["policy_forward".to_string()],
                vec!["egress4_any".to_string()]
            )
        );
        assert_eq!(existing_objects("garbage"), (vec![], vec![]));
    }
}
