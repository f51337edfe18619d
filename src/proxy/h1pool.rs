//! keygate's own keep-alive pool for plain-HTTP upstreams, one per worker, on hyper's
//! HTTP/1 connection API.
//!
//! Owns connecting (TCP with the connect timeout, no Nagle, TCP keep-alive), handing out
//! idle connections (newest first), retrying a request that a reused connection gave back
//! unsent, taking a connection back when its response ended cleanly, and closing idle
//! ones after `upstream.pool_idle_timeout`. TLS and h2 upstreams keep hyper-util's
//! pooled client (`forward.rs`), which this replaces only where it is plain HTTP/1.1.
//!
//! Why not hyper-util's client here: it spawns a task per request to wait for the
//! connection to become ready again, and goes through a shared map and lock to find it
//! (docs/performance.md, round 5). Here the response body hands its connection back
//! itself, on its last frame, with no task and no lock but this worker's.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::forward::UpstreamBody;

/// What the pool could not do. The text is for the log only.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("exchange: {0}")]
    Exchange(hyper::Error),
}

struct Idle {
    tx: SendRequest<UpstreamBody>,
    since: Instant,
}

pub struct H1Pool {
    host: String,
    port: u16,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    /// Oldest at the front. Only this worker's tasks touch it, so the lock is
    /// uncontended; it is never held across an await.
    idle: Mutex<VecDeque<Idle>>,
    /// Whether a reaper task is running for the idle connections.
    reaping: AtomicBool,
}

impl H1Pool {
    pub fn new(host: String, port: u16, connect_timeout: Duration, idle_timeout: Duration, max_idle: usize) -> Self {
        H1Pool {
            host,
            port,
            connect_timeout,
            idle_timeout,
            max_idle,
            idle: Mutex::new(VecDeque::new()),
            reaping: AtomicBool::new(false),
        }
    }

    fn idle(&self) -> MutexGuard<'_, VecDeque<Idle>> {
        // Only plain data is kept under the lock; a panic cannot leave it half-changed.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `req` on an idle connection or a new one. A reused connection that turns
    /// out to be closed before any of the request was written gives the request back,
    /// and it is tried again; a new connection's failure is final.
    pub async fn send(self: &Arc<Self>, mut req: Request<UpstreamBody>) -> Result<Response<PoolBody>, PoolError> {
        loop {
            let (mut tx, reused) = match self.checkout() {
                Some(tx) => (tx, true),
                // Boxed: new connections are rare, and inline the connect would more
                // than double the request future hyper moves around per request.
                None => (Box::pin(self.connect()).await?, false),
            };
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    return Ok(Response::from_parts(parts, PoolBody::new(body, tx, self.clone())));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => {
                        tracing::debug!(error = %e.error(), "pooled upstream connection closed; retrying on another");
                        req = unsent;
                    }
                    _ => return Err(PoolError::Exchange(e.into_error())),
                },
            }
        }
    }

    /// The newest idle connection that is ready for a request. Expired or closed ones
    /// are dropped; one whose last exchange the connection task has not wound up yet
    /// goes back to the front rather than being waited for.
    fn checkout(&self) -> Option<SendRequest<UpstreamBody>> {
        let mut idle = self.idle();
        let mut not_yet = Vec::new();
        let mut found = None;
        while let Some(mut c) = idle.pop_back() {
            if c.since.elapsed() >= self.idle_timeout {
                continue;
            }
            match readiness(&mut c.tx) {
                Ready::Yes => {
                    found = Some(c.tx);
                    break;
                }
                Ready::NotYet => not_yet.push(c),
                Ready::Closed => {}
            }
        }
        for c in not_yet {
            idle.push_front(c);
        }
        found
    }

    async fn connect(&self) -> Result<SendRequest<UpstreamBody>, PoolError> {
        let target = (self.host.as_str(), self.port);
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(target))
            .await
            .map_err(|_| PoolError::Connect("timed out".into()))?
            .map_err(|e| PoolError::Connect(e.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| PoolError::Connect(e.to_string()))?;
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        socket2::SockRef::from(&stream)
            .set_tcp_keepalive(&keepalive)
            .map_err(|e| PoolError::Connect(e.to_string()))?;
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| PoolError::Connect(e.to_string()))?;
        // The connection is driven by the worker that opened it, as every request
        // using it is; it ends when the upstream or keygate closes it.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(tx)
    }

    /// Takes a connection back after a response that ended cleanly.
    fn give_back(self: &Arc<Self>, tx: SendRequest<UpstreamBody>) {
        if tx.is_closed() {
            return;
        }
        let start_reaper = {
            let mut idle = self.idle();
            if idle.len() >= self.max_idle {
                return;
            }
            idle.push_back(Idle {
                tx,
                since: Instant::now(),
            });
            !self.reaping.swap(true, Relaxed)
        };
        if start_reaper {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn(reap(Arc::downgrade(self)))),
                // Outside a runtime nothing can be served either; checkout still
                // drops what has expired.
                Err(_) => self.reaping.store(false, Relaxed),
            }
        }
    }

    /// Drops idle connections past the idle timeout or closed by the upstream. Returns
    /// whether any are left; when none are, the reaper is marked stopped under the same
    /// lock `give_back` takes, so a connection given back meanwhile starts a new one.
    fn expire(&self) -> bool {
        let mut idle = self.idle();
        let now = Instant::now();
        idle.retain(|c| now.duration_since(c.since) < self.idle_timeout && !c.tx.is_closed());
        if idle.is_empty() {
            self.reaping.store(false, Relaxed);
        }
        !idle.is_empty()
    }
}

/// Closes idle connections once they pass the idle timeout (within half the timeout
/// again), so a quiet sidecar holds no upstream sockets. It ends when none are left
/// (the next one given back starts another) or the pool is gone. Like hyper-util's pool
/// timer it belongs to the pool, not to the process's background tasks: it has nothing
/// to flush, and a worker's runtime ends it when the worker stops.
async fn reap(pool: Weak<H1Pool>) {
    loop {
        let Some(every) = pool
            .upgrade()
            .map(|p| (p.idle_timeout / 2).max(Duration::from_millis(50)))
        else {
            return;
        };
        tokio::time::sleep(every).await;
        match pool.upgrade() {
            Some(p) if p.expire() => {}
            _ => return,
        }
    }
}

enum Ready {
    Yes,
    NotYet,
    Closed,
}

/// Readiness without waiting. The connection task may have wound up the last exchange
/// without having been polled since, so a connection that does not say it is ready is
/// polled once (with a waker that does nothing: nobody waits on it).
fn readiness(tx: &mut SendRequest<UpstreamBody>) -> Ready {
    if tx.is_closed() {
        return Ready::Closed;
    }
    if tx.is_ready() {
        return Ready::Yes;
    }
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match tx.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => Ready::Yes,
        Poll::Ready(Err(_)) => Ready::Closed,
        Poll::Pending => Ready::NotYet,
    }
}

/// An upstream response body that gives its connection back to the pool when it ends
/// cleanly. Dropped early or failed, it drops the connection, which hyper then closes:
/// a half-read response never serves another request.
pub struct PoolBody {
    inner: Incoming,
    back: Option<(SendRequest<UpstreamBody>, Arc<H1Pool>)>,
}

impl PoolBody {
    fn new(inner: Incoming, tx: SendRequest<UpstreamBody>, pool: Arc<H1Pool>) -> Self {
        let mut body = PoolBody {
            inner,
            back: Some((tx, pool)),
        };
        // A response without a body (204, 304, HEAD, length 0) is already complete.
        if body.inner.is_end_stream() {
            body.give_back();
        }
        body
    }

    /// A body from hyper-util's client, which pools on its own.
    pub fn unpooled(inner: Incoming) -> Self {
        PoolBody { inner, back: None }
    }

    fn give_back(&mut self) {
        if let Some((tx, pool)) = self.back.take() {
            pool.give_back(tx);
        }
    }
}

impl Body for PoolBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            // hyper stops polling a body that says it has ended, so the last data frame
            // is the moment, not the `None` that may never be asked for.
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.give_back(),
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
