//! Placement of raft groups on nodes: pure functions.
//!
//! Which group serves a kubbi is the shard map's business (`state::map`): a new kubbi goes to a
//! random logical shard of a group the node that took the request leads (so it needs no
//! forwarding hop; with requests spread over the nodes, load still spreads over every group), or
//! of a random group when that node leads none. A create with an `Idempotency-Key` goes to the
//! shard chosen by the hash of (API key id, Idempotency-Key), so every retry of it lands where
//! the first attempt's record is.
//!
//! A group's replicas are chosen by rendezvous hashing (each node scores each group; highest
//! scores win), taking distinct zones first: a node joining or leaving moves only the groups it
//! enters or leaves. Preferred leaders are then assigned greedily so every node leads about
//! `groups / nodes` groups.

use std::collections::{BTreeMap, BTreeSet};

use crate::ids::GroupId;

/// The group of an idempotent create in the fixed-shard layout (`shards` groups), from the
/// SHA-256 of (API key id ‖ Idempotency-Key): what `ShardMap::legacy` keeps for hashed creates.
pub fn shard_of_key(key_hash: &[u8; 32], shards: u16) -> GroupId {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key_hash[..8]);
    (u64::from_be_bytes(b) % u64::from(shards.max(1))) as GroupId
}

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: u64,
    /// Locality label, `region/zone`.
    pub zone: String,
}

fn score(shard: GroupId, node: u64) -> u64 {
    let mut m = [0u8; 10];
    m[..2].copy_from_slice(&shard.to_be_bytes());
    m[2..].copy_from_slice(&node.to_be_bytes());
    let h = crate::crypto::sha256(&m);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    u64::from_be_bytes(b)
}

/// The region of a locality label `region/zone` (the whole label when it has no `/`).
pub fn region(zone: &str) -> &str {
    zone.split_once('/').map_or(zone, |(r, _)| r)
}

/// The replicas of `shard` among `nodes`: `min(rf, nodes)` of them, in distinct regions while
/// regions last, then in distinct zones while zones last, highest rendezvous score first.
pub fn replicas(shard: GroupId, nodes: &[Candidate], rf: usize) -> Vec<u64> {
    let mut ranked: Vec<&Candidate> = nodes.iter().collect();
    ranked.sort_by_key(|n| (std::cmp::Reverse(score(shard, n.id)), n.id));
    ranked.dedup_by_key(|n| n.id);
    let want = rf.min(ranked.len());
    let mut chosen: Vec<u64> = Vec::with_capacity(want);
    // Distinct regions first, then distinct zones, then anyone.
    let mut regions = BTreeSet::new();
    for n in &ranked {
        if chosen.len() == want {
            break;
        }
        if regions.insert(region(&n.zone)) {
            chosen.push(n.id);
        }
    }
    let mut zones: BTreeSet<&str> = ranked
        .iter()
        .filter(|n| chosen.contains(&n.id))
        .map(|n| n.zone.as_str())
        .collect();
    for n in &ranked {
        if chosen.len() == want {
            break;
        }
        if !chosen.contains(&n.id) && zones.insert(n.zone.as_str()) {
            chosen.push(n.id);
        }
    }
    for n in &ranked {
        if chosen.len() == want {
            break;
        }
        if !chosen.contains(&n.id) {
            chosen.push(n.id);
        }
    }
    chosen
}

/// Replica sets of every group, each with its preferred leader first; preferred leaders are
/// balanced so no node leads more than `ceil(groups / nodes)` groups when that is possible.
pub fn placement(
    groups: &[GroupId],
    nodes: &[Candidate],
    rf: usize,
) -> BTreeMap<GroupId, Vec<u64>> {
    let mut led: BTreeMap<u64, usize> = nodes.iter().map(|n| (n.id, 0)).collect();
    let mut out = BTreeMap::new();
    for &s in groups {
        let mut r = replicas(s, nodes, rf);
        if let Some((pos, _)) = r
            .iter()
            .enumerate()
            .min_by_key(|(i, id)| (led.get(id).copied().unwrap_or(0), *i))
        {
            let leader = r.remove(pos);
            *led.entry(leader).or_insert(0) += 1;
            r.insert(0, leader);
        }
        out.insert(s, r);
    }
    out
}

/// A data group as [`converge`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// Its replicas, preferred leader first.
    pub replicas: Vec<u64>,
    /// Placed by an operator (`kubbi cluster move`): repaired when a replica leaves, never
    /// moved to even out the others.
    pub pinned: bool,
}

/// Bounds every evening-out loop of [`converge`] (each step moves one replica or one leader).
const MAX_STEPS: usize = 10_000;

/// The replicas every group should have, preferred leader first, given where they are now:
///
/// 1. **repair**: a replica on a node that is no longer an active member (`members`) is dropped;
///    a group with more than `min(rf, members)` replicas loses those on the busiest nodes;
/// 2. **fill**: a group with fewer gets the least busy `eligible` nodes (active members that are
///    alive), a region it does not use yet first, then a zone;
/// 3. **spread**: a group in fewer regions than its replicas could span trades a replica in a
///    region it holds twice for a node in a region it lacks;
/// 4. **even out replicas**: while the busiest node holds two replicas more than the least busy
///    eligible one, one replica of a group that is not pinned moves between them (never
///    reducing the group's regions or zones);
/// 5. **even out leaders**: the same with preferred leaders, by reordering a group's replicas.
///
/// Each step moves as little as it can, so a node joining or leaving moves about its share,
/// and `converge` of its own result changes nothing (the rebalancer converges to a fixpoint).
pub fn converge(
    groups: &BTreeMap<GroupId, Placed>,
    members: &BTreeSet<u64>,
    eligible: &[Candidate],
    rf: usize,
) -> BTreeMap<GroupId, Vec<u64>> {
    let zone_of = |id: u64| {
        eligible
            .iter()
            .find(|c| c.id == id)
            .map_or("", |c| c.zone.as_str())
    };
    let want = rf.min(members.len()).max(1);
    let mut out: BTreeMap<GroupId, Vec<u64>> = groups
        .iter()
        .map(|(g, p)| {
            let mut r: Vec<u64> = Vec::with_capacity(want);
            for id in &p.replicas {
                if members.contains(id) && !r.contains(id) {
                    r.push(*id);
                }
            }
            (*g, r)
        })
        .collect();
    let count = |out: &BTreeMap<GroupId, Vec<u64>>, leaders: bool| {
        let mut c: BTreeMap<u64, usize> = eligible.iter().map(|n| (n.id, 0)).collect();
        for r in out.values() {
            let held: &[u64] = if leaders { &r[..r.len().min(1)] } else { r };
            for id in held {
                *c.entry(*id).or_insert(0) += 1;
            }
        }
        c
    };
    let ids: Vec<GroupId> = out.keys().copied().collect();
    for g in &ids {
        loop {
            let load = count(&out, false);
            let r = out.get_mut(g).expect("listed");
            if r.len() > want {
                // The busiest replica goes; the preferred leader last of all.
                let (i, _) = r
                    .iter()
                    .enumerate()
                    .max_by_key(|(i, id)| (*i != 0, load.get(*id).copied().unwrap_or(0), *i))
                    .expect("not empty");
                r.remove(i);
                continue;
            }
            if r.len() == want {
                break;
            }
            let zones: BTreeSet<&str> = r.iter().map(|id| zone_of(*id)).collect();
            let regions: BTreeSet<&str> = zones.iter().map(|z| region(z)).collect();
            let best = eligible
                .iter()
                .filter(|c| !r.contains(&c.id))
                .min_by_key(|c| {
                    (
                        regions.contains(region(&c.zone)),
                        zones.contains(c.zone.as_str()),
                        load.get(&c.id).copied().unwrap_or(0),
                        std::cmp::Reverse(score(*g, c.id)),
                        c.id,
                    )
                });
            match best {
                Some(c) => r.push(c.id),
                None => break,
            }
        }
    }
    let movable: Vec<GroupId> = ids.iter().copied().filter(|g| !groups[g].pinned).collect();
    // How widely a replica set spreads: distinct regions, then distinct zones.
    let zones = |r: &[u64]| {
        let z: BTreeSet<&str> = r.iter().map(|id| zone_of(*id)).collect();
        (
            z.iter().map(|z| region(z)).collect::<BTreeSet<_>>().len(),
            z.len(),
        )
    };
    // Spread: a group in fewer regions than it could span trades a replica that shares its
    // region with another (the busiest such, the preferred leader last) for the least busy
    // node of a region it lacks. Losing a region then costs no group its majority.
    let all_regions: BTreeSet<&str> = eligible.iter().map(|c| region(&c.zone)).collect();
    for g in &movable {
        loop {
            let r = &out[g];
            let have: BTreeSet<&str> = r.iter().map(|id| region(zone_of(*id))).collect();
            if have.len() >= r.len().min(all_regions.len()) {
                break;
            }
            let load = count(&out, false);
            let shared = |id: &u64| {
                r.iter()
                    .filter(|o| region(zone_of(**o)) == region(zone_of(*id)))
                    .count()
                    > 1
            };
            let Some((i, _)) = r
                .iter()
                .enumerate()
                .filter(|(_, id)| shared(id))
                .max_by_key(|(i, id)| (*i != 0, load.get(*id).copied().unwrap_or(0), *i))
            else {
                break;
            };
            let Some(to) = eligible
                .iter()
                .filter(|c| !have.contains(region(&c.zone)))
                .min_by_key(|c| {
                    (
                        load.get(&c.id).copied().unwrap_or(0),
                        std::cmp::Reverse(score(*g, c.id)),
                        c.id,
                    )
                })
                .map(|c| c.id)
            else {
                break;
            };
            out.get_mut(g).expect("listed")[i] = to;
        }
    }
    // Each step moves one replica (then one leader) from a node to one holding at least two
    // fewer, which lowers the sum of squared counts: the loops end, at a fixpoint.
    let is_eligible = |id: u64| eligible.iter().any(|c| c.id == id);
    for _ in 0..MAX_STEPS {
        let load = count(&out, false);
        let step = movable
            .iter()
            .flat_map(|g| {
                let r = &out[g];
                let load = &load;
                r.iter().enumerate().flat_map(move |(i, from)| {
                    eligible
                        .iter()
                        .filter(move |to| !r.contains(&to.id))
                        .filter_map(move |to| {
                            let gap = load[from].checked_sub(load[&to.id] + 2)?;
                            let mut next = r.clone();
                            next[i] = to.id;
                            (zones(&next) >= zones(r)).then_some((gap, *g, next))
                        })
                })
            })
            .max_by_key(|(gap, g, next)| {
                (*gap, std::cmp::Reverse(*g), std::cmp::Reverse(next.clone()))
            });
        match step {
            Some((_, g, next)) => {
                out.insert(g, next);
            }
            None => break,
        }
    }
    for _ in 0..MAX_STEPS {
        let led = count(&out, true);
        let step = movable
            .iter()
            .filter_map(|g| {
                let r = &out[g];
                let leader = *r.first()?;
                let (i, gap) = r
                    .iter()
                    .enumerate()
                    .skip(1)
                    .filter(|(_, id)| is_eligible(**id))
                    .filter_map(|(i, id)| Some((i, led[&leader].checked_sub(led[id] + 2)?)))
                    .max_by_key(|(i, gap)| (*gap, std::cmp::Reverse(*i)))?;
                Some((gap, *g, i))
            })
            .max_by_key(|(gap, g, _)| (*gap, std::cmp::Reverse(*g)));
        match step {
            Some((_, g, i)) => {
                if let Some(r) = out.get_mut(&g) {
                    r.swap(0, i);
                }
            }
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(spec: &[(u64, &str)]) -> Vec<Candidate> {
        spec.iter()
            .map(|(id, z)| Candidate {
                id: *id,
                zone: z.to_string(),
            })
            .collect()
    }

    #[test]
    fn keyed_shard_is_stable_and_in_range() {
        let k = crate::crypto::sha256(b"owner|key-1");
        assert_eq!(shard_of_key(&k, 16), shard_of_key(&k, 16));
        assert!(shard_of_key(&k, 16) < 16);
        assert_eq!(shard_of_key(&k, 1), 0);
    }

    #[test]
    fn replication_factor_is_min_of_rf_and_nodes() {
        let one = nodes(&[(1, "a")]);
        assert_eq!(replicas(3, &one, 3), vec![1]);
        let five = nodes(&[(1, "a"), (2, "a"), (3, "a"), (4, "a"), (5, "a")]);
        for s in 0..16 {
            let r = replicas(s, &five, 3);
            assert_eq!(r.len(), 3);
            assert_eq!(r.iter().collect::<BTreeSet<_>>().len(), 3);
        }
    }

    #[test]
    fn distinct_zones_whenever_there_are_enough() {
        let n = nodes(&[
            (1, "eu/a"),
            (2, "eu/a"),
            (3, "eu/b"),
            (4, "eu/b"),
            (5, "us/c"),
            (6, "us/c"),
        ]);
        for s in 0..64 {
            let r = replicas(s, &n, 3);
            let zones: BTreeSet<&str> = r
                .iter()
                .map(|id| {
                    n.iter()
                        .find(|c| c.id == *id)
                        .map(|c| c.zone.as_str())
                        .unwrap_or("")
                })
                .collect();
            assert_eq!(zones.len(), 3, "shard {s}: {r:?}");
        }
        // Two zones for three replicas: both zones used, the third replica anywhere.
        let two = nodes(&[(1, "a"), (2, "a"), (3, "b"), (4, "b")]);
        for s in 0..32 {
            let r = replicas(s, &two, 3);
            let zones: BTreeSet<bool> = r.iter().map(|id| *id <= 2).collect();
            assert_eq!(zones.len(), 2);
        }
    }

    #[test]
    fn leaders_spread_evenly() {
        let n = nodes(&[(1, "a"), (2, "b"), (3, "c")]);
        let p = placement(&(0..16).collect::<Vec<_>>(), &n, 3);
        let mut led: BTreeMap<u64, usize> = BTreeMap::new();
        for r in p.values() {
            *led.entry(r[0]).or_default() += 1;
        }
        assert!(led.values().all(|&c| (5..=6).contains(&c)), "{led:?}");
        let five = nodes(&[(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b")]);
        let p = placement(&(0..16).collect::<Vec<_>>(), &five, 3);
        let mut led: BTreeMap<u64, usize> = BTreeMap::new();
        for r in p.values() {
            *led.entry(r[0]).or_default() += 1;
        }
        assert!(led.values().all(|&c| c <= 4), "{led:?}");
    }

    #[test]
    fn a_joining_node_moves_few_shards() {
        let three = nodes(&[(1, "a"), (2, "b"), (3, "c")]);
        let four = nodes(&[(1, "a"), (2, "b"), (3, "c"), (4, "d")]);
        let mut moved = 0;
        for s in 0..64 {
            let before: BTreeSet<u64> = replicas(s, &three, 3).into_iter().collect();
            let after: BTreeSet<u64> = replicas(s, &four, 3).into_iter().collect();
            let gained: Vec<_> = after.difference(&before).collect();
            assert!(
                gained.iter().all(|id| **id == 4),
                "only the new node gains replicas"
            );
            moved += gained.len();
        }
        // Each shard holds 3 of 4 nodes: about three quarters of them gain the new node.
        assert!((30..=60).contains(&moved), "{moved}");
    }

    fn placed(spec: &[(GroupId, &[u64], bool)]) -> BTreeMap<GroupId, Placed> {
        spec.iter()
            .map(|(g, r, pinned)| {
                (
                    *g,
                    Placed {
                        replicas: r.to_vec(),
                        pinned: *pinned,
                    },
                )
            })
            .collect()
    }

    fn as_placed(
        out: &BTreeMap<GroupId, Vec<u64>>,
        pinned: &[GroupId],
    ) -> BTreeMap<GroupId, Placed> {
        out.iter()
            .map(|(g, r)| {
                (
                    *g,
                    Placed {
                        replicas: r.clone(),
                        pinned: pinned.contains(g),
                    },
                )
            })
            .collect()
    }

    fn held(out: &BTreeMap<GroupId, Vec<u64>>, leaders: bool) -> BTreeMap<u64, usize> {
        let mut c = BTreeMap::new();
        for r in out.values() {
            for id in if leaders { &r[..1] } else { &r[..] } {
                *c.entry(*id).or_insert(0) += 1;
            }
        }
        c
    }

    fn ids(n: &[Candidate]) -> BTreeSet<u64> {
        n.iter().map(|c| c.id).collect()
    }

    #[test]
    fn a_balanced_cluster_is_left_as_it_is() {
        let n = nodes(&[(1, "a"), (2, "a"), (3, "a")]);
        let g = placed(&[
            (0, &[1, 2, 3], false),
            (1, &[2, 3, 1], false),
            (2, &[3, 1, 2], false),
        ]);
        let out = converge(&g, &ids(&n), &n, 3);
        assert_eq!(
            out,
            g.iter()
                .map(|(g, p)| (*g, p.replicas.clone()))
                .collect::<BTreeMap<_, _>>()
        );
    }

    #[test]
    fn a_joining_node_takes_its_share_and_no_more() {
        let three = nodes(&[(1, "a"), (2, "a"), (3, "a")]);
        let before = placement(&(0..16).collect::<Vec<_>>(), &three, 3);
        let four = nodes(&[(1, "a"), (2, "a"), (3, "a"), (4, "a")]);
        let out = converge(&as_placed(&before, &[]), &ids(&four), &four, 3);
        let replicas = held(&out, false);
        assert!(replicas.values().all(|c| *c == 12), "{replicas:?}");
        let leaders = held(&out, true);
        assert!(leaders.values().all(|c| *c == 4), "{leaders:?}");
        // Only the new node gains replicas: exactly its twelve moved.
        let mut moved = 0;
        for (g, r) in &out {
            let was: BTreeSet<u64> = before[g].iter().copied().collect();
            let now: BTreeSet<u64> = r.iter().copied().collect();
            let gained: Vec<&u64> = now.difference(&was).collect();
            assert!(gained.iter().all(|id| **id == 4), "group {g}: {gained:?}");
            moved += gained.len();
        }
        assert_eq!(moved, 12);
        assert_eq!(converge(&as_placed(&out, &[]), &ids(&four), &four, 3), out);
    }

    #[test]
    fn a_leaving_node_is_replaced_where_it_was_only() {
        let four = nodes(&[(1, "a"), (2, "a"), (3, "a"), (4, "a")]);
        let before = converge(
            &as_placed(&placement(&(0..8).collect::<Vec<_>>(), &four, 3), &[]),
            &ids(&four),
            &four,
            3,
        );
        let three = nodes(&[(1, "a"), (3, "a"), (4, "a")]);
        let out = converge(&as_placed(&before, &[]), &ids(&three), &three, 3);
        for (g, r) in &out {
            assert_eq!(r.len(), 3, "group {g}");
            assert!(!r.contains(&2), "group {g}: {r:?}");
            if !before[g].contains(&2) {
                let (a, b): (BTreeSet<_>, BTreeSet<_>) =
                    (before[g].iter().collect(), r.iter().collect());
                assert_eq!(a, b, "group {g} did not hold node 2 and keeps its replicas");
            }
        }
        let leaders = held(&out, true);
        assert!(leaders.values().all(|c| (2..=3).contains(c)), "{leaders:?}");
    }

    #[test]
    fn pinned_groups_are_repaired_but_never_moved_to_even_out() {
        let four = nodes(&[(1, "a"), (2, "a"), (3, "a"), (4, "a")]);
        // Two groups pinned on 1, 2, 3 led by 1: the others even out around them.
        let g = placed(&[
            (0, &[1, 2, 3], true),
            (1, &[1, 2, 3], true),
            (2, &[1, 2, 3], false),
            (3, &[1, 2, 3], false),
        ]);
        let out = converge(&g, &ids(&four), &four, 3);
        assert_eq!(out[&0], vec![1, 2, 3]);
        assert_eq!(out[&1], vec![1, 2, 3]);
        assert!(out[&2].contains(&4) && out[&3].contains(&4), "{out:?}");
        assert_eq!(
            converge(&as_placed(&out, &[0, 1]), &ids(&four), &four, 3),
            out
        );
        // Node 2 leaves: the pinned groups get a replacement, in place of node 2 only.
        let three = nodes(&[(1, "a"), (3, "a"), (4, "a")]);
        let out = converge(&as_placed(&out, &[0, 1]), &ids(&three), &three, 3);
        assert_eq!(out[&0], vec![1, 3, 4]);
        assert_eq!(out[&1], vec![1, 3, 4]);
    }

    #[test]
    fn a_member_not_yet_alive_keeps_its_replicas_but_gets_no_new_ones() {
        let alive = nodes(&[(1, "a"), (2, "a")]);
        let members: BTreeSet<u64> = [1, 2, 3].into();
        let g = placed(&[
            (0, &[1, 2, 3], false),
            (1, &[2, 3, 1], false),
            (2, &[3, 1, 2], false),
        ]);
        let out = converge(&g, &members, &alive, 3);
        assert_eq!(
            out[&2],
            vec![3, 1, 2],
            "replicas kept, leader not moved off a member"
        );
        // A new group short of replicas is filled from the alive nodes only.
        let g = placed(&[(0, &[1], false)]);
        assert_eq!(converge(&g, &members, &alive, 3)[&0], vec![1, 2]);
    }

    #[test]
    fn replicas_span_regions_before_zones() {
        // cluster/up 5 --regions eu,us,ap: two zones each in eu and us, one in ap.
        let n = nodes(&[
            (1, "eu/z1"),
            (2, "us/z2"),
            (3, "ap/z3"),
            (4, "eu/z4"),
            (5, "us/z5"),
        ]);
        let region_count = |r: &[u64]| {
            r.iter()
                .map(|id| region(&n[(*id - 1) as usize].zone))
                .collect::<BTreeSet<_>>()
                .len()
        };
        for s in 0..64 {
            let r = replicas(s, &n, 3);
            assert_eq!(region_count(&r), 3, "shard {s}: {r:?}");
        }
        // From any start, converging keeps every group in all three regions, and evens out.
        let g: BTreeMap<GroupId, Placed> = (0..5)
            .map(|g| {
                (
                    g,
                    Placed {
                        replicas: vec![1, 4],
                        pinned: false,
                    },
                )
            })
            .collect();
        let out = converge(&g, &ids(&n), &n, 3);
        for (g, r) in &out {
            assert_eq!(region_count(r), 3, "group {g}: {r:?}");
        }
        let leaders = held(&out, true);
        assert!(leaders.values().all(|c| *c == 1), "{leaders:?}");
        assert_eq!(converge(&as_placed(&out, &[]), &ids(&n), &n, 3), out);
        assert_eq!(region("eu/z1"), "eu");
        assert_eq!(region("plain"), "plain");
    }

    #[test]
    fn filling_takes_new_zones_first_and_evening_out_keeps_them() {
        let n = nodes(&[(1, "a"), (2, "a"), (3, "b"), (4, "b"), (5, "c"), (6, "c")]);
        let g: BTreeMap<GroupId, Placed> = (0..12)
            .map(|g| {
                (
                    g,
                    Placed {
                        replicas: vec![1],
                        pinned: false,
                    },
                )
            })
            .collect();
        let out = converge(&g, &ids(&n), &n, 3);
        for (g, r) in &out {
            let zones: BTreeSet<u64> = r.iter().map(|id| id.div_ceil(2)).collect();
            assert_eq!(zones.len(), 3, "group {g}: {r:?}");
        }
        let replicas = held(&out, false);
        assert!(replicas.values().all(|c| *c == 6), "{replicas:?}");
        let leaders = held(&out, true);
        assert!(leaders.values().all(|c| *c == 2), "{leaders:?}");
    }

    #[test]
    fn converging_is_a_fixpoint_from_any_start() {
        let n = nodes(&[(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b")]);
        for seed in 0u16..50 {
            let g: BTreeMap<GroupId, Placed> = (0..(seed % 9 + 1))
                .map(|g| {
                    let mut r: Vec<u64> = (0..(score(g, u64::from(seed)) % 5 + 1))
                        .map(|i| score(g + seed, i) % 7)
                        .collect();
                    r.dedup();
                    (
                        g,
                        Placed {
                            replicas: r,
                            pinned: score(seed, u64::from(g)).is_multiple_of(4),
                        },
                    )
                })
                .collect();
            let out = converge(&g, &ids(&n), &n, 3);
            for (gid, r) in &out {
                assert_eq!(r.len(), 3, "seed {seed} group {gid}: {r:?}");
                assert!(r.iter().all(|id| (1..=5).contains(id)), "{r:?}");
                assert_eq!(r.iter().collect::<BTreeSet<_>>().len(), 3);
            }
            let pinned: Vec<GroupId> = g
                .iter()
                .filter(|(_, p)| p.pinned)
                .map(|(g, _)| *g)
                .collect();
            assert_eq!(
                converge(&as_placed(&out, &pinned), &ids(&n), &n, 3),
                out,
                "seed {seed}"
            );
        }
    }
}
