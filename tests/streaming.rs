//! Request bodies stream through keygate to the upstream while the answer streams back,
//! over real sockets: nothing waits for a whole body, in either direction.
//!
//! The upstream here echoes each piece of the request body as it arrives. A proxy that
//! read the client's body whole before sending it on, or that stopped moving the upload
//! once the answer had started, would hang these tests rather than pass them slowly.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use common::net::*;
use common::*;

/// One worker, so every request goes through one upstream pool.
const ONE_WORKER: &str = "[server]\nworkers = 1\n";

/// An upstream whose answer is the request's own body, streamed back frame by frame as
/// it comes in (the head goes first, before any of the body has arrived).
struct Echo {
    port: u16,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    async fn start() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                count.fetch_add(1, SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        Ok::<_, Infallible>(http::Response::new(req.into_body()))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
        Echo {
            port,
            connections,
            task,
        }
    }
}

/// A gateway on a database of its own, in front of a fresh echo upstream.
async fn echo_gateway() -> (TestDb, String, Echo, Gateway) {
    let (db, key) = seeded_db().await;
    let echo = Echo::start().await;
    let gw = Gateway::start(&db, echo.port, ONE_WORKER).await;
    (db, key, echo, gw)
}

type Upload = StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

/// A request body fed piece by piece from the returned sender; it ends when the sender drops.
fn upload() -> (mpsc::Sender<Bytes>, Upload) {
    use futures_util::StreamExt;
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let pieces = futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|b| (Ok(Frame::data(b)), rx)) },
    );
    (tx, StreamBody::new(pieces.boxed()))
}

/// Opens one HTTP/1.1 connection to the gateway and sends `POST path` with `body`; returns
/// the answer's body once its head has arrived.
async fn post_streaming(gw: &Gateway, key: &str, path: &str, body: Upload) -> Incoming {
    let stream = TcpStream::connect(gw.addr()).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::post(path)
        .header("host", "keygate.test")
        .header("authorization", bearer(key))
        .body(body)
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .expect("the head came back before the body was sent")
        .expect("response");
    assert_eq!(resp.status(), 200);
    resp.into_body()
}

/// Reads data frames until `want` bytes have come, or fails after five seconds.
async fn read_exactly(body: &mut Incoming, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < want {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the echo came back while the upload was still open")
            .expect("the answer ended early")
            .expect("frame");
        if let Ok(data) = frame.into_data() {
            got.extend_from_slice(&data);
        }
    }
    got
}

#[tokio::test]
async fn each_piece_of_an_upload_is_echoed_before_the_next_is_sent() {
    let (_db, key, echo, gw) = echo_gateway().await;
    let (tx, body) = upload();
    let mut answer = post_streaming(&gw, &key, "/v1/echo", body).await;
    // Ping-pong: each piece goes only after the previous one came back through keygate,
    // so the upload and the answer are both open and moving the whole time.
    for i in 0..8 {
        let piece = format!("piece {i} of a body still being written;");
        tx.send(Bytes::from(piece.clone())).await.expect("upload open");
        assert_eq!(read_exactly(&mut answer, piece.len()).await, piece.as_bytes());
    }
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(5), answer.frame())
        .await
        .expect("the answer ended with the upload");
    assert!(end.is_none(), "nothing after the last piece: {end:?}");
    // The connection that carried both directions is clean, and serves the next request.
    let (tx, body) = upload();
    let mut answer = post_streaming(&gw, &key, "/v1/echo", body).await;
    tx.send(Bytes::from_static(b"again")).await.expect("upload open");
    assert_eq!(read_exactly(&mut answer, 5).await, b"again");
    drop(tx);
    assert_eq!(
        echo.connections.load(SeqCst),
        1,
        "the upstream connection was not reused"
    );
}

#[tokio::test]
async fn an_eight_mib_upload_streams_through_both_ways_intact() {
    let (_db, key, _echo, gw) = echo_gateway().await;
    let (tx, body) = upload();
    let mut answer = post_streaming(&gw, &key, "/v1/echo", body).await;
    const PIECES: usize = 128;
    const PIECE: usize = 64 * 1024;
    // Sent from a task of its own while this one reads: with both directions bounded by
    // socket buffers, a proxy that moved only one of them at a time would stall here.
    let writer = tokio::spawn(async move {
        let mut sent = Sha256::new();
        for i in 0..PIECES {
            let piece: Vec<u8> = (0..PIECE).map(|j| ((i * 31 + j * 7) % 251) as u8).collect();
            sent.update(&piece);
            tx.send(Bytes::from(piece)).await.expect("upload open");
        }
        sent.finalize()
    });
    let mut received = Sha256::new();
    let mut total = 0usize;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), answer.frame())
            .await
            .expect("the echo kept moving");
        let Some(frame) = frame else { break };
        if let Ok(data) = frame.expect("frame").into_data() {
            total += data.len();
            received.update(&data);
        }
    }
    let sent = writer.await.expect("writer");
    assert_eq!(total, PIECES * PIECE);
    assert_eq!(received.finalize(), sent, "the echo differs from the upload");
}
