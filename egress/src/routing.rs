//! Policy routing for TPROXY: packets carrying the mark are delivered to a
//! local socket whatever their destination (`ip rule fwmark MARK/MASK
//! lookup TABLE` + `local 0.0.0.0/0 dev lo table TABLE`, and the IPv6
//! twins). Installed with rtnetlink, idempotently.

use std::net::{Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use netlink_packet_route::route::{RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use crate::EgressError;

/// Where redirected packets are looked up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TproxyRouting {
    pub mark: u32,
    pub table: u32,
    pub rule_priority: u32,
}

fn err(what: &str) -> impl FnOnce(rtnetlink::Error) -> EgressError + '_ {
    move |e| EgressError::Routing(format!("{what}: {e}"))
}

fn rule_table(rule: &RuleMessage) -> u32 {
    rule.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(rule.header.table))
}

fn is_ours(rule: &RuleMessage, r: &TproxyRouting) -> bool {
    let has = |want: RuleAttribute| rule.attributes.contains(&want);
    rule_table(rule) == r.table
        && has(RuleAttribute::FwMark(r.mark))
        && has(RuleAttribute::FwMask(r.mark))
        && has(RuleAttribute::Priority(r.rule_priority))
}

async fn ensure(handle: &Handle, r: &TproxyRouting) -> Result<(), EgressError> {
    let lo = handle
        .link()
        .get()
        .match_name("lo")
        .execute()
        .try_next()
        .await
        .map_err(err("look up lo"))?
        .ok_or_else(|| EgressError::Routing("no lo interface".into()))?
        .header
        .index;
    for version in [IpVersion::V4, IpVersion::V6] {
        let rules: Vec<RuleMessage> = handle
            .rule()
            .get(version.clone())
            .execute()
            .try_collect()
            .await
            .map_err(err("list ip rules"))?;
        if !rules.iter().any(|rule| is_ours(rule, r)) {
            let add = handle
                .rule()
                .add()
                .table_id(r.table)
                .priority(r.rule_priority)
                .fw_mark(r.mark)
                .action(RuleAction::ToTable);
            let result = match version {
                IpVersion::V4 => {
                    let mut req = add.v4();
                    req.message_mut()
                        .attributes
                        .push(RuleAttribute::FwMask(r.mark));
                    req.execute().await
                }
                IpVersion::V6 => {
                    let mut req = add.v6();
                    req.message_mut()
                        .attributes
                        .push(RuleAttribute::FwMask(r.mark));
                    req.execute().await
                }
            };
            result.map_err(err("add the tproxy ip rule"))?;
        }
        let route = match version {
            IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .table_id(r.table)
                .output_interface(lo)
                .build(),
            IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .table_id(r.table)
                .output_interface(lo)
                .build(),
        };
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(err("add the tproxy local route"))?;
    }
    Ok(())
}

/// Installs the rule and routes in the calling thread's network namespace.
/// Safe to call from inside an async runtime: the work runs on its own
/// short-lived thread (which inherits the namespace).
pub fn ensure_tproxy_routing(r: &TproxyRouting) -> Result<(), EgressError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|e| EgressError::Routing(format!("start netlink runtime: {e}")))?;
            runtime.block_on(async {
                let (conn, handle, _) = rtnetlink::new_connection()
                    .map_err(|e| EgressError::Routing(format!("open netlink socket: {e}")))?;
                let task = tokio::spawn(conn);
                let out = ensure(&handle, r).await;
                task.abort();
                out
            })
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}
