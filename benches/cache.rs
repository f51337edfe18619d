//! The auth cache under a million keys: hits (one hot key, and uniformly random keys),
//! cached "no such key" answers hit at random, and, against a real PostgreSQL, what a
//! miss costs (a lookup round trip) and what an unknown key costs once `preload` made
//! the cache authoritative (no database at all).
//!
//! Run: `cargo bench --bench cache`. `CACHE_BENCH_KEYS` (default 1,000,000) sizes the
//! cache. The database part needs `--bench`, and uses `DATABASE_URL` or a throwaway
//! cluster like the tests; it prints why and skips when neither works. Under `cargo test
//! --all-targets` it runs once, on 10,000 keys, without a database.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::FutureExt as _;
use keygate::auth::{AuthError, Authenticator};
use keygate::keys::KeyDigest;

fn keys() -> usize {
    support::scale(
        std::env::var("CACHE_BENCH_KEYS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000),
        10_000,
    )
}

fn in_memory(c: &mut Criterion) {
    let n = keys();
    let auth = support::authenticator();
    let started = Instant::now();
    let digests = support::fill(&auth, n);
    // A tenth as many negative answers, as a flood of bad keys would leave behind.
    let unknown: Vec<KeyDigest> = (0..(n / 10).max(1) as u64)
        .map(|i| {
            let d = KeyDigest::of(&support::key(u64::MAX / 2 + i));
            auth.bench_insert(d, None);
            d
        })
        .collect();
    eprintln!(
        "cache: {n} keys and {} negative answers cached in {:?}",
        unknown.len(),
        started.elapsed()
    );

    let mut g = c.benchmark_group(format!("cache_{n}"));
    let hot = digests[n / 2];
    g.bench_function("hit_hot_key", |b| {
        b.iter(|| auth.authenticate(black_box(&hot)).now_or_never())
    });
    g.bench_function("hit_random_key", |b| {
        let mut rng = support::Xorshift(0x9e37_79b9_7f4a_7c15);
        b.iter(|| {
            let d = &digests[rng.next_index(n)];
            matches!(auth.authenticate(d).now_or_never(), Some(Ok(_)))
        })
    });
    g.bench_function("negative_hit_random_key", |b| {
        let mut rng = support::Xorshift(0x2545_f491_4f6c_dd1d);
        b.iter(|| {
            let d = &unknown[rng.next_index(unknown.len())];
            matches!(auth.authenticate(d).now_or_never(), Some(Err(AuthError::Unknown)))
        })
    });
    g.finish();
    // Freeing a million records is not free; keep it out of the next group's timing.
    drop(auth);
}

/// Misses that reach PostgreSQL, and unknown keys after a preload. Bench mode only.
fn with_database(c: &mut Criterion) {
    if !support::bench_mode() {
        return;
    }
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let server = std::panic::catch_unwind(common::server);
    std::panic::set_hook(quiet);
    if server.is_err() {
        eprintln!("cache: database part skipped (no DATABASE_URL and no PostgreSQL to start)");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let known = 1_000usize;
    let (db, auth) = rt.block_on(async {
        let db = common::fresh_db().await;
        db.migrate();
        let client = db.client().await;
        let org = uuid::Uuid::new_v4();
        client
            .execute(
                "INSERT INTO organizations (id, name, slug, plan) VALUES ($1, 'bench', 'bench', 'pro')",
                &[&org],
            )
            .await
            .expect("org");
        let hashes: Vec<String> = (0..known as u64)
            .map(|i| KeyDigest::of(&support::key(i)).to_hex())
            .collect();
        client
            .execute(
                "INSERT INTO api_keys (id, organization_id, key_prefix, key_hash, key_hint, name, environment, scopes)
                 SELECT gen_random_uuid(), $1, 'pk_test_', h, right(h, 4), 'bench', 'test', '[\"chat\"]'
                 FROM unnest($2::text[]) AS h",
                &[&org, &hashes],
            )
            .await
            .expect("keys");
        let mut cfg = support::config(&db.url);
        cfg.auth.negative_cache_ttl = Duration::from_secs(86_400);
        let pool = keygate::db::pool(&cfg.database, 4).expect("pool");
        (db, Authenticator::new(&cfg.auth, pool))
    });
    eprintln!("cache: database {} ready with {known} keys", db.name);

    let mut g = c.benchmark_group("cache_database");
    // Every iteration a digest never seen: the single flight, a pooled connection and
    // one `db::keys::lookup` round trip, then a negative answer stored.
    let mut next = 0u64;
    g.bench_function("miss_to_database", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    next += 1;
                    let d = KeyDigest::of(&support::key(u64::MAX / 4 + next));
                    let r = auth.authenticate(&d).await;
                    assert_eq!(r.err(), Some(AuthError::Unknown));
                }
                t.elapsed()
            })
        })
    });
    let loaded = rt.block_on(auth.preload()).expect("preload");
    assert_eq!(loaded, known);
    // Authoritative now: an absent digest is answered without a map entry or a query.
    let absent: Vec<KeyDigest> = (0..100_000u64)
        .map(|i| KeyDigest::of(&support::key(u64::MAX / 8 + i)))
        .collect();
    g.bench_function("unknown_after_preload", |b| {
        let mut rng = support::Xorshift(0x9e37_79b9_7f4a_7c15);
        b.iter(|| {
            let d = &absent[rng.next_index(absent.len())];
            matches!(auth.authenticate(d).now_or_never(), Some(Err(AuthError::Unknown)))
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = in_memory, with_database
}
criterion_main!(benches);
