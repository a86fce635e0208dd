//! An in-memory network of `Mesh` nodes: a FIFO of (from, to, datagram)
//! between underlay addresses, a TUN inbox per node. No sockets.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};

use meshward_mesh::{
    buffer_len, DropReason, Inbound, Ipv4Net, Mesh, MeshConfig, Outbound, PeerConfig, PublicKey,
    StaticSecret,
};

pub const PORT: u16 = 51871;
pub const MTU: usize = 1420;

/// A deterministic secret; different seeds give different keys.
pub fn secret(seed: u8) -> StaticSecret {
    let mut bytes = [seed; 32];
    bytes[0] = 0x5a;
    StaticSecret::from(bytes)
}

/// Underlay address of node `n` (1-based).
pub fn underlay(n: u8) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(198, 18, 0, n), PORT))
}

/// Pod CIDR of node `n`.
pub fn pod_cidr(n: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(198, 19, n, 0), 24).unwrap()
}

pub fn pod(n: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, n, host)
}

/// A minimal IPv4/UDP-ish packet; the mesh reads only addresses and length.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut packet = vec![0u8; total];
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    packet[8] = 64;
    packet[9] = 17;
    packet[12..16].copy_from_slice(&src.octets());
    packet[16..20].copy_from_slice(&dst.octets());
    packet[20..].copy_from_slice(payload);
    packet
}

/// Payload carrying a stream id and a sequence number, to check for loss.
pub fn numbered(stream: u8, seq: u64) -> Vec<u8> {
    let mut payload = vec![stream];
    payload.extend_from_slice(&seq.to_be_bytes());
    payload
}

pub fn read_numbered(packet: &[u8]) -> Option<(u8, u64)> {
    let payload = packet.get(20..29)?;
    Some((
        payload[0],
        u64::from_be_bytes(payload[1..9].try_into().ok()?),
    ))
}

#[derive(Clone, Debug)]
pub struct Datagram {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

pub struct Node {
    pub n: u8,
    pub name: String,
    pub mesh: Mesh,
    pub addr: SocketAddr,
    pub public: PublicKey,
    /// Plaintext packets the mesh wrote to this node's TUN.
    pub tun: Vec<Vec<u8>>,
    /// Inbound drops seen by this node, in order.
    pub drops: Vec<DropReason>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// Handed to the wire (data, or a handshake initiation).
    OnWire,
    Queued,
    Dropped(DropReason),
}

pub struct Net {
    pub nodes: Vec<Node>,
    pub wire: VecDeque<Datagram>,
    /// Every datagram that went over the wire, for replay and mutation tests.
    pub captured: Vec<Datagram>,
    /// Datagrams whose destination is not a node's address.
    pub lost: Vec<Datagram>,
    out: Vec<u8>,
}

impl Net {
    /// `count` nodes, each configured with all the others.
    pub fn new(count: u8) -> Net {
        Net::with_config(count, MeshConfig::default())
    }

    pub fn with_config(count: u8, config: MeshConfig) -> Net {
        let nodes = (1..=count)
            .map(|n| {
                let secret = secret(n);
                Node {
                    n,
                    name: format!("node-{n}"),
                    public: PublicKey::from(&secret),
                    mesh: Mesh::with_config(secret, config.clone()),
                    addr: underlay(n),
                    tun: Vec::new(),
                    drops: Vec::new(),
                }
            })
            .collect();
        let mut net = Net {
            nodes,
            wire: VecDeque::new(),
            captured: Vec::new(),
            lost: Vec::new(),
            out: vec![0u8; 65536],
        };
        for i in 0..net.nodes.len() {
            net.configure(i);
        }
        net
    }

    /// Index of node `n`.
    pub fn idx(n: u8) -> usize {
        usize::from(n) - 1
    }

    pub fn node(&self, n: u8) -> &Node {
        &self.nodes[Net::idx(n)]
    }

    pub fn node_mut(&mut self, n: u8) -> &mut Node {
        &mut self.nodes[Net::idx(n)]
    }

    /// How node `n` is described to its peers, with its current key and address.
    pub fn peer_config(&self, n: u8) -> PeerConfig {
        let node = self.node(n);
        PeerConfig {
            name: node.name.clone(),
            public_key: node.public,
            endpoint: Some(node.addr),
            allowed_ips: vec![pod_cidr(n)],
            keepalive: None,
        }
    }

    /// Gives node at index `i` every other node as a peer, as currently known.
    pub fn configure(&mut self, i: usize) {
        let me = self.nodes[i].n;
        let peers = self
            .nodes
            .iter()
            .filter(|node| node.n != me)
            .map(|node| self.peer_config(node.n))
            .collect();
        self.nodes[i].mesh.set_peers(peers).unwrap();
    }

    /// Node `n` rotates to a new key; nobody is told yet.
    pub fn rotate(&mut self, n: u8, seed: u8) {
        let secret = secret(seed);
        let node = self.node_mut(n);
        node.public = PublicKey::from(&secret);
        node.mesh.rotate_local_key(secret);
    }

    /// A packet from pod `host` of node `from` to pod `host` of node `to`.
    pub fn send(&mut self, from: u8, to: u8, payload: &[u8]) -> Sent {
        let packet = ipv4(pod(from, 10), pod(to, 10), payload);
        self.send_packet(from, &packet)
    }

    pub fn send_packet(&mut self, from: u8, packet: &[u8]) -> Sent {
        let node = &self.nodes[Net::idx(from)];
        let mut out = vec![0u8; buffer_len(packet.len())];
        match node.mesh.outbound(packet, &mut out) {
            Outbound::Send { to, datagram } => {
                let datagram = Datagram {
                    from: node.addr,
                    to,
                    bytes: datagram.to_vec(),
                };
                self.wire.push_back(datagram);
                Sent::OnWire
            }
            Outbound::Queued => Sent::Queued,
            Outbound::Drop(reason) => Sent::Dropped(reason),
        }
    }

    /// Hands one datagram to the node it is addressed to; returns what the
    /// mesh said, replies going onto the wire.
    pub fn deliver_one(&mut self, datagram: Datagram) -> Option<Result<(), DropReason>> {
        self.captured.push(datagram.clone());
        let Some(i) = self.nodes.iter().position(|n| n.addr == datagram.to) else {
            self.lost.push(datagram);
            return None;
        };
        let node = &mut self.nodes[i];
        let me = node.addr;
        let wire = &mut self.wire;
        let result = node.mesh.inbound(
            datagram.from,
            &datagram.bytes,
            &mut self.out,
            |to, reply| {
                wire.push_back(Datagram {
                    from: me,
                    to,
                    bytes: reply.to_vec(),
                })
            },
        );
        Some(match result {
            Inbound::Tunnel(packet) => {
                node.tun.push(packet.to_vec());
                Ok(())
            }
            Inbound::Done => Ok(()),
            Inbound::Drop(reason) => {
                node.drops.push(reason);
                Err(reason)
            }
        })
    }

    /// Delivers until the wire is empty.
    pub fn deliver(&mut self) {
        for _ in 0..100_000 {
            let Some(datagram) = self.wire.pop_front() else {
                return;
            };
            self.deliver_one(datagram);
        }
        panic!("the wire never drained");
    }

    /// Feeds a datagram to node `n` as if it came from `from`.
    pub fn inject(&mut self, from: SocketAddr, n: u8, bytes: &[u8]) -> Result<(), DropReason> {
        self.deliver_one(Datagram {
            from,
            to: underlay(n),
            bytes: bytes.to_vec(),
        })
        .expect("node exists")
    }

    pub fn tick(&mut self, n: u8) {
        let node = &self.nodes[Net::idx(n)];
        let me = node.addr;
        let wire = &mut self.wire;
        node.mesh.tick(|to, datagram| {
            wire.push_back(Datagram {
                from: me,
                to,
                bytes: datagram.to_vec(),
            })
        });
    }

    pub fn tick_all(&mut self) {
        for n in 1..=self.nodes.len() as u8 {
            self.tick(n);
        }
    }

    /// Sends one packet each way between `a` and `b` and checks both arrive.
    pub fn assert_bidirectional(&mut self, a: u8, b: u8) {
        for (from, to) in [(a, b), (b, a)] {
            let before = self.node(to).tun.len();
            let payload = format!("{from}->{to}");
            assert_ne!(
                self.send(from, to, payload.as_bytes()),
                Sent::Dropped(DropReason::NoPeerForDestination)
            );
            self.deliver();
            let tun = &self.node(to).tun;
            assert_eq!(tun.len(), before + 1, "{from}->{to} not delivered");
            assert_eq!(&tun[before][20..], payload.as_bytes());
            assert_eq!(&tun[before][12..16], &pod(from, 10).octets());
        }
    }

    pub fn handshakes(&self, n: u8, peer: u8) -> u64 {
        self.node(n)
            .mesh
            .stats()
            .peer(&format!("node-{peer}"))
            .expect("peer configured")
            .handshakes
    }

    pub fn last_data_datagram(&self, from: u8, to: u8) -> Datagram {
        self.captured
            .iter()
            .rev()
            .find(|d| {
                d.from == underlay(from)
                    && d.to == underlay(to)
                    && d.bytes[0] == 4
                    && d.bytes.len() > 32
            })
            .expect("a data datagram was captured")
            .clone()
    }
}
