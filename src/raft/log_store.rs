//! The raft log of one group: its entries in the node's segment log (`storage::segments`), its
//! vote and purge point in RocksDB's `raft_meta` family.
//!
//! Durability contract (openraft's, and DESIGN.md invariant 5): vote, truncate and purge are on
//! disk before they return; appended entries are readable when `append` returns and durable when
//! its callback fires. The callback fires from the raft log's group-commit syncer, so concurrent
//! appends of all groups share fsyncs.
//!
//! The state machine's writes are not synced (`raft::state_machine`): after a power cut the
//! state may be older than the log, and openraft applies the difference again. So a purge first
//! syncs RocksDB (its purge point is written there, after every apply so far) and only then
//! forgets the entries: the log always reaches back to the durable state.
//!
//! The newest entries are also kept in memory ([`TailCache`]): the leader reads each entry back
//! once per follower to replicate it and once more to apply it, and a follower once to apply
//! it, all within moments of the append. Serving those reads from memory spares a RocksDB
//! iterator and a decode each time; anything older is read from RocksDB.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader};
use rocksdb::WriteBatch;

use super::{Entry, LogId, TypeConfig, Vote, io_err};
use crate::codec::{decode, encode};
use crate::ids::GroupId;
use crate::storage::{CF_RAFT_META, Storage, group_key};

const META_VOTE: &[u8] = b"vote";
const META_PURGED: &[u8] = b"purged";
const META_COMMITTED: &[u8] = b"committed";

/// How many bytes (encoded) of the newest entries each group keeps in memory.
const TAIL_CACHE_BYTES: usize = 2 << 20;

/// The newest entries of one group's log, contiguous by index, in memory. It only ever holds
/// entries already written to RocksDB, and follows every append, truncation and purge.
#[derive(Default)]
struct TailCache {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl TailCache {
    fn first(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.index())
    }

    fn next(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.index() + 1)
    }

    fn push(&mut self, entry: Entry, size: usize) {
        let index = entry.index();
        match self.next() {
            Some(next) if index < next => self.truncate_from(index),
            Some(next) if index > next => self.clear(),
            _ => {}
        }
        self.entries.push_back((entry, size));
        self.bytes += size;
        while self.bytes > TAIL_CACHE_BYTES && self.pop_oldest() {}
    }

    /// Drops the oldest entry; `false` when there is none.
    fn pop_oldest(&mut self) -> bool {
        let popped = self.entries.pop_front();
        if let Some((_, n)) = &popped {
            self.bytes -= n;
        }
        popped.is_some()
    }

    /// Drops entries at `index` and after.
    fn truncate_from(&mut self, index: u64) {
        while let Some((e, n)) = self.entries.back()
            && e.index() >= index
        {
            self.bytes -= n;
            self.entries.pop_back();
        }
    }

    /// Drops entries up to and including `index`.
    fn purge_to(&mut self, index: u64) {
        while self.first().is_some_and(|first| first <= index) {
            self.pop_oldest();
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Entries `start..end` (`end` `None`: to the last), if all of them are here.
    fn get(&self, start: u64, end: Option<u64>) -> Option<Vec<Entry>> {
        let (first, next) = (self.first()?, self.next()?);
        let end = end.unwrap_or(next);
        if start < first || end > next {
            return None;
        }
        let from = usize::try_from(start - first).ok()?;
        let to = usize::try_from(end - first).ok()?;
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

/// The log store of one group.
#[derive(Clone)]
pub struct LogStore {
    storage: Arc<Storage>,
    group: GroupId,
    tail: Arc<Mutex<TailCache>>,
    /// Encoded bytes appended since this store was opened (see [`LogStore::appended_bytes`]).
    appended: Arc<AtomicU64>,
    /// The committed log id openraft last saved, in memory only (see `save_committed`).
    committed: Arc<Mutex<Option<LogId>>>,
    /// How far this log is durable (`Storage::log_durable`).
    durable: Arc<crate::storage::LogDurable>,
}

impl LogStore {
    pub fn new(storage: Arc<Storage>, group: GroupId) -> Self {
        Self {
            group,
            tail: Arc::default(),
            appended: Arc::default(),
            committed: Arc::default(),
            durable: storage.log_durable(group),
            storage,
        }
    }

    /// A counter of the encoded bytes appended to this log since it was opened. openraft
    /// snapshots (and so purges) by entry count; with large payloads that count stands for
    /// gigabytes, so the node also compacts a log by the bytes it took in (`node`).
    pub fn appended_bytes(&self) -> Arc<AtomicU64> {
        self.appended.clone()
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, TailCache> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        name: &'static [u8],
    ) -> io::Result<Option<T>> {
        let cf = self.storage.cf(CF_RAFT_META);
        match self
            .storage
            .db()
            .get_cf(cf, group_key(self.group, name))
            .map_err(io_err)?
        {
            None => Ok(None),
            Some(b) => decode("raft meta", &b)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }

    fn decode_entry(bytes: &[u8]) -> io::Result<Entry> {
        decode("raft log entry", bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Puts into `batch` the log meta of a seeded group (`raft::seed`): purged and committed up to
/// `at`, no vote, in the encodings [`LogStore`] reads back.
pub(crate) fn put_seeded_meta(
    batch: &mut WriteBatch,
    storage: &Storage,
    group: GroupId,
    at: LogId,
) {
    let cf = storage.cf(CF_RAFT_META);
    batch.put_cf(cf, group_key(group, META_PURGED), encode(&at));
    batch.put_cf(cf, group_key(group, META_COMMITTED), encode(&Some(at)));
}

/// Whether `group` has a vote or any log entry on this node: raft state of its own, which
/// nothing but openraft may write over.
pub(crate) fn has_raft_state(storage: &Storage, group: GroupId) -> io::Result<bool> {
    let db = storage.db();
    if db
        .get_cf(storage.cf(CF_RAFT_META), group_key(group, META_VOTE))
        .map_err(io_err)?
        .is_some()
    {
        return Ok(true);
    }
    Ok(storage.raft_log().bounds(group).is_some())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => Some(x.saturating_add(1)),
            Bound::Excluded(x) => Some(*x),
            Bound::Unbounded => None,
        };
        if end.is_some_and(|e| e <= start) {
            return Ok(Vec::new());
        }
        if let Some(hit) = self.tail().get(start, end) {
            return Ok(hit);
        }
        let log = self.storage.raft_log();
        let end = match end {
            Some(e) => e,
            None => match log.bounds(self.group) {
                Some((_, last)) => last + 1,
                None => return Ok(Vec::new()),
            },
        };
        let mut out = Vec::new();
        for (index, bytes) in log.read(self.group, start, end)? {
            let entry = Self::decode_entry(&bytes)?;
            if entry.index() != index {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("raft log index {index} holds entry {}", entry.index()),
                ));
            }
            out.push(entry);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.get_meta(META_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged: Option<LogId> = self.get_meta(META_PURGED)?;
        let log = self.storage.raft_log();
        // Entries up to the durable purge point may still be in the segments (a purge whose
        // segments were not deleted yet, or whose deletion a crash undid).
        if let Some(p) = last_purged {
            log.purge(self.group, p.index());
        }
        let last = match log.bounds(self.group) {
            Some((_, last)) => match log.read(self.group, last, last + 1)?.first() {
                Some((_, bytes)) => Some(Self::decode_entry(bytes)?.log_id()),
                None => None,
            },
            None => None,
        };
        Ok(LogState {
            last_log_id: last.or(last_purged),
            last_purged_log_id: last_purged,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.storage
            .db()
            .put_cf(
                self.storage.cf(CF_RAFT_META),
                group_key(self.group, META_VOTE),
                encode(vote),
            )
            .map_err(io_err)?;
        // The vote must be on disk before this returns: a restarted node must never vote twice
        // in one term.
        self.storage.sync().await
    }

    /// Kept in memory, not written: openraft saves the committed id once per replication round
    /// of every group, and each save was a RocksDB write of its own. The state machine stores
    /// the last applied id in each apply's batch, and a restarted node starts from there
    /// (openraft takes the later of the two); what was committed but not yet applied is
    /// committed again by the group's next leader, as for any entry. Only a seeded group's
    /// first committed id (`put_seeded_meta`) is stored.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        *self.committed.lock().unwrap_or_else(|p| p.into_inner()) = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        let saved = *self.committed.lock().unwrap_or_else(|p| p.into_inner());
        match saved {
            Some(c) => Ok(Some(c)),
            None => Ok(self.get_meta::<Option<LogId>>(META_COMMITTED)?.flatten()),
        }
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let started = std::time::Instant::now();
        let mut written: Vec<(Entry, Vec<u8>)> = Vec::new();
        let mut last = 0;
        for entry in entries {
            last = entry.index();
            if written.is_empty() {
                // Whatever the cache holds from here on is about to be overwritten.
                self.tail().truncate_from(entry.index());
            }
            let bytes = encode(&entry);
            written.push((entry, bytes));
        }
        // Written (readable) now; durable once the group-commit fsync that covers it completes.
        let log = self.storage.raft_log();
        let appended = || {
            log.append(
                self.group,
                written.iter().map(|(e, b)| (e.index(), b.as_slice())),
            )
        };
        let bytes: usize = written.iter().map(|(_, b)| b.len()).sum();
        if bytes >= LARGE_APPEND_BYTES && multi_thread_runtime() {
            // Megabytes copied and checksummed: the worker's other tasks (every group's
            // heartbeats and votes) move to another thread meanwhile.
            tokio::task::block_in_place(appended)?;
        } else {
            appended()?;
        }
        self.appended
            .fetch_add(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
        {
            let mut tail = self.tail();
            for (entry, bytes) in written {
                tail.push(entry, bytes.len());
            }
        }
        let latency = self.storage.append_latency.clone();
        let (durable, upto) = (self.durable.clone(), last + 1);
        self.storage.raft_log_syncer().after_sync(move |r| {
            latency.observe(started.elapsed().as_secs_f64());
            if r.is_ok() {
                durable.advance(upto);
            } else {
                durable.failed();
            }
            callback.io_completed(r.map_err(io::Error::other));
        });
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index() + 1);
        // The cache first: it must never hold an entry the log no longer has.
        self.tail().truncate_from(from);
        self.storage.raft_log().truncate(self.group, from)?;
        // Truncated entries must not reappear after a crash: sync before returning.
        self.storage.raft_log_syncer().sync().await?;
        // Entries from `from` on are gone; those appended there next are durable only when
        // their own fsync completes. Lowered after the sync: the callbacks of earlier appends,
        // which may raise it, have all run by then (the syncer serves waiters in order).
        self.durable.truncated(from);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.storage
            .db()
            .put_cf(
                self.storage.cf(CF_RAFT_META),
                group_key(self.group, META_PURGED),
                encode(&log_id),
            )
            .map_err(io_err)?;
        // The purge point, and every state-machine write before it (all of this group's applies
        // up to the purged entries), durable before the entries are forgotten.
        self.storage.sync().await?;
        self.tail().purge_to(log_id.index());
        self.storage.raft_log().purge(self.group, log_id.index());
        Ok(())
    }
}

/// An entry batch this large leaves the async worker while it is written.
const LARGE_APPEND_BYTES: usize = 1 << 20;

fn multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ent(index: u64) -> Entry {
        openraft::testing::blank_ent::<TypeConfig>(1, 1, index)
    }

    fn indexes(v: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        v.map(|v| v.iter().map(RaftEntry::index).collect())
    }

    #[test]
    fn tail_cache_serves_only_ranges_it_holds_whole() {
        let mut c = TailCache::default();
        assert_eq!(indexes(c.get(0, None)), None);
        for i in 5..10 {
            c.push(ent(i), 10);
        }
        assert_eq!(indexes(c.get(5, Some(10))), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(indexes(c.get(7, None)), Some(vec![7, 8, 9]));
        assert_eq!(indexes(c.get(10, None)), Some(vec![]));
        // Partly outside: the caller reads the database instead.
        assert_eq!(indexes(c.get(4, Some(7))), None);
        assert_eq!(indexes(c.get(8, Some(11))), None);
    }

    #[test]
    fn tail_cache_follows_truncation_overwrite_purge_and_gaps() {
        let mut c = TailCache::default();
        for i in 1..=6 {
            c.push(ent(i), 10);
        }
        c.truncate_from(5);
        assert_eq!(indexes(c.get(1, None)), Some(vec![1, 2, 3, 4]));
        // An entry overwriting index 3 drops 3 and everything after it first.
        c.push(ent(3), 10);
        assert_eq!(indexes(c.get(1, None)), Some(vec![1, 2, 3]));
        assert_eq!(c.bytes, 30);
        c.purge_to(2);
        assert_eq!(indexes(c.get(3, None)), Some(vec![3]));
        assert_eq!(indexes(c.get(2, None)), None);
        // A gap (entries appended elsewhere, e.g. after a snapshot): start over.
        c.push(ent(9), 10);
        assert_eq!(indexes(c.get(9, None)), Some(vec![9]));
        assert_eq!(indexes(c.get(3, None)), None);
        assert_eq!(c.bytes, 10);
    }

    #[test]
    fn tail_cache_stays_within_its_byte_budget() {
        let mut c = TailCache::default();
        let size = TAIL_CACHE_BYTES / 4;
        for i in 1..=10 {
            c.push(ent(i), size);
        }
        assert!(c.bytes <= TAIL_CACHE_BYTES);
        assert_eq!(indexes(c.get(7, None)), Some(vec![7, 8, 9, 10]));
        assert_eq!(indexes(c.get(6, None)), None);
    }
}
