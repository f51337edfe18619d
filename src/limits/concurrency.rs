//! The per-key cap on requests in flight (`limits.max_concurrent_per_key`): a slot is
//! taken before forwarding and given back when the response body ends or is dropped,
//! so a long stream holds its slot for as long as it runs and one key cannot occupy
//! every upstream connection.
//!
//! Process-local on purpose: in-flight requests are a property of this replica's
//! connections, and a cross-replica count would put the database on the hot path. It
//! does not decide rate or quota (`limits`), nor what a refusal looks like (`proxy`).

use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use uuid::Uuid;

/// In-flight counts per key. Cheap to clone.
#[derive(Clone, Default)]
pub struct Concurrency {
    /// Authenticated key ids only, so the fast hasher is safe (see `Limiter`).
    in_flight: Arc<DashMap<Uuid, u32, super::FastHash>>,
}

/// A held slot; dropping it gives the slot back.
pub struct Slot {
    map: Arc<DashMap<Uuid, u32, super::FastHash>>,
    key: Uuid,
}

impl Concurrency {
    /// Takes a slot for `key` unless it already has `max` requests in flight. The count
    /// is read and bumped under the shard lock, so two racing requests cannot both take
    /// the last slot.
    pub fn acquire(&self, key: Uuid, max: u32) -> Option<Slot> {
        let mut n = self.in_flight.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        drop(n);
        Some(Slot {
            map: self.in_flight.clone(),
            key,
        })
    }

    /// Requests in flight for `key` (0 when none).
    pub fn in_flight(&self, key: Uuid) -> u32 {
        self.in_flight.get(&key).map_or(0, |n| *n)
    }

    /// Keys with at least one request in flight: entries are removed at zero, so idle
    /// keys cost nothing.
    pub fn keys(&self) -> usize {
        self.in_flight.len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Entry::Occupied(mut e) = self.map.entry(self.key) {
            let n = e.get_mut();
            *n = n.saturating_sub(1);
            if *n == 0 {
                e.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_and_given_back_on_drop() {
        let c = Concurrency::default();
        let k = Uuid::now_v7();
        let a = c.acquire(k, 2).expect("first");
        let b = c.acquire(k, 2).expect("second");
        assert!(c.acquire(k, 2).is_none(), "third is over the cap");
        assert!(c.acquire(Uuid::now_v7(), 2).is_some(), "other keys are unaffected");
        drop(a);
        assert_eq!(c.in_flight(k), 1);
        let _c = c.acquire(k, 2).expect("a slot came back");
        drop(b);
        drop(_c);
        assert_eq!(c.keys(), 0, "idle keys leave the map");
    }

    #[test]
    fn racing_threads_never_exceed_the_cap() {
        let c = Concurrency::default();
        let k = Uuid::now_v7();
        let peak = Arc::new(std::sync::atomic::AtomicU32::new(0));
        std::thread::scope(|s| {
            for _ in 0..8 {
                let (c, peak) = (c.clone(), peak.clone());
                s.spawn(move || {
                    for _ in 0..2000 {
                        if let Some(slot) = c.acquire(k, 3) {
                            peak.fetch_max(c.in_flight(k), std::sync::atomic::Ordering::Relaxed);
                            drop(slot);
                        }
                    }
                });
            }
        });
        assert!(peak.load(std::sync::atomic::Ordering::Relaxed) <= 3);
        assert_eq!(c.keys(), 0);
    }
}
