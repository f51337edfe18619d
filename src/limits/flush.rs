//! The flush protocol: take this replica's unflushed deltas, write them in one batched
//! statement per kind, adopt the totals of all replicas that come back, put the deltas
//! back if the write failed, and evict idle cells.
//!
//! Owns the I/O side of reconciling; the bookkeeping on the cells is `reconcile.rs`',
//! the timer is `background.rs`' (or the caller's) and the SQL is `db::counters`'.
//!
//! Delivery is at least once: if the connection dies after the database committed a
//! batch but before the reply arrived, the deltas are put back and counted again on
//! the next flush. That errs towards limiting, never towards letting traffic through.

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;

use super::reconcile::Batch;
use super::Limiter;
use crate::db::counters::{self, WindowCount};
use crate::db::DbError;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// (key, minute) deltas written.
    pub key_deltas: usize,
    /// (org, month) deltas written.
    pub org_deltas: usize,
    /// Totals of all replicas read back and adopted, written or read.
    pub totals: usize,
    pub evicted_keys: usize,
    pub evicted_orgs: usize,
    /// Requests in minute deltas dropped after an outage longer than an hour.
    pub dropped: i64,
}

/// Taken deltas not yet known to be stored. Dropping it puts them back, so an error,
/// an early return or a cancelled flush future all lose nothing.
struct Unflushed<'a> {
    limiter: &'a Limiter,
    keys: Vec<WindowCount>,
    orgs: Vec<WindowCount>,
}

impl Drop for Unflushed<'_> {
    fn drop(&mut self) {
        self.limiter
            .restore(std::mem::take(&mut self.keys), std::mem::take(&mut self.orgs));
    }
}

impl Limiter {
    /// Writes this replica's deltas, adopts every replica's totals and evicts idle
    /// cells. Deltas that could not be written are kept for the next call; the error
    /// is returned so the caller can log it and report the store as unhealthy.
    pub async fn flush(&self, pool: &Pool, now: DateTime<Utc>) -> Result<FlushStats, DbError> {
        let _serial = self.flushing.lock().await;
        let batch = self.take(now);
        let mut stats = FlushStats {
            key_deltas: batch.keys.len(),
            org_deltas: batch.orgs.len(),
            dropped: batch.dropped,
            ..FlushStats::default()
        };
        if batch.dropped > 0 {
            tracing::warn!(
                requests = batch.dropped,
                "dropped per-minute counts older than an hour that could not be flushed"
            );
        }
        let result = if batch.is_empty() {
            Ok(())
        } else {
            self.exchange(pool, batch, now, &mut stats).await
        };
        (stats.evicted_keys, stats.evicted_orgs) = self.evict_idle(now);
        result.map(|()| stats)
    }

    async fn exchange(
        &self,
        pool: &Pool,
        batch: Batch,
        now: DateTime<Utc>,
        stats: &mut FlushStats,
    ) -> Result<(), DbError> {
        let Batch {
            keys,
            orgs,
            key_reads,
            org_reads,
            ..
        } = batch;
        let mut unflushed = Unflushed {
            limiter: self,
            keys,
            orgs,
        };
        let client = pool.get().await?;
        let c: &tokio_postgres::Client = &client;
        // Both statements are pipelined on one connection. Neither may be abandoned
        // once sent, so they are joined, not try-joined.
        let (key_rows, org_rows) = {
            let (keys, orgs) = (&unflushed.keys, &unflushed.orgs);
            futures_util::future::join(
                async {
                    if keys.is_empty() && key_reads.is_empty() {
                        return Ok(Vec::new());
                    }
                    counters::add_key_minutes(c, keys, &key_reads).await
                },
                async {
                    if orgs.is_empty() && org_reads.is_empty() {
                        return Ok(Vec::new());
                    }
                    counters::add_org_months(c, orgs, &org_reads).await
                },
            )
            .await
        };
        let mut first_err = None;
        match key_rows {
            Ok(rows) => {
                unflushed.keys.clear();
                stats.totals += rows.len();
                self.adopt_keys(&rows, now);
            }
            Err(e) => first_err = Some(e),
        }
        match org_rows {
            Ok(rows) => {
                unflushed.orgs.clear();
                stats.totals += rows.len();
                self.adopt_orgs(&rows, now);
            }
            Err(e) => first_err = first_err.or(Some(e)),
        }
        drop(unflushed);
        first_err.map_or(Ok(()), Err)
    }
}
