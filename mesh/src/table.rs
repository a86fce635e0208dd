//! The immutable peer table both data-path threads read: rebuilt and swapped
//! whole on every configuration change, never locked by readers.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use prefix_trie::PrefixMap;

use crate::keys::LocalKeys;
use crate::peer::Peer;

/// Peer ids are random, so a multiplicative hash is as good as SipHash and
/// several times cheaper on the per-datagram lookup.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 << 8 | u64::from(*byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub(crate) struct PeerEntry {
    pub peer: Arc<Peer>,
    pub allowed_ips: Vec<Ipv4Net>,
}

pub(crate) struct Table {
    pub keys: Arc<LocalKeys>,
    /// Sorted by name.
    pub peers: Vec<PeerEntry>,
    pub by_id: HashMap<u32, Arc<Peer>, BuildHasherDefault<IdHasher>>,
    /// Configured keys, plus the older keys live tunnels still use (so a peer
    /// that rotated can keep handshaking with its old key until we switch).
    pub by_key: HashMap<[u8; 32], Arc<Peer>>,
    pub routes: PrefixMap<Ipv4Net, Arc<Peer>>,
}

impl Table {
    pub fn build(keys: Arc<LocalKeys>, mut peers: Vec<PeerEntry>) -> Table {
        peers.sort_by(|a, b| a.peer.name.cmp(&b.peer.name));
        let mut by_id = HashMap::default();
        let mut by_key = HashMap::new();
        let mut routes = PrefixMap::new();
        let mut older_keys = Vec::new();
        for entry in &peers {
            by_id.insert(entry.peer.id, Arc::clone(&entry.peer));
            let state = entry.peer.state.lock();
            by_key.insert(state.peer_key.to_bytes(), Arc::clone(&entry.peer));
            older_keys.extend(
                state
                    .tunnels()
                    .map(|(_, tunnel)| (tunnel.keys.peer_key.to_bytes(), Arc::clone(&entry.peer))),
            );
            drop(state);
            for net in &entry.allowed_ips {
                routes.insert(net.trunc(), Arc::clone(&entry.peer));
            }
        }
        for (key, peer) in older_keys {
            by_key.entry(key).or_insert(peer);
        }
        Table {
            keys,
            peers,
            by_id,
            by_key,
            routes,
        }
    }

    /// Longest-prefix match of an address over every peer's allowed IPs.
    pub fn route(&self, address: Ipv4Addr) -> Option<&Arc<Peer>> {
        self.routes
            .get_lpm(&Ipv4Net::from(address))
            .map(|(_, peer)| peer)
    }
}
