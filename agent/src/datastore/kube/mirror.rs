//! What the Kubernetes datastore makes of watcher events, without I/O:
//! each object is converted the way the file datastore converts it, a
//! rejected object keeps its last good version, a relist becomes one batch
//! of upserts and deletions, and [`Event::Synced`] follows once every kind
//! has been listed.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher;
use tracing::{info, warn};

use meshward_policy::{MeshClusterwideNetworkPolicy, MeshNetworkPolicy};

use crate::datastore::manifest;
use crate::datastore::model::FieldError;
use crate::datastore::store::{Event, Object, ObjectKey};

/// A kind of object the datastore watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    Node,
    Pod,
    Namespace,
    NetworkPolicy,
    MeshNetworkPolicy,
    MeshClusterwideNetworkPolicy,
}

impl Kind {
    pub(crate) const ALL: [Kind; 6] = [
        Kind::Node,
        Kind::Pod,
        Kind::Namespace,
        Kind::NetworkPolicy,
        Kind::MeshNetworkPolicy,
        Kind::MeshClusterwideNetworkPolicy,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// Group, version, kind and plural, from the Rust types.
    pub(crate) fn api_resource(self) -> ApiResource {
        match self {
            Kind::Node => ApiResource::erase::<Node>(&()),
            Kind::Pod => ApiResource::erase::<Pod>(&()),
            Kind::Namespace => ApiResource::erase::<Namespace>(&()),
            Kind::NetworkPolicy => ApiResource::erase::<NetworkPolicy>(&()),
            Kind::MeshNetworkPolicy => ApiResource::erase::<MeshNetworkPolicy>(&()),
            Kind::MeshClusterwideNetworkPolicy => {
                ApiResource::erase::<MeshClusterwideNetworkPolicy>(&())
            }
        }
    }

    /// One of meshward's own CRDs (absent until the chart installs them).
    pub(crate) fn is_crd(self) -> bool {
        matches!(
            self,
            Kind::MeshNetworkPolicy | Kind::MeshClusterwideNetworkPolicy
        )
    }
}

/// The resource as RBAC and `kubectl` name it: `pods`,
/// `networkpolicies.networking.k8s.io`.
impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let resource = self.api_resource();
        match resource.group.as_str() {
            "" => f.write_str(&resource.plural),
            group => write!(f, "{}.{group}", resource.plural),
        }
    }
}

/// One object from the API server, converted: its key and either the
/// object or why it was rejected. `None` when it cannot even be named.
fn convert(kind: Kind, object: DynamicObject) -> Option<(ObjectKey, Result<Object, FieldError>)> {
    let resource = kind.api_resource();
    let (api_version, kind_name) = (resource.api_version.as_str(), resource.kind.as_str());
    let Some(name) = object.metadata.name.clone() else {
        warn!("{kind_name} without metadata.name from the API server; ignored");
        return None;
    };
    let namespace = object
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let key = manifest::key_of(api_version, kind_name, namespace, name)?;
    let mut value = match serde_json::to_value(&object) {
        Ok(value) => value,
        Err(e) => return Some((key, Err(FieldError::new("(object)", e.to_string())))),
    };
    // list items carry no apiVersion/kind
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), api_version.into());
        map.insert("kind".into(), kind_name.into());
    }
    let converted = manifest::convert(api_version, kind_name, value)?;
    Some((key, converted))
}

#[derive(Default)]
struct KindState {
    /// What the store holds for this kind.
    held: BTreeMap<ObjectKey, Object>,
    /// During a (re)list: every object listed so far, `None` for one that
    /// was rejected (its last good version, if any, stays).
    listing: Option<BTreeMap<ObjectKey, Option<Object>>>,
    listed: bool,
}

/// The datastore's view of what the watchers have said.
#[derive(Default)]
pub(crate) struct Mirror {
    kinds: [KindState; Kind::ALL.len()],
    synced: bool,
}

impl Mirror {
    /// Applies one watcher event of `kind`; returns what changes in the
    /// store. Objects listed during a (re)list are held back until its end
    /// so that a relist publishes one consistent snapshot.
    pub(crate) fn step(&mut self, kind: Kind, event: watcher::Event<DynamicObject>) -> Vec<Event> {
        let state = &mut self.kinds[kind.index()];
        let mut events = Vec::new();
        match event {
            watcher::Event::Init => state.listing = Some(BTreeMap::new()),
            watcher::Event::InitApply(object) => {
                let Some((key, converted)) = convert(kind, object) else {
                    return events;
                };
                let good = accept(&key, converted, state.held.contains_key(&key));
                state
                    .listing
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key, good);
            }
            watcher::Event::InitDone => {
                let listed = state.listing.take().unwrap_or_default();
                let mut deleted = 0;
                for key in state.held.keys() {
                    if !listed.contains_key(key) {
                        events.push(key.clone().deleted());
                        deleted += 1;
                    }
                }
                state.held.retain(|key, _| listed.contains_key(key));
                for (key, object) in listed {
                    let Some(object) = object else { continue };
                    if state.held.get(&key) != Some(&object) {
                        state.held.insert(key, object.clone());
                        events.push(object.upserted());
                    }
                }
                if state.listed && deleted > 0 {
                    info!(resource = %kind, deleted, "relisted: objects deleted while the watch was interrupted are removed");
                }
                state.listed = true;
                if !self.synced && self.kinds.iter().all(|k| k.listed) {
                    self.synced = true;
                    events.push(Event::Synced);
                }
            }
            watcher::Event::Apply(object) => {
                let Some((key, converted)) = convert(kind, object) else {
                    return events;
                };
                if let Some(object) = accept(&key, converted, state.held.contains_key(&key)) {
                    if state.held.get(&key) != Some(&object) {
                        state.held.insert(key, object.clone());
                        events.push(object.upserted());
                    }
                }
            }
            watcher::Event::Delete(object) => {
                let Some((key, _)) = convert(kind, object) else {
                    return events;
                };
                if state.held.remove(&key).is_some() {
                    events.push(key.deleted());
                }
            }
        }
        events
    }
}

/// The object, or `None` (logged) when it was rejected.
fn accept(key: &ObjectKey, converted: Result<Object, FieldError>, held: bool) -> Option<Object> {
    match converted {
        Ok(object) => Some(object),
        Err(e) => {
            let outcome = if held {
                "keeping its last good version"
            } else {
                "skipped"
            };
            warn!(object = %key, field = %e.field, "{key}: {e}; {outcome}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use serde::Serialize;

    fn dynamic<T: Serialize>(object: &T) -> DynamicObject {
        serde_json::from_value(serde_json::to_value(object).unwrap()).unwrap()
    }

    fn node(name: &str, cidr: &str) -> DynamicObject {
        dynamic(&Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::NodeSpec {
                pod_cidr: Some(cidr.into()),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn pod(namespace: &str, name: &str) -> DynamicObject {
        dynamic(&Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            ..Default::default()
        })
    }

    fn keys(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Upserted(o) => format!("+{}", o.key()),
                Event::Deleted(k) => format!("-{k}"),
                Event::Synced => "synced".into(),
            })
            .collect()
    }

    fn list(mirror: &mut Mirror, kind: Kind, objects: Vec<DynamicObject>) -> Vec<Event> {
        let mut events = mirror.step(kind, watcher::Event::Init);
        for o in objects {
            events.extend(mirror.step(kind, watcher::Event::InitApply(o)));
        }
        events.extend(mirror.step(kind, watcher::Event::InitDone));
        events
    }

    #[test]
    fn resources_are_named_as_rbac_names_them() {
        let names: Vec<String> = Kind::ALL.iter().map(|k| k.to_string()).collect();
        assert_eq!(
            names,
            [
                "nodes",
                "pods",
                "namespaces",
                "networkpolicies.networking.k8s.io",
                "meshnetworkpolicies.meshward.io",
                "meshclusterwidenetworkpolicies.meshward.io"
            ]
        );
        assert_eq!(
            Kind::NetworkPolicy.api_resource().api_version,
            "networking.k8s.io/v1"
        );
        assert_eq!(Kind::Node.api_resource().api_version, "v1");
        assert!(Kind::MeshNetworkPolicy.is_crd() && !Kind::Pod.is_crd());
    }

    #[test]
    fn synced_once_every_kind_has_listed_and_never_again() {
        let mut m = Mirror::default();
        for kind in &Kind::ALL[..5] {
            let events = list(&mut m, *kind, vec![]);
            assert!(!events.contains(&Event::Synced));
        }
        let events = list(&mut m, Kind::MeshClusterwideNetworkPolicy, vec![]);
        assert_eq!(keys(&events), ["synced"]);
        assert!(list(&mut m, Kind::Node, vec![]).is_empty());
    }

    #[test]
    fn a_listing_is_held_back_until_it_is_complete() {
        let mut m = Mirror::default();
        assert!(m.step(Kind::Node, watcher::Event::Init).is_empty());
        assert!(m
            .step(
                Kind::Node,
                watcher::Event::InitApply(node("a", "198.19.1.0/24"))
            )
            .is_empty());
        // the listing fails and starts over: "a" was never published
        assert!(m.step(Kind::Node, watcher::Event::Init).is_empty());
        m.step(
            Kind::Node,
            watcher::Event::InitApply(node("b", "198.19.2.0/24")),
        );
        let events = m.step(Kind::Node, watcher::Event::InitDone);
        assert_eq!(keys(&events), ["+Node b"]);
    }

    #[test]
    fn a_relist_deletes_what_it_no_longer_lists_and_keeps_the_rest() {
        let mut m = Mirror::default();
        let events = list(
            &mut m,
            Kind::Pod,
            vec![pod("shop", "a"), pod("shop", "b"), pod("shop", "c")],
        );
        assert_eq!(keys(&events), ["+Pod shop/a", "+Pod shop/b", "+Pod shop/c"]);
        // b vanished while the watch was down, d appeared, a and c unchanged
        let events = list(
            &mut m,
            Kind::Pod,
            vec![pod("shop", "a"), pod("shop", "c"), pod("shop", "d")],
        );
        assert_eq!(keys(&events), ["-Pod shop/b", "+Pod shop/d"]);
        // another kind's relist does not touch pods
        assert_eq!(
            keys(&list(&mut m, Kind::Node, vec![])),
            Vec::<String>::new()
        );
        let events = m.step(Kind::Pod, watcher::Event::Delete(pod("shop", "a")));
        assert_eq!(keys(&events), ["-Pod shop/a"]);
        assert!(m
            .step(Kind::Pod, watcher::Event::Delete(pod("shop", "zz")))
            .is_empty());
    }

    #[test]
    fn a_rejected_object_keeps_its_last_good_version() {
        let mut m = Mirror::default();
        list(&mut m, Kind::Node, vec![node("a", "198.19.1.0/24")]);
        let bad = node("a", "198.19.1.1/24");
        assert!(m
            .step(Kind::Node, watcher::Event::Apply(bad.clone()))
            .is_empty());
        // a relist that lists the bad version keeps the good one too
        assert!(list(&mut m, Kind::Node, vec![bad.clone()]).is_empty());
        // a bad newcomer is simply skipped
        assert!(m
            .step(Kind::Node, watcher::Event::Apply(node("b", "nope")))
            .is_empty());
        let events = m.step(
            Kind::Node,
            watcher::Event::Apply(node("a", "198.19.9.0/24")),
        );
        assert_eq!(keys(&events), ["+Node a"]);
        let Event::Upserted(Object::Node(a)) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(a.pod_cidrs[0].to_string(), "198.19.9.0/24");
        // unchanged: nothing to publish
        assert!(m
            .step(
                Kind::Node,
                watcher::Event::Apply(node("a", "198.19.9.0/24"))
            )
            .is_empty());
    }

    #[test]
    fn policies_are_validated_as_in_manifests() {
        let mut m = Mirror::default();
        let np = dynamic(&NetworkPolicy {
            metadata: ObjectMeta {
                name: Some("deny".into()),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            ..Default::default()
        });
        let events = m.step(Kind::NetworkPolicy, watcher::Event::Apply(np));
        assert_eq!(keys(&events), ["+NetworkPolicy shop/deny"]);

        let mnp: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": {"endpointSelector": {}, "egress": [{"toFQDNs": [{"matchPattern": "bad pattern!"}]}]}
        }))
        .unwrap();
        assert!(m
            .step(Kind::MeshNetworkPolicy, watcher::Event::Apply(mnp))
            .is_empty());
        // an unknown field (a newer CRD than this agent) rejects only that object
        let mcnp: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "all"},
            "spec": {"endpointSelector": {}, "futureField": 1}
        }))
        .unwrap();
        assert!(m
            .step(
                Kind::MeshClusterwideNetworkPolicy,
                watcher::Event::Apply(mcnp)
            )
            .is_empty());
        let mcnp: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "all"},
            "spec": {"endpointSelector": {}}
        }))
        .unwrap();
        let events = m.step(
            Kind::MeshClusterwideNetworkPolicy,
            watcher::Event::Apply(mcnp),
        );
        assert_eq!(keys(&events), ["+MeshClusterwideNetworkPolicy all"]);
    }
}
