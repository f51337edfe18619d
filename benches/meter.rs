//! The usage meter's body scan per MiB: `TokenMeter::feed` over a 1 MiB JSON chat
//! completion and over 1 MiB of OpenAI-style SSE chunks (each repeating `model` and
//! `"usage": null`, the last one carrying usage), fed in 16 KiB frames and, for SSE,
//! one event per frame as a streaming upstream sends them; and the 305-byte body of
//! benches/load.sh's upstream, the per-request cost of metering a small completion.
//! Group `stream_usage`: asking a streaming request body for its usage
//! (`include_usage::ask`) on a 1.6 KB and a 100 KB chat request, on a 2.4 KB one that does
//! not stream (with and without saying `"stream":false`) and the same streaming, and
//! taking the usage chunk out of the 1 MiB SSE stream (`UsageChunkFilter`), one event
//! per frame.
//!
//! Run: `cargo bench --bench meter`. Under `cargo test --all-targets` each case runs
//! once (and the token counts read back are checked). No database, no network.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::HeaderValue;
use keygate::usage::include_usage::{ask, Asked};
use keygate::usage::meter::TokenMeter;
use keygate::usage::usage_chunk::UsageChunkFilter;

const MIB: usize = 1 << 20;
const FRAME: usize = 16 * 1024;

/// One chat completion whose assistant message makes the body about 1 MiB, with the
/// escapes a JSON string scanner must step over.
fn json_body() -> Vec<u8> {
    let mut content = String::new();
    while content.len() < MIB - 400 {
        content.push_str(r#"The quick \"brown\" fox jumps over the lazy dog.\n"#);
    }
    format!(
        r#"{{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"demo-1","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}}}"#
    )
    .into_bytes()
}

/// About 1 MiB of SSE events, one per token, then the usage chunk and `[DONE]`.
fn sse_events() -> Vec<Vec<u8>> {
    let mut events = Vec::new();
    let mut size = 0;
    while size < MIB - 600 {
        let e = format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"demo-1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token{} \"}},\"finish_reason\":null}}],\"usage\":null}}\n\n",
            events.len()
        );
        size += e.len();
        events.push(e.into_bytes());
    }
    events.push(
        b"data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"demo-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":34,\"total_tokens\":46}}\n\n".to_vec(),
    );
    events.push(b"data: [DONE]\n\n".to_vec());
    events
}

/// The body benches/load.sh's upstream answers: what the meter sees per proxied request.
const SMALL_JSON: &str = r#"{"id":"chatcmpl-load","object":"chat.completion","created":1700000000,"model":"demo-1","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! This is a fixed reply from the load-test upstream."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}"#;

fn meter_for(content_type: &'static str, frames: &[&[u8]]) -> TokenMeter {
    let mut m = TokenMeter::new(Some(&HeaderValue::from_static(content_type)), None);
    for f in frames {
        m.feed(f);
    }
    m
}

fn meter(c: &mut Criterion) {
    let json = json_body();
    let sse: Vec<Vec<u8>> = sse_events();
    let sse_flat: Vec<u8> = sse.concat();
    let small = SMALL_JSON.as_bytes();
    let cases: [(&str, &'static str, Vec<&[u8]>, usize); 4] = [
        ("json_305_bytes", "application/json", vec![small], small.len()),
        (
            "json_16k_frames",
            "application/json",
            json.chunks(FRAME).collect(),
            json.len(),
        ),
        (
            "sse_16k_frames",
            "text/event-stream",
            sse_flat.chunks(FRAME).collect(),
            sse_flat.len(),
        ),
        (
            "sse_event_frames",
            "text/event-stream",
            sse.iter().map(Vec::as_slice).collect(),
            sse_flat.len(),
        ),
    ];
    let mut g = c.benchmark_group("meter");
    for (name, content_type, frames, len) in &cases {
        let t = meter_for(content_type, frames).tokens();
        assert_eq!(
            (t.prompt, t.completion, t.total),
            (Some(12), Some(34), Some(46)),
            "{name}"
        );
        assert_eq!(t.model.as_deref(), Some("demo-1"), "{name}");
        g.throughput(Throughput::Bytes(*len as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), frames, |b, frames| {
            b.iter(|| meter_for(content_type, frames).tokens())
        });
    }
    g.finish();
}

/// A chat request with a conversation of `turns` messages of about 150 bytes about
/// `topic`, ending in `tail` (`,"stream":true`, or nothing).
fn chat_request(turns: usize, topic: &str, tail: &str) -> Vec<u8> {
    let messages: Vec<String> = (0..turns)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            format!(r#"{{"role":"{role}","content":"Turn {i}: tell me about \"{topic}\", usage accounting and why the last chunk matters.\n"}}"#)
        })
        .collect();
    format!(
        r#"{{"model":"gpt-4o-mini","temperature":0.7,"max_tokens":512,"messages":[{}]{tail}}}"#,
        messages.join(",")
    )
    .into_bytes()
}

fn stream_usage(c: &mut Criterion) {
    let mut g = c.benchmark_group("stream_usage");
    let streams = |turns| chat_request(turns, "streams", r#","stream":true"#);
    for (name, body) in [("ask_1k6", streams(10)), ("ask_100k", streams(640))] {
        assert!(matches!(ask(&body), Asked::Rewritten(_)), "{name}");
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| b.iter(|| ask(&body)));
    }
    // A request that does not stream, without the word `stream` or with
    // `"stream":false` once, is not parsed; the same request streaming is.
    for (name, body, streams) in [
        ("no_stream_2k4", chat_request(20, "rivers", ""), false),
        (
            "stream_false_2k4",
            chat_request(20, "rivers", r#","stream":false"#),
            false,
        ),
        ("stream_true_2k4", chat_request(20, "rivers", r#","stream":true"#), true),
    ] {
        assert_eq!(matches!(ask(&body), Asked::Rewritten(_)), streams, "{name}");
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| b.iter(|| ask(&body)));
    }
    let events: Vec<bytes::Bytes> = sse_events().into_iter().map(bytes::Bytes::from).collect();
    let len: usize = events.iter().map(|e| e.len()).sum();
    let filter = |events: &[bytes::Bytes]| {
        let mut f = UsageChunkFilter::new();
        let out: usize = events.iter().map(|e| f.push(e.clone()).len()).sum();
        (out + f.finish().len(), f.dropped())
    };
    assert!(filter(&events).1, "the usage chunk was not dropped");
    g.throughput(Throughput::Bytes(len as u64));
    g.bench_function("filter_sse_event_frames", |b| b.iter(|| filter(&events)));
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = meter, stream_usage
}
criterion_main!(benches);
