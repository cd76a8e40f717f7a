//! Sends each operation to its group's leader: here, or one hop away over the internal port.
//!
//! ```text
//!   call(group, op) ─▶ best guess ─▶ execute here, or forward (`Call::Shard`) there
//!                          ▲              │ NotLeader{hint} ─▶ follow the hint
//!                          └──────────────┘ unreachable / no leader yet ─▶ next candidate, backoff
//! ```
//!
//! Retries reuse the operation as it was (same request id), so a retried write applies at most
//! once whatever happened to the earlier attempt.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;

use super::exec::Executor;
use super::map_cache::MapCache;
use crate::codec::encode;
use crate::error::{ApiError, ErrorCode};
use crate::ids::GroupId;
use crate::shard::{Candidate, replicas};
use crate::state::{NodeRecord, NodeState};
use crate::transport::messages::{ExecError, GroupStatus, ShardOp, ShardReply};
use crate::transport::stream::Call;
use crate::transport::{Lane, Peers, TransportError};

/// How long one operation keeps looking for its leader (elections take about a second).
const ROUTE_PATIENCE: Duration = Duration::from_secs(8);
/// How long one forwarded attempt may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// What this node believes about leaders and members.
#[derive(Default)]
pub struct Directory {
    leaders: RwLock<HashMap<GroupId, u64>>,
    nodes: RwLock<BTreeMap<u64, NodeRecord>>,
}

impl Directory {
    pub fn set_leader(&self, g: GroupId, node: u64) {
        self.leaders
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(g, node);
    }

    pub fn leader(&self, g: GroupId) -> Option<u64> {
        self.leaders
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&g)
            .copied()
    }

    pub fn set_nodes(&self, nodes: Vec<NodeRecord>) {
        *self.nodes.write().unwrap_or_else(|p| p.into_inner()) =
            nodes.into_iter().map(|n| (n.id, n)).collect();
    }

    pub fn nodes(&self) -> Vec<NodeRecord> {
        self.nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Routes operations to group leaders.
pub struct Router {
    me: u64,
    exec: Arc<Executor>,
    peers: Option<Peers>,
    directory: Arc<Directory>,
    map: Arc<MapCache>,
    replication_factor: usize,
}

impl Router {
    pub fn new(
        exec: Arc<Executor>,
        peers: Option<Peers>,
        directory: Arc<Directory>,
        map: Arc<MapCache>,
        replication_factor: usize,
    ) -> Self {
        Self {
            me: exec.node_id(),
            exec,
            peers,
            directory,
            map,
            replication_factor,
        }
    }

    /// How many replicas a data group has (fewer while the cluster has fewer nodes).
    pub fn replication_factor(&self) -> usize {
        self.replication_factor
    }

    pub fn executor(&self) -> &Arc<Executor> {
        &self.exec
    }

    pub fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }

    pub fn peers(&self) -> Option<&Peers> {
        self.peers.as_ref()
    }

    /// Group `g` as node `node` sees it (not routed: that node answers, leader or not).
    ///
    /// # Errors
    /// When the node cannot be reached or does not answer.
    pub async fn status_at(&self, node: u64, g: GroupId) -> Result<GroupStatus, ApiError> {
        let reply = match &self.peers {
            Some(peers) if node != self.me => peers
                .call::<Result<ShardReply, ExecError>>(
                    node,
                    Call::Shard(g),
                    &encode(&ShardOp::Status),
                    FORWARD_TIMEOUT,
                    Lane::BySize,
                )
                .await
                .map_err(|e| ApiError::unavailable(e.to_string()))?,
            _ => self.exec.execute(g, ShardOp::Status).await,
        };
        match reply {
            Ok(ShardReply::Status(st)) => Ok(st),
            Ok(_) => Err(ApiError::internal()),
            Err(e) => Err(ApiError::unavailable(e.to_string())),
        }
    }

    /// One of `groups` this node leads, as far as the directory knows, chosen at random;
    /// `None` when it leads none. A new kubbi placed there needs no forwarding hop.
    pub fn local_leader_group(&self, groups: impl IntoIterator<Item = GroupId>) -> Option<GroupId> {
        let led: Vec<GroupId> = {
            let leaders = self
                .directory
                .leaders
                .read()
                .unwrap_or_else(|p| p.into_inner());
            groups
                .into_iter()
                .filter(|g| leaders.get(g) == Some(&self.me))
                .collect()
        };
        (!led.is_empty()).then(|| led[rand::random_range(0..led.len())])
    }

    /// Where to look for the leader of `g`, best guess first.
    fn candidates(&self, g: GroupId) -> Vec<u64> {
        let mut out = Vec::new();
        let mut push = |id: u64| {
            if !out.contains(&id) {
                out.push(id);
            }
        };
        if let Some(l) = self.directory.leader(g) {
            push(l);
        }
        if let Some(lg) = self.exec.group(g) {
            let m = lg.raft.metrics().borrow_watched().clone();
            if let Some(l) = m.current_leader {
                push(l);
            }
            for v in m.membership_config.membership().voter_ids() {
                push(v);
            }
        }
        // Where the shard map places a data group (its preferred leader first); the system group
        // places itself by rendezvous over the members.
        let active: Vec<Candidate> = self
            .directory
            .nodes()
            .into_iter()
            .filter(|n| n.state != NodeState::Removed)
            .map(|n| Candidate {
                id: n.id,
                zone: n.zone,
            })
            .collect();
        let placed = self.map.get().groups.get(&g).map(|e| e.replicas.clone());
        for id in placed.unwrap_or_else(|| replicas(g, &active, 5)) {
            push(id);
        }
        for n in &active {
            push(n.id);
        }
        push(self.me);
        out
    }

    /// The node to try first for group `g`: the known leader, else the best candidate (then
    /// left in `candidates` for the retries).
    fn first_guess(&self, g: GroupId, candidates: &mut Vec<u64>) -> u64 {
        match self.directory.leader(g) {
            Some(l) => l,
            None => {
                *candidates = self.candidates(g);
                candidates.first().copied().unwrap_or(self.me)
            }
        }
    }

    /// Resolves with the new leader once this node's replica of group `g` sees a leader other
    /// than `target` under a newer vote than the current one (an election); never, where this
    /// node holds no replica of `g`. Watches openraft's server metrics, which change only with
    /// votes, leaders and membership, not with every append: this runs beside every forward.
    async fn elected_elsewhere(&self, g: GroupId, target: u64) -> u64 {
        if let Some(lg) = self.exec.group(g) {
            let mut rx = lg.raft.server_metrics();
            let vote = rx.borrow_watched().vote;
            loop {
                let elected = {
                    let m = rx.borrow_watched();
                    m.current_leader.filter(|l| *l != target && m.vote != vote)
                };
                if let Some(l) = elected {
                    return l;
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
        }
        std::future::pending().await
    }

    /// Executes `op` on the leader of group `g`.
    ///
    /// # Errors
    /// `503` when no leader answered within the routing patience, `500` for an internal error.
    pub async fn call(&self, g: GroupId, op: ShardOp) -> Result<ShardReply, ApiError> {
        let span = tracing::debug_span!("kubbi.route", kubbi.group = g, kubbi.op = op.name());
        tracing::Instrument::instrument(self.call_inner(g, op), span).await
    }

    async fn call_inner(&self, mut g: GroupId, op: ShardOp) -> Result<ShardReply, ApiError> {
        let deadline = tokio::time::Instant::now() + ROUTE_PATIENCE;
        let mut encoded: Option<Vec<u8>> = None;
        // The known leader first; the full candidate list (which reads raft metrics and the
        // member table) only when that guess fails.
        let mut candidates = Vec::new();
        let mut next = 0usize;
        let mut target = self.first_guess(g, &mut candidates);
        let mut backoff = Duration::from_millis(20);
        let mut hops = 0;
        // Redirects followed: a shard moves at most once per split, so a chain this long is a
        // loop between two maps that disagree (retried with backoff instead).
        let mut moves = 0;
        loop {
            let result = match &self.peers {
                Some(peers) if target != self.me => {
                    let body = encoded.get_or_insert_with(|| encode(&op));
                    let lane = if op.replies_with_payload() {
                        Lane::Bulk
                    } else {
                        Lane::BySize
                    };
                    let call = peers.call::<Result<ShardReply, ExecError>>(
                        target,
                        Call::Shard(g),
                        body,
                        FORWARD_TIMEOUT,
                        lane,
                    );
                    let sent = tokio::select! {
                        sent = call => sent,
                        l = self.elected_elsewhere(g, target) => {
                            // The group elected another leader while `target` was silent (cut
                            // off, paused): go there now instead of waiting out the timeout. The
                            // retry carries the same request id, so if `target` committed the
                            // operation after all it is answered once, as after a timeout.
                            Ok(Err(ExecError::NotLeader { leader: Some(l) }))
                        }
                    };
                    match sent {
                        Ok(r) => r,
                        Err(TransportError::Refused {
                            status: 409,
                            reason,
                            ..
                        }) => {
                            // The peer does not recognise this node's data directory: nothing
                            // this node sends is accepted until it is removed and joins again.
                            return Err(ApiError::new(
                                ErrorCode::Conflict,
                                format!("refused by node {target}: {reason}"),
                            ));
                        }
                        Err(e) => {
                            tracing::debug!(group = g, target, op = op.name(), error = %e, "forward failed");
                            Err(ExecError::Unavailable(e.to_string()))
                        }
                    }
                }
                _ => self.exec.execute(g, op.clone()).await,
            };
            match result {
                Ok(reply) => {
                    self.directory.set_leader(g, target);
                    return Ok(reply);
                }
                Err(ExecError::NotLeader { leader: Some(l) }) if l != target && hops < 4 => {
                    hops += 1;
                    self.directory.set_leader(g, l);
                    target = l;
                    continue;
                }
                Err(ExecError::Moved { group, map_version }) if group != g && moves < 4 => {
                    // Split off to `group`: the same operation (same request id) goes there at
                    // once. This node's map catches up as the system group replicates.
                    tracing::debug!(
                        from = g,
                        to = group,
                        map_version,
                        op = op.name(),
                        "shard moved"
                    );
                    moves += 1;
                    g = group;
                    candidates.clear();
                    next = 0;
                    target = self.first_guess(g, &mut candidates);
                    continue;
                }
                Err(ExecError::Internal(m)) => {
                    tracing::error!(group = g, op = op.name(), error = %m, "operation failed");
                    return Err(ApiError::internal());
                }
                Err(ExecError::NoSuchGroup) if self.peers.is_none() => {
                    return Err(ApiError::not_found("kubbi"));
                }
                Err(e) => {
                    tracing::debug!(group = g, target, op = op.name(), error = %e, "retrying elsewhere");
                }
            }
            if tokio::time::Instant::now() + backoff > deadline {
                return Err(ApiError::unavailable(
                    "the shard has no reachable leader right now",
                ));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(250));
            hops = 0;
            if next + 1 >= candidates.len() {
                candidates = self.candidates(g);
                // The first candidate is the guess that just failed, when it came from the
                // directory: start past it unless it is the only one.
                next = usize::from(candidates.len() > 1 && candidates.first() == Some(&target));
            } else {
                next += 1;
            }
            target = candidates.get(next).copied().unwrap_or(self.me);
        }
    }
}
