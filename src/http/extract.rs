//! Extractors that fail with our error envelope: a bounded JSON body, the producer behind an
//! API key, the operator behind the admin token, and the `Idempotency-Key` header.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use http_body_util::BodyExt;
use zeroize::Zeroizing;

use super::AppState;
use crate::crypto;
use crate::error::{ApiError, ErrorCode};
use crate::service::Producer;

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive, token
/// trimmed, never empty).
pub fn bearer(parts: &Parts) -> Option<&str> {
    let v = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl<S> FromRequestParts<S> for Producer
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let app = AppState::from_ref(state);
        let token = bearer(parts).ok_or_else(ApiError::unauthorized)?;
        app.service.authenticate(token).await
    }
}

/// The operator: presented the admin token.
pub struct Admin;

impl<S> FromRequestParts<S> for Admin
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let app = AppState::from_ref(state);
        let token = bearer(parts).ok_or_else(ApiError::unauthorized)?;
        let presented = crypto::sha256(token.as_bytes());
        if crypto::ct_eq(&presented, &app.admin_token_hash) {
            Ok(Admin)
        } else {
            Err(ApiError::unauthorized())
        }
    }
}

/// Reads a JSON request body of at most `limit` bytes.
///
/// Refuses a declared `Content-Length` over the limit before reading anything, a body that is
/// not `application/json` (`415`), and a body that grows past the limit while it streams in
/// (`413`). A body that has not arrived in full within `timeout` gets `408`: a client trickling
/// bytes cannot hold a connection and a buffer forever. The bytes are wiped when dropped: they
/// hold payload plaintext.
///
/// # Errors
/// `413`, `415`, `408`, or `400` for an unreadable body.
pub async fn json_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "the request body must be application/json",
        ));
    }
    let too_large = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body exceeds {limit} bytes"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(body, limit);
    let Ok(collected) = tokio::time::timeout(timeout, limited.collect()).await else {
        return Err(ApiError::new(
            ErrorCode::RequestTimeout,
            format!(
                "the request body did not arrive within {} seconds",
                timeout.as_secs()
            ),
        ));
    };
    match collected {
        Ok(collected) => Ok(Zeroizing::new(Vec::from(collected.to_bytes()))),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(_) => Err(ApiError::validation(vec![
            "the request body could not be read completely".into(),
        ])),
    }
}

/// The longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The `Idempotency-Key` header, if present: 1 to 255 printable ASCII characters.
///
/// # Errors
/// `400` for an empty, overlong or non-printable key.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("");
    let ok = !s.is_empty()
        && s.len() <= MAX_IDEMPOTENCY_KEY
        && s.bytes().all(|b| (0x20..0x7f).contains(&b));
    if !ok {
        return Err(ApiError::validation(vec![format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
        )]));
    }
    Ok(Some(s.to_string()))
}
