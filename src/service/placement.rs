//! Where data groups run (`docs/shard-map-plan.md` §3.7 and §3.10): the shard map holds every
//! group's **desired** replicas, preferred leader first; the system group's leader keeps them
//! placed well ([`Service::place`]: a pure [`converge`] over the member table) and moves every
//! group toward them, one membership change at a time ([`Service::converge_group`]: the
//! learner catches up from a snapshot, then the joint change, then the leader transfer).
//!
//! An operator moves a group with `kubbi cluster move G --to 2,3,4 [--leader 3]`
//! ([`Service::move_group`]): its desired replicas become those, the group is marked placed
//! (`GroupState::Placed`), and from then on the rebalancer only replaces a replica whose node
//! leaves the cluster; it evens out the other groups around it. `--auto` gives it back.
//!
//! A cluster grows its groups with its nodes ([`Service::grow`]): while there are fewer data
//! groups than active nodes, the widest group is split, and evening out then hands the new
//! group's leadership (and replicas) to the node that had none.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::{Service, unexpected};
use crate::error::{ApiError, ErrorCode};
use crate::ids::GroupId;
use crate::raft::NodeInfo;
use crate::shard::{Candidate, Placed, converge};
use crate::state::map::GroupState;
use crate::state::{NodeRecord, NodeState};
use crate::transport::messages::{GroupStatus, ShardOp, ShardReply};

/// How long a move waits for its group to reach the replicas it was given.
const MOVE_PATIENCE: Duration = Duration::from_secs(120);
/// How far behind its leader (in log entries) a replica may be and still take leadership.
const CAUGHT_UP_ENTRIES: u64 = 100;

/// The member table as placement reads it.
#[derive(Debug, Clone, Default)]
pub struct Members {
    /// Active members: a replica on any other node is replaced.
    pub active: BTreeSet<u64>,
    /// Active members that have registered (are alive): the only ones given new replicas.
    pub eligible: Vec<Candidate>,
    /// Where to reach every member.
    pub infos: BTreeMap<u64, NodeInfo>,
}

impl Members {
    pub fn new(nodes: &[NodeRecord]) -> Self {
        let active: Vec<&NodeRecord> = nodes
            .iter()
            .filter(|n| n.state == NodeState::Active)
            .collect();
        Self {
            active: active.iter().map(|n| n.id).collect(),
            eligible: active
                .iter()
                .filter(|n| n.incarnation != 0)
                .map(|n| Candidate {
                    id: n.id,
                    zone: n.zone.clone(),
                })
                .collect(),
            infos: nodes.iter().map(|n| (n.id, NodeInfo::from(n))).collect(),
        }
    }

    fn is_eligible(&self, id: u64) -> bool {
        self.eligible.iter().any(|c| c.id == id)
    }

    /// `ids` that may be voters of a group whose voters are now `current`: a node not yet in
    /// it joins only once it has registered (is alive). With where to reach each.
    pub fn pick(&self, ids: &[u64], current: &BTreeSet<u64>) -> BTreeMap<u64, NodeInfo> {
        ids.iter()
            .filter(|id| current.contains(id) || self.is_eligible(**id))
            .filter_map(|id| self.infos.get(id).map(|i| (*id, i.clone())))
            .collect()
    }
}

/// What [`Service::converge_group`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The group has its desired voters and leader.
    Placed,
    /// It changed the group's voters.
    Reconfigured,
    /// It moved the group's leadership.
    Transferred,
    /// Nothing it can do now (the desired leader is catching up, or not alive yet).
    Waiting,
}

/// A move, done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveDone {
    pub group: GroupId,
    pub replicas: Vec<u64>,
    pub leader: Option<u64>,
    pub map_version: u64,
}

/// Whether replica `node` of the group `st` describes is within [`CAUGHT_UP_ENTRIES`] of its
/// leader.
pub fn caught_up(st: &GroupStatus, node: u64) -> bool {
    let last = st.last_log.unwrap_or(0);
    st.matched
        .get(&node)
        .copied()
        .flatten()
        .is_some_and(|m| last.saturating_sub(m) < CAUGHT_UP_ENTRIES)
}

fn conflict(message: String) -> ApiError {
    ApiError::new(ErrorCode::Conflict, message)
}

impl Service {
    /// The replication factor of data groups.
    fn rf(&self) -> usize {
        self.router().replication_factor()
    }

    /// Stores the desired replicas [`converge`] gives for the serving groups of the current
    /// map and `members`, if they differ from the map's; whether it stored a map.
    ///
    /// # Errors
    /// `503` when the system group cannot commit.
    pub async fn place(&self, members: &Members) -> Result<bool, ApiError> {
        if members.eligible.is_empty() {
            return Ok(false);
        }
        let rf = self.rf();
        let stored = self
            .change_map(|map| {
                let groups: BTreeMap<GroupId, Placed> = map
                    .groups
                    .iter()
                    .filter(|(_, e)| e.state.is_active())
                    .map(|(g, e)| {
                        (
                            *g,
                            Placed {
                                replicas: e.replicas.clone(),
                                pinned: e.state == GroupState::Placed,
                            },
                        )
                    })
                    .collect();
                let want = converge(&groups, &members.active, &members.eligible, rf);
                if want.iter().all(|(g, r)| map.groups[g].replicas == *r) {
                    return Ok(None);
                }
                let mut next = map.clone();
                for (g, r) in want {
                    if let Some(e) = next.groups.get_mut(&g) {
                        e.replicas = r;
                    }
                }
                Ok(Some(next))
            })
            .await?;
        if let Some(m) = &stored {
            tracing::info!(map_version = m.version, "placement of data groups changed");
        }
        Ok(stored.is_some())
    }

    /// One step of group `g` toward its desired replicas in the map: a change of its voters
    /// (new ones join as learners first and catch up from a snapshot; openraft's joint
    /// change), else a leadership transfer to its preferred leader once that one is caught up.
    /// Returns what it did and the status it decided on. Without `reconfigure` it leaves the
    /// voters as they are (the rebalancer changes one group's voters per round).
    ///
    /// # Errors
    /// `404` when the map does not list `g`; `503` when the group has no leader.
    pub async fn converge_group(
        &self,
        g: GroupId,
        members: &Members,
        reconfigure: bool,
    ) -> Result<(Step, GroupStatus), ApiError> {
        let map = self.shard_map();
        let target = map
            .groups
            .get(&g)
            .map(|e| e.replicas.clone())
            .ok_or_else(|| ApiError::not_found("group"))?;
        let st = match self.call(g, ShardOp::Status).await? {
            ShardReply::Status(s) => s,
            other => return Err(unexpected("status", &other)),
        };
        let current: BTreeSet<u64> = st.voters.iter().copied().collect();
        let voters = members.pick(&target, &current);
        let same = current == voters.keys().copied().collect() && st.learners.is_empty();
        if !same && !voters.is_empty() {
            if !reconfigure {
                return Ok((Step::Waiting, st));
            }
            tracing::info!(group = g, ?voters, "moving group replicas");
            self.call(
                g,
                ShardOp::Reconfigure {
                    voters,
                    learners: BTreeMap::new(),
                },
            )
            .await?;
            return Ok((Step::Reconfigured, st));
        }
        let (Some(leader), Some(preferred)) = (st.leader, target.first().copied()) else {
            return Ok((Step::Waiting, st));
        };
        if leader == preferred {
            let placed = voters.len() == target.len();
            return Ok((if placed { Step::Placed } else { Step::Waiting }, st));
        }
        if st.voters.contains(&preferred) && caught_up(&st, preferred) {
            tracing::info!(
                group = g,
                from = leader,
                to = preferred,
                "moving group leadership"
            );
            self.call(g, ShardOp::TransferLeader { to: preferred })
                .await?;
            return Ok((Step::Transferred, st));
        }
        Ok((Step::Waiting, st))
    }

    /// Moves data group `g` to `replicas` (in this order of preference for its leader, or
    /// `leader` first) and pins it there (module doc); returns once the group has those
    /// voters and that leader.
    ///
    /// # Errors
    /// `404` unknown group; `400` for replicas that are not the replication factor's count of
    /// distinct, active, alive members, or a leader not among them; `409` for a group being
    /// split off; `503` when the group does not get there within [`MOVE_PATIENCE`] (the
    /// rebalancer goes on with it).
    pub async fn move_group(
        &self,
        g: GroupId,
        replicas: Vec<u64>,
        leader: Option<u64>,
    ) -> Result<MoveDone, ApiError> {
        let (_, nodes) = self.read_system().await?;
        let members = Members::new(&nodes);
        let want = self.rf().min(members.active.len()).max(1);
        let mut errs = Vec::new();
        let distinct: BTreeSet<u64> = replicas.iter().copied().collect();
        if distinct.len() != replicas.len() {
            errs.push("replicas must be distinct".to_string());
        }
        if replicas.len() != want {
            errs.push(format!(
                "replicas must name {want} nodes (the replication factor, or every active member \
                 when there are fewer)"
            ));
        }
        for id in &replicas {
            if !members.is_eligible(*id) {
                errs.push(format!(
                    "node {id} is not an active member that has registered"
                ));
            }
        }
        let mut ordered = replicas;
        if let Some(l) = leader {
            match ordered.iter().position(|id| *id == l) {
                Some(i) => {
                    let l = ordered.remove(i);
                    ordered.insert(0, l);
                }
                None => errs.push(format!("leader {l} is not one of the replicas")),
            }
        }
        check_movable(&self.shard_map(), g)?;
        if !errs.is_empty() {
            return Err(ApiError::validation(errs));
        }
        let stored = self
            .change_map(|map| {
                check_movable(map, g)?;
                let e = &map.groups[&g];
                if e.replicas == ordered && e.state == GroupState::Placed {
                    return Ok(None);
                }
                let mut next = map.clone();
                if let Some(e) = next.groups.get_mut(&g) {
                    e.replicas = ordered.clone();
                    e.state = GroupState::Placed;
                }
                Ok(Some(next))
            })
            .await?;
        if stored.is_some() {
            tracing::info!(group = g, replicas = ?ordered, "group placed by an operator");
        }
        self.await_placed(g, &members).await
    }

    /// Gives data group `g` back to the rebalancer (it may move it from then on).
    ///
    /// # Errors
    /// `404` unknown group; `409` for a group being split off.
    pub async fn unpin_group(&self, g: GroupId) -> Result<u64, ApiError> {
        let stored = self
            .change_map(|map| {
                check_movable(map, g)?;
                if map.groups[&g].state != GroupState::Placed {
                    return Ok(None);
                }
                let mut next = map.clone();
                if let Some(e) = next.groups.get_mut(&g) {
                    e.state = GroupState::Active;
                }
                Ok(Some(next))
            })
            .await?;
        Ok(stored.map_or_else(|| self.shard_map().version, |m| m.version))
    }

    /// Drives group `g` to its desired replicas and leader, until [`MOVE_PATIENCE`].
    async fn await_placed(&self, g: GroupId, members: &Members) -> Result<MoveDone, ApiError> {
        let deadline = tokio::time::Instant::now() + MOVE_PATIENCE;
        let mut last_error = None;
        loop {
            match self.converge_group(g, members, true).await {
                Ok((Step::Placed, st)) => {
                    let map = self.shard_map();
                    let replicas = map.groups.get(&g).map(|e| e.replicas.clone());
                    // The map may have moved on (the node of a replica left): placed means
                    // placed as the map says now.
                    if replicas.as_deref().is_some_and(|r| {
                        r.iter().copied().collect::<BTreeSet<_>>()
                            == st.voters.iter().copied().collect()
                    }) {
                        return Ok(MoveDone {
                            group: g,
                            replicas: replicas.unwrap_or_default(),
                            leader: st.leader,
                            map_version: map.version,
                        });
                    }
                }
                Ok(_) => {}
                Err(e) if e.code == ErrorCode::NotFound => return Err(e),
                Err(e) => last_error = Some(e.message),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::unavailable(format!(
                    "group {g} did not reach its replicas within {}s{}; the rebalancer goes on \
                     with it",
                    MOVE_PATIENCE.as_secs(),
                    last_error.map(|e| format!(" ({e})")).unwrap_or_default()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One step of growth: while the map has fewer serving groups than `members` has alive
    /// active members (and no split under way), the widest group is split. Whether it split.
    ///
    /// # Errors
    /// The split's.
    pub async fn grow(&self, members: &Members) -> Result<bool, ApiError> {
        let map = self.shard_map();
        if map.legacy.is_some()
            || map.groups.values().any(|e| !e.state.is_active())
            || map.serving_groups().len() >= members.eligible.len()
        {
            return Ok(false);
        }
        let Some(widest) = map.serving_groups().into_iter().max_by_key(|g| {
            let width: u32 = map
                .ranges_of(*g)
                .iter()
                .map(|(lo, hi)| hi - u32::from(*lo))
                .sum();
            (width, std::cmp::Reverse(*g))
        }) else {
            return Ok(false);
        };
        let done = self.split_group(widest, None).await?;
        tracing::info!(
            source = done.source,
            target = done.target,
            "split a group for a node that joined"
        );
        Ok(true)
    }
}

/// Why group `g` of `map` cannot be moved, if it cannot.
fn check_movable(map: &crate::state::map::ShardMap, g: GroupId) -> Result<(), ApiError> {
    match map.groups.get(&g) {
        None => Err(ApiError::not_found("group")),
        Some(e) if !e.state.is_active() => Err(conflict(format!(
            "group {g} is being split off; move it once its split is done"
        ))),
        Some(_) => Ok(()),
    }
}
