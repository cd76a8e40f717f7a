#![allow(dead_code)]
//! Shared by the bincode targets: decode, and check that what decodes round-trips.

use std::fmt::Debug;

use kubbi::codec::{decode, encode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Decodes `data` as `T` the way kubbi does (`codec::decode`: whole buffer, standard config).
/// When it decodes, the value re-encodes to bytes that decode again and re-encode to the same
/// bytes (so what a node writes or sends, it and its peers read back). Returns the value.
pub fn round_trip<T: Serialize + DeserializeOwned>(what: &'static str, data: &[u8]) -> Option<T> {
    let x: T = decode(what, data).ok()?;
    let bytes = encode(&x);
    assert!(
        bytes.len() <= data.len(),
        "{what}: re-encoding grew the value"
    );
    let y: T = decode(what, &bytes)
        .unwrap_or_else(|e| panic!("{what}: a re-encoded value does not decode: {e}"));
    assert_eq!(encode(&y), bytes, "{what}: encoding is not stable");
    Some(x)
}

/// [`round_trip`] plus: the value decoded from the re-encoding equals the first one, and
/// `Debug` works.
pub fn round_trip_eq<T: Serialize + DeserializeOwned + PartialEq + Debug>(
    what: &'static str,
    data: &[u8],
) -> Option<T> {
    let x: T = round_trip(what, data)?;
    let y: T = decode(what, &encode(&x)).expect("checked by round_trip");
    assert_eq!(x, y, "{what}: the round trip changed the value");
    let _ = format!("{x:?}");
    Some(x)
}

/// When `KUBBI_FUZZ_SEEDS` names a directory, writes `seeds` there (`seed-<n>`), each prefixed
/// with its selector byte. `scripts/fuzz` does not do this; it is how the committed corpora
/// were started (see fuzz/README.md).
pub fn write_seeds(seeds: &[(u8, Vec<u8>)]) {
    let Some(dir) = std::env::var_os("KUBBI_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("seed directory");
    for (n, (sel, bytes)) in seeds.iter().enumerate() {
        let mut data = vec![*sel];
        data.extend_from_slice(bytes);
        std::fs::write(dir.join(format!("seed-{n:03}")), data).expect("write seed");
    }
}

/// Sample values of the stored and replicated types, for seeds.
pub mod sample {
    use std::collections::{BTreeMap, BTreeSet};

    use kubbi::ids::{ApiKeyId, KubbiId, RequestId, TokenHash};
    use kubbi::raft::{Entry, LogId, NodeInfo, StoredMembership, TypeConfig, Vote};
    use kubbi::state::{
        ApiKeyRecord, Blob, Body, ClaimIdempotency, Command, Create, CreateIdempotency,
        KubbiRecord, NodeRecord, NodeState, Request, Sealed, Status,
    };
    use openraft::entry::RaftEntry;

    pub fn log_id(term: u64, index: u64) -> LogId {
        openraft::testing::log_id::<TypeConfig>(term, 1, index)
    }

    pub fn vote() -> Vote {
        Vote::new(3, 1)
    }

    pub fn node_info(i: u64) -> NodeInfo {
        NodeInfo {
            http: format!("10.0.0.{i}:8080"),
            internal: format!("10.0.0.{i}:9090"),
            zone: "eu/a".into(),
        }
    }

    pub fn membership() -> openraft::Membership<u64, NodeInfo> {
        let voters = BTreeSet::from([1, 2, 3]);
        let nodes: BTreeMap<u64, NodeInfo> = (1..=4).map(|i| (i, node_info(i))).collect();
        openraft::Membership::new(vec![voters], nodes).expect("membership")
    }

    pub fn stored_membership() -> StoredMembership {
        StoredMembership::new(Some(log_id(2, 6)), membership())
    }

    pub fn record() -> KubbiRecord {
        KubbiRecord {
            id: KubbiId([7; 16]),
            owner: ApiKeyId([8; 16]),
            token_hash: TokenHash([9; 32]),
            status: Status::Active,
            created_at: 1_795_867_200_123,
            expires_at: 1_795_868_100_123,
            ended_at: None,
            max_retrievals: Some(3),
            retrieval_count: 1,
            first_retrieved_at: Some(1_795_867_300_000),
            last_retrieved_at: Some(1_795_867_300_000),
            body: Body::Package {
                file_count: 2,
                total_size_bytes: 300,
            },
            metadata: Some(Sealed {
                key_id: 1,
                blob: vec![1, 2, 3, 4],
            }),
            parts: 2,
            has_manifest: true,
            retention_ms: 86_400_000,
            stored_bytes: 400,
            claim_marks: None,
        }
    }

    pub fn api_key() -> ApiKeyRecord {
        ApiKeyRecord {
            id: ApiKeyId([8; 16]),
            key_hash: [5; 32],
            key_prefix: "kb_abcd".into(),
            label: "ci".into(),
            created_at: 1_795_867_200_000,
            revoked_at: None,
            limits: kubbi::state::KeyLimits {
                max_active: Some(100),
                max_bytes: None,
                max_creates_per_day: Some(1_000),
                rate_per_second: Some(50),
            },
        }
    }

    pub fn node() -> NodeRecord {
        NodeRecord {
            id: 2,
            http: "10.0.0.2:8080".into(),
            internal: "10.0.0.2:9090".into(),
            zone: "eu/b".into(),
            incarnation: 77,
            state: NodeState::Active,
            updated_at: 1_795_867_200_000,
        }
    }

    pub fn create() -> Create {
        Create {
            id: KubbiId([7; 16]),
            owner: ApiKeyId([8; 16]),
            token_hash: TokenHash([9; 32]),
            ttl_ms: 900_000,
            max_retrievals: None,
            body: Body::Single {
                content_type: "text/plain".into(),
            },
            metadata: None,
            parts: vec![Blob(vec![0xaa; 24])],
            manifest: None,
            retention_ms: 86_400_000,
            idempotency: Some(CreateIdempotency {
                key: [3; 32],
                body_hash: [4; 32],
                sealed_token: vec![6; 40],
                window_ms: 86_400_000,
            }),
            quota: Some(kubbi::state::QuotaCheck {
                max_active: Some(100),
                max_bytes: Some(1 << 20),
                max_creates_per_day: None,
                elsewhere: kubbi::state::OwnerUsage {
                    active: 3,
                    bytes: 4_096,
                    day: 20_785,
                    creates: 9,
                },
            }),
        }
    }

    pub fn commands() -> Vec<Command> {
        vec![
            Command::Create(Box::new(create())),
            Command::Claim {
                token_hash: TokenHash([9; 32]),
                idempotency: Some(ClaimIdempotency {
                    key: [1; 32],
                    window_ms: 60_000,
                }),
            },
            Command::Delete {
                id: KubbiId([7; 16]),
                owner: ApiKeyId([8; 16]),
            },
            Command::Expire {
                id: KubbiId([7; 16]),
            },
            Command::Sweep { max: 100 },
            Command::PutApiKey(api_key()),
            Command::RevokeApiKey {
                id: ApiKeyId([8; 16]),
            },
            Command::PutNode(node()),
            Command::SetNodeState {
                id: 2,
                state: NodeState::Leaving,
            },
            Command::ClaimIn {
                shard: 0x1234,
                token_hash: TokenHash([9; 32]),
                idempotency: None,
            },
            Command::Adopt {
                ranges: vec![(0, 0x8000), (0x9000, 0x1_0000)],
                map_version: 1,
            },
            Command::Split {
                ranges: vec![(0x9000, 0x1_0000)],
                target: 4,
                map_version: 2,
                voters: vec![kubbi::state::Replica {
                    id: 1,
                    http: "10.0.0.1:8080".into(),
                    internal: "10.0.0.1:7070".into(),
                    zone: "eu/a".into(),
                }],
            },
            Command::Release { target: 4 },
            Command::PutMap {
                expect_version: 3,
                map: Box::new(kubbi::state::map::ShardMap::legacy(4, |s| {
                    vec![u64::from(s) + 1, 9]
                })),
            },
        ]
    }

    pub fn entries() -> Vec<Entry> {
        let mut v = vec![
            Entry::new_blank(log_id(1, 1)),
            Entry::new_membership(log_id(1, 2), membership()),
        ];
        for (i, cmd) in commands().into_iter().enumerate() {
            v.push(Entry::new_normal(
                log_id(2, 3 + i as u64),
                Request {
                    request_id: RequestId([i as u8; 16]),
                    now: 1_795_867_200_000 + i as u64,
                    cmd,
                },
            ));
        }
        v
    }
}
