//! The raft wiring, named in one place: entry and response types, the RocksDB log store and the
//! state machine that feeds committed entries to [`crate::state::apply`]. The network that
//! carries raft messages between nodes is `transport::raft_network`.
//!
//! Every group (each kubbi shard and the system group) is one `openraft::Raft` with its own
//! [`LogStore`] and [`StateMachine`], all over the node's single [`Storage`](crate::storage::Storage).

pub mod client;
pub mod log_store;
pub mod quiet;
pub mod seed;
pub mod snapshot;
pub mod state_machine;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use log_store::LogStore;
pub use snapshot::SnapshotData;
pub use state_machine::StateMachine;

use crate::state::{Outcome, Request};

/// The raft node id of a kubbi node.
pub type NodeId = u64;

/// What the cluster knows about a node: where to reach it, and where it stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Public HTTP address (`host:port`).
    pub http: String,
    /// Internal node-to-node address (`host:port`).
    pub internal: String,
    /// Locality label, `region/zone`.
    pub zone: String,
}

impl From<&crate::state::Replica> for NodeInfo {
    fn from(r: &crate::state::Replica) -> Self {
        Self {
            http: r.http.clone(),
            internal: r.internal.clone(),
            zone: r.zone.clone(),
        }
    }
}

impl From<&crate::state::NodeRecord> for NodeInfo {
    fn from(n: &crate::state::NodeRecord) -> Self {
        Self {
            http: n.http.clone(),
            internal: n.internal.clone(),
            zone: n.zone.clone(),
        }
    }
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.internal, self.zone)
    }
}

openraft::declare_raft_types!(
    /// The raft type configuration of kubbi groups.
    pub TypeConfig:
        D = Request,
        R = Outcome,
        NodeId = NodeId,
        Node = NodeInfo,
);

/// One raft group.
pub type Raft = openraft::Raft<TypeConfig, StateMachine>;

pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;

/// Converts any error into the `io::Error` openraft's storage traits speak.
pub(crate) fn io_err(e: impl fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}
