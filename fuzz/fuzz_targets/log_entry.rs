//! What a node reads back from its own RocksDB: raft log entries and raft metadata (vote,
//! committed and purged log ids, membership, snapshot meta), the state machine's records (kubbi,
//! API key, node, stats, sealed-manifest plaintext, node identity), and the binary keys of the
//! owner index and the timer queue.
//!
//! The first byte selects the decoder; the rest is the stored bytes.
//!
//! Properties: `codec::decode` never panics and never over-allocates; whatever decodes
//! re-encodes to bytes that decode to an equal value and re-encode identically (see
//! `common.rs`), and is never longer than the input; a parsed owner-index or timer key is
//! rebuilt byte for byte by the function that writes it.
#![no_main]

#[path = "common.rs"]
mod common;

use common::{round_trip_eq, sample, write_seeds};
use kubbi::codec::encode;
use kubbi::ids::{ApiKeyId, KubbiId, RequestId};
use kubbi::raft::{Entry, LogId, SnapshotMeta, StoredMembership, Vote};
use kubbi::service::{ManifestEntry, Role};
use kubbi::state::keys;
use kubbi::state::{ApiKeyRecord, KubbiRecord, NodeRecord, OwnerEntry, ShardStats};
use libfuzzer_sys::fuzz_target;
use openraft::entry::RaftEntry;

fn seeds() -> Vec<(u8, Vec<u8>)> {
    let mut s: Vec<(u8, Vec<u8>)> = sample::entries().iter().map(|e| (0, encode(e))).collect();
    s.push((1, encode(&sample::vote())));
    s.push((2, encode(&Some(sample::log_id(2, 9)))));
    s.push((3, encode(&sample::log_id(1, 4))));
    s.push((4, encode(&sample::stored_membership())));
    s.push((
        5,
        encode(&SnapshotMeta {
            last_log_id: Some(sample::log_id(2, 9)),
            last_membership: sample::stored_membership(),
        }),
    ));
    s.push((6, encode(&sample::record())));
    // A stored record value of key layout 3: the record, then its tail (claim marks).
    let mut inline = sample::record();
    inline.claim_marks = Some(vec![kubbi::state::ClaimMark {
        request_id: RequestId([4; 16]),
        at: 1_795_867_300_000,
    }]);
    s.push((14, inline.to_value()));
    s.push((14, encode(&sample::record())));
    s.push((7, encode(&sample::api_key())));
    s.push((8, encode(&sample::node())));
    s.push((
        9,
        encode(&ShardStats {
            active: 3,
            active_bytes: 1000,
        }),
    ));
    s.push((
        10,
        encode(&vec![
            ManifestEntry {
                name: "a.txt".into(),
                content_type: "text/plain".into(),
                size_bytes: 5,
                role: Some(Role::Instructions),
                text: true,
            },
            ManifestEntry {
                name: "b.bin".into(),
                content_type: "application/octet-stream".into(),
                size_bytes: 300,
                role: None,
                text: false,
            },
        ]),
    ));
    s.push((11, encode(&(3u64, 16u16, 12345u64, 2u32))));
    let mut owner = vec![41];
    owner.extend(keys::owner(
        &ApiKeyId([8; 16]),
        1_795_867_200_000,
        &KubbiId([7; 16]),
    ));
    owner.push(0);
    owner.extend(1_795_868_100_000u64.to_be_bytes());
    s.push((12, owner));
    for t in [
        keys::Timer::Expire(KubbiId([7; 16])),
        keys::Timer::DropRequest(0x1234, RequestId([1; 16])),
        keys::Timer::DropCreateIdem(9, [2; 32]),
    ] {
        s.push((13, keys::timer(1_795_868_100_000, &t)));
    }
    s
}

fuzz_target!(init: write_seeds(&seeds()), |data: &[u8]| {
    let Some((&sel, data)) = data.split_first() else {
        return;
    };
    match sel % 15 {
        0 => {
            if let Some(e) = round_trip_eq::<Entry>("raft log entry", data) {
                let _ = e.log_id();
                let _ = format!("{e}");
            }
        }
        1 => drop(round_trip_eq::<Vote>("raft meta vote", data)),
        2 => drop(round_trip_eq::<Option<LogId>>("raft meta committed", data)),
        3 => drop(round_trip_eq::<LogId>("raft meta purged", data)),
        4 => drop(round_trip_eq::<StoredMembership>("state machine membership", data)),
        5 => drop(round_trip_eq::<SnapshotMeta>("state machine snapshot meta", data)),
        6 => drop(round_trip_eq::<KubbiRecord>("kubbi record", data)),
        7 => drop(round_trip_eq::<ApiKeyRecord>("api key", data)),
        8 => drop(round_trip_eq::<NodeRecord>("node", data)),
        9 => drop(round_trip_eq::<ShardStats>("stats", data)),
        10 => drop(round_trip_eq::<Vec<ManifestEntry>>("manifest", data)),
        11 => drop(round_trip_eq::<(u64, u16, u64, u32)>("node identity", data)),
        12 => {
            let n = usize::from(data.first().copied().unwrap_or(0)).min(data.len());
            let (key, value) = data.split_at(n);
            if let Some(e) = OwnerEntry::decode(key, value) {
                let owner = ApiKeyId(key[1..17].try_into().expect("owner id bytes"));
                assert_eq!(keys::owner(&owner, e.created_at, &e.id), key);
                assert_eq!(value.len(), 9);
                assert_eq!(value[1..9], e.expires_at.to_be_bytes());
            }
        }
        14 => {
            // A stored record value (layout 2: the record alone; 3: with its tail).
            if let Ok(rec) = KubbiRecord::from_value(data) {
                let again = KubbiRecord::from_value(&rec.to_value()).expect("re-encoded decodes");
                assert_eq!(again, rec);
            }
        }
        _ => {
            if let Some((due, t)) = keys::parse_timer(data) {
                assert_eq!(keys::timer(due, &t), data, "{t:?}");
                assert_eq!(
                    keys::shard_of_key(kubbi::state::Table::State, data),
                    Some(t.shard())
                );
            }
        }
    }
});
