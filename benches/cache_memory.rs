//! Memory per cached key: fills the real auth cache with synthetic records shaped like
//! the database loader's (see `support::record`) and reads the resident set size from
//! `/proc/self/status` before and after. Each layout runs in a child process of its own,
//! so one layout's freed memory cannot hide the next one's growth. Target: < 256 B/key.
//!
//! Layouts measured, to say what dominates and what a fix would buy:
//! - `keygate`: the cache as it is (`DashMap<KeyDigest, Slot>` holding `Arc<AuthRecord>`);
//! - `records_only`: the same `Arc<AuthRecord>`s in a `Vec`, no map: the records' share;
//! - `compact_inline`: a 96-byte `Copy` record stored inline in a default `DashMap`;
//! - `compact_presized`: the same, with the map sized for the key count up front (as a
//!   preload knows it);
//! - `compact_80`: an 80-byte record with 8-byte alignment (ids as byte arrays, the
//!   database's `integer` limits as `i32`, freshness as seconds), inline, presized.
//!
//! Run: `cargo bench --bench cache_memory` (`CACHE_BENCH_KEYS`, default 1,000,000). Under
//! `cargo test --all-targets` it measures 10,000 keys and checks only that it ran; Linux
//! only (it reads /proc), and it prints a skip message elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::process::Command;
use std::sync::Arc;

use dashmap::DashMap;
use keygate::keys::KeyDigest;
use keygate::model::AuthRecord;

const VARIANT_ENV: &str = "KEYGATE_CACHE_MEMORY_VARIANT";
const VARIANTS: [&str; 5] = [
    "keygate",
    "records_only",
    "compact_inline",
    "compact_presized",
    "compact_80",
];

/// What a compact cache entry could hold: ids, limits and times as integers, the plan
/// and flags as bytes, scopes as an index into an interned table. 96 bytes, no heap.
#[derive(Clone, Copy)]
#[allow(dead_code)]
struct Compact {
    key_id: u128,
    org_id: u128,
    expires_at_ms: i64,
    revoked_at_ms: i64,
    custom_rate_limit: i64,
    org_rate_limit_per_minute: i64,
    monthly_request_limit: i64,
    fresh_until_ms: i64,
    seq: u64,
    scopes: u32,
    flags: u8,
    plan: u8,
}

/// The same facts in 80 bytes: no 16-byte alignment, limits as the columns' `i32`,
/// freshness as seconds since the cache's epoch, scopes interned.
#[derive(Clone, Copy)]
#[allow(dead_code)]
struct Compact80 {
    key_id: [u8; 16],
    org_id: [u8; 16],
    expires_at_ms: i64,
    revoked_at_ms: i64,
    seq: u64,
    custom_rate_limit: i32,
    org_rate_limit_per_minute: i32,
    monthly_request_limit: i32,
    fresh_until_secs: u32,
    scopes: u16,
    flags: u8,
    plan: u8,
}

fn compact80(r: &AuthRecord) -> Compact80 {
    Compact80 {
        key_id: *r.key_id.as_bytes(),
        org_id: *r.organization_id.as_bytes(),
        expires_at_ms: 0,
        revoked_at_ms: 0,
        seq: 0,
        custom_rate_limit: -1,
        org_rate_limit_per_minute: i32::try_from(r.org_rate_limit_per_minute).unwrap_or(i32::MAX),
        monthly_request_limit: i32::try_from(r.monthly_request_limit).unwrap_or(i32::MAX),
        fresh_until_secs: 0,
        scopes: 1,
        flags: 0b11,
        plan: 1,
    }
}

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn digest(i: usize) -> KeyDigest {
    KeyDigest::of(&support::key(i as u64))
}

fn compact(r: &AuthRecord) -> Compact {
    Compact {
        key_id: r.key_id.as_u128(),
        org_id: r.organization_id.as_u128(),
        expires_at_ms: 0,
        revoked_at_ms: 0,
        custom_rate_limit: r.custom_rate_limit.unwrap_or(-1),
        org_rate_limit_per_minute: r.org_rate_limit_per_minute,
        monthly_request_limit: r.monthly_request_limit,
        fresh_until_ms: 0,
        seq: 0,
        scopes: 1,
        flags: 0b11,
        plan: 1,
    }
}

/// Fills one layout with `n` keys; returns the RSS growth in bytes. The structure is
/// returned too, so it is still alive when the RSS is read.
fn measure(variant: &str, n: usize) -> u64 {
    let before = rss_bytes().expect("/proc/self/status");
    let after = match variant {
        "keygate" => {
            let auth = support::authenticator();
            for i in 0..n {
                auth.bench_insert(digest(i), Some(support::record(None)));
            }
            let rss = rss_bytes();
            assert_eq!(auth.stats().cached, n);
            rss
        }
        "records_only" => {
            let v: Vec<Arc<AuthRecord>> = (0..n).map(|_| Arc::new(support::record(None))).collect();
            let rss = rss_bytes();
            assert_eq!(v.len(), n);
            rss
        }
        "compact_inline" | "compact_presized" => {
            let map: DashMap<[u8; 32], Compact> = if variant == "compact_presized" {
                DashMap::with_capacity(n)
            } else {
                DashMap::new()
            };
            for i in 0..n {
                map.insert(*digest(i).as_bytes(), compact(&support::record(None)));
            }
            let rss = rss_bytes();
            assert_eq!(map.len(), n);
            rss
        }
        "compact_80" => {
            let map: DashMap<[u8; 32], Compact80> = DashMap::with_capacity(n);
            for i in 0..n {
                map.insert(*digest(i).as_bytes(), compact80(&support::record(None)));
            }
            let rss = rss_bytes();
            assert_eq!(map.len(), n);
            rss
        }
        other => panic!("unknown variant {other}"),
    };
    after.expect("/proc/self/status").saturating_sub(before)
}

fn main() {
    let n = support::scale(
        std::env::var("CACHE_BENCH_KEYS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000),
        10_000,
    );
    if let Ok(variant) = std::env::var(VARIANT_ENV) {
        println!("{}", measure(&variant, n));
        return;
    }
    if rss_bytes().is_none() {
        println!("cache_memory: skipped, /proc/self/status is not readable (Linux only)");
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    println!(
        "cache_memory: {n} keys; size_of AuthRecord = {} B (+16 B Arc header, + heap: prefix, hint, scopes); \
         Compact = {} B, Compact80 = {} B",
        std::mem::size_of::<AuthRecord>(),
        std::mem::size_of::<Compact>(),
        std::mem::size_of::<Compact80>()
    );
    println!("{:<18} {:>12} {:>10}", "layout", "RSS growth", "B/key");
    for variant in VARIANTS {
        let out = Command::new(&exe)
            .args(std::env::args().skip(1))
            .env(VARIANT_ENV, variant)
            .output()
            .expect("run child");
        assert!(
            out.status.success(),
            "{variant}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let grew: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("child output");
        println!(
            "{variant:<18} {:>9.1} MiB {:>10.1}",
            grew as f64 / (1 << 20) as f64,
            grew as f64 / n as f64
        );
    }
}
