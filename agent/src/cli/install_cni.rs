//! `meshward install-cni`: puts `meshward-cni` into the node's CNI plugin
//! directory and writes the network configuration list the container
//! runtime reads (meshward-cni, then the chained `bandwidth` and `portmap`
//! plugins). The Helm chart runs it as the agent pod's init container, with
//! the host's directories mounted.
//!
//! The plugin needs this node's pod CIDR in its configuration, so the
//! command reads the agent's configuration file and asks the same datastore
//! the agent uses for the own Node's IPv4 pod CIDR (waiting for it,
//! bounded). The paths the conflist names (`agentSocket`, the IPAM
//! `stateDir`) come from that configuration and are used by the plugin on
//! the host: the chart mounts them at the same paths.
//!
//! Every file is written next to its destination and renamed over it, so a
//! runtime calling the plugin meanwhile sees the old file or the new one,
//! never half of one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ipnet::{IpNet, Ipv4Net};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{AgentArgs, Config};
use crate::datastore::{Cluster, Datastore, DatastoreSpec};

/// The plugin binary's name (its `type` in the conflist).
const PLUGIN: &str = "meshward-cni";
/// The CNI version of the conflist: what containerd 1.6+/CRI-O/podman speak.
pub const CNI_VERSION: &str = "1.0.0";
/// The network's name.
pub const NETWORK: &str = "meshward";

/// A plugin chained after meshward-cni.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Chained {
    /// Traffic shaping from the `kubernetes.io/{ingress,egress}-bandwidth` pod annotations
    Bandwidth,
    /// `hostPort`s
    Portmap,
}

impl Chained {
    fn binary(self) -> &'static str {
        match self {
            Chained::Bandwidth => "bandwidth",
            Chained::Portmap => "portmap",
        }
    }

    fn entry(self) -> Value {
        match self {
            Chained::Bandwidth => {
                json!({ "type": "bandwidth", "capabilities": { "bandwidth": true } })
            }
            Chained::Portmap => json!({
                "type": "portmap",
                "capabilities": { "portMappings": true },
                "snat": true
            }),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct InstallCniArgs {
    /// The agent's configuration file (the one `meshward agent` reads)
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Overrides the file's nodeName
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// Overrides the file's endpoint (ip or ip:port)
    #[arg(long, value_name = "IP[:PORT]")]
    endpoint: Option<String>,
    /// Overrides the file's datastore: dir:PATH or kubernetes
    #[arg(long, value_name = "dir:PATH|kubernetes")]
    datastore: Option<DatastoreSpec>,
    /// Where the runtime looks for CNI plugins
    #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
    /// Where the runtime looks for network configurations
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// The conflist's file name; runtimes use the first in lexical order
    #[arg(long, value_name = "NAME", default_value = "05-meshward.conflist")]
    conflist_name: String,
    /// The meshward-cni binary to install [default: next to this executable]
    #[arg(long, value_name = "FILE")]
    plugin: Option<PathBuf>,
    /// Plugins to chain after meshward-cni, in order (comma-separated)
    #[arg(long, value_enum, value_delimiter = ',', value_name = "PLUGIN,...")]
    chain: Vec<Chained>,
    /// Copy chained plugins missing from --bin-dir from here (e.g. /usr/lib/cni)
    #[arg(long, value_name = "DIR")]
    plugins_from: Option<PathBuf>,
    /// How long to wait for the own Node to have a pod CIDR
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    wait: Duration,
}

pub fn run(args: InstallCniArgs) -> Result<()> {
    let config = Config::load(&AgentArgs {
        config: args.config.clone(),
        datastore: args.datastore.clone(),
        node_name: args.node_name.clone(),
        endpoint: args.endpoint.clone(),
        check: false,
    })?;
    let conflist_name = valid_conflist_name(&args.conflist_name)?;
    if !config.mesh {
        // Policy only: another CNI addresses pods. A conflist left by an
        // earlier mesh-mode install would come first and keep taking pods.
        let target = args.conf_dir.join(conflist_name);
        println!("{}", remove_own_conflist(&target)?);
        return Ok(());
    }
    let plugin = locate_plugin(args.plugin.as_deref())?;
    // Checked before waiting for the Node, so a node missing them fails fast.
    let copies = chained_plugin_sources(&args)?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let pod_cidr = runtime.block_on(own_pod_cidr(&config, args.wait))?;

    let conflist = conflist(&config, pod_cidr, &args.chain);
    check_conflist(&conflist)?;

    let installed = args.bin_dir.join(PLUGIN);
    install_file(&plugin, &installed)?;
    println!(
        "installed {} (from {})",
        installed.display(),
        plugin.display()
    );
    for (source, target) in copies {
        install_file(&source, &target)?;
        println!("installed {} (from {})", target.display(), source.display());
    }
    let target = args.conf_dir.join(conflist_name);
    let mut text = serde_json::to_string_pretty(&conflist).context("encoding the conflist")?;
    text.push('\n');
    write_atomically(&target, text.as_bytes(), 0o644)?;
    println!(
        "wrote {} (node {}, pod CIDR {pod_cidr}, MTU {})",
        target.display(),
        config.node_name,
        config.mtu
    );
    Ok(())
}

/// The network configuration list for this node.
pub fn conflist(config: &Config, pod_cidr: Ipv4Net, chain: &[Chained]) -> Value {
    let meshward = json!({
        "type": PLUGIN,
        "podCIDR": pod_cidr.to_string(),
        // the mesh interface's MTU: pod packets to other nodes fit the tunnel
        "mtu": config.mtu,
        "stateDir": config.state_dir.join("ipam"),
        "agentSocket": config.socket_path,
        // ADD answers only once the pod's policy is in the kernel
        "agentWaitSeconds": config.cni_agent_wait.as_secs(),
    });
    let plugins: Vec<Value> = std::iter::once(meshward)
        .chain(chain.iter().map(|c| c.entry()))
        .collect();
    json!({ "cniVersion": CNI_VERSION, "name": NETWORK, "plugins": plugins })
}

/// Runs meshward-cni's own configuration parser on its entry, as libcni
/// hands it over (with the list's `cniVersion` and `name`).
fn check_conflist(conflist: &Value) -> Result<()> {
    let mut entry = conflist["plugins"][0].clone();
    entry["cniVersion"] = conflist["cniVersion"].clone();
    entry["name"] = conflist["name"].clone();
    let bytes = serde_json::to_vec(&entry).context("encoding the plugin configuration")?;
    meshward_cni::spec::NetConf::parse(&bytes)
        .map(drop)
        .map_err(|e| anyhow!("the generated meshward-cni configuration is refused: {e}"))
}

/// Deletes `target` if it is a conflist whose first plugin is meshward-cni;
/// says what it did. Anything else at that path is left alone.
fn remove_own_conflist(target: &Path) -> Result<String> {
    let text = match fs::read_to_string(target) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(format!(
                "mesh off (policy only): no meshward conflist at {}",
                target.display()
            ))
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", target.display())),
    };
    let ours =
        serde_json::from_str::<Value>(&text).is_ok_and(|list| list["plugins"][0]["type"] == PLUGIN);
    if !ours {
        return Ok(format!(
            "mesh off (policy only): {} is not meshward's conflist (its first plugin is not {PLUGIN}); left as it is",
            target.display()
        ));
    }
    fs::remove_file(target).with_context(|| format!("removing {}", target.display()))?;
    if let Some(dir) = target.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))?;
    }
    Ok(format!(
        "mesh off (policy only): removed {} left by mesh mode; the node's own CNI takes new pods",
        target.display()
    ))
}

fn valid_conflist_name(name: &str) -> Result<&str> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        bail!("--conflist-name {name:?}: want a plain file name such as 05-meshward.conflist");
    }
    if !name.ends_with(".conflist") {
        bail!("--conflist-name {name:?}: runtimes only read *.conflist files as lists");
    }
    Ok(name)
}

fn locate_plugin(explicit: Option<&Path>) -> Result<PathBuf> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .parent()
            .map(|dir| dir.join(PLUGIN))
            .ok_or_else(|| anyhow!("this executable has no directory"))?,
    };
    let executable = path
        .metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if !executable {
        bail!(
            "{}: no executable {PLUGIN} there (pass --plugin FILE)",
            path.display()
        );
    }
    Ok(path)
}

/// (source, target) for every chained plugin the bin dir lacks.
fn chained_plugin_sources(args: &InstallCniArgs) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut copies = Vec::new();
    for c in &args.chain {
        let target = args.bin_dir.join(c.binary());
        if target.exists() {
            continue;
        }
        let source = args.plugins_from.as_ref().map(|dir| dir.join(c.binary()));
        match source {
            Some(source) if source.is_file() => copies.push((source, target)),
            _ => bail!(
                "the chained plugin {} is neither in {}{}: install the CNI reference \
                 plugins on the node, or leave it out of the chain",
                c.binary(),
                args.bin_dir.display(),
                args.plugins_from
                    .as_ref()
                    .map(|d| format!(" nor in {}", d.display()))
                    .unwrap_or_default()
            ),
        }
    }
    Ok(copies)
}

/// The own Node's first IPv4 pod CIDR (sorted, as the agent picks it).
async fn own_pod_cidr(config: &Config, wait: Duration) -> Result<Ipv4Net> {
    let datastore = Datastore::start(&config.datastore)
        .await
        .with_context(|| format!("starting the datastore {}", config.datastore))?;
    let mut rx: watch::Receiver<Arc<Cluster>> = datastore.subscribe();
    let deadline = Instant::now() + wait;
    let name = &config.node_name;
    loop {
        let cidr = {
            let snapshot = rx.borrow_and_update();
            snapshot.node(name).and_then(|node| {
                node.pod_cidrs
                    .iter()
                    .filter_map(|c| match c {
                        IpNet::V4(n) => Some(*n),
                        IpNet::V6(_) => None,
                    })
                    .min()
            })
        };
        if let Some(cidr) = cidr {
            return Ok(cidr);
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => bail!("the datastore stopped while waiting for Node {name}"),
            Err(_) => bail!(
                "Node {name} has no IPv4 pod CIDR (spec.podCIDR) in {} after {}",
                config.datastore,
                humantime::format_duration(wait)
            ),
        }
    }
}

fn install_file(source: &Path, target: &Path) -> Result<()> {
    let bytes = fs::read(source).with_context(|| format!("reading {}", source.display()))?;
    write_atomically(target, &bytes, 0o755)
}

/// Writes `bytes` to a temporary file beside `target`, syncs it and
/// renames it over `target` (a running old binary keeps its inode).
fn write_atomically(target: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = target
        .parent()
        .ok_or_else(|| anyhow!("{}: no directory", target.display()))?;
    let file_name = target
        .file_name()
        .ok_or_else(|| anyhow!("{}: no file name", target.display()))?;
    let temp = dir.join(format!(
        ".{}.tmp{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(bytes)?;
        // the mode regardless of the umask
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&temp, target)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.with_context(|| format!("writing {}", target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    fn config(extra: &str) -> Config {
        Config::parse(
            &format!("nodeName: n1\ndatastore: kubernetes\nendpoint: 198.18.0.1\n{extra}"),
            Path::new("/etc/meshward/agent.yaml"),
            &Overrides::default(),
            || None,
        )
        .unwrap()
    }

    #[test]
    fn the_conflist_chains_in_order_and_the_plugin_accepts_its_entry() {
        let c = config("underlayMTU: 9001\nsocketPath: /run/mw/agent.sock\n");
        let cidr: Ipv4Net = "198.19.4.0/24".parse().unwrap();
        let list = conflist(&c, cidr, &[Chained::Bandwidth, Chained::Portmap]);
        let types: Vec<&str> = list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["meshward-cni", "bandwidth", "portmap"]);
        assert_eq!(list["cniVersion"], CNI_VERSION);
        check_conflist(&list).unwrap();

        let mut entry = list["plugins"][0].clone();
        entry["cniVersion"] = list["cniVersion"].clone();
        entry["name"] = list["name"].clone();
        let parsed = meshward_cni::spec::NetConf::parse(entry.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.require_pod_cidr().unwrap(), cidr);
        assert_eq!(parsed.pod_mtu(), c.mtu);
        assert_eq!(parsed.pod_mtu(), 9001 - 80);
        assert_eq!(parsed.agent_socket(), PathBuf::from("/run/mw/agent.sock"));
        assert_eq!(parsed.state_dir(), PathBuf::from("/var/lib/meshward/ipam"));
    }

    #[test]
    fn policy_only_removes_only_meshwards_own_conflist() {
        let dir = std::env::temp_dir().join(format!("mw-rm-conflist-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let target = dir.join("05-meshward.conflist");
        assert!(remove_own_conflist(&target)
            .unwrap()
            .contains("no meshward conflist"));

        let other = r#"{"cniVersion":"1.0.0","name":"aws","plugins":[{"type":"aws-cni"}]}"#;
        fs::write(&target, other).unwrap();
        assert!(remove_own_conflist(&target)
            .unwrap()
            .contains("left as it is"));
        assert_eq!(fs::read_to_string(&target).unwrap(), other);
        fs::write(&target, "not json").unwrap();
        assert!(remove_own_conflist(&target)
            .unwrap()
            .contains("left as it is"));

        let ours = conflist(&config(""), "198.19.4.0/24".parse().unwrap(), &[]);
        fs::write(&target, ours.to_string()).unwrap();
        assert!(remove_own_conflist(&target).unwrap().contains("removed"));
        assert!(!target.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_chain_is_a_list_of_one() {
        let list = conflist(&config(""), "198.19.4.0/24".parse().unwrap(), &[]);
        assert_eq!(list["plugins"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn conflist_names_are_plain_conflist_files() {
        assert!(valid_conflist_name("05-meshward.conflist").is_ok());
        for bad in [
            "",
            "../x.conflist",
            ".hidden.conflist",
            "a/b.conflist",
            "x.conf",
        ] {
            assert!(valid_conflist_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn atomic_writes_replace_and_set_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        write_atomically(&target, b"one", 0o644).unwrap();
        write_atomically(&target, b"two", 0o755).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");
        let mode = fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temporary files left behind");
        let e = write_atomically(&dir.path().join("missing/f"), b"x", 0o644).unwrap_err();
        assert!(format!("{e:#}").contains("missing/f"), "{e:#}");
    }
}
