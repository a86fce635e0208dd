//! The policy part of table `inet meshward`: set names and the static
//! structure (sets, chains, rules), rendered as one `nft -f` transaction.
//!
//! Only set *contents* change with policy; the structure depends on the
//! configuration alone, so it is installed once per agent start and every
//! later change is a netlink batch of set elements (see `nfnl`).
//!
//! Per-packet cost: a new flow does a bounded number of lookups per
//! direction, whatever the number of policies or allowed addresses. Exact
//! keys (pod or learned IP, single port) live in hash sets (O(1)). IPv4 CIDR
//! peers live in one pair of hash sets per prefix length in use, looked up
//! with the peer address masked to that length (so the cost grows with the
//! number of distinct prefix lengths, at most 32, not with the policies);
//! the sets and their rules exist only while a length is in use, so this
//! part of the structure follows the policy (see [`structure_ruleset`]).
//! IPv4 port ranges wider than [`crate::translate::EXPAND_PORTS_MAX`] are
//! split into aligned port blocks: one hash set per (prefix length, block
//! size) in use, looked up with the port masked to the block too
//! ([`SetId::PrefixBlock`]). Only IPv6 CIDR peers, IPv6 port ranges and
//! learned port ranges need concatenated interval sets (pipapo), whose lookup
//! cost grows with their element count (measured here: about 30 µs per
//! packet at 100,000 elements, against no measurable cost for a hash set of
//! the same size), so nothing that scales with learned names goes there
//! unless it carries a port range.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use crate::TABLE;

/// Address family of a set (the `4`/`6` in its name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

/// Which way a packet goes relative to the local endpoint a set is keyed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Sent by the local endpoint (keyed by `saddr`).
    Egress,
    /// Received by the local endpoint (keyed by `daddr`).
    Ingress,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }
    }

    /// The packet field holding the local endpoint's address (the source
    /// of its egress, the destination of its ingress).
    fn local_field(self) -> &'static str {
        match self {
            Direction::Egress => "saddr",
            Direction::Ingress => "daddr",
        }
    }

    fn peer_field(self) -> &'static str {
        match self {
            Direction::Egress => "daddr",
            Direction::Ingress => "saddr",
        }
    }
}

/// Jumps of isolated endpoints to their checks: the source's egress, then
/// the destination's ingress (a packet between two local pods passes both).
fn isolation_jumps(out: &mut String) {
    for dir in [Direction::Egress, Direction::Ingress] {
        for fam in [Family::V4, Family::V6] {
            let _ = writeln!(
                out,
                "    {} {} @{} jump {}",
                fam.nft_payload(),
                dir.local_field(),
                SetId::Isolated(dir, fam).name(),
                check_chain(dir, fam)
            );
        }
    }
}

impl Family {
    pub(crate) fn of(ip: &std::net::IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    fn digit(self) -> char {
        match self {
            Family::V4 => '4',
            Family::V6 => '6',
        }
    }

    fn nft_addr_type(self) -> &'static str {
        match self {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        }
    }

    fn nft_payload(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
}

/// One of the sets the policy back end fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetId {
    /// Local endpoints isolated in a direction (hash of addresses).
    Isolated(Direction, Family),
    /// `local . peer`, every protocol (hash).
    Any(Direction, Family),
    /// `local . peer . l4proto . port` (hash).
    Port(Direction, Family),
    /// `local . peer-range`, every protocol (interval).
    NetAny(Direction, Family),
    /// `local . peer-range . l4proto . port-range` (interval).
    Range(Direction, Family),
    /// Learned (toFQDNs) peers: same shapes as above, with timeouts.
    FqdnAny(Family),
    FqdnPort(Family),
    FqdnRange(Family),
    /// Endpoints whose DNS goes to the node's proxy.
    DnsRedirect(Family),
    /// `local . tcp port` whose traffic in this direction goes to the L7
    /// proxy (egress: keyed by source; ingress: by destination).
    L7(Direction, Family),
    /// `local . peer-network`, every protocol, for CIDR peers of one prefix
    /// length, looked up with the peer masked to it (hash). IPv4 only.
    PrefixAny(Direction, Family, u8),
    /// `local . peer-network . l4proto . port` likewise (hash).
    PrefixPort(Direction, Family, u8),
    /// `local . peer-network . l4proto . port-block` for port ranges wider
    /// than [`crate::translate::EXPAND_PORTS_MAX`]: the range split into
    /// aligned blocks of 2^bits ports, looked up with the peer masked to the
    /// prefix length (0..=32) and the port masked to the block (hash).
    /// IPv4 only; bits in [`BLOCK_BITS`].
    PrefixBlock(Direction, Family, u8, u8),
}

/// Port-block sizes (log2) with sets of their own: smaller blocks of a wide
/// range are single ports of the port sets, so a range costs at most one
/// lookup per size in use, whatever the number of policies.
pub const BLOCK_BITS: std::ops::RangeInclusive<u8> = 6..=16;

/// The key shape of a set, which fixes its element encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    Addr,
    /// `local . inet_service`.
    AddrPort,
    Pair,
    Quad,
}

impl SetId {
    /// Every set that always exists, in a fixed order (the per-prefix sets
    /// come and go with the policy: [`SetId::prefix_sets`]).
    pub fn all() -> Vec<SetId> {
        let mut out = Vec::new();
        for fam in [Family::V4, Family::V6] {
            for dir in [Direction::Egress, Direction::Ingress] {
                out.extend([
                    SetId::Isolated(dir, fam),
                    SetId::Any(dir, fam),
                    SetId::Port(dir, fam),
                    SetId::NetAny(dir, fam),
                    SetId::Range(dir, fam),
                ]);
            }
            out.extend([
                SetId::FqdnAny(fam),
                SetId::FqdnPort(fam),
                SetId::FqdnRange(fam),
                SetId::DnsRedirect(fam),
                SetId::L7(Direction::Egress, fam),
                SetId::L7(Direction::Ingress, fam),
            ]);
        }
        out
    }

    /// Every per-prefix set there can be (IPv4, lengths 0..=31; /32 peers
    /// are exact keys, but for port blocks, 0..=32).
    pub fn prefix_sets() -> Vec<SetId> {
        let mut out = Vec::new();
        for dir in [Direction::Egress, Direction::Ingress] {
            for len in 0..32 {
                out.push(SetId::PrefixAny(dir, Family::V4, len));
                out.push(SetId::PrefixPort(dir, Family::V4, len));
            }
            for len in 0..=32 {
                for bits in BLOCK_BITS {
                    out.push(SetId::PrefixBlock(dir, Family::V4, len, bits));
                }
            }
        }
        out
    }

    /// The per-prefix set of this kernel name, if it is one.
    pub fn prefix_set_named(name: &str) -> Option<SetId> {
        SetId::prefix_sets().into_iter().find(|s| s.name() == name)
    }

    /// A per-prefix set: its direction and prefix length.
    pub fn prefix(self) -> Option<(Direction, u8)> {
        match self {
            SetId::PrefixAny(d, _, len)
            | SetId::PrefixPort(d, _, len)
            | SetId::PrefixBlock(d, _, len, _) => Some((d, len)),
            _ => None,
        }
    }

    /// A port-block set's block size (log2): the lookup masks the port so.
    pub fn port_bits(self) -> Option<u8> {
        match self {
            SetId::PrefixBlock(_, _, _, bits) => Some(bits),
            _ => None,
        }
    }

    pub fn family(self) -> Family {
        match self {
            SetId::Isolated(_, f)
            | SetId::Any(_, f)
            | SetId::Port(_, f)
            | SetId::NetAny(_, f)
            | SetId::Range(_, f)
            | SetId::FqdnAny(f)
            | SetId::FqdnPort(f)
            | SetId::FqdnRange(f)
            | SetId::DnsRedirect(f)
            | SetId::L7(_, f)
            | SetId::PrefixAny(_, f, _)
            | SetId::PrefixPort(_, f, _)
            | SetId::PrefixBlock(_, f, _, _) => f,
        }
    }

    /// The kernel name, e.g. `egress4_port`, `ingress6_isolated`,
    /// `egress4_fqdn_range`, `dns_redirect6`.
    pub fn name(self) -> String {
        let f = self.family().digit();
        let (prefix, suffix) = match self {
            SetId::Isolated(d, _) => (d.as_str(), "isolated"),
            SetId::Any(d, _) => (d.as_str(), "any"),
            SetId::Port(d, _) => (d.as_str(), "port"),
            SetId::NetAny(d, _) => (d.as_str(), "net_any"),
            SetId::Range(d, _) => (d.as_str(), "range"),
            SetId::FqdnAny(_) => ("egress", "fqdn_any"),
            SetId::FqdnPort(_) => ("egress", "fqdn_port"),
            SetId::FqdnRange(_) => ("egress", "fqdn_range"),
            SetId::DnsRedirect(_) => return format!("dns_redirect{f}"),
            SetId::L7(d, _) => return format!("l7_{}{f}", d.as_str()),
            SetId::PrefixAny(d, _, len) => return format!("{}{f}_p{len}_any", d.as_str()),
            SetId::PrefixPort(d, _, len) => return format!("{}{f}_p{len}_port", d.as_str()),
            SetId::PrefixBlock(d, _, len, bits) => {
                return format!("{}{f}_p{len}_b{bits}", d.as_str())
            }
        };
        format!("{prefix}{f}_{suffix}")
    }

    pub(crate) fn shape(self) -> Shape {
        match self {
            SetId::Isolated(..) | SetId::DnsRedirect(_) => Shape::Addr,
            SetId::L7(..) => Shape::AddrPort,
            SetId::Any(..) | SetId::NetAny(..) | SetId::FqdnAny(_) | SetId::PrefixAny(..) => {
                Shape::Pair
            }
            SetId::Port(..)
            | SetId::Range(..)
            | SetId::FqdnPort(_)
            | SetId::FqdnRange(_)
            | SetId::PrefixPort(..)
            | SetId::PrefixBlock(..) => Shape::Quad,
        }
    }

    /// Interval sets (pipapo): elements carry a key end and must not
    /// partially overlap.
    pub fn interval(self) -> bool {
        matches!(
            self,
            SetId::NetAny(..) | SetId::Range(..) | SetId::FqdnRange(_)
        )
    }

    pub fn timeout(self) -> bool {
        matches!(
            self,
            SetId::FqdnAny(_) | SetId::FqdnPort(_) | SetId::FqdnRange(_)
        )
    }

    fn declaration(self) -> String {
        let a = self.family().nft_addr_type();
        let ty = match self.shape() {
            Shape::Addr => a.to_string(),
            Shape::AddrPort => format!("{a} . inet_service"),
            Shape::Pair => format!("{a} . {a}"),
            Shape::Quad => format!("{a} . {a} . inet_proto . inet_service"),
        };
        let flags = match (self.interval(), self.timeout()) {
            (true, true) => " flags interval,timeout;",
            (true, false) => " flags interval;",
            (false, true) => " flags timeout;",
            (false, false) => "",
        };
        format!("set {} {{ type {ty};{flags} }}", self.name())
    }
}

/// Per-endpoint drop counters: a dynamic set keyed by the local endpoint's
/// address, one counter per element, created by the first drop.
pub fn drops_set(dir: Direction, fam: Family) -> String {
    format!("{}{}_drops", dir.as_str(), fam.digit())
}

/// The chain holding the checks of one direction and family.
pub fn check_chain(dir: Direction, fam: Family) -> String {
    format!("{}{}", dir.as_str(), fam.digit())
}

/// Forward hook: every packet between a local pod and anything else.
pub const FORWARD_CHAIN: &str = "policy_forward";
/// Input hook: pod to node (egress only; the node is no policy endpoint).
pub const INPUT_CHAIN: &str = "policy_input";
/// Prerouting (mangle): DNS of selected pods to the node's proxy.
pub const DNS_CHAIN: &str = "dns_prerouting";
/// Prerouting (just after mangle): TCP on L7 ports to the L7 proxy.
pub const L7_CHAIN: &str = "l7_prerouting";
/// Regular chain of one family's redirected DNS: TPROXY to the DNS proxy,
/// then the fail-closed verdict for what TPROXY did not take. Reached by a
/// `goto` from [`DNS_CHAIN`], so the redirect set is looked up once.
pub fn dns_tproxy_chain(fam: Family) -> String {
    format!("dns_tproxy{}", fam.digit())
}
/// Regular chain of one family's and direction's L7 connections: TPROXY
/// to the L7 proxy, then the fail-closed verdict. Reached by a `goto` from
/// [`L7_CHAIN`], so the L7 set is looked up once.
pub fn l7_tproxy_chain(dir: Direction, fam: Family) -> String {
    format!("l7_tproxy_{}{}", dir.as_str(), fam.digit())
}
/// Regular chain for redirected (marked) packets reaching the input hook:
/// DNS passes (the DNS proxy judges it), everything else (L7) is checked
/// against the source's egress and the original destination's ingress.
pub const PROXIED_CHAIN: &str = "policy_proxied";
/// After destination NAT (-100): a connection to a Service, NodePort or
/// hostPort is judged by the pod and port it was translated to, as the
/// policy names them (before NAT it would slip past the L7 sets). Also after
/// the DNS chain (mangle, -150), so a packet it redirected (and marked) is
/// left alone.
const L7_PRIORITY: i32 = -99;

/// After strict mode (-10), before the usual filter chains (0).
pub const POLICY_PRIORITY: i32 = -5;

/// Prefix of the nflog messages for dropped packets, followed by
/// `egress` or `ingress`. The packet's addresses say which endpoint.
pub const NFLOG_PREFIX: &str = "meshward-drop ";
/// nflog prefix of redirected DNS that no DNS proxy socket took (the
/// fail-closed rules of [`dns_tproxy_chain`]); the pod is the source.
pub const NFLOG_DNS_PROXY_PREFIX: &str = "meshward-drop dns-proxy";
/// nflog prefix of L7 connections that no L7 proxy socket took (the
/// fail-closed rule of [`l7_tproxy_chain`]), followed by ` egress` or
/// ` ingress`: which side's L7 port redirected it.
pub const NFLOG_L7_PROXY_PREFIX: &str = "meshward-drop l7-proxy";

/// Dynamic drop-counter elements disappear after this long without drops
/// (bounds the sets when pod IPs are not reused, e.g. IPv6).
const DROP_COUNTER_TIMEOUT: &str = "1d";

/// What the structure depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Structure {
    pub nflog_group: u16,
    /// `Some(port)`: install the DNS redirect (TPROXY to 127.0.0.1/::1).
    pub dns_proxy_port: Option<u16>,
    /// `Some(port)`: install the L7 redirect (TPROXY to 127.0.0.1/::1).
    pub l7_proxy_port: Option<u16>,
    /// Mark bit(s) set on redirected DNS (policy routing delivers it locally).
    pub tproxy_mark: u32,
}

/// Our chains, for flush/delete.
pub fn chains(s: &Structure) -> Vec<String> {
    let mut out = vec![
        FORWARD_CHAIN.to_string(),
        INPUT_CHAIN.to_string(),
        PROXIED_CHAIN.to_string(),
    ];
    for fam in [Family::V4, Family::V6] {
        for dir in [Direction::Egress, Direction::Ingress] {
            out.push(check_chain(dir, fam));
        }
    }
    if s.dns_proxy_port.is_some() {
        out.push(DNS_CHAIN.to_string());
        out.extend([Family::V4, Family::V6].map(dns_tproxy_chain));
    }
    if s.l7_proxy_port.is_some() {
        out.push(L7_CHAIN.to_string());
        out.extend(l7_tproxy_chains());
    }
    out
}

fn l7_tproxy_chains() -> impl Iterator<Item = String> {
    [Family::V4, Family::V6]
        .into_iter()
        .flat_map(|f| [Direction::Egress, Direction::Ingress].map(move |d| l7_tproxy_chain(d, f)))
}

/// The mask a per-prefix set's rule applies to the peer address.
fn prefix_mask(len: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0))
}

/// The port mask of a block of 2^bits ports (bits ≤ 16).
pub fn block_mask(bits: u8) -> u16 {
    u16::MAX.checked_shl(u32::from(bits)).unwrap_or(0)
}

/// Our sets (element sets, every possible per-prefix set, drop counters).
pub fn set_names() -> Vec<String> {
    let mut out: Vec<String> = SetId::all()
        .into_iter()
        .chain(SetId::prefix_sets())
        .map(SetId::name)
        .collect();
    for fam in [Family::V4, Family::V6] {
        for dir in [Direction::Egress, Direction::Ingress] {
            out.push(drops_set(dir, fam));
        }
    }
    out
}

fn check_rules(
    out: &mut String,
    dir: Direction,
    fam: Family,
    group: u16,
    prefix_sets: &BTreeSet<SetId>,
) {
    let p = fam.nft_payload();
    let (local, peer) = (dir.local_field(), dir.peer_field());
    let pair = format!("{p} {local} . {p} {peer}");
    let quad = format!("{pair} . meta l4proto . th dport");
    let mut sets: Vec<(SetId, String)> = vec![
        (SetId::Any(dir, fam), pair.clone()),
        (SetId::Port(dir, fam), quad.clone()),
    ];
    if dir == Direction::Egress {
        sets.push((SetId::FqdnAny(fam), pair.clone()));
        sets.push((SetId::FqdnPort(fam), quad.clone()));
    }
    // Per-prefix hash sets in use, longest prefix first (any order would
    // do: every lookup only ever returns).
    let mut prefixed: Vec<SetId> = prefix_sets
        .iter()
        .copied()
        .filter(|s| s.family() == fam && s.prefix().is_some_and(|(d, _)| d == dir))
        .collect();
    prefixed.sort_by_key(|s| {
        let len = s.prefix().map_or(0, |(_, len)| len);
        (
            std::cmp::Reverse(len),
            s.shape() == Shape::Quad,
            s.port_bits(),
        )
    });
    for set in prefixed {
        let len = set.prefix().map_or(0, |(_, len)| len);
        let masked = format!("{p} {local} . {p} {peer} & {}", prefix_mask(len));
        let key = match (set.shape(), set.port_bits()) {
            (Shape::Quad, Some(bits)) => format!(
                "{masked} . meta l4proto . th dport & {:#06x}",
                block_mask(bits)
            ),
            (Shape::Quad, None) => format!("{masked} . meta l4proto . th dport"),
            _ => masked,
        };
        sets.push((set, key));
    }
    // Interval (pipapo) lookups last: they are the only ones whose cost
    // grows with their contents.
    sets.push((SetId::NetAny(dir, fam), pair.clone()));
    sets.push((SetId::Range(dir, fam), quad.clone()));
    if dir == Direction::Egress {
        sets.push((SetId::FqdnRange(fam), quad));
    }
    let _ = writeln!(out, "  chain {} {{", check_chain(dir, fam));
    for (set, key) in sets {
        let _ = writeln!(out, "    {key} @{} return", set.name());
    }
    // Separate rules: if the counter set is full the update fails and ends
    // its rule, which must never skip the drop.
    let _ = writeln!(
        out,
        "    update @{} {{ {p} {local} counter }}",
        drops_set(dir, fam)
    );
    let _ = writeln!(
        out,
        "    log prefix \"{NFLOG_PREFIX}{}\" group {group}",
        dir.as_str()
    );
    let _ = writeln!(out, "    counter drop");
    let _ = writeln!(out, "  }}");
}

/// The whole policy structure as one `nft -f` transaction: create what is
/// missing (sets keep their elements), then replace the rules of our
/// chains, with one lookup per set of `prefix_sets` (the per-prefix sets
/// in use; [`SetId::prefix_sets`]). Strict mode's chain and sets are not
/// mentioned. The transaction is atomic: packets see the old rules or the
/// new ones, so rewriting it to add or drop a prefix length opens no gap.
pub fn structure_ruleset(s: &Structure, prefix_sets: &BTreeSet<SetId>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "table inet {TABLE} {{");
    for set in SetId::all()
        .into_iter()
        .chain(prefix_sets.iter().copied().filter(|s| s.prefix().is_some()))
    {
        let _ = writeln!(out, "  {}", set.declaration());
    }
    for fam in [Family::V4, Family::V6] {
        for dir in [Direction::Egress, Direction::Ingress] {
            let _ = writeln!(
                out,
                "  set {} {{ type {}; size 65536; flags dynamic,timeout; timeout {DROP_COUNTER_TIMEOUT}; }}",
                drops_set(dir, fam),
                fam.nft_addr_type()
            );
        }
    }
    let prio = POLICY_PRIORITY;
    let _ = writeln!(
        out,
        "  chain {FORWARD_CHAIN} {{ type filter hook forward priority {prio}; policy accept; }}"
    );
    let _ = writeln!(
        out,
        "  chain {INPUT_CHAIN} {{ type filter hook input priority {prio}; policy accept; }}"
    );
    let _ = writeln!(out, "  chain {PROXIED_CHAIN} {{ }}");
    for fam in [Family::V4, Family::V6] {
        for dir in [Direction::Egress, Direction::Ingress] {
            let _ = writeln!(out, "  chain {} {{ }}", check_chain(dir, fam));
        }
    }
    if s.dns_proxy_port.is_some() {
        let _ = writeln!(
            out,
            "  chain {DNS_CHAIN} {{ type filter hook prerouting priority mangle; policy accept; }}"
        );
        for fam in [Family::V4, Family::V6] {
            let _ = writeln!(out, "  chain {} {{ }}", dns_tproxy_chain(fam));
        }
    }
    if s.l7_proxy_port.is_some() {
        let _ = writeln!(
            out,
            "  chain {L7_CHAIN} {{ type filter hook prerouting priority {L7_PRIORITY}; policy accept; }}"
        );
        for chain in l7_tproxy_chains() {
            let _ = writeln!(out, "  chain {chain} {{ }}");
        }
    }
    let _ = writeln!(out, "}}");
    for chain in chains(s) {
        let _ = writeln!(out, "flush chain inet {TABLE} {chain}");
    }

    let _ = writeln!(out, "table inet {TABLE} {{");
    // Forward: replies and related first, then the source's egress and the
    // destination's ingress (a pod-to-pod packet on one node passes both).
    let _ = writeln!(out, "  chain {FORWARD_CHAIN} {{");
    let _ = writeln!(out, "    ct state established,related accept");
    isolation_jumps(&mut out);
    let _ = writeln!(out, "  }}");
    // Input: a pod talking to its node is egress too. Redirected packets
    // (marked) go to their own chain; neighbour discovery and multicast are
    // link plumbing, not traffic a policy speaks about.
    let mark = s.tproxy_mark;
    let _ = writeln!(out, "  chain {INPUT_CHAIN} {{");
    let _ = writeln!(out, "    ct state established,related accept");
    let _ = writeln!(
        out,
        "    meta mark & {mark:#010x} == {mark:#010x} jump {PROXIED_CHAIN}"
    );
    let _ = writeln!(out, "    meta pkttype != host accept");
    let _ = writeln!(
        out,
        "    icmpv6 type {{ nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, mld2-listener-report, mld-listener-done }} accept"
    );
    for fam in [Family::V4, Family::V6] {
        let _ = writeln!(
            out,
            "    {} saddr @{} jump {}",
            fam.nft_payload(),
            SetId::Isolated(Direction::Egress, fam).name(),
            check_chain(Direction::Egress, fam)
        );
    }
    let _ = writeln!(out, "  }}");
    // Redirected DNS is the DNS proxy's to judge. Anything else redirected
    // (L7) arrives here instead of the forward hook, with its original
    // destination: it must pass the source's egress and the destination's
    // ingress as forwarded traffic would; what passes is accepted (the
    // destination address is not the node's own).
    let _ = writeln!(out, "  chain {PROXIED_CHAIN} {{");
    for fam in [Family::V4, Family::V6] {
        let _ = writeln!(
            out,
            "    {} saddr @{} meta l4proto {{ tcp, udp }} th dport 53 accept",
            fam.nft_payload(),
            SetId::DnsRedirect(fam).name(),
        );
    }
    isolation_jumps(&mut out);
    let _ = writeln!(out, "    accept");
    let _ = writeln!(out, "  }}");
    for fam in [Family::V4, Family::V6] {
        for dir in [Direction::Egress, Direction::Ingress] {
            check_rules(&mut out, dir, fam, s.nflog_group, prefix_sets);
        }
    }
    let group = s.nflog_group;
    if let Some(port) = s.dns_proxy_port {
        // One lookup of the redirect set per packet: a match goes to the
        // family's chain, which TPROXYs and, failing that, fails closed.
        let _ = writeln!(out, "  chain {DNS_CHAIN} {{");
        for fam in [Family::V4, Family::V6] {
            let _ = writeln!(
                out,
                "    {} saddr @{} meta l4proto {{ tcp, udp }} th dport 53 goto {}",
                fam.nft_payload(),
                SetId::DnsRedirect(fam).name(),
                dns_tproxy_chain(fam),
            );
        }
        let _ = writeln!(out, "  }}");
        for fam in [Family::V4, Family::V6] {
            // Fail closed: when TPROXY finds no socket (the proxy does not
            // listen on that family's loopback, or is between restarts with
            // no keeper holding its sockets) the expression breaks and the
            // rule does not match, but the mark it set first stays: the
            // policy routing would deliver the query locally, where a
            // socket on the node's wildcard address and port 53 (a
            // node-local resolver) would take it past the DNS rules and the
            // learning. Logged (a flow event) and refused instead.
            //
            // TCP gets a reset: the client fails at once rather than
            // retransmitting its SYN into nothing. UDP is dropped, as
            // Cilium and Calico drop what they deny: the usual cause is an
            // agent restart, which the resolver's retry (glibc: after 5 s)
            // rides through, while an ICMP port unreachable would fail the
            // lookup at once for a pod with one nameserver (Kubernetes'
            // cluster DNS), the usual case, gaining nothing from "try the
            // next server".
            //
            // nft takes TPROXY only with a transport protocol match in
            // the rule: the `meta l4proto` repeats the caller's.
            let log = format!("log prefix \"{NFLOG_DNS_PROXY_PREFIX}\" group {group}");
            let _ = writeln!(out, "  chain {} {{", dns_tproxy_chain(fam));
            let _ = writeln!(
                out,
                "    meta l4proto {{ tcp, udp }} meta mark set meta mark | {mark:#010x} tproxy {} accept",
                tproxy_to(fam, port)
            );
            let _ = writeln!(
                out,
                "    meta l4proto tcp counter {log} reject with tcp reset"
            );
            let _ = writeln!(out, "    counter {log} drop");
            let _ = writeln!(out, "  }}");
        }
    }
    if let Some(port) = s.l7_proxy_port {
        // Only the original direction: a pod serving on an L7 port answers
        // from it and must not be redirected. A packet the DNS chain took
        // (marked) is left alone.
        // Packets of a connection a local transparent socket holds (the
        // proxy's accepted connections, and replies to its onward
        // connections made from the client's address) are marked and so
        // delivered to it by the policy routing, not forwarded.
        let _ = writeln!(out, "  chain {L7_CHAIN} {{");
        let _ = writeln!(out, "    meta mark & {mark:#010x} == {mark:#010x} return");
        // The node's own packets to its own addresses (the proxy's onward
        // connections among them) come back in on lo: never a pod's, and
        // redirecting them would loop the proxy into itself.
        let _ = writeln!(out, "    iifname \"lo\" return");
        let _ = writeln!(
            out,
            "    meta l4proto tcp socket transparent 1 meta mark set meta mark | {mark:#010x} accept"
        );
        // One lookup of each L7 set per packet: a match goes to the
        // (family, direction)'s chain.
        for fam in [Family::V4, Family::V6] {
            for dir in [Direction::Egress, Direction::Ingress] {
                let _ = writeln!(
                    out,
                    "    meta l4proto tcp ct direction original {} {} . tcp dport @{} goto {}",
                    fam.nft_payload(),
                    dir.local_field(),
                    SetId::L7(dir, fam).name(),
                    l7_tproxy_chain(dir, fam),
                );
            }
        }
        let _ = writeln!(out, "  }}");
        for fam in [Family::V4, Family::V6] {
            for dir in [Direction::Egress, Direction::Ingress] {
                // Fail closed, as for DNS: with no proxy socket (no [::1]
                // listener, or between restarts) the mark set before
                // TPROXY broke off would route the connection locally, to
                // whatever node socket holds that port on the wildcard
                // address, past the HTTP rules. Logged and reset: a new
                // connection is refused at once, and one that predates the
                // port's L7 rules ends instead of hanging.
                let _ = writeln!(out, "  chain {} {{", l7_tproxy_chain(dir, fam));
                let _ = writeln!(
                    out,
                    "    meta l4proto tcp meta mark set meta mark | {mark:#010x} tproxy {} accept",
                    tproxy_to(fam, port)
                );
                let _ = writeln!(
                    out,
                    "    meta l4proto tcp counter log prefix \"{NFLOG_L7_PROXY_PREFIX} {}\" group {group} reject with tcp reset",
                    dir.as_str()
                );
                let _ = writeln!(out, "  }}");
            }
        }
    }
    let _ = writeln!(out, "}}");
    out
}

/// TPROXY's target on the proxy's loopback listener of `fam`.
fn tproxy_to(fam: Family, port: u16) -> String {
    match fam {
        Family::V4 => format!("ip to 127.0.0.1:{port}"),
        Family::V6 => format!("ip6 to [::1]:{port}"),
    }
}

/// Removes our chains and sets (when their definitions changed, e.g. after
/// an upgrade), given what exists now; followed by [`structure_ruleset`]
/// in the same transaction.
pub fn teardown(existing_chains: &[String], existing_sets: &[String]) -> String {
    let mut out = String::new();
    let ours_chains = [
        FORWARD_CHAIN,
        INPUT_CHAIN,
        DNS_CHAIN,
        L7_CHAIN,
        PROXIED_CHAIN,
    ]
    .into_iter()
    .map(str::to_string)
    .chain(
        [Family::V4, Family::V6]
            .into_iter()
            .flat_map(|f| [Direction::Egress, Direction::Ingress].map(|d| check_chain(d, f))),
    )
    .chain([Family::V4, Family::V6].map(dns_tproxy_chain))
    .chain(l7_tproxy_chains())
    .collect::<Vec<_>>();
    let chains: Vec<&String> = ours_chains
        .iter()
        .filter(|c| existing_chains.contains(c))
        .collect();
    // Rules go first (they reference chains and sets), then chains, then sets.
    for c in &chains {
        let _ = writeln!(out, "flush chain inet {TABLE} {c}");
    }
    for c in &chains {
        let _ = writeln!(out, "delete chain inet {TABLE} {c}");
    }
    for s in set_names() {
        if existing_sets.contains(&s) {
            let _ = writeln!(out, "delete set inet {TABLE} {s}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn structure() -> Structure {
        Structure {
            nflog_group: 109,
            dns_proxy_port: Some(5353),
            l7_proxy_port: Some(15001),
            tproxy_mark: 0x0040_0000,
        }
    }

    #[test]
    fn names_are_unique_and_readable() {
        let names = set_names();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        assert!(names.contains(&"egress4_fqdn_range".to_string()));
        assert!(names.contains(&"ingress6_isolated".to_string()));
        assert!(names.contains(&"dns_redirect4".to_string()));
        assert!(names.contains(&"ingress4_drops".to_string()));
        // Kernel limit for set names (NFT_SET_MAXNAMELEN) is 256; stay short.
        assert!(names.iter().all(|n| n.len() < 32));
    }

    #[test]
    fn structure_has_fixed_lookups_per_direction() {
        let text = structure_ruleset(&structure(), &BTreeSet::new());
        // Established first in both hooks.
        for chain in [FORWARD_CHAIN, INPUT_CHAIN] {
            let body = text
                .split(&format!("chain {chain} {{\n"))
                .nth(1)
                .unwrap_or_else(|| panic!("{chain} body missing:\n{text}"));
            assert!(
                body.starts_with("    ct state established,related accept"),
                "{body}"
            );
        }
        // 7 lookups per egress chain, 4 per ingress chain, with no per-prefix set.
        let egress = text.split("chain egress4 {\n").nth(1).unwrap();
        let egress = egress.split("  }").next().unwrap();
        assert_eq!(egress.matches(" return").count(), 7, "{egress}");
        let ingress = text.split("chain ingress6 {\n").nth(1).unwrap();
        let ingress = ingress.split("  }").next().unwrap();
        assert_eq!(ingress.matches(" return").count(), 4, "{ingress}");
        assert!(ingress.contains("ip6 daddr . ip6 saddr . meta l4proto . th dport @ingress6_port"));
        assert!(text.contains("log prefix \"meshward-drop egress\" group 109"));
        assert!(text.contains("tproxy ip to 127.0.0.1:5353"));
        assert!(text.contains("meta mark set meta mark | 0x00400000"));
        assert!(!text.contains(crate::STRICT_CHAIN));
    }

    #[test]
    fn prefix_sets_get_one_masked_lookup_each() {
        let prefix: BTreeSet<SetId> = [
            SetId::PrefixAny(Direction::Egress, Family::V4, 24),
            SetId::PrefixPort(Direction::Egress, Family::V4, 24),
            SetId::PrefixPort(Direction::Egress, Family::V4, 0),
            SetId::PrefixAny(Direction::Ingress, Family::V4, 16),
        ]
        .into();
        let text = structure_ruleset(&structure(), &prefix);
        assert!(text.contains("set egress4_p24_any { type ipv4_addr . ipv4_addr; }"));
        assert!(text.contains(
            "set egress4_p0_port { type ipv4_addr . ipv4_addr . inet_proto . inet_service; }"
        ));
        let egress = text.split("chain egress4 {\n").nth(1).unwrap();
        let egress = egress.split("  }").next().unwrap();
        assert_eq!(egress.matches(" return").count(), 7 + 3, "{egress}");
        assert!(egress.contains("ip saddr . ip daddr & 255.255.255.0 @egress4_p24_any return"));
        assert!(egress.contains(
            "ip saddr . ip daddr & 0.0.0.0 . meta l4proto . th dport @egress4_p0_port return"
        ));
        // Hash lookups before the interval ones, drop last.
        let at = |s: &str| egress.find(s).unwrap();
        assert!(at("@egress4_p0_port") < at("@egress4_net_any"));
        assert!(at("@egress4_fqdn_range") < at("counter drop"));
        let ingress = text.split("chain ingress4 {\n").nth(1).unwrap();
        let ingress = ingress.split("  }").next().unwrap();
        assert!(ingress.contains("ip daddr . ip saddr & 255.255.0.0 @ingress4_p16_any return"));
        assert_eq!(ingress.matches(" return").count(), 5, "{ingress}");
        assert!(!text.contains("6_p24") && !text.contains("6_p0"));
        assert_eq!(prefix_mask(31), Ipv4Addr::new(255, 255, 255, 254));
        assert_eq!(prefix_mask(1), Ipv4Addr::new(128, 0, 0, 0));
        for set in SetId::prefix_sets() {
            assert_eq!(SetId::prefix_set_named(&set.name()), Some(set));
        }
        assert_eq!(SetId::prefix_set_named("egress4_any"), None);
    }

    #[test]
    fn l7_redirect_and_proxied_checks() {
        let text = structure_ruleset(&structure(), &BTreeSet::new());
        assert!(text.contains("set l7_egress4 { type ipv4_addr . inet_service; }"));
        assert!(text.contains("set l7_ingress6 { type ipv6_addr . inet_service; }"));
        assert!(text.contains(&format!(
            "chain {L7_CHAIN} {{ type filter hook prerouting priority -99;"
        )));
        let l7 = text
            .split(&format!("chain {L7_CHAIN} {{\n"))
            .nth(1)
            .unwrap();
        let l7 = l7.split("  }").next().unwrap();
        assert!(
            l7.starts_with(
                "    meta mark & 0x00400000 == 0x00400000 return\n    iifname \"lo\" return\n    meta l4proto tcp socket transparent 1 meta mark set meta mark | 0x00400000 accept\n"
            ),
            "{l7}"
        );
        // One lookup per (family, direction): a match goes to its chain,
        // nothing after it in this chain sees the packet.
        let lines: Vec<&str> = l7.lines().map(str::trim).collect();
        assert_eq!(
            lines[3..],
            [
                "meta l4proto tcp ct direction original ip saddr . tcp dport @l7_egress4 goto l7_tproxy_egress4",
                "meta l4proto tcp ct direction original ip daddr . tcp dport @l7_ingress4 goto l7_tproxy_ingress4",
                "meta l4proto tcp ct direction original ip6 saddr . tcp dport @l7_egress6 goto l7_tproxy_egress6",
                "meta l4proto tcp ct direction original ip6 daddr . tcp dport @l7_ingress6 goto l7_tproxy_ingress6",
            ],
            "{l7}"
        );
        assert_eq!(l7.matches(" @l7_").count(), 4, "{l7}");
        // Each of those: TPROXY, then a logged reset of what it did not take.
        for (chain, to, log) in [
            ("l7_tproxy_egress4", "ip to 127.0.0.1:15001", "egress"),
            ("l7_tproxy_ingress4", "ip to 127.0.0.1:15001", "ingress"),
            ("l7_tproxy_egress6", "ip6 to [::1]:15001", "egress"),
            ("l7_tproxy_ingress6", "ip6 to [::1]:15001", "ingress"),
        ] {
            assert!(chains(&structure()).contains(&chain.to_string()));
            let body = chain_body(&text, chain);
            assert_eq!(
                body,
                [
                    format!("meta l4proto tcp meta mark set meta mark | 0x00400000 tproxy {to} accept"),
                    format!("meta l4proto tcp counter log prefix \"meshward-drop l7-proxy {log}\" group 109 reject with tcp reset"),
                ],
                "{chain}"
            );
            assert!(
                text.contains(&format!("  chain {chain} {{ }}\n")),
                "declared"
            );
        }
        // Marked packets are no longer accepted blindly: DNS passes, the
        // rest is checked on egress (source) and ingress (destination).
        let input = text
            .split(&format!("chain {INPUT_CHAIN} {{\n"))
            .nth(1)
            .unwrap();
        let input = input.split("  }").next().unwrap();
        assert!(input.contains("meta mark & 0x00400000 == 0x00400000 jump policy_proxied"));
        assert!(!input.contains("0x00400000 accept"), "{input}");
        let proxied = text
            .split(&format!("chain {PROXIED_CHAIN} {{\n"))
            .nth(1)
            .unwrap();
        let proxied = proxied.split("  }").next().unwrap();
        let lines: Vec<&str> = proxied.lines().map(str::trim).collect();
        assert_eq!(
            lines,
            vec![
                "ip saddr @dns_redirect4 meta l4proto { tcp, udp } th dport 53 accept",
                "ip6 saddr @dns_redirect6 meta l4proto { tcp, udp } th dport 53 accept",
                "ip saddr @egress4_isolated jump egress4",
                "ip6 saddr @egress6_isolated jump egress6",
                "ip daddr @ingress4_isolated jump ingress4",
                "ip6 daddr @ingress6_isolated jump ingress6",
                "accept",
            ]
        );
        let mut s = structure();
        s.l7_proxy_port = None;
        let text = structure_ruleset(&s, &BTreeSet::new());
        assert!(!text.contains(L7_CHAIN));
        assert!(!text.contains("l7_tproxy"));
        assert!(!chains(&s).contains(&L7_CHAIN.to_string()));
        assert!(!chains(&s).iter().any(|c| c.starts_with("l7_tproxy")));
        assert!(text.contains(PROXIED_CHAIN));
    }

    /// The rules of regular chain `chain` in a ruleset, trimmed.
    fn chain_body(text: &str, chain: &str) -> Vec<String> {
        let body = text
            .split(&format!("  chain {chain} {{\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("{chain} missing:\n{text}"));
        let body = body.split("  }").next().unwrap();
        body.lines().map(|l| l.trim().to_string()).collect()
    }

    #[test]
    fn dns_chain_looks_up_once_and_fails_closed_with_a_log() {
        let text = structure_ruleset(&structure(), &BTreeSet::new());
        assert_eq!(
            chain_body(&text, DNS_CHAIN),
            [
                "ip saddr @dns_redirect4 meta l4proto { tcp, udp } th dport 53 goto dns_tproxy4",
                "ip6 saddr @dns_redirect6 meta l4proto { tcp, udp } th dport 53 goto dns_tproxy6",
            ]
        );
        for (chain, to) in [
            ("dns_tproxy4", "ip to 127.0.0.1:5353"),
            ("dns_tproxy6", "ip6 to [::1]:5353"),
        ] {
            assert!(chains(&structure()).contains(&chain.to_string()));
            assert!(
                text.contains(&format!("  chain {chain} {{ }}\n")),
                "declared"
            );
            assert_eq!(
                chain_body(&text, chain),
                [
                    format!("meta l4proto {{ tcp, udp }} meta mark set meta mark | 0x00400000 tproxy {to} accept"),
                    "meta l4proto tcp counter log prefix \"meshward-drop dns-proxy\" group 109 reject with tcp reset".to_string(),
                    "counter log prefix \"meshward-drop dns-proxy\" group 109 drop".to_string(),
                ],
                "{chain}"
            );
        }
        // The fail-closed chains are flushed with the others (a rewrite
        // never doubles their rules) and torn down with them.
        for chain in [
            "dns_tproxy4",
            "dns_tproxy6",
            "l7_tproxy_egress4",
            "l7_tproxy_ingress6",
        ] {
            assert!(
                text.contains(&format!("flush chain inet meshward {chain}\n")),
                "{chain}"
            );
            let down = teardown(&[chain.to_string()], &[]);
            assert_eq!(
                down,
                format!("flush chain inet meshward {chain}\ndelete chain inet meshward {chain}\n")
            );
        }
    }

    #[test]
    fn dns_chain_only_with_a_port() {
        let mut s = structure();
        s.dns_proxy_port = None;
        let text = structure_ruleset(&s, &BTreeSet::new());
        assert!(!text.contains(DNS_CHAIN));
        assert!(!text.contains("dns_tproxy"));
        assert!(!chains(&s).contains(&DNS_CHAIN.to_string()));
        assert!(!chains(&s).iter().any(|c| c.starts_with("dns_tproxy")));
    }

    #[test]
    fn teardown_mentions_only_what_exists() {
        let text = teardown(
            &["policy_forward".into(), "strict_forward".into()],
            &["egress4_any".into(), "strict_local_pods".into()],
        );
        assert!(text.contains("delete chain inet meshward policy_forward"));
        assert!(text.contains("delete set inet meshward egress4_any"));
        assert!(!text.contains("strict"));
        assert!(!text.contains("egress6"));
    }
}
