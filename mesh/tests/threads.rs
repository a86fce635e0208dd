//! The shell's threading: per node, one thread encrypting (TUN→UDP) and one
//! decrypting (UDP→TUN), with timers and reconfiguration running alongside.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use meshward_mesh::{buffer_len, Inbound, Ipv4Net, Mesh, Outbound};

const PACKETS: u64 = 20_000;

type Wire = Sender<(SocketAddr, Vec<u8>)>;

#[test]
fn two_threads_per_node_with_ticks_and_reconfiguration_lose_nothing() {
    let mut net = Net::new(3);
    net.assert_bidirectional(1, 2);
    // Node 3 only exists to be added and removed while traffic flows.
    let peer2_of_1 = net.peer_config(2);
    let peer3_of_1 = net.peer_config(3);
    let peer1_of_2 = net.peer_config(1);
    let meshes: Vec<Arc<Mesh>> = net
        .nodes
        .drain(..)
        .map(|node| Arc::new(node.mesh))
        .collect();
    let (a, b) = (Arc::clone(&meshes[0]), Arc::clone(&meshes[1]));

    let (to_a, inbox_a) = channel();
    let (to_b, inbox_b) = channel();
    let wires = Arc::new([to_a, to_b]);
    let route = move |wires: &[Wire; 2], to: SocketAddr, bytes: &[u8]| {
        // Node 3 has no threads: what is sent to it is lost.
        let inbox = [underlay(1), underlay(2)].iter().position(|a| *a == to);
        if let Some(i) = inbox {
            let _ = wires[i].send((to, bytes.to_vec()));
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let received = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];

    let mut handles = Vec::new();
    for (mesh, from, to, wire) in [
        (Arc::clone(&a), 1u8, 2u8, Arc::clone(&wires)),
        (Arc::clone(&b), 2, 1, Arc::clone(&wires)),
    ] {
        handles.push(thread::spawn(move || {
            let mut out = vec![0u8; buffer_len(MTU)];
            for seq in 0..PACKETS {
                let packet = ipv4(pod(from, 10), pod(to, 10), &numbered(from, seq));
                match mesh.outbound(&packet, &mut out) {
                    Outbound::Send { to, datagram } => route(&wire, to, datagram),
                    other => panic!("packet {seq} from {from}: {other:?}"),
                }
            }
        }));
    }
    for (mesh, me, inbox, counter) in [
        (
            Arc::clone(&a),
            underlay(1),
            inbox_a,
            Arc::clone(&received[0]),
        ),
        (
            Arc::clone(&b),
            underlay(2),
            inbox_b,
            Arc::clone(&received[1]),
        ),
    ] {
        let wire = Arc::clone(&wires);
        let stop = Arc::clone(&stop);
        handles.push(thread::spawn(move || {
            decrypt_loop(&mesh, me, &inbox, &counter, &stop, |to, d| {
                route(&wire, to, d)
            })
        }));
    }
    {
        let (a, b, wire, stop) = (
            Arc::clone(&a),
            Arc::clone(&b),
            Arc::clone(&wires),
            Arc::clone(&stop),
        );
        handles.push(thread::spawn(move || {
            let mut round = 0u32;
            while !stop.load(Ordering::Relaxed) {
                a.tick(|to, d| route(&wire, to, d));
                b.tick(|to, d| route(&wire, to, d));
                // Add and remove node 3, move node 2's extra CIDR around.
                let mut peer2 = peer2_of_1.clone();
                peer2
                    .allowed_ips
                    .push(Ipv4Net::new([198, 19, 100 + (round % 50) as u8, 0].into(), 24).unwrap());
                let peers = if round % 2 == 0 {
                    vec![peer2, peer3_of_1.clone()]
                } else {
                    vec![peer2]
                };
                a.set_peers(peers).unwrap();
                b.set_peers(vec![peer1_of_2.clone()]).unwrap();
                round += 1;
                thread::sleep(Duration::from_millis(2));
            }
        }));
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    while received.iter().any(|r| r.load(Ordering::Relaxed) < PACKETS) && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    drop(wires);
    for handle in handles {
        handle.join().unwrap();
    }
    assert_eq!(
        received[0].load(Ordering::Relaxed),
        PACKETS,
        "node 1 received"
    );
    assert_eq!(
        received[1].load(Ordering::Relaxed),
        PACKETS,
        "node 2 received"
    );
    for (mesh, peer) in [(&meshes[0], "node-2"), (&meshes[1], "node-1")] {
        let stats = mesh.stats();
        assert_eq!(stats.drops.total(), 0, "{:?}", stats.drops);
        assert_eq!(
            stats.peer(peer).unwrap().handshakes,
            1,
            "sessions untouched"
        );
    }
}

fn decrypt_loop(
    mesh: &Mesh,
    me: SocketAddr,
    inbox: &Receiver<(SocketAddr, Vec<u8>)>,
    received: &AtomicU64,
    stop: &AtomicBool,
    mut send: impl FnMut(SocketAddr, &[u8]),
) {
    let mut out = vec![0u8; 65536];
    let mut next_seq = 0u64;
    let from = if me == underlay(1) {
        underlay(2)
    } else {
        underlay(1)
    };
    while !stop.load(Ordering::Relaxed) {
        let Ok((to, datagram)) = inbox.recv_timeout(Duration::from_millis(20)) else {
            continue;
        };
        assert_eq!(to, me);
        match mesh.inbound(from, &datagram, &mut out, &mut send) {
            Inbound::Tunnel(packet) => {
                let (_, seq) = read_numbered(packet).unwrap();
                assert_eq!(seq, next_seq, "in order on an in-order wire");
                next_seq += 1;
                received.fetch_add(1, Ordering::Relaxed);
            }
            Inbound::Done => {}
            Inbound::Drop(reason) => panic!("dropped: {reason}"),
        }
    }
}
