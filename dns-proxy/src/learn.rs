//! What an allowed answer teaches: the A/AAAA records along the CNAME
//! chain that starts at the question's name.
//!
//! - The chain is followed through the answer section in any record order
//!   (servers need not sort it), at most [`MAX_CHAIN`] links, and stops at
//!   a loop (a name seen before).
//! - Addresses are taken from A/AAAA records of class IN whose owner is on
//!   the chain; records for other names (an unrelated or injected owner)
//!   are ignored, as are the authority and additional sections.
//! - An address's TTL is the smallest TTL on its path: its own record's and
//!   that of every CNAME from the question's name to its owner. An address
//!   seen twice keeps the smaller TTL.
//! - The addresses are attributed to the question's name and to every name
//!   on the chain (Cilium attributes them to the question's name only).
//!   Chain names that are not valid [`Fqdn`]s are left out of `names`.
//! - Only NOERROR answers teach anything.

use std::collections::HashMap;
use std::net::IpAddr;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{DNSClass, Name, RData, Record};
use meshward_policy::Fqdn;

use crate::core::fqdn_of;

/// Most CNAME links followed from the question's name.
pub const MAX_CHAIN: usize = 16;
/// Up to this many addresses, a repeated one is found by a scan.
const SCAN_LIMIT: usize = 16;

/// Addresses an allowed answer carried, for the client that asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Learned {
    pub client: IpAddr,
    /// The question's name.
    pub qname: Fqdn,
    /// The question's name first, then each CNAME target in chain order.
    pub names: Vec<Fqdn>,
    /// Each address once, with its TTL in seconds (the smallest on its path).
    pub ips: Vec<(IpAddr, u32)>,
}

/// The addresses in an answer section (`rcode` its response code) for
/// `qname`, the question as asked (`qfqdn`: the same name as an [`Fqdn`]);
/// `None` when there are none.
pub(crate) fn learn_from(
    rcode: ResponseCode,
    answers: &[Record],
    qname: &Name,
    qfqdn: &Fqdn,
    client: IpAddr,
) -> Option<Learned> {
    if rcode != ResponseCode::NoError || answers.is_empty() {
        return None;
    }
    // Owner -> (target, ttl) of its first CNAME; Name hashes and compares
    // case-insensitively.
    let mut cnames: HashMap<&Name, (&Name, u32)> = HashMap::new();
    for r in answers {
        if let RData::CNAME(target) = &r.data {
            cnames.entry(&r.name).or_insert((&target.0, r.ttl));
        }
    }
    // The chain: (name, smallest CNAME TTL from qname to it).
    let mut chain: Vec<(&Name, u32)> = vec![(qname, u32::MAX)];
    while chain.len() <= MAX_CHAIN {
        let (last, ttl) = chain[chain.len() - 1];
        let Some(&(target, link_ttl)) = cnames.get(last) else {
            break;
        };
        if chain.iter().any(|(n, _)| *n == target) {
            break;
        }
        chain.push((target, ttl.min(link_ttl)));
    }
    let mut ips: Vec<(IpAddr, u32)> = Vec::new();
    let mut index: HashMap<IpAddr, usize> = HashMap::new();
    for r in answers {
        if r.dns_class != DNSClass::IN {
            continue;
        }
        let ip = match &r.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        let Some(&(_, path_ttl)) = chain.iter().find(|(n, _)| *n == &r.name) else {
            continue;
        };
        let ttl = r.ttl.min(path_ttl);
        // A few addresses: a scan; many: an index (built once needed).
        let seen = if ips.len() <= SCAN_LIMIT {
            ips.iter().position(|(known, _)| *known == ip)
        } else {
            if index.is_empty() {
                index.extend(ips.iter().enumerate().map(|(i, (known, _))| (*known, i)));
            }
            index.get(&ip).copied()
        };
        match seen {
            Some(i) => ips[i].1 = ips[i].1.min(ttl),
            None => {
                if !index.is_empty() {
                    index.insert(ip, ips.len());
                }
                ips.push((ip, ttl));
            }
        }
    }
    if ips.is_empty() {
        return None;
    }
    let mut names = vec![qfqdn.clone()];
    for (n, _) in &chain[1..] {
        if let Some(f) = fqdn_of(n) {
            if !names.contains(&f) {
                names.push(f);
            }
        }
    }
    Some(Learned {
        client,
        qname: qfqdn.clone(),
        names,
        ips,
    })
}
