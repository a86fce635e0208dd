//! The few netlink operations the lab needs, each naming what it changes in
//! its error. They act in whatever namespace the handle's socket lives in
//! (see `netns::netlink`).

use std::net::Ipv4Addr;
use std::os::fd::RawFd;

use anyhow::{anyhow, Context, Result};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::route::{RouteScope, RouteType};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// The index of link `name`.
pub async fn index(handle: &Handle, name: &str) -> Result<u32> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(anyhow!("link {name} not found")),
        Err(e) => Err(e).with_context(|| format!("looking up link {name}")),
    }
}

/// Sets link `name` up.
pub async fn set_up(handle: &Handle, name: &str) -> Result<()> {
    handle
        .link()
        .set(LinkUnspec::new_with_name(name).up().build())
        .execute()
        .await
        .with_context(|| format!("setting link {name} up"))
}

/// Adds bridge `name`, up.
pub async fn add_bridge(handle: &Handle, name: &str) -> Result<()> {
    handle
        .link()
        .add(LinkBridge::new(name).up().build())
        .execute()
        .await
        .with_context(|| format!("adding bridge {name}"))
}

/// Adds the veth pair `name` <-> `peer`, both ends here.
pub async fn add_veth(handle: &Handle, name: &str, peer: &str) -> Result<()> {
    handle
        .link()
        .add(LinkVeth::new(name, peer).build())
        .execute()
        .await
        .with_context(|| format!("adding veth pair {name}/{peer}"))
}

/// Moves link `name` into the namespace open as `netns_fd`.
pub async fn move_to_netns(handle: &Handle, name: &str, netns_fd: RawFd) -> Result<()> {
    handle
        .link()
        .set(
            LinkUnspec::new_with_name(name)
                .setns_by_fd(netns_fd)
                .build(),
        )
        .execute()
        .await
        .with_context(|| format!("moving link {name} to another namespace"))
}

/// Attaches link `port` to bridge `bridge` and sets it up.
pub async fn attach_to_bridge(handle: &Handle, port: &str, bridge: &str) -> Result<()> {
    let bridge_index = index(handle, bridge).await?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_name(port)
                .controller(bridge_index)
                .up()
                .build(),
        )
        .execute()
        .await
        .with_context(|| format!("attaching {port} to bridge {bridge}"))
}

/// Adds `address` (with its prefix) to link `name`.
pub async fn add_address(handle: &Handle, name: &str, address: Ipv4Net) -> Result<()> {
    let link = index(handle, name).await?;
    handle
        .address()
        .add(link, address.addr().into(), address.prefix_len())
        .execute()
        .await
        .with_context(|| format!("adding address {address} to {name}"))
}

/// `ip route add DST dev DEV scope link`
pub async fn add_onlink_route(handle: &Handle, dst: Ipv4Net, dev: &str) -> Result<()> {
    let link = index(handle, dev).await?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .output_interface(link)
        .scope(RouteScope::Link)
        .build();
    handle
        .route()
        .add(route)
        .execute()
        .await
        .with_context(|| format!("adding route {dst} dev {dev}"))
}

/// `ip route add DST via GW`
pub async fn add_gateway_route(handle: &Handle, dst: Ipv4Net, gateway: Ipv4Addr) -> Result<()> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .gateway(gateway)
        .build();
    handle
        .route()
        .add(route)
        .execute()
        .await
        .with_context(|| format!("adding route {dst} via {gateway}"))
}

/// `ip route add unreachable DST`
pub async fn add_unreachable_route(handle: &Handle, dst: Ipv4Net) -> Result<()> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .kind(RouteType::Unreachable)
        .build();
    handle
        .route()
        .add(route)
        .execute()
        .await
        .with_context(|| format!("adding route unreachable {dst}"))
}

/// `ip route add local DST dev DEV` (in the local table): every address
/// of DST is this namespace's own, without one address per host.
pub async fn add_local_route(handle: &Handle, dst: Ipv4Net, dev: &str) -> Result<()> {
    let link = index(handle, dev).await?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .output_interface(link)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .table_id(255)
        .build();
    handle
        .route()
        .add(route)
        .execute()
        .await
        .with_context(|| format!("adding route local {dst} dev {dev}"))
}
