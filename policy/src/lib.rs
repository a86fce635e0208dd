//! meshward policy model (sans-IO).
//!
//! This first increment holds the FQDN part of egress policy: [`Fqdn`]
//! (validated, lower-cased, fully qualified DNS names), the Cilium-compatible
//! `toFQDNs` / DNS-rule selectors [`FqdnSelector`] (`matchName` and
//! `matchPattern`, see [`FqdnPattern`]), and [`FqdnSet`], which compiles
//! many selectors for fast lookup. Everything here is pure: no I/O, no
//! allocation-heavy regex engines, no panics on any input.
//!
//! [`crd`] holds the policy CRD types (`MeshNetworkPolicy`,
//! `MeshClusterwideNetworkPolicy`, Cilium-compatible field names), their
//! validation with field paths, and the generated CRD YAML.
//!
//! [`model`] is what the compiler reads (pods, namespaces, policy objects)
//! and [`rules`] what it produces per node ([`NodeRules`]): per local
//! endpoint, egress/ingress allow lists, toFQDNs ports and DNS rules.

pub mod compile;
pub mod crd;
pub mod fqdn;
pub mod model;
pub mod rules;

pub use compile::{compile, Compiled, PolicyError};
pub use crd::{
    crds_yaml, CidrRule, CrdYamlError, EgressRule, FieldError, FqdnRule, HeaderMatch, HttpRule,
    IngressRule, L7Rules, MeshClusterwideNetworkPolicy, MeshClusterwideNetworkPolicySpec,
    MeshNetworkPolicy, MeshNetworkPolicySpec, PortProtocol, PortRule, Protocol, ValidationErrors,
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
    Allow, DirectionRules, DnsAllow, DnsRules, DnsVerdict, EndpointRules, FqdnAllow, NodeRules,
    PortMatch,
};
