//! The small commands around the agent: `meshward keys`, `status`, `observe`, `crd`,
//! `install-cni` and `agent --check`.

pub mod check;
pub mod crd;
pub mod install_cni;
pub mod keys;
pub mod observe;
pub mod status;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::config::{AgentArgs, Config, DEFAULT_SOCKET};

/// The agent's configuration file, as `meshward agent --config` reads it.
fn load_config(file: &Path) -> Result<Config> {
    Config::load(&AgentArgs {
        config: file.to_path_buf(),
        datastore: None,
        node_name: None,
        endpoint: None,
        check: false,
    })
    .context("reading the agent's configuration")
}

/// The control socket: `--socket`, else the config file's `socketPath`,
/// else the default.
fn socket_path(socket: Option<&Path>, config: Option<&Path>) -> Result<PathBuf> {
    Ok(match (socket, config) {
        (Some(socket), _) => socket.to_path_buf(),
        (None, Some(file)) => load_config(file)?.socket_path,
        (None, None) => PathBuf::from(DEFAULT_SOCKET),
    })
}
