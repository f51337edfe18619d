//! Fuzz target `key_parser`: the cheap API-key format check, `keygate::keys::PresentedKey::parse`.
//!
//! Input: arbitrary bytes; when they are UTF-8 they are presented as a key, exactly as a
//! request header would carry them. Properties checked (a failed `assert!` is a crash):
//! - parse never panics, and is deterministic (same answer, same error variant, twice);
//! - it agrees with an independent oracle: Ok exactly when the string is 51 bytes, starts
//!   with `pk_test_` or `pk_live_`, and the rest is canonical unpadded URL-safe base64 of
//!   32 bytes (decoded with the `base64` crate, which rejects non-canonical last characters);
//!   a wrong byte length is always `FormatError::Length`;
//! - on Ok, `environment`, `digest` and `hint` do not panic; the environment matches the
//!   prefix, the digest is SHA-256 of the whole string (via `KeyDigest::of`, hex round trip),
//!   and the hint is exactly the last `HINT_LEN` characters, never more of the key;
//! - `Debug` of a parsed key shows the prefix and the hint, never the rest of the body.
//!
//! Independently of UTF-8, the first 33 input bytes (zero-padded) also build a well-formed
//! key the way `NewKey::generate` does (prefix + base64 of 32 bytes), which must parse.

#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use keygate::keys::{
    Environment, FormatError, KeyDigest, PresentedKey, HINT_LEN, KEY_BODY_LEN, KEY_ENTROPY_BYTES, KEY_LEN,
    KEY_PREFIX_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check_presented(text);
    }
    check_generated(data);
});

/// What parse must answer, computed without keygate's code.
fn oracle(text: &str) -> Result<Environment, FormatError> {
    if text.len() != KEY_LEN {
        return Err(FormatError::Length);
    }
    let bytes = text.as_bytes();
    let env = match bytes.get(..KEY_PREFIX_LEN) {
        Some(b"pk_test_") => Environment::Test,
        Some(b"pk_live_") => Environment::Live,
        _ => return Err(FormatError::Prefix),
    };
    match bytes.get(KEY_PREFIX_LEN..).map(|body| URL_SAFE_NO_PAD.decode(body)) {
        Some(Ok(raw)) if raw.len() == KEY_ENTROPY_BYTES => Ok(env),
        _ => Err(FormatError::Body),
    }
}

fn check_presented(text: &str) {
    let first = PresentedKey::parse(text);
    let second = PresentedKey::parse(text);
    let expected = oracle(text);
    match (&first, &second) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.environment(), b.environment(), "parse is not deterministic");
            assert_eq!(a.hint(), b.hint(), "parse is not deterministic");
            assert!(a.digest().ct_eq(&b.digest()), "parse is not deterministic");
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "parse is not deterministic"),
        _ => panic!("parse is not deterministic: {first:?} then {second:?}"),
    }
    match (&first, expected) {
        (Ok(key), Ok(env)) => check_parsed(text, key, env),
        // Which of Prefix/Body is reported first is the parser's choice; Length is not.
        (Err(got), Err(want)) => {
            if want == FormatError::Length || *got == FormatError::Length {
                assert_eq!(*got, want, "wrong error for {text:?}");
            }
        }
        (got, want) => panic!("parse({text:?}) = {got:?}, oracle says {want:?}"),
    }
}

fn check_parsed(text: &str, key: &PresentedKey<'_>, env: Environment) {
    assert_eq!(key.environment(), env);
    assert!(text.starts_with(env.prefix()));

    let hint = key.hint();
    assert_eq!(hint.len(), HINT_LEN, "hint {hint:?} is not {HINT_LEN} bytes");
    assert_eq!(Some(hint), text.get(KEY_LEN - HINT_LEN..), "hint is not the key's tail");

    let digest = key.digest();
    assert!(
        digest.ct_eq(&KeyDigest::of(text)),
        "digest is not SHA-256 of the whole key"
    );
    let hex = digest.to_hex();
    assert_eq!(hex.len(), 64);
    assert_eq!(
        KeyDigest::from_hex(&hex),
        Some(digest),
        "digest hex does not round-trip"
    );

    // The body minus its hint must never be shown; Debug is what logs use.
    let shown = format!("{key:?}");
    let secret = text.get(KEY_PREFIX_LEN..KEY_LEN - HINT_LEN).unwrap_or_default();
    assert!(!shown.contains(secret), "Debug {shown:?} leaks key material");
    assert!(shown.contains(hint));
}

fn check_generated(data: &[u8]) {
    let mut entropy = [0u8; KEY_ENTROPY_BYTES];
    let seed = data.get(1..).unwrap_or_default();
    for (slot, byte) in entropy.iter_mut().zip(seed) {
        *slot = *byte;
    }
    let env = if data.first().is_some_and(|b| b & 1 == 1) {
        Environment::Live
    } else {
        Environment::Test
    };
    let mut key = String::from(env.prefix());
    URL_SAFE_NO_PAD.encode_string(entropy, &mut key);
    assert_eq!(key.len(), KEY_LEN);
    assert_eq!(key.len() - KEY_PREFIX_LEN, KEY_BODY_LEN);
    match PresentedKey::parse(&key) {
        Ok(parsed) => check_parsed(&key, &parsed, env),
        Err(e) => panic!("well-formed key {key:?} rejected: {e:?}"),
    }
}
