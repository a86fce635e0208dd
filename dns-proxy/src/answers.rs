//! The answer cache, sans-IO: upstream answers kept as wire bytes and
//! served again to later queries for the same question, so that a repeated
//! query costs no upstream exchange (what NodeLocal DNSCache gives a node).
//! The clock is passed in; the shell (`server.rs`) holds it under a mutex.
//!
//! # Decisions
//!
//! - Key: the server the client asked (address and port), the question
//!   (name lower-cased, type, class) and the query bits that change an
//!   answer: RD, CD, AD, whether the query had an OPT record and its DO
//!   bit. Queries and answers over UDP and TCP share entries.
//! - Bypassed (neither looked up nor stored): queries with EDNS options
//!   (cookies, client subnet...: their answers may be for that client
//!   only), EDNS version other than 0, records other than one OPT after the
//!   question, a compressed question name, trailing bytes, and the types
//!   IXFR, AXFR and ANY.
//! - Stored: NOERROR answers with records, for the smallest TTL of their
//!   records (all sections, OPT excluded), at most
//!   [`AnswerCacheConfig::max_ttl`]; NXDOMAIN and NODATA (NOERROR, no
//!   answer records) only with an SOA in the authority section, for the
//!   smaller of the SOA's TTL and its MINIMUM field (RFC 2308 §5) and of
//!   the other records' TTLs, at most
//!   [`AnswerCacheConfig::max_negative_ttl`].
//! - Never stored: TC set, any other RCODE (SERVFAIL, REFUSED, FORMERR...,
//!   also an extended RCODE in the OPT record), a TTL of 0, an answer that
//!   does not parse as records to its last byte, an answer larger than
//!   [`AnswerCacheConfig::max_bytes`] / 16. The shell offers only answers
//!   that matched their upstream exchange (`PendingQuery::accept_response`).
//! - A hit is the stored bytes with the query's ID and the query's exact
//!   question bytes (its 0x20 letter case is echoed) and every TTL (OPT
//!   excluded; the SOA's too, RFC 2308 §5) decreased by the whole seconds
//!   spent in the cache. An entry is served until its TTL has run out
//!   (then it is a miss and removed). No re-encoding: the offsets of the
//!   TTL fields are found once, at insert.
//! - A stored answer larger than the client can take (UDP: 512 bytes
//!   without EDNS, else its advertised size, at least 512; TCP: any) is a
//!   miss: the query goes upstream, which truncates as it should.
//! - Bounded: at most [`AnswerCacheConfig::entries`] entries and
//!   [`AnswerCacheConfig::max_bytes`] bytes of answers. Inserting into a
//!   full cache evicts the entries that expire first (expired ones are the
//!   first of those).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::core::Transport;
use crate::learn::Learned;

const HEADER_LEN: usize = 12;
/// Key bytes before the question: flags, server address (16), port (2).
const KEY_PREFIX: usize = 19;
const TYPE_OPT: u16 = 41;
const TYPE_SOA: u16 = 6;
/// Types whose answers are never cached: IXFR, AXFR, ANY.
const UNCACHED_TYPES: [u16; 3] = [251, 252, 255];
const RCODE_NOERROR: u8 = 0;
const RCODE_NXDOMAIN: u8 = 3;
/// UDP payload a client without EDNS can take.
const CLASSIC_UDP: usize = 512;

/// Sizes and TTL caps of the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnswerCacheConfig {
    /// Most answers kept; 0 turns the cache off.
    pub entries: usize,
    /// Most bytes of answers kept (an answer larger than a sixteenth of
    /// this is not kept). Only the wire bytes count: each entry's key and
    /// learned addresses come on top (an A record is 16 bytes on the wire,
    /// its learned address about 24 in memory).
    pub max_bytes: usize,
    /// Longest a positive answer is kept, whatever its TTL.
    pub max_ttl: Duration,
    /// Longest an NXDOMAIN or NODATA answer is kept.
    pub max_negative_ttl: Duration,
}

/// Default number of entries of the agent's cache.
pub const DEFAULT_ENTRIES: usize = 10_000;

impl Default for AnswerCacheConfig {
    /// Off (0 entries); with entries set, 16 MiB, 1 h and 5 min.
    fn default() -> Self {
        AnswerCacheConfig {
            entries: 0,
            max_bytes: 16 << 20,
            max_ttl: Duration::from_secs(3600),
            max_negative_ttl: Duration::from_secs(300),
        }
    }
}

impl AnswerCacheConfig {
    /// The defaults with `entries` entries.
    pub fn with_entries(entries: usize) -> Self {
        AnswerCacheConfig {
            entries,
            ..AnswerCacheConfig::default()
        }
    }
}

/// Where a query's answer is, or would be, kept. Opaque; obtained from a
/// miss and handed back with the answer to [`AnswerCache::insert`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey(Box<[u8]>);

impl CacheKey {
    /// Length of the question (name, type, class) the key was made from.
    fn question_len(&self) -> usize {
        self.0.len() - KEY_PREFIX
    }
}

/// A query answered from the cache.
#[derive(Debug)]
pub struct Hit {
    /// The reply to send: the query's ID and question, TTLs decreased.
    pub reply: Vec<u8>,
    /// The addresses it carries (for the learn hook), attributed to the
    /// asking client, TTLs decreased as in the reply.
    pub learned: Option<Learned>,
}

/// The result of [`AnswerCache::lookup`].
#[derive(Debug)]
pub enum Lookup {
    Hit(Hit),
    /// Not (usably) cached: forward it, then offer the answer under this
    /// key to [`AnswerCache::insert`].
    Miss(CacheKey),
    /// The query is not cacheable (EDNS options...): forward it, store
    /// nothing.
    Bypass,
}

/// What [`AnswerCache::insert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inserted {
    pub stored: bool,
    /// Entries removed to make room (expired ones included).
    pub evicted: usize,
}

struct Entry {
    bytes: Box<[u8]>,
    /// Offsets of the TTL fields to patch.
    ttl_offsets: Box<[u16]>,
    stored: Instant,
    expires: Instant,
    seq: u64,
    learned: Option<Learned>,
}

/// The cache. Not thread-safe by itself (the shell wraps it in a mutex).
pub struct AnswerCache {
    config: AnswerCacheConfig,
    map: HashMap<CacheKey, Entry>,
    /// (expiry, seq) -> key: the eviction order.
    by_expiry: BTreeMap<(Instant, u64), CacheKey>,
    bytes: usize,
    next_seq: u64,
}

/// What the key of a query needs, read from its bytes.
struct ParsedQuery {
    key: Vec<u8>,
    /// The question's bytes in the query: 12..question_end.
    question_end: usize,
    /// Largest UDP reply the client takes.
    udp_limit: usize,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// The key of a query sent to `server`, or `None` when it is bypassed.
fn parse_query(server: SocketAddr, q: &[u8]) -> Option<ParsedQuery> {
    if q.len() < HEADER_LEN {
        return None;
    }
    let (b2, b3) = (q[2], q[3]);
    // QR=0, opcode QUERY, one question, nothing but an optional OPT after.
    if b2 & 0xf8 != 0
        || be16(q, 4)? != 1
        || be16(q, 6)? != 0
        || be16(q, 8)? != 0
        || be16(q, 10)? > 1
    {
        return None;
    }
    let mut key = Vec::with_capacity(KEY_PREFIX + 64);
    let rd = b2 & 0x01;
    let ad = (b3 >> 5) & 1;
    let cd = (b3 >> 4) & 1;
    key.push(rd | cd << 1 | ad << 2);
    let ip = match server.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    key.extend_from_slice(&ip);
    key.extend_from_slice(&server.port().to_be_bytes());
    // The name: plain labels only (a query has no reason to compress).
    let mut at = HEADER_LEN;
    loop {
        let len = usize::from(*q.get(at)?);
        if len & 0xc0 != 0 {
            return None;
        }
        if at + 1 + len - HEADER_LEN > 255 {
            return None;
        }
        key.push(len as u8);
        key.extend(
            q.get(at + 1..at + 1 + len)?
                .iter()
                .map(u8::to_ascii_lowercase),
        );
        at += 1 + len;
        if len == 0 {
            break;
        }
    }
    let qtype = be16(q, at)?;
    if UNCACHED_TYPES.contains(&qtype) {
        return None;
    }
    key.extend_from_slice(q.get(at..at + 4)?);
    let question_end = at + 4;
    let mut udp_limit = CLASSIC_UDP;
    if be16(q, 10)? == 1 {
        // One OPT: root owner, type 41, class = payload size, TTL =
        // extended RCODE, version, flags; no options.
        let o = question_end;
        if *q.get(o)? != 0 || be16(q, o + 1)? != TYPE_OPT {
            return None;
        }
        let size = usize::from(be16(q, o + 3)?);
        let version = *q.get(o + 6)?;
        let flags = be16(q, o + 7)?;
        let rdlen = be16(q, o + 9)?;
        if version != 0 || rdlen != 0 || q.len() != o + 11 {
            return None;
        }
        let dnssec_ok = u8::from(flags & 0x8000 != 0);
        key[0] |= 1 << 3 | dnssec_ok << 4;
        udp_limit = size.max(CLASSIC_UDP);
    } else if q.len() != question_end {
        return None;
    }
    Some(ParsedQuery {
        key,
        question_end,
        udp_limit,
    })
}

/// What an answer's records tell the cache.
struct ParsedAnswer {
    ttl_offsets: Vec<u16>,
    /// How long it may be kept (before the caps).
    ttl: u32,
    negative: bool,
    /// The authority SOA's TTL field and min(its TTL, its MINIMUM): what a
    /// negative answer says its own TTL is (RFC 2308 section 5).
    soa_ttl: Option<(usize, u32)>,
}

/// Skips a (possibly compressed) name; returns the offset after it.
fn skip_name(b: &[u8], mut at: usize) -> Option<usize> {
    for _ in 0..128 {
        let len = *b.get(at)?;
        match len & 0xc0 {
            0 if len == 0 => return Some(at + 1),
            0 => at += 1 + usize::from(len),
            0xc0 => {
                b.get(at + 1)?;
                return Some(at + 2);
            }
            _ => return None,
        }
    }
    None
}

/// Reads an answer to a question of `question_len` bytes; `None` when it
/// must not be cached.
fn parse_answer(a: &[u8], question_len: usize) -> Option<ParsedAnswer> {
    if a.len() < HEADER_LEN || a.len() > usize::from(u16::MAX) {
        return None;
    }
    // QR=1, opcode QUERY, TC=0.
    if a[2] & 0xfa != 0x80 || be16(a, 4)? != 1 {
        return None;
    }
    let rcode = a[3] & 0x0f;
    let counts = [be16(a, 6)?, be16(a, 8)?, be16(a, 10)?];
    // The question must have the length of the query's: the reply is
    // spliced from the query's question and these bytes after it.
    let mut at = HEADER_LEN + question_len;
    if skip_name(a, HEADER_LEN)? + 4 != at {
        return None;
    }
    let mut ttl_offsets = Vec::new();
    let mut min_ttl = u32::MAX;
    let mut soa_negative: Option<(usize, u32)> = None;
    for (section, &count) in counts.iter().enumerate() {
        for _ in 0..count {
            at = skip_name(a, at)?;
            let rtype = be16(a, at)?;
            let ttl = be32(a, at + 4)?;
            let rdlen = usize::from(be16(a, at + 8)?);
            let rdata = at + 10;
            let end = rdata + rdlen;
            if end > a.len() {
                return None;
            }
            if rtype == TYPE_OPT {
                // Only in the additional section, and no extended RCODE.
                if section != 2 || ttl >> 24 != 0 {
                    return None;
                }
            } else {
                ttl_offsets.push(u16::try_from(at + 4).ok()?);
                min_ttl = min_ttl.min(ttl);
                if section == 1 && rtype == TYPE_SOA && rdlen >= 22 {
                    let minimum = be32(a, end - 4)?;
                    soa_negative = Some((at + 4, ttl.min(minimum)));
                }
            }
            at = end;
        }
    }
    if at != a.len() {
        return None;
    }
    let (ttl, negative) = match rcode {
        RCODE_NOERROR if counts[0] > 0 => (min_ttl, false),
        RCODE_NOERROR | RCODE_NXDOMAIN => (min_ttl.min(soa_negative?.1), true),
        _ => return None,
    };
    if ttl == 0 {
        return None;
    }
    Some(ParsedAnswer {
        ttl_offsets,
        ttl,
        negative,
        soa_ttl: soa_negative.filter(|_| negative),
    })
}

impl AnswerCache {
    pub fn new(config: AnswerCacheConfig) -> Self {
        AnswerCache {
            config,
            map: HashMap::new(),
            by_expiry: BTreeMap::new(),
            bytes: 0,
            next_seq: 0,
        }
    }

    pub fn config(&self) -> &AnswerCacheConfig {
        &self.config
    }

    /// Entries kept (expired ones not yet removed included).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes of answers kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Looks up `query` (the client's message, already allowed by policy)
    /// from `client` to `server` over `transport` at `now`.
    pub fn lookup(
        &mut self,
        server: SocketAddr,
        transport: Transport,
        query: &[u8],
        client: IpAddr,
        now: Instant,
    ) -> Lookup {
        if self.config.entries == 0 {
            return Lookup::Bypass;
        }
        let Some(parsed) = parse_query(server, query) else {
            return Lookup::Bypass;
        };
        let key = CacheKey(parsed.key.into_boxed_slice());
        let Some(entry) = self.map.get(&key) else {
            return Lookup::Miss(key);
        };
        if now >= entry.expires {
            self.remove(&key);
            return Lookup::Miss(key);
        }
        let limit = match transport {
            Transport::Udp => parsed.udp_limit,
            Transport::Tcp => usize::from(u16::MAX),
        };
        if entry.bytes.len() > limit {
            return Lookup::Miss(key);
        }
        let elapsed = u32::try_from(now.saturating_duration_since(entry.stored).as_secs())
            .unwrap_or(u32::MAX);
        let q_end = parsed.question_end;
        let mut reply = Vec::with_capacity(entry.bytes.len());
        reply.extend_from_slice(&query[..2]);
        reply.extend_from_slice(&entry.bytes[2..HEADER_LEN]);
        reply.extend_from_slice(&query[HEADER_LEN..q_end]);
        reply.extend_from_slice(&entry.bytes[q_end..]);
        for &off in entry.ttl_offsets.iter() {
            let off = usize::from(off);
            if let Some(field) = reply.get_mut(off..off + 4) {
                let ttl = u32::from_be_bytes([field[0], field[1], field[2], field[3]]);
                field.copy_from_slice(&ttl.saturating_sub(elapsed).to_be_bytes());
            }
        }
        let learned = entry.learned.as_ref().map(|l| {
            let mut l = l.clone();
            l.client = client;
            for (_, ttl) in &mut l.ips {
                *ttl = ttl.saturating_sub(elapsed);
            }
            l
        });
        Lookup::Hit(Hit { reply, learned })
    }

    /// Offers `answer`, the upstream answer to the query that missed under
    /// `key` (with `learned`, what it taught), at `now`.
    pub fn insert(
        &mut self,
        key: CacheKey,
        answer: &[u8],
        learned: Option<&Learned>,
        now: Instant,
    ) -> Inserted {
        let mut result = Inserted {
            stored: false,
            evicted: 0,
        };
        let cfg = &self.config;
        if cfg.entries == 0 || answer.len() > cfg.max_bytes / 16 {
            return result;
        }
        let Some(parsed) = parse_answer(answer, key.question_len()) else {
            return result;
        };
        let cap = if parsed.negative {
            cfg.max_negative_ttl
        } else {
            cfg.max_ttl
        };
        let keep = Duration::from_secs(u64::from(parsed.ttl)).min(cap);
        if keep.is_zero() {
            return result;
        }
        self.remove(&key);
        while self.map.len() >= self.config.entries
            || self.bytes + answer.len() > self.config.max_bytes
        {
            let Some((_, oldest)) = self.by_expiry.pop_first() else {
                break;
            };
            if let Some(e) = self.map.remove(&oldest) {
                self.bytes -= e.bytes.len();
                result.evicted += 1;
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let expires = now + keep;
        self.by_expiry.insert((expires, seq), key.clone());
        self.bytes += answer.len();
        let mut bytes: Box<[u8]> = answer.into();
        if let Some((at, ttl)) = parsed.soa_ttl {
            if let Some(field) = bytes.get_mut(at..at + 4) {
                field.copy_from_slice(&ttl.to_be_bytes());
            }
        }
        self.map.insert(
            key,
            Entry {
                bytes,
                ttl_offsets: parsed.ttl_offsets.into_boxed_slice(),
                stored: now,
                expires,
                seq,
                learned: learned.cloned(),
            },
        );
        result.stored = true;
        result
    }

    fn remove(&mut self, key: &CacheKey) {
        if let Some(e) = self.map.remove(key) {
            self.by_expiry.remove(&(e.expires, e.seq));
            self.bytes -= e.bytes.len();
        }
    }
}

#[cfg(test)]
#[path = "answers_tests.rs"]
mod tests;
