//! One peer: up to three boringtun tunnels and the rules that move traffic
//! between them when a key changes.
//!
//! * `active` carries outbound traffic and is driven by the timers.
//! * `pending` exists while a key changed (our key rotated, or the peer's
//!   configured key changed): a tunnel with the new keys that handshakes in
//!   the background. It takes over once a session on it is confirmed (we got
//!   the handshake response, or the peer sent data on it).
//! * `draining` is the previous `active` after such a switch: it still
//!   decrypts what the peer sent on the old session before it switched too,
//!   and is dropped once the peer stops using it.

use std::net::SocketAddr;
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::PublicKey;
use parking_lot::Mutex;

use crate::config::{MeshConfig, PeerConfig};
use crate::keys::{LocalKey, LocalKeys};
use crate::packet::DATA_OVERHEAD;
use crate::stats::Traffic;
use crate::time::Instant;

/// Bits of a peer id. A tunnel's index is `peer_id << 2 | slot` (24 bits, what
/// `Tunn::new` accepts); boringtun puts it in the top 24 bits of every session
/// index, so a datagram's receiver index finds peer and tunnel in O(1).
pub(crate) const PEER_ID_BITS: u32 = 22;
const SLOTS: u32 = 4;

/// How often, while a replaced session drains, we send a keepalive on the new
/// one, so a peer that missed our confirmation switches too.
const NUDGE_INTERVAL: Duration = Duration::from_secs(1);

/// boringtun holds at most this many packets per tunnel while handshaking.
const MAX_QUEUED: usize = 256;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct TunnelKeys {
    pub local_generation: u64,
    pub peer_key: PublicKey,
}

pub(crate) struct Tunnel {
    pub tunn: Box<Tunn>,
    pub keys: TunnelKeys,
    pub local_public: PublicKey,
    /// 24 bits: `peer_id << 2 | slot`.
    pub index: u32,
    pub created: Instant,
    /// Start a handshake at the next tick (new tunnels handshake eagerly so
    /// the first packet does not wait).
    pub needs_initiation: bool,
    /// `ConnectionExpired` was already reported for the current failure.
    pub expired_reported: bool,
    /// Largest packet boringtun queued on this tunnel (a high-water mark,
    /// never lowered): sizes the buffer needed to flush the queue.
    pub largest_queued: usize,
}

impl Tunnel {
    fn new(index: u32, local: &LocalKey, peer_key: PublicKey, now: Instant) -> Tunnel {
        Tunnel {
            // Keepalive is driven by the mesh (so it can change without a new
            // session); each tunnel gets boringtun's per-tunnel handshake limiter.
            tunn: Box::new(Tunn::new(
                local.secret.clone(),
                peer_key,
                None,
                None,
                index,
                None,
            )),
            keys: TunnelKeys {
                local_generation: local.generation,
                peer_key,
            },
            local_public: local.public,
            index,
            created: now,
            needs_initiation: true,
            expired_reported: false,
            largest_queued: 0,
        }
    }

    pub fn has_session(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }

    /// Sends what boringtun queued while this tunnel was handshaking. Called
    /// after every datagram it answered, as boringtun asks.
    pub fn flush_queued(
        &mut self,
        traffic: &mut Traffic,
        to: SocketAddr,
        out: &mut [u8],
        send: &mut impl FnMut(SocketAddr, &[u8]),
    ) {
        let needed = self.largest_queued + DATA_OVERHEAD;
        let mut spill = Vec::new();
        // Rare path (only after a handshake): a temporary buffer when the
        // caller's is smaller than a queued packet, instead of a boringtun panic.
        let buf: &mut [u8] = if out.len() >= needed {
            out
        } else {
            spill.resize(needed, 0);
            &mut spill
        };
        for _ in 0..=MAX_QUEUED {
            match self.tunn.decapsulate(None, &[], buf) {
                TunnResult::WriteToNetwork(datagram) => {
                    traffic.sent(datagram.len());
                    send(to, datagram);
                }
                _ => break,
            }
        }
        // Not reset: a flush can end with packets still queued. A responder
        // has no session it may send on until the initiator confirms, so
        // boringtun puts the packet back; the next flush must still size
        // its buffer for it (boringtun panics on a buffer too small).
    }
}

pub(crate) struct Draining {
    pub tunnel: Tunnel,
    pub since: Instant,
    pub last_rx: Instant,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Slot {
    Active,
    Pending,
    Draining,
}

pub(crate) struct Peer {
    pub id: u32,
    pub name: String,
    pub state: Mutex<PeerState>,
}

pub(crate) struct PeerState {
    /// The configured key (tunnels may still use an older one).
    pub peer_key: PublicKey,
    pub keepalive: Option<u16>,
    configured_endpoint: Option<SocketAddr>,
    /// Where to send: configured, or learned from authenticated datagrams.
    pub endpoint: Option<SocketAddr>,
    pub active: Tunnel,
    pub pending: Option<Tunnel>,
    pub draining: Option<Draining>,
    pub traffic: Traffic,
    next_slot: u32,
    /// (tx_packets, when) at the last keepalive check: no per-packet clock read.
    keepalive_mark: (u64, Instant),
    last_nudge: Option<Instant>,
}

impl Peer {
    pub fn new(id: u32, config: &PeerConfig, keys: &LocalKeys, now: Instant) -> Peer {
        let index = id << 2;
        let state = PeerState {
            peer_key: config.public_key,
            keepalive: config.keepalive.filter(|seconds| *seconds > 0),
            configured_endpoint: config.endpoint,
            endpoint: config.endpoint,
            active: Tunnel::new(index, &keys.current, config.public_key, now),
            pending: None,
            draining: None,
            traffic: Traffic::default(),
            next_slot: 1,
            keepalive_mark: (0, now),
            last_nudge: None,
        };
        Peer {
            id,
            name: config.name.clone(),
            state: Mutex::new(state),
        }
    }
}

impl PeerState {
    /// Takes a new configuration. An endpoint change only moves where
    /// datagrams go; the session is untouched.
    pub fn apply_config(&mut self, config: &PeerConfig) {
        self.peer_key = config.public_key;
        self.keepalive = config.keepalive.filter(|seconds| *seconds > 0);
        if config.endpoint != self.configured_endpoint {
            self.configured_endpoint = config.endpoint;
            if config.endpoint.is_some() {
                self.endpoint = config.endpoint;
            }
        }
    }

    /// Brings the tunnels in line with the configured peer key and the local
    /// keys held, keeping any working session until its successor works.
    pub fn reconcile(&mut self, peer_id: u32, keys: &LocalKeys, now: Instant, name: &str) {
        let desired = TunnelKeys {
            local_generation: keys.current.generation,
            peer_key: self.peer_key,
        };
        if self.pending.as_ref().is_some_and(|p| p.keys != desired) {
            self.pending = None;
        }
        if self
            .draining
            .as_ref()
            .is_some_and(|d| !keys.holds(d.tunnel.keys.local_generation))
        {
            self.draining = None;
        }
        if self.active.keys == desired {
            // A key change was reverted before it completed.
            self.pending = None;
            return;
        }
        if !keys.holds(self.active.keys.local_generation) {
            // Our key for the active tunnel is gone: nothing left to keep.
            let replacement = match self.pending.take() {
                Some(pending) => pending,
                None => self.new_tunnel(peer_id, &keys.current, now),
            };
            self.active = replacement;
            tracing::info!(peer = name, "session replaced: its local key was retired");
        } else if self.pending.is_none() {
            self.pending = Some(self.new_tunnel(peer_id, &keys.current, now));
            tracing::info!(
                peer = name,
                "key changed: handshaking a new session, old one keeps traffic"
            );
        }
    }

    fn new_tunnel(&mut self, peer_id: u32, local: &LocalKey, now: Instant) -> Tunnel {
        let index = (peer_id << 2) | self.free_slot();
        Tunnel::new(index, local, self.peer_key, now)
    }

    /// A slot no live tunnel uses, rotating so a dropped tunnel's index is not
    /// reused at once (late datagrams for it then just find no session).
    fn free_slot(&mut self) -> u32 {
        for _ in 0..SLOTS {
            let slot = self.next_slot % SLOTS;
            self.next_slot = self.next_slot.wrapping_add(1);
            if !self.tunnels().any(|(_, t)| t.index & (SLOTS - 1) == slot) {
                return slot;
            }
        }
        // At most three tunnels live, so a free slot always exists.
        self.next_slot % SLOTS
    }

    pub fn tunnels(&self) -> impl Iterator<Item = (Slot, &Tunnel)> {
        std::iter::once((Slot::Active, &self.active))
            .chain(self.pending.iter().map(|t| (Slot::Pending, t)))
            .chain(self.draining.iter().map(|d| (Slot::Draining, &d.tunnel)))
    }

    pub fn uses_generation(&self, generation: u64) -> bool {
        self.tunnels()
            .any(|(_, t)| t.keys.local_generation == generation)
    }

    pub fn find_by_index(&self, index: u32) -> Option<Slot> {
        self.tunnels()
            .find(|(_, t)| t.index == index)
            .map(|(slot, _)| slot)
    }

    /// The tunnel a handshake initiation belongs to; the pending one first,
    /// so a key change progresses.
    pub fn find_by_keys(&self, local_generation: u64, peer_key: &PublicKey) -> Option<Slot> {
        let wanted = TunnelKeys {
            local_generation,
            peer_key: *peer_key,
        };
        [Slot::Pending, Slot::Active, Slot::Draining]
            .into_iter()
            .find(|slot| self.tunnel(*slot).is_some_and(|t| t.keys == wanted))
    }

    pub fn tunnel(&self, slot: Slot) -> Option<&Tunnel> {
        match slot {
            Slot::Active => Some(&self.active),
            Slot::Pending => self.pending.as_ref(),
            Slot::Draining => self.draining.as_ref().map(|d| &d.tunnel),
        }
    }

    /// The tunnel and the traffic counters, borrowed together.
    pub fn tunnel_and_traffic(&mut self, slot: Slot) -> Option<(&mut Tunnel, &mut Traffic)> {
        let tunnel = match slot {
            Slot::Active => Some(&mut self.active),
            Slot::Pending => self.pending.as_mut(),
            Slot::Draining => self.draining.as_mut().map(|d| &mut d.tunnel),
        };
        tunnel.map(|t| (t, &mut self.traffic))
    }

    /// Records that a session on `slot` works both ways (we got the handshake
    /// response, or the peer sent data on it): switches traffic to it if it
    /// was the pending tunnel, keeps a draining one alive.
    pub fn confirmed(&mut self, slot: Slot, now: Instant, name: &str) {
        match slot {
            Slot::Active => {}
            Slot::Draining => {
                if let Some(draining) = &mut self.draining {
                    draining.last_rx = now;
                }
            }
            Slot::Pending => {
                if let Some(mut pending) = self.pending.take() {
                    pending.needs_initiation = false;
                    let old = std::mem::replace(&mut self.active, pending);
                    self.draining = old.has_session().then_some(Draining {
                        tunnel: old,
                        since: now,
                        last_rx: now,
                    });
                    self.last_nudge = None;
                    tracing::info!(peer = name, "traffic moved to the session with the new key");
                }
            }
        }
    }

    /// Timers: boringtun's (handshake retry, rekey, keepalive, expiry), the
    /// key-change deadlines, the persistent keepalive and the drain.
    pub fn tick(
        &mut self,
        now: Instant,
        config: &MeshConfig,
        name: &str,
        buf: &mut [u8],
        send: &mut impl FnMut(SocketAddr, &[u8]),
    ) {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| now.saturating_duration_since(p.created) >= config.rotation_timeout)
        {
            if let Some(pending) = self.pending.take() {
                self.active = pending;
                tracing::warn!(
                    peer = name,
                    "no handshake with the new key in time: old session dropped"
                );
            }
        }
        if let Some(draining) = &self.draining {
            let idle = now.saturating_duration_since(draining.last_rx.max(draining.since));
            let age = now.saturating_duration_since(draining.since);
            if idle >= config.drain_idle || age >= config.drain_max {
                self.draining = None;
            }
        }

        let endpoint = self.endpoint;
        for tunnel in std::iter::once(&mut self.active).chain(self.pending.as_mut()) {
            drive_timers(tunnel, endpoint, name, buf, send);
        }

        let Some(to) = endpoint else { return };
        if let Some(seconds) = self.keepalive {
            let (sent_at_mark, marked_at) = self.keepalive_mark;
            if self.traffic.tx_packets != sent_at_mark {
                self.keepalive_mark = (self.traffic.tx_packets, now);
            } else if now.saturating_duration_since(marked_at)
                >= Duration::from_secs(u64::from(seconds))
            {
                if self.active.has_session() {
                    send_keepalive(&mut self.active, &mut self.traffic, to, buf, send);
                } else if let TunnResult::WriteToNetwork(init) =
                    self.active.tunn.format_handshake_initiation(buf, false)
                {
                    // No session to keep alive: bring one up (a no-op while
                    // a handshake is already in flight).
                    send(to, init);
                }
                self.keepalive_mark = (self.traffic.tx_packets, now);
            }
        }
        if self.draining.is_some()
            && self.active.has_session()
            && self
                .last_nudge
                .is_none_or(|at| now.saturating_duration_since(at) >= NUDGE_INTERVAL)
        {
            send_keepalive(&mut self.active, &mut self.traffic, to, buf, send);
            self.last_nudge = Some(now);
        }
    }
}

fn drive_timers(
    tunnel: &mut Tunnel,
    endpoint: Option<SocketAddr>,
    name: &str,
    buf: &mut [u8],
    send: &mut impl FnMut(SocketAddr, &[u8]),
) {
    match tunnel.tunn.update_timers(buf) {
        TunnResult::WriteToNetwork(datagram) => {
            if let Some(to) = endpoint {
                send(to, datagram);
            }
        }
        // boringtun dropped the sessions and queue; the next packet starts a
        // new handshake. Reported once per failure, not every tick.
        TunnResult::Err(WireGuardError::ConnectionExpired) if !tunnel.expired_reported => {
            tunnel.expired_reported = true;
            tracing::debug!(peer = name, "connection expired");
        }
        TunnResult::Err(WireGuardError::ConnectionExpired) => {}
        TunnResult::Err(error) => {
            tracing::debug!(peer = name, ?error, "timer error");
        }
        _ => {}
    }
    if tunnel.needs_initiation {
        if tunnel.has_session() {
            tunnel.needs_initiation = false;
        } else if let Some(to) = endpoint {
            if let TunnResult::WriteToNetwork(init) =
                tunnel.tunn.format_handshake_initiation(buf, false)
            {
                send(to, init);
            }
            tunnel.needs_initiation = false;
        }
    }
}

fn send_keepalive(
    tunnel: &mut Tunnel,
    traffic: &mut Traffic,
    to: SocketAddr,
    buf: &mut [u8],
    send: &mut impl FnMut(SocketAddr, &[u8]),
) {
    if let TunnResult::WriteToNetwork(keepalive) = tunnel.tunn.encapsulate(&[], buf) {
        traffic.sent(keepalive.len());
        send(to, keepalive);
    }
}
