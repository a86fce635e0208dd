//! Shared helpers for the runtime-facing tests (podman.rs, chain.rs) and the
//! add/del benchmark (benches/add_del.rs includes this file by path).
//!
//! - [`Netns`]: a network namespace created for one test (`mwt-<pid>-<n>`)
//!   and deleted when the guard drops, also when the test fails.
//! - [`cleanup_stale`]: removes `mwt-*` namespaces and temp dirs left behind
//!   by test processes that are gone (killed before their guards ran).
//! - [`run`]: runs a command with stdin, a hard time limit and captured
//!   output; [`Netns::command`] places a command inside a namespace.
//! - [`exec_plugin`] and [`Chain`]: run CNI plugin binaries the way libcni
//!   does (environment, stdin config, prevResult, runtimeConfig
//!   capabilities, ADD in order, DEL in reverse).
//!
//! Rules kept by everything here: work happens only in namespaces the test
//! creates; addresses come only from 198.18.0.0/15; nothing is connected to
//! the host's real interfaces; every wait is bounded in time.
#![allow(dead_code)]

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// Prefix of every namespace and temp dir these helpers create (as
/// `mwt-<pid>-<n>`, the scheme meshward-testkit shares); the stale cleanup
/// only ever looks at names with it.
pub const PREFIX: &str = "mwt";

/// Directory of Debian's reference CNI plugins (containernetworking-plugins).
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";

/// Default limit for one external command (ip, tc, iptables-save, a plugin).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique per test process and call: `mwt-<pid>-<n>`.
pub fn unique_name() -> String {
    format!(
        "{PREFIX}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// The tests need root (netns, veth, podman). Fails loudly when not root so
/// CI can never pass by skipping.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests create network namespaces and must run as root"
    );
}

/// Path of the meshward-cni binary cargo built for this test or bench.
pub fn meshward_cni_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meshward-cni"))
}

// ---------------------------------------------------------------------------
// Running commands with a time limit
// ---------------------------------------------------------------------------

/// Outcome of [`run`].
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// From spawn to exit (not including reading leftover output).
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl Run {
    pub fn success(&self) -> bool {
        self.status.success() && !self.timed_out
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "status {}{} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            if self.timed_out {
                " (killed: timed out)"
            } else {
                ""
            },
            self.elapsed,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Runs `cmd` with `stdin` as its input and kills it (SIGKILL, by its own
/// pid) when it is still running after `timeout`. The child is waited for
/// without being reaped first, so the watchdog can never signal a recycled
/// pid. Output left open by grandchildren (daemons such as conmon) is read
/// for at most two more seconds after the child exits.
pub fn run(cmd: &mut Command, stdin: &[u8], timeout: Duration) -> std::io::Result<Run> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let pid = child.id() as libc::pid_t;

    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let watchdog = thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(timeout) {
            // SAFETY: the child is not reaped before this thread is joined,
            // so `pid` still names our child (running or a zombie).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            true
        } else {
            false
        }
    });

    let out_rx = spawn_reader(child.stdout.take().expect("piped stdout"));
    let err_rx = spawn_reader(child.stderr.take().expect("piped stderr"));
    if let Some(mut input) = child.stdin.take() {
        let data = stdin.to_vec();
        thread::spawn(move || {
            // A child that exits without reading its input gets EPIPE: fine.
            let _ = input.write_all(&data);
        });
    }

    // Wait for exit without reaping (WNOWAIT).
    loop {
        // SAFETY: siginfo_t is plain old data; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer, pid of our own child.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    let elapsed = start.elapsed();
    let _ = stop_tx.send(());
    let timed_out = watchdog.join().unwrap_or(false);
    let status = child.wait()?;

    let grace = Duration::from_secs(2);
    let stdout = out_rx.recv_timeout(grace).unwrap_or_default();
    let stderr = err_rx.recv_timeout(grace).unwrap_or_default();
    Ok(Run {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        elapsed,
        timed_out,
    })
}

/// Runs a command that must succeed; panics with its output otherwise.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Run {
    let what = format!("{cmd:?}");
    let r = run(cmd, b"", timeout).unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    assert!(r.success(), "{what} failed: {r}");
    r
}

// ---------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------

/// `ip netns add` mounts /run/netns on first use; serialise our calls so two
/// threads never race on that first mount.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// A network namespace owned by one test, removed on drop.
pub struct Netns {
    name: String,
    path: PathBuf,
    file: Arc<File>,
}

impl Netns {
    /// Creates `mwt-<pid>-<n>` with its loopback up. Runs the stale cleanup
    /// once per process first.
    pub fn new() -> Netns {
        require_root();
        cleanup_stale();
        let name = unique_name();
        {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            run_ok(
                Command::new("ip").args(["netns", "add", &name]),
                CMD_TIMEOUT,
            );
        }
        let path = PathBuf::from("/run/netns").join(&name);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                delete_netns(&name);
                panic!("open {}: {e}", path.display());
            }
        };
        let ns = Netns {
            name,
            path,
            file: Arc::new(file),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: what CNI_NETNS takes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A command that runs inside this namespace (setns in the child before
    /// exec; the mount namespace stays the host's, so /sys/fs/cgroup and
    /// /run/netns are the real ones, as podman and runc need).
    pub fn command<S: AsRef<OsStr>>(&self, program: S) -> Command {
        let mut cmd = Command::new(program);
        let file = Arc::clone(&self.file);
        // SAFETY: between fork and exec the closure only calls setns(2), which
        // is async-signal-safe; `file` is kept open by the Arc the closure owns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs `f` on a short-lived thread that joined this namespace (the
    /// caller's threads never move). Sockets created in `f` stay in it.
    pub fn in_netns<F, T>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let fd = self.file.as_raw_fd();
        thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: fd is a namespace file kept open by self.file.
                let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread inside the namespace panicked")
        })
    }

    /// Runs `program args` inside the namespace; panics unless it succeeds.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        run_ok(self.command(program).args(args), CMD_TIMEOUT).stdout
    }

    /// `ip -n <ns> args`; panics unless it succeeds; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(
            Command::new("ip").arg("-n").arg(&self.name).args(args),
            CMD_TIMEOUT,
        )
        .stdout
    }

    /// `ip -j -n <ns> args` parsed as JSON (an empty output is `[]`).
    pub fn ip_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let out = self.ip(&full);
        if out.trim().is_empty() {
            return json!([]);
        }
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip {args:?}: {e}: {out}"))
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

    /// `tc -j qdisc show dev <dev>` kinds inside the namespace.
    pub fn qdisc_kinds(&self, dev: &str) -> Vec<String> {
        let out = self.exec("tc", &["-j", "qdisc", "show", "dev", dev]);
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
        self.exec("cat", &[&path]).trim().to_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_netns(&self.name);
    }
}

fn delete_netns(name: &str) {
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

/// The pid inside a name `mwt-<pid>-...`, if it has that shape.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
    rest.split('-').next()?.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Name of a script a test may leave in its temp dir to stop what it
/// started there (podman containers) if the test process gets killed.
pub const STALE_CLEANUP_SCRIPT: &str = "stale-cleanup.sh";

/// Removes leftovers of test processes that no longer exist: directories in
/// the temp dir named `mwt-<pid>-*` (first running their
/// [`STALE_CLEANUP_SCRIPT`], bounded in time) and then namespaces in
/// /run/netns. Runs once per process; it never touches names of live
/// processes (other tests running in parallel) or names without our prefix.
/// scripts/test does the same before cargo runs.
pub fn cleanup_stale() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let me = std::process::id();
        let stale =
            |name: &str| matches!(owner_pid(name), Some(pid) if pid != me && !pid_alive(pid));
        if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !(stale(&name) && e.path().is_dir()) {
                    continue;
                }
                eprintln!("removing stale test directory {}", e.path().display());
                let script = e.path().join(STALE_CLEANUP_SCRIPT);
                if script.is_file() {
                    match run(
                        Command::new("bash").arg(&script),
                        b"",
                        Duration::from_secs(120),
                    ) {
                        Ok(r) if r.success() => {}
                        Ok(r) => eprintln!("warning: {}: {r}", script.display()),
                        Err(err) => eprintln!("warning: {}: {err}", script.display()),
                    }
                }
                remove_tree(&e.path());
            }
        }
        if let Ok(entries) = fs::read_dir("/run/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if stale(&name) {
                    eprintln!("removing stale test namespace {name}");
                    delete_netns(&name);
                }
            }
        }
    });
}

/// Mount points at or below `dir` (from /proc/self/mountinfo), deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut seen = HashSet::new();
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .filter(|m| seen.insert(m.clone()))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts
}

/// Lazily unmounts anything mounted below `dir` (container shm and the like)
/// and removes the tree.
pub fn remove_tree(dir: &Path) {
    for m in mounts_under(dir) {
        if let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) {
            // SAFETY: valid C string; MNT_DETACH on a path below our own dir.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("warning: remove {}: {e}", dir.display());
        }
    }
}

/// A temp directory `mwt-<pid>-<n>` removed on drop (after unmounting
/// anything left below it).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        cleanup_stale();
        let path = std::env::temp_dir().join(unique_name());
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join<P: AsRef<Path>>(&self, p: P) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}

/// Every file below `dir` whose content mentions `needle` (IPAM stores list
/// container ids; this is how tests see that DEL released an address).
pub fn files_mentioning(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut budget = 10_000; // bounded walk
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            budget -= 1;
            if budget == 0 {
                return hits;
            }
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if fs::read(&p)
                .map(|b| String::from_utf8_lossy(&b).contains(needle))
                .unwrap_or(false)
            {
                hits.push(p);
            }
        }
    }
    hits
}

/// HTTP/1.0 GET / from a socket opened in `ns`; returns the body. Retried
/// for at most 5 s (a server may still be starting).
pub fn http_get(ns: &Netns, dst: std::net::SocketAddr) -> Result<String, String> {
    use std::net::TcpStream;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = String::new();
    for _ in 0..50 {
        let attempt = ns.in_netns(|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            Ok(resp)
        });
        match attempt {
            Ok(resp) => {
                return resp
                    .split_once("\r\n\r\n")
                    .map(|(_, body)| body.to_owned())
                    .ok_or(resp)
            }
            Err(e) => last = format!("{dst}: {e}"),
        }
        if Instant::now() > deadline {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    Err(last)
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
    pub fn new(container_id: &str, netns: &Path) -> Attachment {
        Attachment {
            container_id: container_id.to_owned(),
            netns: netns.to_path_buf(),
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
