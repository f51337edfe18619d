//! The upstream's response body on its way to the client, bounded: it is cut off at the
//! request's total deadline (`server.request_timeout`), and it holds the key's
//! concurrency slot until it ends or is dropped.
//!
//! It never buffers or inspects frames; metering wraps it (`metering`) and reads the
//! [`DeadlineExceeded`] error to classify the usage row.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::body::BoxError;
use crate::limits::Slot;

/// The response ran past the request's total deadline and was cut off.
#[derive(Debug, thiserror::Error)]
#[error("the request ran past its total deadline")]
pub struct DeadlineExceeded;

pub struct Bounded<B> {
    inner: B,
    deadline: Instant,
    /// Made on the first `Pending`: most responses finish in one poll and never need a timer.
    sleep: Option<Pin<Box<Sleep>>>,
    done: bool,
    slot: Option<Slot>,
}

impl<B> Bounded<B> {
    pub fn new(inner: B, deadline: Instant, slot: Option<Slot>) -> Self {
        Bounded {
            inner,
            deadline,
            sleep: None,
            done: false,
            slot,
        }
    }

    /// The concurrency slot, for a retry that replaces this response before it is read.
    pub fn take_slot(&mut self) -> Option<Slot> {
        self.slot.take()
    }
}

impl<B> Body for Bounded<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let deadline = this.deadline;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.done = true;
                        Poll::Ready(Some(Err(Box::new(DeadlineExceeded))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::time::Duration;

    /// One frame, then silence: an upstream that stalls mid-stream.
    struct Stalls(bool);

    impl Body for Stalls {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if std::mem::replace(&mut self.0, true) {
                Poll::Pending
            } else {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"a")))))
            }
        }
    }

    #[tokio::test]
    async fn a_stalled_body_is_cut_off_at_the_deadline() {
        let deadline = Instant::now() + Duration::from_millis(50);
        let mut body = Bounded::new(Stalls(false), deadline, None);
        let first = body.frame().await.expect("frame").expect("ok");
        assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"a")));
        let err = body.frame().await.expect("an error frame").expect_err("deadline");
        assert!(err.is::<DeadlineExceeded>());
        assert!(Instant::now() >= deadline);
        assert!(body.frame().await.is_none(), "nothing after the cut");
    }

    #[tokio::test]
    async fn a_body_that_ends_in_time_passes_through() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let full = http_body_util::Full::new(Bytes::from_static(b"whole"));
        let body = Bounded::new(full, deadline, None);
        let bytes = body.collect().await.expect("collect").to_bytes();
        assert_eq!(&bytes[..], b"whole");
    }
}
