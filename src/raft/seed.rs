//! Seeding a new raft group from shard ranges fenced in another group on the same node: the
//! local copy of a split (`docs/shard-map-plan.md` §3.6, step 3).
//!
//! After the source group applied the fence (`state::Command::Split`), its keys of the fenced
//! ranges never change again until the release, so every replica of the source copies the same
//! keys, from a point-in-time view, under the target's group prefix, and adds what makes the
//! copy a group openraft can start on without `initialize` (`docs/seeded-start.md`):
//!
//! ```text
//!   raft_meta  purged = committed = L0            no vote, no log entries
//!   state      mapplied = L0, mmembership = (L0, the target's voters with their node info)
//!              w = the ranges, s and u = the totals of the copied kubbis
//! ```
//!
//! `L0` ([`seed_log_id`]) is term 0, node 0, index 0: no real entry has it (node ids start at
//! 1), and every replica seeded from the same fence starts at the same log id, so they elect a
//! leader among themselves at term 1 and a replica without the copy gets a snapshot.
//!
//! A seed starts by deleting whatever an earlier, interrupted seed of the target left, so
//! running it again after a crash gives the same result. It never writes over a group that
//! has raft state of its own (a vote or log entries): that group is live.

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use openraft::RaftTypeConfig;
use openraft::vote::RaftLeaderIdExt;
use rocksdb::WriteBatch;

use super::{LogId, NodeId, NodeInfo, StoredMembership, TypeConfig, io_err};
use crate::codec::encode;
use crate::ids::{GroupId, Millis};
use crate::state::{
    KubbiRecord, MovedRanges, Ownership, ShardRange, ShardStats, StateRead, Table, Totals, day_of,
    in_ranges, keys,
};
use crate::storage::{Storage, group_key};

/// Bytes of copied keys collected before they are written.
const SEED_BATCH_BYTES: usize = 4 << 20;

/// What to seed.
#[derive(Debug, Clone)]
pub struct SeedPlan {
    pub source: GroupId,
    pub target: GroupId,
    /// The fenced ranges, as the source's `Split` named them.
    pub ranges: Vec<ShardRange>,
    /// The target's voters and their node info (openraft needs it for every voter).
    pub voters: BTreeMap<NodeId, NodeInfo>,
    /// The fence's stamped time: creates of its UTC day are what the copied usage counts.
    pub now: Millis,
}

impl SeedPlan {
    /// The seed of `fence` (a fence in `source`'s ownership record).
    pub fn of_fence(source: GroupId, fence: &MovedRanges) -> Self {
        Self {
            source,
            target: fence.group,
            ranges: fence.ranges.clone(),
            voters: fence
                .voters
                .iter()
                .map(|r| (r.id, NodeInfo::from(r)))
                .collect(),
            now: fence.at,
        }
    }
}

/// What a seed did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seeded {
    /// The target holds the copy: `kubbis` records, `keys` keys written (aggregates and
    /// ownership included, raft meta not).
    Copied { kubbis: u64, keys: u64 },
    /// The source had already released the ranges (the target was served without this
    /// replica's copy): nothing is left of the target here, and it must start empty and catch up
    /// by snapshot.
    Abandoned,
}

/// The log id a seeded group starts after (see the module doc).
pub fn seed_log_id() -> LogId {
    LogId::new(
        <TypeConfig as RaftTypeConfig>::LeaderId::new_committed(0, 0),
        0,
    )
}

/// Seeds `plan.target` from `plan.source` (see the module doc) and makes it durable.
///
/// # Errors
/// When the source has no fence for the target, when the target already has raft state, or on
/// a storage failure (the seed can then be run again).
pub fn seed(storage: &Storage, plan: &SeedPlan) -> io::Result<Seeded> {
    if super::log_store::has_raft_state(storage, plan.target)? {
        return Err(io_err(format!(
            "group {} already has raft state on this node; not seeding over it",
            plan.target
        )));
    }
    let view = storage.read_view(plan.source);
    let own = view
        .ownership()
        .map_err(io_err)?
        .ok_or_else(|| io_err(format!("group {} has no ownership record", plan.source)))?;
    let fence = own
        .moved
        .iter()
        .find(|m| m.group == plan.target)
        .ok_or_else(|| {
            io_err(format!(
                "group {} has no fence for group {}",
                plan.source, plan.target
            ))
        })?;
    clear(storage, plan.target)?;
    if fence.released {
        storage.db().flush_wal(true).map_err(io_err)?;
        return Ok(Seeded::Abandoned);
    }
    let ranges = fence.ranges.clone();
    let mut copy = Copy {
        storage,
        target: plan.target,
        batch: WriteBatch::default(),
        keys: 0,
    };
    let today = day_of(plan.now);
    let mut totals = Totals::default();
    for &(lo, hi) in &ranges {
        let (from, to) = keys::shard_range(keys::KUBBI, lo, hi);
        view.for_each(Table::State, &from, &to, |k, v| {
            let rec = KubbiRecord::from_value(&v).map_err(io_err)?;
            totals.count(&rec, today);
            copy.put(Table::State, &k, &v)
        })?;
        for table in [
            keys::TOKEN,
            keys::REQUEST,
            keys::CLAIM_IDEM,
            keys::CREATE_IDEM,
        ] {
            let (from, to) = keys::shard_range(table, lo, hi);
            view.for_each(Table::State, &from, &to, |k, v| {
                copy.put(Table::State, &k, &v)
            })?;
        }
        let (from, to) = keys::blob_shard_range(lo, hi);
        view.for_each(Table::Blob, &from, &to, |k, v| {
            copy.put(Table::Blob, &k, &v)
        })?;
    }
    for table in [keys::OWNER, keys::TIMER] {
        view.for_each(Table::State, &[table], &[table + 1], |k, v| {
            if keys::shard_of_key(Table::State, &k).is_some_and(|s| in_ranges(&ranges, s)) {
                copy.put(Table::State, &k, &v)?;
            }
            Ok::<_, io::Error>(())
        })?;
    }

    // The last batch makes it a group: aggregates, ownership, raft and state machine meta.
    if totals.stats != ShardStats::default() {
        copy.put(Table::State, &keys::stats(), &encode(&totals.stats))?;
    }
    for (owner, u) in &totals.usage {
        if u.active > 0 || u.bytes > 0 || u.creates > 0 {
            copy.put(Table::State, &keys::usage(owner), &encode(u))?;
        }
    }
    let own = Ownership::adopting(&ranges).ok_or_else(|| io_err("empty fenced ranges"))?;
    copy.put(Table::State, &keys::ownership(), &encode(&own))?;
    let at = seed_log_id();
    let voters: BTreeSet<NodeId> = plan.voters.keys().copied().collect();
    let membership = openraft::Membership::new(vec![voters], plan.voters.clone())
        .map_err(|e| io_err(format!("seed membership: {e}")))?;
    let membership = StoredMembership::new(Some(at), membership);
    let copied = copy.keys;
    let mut batch = std::mem::take(&mut copy.batch);
    super::state_machine::put_seeded_meta(&mut batch, storage, plan.target, at, &membership);
    super::log_store::put_seeded_meta(&mut batch, storage, plan.target, at);
    storage.db().write(batch).map_err(io_err)?;
    // openraft must find all of it on disk, whatever happens next.
    storage.db().flush_wal(true).map_err(io_err)?;
    Ok(Seeded::Copied {
        kubbis: totals.records,
        keys: copied,
    })
}

/// Deletes every key of `group` in every column family.
fn clear(storage: &Storage, group: GroupId) -> io::Result<()> {
    storage.clear_group(group, false).map_err(io_err)
}

/// Writes copied keys under the target's prefix in bounded batches.
struct Copy<'a> {
    storage: &'a Storage,
    target: GroupId,
    batch: WriteBatch,
    keys: u64,
}

impl Copy<'_> {
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> io::Result<()> {
        self.batch.put_cf(
            self.storage.table_cf(table),
            group_key(self.target, key),
            value,
        );
        self.keys += 1;
        if self.batch.size_in_bytes() >= SEED_BATCH_BYTES {
            self.storage
                .db()
                .write(std::mem::take(&mut self.batch))
                .map_err(io_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ApiKeyId, KubbiId, RequestId, SHARD_SPACE, Shard, TokenHash};
    use crate::state::{
        Blob, Body, ClaimIdempotency, Command, Create, CreateIdempotency, Outcome, Request,
        StoreError, apply,
    };
    use crate::storage::{CF_RAFT_META, CF_STATE, GroupTxn};

    const SOURCE: GroupId = 1;
    const TARGET: GroupId = 2;
    const T0: Millis = 1_800_000_000_000;
    const KEPT: Shard = 3;
    const MOVED: Shard = 0xa001;
    const FENCE: ShardRange = (0x8000, SHARD_SPACE);

    fn run(storage: &Storage, group: GroupId, cmds: Vec<(Millis, Command)>) -> Vec<Outcome> {
        let mut txn = GroupTxn::new(storage, group);
        let outcomes = cmds
            .into_iter()
            .map(|(now, cmd)| {
                let req = Request {
                    request_id: RequestId::random(),
                    now,
                    cmd,
                };
                apply(&mut txn, &req).expect("applies")
            })
            .collect();
        let mut batch = WriteBatch::default();
        txn.write_into(&mut batch);
        storage.db().write(batch).expect("writes");
        outcomes
    }

    fn create(shard: Shard, n: u8, idem: bool) -> Create {
        Create {
            id: KubbiId::new_in_shard(shard),
            owner: ApiKeyId([n % 2; 16]),
            token_hash: TokenHash([n; 32]),
            ttl_ms: 60_000 + u64::from(n),
            max_retrievals: Some(2),
            body: Body::Single {
                content_type: "text/plain".into(),
            },
            metadata: None,
            parts: vec![Blob(vec![n; 100])],
            manifest: None,
            retention_ms: 3_600_000,
            idempotency: idem.then(|| CreateIdempotency {
                key: [n; 32],
                body_hash: [0; 32],
                sealed_token: vec![1; 40],
                window_ms: 86_400_000,
            }),
            quota: None,
        }
    }

    /// A source group holding kubbis of a kept and a moved shard in every state, fenced.
    fn fenced_source(storage: &Storage) {
        let mut cmds = vec![(
            T0,
            Command::Adopt {
                ranges: vec![(0, SHARD_SPACE)],
                map_version: 1,
            },
        )];
        for n in 0..40u8 {
            let c = create(if n % 3 == 0 { KEPT } else { MOVED }, n, n % 4 == 0);
            let (shard, token_hash) = (c.id.shard(), c.token_hash);
            let id = c.id;
            cmds.push((T0 + u64::from(n), Command::Create(Box::new(c))));
            if n % 5 == 0 {
                cmds.push((
                    T0 + 100,
                    Command::ClaimIn {
                        shard,
                        token_hash,
                        idempotency: Some(ClaimIdempotency {
                            key: [n; 32],
                            window_ms: 60_000,
                        }),
                    },
                ));
            }
            if n % 7 == 0 {
                cmds.push((
                    T0 + 200,
                    Command::Delete {
                        id,
                        owner: ApiKeyId([n % 2; 16]),
                    },
                ));
            }
        }
        run(storage, SOURCE, cmds);
        let fenced = run(
            storage,
            SOURCE,
            vec![(
                T0 + 300,
                Command::Split {
                    ranges: vec![FENCE],
                    target: TARGET,
                    map_version: 2,
                    voters: (1..=3)
                        .map(|id| crate::state::Replica {
                            id,
                            internal: format!("10.0.0.{id}:7070"),
                            ..Default::default()
                        })
                        .collect(),
                },
            )],
        );
        assert!(matches!(fenced[0], Outcome::Ownership(_)), "{fenced:?}");
    }

    fn plan() -> SeedPlan {
        SeedPlan {
            source: SOURCE,
            target: TARGET,
            ranges: vec![FENCE],
            voters: (1..=3)
                .map(|i| {
                    (
                        i,
                        NodeInfo {
                            internal: format!("10.0.0.{i}:7070"),
                            ..NodeInfo::default()
                        },
                    )
                })
                .collect(),
            now: T0 + 300,
        }
    }

    /// Every key of `group` in `table`, without the group prefix.
    fn all(storage: &Storage, group: GroupId, table: Table) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let view = storage.read_view(group);
        let mut out = BTreeMap::new();
        view.for_each(table, &[], &[0xff; 64], |k, v| {
            out.insert(k, v);
            Ok::<_, StoreError>(())
        })
        .expect("scans");
        out
    }

    fn open() -> (tempfile::TempDir, std::sync::Arc<Storage>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = Storage::open(dir.path()).expect("opens");
        (dir, storage)
    }

    #[test]
    fn a_seed_is_the_fenced_keys_under_the_new_prefix_with_true_aggregates() {
        let (_dir, storage) = open();
        fenced_source(&storage);
        let Seeded::Copied { kubbis, .. } = seed(&storage, &plan()).expect("seeds") else {
            panic!("not abandoned")
        };
        assert_eq!(
            kubbis, 26,
            "two of every three kubbis are in the moved shard"
        );
        let moved = |k: &Vec<u8>, t: Table| keys::shard_of_key(t, k) == Some(MOVED);
        for t in [Table::State, Table::Blob] {
            let source: BTreeMap<_, _> = all(&storage, SOURCE, t)
                .into_iter()
                .filter(|(k, _)| moved(k, t))
                .collect();
            let target = all(&storage, TARGET, t);
            let (copied, rest): (BTreeMap<_, _>, BTreeMap<_, _>) =
                target.into_iter().partition(|(k, _)| moved(k, t));
            assert_eq!(
                copied, source,
                "{t:?}: exactly the fenced keys, values equal"
            );
            let rest: Vec<u8> = rest.keys().filter_map(|k| k.first().copied()).collect();
            let expected: &[u8] = match t {
                Table::State => b"mmsuuw",
                Table::Blob => b"",
            };
            let mut rest = rest;
            rest.sort_unstable();
            assert_eq!(
                rest, expected,
                "{t:?}: besides them, meta and aggregates only"
            );
        }
        // The aggregates are those of the copied kubbis, as apply keeps them.
        let view = storage.read_view(TARGET);
        let stats = crate::state::read_stats(&view).expect("stats");
        let mut active = (0, 0);
        for v in all(&storage, TARGET, Table::State)
            .iter()
            .filter(|(k, _)| k.first() == Some(&keys::KUBBI))
            .map(|(_, v)| v)
        {
            let rec = KubbiRecord::from_value(v).expect("decodes");
            if !rec.status.is_terminal() {
                active = (active.0 + 1, active.1 + rec.stored_bytes);
            }
        }
        assert_eq!((stats.active, stats.active_bytes), active);
        assert_eq!(
            view.ownership().expect("reads"),
            Ownership::adopting(&[FENCE])
        );
    }

    #[test]
    fn a_seed_run_again_after_a_crash_gives_the_same_group() {
        let (_dir, storage) = open();
        fenced_source(&storage);
        seed(&storage, &plan()).expect("seeds");
        let first = (
            all(&storage, TARGET, Table::State),
            all(&storage, TARGET, Table::Blob),
        );
        // What a seed interrupted half way, or a different earlier attempt, left behind.
        let mut junk = WriteBatch::default();
        junk.put_cf(
            storage.cf(CF_STATE),
            group_key(TARGET, &keys::kubbi(&KubbiId::new_in_shard(MOVED))),
            b"partial",
        );
        storage.db().write(junk).expect("writes");
        seed(&storage, &plan()).expect("seeds again");
        let second = (
            all(&storage, TARGET, Table::State),
            all(&storage, TARGET, Table::Blob),
        );
        assert_eq!(first, second);
    }

    #[test]
    fn a_released_fence_is_abandoned_and_a_live_group_is_never_overwritten() {
        let (_dir, storage) = open();
        fenced_source(&storage);
        run(
            &storage,
            SOURCE,
            vec![(T0 + 400, Command::Release { target: TARGET })],
        );
        assert_eq!(seed(&storage, &plan()).expect("seeds"), Seeded::Abandoned);
        assert!(all(&storage, TARGET, Table::State).is_empty());

        let (_dir, storage) = open();
        fenced_source(&storage);
        storage
            .db()
            .put_cf(
                storage.cf(CF_RAFT_META),
                group_key(TARGET, b"vote"),
                b"voted",
            )
            .expect("writes");
        let err = seed(&storage, &plan()).expect_err("refused");
        assert!(err.to_string().contains("already has raft state"), "{err}");
        assert!(all(&storage, TARGET, Table::State).is_empty());
        // No fence for the target: refused.
        let mut other = plan();
        other.target = 9;
        assert!(seed(&storage, &other).is_err());
    }
}
