//! What the policy compiler produces for one node: per local endpoint, what
//! it may send (egress) and receive (ingress), which names it may resolve
//! and which ports learned names open.
//!
//! These are plain values with pure queries ([`DirectionRules::allows`],
//! [`DirectionRules::l7_ports`], [`DirectionRules::l7_matching`],
//! [`DnsRules::query_allowed`], [`EndpointRules::fqdn_ports`]) so back ends
//! (nftables), the DNS and L7 proxies and tests all agree on one meaning.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::crd::HttpRule;
use crate::fqdn::{Fqdn, FqdnSelector};
use crate::model::{L4Protocol, PodRef, PolicyRef};

/// Which packets of a peer a rule admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortMatch {
    /// Every protocol (ICMP included) and every port.
    Any,
    /// One transport protocol, ports `first..=last` (`0..=65535` = all).
    Ports {
        protocol: L4Protocol,
        first: u16,
        last: u16,
    },
}

impl PortMatch {
    pub fn single(protocol: L4Protocol, port: u16) -> Self {
        PortMatch::Ports {
            protocol,
            first: port,
            last: port,
        }
    }

    /// Whether a packet with this protocol number and destination port
    /// matches (`port` is ignored for `Any`).
    pub fn admits(&self, protocol: u8, port: u16) -> bool {
        match *self {
            PortMatch::Any => true,
            PortMatch::Ports {
                protocol: p,
                first,
                last,
            } => p.number() == protocol && (first..=last).contains(&port),
        }
    }
}

/// An allowed peer address range on some ports. `except` clauses are
/// already subtracted: `nets` are disjoint-or-not prefixes that are all
/// allowed (back ends merge overlaps).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allow {
    pub nets: Vec<IpNet>,
    pub ports: Vec<PortMatch>,
    pub policy: PolicyRef,
}

/// Names (toFQDNs) whose learned addresses become allowed peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FqdnAllow {
    pub selectors: Vec<FqdnSelector>,
    pub ports: Vec<PortMatch>,
    pub policy: PolicyRef,
}

/// One direction (egress or ingress) of an isolated endpoint: what is
/// allowed; everything else is dropped. Replies to allowed flows are
/// always allowed (conntrack), as is traffic from the endpoint's own node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectionRules {
    /// Every policy isolating the endpoint in this direction (a drop is
    /// attributed to these: any of them could have allowed it).
    pub policies: Vec<PolicyRef>,
    pub allow: Vec<Allow>,
    /// Egress only: names whose answers open peers.
    pub fqdn: Vec<FqdnAllow>,
    /// What the L7 proxy enforces on the TCP ports that carry L7 rules in
    /// this direction (every connection on such a port goes through the
    /// proxy). The L3/L4 part of those rules is in `allow` / `fqdn` too.
    pub l7: Vec<L7Allow>,
}

/// What the L7 proxy applies to one peer on one port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L7Rule {
    /// The peer is admitted on this port by a rule without L7 rules: every
    /// request passes (Cilium's union semantics).
    AllowAll,
    /// `rules.http`: a request passes when one of these matches.
    Http(Arc<[HttpRule]>),
    /// `rules.tls: sni`: the ClientHello's server name must match one of
    /// these (the rule's toFQDNs selectors).
    Sni(Vec<FqdnSelector>),
}

/// One L7 entry: peers (static prefixes and, on egress, toFQDNs names whose
/// learned addresses count) on one TCP port, and the rule that applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L7Allow {
    pub nets: Vec<IpNet>,
    pub fqdns: Vec<FqdnSelector>,
    pub port: u16,
    pub rule: L7Rule,
    pub policy: PolicyRef,
}

impl L7Allow {
    /// Whether `peer` (with the names learned for it) is one of this
    /// entry's peers.
    pub fn covers(&self, peer: IpAddr, names: &[Fqdn]) -> bool {
        self.nets.iter().any(|n| n.contains(&peer))
            || (!self.fqdns.is_empty()
                && names
                    .iter()
                    .any(|name| self.fqdns.iter().any(|s| s.matches(name))))
    }
}

/// What applies to one peer on an L7 port, all matching entries combined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L7Applies<'a> {
    /// No entry covers the peer: deny (the kernel admitted it through
    /// something the L7 view cannot attribute, e.g. a learned address
    /// whose name expired meanwhile; fail closed).
    Nothing,
    /// An L4-only rule admits the peer here: every request passes.
    AllowAll(&'a PolicyRef),
    /// The union of the HTTP rules of every matching entry.
    Http(Vec<(&'a HttpRule, &'a PolicyRef)>),
    /// The union of the allowed server names of every matching TLS entry.
    Sni(Vec<(&'a FqdnSelector, &'a PolicyRef)>),
}

impl DirectionRules {
    /// The static verdict for a packet to/from `peer` (FQDN-learned peers
    /// are not included: see [`EndpointRules::fqdn_ports`]). Returns the
    /// policy that allowed it.
    pub fn allows(&self, peer: IpAddr, protocol: u8, port: u16) -> Option<&PolicyRef> {
        self.allow
            .iter()
            .find(|a| {
                a.nets.iter().any(|n| n.contains(&peer))
                    && a.ports.iter().any(|p| p.admits(protocol, port))
            })
            .map(|a| &a.policy)
    }

    /// The TCP ports whose traffic in this direction goes through the L7
    /// proxy.
    pub fn l7_ports(&self) -> BTreeSet<u16> {
        self.l7.iter().map(|a| a.port).collect()
    }

    /// Indices (into `l7`) of the entries covering `peer` on `port`;
    /// `names` are the names learned for `peer` (for toFQDNs entries).
    pub fn l7_matching(&self, peer: IpAddr, names: &[Fqdn], port: u16) -> Vec<usize> {
        self.l7
            .iter()
            .enumerate()
            .filter(|(_, a)| a.port == port && a.covers(peer, names))
            .map(|(i, _)| i)
            .collect()
    }

    /// Combines entries (indices from [`DirectionRules::l7_matching`]):
    /// any allow-all entry wins; else TLS entries, if any (HTTP rules
    /// cannot apply to encrypted bytes); else the union of HTTP rules.
    pub fn l7_combine(&self, matching: &[usize]) -> L7Applies<'_> {
        let entries: Vec<&L7Allow> = matching.iter().filter_map(|&i| self.l7.get(i)).collect();
        if let Some(a) = entries.iter().find(|a| a.rule == L7Rule::AllowAll) {
            return L7Applies::AllowAll(&a.policy);
        }
        let sni: Vec<(&FqdnSelector, &PolicyRef)> = entries
            .iter()
            .flat_map(|a| match &a.rule {
                L7Rule::Sni(sels) => sels.iter().map(|s| (s, &a.policy)).collect(),
                _ => Vec::new(),
            })
            .collect();
        if entries.iter().any(|a| matches!(a.rule, L7Rule::Sni(_))) {
            return L7Applies::Sni(sni);
        }
        let http: Vec<(&HttpRule, &PolicyRef)> = entries
            .iter()
            .flat_map(|a| match &a.rule {
                L7Rule::Http(rules) => rules.iter().map(|r| (r, &a.policy)).collect(),
                _ => Vec::new(),
            })
            .collect();
        if http.is_empty() {
            return L7Applies::Nothing;
        }
        L7Applies::Http(http)
    }
}

/// DNS rules of one egress rule (`toPorts[].rules.dns`), for queries sent to
/// servers that rule allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsAllow {
    /// DNS servers this rule reaches (its L3 peers).
    pub servers: Vec<IpNet>,
    /// Its ports (usually 53 UDP and TCP).
    pub ports: Vec<PortMatch>,
    /// Names that may be queried; `None`: any name (a port-53 rule without
    /// `rules.dns`).
    pub names: Option<Vec<FqdnSelector>>,
    pub policy: PolicyRef,
}

/// The DNS view of an endpoint whose DNS goes through the proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsRules {
    pub allow: Vec<DnsAllow>,
}

/// The proxy's verdict on one query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsVerdict {
    Allowed(PolicyRef),
    /// No rule lets this endpoint ask this server for this name.
    Denied,
}

impl DnsRules {
    /// May the endpoint send a query for `name` to `server:port` over
    /// `protocol` (6 or 17)?
    pub fn query_allowed(
        &self,
        server: IpAddr,
        protocol: u8,
        port: u16,
        name: &Fqdn,
    ) -> DnsVerdict {
        for rule in &self.allow {
            let reaches = rule.servers.iter().any(|n| n.contains(&server))
                && rule.ports.iter().any(|p| p.admits(protocol, port));
            if !reaches {
                continue;
            }
            let name_ok = match &rule.names {
                None => true,
                Some(selectors) => selectors.iter().any(|s| s.matches(name)),
            };
            if name_ok {
                return DnsVerdict::Allowed(rule.policy.clone());
            }
        }
        DnsVerdict::Denied
    }
}

/// Everything enforced for one local endpoint. `None` in a direction:
/// not isolated (everything allowed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRules {
    pub pod: PodRef,
    pub ips: Vec<IpAddr>,
    pub egress: Option<Arc<DirectionRules>>,
    pub ingress: Option<Arc<DirectionRules>>,
    /// `Some`: the endpoint's DNS is redirected to the node's proxy (it is
    /// selected by a rule with toFQDNs or DNS rules).
    pub dns: Option<Arc<DnsRules>>,
}

impl EndpointRules {
    /// The ports an address learned for `name` opens (empty: none), with
    /// the policies granting them.
    pub fn fqdn_ports(&self, name: &Fqdn) -> Vec<(PortMatch, &PolicyRef)> {
        let Some(egress) = &self.egress else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for rule in &egress.fqdn {
            if rule.selectors.iter().any(|s| s.matches(name)) {
                out.extend(rule.ports.iter().map(|p| (*p, &rule.policy)));
            }
        }
        out
    }
}

/// The compiled result for one node: its local endpoints, by pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeRules {
    pub endpoints: BTreeMap<PodRef, EndpointRules>,
}

impl NodeRules {
    /// The endpoint owning a local address.
    pub fn endpoint_by_ip(&self, ip: IpAddr) -> Option<&EndpointRules> {
        self.endpoints.values().find(|e| e.ips.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PolicyKind;

    fn entry(net: &str, fqdn: Option<&str>, rule: L7Rule, name: &str) -> L7Allow {
        L7Allow {
            nets: vec![net.parse().unwrap()],
            fqdns: fqdn
                .map(|n| FqdnSelector::match_name(n).unwrap())
                .into_iter()
                .collect(),
            port: 443,
            rule,
            policy: PolicyRef {
                kind: PolicyKind::MeshNetworkPolicy,
                namespace: "x".into(),
                name: name.into(),
            },
        }
    }

    #[test]
    fn combining_entries() {
        let http = L7Rule::Http(Arc::from(vec![HttpRule {
            path: Some("/h".into()),
            ..Default::default()
        }]));
        let sni = L7Rule::Sni(vec![FqdnSelector::match_name("a.test").unwrap()]);
        let rules = DirectionRules {
            l7: vec![
                entry("10.0.0.0/8", None, http.clone(), "h"),
                entry("10.1.0.0/16", Some("a.test"), sni, "s"),
                entry("10.1.2.0/24", None, L7Rule::AllowAll, "all"),
            ],
            ..Default::default()
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let names = [Fqdn::parse("a.test").unwrap()];
        // HTTP alone.
        let m = rules.l7_matching(ip("10.9.0.1"), &[], 443);
        assert_eq!(m, vec![0]);
        assert!(matches!(rules.l7_combine(&m), L7Applies::Http(r) if r.len() == 1));
        // HTTP and SNI: the TLS check (HTTP cannot apply to TLS bytes).
        let m = rules.l7_matching(ip("10.1.0.1"), &[], 443);
        assert_eq!(m, vec![0, 1]);
        assert!(matches!(rules.l7_combine(&m), L7Applies::Sni(s) if s.len() == 1));
        // Allow-all wins over both.
        let m = rules.l7_matching(ip("10.1.2.3"), &[], 443);
        assert!(matches!(rules.l7_combine(&m), L7Applies::AllowAll(p) if p.name == "all"));
        // A learned name covers an address outside the nets.
        assert_eq!(rules.l7_matching(ip("192.0.2.1"), &names, 443), vec![1]);
        // Nothing covers it, or another port: deny.
        assert!(rules.l7_matching(ip("192.0.2.1"), &[], 443).is_empty());
        assert!(rules.l7_matching(ip("10.1.2.3"), &[], 80).is_empty());
        assert_eq!(rules.l7_combine(&[]), L7Applies::Nothing);
        assert_eq!(rules.l7_ports().into_iter().collect::<Vec<_>>(), vec![443]);
    }
}
