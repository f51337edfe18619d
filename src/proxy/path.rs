//! The request path that scope rules see and the upstream receives.
//!
//! Why: `[[routes]]` grant or refuse by path prefix, but upstreams (and the nginx or
//! framework routers in front of them) resolve `/v1/../admin`, `/%61dmin`, `//admin` or
//! `/admin%2Fx` to `/admin/…`. Matching the raw text would let a key without the admin
//! scope reach admin routes: the path-confusion class of Envoy's CVE-2019-9901 and
//! CVE-2021-29492. Two rules close it:
//!
//! - [`normalize`] applies RFC 3986 §6.2.2's syntax-based normalization, which does not
//!   change what a path means: percent-encoded unreserved characters are decoded, other
//!   escapes get upper-case hex, and `.`/`..` segments are removed (§5.2.4). keygate
//!   checks, records and forwards this one path, so what was authorised is what the
//!   upstream resolves. A `%` that starts no valid escape, or an escaped control
//!   character, is refused ([`MalformedEscape`]).
//! - [`lenient_view`] is how a lenient router may read the same path: empty segments
//!   merged, `%2F`, `%5C` and `\` taken as separators, and `;` parameters dropped from
//!   each segment (Tomcat's `/..;/admin`). keygate does not forward it (it would change
//!   what a path means to a strict upstream); scopes are checked against it as well, so a
//!   request needs what either reading requires.
//!
//! Owns no policy beyond that: which scopes a path needs is `routes`; the query string is
//! passed on untouched.

use std::borrow::Cow;

use http::uri::PathAndQuery;
use http::{Request, Uri};

/// A `%` that does not start a valid escape (`%zz`, `%4`, a `%` at the end), or an
/// escape of a control character (`%00`–`%1F`, `%7F`).
///
/// Refused rather than kept: decoding around a bad escape can make a new one (`%%32%65`
/// becomes `%2e`, a dot to the next decoder), so no normalized form would mean to every
/// upstream what the raw path means. RFC 3986 §2.1 does not allow it, and Go's and
/// Java's servers refuse it too. No path names a control character, and a decoded NUL
/// ends the path for upstreams written in C (`/admin%00/x` read as `/admin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedEscape;

/// RFC 3986's syntax-based normalization of an origin-form path. Anything that does
/// not start with `/` (`*` of `OPTIONS *`) is returned as it is.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, MalformedEscape> {
    if !path.starts_with('/') || !needs_normalizing(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = normalize_escapes(path)?;
    let out = remove_dot_segments(&decoded);
    Ok(if out == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(out)
    })
}

/// Puts the normalized path in `req` (the query string kept as it was) and returns its
/// [`lenient_view`]: what was authorised is then what the upstream receives.
pub(crate) fn normalize_request<B>(req: &mut Request<B>) -> Result<Option<String>, MalformedEscape> {
    let normalized = match normalize(req.uri().path())? {
        Cow::Borrowed(p) => return Ok(lenient_view(p)),
        Cow::Owned(p) => p,
    };
    let lenient = lenient_view(&normalized);
    let with_query = match req.uri().query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    let mut parts = req.uri().clone().into_parts();
    // Never fails: only unreserved bytes were decoded, and dot segments removed.
    parts.path_and_query = Some(PathAndQuery::try_from(with_query).map_err(|_| MalformedEscape)?);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| MalformedEscape)?;
    Ok(lenient)
}

/// The path as a router that merges slashes, decodes `%2F`/`%5C` and drops `;`
/// parameters would read it, given a path [`normalize`] returned; `None` when that
/// reading is the path itself.
pub fn lenient_view(normalized: &str) -> Option<String> {
    if !normalized.starts_with('/') || !lenient_differs(normalized.as_bytes()) {
        return None;
    }
    let mut slashed = String::with_capacity(normalized.len());
    let mut rest = normalized;
    let mut in_parameter = false;
    while let Some(c) = rest.chars().next() {
        let escaped = |e: &str| rest.starts_with(e);
        // An escape is one unit; `get` keeps a stray `%` from slicing mid-character.
        let width = if c == '%' {
            rest.get(..3).map_or(1, |_| 3)
        } else {
            c.len_utf8()
        };
        if c == '/' || c == '\\' || escaped("%2F") || escaped("%5C") {
            in_parameter = false;
            if !slashed.ends_with('/') {
                slashed.push('/');
            }
        } else if c == ';' || escaped("%3B") {
            in_parameter = true;
        } else if !in_parameter {
            slashed.push_str(&rest[..width]);
        }
        rest = &rest[width..];
    }
    let view = remove_dot_segments(&slashed);
    (view != normalized).then_some(view)
}

/// Cheap enough for every request: one pass, and a plain `/v1/chat/completions` has no
/// `%` and no segment starting with a dot.
fn needs_normalizing(b: &[u8]) -> bool {
    let mut prev = 0;
    for &c in b {
        if c == b'%' || (c == b'.' && prev == b'/') {
            return true;
        }
        prev = c;
    }
    false
}

/// Whether a lenient reading can differ: a doubled slash, a backslash, a `;`, or an
/// escape (after [`normalize`] the separators' escapes are the only ones that matter,
/// and checking for any `%` keeps the pass to one byte at a time).
fn lenient_differs(b: &[u8]) -> bool {
    let mut prev = 0;
    for &c in b {
        if c == b'%' || c == b'\\' || c == b';' || (c == b'/' && prev == b'/') {
            return true;
        }
        prev = c;
    }
    false
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// §6.2.2.1 and §6.2.2.2: `%61` becomes `a`, `%2f` becomes `%2F`.
fn normalize_escapes(path: &str) -> Result<String, MalformedEscape> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let escape = b
            .get(i + 1)
            .and_then(|c| hex(*c))
            .zip(b.get(i + 2).and_then(|c| hex(*c)));
        match escape {
            Some((hi, lo)) => {
                let c = hi * 16 + lo;
                if c.is_ascii_control() {
                    return Err(MalformedEscape);
                }
                if is_unreserved(c) {
                    out.push(c);
                } else {
                    out.extend_from_slice(&[b'%', b[i + 1].to_ascii_uppercase(), b[i + 2].to_ascii_uppercase()]);
                }
                i += 3;
            }
            None => return Err(MalformedEscape),
        }
    }
    // Only ASCII bytes were replaced, by ASCII bytes, so the text stays UTF-8; the
    // fallback is never taken but keeps a bug from becoming a panic on the data plane.
    Ok(String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

/// §5.2.4 for an absolute path: `.` segments dropped, `..` removes the segment before
/// it (never above the root), and a trailing dot segment leaves a trailing slash.
fn remove_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path[1..].split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => {
                out.push(s);
                continue;
            }
        }
        if i == last {
            out.push("");
        }
    }
    let mut s = String::with_capacity(path.len());
    for seg in out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

#[cfg(test)]
#[path = "path_tests.rs"]
mod tests;
