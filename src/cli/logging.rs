//! Where log lines go: the subscriber every subcommand installs, and for `serve` a
//! buffered stderr writer with its flusher thread.
//!
//! Owns log formatting choices (text or JSON, colour only on a terminal, RUST_LOG over
//! the configured level) and when bytes reach stderr. It does not decide what is logged.
//!
//! Why buffered: with the access log on, one `write(2)` to stderr per request cost
//! about 5 µs of CPU per request (docs/performance.md). `serve` appends lines to a
//! shared buffer instead; a thread writes it out every [`FLUSH_EVERY`], and a caller
//! whose line fills the buffer past [`FLUSH_AT`] writes it out itself. Warnings and
//! errors are written at once, after whatever was buffered before them, so they are
//! never delayed and lines stay in order. The price: a crash (SIGKILL, abort) loses at
//! most [`FLUSH_EVERY`] of info and debug lines. [`LogGuard`] writes the rest out when
//! dropped, so a normal exit loses nothing.

use std::io::{self, IsTerminal, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Longest an info line waits in memory.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A buffer this full is written out by the caller that filled it.
const FLUSH_AT: usize = 64 * 1024;

/// Logs go to stderr; RUST_LOG overrides the level. Admin commands log at warn so
/// their stdout stays machine-readable. With `buffered`, the returned guard must live
/// until the process is done logging.
pub fn init(format: LogFormat, level: &str, buffered: bool) -> LogGuard {
    // RUST_LOG goes through the same regex-free parser as the config's level: a regex
    // field filter can compile an exponentially large DFA (found by fuzzing).
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| crate::config::log_filter(&v).ok())
        .or_else(|| crate::config::log_filter(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, never in files or log pipelines.
    let ansi = io::stderr().is_terminal();
    if !buffered {
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(io::stderr)
            .with_ansi(ansi);
        let _ = match format {
            LogFormat::Json => builder.json().try_init(),
            LogFormat::Text => builder.try_init(),
        };
        return LogGuard(None);
    }
    let shared = Arc::new(Shared::default());
    let writer = Buffered(Arc::clone(&shared));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    let installed = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if installed.is_err() {
        return LogGuard(None);
    }
    if !ansi {
        // Access lines skip tracing's formatter for the same bytes, written by hand
        // into the same buffer (a coloured terminal keeps tracing's, with its colours).
        let shared = Arc::clone(&shared);
        crate::proxy::access_log::install(crate::proxy::access_log::Sink {
            format,
            write: Box::new(move |line| shared.append(line)),
        });
    }
    let flusher = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("keygate-log".into())
            .spawn(move || shared.run_flusher())
    };
    match flusher {
        Ok(thread) => LogGuard(Some((shared, thread))),
        Err(e) => {
            // Without the thread, lines wait for the next warning or a full buffer.
            eprintln!("warning: no log flusher thread ({e}); info lines may be delayed");
            LogGuard(None)
        }
    }
}

/// Writes out buffered lines and stops the flusher when dropped.
#[must_use = "dropping the guard stops the log flusher"]
pub struct LogGuard(Option<(Arc<Shared>, JoinHandle<()>)>);

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some((shared, thread)) = self.0.take() {
            *lock(&shared.stop) = true;
            shared.wake.notify_one();
            let _ = thread.join();
            shared.flush(&[]);
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    buf: Mutex<Vec<u8>>,
    /// Held while writing to stderr, and taken before `buf`, so two writers cannot
    /// reorder the chunks they took.
    out: Mutex<()>,
    stop: Mutex<bool>,
    wake: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data valid; a panic elsewhere changes nothing.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn run_flusher(&self) {
        let mut stop = lock(&self.stop);
        while !*stop {
            stop = self
                .wake
                .wait_timeout(stop, FLUSH_EVERY)
                .map_or_else(|p| p.into_inner().0, |(g, _)| g);
            self.flush(&[]);
        }
    }

    /// Writes everything buffered, then `line`.
    fn flush(&self, line: &[u8]) {
        let _out = lock(&self.out);
        let taken = std::mem::take(&mut *lock(&self.buf));
        let mut err = io::stderr().lock();
        // stderr is where errors would be reported: nowhere is left to report to.
        let _ = err.write_all(&taken).and_then(|()| err.write_all(line));
        let _ = err.flush();
        let mut buf = lock(&self.buf);
        if buf.is_empty() && buf.capacity() < taken.capacity() {
            // Hand the allocation back, so steady logging does not reallocate.
            let mut taken = taken;
            taken.clear();
            *buf = taken;
        }
    }

    fn append(&self, line: &[u8]) {
        let full = {
            let mut buf = lock(&self.buf);
            buf.extend_from_slice(line);
            buf.len() >= FLUSH_AT
        };
        if full {
            self.flush(&[]);
        }
    }
}

#[derive(Debug, Clone)]
struct Buffered(Arc<Shared>);

/// One event's output: tracing's formatter writes a whole line per event.
pub struct LineWriter<'a> {
    shared: &'a Shared,
    urgent: bool,
}

impl<'a> MakeWriter<'a> for Buffered {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: &self.0,
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        LineWriter {
            shared: &self.0,
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        if self.urgent {
            self.shared.flush(line);
        } else {
            self.shared.append(line);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_wait_until_flushed_and_keep_their_order() {
        let shared = Shared::default();
        shared.append(b"one\n");
        shared.append(b"two\n");
        assert_eq!(lock(&shared.buf).as_slice(), b"one\ntwo\n");
        // An urgent line takes the buffered ones with it (to stderr here).
        shared.flush(b"");
        assert!(lock(&shared.buf).is_empty());
        let big = vec![b'x'; FLUSH_AT];
        shared.append(&big);
        assert!(lock(&shared.buf).is_empty(), "a full buffer is written by its filler");
    }
}
