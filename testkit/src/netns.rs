//! Network namespaces owned by a test.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use nix::sched::{setns, CloneFlags};
use serde_json::{json, Value};

use crate::cmd::{run, run_ok, sh, CMD_TIMEOUT};
use crate::fs::cleanup_stale;
use crate::{require_root, unique_name};

/// `ip netns add` mounts /run/netns on first use; serialise our adds and
/// deletes so two threads never race on that first mount.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// `ip netns add NAME`, which must succeed.
pub(crate) fn add_netns(name: &str) {
    let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    sh(&["ip", "netns", "add", name]);
}

/// `ip netns del NAME`; failures are reported, not fatal (drop paths).
pub(crate) fn delete_netns(name: &str) {
    let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    match run(
        Command::new("ip").args(["netns", "del", name]),
        b"",
        CMD_TIMEOUT,
    ) {
        Ok(r) if r.success() => {}
        Ok(r) => eprintln!("warning: ip netns del {name}: {r}"),
        Err(e) => eprintln!("warning: ip netns del {name}: {e}"),
    }
}

/// A network namespace that exists as long as this value does (or until
/// [`Netns::delete`]). No file descriptor of it is kept open in between, so
/// deleting it really destroys it (and the interfaces inside), as when a
/// container dies.
pub struct Netns {
    /// `mwt-<pid>-<n><role>`.
    pub name: String,
    deleted: bool,
}

impl Netns {
    /// Creates a namespace with `lo` up. `role` is a short suffix that makes
    /// the name readable in `ip netns list` (e.g. "h" for a host, "p" for a
    /// pod). Runs the stale cleanup once per process first.
    pub fn new(role: &str) -> Netns {
        require_root();
        cleanup_stale();
        let name = format!("{}{role}", unique_name());
        add_netns(&name);
        // From here on a failure deletes the namespace again (drop).
        let ns = Netns {
            name,
            deleted: false,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The name, as a `&str`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: what CNI_NETNS takes.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    pub fn path_str(&self) -> String {
        self.path().display().to_string()
    }

    fn open(&self) -> File {
        File::open(self.path())
            .unwrap_or_else(|e| panic!("open namespace {}: {e}", self.path_str()))
    }

    /// `ip -n NAME ARGS...`, which must succeed; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut cmd = vec!["ip", "-n", &self.name];
        cmd.extend_from_slice(args);
        sh(&cmd)
    }

    /// `ip -j -n NAME ARGS...` parsed as JSON (an empty output is `[]`).
    pub fn ip_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let out = self.ip(&full);
        if out.trim().is_empty() {
            return json!([]);
        }
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip {args:?}: {e}: {out}"))
    }

    /// Runs a command inside the namespace (`ip netns exec`), killed after
    /// [`CMD_TIMEOUT`]; returns (success, stdout+stderr).
    pub fn exec(&self, cmd: &[&str]) -> (bool, String) {
        let r = run(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(cmd),
            b"",
            CMD_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("run ip netns exec {cmd:?}: {e}"));
        let mut text = r.stdout;
        text.push_str(&r.stderr);
        if r.timed_out {
            text.push_str("\n(killed: timed out)");
        }
        (!r.timed_out && r.status.success(), text)
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

    /// A command that runs inside this namespace, for [`run`] and friends
    /// (stdin, separate stdout/stderr, own time limit). setns happens in
    /// the child before exec; the mount namespace stays the caller's, so
    /// /sys/fs/cgroup and /run/netns are the real ones, as podman and runc
    /// need.
    pub fn command<S: AsRef<OsStr>>(&self, program: S) -> Command {
        let file = self.open();
        let mut cmd = Command::new(program);
        // SAFETY: between fork and exec the closure only calls setns(2),
        // which is async-signal-safe; it owns `file`, so the fd stays open
        // for as long as the Command exists (and closes on exec).
        unsafe {
            cmd.pre_exec(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        cmd
    }

    /// Runs `f` on a short-lived thread that joined this namespace (for
    /// library calls that act on "the current" namespace; the caller's
    /// threads never move). Sockets created in `f` stay in it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.path(), f)
    }

    /// Names of the links of a given kind (`veth`, `ifb`, `bridge`, ...).
    pub fn links_of_type(&self, kind: &str) -> Vec<String> {
        self.ip_json(&["link", "show", "type", kind])
            .as_array()
            .map(|links| {
                links
                    .iter()
                    .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Kinds of the qdiscs on `dev` (`tc -j qdisc show dev DEV`), e.g.
    /// `tbf`, `ingress`.
    pub fn qdisc_kinds(&self, dev: &str) -> Vec<String> {
        let out = run_ok(
            self.command("tc").args(["-j", "qdisc", "show", "dev", dev]),
            CMD_TIMEOUT,
        )
        .stdout;
        let v: Value = serde_json::from_str(out.trim()).unwrap_or(json!([]));
        v.as_array()
            .map(|qs| {
                qs.iter()
                    .filter_map(|q| q["kind"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Reads a sysctl as seen inside the namespace, e.g.
    /// `net/ipv4/ip_forward` (/proc/sys/net follows the reader's netns).
    pub fn sysctl(&self, key: &str) -> String {
        let path = format!("/proc/sys/{key}");
        run_ok(self.command("cat").arg(path), CMD_TIMEOUT)
            .stdout
            .trim()
            .to_owned()
    }

    /// The MAC address of `dev`.
    pub fn mac(&self, dev: &str) -> String {
        self.ip_json(&["link", "show", dev])[0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("no MAC address for {dev} in {}", self.name))
            .to_string()
    }

    /// A permanent IPv6 neighbour entry (`ip` is at `mac` on `dev`): right
    /// after links come up neighbour discovery takes seconds (the
    /// link-local addresses are still tentative).
    pub fn neigh6_permanent(&self, ip: &str, mac: &str, dev: &str) {
        self.ip(&[
            "-6",
            "neigh",
            "replace",
            ip,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }

    /// Deletes the namespace now (e.g. to simulate a container that died).
    pub fn delete(&mut self) {
        if !self.deleted {
            delete_netns(&self.name);
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

/// Runs `f` on a short-lived thread that joined the network namespace at
/// `path` (e.g. `/run/netns/NAME`, also one the test does not own), waits
/// for it and returns its result; a panic in `f` is the caller's. Sockets
/// opened inside stay in that namespace and may be used from any thread.
pub fn in_netns<T: Send>(path: &std::path::Path, f: impl FnOnce() -> T + Send) -> T {
    let file = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
            drop(file);
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn namespace_lives_as_long_as_its_guard() {
        let ns = Netns::new("k");
        assert!(ns.name.ends_with('k'));
        assert_eq!(ns.name(), ns.name);
        assert_eq!(
            crate::owner_pid(ns.name()),
            Some(std::process::id()),
            "{}",
            ns.name
        );
        assert!(ns.path().exists());
        assert_eq!(ns.path_str(), format!("/run/netns/{}", ns.name));
        assert!(sh(&["ip", "netns", "list"]).contains(&ns.name));
        let lo = ns.ip_json(&["link", "show", "lo"]);
        assert_eq!(lo[0]["operstate"], "UNKNOWN", "lo is up: {lo}");
        let path = ns.path();
        drop(ns);
        assert!(!path.exists());
    }

    #[test]
    fn delete_is_early_and_idempotent() {
        let mut ns = Netns::new("d");
        let path = ns.path();
        ns.delete();
        assert!(!path.exists());
        ns.delete();
    }

    #[test]
    fn a_failing_test_still_removes_its_namespace() {
        let path = std::panic::catch_unwind(|| {
            let ns = Netns::new("f");
            let path = ns.path();
            assert!(path.exists());
            std::panic::panic_any(path);
        })
        .unwrap_err();
        let path = path.downcast::<PathBuf>().unwrap();
        assert!(!Path::new(&*path).exists());
    }

    #[test]
    fn commands_and_threads_run_inside() {
        let ns = Netns::new("c");
        ns.ip(&["addr", "add", "198.18.255.1/32", "dev", "lo"]);
        assert!(ns.links_of_type("veth").is_empty());
        ns.ip(&[
            "link", "add", "mwtv0", "type", "veth", "peer", "name", "mwtv1",
        ]);

        let (ok, out) = ns.exec(&["ip", "-o", "addr", "show", "dev", "lo"]);
        assert!(ok && out.contains("198.18.255.1/32"), "{out}");
        assert!(ns.must(&["ip", "-o", "link"]).contains("mwtv0"));
        let (ok, out) = ns.exec(&["ip", "link", "show", "dev", "mwt-nothing"]);
        assert!(!ok && !out.is_empty(), "{out}");

        let r = run_ok(ns.command("ip").args(["-o", "addr"]), CMD_TIMEOUT);
        assert!(r.stdout.contains("198.18.255.1/32"), "{r}");

        // Only the thread moves (/proc/self/net is the main thread's view).
        let net_dev = || std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
        let links = ns.run(net_dev);
        assert!(links.contains("mwtv0"), "{links}");
        assert!(!net_dev().contains("mwtv0"));

        let mut veths = ns.links_of_type("veth");
        veths.sort();
        assert_eq!(veths, ["mwtv0", "mwtv1"]);
        assert_eq!(ns.qdisc_kinds("lo"), vec!["noqueue".to_string()]);
        assert!(ns.ping("198.18.255.1"));

        assert_eq!(ns.sysctl("net/ipv4/ip_forward"), "0");
        ns.must(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        assert_eq!(ns.sysctl("net/ipv4/ip_forward"), "1");
    }

    #[test]
    fn veth_links_two_namespaces() {
        let a = Netns::new("a");
        let b = Netns::new("b");
        veth(&a, "eth0", "198.18.254.1/30", &b, "eth0", "198.18.254.2/30");
        assert!(a.ping("198.18.254.2"));
        assert!(b.ping("198.18.254.1"));
        assert_eq!(a.links_of_type("veth"), vec!["eth0".to_string()]);
    }
}
