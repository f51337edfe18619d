//! The spool: usage rows on local disk while PostgreSQL cannot take them.
//!
//! Owns the files in `usage.spool_dir` and their format: one JSON [`UsageRecord`] per
//! line, appended and `fsync`ed a batch at a time. It does not decide when to spool or
//! replay (the writer does) and never talks to the database. Every call does blocking
//! file I/O: async callers run it on `spawn_blocking`.
//!
//! A process appends only to its own file, `usage-<uuid v7>-<pid>.open`, so several
//! processes may share a directory. A file is sealed (renamed to `.jsonl`) by its owner
//! within [`SEAL_AFTER`] of its creation, past [`MAX_FILE_BYTES`], before the owner
//! replays it and at shutdown. Sealed files are replayable by any process. Another
//! process's `.open` file (its owner was killed, or is alive) is claimed by renaming
//! it to `.jsonl` before it is read: at start-up always, later once it is older than
//! [`ORPHAN_AFTER`]. The owner checks, after each synced append, that its file still
//! has its name; if it was claimed meanwhile the rows are appended again to a new
//! file, since the claimant may have read it before they arrived. A row twice in the
//! spool is harmless (ids make replays idempotent); a row in neither place would not
//! be. A crash mid-append leaves a torn last line, which replay skips; rows before it
//! are intact because each append was synced.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use super::UsageRecord;

/// A live writer stops appending to a file this long after creating it.
pub const SEAL_AFTER: Duration = Duration::from_secs(10);
/// An unsealed file this old belongs to a process that died.
pub const ORPHAN_AFTER: Duration = Duration::from_secs(120);
/// Files are kept small enough to be replayed and deleted a piece at a time.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

const PREFIX: &str = "usage-";
const OPEN: &str = ".open";
const SEALED: &str = ".jsonl";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool directory {}: {source}", dir.display())]
    Dir { dir: PathBuf, source: io::Error },
    #[error("spool file {}: {source}", path.display())]
    File { path: PathBuf, source: io::Error },
    #[error("spool is full: {used} of usage.max_spool_bytes = {max} bytes in use")]
    Full { used: u64, max: u64 },
    #[error("cannot encode a usage record: {0}")]
    Encode(#[from] serde_json::Error),
}

/// This process's side of one spool directory. Shared by the writer and the overflow
/// task; the mutex serialises their appends and is only ever held on a blocking thread.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    open: Option<OpenFile>,
    /// Bytes in every spool file of the directory as of the last scan, plus appends.
    used: u64,
}

#[derive(Debug)]
struct OpenFile {
    path: PathBuf,
    file: File,
    created: SystemTime,
    bytes: u64,
}

impl Spool {
    /// No I/O: the directory is created, or found unusable, on first use.
    pub fn new(dir: &Path, max_bytes: u64) -> Spool {
        Spool {
            dir: dir.to_owned(),
            max_bytes,
            state: Mutex::new(State::default()),
        }
    }

    /// Creates the directory if missing, so a spool that cannot work is reported at
    /// start-up rather than at the first outage.
    pub fn prepare(&self) -> Result<(), SpoolError> {
        fs::create_dir_all(&self.dir).map_err(|source| SpoolError::Dir {
            dir: self.dir.clone(),
            source,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state worse than a crash
        // would, and a crash is what the file format is built to survive.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `rows` and syncs them to disk; on `Ok` they survive a crash.
    pub fn append(&self, rows: &[UsageRecord]) -> Result<(), SpoolError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(rows.len() * 320);
        for r in rows {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        let len = buf.len() as u64;
        let mut st = self.lock();
        if st.used.saturating_add(len) > self.max_bytes {
            return Err(SpoolError::Full {
                used: st.used,
                max: self.max_bytes,
            });
        }
        let stale = st
            .open
            .as_ref()
            .is_some_and(|f| f.bytes >= MAX_FILE_BYTES || f.created.elapsed().map_or(true, |age| age >= SEAL_AFTER));
        if stale {
            // A file that cannot be sealed stays `.open` and is replayed as an orphan
            // later; these rows go to a new file either way.
            if let Err(e) = self.seal_locked(&mut st) {
                tracing::warn!(error = %e, "cannot seal usage spool file");
            }
        }
        for _ in 0..3 {
            let open = match st.open.take() {
                Some(open) => open,
                None => self.create()?,
            };
            let open = st.open.insert(open);
            if let Err(source) = open.file.write_all(&buf).and_then(|()| open.file.sync_data()) {
                // Part of `buf` may be on disk without its newline; a later append
                // would glue a good row onto that torn one. Seal it, start afresh.
                let path = open.path.clone();
                let _ = self.seal_locked(&mut st);
                return Err(SpoolError::File { path, source });
            }
            open.bytes += len;
            let claimed = matches!(fs::symlink_metadata(&open.path), Err(e) if e.kind() == io::ErrorKind::NotFound);
            st.used += len;
            if !claimed {
                return Ok(());
            }
            // Another process took the file: it now owns what it holds.
            st.open = None;
        }
        Err(SpoolError::File {
            path: self.dir.clone(),
            source: io::Error::other("spool files keep being claimed by another process"),
        })
    }

    fn create(&self) -> Result<OpenFile, SpoolError> {
        let dir_err = |source| SpoolError::Dir {
            dir: self.dir.clone(),
            source,
        };
        fs::create_dir_all(&self.dir).map_err(dir_err)?;
        let created = SystemTime::now();
        let name = format!("{PREFIX}{}-{}{OPEN}", Uuid::now_v7().simple(), std::process::id());
        let path = self.dir.join(name);
        let mut options = OpenOptions::new();
        options.create_new(true).append(true);
        // Rows name clients (addresses, user agents): readable by keygate alone.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&path).map_err(|source| SpoolError::File {
            path: path.clone(),
            source,
        })?;
        // The new directory entry must be durable too, or the synced rows could be
        // unreachable after a power loss.
        sync_dir(&self.dir).map_err(dir_err)?;
        Ok(OpenFile {
            path,
            file,
            created,
            bytes: 0,
        })
    }

    /// Closes this process's open file, if any, and makes it replayable.
    pub fn seal(&self) -> Result<(), SpoolError> {
        let mut st = self.lock();
        self.seal_locked(&mut st)
    }

    fn seal_locked(&self, st: &mut State) -> Result<(), SpoolError> {
        let Some(open) = st.open.take() else {
            return Ok(());
        };
        drop(open.file);
        if open.bytes == 0 {
            // Nothing reached it; an empty file would only be replayed and deleted.
            let _ = fs::remove_file(&open.path);
            return Ok(());
        }
        let sealed = open.path.with_extension(&SEALED[1..]);
        let err = |source| SpoolError::File {
            path: open.path.clone(),
            source,
        };
        match fs::rename(&open.path, &sealed) {
            Ok(()) => sync_dir(&self.dir).map_err(err),
            // Claimed by another process, which renamed it itself.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err(e)),
        }
    }

    /// Replayable files, oldest first, after claiming other processes' `.open` files
    /// (all of them with `claim_young`, as at start-up; else only orphans); also
    /// recounts the bytes in use. A missing directory is an empty spool.
    pub fn replayable(&self, claim_young: bool) -> Result<Vec<PathBuf>, SpoolError> {
        let mut st = self.lock();
        let entries = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(SpoolError::Dir {
                    dir: self.dir.clone(),
                    source,
                })
            }
        };
        let own = st.open.as_ref().map(|f| f.path.clone());
        let mut used = 0;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !name.starts_with(PREFIX) {
                continue;
            }
            used += entry.metadata().map_or(0, |m| m.len());
            if name.ends_with(SEALED) {
                found.push((name.to_string(), path));
            } else if name.ends_with(OPEN) && Some(&path) != own.as_ref() {
                let orphan = created_at(name).is_none_or(|t| older_than(t, ORPHAN_AFTER));
                if claim_young || orphan {
                    let sealed = path.with_extension(&SEALED[1..]);
                    match fs::rename(&path, &sealed) {
                        Ok(()) => found.push((name.replace(OPEN, SEALED), sealed)),
                        // Claimed or sealed by someone else meanwhile; a later scan
                        // finds it under its new name.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => tracing::warn!(file = %path.display(), error = %e, "cannot claim usage spool file"),
                    }
                }
            }
        }
        st.used = used;
        // uuid v7 names sort by creation time.
        found.sort();
        Ok(found.into_iter().map(|(_, p)| p).collect())
    }

    /// Deletes a replayed file. Another process may have replayed and deleted it too.
    pub fn remove(&self, path: &Path) -> Result<(), SpoolError> {
        let len = fs::metadata(path).map_or(0, |m| m.len());
        match fs::remove_file(path) {
            Ok(()) => {
                let mut st = self.lock();
                st.used = st.used.saturating_sub(len);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SpoolError::File {
                path: path.to_owned(),
                source,
            }),
        }
    }
}

/// The creation time a spool file's uuid v7 carries.
fn created_at(name: &str) -> Option<SystemTime> {
    let id = name.strip_prefix(PREFIX)?.get(..32)?;
    let (secs, nanos) = Uuid::parse_str(id).ok()?.get_timestamp()?.to_unix();
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

fn older_than(t: SystemTime, age: Duration) -> bool {
    SystemTime::now().duration_since(t).is_ok_and(|d| d >= age)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
