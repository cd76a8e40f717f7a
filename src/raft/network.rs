//! How a group reaches its peers.
//!
//! A single-node deployment has no peers: every group is a one-voter cluster and openraft never
//! opens a connection. The factory still has to exist; a connection it would hand out reports
//! the peer unreachable, so a misconfigured membership shows up as replication errors in the
//! log instead of a hang.

use std::future::Future;

use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};

use super::snapshot::SnapshotData;
use super::{NodeId, NodeInfo, Snapshot, TypeConfig, Vote};
use crate::ids::GroupId;

/// Creates connections for one group.
#[derive(Clone)]
pub struct NetworkFactory {
    group: GroupId,
}

impl NetworkFactory {
    pub fn new(group: GroupId) -> Self {
        Self { group }
    }
}

/// A connection to one peer of one group.
pub struct Connection {
    group: GroupId,
    target: NodeId,
}

impl Connection {
    fn unreachable(&self) -> Unreachable<TypeConfig> {
        Unreachable::from_string(format!(
            "group {}: node {} is not reachable: this node has no cluster transport",
            self.group, self.target
        ))
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, _node: &NodeInfo) -> Self::Network {
        Connection {
            group: self.group,
            target,
        }
    }
}

impl RaftNetworkV2<TypeConfig> for Connection {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(RPCError::Unreachable(self.unreachable()))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(RPCError::Unreachable(self.unreachable()))
    }

    async fn full_snapshot(
        &mut self,
        _vote: Vote,
        _snapshot: Snapshot,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        Err(StreamingError::Unreachable(self.unreachable()))
    }
}
