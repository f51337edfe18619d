//! Answers metered end to end into `api_key_usage`: Anthropic's Messages stream (cached
//! prompt tokens included), OpenAI's Responses stream (usage inside `response`, beside
//! the output), Ollama's NDJSON and Gemini's SSE, cut mid-event by a recording upstream
//! and priced by `[pricing]`;
//! and OpenAI chat streams whose client did not ask for usage, which keygate asks for
//! (`usage.inject_stream_usage`) without the client seeing the difference.

mod common;

use std::time::Duration;

use common::net::*;
use common::recorder::Recorder;
use common::*;

/// Whether `n` usage rows arrive within ten seconds.
async fn rows_written(c: &tokio_postgres::Client, n: i64) -> bool {
    eventually(Duration::from_secs(10), async || {
        c.query_one("SELECT count(*) FROM api_key_usage", &[])
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) == n)
    })
    .await
}

/// endpoint, prompt, completion and total tokens, model, cost.
type Row = (
    String,
    Option<i32>,
    Option<i32>,
    Option<i32>,
    Option<String>,
    Option<String>,
);

#[tokio::test]
async fn native_streams_are_billed_whole() {
    let (db, key) = seeded_db().await;
    let rec = Recorder::start().await;
    let pricing = "[pricing.models.claude-x]\nprompt_per_1k = 3.0\ncompletion_per_1k = 15.0\n";
    let gw = Gateway::start(&db, rec.port, pricing).await;
    let paths = [
        "/v1/messages",
        "/v1/responses",
        "/api/chat",
        "/v1beta/models/gemini-x:streamGenerateContent",
    ];
    for path in paths {
        // Anthropic's SDK sends the key as `x-api-key`.
        let r = post(&gw.url(path), &[("x-api-key", &key)], r#"{"stream":true}"#).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(
            ["tokens", "Count", "eval_count"]
                .iter()
                .any(|t| String::from_utf8_lossy(&r.body).contains(t)),
            "{path}: the stream was cut"
        );
    }

    let c = db.client().await;
    assert!(rows_written(&c, 4).await, "four rows were not written");
    let rows = c
        .query(
            "SELECT endpoint, prompt_tokens, completion_tokens, tokens_used, model, cost_usd::text
             FROM api_key_usage ORDER BY endpoint",
            &[],
        )
        .await
        .expect("rows");
    let got: Vec<Row> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    let row = |e: &str, p, c, t, m: &str, cost: &str| {
        (
            e.to_string(),
            Some(p),
            Some(c),
            Some(t),
            Some(m.to_string()),
            Some(cost.to_string()),
        )
    };
    assert_eq!(
        got,
        [
            // Ollama's two counts, summed.
            row("/api/chat", 26, 282, 308, "llama3.2", "0.000000"),
            // 25 uncached + 100 written to the cache + 5,000 read from it, at $3 per 1k;
            // 15 completion tokens at $15 per 1k.
            row("/v1/messages", 5125, 15, 5140, "claude-x", "15.600000"),
            // `cached_tokens` is a part of `input_tokens` here, not added again.
            row("/v1/responses", 37, 11, 48, "gpt-r", "0.000000"),
            // Gemini's thinking tokens are output tokens.
            row(
                "/v1beta/models/gemini-x:streamGenerateContent",
                9,
                43,
                52,
                "gemini-x",
                "0.000000"
            ),
        ]
    );
}

/// status, prompt, completion and total tokens, error code.
type Billed = (i32, Option<i32>, Option<i32>, Option<i32>, Option<String>);

/// The `data:` payloads of an SSE body.
fn events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(str::to_string))
        .collect()
}

fn is_usage_chunk(data: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(data)
        .is_ok_and(|v| v["choices"].as_array().is_some_and(Vec::is_empty) && v["usage"].is_object())
}

#[tokio::test]
async fn openai_streams_are_billed_whether_or_not_the_client_asked() {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    let gw = Gateway::start(&db, up.port, "[server]\nhttp2 = true\n").await;
    let auth = bearer(&key);
    let h = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let chat = |extra: &str| {
        format!(
            r#"{{"model":"demo-1","messages":[{{"role":"user","content":"one two three four"}}],"max_tokens":5,"stream":true{extra}}}"#
        )
    };

    // Not asked: the client's stream is what it would have been without keygate.
    let r = post(&gw.url("/v1/chat/completions"), &h, &chat("")).await;
    assert_eq!(r.status, 200);
    let got = events(&r.body);
    assert_eq!(got.len(), 7, "five words, the finish chunk and [DONE]: {got:?}");
    assert!(
        !got.iter().any(|e| is_usage_chunk(e)),
        "the client did not ask for the usage chunk"
    );
    assert_eq!(got.last().map(String::as_str), Some("[DONE]"));
    // Asked by the client: it gets the chunk.
    let asked = chat(r#","stream_options":{"include_usage":true}"#);
    let r = post(&gw.url("/v1/chat/completions"), &h, &asked).await;
    assert_eq!(events(&r.body).iter().filter(|e| is_usage_chunk(e)).count(), 1);
    // Said no: overruled for the row, and still not shown.
    let no = chat(r#","stream_options":{"include_usage":false}"#);
    let r = post(&gw.url("/v1/chat/completions"), &h, &no).await;
    assert!(!events(&r.body).iter().any(|e| is_usage_chunk(e)));
    // A chunked upload, as a streaming client sends one.
    let body = chat("");
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\ntransfer-encoding: chunked\r\n\
         connection: close\r\n\r\n{:x}\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        10,
        &body[..10],
        body.len() - 10,
        &body[10..]
    );
    let raw = common::recorder::raw_exchange(gw.port, raw.as_bytes(), Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("data: [DONE]") && !text.contains("\"choices\":[]"),
        "{text}"
    );
    // Over HTTP/2, whose body arrives in DATA frames.
    let req = http::Request::post(gw.url("/v1/chat/completions"))
        .header("authorization", auth.as_str())
        .body(http_body_util::Full::new(bytes::Bytes::from(chat(""))))
        .expect("request");
    let resp = h2_client().request(req).await.expect("h2 response");
    assert_eq!((resp.version(), resp.status().as_u16()), (http::Version::HTTP_2, 200));
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body")
        .to_bytes();
    let got = events(&body);
    assert!(got.len() == 7 && !got.iter().any(|e| is_usage_chunk(e)), "{got:?}");
    // Two `stream` members: no reading of it is safe to bill from.
    let r = post(
        &gw.url("/v1/chat/completions"),
        &h,
        r#"{"stream":false,"messages":[],"stream":true}"#,
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (400, "ambiguous_request_body")
    );

    let c = db.client().await;
    assert!(rows_written(&c, 6).await, "six rows were not written");
    let rows = c
        .query(
            "SELECT status_code, prompt_tokens, completion_tokens, tokens_used, error_code
             FROM api_key_usage ORDER BY timestamp, id",
            &[],
        )
        .await
        .expect("rows");
    let got: Vec<Billed> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let billed = (200, Some(4), Some(5), Some(9), None);
    assert_eq!(
        got,
        [
            billed.clone(),
            billed.clone(),
            billed.clone(),
            billed.clone(),
            billed,
            (400, None, None, None, Some("ambiguous_request_body".to_string())),
        ]
    );
}

#[tokio::test]
async fn only_completion_bodies_are_read_and_only_to_ask_for_usage() {
    let (db, key) = seeded_db().await;
    let rec = Recorder::start().await;
    let gw = Gateway::start(&db, rec.port, "").await;
    let off = Gateway::start(&db, rec.port, "[usage]\ninject_stream_usage = false\n").await;
    let auth = bearer(&key);
    let h = [("authorization", auth.as_str())];
    let plain = r#"{"model":"m","stream":true , "messages":[]}"#;
    let asked = r#"{"stream":true,"stream_options":{"include_usage":true}}"#;
    post(&gw.url("/v1/chat/completions"), &h, plain).await;
    post(&gw.url("/v1/embeddings"), &h, plain).await;
    post(&gw.url("/v1/completions"), &h, asked).await;
    post(&gw.url("/v1/chat/completions"), &h, r#"{"stream":false}"#).await;
    post(&off.url("/v1/chat/completions"), &h, plain).await;
    // A chunked upload that does not stream: passed on whole, with its length.
    let unasked = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\ntransfer-encoding: chunked\r\n\
         connection: close\r\n\r\n{:x}\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        7,
        &unasked[..7],
        unasked.len() - 7,
        &unasked[7..]
    );
    let raw = common::recorder::raw_exchange(gw.port, raw.as_bytes(), Duration::from_secs(5)).await;
    assert!(String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"));

    let seen = rec.log.seen();
    let bodies: Vec<String> = seen
        .iter()
        .map(|s| String::from_utf8_lossy(&s.body).into_owned())
        .collect();
    assert_eq!(
        bodies,
        [
            // One splice; every other byte is the client's.
            r#"{"stream_options":{"include_usage":true},"model":"m","stream":true , "messages":[]}"#,
            plain,
            asked,
            r#"{"stream":false}"#,
            plain,
            unasked,
        ]
    );
    // Each with one length, its body's: rewritten, the client's own kept, or made for
    // a chunked upload; never beside a `Transfer-Encoding`.
    for (s, body) in seen.iter().zip(&bodies) {
        let lengths: Vec<_> = s.headers.get_all("content-length").iter().collect();
        assert_eq!(lengths, [body.len().to_string().as_str()], "{body}");
        assert!(s.headers.get("transfer-encoding").is_none(), "{body}");
    }
}

#[tokio::test]
async fn an_upstream_that_refuses_stream_options_keeps_its_streams() {
    let (db, key) = seeded_db().await;
    let rec = Recorder::start().await;
    let auth = bearer(&key);
    let h = [("authorization", auth.as_str())];
    let stream = r#"{"model":"m","stream":true}"#;
    let asked = |s: &common::recorder::Seen| s.body.windows(14).any(|w| w == b"stream_options");

    // Refused when asked for a reason that does not name `stream_options`: the client
    // gets its stream, and the next request is asked again.
    let gw = Gateway::start(&db, rec.port, "").await;
    for _ in 0..2 {
        let r = post(&gw.url("/picky/chat/completions"), &h, stream).await;
        assert_eq!(r.status, 200);
    }
    let seen: Vec<bool> = rec.log.seen().iter().map(asked).collect();
    assert_eq!(seen, [true, false, true, false], "a client cannot switch the ask off");
    rec.log.seen.lock().expect("log").clear();
    drop(gw);

    // Refused when asked, naming `stream_options`, accepted without: the client gets its
    // stream, the upstream is not asked again, and each request has one row.
    let gw = Gateway::start(&db, rec.port, "").await;
    for _ in 0..2 {
        let r = post(&gw.url("/strict/chat/completions"), &h, stream).await;
        assert_eq!(r.status, 200);
        assert!(String::from_utf8_lossy(&r.body).ends_with("data: [DONE]\n\n"));
    }
    let seen = rec.log.seen();
    assert_eq!(seen.iter().map(asked).collect::<Vec<_>>(), [true, false, false]);
    assert_eq!(seen[1].body, stream.as_bytes(), "the retry is the client's own body");
    assert!(
        gw.wait_log(
            "the upstream refused a request asking for stream usage",
            Duration::from_secs(5)
        )
        .await
    );
    drop(gw);

    // An upstream that refuses everything: one retry while it is not known to take
    // `stream_options`, and the client gets the upstream's own answer.
    let gw = Gateway::start(&db, rec.port, "").await;
    let r = post(&gw.url("/bad/chat/completions"), &h, stream).await;
    assert_eq!(r.status, 400);
    assert_eq!(rec.log.seen().len(), 5);
    // Once an asked stream has succeeded, a refusal is about something else: no retry.
    post(&gw.url("/v1/chat/completions"), &h, stream).await;
    let r = post(&gw.url("/bad/chat/completions"), &h, stream).await;
    assert_eq!(r.status, 400);
    let seen = rec.log.seen();
    assert_eq!(seen.len(), 7);
    assert!(asked(&seen[6]));

    let c = db.client().await;
    assert!(rows_written(&c, 7).await, "one row per client request");
}

#[tokio::test]
async fn a_client_that_hangs_up_at_the_finish_chunk_is_still_billed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (db, key) = seeded_db().await;
    let rec = Recorder::start().await;
    let gw = Gateway::start(&db, rec.port, "").await;
    let body = r#"{"model":"m1","stream":true}"#;
    let req = format!(
        "POST /late-usage/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\ncontent-length: {}\r\n\r\n{body}",
        bearer(&key),
        body.len()
    );
    let mut sock = tokio::net::TcpStream::connect(gw.addr()).await.expect("connect");
    sock.write_all(req.as_bytes()).await.expect("write");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("finish_reason") {
        let n = sock.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed early");
        seen.extend_from_slice(&buf[..n]);
    }
    // All the client wanted: it hangs up before the usage chunk exists.
    drop(sock);

    let c = db.client().await;
    assert!(rows_written(&c, 1).await, "no row");
    let r = c
        .query_one(
            "SELECT prompt_tokens, completion_tokens, tokens_used, error_code FROM api_key_usage",
            &[],
        )
        .await
        .expect("row");
    let got: (Option<i32>, Option<i32>, Option<i32>, Option<String>) = (r.get(0), r.get(1), r.get(2), r.get(3));
    assert_eq!(got, (Some(5), Some(7), Some(12), Some("client_disconnected".into())));

    // A stream that goes on: the upstream is still told within a second.
    let closed = rec.log.closed.load(std::sync::atomic::Ordering::SeqCst);
    let req = format!(
        "GET /stall HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\n\r\n",
        bearer(&key)
    );
    let mut sock = tokio::net::TcpStream::connect(gw.addr()).await.expect("connect");
    sock.write_all(req.as_bytes()).await.expect("write");
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("data: first") {
        let n = sock.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed early");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(sock);
    let left = std::time::Instant::now();
    let told = eventually(Duration::from_secs(5), async || {
        rec.log.closed.load(std::sync::atomic::Ordering::SeqCst) > closed
    })
    .await;
    assert!(told, "the upstream connection was never closed");
    assert!(
        left.elapsed() < Duration::from_secs(1),
        "told after {:?}",
        left.elapsed()
    );
}
