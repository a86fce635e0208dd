//! Fixtures for meshward's integration tests.
//!
//! A [`Netns`] is a network namespace owned by one test: named
//! `mwt-<pid>-<n><role>` so parallel tests and processes never collide,
//! removed on drop (also when the test fails), and namespaces left by a
//! killed earlier run (their pid is dead) are removed on first use. Tests
//! put only addresses from 198.18.0.0/15 in them and never link them to the
//! host's interfaces.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

static COUNTER: AtomicU32 = AtomicU32::new(0);
static CLEAN_STALE: Once = Once::new();

/// Removes `mwt-<pid>-*` namespaces whose creating process is gone.
fn clean_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name.strip_prefix("mwt-").and_then(|r| r.split('-').next()) else {
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
    /// Creates a namespace with `lo` up. `role` is a short suffix that makes
    /// the name readable in `ip netns list` (e.g. "h" for a host, "p" for a pod).
    pub fn new(role: &str) -> Netns {
        CLEAN_STALE.call_once(clean_stale);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("mwt-{}-{n}{role}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns {
            name,
            deleted: false,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    pub fn path_str(&self) -> String {
        self.path().display().to_string()
    }

    /// `ip -n NAME ARGS...`, which must succeed; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut cmd = vec!["ip", "-n", &self.name];
        cmd.extend_from_slice(args);
        sh(&cmd)
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

    /// Like [`Netns::exec`] but the command must succeed; returns its output.
    pub fn must(&self, cmd: &[&str]) -> String {
        let (ok, out) = self.exec(cmd);
        assert!(ok, "{cmd:?} in {} failed: {out}", self.name);
        out
    }

    /// One ICMP echo with a 2 s deadline.
    pub fn ping(&self, ip: &str) -> bool {
        self.exec(&["ping", "-c", "1", "-W", "2", "-q", ip]).0
    }

    /// Runs `f` on a thread inside the namespace (for library calls that act
    /// on "the current" namespace).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(self.path()).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("setns");
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
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

/// Connects two namespaces with a veth pair and addresses both ends
/// (`addr` in CIDR notation, e.g. "198.18.0.1/24"); both ends come up.
pub fn veth(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    sh(&[
        "ip", "-n", &a.name, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ]);
    a.ip(&["addr", "add", a_addr, "dev", a_if]);
    b.ip(&["addr", "add", b_addr, "dev", b_if]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// Runs a command that must succeed; returns stdout.
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
