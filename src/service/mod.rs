//! The operations of the public and admin APIs, routed to shards.
//!
//! ```text
//!   http handler ── validated input ──▶ Service
//!                                          │ create: pick shard, generate id + token, seal
//!                                          │ claim/delete: through the kubbi's actor
//!                                          │ preview/get/list: lease or read index, then local state
//!                                          ▼
//!                                     shard raft group ──▶ outcome ──▶ open with the token
//! ```
//!
//! The service holds the secrets of one request only (claim token, payload key, presented API
//! key) and drops them, zeroized, when the request ends. Everything it returns to the HTTP layer
//! is either a record (no secrets) or plaintext the caller is entitled to.

pub mod exec;
pub mod keys;
pub mod map_cache;
pub mod model;
pub mod placement;
pub mod router;
pub mod split;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

pub use exec::{Executor, LocalGroup};
pub use keys::KeyCache;
pub use map_cache::MapCache;
pub use model::*;
pub use router::{Directory, Router};

use crate::clock::Clock;
use crate::codec::{decode, encode};
use crate::config::{Limits, millis};
use crate::crypto::{self, KeyRing, MANIFEST_PART, part_aad};
use crate::error::{ApiError, ErrorCode};
use crate::http::ratelimit::{KeyLimiter, Rate};
use crate::ids::{ApiKeyId, ClaimToken, GroupId, KubbiId, Millis, RequestId, SYSTEM_GROUP, Shard};
use crate::state::map::ShardMap;
use crate::state::{
    ApiKeyRecord, Blob, Body, ClaimIdempotency, Command, Create, CreateIdempotency, KeyLimits,
    KubbiRecord, NodeRecord, NodeState, Outcome, OwnerEntry, OwnerUsage, QuotaCheck, QuotaKind,
    Rejection, Sealed, Status, day_of,
};
use crate::transport::messages::{GroupStatus, ShardOp, ShardReply};

/// Everything the operations need. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    clock: Arc<dyn Clock>,
    limits: Limits,
    keyring: KeyRing,
    /// Which group serves each logical shard (changed online by splits).
    map: Arc<MapCache>,
    router: Arc<Router>,
    keys: Arc<KeyCache>,
    /// When a request last began renewing the key cache (concurrent requests share one).
    key_refresh: tokio::sync::Mutex<Option<Instant>>,
    /// Per-key request rate limits.
    key_limiter: KeyLimiter,
    /// Owner usage of shards with no replica here, as their leaders last told.
    usage_cache: std::sync::Mutex<HashMap<(GroupId, ApiKeyId), (Instant, OwnerUsage)>>,
}

/// How long a shard leader's answer about an owner's usage is reused.
const USAGE_CACHE_TTL: Duration = Duration::from_secs(1);

/// The `Retry-After` of an active-kubbi or stored-bytes quota: room comes back when a kubbi
/// ends, which the server cannot foresee.
const QUOTA_RETRY_AFTER_SECS: u32 = 60;

/// The authenticated producer of a request.
pub struct Producer {
    pub key: ApiKeyRecord,
    /// The presented API key, needed only to seal and open idempotent-create replays.
    pub presented: Zeroizing<String>,
}

fn crypto_error(what: &'static str, e: crypto::CryptoError) -> ApiError {
    tracing::error!(what, error = %e, "cannot open sealed data");
    ApiError::internal()
}

fn unexpected(what: &'static str, o: &impl std::fmt::Debug) -> ApiError {
    tracing::error!(what, reply = ?o, "unexpected reply");
    ApiError::internal()
}

/// Sealing is CPU work proportional to the payload: large payloads leave the async workers.
const INLINE_CRYPTO_BYTES: usize = 256 * 1024;

async fn maybe_blocking<T: Send + 'static>(
    bytes: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    if bytes <= INLINE_CRYPTO_BYTES {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        tracing::error!(error = %e, "crypto task failed");
        ApiError::internal()
    })
}

fn outcome(r: ShardReply) -> Result<Outcome, ApiError> {
    match r {
        ShardReply::Outcome(o) => Ok(match o {
            Outcome::Duplicate(inner) => match *inner {
                // Remembered without payload: the claim counted but its bytes cannot be sent.
                Outcome::Claimed(c) if c.parts.is_empty() => {
                    return Err(ApiError::unavailable(
                        "this claim was counted but its result was lost; use an Idempotency-Key to make claims retry-safe",
                    ));
                }
                other => other,
            },
            o => o,
        }),
        other => Err(unexpected("outcome", &other)),
    }
}

impl Service {
    pub fn new(
        clock: Arc<dyn Clock>,
        limits: Limits,
        keyring: KeyRing,
        map: Arc<MapCache>,
        router: Arc<Router>,
        keys: Arc<KeyCache>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                clock,
                limits,
                keyring,
                map,
                router,
                keys,
                key_refresh: tokio::sync::Mutex::new(None),
                key_limiter: KeyLimiter::default(),
                usage_cache: std::sync::Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn now(&self) -> Millis {
        self.inner.clock.now()
    }

    pub fn node_id(&self) -> u64 {
        self.inner.router.executor().node_id()
    }

    /// The shard map this node routes by.
    pub fn shard_map(&self) -> Arc<ShardMap> {
        self.inner.map.get()
    }

    /// The cache of the shard map (its changes can be waited for).
    pub fn map_cache(&self) -> &Arc<MapCache> {
        &self.inner.map
    }

    /// The data groups that serve shards, in order (a group being split off serves none
    /// until its split is done).
    pub fn data_groups(&self) -> Vec<GroupId> {
        self.inner.map.get().serving_groups()
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.inner.router
    }

    /// The group serving logical shard `shard`.
    fn group_of(&self, shard: Shard) -> Result<GroupId, ApiError> {
        self.inner
            .map
            .get()
            .group_of(shard)
            .ok_or_else(|| ApiError::not_found("kubbi"))
    }

    async fn call(&self, g: GroupId, op: ShardOp) -> Result<ShardReply, ApiError> {
        self.inner.router.call(g, op).await
    }

    // ---- producers ------------------------------------------------------------------------

    /// The producer presenting `bearer`, if it is a live API key within its rate limit.
    ///
    /// # Errors
    /// `401 unauthorized` for a missing, unknown or revoked key; `429 rate_limited` over the
    /// key's rate; `503` when this node cannot renew its key lease (see [`keys::KEY_LEASE`]).
    pub async fn authenticate(&self, bearer: &str) -> Result<Producer, ApiError> {
        if !crypto::looks_like_api_key(bearer) {
            return Err(ApiError::unauthorized());
        }
        let keys = &self.inner.keys;
        if !keys.is_fresh(Instant::now()) {
            self.refresh_keys_once(Instant::now()).await;
            if !keys.is_fresh(Instant::now()) {
                return Err(ApiError::unavailable(
                    "this node cannot confirm API keys with the cluster right now",
                ));
            }
        }
        if !keys.knows(bearer) {
            // A key created a moment ago through another node may not be applied here yet: ask
            // the system group's leader before refusing.
            self.refresh_keys_once(Instant::now()).await;
        }
        let key = keys
            .authenticate(bearer)
            .ok_or_else(ApiError::unauthorized)?;
        let limits = self.key_limits(&key);
        if let Some(per_second) = limits.rate_per_second {
            // A cluster-wide rate: each active node allows its share.
            let share = f64::from(per_second) / self.active_nodes() as f64;
            let rate = Rate {
                per_second: share,
                burst: (share * 2.0).max(1.0),
            };
            if let Err(wait) = self.inner.key_limiter.take(key.id, rate, Instant::now()) {
                return Err(ApiError {
                    retry_after: Some(wait.as_secs_f64().ceil() as u32),
                    ..ApiError::new(
                        ErrorCode::RateLimited,
                        format!("this API key is limited to {per_second} requests per second"),
                    )
                });
            }
        }
        Ok(Producer {
            key,
            presented: Zeroizing::new(bearer.to_string()),
        })
    }

    /// A key's limits, with the operator's defaults for what the key does not set.
    pub fn key_limits(&self, key: &ApiKeyRecord) -> KeyLimits {
        key.limits.or(self.inner.limits.key_defaults)
    }

    /// Whether creates by `key` are held to a quota.
    fn has_quota(&self, key: &ApiKeyRecord) -> bool {
        let l = self.key_limits(key);
        l.max_active.is_some() || l.max_bytes.is_some() || l.max_creates_per_day.is_some()
    }

    /// Active members of the cluster (at least 1): a cluster-wide rate is split over them.
    fn active_nodes(&self) -> usize {
        self.inner
            .router
            .directory()
            .nodes()
            .iter()
            .filter(|n| n.state == NodeState::Active)
            .count()
            .max(1)
    }

    /// Re-reads the key table from the system group's leader and renews this node's lease.
    ///
    /// # Errors
    /// `503` when the system group's leader cannot be reached or cannot confirm leadership.
    pub async fn refresh_keys(&self) -> Result<(), ApiError> {
        let started = Instant::now();
        let (records, _) = self.read_system().await?;
        self.inner.keys.renewed(records, started);
        Ok(())
    }

    /// [`Service::refresh_keys`], unless a renewal began after `asked_at`: a burst of requests
    /// that all need one shares it.
    async fn refresh_keys_once(&self, asked_at: Instant) {
        let mut last = self.inner.key_refresh.lock().await;
        if last.is_some_and(|t| t >= asked_at) {
            return;
        }
        *last = Some(Instant::now());
        if let Err(e) = self.refresh_keys().await {
            tracing::debug!(error = %e, "cannot renew the API key lease");
        }
    }

    /// What `owner` holds in group `g`: this node's replica when it has one, else the group
    /// leader's answer (reused for [`USAGE_CACHE_TTL`]; the last known, or nothing, when the
    /// leader cannot be asked).
    async fn usage_in(&self, g: GroupId, owner: &ApiKeyId) -> OwnerUsage {
        if let Some(u) = self.inner.router.executor().local_usage(g, owner) {
            return u;
        }
        let cached = self
            .inner
            .usage_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(g, *owner))
            .copied();
        if let Some((at, u)) = cached
            && at.elapsed() < USAGE_CACHE_TTL
        {
            return u;
        }
        match self.call(g, ShardOp::Usage { owner: *owner }).await {
            Ok(ShardReply::Usage(u)) => {
                let mut c = self
                    .inner
                    .usage_cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if c.len() > 100_000 {
                    c.clear();
                }
                c.insert((g, *owner), (Instant::now(), u));
                u
            }
            _ => cached.map(|(_, u)| u).unwrap_or_default(),
        }
    }

    /// What `owner` holds in every shard but `except` (all of them with `None`), on `day`.
    pub async fn usage(&self, owner: &ApiKeyId, except: Option<GroupId>) -> OwnerUsage {
        let day = day_of(self.now());
        let groups = self
            .data_groups()
            .into_iter()
            .filter(|g| Some(*g) != except);
        let all = futures::future::join_all(groups.map(|g| self.usage_in(g, owner))).await;
        all.into_iter().fold(
            OwnerUsage {
                day,
                ..OwnerUsage::default()
            },
            |sum, u| sum.plus(u, day),
        )
    }

    /// The quota a create by `key` into its home `shard` must fit, if the key has one.
    ///
    /// The home shard's apply counts the key exactly. What the key holds in other shards
    /// (kubbis made before it had a quota, when the operator changes the default) is summed
    /// from this node's replicas, or the leaders of shards with no replica here.
    async fn quota_check(&self, key: &ApiKeyRecord, group: GroupId) -> Option<QuotaCheck> {
        if !self.has_quota(key) {
            return None;
        }
        let l = self.key_limits(key);
        Some(QuotaCheck {
            max_active: l.max_active,
            max_bytes: l.max_bytes,
            max_creates_per_day: l.max_creates_per_day,
            elsewhere: self.usage(&key.id, Some(group)).await,
        })
    }

    fn quota_error(&self, kind: QuotaKind, q: Option<&QuotaCheck>) -> ApiError {
        let limit = |v: Option<u64>| v.map_or_else(|| "its".to_string(), |n| n.to_string());
        let (message, retry_after) = match kind {
            QuotaKind::Active => (
                format!(
                    "this API key holds its quota of {} active kubbis; delete one or wait for one to end",
                    limit(q.and_then(|q| q.max_active))
                ),
                QUOTA_RETRY_AFTER_SECS,
            ),
            QuotaKind::Bytes => (
                format!(
                    "this kubbi would take this API key past its quota of {} stored bytes",
                    limit(q.and_then(|q| q.max_bytes))
                ),
                QUOTA_RETRY_AFTER_SECS,
            ),
            QuotaKind::CreatesPerDay => {
                let now = self.now();
                let next_day = (day_of(now) + 1) * 86_400_000;
                (
                    format!(
                        "this API key has made its quota of {} creates today (UTC)",
                        limit(q.and_then(|q| q.max_creates_per_day))
                    ),
                    next_day.saturating_sub(now).div_ceil(1000).max(1) as u32,
                )
            }
        };
        ApiError {
            retry_after: Some(retry_after),
            ..ApiError::new(ErrorCode::QuotaExceeded, message)
        }
    }

    /// Creates a kubbi.
    ///
    /// # Errors
    /// `409` for an Idempotency-Key reused with another body, `503` when the shard cannot
    /// commit.
    pub async fn create(
        &self,
        producer: &Producer,
        input: CreateInput,
        idem: Option<CreateIdempotencyInput>,
    ) -> Result<Created, ApiError> {
        let map = self.inner.map.get();
        let idem_hash = idem.as_ref().map(|i| {
            let mut m = producer.key.id.0.to_vec();
            m.extend_from_slice(i.key.as_bytes());
            crypto::sha256(&m)
        });
        let shard = if self.has_quota(&producer.key) {
            // A key with a quota keeps its kubbis in one home shard, which counts its usage
            // exactly: creates racing through any nodes can never overshoot.
            map.shard_for_hash(&crypto::sha256(&producer.key.id.0))
        } else {
            match &idem_hash {
                Some(h) => map.shard_for_hash(h),
                // Any shard will do: one of a group this node leads saves the forwarding hop.
                None => self
                    .inner
                    .router
                    .local_leader_group(map.serving_groups())
                    .and_then(|g| map.random_shard_of(g))
                    .unwrap_or_else(rand::random),
            }
        };
        let group = self.group_of(shard)?;
        let payload_bytes = match &input.body {
            CreateBody::Single { content, .. } => content.len(),
            CreateBody::Package { files } => files.iter().map(|f| f.content.len()).sum(),
        };
        let input = Arc::new(input);
        // A token collision is astronomically unlikely; it is still handled.
        for _ in 0..3 {
            let token = ClaimToken::generate(shard);
            // Named by its token (key layout 3): a claim finds the record with one read.
            let token_hash = token.hash();
            let id = KubbiId::for_token(shard, &token_hash);
            let sealed = {
                let input = input.clone();
                let token = token.clone();
                maybe_blocking(payload_bytes, move || {
                    seal_payload(&input.body, &token, &id)
                })
                .await?
            };
            let metadata = input.metadata_json.as_ref().map(|m| {
                let (key_id, blob) = self.inner.keyring.seal_metadata(&id, m);
                Sealed { key_id, blob }
            });
            let idempotency = match (&idem, &idem_hash) {
                (Some(i), Some(h)) => {
                    let key = crypto::replay_key(&producer.presented, h);
                    Some(CreateIdempotency {
                        key: *h,
                        body_hash: i.body_hash,
                        sealed_token: crypto::seal(&key, h, token.expose().as_bytes()),
                        window_ms: millis(self.inner.limits.create_idempotency_window),
                    })
                }
                _ => None,
            };
            let quota = self.quota_check(&producer.key, group).await;
            let create = Box::new(Create {
                id,
                owner: producer.key.id,
                token_hash,
                ttl_ms: input.ttl_seconds.saturating_mul(1000),
                max_retrievals: input.max_retrievals,
                body: sealed.body,
                metadata,
                parts: sealed.parts,
                manifest: sealed.manifest,
                retention_ms: millis(self.inner.limits.retention),
                idempotency,
                quota,
            });
            let op = ShardOp::Create {
                request_id: RequestId::random(),
                create,
            };
            match outcome(self.call(group, op).await?)? {
                Outcome::Created(record) => {
                    return Ok(Created {
                        record,
                        token,
                        replayed: false,
                    });
                }
                Outcome::CreateReplayed {
                    record,
                    sealed_token,
                } => {
                    let h = idem_hash.ok_or_else(ApiError::internal)?;
                    let key = crypto::replay_key(&producer.presented, &h);
                    let text = crypto::open(&key, &h, &sealed_token)
                        .map_err(|e| crypto_error("idempotent create replay", e))?;
                    let token = std::str::from_utf8(&text)
                        .ok()
                        .and_then(ClaimToken::parse)
                        .ok_or_else(ApiError::internal)?;
                    return Ok(Created {
                        record,
                        token,
                        replayed: true,
                    });
                }
                Outcome::Rejected(Rejection::IdempotencyConflict) => {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        "this Idempotency-Key was used with a different request body",
                    ));
                }
                Outcome::Rejected(Rejection::Quota(kind)) => {
                    return Err(self.quota_error(kind, quota.as_ref()));
                }
                Outcome::Rejected(Rejection::Collision) => continue,
                other => return Err(unexpected("create", &other)),
            }
        }
        Err(ApiError::internal())
    }

    /// A producer's own kubbi.
    ///
    /// # Errors
    /// `404` when unknown, purged or another key's.
    pub async fn get(&self, owner: &ApiKeyId, id: &KubbiId) -> Result<KubbiRecord, ApiError> {
        let g = self.group_of(id.shard())?;
        match self.call(g, ShardOp::Get { ids: vec![*id] }).await? {
            ShardReply::Records(mut rs) => match rs.pop() {
                Some(r) if r.owner == *owner => Ok(r),
                _ => Err(ApiError::not_found("kubbi")),
            },
            other => Err(unexpected("get", &other)),
        }
    }

    /// Deletes a producer's active kubbi; its payload is wiped in the same write.
    ///
    /// # Errors
    /// `404` unknown or another key's, `409` already ended.
    pub async fn delete(&self, owner: &ApiKeyId, id: &KubbiId) -> Result<KubbiRecord, ApiError> {
        let g = self.group_of(id.shard())?;
        let op = ShardOp::Delete {
            request_id: RequestId::random(),
            id: *id,
            owner: *owner,
        };
        match outcome(self.call(g, op).await?)? {
            Outcome::Deleted(r) => Ok(r),
            other => Err(delete_rejection(&other)),
        }
    }

    /// Lists a producer's kubbis, newest first.
    ///
    /// # Errors
    /// `503` when a shard cannot confirm its leadership.
    pub async fn list(
        &self,
        owner: &ApiKeyId,
        page: u64,
        limit: u64,
        status: Option<Status>,
    ) -> Result<ListPage, ApiError> {
        let calls = self
            .data_groups()
            .into_iter()
            .map(|g| self.call(g, ShardOp::OwnerEntries { owner: *owner }));
        let mut entries: Vec<OwnerEntry> = Vec::new();
        for r in futures::future::join_all(calls).await {
            match r? {
                // Each entry's status was judged by its group's leader, at the group's time.
                ShardReply::OwnerEntries(es) => entries.extend(
                    es.into_iter()
                        .filter(|e| status.is_none_or(|s| e.status == s)),
                ),
                other => return Err(unexpected("owner entries", &other)),
            }
        }
        entries.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        let total = entries.len() as u64;
        let skip = page.saturating_sub(1).saturating_mul(limit);
        let page_ids: Vec<KubbiId> = entries
            .iter()
            .skip(usize::try_from(skip).unwrap_or(usize::MAX))
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .map(|e| e.id)
            .collect();
        let mut by_group: std::collections::BTreeMap<GroupId, Vec<KubbiId>> = Default::default();
        for id in &page_ids {
            by_group
                .entry(self.group_of(id.shard())?)
                .or_default()
                .push(*id);
        }
        let calls = by_group
            .into_iter()
            .map(|(g, ids)| self.call(g, ShardOp::Get { ids }));
        let mut found: std::collections::HashMap<KubbiId, KubbiRecord> = Default::default();
        for r in futures::future::join_all(calls).await {
            match r? {
                ShardReply::Records(rs) => found.extend(rs.into_iter().map(|r| (r.id, r))),
                other => return Err(unexpected("get", &other)),
            }
        }
        let items = page_ids.iter().filter_map(|id| found.remove(id)).collect();
        Ok(ListPage { items, total })
    }

    /// Opens a record's metadata.
    ///
    /// # Errors
    /// `500` when the key ring cannot open it (a missing key after a bad rotation).
    pub fn metadata(&self, r: &KubbiRecord) -> Result<Option<serde_json::Value>, ApiError> {
        let Some(m) = &r.metadata else {
            return Ok(None);
        };
        let plain = self
            .inner
            .keyring
            .open_metadata(&r.id, m.key_id, &m.blob)
            .map_err(|e| crypto_error("metadata", e))?;
        serde_json::from_slice(&plain).map(Some).map_err(|e| {
            tracing::error!(error = %e, "stored metadata is not JSON");
            ApiError::internal()
        })
    }

    // ---- consumers ------------------------------------------------------------------------

    /// What is waiting behind a token, without consuming it (a linearizable read on the
    /// shard's leader).
    ///
    /// # Errors
    /// `404` unknown token, `410` ended.
    pub async fn preview(&self, token: &ClaimToken) -> Result<Preview, ApiError> {
        let g = self.group_of(token.shard())?;
        let op = ShardOp::ByToken {
            shard: token.shard(),
            token_hash: token.hash(),
            with_manifest: true,
        };
        let (record, manifest) = match self.call(g, op).await? {
            ShardReply::Record(Some(r)) => r,
            ShardReply::Record(None) => return Err(ApiError::not_found("kubbi")),
            other => return Err(unexpected("by token", &other)),
        };
        // Judged by the leader's clock (the read stamps it), never this node's.
        let status = record.status;
        if status.is_terminal() {
            return Err(ApiError::ended(status));
        }
        let files = match (record.has_manifest, manifest) {
            (false, _) => None,
            (true, Some(sealed)) => Some(open_manifest(token, &record.id, &sealed.0)?),
            // Ended between the two reads of the leader.
            (true, None) => return Err(ApiError::ended(Status::Burned)),
        };
        Ok(Preview { record, files })
    }

    /// Claims one retrieval.
    ///
    /// # Errors
    /// `404` unknown token, `410` ended, `503` when the outcome is unknown.
    pub async fn claim(
        &self,
        token: &ClaimToken,
        idempotency_key: Option<&str>,
    ) -> Result<ClaimOutput, ApiError> {
        let g = self.group_of(token.shard())?;
        let idempotency = idempotency_key.map(|k| {
            let mut m = token.hash().0.to_vec();
            m.extend_from_slice(k.as_bytes());
            ClaimIdempotency {
                key: crypto::sha256(&m),
                window_ms: millis(self.inner.limits.claim_idempotency_window),
            }
        });
        let op = ShardOp::Claim {
            request_id: RequestId::random(),
            shard: token.shard(),
            token_hash: token.hash(),
            idempotency,
        };
        let claimed = match outcome(self.call(g, op).await?)? {
            Outcome::Claimed(c) => c,
            other => return Err(claim_rejection(&other)),
        };
        let id = claimed.record.id;
        let bytes: usize = claimed.parts.iter().map(|p| p.0.len()).sum();
        let token = token.clone();
        let claimed = *claimed;
        maybe_blocking(bytes, move || open_claim(&token, &id, claimed)).await?
    }

    // ---- operators ------------------------------------------------------------------------

    async fn propose_system(&self, cmd: Command) -> Result<Outcome, ApiError> {
        self.propose(SYSTEM_GROUP, cmd).await
    }

    /// Proposes `cmd` to group `g` (a fresh request id; retries reuse it).
    async fn propose(&self, g: GroupId, cmd: Command) -> Result<Outcome, ApiError> {
        let op = ShardOp::Propose {
            request_id: RequestId::random(),
            cmd,
        };
        outcome(self.call(g, op).await?)
    }

    /// Creates an API key; the key is returned once and stored only as a hash.
    ///
    /// # Errors
    /// `503` when the system group cannot commit.
    pub async fn create_api_key(
        &self,
        label: String,
        limits: KeyLimits,
    ) -> Result<(ApiKeyRecord, Zeroizing<String>), ApiError> {
        let (rec, key) = keys::new_key(label, limits, self.now());
        match self.propose_system(Command::PutApiKey(rec)).await? {
            Outcome::ApiKeyStored(r) => Ok((r, key)),
            other => Err(unexpected("create api key", &other)),
        }
    }

    /// API keys (never the keys themselves) and cluster members, from the system group.
    ///
    /// # Errors
    /// `503` when the system group cannot confirm its leadership.
    pub async fn read_system(&self) -> Result<(Vec<ApiKeyRecord>, Vec<NodeRecord>), ApiError> {
        match self.call(SYSTEM_GROUP, ShardOp::ReadSystem).await? {
            ShardReply::System { keys, nodes } => Ok((keys, nodes)),
            other => Err(unexpected("read system", &other)),
        }
    }

    /// Revokes an API key. Returns once no node accepts it any more: every other member has
    /// re-read the key table from the system group's leader, or, for a member that did not
    /// answer, its key lease has run out (see [`keys::KEY_LEASE`]).
    ///
    /// # Errors
    /// `404` unknown key.
    pub async fn revoke_api_key(&self, id: ApiKeyId) -> Result<ApiKeyRecord, ApiError> {
        let rec = match self.propose_system(Command::RevokeApiKey { id }).await? {
            Outcome::ApiKeyRevoked(r) => r,
            Outcome::Rejected(Rejection::NotFound) => return Err(ApiError::not_found("api key")),
            other => return Err(unexpected("revoke api key", &other)),
        };
        let committed = Instant::now();
        self.inner.keys.merge(vec![rec.clone()]);
        self.revocation_everywhere(committed).await;
        Ok(rec)
    }

    /// Waits until every other member has re-read the key table, or its lease taken before
    /// `committed` has run out.
    async fn revocation_everywhere(&self, committed: Instant) {
        let Some(peers) = self.inner.router.peers() else {
            return;
        };
        let me = self.node_id();
        // A small margin for clock rate differences between nodes.
        let deadline = committed + keys::KEY_LEASE + Duration::from_millis(250);
        // The members as the system group knows them now (this node's directory may lag).
        let Ok((_, members)) = self.read_system().await else {
            tracing::warn!("cannot read the member table; waiting for every key lease to run out");
            tokio::time::sleep_until(deadline.into()).await;
            return;
        };
        let others: Vec<u64> = members
            .iter()
            .filter(|n| n.id != me && n.state != NodeState::Removed)
            .map(|n| n.id)
            .collect();
        let asks = others.iter().map(|&n| async move {
            let left = deadline.saturating_duration_since(Instant::now());
            peers
                .post::<_, bool>(n, crate::transport::KEYS_REFRESH_PATH, &(), left)
                .await
                .map_err(|e| (n, e))
        });
        let failed: Vec<_> = futures::future::join_all(asks)
            .await
            .into_iter()
            .filter_map(|r| match r {
                Ok(true) => None,
                Ok(false) => Some("could not renew".to_string()),
                Err((n, e)) => Some(format!("node {n}: {e}")),
            })
            .collect();
        if !failed.is_empty() {
            tracing::warn!(
                ?failed,
                "not every node confirmed the revocation; waiting for their key leases to run out"
            );
            tokio::time::sleep_until(deadline.into()).await;
        }
    }

    /// Proposes a change to the member table.
    ///
    /// # Errors
    /// `409` when the id is a member with another data directory, `404` unknown node.
    pub async fn put_node(&self, cmd: Command) -> Result<NodeRecord, ApiError> {
        match self.propose_system(cmd).await? {
            Outcome::NodeStored(r) => Ok(r),
            Outcome::Rejected(Rejection::IdentityMismatch) => Err(ApiError::new(
                ErrorCode::Conflict,
                "this node id is still a member with another data directory; remove it first",
            )),
            Outcome::Rejected(Rejection::NotFound) => Err(ApiError::not_found("node")),
            Outcome::Rejected(Rejection::LastActiveNode) => Err(ApiError::new(
                ErrorCode::Conflict,
                "the last active node cannot leave the cluster",
            )),
            other => Err(unexpected("put node", &other)),
        }
    }

    /// Stores `map` in the system group if its stored version is still `expect_version`;
    /// `None` when another map got there first.
    ///
    /// # Errors
    /// `503` when the system group cannot commit; `500` for a map the state machine refuses.
    pub async fn put_map(
        &self,
        expect_version: u64,
        map: ShardMap,
    ) -> Result<Option<ShardMap>, ApiError> {
        let cmd = Command::PutMap {
            expect_version,
            map: Box::new(map),
        };
        match self.propose_system(cmd).await? {
            Outcome::MapStored(m) => Ok(Some(*m)),
            Outcome::Rejected(Rejection::StaleMap) => Ok(None),
            other => Err(unexpected("put map", &other)),
        }
    }

    /// Every group (the data groups in order, then the system group) as its leader sees it.
    pub async fn group_statuses(&self) -> Vec<(GroupId, Result<GroupStatus, ApiError>)> {
        let groups = self
            .data_groups()
            .into_iter()
            .chain(std::iter::once(SYSTEM_GROUP));
        let calls = groups.map(|g| async move {
            let st = match self.call(g, ShardOp::Status).await {
                Ok(ShardReply::Status(s)) => Ok(s),
                Ok(other) => Err(unexpected("status", &other)),
                Err(e) => Err(e),
            };
            (g, st)
        });
        futures::future::join_all(calls).await
    }

    /// Kubbi actors this node has started since it started.
    pub fn actor_activations(&self) -> u64 {
        self.inner.router.executor().actor_activations()
    }

    /// Number of live kubbi actors on this node.
    pub async fn live_actors(&self) -> usize {
        self.inner.router.executor().live_actors().await
    }

    /// `(groups, groups with a known leader)`: from raft for groups this node is a member of,
    /// from the directory for the others.
    pub fn leaders_known(&self) -> (usize, usize) {
        let router = &self.inner.router;
        let groups: Vec<GroupId> = self
            .data_groups()
            .into_iter()
            .chain(std::iter::once(SYSTEM_GROUP))
            .collect();
        let known = groups
            .iter()
            .filter(|g| {
                let local = router.executor().group(**g).and_then(|lg| {
                    use openraft::async_runtime::WatchReceiver;
                    lg.raft.metrics().borrow_watched().current_leader
                });
                local.is_some() || router.directory().leader(**g).is_some()
            })
            .count();
        (groups.len(), known)
    }
}

fn claim_rejection(o: &Outcome) -> ApiError {
    match o {
        Outcome::Rejected(Rejection::NotFound) => ApiError::not_found("kubbi"),
        Outcome::Rejected(Rejection::Ended(s)) => ApiError::ended(*s),
        other => unexpected("claim", other),
    }
}

fn delete_rejection(o: &Outcome) -> ApiError {
    match o {
        Outcome::Rejected(Rejection::NotFound) => ApiError::not_found("kubbi"),
        Outcome::Rejected(Rejection::Ended(s)) => ApiError {
            status: Some(*s),
            ..ApiError::new(
                ErrorCode::Conflict,
                format!("this kubbi has already ended ({})", s.as_str()),
            )
        },
        other => unexpected("delete", other),
    }
}

struct SealedPayload {
    body: Body,
    parts: Vec<Blob>,
    manifest: Option<Blob>,
}

fn seal_payload(body: &CreateBody, token: &ClaimToken, id: &KubbiId) -> SealedPayload {
    let key = crypto::payload_key(token.secret(), id);
    match body {
        CreateBody::Single {
            content_type,
            content,
        } => SealedPayload {
            body: Body::Single {
                content_type: content_type.clone(),
            },
            parts: vec![Blob(crypto::seal(&key, &part_aad(id, 0), content))],
            manifest: None,
        },
        CreateBody::Package { files } => {
            let parts = files
                .iter()
                .enumerate()
                .map(|(i, f)| Blob(crypto::seal(&key, &part_aad(id, i as u32), &f.content)))
                .collect();
            let manifest: Vec<ManifestEntry> = files
                .iter()
                .map(|f| ManifestEntry {
                    name: f.name.clone(),
                    content_type: f.content_type.clone(),
                    size_bytes: f.content.len() as u64,
                    role: f.role,
                    text: f.text,
                })
                .collect();
            let manifest_plain = Zeroizing::new(encode(&manifest));
            SealedPayload {
                body: Body::Package {
                    file_count: files.len() as u32,
                    total_size_bytes: files.iter().map(|f| f.content.len() as u64).sum(),
                },
                parts,
                manifest: Some(Blob(crypto::seal(
                    &key,
                    &part_aad(id, MANIFEST_PART),
                    &manifest_plain,
                ))),
            }
        }
    }
}

fn open_manifest(
    token: &ClaimToken,
    id: &KubbiId,
    sealed: &[u8],
) -> Result<Vec<ManifestEntry>, ApiError> {
    let key = crypto::payload_key(token.secret(), id);
    let plain = crypto::open(&key, &part_aad(id, MANIFEST_PART), sealed)
        .map_err(|e| crypto_error("manifest", e))?;
    decode("manifest", &plain).map_err(|e| {
        tracing::error!(error = %e, "manifest does not decode");
        ApiError::internal()
    })
}

fn open_claim(
    token: &ClaimToken,
    id: &KubbiId,
    c: crate::state::Claimed,
) -> Result<ClaimOutput, ApiError> {
    let key = crypto::payload_key(token.secret(), id);
    let content = match &c.record.body {
        Body::Single { .. } => {
            let part = c.parts.first().ok_or_else(ApiError::internal)?;
            ClaimedContent::Single(
                crypto::open(&key, &part_aad(id, 0), &part.0)
                    .map_err(|e| crypto_error("payload", e))?,
            )
        }
        Body::Package { .. } => {
            let manifest = c.manifest.as_ref().ok_or_else(ApiError::internal)?;
            let entries = open_manifest(token, id, &manifest.0)?;
            if entries.len() != c.parts.len() {
                tracing::error!("manifest and parts disagree");
                return Err(ApiError::internal());
            }
            let mut files = Vec::with_capacity(entries.len());
            for (i, (entry, part)) in entries.into_iter().zip(&c.parts).enumerate() {
                let plain = crypto::open(&key, &part_aad(id, i as u32), &part.0)
                    .map_err(|e| crypto_error("payload", e))?;
                files.push((entry, plain));
            }
            ClaimedContent::Package(files)
        }
    };
    Ok(ClaimOutput {
        record: c.record,
        content,
        burned: c.burned,
    })
}
