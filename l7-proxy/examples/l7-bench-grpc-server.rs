//! The tests' tonic gRPC server (`com.example.OrderService`,
//! `com.example.AdminService`; tests/support/orders.rs) for bench/l7-proxy:
//! `l7-bench-grpc-server ADDR...` serves h2c (prior knowledge) on every
//! address until killed.

use std::net::SocketAddr;
use std::sync::Arc;

#[path = "../tests/support/orders.rs"]
mod orders;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addrs: Vec<SocketAddr> = std::env::args()
        .skip(1)
        .map(|a| a.parse().map_err(|e| format!("{a}: {e} (want ip:port)")))
        .collect::<Result<_, _>>()?;
    if addrs.is_empty() {
        return Err("usage: l7-bench-grpc-server ADDR...".into());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let calls = Arc::new(orders::Calls::default());
        let mut servers = tokio::task::JoinSet::new();
        for addr in addrs {
            let incoming = tonic::transport::server::TcpIncoming::bind(addr)
                .map_err(|e| format!("bind {addr}: {e}"))?
                .with_nodelay(Some(true));
            eprintln!("l7-bench-grpc-server listening on {addr}");
            let svc = orders::Services(calls.clone());
            servers.spawn(async move {
                tonic::transport::Server::builder()
                    .serve_with_incoming(svc, incoming)
                    .await
                    .map_err(|e| format!("serve {addr}: {e}"))
            });
        }
        while let Some(r) = servers.join_next().await {
            r.map_err(|e| e.to_string())??;
        }
        Ok(())
    })
}
