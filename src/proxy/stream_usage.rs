//! Making streamed OpenAI-style completions billable, at the HTTP level: which requests
//! qualify, reading such a request's body whole (within the body limit, the idle
//! timeout and the request's deadline) so `usage::include_usage` can ask for usage, and
//! the response body that takes out the usage chunk the client did not ask for.
//!
//! A request whose path ends in `/completions` (OpenAI's chat and legacy completions,
//! Azure's deployments, vLLM, llama.cpp, Ollama's OpenAI API) is read whole; no other
//! request body is ever buffered. The meter reads the upstream's stream before
//! [`WithoutUsageChunk`] does, so the row has the tokens the client does not see.
//!
//! An upstream that refuses `stream_options` (an older Azure API version, a strict
//! schema) must not lose its streams to it: until one asked request has succeeded, a
//! 400 or 422 to an asked request is retried once with the client's own body. If the
//! refusal named `stream_options` and the retry is accepted, the upstream is taken to
//! refuse, and nothing is asked of it again until a restart ([`Support`]). Both are
//! needed, so a client cannot switch the ask off for everyone with a body that fails
//! for another reason (say, 40 bytes short of the upstream's size limit).

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::{BodyVerdict, BoxError, LimitedBody, ProxyBody, UpstreamBody};
use super::error::Reject;
use crate::usage::include_usage::{self, Asked};
use crate::usage::usage_chunk::UsageChunkFilter;

/// Whether a request may be a streamed completion: its path, or the lenient reading a
/// router might route it by, ends in `/completions`, in any case, trailing slashes
/// aside. The method is not looked at: an upstream may honour a method override.
pub fn eligible(path: &str, lenient: Option<&str>) -> bool {
    fn ends(path: &str) -> bool {
        let p = path.trim_end_matches('/').as_bytes();
        p.len() >= 12 && p[p.len() - 12..].eq_ignore_ascii_case(b"/completions")
    }
    ends(path) || lenient.is_some_and(ends)
}

/// Whether the upstream takes `stream_options`, as far as its answers have shown.
#[derive(Debug, Default)]
pub struct Support(AtomicU8);

const UNKNOWN: u8 = 0;
const ACCEPTS: u8 = 1;
const REFUSES: u8 = 2;

impl Support {
    /// Whether to ask at all: not of an upstream that has refused.
    pub fn worth_asking(&self) -> bool {
        self.0.load(Ordering::Relaxed) != REFUSES
    }

    /// Whether an asked request's answer is still to show whether the upstream takes
    /// `stream_options`: only then is the client's own request kept for a retry.
    pub fn learning(&self) -> bool {
        self.0.load(Ordering::Relaxed) == UNKNOWN
    }

    /// Whether an asked request's answer with `status` is to be tried again with the
    /// client's own body. Once an asked request has succeeded, the upstream takes
    /// `stream_options`, and a refusal is about something else.
    pub fn retry(&self, status: StatusCode) -> bool {
        if status.is_success() {
            self.0.store(ACCEPTS, Ordering::Relaxed);
            return false;
        }
        matches!(status, StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY)
            && self.0.load(Ordering::Relaxed) == UNKNOWN
    }

    /// The retry's answer: accepted where the asked request was refused for naming
    /// `stream_options`, so the upstream refuses it.
    pub fn retried(&self, refusal_named_it: bool, status: StatusCode) {
        if refusal_named_it && status.is_success() && self.0.swap(REFUSES, Ordering::Relaxed) != REFUSES {
            crate::telemetry::stream_usage("refused");
            tracing::warn!(
                "the upstream refused a request asking for stream usage (stream_options.include_usage) \
                 and accepted it without: streamed completions are not asked again until a restart, \
                 and their rows get tokens only from usage.tokens_header; set \
                 usage.inject_stream_usage = false for such an upstream"
            );
        }
    }
}

/// Whether a refusal's body names `stream_options`: read to its end (so its connection
/// can serve again) or to 64 KiB, for at most two seconds.
pub async fn names_stream_options<B: Body<Data = Bytes> + Unpin>(mut body: B) -> bool {
    const LIMIT: usize = 64 * 1024;
    let read = async {
        let mut text = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                text.extend_from_slice(&data[..data.len().min(LIMIT - text.len())]);
            }
            if text.len() >= LIMIT {
                break;
            }
        }
        text.to_ascii_lowercase().windows(14).any(|w| w == b"stream_options")
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .unwrap_or(false)
}

/// A request ready for the upstream.
pub struct Prepared {
    pub req: Request<UpstreamBody>,
    /// keygate asked for usage and the client did not: the answer's usage chunk goes.
    pub strip: bool,
    /// The client's own request, kept to send again if the upstream refuses the ask.
    /// Boxed: it is held across the first send, in the request future hyper moves.
    pub original: Option<Box<Request<Bytes>>>,
}

/// Reads the body whole and asks for usage when the request streams without.
/// `keep_original`: keep the client's request for a retry ([`Support::retry`]).
pub async fn ask(
    req: Request<Incoming>,
    max_bytes: u64,
    idle: Duration,
    deadline: tokio::time::Instant,
    keep_original: bool,
) -> Result<Prepared, Reject> {
    let (mut parts, body) = req.into_parts();
    let whole = |parts, body| Prepared {
        req: Request::from_parts(parts, UpstreamBody::Whole(body)),
        strip: false,
        original: None,
    };
    if body.is_end_stream() {
        return Ok(whole(parts, None));
    }
    let verdict = Arc::new(BodyVerdict::default());
    let limited = LimitedBody::new(body, max_bytes, idle, verdict.clone());
    let body = match tokio::time::timeout_at(deadline, limited.collect()).await {
        Err(_) => return Err(Reject::BodyTimeout),
        Ok(Err(_)) => return Err(verdict.reject()),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    // The client's framing (chunked, or its own length) is gone with the body read.
    parts.headers.remove(header::TRANSFER_ENCODING);
    let asked = match include_usage::ask(&body) {
        Asked::Rewritten(asked) => {
            crate::telemetry::stream_usage("asked");
            Bytes::from(asked)
        }
        Asked::AlreadyAsked => {
            crate::telemetry::stream_usage("client_asked");
            return Ok(whole(with_length(parts, body.len()), Some(body)));
        }
        Asked::Unchanged => return Ok(whole(with_length(parts, body.len()), Some(body))),
        Asked::Ambiguous => return Err(Reject::BodyAmbiguous),
    };
    let original = keep_original.then(|| -> Box<Request<Bytes>> {
        let mut copy = Request::new(body.clone());
        *copy.method_mut() = parts.method.clone();
        *copy.uri_mut() = parts.uri.clone();
        *copy.version_mut() = parts.version;
        *copy.headers_mut() = parts.headers.clone();
        copy.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        Box::new(copy)
    });
    let parts = with_length(parts, asked.len());
    Ok(Prepared {
        req: Request::from_parts(parts, UpstreamBody::Whole(Some(asked))),
        strip: true,
        original,
    })
}

/// `parts` with `Content-Length: len`. A client's own single value that already says
/// `len` is kept: writing the number again allocated a header value, about 700
/// instructions of a completion request (round 22). Any other (a chunked upload, a
/// rewritten body, repeated values) is replaced.
fn with_length(mut parts: http::request::Parts, len: usize) -> http::request::Parts {
    let mut values = parts.headers.get_all(header::CONTENT_LENGTH).iter();
    let says_len = values.next().is_some_and(|v| {
        let mut digits = itoa::Buffer::new();
        v.as_bytes() == digits.format(len).as_bytes()
    });
    if !(says_len && values.next().is_none()) {
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    parts
}

/// The answer to a request keygate asked usage for: a successful event stream loses its
/// usage-only chunk, and with it any `Content-Length` (the client gets fewer bytes).
/// Anything else (an error, JSON) goes as it is.
pub fn without_usage_chunk(resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let streaming = resp.status().is_success()
        && resp
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(crate::usage::meter::is_event_stream);
    if !streaming {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = WithoutUsageChunk {
        inner: body,
        filter: UsageChunkFilter::new(),
        trailers: None,
        ended: false,
    };
    Response::from_parts(parts, body.boxed_unsync())
}

/// A response body through [`UsageChunkFilter`].
pub struct WithoutUsageChunk {
    inner: ProxyBody,
    filter: UsageChunkFilter,
    /// Trailers wait until the held bytes before them have gone out.
    trailers: Option<Frame<Bytes>>,
    ended: bool,
}

impl Body for WithoutUsageChunk {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(this.trailers.take().map(Ok));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = this.filter.push(data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(trailers) => {
                        this.trailers = Some(trailers);
                        this.ended = true;
                        let rest = this.filter.finish();
                        if !rest.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(rest))));
                        }
                    }
                },
                Poll::Ready(None) => {
                    this.ended = true;
                    let rest = this.filter.finish();
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    #[test]
    fn completion_paths_in_any_spelling_a_router_accepts() {
        for path in [
            "/v1/chat/completions",
            "/v1/completions",
            "/openai/deployments/gpt4/chat/completions",
            "/v1/chat/completions/",
            "/V1/Chat/COMPLETIONS",
        ] {
            assert!(eligible(path, None), "{path}");
        }
        assert!(eligible("/v1/chat/completions;x", Some("/v1/chat/completions")));
        for path in [
            "/v1/embeddings",
            "/v1/completions/abc",
            "/completion",
            "/v1/messages",
            "/",
        ] {
            assert!(!eligible(path, None), "{path}");
        }
    }

    fn sse(pieces: Vec<&'static str>, ct: &str) -> Response<ProxyBody> {
        let frames = pieces
            .into_iter()
            .map(|p| Ok::<_, BoxError>(Frame::data(Bytes::from(p))));
        let body = StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
        Response::builder()
            .header(header::CONTENT_TYPE, ct)
            .header(header::CONTENT_LENGTH, "999")
            .body(body)
            .expect("response")
    }

    #[tokio::test]
    async fn only_a_successful_event_stream_is_filtered() {
        let usage = "data: {\"choices\":[],\"usage\":{\"total_tokens\":3}}\n\n";
        let resp = without_usage_chunk(sse(
            vec!["data: {\"choices\":[{}]}\n\nda", "ta: [DONE]\n\n", usage],
            "Text/Event-Stream; charset=utf-8",
        ));
        assert!(resp.headers().get(header::CONTENT_LENGTH).is_none());
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"data: {\"choices\":[{}]}\n\ndata: [DONE]\n\n");
        let resp = without_usage_chunk(sse(vec![usage], "application/json"));
        assert_eq!(resp.headers()[header::CONTENT_LENGTH], "999");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], usage.as_bytes());
    }
}
