//! The per-request decision, without I/O: framing checks, path
//! normalisation, rule matching, and the responses a denied or malformed
//! request gets.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{request, Response, StatusCode, Version};
use http_body_util::Full;

use crate::path::{normalize_path, PathError};
use crate::rules::{Headers, RequestView, RuleVerdict};
use crate::PortPolicy;

/// Why a request was refused as malformed (400, connection closed, never
/// forwarded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("both Content-Length and Transfer-Encoding")]
    ContentLengthWithTransferEncoding,
    #[error("more than one Content-Length")]
    DuplicateContentLength,
    #[error("invalid Content-Length")]
    InvalidContentLength,
    #[error("Transfer-Encoding other than a single chunked")]
    BadTransferEncoding,
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("Host header differs from the request target's authority")]
    ConflictingHost,
    #[error("invalid Host header")]
    InvalidHost,
    #[error("path: {0}")]
    Path(#[from] PathError),
    #[error("CONNECT is not proxied")]
    Connect,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward, with the target's path replaced by the normalised one the
    /// rules were matched on ([`RequestSummary::path`]), the query
    /// unchanged ([`path_and_query`]).
    Forward {
        /// The policy whose rule allowed it (`None`: no rules applied).
        policy: Option<Arc<str>>,
    },
    /// No rule allows it; the policies that apply.
    Deny {
        policies: Arc<str>,
    },
    Malformed(BadRequest),
}

/// The fields of a request the decision was about, for events and the
/// onward request; borrowed from the request where they are its own
/// bytes (a path already in normal form, a lower-case host).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestSummary<'a> {
    pub method: &'a str,
    /// Normalised when normalisation succeeded, raw otherwise.
    pub path: Cow<'a, str>,
    pub host: Option<Cow<'a, str>>,
}

/// The onward origin-form target: the normalised `path` and `query`.
pub fn path_and_query(path: &str, query: Option<&str>) -> String {
    match query {
        Some(q) => {
            let mut s = String::with_capacity(path.len() + 1 + q.len());
            s.push_str(path);
            s.push('?');
            s.push_str(q);
            s
        }
        None => path.to_owned(),
    }
}

/// Rejects ambiguous message framing. hyper already refuses invalid
/// chunking, differing Content-Lengths and a Transfer-Encoding not ending
/// in chunked; this also refuses what it tolerates (RFC 9112 lets a server
/// accept CL with TE, and identical repeated CLs). The HTTP/1 relay does
/// the same checks as it parses a head ([`crate::h1::parse_request`]).
pub fn check_framing(headers: &HeaderMap, version: Version) -> Result<(), BadRequest> {
    let mut cls = headers.get_all(header::CONTENT_LENGTH).iter();
    let (cl, more_cl) = (cls.next(), cls.next().is_some());
    let te = headers.get_all(header::TRANSFER_ENCODING).iter().count();
    if cl.is_some() && te > 0 {
        return Err(BadRequest::ContentLengthWithTransferEncoding);
    }
    if more_cl {
        return Err(BadRequest::DuplicateContentLength);
    }
    if let Some(v) = cl {
        let ok = !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit);
        if !ok {
            return Err(BadRequest::InvalidContentLength);
        }
    }
    if te > 0 {
        // HTTP/2 forbids it; HTTP/1.0 has none; HTTP/1.1: exactly `chunked`
        // (another coding would have to be re-encoded to be forwarded).
        let mut all = headers.get_all(header::TRANSFER_ENCODING).iter();
        let only_chunked = all
            .next()
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"))
            && all.next().is_none();
        if version != Version::HTTP_11 || !only_chunked {
            return Err(BadRequest::BadTransferEncoding);
        }
    }
    Ok(())
}

/// The request's authority, lower-cased: the target's (absolute form,
/// HTTP/2 `:authority`) or the single Host header; both present must agree.
pub fn request_host(parts: &request::Parts) -> Result<Option<String>, BadRequest> {
    host_of(
        Headers::Map(&parts.headers),
        parts.uri.authority().map(|a| a.as_str()),
    )
    .map(|h| h.map(Cow::into_owned))
}

/// `s` lower-cased, borrowed when it has no upper-case letter.
fn lower(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

fn host_of<'a>(
    headers: Headers<'a>,
    authority: Option<&'a str>,
) -> Result<Option<Cow<'a, str>>, BadRequest> {
    let mut n = 0;
    let mut host = None;
    headers.any("host", |v| {
        n += 1;
        host = Some(v);
        n > 1
    });
    if n > 1 {
        return Err(BadRequest::DuplicateHost);
    }
    let host = host
        .map(|h| {
            // As http's HeaderValue::to_str: visible ASCII and tabs/spaces.
            if h.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
                Ok(lower(std::str::from_utf8(h).unwrap_or_default()))
            } else {
                Err(BadRequest::InvalidHost)
            }
        })
        .transpose()?;
    let target = authority.map(lower);
    match (target, host) {
        (Some(t), Some(h)) if t != h => Err(BadRequest::ConflictingHost),
        (Some(t), _) => Ok(Some(t)),
        (None, h) => Ok(h),
    }
}

/// What [`decide_request`] looks at, from either protocol.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub method: &'a str,
    /// The raw path (not normalised yet).
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// The target's authority (absolute form, HTTP/2 `:authority`).
    pub authority: Option<&'a str>,
    pub headers: Headers<'a>,
}

/// gRPC requests get gRPC denials.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    is_grpc_in(Headers::Map(headers))
}

/// [`is_grpc`] on either kind of headers.
pub fn is_grpc_in(headers: Headers<'_>) -> bool {
    headers.first("content-type").is_some_and(|v| {
        let start = v
            .iter()
            .position(|b| !matches!(b, b' ' | b'\t'))
            .unwrap_or(v.len());
        let v = &v[start..];
        v.len() >= 16 && v[..16].eq_ignore_ascii_case(b"application/grpc")
    })
}

fn check_one(policy: &PortPolicy, view: &RequestView<'_>) -> RuleVerdict {
    match policy {
        PortPolicy::AllowAll => RuleVerdict::Allowed(None),
        PortPolicy::Http(rules) => rules.check(view),
        // TLS is expected here, not HTTP: nothing can be checked.
        PortPolicy::Sni(_) => RuleVerdict::Denied(Arc::from("TLS server-name policy")),
    }
}

/// The decision on a request under the egress policy of its source and the
/// ingress policy of its destination (both must allow); framing checked
/// first ([`check_framing`]).
pub fn decide<'a>(
    parts: &'a request::Parts,
    egress: &PortPolicy,
    ingress: &PortPolicy,
) -> (Decision, RequestSummary<'a>) {
    if let Err(e) = check_framing(&parts.headers, parts.version) {
        let summary = RequestSummary {
            method: parts.method.as_str(),
            path: Cow::Borrowed(parts.uri.path()),
            host: None,
        };
        return (Decision::Malformed(e), summary);
    }
    let info = RequestInfo {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        authority: parts.uri.authority().map(|a| a.as_str()),
        headers: Headers::Map(&parts.headers),
    };
    decide_request(&info, egress, ingress)
}

/// [`decide`] after the framing checks, on either protocol's request.
pub fn decide_request<'a>(
    req: &RequestInfo<'a>,
    egress: &PortPolicy,
    ingress: &PortPolicy,
) -> (Decision, RequestSummary<'a>) {
    let mut summary = RequestSummary {
        method: req.method,
        path: Cow::Borrowed(""),
        host: None,
    };
    let malformed = |e, mut s: RequestSummary<'a>| {
        s.path = Cow::Borrowed(req.path);
        (Decision::Malformed(e), s)
    };
    if req.method == "CONNECT" {
        return malformed(BadRequest::Connect, summary);
    }
    match host_of(req.headers, req.authority) {
        Ok(h) => summary.host = h,
        Err(e) => return malformed(e, summary),
    }
    let path = match normalize_path(req.path) {
        Ok(p) => p,
        Err(e) => return malformed(e.into(), summary),
    };
    summary.path = path;
    let view = RequestView {
        method: summary.method,
        path: &summary.path,
        host: summary.host.as_deref(),
        headers: req.headers,
    };
    let mut allowed_by = None;
    for policy in [egress, ingress] {
        match check_one(policy, &view) {
            RuleVerdict::Allowed(p) => allowed_by = p.or(allowed_by),
            RuleVerdict::Denied(policies) => return (Decision::Deny { policies }, summary),
        }
    }
    (Decision::Forward { policy: allowed_by }, summary)
}

/// The body of an HTTP denial.
pub const DENIED_BODY: &str = "Access denied";
/// gRPC status PERMISSION_DENIED.
pub const GRPC_PERMISSION_DENIED: &str = "7";

/// The response to a denied request: 403 `Access denied`, or for gRPC a
/// trailers-only response with `grpc-status: 7` and a message naming the
/// policies.
pub fn denied_response(grpc: bool, policies: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    if grpc {
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            "grpc-status",
            HeaderValue::from_static(GRPC_PERMISSION_DENIED),
        );
        let message = grpc_percent_encode(&format!("denied by policy: {policies}"));
        if let Ok(v) = HeaderValue::from_str(&message) {
            h.insert("grpc-message", v);
        }
    } else {
        *resp.status_mut() = StatusCode::FORBIDDEN;
        *resp.body_mut() = Full::new(Bytes::from_static(DENIED_BODY.as_bytes()));
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    resp
}

/// The response to a malformed request (the connection is closed after it).
pub fn bad_request_response(e: &BadRequest) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("Bad request: {e}\n"))));
    *resp.status_mut() = StatusCode::BAD_REQUEST;
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// gRPC's grpc-message encoding: printable ASCII except `%` as is, every
/// other byte as `%XX`.
pub(crate) fn grpc_percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use http::Request;
    use meshward_policy::crd::HttpRule;

    use super::*;
    use crate::rules::HttpRuleSet;

    fn parts(builder: http::request::Builder) -> request::Parts {
        builder.body(()).unwrap().into_parts().0
    }

    fn frontend() -> PortPolicy {
        let r = HttpRule {
            method: Some("GET".into()),
            path: Some("/api/v1/.*".into()),
            ..Default::default()
        };
        PortPolicy::Http(Arc::new(HttpRuleSet::new([(&r, "P")]).unwrap()))
    }

    fn verdict(b: http::request::Builder) -> Decision {
        decide(&parts(b), &frontend(), &PortPolicy::AllowAll).0
    }

    fn get(uri: &str) -> http::request::Builder {
        Request::get(uri).header("host", "shop")
    }

    #[test]
    fn bypass_list_denied_or_refused() {
        assert!(matches!(
            verdict(get("/api/v1/x")),
            Decision::Forward { .. }
        ));
        for uri in [
            "/api/v1/../admin",
            "/api/v1/%2e%2e/admin",
            "/api/v1/%2E%2E/%2e%2e/admin",
            "//admin",
            "/API/v1/x",
            "/admin",
        ] {
            assert!(
                matches!(verdict(get(uri)), Decision::Deny { .. }),
                "{uri}: {:?}",
                verdict(get(uri))
            );
        }
        for uri in [
            "/api/v1/..%2Fadmin",
            "/api/v1/%2F",
            "/api/v1/x%00",
            "/api/v1/..;/x",
        ] {
            assert!(
                matches!(verdict(get(uri)), Decision::Malformed(BadRequest::Path(_))),
                "{uri}"
            );
        }
    }

    #[test]
    fn forwarded_path_is_the_matched_one() {
        let p = parts(get("/api/v1//a/./b/../c?q=%2e%2e"));
        let (d, s) = decide(&p, &frontend(), &PortPolicy::AllowAll);
        assert_eq!(
            d,
            Decision::Forward {
                policy: Some("P".into())
            }
        );
        assert_eq!(s.path, "/api/v1/a/c");
        assert_eq!(
            path_and_query(&s.path, p.uri.query()),
            "/api/v1/a/c?q=%2e%2e"
        );
        // Dot segments inside the allowed prefix are fine once resolved.
        assert!(matches!(
            verdict(get("/api/v2/../v1/x")),
            Decision::Forward { .. }
        ));
    }

    #[test]
    fn smuggling_framing_refused() {
        let d = verdict(
            get("/api/v1/x")
                .header("content-length", "5")
                .header("transfer-encoding", "chunked"),
        );
        assert_eq!(
            d,
            Decision::Malformed(BadRequest::ContentLengthWithTransferEncoding)
        );
        let d = verdict(
            get("/api/v1/x")
                .header("content-length", "5")
                .header("content-length", "5"),
        );
        assert_eq!(d, Decision::Malformed(BadRequest::DuplicateContentLength));
        let d = verdict(get("/api/v1/x").header("content-length", "5, 5"));
        assert_eq!(d, Decision::Malformed(BadRequest::InvalidContentLength));
        let d = verdict(get("/api/v1/x").header("transfer-encoding", "chunked, gzip"));
        assert_eq!(d, Decision::Malformed(BadRequest::BadTransferEncoding));
        let d = verdict(
            get("/api/v1/x")
                .version(Version::HTTP_10)
                .header("transfer-encoding", "chunked"),
        );
        assert_eq!(d, Decision::Malformed(BadRequest::BadTransferEncoding));
        let d = verdict(get("/api/v1/x").header("transfer-encoding", "gzip, chunked"));
        assert_eq!(d, Decision::Malformed(BadRequest::BadTransferEncoding));
        assert!(matches!(
            verdict(get("/api/v1/x").header("transfer-encoding", "chunked")),
            Decision::Forward { .. }
        ));
    }

    #[test]
    fn host_confusion_refused() {
        let d = verdict(get("/api/v1/x").header("host", "other"));
        assert_eq!(d, Decision::Malformed(BadRequest::DuplicateHost));
        let d = verdict(Request::get("http://evil/api/v1/x").header("host", "shop"));
        assert_eq!(d, Decision::Malformed(BadRequest::ConflictingHost));
        let p = parts(Request::get("http://Shop:8080/api/v1/x"));
        let (_, s) = decide(&p, &frontend(), &PortPolicy::AllowAll);
        assert_eq!(s.host.as_deref(), Some("shop:8080"));
    }

    #[test]
    fn both_directions_must_allow() {
        let p = parts(get("/api/v1/x"));
        let deny_all = {
            let r = HttpRule {
                path: Some("/nothing".into()),
                ..Default::default()
            };
            PortPolicy::Http(Arc::new(HttpRuleSet::new([(&r, "Q")]).unwrap()))
        };
        assert!(matches!(
            decide(&p, &frontend(), &PortPolicy::AllowAll).0,
            Decision::Forward { .. }
        ));
        assert_eq!(
            decide(&p, &frontend(), &deny_all).0,
            Decision::Deny {
                policies: "Q".into()
            }
        );
        assert!(matches!(
            decide(&p, &deny_all, &frontend()).0,
            Decision::Deny { .. }
        ));
    }

    #[test]
    fn connect_refused() {
        let d = verdict(Request::connect("shop:443"));
        assert_eq!(d, Decision::Malformed(BadRequest::Connect));
    }

    #[test]
    fn grpc_detection_and_denial() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        h.insert(
            "content-type",
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        assert!(!is_grpc(&h));
        let r = denied_response(true, "MeshNetworkPolicy shop/grpc-l7");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "7");
        assert_eq!(
            r.headers()["grpc-message"],
            "denied by policy: MeshNetworkPolicy shop/grpc-l7"
        );
        let r = denied_response(false, "x");
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(grpc_percent_encode("a%b\u{e9}"), "a%25b%C3%A9");
    }
}
