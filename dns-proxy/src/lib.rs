//! meshward's transparent DNS proxy.
//!
//! nftables TPROXYs the port-53 traffic (UDP and TCP) of pods selected by
//! FQDN or DNS policies to this proxy. For each query it knows the client
//! (source address) and the server the client asked (original
//! destination); it checks the question against a [`DnsPolicy`], answers
//! denied ones itself (REFUSED, or NXDOMAIN), forwards allowed ones
//! unchanged to the original server over the same transport, and before
//! releasing an answer that carries addresses hands them to a
//! [`LearnHook`] (the agent programs the pod's allow-set there), so the
//! first packet to a freshly resolved address is never dropped.
//!
//! - [`core`]: sans-IO message handling ([`handle_query`],
//!   [`PendingQuery::accept_response`]); decisions documented there.
//! - [`answers`]: the answer cache, sans-IO ([`AnswerCache`]): repeated
//!   queries answered without an upstream exchange.
//! - [`learn`]: addresses along the CNAME chain ([`Learned`]).
//! - [`cache`]: the learned-name cache with TTLs, caps and a crash-safe
//!   snapshot in the state directory ([`FqdnCache`]).
//! - [`server`]: the tokio shell ([`DnsProxy`], [`Listeners`]).
//! - [`stats`]: counters ([`Stats`]).
//! - [`keeper`]: the socket keeper that holds the listeners across agent
//!   restarts, and its client ([`keeper::Keeper`], [`keeper::Client`]).

pub mod answers;
pub mod cache;
pub mod core;
pub mod keeper;
pub mod learn;
pub mod server;
mod sock;
pub mod stats;
mod upstream;

pub use answers::{AnswerCache, AnswerCacheConfig};
pub use cache::{
    CacheConfig, CacheEntry, CacheError, CacheUpdate, FqdnCache, LoadReport, CACHE_FILE,
};
pub use core::{
    check_dns_rules, handle_query, Decision, DenyRcode, DnsPolicy, DropReason, LocalAnswer,
    Mismatch, PendingQuery, QueryContext, QueryInfo, QueryOutcome, ResponseOutcome, Transport,
};
pub use learn::{Learned, MAX_CHAIN};
pub use server::{DnsObserver, DnsProxy, LearnHook, Listeners, ProxyConfig, Relayed};
pub use stats::{Stats, StatsSnapshot, HOLD_BUCKETS_US};
