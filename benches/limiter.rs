//! The limiter under contention: `Limiter::check` from 1, 2 and 4 threads at once, on
//! one key, on many keys of one organisation (every check also locks the shared org
//! cell), and on many keys of many organisations. Reported time is wall time per check
//! across all threads, so a perfectly parallel limiter halves it from 1 to 2 threads on
//! a 2-core machine.
//!
//! Run: `cargo bench --bench limiter`. Under `cargo test --all-targets` each case runs
//! once. No database: `check` never does I/O and creates cells for unseen keys.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use keygate::limits::{KeyLimits, Limiter};
use uuid::Uuid;

const MANY: usize = 10_000;

fn limits(n: usize, shared_org: bool) -> Vec<KeyLimits> {
    let org = Uuid::new_v4();
    (0..n)
        .map(|_| KeyLimits {
            key_id: Uuid::new_v4(),
            org_id: if shared_org { org } else { Uuid::new_v4() },
            per_minute: i64::MAX / 4,
            monthly: i64::MAX / 4,
        })
        .collect()
}

/// `iters` checks split over `threads` threads, each walking the keys from its own
/// offset; returns the wall time of the whole batch.
fn run(limiter: &Limiter, keys: &[KeyLimits], threads: usize, iters: u64) -> Duration {
    let per_thread = iters.div_ceil(threads as u64);
    let now = support::now();
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mut i = t * keys.len() / threads;
                for _ in 0..per_thread {
                    black_box(limiter.check(&keys[i], now).is_allowed());
                    i += 1;
                    if i == keys.len() {
                        i = 0;
                    }
                }
            });
        }
    });
    start.elapsed()
}

fn contention(c: &mut Criterion) {
    let cases = [
        ("one_key", limits(1, true)),
        ("many_keys_one_org", limits(support::scale(MANY, 100), true)),
        ("many_keys_many_orgs", limits(support::scale(MANY, 100), false)),
    ];
    let mut g = c.benchmark_group("limiter");
    for (name, keys) in &cases {
        let limiter = Limiter::new();
        // Cells exist before timing, as for keys that already sent a request.
        run(&limiter, keys, 1, keys.len() as u64);
        for threads in [1, 2, 4] {
            g.bench_with_input(BenchmarkId::new(*name, threads), &threads, |b, &threads| {
                b.iter_custom(|iters| run(&limiter, keys, threads, iters))
            });
        }
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = contention
}
criterion_main!(benches);
