//! Arbitrary bytes through the proxy's message handling: the client query
//! path (`handle_query`) and the upstream response path
//! (`PendingQuery::accept_response`, CNAME-chain learning). Nothing may
//! panic; replies the proxy builds itself must be valid DNS messages with
//! the query's ID; what is learned is consistent.
//!
//! Input: first byte picks the mode, the rest is the payload.
//! * 0: the payload is a client query (UDP);
//! * 1: the payload is a client query (TCP) to a policy that denies;
//! * 2: the payload is an upstream message for a pending query;
//! * 3: the payload follows a valid header and question of the pending
//!   query (its first six bytes are the answer/authority/additional
//!   counts), so the fuzzer works on the records and the CNAME chain.
//!
//! Modes 2 and 3 also offer the message to an answer cache (`answers.rs`)
//! as the answer to the pending query: whatever it stores must come back,
//! for the same question in other letter case with another ID, as the same
//! number of bytes with that ID and that question's exact bytes.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use meshward_dns_proxy::answers::Lookup;
use meshward_dns_proxy::{
    handle_query, AnswerCache, AnswerCacheConfig, Decision, DenyRcode, PendingQuery, QueryContext, QueryInfo, QueryOutcome,
    ResponseOutcome, Transport, MAX_CHAIN,
};

const ID: u16 = 0x1234;

fn server() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(198, 18, 100, 53), 53))
}

fn ctx(transport: Transport) -> QueryContext {
    QueryContext {
        client: IpAddr::from([198, 19, 1, 2]),
        server: server(),
        transport,
    }
}

fn allow(_: &QueryInfo<'_>) -> Decision {
    Decision::Allow
}

fn deny(_: &QueryInfo<'_>) -> Decision {
    Decision::Deny
}

/// `api.example.test A IN`, RD, id 0x1234.
fn question() -> Vec<u8> {
    b"\x03api\x07example\x04test\x00\x00\x01\x00\x01".to_vec()
}

/// The pending query's bytes.
fn query() -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&ID.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(&question());
    q
}

fn check_cache(answer: &[u8]) {
    let client = ctx(Transport::Udp).client;
    let mut cache = AnswerCache::new(AnswerCacheConfig::with_entries(4));
    let t0 = Instant::now();
    let Lookup::Miss(key) = cache.lookup(server(), Transport::Udp, &query(), client, t0) else {
        panic!("the pending query is cacheable");
    };
    if !cache.insert(key, answer, None, t0).stored {
        return;
    }
    let mut again = query();
    again[..2].copy_from_slice(&[0xab, 0xcd]);
    again[13..16].make_ascii_uppercase();
    match cache.lookup(server(), Transport::Tcp, &again, client, t0) {
        Lookup::Hit(hit) => {
            assert_eq!(hit.reply.len(), answer.len());
            assert_eq!(&hit.reply[..2], &[0xab, 0xcd]);
            assert_eq!(&hit.reply[12..again.len()], &again[12..]);
        }
        other => panic!("a stored answer is a hit at once: {other:?}"),
    }
    // Later: decreased TTLs or a miss, never a panic.
    let _ = cache.lookup(server(), Transport::Udp, &again, client, t0 + Duration::from_secs(7));
}

fn pending() -> &'static PendingQuery {
    static P: OnceLock<PendingQuery> = OnceLock::new();
    P.get_or_init(|| {
        let q = query();
        match handle_query(&allow, DenyRcode::Refused, ctx(Transport::Udp), &q) {
            QueryOutcome::Forward(p) => *p,
            other => panic!("setup: {other:?}"),
        }
    })
}

fn check_query(outcome: QueryOutcome, input: &[u8]) {
    match outcome {
        QueryOutcome::Answer { reply, .. } => {
            let msg = Message::from_vec(&reply).expect("our own reply parses");
            assert_eq!(msg.metadata.id, u16::from_be_bytes([input[0], input[1]]));
        }
        QueryOutcome::Forward(p) => {
            let sf = Message::from_vec(&p.servfail()).expect("our SERVFAIL parses");
            assert_eq!(sf.metadata.id, p.id());
            assert_eq!(sf.queries.len(), 1);
        }
        QueryOutcome::Drop(_) => {}
    }
}

fn check_response(outcome: ResponseOutcome) {
    if let ResponseOutcome::Relay {
        learned: Some(l), ..
    } = outcome
    {
        assert!(!l.ips.is_empty());
        assert_eq!(l.names.first(), Some(&l.qname));
        assert_eq!(l.qname.as_str(), "api.example.test.");
        assert!(l.names.len() <= MAX_CHAIN + 1);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, payload)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => check_query(
            handle_query(&allow, DenyRcode::Refused, ctx(Transport::Udp), payload),
            payload,
        ),
        1 => check_query(
            handle_query(&deny, DenyRcode::NxDomain, ctx(Transport::Tcp), payload),
            payload,
        ),
        2 => {
            check_response(pending().accept_response(server(), payload));
            check_cache(payload);
        }
        _ => {
            let mut msg = Vec::with_capacity(payload.len() + 40);
            msg.extend_from_slice(&ID.to_be_bytes());
            msg.extend_from_slice(&[0x81, 0x80, 0, 1]);
            let counts = payload.get(..6).unwrap_or(&[0, 1, 0, 0, 0, 0]);
            msg.extend_from_slice(counts);
            msg.extend_from_slice(&[0; 6][..6 - counts.len().min(6)]);
            msg.extend_from_slice(&question());
            msg.extend_from_slice(payload.get(6..).unwrap_or(&[]));
            check_response(pending().accept_response(server(), &msg));
            check_cache(&msg);
        }
    }
});
