//! The raft state machine of one group: committed entries go through [`state::apply`] and land
//! in RocksDB as one `WriteBatch` per apply call, together with the last applied log id and the
//! membership. Apply never reads a clock: time comes from the entry.
//!
//! The batch is not fsynced by itself, and the raft log is not in RocksDB (it is in the segment
//! files, `storage::segments`): a batch reaching past the log's durable index first waits for
//! the log's fsync (see `apply`), so after a crash the state is at some applied index not past
//! the durable log, and openraft re-applies the rest. Before a snapshot lets the log be purged,
//! [`Builder::build_snapshot`] syncs the WAL so the state it stands for is on disk.

use std::io;
use std::sync::{Arc, Mutex};

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use rocksdb::WriteBatch;

use super::snapshot::SnapshotData;
use super::{LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig, io_err};
use crate::codec::{decode, encode};
use crate::ids::GroupId;
use crate::state::{self, Outcome};
use crate::storage::{CF_BLOB, CF_STATE, GroupTxn, Storage, group_key};

const META_APPLIED: &[u8] = b"mapplied";
const META_MEMBERSHIP: &[u8] = b"mmembership";
const META_SNAPSHOT: &[u8] = b"msnapshot";

/// Told about every applied outcome, on every replica (followers included), after the batch is
/// written; and about a state replaced by a snapshot. `proposed_here` is true on the node
/// whose proposal this was (the leader that answers the client).
pub trait ApplyObserver: Send + Sync + 'static {
    fn applied(&self, group: GroupId, outcome: &Outcome, proposed_here: bool);
    fn state_replaced(&self, group: GroupId);
}

/// An observer that does nothing.
pub struct NoObserver;

impl ApplyObserver for NoObserver {
    fn applied(&self, _: GroupId, _: &Outcome, _: bool) {}
    fn state_replaced(&self, _: GroupId) {}
}

/// The current snapshot: its meta and pinned data.
type Current = Arc<Mutex<Option<(SnapshotMeta, SnapshotData)>>>;

/// The state machine of one group.
pub struct StateMachine {
    storage: Arc<Storage>,
    group: GroupId,
    current: Current,
    observer: Arc<dyn ApplyObserver>,
    /// The group's ownership record as applied so far (`None` until first read), so that
    /// commands do not each read it.
    ownership: Option<Option<state::Ownership>>,
    /// How far the group's raft log is durable: no state is written beyond it.
    log_durable: Arc<crate::storage::LogDurable>,
}

impl StateMachine {
    pub fn new(storage: Arc<Storage>, group: GroupId, observer: Arc<dyn ApplyObserver>) -> Self {
        let current: Current = Arc::new(Mutex::new(None));
        let weak = Arc::downgrade(&current);
        storage.register_pin_releaser(Box::new(move |min_age| match weak.upgrade() {
            Some(c) => {
                Self::release_idle_pin(&c, min_age);
                true
            }
            None => false,
        }));
        Self {
            log_durable: storage.log_durable(group),
            storage,
            group,
            current,
            observer,
            ownership: None,
        }
    }

    /// Releases the pinned view of the current snapshot if nothing reads from it and it is at
    /// least `min_age` old (see `snapshot`).
    fn release_idle_pin(current: &Current, min_age: std::time::Duration) {
        let mut cur = current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.as_ref().is_some_and(|(_, d)| d.is_idle_pin(min_age)) {
            *cur = None;
        }
    }

    fn meta_key(&self, name: &[u8]) -> Vec<u8> {
        group_key(self.group, name)
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, name: &[u8]) -> io::Result<Option<T>> {
        match self
            .storage
            .db()
            .get_cf(self.storage.cf(CF_STATE), self.meta_key(name))
            .map_err(io_err)?
        {
            None => Ok(None),
            Some(b) => decode("state machine meta", &b)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }

    fn applied_meta(&self) -> io::Result<(Option<LogId>, StoredMembership)> {
        Ok((
            self.get_meta(META_APPLIED)?.flatten(),
            self.get_meta(META_MEMBERSHIP)?.unwrap_or_default(),
        ))
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, Option<(SnapshotMeta, SnapshotData)>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pins the current state as the group's snapshot, durable before it is reported.
    async fn pin_now(&self) -> io::Result<(SnapshotMeta, SnapshotData)> {
        let (last_log_id, last_membership) = self.applied_meta()?;
        let data = SnapshotData::pin(self.storage.db_arc(), self.group)?;
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
        };
        self.storage
            .db()
            .put_cf(
                self.storage.cf(CF_STATE),
                self.meta_key(META_SNAPSHOT),
                encode(&meta),
            )
            .map_err(io_err)?;
        // The state this snapshot stands for must be on disk before openraft may purge the log.
        self.storage.sync().await?;
        *self.lock_current() = Some((meta.clone(), data.clone()));
        Ok((meta, data))
    }
}

/// Puts into `batch` the state machine meta of a seeded group (`raft::seed`): applied up to
/// `at`, with `membership`, in the encodings [`StateMachine`] reads back.
pub(crate) fn put_seeded_meta(
    batch: &mut WriteBatch,
    storage: &Storage,
    group: GroupId,
    at: LogId,
    membership: &StoredMembership,
) {
    let cf = storage.cf(CF_STATE);
    batch.put_cf(cf, group_key(group, META_APPLIED), encode(&Some(at)));
    batch.put_cf(cf, group_key(group, META_MEMBERSHIP), encode(membership));
}

/// Builds a snapshot from the state pinned when the builder was created.
pub struct Builder {
    storage: Arc<Storage>,
    current: Current,
    pinned: Result<(SnapshotMeta, SnapshotData), String>,
    meta_key: Vec<u8>,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let (meta, data) = self.pinned.clone().map_err(io::Error::other)?;
        self.storage
            .db()
            .put_cf(self.storage.cf(CF_STATE), &self.meta_key, encode(&meta))
            .map_err(io_err)?;
        // Durable before openraft purges the log entries this snapshot covers.
        self.storage.sync().await?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: data,
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Builder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        self.applied_meta()
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let storage = self.storage.clone();
        let stored = match self.ownership.clone() {
            Some(o) => o,
            None => state::read_ownership(&storage.read_view(self.group)).map_err(io_err)?,
        };
        let mut txn = GroupTxn::new(&storage, self.group).with_ownership(stored.clone());
        let mut ownership = stored;
        let mut last_applied = None;
        let mut membership = None;
        let mut results = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            let log_id = entry.log_id;
            let outcome = match entry.payload {
                EntryPayload::Blank => Outcome::None,
                // Only an entry proposed here has a client waiting for its outcome.
                EntryPayload::Normal(req) => state::apply_for(
                    &mut txn,
                    &req,
                    if responder.is_some() {
                        state::Answer::Full
                    } else {
                        state::Answer::Unread
                    },
                )
                .map_err(|e| {
                    tracing::error!(group = self.group, index = log_id.index, error = %e, "apply failed");
                    io_err(e)
                })?,
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(log_id), m));
                    Outcome::None
                }
            };
            if let Outcome::Ownership(o) = &outcome {
                ownership = Some(o.clone());
            }
            last_applied = Some(log_id);
            results.push((responder, outcome));
        }
        let Some(last_applied) = last_applied else {
            return Ok(());
        };

        // openraft applies an entry once it is in the local log and committed by the cluster,
        // not once the local append is durable. The state must never be durable ahead of the
        // log it was applied from (a RocksDB flush or WAL sync could make it so, and after a
        // power cut the replica would hold state its log does not): wait for the raft log's
        // fsync (the one the append already waits on) when this batch reaches past what is
        // known durable. On a follower the entries are usually durable already (its leader
        // counted them only after their fsync); a leader that the followers outran waits.
        self.log_durable
            .wait(last_applied.index(), storage.raft_log_syncer())
            .await?;
        let mut batch = WriteBatch::default();
        txn.write_into(&mut batch);
        let cf = storage.cf(CF_STATE);
        batch.put_cf(cf, self.meta_key(META_APPLIED), encode(&Some(last_applied)));
        if let Some(m) = &membership {
            batch.put_cf(cf, self.meta_key(META_MEMBERSHIP), encode(m));
        }
        // One batch: state, dedup records, timers and the applied index land together.
        storage.write(batch).map_err(io_err)?;
        self.ownership = Some(ownership);

        for (responder, outcome) in results {
            self.observer
                .applied(self.group, &outcome, responder.is_some());
            if let Some(r) = responder {
                r.send(outcome);
            }
        }
        Ok(())
    }

    async fn try_create_snapshot_builder(&mut self, _force: bool) -> Option<Self::SnapshotBuilder> {
        Some(self.get_snapshot_builder().await)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Called on the state machine task, between applies: the pinned view and the meta agree.
        let pinned = self
            .applied_meta()
            .and_then(|(last_log_id, last_membership)| {
                let data = SnapshotData::pin(self.storage.db_arc(), self.group)?;
                let meta = SnapshotMeta {
                    last_log_id,
                    last_membership,
                };
                Ok((meta, data))
            })
            .map_err(|e| e.to_string());
        Builder {
            storage: self.storage.clone(),
            current: self.current.clone(),
            pinned,
            meta_key: self.meta_key(META_SNAPSHOT),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        let chunks = snapshot.all_chunks().await?;
        let storage = self.storage.clone();
        let mut batch = WriteBatch::default();
        for cf_name in [CF_STATE, CF_BLOB] {
            batch.delete_range_cf(
                storage.cf(cf_name),
                group_key(self.group, &[]),
                group_key(self.group, &[0xff; 64]),
            );
        }
        for chunk in chunks {
            for item in chunk.items {
                let cf = storage.cf(if item.blob { CF_BLOB } else { CF_STATE });
                batch.put_cf(cf, group_key(self.group, &item.key), item.value);
            }
        }
        let cf = storage.cf(CF_STATE);
        batch.put_cf(cf, self.meta_key(META_APPLIED), encode(&meta.last_log_id));
        batch.put_cf(
            cf,
            self.meta_key(META_MEMBERSHIP),
            encode(&meta.last_membership),
        );
        batch.put_cf(cf, self.meta_key(META_SNAPSHOT), encode(meta));
        storage.write(batch).map_err(io_err)?;
        // Whatever ownership the snapshot brought is read again when needed.
        self.ownership = None;
        // An installed snapshot replaces log entries: it must be durable before it is reported.
        storage.sync().await?;
        let data = SnapshotData::pin(storage.db_arc(), self.group)?;
        *self.lock_current() = Some((meta.clone(), data));
        self.observer.state_replaced(self.group);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        if let Some((meta, data)) = self.lock_current().clone() {
            return Ok(Some(Snapshot {
                meta,
                snapshot: data,
            }));
        }
        // After a restart: a snapshot was built before, but its pinned view is gone. Pin the
        // recovered state, which is at or past it.
        if self.get_meta::<SnapshotMeta>(META_SNAPSHOT)?.is_none() {
            return Ok(None);
        }
        let (meta, data) = self.pin_now().await?;
        Ok(Some(Snapshot {
            meta,
            snapshot: data,
        }))
    }
}

/// A digest of one group's replicated state on this node: the applied index and SHA-256 over
/// every state and blob key/value of the group in key order, read from one point-in-time view.
/// Replicas at the same applied index must have the same digest (the chaos suite compares them).
/// The snapshot record is left out: when each replica snapshots is its own business.
///
/// # Errors
/// On a read failure.
pub async fn group_digest(
    storage: &Arc<Storage>,
    group: GroupId,
) -> io::Result<(Option<u64>, [u8; 32])> {
    use sha2::Digest;
    let data = SnapshotData::pin(storage.db_arc(), group)?;
    let mut h = sha2::Sha256::new();
    let mut applied = None;
    for chunk in data.all_chunks().await? {
        for item in chunk.items {
            if !item.blob && item.key == META_SNAPSHOT {
                continue;
            }
            if !item.blob && item.key == META_APPLIED {
                let id: Option<LogId> = decode("applied", &item.value)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                applied = id.map(|l| l.index);
            }
            h.update([u8::from(item.blob)]);
            h.update((item.key.len() as u64).to_be_bytes());
            h.update(&item.key);
            h.update((item.value.len() as u64).to_be_bytes());
            h.update(&item.value);
        }
    }
    Ok((applied, h.finalize().into()))
}
