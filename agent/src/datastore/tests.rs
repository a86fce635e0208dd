//! The file datastore end to end: a temp directory, real inotify.

use std::fs;
use std::path::Path;
use std::time::Duration;

use super::model::ANNOTATION_ENDPOINT;
use super::*;

const KEY_A: &str = "WAmgVYXkbT2bCtdcDwolI88/iVi/aV3/PHcUBTQSYmo=";
const KEY_B: &str = "kJYJ4q3ahwNYcDmf3zSbBeeGfmLLbOFXYMKkv6bnsU8=";
const WAIT: Duration = Duration::from_secs(10);

fn node_yaml(name: &str, cidr: &str, endpoint: Option<&str>) -> String {
    let mut s = format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n");
    if let Some(ep) = endpoint {
        s += &format!("  annotations:\n    meshward.io/endpoint: \"{ep}\"\n");
    }
    s += &format!("spec:\n  podCIDR: {cidr}\n");
    s
}

/// Logs go to the test's output (shown on failure, or with --nocapture).
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("debug")
        .try_init();
}

fn write(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).unwrap();
}

/// Waits until a snapshot satisfies `pred`, or fails after [`WAIT`].
async fn wait_for(
    rx: &mut watch::Receiver<Arc<Cluster>>,
    what: &str,
    pred: impl Fn(&Cluster) -> bool,
) -> Arc<Cluster> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let snap = rx.borrow_and_update().clone();
        if pred(&snap) {
            return snap;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("datastore stopped while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}; last snapshot: {snap:#?}"),
        }
    }
}

fn names(c: &Cluster) -> Vec<&str> {
    c.nodes().map(|n| n.name.as_str()).collect()
}

fn endpoint_of(c: &Cluster, name: &str) -> Option<String> {
    c.node(name)?.endpoint.map(|e| e.to_string())
}

/// No new snapshot for a while.
async fn quiet(rx: &mut watch::Receiver<Arc<Cluster>>) {
    tokio::time::sleep(file::MAX_DELAY + Duration::from_millis(200)).await;
    assert!(
        !rx.has_changed().unwrap(),
        "unexpected change: {:#?}",
        rx.borrow()
    );
}

#[test]
fn datastore_specs() {
    assert_eq!(
        "dir:/a/b".parse::<DatastoreSpec>(),
        Ok(DatastoreSpec::Dir("/a/b".into()))
    );
    assert_eq!(
        "kubernetes".parse::<DatastoreSpec>(),
        Ok(DatastoreSpec::Kubernetes)
    );
    assert!("dir:".parse::<DatastoreSpec>().is_err());
    assert!("/a/b".parse::<DatastoreSpec>().is_err());
    assert_eq!(DatastoreSpec::Dir("/x".into()).to_string(), "dir:/x");
}

#[tokio::test]
async fn start_fails_clearly() {
    logs();
    let err = Datastore::start(&DatastoreSpec::Dir("/nonexistent/meshward".into()))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("datastore directory /nonexistent/meshward: "),
        "{err}"
    );
    // no in-cluster environment and no kubeconfig (as on the test machines)
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let configured = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("KUBECONFIG").is_some()
        || home.is_some_and(|h| h.join(".kube/config").exists());
    if !configured {
        let err = Datastore::start(&DatastoreSpec::Kubernetes)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot configure the Kubernetes client (in-cluster or kubeconfig): "),
            "{err}"
        );
    }
}

#[tokio::test]
async fn follows_writes_renames_and_deletes() {
    logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(
        dir,
        "a.yaml",
        &node_yaml("a", "198.19.1.0/24", Some("198.18.0.1:51871")),
    );
    write(dir, "notes.txt", "not a manifest");
    let ds = Datastore::start(&DatastoreSpec::Dir(dir.into()))
        .await
        .unwrap();
    let mut rx = ds.subscribe();
    let snap = rx.borrow_and_update().clone();
    assert!(snap.synced());
    assert_eq!(names(&snap), ["a"]);
    assert_eq!(
        snap.node("a").unwrap().pod_cidrs,
        vec!["198.19.1.0/24".parse::<IpNet>().unwrap()]
    );

    // a new file
    write(dir, "b.yml", &node_yaml("b", "198.19.2.0/24", None));
    wait_for(&mut rx, "b", |c| names(c) == ["a", "b"]).await;

    // modified in place
    write(
        dir,
        "b.yml",
        &node_yaml("b", "198.19.2.0/24", Some("198.18.0.2:1000")),
    );
    wait_for(&mut rx, "b's endpoint", |c| {
        endpoint_of(c, "b").as_deref() == Some("198.18.0.2:1000")
    })
    .await;

    // atomic rename into place, over an existing file
    write(
        dir,
        ".a.yaml.tmp",
        &node_yaml("a", "198.19.1.0/24", Some("198.18.0.1:2000")),
    );
    fs::rename(dir.join(".a.yaml.tmp"), dir.join("a.yaml")).unwrap();
    wait_for(&mut rx, "a's new endpoint", |c| {
        endpoint_of(c, "a").as_deref() == Some("198.18.0.1:2000")
    })
    .await;

    // a multi-document file, then a List that replaces it
    write(
        dir,
        "more.json",
        r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"c"}}
           {"apiVersion":"v1","kind":"Node","metadata":{"name":"d"}}"#,
    );
    wait_for(&mut rx, "c and d", |c| names(c) == ["a", "b", "c", "d"]).await;
    write(
        dir,
        "more.json",
        r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Node","metadata":{"name":"c"}}]}"#,
    );
    wait_for(&mut rx, "d gone", |c| names(c) == ["a", "b", "c"]).await;

    // renamed away (an editor's backup name), then deleted
    fs::rename(dir.join("b.yml"), dir.join("b.yml~")).unwrap();
    wait_for(&mut rx, "b gone", |c| names(c) == ["a", "c"]).await;
    fs::remove_file(dir.join("more.json")).unwrap();
    wait_for(&mut rx, "c gone", |c| names(c) == ["a"]).await;

    // editor temporaries and other kinds change nothing
    write(dir, ".a.yaml.swp", "garbage");
    write(dir, "a.yaml~", &node_yaml("zz", "10.0.0.0/24", None));
    write(dir, "4913", "");
    write(
        dir,
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    );
    quiet(&mut rx).await;

    // the watcher stops with the datastore
    drop(ds);
    tokio::time::timeout(WAIT, async { while rx.changed().await.is_ok() {} })
        .await
        .expect("channel closes after the datastore is dropped");
}

#[tokio::test]
async fn bad_edits_keep_what_was_in_force() {
    logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let good = format!(
        "{}---\n{}",
        node_yaml("a", "198.19.1.0/24", Some("198.18.0.1:51871")),
        node_yaml("b", "198.19.2.0/24", Some("198.18.0.2:51871"))
    );
    write(dir, "nodes.yaml", &good);
    write(dir, "c.yaml", &node_yaml("c", "198.19.3.0/24", None));
    let ds = Datastore::start(&DatastoreSpec::Dir(dir.into()))
        .await
        .unwrap();
    let mut rx = ds.subscribe();
    assert_eq!(names(&rx.borrow_and_update()), ["a", "b", "c"]);

    // the whole file becomes invalid YAML: a, b stay
    write(dir, "nodes.yaml", "apiVersion: v1\nkind: [Node\n");
    quiet(&mut rx).await;
    // not even readable: still there
    fs::create_dir(dir.join("dir.yaml")).unwrap();
    quiet(&mut rx).await;

    // valid again, but b's endpoint is bad and a's moved: a changes, b keeps
    // its last good version, and a third document adds e
    let edit = format!(
        "{}---\n{}---\n{}",
        node_yaml("a", "198.19.1.0/24", Some("198.18.0.1:3000")),
        node_yaml("b", "198.19.2.0/24", Some("not-an-endpoint")),
        node_yaml("e", "198.19.5.0/24", None),
    );
    write(dir, "nodes.yaml", &edit);
    let snap = wait_for(&mut rx, "a moved, e added", |c| {
        endpoint_of(c, "a").as_deref() == Some("198.18.0.1:3000") && c.node("e").is_some()
    })
    .await;
    assert_eq!(names(&snap), ["a", "b", "c", "e"]);
    assert_eq!(endpoint_of(&snap, "b").as_deref(), Some("198.18.0.2:51871"));

    // a document without a name might have been anything: nothing is dropped
    write(
        dir,
        "nodes.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {labels: {x: z}}\n",
    );
    quiet(&mut rx).await;
    assert_eq!(names(&rx.borrow()), ["a", "b", "c", "e"]);

    // fixed: exactly what the file says
    write(
        dir,
        "nodes.yaml",
        &node_yaml("b", "198.19.2.0/24", Some("198.18.0.2:4000")),
    );
    let snap = wait_for(&mut rx, "the fix", |c| {
        endpoint_of(c, "b").as_deref() == Some("198.18.0.2:4000")
    })
    .await;
    assert_eq!(names(&snap), ["b", "c"]);
}

#[tokio::test]
async fn duplicate_nodes_prefer_the_node_file() {
    logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(
        dir,
        "all.yaml",
        &node_yaml("n1", "198.19.1.0/24", Some("198.18.0.9:1")),
    );
    let ds = Datastore::start(&DatastoreSpec::Dir(dir.into()))
        .await
        .unwrap();
    let mut rx = ds.subscribe();
    write(
        dir,
        "node-n1.yaml",
        &node_yaml("n1", "198.19.1.0/24", Some("198.18.0.1:2")),
    );
    wait_for(&mut rx, "node-n1.yaml wins", |c| {
        endpoint_of(c, "n1").as_deref() == Some("198.18.0.1:2")
    })
    .await;
    fs::remove_file(dir.join("node-n1.yaml")).unwrap();
    wait_for(&mut rx, "back to all.yaml", |c| {
        endpoint_of(c, "n1").as_deref() == Some("198.18.0.9:1")
    })
    .await;
}

fn own(name: &str, key: &str, endpoint: &str, cidr: &str) -> OwnNode {
    OwnNode {
        name: name.into(),
        public_key: key.into(),
        endpoint: endpoint.parse().unwrap(),
        pod_cidrs: vec![cidr.parse().unwrap()],
    }
}

#[tokio::test]
async fn two_agents_on_one_directory_see_each_other() {
    logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // the lab wrote node1's file with its pod CIDR and a label
    write(
        dir,
        "node-node1.yaml",
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n  labels:\n    lab: \"yes\"\n\
         spec:\n  podCIDR: 198.19.1.0/24\n  podCIDRs: [198.19.1.0/24]\n  unschedulable: false\n",
    );
    let spec = DatastoreSpec::Dir(dir.into());
    let ds1 = Datastore::start(&spec).await.unwrap();
    let ds2 = Datastore::start(&spec).await.unwrap();
    let (mut rx1, mut rx2) = (ds1.subscribe(), ds2.subscribe());

    // node1's own CIDR argument loses to the lab's; node2 has none, gets its own
    ds1.publish_own_node(&own("node1", KEY_A, "198.18.0.1:51871", "10.9.9.0/24"))
        .await
        .unwrap();
    ds2.publish_own_node(&own("node2", KEY_B, "198.18.0.2:51871", "198.19.2.0/24"))
        .await
        .unwrap();

    let both = |c: &Cluster| c.nodes().count() == 2 && c.nodes().all(NodeInfo::is_peerable);
    for rx in [&mut rx1, &mut rx2] {
        let snap = wait_for(rx, "both nodes published", both).await;
        let n1 = snap.node("node1").unwrap();
        assert_eq!(n1.public_key.as_deref(), Some(KEY_A));
        assert_eq!(n1.endpoint, Some("198.18.0.1:51871".parse().unwrap()));
        assert_eq!(
            n1.pod_cidrs,
            vec!["198.19.1.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(n1.labels.get("lab").map(String::as_str), Some("yes"));
        let n2 = snap.node("node2").unwrap();
        assert_eq!(n2.public_key.as_deref(), Some(KEY_B));
        assert_eq!(
            n2.pod_cidrs,
            vec!["198.19.2.0/24".parse::<IpNet>().unwrap()]
        );
    }

    // everything else in node1's file is kept
    let text = fs::read_to_string(dir.join("node-node1.yaml")).unwrap();
    assert!(text.contains("unschedulable: false"), "{text}");
    assert!(text.contains(KEY_A), "{text}");
    // each wrote only its own file, and left no temporaries
    let mut files: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["node-node1.yaml", "node-node2.yaml"]);

    // publishing the same again writes nothing; a new endpoint is seen by the peer
    let before = fs::metadata(dir.join("node-node2.yaml")).unwrap();
    assert!(!file::publish_own_node(
        dir,
        &own("node2", KEY_B, "198.18.0.2:51871", "198.19.2.0/24"),
        None
    )
    .unwrap());
    let after = fs::metadata(dir.join("node-node2.yaml")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(before.ino(), after.ino());
    ds2.publish_own_node(&own("node2", KEY_B, "198.18.0.2:6000", "198.19.2.0/24"))
        .await
        .unwrap();
    wait_for(&mut rx1, "node2's new endpoint", |c| {
        endpoint_of(c, "node2").as_deref() == Some("198.18.0.2:6000")
    })
    .await;
}

#[test]
fn publishing_keeps_other_documents_and_refuses_corrupt_files() {
    logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // our Node inside a List, beside another document
    write(
        dir,
        "node-n1.yaml",
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata:\n    \
         name: n1\n    annotations:\n      other: kept\n---\napiVersion: v1\nkind: ConfigMap\n\
         metadata: {name: cm}\ndata: {k: '0x10'}\n",
    );
    let me = own("n1", KEY_A, "[fd00::1]:51871", "198.19.1.0/24");
    assert!(file::publish_own_node(dir, &me, None).unwrap());
    let parsed = manifest::parse(
        &dir.join("node-n1.yaml"),
        &fs::read(dir.join("node-n1.yaml")).unwrap(),
    )
    .unwrap();
    assert!(parsed.errors.is_empty());
    let manifest::Object::Node(n1) = &parsed.objects[0] else {
        panic!("not a node: {:?}", parsed.objects[0])
    };
    assert_eq!(n1.endpoint, Some(me.endpoint));
    assert_eq!(n1.public_key.as_deref(), Some(KEY_A));
    assert_eq!(n1.pod_cidrs, me.pod_cidrs);
    let text = fs::read_to_string(dir.join("node-n1.yaml")).unwrap();
    assert!(text.contains("other: kept"), "{text}");
    assert!(text.contains("kind: ConfigMap"), "{text}");
    assert!(text.contains("\"0x10\""), "{text}");

    // a JSON node file stays JSON
    write(
        dir,
        "node-n2.json",
        r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n2"}}"#,
    );
    assert!(file::publish_own_node(
        dir,
        &own("n2", KEY_B, "198.18.0.2:1", "198.19.2.0/24"),
        None
    )
    .unwrap());
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("node-n2.json")).unwrap()).unwrap();
    assert_eq!(
        v["metadata"]["annotations"][ANNOTATION_ENDPOINT],
        "198.18.0.2:1"
    );

    // a corrupt file is reported and left alone
    write(dir, "node-n3.yaml", "metadata: [\n");
    let err = file::publish_own_node(
        dir,
        &own("n3", KEY_A, "198.18.0.3:1", "198.19.3.0/24"),
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("node-n3.yaml"), "{err}");
    assert_eq!(
        fs::read_to_string(dir.join("node-n3.yaml")).unwrap(),
        "metadata: [\n"
    );
    write(
        dir,
        "node-n4.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: n4, annotations: [x]}\n",
    );
    let err = file::publish_own_node(
        dir,
        &own("n4", KEY_A, "198.18.0.4:1", "198.19.4.0/24"),
        None,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("annotations is not a mapping"),
        "{err}"
    );

    // bad input is an error naming the field
    let err = file::publish_own_node(
        dir,
        &own("n5", "nokey", "198.18.0.5:1", "198.19.5.0/24"),
        None,
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with("own node: field public_key: "),
        "{err}"
    );
    let err = file::publish_own_node(
        dir,
        &own("N_6", KEY_A, "198.18.0.5:1", "198.19.5.0/24"),
        None,
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with("own node: field name: "),
        "{err}"
    );
}

#[tokio::test]
async fn publishing_a_node_defined_elsewhere_keeps_its_cidrs_and_labels() {
    logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(
        dir,
        "nodes.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {zone: a}}\n\
         spec: {podCIDR: 198.19.1.0/24}\n",
    );
    let ds = Datastore::start(&DatastoreSpec::Dir(dir.into()))
        .await
        .unwrap();
    let mut rx = ds.subscribe();
    let mut me = own("n1", KEY_A, "198.18.0.1:51871", "10.0.0.0/24");
    me.pod_cidrs.clear();
    ds.publish_own_node(&me).await.unwrap();
    let snap = wait_for(&mut rx, "n1 published", |c| {
        c.node("n1").is_some_and(NodeInfo::is_peerable)
    })
    .await;
    let n1 = snap.node("n1").unwrap();
    assert_eq!(
        n1.pod_cidrs,
        vec!["198.19.1.0/24".parse::<IpNet>().unwrap()]
    );
    assert_eq!(n1.labels.get("zone").map(String::as_str), Some("a"));
    assert!(dir.join("node-n1.yaml").exists());
}
