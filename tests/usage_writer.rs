//! The usage writer against a real PostgreSQL: rows and key counters written once,
//! replays that add nothing, a dead database whose rows go to the spool and come back,
//! queue overflow, the shutdown drain, torn spool lines and an unusable spool.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use deadpool_postgres::Pool;
use keygate::config::UsageConfig;
use keygate::db;
use keygate::usage::spool::Spool;
use keygate::usage::{channel, UsageCounts, UsageRecord, UsageSink, UsageStats};
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use common::*;

struct Fixture {
    db: TestDb,
    client: tokio_postgres::Client,
    key: Uuid,
    org: Uuid,
}

/// A seeded database and the id and organisation of its seeded key.
async fn fixture() -> Fixture {
    let (db, plaintext) = seeded_db().await;
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT id, organization_id FROM api_keys WHERE key_hash = encode(sha256(convert_to($1, 'UTF8')), 'hex')",
            &[&plaintext],
        )
        .await
        .expect("seeded key");
    Fixture {
        key: row.get(0),
        org: row.get(1),
        db,
        client,
    }
}

impl Fixture {
    fn pool(&self) -> Pool {
        db::pool(&self.db.database_config(), 2).expect("pool")
    }

    fn record(&self, i: usize) -> UsageRecord {
        record_for(self.key, self.org, i)
    }

    async fn total_requests(&self) -> i64 {
        fold_counters(&self.client).await;
        self.client
            .query_one("SELECT total_requests FROM api_keys WHERE id = $1", &[&self.key])
            .await
            .unwrap()
            .get(0)
    }

    /// How many of `ids` are stored (each id at most once: it is the primary key).
    async fn stored(&self, ids: &[Uuid]) -> i64 {
        self.client
            .query_one("SELECT count(*) FROM api_key_usage WHERE id = ANY($1)", &[&ids])
            .await
            .unwrap()
            .get(0)
    }
}

fn record_for(key: Uuid, org: Uuid, i: usize) -> UsageRecord {
    UsageRecord {
        id: Uuid::now_v7(),
        api_key_id: key,
        organization_id: org,
        // PostgreSQL keeps microseconds.
        timestamp: Utc::now().trunc_subsecs(6),
        endpoint: "/v1/chat/completions".into(),
        method: "POST".into(),
        status_code: 200,
        response_time_ms: i as i32,
        prompt_tokens: Some(10),
        completion_tokens: Some(20 + i as i32),
        tokens_used: Some(30 + i as i32),
        cost_micros: Some(1_234 + i as i64),
        model: Some("gpt-test".into()),
        ip_address: Some(std::net::Ipv4Addr::new(192, 0, 2, 7).into()),
        user_agent: Some("usage-writer-test".into()),
        error_code: None,
        error_message: None,
    }
}

fn config(dir: &Path, capacity: usize, batch: usize, interval: Duration) -> UsageConfig {
    UsageConfig {
        enabled: true,
        queue_capacity: capacity,
        batch_size: batch,
        flush_interval: interval,
        pool_size: 2,
        spool_dir: dir.to_owned(),
        max_spool_bytes: 1 << 30,
        tokens_header: None,
        inject_stream_usage: true,
        fold_interval: Duration::from_secs(30),
    }
}

/// A pool whose every checkout fails: nothing listens on its port.
fn dead_pool(f: &Fixture) -> Pool {
    let mut cfg = f.db.database_config();
    cfg.url = format!("postgres://postgres@127.0.0.1:{}/nowhere", free_port());
    cfg.connect_timeout = Duration::from_millis(300);
    cfg.pool_wait_timeout = Duration::from_millis(300);
    db::pool(&cfg, 2).expect("pool")
}

struct Running {
    sink: UsageSink,
    stats: Arc<UsageStats>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

fn start(cfg: &UsageConfig, pool: Pool, drain: Duration) -> Running {
    let (sink, writer) = channel(cfg);
    let stats = writer.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer.run(pool, stop.clone(), drain));
    Running {
        sink,
        stats,
        stop,
        task,
    }
}

impl Running {
    async fn finish(self) -> UsageCounts {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("writer returns")
            .expect("writer task");
        self.stats.snapshot()
    }

    async fn until(&self, what: &str, f: impl Fn(&UsageCounts) -> bool) {
        let stats = Arc::clone(&self.stats);
        let ok = eventually(Duration::from_secs(20), async || f(&stats.snapshot())).await;
        assert!(ok, "timed out waiting for {what}: {:?}", self.stats.snapshot());
    }
}

fn spool_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("usage-"))
        .collect()
}

fn spool_lines(dir: &Path) -> usize {
    spool_files(dir)
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap().lines().count())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_rows_with_their_fields_and_counts_them_on_the_key() {
    let f = fixture().await;
    let dir = tempfile::tempdir().unwrap();
    let before = f.total_requests().await;
    let w = start(
        &config(dir.path(), 1_000, 1_000, Duration::from_millis(200)),
        f.pool(),
        Duration::from_secs(5),
    );
    let records: Vec<UsageRecord> = (0..100).map(|i| f.record(i)).collect();
    for r in &records {
        w.sink.record(r.clone());
    }
    w.until("one flush of 100 rows", |s| s.written == 100).await;
    let stats = w.finish().await;
    assert_eq!(stats.failed_batches, 0);
    assert_eq!((stats.dropped, stats.spooled, stats.queued), (0, 0, 0));

    let ids: Vec<Uuid> = records.iter().map(|r| r.id).collect();
    assert_eq!(f.stored(&ids).await, 100);
    assert_eq!(f.total_requests().await, before + 100);
    let last: DateTime<Utc> = f
        .client
        .query_one("SELECT last_used_at FROM api_keys WHERE id = $1", &[&f.key])
        .await
        .unwrap()
        .get(0);
    assert_eq!(last, records.iter().map(|r| r.timestamp).max().unwrap());

    let r = &records[7];
    let row = f
        .client
        .query_one(
            "SELECT api_key_id, organization_id, \"timestamp\", endpoint, method, status_code, response_time_ms,
                    prompt_tokens, completion_tokens, tokens_used, cost_usd::text, model, ip_address, user_agent,
                    error_code
             FROM api_key_usage WHERE id = $1",
            &[&r.id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Uuid>(0), f.key);
    assert_eq!(row.get::<_, Uuid>(1), f.org);
    assert_eq!(row.get::<_, DateTime<Utc>>(2), r.timestamp);
    assert_eq!(row.get::<_, String>(3), "/v1/chat/completions");
    assert_eq!(row.get::<_, String>(4), "POST");
    assert_eq!(row.get::<_, i32>(5), 200);
    assert_eq!(row.get::<_, Option<i32>>(6), Some(7));
    assert_eq!(row.get::<_, Option<i32>>(7), Some(10));
    assert_eq!(row.get::<_, Option<i32>>(8), Some(27));
    assert_eq!(row.get::<_, Option<i32>>(9), Some(37));
    assert_eq!(row.get::<_, Option<String>>(10).as_deref(), Some("0.001241"));
    assert_eq!(row.get::<_, Option<String>>(11).as_deref(), Some("gpt-test"));
    assert_eq!(row.get::<_, Option<String>>(12).as_deref(), Some("192.0.2.7"));
    assert_eq!(row.get::<_, Option<String>>(13).as_deref(), Some("usage-writer-test"));
    assert_eq!(row.get::<_, Option<String>>(14), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_written_rows_stores_and_counts_nothing() {
    let f = fixture().await;
    let pool = f.pool();
    let records: Vec<UsageRecord> = (0..50).map(|i| f.record(i)).collect();
    let ids: Vec<Uuid> = records.iter().map(|r| r.id).collect();
    let before = f.total_requests().await;

    let limit = Duration::from_secs(10);
    let first = db::usage::write_batch(&pool, &records, limit).await.unwrap();
    assert_eq!((first.inserted, first.duplicates, first.orphaned), (50, 0, 0));
    // A retry after a lost commit acknowledgement sends the same batch again.
    let again = db::usage::write_batch(&pool, &records, limit).await.unwrap();
    assert_eq!((again.inserted, again.duplicates, again.orphaned), (0, 50, 0));
    assert_eq!(f.stored(&ids).await, 50);
    assert_eq!(f.total_requests().await, before + 50);

    // The same rows found in a spool file (a crash after commit, before the delete).
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::new(dir.path(), 1 << 30);
    spool.append(&records).unwrap();
    spool.seal().unwrap();
    let w = start(
        &config(dir.path(), 100, 20, Duration::from_millis(50)),
        pool,
        Duration::from_secs(5),
    );
    w.until("the spool file replayed", |s| s.replayed == 50).await;
    let stats = w.finish().await;
    assert_eq!((stats.written, stats.duplicates, stats.dropped), (0, 50, 0));
    assert_eq!(f.stored(&ids).await, 50);
    assert_eq!(f.total_requests().await, before + 50);
    assert!(spool_files(dir.path()).is_empty(), "replayed spool file removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_spooled_while_the_database_is_down_are_replayed_exactly_once() {
    let f = fixture().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1_000, 100, Duration::from_millis(50));
    let before = f.total_requests().await;

    let down = start(&cfg, dead_pool(&f), Duration::from_millis(300));
    let mut ids = Vec::new();
    for chunk in 0..5 {
        for i in 0..100 {
            let r = f.record(chunk * 100 + i);
            ids.push(r.id);
            down.sink.record(r);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = down.finish().await;
    assert_eq!(
        (stats.spooled, stats.dropped, stats.queued, stats.written),
        (500, 0, 0, 0)
    );
    assert!(stats.failed_batches > 0);
    assert_eq!(spool_lines(dir.path()), 500);
    assert_eq!(f.stored(&ids).await, 0);

    let up = start(&cfg, f.pool(), Duration::from_secs(5));
    up.until("every spooled row replayed", |s| s.replayed == 500).await;
    let stats = up.finish().await;
    assert_eq!((stats.written, stats.duplicates, stats.dropped), (500, 0, 0));
    assert_eq!(f.stored(&ids).await, 500);
    assert_eq!(f.total_requests().await, before + 500);
    assert!(spool_files(dir.path()).is_empty(), "spool files removed after replay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_overflows_to_the_spool_without_dropping() {
    let f = fixture().await;
    let dir = tempfile::tempdir().unwrap();
    let w = start(
        &config(dir.path(), 10, 5, Duration::from_millis(20)),
        dead_pool(&f),
        Duration::from_millis(200),
    );
    for i in 0..1_000 {
        w.sink.record(f.record(i));
    }
    let stats = w.finish().await;
    assert_eq!(stats.dropped, 0, "{stats:?}");
    assert_eq!((stats.spooled, stats.queued), (1_000, 0), "{stats:?}");
    assert_eq!(spool_lines(dir.path()), 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_the_queue_into_the_database() {
    let f = fixture().await;
    let dir = tempfile::tempdir().unwrap();
    // No interval flush can happen during the test: only the drain writes.
    let w = start(
        &config(dir.path(), 10_000, 1_000, Duration::from_secs(3_600)),
        f.pool(),
        Duration::from_secs(20),
    );
    let records: Vec<UsageRecord> = (0..3_000).map(|i| f.record(i)).collect();
    let ids: Vec<Uuid> = records.iter().map(|r| r.id).collect();
    for r in records {
        w.sink.record(r);
    }
    let stats = w.finish().await;
    assert_eq!(f.stored(&ids).await, 3_000);
    assert_eq!(
        (stats.written, stats.spooled, stats.dropped, stats.queued),
        (3_000, 0, 0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_spool_line_is_skipped_and_the_rest_replayed() {
    let f = fixture().await;
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<UsageRecord> = (0..20).map(|i| f.record(i)).collect();
    let ids: Vec<Uuid> = records.iter().map(|r| r.id).collect();
    let mut text = String::new();
    for r in &records {
        text.push_str(&serde_json::to_string(r).unwrap());
        text.push('\n');
    }
    // A process killed in the middle of appending the 21st row, a moment ago: its
    // file is still `.open`, and start-up takes it anyway.
    let torn = serde_json::to_string(&f.record(20)).unwrap();
    text.push_str(&torn[..torn.len() / 2]);
    let path = dir
        .path()
        .join(format!("usage-{}-{}.open", Uuid::now_v7().simple(), 4242));
    std::fs::write(&path, text).unwrap();

    let w = start(
        &config(dir.path(), 100, 8, Duration::from_millis(50)),
        f.pool(),
        Duration::from_secs(5),
    );
    w.until("the file replayed and removed", |s| s.replayed == 20 && s.dropped == 1)
        .await;
    let ok = eventually(Duration::from_secs(5), async || spool_files(dir.path()).is_empty()).await;
    assert!(ok, "replayed file removed");
    let stats = w.finish().await;
    assert_eq!((stats.written, stats.dropped), (20, 1));
    assert_eq!(f.stored(&ids).await, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_counted_as_dropped_only_when_the_spool_is_unusable() {
    let f = fixture().await;
    let dir = tempfile::tempdir().unwrap();
    // The spool "directory" is a regular file: nothing can be created in it.
    let not_a_dir = dir.path().join("spool");
    std::fs::write(&not_a_dir, b"").unwrap();
    let w = start(
        &config(&not_a_dir, 10, 5, Duration::from_millis(20)),
        dead_pool(&f),
        Duration::from_millis(200),
    );
    for i in 0..100 {
        w.sink.record(f.record(i));
    }
    let stats = w.finish().await;
    assert_eq!((stats.dropped, stats.spooled, stats.queued), (100, 0, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_a_deleted_key_are_dropped_without_wedging_the_batch() {
    let f = fixture().await;
    let dir = tempfile::tempdir().unwrap();
    let w = start(
        &config(dir.path(), 100, 100, Duration::from_millis(50)),
        f.pool(),
        Duration::from_secs(5),
    );
    let good: Vec<UsageRecord> = (0..10).map(|i| f.record(i)).collect();
    let ids: Vec<Uuid> = good.iter().map(|r| r.id).collect();
    for r in good {
        w.sink.record(r);
    }
    w.sink.record(record_for(Uuid::now_v7(), f.org, 99));
    w.until("the batch written", |s| s.written == 10 && s.dropped == 1)
        .await;
    let stats = w.finish().await;
    assert_eq!(stats.failed_batches, 0);
    assert_eq!(f.stored(&ids).await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_batches_over_several_keys_count_every_key_exactly() {
    let f = fixture().await;
    let mut keys = vec![f.key];
    for i in 0..3 {
        let id = Uuid::now_v7();
        let hash = format!("{:064x}", u128::from_be_bytes(*id.as_bytes()));
        f.client
            .execute(
                "INSERT INTO api_keys (id, organization_id, key_prefix, key_hash, key_hint, name)
                 VALUES ($1, $2, 'pk_test_', $3, 'abcd', $4)",
                &[&id, &f.org, &hash, &format!("parallel {i}")],
            )
            .await
            .unwrap();
        keys.push(id);
    }
    let before = f.total_requests().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 10_000, 50, Duration::from_millis(10));
    cfg.pool_size = 4;
    let pool = db::pool(&f.db.database_config(), cfg.pool_size).unwrap();
    let w = start(&cfg, pool, Duration::from_secs(10));
    // Every batch touches every key, in a different order each time.
    let records: Vec<UsageRecord> = (0..8_000)
        .map(|i| record_for(keys[(i * 7 + i / 50) % keys.len()], f.org, i))
        .collect();
    let ids: Vec<Uuid> = records.iter().map(|r| r.id).collect();
    for r in records {
        w.sink.record(r);
    }
    w.until("every row written", |s| s.written == 8_000).await;
    let stats = w.finish().await;
    // No batch failed: the ordered key locks leave no deadlock to retry.
    assert_eq!(
        (stats.spooled, stats.dropped, stats.duplicates, stats.failed_batches),
        (0, 0, 0, 0),
        "{stats:?}"
    );
    assert_eq!(f.stored(&ids).await, 8_000);
    assert_eq!(f.total_requests().await, before + 2_000);
    let totals: Vec<i64> = f
        .client
        .query(
            "SELECT total_requests FROM api_keys WHERE id = ANY($1)",
            &[&keys[1..].to_vec()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(totals, vec![2_000; 3]);
}

/// Two processes sharing a spool directory: one claims the other's open file (as at
/// start-up); rows the owner appends after that are not lost but land in a new file.
#[test]
fn a_claimed_spool_file_loses_no_later_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (key, org) = (Uuid::now_v7(), Uuid::now_v7());
    let owner = Spool::new(dir.path(), 1 << 30);
    let first: Vec<UsageRecord> = (0..5).map(|i| record_for(key, org, i)).collect();
    owner.append(&first).unwrap();

    let other = Spool::new(dir.path(), 1 << 30);
    let claimed = other.replayable(true).unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(claimed[0].extension().is_some_and(|e| e == "jsonl"));

    let later: Vec<UsageRecord> = (5..8).map(|i| record_for(key, org, i)).collect();
    owner.append(&later).unwrap();
    owner.seal().unwrap();
    let mut seen: Vec<Uuid> = spool_files(dir.path())
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<UsageRecord>(l).unwrap().id)
                .collect::<Vec<_>>()
        })
        .collect();
    seen.sort();
    seen.dedup();
    let mut want: Vec<Uuid> = first.iter().chain(&later).map(|r| r.id).collect();
    want.sort();
    assert_eq!(seen, want);
    // The later rows are in a file of the owner's own, not only in the claimed one.
    let fresh: Vec<PathBuf> = spool_files(dir.path())
        .into_iter()
        .filter(|p| *p != claimed[0])
        .collect();
    assert_eq!(fresh.len(), 1);
    assert_eq!(std::fs::read_to_string(&fresh[0]).unwrap().lines().count(), 3);
}

/// A batch the database refuses rolls back cleanly: the same pooled session (its
/// staging table and cached statements made in the failed transaction) writes the
/// next batch, and the refused rows are written once the cause is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_leaves_the_session_usable() {
    let f = fixture().await;
    let pool = db::pool(&f.db.database_config(), 1).unwrap();
    f.client
        .batch_execute("ALTER TABLE api_key_usage ADD CONSTRAINT test_no_599 CHECK (status_code <> 599)")
        .await
        .unwrap();
    let mut refused: Vec<UsageRecord> = (0..10).map(|i| f.record(i)).collect();
    refused[3].status_code = 599;
    let limit = Duration::from_secs(10);
    assert!(db::usage::write_batch(&pool, &refused, limit).await.is_err());
    let good: Vec<UsageRecord> = (0..10).map(|i| f.record(i)).collect();
    let o = db::usage::write_batch(&pool, &good, limit).await.unwrap();
    assert_eq!(o.inserted, 10);
    f.client
        .batch_execute("ALTER TABLE api_key_usage DROP CONSTRAINT test_no_599")
        .await
        .unwrap();
    let o = db::usage::write_batch(&pool, &refused, limit).await.unwrap();
    assert_eq!(o.inserted, 10);
    let ids: Vec<Uuid> = refused.iter().chain(&good).map(|r| r.id).collect();
    assert_eq!(f.stored(&ids).await, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_without_a_cost_stores_no_cost_and_a_huge_one_is_clamped() {
    let f = fixture().await;
    // A refusal (429 before the upstream) has no tokens and so no cost: NULL, not a
    // clamp bound, or every refused request would bill almost minus a million dollars.
    let mut refused = f.record(0);
    refused.status_code = 429;
    (
        refused.prompt_tokens,
        refused.completion_tokens,
        refused.tokens_used,
        refused.cost_micros,
    ) = (None, None, None, None);
    let mut huge = f.record(1);
    huge.cost_micros = Some(i64::MAX);
    db::usage::write_batch(&f.pool(), &[refused.clone(), huge.clone()], Duration::from_secs(10))
        .await
        .unwrap();
    let cost = |id: Uuid| {
        let client = &f.client;
        async move {
            client
                .query_one("SELECT cost_usd::text FROM api_key_usage WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get::<_, Option<String>>(0)
        }
    };
    assert_eq!(cost(refused.id).await, None);
    assert_eq!(cost(huge.id).await.as_deref(), Some("999999.999999"));
}

/// The rows of `ids` as text, column by column (all but the id), in the given order.
async fn rows_as_text(f: &Fixture, ids: &[Uuid]) -> Vec<String> {
    let mut out = Vec::new();
    for id in ids {
        let r = f
            .client
            .query_one(
                "SELECT concat_ws('|', api_key_id, organization_id, \"timestamp\", endpoint, method, status_code,
                        response_time_ms, prompt_tokens, completion_tokens, tokens_used, cost_usd, model,
                        ip_address, user_agent, error_code, error_message, cost_usd IS NULL)
                 FROM api_key_usage WHERE id = $1",
                &[id],
            )
            .await
            .unwrap();
        out.push(r.get(0));
    }
    out
}

/// The first attempt's COPY straight into the table stores what the staging path
/// stores, byte for byte, costs at every edge included, and counts each row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_direct_copy_stores_what_the_staging_path_stores() {
    let f = fixture().await;
    let pool = f.pool();
    let costs = [
        None,
        Some(0),
        Some(1),
        Some(99),
        Some(100),
        Some(10_000),
        Some(1_000_000),
        Some(123_456_789),
        Some(-5_000),
        Some(-1),
        Some(10_000_000_000),
        Some(999_999_999_999),
        Some(i64::MAX),
        Some(i64::MIN),
    ];
    let rows = |tag: &str| -> Vec<UsageRecord> {
        costs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut r = f.record(i);
                r.cost_micros = *c;
                r.ip_address = (i % 2 == 0).then(|| "2001:db8::7".parse().unwrap());
                r.user_agent = Some(format!("agent-{tag}-\0é{}", "x".repeat(600)));
                r.error_message = (i % 3 == 0).then(|| "refused".into());
                r.endpoint = format!("/p/{}", "é".repeat(200));
                r
            })
            .collect()
    };
    let direct = rows("a");
    let staged: Vec<UsageRecord> = direct
        .iter()
        .map(|r| UsageRecord {
            id: Uuid::now_v7(),
            ..r.clone()
        })
        .collect();
    let before = f.total_requests().await;
    let limit = Duration::from_secs(10);
    let o = db::usage::write_fresh_batch(&pool, &direct, limit).await.unwrap();
    assert_eq!((o.inserted, o.duplicates, o.orphaned), (costs.len() as u64, 0, 0));
    let o = db::usage::write_batch(&pool, &staged, limit).await.unwrap();
    assert_eq!(o.inserted, costs.len() as u64);
    let ids = |v: &[UsageRecord]| v.iter().map(|r| r.id).collect::<Vec<_>>();
    let (a, b) = (
        rows_as_text(&f, &ids(&direct)).await,
        rows_as_text(&f, &ids(&staged)).await,
    );
    assert_eq!(a, b);
    assert!(a[1].contains("|0.000000|") && a[2].contains("|0.000001|"), "{a:?}");
    assert!(
        a[12].contains("|999999.999999|") && a[13].contains("|-999999.999999|"),
        "{a:?}"
    );
    assert_eq!(f.total_requests().await, before + 2 * costs.len() as i64);
}

/// A first attempt that the table refuses falls back to the staging path in the same
/// call: rows of a deleted key are dropped and counted as orphaned, ids already stored
/// are duplicates, and nothing is doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_direct_copy_falls_back_to_staging() {
    let f = fixture().await;
    let pool = f.pool();
    let limit = Duration::from_secs(10);
    let gone: Uuid = f
        .client
        .query_one(
            "INSERT INTO api_keys (id, organization_id, key_prefix, key_hash, key_hint, name)
             VALUES ($1, $2, 'pk_test_', repeat('d', 64), 'dddd', 'gone') RETURNING id",
            &[&Uuid::now_v7(), &f.org],
        )
        .await
        .unwrap()
        .get(0);
    f.client
        .execute("DELETE FROM api_keys WHERE id = $1", &[&gone])
        .await
        .unwrap();
    let before = f.total_requests().await;
    let mut batch: Vec<UsageRecord> = (0..10).map(|i| f.record(i)).collect();
    batch[4].api_key_id = gone;
    let o = db::usage::write_fresh_batch(&pool, &batch, limit).await.unwrap();
    assert_eq!((o.inserted, o.duplicates, o.orphaned), (9, 0, 1));
    assert_eq!(f.total_requests().await, before + 9);
    // The same ids again, as if the first commit's acknowledgement had been lost and the
    // writer wrongly took the fast path: a unique violation, then the staging path.
    let o = db::usage::write_fresh_batch(&pool, &batch, limit).await.unwrap();
    assert_eq!((o.inserted, o.duplicates, o.orphaned), (0, 9, 1));
    assert_eq!(f.total_requests().await, before + 9);
    let ids: Vec<Uuid> = batch.iter().map(|r| r.id).collect();
    assert_eq!(f.stored(&ids).await, 9);
}

/// A batch whose COPY stream spans many of the encoder's 64 KiB pieces (pieces end
/// between rows) is stored whole, on the direct path and on the staging path alike, and
/// rows from the first to the last arrive intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_one_copy_piece_is_stored_whole_on_both_paths() {
    let f = fixture().await;
    let pool = f.pool();
    let rows = || -> Vec<UsageRecord> {
        (0..1_500)
            .map(|i| {
                let mut r = f.record(i);
                // About 480 bytes a row: the stream is about 0.7 MiB, eleven pieces.
                r.user_agent = Some(format!("agent-{i}-{}", "y".repeat(i % 600)));
                if i % 2 == 1 {
                    r.ip_address = Some("2001:db8::7".parse().unwrap());
                }
                r.model = (i % 5 != 0).then(|| format!("model-{i}"));
                r.cost_micros = (i % 7 != 0).then_some(i as i64 * 1_001);
                r
            })
            .collect()
    };
    let (direct, staged) = (rows(), rows());
    let limit = Duration::from_secs(20);
    let o = db::usage::write_fresh_batch(&pool, &direct, limit).await.unwrap();
    assert_eq!(o.inserted, 1_500);
    let o = db::usage::write_batch(&pool, &staged, limit).await.unwrap();
    assert_eq!(o.inserted, 1_500);
    let ids = |v: &[UsageRecord]| v.iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(f.stored(&ids(&direct)).await, 1_500);
    assert_eq!(f.stored(&ids(&staged)).await, 1_500);
    let sample = [0, 1, 93, 94, 95, 700, 1_498, 1_499];
    let pick = |v: &[UsageRecord]| sample.iter().map(|&i| v[i].id).collect::<Vec<_>>();
    let (a, b) = (
        rows_as_text(&f, &pick(&direct)).await,
        rows_as_text(&f, &pick(&staged)).await,
    );
    // Same rows apart from the timestamps each `record` call took.
    let strip = |v: Vec<String>| -> Vec<String> {
        v.into_iter()
            .map(|s| {
                s.split('|')
                    .enumerate()
                    .filter(|(i, _)| *i != 2)
                    .map(|(_, p)| p)
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect()
    };
    assert_eq!(strip(a.clone()), strip(b));
    let last = &a[7];
    let want = format!("|1.500499|model-1499|2001:db8::7|agent-1499-{}|f", "y".repeat(299));
    assert!(last.ends_with(&want), "{last}");
    let row = f
        .client
        .query_one(
            "SELECT cost_usd::text, user_agent, model, ip_address FROM api_key_usage WHERE id = $1",
            &[&direct[700].id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0), None, "700 is a multiple of 7: no cost");
    assert_eq!(
        row.get::<_, Option<String>>(1),
        Some(format!("agent-700-{}", "y".repeat(100)))
    );
    assert_eq!(row.get::<_, Option<String>>(2), None);
    assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some("192.0.2.7"));
    let cost: Option<String> = f
        .client
        .query_one(
            "SELECT cost_usd::text FROM api_key_usage WHERE id = $1",
            &[&staged[1_499].id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(cost.as_deref(), Some("1.500499"));
}
