//! FQDN names and `toFQDNs` / DNS-rule selectors, as Cilium defines them.
//!
//! - [`Fqdn`]: a validated DNS name, lower-cased and fully qualified (always
//!   ends with the root dot). Parsed from user input ([`Fqdn::parse`]) or
//!   from an uncompressed wire-format name ([`Fqdn::from_wire`]).
//! - [`FqdnPattern`]: a Cilium `matchPattern`, matched label-wise without
//!   regular expressions.
//! - [`FqdnSelector`]: `matchName` (exact after normalisation) or
//!   `matchPattern`.
//! - [`FqdnSet`]: many selectors compiled for fast lookup.
//!
//! # Rules (Cilium compatible)
//!
//! - Names and patterns are lower-cased (ASCII) and made fully qualified
//!   (a trailing dot is added when missing) before matching, so
//!   `API.Example.COM` and `api.example.com.` are the same name.
//! - Names consist of labels of `[-a-zA-Z0-9_]`, 1..=63 characters each,
//!   at most 255 octets on the wire (253 characters without the trailing
//!   dot). Patterns may use only `[-a-zA-Z0-9_.*]` and are at most 255
//!   characters as written (Cilium's CRD `MaxLength`).
//! - In a pattern, `*` matches zero or more of `[-a-zA-Z0-9_]` and never a
//!   dot: `*.example.com` matches `a.example.com`, not `example.com` and not
//!   `a.b.example.com`; `api-*.example.com` matches `api-.example.com` and
//!   `api-v1.example.com`.
//! - A pattern made only of stars (`*`, `**`, ...) matches every name,
//!   including the root `.` (Cilium PR #11633: DNS servers ask `NS .`). No
//!   other pattern matches the root.
//! - A leading `**.` matches one or more whole labels: `**.example.com`
//!   matches `a.example.com` and `a.b.example.com`, not `example.com`.
//!   `**.` alone matches every name except the root.
//!
//! # Edge-case decisions
//!
//! - `**` anywhere other than a leading `**.` is accepted and means the same
//!   as `*` (within one label), exactly as Cilium's regex translation
//!   (`[-a-zA-Z0-9_]*[-a-zA-Z0-9_]*` = `[-a-zA-Z0-9_]*`) behaves:
//!   `a.**.com` matches `a.b.com` but not `a.b.c.com`. Matching less than a
//!   reader might expect fails closed (the name is denied).
//! - Empty labels (`.a`, `a..b`), `""` and `"."` are rejected, as Cilium's
//!   CRD validation (`^([-a-zA-Z0-9_*]+[.]?)+$`) rejects them. Whitespace
//!   is an invalid character, not trimmed.
//! - Pattern labels longer than 63 characters are accepted (Cilium does not
//!   check them); they simply can match nothing.
//! - A DNS name with a byte outside `[-a-zA-Z0-9_]` in a label (say a space
//!   or `*` from the wire) is not an [`Fqdn`]: parsing fails. In Cilium such
//!   a name matches no selector (not even `*`, whose regex is
//!   `^([-a-zA-Z0-9_]+[.])+$|^[.]$`), so callers treat the error as "no
//!   selector matches".
//!
//! # Cost
//!
//! Matching is label-wise: a pattern is a list of labels, optionally with a
//! `**.` prefix that absorbs the extra leading labels of the name. Each
//! label is compared with a star glob (`seg0*seg1*...*segN`): the first and
//! last segments are anchored, the middle ones are found left to right with
//! `str::find` (two-way search, linear); leftmost placement is optimal for
//! star-only globs, so there is no backtracking. A match costs
//! O(len(name) + len(pattern)).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// Longest label, in octets.
pub const MAX_LABEL_LEN: usize = 63;
/// Longest name on the wire, in octets (RFC 1035), length octets and root included.
pub const MAX_WIRE_LEN: usize = 255;
/// Longest pattern as written, in characters (Cilium's CRD `MaxLength`).
pub const MAX_PATTERN_LEN: usize = 255;

/// Why a DNS name is not a valid [`Fqdn`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FqdnError {
    #[error("empty DNS name (\"\" and \".\" are not valid names)")]
    Empty,
    #[error("invalid character {ch:?} at position {pos} in DNS name: only letters, digits, '-', '_' and '.' are allowed")]
    InvalidChar { ch: char, pos: usize },
    #[error("empty label at position {pos} in DNS name (leading dot or two dots in a row)")]
    EmptyLabel { pos: usize },
    #[error("label at position {pos} in DNS name is {len} characters long, more than 63")]
    LabelTooLong { pos: usize, len: usize },
    #[error("DNS name is {len} octets long on the wire, more than 255")]
    TooLong { len: usize },
    #[error("wire-format DNS name is truncated at offset {offset}")]
    WireTruncated { offset: usize },
    #[error("wire-format DNS name has label type 0x{byte:02x} at offset {offset} (compression pointer or reserved); decompress names before parsing")]
    WireLabelType { byte: u8, offset: usize },
    #[error("invalid byte 0x{byte:02x} at offset {offset} in wire-format DNS name: only letters, digits, '-' and '_' are allowed in labels")]
    WireInvalidByte { byte: u8, offset: usize },
}

/// Why a string is not a valid `matchPattern`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("empty FQDN pattern (\"\" and \".\" are not valid patterns)")]
    Empty,
    #[error("invalid character {ch:?} at position {pos} in FQDN pattern: only letters, digits, '-', '_', '.' and '*' are allowed")]
    InvalidChar { ch: char, pos: usize },
    #[error("empty label at position {pos} in FQDN pattern (leading dot or two dots in a row)")]
    EmptyLabel { pos: usize },
    #[error("FQDN pattern is {len} characters long, more than 255")]
    TooLong { len: usize },
}

/// Why a selector is invalid: its `matchName` or its `matchPattern`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("invalid matchName: {0}")]
    Name(#[from] FqdnError),
    #[error("invalid matchPattern: {0}")]
    Pattern(#[from] PatternError),
}

fn is_label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// A validated DNS name: lower-case, fully qualified (ends with `.`), labels
/// of `[-a-z0-9_]` of 1..=63 octets, at most 255 octets on the wire. The
/// root `.` exists only from the wire ([`Fqdn::from_wire`]) or [`Fqdn::root`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fqdn(String);

impl Fqdn {
    /// Parses a name as a user writes it: any case, trailing dot optional.
    pub fn parse(s: &str) -> Result<Self, FqdnError> {
        if s.is_empty() || s == "." {
            return Err(FqdnError::Empty);
        }
        let mut out = String::with_capacity(s.len() + 1);
        let mut label_start = 0;
        let mut label_len = 0;
        for (pos, ch) in s.chars().enumerate() {
            if ch == '.' {
                if label_len == 0 {
                    return Err(FqdnError::EmptyLabel { pos });
                }
                if label_len > MAX_LABEL_LEN {
                    return Err(FqdnError::LabelTooLong {
                        pos: label_start,
                        len: label_len,
                    });
                }
                label_len = 0;
                label_start = pos + 1;
                out.push('.');
            } else if ch.is_ascii() && is_label_byte(ch as u8) {
                label_len += 1;
                out.push(ch.to_ascii_lowercase());
            } else {
                return Err(FqdnError::InvalidChar { ch, pos });
            }
        }
        if label_len > MAX_LABEL_LEN {
            return Err(FqdnError::LabelTooLong {
                pos: label_start,
                len: label_len,
            });
        }
        if label_len > 0 {
            out.push('.');
        }
        // Presentation "a.b." is one octet shorter than the wire form
        // (1 a 1 b 0): each dot becomes the next label's length octet, plus
        // the first length octet.
        let wire = out.len() + 1;
        if wire > MAX_WIRE_LEN {
            return Err(FqdnError::TooLong { len: wire });
        }
        Ok(Fqdn(out))
    }

    /// Reads one uncompressed wire-format name from the start of `buf`;
    /// returns it and the number of octets it took. Compression pointers are
    /// an error: decompress first (the DNS library does).
    pub fn from_wire(buf: &[u8]) -> Result<(Self, usize), FqdnError> {
        let mut out = String::new();
        let mut off = 0;
        loop {
            let len = *buf
                .get(off)
                .ok_or(FqdnError::WireTruncated { offset: off })?;
            if len == 0 {
                off += 1;
                break;
            }
            if len & 0xC0 != 0 {
                return Err(FqdnError::WireLabelType {
                    byte: len,
                    offset: off,
                });
            }
            let len = usize::from(len);
            // This label plus at least the root octet must fit.
            if off + 1 + len + 1 > MAX_WIRE_LEN {
                return Err(FqdnError::TooLong {
                    len: off + 1 + len + 1,
                });
            }
            let label = buf
                .get(off + 1..off + 1 + len)
                .ok_or(FqdnError::WireTruncated { offset: buf.len() })?;
            for (i, &b) in label.iter().enumerate() {
                if !is_label_byte(b) {
                    return Err(FqdnError::WireInvalidByte {
                        byte: b,
                        offset: off + 1 + i,
                    });
                }
                out.push(char::from(b.to_ascii_lowercase()));
            }
            out.push('.');
            off += 1 + len;
        }
        if out.is_empty() {
            out.push('.');
        }
        Ok((Fqdn(out), off))
    }

    /// The root name `.`.
    pub fn root() -> Self {
        Fqdn(".".to_owned())
    }

    /// Whether this is the root name `.`.
    pub fn is_root(&self) -> bool {
        self.0 == "."
    }

    /// The name in presentation form, lower-case, with the trailing dot.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Labels left to right (`a`, `example`, `com`); none for the root.
    pub fn labels(&self) -> impl DoubleEndedIterator<Item = &str> + '_ {
        let body = if self.is_root() {
            ""
        } else {
            self.0.strip_suffix('.').unwrap_or(&self.0)
        };
        body.split('.').filter(|l| !l.is_empty())
    }

    /// Number of labels (0 for the root).
    pub fn label_count(&self) -> usize {
        if self.is_root() {
            0
        } else {
            self.0.bytes().filter(|&b| b == b'.').count()
        }
    }

    /// The name's proper and improper suffixes from longest to shortest,
    /// each fully qualified: `a.b.c.`, `b.c.`, `c.` (the root has none).
    fn suffixes(&self) -> impl Iterator<Item = &str> + '_ {
        let s = self.0.as_str();
        let root = self.is_root();
        std::iter::once(0)
            .chain(s.match_indices('.').map(|(i, _)| i + 1))
            .filter(move |&i| !root && i < s.len())
            .map(move |i| &s[i..])
    }
}

impl fmt::Display for Fqdn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Fqdn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fqdn({:?})", self.0)
    }
}

impl FromStr for Fqdn {
    type Err = FqdnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Fqdn::parse(s)
    }
}

impl AsRef<str> for Fqdn {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Kind {
    /// Only stars: every name, the root included.
    All,
    /// `labels` match the name's labels one to one; with `subdomains`
    /// (a leading `**.`), the name must have one or more extra labels in
    /// front.
    Labels {
        subdomains: bool,
        labels: Vec<String>,
    },
}

/// A Cilium `matchPattern`. See the [module docs](self) for the rules.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct FqdnPattern {
    /// Normalised text: lower-case; fully qualified unless only stars.
    text: String,
    kind: Kind,
}

impl FqdnPattern {
    /// Parses and normalises a `matchPattern`.
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        if s.is_empty() || s == "." {
            return Err(PatternError::Empty);
        }
        for (pos, ch) in s.chars().enumerate() {
            if !(ch.is_ascii() && (is_label_byte(ch as u8) || ch == '.' || ch == '*')) {
                return Err(PatternError::InvalidChar { ch, pos });
            }
        }
        // Only ASCII from here on: byte positions are character positions.
        if s.len() > MAX_PATTERN_LEN {
            return Err(PatternError::TooLong { len: s.len() });
        }
        let lower = s.to_ascii_lowercase();
        if lower.bytes().all(|b| b == b'*') {
            return Ok(FqdnPattern {
                text: lower,
                kind: Kind::All,
            });
        }
        let body = lower.strip_suffix('.').unwrap_or(&lower);
        let mut labels = Vec::new();
        let mut start = 0;
        for (i, b) in body.bytes().chain(std::iter::once(b'.')).enumerate() {
            if b == b'.' {
                if i == start {
                    return Err(PatternError::EmptyLabel { pos: i });
                }
                labels.push(body[start..i].to_owned());
                start = i + 1;
            }
        }
        let subdomains = labels.first().is_some_and(|l| l == "**");
        if subdomains {
            labels.remove(0);
        }
        Ok(FqdnPattern {
            text: format!("{body}."),
            kind: Kind::Labels { subdomains, labels },
        })
    }

    /// The normalised pattern text (lower-case, fully qualified unless it is
    /// only stars).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern matches every name.
    pub fn matches_all(&self) -> bool {
        self.kind == Kind::All
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &Fqdn) -> bool {
        match &self.kind {
            Kind::All => true,
            Kind::Labels { subdomains, labels } => {
                let n = name.label_count();
                let fits = if *subdomains {
                    n > labels.len()
                } else {
                    n == labels.len()
                };
                // The extra leading labels of a `**.` match are any labels
                // (every label of an Fqdn is non-empty `[-a-z0-9_]`), so
                // compare from the right.
                fits && name
                    .labels()
                    .rev()
                    .zip(labels.iter().rev())
                    .all(|(l, p)| glob_label(p, l))
            }
        }
    }

    /// The fully literal trailing labels (`example.com.` for
    /// `api-*.example.com`), fully qualified; `None` if the last label has a
    /// star or the pattern matches all.
    fn literal_suffix(&self) -> Option<String> {
        let Kind::Labels { labels, .. } = &self.kind else {
            return None;
        };
        let lit = labels.iter().rev().take_while(|l| !l.contains('*')).count();
        if lit == 0 {
            return None;
        }
        let mut s = String::new();
        for l in &labels[labels.len() - lit..] {
            s.push_str(l);
            s.push('.');
        }
        Some(s)
    }
}

/// Matches one label against a glob whose only metacharacter is `*`
/// (zero or more label characters; the label never contains a dot).
/// Leftmost placement of each middle segment is optimal, so one left to
/// right pass decides: O(len(pattern) + len(label)).
fn glob_label(pat: &str, label: &str) -> bool {
    let mut segs = pat.split('*');
    let first = segs.next().unwrap_or("");
    let Some(rest) = label.strip_prefix(first) else {
        return false;
    };
    let mut segs: Vec<&str> = segs.collect();
    let Some(last) = segs.pop() else {
        // No star: the label must be exactly the pattern.
        return rest.is_empty();
    };
    if rest.len() < last.len() {
        return false;
    }
    let Some(mut middle) = rest.strip_suffix(last) else {
        return false;
    };
    for seg in segs {
        match middle.find(seg) {
            Some(i) => middle = &middle[i + seg.len()..],
            None => return false,
        }
    }
    true
}

impl fmt::Display for FqdnPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for FqdnPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FqdnPattern({:?})", self.text)
    }
}

impl FromStr for FqdnPattern {
    type Err = PatternError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FqdnPattern::parse(s)
    }
}

/// One `toFQDNs` / DNS-rule selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FqdnSelector {
    /// `matchName`: exactly this name, after normalisation.
    MatchName(Fqdn),
    /// `matchPattern`.
    MatchPattern(FqdnPattern),
}

impl FqdnSelector {
    /// A `matchName` selector from user input.
    pub fn match_name(s: &str) -> Result<Self, SelectorError> {
        Ok(FqdnSelector::MatchName(Fqdn::parse(s)?))
    }

    /// A `matchPattern` selector from user input.
    pub fn match_pattern(s: &str) -> Result<Self, SelectorError> {
        Ok(FqdnSelector::MatchPattern(FqdnPattern::parse(s)?))
    }

    /// Whether `name` is selected.
    pub fn matches(&self, name: &Fqdn) -> bool {
        match self {
            FqdnSelector::MatchName(n) => n == name,
            FqdnSelector::MatchPattern(p) => p.matches(name),
        }
    }
}

/// Many selectors compiled for lookup: `matchName`s in a hash map,
/// patterns grouped by their literal suffix (`example.com.` for
/// `*.example.com`), looked up once per suffix of the name; patterns
/// without a literal last label are checked one by one.
///
/// [`FqdnSet::matches_any`] returns the lowest index of a matching
/// selector, exactly what a loop over the selectors in order would return.
#[derive(Debug, Clone, Default)]
pub struct FqdnSet {
    selectors: Vec<FqdnSelector>,
    exact: HashMap<Fqdn, usize>,
    by_suffix: HashMap<String, Vec<usize>>,
    general: Vec<usize>,
}

impl FqdnSet {
    /// Compiles `selectors`; indices refer to their order.
    pub fn new(selectors: Vec<FqdnSelector>) -> Self {
        let mut set = FqdnSet {
            selectors: Vec::new(),
            ..Default::default()
        };
        for (i, sel) in selectors.iter().enumerate() {
            match sel {
                FqdnSelector::MatchName(n) => {
                    set.exact.entry(n.clone()).or_insert(i);
                }
                FqdnSelector::MatchPattern(p) => match p.literal_suffix() {
                    Some(suffix) => set.by_suffix.entry(suffix).or_default().push(i),
                    None => set.general.push(i),
                },
            }
        }
        set.selectors = selectors;
        set
    }

    /// The selectors, in order.
    pub fn selectors(&self) -> &[FqdnSelector] {
        &self.selectors
    }

    /// The lowest index of a selector matching `name`, if any.
    pub fn matches_any(&self, name: &Fqdn) -> Option<usize> {
        let mut best = self.exact.get(name).copied();
        let mut consider = |i: usize| {
            if best.is_none_or(|b| i < b) && self.selectors[i].matches(name) {
                best = Some(i);
            }
        };
        for &i in &self.general {
            consider(i);
        }
        for suffix in name.suffixes() {
            if let Some(candidates) = self.by_suffix.get(suffix) {
                for &i in candidates {
                    consider(i);
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests;
