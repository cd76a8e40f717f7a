//! The node-to-node messages of the internal port (`/internal/v1/...`), bincode-encoded:
//! the request bodies a node decodes (raft append / vote / pre-vote / transfer-leader, snapshot
//! parts, forwarded shard operations, joins, liveness pings) and the replies it decodes from its
//! peers (the shard map a joining node reads included).
//! The internal port requires the cluster secret, so an attacker here is a peer that is
//! compromised or speaking another version, or a corrupted stream.
//!
//! The first byte selects the message type; the rest is the body.
//!
//! Properties: `codec::decode` never panics and never over-allocates; whatever decodes
//! re-encodes to bytes that decode to an equal value (where the type has `PartialEq`) and
//! re-encode identically (see `common.rs`); the handler-side helpers that follow a decode
//! (`ShardOp::name`, assembling snapshot chunks) accept every decoded value.
#![no_main]

#[path = "common.rs"]
mod common;

use common::{round_trip, round_trip_eq, sample, write_seeds};
use kubbi::codec::encode;
use kubbi::ids::{KubbiId, RequestId, TokenHash};
use kubbi::raft::SnapshotMeta;
use kubbi::raft::quiet::QuietGroup;
use kubbi::raft::snapshot::{Chunk, Cursor, SnapshotItem};
use kubbi::raft::{SnapshotData, TypeConfig};
use kubbi::state::NodeRecord;
use kubbi::state::map::{GroupState, ShardMap};
use kubbi::state::{Outcome, Rejection};
use kubbi::transport::messages::{
    ExecError, Liveness, NodeStatus, ShardOp, ShardReply, SnapshotPart,
};
use libfuzzer_sys::fuzz_target;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use std::collections::BTreeMap;

fn seeds() -> Vec<(u8, Vec<u8>)> {
    let entries = sample::entries();
    let mut s = vec![
        (
            0,
            encode(&AppendEntriesRequest::<TypeConfig> {
                vote: sample::vote(),
                prev_log_id: Some(sample::log_id(1, 2)),
                entries: entries[2..6].to_vec(),
                leader_commit: Some(sample::log_id(1, 2)),
            }),
        ),
        (
            0,
            encode(&AppendEntriesRequest::<TypeConfig> {
                vote: sample::vote(),
                prev_log_id: None,
                entries: entries[..2].to_vec(),
                leader_commit: None,
            }),
        ),
        (
            1,
            encode(&VoteRequest::<TypeConfig> {
                vote: sample::vote(),
                last_log_id: Some(sample::log_id(2, 9)),
                leadership_transfer: false,
            }),
        ),
        (
            2,
            encode(&TransferLeaderRequest::<TypeConfig>::new(
                sample::vote(),
                2,
                Some(sample::log_id(2, 9)),
            )),
        ),
        (
            3,
            encode(&SnapshotPart {
                transfer: 99,
                vote: sample::vote(),
                meta: SnapshotMeta {
                    last_log_id: Some(sample::log_id(2, 9)),
                    last_membership: sample::stored_membership(),
                },
                chunk: Chunk {
                    items: vec![
                        SnapshotItem {
                            blob: false,
                            key: vec![1, 2, 3],
                            value: encode(&sample::record()),
                        },
                        SnapshotItem {
                            blob: true,
                            key: vec![7; 20],
                            value: vec![0xee; 40],
                        },
                    ],
                    next: Some(Cursor {
                        blob: true,
                        after: vec![7; 20],
                    }),
                },
                last: false,
            }),
        ),
    ];
    let ops = vec![
        ShardOp::Create {
            request_id: RequestId([1; 16]),
            create: Box::new(sample::create()),
        },
        ShardOp::Claim {
            request_id: RequestId([2; 16]),
            shard: 0x1234,
            token_hash: TokenHash([9; 32]),
            idempotency: None,
        },
        ShardOp::ByToken {
            shard: 0x1234,
            token_hash: TokenHash([9; 32]),
            with_manifest: true,
        },
        ShardOp::Get {
            ids: vec![KubbiId([7; 16]), KubbiId([6; 16])],
        },
        ShardOp::Propose {
            request_id: RequestId([3; 16]),
            cmd: sample::commands().remove(7),
        },
        ShardOp::Reconfigure {
            voters: (1..=3).map(|i| (i, sample::node_info(i))).collect(),
            learners: BTreeMap::from([(4, sample::node_info(4))]),
        },
        ShardOp::TransferLeader { to: 2 },
        ShardOp::Status,
    ];
    s.extend(ops.iter().map(|op| (4, encode(op))));
    s.push((5, encode(&sample::node())));
    s.push((
        6,
        encode(&Ok::<_, String>(
            AppendEntriesResponse::<TypeConfig>::Success,
        )),
    ));
    s.push((
        6,
        encode(&Err::<AppendEntriesResponse<TypeConfig>, _>(
            "stopped".to_string(),
        )),
    ));
    s.push((
        7,
        encode(&Ok::<_, String>(VoteResponse::<TypeConfig> {
            vote: sample::vote(),
            vote_granted: true,
            last_log_id: Some(sample::log_id(2, 9)),
        })),
    ));
    s.push((
        8,
        encode(&Ok::<TransferLeaderResponse<TypeConfig>, String>(Ok(()))),
    ));
    s.push((
        9,
        encode(&Ok::<_, String>(Some(SnapshotResponse::<TypeConfig>::new(
            sample::vote(),
        )))),
    ));
    for r in [
        Ok(ShardReply::Outcome(Outcome::Created(sample::record()))),
        Ok(ShardReply::Outcome(Outcome::Duplicate(Box::new(
            Outcome::Rejected(Rejection::NotFound),
        )))),
        Ok(ShardReply::Outcome(Outcome::Moved {
            group: 4,
            map_version: 2,
        })),
        Ok(ShardReply::Outcome(Outcome::Rejected(Rejection::NotOwned))),
        Ok(ShardReply::Records(vec![sample::record()])),
        Ok(ShardReply::System {
            keys: vec![sample::api_key()],
            nodes: vec![sample::node()],
        }),
        Err(ExecError::NotLeader { leader: Some(2) }),
        Err(ExecError::Unavailable("no quorum".into())),
        Err(ExecError::Moved {
            group: 4,
            map_version: 2,
        }),
        Err(ExecError::NotOwned),
    ] {
        s.push((10, encode(&r)));
    }
    s.push((11, encode(&Ok::<_, String>(sample::node()))));
    s.push((
        12,
        encode(&NodeStatus {
            node_id: 1,
            incarnation: 5,
            http: "10.0.0.1:8080".into(),
            zone: "eu/a".into(),
            groups: vec![(0, Some(1), 3), (65535, None, 2)],
        }),
    ));
    s.push((13, encode(&ShardMap::first(3, |g| vec![u64::from(g) + 1]))));
    // A map with a group an operator pinned (`kubbi cluster move`).
    let mut pinned = ShardMap::first(3, |g| vec![u64::from(g) + 1, 4]);
    if let Some(e) = pinned.groups.get_mut(&1) {
        e.state = GroupState::Placed;
    }
    s.push((13, encode(&pinned)));
    s.push((
        13,
        encode(&ShardMap::legacy(4, |g| vec![u64::from(g) % 3 + 1])),
    ));
    s.push((14, encode(&Liveness::default())));
    s.push((
        14,
        encode(&Liveness {
            quiet: vec![
                QuietGroup {
                    group: 0,
                    term: 3,
                    last_log_index: Some(41),
                },
                QuietGroup {
                    group: 65535,
                    term: 1,
                    last_log_index: None,
                },
            ],
            awake: vec![1, 2],
        }),
    ));
    s
}

fuzz_target!(init: write_seeds(&seeds()), |data: &[u8]| {
    let Some((&sel, data)) = data.split_first() else {
        return;
    };
    match sel % 15 {
        // Requests (internal::raft_rpc, internal::shard, internal::join).
        0 => {
            if let Some(r) = round_trip::<AppendEntriesRequest<TypeConfig>>("append", data) {
                let _ = format!("{r}");
            }
        }
        1 => drop(round_trip_eq::<VoteRequest<TypeConfig>>("vote", data)),
        2 => drop(round_trip_eq::<TransferLeaderRequest<TypeConfig>>("transfer", data)),
        3 => {
            if let Some(part) = round_trip::<SnapshotPart>("snapshot part", data) {
                let _ = SnapshotData::from_chunks(vec![part.chunk]);
            }
        }
        4 => {
            if let Some(op) = round_trip::<ShardOp>("shard op", data) {
                let _ = op.name();
                let _ = format!("{op:?}");
            }
        }
        5 => drop(round_trip_eq::<NodeRecord>("join", data)),
        // Replies (transport::Peers::post and raft_network::Connection::call).
        6 => drop(round_trip_eq::<Result<AppendEntriesResponse<TypeConfig>, String>>(
            "append reply",
            data,
        )),
        7 => drop(round_trip_eq::<Result<VoteResponse<TypeConfig>, String>>(
            "vote reply",
            data,
        )),
        8 => drop(round_trip_eq::<Result<TransferLeaderResponse<TypeConfig>, String>>(
            "transfer reply",
            data,
        )),
        9 => drop(round_trip_eq::<Result<Option<SnapshotResponse<TypeConfig>>, String>>(
            "snapshot reply",
            data,
        )),
        10 => {
            if let Some(r) = round_trip::<Result<ShardReply, ExecError>>("shard reply", data) {
                let _ = format!("{r:?}");
            }
        }
        11 => drop(round_trip_eq::<Result<NodeRecord, String>>("join reply", data)),
        13 => {
            // A joining node's map (node::map::fetch validates what decodes).
            if let Some(m) = round_trip_eq::<ShardMap>("shard map reply", data) {
                let _ = m.validate();
            }
        }
        // A liveness ping (internal::liveness).
        14 => drop(round_trip_eq::<Liveness>("liveness", data)),
        _ => {
            if let Some(s) = round_trip::<NodeStatus>("status reply", data) {
                let _ = format!("{s:?}");
            }
        }
    }
});
