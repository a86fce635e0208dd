//! A new pod's policy is in force before CNI ADD returns (`agentWaitSeconds`):
//! the pod's address comes from the CNI, not from a Pod status the agent has
//! not seen yet, and an ADD the agent cannot confirm fails and leaves nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The pod has labels and a node but no address in its status, as when
/// kubelet has not reported the sandbox yet.
const LOCKED_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: uid-web-1, labels: {app: locked}}
spec: {nodeName: node1, containers: [{name: main, image: busybox}]}
"#;

/// An earlier pod of the same name, deleted, that the datastore still holds
/// (a StatefulSet pod recreated on another node).
const EARLIER_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: uid-earlier, labels: {app: locked}}
spec: {nodeName: node7, containers: [{name: main, image: busybox}]}
status: {podIP: 198.19.7.9}
"#;

/// Its egress is isolated: only 198.18.100.10:80.
const LOCKED_POLICY: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: locked-egress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: locked}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 198.18.100.10/32}}]
    ports: [{port: 80, protocol: TCP}]
"#;

/// A network namespace for a sandbox the test networks itself, removed on
/// drop (a stale one from a killed run is removed first).
struct Sandbox {
    name: String,
}

impl Sandbox {
    fn new(tag: &str) -> Sandbox {
        let name = format!("mwt-{tag}{:x}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("ip netns add");
        assert!(out.status.success(), "ip netns add {name}: {out:?}");
        Sandbox { name }
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// curl inside the sandbox: whether it got an answer.
    fn curl(&self, url: &str) -> bool {
        let mut command = Command::new("ip");
        command.args([
            "netns",
            "exec",
            &self.name,
            "curl",
            "-sS",
            "--connect-timeout",
            "2",
            "-m",
            "4",
            "-o",
            "/dev/null",
            url,
        ]);
        bounded(&mut command).status.success()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs meshward-cni COMMAND in node1's namespace for pod `shop/NAME` in
/// `sandbox`; returns its output.
fn cni(lab: &TestLab, command: &str, sandbox: &Sandbox, pod: &str, wait: u64) -> Output {
    let node_dir = lab.node_dir("node1");
    let config = json!({
        "cniVersion": "1.0.0",
        "name": "meshward",
        "type": "meshward-cni",
        "podCIDR": "198.19.1.0/24",
        "stateDir": node_dir.join("ipam"),
        "agentSocket": node_dir.join("agent.sock"),
        "agentWaitSeconds": wait,
    });
    let plugin = cni_bin();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &lab.ns("node1")])
        .arg(&plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &sandbox.name)
        .env("CNI_NETNS", sandbox.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", plugin.parent().unwrap())
        .env(
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE=shop;K8S_POD_NAME={pod};K8S_POD_UID=uid-{pod}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("meshward-cni");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(config.to_string().as_bytes())
            .expect("config on stdin");
    }
    let deadline = Instant::now() + Duration::from_secs(wait + 30);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("meshward-cni {command} did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The plugin failed with code 11 (try again later) and details saying `says`.
fn assert_try_again(out: &Output, says: &str) {
    assert!(!out.status.success());
    let error: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no CNI error object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(error["code"], 11, "{error}");
    assert!(
        error["details"].as_str().unwrap_or("").contains(says),
        "{error}"
    );
}

/// Addresses allocated on node1 (the IPAM file), as text.
fn allocations(lab: &TestLab) -> String {
    std::fs::read_to_string(lab.node_dir("node1").join("ipam").join("meshward.json"))
        .unwrap_or_default()
}

#[test]
fn a_new_pods_policy_is_in_force_when_cni_add_returns() {
    let lab = TestLab::new("cw");
    lab.up(1, 0);
    apply(&lab, "locked-policy.yaml", LOCKED_POLICY);
    lab.wait_status("node1", "the policy loaded", Duration::from_secs(20), |s| {
        s["policy"]["policiesLoaded"].as_u64() >= Some(1)
    });

    // The agent's datastore gets the Pod only 2 s after ADD started (a
    // watch lagging behind kubelet): ADD must wait for it and its policy.
    // Until then it holds an earlier pod of that name, bound elsewhere: not
    // ours (another UID), so no refusal either.
    let before = lab.agent_status("node1")["datastore"]["generation"]
        .as_u64()
        .unwrap();
    apply(&lab, "locked-pod.yaml", EARLIER_POD);
    lab.wait_status(
        "node1",
        "the earlier pod seen",
        Duration::from_secs(20),
        |s| s["datastore"]["generation"].as_u64() > Some(before),
    );
    let sandbox = Sandbox::new("cw");
    let started = Instant::now();
    let added = std::thread::scope(|scope| {
        let add = scope.spawn(|| cni(&lab, "ADD", &sandbox, "web-1", 20));
        std::thread::sleep(Duration::from_secs(2));
        apply(&lab, "locked-pod.yaml", LOCKED_POD);
        add.join().expect("ADD thread")
    });
    assert!(
        added.status.success(),
        "ADD failed: {}{}",
        String::from_utf8_lossy(&added.stdout),
        String::from_utf8_lossy(&added.stderr)
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "ADD returned before the agent knew the pod"
    );
    // The very first connection after ADD already meets the policy, though
    // the Pod's status never shows an address.
    assert!(
        !sandbox.curl("http://198.18.100.11/"),
        "a destination the pod's policy does not allow was reachable right after ADD"
    );
    assert!(
        sandbox.curl("http://198.18.100.10/"),
        "the allowed destination was not reachable"
    );
    let status = lab.agent_status("node1");
    assert!(
        status["policy"]["inForce"].as_array().is_some_and(|p| p
            .iter()
            .any(|p| p.as_str().unwrap_or("").contains("locked-egress"))),
        "{status}"
    );

    // A restarted agent reads the address back from the CNI's allocations:
    // the policy stays in force though the status still shows none.
    lab.ok(&["agent", "restart", "node1"]);
    let status = lab.agent_status("node1");
    assert_eq!(status["policy"]["endpoints"].as_u64(), Some(1), "{status}");
    assert!(
        !sandbox.curl("http://198.18.100.11/"),
        "the pod's policy was lost across an agent restart"
    );

    // DEL: the agent forgets the address; the pod is no endpoint any more.
    let deleted = cni(&lab, "DEL", &sandbox, "web-1", 20);
    assert!(deleted.status.success(), "DEL failed: {deleted:?}");
    lab.wait_status("node1", "no endpoint left", Duration::from_secs(20), |s| {
        s["policy"]["endpoints"].as_u64() == Some(0)
    });
}

#[test]
fn an_add_the_agent_cannot_confirm_fails_and_leaves_nothing() {
    let lab = TestLab::new("cx");
    lab.up(1, 0);

    // No such Pod in the datastore: the agent never confirms.
    let sandbox = Sandbox::new("cx");
    let out = cni(&lab, "ADD", &sandbox, "ghost", 2);
    assert_try_again(&out, "did not confirm");
    assert!(
        !allocations(&lab).contains(&sandbox.name),
        "the address stayed allocated: {}",
        allocations(&lab)
    );
    let links = lab.ok(&["exec", "node1", "ip", "-o", "link"]);
    let pod_veth = |line: &str| {
        let name = line.split(": ").nth(1).unwrap_or("");
        let name = name.split('@').next().unwrap_or("");
        name.starts_with("mw") && name != "mw0"
    };
    assert!(
        !links.lines().any(pod_veth),
        "a pod veth was left in node1: {links}"
    );

    // The agent stopped: ADD fails at once, with the reason.
    lab.ok(&["agent", "stop", "node1"]);
    let started = Instant::now();
    let out = cni(&lab, "ADD", &sandbox, "ghost", 20);
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_try_again(&out, "cannot reach the meshward agent");
    assert!(!allocations(&lab).contains(&sandbox.name));
}
