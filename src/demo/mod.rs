//! `keygate demo-upstream`: a mock OpenAI-compatible chat service to put behind keygate.
//!
//! Owns a small HTTP/1.1 + h2c server whose replies and token counts are deterministic, so
//! the README quick start works without a real model and integration tests can predict
//! what keygate meters. It also owns the probe endpoints those tests need from a peer
//! (`/echo`, `/slow`, `/status/NNN`). It is a demo and test peer, not part of the proxy:
//! nothing on keygate's request path may depend on it, and it has no auth, limits or state.

mod sse;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use sse::{ChatRequest, Usage};

type Body = BoxBody<Bytes, Infallible>;

/// Chat bodies are tiny; the cap only keeps a misbehaving test from eating memory.
const MAX_CHAT_BODY: usize = 4 * 1024 * 1024;
/// Bounds `/slow` so one typo cannot wedge a test run for an hour.
const MAX_SLOW_MS: u64 = 600_000;
const DRAIN_CAP: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: std::net::SocketAddr,
    /// Delay before the response headers (e.g. "50ms").
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    pub latency: std::time::Duration,
    /// Delay between SSE events.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub stream_interval: std::time::Duration,
}

/// Serves until `shutdown` resolves, then drains in-flight connections for up to 10 s.
pub async fn run(args: DemoArgs, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    serve(listener, args, shutdown).await
}

async fn serve(
    listener: TcpListener,
    args: DemoArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    eprintln!("demo upstream listening on http://{addr}");
    let args = Arc::new(args);
    // auto::Builder sniffs the h2 preface, so h2c prior-knowledge clients need no upgrade.
    let builder = Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // EMFILE and friends are transient: back off rather than spin or exit.
                    tracing::warn!(%err, "demo upstream: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // SSE events are small writes; Nagle would batch them and hide the streaming.
        let _ = stream.set_nodelay(true);
        let args = Arc::clone(&args);
        let service = service_fn(move |req| handle(req, Arc::clone(&args)));
        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(%err, "demo upstream: connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_CAP, graceful.shutdown()).await.is_err() {
        tracing::warn!("demo upstream: connections still open after {DRAIN_CAP:?}; leaving them");
    }
    Ok(())
}

async fn handle(req: Request<Incoming>, args: Arc<DemoArgs>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    // Readiness probes must not pay the simulated latency.
    if path == "/healthz" {
        return Ok(respond(StatusCode::OK, "text/plain", Bytes::from_static(b"ok")));
    }
    if !args.latency.is_zero() {
        tokio::time::sleep(args.latency).await;
    }
    let post = req.method() == Method::POST;
    Ok(match path.as_str() {
        "/chat" if post => chat(req).await,
        "/v1/chat/completions" if post => completions(req, args.stream_interval).await,
        "/chat" | "/v1/chat/completions" => {
            let mut resp = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            resp.headers_mut().insert(ALLOW, HeaderValue::from_static("POST"));
            resp
        }
        p if p == "/echo" || p.starts_with("/echo/") => echo(req).await,
        "/slow" => slow(req.uri().query()).await,
        p => match p.strip_prefix("/status/") {
            Some(code) => status(code),
            None => error(StatusCode::NOT_FOUND, "not found"),
        },
    })
}

/// Whitespace-separated words: crude, but stable across runs and easy to predict in tests.
fn count_words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

async fn chat(req: Request<Incoming>) -> Response<Body> {
    let body = match read_json(req).await {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let Some(message) = body.get("message").and_then(Value::as_str) else {
        return error(StatusCode::BAD_REQUEST, "expected {\"message\": string}");
    };
    let reply = format!("echo: {message}");
    let usage = Usage {
        prompt: count_words(message).max(1),
        completion: count_words(&reply),
    };
    let id = format!("chat-{}", uuid::Uuid::new_v4().simple());
    let mut value = json!({"id": id, "model": "demo-1", "reply": reply, "usage": usage.to_json()});
    // `"usage_in_body": false` leaves only the x-usage-tokens header, for testing a
    // gateway's header-based accounting.
    if body.get("usage_in_body") == Some(&Value::Bool(false)) {
        if let Some(obj) = value.as_object_mut() {
            obj.remove("usage");
        }
    }
    with_usage(json_response(StatusCode::OK, &value), usage)
}

async fn completions(req: Request<Incoming>, interval: Duration) -> Response<Body> {
    let body = match read_json(req).await {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let chat = match ChatRequest::parse(&body) {
        Ok(chat) => chat,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    if chat.stream {
        let body = sse::stream(chat.reply, chat.include_usage, interval);
        let mut resp = Response::new(body);
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert("cache-control", HeaderValue::from_static("no-cache"));
        return resp;
    }
    with_usage(
        json_response(StatusCode::OK, &chat.reply.completion()),
        chat.reply.usage,
    )
}

async fn echo(req: Request<Incoming>) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let mut values: Vec<Value> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let value = if values.len() == 1 {
            values.pop().unwrap_or_default()
        } else {
            Value::Array(values)
        };
        headers.insert(name.as_str().to_owned(), value);
    }
    // Counted frame by frame so large uploads through the proxy need no buffering here.
    let mut body_len: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => body_len += frame.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => return error(StatusCode::BAD_REQUEST, "could not read request body"),
        }
    }
    let value = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": body_len,
    });
    json_response(StatusCode::OK, &value)
}

async fn slow(query: Option<&str>) -> Response<Body> {
    let ms = query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("ms="))
        .map_or(Ok(0), str::parse::<u64>);
    let Ok(ms) = ms else {
        return error(StatusCode::BAD_REQUEST, "ms must be a non-negative integer");
    };
    let ms = ms.min(MAX_SLOW_MS);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    json_response(StatusCode::OK, &json!({"slept_ms": ms}))
}

fn status(code: &str) -> Response<Body> {
    // 1xx cannot be a final response, so only 200-599 are honoured.
    let Some(status) = code
        .parse::<u16>()
        .ok()
        .filter(|c| (200..=599).contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok())
    else {
        return error(StatusCode::BAD_REQUEST, "status must be 200-599");
    };
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return respond(status, "application/json", Bytes::new());
    }
    json_response(status, &json!({"status": status.as_u16()}))
}

async fn read_json(req: Request<Incoming>) -> Result<Value, Response<Body>> {
    let bytes = match Limited::new(req.into_body(), MAX_CHAT_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"));
        }
        Err(_) => return Err(error(StatusCode::BAD_REQUEST, "could not read request body")),
    };
    serde_json::from_slice(&bytes).map_err(|err| error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {err}")))
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    respond(status, "application/json", Bytes::from(value.to_string()))
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, &json!({"error": message}))
}

/// Lets tests exercise keygate's header-based accounting without parsing the body.
fn with_usage(mut resp: Response<Body>, usage: Usage) -> Response<Body> {
    resp.headers_mut()
        .insert("x-usage-tokens", HeaderValue::from(usage.total()));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;
    use hyper_util::client::legacy::Client;

    #[test]
    fn words_are_whitespace_separated() {
        assert_eq!(count_words("  Hello,   world!\n"), 2);
        assert_eq!(count_words(""), 0);
    }

    async fn start(interval: Duration) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let args = DemoArgs {
            listen: addr,
            latency: Duration::ZERO,
            stream_interval: interval,
        };
        tokio::spawn(serve(listener, args, async move {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    fn post(addr: SocketAddr, path: &str, body: &str) -> Request<Full<Bytes>> {
        Request::post(format!("http://{addr}{path}"))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("request")
    }

    async fn json_of(resp: Response<Incoming>) -> Value {
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        serde_json::from_slice(&bytes).expect("json")
    }

    #[tokio::test]
    async fn chat_json_sse_and_echo_over_a_real_socket() {
        let (addr, stop) = start(Duration::from_millis(20)).await;
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();

        let resp = client
            .request(post(addr, "/chat", r#"{"message": "Hello!"}"#))
            .await
            .expect("chat");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-usage-tokens"], "3");
        let v = json_of(resp).await;
        assert_eq!(v["reply"], "echo: Hello!");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
        );

        let resp = client.request(post(addr, "/chat", "{nope")).await.expect("bad");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

        let body = r#"{"model": "m1", "messages": [{"role": "user", "content": "Hi there"}]}"#;
        let resp = client
            .request(post(addr, "/v1/chat/completions", body))
            .await
            .expect("completion");
        assert_eq!(resp.headers()["x-usage-tokens"], "9");
        let v = json_of(resp).await;
        assert_eq!(v["model"], "m1");
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "Demo upstream here. You said: Hi there"
        );

        let body = r#"{"messages": [{"role": "user", "content": "Hi"}], "stream": true,
                       "max_tokens": 6, "stream_options": {"include_usage": true}}"#;
        let resp = client
            .request(post(addr, "/v1/chat/completions", body))
            .await
            .expect("stream");
        assert_eq!(resp.headers()[CONTENT_TYPE], "text/event-stream");
        let mut body = resp.into_body();
        let (mut frames, mut text, mut first, mut last) = (0, String::new(), None, None);
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame.expect("frame").data_ref() {
                frames += 1;
                text.push_str(&String::from_utf8_lossy(data));
                first.get_or_insert_with(std::time::Instant::now);
                last = Some(std::time::Instant::now());
            }
        }
        assert!(frames > 1, "{frames} frames");
        let spread = last.zip(first).map(|(l, f)| l - f).unwrap_or_default();
        assert!(
            spread >= Duration::from_millis(80),
            "events arrived together: {spread:?}"
        );
        let events: Vec<&str> = text.split_terminator("\n\n").collect();
        assert_eq!(events.len(), 6 + 3, "{text}");
        assert_eq!(events.last(), Some(&"data: [DONE]"));
        let usage: Value = serde_json::from_str(events[7].trim_start_matches("data: ")).expect("usage");
        assert_eq!(usage["usage"]["completion_tokens"], 6);

        let _ = stop.send(());
    }

    #[tokio::test]
    async fn probes_answer_over_h2c() {
        let (addr, stop) = start(Duration::ZERO).await;
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http::<Empty<Bytes>>();
        let get = |path: &str| {
            Request::get(format!("http://{addr}{path}"))
                .header("x-twice", "1")
                .header("x-twice", "2")
                .body(Empty::new())
                .expect("request")
        };
        let resp = client.request(get("/echo/a?b=c")).await.expect("echo");
        let v = json_of(resp).await;
        assert_eq!(
            (v["path"].as_str(), v["query"].as_str()),
            (Some("/echo/a"), Some("b=c"))
        );
        assert_eq!(v["headers"]["x-twice"], json!(["1", "2"]));
        assert_eq!(v["version"], "HTTP/2.0");
        for (path, code) in [
            ("/healthz", 200),
            ("/status/418", 418),
            ("/status/99", 400),
            ("/nope", 404),
            ("/slow?ms=5", 200),
        ] {
            let resp = client.request(get(path)).await.expect(path);
            assert_eq!(resp.status().as_u16(), code, "{path}");
        }
        let _ = stop.send(());
    }
}
