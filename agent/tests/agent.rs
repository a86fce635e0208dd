//! `meshward agent`, `keys` and `status` outside a lab: start-up order
//! (strict mode is in the kernel before the tunnel is made), errors.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

mod common;

use common::node_manifest;
use meshward_testkit::{run, Netns, TempDir};

const MESHWARD: &str = env!("CARGO_BIN_EXE_meshward");
const OTHER_KEY: &str = "WAmgVYXkbT2bCtdcDwolI88/iVi/aV3/PHcUBTQSYmo=";

fn write_cluster(dir: &Path) -> std::path::PathBuf {
    let datastore = dir.join("datastore");
    std::fs::create_dir_all(&datastore).unwrap();
    std::fs::write(
        datastore.join("node-n1.yaml"),
        node_manifest("n1", "198.19.1.0/24", None),
    )
    .unwrap();
    std::fs::write(
        datastore.join("node-n2.yaml"),
        node_manifest("n2", "198.19.2.0/24", Some((OTHER_KEY, "198.18.0.2:51871"))),
    )
    .unwrap();
    let config = dir.join("agent.yaml");
    // No DNS socket keeper: it would outlive the agent and the namespace.
    std::fs::write(
        &config,
        format!(
            "nodeName: n1\nstateDir: {state}\ndatastore: dir:{ds}\nendpoint: 198.18.0.1\n\
             clusterCIDR: 198.19.0.0/16\nsocketPath: {sock}\n\
             dnsSocketKeeper: off\n",
            state = dir.join("state").display(),
            ds = datastore.display(),
            sock = dir.join("agent.sock").display(),
        ),
    )
    .unwrap();
    config
}

/// The data plane cannot come up (a bridge named mw0 is in the way): the
/// agent stops with an error naming that step, and everything before it is
/// done — the key exists and strict mode is in the kernel — while nothing
/// after it is (the own Node is not published).
#[test]
fn strict_mode_is_in_place_before_the_data_plane_starts() {
    let ns = Netns::new("ag");
    ns.ip(&["link", "add", "mw0", "type", "bridge"]);
    let dir = TempDir::new();
    let config = write_cluster(dir.path());
    let mut command = ns.command(MESHWARD);
    command.arg("agent").arg("--config").arg(&config);
    let out = run(&mut command, b"", Duration::from_secs(60)).expect("running the agent");
    let stderr = out.stderr.clone();
    assert!(!out.timed_out, "the agent did not stop: {out}");
    assert!(!out.status.success(), "{out}");
    assert!(
        stderr.contains("starting the data plane (mw0"),
        "the error does not name the step: {stderr}"
    );

    let table = ns.must(&["nft", "list", "table", "inet", "meshward"]);
    assert!(table.contains("198.19.1.0/24"), "{table}");
    assert!(table.contains("198.19.0.0/16"), "{table}");
    assert!(table.contains("oifname != \"mw0\""), "{table}");

    let key = dir.path().join("state/key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let manifest = std::fs::read_to_string(dir.path().join("datastore/node-n1.yaml")).unwrap();
    assert!(
        !manifest.contains("meshward.io/public-key"),
        "published before the data plane was up: {manifest}"
    );
    assert!(!dir.path().join("agent.sock").exists());

    // keys show: the public key, from the state dir or the config
    let shown = Command::new(MESHWARD)
        .args(["keys", "show", "--state-dir"])
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(shown.status.success());
    let public = String::from_utf8(shown.stdout).unwrap();
    assert_eq!(public.trim().len(), 44, "{public}");
    let private = std::fs::read_to_string(&key).unwrap();
    assert!(!public.contains(private.trim()));
    let via_config = Command::new(MESHWARD)
        .args(["keys", "show", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(via_config.stdout).unwrap(), public);
    assert!(
        stderr.contains(public.trim()),
        "the log names the public key"
    );
    assert!(
        !stderr.contains(private.trim()),
        "the log shows the private key"
    );
}

#[test]
fn bad_configuration_is_named() {
    let dir = TempDir::new();
    let config = write_cluster(dir.path());
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("198.19.0.0/16", "198.19.0.1/16")).unwrap();
    let out = Command::new(MESHWARD)
        .args(["agent", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("clusterCIDR"), "{stderr}");
    assert!(
        !dir.path().join("state").exists(),
        "state touched before the config was valid"
    );

    let out = Command::new(MESHWARD)
        .args(["agent", "--config", "/nonexistent/agent.yaml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
}

#[test]
fn the_cli_says_when_no_agent_runs() {
    let dir = TempDir::new();
    let socket = dir.path().join("agent.sock");
    for args in [vec!["keys", "rotate"], vec!["status"]] {
        let out = Command::new(MESHWARD)
            .args(&args)
            .arg("--socket")
            .arg(&socket)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("cannot reach the agent at"),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains(&socket.display().to_string()), "{stderr}");
    }
    let out = Command::new(MESHWARD)
        .args(["keys", "show", "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no usable node key"), "{stderr}");
}
