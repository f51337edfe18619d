//! The in-process hot path of one proxied request, piece by piece and together: path
//! normalization, the key format check, SHA-256 digest, the auth cache hit, the
//! limiter's check, and building plus enqueueing the usage row. Target: under 1 µs for all of it.
//!
//! Run: `cargo bench --bench hot_path`. Under `cargo test --all-targets` every bench runs
//! once, on a small cache. No database: the cache is warmed with `bench_insert`, and the
//! usage queue is never drained (each timed chunk gets a fresh queue big enough for it, so
//! `record` always takes its normal `try_send` path; freeing the chunk is not timed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::FutureExt as _;
use keygate::keys::PresentedKey;
use keygate::limits::{KeyLimits, Limiter};
use keygate::model::{AuthRecord, KeyStatus};
use keygate::proxy::path;
use keygate::usage::{self, UsageRecord, UsageSink};

/// Rows enqueued per fresh queue in the usage benches.
const CHUNK: usize = 256;

/// The row `proxy::metering::PendingUsage::new` builds for a request (same work: one
/// clock read for the timestamp and the UUID v7, endpoint and user agent as owned
/// strings, the method borrowed, the client address kept as an `IpAddr`).
fn usage_row(rec: &AuthRecord, ip: IpAddr) -> UsageRecord {
    let at = Utc::now();
    let secs = u64::try_from(at.timestamp()).unwrap_or(0);
    UsageRecord {
        id: uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            secs,
            at.timestamp_subsec_nanos(),
        )),
        api_key_id: rec.key_id,
        organization_id: rec.organization_id,
        timestamp: at,
        endpoint: usage::truncate("/v1/chat/completions", usage::ENDPOINT_MAX).to_string(),
        method: "POST".into(),
        status_code: 0,
        response_time_ms: 0,
        prompt_tokens: None,
        completion_tokens: None,
        tokens_used: None,
        cost_micros: None,
        model: None,
        ip_address: Some(ip),
        user_agent: Some(usage::truncate("wrk/4.1.0", usage::USER_AGENT_MAX).to_string()),
        error_code: None,
        error_message: None,
    }
}

/// Runs `iters` calls of `f` against fresh usage queues of `CHUNK` rows, timing only the
/// calls.
fn with_fresh_queues(iters: u64, mut f: impl FnMut(&UsageSink)) -> Duration {
    let mut cfg = support::config(support::NO_DATABASE).usage;
    cfg.queue_capacity = CHUNK;
    let mut left = iters;
    let mut total = Duration::ZERO;
    while left > 0 {
        let n = left.min(CHUNK as u64);
        let (sink, writer) = usage::channel(&cfg);
        let t = Instant::now();
        for _ in 0..n {
            f(&sink);
        }
        total += t.elapsed();
        drop((sink, writer));
        left -= n;
    }
    total
}

fn hot_path(c: &mut Criterion) {
    let auth = support::authenticator();
    // The key under test sits among others, as in a real cache.
    support::fill(&auth, support::scale(10_000, 100));
    let key = support::key(u64::MAX);
    let presented = PresentedKey::parse(&key).expect("bench key is well-formed");
    let digest = presented.digest();
    auth.bench_insert(digest, Some(support::record(None)));
    let limiter = Limiter::new();
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let rec = auth
        .authenticate(&digest)
        .now_or_never()
        .expect("a hit never waits")
        .expect("cached");

    let mut g = c.benchmark_group("hot_path");
    let plain = "/v1/chat/completions";
    g.bench_function("path_plain", |b| {
        b.iter(|| {
            path::normalize(black_box(plain))
                .map(|p| path::lenient_view(&p))
                .is_ok()
        })
    });
    // The slow path, for scale: escapes, a dot segment and a doubled slash.
    let odd = "/v1/%63hat//../%2e/completions%2Fx";
    g.bench_function("path_odd", |b| {
        b.iter(|| path::normalize(black_box(odd)).map(|p| path::lenient_view(&p)).is_ok())
    });
    g.bench_function("parse", |b| b.iter(|| PresentedKey::parse(black_box(&key)).is_ok()));
    g.bench_function("digest", |b| b.iter(|| black_box(&presented).digest()));
    g.bench_function("authenticate_hit", |b| {
        b.iter(|| auth.authenticate(black_box(&digest)).now_or_never())
    });
    g.bench_function("limiter_check", |b| {
        let limits = KeyLimits::from_auth(&rec);
        b.iter(|| limiter.check(black_box(&limits), Utc::now()).is_allowed())
    });
    g.bench_function("usage_row_and_record", |b| {
        b.iter_custom(|iters| with_fresh_queues(iters, |sink| sink.record(usage_row(&rec, ip))))
    });

    // What the pipeline does between reading the header and forwarding, minus the
    // header work (proxy::pipeline: the path, identify, authorise's status check, limit).
    let admit = || {
        let normalized = path::normalize(black_box(plain)).ok()?;
        if path::lenient_view(&normalized).is_some() {
            return None;
        }
        let p = PresentedKey::parse(black_box(&key)).ok()?;
        let rec = auth.authenticate(&p.digest()).now_or_never()?.ok()?;
        let now = Utc::now();
        if rec.status(now) != KeyStatus::Active || !rec.org_active {
            return None;
        }
        limiter
            .check(&KeyLimits::from_auth(&rec), now)
            .is_allowed()
            .then_some(rec)
    };
    g.bench_function("full_without_usage", |b| b.iter(|| admit().is_some()));
    g.bench_function("full_with_usage", |b| {
        b.iter_custom(|iters| {
            with_fresh_queues(iters, |sink| {
                if let Some(rec) = admit() {
                    sink.record(usage_row(&rec, ip));
                }
            })
        })
    });
    g.finish();

    // Where the usage half of the time goes.
    let mut g = c.benchmark_group("hot_path_parts");
    g.bench_function("instant_now", |b| b.iter(Instant::now));
    g.bench_function("utc_now", |b| b.iter(Utc::now));
    g.bench_function("uuid_now_v7", |b| b.iter(uuid::Uuid::now_v7));
    g.bench_function("uuid_v7_no_context", |b| {
        // What `PendingUsage::new` does: the row's own timestamp, no shared context lock.
        let at = Utc::now();
        b.iter(|| {
            let ts = uuid::Timestamp::from_unix(uuid::NoContext, black_box(1_700_000_000), at.timestamp_subsec_nanos());
            uuid::Uuid::new_v7(ts)
        })
    });
    g.bench_function("uuid_v7_caller_random", |b| {
        // A v7 UUID from the same clock with random bits from a cheap per-thread
        // generator: what `uuid`'s `fast-rng` feature would buy (no syscall per id).
        let mut rng = support::Xorshift(0x2545_f491_4f6c_dd1d);
        b.iter(|| {
            let ms = u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0);
            let mut bytes = [0u8; 10];
            bytes[..8].copy_from_slice(&rng.next_index(usize::MAX).to_le_bytes());
            uuid::Builder::from_unix_timestamp_millis(ms, &bytes).into_uuid()
        })
    });
    g.bench_function("ip_to_string", |b| b.iter(|| black_box(ip).to_string()));
    g.bench_function("boxed_sleep", |b| {
        // What `proxy::body::LimitedBody::new` did for every request, bodyless or not,
        // before its idle timer was made on the first wait.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _in_runtime = rt.enter();
        b.iter(|| Box::pin(tokio::time::sleep(black_box(Duration::from_secs(30)))))
    });
    g.bench_function("usage_row_build", |b| b.iter(|| usage_row(&rec, ip)));
    g.bench_function("usage_record_prebuilt", |b| {
        b.iter_custom(|iters| {
            let mut rows: Vec<UsageRecord> = Vec::new();
            let mut left = iters;
            let mut total = Duration::ZERO;
            let mut cfg = support::config(support::NO_DATABASE).usage;
            cfg.queue_capacity = CHUNK;
            while left > 0 {
                let n = left.min(CHUNK as u64);
                rows.extend((0..n).map(|_| usage_row(&rec, ip)));
                let (sink, writer) = usage::channel(&cfg);
                let t = Instant::now();
                for r in rows.drain(..) {
                    sink.record(r);
                }
                total += t.elapsed();
                drop((sink, writer));
                left -= n;
            }
            total
        })
    });
    g.finish();
}

/// The response's request id and timing headers (`proxy::Trace::stamp`), against the
/// float `format!` it replaced, kept here as the reference.
fn response_headers(c: &mut Criterion) {
    let mut g = c.benchmark_group("response_headers");
    let mut req = http::HeaderMap::new();
    let mut t = keygate::proxy::Trace::begin(&mut req);
    t.forwarded = Some(t.started + Duration::from_micros(180));
    t.answered = Some(t.started + Duration::from_micros(1_350));
    let now = t.started + Duration::from_micros(1_420);
    g.bench_function("stamp", |b| {
        b.iter(|| {
            let mut h = http::HeaderMap::new();
            t.stamp(&mut h, black_box(now));
            h
        })
    });
    g.bench_function("stamp_float_format", |b| {
        b.iter(|| {
            let mut h = http::HeaderMap::new();
            h.insert("x-request-id", t.id.clone());
            let overhead = t.overhead(black_box(now)).as_secs_f64() * 1000.0;
            if let Ok(v) = http::HeaderValue::from_str(&format!("{overhead:.3}")) {
                h.insert("x-keygate-overhead-ms", v);
            }
            let up = t.upstream().unwrap_or_default().as_secs_f64() * 1000.0;
            let timing = format!("keygate;dur={overhead:.3}, upstream;dur={up:.3}");
            if let Ok(v) = http::HeaderValue::from_str(&timing) {
                h.append("server-timing", v);
            }
            h
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
    targets = hot_path, response_headers
}
criterion_main!(benches);
