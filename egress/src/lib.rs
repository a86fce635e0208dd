//! Kernel enforcement for meshward, all of it in one nftables table
//! (`inet meshward`), each change one atomic transaction.
//!
//! - Strict mode: the rule that keeps pod-to-remote-pod traffic from ever
//!   leaving a node except through the WireGuard tunnel. Building the
//!   ruleset is pure (`strict_ruleset`) so it is tested without a kernel;
//!   `apply_strict` hands it to `nft` in one batch.
//! - Policy ([`PolicyTables`]): compiled per-node rules and learned FQDN
//!   peers as set elements, checked in forward/input chains with a fixed
//!   number of lookups per packet of a new flow; DNS of selected pods
//!   redirected (TPROXY) to the node's proxy. The structure is written once
//!   by `nft` ([`layout`]); elements change by in-process netlink batches
//!   (`nfnl`), computed from a pure translation ([`translate`]).

use std::borrow::Cow;

use ipnet::Ipv4Net;
use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{
    Chain, Element, FlushObject, NfCmd, NfListObject, Nftables, Rule, Set, SetFlag, SetType,
    SetTypeValue, Table,
};
use nftables::stmt::{Counter, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

pub mod layout;
mod nfnl;
mod routing;
mod tables;
pub mod translate;

pub use layout::{Direction, Family, SetId, NFLOG_PREFIX};
pub use nfnl::NetlinkError;
pub use routing::{ensure_tproxy_routing, TproxyRouting};
pub use tables::{DropCount, PolicyConfig, PolicyTables};
pub use translate::{FqdnElement, PolicyState};

/// The one table meshward owns.
pub const TABLE: &str = "meshward";
/// The forward-hook chain holding the strict-mode rule.
pub const STRICT_CHAIN: &str = "strict_forward";
/// Local pod CIDRs (sources strict mode guards).
pub const STRICT_LOCAL_SET: &str = "strict_local_pods";
/// Pod CIDRs of other nodes (and the whole cluster range).
pub const STRICT_REMOTE_SET: &str = "strict_remote_pods";

/// Runs before the usual filter chains so nothing can accept first.
const STRICT_PRIORITY: i32 = -10;

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("strict mode needs at least one local pod CIDR")]
    NoLocalPods,
    #[error("tunnel interface name {0:?} is not a valid interface name")]
    BadInterface(String),
    #[error("nft rejected the meshward ruleset: {0}")]
    Nft(String),
    #[error("learned peer {dst} of {src}: source and destination must be the same address family")]
    FqdnFamily {
        src: std::net::IpAddr,
        dst: std::net::IpAddr,
    },
    #[error("learned peer {dst} of {src}: port range {first}-{last} is backwards")]
    FqdnPorts {
        src: std::net::IpAddr,
        dst: std::net::IpAddr,
        first: u16,
        last: u16,
    },
    #[error("tproxy policy routing: {0}")]
    Routing(String),
    #[error("policy sets: {0}")]
    Netlink(#[from] NetlinkError),
}

/// What strict mode protects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrictMode {
    /// The only interface pod-to-remote-pod packets may leave by (`mw0`).
    pub tunnel_ifname: String,
    /// This node's pod CIDRs.
    pub local_pod_cidrs: Vec<Ipv4Net>,
    /// Every other pod CIDR: the cluster's whole pod range (known before any
    /// peer is, so the rule fails closed from the start) plus each remote
    /// node's CIDRs as they are learned.
    pub remote_pod_cidrs: Vec<Ipv4Net>,
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(field),
        },
    )))
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn set_ref(name: &'static str) -> Expression<'static> {
    Expression::String(Cow::Owned(format!("@{name}")))
}

fn prefix(net: Ipv4Net) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(Cow::Owned(net.network().to_string()))),
        len: u32::from(net.prefix_len()),
    }))
}

fn interval_set(name: &'static str) -> Set<'static> {
    Set {
        family: NfFamily::INet,
        table: Cow::Borrowed(TABLE),
        name: Cow::Borrowed(name),
        set_type: SetTypeValue::Single(SetType::Ipv4Addr),
        flags: Some([SetFlag::Interval].into_iter().collect()),
        ..Set::default()
    }
}

/// The strict-mode part of the table as one batch: create what is missing,
/// then replace the chain's rule and both sets' contents. Applied as one
/// transaction, so the kernel never holds a state without the rule.
pub fn strict_ruleset(strict: &StrictMode) -> Result<Nftables<'static>, EgressError> {
    if strict.local_pod_cidrs.is_empty() {
        return Err(EgressError::NoLocalPods);
    }
    let ifname = &strict.tunnel_ifname;
    if ifname.is_empty() || ifname.len() > 15 || ifname.contains(['/', ' ', '"']) {
        return Err(EgressError::BadInterface(ifname.clone()));
    }
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(Table {
        family: NfFamily::INet,
        name: Cow::Borrowed(TABLE),
        handle: None,
    }));
    let chain = Chain {
        family: NfFamily::INet,
        table: Cow::Borrowed(TABLE),
        name: Cow::Borrowed(STRICT_CHAIN),
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Forward),
        prio: Some(STRICT_PRIORITY),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    };
    batch.add(NfListObject::Chain(chain.clone()));
    for name in [STRICT_LOCAL_SET, STRICT_REMOTE_SET] {
        batch.add(NfListObject::Set(Box::new(interval_set(name))));
    }
    batch.add_cmd(NfCmd::Flush(FlushObject::Chain(chain)));
    for (name, cidrs) in [
        (STRICT_LOCAL_SET, &strict.local_pod_cidrs),
        (STRICT_REMOTE_SET, &strict.remote_pod_cidrs),
    ] {
        batch.add_cmd(NfCmd::Flush(FlushObject::Set(Box::new(interval_set(name)))));
        // Interval sets refuse overlapping elements: merge first.
        let merged = Ipv4Net::aggregate(cidrs);
        if !merged.is_empty() {
            batch.add(NfListObject::Element(Element {
                family: NfFamily::INet,
                table: Cow::Borrowed(TABLE),
                name: Cow::Borrowed(name),
                elem: Cow::Owned(merged.into_iter().map(prefix).collect()),
            }));
        }
    }
    // ip saddr @local ip daddr @remote ip daddr != @local oifname != TUNNEL drop
    let expr = vec![
        matches(
            payload("ip", "saddr"),
            Operator::IN,
            set_ref(STRICT_LOCAL_SET),
        ),
        matches(
            payload("ip", "daddr"),
            Operator::IN,
            set_ref(STRICT_REMOTE_SET),
        ),
        matches(
            payload("ip", "daddr"),
            Operator::NEQ,
            set_ref(STRICT_LOCAL_SET),
        ),
        matches(
            Expression::Named(NamedExpression::Meta(Meta {
                key: MetaKey::Oifname,
            })),
            Operator::NEQ,
            Expression::String(Cow::Owned(ifname.clone())),
        ),
        Statement::Counter(Counter::Anonymous(None)),
        Statement::Drop(None),
    ];
    batch.add(NfListObject::Rule(Rule {
        family: NfFamily::INet,
        table: Cow::Borrowed(TABLE),
        chain: Cow::Borrowed(STRICT_CHAIN),
        expr: Cow::Owned(expr),
        comment: Some(Cow::Borrowed(
            "meshward strict mode: pod to remote pod only through the tunnel",
        )),
        ..Rule::default()
    }));
    Ok(batch.to_nftables())
}

/// Installs or updates strict mode in the kernel (in the calling thread's
/// network namespace). Never removes the table: it must outlive the agent
/// so traffic fails closed while the agent is down or restarting.
pub fn apply_strict(strict: &StrictMode) -> Result<(), EgressError> {
    let ruleset = strict_ruleset(strict)?;
    nftables::helper::apply_ruleset(&ruleset).map_err(|e| EgressError::Nft(e.to_string()))
}

/// Policy only (no mesh): strict mode left by a predecessor that ran the
/// mesh would drop the pod traffic between nodes that another CNI now
/// carries. Empties its sets, so its rule matches nothing; creates nothing
/// when there is no strict chain. Returns whether there was one.
pub fn disarm_strict() -> Result<bool, EgressError> {
    let listed = std::process::Command::new("nft")
        .args(["list", "chain", "inet", TABLE, STRICT_CHAIN])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| EgressError::Nft(format!("running nft: {e}")))?;
    if !listed.success() {
        return Ok(false);
    }
    let mut batch = Batch::new();
    for name in [STRICT_LOCAL_SET, STRICT_REMOTE_SET] {
        batch.add_cmd(NfCmd::Flush(FlushObject::Set(Box::new(interval_set(name)))));
    }
    nftables::helper::apply_ruleset(&batch.to_nftables())
        .map_err(|e| EgressError::Nft(e.to_string()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict() -> StrictMode {
        StrictMode {
            tunnel_ifname: "mw0".into(),
            local_pod_cidrs: vec!["198.19.1.0/24".parse().unwrap()],
            remote_pod_cidrs: vec![
                "198.19.0.0/16".parse().unwrap(),
                "198.19.2.0/24".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn ruleset_is_one_batch_with_rule_and_merged_sets() {
        let json = serde_json::to_value(strict_ruleset(&strict()).unwrap()).unwrap();
        let cmds = json["nftables"].as_array().unwrap();
        let text = json.to_string();
        assert!(text.contains("\"hook\":\"forward\""), "{text}");
        assert!(text.contains("\"@strict_remote_pods\""), "{text}");
        assert!(text.contains("\"oifname\""), "{text}");
        // The flush of the chain comes before the rule is added again.
        let flush_at = cmds.iter().position(|c| c.get("flush").is_some()).unwrap();
        let rule_at = cmds
            .iter()
            .position(|c| c["add"].get("rule").is_some())
            .unwrap();
        assert!(flush_at < rule_at);
        // 198.19.2.0/24 lies inside 198.19.0.0/16: one element, not two.
        let remote = cmds
            .iter()
            .find(|c| c["add"]["element"]["name"] == STRICT_REMOTE_SET)
            .unwrap();
        assert_eq!(
            remote["add"]["element"]["elem"].as_array().unwrap().len(),
            1
        );
    }

    #[test]
    fn bad_input_is_refused() {
        let mut s = strict();
        s.local_pod_cidrs.clear();
        assert!(matches!(strict_ruleset(&s), Err(EgressError::NoLocalPods)));
        let mut s = strict();
        s.tunnel_ifname = "a\"; drop".into();
        assert!(matches!(
            strict_ruleset(&s),
            Err(EgressError::BadInterface(_))
        ));
    }
}
