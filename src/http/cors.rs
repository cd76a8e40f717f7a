//! CORS: off unless the operator lists origins (`--cors-origin`). Without a listed origin the
//! server sends no CORS headers, so browsers refuse cross-origin calls. For a listed origin
//! the producer and consumer routes (`/api/*`, `/r/*`) answer preflights and carry
//! `Access-Control-Allow-Origin`; operator routes (`/admin/*`) never do: the admin token is
//! not for browsers.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;

/// Parses one allowed origin: `scheme://host[:port]`, http or https, nothing after it.
///
/// # Errors
/// A message naming what is wrong (it is shown at start-up).
pub fn parse_origin(s: &str) -> Result<String, String> {
    let s = s.trim();
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or_else(|| format!("CORS origin `{s}` must start with https:// or http://"))?;
    let ok = !rest.is_empty()
        && !rest.contains(['/', '?', '#', '@', '*', ' '])
        && rest.is_ascii()
        && !rest.chars().any(|c| c.is_ascii_control());
    if !ok {
        return Err(format!(
            "CORS origin `{s}` must be scheme://host[:port] with nothing after it (no wildcards)"
        ));
    }
    Ok(s.to_ascii_lowercase())
}

const ALLOW_METHODS: &str = "GET, POST, DELETE";
const ALLOW_HEADERS: &str = "authorization, content-type, idempotency-key, traceparent";
const EXPOSE_HEADERS: &str = "retry-after, api-version";

fn allowed_origin<'a>(
    app: &AppState,
    headers: &'a HeaderMap,
    path: &str,
) -> Option<&'a HeaderValue> {
    if app.cors_origins.is_empty() || !(path.starts_with("/api/") || path.starts_with("/r/")) {
        return None;
    }
    let origin = headers.get(header::ORIGIN)?;
    let o = origin.to_str().ok()?.to_ascii_lowercase();
    app.cors_origins.contains(&o).then_some(origin)
}

/// Answers preflights of listed origins and marks their responses.
pub async fn cors(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let Some(origin) = allowed_origin(&app, req.headers(), req.uri().path()).cloned() else {
        return next.run(req).await;
    };
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = if preflight {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOW_METHODS),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOW_HEADERS),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        r
    } else {
        let mut r = next.run(req).await;
        r.headers_mut().insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSE_HEADERS),
        );
        r
    };
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.append(header::VARY, HeaderValue::from_static("origin"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_exact_scheme_host_port() {
        assert_eq!(
            parse_origin("https://App.Example.com").as_deref(),
            Ok("https://app.example.com")
        );
        assert!(parse_origin("http://localhost:3000").is_ok());
        for bad in [
            "*",
            "app.example.com",
            "https://",
            "https://*.example.com",
            "https://example.com/",
            "https://example.com/path",
            "ftp://example.com",
            "https://user@example.com",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
    }
}
