//! The request path's side of usage metering: the [`UsageSink`] handle, the bounded
//! overflow that catches rows when the writer's queue is full, and the [`UsageStats`]
//! counters.
//!
//! Owns the promise that recording never waits: `record` is a `try_send`, and on a
//! full queue a push onto a short mutex-protected `Vec` that the overflow task moves to
//! the spool. It does not write anything anywhere; `writer.rs` and `spool.rs` do.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Notify};

use super::UsageRecord;

/// The writer's counters, readable while it runs and after `run` returns.
#[derive(Debug, Default)]
pub struct UsageStats {
    /// Rows held only in memory: in the queue, the overflow or a batch being written.
    pub queued: AtomicU64,
    /// Rows newly inserted into `api_key_usage` (live and replayed).
    pub written: AtomicU64,
    /// Rows a write found already stored (a retry or replay of a committed batch).
    pub duplicates: AtomicU64,
    /// Rows appended to the spool.
    pub spooled: AtomicU64,
    /// Rows read back from spool files and committed (new or duplicate).
    pub replayed: AtomicU64,
    /// Rows lost: spool unusable or full, overflow full, recorded after shutdown,
    /// key or organisation deleted, or an unreadable spool line.
    pub dropped: AtomicU64,
    /// Write attempts that failed (each is retried or spooled, not lost).
    pub failed_batches: AtomicU64,
    /// Unix time in milliseconds of the last committed batch; 0 before the first.
    pub last_flush_ms: AtomicU64,
}

/// A plain copy of [`UsageStats`], for reports and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageCounts {
    pub queued: u64,
    pub written: u64,
    pub duplicates: u64,
    pub spooled: u64,
    pub replayed: u64,
    pub dropped: u64,
    pub failed_batches: u64,
    pub last_flush_ms: u64,
}

impl UsageStats {
    pub fn snapshot(&self) -> UsageCounts {
        UsageCounts {
            queued: self.queued.load(Relaxed),
            written: self.written.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            spooled: self.spooled.load(Relaxed),
            replayed: self.replayed.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            failed_batches: self.failed_batches.load(Relaxed),
            last_flush_ms: self.last_flush_ms.load(Relaxed),
        }
    }

    /// `n` rows left memory: stored, spooled or given up on.
    pub(super) fn settled(&self, n: usize) {
        let _ = self
            .queued
            .fetch_update(Relaxed, Relaxed, |q| Some(q.saturating_sub(n as u64)));
    }

    pub(super) fn drop_rows(&self, n: usize) {
        self.dropped.fetch_add(n as u64, Relaxed);
        self.settled(n);
    }
}

/// Rows that found the queue full, waiting for the overflow task to spool them.
#[derive(Debug)]
pub(super) struct Overflow {
    rows: Mutex<OverflowRows>,
    cap: usize,
    /// Wakes the overflow task; `notify_one` never blocks and keeps one permit.
    pub(super) wake: Notify,
}

#[derive(Debug, Default)]
struct OverflowRows {
    rows: Vec<UsageRecord>,
    /// Set once the writer has taken the last rows at shutdown.
    closed: bool,
}

impl Overflow {
    pub(super) fn new(cap: usize) -> Overflow {
        Overflow {
            rows: Mutex::new(OverflowRows::default()),
            cap,
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OverflowRows> {
        // The critical sections cannot panic half-way; a poisoned lock is still sound.
        self.rows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// False if the row could not be kept: overflow full or closed.
    fn push(&self, r: UsageRecord) -> bool {
        let was_empty = {
            let mut g = self.lock();
            if g.closed || g.rows.len() >= self.cap {
                return false;
            }
            g.rows.push(r);
            g.rows.len() == 1
        };
        if was_empty {
            self.wake.notify_one();
        }
        true
    }

    /// Up to `max` of the oldest rows.
    pub(super) fn take(&self, max: usize) -> Vec<UsageRecord> {
        let mut g = self.lock();
        if g.rows.len() <= max {
            std::mem::take(&mut g.rows)
        } else {
            g.rows.drain(..max).collect()
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().rows.is_empty()
    }

    /// Refuses every later row and returns what is left.
    pub(super) fn close(&self) -> Vec<UsageRecord> {
        let mut g = self.lock();
        g.closed = true;
        std::mem::take(&mut g.rows)
    }
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) stats: Arc<UsageStats>,
    pub(super) overflow: Overflow,
}

impl Shared {
    pub(super) fn new(overflow_cap: usize) -> Shared {
        Shared {
            stats: Arc::new(UsageStats::default()),
            overflow: Overflow::new(overflow_cap),
        }
    }
}

/// Cheap to clone; the request path's only contact with the writer.
#[derive(Debug, Clone)]
pub struct UsageSink {
    tx: mpsc::Sender<UsageRecord>,
    shared: Arc<Shared>,
}

impl UsageSink {
    pub(super) fn new(tx: mpsc::Sender<UsageRecord>, shared: Arc<Shared>) -> UsageSink {
        UsageSink { tx, shared }
    }

    /// Never blocks, never awaits, never does I/O on the caller's task: the row goes
    /// to the writer's queue, else to the overflow on its way to the spool. A row that
    /// fits neither (spool task far behind, or the writer already shut down) is counted
    /// in `dropped`; the writer's tasks log those, never this call.
    pub fn record(&self, r: UsageRecord) {
        let stats = &self.shared.stats;
        stats.queued.fetch_add(1, Relaxed);
        let r = match self.tx.try_send(r) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r)) => r,
        };
        if !self.shared.overflow.push(r) {
            stats.drop_rows(1);
        }
    }

    pub fn stats(&self) -> Arc<UsageStats> {
        Arc::clone(&self.shared.stats)
    }
}
