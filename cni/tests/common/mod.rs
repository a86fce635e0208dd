//! The CNI helpers shared by every cni test (commands.rs, chain.rs,
//! podman.rs) and the add/del benchmark (benches/add_del.rs includes this
//! file by path). Everything generic (namespaces, commands with time
//! limits, temp dirs, stale cleanup, http_get) lives in meshward-testkit.
//!
//! - [`Node`] and [`run_plugin`]: the real meshward-cni binary run exactly
//!   as a runtime runs it (exact environment, config on stdin) inside a
//!   node namespace with its own IPAM directory; [`Outcome`] checks results
//!   and error objects.
//! - [`PodPlugin`]: which plugin creates the pod interface (meshward-cni, or
//!   Debian's bridge as a baseline).
//! - [`exec_plugin`] and [`Chain`]: run CNI plugin binaries the way libcni
//!   does (environment, stdin config, prevResult, runtimeConfig
//!   capabilities, ADD in order, DEL in reverse).
//!
//! Rules kept by everything here: work happens only in namespaces the test
//! creates; addresses come only from 198.18.0.0/15; nothing is connected to
//! the host's real interfaces; every wait is bounded in time.
#![allow(dead_code)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshward_testkit::{run, Netns, Run, TempDir, CMD_TIMEOUT};
use serde_json::{json, Map, Value};

/// The meshward-cni binary cargo built for this test or bench.
pub const PLUGIN: &str = env!("CARGO_BIN_EXE_meshward-cni");

/// Directory of Debian's reference CNI plugins (containernetworking-plugins).
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";

/// Path of the meshward-cni binary cargo built for this test or bench.
pub fn meshward_cni_bin() -> PathBuf {
    PathBuf::from(PLUGIN)
}

// ---------------------------------------------------------------------------
// meshward-cni run as a runtime runs it, on a node namespace
// ---------------------------------------------------------------------------

/// A node: the namespace the plugin runs in (the runtime's "host"), with its
/// own address on lo so pods can reach it, and a private IPAM directory.
pub struct Node {
    pub ns: Netns,
    pub state: TempDir,
    pub address: String,
}

impl Node {
    pub fn new(address: &str) -> Node {
        let ns = Netns::new("h");
        ns.ip(&["addr", "add", &format!("{address}/32"), "dev", "lo"]);
        Node {
            ns,
            state: TempDir::new(),
            address: address.to_string(),
        }
    }

    /// A plugin configuration for this node.
    pub fn conf(&self, version: &str, pod_cidr: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "meshward",
            "type": "meshward-cni",
            "podCIDR": pod_cidr,
            "stateDir": self.state.path(),
            "agentSocket": self.state.path().join("agent.sock"),
        })
    }

    /// The IPAM state file as JSON (empty allocations when absent).
    pub fn allocations(&self) -> Vec<Value> {
        let path = self.state.path().join("meshward.json");
        match std::fs::read(&path) {
            Ok(bytes) => {
                let v: Value = serde_json::from_slice(&bytes).expect("state is JSON");
                v["allocations"].as_array().cloned().unwrap_or_default()
            }
            Err(_) => Vec::new(),
        }
    }

    pub fn host_links(&self) -> String {
        self.ns.ip(&["-o", "link", "show"])
    }

    /// Runs the plugin inside this node's namespace.
    pub fn cni(&self, env: &[(&str, &str)], stdin: &[u8]) -> Outcome {
        run_plugin(Some(&self.ns.name), env, stdin)
    }

    pub fn add(&self, conf: &Value, container: &str, pod: &Netns) -> Outcome {
        self.cni(
            &attachment_env("ADD", container, Some(&pod.path_str())),
            conf.to_string().as_bytes(),
        )
    }

    pub fn del(&self, conf: &Value, container: &str, netns: Option<&str>) -> Outcome {
        self.cni(
            &attachment_env("DEL", container, netns),
            conf.to_string().as_bytes(),
        )
    }
}

/// The CNI_* environment of one call for container `container` (ifname
/// eth0, pod "web" in namespace "default").
pub fn attachment_env<'a>(
    command: &'a str,
    container: &'a str,
    netns: Option<&'a str>,
) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", DEBIAN_CNI_DIR),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web",
        ),
    ];
    if let Some(ns) = netns {
        env.push(("CNI_NETNS", ns));
    }
    env
}

/// What one plugin run produced.
#[derive(Debug)]
pub struct Outcome {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    /// Asserts success and returns the printed result.
    pub fn ok(&self) -> Value {
        assert!(
            self.success,
            "plugin failed: {} {}",
            self.stdout, self.stderr
        );
        self.json()
    }

    /// Asserts failure with `code` and returns the error object.
    pub fn err(&self, code: u64) -> Value {
        assert!(
            !self.success,
            "plugin succeeded unexpectedly: {}",
            self.stdout
        );
        let v = self.json();
        assert_eq!(v["code"], code, "unexpected error: {v}");
        assert!(
            v["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "error without msg: {v}"
        );
        v
    }
}

/// Runs the plugin binary with exactly `env` (nothing inherited but PATH)
/// and `stdin`, inside namespace `ns` (`ip netns exec`) if given; killed
/// after [`CMD_TIMEOUT`].
pub fn run_plugin(ns: Option<&str>, env: &[(&str, &str)], stdin: &[u8]) -> Outcome {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, PLUGIN]);
            c
        }
        None => Command::new(PLUGIN),
    };
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied());
    let r = run(&mut cmd, stdin, CMD_TIMEOUT).expect("spawn meshward-cni");
    assert!(!r.timed_out, "meshward-cni did not finish: {r}");
    Outcome {
        success: r.status.success(),
        stdout: r.stdout,
        stderr: r.stderr,
    }
}

// ---------------------------------------------------------------------------
// The pod network plugin under test
// ---------------------------------------------------------------------------

/// Which plugin creates the pod interface, chosen in one place: meshward-cni
/// by default; `MESHWARD_TEST_PLUGIN=bridge` runs the same runtime tests
/// against Debian's bridge + host-local (a baseline that tells a runtime or
/// environment problem from a plugin bug).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodPlugin {
    Meshward,
    Bridge,
}

impl PodPlugin {
    pub fn under_test() -> PodPlugin {
        match std::env::var("MESHWARD_TEST_PLUGIN").as_deref() {
            Ok("bridge") => PodPlugin::Bridge,
            Ok("meshward") | Ok("") | Err(_) => PodPlugin::Meshward,
            Ok(other) => panic!("MESHWARD_TEST_PLUGIN={other}: expected meshward or bridge"),
        }
    }

    /// The `type` of the plugin in a conflist.
    pub fn type_name(self) -> &'static str {
        match self {
            PodPlugin::Meshward => "meshward-cni",
            PodPlugin::Bridge => "bridge",
        }
    }

    /// The plugin's entry in a conflist: pod CIDR `cidr`, IPAM state below
    /// `state_dir`, and (bridge) the bridge device `bridge`.
    pub fn config(self, cidr: &str, state_dir: &Path, bridge: &str) -> Value {
        match self {
            PodPlugin::Meshward => json!({
                "type": "meshward-cni",
                "podCIDR": cidr,
                "stateDir": state_dir,
                // Explicit, private and absent: no notification ever reaches
                // an agent (or lab) running on this machine.
                "agentSocket": state_dir.join("no-agent.sock"),
            }),
            PodPlugin::Bridge => json!({
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": state_dir,
                    "ranges": [[{ "subnet": cidr }]],
                    "routes": [{ "dst": "0.0.0.0/0" }]
                }
            }),
        }
    }

    /// Gateway the pod's default route uses.
    pub fn gateway(self, cidr: &str) -> String {
        match self {
            PodPlugin::Meshward => "169.254.1.1".to_owned(),
            PodPlugin::Bridge => {
                let net: ipnet::Ipv4Net = cidr.parse().expect("IPv4 CIDR");
                net.hosts().next().expect("a host address").to_string()
            }
        }
    }

    /// The host-side veth name, when the plugin fixes it (contract: "mw" +
    /// 11 hex chars of sha256("CONTAINERID/IFNAME")).
    pub fn host_veth(self, container_id: &str, ifname: &str) -> Option<String> {
        match self {
            PodPlugin::Meshward => {
                use sha2::{Digest, Sha256};
                let digest = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
                let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                Some(format!("mw{}", &hex[..11]))
            }
            PodPlugin::Bridge => None,
        }
    }

    /// Directories for CNI_PATH / cni_plugin_dirs: the one holding the built
    /// meshward-cni, then Debian's.
    pub fn cni_path() -> Vec<PathBuf> {
        let bin = meshward_cni_bin();
        vec![
            bin.parent().expect("binary dir").to_path_buf(),
            PathBuf::from(DEBIAN_CNI_DIR),
        ]
    }
}

// ---------------------------------------------------------------------------
// CNI plugin execution (what libcni does)
// ---------------------------------------------------------------------------

/// The per-attachment part of a CNI call.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    /// CNI_ARGS pairs, e.g. K8S_POD_NAMESPACE.
    pub args: Vec<(String, String)>,
}

impl Attachment {
    pub fn new(container_id: &str, netns: impl AsRef<Path>) -> Attachment {
        Attachment {
            container_id: container_id.to_owned(),
            netns: netns.as_ref().to_path_buf(),
            ifname: "eth0".to_owned(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), "default".into()),
                ("K8S_POD_NAME".into(), container_id.to_owned()),
            ],
        }
    }

    fn cni_args(&self) -> String {
        self.args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// A failed plugin call, with everything needed to reproduce it.
#[derive(Debug)]
pub struct CniError {
    pub plugin: String,
    pub command: String,
    pub config: Value,
    pub run: Option<Box<Run>>,
    pub detail: String,
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "CNI {} of {} failed: {}",
            self.command, self.plugin, self.detail
        )?;
        writeln!(f, "config: {}", self.config)?;
        if let Some(r) = &self.run {
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

/// A successful plugin call.
#[derive(Debug)]
pub struct CniOk {
    /// The parsed result (ADD) or `None` when the plugin printed nothing.
    pub result: Option<Value>,
    pub elapsed: Duration,
}

/// Finds `type` in the CNI_PATH directories, as libcni's FindInPath does.
pub fn find_plugin(kind: &str, cni_path: &[PathBuf]) -> Option<PathBuf> {
    cni_path.iter().map(|d| d.join(kind)).find(|p| p.is_file())
}

/// Runs one plugin binary once: `command` (ADD, DEL, CHECK, VERSION), the
/// attachment in the environment, `config` on stdin; the process joins
/// `host` first (the namespace acting as the node).
pub fn exec_plugin(
    host: &Netns,
    bin: &Path,
    command: &str,
    att: &Attachment,
    config: &Value,
    cni_path: &[PathBuf],
) -> Result<CniOk, CniError> {
    let err = |detail: String, run: Option<Run>| CniError {
        run: run.map(Box::new),
        plugin: bin.display().to_string(),
        command: command.to_owned(),
        config: config.clone(),
        detail,
    };
    let path = std::env::join_paths(cni_path).map_err(|e| err(e.to_string(), None))?;
    let mut cmd = host.command(bin);
    cmd.env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        )
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &att.container_id)
        .env("CNI_NETNS", &att.netns)
        .env("CNI_IFNAME", &att.ifname)
        .env("CNI_ARGS", att.cni_args())
        .env("CNI_PATH", path);
    let stdin = serde_json::to_vec(config).expect("serialise config");
    let r = run(&mut cmd, &stdin, CMD_TIMEOUT).map_err(|e| err(format!("spawn: {e}"), None))?;
    if !r.success() {
        let detail = match serde_json::from_str::<Value>(r.stdout.trim()) {
            Ok(v) if v.get("code").is_some() => format!(
                "error code {} msg {:?} details {:?}",
                v["code"], v["msg"], v["details"]
            ),
            _ => "no CNI error object on stdout".to_owned(),
        };
        return Err(err(detail, Some(r)));
    }
    let out = r.stdout.trim();
    let result = if out.is_empty() {
        None
    } else {
        match serde_json::from_str(out) {
            Ok(v) => Some(v),
            Err(e) => return Err(err(format!("stdout is not JSON: {e}"), Some(r))),
        }
    };
    Ok(CniOk {
        result,
        elapsed: r.elapsed,
    })
}

/// A conflist driven like libcni's AddNetworkList / DelNetworkList /
/// CheckNetworkList.
pub struct Chain {
    pub conflist: Value,
    pub cni_path: Vec<PathBuf>,
    /// Runtime values for capabilities (`bandwidth`, `portMappings`, ...).
    pub runtime_config: Value,
}

impl Chain {
    pub fn new(conflist: Value, cni_path: Vec<PathBuf>, runtime_config: Value) -> Chain {
        Chain {
            conflist,
            cni_path,
            runtime_config,
        }
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .expect("conflist has plugins")
    }

    /// libcni's buildOneConfig: the plugin's own keys, plus the list's name
    /// and cniVersion, prevResult when there is one, and runtimeConfig with
    /// only the capabilities this plugin declares.
    pub fn plugin_config(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut conf: Map<String, Value> = plugin.as_object().cloned().expect("plugin object");
        conf.insert("name".into(), self.conflist["name"].clone());
        conf.insert("cniVersion".into(), self.conflist["cniVersion"].clone());
        if let Some(p) = prev {
            conf.insert("prevResult".into(), p.clone());
        }
        let mut rc = Map::new();
        if let Some(caps) = plugin["capabilities"].as_object() {
            for (cap, on) in caps {
                if on.as_bool() == Some(true) {
                    if let Some(v) = self.runtime_config.get(cap) {
                        rc.insert(cap.clone(), v.clone());
                    }
                }
            }
        }
        if !rc.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
        Value::Object(conf)
    }

    fn bin(&self, plugin: &Value, config: &Value, command: &str) -> Result<PathBuf, CniError> {
        let kind = plugin["type"].as_str().unwrap_or_default();
        find_plugin(kind, &self.cni_path).ok_or_else(|| CniError {
            plugin: kind.to_owned(),
            command: command.to_owned(),
            config: config.clone(),
            run: None,
            detail: format!("plugin {kind:?} not found in {:?}", self.cni_path),
        })
    }

    /// ADD through every plugin in order, each getting the previous result
    /// as prevResult; returns every plugin's result (the last one is what
    /// the runtime gets).
    pub fn add_all(&self, host: &Netns, att: &Attachment) -> Result<Vec<Value>, CniError> {
        let mut results: Vec<Value> = Vec::new();
        for plugin in self.plugins() {
            let conf = self.plugin_config(&plugin, results.last());
            let bin = self.bin(&plugin, &conf, "ADD")?;
            let ok = exec_plugin(host, &bin, "ADD", att, &conf, &self.cni_path)?;
            results.push(ok.result.ok_or_else(|| CniError {
                plugin: bin.display().to_string(),
                command: "ADD".into(),
                config: conf.clone(),
                run: None,
                detail: "ADD printed no result".into(),
            })?);
        }
        assert!(!results.is_empty(), "conflist has no plugins");
        Ok(results)
    }

    /// ADD through the chain; returns the final result.
    pub fn add(&self, host: &Netns, att: &Attachment) -> Result<Value, CniError> {
        Ok(self
            .add_all(host, att)?
            .pop()
            .expect("one result per plugin"))
    }

    /// DEL through every plugin in reverse order, each getting the cached
    /// ADD result (`prev`) as prevResult, as libcni does.
    pub fn del(
        &self,
        host: &Netns,
        att: &Attachment,
        prev: Option<&Value>,
    ) -> Result<(), CniError> {
        for plugin in self.plugins().iter().rev() {
            let conf = self.plugin_config(plugin, prev);
            let bin = self.bin(plugin, &conf, "DEL")?;
            exec_plugin(host, &bin, "DEL", att, &conf, &self.cni_path)?;
        }
        Ok(())
    }

    /// CHECK through every plugin in order with the cached ADD result.
    pub fn check(&self, host: &Netns, att: &Attachment, prev: &Value) -> Result<(), CniError> {
        for plugin in self.plugins() {
            let conf = self.plugin_config(&plugin, Some(prev));
            let bin = self.bin(&plugin, &conf, "CHECK")?;
            exec_plugin(host, &bin, "CHECK", att, &conf, &self.cni_path)?;
        }
        Ok(())
    }
}
