//! How the counter tables are stored and touched (migrations 9 and 10): keygate's own
//! counter updates, the
//! usage writer's counts folded into `api_keys` (migration 13) and the limiter's upsert
//! into `rate_limit_tracking`,
//! keep each row's new version on its page (a heap-only update, no index entries) even
//! while another transaction's snapshot keeps the old versions alive, as the writer's
//! and the limiter's overlapping statements do under load. At the default fillfactor
//! they cannot, which the test shows too by rolling the migration back. And those
//! updates set `updated_at` themselves, so the touch trigger's function is not called
//! for each row, while every other writer still has it maintained.
//!
//! Against a real PostgreSQL, through keygate's real statements.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use keygate::db::{self, counters};
use keygate::limits::window;
use keygate::usage::UsageRecord;
use uuid::Uuid;

use common::*;

const KEYS: usize = 1_000;

/// `KEYS` keys in the seeded organisation, as benches/load.sh makes them; returns their
/// ids and the organisation's.
async fn add_keys(c: &tokio_postgres::Client) -> (Vec<Uuid>, Uuid) {
    c.batch_execute(&format!(
        "INSERT INTO api_keys (organization_id, key_prefix, key_hash, key_hint, name, environment, scopes)
         SELECT o.id, 'pk_test_', encode(sha256(convert_to('storage ' || i, 'UTF8')), 'hex'), 'abcd',
                'storage ' || i, 'test', '[\"chat\"]'
         FROM generate_series(1, {KEYS}) i, organizations o WHERE o.slug = 'default'"
    ))
    .await
    .expect("insert keys");
    let rows = c
        .query(
            "SELECT id, organization_id FROM api_keys WHERE name LIKE 'storage %'",
            &[],
        )
        .await
        .expect("keys");
    assert_eq!(rows.len(), KEYS);
    (rows.iter().map(|r| r.get(0)).collect(), rows[0].get(1))
}

fn usage_row(key: Uuid, org: Uuid) -> UsageRecord {
    UsageRecord {
        id: Uuid::now_v7(),
        api_key_id: key,
        organization_id: org,
        timestamp: Utc::now().trunc_subsecs(6),
        endpoint: "/v1/chat/completions".into(),
        method: "POST".into(),
        status_code: 200,
        response_time_ms: 3,
        prompt_tokens: Some(10),
        completion_tokens: Some(20),
        tokens_used: Some(30),
        cost_micros: Some(1_234),
        model: Some("gpt-test".into()),
        ip_address: None,
        user_agent: None,
        error_code: None,
        error_message: None,
    }
}

/// One usage row per key, written as the writer's first attempt writes a batch, then
/// folded into `api_keys` as keygate's fold task does (migration 13), on the same pool.
async fn usage_batch(pool: &deadpool_postgres::Pool, keys: &[Uuid], org: Uuid) {
    let rows: Vec<UsageRecord> = keys.iter().map(|&k| usage_row(k, org)).collect();
    let out = db::usage::write_fresh_batch(pool, &rows, Duration::from_secs(30))
        .await
        .expect("usage batch");
    assert_eq!(out.inserted, keys.len() as u64);
    let client = pool.get().await.expect("client");
    let folded = db::key_counters::fold(&**client).await.expect("fold");
    assert_eq!(folded, keys.len() as u64);
}

/// A limiter flush's deltas: one request in `minute` for each key.
fn one_each(keys: &[Uuid], minute: DateTime<Utc>) -> Vec<counters::WindowCount> {
    keys.iter()
        .map(|&id| counters::WindowCount {
            id,
            window_start: minute,
            count: 1,
        })
        .collect()
}

/// Each row's heap page, by key id.
async fn pages(c: &tokio_postgres::Client, sql: &str) -> HashMap<Uuid, i64> {
    c.query(sql, &[])
        .await
        .expect("ctid")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

const KEY_PAGES: &str = "SELECT id, (ctid::text::point)[0]::int8 FROM api_keys WHERE name LIKE 'storage %'";
const MINUTE_PAGES: &str = "SELECT api_key_id, (ctid::text::point)[0]::int8 FROM rate_limit_tracking";

/// The share of rows whose new version stayed on the page of the old one.
fn stayed(before: &HashMap<Uuid, i64>, after: &HashMap<Uuid, i64>) -> f64 {
    assert_eq!(before.len(), after.len());
    let same = before.iter().filter(|(id, page)| after.get(*id) == Some(*page)).count();
    same as f64 / before.len() as f64
}

async fn fillfactors(c: &tokio_postgres::Client) -> Vec<Option<Vec<String>>> {
    let mut out = Vec::new();
    for t in ["api_keys", "rate_limit_tracking"] {
        let row = c
            .query_one("SELECT reloptions FROM pg_class WHERE oid = $1::text::regclass", &[&t])
            .await
            .expect("reloptions");
        out.push(row.get(0));
    }
    out
}

/// Bumps every key once through the usage writer and every key's minute once through
/// the limiter's flush statement, while `holder` keeps a snapshot from before, and
/// returns the share of `api_keys` and of `rate_limit_tracking` rows that stayed put.
async fn bump_under_a_held_snapshot(db: &TestDb, keys: &[Uuid], org: Uuid, minute: DateTime<Utc>) -> (f64, f64) {
    let c = db.client().await;
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM api_keys")
        .await
        .expect("hold a snapshot");
    let (keys_before, minutes_before) = (pages(&c, KEY_PAGES).await, pages(&c, MINUTE_PAGES).await);

    let pool = db::pool(&db.database_config(), 2).expect("pool");
    usage_batch(&pool, keys, org).await;
    let deltas = one_each(keys, minute);
    let client = pool.get().await.expect("client");
    let flusher: &tokio_postgres::Client = &client;
    counters::add_key_minutes(flusher, &deltas, &[])
        .await
        .expect("limiter flush");

    let shares = (
        stayed(&keys_before, &pages(&c, KEY_PAGES).await),
        stayed(&minutes_before, &pages(&c, MINUTE_PAGES).await),
    );
    holder.batch_execute("COMMIT").await.expect("release");
    shares
}

#[tokio::test]
async fn counter_updates_stay_on_their_page() {
    let (db, _key) = seeded_db().await;
    let c = db.client().await;
    let half = Some(vec!["fillfactor=50".to_string()]);
    assert_eq!(fillfactors(&c).await, [half.clone(), half.clone()]);

    let (keys, org) = add_keys(&c).await;
    // One minute row per key, written the way the limiter first writes it.
    let minute = window::minute_start_of(Utc::now());
    let first = one_each(&keys, minute);
    counters::add_key_minutes(&c, &first, &[]).await.expect("first flush");

    let (key_share, minute_share) = bump_under_a_held_snapshot(&db, &keys, org, minute).await;
    assert!(
        key_share >= 0.9,
        "api_keys: only {key_share:.2} of the bumps stayed on their page"
    );
    assert!(
        minute_share >= 0.9,
        "rate_limit_tracking: only {minute_share:.2} of the upserts stayed on their page"
    );
    let total: i64 = c
        .query_one(
            "SELECT sum(total_requests)::int8 FROM api_keys WHERE name LIKE 'storage %'",
            &[],
        )
        .await
        .expect("sum")
        .get(0);
    assert_eq!(total, KEYS as i64);

    // At the default fillfactor the same updates move nearly every row, and each move is
    // an entry in every index of the table: what the migration saves. Only migration 9
    // is undone (its own down script), since the writer's statements need the later ones.
    let ninth = &db::migrate::MIGRATIONS[8];
    assert_eq!(ninth.version, 9);
    c.batch_execute(ninth.down).await.expect("migration 9 down");
    assert_eq!(fillfactors(&c).await, [None, None]);
    c.batch_execute("VACUUM FULL api_keys, rate_limit_tracking")
        .await
        .expect("repack at the default fillfactor");
    let (key_share, minute_share) = bump_under_a_held_snapshot(&db, &keys, org, minute).await;
    assert!(key_share <= 0.2, "api_keys at fillfactor 100: {key_share:.2} stayed");
    assert!(
        minute_share <= 0.2,
        "rate_limit_tracking at fillfactor 100: {minute_share:.2} stayed"
    );

    c.batch_execute(ninth.up).await.expect("migration 9 up");
    assert_eq!(fillfactors(&c).await, [half.clone(), half]);
}

const TOUCH_CALLS: &str = "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_user_functions
    WHERE funcname = 'keygate_touch_updated_at'";

async fn touch_calls_in(tx: &tokio_postgres::Transaction<'_>) -> i64 {
    tx.query_one(
        "SELECT coalesce(pg_stat_get_xact_function_calls('keygate_touch_updated_at'::regproc), 0)",
        &[],
    )
    .await
    .expect("calls")
    .get(0)
}

#[tokio::test]
async fn counter_writes_set_updated_at_without_the_touch_function() {
    let (db, _key) = seeded_db().await;
    let mut c = db.client().await;
    let (keys, org) = add_keys(&c).await;
    c.batch_execute(&format!("ALTER DATABASE {} SET track_functions = 'all'", db.name))
        .await
        .expect("track functions");

    // The usage writer's bump, on its own pooled sessions: every key's updated_at moves,
    // and once the sessions end and report, the function has not run once.
    let before: DateTime<Utc> = c
        .query_one(
            "SELECT max(updated_at) FROM api_keys WHERE organization_id = $1",
            &[&org],
        )
        .await
        .expect("q")
        .get(0);
    {
        let pool = db::pool(&db.database_config(), 2).expect("pool");
        usage_batch(&pool, &keys, org).await;
        let stale: i64 = c
            .query_one(
                "SELECT count(*) FROM api_keys WHERE organization_id = $1 AND updated_at <= $2",
                &[&org, &before],
            )
            .await
            .expect("q")
            .get(0);
        assert_eq!(stale, 1, "only the seeded key, which had no usage, keeps its stamp");
        // The control: a plain update on the same sessions does call it, once.
        let conn = pool.get().await.expect("conn");
        conn.execute("UPDATE api_keys SET name = name || '' WHERE id = $1", &[&keys[0]])
            .await
            .expect("control");
    }
    let settled = eventually(Duration::from_secs(10), async || {
        let sessions: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .expect("q")
            .get(0);
        sessions == 0
    })
    .await;
    assert!(settled, "the pool's sessions did not end");
    let calls: i64 = c.query_one(TOUCH_CALLS, &[]).await.expect("q").get(0);
    assert_eq!(calls, 1, "the bump called the touch function (1 is the control)");
    c.batch_execute("SET track_functions = 'all'")
        .await
        .expect("track here too");

    // The limiter's upserts: one flush inserts the cells, the next (in a transaction
    // here, to count its calls) adds to them.
    let minute = window::minute_start_of(Utc::now());
    let month = counters::WindowCount {
        id: org,
        window_start: window::month_start_of(Utc::now()),
        count: 1,
    };
    counters::add_key_minutes(&c, &one_each(&keys, minute), &[])
        .await
        .expect("minutes");
    counters::add_org_months(&c, &[month], &[]).await.expect("month");
    let tx = c.transaction().await.expect("tx");
    counters::add_key_minutes(&tx, &one_each(&keys, minute), &[])
        .await
        .expect("minutes");
    counters::add_org_months(&tx, &[month], &[]).await.expect("month");
    assert_eq!(
        touch_calls_in(&tx).await,
        0,
        "the limiter's upserts called the touch function"
    );
    let now_stamped = |table: &'static str| {
        format!(
            "SELECT bool_and(updated_at = now()) FROM {table} WHERE {}",
            match table {
                "rate_limit_tracking" => "window_start = $1",
                _ => "month_start = $1",
            }
        )
    };
    let minutes: bool = tx
        .query_one(&now_stamped("rate_limit_tracking"), &[&minute])
        .await
        .expect("q")
        .get(0);
    let months: bool = tx
        .query_one(
            &now_stamped("organization_monthly_usage"),
            &[&window::month_start_of(Utc::now())],
        )
        .await
        .expect("q")
        .get(0);
    assert!(minutes && months, "upserted rows carry the transaction's time");

    // Any other writer still gets updated_at maintained, by the function; a statement
    // that sets it explicitly keeps its value.
    tx.execute("UPDATE api_keys SET name = 'renamed' WHERE id = $1", &[&keys[0]])
        .await
        .expect("rename");
    tx.execute(
        "UPDATE rate_limit_tracking SET request_count = request_count + 1 WHERE api_key_id = $1",
        &[&keys[1]],
    )
    .await
    .expect("by hand");
    assert_eq!(touch_calls_in(&tx).await, 2);
    let renamed: bool = tx
        .query_one("SELECT updated_at = now() FROM api_keys WHERE id = $1", &[&keys[0]])
        .await
        .expect("q")
        .get(0);
    assert!(renamed, "a rename moves updated_at");
    tx.execute(
        "UPDATE organizations SET updated_at = '2001-02-03T04:05:06Z' WHERE id = $1",
        &[&org],
    )
    .await
    .expect("explicit");
    let kept: String = tx
        .query_one(
            "SELECT to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') FROM organizations WHERE id = $1",
            &[&org],
        )
        .await
        .expect("q")
        .get(0);
    assert_eq!(kept, "2001-02-03");
    assert_eq!(touch_calls_in(&tx).await, 2);
    tx.rollback().await.expect("rollback");
}
