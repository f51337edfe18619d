//! The shapes the meter decodes from captured JSON values: the `usage` object (OpenAI
//! names and Anthropic's aliases), Anthropic's `message`, and the two leaf kinds in
//! them, a token count and a model name.
//!
//! Owns leniency: a field of the wrong type reads as unknown without failing the
//! fields around it, as upstreams are not all careful. Decoding goes straight into these
//! types, not through `serde_json::Value`, which allocated a map entry and a number
//! or string per field (1.5 µs for a small completion). It does not own merging the
//! values (`meter.rs`) or finding them in the stream (`json_scan`).

use std::fmt;

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// The usage fields we read; others (`*_details`, `cache_creation`) are skipped
/// unallocated. Anthropic's `input_tokens` leaves out the prompt tokens written to or
/// read from its cache, which it reports (and bills) in the two `cache_*` counts.
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub(super) struct WireUsage {
    pub prompt_tokens: Count,
    pub completion_tokens: Count,
    pub total_tokens: Count,
    pub input_tokens: Count,
    pub output_tokens: Count,
    pub cache_creation_input_tokens: Count,
    pub cache_read_input_tokens: Count,
}

/// Gemini's `usageMetadata`. Thinking tokens are billed as output but left out of
/// `candidatesTokenCount`, and tool-use prompt tokens out of `promptTokenCount`;
/// cached-content tokens are already inside `promptTokenCount`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct WireGeminiUsage {
    pub prompt_token_count: Count,
    pub tool_use_prompt_token_count: Count,
    pub candidates_token_count: Count,
    pub thoughts_token_count: Count,
    pub total_token_count: Count,
}

impl WireGeminiUsage {
    /// The same counts, as OpenAI names them.
    pub fn openai(&self) -> WireUsage {
        let sum = |a: Count, b: Count| match (a.0, b.0) {
            (None, None) => Count(None),
            (a, b) => Count(a.unwrap_or(0).checked_add(b.unwrap_or(0))),
        };
        WireUsage {
            prompt_tokens: sum(self.prompt_token_count, self.tool_use_prompt_token_count),
            completion_tokens: sum(self.candidates_token_count, self.thoughts_token_count),
            total_tokens: self.total_token_count,
            ..WireUsage::default()
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct WireMessage {
    pub model: ModelName,
    pub usage: Option<WireUsage>,
}

/// A token count: a non-negative integer (an integral float is accepted too); any
/// other value is `None`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Count(pub Option<i64>);

/// A string; any other value is `None`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct ModelName(pub Option<String>);

impl ModelName {
    /// The name in one raw JSON value, as serde reads it; `None` for any other value or
    /// malformed input.
    pub fn decode(raw: &[u8]) -> Option<String> {
        serde_json::from_slice::<Self>(raw)
            .ok()
            .and_then(|ModelName(name)| name)
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Lenient(|v: Leaf<'_>| match v {
            Leaf::Int(n) => Count((n >= 0).then_some(n)),
            Leaf::Uint(n) => Count(i64::try_from(n).ok()),
            Leaf::Float(f) => Count((f.fract() == 0.0 && (0.0..9.0e18).contains(&f)).then_some(f as i64)),
            Leaf::Str(_) | Leaf::Other => Count(None),
        }))
    }
}

impl<'de> Deserialize<'de> for ModelName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Lenient(|v: Leaf<'_>| match v {
            Leaf::Str(s) => ModelName(Some(s.to_owned())),
            _ => ModelName(None),
        }))
    }
}

/// Any JSON value, reduced to what the two leaf types care about.
enum Leaf<'a> {
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(&'a str),
    Other,
}

/// A visitor that accepts every JSON value, skipping arrays and objects whole, and
/// maps it with `F`.
struct Lenient<F>(F);

impl<'de, T, F: FnOnce(Leaf<'_>) -> T> Visitor<'de> for Lenient<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_i64<E>(self, v: i64) -> Result<T, E> {
        Ok((self.0)(Leaf::Int(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<T, E> {
        Ok((self.0)(Leaf::Uint(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<T, E> {
        Ok((self.0)(Leaf::Float(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<T, E> {
        Ok((self.0)(Leaf::Str(v)))
    }
    fn visit_bool<E>(self, _: bool) -> Result<T, E> {
        Ok((self.0)(Leaf::Other))
    }
    fn visit_unit<E>(self) -> Result<T, E> {
        Ok((self.0)(Leaf::Other))
    }
    fn visit_none<E>(self) -> Result<T, E> {
        Ok((self.0)(Leaf::Other))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok((self.0)(Leaf::Other))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok((self.0)(Leaf::Other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(json: &str) -> Option<i64> {
        serde_json::from_str::<Count>(json).expect("any value decodes").0
    }

    #[test]
    fn counts_are_lenient() {
        assert_eq!(count("12"), Some(12));
        assert_eq!(count("12.0"), Some(12));
        assert_eq!(count("1e3"), Some(1000));
        for unknown in [
            "-1",
            "1.5",
            "\"12\"",
            "null",
            "true",
            "[1]",
            "{\"a\":1}",
            "18446744073709551615",
            "9e18",
        ] {
            assert_eq!(count(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn a_bad_field_does_not_spoil_the_others() {
        let u: WireUsage =
            serde_json::from_str(r#"{"prompt_tokens":"x","completion_tokens":3,"total_tokens":{"n":1},"extra":[1,2]}"#)
                .expect("usage");
        assert_eq!(
            (u.prompt_tokens.0, u.completion_tokens.0, u.total_tokens.0),
            (None, Some(3), None)
        );
        let m: WireMessage = serde_json::from_str(r#"{"model":7,"usage":{"input_tokens":4}}"#).expect("message");
        assert_eq!(m.model, ModelName(None));
        assert_eq!(m.usage.map(|u| u.input_tokens.0), Some(Some(4)));
        let m: ModelName = serde_json::from_str(r#""gpt-\u00e9""#).expect("model");
        assert_eq!(m.0.as_deref(), Some("gpt-é"));
    }
}
