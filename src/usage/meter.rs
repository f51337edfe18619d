//! Token and cost accounting read from a response body as it streams through the proxy.
//!
//! Owns [`TokenMeter`] (fed every body data frame, in order, on the hot path; it never
//! holds or delays the stream), the decoding of OpenAI-style `usage` objects (and
//! Anthropic's `input_tokens`/`output_tokens`, with its cached prompt tokens counted as
//! prompt tokens; `wire` defines them, `flat` is a fast path for the plain ones),
//! Gemini's `usageMetadata` (thinking tokens counted as output) and Ollama's native
//! `prompt_eval_count`/`eval_count` (JSON or NDJSON), and
//! [`cost_micros`]. The byte-level work lives in `json_scan` (JSON structure, and the
//! Responses API's `response` object looked into) and `sse` (event-stream framing); both
//! are constant-memory state machines, so results do not depend on how the body was
//! split into frames. It does not own where the numbers go (the [`UsageRecord`](super::UsageRecord)
//! built by the proxy) nor the price table (`config::Pricing`).

mod flat;
#[cfg(test)]
mod flat_tests;
mod json_blocks;
#[cfg(test)]
mod json_blocks_tests;
mod json_scan;
#[cfg(test)]
mod json_scan_tests;
#[cfg(test)]
mod native_tests;
mod sse;
#[cfg(test)]
mod sse_tests;
#[cfg(test)]
pub(crate) mod tests;
mod wire;

use http::HeaderValue;

use crate::config::{Price, Pricing};
use json_scan::{Field, JsonScan};
use sse::SseScan;
use wire::{Count, ModelName, WireGeminiUsage, WireMessage, WireUsage};

/// Token counts and model of one response, as far as they are known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: Option<i64>,
    pub completion: Option<i64>,
    pub total: Option<i64>,
    pub model: Option<String>,
}

/// A JSON body is one document (NDJSON, one per line): `usage` and `model` sit at its
/// top level, or Gemini's names for them, or Ollama's two counts.
const JSON_FIELDS: &[Field] = &[
    Field::Usage,
    Field::Model,
    Field::UsageMetadata,
    Field::ModelVersion,
    Field::PromptEvalCount,
    Field::EvalCount,
];
/// SSE events are documents too; Anthropic's `message_start` nests them in `message`,
/// the Responses API's events in `response`.
const SSE_FIELDS: &[Field] = &[
    Field::Usage,
    Field::Model,
    Field::Message,
    Field::Response,
    Field::UsageMetadata,
    Field::ModelVersion,
];

#[derive(Debug)]
enum Reader {
    /// Not a format that carries usage: bytes are not even looked at.
    Ignore,
    Json(JsonScan),
    Sse(SseScan),
}

/// Reads token usage out of a response body frame by frame, in bounded memory.
#[derive(Debug)]
pub struct TokenMeter {
    reader: Reader,
    seen: Seen,
    header_total: Option<i64>,
}

impl TokenMeter {
    /// From the response head: Content-Type decides JSON vs SSE vs ignore; `header_total` is the
    /// configured tokens header's value when present and numeric.
    pub fn new(content_type: Option<&HeaderValue>, header_total: Option<i64>) -> Self {
        let reader = match content_type.map(|v| media_kind(v.as_bytes())) {
            Some(Kind::Json) => Reader::Json(JsonScan::new(JSON_FIELDS)),
            Some(Kind::Sse) => Reader::Sse(SseScan::new(SSE_FIELDS)),
            Some(Kind::Other) | None => Reader::Ignore,
        };
        Self {
            reader,
            seen: Seen::default(),
            header_total,
        }
    }

    /// Called with every body data frame, in order. A byte scan with no allocation in the
    /// common case; memory stays bounded whatever the body size.
    pub fn feed(&mut self, chunk: &[u8]) {
        let seen = &mut self.seen;
        let mut sink = |field: Field, raw: &[u8]| seen.absorb(field, raw);
        match &mut self.reader {
            Reader::Ignore => {}
            Reader::Json(scan) => scan.feed(chunk, &mut sink),
            Reader::Sse(scan) => scan.feed(chunk, &mut sink),
        }
    }

    /// What was seen so far: works for complete bodies and for streams abandoned halfway.
    /// `total` is the body's `total_tokens`, else prompt + completion when both are known,
    /// else the header's total.
    pub fn tokens(&self) -> Tokens {
        let mut t = self.counts();
        t.model = self.seen.model.clone();
        t
    }

    /// [`tokens`](Self::tokens) for a body that is done: the model name is moved out,
    /// not copied.
    pub fn into_tokens(self) -> Tokens {
        let mut t = self.counts();
        t.model = self.seen.model;
        t
    }

    fn counts(&self) -> Tokens {
        let s = &self.seen;
        let derived = match (s.prompt, s.completion) {
            (Some(p), Some(c)) => p.checked_add(c),
            _ => None,
        };
        Tokens {
            prompt: s.prompt,
            completion: s.completion,
            total: s.total.or(derived).or(self.header_total),
            model: None,
        }
    }

    /// Whether the body is read at all: not for a content type that carries no usage,
    /// nor for an encoded body.
    pub fn reads_body(&self) -> bool {
        !matches!(self.reader, Reader::Ignore)
    }

    /// Heap bytes this meter holds (its capture buffers); bounded by a few KiB.
    pub fn heap_bytes(&self) -> usize {
        let reader = match &self.reader {
            Reader::Ignore => 0,
            Reader::Json(scan) => scan.heap_bytes(),
            Reader::Sse(scan) => scan.heap_bytes(),
        };
        reader + self.seen.model_raw.capacity() + self.seen.model.as_ref().map_or(0, String::capacity)
    }
}

/// The fuzz target's oracle (`fuzz/fuzz_targets/usage_scanner.rs`): wherever the fast
/// path (`flat`) answers for `raw`, as a `usage` object or as a model name, serde
/// (`wire`) gives the same answer. Not for use outside tests and fuzzing.
#[doc(hidden)]
pub fn fast_path_agrees(raw: &[u8]) -> bool {
    let usage = flat::usage(raw).is_none_or(|fast| serde_json::from_slice::<WireUsage>(raw).ok() == Some(fast));
    let model = flat::model(raw).is_none_or(|fast| ModelName::decode(raw).is_some_and(|name| name == fast));
    usage && model
}

/// Whether a Content-Type is `text/event-stream`, as the meter classifies it.
pub fn is_event_stream(content_type: &HeaderValue) -> bool {
    media_kind(content_type.as_bytes()) == Kind::Sse
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Json,
    Sse,
    Other,
}

/// Classifies a Content-Type by its essence (before `;`), case-insensitively.
fn media_kind(value: &[u8]) -> Kind {
    let essence = value.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
    let has = |range: Option<&[u8]>, want: &[u8]| range.is_some_and(|r| r.eq_ignore_ascii_case(want));
    if essence.eq_ignore_ascii_case(b"text/event-stream") {
        Kind::Sse
    } else if essence.eq_ignore_ascii_case(b"application/json")
        || essence.eq_ignore_ascii_case(b"application/x-ndjson")
        || (has(essence.get(..12), b"application/")
            && has(essence.len().checked_sub(5).and_then(|s| essence.get(s..)), b"+json"))
    {
        Kind::Json
    } else {
        Kind::Other
    }
}

/// What the body has told us so far. Usage is merged field by field, newest first, so
/// cumulative usage chunks end at the last one and Anthropic's split usage (input tokens
/// in `message_start`, output tokens in `message_delta`) adds up.
#[derive(Debug, Default)]
struct Seen {
    prompt: Option<i64>,
    completion: Option<i64>,
    total: Option<i64>,
    /// Anthropic's parts of the prompt (`input_tokens`, cache writes, cache reads), each
    /// merged on its own: a later event may repeat one and leave out the others.
    anthropic_prompt: [Option<i64>; 3],
    model: Option<String>,
    /// The raw JSON of the last model value once a second one arrived: every SSE chunk
    /// repeats it, and comparing bytes avoids decoding (and allocating) the same string
    /// once per token.
    model_raw: Vec<u8>,
    /// A model value arrived before, usable or not: the next one is a stream's repeat.
    model_sighted: bool,
}

impl Seen {
    fn absorb(&mut self, field: Field, raw: &[u8]) {
        // `"usage": null` is on every OpenAI chunk once usage is requested: skip it cheaply.
        if raw.trim_ascii() == b"null" {
            return;
        }
        match field {
            Field::Usage => {
                let usage = flat::usage(raw).or_else(|| serde_json::from_slice::<WireUsage>(raw).ok());
                if let Some(usage) = usage {
                    self.merge(&usage);
                }
            }
            Field::UsageMetadata => {
                if let Ok(usage) = serde_json::from_slice::<WireGeminiUsage>(raw) {
                    self.merge(&usage.openai());
                }
            }
            Field::PromptEvalCount | Field::EvalCount => {
                if let Ok(Count(Some(n))) = serde_json::from_slice::<Count>(raw) {
                    let part = if field == Field::EvalCount {
                        &mut self.completion
                    } else {
                        &mut self.prompt
                    };
                    *part = Some(n);
                    // Ollama gives no total: it is the sum of these.
                    self.total = None;
                }
            }
            Field::Model | Field::ModelVersion => {
                if raw != self.model_raw.as_slice() {
                    // A JSON body names its model once: only a second sighting (a
                    // stream's next chunk) keeps the raw bytes to compare against. That
                    // includes values that are no usable name (a number, an empty
                    // string), so a stream repeating one is not decoded on every chunk.
                    if self.model_sighted {
                        self.model_raw.clear();
                        self.model_raw.extend_from_slice(raw);
                    }
                    self.model_sighted = true;
                    if let Some(model) = flat::model(raw).or_else(|| ModelName::decode(raw)) {
                        self.set_model(model);
                    }
                }
            }
            // Never captured: the scan reports what it finds inside as `Usage` and `Model`.
            Field::Response => {}
            Field::Message => {
                if let Ok(message) = serde_json::from_slice::<WireMessage>(raw) {
                    if let ModelName(Some(model)) = message.model {
                        self.set_model(model);
                    }
                    if let Some(usage) = &message.usage {
                        self.merge(usage);
                    }
                }
            }
        }
    }

    fn set_model(&mut self, model: String) {
        if !model.is_empty() {
            self.model = Some(model);
        }
    }

    fn merge(&mut self, usage: &WireUsage) {
        let prompt = usage.prompt_tokens.0.or_else(|| self.merge_anthropic_prompt(usage));
        let completion = usage.completion_tokens.0.or(usage.output_tokens.0);
        let total = usage.total_tokens.0;
        if prompt.is_none() && completion.is_none() && total.is_none() {
            return;
        }
        self.prompt = prompt.or(self.prompt);
        self.completion = completion.or(self.completion);
        // A newer object without `total_tokens` must not keep an older, stale total: the
        // total is then derived from the (newer) parts instead.
        self.total = total;
    }

    /// The prompt as OpenAI counts it (cached tokens included) from Anthropic's parts,
    /// when this object has any: billing only `input_tokens` would leave out every
    /// cached token, often most of an agent's prompt.
    fn merge_anthropic_prompt(&mut self, usage: &WireUsage) -> Option<i64> {
        let parts = [
            usage.input_tokens.0,
            usage.cache_creation_input_tokens.0,
            usage.cache_read_input_tokens.0,
        ];
        if parts.iter().all(Option::is_none) {
            return None;
        }
        for (kept, new) in self.anthropic_prompt.iter_mut().zip(parts) {
            *kept = new.or(*kept);
        }
        Some(
            self.anthropic_prompt
                .iter()
                .flatten()
                .fold(0i64, |sum, n| sum.saturating_add(*n)),
        )
    }
}

/// Price resolution: 1e-12 dollars per 1,000 tokens, exact for any price a config holds.
const PRICE_SCALE: f64 = 1e12;
/// `tokens × price units` is in 1e-15 dollars, i.e. 1e-9 micro-dollars.
const UNITS_PER_MICRO: i128 = 1_000_000_000;

/// Cost in millionths of a dollar, rounded half-up; None when no token count is known.
/// Uses prompt/completion prices when the parts are known; with only a total, prices the total at the prompt price.
/// With one part and the total, the other part is the difference.
pub fn cost_micros(pricing: &Pricing, tokens: &Tokens) -> Option<i64> {
    let price: Price = pricing.price(tokens.model.as_deref());
    let rest = |total: Option<i64>, part: i64| total.map_or(0, |t| t.saturating_sub(part).max(0));
    let (prompt, completion) = match (tokens.prompt, tokens.completion, tokens.total) {
        (None, None, None) => return None,
        (None, None, Some(total)) => (total, 0),
        (Some(p), Some(c), _) => (p, c),
        (Some(p), None, total) => (p, rest(total, p)),
        (None, Some(c), total) => (rest(total, c), c),
    };
    // Integers from here on: summing floats of micro-dollars would round 3084.9999… down.
    let units = |per_1k: f64| (per_1k * PRICE_SCALE).round() as i128;
    let sum = i128::from(prompt)
        .checked_mul(units(price.prompt_per_1k))?
        .checked_add(i128::from(completion).checked_mul(units(price.completion_per_1k))?)?;
    let micros = sum.checked_add(UNITS_PER_MICRO / 2)?.div_euclid(UNITS_PER_MICRO);
    i64::try_from(micros).ok()
}
