//! The agent's health endpoint on a real agent in a network namespace:
//! alive but not ready while start-up waits for its Node's pod CIDR, ready
//! once started with a synced datastore.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use meshward_testkit::{Netns, TempDir};

const MESHWARD: &str = env!("CARGO_BIN_EXE_meshward");
const HEALTH: &str = "127.0.0.1:9879";

/// An agent process, stopped with SIGTERM (then SIGKILL) on drop.
struct Agent {
    child: Child,
}

impl Agent {
    fn start(ns: &Netns, config: &Path, log: &Path) -> Agent {
        let log = std::fs::File::create(log).unwrap();
        let child = ns
            .command(MESHWARD)
            .arg("agent")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting the agent");
        Agent { child }
    }

    /// SIGTERM, then the exit status (bounded: SIGKILL after 20 s).
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// `GET path` over HTTP/1.0 from inside `ns`: (status code, body), or the
/// connection error.
fn get(ns: &Netns, path: &str) -> Result<(u16, String), String> {
    let addr: SocketAddr = HEALTH.parse().unwrap();
    ns.run(|| -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })
    .map_err(|e| e.to_string())
    .and_then(|text| {
        let code = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((code, body.to_string()))
    })
}

/// Polls `path` until it answers `code` (at most `limit`); the last answer.
fn wait_for(ns: &Netns, path: &str, code: u16, limit: Duration) -> Result<(u16, String), String> {
    let deadline = Instant::now() + limit;
    let mut last = Err("never asked".to_string());
    while Instant::now() < deadline {
        last = get(ns, path);
        if matches!(&last, Ok((c, _)) if *c == code) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    last
}

fn node(pod_cidr: Option<&str>) -> String {
    let spec = pod_cidr
        .map(|c| format!("spec:\n  podCIDR: {c}\n"))
        .unwrap_or_default();
    format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n{spec}")
}

#[test]
fn ready_only_once_started_alive_all_along() {
    let ns = Netns::new("hl");
    ns.ip(&["addr", "add", "198.18.0.1/32", "dev", "lo"]);
    let dir = TempDir::new();
    let datastore = dir.join("datastore");
    std::fs::create_dir_all(&datastore).unwrap();
    // The Node exists but has no pod CIDR yet: start-up waits for it. No DNS
    // socket keeper: it would outlive the agent and the test's namespace.
    std::fs::write(datastore.join("node-n1.yaml"), node(None)).unwrap();
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "nodeName: n1\nstateDir: {}\ndatastore: dir:{}\nendpoint: 198.18.0.1\n\
             clusterCIDR: 198.19.0.0/16\nsocketPath: {}\nhealthAddress: {HEALTH}\n\
             dnsSocketKeeper: off\n",
            dir.join("state").display(),
            datastore.display(),
            dir.join("agent.sock").display(),
        ),
    )
    .unwrap();
    let log = dir.join("agent.log");
    let mut agent = Agent::start(&ns, &config, &log);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    let alive = wait_for(&ns, "/healthz", 200, Duration::from_secs(20));
    assert_eq!(
        alive,
        Ok((200, "ok\n".into())),
        "agent log:\n{}",
        log_text()
    );
    let (code, body) = get(&ns, "/readyz").unwrap();
    assert_eq!(code, 503, "ready while waiting for the pod CIDR: {body}");
    assert!(body.contains("starting"), "{body}");
    let (_, metrics) = get(&ns, "/metrics").unwrap();
    assert!(metrics.contains("\nmeshward_agent_ready 0\n"), "{metrics}");

    // The pod CIDR arrives: start-up completes (strict mode, mw0, ...).
    std::fs::write(datastore.join("node-n1.yaml"), node(Some("198.19.1.0/24"))).unwrap();
    let ready = wait_for(&ns, "/readyz", 200, Duration::from_secs(30));
    assert_eq!(
        ready,
        Ok((200, "ready\n".into())),
        "agent log:\n{}",
        log_text()
    );
    assert!(
        ns.links_of_type("tun").contains(&"mw0".to_string()),
        "ready before the mesh device is up"
    );
    let table = ns.must(&["nft", "list", "table", "inet", "meshward"]);
    assert!(table.contains("198.19.0.0/16"), "{table}");
    let (code, metrics) = get(&ns, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("\nmeshward_agent_ready 1\n"), "{metrics}");
    assert_eq!(get(&ns, "/nope").unwrap().0, 404);

    let status = agent.stop().expect("the agent stops on SIGTERM");
    assert!(status.success(), "{status}; agent log:\n{}", log_text());
    assert!(get(&ns, "/healthz").is_err(), "still answering after exit");
}

#[test]
fn a_busy_health_address_is_named() {
    let ns = Netns::new("hb");
    let dir = TempDir::new();
    let datastore = dir.join("datastore");
    std::fs::create_dir_all(&datastore).unwrap();
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "nodeName: n1\nstateDir: {}\ndatastore: dir:{}\nendpoint: 198.18.0.1\n\
             socketPath: {}\nhealthAddress: {HEALTH}\n",
            dir.join("state").display(),
            datastore.display(),
            dir.join("agent.sock").display(),
        ),
    )
    .unwrap();
    let addr: SocketAddr = HEALTH.parse().unwrap();
    let _taken = ns.run(|| std::net::TcpListener::bind(addr)).unwrap();
    let mut command = ns.command(MESHWARD);
    command.arg("agent").arg("--config").arg(&config);
    let out = meshward_testkit::run(&mut command, b"", Duration::from_secs(30)).unwrap();
    assert!(!out.timed_out && !out.status.success(), "{out}");
    assert!(
        out.stderr
            .contains("health endpoint (healthAddress 127.0.0.1:9879)"),
        "{}",
        out.stderr
    );
}
