//! The Kubernetes datastore: one kube-runtime watcher per kind (Nodes,
//! Pods, Namespaces, NetworkPolicies and the two meshward policy CRDs),
//! with kube's default backoff, feeding the same [`Store`] as the file
//! datastore. What the events mean is decided in [`mirror`] (pure); this
//! module only drives the watchers, reports their errors and patches our
//! own Node.
//!
//! - Objects are watched untyped (`DynamicObject`) and converted one by one
//!   like manifests, so a single bad object (e.g. a policy written for a
//!   newer CRD) is rejected on its own instead of failing a whole list.
//! - While the API server is unreachable or forbids a list, the watcher
//!   retries with backoff and the last snapshot stays published: the data
//!   plane keeps running on it. Errors are logged once per change, naming
//!   the verb and the resource.
//! - Pods are watched cluster-wide (no `spec.nodeName` selector): policies
//!   select peers on every node.

mod mirror;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use serde_json::json;
use tracing::{debug, error, info};

use super::model::{ANNOTATION_ENDPOINT, ANNOTATION_PUBLIC_KEY};
use super::store::Store;
use super::{DatastoreError, OwnNode};
use mirror::{Kind, Mirror};

/// Who we are in `metadata.managedFields`.
const FIELD_MANAGER: &str = "meshward";
/// Most watcher events applied as one batch (one snapshot).
const MAX_BATCH: usize = 1024;

/// A running Kubernetes datastore. Dropping it stops the watchers.
pub(crate) struct KubeDatastore {
    client: Client,
    store: Arc<Store>,
    problems: Arc<Mutex<BTreeMap<Kind, String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for KubeDatastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeDatastore").finish_non_exhaustive()
    }
}

impl Drop for KubeDatastore {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubeDatastore {
    /// Starts watching; returns at once. The snapshot is synced when every
    /// kind has been listed.
    pub(crate) fn start(client: Client) -> Self {
        let store = Arc::new(Store::new());
        let problems = Arc::new(Mutex::new(BTreeMap::new()));
        let task = tokio::spawn(follow(client.clone(), store.clone(), problems.clone()));
        KubeDatastore {
            client,
            store,
            problems,
            task,
        }
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// What keeps each failing watcher from working now, by resource.
    #[cfg_attr(not(test), allow(dead_code, reason = "for the health endpoint"))]
    pub(crate) fn problems(&self) -> BTreeMap<String, String> {
        let problems = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        problems
            .iter()
            .map(|(kind, p)| (kind.to_string(), p.clone()))
            .collect()
    }

    /// Merge-patches our two annotations onto our Node; nothing else (the
    /// pod CIDRs belong to Kubernetes).
    pub(crate) async fn publish_own_node(&self, own: &OwnNode) -> Result<(), DatastoreError> {
        own.validate()?;
        let nodes: Api<Node> = Api::all(self.client.clone());
        let patch = json!({
            "metadata": {
                "annotations": {
                    ANNOTATION_PUBLIC_KEY: own.public_key,
                    ANNOTATION_ENDPOINT: own.endpoint.to_string(),
                }
            }
        });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        nodes
            .patch(&own.name, &params, &Patch::Merge(&patch))
            .await
            .map_err(|e| DatastoreError::Kubernetes {
                verb: "patch",
                resource: format!("nodes/{}", own.name),
                message: describe(&e, "patch", "nodes", false),
            })?;
        info!(node = %own.name, endpoint = %own.endpoint, "published own node");
        Ok(())
    }
}

/// Runs every watcher until the datastore is dropped.
async fn follow(client: Client, store: Arc<Store>, problems: Arc<Mutex<BTreeMap<Kind, String>>>) {
    let streams = Kind::ALL.map(|kind| {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.api_resource());
        watcher(api, watcher::Config::default())
            .default_backoff()
            .map(move |result| (kind, result))
            .boxed()
    });
    let mut all = futures::stream::select_all(streams);
    let mut mirror = Mirror::default();
    while let Some(first) = all.next().await {
        let mut events = Vec::new();
        let mut item = Some(first);
        let mut count = 0;
        // everything already received goes into the same snapshot
        while let Some((kind, result)) = item.take() {
            match result {
                Ok(event) => {
                    if !matches!(event, watcher::Event::Init) {
                        recovered(&problems, kind);
                    }
                    events.extend(mirror.step(kind, event));
                }
                Err(e) => failed(&problems, kind, &e),
            }
            count += 1;
            if count < MAX_BATCH {
                item = all.next().now_or_never().flatten();
            }
        }
        if !events.is_empty() {
            debug!(changes = events.len(), "Kubernetes datastore changed");
            store.apply(events);
        }
    }
}

fn failed(problems: &Mutex<BTreeMap<Kind, String>>, kind: Kind, e: &watcher::Error) {
    let (verb, error) = match e {
        watcher::Error::InitialListFailed(e) => ("list", e),
        watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => ("watch", e),
        watcher::Error::WatchError(status) if status.code == 410 => {
            info!(resource = %kind, "watch: resource version too old (410 Gone); relisting");
            return;
        }
        watcher::Error::WatchError(status) => {
            let e = kube::Error::Api(status.clone());
            return report(problems, kind, describe(&e, "watch", kind, kind.is_crd()));
        }
        watcher::Error::NoResourceVersion => {
            let message = format!("list {kind}: the API server sent no resourceVersion");
            return report(problems, kind, message);
        }
    };
    report(problems, kind, describe(error, verb, kind, kind.is_crd()));
}

/// Logs a watcher's problem when it is new, and remembers it.
fn report(problems: &Mutex<BTreeMap<Kind, String>>, kind: Kind, message: String) {
    let mut problems = problems.lock().unwrap_or_else(|e| e.into_inner());
    if problems.get(&kind) != Some(&message) {
        error!(resource = %kind, "{message}; retrying with backoff, the last known state stays in force");
    } else {
        debug!(resource = %kind, "{message}; retrying");
    }
    problems.insert(kind, message);
}

fn recovered(problems: &Mutex<BTreeMap<Kind, String>>, kind: Kind) {
    let mut problems = problems.lock().unwrap_or_else(|e| e.into_inner());
    if problems.remove(&kind).is_some() {
        info!(resource = %kind, "Kubernetes API works again for {kind}");
    }
}

/// A client error as an operator can act on it: `list pods: forbidden
/// (403) ...`. `crd`: the resource is one of meshward's CRDs.
fn describe(
    error: &kube::Error,
    verb: &str,
    resource: impl std::fmt::Display,
    crd: bool,
) -> String {
    let what = format!("{verb} {resource}");
    match error {
        kube::Error::Api(status) => {
            let detail = if status.message.is_empty() {
                String::new()
            } else {
                format!(" ({})", status.message)
            };
            match status.code {
                401 => format!(
                    "{what}: unauthorized (401): the API server rejected the credentials{detail}"
                ),
                403 => format!(
                    "{what}: forbidden (403): RBAC does not allow meshward to {verb} {resource} \
                     (check its ClusterRole){detail}"
                ),
                404 if crd => {
                    format!("{what}: not found (404): is the meshward CRD installed?{detail}")
                }
                404 => format!("{what}: not found (404){detail}"),
                code => {
                    let reason = if status.reason.is_empty() {
                        "error"
                    } else {
                        status.reason.as_str()
                    };
                    format!("{what}: {reason} ({code}){detail}")
                }
            }
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) => {
            format!("{what}: the API server is unreachable: {}", chain(error))
        }
        _ => format!("{what}: {}", chain(error)),
    }
}

/// An error and its sources, `: `-separated, without repeats.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod fake_api;
#[cfg(test)]
mod tests;
