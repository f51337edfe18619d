//! Taking the usage-only chunk out of a stream whose client did not ask for it. When
//! keygate asked for usage on a client's behalf (`include_usage`), OpenAI ends the
//! stream with one extra event, `"choices": []` with the `usage` object, which a client
//! that reads `choices[0]` of every chunk fails on.
//!
//! [`UsageChunkFilter`] sees the stream as bytes and passes every event on as soon as
//! its blank line arrives; only an event whose data is that chunk is left out. It holds
//! back at most one unfinished event, never the stream, and a pathological event past
//! [`MAX_HELD`] turns it into a pass-through. The meter reads the stream before this
//! does (`proxy::stream_usage` orders them), so the row still gets the tokens.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use serde::de::IgnoredAny;
use serde::Deserialize;

/// The longest unfinished event held back. A usage chunk is a few hundred bytes; an
/// event longer than this is not one, and holding it would delay what the client reads.
pub const MAX_HELD: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct UsageChunkFilter {
    /// The start of an event whose blank line has not arrived, all of it scanned.
    held: BytesMut,
    line: LineState,
    /// Gave up (an event past `MAX_HELD`): everything passes from here on.
    passing: bool,
    dropped: bool,
    /// Event ends found in the current piece; kept to reuse its allocation.
    ends: Vec<usize>,
}

/// Where the scan is within a line; starts at the start of an event.
#[derive(Debug, Default, Clone, Copy)]
struct LineState {
    /// The current line has bytes (it is not, so far, a blank line).
    in_line: bool,
    /// The last byte was `\r`: a `\n` now is part of that line end.
    after_cr: bool,
    /// A blank line ended in a lone `\r`: the event ends there unless a `\n` follows,
    /// which then is the blank line's too. Decided by the next byte.
    cr_end: bool,
}

impl UsageChunkFilter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the usage chunk has been taken out.
    pub fn dropped(&self) -> bool {
        self.dropped
    }

    /// Takes the next piece of the stream and returns what may go to the client now:
    /// every finished event but the usage-only one. Often the piece itself, uncopied.
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        if self.passing {
            return chunk;
        }
        let mut ends = std::mem::take(&mut self.ends);
        ends.clear();
        let buf = if self.held.is_empty() {
            boundaries(&chunk, 0, &mut self.line, &mut ends);
            let last = ends.last().copied().unwrap_or(0);
            self.held.extend_from_slice(&chunk[last..]);
            chunk.slice(..last)
        } else {
            let from = self.held.len();
            self.held.extend_from_slice(&chunk);
            boundaries(&self.held[from..], from, &mut self.line, &mut ends);
            let last = ends.last().copied().unwrap_or(0);
            self.held.split_to(last).freeze()
        };
        let mut out = self.without_usage_chunk(buf, &ends);
        self.ends = ends;
        if self.held.len() > MAX_HELD {
            self.passing = true;
            let mut all = BytesMut::from(&out[..]);
            all.extend_from_slice(&self.finish());
            out = all.freeze();
        }
        out
    }

    /// At the end of the stream: what is held goes out, the usage chunk left out if it
    /// is that (a stream may end without its last blank line).
    pub fn finish(&mut self) -> Bytes {
        self.line = LineState::default();
        let rest = std::mem::take(&mut self.held).freeze();
        if !self.passing && is_usage_only(&rest) {
            self.dropped = true;
            return Bytes::new();
        }
        rest
    }

    /// `buf`, events ending at `ends`, without the usage-only event: `buf` itself when
    /// it has none. Each event is tested once (the test parses the one that is).
    fn without_usage_chunk(&mut self, buf: Bytes, ends: &[usize]) -> Bytes {
        let mut events = ends.iter().scan(0, |start, &end| {
            let range = *start..end;
            *start = end;
            Some(range)
        });
        let Some(first) = events.by_ref().find(|r| is_usage_only(&buf[r.clone()])) else {
            return buf;
        };
        self.dropped = true;
        let mut out = BytesMut::with_capacity(buf.len());
        out.extend_from_slice(&buf[..first.start]);
        for r in events.filter(|r| !is_usage_only(&buf[r.clone()])) {
            out.extend_from_slice(&buf[r]);
        }
        out.freeze()
    }
}

/// Pushes onto `ends` the offsets (plus `base`) just past each blank line in `buf` that
/// ends an event, with `line` carried from the bytes before it. Lines end in `\n`,
/// `\r\n` or a lone `\r` (the SSE grammar). Inside a line only its end can matter, so
/// the rest of it is skipped with `memchr2`: a data line is a whole JSON chunk, and
/// stepping through it byte by byte was most of this filter's cost.
fn boundaries(buf: &[u8], base: usize, line: &mut LineState, ends: &mut Vec<usize>) {
    let start = ends.len();
    let mut i = 0;
    while i < buf.len() {
        if line.in_line {
            // `in_line` means the last byte was text, so `after_cr` and `cr_end` are false.
            match memchr::memchr2(b'\n', b'\r', &buf[i..]) {
                Some(n) => i += n,
                None => break,
            }
        }
        let b = buf[i];
        if line.cr_end {
            line.cr_end = false;
            if b == b'\n' {
                line.after_cr = false;
                ends.push(i + 1);
                i += 1;
                continue;
            }
            ends.push(i);
        }
        match b {
            b'\n' if line.after_cr => line.after_cr = false,
            b'\n' if !line.in_line => ends.push(i + 1),
            b'\r' if !line.in_line => {
                line.cr_end = true;
                line.after_cr = true;
            }
            b'\n' | b'\r' => {
                line.in_line = false;
                line.after_cr = b == b'\r';
            }
            _ => {
                line.in_line = true;
                line.after_cr = false;
            }
        }
        i += 1;
    }
    for e in &mut ends[start..] {
        *e += base;
    }
}

/// Whether `event` is OpenAI's usage-only chunk: data that is an object with an empty
/// `choices` array and a `usage` object. The cheap test first, since with
/// `include_usage` every chunk carries `"usage": null`.
fn is_usage_only(event: &[u8]) -> bool {
    if !may_hold_usage_object(event) {
        return false;
    }
    let Some(data) = data_of(event) else {
        return false;
    };
    #[derive(Deserialize)]
    struct Probe {
        choices: Option<Vec<IgnoredAny>>,
        usage: Option<AnObject>,
    }
    matches!(
        serde_json::from_slice::<Probe>(&data),
        Ok(Probe { choices: Some(c), usage: Some(_) }) if c.is_empty()
    )
}

/// Any JSON object, its members read and dropped: the probe needs only to know that
/// `usage` is one, where a `serde_json::Map` allocated a `String` and a `Value` for each
/// member, about a third of this filter's instructions per stream under callgrind.
struct AnObject;

impl<'de> Deserialize<'de> for AnObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = AnObject;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<AnObject, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(AnObject)
            }
        }
        d.deserialize_map(Members)
    }
}

/// Whether `"usage"` is followed, past whitespace, by `:` and then `{` (or a line end,
/// where a data line may continue the JSON): only then is the event worth parsing.
fn may_hold_usage_object(event: &[u8]) -> bool {
    static USAGE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));
    USAGE.find_iter(event).any(|at| {
        let mut rest = event[at + 7..]
            .iter()
            .copied()
            .skip_while(|b| matches!(b, b' ' | b'\t'));
        rest.next() == Some(b':') && matches!(rest.find(|b| !matches!(b, b' ' | b'\t')), Some(b'{' | b'\n' | b'\r'))
    })
}

/// The event's data: its `data:` lines' values joined by `\n`, borrowed when there is
/// one. `None` when it has none.
fn data_of(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut data: Option<Cow<'_, [u8]>> = None;
    for line in event.split(|&b| b == b'\n' || b == b'\r') {
        let Some(value) = line.strip_prefix(b"data") else {
            continue;
        };
        let value = match value {
            [b':', b' ', rest @ ..] | [b':', rest @ ..] => rest,
            [] => value,
            _ => continue,
        };
        data = Some(match data {
            None => Cow::Borrowed(value),
            Some(prev) => {
                let mut joined = prev.into_owned();
                joined.push(b'\n');
                joined.extend_from_slice(value);
                Cow::Owned(joined)
            }
        });
    }
    data
}

#[cfg(test)]
#[path = "usage_chunk_tests.rs"]
mod tests;
