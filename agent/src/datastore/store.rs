//! The one path from any datastore to the rest of the agent: backends turn
//! what they see into [`Event`]s, the [`Store`] applies each batch of events
//! to the current [`Cluster`] and publishes the result as a new immutable
//! snapshot on a `tokio::sync::watch` channel.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::model::NodeInfo;

/// A change seen by a datastore. Later issues add Pods, Namespaces,
/// NetworkPolicies and MeshNetworkPolicies here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    NodeUpserted(NodeInfo),
    NodeDeleted(String),
    /// The initial listing is complete: from now on an object absent from
    /// the snapshot really is absent (consumers may prune).
    Synced,
}

/// An immutable view of the cluster as one datastore sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cluster {
    generation: u64,
    synced: bool,
    nodes: BTreeMap<String, Arc<NodeInfo>>,
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

    /// Applies one event; returns whether anything changed.
    fn apply(&mut self, event: Event) -> bool {
        match event {
            Event::NodeUpserted(node) => {
                if self.nodes.get(&node.name).is_some_and(|n| **n == node) {
                    return false;
                }
                self.nodes.insert(node.name.clone(), Arc::new(node));
                true
            }
            Event::NodeDeleted(name) => self.nodes.remove(&name).is_some(),
            Event::Synced => !std::mem::replace(&mut self.synced, true),
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
            Event::NodeUpserted(node("a", 1)),
            Event::NodeUpserted(node("b", 1)),
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
            Event::NodeUpserted(node("a", 1)),
            Event::NodeDeleted("zz".into()),
            Event::Synced
        ]));
        assert!(!store.apply([]));
        assert!(!rx.has_changed().unwrap());

        assert!(store.apply([
            Event::NodeUpserted(node("a", 2)),
            Event::NodeDeleted("b".into())
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
