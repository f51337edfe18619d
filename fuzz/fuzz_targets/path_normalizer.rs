//! Fuzz target `path_normalizer`: `keygate::proxy::path::normalize` and `lenient_view`,
//! which decide the path scope rules see and the upstream receives.
//!
//! Input: arbitrary bytes; when UTF-8 they are a request path (a `/` is put in front when
//! missing, as hyper only hands over origin-form paths), taken as it is and as `http`
//! parses it (what `Uri::path` gives keygate: no query, no fragment). Properties (a failed
//! `assert!` is a crash):
//! - neither function panics, also `lenient_view` on text `normalize` never produced;
//! - `normalize` refuses exactly the paths with a `%` not followed by two hex digits, or
//!   escaping a control character;
//! - its output starts with `/`, is a fixed point, has no `.`/`..` segment, no escaped
//!   unreserved byte and no lower-case escape, and, for a path `http` parsed, is a valid
//!   `http` path again (or keygate would refuse a path the client was right to send);
//! - the path it forwards and the reading scopes are matched against (the lenient view,
//!   else the path) name the same segments as an independent lenient router resolving the
//!   forwarded path; the view is a fixed point of `lenient_view`.

#![no_main]

use keygate::proxy::path::{lenient_view, normalize};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = lenient_view(text);
    let raw = if text.starts_with('/') {
        text.to_owned()
    } else {
        format!("/{text}")
    };
    check(&raw, false);
    if let Ok(parsed) = http::uri::PathAndQuery::try_from(raw.as_str()) {
        check(parsed.path(), true);
    }
});

fn check(raw: &str, parsed: bool) {
    // A `%` without two hex digits, or one escaping a control character.
    let bad_escape = raw.bytes().enumerate().any(|(i, c)| {
        let escaped = raw
            .get(i + 1..i + 3)
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
        c == b'%'
            && escaped
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .is_none_or(|b| b.is_ascii_control())
    });
    let out = match normalize(raw) {
        Err(_) => {
            assert!(bad_escape, "{raw:?} refused, but its escapes are fine");
            return;
        }
        Ok(out) => out.into_owned(),
    };
    assert!(!bad_escape, "{raw:?} has a bad escape but was taken as {out:?}");
    assert!(out.starts_with('/'), "{raw:?} -> {out:?}");
    assert_eq!(
        normalize(&out).as_deref(),
        Ok(out.as_str()),
        "{raw:?} -> {out:?} is not a fixed point"
    );
    assert!(
        !out.split('/').any(|s| s == "." || s == ".."),
        "{raw:?} -> {out:?} keeps a dot segment"
    );
    for esc in escapes(&out) {
        let unreserved = esc.is_ascii_alphanumeric() || b"-._~".contains(&esc);
        assert!(!unreserved, "{raw:?} -> {out:?} keeps an escaped unreserved byte");
    }
    assert!(
        !out.bytes()
            .enumerate()
            .any(|(i, c)| c == b'%' && out[i + 1..i + 3].bytes().any(|h| h.is_ascii_lowercase())),
        "{raw:?} -> {out:?} has a lower-case escape"
    );
    if parsed {
        assert!(
            http::uri::PathAndQuery::try_from(out.as_str()).is_ok(),
            "{raw:?} -> {out:?} is no longer a path"
        );
    }

    let view = lenient_view(&out);
    let matched = view.as_deref().unwrap_or(&out);
    assert_eq!(lenient_view(matched), None, "the view of {raw:?} is not a fixed point");
    let matched_segments: Vec<String> = matched.split('/').filter(|s| !s.is_empty()).flat_map(resolve).collect();
    assert_eq!(
        matched_segments,
        resolve(&out),
        "{raw:?}: forwarded {out:?}, scopes matched {matched:?}"
    );
}

/// The bytes of every `%XX` escape in `s`.
fn escapes(s: &str) -> impl Iterator<Item = u8> + '_ {
    s.match_indices('%')
        .filter_map(|(i, _)| u8::from_str_radix(s.get(i + 1..i + 3)?, 16).ok())
}

/// A lenient router: decode every escape once, split at `/` and `\`, cut each segment
/// at `;`, drop empty and `.` segments, let `..` pop.
fn resolve(path: &str) -> Vec<String> {
    let mut bytes = Vec::with_capacity(path.len());
    let mut rest = path.as_bytes();
    while let Some((&c, tail)) = rest.split_first() {
        let escaped = (c == b'%')
            .then(|| std::str::from_utf8(tail.get(..2)?).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escaped {
            Some(b) => {
                bytes.push(b);
                rest = &tail[2..];
            }
            None => {
                bytes.push(c);
                rest = tail;
            }
        }
    }
    let text = String::from_utf8_lossy(&bytes).replace('\\', "/");
    text.split('/')
        .map(|s| s.split(';').next().unwrap_or_default())
        .fold(Vec::new(), |mut out, seg| {
            match seg {
                "" | "." => {}
                ".." => {
                    out.pop();
                }
                s => out.push(s.to_owned()),
            }
            out
        })
}
