//! The sans-IO core of meshward's encrypted full mesh: one boringtun
//! [`Tunn`](boringtun::noise::Tunn) per peer, cryptokey routing both ways,
//! WireGuard timers, live peer changes and key rotation without packet loss.
//! No sockets, no TUN: the async shell reads packets and datagrams, hands
//! them to [`Mesh::outbound`] / [`Mesh::inbound`] with its own buffers, and
//! sends or writes what they return; it calls [`Mesh::tick`] every 100–250 ms.
//!
//! Concurrency: the peer table (routes, index and key maps, local keys) is an
//! immutable snapshot behind an `ArcSwap`, replaced whole on a configuration
//! change, so readers never block. Each peer's tunnels sit behind their own
//! mutex (boringtun's `Tunn` needs `&mut` to encrypt or decrypt), so the
//! TUN→UDP and UDP→TUN threads only meet on the same peer, for one packet.

mod config;
#[cfg(target_os = "linux")]
pub mod device;
mod keys;
mod mesh;
mod packet;
mod peer;
mod ratelog;
mod stats;
mod table;
mod time;

pub use boringtun::x25519::{PublicKey, StaticSecret};
pub use config::{ConfigError, MeshConfig, PeerConfig, MAX_PEERS};
#[cfg(target_os = "linux")]
pub use device::{Device, DeviceConfig, DeviceStats};
pub use ipnet::Ipv4Net;
pub use mesh::{Inbound, Mesh, Outbound};
pub use packet::DATA_OVERHEAD;
pub use ratelog::RateLimitedLog;
pub use stats::{DropCounts, DropReason, MeshStats, PeerStats};

/// The clock tests move when built with the `mock-time` feature.
#[cfg(feature = "mock-time")]
pub use mock_instant::MockClock;

/// Size of a buffer that fits any datagram `outbound` or `inbound` produces
/// from a packet of at most `mtu` bytes.
pub const fn buffer_len(mtu: usize) -> usize {
    let needed = mtu + DATA_OVERHEAD;
    if needed < 148 {
        148
    } else {
        needed
    }
}
