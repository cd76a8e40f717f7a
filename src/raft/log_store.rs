//! The raft log of one group, in the node's shared RocksDB.
//!
//! Durability contract (openraft's, and DESIGN.md invariant 5): vote, truncate and purge are on
//! disk before they return; appended entries are readable when `append` returns and durable when
//! its callback fires. The callback fires from the group-commit syncer, so concurrent appends of
//! all groups share fsyncs.
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
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};

use super::{Entry, LogId, TypeConfig, Vote, io_err};
use crate::codec::{decode, encode};
use crate::ids::GroupId;
use crate::storage::{CF_RAFT_LOG, CF_RAFT_META, Storage, group_key};

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
}

impl LogStore {
    pub fn new(storage: Arc<Storage>, group: GroupId) -> Self {
        Self {
            storage,
            group,
            tail: Arc::default(),
            appended: Arc::default(),
            committed: Arc::default(),
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

    fn key(&self, index: u64) -> Vec<u8> {
        group_key(self.group, &index.to_be_bytes())
    }

    /// A key above every log key of this group.
    fn end_key(&self) -> Vec<u8> {
        group_key(self.group, &[0xff; 9])
    }

    fn index_of(&self, key: &[u8]) -> io::Result<u64> {
        let b: [u8; 8] = key
            .get(2..10)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| io_err("malformed raft log key"))?;
        Ok(u64::from_be_bytes(b))
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
    let mut ro = ReadOptions::default();
    ro.set_iterate_upper_bound(group_key(group, &[0xff; 9]));
    let first = db
        .iterator_cf_opt(
            storage.cf(CF_RAFT_LOG),
            ro,
            IteratorMode::From(&group_key(group, &[]), Direction::Forward),
        )
        .next()
        .transpose()
        .map_err(io_err)?;
    Ok(first.is_some())
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
        let upper = match end {
            Some(e) => self.key(e),
            None => self.end_key(),
        };
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(upper.clone());
        let from = self.key(start);
        let iter = self.storage.db().iterator_cf_opt(
            self.storage.cf(CF_RAFT_LOG),
            ro,
            IteratorMode::From(&from, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item.map_err(io_err)?;
            if k[..] >= upper[..] {
                break;
            }
            let index = self.index_of(&k)?;
            let entry = Self::decode_entry(&v)?;
            if entry.index() != index {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("raft log key {index} holds entry {}", entry.index()),
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
        let from = self.key(u64::MAX);
        let mut iter = self.storage.db().iterator_cf(
            self.storage.cf(CF_RAFT_LOG),
            IteratorMode::From(&from, Direction::Reverse),
        );
        let last = match iter.next() {
            Some(item) => {
                let (k, v) = item.map_err(io_err)?;
                if k[..2] == self.group.to_be_bytes() {
                    Some(Self::decode_entry(&v)?.log_id())
                } else {
                    None
                }
            }
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
        let cf = self.storage.cf(CF_RAFT_LOG);
        let mut batch = WriteBatch::default();
        let mut written: Vec<(Entry, usize)> = Vec::new();
        for entry in entries {
            if written.is_empty() {
                // Whatever the cache holds from here on is about to be overwritten.
                self.tail().truncate_from(entry.index());
            }
            let bytes = encode(&entry);
            batch.put_cf(cf, self.key(entry.index()), &bytes);
            written.push((entry, bytes.len()));
        }
        // Written (readable) now; durable once the group-commit fsync that covers it completes.
        self.storage.write(batch).map_err(io_err)?;
        let bytes: usize = written.iter().map(|(_, n)| n).sum();
        self.appended
            .fetch_add(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
        {
            let mut tail = self.tail();
            for (entry, size) in written {
                tail.push(entry, size);
            }
        }
        let latency = self.storage.append_latency.clone();
        self.storage.syncer().after_sync(move |r| {
            latency.observe(started.elapsed().as_secs_f64());
            callback.io_completed(r.map_err(io::Error::other));
        });
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index() + 1);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.storage.cf(CF_RAFT_LOG), self.key(from), self.end_key());
        // The cache first: it must never hold an entry the database no longer has.
        self.tail().truncate_from(from);
        self.storage.db().write(batch).map_err(io_err)?;
        // Truncated entries must not reappear after a crash: sync before returning.
        self.storage.sync().await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.storage.cf(CF_RAFT_META),
            group_key(self.group, META_PURGED),
            encode(&log_id),
        );
        batch.delete_range_cf(
            self.storage.cf(CF_RAFT_LOG),
            self.key(0),
            self.key(log_id.index() + 1),
        );
        self.tail().purge_to(log_id.index());
        self.storage.db().write(batch).map_err(io_err)?;
        // The purge record must be durable before openraft forgets the purged entries.
        self.storage.sync().await
    }
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
