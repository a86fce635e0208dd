//! Namespace plumbing the L7 proxy's lab tests share: the TPROXY routing a
//! node needs (as the agent installs it), waiting for a server, curl.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use meshward_testkit::{run, Netns};

/// Marked packets (the agent's DNS/L7 mark) are delivered locally: rule
/// `fwmark 0x400000 lookup 109` and `local default dev lo` in table 109, for
/// IPv4 and, with `ipv6`, IPv6 too.
pub fn tproxy_routing(node: &Netns, ipv6: bool) {
    let families: &[&str] = if ipv6 { &["-4", "-6"] } else { &["-4"] };
    for family in families {
        node.ip(&[
            family,
            "rule",
            "add",
            "fwmark",
            "0x400000/0x400000",
            "lookup",
            "109",
        ]);
        let default = if *family == "-6" { "::/0" } else { "0.0.0.0/0" };
        node.ip(&[
            family, "route", "add", "local", default, "dev", "lo", "table", "109",
        ]);
    }
}

/// Waits (10 s at most) until `addr` accepts connections from inside `ns`.
pub fn wait_port(ns: &Netns, addr: &str) {
    let addr: SocketAddr = addr.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{addr} never listened");
}

/// Runs curl in `client`; returns (HTTP status or 0, headers and body).
pub fn curl(client: &Netns, args: &[&str]) -> (u16, String) {
    let r = run(
        client
            .command("curl")
            .args(["-sS", "-i", "--max-time", "5"])
            .args(args),
        b"",
        Duration::from_secs(10),
    )
    .unwrap();
    // The last status line (after any 100 Continue).
    let status = r
        .stdout
        .lines()
        .rfind(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, format!("{}{}", r.stdout, r.stderr))
}
