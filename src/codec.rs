//! Binary encoding of everything kubbi stores or sends between nodes: bincode 2 over serde,
//! standard configuration (varint integers, little endian).
//!
//! bincode cannot encode untagged enums, `#[serde(flatten)]` or `serde_json::Value`; stored and
//! replicated types avoid them. Byte buffers use `serde_bytes` so they are copied, not encoded
//! element by element.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A stored or received value could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode {what}: {reason}")]
pub struct DecodeError {
    pub what: &'static str,
    pub reason: String,
}

/// Encodes `value`. Encoding into a `Vec` cannot fail for the types kubbi defines.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    match bincode::serde::encode_to_vec(value, bincode::config::standard()) {
        Ok(v) => v,
        Err(e) => unreachable!("bincode encoding into a Vec failed: {e}"),
    }
}

/// Decodes a whole buffer; trailing bytes are an error.
///
/// A string or byte buffer may not declare more bytes than the input's size class holds (see
/// [`decode_limited`]): a few bytes cannot make the decoder allocate gigabytes.
///
/// # Errors
/// When the bytes are not a valid encoding of `T`.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, used) = decode_prefix(what, bytes)?;
    if used != bytes.len() {
        return Err(DecodeError {
            what,
            reason: format!("{} trailing bytes", bytes.len() - used),
        });
    }
    Ok(value)
}

/// Decodes a `T` from the start of `bytes` and says how many bytes it took; what follows is the
/// caller's (a stored value with a suffix, such as a kubbi record with its tail).
///
/// # Errors
/// When the bytes do not start with a valid encoding of `T`.
pub fn decode_prefix<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<(T, usize), DecodeError> {
    const KIB: usize = 1 << 10;
    const MIB: usize = 1 << 20;
    const GIB: usize = 1 << 30;
    let standard = bincode::config::standard();
    // bincode's limit counts what decoding claims: the length of every string and byte buffer,
    // and the in-memory size of every integer and length prefix however few bytes its varint
    // took (a u64 claims 8 for one byte, a u128 16). So a valid encoding claims at most
    // CLAIMS_PER_BYTE times its own length, and the class of that bound never refuses one.
    // A few classes bound the allocation by the class without instantiating the decoder for
    // every size; the largest internal body (64 MiB) stays in the 1 GiB class.
    let claims = bytes.len().saturating_mul(CLAIMS_PER_BYTE);
    if claims <= 64 * KIB {
        decode_limited(what, bytes, standard.with_limit::<{ 64 * KIB }>())
    } else if claims <= 64 * MIB {
        decode_limited(what, bytes, standard.with_limit::<{ 64 * MIB }>())
    } else if claims <= GIB {
        decode_limited(what, bytes, standard.with_limit::<{ GIB }>())
    } else {
        decode_limited(what, bytes, standard.with_limit::<{ 4 * GIB }>())
    }
}

/// The most bytes bincode claims toward its limit per encoded byte (a u128 in a one-byte
/// varint). Inputs above 4 GiB / 16 = 256 MiB could exceed the largest class; none of ours
/// comes near (internal bodies stop at 64 MiB).
const CLAIMS_PER_BYTE: usize = 16;

/// Decodes with `config`, whose limit caps the bytes that strings and byte buffers may claim.
///
/// bincode 2 allocates a string or byte buffer at its declared length *before* reading it, so
/// without a limit a length prefix near `u64::MAX` makes the allocation fail and aborts the
/// process (found by the `log_entry` and `internal_messages` fuzz targets).
fn decode_limited<T: DeserializeOwned, C: bincode::config::Config>(
    what: &'static str,
    bytes: &[u8],
    config: C,
) -> Result<(T, usize), DecodeError> {
    bincode::serde::decode_from_slice(bytes, config).map_err(|e| DecodeError {
        what,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        a: u64,
        #[serde(with = "serde_bytes")]
        b: Vec<u8>,
        c: Option<String>,
    }

    #[test]
    fn round_trip_and_reject_garbage() {
        let s = Sample {
            a: 300,
            b: vec![1, 2, 3],
            c: Some("x".into()),
        };
        let bytes = encode(&s);
        assert_eq!(decode::<Sample>("sample", &bytes).expect("decodes"), s);
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode::<Sample>("sample", &long).is_err());
        assert!(decode::<Sample>("sample", &bytes[..bytes.len() - 1]).is_err());
    }

    /// A length prefix far beyond the input used to make bincode allocate that much first (an
    /// abort for lengths the allocator refuses). Fuzz regression: `log_entry`, `internal_messages`.
    #[test]
    fn a_huge_declared_length_is_an_error_not_an_allocation() {
        // varint 0xfd: a u64 follows.
        let mut huge = vec![0xfd];
        huge.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode::<String>("string", &huge).is_err());
        assert!(decode::<serde_bytes::ByteBuf>("bytes", &huge).is_err());
        let mut sample = vec![44]; // a = 44
        sample.extend_from_slice(&huge); // b claims 2^60 bytes
        assert!(decode::<Sample>("sample", &sample).is_err());
        // Lengths that fit the limit but not the input fail as before.
        let mut short = vec![0xfb];
        short.extend_from_slice(&60_000u16.to_le_bytes());
        short.extend_from_slice(&[b'x'; 10]);
        assert!(decode::<String>("string", &short).is_err());
    }

    /// Small integers claim their in-memory size: 60 KB of one-byte u64s claims 480 KB, and
    /// was refused as over the 64 KiB class (raft batches of small entries near 64 KiB were
    /// refused by every follower, for ever).
    #[test]
    fn encodings_of_many_small_integers_decode_at_every_size() {
        for n in [
            1,
            4 * 1024 - 1,
            4 * 1024,
            4 * 1024 + 1,
            60_000,
            64 * 1024,
            300_000,
        ] {
            let v: Vec<u64> = (0..n as u64).map(|i| i % 100).collect();
            let bytes = encode(&v);
            assert_eq!(decode::<Vec<u64>>("u64s", &bytes).expect("u64s decode"), v);
            let w: Vec<u128> = vec![1; n];
            let bytes = encode(&w);
            assert_eq!(
                decode::<Vec<u128>>("u128s", &bytes).expect("u128s decode"),
                w
            );
        }
    }

    #[test]
    fn values_at_the_size_class_edges_decode() {
        // 64 KiB and 64 MiB of input are where the 64 MiB and 1 GiB classes begin.
        for n in [
            0,
            64 * 1024 - 9,
            64 * 1024,
            64 * 1024 + 1,
            3 << 20,
            (64 << 20) - 16,
            (64 << 20) + 1,
        ] {
            let s = Sample {
                a: n as u64,
                b: vec![7; n],
                c: Some("x".repeat(n % 1000)),
            };
            let bytes = encode(&s);
            assert_eq!(decode::<Sample>("sample", &bytes).expect("decodes"), s);
        }
    }
}
