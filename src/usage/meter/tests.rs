//! Tests of the token meter's JSON path, content-type routing, header fallback, cost
//! arithmetic and no-panic fuzzing, plus the shared helpers (`feed_all_ways`, a tiny
//! PRNG) that `sse_tests` uses. SSE framing cases live in `sse_tests`.

use std::collections::HashMap;

use http::HeaderValue;

use super::*;

/// xorshift64*: deterministic, dependency-free randomness for split and fuzz tests.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
    }
}

pub(super) fn meter(content_type: &str, header_total: Option<i64>) -> TokenMeter {
    TokenMeter::new(
        Some(&HeaderValue::from_str(content_type).expect("header")),
        header_total,
    )
}

pub(super) fn feed_chunks<'a>(ct: &str, chunks: impl IntoIterator<Item = &'a [u8]>) -> TokenMeter {
    let mut m = meter(ct, None);
    for chunk in chunks {
        m.feed(chunk);
    }
    m
}

/// Feeds `body` whole, split at every byte boundary, byte by byte and in random pieces;
/// every way must give the same tokens, which are returned.
pub(super) fn feed_all_ways(ct: &str, body: &[u8]) -> Tokens {
    let whole = feed_chunks(ct, [body]).tokens();
    for at in 0..=body.len() {
        let (a, b) = body.split_at(at);
        assert_eq!(feed_chunks(ct, [a, b]).tokens(), whole, "split at {at}");
    }
    assert_eq!(feed_chunks(ct, body.chunks(1)).tokens(), whole, "byte by byte");
    let mut rng = Rng::new(body.len() as u64);
    for round in 0..100 {
        let mut m = meter(ct, None);
        let mut rest = body;
        while !rest.is_empty() {
            let (a, b) = rest.split_at(rng.below(rest.len().min(64)) + 1);
            m.feed(a);
            rest = b;
        }
        assert_eq!(m.tokens(), whole, "random split round {round}");
    }
    whole
}

pub(super) fn tokens(prompt: Option<i64>, completion: Option<i64>, total: Option<i64>, model: &str) -> Tokens {
    Tokens {
        prompt,
        completion,
        total,
        model: (!model.is_empty()).then(|| model.to_owned()),
    }
}

const JSON: &str = "application/json";

#[test]
fn json_full_completion() {
    let body = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o",
        "choices":[{"index":0,"message":{"role":"assistant","content":"Hi {there}, \"quoted\" \\"},
        "finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,
        "prompt_tokens_details":{"cached_tokens":0}}}"#;
    assert_eq!(feed_all_ways(JSON, body), tokens(Some(12), Some(3), Some(15), "gpt-4o"));
}

#[test]
fn json_key_order_and_escapes_do_not_matter() {
    let body = br#" { "usage" : { "completion_tokens" : 2 , "prompt_tokens" : 5 } , "model" : "m\"x\u00e9" } "#;
    assert_eq!(feed_all_ways(JSON, body), tokens(Some(5), Some(2), Some(7), "m\"xé"));
    let total_only = br#"{"usage": {"total_tokens": 42}}"#;
    assert_eq!(feed_all_ways(JSON, total_only), tokens(None, None, Some(42), ""));
}

#[test]
fn json_large_body_with_decoys_stays_bounded() {
    let decoy = r#"say \"usage\": {\"prompt_tokens\": 999999, \"total_tokens\": 1} and \"model\": \"decoy\" } ] { "#;
    let content = decoy.repeat(300_000 / decoy.len());
    let body = format!(
        r#"{{"id":"x","model":"gpt-4o","choices":[{{"index":0,"usage":{{"prompt_tokens":5}},"model":"nested",
        "message":{{"role":"assistant","content":"{content}"}}}}],"note":"usage",
        "usage":{{"prompt_tokens":1234,"completion_tokens":56,"total_tokens":1290}}}}"#
    );
    assert!(body.len() > 256 * 1024);
    let want = tokens(Some(1234), Some(56), Some(1290), "gpt-4o");
    for size in [1, 7, 4096, 65_536, body.len()] {
        let m = feed_chunks(JSON, body.as_bytes().chunks(size));
        assert_eq!(m.tokens(), want, "chunks of {size}");
        assert!(m.heap_bytes() <= 16 * 1024, "{} heap bytes", m.heap_bytes());
    }
}

#[test]
fn json_abandoned_halfway_keeps_what_completed() {
    let body = br#"{"model":"gpt-4o","choices":[{"message":{"content":"long"}}],"usage":{"prompt_tokens":3,"#;
    assert_eq!(feed_all_ways(JSON, body), tokens(None, None, None, "gpt-4o"));
}

#[test]
fn anthropic_aliases_in_json() {
    let body = br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-3-5-sonnet",
        "content":[{"type":"text","text":"Hello"}],"usage":{"input_tokens":10,"output_tokens":5}}"#;
    assert_eq!(
        feed_all_ways(JSON, body),
        tokens(Some(10), Some(5), Some(15), "claude-3-5-sonnet")
    );
}

#[test]
fn anthropic_cached_prompt_tokens_are_prompt_tokens() {
    // Anthropic bills cache writes and reads as input; `input_tokens` is only the rest.
    let body = br#"{"id":"msg_1","type":"message","model":"claude-sonnet-4","content":[],
        "usage":{"input_tokens":4,"cache_creation_input_tokens":1200,"cache_read_input_tokens":30000,
        "cache_creation":{"ephemeral_5m_input_tokens":1200},"output_tokens":50}}"#;
    let want = tokens(Some(31_204), Some(50), Some(31_254), "claude-sonnet-4");
    assert_eq!(feed_all_ways(JSON, body), want);
    // An OpenAI-style object that also names cache counts (LiteLLM's) already counts
    // them in `prompt_tokens`: not added twice.
    let body = br#"{"model":"m","usage":{"prompt_tokens":100,"completion_tokens":5,"total_tokens":105,
        "cache_read_input_tokens":80}}"#;
    assert_eq!(feed_all_ways(JSON, body), tokens(Some(100), Some(5), Some(105), "m"));
}

#[test]
fn responses_api_json_body() {
    // Non-streaming `/v1/responses`: `usage` at the top, with input/output names.
    let body = br#"{"id":"resp_1","object":"response","status":"completed","model":"gpt-4.1",
        "output":[{"type":"message","content":[{"type":"output_text","text":"Hi"}]}],
        "usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":20},"output_tokens":87,
        "output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}}"#;
    assert_eq!(
        feed_all_ways(JSON, body),
        tokens(Some(36), Some(87), Some(123), "gpt-4.1")
    );
    // A JSON body is not looked into: only a stream's events nest their usage.
    let nested = br#"{"response":{"model":"x","usage":{"total_tokens":5}}}"#;
    assert_eq!(feed_all_ways(JSON, nested), Tokens::default());
}

#[test]
fn oversized_usage_value_is_dropped_not_grown() {
    let body = format!(
        r#"{{"usage":{{"total_tokens":9,"pad":"{}"}},"model":"m"}}"#,
        "x".repeat(100_000)
    );
    let m = feed_chunks(JSON, [body.as_bytes()]);
    assert_eq!(m.tokens(), tokens(None, None, None, "m"));
    assert!(m.heap_bytes() <= 16 * 1024);
}

#[test]
fn content_type_routing() {
    let body = br#"{"model":"m","usage":{"total_tokens":7}}"#;
    let seen = |ct: &str| feed_chunks(ct, [&body[..]]).tokens().total;
    for ct in [
        "Application/JSON; charset=utf-8",
        "application/vnd.api+json",
        "application/problem+JSON",
    ] {
        assert_eq!(seen(ct), Some(7), "{ct}");
    }
    for ct in [
        "text/plain",
        "application/jsonx",
        "application/octet-stream",
        "+json",
        "",
    ] {
        assert_eq!(seen(ct), None, "{ct}");
    }
    let mut none = TokenMeter::new(None, None);
    none.feed(body);
    assert_eq!(none.tokens(), Tokens::default());
    let binary = HeaderValue::from_bytes(b"application/\xffjson").expect("header");
    let mut odd = TokenMeter::new(Some(&binary), None);
    odd.feed(body);
    assert_eq!(odd.tokens(), Tokens::default());
}

#[test]
fn header_total_is_the_fallback() {
    let mut plain = meter("text/plain", Some(33));
    plain.feed(br#"{"usage":{"total_tokens":7}}"#);
    assert_eq!(plain.tokens(), tokens(None, None, Some(33), ""));
    let mut json = meter(JSON, Some(33));
    json.feed(br#"{"model":"m","choices":[]}"#);
    assert_eq!(json.tokens(), tokens(None, None, Some(33), "m"));
    let mut body_wins = meter(JSON, Some(33));
    body_wins.feed(br#"{"usage":{"prompt_tokens":1,"completion_tokens":2}}"#);
    assert_eq!(body_wins.tokens().total, Some(3));
}

fn pricing() -> Pricing {
    let gpt = Price {
        prompt_per_1k: 0.0025,
        completion_per_1k: 0.01,
    };
    Pricing {
        default: Price {
            prompt_per_1k: 0.001,
            completion_per_1k: 0.002,
        },
        models: HashMap::from([("gpt-4o".to_owned(), gpt)]),
    }
}

#[test]
fn cost_rounds_half_up_from_exact_integers() {
    let p = pricing();
    let cost = |pr, co, to, model: &str| cost_micros(&p, &tokens(pr, co, to, model));
    assert_eq!(cost(Some(1234), Some(56), Some(1290), "gpt-4o"), Some(3085 + 560));
    assert_eq!(
        cost(None, None, Some(1000), "gpt-4o"),
        Some(2500),
        "total at the prompt price"
    );
    assert_eq!(
        cost(Some(10), None, Some(15), "gpt-4o"),
        Some(25 + 50),
        "missing part from the total"
    );
    assert_eq!(cost(None, Some(5), Some(15), "gpt-4o"), Some(25 + 50));
    assert_eq!(cost(None, None, None, "gpt-4o"), None);
    let half = Pricing {
        default: Price {
            prompt_per_1k: 0.0005,
            completion_per_1k: 0.0004,
        },
        models: HashMap::new(),
    };
    let cost = |pr, co| cost_micros(&half, &tokens(Some(pr), Some(co), None, ""));
    assert_eq!(cost(1, 0), Some(1), "0.5 rounds up");
    assert_eq!(cost(0, 1), Some(0), "0.4 rounds down");
    assert_eq!(cost(3, 0), Some(2), "1.5 rounds up");
    assert_eq!(cost(1, 1), Some(1), "0.9 rounds once, on the sum");
}

#[test]
fn unknown_model_uses_default_price() {
    let p = pricing();
    let want = Some(1234 + 112);
    assert_eq!(cost_micros(&p, &tokens(Some(1234), Some(56), None, "mystery")), want);
    assert_eq!(cost_micros(&p, &tokens(Some(1234), Some(56), None, "")), want);
}

#[test]
fn cost_never_panics_on_extremes() {
    let wild = Pricing {
        default: Price {
            prompt_per_1k: f64::MAX,
            completion_per_1k: f64::NAN,
        },
        models: HashMap::new(),
    };
    assert_eq!(
        cost_micros(&wild, &tokens(Some(i64::MAX), Some(i64::MAX), None, "")),
        None
    );
    assert_eq!(cost_micros(&wild, &tokens(Some(0), Some(i64::MAX), None, "")), Some(0));
    let negative = tokens(Some(i64::MIN), Some(-1), Some(i64::MAX), "gpt-4o");
    assert_eq!(cost_micros(&pricing(), &negative), None, "out of i64 range");
}

#[test]
fn random_bytes_never_panic_stay_bounded_and_read_the_same_however_cut() {
    let alphabet: &[u8] = b"{}[]\":,\\ \n\r\tdata: usage model message 0123456789.e-nul\xef\xbb\xbf\xff";
    let mut rng = Rng::new(7);
    for round in 0..600 {
        let len = rng.below(3000);
        let body: Vec<u8> = (0..len)
            .map(|_| match round % 3 {
                0 => rng.below(256) as u8,
                _ => alphabet.get(rng.below(alphabet.len())).copied().unwrap_or(b'x'),
            })
            .collect();
        for ct in [JSON, "text/event-stream", "text/plain"] {
            let mut m = meter(ct, Some(1));
            let mut rest = &body[..];
            while !rest.is_empty() {
                let (a, b) = rest.split_at(rng.below(rest.len()) + 1);
                m.feed(a);
                rest = b;
            }
            assert!(m.heap_bytes() <= 16 * 1024);
            // Garbage too (a backslash outside a string, a stray quote) reads the same
            // whole as cut: the scan's state carries every cut.
            let mut whole = meter(ct, Some(1));
            whole.feed(&body);
            assert_eq!(m.tokens(), whole.tokens(), "{ct} {:?}", String::from_utf8_lossy(&body));
        }
    }
}

/// `cargo test --release --lib usage::meter -- --ignored --nocapture` prints throughput.
#[test]
#[ignore = "micro benchmark; run by hand in release mode"]
fn throughput() {
    let content = "word ".repeat(8 << 20 >> 2);
    let json = format!(
        r#"{{"model":"gpt-4o","choices":[{{"message":{{"content":"{content}"}}}}],"usage":{{"total_tokens":1}}}}"#
    );
    let event = r#"data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"content":" word"},"finish_reason":null}],"usage":null}"#;
    let sse = format!("{event}\n\n").repeat(40_000);
    for (ct, body) in [(JSON, json.as_bytes()), ("text/event-stream", sse.as_bytes())] {
        let start = std::time::Instant::now();
        let m = feed_chunks(ct, body.chunks(16 * 1024));
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "{ct}: {:.0} MB/s ({:?})",
            body.len() as f64 / secs / 1e6,
            m.tokens().model
        );
    }
}
