//! WireGuard's timers as `tick` drives them, on a mock clock shared with
//! boringtun: `cargo test -p meshward-mesh --features mock-time`.
#![cfg(feature = "mock-time")]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use meshward_mesh::{MeshConfig, MockClock};

fn advance(net: &mut Net, seconds: u64) {
    MockClock::advance(Duration::from_secs(seconds));
    net.tick_all();
}

/// Only node 1's timers: node 2 would otherwise handshake on its own.
fn advance_node1(net: &mut Net, seconds: u64) {
    MockClock::advance(Duration::from_secs(seconds));
    net.tick(1);
}

fn black_hole() -> SocketAddr {
    "198.18.0.250:51871".parse().unwrap()
}

#[test]
fn a_lost_handshake_is_retried_after_rekey_timeout() {
    let mut net = Net::new(2);
    net.send(1, 2, b"first");
    net.wire.clear(); // the initiation is lost
    advance_node1(&mut net, 2);
    assert!(net.wire.is_empty(), "no retry before 5 s");
    advance_node1(&mut net, 4);
    assert_eq!(net.wire.len(), 1);
    assert_eq!(net.wire[0].bytes[0], 1, "a new initiation");
    net.deliver();
    assert_eq!(net.node(2).tun.len(), 1, "the waiting packet arrives");
}

#[test]
fn an_unreachable_peer_expires_after_rekey_attempt_time_then_recovers() {
    let mut net = Net::new(2);
    let mut config = net.peer_config(2);
    config.endpoint = Some(black_hole());
    net.node(1).mesh.set_peers(vec![config]).unwrap();
    net.send(1, 2, b"into the void");
    let mut attempts = 0;
    for _ in 0..120 {
        advance_node1(&mut net, 1);
        net.deliver();
        attempts = net.lost.iter().filter(|d| d.bytes[0] == 1).count();
    }
    // One initiation, then a retry every 5 s for 90 s, then silence.
    assert!((17..=20).contains(&attempts), "{attempts} attempts");
    advance_node1(&mut net, 30);
    net.deliver();
    assert_eq!(
        net.lost.iter().filter(|d| d.bytes[0] == 1).count(),
        attempts
    );
    // Told the right endpoint, the next packet starts over and arrives.
    net.configure(0);
    assert_eq!(net.send(1, 2, b"found you"), Sent::OnWire);
    net.deliver();
    assert_eq!(net.node(2).tun.len(), 1, "the expired queue was dropped");
    assert_eq!(&net.node(2).tun[0][20..], b"found you");
}

#[test]
fn a_receiver_that_has_nothing_to_send_answers_with_a_keepalive() {
    let mut net = Net::new(2);
    net.assert_bidirectional(1, 2);
    advance(&mut net, 1);
    net.send(1, 2, b"one way");
    net.deliver();
    advance(&mut net, 5);
    assert!(net.wire.is_empty());
    advance(&mut net, 6);
    assert_eq!(net.wire.len(), 1);
    let keepalive = &net.wire[0];
    assert_eq!((keepalive.from, keepalive.bytes.len()), (underlay(2), 32));
    net.deliver();
    assert!(net.node(1).drops.is_empty());
}

#[test]
fn persistent_keepalive_fires_after_the_configured_idle_time() {
    let mut net = Net::new(2);
    let mut config = net.peer_config(2);
    config.keepalive = Some(25);
    net.node(1).mesh.set_peers(vec![config]).unwrap();
    net.assert_bidirectional(1, 2);
    net.tick(1);
    let mut keepalives = 0;
    for _ in 0..60 {
        MockClock::advance(Duration::from_secs(1));
        net.tick(1);
        keepalives += net
            .wire
            .drain(..)
            .filter(|d| d.from == underlay(1) && d.bytes.len() == 32)
            .count();
    }
    assert_eq!(keepalives, 2, "at 25 s and 50 s of idleness");
    // Traffic postpones it.
    for _ in 0..30 {
        MockClock::advance(Duration::from_secs(1));
        net.send(1, 2, b"busy");
        net.tick(1);
        net.wire.retain(|d| d.bytes.len() == 32);
        assert!(net.wire.is_empty());
    }
}

#[test]
fn the_initiator_rekeys_after_two_minutes_without_losing_packets() {
    let mut net = Net::new(2);
    net.assert_bidirectional(1, 2);
    let mut sent = 0;
    for _ in 0..130 {
        MockClock::advance(Duration::from_secs(1));
        net.send(1, 2, b"steady");
        net.send(2, 1, b"steady");
        sent += 1;
        net.tick_all();
        net.deliver();
    }
    assert_eq!(net.handshakes(1, 2), 2, "one rekey at 120 s");
    let arrived = |n: u8| {
        net.node(n)
            .tun
            .iter()
            .filter(|p| p[20..] == *b"steady")
            .count()
    };
    assert_eq!((arrived(1), arrived(2)), (sent, sent));
    assert!(net.node(1).drops.is_empty() && net.node(2).drops.is_empty());
}

#[test]
fn an_idle_session_is_wiped_after_nine_minutes_and_rebuilt_on_demand() {
    let mut net = Net::new(2);
    net.assert_bidirectional(1, 2);
    for _ in 0..60 {
        advance(&mut net, 10);
        net.deliver();
    }
    assert!(!net.node(1).mesh.stats().peers[0].session_up);
    assert_eq!(net.send(1, 2, b"wake up"), Sent::OnWire);
    assert_eq!(net.wire[0].bytes[0], 1, "a fresh handshake");
    net.deliver();
    net.assert_bidirectional(1, 2);
}

#[test]
fn under_load_a_cookie_lets_a_real_peer_through() {
    // Node 2 always claims to be under load: every initiation must carry a
    // valid mac2, which only a cookie reply gives.
    let config = MeshConfig {
        handshake_rate_limit: 0,
        ..MeshConfig::default()
    };
    let mut net = Net::with_config(2, config);
    net.send(1, 2, b"through the cookie");
    net.deliver();
    assert!(net.node(2).tun.is_empty());
    assert!(net.captured.iter().any(|d| d.bytes[0] == 3), "cookie sent");
    advance(&mut net, 6);
    net.deliver();
    assert_eq!(net.node(2).tun.len(), 1);
}

#[test]
fn a_replaced_session_stops_draining_once_the_peer_moved_on() {
    let config = MeshConfig {
        drain_idle: Duration::from_secs(5),
        ..MeshConfig::default()
    };
    let mut net = Net::with_config(2, config);
    net.assert_bidirectional(1, 2);
    net.rotate(1, 101);
    net.configure(1);
    net.tick_all();
    net.deliver();
    net.assert_bidirectional(1, 2);
    assert!(net.node(1).mesh.stats().previous_public_key.is_some());
    advance(&mut net, 3);
    assert!(net.node(1).mesh.stats().previous_public_key.is_some());
    advance(&mut net, 3);
    assert_eq!(net.node(1).mesh.stats().previous_public_key, None);
    net.assert_bidirectional(1, 2);
}
