//! Operating keygate: health probes, readiness during drain, request ids, access logs.

mod common;

use std::time::Duration;

use common::net::*;
use common::*;

#[tokio::test]
async fn healthcheck_passes_against_a_healthy_instance_and_fails_otherwise() {
    let (db, _key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    let gw = Gateway::start(&db, up.port, "").await;
    let cfg = gw.config.to_str().expect("path");
    let ok = db.keygate(&["healthcheck", "--config", cfg]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let ready = db.keygate(&["healthcheck", "--config", cfg, "--ready"]);
    assert!(ready.status.success(), "{}", stderr(&ready));
    let dead = db.keygate(&[
        "healthcheck",
        "--url",
        &format!("http://127.0.0.1:{}/healthz", free_port()),
    ]);
    assert!(!dead.status.success());
    assert!(stderr(&dead).starts_with("error: "), "{}", stderr(&dead));
}

#[tokio::test]
async fn readiness_flips_to_draining_on_sigterm_while_requests_finish() {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&["--stream-interval", "100ms"]).await;
    let mut gw = Gateway::start(&db, up.port, "").await;
    assert_eq!(gw.ready_json().await["status"], "ready");
    let url = gw.url("/v1/chat/completions");
    let auth = bearer(&key);
    let stream = tokio::spawn(async move {
        post(
            &url,
            &[("authorization", &auth)],
            r#"{"model": "m", "stream": true, "max_tokens": 20, "messages": [{"role": "user", "content": "x"}]}"#,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = gw.proc.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = get(&format!("http://127.0.0.1:{}/readyz", gw.admin_port), &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["status"], "draining");
    let done = stream.await.expect("join");
    assert_eq!(done.status, 200);
    assert!(String::from_utf8_lossy(&done.body).ends_with("data: [DONE]\n\n"));
    let status = gw.proc.terminate(Duration::from_secs(15)).expect("exits");
    assert!(status.success());
}

#[tokio::test]
async fn request_ids_and_overhead_are_reported() {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    let gw = Gateway::start(&db, up.port, "").await;
    let auth = bearer(&key);
    let r = get(
        &gw.url("/echo"),
        &[("authorization", &auth), ("x-request-id", "req-123")],
    )
    .await;
    assert_eq!(r.header("x-request-id"), Some("req-123"));
    assert_eq!(
        r.json()["headers"]["x-request-id"],
        "req-123",
        "the upstream sees the same id"
    );
    let overhead: f64 = r
        .header("x-keygate-overhead-ms")
        .expect("overhead")
        .parse()
        .expect("ms");
    assert!(overhead >= 0.0);
    assert!(r
        .header("server-timing")
        .is_some_and(|v| v.contains("keygate;dur=") && v.contains("upstream;dur=")));
    // Generated when absent or unsafe, and present on keygate's own refusals too.
    let r = get(&gw.url("/echo"), &[("x-request-id", "bad id\twith tab")]).await;
    assert_eq!(r.status, 401);
    let id = r.header("x-request-id").expect("id");
    assert_eq!(id.len(), 36, "{id}");
}

#[tokio::test]
async fn json_logs_parse_and_never_contain_a_key() {
    let (db, key) = seeded_db().await;
    let revoked = db.ok(&["keys", "create", "--org", "default", "--name", "r"]);
    let list: serde_json::Value =
        serde_json::from_str(&db.ok(&["keys", "list", "--org", "default", "--format", "json"])).expect("json");
    let rid = list
        .as_array()
        .expect("a")
        .iter()
        .find(|k| k["name"] == "r")
        .and_then(|k| k["id"].as_str())
        .expect("id")
        .to_string();
    db.ok(&["keys", "revoke", &rid]);
    let unknown = "pk_live_ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZA";
    let up = Upstream::start(&[]).await;
    let mut gw = Gateway::start(&db, up.port, "[log]\nformat = \"json\"\nlevel = \"debug\"\n").await;
    for k in [key.as_str(), revoked.as_str(), unknown, "pk_test_malformed"] {
        for path in ["/echo", "/v1/chat/completions", "/nope?api_key=x"] {
            get(&gw.url(path), &[("authorization", &bearer(k))]).await;
            get(&gw.url(path), &[("x-api-key", k)]).await;
        }
    }
    let _ = gw.proc.terminate(Duration::from_secs(15));
    let logs = gw.logs();
    let mut access = 0;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["target"] == "keygate::access" {
            access += 1;
            assert!(v["fields"]["request_id"].is_string(), "{line}");
        }
    }
    assert_eq!(access, 24, "one access line per request");
    for k in [&key, &revoked, unknown] {
        // Neither the key nor its secret body may appear anywhere.
        assert!(!logs.contains(&k[8..]), "a key leaked into the logs");
    }
    assert!(
        logs.contains(&format!("pk_test_…{}", &key[key.len() - 4..])),
        "the key hint is how keys are named"
    );
}

/// Parses Prometheus text exposition strictly enough to catch a broken page: every
/// sample line is `name{labels} value` with a float value. Returns (series, value).
#[tokio::test]
async fn text_access_lines_carry_each_request_and_follow_the_level_filter() {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    let mut gw = Gateway::start(&db, up.port, "").await;
    let ok = get(&gw.url("/echo"), &[("authorization", &bearer(&key))]).await;
    get(&gw.url("/echo"), &[]).await;
    let _ = gw.proc.terminate(Duration::from_secs(15));
    let logs = gw.logs();
    let access: Vec<&str> = logs.lines().filter(|l| l.contains(" keygate::access: ")).collect();
    assert_eq!(access.len(), 2, "{logs}");
    let id = ok.header("x-request-id").expect("request id");
    let line = access
        .iter()
        .find(|l| l.contains(&format!("request_id=\"{id}\"")))
        .unwrap_or_else(|| panic!("no line for {id}: {logs}"));
    // `2026-12-02T12:52:56.130532Z  INFO keygate::access: request_id="…" method=GET …`
    let (stamp, rest) = line.split_at(27);
    assert!(chrono::DateTime::parse_from_rfc3339(stamp).is_ok(), "{line}");
    assert!(rest.starts_with("  INFO keygate::access: request_id=\""), "{line}");
    let hint = format!("key=pk_test_…{}", &key[key.len() - 4..]);
    for field in [
        "method=GET",
        "path=\"/echo\"",
        "status=200",
        "org=",
        "key_id=",
        &hint,
        "total_ms=",
        "upstream_ms=",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    let missing = access.iter().find(|l| !l.contains(id)).expect("the 401's line");
    assert!(missing.contains("status=401 error=\"missing_api_key\""), "{missing}");
    assert!(!missing.contains("key_id="), "{missing}");

    // The access target can be turned off by the level filter like any other.
    let mut quiet = Gateway::start(&db, up.port, "[log]\nlevel = \"info,keygate::access=off\"\n").await;
    assert_eq!(
        get(&quiet.url("/echo"), &[("authorization", &bearer(&key))])
            .await
            .status,
        200
    );
    let _ = quiet.proc.terminate(Duration::from_secs(15));
    assert!(!quiet.logs().contains("keygate::access"), "{}", quiet.logs());
}

fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "{line:?}");
        }
        out.push((series.to_string(), value));
    }
    out
}

fn sample(samples: &[(String, f64)], series: &str) -> f64 {
    samples.iter().filter(|(s, _)| s == series).map(|(_, v)| *v).sum()
}

#[tokio::test]
async fn metrics_parse_and_move_with_traffic() {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    let gw = Gateway::start(&db, up.port, "[usage]\nflush_interval = \"100ms\"\n").await;
    let url = format!("http://127.0.0.1:{}/metrics", gw.admin_port);
    let before = get(&url, &[]).await;
    assert_eq!(before.status, 200);
    assert!(before
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain")));
    let before = parse_prometheus(&String::from_utf8_lossy(&before.body));
    for _ in 0..5 {
        assert_eq!(
            get(&gw.url("/echo"), &[("authorization", &bearer(&key))]).await.status,
            200
        );
    }
    get(&gw.url("/echo"), &[]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = get(&url, &[]).await;
    let text = String::from_utf8_lossy(&after.body).into_owned();
    let after = parse_prometheus(&text);
    let proxied = r#"keygate_requests_total{outcome="proxied",status="200"}"#;
    assert_eq!(sample(&after, proxied) - sample(&before, proxied), 5.0, "{text}");
    assert_eq!(
        sample(
            &after,
            r#"keygate_requests_total{outcome="missing_api_key",status="401"}"#
        ),
        1.0,
        "{text}"
    );
    assert!(sample(&after, "keygate_auth_cache_hits_total") >= 4.0, "{text}");
    assert!(
        sample(&after, r#"keygate_usage_rows_total{result="written"}"#) >= 5.0,
        "{text}"
    );
    assert!(sample(&after, "keygate_overhead_seconds_count") >= 6.0, "{text}");
    assert!(sample(&after, "keygate_upstream_seconds_count") >= 5.0, "{text}");
    // The first request's key came from PostgreSQL; the rows went in at least one batch.
    assert!(sample(&after, "keygate_auth_db_lookup_seconds_count") >= 1.0, "{text}");
    assert!(sample(&after, "keygate_usage_flush_seconds_count") >= 1.0, "{text}");
    // That lookup read the key's limit counters too, so the limiter asked nothing more.
    let seeds = |source: &str| {
        sample(
            &after,
            &format!("keygate_rate_limit_seeds_total{{source=\"{source}\"}}"),
        )
    };
    assert_eq!(
        (seeds("lookup"), seeds("query"), seeds("failed")),
        (1.0, 0.0, 0.0),
        "{text}"
    );
    // Every histogram is whole: cumulative buckets ending in +Inf == _count.
    for h in [
        "keygate_overhead_seconds",
        "keygate_upstream_seconds",
        "keygate_auth_db_lookup_seconds",
        "keygate_usage_flush_seconds",
    ] {
        let buckets: Vec<f64> = after
            .iter()
            .filter(|(s, _)| s.starts_with(&format!("{h}_bucket{{")))
            .map(|(_, v)| *v)
            .collect();
        assert!(
            buckets.len() > 2 && buckets.windows(2).all(|w| w[0] <= w[1]),
            "{h}: {text}"
        );
        let inf = sample(&after, &format!("{h}_bucket{{le=\"+Inf\"}}"));
        assert_eq!(inf, sample(&after, &format!("{h}_count")), "{h}: {text}");
    }
    assert!(
        sample(&after, r#"keygate_rate_limit_decisions_total{decision="allowed"}"#) >= 5.0,
        "{text}"
    );
    assert_eq!(sample(&after, "keygate_notify_listener_connected"), 1.0, "{text}");
}

#[tokio::test]
async fn serve_with_migrate_brings_up_a_fresh_database() {
    let db = fresh_db().await;
    let up = Upstream::start(&[]).await;
    let dir = tempfile::tempdir().expect("tmp");
    let (port, admin) = (free_port(), free_port());
    let cfg = dir.path().join("k.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             [upstream]\nurl = \"http://127.0.0.1:{}\"\n[usage]\nspool_dir = \"{}\"\n",
            up.port,
            dir.path().join("spool").display()
        ),
    )
    .expect("config");
    let child = db
        .command(&["serve", "--migrate", "--config", cfg.to_str().expect("path")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let _proc = Proc { child, name: "keygate" };
    wait_for_port(port, Duration::from_secs(20)).await;
    let key = db.ok(&["seed"]);
    let r = post(
        &format!("http://127.0.0.1:{port}/chat"),
        &[("authorization", &bearer(&key))],
        r#"{"message": "hi"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
}
