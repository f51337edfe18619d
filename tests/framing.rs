//! Hostile framing and headers on raw sockets: a request-smuggling matrix, identity and
//! hop-by-hop spoofing in both directions (Connection-listed names, trailers, odd
//! spellings), an upstream that answers garbage, the h2 preface while HTTP/2 is off,
//! `CONNECT`, and `Expect: 100-continue`.

mod common;

use std::time::Duration;

use common::net::*;
use common::recorder::*;
use common::*;

const QUIET: Duration = Duration::from_millis(700);

async fn gateway_on_recorder(extra: &str) -> (TestDb, String, Recorder, Gateway) {
    let (db, key) = seeded_db().await;
    let rec = Recorder::start().await;
    let gw = Gateway::start(&db, rec.port, extra).await;
    (db, key, rec, gw)
}

/// Each case: an outer request carrying a valid key, then (in its body or after it) a
/// request to /smuggled without one. Whatever keygate makes of the bytes, the upstream
/// must never see /smuggled: that would be a request that skipped authentication.
fn matrix(key: &str) -> Vec<(&'static str, String)> {
    let auth = format!("Authorization: Bearer {key}");
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let head = |extra: &str| format!("POST /outer HTTP/1.1\r\nHost: x\r\n{auth}\r\n{extra}\r\n");
    vec![
        (
            "CL.TE",
            format!(
                "{}0\r\n\r\n{smuggled}",
                head("Content-Length: 6\r\nTransfer-Encoding: chunked\r\n")
            ),
        ),
        (
            "TE.CL",
            format!(
                "{}{:x}\r\n{smuggled}\r\n0\r\n\r\n",
                head("Transfer-Encoding: chunked\r\nContent-Length: 4\r\n"),
                smuggled.len()
            ),
        ),
        (
            "CL.CL differing",
            format!("{}hello{smuggled}", head("Content-Length: 5\r\nContent-Length: 41\r\n")),
        ),
        (
            "TE obfuscated (xchunked)",
            format!(
                "{}0\r\n\r\n{smuggled}",
                head("Transfer-Encoding: xchunked\r\nContent-Length: 5\r\n")
            ),
        ),
        (
            "TE with space before colon",
            format!(
                "{}0\r\n\r\n{smuggled}",
                head("Transfer-Encoding : chunked\r\nContent-Length: 5\r\n")
            ),
        ),
        (
            "TE chunked, identity",
            format!(
                "{}0\r\n\r\n{smuggled}",
                head("Transfer-Encoding: chunked, identity\r\n")
            ),
        ),
        (
            "TE identity, chunked twice",
            format!(
                "{}0\r\n\r\n{smuggled}",
                head("Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n")
            ),
        ),
        (
            "negative chunk size",
            format!(
                "{}-1\r\n{smuggled}\r\n0\r\n\r\n",
                head("Transfer-Encoding: chunked\r\n")
            ),
        ),
        (
            "overflowing chunk size",
            format!(
                "{}fffffffffffffffff1\r\nab\r\n0\r\n\r\n{smuggled}",
                head("Transfer-Encoding: chunked\r\n")
            ),
        ),
        (
            "0x chunk size",
            format!(
                "{}0x3\r\nabc\r\n0\r\n\r\n{smuggled}",
                head("Transfer-Encoding: chunked\r\n")
            ),
        ),
        (
            "chunk longer than its size",
            format!(
                "{}3\r\nabcdef\r\n0\r\n\r\n{smuggled}",
                head("Transfer-Encoding: chunked\r\n")
            ),
        ),
        (
            "chunk extension with bare LF",
            format!(
                "{}3;x\nabc\r\n0\r\n\r\n{smuggled}",
                head("Transfer-Encoding: chunked\r\n")
            ),
        ),
        (
            "obs-fold header",
            format!(
                "{}0\r\n\r\n{smuggled}",
                head("X-Folded: a\r\n b\r\nTransfer-Encoding: chunked\r\n")
            ),
        ),
        (
            "obs-fold Transfer-Encoding",
            format!(
                "{}0\r\n\r\n{smuggled}",
                head("Transfer-Encoding: identity\r\n chunked\r\nContent-Length: 3\r\n")
            ),
        ),
        (
            "bare LF line endings",
            format!("POST /outer HTTP/1.1\nHost: x\n{auth}\nContent-Length: 0\n\n{smuggled}"),
        ),
        (
            "bare CR in a header",
            format!("{}{smuggled}", head("X-Evil: a\rContent-Length: 0\r\n")),
        ),
        (
            "NUL in a header",
            format!("{}{smuggled}", head("X-Evil: a\0b\r\nContent-Length: 0\r\n")),
        ),
        (
            "Content-Length with sign",
            format!("{}{smuggled}", head("Content-Length: +0\r\n")),
        ),
        (
            "HTTP/1.0 with TE",
            format!(
                "POST /outer HTTP/1.0\r\nHost: x\r\n{auth}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
    ]
}

#[tokio::test]
async fn smuggled_requests_never_reach_the_upstream() {
    let (_db, key, rec, gw) = gateway_on_recorder("").await;
    let mut table = Vec::new();
    for (name, bytes) in matrix(&key) {
        let raw = raw_exchange(gw.port, bytes.as_bytes(), QUIET).await;
        let codes = statuses(&raw);
        assert!(
            !codes.is_empty() || raw.is_empty(),
            "{name}: not HTTP: {:?}",
            String::from_utf8_lossy(&raw)
        );
        assert!(
            codes
                .iter()
                .all(|c| matches!(c, 200 | 400 | 401 | 408 | 411 | 413 | 501)),
            "{name}: unexpected statuses {codes:?}"
        );
        table.push(format!("{name}: {codes:?}"));
    }
    // Nothing reached the upstream except /outer, and each /outer came with keygate's own
    // framing: never both Content-Length and Transfer-Encoding.
    let seen = rec.log.seen();
    for s in &seen {
        assert_eq!(s.path, "/outer", "the upstream saw {} ({table:?})", s.path);
        assert!(
            !(s.headers.contains_key("content-length") && s.headers.contains_key("transfer-encoding")),
            "conflicting framing reached the upstream: {:?}",
            s.headers
        );
        assert!(
            !String::from_utf8_lossy(&s.body).contains("Bearer"),
            "a key travelled in a body"
        );
    }
    println!(
        "smuggling matrix ({} upstream requests):\n  {}",
        seen.len(),
        table.join("\n  ")
    );
    // keygate is still healthy after all that.
    assert_eq!(
        get(&gw.url("/after"), &[("authorization", &bearer(&key))]).await.status,
        200
    );
}

#[tokio::test]
async fn identity_and_hop_by_hop_headers_are_stripped_both_ways() {
    let (db, key, rec, gw) = gateway_on_recorder("").await;
    let org_id = db.ok(&["orgs", "list", "--format", "json"]);
    let orgs: serde_json::Value = serde_json::from_str(&org_id).expect("json");
    let org_id = orgs[0]["id"].as_str().expect("org id").to_string();
    // Raw bytes, because a well-behaved client library would not send half of this.
    let req = format!(
        "POST /in HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Connection: keep-alive, X-Keygate-Organization-Id, x-hop-listed\r\n\
         X-Keygate-Organization-Id: evil-listed\r\nx-hop-listed: 1\r\n\
         X_Keygate_Key_Id: evil-underscore\r\nX-KEYGATE-PLAN: enterprise\r\nx-keygate-plan: enterprise\r\n\
         x-keygate-scopes: admin\r\nKeep-Alive: timeout=99\r\nProxy-Authorization: Basic eDp5\r\n\
         TE: trailers\r\nTrailer: x-keygate-key-id\r\nTransfer-Encoding: chunked\r\n\r\n\
         4\r\nbody\r\n0\r\nx-keygate-key-id: evil-trailer\r\nauthorization: Bearer {key}\r\n\r\n"
    );
    let raw = raw_exchange(gw.port, req.as_bytes(), QUIET).await;
    assert_eq!(statuses(&raw), vec![200], "{}", String::from_utf8_lossy(&raw));
    let seen = rec.log.seen();
    let s = seen.iter().find(|s| s.path == "/in").expect("forwarded");
    let one = |name: &str| -> Vec<String> {
        s.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("?").to_string())
            .collect()
    };
    assert_eq!(one("x-keygate-organization-id"), vec![org_id]);
    assert_eq!(one("x-keygate-key-id").len(), 1);
    assert_ne!(one("x-keygate-key-id")[0], "evil-underscore");
    assert_eq!(one("x-keygate-plan"), vec!["free".to_string()]);
    assert_eq!(one("x-keygate-scopes"), vec!["chat".to_string()]);
    for gone in [
        "x_keygate_key_id",
        "x-hop-listed",
        "keep-alive",
        "proxy-authorization",
        "te",
        "trailer",
        "authorization",
    ] {
        assert!(
            !s.headers.contains_key(gone),
            "{gone} reached the upstream: {:?}",
            s.headers
        );
    }
    assert_eq!(&s.body[..], b"body");
    assert!(
        s.trailers.is_none(),
        "request trailers reached the upstream: {:?}",
        s.trailers
    );
    let text = format!("{:?}", s.headers);
    assert!(!text.contains("evil") && !text.contains(&key), "{text}");

    // The other direction: the upstream's hop-by-hop headers stop at keygate.
    let r = get(&gw.url("/hop"), &[("authorization", &bearer(&key))]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-fine"), Some("kept"));
    for gone in ["x-internal-secret", "keep-alive", "proxy-authenticate"] {
        assert!(r.header(gone).is_none(), "{gone} reached the client: {:?}", r.headers);
    }
}

#[tokio::test]
async fn a_malformed_upstream_answer_is_502_and_its_connection_is_not_reused() {
    let (db, key) = seeded_db().await;
    let bad = Malformed::start(b"HTTP/1.1 2OO NOT OK\r\nX-Upstream-Secret: s3cr3t\r\n\r\n").await;
    let gw = Gateway::start(&db, bad.port, "").await;
    let auth = bearer(&key);
    let first = get(&gw.url("/a"), &[("authorization", &auth)]).await;
    assert_eq!(
        (first.status.as_u16(), first.error_code().as_str()),
        (502, "upstream_unavailable")
    );
    let text = String::from_utf8_lossy(&first.body);
    assert!(
        !text.contains("s3cr3t") && !text.contains("2OO"),
        "upstream text leaked: {text}"
    );
    let second = get(&gw.url("/b"), &[("authorization", &auth)]).await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(
        bad.connections.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the broken connection was reused, or more were opened than needed"
    );
}

/// With `server.http2` off (the default), the HTTP/2 connection preface is refused: the
/// connection closes with nothing or an error status, a prior-knowledge h2 client gets
/// an error, not a response, and nothing reaches the upstream.
#[tokio::test]
async fn the_h2_preface_is_refused_when_http2_is_off() {
    let (_db, key, rec, gw) = gateway_on_recorder("").await;
    // The preface, an empty SETTINGS frame, then an HTTP/1.1 request that must not be
    // read as a second request on the same connection.
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00".to_vec();
    bytes.extend_from_slice(
        format!("GET /after-preface HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n").as_bytes(),
    );
    let raw = raw_exchange(gw.port, &bytes, QUIET).await;
    let codes = statuses(&raw);
    assert!(
        codes.iter().all(|c| (400..600).contains(c) && *c != 500),
        "the preface was answered with {codes:?}: {:?}",
        String::from_utf8_lossy(&raw)
    );
    assert!(
        codes.len() <= 1,
        "more than one answer on a refused connection: {codes:?}"
    );

    let h2 = h2_client();
    let req = http::Request::get(gw.url("/over-h2"))
        .header("authorization", bearer(&key))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let res = tokio::time::timeout(Duration::from_secs(5), h2.request(req))
        .await
        .expect("h2 client hung");
    assert!(
        res.is_err(),
        "an h2 request was answered with http2 off: {:?}",
        res.map(|r| r.status())
    );

    assert!(rec.log.paths().is_empty(), "the upstream saw {:?}", rec.log.paths());
    assert_eq!(
        get(&gw.url("/after"), &[("authorization", &bearer(&key))]).await.status,
        200
    );
}

/// A reverse proxy opens no tunnels: `CONNECT` with a valid key is refused before it
/// reaches the upstream, the bytes after it are never relayed anywhere, and an
/// `Upgrade` reaches the upstream as a plain request.
#[tokio::test]
async fn connect_and_upgrades_are_never_relayed() {
    let (_db, key, rec, gw) = gateway_on_recorder("").await;
    for target in ["127.0.0.1:22", &format!("127.0.0.1:{}", rec.port)] {
        let req = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {key}\r\n\r\n\
             GET /through-the-tunnel HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        let raw = raw_exchange(gw.port, req.as_bytes(), QUIET).await;
        let text = String::from_utf8_lossy(&raw);
        assert_eq!(statuses(&raw).first(), Some(&501), "{text}");
        assert!(text.contains("method_not_supported"), "{text}");
    }
    assert!(rec.log.paths().is_empty(), "the upstream saw {:?}", rec.log.paths());

    // An upgrade is not relayed: the upstream sees a plain request without it.
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let raw = raw_exchange(gw.port, req.as_bytes(), QUIET).await;
    assert_eq!(statuses(&raw), [200], "{}", String::from_utf8_lossy(&raw));
    let seen = rec.log.seen();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].headers.get("upgrade").is_none() && seen[0].headers.get("connection").is_none());
}

/// `Expect: 100-continue`, as curl sends it before a large body: a refused request gets
/// its final status without being invited to send the body; an admitted one gets
/// `100 Continue`, then its answer, and the body reaches the upstream whole, without
/// the expectation (keygate answered it; Envoy's default does the same).
#[tokio::test]
async fn expect_100_continue_is_answered_only_for_an_admitted_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_db, key, rec, gw) = gateway_on_recorder("").await;
    let head = |key: &str| {
        format!(
            "POST /expect HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Expect: 100-continue\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\n"
        )
    };
    let unknown = "pk_live_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA";
    let refused = raw_exchange(gw.port, head(unknown).as_bytes(), QUIET).await;
    assert_eq!(statuses(&refused), vec![401], "{:?}", String::from_utf8_lossy(&refused));

    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    sock.write_all(head(&key).as_bytes()).await.expect("write head");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
            .await
            .expect("no interim answer to the expectation")
            .expect("read");
        assert!(n > 0, "closed before answering: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 100 Continue\r\n"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    sock.write_all(b"hello world").await.expect("write body");
    loop {
        match tokio::time::timeout(QUIET, sock.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    assert_eq!(statuses(&got), vec![100, 200], "{:?}", String::from_utf8_lossy(&got));
    let seen = rec.log.seen();
    assert_eq!(seen.len(), 1, "the upstream saw {:?}", rec.log.paths());
    assert_eq!(&seen[0].body[..], b"hello world");
    assert!(
        !seen[0].headers.contains_key("expect"),
        "the expectation was passed on: {:?}",
        seen[0].headers
    );
}
