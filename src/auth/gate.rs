//! The cap on key lookups that find nothing, per second, for this process.
//!
//! A flood of random well-formed keys from many addresses slips past the per-address
//! failure limit (`proxy::guard`) and past the negative cache (every key is new), so
//! each request becomes a database lookup: the concurrency cap bounds how many run at
//! once, not how many run per second. Counting the lookups that answered "no such key"
//! and refusing uncached keys for the rest of a second once the count reaches the cap
//! bounds that rate. Valid keys are not what it counts: a restart that looks up every
//! active key again never closes it, and cached keys are never asked about it.
//!
//! Owns the window and its count; what a refused request is answered is the proxy's.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// One word: the window's second (since `base`) in the high half, its count in the low,
/// so a new second and its first count replace the old ones in one compare-and-swap.
pub(super) struct UnknownGate {
    per_second: u32,
    base: Instant,
    window: AtomicU64,
}

impl UnknownGate {
    /// `per_second == 0` never closes.
    pub(super) fn new(per_second: u32) -> Self {
        UnknownGate {
            per_second,
            base: Instant::now(),
            window: AtomicU64::new(0),
        }
    }

    fn second(&self, now: Instant) -> u64 {
        // Masked to the high half's 32 bits: 136 years of uptime before it wraps.
        now.saturating_duration_since(self.base).as_secs() & 0xffff_ffff
    }

    /// Whether this second's lookups have already found `per_second` unknown keys.
    pub(super) fn closed(&self, now: Instant) -> bool {
        if self.per_second == 0 {
            return false;
        }
        let w = self.window.load(Relaxed);
        w >> 32 == self.second(now) && (w & 0xffff_ffff) >= u64::from(self.per_second)
    }

    /// A lookup at `now` found no key.
    pub(super) fn record(&self, now: Instant) {
        if self.per_second == 0 {
            return;
        }
        let second = self.second(now);
        let mut cur = self.window.load(Relaxed);
        loop {
            let next = if cur >> 32 == second {
                if cur & 0xffff_ffff == 0xffff_ffff {
                    return;
                }
                cur + 1
            } else if cur >> 32 > second {
                // A lookup that began in an earlier second finishing after another of a
                // later one: it belongs to a window already gone.
                return;
            } else {
                (second << 32) | 1
            };
            match self.window.compare_exchange_weak(cur, next, Relaxed, Relaxed) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn closes_at_the_cap_and_opens_with_the_next_second() {
        let g = UnknownGate::new(3);
        let t = g.base + Duration::from_millis(5_200);
        for _ in 0..3 {
            assert!(!g.closed(t));
            g.record(t);
        }
        assert!(g.closed(t));
        assert!(g.closed(t + Duration::from_millis(700)), "the rest of the same second");
        let next = t + Duration::from_millis(800);
        assert!(!g.closed(next), "a new second starts with nothing counted");
        g.record(next);
        assert!(!g.closed(next));
    }

    #[test]
    fn a_late_record_from_an_old_second_does_not_reopen_or_reset_the_window() {
        let g = UnknownGate::new(2);
        let t = g.base + Duration::from_secs(10);
        g.record(t);
        g.record(t);
        g.record(t - Duration::from_secs(1));
        assert!(g.closed(t));
    }

    #[test]
    fn zero_never_closes() {
        let g = UnknownGate::new(0);
        for _ in 0..10 {
            g.record(g.base);
        }
        assert!(!g.closed(g.base));
    }

    #[test]
    fn records_from_many_threads_are_all_counted() {
        let g = Arc::new(UnknownGate::new(u32::MAX));
        let t = g.base + Duration::from_millis(100);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || (0..10_000).for_each(|_| g.record(t)))
            })
            .collect();
        for th in threads {
            th.join().expect("thread");
        }
        assert_eq!(g.window.load(Relaxed) & 0xffff_ffff, 40_000);
    }
}

/// The cap as the authenticator applies it, against a database nothing answers on: a
/// lookup made would fail, so what a test sees tells a shed from an attempt.
#[cfg(test)]
mod applied {
    use std::path::Path;
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::{Duration, Instant};

    use crate::auth::{AuthError, Authenticator, BreakerState};
    use crate::config::Config;
    use crate::keys::KeyDigest;
    use crate::model::AuthRecord;

    fn offline(auth_toml: &str) -> Authenticator {
        let env = |n: &str| (n == "DATABASE_URL").then(|| "postgres://keygate@127.0.0.1:1/none".to_string());
        let cfg = Config::parse_with_env(&format!("[auth]\n{auth_toml}"), Path::new("x"), &env).expect("config");
        let pool = crate::db::pool(&cfg.database, 1).expect("pool");
        Authenticator::new(&cfg.auth, pool)
    }

    fn close(auth: &Authenticator, cap: u32) {
        (0..cap).for_each(|_| auth.inner.unknown_gate.record(Instant::now()));
    }

    fn record() -> AuthRecord {
        AuthRecord::new(crate::model::test_fields("gate", &["chat"]))
    }

    #[tokio::test]
    async fn a_miss_past_the_cap_is_refused_without_a_lookup() {
        let auth = offline("max_unknown_lookups_per_second = 2\nbreaker_failures = 1\n");
        close(&auth, 2);
        let answer = auth.authenticate(&KeyDigest::of("new")).await;
        assert_eq!(answer.err(), Some(AuthError::Shed));
        let s = auth.stats();
        assert_eq!((s.shed, s.misses, s.breaker), (1, 0, BreakerState::Closed));
    }

    /// Misses let in before the cap closed wait for a lookup permit; the ones still
    /// waiting when it closes are refused there, not looked up.
    #[tokio::test]
    async fn a_miss_queued_for_a_permit_is_refused_when_the_cap_closes_meanwhile() {
        let auth = offline("max_unknown_lookups_per_second = 2\nmax_concurrent_lookups = 1\nbreaker_failures = 1\n");
        let held = auth.inner.lookups.acquire().await.expect("permit");
        let mut rx = auth.inner.join_or_load(&KeyDigest::of("queued"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        close(&auth, 2);
        drop(held);
        let answer = *rx.wait_for(Option::is_some).await.expect("answer");
        assert!(matches!(answer, Some(Err(AuthError::Shed))), "{answer:?}");
        // A lookup would have failed against the dead address and opened the breaker.
        assert_eq!(auth.stats().breaker, BreakerState::Closed);
    }

    /// A refresh is of a key known to exist: shedding it would expire keys in use.
    #[tokio::test]
    async fn a_refresh_is_never_shed() {
        let auth = offline("max_unknown_lookups_per_second = 1\nbreaker_failures = 1\n");
        let known = KeyDigest::of("known");
        auth.bench_insert(known, Some(record()));
        close(&auth, 1);
        let mut rx = auth.inner.join_or_start(&known);
        rx.wait_for(Option::is_some).await.expect("answer");
        let s = auth.stats();
        assert_eq!(s.breaker, BreakerState::Open, "the refresh did not reach the database");
        assert_eq!(s.shed, 0);
    }

    /// Keys used before the flood keep working past their TTL, as with the database
    /// down; never one a change notification invalidated.
    #[tokio::test]
    async fn a_stale_record_is_served_when_its_lookup_is_shed() {
        let auth = offline("max_unknown_lookups_per_second = 1\ncache_ttl = \"1ms\"\n");
        let (known, rec) = (KeyDigest::of("known"), record());
        auth.bench_insert(known, Some(rec));
        tokio::time::sleep(Duration::from_millis(5)).await;
        close(&auth, 1);
        let served = auth.authenticate(&known).await.expect("stale record");
        assert_eq!(served.key_id, rec.key_id);
        assert_eq!(auth.inner.counters.stale_served.load(Relaxed), 1);
        auth.invalidate_all();
        assert_eq!(auth.authenticate(&known).await.err(), Some(AuthError::Shed));
    }
}
