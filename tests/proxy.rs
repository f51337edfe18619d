//! The proxy end to end: real keygate processes, the real demo upstream, real Postgres.

mod common;

use std::time::{Duration, Instant};

use common::net::*;
use common::*;
use http::Method;

async fn setup(extra: &str) -> (TestDb, String, Upstream, Gateway) {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    let gw = Gateway::start(&db, up.port, extra).await;
    (db, key, up, gw)
}

fn key_id(db: &TestDb, org: &str, name: &str) -> String {
    let list = db.ok(&["keys", "list", "--org", org, "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&list).expect("json");
    v.as_array()
        .expect("array")
        .iter()
        .find(|k| k["name"] == name)
        .and_then(|k| k["id"].as_str())
        .expect("key id")
        .to_string()
}

#[tokio::test]
async fn the_seed_curl_reaches_the_upstream() {
    let (_db, key, _up, gw) = setup("").await;
    let r = post(
        &gw.url("/chat"),
        &[("authorization", &bearer(&key))],
        r#"{"message": "Hello!"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["reply"], "echo: Hello!");
    assert_eq!(r.header("ratelimit-limit"), Some("60"));
    assert_eq!(r.header("x-ratelimit-limit"), Some("60"));
    assert_eq!(r.header("ratelimit-remaining"), Some("59"));
    assert!(r.header("ratelimit-reset").is_some() && r.header("x-ratelimit-reset").is_some());
    // X-API-Key works too.
    let r = post(&gw.url("/chat"), &[("x-api-key", &key)], r#"{"message": "Hi"}"#).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn bad_keys_get_401_with_their_codes() {
    let (db, key, _up, gw) = setup("").await;
    let body = r#"{"message": "x"}"#;
    let r = post(&gw.url("/chat"), &[], body).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (401, "missing_api_key"));
    let malformed = post(&gw.url("/chat"), &[("authorization", "Bearer pk_test_short")], body).await;
    assert_eq!(
        (malformed.status.as_u16(), malformed.error_code().as_str()),
        (401, "invalid_api_key")
    );
    let unknown_key = "pk_test_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let unknown = post(&gw.url("/chat"), &[("authorization", &bearer(unknown_key))], body).await;
    assert_eq!(
        (unknown.status.as_u16(), unknown.error_code().as_str()),
        (401, "invalid_api_key")
    );
    // Unknown and malformed are indistinguishable.
    assert_eq!(unknown.body, malformed.body);
    let wrong_scheme = post(&gw.url("/chat"), &[("authorization", &format!("Basic {key}"))], body).await;
    assert_eq!(wrong_scheme.body, malformed.body);
    for r in [&malformed, &unknown, &wrong_scheme] {
        assert!(
            !String::from_utf8_lossy(&r.body).contains("pk_test_"),
            "error echoes a key"
        );
    }

    let expiring = db.ok(&[
        "keys",
        "create",
        "--org",
        "default",
        "--name",
        "short",
        "--expires-in",
        "1s",
    ]);
    let revoked = db.ok(&["keys", "create", "--org", "default", "--name", "gone"]);
    db.ok(&["keys", "revoke", &key_id(&db, "default", "gone")]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = post(&gw.url("/chat"), &[("authorization", &bearer(&revoked))], body).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (401, "key_revoked"));
    let r = post(&gw.url("/chat"), &[("authorization", &bearer(&expiring))], body).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (401, "key_expired"));
}

#[tokio::test]
async fn disabled_organization_and_missing_scope_get_403() {
    let (db, _key, _up, gw) =
        setup("[[routes]]\nprefix = \"/v1/chat\"\nmethods = [\"POST\"]\nscopes = [\"chat\"]\n").await;
    db.ok(&["orgs", "create", "--name", "Acme", "--slug", "acme"]);
    let no_scope = db.ok(&["keys", "create", "--org", "acme", "--name", "plain"]);
    let chat = db.ok(&["keys", "create", "--org", "acme", "--name", "chat", "--scopes", "chat"]);
    let completion = r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}]}"#;
    let r = post(
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&no_scope))],
        completion,
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (403, "insufficient_scope")
    );
    let r = post(
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&chat))],
        completion,
    )
    .await;
    assert_eq!(r.status, 200);
    // Routes without a rule need no scope.
    let r = post(
        &gw.url("/chat"),
        &[("authorization", &bearer(&no_scope))],
        r#"{"message": "x"}"#,
    )
    .await;
    assert_eq!(r.status, 200);

    db.ok(&["orgs", "disable", "acme"]);
    let ok = eventually(Duration::from_secs(2), async || {
        post(
            &gw.url("/chat"),
            &[("authorization", &bearer(&chat))],
            r#"{"message": "x"}"#,
        )
        .await
        .status
            == 403
    })
    .await;
    assert!(ok, "disabled organization still served");
    let r = post(
        &gw.url("/chat"),
        &[("authorization", &bearer(&chat))],
        r#"{"message": "x"}"#,
    )
    .await;
    assert_eq!(r.error_code(), "organization_disabled");
}

#[tokio::test]
async fn the_61st_request_in_a_minute_gets_429() {
    let (_db, key, _up, gw) = setup("").await;
    let auth = bearer(&key);
    let mut statuses = Vec::new();
    for _ in 0..61 {
        statuses.push(get(&gw.url("/echo"), &[("authorization", &auth)]).await);
    }
    // A minute boundary in the middle lets the sliding window admit a little more;
    // the limit must still hold over any minute.
    let ok = statuses.iter().filter(|r| r.status == 200).count();
    let last = statuses.last().expect("61 replies");
    if ok == 60 {
        assert_eq!(last.status, 429);
        assert_eq!(last.error_code(), "rate_limit_exceeded");
        let retry: u64 = last
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .expect("seconds");
        assert!((1..=60).contains(&retry), "{retry}");
        assert_eq!(last.header("ratelimit-remaining"), Some("0"));
    } else {
        assert!(ok <= 61, "{ok} requests passed a 60/minute limit");
    }
}

#[tokio::test]
async fn a_custom_per_key_limit_holds_and_rejections_consume_nothing() {
    let (db, _key, _up, gw) = setup("").await;
    db.ok(&["orgs", "create", "--name", "Q", "--slug", "q", "--monthly-limit", "5"]);
    let slow = db.ok(&["keys", "create", "--org", "q", "--name", "slow", "--rate-limit", "3"]);
    let auth = bearer(&slow);
    let codes: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..6 {
            v.push(get(&gw.url("/echo"), &[("authorization", &auth)]).await.status.as_u16());
        }
        v
    };
    assert_eq!(&codes[..3], &[200, 200, 200]);
    assert!(codes[3..].iter().all(|c| *c == 429), "{codes:?}");
    // The three refused requests did not eat into the monthly quota of 5: a second key
    // of the organisation still has 2 requests left.
    let other = db.ok(&["keys", "create", "--org", "q", "--name", "other"]);
    let auth = bearer(&other);
    let a = get(&gw.url("/echo"), &[("authorization", &auth)]).await;
    let b = get(&gw.url("/echo"), &[("authorization", &auth)]).await;
    let c = get(&gw.url("/echo"), &[("authorization", &auth)]).await;
    assert_eq!(
        (a.status.as_u16(), b.status.as_u16(), c.status.as_u16()),
        (200, 200, 429)
    );
    assert_eq!(c.error_code(), "monthly_quota_exceeded");
    assert!(c.header("retry-after").is_some());
}

#[tokio::test]
async fn the_monthly_quota_holds_across_a_restart() {
    let (db, _key, up, mut gw) = setup("").await;
    db.ok(&["orgs", "create", "--name", "M", "--slug", "m", "--monthly-limit", "4"]);
    let key = db.ok(&["keys", "create", "--org", "m", "--name", "k"]);
    let auth = bearer(&key);
    for _ in 0..4 {
        assert_eq!(get(&gw.url("/echo"), &[("authorization", &auth)]).await.status, 200);
    }
    assert_eq!(get(&gw.url("/echo"), &[("authorization", &auth)]).await.status, 429);
    let status = gw.proc.terminate(Duration::from_secs(15)).expect("exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    let gw = Gateway::start(&db, up.port, "").await;
    let r = get(&gw.url("/echo"), &[("authorization", &auth)]).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (429, "monthly_quota_exceeded")
    );
}

#[tokio::test]
async fn two_gateways_on_one_database_enforce_one_limit() {
    let (db, _key, up, a) = setup("").await;
    let b = Gateway::start(&db, up.port, "").await;
    db.ok(&[
        "orgs",
        "create",
        "--name",
        "Shared",
        "--slug",
        "shared",
        "--monthly-limit",
        "10",
    ]);
    let key = db.ok(&["keys", "create", "--org", "shared", "--name", "k"]);
    let auth = bearer(&key);
    for gw in [&a, &b] {
        for _ in 0..5 {
            assert_eq!(get(&gw.url("/echo"), &[("authorization", &auth)]).await.status, 200);
        }
    }
    // Within one flush interval (1 s) each side has learnt the other's count.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for gw in [&a, &b] {
        let r = get(&gw.url("/echo"), &[("authorization", &auth)]).await;
        assert_eq!(r.status, 429, "a replica allowed past the shared quota");
    }
}

#[tokio::test]
async fn a_key_revoked_with_the_cli_is_refused_within_a_second() {
    let (db, key, _up, gw) = setup("").await;
    let auth = bearer(&key);
    assert_eq!(get(&gw.url("/echo"), &[("authorization", &auth)]).await.status, 200);
    db.ok(&["keys", "revoke", &key_id(&db, "default", "Default Test Key")]);
    let revoked_at = Instant::now();
    let refused = eventually(Duration::from_secs(1), async || {
        get(&gw.url("/echo"), &[("authorization", &auth)]).await.status == 401
    })
    .await;
    assert!(refused, "revocation not applied within 1 s (cache TTL is 60 s)");
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn a_burst_with_one_unknown_key_makes_at_most_one_query() {
    // A long negative TTL: on a loaded box the burst can outlast the 5 s default, and a
    // second lookup after the answer expired would be correct, not a broken single-flight.
    let (_db, _key, _up, gw) = setup("[auth]\nnegative_cache_ttl = \"10m\"\n").await;
    let before = gw.ready_json().await["cache"]["lookups"]
        .as_u64()
        .expect("lookups counter");
    let unknown = bearer("pk_live_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA");
    let url = gw.url("/echo");
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (url, unknown) = (url.clone(), unknown.clone());
            tokio::spawn(async move { get(&url, &[("authorization", &unknown)]).await.status.as_u16() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task"), 401);
    }
    let after = gw.ready_json().await["cache"]["lookups"]
        .as_u64()
        .expect("lookups counter");
    assert!(
        after - before <= 1,
        "{} lookups for one unknown key; the gateway's log:\n{}",
        after - before,
        gw.logs()
    );
}

#[tokio::test]
async fn sse_events_arrive_incrementally() {
    let (db, key, _up0, _gw0) = setup("").await;
    let up = Upstream::start(&["--stream-interval", "150ms"]).await;
    let gw = Gateway::start(&db, up.port, "").await;
    let req = http::Request::post(gw.url("/v1/chat/completions"))
        .header("authorization", bearer(&key))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            r#"{"model": "m", "stream": true, "max_tokens": 8, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hi"}]}"#,
        )))
        .expect("request");
    let start = Instant::now();
    let resp = client().request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert!(
        resp.headers().contains_key("ratelimit-remaining"),
        "rate headers missing on a stream"
    );
    let mut body = resp.into_body();
    let mut first = None;
    let mut text = String::new();
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("frame").into_data() {
            first.get_or_insert_with(|| start.elapsed());
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    let total = start.elapsed();
    let first = first.expect("some data");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        total >= Duration::from_millis(1000),
        "stream too fast to judge: {total:?}"
    );
    assert!(
        first < total / 3,
        "first event at {first:?} of {total:?}: the stream was buffered"
    );
}

#[tokio::test]
async fn spoofed_identity_headers_and_the_key_never_reach_the_upstream() {
    let (db, key, _up, gw) = setup("[upstream.headers]\nauthorization = \"Bearer upstream-secret\"\n").await;
    let r = send(
        Method::POST,
        &gw.url("/echo/x?y=1"),
        &[
            ("authorization", &bearer(&key)),
            ("x-api-key", "pk_test_spoofed"),
            ("x-keygate-key-id", "spoofed"),
            ("X-Keygate-Plan", "enterprise"),
            ("x_keygate_organization_id", "spoofed"),
            ("connection", "x-drop-me"),
            ("x-drop-me", "1"),
            ("x-forwarded-for", "6.6.6.6"),
        ],
        "body",
    )
    .await;
    assert_eq!(r.status, 200);
    let echo = r.json();
    let h = &echo["headers"];
    let text = echo.to_string();
    assert!(!text.contains(&key) && !text.contains("spoofed"), "{text}");
    assert_eq!(h["authorization"], "Bearer upstream-secret");
    assert!(
        h.get("x-api-key").is_none() && h.get("x-drop-me").is_none() && h.get("x_keygate_organization_id").is_none()
    );
    assert_eq!(h["x-keygate-key-id"], key_id(&db, "default", "Default Test Key"));
    assert_eq!(h["x-keygate-plan"], "free");
    assert_eq!(h["x-keygate-scopes"], "chat");
    assert_eq!(h["x-forwarded-for"], "6.6.6.6, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(echo["path"], "/echo/x");
    assert_eq!(echo["query"], "y=1");
    assert_eq!(echo["body_len"], 4);
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_is_504() {
    let (db, key) = seeded_db().await;
    let dead = Gateway::start(&db, free_port(), "").await;
    let r = get(&dead.url("/echo"), &[("authorization", &bearer(&key))]).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (502, "upstream_unavailable")
    );
    assert!(r.header("ratelimit-limit").is_some());
    let up = Upstream::start(&[]).await;
    let gw = Gateway::start(&db, up.port, "response_timeout = \"300ms\"\n").await;
    let r = get(&gw.url("/slow?ms=2000"), &[("authorization", &bearer(&key))]).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (504, "upstream_timeout"));
    let r = get(&gw.url("/slow?ms=10"), &[("authorization", &bearer(&key))]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn oversized_requests_are_refused() {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    let gw = Gateway::start_raw(&db, |port, admin| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nmax_body_bytes = \"1KiB\"\nmax_header_bytes = \"4KiB\"\n\
             [upstream]\nurl = \"http://127.0.0.1:{}\"\n",
            up.port
        )
    })
    .await;
    let auth = bearer(&key);
    let big = "x".repeat(4096);
    let r = post(&gw.url("/echo"), &[("authorization", &auth)], &big).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (413, "payload_too_large"));
    let r = get(
        &gw.url("/echo"),
        &[("authorization", &auth), ("x-big", &"h".repeat(5000))],
    )
    .await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (431, "headers_too_large"));
    // The request line counts toward the head: a long path or query is refused too.
    for target in [
        format!("/echo/{}", "p".repeat(5000)),
        format!("/echo?q={}", "q".repeat(5000)),
    ] {
        let r = get(&gw.url(&target), &[("authorization", &auth)]).await;
        assert_eq!((r.status.as_u16(), r.error_code().as_str()), (431, "headers_too_large"));
    }
    // A chunked body (no Content-Length) is cut off while streaming.
    let chunks = futures_util::stream::iter(
        (0..8).map(|_| Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from(vec![b'y'; 512])))),
    );
    let req = http::Request::post(gw.url("/echo"))
        .header("authorization", &auth)
        .body(http_body_util::StreamBody::new(chunks))
        .expect("request");
    let c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let resp = c.request(req).await.expect("response");
    assert_eq!(resp.status(), 413);
    // Within limits is fine.
    let r = post(&gw.url("/echo"), &[("authorization", &auth)], &"x".repeat(1000)).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn sigterm_during_a_stream_lets_it_finish_and_exits_0() {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&["--stream-interval", "100ms"]).await;
    let mut gw = Gateway::start(&db, up.port, "").await;
    let req = http::Request::post(gw.url("/v1/chat/completions"))
        .header("authorization", bearer(&key))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            r#"{"model": "m", "stream": true, "max_tokens": 15, "messages": [{"role": "user", "content": "hi"}]}"#,
        )))
        .expect("request");
    let resp = client().request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let reader = tokio::spawn(async move {
        use http_body_util::BodyExt;
        resp.into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = tokio::task::spawn_blocking(move || {
        let s = gw.proc.terminate(Duration::from_secs(20));
        (s, gw)
    });
    // New connections are refused while the stream drains.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = reader.await.expect("join").expect("stream completed");
    assert!(text.ends_with("data: [DONE]\n\n"), "stream cut short: {text}");
    let (status, _gw) = status.await.expect("join");
    let status = status.expect("keygate exited");
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn the_header_read_timeout_really_fires() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    let gw = Gateway::start_raw(&db, |port, admin| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nheader_read_timeout = \"1s\"\n\
             [upstream]\nurl = \"http://127.0.0.1:{}\"\n",
            up.port
        )
    })
    .await;
    // A slowloris client: half a request head, then silence.
    let mut slow = tokio::net::TcpStream::connect(gw.addr()).await.expect("connect");
    slow.write_all(b"GET /echo HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .expect("write");
    let started = Instant::now();
    // A legitimate client is served meanwhile.
    assert_eq!(
        get(&gw.url("/echo"), &[("authorization", &bearer(&key))]).await.status,
        200
    );
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .expect("closed within the timeout");
    let elapsed = started.elapsed();
    // hyper answers 408 or just closes; either way the connection ends.
    match read {
        Ok(0) | Err(_) => {}
        Ok(n) => assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn cleartext_http2_works_when_switched_on() {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    let gw = Gateway::start_raw(&db, |port, admin| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nhttp2 = true\n\
             [upstream]\nurl = \"http://127.0.0.1:{}/echo\"\n",
            up.port
        )
    })
    .await;
    let h2 = h2_client();
    let req = http::Request::get(gw.url("/sub/path?q=1"))
        .header("authorization", bearer(&key))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let resp = h2.request(req).await.expect("h2 response");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let echo: serde_json::Value = serde_json::from_slice(&body).expect("json");
    // The upstream URL's base path is kept in front of the client's path.
    assert_eq!(echo["path"], "/echo/sub/path");
    assert_eq!(echo["query"], "q=1");
    // Health answers on the main listener too, without a key.
    assert_eq!(get(&gw.url("/healthz"), &[]).await.status, 200);
}

/// Names of the gateway's threads, from /proc.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|n| n.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Both `server.runtime` settings proxy concurrent connections and streams, and on
/// SIGTERM drain, flush every usage row and exit 0. Per-core really runs its workers.
#[tokio::test]
async fn both_runtimes_serve_concurrent_connections_and_drain() {
    for (runtime, workers) in [("per-core", 3), ("shared", 0)] {
        let (db, key) = seeded_db().await;
        let up = Upstream::start(&["--stream-interval", "50ms"]).await;
        let extra =
            format!("[server]\nruntime = \"{runtime}\"\nworkers = {workers}\n[usage]\nflush_interval = \"100ms\"\n");
        let mut gw = Gateway::start(&db, up.port, &extra).await;
        let names = thread_names(gw.proc.child.id());
        let worker_threads = names.iter().filter(|n| n.starts_with("keygate-worker")).count();
        assert_eq!(worker_threads, workers, "{runtime}: threads {names:?}");
        // Twelve at once: a fresh client each, so twelve client connections, spread over
        // the workers by how many each holds open.
        let calls = (0..12).map(|i| {
            let (url, auth) = (gw.url("/chat"), bearer(&key));
            tokio::spawn(async move {
                let req = http::Request::post(url)
                    .header("authorization", auth)
                    .body(http_body_util::Full::new(bytes::Bytes::from(format!(
                        r#"{{"message": "n{i}"}}"#
                    ))))
                    .expect("request");
                let resp = client().request(req).await.expect("response");
                let status = resp.status();
                let body = http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .expect("body")
                    .to_bytes();
                (status, body)
            })
        });
        for (i, call) in calls.enumerate() {
            let (status, body) = call.await.expect("join");
            assert_eq!(status, 200, "{runtime}");
            assert!(
                String::from_utf8_lossy(&body).contains(&format!("echo: n{i}")),
                "{runtime}"
            );
        }
        // A stream in flight when SIGTERM arrives still finishes.
        let req = http::Request::post(gw.url("/v1/chat/completions"))
            .header("authorization", bearer(&key))
            .body(http_body_util::Full::new(bytes::Bytes::from(
                r#"{"model": "m", "stream": true, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}"#,
            )))
            .expect("request");
        let resp = client().request(req).await.expect("response");
        assert_eq!(resp.status(), 200, "{runtime}");
        let reader = tokio::spawn(async move { http_body_util::BodyExt::collect(resp.into_body()).await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        let exited = tokio::task::spawn_blocking(move || gw.proc.terminate(Duration::from_secs(20)));
        let text = reader.await.expect("join").expect("stream completed").to_bytes();
        assert!(
            String::from_utf8_lossy(&text).ends_with("data: [DONE]\n\n"),
            "{runtime}: stream cut short"
        );
        let status = exited.await.expect("join").expect("keygate exited");
        assert!(status.success(), "{runtime}: exit status {status:?}");
        // Every response has its row, written before the exit.
        let rows: i64 = db
            .client()
            .await
            .query_one("SELECT count(*) FROM api_key_usage", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(rows, 13, "{runtime}");
        // And the last fold ran after the last batch: `api_keys` holds every count and
        // nothing waits in `keygate_key_counters`.
        let (total, pending): (i64, i64) = {
            let r = db
                .client()
                .await
                .query_one(
                    "SELECT (SELECT total_requests FROM api_keys), \
                            (SELECT coalesce(sum(pending_requests), 0)::int8 FROM keygate_key_counters)",
                    &[],
                )
                .await
                .expect("counters");
            (r.get(0), r.get(1))
        };
        assert_eq!((total, pending), (13, 0), "{runtime}");
    }
}
