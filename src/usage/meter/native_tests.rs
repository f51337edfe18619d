//! The meter on two native APIs beyond OpenAI's and Anthropic's, as they answer: Gemini
//! (`generateContent` JSON and `streamGenerateContent?alt=sse`, with thinking and
//! tool-use tokens) and Ollama (`/api/chat` JSON and its NDJSON stream), split every way.

use super::tests::{feed_all_ways, tokens};

#[test]
fn gemini_json_counts_thinking_as_output() {
    let body = br#"{"candidates":[{"content":{"parts":[{"text":"The \"usageMetadata\": is a decoy"}],"role":"model"},"finishReason":"STOP"}],
        "usageMetadata":{"promptTokenCount":11,"candidatesTokenCount":20,"totalTokenCount":131,"thoughtsTokenCount":100,
        "cachedContentTokenCount":4,"promptTokensDetails":[{"modality":"TEXT","tokenCount":11}]},
        "modelVersion":"gemini-2.5-flash","responseId":"abc"}"#;
    assert_eq!(
        feed_all_ways("application/json; charset=UTF-8", body),
        tokens(Some(11), Some(120), Some(131), "gemini-2.5-flash")
    );
    // Tool-use prompt tokens are prompt tokens; a count missing is not a zero.
    let body = br#"{"usageMetadata":{"promptTokenCount":7,"toolUsePromptTokenCount":5,"totalTokenCount":12},"modelVersion":"gemini-x"}"#;
    assert_eq!(
        feed_all_ways("application/json", body),
        tokens(Some(12), None, Some(12), "gemini-x")
    );
}

#[test]
fn gemini_sse_takes_the_last_cumulative_counts() {
    let body = b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hel\"}]}}],\"usageMetadata\":{\"promptTokenCount\":9,\"totalTokenCount\":9},\"modelVersion\":\"gemini-2.0-flash\"}\r\n\r\n\
data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"lo\"}]},\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":9,\"candidatesTokenCount\":3,\"totalTokenCount\":12},\"modelVersion\":\"gemini-2.0-flash\"}\r\n\r\n";
    assert_eq!(
        feed_all_ways("text/event-stream", body),
        tokens(Some(9), Some(3), Some(12), "gemini-2.0-flash")
    );
}

#[test]
fn ollama_json_and_ndjson() {
    let body = br#"{"model":"llama3.2","created_at":"2026-12-03T10:00:00Z","message":{"role":"assistant","content":"say \"eval_count\":99"},"done_reason":"stop","done":true,"total_duration":4883583458,"prompt_eval_count":26,"prompt_eval_duration":342546000,"eval_count":282,"eval_duration":4535599000}"#;
    assert_eq!(
        feed_all_ways("application/json", body),
        tokens(Some(26), Some(282), Some(308), "llama3.2")
    );
    let stream = b"{\"model\":\"llama3.2\",\"message\":{\"role\":\"assistant\",\"content\":\"The\"},\"done\":false}\n\
{\"model\":\"llama3.2\",\"message\":{\"role\":\"assistant\",\"content\":\" sky\"},\"done\":false}\n\
{\"model\":\"llama3.2\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true,\"prompt_eval_count\":12,\"eval_count\":2}\n";
    assert_eq!(
        feed_all_ways("application/x-ndjson", stream),
        tokens(Some(12), Some(2), Some(14), "llama3.2")
    );
    // Counts nested elsewhere are not the answer's.
    let body = br#"{"model":"m","options":{"prompt_eval_count":5,"eval_count":6},"done":true}"#;
    assert_eq!(feed_all_ways("application/json", body), tokens(None, None, None, "m"));
}
