//! Placement of kubbis on shards: pure functions.
//!
//! A new kubbi goes to a uniformly random shard, so load and leaders spread evenly. A create with
//! an `Idempotency-Key` goes to the shard chosen by the hash of (API key id, Idempotency-Key), so
//! every retry of it lands where the first attempt's record is.

use rand::Rng;

use crate::ids::GroupId;

/// A uniformly random shard in `0..shards`.
pub fn random_shard(shards: u16) -> GroupId {
    rand::rng().random_range(0..shards.max(1))
}

/// The shard of an idempotent create, from the SHA-256 of (API key id ‖ Idempotency-Key).
pub fn shard_of_key(key_hash: &[u8; 32], shards: u16) -> GroupId {
    let n = u64::from_be_bytes([
        key_hash[0],
        key_hash[1],
        key_hash[2],
        key_hash[3],
        key_hash[4],
        key_hash[5],
        key_hash[6],
        key_hash[7],
    ]);
    (n % u64::from(shards.max(1))) as GroupId
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_shards_cover_the_range() {
        let mut seen = [false; 16];
        for _ in 0..2_000 {
            let s = random_shard(16);
            assert!(s < 16);
            seen[s as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn keyed_shard_is_stable_and_in_range() {
        let k = crate::crypto::sha256(b"owner|key-1");
        assert_eq!(shard_of_key(&k, 16), shard_of_key(&k, 16));
        assert!(shard_of_key(&k, 16) < 16);
        assert_eq!(shard_of_key(&k, 1), 0);
    }
}
