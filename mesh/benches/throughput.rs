//! Encrypt and decrypt throughput of the core in memory, 1400-byte packets:
//! `cargo bench -p meshward-mesh`. No criterion: prints Gbit/s of inner
//! packet bytes, best of a few rounds.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use meshward_mesh::{
    buffer_len, Inbound, Ipv4Net, Mesh, Outbound, PeerConfig, PublicKey, StaticSecret,
};

const PACKET: usize = 1400;
const BATCH: usize = 20_000;
const ROUNDS: usize = 5;

fn secret(seed: u8) -> StaticSecret {
    StaticSecret::from([seed; 32])
}

fn address(n: u8) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(198, 18, 0, n), 51871))
}

fn packet(from: u8, to: u8) -> Vec<u8> {
    let mut p = vec![0u8; PACKET];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(PACKET as u16).to_be_bytes());
    p[12..16].copy_from_slice(&[198, 19, from, 10]);
    p[16..20].copy_from_slice(&[198, 19, to, 10]);
    p
}

/// Two meshes with a session up.
fn pair() -> (Mesh, Mesh) {
    let meshes = [Mesh::new(secret(1)), Mesh::new(secret(2))];
    for (me, other) in [(0usize, 1u8), (1, 0)] {
        let n = other + 1;
        let peer = PeerConfig {
            name: format!("node-{n}"),
            public_key: PublicKey::from(&secret(n)),
            endpoint: Some(address(n)),
            allowed_ips: vec![Ipv4Net::new(Ipv4Addr::new(198, 19, n, 0), 24).unwrap()],
            keepalive: None,
        };
        meshes[me].set_peers(vec![peer]).unwrap();
    }
    let [a, b] = meshes;
    let mut out = vec![0u8; 65536];
    let mut reply = vec![0u8; 65536];
    let init = match a.outbound(&packet(1, 2), &mut out) {
        Outbound::Send { datagram, .. } => datagram.to_vec(),
        other => panic!("{other:?}"),
    };
    let mut to_a = Vec::new();
    b.inbound(address(1), &init, &mut reply, |_, d| to_a.push(d.to_vec()));
    let mut to_b = Vec::new();
    for d in to_a {
        a.inbound(address(2), &d, &mut reply, |_, d| to_b.push(d.to_vec()));
    }
    for d in to_b {
        b.inbound(address(1), &d, &mut reply, |_, _| {});
    }
    (a, b)
}

fn encrypt_batch(mesh: &Mesh, packet: &[u8], out: &mut [u8], keep: Option<&mut Vec<Vec<u8>>>) {
    let mut keep = keep;
    for _ in 0..BATCH {
        match mesh.outbound(packet, out) {
            Outbound::Send { datagram, .. } => {
                if let Some(keep) = keep.as_deref_mut() {
                    keep.push(datagram.to_vec());
                }
                black_box(datagram);
            }
            other => panic!("{other:?}"),
        }
    }
}

fn decrypt_all(mesh: &Mesh, from: SocketAddr, datagrams: &[Vec<u8>], out: &mut [u8]) {
    for datagram in datagrams {
        match mesh.inbound(from, datagram, out, |_, _| {}) {
            Inbound::Tunnel(p) => {
                black_box(p);
            }
            other => panic!("{other:?}"),
        }
    }
}

fn gbps(packets: usize, elapsed: Duration) -> f64 {
    (packets * PACKET * 8) as f64 / elapsed.as_secs_f64() / 1e9
}

fn report(what: &str, best: Duration, packets: usize) {
    println!(
        "{what:<44} {:6.2} Gbit/s  {:7.0} kpps  {:6.0} ns/packet",
        gbps(packets, best),
        packets as f64 / best.as_secs_f64() / 1e3,
        best.as_nanos() as f64 / packets as f64
    );
}

fn main() {
    let (a, b) = pair();
    let plain = packet(1, 2);
    let mut out = vec![0u8; buffer_len(PACKET)];
    let mut dec = vec![0u8; 65536];

    let mut encrypt_best = Duration::MAX;
    let mut decrypt_best = Duration::MAX;
    let mut both_best = Duration::MAX;
    for _ in 0..ROUNDS {
        let mut sealed = Vec::with_capacity(BATCH);
        let start = Instant::now();
        encrypt_batch(&a, &plain, &mut out, None);
        encrypt_best = encrypt_best.min(start.elapsed());

        encrypt_batch(&a, &plain, &mut out, Some(&mut sealed));
        let start = Instant::now();
        decrypt_all(&b, address(1), &sealed, &mut dec);
        decrypt_best = decrypt_best.min(start.elapsed());

        let start = Instant::now();
        for _ in 0..BATCH {
            let Outbound::Send { datagram, .. } = a.outbound(&plain, &mut out) else {
                panic!("not sent")
            };
            let Inbound::Tunnel(p) = b.inbound(address(1), datagram, &mut dec, |_, _| {}) else {
                panic!("not delivered")
            };
            black_box(p);
        }
        both_best = both_best.min(start.elapsed());
    }
    println!("meshward-mesh core, {PACKET}-byte packets, {BATCH} per round, best of {ROUNDS}:");
    report("encrypt (outbound)", encrypt_best, BATCH);
    report("decrypt (inbound)", decrypt_best, BATCH);
    report("encrypt + decrypt, one thread", both_best, BATCH);

    // The shell's shape: one thread seals A->B while another opens B->A on
    // the same peer of A (both take that peer's lock).
    let (a, b) = (Arc::new(a), Arc::new(b));
    let plain_back = packet(2, 1);
    let mut parallel_best = Duration::MAX;
    for _ in 0..ROUNDS {
        let mut sealed_back = Vec::with_capacity(BATCH);
        encrypt_batch(&b, &plain_back, &mut out, Some(&mut sealed_back));
        let start = Instant::now();
        let sealer = {
            let a = Arc::clone(&a);
            let plain = plain.clone();
            thread::spawn(move || {
                let mut out = vec![0u8; buffer_len(PACKET)];
                encrypt_batch(&a, &plain, &mut out, None);
            })
        };
        let opener = {
            let a = Arc::clone(&a);
            thread::spawn(move || {
                let mut dec = vec![0u8; 65536];
                decrypt_all(&a, address(2), &sealed_back, &mut dec);
            })
        };
        sealer.join().unwrap();
        opener.join().unwrap();
        parallel_best = parallel_best.min(start.elapsed());
    }
    report(
        "encrypt || decrypt, two threads, one peer",
        parallel_best,
        2 * BATCH,
    );
    let stats = a.stats();
    assert_eq!(stats.drops.total(), 0, "{:?}", stats.drops);
}
