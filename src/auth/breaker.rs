//! The circuit breaker in front of key lookups: after `threshold` failures in a row the
//! database is not asked for `cooldown`, so uncached keys get 503 at once instead of each
//! waiting out the lookup budget, and a dead database is not hammered by retries. After
//! the cooldown exactly one lookup probes; its success closes the breaker, its failure
//! opens it again.
//!
//! It only decides whether to ask; the lookups themselves, serve-stale and the answers
//! live in `load`. Lock-free: it is consulted on every cache miss.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BreakerState {
    #[default]
    Closed,
    Open,
    /// The cooldown ran out; one probe may be (or is being) made.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

pub(super) struct Breaker {
    /// 0: never opens.
    threshold: u32,
    cooldown: Duration,
    epoch: Instant,
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which the breaker is open.
    open_until_ms: AtomicU64,
    probing: AtomicBool,
    /// Times the breaker opened, for metrics.
    opened: AtomicU64,
}

/// Whether a lookup may go ahead, and if so whether it is the half-open probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Permit {
    Go,
    Probe,
    Refused,
}

impl Breaker {
    pub(super) fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            threshold,
            cooldown,
            epoch: Instant::now(),
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            opened: AtomicU64::new(0),
        }
    }

    fn now_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    pub(super) fn permit(&self, now: Instant) -> Permit {
        if self.threshold == 0 || self.failures.load(Relaxed) < self.threshold {
            return Permit::Go;
        }
        if self.now_ms(now) < self.open_until_ms.load(Relaxed) {
            return Permit::Refused;
        }
        // Only one caller wins the probe; the rest keep failing fast until it reports.
        if self.probing.compare_exchange(false, true, Relaxed, Relaxed).is_ok() {
            Permit::Probe
        } else {
            Permit::Refused
        }
    }

    pub(super) fn succeeded(&self) {
        self.failures.store(0, Relaxed);
        self.probing.store(false, Relaxed);
    }

    pub(super) fn failed(&self, now: Instant) {
        if self.threshold == 0 {
            return;
        }
        let n = self.failures.fetch_add(1, Relaxed).saturating_add(1);
        if n >= self.threshold {
            let was_probe = self.probing.swap(false, Relaxed);
            let until = self
                .now_ms(now)
                .saturating_add(u64::try_from(self.cooldown.as_millis()).unwrap_or(u64::MAX));
            self.open_until_ms.store(until, Relaxed);
            if n == self.threshold || was_probe {
                self.opened.fetch_add(1, Relaxed);
                tracing::warn!(
                    failures = n,
                    cooldown_ms = self.cooldown.as_millis() as u64,
                    "key store failing: circuit breaker open"
                );
            }
        }
    }

    /// A probe that could not report (its task was cancelled) must not wedge the breaker.
    pub(super) fn abandon_probe(&self) {
        self.probing.store(false, Relaxed);
    }

    pub(super) fn state(&self, now: Instant) -> BreakerState {
        if self.threshold == 0 || self.failures.load(Relaxed) < self.threshold {
            BreakerState::Closed
        } else if self.now_ms(now) < self.open_until_ms.load(Relaxed) {
            BreakerState::Open
        } else {
            BreakerState::HalfOpen
        }
    }

    pub(super) fn times_opened(&self) -> u64 {
        self.opened.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_lets_one_probe_through() {
        let b = Breaker::new(3, Duration::from_secs(2));
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(b.permit(t0), Permit::Go);
            b.failed(t0);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.failed(t0);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert_eq!(b.permit(t0 + Duration::from_secs(1)), Permit::Refused);
        let later = t0 + Duration::from_millis(2100);
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert_eq!(b.permit(later), Permit::Probe);
        assert_eq!(b.permit(later), Permit::Refused, "only one probe at a time");
        b.failed(later);
        assert_eq!(b.state(later), BreakerState::Open, "a failed probe reopens");
        assert_eq!(b.times_opened(), 2);
        let again = later + Duration::from_millis(2100);
        assert_eq!(b.permit(again), Permit::Probe);
        b.succeeded();
        assert_eq!(b.state(again), BreakerState::Closed);
        assert_eq!(b.permit(again), Permit::Go);
    }

    #[test]
    fn a_success_resets_the_count_and_zero_never_opens() {
        let b = Breaker::new(2, Duration::from_secs(1));
        let t = Instant::now();
        b.failed(t);
        b.succeeded();
        b.failed(t);
        assert_eq!(b.state(t), BreakerState::Closed);
        let off = Breaker::new(0, Duration::from_secs(1));
        for _ in 0..100 {
            off.failed(t);
        }
        assert_eq!(off.permit(t), Permit::Go);
    }

    #[test]
    fn an_abandoned_probe_frees_the_slot() {
        let b = Breaker::new(1, Duration::from_millis(10));
        let t = Instant::now();
        b.failed(t);
        let later = t + Duration::from_millis(20);
        assert_eq!(b.permit(later), Permit::Probe);
        b.abandon_probe();
        assert_eq!(b.permit(later), Permit::Probe);
    }
}
