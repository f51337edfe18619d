//! Periodic upkeep while serving: month partitions of `api_key_usage` made ahead of
//! need, and minute windows older than `limits.tracking_retention` deleted from
//! `rate_limit_tracking`. Runs at start and then every interval; several replicas
//! doing it at once is harmless (the statements are idempotent and serialised).
//!
//! Owns when upkeep happens; the statements are `db::retention`'s.

use std::time::Duration;

use chrono::Utc;
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::db::retention;

const EVERY: Duration = Duration::from_secs(600);
const PRUNE_BATCH: i64 = 10_000;

pub async fn run(pool: Pool, tracking_retention: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        if let Err(e) = once(&pool, tracking_retention).await {
            tracing::warn!(error = %e, "maintenance failed; retrying at the next interval");
        }
    }
}

pub async fn once(pool: &Pool, tracking_retention: Duration) -> Result<(), crate::db::DbError> {
    let client = pool.get().await?;
    let now = Utc::now();
    retention::ensure_usage_partitions(&**client, now).await?;
    let cutoff = now - chrono::Duration::from_std(tracking_retention).unwrap_or(chrono::Duration::days(1));
    let pruned = retention::prune_rate_windows(&**client, cutoff, PRUNE_BATCH).await?;
    if pruned > 0 {
        tracing::info!(rows = pruned, "pruned old rate-limit windows");
    }
    Ok(())
}
