//! Fixtures shared by the integration tests: a lab per test (torn down by a
//! drop guard), running things inside lab namespaces, small TCP/UDP peers,
//! and a fabric capture with its pcap reader.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const MESHWARD: &str = env!("CARGO_BIN_EXE_meshward");

/// A lab for one test, named `t` + tag + this process's id, removed on drop
/// (also when the test fails).
pub struct TestLab {
    pub name: String,
}

impl TestLab {
    /// `tag`: up to 3 characters of a-z0-9, unique per test.
    pub fn new(tag: &str) -> TestLab {
        require_root();
        let name = format!("t{tag}{:x}", std::process::id());
        assert!(name.len() <= 12, "test lab name {name} too long");
        let lab = TestLab { name };
        // A previous run with the same pid may have left it: start clean.
        lab.run(&["down"]);
        lab
    }

    /// Runs `meshward lab --name NAME ARGS...` (at most [`COMMAND_LIMIT`]).
    pub fn run(&self, args: &[&str]) -> Output {
        let mut command = Command::new(MESHWARD);
        command.args(["lab", "--name", &self.name]).args(args);
        bounded(&mut command)
    }

    /// Runs a lab command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "meshward lab --name {} {} failed ({}):\nstdout: {}\nstderr: {}",
            self.name,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Runs a lab command that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "meshward lab --name {} {} succeeded but should fail:\nstdout: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).expect("utf-8 output")
    }

    /// `lab up` with `extra` arguments (e.g. `--no-agents`).
    pub fn up_with(&self, nodes: u32, pods: u32, extra: &[&str]) {
        let (nodes, pods) = (nodes.to_string(), pods.to_string());
        let mut args = vec!["up", "--nodes", &nodes, "--pods", &pods];
        let cni = if pods == "0" { None } else { Some(cni_bin()) };
        if let Some(cni) = &cni {
            args.extend(["--cni-bin", cni.to_str().expect("utf-8 path")]);
        }
        args.extend(extra);
        self.ok(&args);
    }

    /// `lab up`: the agents run and are meshed.
    pub fn up(&self, nodes: u32, pods: u32) {
        self.up_with(nodes, pods, &[]);
    }

    pub fn prefix(&self) -> String {
        format!("mwl-{}-", self.name)
    }

    /// The namespace of a lab member (`node1`, `node1-pod2`, `fabric`, `ext`).
    pub fn ns(&self, member: &str) -> String {
        let member = if member == "external" { "ext" } else { member };
        format!("{}{member}", self.prefix())
    }

    /// This lab's names in /run/netns.
    pub fn namespaces(&self) -> Vec<String> {
        let prefix = self.prefix();
        let mut names: Vec<String> = std::fs::read_dir("/run/netns")
            .map(|dir| {
                dir.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    pub fn ip(&self, target: &str) -> String {
        self.ok(&["ip", target]).trim().to_string()
    }

    pub fn addr(&self, target: &str) -> Ipv4Addr {
        self.ip(target).parse().expect("an IPv4 address")
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "-o", "json"])).expect("status is JSON")
    }

    /// True when `from` gets an echo reply from `to` (a few tries, so a
    /// slow first ARP does not make a reachable peer look unreachable).
    pub fn reaches(&self, from: &str, to: &str) -> bool {
        (0..3).any(|_| self.ping_once(from, to))
    }

    pub fn ping_once(&self, from: &str, to: &str) -> bool {
        let mut args = vec!["exec", from, "--"];
        args.extend(ping_command());
        args.extend(["-c", "1", "-w", "2", to]);
        self.run(&args).status.success()
    }

    /// Starts `ping -i INTERVAL -c COUNT` from `from` to `to` in the
    /// background; [`Pinger::finish`] returns (transmitted, received).
    pub fn pinger(&self, from: &str, to: &str, interval: &str, count: u32) -> Pinger {
        let count = count.to_string();
        let child = Command::new(MESHWARD)
            .args(["lab", "--name", &self.name, "exec", from, "--"])
            .args(ping_command())
            .args(["-q", "-i", interval, "-c", &count, "-W", "1", to])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running ping");
        Pinger {
            child: Some(child),
            what: format!("{from} -> {to}"),
        }
    }

    /// /run/meshward-lab/NAME
    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from("/run/meshward-lab").join(&self.name)
    }

    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.state_dir().join(node)
    }

    pub fn agent_config(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("agent.yaml")
    }

    pub fn manifest(&self, node: &str) -> PathBuf {
        self.state_dir()
            .join("datastore")
            .join(format!("node-{node}.yaml"))
    }

    /// `meshward ARGS...` (not `lab`), which must succeed; returns stdout.
    pub fn meshward(&self, args: &[&str]) -> String {
        let out = Command::new(MESHWARD)
            .args(args)
            .output()
            .expect("meshward");
        assert!(
            out.status.success(),
            "meshward {} failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// The agent status of `node` (`meshward status -o json`).
    pub fn agent_status(&self, node: &str) -> Value {
        let config = self.agent_config(node);
        let text = self.meshward(&["status", "--config", config.to_str().unwrap(), "-o", "json"]);
        serde_json::from_str(&text).expect("status is JSON")
    }

    /// Waits until `pred` holds for `node`'s agent status (bounded).
    pub fn wait_status(
        &self,
        node: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let config = self.agent_config(node);
            let out = bounded(Command::new(MESHWARD).args([
                "status",
                "--config",
                config.to_str().unwrap(),
                "-o",
                "json",
            ]));
            let status: Option<Value> = out
                .status
                .success()
                .then(|| serde_json::from_slice(&out.stdout).ok())
                .flatten();
            if let Some(status) = &status {
                if pred(status) {
                    return status.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "{node}: timed out after {timeout:?} waiting for {what}; last status: {status:#?}; log:\n{}",
                self.log_tail(node)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Copies every agent log to `$TMPDIR/meshward-lab-logs-NAME/` (the
    /// lab's own directory goes with the lab), for a failed test.
    fn keep_agent_logs(&self) {
        let keep = std::env::temp_dir().join(format!("meshward-lab-logs-{}", self.name));
        let Ok(nodes) = std::fs::read_dir(self.state_dir()) else {
            return;
        };
        let _ = std::fs::create_dir_all(&keep);
        for node in nodes.flatten() {
            for (file, suffix) in [("agent.log", ""), ("dns-keeper.log", "-dns-keeper")] {
                let log = node.path().join(file);
                if log.is_file() {
                    let name = node.file_name().to_string_lossy().into_owned();
                    let _ = std::fs::copy(&log, keep.join(format!("{name}{suffix}.log")));
                }
            }
        }
        eprintln!("agent logs of lab {} kept in {}", self.name, keep.display());
    }

    /// The last lines of `node`'s agent log.
    pub fn log_tail(&self, node: &str) -> String {
        let log =
            std::fs::read_to_string(self.node_dir(node).join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.keep_agent_logs();
        }
        let out = self.run(&["down"]);
        if !out.status.success() {
            eprintln!(
                "cleaning up lab {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The longest any one command of a test may run.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(180);

/// Runs `command` to its end, killing it after [`COMMAND_LIMIT`] (a test
/// failure).
pub fn bounded(command: &mut Command) -> Output {
    let run = meshward_testkit::run(command, b"", COMMAND_LIMIT)
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(!run.timed_out, "{command:?} did not finish: {run}");
    Output {
        status: run.status,
        stdout: run.stdout.into_bytes(),
        stderr: run.stderr.into_bytes(),
    }
}

/// Pids of processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// A background ping.
pub struct Pinger {
    child: Option<Child>,
    what: String,
}

impl Pinger {
    /// Waits for ping to end (bounded by its own count and interval, plus a
    /// margin) and returns (transmitted, received).
    pub fn finish(mut self, timeout: Duration) -> (u32, u32) {
        let mut child = self.child.take().expect("pinger");
        let deadline = Instant::now() + timeout;
        while child.try_wait().expect("waiting for ping").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ping {} did not finish within {timeout:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("ping output");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        parse_ping(&text).unwrap_or_else(|| panic!("ping {}: no summary in {text:?}", self.what))
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// (transmitted, received) from ping's summary line.
pub fn parse_ping(text: &str) -> Option<(u32, u32)> {
    let line = text.lines().find(|l| l.contains("transmitted"))?;
    let mut words = line.split_whitespace();
    let tx = words.next()?.parse().ok()?;
    let rx = line
        .split(", ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((tx, rx))
}

pub use meshward_testkit::require_root;

/// `ping`, or busybox's when no ping is installed.
pub fn ping_command() -> Vec<&'static str> {
    static PING: OnceLock<Vec<&'static str>> = OnceLock::new();
    PING.get_or_init(|| {
        if on_path("ping") {
            vec!["ping"]
        } else if on_path("busybox") {
            vec!["busybox", "ping"]
        } else {
            panic!("the lab tests need `ping` (iputils-ping or busybox)")
        }
    })
    .clone()
}

pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|dir| dir.join(program).is_file()))
}

/// The meshward-cni binary: in the same target directory as meshward.
pub fn cni_bin() -> PathBuf {
    let path = Path::new(MESHWARD)
        .parent()
        .expect("meshward has a directory")
        .join("meshward-cni");
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --workspace` first",
        path.display()
    );
    path
}

pub fn members(status: &Value) -> &Vec<Value> {
    status["members"].as_array().expect("members is an array")
}

pub fn member<'a>(status: &'a Value, name: &str) -> &'a Value {
    members(status)
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no member {name} in {status:#}"))
}

/// Runs `f` on a short-lived thread that joined network namespace
/// `/run/netns/NS`, waits for it and returns its result. Sockets it opens
/// stay in that namespace, and may be used from any thread afterwards.
///
/// Keep `f` short (open sockets, send a few packets): no thread of the test
/// process may still be inside a lab namespace when the lab goes down, or
/// `lab down` would stop the test process with the lab's own processes.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    meshward_testkit::in_netns(Path::new(&format!("/run/netns/{ns}")), f)
}

/// A running `tcpdump -i br0` in the lab's fabric namespace, writing a pcap.
pub struct Capture {
    child: Option<Child>,
    pub file: PathBuf,
}

impl Capture {
    /// Starts the capture and waits (bounded) until tcpdump listens.
    pub fn start(lab: &TestLab, file: &Path) -> Capture {
        let mut child = Command::new(MESHWARD)
            .args(["lab", "--name", &lab.name, "exec", "fabric", "--"])
            .args(["tcpdump", "-i", "br0", "-n", "-U", "-s", "0", "-w"])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running tcpdump (apt-get install tcpdump)");
        let stderr = child.stderr.take().expect("tcpdump stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("listening on") => break,
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    panic!("tcpdump did not start listening on br0 within 10s");
                }
            }
        }
        Capture {
            child: Some(child),
            file: file.to_path_buf(),
        }
    }

    /// Stops tcpdump (SIGINT, so it flushes) and returns the frames.
    pub fn stop(mut self) -> Vec<Vec<u8>> {
        let mut child = self.child.take().expect("capture");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().expect("waiting for tcpdump").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.wait();
        read_pcap(&std::fs::read(&self.file).expect("reading the capture"))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The frames of a classic pcap file (either byte order).
pub fn read_pcap(bytes: &[u8]) -> Vec<Vec<u8>> {
    assert!(bytes.len() >= 24, "pcap file too short");
    let magic = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
    let le = match magic {
        0xa1b2c3d4 | 0xa1b23c4d => true,
        0xd4c3b2a1 | 0x4d3cb2a1 => false,
        other => panic!("not a pcap file (magic {other:#x})"),
    };
    let u32_at = |at: usize| {
        let b: [u8; 4] = bytes[at..at + 4].try_into().unwrap();
        if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let linktype = u32_at(20);
    assert_eq!(linktype, 1, "expected an Ethernet capture");
    let mut frames = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let caplen = u32_at(at + 8) as usize;
        let start = at + 16;
        if start + caplen > bytes.len() {
            break; // a record cut short by stopping tcpdump
        }
        frames.push(bytes[start..start + caplen].to_vec());
        at = start + caplen;
    }
    frames
}

/// What a capture on the underlay shows.
#[derive(Debug, Default)]
pub struct Underlay {
    /// WireGuard datagrams (UDP to or from port 51871 between underlay addresses).
    pub wireguard: usize,
    /// ICMP errors about WireGuard datagrams (a stopped agent's port).
    pub icmp_about_wireguard: usize,
    pub arp: usize,
    /// IGMP to link-local multicast groups (224.0.0.0/24).
    pub igmp: usize,
    /// IPv6 link-local housekeeping (neighbour discovery, MLD).
    pub ipv6_link_local: usize,
    /// Everything else, described: must be empty.
    pub violations: Vec<String>,
}

pub const MESH_PORT: u16 = 51871;

fn in_pod_range(a: &[u8]) -> bool {
    a[0] == 198 && a[1] == 19
}

/// Classifies every frame: only WireGuard may carry anything between nodes,
/// no packet may show a pod address (198.19.0.0/16) in the clear, and no
/// frame may contain `marker` anywhere.
pub fn classify(frames: &[Vec<u8>], marker: &[u8]) -> Underlay {
    let mut u = Underlay::default();
    for (i, f) in frames.iter().enumerate() {
        if !marker.is_empty() && f.windows(marker.len()).any(|w| w == marker) {
            u.violations
                .push(format!("frame {i}: carries the plaintext marker"));
            continue;
        }
        if f.len() < 14 {
            u.violations
                .push(format!("frame {i}: runt ({} bytes)", f.len()));
            continue;
        }
        let ethertype = u16::from_be_bytes([f[12], f[13]]);
        let p = &f[14..];
        match ethertype {
            0x0806 => u.arp += 1,
            0x86dd => {
                let ok = p.len() >= 40 && {
                    let src = &p[8..24];
                    let dst = &p[24..40];
                    let link_local = |a: &[u8]| a[0] == 0xfe && a[1] & 0xc0 == 0x80;
                    let unspecified = |a: &[u8]| a.iter().all(|b| *b == 0);
                    (link_local(src) || unspecified(src)) && (dst[0] == 0xff || link_local(dst))
                };
                if ok {
                    u.ipv6_link_local += 1;
                } else {
                    u.violations
                        .push(format!("frame {i}: IPv6 beyond link-local"));
                }
            }
            0x0800 => {
                if p.len() < 20 {
                    u.violations.push(format!("frame {i}: short IPv4"));
                    continue;
                }
                let ihl = usize::from(p[0] & 0x0f) * 4;
                let (src, dst) = (&p[12..16], &p[16..20]);
                let describe = || {
                    format!(
                        "frame {i}: IPv4 proto {} {}.{}.{}.{} -> {}.{}.{}.{}",
                        p[9], src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3]
                    )
                };
                if in_pod_range(src) || in_pod_range(dst) {
                    u.violations
                        .push(format!("{} (pod address in the clear)", describe()));
                    continue;
                }
                let l4 = &p[ihl.min(p.len())..];
                match p[9] {
                    2 if dst[0] == 224 && dst[1] == 0 && dst[2] == 0 => u.igmp += 1,
                    17 if l4.len() >= 4 => {
                        let sport = u16::from_be_bytes([l4[0], l4[1]]);
                        let dport = u16::from_be_bytes([l4[2], l4[3]]);
                        if sport == MESH_PORT || dport == MESH_PORT {
                            u.wireguard += 1;
                        } else {
                            u.violations
                                .push(format!("{} udp {sport}->{dport}", describe()));
                        }
                    }
                    1 if l4.len() >= 8 + 20 + 4 && l4[0] == 3 => {
                        // destination unreachable: the datagram it is about
                        let inner = &l4[8..];
                        let inner_ihl = usize::from(inner[0] & 0x0f) * 4;
                        let about_wg = inner[9] == 17
                            && !in_pod_range(&inner[12..16])
                            && !in_pod_range(&inner[16..20])
                            && inner.len() >= inner_ihl + 4
                            && (u16::from_be_bytes([inner[inner_ihl], inner[inner_ihl + 1]])
                                == MESH_PORT
                                || u16::from_be_bytes([
                                    inner[inner_ihl + 2],
                                    inner[inner_ihl + 3],
                                ]) == MESH_PORT);
                        if about_wg {
                            u.icmp_about_wireguard += 1;
                        } else {
                            u.violations
                                .push(format!("{} (ICMP error about something else)", describe()));
                        }
                    }
                    _ => u.violations.push(describe()),
                }
            }
            other => u
                .violations
                .push(format!("frame {i}: ethertype {other:#06x}")),
        }
    }
    u
}

/// A Node manifest for the file datastore; `peer` = (public key, endpoint)
/// publishes the annotations a mesh peer needs.
pub fn node_manifest(name: &str, pod_cidr: &str, peer: Option<(&str, &str)>) -> String {
    let annotations = peer
        .map(|(key, endpoint)| {
            format!(
                "  annotations:\n    meshward.io/public-key: {key}\n    \
                 meshward.io/endpoint: {endpoint}\n"
            )
        })
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n{annotations}\
         spec:\n  podCIDR: {pod_cidr}\n"
    )
}

// Helpers of the policy, observability and L7 end-to-end tests.

/// Applies `yaml` as file `name` to the lab.
pub fn apply(lab: &TestLab, name: &str, yaml: &str) {
    let dir = lab.state_dir().join("test-manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(name);
    std::fs::write(&file, yaml).unwrap();
    lab.ok(&["apply", file.to_str().unwrap()]);
}

/// `curl` in a pod: the body, or None when the connection failed.
pub fn curl(lab: &TestLab, pod: &str, url: &str) -> Option<String> {
    let out = lab.run(&[
        "exec",
        pod,
        "curl",
        "-sS",
        "--connect-timeout",
        "1",
        "-m",
        "3",
        url,
    ]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `check` (bounded) until it holds.
pub fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `lab observe ARGS -o json`: the events.
pub fn observe(lab: &TestLab, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["observe", "-o", "json"];
    all.extend(args);
    lab.ok(&all)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// One metric's value (the first sample line starting with `sample`).
pub fn metric(lab: &TestLab, node: &str, sample: &str) -> f64 {
    let text = lab.ok(&["metrics", node]);
    text.lines()
        .find(|l| l.starts_with(sample))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
