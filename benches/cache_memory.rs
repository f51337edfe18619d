//! Memory per cached key: fills the real auth cache with synthetic records shaped like
//! the database loader's (see `support::record`) and reads the resident set size from
//! `/proc/self/status` before and after. Each layout runs in a child process of its own,
//! so one layout's freed memory cannot hide the next one's growth. Target: < 256 B/key.
//!
//! Layouts measured, to say what the cache costs and what the alternatives would:
//! - `keygate`: the cache as it is: the compact `Copy` record (interned prefix and
//!   scopes, inline hint, `i32` limits) inline in a slot, in `auth::table`'s shards (an
//!   index of 4-byte positions, packed entries);
//! - `keygate_presized`: the same, with room reserved for the key count first, as a
//!   preload that knew its count could;
//! - `dashmap_inline`: the same record and slot fields inline in a `DashMap` keyed by the
//!   digest, the layout the table replaced: its half-empty buckets hold whole slots;
//! - `compact_80`: an 80-byte record (ids as byte arrays, `i32` limits, freshness as
//!   seconds, interned scopes) inline in a presized `DashMap`, the earlier experiment;
//! - `before`: the layout before the compact record (`DashMap<KeyDigest, Slot>` with an
//!   `Arc` of a 168-byte record owning its prefix, hint and scope strings), rebuilt here
//!   as the reference for the number in docs/performance.md.
//!
//! Run: `cargo bench --bench cache_memory` (`CACHE_BENCH_KEYS`, default 1,000,000). Under
//! `cargo test --all-targets` it measures 10,000 keys and checks only that it ran; Linux
//! only (it reads /proc), and it prints a skip message elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use keygate::keys::KeyDigest;
use keygate::model::{AuthRecord, Plan};
use uuid::Uuid;

const VARIANT_ENV: &str = "KEYGATE_CACHE_MEMORY_VARIANT";
const VARIANTS: [&str; 5] = ["keygate", "keygate_presized", "dashmap_inline", "compact_80", "before"];

/// The fields of the cache's slot (sequence number, freshness, record, invalidated
/// flag), for storing them inline in a `DashMap`.
#[allow(dead_code)]
struct InlineSlot {
    seq: u64,
    fresh_until: Instant,
    record: AuthRecord,
    invalidated: bool,
}

/// An 80-byte record with 8-byte alignment (ids as byte arrays, the database's
/// `integer` limits as `i32`, freshness as seconds since the cache's epoch, scopes
/// interned), sequence number included.
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
        org_rate_limit_per_minute: i32::try_from(r.org_rate_limit_per_minute()).unwrap_or(i32::MAX),
        monthly_request_limit: i32::try_from(r.monthly_request_limit()).unwrap_or(i32::MAX),
        fresh_until_secs: 0,
        scopes: 1,
        flags: 0b11,
        plan: 1,
    }
}

/// The record before the compact one, field for field (168 bytes, plus its strings).
#[allow(dead_code)]
struct OldRecord {
    key_id: Uuid,
    organization_id: Uuid,
    key_prefix: String,
    key_hint: String,
    key_active: bool,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    scopes: Vec<String>,
    custom_rate_limit: Option<i64>,
    org_active: bool,
    plan: Plan,
    org_rate_limit_per_minute: i64,
    monthly_request_limit: i64,
}

/// The slot before: sequence number, then the record behind an `Arc` (40 bytes).
#[allow(dead_code)]
enum OldState {
    Found {
        record: Arc<OldRecord>,
        fresh_until: Instant,
        invalidated: bool,
    },
    Unknown {
        fresh_until: Instant,
    },
}

#[allow(dead_code)]
struct OldSlot {
    seq: u64,
    state: OldState,
}

/// What the old loader built from a row: exact-capacity strings, scopes collected from
/// a JSON array (so capacity 4).
fn old_record() -> OldRecord {
    let scopes_json = ["chat"];
    OldRecord {
        key_id: Uuid::new_v4(),
        organization_id: Uuid::new_v4(),
        key_prefix: String::from("pk_test_"),
        key_hint: String::from("bchA"),
        key_active: true,
        expires_at: None,
        revoked_at: None,
        #[allow(clippy::unnecessary_filter_map)] // the loader's shape, on purpose
        scopes: scopes_json.iter().filter_map(|s| Some((*s).to_owned())).collect(),
        custom_rate_limit: None,
        org_active: true,
        plan: Plan::Pro,
        org_rate_limit_per_minute: 2_000_000_000,
        monthly_request_limit: 2_000_000_000,
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
        "keygate_presized" => {
            let auth = support::authenticator();
            auth.bench_reserve(n);
            for i in 0..n {
                auth.bench_insert(digest(i), Some(support::record(None)));
            }
            let rss = rss_bytes();
            assert_eq!(auth.stats().cached, n);
            rss
        }
        "dashmap_inline" => {
            let map: DashMap<[u8; 32], InlineSlot> = DashMap::new();
            let now = Instant::now();
            for i in 0..n {
                let slot = InlineSlot {
                    seq: i as u64,
                    fresh_until: now,
                    record: support::record(None),
                    invalidated: false,
                };
                map.insert(*digest(i).as_bytes(), slot);
            }
            let rss = rss_bytes();
            assert_eq!(map.len(), n);
            rss
        }
        "before" => {
            let map: DashMap<KeyDigest, OldSlot> = DashMap::new();
            let now = Instant::now();
            for i in 0..n {
                let state = OldState::Found {
                    record: Arc::new(old_record()),
                    fresh_until: now,
                    invalidated: false,
                };
                map.insert(digest(i), OldSlot { seq: i as u64, state });
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
        "cache_memory: {n} keys; size_of AuthRecord = {} B (no heap of its own); cache slot = {} B \
         (+ 32 B digest, + 4 B index position); Compact80 = {} B; before: {} B record + 16 B Arc header + heap",
        std::mem::size_of::<AuthRecord>(),
        std::mem::size_of::<InlineSlot>(),
        std::mem::size_of::<Compact80>(),
        std::mem::size_of::<OldRecord>(),
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
