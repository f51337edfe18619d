//! Time arithmetic for the limits engine: UTC minute windows, UTC calendar months and
//! the sliding-window estimate.
//!
//! Pure functions of their arguments: no clock, no state, no I/O. The estimate is kept
//! in exact integers scaled by the minute's length in milliseconds, so "allowed" never
//! depends on float rounding and two replicas always agree on the same inputs.

use chrono::{DateTime, Datelike, NaiveDate, Utc};

/// Length of a rate window. Windows are aligned to the UTC minute.
pub const MINUTE_MS: i64 = 60_000;

/// The minute window containing `ms` (minutes since the Unix epoch) and how many
/// milliseconds into it `ms` is.
pub fn minute_of(ms: i64) -> (i64, i64) {
    (ms.div_euclid(MINUTE_MS), ms.rem_euclid(MINUTE_MS))
}

/// The instant a minute window (minutes since the epoch) starts, if representable.
pub fn minute_start(minute: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(minute.checked_mul(MINUTE_MS)?)
}

/// The start of the UTC minute containing `now`.
pub fn minute_start_of(now: DateTime<Utc>) -> DateTime<Utc> {
    minute_start(minute_of(now.timestamp_millis()).0).unwrap_or(now)
}

/// Start and end (exclusive), in epoch milliseconds, of the UTC calendar month
/// containing `ms`.
pub fn month_bounds(ms: i64) -> (i64, i64) {
    let Some(t) = DateTime::from_timestamp_millis(ms) else {
        // Outside chrono's range: one month that never ends is the harmless reading.
        return (ms, i64::MAX);
    };
    let (y, m) = (t.year(), t.month());
    let next = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    (
        first_of_month(y, m).unwrap_or(ms),
        first_of_month(next.0, next.1).unwrap_or(i64::MAX),
    )
}

/// The start of the UTC calendar month containing `now`.
pub fn month_start_of(now: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(month_bounds(now.timestamp_millis()).0).unwrap_or(now)
}

fn first_of_month(year: i32, month: u32) -> Option<i64> {
    Some(
        NaiveDate::from_ymd_opt(year, month, 1)?
            .and_hms_opt(0, 0, 0)?
            .and_utc()
            .timestamp_millis(),
    )
}

/// `estimate * MINUTE_MS`, where estimate = prev * (1 - elapsed / 1 min) + cur.
fn scaled_estimate(prev: i64, cur: i64, elapsed_ms: i64) -> i128 {
    i128::from(prev) * i128::from(MINUTE_MS - elapsed_ms) + i128::from(cur) * i128::from(MINUTE_MS)
}

/// Whether one more request fits: estimate + 1 <= limit. A limit of 0 fits nothing.
pub fn allows(prev: i64, cur: i64, limit: i64, elapsed_ms: i64) -> bool {
    let w = i128::from(MINUTE_MS);
    scaled_estimate(prev, cur, elapsed_ms) + w <= i128::from(limit) * w
}

/// floor(limit - estimate), clamped to 0..=limit, for `RateLimit-Remaining`.
pub fn remaining(prev: i64, cur: i64, limit: i64, elapsed_ms: i64) -> i64 {
    let w = i128::from(MINUTE_MS);
    let room = (i128::from(limit) * w - scaled_estimate(prev, cur, elapsed_ms)).div_euclid(w);
    i64::try_from(room.clamp(0, i128::from(limit.max(0)))).unwrap_or(0)
}

/// Whole seconds until the current minute ends, rounded up: 1..=60.
pub fn reset_secs(elapsed_ms: i64) -> u64 {
    ceil_secs(MINUTE_MS - elapsed_ms)
}

/// Milliseconds rounded up to whole seconds, at least 1: a `Retry-After: 0` would
/// invite an immediate retry that is refused again.
pub fn ceil_secs(ms: i64) -> u64 {
    u64::try_from((ms.max(1) + 999) / 1000).unwrap_or(u64::MAX)
}

/// Milliseconds from now until one more request would fit, if nobody sends anything
/// in between; `None` when it never will (a limit of 0).
pub fn wait_ms(prev: i64, cur: i64, limit: i64, elapsed_ms: i64) -> Option<i64> {
    if limit <= 0 {
        return None;
    }
    let w = i128::from(MINUTE_MS);
    let (l, p, c, e) = (
        i128::from(limit),
        i128::from(prev.max(0)),
        i128::from(cur.max(0)),
        i128::from(elapsed_ms),
    );
    // Later in this window the previous minute's weight shrinks: find the first
    // millisecond x with p * (w - x) <= (l - c - 1) * w.
    let room = l - c - 1;
    if room >= 0 {
        if p == 0 {
            return Some(0);
        }
        let x = w - (room * w) / p;
        if x < w {
            return i64::try_from((x - e).max(0)).ok();
        }
    }
    // Otherwise in the next window, where this window's count becomes the weighted
    // one: first y with c * (w - y) <= (l - 1) * w. y = w is the window after that.
    let y = if c == 0 { 0 } else { (w - ((l - 1) * w) / c).max(0) };
    i64::try_from(w - e + y).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn minutes_align_to_utc() {
        assert_eq!(minute_of(0), (0, 0));
        assert_eq!(minute_of(59_999), (0, 59_999));
        assert_eq!(minute_of(60_000), (1, 0));
        assert_eq!(minute_of(-1), (-1, 59_999));
        let t = Utc.with_ymd_and_hms(2024, 5, 6, 7, 8, 9).unwrap();
        assert_eq!(minute_start_of(t), Utc.with_ymd_and_hms(2024, 5, 6, 7, 8, 0).unwrap());
    }

    #[test]
    fn months_follow_the_calendar() {
        let dec = Utc.with_ymd_and_hms(2023, 12, 31, 23, 59, 59).unwrap();
        let (s, e) = month_bounds(dec.timestamp_millis());
        assert_eq!(
            s,
            Utc.with_ymd_and_hms(2023, 12, 1, 0, 0, 0).unwrap().timestamp_millis()
        );
        assert_eq!(e, Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap().timestamp_millis());
        let feb = Utc.with_ymd_and_hms(2024, 2, 29, 12, 0, 0).unwrap();
        assert_eq!(month_start_of(feb), Utc.with_ymd_and_hms(2024, 2, 1, 0, 0, 0).unwrap());
    }

    #[test]
    fn estimate_weighs_the_previous_minute_by_what_is_left_of_this_one() {
        // 10 last minute, half-way through this one: estimate 5.
        assert!(allows(10, 4, 10, 30_000));
        assert!(!allows(10, 5, 10, 30_000));
        assert_eq!(remaining(10, 4, 10, 30_000), 1);
        assert_eq!(remaining(10, 5, 10, 30_000), 0);
        // Fractions floor: estimate 10 * 0.25 = 2.5 leaves 7.5, reported as 7.
        assert_eq!(remaining(10, 0, 10, 45_000), 7);
        assert!(!allows(0, 0, 0, 0));
        assert_eq!(remaining(0, 0, 0, 0), 0);
        // Counts adopted from other replicas may exceed the limit; remaining stays 0.
        assert_eq!(remaining(0, 50, 10, 0), 0);
    }

    #[test]
    fn waits_are_exact_to_the_millisecond() {
        // Full this minute: the earliest fit is when the next minute's weighted
        // estimate 10 * (1 - y) <= 9, that is y = 6 s into it.
        assert_eq!(wait_ms(0, 10, 10, 50_000), Some(10_000 + 6_000));
        // Previous minute full, 5 now, at 30 s: need 10 * (1 - x) <= 4, x = 36 s.
        assert_eq!(wait_ms(10, 5, 10, 30_000), Some(6_000));
        assert!(allows(10, 5, 10, 36_000));
        assert!(!allows(10, 5, 10, 35_999));
        // Limit 1 and one request this minute: free only two minutes boundaries on.
        assert_eq!(wait_ms(0, 1, 1, 0), Some(120_000));
        assert_eq!(wait_ms(0, 0, 0, 0), None);
        assert_eq!(wait_ms(0, 0, 5, 10), Some(0));
        assert_eq!(reset_secs(0), 60);
        assert_eq!(reset_secs(59_999), 1);
        assert_eq!(ceil_secs(0), 1);
        assert_eq!(ceil_secs(1_001), 2);
    }
}
