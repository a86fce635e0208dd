//! The real meshward-cni binary, run as a runtime runs it, inside network
//! namespaces this test creates: every command and every error path.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use common::*;
use meshward_testkit::{sh, Netns};
use serde_json::{json, Value};

const CIDR: &str = "198.19.1.0/24";

fn pod_ip(result: &Value) -> String {
    let addr = result["ips"][0]["address"]
        .as_str()
        .expect("ips[0].address");
    addr.trim_end_matches("/32").to_string()
}

#[test]
fn add_del_in_every_version() {
    let node = Node::new("198.18.0.1");
    for version in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let conf = node.conf(version, CIDR);
        let pod = Netns::new("p");
        let id = format!("ctr-{}", version.replace('.', "-"));
        let result = node.add(&conf, &id, &pod).ok();
        assert_eq!(result["cniVersion"], version);
        let ifaces = result["interfaces"].as_array().unwrap();
        assert_eq!(ifaces.len(), 2);
        assert!(ifaces[0]["name"].as_str().unwrap().starts_with("mw"));
        assert_eq!(ifaces[0]["mac"], "ee:ee:ee:ee:ee:ee");
        assert!(ifaces[0].get("sandbox").is_none());
        assert_eq!(ifaces[1]["name"], "eth0");
        assert_eq!(ifaces[1]["sandbox"], pod.path_str());
        let ip = &result["ips"][0];
        assert_eq!(ip["interface"], 1);
        assert_eq!(ip["gateway"], "169.254.1.1");
        assert!(ip["address"].as_str().unwrap().starts_with("198.19.1."));
        assert_eq!(ip.get("version").is_some(), version.starts_with("0."));
        assert_eq!(ifaces[1].get("mtu").is_some(), version == "1.1.0");
        assert_eq!(
            result["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}])
        );

        // The pod side as the kernel sees it.
        let (_, addr) = pod.exec(&["ip", "-o", "addr", "show", "dev", "eth0"]);
        assert!(addr.contains(&format!("{}/32", pod_ip(&result))), "{addr}");
        let (_, link) = pod.exec(&["ip", "-o", "link", "show", "dev", "eth0"]);
        assert!(link.contains("mtu 1420"), "{link}");
        let (_, route) = pod.exec(&["ip", "route", "show", "default"]);
        assert!(
            route.contains("via 169.254.1.1 dev eth0") && route.contains("onlink"),
            "{route}"
        );
        assert!(pod.ping(&node.address), "pod cannot reach its node");

        let host_if = ifaces[0]["name"].as_str().unwrap().to_string();
        node.del(&conf, &id, Some(&pod.path_str())).ok_empty();
        assert!(
            !node.host_links().contains(&host_if),
            "host veth left behind"
        );
        assert!(node.allocations().is_empty(), "address not released");
        // DEL again: nothing left to free, still success.
        node.del(&conf, &id, Some(&pod.path_str())).ok_empty();
    }
}

trait OkEmpty {
    fn ok_empty(&self);
}

impl OkEmpty for Outcome {
    /// DEL, CHECK, STATUS and GC print nothing on success.
    fn ok_empty(&self) {
        assert!(
            self.success,
            "plugin failed: {} {}",
            self.stdout, self.stderr
        );
        assert!(
            self.stdout.trim().is_empty(),
            "unexpected output {}",
            self.stdout
        );
    }
}

#[test]
fn pods_on_one_node_reach_each_other_and_their_node() {
    let node = Node::new("198.18.0.2");
    let conf = node.conf("1.0.0", "198.19.2.0/24");
    let a = Netns::new("p");
    let b = Netns::new("p");
    let ip_a = pod_ip(&node.add(&conf, "pod-a", &a).ok());
    let ip_b = pod_ip(&node.add(&conf, "pod-b", &b).ok());
    assert_ne!(ip_a, ip_b);
    assert_eq!(
        ip_a, "198.19.2.2",
        "first pod gets the first address after the node's"
    );
    assert!(a.ping(&ip_b));
    assert!(b.ping(&ip_a));
    assert!(a.ping(&node.address));
    let (ok, out) = node.ns.exec(&["ping", "-c", "1", "-W", "2", &ip_a]);
    assert!(ok, "node cannot reach its pod: {out}");
}

#[test]
fn del_after_the_netns_is_gone_frees_everything() {
    let node = Node::new("198.18.0.3");
    let conf = node.conf("1.0.0", "198.19.3.0/24");
    let mut pod = Netns::new("p");
    let result = node.add(&conf, "gone", &pod).ok();
    let host_if = result["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let path = pod.path_str();
    pod.delete();
    node.del(&conf, "gone", Some(&path)).ok_empty();
    node.del(&conf, "gone", None).ok_empty();
    assert!(node.allocations().is_empty());
    assert!(!node.host_links().contains(&host_if));
}

#[test]
fn add_is_idempotent_in_ipam_and_refuses_an_existing_interface() {
    let node = Node::new("198.18.0.4");
    let conf = node.conf("1.0.0", "198.19.4.0/24");
    let pod = Netns::new("p");
    let first = pod_ip(&node.add(&conf, "twice", &pod).ok());
    // The spec requires an error when CNI_IFNAME exists; the address stays.
    let err = node.add(&conf, "twice", &pod).err(103);
    assert!(err["msg"].as_str().unwrap().contains("eth0"), "{err}");
    assert_eq!(node.allocations().len(), 1);
    assert_eq!(node.allocations()[0]["ip"], first);
    assert!(pod.ping(&node.address), "the refused ADD broke the pod");
    // Another container whose netns already has eth0: refused, no leak.
    let err = node.add(&conf, "other", &pod).err(103);
    assert!(err["details"].as_str().unwrap().contains("DEL"), "{err}");
    assert_eq!(node.allocations().len(), 1);
}

#[test]
fn check_passes_then_detects_drift() {
    let node = Node::new("198.18.0.5");
    let conf = node.conf("1.0.0", "198.19.5.0/24");
    let mut pod = Netns::new("p");
    let result = node.add(&conf, "chk", &pod).ok();
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = result.clone();
    let check = |c: &Value, netns: &str| {
        node.cni(
            &attachment_env("CHECK", "chk", Some(netns)),
            c.to_string().as_bytes(),
        )
    };
    check(&with_prev, &pod.path_str()).ok_empty();

    // No prevResult: invalid configuration.
    check(&conf, &pod.path_str()).err(7);
    // CHECK does not exist before 0.4.0.
    let mut old = with_prev.clone();
    old["cniVersion"] = json!("0.3.1");
    check(&old, &pod.path_str()).err(1);
    // A prevResult that names another address.
    let mut wrong = with_prev.clone();
    wrong["prevResult"]["ips"][0]["address"] = json!("198.19.5.99/32");
    check(&wrong, &pod.path_str()).err(101);

    // Drift in the pod: route gone, then link down.
    sh(&["ip", "-n", &pod.name, "route", "del", "default"]);
    let err = check(&with_prev, &pod.path_str()).err(101);
    assert!(
        err["details"].as_str().unwrap().contains("default route"),
        "{err}"
    );
    sh(&["ip", "-n", &pod.name, "link", "set", "eth0", "down"]);
    let err = check(&with_prev, &pod.path_str()).err(101);
    assert!(err["details"].as_str().unwrap().contains("down"), "{err}");

    // Container gone: error 3.
    let path = pod.path_str();
    pod.delete();
    check(&with_prev, &path).err(3);
}

#[test]
fn status_reports_readiness_and_exhaustion() {
    let node = Node::new("198.18.0.6");
    // A /30 has one pod address: network, node and broadcast are reserved.
    let conf = node.conf("1.1.0", "198.19.6.0/30");
    let status = || node.cni(&[("CNI_COMMAND", "STATUS")], conf.to_string().as_bytes());
    status().ok_empty();
    let a = Netns::new("p");
    let b = Netns::new("p");
    assert_eq!(pod_ip(&node.add(&conf, "only", &a).ok()), "198.19.6.2");
    let err = node.add(&conf, "second", &b).err(102);
    assert!(
        err["details"].as_str().unwrap().contains("exhausted"),
        "{err}"
    );
    let err = status().err(50);
    assert!(
        err["details"].as_str().unwrap().contains("198.19.6.0/30"),
        "{err}"
    );
    node.del(&conf, "only", Some(&a.path_str())).ok_empty();
    status().ok_empty();

    // A state directory that cannot be used: not available.
    let mut broken = conf.clone();
    let file = node.state.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    broken["stateDir"] = json!(file);
    node.cni(&[("CNI_COMMAND", "STATUS")], broken.to_string().as_bytes())
        .err(50);
    // STATUS is a 1.1.0 command.
    let mut old = conf.clone();
    old["cniVersion"] = json!("1.0.0");
    node.cni(&[("CNI_COMMAND", "STATUS")], old.to_string().as_bytes())
        .err(1);
}

#[test]
fn gc_releases_what_is_not_valid() {
    let node = Node::new("198.18.0.7");
    let conf = node.conf("1.1.0", "198.19.7.0/24");
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("p")).collect();
    let mut host_ifs = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let r = node.add(&conf, &format!("gc{i}"), pod).ok();
        host_ifs.push(r["interfaces"][0]["name"].as_str().unwrap().to_string());
    }
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "gc1", "ifname": "eth0"}]);
    node.cni(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")],
        gc.to_string().as_bytes(),
    )
    .ok_empty();
    let left: Vec<String> = node
        .allocations()
        .iter()
        .map(|a| a["containerId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, vec!["gc1".to_string()]);
    let links = node.host_links();
    assert!(!links.contains(&host_ifs[0]) && !links.contains(&host_ifs[2]));
    assert!(links.contains(&host_ifs[1]));
    assert!(
        pods[1].ping(&node.address),
        "the valid attachment was disturbed"
    );

    // GC without the list is refused rather than collecting everything.
    node.cni(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")],
        conf.to_string().as_bytes(),
    )
    .err(7);
    assert_eq!(node.allocations().len(), 1);
}

#[test]
fn version_lists_supported_versions() {
    for stdin in [
        &br#"{"cniVersion":"1.1.0"}"#[..],
        b"",
        b"{\"cniVersion\":\"42.0.0\"}",
    ] {
        let v = run_plugin(None, &[("CNI_COMMAND", "VERSION")], stdin).ok();
        let versions: Vec<&str> = v["supportedVersions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        for want in ["0.4.0", "1.0.0", "1.1.0"] {
            assert!(versions.contains(&want), "{v}");
        }
    }
}

#[test]
fn bad_input_gets_the_right_error() {
    let node = Node::new("198.18.0.8");
    let pod = Netns::new("p");
    let conf = node.conf("1.0.0", "198.19.8.0/24");
    let good = conf.to_string();
    let ns = pod.path_str();
    let add_env = attachment_env("ADD", "bad", Some(&ns));

    struct Case<'a> {
        what: &'a str,
        env: Vec<(&'a str, &'a str)>,
        stdin: String,
        code: u64,
        mentions: &'a str,
    }
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = conf.clone();
        f(&mut c);
        c.to_string()
    };
    let without = |key: &'static str| {
        let mut c = conf.clone();
        c.as_object_mut().unwrap().remove(key);
        c.to_string()
    };
    let drop_var = |var: &str| without_var(&add_env, var);
    let set_var = |var, value| with_var(&add_env, var, value);
    let cases = vec![
        Case {
            what: "malformed JSON",
            env: add_env.clone(),
            stdin: "{\"cniVersion\": ".into(),
            code: 6,
            mentions: "not valid JSON",
        },
        Case {
            what: "empty stdin",
            env: add_env.clone(),
            stdin: String::new(),
            code: 6,
            mentions: "not valid JSON",
        },
        Case {
            what: "JSON but not an object",
            env: add_env.clone(),
            stdin: "[1]".into(),
            code: 6,
            mentions: "not a JSON object",
        },
        Case {
            what: "binary garbage",
            env: add_env.clone(),
            stdin: "\u{0}\u{1}\u{fffd}garbage".into(),
            code: 6,
            mentions: "not valid JSON",
        },
        Case {
            what: "no CNI_COMMAND",
            env: drop_var("CNI_COMMAND"),
            stdin: good.clone(),
            code: 4,
            mentions: "CNI_COMMAND",
        },
        Case {
            what: "unknown command",
            env: set_var("CNI_COMMAND", "FROB"),
            stdin: good.clone(),
            code: 4,
            mentions: "FROB",
        },
        Case {
            what: "no CNI_CONTAINERID",
            env: drop_var("CNI_CONTAINERID"),
            stdin: good.clone(),
            code: 4,
            mentions: "CNI_CONTAINERID",
        },
        Case {
            what: "no CNI_NETNS",
            env: drop_var("CNI_NETNS"),
            stdin: good.clone(),
            code: 4,
            mentions: "CNI_NETNS",
        },
        Case {
            what: "no CNI_IFNAME",
            env: drop_var("CNI_IFNAME"),
            stdin: good.clone(),
            code: 4,
            mentions: "CNI_IFNAME",
        },
        Case {
            what: "ifname too long",
            env: set_var("CNI_IFNAME", "a-very-long-ifname"),
            stdin: good.clone(),
            code: 4,
            mentions: "interface name",
        },
        Case {
            what: "bad CNI_ARGS",
            env: set_var("CNI_ARGS", "A=1;junk"),
            stdin: good.clone(),
            code: 4,
            mentions: "junk",
        },
        Case {
            what: "netns does not exist",
            env: set_var("CNI_NETNS", "/run/netns/mwt-does-not-exist"),
            stdin: good.clone(),
            code: 4,
            mentions: "mwt-does-not-exist",
        },
        Case {
            what: "netns is not a namespace",
            env: set_var("CNI_NETNS", "/etc/hostname"),
            stdin: good.clone(),
            code: 4,
            mentions: "not a network namespace",
        },
        Case {
            what: "unsupported version",
            env: add_env.clone(),
            stdin: with(&|c| c["cniVersion"] = json!("0.2.0")),
            code: 1,
            mentions: "0.2.0",
        },
        Case {
            what: "no cniVersion",
            env: add_env.clone(),
            stdin: without("cniVersion"),
            code: 7,
            mentions: "cniVersion",
        },
        Case {
            what: "mtu of the wrong type",
            env: add_env.clone(),
            stdin: with(&|c| c["mtu"] = json!("big")),
            code: 7,
            mentions: "mtu",
        },
        Case {
            what: "podCIDR of the wrong type",
            env: add_env.clone(),
            stdin: with(&|c| c["podCIDR"] = json!(24)),
            code: 7,
            mentions: "podCIDR",
        },
        Case {
            what: "podCIDR not a CIDR",
            env: add_env.clone(),
            stdin: with(&|c| c["podCIDR"] = json!("198.19.8.0/33")),
            code: 7,
            mentions: "podCIDR",
        },
        Case {
            what: "podCIDR with host bits",
            env: add_env.clone(),
            stdin: with(&|c| c["podCIDR"] = json!("198.19.8.9/24")),
            code: 7,
            mentions: "host bits",
        },
        Case {
            what: "no podCIDR",
            env: add_env.clone(),
            stdin: without("podCIDR"),
            code: 7,
            mentions: "podCIDR",
        },
        Case {
            what: "bad network name",
            env: add_env.clone(),
            stdin: with(&|c| c["name"] = json!("../../etc")),
            code: 7,
            mentions: "network name",
        },
        Case {
            what: "prevResult of the wrong shape",
            env: add_env.clone(),
            stdin: with(&|c| c["prevResult"] = json!({"ips": 5})),
            code: 7,
            mentions: "prevResult",
        },
        Case {
            what: "dns of the wrong type",
            env: add_env.clone(),
            stdin: with(&|c| c["dns"] = json!(["x"])),
            code: 7,
            mentions: "dns",
        },
    ];
    for case in cases {
        let out = node.cni(&case.env, case.stdin.as_bytes());
        assert!(!out.success, "{}: succeeded: {}", case.what, out.stdout);
        let v = out.json();
        assert_eq!(v["code"], case.code, "{}: {v}", case.what);
        let text = format!("{} {}", v["msg"], v["details"]);
        assert!(text.contains(case.mentions), "{}: {text}", case.what);
        assert!(v["cniVersion"].is_string(), "{}: {v}", case.what);
        assert!(
            out.stderr.is_empty() || !out.stderr.contains("panicked"),
            "{}: {}",
            case.what,
            out.stderr
        );
    }
    assert!(
        node.allocations().is_empty(),
        "a failed ADD leaked an address"
    );
    let (_, links) = pod.exec(&["ip", "-o", "link"]);
    assert!(!links.contains("eth0"), "a failed ADD left an interface");
}

fn without_var<'a>(env: &[(&'a str, &'a str)], var: &str) -> Vec<(&'a str, &'a str)> {
    env.iter().copied().filter(|(k, _)| *k != var).collect()
}

fn with_var<'a>(
    env: &[(&'a str, &'a str)],
    var: &'a str,
    value: &'a str,
) -> Vec<(&'a str, &'a str)> {
    let mut env = without_var(env, var);
    env.push((var, value));
    env
}

#[test]
fn fifty_parallel_adds_get_distinct_addresses() {
    let node = Node::new("198.18.0.9");
    let conf = node.conf("1.0.0", "198.19.9.0/24");
    let pods: Vec<Netns> = (0..50).map(|_| Netns::new("p")).collect();
    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let node = &node;
                let conf = &conf;
                s.spawn(move || node.add(conf, &format!("par{i}"), pod).ok())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ips: HashSet<String> = results.iter().map(pod_ip).collect();
    assert_eq!(ips.len(), 50, "duplicate addresses handed out");
    assert_eq!(node.allocations().len(), 50);
    // Every pod is wired up, not just allocated.
    for (pod, result) in pods.iter().zip(&results).step_by(7) {
        assert!(pod.ping(&node.address), "{}", pod_ip(result));
    }
    std::thread::scope(|s| {
        for (i, pod) in pods.iter().enumerate() {
            let node = &node;
            let conf = &conf;
            s.spawn(move || {
                node.del(conf, &format!("par{i}"), Some(&pod.path_str()))
                    .ok_empty()
            });
        }
    });
    assert!(node.allocations().is_empty());
    assert!(!node.host_links().contains("mw"), "{}", node.host_links());
}

#[test]
fn agent_is_notified_when_listening() {
    let node = Node::new("198.18.0.10");
    let conf = node.conf("1.0.0", "198.19.10.0/24");
    let socket = node.state.path().join("agent.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let pod = Netns::new("p");
    let ip = pod_ip(&node.add(&conf, "note", &pod).ok());
    node.del(&conf, "note", Some(&pod.path_str())).ok_empty();
    listener.set_nonblocking(false).unwrap();
    let mut events = Vec::new();
    for _ in 0..2 {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        events.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    assert_eq!(events[0]["event"], "add");
    assert_eq!(events[0]["ip"], ip);
    assert_eq!(events[0]["podName"], "web");
    assert_eq!(events[0]["containerID"], "note");
    assert_eq!(events[1]["event"], "del");
    assert_eq!(events[1]["ip"], ip);

    // Nobody listening: ADD still succeeds at once.
    drop(listener);
    let other = Netns::new("p");
    node.add(&conf, "quiet", &other).ok();
}

#[test]
fn busy_lock_asks_to_try_again_and_corrupt_state_is_kept() {
    let node = Node::new("198.18.0.11");
    let conf = node.conf("1.0.0", "198.19.11.0/24");
    let pod = Netns::new("p");
    // Another process holds the IPAM lock for longer than the plugin waits.
    let lock_path = node.state.path().join("meshward.lock");
    let lock_file = std::fs::File::create(&lock_path).unwrap();
    let held = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    let err = node.add(&conf, "waits", &pod).err(11);
    assert!(
        err["details"].as_str().unwrap().contains("meshward.lock"),
        "{err}"
    );
    drop(held);
    let (_, links) = pod.exec(&["ip", "-o", "link"]);
    assert!(
        !links.contains("eth0"),
        "a refused ADD created an interface"
    );

    // A corrupt state file is reported (I/O failure) and left as it is.
    let state = node.state.path().join("meshward.json");
    std::fs::write(&state, b"{\"version\": 1, \"allocations\": [").unwrap();
    let err = node.add(&conf, "corrupt", &pod).err(5);
    assert!(
        err["details"].as_str().unwrap().contains("meshward.json"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&state).unwrap(),
        b"{\"version\": 1, \"allocations\": [",
        "the corrupt state was overwritten"
    );
}

#[test]
fn a_second_interface_keeps_the_first_default_route() {
    let node = Node::new("198.18.0.12");
    let conf = node.conf("1.0.0", "198.19.12.0/24");
    let pod = Netns::new("p");
    node.add(&conf, "multi", &pod).ok();
    let second = node
        .cni(
            &with_var(
                &attachment_env("ADD", "multi", Some(&pod.path_str())),
                "CNI_IFNAME",
                "eth1",
            ),
            conf.to_string().as_bytes(),
        )
        .ok();
    assert!(second.get("routes").is_none(), "{second}");
    let (_, route) = pod.exec(&["ip", "route", "show", "default"]);
    assert!(
        route.contains("dev eth0") && !route.contains("eth1"),
        "{route}"
    );
    assert!(pod.ping(&node.address));
    // CHECK of the second interface does not ask for a default route.
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = second;
    node.cni(
        &with_var(
            &attachment_env("CHECK", "multi", Some(&pod.path_str())),
            "CNI_IFNAME",
            "eth1",
        ),
        with_prev.to_string().as_bytes(),
    )
    .ok_empty();
}
