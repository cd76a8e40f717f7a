//! Group commit: one thread fsyncs a log (RocksDB's WAL, or the raft log's active segment) for
//! every waiter that wrote before it began.
//!
//! ```text
//!   append (group 3) ─write─┐                       ┌─▶ callback(group 3 entries durable)
//!   append (group 9) ─write─┼─▶ queue ─▶ flush_wal(sync) ─▶ callback(group 9 entries durable)
//!   save_vote        ─write─┘                       └─▶ callback(vote durable)
//! ```
//!
//! A waiter enqueues only after its write returned, so the fsync that takes it covers it.
//! While one fsync runs, new waiters accumulate and share the next one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

type Callback = Box<dyn FnOnce(Result<(), String>) + Send>;

/// Set to `1`, a node never fsyncs its WAL yet acknowledges as if it had. **Loses acknowledged
/// writes on a power cut**: it exists only so the durability tests can prove they catch that.
pub const UNSAFE_SKIP_FSYNC_ENV: &str = "KUBBI_UNSAFE_SKIP_FSYNC";

const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

struct Queue {
    pending: Mutex<Vec<Callback>>,
    wake: Condvar,
    stop: AtomicBool,
    /// Number of fsyncs done (for metrics and tests).
    fsyncs: AtomicU64,
    /// Fails every fsync from now on (fault injection in tests: a disk that stopped syncing).
    fail: AtomicBool,
    /// Writes the WAL to the OS but never fsyncs it ([`UNSAFE_SKIP_FSYNC_ENV`]): a planted bug,
    /// so the power-cut tests can show they catch a node that acknowledges unsynced writes.
    skip: bool,
    /// Duration of each fsync.
    latency: crate::metrics::Histogram,
    /// Waiters served per fsync (group commit width).
    batch: crate::metrics::Histogram,
}

/// Handle to the syncer thread. Dropping it stops the thread after the queue drains and waits
/// for it, so the database is closed when its owner is dropped.
pub struct Syncer {
    q: Arc<Queue>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Syncer {
    /// Starts the thread `name`, which calls `sync(true)` to make everything written so far
    /// durable (`sync(false)` under [`UNSAFE_SKIP_FSYNC_ENV`]: written to the OS, not synced).
    pub(super) fn start(
        name: &str,
        sync: impl Fn(bool) -> std::io::Result<()> + Send + 'static,
    ) -> std::io::Result<Self> {
        let q = Arc::new(Queue {
            pending: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            fsyncs: AtomicU64::new(0),
            fail: AtomicBool::new(false),
            skip: std::env::var(UNSAFE_SKIP_FSYNC_ENV).is_ok_and(|v| v == "1"),
            latency: crate::metrics::Histogram::default(),
            batch: crate::metrics::Histogram::new(BATCH_BUCKETS),
        });
        if q.skip {
            tracing::error!(
                "{UNSAFE_SKIP_FSYNC_ENV}=1: the WAL is never fsync'd; acknowledged writes are \
                 lost on a power cut (a planted bug for durability tests, never for use)"
            );
        }
        let q2 = q.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(&sync, &q2))?;
        Ok(Self {
            q,
            thread: Some(thread),
        })
    }

    /// Calls `done` once everything written before this call is durable (or the fsync failed).
    pub fn after_sync(&self, done: impl FnOnce(Result<(), String>) + Send + 'static) {
        let mut pending = self
            .q
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        pending.push(Box::new(done));
        drop(pending);
        self.q.wake.notify_one();
    }

    /// Waits until everything written before this call is durable.
    ///
    /// # Errors
    /// When the fsync failed.
    pub async fn sync(&self) -> std::io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.after_sync(move |r| {
            let _ = tx.send(r);
        });
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(std::io::Error::other(e)),
            Err(_) => Err(std::io::Error::other("WAL sync thread stopped")),
        }
    }

    /// How many fsyncs have run.
    pub fn fsync_count(&self) -> u64 {
        self.q.fsyncs.load(Ordering::Relaxed)
    }

    /// Appends the fsync metrics.
    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP kubbi_storage_fsync_duration_seconds Duration of each raft log fsync.\n# TYPE kubbi_storage_fsync_duration_seconds histogram\n");
        self.q
            .latency
            .render("kubbi_storage_fsync_duration_seconds", "", out);
        out.push_str("# HELP kubbi_storage_fsync_waiters Writes made durable by one fsync (group commit).\n# TYPE kubbi_storage_fsync_waiters histogram\n");
        self.q.batch.render("kubbi_storage_fsync_waiters", "", out);
    }

    /// Makes every later fsync fail (tests of the failure path).
    pub fn inject_failure(&self, fail: bool) {
        self.q.fail.store(fail, Ordering::SeqCst);
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.q.stop.store(true, Ordering::SeqCst);
        self.q.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(sync: &dyn Fn(bool) -> std::io::Result<()>, q: &Queue) {
    loop {
        let batch = {
            let mut pending = q.pending.lock().unwrap_or_else(|p| p.into_inner());
            while pending.is_empty() && !q.stop.load(Ordering::SeqCst) {
                pending = q.wake.wait(pending).unwrap_or_else(|p| p.into_inner());
            }
            if pending.is_empty() {
                return;
            }
            std::mem::take(&mut *pending)
        };
        let started = std::time::Instant::now();
        let result = if q.fail.load(Ordering::SeqCst) {
            Err("injected fsync failure".to_string())
        } else {
            // Everything written to the log before this call reaches stable storage here.
            sync(!q.skip).map_err(|e| e.to_string())
        };
        q.fsyncs.fetch_add(1, Ordering::Relaxed);
        q.latency.observe(started.elapsed().as_secs_f64());
        q.batch.observe(batch.len() as f64);
        if let Err(e) = &result {
            tracing::error!(error = %e, waiters = batch.len(), "WAL fsync failed");
        }
        for done in batch {
            done(result.clone());
        }
    }
}
