//! How far one group's raft log is durable, shared by its log store (which advances it when an
//! append's fsync completes) and its state machine (which applies nothing beyond it).
//!
//! openraft applies an entry once it is accepted into the local log and committed by the
//! cluster, not once the local append is fsynced. The raft log lives outside RocksDB, so a state
//! write could otherwise become durable (a memtable flush, a WAL sync) ahead of the entry it was
//! applied from, and a power cut would leave state its log does not hold. An apply that reaches
//! past [`LogDurable::next`] waits here for the fsync already under way to cover it, instead of
//! asking for another one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use super::Syncer;

/// A wait this long without the durable index moving falls back to an fsync of its own, so no
/// path that appends without a durability callback can stall an apply for good.
const STALL_FALLBACK: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct LogDurable {
    /// One past the newest index known durable.
    next: AtomicU64,
    /// How many append fsyncs failed; a waiter that sees it move stops waiting for the index.
    failures: AtomicU64,
    changed: Notify,
}

impl LogDurable {
    /// Everything up to `next - 1` is durable (entries found at open, after the open's fsync).
    pub fn new(next: u64) -> Self {
        Self {
            next: AtomicU64::new(next),
            ..Self::default()
        }
    }

    /// One past the newest index known durable.
    pub fn next(&self) -> u64 {
        self.next.load(Ordering::Acquire)
    }

    /// The fsync of every entry before `upto` completed.
    pub fn advance(&self, upto: u64) {
        self.next.fetch_max(upto, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// An append's fsync failed: its entries are not known durable.
    pub fn failed(&self) {
        self.failures.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// Entries from `from` on were truncated: those appended there next are durable only when
    /// their own fsync completes.
    pub fn truncated(&self, from: u64) {
        self.next.fetch_min(from, Ordering::Release);
    }

    /// Waits until `index` is durable. Follows the appends' fsyncs; when one fails (or the
    /// index stalls for [`STALL_FALLBACK`]) it asks `syncer` for an fsync of its own, which covers
    /// everything written before and reports a failing disk as an error.
    ///
    /// # Errors
    /// When that fsync fails.
    pub async fn wait(&self, index: u64, syncer: &Syncer) -> std::io::Result<()> {
        // The common case (a follower's entries, fsynced before they were acknowledged) takes
        // no lock of the notifier.
        if self.next() > index {
            return Ok(());
        }
        let failures = self.failures.load(Ordering::Acquire);
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the checks, so an advance between them still wakes this wait.
            changed.as_mut().enable();
            if self.next() > index {
                return Ok(());
            }
            if self.failures.load(Ordering::Acquire) != failures {
                return syncer.sync().await;
            }
            if tokio::time::timeout(STALL_FALLBACK, changed).await.is_err() {
                return syncer.sync().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wait_ends_when_an_fsync_covers_the_index_and_not_before() {
        let d = std::sync::Arc::new(LogDurable::new(5));
        let syncer = Syncer::start("test-sync", |_| Ok(())).expect("syncer");
        d.wait(4, &syncer).await.expect("durable");
        assert_eq!(
            syncer.fsync_count(),
            0,
            "durable already: no fsync asked for"
        );

        let d2 = d.clone();
        let waiter = tokio::spawn(async move {
            let syncer = Syncer::start("test-sync-2", |_| Ok(())).expect("syncer");
            d2.wait(7, &syncer).await.map(|()| syncer.fsync_count())
        });
        d.advance(7);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "7 is not durable while next is 7");
        d.advance(8);
        assert_eq!(
            waiter.await.expect("join").expect("durable"),
            0,
            "the appends' fsync served it"
        );

        d.truncated(6);
        assert_eq!(d.next(), 6);
    }

    #[tokio::test]
    async fn a_failed_append_fsync_makes_the_wait_sync_for_itself() {
        let d = std::sync::Arc::new(LogDurable::new(0));
        let syncer = std::sync::Arc::new(Syncer::start("test-sync", |_| Ok(())).expect("syncer"));
        let (d2, s2) = (d.clone(), syncer.clone());
        let waiter = tokio::spawn(async move { d2.wait(3, &s2).await });
        tokio::task::yield_now().await;
        d.failed();
        waiter.await.expect("join").expect("durable");
        assert_eq!(syncer.fsync_count(), 1, "the fallback fsync ran");
    }
}
