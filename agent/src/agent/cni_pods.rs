//! Pods the CNI plugin attached before their Pod status shows an address.
//!
//! Kubelet reports a pod's IP in its status only after the sandbox is up,
//! and the agent sees that a watch round trip later: until then the pod runs
//! with no policy of its own. `meshward-cni` therefore tells the agent the
//! address at ADD (pod namespace/name from `CNI_ARGS`), the agent treats it
//! as the pod's address until the status has one, and answers once the
//! policy that selects the pod is in the kernel. With `agentWaitSeconds` the
//! CNI waits for that answer, so a pod never runs before its policy (what
//! Cilium does by waiting for the endpoint's regeneration).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use meshward_policy::PodRef;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::protocol::{CniEvent, Response};
use crate::datastore::Cluster;

/// An address whose pod never appears in the datastore is forgotten after
/// this long (a pod deleted before the watch delivered it).
const UNSEEN_FOR: Duration = Duration::from_secs(600);
/// The interface Kubernetes runtimes give a pod's own network (`CNI_IFNAME`).
const POD_IFNAME: &str = "eth0";

struct Attached {
    /// The pod's `metadata.uid` when the runtime passed `K8S_POD_UID`.
    uid: Option<String>,
    container_id: String,
    ifname: String,
    ips: Vec<IpAddr>,
    since: Instant,
}

struct Waiting {
    pod: PodRef,
    uid: Option<String>,
    reply: oneshot::Sender<Response>,
    since: Instant,
}

#[derive(Default)]
pub(super) struct CniPods {
    attached: BTreeMap<PodRef, Attached>,
    waiting: Vec<Waiting>,
}

impl CniPods {
    /// Records an ADD or DEL. Answers at once what needs no policy (DEL, a
    /// sandbox without a Kubernetes pod, bad events); an ADD's answer waits
    /// for [`CniPods::settle`].
    pub fn record(&mut self, event: CniEvent, reply: oneshot::Sender<Response>) {
        let (Some(namespace), Some(name)) = (event.pod_namespace, event.pod_name) else {
            // podman and other runtimes without K8S_POD_*: no policy selects it
            let _ = reply.send(Response::default_ok());
            return;
        };
        let pod = PodRef { namespace, name };
        if event.ifname != POD_IFNAME {
            // a secondary interface (Multus): the pod's address is eth0's
            let _ = reply.send(Response::default_ok());
            return;
        }
        match event.event.as_str() {
            "add" => {
                debug!(%pod, ip = %event.ip, container = %event.container_id, "CNI ADD");
                self.attached.insert(
                    pod.clone(),
                    Attached {
                        uid: event.pod_uid.clone(),
                        container_id: event.container_id,
                        ifname: event.ifname,
                        ips: vec![event.ip],
                        since: Instant::now(),
                    },
                );
                self.waiting.push(Waiting {
                    pod,
                    uid: event.pod_uid,
                    reply,
                    since: Instant::now(),
                });
            }
            "del" => {
                // a DEL of an older sandbox leaves the current one's address
                if self.attached.get(&pod).is_some_and(|a| {
                    a.container_id == event.container_id && a.ifname == event.ifname
                }) {
                    debug!(%pod, "CNI DEL");
                    self.attached.remove(&pod);
                }
                let _ = reply.send(Response::default_ok());
            }
            other => {
                let _ = reply.send(Response::error(format!(
                    "unknown CNI event {other:?} (want \"add\" or \"del\")"
                )));
            }
        }
    }

    /// Seeds the addresses of pods attached before this agent started, from
    /// the CNI's allocation store (`stateDir/ipam/<network>.json`): a pod
    /// whose status still shows no address keeps its policy across an agent
    /// restart. Allocations without a Kubernetes pod are skipped.
    pub fn restore(&mut self, allocations: &[meshward_cni::ipam::Allocation]) {
        for a in allocations.iter().filter(|a| a.key.ifname == POD_IFNAME) {
            let (Some(namespace), Some(name)) = (&a.pod.namespace, &a.pod.name) else {
                continue;
            };
            let pod = PodRef {
                namespace: namespace.clone(),
                name: name.clone(),
            };
            // Several sandboxes of one pod (an old one not DELed yet): all
            // their addresses are the pod's until the runtime releases them.
            let entry = self.attached.entry(pod).or_insert_with(|| Attached {
                uid: a.pod.uid.clone(),
                container_id: a.key.container_id.clone(),
                ifname: a.key.ifname.clone(),
                ips: Vec::new(),
                since: Instant::now(),
            });
            entry.ips.push(IpAddr::V4(a.ip));
        }
    }

    /// `cluster` with the attached addresses, when there are any to add.
    pub fn overlay(&self, cluster: &Cluster, node: &str) -> Option<Cluster> {
        if self.attached.is_empty() {
            return None;
        }
        Some(
            cluster.with_pod_ips(
                node,
                self.attached
                    .iter()
                    .filter(|(pod, a)| {
                        cluster
                            .pod(pod)
                            .is_some_and(|info| same_pod(a.uid.as_deref(), info))
                    })
                    .map(|(pod, a)| (pod, a.ips.as_slice())),
            ),
        )
    }

    /// After a policy pass over `cluster` (+ the overlay): answers the ADDs
    /// whose pod is known, once `applied` says the kernel holds the rules;
    /// forgets addresses the Pod status now shows.
    pub fn settle(&mut self, cluster: &Cluster, node: &str, applied: bool) {
        let now = Instant::now();
        let synced = cluster.synced();
        // The status wins once it shows the CNI's address (an address it
        // showed before came from an earlier sandbox).
        // A datastore object of an earlier pod of the same name (its
        // deletion not seen yet) counts as not seen.
        self.attached.retain(|pod, a| match cluster.pod(pod) {
            Some(info) if same_pod(a.uid.as_deref(), info) => {
                !a.ips.iter().any(|ip| info.ips.contains(ip))
            }
            _ => !synced || now.duration_since(a.since) < UNSEEN_FOR,
        });
        let mut still = Vec::new();
        for w in self.waiting.drain(..) {
            if w.reply.is_closed() {
                continue;
            }
            match cluster.pod(&w.pod) {
                // an earlier pod of this name: wait for the watch to bring ours
                Some(info) if !same_pod(w.uid.as_deref(), info) => still.push(w),
                // not bound to a node yet as far as the watch knows: wait
                Some(info) if info.node.is_empty() => still.push(w),
                Some(info) if info.node != node => {
                    warn!(pod = %w.pod, on = %info.node, "CNI ADD for a pod scheduled elsewhere");
                    let _ = w.reply.send(Response::error(format!(
                        "pod {} is scheduled on node {:?}, not on {node}",
                        w.pod, info.node
                    )));
                }
                Some(_) if applied => {
                    info!(pod = %w.pod, waited_ms = now.duration_since(w.since).as_millis() as u64, "CNI ADD: the pod's policy is in force");
                    let _ = w.reply.send(Response::default_ok());
                }
                // not in the datastore yet, or the kernel refused: next pass
                _ => still.push(w),
            }
        }
        self.waiting = still;
    }
}

/// Whether the datastore's `info` is the pod the CNI attached: by UID when
/// both sides know it, else by name alone (runtimes without `K8S_POD_UID`,
/// file manifests without `metadata.uid`).
fn same_pod(uid: Option<&str>, info: &meshward_policy::PodInfo) -> bool {
    match uid {
        Some(uid) if !uid.is_empty() && !info.uid.is_empty() => uid == info.uid,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshward_policy::PodInfo;
    use tokio::sync::oneshot::error::TryRecvError;

    fn pod(name: &str, node: &str, ips: &[&str]) -> PodInfo {
        PodInfo {
            namespace: "shop".into(),
            name: name.into(),
            uid: String::new(),
            node: node.into(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            labels: Default::default(),
            ports: vec![],
            host_network: false,
        }
    }

    fn event(kind: &str, name: &str, container: &str, ip: &str) -> CniEvent {
        CniEvent {
            event: kind.into(),
            container_id: container.into(),
            ifname: "eth0".into(),
            ip: ip.parse().unwrap(),
            pod_namespace: Some("shop".into()),
            pod_name: Some(name.into()),
            pod_uid: None,
        }
    }

    fn pod_ref(name: &str) -> PodRef {
        PodRef {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    fn record(pods: &mut CniPods, e: CniEvent) -> oneshot::Receiver<Response> {
        let (tx, rx) = oneshot::channel();
        pods.record(e, tx);
        rx
    }

    #[test]
    fn an_add_is_answered_once_its_pod_is_known_and_the_kernel_has_the_rules() {
        let mut pods = CniPods::default();
        let mut answer = record(&mut pods, event("add", "web-1", "c1", "198.19.1.7"));
        // the pod is not in the datastore yet: no answer, no overlay effect
        let empty = Cluster::with_pods(vec![], true);
        pods.settle(&empty, "node1", true);
        assert!(matches!(answer.try_recv(), Err(TryRecvError::Empty)));

        let known = Cluster::with_pods(vec![pod("web-1", "node1", &[])], true);
        let view = pods.overlay(&known, "node1").expect("an overlay");
        assert_eq!(
            view.pod(&pod_ref("web-1")).unwrap().ips,
            ["198.19.1.7".parse::<IpAddr>().unwrap()]
        );
        // the kernel refused the rules: still waiting
        pods.settle(&known, "node1", false);
        assert!(matches!(answer.try_recv(), Err(TryRecvError::Empty)));
        pods.settle(&known, "node1", true);
        assert!(answer.try_recv().unwrap().ok);

        // a status still showing an earlier sandbox's address: the CNI's wins
        let stale = Cluster::with_pods(vec![pod("web-1", "node1", &["198.19.1.9"])], true);
        pods.settle(&stale, "node1", true);
        assert_eq!(
            pods.overlay(&stale, "node1")
                .unwrap()
                .pod(&pod_ref("web-1"))
                .unwrap()
                .ips,
            ["198.19.1.7".parse::<IpAddr>().unwrap()]
        );
        // once the status shows the CNI's address, the overlay is forgotten
        let reported = Cluster::with_pods(vec![pod("web-1", "node1", &["198.19.1.7"])], true);
        pods.settle(&reported, "node1", true);
        assert!(pods.overlay(&known, "node1").is_none());
    }

    #[test]
    fn addresses_apply_only_to_own_pods_and_a_foreign_pod_is_refused() {
        let mut pods = CniPods::default();
        let mut answer = record(&mut pods, event("add", "web-1", "c1", "198.19.1.7"));
        let elsewhere = Cluster::with_pods(vec![pod("web-1", "node2", &[])], true);
        let view = pods.overlay(&elsewhere, "node1").unwrap();
        assert!(view.pod(&pod_ref("web-1")).unwrap().ips.is_empty());
        pods.settle(&elsewhere, "node1", true);
        let response = answer.try_recv().unwrap();
        assert!(!response.ok);
        assert!(response.error.unwrap().contains("node2"));
    }

    #[test]
    fn a_del_of_an_older_sandbox_keeps_the_current_address() {
        let mut pods = CniPods::default();
        let _first = record(&mut pods, event("add", "web-1", "old", "198.19.1.7"));
        let _second = record(&mut pods, event("add", "web-1", "new", "198.19.1.8"));
        let mut del = record(&mut pods, event("del", "web-1", "old", "198.19.1.7"));
        assert!(del.try_recv().unwrap().ok);
        let known = Cluster::with_pods(vec![pod("web-1", "node1", &[])], true);
        let view = pods.overlay(&known, "node1").unwrap();
        assert_eq!(
            view.pod(&pod_ref("web-1")).unwrap().ips,
            ["198.19.1.8".parse::<IpAddr>().unwrap()]
        );
        drop(record(
            &mut pods,
            event("del", "web-1", "new", "198.19.1.8"),
        ));
        assert!(pods.overlay(&known, "node1").is_none());
    }

    #[test]
    fn events_without_a_pod_or_of_unknown_kinds_are_answered_at_once() {
        let mut pods = CniPods::default();
        let mut bare = event("add", "x", "c", "198.19.1.7");
        bare.pod_name = None;
        assert!(record(&mut pods, bare).try_recv().unwrap().ok);
        let odd = record(&mut pods, event("check", "x", "c", "198.19.1.7"))
            .try_recv()
            .unwrap();
        assert!(!odd.ok);
        assert!(pods
            .overlay(&Cluster::with_pods(vec![], true), "node1")
            .is_none());
    }

    #[test]
    fn a_pod_not_yet_bound_keeps_its_add_waiting_and_other_interfaces_are_ignored() {
        let mut pods = CniPods::default();
        let mut answer = record(&mut pods, event("add", "web-1", "c1", "198.19.1.7"));
        let unbound = Cluster::with_pods(vec![pod("web-1", "", &[])], true);
        pods.settle(&unbound, "node1", true);
        assert!(matches!(answer.try_recv(), Err(TryRecvError::Empty)));
        let bound = Cluster::with_pods(vec![pod("web-1", "node1", &[])], true);
        pods.settle(&bound, "node1", true);
        assert!(answer.try_recv().unwrap().ok);

        let mut net1 = event("add", "web-1", "c1", "10.1.0.7");
        net1.ifname = "net1".into();
        assert!(record(&mut pods, net1).try_recv().unwrap().ok);
        let view = pods.overlay(&bound, "node1").unwrap();
        assert_eq!(
            view.pod(&pod_ref("web-1")).unwrap().ips,
            ["198.19.1.7".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn restored_allocations_of_one_pod_are_all_its_addresses() {
        use meshward_cni::ipam::{Allocation, AttachmentKey, PodMeta};
        let alloc = |container: &str, ifname: &str, ip: [u8; 4]| Allocation {
            ip: ip.into(),
            key: AttachmentKey::new(container, ifname),
            host_ifname: "mw0000".into(),
            pod: PodMeta {
                namespace: Some("shop".into()),
                name: Some("web-1".into()),
                uid: None,
            },
        };
        let mut pods = CniPods::default();
        pods.restore(&[
            alloc("old", "eth0", [198, 19, 1, 9]),
            alloc("new", "eth0", [198, 19, 1, 7]),
            alloc("new", "net1", [198, 19, 1, 8]),
        ]);
        let known = Cluster::with_pods(vec![pod("web-1", "node1", &[])], true);
        let view = pods.overlay(&known, "node1").unwrap();
        assert_eq!(
            view.pod(&pod_ref("web-1")).unwrap().ips,
            [
                "198.19.1.9".parse::<IpAddr>().unwrap(),
                "198.19.1.7".parse().unwrap()
            ]
        );
    }

    #[test]
    fn an_earlier_pod_of_the_same_name_is_not_taken_for_the_new_one() {
        let with_uid = |name: &str, node: &str, ips: &[&str], uid: &str| PodInfo {
            uid: uid.into(),
            ..pod(name, node, ips)
        };
        let mut pods = CniPods::default();
        let mut add = event("add", "db-0", "c2", "198.19.1.7");
        add.pod_uid = Some("uid-new".into());
        let mut answer = record(&mut pods, add);

        // the watch still holds the deleted db-0, bound elsewhere: no
        // refusal, no overlay on the old object, the ADD waits
        let old = Cluster::with_pods(
            vec![with_uid("db-0", "node2", &["198.19.2.5"], "uid-old")],
            true,
        );
        let view = pods.overlay(&old, "node1").unwrap();
        assert_eq!(
            view.pod(&pod_ref("db-0")).unwrap().ips,
            ["198.19.2.5".parse::<IpAddr>().unwrap()]
        );
        pods.settle(&old, "node1", true);
        assert!(matches!(answer.try_recv(), Err(TryRecvError::Empty)));
        // the old one on this node, even showing the new address: still not it
        let old_here = Cluster::with_pods(
            vec![with_uid("db-0", "node1", &["198.19.1.7"], "uid-old")],
            true,
        );
        pods.settle(&old_here, "node1", true);
        assert!(matches!(answer.try_recv(), Err(TryRecvError::Empty)));
        assert!(pods.overlay(&old_here, "node1").is_some(), "kept");

        let new = Cluster::with_pods(vec![with_uid("db-0", "node1", &[], "uid-new")], true);
        assert_eq!(
            pods.overlay(&new, "node1")
                .unwrap()
                .pod(&pod_ref("db-0"))
                .unwrap()
                .ips,
            ["198.19.1.7".parse::<IpAddr>().unwrap()]
        );
        pods.settle(&new, "node1", true);
        assert!(answer.try_recv().unwrap().ok);

        // a manifest without a UID matches by name
        let mut pods = CniPods::default();
        let mut add = event("add", "db-0", "c3", "198.19.1.8");
        add.pod_uid = Some("uid-3".into());
        let mut answer = record(&mut pods, add);
        pods.settle(
            &Cluster::with_pods(vec![pod("db-0", "node1", &[])], true),
            "node1",
            true,
        );
        assert!(answer.try_recv().unwrap().ok);
    }

    #[test]
    fn a_caller_that_gave_up_is_dropped() {
        let mut pods = CniPods::default();
        drop(record(&mut pods, event("add", "web-1", "c1", "198.19.1.7")));
        pods.settle(&Cluster::with_pods(vec![], true), "node1", true);
        assert!(pods.waiting.is_empty());
    }
}
