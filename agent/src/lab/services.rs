//! The lab's outside world: a real DNS server (Debian's dnsmasq) and plain
//! HTTP servers (busybox httpd) in the external namespace, at addresses on
//! its loopback, all inside 198.18.100.0/24. Pods use the DNS server as
//! their resolver (`lab exec` gives them a resolv.conf naming it).
//!
//! | name                                   | answer                          |
//! |----------------------------------------|---------------------------------|
//! | api.example.test                       | 198.18.100.10                   |
//! | other.example.test                     | 198.18.100.11                   |
//! | multi.example.test                     | 198.18.100.12, .13, .14         |
//! | a.svc.example.test                     | 198.18.100.15                   |
//! | b.c.svc.example.test                   | 198.18.100.16                   |
//! | www.example.test → alias.example.test → edge.cdn.test (CNAMEs) | 198.18.100.17 |
//! | big.example.test                       | 40 addresses in 198.18.101.0/24 (a UDP answer that truncates) |
//!
//! Every address from .10 to .17 serves HTTP on port 80 and answers
//! `hello from <address>`.
//!
//! For tests that need many names never resolved before: `nI.fresh.test`
//! (I = 1..=1000) is the I-th address of [`FRESH_NET`], all of which are the
//! external namespace's own (a `local` route) and serve HTTP on port 8080.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;

use super::links;
use super::netns;

/// The lab's DNS server.
pub const DNS_SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 53);
/// Addresses of the `nI.fresh.test` names (routed to the external namespace).
pub const FRESH_NET: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(198, 18, 104, 0), 22) {
    Ok(n) => n,
    Err(_) => panic!("invalid constant prefix length"),
};
/// How many `nI.fresh.test` names there are.
pub const FRESH_NAMES: u32 = 1000;
/// The HTTP port every fresh address serves.
pub const FRESH_HTTP_PORT: u16 = 8080;

/// The address of `nI.fresh.test`.
pub fn fresh_address(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(FRESH_NET.network()) + i)
}

/// The hosts file dnsmasq reads the fresh names from.
pub fn fresh_hosts() -> String {
    (1..=FRESH_NAMES)
        .map(|i| format!("{} n{i}.fresh.test\n", fresh_address(i)))
        .collect()
}

/// TTL of every lab DNS answer, in seconds.
pub const DNS_TTL: u32 = 60;

/// The lab's names and their A records (CNAMEs are in [`CNAMES`]).
pub fn records() -> Vec<(&'static str, Vec<Ipv4Addr>)> {
    let ext = |d| Ipv4Addr::new(198, 18, 100, d);
    vec![
        ("api.example.test", vec![ext(10)]),
        ("other.example.test", vec![ext(11)]),
        ("multi.example.test", vec![ext(12), ext(13), ext(14)]),
        ("a.svc.example.test", vec![ext(15)]),
        ("b.c.svc.example.test", vec![ext(16)]),
        ("edge.cdn.test", vec![ext(17)]),
        (
            "big.example.test",
            (1..=40).map(|d| Ipv4Addr::new(198, 18, 101, d)).collect(),
        ),
    ]
}

/// (alias, target) pairs.
pub const CNAMES: [(&str, &str); 2] = [
    ("www.example.test", "alias.example.test"),
    ("alias.example.test", "edge.cdn.test"),
];

/// The addresses running an HTTP server.
pub fn http_addresses() -> Vec<Ipv4Addr> {
    (10..=17).map(|d| Ipv4Addr::new(198, 18, 100, d)).collect()
}

/// dnsmasq's command line: authoritative for `test`, never forwarding,
/// reading no system files.
pub fn dnsmasq_args(pid_file: &Path, fresh_hosts: &Path) -> Vec<String> {
    let mut args = vec![
        "--keep-in-foreground".to_string(),
        "--conf-file=/dev/null".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--no-poll".into(),
        "--bind-interfaces".into(),
        format!("--listen-address={DNS_SERVER}"),
        "--port=53".into(),
        format!("--local-ttl={DNS_TTL}"),
        "--local=/test/".into(),
        format!("--addn-hosts={}", fresh_hosts.display()),
        "--log-facility=-".into(),
        format!("--pid-file={}", pid_file.display()),
    ];
    for (name, ips) in records() {
        for ip in ips {
            args.push(format!("--host-record={name},{ip}"));
        }
    }
    for (alias, target) in CNAMES {
        args.push(format!("--cname={alias},{target}"));
    }
    args
}

/// Adds the service addresses to the external namespace's loopback and
/// starts dnsmasq and one busybox httpd per HTTP address there. Their
/// output goes to `dir`/*.log; `lab down` stops them with the namespace.
pub fn start(external_ns: &str, dir: &Path) -> Result<()> {
    let ns = netns::open(external_ns)?;
    let mut addresses: Vec<Ipv4Addr> = http_addresses();
    addresses.push(DNS_SERVER);
    let nets: Vec<Ipv4Net> = addresses
        .iter()
        .map(|a| Ipv4Net::new(*a, 32).expect("/32 is a valid prefix"))
        .collect();
    netns::netlink(&ns, |h| async move {
        for net in nets {
            links::add_address(&h, "lo", net).await?;
        }
        links::add_local_route(&h, FRESH_NET, "lo").await
    })
    .with_context(|| format!("adding service addresses in {external_ns}"))?;

    let www = dir.join("www");
    for ip in http_addresses() {
        let root = www.join(ip.to_string());
        fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        fs::write(root.join("index.html"), format!("hello from {ip}\n"))
            .with_context(|| format!("writing {}", root.display()))?;
        spawn_in(
            &ns,
            "busybox",
            &[
                "httpd".into(),
                "-f".into(),
                "-p".into(),
                format!("{ip}:80"),
                "-h".into(),
                root.display().to_string(),
            ],
            &dir.join(format!("httpd-{ip}.log")),
        )?;
    }
    let fresh_root = www.join("fresh");
    fs::create_dir_all(&fresh_root)
        .with_context(|| format!("creating {}", fresh_root.display()))?;
    fs::write(
        fresh_root.join("index.html"),
        "hello from a fresh address\n",
    )
    .with_context(|| format!("writing {}", fresh_root.display()))?;
    spawn_in(
        &ns,
        "busybox",
        &[
            "httpd".into(),
            "-f".into(),
            "-p".into(),
            format!("0.0.0.0:{FRESH_HTTP_PORT}"),
            "-h".into(),
            fresh_root.display().to_string(),
        ],
        &dir.join("httpd-fresh.log"),
    )?;
    let hosts = dir.join("fresh.hosts");
    fs::write(&hosts, fresh_hosts()).with_context(|| format!("writing {}", hosts.display()))?;
    spawn_in(
        &ns,
        "dnsmasq",
        &dnsmasq_args(&dir.join("dnsmasq.pid"), &hosts),
        &dir.join("dnsmasq.log"),
    )?;
    Ok(())
}

/// /run/meshward-lab/NAME/resolv.conf: what pods see as /etc/resolv.conf.
pub fn resolv_conf(state_dir: &Path) -> PathBuf {
    state_dir.join("resolv.conf")
}

pub fn write_resolv_conf(state_dir: &Path) -> Result<()> {
    let file = resolv_conf(state_dir);
    fs::write(
        &file,
        format!("# meshward lab: the external namespace's dnsmasq\nnameserver {DNS_SERVER}\noptions timeout:2 attempts:2\n"),
    )
    .with_context(|| format!("writing {}", file.display()))
}

/// Starts `program` inside namespace `ns`, detached (its own session), with
/// output appended to `log`.
fn spawn_in(ns: &fs::File, program: &str, args: &[String], log: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setns(2) and setsid(2) only; the namespace fd outlives spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {program} (is it installed?)"))?;
    // A server that cannot bind exits at once: report it here.
    std::thread::sleep(std::time::Duration::from_millis(50));
    if let Some(status) = child.try_wait()? {
        let tail = fs::read_to_string(log).unwrap_or_default();
        bail!("{program} exited at start ({status}): {}", tail.trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnsmasq_never_forwards_and_knows_every_name() {
        let args = dnsmasq_args(Path::new("/x/dnsmasq.pid"), Path::new("/x/fresh.hosts"));
        let hosts = fresh_hosts();
        assert_eq!(hosts.lines().count(), FRESH_NAMES as usize);
        assert_eq!(hosts.lines().next(), Some("198.18.104.1 n1.fresh.test"));
        assert!(FRESH_NET.contains(&fresh_address(FRESH_NAMES)));
        for must in [
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--local=/test/",
        ] {
            assert!(args.iter().any(|a| a == must), "{must} missing: {args:?}");
        }
        assert!(!args.iter().any(|a| a.starts_with("--server")));
        assert_eq!(
            args.iter()
                .filter(|a| a.starts_with("--host-record=big.example.test,"))
                .count(),
            40
        );
        for (name, ips) in records() {
            for ip in ips {
                assert!(
                    crate::lab::topology::EXTERNAL_NET.contains(&ip)
                        || Ipv4Net::new(Ipv4Addr::new(198, 18, 101, 0), 24)
                            .unwrap()
                            .contains(&ip),
                    "{name} {ip} outside the lab's external range"
                );
            }
        }
    }
}
