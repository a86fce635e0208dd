//! The per-pod data path, over netlink: an L3 veth pair with no bridge, as
//! Calico builds it.
//!
//! Host side: `mw` + hash, a fixed MAC, proxy ARP, and a /32 route to the
//! pod. Pod side: the /32 address, a permanent neighbour entry for the
//! link-local gateway (so no ARP is needed, even on a node without a
//! default route) and `default via 169.254.1.1 onlink`.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags};
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteScope};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use sha2::{Digest, Sha256};

use crate::netns;
use crate::spec::GATEWAY;

/// The MAC of every host-side veth. Pods only ever talk to the gateway
/// through it, so one locally administered address serves all of them and
/// the pod's neighbour entry can be written without asking the kernel.
pub const HOST_MAC: [u8; 6] = [0xee; 6];

/// A data path failure, with what we were doing when it happened.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("interface {ifname} already exists in the container's network namespace")]
    InterfaceExists { ifname: String },
    #[error("{what}: {detail}")]
    Netlink { what: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Mismatch(String),
}

type Result<T> = std::result::Result<T, DatapathError>;

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> DatapathError {
    let what = what.into();
    move |e| DatapathError::Netlink {
        what,
        detail: describe(&e),
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DatapathError {
    let what = what.into();
    move |source| DatapathError::Io { what, source }
}

/// netlink errors carry a negative errno; say it the way `ip` would.
fn describe(e: &rtnetlink::Error) -> String {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io().to_string(),
        other => other.to_string(),
    }
}

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => Some(-msg.raw_code()),
        _ => None,
    }
}

/// The host-side name for an attachment: stable, so DEL finds it without
/// state, and short enough for IFNAMSIZ.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("mw{}", &hex[..11])
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What ADD created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLink {
    pub pod_mac: String,
    /// False when the pod already had a default route (a second interface,
    /// e.g. from a multi-network runtime): the first one keeps it.
    pub default_route: bool,
}

/// Runs `f` with a netlink handle in the calling thread's network namespace.
fn with_handle<T>(f: impl AsyncFnOnce(Handle) -> Result<T>) -> Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(io("start netlink runtime"))?;
    runtime.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(io("open netlink socket"))?;
        let task = tokio::spawn(conn);
        let out = f(handle).await;
        task.abort();
        out
    })
}

/// Runs `f` with a netlink handle inside the network namespace `ns`.
fn with_handle_in<T: Send>(
    ns: &File,
    f: impl AsyncFnOnce(Handle) -> Result<T> + Send,
) -> Result<T> {
    netns::run_in(ns, || with_handle(f)).map_err(io("enter the container's network namespace"))?
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkInfo>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(LinkInfo::from(msg))),
        Ok(None) => Ok(None),
        Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(netlink(format!("look up interface {name}"))(e)),
    }
}

struct LinkInfo {
    index: u32,
    up: bool,
    mtu: Option<u32>,
    mac: Vec<u8>,
}

impl From<netlink_packet_route::link::LinkMessage> for LinkInfo {
    fn from(msg: netlink_packet_route::link::LinkMessage) -> Self {
        let mut info = LinkInfo {
            index: msg.header.index,
            up: msg.header.flags.contains(LinkFlags::Up),
            mtu: None,
            mac: Vec::new(),
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::Mtu(m) => info.mtu = Some(m),
                LinkAttribute::Address(a) => info.mac = a,
                _ => {}
            }
        }
        info
    }
}

fn write_sysctl(path: &str, value: &str) -> Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(path, value).map_err(io(format!("write {path}")))
}

/// Creates the pod's veth pair and configures both ends. On failure nothing
/// is left behind: the host end is deleted, which takes the pod end with it.
pub fn add(
    ns: &File,
    host_ifname: &str,
    pod_ifname: &str,
    ip: Ipv4Addr,
    mtu: u32,
) -> Result<PodLink> {
    // Refuse before touching anything if the container already has the name.
    let exists = with_handle_in(ns, async |h| {
        Ok(link_by_name(&h, pod_ifname).await?.is_some())
    })?;
    if exists {
        return Err(DatapathError::InterfaceExists {
            ifname: pod_ifname.to_string(),
        });
    }
    with_handle(async |h| {
        // A host end left by a crashed ADD for the same attachment is ours.
        if let Some(stale) = link_by_name(&h, host_ifname).await? {
            h.link()
                .del(stale.index)
                .execute()
                .await
                .map_err(netlink(format!("delete stale {host_ifname}")))?;
        }
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(pod_ifname.to_string())
            .mtu(mtu)
            .setns_by_fd(ns.as_raw_fd())
            .build();
        let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host_ifname.to_string())
            .mtu(mtu)
            .address(HOST_MAC.to_vec())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        h.link().add(veth).execute().await.map_err(netlink(format!(
            "create veth {host_ifname} <-> {pod_ifname}"
        )))
    })?;
    let configured = configure_host(host_ifname, ip)
        .and_then(|()| with_handle_in(ns, async |h| configure_pod(&h, pod_ifname, ip).await));
    if configured.is_err() {
        let _ = delete_host_link(host_ifname);
    }
    configured
}

fn configure_host(host_ifname: &str, ip: Ipv4Addr) -> Result<()> {
    write_sysctl(
        &format!("/proc/sys/net/ipv4/conf/{host_ifname}/proxy_arp"),
        "1",
    )?;
    // Without this the kernel delays proxy ARP answers by up to 0.8 s.
    write_sysctl(
        &format!("/proc/sys/net/ipv4/neigh/{host_ifname}/proxy_delay"),
        "0",
    )?;
    write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    with_handle(async |h| {
        let link = link_by_name(&h, host_ifname)
            .await?
            .ok_or_else(|| DatapathError::Mismatch(format!("{host_ifname} vanished")))?;
        h.link()
            .set(LinkUnspec::new_with_index(link.index).up().build())
            .execute()
            .await
            .map_err(netlink(format!("set {host_ifname} up")))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .output_interface(link.index)
            .scope(RouteScope::Link)
            .build();
        h.route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("add route {ip}/32 dev {host_ifname}")))
    })
}

async fn configure_pod(h: &Handle, pod_ifname: &str, ip: Ipv4Addr) -> Result<PodLink> {
    let link = link_by_name(h, pod_ifname)
        .await?
        .ok_or_else(|| DatapathError::Mismatch(format!("{pod_ifname} did not appear")))?;
    h.link()
        .set(LinkUnspec::new_with_index(link.index).up().build())
        .execute()
        .await
        .map_err(netlink(format!("set {pod_ifname} up")))?;
    h.address()
        .add(link.index, IpAddr::V4(ip), 32)
        .execute()
        .await
        .map_err(netlink(format!("add address {ip}/32 to {pod_ifname}")))?;
    h.neighbours()
        .add(link.index, IpAddr::V4(GATEWAY))
        .link_layer_address(&HOST_MAC)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(netlink(format!("add neighbour {GATEWAY} on {pod_ifname}")))?;
    let default = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .gateway(GATEWAY)
        .output_interface(link.index)
        .onlink()
        .build();
    let default_route = match h.route().add(default).execute().await {
        Ok(()) => true,
        Err(e) if errno_of(&e) == Some(libc::EEXIST) => false,
        Err(e) => {
            return Err(netlink(format!(
                "add default route via {GATEWAY} dev {pod_ifname}"
            ))(e))
        }
    };
    Ok(PodLink {
        pod_mac: format_mac(&link.mac),
        default_route,
    })
}

/// Deletes the host end (and with it the pod end and the /32 route).
/// Returns whether there was anything to delete; a missing link is success,
/// so DEL stays idempotent.
pub fn delete_host_link(host_ifname: &str) -> Result<bool> {
    with_handle(async |h| {
        let Some(link) = link_by_name(&h, host_ifname).await? else {
            return Ok(false);
        };
        match h.link().del(link.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(netlink(format!("delete {host_ifname}"))(e)),
        }
    })
}

/// Verifies what ADD built is still in place.
/// `default_route`: whether ADD reported the default route as ours.
pub fn check(
    ns: &File,
    host_ifname: &str,
    pod_ifname: &str,
    ip: Ipv4Addr,
    mtu: u32,
    default_route: bool,
) -> Result<()> {
    let mismatch = |m: String| Err(DatapathError::Mismatch(m));
    with_handle(async |h| {
        let Some(link) = link_by_name(&h, host_ifname).await? else {
            return mismatch(format!("host interface {host_ifname} is missing"));
        };
        if !link.up {
            return mismatch(format!("host interface {host_ifname} is down"));
        }
        if !has_route(&h, ip, 32, None, link.index).await? {
            return mismatch(format!("host route {ip}/32 dev {host_ifname} is missing"));
        }
        Ok(())
    })?;
    with_handle_in(ns, async |h| {
        let Some(link) = link_by_name(&h, pod_ifname).await? else {
            return mismatch(format!("pod interface {pod_ifname} is missing"));
        };
        if !link.up {
            return mismatch(format!("pod interface {pod_ifname} is down"));
        }
        if link.mtu != Some(mtu) {
            return mismatch(format!(
                "pod interface {pod_ifname} has MTU {:?}, expected {mtu}",
                link.mtu
            ));
        }
        let mut addrs = h
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute();
        let mut found = false;
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(netlink(format!("list addresses of {pod_ifname}")))?
        {
            let is_ours = msg.header.prefix_len == 32
                && msg
                    .attributes
                    .iter()
                    .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(a)) if *a == ip));
            found |= is_ours;
        }
        if !found {
            return mismatch(format!("pod interface {pod_ifname} lacks {ip}/32"));
        }
        if default_route
            && !has_route(&h, Ipv4Addr::UNSPECIFIED, 0, Some(GATEWAY), link.index).await?
        {
            return mismatch(format!(
                "pod default route via {GATEWAY} dev {pod_ifname} is missing"
            ));
        }
        Ok(())
    })
}

async fn has_route(
    h: &Handle,
    dst: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
    oif: u32,
) -> Result<bool> {
    let mut routes = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(route) = routes.try_next().await.map_err(netlink("list routes"))? {
        if route.header.destination_prefix_length != prefix {
            continue;
        }
        let mut route_dst = Ipv4Addr::UNSPECIFIED;
        let mut route_gw = None;
        let mut route_oif = None;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(a)) => route_dst = *a,
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => route_gw = Some(*a),
                RouteAttribute::Oif(i) => route_oif = Some(*i),
                _ => {}
            }
        }
        if route_dst == dst && route_gw == gateway && route_oif == Some(oif) {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_stable_short_and_distinct() {
        let a = host_ifname("c1", "eth0");
        assert_eq!(a, host_ifname("c1", "eth0"));
        assert_eq!(a.len(), 13);
        assert!(a.starts_with("mw"));
        assert_ne!(a, host_ifname("c1", "eth1"));
        assert_ne!(a, host_ifname("c2", "eth0"));
    }

    #[test]
    fn mac_format() {
        assert_eq!(format_mac(&HOST_MAC), "ee:ee:ee:ee:ee:ee");
    }
}
