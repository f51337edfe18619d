//! SIGHUP reload on a real process: a changed route applies, a broken file is refused
//! with its key named while the old config keeps serving, pricing and identity header
//! names change for new requests, and restart-only changes are reported, not applied.

mod common;

use std::time::Duration;

use common::net::*;
use common::*;

/// Edits the gateway's config file in place (write + rename, as editors and config
/// management do, so keygate never reads half a file).
fn edit(gw: &Gateway, change: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(&gw.config).expect("read config");
    let tmp = gw.config.with_extension("toml.new");
    std::fs::write(&tmp, change(text)).expect("write config");
    std::fs::rename(&tmp, &gw.config).expect("rename config");
}

fn replace(from: &'static str, to: &'static str) -> impl FnOnce(String) -> String {
    move |text| {
        assert!(text.contains(from), "config lacks {from:?}:\n{text}");
        text.replacen(from, to, 1)
    }
}

fn hangup(gw: &Gateway) {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &gw.proc.child.id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(ok.success());
}

async fn metrics(gw: &Gateway) -> String {
    let r = get(&format!("http://127.0.0.1:{}/metrics", gw.admin_port), &[]).await;
    String::from_utf8_lossy(&r.body).into_owned()
}

async fn logged(gw: &Gateway, needle: &str) -> bool {
    eventually(Duration::from_secs(5), async || gw.logs().contains(needle)).await
}

const ECHO_NEEDS_CHAT: &str = "[[routes]]\nprefix = \"/echo\"\nscopes = [\"chat\"]\n";

#[tokio::test]
async fn a_changed_route_applies_on_sighup() {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    let gw = Gateway::start(&db, up.port, ECHO_NEEDS_CHAT).await;
    let auth = bearer(&key);
    assert_eq!(get(&gw.url("/echo"), &[("authorization", &auth)]).await.status, 200);
    assert_eq!(gw.ready_json().await["config"]["generation"], 1);

    edit(&gw, replace("scopes = [\"chat\"]", "scopes = [\"admin\"]"));
    hangup(&gw);
    let refused = eventually(Duration::from_secs(5), async || {
        let r = get(&gw.url("/echo"), &[("authorization", &auth)]).await;
        r.status == 403 && r.error_code() == "insufficient_scope"
    })
    .await;
    assert!(
        refused,
        "the seeded key (scope chat) still reaches /echo: {}",
        gw.logs()
    );
    assert_eq!(gw.ready_json().await["config"]["generation"], 2);
    assert!(metrics(&gw)
        .await
        .contains("keygate_config_reloads_total{result=\"ok\"} 1"));
    assert!(
        gw.wait_log("config reloaded", Duration::from_secs(5)).await,
        "{}",
        gw.logs()
    );
}

#[tokio::test]
async fn a_broken_file_is_refused_and_the_old_config_keeps_serving() {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    let gw = Gateway::start(&db, up.port, ECHO_NEEDS_CHAT).await;
    let auth = bearer(&key);
    // Valid TOML, invalid config: the new scope must not apply without the prefix fix.
    edit(&gw, |t| {
        replace("prefix = \"/echo\"", "prefix = \"echo\"")(t).replacen("[\"chat\"]", "[\"admin\"]", 1)
    });
    hangup(&gw);
    assert!(
        logged(&gw, "config reload refused").await,
        "no refusal logged: {}",
        gw.logs()
    );
    let logs = gw.logs();
    assert!(logs.contains("routes[0].prefix"), "the bad key is not named: {logs}");
    assert_eq!(get(&gw.url("/echo"), &[("authorization", &auth)]).await.status, 200);
    assert_eq!(gw.ready_json().await["config"]["generation"], 1);
    assert!(metrics(&gw)
        .await
        .contains("keygate_config_reloads_total{result=\"error\"} 1"));

    // Not TOML at all: refused the same way, and a later good file still applies.
    edit(&gw, |t| format!("{t}\n[server\n"));
    hangup(&gw);
    assert!(logged(&gw, "is not valid TOML").await, "{}", gw.logs());
    assert_eq!(get(&gw.url("/echo"), &[("authorization", &auth)]).await.status, 200);
    edit(&gw, |t| {
        t.replace("\n[server\n", "\n")
            .replacen("prefix = \"echo\"", "prefix = \"/echo\"", 1)
    });
    hangup(&gw);
    let applied = eventually(Duration::from_secs(5), async || {
        get(&gw.url("/echo"), &[("authorization", &auth)]).await.status == 403
    })
    .await;
    assert!(applied, "{}", gw.logs());
}

#[tokio::test]
async fn pricing_and_identity_headers_change_and_restart_only_settings_are_reported() {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    let gw = Gateway::start(
        &db,
        up.port,
        "[pricing.default]\nprompt_per_1k = 0.0\ncompletion_per_1k = 0.0\n",
    )
    .await;
    let auth = bearer(&key);
    let message = r#"{"message": "one two three"}"#;
    assert_eq!(
        post(&gw.url("/chat"), &[("authorization", &auth)], message)
            .await
            .status,
        200
    );
    let echo = get(&gw.url("/echo"), &[("authorization", &auth)]).await.json();
    assert!(echo["headers"]["x-keygate-key-id"].is_string(), "{echo}");

    edit(&gw, |t| {
        let t = replace("prompt_per_1k = 0.0", "prompt_per_1k = 1.0")(t);
        let t = replace("completion_per_1k = 0.0", "completion_per_1k = 2.0")(t);
        let t = replace("shutdown_grace = \"10s\"", "shutdown_grace = \"11s\"")(t);
        format!("{t}\n[identity_headers]\nkey_id = \"x-kg-key\"\n")
    });
    hangup(&gw);
    let renamed = eventually(Duration::from_secs(5), async || {
        let echo = get(&gw.url("/echo"), &[("authorization", &auth)]).await.json();
        echo["headers"]["x-kg-key"].is_string() && echo["headers"]["x-keygate-key-id"].is_null()
    })
    .await;
    assert!(renamed, "the upstream never saw x-kg-key: {}", gw.logs());
    assert_eq!(
        post(&gw.url("/chat"), &[("authorization", &auth)], message)
            .await
            .status,
        200
    );

    // The demo upstream counts words: 3 prompt tokens, 4 completion ("echo: one two three").
    let client = db.client().await;
    let mut costs = Vec::new();
    let written = eventually(Duration::from_secs(10), async || {
        let rows = client
            .query(
                "SELECT (cost_usd * 1000000)::bigint FROM api_key_usage WHERE endpoint = '/chat' ORDER BY \"timestamp\"",
                &[],
            )
            .await
            .expect("query usage");
        costs = rows.iter().map(|r| r.get::<_, Option<i64>>(0)).collect();
        costs.len() == 2
    })
    .await;
    assert!(written, "usage rows: {costs:?}");
    assert_eq!(
        costs,
        [Some(0), Some(3 * 1000 + 4 * 2000)],
        "micro-dollars before and after"
    );

    assert!(logged(&gw, "need a restart").await, "{}", gw.logs());
    let warning = gw
        .logs()
        .lines()
        .find(|l| l.contains("need a restart"))
        .unwrap_or_default()
        .to_string();
    assert!(warning.contains("server.shutdown_grace"), "{warning}");
    assert!(!warning.contains("pricing"), "{warning}");
}
