//! Body types for the proxy: the boxed body every response uses, the request body
//! wrapper that enforces the size limit and the idle timeout while streaming, and the
//! upstream request body, streaming or (read whole by `stream_usage`) complete.
//!
//! Bodies are never buffered here; a frame goes through as soon as it arrives.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed_unsync()
}

/// What the upstream is sent: the client's body as it streams in, or one already read
/// whole (to ask a streaming call for its usage), sent with its length.
pub enum UpstreamBody {
    Streaming(LimitedBody<hyper::body::Incoming>),
    Whole(Option<Bytes>),
}

impl UpstreamBody {
    /// Why a streaming body was cut off, for classifying a failed send.
    pub fn verdict(&self) -> Option<Arc<BodyVerdict>> {
        match self {
            UpstreamBody::Streaming(b) => Some(b.verdict.clone()),
            UpstreamBody::Whole(_) => None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Streaming(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Whole(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Streaming(b) => b.is_end_stream(),
            UpstreamBody::Whole(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Streaming(b) => b.size_hint(),
            UpstreamBody::Whole(b) => SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

/// Why a request body was cut off (0 while it has not been); read by the pipeline when
/// the upstream call fails, to answer 413, 408 or 400 rather than 502.
#[derive(Debug, Default)]
pub struct BodyVerdict(AtomicU8);

const TOO_LARGE: u8 = 1;
const IDLE: u8 = 2;
const MALFORMED: u8 = 3;

impl BodyVerdict {
    /// The rejection a body cut off this way gets (`BodyMalformed` for the client's
    /// own framing failing, or the client going away).
    pub fn reject(&self) -> super::error::Reject {
        use super::error::Reject;
        if self.too_large() {
            Reject::BodyTooLarge
        } else if self.idle() {
            Reject::BodyTimeout
        } else {
            Reject::BodyMalformed
        }
    }
    pub fn too_large(&self) -> bool {
        self.0.load(Ordering::Relaxed) == TOO_LARGE
    }
    pub fn idle(&self) -> bool {
        self.0.load(Ordering::Relaxed) == IDLE
    }
    /// The client's body itself failed (bad chunk framing, or the client went away).
    pub fn malformed(&self) -> bool {
        self.0.load(Ordering::Relaxed) == MALFORMED
    }
    fn set(&self, v: u8) {
        self.0.store(v, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("request body exceeds the size limit")]
    TooLarge,
    #[error("request body idle timeout")]
    Idle,
}

/// A request body on its way to the upstream, cut off when it grows past `limit` bytes
/// or sends nothing for `idle`; its trailers are not passed on.
///
/// The idle timer is made on the first wait for a frame, not up front: a bodyless
/// request is never polled, and most bodies arrive without a wait, so neither pays for
/// a boxed timer (or, bodyless, a clock read) per request.
pub struct LimitedBody<B> {
    inner: B,
    remaining: u64,
    idle: Duration,
    /// When the body was handed over or its last frame arrived: the idle time runs
    /// from here. `None` for a body that was already complete.
    since: Option<Instant>,
    deadline: Option<Pin<Box<Sleep>>>,
    verdict: Arc<BodyVerdict>,
}

impl<B: Body> LimitedBody<B> {
    pub fn new(inner: B, limit: u64, idle: Duration, verdict: Arc<BodyVerdict>) -> Self {
        let since = (!inner.is_end_stream()).then(Instant::now);
        LimitedBody {
            inner,
            remaining: limit,
            idle,
            since,
            deadline: None,
            verdict,
        }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                // Request trailers are dropped: they arrive after every check has run, so
                // an identity header or key in one would reach the upstream unexamined,
                // and chat APIs have no use for them.
                Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => continue,
                other => break other,
            }
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        this.verdict.set(TOO_LARGE);
                        return Poll::Ready(Some(Err(BodyError::TooLarge.into())));
                    }
                    this.remaining -= len;
                }
                // The timer, if any, is moved on at the next wait, not per frame.
                this.since = Some(Instant::now());
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.verdict.set(MALFORMED);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let due = this.since.unwrap_or_else(Instant::now) + this.idle;
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                if deadline.deadline() != due {
                    deadline.as_mut().reset(due);
                }
                ready!(deadline.as_mut().poll(cx));
                this.verdict.set(IDLE);
                Poll::Ready(Some(Err(BodyError::Idle.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    fn chunks(parts: Vec<&'static [u8]>) -> impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = parts
            .into_iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn passes_bodies_within_the_limit() {
        let verdict = Arc::new(BodyVerdict::default());
        let body = LimitedBody::new(chunks(vec![b"abc", b"def"]), 6, Duration::from_secs(5), verdict.clone());
        let bytes = body.collect().await.expect("within limit").to_bytes();
        assert_eq!(&bytes[..], b"abcdef");
        assert!(!verdict.too_large());
    }

    #[tokio::test]
    async fn cuts_off_bodies_past_the_limit() {
        let verdict = Arc::new(BodyVerdict::default());
        let body = LimitedBody::new(
            chunks(vec![b"abc", b"defg"]),
            6,
            Duration::from_secs(5),
            verdict.clone(),
        );
        assert!(body.collect().await.is_err());
        assert!(verdict.too_large());
    }

    #[tokio::test]
    async fn trailers_are_not_passed_on() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-keygate-organization-id", http::HeaderValue::from_static("evil"));
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = LimitedBody::new(
            StreamBody::new(futures_util::stream::iter(frames)),
            10,
            Duration::from_secs(5),
            Arc::new(BodyVerdict::default()),
        );
        let collected = body.collect().await.expect("body");
        assert!(collected.trailers().is_none());
        assert_eq!(&collected.to_bytes()[..], b"ab");
    }

    #[tokio::test]
    async fn the_idle_time_restarts_with_every_frame() {
        // Frames 100 ms apart never leave the body idle for 400 ms; the stall after the
        // third does, 400 ms after it. Had the timer not restarted, 400 ms after the start.
        let frames = futures_util::stream::unfold(0, |n| async move {
            if n == 3 {
                futures_util::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            Some((
                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"x"))),
                n + 1,
            ))
        });
        let verdict = Arc::new(BodyVerdict::default());
        let mut body = LimitedBody::new(
            StreamBody::new(Box::pin(frames)),
            10,
            Duration::from_millis(400),
            verdict.clone(),
        );
        let started = Instant::now();
        for _ in 0..3 {
            assert!(body.frame().await.is_some_and(|f| f.is_ok()));
        }
        assert!(body.frame().await.is_some_and(|f| f.is_err()));
        assert!(verdict.idle());
        assert!(
            started.elapsed() >= Duration::from_millis(650),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn times_out_idle_bodies() {
        let verdict = Arc::new(BodyVerdict::default());
        let stalled = StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, std::convert::Infallible>,
        >());
        let body = LimitedBody::new(stalled, 10, Duration::from_millis(50), verdict.clone());
        assert!(body.collect().await.is_err());
        assert!(verdict.idle());
    }
}
