//! Replaying spool files into PostgreSQL, a batch at a time, between live batches.
//!
//! Owns which files are due (found at start-up and by periodic rescans, including this
//! process's own once sealed), reading them back, and deleting a file only after every
//! row in it has committed. It does not write SQL or files itself: `flight.rs` runs
//! the chunks as batches and `spool.rs` owns the files. Replays are idempotent (rows keep their ids), so a file
//! replayed twice, after a crash or by two processes at once, stores and counts once.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::spool::SpoolError;
use super::writer::Writer;
use super::UsageRecord;

/// Files left by processes that died after the last scan are found this often.
const RESCAN_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub(super) struct Replay {
    files: VecDeque<PathBuf>,
    reader: Option<SpoolReader>,
    /// Read but not yet committed; retried as is after a failure.
    pub(super) chunk: Vec<UsageRecord>,
    /// A chunk is being written. Chunks of a file go one at a time, so the file is
    /// deleted only once every one of them has committed.
    pub(super) in_flight: bool,
    pub(super) next_scan: Instant,
    /// The `spooled` count when this process last sealed its own file.
    sealed_at: u64,
}

impl Replay {
    pub(super) fn new(now: Instant) -> Replay {
        Replay {
            files: VecDeque::new(),
            reader: None,
            chunk: Vec::new(),
            in_flight: false,
            next_scan: now,
            sealed_at: 0,
        }
    }

    /// Whether a chunk could be started now.
    pub(super) fn ready(&self) -> bool {
        !self.in_flight && (!self.chunk.is_empty() || self.reader.is_some() || !self.files.is_empty())
    }
}

/// What reading the next chunk found.
enum Read {
    Chunk(SpoolReader, Vec<UsageRecord>),
    Done(SpoolReader),
    Gone,
    Failed(SpoolError),
}

impl Writer {
    /// Queues every replayable spool file not queued yet, sealing this process's own
    /// file first if it has taken rows since the last time. At `startup` every file
    /// found is taken, including the `.open` file of a process killed a moment ago.
    pub(super) async fn rescan(&mut self, startup: bool) {
        self.replay.next_scan = Instant::now() + RESCAN_EVERY;
        let spooled = self.shared.stats.spooled.load(Relaxed);
        let seal = spooled > self.replay.sealed_at;
        let spool = Arc::clone(&self.spool);
        let found = tokio::task::spawn_blocking(move || {
            let sealed = if seal { spool.seal() } else { Ok(()) };
            (sealed, spool.replayable(startup))
        })
        .await;
        let files = match found {
            Ok((sealed, Ok(files))) => {
                match sealed {
                    Ok(()) => self.replay.sealed_at = spooled,
                    // Still `.open`: found as an orphan later, or sealed next time.
                    Err(e) => tracing::warn!(error = %e, "cannot seal usage spool file"),
                }
                files
            }
            Ok((_, Err(e))) => {
                tracing::warn!(error = %e, "cannot look for usage spool files");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "usage spool scan failed");
                return;
            }
        };
        let reading = self.replay.reader.as_ref().map(|r| r.path().to_owned());
        for f in files {
            if Some(&f) != reading.as_ref() && !self.replay.files.contains(&f) {
                tracing::info!(file = %f.display(), "replaying usage spool file");
                self.replay.files.push_back(f);
            }
        }
    }

    /// The chunk to write next: the one that failed last time, else the next one read.
    /// `None` if there is none right now (a file ended, vanished or could not be read).
    pub(super) async fn next_replay_chunk(&mut self) -> Option<Vec<UsageRecord>> {
        if self.replay.chunk.is_empty() && !self.read_chunk().await {
            return None;
        }
        Some(std::mem::take(&mut self.replay.chunk))
    }

    /// Loads the next chunk; false if there is none to write now.
    async fn read_chunk(&mut self) -> bool {
        let current = self.replay.reader.take();
        let path = match (&current, self.replay.files.front()) {
            (Some(r), _) => r.path().to_owned(),
            (None, Some(p)) => p.clone(),
            (None, None) => return false,
        };
        if current.is_none() {
            self.replay.files.pop_front();
        }
        let max = self.batch_size;
        let opened = path.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut reader = match current {
                Some(r) => r,
                None => match SpoolReader::open(&opened) {
                    Ok(r) => r,
                    Err(SpoolError::File { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                        return Read::Gone;
                    }
                    Err(e) => return Read::Failed(e),
                },
            };
            match reader.next_chunk(max) {
                Ok(rows) if rows.is_empty() => Read::Done(reader),
                Ok(rows) => Read::Chunk(reader, rows),
                Err(e) => Read::Failed(e),
            }
        })
        .await;
        match read {
            Ok(Read::Chunk(reader, rows)) => {
                self.replay.reader = Some(reader);
                self.replay.chunk = rows;
                true
            }
            Ok(Read::Done(reader)) => {
                self.finish_file(reader).await;
                false
            }
            // Another process replayed and deleted it.
            Ok(Read::Gone) => false,
            Ok(Read::Failed(e)) => {
                // The file stays; a later scan starts it again, which is harmless.
                tracing::warn!(error = %e, "cannot read usage spool file; will retry");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, file = %path.display(), "usage spool read failed; will retry");
                false
            }
        }
    }

    /// Every row of the file has committed: delete it.
    async fn finish_file(&mut self, reader: SpoolReader) {
        if reader.skipped > 0 {
            self.shared.stats.dropped.fetch_add(reader.skipped, Relaxed);
            tracing::warn!(
                rows = reader.skipped,
                file = %reader.path().display(),
                "usage spool lines could not be read (torn by a crash or corrupt) and were skipped"
            );
        }
        let path = reader.path().to_owned();
        drop(reader);
        let spool = Arc::clone(&self.spool);
        let removed = tokio::task::spawn_blocking(move || spool.remove(&path)).await;
        match removed {
            Ok(Ok(())) => tracing::debug!("usage spool file replayed and removed"),
            // Left behind, it is replayed again later: duplicates, never double counts.
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot remove replayed usage spool file"),
            Err(e) => tracing::warn!(error = %e, "usage spool task failed"),
        }
    }
}

/// Reads a spool file back a chunk at a time.
#[derive(Debug)]
struct SpoolReader {
    path: PathBuf,
    reader: BufReader<File>,
    line: Vec<u8>,
    /// Lines that could not be read back: a torn last line or corruption.
    pub skipped: u64,
}

impl SpoolReader {
    pub fn open(path: &Path) -> Result<SpoolReader, SpoolError> {
        let file = File::open(path).map_err(|source| SpoolError::File {
            path: path.to_owned(),
            source,
        })?;
        Ok(SpoolReader {
            path: path.to_owned(),
            reader: BufReader::with_capacity(1 << 16, file),
            line: Vec::new(),
            skipped: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Up to `max` records; empty at the end of the file. Lines are bytes, not text,
    /// so a corrupt line is skipped instead of failing the whole file.
    pub fn next_chunk(&mut self, max: usize) -> Result<Vec<UsageRecord>, SpoolError> {
        let mut out = Vec::with_capacity(max.min(4096));
        while out.len() < max {
            self.line.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.line)
                .map_err(|source| SpoolError::File {
                    path: self.path.clone(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            if self.line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            // A line cut short by a crash mid-append is not valid JSON; one that lost
            // only its newline still holds the whole record.
            match serde_json::from_slice::<UsageRecord>(&self.line) {
                Ok(r) => out.push(r),
                Err(e) => {
                    self.skipped += 1;
                    // Once per file; `finish_file` reports the total.
                    if self.skipped == 1 {
                        tracing::warn!(file = %self.path.display(), error = %e, "skipping an unreadable usage spool line");
                    }
                }
            }
        }
        Ok(out)
    }
}
