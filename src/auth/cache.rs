//! The digest → record map and the ordering rules that stop it going back in time.
//!
//! Owns the slots, their freshness, invalidation and the "no resurrection" rule. It does
//! no I/O and knows nothing of single flight, the database or notifications: callers
//! take a sequence number with [`Cache::begin`] before they read from the database and
//! hand it back when they store what they read.
//!
//! Ordering. Every load start and every invalidation takes a number from one counter.
//! A store is refused (the slot keeps newer data) when the slot was written or
//! invalidated after the load began, and is stored as *invalidated* (never served, always
//! fetched again) when an invalidation concerning that key or organisation was issued
//! after the load began: the load may have read the row from before the change. The
//! second rule needs a short log of recent invalidations, because the slot may not exist
//! yet when the invalidation arrives (a first load in flight). Checks run under the
//! slot's shard lock and invalidations log before they touch slots, so an invalidation
//! either sees the stored slot or the store sees the invalidation.
//!
//! Slots hold the compact record itself (`model::AuthRecord`, `Copy`, no heap), in the
//! packed table of `table`: a hit copies it out under the shard's read lock rather than
//! bumping a refcount that every request for the key would write.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::table::Table;
use crate::keys::KeyDigest;
use crate::model::AuthRecord;

/// Invalidations remembered for in-flight loads. A load older than the oldest one kept
/// is treated as invalidated: safe, and only reached under an invalidation storm.
const LOG_CAP: usize = 4096;

/// What an invalidation, a reload or a prune is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Scope {
    All,
    Key(Uuid),
    Organization(Uuid),
}

impl Scope {
    fn concerns(self, r: &AuthRecord) -> bool {
        match self {
            Scope::All => true,
            Scope::Key(id) => r.key_id == id,
            Scope::Organization(id) => r.organization_id == id,
        }
    }
}

enum State {
    Found {
        record: AuthRecord,
        fresh_until: Instant,
        /// Set by an invalidation: fetch again before use, and never serve it stale.
        invalidated: bool,
    },
    Unknown {
        fresh_until: Instant,
    },
}

struct Slot {
    /// The load start or invalidation that last wrote this slot.
    seq: u64,
    state: State,
}

/// What the hot path learns from one probe.
pub(crate) enum Probe {
    /// The record, and until when it is fresh.
    Hit(AuthRecord, Instant),
    Unknown,
    /// Absent, expired or invalidated: ask the database.
    Miss,
}

#[derive(Default)]
struct Log {
    entries: VecDeque<(u64, Scope)>,
    /// The newest sequence number dropped from `entries`.
    horizon: u64,
}

pub(crate) struct Cache {
    map: Table<Slot>,
    seq: AtomicU64,
    /// The sequence number of the newest invalidation; lets stores skip the log.
    invalidated_at: AtomicU64,
    log: Mutex<Log>,
    /// Set once the whole key table is loaded: an absent digest is then unknown.
    authoritative: AtomicBool,
    negatives_since_sweep: AtomicU64,
}

impl Cache {
    pub(crate) fn new() -> Self {
        Cache {
            map: Table::new(),
            seq: AtomicU64::new(1),
            invalidated_at: AtomicU64::new(0),
            log: Mutex::new(Log::default()),
            authoritative: AtomicBool::new(false),
            negatives_since_sweep: AtomicU64::new(0),
        }
    }

    /// The hot path: one shard read lock, released before returning.
    pub(crate) fn probe(&self, digest: &KeyDigest, now: Instant) -> Probe {
        let authoritative = self.authoritative.load(std::sync::atomic::Ordering::Relaxed);
        self.map.read_with(digest, |slot| match slot.map(|s| &s.state) {
            Some(State::Found {
                record,
                fresh_until,
                invalidated: false,
            }) if now < *fresh_until => Probe::Hit(*record, *fresh_until),
            Some(State::Found { .. }) => Probe::Miss,
            Some(State::Unknown { fresh_until }) if now < *fresh_until => Probe::Unknown,
            _ if authoritative => Probe::Unknown,
            _ => Probe::Miss,
        })
    }

    /// A record whose freshness ran out less than `ceiling` ago and that no invalidation
    /// touched: what may be served while the database is unreachable.
    pub(crate) fn stale(&self, digest: &KeyDigest, now: Instant, ceiling: Duration) -> Option<AuthRecord> {
        self.map.read_with(digest, |slot| match slot.map(|s| &s.state) {
            Some(State::Found {
                record,
                fresh_until,
                invalidated: false,
            }) if now < *fresh_until + ceiling => Some(*record),
            _ => None,
        })
    }

    /// A sequence number for a load about to read from the database.
    pub(crate) fn begin(&self) -> u64 {
        self.seq.fetch_add(1, SeqCst)
    }

    /// Whether no invalidation was issued since `start`: a flight begun at `start` may
    /// still be joined.
    pub(crate) fn unchanged_since(&self, start: u64) -> bool {
        self.invalidated_at.load(SeqCst) < start
    }

    pub(crate) fn set_authoritative(&self) {
        self.authoritative.store(true, SeqCst);
    }

    pub(crate) fn is_authoritative(&self) -> bool {
        self.authoritative.load(SeqCst)
    }

    /// Stores a record read by a load that began at `start`.
    pub(crate) fn store_found(&self, digest: KeyDigest, record: AuthRecord, start: u64, fresh_until: Instant) {
        // The closure runs under the shard's write lock.
        self.map.upsert_with(digest, |current| {
            if current.is_some_and(|slot| slot.seq > start) {
                return None;
            }
            let invalidated = self.invalidated_since(start, Some(&record));
            Some(Slot {
                seq: start,
                state: State::Found {
                    record,
                    fresh_until,
                    invalidated,
                },
            })
        });
    }

    /// Stores "no such key" found by a load that began at `start`.
    pub(crate) fn store_unknown(&self, digest: KeyDigest, start: u64, fresh_until: Instant) {
        let mut stored = false;
        self.map.upsert_with(digest, |current| {
            if current.is_some_and(|slot| slot.seq > start) {
                return None;
            }
            // Which key an absent row would have been is unknowable, so any invalidation
            // since the start (a key created meanwhile, say) makes the answer unsafe to keep.
            if self.invalidated_since(start, None) {
                return None;
            }
            stored = true;
            Some(Slot {
                seq: start,
                state: State::Unknown { fresh_until },
            })
        });
        if stored {
            self.negatives_since_sweep.fetch_add(1, SeqCst);
        }
    }

    /// Called under a shard lock, so it only takes the log's mutex, never a shard lock.
    fn invalidated_since(&self, start: u64, record: Option<&AuthRecord>) -> bool {
        if self.invalidated_at.load(SeqCst) < start {
            return false;
        }
        let Ok(log) = self.log.lock() else {
            return true;
        };
        if log.horizon > start {
            return true;
        }
        let Some(record) = record else { return true };
        log.entries
            .iter()
            .rev()
            .take_while(|(seq, _)| *seq > start)
            .any(|(_, scope)| scope.concerns(record))
    }

    /// Marks every record in `scope` as needing a fetch, and makes in-flight loads that
    /// began earlier store what they read as invalidated. `Scope::All` also forgets
    /// negative answers (a missed INSERT may have created one of those keys).
    pub(crate) fn invalidate(&self, scope: Scope) {
        let seq = self.fence(scope);
        // The log lock is released: stores hold a shard lock and then take the log's.
        self.map.retain(|slot| match &mut slot.state {
            State::Found {
                record, invalidated, ..
            } if scope.concerns(record) => {
                *invalidated = true;
                slot.seq = seq;
                true
            }
            State::Unknown { .. } => scope != Scope::All,
            State::Found { .. } => true,
        });
    }

    /// Only the in-flight half of [`Cache::invalidate`]: loads that began before now store
    /// what they read about `scope` as invalidated; cached slots are left as they are.
    /// For a full reload that will overwrite them anyway. Returns the fence's number.
    pub(crate) fn fence(&self, scope: Scope) -> u64 {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let seq = self.seq.fetch_add(1, SeqCst);
        log.entries.push_back((seq, scope));
        if log.entries.len() > LOG_CAP {
            if let Some((dropped, _)) = log.entries.pop_front() {
                log.horizon = dropped;
            }
        }
        self.invalidated_at.fetch_max(seq, SeqCst);
        seq
    }

    /// After a reload of `scope` that began at `start`: drops records in the scope that
    /// the reload did not see and nothing newer wrote (deleted keys, changed hashes).
    pub(crate) fn prune(&self, scope: Scope, start: u64) {
        self.map.retain(|slot| {
            slot.seq >= start
                || match &slot.state {
                    State::Found { record, .. } => !scope.concerns(record),
                    State::Unknown { .. } => scope != Scope::All,
                }
        });
    }

    /// Whether enough negative answers piled up for a sweep to be worth its O(n).
    pub(crate) fn sweep_due(&self, threshold: u64) -> bool {
        self.negatives_since_sweep.load(SeqCst) >= threshold
    }

    /// Frees expired negative answers and, when not authoritative, invalidated records
    /// (a miss fetches them anyway). Returns how many slots were dropped.
    pub(crate) fn sweep(&self, now: Instant) -> usize {
        self.negatives_since_sweep.store(0, SeqCst);
        let authoritative = self.is_authoritative();
        let before = self.map.len();
        self.map.retain(|slot| match &slot.state {
            State::Unknown { fresh_until } => now < *fresh_until,
            State::Found { invalidated, .. } => authoritative || !*invalidated,
        });
        before.saturating_sub(self.map.len())
    }

    /// (records, negative answers). O(n): for stats and metrics, not the request path.
    pub(crate) fn counts(&self) -> (usize, usize) {
        self.map.fold((0, 0), |(f, u), slot| match slot.state {
            State::Found { .. } => (f + 1, u),
            State::Unknown { .. } => (f, u + 1),
        })
    }

    /// Room for `n` more slots, for a load that knows how many it will store.
    pub(crate) fn reserve(&self, n: usize) {
        self.map.reserve(n);
    }
}
