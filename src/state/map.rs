//! The shard map: which raft group serves each logical shard (`docs/shard-map-plan.md` §3.3).
//!
//! Ids and tokens route to one of [`SHARD_SPACE`] logical shards for life; the map assigns
//! ranges of them to raft groups, so a range can move to another group (a split) without any
//! id changing. The map is one versioned record in the system group (key `g`), changed only by
//! a compare-and-set ([`super::Command::PutMap`]); every node reads its local replica.
//!
//! Two shapes of first map:
//!
//! - a **new cluster** gets one group per bootstrap node ([`ShardMap::first`]): group `i` owns
//!   `[⌊i·65536/N⌋, ⌊(i+1)·65536/N⌋)`, led by member `i`. A create hashed to a shard (an
//!   `Idempotency-Key`, a quota's home) takes the first two bytes of its hash.
//! - a cluster from the **fixed-shard layout** (`N` groups where shard `s` was group `s`) keeps
//!   its groups ([`ShardMap::legacy`]): group `s` owns `[s, s+1)`, where its old kubbis are,
//!   and a block of `W = (65536 − N) / N` shards above `N` for new plain creates; a hashed
//!   create goes to the shard the old rule (`u64(h[0..8]) mod N`) chose, where the idempotency
//!   records of the old layout are, so an idempotent create retried across the upgrade is
//!   answered once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ShardRange;
use crate::ids::{GroupId, SHARD_SPACE, SYSTEM_GROUP, Shard};

/// The raft group id that is never a data group besides [`SYSTEM_GROUP`] (node-local meta).
const RESERVED_GROUP: GroupId = 0xfffe;

/// A range of shards and the group serving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeOwner {
    pub lo: Shard,
    pub hi: u32,
    pub group: GroupId,
}

/// Where a group is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupState {
    Active,
    /// Being made from `ranges` of group `from`; those still route to `from` until the flip.
    Splitting {
        from: GroupId,
        ranges: Vec<ShardRange>,
    },
    /// Active, on replicas an operator chose (`kubbi cluster move`): the rebalancer replaces a
    /// replica that leaves the cluster but does not move the group to even out the others.
    Placed,
}

impl GroupState {
    /// Whether the group serves its ranges (it is not being made by a split).
    pub fn is_active(&self) -> bool {
        matches!(self, Self::Active | Self::Placed)
    }
}

/// A data group: its desired replicas, preferred leader first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupEntry {
    pub replicas: Vec<u64>,
    pub state: GroupState,
}

/// How a map made from the fixed-shard layout places hashed creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Legacy {
    /// The old shard count `N`.
    pub shards: u16,
    /// The width `W` of each group's block above `N`.
    pub width: u16,
}

/// The map (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    pub version: u64,
    /// Sorted by `lo`; together exactly `[0, SHARD_SPACE)`.
    pub ranges: Vec<RangeOwner>,
    pub groups: BTreeMap<GroupId, GroupEntry>,
    /// The id the next new group gets; ids are never reused.
    pub next_group: GroupId,
    pub legacy: Option<Legacy>,
}

impl ShardMap {
    /// The first map of a new cluster: `groups` groups (one per bootstrap member by default)
    /// over equal ranges of the shard space; `replicas(g)` gives group `g`'s replicas, its
    /// preferred leader first.
    pub fn first(groups: u16, mut replicas: impl FnMut(GroupId) -> Vec<u64>) -> Self {
        let n = u32::from(groups.max(1));
        let mut ranges = Vec::new();
        let mut entries = BTreeMap::new();
        for i in 0..n {
            let g = i as GroupId;
            ranges.push(RangeOwner {
                lo: (i * SHARD_SPACE / n) as Shard,
                hi: (i + 1) * SHARD_SPACE / n,
                group: g,
            });
            entries.insert(
                g,
                GroupEntry {
                    replicas: replicas(g),
                    state: GroupState::Active,
                },
            );
        }
        Self {
            version: 1,
            ranges,
            groups: entries,
            next_group: n as GroupId,
            legacy: None,
        }
    }

    /// The first map of a cluster upgraded from the fixed-shard layout of `shards` groups
    /// (`replicas(s)` gives group `s`'s replicas).
    pub fn legacy(shards: u16, mut replicas: impl FnMut(GroupId) -> Vec<u64>) -> Self {
        let n = u32::from(shards.max(1));
        let width = (SHARD_SPACE - n) / n;
        let mut ranges = Vec::new();
        let mut groups = BTreeMap::new();
        for s in 0..n {
            let g = s as GroupId;
            ranges.push(RangeOwner {
                lo: g,
                hi: s + 1,
                group: g,
            });
            groups.insert(
                g,
                GroupEntry {
                    replicas: replicas(g),
                    state: GroupState::Active,
                },
            );
        }
        for s in 0..n {
            let lo = n + s * width;
            let hi = if s + 1 == n { SHARD_SPACE } else { lo + width };
            ranges.push(RangeOwner {
                lo: lo as Shard,
                hi,
                group: s as GroupId,
            });
        }
        Self {
            version: 1,
            ranges,
            groups,
            next_group: n as GroupId,
            legacy: Some(Legacy {
                shards: n as u16,
                width: width as u16,
            }),
        }
    }

    /// The group serving `shard`.
    pub fn group_of(&self, shard: Shard) -> Option<GroupId> {
        let i = self.ranges.partition_point(|r| r.lo <= shard);
        let r = self.ranges.get(i.checked_sub(1)?)?;
        (u32::from(shard) < r.hi).then_some(r.group)
    }

    /// The data groups, in order.
    pub fn group_ids(&self) -> Vec<GroupId> {
        self.groups.keys().copied().collect()
    }

    /// The groups that serve some range, in order (a group being split off serves none).
    pub fn serving_groups(&self) -> Vec<GroupId> {
        let mut groups: Vec<GroupId> = self.ranges.iter().map(|r| r.group).collect();
        groups.sort_unstable();
        groups.dedup();
        groups
    }

    /// Whether two maps route every shard to the same group (their replicas may differ).
    pub fn same_routing(&self, other: &Self) -> bool {
        self.ranges == other.ranges
            && self.groups.keys().eq(other.groups.keys())
            && self.legacy == other.legacy
    }

    /// A uniformly random shard among those group `g` serves; `None` when it serves none.
    pub fn random_shard_of(&self, g: GroupId) -> Option<Shard> {
        let owned = || self.ranges.iter().filter(move |r| r.group == g);
        let total: u32 = owned().map(|r| r.hi - u32::from(r.lo)).sum();
        if total == 0 {
            return None;
        }
        let mut at = rand::random_range(0..total);
        for r in owned() {
            let width = r.hi - u32::from(r.lo);
            if at < width {
                return Some((u32::from(r.lo) + at) as Shard);
            }
            at -= width;
        }
        None
    }

    /// The ranges group `g` serves, in order.
    pub fn ranges_of(&self, g: GroupId) -> Vec<ShardRange> {
        self.ranges
            .iter()
            .filter(|r| r.group == g)
            .map(|r| (r.lo, r.hi))
            .collect()
    }

    /// The shard of a create placed by a hash (an `Idempotency-Key`'s, a quota home's): the
    /// same for every retry, whatever the map's version.
    pub fn shard_for_hash(&self, h: &[u8; 32]) -> Shard {
        match self.legacy {
            None => u16::from_be_bytes([h[0], h[1]]),
            // The old rule's shard itself: its idempotency records are filed under it, so a
            // create retried across the upgrade finds its first attempt.
            Some(Legacy { shards, .. }) => {
                let n = u64::from(shards.max(1));
                (u64::from_be_bytes(h[..8].try_into().unwrap_or([0; 8])) % n) as Shard
            }
        }
    }

    /// Why this map cannot be stored, if it cannot: the ranges must partition the shard space
    /// exactly, every range's group and only those must be listed, group ids below
    /// `next_group` and never the reserved ones, every group with distinct replicas.
    ///
    /// # Errors
    /// The first rule broken.
    pub fn validate(&self) -> Result<(), String> {
        let mut at = 0u32;
        for r in &self.ranges {
            if u32::from(r.lo) != at || r.hi <= at {
                return Err(format!("ranges do not partition the shard space at {at}"));
            }
            if !self.groups.contains_key(&r.group) {
                return Err(format!(
                    "range [{}, {}) names unknown group {}",
                    r.lo, r.hi, r.group
                ));
            }
            at = r.hi;
        }
        if at != SHARD_SPACE {
            return Err(format!("ranges end at {at}, not {SHARD_SPACE}"));
        }
        for (g, e) in &self.groups {
            if *g == SYSTEM_GROUP || *g == RESERVED_GROUP || *g >= self.next_group {
                return Err(format!("group id {g} is reserved or not below next_group"));
            }
            let mut r = e.replicas.clone();
            r.sort_unstable();
            r.dedup();
            if r.is_empty() || r.len() != e.replicas.len() {
                return Err(format!("group {g} has no replicas or repeats one"));
            }
            let serves = self.ranges.iter().any(|x| x.group == *g);
            let splitting = matches!(e.state, GroupState::Splitting { .. });
            if !serves && !splitting {
                return Err(format!("group {g} serves nothing and is not being made"));
            }
        }
        if self.next_group >= RESERVED_GROUP {
            return Err("no group ids left".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first(n: u64) -> ShardMap {
        let members: Vec<u64> = (1..=n).collect();
        ShardMap::first(n as u16, |g| {
            let i = usize::from(g);
            let mut r = vec![members[i]];
            r.extend(members.iter().filter(|m| **m != members[i]).take(2));
            r
        })
    }

    #[test]
    fn a_new_cluster_gets_one_group_per_member_over_the_whole_space() {
        for n in [1, 2, 3, 5, 7] {
            let m = first(n);
            m.validate().expect("valid");
            assert_eq!(m.groups.len() as u64, n);
            assert_eq!(m.group_of(0), Some(0));
            assert_eq!(m.group_of(u16::MAX), Some((n - 1) as GroupId));
            // Every shard has exactly one group; the groups are about equal.
            let mut count = BTreeMap::new();
            for s in 0..=u16::MAX {
                *count.entry(m.group_of(s).expect("owned")).or_insert(0u32) += 1;
            }
            let (lo, hi) = (count.values().min(), count.values().max());
            assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{count:?}");
            assert_eq!(m.groups[&0].replicas[0], 1, "group i is led by member i");
        }
        let m = first(3);
        assert_eq!(m.ranges_of(1), vec![(21_845, 43_690)]);
        assert_eq!(m.group_ids(), vec![0, 1, 2]);
        for _ in 0..200 {
            let s = m.random_shard_of(1).expect("serves some");
            assert_eq!(m.group_of(s), Some(1));
        }
        assert_eq!(m.random_shard_of(7), None);
        assert!(m.same_routing(&first(3)) && !m.same_routing(&first(2)));
        assert_eq!(m.shard_for_hash(&[0xab; 32]), 0xabab);
    }

    #[test]
    fn a_legacy_map_keeps_old_shards_in_their_groups_and_hashes_like_the_old_rule() {
        let m = ShardMap::legacy(16, |s| vec![u64::from(s) % 3 + 1]);
        m.validate().expect("valid");
        for s in 0..16 {
            assert_eq!(m.group_of(s), Some(s), "an old kubbi stays where it is");
        }
        for _ in 0..1000 {
            let h: [u8; 32] = rand::random();
            let old = crate::shard::shard_of_key(&h, 16);
            let shard = m.shard_for_hash(&h);
            assert_eq!(
                shard, old,
                "the old rule's shard, where its first attempt is filed"
            );
            assert_eq!(m.group_of(shard), Some(old));
        }
        assert_eq!(m.group_of(u16::MAX), Some(15));
        // A plain create lands in a group's block, almost never in its one old shard.
        let spread: std::collections::BTreeSet<Shard> =
            (0..100).filter_map(|_| m.random_shard_of(3)).collect();
        assert!(spread.iter().all(|s| m.group_of(*s) == Some(3)) && spread.len() > 90);
    }

    #[test]
    fn invalid_maps_are_refused_with_the_reason() {
        let good = first(3);
        let mut gap = good.clone();
        gap.ranges[1].lo += 1;
        let mut short = good.clone();
        short.ranges.pop();
        let mut unknown = good.clone();
        unknown.ranges[0].group = 9;
        let mut reused = good.clone();
        reused.next_group = 2;
        let mut repeated = good.clone();
        if let Some(g) = repeated.groups.get_mut(&0) {
            g.replicas = vec![1, 1];
        }
        let mut idle = good.clone();
        idle.groups.insert(
            2,
            GroupEntry {
                replicas: vec![1],
                state: GroupState::Active,
            },
        );
        idle.ranges.retain(|r| r.group != 2);
        idle.ranges[1].hi = SHARD_SPACE;
        for (what, m) in [
            ("gap", gap),
            ("short", short),
            ("unknown", unknown),
            ("reused", reused),
            ("repeated", repeated),
            ("idle", idle),
        ] {
            assert!(m.validate().is_err(), "{what} accepted");
        }
        assert_eq!(good.group_of(43_690), Some(2));
    }
}
