//! Which data groups this node runs: the shard map it starts from, and keeping the cluster's
//! copy of it (`docs/shard-map-plan.md` §3.3, step 3).
//!
//! A node runs a raft group for every data group of the map, so it needs a map before it
//! starts any group. In order of preference:
//!
//! 1. what it has locally: the system group's record `g` (every node replicates the system
//!    group) or, newer or when `g` has not arrived yet, the node-local copy of the map its
//!    groups were last started from;
//! 2. a data directory from the fixed-shard layout: `ShardMap::legacy` of its stored count,
//!    which routes every old kubbi to the group that holds it;
//! 3. a joining node: the map of the node it joins through (`/internal/v1/map`);
//! 4. a new cluster: `ShardMap::first`, a pure function of `--bootstrap` (and
//!    `--initial-groups`), so every founding member starts the same groups before any map is
//!    stored.
//!
//! [`keep`] then makes sure the cluster stores a map (compare-and-set from version 0: the first
//! proposal wins, the others are refused as stale) and warns when this node's groups differ
//! from the stored map's.

use std::time::Duration;

use crate::ids::{GroupId, SYSTEM_GROUP};
use crate::shard::{Candidate, placement};
use crate::state::map::ShardMap;
use crate::state::{NodeState, read_map, read_nodes};
use crate::storage::{CF_RAFT_META, Storage, group_key};
use crate::transport::Peers;

use super::{NODE_META_GROUP, NodeError};

/// The node-local copy of the map this node's groups were started from.
const LOCAL_MAP: &[u8] = b"map";

/// How long a joining node keeps asking its seed for the map.
const JOIN_PATIENCE: Duration = Duration::from_secs(180);

/// Where the map of a start comes from (module doc).
pub(super) struct Sources<'a> {
    pub storage: &'a Storage,
    /// The group count of a fixed-shard-layout directory.
    pub legacy: Option<u16>,
    pub join: Option<(&'a Peers, &'a str)>,
    /// The founding members (this node alone for a single node); empty for a joiner.
    pub bootstrap: &'a [Candidate],
    pub initial_groups: u16,
    pub rf: usize,
    pub me: u64,
}

/// The newest map this node holds locally, if any (tests read it to find a kubbi's group).
pub fn local(storage: &Storage) -> Result<Option<ShardMap>, NodeError> {
    let stored = read_map(&storage.read_view(SYSTEM_GROUP))?;
    let copy = storage
        .db()
        .get_cf(
            storage.cf(CF_RAFT_META),
            group_key(NODE_META_GROUP, LOCAL_MAP),
        )
        .map_err(|e| NodeError::Storage(e.into()))?
        .map(|b| crate::codec::decode::<ShardMap>("local shard map", &b))
        .transpose()
        .map_err(|e| NodeError::Config(e.to_string()))?;
    Ok(match (stored, copy) {
        (Some(a), Some(b)) => Some(if b.version > a.version { b } else { a }),
        (a, b) => a.or(b),
    })
}

/// Records `map` as the one this node's groups start from (synced: a restart must start the
/// same groups, whatever else it lost).
pub(super) fn save_local(storage: &Storage, map: &ShardMap) -> Result<(), NodeError> {
    let db = storage.db();
    db.put_cf(
        storage.cf(CF_RAFT_META),
        group_key(NODE_META_GROUP, LOCAL_MAP),
        crate::codec::encode(map),
    )
    .and_then(|()| db.flush_wal(true))
    .map_err(|e| NodeError::Storage(e.into()))
}

/// The first map of a new cluster of `bootstrap` members.
pub(super) fn first(bootstrap: &[Candidate], initial_groups: u16, rf: usize) -> ShardMap {
    let n = if initial_groups == 0 {
        u16::try_from(bootstrap.len()).unwrap_or(u16::MAX).max(1)
    } else {
        initial_groups
    };
    let ids: Vec<GroupId> = (0..n).collect();
    let plan = placement(&ids, bootstrap, rf);
    ShardMap::first(n, |g| plan.get(&g).cloned().unwrap_or_default())
}

/// The map this start runs its groups from, saved locally when it is new here.
pub(super) async fn resolve(src: Sources<'_>) -> Result<ShardMap, NodeError> {
    if let Some(m) = local(src.storage)? {
        return Ok(m);
    }
    let map = if let Some(n) = src.legacy {
        // The members as this node last knew them, for the map's (advisory) replicas.
        let mut members: Vec<Candidate> = read_nodes(&src.storage.read_view(SYSTEM_GROUP))?
            .into_iter()
            .filter(|n| n.state == NodeState::Active)
            .map(|n| Candidate {
                id: n.id,
                zone: n.zone,
            })
            .collect();
        if members.is_empty() {
            members = src.bootstrap.to_vec();
        }
        let ids: Vec<GroupId> = (0..n).collect();
        let plan = placement(&ids, &members, src.rf);
        ShardMap::legacy(n, |g| {
            plan.get(&g)
                .filter(|r| !r.is_empty())
                .cloned()
                .unwrap_or_else(|| vec![src.me])
        })
    } else if let Some((peers, seed)) = src.join {
        fetch(peers, seed).await?
    } else if src.bootstrap.is_empty() {
        return Err(NodeError::Config(
            "an empty data directory needs --bootstrap (to form a cluster) or --join".into(),
        ));
    } else {
        first(src.bootstrap, src.initial_groups, src.rf)
    };
    map.validate()
        .map_err(|e| NodeError::Cluster(format!("the shard map is invalid: {e}")))?;
    save_local(src.storage, &map)?;
    Ok(map)
}

/// The map of the node at `seed`, asked until it answers.
async fn fetch(peers: &Peers, seed: &str) -> Result<ShardMap, NodeError> {
    let deadline = tokio::time::Instant::now() + JOIN_PATIENCE;
    loop {
        match peers
            .post_addr::<ShardMap>(
                0,
                seed,
                0,
                MAP_PATH,
                crate::codec::encode(&()),
                Duration::from_secs(10),
            )
            .await
        {
            Ok(m) => match m.validate() {
                Ok(()) => return Ok(m),
                Err(e) => {
                    return Err(NodeError::Cluster(format!(
                        "{seed} sent an invalid shard map: {e}"
                    )));
                }
            },
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(NodeError::Cluster(format!(
                    "cannot read the shard map from {seed}: {e}"
                )));
            }
            Err(e) => {
                tracing::info!(error = %e, seed, "waiting for the cluster's shard map");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// The internal path that answers a node's current map.
pub const MAP_PATH: &str = "/internal/v1/map";

/// Until the cluster has stored a map: proposes this node's (the first proposal from version 0
/// wins). Then checks that it routes as this node's groups do.
pub(super) async fn keep(service: crate::service::Service, storage: std::sync::Arc<Storage>) {
    let mine = service.shard_map().clone();
    let mut pause = Duration::from_millis(200);
    loop {
        match read_map(&storage.read_view(SYSTEM_GROUP)) {
            Ok(Some(stored)) => {
                if stored.same_routing(&mine) {
                    tracing::debug!(version = stored.version, "the shard map is stored");
                } else {
                    tracing::error!(
                        stored = stored.version,
                        groups = ?stored.group_ids(),
                        running = ?mine.group_ids(),
                        "this node's groups differ from the cluster's shard map (were the \
                         members started with different --bootstrap lists?); restart it with \
                         an empty data directory to join"
                    );
                }
                if stored.version > mine.version
                    && let Err(e) = save_local(&storage, &stored)
                {
                    tracing::warn!(error = %e, "cannot save the shard map locally");
                }
                return;
            }
            Ok(None) => match service.put_map(0, mine.as_ref().clone()).await {
                Ok(stored) => {
                    if let Some(m) = stored {
                        tracing::info!(
                            version = m.version,
                            groups = m.groups.len(),
                            "stored the cluster's shard map"
                        );
                    }
                    // Stored here or by another member: wait for it to replicate here.
                    pause = Duration::from_millis(500);
                }
                Err(e) => {
                    tracing::debug!(error = %e.message, "cannot store the shard map yet");
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot read the shard map");
                pause = Duration::from_secs(5);
            }
        }
        tokio::time::sleep(pause).await;
    }
}
