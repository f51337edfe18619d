//! [`UsageChunkFilter`] on OpenAI's stream shape with every line ending, cut at every
//! point and at random points: the output is the input without the usage-only event,
//! byte for byte; streams without one pass unchanged (whole-event pieces uncopied);
//! look-alikes are kept; and an endless event turns the filter into a pass-through.

use bytes::Bytes;

use super::{UsageChunkFilter, MAX_HELD};
use crate::usage::meter::tests::Rng;

const USAGE: &str = r#"data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#;

/// OpenAI's stream with `include_usage`, `ending` for every line end; with and without
/// its usage chunk.
fn openai(ending: &str) -> (String, String) {
    let event = |data: &str| format!("{data}{ending}{ending}");
    let head = [
        format!(": keep-alive{ending}{ending}"),
        event(r#"data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""}}],"usage":null}"#),
        event(r#"data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi \"usage\": {"}}],"usage":null}"#),
        event(r#"data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#),
    ]
    .concat();
    let done = event("data: [DONE]");
    (format!("{head}{}{done}", event(USAGE)), format!("{head}{done}"))
}

fn run(pieces: &[&[u8]]) -> (Vec<u8>, bool) {
    let mut f = UsageChunkFilter::new();
    let mut out = Vec::new();
    for p in pieces {
        out.extend_from_slice(&f.push(Bytes::copy_from_slice(p)));
    }
    out.extend_from_slice(&f.finish());
    (out, f.dropped())
}

#[test]
fn the_usage_chunk_goes_at_every_cut_and_line_ending() {
    for ending in ["\n", "\r\n", "\r"] {
        let (stream, expected) = openai(ending);
        let bytes = stream.as_bytes();
        for cut in 0..=bytes.len() {
            let (out, dropped) = run(&[&bytes[..cut], &bytes[cut..]]);
            assert!(dropped, "{ending:?} cut at {cut}");
            assert_eq!(String::from_utf8_lossy(&out), expected, "{ending:?} cut at {cut}");
        }
        let mut rng = Rng::new(7);
        for _ in 0..500 {
            let mut pieces = Vec::new();
            let mut at = 0;
            while at < bytes.len() {
                let n = 1 + rng.below(40);
                pieces.push(&bytes[at..(at + n).min(bytes.len())]);
                at += n;
            }
            assert_eq!(String::from_utf8_lossy(&run(&pieces).0), expected, "{ending:?}");
        }
    }
}

#[test]
fn streams_without_it_pass_unchanged_and_whole_events_uncopied() {
    let (_, without) = openai("\n");
    let mut f = UsageChunkFilter::new();
    let piece = Bytes::from(without.clone());
    let out = f.push(piece.clone());
    assert_eq!(
        out.as_ptr(),
        piece.as_ptr(),
        "a piece of whole events is passed, not copied"
    );
    assert_eq!(out, piece);
    assert!(f.finish().is_empty() && !f.dropped());
    // An event goes out as soon as its blank line is in; a lone `\r` ending it waits
    // for the next byte, which may be its `\n`.
    for (event, now, next) in [("data: 1\n\n", 9, 0), ("data: 1\r\n\r\n", 11, 0), ("data: 1\r\r", 0, 9)] {
        let mut f = UsageChunkFilter::new();
        assert_eq!(f.push(Bytes::from(event)).len(), now, "{event:?}");
        assert_eq!(f.push(Bytes::from("d")).len(), next, "{event:?}");
        assert_eq!(&f.finish()[..], b"d");
    }
    // Look-alikes stay: usage next to a choice (vLLM, Groq), Anthropic's and the
    // Responses API's events, usage as a string, a `choices` that is no array.
    let kept = [
        r#"data: {"choices":[{"index":0,"delta":{"content":"x"}}],"usage":{"total_tokens":3}}"#,
        r#"event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}"#,
        r#"event: response.completed
data: {"type":"response.completed","response":{"usage":{"total_tokens":48}}}"#,
        r#"data: {"choices":[],"usage":"none"}"#,
        r#"data: {"choices":{},"usage":{"total_tokens":3}}"#,
        r#"data: {"choices":[],"usage":null}"#,
        r#"data: not json "usage""#,
        // Past the text check (a line end after the colon), the parse decides: usage
        // that is no object, or an object that is no JSON.
        "data: {\"choices\":[],\"usage\":\ndata: [1]}",
        "data: {\"choices\":[],\"usage\":\ndata: 7}",
        r#"data: {"choices":[],"usage":{"total_tokens":}}"#,
    ];
    for event in kept {
        let stream = format!("{event}\n\ndata: [DONE]\n\n");
        let (out, dropped) = run(&[stream.as_bytes()]);
        assert_eq!(String::from_utf8_lossy(&out), stream);
        assert!(!dropped, "{event}");
    }
}

#[test]
fn the_usage_chunk_in_any_form_goes() {
    for event in [
        // Data split over two lines is one JSON text.
        "data: {\"choices\": [],\ndata: \"usage\": {\"total_tokens\": 3}}",
        "data: {\"choices\":[],\"usage\" :\r\ndata: {\"total_tokens\":3}}",
        "id: 7\ndata:{\"choices\":[],\"usage\":{}}",
        "data: {\"usage\":{\"prompt_tokens\":1},\"choices\":[ ]}",
    ] {
        let stream = format!("data: {{\"choices\":[{{}}]}}\n\n{event}\n\ndata: [DONE]\n\n");
        let (out, dropped) = run(&[stream.as_bytes()]);
        assert!(dropped, "{event}");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "data: {\"choices\":[{}]}\n\ndata: [DONE]\n\n"
        );
    }
    // A stream cut off after the usage chunk, without its blank line.
    let (out, dropped) = run(&[format!("data: {{\"choices\":[{{}}]}}\n\n{USAGE}\n").as_bytes()]);
    assert!(dropped);
    assert_eq!(String::from_utf8_lossy(&out), "data: {\"choices\":[{}]}\n\n");
    // An unfinished event that is not the chunk goes out at the end as it came.
    let (out, dropped) = run(&[b"data: {\"choices\":[{}]}\n\ndata: {\"cho", b"ices\":[1]}"]);
    assert!(!dropped);
    assert_eq!(&out[..], b"data: {\"choices\":[{}]}\n\ndata: {\"choices\":[1]}");
}

#[test]
fn an_endless_event_is_passed_through_not_held() {
    let mut f = UsageChunkFilter::new();
    let mut out = Vec::new();
    let big = vec![b'x'; 1024];
    let mut fed = 0;
    out.extend_from_slice(&f.push(Bytes::from_static(b"data: ")));
    while fed <= MAX_HELD {
        out.extend_from_slice(&f.push(Bytes::from(big.clone())));
        fed += big.len();
    }
    assert_eq!(out.len(), fed + 6, "everything held so far went out");
    let rest = format!("\n\n{USAGE}\n\n");
    assert_eq!(
        f.push(Bytes::from(rest.clone())),
        rest.as_bytes(),
        "and from then on it passes"
    );
    assert!(f.finish().is_empty() && !f.dropped());
}
