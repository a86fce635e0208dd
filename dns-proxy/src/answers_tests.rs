//! Unit tests of the answer cache.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::*;
use crate::core::Transport;

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 19, 1, 2));
const OTHER_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 19, 1, 3));

fn server() -> SocketAddr {
    "198.18.100.53:53".parse().unwrap()
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

fn with_edns(mut m: Message, dnssec_ok: bool, size: u16) -> Message {
    let mut edns = Edns::new();
    edns.set_max_payload(size);
    edns.set_dnssec_ok(dnssec_ok);
    m.set_edns(edns);
    m
}

fn bytes(m: &Message) -> Vec<u8> {
    m.to_vec().unwrap()
}

fn response(q: &Message, rcode: ResponseCode, answers: Vec<Record>) -> Message {
    let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.metadata.response_code = rcode;
    r.add_queries(q.queries.clone());
    r.add_answers(answers);
    r
}

fn a(owner: &str, ttl: u32, ip: [u8; 4]) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(ip))))
}

fn soa(zone: &str, ttl: u32, minimum: u32) -> Record {
    Record::from_rdata(
        name(zone),
        ttl,
        RData::SOA(SOA::new(
            name(&format!("ns.{zone}")),
            name(&format!("admin.{zone}")),
            1,
            3600,
            600,
            86400,
            minimum,
        )),
    )
}

fn learned(ips: &[([u8; 4], u32)]) -> Learned {
    Learned {
        client: CLIENT,
        qname: meshward_policy::Fqdn::parse("www.example.test").unwrap(),
        names: vec![],
        ips: ips
            .iter()
            .map(|(ip, ttl)| (IpAddr::V4(Ipv4Addr::from(*ip)), *ttl))
            .collect(),
    }
}

fn cache() -> AnswerCache {
    AnswerCache::new(AnswerCacheConfig::with_entries(100))
}

fn miss(c: &mut AnswerCache, q: &[u8], now: Instant) -> CacheKey {
    match c.lookup(server(), Transport::Udp, q, CLIENT, now) {
        Lookup::Miss(k) => k,
        other => panic!("expected a miss, got {other:?}"),
    }
}

fn hit(c: &mut AnswerCache, q: &[u8], now: Instant) -> Hit {
    match c.lookup(server(), Transport::Udp, q, CLIENT, now) {
        Lookup::Hit(h) => h,
        other => panic!("expected a hit, got {other:?}"),
    }
}

/// Stores the answer to `q` (a miss first), asserting it was kept.
fn store(c: &mut AnswerCache, q: &Message, r: &Message, now: Instant) {
    let key = miss(c, &bytes(q), now);
    assert!(c.insert(key, &bytes(r), None, now).stored);
}

fn ttls(reply: &[u8]) -> Vec<u32> {
    let m = Message::from_vec(reply).unwrap();
    m.answers
        .iter()
        .chain(&m.authorities)
        .chain(&m.additionals)
        .map(|r| r.ttl)
        .collect()
}

#[test]
fn hit_has_query_id_and_decreased_ttls_then_expires() {
    let mut c = cache();
    let t0 = Instant::now();
    let q = query(1, "www.example.test.", RecordType::A);
    let r = response(
        &q,
        ResponseCode::NoError,
        vec![
            a("www.example.test.", 30, [198, 18, 0, 1]),
            a("www.example.test.", 100, [198, 18, 0, 2]),
        ],
    );
    let key = miss(&mut c, &bytes(&q), t0);
    let ins = c.insert(
        key,
        &bytes(&r),
        Some(&learned(&[([198, 18, 0, 1], 30)])),
        t0,
    );
    assert_eq!(
        ins,
        Inserted {
            stored: true,
            evicted: 0
        }
    );
    assert_eq!(c.len(), 1);

    let q2 = query(0xbeef, "www.example.test.", RecordType::A);
    let h = hit(&mut c, &bytes(&q2), t0 + Duration::from_millis(10_500));
    let m = Message::from_vec(&h.reply).unwrap();
    assert_eq!(m.metadata.id, 0xbeef);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.recursion_available);
    assert_eq!(ttls(&h.reply), vec![20, 90]);
    // Apart from ID and TTLs, the stored bytes.
    let mut expect = bytes(&r);
    expect[..2].copy_from_slice(&h.reply[..2]);
    let original = Message::from_vec(&expect).unwrap();
    assert_eq!(m.answers.len(), original.answers.len());
    let l = h.learned.unwrap();
    assert_eq!(l.client, CLIENT);
    assert_eq!(l.ips, vec![(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), 20)]);

    // The other client gets the addresses attributed to itself.
    match c.lookup(server(), Transport::Udp, &bytes(&q2), OTHER_CLIENT, t0) {
        Lookup::Hit(h) => assert_eq!(h.learned.unwrap().client, OTHER_CLIENT),
        other => panic!("{other:?}"),
    }

    // 29.9 s: one second left on the smallest TTL.
    let h = hit(&mut c, &bytes(&q2), t0 + Duration::from_millis(29_900));
    assert_eq!(ttls(&h.reply), vec![1, 71]);
    // 30 s: expired, a miss, and removed.
    miss(&mut c, &bytes(&q2), t0 + Duration::from_secs(30));
    assert_eq!(c.len(), 0);
    assert_eq!(c.bytes(), 0);
}

#[test]
fn question_case_is_echoed_and_lookup_ignores_case() {
    let mut c = cache();
    let t0 = Instant::now();
    let q = query(1, "WwW.ExAmPle.TEST.", RecordType::A);
    let r = response(
        &q,
        ResponseCode::NoError,
        vec![a("www.example.test.", 60, [198, 18, 0, 1])],
    );
    store(&mut c, &q, &r, t0);
    let q2 = query(2, "www.EXAMPLE.test.", RecordType::A);
    let q2b = bytes(&q2);
    let h = hit(&mut c, &q2b, t0);
    // The question's bytes are the query's, exactly.
    assert_eq!(&h.reply[12..q2b.len()], &q2b[12..]);
    let m = Message::from_vec(&h.reply).unwrap();
    assert_eq!(m.queries[0].name().to_ascii(), "www.EXAMPLE.test.");
    assert_eq!(m.answers.len(), 1);
}

#[test]
fn key_separates_server_type_class_and_flags() {
    let mut c = cache();
    let t0 = Instant::now();
    let q = query(1, "www.example.test.", RecordType::A);
    let r = response(
        &q,
        ResponseCode::NoError,
        vec![a("www.example.test.", 60, [198, 18, 0, 1])],
    );
    store(&mut c, &q, &r, t0);
    hit(&mut c, &bytes(&q), t0);

    // Another server (address or port).
    for other in ["198.18.100.54:53", "198.18.100.53:5353"] {
        let other: SocketAddr = other.parse().unwrap();
        assert!(matches!(
            c.lookup(other, Transport::Udp, &bytes(&q), CLIENT, t0),
            Lookup::Miss(_)
        ));
    }
    // Another type.
    miss(
        &mut c,
        &bytes(&query(1, "www.example.test.", RecordType::AAAA)),
        t0,
    );
    // Another class.
    let mut chaos = query(1, "www.example.test.", RecordType::A);
    chaos.queries[0].set_query_class(hickory_proto::rr::DNSClass::CH);
    miss(&mut c, &bytes(&chaos), t0);
    // RD clear.
    let mut no_rd = query(1, "www.example.test.", RecordType::A);
    no_rd.metadata.recursion_desired = false;
    miss(&mut c, &bytes(&no_rd), t0);
    // CD set.
    let mut cd = query(1, "www.example.test.", RecordType::A);
    cd.metadata.checking_disabled = true;
    miss(&mut c, &bytes(&cd), t0);
    // AD set.
    let mut ad = query(1, "www.example.test.", RecordType::A);
    ad.metadata.authentic_data = true;
    miss(&mut c, &bytes(&ad), t0);
    // EDNS present, and with DO.
    let edns = with_edns(query(1, "www.example.test.", RecordType::A), false, 1232);
    miss(&mut c, &bytes(&edns), t0);
    let edns_do = with_edns(query(1, "www.example.test.", RecordType::A), true, 1232);
    miss(&mut c, &bytes(&edns_do), t0);
    // Each is its own entry: the EDNS answer does not serve DO queries.
    let r_edns = with_edns(
        response(
            &edns,
            ResponseCode::NoError,
            vec![a("www.example.test.", 60, [198, 18, 0, 9])],
        ),
        false,
        1232,
    );
    store(&mut c, &edns, &r_edns, t0);
    hit(&mut c, &bytes(&edns), t0);
    miss(&mut c, &bytes(&edns_do), t0);
    // The plain entry is still there, unchanged.
    let h = hit(&mut c, &bytes(&q), t0);
    assert!(Message::from_vec(&h.reply).unwrap().edns.is_none());
}

#[test]
fn nxdomain_and_nodata_are_cached_for_the_soa_negative_ttl() {
    let mut c = cache();
    let t0 = Instant::now();
    // NXDOMAIN: SOA TTL 900, MINIMUM 60 -> 60 s.
    let q = query(1, "nope.example.test.", RecordType::A);
    let mut r = response(&q, ResponseCode::NXDomain, vec![]);
    r.add_authority(soa("example.test.", 900, 60));
    store(&mut c, &q, &r, t0);
    let h = hit(&mut c, &bytes(&q), t0 + Duration::from_secs(10));
    let m = Message::from_vec(&h.reply).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // RFC 2308 section 5: served with min(SOA TTL, MINIMUM), counting down
    assert_eq!(ttls(&h.reply), vec![50], "the SOA's TTL is decreased too");
    assert!(h.learned.is_none());
    miss(&mut c, &bytes(&q), t0 + Duration::from_secs(60));

    // NODATA: SOA TTL 20, MINIMUM 300 -> 20 s.
    let q = query(2, "www.example.test.", RecordType::AAAA);
    let mut r = response(&q, ResponseCode::NoError, vec![]);
    r.add_authority(soa("example.test.", 20, 300));
    store(&mut c, &q, &r, t0);
    hit(&mut c, &bytes(&q), t0 + Duration::from_secs(19));
    miss(&mut c, &bytes(&q), t0 + Duration::from_secs(20));

    // Capped by max_negative_ttl (5 min).
    let q = query(3, "gone.example.test.", RecordType::A);
    let mut r = response(&q, ResponseCode::NXDomain, vec![]);
    r.add_authority(soa("example.test.", 86_400, 86_400));
    store(&mut c, &q, &r, t0);
    hit(&mut c, &bytes(&q), t0 + Duration::from_secs(299));
    miss(&mut c, &bytes(&q), t0 + Duration::from_secs(300));

    // Without an SOA: not cached.
    let q = query(4, "bare.example.test.", RecordType::A);
    let r = response(&q, ResponseCode::NXDomain, vec![]);
    let key = miss(&mut c, &bytes(&q), t0);
    assert!(!c.insert(key, &bytes(&r), None, t0).stored);
}

#[test]
fn positive_ttl_is_capped() {
    let mut c = cache();
    let t0 = Instant::now();
    let q = query(1, "long.example.test.", RecordType::A);
    let r = response(
        &q,
        ResponseCode::NoError,
        vec![a("long.example.test.", 86_400, [198, 18, 0, 1])],
    );
    store(&mut c, &q, &r, t0);
    let h = hit(&mut c, &bytes(&q), t0 + Duration::from_secs(3599));
    assert_eq!(ttls(&h.reply), vec![86_400 - 3599]);
    miss(&mut c, &bytes(&q), t0 + Duration::from_secs(3600));
}

#[test]
fn not_cached_tc_errors_ttl0_and_edns_options() {
    let mut c = cache();
    let t0 = Instant::now();
    let q = query(1, "www.example.test.", RecordType::A);
    let ok = response(
        &q,
        ResponseCode::NoError,
        vec![a("www.example.test.", 60, [198, 18, 0, 1])],
    );
    let mut tc = ok.clone();
    tc.metadata.truncation = true;
    let zero = response(
        &q,
        ResponseCode::NoError,
        vec![a("www.example.test.", 0, [198, 18, 0, 1])],
    );
    for r in [
        tc,
        zero,
        response(&q, ResponseCode::ServFail, vec![]),
        response(&q, ResponseCode::Refused, vec![]),
        response(&q, ResponseCode::FormErr, vec![]),
        response(&q, ResponseCode::NotImp, vec![]),
    ] {
        let key = miss(&mut c, &bytes(&q), t0);
        assert!(
            !c.insert(key, &bytes(&r), None, t0).stored,
            "{:?}",
            r.metadata
        );
    }
    // A SERVFAIL with an SOA is not negative caching material either.
    let mut sf = response(&q, ResponseCode::ServFail, vec![]);
    sf.add_authority(soa("example.test.", 60, 60));
    let key = miss(&mut c, &bytes(&q), t0);
    assert!(!c.insert(key, &bytes(&sf), None, t0).stored);
    // Trailing garbage after the records.
    let mut junk = bytes(&ok);
    junk.push(0);
    let key = miss(&mut c, &bytes(&q), t0);
    assert!(!c.insert(key, &junk, None, t0).stored);
    // An answer whose question is not as long as the query's.
    let other = response(
        &query(1, "w.example.test.", RecordType::A),
        ResponseCode::NoError,
        vec![a("w.example.test.", 60, [198, 18, 0, 1])],
    );
    let key = miss(&mut c, &bytes(&q), t0);
    assert!(!c.insert(key, &bytes(&other), None, t0).stored);
    assert!(c.is_empty());

    // A query with an EDNS option (a cookie): bypassed, both ways.
    let mut cookie = bytes(&with_edns(
        query(1, "www.example.test.", RecordType::A),
        false,
        1232,
    ));
    let n = cookie.len();
    cookie[n - 2..].copy_from_slice(&12u16.to_be_bytes());
    cookie.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert!(Message::from_vec(&cookie).is_ok());
    assert!(matches!(
        c.lookup(server(), Transport::Udp, &cookie, CLIENT, t0),
        Lookup::Bypass
    ));
    // Even with the plain EDNS query's answer stored.
    let plain = with_edns(query(1, "www.example.test.", RecordType::A), false, 1232);
    let r = with_edns(
        response(
            &plain,
            ResponseCode::NoError,
            vec![a("www.example.test.", 60, [198, 18, 0, 1])],
        ),
        false,
        1232,
    );
    store(&mut c, &plain, &r, t0);
    assert!(matches!(
        c.lookup(server(), Transport::Udp, &cookie, CLIENT, t0),
        Lookup::Bypass
    ));
    // ANY is not cached; neither is a cache of size 0.
    assert!(matches!(
        c.lookup(
            server(),
            Transport::Udp,
            &bytes(&query(1, "www.example.test.", RecordType::ANY)),
            CLIENT,
            t0
        ),
        Lookup::Bypass
    ));
    let mut off = AnswerCache::new(AnswerCacheConfig::default());
    assert!(matches!(
        off.lookup(server(), Transport::Udp, &bytes(&q), CLIENT, t0),
        Lookup::Bypass
    ));
}

fn big_txt_answer(q: &Message, chunks: usize) -> Message {
    let txt: Vec<String> = (0..chunks).map(|i| format!("{i:0>200}")).collect();
    response(
        q,
        ResponseCode::NoError,
        vec![Record::from_rdata(
            q.queries[0].name().clone(),
            60,
            RData::TXT(TXT::new(txt)),
        )],
    )
}

#[test]
fn answers_larger_than_the_client_takes_are_misses() {
    let mut c = cache();
    let t0 = Instant::now();
    let q = with_edns(query(1, "big.example.test.", RecordType::TXT), false, 4096);
    let r = with_edns(big_txt_answer(&q, 5), false, 4096);
    assert!(bytes(&r).len() > 1000);
    store(&mut c, &q, &r, t0);
    hit(&mut c, &bytes(&q), t0);
    // The same question, advertising 512 and 800: too small.
    for size in [512, 800] {
        let small = with_edns(query(2, "big.example.test.", RecordType::TXT), false, size);
        miss(&mut c, &bytes(&small), t0);
    }
    // Over TCP it fits.
    let small = with_edns(query(2, "big.example.test.", RecordType::TXT), false, 512);
    assert!(matches!(
        c.lookup(server(), Transport::Tcp, &bytes(&small), CLIENT, t0),
        Lookup::Hit(_)
    ));
    // Without EDNS: 512 at most.
    let plain = query(3, "big.example.test.", RecordType::TXT);
    let r = big_txt_answer(&plain, 3);
    assert!(bytes(&r).len() > 512);
    store(&mut c, &plain, &r, t0);
    miss(&mut c, &bytes(&plain), t0);
}

#[test]
fn full_cache_evicts_what_expires_first() {
    let mut c = AnswerCache::new(AnswerCacheConfig::with_entries(3));
    let t0 = Instant::now();
    let q = |i: u16| query(i, &format!("n{i}.example.test."), RecordType::A);
    let r = |i: u16, ttl: u32| {
        response(
            &q(i),
            ResponseCode::NoError,
            vec![a(
                &format!("n{i}.example.test."),
                ttl,
                [198, 18, 0, i as u8],
            )],
        )
    };
    store(&mut c, &q(1), &r(1, 300), t0);
    store(&mut c, &q(2), &r(2, 100), t0);
    store(&mut c, &q(3), &r(3, 200), t0);
    assert_eq!(c.len(), 3);
    let key = miss(&mut c, &bytes(&q(4)), t0);
    assert_eq!(
        c.insert(key, &bytes(&r(4, 400)), None, t0),
        Inserted {
            stored: true,
            evicted: 1
        }
    );
    assert_eq!(c.len(), 3);
    miss(&mut c, &bytes(&q(2)), t0);
    for i in [1, 3, 4] {
        hit(&mut c, &bytes(&q(i)), t0);
    }
    // Replacing an entry does not evict another.
    let key = miss(&mut c, &bytes(&q(1)), t0 + Duration::from_secs(300));
    let ins = c.insert(key, &bytes(&r(1, 50)), None, t0 + Duration::from_secs(300));
    assert_eq!(
        ins,
        Inserted {
            stored: true,
            evicted: 0
        }
    );
    assert_eq!(c.len(), 3);

    // Bounded by bytes too.
    let one = bytes(&r(10, 60)).len();
    let mut cfg = AnswerCacheConfig::with_entries(100);
    cfg.max_bytes = one * 16 * 2 + 1;
    let mut c = AnswerCache::new(cfg);
    let mut evicted = 0;
    for i in 10..50 {
        let key = miss(&mut c, &bytes(&q(i)), t0);
        let ins = c.insert(key, &bytes(&r(i, 60)), None, t0);
        assert!(ins.stored);
        evicted += ins.evicted;
        assert!(c.bytes() <= one * 32 + 1);
    }
    assert_eq!(c.len(), 32);
    assert_eq!(evicted, 8);
    // And larger answers than a sixteenth of the budget are not kept.
    let mut cfg = AnswerCacheConfig::with_entries(100);
    cfg.max_bytes = 16 * 100;
    let mut c = AnswerCache::new(cfg);
    let key = miss(&mut c, &bytes(&q(1)), t0);
    let big = big_txt_answer(&q(1), 2);
    assert!(!c.insert(key, &bytes(&big), None, t0).stored);
}

#[test]
fn garbage_never_panics() {
    let mut c = cache();
    let t0 = Instant::now();
    let q = bytes(&query(1, "www.example.test.", RecordType::A));
    let r = bytes(&response(
        &query(1, "www.example.test.", RecordType::A),
        ResponseCode::NoError,
        vec![a("www.example.test.", 60, [198, 18, 0, 1])],
    ));
    for cut in 0..q.len() {
        let _ = c.lookup(server(), Transport::Udp, &q[..cut], CLIENT, t0);
    }
    for cut in 0..r.len() {
        let key = miss(&mut c, &q, t0);
        assert!(!c.insert(key, &r[..cut], None, t0).stored);
    }
    // Flipped bytes: whatever is stored must serve without panicking.
    for i in 12..r.len() {
        let mut bad = r.clone();
        bad[i] ^= 0xff;
        let key = miss(&mut c, &q, t0);
        let _ = c.insert(key, &bad, None, t0);
        let _ = c.lookup(
            server(),
            Transport::Udp,
            &q,
            CLIENT,
            t0 + Duration::from_secs(1),
        );
        c = cache();
    }
}
