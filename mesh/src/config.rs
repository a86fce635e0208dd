//! What the agent tells the mesh: its peers and a few tunables.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use boringtun::x25519::PublicKey;
use ipnet::Ipv4Net;

/// One other node of the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// Stable identity of the peer (the node name): a new key under the same
    /// name is a key change that keeps traffic flowing, not a new peer.
    pub name: String,
    pub public_key: PublicKey,
    /// Underlay address. `None` until known; the peer may also be learned
    /// from its authenticated datagrams (roaming).
    pub endpoint: Option<SocketAddr>,
    /// The peer's pod CIDRs: outbound packets to them go to this peer, and
    /// inbound packets from this peer must come from them.
    pub allowed_ips: Vec<Ipv4Net>,
    /// Persistent keepalive in seconds (for NAT); `None` or `Some(0)` disables it.
    pub keepalive: Option<u16>,
}

/// Tunables; `Default` gives what the agent should use.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// How long a key change (ours or a peer's) may wait for the handshake
    /// with the new key before the old session is given up.
    pub rotation_timeout: Duration,
    /// After a switch to a new session, the old one keeps decrypting until
    /// the peer has sent nothing on it for this long...
    pub drain_idle: Duration,
    /// ...and never longer than this.
    pub drain_max: Duration,
    /// Handshake initiations per second per local key verified before the
    /// mesh demands cookies (WireGuard's DoS defence).
    pub handshake_rate_limit: u64,
    /// At most `log_lines` lines about dropped datagrams per `log_interval`.
    pub log_lines: u32,
    pub log_interval: Duration,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            rotation_timeout: Duration::from_secs(300),
            drain_idle: Duration::from_secs(5),
            drain_max: Duration::from_secs(60),
            handshake_rate_limit: 100,
            log_lines: 10,
            log_interval: Duration::from_secs(10),
        }
    }
}

/// A peer list `set_peers` refuses; nothing is changed when it does.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{count} peers: more than the {MAX_PEERS} supported")]
    TooManyPeers { count: usize },
    #[error("a peer has an empty name")]
    EmptyName,
    #[error("peer {name:?} is listed twice")]
    DuplicateName { name: String },
    #[error("peers {first:?} and {second:?} have the same public key")]
    DuplicateKey { first: String, second: String },
    #[error("peer {name:?} has this node's own public key")]
    OwnKey { name: String },
    #[error("allowed IP {net} is claimed by both {first:?} and {second:?}")]
    DuplicateAllowedIp {
        net: Ipv4Net,
        first: String,
        second: String,
    },
}

/// Far below the 2^22 peer ids, so picking a free id stays quick.
pub const MAX_PEERS: usize = 1 << 20;

pub(crate) fn validate(peers: &[PeerConfig], own_key: &PublicKey) -> Result<(), ConfigError> {
    if peers.len() > MAX_PEERS {
        return Err(ConfigError::TooManyPeers { count: peers.len() });
    }
    let mut names = HashMap::new();
    let mut keys: HashMap<[u8; 32], &str> = HashMap::new();
    let mut nets: HashMap<Ipv4Net, &str> = HashMap::new();
    for peer in peers {
        if peer.name.is_empty() {
            return Err(ConfigError::EmptyName);
        }
        if names.insert(peer.name.as_str(), ()).is_some() {
            return Err(ConfigError::DuplicateName {
                name: peer.name.clone(),
            });
        }
        if peer.public_key == *own_key {
            return Err(ConfigError::OwnKey {
                name: peer.name.clone(),
            });
        }
        if let Some(first) = keys.insert(peer.public_key.to_bytes(), &peer.name) {
            return Err(ConfigError::DuplicateKey {
                first: first.to_owned(),
                second: peer.name.clone(),
            });
        }
        for net in &peer.allowed_ips {
            let net = net.trunc();
            match nets.insert(net, &peer.name) {
                Some(first) if first != peer.name => {
                    return Err(ConfigError::DuplicateAllowedIp {
                        net,
                        first: first.to_owned(),
                        second: peer.name.clone(),
                    })
                }
                _ => {}
            }
        }
    }
    Ok(())
}
