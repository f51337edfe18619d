//! The admin HTTP API end to end: a real keygate process with `[admin] token` set, the
//! demo upstream, real PostgreSQL. Keys made through the API are used through the proxy,
//! and the CLI reads what the API wrote (they share the `db` functions).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::net::*;
use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

const TOKEN: &str = "admin-token-for-tests-0123456789";

fn with_admin(extra: &str) -> String {
    format!("[admin]\ntoken = \"{TOKEN}\"\n[usage]\nflush_interval = \"100ms\"\n{extra}")
}

async fn setup() -> (TestDb, String, Upstream, Gateway) {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    let gw = Gateway::start(&db, up.port, &with_admin("")).await;
    (db, key, up, gw)
}

fn admin_url(gw: &Gateway, path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", gw.admin_port)
}

/// An admin call with the right token; `Value::Null` sends no body.
async fn call(gw: &Gateway, method: Method, path: &str, body: Value) -> Reply {
    let auth = bearer(TOKEN);
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    send(
        method,
        &admin_url(gw, path),
        &[("authorization", &auth), ("content-type", "application/json")],
        body,
    )
    .await
}

fn status_code(r: &Reply) -> (u16, String) {
    (r.status.as_u16(), r.error_code())
}

async fn proxy_status(gw: &Gateway, key: &str) -> StatusCode {
    get(&gw.url("/echo"), &[("authorization", &bearer(key))]).await.status
}

#[tokio::test]
async fn organizations_are_created_listed_read_updated_and_disabled() {
    let (db, _key, _up, gw) = setup().await;
    let new = json!({"name": "Acme", "slug": "acme", "email": "ops@acme.test", "plan": "pro",
                     "monthly_request_limit": 5000, "rate_limit_per_minute": 100, "max_api_keys": 3});
    let r = call(&gw, Method::POST, "/admin/v1/orgs", new.clone()).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let org = r.json();
    assert_eq!(org["slug"], "acme");
    assert_eq!(org["plan"], "pro");
    assert_eq!(org["is_active"], true);
    assert_eq!(
        (
            &org["monthly_request_limit"],
            &org["rate_limit_per_minute"],
            &org["max_api_keys"]
        ),
        (&json!(5000), &json!(100), &json!(3))
    );
    assert_eq!(r.header("cache-control"), Some("no-store"));

    let dup = call(&gw, Method::POST, "/admin/v1/orgs", new).await;
    assert_eq!(status_code(&dup), (409, "conflict".into()));

    let list = call(&gw, Method::GET, "/admin/v1/orgs", Value::Null).await.json();
    let slugs: Vec<&str> = list["organizations"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|o| o["slug"].as_str())
        .collect();
    assert_eq!(slugs, ["default", "acme"]);

    let got = call(&gw, Method::GET, "/admin/v1/orgs/acme", Value::Null).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["id"], org["id"]);
    let missing = call(&gw, Method::GET, "/admin/v1/orgs/nope", Value::Null).await;
    assert_eq!(status_code(&missing), (404, "not_found".into()));

    let patch = json!({"name": "Acme Inc", "plan": "enterprise", "rate_limit_per_minute": 200});
    let r = call(&gw, Method::PATCH, "/admin/v1/orgs/acme", patch.clone()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let updated = r.json();
    assert_eq!(
        (&updated["name"], &updated["plan"]),
        (&json!("Acme Inc"), &json!("enterprise"))
    );
    assert_eq!(updated["rate_limit_per_minute"], 200);
    assert_eq!(updated["email"], "ops@acme.test", "absent fields are left alone");
    assert_eq!(updated["max_api_keys"], 3);
    let r = call(&gw, Method::PATCH, "/admin/v1/orgs/nope", patch).await;
    assert_eq!(status_code(&r), (404, "not_found".into()));

    // The CLI reads what the API wrote: one store, one set of queries.
    let cli: Value = serde_json::from_str(&db.ok(&["orgs", "list", "--format", "json"])).expect("json");
    assert!(cli.as_array().expect("array").iter().any(|o| o["name"] == "Acme Inc"));

    // Disabling refuses the organization's keys at the proxy; PATCH is_active re-enables.
    let created = call(&gw, Method::POST, "/admin/v1/orgs/acme/keys", json!({"name": "k"})).await;
    let key = created.json()["key"].as_str().expect("key").to_string();
    assert_eq!(proxy_status(&gw, &key).await, 200);
    let r = call(&gw, Method::POST, "/admin/v1/orgs/acme/disable", Value::Null).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["is_active"], false);
    let refused = eventually(Duration::from_secs(2), async || proxy_status(&gw, &key).await == 403).await;
    assert!(refused, "keys of a disabled organization still served");
    let r = call(&gw, Method::PATCH, "/admin/v1/orgs/acme", json!({"is_active": true})).await;
    assert_eq!(r.json()["is_active"], true);
    let served = eventually(Duration::from_secs(2), async || proxy_status(&gw, &key).await == 200).await;
    assert!(served, "re-enabled organization still refused");
    let r = call(&gw, Method::POST, "/admin/v1/orgs/nope/disable", Value::Null).await;
    assert_eq!(status_code(&r), (404, "not_found".into()));
}

#[tokio::test]
async fn keys_are_created_listed_revoked_and_rotated() {
    let (db, seed_key, _up, gw) = setup().await;
    let spec = json!({"name": "api", "description": "for tests", "environment": "live",
                      "scopes": ["chat"], "rate_limit": 500, "expires_in": "30d"});
    let r = call(&gw, Method::POST, "/admin/v1/orgs/default/keys", spec).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let created = r.json();
    let key = created["key"].as_str().expect("plaintext").to_string();
    assert!(key.starts_with("pk_live_"), "{key}");
    let api_key = &created["api_key"];
    assert_eq!(api_key["key_hint"], key[key.len() - 4..]);
    assert_eq!(
        (&api_key["status"], &api_key["custom_rate_limit"]),
        (&json!("active"), &json!(500))
    );
    assert_eq!(api_key["scopes"], json!(["chat"]));
    let expires: chrono::DateTime<chrono::Utc> = api_key["expires_at"].as_str().expect("expiry").parse().expect("time");
    let lifetime = expires - chrono::Utc::now();
    assert!(lifetime > chrono::Duration::days(29) && lifetime <= chrono::Duration::days(30));
    let new_id = api_key["id"].as_str().expect("id").to_string();

    assert_eq!(proxy_status(&gw, &key).await, 200, "a key from the API authenticates");

    // Listing: hints only, never a plaintext or a hash.
    let r = call(&gw, Method::GET, "/admin/v1/orgs/default/keys", Value::Null).await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        !text.contains(&key) && !text.contains(&seed_key),
        "plaintext in listing"
    );
    assert!(
        !text.contains(&keygate::keys::KeyDigest::of(&key).to_hex()),
        "hash in listing"
    );
    let keys = r.json()["api_keys"].as_array().expect("array").clone();
    assert_eq!(keys.len(), 2);
    for k in &keys {
        let fields: BTreeSet<&str> = k.as_object().expect("object").keys().map(String::as_str).collect();
        assert!(!fields.iter().any(|f| f.contains("hash") || *f == "key"), "{fields:?}");
    }
    let seed_id = keys
        .iter()
        .find(|k| k["name"] == "Default Test Key")
        .and_then(|k| k["id"].as_str())
        .expect("seed key listed")
        .to_string();

    // Revocation reaches the proxy within a second (NOTIFY), and repeating it is harmless.
    let r = call(
        &gw,
        Method::POST,
        &format!("/admin/v1/keys/{new_id}/revoke"),
        Value::Null,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        (&r.json()["already_revoked"], &r.json()["api_key"]["status"]),
        (&json!(false), &json!("revoked"))
    );
    let refused = eventually(Duration::from_secs(1), async || proxy_status(&gw, &key).await == 401).await;
    assert!(refused, "revoked key still served after 1 s");
    let again = call(&gw, Method::POST, &format!("/admin/v1/keys/{new_id}/revoke"), json!({})).await;
    assert_eq!(again.json()["already_revoked"], true);
    let r = call(
        &gw,
        Method::POST,
        &format!("/admin/v1/keys/{new_id}/rotate"),
        Value::Null,
    )
    .await;
    assert_eq!(
        status_code(&r),
        (409, "conflict".into()),
        "a revoked key cannot be rotated"
    );

    // Rotation: the successor works at once; the old key keeps working for the grace.
    let path = format!("/admin/v1/keys/{seed_id}/rotate");
    let r = call(&gw, Method::POST, &path, json!({"grace": "1h"})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let rotated = r.json();
    let successor = rotated["key"].as_str().expect("new plaintext").to_string();
    assert_ne!(successor, seed_key);
    assert_eq!(rotated["previous"]["replaced_by"], rotated["api_key"]["id"]);
    assert!(rotated["previous"]["expires_at"].is_string());
    assert_eq!(proxy_status(&gw, &successor).await, 200, "the rotated key works");
    assert_eq!(
        proxy_status(&gw, &seed_key).await,
        200,
        "the old key works during its grace"
    );

    let unknown = uuid::Uuid::new_v4();
    let r = call(
        &gw,
        Method::POST,
        &format!("/admin/v1/keys/{unknown}/revoke"),
        Value::Null,
    )
    .await;
    assert_eq!(status_code(&r), (404, "not_found".into()));
    let r = call(&gw, Method::POST, "/admin/v1/keys/not-a-uuid/revoke", Value::Null).await;
    assert_eq!(status_code(&r), (400, "invalid_request".into()));
    let r = call(&gw, Method::GET, "/admin/v1/orgs/nope/keys", Value::Null).await;
    assert_eq!(status_code(&r), (404, "not_found".into()));

    // The CLI sees the API's keys; the log never saw a plaintext key or the token.
    let cli = db.ok(&["keys", "list", "--org", "default", "--format", "json"]);
    assert!(cli.contains(&new_id));
    let logs = gw.flushed_logs().await;
    for secret in [key.as_str(), successor.as_str(), TOKEN] {
        assert!(!logs.contains(secret), "a secret reached the log");
    }
}

#[tokio::test]
async fn errors_have_stable_codes_and_no_database_text() {
    let (_db, _key, _up, gw) = setup().await;
    let org = json!({"name": "Small", "slug": "small", "max_api_keys": 1});
    assert_eq!(call(&gw, Method::POST, "/admin/v1/orgs", org).await.status, 201);
    let keys = "/admin/v1/orgs/small/keys";
    assert_eq!(call(&gw, Method::POST, keys, json!({"name": "one"})).await.status, 201);
    let r = call(&gw, Method::POST, keys, json!({"name": "two"})).await;
    assert_eq!(status_code(&r), (409, "key_limit_reached".into()));
    let r = call(&gw, Method::POST, "/admin/v1/orgs/nope/keys", json!({"name": "x"})).await;
    assert_eq!(status_code(&r), (404, "not_found".into()));

    let orgs = admin_url(&gw, "/admin/v1/orgs");
    let auth = bearer(TOKEN);
    let h = [("authorization", auth.as_str())];
    let bad_json = send(Method::POST, &orgs, &h, "{\"name\": ").await;
    assert_eq!(status_code(&bad_json), (400, "invalid_request".into()));
    for (path, body) in [
        ("/admin/v1/orgs", json!({"name": "X", "slug": "x", "colour": "red"})),
        ("/admin/v1/orgs", json!({"slug": "x"})),
        ("/admin/v1/orgs", json!({"name": "X", "slug": "x", "plan": "gold"})),
        ("/admin/v1/orgs", json!({"name": "X", "slug": "Not A Slug"})),
        ("/admin/v1/orgs", json!({"name": "X", "slug": "x", "max_api_keys": -1})),
        (
            "/admin/v1/orgs",
            json!({"name": "X", "slug": "x", "max_api_keys": "many"}),
        ),
        ("/admin/v1/orgs/small/keys", json!({"name": "k", "expires_in": "soon"})),
        ("/admin/v1/orgs/small/keys", json!({"name": "k", "environment": "prod"})),
        ("/admin/v1/orgs/small/disable", json!({"really": true})),
    ] {
        let r = call(&gw, Method::POST, path, body.clone()).await;
        assert_eq!(status_code(&r), (400, "invalid_request".into()), "{path} {body}");
    }
    // A value the schema refuses (email is varchar(255)): 400, PostgreSQL's text withheld.
    let long = json!({"name": "X", "slug": "long-email", "email": "a".repeat(300)});
    let r = call(&gw, Method::POST, "/admin/v1/orgs", long).await;
    assert_eq!(status_code(&r), (400, "invalid_request".into()));
    let text = String::from_utf8_lossy(&r.body).to_lowercase();
    assert!(
        !text.contains("character varying") && !text.contains("postgres"),
        "{text}"
    );

    let huge = format!("{{\"name\": \"{}\", \"slug\": \"huge\"}}", "x".repeat(70 * 1024));
    let r = send(Method::POST, &orgs, &h, huge).await;
    assert_eq!(status_code(&r), (413, "payload_too_large".into()));

    let r = call(&gw, Method::DELETE, "/admin/v1/orgs", Value::Null).await;
    assert_eq!(status_code(&r), (405, "method_not_allowed".into()));
    assert_eq!(r.header("allow"), Some("POST, GET"));
    let r = call(&gw, Method::GET, "/admin/v1/widgets", Value::Null).await;
    assert_eq!(status_code(&r), (404, "not_found".into()));
    let r = call(&gw, Method::GET, "/admin/v1/orgs?limit=5", Value::Null).await;
    assert_eq!(status_code(&r), (400, "invalid_request".into()));
}

#[tokio::test]
async fn usage_reports_rows_after_traffic() {
    let (db, key, _up, gw) = setup().await;
    for _ in 0..3 {
        assert_eq!(proxy_status(&gw, &key).await, 200);
    }
    let r = get(&gw.url("/status/503"), &[("authorization", &bearer(&key))]).await;
    assert_eq!(r.status, 503);

    let report = "/admin/v1/orgs/default/usage";
    let mut days = Value::Null;
    let written = eventually(Duration::from_secs(10), async || {
        days = call(&gw, Method::GET, report, Value::Null).await.json();
        days["rows"]
            .as_array()
            .and_then(|rows| rows.last())
            .map(|t| t["requests"].clone())
            == Some(json!(4))
    })
    .await;
    assert!(written, "usage rows not reported: {days}");
    assert_eq!(days["by"], "day");
    let rows = days["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "one day and the total: {days}");
    assert_eq!(rows[1]["group"], "TOTAL");
    assert_eq!(rows[1]["errors"], 1);

    let by_endpoint = call(&gw, Method::GET, &format!("{report}?by=endpoint"), Value::Null).await;
    assert_eq!(by_endpoint.status, 200);
    let rows = by_endpoint.json()["rows"].clone();
    let echo = rows
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["group"] == "GET /echo")
        .expect("echo row");
    assert_eq!(echo["requests"], 3);
    // The CLI's report is the same query: the same rows.
    let cli = db.ok(&[
        "usage", "report", "--org", "default", "--by", "endpoint", "--format", "json",
    ]);
    assert_eq!(serde_json::from_str::<Value>(&cli).expect("json"), rows);

    let by_key = call(&gw, Method::GET, &format!("{report}?by=key"), Value::Null)
        .await
        .json();
    assert!(by_key["rows"][0]["group"]
        .as_str()
        .expect("group")
        .starts_with("Default Test Key"));
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let window = call(
        &gw,
        Method::GET,
        &format!("{report}?from={today}&to={today}"),
        Value::Null,
    )
    .await
    .json();
    assert_eq!(
        window["rows"]
            .as_array()
            .and_then(|r| r.last())
            .map(|t| t["requests"].clone()),
        Some(json!(4))
    );
    let past = call(
        &gw,
        Method::GET,
        &format!("{report}?from=2000-01-01&to=2000-01-31"),
        Value::Null,
    )
    .await;
    assert_eq!(past.status, 200);
    let rows = past.json()["rows"].clone();
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "only the total: {rows}");
    assert_eq!((&rows[0]["group"], &rows[0]["requests"]), (&json!("TOTAL"), &json!(0)));

    for bad in [
        "?by=week",
        "?from=2024-02-01&to=2024-01-01",
        "?from=yesterday",
        "?group=day",
    ] {
        let r = call(&gw, Method::GET, &format!("{report}{bad}"), Value::Null).await;
        assert_eq!(status_code(&r), (400, "invalid_request".into()), "{bad}");
    }
    let r = call(&gw, Method::GET, "/admin/v1/orgs/nope/usage", Value::Null).await;
    assert_eq!(status_code(&r), (404, "not_found".into()));
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_refused() {
    let (_db, _key, _up, gw) = setup().await;
    let orgs = admin_url(&gw, "/admin/v1/orgs");
    let same_length = "x".repeat(TOKEN.len());
    let refused: Vec<Vec<(&str, String)>> = vec![
        vec![],
        vec![("authorization", bearer("wrong-token-wrong-token"))],
        vec![("authorization", bearer(&same_length))],
        vec![("authorization", bearer(&TOKEN[..TOKEN.len() - 1]))],
        vec![("authorization", format!("Basic {TOKEN}"))],
        vec![("x-api-key", TOKEN.to_string())],
    ];
    for headers in refused {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        for (method, url) in [
            (Method::GET, orgs.clone()),
            (Method::POST, orgs.clone()),
            (Method::GET, admin_url(&gw, "/admin/v1/no-such-path")),
            (Method::GET, admin_url(&gw, "/admin/v1/openapi.json")),
        ] {
            let r = send(method.clone(), &url, &h, "{}").await;
            assert_eq!(status_code(&r), (401, "unauthorized".into()), "{method} {url} {h:?}");
            assert!(r.header("www-authenticate").is_some());
            assert!(!String::from_utf8_lossy(&r.body).contains(TOKEN), "token echoed");
        }
    }
    // Health and metrics stay open; the OpenAPI document is served with the token.
    assert_eq!(get(&admin_url(&gw, "/healthz"), &[]).await.status, 200);
    let doc = call(&gw, Method::GET, "/admin/v1/openapi.json", Value::Null).await;
    assert_eq!(doc.status, 200);
    assert_eq!(&doc.body[..], keygate::admin::OPENAPI.as_bytes());
    assert!(!gw.flushed_logs().await.contains(TOKEN), "the token reached the log");
}

#[tokio::test]
async fn the_admin_api_is_off_without_a_token() {
    let (db, _key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    for extra in ["", "[admin]\ntoken = \"\"\n"] {
        let gw = Gateway::start(&db, up.port, extra).await;
        for (method, path) in [(Method::GET, "/admin/v1/orgs"), (Method::POST, "/admin/v1/orgs")] {
            let r = call(&gw, method, path, json!({"name": "X", "slug": "x"})).await;
            assert_eq!(status_code(&r), (404, "not_found".into()), "{extra:?}");
        }
        assert_eq!(get(&admin_url(&gw, "/healthz"), &[]).await.status, 200);
    }
}

#[tokio::test]
async fn an_unreachable_database_is_503_without_its_text() {
    let cluster = Cluster::start();
    let db = cluster.fresh_db().await;
    db.migrate();
    let up = Upstream::start(&[]).await;
    let extra = with_admin("[database]\nconnect_timeout = \"500ms\"\npool_wait_timeout = \"500ms\"\n");
    let gw = Gateway::start(&db, up.port, &extra).await;
    assert_eq!(call(&gw, Method::GET, "/admin/v1/orgs", Value::Null).await.status, 200);
    cluster.stop();
    let r = call(&gw, Method::GET, "/admin/v1/orgs", Value::Null).await;
    assert_eq!(status_code(&r), (503, "unavailable".into()));
    let text = String::from_utf8_lossy(&r.body).to_lowercase();
    for leak in [
        "postgres",
        "127.0.0.1",
        "refused",
        "connection",
        &cluster.port.to_string(),
    ] {
        assert!(!text.contains(leak), "database detail `{leak}` in {text}");
    }
    // A bad request is still a 400: bodies are checked before the database is asked.
    let r = call(&gw, Method::POST, "/admin/v1/orgs", json!({"slug": "x"})).await;
    assert_eq!(status_code(&r), (400, "invalid_request".into()));
}

/// The OpenAPI document against the router: every route documented, nothing extra.
#[test]
fn the_openapi_document_matches_the_router() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/admin-openapi.json");
    let text = std::fs::read_to_string(path).expect("docs/admin-openapi.json");
    assert_eq!(text, keygate::admin::OPENAPI, "the served document is the file");
    let doc: Value = serde_json::from_str(&text).expect("valid JSON");
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "openapi version"
    );
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .expect("securitySchemes");
    assert!(schemes.values().any(|s| s["type"] == "http" && s["scheme"] == "bearer"));
    assert!(
        doc["security"].as_array().is_some_and(|s| !s.is_empty()),
        "security applies to all"
    );

    const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
    let paths = doc["paths"].as_object().expect("paths");
    let documented: BTreeSet<(String, String)> = paths
        .iter()
        .flat_map(|(p, item)| {
            let ops = item.as_object().expect("path item");
            ops.keys()
                .filter(|m| METHODS.contains(&m.as_str()))
                .map(|m| (m.clone(), p.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let routed: BTreeSet<(String, String)> = keygate::admin::ROUTES
        .iter()
        .map(|r| (r.method.as_str().to_ascii_lowercase(), r.path.to_string()))
        .collect();
    assert_eq!(
        documented, routed,
        "documented (method, path) pairs differ from the router's"
    );

    for (method, p) in &routed {
        let op = &paths[p.as_str()][method.as_str()];
        assert!(op["responses"]["401"].is_object(), "{method} {p} documents no 401");
        // Every `{param}` in the template is declared on the path or the operation.
        let declared: Vec<String> = [&paths[p.as_str()]["parameters"], &op["parameters"]]
            .iter()
            .filter_map(|v| v.as_array())
            .flatten()
            .map(|prm| resolve(&doc, prm)["name"].as_str().unwrap_or_default().to_string())
            .collect();
        for seg in p.split('/').filter(|s| s.starts_with('{')) {
            let name = seg.trim_matches(|c| c == '{' || c == '}');
            assert!(declared.iter().any(|d| d == name), "{method} {p}: `{name}` undeclared");
        }
    }
    check_refs(&doc, &doc);
}

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str() {
        Some(r) => doc.pointer(r.trim_start_matches('#')).unwrap_or(&Value::Null),
        None => v,
    }
}

/// Every `$ref` in the document points at something that exists.
fn check_refs(doc: &Value, v: &Value) {
    match v {
        Value::Object(map) => {
            if let Some(r) = map.get("$ref").and_then(Value::as_str) {
                assert!(doc.pointer(r.trim_start_matches('#')).is_some(), "dangling $ref {r}");
            }
            map.values().for_each(|x| check_refs(doc, x));
        }
        Value::Array(items) => items.iter().for_each(|x| check_refs(doc, x)),
        _ => {}
    }
}
