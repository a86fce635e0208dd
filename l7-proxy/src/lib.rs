//! meshward's per-node L7 proxy: HTTP/1.1 and HTTP/2 (gRPC) requests of
//! pods are checked against CiliumNetworkPolicy-style `rules.http`, and TLS
//! connections against allowed server names, without sidecars.
//!
//! nftables TPROXYs the selected connections to the proxy's listeners
//! ([`L7Proxy::bind`] for one, [`spawn_threads`] for one per thread, as the
//! agent runs it); the accepted socket's local address is the original
//! destination, to which allowed requests are forwarded. The agent supplies
//! the rules through [`PolicySource`] and receives every decision as an
//! [`L7Event`].
//!
//! Sans-IO parts, usable and tested alone: [`path`] (normalisation),
//! [`rules`] (matching), [`decide`] (framing checks, the decision, the
//! denial responses), [`h1`] (HTTP/1.1 heads and body framing for the
//! relay), [`sni`] (ClientHello parsing, name check).

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

pub mod decide;
pub mod h1;
pub mod path;
mod pool;
mod proxy;
mod relay;
pub mod rules;
pub mod sni;
mod sock;

pub use proxy::{spawn_threads, L7Proxy, ProxyConfig, ProxyThreads};
pub use rules::{HttpRuleSet, RuleError};
pub use sni::SniRuleSet;

/// Which side of an endpoint a policy is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The source's egress rules.
    Egress,
    /// The destination's ingress rules.
    Ingress,
}

/// What applies to one (endpoint, direction, port).
#[derive(Debug, Clone, Default)]
pub enum PortPolicy {
    /// No L7 rules: everything passes.
    #[default]
    AllowAll,
    /// HTTP rules: each request is checked.
    Http(Arc<HttpRuleSet>),
    /// TLS: the ClientHello's server name is checked, then bytes pass
    /// through (nothing is decrypted).
    Sni(Arc<SniRuleSet>),
}

/// Where the proxy gets rules from; the agent implements it over its
/// compiled policy. Called for every request (HTTP) or connection (TLS),
/// so it should be a cheap map lookup.
pub trait PolicySource: Send + Sync + 'static {
    /// The rules for traffic from `src` to `dst`: for
    /// [`Direction::Egress`] the source endpoint's egress rules on
    /// `dst.port()`, for [`Direction::Ingress`] the destination endpoint's
    /// ingress rules on its port. [`PortPolicy::AllowAll`] when the
    /// endpoint is not local or has no L7 rules there. Both must allow.
    fn lookup(&self, src: IpAddr, dst: SocketAddr, direction: Direction) -> PortPolicy;
}

impl<F> PolicySource for F
where
    F: Fn(IpAddr, SocketAddr, Direction) -> PortPolicy + Send + Sync + 'static,
{
    fn lookup(&self, src: IpAddr, dst: SocketAddr, direction: Direction) -> PortPolicy {
        self(src, dst, direction)
    }
}

/// The outcome recorded in an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allowed,
    /// No rule allowed it (HTTP 403 / gRPC PERMISSION_DENIED / TLS reset).
    Denied,
    /// Refused as malformed or ambiguous (400, or not TLS on a TLS port).
    Malformed,
}

/// The protocol a decision was made on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L7Protocol {
    Http1,
    Http2,
    Grpc,
    Tls,
}

/// One decision, for flow logs and metrics. Its text fields borrow the
/// request where they can (nothing is copied for a sink that only counts
/// verdicts); [`L7Event::into_owned`] makes one to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L7Event<'a> {
    pub time: SystemTime,
    pub verdict: Verdict,
    pub protocol: L7Protocol,
    pub src: SocketAddr,
    /// The original destination.
    pub dst: SocketAddr,
    /// HTTP method (empty for TLS).
    pub method: Cow<'a, str>,
    /// Normalised path (raw when it could not be normalised; empty for TLS).
    pub path: Cow<'a, str>,
    /// HTTP authority, or the TLS server name.
    pub host: Option<Cow<'a, str>>,
    /// The policy that allowed it, or the policies that denied it.
    pub policy: Option<Arc<str>>,
    /// Why it was malformed, when it was.
    pub reason: Option<String>,
}

impl L7Event<'_> {
    /// The event with its text copied out of the request.
    pub fn into_owned(self) -> L7Event<'static> {
        L7Event {
            time: self.time,
            verdict: self.verdict,
            protocol: self.protocol,
            src: self.src,
            dst: self.dst,
            method: Cow::Owned(self.method.into_owned()),
            path: Cow::Owned(self.path.into_owned()),
            host: self.host.map(|h| Cow::Owned(h.into_owned())),
            policy: self.policy,
            reason: self.reason,
        }
    }
}

/// Receives every decision (called inline: keep it cheap, e.g. push into
/// a ring buffer; copy out only what is kept).
pub type EventSink = Arc<dyn Fn(L7Event<'_>) + Send + Sync>;
