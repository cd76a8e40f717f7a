//! API keys: a replicated table in the system group, mirrored in memory on every node for
//! authentication.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::crypto::{self, ct_eq};
use crate::ids::{ApiKeyId, GroupId, SYSTEM_GROUP};
use crate::raft::state_machine::ApplyObserver;
use crate::state::{ApiKeyRecord, KeyLimits, Outcome, StateRead, StoreError, Table, keys};
use crate::storage::Storage;

/// How long a node trusts its key cache after reading the key table from the system group's
/// leader. A node that cannot renew within this lease stops accepting API keys (`503`), so a
/// revocation holds on every node once it is committed and either every node has re-read the
/// table or this long has passed.
pub const KEY_LEASE: Duration = Duration::from_secs(5);

/// How often a node renews its key cache lease.
pub const KEY_RENEW_EVERY: Duration = Duration::from_secs(1);

/// Every API key of the cluster by the SHA-256 of the key, updated as the system group applies
/// and renewed from the system group's leader (see [`KEY_LEASE`]).
pub struct KeyCache {
    storage: Arc<Storage>,
    by_hash: RwLock<HashMap<[u8; 32], ApiKeyRecord>>,
    /// Until when the cache is known to hold every revocation committed before it was renewed.
    fresh_until: Mutex<Option<Instant>>,
}

impl KeyCache {
    /// Loads every stored key.
    ///
    /// # Errors
    /// When the system group's state cannot be read or decoded.
    pub fn load(storage: Arc<Storage>) -> Result<Arc<Self>, StoreError> {
        let cache = Arc::new(Self {
            storage,
            by_hash: RwLock::new(HashMap::new()),
            fresh_until: Mutex::new(None),
        });
        cache.reload()?;
        Ok(cache)
    }

    fn reload(&self) -> Result<(), StoreError> {
        let all = read_all(&self.storage.read_view(SYSTEM_GROUP))?;
        let mut map: HashMap<[u8; 32], ApiKeyRecord> =
            all.into_iter().map(|r| (r.key_hash, r)).collect();
        let mut cur = self.by_hash.write().unwrap_or_else(|p| p.into_inner());
        // Revocations learnt from the leader stay, even if this replica has not applied them.
        for (h, r) in cur.drain() {
            if r.revoked_at.is_some() {
                map.insert(h, r);
            }
        }
        *cur = map;
        Ok(())
    }

    /// Merges records read from the system group's leader (newer than this node's apply).
    /// A revocation is final: a read that began before it was applied here can never bring the
    /// key back.
    pub fn merge(&self, records: Vec<ApiKeyRecord>) {
        let mut map = self.by_hash.write().unwrap_or_else(|p| p.into_inner());
        for r in records {
            match map.get(&r.key_hash) {
                Some(have) if have.revoked_at.is_some() && r.revoked_at.is_none() => {}
                _ => {
                    map.insert(r.key_hash, r);
                }
            }
        }
    }

    /// Records the key table as read from the system group's leader by a read that began at
    /// `started`: the cache now holds every change committed before `started`.
    pub fn renewed(&self, records: Vec<ApiKeyRecord>, started: Instant) {
        self.merge(records);
        let mut f = self.fresh_until.lock().unwrap_or_else(|p| p.into_inner());
        let until = started + KEY_LEASE;
        if f.is_none_or(|t| t < until) {
            *f = Some(until);
        }
    }

    /// Whether the lease still holds at `now`.
    pub fn is_fresh(&self, now: Instant) -> bool {
        self.fresh_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| now < t)
    }

    /// Whether the presented string is shaped like a key known to this node (revoked or not).
    pub fn knows(&self, presented: &str) -> bool {
        crypto::looks_like_api_key(presented)
            && self
                .by_hash
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&crypto::sha256(presented.as_bytes()))
    }

    /// The record of a presented key, if it exists and is not revoked.
    pub fn authenticate(&self, presented: &str) -> Option<ApiKeyRecord> {
        if !crypto::looks_like_api_key(presented) {
            return None;
        }
        let hash = crypto::sha256(presented.as_bytes());
        let map = self.by_hash.read().unwrap_or_else(|p| p.into_inner());
        let rec = map.get(&hash)?;
        // The lookup is by a hash of the secret; the final comparison is constant-time anyway.
        (ct_eq(&rec.key_hash, &hash) && rec.revoked_at.is_none()).then(|| rec.clone())
    }
}

impl ApplyObserver for KeyCache {
    fn applied(&self, group: GroupId, outcome: &Outcome, _here: bool) {
        if group != SYSTEM_GROUP {
            return;
        }
        let rec = match outcome {
            Outcome::ApiKeyStored(r) | Outcome::ApiKeyRevoked(r) => r,
            Outcome::Duplicate(inner) => return self.applied(group, inner, false),
            _ => return,
        };
        self.by_hash
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.key_hash, rec.clone());
    }

    fn state_replaced(&self, group: GroupId) {
        if group == SYSTEM_GROUP
            && let Err(e) = self.reload()
        {
            tracing::error!(error = %e, "cannot reload API keys after a snapshot");
        }
    }
}

/// Every stored API key, oldest first.
///
/// # Errors
/// When the state cannot be read or a record does not decode.
pub fn read_all(view: &impl StateRead) -> Result<Vec<ApiKeyRecord>, StoreError> {
    let prefix = [keys::API_KEY];
    let rows = view.scan(
        Table::State,
        &prefix,
        &keys::prefix_end(&prefix),
        usize::MAX,
    )?;
    let mut out = Vec::with_capacity(rows.len());
    for (k, v) in rows {
        out.push(
            crate::codec::decode::<ApiKeyRecord>("api key", &v).map_err(|e| {
                StoreError::Corrupt {
                    key: format!("{k:02x?}"),
                    reason: e.to_string(),
                }
            })?,
        );
    }
    out.sort_by_key(|r| (r.created_at, r.id));
    Ok(out)
}

/// A new key record for `label` with its `limits`, and the key itself (shown once).
pub fn new_key(
    label: String,
    limits: KeyLimits,
    now: crate::ids::Millis,
) -> (ApiKeyRecord, zeroize::Zeroizing<String>) {
    let key = crypto::generate_api_key();
    let rec = ApiKeyRecord {
        id: ApiKeyId::random(),
        key_hash: crypto::sha256(key.as_bytes()),
        key_prefix: crypto::api_key_prefix(&key),
        label,
        created_at: now,
        revoked_at: None,
        limits,
    };
    (rec, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> (tempfile::TempDir, Arc<KeyCache>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path()).expect("opens");
        let cache = KeyCache::load(storage).expect("loads");
        (dir, cache)
    }

    #[test]
    fn a_stale_read_never_brings_a_revoked_key_back() {
        let (_dir, cache) = cache();
        let (rec, key) = new_key("ci".into(), KeyLimits::default(), 1_000);
        cache.merge(vec![rec.clone()]);
        assert!(cache.authenticate(&key).is_some());
        let revoked = ApiKeyRecord {
            revoked_at: Some(2_000),
            ..rec.clone()
        };
        cache.merge(vec![revoked]);
        assert!(cache.authenticate(&key).is_none());
        // A read that began before the revocation arrives late.
        cache.merge(vec![rec]);
        assert!(cache.authenticate(&key).is_none(), "revocation is final");
        assert!(cache.knows(&key));
    }

    #[test]
    fn the_lease_runs_from_when_the_read_began() {
        let (_dir, cache) = cache();
        let t0 = Instant::now();
        assert!(!cache.is_fresh(t0), "no lease before the first renewal");
        cache.renewed(Vec::new(), t0);
        assert!(cache.is_fresh(t0 + KEY_LEASE - Duration::from_millis(1)));
        assert!(!cache.is_fresh(t0 + KEY_LEASE));
        // An older read finishing later does not shorten or extend the lease.
        cache.renewed(Vec::new(), t0 - Duration::from_secs(1));
        assert!(cache.is_fresh(t0 + KEY_LEASE - Duration::from_millis(1)));
    }
}
