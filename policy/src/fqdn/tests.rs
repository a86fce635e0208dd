use super::*;

fn name(s: &str) -> Fqdn {
    Fqdn::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

fn pat(s: &str) -> FqdnPattern {
    FqdnPattern::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

// ---------------------------------------------------------------- Fqdn

#[test]
fn fqdn_normalises_case_and_trailing_dot() {
    for (input, want) in [
        ("example.com", "example.com."),
        ("example.com.", "example.com."),
        ("API.Example.COM", "api.example.com."),
        ("a", "a."),
        ("_dmarc.x-y.example", "_dmarc.x-y.example."),
        ("123.45", "123.45."),
    ] {
        let n = name(input);
        assert_eq!(n.as_str(), want, "{input:?}");
        assert_eq!(n.to_string(), want);
        assert_eq!(input.parse::<Fqdn>().unwrap(), n);
    }
    assert_eq!(name("A.b.C"), name("a.B.c."));
}

#[test]
fn fqdn_labels_and_counts() {
    let n = name("a.b.example.com");
    assert_eq!(n.labels().collect::<Vec<_>>(), ["a", "b", "example", "com"]);
    assert_eq!(n.label_count(), 4);
    assert_eq!(
        n.suffixes().collect::<Vec<_>>(),
        ["a.b.example.com.", "b.example.com.", "example.com.", "com."]
    );
    let r = Fqdn::root();
    assert!(r.is_root());
    assert_eq!(r.label_count(), 0);
    assert_eq!(r.labels().count(), 0);
    assert_eq!(r.suffixes().count(), 0);
}

#[test]
fn fqdn_rejects_invalid_input_with_clear_errors() {
    let cases: &[(&str, FqdnError, &str)] = &[
        ("", FqdnError::Empty, "empty DNS name (\"\" and \".\" are not valid names)"),
        (".", FqdnError::Empty, "empty DNS name (\"\" and \".\" are not valid names)"),
        (
            "exa mple.com",
            FqdnError::InvalidChar { ch: ' ', pos: 3 },
            "invalid character ' ' at position 3 in DNS name: only letters, digits, '-', '_' and '.' are allowed",
        ),
        ("*.example.com", FqdnError::InvalidChar { ch: '*', pos: 0 }, "invalid character '*' at position 0"),
        ("bücher.de", FqdnError::InvalidChar { ch: 'ü', pos: 1 }, "invalid character 'ü' at position 1"),
        (" a.com", FqdnError::InvalidChar { ch: ' ', pos: 0 }, "at position 0"),
        (
            ".example.com",
            FqdnError::EmptyLabel { pos: 0 },
            "empty label at position 0 in DNS name (leading dot or two dots in a row)",
        ),
        ("a..com", FqdnError::EmptyLabel { pos: 2 }, "empty label at position 2"),
        ("a.com..", FqdnError::EmptyLabel { pos: 6 }, "empty label at position 6"),
    ];
    for (input, err, msg) in cases {
        let got = Fqdn::parse(input).unwrap_err();
        assert_eq!(&got, err, "{input:?}");
        assert!(got.to_string().contains(msg), "{input:?}: {got}");
    }

    let long_label = format!("a.{}.com", "x".repeat(64));
    let e = Fqdn::parse(&long_label).unwrap_err();
    assert_eq!(e, FqdnError::LabelTooLong { pos: 2, len: 64 });
    assert_eq!(
        e.to_string(),
        "label at position 2 in DNS name is 64 characters long, more than 63"
    );
    // Last label too long, without a trailing dot.
    assert_eq!(
        Fqdn::parse(&"y".repeat(64)).unwrap_err(),
        FqdnError::LabelTooLong { pos: 0, len: 64 }
    );
    assert!(Fqdn::parse(&"y".repeat(63)).is_ok());
}

#[test]
fn fqdn_total_length_limit_is_255_wire_octets() {
    // 4 labels of 63 = 252 + 3 dots... build exactly 253 characters.
    let l63 = "a".repeat(63);
    let l61 = "b".repeat(61);
    let ok = format!("{l63}.{l63}.{l63}.{l61}"); // 63*3 + 61 + 3 = 253
    assert_eq!(ok.len(), 253);
    let n = name(&ok);
    assert_eq!(n.as_str().len(), 254);
    assert_eq!(name(&format!("{ok}.")), n);

    let too_long = format!("{l63}.{l63}.{l63}.{l61}b"); // 254 characters
    let e = Fqdn::parse(&too_long).unwrap_err();
    assert_eq!(e, FqdnError::TooLong { len: 256 });
    assert_eq!(
        e.to_string(),
        "DNS name is 256 octets long on the wire, more than 255"
    );
}

#[test]
fn fqdn_from_wire() {
    let wire = b"\x03WWW\x07Example\x03com\x00rest";
    let (n, used) = Fqdn::from_wire(wire).unwrap();
    assert_eq!(n.as_str(), "www.example.com.");
    assert_eq!(used, 17);

    let (r, used) = Fqdn::from_wire(b"\x00").unwrap();
    assert!(r.is_root());
    assert_eq!(r.as_str(), ".");
    assert_eq!(used, 1);

    let cases: &[(&[u8], FqdnError, &str)] = &[
        (
            b"",
            FqdnError::WireTruncated { offset: 0 },
            "wire-format DNS name is truncated at offset 0",
        ),
        (
            b"\x03www",
            FqdnError::WireTruncated { offset: 4 },
            "truncated at offset 4",
        ),
        (
            b"\x03ww",
            FqdnError::WireTruncated { offset: 3 },
            "truncated at offset 3",
        ),
        (
            b"\x03www\xc0\x0c",
            FqdnError::WireLabelType {
                byte: 0xc0,
                offset: 4,
            },
            "label type 0xc0 at offset 4 (compression pointer or reserved)",
        ),
        (
            b"\x40",
            FqdnError::WireLabelType {
                byte: 0x40,
                offset: 0,
            },
            "label type 0x40",
        ),
        (
            b"\x03w w\x00",
            FqdnError::WireInvalidByte {
                byte: b' ',
                offset: 2,
            },
            "invalid byte 0x20 at offset 2 in wire-format DNS name",
        ),
        (
            b"\x01*\x00",
            FqdnError::WireInvalidByte {
                byte: b'*',
                offset: 1,
            },
            "invalid byte 0x2a",
        ),
        (
            b"\x01.\x00",
            FqdnError::WireInvalidByte {
                byte: b'.',
                offset: 1,
            },
            "invalid byte 0x2e",
        ),
    ];
    for (input, err, msg) in cases {
        let got = Fqdn::from_wire(input).unwrap_err();
        assert_eq!(&got, err, "{input:?}");
        assert!(got.to_string().contains(msg), "{input:?}: {got}");
    }

    // 255 octets is the limit: 4 labels (63,63,63,61) = 64*3 + 62 + 1 = 255.
    let mut ok = Vec::new();
    for len in [63u8, 63, 63, 61] {
        ok.push(len);
        ok.extend(std::iter::repeat_n(b'a', usize::from(len)));
    }
    ok.push(0);
    assert_eq!(ok.len(), 255);
    let (n, used) = Fqdn::from_wire(&ok).unwrap();
    assert_eq!(used, 255);
    // Wire and text parsing agree.
    assert_eq!(name(n.as_str()), n);

    let mut too_long = ok.clone();
    too_long[192] = 62; // the last label grows by one
    too_long.insert(193, b'a');
    assert_eq!(
        Fqdn::from_wire(&too_long).unwrap_err(),
        FqdnError::TooLong { len: 256 }
    );
}

// ---------------------------------------------------------------- patterns

/// (pattern, name, matches?)
const TRUTH: &[(&str, &str, bool)] = &[
    // `*` within a label: zero or more of [-a-zA-Z0-9_], never a dot.
    ("*.example.com", "a.example.com", true),
    ("*.example.com", "example.com", false),
    ("*.example.com", "a.b.example.com", false),
    ("*.example.com", "a-b_c9.example.com.", true),
    ("*.example.com", "a.example.org", false),
    ("*.example.com", "aexample.com", false),
    ("api-*.example.com", "api-.example.com", true),
    ("api-*.example.com", "api-v1.example.com", true),
    ("api-*.example.com", "api.example.com", false),
    ("api-*.example.com", "x.api-v1.example.com", false),
    ("*-api.example.com", "eu-api.example.com", true),
    ("a*b*c.example.com", "abc.example.com", true),
    ("a*b*c.example.com", "axxbyyc.example.com", true),
    ("a*b*c.example.com", "acb.example.com", false),
    ("a*a.example.com", "a.example.com", false), // prefix and suffix must not overlap
    ("a*a.example.com", "aa.example.com", true),
    ("example.*", "example.com", true),
    ("example.*", "example.co.uk", false),
    ("*.*", "a.b", true),
    ("*.*", "a.b.c", false),
    ("*.*", "a", false),
    ("sub.*.example.com", "sub.x.example.com", true),
    ("sub.*.example.com", "sub.x.y.example.com", false),
    // No stars: an exact name, after normalisation.
    ("example.com", "example.com", true),
    ("example.com", "www.example.com", false),
    // Case-insensitive, trailing dot optional, on both sides.
    ("*.EXAMPLE.com.", "Www.Example.COM", true),
    ("Api-*.Example.Com", "API-V2.example.com.", true),
    // Only stars: every name, the root included.
    ("*", "example.com", true),
    ("*", "a.b.c.d.e", true),
    ("*", "x", true),
    ("**", "a.b.c", true),
    ("***", "x", true),
    // A leading `**.`: one or more whole labels.
    ("**.example.com", "a.example.com", true),
    ("**.example.com", "a.b.example.com", true),
    ("**.example.com", "a.b.c.d.example.com", true),
    ("**.example.com", "example.com", false),
    ("**.example.com", "a.example.org", false),
    ("**.example.com", "aexample.com", false),
    ("**.*.example.com", "a.b.example.com", true),
    ("**.*.example.com", "a.example.com", false),
    ("**.api-*.example.com", "x.y.api-1.example.com", true),
    ("**.api-*.example.com", "api-1.example.com", false),
    ("**.", "a", true),
    ("**.", "a.b.c", true),
    // `**` elsewhere means `*` (one label), as Cilium's regex does.
    ("a.**.com", "a.b.com", true),
    ("a.**.com", "a.b.c.com", false),
    ("**foo.com", "foo.com", true),
    ("**foo.com", "xfoo.com", true),
    ("**foo.com", "x.foo.com", false),
    ("foo**.com", "foo-bar.com", true),
];

#[test]
fn pattern_truth_table() {
    for &(p, n, want) in TRUTH {
        let p = pat(p);
        let n = name(n);
        assert_eq!(p.matches(&n), want, "{p:?} vs {n:?}");
        assert_eq!(reference_match(&p, &n), want, "reference: {p:?} vs {n:?}");
        let sel = FqdnSelector::MatchPattern(p.clone());
        assert_eq!(sel.matches(&n), want);
        let set = FqdnSet::new(vec![sel]);
        assert_eq!(
            set.matches_any(&n),
            want.then_some(0),
            "set: {p:?} vs {n:?}"
        );
    }
}

#[test]
fn root_matches_only_all_star_patterns() {
    let root = Fqdn::root();
    for p in ["*", "**", "*****"] {
        assert!(pat(p).matches(&root), "{p}");
        assert!(pat(p).matches_all());
    }
    for p in ["*.", "**.", "**.*", "*.*", "a*"] {
        assert!(!pat(p).matches(&root), "{p}");
        assert!(!pat(p).matches_all());
    }
}

#[test]
fn pattern_normalised_text() {
    for (input, want) in [
        ("*.Example.COM", "*.example.com."),
        ("*.example.com.", "*.example.com."),
        ("*", "*"),
        ("**", "**"),
        ("**.", "**."),
        ("**.a", "**.a."),
    ] {
        assert_eq!(pat(input).as_str(), want);
        assert_eq!(input.parse::<FqdnPattern>().unwrap().to_string(), want);
    }
    assert_eq!(pat("*.A.com"), pat("*.a.com."));
}

#[test]
fn pattern_rejects_invalid_input_with_clear_errors() {
    let cases: &[(&str, PatternError, &str)] = &[
        ("", PatternError::Empty, "empty FQDN pattern (\"\" and \".\" are not valid patterns)"),
        (".", PatternError::Empty, "empty FQDN pattern"),
        (
            "*.exam ple.com",
            PatternError::InvalidChar { ch: ' ', pos: 6 },
            "invalid character ' ' at position 6 in FQDN pattern: only letters, digits, '-', '_', '.' and '*' are allowed",
        ),
        (" *.a.com", PatternError::InvalidChar { ch: ' ', pos: 0 }, "at position 0"),
        ("a+.com", PatternError::InvalidChar { ch: '+', pos: 1 }, "invalid character '+'"),
        ("[a].com", PatternError::InvalidChar { ch: '[', pos: 0 }, "invalid character '['"),
        ("a?.com", PatternError::InvalidChar { ch: '?', pos: 1 }, "invalid character '?'"),
        ("a{1,2}.com", PatternError::InvalidChar { ch: '{', pos: 1 }, "invalid character '{'"),
        ("é.com", PatternError::InvalidChar { ch: 'é', pos: 0 }, "invalid character 'é'"),
        ("a/b", PatternError::InvalidChar { ch: '/', pos: 1 }, "invalid character '/'"),
        (
            ".example.com",
            PatternError::EmptyLabel { pos: 0 },
            "empty label at position 0 in FQDN pattern (leading dot or two dots in a row)",
        ),
        ("*..com", PatternError::EmptyLabel { pos: 2 }, "empty label at position 2"),
        ("a.com..", PatternError::EmptyLabel { pos: 6 }, "empty label at position 6"),
        ("..", PatternError::EmptyLabel { pos: 0 }, "empty label at position 0"),
    ];
    for (input, err, msg) in cases {
        let got = FqdnPattern::parse(input).unwrap_err();
        assert_eq!(&got, err, "{input:?}");
        assert!(got.to_string().contains(msg), "{input:?}: {got}");
    }

    let ok = format!("*.{}", "a".repeat(253));
    assert_eq!(ok.len(), 255);
    assert!(FqdnPattern::parse(&ok).is_ok()); // label > 63: accepted, matches nothing
    let too_long = format!("{ok}a");
    let e = FqdnPattern::parse(&too_long).unwrap_err();
    assert_eq!(e, PatternError::TooLong { len: 256 });
    assert_eq!(
        e.to_string(),
        "FQDN pattern is 256 characters long, more than 255"
    );
    assert_eq!(
        FqdnPattern::parse(&"*".repeat(256)).unwrap_err(),
        PatternError::TooLong { len: 256 }
    );
    assert!(FqdnPattern::parse(&"*".repeat(255)).unwrap().matches_all());
}

#[test]
fn selectors() {
    let s = FqdnSelector::match_name("WWW.example.com").unwrap();
    assert_eq!(s, FqdnSelector::MatchName(name("www.example.com.")));
    assert!(s.matches(&name("www.example.com")));
    assert!(!s.matches(&name("example.com")));
    assert!(!s.matches(&name("a.www.example.com")));

    let e = FqdnSelector::match_name("*.example.com").unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid matchName: invalid character '*' at position 0 in DNS name: only letters, digits, '-', '_' and '.' are allowed"
    );
    let e = FqdnSelector::match_pattern("a..b").unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid matchPattern: empty label at position 2 in FQDN pattern (leading dot or two dots in a row)"
    );
    assert!(FqdnSelector::match_pattern("*.example.com")
        .unwrap()
        .matches(&name("x.example.com")));
}

#[test]
fn set_returns_lowest_matching_index() {
    let sels = vec![
        FqdnSelector::match_pattern("**.example.com").unwrap(), // 0
        FqdnSelector::match_name("www.example.com").unwrap(),   // 1
        FqdnSelector::match_pattern("*.example.org").unwrap(),  // 2
        FqdnSelector::match_name("example.org").unwrap(),       // 3
        FqdnSelector::match_pattern("a*.*").unwrap(),           // 4
        FqdnSelector::match_name("example.org").unwrap(),       // 5 (duplicate)
        FqdnSelector::match_pattern("*").unwrap(),              // 6
    ];
    let set = FqdnSet::new(sels);
    assert_eq!(set.selectors().len(), 7);
    for (n, want) in [
        ("www.example.com", Some(0)),
        ("example.com", Some(6)),
        ("x.example.org", Some(2)),
        ("example.org", Some(3)),
        ("abc.net", Some(4)),
        ("zzz", Some(6)),
    ] {
        assert_eq!(set.matches_any(&name(n)), want, "{n}");
    }
    assert_eq!(set.matches_any(&Fqdn::root()), Some(6));
    let empty = FqdnSet::new(Vec::new());
    assert_eq!(empty.matches_any(&name("a.b")), None);
}

// ---------------------------------------------------------------- reference and property tests

/// A deliberately naive, independent matcher over the whole text, with the
/// regex semantics Cilium compiles patterns to (backtracking; fine for the
/// small inputs here).
fn reference_match(p: &FqdnPattern, n: &Fqdn) -> bool {
    fn is_label(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
    }
    fn glob(p: &[u8], n: &[u8]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) => {
                let mut k = 0;
                loop {
                    if glob(rest, &n[k..]) {
                        return true;
                    }
                    if k < n.len() && is_label(n[k]) {
                        k += 1;
                    } else {
                        return false;
                    }
                }
            }
            Some((c, rest)) => n.first() == Some(c) && glob(rest, &n[1..]),
        }
    }
    let text = p.as_str().as_bytes();
    if text.iter().all(|&b| b == b'*') {
        return true;
    }
    if n.is_root() {
        return false;
    }
    let n = n.as_str().as_bytes();
    match text.strip_prefix(b"**.") {
        // ([-a-z0-9_]+\.)+ then the rest: every dot boundary of a valid
        // name ends one or more whole labels.
        Some(rest) => (1..=n.len())
            .filter(|&i| n[i - 1] == b'.')
            .any(|i| glob(rest, &n[i..])),
        None => glob(text, n),
    }
}

/// splitmix64: deterministic, no dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

const LABELS: &[&str] = &[
    "a", "b", "ab", "ba", "api", "api-1", "x_y", "example", "com", "io", "v1", "-",
];

fn random_label(rng: &mut Rng, alphabet: &[u8]) -> String {
    if rng.chance(2) {
        return rng.pick(LABELS).to_owned();
    }
    let len = 1 + rng.below(4);
    (0..len)
        .map(|_| char::from(alphabet[rng.below(alphabet.len())]))
        .collect()
}

fn random_case(rng: &mut Rng, s: &str) -> String {
    s.chars()
        .map(|c| {
            if rng.chance(4) {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

fn random_name(rng: &mut Rng) -> Fqdn {
    let n = 1 + rng.below(5);
    let mut s = (0..n)
        .map(|_| random_label(rng, b"ab-_1"))
        .collect::<Vec<_>>()
        .join(".");
    if rng.chance(2) {
        s.push('.');
    }
    name(&random_case(rng, &s))
}

fn random_pattern(rng: &mut Rng) -> FqdnPattern {
    if rng.chance(40) {
        return pat(&"*".repeat(1 + rng.below(3)));
    }
    let n = 1 + rng.below(4);
    let mut labels: Vec<String> = (0..n)
        .map(|_| match rng.below(4) {
            0 => random_label(rng, b"ab*-_1"),
            1 => rng
                .pick(&["*", "a*", "*b", "a*b", "*-*", "**", "api-*", "*a*"])
                .to_owned(),
            _ => random_label(rng, b"ab-_1"),
        })
        .collect();
    if rng.chance(4) {
        labels.insert(0, "**".to_owned());
    }
    let mut s = labels.join(".");
    if rng.chance(2) {
        s.push('.');
    }
    pat(&random_case(rng, &s))
}

#[test]
fn label_matcher_agrees_with_reference() {
    let mut rng = Rng(1);
    let mut hits = 0;
    for _ in 0..20_000 {
        let p = random_pattern(&mut rng);
        let n = random_name(&mut rng);
        let got = p.matches(&n);
        assert_eq!(got, reference_match(&p, &n), "{p:?} vs {n:?}");
        hits += usize::from(got);
    }
    // The generator must exercise both outcomes.
    assert!(hits > 500, "only {hits} matches");
}

#[test]
fn set_agrees_with_naive_loop() {
    let mut rng = Rng(2);
    for round in 0..300 {
        let count = rng.below(30);
        let sels: Vec<FqdnSelector> = (0..count)
            .map(|_| {
                if rng.chance(3) {
                    FqdnSelector::MatchName(random_name(&mut rng))
                } else {
                    FqdnSelector::MatchPattern(random_pattern(&mut rng))
                }
            })
            .collect();
        let set = FqdnSet::new(sels.clone());
        for _ in 0..100 {
            let n = if rng.chance(4) && count > 0 {
                // Often probe a name some matchName holds.
                match &sels[rng.below(count)] {
                    FqdnSelector::MatchName(n) => n.clone(),
                    FqdnSelector::MatchPattern(_) => random_name(&mut rng),
                }
            } else {
                random_name(&mut rng)
            };
            let naive = sels.iter().position(|s| s.matches(&n));
            assert_eq!(
                set.matches_any(&n),
                naive,
                "round {round}: {n:?} in {sels:?}"
            );
        }
        let naive_root = sels.iter().position(|s| s.matches(&Fqdn::root()));
        assert_eq!(set.matches_any(&Fqdn::root()), naive_root);
    }
}

#[test]
fn no_panics_on_random_bytes() {
    let mut rng = Rng(3);
    let pats: Vec<FqdnPattern> = ["*", "**.a", "a*b*c.*", "**.*.*", "*-*.a"]
        .iter()
        .map(|p| pat(p))
        .collect();
    let set = FqdnSet::new(
        pats.iter()
            .cloned()
            .map(FqdnSelector::MatchPattern)
            .collect(),
    );
    const BIASED: &[u8] = b"aZ9-_.*\x00\x01\x03\x3f\x40\xc0\xff ";
    for i in 0..50_000 {
        let len = if i % 100 == 0 {
            rng.below(2000)
        } else {
            rng.below(300)
        };
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                if rng.chance(2) {
                    BIASED[rng.below(BIASED.len())]
                } else {
                    rng.next() as u8
                }
            })
            .collect();
        let _ = Fqdn::from_wire(&bytes);
        let text = String::from_utf8_lossy(&bytes);
        let _ = FqdnPattern::parse(&text);
        let _ = FqdnSelector::match_name(&text);
        if let Ok(n) = Fqdn::parse(&text) {
            assert!(n.as_str().ends_with('.'));
            assert!(n.as_str().len() <= 254);
            for p in &pats {
                let _ = p.matches(&n);
            }
            let _ = set.matches_any(&n);
        }
        if let Ok((n, used)) = Fqdn::from_wire(&bytes) {
            assert!(used <= bytes.len() && used <= MAX_WIRE_LEN);
            for p in &pats {
                let _ = p.matches(&n);
            }
        }
        if let Ok(p) = FqdnPattern::parse(&text) {
            let _ = p.matches(&name("a.b.c"));
        }
    }
}

#[test]
fn long_adversarial_inputs_match_correctly() {
    // Many stars against a long label that almost matches: a backtracking
    // matcher would take exponential time here (the test would hang rather
    // than pass); the label matcher never retries, so this is immediate.
    let p = pat(&format!("{}b.example.com", "a*".repeat(30)));
    let n = name(&format!("{}.example.com", "a".repeat(63)));
    assert!(!p.matches(&n));
    let hit = name(&format!("{}b.example.com", "a".repeat(62)));
    assert!(p.matches(&hit));
}
