//! Wires the flow-event producers to the hub: the policy engine (DNS
//! verdicts), the nflog listener (policy drops), the mesh watcher (peers
//! up and down, invalid tunnel packets) and the pod index (addresses to
//! pods, from every datastore snapshot).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use meshward_mesh::Mesh;
use tokio::sync::watch;
use tracing::warn;

use super::events::{EventHub, FlowEvent, FlowType, MeshInfo, Verdict};
use super::nflog;
use super::policy::PolicyEngine;
use crate::datastore::Cluster;

/// How often the mesh's counters are compared.
const MESH_POLL: Duration = Duration::from_secs(1);

/// Starts every producer. A producer that cannot start is logged and left
/// out: observability never stops the agent.
pub fn start(
    hub: &Arc<EventHub>,
    engine: &PolicyEngine,
    nflog_group: u16,
    mesh: Arc<Mesh>,
    mut datastore: watch::Receiver<Arc<Cluster>>,
) {
    hub.set_cluster(&datastore.borrow_and_update());
    let pods = hub.clone();
    tokio::spawn(async move {
        while datastore.changed().await.is_ok() {
            let snapshot = datastore.borrow_and_update().clone();
            pods.set_cluster(&snapshot);
        }
    });

    engine.observe(hub.clone());
    let policy = engine.handle();
    if let Err(e) = nflog::start(nflog_group, hub.clone(), move || policy.rules()) {
        warn!("policy drops will not show as flow events: {e:#}");
    }

    let watcher = hub.clone();
    tokio::spawn(async move {
        let mut watch = MeshWatch::default();
        let mut tick = tokio::time::interval(MESH_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let stats = mesh.stats();
            let peers: Vec<(String, bool)> = stats
                .peers
                .iter()
                .map(|p| (p.name.clone(), p.session_up))
                .collect();
            let drops: Vec<(&'static str, u64, bool)> = stats
                .drops
                .iter()
                .map(|(r, n)| (r.as_str(), n, r.is_suspicious()))
                .collect();
            for event in watch.diff(&peers, &drops) {
                watcher.publish(event);
            }
        }
    });
}

/// The mesh's state as last seen; [`MeshWatch::diff`] turns changes into
/// events. The first call only records.
#[derive(Default)]
pub struct MeshWatch {
    seen: bool,
    up: BTreeMap<String, bool>,
    drops: BTreeMap<&'static str, u64>,
}

impl MeshWatch {
    /// `peers`: (name, session up); `drops`: (reason, total, suspicious).
    pub fn diff(
        &mut self,
        peers: &[(String, bool)],
        drops: &[(&'static str, u64, bool)],
    ) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        let first = !self.seen;
        self.seen = true;
        let mut now: BTreeMap<String, bool> = BTreeMap::new();
        for (name, up) in peers {
            now.insert(name.clone(), *up);
            let before = self.up.get(name).copied().unwrap_or(false);
            if !first && before != *up {
                out.push(peer_event(name, *up, None));
            }
        }
        for (name, was_up) in &self.up {
            if *was_up && !now.contains_key(name) {
                out.push(peer_event(name, false, Some("peer removed")));
            }
        }
        self.up = now;
        for &(reason, total, suspicious) in drops {
            let before = self.drops.insert(reason, total).unwrap_or(0);
            let new = total.saturating_sub(before);
            if first || new == 0 {
                continue;
            }
            let mut e = FlowEvent::new(FlowType::Mesh, Verdict::Dropped);
            e.mesh = Some(MeshInfo {
                peer: None,
                event: if suspicious {
                    "invalid-packets"
                } else {
                    "undeliverable"
                }
                .into(),
                count: Some(new),
            });
            e.reason = Some(reason.into());
            out.push(e);
        }
        out
    }
}

fn peer_event(name: &str, up: bool, reason: Option<&str>) -> FlowEvent {
    let mut e = FlowEvent::new(FlowType::Mesh, Verdict::Info);
    e.mesh = Some(MeshInfo {
        peer: Some(name.into()),
        event: if up { "peer-up" } else { "peer-down" }.into(),
        count: None,
    });
    e.reason = reason.map(Into::into);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_changes_and_new_drops_become_events() {
        let mut w = MeshWatch::default();
        let peers = |v: &[(&str, bool)]| -> Vec<(String, bool)> {
            v.iter().map(|(n, u)| (n.to_string(), *u)).collect()
        };
        // the first look only records (no history to compare with)
        assert!(w
            .diff(&peers(&[("node2", false)]), &[("decrypt_failed", 5, true)])
            .is_empty());
        let e = w.diff(
            &peers(&[("node2", true), ("node3", false)]),
            &[("decrypt_failed", 8, true)],
        );
        let summary: Vec<String> = e
            .iter()
            .map(|e| {
                let m = e.mesh.as_ref().unwrap();
                format!("{} {:?} {:?}", m.event, m.peer, m.count)
            })
            .collect();
        assert_eq!(
            summary,
            [
                "peer-up Some(\"node2\") None",
                "invalid-packets None Some(3)"
            ]
        );
        assert!(e[1].verdict == Verdict::Dropped);
        assert_eq!(e[1].reason.as_deref(), Some("decrypt_failed"));
        // nothing changed: nothing to say
        assert!(w
            .diff(
                &peers(&[("node2", true), ("node3", false)]),
                &[("decrypt_failed", 8, true)]
            )
            .is_empty());
        // a peer that was up goes away
        let e = w.diff(&peers(&[("node3", false)]), &[]);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].mesh.as_ref().unwrap().event, "peer-down");
    }
}
