//! The admin CLI through the real binary against a real PostgreSQL.

mod common;

use common::*;
use keygate::keys::{KeyDigest, PresentedKey};

fn lines(s: &str) -> Vec<&str> {
    s.lines().filter(|l| !l.trim().is_empty()).collect()
}

#[tokio::test]
async fn seed_is_idempotent_and_prints_the_key_once() {
    let db = fresh_db().await;
    db.migrate();
    let first = db.keygate(&["seed"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let key = stdout(&first).trim().to_string();
    assert!(PresentedKey::parse(&key).is_ok(), "seed printed {key:?}");
    assert!(key.starts_with("pk_test_"));
    assert!(!stderr(&first).contains(&key), "key echoed on stderr");

    let second = db.keygate(&["seed"]);
    assert!(second.status.success());
    assert_eq!(stdout(&second).trim(), "", "second seed printed a key");
    assert!(stderr(&second).contains("nothing created"), "{}", stderr(&second));

    let c = db.client().await;
    let orgs: i64 = c
        .query_one("SELECT count(*) FROM organizations", &[])
        .await
        .expect("q")
        .get(0);
    let keys: i64 = c
        .query_one("SELECT count(*) FROM api_keys", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!((orgs, keys), (1, 1));
    let row = c
        .query_one("SELECT o.name, o.slug, o.plan, o.monthly_request_limit, o.rate_limit_per_minute, o.max_api_keys, k.name, k.environment, k.key_hash, k.key_hint FROM organizations o JOIN api_keys k ON k.organization_id = o.id", &[])
        .await
        .expect("seed rows");
    assert_eq!(row.get::<_, String>(0), "Default Organization");
    assert_eq!(row.get::<_, String>(1), "default");
    assert_eq!(row.get::<_, String>(2), "free");
    assert_eq!(
        (row.get::<_, i32>(3), row.get::<_, i32>(4), row.get::<_, i32>(5)),
        (10_000, 60, 10)
    );
    assert_eq!(row.get::<_, String>(6), "Default Test Key");
    assert_eq!(row.get::<_, String>(7), "test");
    assert_eq!(row.get::<_, String>(8), KeyDigest::of(&key).to_hex());
    assert_eq!(row.get::<_, String>(9), &key[key.len() - 4..]);
}

#[tokio::test]
async fn concurrent_seeds_create_one_of_each() {
    let db = fresh_db().await;
    db.migrate();
    let children: Vec<_> = (0..4)
        .map(|_| {
            db.command(&["seed"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let mut printed = 0;
    for child in children {
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "{}", stderr(&out));
        printed += usize::from(!stdout(&out).trim().is_empty());
    }
    assert_eq!(printed, 1, "exactly one seed run should print a key");
    let c = db.client().await;
    let keys: i64 = c
        .query_one("SELECT count(*) FROM api_keys", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(keys, 1);
}

#[tokio::test]
async fn key_inserted_like_the_python_scripts_is_found_by_the_proxy_lookup() {
    let db = fresh_db().await;
    db.migrate();
    let c = db.client().await;
    // The seed's scripts: uuid4 ids, secrets.token_urlsafe(32), sha256 hex, last 4 as hint.
    let key = "pk_live_0Sb1bSXz5nV-3bEXK1tR4yB2nQm0rT7uV9wXy_Zq1A4";
    assert!(PresentedKey::parse(key).is_ok());
    let org = uuid::Uuid::new_v4();
    c.execute(
        "INSERT INTO organizations (id, name, slug, plan, rate_limit_per_minute) VALUES ($1, 'Py', 'py', 'pro', 120)",
        &[&org],
    )
    .await
    .expect("org");
    c.execute(
        "INSERT INTO api_keys (id, organization_id, key_prefix, key_hash, key_hint, name, environment, scopes, custom_rate_limit)
         VALUES ($1, $2, 'pk_live_', encode(sha256(convert_to($3::text, 'UTF8')), 'hex'), right($3::text, 4), 'py key', 'live', '[\"chat\"]', 30)",
        &[&uuid::Uuid::new_v4(), &org, &key],
    )
    .await
    .expect("key");
    let digest = PresentedKey::parse(key).expect("parse").digest();
    let rec = db.lookup(&digest).await.expect("found").record;
    assert_eq!(rec.organization_id, org);
    assert_eq!(scopes(&rec), ["chat"]);
    assert_eq!(rec.rate_limit_per_minute(), 30);
    assert_eq!(rec.plan, keygate::model::Plan::Pro);
    assert!(rec.org_active && rec.key_active);
    // A different well-formed key is not found.
    let other = KeyDigest::of("pk_live_0Sb1bSXz5nV-3bEXK1tR4yB2nQm0rT7uV9wXy_Zq1A8");
    assert!(db.lookup(&other).await.is_none());
}

#[tokio::test]
async fn orgs_create_list_update_disable() {
    let db = fresh_db().await;
    db.migrate();
    db.ok(&[
        "orgs",
        "create",
        "--name",
        "Acme Inc",
        "--slug",
        "acme",
        "--email",
        "ops@acme.test",
        "--plan",
        "pro",
        "--monthly-limit",
        "500000",
        "--rate-limit",
        "600",
        "--max-keys",
        "3",
    ]);
    let dup = db.keygate(&["orgs", "create", "--name", "Again", "--slug", "acme"]);
    assert!(!dup.status.success());
    assert!(
        stderr(&dup).contains("organization `acme` already exists"),
        "{}",
        stderr(&dup)
    );
    let bad = db.keygate(&["orgs", "create", "--name", "Bad", "--slug", "Not A Slug"]);
    assert!(!bad.status.success());

    let json: serde_json::Value = serde_json::from_str(&db.ok(&["orgs", "list", "--format", "json"])).expect("json");
    let acme = &json.as_array().expect("array")[0];
    assert_eq!(acme["slug"], "acme");
    assert_eq!(acme["plan"], "pro");
    assert_eq!(acme["monthly_request_limit"], 500_000);
    assert_eq!(acme["rate_limit_per_minute"], 600);
    assert_eq!(acme["max_api_keys"], 3);

    db.ok(&["orgs", "update", "acme", "--plan", "enterprise", "--rate-limit", "1200"]);
    let table = db.ok(&["orgs", "list"]);
    assert!(
        table.contains("enterprise") && table.contains("1200") && table.contains("500000"),
        "{table}"
    );

    db.ok(&["orgs", "disable", "acme"]);
    assert!(db.ok(&["orgs", "list"]).contains("disabled"));
    db.ok(&["orgs", "update", "acme", "--enable"]);
    assert!(db.ok(&["orgs", "list"]).contains("active"));

    let missing = db.keygate(&["orgs", "disable", "nope"]);
    assert!(!missing.status.success());
    assert_eq!(lines(&stderr(&missing)), vec!["error: organization `nope` not found"]);
}

#[tokio::test]
async fn keys_create_respects_max_api_keys_and_prints_only_the_key() {
    let db = fresh_db().await;
    db.migrate();
    db.ok(&[
        "orgs",
        "create",
        "--name",
        "Small",
        "--slug",
        "small",
        "--max-keys",
        "2",
    ]);
    let a = db.keygate(&[
        "keys",
        "create",
        "--org",
        "small",
        "--name",
        "a",
        "--env",
        "live",
        "--scopes",
        "chat,admin",
        "--rate-limit",
        "5",
    ]);
    assert!(a.status.success(), "{}", stderr(&a));
    let key_a = stdout(&a);
    assert_eq!(lines(&key_a).len(), 1, "stdout must hold only the key");
    let key_a = key_a.trim().to_string();
    assert!(key_a.starts_with("pk_live_") && PresentedKey::parse(&key_a).is_ok());
    assert!(!stderr(&a).contains(&key_a));
    db.ok(&["keys", "create", "--org", "small", "--name", "b"]);

    let third = db.keygate(&["keys", "create", "--org", "small", "--name", "c"]);
    assert!(!third.status.success());
    assert!(
        stderr(&third).contains("already has 2 active keys"),
        "{}",
        stderr(&third)
    );
    assert!(stdout(&third).is_empty());

    // The listing shows hints, never keys or hashes.
    let list = db.ok(&["keys", "list", "--org", "small"]);
    let hash = KeyDigest::of(&key_a).to_hex();
    assert!(!list.contains(&key_a[8..]) && !list.contains(&hash), "{list}");
    assert!(
        list.contains(&format!("pk_live_…{}", &key_a[key_a.len() - 4..])),
        "{list}"
    );
    assert!(list.contains("chat,admin"), "{list}");
    let json = db.ok(&["keys", "list", "--org", "small", "--format", "json"]);
    assert!(!json.contains(&hash) && !json.contains("key_hash"), "{json}");

    // Revoking frees a slot.
    let id = list
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .expect("id")
        .to_string();
    db.ok(&["keys", "revoke", &id]);
    db.ok(&["keys", "create", "--org", "small", "--name", "c"]);

    let unknown_org = db.keygate(&["keys", "create", "--org", "ghost", "--name", "x"]);
    assert_eq!(
        lines(&stderr(&unknown_org)),
        vec!["error: organization `ghost` not found"]
    );
}

#[tokio::test]
async fn concurrent_key_creation_cannot_exceed_the_cap() {
    let db = fresh_db().await;
    db.migrate();
    db.ok(&["orgs", "create", "--name", "Race", "--slug", "race", "--max-keys", "3"]);
    let children: Vec<_> = (0..8)
        .map(|i| {
            db.command(&["keys", "create", "--org", "race", "--name", &format!("k{i}")])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let ok = children
        .into_iter()
        .filter(|_| true)
        .map(|c| c.wait_with_output().expect("wait"))
        .filter(|o| o.status.success())
        .count();
    assert_eq!(ok, 3);
    let c = db.client().await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM api_keys", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(n, 3);
}

fn scopes(rec: &keygate::model::AuthRecord) -> Vec<&str> {
    rec.scopes().iter().map(AsRef::as_ref).collect()
}

async fn lookup(db: &TestDb, key: &str) -> keygate::model::AuthRecord {
    let d = PresentedKey::parse(key).expect("format").digest();
    db.lookup(&d).await.expect("key exists").record
}

#[tokio::test]
async fn revoke_and_rotate() {
    let (db, key) = seeded_db().await;
    let now = chrono::Utc::now();
    let rec = lookup(&db, &key).await;
    assert_eq!(rec.status(now), keygate::model::KeyStatus::Active);
    let id = rec.key_id.to_string();

    // Rotation: a new key, printed once; the old one lives for the grace period.
    let out = db.keygate(&["keys", "rotate", &id, "--grace", "1h"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let new_key = stdout(&out).trim().to_string();
    assert!(PresentedKey::parse(&new_key).is_ok() && new_key != key);
    let old = lookup(&db, &key).await;
    let new = lookup(&db, &new_key).await;
    assert_eq!(old.status(chrono::Utc::now()), keygate::model::KeyStatus::Active);
    let expires = old.expires_at().expect("old key now expires");
    let grace = expires - chrono::Utc::now();
    assert!(
        grace > chrono::Duration::minutes(59) && grace <= chrono::Duration::hours(1),
        "{grace:?}"
    );
    assert_eq!(
        old.status(expires + chrono::Duration::seconds(1)),
        keygate::model::KeyStatus::Expired
    );
    assert_eq!(new.status(chrono::Utc::now()), keygate::model::KeyStatus::Active);
    assert_eq!((new.organization_id, scopes(&new)), (old.organization_id, scopes(&old)));
    assert!(new.expires_at().is_none());

    // A zero grace ends the old key at once.
    let out = db.keygate(&["keys", "rotate", &new.key_id.to_string(), "--grace", "0s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let newest = stdout(&out).trim().to_string();
    assert_eq!(
        lookup(&db, &new_key).await.status(chrono::Utc::now()),
        keygate::model::KeyStatus::Expired
    );

    // Revocation is immediate and idempotent.
    let newest_id = lookup(&db, &newest).await.key_id.to_string();
    db.ok(&["keys", "revoke", &newest_id]);
    assert_eq!(
        lookup(&db, &newest).await.status(chrono::Utc::now()),
        keygate::model::KeyStatus::Revoked
    );
    let again = db.keygate(&["keys", "revoke", &newest_id]);
    assert!(again.status.success());
    assert!(stderr(&again).contains("already revoked"));
    // A revoked key cannot be rotated back to life.
    let out = db.keygate(&["keys", "rotate", &newest_id]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is revoked"), "{}", stderr(&out));
    let list = db.ok(&["keys", "list", "--org", "default"]);
    assert!(
        list.contains("revoked") && list.contains("expired") && list.contains("active"),
        "{list}"
    );

    let ghost = uuid::Uuid::now_v7().to_string();
    let out = db.keygate(&["keys", "revoke", &ghost]);
    assert_eq!(lines(&stderr(&out)), vec![format!("error: API key {ghost} not found")]);
}

#[tokio::test]
async fn expiring_keys_expire() {
    let (db, _) = seeded_db().await;
    let key = db.ok(&[
        "keys",
        "create",
        "--org",
        "default",
        "--name",
        "short",
        "--expires-in",
        "1s",
    ]);
    assert_eq!(
        lookup(&db, &key).await.status(chrono::Utc::now()),
        keygate::model::KeyStatus::Active
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        lookup(&db, &key).await.status(chrono::Utc::now()),
        keygate::model::KeyStatus::Expired
    );
}

#[tokio::test]
async fn clear_errors_for_operators() {
    // Database unreachable: one line, the URL shown with its password masked.
    let port = free_port();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["orgs", "list"])
        .env("DATABASE_URL", format!("postgres://admin:hunter2@127.0.0.1:{port}/kg"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(lines(&err).len(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "cannot connect to database postgres://admin:***@127.0.0.1:{port}/kg"
        )),
        "{err}"
    );
    assert!(!err.contains("hunter2"));

    // Schema not migrated.
    let db = fresh_db().await;
    let out = db.keygate(&["keys", "list", "--org", "default"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("run `keygate migrate up`"), "{}", stderr(&out));

    // Invalid arguments are usage errors (exit 2), before any database work.
    db.migrate();
    for args in [
        vec!["keys", "create", "--org", "default"],
        vec!["keys", "create", "--org", "default", "--name", "x", "--env", "prod"],
        vec![
            "keys",
            "create",
            "--org",
            "default",
            "--name",
            "x",
            "--expires-in",
            "soon",
        ],
        vec!["keys", "revoke", "not-a-uuid"],
        vec!["orgs", "create", "--name", "x", "--slug", "x", "--plan", "gold"],
    ] {
        let out = db.keygate(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    // No database configured at all.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["orgs", "list"])
        .env_remove("DATABASE_URL")
        .env_remove("KEYGATE_CONFIG")
        .output()
        .expect("run");
    assert!(stderr(&out).contains("no database configured"), "{}", stderr(&out));
}

#[tokio::test]
async fn check_config_validates_files() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/keygate.example.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["check-config", "--config", example])
        .env_remove("DATABASE_URL")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", stderr(&out));

    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[upstream]\nurl = \"http://127.0.0.1:1\"\n[database]\nurl = \"postgres://x/y\"\n[server]\nheader_read_timeout = \"never\"\n").expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["check-config", "--config"])
        .arg(&bad)
        .env_remove("DATABASE_URL")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        stderr(&out).starts_with("error: config key `server.header_read_timeout`"),
        "{}",
        stderr(&out)
    );
}
