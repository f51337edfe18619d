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
    let dead = db.keygate(&["healthcheck", "--url", &format!("http://127.0.0.1:{}/healthz", free_port())]);
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
        post(&url, &[("authorization", &auth)], r#"{"model": "m", "stream": true, "max_tokens": 20, "messages": [{"role": "user", "content": "x"}]}"#).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = gw.proc.child.id().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
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
    let r = get(&gw.url("/echo"), &[("authorization", &auth), ("x-request-id", "req-123")]).await;
    assert_eq!(r.header("x-request-id"), Some("req-123"));
    assert_eq!(r.json()["headers"]["x-request-id"], "req-123", "the upstream sees the same id");
    let overhead: f64 = r.header("x-keygate-overhead-ms").expect("overhead").parse().expect("ms");
    assert!(overhead >= 0.0);
    assert!(r.header("server-timing").is_some_and(|v| v.contains("keygate;dur=") && v.contains("upstream;dur=")));
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
    let list: serde_json::Value = serde_json::from_str(&db.ok(&["keys", "list", "--org", "default", "--format", "json"])).expect("json");
    let rid = list.as_array().expect("a").iter().find(|k| k["name"] == "r").and_then(|k| k["id"].as_str()).expect("id").to_string();
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
    assert!(logs.contains(&format!("pk_test_…{}", &key[key.len() - 4..])), "the key hint is how keys are named");
}
