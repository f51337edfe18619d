//! Unit tests of the flush bookkeeping that needs no database: taking deltas, putting
//! them back after a failed write, adopting returned totals, reading back idle cells
//! and eviction.
#![allow(clippy::unwrap_used)]

use chrono::{DateTime, Duration, Utc};

use super::tests::{allowed_of, at, key, limited};
use super::*;
use crate::db::counters::WindowCount;

#[test]
fn a_failed_flush_puts_every_delta_back() {
    let l = Limiter::new();
    let k = key(100, 1_000);
    allowed_of(&l, &k, 7, at(0, 10, 0));
    let taken = l.take(at(0, 11, 0));
    assert_eq!(taken.keys.len(), 1);
    assert_eq!(taken.keys[0].count, 7);
    // Counted while the write is in flight.
    allowed_of(&l, &k, 2, at(0, 12, 0));
    l.restore(taken.keys, taken.orgs);
    let again = l.take(at(0, 13, 0));
    assert_eq!(again.keys[0].count, 9);
    assert_eq!(again.orgs[0].count, 9);
    // The local view never dipped: 9 counted, 91 left.
    assert_eq!(l.check(&k, at(0, 14, 0)).info().remaining, 90);
}

#[test]
fn deltas_whose_window_has_passed_are_kept_for_the_next_flush() {
    let l = Limiter::new();
    let k = key(100, 1_000);
    allowed_of(&l, &k, 4, at(0, 10, 0));
    let taken = l.take(at(0, 59, 0));
    // The flush fails only after the key moved on two minutes.
    allowed_of(&l, &k, 1, at(2, 5, 0));
    l.restore(taken.keys, taken.orgs);
    assert_eq!(l.tracked().spilled, 1);
    let again = l.take(at(2, 6, 0));
    let mut cells: Vec<(DateTime<Utc>, i64)> = again.keys.iter().map(|r| (r.window_start, r.count)).collect();
    cells.sort();
    assert_eq!(cells, vec![(at(0, 0, 0), 4), (at(2, 0, 0), 1)]);
    assert_eq!(l.tracked().spilled, 0);
}

#[test]
fn adopted_totals_include_other_replicas_and_later_local_counts() {
    let l = Limiter::new();
    let k = key(10, 1_000);
    allowed_of(&l, &k, 3, at(0, 0, 0));
    let taken = l.take(at(0, 1, 0));
    allowed_of(&l, &k, 1, at(0, 2, 0));
    // Another replica had flushed 5 for this minute: the database returns 3 + 5.
    let row = |id, count| WindowCount {
        id,
        window_start: at(0, 0, 0),
        count,
    };
    l.adopt_keys(&[row(k.key_id, 8)], at(0, 3, 0));
    assert_eq!(taken.keys[0].count, 3);
    // 8 flushed + 1 since: 9 of 10, one left.
    assert_eq!(allowed_of(&l, &k, 3, at(0, 4, 0)), 1);
    let month = Snapshot::empty(at(0, 0, 0)).month_start;
    l.adopt_orgs(
        &[WindowCount {
            id: k.org_id,
            window_start: month,
            count: 999,
        }],
        at(0, 5, 0),
    );
    let d = l.check(&KeyLimits { per_minute: 100, ..k }, at(0, 6, 0));
    assert_eq!(limited(d).0, LimitKind::Monthly, "999 flushed + 2 local");
}

#[test]
fn recently_active_cells_with_nothing_to_write_are_read_back() {
    let l = Limiter::new();
    let k = key(10, 1_000);
    allowed_of(&l, &k, 1, at(0, 0, 0));
    let first = l.take(at(0, 1, 0));
    assert_eq!(first.keys.len(), 1);
    // This minute is written, so only the previous one is read.
    assert_eq!(first.key_reads, vec![(k.key_id, at(0, 0, 0) - Duration::minutes(1))]);
    let second = l.take(at(0, 2, 0));
    assert!(second.keys.is_empty() && second.orgs.is_empty());
    assert_eq!(second.key_reads.len(), 2);
    assert_eq!(second.org_reads.len(), 1);
}

#[test]
fn the_previous_minute_is_read_back_only_while_other_replicas_may_add_to_it() {
    let l = Limiter::new();
    let k = key(10, 1_000);
    allowed_of(&l, &k, 1, at(0, 0, 0));
    l.take(at(0, 1, 0));
    let reads = |t| l.take(t).key_reads;
    let (minute, previous) = (at(0, 0, 0), at(0, 0, 0) - Duration::minutes(1));
    // Two 1 s flush intervals and the clocks' 10 s.
    assert_eq!(reads(at(0, 12, 0)), vec![(k.key_id, minute), (k.key_id, previous)]);
    assert_eq!(reads(at(0, 12, 1)), vec![(k.key_id, minute)], "final by now");
    assert_eq!(reads(at(0, 59, 999)), vec![(k.key_id, minute)]);
    // A slower flusher's replicas are later with their last deltas.
    l.flush_every_ms.store(20_000, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(reads(at(0, 50, 0)).len(), 2);
    assert_eq!(reads(at(0, 50, 1)).len(), 1);
    // A minute's own delta is written whenever it is taken, and returns its total.
    allowed_of(&l, &k, 1, at(0, 55, 0));
    let late = l.take(at(1, 30, 0));
    assert_eq!(late.keys.len(), 1);
    assert_eq!(late.keys[0].window_start, minute);
    assert_eq!(late.key_reads, vec![(k.key_id, at(1, 0, 0))]);
}

#[test]
fn idle_cells_are_evicted_unless_they_hold_unflushed_counts() {
    let l = Limiter::new();
    let (a, b) = (key(10, 100), key(10, 100));
    l.check(&a, at(0, 0, 0));
    l.check(&b, at(0, 0, 0));
    let taken = l.take(at(0, 1, 0));
    l.restore(
        taken.keys.into_iter().filter(|r| r.id == b.key_id).collect(),
        Vec::new(),
    );
    assert_eq!(l.evict_idle(at(2, 0, 0)), (0, 0), "two minutes is not idle yet");
    assert_eq!(l.evict_idle(at(2, 0, 1)), (1, 2));
    assert!(!l.is_known(&a));
    assert_eq!(l.tracked().keys, 1, "b still owes a delta");
    l.take(at(2, 1, 0));
    assert_eq!(l.evict_idle(at(2, 1, 0)), (1, 0));
    assert_eq!(
        l.tracked(),
        Tracked {
            keys: 0,
            orgs: 0,
            spilled: 0,
            ..l.tracked()
        }
    );
}
