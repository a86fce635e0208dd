//! Unit tests of the sans-IO core and the CNAME-chain learning.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use meshward_policy::{
    DnsAllow, DnsRules, EndpointRules, Fqdn, FqdnSelector, L4Protocol, NodeRules, PodRef,
    PolicyKind, PolicyRef, PortMatch,
};

use super::*;
use crate::learn::MAX_CHAIN;

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 19, 1, 2));

fn server() -> SocketAddr {
    "198.18.100.53:53".parse().unwrap()
}

fn ctx(transport: Transport) -> QueryContext {
    QueryContext {
        client: CLIENT,
        server: server(),
        transport,
    }
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn query(id: u16, qname: &str, qtype: RecordType) -> Message {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name(qname), qtype));
    m
}

fn bytes(m: &Message) -> Vec<u8> {
    m.to_vec().unwrap()
}

fn allow_all(_: &QueryInfo<'_>) -> Decision {
    Decision::Allow
}

fn deny_all(_: &QueryInfo<'_>) -> Decision {
    Decision::Deny
}

/// A response to `q` with these answers.
fn response(q: &Message, answers: Vec<Record>) -> Message {
    let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
    r.metadata.recursion_desired = true;
    r.metadata.recursion_available = true;
    r.add_queries(q.queries.clone());
    r.add_answers(answers);
    r
}

fn a(owner: &str, ttl: u32, ip: [u8; 4]) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(ip))))
}

fn cname(owner: &str, ttl: u32, target: &str) -> Record {
    Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
}

fn forward(q: &Message) -> PendingQuery {
    match handle_query(&allow_all, DenyRcode::Refused, ctx(Transport::Udp), &bytes(q)) {
        QueryOutcome::Forward(p) => p,
        other => panic!("expected Forward, got {other:?}"),
    }
}

fn relay(p: &PendingQuery, resp: &[u8]) -> (Option<Learned>, bool, bool) {
    match p.accept_response(server(), resp) {
        ResponseOutcome::Relay {
            learned,
            truncated,
            unparsed,
        } => (learned, truncated, unparsed),
        other => panic!("expected Relay, got {other:?}"),
    }
}

fn answer(outcome: QueryOutcome) -> (Message, LocalAnswer) {
    match outcome {
        QueryOutcome::Answer { reply, why } => (Message::from_vec(&reply).unwrap(), why),
        other => panic!("expected Answer, got {other:?}"),
    }
}

fn fqdn(s: &str) -> Fqdn {
    Fqdn::parse(s).unwrap()
}

fn ip4(s: &str) -> IpAddr {
    IpAddr::from_str(s).unwrap()
}

#[test]
fn allowed_query_is_forwarded_and_policy_sees_the_query() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let policy = move |q: &QueryInfo<'_>| {
        seen2
            .lock()
            .unwrap()
            .push((q.client, q.server, q.transport, q.name.clone(), q.qtype));
        Decision::Allow
    };
    let q = query(4242, "API.Example.Test.", RecordType::AAAA);
    let QueryOutcome::Forward(p) = handle_query(&policy, DenyRcode::Refused, ctx(Transport::Tcp), &bytes(&q)) else {
        panic!("not forwarded");
    };
    assert_eq!(p.id(), 4242);
    assert_eq!(p.server(), server());
    assert_eq!(p.name(), &fqdn("api.example.test"));
    assert_eq!(p.context().transport, Transport::Tcp);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(CLIENT, server(), Transport::Tcp, fqdn("api.example.test."), 28)]
    );
}

#[test]
fn denied_query_gets_refused_with_id_and_question() {
    let q = query(7, "evil.example.test.", RecordType::A);
    let (r, why) = answer(handle_query(&deny_all, DenyRcode::Refused, ctx(Transport::Udp), &bytes(&q)));
    assert_eq!(why, LocalAnswer::Denied);
    assert_eq!(r.metadata.id, 7);
    assert_eq!(r.metadata.message_type, MessageType::Response);
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert!(r.metadata.recursion_desired);
    assert_eq!(r.queries, q.queries);
    assert!(r.answers.is_empty());
    assert!(r.edns.is_none(), "no OPT when the query had none");
}

#[test]
fn nxdomain_mode() {
    let q = query(8, "evil.example.test.", RecordType::A);
    let (r, why) = answer(handle_query(&deny_all, DenyRcode::NxDomain, ctx(Transport::Udp), &bytes(&q)));
    assert_eq!(why, LocalAnswer::Denied);
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(r.queries, q.queries);
}

#[test]
fn edns0_is_echoed_on_local_answers() {
    let mut q = query(9, "evil.example.test.", RecordType::A);
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    edns.set_dnssec_ok(true);
    q.set_edns(edns);
    let (r, _) = answer(handle_query(&deny_all, DenyRcode::Refused, ctx(Transport::Udp), &bytes(&q)));
    let e = r.edns.expect("OPT echoed");
    assert!(e.flags().dnssec_ok);
    assert_eq!(e.version(), 0);
    assert!(e.max_payload() >= 512);
    // The SERVFAIL of an allowed query carries it too.
    let p = forward(&q);
    let sf = Message::from_vec(&p.servfail()).unwrap();
    assert_eq!(sf.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(sf.metadata.id, 9);
    assert_eq!(sf.queries, q.queries);
    assert!(sf.edns.unwrap().flags().dnssec_ok);
}

#[test]
fn not_exactly_one_question_is_formerr() {
    let mut q = query(10, "a.example.test.", RecordType::A);
    q.add_query(Query::query(name("b.example.test."), RecordType::A));
    let (r, why) = answer(handle_query(&allow_all, DenyRcode::Refused, ctx(Transport::Udp), &bytes(&q)));
    assert_eq!(why, LocalAnswer::FormatError);
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(r.metadata.id, 10);

    let none = Message::new(11, MessageType::Query, OpCode::Query);
    let (r, why) = answer(handle_query(&allow_all, DenyRcode::Refused, ctx(Transport::Udp), &bytes(&none)));
    assert_eq!(why, LocalAnswer::FormatError);
    assert_eq!(r.metadata.id, 11);
}

#[test]
fn malformed_queries_get_formerr_or_are_dropped() {
    let good = bytes(&query(12, "a.example.test.", RecordType::A));
    // Cut inside the question: header readable, FORMERR with the same ID.
    let (r, why) = answer(handle_query(&allow_all, DenyRcode::Refused, ctx(Transport::Udp), &good[..good.len() - 3]));
    assert_eq!(why, LocalAnswer::FormatError);
    assert_eq!(r.metadata.id, 12);
    assert!(r.metadata.recursion_desired);
    assert!(r.queries.is_empty());
    // Shorter than a header: nothing to answer.
    assert!(matches!(
        handle_query(&allow_all, DenyRcode::Refused, ctx(Transport::Udp), &good[..11]),
        QueryOutcome::Drop(DropReason::TooShort)
    ));
    assert!(matches!(
        handle_query(&allow_all, DenyRcode::Refused, ctx(Transport::Udp), &[]),
        QueryOutcome::Drop(DropReason::TooShort)
    ));
    // A response sent to us.
    let resp = bytes(&response(&query(13, "a.example.test.", RecordType::A), vec![]));
    assert!(matches!(
        handle_query(&allow_all, DenyRcode::Refused, ctx(Transport::Udp), &resp),
        QueryOutcome::Drop(DropReason::NotAQuery)
    ));
}

#[test]
fn other_opcodes_get_notimp() {
    let mut q = query(14, "a.example.test.", RecordType::SOA);
    q.metadata.op_code = OpCode::Notify;
    let (r, why) = answer(handle_query(&allow_all, DenyRcode::Refused, ctx(Transport::Udp), &bytes(&q)));
    assert_eq!(why, LocalAnswer::NotImplemented);
    assert_eq!(r.metadata.response_code, ResponseCode::NotImp);
    assert_eq!(r.metadata.op_code, OpCode::Notify);
    assert_eq!(r.metadata.id, 14);
}

#[test]
fn names_outside_the_fqdn_alphabet_are_denied() {
    let mut q = query(15, "x.example.test.", RecordType::A);
    q.queries[0].name = Name::from_labels(vec![b"a b".to_vec(), b"test".to_vec()]).unwrap();
    let (r, why) = answer(handle_query(&allow_all, DenyRcode::Refused, ctx(Transport::Udp), &bytes(&q)));
    assert_eq!(why, LocalAnswer::Denied);
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
}

#[test]
fn root_query_reaches_the_policy_as_root() {
    let policy = |q: &QueryInfo<'_>| {
        if q.name.is_root() {
            Decision::Allow
        } else {
            Decision::Deny
        }
    };
    let q = query(16, ".", RecordType::NS);
    assert!(matches!(
        handle_query(&policy, DenyRcode::Refused, ctx(Transport::Udp), &bytes(&q)),
        QueryOutcome::Forward(_)
    ));
}

#[test]
fn response_must_match_source_id_and_question() {
    let q = query(100, "api.example.test.", RecordType::A);
    let p = forward(&q);
    let good = response(&q, vec![a("api.example.test.", 60, [198, 18, 100, 10])]);

    let other: SocketAddr = "198.18.100.54:53".parse().unwrap();
    assert!(matches!(
        p.accept_response(other, &bytes(&good)),
        ResponseOutcome::Ignore(Mismatch::WrongSource)
    ));
    let port: SocketAddr = "198.18.100.53:5353".parse().unwrap();
    assert!(matches!(
        p.accept_response(port, &bytes(&good)),
        ResponseOutcome::Ignore(Mismatch::WrongSource)
    ));

    let mut wrong_id = good.clone();
    wrong_id.metadata.id = 101;
    assert!(matches!(
        p.accept_response(server(), &bytes(&wrong_id)),
        ResponseOutcome::Ignore(Mismatch::WrongId)
    ));

    let mut wrong_name = good.clone();
    wrong_name.queries[0].name = name("evil.example.test.");
    assert!(matches!(
        p.accept_response(server(), &bytes(&wrong_name)),
        ResponseOutcome::Ignore(Mismatch::WrongQuestion)
    ));
    let mut wrong_type = good.clone();
    wrong_type.queries[0].query_type = RecordType::AAAA;
    assert!(matches!(
        p.accept_response(server(), &bytes(&wrong_type)),
        ResponseOutcome::Ignore(Mismatch::WrongQuestion)
    ));
    let mut wrong_class = good.clone();
    wrong_class.queries[0].query_class = DNSClass::CH;
    assert!(matches!(
        p.accept_response(server(), &bytes(&wrong_class)),
        ResponseOutcome::Ignore(Mismatch::WrongQuestion)
    ));
    let mut no_question = good.clone();
    no_question.queries.clear();
    assert!(matches!(
        p.accept_response(server(), &bytes(&no_question)),
        ResponseOutcome::Ignore(Mismatch::WrongQuestion)
    ));

    let mut not_response = good.clone();
    not_response.metadata.message_type = MessageType::Query;
    assert!(matches!(
        p.accept_response(server(), &bytes(&not_response)),
        ResponseOutcome::Ignore(Mismatch::NotAResponse)
    ));
    assert!(matches!(
        p.accept_response(server(), &bytes(&good)[..8]),
        ResponseOutcome::Ignore(Mismatch::TooShort)
    ));

    // 0x20 case randomisation by the server is fine.
    let mut mixed = good.clone();
    mixed.queries[0].name = name("aPi.ExAmPlE.tEsT.");
    let (learned, truncated, unparsed) = relay(&p, &bytes(&mixed));
    assert!(!truncated && !unparsed);
    let learned = learned.expect("learned");
    assert_eq!(learned.ips, vec![(ip4("198.18.100.10"), 60)]);

    let (learned, _, _) = relay(&p, &bytes(&good));
    let learned = learned.unwrap();
    assert_eq!(learned.client, CLIENT);
    assert_eq!(learned.qname, fqdn("api.example.test"));
    assert_eq!(learned.names, vec![fqdn("api.example.test")]);
}

#[test]
fn cname_chain_out_of_order_with_min_ttl() {
    let q = query(200, "www.example.test.", RecordType::A);
    let p = forward(&q);
    let r = response(
        &q,
        vec![
            a("edge.cdn.test.", 300, [198, 18, 100, 21]),
            cname("alias.cdn.test.", 30, "edge.cdn.test."),
            a("unrelated.test.", 300, [198, 18, 100, 99]),
            cname("www.example.test.", 120, "alias.cdn.test."),
            a("edge.cdn.test.", 10, [198, 18, 100, 22]),
            a("EDGE.cdn.test.", 300, [198, 18, 100, 21]),
        ],
    );
    let (learned, _, _) = relay(&p, &bytes(&r));
    let l = learned.unwrap();
    assert_eq!(
        l.names,
        vec![fqdn("www.example.test"), fqdn("alias.cdn.test"), fqdn("edge.cdn.test")]
    );
    // 21: min(300, 120, 30) = 30; 22: its own 10.
    assert_eq!(
        l.ips,
        vec![(ip4("198.18.100.21"), 30), (ip4("198.18.100.22"), 10)]
    );
}

#[test]
fn addresses_owned_midway_along_the_chain_count() {
    let q = query(201, "a.test.", RecordType::A);
    let p = forward(&q);
    let r = response(
        &q,
        vec![
            cname("a.test.", 50, "b.test."),
            a("a.test.", 40, [198, 18, 1, 1]),
            a("b.test.", 100, [198, 18, 1, 2]),
        ],
    );
    let l = relay(&p, &bytes(&r)).0.unwrap();
    assert_eq!(l.ips, vec![(ip4("198.18.1.1"), 40), (ip4("198.18.1.2"), 50)]);
}

#[test]
fn cname_loops_and_long_chains_are_bounded() {
    let q = query(202, "a.test.", RecordType::A);
    let p = forward(&q);
    let r = response(
        &q,
        vec![
            cname("a.test.", 60, "b.test."),
            cname("b.test.", 60, "A.test."),
            a("b.test.", 60, [198, 18, 1, 3]),
        ],
    );
    let l = relay(&p, &bytes(&r)).0.unwrap();
    assert_eq!(l.names, vec![fqdn("a.test"), fqdn("b.test")]);
    assert_eq!(l.ips, vec![(ip4("198.18.1.3"), 60)]);

    // c0 -> c1 -> ... -> c40 with the address at the end: beyond the bound.
    let q = query(203, "c0.test.", RecordType::A);
    let p = forward(&q);
    let mut answers: Vec<Record> = (0..40)
        .map(|i| cname(&format!("c{i}.test."), 60, &format!("c{}.test.", i + 1)))
        .collect();
    answers.push(a("c40.test.", 60, [198, 18, 1, 4]));
    answers.push(a(&format!("c{MAX_CHAIN}.test."), 60, [198, 18, 1, 5]));
    let l = relay(&p, &bytes(&response(&q, answers))).0.unwrap();
    assert_eq!(l.names.len(), MAX_CHAIN + 1);
    assert_eq!(l.ips, vec![(ip4("198.18.1.5"), 60)]);
}

#[test]
fn aaaa_and_classes() {
    let q = query(204, "v6.test.", RecordType::AAAA);
    let p = forward(&q);
    let mut ch = a("v6.test.", 60, [198, 18, 1, 6]);
    ch.dns_class = DNSClass::CH;
    let r = response(
        &q,
        vec![
            Record::from_rdata(name("v6.test."), 77, RData::AAAA(AAAA(Ipv6Addr::from_str("2001:db8::1").unwrap()))),
            ch,
            Record::from_rdata(name("v6.test."), 77, RData::TXT(TXT::new(vec!["x".into()]))),
        ],
    );
    let l = relay(&p, &bytes(&r)).0.unwrap();
    assert_eq!(l.ips, vec![(IpAddr::from_str("2001:db8::1").unwrap(), 77)]);
}

#[test]
fn nothing_learned_from_errors_or_empty_answers() {
    let q = query(205, "gone.test.", RecordType::A);
    let p = forward(&q);
    let mut r = response(&q, vec![a("gone.test.", 60, [198, 18, 1, 7])]);
    r.metadata.response_code = ResponseCode::NXDomain;
    let (learned, truncated, unparsed) = relay(&p, &bytes(&r));
    assert!(learned.is_none() && !truncated && !unparsed);
    let (learned, ..) = relay(&p, &bytes(&response(&q, vec![])));
    assert!(learned.is_none());
    let (learned, ..) = relay(&p, &bytes(&response(&q, vec![cname("gone.test.", 5, "x.test.")])));
    assert!(learned.is_none());
}

#[test]
fn truncated_answers_are_relayed_without_learning() {
    let q = query(206, "many.test.", RecordType::A);
    let p = forward(&q);
    let mut r = response(&q, vec![a("many.test.", 60, [198, 18, 1, 8])]);
    r.metadata.truncation = true;
    let full = bytes(&r);
    let (learned, truncated, _) = relay(&p, &full);
    assert!(truncated && learned.is_none());
    // Cut in the middle of a record (a server that truncates badly).
    let (learned, truncated, _) = relay(&p, &full[..full.len() - 2]);
    assert!(truncated && learned.is_none());
}

#[test]
fn unparsable_records_after_a_matching_question_are_relayed_unlearned() {
    let q = query(207, "odd.test.", RecordType::A);
    let p = forward(&q);
    let r = bytes(&response(&q, vec![a("odd.test.", 60, [198, 18, 1, 9])]));
    // Claim one more answer than there is.
    let mut bad = r.clone();
    bad[7] += 1;
    let (learned, truncated, unparsed) = relay(&p, &bad);
    assert!(learned.is_none() && !truncated && unparsed);
}

/// Hand-written wire message: question `api.example.test A`, answers
/// `api CNAME edge.example.test` and `edge A 198.18.100.10`, every later
/// name compressed against earlier ones.
fn compressed_response(id: u16) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0]);
    // Question at offset 12: 3api 7example 4test 0
    m.extend_from_slice(b"\x03api\x07example\x04test\x00\x00\x01\x00\x01");
    // Answer 1: owner = pointer to 12; CNAME; rdata = 4edge + pointer to "example" (offset 16).
    m.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 50, 0, 7]);
    let edge_at = m.len();
    m.extend_from_slice(b"\x04edge\xc0\x10");
    // Answer 2: owner = pointer to "edge..." in the rdata above.
    m.extend_from_slice(&[0xc0, edge_at as u8, 0, 1, 0, 1, 0, 0, 0, 90, 0, 4, 198, 18, 100, 10]);
    m
}

#[test]
fn compressed_names_are_followed() {
    let q = query(300, "api.example.test.", RecordType::A);
    let p = forward(&q);
    let l = relay(&p, &compressed_response(300)).0.unwrap();
    assert_eq!(l.names, vec![fqdn("api.example.test"), fqdn("edge.example.test")]);
    assert_eq!(l.ips, vec![(ip4("198.18.100.10"), 50)]);
}

#[test]
fn compression_loops_never_hang() {
    let q = query(301, "api.example.test.", RecordType::A);
    let p = forward(&q);
    let mut m = compressed_response(301);
    // Make the CNAME target's pointer point at itself.
    let len = m.len();
    let self_ptr = len - 16 - 2;
    m[self_ptr] = 0xc0;
    m[self_ptr + 1] = self_ptr as u8;
    match p.accept_response(server(), &m) {
        ResponseOutcome::Relay { learned, .. } => assert!(learned.is_none()),
        ResponseOutcome::Ignore(_) => {}
    }
    // A question name that points at itself.
    let mut q2 = Vec::from(&m[..12]);
    q2[2] = 0x01;
    q2.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    let (_, why) = answer(handle_query(&allow_all, DenyRcode::Refused, ctx(Transport::Udp), &q2));
    assert_eq!(why, LocalAnswer::FormatError);
}

fn policy_ref() -> PolicyRef {
    PolicyRef {
        kind: PolicyKind::MeshNetworkPolicy,
        namespace: "default".into(),
        name: "dns".into(),
    }
}

#[test]
fn node_rules_as_policy() {
    let pod = PodRef {
        namespace: "default".into(),
        name: "client".into(),
    };
    let rules = DnsRules {
        allow: vec![DnsAllow {
            servers: vec!["198.18.100.53/32".parse().unwrap()],
            ports: vec![
                PortMatch::single(L4Protocol::Udp, 53),
                PortMatch::single(L4Protocol::Tcp, 53),
            ],
            names: Some(vec![FqdnSelector::match_pattern("*.example.test").unwrap()]),
            policy: policy_ref(),
        }],
    };
    let mut node = NodeRules::default();
    node.endpoints.insert(
        pod.clone(),
        EndpointRules {
            pod: pod.clone(),
            ips: vec![CLIENT],
            egress: None,
            ingress: None,
            dns: Some(Arc::new(rules)),
        },
    );
    let unrestricted = PodRef {
        namespace: "default".into(),
        name: "free".into(),
    };
    node.endpoints.insert(
        unrestricted.clone(),
        EndpointRules {
            pod: unrestricted,
            ips: vec![ip4("198.19.1.3")],
            egress: None,
            ingress: None,
            dns: None,
        },
    );
    let check = |client: IpAddr, server: &str, transport, n: &str| {
        let name = fqdn(n);
        node.check(&QueryInfo {
            client,
            server: server.parse().unwrap(),
            transport,
            name: &name,
            qtype: 1,
        })
    };
    assert_eq!(check(CLIENT, "198.18.100.53:53", Transport::Udp, "api.example.test"), Decision::Allow);
    assert_eq!(check(CLIENT, "198.18.100.53:53", Transport::Tcp, "api.example.test"), Decision::Allow);
    assert_eq!(check(CLIENT, "198.18.100.53:53", Transport::Udp, "example.test"), Decision::Deny);
    assert_eq!(check(CLIENT, "198.18.100.54:53", Transport::Udp, "api.example.test"), Decision::Deny);
    assert_eq!(check(CLIENT, "198.18.100.53:5353", Transport::Udp, "api.example.test"), Decision::Deny);
    assert_eq!(check(ip4("198.19.1.3"), "198.18.100.53:53", Transport::Udp, "x.other.test"), Decision::Allow);
    assert_eq!(check(ip4("198.19.1.99"), "198.18.100.53:53", Transport::Udp, "api.example.test"), Decision::Deny);
}
