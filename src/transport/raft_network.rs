//! openraft's network over [`Peers`]: one connection object per (group, target), all sharing
//! the peer's multiplexed HTTP/2 connection.

use std::future::Future;
use std::time::Duration;

use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::messages::SnapshotPart;
use super::{Peers, TransportError};
use crate::ids::GroupId;
use crate::raft::{NodeId, NodeInfo, Snapshot, SnapshotData, TypeConfig, Vote};

/// Creates connections for one group. Without peers (a single node), every connection reports
/// its target unreachable.
#[derive(Clone)]
pub struct NetworkFactory {
    group: GroupId,
    peers: Option<Peers>,
}

impl NetworkFactory {
    pub fn new(group: GroupId, peers: Option<Peers>) -> Self {
        Self { group, peers }
    }
}

/// A connection to one peer for one group.
pub struct Connection {
    group: GroupId,
    target: NodeId,
    peers: Option<Peers>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Self::Network {
        if let Some(p) = &self.peers {
            p.book().set(target, &node.internal, 0);
        }
        Connection {
            group: self.group,
            target,
            peers: self.peers.clone(),
        }
    }
}

fn rpc_error(e: TransportError) -> RPCError<TypeConfig> {
    match e {
        TransportError::Unreachable(..)
        | TransportError::NoAddress(_)
        | TransportError::Refused { .. } => {
            RPCError::Unreachable(Unreachable::from_string(e.to_string()))
        }
        TransportError::Timeout(_) | TransportError::Decode(..) => {
            RPCError::Network(NetworkError::from_string(e.to_string()))
        }
    }
}

impl Connection {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        kind: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let Some(peers) = &self.peers else {
            return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                "group {}: node {} is not reachable: this node has no cluster transport",
                self.group, self.target
            ))));
        };
        let path = format!("/internal/v1/raft/{}/{kind}", self.group);
        let reply: Result<Resp, String> = peers
            .post(self.target, &path, req, timeout)
            .await
            .map_err(rpc_error)?;
        // A remote raft error (the peer's group stopped): back off as for an unreachable peer.
        reply.map_err(|e| RPCError::Unreachable(Unreachable::from_string(e)))
    }
}

impl RaftNetworkV2<TypeConfig> for Connection {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("append", &rpc, option.soft_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("vote", &rpc, option.soft_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("prevote", &rpc, option.soft_ttl()).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("transfer", &req, option.soft_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let transfer: u64 = rand::random();
        let send = async {
            let mut from = None;
            loop {
                let chunk = snapshot.snapshot.chunk(from).await.map_err(|e| {
                    StreamingError::Unreachable(Unreachable::from_string(format!(
                        "reading the local snapshot: {e}"
                    )))
                })?;
                from = chunk.next.clone();
                let last = from.is_none();
                let part = SnapshotPart {
                    transfer,
                    vote,
                    meta: snapshot.meta.clone(),
                    chunk,
                    last,
                };
                let reply: Option<SnapshotResponse<TypeConfig>> = self
                    .call("snapshot", &part, Duration::from_secs(60))
                    .await
                    .map_err(|e| match e {
                        RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                        other => {
                            StreamingError::Network(NetworkError::from_string(other.to_string()))
                        }
                    })?;
                if last {
                    return reply.ok_or_else(|| {
                        StreamingError::Network(NetworkError::from_string(
                            "the peer did not confirm the snapshot",
                        ))
                    });
                }
            }
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = send => r,
        }
    }
}
