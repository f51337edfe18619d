//! Loading from the database: single flight per digest under a cap on concurrent
//! lookups, serve-stale on failure, and bulk or by-id reloads.
//!
//! Owns the in-flight map, the spawned load tasks and the on-load hook's call sites. It
//! does not own the cache's ordering rules (`cache`) or the SQL (`db`); every load takes
//! a sequence number before it reads and hands it to the cache with what it read.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use dashmap::mapref::entry::Entry;
use tokio::sync::watch;

use super::breaker::{Breaker, Permit};
use super::cache::Probe;
use super::{AuthError, Inner, Outcome, Scope};
use crate::db::auth_queries::{self, Selector};
use crate::db::counters::Snapshot;
use crate::db::keys::Found;
use crate::db::DbError;
use crate::keys::KeyDigest;
use crate::model::AuthRecord;

/// Negative answers stored between two sweeps run from the load path, so the cache stays
/// bounded under a flood of random keys even without the sync task.
const SWEEP_EVERY: u64 = 16_384;

/// Tries of one lookup when its connection is lost under it.
const LOOKUP_ATTEMPTS: u32 = 3;

/// What a flight's lookup came to, when the database did not fail it.
enum Asked {
    Read(Option<Found>),
    /// Not made: while it queued for a permit, this second's lookups found the cap of
    /// unknown keys (`gate`). Says nothing of the database's health.
    Shed,
}

pub(super) struct Flight {
    start: u64,
    done: watch::Receiver<Option<Outcome>>,
}

impl Inner {
    /// For a request whose probe missed: joins the digest's flight, or answers from the
    /// cache if a flight finished since that probe, or starts one. Without the second
    /// look, a request preempted between its probe and here (a loaded box) found the
    /// flight gone and asked the database again for an answer already cached.
    pub(super) fn join_or_load(self: &Arc<Self>, digest: &KeyDigest) -> watch::Receiver<Option<Outcome>> {
        self.flight(digest, true)
    }

    /// Joins the digest's flight if it began after the last invalidation; otherwise
    /// starts a new one, whatever the cache holds (a refresh ahead of expiry).
    pub(super) fn join_or_start(self: &Arc<Self>, digest: &KeyDigest) -> watch::Receiver<Option<Outcome>> {
        self.flight(digest, false)
    }

    /// `miss`: for a request whose probe missed (the cache is looked at again, and the
    /// lookup may be shed), not a refresh. The map guard is dropped before the task is
    /// spawned. The cache is read under it, which is safe because nothing takes an
    /// in-flight lock while holding a cache lock.
    fn flight(self: &Arc<Self>, digest: &KeyDigest, miss: bool) -> watch::Receiver<Option<Outcome>> {
        let (start, tx, rx) = match self.inflight.entry(*digest) {
            Entry::Occupied(e) if self.cache.unchanged_since(e.get().start) => {
                return e.get().done.clone();
            }
            entry => {
                // A flight stores its answer before it leaves this map, so holding the
                // entry, any answer that flight produced is visible here.
                let cached = match miss.then(|| self.cache.probe(digest, Instant::now())) {
                    Some(Probe::Hit(record, _)) => Some(Ok(record)),
                    Some(Probe::Unknown) => Some(Err(AuthError::Unknown)),
                    Some(Probe::Miss) | None => None,
                };
                if let Some(outcome) = cached {
                    return watch::channel(Some(outcome)).1;
                }
                let start = self.cache.begin();
                let (tx, rx) = watch::channel(None);
                let flight = Flight {
                    start,
                    done: rx.clone(),
                };
                match entry {
                    Entry::Occupied(mut e) => {
                        e.insert(flight);
                    }
                    Entry::Vacant(e) => {
                        e.insert(flight);
                    }
                }
                (start, tx, rx)
            }
        };
        // Spawned, not awaited here: if the request that started the flight goes away,
        // the load still finishes for the others and for the cache. A request's miss may
        // be shed by the unknown-key cap; a refresh is of a key known to exist, and
        // shedding it would expire keys in use during a flood.
        tokio::spawn(self.clone().fly(*digest, start, tx, miss));
        rx
    }

    async fn fly(self: Arc<Self>, digest: KeyDigest, start: u64, tx: watch::Sender<Option<Outcome>>, gated: bool) {
        let outcome = self.load_one(&digest, start, gated).await;
        // Cache first, then leave the in-flight map: a request arriving in between finds
        // the cached answer instead of starting a second load.
        self.inflight.remove_if(&digest, |_, f| f.start == start);
        tx.send_replace(Some(outcome));
        if self.cache.sweep_due(SWEEP_EVERY) {
            self.cache.sweep(Instant::now());
        }
    }

    async fn load_one(&self, digest: &KeyDigest, start: u64, gated: bool) -> Outcome {
        match self.fetch_one(digest, gated).await {
            Ok(Asked::Read(Some(Found { record, counters }))) => {
                // The callers get what was read even if the cache refuses to keep it (an
                // invalidation arrived meanwhile): they asked before the change was known.
                self.loaded(&record, Some(&counters));
                let fresh_until = Instant::now() + self.ttl;
                self.cache.store_found(*digest, record, start, fresh_until);
                Ok(record)
            }
            Ok(Asked::Read(None)) => {
                self.unknown_gate.record(Instant::now());
                let fresh_until = Instant::now() + self.negative_ttl;
                self.cache.store_unknown(*digest, start, fresh_until);
                Err(AuthError::Unknown)
            }
            Ok(Asked::Shed) => self.shed(digest, Instant::now()),
            Err(e) => {
                let stale = self.stale_record(digest, Instant::now());
                tracing::debug!(error = %e, serving_stale = stale.is_some(), "key store unavailable");
                stale.ok_or(AuthError::StoreUnavailable)
            }
        }
    }

    /// One lookup, unless the breaker is open. Every outcome is reported to the breaker:
    /// "no such key" is a healthy answer, any error (pool, connection, timeout) is not.
    async fn fetch_one(&self, digest: &KeyDigest, gated: bool) -> Result<Asked, DbError> {
        // Dropping the guard after the report is harmless: the report already settled
        // the probe slot (closed, or open again for a cooldown).
        let _probe = match self.breaker.permit(Instant::now()) {
            Permit::Refused => return Err(DbError::Pool("circuit breaker open".into())),
            Permit::Probe => Some(ProbeGuard(&self.breaker)),
            Permit::Go => None,
        };
        let result = self.ask(digest, gated).await;
        match &result {
            Ok(Asked::Read(_)) => self.breaker.succeeded(),
            // A probe that was shed frees its slot through the guard.
            Ok(Asked::Shed) => {}
            Err(_) => self.breaker.failed(Instant::now()),
        }
        result
    }

    async fn ask(&self, digest: &KeyDigest, gated: bool) -> Result<Asked, DbError> {
        let _permit = self
            .lookups
            .acquire()
            .await
            .map_err(|_| DbError::Pool("lookup limiter closed".into()))?;
        // Asked again after the wait: under a flood the queue holds many more misses than
        // the cap, all let in before it closed, and each would still cost a query.
        if gated && self.unknown_gate.closed(Instant::now()) {
            return Ok(Asked::Shed);
        }
        // A pooled connection whose backend was just terminated fails at once; the lookup
        // is retried on another connection (within the same budget) rather than turning a
        // failover or a killed backend into a 503 for a key that was merely re-validated.
        let lookup = async {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let client = self.pool.get().await?;
                self.counters.db_lookups.fetch_add(1, Relaxed);
                match crate::db::keys::lookup(&client, digest, Utc::now()).await {
                    Err(e) if attempt < LOOKUP_ATTEMPTS && e.is_lost_connection() => {
                        tracing::debug!(error = %e, "key lookup lost its connection; retrying");
                    }
                    other => return other,
                }
            }
        };
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(self.lookup_timeout, lookup)
            .await
            .unwrap_or_else(|_| Err(DbError::Pool("key lookup timed out".into())));
        crate::telemetry::DB_LOOKUP_SECONDS.record(started.elapsed());
        result.map(Asked::Read)
    }

    /// Reads every record in `scope` and stores it, then drops cached records in the
    /// scope that the read did not return. Records the caller must not miss are never
    /// dropped on failure: an error returns before the prune.
    pub(super) async fn reload(&self, scope: Scope) -> Result<usize, DbError> {
        let start = self.cache.begin();
        let client = self.pool.get().await?;
        let selector = match scope {
            Scope::All => Selector::All,
            Scope::Key(id) => Selector::Key(id),
            Scope::Organization(id) => Selector::Organization(id),
        };
        let fresh_until = Instant::now() + self.ttl;
        let n = auth_queries::for_each_record(&**client, selector, |digest, record| {
            self.loaded(&record, None);
            self.cache.store_found(digest, record, start, fresh_until);
        })
        .await?;
        self.cache.prune(scope, start);
        self.counters.db_reloads.fetch_add(1, Relaxed);
        Ok(n)
    }

    fn loaded(&self, record: &AuthRecord, counters: Option<&Snapshot>) {
        if let Some(hook) = self.on_load.get() {
            hook(record, counters);
        }
    }
}

/// Frees the half-open probe slot if the probing lookup never reports (its task was
/// dropped mid-await), so the breaker cannot stay refusing forever.
struct ProbeGuard<'a>(&'a Breaker);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.abandon_probe();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Authenticator;
    use crate::config::Config;

    fn record() -> AuthRecord {
        AuthRecord::new(crate::model::test_fields("tstA", &["chat"]))
    }

    /// Nothing listens on port 1: any lookup fails, so an answer can only come from the cache.
    fn offline() -> Authenticator {
        let url = "postgres://keygate@127.0.0.1:1/none".to_string();
        let cfg = Config::from_env(&move |n| (n == "DATABASE_URL").then(|| url.clone())).expect("config");
        let pool = crate::db::pool(&cfg.database, 1).expect("pool");
        Authenticator::new(&cfg.auth, pool)
    }

    /// What a request preempted between its probe and joining sees: the flight it
    /// would have joined has stored its answer and gone. It must take that answer.
    #[tokio::test]
    async fn a_miss_whose_flight_already_finished_takes_the_cached_answer() {
        let auth = offline();
        let (unknown, known) = (KeyDigest::of("unknown"), KeyDigest::of("known"));
        let record = record();
        auth.bench_insert(unknown, None);
        auth.bench_insert(known, Some(record));
        let inner = &auth.inner;
        let mut rx = inner.join_or_load(&unknown);
        assert!(matches!(
            *rx.wait_for(Option::is_some).await.expect("answer"),
            Some(Err(AuthError::Unknown))
        ));
        let mut rx = inner.join_or_load(&known);
        let answer = *rx.wait_for(Option::is_some).await.expect("answer");
        assert!(matches!(answer, Some(Ok(r)) if r.key_id == record.key_id));
        assert!(inner.inflight.is_empty(), "a flight was started for a cached answer");
    }

    /// A refresh ahead of expiry must still read the database, whatever the cache holds.
    #[tokio::test]
    async fn a_refresh_starts_a_flight_despite_a_cached_record() {
        let auth = offline();
        let known = KeyDigest::of("known");
        auth.bench_insert(known, Some(record()));
        let mut rx = auth.inner.join_or_start(&known);
        let answer = *rx.wait_for(Option::is_some).await.expect("answer");
        // The offline store fails the lookup; the fresh record is served as stale.
        assert!(matches!(answer, Some(Ok(_))));
        assert_eq!(auth.inner.counters.stale_served.load(Relaxed), 1);
    }
}
