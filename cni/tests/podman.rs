//! podman 4.3 as a real CNI runtime for meshward-cni.
//!
//! Each test builds a private podman world: its own containers.conf
//! (CONTAINERS_CONF, CNI backend, runc, file locks instead of the machine's
//! shared /dev/shm/libpod_lock), storage (vfs under a temp dir), tmp dir, CNI
//! config dir holding our conflist, and a plugin dir; the image is a
//! busybox-static rootfs imported as localhost/bbx. Every podman command
//! runs inside a fresh test namespace that plays the node, so the host side
//! of the veth lands there and nothing touches the machine's real network.
//! The node's address (198.18.250.1/32) sits on that namespace's loopback.
//!
//! Run with `MESHWARD_TEST_PLUGIN=bridge` to point the same tests at
//! Debian's bridge + host-local.

mod common;

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::PodPlugin;
use meshward_testkit::{
    files_mentioning, http_get, run, run_ok, Netns, Run, TempDir, CMD_TIMEOUT, STALE_CLEANUP_SCRIPT,
};
use serde_json::json;

const NODE_ADDR: &str = "198.18.250.1";
const POD_CIDR: &str = "198.19.250.0/24";
const NETWORK: &str = "mwtpods";
const BRIDGE: &str = "mwtbr0";
const IMAGE: &str = "localhost/bbx";
const PODMAN_TIMEOUT: Duration = Duration::from_secs(120);

/// A private podman installation whose commands run inside `host`.
struct Podman<'a> {
    host: &'a Netns,
    dir: TempDir,
}

impl<'a> Podman<'a> {
    fn new(host: &'a Netns, plugin: PodPlugin) -> Podman<'a> {
        let dir = TempDir::new();
        for sub in [
            "root",
            "runroot",
            "tmp",
            "net.d",
            "cni-bin",
            "ipam",
            "rootfs/bin",
        ] {
            fs::create_dir_all(dir.join(sub)).expect("create podman dirs");
        }
        let d = dir.path().display().to_string();
        // The plugin dir podman searches first holds a link to the binary
        // cargo just built; Debian's plugins come second.
        std::os::unix::fs::symlink(common::meshward_cni_bin(), dir.join("cni-bin/meshward-cni"))
            .expect("link meshward-cni");
        let conf = format!(
            r#"[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]

[network]
network_backend = "cni"
cni_plugin_dirs = ["{d}/cni-bin", "{debian}"]
network_config_dir = "{d}/net.d"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
lock_type = "file"
tmp_dir = "{d}/tmp"
image_copy_tmp_dir = "{d}/tmp"
conmon_env_vars = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "CONTAINERS_CONF={d}/containers.conf", "CONTAINERS_STORAGE_CONF={d}/storage.conf", "CONTAINERS_REGISTRIES_CONF={d}/registries.conf"]
"#,
            debian = common::DEBIAN_CNI_DIR
        );
        fs::write(dir.join("containers.conf"), conf).expect("write containers.conf");
        let storage = format!(
            "[storage]\ndriver = \"vfs\"\nrunroot = \"{d}/runroot\"\ngraphroot = \"{d}/root\"\n"
        );
        fs::write(dir.join("storage.conf"), storage).expect("write storage.conf");
        fs::write(
            dir.join("registries.conf"),
            "unqualified-search-registries = []\n",
        )
        .expect("write registries.conf");

        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "plugins": [
                plugin.config(POD_CIDR, &dir.join("ipam"), BRIDGE),
                // podman fills portMappings from `-p` for this capability.
                { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true }
            ]
        });
        fs::write(
            dir.join(format!("net.d/{NETWORK}.conflist")),
            serde_json::to_vec_pretty(&conflist).unwrap(),
        )
        .expect("write conflist");

        // If this test process is killed, the next one runs this before
        // removing the dir: containers stop and podman runs their DEL.
        let d = dir.path().display();
        let script = format!(
            r#"# written by cni/tests/podman.rs for a killed test's leftovers
export CONTAINERS_CONF={d}/containers.conf CONTAINERS_STORAGE_CONF={d}/storage.conf CONTAINERS_REGISTRIES_CONF={d}/registries.conf TMPDIR={d}/tmp
ns=/run/netns/{ns}
if [ -e "$ns" ]; then set -- nsenter --net="$ns"; else set -- unshare --net; fi
exec timeout 100 "$@" podman --root {d}/root --runroot {d}/runroot --storage-driver vfs --log-level error rm --all --force --time 0
"#,
            ns = host.name()
        );
        fs::write(dir.join(STALE_CLEANUP_SCRIPT), script).expect("write cleanup script");

        let podman = Podman { host, dir };
        podman.import_busybox();
        podman
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.join("ipam")
    }

    /// `podman <global flags> args`, inside the host namespace.
    fn command(&self, args: &[&str]) -> Command {
        let d = self.dir.path();
        let mut cmd = self.host.command("podman");
        cmd.env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .env("TMPDIR", d.join("tmp"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .args(["--storage-driver", "vfs", "--log-level", "error"])
            .args(args);
        cmd
    }

    fn try_podman(&self, args: &[&str]) -> Run {
        run(&mut self.command(args), b"", PODMAN_TIMEOUT)
            .unwrap_or_else(|e| panic!("spawn podman {args:?}: {e}"))
    }

    fn podman(&self, args: &[&str]) -> String {
        let r = self.try_podman(args);
        assert!(r.success(), "podman {args:?} failed: {r}");
        r.stdout
    }

    /// busybox-static as the whole image: /bin/busybox plus its applets.
    fn import_busybox(&self) {
        let rootfs = self.dir.join("rootfs");
        fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy /bin/busybox");
        let list = run_ok(Command::new("/bin/busybox").arg("--list"), CMD_TIMEOUT);
        for applet in list.stdout.lines().map(str::trim) {
            if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
                let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet));
            }
        }
        for d in ["etc", "proc", "sys", "dev", "tmp", "run"] {
            fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        let tar = self.dir.join("rootfs.tar");
        run_ok(
            Command::new("tar")
                .arg("-C")
                .arg(&rootfs)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
            CMD_TIMEOUT,
        );
        self.podman(&[
            "import",
            "--change",
            r#"CMD ["/bin/sh"]"#,
            tar.to_str().unwrap(),
            IMAGE,
        ]);
    }

    /// Host-side veth interfaces currently in the node namespace.
    fn host_veths(&self) -> Vec<String> {
        self.host.links_of_type("veth")
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        // Removing the containers makes podman run CNI DEL (inside the node
        // namespace); only then is the temp dir removed.
        if let Ok(r) = run(
            &mut self.command(&["rm", "--all", "--force", "--time", "0"]),
            b"",
            PODMAN_TIMEOUT,
        ) {
            if !r.success() {
                eprintln!("warning: podman rm --all: {r}");
            }
        }
    }
}

/// The node namespace: loopback up, node address on it.
fn node() -> Netns {
    let host = Netns::new("h");
    host.ip(&["addr", "add", &format!("{NODE_ADDR}/32"), "dev", "lo"]);
    host
}

/// The IPv4 address of eth0 in `ip -4 -o addr show dev eth0` output.
fn eth0_address(out: &str) -> (Ipv4Addr, u8) {
    let token = out
        .split_whitespace()
        .skip_while(|t| *t != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("no inet address in: {out}"));
    let (a, l) = token.split_once('/').expect("address/len");
    (a.parse().expect("IPv4"), l.parse().expect("prefix len"))
}

fn assert_pod_address(plugin: PodPlugin, addr: Ipv4Addr, len: u8) {
    let net: ipnet::Ipv4Net = POD_CIDR.parse().unwrap();
    assert!(net.contains(&addr), "{addr} not in {POD_CIDR}");
    assert_ne!(addr, net.network(), "network address handed out");
    assert_ne!(addr, net.broadcast(), "broadcast address handed out");
    assert_ne!(
        addr,
        net.hosts().next().unwrap(),
        ".1 is reserved for the node"
    );
    if plugin == PodPlugin::Meshward {
        assert_eq!(len, 32, "meshward pods get a /32");
    }
}

fn ping_received(out: &str) -> u32 {
    // busybox: "3 packets transmitted, 3 packets received, 0% packet loss"
    out.lines()
        .find(|l| l.contains("packets received"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn assert_released(podman: &Podman, cid: &str, addr: Ipv4Addr) {
    assert!(
        podman.host_veths().is_empty(),
        "host veth left after DEL: {:?}",
        podman.host_veths()
    );
    let held = files_mentioning(&podman.state_dir(), cid);
    assert!(held.is_empty(), "IPAM state still lists {cid}: {held:?}");
    let routes = podman
        .host
        .ip(&["-4", "route", "show", &format!("{addr}/32")]);
    assert!(
        routes.trim().is_empty(),
        "host route to {addr} left: {routes}"
    );
}

/// `podman run --rm`: the container sees an address from the pod CIDR and
/// its default route, pings the node; after exit podman has run DEL.
#[test]
fn podman_run_rm_pings_node() {
    let plugin = PodPlugin::under_test();
    let host = node();
    let podman = Podman::new(&host, plugin);
    let cidfile = podman.dir.join("cid");
    let script = format!("ip -4 -o addr show dev eth0; ip -4 route; ping -c 3 -W 2 {NODE_ADDR}");
    let out = podman.podman(&[
        "run",
        "--rm",
        "--pull",
        "never",
        "--cidfile",
        cidfile.to_str().unwrap(),
        "--network",
        NETWORK,
        IMAGE,
        "sh",
        "-c",
        &script,
    ]);
    eprintln!("container output:\n{out}");
    let cid = fs::read_to_string(&cidfile)
        .expect("cidfile")
        .trim()
        .to_owned();
    let (addr, len) = eth0_address(&out);
    assert_pod_address(plugin, addr, len);
    let gw = plugin.gateway(POD_CIDR);
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("default via {gw} dev eth0"))),
        "no default route via {gw}: {out}"
    );
    assert!(
        ping_received(&out) >= 1,
        "node {NODE_ADDR} not reachable: {out}"
    );

    assert!(podman.podman(&["ps", "-aq"]).trim().is_empty());
    assert_released(&podman, &cid, addr);
}

/// Detached containers: IPAM lists them while they run, the host reaches
/// them over their /32, two pods on the node reach each other, and
/// `podman rm` runs DEL that frees everything.
#[test]
fn podman_detached_lifecycle_and_pod_to_pod() {
    let plugin = PodPlugin::under_test();
    let host = node();
    let podman = Podman::new(&host, plugin);
    let start = |name: &str| -> String {
        podman
            .podman(&[
                "run",
                "-d",
                "--pull",
                "never",
                "--name",
                name,
                "--network",
                NETWORK,
                IMAGE,
                "sleep",
                "120",
            ])
            .trim()
            .to_owned()
    };
    let cid_a = start("pod-a");
    let cid_b = start("pod-b");
    let addr_of = |name: &str| {
        let out = podman.podman(&[
            "exec", name, "ip", "-4", "-o", "addr", "show", "dev", "eth0",
        ]);
        let (addr, len) = eth0_address(&out);
        assert_pod_address(plugin, addr, len);
        addr
    };
    let a = addr_of("pod-a");
    let b = addr_of("pod-b");
    assert_ne!(a, b, "two pods got the same address");

    // IPAM state lists both while they run.
    for cid in [&cid_a, &cid_b] {
        assert!(
            !files_mentioning(&podman.state_dir(), cid).is_empty(),
            "IPAM state does not list running container {cid}"
        );
    }
    let veths = podman.host_veths();
    assert_eq!(veths.len(), 2, "expected two host veths, got {veths:?}");
    if let Some(name) = plugin.host_veth(&cid_a, "eth0") {
        assert!(veths.contains(&name), "host veth {name} missing: {veths:?}");
        let route = host.ip(&["-4", "route", "show", &format!("{a}/32")]);
        assert!(
            route.contains(&name),
            "no /32 route to {a} via {name}: {route}"
        );
        assert_eq!(host.sysctl("net/ipv4/ip_forward"), "1");
    }

    // node -> pod, pod -> node, pod -> pod.
    let from_node = run(
        host.command("/bin/busybox")
            .args(["ping", "-c", "2", "-W", "2", &a.to_string()]),
        b"",
        CMD_TIMEOUT,
    )
    .unwrap();
    assert!(
        ping_received(&from_node.stdout) >= 1,
        "node -> {a}: {from_node}"
    );
    for (name, dst) in [
        ("pod-a", NODE_ADDR.to_owned()),
        ("pod-a", b.to_string()),
        ("pod-b", a.to_string()),
    ] {
        let r = podman.try_podman(&["exec", name, "ping", "-c", "2", "-W", "2", &dst]);
        assert!(ping_received(&r.stdout) >= 1, "{name} -> {dst}: {r}");
    }

    podman.podman(&["rm", "--force", "--time", "0", "pod-a", "pod-b"]);
    assert!(podman.podman(&["ps", "-aq"]).trim().is_empty());
    assert_released(&podman, &cid_a, a);
    assert_released(&podman, &cid_b, b);
}

/// `podman run -p HOSTPORT:80`: podman passes the mapping to portmap as the
/// portMappings capability, chained after our plugin; the node reaches the
/// container's server through the host port. `podman restart` (DEL + ADD
/// of the same container) leaves exactly one working attachment.
#[test]
fn podman_port_mapping_and_restart() {
    let plugin = PodPlugin::under_test();
    let host = node();
    let podman = Podman::new(&host, plugin);
    let serve =
        "mkdir -p /www && echo meshward-pod > /www/index.html && exec httpd -f -p 80 -h /www";
    let cid = podman
        .podman(&[
            "run",
            "-d",
            "--pull",
            "never",
            "--name",
            "web",
            "--network",
            NETWORK,
            "-p",
            "18080:80/tcp",
            IMAGE,
            "sh",
            "-c",
            serve,
        ])
        .trim()
        .to_owned();
    let node_addr: Ipv4Addr = NODE_ADDR.parse().unwrap();
    let via_port = http_get(&host, SocketAddr::from((node_addr, 18080)));
    assert_eq!(
        via_port.as_deref(),
        Ok("meshward-pod\n"),
        "node -> hostPort 18080"
    );
    let nat = host.must(&["iptables-save", "-t", "nat"]);
    assert!(nat.contains(&cid), "no portmap rules for {cid}:\n{nat}");

    podman.podman(&["restart", "--time", "0", "web"]);
    let out = podman.podman(&[
        "exec", "web", "ip", "-4", "-o", "addr", "show", "dev", "eth0",
    ]);
    let (addr, len) = eth0_address(&out);
    assert_pod_address(plugin, addr, len);
    assert_eq!(podman.host_veths().len(), 1, "one attachment after restart");
    let via_port = http_get(&host, SocketAddr::from((node_addr, 18080)));
    assert_eq!(
        via_port.as_deref(),
        Ok("meshward-pod\n"),
        "hostPort after restart"
    );
    let direct = http_get(&host, SocketAddr::from((addr, 80)));
    assert_eq!(
        direct.as_deref(),
        Ok("meshward-pod\n"),
        "node -> pod {addr}"
    );

    podman.podman(&["rm", "--force", "--time", "0", "web"]);
    assert_released(&podman, &cid, addr);
    let nat = host.must(&["iptables-save", "-t", "nat"]);
    assert!(!nat.contains(&cid), "portmap rules for {cid} left:\n{nat}");
}
