//! Snapshots without copies.
//!
//! The state machine already lives in RocksDB, so a snapshot needs no second copy of the state
//! on disk (which would also keep wiped ciphertext around). Building a snapshot pins a RocksDB
//! point-in-time snapshot of the group and makes the state durable up to it; the pinned view is
//! held by a small thread and read in chunks only when a follower needs it.
//!
//! ```text
//!   build ─▶ sync WAL ─▶ Holder thread { db.snapshot() } ◀── chunk requests (install, send)
//!                             dropped when a newer snapshot replaces it
//! ```
//!
//! After a restart there is no pinned view; the first request for the current snapshot pins the
//! state as recovered, which is at or after every snapshot built before the restart.
//!
//! A RocksDB snapshot is database-wide: while pinned, it keeps every value deleted after it in
//! the files, including the ciphertext of kubbis of *other* groups that ended since, and raft log
//! entries purged since. So a pin nobody is reading from is released after
//! [`RELEASE_UNUSED_PIN_AFTER`], the same way a restart releases it, and the next request pins
//! the state of that moment.

use std::fmt;
use std::sync::Arc;
use std::sync::mpsc;

use rocksdb::{DB, Direction, IteratorMode, ReadOptions};
use serde::{Deserialize, Serialize};

use crate::ids::GroupId;
use crate::state::Table;
use crate::storage::{CF_BLOB, CF_STATE, group_key};

/// One key-value pair of a snapshot, with the group prefix removed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotItem {
    pub blob: bool,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

impl SnapshotItem {
    pub fn table(&self) -> Table {
        if self.blob { Table::Blob } else { Table::State }
    }
}

/// A page of a snapshot and where the next one starts.
#[derive(Clone, Serialize, Deserialize)]
pub struct Chunk {
    pub items: Vec<SnapshotItem>,
    /// `None` when this is the last chunk.
    pub next: Option<Cursor>,
}

/// Position inside a snapshot: the table and the last key returned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub blob: bool,
    #[serde(with = "serde_bytes")]
    pub after: Vec<u8>,
}

type Reply = tokio::sync::oneshot::Sender<Result<Chunk, String>>;

struct ChunkRequest {
    from: Option<Cursor>,
    max_bytes: usize,
    reply: Reply,
}

/// A pinned point-in-time view of one group, served by its own thread.
///
/// The thread holds a reference to the database; dropping the holder ends the thread and waits
/// for it, so the last reference is never released on a detached thread. (It was: a node or test
/// process exiting while that thread closed the database aborted in RocksDB, whose statics were
/// already torn down: "pthread lock: Invalid argument".)
struct Holder {
    tx: mpsc::Sender<ChunkRequest>,
    thread: Option<std::thread::JoinHandle<()>>,
    pinned_at: std::time::Instant,
}

impl Drop for Holder {
    fn drop(&mut self) {
        // Dropping the only sender closes the channel, which ends the thread's loop.
        drop(std::mem::replace(&mut self.tx, mpsc::channel().0));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_chunk(
    snap: &rocksdb::SnapshotWithThreadMode<'_, DB>,
    db: &DB,
    group: GroupId,
    from: Option<Cursor>,
    max_bytes: usize,
) -> Result<Chunk, String> {
    let mut items = Vec::new();
    let mut bytes = 0usize;
    let (mut blob, mut after) = match from {
        None => (false, None),
        Some(c) => (c.blob, Some(c.after)),
    };
    loop {
        let cf_name = if blob { CF_BLOB } else { CF_STATE };
        let cf = db
            .cf_handle(cf_name)
            .ok_or_else(|| format!("missing column family {cf_name}"))?;
        let start = match &after {
            Some(k) => {
                let mut s = group_key(group, k);
                s.push(0);
                s
            }
            None => group_key(group, &[]),
        };
        let end = group_key(group, &[0xff; 64]);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(end);
        let iter = snap.iterator_cf_opt(cf, ro, IteratorMode::From(&start, Direction::Forward));
        for item in iter {
            let (k, v) = item.map_err(|e| e.to_string())?;
            if k[..2] != group.to_be_bytes() {
                break;
            }
            bytes += k.len() + v.len();
            let key = k[2..].to_vec();
            items.push(SnapshotItem {
                blob,
                key: key.clone(),
                value: v.into_vec(),
            });
            if bytes >= max_bytes {
                return Ok(Chunk {
                    items,
                    next: Some(Cursor { blob, after: key }),
                });
            }
        }
        if blob {
            return Ok(Chunk { items, next: None });
        }
        blob = true;
        after = None;
    }
}

impl Holder {
    fn start(db: Arc<DB>, group: GroupId) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<ChunkRequest>();
        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("kubbi-snap-{group}"))
            .spawn(move || {
                let snap = db.snapshot();
                let _ = ready_tx.send(());
                while let Ok(req) = rx.recv() {
                    let r = read_chunk(&snap, &db, group, req.from, req.max_bytes);
                    let _ = req.reply.send(r);
                }
            })?;
        // Wait until the view is pinned, so it reflects the state at this call.
        ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("snapshot thread died"))?;
        Ok(Self {
            tx,
            thread: Some(thread),
            pinned_at: std::time::Instant::now(),
        })
    }
}

/// The data of a snapshot: a pinned local view, or chunks received from a leader.
#[derive(Clone)]
pub struct SnapshotData {
    source: Source,
}

#[derive(Clone)]
enum Source {
    Pinned(Arc<Holder>),
    Received(Arc<Vec<Chunk>>),
}

impl fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::Pinned(_) => f.write_str("SnapshotData(pinned)"),
            Source::Received(c) => write!(f, "SnapshotData({} chunks received)", c.len()),
        }
    }
}

/// How long an unread pinned view is kept before it is released.
pub const RELEASE_UNUSED_PIN_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// Chunk size when reading a snapshot.
pub const CHUNK_BYTES: usize = 4 << 20;

impl SnapshotData {
    /// Pins the current state of `group`.
    ///
    /// # Errors
    /// When the holder thread cannot start.
    pub fn pin(db: Arc<DB>, group: GroupId) -> std::io::Result<Self> {
        Ok(Self {
            source: Source::Pinned(Arc::new(Holder::start(db, group)?)),
        })
    }

    /// Whether this is a pinned view that only the caller holds (no transfer is reading it) and
    /// that is older than `min_age`: dropping it releases the pin.
    pub fn is_idle_pin(&self, min_age: std::time::Duration) -> bool {
        match &self.source {
            Source::Pinned(h) => Arc::strong_count(h) == 1 && h.pinned_at.elapsed() >= min_age,
            Source::Received(_) => false,
        }
    }

    /// Snapshot data assembled from received chunks.
    pub fn from_chunks(chunks: Vec<Chunk>) -> Self {
        Self {
            source: Source::Received(Arc::new(chunks)),
        }
    }

    /// Reads one chunk starting after `from` (`None`: the beginning).
    ///
    /// # Errors
    /// On a read failure of the pinned view.
    pub async fn chunk(&self, from: Option<Cursor>) -> std::io::Result<Chunk> {
        match &self.source {
            Source::Pinned(h) => {
                let (reply, rx) = tokio::sync::oneshot::channel();
                h.tx.send(ChunkRequest {
                    from,
                    max_bytes: CHUNK_BYTES,
                    reply,
                })
                .map_err(|_| std::io::Error::other("snapshot holder stopped"))?;
                rx.await
                    .map_err(|_| std::io::Error::other("snapshot holder stopped"))?
                    .map_err(std::io::Error::other)
            }
            Source::Received(chunks) => {
                // Received chunks are replayed in order; the cursor is the chunk index.
                let idx = match from {
                    None => 0,
                    Some(c) => {
                        let b: [u8; 8] = c
                            .after
                            .as_slice()
                            .try_into()
                            .map_err(|_| std::io::Error::other("bad cursor"))?;
                        u64::from_be_bytes(b) as usize
                    }
                };
                let Some(chunk) = chunks.get(idx) else {
                    return Ok(Chunk {
                        items: Vec::new(),
                        next: None,
                    });
                };
                let next = (idx + 1 < chunks.len()).then(|| Cursor {
                    blob: false,
                    after: ((idx + 1) as u64).to_be_bytes().to_vec(),
                });
                Ok(Chunk {
                    items: chunk.items.clone(),
                    next,
                })
            }
        }
    }

    /// Reads every chunk in order.
    ///
    /// # Errors
    /// On a read failure.
    pub async fn all_chunks(&self) -> std::io::Result<Vec<Chunk>> {
        let mut out = Vec::new();
        let mut from = None;
        loop {
            let c = self.chunk(from).await?;
            from = c.next.clone();
            out.push(c);
            if from.is_none() {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_pin_is_idle_only_when_nobody_else_reads_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = crate::storage::Storage::open(dir.path()).expect("open");
        let data = SnapshotData::pin(storage.db_arc(), 3).expect("pin");
        assert!(data.is_idle_pin(Duration::ZERO));
        assert!(
            !data.is_idle_pin(Duration::from_secs(3600)),
            "younger than the minimum age"
        );
        let transfer = data.clone();
        assert!(!data.is_idle_pin(Duration::ZERO), "a transfer holds it");
        drop(transfer);
        assert!(data.is_idle_pin(Duration::ZERO));
        let received = SnapshotData::from_chunks(Vec::new());
        assert!(
            !received.is_idle_pin(Duration::ZERO),
            "received data pins nothing"
        );
    }
}
