//! The node key ring: keys that seal what producers may read without the claim token
//! (their `metadata`).
//!
//! The file is JSON, `{"current": 2, "keys": [{"id": 1, "key": "<base64 32 bytes>"}, ...]}`.
//! New data is sealed with `current`; every key in the file can still open what it sealed, so a
//! rotation adds a key and moves `current`, and an old key is removed once nothing sealed with it
//! is retained any more. Every node of a cluster must load the same file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{CryptoError, SymmetricKey, open, seal};
use crate::ids::KubbiId;

/// Loading or creating the key file failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyRingError {
    #[error("cannot read node key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write node key file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("node key file {path} is invalid: {reason}")]
    Invalid { path: String, reason: String },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    current: u32,
    keys: Vec<KeyEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: u32,
    key: String,
}

/// A loaded key ring. `Debug` shows key ids only.
#[derive(Clone)]
pub struct KeyRing {
    current: u32,
    keys: BTreeMap<u32, SymmetricKey>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("current", &self.current)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn meta_aad(id: &KubbiId) -> [u8; 29] {
    let mut aad = [0u8; 29];
    aad[..13].copy_from_slice(b"kubbi/v1/meta");
    aad[13..].copy_from_slice(&id.0);
    aad
}

impl KeyRing {
    /// A ring with one random key (tests, and the dev-mode file).
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(&mut key[..]);
        Self {
            current: 1,
            keys: BTreeMap::from([(1, key)]),
        }
    }

    /// Loads the key file at `path`.
    ///
    /// # Errors
    /// When the file cannot be read or is not a valid key file.
    pub fn load(path: &Path) -> Result<Self, KeyRingError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyRingError::Read {
            path: p.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| KeyRingError::Invalid { path: p, reason })
    }

    fn parse(text: &str) -> Result<Self, String> {
        let file: KeyFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut keys = BTreeMap::new();
        for entry in file.keys {
            let bytes = Zeroizing::new(
                STANDARD
                    .decode(entry.key.trim())
                    .map_err(|_| format!("key {} is not base64", entry.id))?,
            );
            let key: [u8; 32] = bytes[..]
                .try_into()
                .map_err(|_| format!("key {} is not 32 bytes", entry.id))?;
            if keys.insert(entry.id, Zeroizing::new(key)).is_some() {
                return Err(format!("key id {} appears twice", entry.id));
            }
        }
        if !keys.contains_key(&file.current) {
            return Err(format!("current key {} is not in the file", file.current));
        }
        Ok(Self {
            current: file.current,
            keys,
        })
    }

    /// Loads `path`, or creates it with one fresh key (mode 0600) when it does not exist.
    /// Returns the ring and whether it was created.
    ///
    /// # Errors
    /// When the file exists but is invalid, or cannot be created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), KeyRingError> {
        if path.exists() {
            return Ok((Self::load(path)?, false));
        }
        let ring = Self::generate();
        let file = KeyFile {
            current: ring.current,
            keys: ring
                .keys
                .iter()
                .map(|(id, k)| KeyEntry {
                    id: *id,
                    key: STANDARD.encode(&k[..]),
                })
                .collect(),
        };
        let text = Zeroizing::new(serde_json::to_string_pretty(&file).unwrap_or_default());
        crate::config::write_secret_file(path, text.as_bytes()).map_err(|source| {
            KeyRingError::Write {
                path: path.display().to_string(),
                source,
            }
        })?;
        Ok((ring, true))
    }

    /// Seals a kubbi's metadata with the current key. Returns the key id and the blob.
    pub fn seal_metadata(&self, id: &KubbiId, plaintext: &[u8]) -> (u32, Vec<u8>) {
        let key = &self.keys[&self.current];
        (self.current, seal(key, &meta_aad(id), plaintext))
    }

    /// Opens metadata sealed by [`KeyRing::seal_metadata`].
    ///
    /// # Errors
    /// When the key id is not in the ring or the blob does not authenticate.
    pub fn open_metadata(
        &self,
        id: &KubbiId,
        key_id: u32,
        blob: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let key = self
            .keys
            .get(&key_id)
            .ok_or(CryptoError::UnknownKey { key_id })?;
        open(key, &meta_aad(id), blob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_old_data_readable() {
        let id = KubbiId::new_in_shard(0);
        let old = KeyRing::parse(&format!(
            r#"{{"current":1,"keys":[{{"id":1,"key":"{}"}}]}}"#,
            STANDARD.encode([1u8; 32])
        ))
        .expect("valid");
        let (kid, blob) = old.seal_metadata(&id, br#"{"a":1}"#);
        assert_eq!(kid, 1);
        let rotated = KeyRing::parse(&format!(
            r#"{{"current":2,"keys":[{{"id":1,"key":"{}"}},{{"id":2,"key":"{}"}}]}}"#,
            STANDARD.encode([1u8; 32]),
            STANDARD.encode([2u8; 32])
        ))
        .expect("valid");
        assert_eq!(
            &rotated.open_metadata(&id, kid, &blob).expect("opens")[..],
            br#"{"a":1}"#
        );
        assert_eq!(rotated.seal_metadata(&id, b"x").0, 2);
        assert_eq!(
            KeyRing::generate().open_metadata(&id, 7, &blob),
            Err(CryptoError::UnknownKey { key_id: 7 })
        );
    }

    #[test]
    fn rejects_bad_files() {
        for bad in [
            "",
            r#"{"current":1,"keys":[]}"#,
            r#"{"current":1,"keys":[{"id":1,"key":"short"}]}"#,
            r#"{"current":1,"keys":[{"id":1,"key":"AAAA"}]}"#,
            r#"{"current":1,"keys":[],"extra":true}"#,
        ] {
            assert!(KeyRing::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_shows_no_key_material() {
        let ring = KeyRing::generate();
        let dbg = format!("{ring:?}");
        assert!(dbg.contains("key_ids"));
        assert!(!dbg.contains(&STANDARD.encode(&ring.keys[&1][..])));
    }
}
