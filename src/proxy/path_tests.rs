//! Tests of `path`: RFC 3986's examples, the bypass spellings, and random paths checked
//! against an independent model of a lenient upstream router.

use super::*;

#[test]
fn plain_paths_are_borrowed_untouched() {
    for p in [
        "/",
        "/v1/chat/completions",
        "/a/b/",
        "/v1/models/gpt-4o",
        "*",
        "/a.b/c..d/.e",
    ] {
        assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        assert_eq!(normalize(p).as_deref(), Ok(p));
        assert_eq!(lenient_view(p), None, "{p}");
    }
}

#[test]
fn dot_segments_are_removed_as_rfc_3986_says() {
    // §5.2.4's examples, as absolute paths, and the edges of the root.
    for (raw, want) in [
        ("/a/b/c/./../../g", "/a/g"),
        ("/mid/content=5/../6", "/mid/6"),
        ("/x/../admin", "/admin"),
        ("/..", "/"),
        ("/../../admin/keys", "/admin/keys"),
        ("/.", "/"),
        ("/a/.", "/a/"),
        ("/a/b/..", "/a/"),
        ("/a/./b", "/a/b"),
        ("/a//../b", "/a/b"),
        ("/a/.../b", "/a/.../b"),
        ("/v1/./chat/completions", "/v1/chat/completions"),
    ] {
        assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
    }
}

#[test]
fn escapes_of_unreserved_characters_are_decoded_and_others_upper_cased() {
    for (raw, want) in [
        ("/%61dmin", "/admin"),
        ("/%41%7e%2D%5f", "/A~-_"),
        ("/%2e%2e/admin", "/admin"),
        ("/v1/%2E/chat", "/v1/chat"),
        ("/a%2fb", "/a%2Fb"),
        ("/q%3fx", "/q%3Fx"),
        ("/sp%20ace", "/sp%20ace"),
        ("/%25", "/%25"),
        ("/%252e%252e/x", "/%252e%252e/x"),
        ("/caf%C3%A9", "/caf%C3%A9"),
    ] {
        assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
    }
}

#[test]
fn a_percent_that_starts_no_escape_is_refused() {
    // `%%32%65` would decode to `%2e`: a dot to whichever decoder comes next.
    for raw in [
        "/bad%zz",
        "/%",
        "/a/%4",
        "/%e",
        "/%%32%65/admin",
        "/%G0",
        "/%..",
        "/admin%00/x",
        "/a%0d%0Ab",
        "/a%1f",
        "/a%7F",
    ] {
        assert_eq!(normalize(raw), Err(MalformedEscape), "{raw}");
    }
}

#[test]
fn the_lenient_view_merges_slashes_and_decodes_separators() {
    for (normalized, want) in [
        ("//admin/keys", Some("/admin/keys")),
        ("/v1//chat", Some("/v1/chat")),
        ("/admin%2Fkeys", Some("/admin/keys")),
        ("/admin%5Ckeys", Some("/admin/keys")),
        ("/admin\\keys", Some("/admin/keys")),
        ("/public%2F..%2Fadmin", Some("/admin")),
        ("/a\\..\\admin", Some("/admin")),
        ("/v1/..;/admin/keys", Some("/admin/keys")),
        ("/admin;jsessionid=x/keys", Some("/admin/keys")),
        ("/v1/..%3B/admin", Some("/admin")),
        ("/admin;a%2Fb/keys", Some("/admin/b/keys")),
        ("/x/", None),
        ("/x%20y", None),
        ("/%252F", None),
    ] {
        assert_eq!(lenient_view(normalized).as_deref(), want, "{normalized}");
    }
}

/// A lenient router, written independently: every escape decoded once, `/` and `\`
/// (raw or decoded) separate, a `;` (raw or decoded) ends what a segment means, empty
/// and `.` segments vanish, `..` pops.
fn lenient_router(raw: &str) -> Vec<String> {
    let mut decoded = Vec::new();
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let pair = b
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match pair {
            Some(c) if b[i] == b'%' && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit() => {
                decoded.push(if c == b'\\' { b'/' } else { c });
                i += 3;
            }
            _ => {
                decoded.push(if b[i] == b'\\' { b'/' } else { b[i] });
                i += 1;
            }
        }
    }
    let text = String::from_utf8_lossy(&decoded).into_owned();
    let mut out: Vec<String> = Vec::new();
    for seg in text.split('/') {
        match seg.split(';').next().unwrap_or_default() {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s.to_owned()),
        }
    }
    out
}

/// Decodes one segment of keygate's output the same way, without separators.
fn decode_segment(seg: &str) -> String {
    let v = lenient_router(&format!("/{seg}"));
    assert!(
        v.len() <= 1,
        "segment {seg:?} of the view still hides a separator or dot"
    );
    v.into_iter().next().unwrap_or_default()
}

/// A `%` without two hex digits after it, or the escape of a control character.
fn has_malformed_escape(raw: &str) -> bool {
    let b = raw.as_bytes();
    (0..b.len()).any(|i| {
        let hex = b.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit));
        let byte = hex.and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        b[i] == b'%' && byte.is_none_or(|c| c.is_ascii_control())
    })
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[(self.next() % from.len() as u64) as usize]
    }
}

/// What a scope rule matches against (the view, else the normalized path) names the
/// same resource as a lenient router resolves from the path keygate forwards; and
/// normalizing is idempotent and leaves no dot segment and no escaped unreserved byte.
#[test]
fn random_paths_resolve_as_a_lenient_router_resolves_them() {
    const PIECES: &[&str] = &[
        "/", "/", "/", "a", "admin", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "\\", "%61", "%41", "%zz", "%", "~",
        "%7E", "%20", "%25", "%252F", "%2", "é", "-", "_", ";", "%3b", "%3B", "%00", "%0a",
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut refused, mut changed, mut viewed) = (0, 0, 0);
    for _ in 0..20_000 {
        let mut raw = String::from("/");
        for _ in 0..rng.next() % 12 {
            raw.push_str(rng.pick(PIECES));
        }
        let Ok(n) = normalize(&raw).map(Cow::into_owned) else {
            assert!(has_malformed_escape(&raw), "{raw:?} refused without a malformed escape");
            refused += 1;
            continue;
        };
        changed += usize::from(n != raw);
        assert!(
            !has_malformed_escape(&raw),
            "{raw:?} has a malformed escape but was taken"
        );
        assert!(n.starts_with('/'), "{raw:?} -> {n:?}");
        assert_eq!(normalize(&n).as_deref(), Ok(n.as_str()), "not idempotent on {raw:?}");
        // Where strict and lenient routers agree on the separators, normalizing means
        // the same to both. (Where they do not, `/a\..` or `/a//..`, keygate forwards
        // the normalized path, so the upstream never sees the raw one.)
        let lower = raw.to_ascii_lowercase();
        let strict_agrees = !raw.contains('\\') && !raw.contains("//") && !raw.contains(';');
        if strict_agrees && !lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%3b") {
            assert_eq!(
                lenient_router(&n),
                lenient_router(&raw),
                "normalizing changed the meaning of {raw:?}"
            );
        }
        for seg in n.split('/') {
            assert!(seg != "." && seg != "..", "{raw:?} -> {n:?} keeps a dot segment");
        }
        let nb = n.as_bytes();
        for (i, _) in n.match_indices('%') {
            if let (Some(h), Some(l)) = (nb.get(i + 1).and_then(|c| hex(*c)), nb.get(i + 2).and_then(|c| hex(*c))) {
                assert!(
                    !is_unreserved(h * 16 + l),
                    "{raw:?} -> {n:?} keeps an escaped unreserved byte"
                );
                assert!(
                    !nb[i + 1].is_ascii_lowercase() && !nb[i + 2].is_ascii_lowercase(),
                    "{n:?}"
                );
            }
        }
        let view = lenient_view(&n);
        viewed += usize::from(view.is_some());
        let matched = view.as_deref().unwrap_or(&n);
        assert_eq!(lenient_view(matched), None, "the view of {raw:?} is not a fixed point");
        let segments: Vec<String> = matched
            .split('/')
            .filter(|s| !s.is_empty())
            .map(decode_segment)
            .collect();
        assert_eq!(
            segments,
            lenient_router(&n),
            "{raw:?}: forwarded {n:?}, matched {matched:?}"
        );
    }
    // Each branch must be exercised, or the checks above prove nothing.
    assert!(
        refused > 1_000 && changed > 1_000 && viewed > 1_000,
        "{refused} {changed} {viewed}"
    );
}
