//! Request path normalisation: what the rules match and what the upstream
//! receives are the same string, so no spelling of a path can reach what
//! the rules forbid.
//!
//! # Choices
//!
//! * Percent-encoded *unreserved* characters (`A-Z a-z 0-9 - . _ ~`) are
//!   decoded (RFC 3986 6.2.2.2); other escapes stay encoded with upper-case
//!   hex (6.2.2.1), so `%2e%2e` becomes `..` and is then removed as a dot
//!   segment.
//! * Encoded slashes and backslashes (`%2F`, `%5C`) are **rejected** (400):
//!   servers disagree on whether they separate segments, so no answer here
//!   would be safe for every upstream.
//! * Escapes of control characters (`%00`–`%1F`, `%7F`), raw control
//!   characters, raw backslashes and malformed escapes are rejected.
//! * Repeated slashes are merged (`//admin` → `/admin`), as most servers
//!   resolve them.
//! * Dot segments are removed (RFC 3986 5.2.4). A segment that is `.` or
//!   `..` followed by a `;` parameter (`/..;/admin`) is rejected: some
//!   servers strip the parameter and then treat it as a dot segment.
//! * Paths are case-sensitive: `/API` is not `/api` (and so does not match
//!   rules written for `/api`).
//! * The query is not part of the path (rules match the path only); it is
//!   forwarded unchanged.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Why a path was refused (the request gets 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path does not start with '/'")]
    NotAbsolute,
    #[error("malformed percent-escape at byte {0}")]
    BadEscape(usize),
    #[error("encoded slash or backslash at byte {0}")]
    EncodedSlash(usize),
    #[error("control character at byte {0}")]
    ControlChar(usize),
    #[error("backslash at byte {0}")]
    Backslash(usize),
    #[error("dot segment with a ';' parameter")]
    DotSegmentParameter,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether `raw` is already in normal form, checked without building
/// anything: absolute, no escapes, backslashes or control characters, no
/// empty segment (`//`) and no segment starting with a dot (so no dot
/// segment and no `.;` parameter). Such a path is its own normal form;
/// anything else takes the full way.
fn is_plain(raw: &str) -> bool {
    let b = raw.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    let mut prev = 0u8;
    for &c in b {
        match c {
            b'%' | b'\\' | 0..=0x20 | 0x7f => return false,
            b'/' | b'.' if prev == b'/' => return false,
            _ => {}
        }
        prev = c;
    }
    true
}

/// The normalised form of `raw`, the path of a request target (no query):
/// `raw` itself (borrowed, nothing allocated) when it is already normal,
/// the rewritten path otherwise. `*` (the `OPTIONS *` target) is returned
/// as is.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if raw == "*" || is_plain(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    rewrite(raw).map(Cow::Owned)
}

/// The full normalisation (escapes, then segments).
fn rewrite(raw: &str) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // 1. Escapes: decode unreserved, keep the rest (upper-cased hex).
    let bytes = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape(i));
                };
                let v = hi * 16 + lo;
                if v == b'/' || v == b'\\' {
                    return Err(PathError::EncodedSlash(i));
                }
                if v < 0x20 || v == 0x7f {
                    return Err(PathError::ControlChar(i));
                }
                if is_unreserved(v) {
                    decoded.push(v as char);
                } else {
                    let _ = write!(decoded, "%{v:02X}");
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash(i)),
            0..=0x20 | 0x7f => return Err(PathError::ControlChar(i)),
            _ => {
                // Multi-byte UTF-8 is copied whole (the input is a &str).
                let len = utf8_len(b);
                decoded.push_str(&raw[i..i + len]);
                i += len;
            }
        }
    }
    // 2. Segments: merge empty ones, resolve dot segments.
    let trailing_slash = decoded.len() > 1 && decoded.ends_with('/');
    let mut out: Vec<&str> = Vec::new();
    let mut ends_in_dir = trailing_slash;
    for seg in decoded.split('/').filter(|s| !s.is_empty()) {
        ends_in_dir = false;
        match seg {
            "." => ends_in_dir = true,
            ".." => {
                out.pop();
                ends_in_dir = true;
            }
            s if s.starts_with(".;") || s.starts_with("..;") => {
                return Err(PathError::DotSegmentParameter)
            }
            s => out.push(s),
        }
    }
    if trailing_slash {
        ends_in_dir = true;
    }
    let mut path = String::with_capacity(decoded.len());
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if path.is_empty() || ends_in_dir {
        path.push('/');
    }
    Ok(path)
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        let fast = normalize_path(p).map(Cow::into_owned);
        if p != "*" {
            // The borrowed shortcut never changes the outcome.
            assert_eq!(fast, rewrite(p), "{p:?}");
        }
        fast
    }

    #[test]
    fn plain_paths_borrowed_others_rewritten() {
        for p in [
            "/",
            "/api/v1/products/1",
            "/a/b/",
            "/a.b/c..d/e.",
            "/caf\u{e9}",
            "/x;y",
        ] {
            assert!(matches!(normalize_path(p), Ok(Cow::Borrowed(_))), "{p}");
            assert_eq!(rewrite(p).unwrap(), p, "{p}");
        }
        for p in [
            "//a",
            "/a//b",
            "/./a",
            "/a/..",
            "/.well-known",
            "/%61",
            "/a%20b",
        ] {
            assert!(!is_plain(p), "{p}");
        }
    }

    #[test]
    fn shortcut_agrees_with_the_full_way() {
        // Every string of up to 4 characters over an alphabet of the
        // characters normalisation looks at.
        let alphabet = ['/', '.', ';', 'a', '%', '2', 'e', 'f', '\\', ' ', '\u{e9}'];
        let mut paths = vec![String::new()];
        let mut last = paths.clone();
        for _ in 0..4 {
            last = last
                .iter()
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            paths.extend(last.iter().cloned());
        }
        for p in &paths {
            let p = format!("/{p}");
            assert_eq!(
                normalize_path(&p).map(Cow::into_owned),
                rewrite(&p),
                "{p:?}"
            );
        }
    }

    #[test]
    fn plain_paths_unchanged() {
        for p in ["/", "/api/v1/products", "/a/b/", "/x%20y", "/caf\u{e9}"] {
            assert_eq!(n(p).unwrap(), p, "{p}");
        }
    }

    #[test]
    fn dot_segments_removed() {
        assert_eq!(n("/api/v1/../admin").unwrap(), "/api/admin");
        assert_eq!(n("/api/v1/../../admin").unwrap(), "/admin");
        assert_eq!(n("/../../../admin").unwrap(), "/admin");
        assert_eq!(n("/a/./b").unwrap(), "/a/b");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/a/b/.").unwrap(), "/a/b/");
        assert_eq!(n("/a/..").unwrap(), "/");
        // Not dot segments.
        assert_eq!(n("/a/...").unwrap(), "/a/...");
        assert_eq!(n("/a/..b").unwrap(), "/a/..b");
    }

    #[test]
    fn encoded_dots_decoded_then_removed() {
        assert_eq!(n("/api/v1/%2e%2e/admin").unwrap(), "/api/admin");
        assert_eq!(n("/api/v1/%2E%2E/%2E%2E/admin").unwrap(), "/admin");
        assert_eq!(n("/api/v1/.%2e/admin").unwrap(), "/api/admin");
        assert_eq!(n("/%2e/admin").unwrap(), "/admin");
    }

    #[test]
    fn unreserved_decoded_others_kept_uppercase() {
        assert_eq!(n("/%61dmin").unwrap(), "/admin");
        assert_eq!(n("/a%7eb").unwrap(), "/a~b");
        assert_eq!(n("/a%3ab").unwrap(), "/a%3Ab");
        assert_eq!(n("/a%20b").unwrap(), "/a%20b");
    }

    #[test]
    fn slashes_merged() {
        assert_eq!(n("//admin").unwrap(), "/admin");
        assert_eq!(n("/api//v1///x").unwrap(), "/api/v1/x");
        assert_eq!(n("//").unwrap(), "/");
    }

    #[test]
    fn encoded_slashes_rejected() {
        assert_eq!(n("/api%2Fadmin"), Err(PathError::EncodedSlash(4)));
        assert_eq!(n("/api%2fadmin"), Err(PathError::EncodedSlash(4)));
        assert_eq!(n("/api%5cadmin"), Err(PathError::EncodedSlash(4)));
        assert_eq!(n("/api%2F..%2Fadmin"), Err(PathError::EncodedSlash(4)));
    }

    #[test]
    fn control_chars_and_bad_escapes_rejected() {
        assert_eq!(n("/a%00b"), Err(PathError::ControlChar(2)));
        assert_eq!(n("/a%0d%0aX-Evil:1"), Err(PathError::ControlChar(2)));
        assert_eq!(n("/a%7f"), Err(PathError::ControlChar(2)));
        assert_eq!(n("/a\u{0}b"), Err(PathError::ControlChar(2)));
        assert_eq!(n("/a\rb"), Err(PathError::ControlChar(2)));
        assert_eq!(n("/a b"), Err(PathError::ControlChar(2)));
        assert_eq!(n("/a%zz"), Err(PathError::BadEscape(2)));
        assert_eq!(n("/a%2"), Err(PathError::BadEscape(2)));
        assert_eq!(n("/a\\..\\admin"), Err(PathError::Backslash(2)));
        assert_eq!(n("admin"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn dot_segment_parameters_rejected() {
        assert_eq!(n("/api/..;/admin"), Err(PathError::DotSegmentParameter));
        assert_eq!(n("/api/.;x/admin"), Err(PathError::DotSegmentParameter));
        assert_eq!(n("/api/v1;x/y").unwrap(), "/api/v1;x/y");
    }

    #[test]
    fn case_is_kept() {
        assert_eq!(n("/API/v1").unwrap(), "/API/v1");
    }

    #[test]
    fn asterisk_form() {
        assert_eq!(n("*").unwrap(), "*");
    }
}
