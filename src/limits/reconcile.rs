//! The bookkeeping half of a flush, with no I/O: moving unflushed deltas out of the
//! cells into a batch, putting them back, adopting the totals the database returns and
//! evicting idle cells.
//!
//! Owns which windows are written and read back and what happens to deltas whose
//! window a cell has moved past (the spill). Every method takes one cell lock at a
//! time, so it can never invert the hot path's key-then-org order.

use std::collections::HashMap;
use std::sync::PoisonError;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{lock, window, Limiter};
use crate::db::counters::WindowCount;

/// Cells idle for longer than this (and with nothing unflushed) are evicted: past two
/// minutes a key's windows no longer weigh on its estimate.
const IDLE_MS: i64 = 2 * window::MINUTE_MS;

/// How long past a minute's end other replicas' flushes may still add to it, beyond
/// two of this replica's flush intervals (each replica flushes its last deltas for a
/// minute within one interval of its end, and a slow flush delays the next by up to
/// another): the clocks of replicas' hosts may differ by this much. Until then a
/// flush reads the previous minute back; after it, that total is final, and reading
/// it every second for the rest of the minute (one index probe per active key) bought
/// nothing.
const PREVIOUS_MINUTE_SETTLES_MS: i64 = 10_000;

/// Spilled minute deltas older than this are dropped: they no longer affect any limit
/// and only bloat memory during a long outage. Monthly deltas are never dropped.
const SPILL_MAX_AGE_MINUTES: i64 = 60;

/// What one flush exchanges with the database.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub keys: Vec<WindowCount>,
    pub orgs: Vec<WindowCount>,
    /// Windows of recently active cells with nothing to write, whose totals other
    /// replicas may have moved.
    pub key_reads: Vec<(Uuid, DateTime<Utc>)>,
    pub org_reads: Vec<(Uuid, DateTime<Utc>)>,
    pub dropped: i64,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.orgs.is_empty() && self.key_reads.is_empty() && self.org_reads.is_empty()
    }
}

fn minute_index(t: DateTime<Utc>) -> i64 {
    window::minute_of(t.timestamp_millis()).0
}

/// Sorted, so that replicas flushing overlapping rows lock them in the same order.
fn to_rows(cells: HashMap<(Uuid, i64), i64>, start: impl Fn(i64) -> Option<DateTime<Utc>>) -> Vec<WindowCount> {
    let mut rows: Vec<WindowCount> = cells
        .into_iter()
        .filter_map(|((id, w), count)| {
            Some(WindowCount {
                id,
                window_start: start(w)?,
                count,
            })
        })
        .collect();
    rows.sort_unstable_by_key(|r| (r.id, r.window_start));
    rows
}

impl Limiter {
    /// Moves every unflushed delta (cells and spill) into a batch, and lists the
    /// windows of recently active cells to read back: the current minute, and the one
    /// before while other replicas may still be adding to it.
    pub(crate) fn take(&self, now: DateTime<Utc>) -> Batch {
        let now_ms = now.timestamp_millis();
        let now_minute = window::minute_of(now_ms).0;
        let now_month = window::month_bounds(now_ms).0;
        let every_ms = match self.flush_every_ms.load(std::sync::atomic::Ordering::Relaxed) {
            0 => 1_000,
            ms => ms,
        };
        let read_previous =
            window::minute_of(now_ms).1 <= every_ms.saturating_mul(2).saturating_add(PREVIOUS_MINUTE_SETTLES_MS);
        let mut keys: HashMap<(Uuid, i64), i64> = HashMap::new();
        let mut orgs: HashMap<(Uuid, i64), i64> = HashMap::new();
        let mut key_reads = Vec::new();
        let mut org_reads = Vec::new();

        for entry in self.keys.iter() {
            let id = *entry.key();
            let mut k = lock(entry.value());
            for (w, pending) in [(k.window, k.pending_cur), (k.window - 1, k.pending_prev)] {
                if pending != 0 {
                    *keys.entry((id, w)).or_insert(0) += pending;
                }
            }
            (k.pending_cur, k.pending_prev) = (0, 0);
            if now_ms - k.last_seen_ms <= IDLE_MS {
                key_reads.push((id, now_minute));
                if read_previous {
                    key_reads.push((id, now_minute - 1));
                }
            }
        }
        for entry in self.orgs.iter() {
            let id = *entry.key();
            let mut o = lock(entry.value());
            if o.pending != 0 {
                *orgs.entry((id, o.month_start)).or_insert(0) += o.pending;
                o.pending = 0;
            }
            if now_ms - o.last_seen_ms <= IDLE_MS {
                org_reads.push((id, now_month));
            }
        }

        let spilled = {
            let mut spill = lock(&self.spill);
            (std::mem::take(&mut spill.keys), std::mem::take(&mut spill.orgs))
        };
        let mut dropped = 0;
        for ((id, minute), delta) in spilled.0 {
            if minute < now_minute - SPILL_MAX_AGE_MINUTES {
                dropped += delta;
            } else {
                *keys.entry((id, minute)).or_insert(0) += delta;
            }
        }
        for (cell, delta) in spilled.1 {
            *orgs.entry(cell).or_insert(0) += delta;
        }

        // A window being written returns its total anyway; reading it too in the same
        // statement would see the total from before the write.
        key_reads.retain(|cell| !keys.contains_key(cell));
        org_reads.retain(|cell| !orgs.contains_key(cell));
        Batch {
            keys: to_rows(keys, window::minute_start),
            orgs: to_rows(orgs, DateTime::from_timestamp_millis),
            key_reads: key_reads
                .into_iter()
                .filter_map(|(id, m)| Some((id, window::minute_start(m)?)))
                .collect(),
            org_reads: org_reads
                .into_iter()
                .filter_map(|(id, m)| Some((id, DateTime::from_timestamp_millis(m)?)))
                .collect(),
            dropped,
        }
    }

    /// Puts deltas back into their cells, or into the spill when the cell has moved
    /// past their window or is gone.
    pub(crate) fn restore(&self, keys: Vec<WindowCount>, orgs: Vec<WindowCount>) {
        for d in keys {
            let minute = minute_index(d.window_start);
            let placed = self
                .keys
                .get(&d.id)
                .is_some_and(|e| lock(e.value()).restore(minute, d.count));
            if !placed {
                *lock(&self.spill).keys.entry((d.id, minute)).or_insert(0) += d.count;
            }
        }
        for d in orgs {
            let month = d.window_start.timestamp_millis();
            let placed = self
                .orgs
                .get(&d.id)
                .is_some_and(|e| lock(e.value()).restore(month, d.count));
            if !placed {
                *lock(&self.spill).orgs.entry((d.id, month)).or_insert(0) += d.count;
            }
        }
    }

    /// Adopts all replicas' totals. Cells are first moved to `now`'s window so a total
    /// for a minute this replica has not served yet still lands.
    pub(crate) fn adopt_keys(&self, rows: &[WindowCount], now: DateTime<Utc>) {
        let now_minute = minute_index(now);
        for r in rows {
            if let Some(e) = self.keys.get(&r.id) {
                let mut k = lock(e.value());
                let orphans = k.roll(now_minute);
                self.spill_key(r.id, orphans);
                k.adopt(minute_index(r.window_start), r.count);
            }
        }
    }

    pub(crate) fn adopt_orgs(&self, rows: &[WindowCount], now: DateTime<Utc>) {
        let now_ms = now.timestamp_millis();
        for r in rows {
            if let Some(e) = self.orgs.get(&r.id) {
                let mut o = lock(e.value());
                let orphan = o.roll(now_ms);
                self.spill_org(r.id, orphan);
                o.adopt(r.window_start.timestamp_millis(), r.count);
            }
        }
    }

    /// Drops cells idle for more than [`IDLE_MS`] with nothing unflushed. Returns how
    /// many keys and orgs went.
    pub(crate) fn evict_idle(&self, now: DateTime<Utc>) -> (usize, usize) {
        let cutoff = now.timestamp_millis() - IDLE_MS;
        let (mut keys, mut orgs) = (0, 0);
        // `retain` gives exclusive access, so the cells are read without locking.
        self.keys.retain(|_, cell| {
            let k = cell.get_mut().unwrap_or_else(PoisonError::into_inner);
            let keep = k.last_seen_ms >= cutoff || k.has_pending();
            keys += usize::from(!keep);
            keep
        });
        self.orgs.retain(|_, cell| {
            let o = cell.get_mut().unwrap_or_else(PoisonError::into_inner);
            let keep = o.last_seen_ms >= cutoff || o.pending != 0;
            orgs += usize::from(!keep);
            keep
        });
        (keys, orgs)
    }
}
