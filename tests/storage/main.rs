//! openraft's storage conformance suite against our RocksDB log store and state machine, run on
//! a group that shares its database with neighbouring groups (so key prefixes must isolate
//! them), plus durability checks of our own.

use std::sync::Arc;

use kubbi::ids::GroupId;
use kubbi::raft::state_machine::NoObserver;
use kubbi::raft::{LogStore, StateMachine, TypeConfig};
use kubbi::storage::Storage;
use openraft::StorageError;
use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::testing::log::{StoreBuilder, Suite};

const GROUP: GroupId = 7;

struct Builder;

fn entry(index: u64) -> kubbi::raft::Entry {
    openraft::testing::blank_ent::<TypeConfig>(1, 1, index)
}

/// Fills the neighbouring groups' logs so a prefix mistake in the group under test shows up.
async fn neighbours(storage: &Arc<Storage>) {
    for g in [GROUP - 1, GROUP + 1] {
        let mut ls = LogStore::new(storage.clone(), g);
        ls.blocking_append((0..20).map(entry))
            .await
            .expect("append neighbours");
    }
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path()).expect("open");
        neighbours(&storage).await;
        let ls = LogStore::new(storage.clone(), GROUP);
        let sm = StateMachine::new(storage, GROUP, Arc::new(NoObserver));
        Ok((dir, ls, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_conformance_suite() {
    Suite::test_all(Builder)
        .await
        .expect("storage suite passes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neighbouring_groups_are_untouched_by_truncate_and_purge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(dir.path()).expect("open");
    neighbours(&storage).await;
    let mut ls = LogStore::new(storage.clone(), GROUP);
    ls.blocking_append((0..10).map(entry))
        .await
        .expect("append");
    ls.truncate_after(Some(entry(4).log_id))
        .await
        .expect("truncate");
    ls.purge(entry(2).log_id).await.expect("purge");
    for g in [GROUP - 1, GROUP + 1] {
        let mut n = LogStore::new(storage.clone(), g);
        let state = n.get_log_state().await.expect("state");
        assert_eq!(state.last_log_id.map(|l| l.index), Some(19), "group {g}");
        assert_eq!(state.last_purged_log_id, None, "group {g}");
    }
    let state = ls.get_log_state().await.expect("state");
    assert_eq!(state.last_log_id.map(|l| l.index), Some(4));
    assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_vote_and_purge_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let storage = Storage::open(dir.path()).expect("open");
        let mut ls = LogStore::new(storage.clone(), GROUP);
        ls.blocking_append((0..50).map(entry))
            .await
            .expect("append");
        ls.save_vote(&openraft::impls::Vote::new(3, 1))
            .await
            .expect("vote");
        ls.purge(entry(9).log_id).await.expect("purge");
        // Every call above returned only after its fsync: the group commit covered it.
        assert!(storage.syncer().fsync_count() >= 3);
    }
    let storage = Storage::open(dir.path()).expect("reopen");
    let mut ls = LogStore::new(storage, GROUP);
    let state = ls.get_log_state().await.expect("state");
    assert_eq!(state.last_log_id.map(|l| l.index), Some(49));
    assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(9));
    let mut reader = ls.get_log_reader().await;
    let got = openraft::RaftLogReader::try_get_log_entries(&mut reader, 10..50)
        .await
        .expect("read");
    assert_eq!(got.len(), 40);
    let vote = openraft::RaftLogReader::read_vote(&mut reader)
        .await
        .expect("vote");
    assert_eq!(vote, Some(openraft::impls::Vote::new(3, 1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_fails_the_append_callback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(dir.path()).expect("open");
    storage.syncer().inject_failure(true);
    let mut ls = LogStore::new(storage.clone(), GROUP);
    let err = ls.blocking_append([entry(0)]).await;
    assert!(
        err.is_err(),
        "an append whose fsync failed must not report success"
    );
    assert!(storage.sync().await.is_err());
    storage.syncer().inject_failure(false);
    storage.sync().await.expect("sync works again");
}
