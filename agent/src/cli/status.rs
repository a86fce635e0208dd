//! `meshward status`: the running agent's state, readable or as JSON.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use crate::agent::protocol::{self, Status};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Take the control socket from the agent's configuration file
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The agent's control socket [default: the config's socketPath, else /run/meshward/agent.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Output format
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    output: Format,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

pub fn run(args: StatusArgs) -> Result<()> {
    let socket = super::socket_path(args.socket.as_deref(), args.config.as_deref())?;
    let status = protocol::status(&socket, Duration::from_secs(10))?;
    match args.output {
        Format::Text => print!("{}", render(&status)),
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&status).context("encoding the status")?
        ),
    }
    Ok(())
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn ago(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m {}s ago", s / 60, s % 60),
        _ => format!("{}h {}m ago", s / 3600, (s % 3600) / 60),
    }
}

/// The readable form.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "node {} (agent pid {})", s.node, s.pid);
    if s.mesh {
        let _ = writeln!(out, "  public key    {}", s.public_key);
        if let Some(previous) = &s.previous_public_key {
            let _ = writeln!(
                out,
                "  previous key  {previous} (rotation in progress: still accepted)"
            );
        }
        let _ = writeln!(out, "  endpoint      {}", s.endpoint);
        let _ = writeln!(out, "  pod CIDRs     {}", s.pod_cidrs.join(", "));
        let _ = writeln!(out, "  address       {} on {}", s.address, s.interface);
        let _ = writeln!(
            out,
            "  strict mode   {}",
            if s.strict_mode { "on" } else { "off" }
        );
    } else {
        let _ = writeln!(
            out,
            "  mesh          off (policy only: pods are addressed and routed by another CNI)"
        );
    }
    let _ = writeln!(
        out,
        "  datastore     {} ({}, generation {})",
        s.datastore.spec,
        if s.datastore.synced {
            "synced"
        } else {
            "not synced yet"
        },
        s.datastore.generation
    );
    if let Some(d) = &s.data_plane {
        let _ = writeln!(
            out,
            "  data plane    offloads {}; UDP {} sent, {} received; TUN {} read, {} written; {} I/O errors",
            if d.offload { "on" } else { "off" },
            d.udp_datagrams_sent,
            d.udp_datagrams_received,
            d.tun_packets_read,
            d.tun_packets_written,
            d.errors
        );
    }
    let _ = writeln!(
        out,
        "  peers         {} of {} up",
        s.peers_up(),
        s.peers.len()
    );
    if !s.peers.is_empty() {
        out.push('\n');
        let header = [
            "PEER",
            "ENDPOINT",
            "ALLOWED IPS",
            "SESSION",
            "LAST HANDSHAKE",
            "TX",
            "RX",
        ]
        .map(String::from);
        let rows: Vec<[String; 7]> = s
            .peers
            .iter()
            .map(|p| {
                let session = match (p.session_up, p.key_change_pending) {
                    (true, true) => "up, key change pending",
                    (true, false) => "up",
                    (false, _) => "down",
                };
                [
                    p.name.clone(),
                    p.endpoint.clone().unwrap_or_else(|| "-".into()),
                    p.allowed_ips.join(","),
                    session.into(),
                    p.last_handshake_secs_ago
                        .map(ago)
                        .unwrap_or_else(|| "never".into()),
                    format!("{} pkts, {}", p.tx_packets, bytes(p.tx_bytes)),
                    format!("{} pkts, {}", p.rx_packets, bytes(p.rx_bytes)),
                ]
            })
            .collect();
        let mut widths = header.clone().map(|h| h.len());
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        for row in std::iter::once(&header).chain(&rows) {
            let cells: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out += cells.join("  ").trim_end();
            out.push('\n');
        }
    }
    if let Some(h) = &s.health_address {
        let _ = writeln!(out, "  health        http://{h}/healthz, /readyz, /metrics");
    }
    if let Some(e) = &s.flow_events {
        let _ = writeln!(
            out,
            "  flow events   {} buffered of {}, {} published, {} evicted, {} lost (`meshward observe`)",
            e.buffered, e.capacity, e.published, e.evicted, e.lost
        );
    }
    if let Some(p) = &s.policy {
        out.push('\n');
        render_policy(&mut out, p);
    }
    out.push('\n');
    if s.drops.is_empty() {
        out += "drops: none\n";
    } else {
        let list: Vec<String> = s.drops.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(out, "drops: {}", list.join(", "));
    }
    for problem in &s.problems {
        let _ = writeln!(out, "problem: {problem}");
    }
    out
}

/// Learned names listed in the readable status at most.
const LEARNED_LINES: usize = 20;

fn render_policy(out: &mut String, p: &crate::agent::protocol::PolicyStatus) {
    let _ = writeln!(
        out,
        "policy: {} local pods, {} isolated for egress, {} for ingress, {} with DNS through the proxy",
        p.endpoints, p.isolated_egress, p.isolated_ingress, p.dns_redirected
    );
    let _ = writeln!(
        out,
        "  policies      {} loaded, {} in force here{}",
        p.policies_loaded,
        p.in_force.len(),
        if p.in_force.is_empty() {
            String::new()
        } else {
            format!(": {}", p.in_force.join(", "))
        }
    );
    if p.errors.is_empty() {
        out.push_str("  policies skipped: none\n");
    } else {
        let _ = writeln!(out, "  policies skipped ({}):", p.errors.len());
        for e in &p.errors {
            let _ = writeln!(out, "    {e}");
        }
    }
    let dns = |k: &str| p.dns.get(k).copied().unwrap_or(0);
    if !p.dns.is_empty() {
        let _ = writeln!(
            out,
            "  DNS proxy     {} allowed, {} denied, {} upstream failures, {} holds (longest {} µs)",
            dns("queriesAllowed"),
            dns("queriesDenied"),
            dns("upstreamTimeouts") + dns("upstreamErrors"),
            dns("holds"),
            dns("holdMaxMicros")
        );
    }
    if !p.l7_ports.is_empty() {
        let _ = writeln!(
            out,
            "  L7 proxy      {} allowed, {} denied",
            p.l7_requests.0, p.l7_requests.1
        );
        for l in &p.l7_ports {
            let ports: Vec<String> = l.ports.iter().map(u16::to_string).collect();
            let _ = writeln!(out, "    {} {} {}", l.pod, l.direction, ports.join(","));
        }
    }
    let _ = writeln!(
        out,
        "  learned       {} (name, address) entries",
        p.learned_entries
    );
    if !p.learned.is_empty() {
        let width = p
            .learned
            .iter()
            .take(LEARNED_LINES)
            .map(|l| l.name.len())
            .max()
            .unwrap_or(0)
            .max(4);
        let _ = writeln!(out, "    {:<width$}  {:>7}  ADDRESSES", "NAME", "TTL");
        for l in p.learned.iter().take(LEARNED_LINES) {
            let _ = writeln!(
                out,
                "    {:<width$}  {:>6}s  {}",
                l.name,
                l.ttl_secs,
                l.ips.join(", ")
            );
        }
        if p.learned.len() > LEARNED_LINES {
            let _ = writeln!(
                out,
                "    ... {} more names (`-o json` lists them)",
                p.learned.len() - LEARNED_LINES
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::protocol::{DataPlaneStatus, DatastoreStatus, PeerStatus};

    #[test]
    fn renders_peers_drops_and_problems() {
        let status = Status {
            node: "node1".into(),
            pid: 42,
            public_key: "K1=".into(),
            previous_public_key: Some("K0=".into()),
            endpoint: "198.18.0.1:51871".into(),
            pod_cidrs: vec!["198.19.1.0/24".into()],
            address: "198.19.1.1".into(),
            interface: "mw0".into(),
            mesh: true,
            strict_mode: true,
            datastore: DatastoreStatus {
                spec: "dir:/d".into(),
                synced: true,
                generation: 3,
            },
            data_plane: Some(DataPlaneStatus {
                offload: true,
                udp_datagrams_sent: 5,
                udp_datagrams_received: 6,
                tun_packets_read: 7,
                tun_packets_written: 8,
                errors: 0,
            }),
            peers: vec![PeerStatus {
                name: "node2".into(),
                public_key: "K2=".into(),
                endpoint: Some("198.18.0.2:51871".into()),
                allowed_ips: vec!["198.19.2.0/24".into()],
                session_up: true,
                last_handshake_unix_ms: Some(1),
                last_handshake_secs_ago: Some(75.2),
                handshakes: 1,
                tx_packets: 3,
                tx_bytes: 2048,
                rx_packets: 4,
                rx_bytes: 100,
                key_change_pending: false,
            }],
            drops: [("cryptokey_routing".to_string(), 2)].into(),
            problems: vec!["node node9: bad".into()],
            policy: Some(crate::agent::protocol::PolicyStatus {
                endpoints: 2,
                isolated_egress: 1,
                policies_loaded: 3,
                in_force: vec!["MeshNetworkPolicy default/a".into()],
                errors: vec!["MeshNetworkPolicy default/x: spec.egress: bad".into()],
                learned_entries: 1,
                learned: vec![crate::agent::protocol::LearnedName {
                    name: "api.example.test.".into(),
                    ips: vec!["198.18.100.10".into()],
                    ttl_secs: 42,
                }],
                l7_ports: vec![crate::agent::protocol::L7Ports {
                    pod: "default/a".into(),
                    direction: "egress".into(),
                    ports: vec![80, 443],
                }],
                l7_requests: (5, 2),
                ..Default::default()
            }),
            health_address: Some("198.18.0.1:9879".into()),
            flow_events: None,
        };
        let text = render(&status);
        assert!(
            text.contains("  L7 proxy      5 allowed, 2 denied\n    default/a egress 80,443\n"),
            "{text}"
        );
        assert!(
            text.contains("previous key  K0= (rotation in progress"),
            "{text}"
        );
        assert!(text.contains("peers         1 of 1 up"), "{text}");
        assert!(
            text.contains("data plane    offloads on; UDP 5 sent, 6 received; TUN 7 read, 8 written; 0 I/O errors"),
            "{text}"
        );
        let row = text.lines().find(|l| l.starts_with("node2")).unwrap();
        assert_eq!(
            row.split("  ")
                .filter(|c| !c.is_empty())
                .map(str::trim)
                .collect::<Vec<_>>(),
            [
                "node2",
                "198.18.0.2:51871",
                "198.19.2.0/24",
                "up",
                "1m 15s ago",
                "3 pkts, 2.0 KiB",
                "4 pkts, 100 B"
            ]
        );
        assert!(text.contains("drops: cryptokey_routing 2"));
        assert!(text.contains("problem: node node9: bad"));
        assert!(
            text.contains("health        http://198.18.0.1:9879/healthz"),
            "{text}"
        );
        assert!(
            text.contains(
                "  policies      3 loaded, 1 in force here: MeshNetworkPolicy default/a\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("policies skipped (1):\n    MeshNetworkPolicy default/x"),
            "{text}"
        );
        let learned = text
            .lines()
            .find(|l| l.contains("api.example.test."))
            .unwrap();
        assert_eq!(
            learned.split_whitespace().collect::<Vec<_>>(),
            ["api.example.test.", "42s", "198.18.100.10"]
        );
    }
}
