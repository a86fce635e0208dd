//! TCP request/response latency, netperf TCP_RR style (netperf is not in
//! Debian): one connection, the client sends SIZE bytes, the server echoes
//! them, one transaction at a time. Used by `bench/mesh-throughput`.
//!
//! ```text
//! tcp_rr server 198.19.2.2:7001
//! tcp_rr client 198.19.2.2:7001 --size 64 --seconds 5
//! ```
//! The client prints one line: transactions, transactions/s, p50/p90/p99 µs.
//! The server serves one connection at a time until killed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    Server {
        bind: SocketAddr,
    },
    Client {
        server: SocketAddr,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Stop after this many transactions even if time is left.
        #[arg(long, default_value_t = 10_000_000)]
        max: u64,
    },
}

fn serve(stream: TcpStream, size_hint: usize) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut stream = stream;
    let mut buf = vec![0u8; size_hint.max(65536)];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

fn main() -> Result<(), String> {
    match Args::parse().mode {
        Mode::Server { bind } => {
            let listener = TcpListener::bind(bind).map_err(|e| format!("bind {bind}: {e}"))?;
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        let _ = serve(stream, 0);
                    }
                    Err(e) => eprintln!("accept: {e}"),
                }
            }
            Ok(())
        }
        Mode::Client {
            server,
            size,
            seconds,
            max,
        } => {
            let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(5))
                .map_err(|e| format!("connect {server}: {e}"))?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            let request = vec![0x5au8; size.max(1)];
            let mut reply = vec![0u8; request.len()];
            let mut samples = Vec::new();
            let start = Instant::now();
            let deadline = Duration::from_secs_f64(seconds);
            while start.elapsed() < deadline && (samples.len() as u64) < max {
                let sent = Instant::now();
                stream.write_all(&request).map_err(|e| e.to_string())?;
                stream.read_exact(&mut reply).map_err(|e| e.to_string())?;
                samples.push(sent.elapsed().as_nanos() as u64);
            }
            let elapsed = start.elapsed().as_secs_f64();
            samples.sort_unstable();
            let pct = |p: f64| {
                samples
                    .get(((samples.len() as f64 * p) as usize).min(samples.len().saturating_sub(1)))
                    .map_or(0.0, |ns| *ns as f64 / 1000.0)
            };
            println!(
                "transactions={} per_sec={:.0} p50_us={:.1} p90_us={:.1} p99_us={:.1}",
                samples.len(),
                samples.len() as f64 / elapsed,
                pct(0.5),
                pct(0.9),
                pct(0.99)
            );
            Ok(())
        }
    }
}
