//! The fold: the usage writer's pending per-key counts (`keygate_key_counters`,
//! migration 13) move into `api_keys.total_requests` and `last_used_at` once per
//! `usage.fold_interval` for the whole cluster, and once more when keygate stops.
//!
//! Owns when this replica tries to fold; the claim that keeps replicas from folding
//! more often between them (migration 14) and the statements are `db::key_counters`'.
//! A count that is not folded yet is not lost: it waits in the database for the next
//! fold by any replica, and keygate's own reads add it in.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::db::key_counters;

/// Tries to fold every `every`, folding when no replica has for nearly that long, and
/// folds once more, unclaimed, when `stop` is cancelled.
pub async fn run(pool: Pool, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A replica's own timer and the database's clock drift apart by milliseconds; a
    // claim asking for the whole interval would then miss every other tick of its
    // own cadence, doubling the lag.
    let claim_after = every.mul_f64(0.9);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            () = stop.cancelled() => true,
        };
        let folded = match pool.get().await {
            Ok(client) if stopping => key_counters::fold(&**client).await.map(Some),
            Ok(client) => key_counters::fold_if_due(&**client, claim_after).await,
            Err(e) => Err(e.into()),
        };
        match folded {
            Ok(n) => tracing::trace!(keys = ?n, "folded key counters"),
            Err(e) => tracing::warn!(error = %e, "folding key counters failed; retrying at the next interval"),
        }
        if stopping {
            return;
        }
    }
}
