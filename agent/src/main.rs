//! `meshward`: the meshward node agent and its tools.

mod agent;
mod cli;
mod config;
mod datastore;
mod lab;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "meshward", version, about = "meshward node agent and tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent: encrypted mesh to every other node, routes, strict mode
    Agent(config::AgentArgs),
    /// The node's WireGuard key: show it, or have the running agent rotate it
    Keys(cli::keys::KeysArgs),
    /// Show the running agent's peers, sessions, traffic and drops
    Status(cli::status::StatusArgs),
    /// Show the agent's flow events: DNS verdicts, policy drops, mesh peers (filters, --follow, -o json)
    Observe(cli::observe::ObserveArgs),
    /// Print the CustomResourceDefinitions of meshward's policy types (YAML)
    Crd,
    /// Install meshward-cni and its network configuration on this node
    /// (the Helm chart's init container)
    InstallCni(cli::install_cni::InstallCniArgs),
    /// Hold the DNS proxy's sockets while no agent runs, so pods' queries
    /// wait instead of getting lost (started by the agent, or the chart's
    /// second container)
    DnsKeeper(agent::keeper::KeeperArgs),
    /// A cluster of network namespaces on this machine: fabric, nodes, pods, external services
    Lab(lab::LabArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) if args.check => cli::check::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Agent(args) => agent::run(args),
        Command::Keys(args) => cli::keys::run(args).map(|()| ExitCode::SUCCESS),
        Command::Status(args) => cli::status::run(args).map(|()| ExitCode::SUCCESS),
        Command::Observe(args) => cli::observe::run(args).map(|()| ExitCode::SUCCESS),
        Command::Crd => cli::crd::run().map(|()| ExitCode::SUCCESS),
        Command::InstallCni(args) => cli::install_cni::run(args).map(|()| ExitCode::SUCCESS),
        Command::DnsKeeper(args) => agent::keeper::run(args),
        Command::Lab(args) => lab::run(args),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}
