//! One RocksDB instance per node, shared by every raft group on it, and one raft log
//! ([`segments`]) holding every group's entries.
//!
//! ```text
//!   column family   key                               value
//!   raft_log        group(2) ‖ index(8 BE)            (layout 3 and before; moved to segments)
//!   raft_meta       group(2) ‖ name                   vote, last purged log id
//!   state           group(2) ‖ state::keys …          records, indexes, timers, dedup,
//!                   group(2) ‖ 'm' ‖ name             last applied, membership, snapshot meta
//!   blob            group(2) ‖ id(16) ‖ part(4 BE)    sealed payload parts
//!   <db>/raft-log/*.seg                               every group's raft entries
//! ```
//!
//! All groups share one raft log, so one fsync makes every group's appends durable: a
//! [`Syncer`] runs those fsyncs on a dedicated thread and completes every waiter that wrote
//! before the fsync began (group commit). State-machine writes are not synced: after a crash
//! openraft re-applies from the durable raft log whatever the state lost, and the log is purged
//! only up to a point the state was synced to first (`raft::log_store`). Votes, purge points
//! and membership go to RocksDB and are synced by a second syncer, on its WAL.

mod durable;
pub mod layout;
pub mod segments;
mod syncer;
mod view;

pub use durable::LogDurable;
pub use syncer::{Syncer, UNSAFE_SKIP_FSYNC_ENV};
pub use view::{GroupTxn, ReadView};

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, Options};

use crate::ids::GroupId;
use crate::state::Table;

/// Column family names.
pub const CF_RAFT_LOG: &str = "raft_log";
pub const CF_RAFT_META: &str = "raft_meta";
pub const CF_STATE: &str = "state";
pub const CF_BLOB: &str = "blob";

/// The raft log's directory, inside the database's.
pub const RAFT_LOG_DIR: &str = "raft-log";

/// Values at least this large (sealed payload parts, raft entries carrying them) are kept in
/// RocksDB's blob files instead of its SSTs.
const LARGE_VALUE_BYTES: u64 = 4096;

/// Writes at least this large leave the async worker first (see [`Storage::write`]).
const LARGE_WRITE_BYTES: usize = 1 << 20;

/// Opening or using the database failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("column family {0} is missing")]
    MissingCf(&'static str),
    #[error("cannot start the WAL sync thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("raft log: {0}")]
    RaftLog(std::io::Error),
}

/// The node's database and its group-commit syncer.
pub struct Storage {
    db: Arc<DB>,
    syncer: Syncer,
    raft_log: Arc<segments::SegmentLog>,
    raft_log_syncer: Syncer,
    /// Per group, how far its raft log is durable (see [`Storage::log_durable`]).
    log_durable: std::sync::Mutex<std::collections::HashMap<GroupId, Arc<LogDurable>>>,
    /// Time from a raft append's write to its durability callback.
    pub append_latency: Arc<crate::metrics::Histogram>,
    /// Releasers of the raft snapshots' pinned views (see `raft::snapshot`): each returns
    /// `false` once its state machine is gone.
    pin_releasers: std::sync::Mutex<Vec<PinReleaser>>,
}

/// Drops a state machine's pinned snapshot view if nobody reads it and it is at least the given
/// age; `false` when the state machine no longer exists.
pub type PinReleaser = Box<dyn Fn(std::time::Duration) -> bool + Send + Sync>;

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").finish_non_exhaustive()
    }
}

impl Storage {
    /// Opens (creating if needed) the database under `dir`.
    ///
    /// # Errors
    /// When RocksDB cannot open the directory (in use by another process, corrupt, no space).
    pub fn open(dir: &Path) -> Result<Arc<Self>, StorageError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        // The WAL is fsynced only now and then (votes, purges, snapshots: the raft log is what
        // each operation waits on), so without this megabytes of payloads pile up unwritten in
        // the page cache and the next fsync writes them all at once, stalling the disk for every
        // raft log fsync behind it. Written back in the background every MiB instead.
        opts.set_wal_bytes_per_sync(1 << 20);
        opts.set_keep_log_file_num(4);
        opts.increase_parallelism(2);
        // Bound memtable memory across all column families: the node's RSS must not grow with
        // write volume (kubbis themselves live on disk).
        opts.set_db_write_buffer_size(128 << 20);
        // A WAL file is deleted only once every family flushed what it holds; past this size
        // RocksDB flushes the families that pin the oldest one. Left to its default (four times
        // all possible memtables) the WAL grew to 3.5 GB per node under MiB payloads.
        opts.set_max_total_wal_size(512 << 20);
        // One block cache for every family, so memory stays bounded however many kubbis a node
        // holds; bloom filters so that looking up a key that is not there (request dedup, id and
        // token collision checks: three per create) skips the SSTs, and memtable blooms so it
        // skips the memtable's skiplist too. The raft log is only ever scanned by range: no
        // filters there.
        //
        // Filters and indexes are **partitioned** (4 KiB pieces under a small top-level index
        // that stays pinned): a whole-file filter of a large SST (an L1 file of small keys holds
        // about a million, a 1.2 MiB filter) is bigger than one shard of the block cache, so it
        // was evicted as soon as it was read, and after a burst of 200k creates every point
        // lookup read and checksummed it again from the file: half of a node's CPU, claims 4x
        // slower (benches/README.md, "Claims after a burst").
        let cache = rocksdb::Cache::new_lru_cache(64 << 20);
        let table = |bloom: bool| {
            let mut t = rocksdb::BlockBasedOptions::default();
            t.set_block_cache(&cache);
            if bloom {
                t.set_bloom_filter(10.0, false);
                t.set_whole_key_filtering(true);
                t.set_cache_index_and_filter_blocks(true);
                t.set_pin_l0_filter_and_index_blocks_in_cache(true);
                t.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
                t.set_partition_filters(true);
                t.set_metadata_block_size(4096);
                t.set_pin_top_level_index_and_filter(true);
            }
            t
        };
        let point_lookups = |o: &mut Options| {
            o.set_block_based_table_factory(&table(true));
            o.set_memtable_prefix_bloom_ratio(0.05);
            o.set_memtable_whole_key_filtering(true);
        };

        // Families holding payloads (sealed parts, raft entries carrying them) keep large values
        // in blob files: a flush writes them once, and compactions move only the small keys
        // until a delete or purge drops them. And a few MiB-sized values fill a memtable: with
        // RocksDB's default of two memtables the next write would wait for a flush, and a raft
        // append waiting on a flush holds up its group's heartbeats and votes. Room for more
        // memtables (their total still bounded by the write buffer size above) turns that wait
        // into a background flush.
        let large_values = |o: &mut Options| {
            o.set_enable_blob_files(true);
            o.set_min_blob_size(LARGE_VALUE_BYTES);
            o.set_enable_blob_gc(true);
            o.set_max_write_buffer_number(6);
        };
        let mut log_opts = Options::default();
        log_opts.set_compression_type(rocksdb::DBCompressionType::None);
        log_opts.set_write_buffer_size(32 << 20);
        log_opts.set_block_based_table_factory(&table(false));
        large_values(&mut log_opts);
        let mut blob_opts = Options::default();
        point_lookups(&mut blob_opts);
        large_values(&mut blob_opts);
        let mut state_opts = Options::default();
        state_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        point_lookups(&mut state_opts);
        let mut meta_opts = Options::default();
        meta_opts.set_block_based_table_factory(&table(true));

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_RAFT_LOG, log_opts),
            ColumnFamilyDescriptor::new(CF_RAFT_META, meta_opts),
            ColumnFamilyDescriptor::new(CF_STATE, state_opts),
            ColumnFamilyDescriptor::new(CF_BLOB, blob_opts),
        ];
        let db = Arc::new(DB::open_cf_descriptors(&opts, dir, cfs)?);
        for name in [CF_RAFT_LOG, CF_RAFT_META, CF_STATE, CF_BLOB] {
            db.cf_handle(name).ok_or(StorageError::MissingCf(name))?;
        }
        let wal = db.clone();
        let syncer = Syncer::start("kubbi-wal-sync", move |fsync| {
            wal.flush_wal(fsync).map_err(std::io::Error::other)
        })?;
        let raft_log = Arc::new(
            segments::SegmentLog::open(&dir.join(RAFT_LOG_DIR)).map_err(StorageError::RaftLog)?,
        );
        migrate_raft_log(&db, &raft_log)?;
        // What an earlier process wrote may still sit in the page cache: durable from here on, so
        // every entry found now counts as durable (`Storage::log_durable`).
        raft_log.sync().map_err(StorageError::RaftLog)?;
        let segments = raft_log.clone();
        let raft_log_syncer = Syncer::start("kubbi-log-sync", move |fsync| {
            if fsync { segments.sync() } else { Ok(()) }
        })?;
        Ok(Arc::new(Self {
            db,
            syncer,
            raft_log,
            raft_log_syncer,
            log_durable: std::sync::Mutex::default(),
            append_latency: Arc::new(crate::metrics::Histogram::default()),
            pin_releasers: std::sync::Mutex::new(Vec::new()),
        }))
    }

    /// Registers a state machine's pin releaser.
    pub fn register_pin_releaser(&self, r: PinReleaser) {
        self.pin_releasers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(r);
    }

    /// Releases every pinned snapshot view nobody is reading from that is at least `min_age`
    /// old, so a compaction can drop what was deleted after it.
    pub fn release_unused_pins(&self, min_age: std::time::Duration) {
        self.pin_releasers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|r| r(min_age));
    }

    pub fn db(&self) -> &DB {
        &self.db
    }

    /// Writes `batch` (not synced: see [`Syncer`]). A batch of [`LARGE_WRITE_BYTES`] or more
    /// (a raft entry or a sealed payload of megabytes: copied into the memtable, checksummed,
    /// written to the WAL) first hands the async worker's other tasks to another thread, so
    /// heartbeats and votes of every group on that worker do not wait for it.
    ///
    /// # Errors
    /// When RocksDB refuses the write.
    pub fn write(&self, batch: rocksdb::WriteBatch) -> Result<(), rocksdb::Error> {
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread && batch.size_in_bytes() >= LARGE_WRITE_BYTES {
            tokio::task::block_in_place(|| self.db.write(batch))
        } else {
            self.db.write(batch)
        }
    }

    /// Flushes every column family and compacts each down to the bottom level, dropping
    /// tombstones and the values they cover, and blob files with no live blob. Afterwards no SST,
    /// blob or WAL file holds a value deleted before the call.
    ///
    /// # Errors
    /// When RocksDB fails to flush.
    pub fn compact_fully(&self) -> Result<(), StorageError> {
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        opts.set_exclusive_manual_compaction(true);
        for name in [CF_RAFT_LOG, CF_RAFT_META, CF_STATE, CF_BLOB] {
            let cf = self.cf(name);
            self.db.flush_cf(cf)?;
            self.db
                .compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &opts);
        }
        // The memtables are empty now; a last flush retires the WAL that held their writes.
        self.db.flush_wal(true)?;
        // Purged raft entries (the creates of ended kubbis among them) leave the segments.
        self.raft_log.rewrite().map_err(StorageError::RaftLog)?;
        Ok(())
    }

    /// Deletes every key of `group` in every column family (one synced batch); with
    /// `compact`, then compacts the group's key ranges so no file keeps the deleted values.
    ///
    /// # Errors
    /// When RocksDB fails to write.
    pub fn clear_group(&self, group: GroupId, compact: bool) -> Result<(), StorageError> {
        let (lo, hi) = (group_key(group, &[]), group_key(group, &[0xff; 64]));
        // The log first: a crash in between leaves state without a log, as a seeded group
        // starts, never entries of a group whose vote and purge point are gone.
        self.raft_log
            .clear(group)
            .and_then(|()| self.raft_log.sync())
            .map_err(StorageError::RaftLog)?;
        // A group started here again begins with what its log holds then (nothing); callbacks
        // of the old log's appends still pending advance the forgotten instance.
        self.log_durable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
        let mut batch = rocksdb::WriteBatch::default();
        for name in [CF_STATE, CF_BLOB, CF_RAFT_LOG, CF_RAFT_META] {
            batch.delete_range_cf(self.cf(name), &lo, &hi);
        }
        let mut sync = rocksdb::WriteOptions::default();
        sync.set_sync(true);
        self.db.write_opt(batch, &sync)?;
        if compact {
            self.raft_log.rewrite().map_err(StorageError::RaftLog)?;
            for name in [CF_STATE, CF_BLOB, CF_RAFT_LOG, CF_RAFT_META] {
                self.db
                    .compact_range_cf(self.cf(name), Some(lo.as_slice()), Some(hi.as_slice()));
            }
        }
        Ok(())
    }

    pub fn db_arc(&self) -> Arc<DB> {
        self.db.clone()
    }

    pub fn syncer(&self) -> &Syncer {
        &self.syncer
    }

    /// Every group's raft entries.
    pub fn raft_log(&self) -> &segments::SegmentLog {
        &self.raft_log
    }

    /// Group commit of the raft log.
    pub fn raft_log_syncer(&self) -> &Syncer {
        &self.raft_log_syncer
    }

    /// How far `group`'s raft log is durable, shared by its log store (which advances it when
    /// an append's fsync completes) and its state machine (which applies no entry beyond it:
    /// see [`LogDurable`]). Entries the log held at open are durable (`open` synced them).
    pub fn log_durable(&self, group: GroupId) -> Arc<LogDurable> {
        self.log_durable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(group)
            .or_insert_with(|| {
                let next = self.raft_log.bounds(group).map_or(0, |(_, last)| last + 1);
                Arc::new(LogDurable::new(next))
            })
            .clone()
    }

    /// Makes every later fsync, of RocksDB and of the raft log, fail (tests of the failure
    /// path: a disk that stopped syncing).
    pub fn inject_fsync_failure(&self, fail: bool) {
        self.syncer.inject_failure(fail);
        self.raft_log_syncer.inject_failure(fail);
    }

    /// A column family handle. The four families are checked at open, so this cannot fail.
    pub fn cf(&self, name: &'static str) -> &ColumnFamily {
        match self.db.cf_handle(name) {
            Some(cf) => cf,
            None => unreachable!("column family {name} verified at open"),
        }
    }

    /// The column family of a state table.
    pub fn table_cf(&self, table: Table) -> &ColumnFamily {
        match table {
            Table::State => self.cf(CF_STATE),
            Table::Blob => self.cf(CF_BLOB),
        }
    }

    /// A read view of one group's state at a consistent point in time.
    pub fn read_view(&self, group: GroupId) -> ReadView<'_> {
        ReadView::new(self, group)
    }

    /// Makes everything written so far durable (group-committed fsync of the WAL).
    ///
    /// # Errors
    /// When the fsync fails; the node must then stop serving writes.
    pub async fn sync(&self) -> std::io::Result<()> {
        self.syncer.sync().await
    }
}

/// Moves the raft entries that a build of key layout 3 or older kept in the `raft_log` family
/// into the segment log, then deletes them there. Safe to repeat after a crash: an entry
/// appended again at its index replaces the copy made before.
fn migrate_raft_log(db: &DB, log: &segments::SegmentLog) -> Result<(), StorageError> {
    let cf = db
        .cf_handle(CF_RAFT_LOG)
        .ok_or(StorageError::MissingCf(CF_RAFT_LOG))?;
    let mut run: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut run_group = None;
    let mut moved = 0u64;
    let flush = |group: Option<GroupId>, run: &mut Vec<(u64, Vec<u8>)>| match group {
        Some(g) if !run.is_empty() => {
            let r = log.append(g, run.iter().map(|(i, d)| (*i, d.as_slice())));
            run.clear();
            r.map_err(StorageError::RaftLog)
        }
        _ => Ok(()),
    };
    for item in db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
        let (k, v) = item?;
        let (Some(g), Some(i)) = (k.get(..2), k.get(2..10)) else {
            continue;
        };
        let group = GroupId::from_be_bytes([g[0], g[1]]);
        let mut index = [0u8; 8];
        index.copy_from_slice(i);
        if run_group != Some(group) || run.len() >= 1024 {
            flush(run_group, &mut run)?;
            run_group = Some(group);
        }
        run.push((u64::from_be_bytes(index), v.to_vec()));
        moved += 1;
    }
    flush(run_group, &mut run)?;
    if moved == 0 {
        return Ok(());
    }
    log.sync().map_err(StorageError::RaftLog)?;
    db.delete_range_cf(cf, &[] as &[u8], &[0xffu8; 11][..])?;
    db.flush_wal(true)?;
    tracing::info!(
        entries = moved,
        "moved the raft log out of RocksDB into its segment files"
    );
    Ok(())
}

/// Prefixes `key` with the group id.
pub fn group_key(group: GroupId, key: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + key.len());
    v.extend_from_slice(&group.to_be_bytes());
    v.extend_from_slice(key);
    v
}
