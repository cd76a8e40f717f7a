//! The public HTTP API (API.md): producer, consumer, operator and health routes.
//!
//! A handler extracts, validates, makes one service call and maps the result; every failure is
//! an [`ApiError`] turned into the envelope in [`error`]. [`router`] builds the whole app
//! without a socket, so tests can also drive it directly.

pub mod cors;
mod dto;
mod error;
pub(crate) mod extract;
pub mod internal;
pub mod openapi;
mod page;
pub mod ratelimit;
pub mod server;
pub mod validate;

use openraft::async_runtime::WatchReceiver;
use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use self::dto::{
    ClaimResponse, CreatedResponse, Detail, ListResponse, Pagination, PreviewResponse,
};
use self::extract::{Admin, idempotency_key, json_body};
use crate::error::{ApiError, ErrorCode};
use crate::ids::{ApiKeyId, ClaimToken, KubbiId, format_millis};
use crate::service::{CreateIdempotencyInput, Producer, Service};
use crate::state::Status;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub service: Service,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub storage: Arc<crate::storage::Storage>,
    /// SHA-256 of the admin token.
    pub admin_token_hash: [u8; 32],
    /// Base of claim URLs, without a trailing slash.
    pub public_url: Arc<str>,
    /// Per-client rate limits.
    pub client_limits: Arc<ratelimit::IpLimits>,
    /// Browser origins allowed to call `/api/*` and `/r/*` (lowercase; empty: CORS off).
    pub cors_origins: Arc<[String]>,
}

/// Every public route's handler; [`ROUTES`] maps them to methods and paths, and both the
/// router and the OpenAPI document are built from that one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    Create,
    List,
    Detail,
    Delete,
    Preview,
    Inspect,
    Claim,
    Health,
    Live,
    Ready,
    Metrics,
    OpenApi,
    KeyCreate,
    KeyList,
    KeyRevoke,
    Cluster,
    Digest,
    NodeAdd,
    NodeRemove,
    GroupSplit,
    GroupMove,
}

/// The public API: `(method, path template, handler)`.
pub const ROUTES: &[(&str, &str, Handler)] = &[
    ("POST", "/api/v1/kubbis", Handler::Create),
    ("GET", "/api/v1/kubbis", Handler::List),
    ("GET", "/api/v1/kubbis/{id}", Handler::Detail),
    ("DELETE", "/api/v1/kubbis/{id}", Handler::Delete),
    ("GET", "/r/{token}", Handler::Preview),
    ("GET", "/r/{token}/inspect", Handler::Inspect),
    ("POST", "/r/{token}/claim", Handler::Claim),
    ("GET", "/health", Handler::Health),
    ("GET", "/health/live", Handler::Live),
    ("GET", "/health/ready", Handler::Ready),
    ("GET", "/metrics", Handler::Metrics),
    ("GET", "/openapi.json", Handler::OpenApi),
    ("POST", "/admin/v1/api-keys", Handler::KeyCreate),
    ("GET", "/admin/v1/api-keys", Handler::KeyList),
    ("DELETE", "/admin/v1/api-keys/{id}", Handler::KeyRevoke),
    ("GET", "/admin/v1/cluster", Handler::Cluster),
    ("GET", "/admin/v1/digest", Handler::Digest),
    ("POST", "/admin/v1/nodes", Handler::NodeAdd),
    ("DELETE", "/admin/v1/nodes/{id}", Handler::NodeRemove),
    ("POST", "/admin/v1/groups/{id}/split", Handler::GroupSplit),
    ("POST", "/admin/v1/groups/{id}/move", Handler::GroupMove),
];

fn method_router(method: &str, h: Handler) -> axum::routing::MethodRouter<AppState> {
    use axum::routing::{MethodFilter, on};
    let filter = match method {
        "POST" => MethodFilter::POST,
        "DELETE" => MethodFilter::DELETE,
        _ => MethodFilter::GET,
    };
    match h {
        Handler::Create => on(filter, create),
        Handler::List => on(filter, list),
        Handler::Detail => on(filter, detail),
        Handler::Delete => on(filter, delete_kubbi),
        Handler::Preview => on(filter, preview),
        Handler::Inspect => on(filter, inspect),
        Handler::Claim => on(filter, claim),
        Handler::Health => on(filter, health),
        Handler::Live => on(filter, live),
        Handler::Ready => on(filter, ready),
        Handler::Metrics => on(filter, metrics),
        Handler::OpenApi => on(filter, openapi_json),
        Handler::KeyCreate => on(filter, create_api_key),
        Handler::KeyList => on(filter, list_api_keys),
        Handler::KeyRevoke => on(filter, revoke_api_key),
        Handler::Cluster => on(filter, cluster),
        Handler::Digest => on(filter, digest),
        Handler::NodeAdd => on(filter, add_node),
        Handler::NodeRemove => on(filter, remove_node),
        Handler::GroupSplit => on(filter, split_group),
        Handler::GroupMove => on(filter, move_group),
    }
}

/// The whole public app, built from [`ROUTES`].
pub fn router(state: AppState) -> Router {
    let mut by_path: std::collections::BTreeMap<&str, axum::routing::MethodRouter<AppState>> =
        Default::default();
    for (method, path, h) in ROUTES {
        let mr = method_router(method, *h);
        let merged = match by_path.remove(path) {
            Some(existing) => existing.merge(mr),
            None => mr,
        };
        by_path.insert(path, merged);
    }
    let mut app = Router::new();
    for (path, mr) in by_path {
        app = app.route(path, mr);
    }
    app.fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), limit_clients))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            record_request,
        ))
        .layer(middleware::from_fn(api_version_header))
        .layer(middleware::from_fn_with_state(state.clone(), cors::cors))
        .with_state(state)
}

async fn openapi_json(State(app): State<AppState>) -> Json<Value> {
    Json(openapi::document(&app.public_url))
}

/// Per-client limits: requests to claim links, and clients that keep failing to
/// authenticate (`429 rate_limited` with `Retry-After`). Loopback peers that are not trusted
/// proxies are not limited (local tools, tests, a sidecar).
async fn limit_clients(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let limits = &app.client_limits;
    let Some(peer) = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
    else {
        return next.run(req).await;
    };
    let trusted = &limits.trusted_proxies;
    if peer.is_loopback() && !trusted.iter().any(|c| c.contains(peer)) {
        return next.run(req).await;
    }
    let xff = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    let client = ratelimit::client_addr(peer, xff, trusted);
    let now = std::time::Instant::now();
    let refuse = |wait: std::time::Duration, what: &str| {
        let mut e = ApiError::new(
            ErrorCode::RateLimited,
            format!("too many {what} from this address; retry later"),
        );
        e.retry_after = Some(u32::try_from(wait.as_secs().max(1)).unwrap_or(u32::MAX));
        e.into_response()
    };
    if req.uri().path().starts_with("/r/")
        && let Err(wait) = limits.links.take(client, now)
    {
        return refuse(wait, "requests to claim links");
    }
    let authenticating = req
        .headers()
        .contains_key(axum::http::header::AUTHORIZATION);
    if authenticating && let Err(wait) = limits.auth_failures.check(client, now) {
        return refuse(wait, "failed authentications");
    }
    let resp = next.run(req).await;
    if authenticating && resp.status() == StatusCode::UNAUTHORIZED {
        let _ = limits.auth_failures.take(client, now);
    }
    resp
}

/// Counts and times every request by its route template (never the raw path: it holds tokens).
async fn record_request(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = match *req.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        axum::http::Method::DELETE => "DELETE",
        axum::http::Method::PUT => "PUT",
        _ => "OTHER",
    };
    let started = std::time::Instant::now();
    let span = tracing::debug_span!(
        "http.request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.route = %route,
        http.request.method = method,
        http.response.status_code = tracing::field::Empty,
        kubbi.node = app.service.node_id(),
    );
    let resp = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    span.record("http.response.status_code", resp.status().as_u16());
    app.metrics.http.record(
        &route,
        method,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

async fn metrics(State(app): State<AppState>) -> Response {
    use crate::metrics::gauge;
    use std::fmt::Write;
    let mut out = String::with_capacity(16 * 1024);
    app.metrics.http.render(&mut out);
    app.metrics.lifecycle.render(&mut out);
    // The raft log's group commits: the fsyncs every replicated operation waits on.
    app.storage.raft_log_syncer().render(&mut out);
    out.push_str("# HELP kubbi_raft_append_duration_seconds Raft log append to durable.\n# TYPE kubbi_raft_append_duration_seconds histogram\n");
    app.storage
        .append_latency
        .render("kubbi_raft_append_duration_seconds", "", &mut out);
    let exec = app.service.router().executor().clone();
    let me = exec.node_id();
    let (mut active, mut bytes) = (0u64, 0u64);
    let mut raft = String::new();
    for lg in exec.groups() {
        let Some(st) = exec.status(lg.group) else {
            continue;
        };
        let g = if lg.group == crate::ids::SYSTEM_GROUP {
            "system".to_string()
        } else {
            lg.group.to_string()
        };
        let leader = st.leader == Some(me);
        let _ = writeln!(
            raft,
            "kubbi_raft_is_leader{{group=\"{g}\"}} {}",
            u8::from(leader)
        );
        let _ = writeln!(raft, "kubbi_raft_term{{group=\"{g}\"}} {}", st.term);
        let _ = writeln!(
            raft,
            "kubbi_raft_quiet{{group=\"{g}\"}} {}",
            u8::from(st.quiet)
        );
        let _ = writeln!(
            raft,
            "kubbi_raft_last_log_index{{group=\"{g}\"}} {}",
            st.last_log.unwrap_or(0)
        );
        let _ = writeln!(
            raft,
            "kubbi_raft_applied_index{{group=\"{g}\"}} {}",
            st.last_applied.unwrap_or(0)
        );
        let (snapshot, purged) = {
            let m = lg.raft.metrics();
            let m = m.borrow_watched();
            (
                m.snapshot.as_ref().map_or(0, |l| l.index),
                m.purged.as_ref().map_or(0, |l| l.index),
            )
        };
        let _ = writeln!(
            raft,
            "kubbi_raft_snapshot_index{{group=\"{g}\"}} {snapshot}"
        );
        let _ = writeln!(raft, "kubbi_raft_purged_index{{group=\"{g}\"}} {purged}");
        if let Ok(t) = crate::state::read_group_time(&app.storage.read_view(lg.group)) {
            let ahead = t.saturating_sub(app.service.now());
            let _ = writeln!(raft, "kubbi_group_time_ahead_ms{{group=\"{g}\"}} {ahead}");
        }
        if leader
            && lg.group != crate::ids::SYSTEM_GROUP
            && let Ok(s) = crate::state::read_stats(&app.storage.read_view(lg.group))
        {
            active += s.active;
            bytes += s.active_bytes;
        }
    }
    out.push_str("# HELP kubbi_raft_is_leader Whether this node leads the group.\n# TYPE kubbi_raft_is_leader gauge\n");
    out.push_str("# HELP kubbi_raft_term Current raft term of the group on this node.\n# TYPE kubbi_raft_term gauge\n");
    out.push_str("# HELP kubbi_raft_quiet Whether this node's replica of the group is quiet (its ticker parked).\n# TYPE kubbi_raft_quiet gauge\n");
    out.push_str("# HELP kubbi_raft_last_log_index Last log index of the group on this node.\n# TYPE kubbi_raft_last_log_index gauge\n");
    out.push_str("# HELP kubbi_raft_applied_index Last applied index of the group on this node.\n# TYPE kubbi_raft_applied_index gauge\n");
    out.push_str("# HELP kubbi_raft_snapshot_index Last log index the group's newest snapshot on this node covers.\n# TYPE kubbi_raft_snapshot_index gauge\n");
    out.push_str("# HELP kubbi_raft_purged_index Last log index purged from the group's log on this node.\n# TYPE kubbi_raft_purged_index gauge\n");
    out.push_str("# HELP kubbi_group_time_ahead_ms How far the group's time (its latest applied stamp, which never goes back) is ahead of this node's clock; above zero, a leader's clock ran ahead of this node's.\n# TYPE kubbi_group_time_ahead_ms gauge\n");
    out.push_str(&raft);
    let (parks, wakes) = exec.quiet().counts();
    gauge(
        &mut out,
        "kubbi_raft_quiet_parks_total",
        "counter",
        "Times a replica went quiet.",
        parks,
    );
    if let Some(peers) = app.service.router().peers() {
        out.push_str("# HELP kubbi_raft_rpcs_total Raft RPCs this node sent, by kind (append: with entries; heartbeat: without).\n# TYPE kubbi_raft_rpcs_total counter\n");
        for (kind, n) in peers.raft_rpcs().snapshot() {
            let _ = writeln!(out, "kubbi_raft_rpcs_total{{kind=\"{kind}\"}} {n}");
        }
        let streams = peers.stream_stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        gauge(
            &mut out,
            "kubbi_internal_streams_opened_total",
            "counter",
            "Node-pair streams this node opened to its peers and had admitted.",
            load(&streams.opened),
        );
        gauge(
            &mut out,
            "kubbi_internal_streams_open",
            "gauge",
            "Node-pair streams from this node to its peers open now.",
            load(&streams.open),
        );
        out.push_str("# HELP kubbi_internal_streams_failed_total Node-pair streams from this node that failed: broken (could not connect, broke, or the peer was silent 6 s with requests waiting) or refused (the peer refused the hello: secret, protocol version, identity).\n# TYPE kubbi_internal_streams_failed_total counter\n");
        for (reason, n) in [
            ("broken", load(&streams.broken)),
            ("refused", load(&streams.refused)),
        ] {
            let _ = writeln!(
                out,
                "kubbi_internal_streams_failed_total{{reason=\"{reason}\"}} {n}"
            );
        }
    }
    out.push_str("# HELP kubbi_raft_quiet_wakes_total Times a quiet replica woke, by reason.\n# TYPE kubbi_raft_quiet_wakes_total counter\n");
    for (reason, n) in wakes {
        let _ = writeln!(
            out,
            "kubbi_raft_quiet_wakes_total{{reason=\"{reason}\"}} {n}"
        );
    }
    gauge(
        &mut out,
        "kubbi_kubbis_active",
        "gauge",
        "Active kubbis in shards this node leads.",
        active,
    );
    gauge(
        &mut out,
        "kubbi_kubbis_active_bytes",
        "gauge",
        "Sealed bytes of active kubbis in shards this node leads.",
        bytes,
    );
    gauge(
        &mut out,
        "kubbi_actors_live",
        "gauge",
        "Live kubbi actors on this node.",
        app.service.live_actors().await,
    );
    gauge(
        &mut out,
        "kubbi_actor_activations_total",
        "counter",
        "Kubbi actors started on this node (a claim, delete or expiry of a kubbi without a live actor starts one).",
        app.service.actor_activations(),
    );
    gauge(
        &mut out,
        "kubbi_raft_log_segments",
        "gauge",
        "Segment files of this node's raft log (64 MiB each; deleted once every entry in them is purged).",
        app.storage.raft_log().segment_count() as u64,
    );
    gauge(
        &mut out,
        "kubbi_storage_fsyncs_total",
        "counter",
        "fsyncs of the raft log and of RocksDB's WAL.",
        app.storage.raft_log_syncer().fsync_count() + app.storage.syncer().fsync_count(),
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// Every `/api/v1/*` response carries `API-Version: v1`.
async fn api_version_header(req: Request, next: Next) -> Response {
    let v1 = req.uri().path().starts_with("/api/v1/") || req.uri().path() == "/api/v1";
    let mut resp = next.run(req).await;
    if v1 {
        resp.headers_mut()
            .insert("api-version", HeaderValue::from_static("v1"));
    }
    resp
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this method is not allowed on this route",
    )
}

async fn fallback(uri: Uri) -> ApiError {
    let mut segs = uri.path().trim_start_matches('/').split('/');
    if segs.next() == Some("api") && segs.next().is_some_and(|v| v != "v1") {
        return ApiError::new(
            ErrorCode::NotImplemented,
            "this API version is not implemented; use /api/v1",
        );
    }
    ApiError::not_found("route")
}

// ---- producer ------------------------------------------------------------------------------

async fn create(
    State(app): State<AppState>,
    producer: Producer,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<CreatedResponse>), ApiError> {
    let svc = &app.service;
    let idem_key = idempotency_key(&headers)?;
    let bytes = json_body(
        &headers,
        body,
        svc.limits().max_body_bytes,
        svc.limits().body_timeout,
    )
    .await?;
    let idem = idem_key.map(|key| CreateIdempotencyInput {
        key,
        body_hash: crate::crypto::sha256(&bytes),
    });
    let parsed = validate::parse_json(&bytes)?;
    let input = validate::create_input(parsed, &bytes, svc.limits())?;
    drop(bytes);
    let created = svc.create(&producer, input, idem).await?;
    let metadata = svc.metadata(&created.record)?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedResponse::new(&created, metadata, &app.public_url)),
    ))
}

fn kubbi_id(
    raw: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<KubbiId, ApiError> {
    raw.ok()
        .and_then(|Path(s)| KubbiId::parse(&s))
        .ok_or_else(|| ApiError::not_found("kubbi"))
}

async fn detail(
    State(app): State<AppState>,
    producer: Producer,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Detail>, ApiError> {
    let id = kubbi_id(id)?;
    let r = app.service.get(&producer.key.id, &id).await?;
    Ok(Json(Detail::new(&r, &app.service)?))
}

async fn delete_kubbi(
    State(app): State<AppState>,
    producer: Producer,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Detail>, ApiError> {
    let id = kubbi_id(id)?;
    let r = app.service.delete(&producer.key.id, &id).await?;
    Ok(Json(Detail::new(&r, &app.service)?))
}

fn query_int(
    q: &HashMap<String, String>,
    k: &str,
    default: u64,
    lo: u64,
    hi: u64,
    errs: &mut Vec<String>,
) -> u64 {
    match q.get(k) {
        None => default,
        Some(v) => match v.parse::<u64>() {
            Ok(n) if (lo..=hi).contains(&n) => n,
            _ => {
                errs.push(format!("{k} must be an integer from {lo} to {hi}"));
                default
            }
        },
    }
}

async fn list(
    State(app): State<AppState>,
    producer: Producer,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ListResponse>, ApiError> {
    let Query(q) =
        query.map_err(|_| ApiError::validation(vec!["the query string is malformed".into()]))?;
    let mut errs = Vec::new();
    for k in q.keys() {
        if !matches!(k.as_str(), "page" | "limit" | "status") {
            let shown: String = k.chars().take(64).collect();
            errs.push(format!("unknown query parameter `{shown}`"));
        }
    }
    let page = query_int(&q, "page", 1, 1, 1_000_000, &mut errs);
    let limit = query_int(&q, "limit", 20, 1, 100, &mut errs);
    let status = match q.get("status") {
        None => None,
        Some(s) => match Status::parse(s) {
            Some(s) => Some(s),
            None => {
                errs.push("status must be one of active, expired, burned, deleted".into());
                None
            }
        },
    };
    if !errs.is_empty() {
        return Err(ApiError::validation(errs));
    }
    let svc = &app.service;
    let result = svc.list(&producer.key.id, page, limit, status).await?;
    let kubbis = result
        .items
        .iter()
        .map(|r| Detail::new(r, svc))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(ListResponse {
        kubbis,
        pagination: Pagination {
            page,
            limit,
            total: result.total,
            total_pages: result.total.div_ceil(limit),
        },
    }))
}

// ---- consumer ------------------------------------------------------------------------------

fn claim_token(
    raw: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<ClaimToken, ApiError> {
    raw.ok()
        .and_then(|Path(s)| ClaimToken::parse(&s))
        .ok_or_else(|| ApiError::not_found("kubbi"))
}

async fn preview_or_inspect(
    app: &AppState,
    token: ClaimToken,
    with_claim: bool,
) -> Result<Json<PreviewResponse>, ApiError> {
    let p = app.service.preview(&token).await?;
    let claim_url =
        with_claim.then(|| format!("{}/r/{}/claim", app.public_url, token.expose().as_str()));
    Ok(Json(PreviewResponse::new(&p, &app.service, claim_url)?))
}

async fn preview(
    State(app): State<AppState>,
    headers: HeaderMap,
    token: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    let html = page::wants_html(&headers);
    let token = match claim_token(token) {
        Ok(t) => t,
        Err(e) if html => return page::error(&e),
        Err(e) => return e.into_response(),
    };
    if html {
        // A browser (or a link-preview bot): a page that shows what is waiting, consumes nothing.
        return match app.service.preview(&token).await {
            Ok(p) => page::preview(&p, &format!("/r/{}/claim", token.expose().as_str())),
            Err(e) => page::error(&e),
        };
    }
    preview_or_inspect(&app, token, true).await.into_response()
}

async fn inspect(
    State(app): State<AppState>,
    token: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<PreviewResponse>, ApiError> {
    preview_or_inspect(&app, claim_token(token)?, false).await
}

async fn claim(
    State(app): State<AppState>,
    headers: HeaderMap,
    token: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    let html = page::wants_html(&headers);
    let result = async {
        let token = claim_token(token)?;
        let idem = idempotency_key(&headers)?;
        app.service.claim(&token, idem.as_deref()).await
    }
    .await;
    match (result, html) {
        (Ok(out), true) => page::claimed(&out),
        (Err(e), true) => page::error(&e),
        (Ok(out), false) => match ClaimResponse::new(out, &app.service) {
            Ok(r) => Json(r).into_response(),
            Err(e) => e.into_response(),
        },
        (Err(e), false) => e.into_response(),
    }
}

// ---- operator ------------------------------------------------------------------------------

const MAX_LABEL: usize = 128;

async fn create_api_key(
    State(app): State<AppState>,
    _admin: Admin,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let bytes = json_body(&headers, body, 16 * 1024, app.service.limits().body_timeout).await?;
    let v = validate::parse_json(&bytes)?;
    let Some(obj) = v.as_object() else {
        return Err(ApiError::validation(vec![
            "the request body must be a JSON object".into(),
        ]));
    };
    let mut errs = Vec::new();
    for k in obj.keys() {
        if k != "label" && k != "limits" {
            let shown: String = k.chars().take(64).collect();
            errs.push(format!("unknown field `{shown}`"));
        }
    }
    let label = match obj.get("label") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s))
            if s.chars().count() <= MAX_LABEL && !s.chars().any(char::is_control) =>
        {
            s.clone()
        }
        Some(_) => {
            errs.push(format!("label must be a string of at most {MAX_LABEL} characters without control characters"));
            String::new()
        }
    };
    let limits = key_limits_input(obj.get("limits"), &mut errs);
    if !errs.is_empty() {
        return Err(ApiError::validation(errs));
    }
    let (rec, key) = app.service.create_api_key(label, limits).await?;
    let mut out = key_json(&rec);
    out["api_key"] = Value::String(key.as_str().to_string());
    Ok((StatusCode::CREATED, Json(out)))
}

/// The names of [`KeyLimits`](crate::state::KeyLimits) fields on the wire.
const LIMIT_FIELDS: [&str; 4] = [
    "max_active_kubbis",
    "max_stored_bytes",
    "max_creates_per_day",
    "requests_per_second",
];

/// Parses the optional `limits` object of a key: each field a positive integer, or null for
/// the node's default.
fn key_limits_input(v: Option<&Value>, errs: &mut Vec<String>) -> crate::state::KeyLimits {
    let mut l = crate::state::KeyLimits::default();
    let obj = match v {
        None | Some(Value::Null) => return l,
        Some(Value::Object(o)) => o,
        Some(_) => {
            errs.push("limits must be an object".into());
            return l;
        }
    };
    for k in obj.keys() {
        if !LIMIT_FIELDS.contains(&k.as_str()) {
            let shown: String = k.chars().take(64).collect();
            errs.push(format!("unknown field `limits.{shown}`"));
        }
    }
    let mut field = |name: &str, max: u64| -> Option<u64> {
        match obj.get(name) {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(n) if (1..=max).contains(&n) => Some(n),
                _ => {
                    errs.push(format!(
                        "limits.{name} must be an integer from 1 to {max}, or null"
                    ));
                    None
                }
            },
        }
    };
    l.max_active = field(LIMIT_FIELDS[0], u64::from(u32::MAX));
    l.max_bytes = field(LIMIT_FIELDS[1], i64::MAX as u64);
    l.max_creates_per_day = field(LIMIT_FIELDS[2], u64::from(u32::MAX));
    l.rate_per_second = field(LIMIT_FIELDS[3], 1_000_000).map(|n| n as u32);
    l
}

fn key_json(r: &crate::state::ApiKeyRecord) -> Value {
    let l = &r.limits;
    json!({
        "id": r.id.to_string(),
        "key_prefix": r.key_prefix,
        "label": r.label,
        "created_at": format_millis(r.created_at),
        "revoked_at": r.revoked_at.map(format_millis),
        "limits": {
            LIMIT_FIELDS[0]: l.max_active,
            LIMIT_FIELDS[1]: l.max_bytes,
            LIMIT_FIELDS[2]: l.max_creates_per_day,
            LIMIT_FIELDS[3]: l.rate_per_second,
        },
    })
}

/// Every key with what it holds now over the whole cluster (from each shard's replica here,
/// or its leader).
async fn list_api_keys(
    State(app): State<AppState>,
    _admin: Admin,
) -> Result<Json<Value>, ApiError> {
    let (keys, _) = app.service.read_system().await?;
    let mut out = Vec::with_capacity(keys.len());
    for k in &keys {
        let mut v = key_json(k);
        let u = app.service.usage(&k.id, None).await;
        v["usage"] = json!({
            "active_kubbis": u.active,
            "stored_bytes": u.bytes,
            "creates_today": u.creates,
        });
        out.push(v);
    }
    Ok(Json(json!({ "keys": out })))
}

async fn revoke_api_key(
    State(app): State<AppState>,
    _admin: Admin,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = id
        .ok()
        .and_then(|Path(s)| ApiKeyId::parse(&s))
        .ok_or_else(|| ApiError::not_found("api key"))?;
    let rec = app.service.revoke_api_key(id).await?;
    Ok(Json(key_json(&rec)))
}

/// This node's replicas, each with its applied index and a digest of its state (answered
/// locally, never forwarded): replicas at equal applied index must agree.
async fn digest(State(app): State<AppState>, _admin: Admin) -> Result<Json<Value>, ApiError> {
    let exec = app.service.router().executor().clone();
    let mut groups = Vec::new();
    let mut ids: Vec<crate::ids::GroupId> = exec.groups().iter().map(|lg| lg.group).collect();
    ids.sort_unstable();
    for g in ids {
        let (applied, d) = crate::raft::state_machine::group_digest(&app.storage, g)
            .await
            .map_err(|e| {
                tracing::error!(group = g, error = %e, "digest failed");
                ApiError::internal()
            })?;
        let id = if g == crate::ids::SYSTEM_GROUP {
            json!("system")
        } else {
            json!(g)
        };
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        groups.push(json!({"id": id, "applied_index": applied, "digest": hex}));
    }
    Ok(Json(
        json!({"node_id": app.service.node_id(), "groups": groups}),
    ))
}

async fn cluster(State(app): State<AppState>, _admin: Admin) -> Result<Json<Value>, ApiError> {
    let svc = &app.service;
    let (_, nodes) = svc.read_system().await?;
    let statuses = svc.group_statuses().await;
    let map = svc.shard_map();
    let mut shards = Vec::new();
    for (g, st) in statuses {
        let (group, ranges) = if g == crate::ids::SYSTEM_GROUP {
            (json!("system"), json!([]))
        } else {
            (json!(g), json!(map.ranges_of(g)))
        };
        // Where the map wants a data group (the system group places itself).
        let (desired, pinned) = match map.groups.get(&g) {
            Some(e) => (
                json!(e.replicas),
                json!(e.state == crate::state::map::GroupState::Placed),
            ),
            None => (Value::Null, Value::Null),
        };
        match st {
            Ok(s) => {
                let last = s.last_log.unwrap_or(0);
                let lag: serde_json::Map<String, Value> = s
                    .matched
                    .iter()
                    .map(|(id, m)| (id.to_string(), json!(last.saturating_sub(m.unwrap_or(0)))))
                    .collect();
                shards.push(json!({
                    "id": group,
                    "ranges": ranges,
                    "desired": desired,
                    "pinned": pinned,
                    "leader": s.leader,
                    "term": s.term,
                    "replicas": s.voters,
                    "learners": s.learners,
                    "applied_index": s.last_applied,
                    "last_log_index": s.last_log,
                    "replication_lag": lag,
                    "quiet": s.quiet,
                }));
            }
            Err(e) => shards.push(json!({
                "id": group,
                "ranges": ranges,
                "desired": desired,
                "pinned": pinned,
                "leader": null,
                "error": e.message,
            })),
        }
    }
    let nodes: Vec<Value> = nodes
        .iter()
        .map(|n| {
            json!({
                "id": n.id,
                "http": n.http,
                "internal": n.internal,
                "zone": n.zone,
                "state": n.state.as_str(),
            })
        })
        .collect();
    Ok(Json(json!({
        "node_id": svc.node_id(),
        "nodes": nodes,
        "map_version": map.version,
        "shards": shards,
    })))
}

async fn add_node(
    State(app): State<AppState>,
    _admin: Admin,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let bytes = json_body(&headers, body, 16 * 1024, app.service.limits().body_timeout).await?;
    let v = validate::parse_json(&bytes)?;
    let mut errs = Vec::new();
    let id = v["id"].as_u64().filter(|i| *i > 0);
    if id.is_none() {
        errs.push("id must be a positive integer".into());
    }
    let internal = v["internal"]
        .as_str()
        .filter(|a| a.parse::<std::net::SocketAddr>().is_ok() || a.contains(':'));
    if internal.is_none() {
        errs.push("internal must be the node's internal host:port".into());
    }
    if let Some(obj) = v.as_object() {
        for k in obj.keys() {
            if !matches!(k.as_str(), "id" | "internal" | "http" | "zone") {
                errs.push(format!(
                    "unknown field `{}`",
                    k.chars().take(64).collect::<String>()
                ));
            }
        }
    }
    if !errs.is_empty() {
        return Err(ApiError::validation(errs));
    }
    let rec = crate::state::NodeRecord {
        id: id.unwrap_or(0),
        http: v["http"].as_str().unwrap_or("").to_string(),
        internal: internal.unwrap_or("").to_string(),
        zone: v["zone"].as_str().unwrap_or("default/default").to_string(),
        incarnation: 0,
        state: crate::state::NodeState::Active,
        updated_at: 0,
    };
    let r = app
        .service
        .put_node(crate::state::Command::PutNode(rec))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": r.id, "internal": r.internal, "state": r.state.as_str()})),
    ))
}

async fn remove_node(
    State(app): State<AppState>,
    _admin: Admin,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = id
        .ok()
        .and_then(|Path(s)| s.parse::<u64>().ok())
        .ok_or_else(|| ApiError::not_found("node"))?;
    let r = app
        .service
        .put_node(crate::state::Command::SetNodeState {
            id,
            state: crate::state::NodeState::Leaving,
        })
        .await?;
    Ok(Json(json!({"id": r.id, "state": r.state.as_str()})))
}

/// `POST /admin/v1/groups/{id}/split` with `{}` or `{"at": shard}`: splits a data group online
/// (`service::split`) and answers once the new group serves its range.
async fn split_group(
    State(app): State<AppState>,
    _admin: Admin,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let group = data_group(id)?;
    let (obj, mut errs) = admin_object(&app, &headers, body, &["at"]).await?;
    let at = match obj.get("at") {
        None | Some(Value::Null) => None,
        Some(a) => match a.as_u64().and_then(|a| u16::try_from(a).ok()) {
            Some(a) => Some(a),
            None => {
                errs.push("at must be a logical shard, 0 to 65535".into());
                None
            }
        },
    };
    if !errs.is_empty() {
        return Err(ApiError::validation(errs));
    }
    let done = app.service.split_group(group, at).await?;
    Ok(Json(json!({
        "source": done.source,
        "target": done.target,
        "ranges": done.ranges,
        "map_version": done.map_version,
    })))
}

/// The data group a `/admin/v1/groups/{id}/...` path names (`404` for anything else).
fn data_group(
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<crate::ids::GroupId, ApiError> {
    id.ok()
        .and_then(|Path(s)| s.parse::<crate::ids::GroupId>().ok())
        .filter(|g| *g != crate::ids::SYSTEM_GROUP)
        .ok_or_else(|| ApiError::not_found("group"))
}

/// A small admin body: a JSON object with only the `fields` named; its unknown fields as
/// validation errors (to report with the rest).
async fn admin_object(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
    fields: &[&str],
) -> Result<(serde_json::Map<String, Value>, Vec<String>), ApiError> {
    let bytes = json_body(headers, body, 1024, app.service.limits().body_timeout).await?;
    let v = validate::parse_json(&bytes)?;
    let Value::Object(obj) = v else {
        return Err(ApiError::validation(vec![
            "the body must be a JSON object".into(),
        ]));
    };
    let errs = obj
        .keys()
        .filter(|k| !fields.contains(&k.as_str()))
        .map(|k| format!("unknown field `{}`", k.chars().take(64).collect::<String>()))
        .collect();
    Ok((obj, errs))
}

/// `POST /admin/v1/groups/{id}/move` with `{"replicas": [ids], "leader": id}` (leader
/// optional): places a data group on those nodes, pinned there (`service::placement`), and
/// answers once it has those voters and leader; `{"auto": true}` gives it back to the
/// rebalancer.
async fn move_group(
    State(app): State<AppState>,
    _admin: Admin,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let group = data_group(id)?;
    let (obj, mut errs) =
        admin_object(&app, &headers, body, &["replicas", "leader", "auto"]).await?;
    let node = |v: &Value| v.as_u64().filter(|n| *n > 0);
    let auto = match obj.get("auto") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            errs.push("auto must be a boolean".into());
            false
        }
    };
    let replicas: Option<Vec<u64>> = match obj.get("replicas") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) if a.len() <= 16 => {
            let ids: Vec<u64> = a.iter().filter_map(node).collect();
            if ids.len() != a.len() {
                errs.push("replicas must be node ids (positive integers)".into());
            }
            Some(ids)
        }
        Some(_) => {
            errs.push("replicas must be an array of at most 16 node ids".into());
            None
        }
    };
    let leader = match obj.get("leader") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let l = node(v);
            if l.is_none() {
                errs.push("leader must be a node id (a positive integer)".into());
            }
            l
        }
    };
    let named = obj.get("replicas").is_some_and(|v| !v.is_null());
    if auto && (named || obj.get("leader").is_some_and(|v| !v.is_null())) {
        errs.push(
            "auto gives the group back to the rebalancer: name no replicas or leader with it"
                .into(),
        );
    }
    if !auto && !named {
        errs.push("replicas is required (or auto: true)".into());
    }
    if !errs.is_empty() {
        return Err(ApiError::validation(errs));
    }
    if auto {
        let version = app.service.unpin_group(group).await?;
        return Ok(Json(
            json!({"group": group, "pinned": false, "map_version": version}),
        ));
    }
    let done = app
        .service
        .move_group(group, replicas.unwrap_or_default(), leader)
        .await?;
    Ok(Json(json!({
        "group": done.group,
        "replicas": done.replicas,
        "leader": done.leader,
        "pinned": true,
        "map_version": done.map_version,
    })))
}

// ---- health --------------------------------------------------------------------------------

fn shard_leaders(svc: &Service) -> (usize, usize) {
    svc.leaders_known()
}

async fn health(State(app): State<AppState>) -> Response {
    let (total, led) = shard_leaders(&app.service);
    let ok = total == led;
    let body = json!({
        "status": if ok { "ok" } else { "degraded" },
        "version": env!("CARGO_PKG_VERSION"),
        "node_id": app.service.node_id(),
        "groups": total,
        "groups_with_leader": led,
        // The node's wall clock: operators (and the chaos nemesis) compare nodes for skew.
        "now_ms": app.service.now(),
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn live() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(app): State<AppState>) -> Response {
    let (total, led) = shard_leaders(&app.service);
    if total == led {
        (StatusCode::OK, Json(json!({ "status": "ok" }))).into_response()
    } else {
        ApiError::unavailable(format!("{} of {total} groups have no leader", total - led))
            .into_response()
    }
}
