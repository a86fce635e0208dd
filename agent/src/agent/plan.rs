//! What the node should look like, given a cluster snapshot: the peer set,
//! the routes through the tunnel and strict mode's remote set. Pure: no
//! I/O, so every rule about bad peer data is unit-tested here.
//!
//! Rules:
//! - A peer is every other Node with a public key, an endpoint and at least
//!   one IPv4 pod CIDR (IPv6 pod CIDRs are not carried by the mesh yet and
//!   are ignored).
//! - Bad data never displaces what works. A Node whose data is unusable on
//!   its own (this node's key, a pod CIDR overlapping ours, an endpoint of
//!   the wrong address family) keeps its last good configuration, if it had
//!   one. Two Nodes that conflict (same public key, overlapping pod CIDRs)
//!   are settled in favour of the one whose configuration is unchanged since
//!   the last good set; the other keeps its own last good configuration if
//!   that still fits, else it is left out. Every such decision is a
//!   [`Problem`] the agent logs.
//! - Until the datastore has synced, a Node missing from the snapshot may
//!   only be missing from an incomplete listing: its last good
//!   configuration (e.g. from the peer cache) stays.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;

use ipnet::{IpNet, Ipv4Net};
use meshward_keys::PublicKey;

use crate::datastore::NodeInfo;

/// One peer as the agent configures it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub public_key: PublicKey,
    pub endpoint: SocketAddr,
    /// IPv4 pod CIDRs, sorted; never empty.
    pub pod_cidrs: Vec<Ipv4Net>,
}

/// Something wrong with one Node's data, and what was done about it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub node: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}: {}", self.node, self.message)
    }
}

/// What this node is, as far as planning is concerned.
#[derive(Debug, Clone)]
pub struct Local<'a> {
    pub name: &'a str,
    /// The current key and, during a rotation, the previous one.
    pub keys: &'a [PublicKey],
    pub pod_cidrs: &'a [Ipv4Net],
    /// Our own endpoint: peers must use the same address family.
    pub endpoint: SocketAddr,
    pub cluster_cidr: Ipv4Net,
}

/// The desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// By node name.
    pub peers: BTreeMap<String, Peer>,
    /// Strict mode's remote set: the cluster range plus every other Node's
    /// IPv4 pod CIDRs (peer or not), sorted, without duplicates.
    pub strict_remote: Vec<Ipv4Net>,
    /// Sorted.
    pub problems: Vec<Problem>,
}

/// Every route through the tunnel for a peer set: each peer's pod CIDRs.
pub fn routes(peers: &BTreeMap<String, Peer>) -> BTreeSet<Ipv4Net> {
    peers
        .values()
        .flat_map(|p| p.pod_cidrs.iter().copied())
        .collect()
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn ipv4_cidrs(node: &NodeInfo) -> Vec<Ipv4Net> {
    let mut cidrs: Vec<Ipv4Net> = node
        .pod_cidrs
        .iter()
        .filter_map(|c| match c {
            IpNet::V4(v4) => Some(v4.trunc()),
            IpNet::V6(_) => None,
        })
        .collect();
    cidrs.sort();
    cidrs.dedup();
    cidrs
}

/// A Node's peer configuration from its own data: `Ok(None)` when it is not
/// ready to be a peer (no key, endpoint or IPv4 pod CIDR yet), `Err` when
/// its data is unusable.
fn candidate(node: &NodeInfo, local: &Local<'_>) -> Result<Option<Peer>, String> {
    if !node.is_peerable() {
        return Ok(None);
    }
    let (Some(key), Some(endpoint)) = (&node.public_key, node.endpoint) else {
        return Ok(None);
    };
    let cidrs = ipv4_cidrs(node);
    if cidrs.is_empty() {
        return Ok(None);
    }
    let public_key = PublicKey::from_wg_base64(key.trim())
        .map_err(|e| format!("public key is not usable: {e}"))?;
    if local.keys.contains(&public_key) {
        return Err(format!(
            "publishes this node's own public key {public_key} (a copied key file?)"
        ));
    }
    if endpoint.is_ipv4() != local.endpoint.is_ipv4() {
        return Err(format!(
            "endpoint {endpoint} is of another address family than this node's {}",
            local.endpoint
        ));
    }
    for cidr in &cidrs {
        if let Some(own) = local.pod_cidrs.iter().find(|own| overlaps(own, cidr)) {
            return Err(format!(
                "pod CIDR {cidr} overlaps this node's own pod CIDR {own}"
            ));
        }
    }
    Ok(Some(Peer {
        public_key,
        endpoint,
        pod_cidrs: cidrs,
    }))
}

/// What conflicts between `peer` (of node `name`) and the peers accepted so
/// far, described; `None` if nothing does.
fn conflict(name: &str, peer: &Peer, accepted: &BTreeMap<String, Peer>) -> Option<String> {
    for (other, theirs) in accepted {
        if other == name {
            continue;
        }
        if theirs.public_key == peer.public_key {
            return Some(format!(
                "has the same public key as node {other} ({})",
                peer.public_key
            ));
        }
        for mine in &peer.pod_cidrs {
            if let Some(t) = theirs.pod_cidrs.iter().find(|t| overlaps(t, mine)) {
                return Some(format!(
                    "pod CIDR {mine} overlaps node {other}'s pod CIDR {t}"
                ));
            }
        }
    }
    None
}

/// Plans the node's state from the Nodes of a snapshot.
///
/// `last_good`: the peer set in force (what the mesh was last configured
/// with successfully, or the peer cache at start-up).
pub fn plan<'n>(
    local: &Local<'_>,
    nodes: impl IntoIterator<Item = &'n NodeInfo>,
    synced: bool,
    last_good: &BTreeMap<String, Peer>,
) -> Plan {
    let mut problems = Vec::new();
    let mut strict_remote: BTreeSet<Ipv4Net> = BTreeSet::new();
    strict_remote.insert(local.cluster_cidr.trunc());
    // What each other node would be, on its own data: (preferred, fallback).
    let mut wanted: BTreeMap<String, (Option<Peer>, Option<&Peer>)> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for node in nodes {
        if node.name == local.name {
            continue;
        }
        seen.insert(node.name.clone());
        strict_remote.extend(ipv4_cidrs(node));
        let fallback = last_good.get(&node.name);
        match candidate(node, local) {
            Ok(Some(peer)) => {
                wanted.insert(node.name.clone(), (Some(peer), fallback));
            }
            Ok(None) => {}
            Err(message) => {
                let kept = if fallback.is_some() {
                    "; keeping its last good configuration"
                } else {
                    "; not peering with it"
                };
                problems.push(Problem {
                    node: node.name.clone(),
                    message: format!("{message}{kept}"),
                });
                if let Some(fallback) = fallback {
                    wanted.insert(node.name.clone(), (None, Some(fallback)));
                }
            }
        }
    }
    if !synced {
        for (name, peer) in last_good {
            if name != local.name && !seen.contains(name) {
                wanted.insert(name.clone(), (None, Some(peer)));
            }
        }
    }

    // Unchanged configurations first: they were consistent, so a newcomer
    // that conflicts with one of them is the one left out.
    let (trusted, changed): (Vec<_>, Vec<_>) =
        wanted
            .into_iter()
            .partition(|(_, (preferred, fallback))| match (preferred, fallback) {
                (Some(p), Some(f)) => p == *f,
                (None, Some(_)) => true,
                (_, None) => false,
            });
    let mut peers: BTreeMap<String, Peer> = BTreeMap::new();
    for (name, (preferred, fallback)) in trusted.into_iter().chain(changed) {
        let Some(first) = preferred.as_ref().or(fallback) else {
            continue;
        };
        let Some(why) = conflict(&name, first, &peers) else {
            peers.insert(name, first.clone());
            continue;
        };
        let fallback = fallback.filter(|f| Some(*f) != preferred.as_ref());
        match fallback {
            Some(f) if conflict(&name, f, &peers).is_none() => {
                problems.push(Problem {
                    node: name.clone(),
                    message: format!("{why}; keeping its last good configuration"),
                });
                peers.insert(name, f.clone());
            }
            _ => problems.push(Problem {
                node: name.clone(),
                message: format!("{why}; not peering with it"),
            }),
        }
    }
    for peer in peers.values() {
        strict_remote.extend(peer.pod_cidrs.iter().copied());
    }
    problems.sort();
    problems.dedup();
    Plan {
        peers,
        strict_remote: strict_remote.into_iter().collect(),
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshward_keys::NodeKey;

    struct Keys(Vec<PublicKey>);

    fn keys(n: usize) -> Keys {
        Keys((0..n).map(|_| NodeKey::generate().public()).collect())
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn node(name: &str, key: Option<&PublicKey>, i: u8, cidrs: &[&str]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            public_key: key.map(|k| k.to_string()),
            endpoint: Some(format!("198.18.0.{i}:51871").parse().unwrap()),
            labels: Default::default(),
        }
    }

    const OWN_CIDR: [Ipv4Net; 1] = [
        match Ipv4Net::new(std::net::Ipv4Addr::new(198, 19, 1, 0), 24) {
            Ok(n) => n,
            Err(_) => panic!(),
        },
    ];

    fn local(own: &[PublicKey]) -> Local<'_> {
        Local {
            name: "node1",
            keys: own,
            pod_cidrs: &OWN_CIDR,
            endpoint: "198.18.0.1:51871".parse().unwrap(),
            cluster_cidr: net("198.19.0.0/16"),
        }
    }

    fn names(plan: &Plan) -> Vec<&str> {
        plan.peers.keys().map(String::as_str).collect()
    }

    #[test]
    fn every_other_ready_node_is_a_peer() {
        let k = keys(4);
        let nodes = [
            node("node1", Some(&k.0[0]), 1, &["198.19.1.0/24"]),
            node("node2", Some(&k.0[1]), 2, &["198.19.2.0/24", "fd00:2::/64"]),
            node("node3", Some(&k.0[2]), 3, &["198.19.3.0/24"]),
            // not ready: no key, no CIDR
            node("node4", None, 4, &["198.19.4.0/24"]),
            node("node5", Some(&k.0[3]), 5, &[]),
        ];
        let p = plan(&local(&k.0[..1]), &nodes, true, &BTreeMap::new());
        assert_eq!(names(&p), ["node2", "node3"]);
        assert_eq!(p.peers["node2"].pod_cidrs, [net("198.19.2.0/24")]);
        assert_eq!(
            p.peers["node2"].endpoint,
            "198.18.0.2:51871".parse().unwrap()
        );
        assert_eq!(p.problems, []);
        assert_eq!(
            routes(&p.peers).into_iter().collect::<Vec<_>>(),
            [net("198.19.2.0/24"), net("198.19.3.0/24")]
        );
        // strict mode guards every other node's CIDR, peer or not, and the cluster range
        assert_eq!(
            p.strict_remote,
            [
                net("198.19.0.0/16"),
                net("198.19.2.0/24"),
                net("198.19.3.0/24"),
                net("198.19.4.0/24")
            ]
        );
    }

    #[test]
    fn a_node_with_our_key_or_our_cidr_keeps_its_last_good_config() {
        let k = keys(3);
        let good = [
            node("node2", Some(&k.0[1]), 2, &["198.19.2.0/24"]),
            node("node3", Some(&k.0[2]), 3, &["198.19.3.0/24"]),
        ];
        let own = local(&k.0[..1]);
        let first = plan(&own, &good, true, &BTreeMap::new());
        assert_eq!(names(&first), ["node2", "node3"]);

        // node2 now claims our key, node3 our pod CIDR
        let bad = [
            node("node2", Some(&k.0[0]), 2, &["198.19.2.0/24"]),
            node("node3", Some(&k.0[2]), 3, &["198.19.1.128/25"]),
        ];
        let p = plan(&own, &bad, true, &first.peers);
        assert_eq!(p.peers, first.peers);
        assert_eq!(p.problems.len(), 2, "{:?}", p.problems);
        assert!(p.problems[0].message.contains("own public key"));
        assert!(p.problems[0].message.contains("last good"));
        assert!(p.problems[1].message.contains("overlaps this node's own"));

        // without a last good config they are left out
        let p = plan(&own, &bad, true, &BTreeMap::new());
        assert!(p.peers.is_empty());
        assert!(p.problems.iter().all(|q| q.message.contains("not peering")));
    }

    #[test]
    fn a_newcomer_with_a_duplicate_key_or_cidr_does_not_displace_a_peer() {
        let k = keys(3);
        let own = local(&k.0[..1]);
        let before = plan(
            &own,
            &[node("node3", Some(&k.0[2]), 3, &["198.19.3.0/24"])],
            true,
            &BTreeMap::new(),
        );
        // "node2" sorts first but is new: node3, unchanged, wins both times
        for nodes in [
            vec![
                node("node2", Some(&k.0[2]), 2, &["198.19.2.0/24"]),
                node("node3", Some(&k.0[2]), 3, &["198.19.3.0/24"]),
            ],
            vec![
                node("node2", Some(&k.0[1]), 2, &["198.19.2.0/23"]),
                node("node3", Some(&k.0[2]), 3, &["198.19.3.0/24"]),
            ],
        ] {
            let p = plan(&own, &nodes, true, &before.peers);
            assert_eq!(names(&p), ["node3"], "{:?}", p.problems);
            assert_eq!(p.problems.len(), 1);
            assert_eq!(p.problems[0].node, "node2");
            assert!(
                p.problems[0].message.contains("node node3"),
                "{}",
                p.problems[0]
            );
        }
    }

    #[test]
    fn a_changed_node_that_now_conflicts_falls_back() {
        let k = keys(4);
        let own = local(&k.0[..1]);
        let nodes = [
            node("node2", Some(&k.0[1]), 2, &["198.19.2.0/24"]),
            node("node3", Some(&k.0[2]), 3, &["198.19.3.0/24"]),
        ];
        let before = plan(&own, &nodes, true, &BTreeMap::new());
        // node3 moves onto node2's CIDR and changes its key: back to its old config
        let nodes = [
            node("node2", Some(&k.0[1]), 2, &["198.19.2.0/24"]),
            node("node3", Some(&k.0[3]), 3, &["198.19.2.0/25"]),
        ];
        let p = plan(&own, &nodes, true, &before.peers);
        assert_eq!(p.peers, before.peers);
        assert_eq!(p.problems.len(), 1);
        assert!(p.problems[0].message.contains("keeping its last good"));
        // a valid change is taken
        let nodes = [
            node("node2", Some(&k.0[1]), 2, &["198.19.2.0/24"]),
            node("node3", Some(&k.0[3]), 3, &["198.19.3.0/24"]),
        ];
        let p = plan(&own, &nodes, true, &before.peers);
        assert_eq!(p.peers["node3"].public_key, k.0[3]);
        assert_eq!(p.problems, []);
    }

    #[test]
    fn two_newcomers_with_one_key_only_the_first_by_name_is_taken() {
        let k = keys(2);
        let own = local(&k.0[..1]);
        let nodes = [
            node("node2", Some(&k.0[1]), 2, &["198.19.2.0/24"]),
            node("node3", Some(&k.0[1]), 3, &["198.19.3.0/24"]),
        ];
        let p = plan(&own, &nodes, true, &BTreeMap::new());
        assert_eq!(names(&p), ["node2"]);
        assert_eq!(p.problems[0].node, "node3");
    }

    #[test]
    fn before_sync_absent_nodes_stay_and_after_sync_they_go() {
        let k = keys(3);
        let own = local(&k.0[..1]);
        let all = [
            node("node2", Some(&k.0[1]), 2, &["198.19.2.0/24"]),
            node("node3", Some(&k.0[2]), 3, &["198.19.3.0/24"]),
        ];
        let cached = plan(&own, &all, true, &BTreeMap::new()).peers;
        let p = plan(&own, &all[..1], false, &cached);
        assert_eq!(names(&p), ["node2", "node3"]);
        assert!(p.strict_remote.contains(&net("198.19.3.0/24")));
        let p = plan(&own, &all[..1], true, &cached);
        assert_eq!(names(&p), ["node2"]);
        // a node that lost its key annotation is no longer a peer
        let p = plan(
            &own,
            &[node("node2", None, 2, &["198.19.2.0/24"])],
            true,
            &cached,
        );
        assert!(p.peers.is_empty());
        assert_eq!(p.problems, []);
    }

    #[test]
    fn a_previous_key_of_ours_is_also_ours_and_families_must_match() {
        let k = keys(3);
        let own = local(&k.0[..2]);
        let mut v6 = node("node3", Some(&k.0[2]), 3, &["198.19.3.0/24"]);
        v6.endpoint = Some("[fd00::3]:51871".parse().unwrap());
        let nodes = [node("node2", Some(&k.0[1]), 2, &["198.19.2.0/24"]), v6];
        let p = plan(&own, &nodes, true, &BTreeMap::new());
        assert!(p.peers.is_empty());
        assert!(p.problems[0].message.contains("own public key"));
        assert!(p.problems[1].message.contains("address family"));
    }
}
