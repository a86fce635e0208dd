//! Calling the real `meshward-cni` binary exactly as a container runtime
//! does: CNI_* environment, network config on stdin, the plugin process
//! inside the node's network namespace, the result (or the spec's error
//! object) on stdout.

use std::env;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ipnet::Ipv4Net;
use serde::Deserialize;
use serde_json::{json, Value};

/// The plugin binary's name.
pub const BINARY: &str = "meshward-cni";
/// The CNI spec version the lab speaks.
pub const CNI_VERSION: &str = "1.0.0";
/// The network name in the config.
pub const NETWORK_NAME: &str = "meshward";
/// How long one plugin call may take before it is killed.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Finds the plugin: `explicit` if given, else `meshward-cni` next to this
/// executable, else on PATH.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return if is_executable(path) {
            path.canonicalize()
                .with_context(|| format!("resolving --cni-bin {}", path.display()))
        } else {
            Err(anyhow!(
                "--cni-bin {}: no executable file there",
                path.display()
            ))
        };
    }
    let beside = env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(BINARY)));
    let on_path = env::var_os("PATH")
        .into_iter()
        .flat_map(|p| env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(BINARY));
    beside
        .into_iter()
        .chain(on_path)
        .find(|p| is_executable(p))
        .and_then(|p| p.canonicalize().ok())
        .ok_or_else(|| {
            anyhow!(
                "cannot find the {BINARY} binary next to this executable or on PATH: build it (`cargo build --workspace`) or pass --cni-bin PATH"
            )
        })
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The network configuration a node's runtime passes to the plugin.
pub fn network_config(pod_cidr: Ipv4Net, ipam_dir: &Path, agent_socket: &Path) -> Value {
    json!({
        "cniVersion": CNI_VERSION,
        "name": NETWORK_NAME,
        "type": BINARY,
        "podCIDR": pod_cidr.to_string(),
        "stateDir": ipam_dir,
        "agentSocket": agent_socket,
    })
}

/// One CNI ADD call.
pub struct Add<'a> {
    pub plugin: &'a Path,
    /// The namespace the plugin runs in (the node's, as the runtime's host).
    pub host_netns: &'a File,
    pub container_id: &'a str,
    pub netns_path: &'a Path,
    pub ifname: &'a str,
    pub pod_namespace: &'a str,
    pub pod_name: &'a str,
    pub config: &'a Value,
}

/// What the lab keeps from an ADD result.
pub struct Added {
    pub address: Ipv4Net,
    pub result: Value,
}

/// The spec's error object.
#[derive(Deserialize)]
struct CniError {
    code: Option<u64>,
    msg: Option<String>,
    details: Option<String>,
}

impl Add<'_> {
    pub fn run(&self) -> Result<Added> {
        let config = serde_json::to_vec(self.config).context("encoding CNI config")?;
        let output = self.spawn()?.finish(&config)?;
        let what = format!("{BINARY} ADD for pod {}", self.pod_name);
        if !output.status.success() {
            bail!(
                "{what} failed ({}): {}",
                describe(output.status),
                explain(&output)
            );
        }
        let result: Value = serde_json::from_slice(&output.stdout)
            .map_err(|e| anyhow!("{what}: result is not JSON ({e}): {}", explain(&output)))?;
        let address = result
            .pointer("/ips/0/address")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("{what}: result has no ips[0].address: {result}"))?;
        let address = address
            .parse::<Ipv4Net>()
            .map_err(|e| anyhow!("{what}: ips[0].address {address:?} is not an IPv4 CIDR: {e}"))?;
        Ok(Added { address, result })
    }

    fn spawn(&self) -> Result<Running> {
        let dir = self.plugin.parent().unwrap_or(Path::new("/"));
        let mut command = Command::new(self.plugin);
        command
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", self.container_id)
            .env("CNI_NETNS", self.netns_path)
            .env("CNI_IFNAME", self.ifname)
            .env("CNI_PATH", dir)
            .env(
                "CNI_ARGS",
                format!(
                    "K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                    self.pod_namespace, self.pod_name
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let netns = self.host_netns.as_raw_fd();
        // SAFETY: only setns(2), which is async-signal-safe, runs between
        // fork and exec; the fd stays open in the parent until spawn returns.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(netns, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("running {}", self.plugin.display()))?;
        Ok(Running { child })
    }
}

struct Output {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

struct Running {
    child: Child,
}

impl Running {
    /// Feeds `stdin`, collects stdout and stderr, and waits (killing the
    /// plugin after TIMEOUT).
    fn finish(mut self, stdin: &[u8]) -> Result<Output> {
        let read = |pipe: Option<Box<dyn Read + Send>>| {
            thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut buf);
                }
                buf
            })
        };
        let stdout = read(self.child.stdout.take().map(|p| Box::new(p) as _));
        let stderr = read(self.child.stderr.take().map(|p| Box::new(p) as _));
        if let Some(mut pipe) = self.child.stdin.take() {
            // A plugin that fails early may not read its config: not our error.
            let _ = pipe.write_all(stdin);
        }
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(status) = self
                .child
                .try_wait()
                .context("waiting for the CNI plugin")?
            {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "the CNI plugin did not finish within {}s and was killed",
                    TIMEOUT.as_secs()
                );
            }
            thread::sleep(Duration::from_millis(5));
        };
        Ok(Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        })
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// The plugin's error object (code, msg, details), or its raw output, plus
/// whatever it wrote to stderr.
fn explain(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut text = match serde_json::from_slice::<CniError>(&output.stdout) {
        Ok(CniError { code, msg, details }) if msg.is_some() || code.is_some() => {
            let mut text = format!("CNI error {}", code.map_or("?".into(), |c| c.to_string()));
            if let Some(msg) = msg {
                text += &format!(": {msg}");
            }
            if let Some(details) = details.filter(|d| !d.is_empty()) {
                text += &format!(" ({details})");
            }
            text
        }
        _ if stdout.trim().is_empty() => "no output on stdout".to_string(),
        _ => format!("stdout: {}", stdout.trim()),
    };
    if !stderr.trim().is_empty() {
        text += &format!("; stderr: {}", stderr.trim());
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(code: i32, stdout: &str, stderr: &str) -> Output {
        Output {
            status: ExitStatus::from_raw(code << 8),
            stdout: stdout.into(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn explains_the_cni_error_object() {
        let out = output(
            1,
            r#"{"cniVersion":"1.0.0","code":7,"msg":"invalid podCIDR","details":"198.19.1.0/33"}"#,
            "",
        );
        assert_eq!(
            explain(&out),
            "CNI error 7: invalid podCIDR (198.19.1.0/33)"
        );
        assert_eq!(describe(out.status), "exit code 1");
    }

    #[test]
    fn explains_raw_output_and_stderr() {
        assert_eq!(
            explain(&output(2, "", "boom\n")),
            "no output on stdout; stderr: boom"
        );
        assert_eq!(explain(&output(2, "oops", "")), "stdout: oops");
    }

    #[test]
    fn config_has_what_the_contract_asks() {
        let config = network_config(
            "198.19.3.0/24".parse().unwrap(),
            Path::new("/run/meshward-lab/x/node3/ipam"),
            Path::new("/run/meshward-lab/x/node3/agent.sock"),
        );
        assert_eq!(config["cniVersion"], "1.0.0");
        assert_eq!(config["name"], "meshward");
        assert_eq!(config["type"], "meshward-cni");
        assert_eq!(config["podCIDR"], "198.19.3.0/24");
        assert_eq!(config["stateDir"], "/run/meshward-lab/x/node3/ipam");
    }
}
