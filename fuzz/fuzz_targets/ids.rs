//! Parsing of the ids and tokens clients present (`KubbiId::parse`, `ApiKeyId::parse`,
//! `ClaimToken::parse`) and the timestamp format of every response (`ids::format_millis`).
//!
//! The input is read both as a string to parse and as raw bytes to format.
//!
//! Properties:
//! - an id parses iff the `uuid` crate parses the same 36-character hyphenated text, to the
//!   same bytes, and the parsed id formats back to the input in lower case;
//! - any 16 bytes format to an id that parses back to the same bytes and shard;
//! - a token parses iff the text is 46 characters of canonical unpadded base64url of 34 bytes;
//!   a parsed token exposes exactly the input, routes to the shard in its first two bytes and
//!   never shows up in its `Debug`;
//! - `format_millis` agrees with the `time` crate's RFC 3339 parser for every time up to year
//!   9999, and never panics beyond it.
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kubbi::ids::{ApiKeyId, CLAIM_TOKEN_LEN, ClaimToken, KubbiId, format_millis};
use libfuzzer_sys::fuzz_target;

/// 9999-12-31T23:59:59.999Z
const MAX_4_DIGIT_YEAR_MS: u64 = 253_402_300_799_999;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        check_id_text(s);
        check_token_text(s);
    }
    if let Some(b) = data.get(..16) {
        let b: [u8; 16] = b.try_into().expect("16 bytes");
        let id = KubbiId(b);
        let text = id.to_string();
        assert_eq!(text.len(), 36);
        assert_eq!(KubbiId::parse(&text), Some(id));
        assert_eq!(KubbiId::parse(&text.to_uppercase()), Some(id));
        assert_eq!(id.shard(), u16::from_be_bytes([b[0], b[1]]));
        assert_eq!(ApiKeyId::parse(&text), Some(ApiKeyId(b)));
    }
    if let Some(raw) = data.get(..34) {
        let text = URL_SAFE_NO_PAD.encode(raw);
        let t = ClaimToken::parse(&text).expect("an encoded token parses");
        assert_eq!(t.expose().as_str(), text);
        assert_eq!(t.shard(), u16::from_be_bytes([raw[0], raw[1]]));
        assert_eq!(t.secret(), &raw[2..]);
    }
    if let Some(b) = data.get(..8) {
        let ms = u64::from_le_bytes(b.try_into().expect("8 bytes"));
        check_millis(ms);
        check_millis(ms % (MAX_4_DIGIT_YEAR_MS + 1));
    }
});

fn check_id_text(s: &str) {
    let k = KubbiId::parse(s);
    let a = ApiKeyId::parse(s);
    assert_eq!(k.map(|k| k.0), a.map(|a| a.0));
    let reference = if s.len() == 36 {
        uuid::Uuid::try_parse(s).ok().map(|u| *u.as_bytes())
    } else {
        None
    };
    assert_eq!(k.map(|k| k.0), reference, "{s:?}");
    if let Some(k) = k {
        assert_eq!(k.to_string(), s.to_ascii_lowercase());
    }
}

fn check_token_text(s: &str) {
    let reference = URL_SAFE_NO_PAD
        .decode(s)
        .ok()
        .filter(|b| b.len() == 34 && s.len() == CLAIM_TOKEN_LEN);
    let t = ClaimToken::parse(s);
    assert_eq!(t.is_some(), reference.is_some(), "{s:?}");
    if let (Some(t), Some(raw)) = (t, reference) {
        assert_eq!(t.expose().as_str(), s);
        assert_eq!(t.shard(), u16::from_be_bytes([raw[0], raw[1]]));
        assert_eq!(t.secret(), &raw[2..]);
        let shown = format!("{t:?}");
        assert!(!shown.contains(&s[2..]), "the token leaks through Debug");
    }
}

fn check_millis(ms: u64) {
    let s = format_millis(ms);
    if ms > MAX_4_DIGIT_YEAR_MS {
        return;
    }
    assert_eq!(s.len(), 24, "{s}");
    let t = time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{s} is not RFC 3339: {e}"));
    assert_eq!(t.unix_timestamp_nanos(), i128::from(ms) * 1_000_000, "{s}");
}
