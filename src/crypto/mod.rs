//! Sealing payloads, deriving keys and handling secrets.
//!
//! ```text
//!   claim token ──HKDF-SHA256(salt = kubbi id)──▶ payload key (one request, in memory only)
//!                                                   │
//!        file i / single content / manifest ◀───────┘  XChaCha20-Poly1305,
//!                                                      random 24-byte nonce,
//!                                                      AAD = "kubbi/v1" ‖ id ‖ part index
//!
//!   node key ring (key file) ──▶ producer metadata, AAD = id
//!   API key (presented, never stored) ──HKDF──▶ idempotent-create replay key
//! ```
//!
//! A sealed blob is `nonce ‖ ciphertext ‖ tag`. Plaintext returned by [`open`] is wrapped in
//! [`Zeroizing`] so it is wiped when dropped.

mod keyring;

pub use keyring::{KeyRing, KeyRingError};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::ids::KubbiId;

/// Nonce length of XChaCha20-Poly1305.
pub const NONCE_LEN: usize = 24;
/// Authentication tag length.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed blob adds to its plaintext.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Part index of the sealed file manifest of a package.
pub const MANIFEST_PART: u32 = u32::MAX;

/// A 256-bit symmetric key, wiped on drop.
pub type SymmetricKey = Zeroizing<[u8; 32]>;

/// Sealing or opening failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("sealed data is truncated")]
    Truncated,
    #[error("authentication failed: wrong key or tampered data")]
    Authentication,
    #[error("unknown key id {key_id} in the node key ring")]
    UnknownKey { key_id: u32 },
}

fn hkdf(ikm: &[u8], salt: &[u8], info: &[u8]) -> SymmetricKey {
    let hk = Hkdf::<Sha256>::new(Some(salt), ikm);
    let mut okm = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 8160-byte limit: expand cannot fail.
    if hk.expand(info, &mut okm[..]).is_err() {
        unreachable!("HKDF output length is fixed at 32 bytes");
    }
    okm
}

/// The key that seals a kubbi's payload and manifest, derived from its claim token.
pub fn payload_key(token_secret: &[u8], id: &KubbiId) -> SymmetricKey {
    hkdf(token_secret, &id.0, b"kubbi/v1/payload")
}

/// The key that seals an idempotent create's replayable response: only the producer presenting
/// the same API key and `Idempotency-Key` can derive it again.
pub fn replay_key(api_key: &str, idempotency_key_hash: &[u8; 32]) -> SymmetricKey {
    hkdf(
        api_key.as_bytes(),
        idempotency_key_hash,
        b"kubbi/v1/idempotent-create",
    )
}

/// Associated data binding a payload part to its kubbi and position.
pub fn part_aad(id: &KubbiId, part: u32) -> [u8; 28] {
    let mut aad = [0u8; 28];
    aad[..8].copy_from_slice(b"kubbi/v1");
    aad[8..24].copy_from_slice(&id.0);
    aad[24..].copy_from_slice(&part.to_be_bytes());
    aad
}

/// Seals `plaintext` under `key` with a fresh random nonce. Returns `nonce ‖ ciphertext ‖ tag`.
pub fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(key.into());
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    let ct = match cipher.encrypt(
        &XNonce::from(nonce),
        Payload {
            msg: plaintext,
            aad,
        },
    ) {
        Ok(ct) => ct,
        // Encryption only fails for messages beyond 256 GiB; payloads are capped far below.
        Err(_) => unreachable!("XChaCha20-Poly1305 refused a bounded plaintext"),
    };
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

/// Opens a blob made by [`seal`].
///
/// # Errors
/// [`CryptoError::Truncated`] when the blob is too short, [`CryptoError::Authentication`] when
/// the key, the associated data or the bytes do not match.
pub fn open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(CryptoError::Truncated);
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Truncated)?;
    let cipher = XChaCha20Poly1305::new(key.into());
    cipher
        .decrypt(&XNonce::from(nonce), Payload { msg: ct, aad })
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::Authentication)
}

/// SHA-256 of arbitrary bytes.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Compares two secret digests in constant time.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// `n` random bytes encoded as base64url without padding.
pub fn random_b64(n: usize) -> Zeroizing<String> {
    let mut b = Zeroizing::new(vec![0u8; n]);
    rand::rng().fill_bytes(&mut b);
    Zeroizing::new(URL_SAFE_NO_PAD.encode(&b[..]))
}

/// Prefix of every API key.
pub const API_KEY_PREFIX: &str = "kb_";

/// A freshly generated API key: `kb_` followed by 256 random bits.
pub fn generate_api_key() -> Zeroizing<String> {
    let body = random_b64(32);
    Zeroizing::new(format!("{API_KEY_PREFIX}{}", body.as_str()))
}

/// Whether `s` has the shape of an API key (checked before hashing and lookup).
pub fn looks_like_api_key(s: &str) -> bool {
    s.len() == API_KEY_PREFIX.len() + 43
        && s.starts_with(API_KEY_PREFIX)
        && s[API_KEY_PREFIX.len()..]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// The displayable prefix of an API key (`kb_` and 8 characters), safe to show and log.
pub fn api_key_prefix(key: &str) -> String {
    key.chars().take(API_KEY_PREFIX.len() + 8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_binding() {
        let id = KubbiId::new_in_shard(3);
        let key = payload_key(&[7u8; 32], &id);
        let sealed = seal(&key, &part_aad(&id, 0), b"secret payload");
        assert_eq!(sealed.len(), 14 + SEAL_OVERHEAD);
        assert!(!sealed.windows(14).any(|w| w == b"secret payload"));
        let opened = open(&key, &part_aad(&id, 0), &sealed).expect("opens");
        assert_eq!(&opened[..], b"secret payload");

        // Wrong part, wrong kubbi, wrong token, tampered bytes, truncation: all refused.
        assert_eq!(
            open(&key, &part_aad(&id, 1), &sealed),
            Err(CryptoError::Authentication)
        );
        let other = KubbiId::new_in_shard(3);
        assert_eq!(
            open(&key, &part_aad(&other, 0), &sealed),
            Err(CryptoError::Authentication)
        );
        let wrong = payload_key(&[8u8; 32], &id);
        assert_eq!(
            open(&wrong, &part_aad(&id, 0), &sealed),
            Err(CryptoError::Authentication)
        );
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(
            open(&key, &part_aad(&id, 0), &tampered),
            Err(CryptoError::Authentication)
        );
        assert_eq!(
            open(&key, &part_aad(&id, 0), &sealed[..20]),
            Err(CryptoError::Truncated)
        );
    }

    #[test]
    fn nonces_are_fresh() {
        let key = Zeroizing::new([1u8; 32]);
        assert_ne!(seal(&key, b"", b"x"), seal(&key, b"", b"x"));
    }

    #[test]
    fn payload_key_depends_on_token_and_id() {
        let a = KubbiId::new_in_shard(0);
        let b = KubbiId::new_in_shard(0);
        assert_ne!(*payload_key(&[1; 32], &a), *payload_key(&[1; 32], &b));
        assert_ne!(*payload_key(&[1; 32], &a), *payload_key(&[2; 32], &a));
        assert_eq!(*payload_key(&[1; 32], &a), *payload_key(&[1; 32], &a));
    }

    #[test]
    fn api_keys_have_their_shape() {
        let k = generate_api_key();
        assert!(looks_like_api_key(&k), "{}", k.len());
        assert!(!looks_like_api_key("kb_short"));
        assert!(!looks_like_api_key(&k.replace("kb_", "kx_")));
        assert_eq!(api_key_prefix(&k).len(), 11);
        assert_ne!(generate_api_key(), k);
    }

    #[test]
    fn ct_eq_compares() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
