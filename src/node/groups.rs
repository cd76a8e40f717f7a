//! Which raft groups this node runs, and starting one while the node runs
//! (`docs/shard-map-plan.md` §3.9, step 6; the seed of a split, §3.6 step 3).
//!
//! A node runs the system group and the data groups of its shard map, with one exception: a
//! group the map lists as being made by a split (`GroupState::Splitting`) starts here only once
//! this node can start it right:
//!
//! - this node's replica of the source applied the fence and this node is one of the fence's
//!   voters: it first **seeds** the new group from its own copy of the fenced keys
//!   (`raft::seed`), then starts it; the seeded voters elect a leader among themselves. When
//!   the fence says the source already released the ranges, the seed only clears what an
//!   interrupted seed left, and the group starts empty;
//! - this node is not one of the fence's voters: it starts the group empty, and the group's
//!   leader sends it a snapshot when it is a member;
//! - the group already has raft state here (a vote or log entries): it starts as it is.
//!
//! Any other group starts here when the map places it here (its desired replicas name this
//! node), empty: its leader adds this node as a learner and sends it a snapshot. A group the
//! map places elsewhere does not run here. [`groups_loop`] looks for groups to start every
//! [`CHECK_EVERY`] and whenever the map changes, so a split's target starts within moments of
//! the fence applying here, and a node restarted mid-split seeds at boot.
//!
//! [`collect_loop`] stops a data group's replica here and deletes its keys once neither the
//! map nor the group's committed membership names this node (a move took it away; §3.9's
//! GC). Never earlier: a voter that forgot its log could help elect a leader without the
//! entries it had acknowledged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use ractor::Actor;

use crate::actor::{ShardActor, ShardCtx};
use crate::clock::Clock;
use crate::ids::{GroupId, SYSTEM_GROUP};
use crate::raft::quiet::Quiet;
use crate::raft::seed::{SeedPlan, Seeded, seed};
use crate::raft::state_machine::ApplyObserver;
use crate::raft::{LogStore, Raft, StateMachine};
use crate::service::{Executor, LocalGroup, MapCache, Service};
use crate::state::MovedRanges;
use crate::state::map::{GroupState, ShardMap};
use crate::storage::Storage;
use crate::transport::Peers;
use crate::transport::messages::GroupStatus;
use crate::transport::raft_network::NetworkFactory;

use super::NodeError;

/// How often [`groups_loop`] looks for groups to start when the map did not change.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How often [`collect_loop`] looks for replicas to collect.
const COLLECT_EVERY: Duration = Duration::from_secs(3);

/// Everything it takes to run one more group on this node.
pub(super) struct GroupStarter {
    pub me: u64,
    pub rcfg: Arc<openraft::Config>,
    pub storage: Arc<Storage>,
    pub peers: Option<Peers>,
    pub observer: Arc<dyn ApplyObserver>,
    pub clock: Arc<dyn Clock>,
    pub actor_idle: Duration,
    pub quiet: Arc<Quiet>,
    pub exec: Arc<Executor>,
    /// Held while groups start or are collected, so a group is never started from keys being
    /// deleted.
    pub registry: Arc<tokio::sync::Mutex<()>>,
}

impl GroupStarter {
    /// Starts group `g` here from whatever its storage holds: its raft core, its sweeper and,
    /// for a data group, its kubbi actors and their leadership watch. (Boxed: raft's start-up
    /// future is deep, and the node's start awaits this inside its own.)
    pub fn start(&self, g: GroupId) -> futures::future::BoxFuture<'_, Result<(), NodeError>> {
        Box::pin(self.start_inner(g))
    }

    async fn start_inner(&self, g: GroupId) -> Result<(), NodeError> {
        if self.exec.group(g).is_some() {
            return Ok(());
        }
        let log = LogStore::new(self.storage.clone(), g);
        let log_bytes = log.appended_bytes();
        let raft = Raft::new(
            self.me,
            self.rcfg.clone(),
            NetworkFactory::new(
                g,
                self.peers.clone(),
                Duration::from_millis(self.rcfg.election_timeout_min),
            ),
            log,
            StateMachine::new(self.storage.clone(), g, self.observer.clone()),
        )
        .await
        .map_err(|e| NodeError::Raft(format!("group {g}: {e}")))?;
        let mut tasks = vec![tokio::spawn(super::sweep_loop(
            self.me,
            g,
            raft.clone(),
            self.storage.clone(),
            self.clock.clone(),
        ))];
        let (actor, ctx) = if g == SYSTEM_GROUP {
            (None, None)
        } else {
            let ctx = Arc::new(ShardCtx {
                group: g,
                raft: raft.clone(),
                storage: self.storage.clone(),
                clock: self.clock.clone(),
                idle: self.actor_idle,
                activations: AtomicU64::new(0),
            });
            let (actor, _) = Actor::spawn(None, ShardActor, ctx.clone())
                .await
                .map_err(|e| NodeError::Raft(format!("cannot start shard actor {g}: {e}")))?;
            tasks.push(tokio::spawn(super::leadership_watch(
                self.me,
                raft.clone(),
                actor.clone(),
            )));
            (Some(actor), Some(ctx))
        };
        self.quiet.add(g, raft.clone());
        self.exec.add(LocalGroup {
            group: g,
            raft,
            actor,
            ctx,
            log_bytes,
            tasks,
        });
        Ok(())
    }
}

/// What to do about a group of the map that does not run here yet.
#[derive(Debug, Clone)]
pub(super) enum Plan {
    /// Start it from its storage as it is.
    Start,
    /// Seed it from this node's copy of the source's fenced keys, then start it.
    Seed(SeedPlan),
    /// Not here, or not yet: the map does not place it here, or it is being split off a group
    /// whose fence has not applied here.
    Wait,
}

/// The fence for `target` in the ownership record of one of `map`'s groups on this node.
fn fence_for(
    storage: &Storage,
    map: &ShardMap,
    target: GroupId,
) -> Result<Option<(GroupId, MovedRanges)>, NodeError> {
    for &g in map.groups.keys().filter(|g| **g != target) {
        let own = crate::state::read_ownership(&storage.read_view(g))?;
        if let Some(m) = own.and_then(|o| o.moved.into_iter().find(|m| m.group == target)) {
            return Ok(Some((g, m)));
        }
    }
    Ok(None)
}

/// How this node should start group `g` of `map` (module doc).
pub(super) fn plan(
    storage: &Storage,
    map: &ShardMap,
    g: GroupId,
    me: u64,
) -> Result<Plan, NodeError> {
    let own_state = crate::raft::log_store::has_raft_state(storage, g)
        .map_err(|e| NodeError::Raft(format!("group {g}: {e}")))?;
    if own_state {
        return Ok(Plan::Start);
    }
    let entry = map.groups.get(&g);
    let splitting = entry.is_some_and(|e| matches!(e.state, GroupState::Splitting { .. }));
    let wanted = entry.is_some_and(|e| e.replicas.contains(&me));
    match fence_for(storage, map, g)? {
        // A voter seeds; the seed itself finds a released fence and then clears whatever an
        // interrupted seed left, so the group starts empty.
        Some((source, fence)) if fence.voters.iter().any(|v| v.id == me) => {
            Ok(Plan::Seed(SeedPlan::of_fence(source, &fence)))
        }
        None if splitting => Ok(Plan::Wait),
        // Empty, to be sent a snapshot: only where the map places it.
        Some(_) | None if wanted => Ok(Plan::Start),
        Some(_) | None => Ok(Plan::Wait),
    }
}

/// Carries out `plan` for group `g`; whether the group runs afterwards.
pub(super) async fn carry_out(
    starter: &GroupStarter,
    g: GroupId,
    plan: Plan,
) -> Result<bool, NodeError> {
    match plan {
        Plan::Wait => return Ok(false),
        Plan::Start => {}
        Plan::Seed(p) => {
            let storage = starter.storage.clone();
            let started = std::time::Instant::now();
            let done = tokio::task::spawn_blocking(move || seed(&storage, &p))
                .await
                .map_err(|e| NodeError::Raft(format!("seed task of group {g}: {e}")))?
                .map_err(|e| NodeError::Raft(format!("seeding group {g}: {e}")))?;
            match done {
                Seeded::Copied { kubbis, keys } => tracing::info!(
                    group = g,
                    kubbis,
                    keys,
                    ms = started.elapsed().as_millis() as u64,
                    "seeded a split's new group from this node's copy"
                ),
                Seeded::Abandoned => tracing::info!(
                    group = g,
                    "the split's source already released its ranges: the new group starts \
                     empty here and catches up by snapshot"
                ),
            }
        }
    }
    starter.start(g).await?;
    Ok(true)
}

/// The data groups of `map` that do not run here yet, each with its plan.
pub(super) fn pending(
    starter: &GroupStarter,
    map: &ShardMap,
) -> Result<BTreeMap<GroupId, Plan>, NodeError> {
    let mut out = BTreeMap::new();
    for &g in map.groups.keys() {
        if starter.exec.group(g).is_none() {
            out.insert(g, plan(&starter.storage, map, g, starter.me)?);
        }
    }
    Ok(out)
}

/// Starts the map's groups as they become startable here (module doc).
pub(super) async fn groups_loop(starter: Arc<GroupStarter>, map: Arc<MapCache>) {
    let mut changed = map.subscribe();
    loop {
        let current = map.get();
        let _serial = starter.registry.lock().await;
        match pending(&starter, &current) {
            Ok(plans) => {
                for (g, p) in plans {
                    if let Err(e) = carry_out(&starter, g, p).await {
                        tracing::warn!(group = g, error = %e, "cannot start a group yet");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot tell which groups to start"),
        }
        let _ = tokio::time::timeout(CHECK_EVERY, changed.changed()).await;
    }
}

/// How a group's leader last showed this node out of the group (see [`collect_loop`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Excluded {
    leader: u64,
    term: u64,
    last_log: u64,
}

/// Whether `st`, as node `from` answered it, shows `from` leading a membership without `me`.
fn excludes(st: &GroupStatus, from: u64, me: u64) -> Option<Excluded> {
    let leader = st.leader.filter(|l| *l == from && *l != me)?;
    let member = st.voters.contains(&me) || st.learners.contains(&me);
    (!member).then_some(Excluded {
        leader,
        term: st.term,
        last_log: st.last_log.unwrap_or(0),
    })
}

/// Collects this node's replicas that nobody needs (module doc): a data group runs here, the
/// map places it elsewhere, and its leader (asked directly: a stale replica here knows no
/// better) shows a membership without this node twice, the second time with everything it had
/// logged the first time applied, so the membership that took this node out is committed.
/// Not while a split is under way (a source's replica here may be a fence's copy to seed
/// from).
pub(super) async fn collect_loop(service: Service, starter: Arc<GroupStarter>) {
    let me = starter.me;
    let mut seen: BTreeMap<GroupId, Excluded> = BTreeMap::new();
    loop {
        tokio::time::sleep(COLLECT_EVERY).await;
        let map = service.shard_map();
        if map.groups.values().any(|e| !e.state.is_active()) {
            seen.clear();
            continue;
        }
        let mut next = BTreeMap::new();
        for lg in starter.exec.groups() {
            let g = lg.group;
            drop(lg);
            let Some(entry) = map.groups.get(&g) else {
                continue;
            };
            if g == SYSTEM_GROUP || entry.replicas.contains(&me) {
                continue;
            }
            let mut shown = None;
            for &node in &entry.replicas {
                if let Ok(st) = service.router().status_at(node, g).await
                    && let Some(x) = excludes(&st, node, me)
                {
                    shown = Some((x, st.last_applied.unwrap_or(0)));
                    break;
                }
            }
            let Some((now, applied)) = shown else {
                continue;
            };
            match seen.get(&g) {
                Some(before)
                    if before.leader == now.leader
                        && before.term == now.term
                        && applied >= before.last_log =>
                {
                    if let Err(e) = collect(&starter, &service, g).await {
                        tracing::warn!(group = g, error = %e, "cannot collect a replica");
                    }
                }
                _ => {
                    next.insert(g, now);
                }
            }
        }
        seen = next;
    }
}

/// Stops this node's replica of group `g` and deletes its keys, unless the map has placed
/// the group here again meanwhile.
async fn collect(starter: &GroupStarter, service: &Service, g: GroupId) -> Result<(), NodeError> {
    let _serial = starter.registry.lock().await;
    let wanted = service
        .shard_map()
        .groups
        .get(&g)
        .is_none_or(|e| e.replicas.contains(&starter.me));
    if wanted {
        return Ok(());
    }
    let Some(lg) = starter.exec.remove(g) else {
        return Ok(());
    };
    for t in &lg.tasks {
        t.abort();
    }
    if let Some(a) = &lg.actor {
        let _ = a.stop_and_wait(None, Some(Duration::from_secs(5))).await;
    }
    let _ = lg.raft.shutdown().await;
    drop(lg);
    let storage = starter.storage.clone();
    tokio::task::spawn_blocking(move || storage.clear_group(g, true))
        .await
        .map_err(|e| NodeError::Raft(format!("collecting group {g}: {e}")))?
        .map_err(|e| NodeError::Raft(format!("collecting group {g}: {e}")))?;
    tracing::info!(
        group = g,
        "collected this node's replica of a group placed elsewhere: stopped, keys deleted"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{RequestId, SHARD_SPACE};
    use crate::state::{Command, Outcome, Replica, Request, apply};
    use crate::storage::GroupTxn;

    const SOURCE: GroupId = 0;
    const TARGET: GroupId = 1;
    const HALF: u32 = SHARD_SPACE / 2;

    fn run(storage: &Storage, cmd: Command) -> Outcome {
        let mut txn = GroupTxn::new(storage, SOURCE);
        let out = apply(
            &mut txn,
            &Request {
                request_id: RequestId::random(),
                now: 1_800_000_000_000,
                cmd,
            },
        )
        .expect("applies");
        let mut batch = rocksdb::WriteBatch::default();
        txn.write_into(&mut batch);
        storage.db().write(batch).expect("writes");
        out
    }

    /// The map while `TARGET` is being split off `SOURCE` (routing unchanged).
    fn splitting() -> ShardMap {
        let mut map = ShardMap::first(1, |_| vec![1, 2, 3]);
        map.groups.insert(
            TARGET,
            crate::state::map::GroupEntry {
                replicas: vec![1, 2],
                state: GroupState::Splitting {
                    from: SOURCE,
                    ranges: vec![(HALF as u16, SHARD_SPACE)],
                },
            },
        );
        map.next_group = 2;
        map
    }

    #[test]
    fn a_split_target_waits_for_its_fence_then_voters_seed_and_others_start_empty() {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = Storage::open(dir.path()).expect("opens");
        let map = splitting();
        // Before the fence applied here: the target must not start (an empty start would
        // race the seed for its storage).
        assert!(matches!(plan(&storage, &map, TARGET, 1), Ok(Plan::Wait)));
        // An active group starts as it is.
        assert!(matches!(plan(&storage, &map, SOURCE, 1), Ok(Plan::Start)));
        run(
            &storage,
            Command::Adopt {
                ranges: vec![(0, SHARD_SPACE)],
                map_version: 1,
            },
        );
        let voter = |id| Replica {
            id,
            internal: format!("10.0.0.{id}:7070"),
            ..Replica::default()
        };
        let fenced = run(
            &storage,
            Command::Split {
                ranges: vec![(HALF as u16, SHARD_SPACE)],
                target: TARGET,
                map_version: 2,
                voters: vec![voter(1), voter(2)],
            },
        );
        assert!(matches!(fenced, Outcome::Ownership(_)), "{fenced:?}");
        match plan(&storage, &map, TARGET, 2) {
            Ok(Plan::Seed(p)) => {
                assert_eq!((p.source, p.target), (SOURCE, TARGET));
                assert_eq!(p.ranges, vec![(HALF as u16, SHARD_SPACE)]);
                assert_eq!(p.voters.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
                assert_eq!(p.voters[&2].internal, "10.0.0.2:7070");
            }
            other => panic!("a voter seeds: {other:?}"),
        }
        // Not a voter of the fence: starts empty and waits for a snapshot where the map
        // places the group, and not at all elsewhere.
        assert!(matches!(plan(&storage, &map, TARGET, 3), Ok(Plan::Wait)));
        let mut placed_on_3 = map.clone();
        if let Some(e) = placed_on_3.groups.get_mut(&TARGET) {
            e.replicas = vec![1, 2, 3];
        }
        assert!(matches!(
            plan(&storage, &placed_on_3, TARGET, 3),
            Ok(Plan::Start)
        ));
        assert!(matches!(plan(&storage, &map, SOURCE, 4), Ok(Plan::Wait)));
        // Once seeded and elected (a vote of its own) it starts as it is, never seeded again.
        let p = match plan(&storage, &map, TARGET, 1) {
            Ok(Plan::Seed(p)) => p,
            other => panic!("{other:?}"),
        };
        seed(&storage, &p).expect("seeds");
        storage
            .db()
            .put_cf(
                storage.cf(crate::storage::CF_RAFT_META),
                crate::storage::group_key(TARGET, b"vote"),
                b"x",
            )
            .expect("writes");
        assert!(matches!(plan(&storage, &map, TARGET, 1), Ok(Plan::Start)));
    }
}
