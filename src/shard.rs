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

/// The replicas of `shard` among `nodes`: `min(rf, nodes)` of them, in distinct zones while
/// zones last, highest rendezvous score first.
pub fn replicas(shard: GroupId, nodes: &[Candidate], rf: usize) -> Vec<u64> {
    let mut ranked: Vec<&Candidate> = nodes.iter().collect();
    ranked.sort_by_key(|n| (std::cmp::Reverse(score(shard, n.id)), n.id));
    ranked.dedup_by_key(|n| n.id);
    let want = rf.min(ranked.len());
    let mut chosen: Vec<u64> = Vec::with_capacity(want);
    let mut zones = BTreeSet::new();
    for n in &ranked {
        if chosen.len() == want {
            break;
        }
        if zones.insert(n.zone.as_str()) {
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
}
