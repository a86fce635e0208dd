//! The Kubernetes datastore against a fake API server ([`FakeApi`]):
//! real object JSON from k8s-openapi and meshward types, the list/watch
//! protocol with its failure modes, and the Node patch.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Node, NodeSpec, Pod, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use meshward_policy::{
    MeshClusterwideNetworkPolicy, MeshClusterwideNetworkPolicySpec, MeshNetworkPolicy,
    MeshNetworkPolicySpec,
};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::fake_api::FakeApi;
use super::mirror::Kind;
use super::*;
use crate::datastore::model::{ANNOTATION_ENDPOINT, ANNOTATION_PUBLIC_KEY};
use crate::datastore::{Cluster, Datastore, DatastoreError, OwnNode};

const KEY_A: &str = "WAmgVYXkbT2bCtdcDwolI88/iVi/aV3/PHcUBTQSYmo=";
const KEY_B: &str = "kJYJ4q3ahwNYcDmf3zSbBeeGfmLLbOFXYMKkv6bnsU8=";
const WAIT: Duration = Duration::from_secs(20);

fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info,meshward=debug")
        .try_init();
}

fn value<T: Serialize>(object: &T) -> Value {
    serde_json::to_value(object).unwrap()
}

fn meta(namespace: Option<&str>, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(Into::into),
        ..Default::default()
    }
}

fn node(name: &str, cidr: &str, published: Option<(&str, &str)>) -> Value {
    let mut metadata = meta(None, name);
    metadata.labels = Some(BTreeMap::from([("zone".into(), "a".into())]));
    let mut annotations = BTreeMap::from([("other.io/keep".to_string(), "yes".to_string())]);
    if let Some((key, endpoint)) = published {
        annotations.insert(ANNOTATION_PUBLIC_KEY.into(), key.into());
        annotations.insert(ANNOTATION_ENDPOINT.into(), endpoint.into());
    }
    metadata.annotations = Some(annotations);
    value(&Node {
        metadata,
        spec: Some(NodeSpec {
            pod_cidr: Some(cidr.into()),
            pod_cidrs: Some(vec![cidr.into()]),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn pod(namespace: &str, name: &str, node: &str, ip: &str, app: &str) -> Value {
    let mut metadata = meta(Some(namespace), name);
    metadata.labels = Some(BTreeMap::from([("app".into(), app.into())]));
    value(&Pod {
        metadata,
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            containers: vec![Container {
                name: "c".into(),
                ports: Some(vec![ContainerPort {
                    name: Some("http".into()),
                    container_port: 8080,
                    ..Default::default()
                }]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            pod_ip: Some(ip.into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            ..Default::default()
        }),
    })
}

fn namespace(name: &str) -> Value {
    let mut metadata = meta(None, name);
    metadata.labels = Some(BTreeMap::from([("team".into(), name.into())]));
    value(&Namespace {
        metadata,
        ..Default::default()
    })
}

fn network_policy(namespace: &str, name: &str) -> Value {
    value(&NetworkPolicy {
        metadata: meta(Some(namespace), name),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector::default()),
            policy_types: Some(vec!["Ingress".into()]),
            ..Default::default()
        }),
    })
}

fn mesh_policy(namespace: &str, name: &str, pattern: &str) -> Value {
    let spec: MeshNetworkPolicySpec = serde_json::from_value(json!({
        "endpointSelector": {"matchLabels": {"app": "web"}},
        "egress": [{"toFQDNs": [{"matchPattern": pattern}]}],
    }))
    .unwrap();
    let mut policy = MeshNetworkPolicy::new(name, spec);
    policy.metadata.namespace = Some(namespace.into());
    value(&policy)
}

fn clusterwide_policy(name: &str) -> Value {
    let spec: MeshClusterwideNetworkPolicySpec =
        serde_json::from_value(json!({"endpointSelector": {}})).unwrap();
    value(&MeshClusterwideNetworkPolicy::new(name, spec))
}

/// The fake server with a small cluster in it.
async fn cluster() -> FakeApi {
    let api = FakeApi::start().await;
    {
        let mut s = api.state();
        s.put(node(
            "node1",
            "198.19.1.0/24",
            Some((KEY_A, "198.18.0.1:51871")),
        ));
        s.put(node("node2", "198.19.2.0/24", None));
        // rejected: a pod CIDR with host bits
        s.put(node("bad", "198.19.3.1/24", None));
        s.put(namespace("shop"));
        s.put(namespace("kube-system"));
        s.put(pod("shop", "web", "node1", "198.19.1.2", "web"));
        s.put(pod("kube-system", "dns", "node2", "198.19.2.2", "dns"));
        s.put(network_policy("shop", "deny"));
        s.put(mesh_policy("shop", "api", "*.example.test"));
        // rejected by validation
        s.put(mesh_policy("shop", "broken", "bad pattern!"));
        s.put(clusterwide_policy("all"));
    }
    api
}

fn datastore(api: &FakeApi) -> Datastore {
    let config = ::kube::Config::new(api.url.parse().unwrap());
    Datastore::kubernetes(::kube::Client::try_from(config).unwrap())
}

fn problems(ds: &Datastore) -> BTreeMap<String, String> {
    match &ds.backend {
        crate::datastore::Backend::Kubernetes(k) => k.problems(),
        _ => unreachable!(),
    }
}

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

async fn wait_problem(ds: &Datastore, resource: &str, want: &str) -> String {
    for _ in 0..1000 {
        if let Some(p) = problems(ds).get(resource) {
            if p.contains(want) {
                return p.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no problem {want:?} for {resource}: {:?}", problems(ds));
}

fn node_names(c: &Cluster) -> Vec<&str> {
    c.nodes().map(|n| n.name.as_str()).collect()
}

fn pod_names(c: &Cluster) -> Vec<String> {
    c.pods()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect()
}

fn policy_names(c: &Cluster) -> Vec<String> {
    c.policies().map(|p| p.policy_ref().to_string()).collect()
}

fn lists(api: &FakeApi, kind: Kind) -> usize {
    let s = api.state();
    s.requests_for(kind)
        .iter()
        .filter(|r| !r.is_watch())
        .count()
}

fn watches(api: &FakeApi, kind: Kind) -> Vec<String> {
    let s = api.state();
    s.requests_for(kind)
        .iter()
        .filter(|r| r.is_watch())
        .map(|r| r.query.get("resourceVersion").cloned().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn lists_follows_watch_events_and_resumes_after_bookmarks_and_drops() {
    logs();
    let api = cluster().await;
    let ds = datastore(&api);
    let mut rx = ds.subscribe();

    let snap = wait_for(&mut rx, "synced", |c| c.synced()).await;
    assert_eq!(node_names(&snap), ["node1", "node2"]);
    let node1 = snap.node("node1").unwrap();
    assert_eq!(node1.public_key.as_deref(), Some(KEY_A));
    assert_eq!(node1.endpoint, Some("198.18.0.1:51871".parse().unwrap()));
    assert_eq!(node1.pod_cidrs[0].to_string(), "198.19.1.0/24");
    assert_eq!(node1.labels["zone"], "a");
    assert_eq!(pod_names(&snap), ["kube-system/dns", "shop/web"]);
    let web = snap.pods().find(|p| p.name == "web").unwrap();
    assert_eq!(web.node, "node1");
    assert_eq!(web.ips, ["198.19.1.2".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(web.ports[0].port, 8080);
    let view = snap.policy_view();
    let namespaces: Vec<&str> = view.namespaces.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(namespaces, ["kube-system", "shop"]);
    assert_eq!(
        policy_names(&snap),
        [
            "NetworkPolicy shop/deny",
            "MeshNetworkPolicy shop/api",
            "MeshClusterwideNetworkPolicy all"
        ]
    );
    api.wait_requests("every kind watched", |s| {
        Kind::ALL
            .iter()
            .all(|k| s.requests_for(*k).iter().any(|r| r.is_watch()))
    })
    .await;
    {
        let s = api.state();
        for kind in Kind::ALL {
            let requests = s.requests_for(kind);
            assert!(requests.iter().any(|r| !r.is_watch()), "no list of {kind}");
            let watch = requests.iter().find(|r| r.is_watch()).unwrap();
            assert_eq!(watch.query["allowWatchBookmarks"], "true", "{watch:?}");
            assert!(
                !watch.query.contains_key("fieldSelector"),
                "{kind} must be watched cluster-wide: {watch:?}"
            );
        }
    }

    // ADDED, MODIFIED, DELETED
    {
        let mut s = api.state();
        s.put(pod("shop", "web2", "node2", "198.19.2.3", "web"));
        s.put(node(
            "node2",
            "198.19.2.0/24",
            Some((KEY_B, "198.18.0.2:51871")),
        ));
        s.delete(Kind::Pod, "kube-system/dns", true);
        s.delete(Kind::MeshNetworkPolicy, "shop/api", true);
    }
    let snap = wait_for(&mut rx, "watch events", |c| {
        pod_names(c) == ["shop/web", "shop/web2"]
            && c.node("node2").is_some_and(|n| n.is_peerable())
            && c.policies().count() == 2
    })
    .await;
    assert_eq!(
        snap.node("node2").unwrap().public_key.as_deref(),
        Some(KEY_B)
    );

    // a bad version keeps the last good one; later events still apply
    {
        let mut s = api.state();
        s.put(node(
            "node1",
            "198.19.1.0/24",
            Some(("not a key", "198.18.0.1:51871")),
        ));
        s.put(node("node3", "198.19.4.0/24", None));
    }
    let snap = wait_for(&mut rx, "node3", |c| c.node("node3").is_some()).await;
    assert_eq!(
        snap.node("node1").unwrap().public_key.as_deref(),
        Some(KEY_A)
    );

    // a bookmark as the last event of a watch: the next watch resumes from it
    let nodes_listed = lists(&api, Kind::Node);
    let before = watches(&api, Kind::Node).len();
    let bookmark = {
        let mut s = api.state();
        // something newer than any Node event, seen only by the Pod watch
        s.put(pod("shop", "web3", "node2", "198.19.2.4", "web"));
        s.bookmark_and_end(Kind::Node)
    };
    api.wait_requests("the Node watch to resume", |s| {
        s.requests_for(Kind::Node)
            .iter()
            .filter(|r| r.is_watch())
            .count()
            > before
    })
    .await;
    assert_eq!(
        watches(&api, Kind::Node)[before],
        bookmark.to_string(),
        "the Node watch did not resume from the bookmark"
    );

    // a cut connection: the watch resumes, events sent meanwhile arrive
    let pods_listed = lists(&api, Kind::Pod);
    let node_watches = watches(&api, Kind::Node).len();
    {
        let mut s = api.state();
        s.drop_connections();
        s.put(node("node4", "198.19.5.0/24", None));
        s.delete(Kind::Pod, "shop/web", true);
    }
    wait_for(&mut rx, "events after the drop", |c| {
        c.node("node4").is_some() && c.pods().all(|p| p.name != "web")
    })
    .await;
    assert_eq!(
        lists(&api, Kind::Node),
        nodes_listed,
        "resumed, not relisted"
    );
    assert_eq!(lists(&api, Kind::Pod), pods_listed, "resumed, not relisted");
    assert!(
        watches(&api, Kind::Node).len() > node_watches,
        "watched again"
    );
    assert!(rx.borrow().synced());
}

#[tokio::test]
async fn gone_forces_a_relist_that_deletes_what_vanished_meanwhile() {
    logs();
    let api = cluster().await;
    let ds = datastore(&api);
    let mut rx = ds.subscribe();
    wait_for(&mut rx, "synced", |c| c.synced()).await;
    let pods_listed = lists(&api, Kind::Pod);
    let pod_watches = watches(&api, Kind::Pod).len();

    // while no watch is open: changes whose events are compacted away
    {
        let mut s = api.state();
        s.end_watches();
        s.delete(Kind::Pod, "shop/web", false);
        s.put_silently(pod("kube-system", "dns", "node2", "198.19.2.9", "dns"));
        s.put_silently(pod("shop", "late", "node1", "198.19.1.7", "web"));
        s.delete(Kind::Namespace, "kube-system", false);
        s.delete(Kind::NetworkPolicy, "shop/deny", false);
        s.compact();
    }
    let snap = wait_for(&mut rx, "the relist", |c| {
        pod_names(c) == ["kube-system/dns", "shop/late"]
            && c.policy_view().namespaces.len() == 1
            && c.policies().count() == 2
    })
    .await;
    let dns = snap.pods().find(|p| p.name == "dns").unwrap();
    assert_eq!(dns.ips[0].to_string(), "198.19.2.9");
    assert!(snap.synced());
    assert_eq!(node_names(&snap), ["node1", "node2"]);
    assert!(lists(&api, Kind::Pod) > pods_listed);
    // the resumed watch was refused with 410 from its old version
    assert!(watches(&api, Kind::Pod).len() > pod_watches);
}

#[tokio::test]
async fn forbidden_lists_are_reported_and_the_last_state_stays() {
    logs();
    let api = cluster().await;
    api.state().forbid("list", Kind::Pod, true);
    let ds = datastore(&api);
    let mut rx = ds.subscribe();

    let problem = wait_problem(&ds, "pods", "forbidden (403)").await;
    assert!(
        problem
            .starts_with("list pods: forbidden (403): RBAC does not allow meshward to list pods"),
        "{problem}"
    );
    assert!(problem.contains("cannot list resource"), "{problem}");
    // the other kinds arrive; without pods the listing is not complete
    let snap = wait_for(&mut rx, "nodes", |c| c.nodes().count() == 2).await;
    assert!(!snap.synced());
    assert_eq!(snap.pods().count(), 0);
    assert_eq!(problems(&ds).len(), 1, "{:?}", problems(&ds));

    // RBAC fixed: the retry lists pods and syncs
    api.state().forbid("list", Kind::Pod, false);
    wait_for(&mut rx, "synced", |c| c.synced() && c.pods().count() == 2).await;
    assert!(problems(&ds).is_empty(), "{:?}", problems(&ds));

    // RBAC broken again and a relist forced: the pods stay as they were
    {
        let mut s = api.state();
        s.forbid("list", Kind::Pod, true);
        s.end_watches();
        s.delete(Kind::Pod, "shop/web", false);
        s.compact();
    }
    wait_problem(&ds, "pods", "forbidden (403)").await;
    api.state().put(node("node5", "198.19.6.0/24", None));
    let snap = wait_for(&mut rx, "node5", |c| c.node("node5").is_some()).await;
    assert_eq!(pod_names(&snap), ["kube-system/dns", "shop/web"]);
    assert!(snap.synced());
}

#[tokio::test]
async fn an_unreachable_api_server_is_reported_per_resource() {
    logs();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = ::kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
    let ds = Datastore::kubernetes(::kube::Client::try_from(config).unwrap());
    let problem = wait_problem(&ds, "meshnetworkpolicies.meshward.io", "unreachable").await;
    assert!(
        problem
            .starts_with("list meshnetworkpolicies.meshward.io: the API server is unreachable: "),
        "{problem}"
    );
    let snap = ds.subscribe().borrow().clone();
    assert!(!snap.synced());
    assert_eq!(snap.generation(), 0);
}

#[tokio::test]
async fn publishing_patches_only_our_two_annotations() {
    logs();
    let api = cluster().await;
    let ds = datastore(&api);
    let mut rx = ds.subscribe();
    wait_for(&mut rx, "synced", |c| c.synced()).await;

    let own = OwnNode {
        name: "node2".into(),
        public_key: KEY_B.into(),
        endpoint: "198.18.0.2:51871".parse().unwrap(),
        // never written in Kubernetes: the Node's own stay
        pod_cidrs: vec!["198.19.200.0/24".parse().unwrap()],
    };
    ds.publish_own_node(&own).await.unwrap();
    let patch = {
        let s = api.state();
        s.requests
            .iter()
            .find(|r| r.method == "PATCH")
            .cloned()
            .unwrap()
    };
    assert_eq!(patch.path, "/api/v1/nodes/node2");
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(patch.query["fieldManager"], "meshward");
    let body: Value = serde_json::from_str(&patch.body).unwrap();
    assert_eq!(
        body,
        json!({"metadata": {"annotations": {
            ANNOTATION_PUBLIC_KEY: KEY_B,
            ANNOTATION_ENDPOINT: "198.18.0.2:51871",
        }}})
    );
    let snap = wait_for(&mut rx, "the published node", |c| {
        c.node("node2").is_some_and(|n| n.is_peerable())
    })
    .await;
    let node2 = snap.node("node2").unwrap();
    assert_eq!(node2.public_key.as_deref(), Some(KEY_B));
    assert_eq!(node2.pod_cidrs[0].to_string(), "198.19.2.0/24");
    assert_eq!(node2.labels["zone"], "a");

    // key rotation: publishing again replaces the key
    let rotated = OwnNode {
        public_key: KEY_A.into(),
        ..own.clone()
    };
    ds.publish_own_node(&rotated).await.unwrap();
    wait_for(&mut rx, "the rotated key", |c| {
        c.node("node2")
            .is_some_and(|n| n.public_key.as_deref() == Some(KEY_A))
    })
    .await;

    // an absent Node is not created
    let absent = OwnNode {
        name: "node3".into(),
        ..own.clone()
    };
    let err = ds.publish_own_node(&absent).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("patch nodes: not found (404)") && text.contains("node3"),
        "{text}"
    );
    assert!(
        matches!(err, DatastoreError::Kubernetes { verb: "patch", ref resource, .. } if resource == "nodes/node3")
    );

    api.state().forbid("patch", Kind::Node, true);
    let text = ds.publish_own_node(&own).await.unwrap_err().to_string();
    assert!(
        text.starts_with(
            "patch nodes: forbidden (403): RBAC does not allow meshward to patch nodes"
        ),
        "{text}"
    );

    let requests = api.state().requests.len();
    let bad = OwnNode {
        public_key: "not a key".into(),
        ..own
    };
    assert!(matches!(
        ds.publish_own_node(&bad).await,
        Err(DatastoreError::InvalidOwnNode(_))
    ));
    assert_eq!(api.state().requests.len(), requests, "nothing sent");
}

#[test]
fn errors_name_the_verb_the_resource_and_what_to_do() {
    let status = |code, message: &str| {
        ::kube::Error::Api(
            ::kube::core::Status::failure(message, "Reason")
                .with_code(code)
                .boxed(),
        )
    };
    assert_eq!(
        describe(&status(401, "Unauthorized"), "list", Kind::Node, false),
        "list nodes: unauthorized (401): the API server rejected the credentials (Unauthorized)"
    );
    assert_eq!(
        describe(&status(404, ""), "watch", Kind::MeshNetworkPolicy, true),
        "watch meshnetworkpolicies.meshward.io: not found (404): is the meshward CRD installed?"
    );
    assert_eq!(
        describe(&status(500, "etcd down"), "list", Kind::Pod, false),
        "list pods: Reason (500) (etcd down)"
    );
}
