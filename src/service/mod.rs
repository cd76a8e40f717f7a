//! The operations of the public and admin APIs, routed to shards.
//!
//! ```text
//!   http handler ── validated input ──▶ Service
//!                                          │ create: pick shard, generate id + token, seal
//!                                          │ claim/delete: through the kubbi's actor
//!                                          │ preview/get/list: read index, then local state
//!                                          ▼
//!                                     shard raft group ──▶ outcome ──▶ open with the token
//! ```
//!
//! The service holds the secrets of one request only (claim token, payload key, presented API
//! key) and drops them, zeroized, when the request ends. Everything it returns to the HTTP layer
//! is either a record (no secrets) or plaintext the caller is entitled to.

pub mod exec;
pub mod keys;
pub mod model;
pub mod router;

use std::sync::Arc;

use zeroize::Zeroizing;

pub use exec::{Executor, LocalGroup};
pub use keys::KeyCache;
pub use model::*;
pub use router::{Directory, Router};

use crate::clock::Clock;
use crate::codec::{decode, encode};
use crate::config::{Limits, millis};
use crate::crypto::{self, KeyRing, MANIFEST_PART, part_aad};
use crate::error::{ApiError, ErrorCode};
use crate::ids::{ApiKeyId, ClaimToken, GroupId, KubbiId, Millis, RequestId, SYSTEM_GROUP};
use crate::state::{
    ApiKeyRecord, Blob, Body, ClaimIdempotency, Command, Create, CreateIdempotency, KubbiRecord,
    NodeRecord, Outcome, OwnerEntry, Rejection, Sealed, Status,
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
    shards: u16,
    router: Arc<Router>,
    keys: Arc<KeyCache>,
    /// When the key cache was last refreshed from the system group's leader.
    key_refresh: tokio::sync::Mutex<Millis>,
}

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
        shards: u16,
        router: Arc<Router>,
        keys: Arc<KeyCache>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                clock,
                limits,
                keyring,
                shards,
                router,
                keys,
                key_refresh: tokio::sync::Mutex::new(0),
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

    pub fn shard_count(&self) -> u16 {
        self.inner.shards
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.inner.router
    }

    fn shard_of(&self, g: GroupId) -> Result<GroupId, ApiError> {
        if g < self.inner.shards {
            Ok(g)
        } else {
            Err(ApiError::not_found("kubbi"))
        }
    }

    async fn call(&self, g: GroupId, op: ShardOp) -> Result<ShardReply, ApiError> {
        self.inner.router.call(g, op).await
    }

    // ---- producers ------------------------------------------------------------------------

    /// The producer presenting `bearer`, if it is a live API key.
    ///
    /// # Errors
    /// `401 unauthorized` otherwise.
    pub async fn authenticate(&self, bearer: &str) -> Result<Producer, ApiError> {
        let keys = &self.inner.keys;
        if !keys.knows(bearer) && crypto::looks_like_api_key(bearer) {
            // A key created a moment ago through another node may not be applied here yet: ask
            // the system group's leader before refusing. Concurrent lookups share one refresh.
            let asked_at = self.now();
            let mut last = self.inner.key_refresh.lock().await;
            if !keys.knows(bearer) && *last < asked_at {
                if let Ok((records, _)) = self.read_system().await {
                    keys.merge(records);
                }
                *last = self.now();
            }
        }
        let key = keys
            .authenticate(bearer)
            .ok_or_else(ApiError::unauthorized)?;
        Ok(Producer {
            key,
            presented: Zeroizing::new(bearer.to_string()),
        })
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
        let shards = self.inner.shards;
        let idem_hash = idem.as_ref().map(|i| {
            let mut m = producer.key.id.0.to_vec();
            m.extend_from_slice(i.key.as_bytes());
            crypto::sha256(&m)
        });
        let shard = match &idem_hash {
            Some(h) => crate::shard::shard_of_key(h, shards),
            None => crate::shard::random_shard(shards),
        };
        let payload_bytes = match &input.body {
            CreateBody::Single { content, .. } => content.len(),
            CreateBody::Package { files } => files.iter().map(|f| f.content.len()).sum(),
        };
        let input = Arc::new(input);
        // A random id or token collision is astronomically unlikely; it is still handled.
        for _ in 0..3 {
            let id = KubbiId::new_in_shard(shard);
            let token = ClaimToken::generate(shard);
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
            let create = Box::new(Create {
                id,
                owner: producer.key.id,
                token_hash: token.hash(),
                ttl_ms: input.ttl_seconds.saturating_mul(1000),
                max_retrievals: input.max_retrievals,
                body: sealed.body,
                metadata,
                parts: sealed.parts,
                manifest: sealed.manifest,
                retention_ms: millis(self.inner.limits.retention),
                idempotency,
            });
            let op = ShardOp::Create {
                request_id: RequestId::random(),
                create,
            };
            match outcome(self.call(shard, op).await?)? {
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
        let g = self.shard_of(id.shard())?;
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
        let g = self.shard_of(id.shard())?;
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
        let calls =
            (0..self.inner.shards).map(|g| self.call(g, ShardOp::OwnerEntries { owner: *owner }));
        let now = self.now();
        let mut entries: Vec<OwnerEntry> = Vec::new();
        for r in futures::future::join_all(calls).await {
            match r? {
                ShardReply::OwnerEntries(es) => entries.extend(
                    es.into_iter()
                        .filter(|e| status.is_none_or(|s| e.status_at(now) == s)),
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
        let mut by_shard: std::collections::BTreeMap<GroupId, Vec<KubbiId>> = Default::default();
        for id in &page_ids {
            by_shard.entry(id.shard()).or_default().push(*id);
        }
        let calls = by_shard
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
        let g = self.shard_of(token.shard())?;
        let op = ShardOp::ByToken {
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
        let g = self.shard_of(token.shard())?;
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
        let op = ShardOp::Propose {
            request_id: RequestId::random(),
            cmd,
        };
        outcome(self.call(SYSTEM_GROUP, op).await?)
    }

    /// Creates an API key; the key is returned once and stored only as a hash.
    ///
    /// # Errors
    /// `503` when the system group cannot commit.
    pub async fn create_api_key(
        &self,
        label: String,
    ) -> Result<(ApiKeyRecord, Zeroizing<String>), ApiError> {
        let (rec, key) = keys::new_key(label, self.now());
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

    /// Revokes an API key; it stops working on each node as soon as that node applies it.
    ///
    /// # Errors
    /// `404` unknown key.
    pub async fn revoke_api_key(&self, id: ApiKeyId) -> Result<ApiKeyRecord, ApiError> {
        match self.propose_system(Command::RevokeApiKey { id }).await? {
            Outcome::ApiKeyRevoked(r) => Ok(r),
            Outcome::Rejected(Rejection::NotFound) => Err(ApiError::not_found("api key")),
            other => Err(unexpected("revoke api key", &other)),
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

    /// Every group as its leader sees it.
    pub async fn group_statuses(&self) -> Vec<Result<GroupStatus, ApiError>> {
        let groups = (0..self.inner.shards).chain(std::iter::once(SYSTEM_GROUP));
        let calls = groups.map(|g| async move {
            match self.call(g, ShardOp::Status).await? {
                ShardReply::Status(s) => Ok(s),
                other => Err(unexpected("status", &other)),
            }
        });
        futures::future::join_all(calls).await
    }

    /// Number of live kubbi actors on this node.
    pub async fn live_actors(&self) -> usize {
        self.inner.router.executor().live_actors().await
    }

    /// `(groups, groups with a known leader)`: from raft for groups this node is a member of,
    /// from the directory for the others.
    pub fn leaders_known(&self) -> (usize, usize) {
        let router = &self.inner.router;
        let groups: Vec<GroupId> = (0..self.inner.shards)
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
