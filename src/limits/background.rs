//! The limiter's touch points with the database outside `flush` itself: the periodic
//! flush task and seeding a key the first time this process sees it, from the auth
//! lookup's counters or, when the key was already cached, from a query of its own.
//!
//! Owns when those happen and what a failure degrades to (local counting, never a
//! refused or stalled request). The statements are `db::counters`'; the protocol is
//! `flush.rs`'.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use super::{KeyLimits, Limiter};
use crate::db::counters;

impl Limiter {
    /// Flushes every `every` until `stop` is cancelled, then once more so a clean
    /// shutdown loses nothing. Failures are logged and retried on the next tick; the
    /// deltas stay in memory meanwhile.
    pub async fn run_flusher(self: Arc<Self>, pool: Pool, every: Duration, stop: CancellationToken) {
        self.flush_every_ms
            .store(i64::try_from(every.as_millis()).unwrap_or(i64::MAX), Relaxed);
        let mut tick = tokio::time::interval(every);
        // After a slow flush, one catch-up tick is enough: each flush carries all
        // deltas so far.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                () = stop.cancelled() => true,
            };
            match self.flush(&pool, Utc::now()).await {
                Ok(stats) => {
                    if failing {
                        tracing::info!("limit counters flushed again");
                    }
                    failing = false;
                    tracing::trace!(?stats, "flushed limit counters");
                }
                // Once per outage at warn; the rest would repeat it every second.
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot flush limit counters; counting locally");
                }
                Err(e) => tracing::debug!(error = %e, "limit counter flush failed again"),
            }
            if stopping {
                return;
            }
        }
    }

    /// The auth cache's on-load hook (`Authenticator::set_on_load`): a key the limiter
    /// does not track yet is seeded from the counters its lookup read in the same
    /// statement, so its first request makes no second query. `enabled` is asked each
    /// time (limits can be turned on and off by a reload); off, nothing is seeded.
    pub fn seed_on_lookup(self: Arc<Self>, enabled: impl Fn() -> bool + Send + Sync + 'static) -> crate::auth::OnLoad {
        Box::new(move |record, counters| {
            let Some(counters) = counters.filter(|_| enabled()) else {
                return;
            };
            let key = KeyLimits::from_auth(record);
            if !self.is_known(&key) {
                self.seed(&key, counters, Utc::now());
                self.seeds.from_lookup.fetch_add(1, Relaxed);
            }
        })
    }

    /// Seeds `key` from the database unless this process already tracks it: one
    /// query per key per process (again only after two idle minutes). Concurrent
    /// first requests for one key share a single load. If the database cannot answer,
    /// the key starts from zero and learns the totals at the next flush.
    pub async fn ensure_seeded(&self, pool: &Pool, key: &KeyLimits, now: DateTime<Utc>) {
        if self.is_known(key) {
            return;
        }
        // The DashMap guard must not live across the awaits below: clone the gate out.
        let gate = Arc::clone(
            self.seeding
                .entry(key.key_id)
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
                .value(),
        );
        let _turn = gate.lock().await;
        if !self.is_known(key) {
            match load(pool, key, now).await {
                Ok(snapshot) => {
                    self.seed(key, &snapshot, now);
                    self.seeds.by_query.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    self.seeds.failed.fetch_add(1, Relaxed);
                    tracing::debug!(error = %e, key_id = %key.key_id, "cannot load limit counters; starting from zero");
                    // Counting from zero now makes the key known, so a down database
                    // costs one attempt per key, not one per request.
                    self.seed(key, &counters::Snapshot::empty(now), now);
                }
            }
        }
        self.seeding.remove_if(&key.key_id, |_, g| Arc::ptr_eq(g, &gate));
    }
}

/// Seeding runs on a key's first request, so it gets a short budget: past it the key
/// counts from zero and adopts the real totals at the next flush.
const SEED_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

async fn load(pool: &Pool, key: &KeyLimits, now: DateTime<Utc>) -> Result<counters::Snapshot, crate::db::DbError> {
    let load = async {
        let client = pool.get().await?;
        counters::load(&client, key.key_id, key.org_id, now).await
    };
    tokio::time::timeout(SEED_TIMEOUT, load)
        .await
        .unwrap_or_else(|_| Err(crate::db::DbError::Pool("counter seed timed out".into())))
}
