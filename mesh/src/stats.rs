//! Counters: datagrams dropped by reason (global) and traffic per peer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use boringtun::noise::errors::WireGuardError;
use boringtun::x25519::PublicKey;
use ipnet::Ipv4Net;

/// Why a packet (plaintext from the TUN) or a datagram (from UDP) was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than the smallest message of its type (truncated).
    TooShort,
    /// Not a WireGuard message: unknown type, reserved bytes set, wrong handshake length.
    Malformed,
    /// Data, handshake response or cookie for a receiver index no session of ours has.
    UnknownIndex,
    /// A handshake initiation whose mac1 matches none of our static keys.
    BadMac,
    /// A handshake initiation from a static key that is no configured peer's.
    UnknownPeerKey,
    /// A handshake message that failed to decrypt or verify.
    HandshakeFailed,
    /// A data message whose AEAD tag did not verify (forged or corrupted).
    DecryptFailed,
    /// A data counter already seen or too old, a handshake initiation whose
    /// timestamp is not newer than the last one, or a handshake response for
    /// no handshake in flight.
    Replay,
    /// Decrypted fine, but the inner source address is not in the sending peer's allowed IPs.
    CryptokeyRouting,
    /// Decrypted fine, but the inner packet is not a well-formed IPv4 packet.
    MalformedInner,
    /// Handshake messages over the rate limit (answered with a cookie when possible).
    RateLimited,
    /// Outbound: no peer's allowed IPs contain the destination.
    NoPeerForDestination,
    /// Outbound: the peer has no known endpoint yet.
    NoEndpoint,
    /// Outbound: the TUN packet is not IPv4.
    NotIpv4,
    /// The caller's output buffer cannot hold the result (a caller bug).
    BufferTooSmall,
}

impl DropReason {
    pub const ALL: [DropReason; 15] = [
        DropReason::TooShort,
        DropReason::Malformed,
        DropReason::UnknownIndex,
        DropReason::BadMac,
        DropReason::UnknownPeerKey,
        DropReason::HandshakeFailed,
        DropReason::DecryptFailed,
        DropReason::Replay,
        DropReason::CryptokeyRouting,
        DropReason::MalformedInner,
        DropReason::RateLimited,
        DropReason::NoPeerForDestination,
        DropReason::NoEndpoint,
        DropReason::NotIpv4,
        DropReason::BufferTooSmall,
    ];

    /// A stable snake_case name, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::TooShort => "too_short",
            DropReason::Malformed => "malformed",
            DropReason::UnknownIndex => "unknown_index",
            DropReason::BadMac => "bad_mac",
            DropReason::UnknownPeerKey => "unknown_peer_key",
            DropReason::HandshakeFailed => "handshake_failed",
            DropReason::DecryptFailed => "decrypt_failed",
            DropReason::Replay => "replay",
            DropReason::CryptokeyRouting => "cryptokey_routing",
            DropReason::MalformedInner => "malformed_inner",
            DropReason::RateLimited => "rate_limited",
            DropReason::NoPeerForDestination => "no_peer_for_destination",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::NotIpv4 => "not_ipv4",
            DropReason::BufferTooSmall => "buffer_too_small",
        }
    }

    /// Drops that only an attacker or a broken peer causes; worth a warning.
    pub fn is_suspicious(self) -> bool {
        matches!(
            self,
            DropReason::DecryptFailed
                | DropReason::Replay
                | DropReason::CryptokeyRouting
                | DropReason::BadMac
                | DropReason::UnknownPeerKey
                | DropReason::HandshakeFailed
        )
    }

    fn index(self) -> usize {
        self as usize
    }

    /// What a boringtun error on an inbound datagram means.
    pub(crate) fn from_wireguard(error: &WireGuardError) -> DropReason {
        match error {
            WireGuardError::DestinationBufferTooSmall => DropReason::BufferTooSmall,
            WireGuardError::IncorrectPacketLength
            | WireGuardError::WrongPacketType
            | WireGuardError::InvalidPacket => DropReason::Malformed,
            WireGuardError::WrongIndex | WireGuardError::NoCurrentSession => {
                DropReason::UnknownIndex
            }
            WireGuardError::InvalidMac => DropReason::BadMac,
            WireGuardError::InvalidAeadTag => DropReason::DecryptFailed,
            WireGuardError::InvalidCounter
            | WireGuardError::DuplicateCounter
            | WireGuardError::WrongTai64nTimestamp
            | WireGuardError::UnexpectedPacket => DropReason::Replay,
            WireGuardError::WrongKey | WireGuardError::InvalidTai64nTimestamp => {
                DropReason::HandshakeFailed
            }
            WireGuardError::UnderLoad => DropReason::RateLimited,
            WireGuardError::ConnectionExpired | WireGuardError::LockFailed => {
                DropReason::UnknownIndex
            }
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Drop counters shared by both data-path threads.
#[derive(Debug, Default)]
pub(crate) struct DropCounters([AtomicU64; DropReason::ALL.len()]);

impl DropCounters {
    pub(crate) fn count(&self, reason: DropReason) {
        self.0[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> DropCounts {
        DropCounts(std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed)))
    }
}

/// A snapshot of the drop counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounts([u64; DropReason::ALL.len()]);

impl DropCounts {
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason.index()]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|reason| (*reason, self.get(*reason)))
    }
}

/// Traffic of one peer, kept under the peer's lock (no atomics needed).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Traffic {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub handshakes: u64,
    pub last_handshake: Option<SystemTime>,
}

impl Traffic {
    pub(crate) fn sent(&mut self, datagram_len: usize) {
        self.tx_packets += 1;
        self.tx_bytes += datagram_len as u64;
    }

    pub(crate) fn received(&mut self, datagram_len: usize) {
        self.rx_packets += 1;
        self.rx_bytes += datagram_len as u64;
    }

    pub(crate) fn handshake_completed(&mut self) {
        self.handshakes += 1;
        self.last_handshake = Some(SystemTime::now());
    }
}

/// State and counters of one peer. Bytes are UDP payload bytes (what goes on the wire).
#[derive(Debug, Clone)]
pub struct PeerStats {
    pub name: String,
    /// The configured key.
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<Ipv4Net>,
    /// Data messages (keepalives included) sent and received.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Handshakes completed, as initiator or responder.
    pub handshakes: u64,
    pub last_handshake: Option<SystemTime>,
    /// The session that carries outbound traffic is up.
    pub session_up: bool,
    /// Our static key in the session carrying outbound traffic.
    pub session_local_key: PublicKey,
    /// The peer's static key in that session (differs from `public_key` while a peer key change is pending).
    pub session_peer_key: PublicKey,
    /// A new session (new local or peer key) is handshaking; the old one still carries traffic.
    pub key_change_pending: bool,
}

/// Everything `Mesh::stats` reports.
#[derive(Debug, Clone)]
pub struct MeshStats {
    pub local_public_key: PublicKey,
    /// The key before the last rotation, still accepted until every peer moved on.
    pub previous_public_key: Option<PublicKey>,
    /// Sorted by name.
    pub peers: Vec<PeerStats>,
    pub drops: DropCounts,
    /// Log lines about drops swallowed by the rate limit and not reported yet.
    pub suppressed_log_lines: u64,
}

impl MeshStats {
    pub fn peer(&self, name: &str) -> Option<&PeerStats> {
        self.peers.iter().find(|peer| peer.name == name)
    }
}
