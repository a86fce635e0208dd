//! The server name of a TLS ClientHello, read from the first bytes of a
//! connection without decrypting anything, and the check against allowed
//! names.
//!
//! Only as much is parsed as needed: TLS records of type handshake, whose
//! fragments are joined (a ClientHello may span records), the ClientHello's
//! fixed fields and its extensions up to `server_name` (RFC 6066, type 0)
//! with one `host_name` entry. The input is bounded by the caller
//! ([`MAX_CLIENT_HELLO`]).

use std::sync::Arc;

use meshward_policy::fqdn::{Fqdn, FqdnSelector};

/// The most bytes read while looking for a ClientHello.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024 + 5;

/// Why the first bytes are not an acceptable ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("not a TLS handshake record")]
    NotTls,
    #[error("first handshake message is not a ClientHello")]
    NotClientHello,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
}

/// Parsing progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// More bytes are needed.
    Incomplete,
    /// The whole ClientHello was read; its server name, if it sent one.
    Complete(Option<String>),
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.buf.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<usize, HelloError> {
        Ok(self.take(1, what)?[0] as usize)
    }
    fn u16(&mut self, what: &'static str) -> Result<usize, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u8(what)?;
        self.take(n, what)
    }
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u16(what)?;
        self.take(n, what)
    }
}

/// Parses the first bytes of a connection.
pub fn parse_client_hello(input: &[u8]) -> Result<Hello, HelloError> {
    if input.len() > MAX_CLIENT_HELLO {
        return Err(HelloError::TooLarge);
    }
    // Join handshake fragments from consecutive records.
    let mut hs = Vec::new();
    let mut rest = input;
    loop {
        if rest.len() < 5 {
            if !rest.is_empty() && rest[0] != 0x16 {
                return Err(HelloError::NotTls);
            }
            return Ok(Hello::Incomplete);
        }
        if rest[0] != 0x16 || rest[1] != 0x03 {
            return Err(HelloError::NotTls);
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if len == 0 || len > 16 * 1024 {
            return Err(HelloError::Malformed("record length"));
        }
        if rest.len() < 5 + len {
            return Ok(Hello::Incomplete);
        }
        hs.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
        if hs.len() >= 4 {
            if hs[0] != 1 {
                return Err(HelloError::NotClientHello);
            }
            let body = u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize;
            if body + 4 > MAX_CLIENT_HELLO {
                return Err(HelloError::TooLarge);
            }
            if hs.len() >= body + 4 {
                return client_hello_sni(&hs[4..body + 4]).map(Hello::Complete);
            }
        }
    }
}

fn client_hello_sni(body: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader { buf: body };
    r.take(2 + 32, "version and random")?;
    r.vec8("session id")?;
    r.vec16("cipher suites")?;
    r.vec8("compression methods")?;
    if r.buf.is_empty() {
        return Ok(None); // no extensions
    }
    let mut exts = Reader {
        buf: r.vec16("extensions")?,
    };
    while !exts.buf.is_empty() {
        let ty = exts.u16("extension type")?;
        let data = exts.vec16("extension data")?;
        if ty != 0 {
            continue;
        }
        let mut list = Reader {
            buf: Reader { buf: data }.vec16("server name list")?,
        };
        while !list.buf.is_empty() {
            let kind = list.u8("server name type")?;
            let name = list.vec16("server name")?;
            if kind == 0 {
                let name = std::str::from_utf8(name)
                    .map_err(|_| HelloError::Malformed("server name is not ASCII"))?;
                return Ok(Some(name.to_owned()));
            }
        }
        return Ok(None);
    }
    Ok(None)
}

/// The server names allowed on a port (`toPorts[].serverNames`).
#[derive(Debug, Clone, Default)]
pub struct SniRuleSet {
    allowed: Vec<(FqdnSelector, Arc<str>)>,
    policies: Arc<str>,
}

/// The verdict on a TLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniVerdict {
    Allowed(Arc<str>),
    /// No allowed name matched (or the ClientHello had no name).
    Denied(Arc<str>),
}

impl SniRuleSet {
    /// Allowed names (selectors), each with the policy granting it.
    pub fn new(allowed: impl IntoIterator<Item = (FqdnSelector, String)>) -> Self {
        let allowed: Vec<(FqdnSelector, Arc<str>)> = allowed
            .into_iter()
            .map(|(s, p)| (s, Arc::from(p)))
            .collect();
        let mut names: Vec<&str> = allowed.iter().map(|(_, p)| &**p).collect();
        names.sort_unstable();
        names.dedup();
        let policies = names.join(", ").into();
        SniRuleSet { allowed, policies }
    }

    pub fn check(&self, sni: Option<&str>) -> SniVerdict {
        let name = sni.and_then(|s| Fqdn::parse(s).ok());
        let hit = name
            .as_ref()
            .and_then(|n| self.allowed.iter().find(|(sel, _)| sel.matches(n)));
        match hit {
            Some((_, p)) => SniVerdict::Allowed(p.clone()),
            None => SniVerdict::Denied(self.policies.clone()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal, well-formed ClientHello naming `sni` (None: no SNI
    /// extension), with a padding extension before it.
    pub(crate) fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut exts = Vec::new();
        // padding (type 21) first, so the parser must skip an extension.
        exts.extend_from_slice(&[0, 21, 0, 3, 0, 0, 0]);
        if let Some(name) = sni {
            let n = name.len() as u16;
            exts.extend_from_slice(&0u16.to_be_bytes());
            exts.extend_from_slice(&(n + 5).to_be_bytes());
            exts.extend_from_slice(&(n + 3).to_be_bytes());
            exts.push(0);
            exts.extend_from_slice(&n.to_be_bytes());
            exts.extend_from_slice(name.as_bytes());
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn finds_the_server_name() {
        let hello = client_hello(Some("api.example.test"));
        assert_eq!(
            parse_client_hello(&hello),
            Ok(Hello::Complete(Some("api.example.test".into())))
        );
        assert_eq!(
            parse_client_hello(&client_hello(None)),
            Ok(Hello::Complete(None))
        );
    }

    #[test]
    fn incomplete_until_the_last_byte() {
        let hello = client_hello(Some("a.example"));
        for n in 0..hello.len() {
            assert_eq!(
                parse_client_hello(&hello[..n]),
                Ok(Hello::Incomplete),
                "{n}"
            );
        }
    }

    #[test]
    fn hello_split_over_two_records() {
        let hello = client_hello(Some("split.example"));
        let hs = &hello[5..];
        let (a, b) = hs.split_at(20);
        let mut two = Vec::new();
        for part in [a, b] {
            two.extend_from_slice(&[0x16, 3, 1]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }
        assert_eq!(
            parse_client_hello(&two),
            Ok(Hello::Complete(Some("split.example".into())))
        );
    }

    #[test]
    fn garbage_is_refused_not_panicking() {
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n"),
            Err(HelloError::NotTls)
        );
        let mut hello = client_hello(Some("x.example"));
        hello[5] = 2; // ServerHello
        assert_eq!(parse_client_hello(&hello), Err(HelloError::NotClientHello));
        // Every truncation of the body with consistent outer lengths.
        let good = client_hello(Some("x.example"));
        for cut in 1..(good.len() - 9) {
            let mut h = good.clone();
            h.truncate(good.len() - cut);
            let hs_len = h.len() - 9;
            let rec_len = (h.len() - 5) as u16;
            h[3..5].copy_from_slice(&rec_len.to_be_bytes());
            h[6..9].copy_from_slice(&(hs_len as u32).to_be_bytes()[1..]);
            let _ = parse_client_hello(&h); // must not panic
        }
        let big = vec![0x16; MAX_CLIENT_HELLO + 1];
        assert_eq!(parse_client_hello(&big), Err(HelloError::TooLarge));
    }

    #[test]
    fn names_checked_against_selectors() {
        let set = SniRuleSet::new([
            (
                FqdnSelector::match_name("api.example.test").unwrap(),
                "P".into(),
            ),
            (
                FqdnSelector::match_pattern("*.cdn.test").unwrap(),
                "Q".into(),
            ),
        ]);
        assert_eq!(
            set.check(Some("api.example.test")),
            SniVerdict::Allowed("P".into())
        );
        assert_eq!(
            set.check(Some("API.Example.Test")),
            SniVerdict::Allowed("P".into())
        );
        assert_eq!(
            set.check(Some("img.cdn.test")),
            SniVerdict::Allowed("Q".into())
        );
        assert_eq!(
            set.check(Some("evil.test")),
            SniVerdict::Denied("P, Q".into())
        );
        assert_eq!(set.check(None), SniVerdict::Denied("P, Q".into()));
    }
}
