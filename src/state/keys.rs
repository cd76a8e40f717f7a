//! Key layout of a shard's state (layout 2). Keys here carry no group prefix; the storage
//! adapter adds `group (u16 BE)` in front of every key so all groups share one RocksDB.
//!
//! Every key of a kubbi's state names its logical shard at a fixed place ([`shard_of_key`]), so
//! the keys of a range of shards can be found, copied and dropped when the range moves to
//! another raft group, request dedup and idempotency records included. Tables looked up by
//! shard have it right after the table byte, so one shard range is one key range.
//!
//! | table | key | value |
//! |---|---|---|
//! | `k` kubbi | `k ‖ id(16)` (the id starts with its shard; in layout 3 the token names it) | [`KubbiRecord`](super::KubbiRecord), then its tail: the claim marks |
//! | `t` token index | `t ‖ shard(2) ‖ token_hash(32)` | `id(16)`: kubbis of layout 2 only (random ids) |
//! | `o` owner index | `o ‖ owner(16) ‖ !created_at(8 BE) ‖ id(16)` | `status(1)` (newest first) |
//! | `x` timers | `x ‖ due(8 BE) ‖ kind(1) ‖ shard(2) ‖ subject` | empty |
//! | `r` request dedup | `r ‖ shard(2) ‖ request_id(16)` | [`Dedup`](super::apply) |
//! | `c` claim idempotency | `c ‖ shard(2) ‖ key(32)` | dedup with the sealed result |
//! | `i` create idempotency | `i ‖ shard(2) ‖ key(32)` | the first response, token sealed |
//! | `a` API keys (system group) | `a ‖ key_id(16)` | [`ApiKeyRecord`](super::ApiKeyRecord) |
//! | `n` nodes (system group) | `n ‖ node_id(8 BE)` | [`NodeRecord`](super::NodeRecord) |
//! | `s` stats | `s` | [`ShardStats`](super::ShardStats) (the group's, derived) |
//! | `u` owner usage | `u ‖ owner(16)` | [`OwnerUsage`](super::OwnerUsage) (the group's, derived) |
//! | `w` ownership | `w` | [`Ownership`](super::Ownership): the shard ranges the group serves |
//! | `m` group time | `m` | `u64 BE`: the latest stamp the group applied (its time never goes back) |
//! | `g` shard map (system group) | `g` | [`ShardMap`](super::map::ShardMap) |
//! | blob table | `id(16) ‖ part(4 BE)` | sealed part (`crypto::seal`) |
//!
//! Layout 3 writes, per create, the record, its owner-index entry, its expiry timer and its
//! sealed part (plus the group's running totals `s`, `u` and time `m`, once per applied batch),
//! and a claim of a kubbi of up to 16 retrievals rewrites the record alone until the last one
//! ends it (`docs/key-layout.md` gives each key's reason).
//!
//! Layout 1 (until layout 2) had no shard in `t`, `r`, `c`, `i` and the dedup timers: a data
//! directory in that layout is refused at start (`node::check_identity`).

use crate::ids::{ApiKeyId, KubbiId, Millis, RequestId, Shard, TokenHash};

pub const KUBBI: u8 = b'k';
pub const TOKEN: u8 = b't';
pub const OWNER: u8 = b'o';
pub const TIMER: u8 = b'x';
pub const REQUEST: u8 = b'r';
pub const CLAIM_IDEM: u8 = b'c';
pub const CREATE_IDEM: u8 = b'i';
pub const API_KEY: u8 = b'a';
pub const NODE: u8 = b'n';
pub const STATS: u8 = b's';
pub const USAGE: u8 = b'u';
pub const OWNERSHIP: u8 = b'w';
pub const MAP: u8 = b'g';
pub const CLOCK: u8 = b'm';

/// What a timer does when it is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    Expire(KubbiId),
    Purge(KubbiId),
    DropRequest(Shard, RequestId),
    DropClaimIdem(Shard, [u8; 32]),
    DropCreateIdem(Shard, [u8; 32]),
}

impl Timer {
    /// The logical shard whose state the timer belongs to.
    pub fn shard(&self) -> Shard {
        match self {
            Self::Expire(id) | Self::Purge(id) => id.shard(),
            Self::DropRequest(s, _) | Self::DropClaimIdem(s, _) | Self::DropCreateIdem(s, _) => *s,
        }
    }
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

pub fn kubbi(id: &KubbiId) -> Vec<u8> {
    cat(&[&[KUBBI], &id.0])
}

pub fn token(shard: Shard, hash: &TokenHash) -> Vec<u8> {
    cat(&[&[TOKEN], &shard.to_be_bytes(), &hash.0])
}

pub fn owner(owner: &ApiKeyId, created_at: Millis, id: &KubbiId) -> Vec<u8> {
    cat(&[&[OWNER], &owner.0, &(!created_at).to_be_bytes(), &id.0])
}

/// The prefix of all owner-index keys of `owner`.
pub fn owner_prefix(owner: &ApiKeyId) -> Vec<u8> {
    cat(&[&[OWNER], &owner.0])
}

/// Decodes `(created_at, id)` from an owner-index key.
pub fn parse_owner(key: &[u8]) -> Option<(Millis, KubbiId)> {
    if key.len() != 41 || key[0] != OWNER {
        return None;
    }
    let inv = u64::from_be_bytes(key[17..25].try_into().ok()?);
    let id = KubbiId(key[25..41].try_into().ok()?);
    Some((!inv, id))
}

pub fn request(shard: Shard, id: &RequestId) -> Vec<u8> {
    cat(&[&[REQUEST], &shard.to_be_bytes(), &id.0])
}

pub fn claim_idem(shard: Shard, key: &[u8; 32]) -> Vec<u8> {
    cat(&[&[CLAIM_IDEM], &shard.to_be_bytes(), key])
}

pub fn create_idem(shard: Shard, key: &[u8; 32]) -> Vec<u8> {
    cat(&[&[CREATE_IDEM], &shard.to_be_bytes(), key])
}

pub fn api_key(id: &ApiKeyId) -> Vec<u8> {
    cat(&[&[API_KEY], &id.0])
}

pub fn usage(owner: &ApiKeyId) -> Vec<u8> {
    cat(&[&[USAGE], &owner.0])
}

pub fn stats() -> Vec<u8> {
    vec![STATS]
}

pub fn ownership() -> Vec<u8> {
    vec![OWNERSHIP]
}

pub fn clock() -> Vec<u8> {
    vec![CLOCK]
}

pub fn map() -> Vec<u8> {
    vec![MAP]
}

/// The bounds `[from, to)` of the keys of table `table` whose shard is in `[lo, hi)`, for the
/// tables that put the shard right after the table byte (`t`, `r`, `c`, `i`) or first in the
/// subject (`k`: the id starts with it).
pub fn shard_range(table: u8, lo: Shard, hi: u32) -> (Vec<u8>, Vec<u8>) {
    let from = cat(&[&[table], &lo.to_be_bytes()]);
    let to = match Shard::try_from(hi) {
        Ok(hi) => cat(&[&[table], &hi.to_be_bytes()]),
        Err(_) => vec![table + 1],
    };
    (from, to)
}

/// Like [`shard_range`] for the blob table, whose keys start with the id.
pub fn blob_shard_range(lo: Shard, hi: u32) -> (Vec<u8>, Vec<u8>) {
    let to = match Shard::try_from(hi) {
        Ok(hi) => hi.to_be_bytes().to_vec(),
        Err(_) => vec![0xff; 21],
    };
    (lo.to_be_bytes().to_vec(), to)
}

pub fn node(id: u64) -> Vec<u8> {
    cat(&[&[NODE], &id.to_be_bytes()])
}

/// Blob-table key of one sealed part.
pub fn blob(id: &KubbiId, part: u32) -> Vec<u8> {
    cat(&[&id.0, &part.to_be_bytes()])
}

pub fn timer(due: Millis, t: &Timer) -> Vec<u8> {
    let due = due.to_be_bytes();
    let shard = t.shard().to_be_bytes();
    let (kind, subject): (u8, &[u8]) = match t {
        Timer::Expire(id) => (1, &id.0),
        Timer::Purge(id) => (2, &id.0),
        Timer::DropRequest(_, r) => (3, &r.0),
        Timer::DropClaimIdem(_, k) => (4, k),
        Timer::DropCreateIdem(_, k) => (5, k),
    };
    cat(&[&[TIMER], &due, &[kind], &shard, subject])
}

/// The exclusive upper bound of timer keys due at or before `now`.
pub fn timers_due_end(now: Millis) -> Vec<u8> {
    cat(&[&[TIMER], &now.saturating_add(1).to_be_bytes()])
}

/// The lower bound of all timer keys.
pub fn timers_start() -> Vec<u8> {
    vec![TIMER]
}

/// Decodes a timer key into its due time and action.
pub fn parse_timer(key: &[u8]) -> Option<(Millis, Timer)> {
    if key.len() < 12 || key[0] != TIMER {
        return None;
    }
    let due = u64::from_be_bytes(key[1..9].try_into().ok()?);
    let shard = u16::from_be_bytes([key[10], key[11]]);
    let subject = &key[12..];
    let t = match (key[9], subject.len()) {
        (1, 16) => Timer::Expire(KubbiId(subject.try_into().ok()?)),
        (2, 16) => Timer::Purge(KubbiId(subject.try_into().ok()?)),
        (3, 16) => Timer::DropRequest(shard, RequestId(subject.try_into().ok()?)),
        (4, 32) => Timer::DropClaimIdem(shard, subject.try_into().ok()?),
        (5, 32) => Timer::DropCreateIdem(shard, subject.try_into().ok()?),
        _ => return None,
    };
    // An expiry or purge names its kubbi's shard twice; both must agree.
    (t.shard() == shard).then_some((due, t))
}

/// The logical shard a state-table key belongs to, read from the key's bytes alone; `None`
/// for the group-wide keys (`s`, `u`, `w`, `m`, the system group's `a` and `n`) and for anything that is
/// not a well-formed key of a kubbi table.
pub fn shard_of_key(table: super::Table, key: &[u8]) -> Option<Shard> {
    let at = |i: usize| key.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    if table == super::Table::Blob {
        return (key.len() == 20).then(|| at(0)).flatten();
    }
    match (key.first()?, key.len()) {
        (&KUBBI, 17) => at(1),
        (&TOKEN | &CLAIM_IDEM | &CREATE_IDEM, 35) | (&REQUEST, 19) => at(1),
        (&OWNER, 41) => at(25),
        (&TIMER, _) => parse_timer(key).map(|(_, t)| t.shard()),
        _ => None,
    }
}

/// The exclusive end of a prefix range (`prefix` with its last byte incremented, carrying).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    vec![u8::MAX; prefix.len() + 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_keys_sort_newest_first_and_parse() {
        let o = ApiKeyId::random();
        let a = KubbiId::new_in_shard(0);
        let b = KubbiId::new_in_shard(0);
        let older = owner(&o, 1_000, &a);
        let newer = owner(&o, 2_000, &b);
        assert!(newer < older);
        assert_eq!(parse_owner(&older), Some((1_000, a)));
        assert!(older.starts_with(&owner_prefix(&o)));
    }

    #[test]
    fn timers_sort_by_due_and_parse() {
        let id = KubbiId::new_in_shard(1);
        let all = [
            Timer::Expire(id),
            Timer::Purge(id),
            Timer::DropRequest(7, RequestId([9; 16])),
            Timer::DropClaimIdem(8, [3; 32]),
            Timer::DropCreateIdem(9, [4; 32]),
        ];
        for t in all {
            let k = timer(500, &t);
            assert_eq!(parse_timer(&k), Some((500, t)));
            assert_eq!(
                shard_of_key(crate::state::Table::State, &k),
                Some(t.shard())
            );
            assert!(k < timers_due_end(500));
            assert!(k >= timers_due_end(499));
        }
        assert!(timer(1, &all[0]) < timer(2, &all[0]));
        assert_eq!(parse_timer(b"x"), None);
        // An expiry whose shard field disagrees with its id is not a timer of this layout.
        let mut forged = timer(500, &all[0]);
        forged[10] ^= 0xff;
        assert_eq!(parse_timer(&forged), None);
    }

    #[test]
    fn every_kubbi_key_names_its_shard_and_group_wide_keys_none() {
        use crate::state::Table;
        let shard = 0xbeef;
        let id = KubbiId::new_in_shard(shard);
        let owner_id = ApiKeyId::random();
        let th = TokenHash([5; 32]);
        for (table, k) in [
            (Table::State, kubbi(&id)),
            (Table::State, token(shard, &th)),
            (Table::State, owner(&owner_id, 42, &id)),
            (Table::State, request(shard, &RequestId([1; 16]))),
            (Table::State, claim_idem(shard, &[2; 32])),
            (Table::State, create_idem(shard, &[3; 32])),
            (Table::State, timer(9, &Timer::Expire(id))),
            (Table::Blob, blob(&id, 3)),
        ] {
            assert_eq!(shard_of_key(table, &k), Some(shard), "{k:02x?}");
        }
        for k in [
            stats(),
            usage(&owner_id),
            api_key(&owner_id),
            node(4),
            vec![],
        ] {
            assert_eq!(shard_of_key(Table::State, &k), None, "{k:02x?}");
        }
        // A prefix or a longer key is not a key of the table.
        assert_eq!(shard_of_key(Table::State, &token(shard, &th)[..20]), None);
    }

    #[test]
    fn prefix_end_carries() {
        assert_eq!(prefix_end(&[1, 2]), vec![1, 3]);
        assert_eq!(prefix_end(&[1, 255]), vec![2]);
        assert_eq!(prefix_end(&[255]), vec![255, 255]);
    }
}
