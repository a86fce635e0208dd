//! `meshward keys show` and `meshward keys rotate`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use meshward_keys::{KeyStore, DEFAULT_KEY_DIR};

use crate::agent::protocol::{self, Request};

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Print this node's public key (never the private key)
    Show {
        /// The agent's state directory [default: /var/lib/meshward]
        #[arg(long, value_name = "DIR", conflicts_with = "config")]
        state_dir: Option<PathBuf>,
        /// Take the state directory from the agent's configuration file
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Ask the running agent to rotate its key (it publishes the new one and
    /// keeps accepting the old one until every peer has moved over)
    Rotate {
        /// Take the control socket from the agent's configuration file
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The agent's control socket [default: the config's socketPath, else /run/meshward/agent.sock]
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Wait until the rotation is complete (no peer needs the old key)
        #[arg(long)]
        wait: bool,
        /// Longest to wait with --wait, in seconds
        #[arg(long, value_name = "SECS", default_value_t = 330)]
        timeout: u64,
    },
}

/// How long one request to the agent may take (a rotation fsyncs and publishes).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(35);

pub fn run(args: KeysArgs) -> Result<()> {
    match args.command {
        KeysCommand::Show { state_dir, config } => show(state_dir, config),
        KeysCommand::Rotate {
            config,
            socket,
            wait,
            timeout,
        } => rotate(config, socket, wait, Duration::from_secs(timeout)),
    }
}

fn show(state_dir: Option<PathBuf>, config: Option<PathBuf>) -> Result<()> {
    let dir = match (state_dir, config) {
        (Some(dir), _) => dir,
        (None, Some(file)) => super::load_config(&file)?.state_dir,
        (None, None) => PathBuf::from(DEFAULT_KEY_DIR),
    };
    let store = KeyStore::new(&dir);
    let key = store.load().with_context(|| {
        format!(
            "no usable node key in {} (the agent creates it on its first start)",
            dir.display()
        )
    })?;
    println!("{}", key.public());
    if let Some(previous) = store.previous().context("reading the previous key")? {
        eprintln!(
            "a rotation is in progress: the previous key {} is still accepted",
            previous.public()
        );
    }
    Ok(())
}

fn rotate(
    config: Option<PathBuf>,
    socket: Option<PathBuf>,
    wait: bool,
    timeout: Duration,
) -> Result<()> {
    let socket = super::socket_path(socket.as_deref(), config.as_deref())?;
    let response = protocol::request(&socket, &Request::Rotate, REQUEST_TIMEOUT)?;
    let Some(rotation) = response.rotation else {
        bail!("the agent's answer holds no rotation");
    };
    println!("{}", rotation.public_key);
    eprintln!(
        "rotated: the new key is in use and published; the previous key {} stays accepted until every peer has moved over",
        rotation.previous_public_key
    );
    if !wait {
        return Ok(());
    }
    let deadline = Instant::now() + timeout;
    loop {
        let status = protocol::status(&socket, REQUEST_TIMEOUT)?;
        if status.public_key != rotation.public_key {
            bail!(
                "the agent's key changed again (now {}) while waiting",
                status.public_key
            );
        }
        if status.previous_public_key.is_none() {
            eprintln!("rotation complete: no peer needs the previous key any more");
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the rotation is not complete after {}s (peers still using the previous key: see `meshward status`)",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
