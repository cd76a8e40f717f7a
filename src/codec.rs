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
/// # Errors
/// When the bytes are not a valid encoding of `T`.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map_err(|e| DecodeError {
            what,
            reason: e.to_string(),
        })?;
    if used != bytes.len() {
        return Err(DecodeError {
            what,
            reason: format!("{} trailing bytes", bytes.len() - used),
        });
    }
    Ok(value)
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
}
