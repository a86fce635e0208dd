//! HTTP rules as CiliumNetworkPolicy's `toPorts[].rules.http` defines them,
//! compiled for matching.
//!
//! * `method`, `path`, `host`: regular expressions matched against the
//!   whole value (anchored as `^(?:…)$`). The path is the normalised one
//!   ([`crate::path`]); the host is the request's authority (`Host` header
//!   or HTTP/2 `:authority`), lower-cased, port included when the client
//!   sent one. The method is case-sensitive.
//! * `headers`: each entry is `Name` (the header must be present) or
//!   `Name value` / `Name: value` (present with exactly that value), as
//!   Cilium splits it at the first space and trims the colon.
//! * `headerMatches`: `{name, value}` — the header must be present with
//!   exactly `value` (only present when `value` is absent); a mismatch
//!   means the rule does not match (so the request is denied unless
//!   another rule allows it).
//! * A header sent several times matches when any of its values does.
//! * A request is allowed when any rule matches; a rule with no fields
//!   matches every request. A set with no rules allows everything (no
//!   rules on the port).

use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use meshward_policy::crd::HttpRule;
use regex::Regex;

/// A rule that cannot be compiled, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{policy}: http rule {index}: {field}: {message}")]
pub struct RuleError {
    pub policy: String,
    pub index: usize,
    pub field: &'static str,
    pub message: String,
}

#[derive(Debug, Clone)]
enum HeaderCond {
    Present(HeaderName),
    Equals(HeaderName, HeaderValue),
}

impl HeaderCond {
    fn holds(&self, headers: Headers<'_>) -> bool {
        match self {
            HeaderCond::Present(n) => headers.any(n.as_str(), |_| true),
            HeaderCond::Equals(n, v) => headers.any(n.as_str(), |have| have == v.as_bytes()),
        }
    }
}

/// A request's headers: hyper's map (HTTP/2) or the raw fields of an
/// HTTP/1 head as parsed.
#[derive(Debug, Clone, Copy)]
pub enum Headers<'a> {
    Map(&'a HeaderMap),
    Raw(&'a [httparse::Header<'a>]),
}

impl<'a> Headers<'a> {
    /// Whether any value of header `name` (lower-case) satisfies `f`.
    pub fn any(self, name: &str, mut f: impl FnMut(&'a [u8]) -> bool) -> bool {
        match self {
            Headers::Map(m) => m.get_all(name).iter().any(|v| f(v.as_bytes())),
            Headers::Raw(r) => r
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case(name) && f(h.value)),
        }
    }

    /// How many times header `name` (lower-case) is present.
    pub fn count(self, name: &str) -> usize {
        let mut n = 0;
        self.any(name, |_| {
            n += 1;
            false
        });
        n
    }

    /// The first value of header `name` (lower-case).
    pub fn first(self, name: &str) -> Option<&'a [u8]> {
        let mut out = None;
        self.any(name, |v| {
            out = Some(v);
            true
        });
        out
    }
}

/// A compiled `method`/`path`/`host` expression. Expressions that are
/// plain text, or plain text then `.*`, are matched by comparing strings
/// (what the expression means, `^(?:text)$` / `^(?:text.*)$`, without
/// running a regex engine), and so are those whose text also has `.`
/// (any one character but `\n`), such as gRPC's `/pkg.Service/.*`;
/// anything else by the regex.
#[derive(Debug, Clone)]
enum Matcher {
    /// The whole value is this text.
    Exact(Box<str>),
    /// The value starts with this text and the rest has no `\n` (which
    /// `.` does not match).
    Prefix(Box<str>),
    /// Plain text and `.` (any one character but `\n`), the whole value
    /// (`rest` false) or a start whose rest has no `\n` (`rest`: the
    /// expression ended in `.*`).
    Dotted {
        text: Box<str>,
        rest: bool,
    },
    Regex(Regex),
}

/// Plain text ([`is_plain_text`]) with at least one `.`.
fn is_dotted_text(s: &str) -> bool {
    s.contains('.') && s.split('.').all(is_plain_text)
}

/// [`Matcher::Dotted`]'s match.
fn dotted_match(text: &str, v: &str, rest: bool) -> bool {
    let mut i = 0;
    for &t in text.as_bytes() {
        if t == b'.' {
            // One character (not one byte), as the regex's `.`.
            match v[i..].chars().next() {
                Some(c) if c != '\n' => i += c.len_utf8(),
                _ => return false,
            }
        } else {
            // Plain text is ASCII: a byte that equals it is a whole
            // character, so `i` stays on a character boundary.
            if v.as_bytes().get(i) != Some(&t) {
                return false;
            }
            i += 1;
        }
    }
    if rest {
        !v[i..].contains('\n')
    } else {
        i == v.len()
    }
}

/// Characters that stand for themselves in a regular expression outside
/// a class, whatever follows them (a conservative set: the others go to
/// the regex).
fn is_plain_text(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/_-:;=,@!%'\"<>`~& ".contains(&b))
}

impl Matcher {
    fn new(re: &str) -> Result<Matcher, regex::Error> {
        let regex = Regex::new(&format!("^(?:{re})$"))?;
        if is_plain_text(re) {
            return Ok(Matcher::Exact(re.into()));
        }
        if let Some(prefix) = re.strip_suffix(".*") {
            if is_plain_text(prefix) {
                return Ok(Matcher::Prefix(prefix.into()));
            }
            if is_dotted_text(prefix) {
                return Ok(Matcher::Dotted {
                    text: prefix.into(),
                    rest: true,
                });
            }
        }
        if is_dotted_text(re) {
            return Ok(Matcher::Dotted {
                text: re.into(),
                rest: false,
            });
        }
        Ok(Matcher::Regex(regex))
    }

    fn is_match(&self, v: &str) -> bool {
        match self {
            Matcher::Exact(t) => v == &**t,
            Matcher::Prefix(p) => v
                .strip_prefix(&**p)
                .is_some_and(|rest| !rest.contains('\n')),
            Matcher::Dotted { text, rest } => dotted_match(text, v, *rest),
            Matcher::Regex(re) => re.is_match(v),
        }
    }
}

#[derive(Debug, Clone)]
struct CompiledRule {
    method: Option<Matcher>,
    path: Option<Matcher>,
    host: Option<Matcher>,
    headers: Vec<HeaderCond>,
    policy: Arc<str>,
}

/// What a request is matched on.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a str,
    /// Normalised path ([`crate::path::normalize_path`]).
    pub path: &'a str,
    /// Lower-cased authority, if the request had one.
    pub host: Option<&'a str>,
    pub headers: Headers<'a>,
}

/// The verdict on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleVerdict {
    /// Allowed by a rule of this policy (`None`: no rules, allow-all).
    Allowed(Option<Arc<str>>),
    /// No rule matched; the policies whose rules apply here.
    Denied(Arc<str>),
}

/// The HTTP rules of one port, for one direction of one endpoint.
#[derive(Debug, Clone, Default)]
pub struct HttpRuleSet {
    rules: Vec<CompiledRule>,
    /// The distinct policies contributing rules, joined for messages.
    policies: Arc<str>,
    /// With no rules: deny every request instead of allowing it.
    deny_all: bool,
}

fn anchored(
    field: &'static str,
    re: &Option<String>,
    err: &dyn Fn(&'static str, String) -> RuleError,
) -> Result<Option<Matcher>, RuleError> {
    re.as_deref()
        .map(|s| Matcher::new(s).map_err(|e| err(field, e.to_string())))
        .transpose()
}

fn header_name(
    field: &'static str,
    s: &str,
    err: &dyn Fn(&'static str, String) -> RuleError,
) -> Result<HeaderName, RuleError> {
    HeaderName::from_bytes(s.trim().as_bytes())
        .map_err(|_| err(field, format!("{s:?} is not a valid header name")))
}

fn header_value(
    field: &'static str,
    s: &str,
    err: &dyn Fn(&'static str, String) -> RuleError,
) -> Result<HeaderValue, RuleError> {
    HeaderValue::from_str(s).map_err(|_| err(field, format!("{s:?} is not a valid header value")))
}

impl HttpRuleSet {
    /// Compiles rules, each with the name of the policy it came from (as
    /// shown in denials and events).
    pub fn new<'a>(
        rules: impl IntoIterator<Item = (&'a HttpRule, &'a str)>,
    ) -> Result<Self, RuleError> {
        let mut compiled = Vec::new();
        let mut names: Vec<Arc<str>> = Vec::new();
        for (index, (rule, policy)) in rules.into_iter().enumerate() {
            let err = |field, message| RuleError {
                policy: policy.to_owned(),
                index,
                field,
                message,
            };
            let policy: Arc<str> = match names.iter().find(|n| ***n == *policy) {
                Some(n) => n.clone(),
                None => {
                    names.push(policy.into());
                    names[names.len() - 1].clone()
                }
            };
            let mut headers = Vec::new();
            for h in rule.headers.iter().flatten() {
                let h = h.trim();
                match h.split_once(' ') {
                    Some((name, value)) => headers.push(HeaderCond::Equals(
                        header_name("headers", name.trim_end_matches(':'), &err)?,
                        header_value("headers", value.trim_start(), &err)?,
                    )),
                    None => headers.push(HeaderCond::Present(header_name(
                        "headers",
                        h.trim_end_matches(':'),
                        &err,
                    )?)),
                }
            }
            for m in rule.header_matches.iter().flatten() {
                let name = header_name("headerMatches", &m.name, &err)?;
                headers.push(match &m.value {
                    Some(v) => HeaderCond::Equals(name, header_value("headerMatches", v, &err)?),
                    None => HeaderCond::Present(name),
                });
            }
            compiled.push(CompiledRule {
                method: anchored("method", &rule.method, &err)?,
                path: anchored("path", &rule.path, &err)?,
                host: anchored("host", &rule.host, &err)?,
                headers,
                policy,
            });
        }
        let policies = names
            .iter()
            .map(|n| &**n)
            .collect::<Vec<_>>()
            .join(", ")
            .into();
        Ok(HttpRuleSet {
            rules: compiled,
            policies,
            deny_all: false,
        })
    }

    /// The rules of `sets`, in order: the same set [`HttpRuleSet::new`]
    /// gives for their rules concatenated, without compiling anything again
    /// (the compiled expressions are shared).
    pub fn union<'a>(sets: impl IntoIterator<Item = &'a HttpRuleSet>) -> Self {
        let rules: Vec<CompiledRule> = sets
            .into_iter()
            .flat_map(|s| s.rules.iter().cloned())
            .collect();
        let mut names: Vec<&str> = Vec::new();
        for r in &rules {
            if !names.contains(&&*r.policy) {
                names.push(&r.policy);
            }
        }
        let policies = names.join(", ").into();
        HttpRuleSet {
            rules,
            policies,
            deny_all: false,
        }
    }

    /// A set that denies every request, naming `policies` in denials (for
    /// a port with L7 rules where no rule covers the peer: fail closed).
    pub fn deny_all(policies: &str) -> Self {
        HttpRuleSet {
            rules: Vec::new(),
            policies: policies.into(),
            deny_all: true,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The verdict on a request.
    pub fn check(&self, req: &RequestView<'_>) -> RuleVerdict {
        if self.rules.is_empty() {
            if self.deny_all {
                return RuleVerdict::Denied(self.policies.clone());
            }
            return RuleVerdict::Allowed(None);
        }
        let hit = self.rules.iter().find(|r| {
            r.method.as_ref().is_none_or(|re| re.is_match(req.method))
                && r.path.as_ref().is_none_or(|re| re.is_match(req.path))
                && r.host
                    .as_ref()
                    .is_none_or(|re| req.host.is_some_and(|h| re.is_match(h)))
                && r.headers.iter().all(|c| c.holds(req.headers))
        });
        match hit {
            Some(r) => RuleVerdict::Allowed(Some(r.policy.clone())),
            None => RuleVerdict::Denied(self.policies.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use meshward_policy::crd::HeaderMatch;

    use super::*;

    fn rule(method: &str, path: &str) -> HttpRule {
        HttpRule {
            method: Some(method.into()),
            path: Some(path.into()),
            ..Default::default()
        }
    }

    /// The seed example: frontend's rules.
    fn frontend() -> HttpRuleSet {
        let mut orders = rule("POST", "/api/v1/orders");
        orders.header_matches = Some(vec![HeaderMatch {
            name: "Content-Type".into(),
            value: Some("application/json".into()),
        }]);
        let rules = [
            rule("GET", "/api/v1/products.*"),
            orders,
            rule("GET", "/healthz"),
        ];
        HttpRuleSet::new(rules.iter().map(|r| (r, "MeshNetworkPolicy shop/frontend"))).unwrap()
    }

    fn check(set: &HttpRuleSet, method: &str, path: &str, headers: &[(&str, &str)]) -> bool {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let view = RequestView {
            method,
            path,
            host: Some("shop.example"),
            headers: Headers::Map(&map),
        };
        matches!(set.check(&view), RuleVerdict::Allowed(_))
    }

    #[test]
    fn seed_example() {
        let s = frontend();
        assert!(check(&s, "GET", "/api/v1/products", &[]));
        assert!(check(&s, "GET", "/api/v1/products/42", &[]));
        assert!(check(&s, "GET", "/healthz", &[]));
        assert!(!check(&s, "GET", "/healthz/x", &[]), "anchored at the end");
        assert!(
            !check(&s, "GET", "/x/api/v1/products", &[]),
            "anchored at the start"
        );
        assert!(!check(&s, "POST", "/api/v1/products", &[]));
        assert!(!check(&s, "DELETE", "/api/v1/orders", &[]));
        assert!(
            !check(&s, "get", "/healthz", &[]),
            "methods are case-sensitive"
        );
        assert!(
            !check(&s, "GET", "/API/v1/products", &[]),
            "paths are case-sensitive"
        );
        assert!(!check(&s, "GET", "/admin", &[]));
        assert!(check(
            &s,
            "POST",
            "/api/v1/orders",
            &[("content-type", "application/json")]
        ));
        assert!(!check(
            &s,
            "POST",
            "/api/v1/orders",
            &[("content-type", "text/plain")]
        ));
        assert!(!check(&s, "POST", "/api/v1/orders", &[]));
        // One of several values matching is enough.
        assert!(check(
            &s,
            "POST",
            "/api/v1/orders",
            &[
                ("content-type", "text/plain"),
                ("content-type", "application/json")
            ]
        ));
    }

    #[test]
    fn alternation_is_anchored_as_a_whole() {
        let r = rule("GET|HEAD", "/a|/b");
        let s = HttpRuleSet::new([(&r, "p")]).unwrap();
        assert!(check(&s, "HEAD", "/b", &[]));
        assert!(!check(&s, "GETX", "/a", &[]));
        assert!(!check(&s, "GET", "/bx", &[]));
        assert!(!check(&s, "GET", "/x/a", &[]));
    }

    #[test]
    fn headers_presence_and_value_forms() {
        let r = HttpRule {
            headers: Some(vec![
                "X-Token".into(),
                "X-Mode: strict".into(),
                "X-Env prod".into(),
            ]),
            ..Default::default()
        };
        let s = HttpRuleSet::new([(&r, "p")]).unwrap();
        let all = [
            ("x-token", "anything"),
            ("x-mode", "strict"),
            ("x-env", "prod"),
        ];
        assert!(check(&s, "GET", "/", &all));
        assert!(!check(&s, "GET", "/", &all[1..]));
        assert!(!check(&s, "GET", "/", &[all[0], ("x-mode", "lax"), all[2]]));
        assert!(!check(&s, "GET", "/", &[all[0], all[1], ("x-env", "dev")]));
    }

    #[test]
    fn host_rule() {
        let r = HttpRule {
            host: Some(r"shop\.example".into()),
            ..Default::default()
        };
        let s = HttpRuleSet::new([(&r, "p")]).unwrap();
        assert!(check(&s, "GET", "/", &[]));
        let map = HeaderMap::new();
        let mut v = RequestView {
            method: "GET",
            path: "/",
            host: Some("evil.example"),
            headers: Headers::Map(&map),
        };
        assert!(matches!(s.check(&v), RuleVerdict::Denied(_)));
        v.host = None;
        assert!(matches!(s.check(&v), RuleVerdict::Denied(_)));
    }

    #[test]
    fn empty_rule_matches_all_and_empty_set_allows() {
        let r = HttpRule::default();
        let s = HttpRuleSet::new([(&r, "p")]).unwrap();
        assert!(check(&s, "DELETE", "/anything", &[]));
        let none = HttpRuleSet::new([]).unwrap();
        assert!(none.is_empty());
        assert!(check(&none, "DELETE", "/anything", &[]));
        let deny = HttpRuleSet::deny_all("MeshNetworkPolicy x/p");
        assert!(!check(&deny, "GET", "/", &[]));
        let headers = HeaderMap::new();
        let v = RequestView {
            method: "GET",
            path: "/",
            host: None,
            headers: Headers::Map(&headers),
        };
        assert_eq!(
            deny.check(&v),
            RuleVerdict::Denied("MeshNetworkPolicy x/p".into())
        );
    }

    #[test]
    fn denial_names_every_policy_once() {
        let a = rule("GET", "/a");
        let b = rule("GET", "/b");
        let s = HttpRuleSet::new([(&a, "P1"), (&b, "P2"), (&a, "P1")]).unwrap();
        let map = HeaderMap::new();
        let v = RequestView {
            method: "GET",
            path: "/c",
            host: None,
            headers: Headers::Map(&map),
        };
        assert_eq!(s.check(&v), RuleVerdict::Denied("P1, P2".into()));
        let v = RequestView { path: "/b", ..v };
        assert_eq!(s.check(&v), RuleVerdict::Allowed(Some("P2".into())));
    }

    #[test]
    fn union_is_new_over_the_rules_concatenated() {
        let (a, b, c) = (rule("GET", "/a"), rule("GET", "/b"), rule("POST", "/c"));
        let p1 = HttpRuleSet::new([(&a, "P1"), (&b, "P2")]).unwrap();
        let p2 = HttpRuleSet::new([(&c, "P3"), (&a, "P1")]).unwrap();
        let u = HttpRuleSet::union([&p1, &p2]);
        let whole = HttpRuleSet::new([(&a, "P1"), (&b, "P2"), (&c, "P3"), (&a, "P1")]).unwrap();
        let map = HeaderMap::new();
        for (method, path) in [("GET", "/a"), ("GET", "/b"), ("POST", "/c"), ("GET", "/c")] {
            let v = RequestView {
                method,
                path,
                host: None,
                headers: Headers::Map(&map),
            };
            assert_eq!(u.check(&v), whole.check(&v), "{method} {path}");
        }
        let v = RequestView {
            method: "PUT",
            path: "/a",
            host: None,
            headers: Headers::Map(&map),
        };
        assert_eq!(u.check(&v), RuleVerdict::Denied("P1, P2, P3".into()));
        assert!(HttpRuleSet::union([]).is_empty());
    }

    #[test]
    fn text_matchers_agree_with_the_regex() {
        let patterns = [
            "GET",
            "",
            "/api/v1/products.*",
            "/api/v1/orders",
            ".*",
            "/a-b_c~d:e;f=g,h@i!j%20k&l",
            "/api/v1/products.+",
            "GET|POST",
            "/a.c",
            "/x.*y",
            "(?i)get",
            "/com.example.OrderService/.*",
            "/com.example.OrderService/PlaceOrder",
            ".",
            "/a..*",
            "...",
            "/a.c.+",
            "/a\\.c",
            "/a.c[.]",
        ];
        let values = [
            "",
            "GET",
            "get",
            "POST",
            "/api/v1/products",
            "/api/v1/products/1",
            "/api/v1/products\n",
            "/api/v1/products/\u{e9}",
            "/api/v1/orders",
            "/api/v1/orders/",
            "/a-b_c~d:e;f=g,h@i!j%20k&l",
            "/abc",
            "/a.c",
            "/xzy",
            "x\ny",
            "/com.example.OrderService/PlaceOrder",
            "/comXexample.OrderService/PlaceOrder",
            "/com.example.OrderService/",
            "/com.example.OrderService",
            "/com.example.OrderService/x\ny",
            "/com\nexample.OrderService/x",
            "/a\u{e9}c",
            "/a\u{e9}",
            "/a\nc",
            "/a\u{1f600}\u{e9}",
            "\u{e9}",
            "\n",
            "a",
            "ab",
            "\u{e9}\u{e9}\u{e9}",
            "/a.c.",
        ];
        let mut text = 0;
        for p in patterns {
            let m = Matcher::new(p).unwrap();
            text += usize::from(!matches!(m, Matcher::Regex(_)));
            let re = Regex::new(&format!("^(?:{p})$")).unwrap();
            for v in values {
                assert_eq!(m.is_match(v), re.is_match(v), "{p:?} on {v:?} ({m:?})");
            }
        }
        // GET, "", products.*, orders, .*, the punctuation one, /a.c, the
        // two OrderService ones, ".", "/a..*", "...".
        assert_eq!(text, 12);
    }

    #[test]
    fn bad_rules_name_the_field() {
        let r = rule("GET", "/a(");
        let e = HttpRuleSet::new([(&r, "P")]).unwrap_err();
        assert_eq!((e.field, e.index, e.policy.as_str()), ("path", 0, "P"));
        let r = HttpRule {
            headers: Some(vec!["Bad Name\u{1}: x".into()]),
            ..Default::default()
        };
        let e = HttpRuleSet::new([(&r, "P")]).unwrap_err();
        assert_eq!(e.field, "headers");
    }
}
