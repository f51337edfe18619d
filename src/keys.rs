//! API key material: generation, the cheap format check, hashing and hints.
//!
//! Owns everything that touches a plaintext key. It does no I/O and knows nothing of
//! the database or the cache; callers get a [`KeyDigest`] and never need the plaintext
//! again. The format and hash rule are the seed's (Python `secrets.token_urlsafe(32)`,
//! SHA-256 hex of the whole string), so keys made by the seed's scripts keep working.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Random bytes in a key body.
pub const KEY_ENTROPY_BYTES: usize = 32;
/// Characters of URL-safe base64 (no padding) that 32 bytes encode to.
pub const KEY_BODY_LEN: usize = 43;
/// Every prefix has this length (`pk_test_`, `pk_live_`).
pub const KEY_PREFIX_LEN: usize = 8;
/// Total length of a well-formed key.
pub const KEY_LEN: usize = KEY_PREFIX_LEN + KEY_BODY_LEN;
/// Characters shown to operators and written to logs in place of a key.
pub const HINT_LEN: usize = 4;

/// The environment a key belongs to; it decides the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Environment {
    Test,
    Live,
}

impl Environment {
    pub fn prefix(self) -> &'static str {
        match self {
            Environment::Test => "pk_test_",
            Environment::Live => "pk_live_",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Test => "test",
            Environment::Live => "live",
        }
    }

    fn from_prefix(prefix: &[u8]) -> Option<Self> {
        match prefix {
            b"pk_test_" => Some(Environment::Test),
            b"pk_live_" => Some(Environment::Live),
            _ => None,
        }
    }
}

impl std::str::FromStr for Environment {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "test" => Ok(Environment::Test),
            "live" => Ok(Environment::Live),
            other => Err(format!("unknown environment `{other}` (expected test or live)")),
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a presented string is not a key. Deliberately coarse: callers answer every
/// variant the same way so a probe learns nothing from the difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("key has the wrong length")]
    Length,
    #[error("key has an unknown prefix")]
    Prefix,
    #[error("key body is not URL-safe base64 of 32 bytes")]
    Body,
}

/// SHA-256 of a whole key string. This is what the cache and the database index on.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    pub fn of(key: &str) -> Self {
        KeyDigest(Sha256::digest(key.as_bytes()).into())
    }

    /// Lowercase hex, the form stored in `api_keys.key_hash`.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(KeyDigest(out))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Constant-time equality, for comparing a stored hash with a computed one.
    pub fn ct_eq(&self, other: &KeyDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A digest is not secret, but a short form keeps logs readable.
        write!(f, "KeyDigest({}…)", &self.to_hex()[..12])
    }
}

/// A presented key that passed the format check. Borrowed: the plaintext is never
/// copied out of the request.
#[derive(Clone, Copy)]
pub struct PresentedKey<'a> {
    raw: &'a str,
    env: Environment,
}

impl<'a> PresentedKey<'a> {
    /// The cheap format check: length, prefix, alphabet and canonical final character.
    /// No hashing and no allocation, so garbage costs next to nothing.
    pub fn parse(raw: &'a str) -> Result<Self, FormatError> {
        let bytes = raw.as_bytes();
        if bytes.len() != KEY_LEN {
            return Err(FormatError::Length);
        }
        let env = Environment::from_prefix(&bytes[..KEY_PREFIX_LEN]).ok_or(FormatError::Prefix)?;
        let body = &bytes[KEY_PREFIX_LEN..];
        if !body.iter().all(|&b| is_url_safe_b64(b)) {
            return Err(FormatError::Body);
        }
        // 32 bytes = 256 bits; 43 characters carry 258, so the last character's two
        // low bits are zero in any canonical encoding.
        if b64_value(body[KEY_BODY_LEN - 1]) & 0b11 != 0 {
            return Err(FormatError::Body);
        }
        Ok(PresentedKey { raw, env })
    }

    pub fn environment(&self) -> Environment {
        self.env
    }

    pub fn digest(&self) -> KeyDigest {
        KeyDigest::of(self.raw)
    }

    pub fn hint(&self) -> &'a str {
        &self.raw[KEY_LEN - HINT_LEN..]
    }
}

impl fmt::Debug for PresentedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PresentedKey({}…{})", self.env.prefix(), self.hint())
    }
}

/// A freshly generated key. The plaintext is handed out once by [`NewKey::reveal`] and
/// never appears in `Debug` output.
pub struct NewKey {
    plaintext: String,
    pub environment: Environment,
    pub digest: KeyDigest,
}

impl NewKey {
    /// 32 bytes from the operating system's CSPRNG.
    pub fn generate(environment: Environment) -> Result<Self, getrandom::Error> {
        let mut entropy = [0u8; KEY_ENTROPY_BYTES];
        getrandom::getrandom(&mut entropy)?;
        let mut plaintext = String::with_capacity(KEY_LEN);
        plaintext.push_str(environment.prefix());
        URL_SAFE_NO_PAD.encode_string(entropy, &mut plaintext);
        let digest = KeyDigest::of(&plaintext);
        Ok(NewKey {
            plaintext,
            environment,
            digest,
        })
    }

    pub fn prefix(&self) -> &'static str {
        self.environment.prefix()
    }

    pub fn hint(&self) -> &str {
        &self.plaintext[KEY_LEN - HINT_LEN..]
    }

    /// The only way to read the plaintext: for showing it once at creation.
    pub fn reveal(&self) -> &str {
        &self.plaintext
    }
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NewKey({}…{})", self.prefix(), self.hint())
    }
}

fn is_url_safe_b64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fn b64_value(b: u8) -> u8 {
    match b {
        b'A'..=b'Z' => b - b'A',
        b'a'..=b'z' => b - b'a' + 26,
        b'0'..=b'9' => b - b'0' + 52,
        b'-' => 62,
        _ => 63,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_KEY: &str = "pk_test_Y4weymaKsDhxAsAbxyYBUsstBfVX5DETxxqpi7nzh3g";
    const SEED_HASH: &str = "d88111145654b48ca4b2e2926444eb651e1d3842781fac06464bc4d05008e489";

    #[test]
    fn seed_key_hashes_to_the_seed_hash() {
        let key = PresentedKey::parse(SEED_KEY).expect("seed key is well-formed");
        assert_eq!(key.digest().to_hex(), SEED_HASH);
        assert_eq!(key.hint(), "zh3g");
        assert_eq!(key.environment(), Environment::Test);
    }

    #[test]
    fn generated_keys_have_the_seed_format() {
        for env in [Environment::Test, Environment::Live] {
            let key = NewKey::generate(env).expect("os rng");
            assert_eq!(key.reveal().len(), KEY_LEN);
            assert!(key.reveal().starts_with(env.prefix()));
            let parsed = PresentedKey::parse(key.reveal()).expect("generated key parses");
            assert!(parsed.digest().ct_eq(&key.digest));
            assert_eq!(parsed.hint(), key.hint());
            let body = &key.reveal()[KEY_PREFIX_LEN..];
            assert_eq!(URL_SAFE_NO_PAD.decode(body).expect("b64").len(), KEY_ENTROPY_BYTES);
        }
    }

    #[test]
    fn generated_keys_differ() {
        let a = NewKey::generate(Environment::Live).expect("rng");
        let b = NewKey::generate(Environment::Live).expect("rng");
        assert_ne!(a.reveal(), b.reveal());
    }

    #[test]
    fn malformed_keys_are_rejected() {
        let cases: &[(&str, FormatError)] = &[
            ("", FormatError::Length),
            ("pk_test_", FormatError::Length),
            (&SEED_KEY[..KEY_LEN - 1], FormatError::Length),
            (
                "pk_prod_Y4weymaKsDhxAsAbxyYBUsstBfVX5DETxxqpi7nzh3g",
                FormatError::Prefix,
            ),
            (
                "PK_TEST_Y4weymaKsDhxAsAbxyYBUsstBfVX5DETxxqpi7nzh3g",
                FormatError::Prefix,
            ),
            ("pk_test_Y4weymaKsDhxAsAbxyYBUsstBfVX5DETxxqpi7nzh+g", FormatError::Body),
            ("pk_test_Y4weymaKsDhxAsAbxyYBUsstBfVX5DETxxqpi7nzh3=", FormatError::Body),
            // Non-canonical final character: low bits set.
            ("pk_test_Y4weymaKsDhxAsAbxyYBUsstBfVX5DETxxqpi7nzh3h", FormatError::Body),
        ];
        for (raw, want) in cases {
            assert_eq!(PresentedKey::parse(raw).err(), Some(*want), "{raw:?}");
        }
        // Multi-byte characters of the right byte length must not panic on slicing.
        let weird = format!("pk_test_{}é", "A".repeat(KEY_BODY_LEN - 2));
        assert_eq!(weird.len(), KEY_LEN);
        assert!(PresentedKey::parse(&weird).is_err());
    }

    #[test]
    fn digest_hex_round_trips_and_compares_in_constant_time() {
        let d = KeyDigest::of(SEED_KEY);
        assert_eq!(KeyDigest::from_hex(&d.to_hex()), Some(d));
        assert!(d.ct_eq(&KeyDigest::from_hex(SEED_HASH).expect("hex")));
        assert!(!d.ct_eq(&KeyDigest::of("other")));
        assert_eq!(KeyDigest::from_hex("zz"), None);
    }

    #[test]
    fn debug_output_never_contains_the_plaintext() {
        let key = NewKey::generate(Environment::Test).expect("rng");
        let shown = format!("{key:?}");
        assert!(!shown.contains(&key.reveal()[KEY_PREFIX_LEN..]));
        let presented = PresentedKey::parse(SEED_KEY).expect("parse");
        assert!(!format!("{presented:?}").contains("Y4wey"));
    }
}
