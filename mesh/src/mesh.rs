//! The mesh: every peer's tunnels behind one API for the data path
//! (`outbound`, `inbound`), the timers (`tick`) and the control plane
//! (`set_peers`, `rotate_local_key`).

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;

use arc_swap::ArcSwap;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{HandshakeInit, Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use parking_lot::Mutex;

use crate::config::{validate, ConfigError, MeshConfig, PeerConfig};
use crate::keys::{LocalKey, LocalKeys, PreviousKey};
use crate::packet::{
    ipv4_destination, message_min_len, message_type, range_in, DATA_OVERHEAD, HANDSHAKE_INIT_LEN,
    IPV4_MIN_HEADER, MSG_COOKIE_REPLY, MSG_DATA, MSG_HANDSHAKE_RESPONSE,
};
use crate::peer::{Peer, PeerState, Slot, PEER_ID_BITS};
use crate::ratelog::RateLimitedLog;
use crate::stats::{DropCounters, DropReason, MeshStats, PeerStats};
use crate::table::{PeerEntry, Table};
use crate::time::Instant;

/// What to do with a plaintext packet read from the TUN.
#[derive(Debug, PartialEq, Eq)]
pub enum Outbound<'a> {
    /// Send `datagram` to `to`: the encrypted packet or, when no session was
    /// up, a handshake initiation (the packet then waits inside the mesh and
    /// leaves from `inbound` once the handshake completes).
    Send { to: SocketAddr, datagram: &'a [u8] },
    /// No session yet and a handshake is already in flight: the packet waits
    /// (at most 256 per peer); nothing to send now.
    Queued,
    /// Nothing to send; counted under the reason.
    Drop(DropReason),
}

/// What to do with a datagram read from the UDP socket.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// Write this plaintext IPv4 packet to the TUN.
    Tunnel(&'a [u8]),
    /// Consumed (handshake, keepalive, cookie); any replies went to `send`.
    Done,
    /// Dropped; counted under the reason.
    Drop(DropReason),
}

/// The sans-IO WireGuard mesh of one node. `Send + Sync`: meant to be shared
/// by a TUN→UDP thread, a UDP→TUN thread, a timer and the control plane.
pub struct Mesh {
    table: ArcSwap<Table>,
    /// Serialises writers of `table`; readers never take it.
    writer: Mutex<()>,
    drops: DropCounters,
    log: RateLimitedLog,
    config: MeshConfig,
}

/// boringtun's result, with the output slice turned into a range of the
/// caller's buffer so the buffer can be used again.
enum Outcome {
    Network(Range<usize>),
    TunnelV4(Range<usize>, Ipv4Addr),
    TunnelV6,
    Done,
    Err(WireGuardError),
}

impl Outcome {
    fn of(result: TunnResult<'_>, base: usize) -> Outcome {
        match result {
            TunnResult::Done => Outcome::Done,
            TunnResult::Err(error) => Outcome::Err(error),
            TunnResult::WriteToNetwork(datagram) => Outcome::Network(range_in(base, datagram)),
            TunnResult::WriteToTunnelV4(packet, source) => {
                Outcome::TunnelV4(range_in(base, packet), source)
            }
            TunnResult::WriteToTunnelV6(..) => Outcome::TunnelV6,
        }
    }
}

impl Mesh {
    pub fn new(local: StaticSecret) -> Mesh {
        Mesh::with_config(local, MeshConfig::default())
    }

    pub fn with_config(local: StaticSecret, config: MeshConfig) -> Mesh {
        let keys = LocalKeys {
            current: Arc::new(LocalKey::new(local, 1, config.handshake_rate_limit)),
            previous: None,
        };
        Mesh {
            table: ArcSwap::from_pointee(Table::build(Arc::new(keys), Vec::new())),
            writer: Mutex::new(()),
            drops: DropCounters::default(),
            log: RateLimitedLog::new(config.log_lines, config.log_interval),
            config,
        }
    }

    /// The key peers must be configured with (the current one).
    pub fn public_key(&self) -> PublicKey {
        self.table.load().keys.current.public
    }

    /// Makes `peers` the peer set: adds, changes and removes peers. Peers
    /// whose key did not change keep their sessions; an endpoint or allowed-IP
    /// change never touches a session; a key change keeps the old session
    /// until the new one works. All or nothing: an invalid list changes nothing.
    pub fn set_peers(&self, peers: Vec<PeerConfig>) -> Result<(), ConfigError> {
        let _writer = self.writer.lock();
        let old = self.table.load_full();
        validate(&peers, &old.keys.current.public)?;
        let now = Instant::now();
        let existing: HashMap<&str, &Arc<Peer>> = old
            .peers
            .iter()
            .map(|entry| (entry.peer.name.as_str(), &entry.peer))
            .collect();
        // Ids of removed peers are not reused right away: their late
        // datagrams then find nobody instead of a stranger's tunnel.
        let mut taken: HashSet<u32> = old.by_id.keys().copied().collect();
        let mut entries = Vec::with_capacity(peers.len());
        for config in peers {
            let peer = match existing.get(config.name.as_str()) {
                Some(peer) => {
                    let mut state = peer.state.lock();
                    state.apply_config(&config);
                    state.reconcile(peer.id, &old.keys, now, &peer.name);
                    drop(state);
                    Arc::clone(peer)
                }
                None => {
                    let id = fresh_peer_id(&taken);
                    taken.insert(id);
                    tracing::info!(peer = %config.name, "peer added");
                    Arc::new(Peer::new(id, &config, &old.keys, now))
                }
            };
            entries.push(PeerEntry {
                peer,
                allowed_ips: config.allowed_ips,
            });
        }
        let kept: HashSet<u32> = entries.iter().map(|entry| entry.peer.id).collect();
        for entry in &old.peers {
            if !kept.contains(&entry.peer.id) {
                tracing::info!(peer = %entry.peer.name, "peer removed");
            }
        }
        self.table
            .store(Arc::new(Table::build(Arc::clone(&old.keys), entries)));
        Ok(())
    }

    /// Starts using `new` as this node's key. New sessions use it; the
    /// previous key stays accepted (for peers that have not learned the new
    /// one) until every peer has a session on the new key, or
    /// `rotation_timeout`. Each session moves over without losing packets. A
    /// rotation started before the previous one finished forgets the oldest key.
    pub fn rotate_local_key(&self, new: StaticSecret) {
        let _writer = self.writer.lock();
        let old = self.table.load_full();
        if PublicKey::from(&new) == old.keys.current.public {
            return;
        }
        let now = Instant::now();
        let keys = Arc::new(LocalKeys {
            current: Arc::new(LocalKey::new(
                new,
                old.keys.current.generation + 1,
                self.config.handshake_rate_limit,
            )),
            previous: Some(PreviousKey {
                key: Arc::clone(&old.keys.current),
                retired_at: now,
            }),
        });
        tracing::info!("local key rotated; previous key accepted until every peer moved");
        self.replace_keys(&old, keys, now);
    }

    fn replace_keys(&self, old: &Table, keys: Arc<LocalKeys>, now: Instant) {
        let entries = old
            .peers
            .iter()
            .map(|entry| {
                entry
                    .peer
                    .state
                    .lock()
                    .reconcile(entry.peer.id, &keys, now, &entry.peer.name);
                PeerEntry {
                    peer: Arc::clone(&entry.peer),
                    allowed_ips: entry.allowed_ips.clone(),
                }
            })
            .collect();
        self.table.store(Arc::new(Table::build(keys, entries)));
    }

    /// Encrypts a plaintext IPv4 packet from the TUN for the peer whose
    /// allowed IPs hold its destination. `out` must hold
    /// `packet.len() + 32` bytes and at least 148 (a handshake initiation).
    pub fn outbound<'a>(&self, packet: &[u8], out: &'a mut [u8]) -> Outbound<'a> {
        let Some(destination) = ipv4_destination(packet) else {
            return self.drop_outbound(DropReason::NotIpv4);
        };
        if out.len() < (packet.len() + DATA_OVERHEAD).max(HANDSHAKE_INIT_LEN) {
            return self.drop_outbound(DropReason::BufferTooSmall);
        }
        let table = self.table.load();
        let Some(peer) = table.route(destination) else {
            return self.drop_outbound(DropReason::NoPeerForDestination);
        };
        let mut state = peer.state.lock();
        let Some(to) = state.endpoint else {
            drop(state);
            return self.drop_outbound(DropReason::NoEndpoint);
        };
        let base = out.as_ptr() as usize;
        let outcome = Outcome::of(state.active.tunn.encapsulate(packet, &mut *out), base);
        match outcome {
            Outcome::Network(range) => {
                if out.get(range.start) == Some(&MSG_DATA) {
                    state.traffic.sent(range.len());
                } else {
                    state.active.largest_queued = state.active.largest_queued.max(packet.len());
                }
                let out: &'a [u8] = out;
                Outbound::Send {
                    to,
                    datagram: out.get(range).unwrap_or_default(),
                }
            }
            Outcome::Done => {
                state.active.largest_queued = state.active.largest_queued.max(packet.len());
                Outbound::Queued
            }
            Outcome::Err(error) => {
                drop(state);
                self.drop_outbound(DropReason::from_wireguard(&error))
            }
            Outcome::TunnelV4(..) | Outcome::TunnelV6 => {
                drop(state);
                self.drop_outbound(DropReason::Malformed)
            }
        }
    }

    /// Handles a datagram received from `from`. `out` must hold
    /// `datagram.len()` bytes and at least 148. Replies (handshake
    /// responses, cookies, packets that waited for a handshake) are passed to
    /// `send`, which must not call back into the mesh.
    pub fn inbound<'a>(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        out: &'a mut [u8],
        mut send: impl FnMut(SocketAddr, &[u8]),
    ) -> Inbound<'a> {
        let packet = match Tunn::parse_incoming_packet(datagram) {
            Ok(packet) => packet,
            Err(_) => return self.drop_inbound(from, unparsable(datagram)),
        };
        if out.len() < datagram.len().max(HANDSHAKE_INIT_LEN) {
            return self.drop_inbound(from, DropReason::BufferTooSmall);
        }
        let table = self.table.load();
        let receiver_index = match &packet {
            Packet::HandshakeInit(init) => {
                return self.handshake_initiation(&table, from, datagram, init, out, &mut send)
            }
            Packet::HandshakeResponse(response) => response.receiver_idx,
            Packet::PacketCookieReply(cookie) => cookie.receiver_idx,
            Packet::PacketData(data) => data.receiver_idx,
        };
        // The top 24 bits of every session index are the tunnel's index.
        let tunnel_index = receiver_index >> 8;
        let Some(peer) = table.by_id.get(&(tunnel_index >> 2)) else {
            return self.drop_inbound(from, DropReason::UnknownIndex);
        };
        let mut state = peer.state.lock();
        let Some(slot) = state.find_by_index(tunnel_index) else {
            drop(state);
            return self.drop_inbound(from, DropReason::UnknownIndex);
        };
        self.decapsulate(
            &table, peer, &mut state, slot, from, datagram, out, &mut send,
        )
    }

    fn handshake_initiation<'a>(
        &self,
        table: &Table,
        from: SocketAddr,
        datagram: &[u8],
        init: &HandshakeInit<'_>,
        out: &'a mut [u8],
        send: &mut impl FnMut(SocketAddr, &[u8]),
    ) -> Inbound<'a> {
        // mac1 names the key the initiator used for us: current, or the
        // previous one from a peer that has not learned the new key yet.
        let mut addressed_to = None;
        for key in table.keys.iter() {
            match key
                .rate_limiter
                .verify_packet(Some(from.ip()), datagram, &mut *out)
            {
                Ok(_) => {
                    addressed_to = Some(key);
                    break;
                }
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    send(from, cookie);
                    return self.drop_inbound(from, DropReason::RateLimited);
                }
                Err(_) => {}
            }
        }
        let Some(key) = addressed_to else {
            return self.drop_inbound(from, DropReason::BadMac);
        };
        let Ok(half) = parse_handshake_anon(&key.secret, &key.public, init) else {
            return self.drop_inbound(from, DropReason::HandshakeFailed);
        };
        let peer_key = PublicKey::from(half.peer_static_public);
        let Some(peer) = table.by_key.get(peer_key.as_bytes()) else {
            return self.drop_inbound(from, DropReason::UnknownPeerKey);
        };
        let mut state = peer.state.lock();
        let Some(slot) = state.find_by_keys(key.generation, &peer_key) else {
            drop(state);
            return self.drop_inbound(from, DropReason::UnknownPeerKey);
        };
        self.decapsulate(table, peer, &mut state, slot, from, datagram, out, send)
    }

    /// Runs an authenticated-or-not datagram through the tunnel it names and
    /// applies the result: replies, roaming, cryptokey routing, switching.
    #[allow(clippy::too_many_arguments)]
    fn decapsulate<'a>(
        &self,
        table: &Table,
        peer: &Arc<Peer>,
        state: &mut PeerState,
        slot: Slot,
        from: SocketAddr,
        datagram: &[u8],
        out: &'a mut [u8],
        send: &mut impl FnMut(SocketAddr, &[u8]),
    ) -> Inbound<'a> {
        let Some((tunnel, traffic)) = state.tunnel_and_traffic(slot) else {
            return self.drop_inbound(from, DropReason::UnknownIndex);
        };
        let base = out.as_ptr() as usize;
        let outcome = Outcome::of(
            tunnel
                .tunn
                .decapsulate(Some(from.ip()), datagram, &mut *out),
            base,
        );
        let is_data = message_type(datagram) == Some(MSG_DATA);
        match outcome {
            Outcome::Err(error) => self.drop_inbound(from, DropReason::from_wireguard(&error)),
            Outcome::Network(range) => {
                let reply_type = out.get(range.start).copied();
                match reply_type {
                    // boringtun's own per-tunnel limit: the datagram was not processed.
                    Some(MSG_COOKIE_REPLY) => {
                        send(from, out.get(range).unwrap_or_default());
                        return self.drop_inbound(from, DropReason::RateLimited);
                    }
                    // We answered an initiation: a session as responder,
                    // confirmed once the initiator sends on it.
                    Some(MSG_HANDSHAKE_RESPONSE) => traffic.handshake_completed(),
                    // The keepalive boringtun sends on receiving a handshake
                    // response: a session as initiator, confirmed.
                    Some(MSG_DATA) if !is_data => {
                        traffic.handshake_completed();
                        traffic.sent(range.len());
                    }
                    _ => traffic.sent(range.len()),
                }
                let confirmed = !is_data && reply_type == Some(MSG_DATA);
                send(from, out.get(range).unwrap_or_default());
                tunnel.expired_reported = false;
                tunnel.flush_queued(traffic, from, out, send);
                self.roam(state, from, &peer.name);
                if confirmed {
                    state.confirmed(slot, Instant::now(), &peer.name);
                }
                Inbound::Done
            }
            Outcome::Done => {
                if is_data {
                    // An authenticated keepalive.
                    traffic.received(datagram.len());
                    self.roam(state, from, &peer.name);
                    if slot != Slot::Active {
                        state.confirmed(slot, Instant::now(), &peer.name);
                    }
                }
                Inbound::Done
            }
            Outcome::TunnelV4(range, source) => {
                // Authenticated: the peer is at `from` now, whatever the
                // packet inside says.
                self.roam(state, from, &peer.name);
                if !table
                    .route(source)
                    .is_some_and(|owner| Arc::ptr_eq(owner, peer))
                {
                    return self.drop_inbound(from, DropReason::CryptokeyRouting);
                }
                if range.len() < IPV4_MIN_HEADER {
                    return self.drop_inbound(from, DropReason::MalformedInner);
                }
                state.traffic.received(datagram.len());
                if slot != Slot::Active {
                    state.confirmed(slot, Instant::now(), &peer.name);
                }
                let out: &'a [u8] = out;
                Inbound::Tunnel(out.get(range).unwrap_or_default())
            }
            // Allowed IPs are IPv4 only: no IPv6 source is ever allowed.
            Outcome::TunnelV6 => self.drop_inbound(from, DropReason::CryptokeyRouting),
        }
    }

    /// WireGuard roaming: an authenticated datagram tells where the peer is.
    fn roam(&self, state: &mut PeerState, from: SocketAddr, name: &str) {
        if state.endpoint != Some(from) {
            tracing::debug!(peer = name, endpoint = %from, "peer endpoint updated");
            state.endpoint = Some(from);
        }
    }

    /// Drives every timer; call every 100–250 ms. Datagrams to send go to
    /// `send` (which must not call back into the mesh).
    pub fn tick(&self, mut send: impl FnMut(SocketAddr, &[u8])) {
        let now = Instant::now();
        let table = self.table.load_full();
        for key in table.keys.iter() {
            key.rate_limiter.reset_count();
        }
        let previous_generation = table.keys.previous.as_ref().map(|p| p.key.generation);
        let mut previous_in_use = false;
        let mut buf = [0u8; 256];
        for entry in &table.peers {
            let mut state = entry.peer.state.lock();
            state.tick(now, &self.config, &entry.peer.name, &mut buf, &mut send);
            if let Some(generation) = previous_generation {
                previous_in_use |= state.uses_generation(generation);
            }
        }
        if let Some(previous) = &table.keys.previous {
            let timed_out =
                now.saturating_duration_since(previous.retired_at) >= self.config.rotation_timeout;
            if !previous_in_use || timed_out {
                self.forget_previous_key(previous.key.generation, now);
            }
        }
    }

    fn forget_previous_key(&self, generation: u64, now: Instant) {
        let _writer = self.writer.lock();
        let old = self.table.load_full();
        let still_held = old
            .keys
            .previous
            .as_ref()
            .is_some_and(|previous| previous.key.generation == generation);
        if !still_held {
            return;
        }
        let keys = Arc::new(LocalKeys {
            current: Arc::clone(&old.keys.current),
            previous: None,
        });
        tracing::info!("previous local key forgotten: key rotation complete");
        self.replace_keys(&old, keys, now);
    }

    pub fn stats(&self) -> MeshStats {
        let table = self.table.load();
        let peers = table
            .peers
            .iter()
            .map(|entry| {
                let state = entry.peer.state.lock();
                PeerStats {
                    name: entry.peer.name.clone(),
                    public_key: state.peer_key,
                    endpoint: state.endpoint,
                    allowed_ips: entry.allowed_ips.clone(),
                    tx_packets: state.traffic.tx_packets,
                    tx_bytes: state.traffic.tx_bytes,
                    rx_packets: state.traffic.rx_packets,
                    rx_bytes: state.traffic.rx_bytes,
                    handshakes: state.traffic.handshakes,
                    last_handshake: state.traffic.last_handshake,
                    session_up: state.active.has_session(),
                    session_local_key: state.active.local_public,
                    session_peer_key: state.active.keys.peer_key,
                    key_change_pending: state.pending.is_some(),
                }
            })
            .collect();
        MeshStats {
            local_public_key: table.keys.current.public,
            previous_public_key: table.keys.previous.as_ref().map(|p| p.key.public),
            peers,
            drops: self.drops.snapshot(),
            suppressed_log_lines: self.log.suppressed(),
        }
    }

    fn drop_inbound<'a>(&self, from: SocketAddr, reason: DropReason) -> Inbound<'a> {
        self.drops.count(reason);
        if let Some(suppressed) = self.log.admit() {
            if reason.is_suspicious() {
                tracing::warn!(%from, reason = reason.as_str(), suppressed, "datagram dropped");
            } else {
                tracing::debug!(%from, reason = reason.as_str(), suppressed, "datagram dropped");
            }
        }
        Inbound::Drop(reason)
    }

    fn drop_outbound<'a>(&self, reason: DropReason) -> Outbound<'a> {
        self.drops.count(reason);
        if let Some(suppressed) = self.log.admit() {
            tracing::debug!(
                reason = reason.as_str(),
                suppressed,
                "packet from TUN dropped"
            );
        }
        Outbound::Drop(reason)
    }
}

/// Why boringtun could not parse a datagram.
fn unparsable(datagram: &[u8]) -> DropReason {
    match message_type(datagram) {
        Some(kind) if datagram.len() < message_min_len(kind) => DropReason::TooShort,
        None if datagram.len() < 4 => DropReason::TooShort,
        _ => DropReason::Malformed,
    }
}

/// A random peer id not in `taken` (ids only obscure how many peers exist,
/// as boringtun's own device does; std's RandomState is seeded by the OS).
fn fresh_peer_id(taken: &HashSet<u32>) -> u32 {
    let mask = (1u32 << PEER_ID_BITS) - 1;
    let mut counter = 0u64;
    loop {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(counter);
        counter += 1;
        let id = hasher.finish() as u32 & mask;
        if !taken.contains(&id) {
            return id;
        }
    }
}
