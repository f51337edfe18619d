//! Header rules of the proxy: where keys are read from, what is stripped in each
//! direction, what is added for the upstream, and the rate-limit headers for clients.
//!
//! Pure functions over `HeaderMap`; no I/O and no policy beyond RFC 9110's.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::error::Reject;
use super::header_text::HeaderText;
use crate::config::{IdentityHeaders, KeySource};
use crate::model::ip_text::IpText;
use crate::model::AuthRecord;

/// RFC 9110 7.6.1 plus the de-facto ones (`keep-alive`, `proxy-connection`). A `static`:
/// each use of a `const` array of `HeaderName`s built and dropped a temporary copy.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including every header that `Connection` names.
/// `Transfer-Encoding` goes too: hyper frames each side itself. So does `Expect`, as in
/// Envoy's default: keygate's server answers `100 Continue` itself, and only once the
/// request is admitted and its body is read for forwarding, so a refused request never
/// invites the body; passed on, it would only make the upstream send a 100 of its own,
/// which hyper's client discards (or a 417 from one that supports no expectations).
///
/// Runs twice per request, so the common case (`Connection: keep-alive`, nothing else
/// hop-by-hop) is one pass over the names and one hashed removal, and the other names a
/// `Connection` header lists are removed by `&str` (no `HeaderName` is built for them).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Which fixed names are present, in one pass: an upstream's response carries
    // `Connection: keep-alive` nearly always, and removing all nine names by hash when
    // only one or two are there cost more than the rest of the function.
    let mut present = 0u16;
    for k in h.keys() {
        if let Some(i) = hop_index(k.as_str()) {
            present |= 1 << i;
        }
    }
    if present & 1 != 0 {
        // `Connection` (index 0) names more headers to drop. The tokens are copied out
        // first: removing needs the map mutably. A stack buffer covers every real
        // `Connection` header; a longer one goes to the heap.
        let len: usize = h.get_all(header::CONNECTION).iter().map(|v| v.len() + 1).sum();
        let mut stack = [0u8; 256];
        let mut heap = Vec::new();
        let buf = match stack.get_mut(..len) {
            Some(buf) => buf,
            None => {
                heap.resize(len, 0);
                &mut heap[..]
            }
        };
        let mut at = 0;
        for v in h.get_all(header::CONNECTION) {
            let v = v.as_bytes();
            if let Some(dst) = buf.get_mut(at..at + v.len() + 1) {
                let (text, comma) = dst.split_at_mut(v.len());
                text.copy_from_slice(v);
                comma.fill(b',');
            }
            at += v.len() + 1;
        }
        for token in buf.split(|b| *b == b',') {
            if let Ok(name) = std::str::from_utf8(token) {
                let name = name.trim();
                // `keep-alive` (the usual token) and the other fixed names go below; a
                // hashed removal here would look them up a second time.
                let fixed = HOP_BY_HOP.iter().any(|n| n.as_str().eq_ignore_ascii_case(name));
                if !name.is_empty() && !fixed {
                    h.remove(name);
                }
            }
        }
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            h.remove(n);
        }
    }
    if present & (1 << HOP_BY_HOP.len()) != 0 {
        h.remove(header::TRANSFER_ENCODING);
    }
    if present & (1 << (HOP_BY_HOP.len() + 1)) != 0 {
        h.remove(header::EXPECT);
    }
}

/// The position of a hop-by-hop name in [`HOP_BY_HOP`] (`Transfer-Encoding` and
/// `Expect` just past it). A `match` on the text, because it compiles to a switch on
/// the length and one compare, where comparing `HeaderName`s against the array cost
/// eight compares a header.
fn hop_index(name: &str) -> Option<usize> {
    Some(match name {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "upgrade" => 7,
        "transfer-encoding" => HOP_BY_HOP.len(),
        "expect" => HOP_BY_HOP.len() + 1,
        _ => return None,
    })
}

/// Reads the key from the first configured source that is present.
/// Missing everywhere: `MissingKey`. Present but not a usable single value (wrong
/// scheme, repeated, not text): `InvalidKey`, like an unknown key.
pub fn extract_key<'a>(h: &'a HeaderMap, sources: &[KeySource]) -> Result<&'a str, Reject> {
    for source in sources {
        let name = match source {
            KeySource::Bearer => &header::AUTHORIZATION,
            KeySource::Header(n) => n,
        };
        let mut values = h.get_all(name).iter();
        let Some(first) = values.next() else { continue };
        if values.next().is_some() {
            return Err(Reject::InvalidKey);
        }
        let text = first.to_str().map_err(|_| Reject::InvalidKey)?.trim();
        let key = match source {
            KeySource::Bearer => bearer_token(text).ok_or(Reject::InvalidKey)?,
            KeySource::Header(_) => text,
        };
        if key.is_empty() {
            return Err(Reject::MissingKey);
        }
        return Ok(key);
    }
    Err(Reject::MissingKey)
}

fn bearer_token(v: &str) -> Option<&str> {
    let (scheme, rest) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// Removes every client copy of the identity headers, in any spelling an upstream
/// framework might fold together (`X_Keygate_Key_Id` is `x-keygate-key-id` to many).
pub fn strip_identity(h: &mut HeaderMap, ids: &IdentityHeaders) {
    let names = [&ids.organization_id, &ids.key_id, &ids.plan, &ids.scopes];
    // One pass over the names first: clients almost never send any of these.
    if !h.keys().any(|k| names.contains(&k) || k.as_str().contains('_')) {
        return;
    }
    for n in names {
        h.remove(n);
    }
    let spoofed: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .filter(|k| {
            let folded = k.as_str().replace('_', "-");
            names.iter().any(|n| n.as_str() == folded)
        })
        .cloned()
        .collect();
    for n in spoofed {
        h.remove(n);
    }
}

pub fn add_identity(h: &mut HeaderMap, ids: &IdentityHeaders, rec: &AuthRecord, text: &mut HeaderText) {
    if let Some(v) = text.uuid(rec.organization_id) {
        h.insert(ids.organization_id.clone(), v);
    }
    if let Some(v) = text.uuid(rec.key_id) {
        h.insert(ids.key_id.clone(), v);
    }
    h.insert(ids.plan.clone(), HeaderValue::from_static(rec.plan.as_str()));
    // Scopes were validated to be comma-free tokens; a set holding a byte a header value
    // cannot carry (non-ASCII, control) is skipped whole. The joined text is interned for
    // the process's life, so the header borrows it: no join or copy per request.
    let joined = rec.scopes_joined();
    if joined.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)) {
        h.insert(ids.scopes.clone(), HeaderValue::from_static(joined));
    }
}

/// Removes the headers that carried the client's key, so it stops at keygate.
pub fn strip_key(h: &mut HeaderMap, sources: &[KeySource]) {
    for s in sources {
        match s {
            KeySource::Bearer => h.remove(header::AUTHORIZATION),
            KeySource::Header(n) => h.remove(n),
        };
    }
}

/// `X-Forwarded-For` gains the peer; `-Proto` and `-Host` describe the client's view.
pub fn set_forwarded(h: &mut HeaderMap, peer: IpAddr, host: Option<HeaderValue>, text: &mut HeaderText) {
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    let value = text.value(|b| {
        // As before this buffer: a prior value that is not text is dropped, not copied.
        for prior in h.get_all(&XFF).iter().filter(|v| v.to_str().is_ok()) {
            b.extend_from_slice(prior.as_bytes());
            b.extend_from_slice(b", ");
        }
        b.extend_from_slice(IpText::new(peer).as_bytes());
    });
    if let Some(v) = value {
        h.insert(XFF, v);
    }
    h.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
    match host {
        Some(v) => h.insert(HeaderName::from_static("x-forwarded-host"), v),
        None => h.remove(HeaderName::from_static("x-forwarded-host")),
    };
}

/// The per-minute limit as clients see it. `RateLimit-Reset` is seconds from now (IETF
/// draft); `X-RateLimit-Reset` is a Unix time (the GitHub convention most SDKs read).
#[derive(Debug, Clone, Copy)]
pub struct RateHeaders {
    pub limit: i64,
    pub remaining: i64,
    pub reset_secs: u64,
    pub reset_at_unix: i64,
}

impl RateHeaders {
    pub fn apply(&self, h: &mut HeaderMap, text: &mut HeaderText) {
        // Constants, so the names are checked at compile time, not on every response.
        const NAMES: [HeaderName; 6] = [
            HeaderName::from_static("ratelimit-limit"),
            HeaderName::from_static("ratelimit-remaining"),
            HeaderName::from_static("ratelimit-reset"),
            HeaderName::from_static("x-ratelimit-limit"),
            HeaderName::from_static("x-ratelimit-remaining"),
            HeaderName::from_static("x-ratelimit-reset"),
        ];
        let [limit, remaining, reset, x_limit, x_remaining, x_reset] = NAMES;
        // The two conventions share the limit and remaining values: one write, two
        // reference counts.
        let lim = text.int(self.limit);
        let rem = text.int(self.remaining);
        h.reserve(6);
        h.insert(limit, lim.clone());
        h.insert(remaining, rem.clone());
        h.insert(reset, text.int(i64::try_from(self.reset_secs).unwrap_or(i64::MAX)));
        h.insert(x_limit, lim);
        h.insert(x_remaining, rem);
        h.insert(x_reset, text.int(self.reset_at_unix));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn sources() -> Vec<KeySource> {
        vec![
            KeySource::Bearer,
            KeySource::Header(HeaderName::from_static("x-api-key")),
        ]
    }

    fn record_with(scopes: &[&str]) -> AuthRecord {
        AuthRecord::new(crate::model::test_fields("abcd", scopes))
    }

    #[test]
    fn identity_headers_carry_the_record_and_skip_unsendable_scopes() {
        let ids = IdentityHeaders {
            organization_id: HeaderName::from_static("x-keygate-org-id"),
            key_id: HeaderName::from_static("x-keygate-key-id"),
            plan: HeaderName::from_static("x-keygate-plan"),
            scopes: HeaderName::from_static("x-keygate-scopes"),
        };
        let rec = record_with(&["chat", "embed"]);
        let mut h = HeaderMap::new();
        add_identity(&mut h, &ids, &rec, &mut HeaderText::new());
        assert_eq!(h["x-keygate-scopes"], "chat,embed");
        assert_eq!(h["x-keygate-plan"], "pro");
        assert_eq!(h["x-keygate-key-id"], rec.key_id.to_string().as_str());
        assert_eq!(h["x-keygate-org-id"], rec.organization_id.to_string().as_str());
        for bad in [&["chat", "ünï"][..], &["a\u{7f}b"][..], &["a\nb"][..]] {
            let mut h = HeaderMap::new();
            add_identity(&mut h, &ids, &record_with(bad), &mut HeaderText::new());
            assert!(h.get("x-keygate-scopes").is_none(), "{bad:?}");
            assert!(h.get("x-keygate-plan").is_some());
        }
        let mut h = HeaderMap::new();
        add_identity(&mut h, &ids, &record_with(&["a\tb"]), &mut HeaderText::new());
        assert_eq!(h["x-keygate-scopes"], "a\tb");
    }

    #[test]
    fn key_extraction() {
        let s = sources();
        assert_eq!(extract_key(&map(&[("authorization", "Bearer abc")]), &s), Ok("abc"));
        assert_eq!(extract_key(&map(&[("authorization", "bearer   abc ")]), &s), Ok("abc"));
        assert_eq!(extract_key(&map(&[("x-api-key", "abc")]), &s), Ok("abc"));
        assert_eq!(extract_key(&map(&[]), &s), Err(Reject::MissingKey));
        assert_eq!(
            extract_key(&map(&[("authorization", "Basic abc")]), &s),
            Err(Reject::InvalidKey)
        );
        assert_eq!(
            extract_key(&map(&[("authorization", "Bearer")]), &s),
            Err(Reject::InvalidKey)
        );
        assert_eq!(
            extract_key(&map(&[("x-api-key", "a"), ("x-api-key", "b")]), &s),
            Err(Reject::InvalidKey)
        );
        assert_eq!(extract_key(&map(&[("x-api-key", "")]), &s), Err(Reject::MissingKey));
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "x"),
            ("expect", "100-continue"),
            ("content-type", "application/json"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
    }

    #[test]
    fn the_name_switch_agrees_with_the_list() {
        for (i, n) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_index(n.as_str()), Some(i), "{n}");
        }
        assert_eq!(hop_index(header::TRANSFER_ENCODING.as_str()), Some(HOP_BY_HOP.len()));
        assert_eq!(hop_index(header::EXPECT.as_str()), Some(HOP_BY_HOP.len() + 1));
        assert_eq!(hop_index("content-type"), None);
    }

    #[test]
    fn connection_tokens_are_matched_in_any_case_however_long_the_header() {
        // Split over two `Connection` headers, mixed case, padded, one invalid token.
        let mut h = map(&[
            ("connection", " X-Secret , , bad token"),
            ("connection", "X-OTHER"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("x-kept", "3"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-kept"]);

        // Longer than the stack buffer: the names are still all found.
        let names: Vec<String> = (0..40).map(|i| format!("x-listed-header-{i}")).collect();
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_str(&names.join(", ")).expect("value"),
        );
        for n in &names {
            h.insert(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_static("v"),
            );
        }
        h.insert("x-kept", HeaderValue::from_static("v"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-kept"]);

        // One fixed name alone, in any case, with `Connection` naming a fixed one too.
        let mut h = map(&[("Upgrade", "h2c"), ("x-a", "1")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-a"]);
        let mut h = map(&[
            ("connection", "Keep-Alive, TE"),
            ("keep-alive", "5"),
            ("te", "x"),
            ("x-a", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-a"]);

        // Nothing hop-by-hop at all: the map is untouched.
        let mut h = map(&[("content-type", "text/plain"), ("x-a", "1")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn rate_headers_carry_both_conventions() {
        let mut h = HeaderMap::new();
        let rate = RateHeaders {
            limit: 60,
            remaining: 0,
            reset_secs: 17,
            reset_at_unix: 1_700_000_017,
        };
        rate.apply(&mut h, &mut HeaderText::new());
        for (name, want) in [
            ("ratelimit-limit", "60"),
            ("ratelimit-remaining", "0"),
            ("ratelimit-reset", "17"),
            ("x-ratelimit-limit", "60"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "1700000017"),
        ] {
            assert_eq!(h[name], want, "{name}");
        }
    }

    #[test]
    fn identity_spoofs_are_stripped_in_every_spelling() {
        let ids = crate::config::Config::from_env(&|n| (n == "DATABASE_URL").then(|| "postgres://h/d".into()))
            .expect("defaults")
            .identity_headers;
        let mut h = map(&[
            ("x-keygate-key-id", "spoof"),
            ("X-Keygate-Organization-Id", "spoof"),
            ("x_keygate_plan", "enterprise"),
            ("x-keygate-scopes", "admin"),
            ("x-keygate-scopes", "admin2"),
            ("x-other", "kept"),
        ]);
        strip_identity(&mut h, &ids);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn forwarded_headers_append_the_peer() {
        let mut h = map(&[("x-forwarded-for", "1.2.3.4")]);
        set_forwarded(
            &mut h,
            "10.0.0.1".parse().expect("ip"),
            Some(HeaderValue::from_static("api.example")),
            &mut HeaderText::new(),
        );
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example");
        let mut h = map(&[("x-forwarded-for", "1.2.3.4"), ("x-forwarded-for", "5.6.7.8")]);
        set_forwarded(&mut h, "2001:db8::1".parse().expect("ip"), None, &mut HeaderText::new());
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 5.6.7.8, 2001:db8::1");
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, "192.0.2.1".parse().expect("ip"), None, &mut HeaderText::new());
        assert_eq!(h["x-forwarded-for"], "192.0.2.1");
    }
}
