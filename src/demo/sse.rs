//! The OpenAI chat-completions wire format for the demo upstream: reading the request,
//! writing `chat.completion` objects, `chat.completion.chunk` events and their SSE framing.
//! Only the fields clients and keygate's usage metering read are handled; this is not a
//! schema-complete implementation.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{count_words, Body};

/// Caps `max_tokens` so one typo cannot wedge a test run for hours.
const MAX_TOKENS: u64 = 100_000;

/// The terminator OpenAI clients wait for; it is not JSON, so it has its own constant.
pub(super) const DONE: &[u8] = b"data: [DONE]\n\n";

/// A parsed `POST /v1/chat/completions` body.
#[derive(Debug, Clone)]
pub(super) struct ChatRequest {
    pub reply: Reply,
    pub stream: bool,
    pub include_usage: bool,
}

impl ChatRequest {
    /// Indexing a `Value` yields `Null` for anything missing, so no shape of input panics.
    pub fn parse(body: &Value) -> Result<Self, &'static str> {
        let Some(messages) = body["messages"].as_array() else {
            return Err("\"messages\" must be an array");
        };
        let prompt: Vec<String> = messages.iter().map(content_text).collect();
        let user_text = messages
            .iter()
            .rev()
            .find(|m| m["role"] == "user")
            .or(messages.last())
            .map(content_text)
            .unwrap_or_default();
        let words = reply_words(&user_text);
        // `max_tokens` sets the exact length (not just a cap) so tests can ask for long streams.
        let max_tokens = body["max_tokens"]
            .as_u64()
            .or_else(|| body["max_completion_tokens"].as_u64())
            .map(|n| n.min(MAX_TOKENS));
        let count = max_tokens.unwrap_or(words.len() as u64);
        let reply = Reply {
            id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
            model: body["model"].as_str().unwrap_or("demo-1").to_owned(),
            created: chrono::Utc::now().timestamp(),
            words,
            count,
            finish_reason: if max_tokens.is_some() { "length" } else { "stop" },
            usage: Usage {
                prompt: count_words(&prompt.join(" ")).max(1),
                completion: count,
            },
        };
        Ok(Self {
            reply,
            stream: body["stream"].as_bool().unwrap_or(false),
            include_usage: body["stream_options"]["include_usage"].as_bool().unwrap_or(false),
        })
    }
}

/// Message content is either a string or an array of typed parts; only text parts count.
fn content_text(message: &Value) -> String {
    match &message["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// A fixed preamble plus the first words of the user's text keeps replies at 6-10 words
/// whatever the prompt, so default streams stay short and predictable.
fn reply_words(user_text: &str) -> Vec<String> {
    let mut words: Vec<String> = "Demo upstream here. You said:"
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let said: Vec<String> = user_text.split_whitespace().take(5).map(str::to_owned).collect();
    if said.is_empty() {
        words.push("nothing.".to_owned());
    }
    words.extend(said);
    words
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

impl Usage {
    pub fn total(self) -> u64 {
        self.prompt + self.completion
    }

    pub fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.total(),
        })
    }
}

/// What one reply is made of. Words cycle when `count` exceeds them, so `max_tokens` can
/// ask for arbitrarily long streams without the reply text itself growing.
#[derive(Debug, Clone)]
pub(super) struct Reply {
    pub id: String,
    pub model: String,
    pub created: i64,
    pub words: Vec<String>,
    pub count: u64,
    pub finish_reason: &'static str,
    pub usage: Usage,
}

impl Reply {
    fn word(&self, i: u64) -> &str {
        let len = self.words.len() as u64;
        if len == 0 {
            return "";
        }
        usize::try_from(i % len)
            .ok()
            .and_then(|i| self.words.get(i))
            .map_or("", String::as_str)
    }

    /// The full content, as the streamed deltas would concatenate to.
    pub fn content(&self) -> String {
        let mut out = String::new();
        for i in 0..self.count {
            out.push_str(&self.delta(i));
        }
        out
    }

    /// Deltas after the first carry their leading space, as real token streams do, so a
    /// client that concatenates deltas gets the same text as the non-streaming reply.
    fn delta(&self, i: u64) -> String {
        if i == 0 {
            self.word(i).to_owned()
        } else {
            format!(" {}", self.word(i))
        }
    }

    pub fn completion(&self) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": self.content()},
                "logprobs": null,
                "finish_reason": self.finish_reason,
            }],
            "usage": self.usage.to_json(),
        })
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>, include_usage: bool) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
        });
        // OpenAI sends `"usage": null` on every chunk once usage was asked for.
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    pub fn word_chunk(&self, i: u64, include_usage: bool) -> Value {
        let delta = if i == 0 {
            json!({"role": "assistant", "content": self.delta(i)})
        } else {
            json!({"content": self.delta(i)})
        };
        self.chunk(delta, None, include_usage)
    }

    pub fn finish_chunk(&self, include_usage: bool) -> Value {
        self.chunk(json!({}), Some(self.finish_reason), include_usage)
    }

    pub fn usage_chunk(&self) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage.to_json(),
        })
    }
}

pub(super) fn event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// A body whose events are produced by a task while the response is already on the wire:
/// the point of the streaming endpoint is to let tests see the first event before the last
/// exists, and to notice when keygate stops reading (the send fails and the task ends).
pub(super) fn stream(reply: Reply, include_usage: bool, interval: Duration) -> Body {
    // A tiny buffer so a slow or stalled reader holds the producer back, like a real model.
    let (tx, mut rx) = mpsc::channel::<Bytes>(2);
    tokio::spawn(async move {
        for i in 0..reply.count {
            if i > 0 && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            if tx.send(event(&reply.word_chunk(i, include_usage))).await.is_err() {
                return;
            }
        }
        let mut tail = vec![event(&reply.finish_chunk(include_usage))];
        if include_usage {
            tail.push(event(&reply.usage_chunk()));
        }
        tail.push(Bytes::from_static(DONE));
        for bytes in tail {
            if tx.send(bytes).await.is_err() {
                return;
            }
        }
    });
    let frames =
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|next| next.map(|bytes| Ok(Frame::data(bytes)))));
    StreamBody::new(frames).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(words: &[&str], count: u64) -> Reply {
        Reply {
            id: "chatcmpl-1".to_owned(),
            model: "m".to_owned(),
            created: 7,
            words: words.iter().map(|w| (*w).to_owned()).collect(),
            count,
            finish_reason: "stop",
            usage: Usage {
                prompt: 2,
                completion: count,
            },
        }
    }

    #[test]
    fn event_is_one_data_line_and_a_blank_line() {
        assert_eq!(&event(&json!({"a": 1}))[..], b"data: {\"a\":1}\n\n");
        assert_eq!(DONE, b"data: [DONE]\n\n");
    }

    #[test]
    fn deltas_concatenate_to_the_content_and_cycle_past_the_words() {
        let r = reply(&["a", "b"], 5);
        assert_eq!(r.content(), "a b a b a");
        let first = r.word_chunk(0, false);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(first["choices"][0]["delta"]["content"], "a");
        assert!(first.get("usage").is_none());
        let third = r.word_chunk(2, true);
        assert_eq!(third["choices"][0]["delta"], json!({"content": " a"}));
        assert!(third["usage"].is_null() && third.get("usage").is_some());
    }

    #[test]
    fn finish_and_usage_chunks() {
        let r = reply(&["x"], 3);
        assert_eq!(r.finish_chunk(false)["choices"][0]["finish_reason"], "stop");
        let usage = r.usage_chunk();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5})
        );
        assert_eq!(r.completion()["choices"][0]["message"]["content"], "x x x");
        assert_eq!(reply(&[], 2).content(), " ");
    }

    #[test]
    fn requests_parse_into_deterministic_replies() {
        assert_eq!(reply_words("").join(" "), "Demo upstream here. You said: nothing.");
        assert_eq!(reply_words("a b c d e f g").len(), 10);
        let parts = json!({"content": [{"type": "text", "text": "x y"}, {"type": "image"}]});
        assert_eq!(content_text(&parts), "x y");
        assert_eq!(content_text(&json!({"content": 3})), "");
        let body = json!({"messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": "Hi"}], "max_tokens": 3});
        let chat = ChatRequest::parse(&body).map_err(str::to_owned);
        let Ok(chat) = chat else { panic!("{chat:?}") };
        assert_eq!((chat.stream, chat.include_usage), (false, false));
        assert_eq!(chat.reply.model, "demo-1");
        assert_eq!(
            chat.reply.usage,
            Usage {
                prompt: 3,
                completion: 3
            }
        );
        assert_eq!(chat.reply.content(), "Demo upstream here.");
        assert!(ChatRequest::parse(&json!([1])).is_err());
    }

    #[tokio::test]
    async fn stream_emits_words_then_finish_usage_and_done() {
        let body = stream(reply(&["a", "b"], 3), true, Duration::ZERO);
        let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let events: Vec<&str> = text.split_terminator("\n\n").collect();
        assert_eq!(events.len(), 3 + 1 + 1 + 1, "{text}");
        assert_eq!(events.last(), Some(&"data: [DONE]"));
        assert!(events[4].contains("\"choices\":[]"));
    }
}
