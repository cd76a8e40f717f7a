//! The shard map this node routes by (`docs/shard-map-plan.md` §3.3): its local replica of the
//! system group's record, swapped for a newer one as the system group applies it.
//!
//! Every node replicates the system group (as a voter or a learner), so a map stored there
//! reaches every node's cache within a replication round. A request routed by an older map
//! meanwhile is redirected by the group that fenced its shard (`ExecError::Moved`), so the cache
//! only needs to be eventually current.

use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::ids::{GroupId, SYSTEM_GROUP};
use crate::raft::state_machine::ApplyObserver;
use crate::state::map::ShardMap;
use crate::state::{Outcome, read_map};
use crate::storage::Storage;

/// See the module doc.
pub struct MapCache {
    map: RwLock<Arc<ShardMap>>,
    storage: Arc<Storage>,
    /// The version of the current map, for whoever waits for a change.
    version: watch::Sender<u64>,
}

impl MapCache {
    pub fn new(map: Arc<ShardMap>, storage: Arc<Storage>) -> Arc<Self> {
        let (version, _) = watch::channel(map.version);
        Arc::new(Self {
            map: RwLock::new(map),
            storage,
            version,
        })
    }

    /// The current map.
    pub fn get(&self) -> Arc<ShardMap> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Keeps `map` if it is newer than the current one; whether it did.
    pub fn offer(&self, map: ShardMap) -> bool {
        let mut cur = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map.version <= cur.version {
            return false;
        }
        tracing::info!(
            from = cur.version,
            to = map.version,
            groups = map.groups.len(),
            "shard map changed"
        );
        let version = map.version;
        *cur = Arc::new(map);
        drop(cur);
        self.version.send_replace(version);
        true
    }

    /// Notified whenever a newer map is kept.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn reread(&self) {
        match read_map(&self.storage.read_view(SYSTEM_GROUP)) {
            Ok(Some(m)) => {
                self.offer(m);
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "cannot read the shard map"),
        }
    }
}

impl ApplyObserver for MapCache {
    fn applied(&self, group: GroupId, outcome: &Outcome, _here: bool) {
        if group != SYSTEM_GROUP {
            return;
        }
        match outcome {
            Outcome::MapStored(m) => {
                self.offer(m.as_ref().clone());
            }
            Outcome::Duplicate(inner) => self.applied(group, inner, false),
            _ => {}
        }
    }

    fn state_replaced(&self, group: GroupId) {
        if group == SYSTEM_GROUP {
            self.reread();
        }
    }
}
