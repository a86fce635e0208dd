//! `lab up`: builds the fabric, the external namespace, the nodes and the
//! pods, recording each in lab.json as it goes.
//!
//! ```text
//!  mwl-NAME-ext            mwl-NAME-fabric            mwl-NAME-nodeI           mwl-NAME-nodeI-podJ
//!  eth0 198.18.100.1/24 ── ext ─┐                ┌── nI ── eth0 198.18.0.I/24
//!                              br0 ─────────────┤          mwXXXX (CNI) ───────── eth0 198.19.I.J/32
//! ```

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;

use super::cni;
use super::links;
use super::netns;
use super::services;
use super::state::{self, External, Fabric, Lab, Node, Pod};
use super::topology::{self as topo, LabName};

/// The Kubernetes namespace lab pods claim to be in.
const POD_K8S_NAMESPACE: &str = "default";

/// Builds lab `lab` with `nodes` nodes of `pods` pods each (pods need the
/// CNI plugin `cni_bin`). Everything created is under the lab's prefix, so
/// the caller can tear down a half-built lab by name.
/// `policy_only`: nodes route each other's pod CIDRs over the fabric (as a
/// cloud VPC routes its CNI's pods) instead of refusing them.
pub fn build(
    lab: &LabName,
    nodes: u8,
    pods: u8,
    cni_bin: Option<&Path>,
    policy_only: bool,
) -> Result<Lab> {
    let dir = state::state_dir(lab);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let fabric = fabric(lab).context("setting up the fabric")?;
    let external = external(lab, &fabric, nodes).context("setting up the external namespace")?;
    services::write_resolv_conf(&dir)?;
    services::start(&external.namespace, &dir).context("starting the external services")?;
    let mut state = Lab {
        version: state::VERSION,
        name: lab.to_string(),
        cni_bin: cni_bin.map(Path::to_path_buf),
        fabric: Fabric {
            namespace: lab.fabric_ns(),
            bridge: topo::BRIDGE.into(),
        },
        external,
        nodes: Vec::new(),
        policy_only,
    };
    for index in 1..=nodes {
        let node = node(lab, &fabric, index, nodes, policy_only)
            .with_context(|| format!("setting up {}", topo::node_name(index)))?;
        state.nodes.push(node);
    }
    state.save(lab)?;

    let Some(cni_bin) = cni_bin else {
        if pods > 0 {
            bail!("pods need the {} binary", cni::BINARY);
        }
        return Ok(state);
    };
    for n in 0..state.nodes.len() {
        let node_ns = netns::open(&state.nodes[n].namespace)?;
        for index in 1..=pods {
            let node = &state.nodes[n];
            let pod = pod(lab, node, &node_ns, index, cni_bin)
                .with_context(|| format!("creating pod {}", topo::pod_name(node.index, index)))?;
            state.nodes[n].pods.push(pod);
            // Keep lab.json current, so `lab status` shows a slow lab growing.
            state.save(lab)?;
        }
    }
    Ok(state)
}

/// Creates namespace `name` with lo up and IPv4 forwarding set as given
/// (new namespaces otherwise inherit the host's setting).
fn namespace(name: &str, forwarding: bool) -> Result<File> {
    netns::create(name)?;
    let ns = netns::open(name)?;
    netns::netlink(&ns, |h| async move { links::set_up(&h, "lo").await })
        .with_context(|| format!("in namespace {name}"))?;
    netns::set_sysctl(
        &ns,
        "net/ipv4/ip_forward",
        if forwarding { "1" } else { "0" },
    )
    .with_context(|| format!("in namespace {name}"))?;
    Ok(ns)
}

/// The fabric: a namespace holding only the underlay bridge.
fn fabric(lab: &LabName) -> Result<File> {
    let name = lab.fabric_ns();
    let ns = namespace(&name, false)?;
    netns::netlink(
        &ns,
        |h| async move { links::add_bridge(&h, topo::BRIDGE).await },
    )
    .with_context(|| format!("in namespace {name}"))?;
    Ok(ns)
}

/// Connects namespace `member` to the fabric bridge: a veth with `eth0`
/// (holding `address`) in `member` and `port` on the bridge.
fn attach(member: &File, fabric: &File, port: &str, address: Ipv4Net) -> Result<()> {
    let fabric_fd = fabric.as_raw_fd();
    let ifname = topo::UNDERLAY_IFNAME;
    netns::netlink(member, |h| async move {
        links::add_veth(&h, ifname, port).await?;
        links::move_to_netns(&h, port, fabric_fd).await?;
        links::add_address(&h, ifname, address).await?;
        links::set_up(&h, ifname).await
    })?;
    netns::netlink(fabric, |h| async move {
        links::attach_to_bridge(&h, port, topo::BRIDGE).await
    })
    .context("in the fabric namespace")
}

/// The external namespace: outside services live here. It reaches the
/// underlay on-link and each node's pods through that node.
fn external(lab: &LabName, fabric: &File, nodes: u8) -> Result<External> {
    let name = lab.external_ns();
    let ns = namespace(&name, false)?;
    attach(&ns, fabric, topo::EXTERNAL_PORT, topo::EXTERNAL_ADDRESS)?;
    netns::netlink(&ns, |h| async move {
        links::add_onlink_route(&h, topo::UNDERLAY, topo::UNDERLAY_IFNAME).await?;
        for index in 1..=nodes {
            let via = topo::node_address(index).addr();
            links::add_gateway_route(&h, topo::pod_cidr(index), via).await?;
        }
        Ok(())
    })
    .with_context(|| format!("in namespace {name}"))?;
    Ok(External {
        namespace: name,
        interface: topo::UNDERLAY_IFNAME.into(),
        address: topo::EXTERNAL_ADDRESS,
    })
}

/// Node `index`: forwards for its pods, reaches the external subnet
/// on-link, and refuses every other pod CIDR (`unreachable`) until the
/// encrypted mesh routes them: no cross-node pod packet leaves in plaintext.
/// In a policy-only lab it routes the other `nodes`' pod CIDRs to them over
/// the fabric instead.
fn node(lab: &LabName, fabric: &File, index: u8, nodes: u8, policy_only: bool) -> Result<Node> {
    let name = lab.node_ns(index);
    let ns = namespace(&name, true)?;
    let address = topo::node_address(index);
    attach(&ns, fabric, &topo::fabric_port(index), address)?;
    netns::netlink(&ns, |h| async move {
        links::add_onlink_route(&h, topo::EXTERNAL_NET, topo::UNDERLAY_IFNAME).await?;
        let external = topo::EXTERNAL_ADDRESS.addr();
        links::add_gateway_route(&h, super::services::FRESH_NET, external).await?;
        if policy_only {
            for other in (1..=nodes).filter(|&other| other != index) {
                let via = topo::node_address(other).addr();
                links::add_gateway_route(&h, topo::pod_cidr(other), via).await?;
            }
            Ok(())
        } else {
            links::add_unreachable_route(&h, topo::POD_SUPERNET).await
        }
    })
    .with_context(|| format!("in namespace {name}"))?;

    let dir = state::node_dir(lab, index);
    let ipam_dir = dir.join("ipam");
    fs::create_dir_all(&ipam_dir).with_context(|| format!("creating {}", ipam_dir.display()))?;
    Ok(Node {
        name: topo::node_name(index),
        index,
        namespace: name,
        interface: topo::UNDERLAY_IFNAME.into(),
        address,
        pod_cidr: topo::pod_cidr(index),
        ipam_dir,
        agent_socket: dir.join("agent.sock"),
        pods: Vec::new(),
    })
}

/// Pod `index` of `node`: a namespace with lo up, networked by one CNI ADD
/// run inside the node's namespace, as the node's container runtime would.
fn pod(lab: &LabName, node: &Node, node_ns: &File, index: u8, cni_bin: &Path) -> Result<Pod> {
    let name = topo::pod_name(node.index, index);
    let namespace = lab.pod_ns(node.index, index);
    self::namespace(&namespace, false)?;
    let netns_path: PathBuf = netns::path(&namespace);
    let config = cni::network_config(node.pod_cidr, &node.ipam_dir, &node.agent_socket);
    // The namespace name is unique across labs and nodes: a fine container ID.
    let container_id = namespace.clone();
    tracing::info!(pod = %name, plugin = %cni_bin.display(), "CNI ADD");
    let added = cni::Add {
        plugin: cni_bin,
        host_netns: node_ns,
        container_id: &container_id,
        netns_path: &netns_path,
        ifname: topo::POD_IFNAME,
        pod_namespace: POD_K8S_NAMESPACE,
        pod_name: &name,
        config: &config,
    }
    .run()?;
    if !node.pod_cidr.contains(&added.address.addr()) {
        bail!(
            "{} gave pod {name} address {} outside {}'s pod CIDR {}",
            cni::BINARY,
            added.address,
            node.name,
            node.pod_cidr
        );
    }
    Ok(Pod {
        name,
        namespace,
        container_id,
        interface: topo::POD_IFNAME.into(),
        address: added.address,
        cni_result: added.result,
        k8s_namespace: POD_K8S_NAMESPACE.into(),
        labels: Default::default(),
    })
}
