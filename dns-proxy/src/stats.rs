//! Counters of the proxy, plain atomics (the metrics endpoint reads a
//! [`StatsSnapshot`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

/// Upper bounds (µs) of the hold-time histogram buckets; the last bucket
/// counts everything above the largest bound.
pub const HOLD_BUCKETS_US: [u64; 9] = [50, 100, 250, 500, 1_000, 2_000, 5_000, 20_000, 100_000];

#[derive(Debug, Default)]
pub struct Stats {
    pub queries_allowed: AtomicU64,
    pub queries_denied: AtomicU64,
    /// Answered FORMERR (unparsable, not exactly one question).
    pub queries_formerr: AtomicU64,
    /// Answered NOTIMP (opcode other than QUERY).
    pub queries_notimp: AtomicU64,
    /// Dropped without an answer (shorter than a header, or QR=1).
    pub queries_dropped: AtomicU64,
    /// Dropped because too many UDP queries or TCP connections were in flight.
    pub queries_overload: AtomicU64,
    pub responses_relayed: AtomicU64,
    /// Relayed with TC set (the client retries over TCP).
    pub responses_truncated: AtomicU64,
    /// Relayed although their records did not parse (nothing learned).
    pub responses_unparsed: AtomicU64,
    /// Upstream messages that were not the answer (wrong source, ID,
    /// question...): spoofed or stray, ignored.
    pub responses_mismatched: AtomicU64,
    /// No answer from upstream in time: the client got SERVFAIL.
    pub upstream_timeouts: AtomicU64,
    /// Sending to or connecting to upstream failed: the client got SERVFAIL.
    pub upstream_errors: AtomicU64,
    /// Replies that could not be sent to the client.
    pub client_send_errors: AtomicU64,
    pub tcp_connections: AtomicU64,
    /// Answers held for the learn hook.
    pub holds: AtomicU64,
    /// Holds that hit the upper bound: the answer was released before the
    /// hook finished.
    pub hold_timeouts: AtomicU64,
    /// Hooks that returned an error (the answer was released anyway).
    pub learn_errors: AtomicU64,
    pub hold_us_total: AtomicU64,
    pub hold_us_max: AtomicU64,
    pub hold_us_buckets: [AtomicU64; HOLD_BUCKETS_US.len() + 1],
    /// Allowed queries answered from the answer cache.
    pub answer_cache_hits: AtomicU64,
    /// Allowed queries sent upstream while the answer cache is on (not
    /// cached, expired, too large for the client, or not cacheable).
    pub answer_cache_misses: AtomicU64,
    /// Upstream answers stored in the answer cache.
    pub answer_cache_inserts: AtomicU64,
    /// Entries removed to make room for others.
    pub answer_cache_evictions: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    pub queries_allowed: u64,
    pub queries_denied: u64,
    pub queries_formerr: u64,
    pub queries_notimp: u64,
    pub queries_dropped: u64,
    pub queries_overload: u64,
    pub responses_relayed: u64,
    pub responses_truncated: u64,
    pub responses_unparsed: u64,
    pub responses_mismatched: u64,
    pub upstream_timeouts: u64,
    pub upstream_errors: u64,
    pub client_send_errors: u64,
    pub tcp_connections: u64,
    pub holds: u64,
    pub hold_timeouts: u64,
    pub learn_errors: u64,
    pub hold_us_total: u64,
    pub hold_us_max: u64,
    /// Per bucket of [`HOLD_BUCKETS_US`] (not cumulative), plus the overflow.
    pub hold_us_buckets: Vec<u64>,
    pub answer_cache_hits: u64,
    pub answer_cache_misses: u64,
    pub answer_cache_inserts: u64,
    pub answer_cache_evictions: u64,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

impl Stats {
    pub(crate) fn record_hold(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        bump(&self.holds);
        self.hold_us_total.fetch_add(us, Relaxed);
        self.hold_us_max.fetch_max(us, Relaxed);
        let i = HOLD_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(HOLD_BUCKETS_US.len());
        bump(&self.hold_us_buckets[i]);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Relaxed);
        StatsSnapshot {
            queries_allowed: g(&self.queries_allowed),
            queries_denied: g(&self.queries_denied),
            queries_formerr: g(&self.queries_formerr),
            queries_notimp: g(&self.queries_notimp),
            queries_dropped: g(&self.queries_dropped),
            queries_overload: g(&self.queries_overload),
            responses_relayed: g(&self.responses_relayed),
            responses_truncated: g(&self.responses_truncated),
            responses_unparsed: g(&self.responses_unparsed),
            responses_mismatched: g(&self.responses_mismatched),
            upstream_timeouts: g(&self.upstream_timeouts),
            upstream_errors: g(&self.upstream_errors),
            client_send_errors: g(&self.client_send_errors),
            tcp_connections: g(&self.tcp_connections),
            holds: g(&self.holds),
            hold_timeouts: g(&self.hold_timeouts),
            learn_errors: g(&self.learn_errors),
            hold_us_total: g(&self.hold_us_total),
            hold_us_max: g(&self.hold_us_max),
            hold_us_buckets: self.hold_us_buckets.iter().map(g).collect(),
            answer_cache_hits: g(&self.answer_cache_hits),
            answer_cache_misses: g(&self.answer_cache_misses),
            answer_cache_inserts: g(&self.answer_cache_inserts),
            answer_cache_evictions: g(&self.answer_cache_evictions),
        }
    }
}
