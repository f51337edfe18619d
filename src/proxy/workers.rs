//! The data plane's threads: with `server.runtime = "per-core"`, one single-threaded
//! tokio runtime per worker thread, each accepting and serving its own client
//! connections and owning the upstream connections it opened, like nginx's worker
//! processes.
//!
//! Why: on the shared multi-threaded runtime, a request's task, its client connection's
//! task and the pooled upstream connection's task can each land on a different worker,
//! and every hand-off between them that crosses threads is a futex wake-up (about 0.7
//! context switches per request against nginx's 0.06, docs/performance.md). Here all
//! three live on one thread.
//!
//! Owns the threads and their runtimes. It does not accept connections (`listener`),
//! decide which worker takes one (`balance`), or know what a request is.

use std::cell::Cell;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// The index of the worker this thread runs, or 0 off the workers (the shared
    /// runtime): it picks the worker's own upstream client.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The worker running the calling thread (0 on the shared runtime).
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `n` worker threads, each blocked on its runtime until [`Workers::stop`].
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let n = n.max(1);
        let stop = CancellationToken::new();
        let (mut handles, mut threads) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(rt.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("keygate-worker-{i}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(i));
                    // The runtime keeps running its tasks until told to stop: database
                    // connections opened by requests on this thread live here, and the
                    // final usage flush after the drain may still need them.
                    rt.block_on(stop.cancelled());
                })?;
            threads.push(thread);
        }
        Ok(Workers { handles, stop, threads })
    }

    /// How many workers run (at least one).
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Each worker's runtime, in worker order.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Ends every worker's runtime (their remaining tasks are dropped) and joins them.
    pub fn stop(self) {
        self.stop.cancel();
        for t in self.threads {
            let _ = t.join();
        }
    }
}
