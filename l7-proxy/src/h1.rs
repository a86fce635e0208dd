//! HTTP/1.1 relay core, without I/O: request and response heads parsed
//! once with `httparse` straight from a connection's read buffer, strict
//! message framing (RFC 9112 section 6), the onward heads written with
//! connection-specific headers removed, and an incremental body framing
//! state machine ([`BodyDecoder`]) that tells the shell how many buffered
//! bytes belong to the current message so bodies can be relayed as they
//! arrive, validated, never buffered whole.
//!
//! Ambiguous framing is refused rather than resolved: `Content-Length`
//! with `Transfer-Encoding`, more than one `Content-Length` (even equal
//! ones), a `Content-Length` that is not plain digits, a
//! `Transfer-Encoding` other than one `chunked` (or any on HTTP/1.0),
//! chunk lines that are not exactly `HEX[ext]CRLF`, data not followed by
//! CRLF, malformed trailers. `httparse` refuses invalid header names and
//! values, bare CR, obs-fold, and request targets with controls or spaces.

use std::mem::MaybeUninit;

use crate::decide::BadRequest;

/// Headers a head may carry (more: 431).
pub const MAX_HEADERS: usize = 128;
/// Longest chunk-size line extension, bytes.
const MAX_CHUNK_EXT: usize = 4096;
/// Largest trailer section, bytes.
const MAX_TRAILERS: usize = 64 * 1024;

/// Uninitialised header slots for [`parse_request`] / [`parse_response`].
pub type HeaderSlots<'b> = [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS];

/// Fresh slots (no initialisation cost).
pub fn header_slots<'b>() -> HeaderSlots<'b> {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

/// A request head that cannot be relayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Larger than the limit, or more than [`MAX_HEADERS`] headers (431).
    #[error("request head too large")]
    TooLarge,
    /// Not HTTP/1.x syntax (400).
    #[error("invalid request head: {0}")]
    Syntax(&'static str),
    /// Ambiguous or unsupported framing (400).
    #[error(transparent)]
    Framing(#[from] BadRequest),
}

fn syntax(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooLarge,
        httparse::Error::HeaderName => HeadError::Syntax("invalid header name"),
        httparse::Error::HeaderValue => HeadError::Syntax("invalid header value"),
        httparse::Error::NewLine => HeadError::Syntax("invalid line ending"),
        httparse::Error::Status => HeadError::Syntax("invalid status"),
        httparse::Error::Token => HeadError::Syntax("invalid token in the request line"),
        httparse::Error::Version => HeadError::Syntax("not HTTP/1.x"),
    }
}

/// A parsed request head, borrowing the read buffer.
#[derive(Debug)]
pub struct RequestHead<'h, 'b> {
    /// Bytes of the head (through the empty line).
    pub len: usize,
    pub method: &'b str,
    /// The raw request target.
    pub target: &'b str,
    /// 0 or 1 (HTTP/1.0, HTTP/1.1).
    pub minor: u8,
    pub headers: &'h [httparse::Header<'b>],
    pub body: Body,
    /// A WebSocket upgrade (the only upgrade passed through; others, h2c
    /// above all, lose their Upgrade header and are forwarded as plain
    /// requests).
    pub upgrade: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// The client's connection ends after this exchange (HTTP/1.0, or
    /// `Connection: close`).
    pub close: bool,
}

/// Parses the request head at the start of `buf`: `Ok(None)` when it is
/// not complete yet (and within `max` bytes).
pub fn parse_request<'h, 'b>(
    buf: &'b [u8],
    slots: &'h mut HeaderSlots<'b>,
    max: usize,
) -> Result<Option<RequestHead<'h, 'b>>, HeadError> {
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(len)) if len <= max => len,
        Ok(httparse::Status::Complete(_)) => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) if buf.len() >= max => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(syntax(e)),
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Syntax("incomplete request line"));
    };
    let headers: &'h [httparse::Header<'b>] = req.headers;
    let mut cl: Option<&[u8]> = None;
    let mut te: Option<&[u8]> = None;
    let mut upgrade_ws = false;
    let mut expect_continue = false;
    for h in headers {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            if cl.is_some() {
                return Err(BadRequest::DuplicateContentLength.into());
            }
            cl = Some(h.value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if te.is_some() {
                return Err(BadRequest::BadTransferEncoding.into());
            }
            te = Some(h.value);
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_ws = !h.value.is_empty()
                && h.value
                    .split(|&b| b == b',')
                    .all(|t| trim(t).eq_ignore_ascii_case(b"websocket"));
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = trim(h.value).eq_ignore_ascii_case(b"100-continue");
        }
    }
    let body = match (cl, te) {
        (Some(_), Some(_)) => return Err(BadRequest::ContentLengthWithTransferEncoding.into()),
        (Some(v), None) => match parse_length(v) {
            Some(0) => Body::None,
            Some(n) => Body::Length(n),
            None => return Err(BadRequest::InvalidContentLength.into()),
        },
        (None, Some(v)) => {
            if minor != 1 || !trim(v).eq_ignore_ascii_case(b"chunked") {
                return Err(BadRequest::BadTransferEncoding.into());
            }
            Body::Chunked
        }
        (None, None) => Body::None,
    };
    let close = minor == 0 || has_token(headers, "connection", b"close");
    let upgrade = upgrade_ws && body == Body::None && has_token(headers, "connection", b"upgrade");
    Ok(Some(RequestHead {
        len,
        method,
        target,
        minor,
        headers,
        body,
        upgrade,
        expect_continue,
        close,
    }))
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead<'h, 'b> {
    pub len: usize,
    pub code: u16,
    pub reason: &'b str,
    pub headers: &'h [httparse::Header<'b>],
    pub body: Body,
    /// The upstream connection ends after this response.
    pub close: bool,
}

/// A response head from upstream that cannot be relayed (502).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("response head too large")]
    TooLarge,
    #[error("invalid response head: {0}")]
    Syntax(&'static str),
    #[error("ambiguous response framing: {0}")]
    Framing(&'static str),
}

/// Parses the response head at the start of `buf` (to a request with
/// method HEAD when `head_request`).
pub fn parse_response<'h, 'b>(
    buf: &'b [u8],
    slots: &'h mut HeaderSlots<'b>,
    max: usize,
    head_request: bool,
) -> Result<Option<ResponseHead<'h, 'b>>, ResponseError> {
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, slots)
    {
        Ok(httparse::Status::Complete(len)) if len <= max => len,
        Ok(httparse::Status::Complete(_)) => return Err(ResponseError::TooLarge),
        Ok(httparse::Status::Partial) if buf.len() >= max => return Err(ResponseError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ResponseError::TooLarge),
        Err(e) => {
            return Err(ResponseError::Syntax(match syntax(e) {
                HeadError::Syntax(s) => s,
                _ => "invalid",
            }))
        }
    };
    let (Some(code), Some(minor)) = (resp.code, resp.version) else {
        return Err(ResponseError::Syntax("incomplete status line"));
    };
    let reason = resp.reason.unwrap_or("");
    let headers: &'h [httparse::Header<'b>] = resp.headers;
    let mut cl: Option<&[u8]> = None;
    let mut te: Option<&[u8]> = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            if cl.is_some() {
                return Err(ResponseError::Framing("more than one Content-Length"));
            }
            cl = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if te.is_some() {
                return Err(ResponseError::Framing("more than one Transfer-Encoding"));
            }
            te = Some(h.value);
        }
    }
    let no_body = head_request || (100..200).contains(&code) || code == 204 || code == 304;
    let body = match (cl, te) {
        _ if no_body => Body::None,
        (Some(_), Some(_)) => {
            return Err(ResponseError::Framing(
                "both Content-Length and Transfer-Encoding",
            ))
        }
        (Some(v), None) => match parse_length(v) {
            Some(0) => Body::None,
            Some(n) => Body::Length(n),
            None => return Err(ResponseError::Framing("invalid Content-Length")),
        },
        (None, Some(v)) if minor == 1 && trim(v).eq_ignore_ascii_case(b"chunked") => Body::Chunked,
        // Another coding (its last not chunked): delimited by the close.
        (None, Some(_)) => Body::Close,
        (None, None) => Body::Close,
    };
    let close = minor == 0 || body == Body::Close || has_token(headers, "connection", b"close");
    Ok(Some(ResponseHead {
        len,
        code,
        reason,
        headers,
        body,
        close,
    }))
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = v.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    match (start, end) {
        (Some(s), Some(e)) => &v[s..=e],
        _ => &[],
    }
}

/// Plain decimal digits fitting a u64.
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// Whether a comma-separated header `name` lists `token`.
fn has_token(headers: &[httparse::Header<'_>], name: &str, token: &[u8]) -> bool {
    headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case(name)
            && h.value
                .split(|&b| b == b',')
                .any(|t| trim(t).eq_ignore_ascii_case(token))
    })
}

/// Hop-by-hop header names always removed (RFC 9110 7.6.1 and the old
/// Proxy-* ones); `TE` is kept only as `TE: trailers`, `Upgrade` only on
/// an upgrade.
fn always_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "transfer-encoding",
    ]
    .iter()
    .any(|n| name.eq_ignore_ascii_case(n))
}

/// Whether a header is connection-specific and not forwarded.
fn is_hop_by_hop(h: &httparse::Header<'_>, listed: &[&[u8]], upgrade: bool) -> bool {
    let name = h.name;
    if always_hop(name) {
        return true;
    }
    if name.eq_ignore_ascii_case("te") {
        return !trim(h.value).eq_ignore_ascii_case(b"trailers");
    }
    if name.eq_ignore_ascii_case("upgrade") {
        return !upgrade;
    }
    listed
        .iter()
        .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
}

/// The header names a `Connection` header lists (other than TE,
/// `trailers` being the one TE kept).
fn connection_listed<'b>(headers: &[httparse::Header<'b>]) -> Vec<&'b [u8]> {
    let mut out = Vec::new();
    for h in headers {
        if h.name.eq_ignore_ascii_case("connection") {
            for t in h.value.split(|&b| b == b',') {
                let t = trim(t);
                if !t.is_empty()
                    && !t.eq_ignore_ascii_case(b"close")
                    && !t.eq_ignore_ascii_case(b"keep-alive")
                    && !t.eq_ignore_ascii_case(b"upgrade")
                {
                    out.push(t);
                }
            }
        }
    }
    out
}

fn push_headers(out: &mut Vec<u8>, headers: &[httparse::Header<'_>], upgrade: bool) {
    // No allocation unless the head has a Connection header listing names.
    let listed = connection_listed(headers);
    for h in headers {
        if is_hop_by_hop(h, &listed, upgrade) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
}

/// Writes the onward request head into `out` (cleared first): the
/// request line with `path` (the normalised one) and `query` (origin
/// form), the client's headers without connection-specific ones, `Host`
/// from an absolute-form target when the client sent none, the framing
/// headers for `head.body`, and `Connection: upgrade` on an upgrade.
pub fn write_request_head(
    out: &mut Vec<u8>,
    head: &RequestHead<'_, '_>,
    path: &str,
    query: Option<&str>,
    authority: Option<&str>,
) {
    out.clear();
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    if let Some(q) = query {
        out.push(b'?');
        out.extend_from_slice(q.as_bytes());
    }
    out.extend_from_slice(if head.minor == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    push_headers(out, head.headers, head.upgrade);
    if let Some(a) = authority {
        if !head
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("host"))
        {
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    if head.body == Body::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if head.upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the response head for the client into `out` (cleared first):
/// the status line as HTTP/1.1, the headers without connection-specific
/// ones, the framing for `head.body`, `Connection: close` when the client
/// connection ends after it, `Connection: upgrade` on a 101.
pub fn write_response_head(out: &mut Vec<u8>, head: &ResponseHead<'_, '_>, close: bool) {
    out.clear();
    let switching = head.code == 101;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&itoa_buf(head.code));
    out.push(b' ');
    out.extend_from_slice(head.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    push_headers(out, head.headers, switching);
    if head.body == Body::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if switching {
        out.extend_from_slice(b"connection: upgrade\r\n");
    } else if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn itoa_buf(code: u16) -> [u8; 3] {
    let c = code.min(999);
    [
        b'0' + (c / 100) as u8,
        b'0' + (c / 10 % 10) as u8,
        b'0' + (c % 10) as u8,
    ]
}

/// A body whose framing broke mid-way (the connection is closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("invalid chunk size")]
    ChunkSize,
    #[error("chunk size too large")]
    ChunkSizeTooLarge,
    #[error("chunk extension too long")]
    ChunkExtension,
    #[error("chunk line not ended by CRLF")]
    ChunkLine,
    #[error("chunk data not followed by CRLF")]
    ChunkDataEnd,
    #[error("invalid trailer field")]
    Trailer,
    #[error("trailers too large")]
    TrailersTooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Done,
    Length(u64),
    Close,
    /// Hex digits of a chunk size (`digits` so far).
    Size {
        size: u64,
        digits: u8,
    },
    /// Whitespace after the size, before `;` or CR.
    SizeWs {
        size: u64,
    },
    /// A chunk extension, up to CR.
    Ext {
        size: u64,
        len: usize,
    },
    /// CR of a chunk line seen, LF expected.
    SizeLf {
        size: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (`total`: trailer bytes so far).
    TrailerStart {
        total: usize,
    },
    TrailerName {
        total: usize,
    },
    TrailerValue {
        total: usize,
    },
    TrailerLf {
        total: usize,
    },
    /// CR of the final empty line seen.
    EndLf,
}

/// Follows one message body through the bytes relayed for it.
#[derive(Debug, Clone)]
pub struct BodyDecoder {
    state: State,
}

impl BodyDecoder {
    pub fn new(body: Body) -> Self {
        let state = match body {
            Body::None | Body::Length(0) => State::Done,
            Body::Length(n) => State::Length(n),
            Body::Chunked => State::Size { size: 0, digits: 0 },
            Body::Close => State::Close,
        };
        BodyDecoder { state }
    }

    /// The body has ended (a close-delimited one only ends with its
    /// connection).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Delimited by the connection's end.
    pub fn is_close_delimited(&self) -> bool {
        self.state == State::Close
    }

    /// Bytes left of a Content-Length body, or 0.
    pub fn remaining_length(&self) -> u64 {
        match self.state {
            State::Length(n) => n,
            _ => 0,
        }
    }

    /// Takes `input` (the bytes that follow what was taken before) and
    /// returns how many of them belong to the body; fewer than
    /// `input.len()` only when the body ended within `input`.
    pub fn advance(&mut self, input: &[u8]) -> Result<usize, FramingError> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Done => break,
                State::Close => return Ok(input.len()),
                State::Length(n) => {
                    let k = ((input.len() - i) as u64).min(n);
                    i += k as usize;
                    self.state = if k == n {
                        State::Done
                    } else {
                        State::Length(n - k)
                    };
                }
                State::Data(n) => {
                    let k = ((input.len() - i) as u64).min(n);
                    i += k as usize;
                    self.state = if k == n {
                        State::DataCr
                    } else {
                        State::Data(n - k)
                    };
                }
                s => {
                    self.state = step(s, input[i])?;
                    i += 1;
                }
            }
        }
        Ok(i)
    }
}

/// One byte of the chunked framing outside chunk data.
fn step(state: State, b: u8) -> Result<State, FramingError> {
    use FramingError as E;
    Ok(match state {
        State::Size { size, digits } => match b {
            b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                if digits >= 16 {
                    return Err(E::ChunkSizeTooLarge);
                }
                let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                State::Size {
                    size: size << 4 | d,
                    digits: digits + 1,
                }
            }
            _ if digits == 0 => return Err(E::ChunkSize),
            b' ' | b'\t' => State::SizeWs { size },
            b';' => State::Ext { size, len: 0 },
            b'\r' => State::SizeLf { size },
            _ => return Err(E::ChunkSize),
        },
        State::SizeWs { size } => match b {
            b' ' | b'\t' => State::SizeWs { size },
            b';' => State::Ext { size, len: 0 },
            b'\r' => State::SizeLf { size },
            _ => return Err(E::ChunkSize),
        },
        State::Ext { size, len } => match b {
            b'\r' => State::SizeLf { size },
            b'\t' | b' '..=b'~' | 0x80..=0xff if len < MAX_CHUNK_EXT => {
                State::Ext { size, len: len + 1 }
            }
            b'\t' | b' '..=b'~' | 0x80..=0xff => return Err(E::ChunkExtension),
            _ => return Err(E::ChunkLine),
        },
        State::SizeLf { size } => match b {
            b'\n' if size == 0 => State::TrailerStart { total: 0 },
            b'\n' => State::Data(size),
            _ => return Err(E::ChunkLine),
        },
        State::DataCr => match b {
            b'\r' => State::DataLf,
            _ => return Err(E::ChunkDataEnd),
        },
        State::DataLf => match b {
            b'\n' => State::Size { size: 0, digits: 0 },
            _ => return Err(E::ChunkDataEnd),
        },
        State::TrailerStart { total } => match b {
            b'\r' => State::EndLf,
            _ if httparse_token(b) => State::TrailerName { total: total + 1 },
            _ => return Err(E::Trailer),
        },
        State::TrailerName { total } => {
            let total = total + 1;
            if total > MAX_TRAILERS {
                return Err(E::TrailersTooLarge);
            }
            match b {
                b':' => State::TrailerValue { total },
                _ if httparse_token(b) => State::TrailerName { total },
                _ => return Err(E::Trailer),
            }
        }
        State::TrailerValue { total } => {
            let total = total + 1;
            if total > MAX_TRAILERS {
                return Err(E::TrailersTooLarge);
            }
            match b {
                b'\r' => State::TrailerLf { total },
                b'\t' | b' '..=b'~' | 0x80..=0xff => State::TrailerValue { total },
                _ => return Err(E::Trailer),
            }
        }
        State::TrailerLf { total } => match b {
            b'\n' => State::TrailerStart { total },
            _ => return Err(E::Trailer),
        },
        State::EndLf => match b {
            b'\n' => State::Done,
            _ => return Err(E::Trailer),
        },
        State::Done | State::Close | State::Length(_) | State::Data(_) => state,
    })
}

/// RFC 9110 tchar.
fn httparse_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The parts of a request target the decision needs: (path, query,
/// authority). Origin form (`/p?q`) and absolute form (`http://a/p?q`);
/// `None` for anything else (asterisk and authority forms, other schemes).
pub fn split_target(target: &str) -> Option<(&str, Option<&str>, Option<&str>)> {
    let (authority, rest) = if target.starts_with('/') {
        (None, target)
    } else {
        let scheme_end = target.find("://")?;
        let scheme = &target[..scheme_end];
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return None;
        }
        let after = &target[scheme_end + 3..];
        let end = after.find(['/', '?']).unwrap_or(after.len());
        let authority = &after[..end];
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        let rest = &after[end..];
        (Some(authority), if rest.is_empty() { "/" } else { rest })
    };
    if !target.is_ascii() {
        return None;
    }
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (if p.is_empty() { "/" } else { p }, Some(q)),
        None => (rest, None),
    };
    Some((path, query, authority))
}

#[cfg(test)]
mod tests;
