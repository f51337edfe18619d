//! Usage ingestion benchmark: sustained rows per second through the usage writer into
//! `api_key_usage`, against `psql \copy` of the same rows (same columns, CSV from a temp
//! file) into the same table of the same database, in the same run.
//!
//! Run: `cargo bench --bench usage_ingest` (uses `DATABASE_URL` if set, else starts a
//! throwaway cluster like the tests). `USAGE_BENCH_ROWS` (default 200000),
//! `USAGE_BENCH_BATCH` (default 2000) and `USAGE_BENCH_POOL` (default 4: the writer's
//! pool size, so batches in flight; both the config defaults) and `USAGE_BENCH_ROUNDS`
//! (default 3; the best round of each side counts) tune it. Without `--bench` (as in
//! `cargo test --all-targets`) it does nothing, so CI never runs it as a test. It
//! skips with a message when no PostgreSQL or no `psql` is available.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{SubsecRound, Utc};
use keygate::config::UsageConfig;
use keygate::usage::{channel, UsageRecord};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const COLUMNS: &str = "id, api_key_id, organization_id, \"timestamp\", endpoint, method, status_code, \
    response_time_ms, prompt_tokens, completion_tokens, tokens_used, cost_usd, model, ip_address, user_agent, \
    error_code, error_message";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("usage_ingest: a benchmark; run it with `cargo bench --bench usage_ingest`");
        return;
    }
    if Command::new("psql").arg("--version").output().is_err() {
        println!("usage_ingest: skipped, `psql` is not installed");
        return;
    }
    // The harness panics when it can neither find DATABASE_URL nor start a cluster.
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let server = std::panic::catch_unwind(common::server);
    std::panic::set_hook(quiet);
    if server.is_err() {
        println!("usage_ingest: skipped, no PostgreSQL reachable (set DATABASE_URL or install initdb/pg_ctl)");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench());
}

async fn bench() {
    let rows = env_or("USAGE_BENCH_ROWS", 200_000);
    let batch = env_or("USAGE_BENCH_BATCH", 2_000);
    let pool = env_or("USAGE_BENCH_POOL", 4).max(1);
    let rounds = env_or("USAGE_BENCH_ROUNDS", 3).max(1);
    let (db, plaintext) = common::seeded_db().await;
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT id, organization_id FROM api_keys WHERE key_hash = encode(sha256(convert_to($1, 'UTF8')), 'hex')",
            &[&plaintext],
        )
        .await
        .expect("seeded key");
    let (key, org): (Uuid, Uuid) = (row.get(0), row.get(1));
    let dir = tempfile::tempdir().expect("temp dir");
    println!("usage_ingest: {rows} rows per run, writer batch {batch} and pool {pool}, best of {rounds} rounds");

    let mut best_copy = 0f64;
    let mut best_writer = 0f64;
    for round in 1..=rounds {
        let records = make_records(key, org, rows);
        let csv = dir.path().join("rows.csv");
        std::fs::write(&csv, to_csv(&records)).expect("write csv");
        reset(&client).await;
        let copy = psql_copy(&db.url, &csv);
        check_count(&client, rows).await;

        let records = make_records(key, org, rows);
        reset(&client).await;
        let writer = through_writer(&db, dir.path(), batch, pool, records).await;
        check_count(&client, rows).await;

        let (c, w) = (rows as f64 / copy.as_secs_f64(), rows as f64 / writer.as_secs_f64());
        println!(
            "round {round}: psql \\copy {c:>9.0} rows/s ({copy:.2?})   writer {w:>9.0} rows/s ({writer:.2?})   ratio {:.0}%",
            100.0 * w / c
        );
        best_copy = best_copy.max(c);
        best_writer = best_writer.max(w);
    }
    reset(&client).await;
    println!(
        "usage_ingest: psql \\copy {best_copy:.0} rows/s, writer {best_writer:.0} rows/s, writer/copy = {:.0}% (target >= 80%)",
        100.0 * best_writer / best_copy
    );
}

/// Rows shaped like a chat proxy's: one key, the current month, a few optional fields.
fn make_records(key: Uuid, org: Uuid, n: usize) -> Vec<UsageRecord> {
    let now = Utc::now().trunc_subsecs(6);
    (0..n)
        .map(|i| UsageRecord {
            id: Uuid::now_v7(),
            api_key_id: key,
            organization_id: org,
            timestamp: now - chrono::Duration::microseconds(i as i64),
            endpoint: "/v1/chat/completions".into(),
            method: "POST".into(),
            status_code: if i % 50 == 0 { 429 } else { 200 },
            response_time_ms: (i % 900) as i32 + 12,
            prompt_tokens: Some((i % 700) as i32 + 20),
            completion_tokens: Some((i % 300) as i32 + 5),
            tokens_used: Some((i % 1000) as i32 + 25),
            cost_micros: Some((i % 5000) as i64 + 100),
            model: Some("gpt-4o-mini".into()),
            ip_address: Some(std::net::Ipv4Addr::new(203, 0, 113, 42).into()),
            user_agent: Some("openai-python/1.40.0".into()),
            error_code: (i % 50 == 0).then(|| "rate_limit_exceeded".into()),
            error_message: None,
        })
        .collect()
}

fn to_csv(records: &[UsageRecord]) -> String {
    fn text(out: &mut String, v: Option<&str>) {
        // Unquoted empty is NULL in CSV COPY; quoted values may hold anything.
        if let Some(s) = v {
            out.push('"');
            out.push_str(&s.replace('"', "\"\""));
            out.push('"');
        }
        out.push(',');
    }
    fn num(out: &mut String, v: Option<impl std::fmt::Display>) {
        if let Some(n) = v {
            let _ = write!(out, "{n}");
        }
        out.push(',');
    }
    let mut out = String::with_capacity(records.len() * 260);
    for r in records {
        let _ = write!(
            out,
            "{},{},{},{},",
            r.id,
            r.api_key_id,
            r.organization_id,
            r.timestamp.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        );
        text(&mut out, Some(&r.endpoint));
        text(&mut out, Some(&r.method));
        num(&mut out, Some(r.status_code));
        num(&mut out, Some(r.response_time_ms));
        num(&mut out, r.prompt_tokens);
        num(&mut out, r.completion_tokens);
        num(&mut out, r.tokens_used);
        num(
            &mut out,
            r.cost_micros.map(|c| format!("{}.{:06}", c / 1_000_000, c % 1_000_000)),
        );
        text(&mut out, r.model.as_deref());
        text(&mut out, r.ip_address.map(|ip| ip.to_string()).as_deref());
        text(&mut out, r.user_agent.as_deref());
        text(&mut out, r.error_code.as_deref());
        text(&mut out, r.error_message.as_deref());
        out.pop();
        out.push('\n');
    }
    out
}

/// An empty table and a quiet server, so neither side pays for the other's rows.
async fn reset(client: &tokio_postgres::Client) {
    // One statement per call: VACUUM refuses the implicit transaction of a list.
    for sql in [
        "TRUNCATE api_key_usage",
        "UPDATE api_keys SET total_requests = 0",
        "VACUUM ANALYZE api_key_usage, api_keys",
        "CHECKPOINT",
    ] {
        client.batch_execute(sql).await.expect(sql);
    }
}

async fn check_count(client: &tokio_postgres::Client, rows: usize) {
    let n: i64 = client
        .query_one("SELECT count(*) FROM api_key_usage", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, rows as i64, "every row stored once");
}

fn psql_copy(url: &str, csv: &Path) -> Duration {
    let cmd = format!(
        "\\copy api_key_usage ({COLUMNS}) FROM '{}' WITH (FORMAT csv)",
        csv.display()
    );
    let started = Instant::now();
    let out = Command::new("psql")
        .args([url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", &cmd])
        .output()
        .expect("run psql");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "psql \\copy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// From the first `record` to the last row committed.
async fn through_writer(
    db: &common::TestDb,
    spool: &Path,
    batch: usize,
    pool_size: usize,
    records: Vec<UsageRecord>,
) -> Duration {
    let n = records.len() as u64;
    let cfg = UsageConfig {
        enabled: true,
        // Room for every row: this measures the database path, not the spool.
        queue_capacity: records.len(),
        batch_size: batch,
        flush_interval: Duration::from_millis(200),
        pool_size,
        spool_dir: spool.join("spool"),
        max_spool_bytes: 1 << 30,
        tokens_header: None,
        inject_stream_usage: true,
        fold_interval: Duration::from_secs(30),
    };
    let pool = keygate::db::pool(&db.database_config(), cfg.pool_size).expect("pool");
    let (sink, writer) = channel(&cfg);
    let stats = writer.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer.run(pool, stop.clone(), Duration::from_secs(60)));
    // Let start-up (partition check, spool scan) finish outside the measurement.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    for r in records {
        sink.record(r);
    }
    while stats.written.load(std::sync::atomic::Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = started.elapsed();
    stop.cancel();
    task.await.expect("writer task");
    let s = stats.snapshot();
    assert_eq!((s.spooled, s.dropped, s.failed_batches), (0, 0, 0), "{s:?}");
    took
}
