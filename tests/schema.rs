//! Migrations against a real PostgreSQL: the seed's rollback test, concurrent starts,
//! adoption of a database made by the seed's Alembic migration.

mod common;

use common::*;

const SEED_TABLES: [&str; 4] = ["organizations", "api_keys", "api_key_usage", "rate_limit_tracking"];

async fn columns(db: &TestDb, table: &str) -> Vec<String> {
    let c = db.client().await;
    c.query(
        "SELECT column_name::text FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1",
        &[&table],
    )
    .await
    .expect("columns")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn table_exists(db: &TestDb, table: &str) -> bool {
    db.client()
        .await
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .expect("regclass")
        .get(0)
}

#[tokio::test]
async fn up_down_up_like_the_seed_rollback_test() {
    let db = fresh_db().await;
    db.migrate();
    let expected: [(&str, &[&str]); 4] = [
        (
            "organizations",
            &[
                "id",
                "name",
                "slug",
                "email",
                "plan",
                "is_active",
                "monthly_request_limit",
                "rate_limit_per_minute",
                "max_api_keys",
                "created_at",
                "updated_at",
            ],
        ),
        (
            "api_keys",
            &[
                "id",
                "organization_id",
                "key_prefix",
                "key_hash",
                "key_hint",
                "name",
                "description",
                "environment",
                "is_active",
                "expires_at",
                "revoked_at",
                "scopes",
                "custom_rate_limit",
                "total_requests",
                "last_used_at",
                "created_at",
            ],
        ),
        (
            "api_key_usage",
            &[
                "id",
                "api_key_id",
                "organization_id",
                "timestamp",
                "endpoint",
                "method",
                "status_code",
                "response_time_ms",
                "tokens_used",
                "cost_usd",
                "ip_address",
                "user_agent",
                "error_message",
                "error_code",
            ],
        ),
        (
            "rate_limit_tracking",
            &[
                "id",
                "api_key_id",
                "window_start",
                "window_end",
                "request_count",
                "created_at",
                "updated_at",
            ],
        ),
    ];
    for (table, cols) in expected {
        let have = columns(&db, table).await;
        for c in cols {
            assert!(have.iter().any(|h| h == c), "{table}.{c} missing");
        }
    }
    let status = db.ok(&["migrate", "status"]);
    let states: Vec<&str> = status
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(states.len(), keygate::db::migrate::MIGRATIONS.len(), "{status}");
    assert!(states.iter().all(|s| *s == "applied"), "{status}");

    let out = db.keygate(&["migrate", "down", "--all"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for t in SEED_TABLES {
        assert!(!table_exists(&db, t).await, "{t} should be gone");
    }
    let status = db.ok(&["migrate", "status"]);
    assert!(status.lines().skip(1).all(|l| l.contains("pending")), "{status}");

    db.migrate();
    for t in SEED_TABLES {
        assert!(table_exists(&db, t).await, "{t} should be back");
    }
    // Idempotent: a second up applies nothing.
    let out = db.keygate(&["migrate", "up"]);
    assert!(stderr(&out).contains("up to date"), "{}", stderr(&out));
}

#[tokio::test]
async fn down_by_steps_removes_only_the_newest() {
    let db = fresh_db().await;
    db.migrate();
    let c = db.client().await;
    let before: i64 = c
        .query_one("SELECT count(*) FROM keygate_schema_migrations", &[])
        .await
        .expect("q")
        .get(0);
    let out = db.keygate(&["migrate", "down", "--steps", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let after: i64 = c
        .query_one("SELECT count(*) FROM keygate_schema_migrations", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(after, before - 1);
    assert!(table_exists(&db, "organizations").await);
    // Admin commands refuse to run on a schema that is behind.
    let out = db.keygate(&["orgs", "list"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("run `keygate migrate up`"), "{}", stderr(&out));
}

#[tokio::test]
async fn schema_enforces_what_the_product_relies_on() {
    let (db, _key) = seeded_db().await;
    let c = db.client().await;
    let org: uuid::Uuid = c
        .query_one("SELECT id FROM organizations WHERE slug = 'default'", &[])
        .await
        .expect("org")
        .get(0);
    // Unique slug.
    let dup = c
        .execute("INSERT INTO organizations (name, slug) VALUES ('x', 'default')", &[])
        .await;
    assert!(dup.is_err(), "duplicate slug accepted");
    // Plan check.
    let bad = c
        .execute(
            "INSERT INTO organizations (name, slug, plan) VALUES ('x', 'x', 'gold')",
            &[],
        )
        .await;
    assert!(bad.is_err(), "unknown plan accepted");
    // Unique key hash.
    let hash: String = c
        .query_one("SELECT key_hash FROM api_keys LIMIT 1", &[])
        .await
        .expect("key")
        .get(0);
    let dup = c
        .execute("INSERT INTO api_keys (organization_id, key_prefix, key_hash, key_hint, name) VALUES ($1, 'pk_test_', $2, 'abcd', 'dup')", &[&org, &hash])
        .await;
    assert!(dup.is_err(), "duplicate key hash accepted");
    // One counter row per key and window.
    let key: uuid::Uuid = c
        .query_one("SELECT id FROM api_keys LIMIT 1", &[])
        .await
        .expect("key")
        .get(0);
    let ins = "INSERT INTO rate_limit_tracking (api_key_id, window_start, window_end, request_count) VALUES ($1, '2026-01-01T00:00:00Z', '2026-01-01T00:01:00Z', 1)";
    c.execute(ins, &[&key]).await.expect("first window row");
    assert!(c.execute(ins, &[&key]).await.is_err(), "duplicate window accepted");
    // updated_at is kept by the database.
    let before: chrono::DateTime<chrono::Utc> = c
        .query_one("SELECT updated_at FROM organizations WHERE id = $1", &[&org])
        .await
        .expect("q")
        .get(0);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    c.execute(
        "UPDATE organizations SET email = 'ops@example.com' WHERE id = $1",
        &[&org],
    )
    .await
    .expect("update");
    let after: chrono::DateTime<chrono::Utc> = c
        .query_one("SELECT updated_at FROM organizations WHERE id = $1", &[&org])
        .await
        .expect("q")
        .get(0);
    assert!(after > before, "updated_at not maintained");
    // Usage rows are billing records: deleting their organisation is refused.
    c.execute(
        "INSERT INTO api_key_usage (api_key_id, organization_id, endpoint, method, status_code) VALUES ($1, $2, '/chat', 'POST', 200)",
        &[&key, &org],
    )
    .await
    .expect("usage row");
    assert!(
        c.execute("DELETE FROM organizations WHERE id = $1", &[&org])
            .await
            .is_err(),
        "billing rows cascaded away"
    );
    // Indexes for usage by organisation and by key over time.
    let idx: Vec<String> = c
        .query("SELECT indexdef FROM pg_indexes WHERE tablename = 'api_key_usage'", &[])
        .await
        .expect("indexes")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        idx.iter().any(|d| d.contains("(organization_id, \"timestamp\")")),
        "{idx:?}"
    );
    assert!(idx.iter().any(|d| d.contains("(api_key_id, \"timestamp\")")), "{idx:?}");
}

#[tokio::test]
async fn concurrent_migrate_up_is_safe() {
    for _ in 0..3 {
        let db = fresh_db().await;
        let children: Vec<_> = (0..3)
            .map(|_| {
                db.command(&["migrate", "up"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("spawn")
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().expect("wait");
            assert!(out.status.success(), "concurrent migrate failed: {}", stderr(&out));
        }
        let c = db.client().await;
        let rows = c
            .query(
                "SELECT version, count(*) FROM keygate_schema_migrations GROUP BY version",
                &[],
            )
            .await
            .expect("q");
        assert_eq!(rows.len(), keygate::db::migrate::MIGRATIONS.len());
    }
}

/// What the seed's Alembic migration and Python scripts would have left behind:
/// naive timestamps, JSON scopes, 32-bit counters, uuid4 ids, an alembic_version row.
const ALEMBIC_SCHEMA: &str = r#"
CREATE TABLE alembic_version (version_num varchar(32) NOT NULL PRIMARY KEY);
INSERT INTO alembic_version VALUES ('083cef45dd3e');
CREATE TABLE organizations (
    id uuid PRIMARY KEY, name varchar(255) NOT NULL, slug varchar(100) NOT NULL UNIQUE, email varchar(255),
    plan varchar(50), is_active boolean, monthly_request_limit integer, rate_limit_per_minute integer,
    max_api_keys integer, created_at timestamp without time zone, updated_at timestamp without time zone);
CREATE TABLE api_keys (
    id uuid PRIMARY KEY, organization_id uuid NOT NULL REFERENCES organizations(id),
    key_prefix varchar(20) NOT NULL, key_hash varchar(64) NOT NULL, key_hint varchar(4) NOT NULL,
    name varchar(255) NOT NULL, description text, environment varchar(20), is_active boolean,
    expires_at timestamp without time zone, revoked_at timestamp without time zone, scopes json,
    custom_rate_limit integer, total_requests integer, last_used_at timestamp without time zone,
    created_at timestamp without time zone, updated_by varchar(255), metadata json, notes text);
CREATE UNIQUE INDEX ix_api_keys_key_hash ON api_keys (key_hash);
CREATE TABLE api_key_usage (
    id uuid PRIMARY KEY, api_key_id uuid NOT NULL REFERENCES api_keys(id),
    organization_id uuid NOT NULL REFERENCES organizations(id), timestamp timestamp without time zone,
    endpoint varchar(255), method varchar(10), status_code integer, response_time_ms integer,
    tokens_used integer, cost_usd numeric(10, 6), ip_address varchar(45), user_agent varchar(500),
    error_message text, error_code varchar(50));
CREATE TABLE rate_limit_tracking (
    id uuid PRIMARY KEY, api_key_id uuid NOT NULL REFERENCES api_keys(id),
    window_start timestamp without time zone NOT NULL, window_end timestamp without time zone NOT NULL,
    request_count integer, created_at timestamp without time zone, updated_at timestamp without time zone);
INSERT INTO organizations VALUES ('6f1c2a56-8d0e-4c8e-9a51-2f0b7d1e3c11', 'Default Organization', 'default', NULL,
    'free', true, 10000, 60, 10, '2026-01-27 10:00:00', '2026-01-27 10:00:00');
INSERT INTO api_keys (id, organization_id, key_prefix, key_hash, key_hint, name, environment, is_active, scopes, total_requests, created_at)
VALUES ('0b9f5d0a-7a43-4c52-9a0d-52e1c9f5a001', '6f1c2a56-8d0e-4c8e-9a51-2f0b7d1e3c11', 'pk_test_',
    'd88111145654b48ca4b2e2926444eb651e1d3842781fac06464bc4d05008e489', 'zh3g', 'Default Test Key', 'test', true,
    '["read", "write"]', 0, '2026-01-27 10:00:00');
INSERT INTO rate_limit_tracking VALUES
    ('1b9f5d0a-7a43-4c52-9a0d-52e1c9f5a001', '0b9f5d0a-7a43-4c52-9a0d-52e1c9f5a001', '2026-01-27 10:00:00', '2026-01-27 10:01:00', 3, NULL, NULL),
    ('2b9f5d0a-7a43-4c52-9a0d-52e1c9f5a001', '0b9f5d0a-7a43-4c52-9a0d-52e1c9f5a001', '2026-01-27 10:00:00', '2026-01-27 10:01:00', 4, NULL, NULL);
"#;

const SEED_KEY: &str = "pk_test_Y4weymaKsDhxAsAbxyYBUsstBfVX5DETxxqpi7nzh3g";

#[tokio::test]
async fn alembic_database_is_adopted_not_clobbered() {
    let db = fresh_db().await;
    db.client()
        .await
        .batch_execute(ALEMBIC_SCHEMA)
        .await
        .expect("alembic schema");
    let out = db.keygate(&["migrate", "up"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("adopted existing 0001_baseline"),
        "{}",
        stderr(&out)
    );
    let status = db.ok(&["migrate", "status"]);
    assert!(status.contains("adopted"), "{status}");

    // Data kept, types normalised, duplicate counter windows folded.
    let c = db.client().await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM organizations", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(n, 1);
    let (rows, total): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*), sum(request_count)::bigint FROM rate_limit_tracking",
                &[],
            )
            .await
            .expect("q");
        (r.get(0), r.get(1))
    };
    assert_eq!((rows, total), (1, 7));
    let created: chrono::DateTime<chrono::Utc> = c
        .query_one("SELECT created_at FROM organizations", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(created.to_rfc3339(), "2026-01-27T10:00:00+00:00");

    // The seed's key authenticates through the lookup the proxy uses.
    let digest = keygate::keys::PresentedKey::parse(SEED_KEY).expect("format").digest();
    let rec = db.lookup(&digest).await.expect("found").record;
    assert_eq!(
        rec.scopes().iter().map(AsRef::as_ref).collect::<Vec<&str>>(),
        ["read", "write"]
    );
    assert_eq!(rec.rate_limit_per_minute(), 60);
    assert_eq!(rec.key_hint(), "zh3g");

    // The admin CLI works on the adopted database, and seeding finds the existing data.
    let out = db.keygate(&["seed"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).trim().is_empty(), "seed created a key on an adopted db");
    let list = db.ok(&["keys", "list", "--org", "default"]);
    assert!(list.contains("pk_test_…zh3g") && list.contains("active"), "{list}");

    // Rolling all the way back drops the seed's tables, as `alembic downgrade` did.
    let out = db.keygate(&["migrate", "down", "--all"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!table_exists(&db, "api_keys").await);
}

#[tokio::test]
async fn partial_seed_schema_is_refused_with_what_is_missing() {
    let db = fresh_db().await;
    db.client()
        .await
        .batch_execute("CREATE TABLE organizations (id uuid PRIMARY KEY, name text)")
        .await
        .expect("partial schema");
    let out = db.keygate(&["migrate", "up"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("organizations lacks slug") && err.contains("table api_keys is missing"),
        "{err}"
    );
}

/// The SQLSTATE of a refused statement.
fn sqlstate(r: Result<u64, tokio_postgres::Error>) -> Option<String> {
    r.err().and_then(|e| e.code().map(|c| c.code().to_string()))
}

/// One usage row for `($1, $2)`, the shape the reference checks are tested with.
const USAGE_INSERT: &str = "INSERT INTO api_key_usage (api_key_id, organization_id, endpoint, method, status_code) \
                            VALUES ($1, $2, '/chat', 'POST', 200)";

/// The seeded key's id and its organisation's.
async fn seeded_key(c: &tokio_postgres::Client) -> (uuid::Uuid, uuid::Uuid) {
    let r = c
        .query_one("SELECT id, organization_id FROM api_keys LIMIT 1", &[])
        .await
        .expect("key");
    (r.get(0), r.get(1))
}

/// Usage rows reference keys and organisations through statement-level checks
/// (migration 7, index-driven since 8) rather than foreign keys: what a foreign key
/// refused is still refused, with the same SQLSTATE, and what it allowed is still allowed.
#[tokio::test]
async fn usage_references_hold_like_foreign_keys() {
    let (db, _key) = seeded_db().await;
    let c = db.client().await;
    let (key, org) = seeded_key(&c).await;
    let usage = USAGE_INSERT;
    let nobody = uuid::Uuid::now_v7();
    assert_eq!(
        sqlstate(c.execute(usage, &[&nobody, &org]).await).as_deref(),
        Some("23503")
    );
    assert_eq!(
        sqlstate(c.execute(usage, &[&key, &nobody]).await).as_deref(),
        Some("23503")
    );
    c.execute(usage, &[&key, &org]).await.expect("a valid row");
    let repoint = "UPDATE api_key_usage SET api_key_id = $1";
    assert_eq!(sqlstate(c.execute(repoint, &[&nobody]).await).as_deref(), Some("23503"));
    // Deleting, re-keying or truncating what a usage row names is refused.
    let del_key = "DELETE FROM api_keys WHERE id = $1";
    assert_eq!(sqlstate(c.execute(del_key, &[&key]).await).as_deref(), Some("23503"));
    assert_eq!(
        sqlstate(
            c.execute("UPDATE api_keys SET id = $2 WHERE id = $1", &[&key, &nobody])
                .await
        )
        .as_deref(),
        Some("23503")
    );
    c.execute("UPDATE api_keys SET id = id, name = name WHERE id = $1", &[&key])
        .await
        .expect("an update that keeps the id");
    assert_eq!(
        sqlstate(c.execute("DELETE FROM organizations WHERE id = $1", &[&org]).await).as_deref(),
        Some("23503")
    );
    assert!(c.batch_execute("TRUNCATE api_keys CASCADE").await.is_err());
    assert!(c.batch_execute("TRUNCATE organizations CASCADE").await.is_err());
    // A key without usage rows can still be deleted.
    let spare: uuid::Uuid = c
        .query_one(
            "INSERT INTO api_keys (id, organization_id, key_prefix, key_hash, key_hint, name) \
             VALUES ($1, $2, 'pk_test_', repeat('b', 64), 'bbbb', 'spare') RETURNING id",
            &[&uuid::Uuid::now_v7(), &org],
        )
        .await
        .expect("spare key")
        .get(0);
    assert_eq!(c.execute(del_key, &[&spare]).await.expect("unused key deleted"), 1);

    // Racing a delete: whichever locks the key first, no row is left naming a gone key.
    for insert_first in [true, false] {
        let spare: uuid::Uuid = c
            .query_one(
                "INSERT INTO api_keys (id, organization_id, key_prefix, key_hash, key_hint, name) \
                 VALUES ($1, $2, 'pk_test_', md5(random()::text) || md5(random()::text), 'cccc', 'race') RETURNING id",
                &[&uuid::Uuid::now_v7(), &org],
            )
            .await
            .expect("race key")
            .get(0);
        let (mut first, second) = (db.client().await, db.client().await);
        let tx = first.transaction().await.expect("begin");
        if insert_first {
            tx.execute(usage, &[&spare, &org]).await.expect("usage row");
        } else {
            tx.execute(del_key, &[&spare]).await.expect("delete");
        }
        // The other statement must wait for the first transaction.
        let waiting = tokio::spawn(async move {
            let r = if insert_first {
                second.execute(del_key, &[&spare]).await
            } else {
                second.execute(usage, &[&spare, &org]).await
            };
            sqlstate(r)
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            !waiting.is_finished(),
            "the second statement did not wait (insert first: {insert_first})"
        );
        tx.commit().await.expect("commit");
        let refused = waiting.await.expect("join");
        assert_eq!(refused.as_deref(), Some("23503"), "insert first: {insert_first}");
        let orphans: i64 = c
            .query_one(
                "SELECT count(*) FROM api_key_usage u WHERE NOT EXISTS (SELECT 1 FROM api_keys k WHERE k.id = u.api_key_id)",
                &[],
            )
            .await
            .expect("orphans")
            .get(0);
        assert_eq!(orphans, 0, "insert first: {insert_first}");
    }
}

/// The body (`prosrc`) that a migration's SQL gives `keygate_usage_check_references()`.
fn check_function_body(version: i32) -> &'static str {
    let sql = keygate::db::migrate::MIGRATIONS
        .iter()
        .find(|m| m.version == version)
        .expect("migration")
        .up;
    let at = sql
        .find("FUNCTION keygate_usage_check_references()")
        .expect("the function");
    let start = at + sql[at..].find("$$").expect("body start") + 2;
    let end = start + sql[start..].find("$$").expect("body end");
    &sql[start..end]
}

/// What the database holds for the check function: its body and its settings.
async fn check_function(c: &tokio_postgres::Client) -> (String, Option<Vec<String>>) {
    let r = c
        .query_one(
            "SELECT prosrc, proconfig::text[] FROM pg_proc WHERE oid = 'keygate_usage_check_references'::regproc",
            &[],
        )
        .await
        .expect("pg_proc");
    (r.get(0), r.get(1))
}

/// One COPY of usage rows, as the writer's fast path sends them (binary).
async fn copy_usage(c: &mut tokio_postgres::Client, rows: &[(uuid::Uuid, uuid::Uuid)]) -> Option<String> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::Type;
    let result: Result<u64, tokio_postgres::Error> = async {
        let tx = c.transaction().await?;
        let sink = tx
            .copy_in(
                "COPY api_key_usage (api_key_id, organization_id, endpoint, method, status_code) \
                 FROM STDIN (FORMAT binary)",
            )
            .await?;
        let writer = BinaryCopyInWriter::new(
            sink,
            &[Type::UUID, Type::UUID, Type::VARCHAR, Type::VARCHAR, Type::INT4],
        );
        let mut writer = std::pin::pin!(writer);
        for (key, org) in rows {
            writer.as_mut().write(&[key, org, &"/chat", &"POST", &200i32]).await?;
        }
        let n = writer.finish().await?;
        tx.commit().await?;
        Ok(n)
    }
    .await;
    sqlstate(result)
}

/// Migration 8's check finds keys through the primary key, whatever a batch holds: a
/// batch of many distinct keys passes, one missing key or organisation among them refuses
/// the whole batch, and the lock query's generic plan is an index scan at 10,000 keys.
#[tokio::test]
async fn usage_reference_checks_by_index_at_many_keys() {
    let db = fresh_db().await;
    db.migrate();
    let mut c = db.client().await;
    c.batch_execute(
        "INSERT INTO organizations (id, name, slug) \
             SELECT gen_random_uuid(), 'org ' || g, 'org-' || g FROM generate_series(1, 100) g;
         INSERT INTO api_keys (id, organization_id, key_prefix, key_hash, key_hint, name) \
             SELECT gen_random_uuid(), o.id, 'pk_test_', md5(o.id::text || g) || md5(g || o.id::text), 'abcd', 'k' || g \
             FROM organizations o, generate_series(1, 100) g;
         ANALYZE organizations, api_keys;",
    )
    .await
    .expect("10,000 keys");

    // The function is 0008's, pinned to its generic plan, and that plan probes the index.
    let (body, config) = check_function(&c).await;
    assert_eq!(body, check_function_body(8));
    assert_eq!(config, Some(vec!["plan_cache_mode=force_generic_plan".to_string()]));
    let lock = "SELECT 1 FROM api_keys WHERE id = ANY ($1) ORDER BY id FOR KEY SHARE";
    assert!(
        check_function_body(8).contains(&lock.replace("SELECT", "PERFORM").replace("$1", "keys")),
        "the lock query below is not the migration's"
    );
    c.batch_execute(&format!(
        "SET plan_cache_mode = force_generic_plan; PREPARE kg_lock(uuid[]) AS {lock}"
    ))
    .await
    .expect("prepare");
    let some: Vec<String> = c
        .query("SELECT id::text FROM api_keys ORDER BY md5(id::text) LIMIT 300", &[])
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan: Vec<String> = c
        .query(&format!("EXPLAIN EXECUTE kg_lock('{{{}}}')", some.join(",")), &[])
        .await
        .expect("explain")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Scan on api_keys_pkey") || plan.contains("Index Scan using api_keys_pkey"),
        "{plan}"
    );
    assert!(!plan.contains("Seq Scan"), "{plan}");
    c.batch_execute("DEALLOCATE kg_lock; RESET plan_cache_mode")
        .await
        .expect("reset");

    // 300 distinct keys, two rows each, in many organisations; more than five times in
    // one session, so a plan cache that switched plans would be exercised too.
    let keys: Vec<(uuid::Uuid, uuid::Uuid)> = c
        .query(
            "SELECT id, organization_id FROM api_keys ORDER BY md5(id::text) LIMIT 300",
            &[],
        )
        .await
        .expect("keys")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let batch: Vec<(uuid::Uuid, uuid::Uuid)> = keys.iter().chain(keys.iter()).copied().collect();
    for _ in 0..7 {
        assert_eq!(
            copy_usage(&mut c, &batch).await,
            None,
            "a batch of valid keys was refused"
        );
    }
    let stored = async |c: &tokio_postgres::Client| -> i64 {
        c.query_one("SELECT count(*) FROM api_key_usage", &[])
            .await
            .expect("count")
            .get(0)
    };
    assert_eq!(stored(&c).await, 7 * 600);

    // One missing key, or one missing organisation, among the valid ones.
    let nobody = uuid::Uuid::now_v7();
    let mut bad_key = batch.clone();
    bad_key[417].0 = nobody;
    assert_eq!(copy_usage(&mut c, &bad_key).await.as_deref(), Some("23503"));
    let mut bad_org = batch.clone();
    bad_org[3].1 = nobody;
    assert_eq!(copy_usage(&mut c, &bad_org).await.as_deref(), Some("23503"));
    // The same through INSERT and UPDATE, which fire the same check.
    let (ks, os): (Vec<uuid::Uuid>, Vec<uuid::Uuid>) = bad_key.iter().copied().unzip();
    let insert = "INSERT INTO api_key_usage (api_key_id, organization_id, endpoint, method, status_code) \
                  SELECT k, o, '/chat', 'POST', 200 FROM unnest($1::uuid[], $2::uuid[]) AS b(k, o)";
    assert_eq!(sqlstate(c.execute(insert, &[&ks, &os]).await).as_deref(), Some("23503"));
    let repoint = "UPDATE api_key_usage SET api_key_id = $1 \
                   WHERE id IN (SELECT id FROM api_key_usage ORDER BY id LIMIT 1)";
    assert_eq!(sqlstate(c.execute(repoint, &[&nobody]).await).as_deref(), Some("23503"));
    assert_eq!(stored(&c).await, 7 * 600, "a refused batch left rows behind");
    // An update touching many rows over many keys still passes.
    c.execute(
        "UPDATE api_key_usage SET status_code = 201 WHERE id IN (SELECT id FROM api_key_usage LIMIT 600)",
        &[],
    )
    .await
    .expect("update of valid rows");
}

/// `migrate down` to version 7 puts back migration 7's function exactly, and `migrate up`
/// brings 8's back; the check holds at both.
#[tokio::test]
async fn migration_8_rolls_back_to_7s_check() {
    let (db, _key) = seeded_db().await;
    let c = db.client().await;
    let (key, org) = seeded_key(&c).await;
    let usage = USAGE_INSERT;
    let nobody = uuid::Uuid::now_v7();
    assert_eq!(check_function(&c).await.0, check_function_body(8));
    assert_ne!(check_function_body(7), check_function_body(8));

    let steps = (keygate::db::migrate::latest_version() - 7).to_string();
    let out = db.keygate(&["migrate", "down", "--steps", &steps]);
    assert!(out.status.success(), "{}", stderr(&out));
    let version: i32 = c
        .query_one("SELECT max(version) FROM keygate_schema_migrations", &[])
        .await
        .expect("version")
        .get(0);
    assert_eq!(version, 7);
    assert_eq!(check_function(&c).await, (check_function_body(7).to_string(), None));
    c.execute(usage, &[&key, &org]).await.expect("a valid row at 7");
    assert_eq!(
        sqlstate(c.execute(usage, &[&nobody, &org]).await).as_deref(),
        Some("23503")
    );

    db.migrate();
    let (body, config) = check_function(&c).await;
    assert_eq!(body, check_function_body(8));
    assert!(config.is_some());
    c.execute(usage, &[&key, &org]).await.expect("a valid row at 8");
    assert_eq!(
        sqlstate(c.execute(usage, &[&key, &nobody]).await).as_deref(),
        Some("23503")
    );
    let status = db.ok(&["migrate", "status"]);
    assert!(
        status.contains("0008") || status.contains("usage_reference_checks_indexed"),
        "{status}"
    );
}
