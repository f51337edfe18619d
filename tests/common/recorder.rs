//! Upstreams that tell the test what reached them: a hyper server recording every request
//! (head, body, trailers, connection), with paths that hang, stall mid-stream or answer
//! with hop-by-hop headers; and a raw TCP server that answers garbage. Real sockets.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
    pub conn: usize,
}

#[derive(Default)]
pub struct Log {
    pub seen: Mutex<Vec<Seen>>,
    pub connections: AtomicUsize,
    /// Connections that have ended (either side closed them).
    pub closed: AtomicUsize,
    /// Requests whose handling was dropped before it answered (the proxy hung up).
    pub cancelled: AtomicUsize,
    /// Requests currently being handled.
    pub in_flight: AtomicUsize,
}

impl Log {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    pub fn paths(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.path).collect()
    }
}

pub struct Recorder {
    pub port: u16,
    pub log: Arc<Log>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct CancelGuard(Arc<Log>, bool);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, SeqCst);
        if !self.1 {
            self.0.cancelled.fetch_add(1, SeqCst);
        }
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn handle(log: Arc<Log>, conn: usize, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    log.in_flight.fetch_add(1, SeqCst);
    let mut guard = CancelGuard(log.clone(), false);
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let collected = body.collect().await.ok();
    let wants_gzip = parts
        .headers
        .get("accept-encoding")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("gzip"));
    let trailers = collected.as_ref().and_then(|c| c.trailers().cloned());
    let body = collected.map(|c| c.to_bytes()).unwrap_or_default();
    let asks_for_usage = body.windows(14).any(|w| w == b"stream_options");
    log.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: path.clone(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers,
        body,
        trailers,
        conn,
    });
    let resp = match path.as_str() {
        "/hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Response::new(Full::new(Bytes::new()).boxed())
        }
        "/stall" => {
            // Headers and one chunk, then nothing, ever: a stream the deadline must cut.
            let frames = futures_util::stream::iter(vec![Ok::<_, Infallible>(Frame::data(Bytes::from_static(
                b"data: first\n\n",
            )))])
            .chain(futures_util::stream::pending());
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        }
        "/hop" => Response::builder()
            .header("connection", "x-internal-secret")
            .header("x-internal-secret", "do-not-leak")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic realm=inner")
            .header("x-fine", "kept")
            .body(Full::new(Bytes::from_static(b"{\"ok\":true}")).boxed())
            .unwrap(),
        "/close" => Response::builder()
            .header("connection", "close")
            .body(Full::new(Bytes::from_static(b"{\"ok\":true}")).boxed())
            .unwrap(),
        "/stream" => {
            // Ten events a few milliseconds apart, then the end: a response that is
            // still streaming when the next request could want its connection.
            let frames = futures_util::stream::iter(0..10).then(|i| async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok::<_, Infallible>(Frame::data(Bytes::from(format!("data: {i}\n\n"))))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        }
        "/negotiate" | "/encoded" => {
            // A chat answer with usage. `/negotiate` compresses when asked, as a server
            // behind a compressing front end does (the body then stands for gzip bytes
            // no meter can read); `/encoded` labels its plain body as compressed always.
            let chat = r#"{"id":"c1","model":"m1","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
            let builder = Response::builder().header("content-type", "application/json");
            match (path.as_str(), wants_gzip) {
                ("/negotiate", true) => builder
                    .header("content-encoding", "gzip")
                    .body(Full::new(Bytes::from_static(b"\x1f\x8b\x08\x00not-really-gzip")).boxed()),
                ("/negotiate", false) => builder.body(Full::new(Bytes::from_static(chat.as_bytes())).boxed()),
                _ => builder
                    .header("content-encoding", "br")
                    .body(Full::new(Bytes::from_static(chat.as_bytes())).boxed()),
            }
            .unwrap()
        }
        // Anthropic's Messages stream and OpenAI's Responses stream, as those APIs send
        // them, cut mid-event into frames: usage where each format keeps it.
        "/v1/messages" => sse_frames(&[
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude-x\",",
            "\"content\":[],\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":5000,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ]),
        "/v1/responses" => sse_frames(&[
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r1\",\"model\":\"gpt-r\",\"output\":[],\"usage\":null}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r1\",\"model\":\"gpt-r\",",
            "\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi \\\"usage\\\": 9\"}]}],",
            "\"usage\":{\"input_tokens\":37,\"input_tokens_details\":{\"cached_tokens\":20},\"output_tokens\":11,\"total_tokens\":48}}}\n\n",
        ]),
        // Ollama's native chat stream (NDJSON) and Gemini's `alt=sse` stream, cut
        // mid-object: counts where each keeps them.
        "/api/chat" => {
            let mut r = sse_frames(&[
                "{\"model\":\"llama3.2\",\"message\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"done\":false}\n{\"model\":\"llama3.2\",",
                "\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true,\"prompt_eval_count\":26,\"eval_count\":282}\n",
            ]);
            r.headers_mut()
                .insert("content-type", "application/x-ndjson".parse().unwrap());
            r
        }
        "/v1beta/models/gemini-x:streamGenerateContent" => sse_frames(&[
            "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hi\"}]}}],\"usageMetadata\":{\"promptTokenCount\":9},\"modelVersion\":\"gemini-x\"}\r\n\r\n",
            "data: {\"candidates\":[],\"usageMetadata\":{\"promptTokenCount\":9,\"candidatesTokenCount\":3,\"thoughtsTokenCount\":40,",
            "\"totalTokenCount\":52},\"modelVersion\":\"gemini-x\"}\r\n\r\n",
        ]),
        // A chat stream whose usage chunk comes 300 ms after its finish chunk, as a
        // model's server sends it once it has counted.
        "/late-usage/chat/completions" => {
            let frames = futures_util::stream::iter([0u8, 1, 2]).then(|i| async move {
                let text: &'static str = match i {
                    0 => "data: {\"model\":\"m1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
                    1 => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        "data: {\"model\":\"m1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\n"
                    }
                    _ => "data: [DONE]\n\n",
                };
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(text.as_bytes())))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        }
        // An upstream with a strict schema, as older Azure API versions are: a body
        // with `stream_options` is refused, any other streams. `/bad/…` refuses all;
        // `/picky/…` refuses an asked body for some other reason.
        "/strict/chat/completions" | "/picky/chat/completions" if !asks_for_usage => sse_frames(&[
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"}}]}\n\n",
            "data: [DONE]\n\n",
        ]),
        "/strict/chat/completions" | "/bad/chat/completions" => Response::builder()
            .status(400)
            .header("content-type", "application/json")
            .body(
                Full::new(Bytes::from_static(
                    b"{\"error\":{\"message\":\"Unrecognized request argument supplied: stream_options\"}}",
                ))
                .boxed(),
            )
            .unwrap(),
        "/picky/chat/completions" => Response::builder()
            .status(400)
            .body(Full::new(Bytes::from_static(b"{\"error\":{\"message\":\"body too long\"}}")).boxed())
            .unwrap(),
        _ => Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")).boxed()),
    };
    guard.1 = true;
    Ok(resp)
}

use futures_util::StreamExt as _;

/// A `text/event-stream` answer sent as these frames, a millisecond apart.
fn sse_frames(frames: &[&'static str]) -> Response<Body> {
    let frames = futures_util::stream::iter(frames.to_vec()).then(|f| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(f.as_bytes())))
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    r.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    r
}

impl Recorder {
    pub async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let log = Arc::new(Log::default());
        let l = log.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let conn = l.connections.fetch_add(1, SeqCst) + 1;
                let (l, closed) = (l.clone(), l.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(l.clone(), conn, req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                    closed.closed.fetch_add(1, SeqCst);
                });
            }
        });
        Recorder { port, log, task }
    }
}

/// An upstream whose first connection answers bytes that are not HTTP, and whose later
/// connections answer properly: the proxy must not reuse the broken one.
pub struct Malformed {
    pub port: u16,
    pub connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Malformed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Malformed {
    pub async fn start(garbage: &'static [u8]) -> Malformed {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let n = count.fetch_add(1, SeqCst) + 1;
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        // One read per request is enough for the small GETs the tests send.
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        let answer: &[u8] = if n == 1 {
                            garbage
                        } else {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"ok\":true}"
                        };
                        if sock.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Malformed {
            port,
            connections,
            task,
        }
    }
}

/// Writes `bytes` on a fresh connection to `port` and reads until the peer closes or
/// `quiet` passes without a byte.
pub async fn raw_exchange(port: u16, bytes: &[u8], quiet: Duration) -> Vec<u8> {
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    sock.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(quiet, sock.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// The status codes of every response in a raw HTTP/1.1 byte stream, in order.
pub fn statuses(raw: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(raw);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}
