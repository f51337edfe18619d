//! The per-key and per-organisation counter cells the limiter keeps in memory, and the
//! rules for moving them forward in time and merging totals learnt from the database.
//!
//! Plain data behind the limiter's mutexes: nothing here locks, allocates or knows
//! about other replicas. Every count is the local view of the total of all replicas
//! (last total adopted from the database plus what this process counted since);
//! every `pending` is what this process counted and has not handed to a flush yet.

use super::window;

/// An unflushed delta that lost its slot when a cell moved on: (window, delta), where
/// the window is a minute index for keys and a month start in epoch ms for orgs.
pub(super) type Orphan = (i64, i64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KeyState {
    /// Minute index of `cur`; `prev` is the minute before it.
    pub window: i64,
    pub cur: i64,
    pub prev: i64,
    pub pending_cur: i64,
    pub pending_prev: i64,
    pub last_seen_ms: i64,
}

impl KeyState {
    pub fn new(now_ms: i64) -> Self {
        KeyState {
            window: window::minute_of(now_ms).0,
            cur: 0,
            prev: 0,
            pending_cur: 0,
            pending_prev: 0,
            last_seen_ms: now_ms,
        }
    }

    /// Moves forward to `minute`. Never backwards: a clock that steps back keeps the
    /// newer window, which errs towards limiting. Returns the deltas that no longer
    /// have a slot; zero deltas mean nothing was orphaned.
    pub fn roll(&mut self, minute: i64) -> [Orphan; 2] {
        let mut out = [(self.window - 1, 0), (self.window, 0)];
        if minute <= self.window {
            return out;
        }
        out[0].1 = self.pending_prev;
        if minute == self.window + 1 {
            self.prev = self.cur;
            self.pending_prev = self.pending_cur;
        } else {
            out[1].1 = self.pending_cur;
            self.prev = 0;
            self.pending_prev = 0;
        }
        self.cur = 0;
        self.pending_cur = 0;
        self.window = minute;
        out
    }

    /// Adopts a database total for `minute`: everything counted locally since the
    /// flush took its deltas is still pending and comes on top.
    pub fn adopt(&mut self, minute: i64, total: i64) {
        if minute == self.window {
            self.cur = total.saturating_add(self.pending_cur);
        } else if minute == self.window - 1 {
            self.prev = total.saturating_add(self.pending_prev);
        }
    }

    /// Merges a snapshot read at `minute`. Takes the larger view: the snapshot and an
    /// entry created or flushed meanwhile may each know something the other does not,
    /// and the next flush replaces the guess with the true total anyway.
    pub fn merge(&mut self, minute: i64, cur: i64, prev: i64) {
        if minute == self.window {
            self.cur = self.cur.max(cur.saturating_add(self.pending_cur));
            self.prev = self.prev.max(prev.saturating_add(self.pending_prev));
        } else if minute == self.window - 1 {
            self.prev = self.prev.max(cur.saturating_add(self.pending_prev));
        }
    }

    /// Puts a delta back after a failed flush; `false` if its window has no slot.
    pub fn restore(&mut self, minute: i64, delta: i64) -> bool {
        if minute == self.window {
            self.pending_cur += delta;
        } else if minute == self.window - 1 {
            self.pending_prev += delta;
        } else {
            return false;
        }
        true
    }

    pub fn has_pending(&self) -> bool {
        self.pending_cur != 0 || self.pending_prev != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OrgState {
    /// The calendar month `count` belongs to, as [start, end) in epoch ms; cached so the
    /// hot path compares two integers instead of doing calendar arithmetic.
    pub month_start: i64,
    pub month_end: i64,
    pub count: i64,
    pub pending: i64,
    pub last_seen_ms: i64,
}

impl OrgState {
    pub fn new(now_ms: i64) -> Self {
        let (month_start, month_end) = window::month_bounds(now_ms);
        OrgState {
            month_start,
            month_end,
            count: 0,
            pending: 0,
            last_seen_ms: now_ms,
        }
    }

    /// Moves to the month containing `now_ms` if it is a later one.
    pub fn roll(&mut self, now_ms: i64) -> Orphan {
        let out = (self.month_start, 0);
        if now_ms < self.month_end {
            return out;
        }
        let out = (self.month_start, self.pending);
        (self.month_start, self.month_end) = window::month_bounds(now_ms);
        self.count = 0;
        self.pending = 0;
        out
    }

    pub fn adopt(&mut self, month_start: i64, total: i64) {
        if month_start == self.month_start {
            self.count = total.saturating_add(self.pending);
        }
    }

    pub fn merge(&mut self, month_start: i64, total: i64) {
        if month_start == self.month_start {
            self.count = self.count.max(total.saturating_add(self.pending));
        }
    }

    pub fn restore(&mut self, month_start: i64, delta: i64) -> bool {
        if month_start != self.month_start {
            return false;
        }
        self.pending += delta;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_cells_roll_and_orphan_what_falls_off() {
        let mut k = KeyState::new(10 * window::MINUTE_MS);
        (k.cur, k.pending_cur, k.prev, k.pending_prev) = (5, 2, 3, 1);
        assert_eq!(k.roll(10), [(9, 0), (10, 0)]);
        assert_eq!(k.roll(11), [(9, 1), (10, 0)]);
        assert_eq!(
            (k.window, k.cur, k.prev, k.pending_cur, k.pending_prev),
            (11, 0, 5, 0, 2)
        );
        k.pending_cur = 4;
        assert_eq!(k.roll(14), [(10, 2), (11, 4)]);
        assert_eq!((k.cur, k.prev), (0, 0));
        assert!(!k.has_pending());
    }

    #[test]
    fn adoption_keeps_what_was_counted_after_the_deltas_were_taken() {
        let mut k = KeyState::new(0);
        (k.cur, k.pending_cur) = (7, 2);
        k.adopt(0, 40);
        assert_eq!(k.cur, 42);
        k.adopt(5, 1);
        assert_eq!(k.cur, 42);
        k.merge(0, 10, 0);
        assert_eq!(k.cur, 42, "a stale snapshot never lowers the view");
    }

    #[test]
    fn org_cells_roll_by_calendar_month() {
        let mut o = OrgState::new(0);
        (o.count, o.pending) = (9, 4);
        assert_eq!(o.roll(o.month_end - 1), (0, 0));
        let jan = o.month_start;
        assert_eq!(o.roll(o.month_end), (jan, 4));
        assert_eq!((o.count, o.pending), (0, 0));
        assert!(!o.restore(jan, 4));
    }
}
