//! Moving rows from memory to the spool: the overflow task, which spools rows that
//! found the queue full as they come, and the shutdown drain, which gives PostgreSQL
//! until the deadline and spools the rest.
//!
//! Owns when rows go to disk and the accounting that goes with it (`spooled`, and
//! `dropped` when the spool refuses them), and the rate-limited report of drops. The
//! file format is `spool.rs`'; the normal path to PostgreSQL is `writer.rs`'.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::flight::Origin;
use super::sink::{Shared, UsageStats};
use super::spool::{Spool, SpoolError};
use super::writer::Writer;
use super::UsageRecord;

/// How often the overflow task looks for work it was not woken for, and for drops.
const SPILL_TICK: Duration = Duration::from_secs(1);
/// Dropped rows are reported at most this often, with the count since the last report.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

/// Appends `rows` to the spool on a blocking thread. On failure the rows come back,
/// for the caller to keep or drop.
pub(super) async fn to_spool(
    spool: &Arc<Spool>,
    stats: &UsageStats,
    rows: Vec<UsageRecord>,
) -> Result<(), (Vec<UsageRecord>, SpoolError)> {
    let n = rows.len();
    let spool = Arc::clone(spool);
    let done = tokio::task::spawn_blocking(move || match spool.append(&rows) {
        Ok(()) => Ok(()),
        Err(e) => Err((rows, e)),
    })
    .await;
    match done {
        Ok(Ok(())) => {
            stats.spooled.fetch_add(n as u64, Relaxed);
            stats.settled(n);
            Ok(())
        }
        Ok(Err(back)) => Err(back),
        Err(join) => {
            // The rows were moved into a task that panicked; they are gone.
            stats.drop_rows(n);
            tracing::error!(error = %join, rows = n, "usage spool task failed");
            Ok(())
        }
    }
}

/// Moves overflow rows to the spool as they come, until `stop`; the writer's drain
/// takes whatever is left after that. Also the one place that reports drops.
pub(super) async fn spill_overflow(shared: Arc<Shared>, spool: Arc<Spool>, stop: CancellationToken) {
    let mut reported = 0;
    let mut last_report: Option<Instant> = None;
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = shared.overflow.wake.notified() => {}
            () = tokio::time::sleep(SPILL_TICK) => {}
        }
        let rows = shared.overflow.take(usize::MAX);
        if !rows.is_empty() {
            if let Err((rows, e)) = to_spool(&spool, &shared.stats, rows).await {
                shared.stats.drop_rows(rows.len());
                last_error = Some(e.to_string());
            }
        }
        let dropped = shared.stats.dropped.load(Relaxed);
        if dropped > reported && last_report.is_none_or(|t| t.elapsed() >= DROP_LOG_EVERY) {
            tracing::error!(
                rows = dropped - reported,
                total = dropped,
                cause = last_error.take().as_deref().unwrap_or("see earlier messages"),
                "usage rows dropped"
            );
            reported = dropped;
            last_report = Some(Instant::now());
        }
    }
}

impl Writer {
    /// After `stop`: everything in memory goes to PostgreSQL until `deadline`, the
    /// rest to the spool. Later records are refused (and counted as dropped).
    pub(super) async fn drain(&mut self, deadline: Duration) {
        let deadline = Instant::now() + deadline;
        self.rx.close();
        loop {
            self.pull_ready();
            let room = self.batch_size - self.batch.len();
            if room > 0 {
                self.batch.extend(self.shared.overflow.take(room));
            }
            self.dispatch(Some(deadline)).await;
            let idle = self.tasks.is_empty()
                && self.batch.is_empty()
                && self.retry.is_empty()
                && self.shared.overflow.is_empty();
            if idle || Instant::now() >= deadline {
                break;
            }
            let waiting = !self.batch.is_empty() || !self.retry.is_empty();
            let wake = if waiting && self.tasks.len() < self.lanes {
                self.retry_at.min(deadline)
            } else {
                deadline
            };
            let done = tokio::select! {
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => Some(done),
                () = tokio::time::sleep_until(wake) => None,
            };
            if let Some(done) = done {
                self.settle(done).await;
            }
        }
        let mut rest = self.abort_in_flight().await;
        rest.append(&mut self.batch);
        for (mut rows, _) in self.retry.drain(..) {
            rest.append(&mut rows);
        }
        while let Ok(r) = self.rx.try_recv() {
            rest.push(r);
        }
        rest.extend(self.shared.overflow.close());
        if !rest.is_empty() {
            if let Err((rows, e)) = to_spool(&self.spool, &self.shared.stats, rest).await {
                tracing::error!(error = %e, rows = rows.len(), "usage rows dropped at shutdown: cannot spool them");
                self.shared.stats.drop_rows(rows.len());
            }
        }
        let spool = Arc::clone(&self.spool);
        match tokio::task::spawn_blocking(move || spool.seal()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot seal the usage spool file; it is replayed later"),
            Err(e) => tracing::warn!(error = %e, "usage spool task failed"),
        }
        let dropped = self.shared.stats.dropped.load(Relaxed);
        if dropped > 0 {
            tracing::warn!(total = dropped, "usage rows were dropped during this run");
        }
    }

    /// Stops the batches still in flight at the deadline and returns their live rows.
    /// Some may have committed already: spooled anyway, their replay is a no-op.
    /// Replay chunks are simply forgotten: their rows are still in their file.
    async fn abort_in_flight(&mut self) -> Vec<UsageRecord> {
        self.tasks.abort_all();
        let mut rest = Vec::new();
        while let Some(done) = self.tasks.join_next_with_id().await {
            match done {
                Err(e) if e.is_cancelled() => {
                    if let Some(f) = self.flying.remove(&e.id()) {
                        if let Origin::Live(_) = f.origin {
                            rest.extend(Arc::unwrap_or_clone(f.rows));
                        }
                    }
                }
                finished => self.settle(finished).await,
            }
        }
        rest
    }
}
