//! Asking a streaming OpenAI-style request for its usage: an OpenAI chat or completion
//! stream reports tokens only when the request says `stream_options.include_usage`, so
//! without this a client could stream for free just by leaving it out.
//!
//! [`ask`] reads a request body and, when it is a JSON object with `"stream": true` that
//! does not ask for usage, returns the body with one edit that asks: the rest of the
//! bytes are the client's, untouched. It owns nothing about HTTP (which requests are
//! eligible, buffering, the answer's extra chunk: `proxy::stream_usage`, `usage_chunk`).

use std::fmt;
use std::ops::Range;
use std::sync::LazyLock;

use memchr::memmem::Finder;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// What [`ask`] made of a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// Not a streaming request keygate can read (not JSON, not an object, `stream` not
    /// `true`, or a `stream_options` that is no object): forwarded as it came, and the
    /// upstream decides.
    Unchanged,
    /// The client asked for usage itself, so it expects the usage chunk.
    AlreadyAsked,
    /// The body, now asking for usage. The client did not ask, so the answer's
    /// usage-only chunk is its to drop.
    Rewritten(Vec<u8>),
    /// `stream`, `stream_options` or `include_usage` is given twice. JSON parsers differ
    /// on which one counts (Python's the last, some Go and Rust ones the first), so no
    /// reading of such a body is safe to bill from.
    Ambiguous,
}

const ASK_MEMBER: &[u8] = br#""stream_options":{"include_usage":true},"#;
const ASK_OBJECT: &[u8] = br#"{"include_usage":true}"#;

/// Reads `body` as the request's JSON and asks for usage when it streams without.
pub fn ask(body: &[u8]) -> Asked {
    // Most bodies that come this way are not streams: they never say `stream`, or say
    // `"stream": false` once. Such a body is left as it came whatever its JSON, so it
    // need not be parsed. The parse runs at about 1.6 GiB/s, the search at 14 (`cargo
    // bench --bench meter`); for a 3 KiB conversation the parse was a quarter of
    // keygate's instructions for the request (docs/performance.md, round 21).
    if !may_stream(body) {
        return Asked::Unchanged;
    }
    parse_and_ask(body)
}

/// Whether [`parse_and_ask`] could answer anything but `Unchanged`: only when `body`
/// has a member `stream` whose value is `true`, or names `stream` or `stream_options`
/// twice.
///
/// Each letter of those names is written either as itself or escaped as
/// `\u0061`..`\u0074` (`\u006D` in upper case too): no other escape or surrogate pair
/// decodes to an ASCII letter. So when the body has no `\u006`/`\u007` escape, every
/// such name is the literal word in it. Then no mention of the word is no such member;
/// and one mention is at most one such member, which streams only if it is the name
/// `stream` followed by `:` and `true` (whitespace allowed around the colon). Two or
/// more mentions, or an escape (a `\\u0073`, an escaped backslash, is one too), are
/// left to the parse.
fn may_stream(body: &[u8]) -> bool {
    // Searchers built once: building one per call cost more than a short body's scan.
    static WORD: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"stream"));
    static ESCAPES: LazyLock<[Finder<'static>; 2]> = LazyLock::new(|| [Finder::new(b"\\u006"), Finder::new(b"\\u007")]);
    let mut mentions = WORD.find_iter(body);
    let first = mentions.next();
    if mentions.next().is_some() || ESCAPES.iter().any(|f| f.find(body).is_some()) {
        return true;
    }
    let Some(at) = first else { return false };
    let after = body.get(at + b"stream".len()..).unwrap_or_default();
    let Some(value) = after.strip_prefix(b"\"") else {
        return false;
    };
    let ws = |b: &&u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let mut rest = value.iter().skip_while(ws);
    if rest.next() != Some(&b':') {
        return false;
    }
    rest.find(|b| !ws(b)) == Some(&b't')
}

/// [`ask`] without the shortcut: the whole body parsed.
fn parse_and_ask(body: &[u8]) -> Asked {
    // serde_json skips ignored strings without checking them; JSON is UTF-8 or nothing.
    if std::str::from_utf8(body).is_err() {
        return Asked::Unchanged;
    }
    let Some(top) = members(body, Field::top) else {
        return Asked::Unchanged;
    };
    if top.duplicate {
        return Asked::Ambiguous;
    }
    let text = |r: &Range<usize>| &body[r.clone()];
    if top.first.map(|r| text(&r)) != Some(b"true") {
        return Asked::Unchanged;
    }
    let edit = match top.second {
        None => Edit::insert(top.open + 1, ASK_MEMBER),
        Some(r) if text(&r) == b"null" => Edit::replace(r, ASK_OBJECT),
        Some(r) => {
            let Some(opts) = members(text(&r), Field::options) else {
                return Asked::Unchanged;
            };
            if opts.duplicate {
                return Asked::Ambiguous;
            }
            match opts.first {
                Some(v) if text(&shift(&v, r.start)) == b"true" => return Asked::AlreadyAsked,
                Some(v) => Edit::replace(shift(&v, r.start), b"true"),
                None if opts.count == 0 => Edit::replace(r, ASK_OBJECT),
                None => Edit::insert(r.start + opts.open + 1, br#""include_usage":true,"#),
            }
        }
    };
    Asked::Rewritten(edit.apply(body))
}

fn shift(r: &Range<usize>, by: usize) -> Range<usize> {
    r.start + by..r.end + by
}

/// One splice: `range` of the body becomes `with`.
struct Edit {
    range: Range<usize>,
    with: &'static [u8],
}

impl Edit {
    fn insert(at: usize, with: &'static [u8]) -> Self {
        Edit { range: at..at, with }
    }
    fn replace(range: Range<usize>, with: &'static [u8]) -> Self {
        Edit { range, with }
    }
    fn apply(&self, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + self.with.len());
        out.extend_from_slice(&body[..self.range.start]);
        out.extend_from_slice(self.with);
        out.extend_from_slice(&body[self.range.end..]);
        out
    }
}

/// The two members an object is read for (`stream` and `stream_options` at the top,
/// `include_usage` inside `stream_options`), by their decoded names: `"str\u0065am"` is
/// `stream` to the upstream, so it is to keygate.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    First,
    Second,
    Other,
}

impl Field {
    fn top(name: &str) -> Field {
        match name {
            "stream" => Field::First,
            "stream_options" => Field::Second,
            _ => Field::Other,
        }
    }
    fn options(name: &str) -> Field {
        match name {
            "include_usage" => Field::First,
            _ => Field::Other,
        }
    }
}

/// What reading one object found: where its `{` is, the byte ranges of the values of
/// its two wanted members, how many members it has, and whether one was given twice.
#[derive(Default)]
struct Members {
    open: usize,
    first: Option<Range<usize>>,
    second: Option<Range<usize>>,
    count: usize,
    duplicate: bool,
}

/// Reads `doc` as one JSON object (whitespace around it allowed, nothing else), or
/// `None` when it is not one.
fn members(doc: &[u8], classify: fn(&str) -> Field) -> Option<Members> {
    let open = doc.iter().position(|b| !b" \t\r\n".contains(b))?;
    if doc[open] != b'{' {
        return None;
    }
    let mut de = serde_json::Deserializer::from_slice(doc);
    let found = (&mut de).deserialize_map(ObjectVisitor { doc, classify, open }).ok()?;
    de.end().ok()?;
    Some(found)
}

struct ObjectVisitor<'a> {
    doc: &'a [u8],
    classify: fn(&str) -> Field,
    open: usize,
}

impl<'de> Visitor<'de> for ObjectVisitor<'_> {
    type Value = Members;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
        let mut found = Members {
            open: self.open,
            ..Members::default()
        };
        while let Some(field) = map.next_key_seed(KeySeed(self.classify))? {
            found.count += 1;
            let slot = match field {
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
                Field::First => &mut found.first,
                Field::Second => &mut found.second,
            };
            let raw: &'de RawValue = map.next_value()?;
            let range =
                span(self.doc, raw.get().as_bytes()).ok_or_else(|| de::Error::custom("value not in the body"))?;
            found.duplicate |= slot.replace(range).is_some();
        }
        Ok(found)
    }
}

/// Where `part`, a slice borrowed from `doc`, lies in it.
fn span(doc: &[u8], part: &[u8]) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(doc.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= doc.len()).then_some(start..end)
}

/// Decodes a member name into a [`Field`] without keeping it.
struct KeySeed(fn(&str) -> Field);

impl<'de> de::DeserializeSeed<'de> for KeySeed {
    type Value = Field;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Field, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed {
    type Value = Field;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a member name")
    }
    fn visit_str<E: de::Error>(self, name: &str) -> Result<Field, E> {
        Ok((self.0)(name))
    }
}

#[cfg(test)]
#[path = "include_usage_tests.rs"]
mod tests;
