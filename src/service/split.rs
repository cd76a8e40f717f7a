//! Splitting a data group online (`docs/shard-map-plan.md` §3.6): a range of its logical
//! shards moves to a new group on the same replicas, without stopping either.
//!
//! ```text
//!   map v+1: T listed, Splitting from S       (R still routes to S)
//!   S's log: Adopt (once), then the fence      (S answers every command of R "moved to T")
//!   every replica of S: seeds T from its copy  (node::groups), T elects a leader
//!   map v+2: R routes to T, T active           (stale routes are redirected by S meanwhile)
//!   S's log: Release                           (S drops its copy of R)
//! ```
//!
//! Every step is idempotent and the map says where a split stands, so a driver that stops
//! half-way (its node crashed, the request timed out) is finished by the next one: the operator
//! repeating the command, or the system group's leader, which finishes every split it finds in
//! the map ([`Service::finish_splits`]).

use std::time::Duration;

use super::{Service, unexpected};
use crate::error::{ApiError, ErrorCode};
use crate::ids::{GroupId, SHARD_SPACE, Shard};
use crate::state::map::{GroupEntry, GroupState, RangeOwner, ShardMap};
use crate::state::{Command, Outcome, Rejection, Replica, ShardRange};
use crate::transport::messages::{ShardOp, ShardReply};

/// How long a split waits for its new group to elect a leader.
const TARGET_PATIENCE: Duration = Duration::from_secs(60);
/// Attempts at a map change that lost a race with another one.
const MAP_ATTEMPTS: usize = 20;

/// A split, done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitDone {
    pub source: GroupId,
    pub target: GroupId,
    pub ranges: Vec<ShardRange>,
    /// The map version that routes the ranges to the target.
    pub map_version: u64,
}

/// The range a split of `source` moves: `[at, end)` of `source`'s range holding `at`, or the
/// upper half of its widest range. `None` when nothing can be split off there.
pub fn choose_range(map: &ShardMap, source: GroupId, at: Option<Shard>) -> Option<ShardRange> {
    let ranges = map.ranges_of(source);
    match at {
        Some(at) => ranges
            .iter()
            .find(|(lo, hi)| *lo < at && u32::from(at) < *hi)
            .map(|(_, hi)| (at, *hi)),
        None => {
            let (lo, hi) = ranges
                .iter()
                .copied()
                .max_by_key(|(lo, hi)| (hi - u32::from(*lo), std::cmp::Reverse(*lo)))?;
            let width = hi - u32::from(lo);
            (width >= 2).then(|| ((u32::from(lo) + width / 2) as Shard, hi))
        }
    }
}

/// `map` with `target` listed as being split off `source` with `range`.
fn with_target(map: &ShardMap, source: GroupId, range: ShardRange, replicas: Vec<u64>) -> ShardMap {
    let mut next = map.clone();
    let target = next.next_group;
    next.groups.insert(
        target,
        GroupEntry {
            replicas,
            state: GroupState::Splitting {
                from: source,
                ranges: vec![range],
            },
        },
    );
    next.next_group = target + 1;
    next
}

/// `map` routing `range` to `target`, now active.
fn flipped(map: &ShardMap, target: GroupId, range: ShardRange) -> ShardMap {
    let mut next = map.clone();
    let (lo, hi) = (u32::from(range.0), range.1);
    let mut ranges = Vec::with_capacity(next.ranges.len() + 2);
    for r in &next.ranges {
        let (rlo, rhi) = (u32::from(r.lo), r.hi);
        if rhi <= lo || rlo >= hi {
            ranges.push(*r);
            continue;
        }
        if rlo < lo {
            ranges.push(RangeOwner {
                lo: r.lo,
                hi: lo,
                group: r.group,
            });
        }
        if rhi > hi {
            ranges.push(RangeOwner {
                lo: hi as Shard,
                hi: rhi,
                group: r.group,
            });
        }
    }
    ranges.push(RangeOwner {
        lo: range.0,
        hi: range.1,
        group: target,
    });
    ranges.sort_by_key(|r| r.lo);
    next.ranges = ranges;
    // The new group keeps its source's placement: pinned by an operator if the source was.
    let placed = match next.groups.get(&target).map(|e| &e.state) {
        Some(GroupState::Splitting { from, .. }) => next
            .groups
            .get(from)
            .is_some_and(|e| e.state == GroupState::Placed),
        _ => false,
    };
    if let Some(e) = next.groups.get_mut(&target) {
        e.state = if placed {
            GroupState::Placed
        } else {
            GroupState::Active
        };
    }
    next
}

/// Whether `map` routes all of `range` to `target`.
fn routes(map: &ShardMap, range: ShardRange, target: GroupId) -> bool {
    map.ranges
        .iter()
        .filter(|r| u32::from(r.lo) < range.1 && r.hi > u32::from(range.0))
        .all(|r| r.group == target)
}

impl Service {
    /// Splits `source`: moves `[at, end)` of its range holding `at`, or the upper half of its
    /// widest range, to a new group on the same replicas (module doc). Returns once the new
    /// group serves the range and `source` dropped its copy.
    ///
    /// # Errors
    /// `404` unknown group; `409` when the group is being split already, has nothing to split
    /// at `at`, or the map changed under the split too often; `503` when a group cannot commit.
    pub async fn split_group(
        &self,
        source: GroupId,
        at: Option<Shard>,
    ) -> Result<SplitDone, ApiError> {
        if at.is_some_and(|a| u32::from(a) >= SHARD_SPACE) {
            return Err(ApiError::validation(vec![
                "at is past the shard space".into(),
            ]));
        }
        // Refused at once when it cannot be done (before asking the group for its voters).
        split_range(&self.shard_map(), source, at)?;
        let voters = self.voters_of(source).await?;
        let replicas: Vec<u64> = voters.iter().map(|v| v.id).collect();
        let mut chosen = None;
        self.change_map(|map| {
            let range = split_range(map, source, at)?;
            chosen = Some((map.next_group, range));
            Ok(Some(with_target(map, source, range, replicas.clone())))
        })
        .await?;
        // The change always stores a map, so the last range chosen is the one stored.
        let Some((target, range)) = chosen else {
            return Err(ApiError::internal());
        };
        tracing::info!(source, target, ?range, "split started");
        self.finish_split(source, target, range).await
    }

    /// The splits the map shows under way, each finished (the system group's leader calls
    /// this; see the module doc).
    ///
    /// # Errors
    /// The first split that cannot be finished now.
    pub async fn finish_splits(&self) -> Result<Vec<SplitDone>, ApiError> {
        let map = self.shard_map();
        let mut done = Vec::new();
        for (target, e) in &map.groups {
            if let GroupState::Splitting { from, ranges } = &e.state
                && let [range] = ranges.as_slice()
            {
                done.push(self.finish_split(*from, *target, *range).await?);
            }
        }
        Ok(done)
    }

    /// From the fence on (module doc).
    async fn finish_split(
        &self,
        source: GroupId,
        target: GroupId,
        range: ShardRange,
    ) -> Result<SplitDone, ApiError> {
        let map = self.shard_map();
        if !routes(&map, range, target) {
            // Before the flip: adopt (the first split of a group), fence.
            let adopt = Command::Adopt {
                ranges: map.ranges_of(source),
                map_version: map.version,
            };
            match self.propose(source, adopt).await? {
                // Adopted now or before; or adopted before with other ranges (an earlier split),
                // which the fence checks.
                Outcome::Ownership(_) | Outcome::Rejected(Rejection::BadRanges) => {}
                other => return Err(unexpected("adopt", &other)),
            }
            let voters = self.voters_of(source).await?;
            let fence = Command::Split {
                ranges: vec![range],
                target,
                map_version: map.version,
                voters,
            };
            match self.propose(source, fence).await? {
                Outcome::Ownership(_) => {}
                Outcome::Rejected(Rejection::BadRanges) => {
                    // Not fenced for the target (a repeat of its fence is answered alike), so no
                    // replica seeds it: take it out of the map again.
                    self.abandon(target).await?;
                    return Err(conflict(format!(
                        "group {source} does not own all of shards [{}, {}); the split was \
                         abandoned",
                        range.0, range.1
                    )));
                }
                other => return Err(unexpected("fence", &other)),
            }
            self.await_leader(target).await?;
            self.flip(target, range).await?;
        }
        match self.propose(source, Command::Release { target }).await? {
            Outcome::Ownership(_) => {}
            other => return Err(unexpected("release", &other)),
        }
        let map_version = self.shard_map().version;
        tracing::info!(source, target, ?range, map_version, "split done");
        Ok(SplitDone {
            source,
            target,
            ranges: vec![range],
            map_version,
        })
    }

    /// Stores the map that routes `range` to `target` (unless one already does).
    async fn flip(&self, target: GroupId, range: ShardRange) -> Result<(), ApiError> {
        self.change_map(|map| {
            Ok((!routes(map, range, target)).then(|| flipped(map, target, range)))
        })
        .await?;
        Ok(())
    }

    /// Takes `target`, still being made, out of the map.
    async fn abandon(&self, target: GroupId) -> Result<(), ApiError> {
        let stored = self
            .change_map(|map| {
                let making = map
                    .groups
                    .get(&target)
                    .is_some_and(|e| matches!(e.state, GroupState::Splitting { .. }));
                Ok(making.then(|| {
                    let mut next = map.clone();
                    next.groups.remove(&target);
                    next
                }))
            })
            .await?;
        if stored.is_some() {
            tracing::warn!(target, "split abandoned: its source does not own the range");
        }
        Ok(())
    }

    /// Stores the map `change` makes of the current one (`None`: nothing to change), again
    /// on the newer map when another change got there first; the map stored, if any.
    pub(super) async fn change_map(
        &self,
        mut change: impl FnMut(&ShardMap) -> Result<Option<ShardMap>, ApiError>,
    ) -> Result<Option<ShardMap>, ApiError> {
        for _ in 0..MAP_ATTEMPTS {
            let map = self.shard_map();
            let Some(next) = change(&map)? else {
                return Ok(None);
            };
            match self.put_map(map.version, next).await? {
                Some(stored) => {
                    self.inner.map.offer(stored.clone());
                    return Ok(Some(stored));
                }
                None => self.await_newer_map(map.version).await,
            }
        }
        Err(conflict("the shard map kept changing; try again".into()))
    }

    /// Waits until group `g` has a leader that answers.
    async fn await_leader(&self, g: GroupId) -> Result<(), ApiError> {
        let deadline = tokio::time::Instant::now() + TARGET_PATIENCE;
        loop {
            match self.call(g, ShardOp::Status).await {
                Ok(ShardReply::Status(st)) if st.leader.is_some() => return Ok(()),
                Ok(_) | Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(_) | Err(_) => {
                    return Err(ApiError::unavailable(format!(
                        "the new group {g} elected no leader within {}s; the split finishes \
                         once it does",
                        TARGET_PATIENCE.as_secs()
                    )));
                }
            }
        }
    }

    /// The voters of group `g`, its leader first, with where to reach them.
    async fn voters_of(&self, g: GroupId) -> Result<Vec<Replica>, ApiError> {
        let st = match self.call(g, ShardOp::Status).await? {
            ShardReply::Status(s) => s,
            other => return Err(unexpected("status", &other)),
        };
        let mut ids = st.voters.clone();
        ids.sort_by_key(|id| (Some(*id) != st.leader, *id));
        let voters: Vec<Replica> = ids
            .iter()
            .map(|id| {
                let info = st.nodes.get(id).cloned().unwrap_or_default();
                Replica {
                    id: *id,
                    http: info.http,
                    internal: info.internal,
                    zone: info.zone,
                }
            })
            .collect();
        if voters.is_empty() {
            return Err(ApiError::unavailable(format!("group {g} has no voters")));
        }
        Ok(voters)
    }

    /// Waits (briefly) for a map newer than `version` to reach this node.
    async fn await_newer_map(&self, version: u64) {
        let mut rx = self.inner.map.subscribe();
        let _ =
            tokio::time::timeout(Duration::from_millis(500), rx.wait_for(|v| *v > version)).await;
    }
}

/// The range a split of `source` at `at` moves in `map`, or why it cannot be split.
fn split_range(map: &ShardMap, source: GroupId, at: Option<Shard>) -> Result<ShardRange, ApiError> {
    let entry = map
        .groups
        .get(&source)
        .ok_or_else(|| ApiError::not_found("group"))?;
    if !entry.state.is_active() {
        return Err(conflict(format!(
            "group {source} is itself being split off"
        )));
    }
    if let Some((t, _)) = splitting_from(map, source) {
        return Err(conflict(format!(
            "group {source} is being split already (into group {t}); its split finishes by \
             itself, or run this again once it has"
        )));
    }
    choose_range(map, source, at).ok_or_else(|| {
        conflict(format!(
            "group {source} has no range to split{}",
            at.map(|a| format!(" at shard {a}")).unwrap_or_default()
        ))
    })
}

/// The group being split off `source`, if any, and its range.
fn splitting_from(map: &ShardMap, source: GroupId) -> Option<(GroupId, ShardRange)> {
    map.groups.iter().find_map(|(t, e)| match &e.state {
        GroupState::Splitting { from, ranges } if *from == source => {
            ranges.first().map(|r| (*t, *r))
        }
        _ => None,
    })
}

fn conflict(message: String) -> ApiError {
    ApiError::new(ErrorCode::Conflict, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> ShardMap {
        ShardMap::first(3, |g| vec![u64::from(g) + 1])
    }

    #[test]
    fn a_split_halves_the_widest_range_and_the_flip_partitions_the_space() {
        let map = three();
        let (lo, hi) = map.ranges_of(1)[0];
        let range = choose_range(&map, 1, None).expect("splittable");
        assert_eq!(
            range,
            ((u32::from(lo) + (hi - u32::from(lo)) / 2) as Shard, hi)
        );
        let mut started = with_target(&map, 1, range, vec![2, 3]);
        started.version = 2;
        started.validate().expect("a listed target is valid");
        assert_eq!(started.next_group, 4);
        assert!(!routes(&started, range, 3));
        let flipped = flipped(&started, 3, range);
        flipped.validate().expect("the flipped map is valid");
        assert!(routes(&flipped, range, 3));
        assert_eq!(flipped.ranges_of(1), vec![(lo, u32::from(range.0))]);
        assert_eq!(flipped.group_of(range.0), Some(3));
        assert_eq!(flipped.group_of(range.0 - 1), Some(1));
        assert_eq!(flipped.groups[&3].state, GroupState::Active);
        // Flipping again changes nothing.
        assert_eq!(super::flipped(&flipped, 3, range), flipped);
    }

    #[test]
    fn a_split_at_a_shard_takes_the_rest_of_its_range_and_refuses_edges() {
        let map = three();
        let (lo, hi) = map.ranges_of(0)[0];
        assert_eq!(choose_range(&map, 0, Some(lo + 10)), Some((lo + 10, hi)));
        // At the range's first shard nothing would be left behind; past it, another group's.
        assert_eq!(choose_range(&map, 0, Some(lo)), None);
        assert_eq!(choose_range(&map, 0, Some(hi as Shard)), None);
        // A range one shard wide cannot be halved.
        let mut narrow = map.clone();
        narrow.ranges = vec![
            RangeOwner {
                lo: 0,
                hi: 1,
                group: 0,
            },
            RangeOwner {
                lo: 1,
                hi: SHARD_SPACE,
                group: 1,
            },
        ];
        narrow.groups.remove(&2);
        assert_eq!(choose_range(&narrow, 0, None), None);
    }
}
