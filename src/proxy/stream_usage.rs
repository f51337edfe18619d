//! Making streamed OpenAI-style completions billable, at the HTTP level: which requests
//! qualify, reading such a request's body whole (within the body limit, the idle
//! timeout and the request's deadline) so `usage::include_usage` can ask for usage, and
//! the response body that takes out the usage chunk the client did not ask for.
//!
//! A POST whose path ends in `/completions` (OpenAI's chat and legacy completions,
//! Azure's deployments, vLLM, llama.cpp, Ollama's OpenAI API) is read whole; no other
//! request body is ever buffered. The meter reads the upstream's stream before
//! [`WithoutUsageChunk`] does, so the row has the tokens the client does not see.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
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

/// Reads the body whole and asks for usage when the request streams without. Returns
/// the request for the upstream, and whether the answer's usage chunk is to be taken
/// out (keygate asked, the client did not).
pub async fn ask(
    req: Request<Incoming>,
    max_bytes: u64,
    idle: Duration,
    deadline: tokio::time::Instant,
) -> Result<(Request<UpstreamBody>, bool), Reject> {
    let (mut parts, body) = req.into_parts();
    if body.is_end_stream() {
        return Ok((Request::from_parts(parts, UpstreamBody::Whole(None)), false));
    }
    let verdict = Arc::new(BodyVerdict::default());
    let limited = LimitedBody::new(body, max_bytes, idle, verdict.clone());
    let whole = match tokio::time::timeout_at(deadline, limited.collect()).await {
        Err(_) => return Err(Reject::BodyTimeout),
        Ok(Err(_)) => return Err(verdict.reject()),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let (body, strip) = match include_usage::ask(&whole) {
        Asked::Rewritten(body) => {
            crate::telemetry::stream_usage("asked");
            (Bytes::from(body), true)
        }
        Asked::AlreadyAsked => {
            crate::telemetry::stream_usage("client_asked");
            (whole, false)
        }
        Asked::Unchanged => (whole, false),
        Asked::Ambiguous => return Err(Reject::BodyAmbiguous),
    };
    // The client's framing (chunked, or its own length) is gone with the body read.
    parts.headers.remove(header::TRANSFER_ENCODING);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    Ok((Request::from_parts(parts, UpstreamBody::Whole(Some(body))), strip))
}

/// The answer to a request keygate asked usage for: a successful event stream loses its
/// usage-only chunk, and with it any `Content-Length` (the client gets fewer bytes).
/// Anything else (an error, JSON) goes as it is.
pub fn without_usage_chunk(resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let streaming = resp.status().is_success()
        && resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
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
