//! The policy compiler: a [`ClusterView`] and a node name in, that node's
//! [`NodeRules`] out, plus one [`PolicyError`] per problem in a policy.
//!
//! Pure: no I/O, no clock, no panics on any input. The agent calls
//! [`compile`] again whenever pods, namespaces or policies change (labels
//! included); the result is a value to diff against the previous one.
//!
//! # How it works
//!
//! 1. Every policy is checked and parsed into a node-independent form
//!    (selectors compiled, CIDRs parsed and `except`s subtracted, ports
//!    parsed). A policy with any problem is reported field by field and
//!    skipped as a whole; everything else still compiles.
//! 2. Each policy's subject selector is evaluated on the node's local pods
//!    only. A policy selecting none of them costs nothing more.
//! 3. The peers of the remaining policies are resolved against the whole
//!    cluster. Pod sets (namespace scope + pod selector) are interned, so a
//!    selector shared by many policies is evaluated once per pod.
//! 4. Local pods selected by the same policies (and, on ingress, whose named
//!    ports resolve the same) share one [`DirectionRules`] behind an `Arc`.
//!
//! # Kubernetes NetworkPolicy
//!
//! The `networking.k8s.io/v1` semantics: `podSelector` selects pods of the
//! policy's namespace; `policyTypes` defaults to `Ingress`, plus `Egress`
//! when `spec.egress` has rules; a pod is isolated in a direction iff a
//! policy selecting it has that type; allows are the union over policies.
//! A rule without peers admits every address (`0.0.0.0/0`, `::/0`), one
//! without ports every packet ([`PortMatch::Any`]). A peer's `podSelector`
//! alone means pods of the policy's namespace, `namespaceSelector` alone
//! every pod of the namespaces it selects, both in one peer their AND;
//! separate peers are ORed. Namespaces carry the implicit label
//! `kubernetes.io/metadata.name`. `ipBlock.except` entries must be strict
//! sub-prefixes of `cidr` (as the API server checks) and are subtracted.
//! A port's protocol defaults to TCP; `endPort` needs a numeric `port` and
//! must not be below it; a port without `port` means every port of its
//! protocol.
//!
//! Named ports: on ingress the name is resolved on the selected (local)
//! pod; on egress on each destination pod, so a named-port rule yields one
//! allow per resolved port listing the host prefixes of the pods that
//! define it. A name matches a container port with the same name **and**
//! protocol. Decision: on egress a named port never matches an `ipBlock`
//! peer or an external address, since only pods have named ports (even if
//! the block covers pod addresses); a rule without peers resolves the name
//! on every pod of the cluster.
//!
//! Pods without IPs and host-network pods are never endpoints and never
//! peers through selectors (they can still fall inside an `ipBlock`).
//!
//! # MeshNetworkPolicy / MeshClusterwideNetworkPolicy (Cilium semantics)
//!
//! * `endpointSelector` selects pods of the policy's namespace (cluster-wide:
//!   of every namespace). A present `ingress`/`egress` section isolates the
//!   direction, even when it is an empty list.
//! * Label keys may carry a source prefix: `k8s:` and `any:` are stripped;
//!   a key with any other source (`reserved:`, `cidr:`, ...) names a label
//!   no pod has (so it fails closed: `In`/`Exists` never match).
//!   `io.kubernetes.pod.namespace` is the pod's namespace and
//!   `io.cilium.k8s.namespace.labels.<key>` a label of its namespace, as in
//!   Cilium.
//! * In a namespaced policy, `fromEndpoints`/`toEndpoints` mean pods of the
//!   policy's namespace unless the selector constrains
//!   `io.kubernetes.pod.namespace` (then: as it says). `namespaceSelector`
//!   (a meshward addition) replaces that default: peers are pods of the
//!   namespaces it selects, ANDed with each endpoint selector when given.
//! * A rule with only `toPorts` admits every address on those ports; a rule
//!   with neither peers nor `toPorts` (`- {}`) admits nothing. `toPorts`
//!   absent or a port rule without `ports`: every packet. `protocol` absent
//!   or `ANY`: TCP, UDP and SCTP.
//! * `toFQDNs` becomes a [`FqdnAllow`] with the numeric ports of the same
//!   rule (every packet when the rule has no `toPorts`). Named ports never
//!   apply to FQDN or CIDR peers.
//! * `toPorts[].rules.dns` becomes a [`DnsAllow`] whose servers are the
//!   rule's L3 peers (every address when it has none) and whose names are
//!   the DNS selectors; the port traffic itself is allowed too. An empty
//!   `dns: []` counts as no DNS rule (as Cilium treats empty L7 rules). A
//!   DNS rule in a `toFQDNs` rule has no static servers and yields no
//!   `DnsAllow` (the CRD validation already rejects most such shapes).
//! * An endpoint gets [`EndpointRules::dns`] iff an egress rule of a policy
//!   selecting it has `toFQDNs` or DNS rules; every other egress allow of
//!   that endpoint which admits TCP or UDP port 53 is then added as a
//!   [`DnsAllow`] without name restriction (queries the pod may already
//!   send keep working through the proxy).
//! * L7 (`rules.http`, `rules.tls: sni`) becomes [`DirectionRules::l7`]
//!   ([`L7Allow`] entries), as Cilium's per-node proxy does it: when any
//!   rule of any policy selecting an endpoint puts L7 rules on a TCP port
//!   (in one direction), *all* of that endpoint's traffic in that direction
//!   on that port goes through the proxy ([`DirectionRules::l7_ports`]).
//!   For each such port there is one entry per rule admitting traffic on
//!   it: with that rule's HTTP rules or allowed server names, or
//!   [`L7Rule::AllowAll`] for a rule without L7 rules (an L4-only rule
//!   admitting a peer on an L7 port lets every request of that peer pass;
//!   rules of several policies are unioned). The L3/L4 part of an L7 rule
//!   stays in `allow` / `fqdn`: the kernel still enforces it.
//! * An L7 port is one TCP port: `ANY` ports put L7 rules on their TCP
//!   part only (UDP/SCTP stay L4 allows); port ranges and port rules
//!   without ports are refused with L7 rules by the validation. Named
//!   ports with L7 rules resolve like L4 ones (on the local pod on ingress,
//!   on each destination pod on egress), one L7 port per resolved port.
//! * Peers of an entry are its prefixes and, on egress, its toFQDNs
//!   selectors; the proxy matches a learned address by the names learned
//!   for it ([`DirectionRules::l7_matching`]). Combining the entries that
//!   cover a peer ([`DirectionRules::l7_combine`]): any allow-all wins;
//!   else TLS entries (HTTP rules cannot read encrypted bytes); else the
//!   union of the HTTP rules. No covering entry (a peer the kernel should
//!   not have admitted, or a learned address whose name is no longer
//!   known) means deny.
//! * `rules.tls: sni` is egress only, with toFQDNs (the CRD validation
//!   says so): the allowed server names are that rule's toFQDNs selectors.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::{
    self, CidrRule, EgressRule, FqdnRule, HttpRule, IngressRule, PortRule, Protocol, TlsRule,
};
use crate::fqdn::FqdnSelector;
use crate::model::{
    ClusterView, L4Protocol, NamedPort, PodInfo, PodRef, PolicyKind, PolicyObject, PolicyRef,
};
use crate::rules::{
    Allow, DirectionRules, DnsAllow, DnsRules, EndpointRules, FqdnAllow, L7Allow, L7Rule,
    NodeRules, PortMatch,
};

/// What [`compile`] returns: the node's rules and every problem found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub rules: NodeRules,
    /// Each named policy was skipped as a whole; the rules hold the rest.
    pub errors: Vec<PolicyError>,
}

/// One problem in one policy, at a field path such as
/// `spec.ingress[0].from[1].ipBlock.except[0]`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{policy}: {field}: {message}")]
pub struct PolicyError {
    pub policy: PolicyRef,
    pub field: String,
    pub message: String,
}

/// Compiles every policy of `view` for the endpoints on `node`.
///
/// Every pod on `node` with IPs and not on the host network gets an
/// [`EndpointRules`]; a direction is `None` when no policy isolates it.
/// To recompile often, keep a [`Compiler`]: it parses each policy once.
pub fn compile(view: &ClusterView, node: &str) -> Compiled {
    Compiler::new().compile(view, node)
}

/// A compiler that keeps each policy's checked, parsed form between
/// compiles, keyed by the identity of the policy's `Arc`. A datastore that
/// keeps the same `Arc` for an unchanged object (as it should) makes
/// recompiles after pod or namespace changes skip all policy parsing; a
/// changed object is a new `Arc` and is parsed again. Entries of policies
/// no longer in the view are dropped at each compile. The result is always
/// exactly [`compile`]'s.
#[derive(Default)]
pub struct Compiler {
    parsed: HashMap<(PolicyKind, usize), CachedPolicy>,
}

struct CachedPolicy {
    /// Held so the `Arc`'s address cannot be reused while cached.
    _object: PolicyObject,
    result: Result<Arc<Parsed>, Arc<[PolicyError]>>,
}

impl Compiler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Compiles `view` for `node`; see [`compile`].
    pub fn compile(&mut self, view: &ClusterView, node: &str) -> Compiled {
        let mut errors = Vec::new();
        let mut parsed = Vec::with_capacity(view.policies.len());
        let mut live = HashSet::with_capacity(view.policies.len());
        for p in &view.policies {
            let key = object_key(p);
            live.insert(key);
            let cached = self.parsed.entry(key).or_insert_with(|| CachedPolicy {
                _object: p.clone(),
                result: parse_policy(p).map(Arc::new).map_err(Arc::from),
            });
            match &cached.result {
                Ok(x) => parsed.push(x.clone()),
                Err(e) => errors.extend(e.iter().cloned()),
            }
        }
        self.parsed.retain(|k, _| live.contains(k));
        build(view, node, &parsed, errors)
    }
}

fn object_key(p: &PolicyObject) -> (PolicyKind, usize) {
    match p {
        PolicyObject::Kubernetes(o) => (PolicyKind::NetworkPolicy, Arc::as_ptr(o) as usize),
        PolicyObject::Mesh(o) => (PolicyKind::MeshNetworkPolicy, Arc::as_ptr(o) as usize),
        PolicyObject::Clusterwide(o) => (
            PolicyKind::MeshClusterwideNetworkPolicy,
            Arc::as_ptr(o) as usize,
        ),
    }
}

/// Resolves the parsed policies for `node` and assembles its rules.
fn build(
    view: &ClusterView,
    node: &str,
    parsed: &[Arc<Parsed>],
    errors: Vec<PolicyError>,
) -> Compiled {
    let index = Index::new(view, node);
    let mut cache = Cache::default();
    let mut resolved: Vec<Option<Resolved>> = Vec::with_capacity(parsed.len());
    // Per local pod (by position in `index.local`): the policies isolating it.
    let slot: HashMap<usize, usize> = index
        .local
        .iter()
        .enumerate()
        .map(|(slot, &pod)| (pod, slot))
        .collect();
    let mut ingress_of: Vec<Vec<usize>> = vec![Vec::new(); index.local.len()];
    let mut egress_of: Vec<Vec<usize>> = vec![Vec::new(); index.local.len()];
    for (i, p) in parsed.iter().enumerate() {
        let subjects = if p.ingress.is_some() || p.egress.is_some() {
            index.members(&mut cache, &p.subject, true)
        } else {
            Arc::default()
        };
        if subjects.is_empty() {
            resolved.push(None);
            continue;
        }
        resolved.push(Some(resolve(p, &index, &mut cache)));
        for pod in subjects.iter() {
            let Some(&s) = slot.get(pod) else { continue };
            if let (true, Some(ids)) = (p.ingress.is_some(), ingress_of.get_mut(s)) {
                ids.push(i);
            }
            if let (true, Some(ids)) = (p.egress.is_some(), egress_of.get_mut(s)) {
                ids.push(i);
            }
        }
    }

    let mut egress_cache: HashMap<Vec<usize>, EgressShared> = HashMap::new();
    let mut ingress_cache: HashMap<IngressKey, Arc<DirectionRules>> = HashMap::new();
    let mut rules = NodeRules::default();
    for (s, &pod_ix) in index.local.iter().enumerate() {
        let Some(pod) = view.pods.get(pod_ix) else {
            continue;
        };
        let (egress, dns) = match egress_of.get(s) {
            Some(ids) if !ids.is_empty() => {
                let shared = egress_cache
                    .entry(ids.clone())
                    .or_insert_with(|| egress_rules(parsed, &resolved, ids));
                (Some(shared.rules.clone()), shared.dns.clone())
            }
            _ => (None, None),
        };
        let ingress = match ingress_of.get(s) {
            Some(ids) if !ids.is_empty() => {
                let local_ports = local_named_ports(&resolved, ids, pod);
                let rules = ingress_cache
                    .entry((ids.clone(), local_ports))
                    .or_insert_with_key(|(ids, ports)| {
                        Arc::new(ingress_rules(parsed, &resolved, ids, ports))
                    });
                Some(rules.clone())
            }
            _ => None,
        };
        let pod_ref = PodRef {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
        };
        rules.endpoints.insert(
            pod_ref.clone(),
            EndpointRules {
                pod: pod_ref,
                ips: pod.ips.clone(),
                egress,
                ingress,
                dns,
            },
        );
    }
    Compiled { rules, errors }
}

// ---------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------

/// The implicit namespace label Kubernetes sets on every namespace.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// Cilium's pseudo-label for a pod's namespace.
const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Cilium's prefix for the labels of a pod's namespace.
const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// What a selector requirement looks at.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Key {
    /// A label of the object (pod or namespace).
    Label(String),
    /// The pod's namespace name (Cilium pseudo-label).
    PodNamespace,
    /// A label of the pod's namespace (Cilium pseudo-label).
    NamespaceLabel(String),
    /// A label no pod has (a Cilium source other than `k8s`/`any`).
    Absent,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Op {
    /// Values sorted and deduplicated.
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

/// A compiled label selector: all requirements must hold (empty: all).
/// Requirements are sorted, so equal selectors compare equal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct Selector(Vec<(Key, Op)>);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dialect {
    /// Kubernetes NetworkPolicy: plain label keys.
    Kubernetes,
    /// Cilium endpoint selectors: source prefixes and pseudo-labels.
    CiliumPods,
    /// Our `namespaceSelector` in mesh policies: source prefixes stripped.
    CiliumNamespaces,
}

impl Selector {
    fn matches<'a>(&self, get: impl Fn(&Key) -> Option<&'a str>) -> bool {
        self.0.iter().all(|(key, op)| {
            let value = get(key);
            let listed = |vals: &[String]| {
                value.is_some_and(|v| vals.binary_search_by(|x| x.as_str().cmp(v)).is_ok())
            };
            match op {
                Op::In(vals) => listed(vals),
                Op::NotIn(vals) => !listed(vals),
                Op::Exists => value.is_some(),
                Op::DoesNotExist => value.is_none(),
            }
        })
    }

    /// Whether the selector says something about the pod's namespace.
    fn constrains_namespace(&self) -> bool {
        self.0.iter().any(|(k, _)| *k == Key::PodNamespace)
    }
}

fn selector_key(raw: &str, dialect: Dialect) -> Key {
    if dialect == Dialect::Kubernetes {
        return Key::Label(raw.to_string());
    }
    let key = match raw.split_once(':') {
        Some((source, rest))
            if !source.is_empty()
                && source
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) =>
        {
            if source != "k8s" && source != "any" {
                return Key::Absent;
            }
            rest
        }
        _ => raw,
    };
    if dialect == Dialect::CiliumNamespaces {
        return Key::Label(key.to_string());
    }
    if key == POD_NAMESPACE_LABEL {
        Key::PodNamespace
    } else if let Some(ns_key) = key.strip_prefix(NAMESPACE_LABELS_PREFIX) {
        Key::NamespaceLabel(ns_key.to_string())
    } else {
        Key::Label(key.to_string())
    }
}

/// Compiles a selector; `Err((field suffix, message))` for an operator or
/// value count the validation should already have refused.
fn compile_selector(sel: &LabelSelector, dialect: Dialect) -> Result<Selector, (String, String)> {
    let mut reqs = Vec::new();
    for (k, v) in sel.match_labels.iter().flatten() {
        reqs.push((selector_key(k, dialect), Op::In(vec![v.clone()])));
    }
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let mut values = e.values.clone().unwrap_or_default();
        values.sort();
        values.dedup();
        let op = match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err((
                    format!("matchExpressions[{i}].values"),
                    format!("operator {} needs values", e.operator),
                ))
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err((
                    format!("matchExpressions[{i}].values"),
                    format!("operator {} takes no values", e.operator),
                ))
            }
            "In" => Op::In(values),
            "NotIn" => Op::NotIn(values),
            "Exists" => Op::Exists,
            "DoesNotExist" => Op::DoesNotExist,
            other => {
                return Err((
                    format!("matchExpressions[{i}].operator"),
                    format!("unknown operator {other:?}: one of In, NotIn, Exists, DoesNotExist"),
                ))
            }
        };
        reqs.push((selector_key(&e.key, dialect), op));
    }
    reqs.sort();
    reqs.dedup();
    Ok(Selector(reqs))
}

/// Which namespaces a pod set spans.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum NsScope {
    Named(String),
    Selected(Selector),
    All,
}

/// Pods of the namespaces in scope, narrowed by a pod selector (`None`:
/// every pod there).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PodSet {
    ns: NsScope,
    pods: Option<Selector>,
}

// ---------------------------------------------------------------------------
// Parsed policies (node independent)
// ---------------------------------------------------------------------------

struct Parsed {
    policy: PolicyRef,
    subject: PodSet,
    /// `None`: the policy does not isolate this direction.
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
}

#[derive(Default)]
struct Rule {
    /// No L3 peer given where that means "every address".
    all_peers: bool,
    sets: Vec<PodSet>,
    /// CIDR peers, `except`s already subtracted.
    nets: Vec<IpNet>,
    fqdns: Vec<FqdnSelector>,
    groups: Vec<PortGroup>,
}

/// One port rule: numeric ports, named ports, optional DNS or L7 rules.
#[derive(Default)]
struct PortGroup {
    ports: Vec<PortMatch>,
    named: Vec<NamedSpec>,
    dns: Option<Vec<FqdnSelector>>,
    l7: Option<L7Spec>,
}

/// The L7 rules of a port rule, before the rule's peers are known.
#[derive(Clone)]
enum L7Spec {
    Http(Arc<[HttpRule]>),
    /// The rule's toFQDNs selectors are the allowed server names.
    Sni,
}

impl L7Spec {
    fn rule(&self, fqdns: &[FqdnSelector]) -> L7Rule {
        match self {
            L7Spec::Http(rules) => L7Rule::Http(rules.clone()),
            L7Spec::Sni => L7Rule::Sni(fqdns.to_vec()),
        }
    }
}

impl PortGroup {
    fn any() -> Self {
        PortGroup {
            ports: vec![PortMatch::Any],
            ..Default::default()
        }
    }
}

#[derive(Clone, Debug)]
struct NamedSpec {
    name: String,
    protocols: Vec<L4Protocol>,
}

impl NamedSpec {
    fn resolve<'a>(&'a self, pod: &'a PodInfo) -> impl Iterator<Item = PortMatch> + 'a {
        pod.ports
            .iter()
            .filter(|p| p.name == self.name && self.protocols.contains(&p.protocol))
            .map(|p: &NamedPort| PortMatch::single(p.protocol, p.port))
    }
}

/// Collects field errors of one policy.
#[derive(Default)]
struct Errs(Vec<(String, String)>);

impl Errs {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push((field.into(), message.into()));
    }

    fn finish<T>(self, policy: &PolicyRef, value: T) -> Result<T, Vec<PolicyError>> {
        if self.0.is_empty() {
            return Ok(value);
        }
        Err(self
            .0
            .into_iter()
            .map(|(field, message)| PolicyError {
                policy: policy.clone(),
                field,
                message,
            })
            .collect())
    }
}

fn parse_policy(p: &PolicyObject) -> Result<Parsed, Vec<PolicyError>> {
    match p {
        PolicyObject::Kubernetes(np) => parse_kubernetes(np),
        PolicyObject::Mesh(mnp) => {
            let policy = PolicyRef {
                kind: PolicyKind::MeshNetworkPolicy,
                namespace: mnp.metadata.namespace.clone().unwrap_or_default(),
                name: mnp.metadata.name.clone().unwrap_or_default(),
            };
            let s = &mnp.spec;
            parse_mesh(
                policy,
                true,
                &s.endpoint_selector,
                &s.ingress,
                &s.egress,
                s.validate(),
            )
        }
        PolicyObject::Clusterwide(cnp) => {
            let policy = PolicyRef {
                kind: PolicyKind::MeshClusterwideNetworkPolicy,
                namespace: String::new(),
                name: cnp.metadata.name.clone().unwrap_or_default(),
            };
            let s = &cnp.spec;
            parse_mesh(
                policy,
                false,
                &s.endpoint_selector,
                &s.ingress,
                &s.egress,
                s.validate(),
            )
        }
    }
}

fn check_metadata(errs: &mut Errs, policy: &PolicyRef, namespaced: bool) {
    if policy.name.is_empty() {
        errs.push("metadata.name", "a policy needs a name");
    }
    if namespaced && policy.namespace.is_empty() {
        errs.push(
            "metadata.namespace",
            "this kind is namespaced: the policy needs a namespace",
        );
    }
}

// --- Kubernetes NetworkPolicy ------------------------------------------------

fn parse_kubernetes(np: &NetworkPolicy) -> Result<Parsed, Vec<PolicyError>> {
    let policy = PolicyRef {
        kind: PolicyKind::NetworkPolicy,
        namespace: np.metadata.namespace.clone().unwrap_or_default(),
        name: np.metadata.name.clone().unwrap_or_default(),
    };
    let mut errs = Errs::default();
    check_metadata(&mut errs, &policy, true);
    let default_spec = NetworkPolicySpec::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);
    let ns = policy.namespace.as_str();

    let subject = PodSet {
        ns: NsScope::Named(ns.to_string()),
        pods: Some(
            k8s_selector(&mut errs, "spec.podSelector", spec.pod_selector.as_ref())
                .unwrap_or_default(),
        ),
    };

    let (mut ingress_type, mut egress_type) = (false, false);
    match &spec.policy_types {
        Some(types) if !types.is_empty() => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ingress_type = true,
                    "Egress" => egress_type = true,
                    other => errs.push(
                        format!("spec.policyTypes[{i}]"),
                        format!("unknown policy type {other:?}: Ingress or Egress"),
                    ),
                }
            }
        }
        _ => {
            ingress_type = true;
            egress_type = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        }
    }

    // Rules are checked whatever the policy types (the API server does too).
    let ingress: Vec<Rule> = spec
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            k8s_rule(
                &mut errs,
                &format!("spec.ingress[{i}]"),
                "from",
                r.from.as_deref(),
                r.ports.as_deref(),
                ns,
            )
        })
        .collect();
    let egress: Vec<Rule> = spec
        .egress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            k8s_rule(
                &mut errs,
                &format!("spec.egress[{i}]"),
                "to",
                r.to.as_deref(),
                r.ports.as_deref(),
                ns,
            )
        })
        .collect();
    let parsed = Parsed {
        subject,
        ingress: ingress_type.then_some(ingress),
        egress: egress_type.then_some(egress),
        policy: policy.clone(),
    };
    errs.finish(&policy, parsed)
}

/// A Kubernetes label selector (`None`: empty, selects everything).
fn k8s_selector(errs: &mut Errs, path: &str, sel: Option<&LabelSelector>) -> Option<Selector> {
    let Some(sel) = sel else {
        return Some(Selector::default());
    };
    let found = crd::selector_errors(path, sel);
    if !found.is_empty() {
        for e in found {
            errs.push(e.path, e.message);
        }
        return None;
    }
    // The shared check accepts Cilium's `source:` prefixes; Kubernetes
    // label keys cannot contain ':'.
    let mut ok = true;
    for k in sel.match_labels.iter().flatten().map(|(k, _)| k) {
        if k.contains(':') {
            errs.push(
                format!("{path}.matchLabels"),
                format!("label key {k:?}: ':' is not allowed in a Kubernetes label key"),
            );
            ok = false;
        }
    }
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        if e.key.contains(':') {
            errs.push(
                format!("{path}.matchExpressions[{i}].key"),
                format!(
                    "label key {:?}: ':' is not allowed in a Kubernetes label key",
                    e.key
                ),
            );
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    match compile_selector(sel, Dialect::Kubernetes) {
        Ok(s) => Some(s),
        Err((field, message)) => {
            errs.push(format!("{path}.{field}"), message);
            None
        }
    }
}

fn k8s_rule(
    errs: &mut Errs,
    path: &str,
    peer_field: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    ns: &str,
) -> Rule {
    let mut rule = Rule::default();
    match peers {
        None | Some([]) => rule.all_peers = true,
        Some(peers) => {
            for (j, peer) in peers.iter().enumerate() {
                k8s_peer(
                    errs,
                    &format!("{path}.{peer_field}[{j}]"),
                    peer,
                    ns,
                    &mut rule,
                );
            }
        }
    }
    let mut group = PortGroup::default();
    match ports {
        None | Some([]) => group.ports.push(PortMatch::Any),
        Some(ports) => {
            for (j, p) in ports.iter().enumerate() {
                k8s_port(errs, &format!("{path}.ports[{j}]"), p, &mut group);
            }
        }
    }
    rule.groups.push(group);
    rule
}

fn k8s_peer(errs: &mut Errs, path: &str, peer: &NetworkPolicyPeer, ns: &str, rule: &mut Rule) {
    let selectors =
        usize::from(peer.pod_selector.is_some()) + usize::from(peer.namespace_selector.is_some());
    if let Some(block) = &peer.ip_block {
        if selectors > 0 {
            errs.push(
                path,
                "ipBlock cannot be combined with podSelector or namespaceSelector in one peer",
            );
            return;
        }
        let cidr_path = format!("{path}.ipBlock.cidr");
        let Some(base) = k8s_cidr(errs, &cidr_path, &block.cidr) else {
            return;
        };
        let mut excepts = Vec::new();
        for (k, e) in block.except.iter().flatten().enumerate() {
            let ep = format!("{path}.ipBlock.except[{k}]");
            let Some(ex) = k8s_cidr(errs, &ep, e) else {
                continue;
            };
            if !base.contains(&ex) || ex.prefix_len() <= base.prefix_len() {
                errs.push(
                    ep,
                    format!("{e:?} must be a strict subset of cidr {:?}", block.cidr),
                );
                continue;
            }
            excepts.push(ex);
        }
        rule.nets.extend(subtract(base, &excepts));
        return;
    }
    if selectors == 0 {
        errs.push(
            path,
            "a peer needs podSelector, namespaceSelector or ipBlock",
        );
        return;
    }
    let pods = match &peer.pod_selector {
        Some(s) => k8s_selector(errs, &format!("{path}.podSelector"), Some(s)).map(Some),
        None => Some(None),
    };
    let scope = match &peer.namespace_selector {
        Some(s) => {
            k8s_selector(errs, &format!("{path}.namespaceSelector"), Some(s)).map(NsScope::Selected)
        }
        None => Some(NsScope::Named(ns.to_string())),
    };
    if let (Some(pods), Some(ns)) = (pods, scope) {
        rule.sets.push(PodSet { ns, pods });
    }
}

/// A Kubernetes CIDR: `address/length` (host bits may be set, as Go's
/// `net.ParseCIDR` allows); a bare address is not a CIDR here.
fn k8s_cidr(errs: &mut Errs, path: &str, s: &str) -> Option<IpNet> {
    match s.parse::<IpNet>() {
        Ok(n) => Some(n.trunc()),
        Err(_) => {
            errs.push(path, format!("{s:?} is not a CIDR (address/prefix length)"));
            None
        }
    }
}

fn k8s_port(errs: &mut Errs, path: &str, p: &NetworkPolicyPort, group: &mut PortGroup) {
    let protocol = match p.protocol.as_deref() {
        None | Some("TCP") => L4Protocol::Tcp,
        Some("UDP") => L4Protocol::Udp,
        Some("SCTP") => L4Protocol::Sctp,
        Some(other) => {
            errs.push(
                format!("{path}.protocol"),
                format!("unknown protocol {other:?}: one of TCP, UDP, SCTP"),
            );
            return;
        }
    };
    let end_path = format!("{path}.endPort");
    match &p.port {
        None => {
            if p.end_port.is_some() {
                errs.push(end_path, "endPort needs a numeric port");
                return;
            }
            group.ports.push(PortMatch::Ports {
                protocol,
                first: 0,
                last: u16::MAX,
            });
        }
        Some(IntOrString::Int(n)) => {
            let Some(first) = port_number(*n) else {
                errs.push(
                    format!("{path}.port"),
                    format!("{n} is not a port (1-65535)"),
                );
                return;
            };
            let last = match p.end_port {
                None => first,
                Some(end) => match port_number(end) {
                    Some(last) if last >= first => last,
                    Some(_) => {
                        errs.push(end_path, format!("{end} is less than port {first}"));
                        return;
                    }
                    None => {
                        errs.push(end_path, format!("{end} is not a port (1-65535)"));
                        return;
                    }
                },
            };
            group.ports.push(PortMatch::Ports {
                protocol,
                first,
                last,
            });
        }
        Some(IntOrString::String(name)) => {
            if let Err(m) = crd::check_port_name(name) {
                errs.push(
                    format!("{path}.port"),
                    format!("{name:?} is not a valid named port: {m}"),
                );
                return;
            }
            if p.end_port.is_some() {
                errs.push(end_path, "endPort needs a numeric port");
                return;
            }
            group.named.push(NamedSpec {
                name: name.clone(),
                protocols: vec![protocol],
            });
        }
    }
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

// --- Mesh policies (Cilium semantics) ----------------------------------------

/// One mesh rule seen direction-neutrally.
struct MeshRule<'a> {
    path: String,
    dir: &'static str,
    endpoints: &'a Option<Vec<LabelSelector>>,
    namespace_selector: &'a Option<LabelSelector>,
    cidr: &'a Option<Vec<String>>,
    cidr_set: &'a Option<Vec<CidrRule>>,
    fqdns: Option<&'a Vec<FqdnRule>>,
    to_ports: &'a Option<Vec<PortRule>>,
}

fn parse_mesh(
    policy: PolicyRef,
    namespaced: bool,
    endpoint_selector: &LabelSelector,
    ingress: &Option<Vec<IngressRule>>,
    egress: &Option<Vec<EgressRule>>,
    validation: Result<(), crd::ValidationErrors>,
) -> Result<Parsed, Vec<PolicyError>> {
    let mut errs = Errs::default();
    check_metadata(&mut errs, &policy, namespaced);
    if let Err(v) = validation {
        for e in v.0 {
            errs.push(e.path, e.message);
        }
    }
    if !errs.0.is_empty() {
        return errs.finish(&policy, Parsed::empty(policy.clone()));
    }
    let own_ns = namespaced.then(|| policy.namespace.clone());
    let subject = PodSet {
        ns: match &own_ns {
            Some(ns) => NsScope::Named(ns.clone()),
            None => NsScope::All,
        },
        pods: mesh_selector(
            &mut errs,
            "spec.endpointSelector",
            endpoint_selector,
            Dialect::CiliumPods,
        ),
    };
    let ingress = ingress.as_ref().map(|rules| {
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                mesh_rule(
                    &mut errs,
                    own_ns.as_deref(),
                    MeshRule {
                        path: format!("spec.ingress[{i}]"),
                        dir: "from",
                        endpoints: &r.from_endpoints,
                        namespace_selector: &r.namespace_selector,
                        cidr: &r.from_cidr,
                        cidr_set: &r.from_cidr_set,
                        fqdns: None,
                        to_ports: &r.to_ports,
                    },
                )
            })
            .collect()
    });
    let egress = egress.as_ref().map(|rules| {
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                mesh_rule(
                    &mut errs,
                    own_ns.as_deref(),
                    MeshRule {
                        path: format!("spec.egress[{i}]"),
                        dir: "to",
                        endpoints: &r.to_endpoints,
                        namespace_selector: &r.namespace_selector,
                        cidr: &r.to_cidr,
                        cidr_set: &r.to_cidr_set,
                        fqdns: r.to_fqdns.as_ref(),
                        to_ports: &r.to_ports,
                    },
                )
            })
            .collect()
    });
    let parsed = Parsed {
        policy: policy.clone(),
        subject,
        ingress,
        egress,
    };
    errs.finish(&policy, parsed)
}

impl Parsed {
    fn empty(policy: PolicyRef) -> Self {
        Parsed {
            policy,
            subject: PodSet {
                ns: NsScope::All,
                pods: None,
            },
            ingress: None,
            egress: None,
        }
    }
}

fn mesh_selector(
    errs: &mut Errs,
    path: &str,
    sel: &LabelSelector,
    dialect: Dialect,
) -> Option<Selector> {
    match compile_selector(sel, dialect) {
        Ok(s) => Some(s),
        Err((field, message)) => {
            errs.push(format!("{path}.{field}"), message);
            // The policy is skipped: what this would select does not matter.
            None
        }
    }
}

fn mesh_rule(errs: &mut Errs, own_ns: Option<&str>, r: MeshRule<'_>) -> Rule {
    let p = &r.path;
    let d = r.dir;
    let mut rule = Rule::default();
    let ns_scope = r.namespace_selector.as_ref().map(|s| {
        mesh_selector(
            errs,
            &format!("{p}.namespaceSelector"),
            s,
            Dialect::CiliumNamespaces,
        )
    });
    let endpoints = r.endpoints.as_deref().unwrap_or_default();
    for (j, e) in endpoints.iter().enumerate() {
        let Some(sel) = mesh_selector(
            errs,
            &format!("{p}.{d}Endpoints[{j}]"),
            e,
            Dialect::CiliumPods,
        ) else {
            continue;
        };
        let ns = match (&ns_scope, own_ns) {
            (Some(Some(nsel)), _) => NsScope::Selected(nsel.clone()),
            (Some(None), _) => continue,
            (None, Some(own)) if !sel.constrains_namespace() => NsScope::Named(own.to_string()),
            (None, _) => NsScope::All,
        };
        rule.sets.push(PodSet {
            ns,
            pods: Some(sel),
        });
    }
    if endpoints.is_empty() {
        if let Some(Some(nsel)) = &ns_scope {
            rule.sets.push(PodSet {
                ns: NsScope::Selected(nsel.clone()),
                pods: None,
            });
        }
    }
    for (j, c) in r.cidr.iter().flatten().enumerate() {
        match crd::parse_cidr(c) {
            Ok(n) => rule.nets.push(n),
            Err(m) => errs.push(format!("{p}.{d}CIDR[{j}]"), m),
        }
    }
    for (j, set) in r.cidr_set.iter().flatten().enumerate() {
        let sp = format!("{p}.{d}CIDRSet[{j}]");
        let base = match crd::parse_cidr(&set.cidr) {
            Ok(n) => n,
            Err(m) => {
                errs.push(format!("{sp}.cidr"), m);
                continue;
            }
        };
        let mut excepts = Vec::new();
        for (k, e) in set.except.iter().flatten().enumerate() {
            match crd::parse_cidr(e) {
                Ok(ex) if base.contains(&ex) => excepts.push(ex),
                Ok(ex) => errs.push(
                    format!("{sp}.except[{k}]"),
                    format!("{ex} is not inside cidr {base}"),
                ),
                Err(m) => errs.push(format!("{sp}.except[{k}]"), m),
            }
        }
        rule.nets.extend(subtract(base, &excepts));
    }
    for (j, f) in r.fqdns.into_iter().flatten().enumerate() {
        match f.to_selector() {
            Ok(s) => rule.fqdns.push(s),
            Err(m) => errs.push(format!("{p}.{d}FQDNs[{j}]"), m),
        }
    }
    let to_ports = r.to_ports.as_deref().unwrap_or_default();
    let has_l3 = !endpoints.is_empty()
        || r.namespace_selector.is_some()
        || r.cidr.as_ref().is_some_and(|c| !c.is_empty())
        || r.cidr_set.as_ref().is_some_and(|c| !c.is_empty())
        || r.fqdns.is_some_and(|f| !f.is_empty());
    // Cilium: an L4-only rule admits every peer; `- {}` admits nothing.
    rule.all_peers = !has_l3 && !to_ports.is_empty();
    if to_ports.is_empty() {
        rule.groups.push(PortGroup::any());
    }
    for (j, pr) in to_ports.iter().enumerate() {
        rule.groups
            .push(mesh_port_rule(errs, &format!("{p}.toPorts[{j}]"), pr));
    }
    rule
}

fn mesh_port_rule(errs: &mut Errs, path: &str, pr: &PortRule) -> PortGroup {
    let mut group = PortGroup::default();
    let ports = pr.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        group.ports.push(PortMatch::Any);
    }
    for (k, pp) in ports.iter().enumerate() {
        let pp_path = format!("{path}.ports[{k}]");
        let protocols: &[L4Protocol] = match pp.protocol() {
            Some(Protocol::Tcp) => &[L4Protocol::Tcp],
            Some(Protocol::Udp) => &[L4Protocol::Udp],
            Some(Protocol::Sctp) => &[L4Protocol::Sctp],
            Some(Protocol::Any) => &[L4Protocol::Tcp, L4Protocol::Udp, L4Protocol::Sctp],
            None => {
                errs.push(format!("{pp_path}.protocol"), "unknown protocol");
                continue;
            }
        };
        let numeric = !pp.port.is_empty() && pp.port.bytes().all(|b| b.is_ascii_digit());
        if numeric {
            let Some(first) = pp.port.parse::<i32>().ok().and_then(port_number) else {
                errs.push(format!("{pp_path}.port"), "not a port (1-65535)");
                continue;
            };
            let last = match pp.end_port.map(port_number) {
                None => first,
                Some(Some(last)) if last >= first => last,
                Some(_) => {
                    errs.push(format!("{pp_path}.endPort"), "not a port >= port");
                    continue;
                }
            };
            for &protocol in protocols {
                group.ports.push(PortMatch::Ports {
                    protocol,
                    first,
                    last,
                });
            }
        } else {
            if pp.end_port.is_some() {
                errs.push(format!("{pp_path}.endPort"), "endPort needs a numeric port");
                continue;
            }
            group.named.push(NamedSpec {
                name: pp.port.clone(),
                protocols: protocols.to_vec(),
            });
        }
    }
    if let Some(dns) = pr.rules.as_ref().and_then(|r| r.dns.as_ref()) {
        if !dns.is_empty() {
            let mut names = Vec::new();
            for (k, f) in dns.iter().enumerate() {
                match f.to_selector() {
                    Ok(s) => names.push(s),
                    Err(m) => errs.push(format!("{path}.rules.dns[{k}]"), m),
                }
            }
            group.dns = Some(names);
        }
    }
    if let Some(rules) = pr.rules.as_ref() {
        match (&rules.http, rules.tls) {
            (Some(http), _) if !http.is_empty() => {
                group.l7 = Some(L7Spec::Http(Arc::from(http.as_slice())));
            }
            (_, Some(TlsRule::Sni)) => group.l7 = Some(L7Spec::Sni),
            _ => {}
        }
    }
    group
}

// ---------------------------------------------------------------------------
// CIDR arithmetic
// ---------------------------------------------------------------------------

/// `base` without the `excepts`, as prefixes: a prefix holding an excepted
/// one is split in halves down to it, keeping the halves outside it.
/// Excepts of the other family or outside `base` change nothing.
fn subtract(base: IpNet, excepts: &[IpNet]) -> Vec<IpNet> {
    let mut out = vec![base];
    for ex in excepts {
        let mut next = Vec::with_capacity(out.len() + usize::from(ex.prefix_len()));
        for net in out {
            if ex.contains(&net) {
                continue;
            }
            if !net.contains(ex) {
                next.push(net);
                continue;
            }
            let mut cur = net;
            while cur.prefix_len() < ex.prefix_len() {
                let Ok(mut halves) = cur.subnets(cur.prefix_len() + 1) else {
                    break;
                };
                let (Some(a), Some(b)) = (halves.next(), halves.next()) else {
                    break;
                };
                let (inside, outside) = if a.contains(ex) { (a, b) } else { (b, a) };
                next.push(outside);
                cur = inside;
            }
        }
        out = next;
    }
    out
}

fn every_address() -> Vec<IpNet> {
    // The defaults are 0.0.0.0/0 and ::/0.
    vec![IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())]
}

fn host_nets(pod: &PodInfo) -> impl Iterator<Item = IpNet> + '_ {
    pod.ips.iter().map(|&ip| IpNet::from(ip))
}

// ---------------------------------------------------------------------------
// The cluster, indexed
// ---------------------------------------------------------------------------

struct NsEntry<'v> {
    name: &'v str,
    labels: Option<&'v BTreeMap<String, String>>,
    /// Pods that can be peers (IPs, not host network), any node.
    peers: Vec<usize>,
    /// Of those, the ones on this node.
    local: Vec<usize>,
}

impl<'v> NsEntry<'v> {
    fn label(&self, key: &str) -> Option<&'v str> {
        if key == NAMESPACE_NAME_LABEL {
            return Some(self.name);
        }
        self.labels.and_then(|l| l.get(key)).map(String::as_str)
    }
}

struct Index<'v> {
    pods: &'v [PodInfo],
    namespaces: Vec<NsEntry<'v>>,
    by_name: HashMap<&'v str, usize>,
    /// Every pod that can be a peer.
    peers: Vec<usize>,
    /// Every pod that is an endpoint on this node.
    local: Vec<usize>,
}

impl<'v> Index<'v> {
    fn new(view: &'v ClusterView, node: &str) -> Self {
        let mut index = Index {
            pods: &view.pods,
            namespaces: Vec::new(),
            by_name: HashMap::new(),
            peers: Vec::new(),
            local: Vec::new(),
        };
        for ns in &view.namespaces {
            if let Some(&i) = index.by_name.get(ns.name.as_str()) {
                // A duplicate: the last one wins, as in a datastore update.
                if let Some(e) = index.namespaces.get_mut(i) {
                    e.labels = Some(&ns.labels);
                }
                continue;
            }
            index.by_name.insert(&ns.name, index.namespaces.len());
            index.namespaces.push(NsEntry {
                name: &ns.name,
                labels: Some(&ns.labels),
                peers: Vec::new(),
                local: Vec::new(),
            });
        }
        for (i, pod) in view.pods.iter().enumerate() {
            if pod.host_network || pod.ips.is_empty() {
                continue;
            }
            let ns = match index.by_name.get(pod.namespace.as_str()) {
                Some(&n) => n,
                None => {
                    // A pod of a namespace we were not told about: no labels
                    // but its name.
                    let n = index.namespaces.len();
                    index.by_name.insert(&pod.namespace, n);
                    index.namespaces.push(NsEntry {
                        name: &pod.namespace,
                        labels: None,
                        peers: Vec::new(),
                        local: Vec::new(),
                    });
                    n
                }
            };
            let local = pod.node == node;
            if let Some(e) = index.namespaces.get_mut(ns) {
                e.peers.push(i);
                if local {
                    e.local.push(i);
                }
            }
            index.peers.push(i);
            if local {
                index.local.push(i);
            }
        }
        index
    }

    /// The pods of `set` (local ones only when `local`), in view order.
    fn members(&self, cache: &mut Cache, set: &PodSet, local: bool) -> Arc<Vec<usize>> {
        let memo = if local {
            &cache.local_members
        } else {
            &cache.members
        };
        if let Some(m) = memo.get(set) {
            return m.clone();
        }
        let namespaces: Vec<usize> = match &set.ns {
            NsScope::Named(name) => self
                .by_name
                .get(name.as_str())
                .copied()
                .into_iter()
                .collect(),
            NsScope::All => (0..self.namespaces.len()).collect(),
            NsScope::Selected(sel) => self.selected_namespaces(cache, sel).to_vec(),
        };
        let mut out = Vec::new();
        for n in namespaces {
            let Some(ns) = self.namespaces.get(n) else {
                continue;
            };
            let pods = if local { &ns.local } else { &ns.peers };
            for &p in pods {
                let Some(pod) = self.pods.get(p) else {
                    continue;
                };
                let selected = match &set.pods {
                    None => true,
                    Some(sel) => sel.matches(|k| match k {
                        Key::Label(l) => pod.labels.get(l).map(String::as_str),
                        Key::PodNamespace => Some(pod.namespace.as_str()),
                        Key::NamespaceLabel(l) => ns.label(l),
                        Key::Absent => None,
                    }),
                };
                if selected {
                    out.push(p);
                }
            }
        }
        out.sort_unstable();
        let out = Arc::new(out);
        let memo = if local {
            &mut cache.local_members
        } else {
            &mut cache.members
        };
        memo.insert(set.clone(), out.clone());
        out
    }

    fn selected_namespaces(&self, cache: &mut Cache, sel: &Selector) -> Arc<Vec<usize>> {
        if let Some(m) = cache.namespaces.get(sel) {
            return m.clone();
        }
        let out: Vec<usize> = self
            .namespaces
            .iter()
            .enumerate()
            .filter(|(_, ns)| {
                sel.matches(|k| match k {
                    Key::Label(l) => ns.label(l),
                    _ => None,
                })
            })
            .map(|(i, _)| i)
            .collect();
        let out = Arc::new(out);
        cache.namespaces.insert(sel.clone(), out.clone());
        out
    }

    /// The host prefixes of `set`'s peer pods.
    fn member_nets(&self, cache: &mut Cache, set: &PodSet) -> Arc<Vec<IpNet>> {
        if let Some(n) = cache.nets.get(set) {
            return n.clone();
        }
        let members = self.members(cache, set, false);
        let nets: Vec<IpNet> = members
            .iter()
            .filter_map(|&p| self.pods.get(p))
            .flat_map(host_nets)
            .collect();
        let nets = Arc::new(nets);
        cache.nets.insert(set.clone(), nets.clone());
        nets
    }
}

/// Memoised selector evaluations for one compile.
#[derive(Default)]
struct Cache {
    namespaces: HashMap<Selector, Arc<Vec<usize>>>,
    members: HashMap<PodSet, Arc<Vec<usize>>>,
    local_members: HashMap<PodSet, Arc<Vec<usize>>>,
    nets: HashMap<PodSet, Arc<Vec<IpNet>>>,
}

// ---------------------------------------------------------------------------
// Resolution (per node) and assembly
// ---------------------------------------------------------------------------

/// A policy's rules with peers resolved, for the node being compiled.
#[derive(Default)]
struct Resolved {
    ingress: ResolvedDir,
    egress: ResolvedDir,
}

#[derive(Default)]
struct ResolvedDir {
    allows: Vec<Emitted>,
    /// Ingress named ports: resolved on each local pod.
    local_named: Vec<LocalNamed>,
    fqdn: Vec<FqdnAllow>,
    /// DNS rules (`names: Some`).
    dns: Vec<DnsAllow>,
    /// Has `toFQDNs` or DNS rules.
    wants_dns: bool,
    /// toFQDNs peers per port rule, with its L7 rules (for the L7 view).
    fqdn_l7: Vec<L7Item>,
}

struct Emitted {
    allow: Allow,
    /// Came from a port rule with DNS rules (so it is not an unrestricted
    /// DNS path).
    dns_rule: bool,
    /// The L7 rules of its port rule.
    l7: Option<L7Rule>,
}

struct LocalNamed {
    nets: Arc<Vec<IpNet>>,
    named: Vec<NamedSpec>,
    l7: Option<L7Rule>,
}

/// Peers on ports with (or without) L7 rules: the input of [`l7_entries`].
#[derive(Clone)]
struct L7Item {
    nets: Vec<IpNet>,
    fqdns: Vec<FqdnSelector>,
    ports: Vec<PortMatch>,
    l7: Option<L7Rule>,
    policy: PolicyRef,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

fn resolve(p: &Parsed, index: &Index<'_>, cache: &mut Cache) -> Resolved {
    let mut out = Resolved::default();
    for rule in p.ingress.iter().flatten() {
        resolve_rule(
            rule,
            Direction::Ingress,
            &p.policy,
            index,
            cache,
            &mut out.ingress,
        );
    }
    for rule in p.egress.iter().flatten() {
        resolve_rule(
            rule,
            Direction::Egress,
            &p.policy,
            index,
            cache,
            &mut out.egress,
        );
    }
    out
}

fn normalize_ports(mut ports: Vec<PortMatch>) -> Vec<PortMatch> {
    if ports.contains(&PortMatch::Any) {
        return vec![PortMatch::Any];
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn resolve_rule(
    rule: &Rule,
    dir: Direction,
    policy: &PolicyRef,
    index: &Index<'_>,
    cache: &mut Cache,
    out: &mut ResolvedDir,
) {
    if dir == Direction::Egress {
        out.wants_dns |= !rule.fqdns.is_empty() || rule.groups.iter().any(|g| g.dns.is_some());
    }
    if !rule.fqdns.is_empty() {
        let ports = normalize_ports(
            rule.groups
                .iter()
                .flat_map(|g| g.ports.iter().copied())
                .collect(),
        );
        if !ports.is_empty() {
            out.fqdn.push(FqdnAllow {
                selectors: rule.fqdns.clone(),
                ports,
                policy: policy.clone(),
            });
        }
        for g in &rule.groups {
            out.fqdn_l7.push(L7Item {
                nets: Vec::new(),
                fqdns: rule.fqdns.clone(),
                ports: normalize_ports(g.ports.clone()),
                l7: g.l7.as_ref().map(|l| l.rule(&rule.fqdns)),
                policy: policy.clone(),
            });
        }
    }

    let has_named = rule.groups.iter().any(|g| !g.named.is_empty());
    let mut nets: Vec<IpNet> = rule.nets.clone();
    // Pods whose named ports an egress rule resolves.
    let mut pods: Vec<usize> = Vec::new();
    if rule.all_peers {
        nets = every_address();
        if has_named && dir == Direction::Egress {
            pods = index.peers.clone();
        }
    } else {
        for set in &rule.sets {
            nets.extend(index.member_nets(cache, set).iter().copied());
            if has_named && dir == Direction::Egress {
                pods.extend(index.members(cache, set, false).iter().copied());
            }
        }
        pods.sort_unstable();
        pods.dedup();
    }
    nets.sort_unstable();
    nets.dedup();
    if nets.is_empty() {
        return;
    }
    let nets = Arc::new(nets);

    // Port rules without DNS or L7 rules merge into one allow; each one
    // with such rules stands alone (it also feeds a name-restricted DnsAllow
    // or an L7 entry).
    let mut plain = PortGroup::default();
    for g in &rule.groups {
        if g.dns.is_some() || g.l7.is_some() {
            emit(g, &rule.fqdns, &nets, &pods, dir, policy, index, out);
        } else {
            plain.ports.extend(g.ports.iter().copied());
            plain.named.extend(g.named.iter().cloned());
        }
    }
    if !plain.ports.is_empty() || !plain.named.is_empty() {
        emit(&plain, &rule.fqdns, &nets, &pods, dir, policy, index, out);
    }
}

#[allow(clippy::too_many_arguments)]
fn emit(
    group: &PortGroup,
    fqdns: &[FqdnSelector],
    nets: &Arc<Vec<IpNet>>,
    pods: &[usize],
    dir: Direction,
    policy: &PolicyRef,
    index: &Index<'_>,
    out: &mut ResolvedDir,
) {
    let l7 = group.l7.as_ref().map(|l| l.rule(fqdns));
    let push = |nets: Vec<IpNet>, ports: Vec<PortMatch>, out: &mut ResolvedDir| {
        if let Some(names) = &group.dns {
            out.dns.push(DnsAllow {
                servers: nets.clone(),
                ports: ports.clone(),
                names: Some(names.clone()),
                policy: policy.clone(),
            });
        }
        out.allows.push(Emitted {
            allow: Allow {
                nets,
                ports,
                policy: policy.clone(),
            },
            dns_rule: group.dns.is_some(),
            l7: l7.clone(),
        });
    };
    let ports = normalize_ports(group.ports.clone());
    if !ports.is_empty() {
        push(nets.to_vec(), ports, out);
    }
    if group.named.is_empty() {
        return;
    }
    match dir {
        Direction::Ingress => out.local_named.push(LocalNamed {
            nets: nets.clone(),
            named: group.named.clone(),
            l7: l7.clone(),
        }),
        Direction::Egress => {
            let mut by_port: BTreeMap<PortMatch, Vec<IpNet>> = BTreeMap::new();
            for pod in pods.iter().filter_map(|&p| index.pods.get(p)) {
                for spec in &group.named {
                    for port in spec.resolve(pod) {
                        by_port.entry(port).or_default().extend(host_nets(pod));
                    }
                }
            }
            for (port, mut nets) in by_port {
                nets.sort_unstable();
                nets.dedup();
                push(nets, vec![port], out);
            }
        }
    }
}

/// The ports the ingress named-port rules of policies `ids` resolve to on
/// `pod` (one list per such rule, in order): part of the sharing key.
fn local_named_ports(
    resolved: &[Option<Resolved>],
    ids: &[usize],
    pod: &PodInfo,
) -> Vec<Vec<PortMatch>> {
    let mut out = Vec::new();
    for r in ids.iter().filter_map(|&i| resolved.get(i)?.as_ref()) {
        for ln in &r.ingress.local_named {
            let mut ports: Vec<PortMatch> =
                ln.named.iter().flat_map(|spec| spec.resolve(pod)).collect();
            ports.sort_unstable();
            ports.dedup();
            out.push(ports);
        }
    }
    out
}

fn ingress_rules(
    parsed: &[Arc<Parsed>],
    resolved: &[Option<Resolved>],
    ids: &[usize],
    local_ports: &[Vec<PortMatch>],
) -> DirectionRules {
    let mut rules = DirectionRules::default();
    let mut items = Vec::new();
    let mut local_ports = local_ports.iter();
    for &i in ids {
        let (Some(p), Some(Some(r))) = (parsed.get(i), resolved.get(i)) else {
            continue;
        };
        rules.policies.push(p.policy.clone());
        rules
            .allow
            .extend(r.ingress.allows.iter().map(|e| e.allow.clone()));
        items.extend(r.ingress.allows.iter().map(emitted_item));
        for ln in &r.ingress.local_named {
            let Some(ports) = local_ports.next() else {
                continue;
            };
            if !ports.is_empty() {
                rules.allow.push(Allow {
                    nets: ln.nets.to_vec(),
                    ports: ports.clone(),
                    policy: p.policy.clone(),
                });
                items.push(L7Item {
                    nets: ln.nets.to_vec(),
                    fqdns: Vec::new(),
                    ports: ports.clone(),
                    l7: ln.l7.clone(),
                    policy: p.policy.clone(),
                });
            }
        }
    }
    rules.l7 = l7_entries(&items);
    rules
}

fn emitted_item(e: &Emitted) -> L7Item {
    L7Item {
        nets: e.allow.nets.clone(),
        fqdns: Vec::new(),
        ports: e.allow.ports.clone(),
        l7: e.l7.clone(),
        policy: e.allow.policy.clone(),
    }
}

/// The L7 view of one direction: the TCP ports some rule puts L7 rules on,
/// and for each such port one entry per rule admitting traffic there (its
/// L7 rules, or allow-all for a rule without).
fn l7_entries(items: &[L7Item]) -> Vec<L7Allow> {
    let tcp = L4Protocol::Tcp;
    let mut ports = BTreeSet::new();
    for item in items.iter().filter(|i| i.l7.is_some()) {
        for p in &item.ports {
            if let PortMatch::Ports {
                protocol,
                first,
                last,
            } = *p
            {
                if protocol == tcp && first == last {
                    ports.insert(first);
                }
            }
        }
    }
    let mut out = Vec::new();
    for port in ports {
        for item in items {
            if item.nets.is_empty() && item.fqdns.is_empty() {
                continue;
            }
            if !item.ports.iter().any(|p| p.admits(tcp.number(), port)) {
                continue;
            }
            out.push(L7Allow {
                nets: item.nets.clone(),
                fqdns: item.fqdns.clone(),
                port,
                rule: item.l7.clone().unwrap_or(L7Rule::AllowAll),
                policy: item.policy.clone(),
            });
        }
    }
    out
}

/// Ingress rules are shared by pods isolated by the same policies whose
/// named ports resolve the same.
type IngressKey = (Vec<usize>, Vec<Vec<PortMatch>>);

struct EgressShared {
    rules: Arc<DirectionRules>,
    dns: Option<Arc<DnsRules>>,
}

fn egress_rules(
    parsed: &[Arc<Parsed>],
    resolved: &[Option<Resolved>],
    ids: &[usize],
) -> EgressShared {
    let mut rules = DirectionRules::default();
    let mut wants_dns = false;
    let mut dns = DnsRules::default();
    let mut plain: Vec<&Emitted> = Vec::new();
    let mut items = Vec::new();
    for &i in ids {
        let (Some(p), Some(Some(r))) = (parsed.get(i), resolved.get(i)) else {
            continue;
        };
        rules.policies.push(p.policy.clone());
        rules
            .allow
            .extend(r.egress.allows.iter().map(|e| e.allow.clone()));
        rules.fqdn.extend(r.egress.fqdn.iter().cloned());
        items.extend(r.egress.allows.iter().map(emitted_item));
        items.extend(r.egress.fqdn_l7.iter().cloned());
        wants_dns |= r.egress.wants_dns;
        dns.allow.extend(r.egress.dns.iter().cloned());
        plain.extend(r.egress.allows.iter().filter(|e| !e.dns_rule));
    }
    rules.l7 = l7_entries(&items);
    let dns = wants_dns.then(|| {
        for e in plain {
            let ports: Vec<PortMatch> = e
                .allow
                .ports
                .iter()
                .copied()
                .filter(|p| {
                    p.admits(L4Protocol::Udp.number(), 53) || p.admits(L4Protocol::Tcp.number(), 53)
                })
                .collect();
            if !ports.is_empty() {
                dns.allow.push(DnsAllow {
                    servers: e.allow.nets.clone(),
                    ports,
                    names: None,
                    policy: e.allow.policy.clone(),
                });
            }
        }
        Arc::new(dns)
    });
    EgressShared {
        rules: Arc::new(rules),
        dns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    #[test]
    fn subtract_splits_around_excepts() {
        let got = subtract(net("10.0.0.0/8"), &[net("10.1.0.0/16")]);
        assert_eq!(got.len(), 8);
        assert!(got.iter().all(|n| !n.contains(&net("10.1.2.3/32"))));
        assert!(got.iter().any(|n| n.contains(&net("10.0.255.255/32"))));
        assert!(got.iter().any(|n| n.contains(&net("10.2.0.0/32"))));
        assert!(got.iter().any(|n| n.contains(&net("10.255.0.0/32"))));
        // Everything but the except, exactly: address counts add up.
        let size = |n: &IpNet| 1u64 << (32 - n.prefix_len());
        assert_eq!(got.iter().map(size).sum::<u64>(), (1 << 24) - (1 << 16));

        assert!(subtract(net("10.0.0.0/8"), &[net("10.0.0.0/8")]).is_empty());
        assert!(subtract(net("10.0.0.0/8"), &[net("0.0.0.0/0")]).is_empty());
        assert_eq!(
            subtract(net("10.0.0.0/8"), &[net("11.0.0.0/8"), net("::/0")]),
            vec![net("10.0.0.0/8")]
        );
        let v6 = subtract(net("2001:db8::/32"), &[net("2001:db8::1/128")]);
        assert_eq!(v6.len(), 96);
        assert!(v6.iter().all(|n| !n.contains(&net("2001:db8::1/128"))));
        assert!(v6.iter().any(|n| n.contains(&net("2001:db8::/128"))));
        // Nested and overlapping excepts.
        let got = subtract(
            net("10.0.0.0/8"),
            &[net("10.1.0.0/16"), net("10.1.2.0/24"), net("10.0.0.0/9")],
        );
        assert!(got.iter().all(|n| net("10.128.0.0/9").contains(n)));
        assert_eq!(got.iter().map(size).sum::<u64>(), 1 << 23);
    }

    #[test]
    fn cilium_keys() {
        let k = |s| selector_key(s, Dialect::CiliumPods);
        assert_eq!(k("app"), Key::Label("app".into()));
        assert_eq!(k("k8s:app"), Key::Label("app".into()));
        assert_eq!(
            k("any:example.com/app"),
            Key::Label("example.com/app".into())
        );
        assert_eq!(k("reserved:host"), Key::Absent);
        assert_eq!(k("io.kubernetes.pod.namespace"), Key::PodNamespace);
        assert_eq!(k("k8s:io.kubernetes.pod.namespace"), Key::PodNamespace);
        assert_eq!(
            k("k8s:io.cilium.k8s.namespace.labels.team"),
            Key::NamespaceLabel("team".into())
        );
        assert_eq!(
            selector_key("k8s:io.kubernetes.pod.namespace", Dialect::CiliumNamespaces),
            Key::Label("io.kubernetes.pod.namespace".into())
        );
        assert_eq!(
            selector_key("k8s:app", Dialect::Kubernetes),
            Key::Label("k8s:app".into())
        );
    }
}
