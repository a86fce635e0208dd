//! One mesh node as a process: a `Device` on a statically configured `Mesh`.
//! Used by `bench/mesh-throughput`; runs until SIGINT/SIGTERM, then prints
//! the device's and the mesh's counters to stderr.
//!
//! ```text
//! mesh_node --key-file node.key --listen 198.18.0.1:51871 --tun mw0 --mtu 1420 \
//!     --peer node2,<base64 public key>,198.18.0.2:51871,198.19.2.0/24
//! ```
//! Keys are WireGuard's base64 (`wg genkey`, `wg pubkey`). The TUN gets no
//! address and no route: the caller adds them (`ip`), as the agent does.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use clap::Parser;
use meshward_mesh::{Device, DeviceConfig, Ipv4Net, Mesh, PeerConfig, PublicKey, StaticSecret};
use nix::sys::signal::{SigSet, Signal};

#[derive(Parser)]
struct Args {
    /// File holding this node's private key (base64, as `wg genkey` prints).
    #[arg(long)]
    key_file: std::path::PathBuf,
    #[arg(long, default_value = "0.0.0.0:51871")]
    listen: SocketAddr,
    #[arg(long, default_value = "mw0")]
    tun: String,
    #[arg(long, default_value_t = 1420)]
    mtu: u32,
    /// Worker pairs; 0: one per core.
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// NAME,PUBLIC_KEY,ENDPOINT,CIDR[,CIDR...]
    #[arg(long = "peer")]
    peers: Vec<String>,
}

fn key(text: &str) -> Result<[u8; 32], String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("bad base64 key: {e}"))?;
    bytes.try_into().map_err(|_| "a key is 32 bytes".to_owned())
}

fn peer(spec: &str) -> Result<PeerConfig, String> {
    let mut fields = spec.split(',');
    let (Some(name), Some(public), Some(endpoint)) = (fields.next(), fields.next(), fields.next())
    else {
        return Err(format!("--peer {spec:?}: want NAME,KEY,ENDPOINT,CIDR..."));
    };
    let allowed_ips = fields
        .map(|cidr| cidr.parse::<Ipv4Net>().map_err(|e| format!("{cidr}: {e}")))
        .collect::<Result<_, _>>()?;
    Ok(PeerConfig {
        name: name.to_owned(),
        public_key: PublicKey::from(key(public)?),
        endpoint: Some(endpoint.parse().map_err(|e| format!("{endpoint}: {e}"))?),
        allowed_ips,
        keepalive: None,
    })
}

fn main() -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // Signals are blocked before any thread starts, so only sigwait sees them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().map_err(|e| e.to_string())?;

    let text = std::fs::read_to_string(&args.key_file)
        .map_err(|e| format!("{}: {e}", args.key_file.display()))?;
    let mesh = Arc::new(Mesh::new(StaticSecret::from(key(&text)?)));
    let peers = args
        .peers
        .iter()
        .map(|spec| peer(spec))
        .collect::<Result<Vec<_>, _>>()?;
    mesh.set_peers(peers).map_err(|e| e.to_string())?;
    let device = Device::start(
        Arc::clone(&mesh),
        DeviceConfig {
            tun_name: args.tun,
            mtu: args.mtu,
            listen: args.listen,
            workers: args.workers,
        },
    )
    .map_err(|e| format!("device: {e}"))?;
    println!(
        "ready tun={} index={} listen={} offload={}",
        device.tun_name(),
        device.tun_index(),
        device.local_addr(),
        device.offload()
    );
    let signal = signals.wait().map_err(|e| e.to_string())?;
    let stats = device.stats();
    device.shutdown();
    let mesh_stats = mesh.stats();
    eprintln!("stopped by {signal:?}");
    eprintln!("device: {stats:?}");
    for peer in &mesh_stats.peers {
        eprintln!(
            "peer {}: tx {} packets, rx {} packets, {} handshakes",
            peer.name, peer.tx_packets, peer.rx_packets, peer.handshakes
        );
    }
    let drops: Vec<String> = mesh_stats
        .drops
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(reason, n)| format!("{reason}={n}"))
        .collect();
    eprintln!("drops: {}", drops.join(" "));
    Ok(())
}
