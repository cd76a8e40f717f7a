//! openraft's network over [`Peers`]: one connection object per (group, target), all sharing
//! the node-pair stream to that peer (`transport::stream`).

use std::future::Future;
use std::time::Duration;

use openraft::EntryPayload;
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
use super::stream::Call;
use super::{Lane, Peers, TransportError};
use crate::codec::encode;
use crate::ids::GroupId;
use crate::raft::{Entry, NodeId, NodeInfo, Snapshot, SnapshotData, TypeConfig, Vote};

/// Creates connections for one group. Without peers (a single node), every connection reports
/// its target unreachable.
#[derive(Clone)]
pub struct NetworkFactory {
    group: GroupId,
    peers: Option<Peers>,
    min_timeout: Duration,
}

impl NetworkFactory {
    /// `min_timeout` is the least time any raft RPC gets (the minimum election timeout, below).
    pub fn new(group: GroupId, peers: Option<Peers>, min_timeout: Duration) -> Self {
        Self {
            group,
            peers,
            min_timeout,
        }
    }
}

/// A connection to one peer for one group.
pub struct Connection {
    group: GroupId,
    target: NodeId,
    peers: Option<Peers>,
    /// openraft gives heartbeats and votes ¾ of the heartbeat interval (75 ms by default), less
    /// than one round trip between regions: every heartbeat would time out, no leader would
    /// hold a lease or answer a read index, and elections would fail. Waiting longer than the
    /// minimum election timeout is pointless (the follower has moved on), so that is the floor.
    min_timeout: Duration,
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
            min_timeout: self.min_timeout,
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

/// Payload bytes one AppendEntries carries at most, unless its first entry alone is bigger.
const APPEND_BATCH_BYTES: usize = 8 << 20;

/// Extra time an AppendEntries gets per MiB of payload, on top of openraft's timeout (a fraction
/// of the heartbeat interval, sized for small entries): the transfer and the follower's write
/// and fsync of a large batch take longer, and timing it out would only resend it.
const APPEND_TIME_PER_MIB: Duration = Duration::from_millis(100);

/// How many of `entries` go in one request and their payload bytes.
fn batch_prefix(entries: &[Entry]) -> (usize, usize) {
    let mut bytes = 0;
    for (i, e) in entries.iter().enumerate() {
        let b = match &e.payload {
            EntryPayload::Normal(req) => req.cmd.payload_bytes(),
            _ => 0,
        };
        if i > 0 && bytes + b > APPEND_BATCH_BYTES {
            return (i, bytes);
        }
        bytes += b;
    }
    (entries.len(), bytes)
}

/// The least time an AppendEntries carrying entries gets. A follower answers only once the
/// entries are on disk, and an fsync behind megabytes of other writes can outlast openraft's
/// timeout (a fraction of the heartbeat interval): timing out then means sending the same
/// entries again, and writing them again, to a disk that is already the bottleneck.
const APPEND_MIN_TIMEOUT: Duration = Duration::from_secs(1);

fn append_timeout(base: Duration, entries: usize, bytes: usize) -> Duration {
    if entries == 0 {
        return base;
    }
    let t = base + APPEND_TIME_PER_MIB * u32::try_from(bytes.div_ceil(1 << 20)).unwrap_or(u32::MAX);
    t.max(APPEND_MIN_TIMEOUT)
}

impl Connection {
    /// Sends one raft RPC (`call` names its kind and the group), counted as `kind`.
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        call: fn(GroupId) -> Call,
        kind: &'static str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let Some(peers) = &self.peers else {
            return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                "group {}: node {} is not reachable: this node has no cluster transport",
                self.group, self.target
            ))));
        };
        peers.raft_rpcs().count(kind);
        let reply: Result<Resp, String> = peers
            .call(
                self.target,
                call(self.group),
                &encode(req),
                timeout.max(self.min_timeout),
                Lane::BySize,
            )
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
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // openraft bounds a batch by entries only (300): with large payloads that is hundreds
        // of MiB, over the peer's body limit and its time budget, and replication would retry
        // the same batch for ever. Send a prefix of at most APPEND_BATCH_BYTES (always at least
        // one entry) and report how far it got; openraft sends the rest next.
        let (keep, bytes) = batch_prefix(&rpc.entries);
        let partial = keep < rpc.entries.len();
        rpc.entries.truncate(keep);
        let last = rpc.entries.last().map(|e| e.log_id);
        let timeout = append_timeout(option.soft_ttl(), keep, bytes);
        // An AppendEntries without entries is a heartbeat (or a commit index update).
        let kind = if keep == 0 { "heartbeat" } else { "append" };
        let resp: AppendEntriesResponse<TypeConfig> =
            self.call(Call::Append, kind, &rpc, timeout).await?;
        Ok(match resp {
            AppendEntriesResponse::Success if partial => {
                AppendEntriesResponse::PartialSuccess(last)
            }
            other => other,
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Call::Vote, "vote", &rpc, option.soft_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Call::PreVote, "prevote", &rpc, option.soft_ttl())
            .await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Call::Transfer, "transfer", &req, option.soft_ttl())
            .await
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
                    .call(
                        Call::Snapshot,
                        "snapshot_chunk",
                        &part,
                        Duration::from_secs(60),
                    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ApiKeyId, KubbiId, RequestId, TokenHash};
    use crate::state::{Blob, Body, Command, Create, Request};

    const MIB: usize = 1 << 20;

    fn blank(index: u64) -> Entry {
        openraft::testing::blank_ent::<TypeConfig>(1, 1, index)
    }

    /// An entry creating a kubbi with `payload` bytes of sealed content.
    fn create(index: u64, payload: usize) -> Entry {
        let mut e = blank(index);
        e.payload = EntryPayload::Normal(Request {
            request_id: RequestId::random(),
            now: 0,
            cmd: Command::Create(Box::new(Create {
                id: KubbiId::new_in_shard(0),
                owner: ApiKeyId([1; 16]),
                token_hash: TokenHash([2; 32]),
                ttl_ms: 60_000,
                max_retrievals: Some(1),
                body: Body::Single {
                    content_type: "text/plain".into(),
                },
                metadata: None,
                parts: vec![Blob(vec![0; payload])],
                manifest: None,
                retention_ms: 0,
                idempotency: None,
                quota: None,
            })),
        });
        e
    }

    #[test]
    fn a_batch_stops_before_the_byte_budget_but_always_carries_one_entry() {
        // Small entries: all of them.
        let small: Vec<Entry> = (1..=300).map(|i| create(i, 1024)).collect();
        assert_eq!(batch_prefix(&small), (300, 300 * 1024));
        // 16 MiB entries: one per request, however many are waiting.
        let big: Vec<Entry> = (1..=5).map(|i| create(i, 16 * MIB)).collect();
        assert_eq!(batch_prefix(&big), (1, 16 * MIB));
        // Up to the budget exactly, and not one byte past it; blank entries weigh nothing.
        let mixed = vec![
            create(1, 5 * MIB),
            blank(2),
            create(3, 3 * MIB),
            create(4, 1),
        ];
        assert_eq!(batch_prefix(&mixed), (3, 8 * MIB));
        assert_eq!(batch_prefix(&[]), (0, 0));
    }

    /// Batches of small entries whose encoding lands just under a decoder size class (64 KiB)
    /// used to be refused by the follower as over the limit, and resent for ever.
    #[test]
    fn batches_of_every_size_decode_on_the_follower() {
        for n in (1..=300).step_by(7) {
            for payload in [0, 1000] {
                let rpc = AppendEntriesRequest::<TypeConfig> {
                    vote: openraft::Vote::new(1, 1),
                    prev_log_id: None,
                    leader_commit: None,
                    entries: (1..=n).map(|i| create(i, payload)).collect(),
                };
                let bytes = crate::codec::encode(&rpc);
                let back: AppendEntriesRequest<TypeConfig> = crate::codec::decode("append", &bytes)
                    .unwrap_or_else(|e| {
                        panic!("{n} entries of {payload} B ({} B): {e}", bytes.len())
                    });
                assert_eq!(back.entries.len(), rpc.entries.len());
            }
        }
    }

    #[test]
    fn a_big_batch_gets_time_for_its_bytes() {
        let base = Duration::from_millis(75);
        // A heartbeat keeps openraft's timeout; entries get at least the floor.
        assert_eq!(append_timeout(base, 0, 0), base);
        assert_eq!(append_timeout(base, 1, 0), APPEND_MIN_TIMEOUT);
        assert_eq!(append_timeout(base, 1, 1), APPEND_MIN_TIMEOUT);
        assert_eq!(
            append_timeout(base, 1, 16 * MIB),
            base + APPEND_TIME_PER_MIB * 16
        );
        let long = Duration::from_secs(2);
        assert_eq!(append_timeout(long, 3, 1), long + APPEND_TIME_PER_MIB);
    }
}
