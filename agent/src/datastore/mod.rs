//! Where the agent learns about the cluster, and where it publishes itself.
//!
//! Two datastores, one interface: Kubernetes (`kubernetes`, see `kube.rs`)
//! or a directory of Kubernetes-style manifests (`dir:PATH`, see `file.rs`). A backend turns
//! what it sees into [`Event`]s (a kube-rs watcher's apply/delete/init-done
//! map onto them one to one); one [`Store`](store::Store) applies each batch
//! of events and publishes an immutable [`Cluster`] snapshot on a
//! `tokio::sync::watch` channel. Consumers get a
//! `watch::Receiver<Arc<Cluster>>` and cannot tell the backends apart.
//!
//! Why snapshots and not a queue of events: the consumers (the mesh
//! reconciler, later the policy compiler) are level-triggered, they want
//! the whole current set after each change. A watch channel gives exactly
//! that: a slow consumer skips intermediate states instead of queueing them
//! (no unbounded memory, the producer never waits), a new subscriber starts
//! from the current state, a burst of changes (one file rewrite, one
//! relist) becomes one snapshot, and unchanged batches wake nobody. A
//! consumer that needs deltas can diff two snapshots; they share their
//! unchanged objects (`Arc`).
//!
//! Until [`Cluster::synced`] is true the snapshot may be incomplete: don't
//! remove peers for being absent before then.

mod file;
mod kube;
mod manifest;
mod model;
mod store;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;
use tokio::sync::watch;

pub use model::{check_endpoint, validate_node_name, FieldError};
// What consumers read; unused until `meshward agent` is wired.
#[allow(unused_imports)]
pub use model::NodeInfo;
pub use store::Cluster;

/// Which datastore: `dir:PATH` or `kubernetes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatastoreSpec {
    Dir(PathBuf),
    Kubernetes,
}

impl FromStr for DatastoreSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "kubernetes" => Ok(DatastoreSpec::Kubernetes),
            s => match s.strip_prefix("dir:") {
                Some("") => Err("dir: needs a path (dir:PATH)".into()),
                Some(path) => Ok(DatastoreSpec::Dir(PathBuf::from(path))),
                None => Err(format!("{s:?}: want dir:PATH or kubernetes")),
            },
        }
    }
}

impl fmt::Display for DatastoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatastoreSpec::Dir(path) => write!(f, "dir:{}", path.display()),
            DatastoreSpec::Kubernetes => f.write_str("kubernetes"),
        }
    }
}

/// What this agent publishes about its own Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnNode {
    pub name: String,
    /// Standard base64 of the 32-byte public key.
    pub public_key: String,
    pub endpoint: SocketAddr,
    /// Set as `spec.podCIDR(s)` only where the Node has none (in Kubernetes
    /// they are immutable once set; an operator's values always win). Only
    /// the file datastore writes them: in Kubernetes they are the node
    /// IPAM's, read from the Node.
    pub pod_cidrs: Vec<IpNet>,
}

impl OwnNode {
    fn validate(&self) -> Result<(), DatastoreError> {
        let invalid = |field: &str, message: String| {
            DatastoreError::InvalidOwnNode(FieldError::new(field, message))
        };
        validate_node_name(&self.name).map_err(|m| invalid("name", m))?;
        model::parse_public_key(&self.public_key).map_err(|m| invalid("public_key", m))?;
        check_endpoint(self.endpoint).map_err(|m| invalid("endpoint", m))?;
        for (i, net) in self.pod_cidrs.iter().enumerate() {
            if net.trunc() != *net {
                return Err(invalid(
                    &format!("pod_cidrs[{i}]"),
                    format!("{net} has host bits set"),
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error("datastore directory {}: {source}", dir.display())]
    Directory {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot watch datastore directory {}: {source}", dir.display())]
    Watch { dir: PathBuf, source: notify::Error },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("own node: {0}")]
    InvalidOwnNode(FieldError),
    #[error("cannot publish own node into {}: {message}", file.display())]
    OwnNodeFile { file: PathBuf, message: String },
    #[error("cannot configure the Kubernetes client (in-cluster or kubeconfig): {0}")]
    KubeConfig(#[source] ::kube::Error),
    #[error("{message}")]
    Kubernetes {
        verb: &'static str,
        resource: String,
        message: String,
    },
}

/// A running datastore. Dropping it stops it; subscribers then see their
/// channel closed.
#[derive(Debug)]
pub struct Datastore {
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    Dir(file::DirDatastore),
    Kubernetes(kube::KubeDatastore),
}

impl Datastore {
    /// Starts the datastore. For `dir:` the first (synced) snapshot is
    /// already published when this returns; `kubernetes` (in-cluster
    /// credentials, else the kubeconfig) returns at once and syncs when it
    /// has listed everything.
    pub async fn start(spec: &DatastoreSpec) -> Result<Self, DatastoreError> {
        match spec {
            DatastoreSpec::Dir(dir) => {
                let dir = dir.clone();
                let backend = tokio::task::spawn_blocking(move || file::DirDatastore::start(&dir))
                    .await
                    .map_err(|e| DatastoreError::Io {
                        path: PathBuf::new(),
                        source: std::io::Error::other(e),
                    })??;
                Ok(Datastore {
                    backend: Backend::Dir(backend),
                })
            }
            DatastoreSpec::Kubernetes => {
                let client = ::kube::Client::try_default()
                    .await
                    .map_err(DatastoreError::KubeConfig)?;
                Ok(Datastore::kubernetes(client))
            }
        }
    }

    /// The Kubernetes datastore on a given client.
    pub(crate) fn kubernetes(client: ::kube::Client) -> Self {
        Datastore {
            backend: Backend::Kubernetes(kube::KubeDatastore::start(client)),
        }
    }

    /// The current snapshot and every later one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Cluster>> {
        match &self.backend {
            Backend::Dir(d) => d.store().subscribe(),
            Backend::Kubernetes(k) => k.store().subscribe(),
        }
    }

    /// Sets `meshward.io/public-key` and `meshward.io/endpoint` on our own
    /// Node (patch semantics: nothing else changes; in the file datastore
    /// the Node is created if absent). Idempotent and cheap when nothing
    /// changes, so the agent may call it whenever its own Node in a
    /// snapshot differs from what it wants published.
    pub async fn publish_own_node(&self, own: &OwnNode) -> Result<(), DatastoreError> {
        match &self.backend {
            Backend::Dir(d) => d.publish_own_node(own).await,
            Backend::Kubernetes(k) => k.publish_own_node(own).await,
        }
    }
}

#[cfg(test)]
mod tests;
