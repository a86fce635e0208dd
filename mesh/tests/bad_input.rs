//! Random, truncated, replayed and forged datagrams: never a panic, never a
//! disturbed session, always counted under the right reason.

mod common;

use std::net::SocketAddr;

use common::*;
use meshward_mesh::{DropReason, Inbound, MeshConfig};

fn established() -> Net {
    let mut net = Net::new(2);
    net.assert_bidirectional(1, 2);
    net.assert_bidirectional(1, 2);
    net
}

fn attacker() -> SocketAddr {
    "203.0.113.66:4444".parse().unwrap()
}

#[test]
fn each_kind_of_bad_datagram_is_counted_under_its_reason() {
    let mut net = established();
    let data = net.last_data_datagram(1, 2).bytes;
    let init = net
        .captured
        .iter()
        .find(|d| d.bytes[0] == 1)
        .unwrap()
        .bytes
        .clone();
    let response = net
        .captured
        .iter()
        .find(|d| d.bytes[0] == 2)
        .unwrap()
        .bytes
        .clone();

    let cases: Vec<(&str, Vec<u8>, DropReason)> = vec![
        ("empty", vec![], DropReason::TooShort),
        ("three bytes", vec![4, 0, 0], DropReason::TooShort),
        (
            "data header only",
            data[..20].to_vec(),
            DropReason::TooShort,
        ),
        ("truncated init", init[..100].to_vec(), DropReason::TooShort),
        ("unknown type", vec![9; 64], DropReason::Malformed),
        (
            "reserved bytes set",
            [&[4, 1, 0, 0][..], &data[4..]].concat(),
            DropReason::Malformed,
        ),
        (
            "init too long",
            [init.as_slice(), &[0]].concat(),
            DropReason::Malformed,
        ),
        (
            "data for nobody",
            with_receiver(&data, 0x0012_3456),
            DropReason::UnknownIndex,
        ),
        (
            "response for nobody",
            with_receiver_at(&response, 8, 0x00ab_cdef),
            DropReason::UnknownIndex,
        ),
        // A counter not seen yet, so the AEAD tag is what gets checked.
        (
            "flipped ciphertext",
            flipped(&fresh_counter(&data), 40),
            DropReason::DecryptFailed,
        ),
        (
            "truncated data",
            fresh_counter(&data[..data.len() - 1]),
            DropReason::DecryptFailed,
        ),
        (
            "forged counter",
            fresh_counter(&data),
            DropReason::DecryptFailed,
        ),
        // The same datagram again: the counter was seen, before any decryption.
        (
            "flipped and replayed",
            flipped(&data, 40),
            DropReason::Replay,
        ),
        ("replayed data", data.clone(), DropReason::Replay),
        (
            "random init",
            [&[1, 0, 0, 0][..], &[0x42; 144]].concat(),
            DropReason::BadMac,
        ),
        ("replayed init", init.clone(), DropReason::Replay),
    ];
    for (what, bytes, reason) in &cases {
        assert_eq!(net.inject(attacker(), 2, bytes), Err(*reason), "{what}");
    }
    // A replayed response goes to the initiator, node 1.
    assert_eq!(
        net.inject(attacker(), 1, &response),
        Err(DropReason::Replay)
    );

    let drops = net.node(2).mesh.stats().drops;
    for reason in DropReason::ALL {
        let expected = cases.iter().filter(|(_, _, r)| *r == reason).count() as u64;
        assert_eq!(drops.get(reason), expected, "{reason}");
    }
    // Nothing was answered, nobody roamed to the attacker, sessions untouched.
    assert!(net.wire.is_empty());
    for (n, peer) in [(1, 2), (2, 1)] {
        let stats = net.node(n).mesh.stats();
        assert_eq!(stats.peers[0].endpoint, Some(underlay(peer)));
        assert_eq!(stats.peers[0].handshakes, 1);
    }
    net.assert_bidirectional(1, 2);
}

#[test]
fn a_handshake_from_a_key_nobody_configured_is_refused() {
    let mut net = Net::new(3);
    // Node 2 does not know node 3; node 3 knows node 2.
    net.node(2)
        .mesh
        .set_peers(vec![net.peer_config(1)])
        .unwrap();
    assert_eq!(net.send(3, 2, b"let me in"), Sent::OnWire);
    net.deliver();
    assert_eq!(net.node(2).drops, vec![DropReason::UnknownPeerKey]);
    assert!(net.node(2).tun.is_empty());
}

#[test]
fn handshake_floods_get_cookies_not_diffie_hellman() {
    let config = MeshConfig {
        handshake_rate_limit: 3,
        ..MeshConfig::default()
    };
    let mut net = Net::with_config(2, config);
    net.assert_bidirectional(1, 2);
    let init = net
        .captured
        .iter()
        .find(|d| d.bytes[0] == 1)
        .unwrap()
        .bytes
        .clone();
    for _ in 0..10 {
        let _ = net.inject(attacker(), 2, &init);
    }
    let drops = net.node(2).mesh.stats().drops;
    assert!(drops.get(DropReason::RateLimited) >= 6, "{drops:?}");
    assert_eq!(
        drops.get(DropReason::RateLimited) + drops.get(DropReason::Replay),
        10
    );
    // The cookie replies go to the sender's address, not to the peer.
    assert!(net
        .wire
        .iter()
        .all(|d| d.to == attacker() && d.bytes[0] == 3 && d.bytes.len() == 64));
    net.wire.clear();
    net.assert_bidirectional(1, 2);
}

#[test]
fn a_hundred_thousand_random_and_mutated_datagrams_change_nothing() {
    let mut net = established();
    // A corpus of real datagrams of every type, cookie reply included.
    let mut corpus: Vec<Vec<u8>> = net.captured.iter().map(|d| d.bytes.clone()).collect();
    corpus.push(cookie_reply(&net));
    let receivers: Vec<[u8; 4]> = corpus
        .iter()
        .filter(|d| d[0] == 4)
        .map(|d| [d[4], d[5], d[6], d[7]])
        .collect();

    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut out = vec![0u8; 65536];
    let mesh = &net.node(2).mesh;
    let before = mesh.stats();
    for i in 0..100_000u32 {
        let datagram = fuzz_datagram(&mut rng, &corpus, &receivers);
        let from = if i % 3 == 0 { attacker() } else { underlay(1) };
        let result = mesh.inbound(from, &datagram, &mut out, |_, _| {});
        assert!(
            matches!(result, Inbound::Drop(_) | Inbound::Done),
            "datagram {i} got through: {datagram:?}"
        );
        // And the other direction: random packets from the TUN.
        if i % 10 == 0 {
            let packet = random_bytes(&mut rng, 80);
            let _ = mesh.outbound(&packet, &mut out);
        }
    }
    let after = mesh.stats();
    assert_eq!(after.peers[0].handshakes, before.peers[0].handshakes);
    assert_eq!(after.peers[0].rx_packets, before.peers[0].rx_packets);
    assert_eq!(after.peers[0].endpoint, Some(underlay(1)));
    assert!(after.drops.total() >= 100_000);
    net.assert_bidirectional(1, 2);
    assert_eq!(net.handshakes(1, 2), 1);
}

/// A cookie reply really produced by node 2 under load, for the corpus.
fn cookie_reply(net: &Net) -> Vec<u8> {
    let config = MeshConfig {
        handshake_rate_limit: 0,
        ..MeshConfig::default()
    };
    let mut loaded = Net::with_config(2, config);
    loaded.send(1, 2, b"x");
    let init = loaded.wire.pop_front().unwrap();
    let _ = net;
    loaded.deliver_one(init);
    loaded.wire.pop_front().unwrap().bytes
}

fn fuzz_datagram(rng: &mut XorShift, corpus: &[Vec<u8>], receivers: &[[u8; 4]]) -> Vec<u8> {
    let pick = |rng: &mut XorShift| corpus[(rng.next() % corpus.len() as u64) as usize].clone();
    match rng.next() % 8 {
        0 => random_bytes(rng, 200),
        // A valid header of a random type, random body.
        1 => {
            let mut d = random_bytes(rng, 200);
            if d.len() >= 4 {
                d[..4].copy_from_slice(&[(rng.next() % 5) as u8, 0, 0, 0]);
            }
            d
        }
        // A data message to a live receiver index, random ciphertext.
        2 => {
            let mut d = random_bytes(rng, 1500);
            d.resize(d.len().max(32), 0);
            d[..4].copy_from_slice(&[4, 0, 0, 0]);
            d[4..8].copy_from_slice(&receivers[(rng.next() % receivers.len() as u64) as usize]);
            d
        }
        // A real datagram with a few bytes flipped.
        3 | 4 => {
            let mut d = pick(rng);
            for _ in 0..1 + rng.next() % 4 {
                let at = (rng.next() % d.len() as u64) as usize;
                d[at] ^= 1 << (rng.next() % 8);
            }
            d
        }
        // Truncated.
        5 => {
            let mut d = pick(rng);
            d.truncate((rng.next() % d.len() as u64) as usize);
            d
        }
        // Extended.
        6 => {
            let mut d = pick(rng);
            let extra = random_bytes(rng, 64);
            d.extend_from_slice(&extra);
            d
        }
        // Replayed as is.
        _ => pick(rng),
    }
}

fn random_bytes(rng: &mut XorShift, max_len: u64) -> Vec<u8> {
    let len = (rng.next() % (max_len + 1)) as usize;
    (0..len).map(|_| rng.next() as u8).collect()
}

fn with_receiver(datagram: &[u8], receiver: u32) -> Vec<u8> {
    with_receiver_at(datagram, 4, receiver)
}

fn with_receiver_at(datagram: &[u8], offset: usize, receiver: u32) -> Vec<u8> {
    let mut d = datagram.to_vec();
    d[offset..offset + 4].copy_from_slice(&receiver.to_le_bytes());
    d
}

fn fresh_counter(datagram: &[u8]) -> Vec<u8> {
    let mut d = datagram.to_vec();
    d[8..16].copy_from_slice(&1_000_000u64.to_le_bytes());
    d
}

fn flipped(datagram: &[u8], at: usize) -> Vec<u8> {
    let mut d = datagram.to_vec();
    d[at] ^= 0x80;
    d
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
