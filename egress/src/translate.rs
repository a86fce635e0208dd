//! Desired state: compiled policy ([`NodeRules`]) and learned FQDN peers
//! turned into the set elements the kernel should hold. Pure.
//!
//! IPv4 CIDR peers go to per-prefix-length hash sets (the network address
//! as key; the rule masks the packet's address), with port ranges of up to
//! [`EXPAND_PORTS_MAX`] ports expanded into single ports; exact peers with
//! such ranges likewise go to the exact hash set. Wider ranges of IPv4
//! peers (exact or CIDR) are split into aligned port blocks: blocks of 64
//! ports or more go to port-block hash sets (`SetId::PrefixBlock`, the rule
//! masks the port too), smaller edge blocks become single ports. What is
//! left for the interval sets: IPv6 CIDR peers and IPv6 port ranges.
//!
//! Interval (pipapo) sets refuse partially overlapping elements, so every
//! interval set gets disjoint elements: CIDR peers with every protocol are
//! merged into disjoint address ranges; CIDR peers or port ranges per
//! (local address, protocol) are swept along the port axis into elementary
//! port intervals, each with the merged address ranges of the rules covering
//! it, and neighbouring intervals with the same ranges are joined again.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use meshward_policy::{DirectionRules, NodeRules, PortMatch};

use crate::layout::Shape;
use crate::layout::{Direction, Family, SetId, BLOCK_BITS};
use crate::EgressError;

/// One element of one set. Field order is the key order in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Elem {
    Addr(IpAddr),
    /// `local . port` (TCP port of the L7 redirect sets).
    AddrPort {
        local: IpAddr,
        port: u16,
    },
    Pair {
        local: IpAddr,
        peer: IpAddr,
    },
    /// `local . first-last` (inclusive).
    PairRange {
        local: IpAddr,
        peer: (IpAddr, IpAddr),
    },
    Port {
        local: IpAddr,
        peer: IpAddr,
        proto: u8,
        port: u16,
    },
    PortRange {
        local: IpAddr,
        peer: (IpAddr, IpAddr),
        proto: u8,
        ports: (u16, u16),
    },
}

/// A learned (toFQDNs) peer of a local endpoint, allowed until `timeout`
/// from now (the DNS TTL, after the caller's floor and caps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FqdnElement {
    /// The local pod that resolved the name.
    pub src: IpAddr,
    /// An address of the answer.
    pub dst: IpAddr,
    pub ports: PortMatch,
    pub timeout: Duration,
}

/// Everything the policy sets should hold.
#[derive(Clone, Debug, Default)]
pub struct PolicyState {
    pub rules: NodeRules,
    /// Every learned peer that should stay allowed (replaces what
    /// [`crate::PolicyTables::add_fqdn`] added before).
    pub fqdn: Vec<FqdnElement>,
}

/// Set contents: element → expiry (`None`: permanent).
pub type Contents = BTreeMap<Elem, Option<Instant>>;
/// Contents of every set.
pub type Desired = BTreeMap<SetId, Contents>;

/// Port ranges of at most this many ports become single-port hash elements
/// (per-packet cost independent of the number of policies, at the price of
/// one element per port); wider ones stay port-range elements of the
/// interval set.
pub const EXPAND_PORTS_MAX: u32 = 64;

/// The kernel's `timeout 0` means "never expires": the shortest real
/// timeout is one millisecond.
const MIN_TIMEOUT: Duration = Duration::from_millis(1);
/// Longer than any DNS TTL (2^31 s) and far from the kernel's limit.
const MAX_TIMEOUT: Duration = Duration::from_secs(1 << 31);

pub(crate) fn expiry(now: Instant, timeout: Duration) -> Instant {
    now + timeout.clamp(MIN_TIMEOUT, MAX_TIMEOUT)
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(fam: Family, v: u128) -> IpAddr {
    match fam {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

fn net_range(net: &IpNet) -> (u128, u128) {
    (to_u128(net.network()), to_u128(net.broadcast()))
}

fn is_host(net: &IpNet) -> bool {
    net.prefix_len() == net.max_prefix_len()
}

/// An inclusive address range (addresses as integers).
type AddrRange = (u128, u128);
/// An address range on an inclusive port range.
type Rect = (AddrRange, (u16, u16));

/// Sorted, disjoint, non-adjacent union of inclusive ranges.
pub(crate) fn merge_ranges(mut ranges: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    ranges.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// Disjoint rectangles (address range × port range) covering exactly the
/// union of `rects`.
pub(crate) fn disjoint_rects(rects: &[Rect]) -> Vec<Rect> {
    let mut bounds: Vec<u32> = rects
        .iter()
        .flat_map(|(_, (lo, hi))| [u32::from(*lo), u32::from(*hi) + 1])
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut out = Vec::new();
    // (port interval, merged address ranges) of the previous slab, to join
    // neighbours with the same ranges.
    let mut open: Option<((u32, u32), Vec<AddrRange>)> = None;
    for w in bounds.windows(2) {
        let (lo, hi) = (w[0], w[1] - 1);
        let covering: Vec<(u128, u128)> = rects
            .iter()
            .filter(|(_, (plo, phi))| u32::from(*plo) <= lo && u32::from(*phi) >= hi)
            .map(|(ips, _)| *ips)
            .collect();
        let merged = merge_ranges(covering);
        match &mut open {
            Some(((_, ohi), oranges)) if *ohi + 1 == lo && *oranges == merged => *ohi = hi,
            _ => {
                if let Some(((olo, ohi), oranges)) = open.take() {
                    emit(&mut out, (olo, ohi), oranges);
                }
                open = Some(((lo, hi), merged));
            }
        }
    }
    if let Some((ports, ranges)) = open {
        emit(&mut out, ports, ranges);
    }
    out
}

fn emit(out: &mut Vec<Rect>, ports: (u32, u32), ranges: Vec<AddrRange>) {
    for r in ranges {
        out.push((r, (ports.0 as u16, ports.1 as u16)));
    }
}

/// Disjoint port pieces with, for each port, the latest expiry of the
/// pieces covering it; neighbours with equal expiry joined.
pub(crate) fn normalize_ports<T: Ord + Copy>(pieces: &[(u16, u16, T)]) -> Vec<(u16, u16, T)> {
    let mut bounds: Vec<u32> = pieces
        .iter()
        .flat_map(|(lo, hi, _)| [u32::from(*lo), u32::from(*hi) + 1])
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut out: Vec<(u16, u16, T)> = Vec::new();
    for w in bounds.windows(2) {
        let (lo, hi) = (w[0], w[1] - 1);
        let best = pieces
            .iter()
            .filter(|(plo, phi, _)| u32::from(*plo) <= lo && u32::from(*phi) >= hi)
            .map(|(_, _, t)| *t)
            .max();
        let Some(t) = best else { continue };
        match out.last_mut() {
            Some(last) if u32::from(last.1) + 1 == lo && last.2 == t => last.1 = hi as u16,
            _ => out.push((lo as u16, hi as u16, t)),
        }
    }
    out
}

fn insert_max(contents: &mut Contents, elem: Elem, expiry: Option<Instant>) {
    let slot = contents.entry(elem).or_insert(expiry);
    if let (Some(old), Some(new)) = (*slot, expiry) {
        *slot = Some(old.max(new));
    }
}

/// Where a peer network's hash elements go: the exact sets for hosts, the
/// per-prefix sets for IPv4 networks; `None`: interval sets.
fn hash_sets(dir: Direction, net: &IpNet) -> Option<(SetId, SetId)> {
    let fam = Family::of(&net.addr());
    if is_host(net) {
        Some((SetId::Any(dir, fam), SetId::Port(dir, fam)))
    } else if fam == Family::V4 {
        let len = net.prefix_len();
        Some((
            SetId::PrefixAny(dir, fam, len),
            SetId::PrefixPort(dir, fam, len),
        ))
    } else {
        None
    }
}

fn add_direction(desired: &mut Desired, dir: Direction, local: IpAddr, rules: &DirectionRules) {
    let fam = Family::of(&local);
    desired
        .entry(SetId::Isolated(dir, fam))
        .or_default()
        .insert(Elem::Addr(local), None);
    let mut any_ranges = Vec::new();
    let mut rects: BTreeMap<u8, Vec<Rect>> = BTreeMap::new();
    for allow in &rules.allow {
        for net in allow.nets.iter().filter(|n| Family::of(&n.addr()) == fam) {
            let net = net.trunc();
            let peer = net.addr();
            let hashed = hash_sets(dir, &net);
            for port in &allow.ports {
                match (*port, hashed) {
                    (PortMatch::Any, Some((any, _))) => {
                        desired
                            .entry(any)
                            .or_default()
                            .insert(Elem::Pair { local, peer }, None);
                    }
                    (PortMatch::Any, None) => any_ranges.push(net_range(&net)),
                    (
                        PortMatch::Ports {
                            protocol,
                            first,
                            last,
                        },
                        hashed,
                    ) => {
                        if first > last {
                            continue; // admits nothing
                        }
                        let count = u32::from(last) - u32::from(first) + 1;
                        let proto = protocol.number();
                        if let (Some((_, port_set)), true) = (hashed, count <= EXPAND_PORTS_MAX) {
                            let set = desired.entry(port_set).or_default();
                            for port in first..=last {
                                set.insert(
                                    Elem::Port {
                                        local,
                                        peer,
                                        proto,
                                        port,
                                    },
                                    None,
                                );
                            }
                        } else if let (Some((_, port_set)), Family::V4) = (hashed, fam) {
                            // Aligned blocks: the big ones in port-block
                            // sets, the edges as single ports.
                            let len = net.prefix_len();
                            for (base, bits) in aligned_blocks(first, last) {
                                if BLOCK_BITS.contains(&bits) {
                                    desired
                                        .entry(SetId::PrefixBlock(dir, fam, len, bits))
                                        .or_default()
                                        .insert(
                                            Elem::Port {
                                                local,
                                                peer,
                                                proto,
                                                port: base,
                                            },
                                            None,
                                        );
                                } else {
                                    let set = desired.entry(port_set).or_default();
                                    let end = u32::from(base) + (1u32 << bits) - 1;
                                    for port in u32::from(base)..=end {
                                        set.insert(
                                            Elem::Port {
                                                local,
                                                peer,
                                                proto,
                                                port: port as u16,
                                            },
                                            None,
                                        );
                                    }
                                }
                            }
                        } else {
                            rects
                                .entry(protocol.number())
                                .or_default()
                                .push((net_range(&net), (first, last)));
                        }
                    }
                }
            }
        }
    }
    for (lo, hi) in merge_ranges(any_ranges) {
        desired.entry(SetId::NetAny(dir, fam)).or_default().insert(
            Elem::PairRange {
                local,
                peer: (from_u128(fam, lo), from_u128(fam, hi)),
            },
            None,
        );
    }
    for (proto, rs) in rects {
        for ((lo, hi), ports) in disjoint_rects(&rs) {
            desired.entry(SetId::Range(dir, fam)).or_default().insert(
                Elem::PortRange {
                    local,
                    peer: (from_u128(fam, lo), from_u128(fam, hi)),
                    proto,
                    ports,
                },
                None,
            );
        }
    }
}

/// `first..=last` as the fewest aligned blocks: (base, log2 size), each
/// base a multiple of its size. At most two blocks per size.
pub(crate) fn aligned_blocks(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    while lo <= hi {
        let mut bits = lo.trailing_zeros().min(16);
        while lo + (1 << bits) - 1 > hi {
            bits -= 1;
        }
        out.push((lo as u16, bits as u8));
        lo += 1 << bits;
    }
    out
}

/// Checks an FQDN element's addresses and returns its family.
pub(crate) fn check_fqdn(e: &FqdnElement) -> Result<Family, EgressError> {
    let fam = Family::of(&e.src);
    if fam != Family::of(&e.dst) {
        return Err(EgressError::FqdnFamily {
            src: e.src,
            dst: e.dst,
        });
    }
    if let PortMatch::Ports { first, last, .. } = e.ports {
        if first > last {
            return Err(EgressError::FqdnPorts {
                src: e.src,
                dst: e.dst,
                first,
                last,
            });
        }
    }
    Ok(fam)
}

/// Key of a group of FQDN port pieces that must stay disjoint.
pub(crate) type RangeGroup = (IpAddr, IpAddr, u8);

/// Adds learned peers to `desired` (exact ones keep their latest expiry;
/// port ranges are unioned per source, destination and protocol).
pub(crate) fn add_fqdn_elements(
    desired: &mut Desired,
    elements: &[FqdnElement],
    now: Instant,
) -> Result<(), EgressError> {
    let mut groups: HashMap<RangeGroup, Vec<(u16, u16, Instant)>> = HashMap::new();
    for e in elements {
        let fam = check_fqdn(e)?;
        let exp = expiry(now, e.timeout);
        match e.ports {
            PortMatch::Any => insert_max(
                desired.entry(SetId::FqdnAny(fam)).or_default(),
                Elem::Pair {
                    local: e.src,
                    peer: e.dst,
                },
                Some(exp),
            ),
            PortMatch::Ports {
                protocol,
                first,
                last,
            } if first == last => insert_max(
                desired.entry(SetId::FqdnPort(fam)).or_default(),
                Elem::Port {
                    local: e.src,
                    peer: e.dst,
                    proto: protocol.number(),
                    port: first,
                },
                Some(exp),
            ),
            PortMatch::Ports {
                protocol,
                first,
                last,
            } => groups
                .entry((e.src, e.dst, protocol.number()))
                .or_default()
                .push((first, last, exp)),
        }
    }
    for ((src, dst, proto), pieces) in groups {
        let set = desired
            .entry(SetId::FqdnRange(Family::of(&src)))
            .or_default();
        for (lo, hi, exp) in normalize_ports(&pieces) {
            set.insert(range_piece(src, dst, proto, lo, hi), Some(exp));
        }
    }
    Ok(())
}

pub(crate) fn range_piece(src: IpAddr, dst: IpAddr, proto: u8, lo: u16, hi: u16) -> Elem {
    Elem::PortRange {
        local: src,
        peer: (dst, dst),
        proto,
        ports: (lo, hi),
    }
}

/// Everything the sets should hold for `state`, with FQDN expiries counted
/// from `now`. Every set appears (empty ones too), so applying it also
/// empties sets that are no longer needed.
pub fn desired_state(state: &PolicyState, now: Instant) -> Result<Desired, EgressError> {
    let mut desired: Desired = SetId::all()
        .into_iter()
        .map(|s| (s, Contents::new()))
        .collect();
    for ep in state.rules.endpoints.values() {
        for &ip in &ep.ips {
            if let Some(rules) = &ep.egress {
                add_direction(&mut desired, Direction::Egress, ip, rules);
            }
            if let Some(rules) = &ep.ingress {
                add_direction(&mut desired, Direction::Ingress, ip, rules);
            }
            if ep.dns.is_some() {
                desired
                    .entry(SetId::DnsRedirect(Family::of(&ip)))
                    .or_default()
                    .insert(Elem::Addr(ip), None);
            }
            for (dir, rules) in [
                (Direction::Egress, &ep.egress),
                (Direction::Ingress, &ep.ingress),
            ] {
                let Some(rules) = rules else { continue };
                for port in rules.l7_ports() {
                    desired
                        .entry(SetId::L7(dir, Family::of(&ip)))
                        .or_default()
                        .insert(Elem::AddrPort { local: ip, port }, None);
                }
            }
        }
    }
    add_fqdn_elements(&mut desired, &state.fqdn, now)?;
    Ok(desired)
}

fn put_addr(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

/// Concatenated keys: each field padded to a multiple of 4 bytes (the
/// kernel's 32-bit registers), integers in network byte order.
fn key(local: IpAddr, peer: IpAddr, l4: Option<(u8, u16)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    put_addr(&mut out, local);
    put_addr(&mut out, peer);
    if let Some((proto, port)) = l4 {
        out.extend_from_slice(&[proto, 0, 0, 0]);
        out.extend_from_slice(&port.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
    }
    out
}

impl Elem {
    /// Key and, for interval sets, key end as the kernel wants them.
    pub(crate) fn encode(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        match *self {
            Elem::Addr(ip) => {
                let mut k = Vec::new();
                put_addr(&mut k, ip);
                (k, None)
            }
            Elem::AddrPort { local, port } => {
                let mut k = Vec::with_capacity(20);
                put_addr(&mut k, local);
                k.extend_from_slice(&port.to_be_bytes());
                k.extend_from_slice(&[0, 0]);
                (k, None)
            }
            Elem::Pair { local, peer } => (key(local, peer, None), None),
            Elem::PairRange { local, peer } => {
                (key(local, peer.0, None), Some(key(local, peer.1, None)))
            }
            Elem::Port {
                local,
                peer,
                proto,
                port,
            } => (key(local, peer, Some((proto, port))), None),
            Elem::PortRange {
                local,
                peer,
                proto,
                ports,
            } => (
                key(local, peer.0, Some((proto, ports.0))),
                Some(key(local, peer.1, Some((proto, ports.1)))),
            ),
        }
    }

    #[cfg(test)]
    pub(crate) fn shape(&self) -> Shape {
        match self {
            Elem::Addr(_) => Shape::Addr,
            Elem::AddrPort { .. } => Shape::AddrPort,
            Elem::Pair { .. } | Elem::PairRange { .. } => Shape::Pair,
            Elem::Port { .. } | Elem::PortRange { .. } => Shape::Quad,
        }
    }
}

/// What the kernel would decide with these sets for a packet of a new flow
/// (`local` isolated in `dir`): allowed by some element. The reference the
/// tests hold the translation to.
pub fn admits(
    desired: &Desired,
    dir: Direction,
    local: IpAddr,
    peer: IpAddr,
    proto: u8,
    port: u16,
    now: Instant,
) -> bool {
    let fam = Family::of(&local);
    let live = |exp: &Option<Instant>| exp.is_none_or(|e| e > now);
    let within = |x: IpAddr, r: (IpAddr, IpAddr)| {
        Family::of(&x) == Family::of(&r.0)
            && to_u128(r.0) <= to_u128(x)
            && to_u128(x) <= to_u128(r.1)
    };
    // The per-prefix sets: an exact lookup of the peer masked to the set's
    // prefix length.
    let prefixed = desired.iter().any(|(set, contents)| {
        let Some((d, len)) = set.prefix() else {
            return false;
        };
        if d != dir || set.family() != fam {
            return false;
        }
        let Ok(net) = IpNet::new(peer, len) else {
            return false;
        };
        let peer = net.trunc().addr();
        let port = match set.port_bits() {
            Some(bits) => port & crate::layout::block_mask(bits),
            None => port,
        };
        let key = match set.shape() {
            Shape::Quad => Elem::Port {
                local,
                peer,
                proto,
                port,
            },
            _ => Elem::Pair { local, peer },
        };
        contents.get(&key).is_some_and(live)
    });
    let matches = |set: SetId| {
        desired.get(&set).is_some_and(|contents| {
            contents.iter().any(|(e, exp)| {
                live(exp)
                    && match *e {
                        Elem::Addr(_) | Elem::AddrPort { .. } => false,
                        Elem::Pair { local: l, peer: p } => l == local && p == peer,
                        Elem::PairRange { local: l, peer: r } => l == local && within(peer, r),
                        Elem::Port {
                            local: l,
                            peer: p,
                            proto: pr,
                            port: po,
                        } => l == local && p == peer && pr == proto && po == port,
                        Elem::PortRange {
                            local: l,
                            peer: r,
                            proto: pr,
                            ports,
                        } => {
                            l == local
                                && within(peer, r)
                                && pr == proto
                                && ports.0 <= port
                                && port <= ports.1
                        }
                    }
            })
        })
    };
    let mut sets = vec![
        SetId::Any(dir, fam),
        SetId::Port(dir, fam),
        SetId::NetAny(dir, fam),
        SetId::Range(dir, fam),
    ];
    if dir == Direction::Egress {
        sets.extend([
            SetId::FqdnAny(fam),
            SetId::FqdnPort(fam),
            SetId::FqdnRange(fam),
        ]);
    }
    prefixed || sets.into_iter().any(matches)
}

/// Pairs of elements of an interval set that overlap (must be none).
pub fn overlaps(contents: &Contents) -> Vec<(Elem, Elem)> {
    type Box5 = (Elem, IpAddr, AddrRange, u8, (u16, u16));
    let boxes: Vec<Box5> = contents
        .keys()
        .filter_map(|e| match *e {
            Elem::PairRange { local, peer } => {
                Some((*e, local, (to_u128(peer.0), to_u128(peer.1)), 0, (0, 0)))
            }
            Elem::PortRange {
                local,
                peer,
                proto,
                ports,
            } => Some((*e, local, (to_u128(peer.0), to_u128(peer.1)), proto, ports)),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for (i, a) in boxes.iter().enumerate() {
        for b in &boxes[i + 1..] {
            let hit = a.1 == b.1
                && a.3 == b.3
                && a.2 .0 <= b.2 .1
                && b.2 .0 <= a.2 .1
                && a.4 .0 <= b.4 .1
                && b.4 .0 <= a.4 .1;
            if hit {
                out.push((a.0, b.0));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use meshward_policy::{Allow, EndpointRules, L4Protocol, PodRef, PolicyKind, PolicyRef};

    use super::*;

    #[test]
    fn aligned_blocks_cover_exactly_the_range() {
        assert_eq!(aligned_blocks(0, 65535), [(0, 16)]);
        assert_eq!(aligned_blocks(1024, 1279), [(1024, 8)]);
        assert_eq!(aligned_blocks(7, 7), [(7, 0)]);
        assert_eq!(
            aligned_blocks(1000, 1300),
            [
                (1000, 3),
                (1008, 4),
                (1024, 8),
                (1280, 4),
                (1296, 2),
                (1300, 0)
            ]
        );
        let mut rng = Rng(7);
        for _ in 0..2000 {
            let a = rng.below(65536) as u16;
            let b = rng.below(65536) as u16;
            let (first, last) = (a.min(b), a.max(b));
            let blocks = aligned_blocks(first, last);
            let mut next = u32::from(first);
            for (base, bits) in &blocks {
                assert_eq!(u32::from(*base), next, "{first}-{last}: {blocks:?}");
                assert_eq!(base & !crate::layout::block_mask(*bits), 0, "unaligned");
                next += 1 << bits;
            }
            assert_eq!(next, u32::from(last) + 1, "{first}-{last}: {blocks:?}");
            // at most two blocks of each size
            for bits in 0..=16u8 {
                assert!(blocks.iter().filter(|b| b.1 == bits).count() <= 2);
            }
        }
    }

    #[test]
    fn wide_ipv4_port_ranges_become_port_blocks_not_intervals() {
        let local: IpAddr = "198.19.1.2".parse().unwrap();
        let ports = PortMatch::Ports {
            protocol: L4Protocol::Udp,
            first: 1000,
            last: 1300,
        };
        let rules = DirectionRules {
            policies: vec![policy("p0")],
            allow: vec![Allow {
                nets: vec![
                    "198.18.100.16/28".parse().unwrap(),
                    "198.18.100.9/32".parse().unwrap(),
                ],
                ports: vec![ports],
                policy: policy("p0"),
            }],
            fqdn: Vec::new(),
            ..Default::default()
        };
        let mut d = Desired::new();
        add_direction(&mut d, Direction::Egress, local, &rules);
        let e = Direction::Egress;
        let v4 = Family::V4;
        assert!(!d.contains_key(&SetId::Range(e, v4)), "{:?}", d.keys());
        assert_eq!(d[&SetId::PrefixBlock(e, v4, 28, 8)].len(), 1);
        assert_eq!(d[&SetId::PrefixBlock(e, v4, 32, 8)].len(), 1);
        // 1000..=1023 and 1280..=1300 as single ports
        assert_eq!(d[&SetId::PrefixPort(e, v4, 28)].len(), 24 + 21);
        assert_eq!(d[&SetId::Port(e, v4)].len(), 24 + 21);
        let now = Instant::now();
        for port in [999u16, 1000, 1023, 1024, 1200, 1279, 1280, 1300, 1301] {
            for peer in ["198.18.100.17", "198.18.100.9", "198.18.100.40"] {
                let peer: IpAddr = peer.parse().unwrap();
                let want = (1000..=1300).contains(&port)
                    && peer != "198.18.100.40".parse::<IpAddr>().unwrap();
                assert_eq!(
                    admits(&d, e, local, peer, 17, port, now),
                    want,
                    "{peer}:{port}"
                );
                assert!(
                    !admits(&d, e, local, peer, 6, port, now),
                    "TCP {peer}:{port}"
                );
            }
        }
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn policy(name: &str) -> PolicyRef {
        PolicyRef {
            kind: PolicyKind::NetworkPolicy,
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    const PROTOS: [L4Protocol; 3] = [L4Protocol::Tcp, L4Protocol::Udp, L4Protocol::Sctp];

    /// Peers within 198.18.0.0/22 and 2001:db8::/118 so random samples hit them.
    fn random_net(rng: &mut Rng) -> IpNet {
        let v6 = rng.below(5) == 0;
        if v6 {
            let len = 118 + rng.below(11) as u8;
            let host = rng.below(1024) as u128;
            let addr = Ipv6Addr::from(0x2001_0db8_u128 << 96 | host);
            IpNet::new(IpAddr::V6(addr), len).unwrap().trunc()
        } else {
            let len = 22 + rng.below(11) as u8;
            let host = rng.below(1024) as u32;
            let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) | host);
            IpNet::new(IpAddr::V4(addr), len).unwrap().trunc()
        }
    }

    fn random_port(rng: &mut Rng) -> PortMatch {
        if rng.below(6) == 0 {
            return PortMatch::Any;
        }
        let protocol = PROTOS[rng.below(3) as usize];
        // Ports from a small range so rules overlap often.
        let first = 75 + rng.below(20) as u16;
        let last = match rng.below(6) {
            0..=2 => first,
            // Wider than EXPAND_PORTS_MAX: port blocks (IPv4) or an
            // interval element (IPv6); up to 375 ports, so aligned blocks
            // of 64, 128 and 256 ports occur.
            3 => first + 60 + rng.below(300) as u16,
            _ => first + rng.below(10) as u16,
        };
        PortMatch::Ports {
            protocol,
            first,
            last,
        }
    }

    fn random_rules(rng: &mut Rng) -> DirectionRules {
        let allow = (0..1 + rng.below(6))
            .map(|i| Allow {
                nets: (0..1 + rng.below(4)).map(|_| random_net(rng)).collect(),
                ports: (0..1 + rng.below(3)).map(|_| random_port(rng)).collect(),
                policy: policy(&format!("p{i}")),
            })
            .collect();
        DirectionRules {
            policies: vec![policy("p0")],
            allow,
            fqdn: Vec::new(),
            l7: Vec::new(),
        }
    }

    fn endpoint(
        name: &str,
        ips: &[&str],
        egress: Option<DirectionRules>,
        ingress: Option<DirectionRules>,
    ) -> EndpointRules {
        EndpointRules {
            pod: PodRef {
                namespace: "ns".into(),
                name: name.into(),
            },
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            egress: egress.map(Arc::new),
            ingress: ingress.map(Arc::new),
            dns: None,
        }
    }

    fn state_of(eps: Vec<EndpointRules>) -> PolicyState {
        PolicyState {
            rules: NodeRules {
                endpoints: eps
                    .into_iter()
                    .map(|e| (e.pod.clone(), e))
                    .collect::<BTreeMap<_, _>>(),
            },
            fqdn: Vec::new(),
        }
    }

    fn sample_peer(rng: &mut Rng, v6: bool) -> IpAddr {
        let host = rng.below(1100) as u128; // a little past the /22 too
        if v6 {
            IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | host))
        } else {
            IpAddr::V4(Ipv4Addr::from(
                u32::from(Ipv4Addr::new(198, 18, 0, 0)) + host as u32,
            ))
        }
    }

    #[test]
    fn random_allow_lists_translate_exactly_and_disjointly() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let now = Instant::now();
        for round in 0..300 {
            let egress = random_rules(&mut rng);
            let ingress = random_rules(&mut rng);
            let local4: IpAddr = "198.19.1.2".parse().unwrap();
            let local6: IpAddr = "fd00::2".parse().unwrap();
            let state = state_of(vec![endpoint(
                "a",
                &["198.19.1.2", "fd00::2"],
                Some(egress.clone()),
                Some(ingress.clone()),
            )]);
            let desired = desired_state(&state, now).unwrap();
            for (set, contents) in &desired {
                if set.interval() {
                    let o = overlaps(contents);
                    assert!(o.is_empty(), "round {round}: {set:?} overlaps: {o:?}");
                }
                for e in contents.keys() {
                    assert_eq!(e.shape(), set.shape(), "{set:?} {e:?}");
                }
            }
            for _ in 0..400 {
                let v6 = rng.below(5) == 0;
                let peer = sample_peer(&mut rng, v6);
                let local = if v6 { local6 } else { local4 };
                let proto = [1u8, 6, 17, 132][rng.below(4) as usize];
                // mostly near the rules' first ports, sometimes anywhere up
                // to the widest range's end (its port blocks)
                let port = if rng.below(3) == 0 {
                    70 + rng.below(420) as u16
                } else {
                    70 + rng.below(40) as u16
                };
                for (dir, rules) in [(Direction::Egress, &egress), (Direction::Ingress, &ingress)] {
                    let want = rules.allows(peer, proto, port).is_some();
                    let got = admits(&desired, dir, local, peer, proto, port, now);
                    assert_eq!(
                        got, want,
                        "round {round} {dir:?} {peer} proto {proto} port {port}\nrules {rules:#?}\nsets {desired:#?}"
                    );
                }
            }
        }
    }

    #[test]
    fn random_cidr_lists_of_many_prefix_lengths_translate_exactly() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let now = Instant::now();
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
        let local: IpAddr = "198.19.1.2".parse().unwrap();
        // Peers differ from `base` in a few random bits, so nets of every
        // length (0..=32) and samples meet often.
        let near = |rng: &mut Rng| {
            let mut a = base;
            for _ in 0..rng.below(4) {
                a ^= 1 << rng.below(32);
            }
            Ipv4Addr::from(a)
        };
        let mut port_blocks = 0;
        for round in 0..200 {
            let allow: Vec<Allow> = (0..1 + rng.below(8))
                .map(|i| Allow {
                    nets: (0..1 + rng.below(4))
                        .map(|_| {
                            let len = rng.below(33) as u8;
                            IpNet::new(IpAddr::V4(near(&mut rng)), len).unwrap()
                        })
                        .collect(),
                    ports: (0..1 + rng.below(3))
                        .map(|_| random_port(&mut rng))
                        .collect(),
                    policy: policy(&format!("p{i}")),
                })
                .collect();
            let rules = DirectionRules {
                policies: vec![policy("p0")],
                allow,
                fqdn: Vec::new(),
                l7: Vec::new(),
            };
            let state = state_of(vec![endpoint(
                "a",
                &["198.19.1.2"],
                Some(rules.clone()),
                Some(rules.clone()),
            )]);
            let desired = desired_state(&state, now).unwrap();
            let mut lengths = std::collections::BTreeSet::new();
            for (set, contents) in &desired {
                if let Some((_, len)) = set.prefix() {
                    // /32 only for port blocks (else exact keys)
                    assert!(len < 32 || set.port_bits().is_some(), "{set:?}");
                    assert!(!contents.is_empty(), "{set:?} present but empty");
                    lengths.insert(len);
                    // Keys are network addresses of the set's length.
                    for e in contents.keys() {
                        let (Elem::Pair { peer, .. } | Elem::Port { peer, .. }) = e else {
                            panic!("{set:?} holds {e:?}");
                        };
                        assert_eq!(IpNet::new(*peer, len).unwrap().trunc().addr(), *peer);
                        // and ports the bases of their blocks
                        if let (Some(bits), Elem::Port { port, .. }) = (set.port_bits(), e) {
                            assert_eq!(port & crate::layout::block_mask(bits), *port, "{set:?}");
                        }
                    }
                }
                if set.interval() {
                    assert!(overlaps(contents).is_empty(), "round {round}: {set:?}");
                }
            }
            port_blocks += desired.keys().filter(|s| s.port_bits().is_some()).count();
            // Prefix sets never exceed two per length and direction, plus
            // one per port-block size in use.
            let per_dir = desired
                .keys()
                .filter(|s| s.prefix().is_some() && s.port_bits().is_none())
                .count();
            assert!(per_dir <= 4 * lengths.len(), "{per_dir} {lengths:?}");
            for _ in 0..300 {
                let peer = IpAddr::V4(near(&mut rng));
                let proto = [1u8, 6, 17, 132][rng.below(4) as usize];
                let port = 70 + rng.below(420) as u16;
                let want = rules.allows(peer, proto, port).is_some();
                for dir in [Direction::Egress, Direction::Ingress] {
                    let got = admits(&desired, dir, local, peer, proto, port, now);
                    assert_eq!(
                        got, want,
                        "round {round} {dir:?} {peer} proto {proto} port {port}\nrules {rules:#?}"
                    );
                }
            }
        }
        assert!(port_blocks > 0, "no round exercised port blocks");
    }

    #[test]
    fn cidr_peers_go_to_prefix_sets_and_wide_ranges_to_port_blocks() {
        let p = |first, last| PortMatch::Ports {
            protocol: L4Protocol::Udp,
            first,
            last,
        };
        let rules = DirectionRules {
            policies: vec![policy("p")],
            allow: vec![
                Allow {
                    // Host bits set: the key is the network address.
                    nets: vec!["198.18.100.7/24".parse().unwrap()],
                    ports: vec![PortMatch::single(L4Protocol::Tcp, 80), p(1000, 1063)],
                    policy: policy("p"),
                },
                Allow {
                    nets: vec!["198.18.0.0/16".parse().unwrap()],
                    ports: vec![PortMatch::Any, p(2000, 2064)],
                    policy: policy("p"),
                },
                Allow {
                    nets: vec!["2001:db8::/64".parse().unwrap()],
                    ports: vec![PortMatch::Any],
                    policy: policy("p"),
                },
            ],
            fqdn: Vec::new(),
            l7: Vec::new(),
        };
        let d = desired_state(
            &state_of(vec![endpoint(
                "a",
                &["198.19.1.2", "fd00::2"],
                Some(rules),
                None,
            )]),
            Instant::now(),
        )
        .unwrap();
        let e = Direction::Egress;
        let v4 = Family::V4;
        let net24: IpAddr = "198.18.100.0".parse().unwrap();
        let p24 = &d[&SetId::PrefixPort(e, v4, 24)];
        // TCP 80 plus 64 expanded UDP ports.
        assert_eq!(p24.len(), 65);
        assert!(p24
            .keys()
            .all(|k| matches!(k, Elem::Port { peer, .. } if *peer == net24)));
        assert_eq!(d[&SetId::PrefixAny(e, v4, 16)].len(), 1);
        assert!(!d.contains_key(&SetId::PrefixAny(e, v4, 24)));
        // 65 ports are too many to expand, but 2000-2064 has no aligned
        // block of 64: all single ports of the /16 port set.
        assert_eq!(d[&SetId::PrefixPort(e, v4, 16)].len(), 65);
        assert!(d.keys().all(|s| s.port_bits().is_none()));
        assert!(d[&SetId::Range(e, v4)].is_empty());
        assert!(d[&SetId::NetAny(e, v4)].is_empty());
        // IPv6 CIDR peers stay interval elements.
        assert_eq!(d[&SetId::NetAny(e, Family::V6)].len(), 1);
        assert!(d.keys().all(|s| s.prefix().is_none() || s.family() == v4));
    }

    #[test]
    fn exact_peers_go_to_hash_sets_and_ranges_to_interval_sets() {
        let tcp80 = PortMatch::single(L4Protocol::Tcp, 80);
        let rules = DirectionRules {
            policies: vec![policy("p")],
            allow: vec![
                Allow {
                    nets: vec!["198.19.2.5/32".parse().unwrap()],
                    ports: vec![tcp80, PortMatch::Any],
                    policy: policy("p"),
                },
                Allow {
                    nets: vec![
                        "198.19.2.0/24".parse().unwrap(),
                        "198.19.3.0/24".parse().unwrap(),
                    ],
                    ports: vec![PortMatch::Any],
                    policy: policy("p"),
                },
            ],
            fqdn: Vec::new(),
            l7: Vec::new(),
        };
        let d = desired_state(
            &state_of(vec![endpoint("a", &["198.19.1.2"], Some(rules), None)]),
            Instant::now(),
        )
        .unwrap();
        let local: IpAddr = "198.19.1.2".parse().unwrap();
        let peer: IpAddr = "198.19.2.5".parse().unwrap();
        let e4 = |s: fn(Direction, Family) -> SetId| &d[&s(Direction::Egress, Family::V4)];
        assert!(e4(SetId::Isolated).contains_key(&Elem::Addr(local)));
        assert!(e4(SetId::Port).contains_key(&Elem::Port {
            local,
            peer,
            proto: 6,
            port: 80
        }));
        assert!(e4(SetId::Any).contains_key(&Elem::Pair { local, peer }));
        // IPv4 /24s: keyed by their network in the /24 set.
        let nets: Vec<_> = d[&SetId::PrefixAny(Direction::Egress, Family::V4, 24)]
            .keys()
            .collect();
        assert_eq!(
            nets,
            [
                &Elem::Pair {
                    local,
                    peer: "198.19.2.0".parse().unwrap()
                },
                &Elem::Pair {
                    local,
                    peer: "198.19.3.0".parse().unwrap()
                }
            ]
        );
        assert!(e4(SetId::NetAny).is_empty());
        assert!(d[&SetId::Isolated(Direction::Ingress, Family::V4)].is_empty());
    }

    #[test]
    fn overlapping_port_ranges_are_split_into_slabs() {
        // IPv6 CIDR peers: the ones whose ranges stay interval elements.
        let p = |first, last| PortMatch::Ports {
            protocol: L4Protocol::Tcp,
            first,
            last,
        };
        let rules = DirectionRules {
            policies: vec![policy("p")],
            allow: vec![
                Allow {
                    nets: vec!["2001:db8::/121".parse().unwrap()],
                    ports: vec![p(80, 443)],
                    policy: policy("p"),
                },
                Allow {
                    nets: vec!["2001:db8::80/121".parse().unwrap()],
                    ports: vec![p(400, 500)],
                    policy: policy("q"),
                },
            ],
            fqdn: Vec::new(),
            l7: Vec::new(),
        };
        let d = desired_state(
            &state_of(vec![endpoint("a", &["fd00::2"], Some(rules), None)]),
            Instant::now(),
        )
        .unwrap();
        let range = &d[&SetId::Range(Direction::Egress, Family::V6)];
        assert!(overlaps(range).is_empty());
        let got: Vec<((IpAddr, IpAddr), (u16, u16))> = range
            .keys()
            .map(|e| match e {
                Elem::PortRange { peer, ports, .. } => (*peer, *ports),
                other => panic!("{other:?}"),
            })
            .collect();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // 80-399: first half; 400-443: the whole /120 (merged); 444-500: second half.
        assert!(
            got.contains(&((ip("2001:db8::"), ip("2001:db8::7f")), (80, 399))),
            "{got:?}"
        );
        assert!(
            got.contains(&((ip("2001:db8::"), ip("2001:db8::ff")), (400, 443))),
            "{got:?}"
        );
        assert!(
            got.contains(&((ip("2001:db8::80"), ip("2001:db8::ff")), (444, 500))),
            "{got:?}"
        );
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn fqdn_elements_keep_the_latest_expiry_and_union_port_ranges() {
        let now = Instant::now();
        let src: IpAddr = "198.19.1.2".parse().unwrap();
        let dst: IpAddr = "198.18.100.1".parse().unwrap();
        let el = |ports, secs| FqdnElement {
            src,
            dst,
            ports,
            timeout: Duration::from_secs(secs),
        };
        let p = |first, last| PortMatch::Ports {
            protocol: L4Protocol::Tcp,
            first,
            last,
        };
        let mut d = Desired::new();
        add_fqdn_elements(
            &mut d,
            &[
                el(p(443, 443), 30),
                el(p(443, 443), 10),
                el(PortMatch::Any, 5),
                el(p(80, 443), 10),
                el(p(400, 500), 20),
            ],
            now,
        )
        .unwrap();
        assert_eq!(
            d[&SetId::FqdnPort(Family::V4)][&Elem::Port {
                local: src,
                peer: dst,
                proto: 6,
                port: 443
            }],
            Some(now + Duration::from_secs(30))
        );
        assert_eq!(d[&SetId::FqdnAny(Family::V4)].len(), 1);
        let pieces: Vec<_> = d[&SetId::FqdnRange(Family::V4)]
            .iter()
            .map(|(e, x)| match e {
                Elem::PortRange { ports, .. } => (*ports, x.unwrap() - now),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            pieces,
            [
                ((80, 399), Duration::from_secs(10)),
                ((400, 500), Duration::from_secs(20))
            ]
        );
        assert!(overlaps(&d[&SetId::FqdnRange(Family::V4)]).is_empty());
        // Expired learned peers no longer admit.
        assert!(admits(
            &d,
            Direction::Egress,
            src,
            dst,
            6,
            450,
            now + Duration::from_secs(15)
        ));
        assert!(!admits(
            &d,
            Direction::Egress,
            src,
            dst,
            6,
            100,
            now + Duration::from_secs(15)
        ));
    }

    #[test]
    fn bad_fqdn_elements_are_refused() {
        let now = Instant::now();
        let mixed = FqdnElement {
            src: "198.19.1.2".parse().unwrap(),
            dst: "2001:db8::1".parse().unwrap(),
            ports: PortMatch::Any,
            timeout: Duration::from_secs(1),
        };
        let err = add_fqdn_elements(&mut Desired::new(), &[mixed], now).unwrap_err();
        assert!(err.to_string().contains("2001:db8::1"), "{err}");
        let backwards = FqdnElement {
            dst: "198.18.100.1".parse().unwrap(),
            ports: PortMatch::Ports {
                protocol: L4Protocol::Udp,
                first: 90,
                last: 80,
            },
            ..mixed
        };
        let err = add_fqdn_elements(&mut Desired::new(), &[backwards], now).unwrap_err();
        assert!(err.to_string().contains("90"), "{err}");
    }

    #[test]
    fn zero_timeout_never_means_forever() {
        let now = Instant::now();
        assert!(expiry(now, Duration::ZERO) > now);
        assert!(expiry(now, Duration::MAX) < now + Duration::from_secs(1 << 32));
    }

    #[test]
    fn normalize_ports_random_matches_pointwise_max() {
        let mut rng = Rng(42);
        for _ in 0..500 {
            let pieces: Vec<(u16, u16, u32)> = (0..1 + rng.below(6))
                .map(|_| {
                    let lo = rng.below(30) as u16;
                    (lo, lo + rng.below(10) as u16, rng.below(4) as u32)
                })
                .collect();
            let out = normalize_ports(&pieces);
            for w in out.windows(2) {
                assert!(w[0].1 < w[1].0, "{out:?}");
            }
            for port in 0..45u16 {
                let want = pieces
                    .iter()
                    .filter(|p| p.0 <= port && port <= p.1)
                    .map(|p| p.2)
                    .max();
                let got = out.iter().find(|p| p.0 <= port && port <= p.1).map(|p| p.2);
                assert_eq!(got, want, "port {port} {pieces:?} -> {out:?}");
            }
        }
    }

    #[test]
    fn keys_are_padded_like_nft_does() {
        // From `nft --debug=netlink`: 198.19.1.2 . 198.18.100.1 . tcp . 80-443
        let e = Elem::PortRange {
            local: "198.19.1.2".parse().unwrap(),
            peer: (
                "198.18.100.1".parse().unwrap(),
                "198.18.100.1".parse().unwrap(),
            ),
            proto: 6,
            ports: (80, 443),
        };
        let (k, end) = e.encode();
        assert_eq!(
            k,
            [198, 19, 1, 2, 198, 18, 100, 1, 6, 0, 0, 0, 0, 0x50, 0, 0]
        );
        assert_eq!(
            end.unwrap(),
            [198, 19, 1, 2, 198, 18, 100, 1, 6, 0, 0, 0, 0x01, 0xbb, 0, 0]
        );
        let (k, end) = Elem::Addr("fd00::1".parse().unwrap()).encode();
        assert_eq!(k.len(), 16);
        assert!(end.is_none());
    }
}
