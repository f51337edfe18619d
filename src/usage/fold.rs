//! The fold: every few seconds, the usage writer's pending per-key counts
//! (`keygate_key_counters`, migration 13) move into `api_keys.total_requests` and
//! `last_used_at`, and once more when keygate stops.
//!
//! Owns when folding happens; the statement is `db::key_counters`'. A count that is
//! not folded yet is not lost: it waits in the database for the next fold by any
//! replica, and keygate's own reads add it in.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::db::key_counters;

/// How far `api_keys`' counters may lag behind the usage rows. Each fold updates every
/// key used since the last one once, so a shorter interval costs more key updates.
pub const EVERY: Duration = Duration::from_secs(5);

pub async fn run(pool: Pool, stop: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            () = stop.cancelled() => true,
        };
        if let Err(e) = once(&pool).await {
            tracing::warn!(error = %e, "folding key counters failed; retrying at the next interval");
        }
        if stopping {
            return;
        }
    }
}

async fn once(pool: &Pool) -> Result<u64, crate::db::DbError> {
    let client = pool.get().await?;
    key_counters::fold(&**client).await
}
