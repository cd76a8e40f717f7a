//! API keys: a replicated table in the system group, mirrored in memory on every node for
//! authentication.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::crypto::{self, ct_eq};
use crate::ids::{ApiKeyId, GroupId, SYSTEM_GROUP};
use crate::raft::state_machine::ApplyObserver;
use crate::state::{ApiKeyRecord, Outcome, StateRead, StoreError, Table, keys};
use crate::storage::Storage;

/// Every API key of the cluster by the SHA-256 of the key, updated as the system group applies.
pub struct KeyCache {
    storage: Arc<Storage>,
    by_hash: RwLock<HashMap<[u8; 32], ApiKeyRecord>>,
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
        });
        cache.reload()?;
        Ok(cache)
    }

    fn reload(&self) -> Result<(), StoreError> {
        let all = read_all(&self.storage.read_view(SYSTEM_GROUP))?;
        let map = all.into_iter().map(|r| (r.key_hash, r)).collect();
        *self.by_hash.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(())
    }

    /// Merges records read from the system group's leader (newer than this node's apply).
    pub fn merge(&self, records: Vec<ApiKeyRecord>) {
        let mut map = self.by_hash.write().unwrap_or_else(|p| p.into_inner());
        for r in records {
            map.insert(r.key_hash, r);
        }
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

/// A new key record for `label`, and the key itself (shown once).
pub fn new_key(
    label: String,
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
    };
    (rec, key)
}
