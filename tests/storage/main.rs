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
        assert!(storage.syncer().fsync_count() >= 2, "vote and purge");
        assert!(storage.raft_log_syncer().fsync_count() >= 1, "the append");
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
    storage.inject_fsync_failure(true);
    let mut ls = LogStore::new(storage.clone(), GROUP);
    let err = ls.blocking_append([entry(0)]).await;
    assert!(
        err.is_err(),
        "an append whose fsync failed must not report success"
    );
    assert!(storage.sync().await.is_err());
    storage.inject_fsync_failure(false);
    storage.sync().await.expect("sync works again");
}

/// openraft over in-process connections between the nodes' real `Raft`s (the subject here is
/// how openraft starts on seeded storage, not the wire; the cluster tests cover the wire).
mod seeded {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use kubbi::raft::{NodeInfo, Raft, Snapshot, SnapshotData, TypeConfig, Vote};
    use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
    use openraft::network::v2::RaftNetworkV2;
    use openraft::network::{RPCOption, RaftNetworkFactory};
    use openraft::raft::{
        AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
        TransferLeaderResponse, VoteRequest, VoteResponse,
    };

    #[derive(Clone, Default)]
    pub struct Router(Arc<Mutex<BTreeMap<u64, Raft>>>);

    impl Router {
        pub fn add(&self, id: u64, raft: Raft) {
            self.0.lock().expect("router").insert(id, raft);
        }
    }

    pub struct Conn {
        router: Router,
        target: u64,
    }

    fn unreachable(e: impl std::fmt::Display) -> Unreachable<TypeConfig> {
        Unreachable::from_string(e.to_string())
    }

    impl Conn {
        fn raft(&self) -> Result<Raft, Unreachable<TypeConfig>> {
            self.router
                .0
                .lock()
                .expect("router")
                .get(&self.target)
                .cloned()
                .ok_or_else(|| unreachable(format!("no node {}", self.target)))
        }
    }

    impl RaftNetworkFactory<TypeConfig> for Router {
        type Network = Conn;

        async fn new_client(&mut self, target: u64, _node: &NodeInfo) -> Conn {
            Conn {
                router: self.clone(),
                target,
            }
        }
    }

    impl RaftNetworkV2<TypeConfig> for Conn {
        type SnapshotData = SnapshotData;

        async fn append_entries(
            &mut self,
            rpc: AppendEntriesRequest<TypeConfig>,
            _option: RPCOption,
        ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
            let raft = self.raft().map_err(RPCError::Unreachable)?;
            raft.append_entries(rpc)
                .await
                .map_err(|e| RPCError::Unreachable(unreachable(e)))
        }

        async fn vote(
            &mut self,
            rpc: VoteRequest<TypeConfig>,
            _option: RPCOption,
        ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
            let raft = self.raft().map_err(RPCError::Unreachable)?;
            raft.vote(rpc)
                .await
                .map_err(|e| RPCError::Unreachable(unreachable(e)))
        }

        async fn pre_vote(
            &mut self,
            rpc: VoteRequest<TypeConfig>,
            _option: RPCOption,
        ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
            let raft = self.raft().map_err(RPCError::Unreachable)?;
            raft.pre_vote(rpc)
                .await
                .map_err(|e| RPCError::Unreachable(unreachable(e)))
        }

        async fn transfer_leader(
            &mut self,
            req: TransferLeaderRequest<TypeConfig>,
            _option: RPCOption,
        ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
            let raft = self.raft().map_err(RPCError::Unreachable)?;
            raft.handle_transfer_leader(req)
                .await
                .map_err(|e| RPCError::Unreachable(unreachable(e)))
        }

        async fn full_snapshot(
            &mut self,
            vote: Vote,
            snapshot: Snapshot,
            _cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
            _option: RPCOption,
        ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
            let raft = self.raft().map_err(StreamingError::Unreachable)?;
            // As the wire does: the receiver gets the chunks, not the sender's pinned view.
            let chunks = snapshot
                .snapshot
                .all_chunks()
                .await
                .map_err(|e| StreamingError::Unreachable(unreachable(e)))?;
            let copy = Snapshot {
                meta: snapshot.meta,
                snapshot: SnapshotData::from_chunks(chunks),
            };
            raft.install_full_snapshot(vote, copy)
                .await
                .map_err(|e| StreamingError::Unreachable(unreachable(e)))
        }
    }

    pub fn config() -> Arc<openraft::Config> {
        let c = openraft::Config {
            heartbeat_interval: 50,
            election_timeout_min: 300,
            election_timeout_max: 600,
            enable_pre_vote: Some(true),
            ..openraft::Config::default()
        };
        Arc::new(c.validate().expect("valid raft config"))
    }

    pub const PATIENCE: Duration = Duration::from_secs(20);
}

/// The seeded start of `docs/seeded-start.md`, run: three replicas seeded from the same fence
/// start the new group without `initialize`, elect a leader among themselves, serve the copied
/// kubbis and commit; a fourth replica with nothing of the group catches up by snapshot; all
/// four end with the same state digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_replicas_elect_serve_and_a_fourth_catches_up_by_snapshot() {
    use kubbi::ids::{ApiKeyId, KubbiId, RequestId, SHARD_SPACE, TokenHash};
    use kubbi::raft::seed::{SeedPlan, Seeded, seed};
    use kubbi::raft::{NodeInfo, Raft};
    use kubbi::state::{Blob, Body, Command, Create, Outcome, Request, apply};
    use kubbi::storage::GroupTxn;
    use openraft::async_runtime::WatchReceiver;

    const SOURCE: GroupId = 1;
    const TARGET: GroupId = 2;
    let base = tempfile::tempdir().expect("tempdir");
    let first = Storage::open(&base.path().join("n1")).expect("open");
    // The source group, adopted, with kubbis on both sides of the fence, then fenced.
    let now = 1_800_000_000_000;
    let mut cmds = vec![Command::Adopt {
        ranges: vec![(0, SHARD_SPACE)],
        map_version: 1,
    }];
    let mut moved = Vec::new();
    for n in 0..30u8 {
        let c = Create {
            id: KubbiId::for_token(if n % 2 == 0 { 5 } else { 0xc000 }, &TokenHash([n; 32])),
            owner: ApiKeyId([1; 16]),
            token_hash: TokenHash([n; 32]),
            ttl_ms: 3_600_000,
            max_retrievals: Some(2),
            body: Body::Single {
                content_type: "text/plain".into(),
            },
            metadata: None,
            parts: vec![Blob(vec![n; 64])],
            manifest: None,
            retention_ms: 3_600_000,
            idempotency: None,
            quota: None,
        };
        if n % 2 == 1 {
            moved.push((c.id, c.token_hash));
        }
        cmds.push(Command::Create(Box::new(c)));
    }
    cmds.push(Command::Split {
        ranges: vec![(0x8000, SHARD_SPACE)],
        target: TARGET,
        map_version: 2,
        voters: (1..=3)
            .map(|id| kubbi::state::Replica {
                id,
                ..Default::default()
            })
            .collect(),
    });
    let mut txn = GroupTxn::new(&first, SOURCE);
    for cmd in cmds {
        let req = Request {
            request_id: RequestId::random(),
            now,
            cmd,
        };
        apply(&mut txn, &req).expect("applies");
    }
    let mut batch = rocksdb::WriteBatch::default();
    txn.write_into(&mut batch);
    first.db().write(batch).expect("writes");
    // Three replicas of the source, byte for byte.
    for n in ["n2", "n3"] {
        rocksdb::checkpoint::Checkpoint::new(first.db())
            .expect("checkpoint")
            .create_checkpoint(base.path().join(n))
            .expect("checkpoint written");
    }
    let mut storages = vec![first];
    for n in ["n2", "n3", "n4"] {
        storages.push(Storage::open(&base.path().join(n)).expect("open"));
    }
    let info = |i: u64| NodeInfo {
        internal: format!("node{i}"),
        ..NodeInfo::default()
    };
    let plan = SeedPlan {
        source: SOURCE,
        target: TARGET,
        ranges: vec![(0x8000, SHARD_SPACE)],
        voters: (1..=3).map(|i| (i, info(i))).collect(),
        now,
    };
    for s in &storages[..3] {
        // Each moved kubbi: record (no token index: the token names the id), owner index,
        // payload and expiry (a create keeps no request-dedup record: its record is one); then
        // the aggregates (s, u) and the ownership.
        assert_eq!(
            seed(s, &plan).expect("seeds"),
            Seeded::Copied {
                kubbis: 15,
                keys: 15 * 4 + 3
            }
        );
    }

    let router = seeded::Router::default();
    let mut rafts: Vec<Raft> = Vec::new();
    for (i, s) in storages.iter().enumerate() {
        let id = i as u64 + 1;
        let raft = Raft::new(
            id,
            seeded::config(),
            router.clone(),
            LogStore::new(s.clone(), TARGET),
            StateMachine::new(s.clone(), TARGET, Arc::new(NoObserver)),
        )
        .await
        .expect("raft starts on the seeded state");
        router.add(id, raft.clone());
        rafts.push(raft);
    }
    // No initialize anywhere: the seeded voters elect among themselves. A write goes to the
    // node that says it leads, again until one takes it (a vote may have been granted to a
    // candidate that has not yet won).
    let (id, token_hash) = moved[0];
    let claim = Request {
        request_id: RequestId::random(),
        now: now + 1,
        cmd: Command::ClaimIn {
            shard: id.shard(),
            token_hash,
            idempotency: None,
        },
    };
    let deadline = tokio::time::Instant::now() + seeded::PATIENCE;
    let (leader, out) = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no leader took the write"
        );
        let leading = rafts
            .iter()
            .find(|r| {
                let m = r.metrics().borrow_watched().clone();
                m.current_leader == Some(m.id)
            })
            .cloned();
        if let Some(r) = leading
            && let Ok(w) = r.client_write(claim.clone()).await
        {
            break (r, w.data);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let leader_id = leader.metrics().borrow_watched().id;
    assert!((1..=3).contains(&leader_id), "the empty node cannot lead");
    let Outcome::Claimed(c) = out else {
        panic!("the copied kubbi is claimed: {out:?}")
    };
    assert_eq!((c.record.id, c.record.retrieval_count), (id, 1));
    // A replica with nothing of the group joins and gets a snapshot, not entries it lacks.
    leader
        .add_learner(4, info(4), true)
        .await
        .expect("the fourth node catches up");
    let applied = leader.metrics().borrow_watched().last_applied;
    for r in &rafts {
        r.wait(Some(seeded::PATIENCE))
            .applied_index_at_least(applied.map(|l| l.index), "caught up")
            .await
            .expect("applies");
    }
    assert!(
        rafts[3].metrics().borrow_watched().snapshot.is_some(),
        "the fourth replica was sent a snapshot"
    );
    let mut digests = Vec::new();
    for s in &storages {
        digests.push(
            kubbi::raft::state_machine::group_digest(s, TARGET)
                .await
                .expect("digest"),
        );
    }
    assert!(
        digests.windows(2).all(|w| w[0] == w[1]),
        "replicas differ: {digests:?}"
    );
    for r in rafts {
        r.shutdown().await.expect("shuts down");
    }
}

/// A data directory of key layout 3 or older kept its raft log in RocksDB: opening it moves
/// every group's entries into the segment log, once, and the log reads as it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raft_log_kept_in_rocksdb_is_moved_into_segments_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let storage = Storage::open(dir.path()).expect("open");
        let cf = storage.cf(kubbi::storage::CF_RAFT_LOG);
        for g in [GROUP, GROUP + 1] {
            for i in 3..40u64 {
                storage
                    .db()
                    .put_cf(
                        cf,
                        kubbi::storage::group_key(g, &i.to_be_bytes()),
                        kubbi::codec::encode(&entry(i)),
                    )
                    .expect("put");
            }
        }
        storage.db().flush_wal(true).expect("sync");
    }
    let storage = Storage::open(dir.path()).expect("reopen");
    let cf = storage.cf(kubbi::storage::CF_RAFT_LOG);
    assert!(
        storage
            .db()
            .iterator_cf(cf, rocksdb::IteratorMode::Start)
            .next()
            .is_none(),
        "the family is emptied"
    );
    for g in [GROUP, GROUP + 1] {
        let mut ls = LogStore::new(storage.clone(), g);
        let state = ls.get_log_state().await.expect("state");
        assert_eq!(state.last_log_id.map(|l| l.index), Some(39), "group {g}");
        let mut reader = ls.get_log_reader().await;
        let got = openraft::RaftLogReader::try_get_log_entries(&mut reader, 0..40)
            .await
            .expect("read");
        let indexes: Vec<u64> = got.iter().map(|e| e.log_id.index).collect();
        assert_eq!(indexes, (3..40).collect::<Vec<_>>(), "group {g}");
    }
}

/// openraft applies an entry once it is accepted into the local log and committed, not once the
/// local append is durable. The state machine writes no state for an entry the raft log has not
/// made durable: it waits for the log's fsync (and fails with it), so after a power cut a
/// replica's state is never ahead of its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_machine_writes_nothing_beyond_the_durable_raft_log() {
    use openraft::storage::RaftStateMachine;
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(dir.path()).expect("open");
    let mut sm = StateMachine::new(storage.clone(), GROUP, Arc::new(NoObserver));
    // Nothing known durable and the log's fsync failing: the apply fails, nothing is written.
    storage.raft_log_syncer().inject_failure(true);
    assert!(apply_one(&mut sm, 1).await.is_err());
    let (applied, _) = sm.applied_state().await.expect("state");
    assert_eq!(applied, None, "no state written ahead of the log");
    storage.raft_log_syncer().inject_failure(false);
    apply_one(&mut sm, 1)
        .await
        .expect("applied once the log synced");
    // Entries whose append was made durable need no fsync of their own.
    let mut ls = LogStore::new(storage.clone(), GROUP);
    ls.blocking_append((2..4).map(entry)).await.expect("append");
    storage.raft_log_syncer().inject_failure(true);
    apply_one(&mut sm, 2)
        .await
        .expect("entry 2 is durable already");
    let (applied, _) = sm.applied_state().await.expect("state");
    assert_eq!(applied.map(|l| l.index), Some(2));
    storage.raft_log_syncer().inject_failure(false);
}

async fn apply_one(sm: &mut StateMachine, index: u64) -> Result<(), std::io::Error> {
    use openraft::storage::RaftStateMachine;
    sm.apply(futures::stream::iter(vec![Ok((entry(index), None))]))
        .await
}
