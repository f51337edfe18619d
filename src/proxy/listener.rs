//! Accepting and serving client connections: the connection cap, the HTTP/1.1 (and
//! optional h2c) settings with a real timer so the header-read timeout fires, the TLS
//! handshake when `[server.tls]` is set (bounded by the same timeout), and a graceful
//! stop that lets in-flight requests, streams included, finish.
//!
//! With per-core workers, every worker accepts on its own copy of the listening socket
//! and serves what it accepts on its own runtime to the end; `balance` decides which
//! worker may take the next connection, so they stay even.
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
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::balance::Turn;
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

/// What every accept loop shares: one connection cap and one set of settings.
#[derive(Clone)]
struct Accepting<H> {
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<TlsAcceptor>,
    slots: Arc<Semaphore>,
    handshake_timeout: Duration,
    handler: H,
    cancel: CancellationToken,
    grace: Duration,
}

/// Serves `listener` until `cancel` fires, then waits up to `grace` for open
/// connections to finish their requests. With `workers`, each worker accepts on a copy
/// of the listening socket and serves what it accepts (`balance` keeps them even);
/// otherwise the calling runtime accepts and serves.
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
    let accepting = Accepting {
        builder: Arc::new(builder(cfg)),
        tls: cfg.tls.as_ref().map(|t| TlsAcceptor::from(t.server_config.clone())),
        slots: Arc::new(Semaphore::new(cfg.max_connections)),
        handshake_timeout: cfg.header_read_timeout,
        handler,
        cancel,
        grace,
    };
    let Some(workers) = workers else {
        return drained(accept_loop(listener, accepting, Turn::alone()).await);
    };
    let mut copies = Vec::with_capacity(workers.count());
    for handle in workers.handles() {
        match copy_listener(&listener) {
            Ok(copy) => copies.push((copy, handle)),
            Err(e) => tracing::warn!(error = %e, "cannot give a worker its copy of the listener; it will not accept"),
        }
    }
    if copies.is_empty() {
        return drained(accept_loop(listener, accepting, Turn::alone()).await);
    }
    // The copies keep the socket open; this runtime stops watching it.
    drop(listener);
    let turns = Turn::split(copies.len());
    let loops: Vec<_> = copies
        .into_iter()
        .zip(turns)
        .map(|((copy, handle), turn)| {
            let accepting = accepting.clone();
            // Registered inside the worker, with that thread's reactor.
            handle.spawn(async move {
                match TcpListener::from_std(copy) {
                    Ok(listener) => accept_loop(listener, accepting, turn).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "a worker cannot watch the listener; it will not accept");
                        turn.retire();
                        true
                    }
                }
            })
        })
        .collect();
    // Each loop drains its own connections before it ends, so when this returns every
    // connection has ended (or been aborted) and its usage row is recorded.
    let mut all = true;
    for l in loops {
        all &= l.await.unwrap_or(false);
    }
    drained(all);
}

fn drained(all: bool) {
    if all {
        tracing::info!("all connections closed");
    }
}

/// A second descriptor for the same listening socket, for another thread's reactor.
#[cfg(unix)]
fn copy_listener(listener: &TcpListener) -> std::io::Result<std::net::TcpListener> {
    use std::os::fd::AsFd;
    let copy = std::net::TcpListener::from(listener.as_fd().try_clone_to_owned()?);
    copy.set_nonblocking(true)?;
    Ok(copy)
}

#[cfg(not(unix))]
fn copy_listener(_: &TcpListener) -> std::io::Result<std::net::TcpListener> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Accepts on this runtime and serves each connection in a task of its own here, until
/// `cancel`; then lets them finish within the grace period and aborts the rest. True
/// when none had to be aborted.
async fn accept_loop<H, F>(listener: TcpListener, acc: Accepting<H>, turn: Turn) -> bool
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    // Connections live in a JoinSet so that any still open when the grace period ends
    // are aborted and dropped *here*, before shutdown moves on: dropping a response body
    // is what records its usage row, and the writer drains only after this returns.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        if !turn.wait(&acc.cancel).await {
            break;
        }
        // Past the cap, connections wait in the kernel's backlog rather than being
        // accepted and starved.
        let permit = tokio::select! {
            p = acc.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = acc.cancel.cancelled() => break,
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
            () = acc.cancel.cancelled() => break,
        };
        while conns.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let open = turn.opened();
        let handler = acc.handler.clone();
        // The handler's own future, not an `async move` wrapper around it: a wrapper's
        // state machine held the handler's future twice (8 KiB), and hyper moves it.
        let svc = service_fn(move |req| handler(req, peer));
        let (builder, watcher) = (acc.builder.clone(), graceful.watcher());
        let Some(acceptor) = acc.tls.clone() else {
            conns.spawn(async move {
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
                drop((permit, open));
            });
            continue;
        };
        // The handshake runs in the connection's own task, holding its slot, so a slow or
        // silent client delays nobody else and counts against the cap; the header-read
        // timeout bounds it, or a slowloris could park in the handshake instead.
        let cancel = acc.cancel.clone();
        let timeout = acc.handshake_timeout;
        conns.spawn(async move {
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
            drop((permit, open));
        });
    }
    drop(listener);
    let all = tokio::select! {
        () = graceful.shutdown() => true,
        () = tokio::time::sleep(acc.grace) => {
            tracing::warn!(grace = ?acc.grace, open = conns.len(), "grace period over; closing remaining connections");
            conns.abort_all();
            false
        }
    };
    while conns.join_next().await.is_some() {}
    all
}

#[cfg(test)]
#[path = "listener_tests.rs"]
mod tests;
