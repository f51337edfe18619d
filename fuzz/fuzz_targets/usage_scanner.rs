//! Fuzz target `usage_scanner`: the streaming usage reader `keygate::usage::meter::TokenMeter`,
//! through both of its byte scanners, JSON bodies (`application/json`) and event streams
//! (`text/event-stream`), with the body split into frames at fuzzer-chosen points.
//!
//! Input layout (so seeds stay easy to write, see ../README.md):
//! - byte 0: `k`, the number of cut points, taken modulo 17;
//! - the next `2k` bytes: `k` little-endian u16 cut offsets, each taken modulo (body length + 1);
//! - the rest: the response body.
//!
//! Every body is read as JSON and as SSE (and as an ignored content type). Properties
//! checked (a failed `assert!` is a crash):
//! - feeding never panics;
//! - the result (`tokens()`) is the same whether the body arrives in one frame, in the
//!   fuzzer's frames (empty frames included), or one byte per frame;
//! - token counts are never negative, a model is never empty, and the meter's heap stays
//!   bounded (its capture caps: a few KiB, asserted below 32 KiB);
//! - `cost_micros` on the result does not panic;
//! - an ignored content type reads nothing;
//! - the body read whole as a `usage` object and as a model name: wherever the meter's
//!   fast path answers, serde's decode gives the same answer (`fast_path_agrees`);
//! - `usage_chunk::UsageChunkFilter` (the answer's usage chunk taken out) gives the same
//!   output in one frame, the fuzzer's frames and one byte per frame; what it did not
//!   drop from it passes byte for byte, and a drop only shortens it;
//! - the body read as a request by `include_usage::ask`: a rewrite parses (serde_json)
//!   as the body with `stream_options.include_usage` set, only for `"stream": true`;
//!   "already asked" means it is set; a body left unchanged that streams has a
//!   `stream_options` keygate cannot add to (neither an object nor null).

#![no_main]

use http::HeaderValue;
use keygate::config::{Price, Pricing};
use keygate::usage::include_usage::{ask, Asked};
use keygate::usage::meter::{cost_micros, fast_path_agrees, TokenMeter, Tokens};
use keygate::usage::usage_chunk::UsageChunkFilter;
use serde_json::{json, Value};
use libfuzzer_sys::fuzz_target;

const MAX_CUTS: usize = 16;
const HEAP_BOUND: usize = 32 * 1024;
const CONTENT_TYPES: [&str; 2] = ["application/json", "text/event-stream"];

fuzz_target!(|data: &[u8]| {
    let (cuts, body) = split_input(data);
    let pricing = pricing();
    for content_type in CONTENT_TYPES {
        let whole = run(content_type, body, &[body]);
        let frames = frames(body, &cuts);
        let chunked = run(content_type, body, &frames);
        assert_eq!(whole, chunked, "{content_type}: frames {cuts:?} changed the result");
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        let bytewise = run(content_type, body, &bytes);
        assert_eq!(whole, bytewise, "{content_type}: byte-at-a-time changed the result");
        check_tokens(&whole);
        let _ = cost_micros(&pricing, &whole);
    }
    assert_eq!(
        run("text/plain", body, &[body]),
        Tokens::default(),
        "ignored type read tokens"
    );
    assert!(fast_path_agrees(body), "the fast path and serde disagree");
    let whole = filtered(&[body]);
    assert_eq!(whole, filtered(&frames(body, &cuts)), "frames {cuts:?} changed the filter's output");
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(whole, filtered(&bytes), "byte-at-a-time changed the filter's output");
    match whole {
        (out, false) => assert_eq!(out, body, "nothing dropped, yet the stream changed"),
        (out, true) => assert!(out.len() < body.len(), "a drop that did not shorten"),
    }
    check_ask(body);
});

fn filtered(frames: &[&[u8]]) -> (Vec<u8>, bool) {
    let mut f = UsageChunkFilter::new();
    let mut out = Vec::new();
    for frame in frames {
        out.extend_from_slice(&f.push(bytes::Bytes::copy_from_slice(frame)));
    }
    out.extend_from_slice(&f.finish());
    (out, f.dropped())
}

fn check_ask(body: &[u8]) {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let streams = parsed.as_ref().is_some_and(|v| v["stream"] == json!(true));
    match ask(body) {
        Asked::Rewritten(out) => {
            let mut want = parsed.expect("a rewritten body was JSON");
            assert!(streams, "rewrote a body that does not stream");
            let opts = &mut want["stream_options"];
            if !opts.is_object() {
                *opts = json!({});
            }
            opts["include_usage"] = json!(true);
            let got: Value = serde_json::from_slice(&out).expect("a rewritten body parses");
            assert_eq!(got, want, "the rewrite changed more than include_usage");
        }
        Asked::AlreadyAsked => {
            let v = parsed.expect("an asking body was JSON");
            assert!(streams && v["stream_options"]["include_usage"] == json!(true));
        }
        Asked::Ambiguous => assert!(parsed.is_some(), "ambiguous, yet not JSON"),
        Asked::Unchanged if streams => {
            let opts = &parsed.expect("streams")["stream_options"];
            assert!(!opts.is_null() && !opts.is_object(), "a stream left unasked: {opts}");
        }
        Asked::Unchanged => {}
    }
}

/// Parses the input header; a short or odd header just means fewer cuts.
fn split_input(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let Some((&k, rest)) = data.split_first() else {
        return (Vec::new(), &[]);
    };
    let k = usize::from(k) % (MAX_CUTS + 1);
    let header_len = (2 * k).min(rest.len());
    let (header, body) = rest.split_at(header_len);
    let mut cuts: Vec<usize> = header
        .chunks_exact(2)
        .map(|p| usize::from(u16::from_le_bytes([p[0], p[1]])) % (body.len() + 1))
        .collect();
    cuts.sort_unstable();
    (cuts, body)
}

/// `body` split at the sorted `cuts`; repeated cuts give empty frames, which the proxy can see too.
fn frames<'a>(body: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for &cut in cuts {
        out.push(body.get(start..cut).unwrap_or_default());
        start = cut;
    }
    out.push(body.get(start..).unwrap_or_default());
    let total: usize = out.iter().map(|f| f.len()).sum();
    assert_eq!(total, body.len(), "harness bug: frames do not cover the body");
    out
}

fn run(content_type: &'static str, body: &[u8], frames: &[&[u8]]) -> Tokens {
    let value = HeaderValue::from_static(content_type);
    let mut meter = TokenMeter::new(Some(&value), None);
    for frame in frames {
        meter.feed(frame);
        assert!(
            meter.heap_bytes() <= HEAP_BOUND,
            "{content_type}: meter holds {} heap bytes after {} body bytes",
            meter.heap_bytes(),
            body.len()
        );
    }
    meter.tokens()
}

fn check_tokens(t: &Tokens) {
    for n in [t.prompt, t.completion, t.total].into_iter().flatten() {
        assert!(n >= 0, "negative token count in {t:?}");
    }
    if let Some(model) = &t.model {
        assert!(!model.is_empty(), "empty model recorded");
    }
}

fn pricing() -> Pricing {
    let mut pricing = Pricing {
        default: Price {
            prompt_per_1k: 0.0015,
            completion_per_1k: 0.002,
        },
        ..Pricing::default()
    };
    pricing.models.insert(
        "gpt-4o".into(),
        Price {
            prompt_per_1k: 0.0025,
            completion_per_1k: 0.01,
        },
    );
    pricing
}
