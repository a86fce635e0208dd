//! A fake Kubernetes API server for the datastore's tests: HTTP/1.1 on
//! 127.0.0.1, the list/watch protocol for the six resources the datastore
//! reads, merge-patch on Nodes, with knobs for what real API servers do to
//! clients: compaction (410 Gone), dropped connections, bookmarks, RBAC
//! refusals. Objects are plain JSON, typically `serde_json::to_value` of
//! k8s-openapi and meshward types.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kube::api::ApiResource;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::mirror::Kind;

type Body = BoxBody<Bytes, Infallible>;

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub body: String,
}

impl Seen {
    pub(crate) fn is_watch(&self) -> bool {
        self.query
            .get("watch")
            .is_some_and(|w| w == "true" || w == "1")
    }
}

struct Watch {
    path: String,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
pub(crate) struct State {
    rv: u64,
    /// By collection path, then `namespace/name` (or `name`).
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// Every change, for watches that resume: (rv, path, type, object).
    log: Vec<(u64, String, &'static str, Value)>,
    /// Watches from a resourceVersion older than this get 410 Gone.
    compacted: u64,
    watches: Vec<Watch>,
    connections: Vec<AbortHandle>,
    /// (verb, collection path) answered with 403.
    forbidden: BTreeSet<(String, String)>,
    pub requests: Vec<Seen>,
}

/// The collection path of a resource: `/api/v1/nodes`, `/apis/g/v/plural`.
pub(crate) fn path_of(resource: &ApiResource) -> String {
    if resource.group.is_empty() {
        format!("/api/{}/{}", resource.version, resource.plural)
    } else {
        format!(
            "/apis/{}/{}/{}",
            resource.group, resource.version, resource.plural
        )
    }
}

fn kind_of(object: &Value) -> Kind {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    *Kind::ALL
        .iter()
        .find(|k| {
            let r = k.api_resource();
            r.api_version == api_version && r.kind == kind
        })
        .unwrap_or_else(|| panic!("the fake API server does not serve {api_version} {kind}"))
}

fn object_name(object: &Value) -> String {
    let meta = &object["metadata"];
    let name = meta["name"].as_str().expect("metadata.name");
    match meta["namespace"].as_str() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

impl State {
    /// Creates or replaces an object; watchers see ADDED or MODIFIED.
    pub(crate) fn put(&mut self, object: Value) -> u64 {
        self.store(object, true)
    }

    /// Changes an object without any watch event: as if the event had been
    /// compacted away while the client was not watching.
    pub(crate) fn put_silently(&mut self, object: Value) -> u64 {
        self.store(object, false)
    }

    fn store(&mut self, mut object: Value, tell: bool) -> u64 {
        let path = path_of(&kind_of(&object).api_resource());
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let key = object_name(&object);
        let collection = self.objects.entry(path.clone()).or_default();
        let kind = if collection.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        collection.insert(key, object.clone());
        if tell {
            self.event(path, kind, object);
        }
        self.rv
    }

    /// Deletes `namespace/name` (or `name`) of a kind.
    pub(crate) fn delete(&mut self, kind: Kind, key: &str, tell: bool) {
        let path = path_of(&kind.api_resource());
        let mut object = self
            .objects
            .get_mut(&path)
            .and_then(|c| c.remove(key))
            .unwrap_or_else(|| panic!("no {kind} {key} to delete"));
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if tell {
            self.event(path, "DELETED", object);
        }
    }

    fn event(&mut self, path: String, kind: &'static str, object: Value) {
        let line = event_line(kind, &object);
        for w in self.watches.iter().filter(|w| w.path == path) {
            let _ = w.tx.send(line.clone());
        }
        self.log.push((self.rv, path, kind, object));
    }

    /// Forgets the history: watches from older versions get 410 Gone.
    pub(crate) fn compact(&mut self) {
        self.compacted = self.rv;
    }

    /// Ends every watch cleanly, as the API server does at its timeout.
    pub(crate) fn end_watches(&mut self) {
        self.watches.clear();
    }

    /// Ends one kind's watches with a BOOKMARK at the current version as
    /// their last event. Returns that version.
    pub(crate) fn bookmark_and_end(&mut self, kind: Kind) -> u64 {
        let resource = kind.api_resource();
        let path = path_of(&resource);
        let line = line(&json!({
            "type": "BOOKMARK",
            "object": {
                "apiVersion": resource.api_version,
                "kind": resource.kind,
                "metadata": {"resourceVersion": self.rv.to_string()},
            }
        }));
        self.watches.retain(|w| {
            if w.path == path {
                let _ = w.tx.send(line.clone());
                false
            } else {
                true
            }
        });
        self.rv
    }

    /// Cuts every TCP connection: watches break mid-stream.
    pub(crate) fn drop_connections(&mut self) {
        for c in self.connections.drain(..) {
            c.abort();
        }
        self.watches.clear();
    }

    pub(crate) fn forbid(&mut self, verb: &str, kind: Kind, forbidden: bool) {
        let key = (verb.to_string(), path_of(&kind.api_resource()));
        if forbidden {
            self.forbidden.insert(key);
        } else {
            self.forbidden.remove(&key);
        }
    }

    /// The requests made on one kind's collection (lists and watches).
    pub(crate) fn requests_for(&self, kind: Kind) -> Vec<&Seen> {
        let path = path_of(&kind.api_resource());
        self.requests.iter().filter(|r| r.path == path).collect()
    }
}

fn line(value: &Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    line(&json!({"type": kind, "object": object}))
}

fn status(code: u16, reason: &str, message: String) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn respond(code: u16, value: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .unwrap()
}

pub(crate) struct FakeApi {
    pub url: String,
    state: Arc<Mutex<State>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.accept.abort();
        self.state().drop_connections();
    }
}

impl FakeApi {
    pub(crate) async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            rv: 100,
            ..State::default()
        }));
        let accept_state = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = accept_state.clone();
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(&state, req).await) }
                });
                let connection = tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                let mut state = accept_state.lock().unwrap();
                state.connections.retain(|c| !c.is_finished());
                state.connections.push(connection.abort_handle());
            }
        });
        FakeApi { url, state, accept }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits (bounded) until the requests seen satisfy `pred`.
    pub(crate) async fn wait_requests(&self, what: &str, pred: impl Fn(&State) -> bool) {
        for _ in 0..500 {
            if pred(&self.state()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "timed out waiting for {what}; requests: {:#?}",
            self.state().requests
        );
    }
}

async fn handle(state: &Mutex<State>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match req.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };
    let seen = Seen {
        method: method.clone(),
        path: path.clone(),
        query,
        content_type,
        body,
    };
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    state.requests.push(seen.clone());

    let collection = Kind::ALL
        .iter()
        .map(|k| (*k, k.api_resource()))
        .find(|(_, r)| path_of(r) == path);
    match (method.as_str(), collection) {
        ("GET", Some((_, resource))) if seen.is_watch() => watch(&mut state, &resource, &seen),
        ("GET", Some((_, resource))) => list(&state, &resource),
        ("PATCH", None) if path.starts_with("/api/v1/nodes/") => {
            patch_node(&mut state, &path["/api/v1/nodes/".len()..], &seen)
        }
        _ => respond(
            404,
            &status(404, "NotFound", format!("the server could not find {path}")),
        ),
    }
}

fn forbidden(state: &State, verb: &str, resource: &ApiResource) -> Option<Response<Body>> {
    let path = path_of(resource);
    state
        .forbidden
        .contains(&(verb.to_string(), path))
        .then(|| {
            let message = format!(
                "{} is forbidden: User \"system:serviceaccount:kube-system:meshward\" cannot \
                 {verb} resource \"{}\" in API group \"{}\" at the cluster scope",
                resource.plural, resource.plural, resource.group
            );
            respond(403, &status(403, "Forbidden", message))
        })
}

fn list(state: &State, resource: &ApiResource) -> Response<Body> {
    if let Some(refused) = forbidden(state, "list", resource) {
        return refused;
    }
    let items: Vec<Value> = state
        .objects
        .get(&path_of(resource))
        .into_iter()
        .flat_map(|c| c.values())
        .map(|o| {
            // as from a real API server: list items have no apiVersion/kind
            let mut o = o.clone();
            if let Some(map) = o.as_object_mut() {
                map.remove("apiVersion");
                map.remove("kind");
            }
            o
        })
        .collect();
    respond(
        200,
        &json!({
            "apiVersion": resource.api_version,
            "kind": format!("{}List", resource.kind),
            "metadata": {"resourceVersion": state.rv.to_string()},
            "items": items,
        }),
    )
}

fn watch(state: &mut State, resource: &ApiResource, seen: &Seen) -> Response<Body> {
    if let Some(refused) = forbidden(state, "watch", resource) {
        return refused;
    }
    let path = path_of(resource);
    let from: u64 = seen
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(state.rv);
    let (tx, rx) = mpsc::unbounded_channel();
    if from < state.compacted {
        let gone = status(
            410,
            "Expired",
            format!("too old resource version: {from} ({})", state.compacted),
        );
        let _ = tx.send(line(&json!({"type": "ERROR", "object": gone})));
    } else {
        for (rv, p, kind, object) in &state.log {
            if *rv > from && *p == path {
                let _ = tx.send(event_line(kind, object));
            }
        }
        state.watches.push(Watch { path, tx });
    }
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .unwrap()
}

fn patch_node(state: &mut State, name: &str, seen: &Seen) -> Response<Body> {
    let resource = Kind::Node.api_resource();
    if let Some(refused) = forbidden(state, "patch", &resource) {
        return refused;
    }
    let current = state
        .objects
        .get(&path_of(&resource))
        .and_then(|c| c.get(name))
        .cloned();
    let Some(mut node) = current else {
        return respond(
            404,
            &status(404, "NotFound", format!("nodes \"{name}\" not found")),
        );
    };
    if seen.content_type.as_deref() != Some("application/merge-patch+json") {
        return respond(
            415,
            &status(415, "UnsupportedMediaType", "want a merge patch".into()),
        );
    }
    let Ok(patch) = serde_json::from_str::<Value>(&seen.body) else {
        return respond(400, &status(400, "BadRequest", "not JSON".into()));
    };
    merge(&mut node, &patch);
    state.put(node.clone());
    let stored = state.objects[&path_of(&resource)][name].clone();
    respond(200, &stored)
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let Some(target) = target.as_object_mut() else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}
