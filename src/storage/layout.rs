//! The version of the state's key layout (`state::keys`), and the one-time upgrade of a data
//! directory written in an older one.
//!
//! Layout 1 kept the token index, request dedup, both idempotency tables and the timers of
//! a group without the logical shard they belong to: in that layout group and shard were the
//! same thing. Layout 2 names the shard in every key of a kubbi's state, so that a range of
//! shards can later leave its group. The upgrade runs at start, before any group does, on a
//! node whose identity record says layout 1: it rewrites those keys with the group's shard (the
//! system group's records belong to shard 0, as `state::Command::shard` says). It is a pure
//! function of each key, so every replica of a group ends byte-identical, and it is resumable:
//! old and new keys of every table have different lengths, so a run cut short by a crash
//! skips what it already rewrote and finishes the rest.
//!
//! Layout 3 (see [`LAYOUT`]) changed no existing key: from layout 2 the upgrade only records
//! the new number.

use rocksdb::{IteratorMode, WriteBatch};

use super::{CF_STATE, Storage, group_key};
use crate::ids::{GroupId, SYSTEM_GROUP, Shard};
use crate::state::keys;

/// The key layout this build reads and writes.
///
/// Layout 3 names a new kubbi's id by its token (`KubbiId::for_token`: no token index entry) and
/// stores a tail after a record's encoding (`KubbiRecord::to_value`: the claim marks that stand
/// in for request-dedup records). It reads everything layout 2 wrote as it is (random ids
/// through their token index, records without a tail), so a layout-2 directory needs no
/// rewrite, only the new number: a build of layout 2 must not open it, as it cannot read those
/// records.
///
/// Layout 4 keeps the raft log in segment files (`storage::segments`) instead of the
/// `raft_log` family; its state keys are layout 3's. `Storage::open` moves an older directory's
/// entries over; a build of layout 3 must not open it, as it would find no log.
pub const LAYOUT: u32 = 4;

/// Bytes of rewritten keys collected before they are written.
const UPGRADE_BATCH_BYTES: usize = 4 << 20;

/// The layout-2 form of a layout-1 state key of `group` (without the group prefix); `None` for
/// a key that both layouts write alike (records, owner index, aggregates, API keys, nodes,
/// the state machine's meta) or that is already in layout 2.
pub fn v2_state_key(group: GroupId, key: &[u8]) -> Option<Vec<u8>> {
    let shard: Shard = if group == SYSTEM_GROUP { 0 } else { group };
    let insert_at = |at: usize, shard: Shard| {
        let mut v = Vec::with_capacity(key.len() + 2);
        v.extend_from_slice(&key[..at]);
        v.extend_from_slice(&shard.to_be_bytes());
        v.extend_from_slice(&key[at..]);
        v
    };
    match (*key.first()?, key.len()) {
        (keys::TOKEN | keys::CLAIM_IDEM | keys::CREATE_IDEM, 33) | (keys::REQUEST, 17) => {
            Some(insert_at(1, shard))
        }
        // x ‖ due(8) ‖ kind ‖ subject: an expiry or purge names its kubbi, whose id starts
        // with its shard; the dedup timers take the group's.
        (keys::TIMER, 26) if matches!(key[9], 1 | 2) => {
            Some(insert_at(10, u16::from_be_bytes([key[10], key[11]])))
        }
        (keys::TIMER, 26) if key[9] == 3 => Some(insert_at(10, shard)),
        (keys::TIMER, 42) if matches!(key[9], 4 | 5) => Some(insert_at(10, shard)),
        _ => None,
    }
}

/// Rewrites every layout-1 key of the state family into layout 2 and makes the result durable.
/// Returns how many keys it rewrote.
///
/// # Errors
/// When RocksDB fails to read, write or sync.
pub fn upgrade_to_v2(storage: &Storage) -> Result<u64, rocksdb::Error> {
    let db = storage.db();
    let cf = storage.cf(CF_STATE);
    let mut batch = WriteBatch::default();
    let mut rewritten = 0u64;
    // The iterator reads the state as it was when it was made; keys written meanwhile are in
    // layout 2, which the rewrite would skip anyway.
    for item in db.iterator_cf(cf, IteratorMode::Start) {
        let (k, v) = item?;
        let Some((prefix, key)) = k.split_first_chunk::<2>() else {
            continue;
        };
        let group = GroupId::from_be_bytes(*prefix);
        if let Some(new) = v2_state_key(group, key) {
            batch.delete_cf(cf, &k);
            batch.put_cf(cf, group_key(group, &new), &v);
            rewritten += 1;
            if batch.size_in_bytes() >= UPGRADE_BATCH_BYTES {
                db.write(std::mem::take(&mut batch))?;
            }
        }
    }
    db.write(batch)?;
    db.flush_wal(true)?;
    Ok(rewritten)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{KubbiId, RequestId, TokenHash};
    use crate::state::Table;
    use crate::state::keys::Timer;

    /// Layout-1 keys as the previous `state::keys` wrote them.
    fn v1_keys(id: &KubbiId) -> Vec<Vec<u8>> {
        let cat = |parts: &[&[u8]]| parts.concat();
        let due = 77u64.to_be_bytes();
        vec![
            cat(&[b"t", &[4; 32]]),
            cat(&[b"r", &[5; 16]]),
            cat(&[b"c", &[6; 32]]),
            cat(&[b"i", &[7; 32]]),
            cat(&[b"x", &due, &[1], &id.0]),
            cat(&[b"x", &due, &[2], &id.0]),
            cat(&[b"x", &due, &[3], &[5; 16]]),
            cat(&[b"x", &due, &[4], &[6; 32]]),
            cat(&[b"x", &due, &[5], &[7; 32]]),
        ]
    }

    #[test]
    fn layout_1_keys_become_the_keys_layout_2_writes() {
        let group = 12;
        let id = KubbiId::new_in_shard(group);
        let expected = vec![
            keys::token(group, &TokenHash([4; 32])),
            keys::request(group, &RequestId([5; 16])),
            keys::claim_idem(group, &[6; 32]),
            keys::create_idem(group, &[7; 32]),
            keys::timer(77, &Timer::Expire(id)),
            keys::timer(77, &Timer::Purge(id)),
            keys::timer(77, &Timer::DropRequest(group, RequestId([5; 16]))),
            keys::timer(77, &Timer::DropClaimIdem(group, [6; 32])),
            keys::timer(77, &Timer::DropCreateIdem(group, [7; 32])),
        ];
        for (old, new) in v1_keys(&id).iter().zip(&expected) {
            assert_eq!(v2_state_key(group, old).as_ref(), Some(new), "{old:02x?}");
            // Already upgraded: left alone (what makes a resumed upgrade safe).
            assert_eq!(v2_state_key(group, new), None, "{new:02x?}");
            assert_eq!(keys::shard_of_key(Table::State, new), Some(group));
        }
        // The system group's records belong to shard 0.
        assert_eq!(
            v2_state_key(SYSTEM_GROUP, &[b"r".as_slice(), &[5; 16]].concat()),
            Some(keys::request(0, &RequestId([5; 16])))
        );
        // Keys both layouts share.
        for same in [
            keys::kubbi(&id),
            keys::owner(&crate::ids::ApiKeyId([1; 16]), 5, &id),
            keys::stats(),
            keys::usage(&crate::ids::ApiKeyId([1; 16])),
            keys::api_key(&crate::ids::ApiKeyId([1; 16])),
            keys::node(3),
            b"mapplied".to_vec(),
        ] {
            assert_eq!(v2_state_key(group, &same), None, "{same:02x?}");
        }
    }

    #[test]
    fn the_upgrade_rewrites_a_real_database_once_and_keeps_everything_else() {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = Storage::open(dir.path()).expect("opens");
        let cf = storage.cf(CF_STATE);
        let group = 3;
        let id = KubbiId::new_in_shard(group);
        for (i, k) in v1_keys(&id).iter().enumerate() {
            storage
                .db()
                .put_cf(cf, group_key(group, k), [i as u8])
                .expect("put");
        }
        let record = group_key(group, &keys::kubbi(&id));
        storage.db().put_cf(cf, &record, b"rec").expect("put");
        assert_eq!(upgrade_to_v2(&storage).expect("upgrades"), 9);
        // Run again (a restart after a crash right at the end): nothing left to do.
        assert_eq!(upgrade_to_v2(&storage).expect("upgrades"), 0);
        let all: Vec<Box<[u8]>> = storage
            .db()
            .iterator_cf(cf, IteratorMode::Start)
            .map(|kv| kv.map(|(k, _)| k))
            .collect::<Result<_, _>>()
            .expect("reads");
        assert_eq!(all.len(), 10);
        for k in &all {
            assert_eq!(
                keys::shard_of_key(Table::State, &k[2..]),
                Some(group),
                "{k:02x?}"
            );
        }
        let token = group_key(group, &keys::token(group, &TokenHash([4; 32])));
        assert_eq!(
            storage.db().get_cf(cf, token).expect("get").as_deref(),
            Some(&[0u8][..])
        );
        assert_eq!(
            storage.db().get_cf(cf, &record).expect("get").as_deref(),
            Some(&b"rec"[..])
        );
    }
}
