//! The request-header decoders of the public API: `Content-Type` / `Content-Length` and the
//! body limit of the JSON body reader (`extract::json_body`), `Idempotency-Key`
//! (`extract::idempotency_key`), `Authorization: Bearer` (`extract::bearer`), and the MIME
//! type check used for content types (`validate::is_mime_type`).
//!
//! Input: up to four lines (`Content-Type`, `Content-Length`, `Idempotency-Key`,
//! `Authorization`; a missing line is an absent header, a value `http` refuses is skipped), then
//! the body.
//!
//! Properties (each against a statement of the rule, not a copy of the code):
//! - `json_body` returns exactly the body when the type is `application/json` (any case, any
//!   parameters) and neither the declared length nor the body exceeds the limit; `415` for
//!   another type, `413` over the limit;
//! - `idempotency_key` returns the header unchanged iff it is 1..=255 printable ASCII bytes;
//! - `bearer` returns a non-empty, trimmed token only for a `Bearer` scheme;
//! - `is_mime_type` ignores letter case and, within the length limit, outer whitespace.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, header};
use kubbi::error::ErrorCode;
use kubbi::fuzzing::{bearer, idempotency_key, json_body};
use kubbi::http::validate::is_mime_type;
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 64;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(5, |b| *b == b'\n');
    let names = [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        HeaderName::from_static("idempotency-key"),
        header::AUTHORIZATION,
    ];
    let mut headers = HeaderMap::new();
    for name in names {
        if let Some(v) = parts.next()
            && let Ok(v) = HeaderValue::from_bytes(v)
        {
            headers.insert(name, v);
        }
    }
    let body = parts.next().unwrap_or_default().to_vec();

    check_mime(&headers);
    check_idempotency_key(&headers);
    check_bearer(&headers);
    check_json_body(&headers, body);
});

fn check_mime(headers: &HeaderMap) {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return;
    };
    let ok = is_mime_type(ct);
    assert_eq!(ok, is_mime_type(&ct.to_ascii_lowercase()), "case matters");
    if ct.len() <= 255 {
        // (A value over the length limit is refused even when trimming would bring it under.)
        assert_eq!(ok, is_mime_type(ct.trim()), "outer whitespace matters");
    }
    if ok {
        let essence = ct.split(';').next().unwrap_or("").trim();
        assert_eq!(essence.matches('/').count(), 1, "{ct:?}");
        assert!(ct.len() <= 255);
        assert!(!essence.contains(char::is_whitespace));
    }
}

fn check_idempotency_key(headers: &HeaderMap) {
    let got = idempotency_key(headers);
    match headers.get("idempotency-key") {
        None => assert!(matches!(got, Ok(None))),
        Some(v) => {
            let b = v.as_bytes();
            let valid = (1..=255).contains(&b.len()) && b.iter().all(|c| (b' '..=b'~').contains(c));
            match got {
                Ok(Some(s)) => {
                    assert!(valid, "accepted {b:?}");
                    assert_eq!(s.as_bytes(), b);
                }
                Ok(None) => panic!("a present key read as absent"),
                Err(e) => {
                    assert!(!valid, "refused {b:?}");
                    assert_eq!(e.code, ErrorCode::ValidationError);
                }
            }
        }
    }
}

fn check_bearer(headers: &HeaderMap) {
    let mut req = Request::builder().body(()).expect("request");
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        req.headers_mut().insert(header::AUTHORIZATION, v.clone());
    }
    let (parts, ()) = req.into_parts();
    match bearer(&parts) {
        Some(t) => {
            let v = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .expect("a token came from a readable header");
            assert!(
                v.get(..7)
                    .is_some_and(|p| p.eq_ignore_ascii_case("bearer "))
            );
            assert!(!t.is_empty() && t == t.trim());
            assert!(v.ends_with(t) || v.trim_end().ends_with(t));
        }
        None => {
            if let Some(v) = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                && v.get(..7)
                    .is_some_and(|p| p.eq_ignore_ascii_case("bearer "))
            {
                assert!(
                    v[7..].trim().is_empty(),
                    "a bearer token was missed in {v:?}"
                );
            }
        }
    }
}

fn check_json_body(headers: &HeaderMap, body: Vec<u8>) {
    let ct_ok = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|e| e.trim().eq_ignore_ascii_case("application/json"));
    let declared_over = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > LIMIT as u64);
    let len = body.len();
    let got = runtime().block_on(json_body(
        headers,
        Body::from(body.clone()),
        LIMIT,
        Duration::from_secs(10),
    ));
    match got {
        Ok(b) => {
            assert!(ct_ok && !declared_over && len <= LIMIT);
            assert_eq!(&b[..], &body[..]);
        }
        Err(e) if !ct_ok => assert_eq!(e.code, ErrorCode::UnsupportedMediaType),
        Err(e) => {
            assert!(declared_over || len > LIMIT, "refused: {e:?}");
            assert_eq!(e.code, ErrorCode::PayloadTooLarge);
        }
    }
}
