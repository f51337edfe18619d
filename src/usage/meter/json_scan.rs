//! A streaming, allocation-free finder for chosen top-level keys of a JSON object.
//!
//! Owns what JSON's structure means as it streams past: nesting depth, which string at
//! depth 1 is a key, and a bounded copy of the raw value of each wanted key (`"usage"`,
//! `"model"`, …), handed to a sink once the value is complete.
//! One wanted key, `"response"`, is looked into instead: its object's own `usage` and
//! `model` are found the same way one level down (OpenAI's Responses API puts them there
//! in `response.completed`, beside the whole output, which is too big to keep).
//! Because it tracks structure rather than searching for text, a `"usage"` inside a string
//! (a message that talks about usage) or inside a nested object is never mistaken for the
//! real one, key order does not matter, and memory stays at one capture buffer whatever the
//! body size. It does not validate JSON (garbage is skipped, never rejected), does not
//! decode values (the sink does), and knows nothing of SSE framing (see `sse`). Where
//! the quotes, brackets and strings are is `json_blocks`' part.

use super::json_blocks::{above, Carry, Marks, BLOCK};

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

#[derive(Debug)]
pub(crate) struct JsonScan {
    /// The wanted fields, a bit each ([`Field::bit`]).
    wanted: u16,
    depth: u32,
    /// The depth whose strings can be keys: 1, or 2 inside a `"response"` object.
    key_depth: u32,
    /// A `"response"` key's `:` was read: if its value is an object, descend into it.
    descend: bool,
    /// Whether the next byte is in a string, or escaped ([`json_blocks`](super::json_blocks)).
    carry: Carry,
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
            carry: Carry::default(),
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
    /// 64 bytes at a time: [`json_blocks`](super::json_blocks) marks the block's quotes,
    /// and its brackets, commas and colons outside strings, as bits, and only the bytes
    /// that can matter are visited, in order: at the key depth its separators and
    /// brackets, and quotes only while a key is expected or read; inside a nested value
    /// its brackets alone. A chat completion's `choices`, most of a streamed event, is
    /// crossed without looking at its strings, keys or separators one by one.
    ///
    /// A value being captured is not copied byte by byte: the capture takes each span
    /// of the chunk between the bytes it must not keep (the key depth's `,` `:` and
    /// closers), so a captured value costs one copy per chunk it spans.
    pub(crate) fn feed<F: FnMut(Field, &[u8])>(&mut self, chunk: &[u8], sink: &mut F) {
        let mut depth = self.depth;
        let mut carry = self.carry;
        // Start of the bytes not yet handed to the capture (a no-op when none is open).
        let mut kept = 0;
        // Where the key being read starts in this chunk (0 when it began in an earlier one).
        let mut key_from = 0;
        let mut base = 0;
        // Only a chunk's last block, if short, is copied here: once per chunk.
        let mut padded = [0u8; BLOCK];
        while let Some(rest) = chunk.get(base..).filter(|r| !r.is_empty()) {
            let (block, len) = match rest.get(..BLOCK).and_then(|b| <&[u8; BLOCK]>::try_from(b).ok()) {
                Some(block) => (block, BLOCK),
                None => {
                    // The chunk's last bytes: the zeros after them are none of the classes.
                    if let Some(dst) = padded.get_mut(..rest.len()) {
                        dst.copy_from_slice(rest);
                    }
                    (&padded, rest.len())
                }
            };
            let marks = Marks::of(block, len, &mut carry);
            let mut events = if depth > self.key_depth {
                marks.brackets
            } else {
                marks.at_keys(self.expect_key || self.reading_key)
            };
            while events != 0 {
                let p = events.trailing_zeros();
                // Cleared here, not recomputed from the state: the next byte's position
                // then never waits on this one's work (a recompute per byte cost a
                // fifth more time per streamed event, benches/meter.rs).
                events &= events - 1;
                let at = base + p as usize;
                let Some(&b) = block.get(p as usize) else { break };
                match b {
                    // A quote that opens a key.
                    b'"' if (marks.inside >> p) & 1 != 0
                        && depth == self.key_depth
                        && self.expect_key
                        && self.capture.is_none() =>
                    {
                        self.expect_key = false;
                        self.key_len = 0;
                        key_from = at + 1;
                        // A key ends at the next quote: in this block, it is read now.
                        match marks.quotes & above(p) {
                            0 => {
                                self.reading_key = true;
                                self.pending = None;
                            }
                            end => {
                                let end = base + end.trailing_zeros() as usize;
                                self.pending = self.key_read(chunk.get(key_from..end).unwrap_or_default());
                                events &= !marks.quotes;
                            }
                        }
                    }
                    // The end of a key that began in an earlier block or chunk.
                    b'"' if (marks.inside >> p) & 1 == 0 && self.reading_key => {
                        self.reading_key = false;
                        self.pending = self.key_read(chunk.get(key_from..at).unwrap_or_default());
                        events &= !marks.quotes;
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
                        if depth == self.key_depth {
                            self.keep_all(chunk.get(kept..at).unwrap_or_default());
                            kept = at + 1;
                            self.finish(sink);
                            // A descended-into object ends as a value at depth 1.
                            self.key_depth = 1;
                            self.expect_key = false;
                        }
                        // Saturating: a stray closer in garbage must not wrap the depth.
                        depth = depth.saturating_sub(1);
                    }
                    b',' if depth == self.key_depth => {
                        self.keep_all(chunk.get(kept..at).unwrap_or_default());
                        kept = at + 1;
                        self.finish(sink);
                        self.expect_key = self.top_object;
                        events = marks.at_keys(self.expect_key || self.reading_key) & above(p);
                    }
                    b':' if depth == self.key_depth => {
                        self.keep_all(chunk.get(kept..at).unwrap_or_default());
                        kept = at + 1;
                        self.colon();
                    }
                    _ => {}
                }
                if marks.brackets & (1 << p) != 0 {
                    // The depth changed: a nested value hides all but its brackets, and
                    // leaving one shows the rest of the block again.
                    events = if depth > self.key_depth {
                        events & marks.brackets
                    } else {
                        marks.at_keys(self.expect_key || self.reading_key) & above(p)
                    };
                }
            }
            base += len;
        }
        if self.reading_key {
            // The chunk ended inside a key: keep what came of it for the next one.
            self.key_bytes(chunk.get(key_from..).unwrap_or_default());
        }
        self.keep_all(chunk.get(kept..).unwrap_or_default());
        (self.depth, self.carry) = (depth, carry);
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
