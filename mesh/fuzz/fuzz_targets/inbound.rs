//! Arbitrary datagrams into `Mesh::inbound` of a node with an established
//! session (and arbitrary packets into `outbound`). Nothing may panic, and
//! nothing forged may come out as plaintext.
//!
//! Input: first byte picks the mode, the rest is the payload.
//! * 0: the payload is the datagram, from the peer's address;
//! * 1: the payload is XORed over a real datagram (picked by its first
//!   byte), so the fuzzer starts past the header and index checks;
//! * 2: the payload is the datagram, from an unknown address;
//! * 3: the payload is a plaintext packet for `outbound`.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshward_mesh::{Inbound, Ipv4Net, Mesh, Outbound, PeerConfig, PublicKey, StaticSecret};

struct Setup {
    node: Mesh,
    /// Real datagrams the node has already received (so a zero XOR is a replay).
    seen: Vec<Vec<u8>>,
}

fn address(n: u8) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(198, 18, 0, n), 51871))
}

fn secret(seed: u8) -> StaticSecret {
    StaticSecret::from([seed; 32])
}

fn packet(from: u8, to: u8, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[12..16].copy_from_slice(&[198, 19, from, 10]);
    p[16..20].copy_from_slice(&[198, 19, to, 10]);
    p
}

/// Node 2 with a session to node 1, and the datagrams it received setting it up.
fn setup() -> Setup {
    let meshes = [Mesh::new(secret(1)), Mesh::new(secret(2))];
    for (me, n) in [(0usize, 2u8), (1, 1)] {
        meshes[me]
            .set_peers(vec![PeerConfig {
                name: format!("node-{n}"),
                public_key: PublicKey::from(&secret(n)),
                endpoint: Some(address(n)),
                allowed_ips: vec![Ipv4Net::new(Ipv4Addr::new(198, 19, n, 0), 24).unwrap()],
                keepalive: None,
            }])
            .unwrap();
    }
    let [a, b] = meshes;
    let mut seen = Vec::new();
    let mut out = vec![0u8; 65536];
    let mut to_b = Vec::new();
    if let Outbound::Send { datagram, .. } = a.outbound(&packet(1, 2, 60), &mut out) {
        to_b.push(datagram.to_vec());
    }
    for _ in 0..4 {
        let mut to_a = Vec::new();
        for d in to_b.drain(..) {
            b.inbound(address(1), &d, &mut out, |_, r| to_a.push(r.to_vec()));
            seen.push(d);
        }
        for d in to_a {
            a.inbound(address(2), &d, &mut out, |_, r| to_b.push(r.to_vec()));
        }
    }
    for len in [20, 100, 1400] {
        if let Outbound::Send { datagram, .. } = a.outbound(&packet(1, 2, len), &mut out) {
            let d = datagram.to_vec();
            b.inbound(address(1), &d, &mut out, |_, _| {});
            seen.push(d);
        }
    }
    Setup { node: b, seen }
}

static SETUP: OnceLock<Setup> = OnceLock::new();

fuzz_target!(|input: &[u8]| {
    let setup = SETUP.get_or_init(setup);
    let Some((&mode, payload)) = input.split_first() else {
        return;
    };
    let mut out = vec![0u8; 65536];
    let datagram = match mode % 4 {
        1 => {
            let Some((&pick, mask)) = payload.split_first() else {
                return;
            };
            let mut d = setup.seen[usize::from(pick) % setup.seen.len()].clone();
            for (byte, m) in d.iter_mut().zip(mask) {
                *byte ^= m;
            }
            if mask.len() > d.len() {
                d.extend_from_slice(&mask[d.len()..]);
            }
            d
        }
        3 => {
            let _ = setup.node.outbound(payload, &mut out);
            return;
        }
        _ => payload.to_vec(),
    };
    let from = if mode % 4 == 2 {
        address(66)
    } else {
        address(1)
    };
    let result = setup.node.inbound(from, &datagram, &mut out, |_, _| {});
    assert!(
        !matches!(result, Inbound::Tunnel(_)),
        "a forged or replayed datagram was decrypted"
    );
});
