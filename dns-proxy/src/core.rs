//! The proxy's message handling, sans-IO: what to do with a client's query
//! and whether an upstream message answers a pending one.
//!
//! # Decisions
//!
//! - A client message shorter than a DNS header, or one with QR=1 (a
//!   response sent to us), is dropped: there is nothing to answer, and
//!   answering responses invites loops.
//! - An opcode other than QUERY gets NOTIMP (header only): the proxy checks
//!   names of queries; NOTIFY/UPDATE/STATUS have no name a policy speaks of.
//! - A message that does not parse gets FORMERR built from its header (same
//!   ID, opcode, RD; no question, since it could not be read).
//! - QDCOUNT other than one gets FORMERR. RFC 9619 makes QDCOUNT=1 the rule
//!   for QUERY and FORMERR the answer to anything else; no server we forward
//!   to would answer several questions anyway.
//! - A question name that is not a valid [`Fqdn`] (bytes outside
//!   `[-a-zA-Z0-9_]`) matches no selector, as in Cilium: it is denied.
//! - Denied queries get REFUSED (or NXDOMAIN, [`DenyRcode`]) with the same
//!   ID, opcode, RD and CD, the question echoed, RA set, and an OPT record
//!   when the query had one (our payload size, the client's DO bit, no
//!   options).
//! - Allowed queries are forwarded byte for byte; the upstream answer is
//!   accepted only from the original server, with the query's ID, QR=1,
//!   opcode QUERY and the same question (name compared case-insensitively,
//!   type and class exactly). Anything else is ignored and counted, and
//!   the proxy keeps waiting until its timeout ([`PendingQuery::servfail`]).
//! - A matching answer is relayed as received. A truncated one (TC) is not
//!   parsed further: the client retries over TCP and we learn from that
//!   answer. A matching answer whose records do not parse is relayed too but
//!   teaches nothing (its addresses stay blocked: fails closed).

use std::net::{IpAddr, SocketAddr};

use hickory_proto::op::{
    Edns, Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_proto::rr::{Name, Record};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, DecodeError};
use meshward_policy::{DnsRules, DnsVerdict, Fqdn, NodeRules};

use crate::learn::{learn_from, Learned};

/// Size of a DNS header.
const HEADER_LEN: usize = 12;
/// UDP payload size we advertise in OPT records we build (the DNS flag day
/// 2020 value).
const OUR_EDNS_PAYLOAD: u16 = 1232;

/// How the client reached its server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    /// IP protocol number (17 or 6), as policy rules speak of it.
    pub fn protocol(self) -> u8 {
        match self {
            Transport::Udp => 17,
            Transport::Tcp => 6,
        }
    }
}

/// Where a query comes from and where the client sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueryContext {
    pub client: IpAddr,
    /// The original destination (the server the client asked).
    pub server: SocketAddr,
    pub transport: Transport,
}

/// What a policy is asked about one query.
#[derive(Clone, Copy, Debug)]
pub struct QueryInfo<'a> {
    pub client: IpAddr,
    pub server: SocketAddr,
    pub transport: Transport,
    pub name: &'a Fqdn,
    /// The question's RR type (1 = A, 28 = AAAA, ...).
    pub qtype: u16,
}

/// A policy's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
}

/// Decides which queries may go out. Called on the receive path: keep it
/// quick and non-blocking (look up a snapshot, no I/O).
pub trait DnsPolicy: Send + Sync + 'static {
    fn check(&self, query: &QueryInfo<'_>) -> Decision;
}

impl<F> DnsPolicy for F
where
    F: Fn(&QueryInfo<'_>) -> Decision + Send + Sync + 'static,
{
    fn check(&self, query: &QueryInfo<'_>) -> Decision {
        self(query)
    }
}

/// The compiled rules of the node: the client is looked up by address.
/// A client whose endpoint has DNS rules is checked against them; an
/// endpoint without DNS rules is not restricted (its redirect is stale);
/// an address that is no local endpoint is denied (only local endpoints
/// are redirected here, so fail closed).
impl DnsPolicy for NodeRules {
    fn check(&self, q: &QueryInfo<'_>) -> Decision {
        match self.endpoint_by_ip(q.client) {
            None => Decision::Deny,
            Some(endpoint) => match &endpoint.dns {
                None => Decision::Allow,
                Some(rules) => check_dns_rules(rules, q),
            },
        }
    }
}

/// One endpoint's DNS rules applied to a query.
pub fn check_dns_rules(rules: &DnsRules, q: &QueryInfo<'_>) -> Decision {
    match rules.query_allowed(
        q.server.ip(),
        q.transport.protocol(),
        q.server.port(),
        q.name,
    ) {
        DnsVerdict::Allowed(_) => Decision::Allow,
        DnsVerdict::Denied => Decision::Deny,
    }
}

/// The answer a denied query gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DenyRcode {
    #[default]
    Refused,
    NxDomain,
}

/// Why the proxy answered a query itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalAnswer {
    /// Policy denied it: REFUSED or NXDOMAIN.
    Denied,
    /// FORMERR: unparsable, or not exactly one question.
    FormatError,
    /// NOTIMP: an opcode other than QUERY.
    NotImplemented,
}

/// Why a client message got no answer at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Shorter than a DNS header.
    TooShort,
    /// QR=1: a response, not a query.
    NotAQuery,
}

/// What to do with a client's message.
#[derive(Debug)]
pub enum QueryOutcome {
    /// Send the client's bytes, unchanged, to `pending.server()` over the
    /// same transport and wait for the answer.
    Forward(Box<PendingQuery>),
    /// Send `reply` back to the client (from the server's address).
    Answer {
        reply: Vec<u8>,
        why: LocalAnswer,
    },
    Drop(DropReason),
}

/// What a local reply needs from the query: header bits, the question and
/// whether it had EDNS.
#[derive(Clone, Debug)]
struct ReplyTemplate {
    metadata: Metadata,
    query: Option<Query>,
    /// The client's DO bit, when it sent an OPT record.
    edns_do: Option<bool>,
}

impl ReplyTemplate {
    fn build(&self, rcode: ResponseCode) -> Vec<u8> {
        let mut metadata = Metadata::response_from_request(&self.metadata);
        metadata.response_code = rcode;
        metadata.recursion_available = true;
        let mut msg = Message::new(metadata.id, MessageType::Response, metadata.op_code);
        msg.metadata = metadata;
        if let Some(q) = &self.query {
            msg.add_query(q.clone());
        }
        if let Some(dnssec_ok) = self.edns_do {
            let mut edns = Edns::new();
            edns.set_max_payload(OUR_EDNS_PAYLOAD);
            edns.set_dnssec_ok(dnssec_ok);
            msg.set_edns(edns);
        }
        // Encoding a message we built from parsed parts cannot fail in
        // practice; if it ever does, a header alone still tells the client.
        msg.to_vec()
            .unwrap_or_else(|_| header_only_reply(&self.metadata, rcode))
    }
}

/// A bare 12-byte reply header echoing ID, opcode, RD and CD.
fn header_only_reply(query: &Metadata, rcode: ResponseCode) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    out[..2].copy_from_slice(&query.id.to_be_bytes());
    out[2] = 0x80 | (u8::from(query.op_code) << 3) | u8::from(query.recursion_desired);
    out[3] = 0x80 | (u8::from(query.checking_disabled) << 4) | (u16::from(rcode) as u8 & 0x0f);
    out
}

/// A query sent upstream, waiting for its answer.
#[derive(Clone, Debug)]
pub struct PendingQuery {
    ctx: QueryContext,
    id: u16,
    question: Query,
    name: Fqdn,
    template: ReplyTemplate,
}

/// Why an upstream message was not taken as the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// Not from the server the query went to.
    WrongSource,
    TooShort,
    /// QR=0 or an opcode other than QUERY.
    NotAResponse,
    WrongId,
    /// A different (or no, or more than one) question.
    WrongQuestion,
}

/// What to do with a message from upstream.
#[derive(Debug)]
pub enum ResponseOutcome {
    /// It answers the query: send it to the client as received. With
    /// `learned`, first program the addresses it carries.
    Relay {
        learned: Option<Learned>,
        truncated: bool,
        /// The records after the question did not parse: nothing learned.
        unparsed: bool,
    },
    /// Not ours (spoofed or stray): ignore it, keep waiting.
    Ignore(Mismatch),
}

impl PendingQuery {
    pub fn context(&self) -> &QueryContext {
        &self.ctx
    }

    pub fn server(&self) -> SocketAddr {
        self.ctx.server
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    /// The question's name.
    pub fn name(&self) -> &Fqdn {
        &self.name
    }

    /// The question's RR type (1 = A, 28 = AAAA, ...).
    pub fn qtype(&self) -> u16 {
        u16::from(self.question.query_type())
    }

    /// The SERVFAIL the client gets when upstream does not answer.
    pub fn servfail(&self) -> Vec<u8> {
        self.template.build(ResponseCode::ServFail)
    }

    /// Checks a message received from `from` (over UDP; TCP callers pass
    /// the server) against this query.
    pub fn accept_response(&self, from: SocketAddr, bytes: &[u8]) -> ResponseOutcome {
        if from != self.ctx.server {
            return ResponseOutcome::Ignore(Mismatch::WrongSource);
        }
        if bytes.len() < HEADER_LEN {
            return ResponseOutcome::Ignore(Mismatch::TooShort);
        }
        let mut decoder = BinDecoder::new(bytes);
        let Ok(header) = Header::read(&mut decoder) else {
            return ResponseOutcome::Ignore(Mismatch::TooShort);
        };
        if header.metadata.message_type != MessageType::Response
            || header.metadata.op_code != OpCode::Query
        {
            return ResponseOutcome::Ignore(Mismatch::NotAResponse);
        }
        if header.metadata.id != self.id {
            return ResponseOutcome::Ignore(Mismatch::WrongId);
        }
        if header.counts.queries != 1 {
            return ResponseOutcome::Ignore(Mismatch::WrongQuestion);
        }
        match Query::read(&mut decoder) {
            Ok(q) if same_question(&q, &self.question) => {}
            _ => return ResponseOutcome::Ignore(Mismatch::WrongQuestion),
        }
        if header.metadata.truncation {
            return ResponseOutcome::Relay {
                learned: None,
                truncated: true,
                unparsed: false,
            };
        }
        // The rest of the message, read on from the question as
        // `Message::read` would (same checks), without reading the header
        // and question again.
        match read_sections(&mut decoder, &header) {
            Ok((rcode, answers)) => ResponseOutcome::Relay {
                learned: learn_from(
                    rcode,
                    &answers,
                    &self.question.name,
                    &self.name,
                    self.ctx.client,
                ),
                truncated: false,
                unparsed: false,
            },
            Err(_) => ResponseOutcome::Relay {
                learned: None,
                truncated: false,
                unparsed: true,
            },
        }
    }
}

/// The answer, authority and additional sections after the question (what
/// `Message::read` reads there, with its checks): the response code (with
/// the OPT record's extended bits merged in) and the answer records.
fn read_sections(
    decoder: &mut BinDecoder<'_>,
    header: &Header,
) -> Result<(ResponseCode, Vec<Record>), DecodeError> {
    let op = header.metadata.op_code;
    let counts = &header.counts;
    let (answers, _, _) = Message::read_records(decoder, usize::from(counts.answers), false, op)?;
    Message::read_records(decoder, usize::from(counts.authorities), false, op)?;
    let (_, edns, _) = Message::read_records(decoder, usize::from(counts.additionals), true, op)?;
    let mut metadata = header.metadata;
    if let Some(edns) = &edns {
        metadata.merge_response_code(edns.rcode_high());
    }
    Ok((metadata.response_code, answers))
}

fn same_question(a: &Query, b: &Query) -> bool {
    // Name's equality ignores ASCII case (servers may echo 0x20 case).
    a.query_type == b.query_type && a.query_class == b.query_class && a.name == b.name
}

/// The wire labels of a hickory name as an [`Fqdn`] (lower-cased, checked).
pub(crate) fn fqdn_of(name: &Name) -> Option<Fqdn> {
    if name.is_root() {
        return Some(Fqdn::root());
    }
    let mut wire = Vec::with_capacity(name.len() + 2);
    for label in name.iter() {
        wire.push(u8::try_from(label.len()).ok()?);
        wire.extend_from_slice(label);
    }
    wire.push(0);
    Fqdn::from_wire(&wire).ok().map(|(fqdn, _)| fqdn)
}

/// Decides what to do with one message a client sent to `ctx.server`.
pub fn handle_query<P: DnsPolicy + ?Sized>(
    policy: &P,
    deny: DenyRcode,
    ctx: QueryContext,
    bytes: &[u8],
) -> QueryOutcome {
    if bytes.len() < HEADER_LEN {
        return QueryOutcome::Drop(DropReason::TooShort);
    }
    let mut decoder = BinDecoder::new(bytes);
    let Ok(header) = Header::read(&mut decoder) else {
        return QueryOutcome::Drop(DropReason::TooShort);
    };
    let metadata = header.metadata;
    if metadata.message_type != MessageType::Query {
        return QueryOutcome::Drop(DropReason::NotAQuery);
    }
    if metadata.op_code != OpCode::Query {
        return QueryOutcome::Answer {
            reply: header_only_reply(&metadata, ResponseCode::NotImp),
            why: LocalAnswer::NotImplemented,
        };
    }
    let formerr = || QueryOutcome::Answer {
        reply: header_only_reply(&metadata, ResponseCode::FormErr),
        why: LocalAnswer::FormatError,
    };
    let counts = header.counts;
    let (question, edns_do) = if counts.queries == 1
        && counts.answers == 0
        && counts.authorities == 0
        && counts.additionals == 0
    {
        // The usual query: one question and nothing after it. Reading the
        // question is all that parsing the whole message would do.
        let Ok(question) = Query::read(&mut decoder) else {
            return formerr();
        };
        (question, None)
    } else {
        let Ok(mut msg) = Message::from_vec(bytes) else {
            return formerr();
        };
        if msg.queries.len() != 1 {
            return formerr();
        }
        let edns_do = msg.edns.as_ref().map(|e| e.flags().dnssec_ok);
        (msg.queries.swap_remove(0), edns_do)
    };
    let template = ReplyTemplate {
        metadata,
        query: Some(question.clone()),
        edns_do,
    };
    let deny_reply = || QueryOutcome::Answer {
        reply: template.build(match deny {
            DenyRcode::Refused => ResponseCode::Refused,
            DenyRcode::NxDomain => ResponseCode::NXDomain,
        }),
        why: LocalAnswer::Denied,
    };
    let Some(name) = fqdn_of(&question.name) else {
        return deny_reply();
    };
    let info = QueryInfo {
        client: ctx.client,
        server: ctx.server,
        transport: ctx.transport,
        name: &name,
        qtype: u16::from(question.query_type),
    };
    match policy.check(&info) {
        Decision::Deny => deny_reply(),
        Decision::Allow => QueryOutcome::Forward(Box::new(PendingQuery {
            ctx,
            id: metadata.id,
            question,
            name,
            template,
        })),
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
