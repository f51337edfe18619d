//! Unit tests of the limiter's decisions: the sliding window, the monthly quota, the
//! numbers behind the headers, concurrency and seeding. Flush bookkeeping is tested in
//! `tests_reconcile.rs`; the SQL in `tests/limits_db.rs`.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use uuid::Uuid;

use super::*;

pub(super) fn at(min: u32, sec: u32, ms: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 3, 10, 12, min, sec).unwrap() + Duration::milliseconds(ms)
}

pub(super) fn key(per_minute: i64, monthly: i64) -> KeyLimits {
    KeyLimits {
        key_id: Uuid::now_v7(),
        org_id: Uuid::now_v7(),
        per_minute,
        monthly,
    }
}

pub(super) fn allowed_of(l: &Limiter, k: &KeyLimits, n: usize, now: DateTime<Utc>) -> usize {
    (0..n).filter(|_| l.check(k, now).is_allowed()).count()
}

pub(super) fn limited(d: Decision) -> (LimitKind, u64) {
    match d {
        Decision::Limited {
            which,
            retry_after_secs,
            ..
        } => (which, retry_after_secs),
        Decision::Allowed(_) => panic!("expected a refusal, got {d:?}"),
    }
}

#[test]
fn sliding_window_weighs_the_previous_minute_across_the_boundary() {
    let l = Limiter::new();
    let k = key(10, 1_000);
    assert_eq!(allowed_of(&l, &k, 15, at(0, 50, 0)), 10);
    // 30 s into the next minute the previous ten weigh 5: five more fit.
    assert_eq!(allowed_of(&l, &k, 8, at(1, 30, 0)), 5);
    // At 54 s they weigh 1; with 5 this minute, 4 more fit.
    assert_eq!(allowed_of(&l, &k, 8, at(1, 54, 0)), 4);
    // Two minutes on, nothing weighs.
    assert_eq!(allowed_of(&l, &k, 12, at(3, 0, 0)), 10);
}

#[test]
fn every_decision_reports_limit_remaining_and_reset() {
    let l = Limiter::new();
    let k = key(3, 1_000);
    let first = l.check(&k, at(0, 15, 500));
    assert_eq!(
        *first.info(),
        RateInfo {
            limit: 3,
            remaining: 2,
            reset_secs: 45
        }
    );
    l.check(&k, at(0, 15, 500));
    l.check(&k, at(0, 15, 500));
    let refused = l.check(&k, at(0, 15, 500));
    assert_eq!(refused.info().remaining, 0);
    assert_eq!(refused.info().reset_secs, 45);
}

#[test]
fn a_limit_of_zero_refuses_everything() {
    let l = Limiter::new();
    let k = key(0, 1_000);
    let (which, retry) = limited(l.check(&k, at(0, 20, 0)));
    assert_eq!((which, retry), (LimitKind::PerMinute, 40));
    let k = key(10, 0);
    assert_eq!(limited(l.check(&k, at(0, 20, 0))).0, LimitKind::Monthly);
}

#[test]
fn retry_after_says_when_a_request_would_fit() {
    let l = Limiter::new();
    let k = key(10, 1_000);
    allowed_of(&l, &k, 10, at(0, 50, 0));
    // Full at 0:50: the next minute's estimate drops to 9 at 1:06, 16 s away.
    assert_eq!(limited(l.check(&k, at(0, 50, 0))), (LimitKind::PerMinute, 16));
    // At 1:30, 5 fit; then the weight must drop to 4, at 1:36.
    assert_eq!(allowed_of(&l, &k, 5, at(1, 30, 0)), 5);
    assert_eq!(limited(l.check(&k, at(1, 30, 0))), (LimitKind::PerMinute, 6));
    assert!(l.check(&k, at(1, 36, 0)).is_allowed());
}

#[test]
fn monthly_refusals_consume_nothing_anywhere() {
    let l = Limiter::new();
    let a = key(5, 3);
    let b = KeyLimits {
        key_id: Uuid::now_v7(),
        ..a
    };
    assert_eq!(allowed_of(&l, &a, 2, at(0, 0, 0)), 2);
    assert!(l.check(&b, at(0, 0, 0)).is_allowed());
    // The org's quota is spent; the key still has per-minute room but gets nothing.
    let d = l.check(&a, at(0, 1, 0));
    assert_eq!(d.info().remaining, 3, "the refused request was not counted");
    let (which, retry) = limited(d);
    assert_eq!(which, LimitKind::Monthly);
    // 2024-03-10 12:00:01 to 2024-04-01 00:00:00.
    assert_eq!(retry, (21 * 86_400) + 12 * 3_600 - 1);
    // Raising the quota shows the refusals left no trace on the key's count.
    let raised = KeyLimits { monthly: 100, ..a };
    assert_eq!(allowed_of(&l, &raised, 10, at(0, 2, 0)), 3);
    let batch = l.take(at(0, 3, 0));
    let total: i64 = batch.keys.iter().map(|r| r.count).sum();
    assert_eq!(total, 6, "2 + 1 + 3 allowed requests, nothing else");
    assert_eq!(batch.orgs.iter().map(|r| r.count).sum::<i64>(), 6);
}

#[test]
fn month_rollover_resets_the_quota() {
    let l = Limiter::new();
    let k = key(100, 2);
    let end_of_jan = Utc.with_ymd_and_hms(2024, 1, 31, 23, 59, 59).unwrap();
    assert_eq!(allowed_of(&l, &k, 5, end_of_jan), 2);
    let (which, retry) = limited(l.check(&k, end_of_jan));
    assert_eq!((which, retry), (LimitKind::Monthly, 1));
    let feb = Utc.with_ymd_and_hms(2024, 2, 1, 0, 0, 0).unwrap();
    assert_eq!(allowed_of(&l, &k, 5, feb), 2);
    // January's unflushed delta is not lost: it waits for its own month's row.
    let batch = l.take(feb);
    let mut months: Vec<(DateTime<Utc>, i64)> = batch.orgs.iter().map(|r| (r.window_start, r.count)).collect();
    months.sort();
    let jan = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap();
    assert_eq!(months, vec![(jan, 2), (feb, 2)]);
}

#[test]
fn exactly_the_limit_is_allowed_under_concurrency() {
    let l = Arc::new(Limiter::new());
    let k = key(1_000, 1_000_000);
    let now = at(7, 0, 0);
    let allowed = Arc::new(AtomicI64::new(0));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (l, allowed) = (Arc::clone(&l), Arc::clone(&allowed));
            std::thread::spawn(move || {
                for _ in 0..500 {
                    if l.check(&k, now).is_allowed() {
                        allowed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(allowed.load(Ordering::Relaxed), 1_000);
}

#[test]
fn a_shared_monthly_quota_holds_exactly_under_concurrency() {
    let l = Arc::new(Limiter::new());
    let org = Uuid::now_v7();
    let now = at(7, 0, 0);
    let allowed = Arc::new(AtomicI64::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (l, allowed) = (Arc::clone(&l), Arc::clone(&allowed));
            let k = KeyLimits {
                org_id: org,
                ..key(1_000, 777)
            };
            std::thread::spawn(move || {
                for _ in 0..400 {
                    if l.check(&k, now).is_allowed() {
                        allowed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(allowed.load(Ordering::Relaxed), 777);
    let batch = l.take(now);
    assert_eq!(batch.keys.iter().map(|r| r.count).sum::<i64>(), 777);
}

#[test]
fn seeding_starts_from_the_database_totals() {
    let l = Limiter::new();
    let k = key(10, 50);
    assert!(!l.is_known(&k));
    let snap = Snapshot {
        minute_start: at(5, 0, 0),
        minute_count: 4,
        previous_minute_count: 12,
        month_start: Snapshot::empty(at(5, 0, 0)).month_start,
        month_count: 45,
    };
    l.seed(&k, &snap, at(5, 30, 0));
    assert!(l.is_known(&k));
    // Estimate 12 * 0.5 + 4 = 10: full.
    assert_eq!(limited(l.check(&k, at(5, 30, 0))).0, LimitKind::PerMinute);
    // A minute later the 4 weigh 2 at 6:30; the month has 5 left.
    assert_eq!(allowed_of(&l, &k, 20, at(6, 30, 0)), 5);
    // Seeding again with an older view lowers nothing.
    l.seed(&k, &snap, at(6, 31, 0));
    assert!(!l.check(&k, at(6, 31, 0)).is_allowed());
}
