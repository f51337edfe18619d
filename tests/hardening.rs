//! Hostile input: random-key floods, keys in URLs, a canary key that must never leak.

mod common;

use common::net::*;
use common::recorder::{raw_exchange, statuses, Recorder};
use common::*;
use std::time::Duration;

/// A well-formed key that no database holds.
fn random_key(i: u32) -> String {
    let mut body = format!("{:0>42}", format!("{i:x}Q"));
    body.push('A');
    format!("pk_live_{}", &body[body.len() - 43..])
}

/// `waves` of `width` concurrent requests, each with a new random key from `first` on;
/// the count of each "status code" answered. A refusal that asks for a retry says when.
async fn flood(url: String, first: u32, waves: u32, width: u32) -> std::collections::BTreeMap<String, u32> {
    let mut codes = std::collections::BTreeMap::<String, u32>::new();
    for wave in 0..waves {
        let tasks: Vec<_> = (0..width)
            .map(|j| {
                let (url, k) = (url.clone(), bearer(&random_key(first + wave * width + j)));
                tokio::spawn(async move { get(&url, &[("authorization", &k)]).await })
            })
            .collect();
        for t in tasks {
            let r = t.await.expect("join");
            if r.error_code() == "too_many_unknown_keys" {
                assert_eq!(r.header("retry-after"), Some("1"));
            }
            *codes
                .entry(format!("{} {}", r.status.as_u16(), r.error_code()))
                .or_default() += 1;
        }
    }
    codes
}

/// `flood` in the background while the cached key `auth` sends 50 requests one after
/// another; the flood's counts and how many of the 50 were not answered 200.
async fn flood_beside_valid(
    url: &str,
    auth: &str,
    first: u32,
    waves: u32,
    width: u32,
) -> (std::collections::BTreeMap<String, u32>, u32) {
    let flooding = tokio::spawn(flood(url.to_string(), first, waves, width));
    let mut valid_failures = 0;
    for _ in 0..50 {
        if get(url, &[("authorization", auth)]).await.status != 200 {
            valid_failures += 1;
        }
    }
    (flooding.await.expect("flood"), valid_failures)
}

#[tokio::test]
async fn a_random_key_flood_bounds_lookups_and_valid_keys_keep_working() {
    let (db, key) = seeded_db().await;
    db.ok(&["orgs", "update", "default", "--rate-limit", "100000"]);
    let up = Upstream::start(&[]).await;
    let gw = Gateway::start(&db, up.port, "[auth]\nfailed_auth_per_minute = 50\n").await;
    let auth = bearer(&key);
    assert_eq!(get(&gw.url("/echo"), &[("authorization", &auth)]).await.status, 200);
    let before = gw.ready_json().await["cache"]["lookups"].as_u64().expect("lookups");

    let url = gw.url("/echo");
    let (codes, valid_failures) = flood_beside_valid(&url, &auth, 0, 30, 10).await;
    assert_eq!(valid_failures, 0, "a valid key failed during the flood");
    let lookups = gw.ready_json().await["cache"]["lookups"].as_u64().expect("lookups") - before;
    // 50 a minute, twice if the run straddles a minute boundary.
    assert!(
        lookups <= 100,
        "{lookups} database lookups for 300 random keys; {codes:?}"
    );
    assert!(
        codes.get("429 too_many_failed_authentications").copied().unwrap_or(0) >= 150,
        "{codes:?}"
    );
    assert_eq!(codes.values().sum::<u32>(), 300);
    eprintln!("random-key flood: 300 random keys → {lookups} database lookups, {codes:?}; valid key 50/50 ok");
    let r = get(&url, &[("authorization", &bearer(&random_key(9999)))]).await;
    if r.status == 429 {
        assert!(r.header("retry-after").is_some());
    }
}

/// The same flood from many addresses (the per-address limit off) is bounded by the
/// unknown-key cap instead: past `max_unknown_lookups_per_second` lookups that found
/// nothing, uncached keys get 429 `too_many_unknown_keys` without a lookup for the rest of the
/// second, and are never let through, not even with `fail_open`. The cached key keeps
/// working throughout, and a valid key never seen before is looked up once the flood
/// stops.
#[tokio::test]
async fn a_random_key_flood_from_many_addresses_is_shed_past_the_unknown_lookup_cap() {
    let (db, key) = seeded_db().await;
    db.ok(&["orgs", "update", "default", "--rate-limit", "100000"]);
    let fresh = db.ok(&["keys", "create", "--org", "default", "--name", "fresh"]);
    let fresh = bearer(fresh.trim());
    let rec = Recorder::start().await;
    let cap = 10u64;
    let gw = Gateway::start(
        &db,
        rec.port,
        &format!("[auth]\nfailed_auth_per_minute = 0\nmax_unknown_lookups_per_second = {cap}\nfail_open = true\n"),
    )
    .await;
    let auth = bearer(&key);
    assert_eq!(get(&gw.url("/echo"), &[("authorization", &auth)]).await.status, 200);
    let before = gw.ready_json().await["cache"]["lookups"].as_u64().expect("lookups");

    let url = gw.url("/echo");
    let started = std::time::Instant::now();
    let (codes, valid_failures) = flood_beside_valid(&url, &auth, 50_000, 6, 50).await;
    let seconds = started.elapsed().as_secs();
    assert_eq!(valid_failures, 0, "the cached key failed during the flood; {codes:?}");
    assert_eq!(codes.values().sum::<u32>(), 300);
    let shed = codes.get("429 too_many_unknown_keys").copied().unwrap_or(0);
    let invalid = codes.get("401 invalid_api_key").copied().unwrap_or(0);
    assert_eq!(shed + invalid, 300, "{codes:?}");
    assert!(shed > 0, "nothing shed in {seconds} s: {codes:?}");
    // Each second's window lets `cap` unknown keys through, plus the lookups already
    // holding a permit when it closed (at most max_concurrent_lookups, 16).
    let lookups = gw.ready_json().await["cache"]["lookups"].as_u64().expect("lookups") - before;
    let bound = (cap + 16) * (seconds + 2);
    assert!(
        lookups <= bound,
        "{lookups} lookups in {seconds} s, cap {cap}/s; {codes:?}"
    );
    assert_eq!(u64::from(invalid), lookups, "every lookup made answers 401");
    assert_eq!(gw.ready_json().await["cache"]["shed"].as_u64(), Some(u64::from(shed)));
    let metrics = get(&format!("http://127.0.0.1:{}/metrics", gw.admin_port), &[]).await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    let value = |series: &str| -> Option<f64> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
    };
    assert_eq!(
        value("keygate_auth_lookups_shed_total"),
        Some(f64::from(shed)),
        "{metrics}"
    );
    assert_eq!(
        value(r#"keygate_requests_total{outcome="too_many_unknown_keys",status="429"}"#),
        Some(f64::from(shed)),
        "{metrics}"
    );
    // fail_open applies to a database that cannot answer, not to a shed flood.
    let forwarded = rec.log.seen.lock().expect("seen").len();
    assert_eq!(forwarded, 51, "only the valid key's requests reach the upstream");
    eprintln!("flood from many addresses: 300 random keys in {seconds} s → {lookups} lookups, {codes:?}");

    // A quiet second later, a key never seen before is looked up and admitted.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(get(&url, &[("authorization", &fresh)]).await.status, 200);
}

#[tokio::test]
async fn keys_in_query_strings_are_refused_and_never_logged() {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    let mut gw = Gateway::start(&db, up.port, "").await;
    let r = get(&gw.url(&format!("/echo?api_key={key}")), &[]).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (400, "api_key_in_query"));
    let r = get(&gw.url(&format!("/echo?k={key}")), &[("authorization", &bearer(&key))]).await;
    assert_eq!(r.status, 400, "refused even alongside a valid header key");
    assert!(!String::from_utf8_lossy(&r.body).contains(&key[8..]));
    let _ = gw.proc.terminate(std::time::Duration::from_secs(10));
    assert!(
        !gw.flushed_logs().await.contains(&key[8..]),
        "the key leaked into the logs"
    );
}

/// Header names of a rejection, without the ones that differ per request by design.
fn rejection_shape(r: &Reply) -> (u16, Vec<String>, bytes::Bytes) {
    let mut names: Vec<String> = r
        .headers
        .keys()
        .map(|n| n.as_str().to_string())
        .filter(|n| n != "date")
        .collect();
    names.sort();
    (r.status.as_u16(), names, r.body.clone())
}

/// One key, the canary, is pushed through every path that could echo it: success,
/// malformed and wrong-scheme variants, rate limit, oversized body, key in the URL,
/// upstream down, revocation, PostgreSQL down (spool). It must appear in no response,
/// no log line (text and JSON), no spool file, and never reach the upstream.
#[tokio::test]
async fn the_canary_key_never_leaks() {
    let cluster = Cluster::start();
    let db = cluster.fresh_db().await;
    db.migrate();
    db.ok(&[
        "orgs",
        "create",
        "--name",
        "Canary",
        "--slug",
        "canary",
        "--rate-limit",
        "8",
    ]);
    let canary = db
        .ok(&["keys", "create", "--org", "canary", "--name", "canary"])
        .trim()
        .to_string();
    let body_part = canary[8..].to_string();
    let rec = Recorder::start().await;
    let spool = tempfile::tempdir().expect("spool");
    let extra = format!(
        "[server]\nmax_body_bytes = \"1KiB\"\n[log]\nformat = \"json\"\n\
         [database]\nconnect_timeout = \"300ms\"\npool_wait_timeout = \"300ms\"\n\
         [auth]\nlookup_timeout = \"500ms\"\n[usage]\nflush_interval = \"100ms\"\nspool_dir = \"{}\"\n",
        spool.path().display()
    );
    let gw = Gateway::start(&db, rec.port, &extra).await;
    let dead = Gateway::start(&db, common::free_port(), "[log]\nformat = \"text\"\n").await;
    let auth = bearer(&canary);
    let mut replies = Vec::new();
    for _ in 0..3 {
        replies.push(get(&gw.url("/ok"), &[("authorization", &auth)]).await);
    }
    replies.push(post(&gw.url("/big"), &[("authorization", &auth)], &"x".repeat(4096)).await);
    let truncated = bearer(&canary[..canary.len() - 1]);
    let flipped = {
        let mut k = canary.clone().into_bytes();
        k[20] = if k[20] == b'A' { b'B' } else { b'A' };
        bearer(&String::from_utf8(k).expect("ascii"))
    };
    let malformed = get(&gw.url("/m"), &[("authorization", &truncated)]).await;
    let unknown = get(&gw.url("/u"), &[("authorization", &flipped)]).await;
    let wrong_scheme = get(&gw.url("/w"), &[("authorization", &format!("Basic {canary}"))]).await;
    let (m, u, w) = (
        rejection_shape(&malformed),
        rejection_shape(&unknown),
        rejection_shape(&wrong_scheme),
    );
    assert_eq!(m.0, 401);
    assert_eq!(m, u, "malformed and unknown keys must be indistinguishable");
    assert_eq!(m, w, "a wrong scheme must look like an unknown key");
    replies.extend([malformed, unknown, wrong_scheme]);
    replies.push(get(&gw.url(&format!("/q?key={canary}")), &[]).await);
    replies.push(get(&gw.url("/both"), &[("authorization", &auth), ("x-api-key", &canary)]).await);
    for _ in 0..6 {
        replies.push(get(&gw.url("/limit"), &[("authorization", &auth)]).await);
    }
    assert!(
        replies.iter().any(|r| r.status == 429),
        "the rate limit was never reached"
    );
    replies.push(get(&dead.url("/dead"), &[("authorization", &auth)]).await);
    assert_eq!(replies.last().map(|r| r.status.as_u16()), Some(502));

    // PostgreSQL down: the cached canary still works and its rows go to the spool.
    cluster.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    replies.push(get(&gw.url("/spooled"), &[("x-api-key", &canary)]).await);
    replies.push(get(&gw.url("/unknown-down"), &[("authorization", &flipped)]).await);
    assert!(
        eventually(Duration::from_secs(10), async || !gw
            .spool_texts()
            .iter()
            .all(|t| t.is_empty()))
        .await,
        "nothing was spooled"
    );
    cluster.restart();
    let key_id: String = {
        let list = db.ok(&["keys", "list", "--org", "canary", "--format", "json"]);
        let v: serde_json::Value = serde_json::from_str(&list).expect("json");
        v[0]["id"].as_str().expect("id").to_string()
    };
    db.ok(&["keys", "revoke", &key_id]);
    assert!(
        eventually(Duration::from_secs(10), async || get(
            &gw.url("/revoked"),
            &[("authorization", &auth)]
        )
        .await
        .status
            == 401)
        .await,
        "the revocation never arrived"
    );
    replies.push(get(&gw.url("/revoked"), &[("authorization", &auth)]).await);

    for r in &replies {
        let text = format!("{:?} {}", r.headers, String::from_utf8_lossy(&r.body));
        assert!(!text.contains(&body_part), "a response carried the canary: {text}");
    }
    for s in rec.log.seen() {
        let text = format!("{} {:?} {}", s.path, s.headers, String::from_utf8_lossy(&s.body));
        assert!(!text.contains(&body_part), "the upstream received the canary: {text}");
    }
    let (json_log, text_log) = (gw.flushed_logs().await, dead.logs());
    for (name, text) in [("json log", json_log.clone()), ("text log", text_log.clone())] {
        assert!(!text.is_empty(), "{name} is empty: nothing was checked");
        assert!(!text.contains(&body_part), "the canary is in the {name}");
        // Even a long piece of it would be a leak.
        for w in body_part.as_bytes().windows(12) {
            let piece = std::str::from_utf8(w).expect("ascii");
            assert!(
                !text.contains(piece),
                "a piece of the canary ({piece}) is in the {name}"
            );
        }
    }
    for text in gw.spool_texts() {
        assert!(!text.contains(&body_part), "the canary is in a spool file");
    }
    for line in json_log.lines().filter(|l| l.starts_with('{')) {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    eprintln!(
        "canary: {} responses, {} upstream requests, {} log bytes, {} spool files checked",
        replies.len(),
        rec.log.seen().len(),
        json_log.len() + text_log.len(),
        gw.spool_texts().len()
    );
}

/// Spellings of `/admin/k` that a normalizing upstream or router resolves to the admin
/// route. Sent byte for byte on a raw socket, since clients clean paths up first.
const ADMIN_SPELLINGS: &[&str] = &[
    "/v1/../admin/k",
    "/v1/chat/../../admin/k",
    "/%61dmin/k",
    "/%41dmin/k",
    "/ad%6Din/k",
    "/%2e%2e/admin/k",
    "/v1/%2e%2E/admin/k",
    "/./admin/k",
    "//admin/k",
    "/v1/..//admin/k",
    "/admin%2Fk",
    "/admin%2fk",
    "/admin%5Ck",
    "/admin\\k",
    "/v1%2F..%2Fadmin/k",
    "/v1/..%2Fadmin/k",
    "/v1/..%5Cadmin/k",
    "/v1/.%2e/admin/k",
    "/ADMIN/k",
    "/Admin/k",
    "/v1/..;/admin/k",
    "/v1/..;x=y/admin/k",
    "/admin;jsessionid=1/k",
    "/v1/..%3B/admin/k",
    "/admin",
    "/admin/",
];

async fn raw_get(port: u16, path: &str, key: &str) -> (u16, String) {
    raw_request(port, "GET", path, key, "").await
}

/// `extra`: more header lines, each ending in CRLF.
async fn raw_request(port: u16, method: &str, path: &str, key: &str, extra: &str) -> (u16, String) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let raw = raw_exchange(port, req.as_bytes(), Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = statuses(&raw).first().copied().unwrap_or(0);
    (status, text)
}

/// A key without the admin scope must not reach `/admin/` by another spelling of the
/// path: the path-confusion class of Envoy's CVE-2019-9901 and CVE-2021-29492.
#[tokio::test]
async fn no_spelling_of_a_path_skips_its_scope() {
    let (db, _seed) = seeded_db().await;
    let chat = db.ok(&[
        "keys", "create", "--org", "default", "--name", "chat", "--scopes", "chat",
    ]);
    let admin = db.ok(&[
        "keys", "create", "--org", "default", "--name", "adm", "--scopes", "admin",
    ]);
    let (chat, admin) = (chat.trim(), admin.trim());
    let rec = Recorder::start().await;
    let routes = "[[routes]]\nprefix = \"/admin\"\nscopes = [\"admin\"]\n\
                  [[routes]]\nprefix = \"/v1/models\"\nmethods = [\"GET\"]\nscopes = [\"read\"]\n";
    let gw = Gateway::start(&db, rec.port, routes).await;
    let port = gw.addr().port();

    for path in ADMIN_SPELLINGS {
        let (status, text) = raw_get(port, path, chat).await;
        assert_eq!(status, 403, "{path} without the admin scope: {text}");
        assert!(text.contains("insufficient_scope"), "{path}: {text}");
    }
    // Frameworks answer HEAD with the GET handler, so HEAD needs what GET needs.
    // And some (Werkzeug) upper-case the method, so `get` needs what GET needs.
    for method in ["HEAD", "get", "head"] {
        let (status, text) = raw_request(port, method, "/v1/models", chat, "").await;
        assert_eq!(status, 403, "{method} of a GET-only rule: {text}");
    }
    // Frameworks take a method override as the method (Express, Rails, Laravel, Symfony).
    let overrides = [
        ("/v1/models", "X-HTTP-Method-Override: GET\r\n"),
        ("/v1/models", "x-http-method: get\r\n"),
        ("/v1/models", "X-Method-Override: PUT, GET\r\n"),
        ("/v1/models?_method=GET", ""),
    ];
    for (path, header) in overrides {
        let (status, text) = raw_request(port, "POST", path, chat, header).await;
        assert_eq!(status, 403, "POST {path} with {header:?}: {text}");
    }
    assert_eq!(
        rec.log.paths(),
        Vec::<String>::new(),
        "a hostile spelling reached the upstream"
    );
    // The access log keeps what the client sent, so an attempt shows its spelling.
    let logs = gw.flushed_logs().await;
    assert!(logs.contains(r#"path="/v1/..;/admin/k""#), "{logs}");

    // The admin key gets through, and the upstream sees the path keygate authorised.
    for (path, forwarded) in [
        ("/v1/../admin/k", "/admin/k"),
        ("/%61dmin/k", "/admin/k"),
        ("/admin%2fk", "/admin%2Fk"),
    ] {
        let (status, text) = raw_get(port, path, admin).await;
        assert_eq!(status, 200, "{path} with the admin scope: {text}");
        assert_eq!(rec.log.paths().last().map(String::as_str), Some(forwarded), "{path}");
    }

    // A path override is for a front proxy to set, and keygate is the front.
    let (status, text) = raw_request(
        port,
        "GET",
        "/public",
        chat,
        "X-Original-URL: /admin/k\r\nX-Rewrite-URL: /admin/k\r\n",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let last = rec.log.seen().last().cloned().expect("reached the upstream");
    assert_eq!(last.path, "/public");
    assert!(last.headers.get("x-original-url").is_none() && last.headers.get("x-rewrite-url").is_none());

    // Ordinary paths are normalized too, and the query string passes on untouched.
    let (status, _) = raw_get(port, "/v1/./chat/%63ompletions?x=%2e%2e/a&y=..", chat).await;
    assert_eq!(status, 200);
    let last = rec.log.seen().last().cloned().expect("reached the upstream");
    assert_eq!(last.path, "/v1/chat/completions");
    assert_eq!(last.query.as_deref(), Some("x=%2e%2e/a&y=.."));

    // A `%` that starts no escape has no one meaning: refused before it reaches anyone.
    let before = rec.log.seen().len();
    for path in [
        "/v1/chat%zz",
        "/v1/chat%4",
        "/v1/chat%",
        "/%%32%65%%32%65/admin/k",
        "/admin%00/k",
        "/a%0d%0a",
    ] {
        let (status, text) = raw_get(port, path, admin).await;
        assert_eq!(status, 400, "{path}: {text}");
        assert!(text.contains("malformed_request_path"), "{path}: {text}");
    }
    assert_eq!(rec.log.seen().len(), before, "a malformed path reached the upstream");

    // The usage rows carry the normalized path: what was billed is what was served.
    let c = db.client().await;
    // The refusals after authentication, the HEAD, three admin and one chat request.
    let want = ADMIN_SPELLINGS.len() as i64 + 5;
    let ok = eventually(Duration::from_secs(10), async || {
        c.query_one("SELECT count(*) FROM api_key_usage", &[])
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) >= want)
    })
    .await;
    assert!(ok, "fewer than {want} usage rows");
    let normalized: i64 = c
        .query_one(
            "SELECT count(*) FROM api_key_usage WHERE endpoint = '/v1/chat/completions'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(normalized, 1, "no usage row with the normalized endpoint");
    let endpoints: Vec<String> = c
        .query("SELECT endpoint FROM api_key_usage", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    for e in &endpoints {
        let dot_segment = e.split('/').any(|s| s == "." || s == "..");
        assert!(
            !dot_segment && !e.contains("%61") && !e.contains("%2f"),
            "a usage row kept a raw spelling: {e}"
        );
    }
}
