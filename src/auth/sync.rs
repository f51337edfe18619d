//! The background task that keeps the auth cache in step with the database: LISTEN for
//! change notifications, reconnect with capped backoff, resync after every connect,
//! periodic full reloads when preloaded, sweeps of expired negative answers.
//!
//! Owns the task's schedule and the mapping from [`Change`] to cache operations. It does
//! not own the LISTEN session (`db::notify`) or the cache's ordering rules (`cache`).
//!
//! Why a resync on every connect, the first included: notifications sent while no
//! session listened are gone, so anything cached before LISTEN took effect may be stale.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::{Inner, Scope};
use crate::config::DatabaseConfig;
use crate::db::notify::{self, Change, ChangeListener};

const TICK: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A session that lived this long resets the backoff; a flapping one keeps doubling it,
/// so a replica never hammers the database with connects and full resyncs.
const STABLE_AFTER: Duration = Duration::from_secs(10);
const PING_EVERY: Duration = Duration::from_secs(15);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed full reload, try again this soon rather than a whole interval later.
const RELOAD_RETRY: Duration = Duration::from_secs(5);
/// Changes drained in one batch. Past this many distinct rows to reload, one full reload
/// is cheaper than that many by-id queries.
const BATCH_MAX: usize = 1024;
const RELOAD_BY_ID_MAX: usize = 64;

struct SyncTask {
    inner: Arc<Inner>,
    db: DatabaseConfig,
    listener: Option<ChangeListener>,
    backoff: Duration,
    next_connect: Instant,
    connected_at: Instant,
    next_ping: Instant,
    next_full_reload: Instant,
    next_sweep: Instant,
}

pub(super) async fn run(inner: Arc<Inner>, db: DatabaseConfig, cancel: CancellationToken) {
    let now = Instant::now();
    let mut s = SyncTask {
        next_full_reload: now + reload_interval(&inner),
        next_sweep: now + sweep_interval(&inner),
        inner,
        db,
        listener: None,
        backoff: BACKOFF_MIN,
        next_connect: now,
        connected_at: now,
        next_ping: now,
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let listen = s.inner.listen_notify;
    loop {
        let reconnect_at = tokio::time::Instant::from_std(s.next_connect);
        let want_connect = listen && s.listener.is_none();
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(reconnect_at), if want_connect => {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = s.connect() => {}
                }
            }
            change = next_change(&mut s.listener) => match change {
                Some(c) => s.apply(c).await,
                None => s.lost("the listen session ended"),
            },
            _ = tick.tick() => s.periodic().await,
        }
    }
    s.inner.listener_connected.store(false, Relaxed);
}

async fn next_change(listener: &mut Option<ChangeListener>) -> Option<Change> {
    match listener {
        Some(l) => l.recv().await,
        None => std::future::pending().await,
    }
}

fn reload_interval(inner: &Inner) -> Duration {
    // Half the TTL, so a preloaded record is refreshed before it expires.
    (inner.ttl / 2).max(TICK)
}

fn sweep_interval(inner: &Inner) -> Duration {
    inner.negative_ttl.max(TICK)
}

/// Somewhere in [d/2, d], so replicas that lost the database together do not all come
/// back in the same instant.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = match getrandom::getrandom(&mut b) {
        Ok(()) => f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX),
        Err(_) => 1.0,
    };
    d.mul_f64(0.5 + 0.5 * r)
}

impl SyncTask {
    async fn connect(&mut self) {
        match notify::listen(&self.db).await {
            Ok(listener) => {
                tracing::info!("listening for key and organisation changes");
                self.listener = Some(listener);
                let now = Instant::now();
                self.connected_at = now;
                self.next_ping = now + PING_EVERY;
                self.resync().await;
                // Reported only now: connected means "listening and caught up".
                self.inner.listener_connected.store(true, Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?self.backoff, "cannot listen for changes");
                self.schedule_reconnect();
            }
        }
    }

    fn lost(&mut self, why: &str) {
        tracing::warn!(
            reason = why,
            "lost the listen session; cached keys may go stale until it is back"
        );
        self.listener = None;
        self.inner.listener_connected.store(false, Relaxed);
        if self.connected_at.elapsed() >= STABLE_AFTER {
            self.backoff = BACKOFF_MIN;
        }
        self.schedule_reconnect();
    }

    fn schedule_reconnect(&mut self) {
        self.next_connect = Instant::now() + jitter(self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Everything cached may have missed a change. Not preloaded: mark it all for
    /// fetching. Preloaded: read the whole table again, which overwrites every record;
    /// marking first would send every key's next request to the database while the
    /// reload runs, a herd just as the database comes back. The fence still stops loads
    /// already in flight from caching what they read before the gap. Only if the reload
    /// fails is everything marked, as without preload.
    async fn resync(&mut self) {
        self.inner.counters.resyncs.fetch_add(1, Relaxed);
        if !self.inner.cache.is_authoritative() {
            self.inner.invalidate(Scope::All);
            return;
        }
        self.inner.cache.fence(Scope::All);
        if !self.full_reload().await {
            self.inner.invalidate(Scope::All);
        }
    }

    /// Returns whether the reload succeeded.
    async fn full_reload(&mut self) -> bool {
        match self.inner.reload(Scope::All).await {
            Ok(n) => {
                tracing::debug!(keys = n, "reloaded the key table");
                self.next_full_reload = Instant::now() + reload_interval(&self.inner);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reload the key table; retrying");
                self.next_full_reload = Instant::now() + RELOAD_RETRY;
                false
            }
        }
    }

    /// Applies `first` and whatever else is already queued. Every invalidation in the
    /// batch happens before any reload query, so a slow reload never delays a revocation
    /// queued behind it.
    async fn apply(&mut self, first: Change) {
        let mut batch = vec![first];
        if let Some(l) = self.listener.as_mut() {
            while batch.len() < BATCH_MAX {
                match l.try_recv() {
                    Some(c) => batch.push(c),
                    None => break,
                }
            }
        }
        let mut reloads = HashSet::new();
        for change in batch {
            let scope = match change {
                Change::Key { id, .. } => Scope::Key(id),
                Change::Organization { id } => Scope::Organization(id),
                Change::Everything => Scope::All,
            };
            self.inner.invalidate(scope);
            reloads.insert(scope);
        }
        if !self.inner.cache.is_authoritative() {
            return;
        }
        // Preloaded: misses are answered from the table, so changed rows (new keys above
        // all) must be read back now rather than on first use.
        if reloads.contains(&Scope::All) || reloads.len() > RELOAD_BY_ID_MAX {
            // Already invalidated above: a failure leaves those records to on-use fetches.
            self.full_reload().await;
            return;
        }
        for scope in reloads {
            if let Err(e) = self.inner.reload(scope).await {
                tracing::warn!(error = %e, ?scope, "cannot reload a changed row; a full reload follows");
                self.next_full_reload = Instant::now();
            }
        }
    }

    async fn periodic(&mut self) {
        let now = Instant::now();
        if now >= self.next_sweep {
            self.next_sweep = now + sweep_interval(&self.inner);
            self.inner.cache.sweep(now);
        }
        if self.inner.cache.is_authoritative() && now >= self.next_full_reload {
            // A failure keeps the records as they are: they expire on their TTL and are
            // then fetched (or served stale) one by one.
            self.full_reload().await;
        }
        if now >= self.next_ping {
            self.next_ping = now + PING_EVERY;
            if let Some(l) = &self.listener {
                if let Err(e) = l.ping(PING_TIMEOUT).await {
                    tracing::debug!(error = %e, "listen session ping failed");
                    self.lost("the listen session stopped answering");
                }
            }
        }
    }
}
