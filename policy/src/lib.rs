//! meshward policy model and compiler (sans-IO).
//!
//! Everything here is pure: no I/O, no clock, no panics on any input.
//!
//! * [`fqdn`]: [`Fqdn`] (validated, lower-cased, fully qualified DNS names),
//!   the Cilium-compatible `toFQDNs` / DNS-rule selectors [`FqdnSelector`]
//!   (`matchName` and `matchPattern`, see [`FqdnPattern`]), and [`FqdnSet`],
//!   which compiles many selectors for fast lookup.
//! * [`crd`]: the policy CRD types (`MeshNetworkPolicy`,
//!   `MeshClusterwideNetworkPolicy`, Cilium-compatible field names), their
//!   validation with field paths, and the generated CRD YAML.
//! * [`model`]: what the compiler reads ([`ClusterView`]: pods, namespaces,
//!   policy objects of all three kinds, including Kubernetes
//!   `networking.k8s.io/v1` NetworkPolicy).
//! * [`rules`]: what it produces per node ([`NodeRules`]): per local
//!   endpoint, egress/ingress allow lists, toFQDNs ports and DNS rules, with
//!   pure queries ([`DirectionRules::allows`], [`EndpointRules::fqdn_ports`],
//!   [`DnsRules::query_allowed`]).
//! * [`compile`](mod@compile): [`compile()`] (or a reusable [`Compiler`]) turns a [`ClusterView`] into one node's
//!   [`NodeRules`] plus a [`PolicyError`] (policy, field path, message) per
//!   problem; a bad policy is skipped as a whole, the rest still applies.
//!   The module docs spell out the NetworkPolicy and Cilium semantics and
//!   every decision taken where they leave room.

pub mod compile;
pub mod crd;
pub mod fqdn;
pub mod model;
pub mod rules;

pub use compile::{compile, Compiled, Compiler, PolicyError};
pub use crd::{
    crds_yaml, CidrRule, CrdYamlError, EgressRule, FieldError, FqdnRule, HeaderMatch, HttpRule,
    IngressRule, L7Rules, MeshClusterwideNetworkPolicy, MeshClusterwideNetworkPolicySpec,
    MeshNetworkPolicy, MeshNetworkPolicySpec, PortProtocol, PortRule, Protocol, TlsRule,
    ValidationErrors,
};
pub use fqdn::{
    Fqdn, FqdnError, FqdnPattern, FqdnSelector, FqdnSet, PatternError, SelectorError,
    MAX_LABEL_LEN, MAX_PATTERN_LEN, MAX_WIRE_LEN,
};
pub use model::{
    ClusterView, L4Protocol, NamedPort, NamespaceInfo, PodInfo, PodRef, PolicyKind, PolicyObject,
    PolicyRef,
};
pub use rules::{
    Allow, DirectionRules, DnsAllow, DnsRules, DnsVerdict, EndpointRules, FqdnAllow, L7Allow,
    L7Applies, L7Rule, NodeRules, PortMatch,
};
