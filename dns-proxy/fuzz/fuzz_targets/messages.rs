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
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use meshward_dns_proxy::{
    handle_query, Decision, DenyRcode, PendingQuery, QueryContext, QueryInfo, QueryOutcome,
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

fn pending() -> &'static PendingQuery {
    static P: OnceLock<PendingQuery> = OnceLock::new();
    P.get_or_init(|| {
        let mut q = Vec::new();
        q.extend_from_slice(&ID.to_be_bytes());
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        q.extend_from_slice(&question());
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
        2 => check_response(pending().accept_response(server(), payload)),
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
        }
    }
});
