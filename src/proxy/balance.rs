//! Which per-core worker accepts the next client connection.
//!
//! Every worker accepts on its own copy of the listening socket, so a connection is
//! registered with the reactor of the thread that serves it, with no hand-off between
//! threads. Left to race, the first worker to wake would take a whole burst of
//! connections (a client pool opening 50 at once), and keep-alive connections would
//! stay unevenly spread for their lifetime. So each worker counts its open connections
//! here, and one that is ahead of the least loaded by more than an eighth of that
//! (`SLACK_DIVISOR`) stops accepting until a count changes: the others, woken by the
//! same connection, take it.
//!
//! Owns the counts and the wait. It does not accept, and knows nothing of HTTP.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A worker may accept while it holds no more than the least loaded worker plus
/// 1/`SLACK_DIVISOR` of that. So a few connections are spread exactly (two keep-alive
/// clients get a worker each), and many are spread within an eighth, so that under
/// churn (a new connection per request) workers are rarely held back and rarely wake
/// each other.
const SLACK_DIVISOR: usize = 8;

#[derive(Debug)]
struct Counts {
    open: Box<[AtomicUsize]>,
    /// Signalled whenever a count changes, for a worker waiting to become eligible.
    changed: Notify,
}

/// One worker's view of the shared counts.
#[derive(Debug, Clone)]
pub(crate) struct Turn {
    counts: Arc<Counts>,
    me: usize,
}

impl Turn {
    /// One turn per worker, all over the same counts.
    pub(crate) fn split(workers: usize) -> Vec<Turn> {
        let counts = Arc::new(Counts {
            open: (0..workers.max(1)).map(|_| AtomicUsize::new(0)).collect(),
            changed: Notify::new(),
        });
        (0..workers.max(1))
            .map(|me| Turn {
                counts: counts.clone(),
                me,
            })
            .collect()
    }

    /// The only acceptor: always eligible.
    pub(crate) fn alone() -> Turn {
        Turn::split(1).remove(0)
    }

    /// Connections this worker holds open.
    fn open(&self) -> usize {
        self.counts.open[self.me].load(Relaxed)
    }

    fn eligible(&self) -> bool {
        let least = self.counts.open.iter().map(|c| c.load(Relaxed)).min().unwrap_or(0);
        self.open() <= least + least / SLACK_DIVISOR
    }

    /// Waits until this worker may accept; false if `cancel` fired first.
    pub(crate) async fn wait(&self, cancel: &CancellationToken) -> bool {
        loop {
            // Registered before the check, so a change between the check and the wait
            // still wakes it.
            let changed = self.counts.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.eligible() {
                return true;
            }
            tokio::select! {
                () = changed => {}
                () = cancel.cancelled() => return false,
            }
        }
    }

    /// This worker will never accept: it stops holding the others back.
    pub(crate) fn retire(&self) {
        self.counts.open[self.me].store(usize::MAX / 2, Relaxed);
        self.counts.changed.notify_waiters();
    }

    /// Counts an accepted connection until the returned guard drops (the connection's
    /// task ends, or is aborted).
    pub(crate) fn opened(&self) -> Open {
        self.counts.open[self.me].fetch_add(1, Relaxed);
        self.counts.changed.notify_waiters();
        Open(self.clone())
    }
}

/// An open connection, counted against its worker.
#[derive(Debug)]
pub(crate) struct Open(Turn);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.counts.open[self.0.me].fetch_sub(1, Relaxed);
        self.0.counts.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_lone_acceptor_is_always_eligible() {
        let t = Turn::alone();
        let open: Vec<_> = (0..100).map(|_| t.opened()).collect();
        assert!(t.eligible());
        assert_eq!(t.open(), 100);
        drop(open);
        assert_eq!(t.open(), 0);
    }

    #[test]
    fn a_worker_ahead_of_the_least_loaded_stops_until_the_others_catch_up() {
        let turns = Turn::split(2);
        let (a, b) = (&turns[0], &turns[1]);
        let first = a.opened();
        assert!(!a.eligible(), "with few connections the spread is exact");
        assert!(b.eligible());
        let from_b = b.opened();
        assert!(a.eligible());
        drop(from_b);
        assert!(!a.eligible());
        drop(first);
        assert!(a.eligible(), "a close of its own makes room too");
    }

    #[test]
    fn with_many_connections_the_margin_is_an_eighth_of_the_least() {
        let turns = Turn::split(2);
        let (a, b) = (&turns[0], &turns[1]);
        let _b: Vec<_> = (0..16).map(|_| b.opened()).collect();
        let mut held: Vec<_> = (0..18).map(|_| a.opened()).collect();
        assert!(a.eligible(), "18 against 16 is within 16 + 16/8");
        held.push(a.opened());
        assert!(!a.eligible(), "19 against 16 is not");
        assert!(b.eligible());
    }

    #[test]
    fn a_retired_worker_holds_nobody_back() {
        let turns = Turn::split(3);
        turns[2].retire();
        let _a = turns[0].opened();
        assert!(!turns[0].eligible());
        let _b = turns[1].opened();
        assert!(turns[0].eligible(), "the least loaded is among the workers that accept");
    }

    #[tokio::test]
    async fn a_waiting_worker_wakes_when_another_accepts_or_it_closes_one() {
        let turns = Turn::split(2);
        let held = turns[0].opened();
        let cancel = CancellationToken::new();
        let a = turns[0].clone();
        let c = cancel.clone();
        let waiting = tokio::spawn(async move { a.wait(&c).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "it waits while ahead of the other");
        let from_b = turns[1].opened();
        let woke = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(matches!(woke, Ok(Ok(true))), "woken by the other's accept: {woke:?}");

        drop(from_b);
        let a = turns[0].clone();
        let c = cancel.clone();
        let waiting = tokio::spawn(async move { a.wait(&c).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        drop(held);
        let woke = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(matches!(woke, Ok(Ok(true))), "woken by its own close: {woke:?}");
    }

    #[tokio::test]
    async fn cancel_ends_the_wait() {
        let turns = Turn::split(2);
        let _held = turns[0].opened();
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(!turns[0].wait(&cancel).await);
    }
}
