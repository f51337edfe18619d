//! A streaming, allocation-free finder for chosen top-level keys of a JSON object.
//!
//! Owns the byte-level structure of JSON as it streams past: nesting depth, strings and
//! their escapes, which string at depth 1 is a key, and a bounded copy of the raw value of
//! each wanted key (`"usage"`, `"model"`, …), handed to a sink once the value is complete.
//! One wanted key, `"response"`, is looked into instead: its object's own `usage` and
//! `model` are found the same way one level down (OpenAI's Responses API puts them there
//! in `response.completed`, beside the whole output, which is too big to keep).
//! Because it tracks structure rather than searching for text, a `"usage"` inside a string
//! (a message that talks about usage) or inside a nested object is never mistaken for the
//! real one, key order does not matter, and memory stays at one capture buffer whatever the
//! body size. It does not validate JSON (garbage is skipped, never rejected), does not
//! decode values (the sink does), and knows nothing of SSE framing (see `sse`).

/// Top-level keys the meter cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    Usage,
    Model,
    /// Anthropic's stream puts `model` and the prompt's `usage` inside `message_start.message`.
    Message,
    /// The Responses API's events carry `model` and `usage` inside `response`. Never
    /// captured: the scan descends into it.
    Response,
    /// Gemini's `usageMetadata` and `modelVersion` (a JSON answer, or each event of an
    /// `alt=sse` stream).
    UsageMetadata,
    ModelVersion,
    /// Ollama's native API: the last object of an answer counts the prompt and output
    /// tokens at its top level.
    PromptEvalCount,
    EvalCount,
}

impl Field {
    /// The name [`named`](Self::named) knows each field by; the tests hold the two together.
    #[cfg(test)]
    pub(super) fn key(self) -> &'static [u8] {
        match self {
            Field::Usage => b"usage",
            Field::Model => b"model",
            Field::Message => b"message",
            Field::Response => b"response",
            Field::UsageMetadata => b"usageMetadata",
            Field::ModelVersion => b"modelVersion",
            Field::PromptEvalCount => b"prompt_eval_count",
            Field::EvalCount => b"eval_count",
        }
    }

    /// The field a key names, by its raw bytes: one comparison by length and content,
    /// where a search of the wanted list compared every entry.
    pub(super) fn named(key: &[u8]) -> Option<Field> {
        Some(match key {
            b"usage" => Field::Usage,
            b"model" => Field::Model,
            b"message" => Field::Message,
            b"response" => Field::Response,
            b"usageMetadata" => Field::UsageMetadata,
            b"modelVersion" => Field::ModelVersion,
            b"prompt_eval_count" => Field::PromptEvalCount,
            b"eval_count" => Field::EvalCount,
            _ => return None,
        })
    }

    fn bit(self) -> u16 {
        1 << self as u16
    }

    /// Wanted inside a descended-into object too.
    fn leaf(self) -> bool {
        matches!(self, Field::Usage | Field::Model)
    }

    /// Largest raw value kept. Real usage objects are a few hundred bytes even with their
    /// `*_details`, model names are short, and `message_start` has empty content; anything
    /// bigger is not what we are looking for and is dropped rather than grown into.
    pub(crate) fn cap(self) -> usize {
        match self {
            Field::Usage | Field::UsageMetadata => 4 * 1024,
            Field::Model | Field::ModelVersion => 1024,
            Field::PromptEvalCount | Field::EvalCount => 32,
            Field::Message => 8 * 1024,
            Field::Response => 0,
        }
    }
}

/// Capacity of a capture buffer when first used: a chat completion's `usage` object,
/// details included, fits.
const CAPTURE_START: usize = 256;

/// Longest wanted key ("prompt_eval_count"); longer keys are recognised as "not wanted"
/// by length.
pub(super) const KEY_MAX: usize = 17;

/// Byte classes for [`JsonScan::feed`]'s runs outside strings: which bytes end a run in
/// a nested value, and at the top level. (Runs inside strings are [`string_run`]'s.)
const NESTED: u8 = 1;
const TOP: u8 = 2;
const CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    t[b'"' as usize] = NESTED | TOP;
    let mut i = 0;
    let brackets = *b"{}[]";
    while i < brackets.len() {
        t[brackets[i] as usize] = NESTED | TOP;
        i += 1;
    }
    t[b',' as usize] = TOP;
    t[b':' as usize] = TOP;
    t
};

/// Length of the run of ordinary string bytes at the start of `bytes`: up to the first
/// quote or backslash. Eight bytes at a time (the zero-byte test of Hacker's Delight,
/// 6-1), as message content is most of a chat body; the first match it reports is exact,
/// because a false positive can only sit above a true one.
pub(super) fn string_run(bytes: &[u8]) -> usize {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const QUOTES: u64 = u64::from_ne_bytes([b'"'; 8]);
    const SLASHES: u64 = u64::from_ne_bytes([b'\\'; 8]);
    let zero_in = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let mut at = 0;
    while let Some(word) = bytes.get(at..at + 8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        let v = u64::from_le_bytes(w);
        let hits = zero_in(v ^ QUOTES) | zero_in(v ^ SLASHES);
        if hits != 0 {
            return at + (hits.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    let tail = bytes.get(at..).unwrap_or_default();
    at + tail.iter().position(|&c| c == b'"' || c == b'\\').unwrap_or(tail.len())
}

#[derive(Debug)]
pub(crate) struct JsonScan {
    /// The wanted fields, a bit each ([`Field::bit`]).
    wanted: u16,
    depth: u32,
    /// The depth whose strings can be keys: 1, or 2 inside a `"response"` object.
    key_depth: u32,
    /// A `"response"` key's `:` was read: if its value is an object, descend into it.
    descend: bool,
    in_string: bool,
    /// The previous byte was a backslash inside a string, so this one cannot end it.
    escaped: bool,
    /// The current document's outermost value is an object; only then are depth-1 strings keys.
    top_object: bool,
    /// At depth 1 the next string starts a key (after `{` or `,`), not a value.
    expect_key: bool,
    reading_key: bool,
    /// The part of the key being read that came in earlier chunks. A key that starts
    /// and ends in one chunk is compared where it lies and never copied here.
    key: [u8; KEY_MAX],
    /// Saturates at `KEY_MAX + 1`, which means "too long to be wanted".
    key_len: usize,
    /// A wanted key was read; its value starts after the `:`.
    pending: Option<Field>,
    capture: Option<Field>,
    /// The value outgrew its cap: the rest is skipped and nothing is reported.
    overflow: bool,
    buf: Vec<u8>,
}

impl JsonScan {
    pub(crate) fn new(wanted: &'static [Field]) -> Self {
        Self::wanting(wanted.iter().fold(0, |bits, f| bits | f.bit()))
    }

    fn wanting(wanted: u16) -> Self {
        Self {
            wanted,
            depth: 0,
            key_depth: 1,
            descend: false,
            in_string: false,
            escaped: false,
            top_object: false,
            expect_key: false,
            reading_key: false,
            key: [0; KEY_MAX],
            key_len: 0,
            pending: None,
            capture: None,
            overflow: false,
            // Allocated on the first capture only, so bodies without wanted keys cost nothing.
            buf: Vec::new(),
        }
    }

    /// Forgets the current document (its unfinished capture too) but keeps the buffer's
    /// capacity: SSE calls this at every event boundary, which is what resynchronises the
    /// scan after a malformed event.
    pub(crate) fn reset(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        *self = Self::wanting(self.wanted);
        self.buf = buf;
        self.buf.clear();
    }

    /// Heap bytes held, for tests and memory accounting.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.buf.capacity()
    }

    /// Scans `chunk`; calls `sink(field, raw_value)` for each wanted top-level key whose
    /// value completed in it. Chunk boundaries may fall anywhere, even inside an escape.
    ///
    /// The hot state (depth, string, escape) lives in locals for the whole chunk. Runs of
    /// bytes that cannot change it go at once: strings a word at a time
    /// ([`string_run`]), the rest through a class table (not memchr: strings and numbers in
    /// chat bodies are short, where its set-up cost more than it saved). A value being
    /// captured is not copied byte by byte: the capture takes each span of the chunk
    /// between the bytes it must not keep (the key depth's `,` `:` and closers), so a
    /// captured value costs one copy per chunk it spans.
    ///
    /// Fewer turns of the loop per token, since a chat stream's events are mostly short
    /// tokens (a fifth less time per event than the loop before, `benches/meter.rs`): a
    /// string is read to its end in the turn that opens it, escapes stepped over in
    /// place; a key is named from the chunk where it lies, by one `match`, and only one
    /// cut by the chunk's end is copied.
    pub(crate) fn feed<F: FnMut(Field, &[u8])>(&mut self, chunk: &[u8], sink: &mut F) {
        let (mut depth, mut in_string, mut escaped) = (self.depth, self.in_string, self.escaped);
        let mut i = 0;
        // Start of the bytes not yet handed to the capture (a no-op when none is open).
        let mut kept = 0;
        // Where the key being read starts in this chunk (0 when it began in an earlier one).
        let mut key_from = 0;
        while let Some(rest) = chunk.get(i..).filter(|r| !r.is_empty()) {
            if !in_string {
                let key_depth = self.key_depth;
                if depth > key_depth {
                    // Inside a nested value only quotes and brackets count.
                    i += rest
                        .iter()
                        .position(|&c| CLASS[usize::from(c)] & NESTED != 0)
                        .unwrap_or(rest.len());
                    let Some(&b) = chunk.get(i) else { break };
                    i += 1;
                    match b {
                        b'"' => in_string = true,
                        b'{' | b'[' => depth = depth.saturating_add(1),
                        _ => depth = depth.saturating_sub(1),
                    }
                } else {
                    // At the key depth (or above it): the separators count too.
                    i += rest
                        .iter()
                        .position(|&c| CLASS[usize::from(c)] & TOP != 0)
                        .unwrap_or(rest.len());
                    let Some(&b) = chunk.get(i) else { break };
                    let at = i;
                    i += 1;
                    match b {
                        b'"' => {
                            in_string = true;
                            if depth == key_depth && self.expect_key && self.capture.is_none() {
                                self.expect_key = false;
                                self.reading_key = true;
                                self.key_len = 0;
                                self.pending = None;
                                key_from = i;
                            }
                        }
                        b'{' | b'[' => {
                            if depth == 0 {
                                // A new document (NDJSON-like bodies, or the next SSE event after reset).
                                self.top_object = b == b'{';
                                self.expect_key = self.top_object;
                                self.key_depth = 1;
                            }
                            if std::mem::take(&mut self.descend) && b == b'{' {
                                self.key_depth = 2;
                                self.expect_key = true;
                            }
                            depth = depth.saturating_add(1);
                        }
                        b'}' | b']' => {
                            if depth == key_depth {
                                self.keep_all(chunk.get(kept..at).unwrap_or_default());
                                kept = i;
                                self.finish(sink);
                                // A descended-into object ends as a value at depth 1.
                                self.key_depth = 1;
                                self.expect_key = false;
                            }
                            // Saturating: a stray closer in garbage must not wrap the depth.
                            depth = depth.saturating_sub(1);
                        }
                        b',' if depth == key_depth => {
                            self.keep_all(chunk.get(kept..at).unwrap_or_default());
                            kept = i;
                            self.finish(sink);
                            self.expect_key = self.top_object;
                        }
                        b':' if depth == key_depth => {
                            self.keep_all(chunk.get(kept..at).unwrap_or_default());
                            kept = i;
                            self.colon();
                        }
                        _ => {}
                    }
                }
                if !in_string {
                    continue;
                }
                // A string just opened: its run is read in this same turn of the loop.
            } else if escaped {
                // The byte after a backslash that ended the last chunk: it never ends the string.
                escaped = false;
                i += 1;
            }
            // To the string's end, escapes stepped over in place.
            loop {
                i += string_run(chunk.get(i..).unwrap_or_default());
                match chunk.get(i) {
                    Some(b'"') => break,
                    // A backslash: the byte after it is part of the string, whatever it is.
                    Some(_) => i += 2,
                    None => break,
                }
            }
            if i >= chunk.len() {
                // The chunk ended in the string, maybe right after a backslash.
                escaped = i > chunk.len();
                break;
            }
            i += 1;
            in_string = false;
            if std::mem::take(&mut self.reading_key) {
                self.pending = self.key_read(chunk.get(key_from..i - 1).unwrap_or_default());
            }
        }
        if self.reading_key {
            // The chunk ended inside a key: keep what came of it for the next one.
            self.key_bytes(chunk.get(key_from..).unwrap_or_default());
        }
        self.keep_all(chunk.get(kept..).unwrap_or_default());
        (self.depth, self.in_string, self.escaped) = (depth, in_string, escaped);
    }

    /// A `:` at the key depth: the value of a wanted key starts after it.
    fn colon(&mut self) {
        if self.capture.is_some() {
            return;
        }
        if let Some(field) = self.pending.take() {
            if field == Field::Response {
                self.descend = true;
                return;
            }
            self.capture = Some(field);
            self.overflow = false;
            self.buf.clear();
            // One allocation for a typical value, not a doubling per few bytes.
            self.buf.reserve(CAPTURE_START.min(field.cap()));
        }
    }

    /// Appends to the capture, if any, within its cap; past the cap the value is dropped.
    fn keep_all(&mut self, bytes: &[u8]) {
        let Some(field) = self.capture else { return };
        if self.overflow {
            return;
        }
        if self.buf.len() + bytes.len() > field.cap() {
            self.overflow = true;
            self.buf.clear();
        } else {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Keeps `bytes` of a key cut by a chunk's end, up to what a wanted key can be.
    fn key_bytes(&mut self, bytes: &[u8]) {
        let start = self.key_len.min(KEY_MAX);
        let n = bytes.len().min(KEY_MAX - start);
        if let (Some(dst), Some(src)) = (self.key.get_mut(start..start + n), bytes.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.key_len = (self.key_len + bytes.len()).min(KEY_MAX + 1);
    }

    /// The key ended with `tail`, its bytes in the chunk where it ended: the wanted field
    /// it names here, if any. Names are compared as written, escapes and all (no wanted
    /// one has a backslash), so a key with an escape in it is never wanted.
    fn key_read(&mut self, tail: &[u8]) -> Option<Field> {
        let name = if self.key_len == 0 {
            tail
        } else {
            self.key_bytes(tail);
            // `None` when saturated: too long.
            self.key.get(..self.key_len)?
        };
        let field = Field::named(name)?;
        (self.wanted & field.bit() != 0 && (self.key_depth == 1 || field.leaf())).then_some(field)
    }

    /// The value at depth 1 ended (`,` or `}`): report it when it was wanted and fitted.
    /// Inlined, as most values are not captured; reporting one is [`report`](Self::report).
    #[inline(always)]
    fn finish<F: FnMut(Field, &[u8])>(&mut self, sink: &mut F) {
        self.pending = None;
        self.descend = false;
        if let Some(field) = self.capture.take() {
            self.report(field, sink);
        }
    }

    #[inline(never)]
    fn report<F: FnMut(Field, &[u8])>(&mut self, field: Field, sink: &mut F) {
        if !self.overflow {
            sink(field, &self.buf);
        }
        self.buf.clear();
    }
}
