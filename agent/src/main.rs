//! `meshward`: the meshward node agent and its tools.

// config and datastore are wired into `meshward agent` together with the mesh.
#[allow(dead_code)]
mod config;
#[allow(dead_code)]
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
        Command::Lab(args) => lab::run(args),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}
