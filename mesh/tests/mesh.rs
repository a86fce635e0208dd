//! Handshakes, data both ways, cryptokey routing and live peer changes,
//! between in-memory nodes.

mod common;

use common::*;
use meshward_mesh::{ConfigError, DropReason, Ipv4Net, Mesh, Outbound, PeerConfig};
use std::net::{Ipv4Addr, SocketAddr};

#[test]
fn first_packet_triggers_a_handshake_and_arrives_once_it_completes() {
    let mut net = Net::new(2);
    // No session: the packet waits and a handshake initiation goes out.
    assert_eq!(net.send(1, 2, b"hello"), Sent::OnWire);
    assert_eq!(net.wire.len(), 1);
    assert_eq!(net.wire[0].bytes[0], 1, "a handshake initiation");
    // A second packet waits for the same handshake.
    assert_eq!(net.send(1, 2, b"again"), Sent::Queued);
    net.deliver();
    let tun = &net.node(2).tun;
    assert_eq!(tun.len(), 2);
    assert_eq!(&tun[0][20..], b"hello");
    assert_eq!(&tun[1][20..], b"again");

    net.assert_bidirectional(1, 2);
    let stats = net.node(1).mesh.stats();
    let b = stats.peer("node-2").unwrap();
    assert!(b.session_up);
    assert_eq!(b.handshakes, 1);
    assert!(b.last_handshake.is_some());
    // hello, again, 1->2; plus the keepalive confirming the handshake.
    assert_eq!(b.tx_packets, 4);
    assert_eq!(b.rx_packets, 1);
    assert_eq!(net.handshakes(2, 1), 1);
    assert_eq!(stats.drops.total(), 0);
}

#[test]
fn tick_brings_sessions_up_before_any_traffic() {
    let mut net = Net::new(2);
    net.tick(1);
    net.deliver();
    assert!(net.node(1).mesh.stats().peers[0].session_up);
    // The first packet goes out encrypted, with no handshake in front of it.
    assert_eq!(net.send(1, 2, b"x"), Sent::OnWire);
    assert_eq!(net.wire[0].bytes[0], 4);
    net.deliver();
    assert_eq!(net.node(2).tun.len(), 1);
}

#[test]
fn three_nodes_route_each_packet_to_the_right_peer() {
    let mut net = Net::new(3);
    for (a, b) in [(1, 2), (1, 3), (2, 3)] {
        net.assert_bidirectional(a, b);
    }
    // Several pods per node: longest prefix match on the destination.
    for host in [1u8, 77, 254] {
        let packet = ipv4(pod(1, 10), pod(3, host), b"to-3");
        assert_eq!(net.send_packet(1, &packet), Sent::OnWire);
    }
    net.deliver();
    assert_eq!(net.node(3).tun.len(), 2 + 3);
    assert_eq!(net.node(2).tun.len(), 2);
    for n in 1..=3 {
        assert_eq!(net.node(n).mesh.stats().drops.total(), 0);
    }
}

#[test]
fn packets_to_unknown_destinations_or_not_ipv4_are_dropped_and_counted() {
    let mut net = Net::new(2);
    let outside = ipv4(pod(1, 10), Ipv4Addr::new(198, 19, 9, 1), b"?");
    assert_eq!(
        net.send_packet(1, &outside),
        Sent::Dropped(DropReason::NoPeerForDestination)
    );
    let mut v6 = vec![0u8; 60];
    v6[0] = 0x60;
    assert_eq!(net.send_packet(1, &v6), Sent::Dropped(DropReason::NotIpv4));
    assert_eq!(
        net.send_packet(1, &[0x45; 10]),
        Sent::Dropped(DropReason::NotIpv4)
    );
    let drops = net.node(1).mesh.stats().drops;
    assert_eq!(drops.get(DropReason::NoPeerForDestination), 1);
    assert_eq!(drops.get(DropReason::NotIpv4), 2);
}

#[test]
fn a_peer_forging_another_nodes_pod_source_is_dropped_and_counted() {
    let mut net = Net::new(3);
    net.assert_bidirectional(1, 2);
    // Node 2 is a real peer with a session, but claims a source in node 3's pod CIDR.
    let forged = ipv4(pod(3, 10), pod(1, 10), b"forged");
    assert_eq!(net.send_packet(2, &forged), Sent::OnWire);
    // And a source in nobody's CIDR.
    let stray = ipv4(Ipv4Addr::new(10, 0, 0, 1), pod(1, 10), b"stray");
    assert_eq!(net.send_packet(2, &stray), Sent::OnWire);
    let delivered = net.node(1).tun.len();
    net.deliver();
    assert_eq!(
        net.node(1).tun.len(),
        delivered,
        "nothing forged reaches the TUN"
    );
    let stats = net.node(1).mesh.stats();
    assert_eq!(stats.drops.get(DropReason::CryptokeyRouting), 2);
    // The session is not disturbed.
    net.assert_bidirectional(1, 2);
    assert_eq!(net.handshakes(1, 2), 1);
}

#[test]
fn a_nested_prefix_routes_to_the_more_specific_peer_both_ways() {
    let mut net = Net::new(3);
    // Node 2 owns 198.19.0.0/16 as well; node 3's /24 inside it stays node 3's.
    let mut peers_of_1 = vec![net.peer_config(2), net.peer_config(3)];
    peers_of_1[0]
        .allowed_ips
        .push(Ipv4Net::new(Ipv4Addr::new(198, 19, 0, 0), 16).unwrap());
    net.node(1).mesh.set_peers(peers_of_1).unwrap();
    net.assert_bidirectional(1, 3);
    net.assert_bidirectional(1, 2);
    // Node 2 may send from 198.19.200.x (its /16) but not from node 3's /24.
    let ok = ipv4(Ipv4Addr::new(198, 19, 200, 1), pod(1, 10), b"ok");
    let forged = ipv4(pod(3, 10), pod(1, 10), b"forged");
    net.send_packet(2, &ok);
    net.send_packet(2, &forged);
    let before = net.node(1).tun.len();
    net.deliver();
    assert_eq!(net.node(1).tun.len(), before + 1);
    assert_eq!(
        net.node(1)
            .mesh
            .stats()
            .drops
            .get(DropReason::CryptokeyRouting),
        1
    );
}

#[test]
fn peers_are_added_and_removed_live_without_disturbing_the_others() {
    let mut net = Net::new(3);
    // Node 1 starts knowing only node 2.
    net.node(1)
        .mesh
        .set_peers(vec![net.peer_config(2)])
        .unwrap();
    net.assert_bidirectional(1, 2);
    assert_eq!(
        net.send(1, 3, b"x"),
        Sent::Dropped(DropReason::NoPeerForDestination)
    );

    // Add node 3.
    net.configure(0);
    net.assert_bidirectional(1, 3);
    net.assert_bidirectional(1, 2);
    assert_eq!(net.handshakes(1, 2), 1, "node 2's session untouched");

    // Remove node 3: its traffic is refused both ways; node 2 carries on.
    net.node(1)
        .mesh
        .set_peers(vec![net.peer_config(2)])
        .unwrap();
    assert_eq!(
        net.send(1, 3, b"x"),
        Sent::Dropped(DropReason::NoPeerForDestination)
    );
    assert_eq!(net.send(3, 1, b"from the removed peer"), Sent::OnWire);
    let before = net.node(1).tun.len();
    net.deliver();
    assert_eq!(net.node(1).tun.len(), before);
    assert_eq!(net.node(1).drops, vec![DropReason::UnknownIndex]);
    net.assert_bidirectional(1, 2);
    assert_eq!(net.handshakes(1, 2), 1);
    assert_eq!(net.node(1).mesh.stats().peers.len(), 1);
}

#[test]
fn an_endpoint_change_keeps_the_session() {
    let mut net = Net::new(2);
    net.assert_bidirectional(1, 2);
    // Node 2 moves; node 1 is told by configuration.
    let moved: SocketAddr = "198.18.0.200:51871".parse().unwrap();
    net.node_mut(2).addr = moved;
    net.configure(0);
    assert_eq!(net.send(1, 2, b"where are you"), Sent::OnWire);
    assert_eq!(net.wire[0].to, moved);
    assert_eq!(net.wire[0].bytes[0], 4, "data on the existing session");
    net.deliver();
    net.assert_bidirectional(1, 2);
    assert_eq!(net.handshakes(1, 2), 1);
    assert_eq!(net.handshakes(2, 1), 1);
}

#[test]
fn roaming_follows_the_source_of_authenticated_datagrams_only() {
    let mut net = Net::new(2);
    net.assert_bidirectional(1, 2);
    // Node 2's address changes (NAT rebinding); node 1 is not told.
    let roamed: SocketAddr = "198.18.0.99:40000".parse().unwrap();
    net.node_mut(2).addr = roamed;
    net.send(2, 1, b"from a new address");
    net.deliver();
    assert_eq!(
        net.node(1).mesh.stats().peers[0].endpoint,
        Some(roamed),
        "learned from an authenticated packet"
    );
    net.assert_bidirectional(1, 2);

    // A replayed datagram from elsewhere does not move the endpoint.
    let old = net.last_data_datagram(2, 1);
    let elsewhere: SocketAddr = "203.0.113.9:1".parse().unwrap();
    assert_eq!(
        net.inject(elsewhere, 1, &old.bytes),
        Err(DropReason::Replay)
    );
    assert_eq!(net.node(1).mesh.stats().peers[0].endpoint, Some(roamed));

    // A configuration that still names the old endpoint does not undo roaming.
    net.node_mut(2).addr = underlay(2);
    let stale = net.peer_config(2);
    net.node_mut(2).addr = roamed;
    net.node(1).mesh.set_peers(vec![stale]).unwrap();
    assert_eq!(net.node(1).mesh.stats().peers[0].endpoint, Some(roamed));
}

#[test]
fn allowed_ips_change_live_without_a_new_session() {
    let mut net = Net::new(2);
    net.assert_bidirectional(1, 2);
    let extra = Ipv4Net::new(Ipv4Addr::new(198, 19, 42, 0), 24).unwrap();
    let mut config = net.peer_config(2);
    config.allowed_ips.push(extra);
    net.node(1).mesh.set_peers(vec![config]).unwrap();
    // Node 1 now routes 198.19.42.0/24 to node 2, and accepts it from node 2.
    let to_extra = ipv4(pod(1, 10), Ipv4Addr::new(198, 19, 42, 5), b"extra");
    assert_eq!(net.send_packet(1, &to_extra), Sent::OnWire);
    let from_extra = ipv4(Ipv4Addr::new(198, 19, 42, 5), pod(1, 10), b"reply");
    net.send_packet(2, &from_extra);
    net.deliver();
    assert_eq!(net.node(2).tun.last().unwrap()[20..], *b"extra");
    assert_eq!(net.node(1).tun.last().unwrap()[20..], *b"reply");

    // Take the original CIDR away: no longer routed, no longer accepted.
    let mut config = net.peer_config(2);
    config.allowed_ips = vec![extra];
    net.node(1).mesh.set_peers(vec![config]).unwrap();
    assert_eq!(
        net.send(1, 2, b"x"),
        Sent::Dropped(DropReason::NoPeerForDestination)
    );
    net.send(2, 1, b"from the old cidr");
    net.deliver();
    assert_eq!(net.node(1).drops, vec![DropReason::CryptokeyRouting]);
    assert_eq!(net.handshakes(1, 2), 1);
}

#[test]
fn a_peer_without_endpoint_is_reached_once_it_calls_in() {
    let mut net = Net::new(2);
    // Node 1 starts afresh, never told where node 2 is.
    net.node_mut(1).mesh = Mesh::new(secret(1));
    let mut config = net.peer_config(2);
    config.endpoint = None;
    net.node(1).mesh.set_peers(vec![config]).unwrap();
    assert_eq!(net.send(1, 2, b"x"), Sent::Dropped(DropReason::NoEndpoint));
    // Node 2 knows where node 1 is and handshakes; node 1 learns the endpoint.
    net.assert_bidirectional(2, 1);
    assert_eq!(
        net.node(1).mesh.stats().peers[0].endpoint,
        Some(underlay(2))
    );
}

#[test]
fn invalid_peer_lists_are_refused_whole() {
    let net = Net::new(3);
    let mesh = &net.node(1).mesh;
    let good = vec![net.peer_config(2)];
    mesh.set_peers(good).unwrap();

    let mut twice = vec![net.peer_config(2), net.peer_config(3)];
    twice[1].name = "node-2".into();
    assert!(matches!(
        mesh.set_peers(twice),
        Err(ConfigError::DuplicateName { .. })
    ));

    let mut same_key = vec![net.peer_config(2), net.peer_config(3)];
    same_key[1].public_key = same_key[0].public_key;
    assert!(matches!(
        mesh.set_peers(same_key),
        Err(ConfigError::DuplicateKey { .. })
    ));

    let mut own = vec![net.peer_config(3)];
    own[0].public_key = mesh.public_key();
    assert!(matches!(
        mesh.set_peers(own),
        Err(ConfigError::OwnKey { .. })
    ));

    let mut overlap = vec![net.peer_config(2), net.peer_config(3)];
    overlap[1].allowed_ips.push(pod_cidr(2));
    assert_eq!(
        mesh.set_peers(overlap),
        Err(ConfigError::DuplicateAllowedIp {
            net: pod_cidr(2),
            first: "node-2".into(),
            second: "node-3".into()
        })
    );

    let mut unnamed = vec![net.peer_config(2)];
    unnamed[0].name.clear();
    assert_eq!(mesh.set_peers(unnamed), Err(ConfigError::EmptyName));

    // Nothing changed: still exactly node 2.
    let stats = mesh.stats();
    assert_eq!(stats.peers.len(), 1);
    assert_eq!(stats.peers[0].name, "node-2");
}

#[test]
fn small_output_buffers_are_refused_not_panicked_on() {
    let mut net = Net::new(2);
    net.assert_bidirectional(1, 2);
    let mesh = &net.node(1).mesh;
    let packet = ipv4(pod(1, 10), pod(2, 10), &[7u8; 1000]);
    let mut small = vec![0u8; 1000];
    assert_eq!(
        mesh.outbound(&packet, &mut small),
        Outbound::Drop(DropReason::BufferTooSmall)
    );
    let datagram = net.last_data_datagram(2, 1);
    let mut tiny = [0u8; 40];
    assert_eq!(
        mesh.inbound(datagram.from, &datagram.bytes, &mut tiny, |_, _| {}),
        meshward_mesh::Inbound::Drop(DropReason::BufferTooSmall)
    );
}

#[test]
fn a_peer_with_a_queued_packet_larger_than_the_reply_buffer_still_gets_it() {
    let mut net = Net::new(2);
    let big = ipv4(pod(1, 10), pod(2, 10), &[9u8; 1400]);
    assert_eq!(net.send_packet(1, &big), Sent::OnWire);
    // Deliver with a small buffer: the handshake reply fits, the queued
    // packet does not, and still goes out.
    let init = net.wire.pop_front().unwrap();
    net.deliver_one(init);
    let response = net.wire.pop_front().unwrap();
    let mut sent = Vec::new();
    let mut out = [0u8; 200];
    let result = net
        .node(1)
        .mesh
        .inbound(response.from, &response.bytes, &mut out, |to, d| {
            sent.push((to, d.to_vec()))
        });
    assert_eq!(result, meshward_mesh::Inbound::Done);
    assert_eq!(sent.len(), 2, "keepalive and the queued packet");
    assert_eq!(sent[1].1.len(), big.len() + 32);
}

/// Hands every datagram on the wire over with a buffer only as large as a
/// data plane gives (the datagram, at least 148 bytes).
fn deliver_with_small_buffers(net: &mut Net) {
    for _ in 0..1000 {
        let Some(d) = net.wire.pop_front() else {
            return;
        };
        let i = if d.to == underlay(1) { 0 } else { 1 };
        let mut out = vec![0u8; d.bytes.len().max(148)];
        let mut replies = Vec::new();
        let node = &mut net.nodes[i];
        let result = node.mesh.inbound(d.from, &d.bytes, &mut out, |to, r| {
            replies.push((to, r.to_vec()))
        });
        if let meshward_mesh::Inbound::Tunnel(packet) = result {
            node.tun.push(packet.to_vec());
        }
        let from = node.addr;
        for (to, bytes) in replies {
            net.wire.push_back(Datagram { from, to, bytes });
        }
    }
    panic!("the wire never drained");
}

/// Both sides queue a packet and initiate at once (as two nodes whose pods
/// talk at start-up do). Each answers the other's initiation as responder,
/// which cannot send yet, so its queued packet goes back to boringtun's
/// queue; a later flush must still size its buffer for that packet
/// (boringtun panics on one too small), with the small buffers a data plane
/// hands over.
#[test]
fn packets_queued_on_both_sides_of_crossing_handshakes_survive_small_buffers() {
    let mut net = Net::new(2);
    let a = ipv4(pod(1, 10), pod(2, 10), &[1u8; 600]);
    let b = ipv4(pod(2, 10), pod(1, 10), &[2u8; 600]);
    assert_eq!(net.send_packet(1, &a), Sent::OnWire);
    assert_eq!(net.send_packet(2, &b), Sent::OnWire);
    deliver_with_small_buffers(&mut net);
    // On a mock clock the crossing handshakes need the retry timer.
    for _ in 0..3 {
        if !net.node(1).tun.is_empty() && !net.node(2).tun.is_empty() {
            break;
        }
        #[cfg(feature = "mock-time")]
        meshward_mesh::MockClock::advance(std::time::Duration::from_secs(6));
        net.tick_all();
        deliver_with_small_buffers(&mut net);
    }
    assert_eq!(net.node(2).tun, vec![a]);
    assert_eq!(net.node(1).tun, vec![b]);
}

#[test]
fn mesh_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Mesh>();
    let _ = PeerConfig {
        name: String::new(),
        public_key: net_key(),
        endpoint: None,
        allowed_ips: Vec::new(),
        keepalive: None,
    };
}

fn net_key() -> meshward_mesh::PublicKey {
    meshward_mesh::PublicKey::from(&secret(200))
}
