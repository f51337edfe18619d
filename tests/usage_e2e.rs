//! Usage metering end to end: real keygate, real upstream, real PostgreSQL (a private
//! cluster where a test stops and restarts it).

mod common;

use std::time::{Duration, Instant};

use common::net::*;
use common::recorder::*;
use common::*;

fn usage_toml(spool: &std::path::Path, extra: &str) -> String {
    format!(
        "[usage]\nflush_interval = \"100ms\"\nspool_dir = \"{}\"\n{extra}\n\
         [pricing.default]\nprompt_per_1k = 0.001\ncompletion_per_1k = 0.002\n\
         [pricing.models.\"gpt-4o\"]\nprompt_per_1k = 0.0025\ncompletion_per_1k = 0.01\n",
        spool.display()
    )
}

async fn rows(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one("SELECT count(*) FROM api_key_usage", &[])
        .await
        .expect("count")
        .get(0)
}

async fn wait_rows(db: &TestDb, n: i64, within: Duration) -> i64 {
    let start = Instant::now();
    loop {
        let have = rows(db).await;
        if have >= n || start.elapsed() > within {
            return have;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn n_requests_make_exactly_n_rows_with_the_right_fields() {
    let (db, _seed_key) = seeded_db().await;
    let spool = tempfile::tempdir().expect("tmp");
    let up = Upstream::start(&[]).await;
    let gw = Gateway::start(
        &db,
        up.port,
        &format!(
            "[[routes]]\nprefix = \"/admin\"\nscopes = [\"admin\"]\n{}",
            usage_toml(spool.path(), "")
        ),
    )
    .await;
    db.ok(&["orgs", "create", "--name", "U", "--slug", "u"]);
    let key = db.ok(&["keys", "create", "--org", "u", "--name", "k", "--rate-limit", "5"]);
    let auth = bearer(&key);
    let mut statuses = Vec::new();
    for _ in 0..7 {
        let r = get(
            &gw.url("/echo/a?secret=1"),
            &[("authorization", &auth), ("user-agent", "probe/1.0")],
        )
        .await;
        statuses.push(r.status.as_u16());
    }
    let forbidden = get(&gw.url("/admin/x"), &[("authorization", &auth)]).await;
    assert_eq!(forbidden.status, 403);
    // Requests with no identifiable key leave no row.
    get(
        &gw.url("/echo"),
        &[(
            "authorization",
            "Bearer pk_test_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        )],
    )
    .await;
    get(&gw.url("/echo"), &[]).await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 5, "{statuses:?}");

    assert_eq!(wait_rows(&db, 8, Duration::from_secs(10)).await, 8);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rows(&db).await, 8, "extra rows appeared");
    let c = db.client().await;
    let all = c
        .query(
            "SELECT id, endpoint, method, status_code, response_time_ms, ip_address, user_agent, error_code, error_message
             FROM api_key_usage ORDER BY \"timestamp\"",
            &[],
        )
        .await
        .expect("rows");
    let mut ids = std::collections::HashSet::new();
    for r in &all {
        let id: uuid::Uuid = r.get(0);
        assert_eq!(id.get_version_num(), 7, "ids are UUID v7");
        assert!(ids.insert(id));
        let endpoint: String = r.get(1);
        assert!(endpoint == "/echo/a" || endpoint == "/admin/x", "{endpoint}");
        assert_eq!(r.get::<_, String>(2), "GET");
        assert!(r.get::<_, i32>(4) >= 0);
        assert_eq!(r.get::<_, Option<String>>(5).as_deref(), Some("127.0.0.1"));
        let status: i32 = r.get(3);
        let code: Option<String> = r.get(7);
        match status {
            200 => assert_eq!(code, None),
            429 => assert_eq!(code.as_deref(), Some("rate_limit_exceeded")),
            403 => assert_eq!(code.as_deref(), Some("insufficient_scope")),
            other => panic!("unexpected status {other}"),
        }
        if endpoint == "/echo/a" {
            assert_eq!(r.get::<_, Option<String>>(6).as_deref(), Some("probe/1.0"));
        }
        if status != 200 {
            assert!(r.get::<_, Option<String>>(8).is_some_and(|m| !m.contains("pk_")));
        }
    }
    fold_counters(&c).await;
    let (total, last_used): (i64, Option<chrono::DateTime<chrono::Utc>>) = {
        let r = c
            .query_one(
                "SELECT total_requests, last_used_at FROM api_keys WHERE name = 'k'",
                &[],
            )
            .await
            .expect("key");
        (r.get(0), r.get(1))
    };
    assert_eq!(total, 8);
    let last_used = last_used.expect("last_used_at set");
    assert!((chrono::Utc::now() - last_used) < chrono::Duration::seconds(30));
}

fn expected_cost(prompt: i64, completion: i64, p_per_1k: f64, c_per_1k: f64) -> i64 {
    (prompt as f64 * p_per_1k * 1000.0 + completion as f64 * c_per_1k * 1000.0).round() as i64
}

#[tokio::test]
async fn tokens_and_cost_for_json_sse_and_header() {
    let (db, key) = seeded_db().await;
    let spool = tempfile::tempdir().expect("tmp");
    let up = Upstream::start(&["--stream-interval", "5ms"]).await;
    let gw = Gateway::start(&db, up.port, &usage_toml(spool.path(), "")).await;
    let auth = bearer(&key);

    let json = post(
        &gw.url("/v1/chat/completions"),
        &[("authorization", &auth)],
        r#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "one two three four"}]}"#,
    )
    .await;
    let usage = json.json()["usage"].clone();
    let (jp, jc) = (
        usage["prompt_tokens"].as_i64().expect("p"),
        usage["completion_tokens"].as_i64().expect("c"),
    );

    let sse = post(
        &gw.url("/v1/chat/completions?stream=1"),
        &[("authorization", &auth)],
        r#"{"model": "other-model", "stream": true, "max_tokens": 30, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "hi there"}]}"#,
    )
    .await;
    let text = String::from_utf8_lossy(&sse.body).into_owned();
    let usage_event = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .find(|v| v.get("usage").is_some_and(|u| !u.is_null()))
        .expect("usage event");
    let (sp, sc) = (
        usage_event["usage"]["prompt_tokens"].as_i64().expect("p"),
        usage_event["usage"]["completion_tokens"].as_i64().expect("c"),
    );
    assert_eq!(sc, 30);

    let header_only = post(
        &gw.url("/chat"),
        &[("authorization", &auth)],
        r#"{"message": "a b c d e", "usage_in_body": false}"#,
    )
    .await;
    assert!(header_only.json().get("usage").is_none());
    let header_total: i64 = header_only
        .header("x-usage-tokens")
        .expect("header")
        .parse()
        .expect("n");

    assert_eq!(wait_rows(&db, 3, Duration::from_secs(10)).await, 3);
    let c = db.client().await;
    let row = |endpoint: &'static str| {
        let c = &c;
        async move {
            c.query_one(
                "SELECT prompt_tokens, completion_tokens, tokens_used, (cost_usd * 1000000)::bigint, model
                 FROM api_key_usage WHERE endpoint = $1",
                &[&endpoint],
            )
            .await
            .expect("row")
        }
    };
    let rows_cc = c
        .query(
            "SELECT prompt_tokens, completion_tokens, tokens_used, (cost_usd * 1000000)::bigint, model
             FROM api_key_usage WHERE endpoint = '/v1/chat/completions' ORDER BY \"timestamp\"",
            &[],
        )
        .await
        .expect("rows");
    assert_eq!(rows_cc.len(), 2);
    let (j, s) = (&rows_cc[0], &rows_cc[1]);
    assert_eq!(j.get::<_, Option<i32>>(0), Some(jp as i32));
    assert_eq!(j.get::<_, Option<i32>>(1), Some(jc as i32));
    assert_eq!(j.get::<_, Option<i32>>(2), Some((jp + jc) as i32));
    assert_eq!(j.get::<_, Option<i64>>(3), Some(expected_cost(jp, jc, 0.0025, 0.01)));
    assert_eq!(j.get::<_, Option<String>>(4).as_deref(), Some("gpt-4o"));
    assert_eq!(s.get::<_, Option<i32>>(0), Some(sp as i32));
    assert_eq!(s.get::<_, Option<i32>>(1), Some(sc as i32));
    assert_eq!(s.get::<_, Option<i64>>(3), Some(expected_cost(sp, sc, 0.001, 0.002)));
    assert_eq!(s.get::<_, Option<String>>(4).as_deref(), Some("other-model"));
    let h = row("/chat").await;
    assert_eq!(h.get::<_, Option<i32>>(2), Some(header_total as i32));
    assert_eq!(
        h.get::<_, Option<i64>>(3),
        Some(expected_cost(header_total, 0, 0.001, 0.002))
    );
}

/// A client that asks for gzip (the OpenAI SDKs' HTTP client does) still gets a metered
/// row: the upstream is asked for plain bodies. A body that arrives encoded anyway is
/// passed on byte for byte and not read, so its row has no tokens rather than wrong ones.
#[tokio::test]
async fn compression_asked_for_by_the_client_does_not_cost_the_tokens() {
    let (db, key) = seeded_db().await;
    let spool = tempfile::tempdir().expect("tmp");
    let rec = Recorder::start().await;
    let gw = Gateway::start(&db, rec.port, &usage_toml(spool.path(), "")).await;
    let headers = [
        ("authorization", bearer(&key)),
        ("accept-encoding", "gzip, deflate, br, zstd".to_string()),
    ];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();

    let negotiated = post(&gw.url("/negotiate"), &headers, "{}").await;
    assert_eq!(negotiated.status, 200);
    assert!(!negotiated.headers.contains_key("content-encoding"));
    assert_eq!(negotiated.json()["usage"]["total_tokens"], 7);
    let seen = rec.log.seen();
    assert_eq!(
        seen[0].headers.get("accept-encoding").map(|v| v.as_bytes()),
        Some(&b"identity"[..]),
        "the client's codings reached the upstream"
    );

    let encoded = post(&gw.url("/encoded"), &headers, "{}").await;
    assert_eq!(encoded.status, 200);
    assert_eq!(encoded.headers["content-encoding"], "br");
    assert!(
        encoded.body.starts_with(b"{\"id\":\"c1\""),
        "the encoded body was altered"
    );

    assert_eq!(wait_rows(&db, 2, Duration::from_secs(10)).await, 2);
    let tokens = |endpoint: &'static str| {
        let db = &db;
        async move {
            let row = db
                .client()
                .await
                .query_one(
                    "SELECT prompt_tokens, completion_tokens, tokens_used, model FROM api_key_usage WHERE endpoint = $1",
                    &[&endpoint],
                )
                .await
                .expect("row");
            (
                row.get::<_, Option<i32>>(0),
                row.get::<_, Option<i32>>(1),
                row.get::<_, Option<i32>>(2),
                row.get::<_, Option<String>>(3),
            )
        }
    };
    assert_eq!(
        tokens("/negotiate").await,
        (Some(3), Some(4), Some(7), Some("m1".to_string()))
    );
    assert_eq!(tokens("/encoded").await, (None, None, None, None));

    // The documented override: an operator's `accept-encoding` wins over keygate's, and
    // the compressed answer is passed on unread.
    let spool2 = tempfile::tempdir().expect("tmp");
    let gw2 = Gateway::start(
        &db,
        rec.port,
        &format!(
            "[upstream.headers]\naccept-encoding = \"gzip\"\n{}",
            usage_toml(spool2.path(), "")
        ),
    )
    .await;
    let overridden = post(&gw2.url("/negotiate"), &headers, "{}").await;
    assert_eq!(overridden.headers["content-encoding"], "gzip");
    assert!(overridden.body.starts_with(b"\x1f\x8b"), "the gzip body was altered");
    let last = rec.log.seen().pop().expect("seen");
    assert_eq!(last.headers["accept-encoding"], "gzip");
    assert_eq!(wait_rows(&db, 3, Duration::from_secs(10)).await, 3);
    let unmetered: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM api_key_usage WHERE endpoint = '/negotiate' AND tokens_used IS NULL",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(unmetered, 1);
}

#[tokio::test]
async fn an_abandoned_stream_is_recorded_with_what_was_seen() {
    let (db, key) = seeded_db().await;
    let spool = tempfile::tempdir().expect("tmp");
    let up = Upstream::start(&["--stream-interval", "100ms"]).await;
    let gw = Gateway::start(&db, up.port, &usage_toml(spool.path(), "")).await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr()).await.expect("connect");
    let body =
        r#"{"model": "gpt-4o", "stream": true, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 8192];
    let mut seen = 0;
    while seen < 2 {
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0);
        seen += String::from_utf8_lossy(&buf[..n]).matches("data: ").count();
    }
    drop(stream);
    assert_eq!(wait_rows(&db, 1, Duration::from_secs(10)).await, 1);
    let r = db
        .client()
        .await
        .query_one(
            "SELECT status_code, error_code, model, tokens_used, response_time_ms FROM api_key_usage",
            &[],
        )
        .await
        .expect("row");
    assert_eq!(r.get::<_, i32>(0), 200);
    assert_eq!(r.get::<_, Option<String>>(1).as_deref(), Some("client_disconnected"));
    assert_eq!(r.get::<_, Option<String>>(2).as_deref(), Some("gpt-4o"));
    assert_eq!(r.get::<_, Option<i32>>(3), None, "usage had not been sent yet");
    assert!(
        r.get::<_, i32>(4) < 5000,
        "recorded promptly, not at the end of the upstream stream"
    );
}

#[tokio::test]
async fn sigterm_with_rows_queued_writes_them_all() {
    let (db, key) = seeded_db().await;
    let spool = tempfile::tempdir().expect("tmp");
    let up = Upstream::start(&[]).await;
    // A long interval and a huge batch: nothing is written until shutdown.
    let extra = format!(
        "[usage]\nflush_interval = \"1h\"\nbatch_size = 100000\nspool_dir = \"{}\"\n",
        spool.path().display()
    );
    let mut gw = Gateway::start(&db, up.port, &extra).await;
    for _ in 0..30 {
        assert_eq!(
            get(&gw.url("/echo"), &[("authorization", &bearer(&key))]).await.status,
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rows(&db).await,
        0,
        "rows written before shutdown: the test would prove nothing"
    );
    let status = gw.proc.terminate(Duration::from_secs(20)).expect("exit");
    assert!(status.success(), "{status:?}");
    assert_eq!(rows(&db).await, 30);
}

fn spool_lines(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .map(|e| {
                    std::fs::read_to_string(e.path())
                        .unwrap_or_default()
                        .lines()
                        .filter(|l| !l.trim().is_empty())
                        .count()
                })
                .sum()
        })
        .unwrap_or(0)
}

fn spool_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn postgres_stopped_under_load_loses_nothing_and_cached_keys_keep_working() {
    let cluster = Cluster::start();
    let db = cluster.fresh_db().await;
    db.migrate();
    db.ok(&[
        "orgs",
        "create",
        "--name",
        "Big",
        "--slug",
        "big",
        "--rate-limit",
        "1000000",
        "--monthly-limit",
        "100000000",
    ]);
    let key = db.ok(&["keys", "create", "--org", "big", "--name", "load"]);
    let cold = db.ok(&["keys", "create", "--org", "big", "--name", "cold"]);
    let spool = tempfile::tempdir().expect("tmp");
    let up = Upstream::start(&[]).await;
    let extra = format!(
        "[database]\nconnect_timeout = \"500ms\"\npool_wait_timeout = \"500ms\"\nstatement_timeout = \"2s\"\n\
         [auth]\nlookup_timeout = \"1s\"\n\
         [usage]\nflush_interval = \"200ms\"\nqueue_capacity = 64\nspool_dir = \"{}\"\n",
        spool.path().display()
    );
    let gw = Gateway::start(&db, up.port, &extra).await;
    let auth = bearer(&key);
    assert_eq!(get(&gw.url("/echo"), &[("authorization", &auth)]).await.status, 200);

    let url = gw.url("/echo");
    let stop_at = Instant::now() + Duration::from_secs(27);
    let load = tokio::spawn(async move {
        let (mut ok, mut failed) = (1u64, Vec::new());
        while Instant::now() < stop_at {
            let r = get(&url, &[("authorization", &auth)]).await;
            if r.status == 200 {
                ok += 1;
            } else {
                failed.push((r.status.as_u16(), String::from_utf8_lossy(&r.body).into_owned()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (ok, failed)
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // An uncached key gets 503 with Retry-After within the lookup budget.
    let cold_auth = bearer(&cold);
    let asked = Instant::now();
    let r = get(&gw.url("/echo"), &[("authorization", &cold_auth)]).await;
    let refused_in = asked.elapsed();
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (503, "key_store_unavailable")
    );
    assert!(r.header("retry-after").is_some());
    assert!(refused_in < Duration::from_secs(3), "503 took {refused_in:?}");
    tokio::time::sleep(Duration::from_secs(18)).await;
    let spooled_during_outage = spool_lines(spool.path());
    cluster.restart();
    let restarted = Instant::now();
    let mut recovered = None;
    while restarted.elapsed() < Duration::from_secs(10) {
        if get(&gw.url("/echo"), &[("authorization", &cold_auth)]).await.status == 200 {
            recovered = Some(restarted.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered = recovered.expect("the uncached key never recovered");
    assert!(recovered < Duration::from_secs(5), "recovery took {recovered:?}");
    let (ok, failed) = load.await.expect("load");
    let ok = ok + 1; // the cold key's first success
    assert!(
        failed.is_empty(),
        "cached key failed during the outage: {:?}",
        &failed[..failed.len().min(3)]
    );
    assert!(
        spooled_during_outage > 0,
        "the queue never overflowed to the spool: the test proves less than it claims"
    );
    let have = wait_rows(&db, ok as i64, Duration::from_secs(30)).await;
    assert_eq!(have, ok as i64, "rows must equal responses exactly");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rows(&db).await, ok as i64, "no row may be written twice");
    fold_counters(&db.client().await).await;
    let total: i64 = db
        .client()
        .await
        .query_one("SELECT sum(total_requests)::bigint FROM api_keys", &[])
        .await
        .expect("key")
        .get(0);
    assert_eq!(total, ok as i64);
    eprintln!(
        "stopped 20 s: {ok} rows for {ok} responses, 0 failures, {spooled_during_outage} spooled; \
         uncached 503 in {refused_in:?}; recovered in {recovered:?}"
    );
    assert!(
        spool_files(spool.path())
            .iter()
            .all(|p| std::fs::metadata(p).map(|m| m.len() == 0).unwrap_or(true)),
        "spool not emptied"
    );
}

#[tokio::test]
async fn a_spool_left_by_a_killed_process_is_replayed_once() {
    let cluster = Cluster::start();
    let db = cluster.fresh_db().await;
    db.migrate();
    let key = db.ok(&["seed"]);
    let spool = tempfile::tempdir().expect("tmp");
    let up = Upstream::start(&[]).await;
    let extra = format!(
        "[database]\nconnect_timeout = \"300ms\"\npool_wait_timeout = \"300ms\"\n\
         [usage]\nflush_interval = \"100ms\"\nqueue_capacity = 1\nspool_dir = \"{}\"\n",
        spool.path().display()
    );
    let mut gw = Gateway::start(&db, up.port, &extra).await;
    let auth = bearer(&key);
    assert_eq!(get(&gw.url("/echo"), &[("authorization", &auth)]).await.status, 200);
    assert_eq!(wait_rows(&db, 1, Duration::from_secs(10)).await, 1);
    cluster.stop();
    for _ in 0..25 {
        assert_eq!(get(&gw.url("/echo"), &[("authorization", &auth)]).await.status, 200);
    }
    let spooled = {
        let start = Instant::now();
        while spool_lines(spool.path()) < 20 && start.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        spool_lines(spool.path())
    };
    assert!(spooled >= 20, "only {spooled} rows reached the spool");
    gw.proc.kill();
    // Keep a copy, to replay the same rows a second time later.
    let copies: Vec<(std::path::PathBuf, Vec<u8>)> = spool_files(spool.path())
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).expect("read");
            (p, b)
        })
        .collect();
    cluster.restart();
    let _gw2 = Gateway::start(&db, up.port, &extra).await;
    let want = 1 + spooled as i64;
    assert_eq!(wait_rows(&db, want, Duration::from_secs(20)).await, want);
    drop(_gw2);
    // The same spool again (a replay whose cleanup was lost): nothing is counted twice.
    for (p, b) in &copies {
        std::fs::write(p, b).expect("restore spool");
    }
    let _gw3 = Gateway::start(&db, up.port, &extra).await;
    let start = Instant::now();
    while spool_lines(spool.path()) > 0 && start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(spool_lines(spool.path()), 0, "spool not replayed");
    assert_eq!(rows(&db).await, want);
    fold_counters(&db.client().await).await;
    let total: i64 = db
        .client()
        .await
        .query_one("SELECT total_requests FROM api_keys", &[])
        .await
        .expect("key")
        .get(0);
    assert_eq!(total, want, "a replay changed total_requests");
}
