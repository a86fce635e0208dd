use super::*;

const MAX: usize = 64 * 1024;

/// (head length, body, upgrade, expect-continue, close).
type Framing = (usize, Body, bool, bool, bool);

/// The framing of a request head, or its error.
fn framing(raw: &[u8]) -> Result<Option<Framing>, HeadError> {
    let mut slots = header_slots();
    parse_request(raw, &mut slots, MAX)
        .map(|o| o.map(|h| (h.len, h.body, h.upgrade, h.expect_continue, h.close)))
}

fn body_of(raw: &[u8]) -> Result<Body, HeadError> {
    framing(raw).map(|o| o.expect("complete head").1)
}

#[test]
fn request_framing_table() {
    use BadRequest as B;
    let ok: &[(&[u8], Body)] = &[
        (b"GET / HTTP/1.1\r\nHost: s\r\n\r\n", Body::None),
        (b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", Body::None),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n",
            Body::Length(12),
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length:  7 \r\n\r\n",
            Body::Length(7),
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            Body::Chunked,
        ),
        (
            b"POST / HTTP/1.1\r\ntransfer-encoding: Chunked\r\n\r\n",
            Body::Chunked,
        ),
        (
            b"POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\n",
            Body::Length(3),
        ),
        // Empty lines before the request line are skipped.
        (b"\r\nGET / HTTP/1.1\r\n\r\n", Body::None),
    ];
    for (raw, body) in ok {
        assert_eq!(body_of(raw), Ok(*body), "{}", String::from_utf8_lossy(raw));
    }
    let bad: &[(&[u8], HeadError)] = &[
        (
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            B::ContentLengthWithTransferEncoding.into(),
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            B::ContentLengthWithTransferEncoding.into(),
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
            B::DuplicateContentLength.into(),
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n",
            B::DuplicateContentLength.into(),
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            B::InvalidContentLength.into(),
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            B::InvalidContentLength.into(),
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            B::InvalidContentLength.into(),
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            B::InvalidContentLength.into(),
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            B::InvalidContentLength.into(),
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
            B::BadTransferEncoding.into(),
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            B::BadTransferEncoding.into(),
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            B::BadTransferEncoding.into(),
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            B::BadTransferEncoding.into(),
        ),
        (
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            B::BadTransferEncoding.into(),
        ),
    ];
    for (raw, e) in bad {
        assert_eq!(
            body_of(raw).as_ref(),
            Err(e),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
    // Header injection and other syntax: refused by the parser.
    for raw in [
        &b"GET /healthz HTTP/1.1\r\nHost: s\r\nX-A: a\rGET /admin HTTP/1.1\r\n\r\n"[..],
        b"GET /healthz HTTP/1.1\r\nHost: s\r\nX-A: a\r\n folded\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        b"GET /a b HTTP/1.1\r\n\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ] {
        assert!(
            matches!(framing(raw), Err(HeadError::Syntax(_))),
            "{}: {:?}",
            String::from_utf8_lossy(raw),
            framing(raw)
        );
    }
}

#[test]
fn head_limits() {
    let mut slots = header_slots();
    let big = [b'a'; 100];
    assert_eq!(
        parse_request(&big, &mut slots, 32).map(|h| h.is_some()),
        Err(HeadError::TooLarge)
    );
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..MAX_HEADERS + 1 {
        many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let mut slots = header_slots();
    assert_eq!(
        parse_request(&many, &mut slots, MAX).map(|h| h.is_some()),
        Err(HeadError::TooLarge)
    );
    let complete = b"GET / HTTP/1.1\r\nHost: s\r\n\r\n";
    let mut slots = header_slots();
    assert_eq!(
        parse_request(complete, &mut slots, 10).map(|h| h.is_some()),
        Err(HeadError::TooLarge)
    );
}

#[test]
fn connection_semantics() {
    let f = |raw: &[u8]| framing(raw).unwrap().unwrap();
    let ws = b"GET /ws HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n";
    assert!(f(ws).2, "websocket upgrade");
    assert!(!f(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n").2);
    assert!(!f(b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n").2);
    assert!(f(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n").3);
    assert!(f(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").4);
    assert!(f(b"GET / HTTP/1.0\r\n\r\n").4);
    assert!(!f(b"GET / HTTP/1.1\r\n\r\n").4);
}

fn request_head(raw: &[u8], pq: &str, authority: Option<&str>) -> String {
    let mut slots = header_slots();
    let head = parse_request(raw, &mut slots, MAX).unwrap().unwrap();
    let mut out = Vec::new();
    // The query (if any) is written after the path.
    let (path, query) = match pq.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (pq, None),
    };
    write_request_head(&mut out, &head, path, query, authority);
    String::from_utf8(out).unwrap()
}

#[test]
fn onward_request_heads() {
    let out = request_head(
        b"GET /a/../b HTTP/1.1\r\nHost: s\r\nConnection: keep-alive, x-secret\r\nKeep-Alive: timeout=5\r\nX-Secret: 1\r\nTE: trailers\r\nProxy-Connection: x\r\nProxy-Authorization: y\r\nUpgrade: websocket\r\nContent-Type: application/json\r\n\r\n",
        "/b",
        None,
    );
    assert_eq!(
        out,
        "GET /b HTTP/1.1\r\nHost: s\r\nTE: trailers\r\nContent-Type: application/json\r\n\r\n"
    );
    let out = request_head(b"GET / HTTP/1.1\r\nTE: gzip\r\n\r\n", "/", None);
    assert_eq!(out, "GET / HTTP/1.1\r\n\r\n");
    // An h2c upgrade: Upgrade and what Connection lists go.
    let out = request_head(
        b"GET /h HTTP/1.1\r\nHost: s\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMA\r\n\r\n",
        "/h",
        None,
    );
    assert_eq!(out, "GET /h HTTP/1.1\r\nHost: s\r\n\r\n");
    // A WebSocket upgrade keeps Upgrade, Connection: upgrade.
    let out = request_head(
        b"GET /ws HTTP/1.1\r\nHost: s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n",
        "/ws",
        None,
    );
    assert_eq!(
        out,
        "GET /ws HTTP/1.1\r\nHost: s\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\nconnection: upgrade\r\n\r\n"
    );
    // Chunked: one normalised Transfer-Encoding; absolute form gets a Host.
    let out = request_head(
        b"POST http://shop:8080/x HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n",
        "/x",
        Some("shop:8080"),
    );
    assert_eq!(
        out,
        "POST /x HTTP/1.1\r\nhost: shop:8080\r\ntransfer-encoding: chunked\r\n\r\n"
    );
}

fn response(
    raw: &[u8],
    head_request: bool,
) -> Result<Option<(usize, u16, Body, bool)>, ResponseError> {
    let mut slots = header_slots();
    parse_response(raw, &mut slots, MAX, head_request)
        .map(|o| o.map(|h| (h.len, h.code, h.body, h.close)))
}

#[test]
fn response_framing_table() {
    let body = |raw: &[u8], head: bool| response(raw, head).unwrap().unwrap().2;
    assert_eq!(
        body(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", false),
        Body::Length(3)
    );
    assert_eq!(
        body(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true),
        Body::None
    );
    assert_eq!(
        body(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false
        ),
        Body::Chunked
    );
    assert_eq!(
        body(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false),
        Body::Close
    );
    assert_eq!(body(b"HTTP/1.1 200 OK\r\n\r\n", false), Body::Close);
    assert_eq!(body(b"HTTP/1.1 204 No Content\r\n\r\n", false), Body::None);
    assert_eq!(
        body(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false
        ),
        Body::None
    );
    assert_eq!(body(b"HTTP/1.1 100 Continue\r\n\r\n", false), Body::None);
    assert_eq!(
        body(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", false),
        Body::None
    );
    assert!(
        response(b"HTTP/1.1 200 OK\r\n\r\n", false)
            .unwrap()
            .unwrap()
            .3,
        "close-delimited"
    );
    assert!(
        response(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false)
            .unwrap()
            .unwrap()
            .3
    );
    assert!(
        !response(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n", false)
            .unwrap()
            .unwrap()
            .3
    );
    for bad in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
    ] {
        assert!(
            response(bad, false).is_err(),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(response(b"HTTP/1.1 200 OK\r\nContent-Le", false), Ok(None));
    let mut slots = header_slots();
    let head = parse_response(
        b"HTTP/1.1 200 OK\r\nConnection: x-a\r\nX-A: 1\r\nKeep-Alive: 5\r\nTransfer-Encoding: chunked\r\nServer: s\r\n\r\n",
        &mut slots,
        MAX,
        false,
    )
    .unwrap()
    .unwrap();
    let mut out = Vec::new();
    write_response_head(&mut out, &head, true);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 200 OK\r\nServer: s\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
}

/// Runs a decoder over `input` split at `cuts`; (body bytes, rest) or the
/// error.
fn decode_split(body: Body, input: &[u8], cuts: &[usize]) -> Result<(usize, bool), FramingError> {
    let mut dec = BodyDecoder::new(body);
    let mut taken = 0;
    let mut pos = 0;
    let mut bounds: Vec<usize> = cuts.to_vec();
    bounds.push(input.len());
    for end in bounds {
        if end < pos {
            continue;
        }
        let n = dec.advance(&input[pos..end])?;
        taken += n;
        if n < end - pos {
            return Ok((taken, dec.is_done()));
        }
        pos = end;
    }
    Ok((taken, dec.is_done()))
}

const TAIL: &[u8] = b"GET /next HTTP/1.1\r\n\r\n";

#[test]
fn chunked_valid_at_every_split() {
    let valid: &[&[u8]] = &[
        b"0\r\n\r\n",
        b"5\r\nhello\r\n0\r\n\r\n",
        b"5;ext=1\r\nhello\r\n0\r\n\r\n",
        b"5 ;ext\r\nhello\r\n0\r\n\r\n",
        b"A\r\n0123456789\r\n00\r\n\r\n",
        b"1\r\nx\r\n0\r\nTrailer-A: v\r\nB: w x\r\n\r\n",
        b"18\r\nGET /fake HTTP/1.1\r\n\r\nab\r\n0\r\n\r\n",
    ];
    for body in valid {
        let mut input = body.to_vec();
        input.extend_from_slice(TAIL);
        for cut in 0..=input.len() {
            let r = decode_split(Body::Chunked, &input, &[cut]);
            assert_eq!(
                r,
                Ok((body.len(), true)),
                "{} split at {cut}",
                String::from_utf8_lossy(body)
            );
        }
        // Byte by byte.
        let cuts: Vec<usize> = (1..input.len()).collect();
        assert_eq!(
            decode_split(Body::Chunked, &input, &cuts),
            Ok((body.len(), true))
        );
    }
    // Content-Length: exactly N bytes, the rest is the next request.
    let mut input = b"hello".to_vec();
    input.extend_from_slice(TAIL);
    for cut in 0..=input.len() {
        assert_eq!(decode_split(Body::Length(5), &input, &[cut]), Ok((5, true)));
    }
    // Close-delimited: everything, never done.
    assert_eq!(
        decode_split(Body::Close, &input, &[3]),
        Ok((input.len(), false))
    );
    assert!(BodyDecoder::new(Body::None).is_done());
}

#[test]
fn chunked_invalid_at_every_split() {
    use FramingError as E;
    let invalid: &[(&[u8], E)] = &[
        (b"zz\r\n{}\r\n0\r\n\r\n", E::ChunkSize),
        (b"\r\n", E::ChunkSize),
        (b"-1\r\n", E::ChunkSize),
        (b"0x5\r\nhello\r\n", E::ChunkSize),
        (b"5\nhello\r\n", E::ChunkSize),
        (b"5\r\rhello\r\n", E::ChunkLine),
        (b"5\r\nhelloXX0\r\n\r\n", E::ChunkDataEnd),
        (b"5\r\nhello\n0\r\n\r\n", E::ChunkDataEnd),
        (b"5\r\nhello\r\r", E::ChunkDataEnd),
        (b"11111111111111111\r\n", E::ChunkSizeTooLarge),
        (b"5;a\x00b\r\n", E::ChunkLine),
        (b"0\r\nBad Trailer: x\r\n\r\n", E::Trailer),
        (b"0\r\n: x\r\n\r\n", E::Trailer),
        (b"0\r\nA: x\n\r\n", E::Trailer),
        (b"0\r\n\rX", E::Trailer),
    ];
    for (input, e) in invalid {
        for cut in 0..=input.len() {
            assert_eq!(
                decode_split(Body::Chunked, input, &[cut]),
                Err(*e),
                "{} split at {cut}",
                String::from_utf8_lossy(input)
            );
        }
    }
    let mut long_ext = b"1;".to_vec();
    long_ext.extend(std::iter::repeat_n(b'a', MAX_CHUNK_EXT + 1));
    assert_eq!(
        BodyDecoder::new(Body::Chunked).advance(&long_ext),
        Err(E::ChunkExtension)
    );
    let mut long_trailer = b"0\r\nA: ".to_vec();
    long_trailer.extend(std::iter::repeat_n(b'a', MAX_TRAILERS));
    assert_eq!(
        BodyDecoder::new(Body::Chunked).advance(&long_trailer),
        Err(E::TrailersTooLarge)
    );
}

#[test]
fn request_heads_at_every_split() {
    // A head is complete only with its last byte, whatever came before.
    let raw: &[u8] =
        b"POST /api/v1/orders?x=1 HTTP/1.1\r\nHost: shop\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
    let head_len = raw.len() - 2;
    for cut in 0..raw.len() {
        let r = framing(&raw[..cut]);
        if cut < head_len {
            assert_eq!(r, Ok(None), "cut {cut}");
        } else {
            assert_eq!(r.unwrap().unwrap().0, head_len);
        }
    }
}

#[test]
fn targets() {
    assert_eq!(split_target("/a/b?c=d"), Some(("/a/b", Some("c=d"), None)));
    assert_eq!(split_target("/"), Some(("/", None, None)));
    assert_eq!(
        split_target("http://Shop:8080/x?y"),
        Some(("/x", Some("y"), Some("Shop:8080")))
    );
    assert_eq!(split_target("http://shop"), Some(("/", None, Some("shop"))));
    assert_eq!(
        split_target("http://shop?q"),
        Some(("/", Some("q"), Some("shop")))
    );
    for bad in [
        "*",
        "shop:443",
        "ftp://x/",
        "http:///x",
        "http://u@x/",
        "/caf\u{e9}",
    ] {
        assert_eq!(split_target(bad), None, "{bad}");
    }
}

/// A small xorshift generator: the random tests are reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_input_never_panics() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Mutations of valid messages find deeper paths than pure noise.
    let seeds: &[&[u8]] = &[
        b"POST /a?b HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\nConnection: x, close\r\n\r\n5;e\r\nhello\r\n0\r\nT: v\r\n\r\n",
        b"GET http://h/p HTTP/1.0\r\nContent-Length: 3\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    ];
    const ALPHABET: &[u8] = b"\r\n :;,0123456789abcdefABCDEF\t\x00\x7f\xffGETPOST/HTTP1.chunked";
    for i in 0..20_000 {
        let mut input = seeds[i % seeds.len()].to_vec();
        for _ in 0..(rng.next() % 8) {
            let pos = (rng.next() as usize) % (input.len() + 1);
            let b = ALPHABET[(rng.next() as usize) % ALPHABET.len()];
            match rng.next() % 3 {
                0 if pos < input.len() => input[pos] = b,
                1 => input.insert(pos, b),
                _ if pos < input.len() => {
                    input.remove(pos);
                }
                _ => {}
            }
        }
        if i % 5 == 0 {
            input = (0..(rng.next() % 200)).map(|_| rng.next() as u8).collect();
        }
        let mut slots = header_slots();
        if let Ok(Some(head)) = parse_request(&input, &mut slots, 512) {
            let mut out = Vec::new();
            write_request_head(&mut out, &head, "/", None, None);
            let _ = split_target(head.target);
            let mut dec = BodyDecoder::new(head.body);
            let rest = &input[head.len..];
            let cut = (rng.next() as usize) % (rest.len() + 1);
            if let Ok(n) = dec.advance(&rest[..cut]) {
                assert!(n <= cut);
                let _ = dec.advance(&rest[cut..]);
            }
        }
        let mut slots = header_slots();
        if let Ok(Some(head)) = parse_response(&input, &mut slots, 512, i % 2 == 0) {
            let mut out = Vec::new();
            write_response_head(&mut out, &head, i % 3 == 0);
        }
        let mut dec = BodyDecoder::new(Body::Chunked);
        let _ = dec.advance(&input);
    }
}
