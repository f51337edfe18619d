//! The accept loops over real sockets: per-core workers each accepting, the spread that
//! `balance` keeps, and a stop that drains every worker before `serve` returns.

use std::path::Path;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::config::Config;
use crate::proxy::{body, workers};

struct Running {
    addr: SocketAddr,
    cancel: CancellationToken,
    served: tokio::task::JoinHandle<Arc<Workers>>,
}

/// `serve` on `n` per-core workers; each request is answered, after `delay`, with the
/// index of the worker that served it.
async fn start(n: usize, delay: Duration) -> Running {
    let env = |name: &str| (name == "DATABASE_URL").then(|| "postgres://u@localhost/db".to_string());
    let cfg = Config::parse_with_env("", Path::new("t.toml"), &env)
        .expect("config")
        .server;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cancel = CancellationToken::new();
    let handler = move |_req: Request<Incoming>, _peer: SocketAddr| async move {
        tokio::time::sleep(delay).await;
        Ok::<_, Infallible>(Response::new(body::full(Bytes::from(workers::current().to_string()))))
    };
    let workers = Arc::new(Workers::start(n).expect("workers"));
    let stop = cancel.clone();
    let served = tokio::spawn(async move {
        serve(listener, &cfg, handler, stop, Duration::from_secs(5), Some(&workers)).await;
        workers
    });
    Running { addr, cancel, served }
}

impl Running {
    async fn stop(self) {
        self.cancel.cancel();
        let workers = tokio::time::timeout(Duration::from_secs(10), self.served)
            .await
            .expect("serve returns after the stop")
            .expect("join");
        if let Ok(w) = Arc::try_unwrap(workers) {
            tokio::task::spawn_blocking(move || w.stop()).await.expect("join");
        }
    }
}

/// Sends one request on `conn` and returns the worker index it was answered with.
async fn ask(conn: &mut TcpStream, close: bool) -> usize {
    let head = if close { "Connection: close\r\n" } else { "" };
    conn.write_all(format!("GET / HTTP/1.1\r\nHost: t\r\n{head}\r\n").as_bytes())
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("answer in time")
            .expect("read");
        assert!(n > 0, "closed before the answer: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .expect("content-length");
            if body.len() >= len {
                return body[..len].parse().expect("worker index");
            }
        }
    }
}

#[tokio::test]
async fn keep_alive_connections_are_spread_evenly_over_the_workers() {
    let running = start(2, Duration::ZERO).await;
    // A new connection per request first: each is counted while open and no longer
    // after, or the spread below would be skewed by what these left behind.
    for _ in 0..60 {
        let mut conn = TcpStream::connect(running.addr).await.expect("connect");
        ask(&mut conn, true).await;
    }
    // A close's count drops when its task ends, just after the client has the answer;
    // give the last of them that moment on a loaded box.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut conns = Vec::new();
    let mut per_worker = [0usize; 2];
    for _ in 0..10 {
        let mut conn = TcpStream::connect(running.addr).await.expect("connect");
        let w = ask(&mut conn, false).await;
        per_worker[w] += 1;
        conns.push((conn, w));
    }
    assert_eq!(per_worker, [5, 5], "ten connections opened one after another");
    // A connection stays with the worker that accepted it.
    for (conn, w) in &mut conns {
        assert_eq!(ask(conn, false).await, *w);
    }
    drop(conns);
    running.stop().await;
}

#[tokio::test]
async fn a_stop_lets_every_worker_finish_its_requests_before_serve_returns() {
    let running = start(2, Duration::from_millis(400)).await;
    let addr = running.addr;
    // Two connections, one per worker, each with a request in flight.
    let calls: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(async move {
                let mut conn = TcpStream::connect(addr).await.expect("connect");
                ask(&mut conn, false).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let stopped = tokio::spawn(running.stop());
    let mut served = Vec::new();
    for call in calls {
        served.push(call.await.expect("the request in flight is answered"));
    }
    served.sort_unstable();
    assert_eq!(served, [0, 1], "one request on each worker");
    stopped.await.expect("stop");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no worker still listens after serve returned"
    );
}
