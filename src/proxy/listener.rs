//! Accepting and serving client connections: the connection cap, the HTTP/1.1 (and
//! optional h2c) settings with a real timer so the header-read timeout fires, the TLS
//! handshake when `[server.tls]` is set (bounded by the same timeout), and a graceful
//! stop that lets in-flight requests, streams included, finish.
//!
//! With per-core workers, each accepted connection is handed to one worker's runtime
//! (`workers`), registered with that thread's reactor, and served there to the end.
//!
//! It knows nothing about keys or upstreams: each request goes to the handler it is given.
//! Certificates are loaded by `config::tls`, never here.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::body::ProxyBody;
use super::workers::Workers;
use crate::config::ServerConfig;

/// Builds the connection settings once; every connection clones them.
pub fn builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .keep_alive(cfg.keepalive)
        // hyper answers 431 itself past this buffer; the pipeline answers a JSON 431
        // for heads between the configured limit and this backstop.
        .max_buf_size((cfg.max_header_bytes * 2).max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX));
    if cfg.http2 {
        b
    } else {
        b.http1_only()
    }
}

/// An accepted socket on its way to the runtime that will serve it.
enum Accepted {
    Here(TcpStream),
    /// Deregistered from this runtime's reactor, to be registered with a worker's.
    Moving(std::net::TcpStream),
}

impl Accepted {
    fn new(stream: TcpStream, moving: bool) -> std::io::Result<Accepted> {
        if moving {
            stream.into_std().map(Accepted::Moving)
        } else {
            Ok(Accepted::Here(stream))
        }
    }

    /// Runs on the serving runtime.
    fn into_stream(self) -> std::io::Result<TcpStream> {
        match self {
            Accepted::Here(s) => Ok(s),
            Accepted::Moving(s) => TcpStream::from_std(s),
        }
    }
}

/// Serves `listener` until `cancel` fires, then waits up to `grace` for open
/// connections to finish their requests. With `workers`, connections are served on
/// the workers' runtimes in turn; otherwise on the calling runtime.
pub async fn serve<H, F>(
    listener: TcpListener,
    cfg: &ServerConfig,
    handler: H,
    cancel: CancellationToken,
    grace: Duration,
    workers: Option<&Workers>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static,
{
    let builder = Arc::new(builder(cfg));
    let tls = cfg.tls.as_ref().map(|t| TlsAcceptor::from(t.server_config.clone()));
    let graceful = GracefulShutdown::new();
    // Connections live in a JoinSet so that any still open when the grace period ends
    // are aborted and dropped *here*, before shutdown moves on: dropping a response body
    // is what records its usage row, and the writer drains only after this returns.
    let mut conns = tokio::task::JoinSet::new();
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    loop {
        // Past the cap, connections wait in the kernel's backlog rather than being
        // accepted and starved.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = cancel.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = cancel.cancelled() => break,
        };
        while conns.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let stream = match Accepted::new(stream, workers.is_some()) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, %peer, "cannot hand the connection to a worker");
                continue;
            }
        };
        let handler = handler.clone();
        // The handler's own future, not an `async move` wrapper around it: a wrapper's
        // state machine held the handler's future twice (8 KiB), and hyper moves it.
        let svc = service_fn(move |req| handler(req, peer));
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let Some(acceptor) = tls.clone() else {
            let task = async move {
                let stream = match stream.into_stream() {
                    Ok(s) => s,
                    Err(e) => return tracing::debug!(error = %e, %peer, "cannot register the connection"),
                };
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
                drop(permit);
            };
            match workers {
                Some(w) => conns.spawn_on(task, w.pick()),
                None => conns.spawn(task),
            };
            continue;
        };
        // The handshake runs in the connection's own task, holding its slot, so a slow or
        // silent client delays nobody else and counts against the cap; the header-read
        // timeout bounds it, or a slowloris could park in the handshake instead.
        let cancel = cancel.clone();
        let timeout = cfg.header_read_timeout;
        let task = async move {
            let stream = match stream.into_stream() {
                Ok(s) => s,
                Err(e) => return tracing::debug!(error = %e, %peer, "cannot register the connection"),
            };
            let handshake = tokio::time::timeout(timeout, acceptor.accept(stream));
            let stream = tokio::select! {
                r = handshake => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        crate::telemetry::tls_handshake_failed("error");
                        tracing::debug!(error = %e, %peer, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        crate::telemetry::tls_handshake_failed("timeout");
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
                () = cancel.cancelled() => return,
            };
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        };
        match workers {
            Some(w) => conns.spawn_on(task, w.pick()),
            None => conns.spawn(task),
        };
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, open = conns.len(), "grace period over; closing remaining connections");
            conns.abort_all();
        }
    }
    while conns.join_next().await.is_some() {}
}
