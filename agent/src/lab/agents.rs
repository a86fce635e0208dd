//! The lab's node agents: one real `meshward agent` per node, inside the
//! node's network namespace, all sharing one file datastore.
//!
//! ```text
//! /run/meshward-lab/NAME/datastore/node-nodeI.yaml   Node nodeI (podCIDR 198.19.I.0/24);
//!                                                    its agent adds key and endpoint
//! /run/meshward-lab/NAME/nodeI/agent.yaml            the agent's configuration
//! /run/meshward-lab/NAME/nodeI/agent.log             its stdout and stderr
//! /run/meshward-lab/NAME/nodeI/agent.pid             its pid, while the lab runs it
//! /run/meshward-lab/NAME/nodeI/agent.sock            its control socket
//! /run/meshward-lab/NAME/nodeI/{key,peers.json}      its state (stateDir)
//! /run/meshward-lab/NAME/nodeI/dns-sockets.sock      the DNS socket keeper the
//!                                                    agent started (dns-keeper.log)
//! ```
//!
//! Stopping an agent (`lab agent stop`, also `--kill`) leaves its DNS
//! socket keeper running, as a crash would: the next agent takes the
//! queries that waited. `lab down` stops the keepers with the agents.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use super::netns;
use super::state::{self, Lab, Node};
use super::topology::{self as topo, LabName};
use crate::agent::protocol::{self, Status};

/// The UDP port of every lab node's mesh endpoint.
pub const MESH_PORT: u16 = 51871;
/// How long a stopping agent gets after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Lines of each agent's log shown when agents do not come up.
const LOG_TAIL_LINES: usize = 20;
/// One status request to an agent.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// The TCP port of every lab agent's health and metrics endpoint (on the
/// node's underlay address).
pub const HEALTH_PORT: u16 = 9879;

/// /run/meshward-lab/NAME/datastore
pub fn datastore_dir(lab: &LabName) -> PathBuf {
    state::state_dir(lab).join("datastore")
}

fn config_file(lab: &LabName, node: u8) -> PathBuf {
    state::node_dir(lab, node).join("agent.yaml")
}

fn log_file(lab: &LabName, node: u8) -> PathBuf {
    state::node_dir(lab, node).join("agent.log")
}

fn pid_file(lab: &LabName, node: u8) -> PathBuf {
    state::node_dir(lab, node).join("agent.pid")
}

/// `spec.podCIDR` of Node `nodeI`, as the lab writes it.
pub fn node_manifest(node: &Node) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec:\n  podCIDR: {cidr}\n  podCIDRs:\n    - {cidr}\n",
        name = node.name,
        cidr = node.pod_cidr,
    )
}

/// The agent configuration of `node` (`mesh: false` when `policy_only`).
pub fn agent_config(lab: &LabName, node: &Node, policy_only: bool) -> String {
    let mut config = format!(
        "# meshward lab {lab}: the agent of {name}\n\
         nodeName: {name}\n\
         stateDir: {state}\n\
         datastore: dir:{datastore}\n\
         endpoint: {address}:{MESH_PORT}\n\
         listenPort: {MESH_PORT}\n\
         clusterCIDR: {cluster}\n\
         socketPath: {socket}\n\
         healthAddress: {address}:{HEALTH_PORT}\n",
        name = node.name,
        state = state::node_dir(lab, node.index).display(),
        datastore = datastore_dir(lab).display(),
        address = node.address.addr(),
        cluster = topo::POD_SUPERNET,
        socket = node.agent_socket.display(),
    );
    if policy_only {
        config.push_str("mesh: false\n");
    }
    config
}

/// Writes every node's Node manifest into the shared datastore and every
/// agent's configuration file.
pub fn write_files(lab: &LabName, state: &Lab) -> Result<()> {
    let dir = datastore_dir(lab);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for node in &state.nodes {
        let manifest = dir.join(format!("node-{}.yaml", node.name));
        fs::write(&manifest, node_manifest(node))
            .with_context(|| format!("writing {}", manifest.display()))?;
        let config = config_file(lab, node.index);
        fs::write(&config, agent_config(lab, node, state.policy_only))
            .with_context(|| format!("writing {}", config.display()))?;
    }
    super::manifests::write_pods(&dir, state)
}

/// Starts the agent of `node` inside its namespace, in a session of its own
/// (so it outlives this command), logging to nodeI/agent.log.
pub fn start(lab: &LabName, node: &Node) -> Result<Child> {
    if let Some(pid) = running_pid(lab, node) {
        bail!("the agent of {} is already running (pid {pid})", node.name);
    }
    let exe = std::env::current_exe().context("finding the meshward executable")?;
    let log_path = log_file(lab, node.index);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let err_log = log
        .try_clone()
        .with_context(|| format!("opening {}", log_path.display()))?;
    let ns = netns::open(&node.namespace)?;
    let fd = ns.as_raw_fd();
    let mut command = Command::new(&exe);
    command
        .arg("agent")
        .arg("--config")
        .arg(config_file(lab, node.index))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err_log);
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "info");
    }
    // SAFETY: only setns(2) and setsid(2), both async-signal-safe, run
    // between fork and exec; the namespace fd stays open until spawn returns.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .with_context(|| format!("starting {} agent", node.name))?;
    drop(ns);
    let pid_path = pid_file(lab, node.index);
    fs::write(&pid_path, format!("{}\n", child.id()))
        .with_context(|| format!("writing {}", pid_path.display()))?;
    tracing::info!(node = %node.name, pid = child.id(), log = %log_path.display(), "agent started");
    Ok(child)
}

/// The pid of the node's agent if it runs: the pid file names a live
/// process whose command line is this node's agent.
pub fn running_pid(lab: &LabName, node: &Node) -> Option<i32> {
    agent_pid(&state::node_dir(lab, node.index))
}

/// The pid in `DIR/agent.pid` if it is a live `meshward agent --config
/// DIR/agent.yaml`.
fn agent_pid(node_dir: &Path) -> Option<i32> {
    let pid: i32 = fs::read_to_string(node_dir.join("agent.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let config = node_dir.join("agent.yaml");
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let ours = args.contains(&b"agent".as_slice())
        && args.contains(&config.as_os_str().as_encoded_bytes());
    (ours && alive(pid)).then_some(pid)
}

/// Stops every agent the lab's state directory has a pid file for (with or
/// without lab.json): SIGTERM, SIGKILL after `grace`. This also finds an
/// agent whose node namespace is gone from /run/netns (deleted by hand),
/// which a search by namespace cannot. Returns how many were running.
pub fn stop_all(lab: &LabName, grace: Duration) -> usize {
    let Ok(entries) = fs::read_dir(state::state_dir(lab)) else {
        return 0;
    };
    let pids: Vec<i32> = entries
        .flatten()
        .filter_map(|e| agent_pid(&e.path()))
        .collect();
    for pid in &pids {
        tracing::info!(pid, "stopping lab agent");
        let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    for pid in pids.iter().filter(|p| alive(**p)) {
        tracing::warn!(pid, "lab agent ignored SIGTERM; sending SIGKILL");
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    pids.len() + stop_keepers(lab)
}

/// Asks every node's DNS socket keeper to stop (also one whose namespace
/// is gone from /run/netns: its socket is a file). Returns how many did.
fn stop_keepers(lab: &LabName) -> usize {
    let Ok(entries) = fs::read_dir(state::state_dir(lab)) else {
        return 0;
    };
    let mut stopped = 0;
    for dir in entries.flatten().map(|e| e.path()) {
        let path = crate::agent::keeper::socket_path(&dir);
        if !path.exists() {
            continue;
        }
        let mut client = meshward_dns_proxy::keeper::Client::new(&path);
        client.timeout = QUERY_TIMEOUT;
        if let Ok(pid) = client.stop() {
            tracing::info!(pid, "stopped lab DNS socket keeper");
            stopped += 1;
        }
    }
    stopped
}

/// Whether any thread of `pid` still runs: a thread-group leader turns
/// zombie before its other threads have exited, and until the last one has,
/// the process still holds its files (its lock, its TUN).
fn alive(pid: i32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            stat.rsplit_once(')').is_some_and(|(_, rest)| {
                let state = rest.trim_start();
                !(state.starts_with('Z') || state.starts_with('X'))
            })
        })
    })
}

/// Stops the node's agent: SIGKILL at once with `kill9`, else SIGTERM and
/// SIGKILL after a grace period. Returns whether one was running.
pub fn stop(lab: &LabName, node: &Node, kill9: bool) -> Result<bool> {
    let Some(pid) = running_pid(lab, node) else {
        let _ = fs::remove_file(pid_file(lab, node.index));
        return Ok(false);
    };
    let target = Pid::from_raw(pid);
    let signal = if kill9 {
        Signal::SIGKILL
    } else {
        Signal::SIGTERM
    };
    tracing::info!(node = %node.name, pid, ?signal, "stopping agent");
    kill(target, signal).with_context(|| format!("signalling agent pid {pid}"))?;
    let deadline = Instant::now() + STOP_GRACE;
    while alive(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    if alive(pid) {
        tracing::warn!(node = %node.name, pid, "agent ignored SIGTERM; sending SIGKILL");
        let _ = kill(target, Signal::SIGKILL);
        let deadline = Instant::now() + STOP_GRACE;
        while alive(pid) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if alive(pid) {
            bail!("the agent of {} (pid {pid}) does not die", node.name);
        }
    }
    let _ = fs::remove_file(pid_file(lab, node.index));
    Ok(true)
}

/// How a node's agent is doing, for `lab status`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentState {
    /// `running`, `not answering` or `not running`.
    pub state: &'static str,
    pub pid: Option<i32>,
    pub public_key: Option<String>,
    pub peers: Option<usize>,
    pub peers_up: Option<usize>,
    /// Why it is not answering.
    pub error: Option<String>,
}

impl AgentState {
    /// The AGENT cell of the status table.
    pub fn summary(&self) -> String {
        match (self.state, self.pid, self.peers, self.peers_up) {
            ("running", Some(pid), Some(n), Some(up)) => format!("pid {pid}, {up}/{n} peers up"),
            (state, Some(pid), _, _) => format!("pid {pid}, {state}"),
            (state, None, _, _) => state.to_string(),
        }
    }
}

/// Asks the node's agent for its status.
pub fn query(lab: &LabName, node: &Node) -> (AgentState, Option<Status>) {
    let pid = running_pid(lab, node);
    let Some(pid) = pid else {
        return (
            AgentState {
                state: "not running",
                pid: None,
                public_key: None,
                peers: None,
                peers_up: None,
                error: None,
            },
            None,
        );
    };
    match protocol::status(&node.agent_socket, QUERY_TIMEOUT) {
        Ok(status) => (
            AgentState {
                state: "running",
                pid: Some(pid),
                public_key: Some(status.public_key.clone()),
                peers: Some(status.peers.len()),
                peers_up: Some(status.peers_up()),
                error: None,
            },
            Some(status),
        ),
        Err(e) => (
            AgentState {
                state: "not answering",
                pid: Some(pid),
                public_key: None,
                peers: None,
                peers_up: None,
                error: Some(e.to_string()),
            },
            None,
        ),
    }
}

/// Every node's agent state, by node name.
pub fn states(lab: &LabName, state: &Lab) -> BTreeMap<String, AgentState> {
    state
        .nodes
        .iter()
        .map(|node| (node.name.clone(), query(lab, node).0))
        .collect()
}

/// Whether `status` shows a working session with every other node.
fn meshed(status: &Status, node: &Node, all: &Lab) -> bool {
    // Policy only: answering is all there is to wait for.
    !status.mesh
        || all
            .nodes
            .iter()
            .filter(|other| other.name != node.name)
            .all(|other| {
                status
                    .peers
                    .iter()
                    .any(|p| p.name == other.name && p.session_up)
            })
}

/// Waits until every agent in the lab answers and has a working session
/// with every other node, at most `timeout`. `children`: agents this
/// command started (an early exit is reported at once).
pub fn wait_meshed(
    lab: &LabName,
    state: &Lab,
    children: &mut [(String, Child)],
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        for (name, child) in children.iter_mut() {
            if let Some(status) = child.try_wait().context("waiting for an agent")? {
                bail!(
                    "the agent of {name} exited ({status}) while starting{}",
                    log_tails(lab, state)
                );
            }
        }
        let mut waiting = Vec::new();
        for node in &state.nodes {
            match query(lab, node) {
                (_, Some(status)) if meshed(&status, node, state) => {}
                (_, Some(status)) => waiting.push(format!(
                    "{}: {}/{} peers up",
                    node.name,
                    status.peers_up(),
                    state.nodes.len() - 1
                )),
                (agent, None) => waiting.push(format!("{}: {}", node.name, agent.summary())),
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the agents did not form the mesh within {}s ({}){}",
                timeout.as_secs(),
                waiting.join("; "),
                log_tails(lab, state)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The last lines of every agent's log, for error messages.
pub fn log_tails(lab: &LabName, state: &Lab) -> String {
    let mut out = String::new();
    for node in &state.nodes {
        let path = log_file(lab, node.index);
        out += &format!("\n--- {} ({}) ---\n", node.name, path.display());
        match tail(&path, LOG_TAIL_LINES) {
            Ok(text) if text.trim().is_empty() => out += "(empty)\n",
            Ok(text) => out += &text,
            Err(e) => out += &format!("(cannot read: {e})\n"),
        }
    }
    out
}

fn tail(path: &Path, lines: usize) -> io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(64 * 1024);
    file.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    out.push('\n');
    Ok(out)
}

/// Resolves `lab agent` targets: node names, or every node when none given.
pub fn select<'a>(
    state: &'a Lab,
    lab: &LabName,
    targets: &[topo::Target],
) -> Result<Vec<&'a Node>> {
    if targets.is_empty() {
        return Ok(state.nodes.iter().collect());
    }
    targets
        .iter()
        .map(|t| match t {
            topo::Target::Node(n) => state
                .node(*n)
                .ok_or_else(|| anyhow!("lab {lab} has no {t}")),
            other => Err(anyhow!("{other} is not a node: agents run on nodes")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Node {
        Node {
            name: "node2".into(),
            index: 2,
            namespace: "mwl-x-node2".into(),
            interface: "eth0".into(),
            address: "198.18.0.2/24".parse().unwrap(),
            pod_cidr: "198.19.2.0/24".parse().unwrap(),
            ipam_dir: "/run/meshward-lab/x/node2/ipam".into(),
            agent_socket: "/run/meshward-lab/x/node2/agent.sock".into(),
            pods: vec![],
        }
    }

    #[test]
    fn files_follow_the_address_plan() {
        let lab: LabName = "x".parse().unwrap();
        let manifest = node_manifest(&node());
        assert!(manifest.contains("  name: node2\n"), "{manifest}");
        assert!(manifest.contains("podCIDR: 198.19.2.0/24\n"), "{manifest}");
        let config = agent_config(&lab, &node(), false);
        assert!(!config.contains("mesh:"), "{config}");
        for line in [
            "nodeName: node2",
            "stateDir: /run/meshward-lab/x/node2",
            "datastore: dir:/run/meshward-lab/x/datastore",
            "endpoint: 198.18.0.2:51871",
            "clusterCIDR: 198.19.0.0/16",
            "socketPath: /run/meshward-lab/x/node2/agent.sock",
        ] {
            assert!(
                config.lines().any(|l| l == line),
                "{line} missing:\n{config}"
            );
        }
    }

    #[test]
    fn the_agent_config_parses() {
        let lab: LabName = "x".parse().unwrap();
        for policy_only in [false, true] {
            let c = crate::config::Config::parse(
                &agent_config(&lab, &node(), policy_only),
                Path::new("/run/meshward-lab/x/node2/agent.yaml"),
                &Default::default(),
                || None,
            )
            .unwrap();
            assert_eq!(c.node_name, "node2");
            assert_eq!(c.cluster_cidr, topo::POD_SUPERNET);
            assert_eq!(c.endpoint, "198.18.0.2:51871".parse().unwrap());
            assert_eq!(c.mesh, !policy_only);
        }
    }
}
