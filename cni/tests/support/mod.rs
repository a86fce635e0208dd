//! Test fixtures: a node namespace with its own IPAM directory, and the real
//! `meshward-cni` binary run exactly as a runtime runs it. Namespaces come
//! from `meshward-testkit` (owned by the test, removed on drop).
#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

pub const PLUGIN: &str = env!("CARGO_BIN_EXE_meshward-cni");

pub use meshward_testkit::{sh, Netns};

/// A node: the namespace the plugin runs in (the runtime's "host"), with its
/// own address on lo so pods can reach it, and a private IPAM directory.
pub struct Node {
    pub ns: Netns,
    pub state: tempfile::TempDir,
    pub address: String,
}

impl Node {
    pub fn new(address: &str) -> Node {
        let ns = Netns::new("h");
        sh(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            "lo",
        ]);
        Node {
            ns,
            state: tempfile::tempdir().expect("tempdir"),
            address: address.to_string(),
        }
    }

    /// A plugin configuration for this node.
    pub fn conf(&self, version: &str, pod_cidr: &str) -> Value {
        serde_json::json!({
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
        sh(&["ip", "-n", &self.ns.name, "-o", "link", "show"])
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

pub fn attachment_env<'a>(
    command: &'a str,
    container: &'a str,
    netns: Option<&'a str>,
) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
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
/// and `stdin`, inside namespace `ns` if given.
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
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn meshward-cni");
    let mut input = child.stdin.take().expect("stdin");
    // The plugin may exit before reading everything (e.g. on bad env).
    let _ = input.write_all(stdin);
    drop(input);
    let out = child.wait_with_output().expect("wait for meshward-cni");
    Outcome {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}
