//! `meshward lab`: a cluster of network namespaces on this machine.
//!
//! See DESIGN.md, "The lab". Every namespace of lab NAME is called
//! `mwl-NAME-...` and its state lives in /run/meshward-lab/NAME/; nothing is
//! linked to the host's interfaces or routed out.

mod agents;
mod build;
mod cni;
mod links;
mod manifests;
mod netns;
mod services;
mod state;
mod status;
mod topology;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};

use state::Lab;
use status::Status;
use topology::{LabName, Target};

/// How long processes inside a lab get to exit after SIGTERM on `lab down`.
const KILL_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
pub struct LabArgs {
    /// Lab name (1-12 of a-z, 0-9); its namespaces are called mwl-NAME-*
    #[arg(long, global = true, default_value = "lab", value_name = "NAME")]
    name: LabName,

    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Debug, Subcommand)]
enum LabCommand {
    /// Build the lab: fabric, external namespace, nodes and their pods (needs root)
    Up(UpArgs),
    /// Remove the lab, including whatever a killed earlier lab of this name left
    Down,
    /// Show nodes, pods and addresses
    Status {
        /// Output format
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Run a command inside a lab member's network namespace; its exit code is passed through
    Exec {
        /// A pod (node1-pod1), a node (node1), `external` or `fabric`
        target: Target,
        /// The command and its arguments
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<OsString>,
    },
    /// Print the address of a pod, a node or `external`
    Ip {
        /// A pod (node1-pod1), a node (node1) or `external`
        target: Target,
    },
    /// Apply manifests (policies, namespaces, Pods) to the lab's datastore;
    /// a Pod named like a lab pod (node1-pod1) sets its namespace and labels
    Apply {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Remove what `lab apply FILE` applied (lab pods keep their labels)
    Delete {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Start, stop or restart the nodes' agents
    Agent {
        #[command(subcommand)]
        action: AgentAction,
    },
    /// Flow events of every node's agent, merged (same filters as `meshward observe`)
    Observe {
        #[command(flatten)]
        filter: crate::cli::observe::FilterArgs,
    },
    /// Fetch and print a node agent's Prometheus metrics
    Metrics {
        /// A node (node1)
        node: Target,
    },
}

#[derive(Debug, Subcommand)]
enum AgentAction {
    /// Start the agents of these nodes (every node when none is named) and
    /// wait until every agent has a session with every other node
    Start(AgentStartArgs),
    /// Stop the agents of these nodes (every node when none is named)
    Stop(AgentStopArgs),
    /// Stop, then start, then wait as `start` does
    Restart {
        #[command(flatten)]
        stop: AgentStopArgs,
        /// Don't wait for the mesh after starting
        #[arg(long)]
        no_wait: bool,
        /// Longest to wait for the mesh, in seconds
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        timeout: u64,
    },
}

#[derive(Debug, Args)]
struct AgentStartArgs {
    /// Nodes (node1 node2 ...)
    nodes: Vec<Target>,
    /// Don't wait for the mesh
    #[arg(long)]
    no_wait: bool,
    /// Longest to wait for the mesh, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    timeout: u64,
}

#[derive(Debug, Args)]
struct AgentStopArgs {
    /// Nodes (node1 node2 ...)
    nodes: Vec<Target>,
    /// SIGKILL instead of SIGTERM: the agent gets no chance to clean up
    #[arg(long)]
    kill: bool,
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Number of nodes (node I has underlay 198.18.0.I/24 and pod CIDR 198.19.I.0/24)
    #[arg(long, default_value_t = 2, value_name = "N")]
    nodes: u32,
    /// Pods per node, each created with a CNI ADD of meshward-cni
    #[arg(long, default_value_t = 2, value_name = "P")]
    pods: u32,
    /// The meshward-cni binary [default: next to this executable, else on PATH]
    #[arg(long, value_name = "PATH")]
    cni_bin: Option<PathBuf>,
    /// Remove an existing lab of the same name first
    #[arg(long)]
    replace: bool,
    /// Leave a half-built lab in place when a step fails (for debugging)
    #[arg(long)]
    keep_on_error: bool,
    /// Don't start the node agents (cross-node pod traffic then stays
    /// refused); `lab agent start` starts them later
    #[arg(long)]
    no_agents: bool,
    /// Run the agents without the mesh (`mesh: false`, policy only) and let
    /// the fabric route pod CIDRs in plaintext, as a cloud VPC does
    #[arg(long)]
    policy_only: bool,
    /// Longest to wait for the agents to form the mesh, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    agent_timeout: u64,
    /// Labels of a pod's Pod object: POD=KEY=VALUE[,KEY=VALUE...] (repeatable)
    #[arg(long = "pod-labels", value_name = "POD=LABELS", value_parser = manifests::parse_pod_labels)]
    pod_labels: Vec<(String, std::collections::BTreeMap<String, String>)>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

/// Runs a `meshward lab` command.
pub fn run(args: LabArgs) -> Result<ExitCode> {
    let lab = &args.name;
    match args.command {
        LabCommand::Up(up_args) => up(lab, up_args)?,
        LabCommand::Down => down(lab)?,
        LabCommand::Status { output } => status(lab, output)?,
        LabCommand::Exec { target, command } => return exec(lab, target, command),
        LabCommand::Ip { target } => ip(lab, target)?,
        LabCommand::Agent { action } => agent(lab, action)?,
        LabCommand::Apply { files } => apply(lab, &files)?,
        LabCommand::Delete { files } => delete(lab, &files)?,
        LabCommand::Observe { filter } => observe(lab, &filter)?,
        LabCommand::Metrics { node } => metrics(lab, node)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn require_root(what: &str) -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        bail!("`meshward lab {what}` needs root: it creates and enters network namespaces")
    }
}

fn up(lab: &LabName, args: UpArgs) -> Result<()> {
    let (nodes, pods) = topology::check_size(args.nodes, args.pods).map_err(|e| anyhow!(e))?;
    require_root("up")?;
    let cni_bin = if pods > 0 || args.cni_bin.is_some() {
        Some(cni::locate(args.cni_bin.as_deref())?)
    } else {
        None
    };

    let leftovers = netns::list_with_prefix(&lab.prefix())?;
    let dir = state::state_dir(lab);
    if !leftovers.is_empty() || dir.exists() {
        if !args.replace {
            bail!(
                "lab {lab} already exists ({} namespaces named {}*, state in {}): run `meshward lab --name {lab} down` first, or pass --replace",
                leftovers.len(),
                lab.prefix(),
                dir.display()
            );
        }
        tracing::info!(lab = %lab, "replacing the existing lab");
        teardown(lab)?;
    }

    tracing::info!(lab = %lab, nodes, pods, "building lab");
    let built = build::build(lab, nodes, pods, cni_bin.as_deref(), args.policy_only).and_then(
        |mut state| {
            manifests::set_labels(&mut state, &args.pod_labels)?;
            state.save(lab)?;
            agents::write_files(lab, &state)?;
            if args.no_agents {
                return Ok(state);
            }
            let mut children = Vec::new();
            for node in &state.nodes {
                children.push((node.name.clone(), agents::start(lab, node)?));
            }
            agents::wait_meshed(
                lab,
                &state,
                &mut children,
                Duration::from_secs(args.agent_timeout),
            )?;
            Ok(state)
        },
    );
    match built {
        Ok(state) => {
            print!("{}", current_status(lab, &state)?.table());
            Ok(())
        }
        Err(e) if args.keep_on_error => {
            tracing::warn!("leaving the half-built lab in place (--keep-on-error)");
            Err(e.context(format!("building lab {lab}")))
        }
        Err(e) => {
            if let Err(cleanup) = teardown(lab) {
                tracing::warn!("removing the half-built lab: {cleanup:#}");
            }
            Err(e.context(format!(
                "building lab {lab} (the half-built lab was removed)"
            )))
        }
    }
}

fn apply(lab: &LabName, files: &[PathBuf]) -> Result<()> {
    require_root("apply")?;
    let mut state = load_up(lab)?;
    let datastore = agents::datastore_dir(lab);
    // Read and check everything first: a bad file applies nothing.
    let mut writes = Vec::new();
    for file in files {
        let text =
            fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let rest = manifests::split_applied(file, &text, &mut state)?;
        writes.push((manifests::applied_path(&datastore, file)?, rest));
    }
    state.save(lab)?;
    manifests::write_pods(&datastore, &state)?;
    for (path, rest) in writes {
        if rest.is_empty() {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
        } else {
            manifests::write_atomically(&path, rest.as_bytes())?;
        }
        println!("applied {}", path.display());
    }
    Ok(())
}

fn delete(lab: &LabName, files: &[PathBuf]) -> Result<()> {
    require_root("delete")?;
    load_up(lab)?;
    let datastore = agents::datastore_dir(lab);
    for file in files {
        let path = manifests::applied_path(&datastore, file)?;
        match fs::remove_file(&path) {
            Ok(()) => println!("deleted {}", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                println!("{} was not applied", file.display())
            }
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(())
}

fn down(lab: &LabName) -> Result<()> {
    require_root("down")?;
    let (namespaces, processes) = teardown(lab)?;
    if namespaces == 0 {
        println!("lab {lab}: nothing to remove");
    } else {
        println!("lab {lab}: removed {namespaces} namespaces, stopped {processes} processes");
    }
    Ok(())
}

/// Removes every namespace named with the lab's prefix (stopping the
/// processes inside first) and the state directory, with or without
/// lab.json. Returns (namespaces removed, processes stopped).
fn teardown(lab: &LabName) -> Result<(usize, usize)> {
    let names = netns::list_with_prefix(&lab.prefix())?;
    let agents = agents::stop_all(lab, KILL_GRACE);
    let processes = agents + netns::kill_processes_in(&names, KILL_GRACE)?;
    let mut failures = Vec::new();
    // Reverse order: pods before their node, nodes before fabric.
    for name in names.iter().rev() {
        tracing::debug!(namespace = %name, "deleting namespace");
        if let Err(e) = netns::delete(name) {
            failures.push(format!("{e:#}"));
        }
    }
    let dir = state::state_dir(lab);
    match fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => failures.push(format!("removing {}: {e}", dir.display())),
    }
    if !failures.is_empty() {
        bail!("removing lab {lab}: {}", failures.join("; "));
    }
    Ok((names.len(), processes))
}

/// lab.json of a lab that must be up, with a hint when it is not.
fn load_up(lab: &LabName) -> Result<Lab> {
    if let Some(state) = Lab::load(lab)? {
        return Ok(state);
    }
    let leftovers = netns::list_with_prefix(&lab.prefix())?;
    if leftovers.is_empty() {
        bail!("lab {lab} is not up: start it with `meshward lab --name {lab} up`");
    }
    bail!(
        "lab {lab} is not up, but a killed lab left namespaces behind ({}): run `meshward lab --name {lab} down`",
        leftovers.join(", ")
    )
}

fn current_status(lab: &LabName, state: &Lab) -> Result<Status> {
    let present: BTreeSet<String> = netns::list_with_prefix(&lab.prefix())?
        .into_iter()
        .filter(|n| netns::exists(n))
        .collect();
    let dir = state::state_dir(lab).display().to_string();
    let agents = agents::states(lab, state);
    Ok(Status::new(state, dir, &present, &agents))
}

fn agent(lab: &LabName, action: AgentAction) -> Result<()> {
    require_root("agent")?;
    let state = load_up(lab)?;
    let (stop, start) = match &action {
        AgentAction::Start(a) => (None, Some((&a.nodes, a.no_wait, a.timeout))),
        AgentAction::Stop(s) => (Some(s), None),
        AgentAction::Restart {
            stop,
            no_wait,
            timeout,
        } => (Some(stop), Some((&stop.nodes, *no_wait, *timeout))),
    };
    let start_nodes = match start {
        Some((nodes, _, _)) => Some(agents::select(&state, lab, nodes)?),
        None => None,
    };
    if let Some(stop) = stop {
        for node in agents::select(&state, lab, &stop.nodes)? {
            if agents::stop(lab, node, stop.kill)? {
                println!("{}: agent stopped", node.name);
            } else {
                println!("{}: agent was not running", node.name);
            }
        }
    }
    if let (Some((_, no_wait, timeout)), Some(nodes)) = (start, start_nodes) {
        let mut children = Vec::new();
        for node in nodes {
            let child = agents::start(lab, node)?;
            println!("{}: agent started (pid {})", node.name, child.id());
            children.push((node.name.clone(), child));
        }
        if !no_wait {
            agents::wait_meshed(lab, &state, &mut children, Duration::from_secs(timeout))?;
            println!("mesh complete: every agent has a session with every other node");
        }
    }
    Ok(())
}

fn observe(lab: &LabName, filter: &crate::cli::observe::FilterArgs) -> Result<()> {
    let state = load_up(lab)?;
    let sockets: Vec<(String, PathBuf)> = state
        .nodes
        .iter()
        .filter(|n| agents::running_pid(lab, n).is_some())
        .map(|n| (n.name.clone(), n.agent_socket.clone()))
        .collect();
    if sockets.is_empty() {
        bail!("no agent of lab {lab} is running");
    }
    crate::cli::observe::observe_many(sockets, filter)
}

fn metrics(lab: &LabName, target: Target) -> Result<()> {
    let state = load_up(lab)?;
    let node = agents::select(&state, lab, std::slice::from_ref(&target))?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("no such node"))?;
    let addr = std::net::SocketAddr::from((node.address.addr(), agents::HEALTH_PORT));
    let ns = netns::open(&node.namespace)?;
    let body = meshward_cni::netns::run_in(&ns, move || http_get(addr, "/metrics"))
        .context("entering the node's namespace")?
        .with_context(|| format!("fetching http://{addr}/metrics in {}", node.name))?;
    print!("{body}");
    Ok(())
}

/// A bounded HTTP/1.0 GET; the body of a 200 answer.
fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(5);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.take(16 << 20).read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no complete HTTP answer"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("the agent answered {status:?}");
    }
    Ok(body.to_string())
}

fn status(lab: &LabName, format: Format) -> Result<()> {
    let state = load_up(lab)?;
    let status = current_status(lab, &state)?;
    match format {
        Format::Table => print!("{}", status.table()),
        Format::Json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&status).context("encoding status")?
            )
        }
    }
    Ok(())
}

fn ip(lab: &LabName, target: Target) -> Result<()> {
    let state = load_up(lab)?;
    let missing = || anyhow!("lab {lab} has no {target}");
    let address = match target {
        Target::Fabric => bail!("the fabric has no address: it is only a bridge"),
        Target::External => state.external.address,
        Target::Node(n) => state.node(n).ok_or_else(missing)?.address,
        Target::Pod(n, _) => {
            let name = target.to_string();
            state
                .node(n)
                .and_then(|node| node.pods.iter().find(|p| p.name == name))
                .ok_or_else(missing)?
                .address
        }
    };
    println!("{}", address.addr());
    Ok(())
}

/// Replaces this process with `command` running inside the target's
/// namespace (like `ip netns exec`), so its exit code and signals are the
/// caller's. Returns only when that fails.
fn exec(lab: &LabName, target: Target, command: Vec<OsString>) -> Result<ExitCode> {
    require_root("exec")?;
    let namespace = lab.target_ns(target);
    if !netns::exists(&namespace) {
        bail!("lab {lab} has no {target}: network namespace {namespace} does not exist");
    }
    let ns = netns::open(&namespace)?;
    let (program, args) = command
        .split_first()
        .ok_or_else(|| anyhow!("no command given to run in {target}"))?;
    let fd = ns.as_raw_fd();
    // Pods resolve names with the lab's DNS server, as `ip netns exec`
    // would arrange with /etc/netns/NAME/resolv.conf: a private mount
    // namespace with the lab's resolv.conf bound over /etc/resolv.conf.
    let resolv = match target {
        Target::Pod(..) => {
            let file = services::resolv_conf(&state::state_dir(lab));
            file.exists()
                .then(|| std::ffi::CString::new(file.as_os_str().as_encoded_bytes()))
                .transpose()?
        }
        _ => None,
    };
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: setns(2), unshare(2) and mount(2) only, on values prepared
    // before fork; the namespace fd stays open until exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(resolv) = &resolv {
                bind_resolv_conf(resolv)?;
            }
            Ok(())
        });
    }
    let err = cmd.exec();
    drop(ns);
    let program = program.to_string_lossy();
    eprintln!("error: running {program} in {target} ({namespace}): {err}");
    Ok(ExitCode::from(if err.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    }))
}

/// In a new private mount namespace, binds `resolv` over /etc/resolv.conf.
///
/// # Safety
/// Called between fork and exec: only async-signal-safe calls.
unsafe fn bind_resolv_conf(resolv: &std::ffi::CStr) -> io::Result<()> {
    if libc::unshare(libc::CLONE_NEWNS) != 0 {
        return Err(io::Error::last_os_error());
    }
    let root = c"/";
    let none = c"none";
    if libc::mount(
        none.as_ptr(),
        root.as_ptr(),
        std::ptr::null(),
        libc::MS_REC | libc::MS_PRIVATE,
        std::ptr::null(),
    ) != 0
    {
        return Err(io::Error::last_os_error());
    }
    let target = c"/etc/resolv.conf";
    if libc::mount(
        resolv.as_ptr(),
        target.as_ptr(),
        std::ptr::null(),
        libc::MS_BIND,
        std::ptr::null(),
    ) != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
