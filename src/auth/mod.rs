//! Authentication: from a key digest to the cached [`AuthRecord`], the request lifecycle's
//! steps 3 and 4 (DESIGN.md).
//!
//! Owns the cache in front of `db::keys::lookup` (TTL, negative answers, serve-stale),
//! single-flight loading with a cap on concurrent lookups, preloading the key table and
//! keeping it in sync with change notifications. Inside: `cache` (the map and its
//! no-resurrection ordering), `table` (the sharded storage under it), `load` (single
//! flight, reloads), `gate` (the per-second cap on lookups that find no key), `sync`
//! (the background task); this file is the public face and the
//! shared state. It does not judge a record
//! (status, scopes and limits are the caller's, via `AuthRecord::status(now)`, so expiry
//! is evaluated at use time), parse keys from requests, or talk SQL itself: queries live
//! in `db`.

mod breaker;
mod cache;
mod gate;
mod load;
mod sync;
mod table;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use deadpool_postgres::Pool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{AuthConfig, DatabaseConfig};
use crate::db::counters::Snapshot;
use crate::db::DbError;
use crate::keys::KeyDigest;
use crate::model::AuthRecord;
use breaker::Breaker;
pub use breaker::BreakerState;
use cache::{Cache, Probe, Scope};
use gate::UnknownGate;
use load::Flight;

/// Why a digest did not authenticate. Cheap to copy: it is returned on every rejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("unknown API key")]
    Unknown,
    #[error("the key store is unavailable")]
    StoreUnavailable,
    /// Not asked: this second's lookups already found `max_unknown_lookups_per_second`
    /// unknown keys. Says nothing about the key; never a reason to fail open.
    #[error("too many unknown keys looked up this second")]
    Shed,
}

/// A snapshot of the cache's state and counters, for `/readyz` and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuthStats {
    /// Cached key records (including expired ones kept for serve-stale).
    pub cached: usize,
    /// Cached "no such key" answers.
    pub negative: usize,
    /// Answered from the cache without waiting on the database.
    pub hits: u64,
    /// Had to join or start a load.
    pub misses: u64,
    /// Lookups by digest sent to the database (one per single flight).
    pub db_lookups: u64,
    /// Bulk or by-id reloads completed (preload, sync).
    pub db_reloads: u64,
    /// Expired records served because the database could not be asked.
    pub stale_served: u64,
    /// Reloads started by a hit near the end of its record's freshness.
    pub refreshes: u64,
    /// Invalidations applied (notifications, resyncs and direct calls).
    pub invalidations: u64,
    /// Full resyncs after the listener (re)connected.
    pub resyncs: u64,
    pub listener_connected: bool,
    pub breaker: BreakerState,
    /// Times the circuit breaker opened.
    pub breaker_opened: u64,
    /// Uncached keys refused without a lookup because this second's lookups had found
    /// too many unknown keys.
    pub shed: u64,
}

/// A hook run on every record read from the database, before it is cached, with the
/// key's limit counters when the read had them (a lookup by digest; not bulk reloads).
pub type OnLoad = Box<dyn Fn(&AuthRecord, Option<&Snapshot>) + Send + Sync>;

type Outcome = Result<AuthRecord, AuthError>;

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    db_lookups: AtomicU64,
    db_reloads: AtomicU64,
    stale_served: AtomicU64,
    /// Hits near the end of their record's freshness that started (or joined) a reload.
    refreshes: AtomicU64,
    invalidations: AtomicU64,
    resyncs: AtomicU64,
    shed: AtomicU64,
}

struct Inner {
    cache: Cache,
    inflight: DashMap<KeyDigest, Flight>,
    lookups: Semaphore,
    pool: Pool,
    ttl: Duration,
    /// A fifth of the TTL: the most a reload can lead the end of freshness by.
    refresh_ahead: Duration,
    negative_ttl: Duration,
    /// The whole budget of one lookup, pool checkout included: a frozen database
    /// (no error, no answer) must not hold requests forever.
    lookup_timeout: Duration,
    /// How long past freshness a record may be served while the database is down.
    serve_stale_for: Duration,
    breaker: Breaker,
    unknown_gate: UnknownGate,
    listen_notify: bool,
    on_load: OnceLock<OnLoad>,
    counters: Counters,
    listener_connected: AtomicBool,
}

/// The authentication cache. `Send + Sync`; share it behind an `Arc`.
pub struct Authenticator {
    inner: Arc<Inner>,
}

impl Authenticator {
    pub fn new(cfg: &AuthConfig, pool: Pool) -> Self {
        Authenticator {
            inner: Arc::new(Inner {
                cache: Cache::new(),
                inflight: DashMap::new(),
                lookups: Semaphore::new(cfg.max_concurrent_lookups.max(1)),
                pool,
                ttl: cfg.cache_ttl,
                refresh_ahead: cfg.cache_ttl / 5,
                negative_ttl: cfg.negative_cache_ttl,
                lookup_timeout: cfg.lookup_timeout,
                serve_stale_for: cfg.serve_stale_for,
                breaker: Breaker::new(cfg.breaker_failures, cfg.breaker_cooldown),
                unknown_gate: UnknownGate::new(cfg.max_unknown_lookups_per_second),
                listen_notify: cfg.listen_notify,
                on_load: OnceLock::new(),
                counters: Counters::default(),
                listener_connected: AtomicBool::new(false),
            }),
        }
    }

    /// The hot path. A cache hit costs one shard read lock and a copy of the compact
    /// record; a miss joins the digest's single flight (or starts it) and waits for its
    /// answer.
    pub async fn authenticate(&self, digest: &KeyDigest) -> Result<AuthRecord, AuthError> {
        let inner = &self.inner;
        let now = Instant::now();
        match inner.cache.probe(digest, now) {
            Probe::Hit(record, fresh_until) => {
                inner.counters.hits.fetch_add(1, Relaxed);
                inner.refresh_if_due(digest, now, fresh_until);
                return Ok(record);
            }
            Probe::Unknown => {
                inner.counters.hits.fetch_add(1, Relaxed);
                return Err(AuthError::Unknown);
            }
            Probe::Miss => {}
        }
        // Before the flight, not in it: a refused key then never waits in the lookup
        // queue behind the flood it is refused for.
        if inner.unknown_gate.closed(now) {
            return inner.shed(digest, now);
        }
        inner.counters.misses.fetch_add(1, Relaxed);
        let mut done = inner.join_or_load(digest);
        // A closed channel means the load task died without answering (a panic, or the
        // runtime shutting down): nothing is known, so the store counts as unavailable.
        let answer = match done.wait_for(Option::is_some).await {
            Ok(v) => *v,
            Err(_) => None,
        };
        answer.unwrap_or(Err(AuthError::StoreUnavailable))
    }

    /// The cache's answer alone, without ever asking the database: `None` when the
    /// digest would need a lookup. Lets callers gate lookups without slowing hits.
    pub fn cached(&self, digest: &KeyDigest) -> Option<Result<AuthRecord, AuthError>> {
        let now = Instant::now();
        let answer = match self.inner.cache.probe(digest, now) {
            Probe::Hit(record, fresh_until) => {
                self.inner.refresh_if_due(digest, now, fresh_until);
                Ok(record)
            }
            Probe::Unknown => Err(AuthError::Unknown),
            Probe::Miss => return None,
        };
        self.inner.counters.hits.fetch_add(1, Relaxed);
        Some(answer)
    }

    pub fn invalidate_key(&self, key_id: Uuid) {
        self.inner.invalidate(Scope::Key(key_id));
    }

    pub fn invalidate_org(&self, org_id: Uuid) {
        self.inner.invalidate(Scope::Organization(org_id));
    }

    pub fn invalidate_all(&self) {
        self.inner.invalidate(Scope::All);
    }

    /// Loads every key with its organisation in one streamed query. From then on an
    /// absent digest is answered `Unknown` without asking the database, and `run_sync`
    /// keeps the table current (per-row reloads on notification, periodic full reloads).
    pub async fn preload(&self) -> Result<usize, DbError> {
        let n = self.inner.reload(Scope::All).await?;
        self.inner.cache.set_authoritative();
        Ok(n)
    }

    /// The background task: LISTEN for changes, reconnect with capped backoff, resync
    /// after every (re)connect, periodic reloads when preloaded, sweeps. Returns when
    /// `cancel` fires.
    pub async fn run_sync(self: Arc<Self>, db: DatabaseConfig, cancel: CancellationToken) {
        sync::run(self.inner.clone(), db, cancel).await;
    }

    pub fn stats(&self) -> AuthStats {
        let c = &self.inner.counters;
        let (cached, negative) = self.inner.cache.counts();
        AuthStats {
            cached,
            negative,
            hits: c.hits.load(Relaxed),
            misses: c.misses.load(Relaxed),
            db_lookups: c.db_lookups.load(Relaxed),
            db_reloads: c.db_reloads.load(Relaxed),
            stale_served: c.stale_served.load(Relaxed),
            refreshes: c.refreshes.load(Relaxed),
            invalidations: c.invalidations.load(Relaxed),
            resyncs: c.resyncs.load(Relaxed),
            listener_connected: self.inner.listener_connected.load(Relaxed),
            breaker: self.inner.breaker.state(Instant::now()),
            breaker_opened: self.inner.breaker.times_opened(),
            shed: c.shed.load(Relaxed),
        }
    }

    /// Sets the hook run on every record read from the database (lookups, preload,
    /// reloads), before the record is cached, so the limiter can seed its counters from
    /// the lookup's snapshot instead of asking again. It runs on the loading task, so it
    /// must be quick and idempotent: a key is looked up again after its TTL and reloaded
    /// after each change. Set once at start-up; returns false (and drops `f`) if a hook
    /// was already set.
    pub fn set_on_load(&self, f: OnLoad) -> bool {
        self.inner.on_load.set(f).is_ok()
    }

    /// For benchmarks only (`benches/`): makes room for `n` keys, as a preload that
    /// knows its count would. Not part of the API.
    #[doc(hidden)]
    pub fn bench_reserve(&self, n: usize) {
        self.inner.cache.reserve(n);
    }

    /// For benchmarks only (`benches/`): stores `record` under `digest` as a load would,
    /// fresh for the cache TTL, or with `None` a "no such key" answer fresh for the
    /// negative TTL, so a bench can warm the cache without a database. The on-load hook
    /// is not run. Not part of the API: the proxy never calls it.
    #[doc(hidden)]
    pub fn bench_insert(&self, digest: KeyDigest, record: Option<AuthRecord>) {
        let cache = &self.inner.cache;
        let start = cache.begin();
        let now = Instant::now();
        match record {
            Some(r) => cache.store_found(digest, r, start, now + self.inner.ttl),
            None => cache.store_unknown(digest, start, now + self.inner.negative_ttl),
        }
    }
}
impl Inner {
    /// A hit late in its record's freshness also starts the digest's reload in the
    /// background (or joins the one under way), so a key in use is refreshed before it
    /// expires, and its requests never wait on the lookup: without it, every active
    /// key's request waited once per TTL. The reload becomes due between 20% and 10%
    /// of the TTL before the end, by digest, so keys loaded together (after a restart)
    /// are reloaded spread over a tenth of the TTL rather than in one burst. The TTL
    /// still bounds how old a served record can be. Skipped while the breaker is not
    /// closed, and outside a Tokio runtime (benches).
    fn refresh_if_due(self: &Arc<Self>, digest: &KeyDigest, now: Instant, fresh_until: Instant) {
        // Most hits are early in the TTL: only those in its last fifth pay for the rest.
        if now + self.refresh_ahead < fresh_until {
            return;
        }
        let ahead = self
            .refresh_ahead
            .mul_f64(0.5 + f64::from(digest.as_bytes()[0]) / 512.0);
        if now + ahead < fresh_until
            || self.breaker.state(now) != BreakerState::Closed
            || tokio::runtime::Handle::try_current().is_err()
        {
            return;
        }
        self.counters.refreshes.fetch_add(1, Relaxed);
        drop(self.join_or_start(digest));
    }

    /// A record past its freshness that may stand in when the database is not asked
    /// (down, or the unknown-key cap shed the lookup): within `serve_stale_for`, never
    /// one a change notification invalidated. Counted as served.
    fn stale_record(&self, digest: &KeyDigest, now: Instant) -> Option<AuthRecord> {
        let record = self.cache.stale(digest, now, self.serve_stale_for)?;
        self.counters.stale_served.fetch_add(1, Relaxed);
        Some(record)
    }

    /// A miss the unknown-key cap refused a lookup: keys used before the flood keep
    /// working from a stale record; otherwise `Shed`.
    fn shed(&self, digest: &KeyDigest, now: Instant) -> Outcome {
        self.stale_record(digest, now).ok_or_else(|| {
            self.counters.shed.fetch_add(1, Relaxed);
            AuthError::Shed
        })
    }

    fn invalidate(&self, scope: Scope) {
        self.counters.invalidations.fetch_add(1, Relaxed);
        self.cache.invalidate(scope);
    }
}
