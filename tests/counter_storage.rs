//! How the counter tables are stored (migration 9): keygate's own counter updates, the
//! usage writer's bump of `api_keys` and the limiter's upsert into `rate_limit_tracking`,
//! keep each row's new version on its page (a heap-only update, no index entries) even
//! while another transaction's snapshot keeps the old versions alive, as the writer's
//! and the limiter's overlapping statements do under load. At the default fillfactor
//! they cannot, which the test shows too by rolling the migration back.
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
    let rows: Vec<UsageRecord> = keys.iter().map(|&k| usage_row(k, org)).collect();
    let out = db::usage::write_fresh_batch(&pool, &rows, Duration::from_secs(30))
        .await
        .expect("usage batch");
    assert_eq!(out.inserted, KEYS as u64);
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
    // an entry in every index of the table: what the migration saves.
    let out = db.keygate(&["migrate", "down", "--steps", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
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

    db.migrate();
    assert_eq!(fillfactors(&c).await, [half.clone(), half]);
}
