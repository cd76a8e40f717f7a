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

pub mod keys;
pub mod model;

use std::sync::Arc;

use ractor::ActorRef;
use tokio::sync::oneshot;
use zeroize::Zeroizing;

pub use keys::KeyCache;
pub use model::*;

use crate::actor::{KubbiMsg, ShardCtx, ShardMsg};
use crate::clock::Clock;
use crate::codec::{decode, encode};
use crate::config::{Limits, millis};
use crate::crypto::{self, KeyRing, MANIFEST_PART, part_aad};
use crate::error::{ApiError, ErrorCode};
use crate::ids::{ApiKeyId, ClaimToken, GroupId, KubbiId, Millis, RequestId, SYSTEM_GROUP};
use crate::raft::client::{self, RaftClientError};
use crate::raft::{NodeId, Raft};
use crate::state::{
    ApiKeyRecord, Blob, Body, ClaimIdempotency, Command, Create, CreateIdempotency, KubbiRecord,
    Outcome, OwnerEntry, Rejection, Sealed, Status, StoreError, Table, keys as state_keys,
    read_kubbi, read_kubbi_by_token,
};
use crate::storage::Storage;

/// One shard as the service sees it.
pub struct ShardHandle {
    pub group: GroupId,
    pub raft: Raft,
    pub actor: ActorRef<ShardMsg>,
    pub ctx: Arc<ShardCtx>,
}

/// Everything the operations need. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: NodeId,
    storage: Arc<Storage>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    keyring: KeyRing,
    shards: Vec<ShardHandle>,
    system: Raft,
    keys: Arc<KeyCache>,
}

/// The authenticated producer of a request.
pub struct Producer {
    pub key: ApiKeyRecord,
    /// The presented API key, needed only to seal and open idempotent-create replays.
    pub presented: Zeroizing<String>,
}

fn raft_error(e: RaftClientError) -> ApiError {
    match e {
        RaftClientError::Indeterminate(_) => ApiError::unavailable(
            "the outcome of this request is unknown; retry it (with the same Idempotency-Key to be safe)",
        ),
        RaftClientError::Stopped(_) => ApiError::unavailable("this node is shutting down"),
        RaftClientError::NotLeader { .. } | RaftClientError::NoQuorum(_) => {
            ApiError::unavailable("the shard has no reachable leader right now")
        }
    }
}

fn store_error(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "state read failed");
    ApiError::internal()
}

fn crypto_error(what: &'static str, e: crypto::CryptoError) -> ApiError {
    tracing::error!(what, error = %e, "cannot open sealed data");
    ApiError::internal()
}

fn unexpected(what: &'static str, o: &Outcome) -> ApiError {
    tracing::error!(what, outcome = ?o, "unexpected outcome");
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

impl Service {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_id: NodeId,
        storage: Arc<Storage>,
        clock: Arc<dyn Clock>,
        limits: Limits,
        keyring: KeyRing,
        shards: Vec<ShardHandle>,
        system: Raft,
        keys: Arc<KeyCache>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                node_id,
                storage,
                clock,
                limits,
                keyring,
                shards,
                system,
                keys,
            }),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn now(&self) -> Millis {
        self.inner.clock.now()
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    pub fn shards(&self) -> &[ShardHandle] {
        &self.inner.shards
    }

    pub fn system(&self) -> &Raft {
        &self.inner.system
    }

    fn shard(&self, group: GroupId) -> Option<&ShardHandle> {
        self.inner.shards.get(group as usize)
    }

    // ---- producers ------------------------------------------------------------------------

    /// The producer presenting `bearer`, if it is a live API key.
    ///
    /// # Errors
    /// `401 unauthorized` otherwise.
    pub fn authenticate(&self, bearer: &str) -> Result<Producer, ApiError> {
        let key = self
            .inner
            .keys
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
        let shards = self.inner.shards.len() as u16;
        let idem_hash = idem.as_ref().map(|i| {
            let mut m = producer.key.id.0.to_vec();
            m.extend_from_slice(i.key.as_bytes());
            crypto::sha256(&m)
        });
        let shard = match &idem_hash {
            Some(h) => crate::shard::shard_of_key(h, shards),
            None => crate::shard::random_shard(shards),
        };
        let handle = self.shard(shard).ok_or_else(ApiError::internal)?;

        let payload_bytes = match &input.body {
            CreateBody::Single { content, .. } => content.len(),
            CreateBody::Package { files } => files.iter().map(|f| f.content.len()).sum(),
        };
        let input = Arc::new(input);
        let request_id = RequestId::random();
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
            let cmd = Command::Create(Box::new(Create {
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
            }));
            let outcome = client::propose(&handle.raft, &*self.inner.clock, request_id, cmd)
                .await
                .map_err(raft_error)?;
            let outcome = match outcome {
                Outcome::Duplicate(inner) => *inner,
                o => o,
            };
            match outcome {
                Outcome::Created(record) => {
                    // An actor would passivate before a later deadline: then the shard's timer
                    // index alone holds it, and the first request activates the actor.
                    let idle_ms = millis(handle.ctx.idle);
                    if record.expires_at <= self.now().saturating_add(idle_ms) {
                        let _ = handle.actor.send_message(ShardMsg::Activate {
                            record: record.clone(),
                        });
                    }
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
        let handle = self
            .shard(id.shard())
            .ok_or_else(|| ApiError::not_found("kubbi"))?;
        client::linearizable(&handle.raft)
            .await
            .map_err(raft_error)?;
        let view = self.inner.storage.read_view(handle.group);
        match read_kubbi(&view, id).map_err(store_error)? {
            Some(r) if r.owner == *owner => Ok(r),
            _ => Err(ApiError::not_found("kubbi")),
        }
    }

    /// Deletes a producer's active kubbi; its payload is wiped in the same write.
    ///
    /// # Errors
    /// `404` unknown or another key's, `409` already ended.
    pub async fn delete(&self, owner: &ApiKeyId, id: &KubbiId) -> Result<KubbiRecord, ApiError> {
        let handle = self
            .shard(id.shard())
            .ok_or_else(|| ApiError::not_found("kubbi"))?;
        let outcome = self
            .route(handle, *id, |reply| KubbiMsg::Delete {
                request_id: RequestId::random(),
                owner: *owner,
                reply,
            })
            .await?;
        match outcome {
            Outcome::Deleted(r) => Ok(r),
            Outcome::Duplicate(inner) => match *inner {
                Outcome::Deleted(r) => Ok(r),
                other => Err(delete_rejection(&other)),
            },
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
        let reads = self
            .inner
            .shards
            .iter()
            .map(|h| client::linearizable(&h.raft));
        for r in futures::future::join_all(reads).await {
            r.map_err(raft_error)?;
        }
        let now = self.now();
        let prefix = state_keys::owner_prefix(owner);
        let end = state_keys::prefix_end(&prefix);
        let mut entries: Vec<OwnerEntry> = Vec::new();
        for h in &self.inner.shards {
            let view = self.inner.storage.read_view(h.group);
            let rows =
                crate::state::StateRead::scan(&view, Table::State, &prefix, &end, usize::MAX)
                    .map_err(store_error)?;
            for (k, v) in rows {
                let e = OwnerEntry::decode(&k, &v).ok_or_else(|| {
                    store_error(StoreError::Corrupt {
                        key: "owner index".into(),
                        reason: "undecodable entry".into(),
                    })
                })?;
                if status.is_none_or(|s| e.status_at(now) == s) {
                    entries.push(e);
                }
            }
        }
        entries.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        let total = entries.len() as u64;
        let skip = page.saturating_sub(1).saturating_mul(limit);
        let mut items = Vec::new();
        for e in entries.iter().skip(skip as usize).take(limit as usize) {
            let view = self.inner.storage.read_view(e.id.shard());
            if let Some(r) = read_kubbi(&view, &e.id).map_err(store_error)? {
                items.push(r);
            }
        }
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

    /// Resolves a token to its record.
    ///
    /// With `linearizable`, the read follows a read index (previews: invariant 6). Without it
    /// (claims, which raft orders anyway) local state answers, and only a miss pays for a read
    /// index, so a claim right after its create never gets a false 404.
    async fn resolve(
        &self,
        token: &ClaimToken,
        linearizable: bool,
    ) -> Result<(&ShardHandle, KubbiRecord), ApiError> {
        let handle = self
            .shard(token.shard())
            .ok_or_else(|| ApiError::not_found("kubbi"))?;
        let hash = token.hash();
        let read = || {
            let view = self.inner.storage.read_view(handle.group);
            read_kubbi_by_token(&view, &hash).map_err(store_error)
        };
        if !linearizable && let Some(r) = read()? {
            return Ok((handle, r));
        }
        client::linearizable(&handle.raft)
            .await
            .map_err(raft_error)?;
        let record = read()?.ok_or_else(|| ApiError::not_found("kubbi"))?;
        Ok((handle, record))
    }

    /// What is waiting behind a token, without consuming it.
    ///
    /// # Errors
    /// `404` unknown token, `410` ended.
    pub async fn preview(&self, token: &ClaimToken) -> Result<Preview, ApiError> {
        let (handle, record) = self.resolve(token, true).await?;
        let status = record.status_at(self.now());
        if status.is_terminal() {
            return Err(ApiError::ended(status));
        }
        let files = if record.has_manifest {
            let view = self.inner.storage.read_view(handle.group);
            let sealed = crate::state::StateRead::get(
                &view,
                Table::Blob,
                &state_keys::blob(&record.id, MANIFEST_PART),
            )
            .map_err(store_error)?;
            let Some(sealed) = sealed else {
                // Ended between the two reads.
                return Err(ApiError::ended(Status::Burned));
            };
            Some(open_manifest(token, &record.id, &sealed)?)
        } else {
            None
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
        let (handle, record) = self.resolve(token, false).await?;
        let idempotency = idempotency_key.map(|k| {
            let mut m = token.hash().0.to_vec();
            m.extend_from_slice(k.as_bytes());
            ClaimIdempotency {
                key: crypto::sha256(&m),
                window_ms: millis(self.inner.limits.claim_idempotency_window),
            }
        });
        let outcome = self
            .route(handle, record.id, |reply| KubbiMsg::Claim {
                request_id: RequestId::random(),
                idempotency,
                reply,
            })
            .await?;
        let claimed = match outcome {
            Outcome::Claimed(c) => c,
            Outcome::Duplicate(inner) => match *inner {
                Outcome::Claimed(_) => {
                    return Err(ApiError::unavailable(
                        "this claim was counted but its result was lost; use an Idempotency-Key to make claims retry-safe",
                    ));
                }
                other => return Err(claim_rejection(&other)),
            },
            other => return Err(claim_rejection(&other)),
        };
        let id = claimed.record.id;
        let bytes: usize = claimed.parts.iter().map(|p| p.0.len()).sum();
        let token = token.clone();
        let claimed = *claimed;
        maybe_blocking(bytes, move || open_claim(&token, &id, claimed)).await?
    }

    async fn route(
        &self,
        handle: &ShardHandle,
        id: KubbiId,
        make: impl Fn(crate::actor::KubbiReply) -> KubbiMsg,
    ) -> Result<Outcome, ApiError> {
        // A reply port dropped unanswered means the actor stopped mid-way: route once more.
        for _ in 0..2 {
            let (tx, rx) = oneshot::channel();
            handle
                .actor
                .send_message(ShardMsg::Route { id, msg: make(tx) })
                .map_err(|_| ApiError::unavailable("this shard is not served here right now"))?;
            if let Ok(r) = rx.await {
                return r.map_err(raft_error);
            }
        }
        Err(ApiError::unavailable("the kubbi's actor stopped; retry"))
    }

    // ---- operators ------------------------------------------------------------------------

    /// Creates an API key; the key is returned once and stored only as a hash.
    ///
    /// # Errors
    /// `503` when the system group cannot commit.
    pub async fn create_api_key(
        &self,
        label: String,
    ) -> Result<(ApiKeyRecord, Zeroizing<String>), ApiError> {
        let (rec, key) = keys::new_key(label, self.now());
        let outcome = client::propose(
            &self.inner.system,
            &*self.inner.clock,
            RequestId::random(),
            Command::PutApiKey(rec.clone()),
        )
        .await
        .map_err(raft_error)?;
        match outcome {
            Outcome::ApiKeyStored(r) => Ok((r, key)),
            other => Err(unexpected("create api key", &other)),
        }
    }

    /// Every API key (never the keys themselves).
    ///
    /// # Errors
    /// `503` when the system group cannot confirm its leadership.
    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, ApiError> {
        client::linearizable(&self.inner.system)
            .await
            .map_err(raft_error)?;
        keys::read_all(&self.inner.storage.read_view(SYSTEM_GROUP)).map_err(store_error)
    }

    /// Revokes an API key; it stops working as soon as each node applies the revocation.
    ///
    /// # Errors
    /// `404` unknown key.
    pub async fn revoke_api_key(&self, id: ApiKeyId) -> Result<ApiKeyRecord, ApiError> {
        let outcome = client::propose(
            &self.inner.system,
            &*self.inner.clock,
            RequestId::random(),
            Command::RevokeApiKey { id },
        )
        .await
        .map_err(raft_error)?;
        match outcome {
            Outcome::ApiKeyRevoked(r) => Ok(r),
            Outcome::Rejected(Rejection::NotFound) => Err(ApiError::not_found("api key")),
            other => Err(unexpected("revoke api key", &other)),
        }
    }

    /// Number of live kubbi actors on this node.
    pub async fn live_actors(&self) -> usize {
        let mut n = 0;
        for h in &self.inner.shards {
            let (tx, rx) = oneshot::channel();
            if h.actor.send_message(ShardMsg::LiveActors(tx)).is_ok() {
                n += rx.await.unwrap_or(0);
            }
        }
        n
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
