//! The raft log of one group, in the node's shared RocksDB.
//!
//! Durability contract (openraft's, and DESIGN.md invariant 5): vote, truncate and purge are on
//! disk before they return; appended entries are readable when `append` returns and durable when
//! its callback fires. The callback fires from the group-commit syncer, so concurrent appends of
//! all groups share fsyncs.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

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

/// The log store of one group.
#[derive(Clone)]
pub struct LogStore {
    storage: Arc<Storage>,
    group: GroupId,
}

impl LogStore {
    pub fn new(storage: Arc<Storage>, group: GroupId) -> Self {
        Self { storage, group }
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

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not synced: losing it only means re-applying from an older point after a crash.
        self.storage
            .db()
            .put_cf(
                self.storage.cf(CF_RAFT_META),
                group_key(self.group, META_COMMITTED),
                encode(&committed),
            )
            .map_err(io_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.get_meta::<Option<LogId>>(META_COMMITTED)?.flatten())
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
        for entry in entries {
            batch.put_cf(cf, self.key(entry.index()), encode(&entry));
        }
        // Written (readable) now; durable once the group-commit fsync that covers it completes.
        self.storage.db().write(batch).map_err(io_err)?;
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
        self.storage.db().write(batch).map_err(io_err)?;
        // The purge record must be durable before openraft forgets the purged entries.
        self.storage.sync().await
    }
}
