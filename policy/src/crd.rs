//! The policy CRDs: `MeshNetworkPolicy` (namespaced) and
//! `MeshClusterwideNetworkPolicy` (cluster-scoped), group `meshward.io`,
//! version `v1alpha1`.
//!
//! The types are close enough to Cilium's `CiliumNetworkPolicy` /
//! `CiliumClusterwideNetworkPolicy` that a policy ports by changing
//! `apiVersion` and `kind`. Field names are Cilium's, camelCase exactly:
//! `endpointSelector`; `ingress` (`fromEndpoints`, `fromCIDR`, `fromCIDRSet`
//! with `except`, `toPorts`); `egress` (`toEndpoints`, `toCIDR`, `toCIDRSet`,
//! `toFQDNs` with `matchName` / `matchPattern`, `toPorts` with `ports`
//! {`port`, `endPort`, `protocol`} and `rules.dns` / `rules.http`).
//!
//! The CRD YAML is generated from these types ([`crds_yaml`]).
//!
//! # Decisions
//!
//! * Unknown fields are rejected when parsing (`deny_unknown_fields`), so a
//!   ported Cilium policy that uses something not supported here
//!   (`ingressDeny`, `toEntities`, `toServices`, `rules.kafka`,
//!   `headerMatches[].secret`, …) fails loudly instead of being silently
//!   narrowed or widened. (The API server prunes unknown fields of a
//!   structural schema; `kubectl` rejects them with strict field validation.)
//! * `ingress` / `egress` are `Option<Vec<_>>` to keep Cilium's distinction
//!   between an absent section (no enforcement in that direction) and a
//!   present one (default deny, then the listed allows).
//! * Namespaces: a selector may use the `k8s:io.kubernetes.pod.namespace`
//!   label as Cilium does. A rule may instead (or also) carry a
//!   `namespaceSelector` (a meshward addition): the peers of the rule are
//!   then the pods of the namespaces it selects, narrowed by
//!   `fromEndpoints` / `toEndpoints` when those are given. In a namespaced
//!   policy, endpoint selectors without a namespace label or
//!   `namespaceSelector` mean the policy's own namespace (as in Cilium); in
//!   a clusterwide policy they mean every namespace.
//! * Label keys may carry a Cilium source prefix (`k8s:`, `any:`, …), which
//!   is stripped before checking the key as a Kubernetes qualified name.
//! * `port` is a string, as in Cilium, and must be `1..=65535` or a named
//!   port (IANA_SVC_NAME: 1–15 of `[a-z0-9-]`, at least one letter, no
//!   leading, trailing or doubled `-`). Cilium's wildcard port `"0"` is not
//!   accepted: omit `toPorts` instead. An unquoted YAML number is accepted
//!   too. `endPort` needs a numeric `port` and must be `>= port`.
//! * `protocol` is one of `TCP`, `UDP`, `SCTP`, `ANY` (absent means `ANY`).
//! * Like Cilium: one kind of L3 peer per rule (`toFQDNs` cannot be
//!   combined with `toEndpoints`, `toCIDR`, `toCIDRSet`; `fromCIDR` not with
//!   `fromEndpoints`, …); one kind of L7 rule per port rule; `rules.dns`
//!   only on egress; `rules.http` only on TCP or ANY ports, not on port
//!   ranges, and only on port rules that list ports (the proxy is chosen
//!   per port).
//! * `rules.tls: sni` (a meshward addition, not in Cilium): egress only, in
//!   a rule with `toFQDNs`, on TCP/ANY ports listed explicitly; the
//!   ClientHello's server name must match one of the rule's `toFQDNs`
//!   selectors, else the L7 proxy resets the connection.
//! * CIDRs: a bare address means a host prefix; host bits may be set (as Go's
//!   `net.ParseCIDR` allows); every `except` must be of the same family and
//!   inside its `cidr`.
//! * `rules.http` `method`, `path` and `host` are regular expressions
//!   (Cilium: RE2, matched against the whole value by the L7 proxy); here they
//!   are compile-checked with the `regex` crate, whose syntax is RE2's.
//!   Matching semantics belong to the L7 proxy.

use std::fmt;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use crate::fqdn::FqdnSelector;

/// API group of the policy CRDs.
pub const GROUP: &str = "meshward.io";
/// API version of the policy CRDs.
pub const VERSION: &str = "v1alpha1";

/// Spec of a namespaced `MeshNetworkPolicy`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "meshward.io",
    version = "v1alpha1",
    kind = "MeshNetworkPolicy",
    doc = "A namespaced network policy (Cilium CiliumNetworkPolicy compatible fields).",
    plural = "meshnetworkpolicies",
    shortname = "mnp",
    category = "meshward",
    derive = "PartialEq",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshNetworkPolicySpec {
    /// Free text, for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The pods this policy applies to.
    pub endpoint_selector: LabelSelector,
    /// Allowed incoming traffic. Absent: ingress is not enforced by this policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    /// Allowed outgoing traffic. Absent: egress is not enforced by this policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
}

/// Spec of a cluster-scoped `MeshClusterwideNetworkPolicy`: the same fields
/// as [`MeshNetworkPolicySpec`]; selectors span every namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "meshward.io",
    version = "v1alpha1",
    kind = "MeshClusterwideNetworkPolicy",
    doc = "A cluster-wide network policy (Cilium CiliumClusterwideNetworkPolicy compatible fields).",
    plural = "meshclusterwidenetworkpolicies",
    shortname = "mcnp",
    category = "meshward",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshClusterwideNetworkPolicySpec {
    /// Free text, for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The pods this policy applies to, in any namespace.
    pub endpoint_selector: LabelSelector,
    /// Allowed incoming traffic. Absent: ingress is not enforced by this policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    /// Allowed outgoing traffic. Absent: egress is not enforced by this policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
}

/// One ingress allow rule: peers (L3) and, optionally, ports and L7 rules.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    /// Peer pods, by labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_endpoints: Option<Vec<LabelSelector>>,
    /// Namespaces of the peer pods (meshward addition): the peers are the pods
    /// of these namespaces, narrowed by the endpoint selectors when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Peer prefixes.
    #[serde(rename = "fromCIDR", default, skip_serializing_if = "Option::is_none")]
    pub from_cidr: Option<Vec<String>>,
    /// Peer prefixes with exceptions.
    #[serde(
        rename = "fromCIDRSet",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub from_cidr_set: Option<Vec<CidrRule>>,
    /// Destination ports (on the selected pods) and L7 rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
}

/// One egress allow rule: peers (L3 or FQDN) and, optionally, ports and L7 rules.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    /// Peer pods, by labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_endpoints: Option<Vec<LabelSelector>>,
    /// Namespaces of the peer pods (meshward addition): the peers are the pods
    /// of these namespaces, narrowed by the endpoint selectors when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Peer prefixes.
    #[serde(rename = "toCIDR", default, skip_serializing_if = "Option::is_none")]
    pub to_cidr: Option<Vec<String>>,
    /// Peer prefixes with exceptions.
    #[serde(rename = "toCIDRSet", default, skip_serializing_if = "Option::is_none")]
    pub to_cidr_set: Option<Vec<CidrRule>>,
    /// Peers by DNS name, as resolved through the DNS proxy.
    #[serde(rename = "toFQDNs", default, skip_serializing_if = "Option::is_none")]
    pub to_fqdns: Option<Vec<FqdnRule>>,
    /// Destination ports and L7 rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
}

/// A prefix with exceptions (Cilium's `CIDRRule`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CidrRule {
    /// The prefix, e.g. `10.0.0.0/8` or `2001:db8::/32`.
    pub cidr: String,
    /// Sub-prefixes of `cidr` that are not allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except: Option<Vec<String>>,
}

/// Cilium's `FQDNSelector`: exactly one of `matchName` or `matchPattern`.
/// Used by `toFQDNs` and by `rules.dns`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FqdnRule {
    /// An exact DNS name, e.g. `api.example.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_name: Option<String>,
    /// A pattern: `*` matches within one label, a leading `**.` one or more labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_pattern: Option<String>,
}

impl FqdnRule {
    /// The checked selector, or why it is invalid (the message names the
    /// offending field).
    pub fn to_selector(&self) -> Result<FqdnSelector, String> {
        match (&self.match_name, &self.match_pattern) {
            (Some(n), None) => FqdnSelector::match_name(n).map_err(|e| e.to_string()),
            (None, Some(p)) => FqdnSelector::match_pattern(p).map_err(|e| e.to_string()),
            (Some(_), Some(_)) => Err("exactly one of matchName or matchPattern, not both".into()),
            (None, None) => Err("one of matchName or matchPattern is required".into()),
        }
    }
}

/// Ports and the L7 rules that apply on them (Cilium's `PortRule`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortRule {
    /// The ports; L7 rules apply on each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortProtocol>>,
    /// L7 rules: one kind (`dns` or `http`) per port rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<L7Rules>,
}

/// A port or port range and a protocol (Cilium's `PortProtocol`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortProtocol {
    /// `1`..`65535`, or a named port (IANA_SVC_NAME).
    #[serde(deserialize_with = "port_string")]
    pub port: String,
    /// Last port of a range starting at `port` (numeric `port` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i32>,
    /// `TCP`, `UDP`, `SCTP` or `ANY` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["TCP", "UDP", "SCTP", "ANY"]))]
    pub protocol: Option<String>,
}

/// A checked transport protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Any,
}

impl Protocol {
    /// Parses Cilium's spelling (`TCP`, `UDP`, `SCTP`, `ANY`; upper case).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            "ANY" => Some(Self::Any),
            _ => None,
        }
    }
}

impl PortProtocol {
    /// The protocol (`ANY` when absent), or `None` if it is not known.
    pub fn protocol(&self) -> Option<Protocol> {
        match &self.protocol {
            None => Some(Protocol::Any),
            Some(p) => Protocol::parse(p),
        }
    }
}

/// L7 rules on a port rule (Cilium's `L7Rules`, DNS and HTTP only).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L7Rules {
    /// Allowed DNS questions (egress only); also what feeds `toFQDNs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<FqdnRule>>,
    /// Allowed HTTP requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Vec<HttpRule>>,
    /// TLS check (egress, with `toFQDNs`): `sni` requires the ClientHello's
    /// server name to match the rule's `toFQDNs`, else the connection is
    /// reset. Nothing is decrypted. A meshward addition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsRule>,
}

/// TLS check (`rules.tls`, egress with `toFQDNs`): `sni` requires the
/// ClientHello's server name to match the rule's `toFQDNs`, else the
/// connection is reset.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TlsRule {
    /// The ClientHello's server name must match the rule's `toFQDNs`.
    Sni,
}

/// One allowed HTTP request shape (Cilium's `PortRuleHTTP`); all given
/// fields must match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRule {
    /// Regular expression on the method, e.g. `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Regular expression on the path, e.g. `/api/v1/products.*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Regular expression on the host (authority).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Headers that must be present, `Name` or `Name: value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<String>>,
    /// Headers that must be present with the given value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_matches: Option<Vec<HeaderMatch>>,
}

/// A header that must have a value.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name.
    pub name: String,
    /// Exact value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Accepts a port written as a string or as an unquoted YAML/JSON integer.
fn port_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum P {
        S(String),
        N(i64),
    }
    Ok(match P::deserialize(d)? {
        P::S(s) => s,
        P::N(n) => n.to_string(),
    })
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/// One problem in a policy, at a field path such as
/// `spec.egress[1].toFQDNs[0].matchPattern`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    /// Where, from `spec`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Every problem found in a policy (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid policy: ")?;
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl ValidationErrors {
    /// The field paths, in order (handy in tests and status messages).
    pub fn paths(&self) -> Vec<&str> {
        self.0.iter().map(|e| e.path.as_str()).collect()
    }
}

/// Why [`crds_yaml`] failed (serialising a generated CRD; not expected).
#[derive(Debug, thiserror::Error)]
#[error("cannot serialise CRD {kind} to YAML: {message}")]
pub struct CrdYamlError {
    pub kind: &'static str,
    pub message: String,
}

/// Both CRDs as one multi-document YAML stream (`MeshNetworkPolicy`, then
/// `MeshClusterwideNetworkPolicy`), serialised with `serde-saphyr`.
pub fn crds_yaml() -> Result<String, CrdYamlError> {
    let docs = [
        (
            "MeshNetworkPolicy",
            serde_saphyr::to_string(&MeshNetworkPolicy::crd()),
        ),
        (
            "MeshClusterwideNetworkPolicy",
            serde_saphyr::to_string(&MeshClusterwideNetworkPolicy::crd()),
        ),
    ];
    let mut out = String::new();
    for (kind, doc) in docs {
        let doc = doc.map_err(|e| CrdYamlError {
            kind,
            message: e.to_string(),
        })?;
        out.push_str("---\n");
        out.push_str(&doc);
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

impl MeshNetworkPolicySpec {
    /// Checks everything the schema cannot; returns every problem found.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        validate_spec(&self.endpoint_selector, &self.ingress, &self.egress)
    }
}

impl MeshClusterwideNetworkPolicySpec {
    /// Checks everything the schema cannot; returns every problem found.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        validate_spec(&self.endpoint_selector, &self.ingress, &self.egress)
    }
}

struct Errs(Vec<FieldError>);

impl Errs {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// One rule's peers and ports, whichever direction: ingress names them
/// `from*`, egress `to*`; the checks are the same.
struct RulePeers<'a> {
    path: String,
    dir: &'static str,
    endpoints: &'a Option<Vec<LabelSelector>>,
    cidr: &'a Option<Vec<String>>,
    cidr_set: &'a Option<Vec<CidrRule>>,
    /// Only egress has FQDN peers.
    fqdns: Option<&'a Option<Vec<FqdnRule>>>,
    namespace_selector: &'a Option<LabelSelector>,
    to_ports: &'a Option<Vec<PortRule>>,
    egress: bool,
}

fn validate_spec(
    endpoint_selector: &LabelSelector,
    ingress: &Option<Vec<IngressRule>>,
    egress: &Option<Vec<EgressRule>>,
) -> Result<(), ValidationErrors> {
    let mut errs = Errs(Vec::new());
    check_selector(&mut errs, "spec.endpointSelector", endpoint_selector);
    for (i, r) in ingress.iter().flatten().enumerate() {
        check_rule_peers(
            &mut errs,
            RulePeers {
                path: format!("spec.ingress[{i}]"),
                dir: "from",
                endpoints: &r.from_endpoints,
                cidr: &r.from_cidr,
                cidr_set: &r.from_cidr_set,
                fqdns: None,
                namespace_selector: &r.namespace_selector,
                to_ports: &r.to_ports,
                egress: false,
            },
        );
    }
    for (i, r) in egress.iter().flatten().enumerate() {
        check_rule_peers(
            &mut errs,
            RulePeers {
                path: format!("spec.egress[{i}]"),
                dir: "to",
                endpoints: &r.to_endpoints,
                cidr: &r.to_cidr,
                cidr_set: &r.to_cidr_set,
                fqdns: Some(&r.to_fqdns),
                namespace_selector: &r.namespace_selector,
                to_ports: &r.to_ports,
                egress: true,
            },
        );
    }
    if errs.0.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(errs.0))
    }
}

fn check_rule_peers(errs: &mut Errs, r: RulePeers<'_>) {
    let p = &r.path;
    let d = r.dir;
    let non_empty = |v: Option<usize>| v.is_some_and(|n| n > 0);
    let fqdns = r.fqdns.and_then(|f| f.as_ref());
    let mut present = vec![
        (
            format!("{d}Endpoints"),
            non_empty(r.endpoints.as_ref().map(Vec::len)),
        ),
        (format!("{d}CIDR"), non_empty(r.cidr.as_ref().map(Vec::len))),
        (
            format!("{d}CIDRSet"),
            non_empty(r.cidr_set.as_ref().map(Vec::len)),
        ),
    ];
    if r.fqdns.is_some() {
        present.push((format!("{d}FQDNs"), non_empty(fqdns.map(Vec::len))));
    }
    let present: Vec<(&str, bool)> = present.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    check_l3_combination(errs, p, &present);
    check_cidr_peers(
        errs,
        p,
        &format!("{d}CIDR"),
        r.cidr,
        &format!("{d}CIDRSet"),
        r.cidr_set,
    );
    for (j, s) in r.endpoints.iter().flatten().enumerate() {
        check_selector(errs, &format!("{p}.{d}Endpoints[{j}]"), s);
    }
    if let Some(ns) = r.namespace_selector {
        check_selector(errs, &format!("{p}.namespaceSelector"), ns);
        let with_fqdns = r.fqdns.is_some_and(|f| f.is_some());
        if r.cidr.is_some() || r.cidr_set.is_some() || with_fqdns {
            let others = if r.fqdns.is_some() {
                format!("{d}CIDR, {d}CIDRSet or {d}FQDNs")
            } else {
                format!("{d}CIDR or {d}CIDRSet")
            };
            errs.push(
                format!("{p}.namespaceSelector"),
                format!("namespaceSelector selects pods: it cannot be combined with {others}"),
            );
        }
    }
    for (j, f) in fqdns.into_iter().flatten().enumerate() {
        check_fqdn_rule(errs, &format!("{p}.{d}FQDNs[{j}]"), f);
    }
    for (j, pr) in r.to_ports.iter().flatten().enumerate() {
        check_port_rule(
            errs,
            &format!("{p}.toPorts[{j}]"),
            pr,
            r.egress,
            fqdns.is_some_and(|f| !f.is_empty()),
        );
    }
}

/// Cilium allows one kind of L3 peer per rule.
fn check_l3_combination(errs: &mut Errs, path: &str, present: &[(&str, bool)]) {
    let kinds: Vec<&str> = present
        .iter()
        .filter(|(_, p)| *p)
        .map(|(k, _)| *k)
        .collect();
    if kinds.len() > 1 {
        errs.push(
            path,
            format!(
                "combining {} in one rule is not supported (as in Cilium): use one rule per kind of peer",
                kinds.join(" and ")
            ),
        );
    }
}

fn check_cidr_peers(
    errs: &mut Errs,
    path: &str,
    plain_name: &str,
    plain: &Option<Vec<String>>,
    set_name: &str,
    set: &Option<Vec<CidrRule>>,
) {
    for (j, c) in plain.iter().flatten().enumerate() {
        if let Err(m) = parse_cidr(c) {
            errs.push(format!("{path}.{plain_name}[{j}]"), m);
        }
    }
    for (j, r) in set.iter().flatten().enumerate() {
        let rp = format!("{path}.{set_name}[{j}]");
        let base = match parse_cidr(&r.cidr) {
            Ok(n) => Some(n),
            Err(m) => {
                errs.push(format!("{rp}.cidr"), m);
                None
            }
        };
        for (k, e) in r.except.iter().flatten().enumerate() {
            let ep = format!("{rp}.except[{k}]");
            match (parse_cidr(e), base) {
                (Err(m), _) => errs.push(ep, m),
                (Ok(ex), Some(b)) if !b.contains(&ex) => {
                    errs.push(ep, format!("{ex} is not inside cidr {b}"))
                }
                _ => {}
            }
        }
    }
}

/// A prefix (`a.b.c.d/n`, `x::/n`) or a bare address (a host prefix).
/// The result is truncated to its network address.
pub(crate) fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    if let Ok(a) = s.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(a));
    }
    Err(format!("{s:?} is not a CIDR prefix or an IP address"))
}

fn check_fqdn_rule(errs: &mut Errs, path: &str, f: &FqdnRule) {
    if let Err(m) = f.to_selector() {
        let field = match (&f.match_name, &f.match_pattern) {
            (Some(_), None) => format!("{path}.matchName"),
            (None, Some(_)) => format!("{path}.matchPattern"),
            _ => path.to_string(),
        };
        errs.push(field, m);
    }
}

fn check_port_rule(errs: &mut Errs, path: &str, pr: &PortRule, egress: bool, to_fqdns: bool) {
    let mut any_range = false;
    let mut non_tcp: Option<String> = None;
    for (k, pp) in pr.ports.iter().flatten().enumerate() {
        let pp_path = format!("{path}.ports[{k}]");
        let numeric = check_port(errs, &format!("{pp_path}.port"), &pp.port);
        if let Some(end) = pp.end_port {
            any_range = true;
            let ep = format!("{pp_path}.endPort");
            match numeric {
                None => errs.push(ep, "endPort needs a numeric port"),
                Some(start) => {
                    if !(1..=65535).contains(&end) {
                        errs.push(ep, format!("{end} is not a port (1-65535)"));
                    } else if end < i32::from(start) {
                        errs.push(ep, format!("{end} is less than port {start}"));
                    }
                }
            }
        }
        match pp.protocol() {
            None => errs.push(
                format!("{pp_path}.protocol"),
                format!(
                    "unknown protocol {:?}: one of TCP, UDP, SCTP, ANY",
                    pp.protocol.as_deref().unwrap_or_default()
                ),
            ),
            Some(Protocol::Tcp | Protocol::Any) => {}
            Some(_) => {
                if non_tcp.is_none() {
                    non_tcp = pp.protocol.clone();
                }
            }
        }
    }
    let Some(rules) = &pr.rules else { return };
    let rp = format!("{path}.rules");
    let has_dns = rules.dns.as_ref().is_some_and(|v| !v.is_empty());
    let has_http = rules.http.as_ref().is_some_and(|v| !v.is_empty());
    let has_tls = rules.tls.is_some();
    if usize::from(has_dns) + usize::from(has_http) + usize::from(has_tls) > 1 {
        errs.push(
            &rp,
            "only one kind of L7 rule (dns, http or tls) per port rule",
        );
    }
    if (has_dns || has_http || has_tls) && any_range {
        errs.push(&rp, "L7 rules cannot apply on port ranges (endPort)");
    }
    if has_dns && !egress {
        errs.push(format!("{rp}.dns"), "DNS rules are only allowed on egress");
    }
    if has_http || has_tls {
        let field = if has_http { "http" } else { "tls" };
        let kind = if has_http { "HTTP" } else { "TLS" };
        if let Some(proto) = &non_tcp {
            errs.push(
                format!("{rp}.{field}"),
                format!("{kind} rules need TCP or ANY ports, not {proto}"),
            );
        }
        if pr.ports.as_ref().is_none_or(Vec::is_empty) {
            errs.push(
                format!("{rp}.{field}"),
                format!("{kind} rules need ports (the proxy is selected per port)"),
            );
        }
    }
    if has_tls {
        if !egress {
            errs.push(format!("{rp}.tls"), "TLS rules are only allowed on egress");
        } else if !to_fqdns {
            errs.push(
                format!("{rp}.tls"),
                "TLS rules need toFQDNs in the same rule (the allowed server names)",
            );
        }
    }
    for (k, d) in rules.dns.iter().flatten().enumerate() {
        check_fqdn_rule(errs, &format!("{rp}.dns[{k}]"), d);
    }
    for (k, h) in rules.http.iter().flatten().enumerate() {
        let hp = format!("{rp}.http[{k}]");
        for (name, v) in [("method", &h.method), ("path", &h.path), ("host", &h.host)] {
            if let Some(re) = v {
                if let Err(e) = regex::RegexBuilder::new(re).size_limit(1 << 20).build() {
                    errs.push(
                        format!("{hp}.{name}"),
                        format!("invalid regular expression: {e}"),
                    );
                }
            }
        }
        for (m, hdr) in h.headers.iter().flatten().enumerate() {
            let name = hdr.split(':').next().unwrap_or_default().trim();
            if !is_header_name(name) {
                errs.push(
                    format!("{hp}.headers[{m}]"),
                    format!("{hdr:?} does not start with a valid header name"),
                );
            }
        }
        for (m, hm) in h.header_matches.iter().flatten().enumerate() {
            if !is_header_name(&hm.name) {
                errs.push(
                    format!("{hp}.headerMatches[{m}].name"),
                    format!("{:?} is not a valid header name", hm.name),
                );
            }
        }
    }
}

/// HTTP token characters (RFC 9110), non-empty.
fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Returns the numeric port, if it is one; records an error if the port is
/// neither a number in range nor a valid named port.
fn check_port(errs: &mut Errs, path: &str, port: &str) -> Option<u16> {
    if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
        return match port.parse::<u32>() {
            Ok(n @ 1..=65535) => u16::try_from(n).ok(),
            _ => {
                errs.push(path, format!("{port} is not a port (1-65535)"));
                None
            }
        };
    }
    if let Err(m) = check_port_name(port) {
        errs.push(
            path,
            format!("{port:?} is neither a port number (1-65535) nor a named port: {m}"),
        );
    }
    None
}

/// IANA_SVC_NAME (RFC 6335), as Kubernetes checks container port names.
pub(crate) fn check_port_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 15 {
        return Err("a named port is 1 to 15 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("a named port has only a-z, 0-9 and '-'");
    }
    if !s.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err("a named port has at least one letter");
    }
    if s.starts_with('-') || s.ends_with('-') || s.contains("--") {
        return Err("a named port cannot start or end with '-' or have two in a row");
    }
    Ok(())
}

/// Every problem in a label selector at `path` (the compiler checks
/// Kubernetes NetworkPolicy selectors with this too).
pub(crate) fn selector_errors(path: &str, sel: &LabelSelector) -> Vec<FieldError> {
    let mut errs = Errs(Vec::new());
    check_selector(&mut errs, path, sel);
    errs.0
}

fn check_selector(errs: &mut Errs, path: &str, sel: &LabelSelector) {
    for (k, v) in sel.match_labels.iter().flatten() {
        if let Err(m) = check_label_key(k) {
            errs.push(
                format!("{path}.matchLabels"),
                format!("label key {k:?}: {m}"),
            );
        }
        if let Err(m) = check_label_value(v) {
            errs.push(
                format!("{path}.matchLabels"),
                format!("value {v:?} of label {k:?}: {m}"),
            );
        }
    }
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let ep = format!("{path}.matchExpressions[{i}]");
        if let Err(m) = check_label_key(&e.key) {
            errs.push(format!("{ep}.key"), format!("label key {:?}: {m}", e.key));
        }
        let n = e.values.as_ref().map_or(0, Vec::len);
        match e.operator.as_str() {
            "In" | "NotIn" if n == 0 => errs.push(
                format!("{ep}.values"),
                format!("operator {} needs values", e.operator),
            ),
            "Exists" | "DoesNotExist" if n > 0 => errs.push(
                format!("{ep}.values"),
                format!("operator {} takes no values", e.operator),
            ),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => errs.push(
                format!("{ep}.operator"),
                format!("unknown operator {other:?}: one of In, NotIn, Exists, DoesNotExist"),
            ),
        }
        for (j, v) in e.values.iter().flatten().enumerate() {
            if let Err(m) = check_label_value(v) {
                errs.push(format!("{ep}.values[{j}]"), format!("{v:?}: {m}"));
            }
        }
    }
}

/// A label key: an optional Cilium source prefix (`k8s:`, `any:`, …), an
/// optional DNS-subdomain prefix and `/`, and a name.
fn check_label_key(key: &str) -> Result<(), &'static str> {
    let key = match key.split_once(':') {
        Some((src, rest))
            if !src.is_empty()
                && src
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) =>
        {
            rest
        }
        _ => key,
    };
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if p.is_empty() || p.len() > 253 {
            return Err("the prefix before '/' must be 1 to 253 characters");
        }
        let ok = p.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
        if !ok {
            return Err("the prefix before '/' must be a lower-case DNS subdomain");
        }
    }
    if name.is_empty() {
        return Err("the name is empty");
    }
    check_label_value(name)
}

/// A label value (and a key's name part): at most 63 of `[-._a-zA-Z0-9]`,
/// beginning and ending with an alphanumeric; may be empty.
fn check_label_value(v: &str) -> Result<(), &'static str> {
    if v.len() > 63 {
        return Err("longer than 63 characters");
    }
    if !v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err("only letters, digits, '-', '_' and '.' are allowed");
    }
    let alnum = |b: Option<u8>| b.is_none_or(|b| b.is_ascii_alphanumeric());
    if !alnum(v.bytes().next()) || !alnum(v.bytes().last()) {
        return Err("must begin and end with a letter or digit");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

    /// The seed example, written as a CiliumNetworkPolicy with only
    /// apiVersion and kind changed.
    const SEED: &str = r#"
apiVersion: meshward.io/v1alpha1
kind: MeshNetworkPolicy
metadata:
  name: shop
  namespace: shop
spec:
  description: frontend reads products; backend calls the payment API
  endpointSelector:
    matchLabels:
      app: backend
  ingress:
    - fromEndpoints:
        - matchLabels:
            app: frontend
            k8s:io.kubernetes.pod.namespace: shop
      toPorts:
        - ports:
            - port: "8080"
              protocol: TCP
          rules:
            http:
              - method: GET
                path: "/api/v1/products.*"
                headerMatches:
                  - name: X-Tenant
                    value: acme
  egress:
    - toEndpoints:
        - matchLabels:
            k8s:io.kubernetes.pod.namespace: kube-system
            k8s-app: kube-dns
      toPorts:
        - ports:
            - port: "53"
              protocol: ANY
          rules:
            dns:
              - matchName: api.example.test
              - matchPattern: "*.cdn.example.test"
    - toFQDNs:
        - matchName: api.example.test
      toPorts:
        - ports:
            - port: "443"
              protocol: TCP
    - toCIDRSet:
        - cidr: 10.0.0.0/8
          except:
            - 10.96.0.0/12
        - cidr: 2001:db8::/32
    - toEndpoints:
        - matchExpressions:
            - key: app
              operator: In
              values: [db, cache]
      namespaceSelector:
        matchLabels:
          team: data
      toPorts:
        - ports:
            - port: 5432
            - port: "9000"
              endPort: 9100
              protocol: UDP
            - port: metrics
"#;

    fn parse(yaml: &str) -> MeshNetworkPolicy {
        match serde_saphyr::from_str(yaml) {
            Ok(p) => p,
            Err(e) => panic!("parse: {e}"),
        }
    }

    #[test]
    fn seed_parses_and_validates() {
        let p = parse(SEED);
        assert_eq!(p.metadata.name.as_deref(), Some("shop"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(p.spec.validate(), Ok(()));
        let egress = p.spec.egress.as_ref().expect("egress");
        assert_eq!(egress.len(), 4);
        let dns = egress[0].to_ports.as_ref().expect("ports")[0]
            .rules
            .as_ref()
            .expect("rules")
            .dns
            .as_ref()
            .expect("dns");
        assert_eq!(dns[0].match_name.as_deref(), Some("api.example.test"));
        let sel = egress[1].to_fqdns.as_ref().expect("toFQDNs")[0]
            .to_selector()
            .expect("selector");
        let name = crate::Fqdn::parse("API.example.test").expect("name");
        assert!(sel.matches(&name));
        let set = &egress[2].to_cidr_set.as_ref().expect("toCIDRSet")[0];
        assert_eq!(
            set.except.as_deref(),
            Some(&["10.96.0.0/12".to_string()][..])
        );
        let ports = egress[3].to_ports.as_ref().expect("ports")[0]
            .ports
            .as_ref()
            .expect("ports");
        assert_eq!(ports[0].port, "5432", "an unquoted port number is accepted");
        assert_eq!(ports[0].protocol(), Some(Protocol::Any));
        assert_eq!(ports[1].protocol(), Some(Protocol::Udp));
        let http = &p.spec.ingress.as_ref().expect("ingress")[0]
            .to_ports
            .as_ref()
            .expect("ports")[0]
            .rules
            .as_ref()
            .expect("rules")
            .http
            .as_ref()
            .expect("http")[0];
        assert_eq!(http.path.as_deref(), Some("/api/v1/products.*"));

        // Round trip through JSON keeps Cilium's field names.
        let json = serde_json::to_value(&p).expect("json");
        let e = &json["spec"]["egress"];
        assert!(e[1]["toFQDNs"][0]["matchName"].is_string());
        assert!(e[2]["toCIDRSet"][0]["except"].is_array());
        assert_eq!(e[3]["toPorts"][0]["ports"][1]["endPort"], 9100);
        let back: MeshNetworkPolicy = serde_json::from_value(json).expect("back");
        assert_eq!(back.spec, p.spec);
    }

    #[test]
    fn clusterwide_parses_and_validates() {
        let yaml = SEED
            .replace(
                "kind: MeshNetworkPolicy",
                "kind: MeshClusterwideNetworkPolicy",
            )
            .replace("  namespace: shop\n", "");
        let p: MeshClusterwideNetworkPolicy = serde_saphyr::from_str(&yaml).expect("parse");
        assert_eq!(p.spec.validate(), Ok(()));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        for (from, to) in [
            (
                "    - toFQDNs:",
                "    - toEntities: [world]\n      toFQDNs:",
            ),
            ("  egress:", "  egressDeny: []\n  egress:"),
            (
                "              - method: GET",
                "              - method: GET\n                secret: x",
            ),
        ] {
            let yaml = SEED.replacen(from, to, 1);
            assert_ne!(yaml, SEED);
            let r: Result<MeshNetworkPolicy, _> = serde_saphyr::from_str(&yaml);
            assert!(r.is_err(), "{to} should be rejected");
        }
    }

    /// Builds a policy from a spec YAML snippet (under `spec:`).
    fn spec(body: &str) -> MeshNetworkPolicySpec {
        let sel = if body.contains("  endpointSelector:") {
            ""
        } else {
            "  endpointSelector: {}\n"
        };
        let yaml = format!(
            "apiVersion: meshward.io/v1alpha1\nkind: MeshNetworkPolicy\nmetadata: {{name: t}}\nspec:\n{sel}{body}"
        );
        parse(&yaml).spec
    }

    fn errors_of(body: &str) -> Vec<FieldError> {
        match spec(body).validate() {
            Ok(()) => panic!("expected errors for:\n{body}"),
            Err(e) => e.0,
        }
    }

    #[test]
    fn bad_policies_give_field_paths() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "  egress:\n  - toCIDR: [10.0.0.0/8]\n  - toFQDNs:\n    - matchPattern: 'a..b'\n",
                "spec.egress[1].toFQDNs[0].matchPattern",
                "empty label",
            ),
            (
                "  egress:\n  - toFQDNs:\n    - matchName: 'bad name.example'\n",
                "spec.egress[0].toFQDNs[0].matchName",
                "invalid matchName",
            ),
            (
                "  egress:\n  - toFQDNs:\n    - matchName: a.example\n      matchPattern: '*.example'\n",
                "spec.egress[0].toFQDNs[0]",
                "not both",
            ),
            (
                "  egress:\n  - toFQDNs:\n    - {}\n",
                "spec.egress[0].toFQDNs[0]",
                "is required",
            ),
            (
                "  egress:\n  - toCIDR: [10.0.0.0/33]\n",
                "spec.egress[0].toCIDR[0]",
                "not a CIDR",
            ),
            (
                "  egress:\n  - toCIDRSet:\n    - cidr: 10.0.0.0/8\n      except: [192.168.0.0/16]\n",
                "spec.egress[0].toCIDRSet[0].except[0]",
                "not inside cidr 10.0.0.0/8",
            ),
            (
                "  egress:\n  - toCIDRSet:\n    - cidr: 10.0.0.0/8\n      except: [10.0.0.0/4]\n",
                "spec.egress[0].toCIDRSet[0].except[0]",
                "not inside",
            ),
            (
                "  ingress:\n  - fromCIDRSet:\n    - cidr: 10.0.0.0/8\n      except: ['::/0']\n",
                "spec.ingress[0].fromCIDRSet[0].except[0]",
                "not inside",
            ),
            (
                "  ingress:\n  - fromCIDRSet:\n    - cidr: nope\n",
                "spec.ingress[0].fromCIDRSet[0].cidr",
                "not a CIDR",
            ),
            (
                "  egress:\n  - toPorts:\n    - ports:\n      - port: '0'\n",
                "spec.egress[0].toPorts[0].ports[0].port",
                "not a port",
            ),
            (
                "  egress:\n  - toPorts:\n    - ports:\n      - port: '65536'\n",
                "spec.egress[0].toPorts[0].ports[0].port",
                "not a port",
            ),
            (
                "  egress:\n  - toPorts:\n    - ports:\n      - port: 'Http'\n",
                "spec.egress[0].toPorts[0].ports[0].port",
                "named port",
            ),
            (
                "  egress:\n  - toPorts:\n    - ports:\n      - port: 'a-very-long-port-name'\n",
                "spec.egress[0].toPorts[0].ports[0].port",
                "1 to 15",
            ),
            (
                "  egress:\n  - toPorts:\n    - ports:\n      - port: 'web--ui'\n",
                "spec.egress[0].toPorts[0].ports[0].port",
                "two in a row",
            ),
            (
                "  egress:\n  - toPorts:\n    - ports:\n      - port: '8080'\n        endPort: 80\n",
                "spec.egress[0].toPorts[0].ports[0].endPort",
                "less than port 8080",
            ),
            (
                "  egress:\n  - toPorts:\n    - ports:\n      - port: http\n        endPort: 90\n",
                "spec.egress[0].toPorts[0].ports[0].endPort",
                "numeric port",
            ),
            (
                "  egress:\n  - toPorts:\n    - ports:\n      - port: '80'\n        protocol: ICMP\n",
                "spec.egress[0].toPorts[0].ports[0].protocol",
                "unknown protocol",
            ),
            (
                "  egress:\n  - toPorts:\n    - ports:\n      - port: '80'\n        protocol: tcp\n",
                "spec.egress[0].toPorts[0].ports[0].protocol",
                "unknown protocol",
            ),
            (
                "  ingress:\n  - toPorts:\n    - ports: [{port: '80'}]\n      rules:\n        http:\n        - path: '/api/(v1'\n",
                "spec.ingress[0].toPorts[0].rules.http[0].path",
                "invalid regular expression",
            ),
            (
                "  ingress:\n  - toPorts:\n    - ports: [{port: '80'}]\n      rules:\n        http:\n        - method: '[GET'\n",
                "spec.ingress[0].toPorts[0].rules.http[0].method",
                "invalid regular expression",
            ),
            (
                "  ingress:\n  - toPorts:\n    - ports: [{port: '80'}]\n      rules:\n        http:\n        - host: '*.example'\n",
                "spec.ingress[0].toPorts[0].rules.http[0].host",
                "invalid regular expression",
            ),
            (
                "  ingress:\n  - toPorts:\n    - ports: [{port: '80'}]\n      rules:\n        http:\n        - headerMatches: [{name: 'bad name', value: x}]\n",
                "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].name",
                "header name",
            ),
            (
                "  ingress:\n  - toPorts:\n    - ports: [{port: '80', protocol: UDP}]\n      rules:\n        http: [{path: /}]\n",
                "spec.ingress[0].toPorts[0].rules.http",
                "TCP or ANY",
            ),
            (
                "  ingress:\n  - toPorts:\n    - ports: [{port: '53'}]\n      rules:\n        dns: [{matchName: a.example}]\n",
                "spec.ingress[0].toPorts[0].rules.dns",
                "only allowed on egress",
            ),
            (
                "  egress:\n  - toPorts:\n    - ports: [{port: '53'}]\n      rules:\n        dns: [{matchPattern: 'a b'}]\n",
                "spec.egress[0].toPorts[0].rules.dns[0].matchPattern",
                "invalid matchPattern",
            ),
            (
                "  egress:\n  - toPorts:\n    - rules:\n        http: [{path: /}]\n",
                "spec.egress[0].toPorts[0].rules.http",
                "HTTP rules need ports",
            ),
            (
                "  egress:\n  - toFQDNs: [{matchName: a.example}]\n    toPorts:\n    - ports: [{port: '443', protocol: UDP}]\n      rules: {tls: sni}\n",
                "spec.egress[0].toPorts[0].rules.tls",
                "TLS rules need TCP or ANY",
            ),
            (
                "  egress:\n  - toCIDR: [10.0.0.0/8]\n    toPorts:\n    - ports: [{port: '443'}]\n      rules: {tls: sni}\n",
                "spec.egress[0].toPorts[0].rules.tls",
                "need toFQDNs",
            ),
            (
                "  ingress:\n  - toPorts:\n    - ports: [{port: '443'}]\n      rules: {tls: sni}\n",
                "spec.ingress[0].toPorts[0].rules.tls",
                "only allowed on egress",
            ),
            (
                "  egress:\n  - toFQDNs: [{matchName: a.example}]\n    toPorts:\n    - ports: [{port: '443'}]\n      rules: {tls: sni, http: [{path: /}]}\n",
                "spec.egress[0].toPorts[0].rules",
                "(dns, http or tls)",
            ),
            (
                "  egress:\n  - toPorts:\n    - ports: [{port: '53'}]\n      rules:\n        dns: [{matchName: a.example}]\n        http: [{path: /}]\n",
                "spec.egress[0].toPorts[0].rules",
                "one kind of L7 rule",
            ),
            (
                "  egress:\n  - toPorts:\n    - ports: [{port: '80', endPort: 90}]\n      rules:\n        http: [{path: /}]\n",
                "spec.egress[0].toPorts[0].rules",
                "port ranges",
            ),
            (
                "  egress:\n  - toFQDNs: [{matchName: a.example}]\n    toCIDR: [10.0.0.0/8]\n",
                "spec.egress[0]",
                "combining toCIDR and toFQDNs",
            ),
            (
                "  egress:\n  - namespaceSelector: {}\n    toCIDR: [10.0.0.0/8]\n",
                "spec.egress[0].namespaceSelector",
                "cannot be combined",
            ),
            (
                "  ingress:\n  - fromEndpoints:\n    - matchExpressions:\n      - {key: app, operator: Has}\n",
                "spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator",
                "unknown operator",
            ),
            (
                "  ingress:\n  - fromEndpoints:\n    - matchExpressions:\n      - {key: app, operator: In}\n",
                "spec.ingress[0].fromEndpoints[0].matchExpressions[0].values",
                "needs values",
            ),
            (
                "  ingress:\n  - fromEndpoints:\n    - matchLabels: {'-app': x}\n",
                "spec.ingress[0].fromEndpoints[0].matchLabels",
                "label key",
            ),
        ];
        for (body, path, msg) in cases {
            let errs = errors_of(body);
            assert!(
                errs.iter()
                    .any(|e| e.path == *path && e.message.contains(msg)),
                "case:\n{body}\nwanted {path}: ...{msg}...\ngot {errs:#?}"
            );
        }
    }

    #[test]
    fn all_problems_are_reported() {
        let errs = spec(
            "  endpointSelector:\n    matchLabels: {'a b': x}\n  egress:\n  - toFQDNs: [{matchPattern: 'a..b'}]\n  - toPorts:\n    - ports: [{port: '0'}, {port: '80', protocol: XYZ}]\n",
        )
        .validate()
        .expect_err("invalid");
        assert_eq!(
            errs.paths(),
            vec![
                "spec.endpointSelector.matchLabels",
                "spec.egress[0].toFQDNs[0].matchPattern",
                "spec.egress[1].toPorts[0].ports[0].port",
                "spec.egress[1].toPorts[0].ports[1].protocol",
            ]
        );
        let text = errs.to_string();
        assert!(
            text.starts_with("invalid policy: spec.endpointSelector.matchLabels: "),
            "{text}"
        );
    }

    #[test]
    fn good_edge_cases_validate() {
        for body in [
            "",
            "  ingress: []\n  egress: []\n",
            "  egress:\n  - {}\n",
            "  egress:\n  - toCIDR: [192.0.2.1, '2001:db8::1', 10.1.2.3/8]\n",
            "  egress:\n  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.0.0.0/8, 10.1.1.1]}]\n",
            "  egress:\n  - toPorts:\n    - ports: [{port: '1'}, {port: '65535'}, {port: '80', endPort: 80}, {port: http-alt}, {port: '5353', protocol: SCTP}]\n",
            "  egress:\n  - toFQDNs: [{matchPattern: '*'}, {matchPattern: '**.example.test'}, {matchName: 'example.test.'}]\n",
            "  ingress:\n  - fromEndpoints: [{matchExpressions: [{key: 'k8s:io.kubernetes.pod.namespace', operator: Exists}]}]\n    namespaceSelector: {matchLabels: {'kubernetes.io/metadata.name': shop}}\n",
        ] {
            assert_eq!(spec(body).validate(), Ok(()), "{body}");
        }
    }

    #[test]
    fn crds_have_group_version_scope_and_schema() {
        let ns = MeshNetworkPolicy::crd();
        let cw = MeshClusterwideNetworkPolicy::crd();
        for (crd, kind, scope, plural) in [
            (
                &ns,
                "MeshNetworkPolicy",
                "Namespaced",
                "meshnetworkpolicies",
            ),
            (
                &cw,
                "MeshClusterwideNetworkPolicy",
                "Cluster",
                "meshclusterwidenetworkpolicies",
            ),
        ] {
            assert_eq!(crd.spec.group, GROUP);
            assert_eq!(crd.spec.names.kind, kind);
            assert_eq!(crd.spec.names.plural, plural);
            assert_eq!(crd.spec.scope, scope);
            assert_eq!(
                crd.metadata.name.as_deref(),
                Some(&*format!("{plural}.{GROUP}"))
            );
            assert_eq!(crd.spec.versions.len(), 1);
            assert_eq!(crd.spec.versions[0].name, VERSION);
            assert!(crd.spec.versions[0].served && crd.spec.versions[0].storage);
            let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema");
            let spec = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"];
            let egress = &spec["egress"]["items"]["properties"];
            assert!(egress["toFQDNs"]["items"]["properties"]["matchPattern"].is_object());
            assert!(egress["toCIDRSet"]["items"]["properties"]["except"].is_object());
            let port = &egress["toPorts"]["items"]["properties"]["ports"]["items"]["properties"];
            assert_eq!(port["port"]["type"], "string");
            assert_eq!(
                port["protocol"]["enum"],
                serde_json::json!(["TCP", "UDP", "SCTP", "ANY"])
            );
            let rules = &egress["toPorts"]["items"]["properties"]["rules"]["properties"];
            assert!(rules["dns"]["items"]["properties"]["matchName"].is_object());
            assert!(rules["http"]["items"]["properties"]["headerMatches"].is_object());
            assert!(spec["ingress"]["items"]["properties"]["fromCIDR"].is_object());
            assert!(spec["endpointSelector"]["properties"]["matchLabels"].is_object());
            // Structural: kube removed additionalProperties: false.
            assert!(!schema
                .to_string()
                .contains("\"additionalProperties\":false"));
        }
    }

    #[test]
    fn crds_yaml_is_two_documents_that_parse_back() {
        let yaml = crds_yaml().expect("yaml");
        assert!(yaml.starts_with("---\n"));
        let docs: Vec<&str> = yaml
            .split("---\n")
            .filter(|d| !d.trim().is_empty())
            .collect();
        assert_eq!(docs.len(), 2);
        let back: Vec<CustomResourceDefinition> = docs
            .iter()
            .map(|d| serde_saphyr::from_str(d).expect("parse CRD back"))
            .collect();
        assert_eq!(back[0], MeshNetworkPolicy::crd());
        assert_eq!(back[1], MeshClusterwideNetworkPolicy::crd());
        assert!(yaml.contains("toFQDNs:") && yaml.contains("matchPattern:"));
    }
}
