//! Tests of the token meter on `text/event-stream` bodies: OpenAI `include_usage` streams
//! split at every byte, line-ending variants, abandoned streams, cumulative and Anthropic
//! usage, SSE field grammar, and oversized or malformed events. JSON and cost cases live
//! in `tests`, with the shared helpers.

use super::tests::{feed_all_ways, feed_chunks, meter, tokens};

const SSE: &str = "text/event-stream";

fn chunk(delta: &str, finish: &str) -> String {
    format!(
        r#"data: {{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{{"index":0,"delta":{delta},"finish_reason":{finish}}}],"usage":null}}"#
    )
}

/// An OpenAI stream with `stream_options.include_usage`, with the comments and fields a
/// real one may carry, and multi-byte UTF-8 to be split mid-character.
fn openai_stream() -> String {
    [
        ": keep-alive".to_owned(),
        String::new(),
        chunk(r#"{"role":"assistant","content":""}"#, "null"),
        String::new(),
        "event: message\nid: 7\nretry: 100".to_owned(),
        chunk(r#"{"content":"Hé 🙂 \"usage\":{\"total_tokens\":1}"}"#, "null"),
        String::new(),
        chunk("{}", r#""stop""#),
        String::new(),
        r#"data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#.to_owned(),
        String::new(),
        "data: [DONE]".to_owned(),
        String::new(),
        String::new(),
    ]
    .join("\n")
}

#[test]
fn openai_include_usage_at_every_split_and_line_ending() {
    let want = tokens(Some(12), Some(3), Some(15), "gpt-4o");
    let lf = openai_stream();
    for eol in ["\n", "\r\n", "\r"] {
        let body = lf.replace('\n', eol);
        assert_eq!(feed_all_ways(SSE, body.as_bytes()), want, "line ends {eol:?}");
    }
}

#[test]
fn abandoned_before_usage_keeps_the_model() {
    let full = openai_stream();
    let cut = full.find(r#""choices":[]"#).expect("usage event");
    let want = tokens(None, None, None, "gpt-4o");
    assert_eq!(feed_all_ways(SSE, &full.as_bytes()[..cut]), want);
    let mid_usage = full.find("\"completion_tokens\"").expect("usage");
    assert_eq!(feed_all_ways(SSE, &full.as_bytes()[..mid_usage]), want);
    assert_eq!(
        feed_chunks(SSE, [&b"data: {\"mod"[..]]).tokens(),
        tokens(None, None, None, "")
    );
}

#[test]
fn header_total_when_the_stream_has_no_usage() {
    let mut m = meter(SSE, Some(9));
    m.feed(chunk(r#"{"content":"x"}"#, "null").as_bytes());
    m.feed(b"\n\ndata: [DONE]\n\n");
    assert_eq!(m.tokens(), tokens(None, None, Some(9), "gpt-4o"));
}

#[test]
fn cumulative_usage_last_one_wins_and_null_does_not_erase() {
    let body = concat!(
        "data: {\"model\":\"a\",\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":1,\"total_tokens\":5}}\n\n",
        "data: {\"model\":\"b\",\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":6,\"total_tokens\":10}}\n\n",
        "data: {\"model\":\"b\",\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":9}}\n\n",
        "data: {\"model\":\"b\",\"usage\":null}\n\n",
        "data: {\"model\":null,\"usage\":{}}\n\n",
    );
    assert_eq!(
        feed_all_ways(SSE, body.as_bytes()),
        tokens(Some(4), Some(9), Some(13), "b")
    );
}

#[test]
fn repeated_unusable_models_neither_win_nor_hide_a_later_name() {
    // Repeats are compared as raw bytes, usable names or not: an unusable repeat must
    // still be skipped without erasing a name, and a name after it must still count.
    let ev = |model: &str| format!("data: {{\"model\":{model},\"choices\":[]}}\n\n");
    let body: String = [
        "5", "5", "\"\"", "\"\"", "\"a\"", "5", "5", "\"a\"", "7", "\"b\"", "\"b\"", "[1]",
    ]
    .iter()
    .map(|m| ev(m))
    .collect();
    assert_eq!(feed_all_ways(SSE, body.as_bytes()), tokens(None, None, None, "b"));
    let never: String = std::iter::repeat_n(ev("5"), 50).collect();
    assert_eq!(feed_all_ways(SSE, never.as_bytes()), tokens(None, None, None, ""));
}

#[test]
fn anthropic_stream_adds_input_and_output() {
    let body = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",",
        "\"content\":[],\"model\":\"claude-3-5-sonnet\",\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    let want = tokens(Some(25), Some(15), Some(40), "claude-3-5-sonnet");
    assert_eq!(feed_all_ways(SSE, body.as_bytes()), want);
}

#[test]
fn anthropic_stream_counts_cached_prompt_tokens_once() {
    // `message_start` has the prompt's parts; the final `message_delta` repeats them
    // cumulatively (newer API versions), or has only `output_tokens` (older ones).
    let start = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4\",\"usage\":",
        "{\"input_tokens\":3,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":9000,\"output_tokens\":1}}}\n\n",
    );
    let deltas = [
        "{\"input_tokens\":3,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":9000,\"output_tokens\":42}",
        "{\"output_tokens\":42}",
        "{\"input_tokens\":3,\"output_tokens\":42}",
    ];
    for usage in deltas {
        let body = format!(
            "{start}event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{}},\"usage\":{usage}}}\n\n"
        );
        let want = tokens(Some(9003), Some(42), Some(9045), "claude-sonnet-4");
        assert_eq!(feed_all_ways(SSE, body.as_bytes()), want, "{usage}");
    }
}

/// OpenAI's Responses API (`/v1/responses`, `stream: true`): `model` and `usage` sit
/// inside `response`, and `response.completed` carries the whole output beside them.
fn responses_api_stream(output: &str) -> String {
    let response = |status: &str, usage: &str, text: &str| {
        format!(
            r#"{{"id":"resp_1","object":"response","created_at":1741290958,"status":"{status}","model":"gpt-4.1-2025-04-14","output":[{{"id":"msg_1","type":"message","status":"{status}","role":"assistant","content":[{{"type":"output_text","text":"{text}","annotations":[]}}]}}],"usage":{usage},"user":null,"metadata":{{}}}}"#
        )
    };
    let mut body = format!(
        "event: response.created\ndata: {{\"type\":\"response.created\",\"sequence_number\":0,\"response\":{}}}\n\n",
        response("in_progress", "null", "")
    );
    for word in output.split_inclusive(' ').take(3) {
        body.push_str(&format!(
            "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"{word}\"}}\n\n"
        ));
    }
    let usage = r#"{"input_tokens":37,"input_tokens_details":{"cached_tokens":0},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":48}"#;
    body.push_str(&format!(
        "event: response.completed\ndata: {{\"type\":\"response.completed\",\"sequence_number\":9,\"response\":{}}}\n\n",
        response("completed", usage, output)
    ));
    body
}

#[test]
fn responses_api_stream_reads_usage_inside_response() {
    let want = tokens(Some(37), Some(11), Some(48), "gpt-4.1-2025-04-14");
    assert_eq!(
        feed_all_ways(SSE, responses_api_stream("Hi there, friend").as_bytes()),
        want
    );
    // The output beside the usage is far bigger than any capture: it is not kept.
    let long = "word ".repeat(20_000);
    let m = feed_chunks(SSE, [responses_api_stream(&long).as_bytes()]);
    assert_eq!(m.tokens(), want);
    assert!(m.heap_bytes() <= 16 * 1024, "{} heap bytes", m.heap_bytes());
    // Abandoned before `response.completed`: the model, no counts.
    let body = responses_api_stream("Hi there");
    let cut = body.find("event: response.completed").expect("completed event");
    let m = feed_chunks(SSE, [&body.as_bytes()[..cut]]);
    assert_eq!(m.tokens(), tokens(None, None, None, "gpt-4.1-2025-04-14"));
}

#[test]
fn field_grammar_multiline_data_bom_and_comments() {
    // Data lines join with "\n"; no space after the colon is fine; a bare `data` line adds
    // an empty line; `datum:` and `data :` are other fields; a leading BOM is skipped.
    let body = "\u{feff}data:{\"model\":\"m\",\ndata\ndatum: {\"usage\":{\"total_tokens\":1}}\ndata : x\n: data: {\ndata:  \"usage\":{\"total_tokens\":7}}\n\n";
    assert_eq!(feed_all_ways(SSE, body.as_bytes()), tokens(None, None, Some(7), "m"));
    // A broken BOM is a field name that is not `data`: only that line is lost.
    let bad_bom = b"\xef\xbbdata: {\"usage\":{\"total_tokens\":1}}\n\ndata: {\"model\":\"ok\"}\n\n";
    assert_eq!(feed_all_ways(SSE, bad_bom), tokens(None, None, None, "ok"));
}

#[test]
fn oversized_and_malformed_events_resynchronise() {
    let huge = format!(
        r#"data: {{"model":"big","choices":[{{"delta":{{"content":"{}"}}}}]}}"#,
        "y".repeat(300_000)
    );
    let huge_usage = format!(
        r#"data: {{"usage":{{"total_tokens":1,"pad":"{}"}}}}"#,
        "z".repeat(70_000)
    );
    let body = [
        huge.as_str(),
        "",
        huge_usage.as_str(),
        "",
        r#"data: {"model":"broken","usage":{"total_tokens":2, "s":"unterminated"#,
        "",
        r#"data: }}}]]] "usage" {"total_tokens":3}"#,
        "",
        r#"data: {"usage":{"prompt_tokens":8,"completion_tokens":2}}"#,
        "",
        "",
    ]
    .join("\n");
    // The broken event's model completed before the event broke, so it counts (latest wins);
    // its unterminated usage and the garbage event's decoy never do.
    let want = tokens(Some(8), Some(2), Some(10), "broken");
    for size in [1, 13, 8192, body.len()] {
        let m = feed_chunks(SSE, body.as_bytes().chunks(size));
        assert_eq!(m.tokens(), want, "chunks of {size}");
        assert!(m.heap_bytes() <= 16 * 1024, "{} heap bytes", m.heap_bytes());
    }
}
