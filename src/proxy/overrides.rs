//! What upstream frameworks take as the request's method or path besides the request
//! line: method-override headers and `_method` (Express's method-override, Rails, Laravel,
//! Symfony, Google APIs), and `X-Original-URL`/`X-Rewrite-URL` (IIS URL Rewrite, older
//! Symfony and Zend). A scope rule checked against the request line alone would let
//! `POST /public` with `X-Original-URL: /admin` reach the admin route.
//!
//! Owns reading those spellings and removing the path ones; which scopes a method needs
//! is `routes`. Method overrides are kept (clients use them to send PATCH or DELETE
//! through proxies that refuse those) and checked instead: a request needs the scopes
//! of its own method and of every method it names.

use http::header::{HeaderMap, HeaderName};
use http::Method;

/// Headers some upstream reads as the request's path. Only a front proxy may set them,
/// and keygate is the front: a client's copy is removed (an operator who needs one sets
/// it in `[upstream.headers]`, which is applied after).
static PATH_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
];

/// Every method the request names besides its own: override headers (each value, each
/// comma-separated item) and `_method` query parameters. Unparseable values are skipped:
/// no framework can route by them either.
pub fn method_overrides(headers: &HeaderMap, query: Option<&str>) -> Vec<Method> {
    let mut out = Vec::new();
    // One pass over the names, matched as text, rather than a lookup per spelling:
    // requests almost never carry one, and each lookup hashed a whole name.
    for (name, value) in headers {
        if is_method_header(name.as_str()) {
            let text = value.to_str().unwrap_or_default();
            out.extend(text.split(',').filter_map(|m| parse(m.trim())));
        }
    }
    // `_method=` is the form field name; frameworks also read it from the query.
    if let Some(q) = query.filter(|q| q.contains("_method=")) {
        let values = q.split('&').filter_map(|pair| pair.strip_prefix("_method="));
        out.extend(values.filter_map(parse));
    }
    out
}

fn parse(text: &str) -> Option<Method> {
    (!text.is_empty())
        .then(|| Method::from_bytes(text.as_bytes()).ok())
        .flatten()
}

/// Removes client copies of the path-override headers. Whether there are any is one
/// pass over the names, as in [`method_overrides`]; the hashed removals run only then.
pub fn strip_path_overrides(h: &mut HeaderMap) {
    if h.keys().any(|k| PATH_HEADERS.contains(k)) {
        for name in &PATH_HEADERS {
            h.remove(name);
        }
    }
}

/// Headers some upstream reads as the request's method. `HeaderName`s are lowercase, so
/// they compare as written; a `match` on the text compiles to a switch on the length
/// and one compare.
fn is_method_header(name: &str) -> bool {
    matches!(name, "x-http-method-override" | "x-http-method" | "x-method-override")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, v.parse().expect("value"));
        }
        h
    }

    #[test]
    fn every_spelling_of_a_method_override_is_read() {
        let h = headers(&[
            ("x-http-method-override", "DELETE"),
            ("X-HTTP-Method", "put, patch"),
            ("x-method-override", "  "),
            ("x-method-override", "b@d"),
        ]);
        let got = method_overrides(&h, Some("a=1&_method=get&x_method=POST"));
        // Kept as spelled: `routes` matches method names in any case.
        let names: Vec<&str> = got.iter().map(Method::as_str).collect();
        assert_eq!(names, ["DELETE", "put", "patch", "get"]);
        assert!(method_overrides(&HeaderMap::new(), Some("q=_method")).is_empty());
        assert!(method_overrides(&HeaderMap::new(), None).is_empty());
    }

    #[test]
    fn path_overrides_are_removed_and_nothing_else() {
        let mut h = headers(&[
            ("x-original-url", "/admin"),
            ("X-Rewrite-URL", "/admin"),
            ("x-url", "/kept"),
        ]);
        strip_path_overrides(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-url"));
        // Each path header alone is enough to be removed.
        for name in &PATH_HEADERS {
            let mut h = headers(&[("accept", "*/*")]);
            h.append(name.clone(), "/admin".parse().expect("value"));
            strip_path_overrides(&mut h);
            assert_eq!(h.len(), 1, "{name} was kept");
        }
    }
}
