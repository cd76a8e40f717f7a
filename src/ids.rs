//! Identifiers and the secrets that route requests.
//!
//! Every kubbi lives in one shard for its whole life. The shard is chosen at create time and is
//! written into both handles a client can present, so any node routes any request in one hop
//! without a lookup table:
//!
//! ```text
//!   token = base64url(no pad) of   [shard u16 BE][32 random bytes]      (46 chars)
//!   id    = UUID-shaped 16 bytes:  [shard u16 BE][14 bytes of SHA-256("kubbi id\0" ‖ token hash),
//!                                   v4 bits set]
//! ```
//!
//! The id is named by the token (key layout 3, [`KubbiId::for_token`]), so a claim or preview,
//! which presents the token, finds the record with one read and no token index. The id tells
//! nothing about the token: it is a hash of the token's hash, and the token has 256 random bits.
//! Kubbis created before layout 3 have random ids and a token index entry.
//!
//! The token is a capability: it is never logged (its `Debug` redacts), never stored (only
//! [`TokenHash`] is), and it is the key material for the payload key.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// A raft group on a node: a data group of the shard map (`state::map`) or the system group.
pub type GroupId = u16;

/// A logical shard: the routing field of every id and token. Every kubbi keeps its shard for
/// life, and every key of its state names it (see `state::keys`), so a range of shards can move
/// from one raft group to another. The shard map says which group holds each shard.
pub type Shard = u16;

/// How many logical shards there are: every value of [`Shard`].
pub const SHARD_SPACE: u32 = 1 << 16;

/// The group that holds cluster-wide records (API keys); it is not a kubbi shard.
pub const SYSTEM_GROUP: GroupId = u16::MAX;

/// Milliseconds since the Unix epoch, UTC. All stored and replicated times use this.
pub type Millis = u64;

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rng().fill_bytes(&mut b);
    b
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut hex = [0u8; 32];
    let mut n = 0;
    for (i, &c) in b.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if c != b'-' {
                return None;
            }
            continue;
        }
        hex[n] = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        n += 1;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = hex[2 * i] << 4 | hex[2 * i + 1];
    }
    Some(out)
}

fn fmt_uuid(b: &[u8; 16], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            f.write_str("-")?;
        }
        write!(f, "{byte:02x}")?;
    }
    Ok(())
}

macro_rules! uuid_id {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            /// Parses the hyphenated UUID form; `None` for anything else.
            pub fn parse(s: &str) -> Option<Self> {
                parse_uuid(s).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt_uuid(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }
    };
}

uuid_id!(
    /// A kubbi's public id. Its first two bytes name its shard.
    KubbiId
);
uuid_id!(
    /// An API key's public id (not the key).
    ApiKeyId
);

impl KubbiId {
    /// A fresh random id placed in `shard`.
    pub fn new_in_shard(shard: Shard) -> Self {
        let mut b: [u8; 16] = random_bytes();
        b[0..2].copy_from_slice(&shard.to_be_bytes());
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Self(b)
    }

    /// The id of the kubbi whose token hashes to `token` (layout 3): its shard followed by a
    /// domain-separated hash of the token hash, shaped like a v4 UUID.
    pub fn for_token(shard: Shard, token: &TokenHash) -> Self {
        let mut h = Sha256::new();
        h.update(b"kubbi id\0");
        h.update(token.0);
        let digest: [u8; 32] = h.finalize().into();
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&shard.to_be_bytes());
        b[2..].copy_from_slice(&digest[..14]);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Self(b)
    }

    /// Whether this id is the one [`KubbiId::for_token`] gives for `token` (a kubbi created in
    /// layout 3, which has no token index entry).
    pub fn is_named_by(&self, token: &TokenHash) -> bool {
        *self == Self::for_token(self.shard(), token)
    }

    /// The shard this id was created in (not range-checked against the shard count).
    pub fn shard(&self) -> Shard {
        u16::from_be_bytes([self.0[0], self.0[1]])
    }
}

impl ApiKeyId {
    /// A fresh random id.
    pub fn random() -> Self {
        let mut b: [u8; 16] = random_bytes();
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Self(b)
    }
}

/// Identifies one logical mutating request across retries and forwards (request-id dedup).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestId(pub [u8; 16]);

impl RequestId {
    /// A fresh random request id.
    pub fn random() -> Self {
        Self(random_bytes())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// SHA-256 of a claim token's raw bytes: the only form of the token the server keeps.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenHash(pub [u8; 32]);

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// Length of the encoded claim token.
pub const CLAIM_TOKEN_LEN: usize = 46;
const TOKEN_RAW_LEN: usize = 34;

/// A claim token: a bearer capability. `Debug` and `Display` never show it; use
/// [`ClaimToken::expose`] only to build the one response that hands it out.
#[derive(Clone)]
pub struct ClaimToken {
    raw: Zeroizing<[u8; TOKEN_RAW_LEN]>,
}

impl ClaimToken {
    /// A fresh token routed to `shard`, with 256 bits of entropy.
    pub fn generate(shard: Shard) -> Self {
        let mut raw = Zeroizing::new([0u8; TOKEN_RAW_LEN]);
        raw[0..2].copy_from_slice(&shard.to_be_bytes());
        rand::rng().fill_bytes(&mut raw[2..]);
        Self { raw }
    }

    /// Parses the encoded form. `None` for anything that is not exactly a token.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != CLAIM_TOKEN_LEN {
            return None;
        }
        let mut raw = Zeroizing::new([0u8; TOKEN_RAW_LEN]);
        let n = URL_SAFE_NO_PAD
            .decode_slice(s.as_bytes(), &mut raw[..])
            .ok()?;
        if n != TOKEN_RAW_LEN {
            return None;
        }
        Some(Self { raw })
    }

    /// The shard this token routes to.
    pub fn shard(&self) -> Shard {
        u16::from_be_bytes([self.raw[0], self.raw[1]])
    }

    /// The 32 secret bytes (key material for the payload key).
    pub fn secret(&self) -> &[u8] {
        &self.raw[2..]
    }

    /// The stored lookup form.
    pub fn hash(&self) -> TokenHash {
        TokenHash(Sha256::digest(&self.raw[..]).into())
    }

    /// The encoded token, for the create response and the claim URL only.
    pub fn expose(&self) -> Zeroizing<String> {
        Zeroizing::new(URL_SAFE_NO_PAD.encode(&self.raw[..]))
    }
}

impl fmt::Debug for ClaimToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClaimToken(<redacted>)")
    }
}

/// Formats milliseconds since the epoch as RFC 3339 UTC with milliseconds,
/// e.g. `2026-11-28T12:00:00.000Z`.
pub fn format_millis(ms: Millis) -> String {
    let secs = (ms / 1000) as i64;
    let millis = ms % 1000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubbi_id_round_trips_and_keeps_its_shard() {
        for shard in [0u16, 1, 15, 255, 4095] {
            let id = KubbiId::new_in_shard(shard);
            let s = id.to_string();
            assert_eq!(s.len(), 36);
            let back = KubbiId::parse(&s).expect("parses");
            assert_eq!(back, id);
            assert_eq!(back.shard(), shard);
            assert_eq!(KubbiId::parse(&s.to_uppercase()), Some(id));
        }
    }

    #[test]
    fn a_token_names_its_kubbi_id_and_no_other() {
        let t = ClaimToken::generate(4095);
        let id = KubbiId::for_token(t.shard(), &t.hash());
        assert_eq!(id.shard(), 4095, "the id routes like its token");
        assert_eq!(id, KubbiId::for_token(4095, &t.hash()), "deterministic");
        assert!(id.is_named_by(&t.hash()));
        let s = id.to_string();
        assert_eq!(&s[14..15], "4", "a v4 UUID: {s}");
        assert!(
            matches!(&s[19..20], "8" | "9" | "a" | "b"),
            "RFC 4122 variant: {s}"
        );
        let other = ClaimToken::generate(4095);
        assert_ne!(KubbiId::for_token(4095, &other.hash()), id);
        assert!(!id.is_named_by(&other.hash()));
        assert!(
            !KubbiId::new_in_shard(4095).is_named_by(&t.hash()),
            "a random id is not"
        );
        // Not the token hash itself: the id is public, the token hash is the lookup secret.
        assert_ne!(&id.0[2..], &t.hash().0[..14]);
    }

    #[test]
    fn kubbi_id_rejects_malformed() {
        for bad in [
            "",
            "not-a-uuid",
            "0000000-0000-4000-8000-0000000000000",
            "00000000x0000-4000-8000-000000000000",
            "g0000000-0000-4000-8000-000000000000",
            "00000000-0000-4000-8000-0000000000000",
        ] {
            assert_eq!(KubbiId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn token_round_trips_routes_and_redacts() {
        let t = ClaimToken::generate(7);
        let s = t.expose();
        assert_eq!(s.len(), CLAIM_TOKEN_LEN);
        let back = ClaimToken::parse(&s).expect("parses");
        assert_eq!(back.shard(), 7);
        assert_eq!(back.hash(), t.hash());
        assert_eq!(back.secret(), t.secret());
        assert!(!format!("{t:?}").contains(&s[4..]));
        assert_ne!(ClaimToken::generate(7).hash(), t.hash());
    }

    #[test]
    fn token_rejects_wrong_length_and_alphabet() {
        let t = ClaimToken::generate(1).expose();
        assert!(ClaimToken::parse(&t[1..]).is_none());
        assert!(ClaimToken::parse(&format!("{}A", &t[..])).is_none());
        let mut bad = t.to_string();
        bad.replace_range(0..1, "+");
        assert!(ClaimToken::parse(&bad).is_none());
        assert!(ClaimToken::parse(&"/".repeat(CLAIM_TOKEN_LEN)).is_none());
    }

    #[test]
    fn formats_rfc3339_millis() {
        assert_eq!(format_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_millis(1_795_867_200_123), "2026-11-28T12:00:00.123Z");
        assert_eq!(format_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
