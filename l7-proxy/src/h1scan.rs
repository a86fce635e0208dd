//! A second look at HTTP/1 request heads as they arrive, for what hyper
//! accepts silently: it drops `Content-Length` when `Transfer-Encoding` is
//! also sent, and merges identical repeated `Content-Length`s, so the
//! request it hands over no longer shows the ambiguity. This scanner sees
//! the raw bytes (before hyper does), follows message framing the same way
//! (Content-Length, chunked), and records for each head whether its
//! framing was ambiguous. The service takes one record per request, in
//! order (HTTP/1 requests on a connection are served in order).
//!
//! When the scanner cannot follow (an upgrade, an oversized head, bytes it
//! cannot parse, HTTP/2) it stops and records nothing more: hyper's own,
//! stricter checks still apply to everything.

use std::collections::VecDeque;

use crate::decide::BadRequest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    ChunkSize { size: u64, digits: bool, ext: bool },
    ChunkData(u64),
    ChunkDataEnd,
    Trailers { line: usize },
    Stopped,
}

/// Per-connection scanner; see the module docs.
#[derive(Debug)]
pub struct HeadScanner {
    state: State,
    head: Vec<u8>,
    max_head: usize,
    verdicts: VecDeque<Option<BadRequest>>,
}

impl HeadScanner {
    pub fn new(max_head: usize) -> Self {
        HeadScanner {
            state: State::Head,
            head: Vec::new(),
            max_head,
            verdicts: VecDeque::new(),
        }
    }

    /// The framing verdict of the next request, in arrival order: `Some(e)`
    /// ambiguous, `None` clean or not seen.
    pub fn next_request(&mut self) -> Option<BadRequest> {
        self.verdicts.pop_front().flatten()
    }

    /// Bytes from the client, in order.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Stopped => return,
                State::Head => {
                    if self.head.is_empty() {
                        // Empty lines before a request line are ignored.
                        let skip = data
                            .iter()
                            .take_while(|b| matches!(b, b'\r' | b'\n'))
                            .count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                    }
                    let room = self.max_head.saturating_sub(self.head.len());
                    let take = data.len().min(room.max(1));
                    let before = self.head.len();
                    self.head.extend_from_slice(&data[..take]);
                    match self.parse_head() {
                        Some(len) => {
                            data = &data[take.min(len - before)..];
                            self.head.clear();
                        }
                        None if self.head.len() >= self.max_head => self.state = State::Stopped,
                        None => data = &data[take..],
                    }
                }
                State::Body(n) => {
                    let k = (data.len() as u64).min(n);
                    data = &data[k as usize..];
                    self.state = if n == k {
                        State::Head
                    } else {
                        State::Body(n - k)
                    };
                }
                State::ChunkSize { size, digits, ext } => {
                    let b = data[0];
                    data = &data[1..];
                    self.state = match (b, ext) {
                        (b'\n', _) if !digits => State::Stopped,
                        (b'\n', _) if size == 0 => State::Trailers { line: 0 },
                        (b'\n', _) => State::ChunkData(size),
                        (_, true) => State::ChunkSize { size, digits, ext },
                        (b';' | b' ' | b'\t' | b'\r', false) => State::ChunkSize {
                            size,
                            digits,
                            ext: true,
                        },
                        (_, false) => match (b as char).to_digit(16) {
                            Some(d) => match size.checked_mul(16) {
                                Some(s) => State::ChunkSize {
                                    size: s + d as u64,
                                    digits: true,
                                    ext: false,
                                },
                                None => State::Stopped,
                            },
                            None => State::Stopped,
                        },
                    };
                }
                State::ChunkData(n) => {
                    let k = (data.len() as u64).min(n);
                    data = &data[k as usize..];
                    self.state = if n == k {
                        State::ChunkDataEnd
                    } else {
                        State::ChunkData(n - k)
                    };
                }
                State::ChunkDataEnd => {
                    let b = data[0];
                    data = &data[1..];
                    self.state = match b {
                        b'\r' => State::ChunkDataEnd,
                        b'\n' => State::ChunkSize {
                            size: 0,
                            digits: false,
                            ext: false,
                        },
                        _ => State::Stopped,
                    };
                }
                State::Trailers { line } => {
                    let b = data[0];
                    data = &data[1..];
                    self.state = match b {
                        b'\n' if line == 0 => State::Head,
                        b'\n' => State::Trailers { line: 0 },
                        b'\r' => State::Trailers { line },
                        _ => State::Trailers { line: line + 1 },
                    };
                }
            }
        }
    }

    /// Parses the accumulated head; on success records the verdict, sets
    /// the body state and returns the head's length.
    fn parse_head(&mut self) -> Option<usize> {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        let len = match req.parse(&self.head) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return None,
            Err(_) => {
                self.state = State::Stopped;
                return None;
            }
        };
        let mut cl = Vec::new();
        let mut te = false;
        let mut upgrade = req.method == Some("CONNECT");
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                cl.push(h.value);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = true;
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        let verdict = if !cl.is_empty() && te {
            Some(BadRequest::ContentLengthWithTransferEncoding)
        } else if cl.len() > 1 {
            Some(BadRequest::DuplicateContentLength)
        } else {
            None
        };
        self.verdicts.push_back(verdict);
        let length = cl
            .first()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        self.state = if upgrade {
            State::Stopped
        } else if te {
            State::ChunkSize {
                size: 0,
                digits: false,
                ext: false,
            }
        } else {
            match (cl.is_empty(), length) {
                (true, _) | (false, Some(0)) => State::Head,
                (false, Some(n)) => State::Body(n),
                (false, None) => State::Stopped,
            }
        };
        Some(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> Vec<Option<BadRequest>> {
        let mut s = HeadScanner::new(64 * 1024);
        for c in chunks {
            s.feed(c);
        }
        let mut out = Vec::new();
        while !s.verdicts.is_empty() {
            out.push(s.next_request());
        }
        out
    }

    const CLTE: &[u8] = b"POST /a HTTP/1.1\r\nHost: s\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

    #[test]
    fn ambiguous_heads_flagged() {
        assert_eq!(
            scan(&[CLTE]),
            [Some(BadRequest::ContentLengthWithTransferEncoding)]
        );
        assert_eq!(
            scan(&[b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"]),
            [Some(BadRequest::ContentLengthWithTransferEncoding)]
        );
        assert_eq!(
            scan(&[b"POST /a HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab"]),
            [Some(BadRequest::DuplicateContentLength)]
        );
    }

    #[test]
    fn follows_bodies_across_pipelined_requests() {
        let stream: &[u8] = b"GET /1 HTTP/1.1\r\nHost: s\r\n\r\n\
POST /2 HTTP/1.1\r\nContent-Length: 28\r\n\r\nGET /fake HTTP/1.1\r\nX: y\r\n\r\n\
POST /3 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n18;ext=1\r\nGET /fake HTTP/1.1\r\n\r\nab\r\n0\r\nT: v\r\n\r\n\
GET /4 HTTP/1.1\r\n\r\n";
        assert_eq!(scan(&[stream]), [None, None, None, None]);
        // Byte by byte gives the same.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(scan(&bytes), [None, None, None, None]);
        let mut with_bad = stream.to_vec();
        with_bad.extend_from_slice(CLTE);
        let v = scan(&[&with_bad]);
        assert_eq!(v.len(), 5);
        assert_eq!(v[4], Some(BadRequest::ContentLengthWithTransferEncoding));
    }

    #[test]
    fn stops_on_what_it_cannot_follow() {
        assert!(scan(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]).is_empty());
        assert_eq!(
            scan(&[
                b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
                CLTE
            ]),
            [None]
        );
        assert_eq!(
            scan(&[
                b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                CLTE
            ]),
            [None]
        );
        let mut s = HeadScanner::new(32);
        s.feed(&[b'a'; 100]);
        assert_eq!(s.state, State::Stopped);
    }
}
