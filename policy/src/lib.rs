//! meshward policy model (sans-IO).
//!
//! This first increment holds the FQDN part of egress policy: [`Fqdn`]
//! (validated, lower-cased, fully qualified DNS names), the Cilium-compatible
//! `toFQDNs` / DNS-rule selectors [`FqdnSelector`] (`matchName` and
//! `matchPattern`, see [`FqdnPattern`]), and [`FqdnSet`], which compiles
//! many selectors for fast lookup. Everything here is pure: no I/O, no
//! allocation-heavy regex engines, no panics on any input.

pub mod fqdn;

pub use fqdn::{
    Fqdn, FqdnError, FqdnPattern, FqdnSelector, FqdnSet, PatternError, SelectorError,
    MAX_LABEL_LEN, MAX_PATTERN_LEN, MAX_WIRE_LEN,
};
