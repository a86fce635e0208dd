//! What the Helm chart relies on from the binary: `meshward crd` is
//! exactly the chart's crds/, and `meshward install-cni` (the chart's init
//! container) installs a plugin and a conflist a runtime can use.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshward_testkit::{run, Netns, TempDir};
use serde_json::{json, Value};

const MESHWARD: &str = env!("CARGO_BIN_EXE_meshward");

fn chart_crds() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../helm/meshward/crds/meshward-crds.yaml")
}

#[test]
fn the_charts_crds_are_exactly_meshward_crd() {
    let out = Command::new(MESHWARD).arg("crd").output().unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    assert!(generated.contains("name: meshnetworkpolicies.meshward.io"));
    assert!(generated.contains("name: meshclusterwidenetworkpolicies.meshward.io"));
    let in_chart = std::fs::read_to_string(chart_crds()).unwrap();
    assert!(
        in_chart == generated,
        "helm/meshward/crds/meshward-crds.yaml differs from `meshward crd`; regenerate it:\n  \
         cargo run -p meshward -- crd > helm/meshward/crds/meshward-crds.yaml"
    );
}

fn plugin_binary() -> PathBuf {
    let path = Path::new(MESHWARD).parent().unwrap().join("meshward-cni");
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --workspace` first",
        path.display()
    );
    path
}

/// A node n1 (pod CIDR `pod_cidr`, if any) in a directory datastore, and
/// the agent configuration naming it.
fn setup(dir: &Path, pod_cidr: Option<&str>) -> PathBuf {
    let datastore = dir.join("datastore");
    std::fs::create_dir_all(&datastore).unwrap();
    let spec = pod_cidr
        .map(|c| format!("spec:\n  podCIDR: {c}\n"))
        .unwrap_or_default();
    std::fs::write(
        datastore.join("n1.yaml"),
        format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n{spec}"),
    )
    .unwrap();
    for d in ["bin", "net.d", "plugins"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "nodeName: n1\nstateDir: {}\ndatastore: dir:{}\nunderlayMTU: 1460\n\
             socketPath: {}\n",
            dir.join("state").display(),
            datastore.display(),
            dir.join("agent.sock").display(),
        ),
    )
    .unwrap();
    config
}

fn install_cni(dir: &Path, config: &Path, extra: &[&str]) -> meshward_testkit::Run {
    let mut command = Command::new(MESHWARD);
    command
        .arg("install-cni")
        .arg("--config")
        .arg(config)
        .args(["--endpoint", "198.18.0.1"])
        .arg("--bin-dir")
        .arg(dir.join("bin"))
        .arg("--conf-dir")
        .arg(dir.join("net.d"))
        .arg("--plugin")
        .arg(plugin_binary())
        .args(extra);
    run(&mut command, b"", Duration::from_secs(60)).unwrap()
}

fn executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn install_cni_installs_a_plugin_and_conflist_a_runtime_can_use() {
    let dir = TempDir::new();
    let config = setup(dir.path(), Some("198.19.7.0/24"));
    executable(
        &dir.join("plugins/bandwidth"),
        "#!/bin/sh\n# from the image\n",
    );
    executable(&dir.join("bin/portmap"), "#!/bin/sh\n# the node's own\n");
    let out = install_cni(
        dir.path(),
        &config,
        &[
            "--chain",
            "bandwidth,portmap",
            "--plugins-from",
            dir.join("plugins").to_str().unwrap(),
        ],
    );
    assert!(out.success(), "{out}");

    let installed = dir.join("bin/meshward-cni");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(plugin_binary()).unwrap()
    );
    let mode = std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755);
    // a missing chained plugin comes from --plugins-from, a present one stays
    assert!(std::fs::read_to_string(dir.join("bin/bandwidth"))
        .unwrap()
        .contains("from the image"));
    assert!(std::fs::read_to_string(dir.join("bin/portmap"))
        .unwrap()
        .contains("the node's own"));
    let names: Vec<String> = std::fs::read_dir(dir.join("net.d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["05-meshward.conflist"]);

    let list: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("net.d/05-meshward.conflist")).unwrap(),
    )
    .unwrap();
    assert_eq!(list["cniVersion"], "1.0.0");
    assert_eq!(list["name"], "meshward");
    let plugins = list["plugins"].as_array().unwrap();
    let types: Vec<&str> = plugins
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["meshward-cni", "bandwidth", "portmap"]);
    let mut entry = plugins[0].clone();
    assert_eq!(entry["podCIDR"], "198.19.7.0/24");
    assert_eq!(entry["mtu"], 1380);
    assert!(out.stdout.contains("pod CIDR 198.19.7.0/24"), "{out}");

    // The installed plugin, given its entry as libcni would, wires a pod.
    entry["cniVersion"] = list["cniVersion"].clone();
    entry["name"] = list["name"].clone();
    let host = Netns::new("ih");
    let pod = Netns::new("ip");
    let env = |command: &str| -> Vec<(&str, String)> {
        vec![
            ("CNI_COMMAND", command.to_string()),
            ("CNI_CONTAINERID", "installtest".to_string()),
            ("CNI_NETNS", pod.path_str()),
            ("CNI_IFNAME", "eth0".to_string()),
            ("CNI_PATH", dir.join("bin").display().to_string()),
        ]
    };
    // The conflist makes ADD wait for the agent's word on the pod's policy:
    // with no agent here, ADD fails (11, the runtime retries) and leaves no
    // allocation; best effort (0) is what a pod gets without an agent.
    assert_eq!(entry["agentWaitSeconds"], 30);
    let mut add = host.command(&installed);
    add.envs(env("ADD"));
    let refused = run(
        &mut add,
        entry.to_string().as_bytes(),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(!refused.success(), "{refused}");
    assert!(refused.stdout.contains("\"code\": 11"), "{refused}");
    assert!(
        refused.stdout.contains("cannot reach the meshward agent"),
        "{refused}"
    );
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("state/ipam/meshward.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["allocations"], json!([]), "{state}");
    entry["agentWaitSeconds"] = json!(0);
    let mut add = host.command(&installed);
    add.envs(env("ADD"));
    let added = run(
        &mut add,
        entry.to_string().as_bytes(),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(added.success(), "{added}");
    let result: Value = serde_json::from_str(&added.stdout).unwrap();
    // round robin: the refused ADD had the first address
    assert_eq!(result["ips"][0]["address"], "198.19.7.3/32", "{result}");
    let mtu = pod.must(&["cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(mtu.trim(), "1380");
    let mut del = host.command(&installed);
    del.envs(env("DEL"));
    let deleted = run(
        &mut del,
        entry.to_string().as_bytes(),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(deleted.success(), "{deleted}");
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("state/ipam/meshward.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["allocations"], json!([]), "{state}");
}

#[test]
fn install_cni_in_policy_only_mode_removes_the_mesh_conflist() {
    let dir = TempDir::new();
    let config = setup(dir.path(), Some("198.19.7.0/24"));
    let out = install_cni(dir.path(), &config, &[]);
    assert!(out.success(), "{out}");
    let conflist = dir.join("net.d/05-meshward.conflist");
    assert!(conflist.is_file());

    // The same node switched to policy only (beside a cloud's CNI): the
    // chart's init container runs install-cni with mesh: false.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("mesh: false\n");
    std::fs::write(&config, text).unwrap();
    let cloud = dir.join("net.d/10-cloud.conflist");
    std::fs::write(
        &cloud,
        r#"{"cniVersion":"1.0.0","name":"cloud","plugins":[{"type":"ptp"}]}"#,
    )
    .unwrap();
    let out = install_cni(dir.path(), &config, &[]);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("removed"), "{out}");
    assert!(
        !conflist.exists(),
        "the mesh conflist would keep taking pods"
    );
    assert!(
        cloud.is_file(),
        "another CNI's conflist is not ours to touch"
    );
    // nothing left to do is fine too
    let out = install_cni(dir.path(), &config, &[]);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("no meshward conflist"), "{out}");
}

#[test]
fn install_cni_waits_for_the_pod_cidr_then_gives_up_clearly() {
    let dir = TempDir::new();
    let config = setup(dir.path(), None);
    let out = install_cni(dir.path(), &config, &["--wait", "1s"]);
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr
            .contains("Node n1 has no IPv4 pod CIDR (spec.podCIDR)"),
        "{out}"
    );
    assert!(
        std::fs::read_dir(dir.join("net.d"))
            .unwrap()
            .next()
            .is_none(),
        "a conflist was written without a pod CIDR"
    );
    assert!(!dir.join("bin/meshward-cni").exists());
}

#[test]
fn install_cni_names_a_missing_chained_plugin() {
    let dir = TempDir::new();
    let config = setup(dir.path(), Some("198.19.7.0/24"));
    let out = install_cni(dir.path(), &config, &["--chain", "portmap"]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("the chained plugin portmap"), "{out}");
    assert!(std::fs::read_dir(dir.join("net.d"))
        .unwrap()
        .next()
        .is_none());
    let out = install_cni(dir.path(), &config, &["--chain", "flannel"]);
    assert!(!out.success() && out.stderr.contains("flannel"), "{out}");
}

#[test]
fn agent_check_prints_the_effective_configuration() {
    let dir = TempDir::new();
    let config = setup(dir.path(), None);
    let out = Command::new(MESHWARD)
        .args(["agent", "--check", "--endpoint", "[fd00::7]", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("endpoint: [fd00::7]:51871\n"), "{text}");
    assert!(text.contains("mtu: 1380\n"), "{text}");
    assert!(text.contains("healthAddress: 127.0.0.1:9879\n"), "{text}");
    assert!(
        !dir.join("state").exists(),
        "--check touched the state directory"
    );
    let out = Command::new(MESHWARD)
        .args(["agent", "--check", "--endpoint", "somewhere", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--endpoint"));
}
