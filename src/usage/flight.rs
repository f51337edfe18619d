//! Batches in flight: which batch to start next, running each as its own task on a
//! pooled connection, and what its outcome means for the counters, the backoff and
//! the rows.
//!
//! Owns the retry policy: a failed batch is retried after a capped exponential
//! backoff (its outcome may be unknown; rows keep their ids, so a retry stores and
//! counts them once), and after [`SPILL_AFTER`] failures, or at once while the
//! database keeps failing, it moves to the spool. The event loop is `writer.rs`'; the
//! statement is `db::usage::write_batch`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::{Id, JoinError};
use tokio::time::Instant;

use super::spill::to_spool;
use super::writer::{Backoff, Writer, ATTEMPT_LIMIT};
use super::UsageRecord;
use crate::db::usage::{self as sql, BatchOutcome, UsageWriteError};

/// Failed attempts on one batch before it moves to the spool.
const SPILL_AFTER: u32 = 3;

/// A finished task: its id and the batch's outcome, or how the task itself ended.
pub(super) type Done = Result<(Id, Result<BatchOutcome, UsageWriteError>), JoinError>;

#[derive(Debug, Clone, Copy)]
pub(super) enum Origin {
    /// Recorded rows, after this many failed attempts.
    Live(u32),
    /// A chunk of a spool file; on failure it stays the replay's next chunk.
    Replay,
}

#[derive(Debug)]
pub(super) struct Flying {
    pub(super) rows: Arc<Vec<UsageRecord>>,
    pub(super) origin: Origin,
}

impl Writer {
    /// Starts batches while a lane is free and the backoff allows: failed batches
    /// first, then the live batch once full or due (any size while draining, until
    /// `deadline`), then replay chunks (never while draining).
    pub(super) async fn dispatch(&mut self, deadline: Option<Instant>) {
        let draining = deadline.is_some();
        if !draining && Instant::now() >= self.replay.next_scan {
            self.rescan(false).await;
        }
        while self.tasks.len() < self.lanes && Instant::now() >= self.retry_at {
            let now = Instant::now();
            let limit = deadline.map_or(ATTEMPT_LIMIT, |d| ATTEMPT_LIMIT.min(d.saturating_duration_since(now)));
            let due = draining || self.batch.len() >= self.batch_size || now >= self.batch_since + self.flush_interval;
            if let Some((rows, failed)) = self.retry.pop_front() {
                self.launch(rows, Origin::Live(failed), limit).await;
            } else if !self.batch.is_empty() && due {
                let rows = std::mem::replace(&mut self.batch, Vec::with_capacity(self.batch_size));
                self.launch(rows, Origin::Live(0), limit).await;
                // The next lane may take the next batch at once.
                self.pull_ready();
            } else if !draining && self.replay.ready() {
                if let Some(rows) = self.next_replay_chunk().await {
                    self.launch(rows, Origin::Replay, limit).await;
                }
            } else {
                break;
            }
        }
    }

    async fn launch(&mut self, rows: Vec<UsageRecord>, origin: Origin, limit: Duration) {
        if !self.failing {
            self.ensure_months(rows.iter().map(|r| r.timestamp.timestamp_millis()), limit)
                .await;
        }
        if let Origin::Replay = origin {
            self.replay.in_flight = true;
        }
        let rows = Arc::new(rows);
        let (pool, mine) = (self.pool.clone(), Arc::clone(&rows));
        let fresh = matches!(origin, Origin::Live(0));
        let task = self.tasks.spawn(async move {
            let started = std::time::Instant::now();
            // A live batch's first attempt: its ids were never sent, so the fast COPY
            // cannot double anything; retries and replays take the idempotent path.
            let result = if fresh {
                sql::write_fresh_batch(&pool, &mine, limit).await
            } else {
                sql::write_batch(&pool, &mine, limit).await
            };
            crate::telemetry::USAGE_FLUSH_SECONDS.record(started.elapsed());
            result
        });
        self.flying.insert(task.id(), Flying { rows, origin });
    }

    /// Books a finished task: counters and backoff, then its rows' next step.
    pub(super) async fn settle(&mut self, done: Done) {
        let (id, result) = match done {
            Ok((id, result)) => (id, Ok(result)),
            // A panic in a task: its rows are still in `flying`, so nothing is lost.
            Err(e) => (e.id(), Err(e)),
        };
        let Some(Flying { rows, origin }) = self.flying.remove(&id) else {
            return;
        };
        match result {
            Ok(Ok(outcome)) => {
                self.succeeded(&outcome);
                match origin {
                    Origin::Live(_) => self.shared.stats.settled(rows.len()),
                    Origin::Replay => {
                        self.shared.stats.replayed.fetch_add(rows.len() as u64, Relaxed);
                        self.replay.in_flight = false;
                    }
                }
            }
            Ok(Err(e)) => self.failed(&e, rows, origin).await,
            Err(e) => self.failed(&e, rows, origin).await,
        }
    }

    fn succeeded(&mut self, o: &BatchOutcome) {
        let stats = &self.shared.stats;
        stats.written.fetch_add(o.inserted, Relaxed);
        stats.duplicates.fetch_add(o.duplicates, Relaxed);
        stats.dropped.fetch_add(o.orphaned, Relaxed);
        let now_ms = chrono::Utc::now().timestamp_millis();
        stats.last_flush_ms.store(u64::try_from(now_ms).unwrap_or(0), Relaxed);
        if o.orphaned > 0 {
            tracing::warn!(
                rows = o.orphaned,
                "usage rows dropped: their key or organisation was deleted"
            );
        }
        if self.failing {
            tracing::info!("usage rows are being written again");
            // Whatever was spooled meanwhile can go in now.
            self.replay.next_scan = Instant::now();
        }
        self.failing = false;
        self.backoff = Backoff::default();
        self.retry_at = Instant::now();
    }

    async fn failed(&mut self, e: &(dyn std::fmt::Display + Sync), rows: Arc<Vec<UsageRecord>>, origin: Origin) {
        let stats = &self.shared.stats;
        stats.failed_batches.fetch_add(1, Relaxed);
        if self.failing {
            tracing::debug!(error = %e, "usage write failed again");
        } else {
            tracing::warn!(error = %e, rows = rows.len(), "cannot write usage rows; retrying, spooling meanwhile");
        }
        self.failing = true;
        self.retry_at = Instant::now() + self.backoff.next();
        // The task is over, so this is the only reference: no copy is made.
        let rows = Arc::unwrap_or_clone(rows);
        match origin {
            Origin::Replay => {
                self.replay.chunk = rows;
                self.replay.in_flight = false;
            }
            Origin::Live(failed) => {
                let failed = failed + 1;
                // A database that keeps failing should not hold rows in memory.
                let hopeless = failed >= SPILL_AFTER || self.backoff.step > SPILL_AFTER;
                let rows = if hopeless { self.spill(rows).await } else { rows };
                if !rows.is_empty() {
                    self.retry.push_back((rows, failed));
                }
            }
        }
    }

    /// Moves rows to the spool; returns them if the spool cannot take them, so the
    /// database stays their way out.
    async fn spill(&mut self, rows: Vec<UsageRecord>) -> Vec<UsageRecord> {
        match to_spool(&self.spool, &self.shared.stats, rows).await {
            Ok(()) => Vec::new(),
            Err((rows, e)) => {
                tracing::warn!(error = %e, rows = rows.len(), "cannot spool usage rows; keeping them in memory");
                rows
            }
        }
    }
}
