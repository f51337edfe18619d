//! The upstream connection pool, seen from the upstream's side of real sockets:
//! keep-alive connections are reused (never one per request), a connection is never
//! handed out while its last response is unread or after the upstream said it closes,
//! idle ones expire, and one the upstream closed while idle costs no request.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::net::*;
use common::recorder::*;
use common::*;

/// One worker, so one client connection and one upstream pool make the whole picture.
const ONE_WORKER: &str = "[server]\nworkers = 1\n";

async fn setup(extra: &str) -> (TestDb, String, Recorder, Gateway) {
    let (db, key) = seeded_db().await;
    let rec = Recorder::start().await;
    let gw = Gateway::start(&db, rec.port, extra).await;
    (db, key, rec, gw)
}

/// A keep-alive client: its requests share one connection to keygate when sequential.
fn keep_alive_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn call(c: &Client<HttpConnector, Full<Bytes>>, url: &str, key: &str) -> (StatusCode, Bytes) {
    let req = Request::get(url)
        .header("authorization", bearer(key))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .expect("answered in time")
        .expect("request");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, body)
}

fn connections(rec: &Recorder) -> usize {
    rec.log.connections.load(SeqCst)
}

#[tokio::test]
async fn sequential_requests_and_streams_reuse_one_upstream_connection() {
    let (_db, key, rec, gw) = setup(ONE_WORKER).await;
    let c = keep_alive_client();
    for i in 0..50 {
        let (status, _) = call(&c, &gw.url(&format!("/v1/chat/{i}")), &key).await;
        assert_eq!(status, 200);
    }
    assert_eq!(connections(&rec), 1, "keygate opened upstream connections per request");
    // A streamed response read to its end gives its connection back too.
    for _ in 0..5 {
        let (status, body) = call(&c, &gw.url("/stream"), &key).await;
        assert_eq!(status, 200);
        assert!(String::from_utf8_lossy(&body).ends_with("data: 9\n\n"), "{body:?}");
    }
    assert_eq!(connections(&rec), 1);
}

#[tokio::test]
async fn concurrent_requests_open_only_as_many_connections_as_overlap() {
    // The seeded organisation allows 60 requests a minute.
    const CLIENTS: usize = 10;
    const EACH: usize = 5;
    let (_db, key, rec, gw) = setup("").await;
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (url, key) = (gw.url("/v1/chat/completions"), key.clone());
            tokio::spawn(async move {
                let c = keep_alive_client();
                for _ in 0..EACH {
                    assert_eq!(call(&c, &url, &key).await.0, 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client task");
    }
    assert_eq!(rec.log.seen().len(), CLIENTS * EACH);
    let opened = connections(&rec);
    assert!(
        opened <= CLIENTS,
        "{opened} upstream connections for {CLIENTS} overlapping clients"
    );
}

#[tokio::test]
async fn a_connection_the_upstream_closes_is_never_reused() {
    let (_db, key, rec, gw) = setup(ONE_WORKER).await;
    let c = keep_alive_client();
    // Each /close ends its connection; each plain request after it needs a new one,
    // and the next /close reuses that one. Five rounds: six connections, no error.
    for _ in 0..5 {
        assert_eq!(call(&c, &gw.url("/close"), &key).await.0, 200);
        assert_eq!(call(&c, &gw.url("/v1/chat/completions"), &key).await.0, 200);
    }
    assert_eq!(connections(&rec), 6);
}

#[tokio::test]
async fn an_abandoned_stream_does_not_poison_the_pool() {
    let (_db, key, rec, gw) = setup(ONE_WORKER).await;
    let c = keep_alive_client();
    // Headers and one event, then nothing: the client reads the first event and leaves.
    let req = Request::get(gw.url("/stall"))
        .header("authorization", bearer(&key))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = c.request(req).await.expect("stall");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a frame").expect("data");
    assert!(first.is_data());
    drop(body);
    drop(c);
    // The half-read upstream connection must not serve anyone else.
    let c = keep_alive_client();
    for _ in 0..5 {
        assert_eq!(call(&c, &gw.url("/v1/chat/completions"), &key).await.0, 200);
    }
    assert_eq!(connections(&rec), 2);
}

#[tokio::test]
async fn idle_upstream_connections_expire() {
    // One client connection, so one worker's pool, whatever the worker count.
    let (_db, key, rec, gw) = setup("pool_idle_timeout = \"300ms\"\n").await;
    let c = keep_alive_client();
    assert_eq!(call(&c, &gw.url("/a"), &key).await.0, 200);
    assert_eq!(call(&c, &gw.url("/b"), &key).await.0, 200);
    assert_eq!(connections(&rec), 1);
    // Closed by keygate while nobody asks for it, not only skipped at the next request.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(rec.log.closed.load(SeqCst), 1, "the idle connection is still open");
    assert_eq!(call(&c, &gw.url("/c"), &key).await.0, 200);
    assert_eq!(connections(&rec), 2, "an idle connection outlived pool_idle_timeout");
}

/// An upstream that answers one request per connection with keep-alive implied, then
/// closes the socket 100 ms later without saying so: what an upstream's own idle
/// timeout does (nginx's keepalive_timeout, Node's five seconds).
async fn closes_when_idle() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            count.fetch_add(1, SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = b"{\"ok\":true}";
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            });
        }
    });
    (port, accepted)
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_costs_no_request() {
    let (db, key) = seeded_db().await;
    let (port, accepted) = closes_when_idle().await;
    let gw = Gateway::start(&db, port, ONE_WORKER).await;
    let c = keep_alive_client();
    for i in 0..4 {
        let (status, body) = call(&c, &gw.url(&format!("/v1/chat/{i}")), &key).await;
        assert_eq!(status, 200, "{body:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(accepted.load(SeqCst), 4);
}
