//! Test fixtures: network namespaces the test owns, and the real
//! `meshward-cni` binary run exactly as a runtime runs it.
//!
//! Namespaces are named `mwt-<pid>-<n>`, removed on drop (also when a test
//! fails), and any left by a killed earlier run (dead pid) are removed on
//! first use. Addresses come only from 198.18.0.0/15.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

use serde_json::Value;

pub const PLUGIN: &str = env!("CARGO_BIN_EXE_meshward-cni");

static COUNTER: AtomicU32 = AtomicU32::new(0);
static CLEAN_STALE: Once = Once::new();

/// Removes `mwt-<pid>-*` namespaces whose creating process is gone.
fn clean_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix("mwt-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next() else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// A network namespace that exists as long as this value does.
pub struct Netns {
    pub name: String,
    deleted: bool,
}

impl Netns {
    pub fn new(role: &str) -> Netns {
        CLEAN_STALE.call_once(clean_stale);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("mwt-{}-{n}{role}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns {
            name,
            deleted: false,
        }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    pub fn path_str(&self) -> String {
        self.path().display().to_string()
    }

    /// Runs a command inside the namespace; returns (success, stdout+stderr).
    pub fn exec(&self, cmd: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .expect("run ip netns exec");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    pub fn ping(&self, ip: &str) -> bool {
        self.exec(&["ping", "-c", "1", "-W", "2", "-q", ip]).0
    }

    /// Deletes the namespace now (e.g. to simulate a container that died).
    pub fn delete(&mut self) {
        if !self.deleted {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
            self.deleted = true;
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.delete();
    }
}

/// Runs a command that must succeed.
pub fn sh(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

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
