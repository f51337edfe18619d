//! The limits engine: requests per minute per key and the organisation's monthly
//! quota, decided in memory on the hot path and reconciled with the other replicas
//! through periodic flushes.
//!
//! Owns the in-memory counters, the allow/refuse decision and the numbers behind the
//! `RateLimit-*` and `Retry-After` headers, and the background flush task. It does not
//! own the SQL (that is `db::counters`), the headers themselves (the proxy's), nor
//! where the limits come from (`model::AuthRecord`).
//!
//! Per minute: a sliding-window counter over UTC-minute windows, estimate =
//! previous * (1 - elapsed fraction) + current, allowed if estimate + 1 <= limit.
//! Per month: a plain counter per UTC calendar month, shared by the org's keys.
//!
//! All-or-nothing: `check` locks the key's cell, then the org's cell, decides on both
//! and increments both before unlocking, so a request refused by either limit consumes
//! neither and concurrent requests can never both take the last unit. Lock order is
//! always key, then org, then the spill; flush code holds at most one cell at a time
//! and never a DashMap guard across an `.await`, so no order can invert.
//!
//! Files: `window` (time arithmetic), `state` (one cell's rules), `reconcile` (flush
//! bookkeeping, no I/O), `flush` (the flush's I/O), `background` (flush task, seeding).

mod background;
mod concurrency;
mod flush;
mod reconcile;
mod state;
pub mod window;

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use dashmap::mapref::one::Ref;
use dashmap::DashMap;
use uuid::Uuid;

pub use crate::db::counters::Snapshot;
use crate::model::AuthRecord;
pub use concurrency::{Concurrency, Slot};
pub use flush::FlushStats;
use state::{KeyState, OrgState, Orphan};

/// The limits that apply to one key, read from its auth record on every request so a
/// changed limit takes effect without reseeding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLimits {
    pub key_id: Uuid,
    pub org_id: Uuid,
    /// Requests per minute; 0 refuses everything.
    pub per_minute: i64,
    /// Requests per calendar month for the whole organisation; 0 refuses everything.
    pub monthly: i64,
}

impl KeyLimits {
    pub fn from_auth(rec: &AuthRecord) -> Self {
        KeyLimits {
            key_id: rec.key_id,
            org_id: rec.organization_id,
            per_minute: rec.rate_limit_per_minute(),
            monthly: rec.monthly_request_limit(),
        }
    }
}

/// The per-minute numbers every response reports, whatever the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    pub limit: i64,
    /// Whole requests left under the per-minute limit after this one, never negative.
    pub remaining: i64,
    /// Seconds until the current minute window ends (1..=60).
    pub reset_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    PerMinute,
    Monthly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed(RateInfo),
    /// Refused; nothing was counted. When both limits refuse, `which` is `Monthly`,
    /// the one that lasts longer.
    Limited {
        info: RateInfo,
        which: LimitKind,
        /// Seconds until a retry could succeed if nothing else is sent meanwhile. A
        /// per-minute limit of 0 never lets anything through; it reports the seconds to
        /// the end of the minute.
        retry_after_secs: u64,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed(_))
    }

    pub fn info(&self) -> &RateInfo {
        match self {
            Decision::Allowed(info) | Decision::Limited { info, .. } => info,
        }
    }
}

/// How much in-memory state the limiter holds, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracked {
    pub keys: usize,
    pub orgs: usize,
    /// Unflushed deltas whose window their cell has moved past (database down for a
    /// while); they wait for the next successful flush.
    pub spilled: usize,
    /// Keys seeded from the counters their auth lookup read (no query of their own).
    pub seeded_from_lookup: u64,
    /// Keys seeded by a query of their own (`ensure_seeded`: the key was cached, but
    /// the limiter did not know it, as after a preload or two idle minutes).
    pub seeded_by_query: u64,
    /// Seeds whose query failed or timed out: those keys started from zero.
    pub seed_failures: u64,
}

/// Deltas that lost their cell's slot, keyed by (id, window) as in [`Orphan`].
#[derive(Debug, Default)]
struct Spill {
    keys: HashMap<(Uuid, i64), i64>,
    orgs: HashMap<(Uuid, i64), i64>,
}

pub(crate) type FastHash = hashbrown::DefaultHashBuilder;

/// The in-memory counters of one replica. Share it behind an `Arc`.
#[derive(Debug, Default)]
pub struct Limiter {
    // foldhash, not SipHash: the ids are ours (a key is looked up here only after it
    // authenticated), so there is no flooding to resist, and these are hashed on
    // every request.
    keys: DashMap<Uuid, Mutex<KeyState>, FastHash>,
    orgs: DashMap<Uuid, Mutex<OrgState>, FastHash>,
    spill: Mutex<Spill>,
    /// Serialises flushes: two overlapping flushes could adopt totals out of order.
    flushing: tokio::sync::Mutex<()>,
    /// One load per key at a time in `ensure_seeded`; entries live only while loading.
    seeding: DashMap<Uuid, std::sync::Arc<tokio::sync::Mutex<()>>>,
    seeds: Seeds,
    /// The flusher's interval in ms (0 until one runs: the 1 s default), which says
    /// how long into a minute other replicas may still add to the one before.
    flush_every_ms: std::sync::atomic::AtomicI64,
}

/// How keys got their starting counts, for `/metrics`: a key seeded by a query of its
/// own made its first request wait on a second round trip.
#[derive(Debug, Default)]
struct Seeds {
    from_lookup: std::sync::atomic::AtomicU64,
    by_query: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

/// The cells hold only counters that every step leaves consistent, so a panic while
/// one was locked cannot have left it half-written.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Limiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether both the key and its organisation have in-memory state. When not, the
    /// proxy should load a [`Snapshot`] (`db::counters::load`) and [`seed`](Self::seed)
    /// before the first `check`, or call `ensure_seeded`, which does both; idle entries
    /// are evicted after two minutes.
    pub fn is_known(&self, key: &KeyLimits) -> bool {
        self.keys.contains_key(&key.key_id) && self.orgs.contains_key(&key.org_id)
    }

    pub fn tracked(&self) -> Tracked {
        let spill = lock(&self.spill);
        let seeds = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
        Tracked {
            keys: self.keys.len(),
            orgs: self.orgs.len(),
            spilled: spill.keys.len() + spill.orgs.len(),
            seeded_from_lookup: seeds(&self.seeds.from_lookup),
            seeded_by_query: seeds(&self.seeds.by_query),
            seed_failures: seeds(&self.seeds.failed),
        }
    }

    /// Seeds a key and its organisation with the database's totals. Safe to call for a
    /// known key or concurrently with `check`: counts only ever grow to the larger of
    /// the two views, and the next flush settles them on the true total.
    pub fn seed(&self, key: &KeyLimits, snapshot: &Snapshot, now: DateTime<Utc>) {
        let now_ms = now.timestamp_millis();
        let snap_minute = window::minute_of(snapshot.minute_start.timestamp_millis()).0;
        {
            let entry = self.key_entry(key.key_id, now_ms);
            let mut k = lock(&entry);
            let orphans = k.roll(window::minute_of(now_ms).0);
            self.spill_key(key.key_id, orphans);
            k.merge(snap_minute, snapshot.minute_count, snapshot.previous_minute_count);
            k.last_seen_ms = now_ms;
        }
        let entry = self.org_entry(key.org_id, now_ms);
        let mut o = lock(&entry);
        let orphan = o.roll(now_ms);
        self.spill_org(key.org_id, orphan);
        o.merge(snapshot.month_start.timestamp_millis(), snapshot.month_count);
        o.last_seen_ms = now_ms;
    }

    /// Decides one request and, if allowed, counts it against both limits. No I/O; no
    /// allocation once the key and org are known. An unknown key starts from zero
    /// and learns the database's totals at the next flush.
    pub fn check(&self, key: &KeyLimits, now: DateTime<Utc>) -> Decision {
        let now_ms = now.timestamp_millis();
        let per_minute = key.per_minute.max(0);

        let key_entry = self.key_entry(key.key_id, now_ms);
        let mut k = lock(&key_entry);
        let (mut minute, mut elapsed) = window::minute_of(now_ms);
        if minute < k.window {
            // The clock stepped back: stay in the newer window, at its most
            // conservative point.
            (minute, elapsed) = (k.window, 0);
        }
        let orphans = k.roll(minute);
        self.spill_key(key.key_id, orphans);
        k.last_seen_ms = now_ms;

        let org_entry = self.org_entry(key.org_id, now_ms);
        let mut o = lock(&org_entry);
        let orphan = o.roll(now_ms);
        self.spill_org(key.org_id, orphan);
        o.last_seen_ms = now_ms;

        let minute_ok = window::allows(k.prev, k.cur, per_minute, elapsed);
        let month_ok = o.count < key.monthly;
        if minute_ok && month_ok {
            k.cur += 1;
            k.pending_cur += 1;
            o.count += 1;
            o.pending += 1;
        }
        let (prev, cur, month_end) = (k.prev, k.cur, o.month_end);
        drop(o);
        drop(org_entry);
        drop(k);
        drop(key_entry);

        let info = RateInfo {
            limit: per_minute,
            remaining: window::remaining(prev, cur, per_minute, elapsed),
            reset_secs: window::reset_secs(elapsed),
        };
        if minute_ok && month_ok {
            return Decision::Allowed(info);
        }
        if !month_ok {
            return Decision::Limited {
                info,
                which: LimitKind::Monthly,
                retry_after_secs: window::ceil_secs(month_end.saturating_sub(now_ms)),
            };
        }
        let retry_after_secs = match window::wait_ms(prev, cur, per_minute, elapsed) {
            Some(ms) => window::ceil_secs(ms),
            None => info.reset_secs,
        };
        Decision::Limited {
            info,
            which: LimitKind::PerMinute,
            retry_after_secs,
        }
    }

    fn key_entry(&self, id: Uuid, now_ms: i64) -> Ref<'_, Uuid, Mutex<KeyState>> {
        if let Some(e) = self.keys.get(&id) {
            return e;
        }
        self.keys
            .entry(id)
            .or_insert_with(|| Mutex::new(KeyState::new(now_ms)))
            .downgrade()
    }

    fn org_entry(&self, id: Uuid, now_ms: i64) -> Ref<'_, Uuid, Mutex<OrgState>> {
        if let Some(e) = self.orgs.get(&id) {
            return e;
        }
        self.orgs
            .entry(id)
            .or_insert_with(|| Mutex::new(OrgState::new(now_ms)))
            .downgrade()
    }

    /// Keeps deltas a cell moved past for the next flush. Rare (only when flushes have
    /// been failing for a minute), so the hot path pays nothing when there are none.
    fn spill_key(&self, id: Uuid, orphans: [Orphan; 2]) {
        if orphans.iter().all(|o| o.1 == 0) {
            return;
        }
        let mut spill = lock(&self.spill);
        for (minute, delta) in orphans.into_iter().filter(|o| o.1 != 0) {
            *spill.keys.entry((id, minute)).or_insert(0) += delta;
        }
    }

    fn spill_org(&self, id: Uuid, (month, delta): Orphan) {
        if delta != 0 {
            *lock(&self.spill).orgs.entry((id, month)).or_insert(0) += delta;
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_reconcile;
