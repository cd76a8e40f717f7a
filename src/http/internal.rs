//! The internal port, for peers only: raft messages, forwarded operations and liveness pings on
//! node-pair streams (`transport::stream`, served by [`InternalState`]'s `stream::Handler`),
//! joins, status, the shard map and key refreshes over HTTP/2.
//!
//! Every HTTP request and every stream's hello must carry the cluster secret and name this
//! node (id and incarnation) as its target ([`admit`]); see `transport` for the client side.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{decode, encode};
use crate::crypto;
use crate::ids::GroupId;
use crate::raft::snapshot::Chunk;
use crate::raft::{Snapshot, SnapshotData};
use crate::service::{Executor, Service};
use crate::state::{Command, NodeRecord};
use crate::transport::messages::{NodeStatus, ShardOp, SnapshotPart};
use crate::transport::stream::{self, Call};
use crate::transport::{
    AddressBook, H_FROM, H_FROM_INCARNATION, H_PROTOCOL, H_TO, H_TO_INCARNATION, Identity, PROTOCOL,
};

/// Snapshot uploads in progress: `(group, transfer id)` → when it started and chunks so far.
type Uploads = Mutex<HashMap<(GroupId, u64), (Instant, Vec<Chunk>)>>;

/// What the internal handlers share.
pub struct InternalState {
    pub exec: Arc<Executor>,
    pub service: Service,
    pub me: Identity,
    pub http: String,
    pub zone: String,
    pub book: Arc<AddressBook>,
    /// SHA-256 of the cluster secret.
    pub secret_hash: [u8; 32],
    pub uploads: Uploads,
}

/// The internal router.
pub fn internal_router(state: Arc<InternalState>) -> Router {
    Router::new()
        .route("/internal/v1/join", post(join))
        .route("/internal/v1/status", post(status))
        .route(crate::node::map::MAP_PATH, post(shard_map))
        .route(crate::transport::KEYS_REFRESH_PATH, post(refresh_keys))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(state)
}

fn header_u64(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.parse().ok()
}

fn refuse(status: StatusCode, why: &'static str) -> Response {
    (status, why).into_response()
}

/// A warning that is logged at most once per interval, however often its cause recurs.
struct Throttled {
    /// Milliseconds after [`Throttled::epoch`] of the last time it was due (0: never).
    last: std::sync::atomic::AtomicU64,
    interval_ms: u64,
}

impl Throttled {
    const fn new(interval_ms: u64) -> Self {
        Self {
            last: std::sync::atomic::AtomicU64::new(0),
            interval_ms,
        }
    }

    fn epoch() -> Instant {
        static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *EPOCH.get_or_init(Instant::now)
    }

    /// Whether to log now (and, if so, not again for the interval).
    fn due(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = u64::try_from(Self::epoch().elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.last.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= self.interval_ms)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

static PROTOCOL_WARNING: Throttled = Throttled::new(10_000);

/// Who a request (or a stream's hello) says it is from and for, with the secret it presents.
pub struct Credentials<'a> {
    pub secret: &'a [u8],
    /// The sender's protocol version (1 sent none).
    pub protocol: u64,
    pub from: u64,
    pub from_incarnation: u64,
    pub to: u64,
    pub to_incarnation: u64,
    /// A join or a shard-map read: the sender knows this node only by address, and may not be
    /// known by its incarnation yet.
    pub joining: bool,
}

/// Authenticates the peer and checks that what it sends is meant for this node as it is now:
/// every HTTP request ([`guard`]) and every stream, once, at its hello.
///
/// # Errors
/// The status and reason to refuse with.
pub fn admit(st: &InternalState, c: &Credentials<'_>) -> Result<(), (StatusCode, &'static str)> {
    if !crypto::ct_eq(&crypto::sha256(c.secret), &st.secret_hash) {
        return Err((StatusCode::UNAUTHORIZED, "bad cluster secret"));
    }
    if c.protocol != u64::from(PROTOCOL) {
        // A peer on another build sends every heartbeat of every group: say it once in a while.
        if PROTOCOL_WARNING.due() {
            tracing::warn!(
                peer = c.from,
                peer_protocol = c.protocol,
                protocol = PROTOCOL,
                "refused a peer that speaks another internal protocol: run one kubbi build on every node"
            );
        } else {
            tracing::debug!(
                peer = c.from,
                peer_protocol = c.protocol,
                "refused a peer of another protocol"
            );
        }
        return Err((
            StatusCode::UPGRADE_REQUIRED,
            "this node speaks another internal protocol version: run one kubbi build on every node",
        ));
    }
    if c.to != st.me.node_id && !(c.joining && c.to == 0) {
        return Err((StatusCode::MISDIRECTED_REQUEST, "this is another node"));
    }
    if c.to_incarnation != 0 && c.to_incarnation != st.me.incarnation {
        tracing::warn!(
            expected = c.to_incarnation,
            "refused a request for this node id with another data directory"
        );
        return Err((
            StatusCode::CONFLICT,
            "identity mismatch: this node's data directory is not the one the cluster knows",
        ));
    }
    if !c.joining {
        sender_is_known(st, c.from, c.from_incarnation)?;
    }
    Ok(())
}

/// Refuses a sender whose data directory is not the one the cluster knows for its id.
fn sender_is_known(
    st: &InternalState,
    from: u64,
    from_incarnation: u64,
) -> Result<(), (StatusCode, &'static str)> {
    match st.book.incarnation(from) {
        Some(known) if known != 0 && known != from_incarnation => Err((
            StatusCode::CONFLICT,
            "identity mismatch: the sender's data directory is not the one the cluster knows",
        )),
        _ => Ok(()),
    }
}

/// Checks every HTTP request to the internal port with [`admit`].
async fn guard(State(st): State<Arc<InternalState>>, req: Request, next: Next) -> Response {
    let h = req.headers();
    let presented = h
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let credentials = Credentials {
        secret: presented.as_bytes(),
        // Version 1 sent no header.
        protocol: header_u64(h, H_PROTOCOL).unwrap_or(1),
        from: header_u64(h, H_FROM).unwrap_or(0),
        from_incarnation: header_u64(h, H_FROM_INCARNATION).unwrap_or(0),
        to: header_u64(h, H_TO).unwrap_or(0),
        to_incarnation: header_u64(h, H_TO_INCARNATION).unwrap_or(0),
        // A joining node knows its seed only by address.
        joining: matches!(
            req.uri().path(),
            "/internal/v1/join" | crate::node::map::MAP_PATH
        ),
    };
    if let Err((status, why)) = admit(&st, &credentials) {
        return refuse(status, why);
    }
    next.run(req).await
}

impl stream::Handler for InternalState {
    fn admit(&self, hello: &stream::Hello) -> Result<(), stream::Answer> {
        admit(
            self,
            &Credentials {
                secret: &hello.secret,
                protocol: u64::from(hello.protocol),
                from: hello.from,
                from_incarnation: hello.from_incarnation,
                to: hello.to,
                to_incarnation: hello.to_incarnation,
                joining: false,
            },
        )
        .map_err(|(status, why)| stream::Answer::refuse(status.as_u16(), why))
    }

    async fn handle(
        self: Arc<Self>,
        peer: stream::Peer,
        call: Call,
        trace: Vec<(String, String)>,
        body: Bytes,
    ) -> stream::Answer {
        // The cluster may have learned of the sender's new data directory since the
        // stream opened.
        if let Err((status, why)) = sender_is_known(&self, peer.id, peer.incarnation) {
            return stream::Answer::refuse(status.as_u16(), why);
        }
        let answer = match call {
            Call::Shard(g) => shard(&self, g, trace, &body).await,
            Call::Liveness => liveness(&self, peer.id, &body),
            Call::Append(g)
            | Call::Vote(g)
            | Call::PreVote(g)
            | Call::Transfer(g)
            | Call::Snapshot(g) => raft_rpc(&self, g, call, &body).await,
        };
        answer.unwrap_or_else(|Undecodable| stream::Answer::refuse(400, "undecodable request"))
    }
}

fn reply<T: Serialize>(v: &T) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        encode(v),
    )
        .into_response()
}

/// An internal request body that does not decode.
struct Undecodable;

impl IntoResponse for Undecodable {
    fn into_response(self) -> Response {
        refuse(StatusCode::BAD_REQUEST, "undecodable request")
    }
}

fn body<T: DeserializeOwned>(b: &[u8]) -> Result<T, Undecodable> {
    decode("internal request", b).map_err(|e| {
        tracing::warn!(error = %e, "undecodable internal request");
        Undecodable
    })
}

async fn raft_rpc(
    st: &InternalState,
    group: GroupId,
    call: Call,
    b: &[u8],
) -> Result<stream::Answer, Undecodable> {
    let Some(lg) = st.exec.group(group) else {
        return Ok(stream::Answer::refuse(404, "no such group"));
    };
    let raft = &lg.raft;
    // Whether the message wakes a quiet follower (`raft::quiet`): anything but a heartbeat
    // without entries or a pre-vote.
    let mut wakes = true;
    let r = async {
        Ok(stream::Answer::ok(match call {
            Call::Append(_) => {
                let req: openraft::raft::AppendEntriesRequest<crate::raft::TypeConfig> = body(b)?;
                wakes = !req.entries.is_empty();
                encode(&raft.append_entries(req).await.map_err(|e| e.to_string()))
            }
            Call::Vote(_) => encode(&raft.vote(body(b)?).await.map_err(|e| e.to_string())),
            Call::PreVote(_) => {
                wakes = false;
                let mut r = raft.pre_vote(body(b)?).await.map_err(|e| e.to_string());
                // A quiet follower that hears the leader's liveness pings says no, as an awake
                // one that hears heartbeats does (`Quiet::hears_leader`). Refusing a pre-vote
                // is always safe: a pre-vote changes nothing.
                if let Ok(resp) = &mut r
                    && resp.vote_granted
                    && st.exec.quiet().hears_leader(group, Instant::now())
                {
                    resp.vote_granted = false;
                }
                encode(&r)
            }
            Call::Transfer(_) => {
                let req: openraft::raft::TransferLeaderRequest<crate::raft::TypeConfig> = body(b)?;
                // A stopping node has handed its groups off (`hand_off_leadership`); it takes
                // none back, or its stop would cost the group an election after all. (A
                // transfer to another node is broadcast to every voter, this one included:
                // that one it accepts.)
                if st.exec.is_stopping() && *req.to_node_id() == st.exec.node_id() {
                    encode(&Err::<(), String>("this node is stopping".into()))
                } else {
                    encode(
                        &raft
                            .handle_transfer_leader(req)
                            .await
                            .map_err(|e| e.to_string()),
                    )
                }
            }
            Call::Snapshot(_) => {
                let part: SnapshotPart = body(b)?;
                encode(&receive_snapshot(st, group, raft, part).await)
            }
            Call::Shard(_) | Call::Liveness => {
                return Ok(stream::Answer::refuse(404, "no such raft call"));
            }
        }))
    }
    .await;
    // After the message was handled: a follower's leader lease is fresh when its ticker starts.
    st.exec.quiet().after_message(group, wakes);
    r
}

/// A peer's liveness ping: the heartbeat of the groups it leads quietly.
fn liveness(st: &InternalState, from: u64, b: &[u8]) -> Result<stream::Answer, Undecodable> {
    let ping: crate::transport::messages::Liveness = body(b)?;
    st.exec.quiet().on_ping(from, &ping, Instant::now());
    Ok(stream::Answer::ok(encode(&())))
}

/// How long an unfinished snapshot upload is kept.
const UPLOAD_TTL: Duration = Duration::from_secs(120);

async fn receive_snapshot(
    st: &InternalState,
    group: GroupId,
    raft: &crate::raft::Raft,
    part: SnapshotPart,
) -> Result<Option<openraft::raft::SnapshotResponse<crate::raft::TypeConfig>>, String> {
    let chunks = {
        let mut uploads = st.uploads.lock().unwrap_or_else(|p| p.into_inner());
        uploads.retain(|_, (started, _)| started.elapsed() < UPLOAD_TTL);
        let entry = uploads
            .entry((group, part.transfer))
            .or_insert_with(|| (Instant::now(), Vec::new()));
        entry.1.push(part.chunk);
        if !part.last {
            return Ok(None);
        }
        uploads
            .remove(&(group, part.transfer))
            .map(|(_, c)| c)
            .unwrap_or_default()
    };
    let items: usize = chunks.iter().map(|c| c.items.len()).sum();
    tracing::info!(group, items, last = ?part.meta.last_log_id, "installing a snapshot from the leader");
    let snapshot = Snapshot {
        meta: part.meta,
        snapshot: SnapshotData::from_chunks(chunks),
    };
    raft.install_full_snapshot(part.vote, snapshot)
        .await
        .map(Some)
        .map_err(|e| e.to_string())
}

/// A forwarded operation: executed here or refused with a leader hint (a forward is never
/// forwarded again).
async fn shard(
    st: &InternalState,
    group: GroupId,
    trace: Vec<(String, String)>,
    b: &[u8],
) -> Result<stream::Answer, Undecodable> {
    let op: ShardOp = body(b)?;
    let span = tracing::debug_span!(
        "kubbi.forwarded",
        otel.kind = "server",
        kubbi.group = group,
        kubbi.op = op.name(),
        kubbi.node = st.me.node_id
    );
    crate::telemetry::continue_trace_pairs(&span, trace);
    Ok(stream::Answer::ok(encode(
        &tracing::Instrument::instrument(st.exec.execute(group, op), span).await,
    )))
}

async fn join(State(st): State<Arc<InternalState>>, b: Bytes) -> Response {
    let rec: NodeRecord = match body(&b) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let r = st
        .service
        .put_node(Command::PutNode(rec))
        .await
        .map_err(|e| format!("{}: {}", e.code.as_str(), e.message));
    reply(&r)
}

/// The shard map this node routes by: a joining node starts its groups from it.
async fn shard_map(State(st): State<Arc<InternalState>>) -> Response {
    reply(st.service.shard_map().as_ref())
}

/// Re-reads the key table from the system group's leader (a key was just revoked).
async fn refresh_keys(State(st): State<Arc<InternalState>>) -> Response {
    match st.service.refresh_keys().await {
        Ok(()) => reply(&true),
        Err(e) => {
            tracing::warn!(error = %e, "cannot re-read API keys after a revocation");
            reply(&false)
        }
    }
}

async fn status(State(st): State<Arc<InternalState>>) -> Response {
    let mut groups = Vec::new();
    for lg in st.exec.groups() {
        if let Some(s) = st.exec.status(lg.group)
            && (s.voters.contains(&st.me.node_id) || s.learners.contains(&st.me.node_id))
        {
            groups.push((lg.group, s.leader, s.term));
        }
    }
    reply(&NodeStatus {
        node_id: st.me.node_id,
        incarnation: st.me.incarnation,
        http: st.http.clone(),
        zone: st.zone.clone(),
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::Throttled;

    #[test]
    fn a_throttled_warning_is_due_once_per_interval() {
        let t = Throttled::new(60_000);
        assert!(t.due(), "the first time");
        assert!(!t.due(), "not again within the interval");
        assert!(!t.due());
        let quick = Throttled::new(0);
        assert!(
            quick.due() && quick.due(),
            "an interval of 0 never holds back"
        );
    }
}
