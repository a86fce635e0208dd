//! The tunnel interface's address and the routes through it, over rtnetlink.
//!
//! Routes are `<remote pod CIDR> dev mw0 src <this node's tunnel address>`
//! in the main table, marked with our own route protocol number
//! ([`ROUTE_PROTOCOL`], shown by `ip route` as `proto 109`), so reconciling
//! touches exactly the routes this agent owns and nothing an operator added.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

/// `proto 109` in `ip route`: routes meshward owns.
pub const ROUTE_PROTOCOL: u8 = 109;
/// The main routing table.
const MAIN_TABLE: u32 = 254;

#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct NetlinkError {
    what: String,
    message: String,
    errno: Option<i32>,
}

fn nl_error(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |e| NetlinkError {
        what,
        errno: match &e {
            rtnetlink::Error::NetlinkError(msg) => Some(-msg.raw_code()),
            _ => None,
        },
        message: match &e {
            rtnetlink::Error::NetlinkError(msg) => msg.to_io().to_string(),
            other => other.to_string(),
        },
    }
}

/// Opens a netlink socket in the calling thread's network namespace and
/// drives it on the current tokio runtime.
pub fn connect() -> Result<Handle, NetlinkError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| NetlinkError {
        what: "opening a netlink socket".into(),
        message: e.to_string(),
        errno: e.raw_os_error(),
    })?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Gives link `index` (named `name`, for messages) the address `address/32`;
/// nothing happens when it already has it.
pub async fn set_address(
    handle: &Handle,
    index: u32,
    name: &str,
    address: Ipv4Addr,
) -> Result<(), NetlinkError> {
    handle
        .address()
        .add(index, address.into(), 32)
        .replace()
        .execute()
        .await
        .map_err(nl_error(format!("adding address {address}/32 to {name}")))
}

/// One route of ours as found in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Found {
    oif: Option<u32>,
    pref_source: Option<Ipv4Addr>,
}

/// Our IPv4 routes in the main table, by destination.
async fn our_routes(handle: &Handle) -> Result<BTreeMap<Ipv4Net, Found>, NetlinkError> {
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut found = BTreeMap::new();
    while let Some(route) = routes
        .try_next()
        .await
        .map_err(nl_error("listing IPv4 routes"))?
    {
        if route.header.address_family != AddressFamily::Inet
            || route.header.protocol != RouteProtocol::from(ROUTE_PROTOCOL)
            || table_of(&route) != MAIN_TABLE
        {
            continue;
        }
        let mut destination = Ipv4Addr::UNSPECIFIED;
        let mut oif = None;
        let mut pref_source = None;
        for attribute in &route.attributes {
            match attribute {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => destination = *ip,
                RouteAttribute::Oif(index) => oif = Some(*index),
                RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => pref_source = Some(*ip),
                _ => {}
            }
        }
        if let Ok(net) = Ipv4Net::new(destination, route.header.destination_prefix_length) {
            found.insert(net, Found { oif, pref_source });
        }
    }
    Ok(found)
}

fn table_of(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

fn route_message(destination: Ipv4Net, index: u32, source: Ipv4Addr) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(destination.network(), destination.prefix_len())
        .output_interface(index)
        .pref_source(source)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::from(ROUTE_PROTOCOL))
        .table_id(MAIN_TABLE)
        .build()
}

/// What a route reconciliation changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RouteChanges {
    pub added: Vec<Ipv4Net>,
    pub removed: Vec<Ipv4Net>,
}

/// Makes our routes exactly `desired`, each `dev <index> src <source>`:
/// adds or replaces what is missing or different, removes the rest. Every
/// route is attempted; the first error is returned after the others ran.
pub async fn reconcile_routes(
    handle: &Handle,
    index: u32,
    name: &str,
    source: Ipv4Addr,
    desired: &BTreeSet<Ipv4Net>,
) -> Result<RouteChanges, NetlinkError> {
    let existing = our_routes(handle).await?;
    let wanted = Found {
        oif: Some(index),
        pref_source: Some(source),
    };
    let mut changes = RouteChanges::default();
    let mut first_error = None;
    for destination in desired {
        if existing.get(destination) == Some(&wanted) {
            continue;
        }
        let result = handle
            .route()
            .add(route_message(*destination, index, source))
            .replace()
            .execute()
            .await
            .map_err(nl_error(format!(
                "adding route {destination} dev {name} src {source}"
            )));
        match result {
            Ok(()) => changes.added.push(*destination),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    for (destination, found) in &existing {
        if desired.contains(destination) {
            continue;
        }
        let mut message = route_message(*destination, found.oif.unwrap_or(index), source);
        // match on destination, table and protocol only
        message
            .attributes
            .retain(|a| !matches!(a, RouteAttribute::PrefSource(_) | RouteAttribute::Oif(_)));
        let result = handle
            .route()
            .del(message)
            .execute()
            .await
            .map_err(nl_error(format!("removing route {destination}")));
        match result {
            Ok(()) => changes.removed.push(*destination),
            // gone already (its interface went away): fine
            Err(e) if e.errno == Some(libc::ESRCH) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(changes),
    }
}
