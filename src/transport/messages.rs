//! What nodes say to each other, bincode-encoded.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{ApiKeyId, GroupId, KubbiId, RequestId, Shard, TokenHash};
use crate::raft::NodeInfo;
use crate::raft::snapshot::Chunk;
use crate::state::{
    ApiKeyRecord, Blob, ClaimIdempotency, Command, Create, KubbiRecord, NodeRecord, Outcome,
    OwnerEntry, OwnerUsage,
};

/// An operation on one group, executed by that group's leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ShardOp {
    Create {
        request_id: RequestId,
        create: Box<Create>,
    },
    Claim {
        request_id: RequestId,
        /// The token's logical shard.
        shard: Shard,
        token_hash: TokenHash,
        idempotency: Option<ClaimIdempotency>,
    },
    Delete {
        request_id: RequestId,
        id: KubbiId,
        owner: ApiKeyId,
    },
    /// The record behind a token, and the sealed manifest when asked for.
    ByToken {
        /// The token's logical shard.
        shard: Shard,
        token_hash: TokenHash,
        with_manifest: bool,
    },
    /// Records by id (missing ones are left out).
    Get { ids: Vec<KubbiId> },
    /// Every owner-index entry of `owner` in this shard.
    OwnerEntries { owner: ApiKeyId },
    /// Any command (the system group's API keys and nodes).
    Propose { request_id: RequestId, cmd: Command },
    /// API keys and nodes of the system group.
    ReadSystem,
    /// What `owner` holds in this shard (the leader's applied state; no read index: quotas
    /// use it as an estimate).
    Usage { owner: ApiKeyId },
    /// The group as its leader sees it.
    Status,
    /// Make these the group's voters and learners (leader only).
    Reconfigure {
        voters: BTreeMap<u64, NodeInfo>,
        learners: BTreeMap<u64, NodeInfo>,
    },
    /// Hand leadership to another voter.
    TransferLeader { to: u64 },
}

impl ShardOp {
    /// Whether the reply may carry a payload (a claim's content): such a call goes over the
    /// peer's bulk connection whatever the size of its request.
    pub fn replies_with_payload(&self) -> bool {
        matches!(self, Self::Claim { .. })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Create { .. } => "create",
            Self::Claim { .. } => "claim",
            Self::Delete { .. } => "delete",
            Self::ByToken { .. } => "by_token",
            Self::Get { .. } => "get",
            Self::OwnerEntries { .. } => "owner_entries",
            Self::Propose { .. } => "propose",
            Self::ReadSystem => "read_system",
            Self::Usage { .. } => "usage",
            Self::Status => "status",
            Self::Reconfigure { .. } => "reconfigure",
            Self::TransferLeader { .. } => "transfer_leader",
        }
    }
}

/// A group as its leader sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub group: GroupId,
    pub leader: Option<u64>,
    pub term: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub nodes: BTreeMap<u64, NodeInfo>,
    pub last_applied: Option<u64>,
    pub last_log: Option<u64>,
    /// Matched log index per replica (leader only): replication lag is `last_log - matched`.
    pub matched: BTreeMap<u64, Option<u64>>,
    /// Whether the group is quiet on this node (`raft::quiet`): on its leader, no heartbeats.
    pub quiet: bool,
}

/// The answer to a [`ShardOp`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ShardReply {
    Outcome(Outcome),
    Record(Option<(KubbiRecord, Option<Blob>)>),
    Records(Vec<KubbiRecord>),
    OwnerEntries(Vec<OwnerEntry>),
    System {
        keys: Vec<ApiKeyRecord>,
        nodes: Vec<NodeRecord>,
    },
    Status(GroupStatus),
    Usage(OwnerUsage),
    Done,
}

/// Why a group could not execute an operation here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ExecError {
    /// Ask the leader (if known); nothing was done here.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    /// Retry later: no quorum, timeout, shutting down. The operation may have been applied
    /// (retries carry the same request id).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or corruption; not retried.
    #[error("internal: {0}")]
    Internal(String),
    /// This node does not run that group.
    #[error("no such group")]
    NoSuchGroup,
    /// The operation's shard was split off to `group` (fenced in this group's log at map
    /// version `map_version`): nothing was done here; send it there.
    #[error("shard moved to group {group} (map version {map_version})")]
    Moved { group: GroupId, map_version: u64 },
    /// This group does not serve the operation's shard: the sender's shard map is wrong.
    #[error("shard not served by this group")]
    NotOwned,
}

/// One part of a snapshot being sent to a follower.
#[derive(Serialize, Deserialize)]
pub struct SnapshotPart {
    /// Random id of this transfer.
    pub transfer: u64,
    pub vote: crate::raft::Vote,
    pub meta: crate::raft::SnapshotMeta,
    pub chunk: Chunk,
    pub last: bool,
}

/// A node's view of itself, polled by its peers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: u64,
    pub incarnation: u64,
    pub http: String,
    pub zone: String,
    /// `(group, leader as this node knows it, term)` for every group this node is a member of.
    pub groups: Vec<(GroupId, Option<u64>, u64)>,
}

/// A node's liveness ping to a peer (`stream::Call::Liveness`), once per `QuietTiming::ping_every`: the heartbeat of every
/// group it leads quietly, and which it leads awake (`raft::quiet`). The reply is `()`.
pub type Liveness = crate::raft::quiet::Beat;
