//! `apply`: what each command does to a shard's state.

use serde::{Deserialize, Serialize};

use super::keys::{self, Timer};
use super::{
    ApiKeyRecord, Blob, ClaimMark, Claimed, Command, Create, KubbiRecord, MARKED_CLAIMS_MAX,
    NodeRecord, NodeState, Outcome, OwnerUsage, Ownership, QuotaCheck, QuotaKind,
    REQUEST_DEDUP_WINDOW_MS, Rejection, Request, Served, ShardRange, ShardStats, Status, day_of,
    in_ranges,
};
use crate::codec::{decode, encode};
use crate::crypto::MANIFEST_PART;
use crate::ids::{ApiKeyId, GroupId, KubbiId, Millis, Shard, TokenHash};

/// The two key spaces of a shard: small records, and sealed payload parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    State,
    Blob,
}

/// Reading or decoding stored state failed. Never turned into "absent".
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("corrupt state at {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

/// Key-value pairs returned by a scan.
pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// A consistent read view of one group's state.
pub trait StateRead {
    /// The raft group whose state this is. Only commands of layout 1 need it (there the group
    /// was the shard); everything else finds its shard in the command and the keys.
    fn group(&self) -> GroupId;
    /// # Errors
    /// On I/O failure.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Up to `limit` entries with `from <= key < to`, in key order.
    ///
    /// # Errors
    /// On I/O failure.
    fn scan(&self, table: Table, from: &[u8], to: &[u8], limit: usize) -> Result<Rows, StoreError>;

    /// The group's ownership record, if it has one (see [`Ownership`]). A store may answer from
    /// a cache it keeps in step with the record.
    ///
    /// # Errors
    /// On I/O failure or a record that does not decode.
    fn ownership(&self) -> Result<Option<Ownership>, StoreError> {
        read_ownership(self)
    }

    /// Calls `each` with every key and value of `[from, to)` in `table`, read in bounded chunks.
    ///
    /// # Errors
    /// On I/O failure, or what `each` returns.
    fn for_each<E: From<StoreError>>(
        &self,
        table: Table,
        from: &[u8],
        to: &[u8],
        mut each: impl FnMut(Vec<u8>, Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E>
    where
        Self: Sized,
    {
        let mut start = Some(from.to_vec());
        loop {
            let rows = next_chunk(self, table, &mut start, to)?;
            if rows.is_empty() {
                return Ok(());
            }
            for (k, v) in rows {
                each(k, v)?;
            }
        }
    }
}

impl From<StoreError> for std::io::Error {
    fn from(e: StoreError) -> Self {
        std::io::Error::other(e)
    }
}

/// Keys a bulk read or delete takes per round.
const CHUNK: usize = 1024;

/// The next chunk of `[start, to)` of `table`, moving `start` past it (`None`: the range is
/// done). An empty chunk means there is nothing left.
fn next_chunk(
    s: &impl StateRead,
    table: Table,
    start: &mut Option<Vec<u8>>,
    to: &[u8],
) -> Result<Rows, StoreError> {
    let Some(from) = start.as_deref() else {
        return Ok(Vec::new());
    };
    let rows = s.scan(table, from, to, CHUNK)?;
    *start = match rows.last() {
        Some((last, _)) if rows.len() == CHUNK => {
            let mut next = last.clone();
            next.push(0);
            Some(next)
        }
        _ => None,
    };
    Ok(rows)
}

/// Reads the shard map (system group).
///
/// # Errors
/// On I/O failure or a map that does not decode.
pub fn read_map(s: &impl StateRead) -> Result<Option<super::map::ShardMap>, StoreError> {
    get_decoded(s, "shard map", &keys::map())
}

fn put_map(
    s: &mut impl StateStore,
    expect_version: u64,
    map: &super::map::ShardMap,
) -> Result<Outcome, StoreError> {
    let stored = read_map(s)?.map_or(0, |m| m.version);
    if stored != expect_version {
        return Ok(Outcome::Rejected(Rejection::StaleMap));
    }
    if map.validate().is_err() {
        return Ok(Outcome::Rejected(Rejection::BadMap));
    }
    let mut map = map.clone();
    map.version = expect_version + 1;
    s.put(Table::State, keys::map(), encode(&map));
    Ok(Outcome::MapStored(Box::new(map)))
}

/// Reads the group's ownership record (what [`StateRead::ownership`] answers by default).
///
/// # Errors
/// On I/O failure or a record that does not decode.
pub fn read_ownership(s: &(impl StateRead + ?Sized)) -> Result<Option<Ownership>, StoreError> {
    get_decoded(s, "ownership", &keys::ownership())
}

/// A transaction over one shard's state: reads see this transaction's own writes.
pub trait StateStore: StateRead {
    fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>);
    fn delete(&mut self, table: Table, key: Vec<u8>);

    /// Deletes every key in `[from, to)` of `table` for which `which` holds.
    ///
    /// # Errors
    /// On I/O failure.
    fn delete_where(
        &mut self,
        table: Table,
        from: &[u8],
        to: &[u8],
        mut which: impl FnMut(&[u8]) -> bool,
    ) -> Result<(), StoreError>
    where
        Self: Sized,
    {
        let mut start = Some(from.to_vec());
        loop {
            let rows = next_chunk(self, table, &mut start, to)?;
            if rows.is_empty() {
                return Ok(());
            }
            for (k, _) in rows {
                if which(&k) {
                    self.delete(table, k);
                }
            }
        }
    }
}

fn corrupt(key: &[u8], e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.iter().take(24).map(|b| format!("{b:02x}")).collect(),
        reason: e.to_string(),
    }
}

fn get_decoded<T: serde::de::DeserializeOwned>(
    s: &(impl StateRead + ?Sized),
    what: &'static str,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    match s.get(Table::State, key)? {
        None => Ok(None),
        Some(bytes) => decode(what, &bytes).map(Some).map_err(|e| corrupt(key, e)),
    }
}

/// Reads a kubbi record.
///
/// # Errors
/// On I/O failure or a record that does not decode.
pub fn read_kubbi(s: &impl StateRead, id: &KubbiId) -> Result<Option<KubbiRecord>, StoreError> {
    let key = keys::kubbi(id);
    match s.get(Table::State, &key)? {
        None => Ok(None),
        Some(v) => KubbiRecord::from_value(&v)
            .map(Some)
            .map_err(|e| corrupt(&key, e)),
    }
}

/// Resolves a token hash to its kubbi record in logical shard `shard` (the token's): one read of
/// the record the token names ([`KubbiId::for_token`]), and for a kubbi created before key
/// layout 3 (a random id) a second one of the token index.
///
/// # Errors
/// On I/O failure or corrupt index entries.
pub fn read_kubbi_by_token(
    s: &impl StateRead,
    shard: Shard,
    token: &TokenHash,
) -> Result<Option<KubbiRecord>, StoreError> {
    if let Some(rec) = read_kubbi(s, &KubbiId::for_token(shard, token))?
        && rec.token_hash == *token
    {
        return Ok(Some(rec));
    }
    let key = keys::token(shard, token);
    let Some(id) = s.get(Table::State, &key)? else {
        return Ok(None);
    };
    let id: [u8; 16] = id
        .as_slice()
        .try_into()
        .map_err(|_| corrupt(&key, "token index value is not an id"))?;
    let rec = read_kubbi(s, &KubbiId(id))?;
    if rec.is_none() {
        return Err(corrupt(&key, "token index points at a missing record"));
    }
    Ok(rec)
}

/// A remembered result, for request-id dedup and claim idempotency.
#[derive(Debug, Serialize, Deserialize)]
struct Dedup {
    outcome: Outcome,
}

/// The first answer of an idempotent create.
#[derive(Debug, Serialize, Deserialize)]
struct CreateIdemRecord {
    body_hash: [u8; 32],
    record: KubbiRecord,
    #[serde(with = "serde_bytes")]
    sealed_token: Vec<u8>,
    until: Millis,
}

/// A store that notes whether an entry wrote anything.
struct Noting<'a, S> {
    inner: &'a mut S,
    wrote: bool,
}

impl<S: StateStore> StateRead for Noting<'_, S> {
    fn group(&self) -> GroupId {
        self.inner.group()
    }
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(table, key)
    }
    fn scan(&self, table: Table, from: &[u8], to: &[u8], limit: usize) -> Result<Rows, StoreError> {
        self.inner.scan(table, from, to, limit)
    }
    fn ownership(&self) -> Result<Option<Ownership>, StoreError> {
        self.inner.ownership()
    }
}

impl<S: StateStore> StateStore for Noting<'_, S> {
    fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) {
        self.wrote = true;
        self.inner.put(table, key, value);
    }
    fn delete(&mut self, table: Table, key: Vec<u8>) {
        self.wrote = true;
        self.inner.delete(table, key);
    }
}

/// The group's time (see [`apply`]): the latest stamp of an entry that changed its state, 0
/// before the first.
///
/// # Errors
/// Storage failures, or a value that is not 8 bytes.
pub fn read_group_time(s: &impl StateRead) -> Result<Millis, StoreError> {
    match s.get(Table::State, &keys::clock())? {
        None => Ok(0),
        Some(v) => {
            let b: [u8; 8] = v
                .as_slice()
                .try_into()
                .map_err(|_| corrupt(&keys::clock(), "group time is not 8 bytes"))?;
            Ok(Millis::from_be_bytes(b))
        }
    }
}

/// Applies one committed request. Deterministic: the same state and request give the same
/// writes and outcome on every replica.
///
/// # Errors
/// Only for storage failures or corrupt state, never for a request that cannot be honoured
/// (that is an [`Outcome::Rejected`]).
///
/// **The group's time.** An entry is applied at its stamp, or at the latest stamp of an entry
/// that changed the group's state when that is later (key `m`). Stamps come from whichever node
/// led when the entry was proposed, and clocks differ and step back; the group's time does not,
/// so no decision (an expiry above all) is ever taken at an earlier time than one the group
/// already acted on. An entry that changes nothing (a refusal, a retry, an early expiry) leaves
/// it alone. A leader whose clock runs ahead moves the group's time with it until real time
/// catches up: keep clocks synchronised (`kubbi_group_time_ahead_ms` shows the gap per node).
pub fn apply(s: &mut impl StateStore, req: &Request) -> Result<Outcome, StoreError> {
    apply_for(s, req, Answer::Full)
}

/// Who reads the outcome of an apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A client waits for it (the leader that proposed the entry): a claim's outcome carries
    /// the payload it hands out.
    Full,
    /// Nobody does (a replica applying an entry it did not propose): a claim leaves its payload
    /// unread, since no state it writes holds it, except the answer it keeps for a retry with
    /// the same `Idempotency-Key`, which it reads the payload for on every replica. The state
    /// written is the same either way; only the outcome differs.
    Unread,
}

/// [`apply`], with the outcome built for `answer`.
///
/// # Errors
/// As [`apply`].
pub fn apply_for(
    s: &mut impl StateStore,
    req: &Request,
    answer: Answer,
) -> Result<Outcome, StoreError> {
    let last = read_group_time(s)?;
    let mut noting = Noting {
        inner: s,
        wrote: false,
    };
    let outcome = apply_at(&mut noting, req, req.now.max(last), answer)?;
    if noting.wrote && req.now > last {
        s.put(Table::State, keys::clock(), req.now.to_be_bytes().to_vec());
    }
    Ok(outcome)
}

fn apply_at(
    s: &mut impl StateStore,
    req: &Request,
    now: Millis,
    answer: Answer,
) -> Result<Outcome, StoreError> {
    match &req.cmd {
        // Naturally idempotent: no request-id dedup needed.
        Command::Sweep { max } => return sweep(s, now, *max),
        Command::Adopt { ranges, .. } => return adopt(s, ranges),
        Command::Split {
            ranges,
            target,
            map_version,
            voters,
        } => return split(s, ranges, *target, *map_version, voters, now),
        Command::Release { target } => return release(s, *target, now),
        _ => {}
    }

    // The request's dedup record lives in the shard it changes, so it moves with it.
    let shard = req.cmd.shard().unwrap_or_else(|| s.group());
    // Before the dedup record: once a shard is fenced its keys here are frozen for the group
    // that takes it over, and a retry of a request applied here before the fence must be
    // answered there, from the dedup record that moved with the shard.
    if req.cmd.is_kubbi_command() {
        match Ownership::serves(s.ownership()?.as_ref(), shard) {
            Served::Here => {}
            Served::Moved { group, map_version } => {
                return Ok(Outcome::Moved { group, map_version });
            }
            Served::NotOwned => return Ok(Outcome::Rejected(Rejection::NotOwned)),
        }
    }
    if let Command::Expire { id } = &req.cmd {
        return expire(s, id, now);
    }
    // A create is found by its record instead (see below and `create`), and so is a claim of
    // a kubbi that keeps claim marks (`claim` looks in the right place).
    if !matches!(
        req.cmd,
        Command::Create(_) | Command::Claim { .. } | Command::ClaimIn { .. }
    ) && let Some(duplicate) = remembered(s, shard, &req.request_id)?
    {
        return Ok(duplicate);
    }

    let outcome = match &req.cmd {
        Command::Create(c) => create(s, c, now)?,
        Command::Claim {
            token_hash,
            idempotency,
        }
        | Command::ClaimIn {
            token_hash,
            idempotency,
            ..
        } => {
            let (outcome, in_table) = claim(
                s,
                shard,
                token_hash,
                idempotency.as_ref(),
                &req.request_id,
                now,
                answer,
            )?;
            if !in_table {
                return Ok(outcome);
            }
            outcome
        }
        Command::Delete { id, owner } => delete(s, id, owner, now)?,
        Command::PutApiKey(rec) => {
            s.put(Table::State, keys::api_key(&rec.id), encode(rec));
            Outcome::ApiKeyStored(rec.clone())
        }
        Command::RevokeApiKey { id } => revoke_api_key(s, id, now)?,
        Command::PutNode(rec) => put_node(s, rec, now)?,
        Command::SetNodeState { id, state } => set_node_state(s, *id, *state, now)?,
        Command::PutMap {
            expect_version,
            map,
        } => put_map(s, *expect_version, map)?,
        Command::Sweep { .. }
        | Command::Expire { .. }
        | Command::Adopt { .. }
        | Command::Split { .. }
        | Command::Release { .. } => Outcome::None,
    };

    // A create keeps no dedup record: its kubbi record is one (a retry finds it by id in
    // `create`, and the record outlives the dedup window, see `end`), and a create that was
    // refused changed nothing, so a retry may as well be decided again.
    if matches!(req.cmd, Command::Create(_)) {
        return Ok(outcome);
    }
    let remembered = Dedup {
        outcome: strip_payload(&outcome),
    };
    s.put(
        Table::State,
        keys::request(shard, &req.request_id),
        encode(&remembered),
    );
    let due = now.saturating_add(REQUEST_DEDUP_WINDOW_MS);
    s.put(
        Table::State,
        keys::timer(due, &Timer::DropRequest(shard, req.request_id)),
        Vec::new(),
    );
    Ok(outcome)
}

/// The remembered outcome of request `id` to logical shard `shard` if it was applied within
/// the dedup window, as [`apply`] would answer a duplicate of it.
///
/// # Errors
/// On I/O failure or a dedup record that does not decode.
pub fn remembered(
    s: &impl StateRead,
    shard: Shard,
    id: &crate::ids::RequestId,
) -> Result<Option<Outcome>, StoreError> {
    Ok(
        get_decoded::<Dedup>(s, "request dedup", &keys::request(shard, id))?
            .map(|d| Outcome::Duplicate(Box::new(d.outcome))),
    )
}

/// The answer to a claim (request `id`, no idempotency key) of a kubbi that ended as `status`
/// (its record `rec`, if the caller has it): the claim's remembered outcome if this very
/// request counted before (a retry after a lost reply), else "ended". An ended kubbi never
/// becomes active again, so nothing is proposed.
///
/// # Errors
/// As [`remembered`].
pub fn claim_of_ended(
    s: &impl StateRead,
    shard: Shard,
    id: &crate::ids::RequestId,
    rec: Option<&KubbiRecord>,
    status: Status,
) -> Result<Outcome, StoreError> {
    Ok(duplicate_claim(s, shard, id, rec)?.unwrap_or(Outcome::Rejected(Rejection::Ended(status))))
}

/// The outcome as remembered for request-id dedup: without payload bytes.
fn strip_payload(o: &Outcome) -> Outcome {
    match o {
        Outcome::Claimed(c) => Outcome::Claimed(Box::new(Claimed {
            parts: Vec::new(),
            manifest: None,
            ..(**c).clone()
        })),
        other => other.clone(),
    }
}

/// The shard's live totals.
///
/// # Errors
/// On I/O failure or a record that does not decode.
pub fn read_stats(s: &impl StateRead) -> Result<ShardStats, StoreError> {
    Ok(get_decoded(s, "stats", &keys::stats())?.unwrap_or_default())
}

/// What `owner` holds in this shard.
///
/// # Errors
/// On I/O failure or a record that does not decode.
pub fn read_owner_usage(s: &impl StateRead, owner: &ApiKeyId) -> Result<OwnerUsage, StoreError> {
    Ok(get_decoded(s, "owner usage", &keys::usage(owner))?.unwrap_or_default())
}

/// Moves `owner`'s usage in this shard; `created` counts a create on the UTC day of `now`.
fn adjust_usage(
    s: &mut impl StateStore,
    owner: &ApiKeyId,
    active: i64,
    bytes: i64,
    created: bool,
    now: Millis,
) -> Result<(), StoreError> {
    let mut u = read_owner_usage(s, owner)?;
    u.active = u.active.saturating_add_signed(active);
    u.bytes = u.bytes.saturating_add_signed(bytes);
    if created {
        let today = day_of(now);
        u.creates = u.creates_on(today) + 1;
        u.day = today;
    }
    if u == OwnerUsage::default() {
        s.delete(Table::State, keys::usage(owner));
    } else {
        s.put(Table::State, keys::usage(owner), encode(&u));
    }
    Ok(())
}

/// The quota this create would break, if any: the shard's own usage is exact, the rest is as
/// the proposing node saw it.
fn quota_breach(
    s: &impl StateRead,
    c: &Create,
    q: &QuotaCheck,
    bytes: u64,
    now: Millis,
) -> Result<Option<QuotaKind>, StoreError> {
    let today = day_of(now);
    let held = read_owner_usage(s, &c.owner)?.plus(q.elsewhere, today);
    let over = |limit: Option<u64>, held: u64, adding: u64| {
        limit.is_some_and(|l| held.saturating_add(adding) > l)
    };
    Ok(if over(q.max_active, held.active, 1) {
        Some(QuotaKind::Active)
    } else if over(q.max_bytes, held.bytes, bytes) {
        Some(QuotaKind::Bytes)
    } else if over(q.max_creates_per_day, held.creates, 1) {
        Some(QuotaKind::CreatesPerDay)
    } else {
        None
    })
}

fn adjust_stats(s: &mut impl StateStore, active: i64, bytes: i64) -> Result<(), StoreError> {
    let mut st = read_stats(s)?;
    st.active = st.active.saturating_add_signed(active);
    st.active_bytes = st.active_bytes.saturating_add_signed(bytes);
    s.put(Table::State, keys::stats(), encode(&st));
    Ok(())
}

fn put_record(s: &mut impl StateStore, rec: &KubbiRecord) {
    s.put(Table::State, keys::kubbi(&rec.id), rec.to_value());
}

fn set_owner_status(s: &mut impl StateStore, rec: &KubbiRecord) {
    let mut v = Vec::with_capacity(9);
    v.push(rec.status.to_byte());
    v.extend_from_slice(&rec.expires_at.to_be_bytes());
    s.put(
        Table::State,
        keys::owner(&rec.owner, rec.created_at, &rec.id),
        v,
    );
}

fn part_keys(rec: &KubbiRecord) -> impl Iterator<Item = Vec<u8>> + '_ {
    let manifest = rec.has_manifest.then_some(MANIFEST_PART);
    (0..rec.parts)
        .chain(manifest)
        .map(|p| keys::blob(&rec.id, p))
}

fn create(s: &mut impl StateStore, c: &Create, now: Millis) -> Result<Outcome, StoreError> {
    let shard = c.id.shard();
    if let Some(rec) = read_kubbi(s, &c.id)? {
        // This very create, applied before (a retried proposal: the same random id and token
        // hash): answered from the record, which is its dedup record (see `apply`).
        if rec.token_hash == c.token_hash && rec.owner == c.owner {
            return Ok(Outcome::Duplicate(Box::new(Outcome::Created(
                rec.without_tail(),
            ))));
        }
        return Ok(Outcome::Rejected(Rejection::Collision));
    }
    if let Some(idem) = &c.idempotency {
        let key = keys::create_idem(shard, &idem.key);
        if let Some(prev) = get_decoded::<CreateIdemRecord>(s, "create idempotency", &key)?
            && now < prev.until
        {
            return Ok(if prev.body_hash == idem.body_hash {
                Outcome::CreateReplayed {
                    record: prev.record,
                    sealed_token: prev.sealed_token,
                }
            } else {
                Outcome::Rejected(Rejection::IdempotencyConflict)
            });
        }
    }
    // An id named by its token (layout 3) has no token index entry: the id's own check above
    // found any kubbi of the same token. A random id (a create proposed before layout 3, applied
    // again from the log) keeps its index entry.
    let named = c.id.is_named_by(&c.token_hash);
    if !named
        && s.get(Table::State, &keys::token(shard, &c.token_hash))?
            .is_some()
    {
        return Ok(Outcome::Rejected(Rejection::Collision));
    }
    let stored_bytes = c.parts.iter().map(|p| p.0.len() as u64).sum::<u64>()
        + c.manifest.as_ref().map_or(0, |m| m.0.len() as u64);
    if let Some(q) = &c.quota
        && let Some(kind) = quota_breach(s, c, q, stored_bytes, now)?
    {
        return Ok(Outcome::Rejected(Rejection::Quota(kind)));
    }

    let rec = KubbiRecord {
        id: c.id,
        owner: c.owner,
        token_hash: c.token_hash,
        status: Status::Active,
        created_at: now,
        expires_at: now.saturating_add(c.ttl_ms),
        ended_at: None,
        max_retrievals: c.max_retrievals,
        retrieval_count: 0,
        first_retrieved_at: None,
        last_retrieved_at: None,
        body: c.body.clone(),
        metadata: c.metadata.clone(),
        parts: c.parts.len() as u32,
        has_manifest: c.manifest.is_some(),
        retention_ms: c.retention_ms,
        stored_bytes,
        claim_marks: c
            .max_retrievals
            .is_some_and(|m| m <= MARKED_CLAIMS_MAX)
            .then(Vec::new),
    };
    put_record(s, &rec);
    adjust_stats(s, 1, rec.stored_bytes as i64)?;
    adjust_usage(s, &rec.owner, 1, rec.stored_bytes as i64, true, now)?;
    if !named {
        s.put(
            Table::State,
            keys::token(shard, &c.token_hash),
            c.id.0.to_vec(),
        );
    }
    set_owner_status(s, &rec);
    for (i, part) in c.parts.iter().enumerate() {
        s.put(Table::Blob, keys::blob(&c.id, i as u32), part.0.clone());
    }
    if let Some(m) = &c.manifest {
        s.put(Table::Blob, keys::blob(&c.id, MANIFEST_PART), m.0.clone());
    }
    s.put(
        Table::State,
        keys::timer(rec.expires_at, &Timer::Expire(rec.id)),
        Vec::new(),
    );

    if let Some(idem) = &c.idempotency {
        let until = now.saturating_add(idem.window_ms);
        let first = CreateIdemRecord {
            body_hash: idem.body_hash,
            record: rec.clone(),
            sealed_token: idem.sealed_token.clone(),
            until,
        };
        s.put(
            Table::State,
            keys::create_idem(shard, &idem.key),
            encode(&first),
        );
        s.put(
            Table::State,
            keys::timer(until, &Timer::DropCreateIdem(shard, idem.key)),
            Vec::new(),
        );
    }
    Ok(Outcome::Created(rec.without_tail()))
}

/// Moves an active record to a terminal status: ciphertext removed in this same batch, the
/// expiry timer replaced by a purge timer.
fn end(
    s: &mut impl StateStore,
    rec: &mut KubbiRecord,
    status: Status,
    now: Millis,
) -> Result<(), StoreError> {
    debug_assert!(status.is_terminal());
    adjust_stats(s, -1, -(rec.stored_bytes as i64))?;
    adjust_usage(s, &rec.owner, -1, -(rec.stored_bytes as i64), false, now)?;
    for k in part_keys(rec).collect::<Vec<_>>() {
        s.delete(Table::Blob, k);
    }
    s.delete(
        Table::State,
        keys::timer(rec.expires_at, &Timer::Expire(rec.id)),
    );
    rec.status = status;
    rec.ended_at = Some(now);
    // Never before the create's dedup window is over: the record is the create's dedup
    // record (see `apply`), so a retry of the create must still find it.
    // Nor before the last claim's: a record with claim marks is that claim's dedup record.
    let purge_at = now
        .saturating_add(rec.retention_ms)
        .max(rec.created_at.saturating_add(REQUEST_DEDUP_WINDOW_MS))
        .max(
            rec.last_retrieved_at
                .unwrap_or(0)
                .saturating_add(REQUEST_DEDUP_WINDOW_MS),
        );
    s.put(
        Table::State,
        keys::timer(purge_at, &Timer::Purge(rec.id)),
        Vec::new(),
    );
    put_record(s, rec);
    set_owner_status(s, rec);
    Ok(())
}

/// A claim's request already applied: found in the record's claim marks when it keeps them,
/// else in the request-dedup table.
fn duplicate_claim(
    s: &impl StateRead,
    shard: Shard,
    request_id: &crate::ids::RequestId,
    rec: Option<&KubbiRecord>,
) -> Result<Option<Outcome>, StoreError> {
    match rec {
        Some(rec) if rec.claim_marks.is_some() => Ok(rec
            .claim_marks
            .iter()
            .flatten()
            .any(|m| m.request_id == *request_id)
            .then(|| {
                // Counted before; its bytes went with the answer that was lost.
                Outcome::Duplicate(Box::new(Outcome::Claimed(Box::new(Claimed {
                    record: rec.clone().without_tail(),
                    parts: Vec::new(),
                    manifest: None,
                    burned: rec.status == Status::Burned,
                    replayed: false,
                }))))
            })),
        _ => remembered(s, shard, request_id),
    }
}

/// Applies a claim. Also says whether the request-dedup table must remember it: not when the
/// kubbi keeps claim marks (a counted claim is marked in the record it rewrites anyway, and a
/// refused one changed nothing, so its retry may as well be decided again).
fn claim(
    s: &mut impl StateStore,
    shard: Shard,
    token_hash: &TokenHash,
    idem: Option<&super::ClaimIdempotency>,
    request_id: &crate::ids::RequestId,
    now: Millis,
    answer: Answer,
) -> Result<(Outcome, bool), StoreError> {
    let found = read_kubbi_by_token(s, shard, token_hash)?;
    let in_table = found.as_ref().is_none_or(|r| r.claim_marks.is_none());
    if let Some(duplicate) = duplicate_claim(s, shard, request_id, found.as_ref())? {
        return Ok((duplicate, false));
    }
    if let Some(idem) = idem
        && let Some(prev) =
            get_decoded::<Dedup>(s, "claim idempotency", &keys::claim_idem(shard, &idem.key))?
        && let Outcome::Claimed(mut c) = prev.outcome
    {
        c.replayed = true;
        return Ok((Outcome::Claimed(c), in_table));
    }

    let Some(mut rec) = found else {
        return Ok((Outcome::Rejected(Rejection::NotFound), in_table));
    };
    if rec.status.is_terminal() {
        return Ok((Outcome::Rejected(Rejection::Ended(rec.status)), in_table));
    }
    if now >= rec.expires_at {
        end(s, &mut rec, Status::Expired, now)?;
        return Ok((
            Outcome::Rejected(Rejection::Ended(Status::Expired)),
            in_table,
        ));
    }
    // The payload is read where someone receives it: the proposer's client, or an idempotent
    // retry through any replica that leads later (the kept answer holds it).
    let (parts, manifest) = if answer == Answer::Full || idem.is_some() {
        read_payload(s, &rec)?
    } else {
        (Vec::new(), None)
    };

    rec.retrieval_count = rec.retrieval_count.saturating_add(1);
    rec.first_retrieved_at.get_or_insert(now);
    rec.last_retrieved_at = Some(now);
    if let Some(marks) = &mut rec.claim_marks {
        marks.retain(|m| m.at.saturating_add(REQUEST_DEDUP_WINDOW_MS) > now);
        marks.push(ClaimMark {
            request_id: *request_id,
            at: now,
        });
    }
    let burned = rec.max_retrievals.is_some_and(|m| rec.retrieval_count >= m);
    if burned {
        end(s, &mut rec, Status::Burned, now)?;
    } else {
        put_record(s, &rec);
    }
    // The outcome carries no marks.
    let rec = rec.without_tail();

    let claimed = Outcome::Claimed(Box::new(Claimed {
        record: rec,
        parts,
        manifest,
        burned,
        replayed: false,
    }));
    if let Some(idem) = idem {
        let until = now.saturating_add(idem.window_ms);
        let remembered = Dedup {
            outcome: claimed.clone(),
        };
        s.put(
            Table::State,
            keys::claim_idem(shard, &idem.key),
            encode(&remembered),
        );
        s.put(
            Table::State,
            keys::timer(until, &Timer::DropClaimIdem(shard, idem.key)),
            Vec::new(),
        );
    }
    Ok((claimed, in_table))
}

/// The sealed parts and manifest of an active kubbi.
fn read_payload(
    s: &impl StateRead,
    rec: &KubbiRecord,
) -> Result<(Vec<Blob>, Option<Blob>), StoreError> {
    let mut parts = Vec::with_capacity(rec.parts as usize);
    for p in 0..rec.parts {
        let key = keys::blob(&rec.id, p);
        let blob = s
            .get(Table::Blob, &key)?
            .ok_or_else(|| corrupt(&key, "payload part missing from an active kubbi"))?;
        parts.push(Blob(blob));
    }
    let manifest = if rec.has_manifest {
        let key = keys::blob(&rec.id, MANIFEST_PART);
        Some(Blob(s.get(Table::Blob, &key)?.ok_or_else(|| {
            corrupt(&key, "manifest missing from an active package")
        })?))
    } else {
        None
    };
    Ok((parts, manifest))
}

fn delete(
    s: &mut impl StateStore,
    id: &KubbiId,
    owner: &ApiKeyId,
    now: Millis,
) -> Result<Outcome, StoreError> {
    let Some(mut rec) = read_kubbi(s, id)? else {
        return Ok(Outcome::Rejected(Rejection::NotFound));
    };
    if rec.owner != *owner {
        return Ok(Outcome::Rejected(Rejection::NotFound));
    }
    if rec.status.is_terminal() {
        return Ok(Outcome::Rejected(Rejection::Ended(rec.status)));
    }
    if now >= rec.expires_at {
        end(s, &mut rec, Status::Expired, now)?;
        return Ok(Outcome::Rejected(Rejection::Ended(Status::Expired)));
    }
    end(s, &mut rec, Status::Deleted, now)?;
    Ok(Outcome::Deleted(rec))
}

fn expire(s: &mut impl StateStore, id: &KubbiId, now: Millis) -> Result<Outcome, StoreError> {
    match read_kubbi(s, id)? {
        Some(mut rec) if rec.status == Status::Active && now >= rec.expires_at => {
            end(s, &mut rec, Status::Expired, now)?;
            Ok(Outcome::Expired)
        }
        _ => Ok(Outcome::None),
    }
}

fn purge(s: &mut impl StateStore, id: &KubbiId, now: Millis) -> Result<(), StoreError> {
    let Some(rec) = read_kubbi(s, id)? else {
        return Ok(());
    };
    // The owner's usage record goes too once it holds nothing and counts no create of today.
    let u = read_owner_usage(s, &rec.owner)?;
    if u.active == 0 && u.bytes == 0 && u.creates_on(day_of(now)) == 0 {
        s.delete(Table::State, keys::usage(&rec.owner));
    }
    for k in part_keys(&rec).collect::<Vec<_>>() {
        s.delete(Table::Blob, k);
    }
    if !rec.id.is_named_by(&rec.token_hash) {
        s.delete(Table::State, keys::token(id.shard(), &rec.token_hash));
    }
    s.delete(
        Table::State,
        keys::owner(&rec.owner, rec.created_at, &rec.id),
    );
    s.delete(
        Table::State,
        keys::timer(rec.expires_at, &Timer::Expire(rec.id)),
    );
    s.delete(Table::State, keys::kubbi(id));
    Ok(())
}

/// How many timers of fenced shards a sweep or [`next_timer_due`] looks past (their keys stay
/// until the release, which is moments after the fence; past that the sweep waits for it).
const FENCED_TIMER_LOOKAHEAD: usize = 4096;

/// The group's ownership, and how many extra timer keys to scan past fenced ones.
fn timer_ownership(s: &impl StateRead) -> Result<(Option<Ownership>, usize), StoreError> {
    let own = s.ownership()?;
    let lookahead = if own.as_ref().is_some_and(Ownership::holds_fenced_keys) {
        FENCED_TIMER_LOOKAHEAD
    } else {
        0
    };
    Ok((own, lookahead))
}

fn serves_timer(own: Option<&Ownership>, t: &Timer) -> bool {
    Ownership::serves(own, t.shard()) == Served::Here
}

fn sweep(s: &mut impl StateStore, now: Millis, max: u32) -> Result<Outcome, StoreError> {
    let (own, lookahead) = timer_ownership(s)?;
    let due = s.scan(
        Table::State,
        &keys::timers_start(),
        &keys::timers_due_end(now),
        (max as usize).saturating_add(lookahead),
    )?;
    let mut processed = 0;
    let mut expired = 0;
    for (key, _) in due {
        if processed == max {
            break;
        }
        let (_, timer) = keys::parse_timer(&key).ok_or_else(|| corrupt(&key, "bad timer key"))?;
        // A fenced shard's timers are frozen with the rest of its keys.
        if !serves_timer(own.as_ref(), &timer) {
            continue;
        }
        processed += 1;
        s.delete(Table::State, key);
        match timer {
            Timer::Expire(id) => {
                if expire(s, &id, now)? == Outcome::Expired {
                    expired += 1;
                }
            }
            Timer::Purge(id) => purge(s, &id, now)?,
            Timer::DropRequest(shard, r) => s.delete(Table::State, keys::request(shard, &r)),
            Timer::DropClaimIdem(shard, k) => s.delete(Table::State, keys::claim_idem(shard, &k)),
            Timer::DropCreateIdem(shard, k) => {
                s.delete(Table::State, keys::create_idem(shard, &k));
            }
        }
    }
    Ok(Outcome::Swept {
        processed,
        expired,
        more: processed == max && max > 0,
    })
}

fn revoke_api_key(
    s: &mut impl StateStore,
    id: &ApiKeyId,
    now: Millis,
) -> Result<Outcome, StoreError> {
    let key = keys::api_key(id);
    let Some(mut rec) = get_decoded::<ApiKeyRecord>(s, "api key", &key)? else {
        return Ok(Outcome::Rejected(Rejection::NotFound));
    };
    if rec.revoked_at.is_none() {
        rec.revoked_at = Some(now);
        s.put(Table::State, key, encode(&rec));
    }
    Ok(Outcome::ApiKeyRevoked(rec))
}

fn put_node(s: &mut impl StateStore, rec: &NodeRecord, now: Millis) -> Result<Outcome, StoreError> {
    let key = keys::node(rec.id);
    let prev = get_decoded::<NodeRecord>(s, "node", &key)?;
    let mut rec = rec.clone();
    if let Some(prev) = prev {
        let live = prev.state != NodeState::Removed;
        if live
            && prev.incarnation != 0
            && rec.incarnation != 0
            && prev.incarnation != rec.incarnation
        {
            return Ok(Outcome::Rejected(Rejection::IdentityMismatch));
        }
        if live {
            // A registration fills in what bootstrap did not know; it never revives a
            // leaving member.
            if rec.incarnation == 0 {
                rec.incarnation = prev.incarnation;
            }
            if rec.http.is_empty() {
                rec.http = prev.http;
            }
            rec.state = prev.state;
        }
    }
    rec.updated_at = now;
    s.put(Table::State, key, encode(&rec));
    Ok(Outcome::NodeStored(rec))
}

fn set_node_state(
    s: &mut impl StateStore,
    id: u64,
    state: NodeState,
    now: Millis,
) -> Result<Outcome, StoreError> {
    let key = keys::node(id);
    let Some(mut rec) = get_decoded::<NodeRecord>(s, "node", &key)? else {
        return Ok(Outcome::Rejected(Rejection::NotFound));
    };
    if rec.state == NodeState::Active
        && state != NodeState::Active
        && !read_nodes(s)?
            .iter()
            .any(|n| n.id != id && n.state == NodeState::Active)
    {
        return Ok(Outcome::Rejected(Rejection::LastActiveNode));
    }
    rec.state = state;
    rec.updated_at = now;
    s.put(Table::State, key, encode(&rec));
    Ok(Outcome::NodeStored(rec))
}

/// Every cluster member recorded in the system group, by id.
///
/// # Errors
/// On I/O failure or a record that does not decode.
pub fn read_nodes(s: &impl StateRead) -> Result<Vec<NodeRecord>, StoreError> {
    let prefix = [keys::NODE];
    let rows = s.scan(
        Table::State,
        &prefix,
        &keys::prefix_end(&prefix),
        usize::MAX,
    )?;
    rows.iter()
        .map(|(k, v)| decode("node", v).map_err(|e| corrupt(k, e)))
        .collect()
}

/// The earliest due timer of a shard, if any (for the sweeper's sleep).
///
/// # Errors
/// On I/O failure or a corrupt timer key.
pub fn next_timer_due(s: &impl StateRead) -> Result<Option<Millis>, StoreError> {
    let (own, lookahead) = timer_ownership(s)?;
    let first = s.scan(
        Table::State,
        &keys::timers_start(),
        &keys::prefix_end(&[keys::TIMER]),
        1 + lookahead,
    )?;
    for (k, _) in &first {
        let (due, timer) = keys::parse_timer(k).ok_or_else(|| corrupt(k, "bad timer key"))?;
        if serves_timer(own.as_ref(), &timer) {
            return Ok(Some(due));
        }
    }
    Ok(None)
}

fn adopt(s: &mut impl StateStore, ranges: &[ShardRange]) -> Result<Outcome, StoreError> {
    if let Some(own) = s.ownership()? {
        // A repeat of the adoption, or too late for one: either way nothing changes.
        let repeat = Ownership::adopting(ranges).is_some_and(|a| a.owned == own.owned);
        return Ok(if repeat && own.moved.is_empty() {
            Outcome::Ownership(own)
        } else {
            Outcome::Rejected(Rejection::BadRanges)
        });
    }
    let Some(own) = Ownership::adopting(ranges) else {
        return Ok(Outcome::Rejected(Rejection::BadRanges));
    };
    s.put(Table::State, keys::ownership(), encode(&own));
    Ok(Outcome::Ownership(own))
}

fn split(
    s: &mut impl StateStore,
    ranges: &[ShardRange],
    target: crate::ids::GroupId,
    map_version: u64,
    voters: &[super::Replica],
    now: Millis,
) -> Result<Outcome, StoreError> {
    // Only a group that the shard map adopted can be split, and only to some voters.
    if voters.is_empty() {
        return Ok(Outcome::Rejected(Rejection::BadRanges));
    }
    let Some(own) = s.ownership()? else {
        return Ok(Outcome::Rejected(Rejection::BadRanges));
    };
    if let Some(m) = own.moved.iter().find(|m| m.group == target) {
        // The same fence again (a retried proposal) is answered alike; another one is refused.
        let same = Ownership::adopting(ranges).is_some_and(|r| r.owned == m.ranges);
        return Ok(if same {
            Outcome::Ownership(own)
        } else {
            Outcome::Rejected(Rejection::BadRanges)
        });
    }
    let Some(next) = own.fenced(ranges, target, map_version, voters, now) else {
        return Ok(Outcome::Rejected(Rejection::BadRanges));
    };
    s.put(Table::State, keys::ownership(), encode(&next));
    Ok(Outcome::Ownership(next))
}

/// What the kubbi records of some shard ranges add to their group's aggregates: live kubbis
/// and their bytes, per group and per owner, and creates made on one day. A group's `s` and
/// `u` are these totals over all its shards.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Kubbi records counted, ended ones included.
    pub records: u64,
    pub stats: ShardStats,
    /// Per owner; `day` is the day whose creates `creates` counts.
    pub usage: std::collections::BTreeMap<ApiKeyId, OwnerUsage>,
}

impl Totals {
    /// Adds one kubbi record; creates count when made on `today`.
    pub fn count(&mut self, rec: &KubbiRecord, today: u64) {
        self.records += 1;
        let u = self.usage.entry(rec.owner).or_default();
        u.day = today;
        if !rec.status.is_terminal() {
            self.stats.active += 1;
            self.stats.active_bytes += rec.stored_bytes;
            u.active += 1;
            u.bytes += rec.stored_bytes;
        }
        if day_of(rec.created_at) == today {
            u.creates += 1;
        }
    }

    /// The totals of the records of `ranges` in `s`.
    ///
    /// # Errors
    /// On I/O failure or a record that does not decode.
    pub fn of(s: &impl StateRead, ranges: &[ShardRange], today: u64) -> Result<Self, StoreError> {
        let mut t = Self::default();
        for &(lo, hi) in ranges {
            let (from, to) = keys::shard_range(keys::KUBBI, lo, hi);
            s.for_each(Table::State, &from, &to, |k, v| {
                let rec = KubbiRecord::from_value(&v).map_err(|e| corrupt(&k, e))?;
                t.count(&rec, today);
                Ok::<_, StoreError>(())
            })?;
        }
        Ok(t)
    }
}

/// Drops every key of the shards fenced for `target` and takes their live kubbis out of the
/// group's aggregates (creates of the day stay counted: a quota errs on refusing).
fn release(
    s: &mut impl StateStore,
    target: crate::ids::GroupId,
    now: Millis,
) -> Result<Outcome, StoreError> {
    let Some(mut own) = s.ownership()? else {
        return Ok(Outcome::Rejected(Rejection::BadRanges));
    };
    let Some(i) = own.moved.iter().position(|m| m.group == target) else {
        return Ok(Outcome::Rejected(Rejection::BadRanges));
    };
    if own.moved[i].released {
        return Ok(Outcome::Ownership(own));
    }
    let ranges = own.moved[i].ranges.clone();
    // The live kubbis leave the aggregates.
    let totals = Totals::of(s, &ranges, day_of(now))?;
    adjust_stats(
        s,
        -(totals.stats.active as i64),
        -(totals.stats.active_bytes as i64),
    )?;
    for (owner, u) in &totals.usage {
        adjust_usage(s, owner, -(u.active as i64), -(u.bytes as i64), false, now)?;
    }
    for &(lo, hi) in &ranges {
        for table in [
            keys::KUBBI,
            keys::TOKEN,
            keys::REQUEST,
            keys::CLAIM_IDEM,
            keys::CREATE_IDEM,
        ] {
            let (from, to) = keys::shard_range(table, lo, hi);
            s.delete_where(Table::State, &from, &to, |_| true)?;
        }
        let (from, to) = keys::blob_shard_range(lo, hi);
        s.delete_where(Table::Blob, &from, &to, |_| true)?;
    }
    // The owner index and the timers are ordered by owner and by time: filtered scans.
    let fenced =
        |k: &[u8]| keys::shard_of_key(Table::State, k).is_some_and(|sh| in_ranges(&ranges, sh));
    for table in [keys::OWNER, keys::TIMER] {
        s.delete_where(Table::State, &[table], &[table + 1], fenced)?;
    }
    own.moved[i].released = true;
    s.put(Table::State, keys::ownership(), encode(&own));
    Ok(Outcome::Ownership(own))
}

#[cfg(test)]
pub(crate) mod mem {
    //! An in-memory [`StateStore`] for tests of the pure core.
    use std::collections::BTreeMap;

    use super::{Rows, StateRead, StateStore, StoreError, Table};

    #[derive(Default, Clone, PartialEq, Eq, Debug)]
    pub struct MemStore {
        pub data: BTreeMap<(Table, Vec<u8>), Vec<u8>>,
        /// The group id `StateRead::group` reports (0 unless a test sets it).
        pub group: u16,
    }

    impl MemStore {
        pub fn count(&self, table: Table) -> usize {
            self.data.keys().filter(|(t, _)| *t == table).count()
        }
    }

    impl StateRead for MemStore {
        fn group(&self) -> u16 {
            self.group
        }
        fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(self.data.get(&(table, key.to_vec())).cloned())
        }
        fn scan(
            &self,
            table: Table,
            from: &[u8],
            to: &[u8],
            limit: usize,
        ) -> Result<Rows, StoreError> {
            Ok(self
                .data
                .range((table, from.to_vec())..(table, to.to_vec()))
                .take(limit)
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect())
        }
    }

    impl StateStore for MemStore {
        fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) {
            self.data.insert((table, key), value);
        }
        fn delete(&mut self, table: Table, key: Vec<u8>) {
            self.data.remove(&(table, key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mem::MemStore;
    use super::*;
    use crate::ids::{RequestId, SHARD_SPACE};
    use crate::state::{Body, ClaimIdempotency, CreateIdempotency};

    const T0: Millis = 1_800_000_000_000;
    const RETENTION: Millis = 7 * 86_400_000;

    fn req(now: Millis, cmd: Command) -> Request {
        Request {
            request_id: RequestId::random(),
            now,
            cmd,
        }
    }

    fn new_create(max: Option<u32>, ttl_ms: Millis, parts: usize) -> Create {
        let token_hash = TokenHash(rand_bytes());
        Create {
            id: KubbiId::for_token(0, &token_hash),
            owner: ApiKeyId([1; 16]),
            token_hash,
            ttl_ms,
            max_retrievals: max,
            body: Body::Single {
                content_type: "text/plain".into(),
            },
            metadata: None,
            parts: (0..parts).map(|i| Blob(vec![i as u8; 100])).collect(),
            manifest: (parts > 1).then(|| Blob(vec![0xee; 50])),
            retention_ms: RETENTION,
            idempotency: None,
            quota: None,
        }
    }

    fn rand_bytes() -> [u8; 32] {
        let mut b = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
        b
    }

    fn create_one(s: &mut MemStore, c: &Create) -> KubbiRecord {
        match apply(s, &req(T0, Command::Create(Box::new(c.clone())))).expect("applies") {
            Outcome::Created(r) => r,
            o => panic!("unexpected {o:?}"),
        }
    }

    fn claim_at(s: &mut MemStore, t: &TokenHash, now: Millis) -> Outcome {
        apply(
            s,
            &req(
                now,
                Command::ClaimIn {
                    shard: 0,
                    token_hash: *t,
                    idempotency: None,
                },
            ),
        )
        .expect("applies")
    }

    #[test]
    fn burn_after_read_wipes_ciphertext_in_the_same_apply() {
        let mut s = MemStore::default();
        let c = new_create(Some(1), 300_000, 1);
        let rec = create_one(&mut s, &c);
        assert_eq!(rec.expires_at, T0 + 300_000);
        assert_eq!(s.count(Table::Blob), 1);
        assert_eq!(
            read_stats(&s).expect("stats"),
            ShardStats {
                active: 1,
                active_bytes: 100
            }
        );

        let Outcome::Claimed(got) = claim_at(&mut s, &c.token_hash, T0 + 5) else {
            panic!("claim failed")
        };
        assert!(got.burned);
        assert_eq!(got.parts, c.parts);
        assert_eq!(got.record.status, Status::Burned);
        assert_eq!(got.record.retrieval_count, 1);
        assert_eq!(s.count(Table::Blob), 0, "ciphertext gone with the burn");

        assert_eq!(
            claim_at(&mut s, &c.token_hash, T0 + 6),
            Outcome::Rejected(Rejection::Ended(Status::Burned))
        );
    }

    /// State keys of one table (first byte), for counting what an operation wrote.
    fn state_keys(s: &MemStore, table: u8) -> usize {
        s.data
            .keys()
            .filter(|(t, k)| *t == Table::State && k.first() == Some(&table))
            .count()
    }

    #[test]
    fn a_create_writes_four_keys_of_its_own_and_the_token_finds_the_record() {
        let mut s = MemStore::default();
        let c = new_create(Some(1), 300_000, 1);
        create_one(&mut s, &c);
        // Record, owner index, expiry timer and the sealed part; no token index (the token
        // names the id). The rest are the group's totals and time, one each whatever the count.
        assert_eq!(state_keys(&s, keys::KUBBI), 1);
        assert_eq!(state_keys(&s, keys::OWNER), 1);
        assert_eq!(state_keys(&s, keys::TIMER), 1);
        assert_eq!(state_keys(&s, keys::TOKEN), 0);
        assert_eq!(s.count(Table::Blob), 1);
        assert!(s.count(Table::State) - 3 <= 3, "{:?}", s.data.keys());
        let rec = read_kubbi(&s, &c.id).expect("reads").expect("present");
        assert_eq!(
            read_kubbi_by_token(&s, 0, &c.token_hash).expect("reads"),
            Some(rec),
            "one read by token"
        );
        assert_eq!(
            read_kubbi_by_token(&s, 0, &TokenHash(rand_bytes())).expect("reads"),
            None
        );
    }

    /// A kubbi created before key layout 3: a random id, a token index entry and a stored
    /// record without a tail (its claims are remembered in the request-dedup table). It is
    /// claimed, ended and purged as before, and nothing of it is left.
    #[test]
    fn a_kubbi_of_layout_two_is_found_claimed_and_purged() {
        let mut s = MemStore::default();
        let mut c = new_create(Some(2), 300_000, 2);
        c.id = KubbiId::new_in_shard(0);
        create_one(&mut s, &c);
        assert_eq!(
            state_keys(&s, keys::TOKEN),
            1,
            "a random id keeps its token index"
        );
        // Rewrite the record as layout 2 stored it.
        let rec = read_kubbi(&s, &c.id).expect("reads").expect("present");
        s.put(Table::State, keys::kubbi(&c.id), encode(&rec));
        assert_eq!(
            read_kubbi(&s, &c.id)
                .expect("reads")
                .expect("present")
                .claim_marks,
            None
        );
        assert_eq!(s.count(Table::Blob), 3);

        let got = |o: Outcome| match o {
            Outcome::Claimed(c) => *c,
            o => panic!("claim failed: {o:?}"),
        };
        let first = got(claim_at(&mut s, &c.token_hash, T0 + 1));
        assert_eq!(
            (first.parts, first.manifest),
            (c.parts.clone(), c.manifest.clone())
        );
        assert_eq!(state_keys(&s, keys::REQUEST), 1, "remembered in the table");
        let second = got(claim_at(&mut s, &c.token_hash, T0 + 2));
        assert!(second.burned);
        assert_eq!(s.count(Table::Blob), 0);

        apply(
            &mut s,
            &req(T0 + 3 * RETENTION, Command::Sweep { max: 100 }),
        )
        .expect("applies");
        apply(
            &mut s,
            &req(T0 + 3 * RETENTION, Command::Sweep { max: 100 }),
        )
        .expect("applies");
        for table in [
            keys::KUBBI,
            keys::TOKEN,
            keys::OWNER,
            keys::TIMER,
            keys::REQUEST,
        ] {
            assert_eq!(state_keys(&s, table), 0, "{:?}", s.data.keys());
        }
    }

    #[test]
    fn a_stored_record_value_round_trips_and_a_bad_tail_is_refused() {
        let c = new_create(Some(1), 1_000, 1);
        let mut s = MemStore::default();
        let mut rec = create_one(&mut s, &c);
        assert_eq!(rec.claim_marks, None, "an outcome carries no tail");
        for marks in [
            None,
            Some(vec![]),
            Some(vec![ClaimMark {
                request_id: RequestId::random(),
                at: T0,
            }]),
        ] {
            rec.claim_marks = marks;
            assert_eq!(
                KubbiRecord::from_value(&rec.to_value()).expect("decodes"),
                rec
            );
            // The serde form (in dedup entries and messages) does not carry it.
            assert_eq!(
                decode::<KubbiRecord>("record", &encode(&rec)).expect("decodes"),
                rec.clone().without_tail()
            );
        }
        // Layout 2 stored the serde form alone.
        let plain = encode(&rec);
        assert_eq!(
            KubbiRecord::from_value(&plain).expect("decodes"),
            rec.clone().without_tail()
        );
        for bad in [vec![9], vec![3], vec![3, 7], vec![3, 0, 0]] {
            let mut v = plain.clone();
            v.extend_from_slice(&bad);
            assert!(KubbiRecord::from_value(&v).is_err(), "tail {bad:?}");
        }
    }

    /// A claim of a kubbi of few retrievals is remembered in its record: its retry is not
    /// counted again and no request-dedup key is written; one of unlimited retrievals still
    /// uses the request-dedup table.
    #[test]
    fn a_retried_claim_is_found_in_the_record_or_the_dedup_table() {
        let claim_with = |s: &mut MemStore, c: &Create, id: RequestId, now: Millis| {
            apply(
                s,
                &Request {
                    request_id: id,
                    now,
                    cmd: Command::ClaimIn {
                        shard: c.id.shard(),
                        token_hash: c.token_hash,
                        idempotency: None,
                    },
                },
            )
            .expect("applies")
        };
        let counted_once = |o: &Outcome| matches!(o, Outcome::Duplicate(d) if matches!(&**d, Outcome::Claimed(c) if c.parts.is_empty()));
        for max in [
            Some(2),
            Some(MARKED_CLAIMS_MAX),
            Some(MARKED_CLAIMS_MAX + 1),
            None,
        ] {
            let mut s = MemStore::default();
            let c = new_create(max, 3_600_000, 1);
            create_one(&mut s, &c);
            let marked = max.is_some_and(|m| m <= MARKED_CLAIMS_MAX);
            let first = RequestId::random();
            assert!(matches!(
                claim_with(&mut s, &c, first, T0 + 1),
                Outcome::Claimed(_)
            ));
            assert_eq!(
                state_keys(&s, keys::REQUEST),
                usize::from(!marked),
                "max {max:?}"
            );
            let again = claim_with(&mut s, &c, first, T0 + 2);
            assert!(counted_once(&again), "max {max:?}: {again:?}");
            let rec = read_kubbi(&s, &c.id).expect("reads").expect("present");
            assert_eq!(rec.retrieval_count, 1, "max {max:?}: counted once");
            assert_eq!(rec.claim_marks.as_ref().map(Vec::len), marked.then_some(1));
        }

        // The burning claim's retry, answered where the leader answers an ended kubbi.
        let mut s = MemStore::default();
        let c = new_create(Some(1), 3_600_000, 1);
        create_one(&mut s, &c);
        let first = RequestId::random();
        assert!(matches!(
            claim_with(&mut s, &c, first, T0 + 1),
            Outcome::Claimed(_)
        ));
        let rec = read_kubbi(&s, &c.id).expect("reads").expect("present");
        assert_eq!(rec.status, Status::Burned);
        assert!(counted_once(
            &claim_of_ended(&s, 0, &first, Some(&rec), rec.status).expect("reads")
        ));
        assert!(counted_once(&claim_with(&mut s, &c, first, T0 + 2)));
        assert_eq!(
            claim_of_ended(&s, 0, &RequestId::random(), Some(&rec), rec.status).expect("reads"),
            Outcome::Rejected(Rejection::Ended(Status::Burned))
        );
        assert_eq!(state_keys(&s, keys::REQUEST), 0);
        // The record outlives the claim's dedup window even with a short retention.
        let mut c = new_create(Some(1), 3_600_000, 1);
        c.retention_ms = 1_000;
        create_one(&mut s, &c);
        let late = T0 + 2 * REQUEST_DEDUP_WINDOW_MS;
        assert!(matches!(
            claim_with(&mut s, &c, first, late),
            Outcome::Claimed(_)
        ));
        apply(&mut s, &req(late + 60_000, Command::Sweep { max: 100 })).expect("applies");
        assert!(counted_once(&claim_with(&mut s, &c, first, late + 60_001)));
    }

    #[test]
    fn multi_read_counts_then_burns() {
        let mut s = MemStore::default();
        let c = new_create(Some(3), 3_600_000, 1);
        create_one(&mut s, &c);
        for n in 1..=3u32 {
            let Outcome::Claimed(got) = claim_at(&mut s, &c.token_hash, T0 + n as u64) else {
                panic!("claim {n} failed")
            };
            assert_eq!(got.record.retrieval_count, n);
            assert_eq!(got.burned, n == 3);
            assert_eq!(got.record.first_retrieved_at, Some(T0 + 1));
            assert_eq!(got.record.last_retrieved_at, Some(T0 + n as u64));
        }
        assert_eq!(
            claim_at(&mut s, &c.token_hash, T0 + 10),
            Outcome::Rejected(Rejection::Ended(Status::Burned))
        );
    }

    #[test]
    fn unlimited_reads_until_expiry_and_claim_at_deadline_is_expired() {
        let mut s = MemStore::default();
        let c = new_create(None, 1_000, 2);
        create_one(&mut s, &c);
        for i in 0..50 {
            assert!(matches!(
                claim_at(&mut s, &c.token_hash, T0 + i),
                Outcome::Claimed(_)
            ));
        }
        // Stamped time at the deadline: expired, and the payload is wiped by this very claim.
        assert_eq!(
            claim_at(&mut s, &c.token_hash, T0 + 1_000),
            Outcome::Rejected(Rejection::Ended(Status::Expired))
        );
        assert_eq!(s.count(Table::Blob), 0);
        let rec = read_kubbi(&s, &c.id).expect("reads").expect("present");
        assert_eq!(rec.status, Status::Expired);
        assert_eq!(rec.retrieval_count, 50);
    }

    #[test]
    fn delete_checks_owner_and_state() {
        let mut s = MemStore::default();
        let c = new_create(Some(2), 600_000, 1);
        create_one(&mut s, &c);
        let stranger = ApiKeyId([2; 16]);
        let del = |s: &mut MemStore, owner, now| {
            apply(s, &req(now, Command::Delete { id: c.id, owner })).expect("applies")
        };
        assert_eq!(
            del(&mut s, stranger, T0 + 1),
            Outcome::Rejected(Rejection::NotFound)
        );
        let Outcome::Deleted(rec) = del(&mut s, c.owner, T0 + 2) else {
            panic!("delete failed")
        };
        assert_eq!(rec.status, Status::Deleted);
        assert_eq!(s.count(Table::Blob), 0);
        assert_eq!(
            del(&mut s, c.owner, T0 + 3),
            Outcome::Rejected(Rejection::Ended(Status::Deleted))
        );
        assert_eq!(
            claim_at(&mut s, &c.token_hash, T0 + 4),
            Outcome::Rejected(Rejection::Ended(Status::Deleted))
        );
    }

    #[test]
    fn sweep_expires_then_purges_after_retention() {
        let mut s = MemStore::default();
        let c = new_create(Some(1), 2_000, 3);
        create_one(&mut s, &c);
        let sweep_at = |s: &mut MemStore, now| {
            apply(s, &req(now, Command::Sweep { max: 100 })).expect("applies")
        };
        // Before the deadline the expiry timer is not due (request-dedup timers are later).
        assert_eq!(
            sweep_at(&mut s, T0 + 1_999),
            Outcome::Swept {
                processed: 0,
                expired: 0,
                more: false
            }
        );
        assert_eq!(read_stats(&s).expect("stats").active, 1);
        assert_eq!(s.count(Table::Blob), 4);
        let out = sweep_at(&mut s, T0 + 2_000);
        assert!(matches!(out, Outcome::Swept { expired: 1, .. }), "{out:?}");
        assert_eq!(read_stats(&s).expect("stats"), ShardStats::default());
        let rec = read_kubbi(&s, &c.id).expect("reads").expect("present");
        assert_eq!(rec.status, Status::Expired);
        assert_eq!(rec.ended_at, Some(T0 + 2_000));
        assert_eq!(s.count(Table::Blob), 0);

        sweep_at(&mut s, T0 + 2_000 + RETENTION);
        assert_eq!(read_kubbi(&s, &c.id).expect("reads"), None);
        assert_eq!(
            claim_at(&mut s, &c.token_hash, T0 + 2_001 + RETENTION),
            Outcome::Rejected(Rejection::NotFound)
        );
        // Everything is gone after the last dedup window too: only the (zeroed) totals and the
        // group's time remain.
        sweep_at(&mut s, T0 + 3 * RETENTION);
        assert_eq!(s.count(Table::State), 2, "{:?}", s.data.keys());
        assert_eq!(read_group_time(&s).expect("reads"), T0 + 3 * RETENTION);
        assert_eq!(read_stats(&s).expect("stats"), ShardStats::default());
    }

    #[test]
    fn sweep_is_bounded() {
        let mut s = MemStore::default();
        for _ in 0..5 {
            create_one(&mut s, &new_create(None, 10, 1));
        }
        let out = apply(&mut s, &req(T0 + 10, Command::Sweep { max: 3 })).expect("applies");
        assert_eq!(
            out,
            Outcome::Swept {
                processed: 3,
                expired: 3,
                more: true
            }
        );
    }

    #[test]
    fn the_group_time_never_goes_back() {
        let mut s = MemStore::default();
        let a = new_create(Some(1), 60_000, 1);
        let b = new_create(Some(5), 600_000, 1);
        create_one(&mut s, &a);
        create_one(&mut s, &b);
        assert_eq!(read_group_time(&s).expect("reads"), T0);
        // A leader whose clock runs 61 s ahead claims b: the group's time is T0 + 61 s.
        assert!(matches!(
            claim_at(&mut s, &b.token_hash, T0 + 61_000),
            Outcome::Claimed(_)
        ));
        assert_eq!(read_group_time(&s).expect("reads"), T0 + 61_000);
        // The next leader's clock is slower (or this one's stepped back): a claim it stamps
        // T0 + 1 s is judged at the group's time, so a is expired, as the fast leader saw it.
        assert_eq!(
            claim_at(&mut s, &a.token_hash, T0 + 1_000),
            Outcome::Rejected(Rejection::Ended(Status::Expired))
        );
        let rec = read_kubbi(&s, &a.id).expect("reads").expect("present");
        assert_eq!(rec.ended_at, Some(T0 + 61_000));
        assert_eq!(
            read_group_time(&s).expect("reads"),
            T0 + 61_000,
            "an earlier stamp leaves the group's time alone"
        );
        // No recorded time is earlier than one recorded before it.
        let Outcome::Claimed(got) = claim_at(&mut s, &b.token_hash, T0 + 2_000) else {
            panic!("claim failed")
        };
        assert_eq!(got.record.first_retrieved_at, Some(T0 + 61_000));
        assert_eq!(got.record.last_retrieved_at, Some(T0 + 61_000));
        let c = create_one(&mut s, &new_create(None, 1_000, 1));
        assert_eq!((c.created_at, c.expires_at), (T0 + 61_000, T0 + 62_000));
        // Real time catches up: stamps lead again.
        assert!(matches!(
            claim_at(&mut s, &b.token_hash, T0 + 70_000),
            Outcome::Claimed(_)
        ));
        assert_eq!(read_group_time(&s).expect("reads"), T0 + 70_000);
    }

    #[test]
    fn expire_before_deadline_is_a_no_op() {
        let mut s = MemStore::default();
        let c = new_create(None, 5_000, 1);
        create_one(&mut s, &c);
        let before = s.clone();
        let out = apply(&mut s, &req(T0 + 4_999, Command::Expire { id: c.id })).expect("applies");
        assert_eq!(out, Outcome::None);
        assert_eq!(s, before);
        let out = apply(&mut s, &req(T0 + 5_000, Command::Expire { id: c.id })).expect("applies");
        assert_eq!(out, Outcome::Expired);
    }

    #[test]
    fn a_retried_create_is_answered_from_its_record_and_writes_nothing() {
        let mut s = MemStore::default();
        let c = new_create(Some(1), 60_000, 1);
        let r = req(T0, Command::Create(Box::new(c.clone())));
        let Outcome::Created(first) = apply(&mut s, &r).expect("applies") else {
            panic!("create failed")
        };
        assert!(
            !s.data.keys().any(|(t, k)| *t == Table::State
                && (k[0] == keys::REQUEST
                    || keys::parse_timer(k)
                        .is_some_and(|(_, t)| matches!(t, Timer::DropRequest(..))))),
            "a create keeps no request-dedup record or timer"
        );
        let before = s.data.clone();
        let mut retry = r.clone();
        retry.now = T0 + 5;
        assert_eq!(
            apply(&mut s, &retry).expect("applies"),
            Outcome::Duplicate(Box::new(Outcome::Created(first)))
        );
        assert_eq!(s.data, before, "a retried create changes nothing");

        // Claimed and burned before the retry arrives: still the same kubbi, not a second one.
        claim_at(&mut s, &c.token_hash, T0 + 6);
        retry.now = T0 + 7;
        let Outcome::Duplicate(inner) = apply(&mut s, &retry).expect("applies") else {
            panic!("the retry was not recognised")
        };
        let Outcome::Created(rec) = *inner else {
            panic!("wrong answer")
        };
        assert_eq!(rec.status, Status::Burned);
        assert_eq!(s.count(Table::Blob), 0, "the burned payload stays wiped");
    }

    #[test]
    fn another_create_with_a_taken_id_is_a_collision() {
        let mut s = MemStore::default();
        let c = new_create(Some(1), 60_000, 1);
        create_one(&mut s, &c);
        let mut other = c.clone();
        other.token_hash = TokenHash(rand_bytes());
        assert_eq!(
            apply(&mut s, &req(T0 + 1, Command::Create(Box::new(other)))).expect("applies"),
            Outcome::Rejected(Rejection::Collision)
        );
        let mut other_owner = c.clone();
        other_owner.owner = ApiKeyId([9; 16]);
        assert_eq!(
            apply(&mut s, &req(T0 + 1, Command::Create(Box::new(other_owner)))).expect("applies"),
            Outcome::Rejected(Rejection::Collision)
        );
    }

    #[test]
    fn a_record_outlives_its_creates_dedup_window_whatever_the_retention() {
        let mut s = MemStore::default();
        let mut c = new_create(Some(1), 60_000, 1);
        c.retention_ms = 1_000;
        let r = req(T0, Command::Create(Box::new(c.clone())));
        apply(&mut s, &r).expect("applies");
        claim_at(&mut s, &c.token_hash, T0 + 10);
        // Past the retention, inside the window: the record stays and a retry finds it.
        apply(&mut s, &req(T0 + 60_000, Command::Sweep { max: 100 })).expect("applies");
        assert!(read_kubbi(&s, &c.id).expect("reads").is_some());
        let mut retry = r.clone();
        retry.now = T0 + 60_001;
        assert!(matches!(
            apply(&mut s, &retry).expect("applies"),
            Outcome::Duplicate(_)
        ));
        // Nor before its claim's window (the claim at T0 + 10 is marked in it); then it goes.
        let sweep = |s: &mut MemStore, at| {
            apply(s, &req(at, Command::Sweep { max: 100 })).expect("applies");
        };
        sweep(&mut s, T0 + REQUEST_DEDUP_WINDOW_MS + 9);
        assert!(read_kubbi(&s, &c.id).expect("reads").is_some());
        sweep(&mut s, T0 + REQUEST_DEDUP_WINDOW_MS + 10);
        assert!(read_kubbi(&s, &c.id).expect("reads").is_none());
    }

    #[test]
    fn retried_request_applies_once() {
        let mut s = MemStore::default();
        let c = new_create(Some(2), 60_000, 1);
        create_one(&mut s, &c);
        let r = req(
            T0 + 1,
            Command::Claim {
                token_hash: c.token_hash,
                idempotency: None,
            },
        );
        let first = apply(&mut s, &r).expect("applies");
        let Outcome::Claimed(first) = first else {
            panic!("claim failed")
        };
        assert_eq!(first.record.retrieval_count, 1);
        let again = apply(&mut s, &r).expect("applies");
        let Outcome::Duplicate(inner) = again else {
            panic!("not deduplicated: {again:?}")
        };
        let Outcome::Claimed(dup) = *inner else {
            panic!("wrong remembered outcome")
        };
        assert_eq!(dup.record.retrieval_count, 1);
        assert!(dup.parts.is_empty(), "request dedup keeps no payload");
        let rec = read_kubbi(&s, &c.id).expect("reads").expect("present");
        assert_eq!(rec.retrieval_count, 1);
    }

    /// A replica that applies a claim nobody waits for reads no payload, and writes exactly
    /// what the proposing leader writes; a claim that keeps its answer for an idempotent retry
    /// reads the payload on every replica, and keeps the same answer everywhere.
    #[test]
    fn an_unanswered_claim_reads_no_payload_and_writes_the_same_state() {
        for (max, parts, keyed) in [
            (Some(1), 1, false),
            (Some(3), 1, false),
            (Some(1), 3, false),
            (None, 2, false),
            (Some(1), 3, true),
            (Some(2), 1, true),
        ] {
            let c = new_create(max, 60_000, parts);
            let mut leader = MemStore::default();
            create_one(&mut leader, &c);
            let mut replica = leader.clone();
            let r = req(
                T0 + 5,
                Command::ClaimIn {
                    shard: c.id.shard(),
                    token_hash: c.token_hash,
                    idempotency: keyed.then_some(ClaimIdempotency {
                        key: [9; 32],
                        window_ms: 60_000,
                    }),
                },
            );
            let what = format!("max {max:?}, {parts} part(s), keyed {keyed}");
            let full = apply_for(&mut leader, &r, Answer::Full).expect("applies");
            let unread = apply_for(&mut replica, &r, Answer::Unread).expect("applies");
            assert_eq!(leader, replica, "{what}: the replicas' state differs");
            let (Outcome::Claimed(full), Outcome::Claimed(unread)) = (full, unread) else {
                panic!("{what}: not claimed");
            };
            assert_eq!(full.parts.len(), parts, "{what}");
            assert_eq!(full.manifest.is_some(), parts > 1, "{what}");
            assert_eq!(full.record, unread.record, "{what}");
            assert_eq!(full.burned, unread.burned, "{what}");
            if keyed {
                assert_eq!(unread.parts, full.parts, "{what}");
                assert_eq!(unread.manifest, full.manifest, "{what}");
            } else {
                assert!(
                    unread.parts.is_empty(),
                    "{what}: read a payload nobody receives"
                );
                assert!(unread.manifest.is_none(), "{what}");
            }
        }
    }

    #[test]
    fn idempotent_claim_replays_result_and_counts_once() {
        let mut s = MemStore::default();
        let c = new_create(Some(1), 60_000, 1);
        create_one(&mut s, &c);
        let idem = ClaimIdempotency {
            key: [7; 32],
            window_ms: 60_000,
        };
        let claim = |s: &mut MemStore, now| {
            apply(
                s,
                &req(
                    now,
                    Command::ClaimIn {
                        shard: c.id.shard(),
                        token_hash: c.token_hash,
                        idempotency: Some(idem),
                    },
                ),
            )
            .expect("applies")
        };
        let Outcome::Claimed(a) = claim(&mut s, T0 + 1) else {
            panic!()
        };
        assert!(a.burned && !a.replayed);
        let Outcome::Claimed(b) = claim(&mut s, T0 + 2) else {
            panic!("retry not replayed")
        };
        assert!(b.replayed);
        assert_eq!(b.parts, c.parts, "the retry gets the payload back");
        // After the window the dedup record is swept, and the kubbi is gone for good.
        apply(&mut s, &req(T0 + 60_001, Command::Sweep { max: 100 })).expect("applies");
        assert_eq!(
            claim(&mut s, T0 + 60_002),
            Outcome::Rejected(Rejection::Ended(Status::Burned))
        );
    }

    #[test]
    fn idempotent_create_replays_or_conflicts() {
        let mut s = MemStore::default();
        let mut c = new_create(Some(1), 60_000, 1);
        c.idempotency = Some(CreateIdempotency {
            key: [5; 32],
            body_hash: [1; 32],
            sealed_token: vec![9; 60],
            window_ms: 86_400_000,
        });
        let first = create_one(&mut s, &c);
        let mut retry = new_create(Some(1), 60_000, 1);
        retry.idempotency = c.idempotency.clone();
        let out = apply(
            &mut s,
            &req(T0 + 10, Command::Create(Box::new(retry.clone()))),
        )
        .expect("applies");
        assert_eq!(
            out,
            Outcome::CreateReplayed {
                record: first,
                sealed_token: vec![9; 60]
            }
        );
        assert_eq!(s.count(Table::Blob), 1, "the retry stored nothing");

        let mut other_body = retry.clone();
        if let Some(i) = other_body.idempotency.as_mut() {
            i.body_hash = [2; 32];
        }
        let out =
            apply(&mut s, &req(T0 + 11, Command::Create(Box::new(other_body)))).expect("applies");
        assert_eq!(out, Outcome::Rejected(Rejection::IdempotencyConflict));
    }

    fn with_quota(mut c: Create, q: QuotaCheck) -> Create {
        c.quota = Some(q);
        c
    }

    fn quota(active: Option<u64>, bytes: Option<u64>, per_day: Option<u64>) -> QuotaCheck {
        QuotaCheck {
            max_active: active,
            max_bytes: bytes,
            max_creates_per_day: per_day,
            elsewhere: OwnerUsage::default(),
        }
    }

    fn try_create(s: &mut MemStore, c: Create, now: Millis) -> Outcome {
        apply(s, &req(now, Command::Create(Box::new(c)))).expect("applies")
    }

    #[test]
    fn owner_usage_follows_creates_and_every_end() {
        let mut s = MemStore::default();
        let owner = ApiKeyId([1; 16]);
        let a = create_one(&mut s, &new_create(Some(1), 60_000, 1));
        let b = create_one(&mut s, &new_create(None, 60_000, 3));
        let c = create_one(&mut s, &new_create(None, 5_000, 1));
        let u = read_owner_usage(&s, &owner).expect("reads");
        assert_eq!(u.active, 3);
        assert_eq!(u.bytes, a.stored_bytes + b.stored_bytes + c.stored_bytes);
        assert_eq!(u.creates_on(day_of(T0)), 3);
        // Burn, delete, expire: each gives back its slot and bytes; creates stay counted.
        claim_at(&mut s, &a.token_hash, T0 + 1);
        apply(&mut s, &req(T0 + 2, Command::Delete { id: b.id, owner })).expect("applies");
        apply(&mut s, &req(T0 + 5_000, Command::Sweep { max: 10 })).expect("applies");
        let u = read_owner_usage(&s, &owner).expect("reads");
        assert_eq!((u.active, u.bytes, u.creates_on(day_of(T0))), (0, 0, 3));
        // The day's counter starts again the next UTC day.
        let next_day = (day_of(T0) + 1) * 86_400_000;
        create_one_at(&mut s, &new_create(None, 60_000, 1), next_day);
        let u = read_owner_usage(&s, &owner).expect("reads");
        assert_eq!((u.active, u.creates_on(day_of(next_day))), (1, 1));
        assert_eq!(u.creates_on(day_of(T0)), 0);
    }

    fn create_one_at(s: &mut MemStore, c: &Create, now: Millis) -> KubbiRecord {
        match try_create(s, c.clone(), now) {
            Outcome::Created(r) => r,
            other => panic!("not created: {other:?}"),
        }
    }

    #[test]
    fn quotas_refuse_at_the_limit_and_count_other_shards() {
        let mut s = MemStore::default();
        // Active: 2 allowed, the third refused, a slot freed by a delete is usable again.
        let q = quota(Some(2), None, None);
        let a = create_one_at(&mut s, &with_quota(new_create(None, 60_000, 1), q), T0);
        create_one_at(&mut s, &with_quota(new_create(None, 60_000, 1), q), T0);
        let third = with_quota(new_create(None, 60_000, 1), q);
        assert_eq!(
            try_create(&mut s, third.clone(), T0 + 1),
            Outcome::Rejected(Rejection::Quota(QuotaKind::Active))
        );
        assert!(
            read_kubbi(&s, &third.id).expect("reads").is_none(),
            "nothing stored"
        );
        let owner = a.owner;
        apply(&mut s, &req(T0 + 2, Command::Delete { id: a.id, owner })).expect("applies");
        create_one_at(&mut s, &third, T0 + 3);

        // What the owner holds elsewhere counts: one held here + one elsewhere = the limit.
        let mut s = MemStore::default();
        let mut q = quota(Some(2), None, None);
        q.elsewhere.active = 1;
        create_one_at(&mut s, &with_quota(new_create(None, 60_000, 1), q), T0);
        assert_eq!(
            try_create(&mut s, with_quota(new_create(None, 60_000, 1), q), T0),
            Outcome::Rejected(Rejection::Quota(QuotaKind::Active))
        );

        // Bytes: exactly at the limit is allowed, one byte over is not.
        let mut s = MemStore::default();
        let one = new_create(None, 60_000, 1);
        let size = one.parts[0].0.len() as u64;
        let q = quota(None, Some(2 * size), None);
        create_one_at(&mut s, &with_quota(one, q), T0);
        create_one_at(&mut s, &with_quota(new_create(None, 60_000, 1), q), T0);
        assert_eq!(
            try_create(&mut s, with_quota(new_create(None, 60_000, 1), q), T0),
            Outcome::Rejected(Rejection::Quota(QuotaKind::Bytes))
        );

        // Creates per day: ended kubbis still count; the next day starts at zero, and creates
        // reported from another day elsewhere do not count.
        let mut s = MemStore::default();
        let mut q = quota(None, None, Some(2));
        q.elsewhere = OwnerUsage {
            day: day_of(T0) - 1,
            creates: 50,
            ..OwnerUsage::default()
        };
        let a = create_one_at(&mut s, &with_quota(new_create(Some(1), 60_000, 1), q), T0);
        claim_at(&mut s, &a.token_hash, T0 + 1);
        create_one_at(&mut s, &with_quota(new_create(None, 60_000, 1), q), T0 + 2);
        assert_eq!(
            try_create(&mut s, with_quota(new_create(None, 60_000, 1), q), T0 + 3),
            Outcome::Rejected(Rejection::Quota(QuotaKind::CreatesPerDay))
        );
        let next_day = (day_of(T0) + 1) * 86_400_000;
        create_one_at(
            &mut s,
            &with_quota(new_create(None, 60_000, 1), q),
            next_day,
        );
    }

    #[test]
    fn api_keys_are_stored_and_revoked() {
        let mut s = MemStore::default();
        let rec = ApiKeyRecord {
            id: ApiKeyId::random(),
            key_hash: [3; 32],
            key_prefix: "kb_abc".into(),
            label: "ci".into(),
            created_at: T0,
            revoked_at: None,
            limits: Default::default(),
        };
        apply(&mut s, &req(T0, Command::PutApiKey(rec.clone()))).expect("applies");
        let Outcome::ApiKeyRevoked(r) =
            apply(&mut s, &req(T0 + 1, Command::RevokeApiKey { id: rec.id })).expect("applies")
        else {
            panic!()
        };
        assert_eq!(r.revoked_at, Some(T0 + 1));
        let out = apply(
            &mut s,
            &req(
                T0 + 2,
                Command::RevokeApiKey {
                    id: ApiKeyId::random(),
                },
            ),
        )
        .expect("applies");
        assert_eq!(out, Outcome::Rejected(Rejection::NotFound));
    }

    #[test]
    fn nodes_register_and_wiped_ones_are_refused_until_removed() {
        let mut s = MemStore::default();
        let node = |inc: u64, http: &str| NodeRecord {
            id: 3,
            http: http.into(),
            internal: "10.0.0.3:7070".into(),
            zone: "eu/a".into(),
            incarnation: inc,
            state: NodeState::Active,
            updated_at: 0,
        };
        // Bootstrap knows the address only; the node fills in the rest.
        apply(&mut s, &req(T0, Command::PutNode(node(0, "")))).expect("applies");
        let Outcome::NodeStored(r) = apply(
            &mut s,
            &req(T0 + 1, Command::PutNode(node(77, "10.0.0.3:8080"))),
        )
        .expect("applies") else {
            panic!()
        };
        assert_eq!((r.incarnation, r.http.as_str()), (77, "10.0.0.3:8080"));
        // Same id, another data directory: refused.
        let out = apply(&mut s, &req(T0 + 2, Command::PutNode(node(99, "x")))).expect("applies");
        assert_eq!(out, Outcome::Rejected(Rejection::IdentityMismatch));
        // The only active node cannot leave.
        let leave = |t| {
            req(
                t,
                Command::SetNodeState {
                    id: 3,
                    state: NodeState::Leaving,
                },
            )
        };
        let out = apply(&mut s, &leave(T0 + 2)).expect("applies");
        assert_eq!(out, Outcome::Rejected(Rejection::LastActiveNode));
        let other = NodeRecord {
            id: 4,
            ..node(5, "10.0.0.4:8080")
        };
        apply(&mut s, &req(T0 + 2, Command::PutNode(other))).expect("applies");
        apply(
            &mut s,
            &req(
                T0 + 3,
                Command::SetNodeState {
                    id: 3,
                    state: NodeState::Leaving,
                },
            ),
        )
        .expect("applies");
        // Re-registering does not revive a leaving node.
        let Outcome::NodeStored(r) = apply(
            &mut s,
            &req(T0 + 4, Command::PutNode(node(77, "10.0.0.3:8080"))),
        )
        .expect("applies") else {
            panic!()
        };
        assert_eq!(r.state, NodeState::Leaving);
        apply(
            &mut s,
            &req(
                T0 + 5,
                Command::SetNodeState {
                    id: 3,
                    state: NodeState::Removed,
                },
            ),
        )
        .expect("applies");
        let Outcome::NodeStored(r) =
            apply(&mut s, &req(T0 + 6, Command::PutNode(node(99, "x")))).expect("applies")
        else {
            panic!("a removed id may join again")
        };
        assert_eq!((r.incarnation, r.state), (99, NodeState::Active));
        assert_eq!(
            read_nodes(&s).expect("reads").len(),
            2,
            "node 3 again, and node 4"
        );
    }

    #[test]
    fn next_timer_is_the_earliest() {
        let mut s = MemStore::default();
        assert_eq!(next_timer_due(&s).expect("reads"), None);
        create_one(&mut s, &new_create(None, 9_000, 1));
        create_one(&mut s, &new_create(None, 4_000, 1));
        assert_eq!(next_timer_due(&s).expect("reads"), Some(T0 + 4_000));
    }

    /// A claim of layout 1 carried no shard: it applies in its group's own shard, which is what
    /// group and shard were in that layout.
    #[test]
    fn a_legacy_claim_applies_in_its_groups_shard() {
        let mut s = MemStore {
            group: 9,
            ..MemStore::default()
        };
        let mut c = new_create(Some(1), 60_000, 1);
        c.id = KubbiId::for_token(9, &c.token_hash);
        create_one(&mut s, &c);
        let legacy = req(
            T0 + 1,
            Command::Claim {
                token_hash: c.token_hash,
                idempotency: None,
            },
        );
        let Outcome::Claimed(first) = apply(&mut s, &legacy).expect("applies") else {
            panic!("a legacy claim of shard 9 in group 9 claims")
        };
        assert!(first.burned);
        // Its dedup record is in shard 9 too, where a retry of it looks.
        assert!(matches!(
            apply(&mut s, &legacy).expect("applies"),
            Outcome::Duplicate(_)
        ));
        // The same token in another shard is another kubbi: not found there.
        let elsewhere = req(
            T0 + 2,
            Command::ClaimIn {
                shard: 10,
                token_hash: c.token_hash,
                idempotency: None,
            },
        );
        assert_eq!(
            apply(&mut s, &elsewhere).expect("applies"),
            Outcome::Rejected(Rejection::NotFound)
        );
    }

    /// Layout 2's promise: every key a kubbi command writes names the command's shard, so the
    /// state of one shard can be told apart from the rest by key alone. Random histories over
    /// two shards in one store, projected onto each shard, equal the history of that shard
    /// applied alone; and nothing but the group-wide aggregates lacks a shard.
    const SHARDS: [Shard; 2] = [3, 0xa001];

    /// A random history of creates (some idempotent), claims (some keyed), deletes, expiries,
    /// sweeps and retried requests over the kubbis of both [`SHARDS`].
    fn random_history(seed: u64) -> Vec<Request> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut history: Vec<Request> = Vec::new();
        let mut made: Vec<Create> = Vec::new();
        let mut now = T0;
        for _ in 0..60 {
            now += rng.random_range(0..40_000);
            let shard = SHARDS[rng.random_range(0..2)];
            let cmd = match rng.random_range(0..10) {
                0..=2 => {
                    let mut c = new_create(
                        [None, Some(1), Some(2)][rng.random_range(0..3)],
                        rng.random_range(1_000..120_000),
                        rng.random_range(1..3),
                    );
                    c.id = KubbiId::for_token(shard, &c.token_hash);
                    if rng.random_bool(0.4) {
                        c.idempotency = Some(CreateIdempotency {
                            key: [rng.random_range(0..4); 32],
                            body_hash: [1; 32],
                            sealed_token: vec![2; 40],
                            window_ms: 30_000,
                        });
                    }
                    made.push(c.clone());
                    Command::Create(Box::new(c))
                }
                3..=5 if !made.is_empty() => {
                    let c = &made[rng.random_range(0..made.len())];
                    Command::ClaimIn {
                        shard: c.id.shard(),
                        token_hash: c.token_hash,
                        idempotency: rng.random_bool(0.4).then(|| ClaimIdempotency {
                            key: [rng.random_range(0..4); 32],
                            window_ms: 20_000,
                        }),
                    }
                }
                6 if !made.is_empty() => {
                    let c = &made[rng.random_range(0..made.len())];
                    Command::Delete {
                        id: c.id,
                        owner: c.owner,
                    }
                }
                7 if !made.is_empty() => Command::Expire {
                    id: made[rng.random_range(0..made.len())].id,
                },
                _ => Command::Sweep { max: 10_000 },
            };
            let mut r = req(now, cmd);
            // Retries: the same request id again.
            if rng.random_bool(0.15)
                && let Some(prev) = history.last()
                && prev.cmd.shard().is_some()
            {
                r.request_id = prev.request_id;
                r.cmd = prev.cmd.clone();
            }
            history.push(r);
        }
        history
    }

    fn project(m: &MemStore, shard: Shard) -> MemStore {
        MemStore {
            data: m
                .data
                .iter()
                .filter(|((t, k), _)| keys::shard_of_key(*t, k) == Some(shard))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            group: 0,
        }
    }

    #[test]
    fn every_key_is_attributable_and_a_shard_projects_out_exactly() {
        for seed in 0..40u64 {
            let history = random_history(seed);
            // Apply the history to one store holding both shards and, in lockstep, to one
            // store per shard holding only that shard's commands (and every sweep); after
            // every step each shard's keys must be the same in both.
            let mut all = MemStore::default();
            let mut alone = [MemStore::default(), MemStore::default()];
            for (step, r) in history.iter().enumerate() {
                apply(&mut all, r).expect("applies");
                for (i, shard) in SHARDS.into_iter().enumerate() {
                    if r.cmd.shard().is_none_or(|s| s == shard) {
                        apply(&mut alone[i], r).expect("applies");
                    }
                    assert_eq!(
                        project(&all, shard),
                        project(&alone[i], shard),
                        "seed {seed}, step {step} ({r}), shard {shard}"
                    );
                    let other = alone[i]
                        .data
                        .keys()
                        .filter_map(|(t, k)| keys::shard_of_key(*t, k))
                        .find(|s| *s != shard);
                    assert_eq!(
                        other, None,
                        "seed {seed}, step {step}: shard {shard} alone wrote another's keys"
                    );
                }
                for (table, key) in all.data.keys() {
                    let group_wide = *table == Table::State
                        && matches!(
                            key.first(),
                            Some(&keys::STATS | &keys::USAGE | &keys::OWNERSHIP | &keys::CLOCK)
                        );
                    assert!(
                        group_wide || keys::shard_of_key(*table, key).is_some(),
                        "seed {seed}: key {key:02x?} names no shard"
                    );
                }
            }
        }
    }

    fn adopt_at(s: &mut MemStore, ranges: &[ShardRange], now: Millis) -> Outcome {
        let cmd = Command::Adopt {
            ranges: ranges.to_vec(),
            map_version: 1,
        };
        apply(s, &req(now, cmd)).expect("applies")
    }

    fn split_at(s: &mut MemStore, ranges: &[ShardRange], target: u16) -> Outcome {
        let cmd = Command::Split {
            ranges: ranges.to_vec(),
            target,
            map_version: 2,
            voters: vec![crate::state::Replica {
                id: 1,
                ..Default::default()
            }],
        };
        apply(s, &req(T0, cmd)).expect("applies")
    }

    fn create_in(s: &mut MemStore, shard: Shard, max: Option<u32>, ttl_ms: Millis) -> Create {
        let mut c = new_create(max, ttl_ms, 1);
        c.id = KubbiId::for_token(shard, &c.token_hash);
        create_one(s, &c);
        c
    }

    fn claim_in(c: &Create) -> Command {
        Command::ClaimIn {
            shard: c.id.shard(),
            token_hash: c.token_hash,
            idempotency: None,
        }
    }

    #[test]
    fn shard_ranges_are_owned_fenced_and_served_as_stated() {
        let own = Ownership::adopting(&[(100, 200), (0, 50), (50, 60)]).expect("valid");
        assert_eq!(own.owned, vec![(0, 60), (100, 200)]);
        assert_eq!(Ownership::adopting(&[(5, 5)]), None, "empty");
        assert_eq!(
            Ownership::adopting(&[(0, SHARD_SPACE + 1)]),
            None,
            "past the space"
        );
        let fenced = own
            .fenced(&[(150, 200), (0, 10)], 9, 4, &[], 0)
            .expect("owned");
        assert_eq!(fenced.owned, vec![(10, 60), (100, 150)]);
        assert_eq!(own.fenced(&[(55, 70)], 9, 4, &[], 0), None, "not all owned");
        assert_eq!(own.fenced(&[], 9, 4, &[], 0), None, "nothing");
        let at = |shard| Ownership::serves(Some(&fenced), shard);
        assert_eq!(at(10), Served::Here);
        assert_eq!(at(149), Served::Here);
        assert_eq!(
            at(150),
            Served::Moved {
                group: 9,
                map_version: 4
            }
        );
        assert_eq!(
            at(9),
            Served::Moved {
                group: 9,
                map_version: 4
            }
        );
        assert_eq!(at(60), Served::NotOwned);
        assert_eq!(Ownership::serves(None, 60), Served::Here, "no record: all");
        let whole = Ownership::adopting(&[(0, SHARD_SPACE)]).expect("valid");
        assert_eq!(Ownership::serves(Some(&whole), u16::MAX), Served::Here);
    }

    #[test]
    fn a_group_serves_only_what_it_owns_and_refuses_the_rest_without_writing() {
        let mut s = MemStore::default();
        // No ownership record: every shard, as in the fixed-shard layout.
        create_in(&mut s, 500, Some(1), 60_000);
        let Outcome::Ownership(own) = adopt_at(&mut s, &[(0, 100)], T0) else {
            panic!("adopted")
        };
        // The same adoption again changes nothing; another one is refused.
        assert_eq!(adopt_at(&mut s, &[(0, 100)], T0), Outcome::Ownership(own));
        assert_eq!(
            adopt_at(&mut s, &[(0, 200)], T0),
            Outcome::Rejected(Rejection::BadRanges)
        );
        let before = s.clone();
        let mut c = new_create(Some(1), 60_000, 1);
        c.id = KubbiId::for_token(500, &c.token_hash);
        for cmd in [
            Command::Create(Box::new(c.clone())),
            claim_in(&c),
            Command::Delete {
                id: c.id,
                owner: c.owner,
            },
        ] {
            assert_eq!(
                apply(&mut s, &req(T0 + 1, cmd)).expect("applies"),
                Outcome::Rejected(Rejection::NotOwned)
            );
        }
        assert_eq!(
            s, before,
            "a refused command writes nothing, not even its dedup record"
        );
        create_in(&mut s, 99, Some(1), 60_000);
    }

    #[test]
    fn after_a_fence_every_command_of_the_moved_shards_is_redirected_and_writes_nothing() {
        let mut s = MemStore::default();
        adopt_at(&mut s, &[(0, SHARD_SPACE)], T0);
        let kept = create_in(&mut s, 10, Some(2), 60_000);
        let moved = create_in(&mut s, 40_000, Some(2), 60_000);
        // A claim applied before the fence, whose reply the router will have lost.
        let first = req(T0 + 1, claim_in(&moved));
        assert!(matches!(
            apply(&mut s, &first).expect("applies"),
            Outcome::Claimed(_)
        ));
        let Outcome::Ownership(own) = split_at(&mut s, &[(32_768, SHARD_SPACE)], 7) else {
            panic!("fenced")
        };
        assert_eq!(own.owned, vec![(0, 32_768)]);
        let redirected = Outcome::Moved {
            group: 7,
            map_version: 2,
        };
        let before = s.clone();
        let mut fresh = new_create(None, 60_000, 1);
        fresh.id = KubbiId::for_token(50_000, &fresh.token_hash);
        for r in [
            req(T0 + 2, Command::Create(Box::new(fresh))),
            req(T0 + 2, claim_in(&moved)),
            req(
                T0 + 2,
                Command::Delete {
                    id: moved.id,
                    owner: moved.owner,
                },
            ),
            req(T0 + 2, Command::Expire { id: moved.id }),
            // Its retry goes to the new group too, which holds its dedup record by then:
            // answered here, it would be a second count there.
            Request {
                now: T0 + 2,
                ..first.clone()
            },
        ] {
            assert_eq!(apply(&mut s, &r).expect("applies"), redirected, "{r}");
        }
        assert_eq!(s, before, "nothing written for a fenced shard");
        // The shards kept are served as before.
        assert!(matches!(
            apply(&mut s, &req(T0 + 3, claim_in(&kept))).expect("applies"),
            Outcome::Claimed(_)
        ));
        // The same fence again is answered alike; another fence for that group, or of shards
        // not owned, is refused.
        assert_eq!(
            split_at(&mut s, &[(32_768, SHARD_SPACE)], 7),
            Outcome::Ownership(own)
        );
        for (ranges, target) in [
            (vec![(1_000, 2_000)], 7),
            (vec![(40_000, 41_000)], 8),
            (vec![(0, 0)], 8),
        ] {
            assert_eq!(
                split_at(&mut s, &ranges, target),
                Outcome::Rejected(Rejection::BadRanges)
            );
        }
        // A group the map never adopted cannot be split.
        let mut legacy = MemStore::default();
        assert_eq!(
            split_at(&mut legacy, &[(0, 10)], 7),
            Outcome::Rejected(Rejection::BadRanges)
        );
    }

    #[test]
    fn the_sweep_neither_touches_nor_spins_on_fenced_timers() {
        let mut s = MemStore::default();
        adopt_at(&mut s, &[(0, SHARD_SPACE)], T0);
        let moved = create_in(&mut s, 40_000, Some(1), 500);
        let kept = create_in(&mut s, 10, Some(1), 1_000);
        split_at(&mut s, &[(32_768, SHARD_SPACE)], 7);
        // The fenced kubbi's expiry is the earliest timer; it is not the group's to run.
        assert_eq!(
            next_timer_due(&s).expect("reads"),
            Some(T0 + 1_000),
            "the next timer is the kept kubbi's"
        );
        let swept = apply(&mut s, &req(T0 + 2_000, Command::Sweep { max: 1 })).expect("applies");
        assert_eq!(
            swept,
            Outcome::Swept {
                processed: 1,
                expired: 1,
                more: true
            }
        );
        assert_eq!(
            read_kubbi(&s, &kept.id)
                .expect("reads")
                .expect("kept")
                .status,
            Status::Expired
        );
        let m = read_kubbi(&s, &moved.id).expect("reads").expect("moved");
        assert_eq!(m.status, Status::Active, "frozen for the new group");
        assert!(s.data.contains_key(&(
            Table::State,
            keys::timer(m.expires_at, &Timer::Expire(moved.id))
        )));
        // Only fenced timers left due: the sweep says it is done instead of spinning.
        let again = apply(&mut s, &req(T0 + 2_000, Command::Sweep { max: 1 })).expect("applies");
        assert_eq!(
            again,
            Outcome::Swept {
                processed: 0,
                expired: 0,
                more: false
            }
        );
    }

    #[test]
    fn a_release_leaves_exactly_the_other_shards_keys_and_true_aggregates() {
        for seed in 0..20u64 {
            let history = random_history(seed);
            let mut all = MemStore::default();
            let mut kept = MemStore::default();
            adopt_at(&mut all, &[(0, SHARD_SPACE)], T0);
            adopt_at(&mut kept, &[(0, SHARD_SPACE)], T0);
            for r in &history {
                apply(&mut all, r).expect("applies");
                if r.cmd.shard().is_none_or(|s| s == SHARDS[0]) {
                    apply(&mut kept, r).expect("applies");
                }
            }
            let last = history.last().map_or(T0, |r| r.now);
            split_at(&mut all, &[(0x8000, SHARD_SPACE)], 9);
            let release = req(last, Command::Release { target: 9 });
            let Outcome::Ownership(own) = apply(&mut all, &release).expect("applies") else {
                panic!("released")
            };
            assert!(own.moved[0].released);
            assert_eq!(
                project(&all, SHARDS[0]),
                project(&kept, SHARDS[0]),
                "seed {seed}"
            );
            let left: Vec<_> = all
                .data
                .keys()
                .filter(|(t, k)| keys::shard_of_key(*t, k) == Some(SHARDS[1]))
                .collect();
            assert!(left.is_empty(), "seed {seed}: {left:02x?}");
            assert_eq!(
                read_stats(&all).expect("stats"),
                read_stats(&kept).expect("stats")
            );
            let owner = ApiKeyId([1; 16]);
            let (a, k) = (
                read_owner_usage(&all, &owner).expect("usage"),
                read_owner_usage(&kept, &owner).expect("usage"),
            );
            assert_eq!((a.active, a.bytes), (k.active, k.bytes), "seed {seed}");
            // A repeat changes nothing; the released shards are still redirected.
            let before = all.clone();
            assert_eq!(
                apply(&mut all, &release).expect("applies"),
                Outcome::Ownership(own)
            );
            assert_eq!(all, before);
            let mut c = new_create(None, 1_000, 1);
            c.id = KubbiId::for_token(SHARDS[1], &c.token_hash);
            assert!(matches!(
                apply(&mut all, &req(last, Command::Create(Box::new(c)))).expect("applies"),
                Outcome::Moved { group: 9, .. }
            ));
        }
    }

    #[test]
    fn the_shard_map_changes_only_by_compare_and_set_and_only_to_valid_maps() {
        use crate::state::map::ShardMap;
        let mut s = MemStore::default();
        let put = |s: &mut MemStore, expect_version, map: &ShardMap| {
            let cmd = Command::PutMap {
                expect_version,
                map: Box::new(map.clone()),
            };
            apply(s, &req(T0, cmd)).expect("applies")
        };
        let three = ShardMap::first(3, |g| vec![u64::from(g) + 1]);
        let Outcome::MapStored(v1) = put(&mut s, 0, &three) else {
            panic!("the first map is stored")
        };
        assert_eq!(v1.version, 1);
        assert_eq!(
            put(&mut s, 0, &three),
            Outcome::Rejected(Rejection::StaleMap),
            "a second first map"
        );
        let mut bad = (*v1).clone();
        bad.ranges.pop();
        assert_eq!(put(&mut s, 1, &bad), Outcome::Rejected(Rejection::BadMap));
        let mut next = (*v1).clone();
        next.version = 77;
        if let Some(g) = next.groups.get_mut(&0) {
            g.replicas = vec![1, 2, 3];
        }
        let Outcome::MapStored(v2) = put(&mut s, 1, &next) else {
            panic!("stored")
        };
        assert_eq!(
            v2.version, 2,
            "the version is the store's, not the proposer's"
        );
        assert_eq!(read_map(&s).expect("reads"), Some(*v2));
    }
}
