//! The usage writer: moves recorded rows from memory into `api_key_usage`, or into
//! the spool while PostgreSQL cannot take them, and replays the spool when it can.
//!
//! Owns the public API ([`channel`], [`UsageWriter::run`]), batching by size or
//! interval and the event loop. Around it: `flight.rs` runs batches (several at once,
//! retried with capped backoff, spooled when they keep failing), `spill.rs` the
//! overflow task and the shutdown drain, `replay.rs` the spool replay, `partitions.rs`
//! the month partitions. The SQL is `db::usage`'s, the file format `spool.rs`', the
//! request-path handle `sink.rs`'.
//!
//! While the spool is usable, no row stays only in memory longer than a flush interval
//! plus a few backoff steps; a crash may lose what the queue held, no more.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::flight::{Done, Flying};
use super::replay::Replay;
use super::sink::Shared;
pub use super::sink::{UsageCounts, UsageSink, UsageStats};
use super::spill::spill_overflow;
use super::spool::Spool;
use super::UsageRecord;
use crate::config::UsageConfig;
use crate::db::usage::BatchOutcome;
use crate::db::usage::UsageWriteError;
use crate::limits::window;

/// The overflow holds at least this many rows (about 5 MB), so a burst against a
/// small queue reaches the spool instead of being dropped.
const OVERFLOW_MIN: usize = 16_384;
/// One write attempt, checkout included; past it the outcome is unknown and retried.
pub(super) const ATTEMPT_LIMIT: Duration = Duration::from_secs(30);
/// Batches in flight at once, each on its own pooled connection (at most the pool's
/// size). PostgreSQL inserts them in parallel; one connection leaves it idle while
/// the next batch is encoded and sent.
const MAX_LANES: usize = 4;

/// How often a batch that is filling takes the rows queued since; the first row of a
/// batch wakes the writer at once.
const COLLECT_TICK: Duration = Duration::from_millis(10);

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The sink for the request path and the writer to run in the background.
pub fn channel(cfg: &UsageConfig) -> (UsageSink, UsageWriter) {
    let capacity = cfg.queue_capacity.max(1);
    let (tx, rx) = mpsc::channel(capacity);
    let shared = Arc::new(Shared::new(capacity.max(OVERFLOW_MIN)));
    let writer = UsageWriter {
        rx,
        shared: Arc::clone(&shared),
        spool: Arc::new(Spool::new(&cfg.spool_dir, cfg.max_spool_bytes)),
        batch_size: cfg.batch_size.max(1),
        flush_interval: cfg.flush_interval,
        lanes: cfg.pool_size.clamp(1, MAX_LANES),
    };
    (UsageSink::new(tx, shared), writer)
}

pub struct UsageWriter {
    rx: mpsc::Receiver<UsageRecord>,
    shared: Arc<Shared>,
    spool: Arc<Spool>,
    batch_size: usize,
    flush_interval: Duration,
    lanes: usize,
}

impl UsageWriter {
    /// A handle on the counters that outlives `run`.
    pub fn stats(&self) -> Arc<UsageStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Replays any spool left by an earlier process, then writes batches until `stop`
    /// is cancelled; then drains everything queued into PostgreSQL within
    /// `drain_deadline`, else into the spool, so nothing is left only in memory.
    /// `pool` should be the writer's own (`usage.pool_size` connections). Records
    /// arriving after it returns are counted as dropped: stop it after the requests
    /// that record have finished.
    pub async fn run(self, pool: Pool, stop: CancellationToken, drain_deadline: Duration) {
        let spill = spill_overflow(Arc::clone(&self.shared), Arc::clone(&self.spool), stop.clone());
        let mut writer = Writer::new(self, pool);
        let write = async {
            writer.serve(&stop).await;
            writer.drain(drain_deadline).await;
        };
        tokio::join!(spill, write);
    }
}

/// Capped exponential backoff with jitter, so replicas that lost the database together
/// do not all come back in the same millisecond.
#[derive(Debug, Default)]
pub(super) struct Backoff {
    /// Consecutive failures.
    pub(super) step: u32,
}

impl Backoff {
    pub(super) fn next(&mut self) -> Duration {
        let full = BACKOFF_FIRST.saturating_mul(1 << self.step.min(16)).min(BACKOFF_MAX);
        self.step = self.step.saturating_add(1);
        let jitter = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
            % 1000;
        // Between half and all of the full delay.
        full / 2 + full.mul_f64(f64::from(jitter) / 2000.0)
    }
}

/// What woke the event loop.
enum Woke {
    Done(Done),
    Rows(usize),
    Nothing,
}

pub(super) struct Writer {
    pub(super) rx: mpsc::Receiver<UsageRecord>,
    rx_open: bool,
    pub(super) shared: Arc<Shared>,
    pub(super) spool: Arc<Spool>,
    pub(super) pool: Pool,
    pub(super) batch_size: usize,
    pub(super) flush_interval: Duration,
    pub(super) lanes: usize,
    /// The live batch being filled; its rows count in `queued` until stored, spooled
    /// or dropped, like every live row below.
    pub(super) batch: Vec<UsageRecord>,
    pub(super) batch_since: Instant,
    /// Live batches whose last attempt failed, with their failed attempts so far.
    pub(super) retry: VecDeque<(Vec<UsageRecord>, u32)>,
    pub(super) tasks: JoinSet<Result<BatchOutcome, UsageWriteError>>,
    /// The rows of each task, kept so that no abort or panic can lose them.
    pub(super) flying: HashMap<tokio::task::Id, Flying>,
    pub(super) failing: bool,
    pub(super) backoff: Backoff,
    /// No attempt starts before this (the backoff while failing).
    pub(super) retry_at: Instant,
    /// Month starts (epoch ms) whose partition this process has made sure of.
    pub(super) months: HashSet<i64>,
    pub(super) replay: Replay,
}

impl Writer {
    fn new(w: UsageWriter, pool: Pool) -> Writer {
        let now = Instant::now();
        Writer {
            rx: w.rx,
            rx_open: true,
            shared: w.shared,
            spool: w.spool,
            pool,
            batch: Vec::with_capacity(w.batch_size),
            batch_size: w.batch_size,
            flush_interval: w.flush_interval,
            lanes: w.lanes,
            batch_since: now,
            retry: VecDeque::new(),
            tasks: JoinSet::new(),
            flying: HashMap::new(),
            failing: false,
            backoff: Backoff::default(),
            retry_at: now,
            months: HashSet::new(),
            replay: Replay::new(now),
        }
    }

    /// Takes whatever the queue holds right now, up to a full batch.
    pub(super) fn pull_ready(&mut self) {
        while self.batch.len() < self.batch_size {
            let Ok(r) = self.rx.try_recv() else {
                break;
            };
            if self.batch.is_empty() {
                self.batch_since = Instant::now();
            }
            self.batch.push(r);
        }
    }

    async fn serve(&mut self, stop: &CancellationToken) {
        let spool = Arc::clone(&self.spool);
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || spool.prepare()).await {
            tracing::error!(error = %e, "usage spool unusable: rows will be dropped while PostgreSQL is unavailable");
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let next_month = window::month_bounds(now_ms).1;
        self.ensure_months([now_ms, next_month], ATTEMPT_LIMIT).await;
        // Start-up: every spool file found, including those of a killed predecessor.
        self.rescan(true).await;
        while !stop.is_cancelled() {
            self.pull_ready();
            self.dispatch(None).await;
            let until = self.next_wake();
            self.wait(stop, until).await;
        }
    }

    /// When something that `dispatch` would start next becomes possible; finished
    /// tasks and arriving rows wake the loop earlier.
    fn next_wake(&self) -> Instant {
        let mut at = self.replay.next_scan;
        if self.tasks.len() < self.lanes {
            if !self.batch.is_empty() {
                let due = if self.batch.len() >= self.batch_size {
                    self.retry_at
                } else {
                    self.batch_since + self.flush_interval
                };
                at = at.min(due.max(self.retry_at));
            }
            if !self.retry.is_empty() || self.replay.ready() {
                at = at.min(self.retry_at);
            }
        }
        // Anything due now was just dispatched; never spin.
        at.max(Instant::now() + Duration::from_millis(1))
    }

    async fn wait(&mut self, stop: &CancellationToken, until: Instant) {
        let room = self.batch_size - self.batch.len();
        let was_empty = self.batch.is_empty();
        // Only the first row of a batch wakes the writer; the rest wait in the queue and
        // are collected every COLLECT_TICK. Woken per row, the writer cost a wake-up of
        // another thread on most requests (per-core workers record from their own).
        let listen = was_empty;
        let until = if listen {
            until
        } else {
            until.min(Instant::now() + COLLECT_TICK.min(self.flush_interval))
        };
        let woke = tokio::select! {
            biased;
            () = stop.cancelled() => Woke::Nothing,
            Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => Woke::Done(done),
            n = self.rx.recv_many(&mut self.batch, room), if self.rx_open && room > 0 && listen => Woke::Rows(n),
            () = tokio::time::sleep_until(until) => Woke::Nothing,
        };
        match woke {
            Woke::Done(done) => self.settle(done).await,
            // Zero: every sink is gone. Nothing more can arrive; keep replaying.
            Woke::Rows(0) => self.rx_open = false,
            Woke::Rows(_) if was_empty => self.batch_since = Instant::now(),
            Woke::Rows(_) | Woke::Nothing => {}
        }
    }
}
