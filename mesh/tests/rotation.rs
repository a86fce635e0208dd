//! Key rotation, ours and a peer's, under a continuous packet stream in both
//! directions: not one packet may be lost or delivered twice.

mod common;

use common::*;
use meshward_mesh::{DropReason, PublicKey};

/// Streams numbered packets between the pairs, one per pair and direction
/// per step, running `event` before each step and ticking every few steps.
/// Every datagram (handshakes too) spends 0 to 4 steps in flight and each
/// step's arrivals come in random order, so datagrams sealed with old keys
/// still arrive after the receiver switched to the new session. Then checks
/// every packet arrived exactly once.
fn stream(net: &mut Net, pairs: &[(u8, u8)], steps: u64, mut event: impl FnMut(&mut Net, u64)) {
    // Sessions up first, so every packet of the stream is sent at once.
    for &(a, b) in pairs {
        net.assert_bidirectional(a, b);
    }
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut in_flight: Vec<(u64, Datagram)> = Vec::new();
    let mut step = 0;
    while step < steps || !in_flight.is_empty() || !net.wire.is_empty() {
        if step < steps {
            event(net, step);
            for (i, &(a, b)) in pairs.iter().enumerate() {
                let stream_id = i as u8 * 2;
                assert_eq!(
                    net.send(a, b, &numbered(stream_id, step)),
                    Sent::OnWire,
                    "step {step} {a}->{b}"
                );
                assert_eq!(
                    net.send(b, a, &numbered(stream_id + 1, step)),
                    Sent::OnWire,
                    "step {step} {b}->{a}"
                );
            }
            if step % 3 == 0 {
                net.tick_all();
            }
        }
        for datagram in net.wire.drain(..) {
            in_flight.push((step + rng.next() % 5, datagram));
        }
        let (mut due, later): (Vec<_>, Vec<_>) =
            in_flight.drain(..).partition(|(at, _)| *at <= step);
        in_flight = later;
        shuffle(&mut due, &mut rng);
        for (_, datagram) in due {
            net.deliver_one(datagram);
        }
        step += 1;
        assert!(step < steps + 10_000, "the network never settled");
    }
    for (i, &(a, b)) in pairs.iter().enumerate() {
        let stream_id = i as u8 * 2;
        assert_stream_complete(net, b, stream_id, steps);
        assert_stream_complete(net, a, stream_id + 1, steps);
    }
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

fn shuffle<T>(items: &mut [T], rng: &mut XorShift) {
    for i in (1..items.len()).rev() {
        items.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
}

fn assert_stream_complete(net: &Net, at: u8, stream_id: u8, steps: u64) {
    let mut seen: Vec<u64> = net
        .node(at)
        .tun
        .iter()
        .filter_map(|packet| read_numbered(packet))
        .filter(|(id, _)| *id == stream_id)
        .map(|(_, seq)| seq)
        .collect();
    seen.sort_unstable();
    let expected: Vec<u64> = (0..steps).collect();
    assert_eq!(
        seen.len(),
        expected.len(),
        "stream {stream_id} at node {at}: lost or duplicated packets"
    );
    assert_eq!(seen, expected, "stream {stream_id} at node {at}");
}

/// The only drops a rotation may cause: handshakes with a key the receiver
/// has not been told about yet. Nothing carrying data.
fn assert_only_early_handshakes_dropped(net: &Net) {
    for node in &net.nodes {
        assert!(
            node.drops.iter().all(|d| *d == DropReason::UnknownPeerKey),
            "node {} dropped {:?}",
            node.n,
            node.drops
        );
    }
}

fn session_keys(net: &Net, at: u8, peer: u8) -> (PublicKey, PublicKey) {
    let stats = net.node(at).mesh.stats();
    let peer = stats.peer(&format!("node-{peer}")).unwrap();
    assert!(
        !peer.key_change_pending,
        "node {at}: key change still pending"
    );
    assert!(peer.session_up);
    (peer.session_local_key, peer.session_peer_key)
}

#[test]
fn local_key_rotation_loses_no_packet() {
    let mut net = Net::new(2);
    let old_key = net.node(1).public;
    stream(&mut net, &[(1, 2)], 300, |net, step| match step {
        // Node 1 rotates; node 2 learns the new key 70 steps later.
        50 => net.rotate(1, 101),
        120 => net.configure(Net::idx(2)),
        _ => {}
    });
    assert_only_early_handshakes_dropped(&net);
    let new_key = net.node(1).public;
    assert_ne!(new_key, old_key);
    assert_eq!(session_keys(&net, 1, 2).0, new_key);
    assert_eq!(session_keys(&net, 2, 1).1, new_key);
    // The previous key is kept while the replaced session drains.
    let stats = net.node(1).mesh.stats();
    assert_eq!(stats.local_public_key, new_key);
    assert_eq!(stats.previous_public_key, Some(old_key));

    #[cfg(feature = "mock-time")]
    {
        meshward_mesh::MockClock::advance(std::time::Duration::from_secs(6));
        net.tick_all();
        net.deliver();
        assert_eq!(net.node(1).mesh.stats().previous_public_key, None);
        net.assert_bidirectional(1, 2);
    }
}

#[test]
fn a_peer_key_change_loses_no_packet() {
    let mut net = Net::new(2);
    stream(&mut net, &[(1, 2)], 300, |net, step| match step {
        // Node 2 rotates; node 1 is told 70 steps later.
        50 => net.rotate(2, 102),
        120 => net.configure(Net::idx(1)),
        _ => {}
    });
    assert_only_early_handshakes_dropped(&net);
    let new_key = net.node(2).public;
    assert_eq!(session_keys(&net, 1, 2).1, new_key);
    assert_eq!(session_keys(&net, 2, 1).0, new_key);
    assert_eq!(net.node(1).mesh.stats().peers[0].public_key, new_key);
}

#[test]
fn both_ends_rotating_at_once_lose_no_packet() {
    let mut net = Net::new(2);
    stream(&mut net, &[(1, 2)], 320, |net, step| match step {
        40 => net.rotate(1, 101),
        41 => net.rotate(2, 102),
        100 => net.configure(Net::idx(2)),
        160 => net.configure(Net::idx(1)),
        _ => {}
    });
    assert_only_early_handshakes_dropped(&net);
    let (key1, key2) = (net.node(1).public, net.node(2).public);
    assert_eq!(session_keys(&net, 1, 2), (key1, key2));
    assert_eq!(session_keys(&net, 2, 1), (key2, key1));
}

#[test]
fn rotation_announced_at_once_loses_no_packet() {
    let mut net = Net::new(2);
    stream(&mut net, &[(1, 2)], 200, |net, step| {
        if step == 60 {
            net.rotate(1, 101);
            net.configure(Net::idx(2));
        }
    });
    assert_only_early_handshakes_dropped(&net);
    assert_eq!(session_keys(&net, 2, 1).1, net.node(1).public);
}

#[test]
fn three_nodes_learning_a_rotation_at_different_times_lose_no_packet() {
    let mut net = Net::new(3);
    stream(
        &mut net,
        &[(1, 2), (1, 3), (2, 3)],
        300,
        |net, step| match step {
            30 => net.rotate(1, 101),
            90 => net.configure(Net::idx(3)),
            200 => net.configure(Net::idx(2)),
            _ => {}
        },
    );
    assert_only_early_handshakes_dropped(&net);
    let key1 = net.node(1).public;
    assert_eq!(session_keys(&net, 2, 1).1, key1);
    assert_eq!(session_keys(&net, 3, 1).1, key1);
    // The 2-3 session never changed.
    assert_eq!(net.handshakes(2, 3), 1);
}

#[test]
fn rotation_without_a_session_moves_to_the_new_key_once_known() {
    let mut net = Net::new(2);
    net.rotate(1, 101);
    net.configure(Net::idx(2));
    // Both keys work meanwhile; the background handshake moves the session.
    net.assert_bidirectional(1, 2);
    net.tick_all();
    net.deliver();
    net.assert_bidirectional(1, 2);
    let key1 = net.node(1).public;
    assert_eq!(session_keys(&net, 1, 2).0, key1);
    assert_eq!(session_keys(&net, 2, 1).1, key1);
    assert_only_early_handshakes_dropped(&net);
}

#[test]
fn a_second_rotation_before_the_first_completed_converges_on_the_last_key() {
    let mut net = Net::new(2);
    net.assert_bidirectional(1, 2);
    net.rotate(1, 101);
    net.rotate(1, 111);
    net.configure(Net::idx(2));
    net.tick_all();
    net.deliver();
    net.assert_bidirectional(1, 2);
    let key1 = net.node(1).public;
    assert_eq!(session_keys(&net, 1, 2).0, key1);
    assert_eq!(session_keys(&net, 2, 1).1, key1);
}

#[test]
fn rotating_to_the_same_key_changes_nothing() {
    let mut net = Net::new(2);
    net.assert_bidirectional(1, 2);
    net.node(1).mesh.rotate_local_key(secret(1));
    assert_eq!(net.node(1).mesh.stats().previous_public_key, None);
    net.tick_all();
    net.deliver();
    net.assert_bidirectional(1, 2);
    assert_eq!(net.handshakes(1, 2), 1);
}

#[cfg(feature = "mock-time")]
#[test]
fn a_peer_that_never_learns_the_new_key_is_cut_off_after_the_timeout() {
    use meshward_mesh::MockClock;
    use std::time::Duration;

    let mut net = Net::new(2);
    net.assert_bidirectional(1, 2);
    net.rotate(1, 101);
    // Within the timeout the old session works.
    MockClock::advance(Duration::from_secs(100));
    net.tick_all();
    net.deliver();
    net.assert_bidirectional(1, 2);
    assert!(net.node(1).mesh.stats().previous_public_key.is_some());
    // Past it, the previous key is forgotten and the old session with it.
    MockClock::advance(Duration::from_secs(201));
    net.tick_all();
    net.deliver();
    assert_eq!(net.node(1).mesh.stats().previous_public_key, None);
    net.send(2, 1, b"old session");
    net.deliver();
    assert_eq!(
        net.node(1)
            .tun
            .iter()
            .filter(|p| p[20..] == *b"old session")
            .count(),
        0
    );
    // Once node 2 learns the key, traffic resumes.
    net.configure(Net::idx(2));
    MockClock::advance(Duration::from_secs(1));
    net.tick_all();
    net.deliver();
    net.assert_bidirectional(1, 2);
}
