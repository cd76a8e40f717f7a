//! Executes [`ShardOp`]s on the groups this node runs. Only a group's leader executes; anyone
//! else answers `NotLeader` with its best leader hint and the caller goes there (one hop).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::ChangeMembers;
use openraft::async_runtime::WatchReceiver;
use ractor::ActorRef;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::actor::{KubbiMsg, ShardCtx, ShardMsg};
use crate::clock::Clock;
use crate::config::millis;
use crate::crypto::MANIFEST_PART;
use crate::ids::{ApiKeyId, GroupId, KubbiId, Millis, SYSTEM_GROUP};
use crate::raft::client::{self, RaftClientError};
use crate::raft::{NodeInfo, Raft};
use crate::service::keys as api_keys;
use crate::state::{
    Blob, Command, KubbiRecord, Outcome, OwnerEntry, OwnerUsage, Ownership, Rejection, Served,
    StateRead, StoreError, Table, claim_of_ended, keys, read_group_time, read_kubbi,
    read_kubbi_by_token, read_nodes, read_owner_usage,
};
use crate::storage::Storage;
use crate::transport::messages::{ExecError, GroupStatus, ShardOp, ShardReply};

/// One group as run on this node.
pub struct LocalGroup {
    pub group: GroupId,
    pub raft: Raft,
    /// The shard's actor registry (kubbi shards only).
    pub actor: Option<ActorRef<ShardMsg>>,
    pub ctx: Option<Arc<ShardCtx>>,
    /// Bytes appended to the group's raft log since this node started (the log's byte budget).
    pub log_bytes: Arc<AtomicU64>,
    /// The group's own loops (sweeper, leadership watch), stopped with the node.
    pub tasks: Vec<JoinHandle<()>>,
}

/// Every group of this node. Groups are added while the node runs (a split's target starts on
/// the replicas that seed it, a moved group on its new replicas) and removed when this node's
/// replica is collected (`node::groups`).
pub struct Executor {
    node_id: u64,
    storage: Arc<Storage>,
    clock: Arc<dyn Clock>,
    groups: RwLock<BTreeMap<GroupId, Arc<LocalGroup>>>,
    quiet: Arc<crate::raft::quiet::Quiet>,
    /// Set when the node begins a planned stop: it hands its groups off and takes none back.
    stopping: std::sync::atomic::AtomicBool,
}

fn from_raft(e: RaftClientError) -> ExecError {
    match e {
        RaftClientError::NotLeader { leader } => ExecError::NotLeader { leader },
        other => ExecError::Unavailable(other.to_string()),
    }
}

fn from_store(e: StoreError) -> ExecError {
    tracing::error!(error = %e, "state read failed");
    ExecError::Internal(e.to_string())
}

/// How long a membership change may take before it is reported unavailable.
const RECONFIGURE_TIMEOUT: Duration = Duration::from_secs(60);

impl Executor {
    pub fn new(
        node_id: u64,
        storage: Arc<Storage>,
        clock: Arc<dyn Clock>,
        groups: Vec<LocalGroup>,
        quiet: Arc<crate::raft::quiet::Quiet>,
    ) -> Self {
        Self {
            node_id,
            storage,
            clock,
            groups: RwLock::new(groups.into_iter().map(|g| (g.group, Arc::new(g))).collect()),
            quiet,
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Marks the node as stopping: [`Executor::is_stopping`] from now on.
    pub fn set_stopping(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the node is in a planned stop (it refuses to be handed any group's leadership).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `lg` from now on; `false` (and `lg` is dropped) when the group already runs here.
    pub fn add(&self, lg: LocalGroup) -> bool {
        let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
        if groups.contains_key(&lg.group) {
            return false;
        }
        groups.insert(lg.group, Arc::new(lg));
        true
    }

    /// Stops running group `g` here (its replica was collected, `node::groups`); the group
    /// taken out, for its owner to stop.
    pub fn remove(&self, g: GroupId) -> Option<Arc<LocalGroup>> {
        self.quiet.remove(g);
        self.groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&g)
    }

    /// Which of this node's groups are quiet (`raft::quiet`).
    pub fn quiet(&self) -> &Arc<crate::raft::quiet::Quiet> {
        &self.quiet
    }

    pub fn group(&self, g: GroupId) -> Option<Arc<LocalGroup>> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&g)
            .cloned()
    }

    /// The groups this node runs, in order.
    pub fn groups(&self) -> Vec<Arc<LocalGroup>> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// What `owner` holds in group `g` as this node's replica has applied it, if it has one.
    pub fn local_usage(&self, g: GroupId, owner: &ApiKeyId) -> Option<OwnerUsage> {
        self.group(g)?;
        read_owner_usage(&self.storage.read_view(g), owner)
            .map_err(|e| tracing::warn!(group = g, error = %e, "cannot read owner usage"))
            .ok()
    }

    /// `Ok` when this node leads `raft`; otherwise `NotLeader` with the known leader.
    fn must_lead(&self, raft: &Raft) -> Result<(), ExecError> {
        // Two fields of the metrics, read in place: a clone of them all (membership, replication
        // progress) allocated on every operation.
        let metrics = raft.metrics();
        let (leader, leading) = {
            let m = metrics.borrow_watched();
            (m.current_leader, m.state.is_leader())
        };
        if leader == Some(self.node_id) && leading {
            Ok(())
        } else {
            Err(ExecError::NotLeader {
                leader: leader.filter(|l| *l != self.node_id),
            })
        }
    }

    /// Runs `op` on group `g` if this node leads it.
    ///
    /// # Errors
    /// See [`ExecError`].
    pub async fn execute(&self, g: GroupId, op: ShardOp) -> Result<ShardReply, ExecError> {
        let span = tracing::debug_span!("kubbi.execute", kubbi.group = g, kubbi.op = op.name());
        tracing::Instrument::instrument(self.execute_inner(g, op), span).await
    }

    async fn execute_inner(&self, g: GroupId, op: ShardOp) -> Result<ShardReply, ExecError> {
        // A proposal of a shard fenced here is answered by the state machine; the router sends
        // it on to the group named.
        match self.execute_op(g, op).await? {
            ShardReply::Outcome(Outcome::Moved { group, map_version }) => {
                Err(ExecError::Moved { group, map_version })
            }
            ShardReply::Outcome(Outcome::Rejected(Rejection::NotOwned)) => Err(ExecError::NotOwned),
            reply => Ok(reply),
        }
    }

    async fn execute_op(&self, g: GroupId, op: ShardOp) -> Result<ShardReply, ExecError> {
        let lg = self.group(g).ok_or(ExecError::NoSuchGroup)?;
        let raft = &lg.raft;
        match op {
            ShardOp::Create { request_id, create } => {
                let outcome =
                    client::propose(raft, &*self.clock, request_id, Command::Create(create))
                        .await
                        .map_err(from_raft)?;
                if let (Outcome::Created(record), Some(actor), Some(ctx)) =
                    (&outcome, &lg.actor, &lg.ctx)
                    && record.expires_at <= self.clock.now().saturating_add(millis(ctx.idle))
                {
                    // Its own timer would fire before it passivates: activate it now. Later
                    // deadlines wait in the shard's timer index.
                    let _ = actor.send_message(ShardMsg::Activate {
                        record: record.clone(),
                    });
                }
                Ok(ShardReply::Outcome(outcome))
            }
            ShardOp::Claim {
                request_id,
                shard,
                token_hash,
                idempotency,
            } => {
                self.must_lead(raft)?;
                let view = self.storage.read_view(g);
                serves(&view, shard)?;
                let read = |view| read_kubbi_by_token(&view, shard, &token_hash);
                let record = match read(view).map_err(from_store)? {
                    Some(r) => Some(r),
                    None => {
                        // Maybe created a moment ago and not applied here yet.
                        client::linearizable(raft).await.map_err(from_raft)?;
                        read(self.storage.read_view(g)).map_err(from_store)?
                    }
                };
                let Some(record) = record else {
                    return Ok(ShardReply::Outcome(Outcome::Rejected(Rejection::NotFound)));
                };
                if idempotency.is_none() && record.status.is_terminal() {
                    // Answered here as its actor would answer, without waking an actor for a
                    // claim that cannot change anything.
                    let view = self.storage.read_view(g);
                    let answer =
                        claim_of_ended(&view, shard, &request_id, Some(&record), record.status)
                            .map_err(from_store)?;
                    return Ok(ShardReply::Outcome(answer));
                }
                self.route(&lg, record.id, Some(record), |reply| KubbiMsg::Claim {
                    request_id,
                    idempotency,
                    reply,
                    span: tracing::Span::current(),
                })
                .await
            }
            ShardOp::Delete {
                request_id,
                id,
                owner,
            } => {
                self.must_lead(raft)?;
                serves(&self.storage.read_view(g), id.shard())?;
                self.route(&lg, id, None, |reply| KubbiMsg::Delete {
                    request_id,
                    owner,
                    reply,
                    span: tracing::Span::current(),
                })
                .await
            }
            ShardOp::ByToken {
                shard,
                token_hash,
                with_manifest,
            } => {
                client::linearizable(raft).await.map_err(from_raft)?;
                let view = self.storage.read_view(g);
                serves(&view, shard)?;
                let Some(record) =
                    read_kubbi_by_token(&view, shard, &token_hash).map_err(from_store)?
                else {
                    return Ok(ShardReply::Record(None));
                };
                let mut judged = [record];
                let view = self.judge(raft, g, view, &mut judged).await?;
                let [record] = judged;
                let manifest = if with_manifest && record.has_manifest {
                    view.get(Table::Blob, &keys::blob(&record.id, MANIFEST_PART))
                        .map_err(from_store)?
                        .map(Blob)
                } else {
                    None
                };
                Ok(ShardReply::Record(Some((record.without_tail(), manifest))))
            }
            ShardOp::Get { ids } => {
                client::linearizable(raft).await.map_err(from_raft)?;
                let view = self.storage.read_view(g);
                let mut found = Vec::with_capacity(ids.len());
                let own = view.ownership().map_err(from_store)?;
                for id in &ids {
                    match Ownership::serves(own.as_ref(), id.shard()) {
                        Served::Here => {}
                        // One moved away is read where it went (the router follows).
                        Served::Moved { group, map_version } => {
                            return Err(ExecError::Moved { group, map_version });
                        }
                        // Not this group's: another group answers for it.
                        Served::NotOwned => continue,
                    }
                    if let Some(r) = read_kubbi(&view, id).map_err(from_store)? {
                        // Answers carry no tail, whether they stay here or not.
                        found.push(r.without_tail());
                    }
                }
                self.judge(raft, g, view, &mut found).await?;
                Ok(ShardReply::Records(found))
            }
            ShardOp::OwnerEntries { owner } => {
                client::linearizable(raft).await.map_err(from_raft)?;
                let view = self.storage.read_view(g);
                let prefix = keys::owner_prefix(&owner);
                let rows = view
                    .scan(
                        Table::State,
                        &prefix,
                        &keys::prefix_end(&prefix),
                        usize::MAX,
                    )
                    .map_err(from_store)?;
                let own = view.ownership().map_err(from_store)?;
                // Each status as a reader must see it, judged at the group's time as claims and
                // previews are (never by the clock of the node that asked).
                let now = self.group_now(&view)?;
                let entries = rows
                    .iter()
                    .map(|(k, v)| {
                        let mut e = OwnerEntry::decode(k, v).ok_or_else(|| {
                            ExecError::Internal("undecodable owner index entry".into())
                        })?;
                        e.status = e.status_at(now);
                        Ok(e)
                    })
                    // A range fenced here is listed by the group it moved to (both hold its
                    // keys until the release).
                    .filter(|e| {
                        e.as_ref().map_or(true, |e| {
                            Ownership::serves(own.as_ref(), e.id.shard()) == Served::Here
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(ShardReply::OwnerEntries(entries))
            }
            ShardOp::Propose { request_id, cmd } => {
                let outcome = client::propose(raft, &*self.clock, request_id, cmd)
                    .await
                    .map_err(from_raft)?;
                Ok(ShardReply::Outcome(outcome))
            }
            ShardOp::ReadSystem => {
                if g != SYSTEM_GROUP {
                    return Err(ExecError::NoSuchGroup);
                }
                client::linearizable(raft).await.map_err(from_raft)?;
                let view = self.storage.read_view(g);
                Ok(ShardReply::System {
                    keys: api_keys::read_all(&view).map_err(from_store)?,
                    nodes: read_nodes(&view).map_err(from_store)?,
                })
            }
            ShardOp::Usage { owner } => {
                self.must_lead(raft)?;
                let view = self.storage.read_view(g);
                Ok(ShardReply::Usage(
                    read_owner_usage(&view, &owner).map_err(from_store)?,
                ))
            }
            ShardOp::Status => Ok(ShardReply::Status(self.status(g).unwrap_or_default())),
            ShardOp::Reconfigure { voters, learners } => {
                self.must_lead(raft)?;
                tokio::time::timeout(RECONFIGURE_TIMEOUT, reconfigure(raft, voters, learners))
                    .await
                    .map_err(|_| ExecError::Unavailable("membership change timed out".into()))??;
                Ok(ShardReply::Done)
            }
            ShardOp::TransferLeader { to } => {
                self.must_lead(raft)?;
                raft.trigger()
                    .transfer_leader(to)
                    .await
                    .map_err(|e| ExecError::Unavailable(e.to_string()))?;
                Ok(ShardReply::Done)
            }
        }
    }

    /// This node's view of group `g`.
    pub fn status(&self, g: GroupId) -> Option<GroupStatus> {
        let lg = self.group(g)?;
        let m = lg.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        Some(GroupStatus {
            group: g,
            leader: m.current_leader,
            term: m.current_term,
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            nodes: membership.nodes().map(|(id, n)| (*id, n.clone())).collect(),
            last_applied: m.last_applied.map(|l| l.index),
            last_log: m.last_log_index,
            matched: m
                .replication
                .as_ref()
                .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index))).collect())
                .unwrap_or_default(),
            quiet: self.quiet.is_quiet(g),
        })
    }

    /// The time a read on `view` judges expiry by: this (leading) node's clock, or the group's
    /// time when an earlier leader's clock ran ahead (the group's time never goes back, see
    /// `state::apply`), so a read never calls active what the group already saw expire.
    fn group_now(&self, view: &impl StateRead) -> Result<Millis, ExecError> {
        Ok(self
            .clock
            .now()
            .max(read_group_time(view).map_err(from_store)?))
    }

    /// Sets the status of `records` (read from `view`) as a reader must see it now, judged at
    /// the group's time as claims are (a node with a skewed clock must not call a kubbi expired
    /// that the leader would still let be claimed). The expiry of a kubbi found past its
    /// deadline is recorded before the read answers `expired`: the answer is then part of the
    /// group's history, and no later claim, through whichever leader with whichever clock, can
    /// succeed where this read said expired. Returns the view to read the rest of the answer
    /// from (a fresh one when expiries were recorded).
    async fn judge<'s>(
        &'s self,
        raft: &Raft,
        g: GroupId,
        view: crate::storage::ReadView<'s>,
        records: &mut [KubbiRecord],
    ) -> Result<crate::storage::ReadView<'s>, ExecError> {
        let now = self.group_now(&view)?;
        let past: Vec<KubbiId> = records
            .iter()
            .filter(|r| r.is_past_deadline(now))
            .map(|r| r.id)
            .collect();
        let mut view = view;
        if !past.is_empty() {
            for id in &past {
                let expire = Command::Expire { id: *id };
                client::propose(raft, &*self.clock, crate::ids::RequestId::random(), expire)
                    .await
                    .map_err(from_raft)?;
            }
            view = self.storage.read_view(g);
            for r in records.iter_mut().filter(|r| past.contains(&r.id)) {
                if let Some(fresh) = read_kubbi(&view, &r.id).map_err(from_store)? {
                    *r = fresh;
                }
            }
        }
        for r in records.iter_mut() {
            r.status = r.status_at(now);
        }
        Ok(view)
    }

    async fn route(
        &self,
        lg: &LocalGroup,
        id: KubbiId,
        mut record: Option<KubbiRecord>,
        make: impl Fn(crate::actor::KubbiReply) -> KubbiMsg,
    ) -> Result<ShardReply, ExecError> {
        let actor = lg.actor.as_ref().ok_or(ExecError::NoSuchGroup)?;
        // A reply port dropped unanswered means the actor stopped mid-way: route once more
        // (then the fresh actor reads the record itself: this one may be out of date).
        for _ in 0..2 {
            let (tx, rx) = oneshot::channel();
            actor
                .send_message(ShardMsg::Route {
                    id,
                    msg: make(tx),
                    record: record.take(),
                })
                .map_err(|_| ExecError::Unavailable("the shard actor is not running".into()))?;
            if let Ok(r) = rx.await {
                return r.map(ShardReply::Outcome).map_err(from_raft);
            }
        }
        Err(ExecError::Unavailable("the kubbi's actor stopped".into()))
    }

    /// Kubbi actors this node has started since it started.
    pub fn actor_activations(&self) -> u64 {
        self.groups()
            .iter()
            .filter_map(|lg| lg.ctx.as_ref())
            .map(|c| c.activations.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// Number of live kubbi actors on this node.
    pub async fn live_actors(&self) -> usize {
        let mut n = 0;
        for lg in self.groups() {
            if let Some(a) = &lg.actor {
                let (tx, rx) = oneshot::channel();
                if a.send_message(ShardMsg::LiveActors(tx)).is_ok() {
                    n += rx.await.unwrap_or(0);
                }
            }
        }
        n
    }
}

/// `Ok` when the group of `view` serves `shard`; otherwise where it went, or that it is not
/// this group's (a read must never answer "not found" for a kubbi that moved).
fn serves(view: &impl StateRead, shard: crate::ids::Shard) -> Result<(), ExecError> {
    match Ownership::serves(view.ownership().map_err(from_store)?.as_ref(), shard) {
        Served::Here => Ok(()),
        Served::Moved { group, map_version } => Err(ExecError::Moved { group, map_version }),
        Served::NotOwned => Err(ExecError::NotOwned),
    }
}

/// Moves a group to `voters` (and `learners`): new members join as learners and catch up
/// first, then one joint-consensus change swaps the voter set; stale learners are dropped.
async fn reconfigure(
    raft: &Raft,
    voters: BTreeMap<u64, NodeInfo>,
    learners: BTreeMap<u64, NodeInfo>,
) -> Result<(), ExecError> {
    // A membership change needs the leader's lease, which a quiet group's leader has let run out.
    client::renew_lease(raft).await.map_err(from_raft)?;
    let m = raft.metrics().borrow_watched().clone();
    let membership = m.membership_config.membership();
    let known: BTreeSet<u64> = membership.nodes().map(|(id, _)| *id).collect();
    for (id, info) in voters.iter().chain(learners.iter()) {
        if !known.contains(id) {
            // Blocking: returns once the learner has caught up with the leader's log.
            raft.add_learner(*id, info.clone(), true)
                .await
                .map_err(|e| ExecError::Unavailable(format!("add learner {id}: {e}")))?;
        }
    }
    let current: BTreeSet<u64> = membership.voter_ids().collect();
    let target: BTreeSet<u64> = voters.keys().copied().collect();
    if current != target {
        raft.change_membership(ChangeMembers::ReplaceAllVoters(target.clone()), false)
            .await
            .map_err(|e| ExecError::Unavailable(format!("change voters: {e}")))?;
    }
    let m = raft.metrics().borrow_watched().clone();
    let stale: BTreeSet<u64> = m
        .membership_config
        .membership()
        .learner_ids()
        .filter(|id| !learners.contains_key(id) && !target.contains(id))
        .collect();
    if !stale.is_empty() {
        raft.change_membership(ChangeMembers::RemoveNodes(stale), false)
            .await
            .map_err(|e| ExecError::Unavailable(format!("remove learners: {e}")))?;
    }
    Ok(())
}
