//! The TUN device: created with `IFF_VNET_HDR` (TCP/UDP segmentation
//! offloads, so the kernel hands us 64 KiB TCP super-packets and takes them
//! back coalesced) and one queue per worker (`IFF_MULTI_QUEUE`: the kernel
//! spreads flows over the queues). tun-rs does the virtio-net header work:
//! GSO split on read (`recv_multiple`), GRO on write (`send_multiple`).

use std::io;

use tun_rs::{DeviceBuilder, SyncDevice};

const TX_QUEUE_LEN: u32 = 1000;

pub(crate) struct Tun {
    pub queues: Vec<SyncDevice>,
    pub name: String,
    pub index: u32,
    /// Offloads on: reads may be super-packets, writes may be coalesced.
    pub offload: bool,
}

/// Creates `name` with `queues` queues, sets the MTU and brings it up.
pub(crate) fn create(name: &str, mtu: u16, queues: usize) -> io::Result<Tun> {
    let queues = queues.max(1);
    // A multi-queue TUN open elsewhere would be joined, not refused: one
    // device owner at a time (a handover will attach on purpose).
    if nix::net::if_::if_nametoindex(name).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("network device {name} already exists"),
        ));
    }
    let build = |offload: bool| {
        DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            // Room for bursts while a worker is descheduled (default 500).
            .tx_queue_len(TX_QUEUE_LEN)
            .offload(offload)
            // Multi-queue even with one queue: a successor process can then
            // attach its own queues to the live device (by name) before this
            // one lets go, so the device and its routes outlive a handover.
            .multi_queue(true)
            .build_sync()
    };
    let first = match build(true) {
        Ok(dev) => dev,
        Err(e) => {
            // A kernel without virtio-net header support on TUN: slower, still correct.
            tracing::warn!(tun = name, error = %e, "TUN offloads unavailable; using plain reads and writes");
            build(false)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot create TUN {name}: {e}")))?
        }
    };
    let offload = first.tcp_gso();
    let mut all = vec![first];
    for _ in 1..queues {
        let queue = all[0]
            .try_clone()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open a queue of {name}: {e}")))?;
        all.push(queue);
    }
    for queue in &all {
        queue.set_nonblocking(true)?;
    }
    let index = all[0].if_index()?;
    let name = all[0].name()?;
    tracing::info!(
        tun = %name,
        index,
        mtu,
        queues,
        offload,
        udp_gso = all[0].udp_gso(),
        "TUN created"
    );
    Ok(Tun {
        queues: all,
        name,
        index,
        offload,
    })
}
