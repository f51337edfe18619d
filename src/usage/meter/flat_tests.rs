//! The fast path (`flat`) against serde (`wire`) as the oracle: on random usage objects
//! and model names, well-formed and not, every answer the fast path gives must be the
//! one serde gives, and the shapes real upstreams send must get an answer.

use super::flat;
use super::tests::Rng;
use super::wire::{Count, ModelName, WireUsage};

fn serde_usage(raw: &str) -> Option<WireUsage> {
    serde_json::from_str(raw).ok()
}

fn pick<'a>(rng: &mut Rng, from: &[&'a str]) -> &'a str {
    from[rng.below(from.len())]
}

/// Whitespace, now and then a byte JSON does not count as whitespace.
fn ws(rng: &mut Rng, out: &mut String) {
    for _ in 0..rng.below(3) {
        out.push_str(pick(rng, &[" ", "\n", "\t", "\r", " ", " ", " ", " ", "\u{c}"]));
    }
}

const KEYS: &[&str] = &[
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "input_tokens",
    "output_tokens",
    "prompt_tokens_details",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "service_tier",
    "",
    "prompt\\u005ftokens",
    "t\u{f6}kens",
    "total_tokens ",
];

const LEAVES: &[&str] = &[
    "0",
    "7",
    "12",
    "305",
    "1000000",
    "007",
    "-3",
    "-0",
    "-",
    "12.0",
    "1e3",
    "1E3",
    "2.5",
    "123456789012345678",
    "1234567890123456789",
    "99999999999999999999",
    "null",
    "true",
    "false",
    "nul",
    "tru",
    "\"12\"",
    "\"standard\"",
    "\"a\\\"b\"",
    "\"\u{e9}\"",
    "\"\u{1}\"",
    "+1",
    ".5",
    "01",
];

fn value(rng: &mut Rng, depth: usize, out: &mut String) {
    match rng.below(if depth == 0 { 4 } else { 6 }) {
        0..=3 => out.push_str(pick(rng, LEAVES)),
        4 => {
            out.push('[');
            for i in 0..rng.below(4) {
                if i > 0 {
                    out.push(',');
                }
                ws(rng, out);
                value(rng, depth - 1, out);
            }
            if rng.below(20) == 0 {
                out.push(',');
            }
            out.push(']');
        }
        _ => object(rng, depth - 1, out),
    }
}

fn object(rng: &mut Rng, depth: usize, out: &mut String) {
    out.push('{');
    let members = rng.below(7);
    for i in 0..members {
        if i > 0 && rng.below(30) != 0 {
            out.push(',');
        }
        ws(rng, out);
        out.push('"');
        out.push_str(pick(rng, KEYS));
        out.push('"');
        ws(rng, out);
        if rng.below(40) != 0 {
            out.push(':');
        }
        ws(rng, out);
        value(rng, depth, out);
        ws(rng, out);
    }
    if rng.below(30) == 0 {
        out.push(',');
    }
    if rng.below(30) != 0 {
        out.push('}');
    }
}

#[test]
fn usage_answers_are_serdes_answers() {
    let mut rng = Rng::new(0x5eed_f1a7);
    let (mut answered, mut serde_ok) = (0, 0);
    for _ in 0..20_000 {
        let mut doc = String::new();
        ws(&mut rng, &mut doc);
        if rng.below(40) == 0 {
            value(&mut rng, 3, &mut doc);
        } else {
            object(&mut rng, 3, &mut doc);
        }
        ws(&mut rng, &mut doc);
        if rng.below(40) == 0 {
            doc.push_str(pick(&mut rng, &["x", "}", ",", "0"]));
        }
        let oracle = serde_usage(&doc);
        serde_ok += usize::from(oracle.is_some());
        if let Some(fast) = flat::usage(doc.as_bytes()) {
            answered += 1;
            assert_eq!(Some(fast), oracle, "{doc:?}");
        }
    }
    // The generator makes enough well-formed plain objects for the fast path to matter,
    // and enough of everything else for serde to be asked.
    assert!(answered > 2_000, "fast path answered only {answered}");
    assert!(serde_ok > answered + 500, "serde {serde_ok}, fast {answered}");
}

#[test]
fn the_shapes_upstreams_send_take_the_fast_path() {
    let openai = r#"{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,
        "prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},
        "completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,
        "accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#;
    let anthropic = r#"{"input_tokens":2095,"output_tokens":503,"cache_creation_input_tokens":0,
        "cache_read_input_tokens":0,"cache_creation":null,"service_tier":"standard",
        "server_tool_use":{"web_search_requests":1},"tags":["a",-1,true,[]]}"#;
    for doc in [openai, anthropic, "{}", " { } "] {
        let fast = flat::usage(doc.as_bytes());
        assert!(fast.is_some(), "{doc}");
        assert_eq!(fast, serde_usage(doc), "{doc}");
    }
    let u = flat::usage(openai.as_bytes()).expect("openai");
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (Count(Some(19)), Count(Some(10)), Count(Some(29)))
    );
    let u = flat::usage(anthropic.as_bytes()).expect("anthropic");
    assert_eq!((u.input_tokens, u.output_tokens), (Count(Some(2095)), Count(Some(503))));
    assert_eq!(
        (u.cache_creation_input_tokens, u.cache_read_input_tokens),
        (Count(Some(0)), Count(Some(0)))
    );
}

#[test]
fn what_the_fast_path_leaves_to_serde() {
    for doc in [
        r#"{"prompt_tokens":12,"prompt_tokens":13}"#,
        r#"{"prompt\u005ftokens":12}"#,
        r#"{"prompt_tokens":12.0}"#,
        r#"{"prompt_tokens":"12"}"#,
        r#"{"prompt_tokens":-1}"#,
        r#"{"prompt_tokens":1234567890123456789}"#,
        r#"{"x":{"a":{"b":{"c":{"d":{"e":1}}}}}}"#,
        r#"[1,2,3]"#,
        r#"{"x":"caf\u00e9"}"#,
    ] {
        assert_eq!(flat::usage(doc.as_bytes()), None, "{doc}");
    }
    // ... and what serde then makes of them, unchanged by the fast path.
    let dup = serde_usage(r#"{"prompt_tokens":12,"prompt_tokens":13}"#);
    assert_eq!(dup, None, "serde refuses a duplicate field");
    let escaped = serde_usage(r#"{"prompt\u005ftokens":12}"#).expect("escaped key");
    assert_eq!(escaped.prompt_tokens, Count(Some(12)));
}

#[test]
fn model_answers_are_serdes_answers() {
    let mut rng = Rng::new(0x0de1_5eed);
    let parts = [
        "gpt-4o",
        "claude-3-5-sonnet",
        "demo-1",
        " ",
        "\\\"",
        "\\u00e9",
        "\u{e9}",
        "\u{7}",
        "\\n",
        "/",
        "\u{7f}",
    ];
    let mut answered = 0;
    for _ in 0..5_000 {
        let mut doc = String::new();
        ws(&mut rng, &mut doc);
        match rng.below(12) {
            0 => doc.push_str(pick(&mut rng, &["7", "null", "{\"a\":1}", "[\"x\"]", "\"unterminated"])),
            _ => {
                doc.push('"');
                for _ in 0..rng.below(4) {
                    doc.push_str(pick(&mut rng, &parts));
                }
                doc.push('"');
            }
        }
        ws(&mut rng, &mut doc);
        let oracle = match serde_json::from_str::<ModelName>(&doc) {
            Ok(ModelName(name)) => name,
            Err(_) => None,
        };
        if let Some(fast) = flat::model(doc.as_bytes()) {
            answered += 1;
            assert_eq!(Some(fast), oracle, "{doc:?}");
        }
    }
    assert!(answered > 500, "fast path answered only {answered}");
    assert_eq!(flat::model(br#""gpt-4o-mini""#).as_deref(), Some("gpt-4o-mini"));
}
