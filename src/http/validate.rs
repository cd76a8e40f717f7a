//! Validation of create requests: every rule of API.md, every problem reported at once.
//!
//! Pure functions over parsed JSON. A request that breaks only a size limit is `413`; anything
//! else wrong is `400 validation_error` with one message per problem. Messages name fields and
//! limits, never echo submitted content.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use crate::config::Limits;
use crate::error::{ApiError, ErrorCode};
use crate::service::{CreateBody, CreateInput, FileInput, Role};

const TOP_FIELDS: &[&str] = &[
    "content",
    "content_type",
    "files",
    "ttl_seconds",
    "max_retrievals",
    "metadata",
];
const FILE_FIELDS: &[&str] = &["name", "content", "content_type", "role", "encoding"];
const SINGLE_TYPES: &str =
    "text/plain, application/json, text/markdown, text/csv or another text/* type";

/// Parses a request body into JSON.
///
/// # Errors
/// `400` with the position of the syntax error (never the content around it).
pub fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    // An object with a key twice is ambiguous (a proxy or client library may read the other
    // value): refuse it rather than silently keep the last.
    if let Err(e) = serde_json::from_slice::<UniqueKeys>(body)
        && e.to_string().starts_with(DUPLICATE_KEY)
    {
        // The key is not echoed: it may be producer data (metadata keys are sealed).
        return Err(ApiError::validation(vec![format!(
            "the request body is not valid JSON for this API: an object has a key twice \
             (line {}, column {})",
            e.line(),
            e.column()
        )]));
    }
    serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Eof => "it ends early",
            serde_json::error::Category::Syntax => "it has a syntax error",
            _ => "it cannot be parsed",
        };
        ApiError::validation(vec![format!(
            "the request body is not valid JSON: {what} at line {}, column {}",
            e.line(),
            e.column()
        )])
    })
}

const DUPLICATE_KEY: &str = "duplicate key";

/// Walks a JSON document without building it, failing on an object that repeats a key.
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueKeys)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(self)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if !seen.insert(k) {
                return Err(serde::de::Error::custom(DUPLICATE_KEY));
            }
            map.next_value::<UniqueKeys>()?;
        }
        Ok(self)
    }
}

/// Whether `s` is a MIME type `type/subtype`, optionally with `; name=value` parameters.
pub fn is_mime_type(s: &str) -> bool {
    fn token(t: &str) -> bool {
        !t.is_empty()
            && t.len() <= 127
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    }
    if s.len() > 255 {
        return false;
    }
    let mut parts = s.split(';');
    let essence = parts.next().unwrap_or("").trim();
    let Some((ty, sub)) = essence.split_once('/') else {
        return false;
    };
    if !token(ty) || !token(sub) {
        return false;
    }
    parts.all(|p| {
        p.trim()
            .split_once('=')
            .is_some_and(|(k, v)| token(k.trim()) && !v.trim().is_empty())
    })
}

fn essence(ct: &str) -> String {
    ct.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Whether bytes of this type are returned as text when they are valid UTF-8.
fn textual(ct: &str) -> bool {
    let e = essence(ct);
    e.starts_with("text/")
        || matches!(
            e.as_str(),
            "application/json"
                | "application/xml"
                | "application/yaml"
                | "application/x-yaml"
                | "application/toml"
                | "application/javascript"
        )
        || e.ends_with("+json")
        || e.ends_with("+xml")
}

/// Whether a package file name follows API.md: 1..=255 of `[A-Za-z0-9._-]`, alphanumeric first,
/// no `..`.
pub fn is_valid_file_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 255
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && !name.contains("..")
}

fn unknown_fields(obj: &Map<String, Value>, allowed: &[&str], at: &str, errs: &mut Vec<String>) {
    for k in obj.keys() {
        if !allowed.contains(&k.as_str()) {
            let shown: String = k.chars().take(64).collect();
            errs.push(format!("{at}unknown field `{shown}`"));
        }
    }
}

/// An optional field: absent and `null` are the same.
fn opt<'a>(obj: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    obj.get(k).filter(|v| !v.is_null())
}

fn integer_in(v: &Value, lo: u64, hi: u64) -> Option<u64> {
    v.as_u64().filter(|n| (lo..=hi).contains(n))
}

/// The exact submitted text of `content` (JSON content is stored as sent, not re-serialized:
/// numbers keep every digit).
#[derive(serde::Deserialize)]
struct RawContent<'a> {
    #[serde(borrow)]
    content: &'a serde_json::value::RawValue,
}

/// Validates a parsed create request against `limits`. `raw` is the body it was parsed from.
///
/// # Errors
/// `400 validation_error` listing every problem, or `413` when only a size limit is broken.
pub fn create_input(mut v: Value, raw: &[u8], limits: &Limits) -> Result<CreateInput, ApiError> {
    let mut errs = Vec::new();
    let Some(obj) = v.as_object_mut() else {
        return Err(ApiError::validation(vec![
            "the request body must be a JSON object".into(),
        ]));
    };
    unknown_fields(obj, TOP_FIELDS, "", &mut errs);

    let ttl_seconds = match opt(obj, "ttl_seconds") {
        None => limits.default_ttl_seconds,
        Some(t) => integer_in(t, 1, limits.max_ttl_seconds).unwrap_or_else(|| {
            errs.push(format!(
                "ttl_seconds must be an integer from 1 to {}",
                limits.max_ttl_seconds
            ));
            0
        }),
    };
    let max_retrievals = match opt(obj, "max_retrievals") {
        None => None,
        Some(m) => match integer_in(m, 1, u64::from(limits.max_retrievals_limit)) {
            Some(n) => Some(n as u32),
            None => {
                errs.push(format!(
                    "max_retrievals must be null or an integer from 1 to {}",
                    limits.max_retrievals_limit
                ));
                None
            }
        },
    };
    let mut too_large = Vec::new();
    let metadata_json = match opt(obj, "metadata") {
        None => None,
        Some(m @ Value::Object(_)) => {
            let bytes = serde_json::to_vec(m).unwrap_or_default();
            if bytes.len() > limits.max_metadata_bytes {
                too_large.push(format!(
                    "metadata is {} bytes serialized; the limit is {}",
                    bytes.len(),
                    limits.max_metadata_bytes
                ));
            }
            Some(bytes)
        }
        Some(_) => {
            errs.push("metadata must be a JSON object".into());
            None
        }
    };

    let has_content = obj.contains_key("content");
    let has_files = obj.get("files").is_some_and(|f| !f.is_null());
    let body = match (has_content, has_files) {
        (true, true) => {
            errs.push("give either `content` or `files`, not both".into());
            None
        }
        (false, false) => {
            errs.push("one of `content` or `files` is required".into());
            None
        }
        (true, false) => single(obj, raw, limits, &mut errs, &mut too_large),
        (false, true) => {
            if obj.contains_key("content_type") {
                errs.push(
                    "content_type belongs to single-content kubbis; give each file its own".into(),
                );
            }
            package(obj, limits, &mut errs, &mut too_large)
        }
    };

    if !errs.is_empty() {
        return Err(ApiError::validation(errs));
    }
    if !too_large.is_empty() {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            too_large.join("; "),
        ));
    }
    let body =
        body.ok_or_else(|| ApiError::validation(vec!["the request has no payload".into()]))?;
    Ok(CreateInput {
        ttl_seconds,
        max_retrievals,
        metadata_json,
        body,
    })
}

fn single(
    obj: &mut Map<String, Value>,
    raw: &[u8],
    limits: &Limits,
    errs: &mut Vec<String>,
    too_large: &mut Vec<String>,
) -> Option<CreateBody> {
    let content_type = match opt(obj, "content_type") {
        None => "text/plain".to_string(),
        Some(Value::String(s)) if is_mime_type(s) => {
            let e = essence(s);
            if e == "application/json" || e.starts_with("text/") {
                s.trim().to_string()
            } else {
                errs.push(format!("content_type must be {SINGLE_TYPES}"));
                return None;
            }
        }
        Some(_) => {
            errs.push(format!("content_type must be {SINGLE_TYPES}"));
            return None;
        }
    };
    let content = obj.remove("content").unwrap_or(Value::Null);
    let bytes = if essence(&content_type) == "application/json" {
        drop(content);
        match serde_json::from_slice::<RawContent>(raw) {
            Ok(rc) => Zeroizing::new(rc.content.get().as_bytes().to_vec()),
            Err(_) => {
                errs.push("`content` must appear exactly once".into());
                return None;
            }
        }
    } else {
        match content {
            Value::String(s) => Zeroizing::new(s.into_bytes()),
            _ => {
                errs.push(
                    "content must be a string unless content_type is application/json".into(),
                );
                return None;
            }
        }
    };
    if bytes.len() > limits.max_payload_bytes {
        too_large.push(format!(
            "the content is {} bytes; the limit is {}",
            bytes.len(),
            limits.max_payload_bytes
        ));
    }
    Some(CreateBody::Single {
        content_type,
        content: bytes,
    })
}

fn package(
    obj: &mut Map<String, Value>,
    limits: &Limits,
    errs: &mut Vec<String>,
    too_large: &mut Vec<String>,
) -> Option<CreateBody> {
    let Some(Value::Array(files)) = obj.remove("files") else {
        errs.push("files must be an array".into());
        return None;
    };
    if files.is_empty() || files.len() > limits.max_files {
        errs.push(format!(
            "files must have 1 to {} entries; it has {}",
            limits.max_files,
            files.len()
        ));
        return None;
    }
    let mut out = Vec::with_capacity(files.len());
    let mut seen: Vec<String> = Vec::with_capacity(files.len());
    let mut total = 0usize;
    for (i, f) in files.into_iter().enumerate() {
        let at = format!("files[{i}].");
        let Value::Object(mut f) = f else {
            errs.push(format!("files[{i}] must be an object"));
            continue;
        };
        unknown_fields(&f, FILE_FIELDS, &at, errs);
        let name = match f.get("name") {
            Some(Value::String(n)) if is_valid_file_name(n) => {
                let lower = n.to_ascii_lowercase();
                if let Some(j) = seen.iter().position(|s| *s == lower) {
                    errs.push(format!("{at}name duplicates files[{j}].name (names are compared case-insensitively)"));
                }
                seen.push(lower);
                Some(n.clone())
            }
            _ => {
                errs.push(format!(
                    "{at}name must be 1 to 255 characters of A-Z a-z 0-9 . _ -, start with a letter or digit, and not contain '..'"
                ));
                seen.push(String::new());
                None
            }
        };
        let content_type = match f.get("content_type") {
            Some(Value::String(ct)) if is_mime_type(ct) => Some(ct.trim().to_string()),
            _ => {
                errs.push(format!(
                    "{at}content_type must be a MIME type such as text/plain"
                ));
                None
            }
        };
        let role = match opt(&f, "role") {
            None => None,
            Some(Value::String(r)) if Role::parse(r).is_some() => Role::parse(r),
            Some(_) => {
                errs.push(format!(
                    "{at}role must be one of instructions, data, context, config, attachment"
                ));
                None
            }
        };
        let base64 = match opt(&f, "encoding") {
            None => false,
            Some(Value::String(e)) if e == "base64" => true,
            Some(_) => {
                errs.push(format!("{at}encoding must be \"base64\" when given"));
                false
            }
        };
        let content = match f.remove("content") {
            Some(Value::String(s)) if base64 => {
                let s = Zeroizing::new(s);
                let decoded = STANDARD
                    .decode(s.trim_end())
                    .or_else(|_| STANDARD_NO_PAD.decode(s.trim_end()));
                match decoded {
                    Ok(b) => Some(Zeroizing::new(b)),
                    Err(_) => {
                        errs.push(format!("{at}content is not valid base64"));
                        None
                    }
                }
            }
            Some(Value::String(s)) => Some(Zeroizing::new(s.into_bytes())),
            _ => {
                errs.push(format!("{at}content must be a string"));
                None
            }
        };
        if let (Some(name), Some(content_type), Some(content)) = (name, content_type, content) {
            total += content.len();
            let text = !base64 || (textual(&content_type) && std::str::from_utf8(&content).is_ok());
            out.push(FileInput {
                name,
                content_type,
                role,
                content,
                text,
            });
        }
    }
    if total > limits.max_payload_bytes {
        too_large.push(format!(
            "the files total {total} bytes decoded; the limit is {}",
            limits.max_payload_bytes
        ));
    }
    Some(CreateBody::Package { files: out })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn limits() -> Limits {
        Limits {
            max_payload_bytes: 1000,
            ..Limits::default()
        }
    }

    fn check(v: Value) -> Result<CreateInput, ApiError> {
        let raw = serde_json::to_vec(&v).expect("serializes");
        create_input(v, &raw, &limits())
    }

    fn err(v: Value) -> ApiError {
        match check(v) {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        }
    }

    fn ok(v: Value) -> CreateInput {
        match check(v) {
            Ok(i) => i,
            Err(e) => panic!("rejected: {e:?}"),
        }
    }

    #[test]
    fn single_defaults() {
        let i = ok(json!({"content": "hi"}));
        assert_eq!(i.ttl_seconds, 900);
        assert_eq!(i.max_retrievals, None);
        match i.body {
            CreateBody::Single {
                content_type,
                content,
            } => {
                assert_eq!(content_type, "text/plain");
                assert_eq!(&content[..], b"hi");
            }
            CreateBody::Package { .. } => panic!("not single"),
        }
    }

    #[test]
    fn json_content_is_stored_as_json_text() {
        let i = ok(json!({"content": {"a": [1, 2]}, "content_type": "application/json"}));
        match i.body {
            CreateBody::Single { content, .. } => assert_eq!(&content[..], br#"{"a":[1,2]}"#),
            CreateBody::Package { .. } => panic!(),
        }
        let e = err(json!({"content": {"a": 1}, "content_type": "text/plain"}));
        assert_eq!(e.code, ErrorCode::ValidationError);
    }

    #[test]
    fn json_content_keeps_its_exact_text() {
        let raw = br#"{"content_type":"application/json","content": {"big": 123456789012345678901234567890, "f": 1.50}}"#;
        let v = parse_json(raw).expect("parses");
        let i = create_input(v, raw, &limits()).expect("valid");
        match i.body {
            CreateBody::Single { content, .. } => assert_eq!(
                &content[..],
                br#"{"big": 123456789012345678901234567890, "f": 1.50}"#
            ),
            CreateBody::Package { .. } => panic!(),
        }
        let dup = br#"{"content_type":"application/json","content": 1, "content": 2}"#;
        assert!(parse_json(dup).is_err(), "a repeated key is ambiguous");
    }

    #[test]
    fn ttl_limits() {
        assert_eq!(ok(json!({"content": "x", "ttl_seconds": 1})).ttl_seconds, 1);
        assert_eq!(
            ok(json!({"content": "x", "ttl_seconds": 604_800})).ttl_seconds,
            604_800
        );
        for bad in [
            json!(0),
            json!(604_801),
            json!(-1),
            json!(1.5),
            json!("60"),
            json!(true),
        ] {
            let e = err(json!({"content": "x", "ttl_seconds": bad}));
            assert_eq!(e.messages.len(), 1, "{e:?}");
            assert!(e.messages[0].starts_with("ttl_seconds"));
        }
    }

    #[test]
    fn max_retrievals_limits() {
        assert_eq!(
            ok(json!({"content": "x", "max_retrievals": 1})).max_retrievals,
            Some(1)
        );
        assert_eq!(
            ok(json!({"content": "x", "max_retrievals": 1000})).max_retrievals,
            Some(1000)
        );
        assert_eq!(
            ok(json!({"content": "x", "max_retrievals": null})).max_retrievals,
            None
        );
        for bad in [json!(0), json!(1001), json!(-3), json!("5"), json!(2.0)] {
            assert!(
                err(json!({"content": "x", "max_retrievals": bad})).messages[0]
                    .starts_with("max_retrievals")
            );
        }
    }

    #[test]
    fn metadata_limit_is_1_kib_serialized() {
        // {"k":"<v>"} is 8 bytes plus the value.
        let at = "a".repeat(1024 - 8);
        let i = ok(json!({"content": "x", "metadata": {"k": at}}));
        assert_eq!(i.metadata_json.map(|m| m.len()), Some(1024));
        let over = "a".repeat(1024 - 7);
        let e = err(json!({"content": "x", "metadata": {"k": over}}));
        assert_eq!(e.code, ErrorCode::PayloadTooLarge);
        assert!(err(json!({"content": "x", "metadata": [1]})).messages[0].contains("metadata"));
    }

    /// Fuzz regression (`http_create`): metadata is stored re-serialized, and without exact
    /// float parsing a large number read back as another number than the one parsed.
    #[test]
    fn metadata_numbers_read_back_as_parsed() {
        let raw = br#"{"content":"x","metadata":{"a":[{"k":1844678814741910318446744073709551616232}],"f":0.1,"t":2.2250738585072011e-308}}"#;
        let v = parse_json(raw).expect("parses");
        let i = create_input(v.clone(), raw, &limits()).expect("valid");
        let stored = i.metadata_json.expect("metadata");
        let back: Value = serde_json::from_slice(&stored).expect("stored metadata is JSON");
        assert_eq!(Some(&back), v.get("metadata"));
    }

    #[test]
    fn payload_limit_at_and_past() {
        ok(json!({"content": "a".repeat(1000)}));
        assert_eq!(
            err(json!({"content": "a".repeat(1001)})).code,
            ErrorCode::PayloadTooLarge
        );
        let half = STANDARD.encode(vec![7u8; 500]);
        ok(json!({"files": [
            {"name": "a.bin", "content": half, "content_type": "application/octet-stream", "encoding": "base64"},
            {"name": "b.txt", "content": "b".repeat(500), "content_type": "text/plain"},
        ]}));
        let e = err(json!({"files": [
            {"name": "a.bin", "content": half, "content_type": "application/octet-stream", "encoding": "base64"},
            {"name": "b.txt", "content": "b".repeat(501), "content_type": "text/plain"},
        ]}));
        assert_eq!(e.code, ErrorCode::PayloadTooLarge);
    }

    #[test]
    fn exactly_one_of_content_or_files() {
        assert!(err(json!({"ttl_seconds": 5})).messages[0].contains("required"));
        let both = err(
            json!({"content": "x", "files": [{"name": "a", "content": "b", "content_type": "text/plain"}]}),
        );
        assert!(both.messages[0].contains("not both"));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e = err(json!({"content": "x", "colour": "red", "files2": 1}));
        assert_eq!(e.messages.len(), 2);
        let e = err(
            json!({"files": [{"name": "a", "content": "b", "content_type": "text/plain", "mode": 7}]}),
        );
        assert!(e.messages[0].contains("files[0].unknown field `mode`"));
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        for body in [
            &br#"{"content":"x","content":"y"}"#[..],
            br#"{"files":[{"name":"a","name":"b","content":"x","content_type":"text/plain"}]}"#,
            br#"{"content":"x","metadata":{"k":1,"k":2}}"#,
            br#"{"content":"x","metadata":{"a":[{"k":1,"\u006b":2}]}}"#,
        ] {
            let e = parse_json(body).expect_err("duplicate refused");
            assert!(e.messages[0].contains("a key twice"), "{:?}", e.messages);
        }
        // The same key in sibling objects is fine.
        assert!(parse_json(br#"{"metadata":{"a":{"k":1},"b":{"k":2}},"content":"x"}"#).is_ok());
    }

    #[test]
    fn file_count_limits() {
        let file = |i: usize| json!({"name": format!("f{i}.txt"), "content": "x", "content_type": "text/plain"});
        ok(json!({"files": (0..16).map(file).collect::<Vec<_>>()}));
        assert!(
            err(json!({"files": (0..17).map(file).collect::<Vec<_>>()})).messages[0]
                .contains("1 to 16")
        );
        assert!(err(json!({"files": []})).messages[0].contains("1 to 16"));
    }

    #[test]
    fn file_names() {
        for good in ["a", "config.json", "A-b_c.1", &"x".repeat(255)] {
            assert!(is_valid_file_name(good), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "a\\b",
            "a..b",
            "../etc",
            "a b",
            "é.txt",
            "a\0b",
            &"x".repeat(256),
        ] {
            assert!(!is_valid_file_name(bad), "{bad:?}");
        }
        let e = err(json!({"files": [
            {"name": "Report.md", "content": "x", "content_type": "text/markdown"},
            {"name": "report.MD", "content": "y", "content_type": "text/markdown"},
        ]}));
        assert!(e.messages[0].contains("duplicates files[0]"), "{e:?}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let e = err(json!({
            "ttl_seconds": 0,
            "max_retrievals": 0,
            "files": [
                {"name": "../x", "content": "!!!", "content_type": "nope", "role": "boss", "encoding": "base64"},
            ]
        }));
        assert_eq!(e.messages.len(), 6, "{:?}", e.messages);
    }

    #[test]
    fn base64_and_text_detection() {
        let i = ok(json!({"files": [
            {"name": "a.tar.gz", "content": STANDARD.encode([0u8, 159, 146, 150]), "content_type": "application/gzip", "encoding": "base64", "role": "attachment"},
            {"name": "n.txt", "content": STANDARD.encode("hello"), "content_type": "text/plain", "encoding": "base64"},
            {"name": "c.json", "content": "{}", "content_type": "application/json", "role": "config"},
        ]}));
        let CreateBody::Package { files } = i.body else {
            panic!()
        };
        assert_eq!(&files[0].content[..], &[0u8, 159, 146, 150]);
        assert!(!files[0].text);
        assert!(files[1].text);
        assert!(files[2].text);
        assert_eq!(files[0].role, Some(Role::Attachment));
        assert!(err(json!({"files": [{"name": "a", "content": "%%%", "content_type": "text/plain", "encoding": "base64"}]})).messages[0].contains("base64"));
    }

    #[test]
    fn mime_types() {
        for good in [
            "text/plain",
            "application/json",
            "text/plain; charset=utf-8",
            "application/vnd.api+json",
        ] {
            assert!(is_mime_type(good), "{good}");
        }
        for bad in [
            "",
            "text",
            "text/",
            "/plain",
            "text/pl ain",
            "text/plain;",
            "a/b/c",
        ] {
            assert!(!is_mime_type(bad), "{bad}");
        }
        assert!(
            err(json!({"content": "x", "content_type": "image/png"})).messages[0]
                .contains("content_type")
        );
        ok(json!({"content": "x", "content_type": "text/x-rust"}));
    }

    #[test]
    fn bodies_that_are_not_objects() {
        for v in [json!([]), json!("x"), json!(null), json!(1)] {
            assert_eq!(err(v).code, ErrorCode::ValidationError);
        }
        assert!(parse_json(b"{\"content\": \"secret-bytes").is_err());
        let e = parse_json(b"{\"content\": \"secret-bytes\" x}").expect_err("fails");
        assert!(!e.message.contains("secret"), "{}", e.message);
    }
}
