//! Key values and their `wg` text form.
//!
//! The types wrap the x25519 types that `boringtun` re-exports
//! (`boringtun::x25519`, i.e. x25519-dalek 2), so a key from here goes
//! straight into `boringtun::noise::Tunn::new` without conversion.
//!
//! The text form is what `wg genkey`/`wg pubkey` print: standard base64 with
//! padding, 44 characters for 32 bytes. Parsing is as strict as wireguard-tools
//! (`key_from_base64`): exactly 44 characters, one trailing `=`, and no stray
//! bits in the last character, so a key has exactly one spelling and two
//! spellings of one key can never compare unequal.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use boringtun::x25519;
use rand_core::OsRng;
use zeroize::Zeroizing;

/// Length of a key in bytes.
const KEY_LEN: usize = 32;
/// Length of a key in `wg` base64: 32 bytes -> 43 data characters + one `=`.
pub(crate) const KEY_LEN_BASE64: usize = 44;

/// Why a string is not a `wg` base64 key. Messages name the problem, never the
/// key material (a rejected string may be a damaged private key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseKeyError {
    #[error(
        "expected {KEY_LEN_BASE64} base64 characters (a 32-byte key, as `wg` prints it), \
         found {found}"
    )]
    Length { found: usize },
    #[error(
        "invalid character {found:?} at position {position}: a key is standard base64 \
         (A-Z, a-z, 0-9, '+', '/') ending in one '='"
    )]
    Alphabet { position: usize, found: char },
    #[error("the last character must be the padding '=' (a 32-byte key encodes to 43 characters plus '=')")]
    Padding,
    #[error("the last data character has stray low bits set: not the canonical encoding of any 32-byte key")]
    NonCanonical,
}

/// Decodes a `wg` base64 key, checking the shape first so the error says
/// what is wrong rather than what the decoder tripped over.
fn decode_key(s: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, ParseKeyError> {
    let found = s.chars().count();
    if found != KEY_LEN_BASE64 {
        return Err(ParseKeyError::Length { found });
    }
    for (position, c) in s.chars().enumerate() {
        let ok = if position == KEY_LEN_BASE64 - 1 {
            c == '=' || c.is_ascii_alphanumeric() || c == '+' || c == '/'
        } else {
            c.is_ascii_alphanumeric() || c == '+' || c == '/'
        };
        if !ok {
            return Err(ParseKeyError::Alphabet { position, found: c });
        }
    }
    // All 44 characters are ASCII from here on.
    if !s.ends_with('=') {
        return Err(ParseKeyError::Padding);
    }
    let decoded = Zeroizing::new(
        STANDARD
            .decode(s.as_bytes())
            .map_err(|_| ParseKeyError::NonCanonical)?,
    );
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    if decoded.len() != KEY_LEN {
        // Unreachable after the checks above (44 chars with one '=' is always
        // 32 bytes), but a wrong length must never turn into a panic.
        return Err(ParseKeyError::Length { found });
    }
    out.copy_from_slice(&decoded);
    Ok(out)
}

/// A node's WireGuard public key: what peers are configured with and what the
/// agent publishes. `Display`/`FromStr` use the `wg` base64 form.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(x25519::PublicKey);

impl PublicKey {
    /// Parses the `wg` base64 form (44 characters). Surrounding whitespace is
    /// not accepted: trim input read from files or annotations first.
    pub fn from_wg_base64(s: &str) -> Result<Self, ParseKeyError> {
        let bytes = decode_key(s)?;
        Ok(Self(x25519::PublicKey::from(*bytes)))
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        self.0.as_bytes()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0.as_bytes()))
    }
}

/// Shows the base64 form: a public key is not secret, and the `wg` spelling is
/// what an operator compares against.
impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = ParseKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_wg_base64(s)
    }
}

impl From<x25519::PublicKey> for PublicKey {
    fn from(k: x25519::PublicKey) -> Self {
        Self(k)
    }
}

impl From<PublicKey> for x25519::PublicKey {
    fn from(k: PublicKey) -> Self {
        k.0
    }
}

/// A node's key pair. The secret is zeroed on drop (x25519-dalek's
/// `StaticSecret` does that) and never shown by `Debug`.
#[derive(Clone)]
pub struct NodeKey {
    secret: x25519::StaticSecret,
    public: PublicKey,
}

impl NodeKey {
    /// A fresh key from the OS RNG, clamped as `wg genkey` clamps, so the
    /// stored file is byte-for-byte the kind of thing `wg genkey` writes.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new(x25519::StaticSecret::random_from_rng(OsRng).to_bytes());
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Self::from_secret(x25519::StaticSecret::from(*bytes))
    }

    /// Wraps an existing secret (e.g. one handed over by a test or a tool).
    pub fn from_secret(secret: x25519::StaticSecret) -> Self {
        let public = PublicKey(x25519::PublicKey::from(&secret));
        Self { secret, public }
    }

    /// Parses a private key in `wg` base64. Crate-private: private keys enter
    /// only through the key store, which checks the file around them.
    pub(crate) fn from_wg_base64_secret(s: &str) -> Result<Self, ParseKeyError> {
        let bytes = decode_key(s)?;
        Ok(Self::from_secret(x25519::StaticSecret::from(*bytes)))
    }

    /// The public half, to publish and to show (`meshward keys show`).
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The secret, for handing to boringtun (`Tunn::new` takes it by value:
    /// clone it). Never log or print it.
    pub fn secret(&self) -> &x25519::StaticSecret {
        &self.secret
    }

    /// The private key in `wg` base64, exactly as `wg genkey` prints it (no
    /// newline). This exists for writing the key file (and for tools that
    /// must hand the key to `wg`); it is the one way the secret leaves this
    /// type in text form, so never log, print or send the result. The buffer
    /// is zeroed when dropped.
    pub fn to_wg_base64_secret(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.secret.as_bytes()))
    }
}

/// Redacts the secret: keys end up in `{:?}` of errors and structs, and that
/// must never put the private key into a log.
impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey")
            .field("public", &self.public)
            .field("secret", &format_args!("<redacted>"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7748 section 6.1, Alice: private key `a` and X25519(a, 9), in base64.
    const RFC_SECRET: &str = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=";
    const RFC_PUBLIC: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";

    #[test]
    fn rfc7748_vector_via_base64() {
        let key = NodeKey::from_wg_base64_secret(RFC_SECRET).unwrap();
        assert_eq!(key.public().to_string(), RFC_PUBLIC);
        assert_eq!(*key.to_wg_base64_secret(), RFC_SECRET);
    }

    #[test]
    fn parse_errors_name_the_problem() {
        assert_eq!(
            PublicKey::from_wg_base64("abc"),
            Err(ParseKeyError::Length { found: 3 })
        );
        assert_eq!(
            PublicKey::from_wg_base64(&format!(" {}", &RFC_PUBLIC[1..])),
            Err(ParseKeyError::Alphabet {
                position: 0,
                found: ' '
            })
        );
        let mut urlsafe = RFC_PUBLIC.to_string();
        urlsafe.replace_range(10..11, "-");
        assert_eq!(
            PublicKey::from_wg_base64(&urlsafe),
            Err(ParseKeyError::Alphabet {
                position: 10,
                found: '-'
            })
        );
        // '=' in the middle is not part of the alphabet there.
        let mut mid = RFC_PUBLIC.to_string();
        mid.replace_range(20..21, "=");
        assert!(matches!(
            PublicKey::from_wg_base64(&mid),
            Err(ParseKeyError::Alphabet { position: 20, .. })
        ));
        // 44 data characters: no padding.
        let nopad = format!("{}A", &RFC_PUBLIC[..43]);
        assert_eq!(
            PublicKey::from_wg_base64(&nopad),
            Err(ParseKeyError::Padding)
        );
        // 'o' -> 'p' keeps the byte value's top bits but sets a stray low bit.
        let stray = format!("{}p=", &RFC_PUBLIC[..42]);
        assert_eq!(
            PublicKey::from_wg_base64(&stray),
            Err(ParseKeyError::NonCanonical)
        );
        // Multi-byte characters are counted as characters, never sliced.
        let wide = "é".repeat(44);
        assert!(matches!(
            PublicKey::from_wg_base64(&wide),
            Err(ParseKeyError::Alphabet { position: 0, .. })
        ));
        assert_eq!(
            PublicKey::from_wg_base64(&"é".repeat(22)),
            Err(ParseKeyError::Length { found: 22 })
        );
    }

    #[test]
    fn public_key_round_trip() {
        let k: PublicKey = RFC_PUBLIC.parse().unwrap();
        assert_eq!(k.to_string(), RFC_PUBLIC);
        assert_eq!(format!("{k:?}"), format!("PublicKey({RFC_PUBLIC})"));
        let x: x25519::PublicKey = k.into();
        assert_eq!(PublicKey::from(x), k);
    }

    #[test]
    fn generated_keys_are_clamped_and_distinct() {
        let a = NodeKey::generate();
        let b = NodeKey::generate();
        assert_ne!(a.public(), b.public());
        let s = a.secret().to_bytes();
        assert_eq!(s[0] & 7, 0);
        assert_eq!(s[31] & 0xc0, 0x40);
        let back = NodeKey::from_wg_base64_secret(&a.to_wg_base64_secret()).unwrap();
        assert_eq!(back.public(), a.public());
    }

    #[test]
    fn debug_redacts_secret() {
        let key = NodeKey::from_wg_base64_secret(RFC_SECRET).unwrap();
        let dbg = format!("{key:?} {key:#?}");
        assert!(!dbg.contains(RFC_SECRET), "{dbg}");
        assert!(!dbg.contains(&RFC_SECRET[..20]), "{dbg}");
        assert!(dbg.contains("<redacted>"));
        assert!(dbg.contains(RFC_PUBLIC));
    }
}
