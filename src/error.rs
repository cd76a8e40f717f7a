//! The error vocabulary every request failure ends in.
//!
//! Modules keep their own typed errors; whatever reaches a client is converted into an
//! [`ApiError`] carrying one [`ErrorCode`]. The mapping of a code to an HTTP status and to the
//! `{error, message, messages}` envelope lives in `http::error` and nowhere else.
//!
//! Messages are written for humans and never contain a claim token, an API key or payload bytes:
//! constructors take only `&'static str` or text the server composed itself.

use std::fmt;

use crate::state::Status;

/// The error codes of the public API (API.md, "Errors").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    ValidationError,
    Unauthorized,
    NotFound,
    Conflict,
    Expired,
    Gone,
    PayloadTooLarge,
    UnsupportedMediaType,
    RateLimited,
    QuotaExceeded,
    InternalError,
    NotImplemented,
    Unavailable,
    /// [ext] A route exists but not for this method.
    MethodNotAllowed,
    /// [ext] The request body did not arrive within the body timeout (slow or stalled client).
    RequestTimeout,
}

impl ErrorCode {
    /// The `error` string of the envelope.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ValidationError => "validation_error",
            Self::Unauthorized => "unauthorized",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::Expired => "expired",
            Self::Gone => "gone",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::RateLimited => "rate_limited",
            Self::QuotaExceeded => "quota_exceeded",
            Self::InternalError => "internal_error",
            Self::NotImplemented => "not_implemented",
            Self::Unavailable => "unavailable",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::RequestTimeout => "request_timeout",
        }
    }

    /// The HTTP status code that goes with this error code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::ValidationError => 400,
            Self::Unauthorized => 401,
            Self::NotFound => 404,
            Self::Conflict => 409,
            Self::Expired | Self::Gone => 410,
            Self::PayloadTooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::RateLimited | Self::QuotaExceeded => 429,
            Self::InternalError => 500,
            Self::NotImplemented => 501,
            Self::Unavailable => 503,
            Self::MethodNotAllowed => 405,
            Self::RequestTimeout => 408,
        }
    }
}

/// A request failure as the client will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// One entry per problem; only for `validation_error`.
    pub messages: Vec<String>,
    /// Seconds for the `Retry-After` header (429, 503).
    pub retry_after: Option<u32>,
    /// The kubbi's terminal status, for `410` answers and `409` on delete.
    pub status: Option<Status>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            messages: Vec::new(),
            retry_after: None,
            status: None,
        }
    }

    /// A `400 validation_error` listing every problem found.
    pub fn validation(messages: Vec<String>) -> Self {
        let message = match messages.len() {
            1 => messages[0].clone(),
            n => format!("the request has {n} problems"),
        };
        Self {
            messages,
            ..Self::new(ErrorCode::ValidationError, message)
        }
    }

    pub fn not_found(what: &'static str) -> Self {
        Self::new(ErrorCode::NotFound, format!("{what} not found"))
    }

    pub fn unauthorized() -> Self {
        Self::new(
            ErrorCode::Unauthorized,
            "missing, invalid or revoked credentials",
        )
    }

    /// A `503 unavailable` with a `Retry-After` hint.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(ErrorCode::Unavailable, message)
        }
    }

    /// An internal failure. The detail goes to the log (by the caller), never to the client.
    pub fn internal() -> Self {
        Self::new(ErrorCode::InternalError, "internal error")
    }

    /// The answer for a kubbi that has ended: `410 expired` or `410 gone`.
    pub fn ended(status: Status) -> Self {
        let (code, message) = match status {
            Status::Expired => (ErrorCode::Expired, "this kubbi has expired"),
            Status::Burned => (ErrorCode::Gone, "this kubbi has been claimed and burned"),
            Status::Deleted => (ErrorCode::Gone, "this kubbi was deleted by its producer"),
            Status::Active => (ErrorCode::Gone, "this kubbi is no longer available"),
        };
        Self {
            status: Some(status),
            ..Self::new(code, message)
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ApiError {}
