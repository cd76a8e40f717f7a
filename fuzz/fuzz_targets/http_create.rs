//! The create request body, as the `POST /api/v1/kubbis` handler decodes it:
//! `validate::parse_json` then `validate::create_input`, under the default limits and under
//! tight ones (so every limit edge is reachable with small inputs).
//!
//! Properties:
//! - `parse_json` accepts exactly the JSON documents serde_json accepts that have no object
//!   with a repeated key (checked against an independent key-keeping parser), and returns the
//!   same value serde_json does;
//! - whatever `create_input` accepts obeys every rule of API.md: ttl and retrievals in range,
//!   metadata an object within its limit, single content a text or JSON type whose bytes are
//!   the submitted string (or the submitted JSON text, which parses to the submitted value),
//!   packages of 1..=max_files files with valid, case-insensitively unique names, MIME types,
//!   and a decoded total within the payload limit.
#![no_main]

use std::collections::HashSet;

use base64::Engine;
use kubbi::config::Limits;
use kubbi::error::ErrorCode;
use kubbi::http::validate::{create_input, is_mime_type, is_valid_file_name, parse_json};
use kubbi::service::CreateBody;
use libfuzzer_sys::fuzz_target;
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let parsed = parse_json(data);
    let plain = serde_json::from_slice::<Value>(data);
    let dup = serde_json::from_slice::<Tree>(data).map(|t| t.0);
    match (&parsed, &plain, &dup) {
        (Ok(v), Ok(p), Ok(false)) => assert_eq!(v, p, "parse_json changed the value"),
        (Err(e), Ok(_), Ok(true)) => {
            assert_eq!(e.code, ErrorCode::ValidationError);
            assert!(e.messages[0].contains("a key twice"), "{:?}", e.messages);
        }
        (Err(e), Err(_), _) => assert_eq!(e.code, ErrorCode::ValidationError),
        _ => panic!(
            "parse_json disagrees: parse_json ok={} serde_json ok={} duplicate={:?}",
            parsed.is_ok(),
            plain.is_ok(),
            dup.as_ref().ok()
        ),
    }
    let Ok(v) = parsed else { return };
    let tight = Limits {
        max_files: 3,
        max_ttl_seconds: 100,
        default_ttl_seconds: 10,
        max_retrievals_limit: 5,
        max_metadata_bytes: 32,
        max_payload_bytes: 16,
        ..Limits::default()
    };
    for limits in [Limits::default(), tight] {
        check_create(&v, data, &limits);
    }
});

fn check_create(v: &Value, raw: &[u8], limits: &Limits) {
    let input = match create_input(v.clone(), raw, limits) {
        Ok(i) => i,
        Err(e) => {
            assert!(
                matches!(
                    e.code,
                    ErrorCode::ValidationError | ErrorCode::PayloadTooLarge
                ),
                "{e:?}"
            );
            return;
        }
    };
    let obj = v.as_object().expect("only an object is accepted");
    const TOP: &[&str] = &[
        "content",
        "content_type",
        "files",
        "ttl_seconds",
        "max_retrievals",
        "metadata",
    ];
    assert!(
        obj.keys().all(|k| TOP.contains(&k.as_str())),
        "unknown field accepted"
    );
    assert!((1..=limits.max_ttl_seconds).contains(&input.ttl_seconds));
    if let Some(m) = input.max_retrievals {
        assert!((1..=limits.max_retrievals_limit).contains(&m));
    }
    match &input.metadata_json {
        Some(m) => {
            assert!(m.len() <= limits.max_metadata_bytes);
            let back: Value = serde_json::from_slice(m).expect("metadata is JSON");
            assert!(back.is_object());
            assert_eq!(Some(&back), obj.get("metadata"));
        }
        None => assert!(obj.get("metadata").is_none_or(Value::is_null)),
    }
    match &input.body {
        CreateBody::Single {
            content_type,
            content,
        } => {
            assert!(obj.get("files").is_none_or(Value::is_null));
            assert!(is_mime_type(content_type), "{content_type:?}");
            let essence = content_type
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            assert!(essence.starts_with("text/") || essence == "application/json");
            assert!(content.len() <= limits.max_payload_bytes);
            let submitted = obj.get("content").expect("single content has `content`");
            if essence == "application/json" {
                let back: Value = serde_json::from_slice(content).expect("JSON content parses");
                assert_eq!(&back, submitted, "JSON content is not what was sent");
            } else {
                assert_eq!(
                    Some(&content[..]),
                    submitted.as_str().map(str::as_bytes),
                    "text content is not what was sent"
                );
            }
        }
        CreateBody::Package { files } => {
            assert!(!obj.contains_key("content") && !obj.contains_key("content_type"));
            let submitted = obj
                .get("files")
                .and_then(Value::as_array)
                .expect("a package has a files array");
            assert_eq!(files.len(), submitted.len(), "a file went missing");
            assert!((1..=limits.max_files).contains(&files.len()));
            let mut names = HashSet::new();
            let mut total = 0usize;
            for (f, s) in files.iter().zip(submitted) {
                assert!(is_valid_file_name(&f.name), "{:?}", f.name);
                assert!(
                    names.insert(f.name.to_ascii_lowercase()),
                    "duplicate name {:?}",
                    f.name
                );
                assert_eq!(Some(f.name.as_str()), s["name"].as_str());
                assert!(is_mime_type(&f.content_type), "{:?}", f.content_type);
                let text = s["content"].as_str().expect("file content is a string");
                if s["encoding"].as_str() == Some("base64") {
                    let t = text.trim_end();
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(t)
                        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(t))
                        .expect("accepted base64 decodes");
                    assert_eq!(&f.content[..], &decoded[..]);
                    if f.text {
                        assert!(std::str::from_utf8(&f.content).is_ok());
                    }
                } else {
                    assert!(s["encoding"].is_null());
                    assert_eq!(&f.content[..], text.as_bytes());
                    assert!(f.text);
                }
                total += f.content.len();
            }
            assert!(total <= limits.max_payload_bytes);
        }
    }
}

/// An independent oracle for repeated keys: a JSON value parsed keeping every key, reduced to
/// "has some object a key twice".
struct Tree(bool);

impl<'de> serde::Deserialize<'de> for Tree {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TreeVisitor)
    }
}

struct TreeVisitor;

impl<'de> Visitor<'de> for TreeVisitor {
    type Value = Tree;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Tree, E> {
        Ok(Tree(false))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Tree, E> {
        Ok(Tree(false))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Tree, E> {
        Ok(Tree(false))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Tree, E> {
        Ok(Tree(false))
    }
    fn visit_str<E>(self, _: &str) -> Result<Tree, E> {
        Ok(Tree(false))
    }
    fn visit_unit<E>(self) -> Result<Tree, E> {
        Ok(Tree(false))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Tree, A::Error> {
        let mut dup = false;
        while let Some(Tree(d)) = seq.next_element()? {
            dup |= d;
        }
        Ok(Tree(dup))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tree, A::Error> {
        let mut keys = HashSet::new();
        let mut dup = false;
        while let Some(k) = map.next_key::<String>()? {
            let Tree(d) = map.next_value()?;
            dup |= d || !keys.insert(k);
        }
        Ok(Tree(dup))
    }
}
