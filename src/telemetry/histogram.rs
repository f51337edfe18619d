//! Fixed-bucket latency histograms kept in atomics and written out as Prometheus text at
//! scrape time.
//!
//! Owns the bucket layout and the text of `_bucket`/`_sum`/`_count` lines. It does not
//! own metric names (the caller passes them) or the rest of `/metrics`.
//!
//! Why not the `metrics` crate's histograms: its Prometheus recorder keeps every sample
//! until a scrape or an upkeep pass drains it, so a keygate that nobody scrapes grows by
//! about 8 bytes per sample, two samples per request, without bound. Here a sample is
//! three relaxed atomic adds into memory fixed at compile time.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds in microseconds: 100 µs to 30 s, roughly ×2.5 apart.
const BOUNDS_US: [u64; 17] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000, 30_000_000,
];

/// The `le` labels of [`BOUNDS_US`], in seconds, as Prometheus clients expect them.
const LE: [&str; 17] = [
    "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
    "2.5", "5", "10", "30",
];

pub struct Histogram {
    /// Per-bucket counts, not cumulative; the last one counts samples above every bound.
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub const fn new() -> Self {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BOUNDS_US.len() + 1],
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// Appends the histogram as Prometheus text. Counts are read one by one while other
    /// threads record, so `_count` is read last and raised to the buckets' total: a
    /// scrape never shows a `+Inf` bucket above `_count`.
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (le, bucket) in LE.iter().zip(&self.buckets) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.buckets[BOUNDS_US.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let count = self.count.load(Relaxed).max(cumulative);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(h: &Histogram) -> Vec<(String, f64)> {
        let mut s = String::new();
        h.render("t_seconds", "test", &mut s);
        s.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').expect("sample line");
                (k.to_string(), v.parse().expect("number"))
            })
            .collect()
    }

    #[test]
    fn labels_match_bounds() {
        for (le, us) in LE.iter().zip(BOUNDS_US) {
            let secs: f64 = le.parse().expect("le");
            assert!((secs * 1e6 - us as f64).abs() < 1e-6, "{le} vs {us}");
        }
    }

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        let h = Histogram::new();
        h.record(Duration::from_micros(100)); // on the first bound: counted in it
        h.record(Duration::from_micros(101));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60)); // above every bound
        let s = render(&h);
        let get = |k: &str| s.iter().find(|(n, _)| n == k).map(|(_, v)| *v).expect(k);
        assert_eq!(get("t_seconds_bucket{le=\"0.0001\"}"), 1.0);
        assert_eq!(get("t_seconds_bucket{le=\"0.00025\"}"), 2.0);
        assert_eq!(get("t_seconds_bucket{le=\"0.0025\"}"), 2.0);
        assert_eq!(get("t_seconds_bucket{le=\"0.005\"}"), 3.0);
        assert_eq!(get("t_seconds_bucket{le=\"30\"}"), 3.0);
        assert_eq!(get("t_seconds_bucket{le=\"+Inf\"}"), 4.0);
        assert_eq!(get("t_seconds_count"), 4.0);
        assert!((get("t_seconds_sum") - 60.003201).abs() < 1e-9);
        // Monotone across the series.
        let buckets: Vec<f64> = s
            .iter()
            .filter(|(n, _)| n.contains("_bucket"))
            .map(|(_, v)| *v)
            .collect();
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn a_million_samples_take_no_memory() {
        let h = Histogram::new();
        for i in 0..1_000_000u64 {
            h.record(Duration::from_micros(i % 50_000));
        }
        assert_eq!(
            render(&h).iter().find(|(n, _)| n == "t_seconds_count").map(|(_, v)| *v),
            Some(1e6)
        );
        // Fixed size: 18 buckets, a sum and a count, whatever was recorded.
        assert_eq!(std::mem::size_of::<Histogram>(), 20 * 8);
    }
}
