//! The one path from any datastore to the rest of the agent: backends turn
//! what they see into [`Event`]s, the [`Store`] applies each batch of events
//! to the current [`Cluster`] and publishes the result as a new immutable
//! snapshot on a `tokio::sync::watch` channel.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::watch;

use meshward_policy::{ClusterView, NamespaceInfo, PodInfo, PodRef, PolicyObject, PolicyRef};

use super::model::NodeInfo;

/// An object the agent understands, converted from its Kubernetes form.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Object {
    Node(NodeInfo),
    Pod(PodInfo),
    Namespace(NamespaceInfo),
    /// NetworkPolicy, MeshNetworkPolicy or MeshClusterwideNetworkPolicy.
    Policy(PolicyObject),
}

/// The identity of an object (kind, namespace, name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum ObjectKey {
    Node(String),
    Pod(PodRef),
    Namespace(String),
    Policy(PolicyRef),
}

impl Object {
    pub(crate) fn key(&self) -> ObjectKey {
        match self {
            Object::Node(n) => ObjectKey::Node(n.name.clone()),
            Object::Pod(p) => ObjectKey::Pod(PodRef {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
            }),
            Object::Namespace(n) => ObjectKey::Namespace(n.name.clone()),
            Object::Policy(p) => ObjectKey::Policy(p.policy_ref()),
        }
    }

    pub(crate) fn upserted(self) -> Event {
        Event::Upserted(self)
    }
}

impl ObjectKey {
    pub(crate) fn deleted(self) -> Event {
        Event::Deleted(self)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectKey::Node(name) => write!(f, "Node {name}"),
            ObjectKey::Pod(pod) => write!(f, "Pod {pod}"),
            ObjectKey::Namespace(name) => write!(f, "Namespace {name}"),
            ObjectKey::Policy(policy) => write!(f, "{policy}"),
        }
    }
}

/// A change seen by a datastore.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    Upserted(Object),
    Deleted(ObjectKey),
    /// The initial listing is complete: from now on an object absent from
    /// the snapshot really is absent (consumers may prune).
    Synced,
}

/// An immutable view of the cluster as one datastore sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cluster {
    generation: u64,
    synced: bool,
    nodes: BTreeMap<String, Arc<NodeInfo>>,
    pods: BTreeMap<PodRef, Arc<PodInfo>>,
    namespaces: BTreeMap<String, Arc<NamespaceInfo>>,
    policies: BTreeMap<PolicyRef, PolicyObject>,
}

impl Cluster {
    /// Counts the changes published so far (0: the empty start).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the initial listing is complete.
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> + '_ {
        self.nodes.values().map(|n| &**n)
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name).map(|n| &**n)
    }

    #[allow(dead_code, reason = "read by the policy engine, wired next")]
    pub fn pods(&self) -> impl Iterator<Item = &PodInfo> + '_ {
        self.pods.values().map(|p| &**p)
    }

    pub fn policies(&self) -> impl Iterator<Item = &PolicyObject> + '_ {
        self.policies.values()
    }

    /// What the policy compiler reads.
    #[allow(dead_code, reason = "read by the policy engine, wired next")]
    pub fn policy_view(&self) -> ClusterView {
        ClusterView {
            pods: self.pods.values().map(|p| (**p).clone()).collect(),
            namespaces: self.namespaces.values().map(|n| (**n).clone()).collect(),
            policies: self.policies.values().cloned().collect(),
        }
    }

    /// A pod of `namespace/name`, if the datastore has it.
    pub fn pod(&self, pod: &PodRef) -> Option<&PodInfo> {
        self.pods.get(pod).map(|p| &**p)
    }

    /// This view with the addresses the CNI gave pods of `node` in place of
    /// what their status shows (nothing yet, or an earlier sandbox's
    /// address: the status follows the sandbox by a watch round trip); pods
    /// elsewhere are untouched.
    pub fn with_pod_ips<'a>(
        &self,
        node: &str,
        ips: impl IntoIterator<Item = (&'a PodRef, &'a [IpAddr])>,
    ) -> Cluster {
        let mut cluster = self.clone();
        for (pod_ref, addresses) in ips {
            let Some(pod) = cluster.pods.get_mut(pod_ref) else {
                continue;
            };
            if pod.node == node && pod.ips != addresses && !pod.host_network {
                Arc::make_mut(pod).ips = addresses.to_vec();
            }
        }
        cluster
    }

    /// A synced (or not) view holding only `pods`.
    #[cfg(test)]
    pub fn with_pods(pods: Vec<PodInfo>, synced: bool) -> Cluster {
        let mut cluster = Cluster::default();
        for pod in pods {
            cluster.apply(Event::Upserted(Object::Pod(pod)));
        }
        cluster.synced = synced;
        cluster
    }

    /// Applies one event.
    fn apply(&mut self, event: Event) {
        match event {
            Event::Upserted(object) => match object {
                Object::Node(node) => {
                    self.nodes.insert(node.name.clone(), Arc::new(node));
                }
                Object::Pod(pod) => {
                    let key = PodRef {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                    };
                    self.pods.insert(key, Arc::new(pod));
                }
                Object::Namespace(ns) => {
                    self.namespaces.insert(ns.name.clone(), Arc::new(ns));
                }
                Object::Policy(policy) => {
                    self.policies.insert(policy.policy_ref(), policy);
                }
            },
            Event::Deleted(key) => match key {
                ObjectKey::Node(name) => {
                    self.nodes.remove(&name);
                }
                ObjectKey::Pod(pod) => {
                    self.pods.remove(&pod);
                }
                ObjectKey::Namespace(name) => {
                    self.namespaces.remove(&name);
                }
                ObjectKey::Policy(policy) => {
                    self.policies.remove(&policy);
                }
            },
            Event::Synced => self.synced = true,
        }
    }
}

/// The writing end, owned by a datastore backend.
#[derive(Debug)]
pub(crate) struct Store {
    tx: watch::Sender<Arc<Cluster>>,
}

impl Store {
    pub(crate) fn new() -> Self {
        Store {
            tx: watch::Sender::new(Arc::new(Cluster::default())),
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<Cluster>> {
        self.tx.subscribe()
    }

    /// Applies a batch of events and publishes one new snapshot if anything
    /// changed (receivers are not woken otherwise). Returns whether it did.
    pub(crate) fn apply(&self, events: impl IntoIterator<Item = Event>) -> bool {
        self.tx.send_if_modified(|current| {
            let mut next: Option<Cluster> = None;
            for event in events {
                let cluster = next.get_or_insert_with(|| (**current).clone());
                cluster.apply(event);
            }
            match next {
                Some(mut cluster) if cluster != **current => {
                    cluster.generation = current.generation + 1;
                    *current = Arc::new(cluster);
                    true
                }
                _ => false,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, port: u16) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            pod_cidrs: vec![],
            public_key: None,
            endpoint: Some(format!("198.18.0.1:{port}").parse().unwrap()),
            labels: Default::default(),
        }
    }

    #[test]
    fn batches_publish_one_snapshot_and_no_ops_publish_none() {
        let store = Store::new();
        let mut rx = store.subscribe();
        assert!(!rx.has_changed().unwrap());
        assert!(store.apply([
            Event::Upserted(Object::Node(node("a", 1))),
            Event::Upserted(Object::Node(node("b", 1))),
            Event::Synced,
        ]));
        assert!(rx.has_changed().unwrap());
        let snap = rx.borrow_and_update().clone();
        assert_eq!(snap.generation(), 1);
        assert!(snap.synced());
        assert_eq!(
            snap.nodes().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );

        // the same again, and deleting what is absent: nothing to publish
        assert!(!store.apply([
            Event::Upserted(Object::Node(node("a", 1))),
            Event::Deleted(ObjectKey::Node("zz".into())),
            Event::Synced
        ]));
        assert!(!store.apply([]));
        assert!(!rx.has_changed().unwrap());

        assert!(store.apply([
            Event::Upserted(Object::Node(node("a", 2))),
            Event::Deleted(ObjectKey::Node("b".into()))
        ]));
        let snap2 = rx.borrow_and_update().clone();
        assert_eq!(snap2.generation(), 2);
        assert_eq!(snap2.node("a").unwrap().endpoint.unwrap().port(), 2);
        assert!(snap2.node("b").is_none());
        // the old snapshot is untouched
        assert_eq!(snap.node("a").unwrap().endpoint.unwrap().port(), 1);
        assert!(snap.node("b").is_some());
    }
}
