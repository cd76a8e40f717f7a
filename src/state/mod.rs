//! The replicated state of a shard and the commands that change it: the pure core.
//!
//! Nothing here is async, reads a clock or touches RocksDB. [`apply`] takes a [`Request`] (a
//! command plus the time its proposing leader stamped on it) and a [`StateStore`], and decides
//! every effect deterministically, so every replica computes byte-identical state. The raft state
//! machine (`raft::state_machine`) only feeds it committed entries and writes the result in one
//! RocksDB `WriteBatch`; the tests here drive it with an in-memory store.
//!
//! ```text
//!   Create ──▶ Active ──claim (count < max)──▶ Active
//!                 │──claim (count = max)──▶ Burned  ─┐
//!                 │──Delete──────────────▶ Deleted ─┼─ ciphertext removed in the same batch;
//!                 └──stamped time ≥ expiry─▶ Expired ─┘  record purged after `retention`
//! ```

mod apply;
pub mod keys;
pub mod map;

pub use apply::{
    Answer, Rows, StateRead, StateStore, StoreError, Table, Totals, apply, apply_for,
    claim_of_ended, next_timer_due, read_group_time, read_kubbi, read_kubbi_by_token, read_map,
    read_nodes, read_owner_usage, read_ownership, read_stats, remembered,
};

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{ApiKeyId, GroupId, KubbiId, Millis, RequestId, SHARD_SPACE, Shard, TokenHash};

/// How long a request id is remembered, so that a retried proposal applies at most once.
/// A protocol constant: every replica must use the same value.
pub const REQUEST_DEDUP_WINDOW_MS: Millis = 10 * 60 * 1000;

/// Lifecycle status of a kubbi.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Active,
    Expired,
    Burned,
    Deleted,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Expired => "expired",
            Self::Burned => "burned",
            Self::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "active" => Self::Active,
            "expired" => Self::Expired,
            "burned" => Self::Burned,
            "deleted" => Self::Deleted,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        self != Self::Active
    }

    fn to_byte(self) -> u8 {
        match self {
            Self::Active => 0,
            Self::Expired => 1,
            Self::Burned => 2,
            Self::Deleted => 3,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Active,
            1 => Self::Expired,
            2 => Self::Burned,
            3 => Self::Deleted,
            _ => return None,
        })
    }
}

/// Bytes sealed under a node key ring key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub key_id: u32,
    #[serde(with = "serde_bytes")]
    pub blob: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealed(key {}, {} bytes)", self.key_id, self.blob.len())
    }
}

/// What a kubbi holds, as far as it can be told without the claim token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    Single {
        content_type: String,
    },
    Package {
        file_count: u32,
        total_size_bytes: u64,
    },
}

/// The stored record of one kubbi. Payload ciphertext lives apart from it (see [`keys`]) so a
/// claim rewrites, and a preview reads, only this small record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubbiRecord {
    pub id: KubbiId,
    pub owner: ApiKeyId,
    pub token_hash: TokenHash,
    pub status: Status,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub ended_at: Option<Millis>,
    pub max_retrievals: Option<u32>,
    pub retrieval_count: u32,
    pub first_retrieved_at: Option<Millis>,
    pub last_retrieved_at: Option<Millis>,
    pub body: Body,
    pub metadata: Option<Sealed>,
    /// Number of sealed payload parts (1 for single content, one per file for a package).
    pub parts: u32,
    /// Whether a sealed manifest part exists (packages).
    pub has_manifest: bool,
    /// How long the record stays visible after it ends.
    pub retention_ms: Millis,
    /// Bytes of sealed payload parts (and manifest) held while active.
    pub stored_bytes: u64,
    /// The claims that counted in the last [`REQUEST_DEDUP_WINDOW_MS`], so that a retried claim
    /// is found here and not counted again (key layout 3, for a kubbi of at most
    /// [`MARKED_CLAIMS_MAX`] retrievals). `None`: its claims are remembered in the
    /// request-dedup table (a record of layout 2, or more or unlimited retrievals). Not in the
    /// serde form: stored after it, in the same value ([`KubbiRecord::to_value`]), so a record
    /// copied into a dedup or idempotency entry or sent to a peer never carries it, and those
    /// encodings are as in layout 2.
    #[serde(skip)]
    pub claim_marks: Option<Vec<ClaimMark>>,
}

/// A kubbi of at most this many retrievals remembers its claims in its own record
/// ([`KubbiRecord::claim_marks`]); one of more (or unlimited) in the request-dedup table. A
/// protocol constant.
pub const MARKED_CLAIMS_MAX: u32 = 16;

/// A claim that counted: its request id and when it was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimMark {
    pub request_id: RequestId,
    pub at: Millis,
}

/// The tag of the tail that key layout 3 stores after a record's encoding; a value without a
/// tail is a record of layout 2.
const RECORD_TAIL_V3: u8 = 3;

impl KubbiRecord {
    /// The stored value: the record's encoding, then its tail (the claim marks).
    pub fn to_value(&self) -> Vec<u8> {
        let mut v = crate::codec::encode(self);
        v.push(RECORD_TAIL_V3);
        v.extend_from_slice(&crate::codec::encode(&self.claim_marks));
        v
    }

    /// Decodes a stored value ([`KubbiRecord::to_value`]; a layout-2 value has no tail: its
    /// claims are in the request-dedup table).
    ///
    /// # Errors
    /// When the value is not a record, or its tail does not decode.
    pub fn from_value(value: &[u8]) -> Result<Self, crate::codec::DecodeError> {
        let (mut rec, used): (Self, usize) = crate::codec::decode_prefix("kubbi record", value)?;
        match value[used..].split_first() {
            None => {}
            Some((&RECORD_TAIL_V3, rest)) => {
                rec.claim_marks = crate::codec::decode("kubbi record tail", rest)?;
            }
            Some(_) => {
                return Err(crate::codec::DecodeError {
                    what: "kubbi record",
                    reason: "unknown tail".into(),
                });
            }
        }
        Ok(rec)
    }

    /// The record without its stored tail, as it is remembered or sent to a peer: what its
    /// serde form holds.
    pub fn without_tail(self) -> Self {
        Self {
            claim_marks: None,
            ..self
        }
    }

    /// The status as a reader at `now` must see it: an active kubbi past its expiry is expired
    /// even before the `Expire` entry is applied.
    pub fn status_at(&self, now: Millis) -> Status {
        if self.is_past_deadline(now) {
            Status::Expired
        } else {
            self.status
        }
    }

    /// Active as stored, yet at or past its deadline at `now`: its expiry is due but not
    /// applied yet.
    pub fn is_past_deadline(&self, now: Millis) -> bool {
        self.status == Status::Active && now >= self.expires_at
    }

    /// Claims left, `None` when unlimited.
    pub fn remaining_reads(&self) -> Option<u32> {
        self.max_retrievals
            .map(|m| m.saturating_sub(self.retrieval_count))
    }
}

/// A stored API key (the key itself is never stored, only its SHA-256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: ApiKeyId,
    pub key_hash: [u8; 32],
    pub key_prefix: String,
    pub label: String,
    pub created_at: Millis,
    pub revoked_at: Option<Millis>,
    /// Per-key limits set when the key was made; `None` fields fall back to the node's defaults.
    pub limits: KeyLimits,
}

/// Limits of one API key. `None` means the operator's default (`kubbi serve --key-*`), which
/// may itself be unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyLimits {
    /// Kubbis not yet ended, over the whole cluster.
    pub max_active: Option<u64>,
    /// Sealed bytes those kubbis hold, over the whole cluster.
    pub max_bytes: Option<u64>,
    /// Creates per UTC day, over the whole cluster.
    pub max_creates_per_day: Option<u64>,
    /// Authenticated requests per second, over the whole cluster.
    pub rate_per_second: Option<u32>,
}

impl KeyLimits {
    /// These limits, with every unset field taken from `defaults`.
    pub fn or(self, defaults: KeyLimits) -> KeyLimits {
        KeyLimits {
            max_active: self.max_active.or(defaults.max_active),
            max_bytes: self.max_bytes.or(defaults.max_bytes),
            max_creates_per_day: self.max_creates_per_day.or(defaults.max_creates_per_day),
            rate_per_second: self.rate_per_second.or(defaults.rate_per_second),
        }
    }
}

/// What one API key holds in one shard (or, summed, in several), kept exact by `apply`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerUsage {
    pub active: u64,
    pub bytes: u64,
    /// The UTC day (days since the epoch, by the stamped time) `creates` counts.
    pub day: u64,
    pub creates: u64,
}

impl OwnerUsage {
    /// Creates made on `day` (0 when the counter belongs to another day).
    pub fn creates_on(&self, day: u64) -> u64 {
        if self.day == day { self.creates } else { 0 }
    }

    /// The sum of two usages; creates count only when both are of `day`.
    pub fn plus(self, other: OwnerUsage, day: u64) -> OwnerUsage {
        OwnerUsage {
            active: self.active.saturating_add(other.active),
            bytes: self.bytes.saturating_add(other.bytes),
            day,
            creates: self.creates_on(day).saturating_add(other.creates_on(day)),
        }
    }
}

/// The UTC day of a time in milliseconds.
pub fn day_of(t: Millis) -> u64 {
    t / 86_400_000
}

/// The quota a create must fit, resolved by the node that took the request: the key's
/// effective limits and what the key holds in every *other* shard as that node last saw it.
/// The shard adds its own exact usage at apply time, so creates racing in one shard can never
/// overshoot; creates racing in different shards can, by what each shard has not yet seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaCheck {
    pub max_active: Option<u64>,
    pub max_bytes: Option<u64>,
    pub max_creates_per_day: Option<u64>,
    pub elsewhere: OwnerUsage,
}

/// Which quota refused a create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QuotaKind {
    Active,
    Bytes,
    CreatesPerDay,
}

/// Where a node stands in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Holds replicas and serves.
    Active,
    /// Being drained: its replicas move away, then it becomes `Removed`.
    Leaving,
    /// Out of the cluster; its id may join again with a new data directory.
    Removed,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Leaving => "leaving",
            Self::Removed => "removed",
        }
    }
}

/// A cluster member, as the system group records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: u64,
    /// Public HTTP address (`host:port`); empty until the node registers itself.
    pub http: String,
    /// Internal node-to-node address (`host:port`).
    pub internal: String,
    /// Locality label, `region/zone`.
    pub zone: String,
    /// Random id of the node's data directory; 0 until the node registers itself. A node whose
    /// data directory was wiped comes back with another one and is refused.
    pub incarnation: u64,
    pub state: NodeState,
    pub updated_at: Millis,
}

/// A create made with an `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateIdempotency {
    /// SHA-256 of (API key id ‖ Idempotency-Key): the dedup key; also chooses the shard.
    pub key: [u8; 32],
    /// SHA-256 of the request body: the same key with another body is a conflict.
    pub body_hash: [u8; 32],
    /// The claim token sealed under `crypto::replay_key` (API key + Idempotency-Key).
    #[serde(with = "serde_bytes")]
    pub sealed_token: Vec<u8>,
    pub window_ms: Millis,
}

/// A claim made with an `Idempotency-Key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimIdempotency {
    /// SHA-256 of (token hash ‖ Idempotency-Key).
    pub key: [u8; 32],
    pub window_ms: Millis,
}

/// A sealed payload part as carried in a command or outcome.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

/// Create a kubbi. Everything secret is already sealed by the node that took the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Create {
    pub id: KubbiId,
    pub owner: ApiKeyId,
    pub token_hash: TokenHash,
    pub ttl_ms: Millis,
    pub max_retrievals: Option<u32>,
    pub body: Body,
    pub metadata: Option<Sealed>,
    /// Sealed parts: the single content, or one per file in creation order.
    pub parts: Vec<Blob>,
    /// Sealed file manifest (packages only).
    pub manifest: Option<Blob>,
    pub retention_ms: Millis,
    pub idempotency: Option<CreateIdempotency>,
    /// The owner's quota, when it has one.
    pub quota: Option<QuotaCheck>,
}

/// Every state change. Only committed raft entries carry these into [`apply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Create(Box<Create>),
    /// A claim of layout 1, which had no shard in its token index; applied as [`Command::ClaimIn`]
    /// of the group's own shard (group = shard in that layout). Never proposed now; kept so
    /// that old log entries decode (variants are only ever appended).
    Claim {
        token_hash: TokenHash,
        idempotency: Option<ClaimIdempotency>,
    },
    Delete {
        id: KubbiId,
        owner: ApiKeyId,
    },
    /// Expire one kubbi if its deadline has passed (its actor's timer).
    Expire {
        id: KubbiId,
    },
    /// Process up to `max` due timers: expiries, purges after retention, dedup windows.
    Sweep {
        max: u32,
    },
    PutApiKey(ApiKeyRecord),
    RevokeApiKey {
        id: ApiKeyId,
    },
    /// Add or update a cluster member (system group). Refused when the id is a live member
    /// with another incarnation.
    PutNode(NodeRecord),
    /// Move a member to another state (system group).
    SetNodeState {
        id: u64,
        state: NodeState,
    },
    /// Claim the kubbi of `token_hash` in logical shard `shard` (the token's routing field).
    ClaimIn {
        shard: Shard,
        token_hash: TokenHash,
        idempotency: Option<ClaimIdempotency>,
    },
    /// A data group's first ownership: the shard ranges the shard map gives it. Applies only
    /// while the group owns nothing yet; repeating it changes nothing.
    Adopt {
        ranges: Vec<ShardRange>,
        map_version: u64,
    },
    /// The fence of a split or move: from this entry on the group serves none of `ranges`
    /// (every command of them is answered [`Outcome::Moved`] to `target`) and leaves their
    /// keys as they are, for `target` to start from, until [`Command::Release`].
    Split {
        ranges: Vec<ShardRange>,
        target: GroupId,
        map_version: u64,
        /// The target's first voters (this group's, when it was fenced): every replica that
        /// seeds the target from its copy starts it with this membership.
        voters: Vec<Replica>,
    },
    /// Drops the keys of the ranges fenced for `target` once `target` serves them; commands of
    /// those shards are still answered `Moved`.
    Release {
        target: GroupId,
    },
    /// Stores the shard map (system group) if the stored one is at `expect_version` (0: none
    /// yet) and `map` is valid; it is stored as version `expect_version + 1`.
    PutMap {
        expect_version: u64,
        map: Box<map::ShardMap>,
    },
}

/// A half-open range `[lo, hi)` of logical shards (`hi` up to [`SHARD_SPACE`]).
pub type ShardRange = (Shard, u32);

/// Whether `shard` lies in one of `ranges`.
pub fn in_ranges(ranges: &[ShardRange], shard: Shard) -> bool {
    ranges
        .iter()
        .any(|&(lo, hi)| lo <= shard && u32::from(shard) < hi)
}

/// Sorted, merged, without empty ranges; `None` when a range ends past the shard space.
fn normalize(ranges: &[ShardRange]) -> Option<Vec<ShardRange>> {
    let mut v: Vec<ShardRange> = ranges
        .iter()
        .copied()
        .filter(|&(lo, hi)| u32::from(lo) < hi)
        .collect();
    if v.iter().any(|&(_, hi)| hi > SHARD_SPACE) {
        return None;
    }
    v.sort_unstable();
    let mut out: Vec<ShardRange> = Vec::with_capacity(v.len());
    for (lo, hi) in v {
        match out.last_mut() {
            Some(last) if u32::from(lo) <= last.1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    Some(out)
}

/// `from` without `cut`, if `cut` lies wholly inside `from`.
fn subtract(from: &[ShardRange], cut: &[ShardRange]) -> Option<Vec<ShardRange>> {
    let from = normalize(from)?;
    let cut = normalize(cut)?;
    let inside = cut
        .iter()
        .all(|&(lo, hi)| from.iter().any(|&(flo, fhi)| flo <= lo && hi <= fhi));
    if !inside {
        return None;
    }
    let mut out = Vec::new();
    for (flo, fhi) in from {
        // Every cut lies inside one range of `from`; these are the ones inside this one.
        let inside = cut.iter().filter(|&&(clo, chi)| flo <= clo && chi <= fhi);
        let mut lo = u32::from(flo);
        for &(clo, chi) in inside {
            if u32::from(clo) > lo {
                out.push((lo as Shard, u32::from(clo)));
            }
            lo = lo.max(chi);
        }
        if lo < fhi {
            out.push((lo as Shard, fhi));
        }
    }
    Some(out)
}

/// A replica of a raft group as a fence names it: a node and where to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub id: u64,
    pub http: String,
    pub internal: String,
    pub zone: String,
}

/// Ranges a group fenced for another group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedRanges {
    pub ranges: Vec<ShardRange>,
    pub group: GroupId,
    pub map_version: u64,
    /// Their keys are gone from this group.
    pub released: bool,
    /// The target's first voters: the replicas of this group that seed it (`raft::seed`).
    pub voters: Vec<Replica>,
    /// The fence's stamped time (the seeded usage counts the creates of its UTC day).
    pub at: Millis,
}

/// Which logical shards a data group serves (state key `w`), replicated like everything else.
/// A group with no ownership record serves every shard routed to it: the fixed-shard layout,
/// where group and shard are the same thing, until the shard map adopts it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    pub owned: Vec<ShardRange>,
    pub moved: Vec<MovedRanges>,
}

/// What a group does with a command of one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Here,
    /// Fenced for `group`: answered [`Outcome::Moved`].
    Moved {
        group: GroupId,
        map_version: u64,
    },
    /// Neither owned nor moved: the router's map is wrong.
    NotOwned,
}

impl Ownership {
    /// How a group with this ownership (`None`: no record) treats a command of `shard`.
    pub fn serves(own: Option<&Ownership>, shard: Shard) -> Served {
        let Some(own) = own else {
            return Served::Here;
        };
        if in_ranges(&own.owned, shard) {
            return Served::Here;
        }
        match own.moved.iter().find(|m| in_ranges(&m.ranges, shard)) {
            Some(m) => Served::Moved {
                group: m.group,
                map_version: m.map_version,
            },
            None => Served::NotOwned,
        }
    }

    /// A first ownership of `ranges`; `None` when they are empty or past the shard space.
    pub fn adopting(ranges: &[ShardRange]) -> Option<Self> {
        let owned = normalize(ranges)?;
        (!owned.is_empty()).then_some(Self {
            owned,
            moved: Vec::new(),
        })
    }

    /// Whether some fenced ranges still have their keys here.
    pub fn holds_fenced_keys(&self) -> bool {
        self.moved.iter().any(|m| !m.released)
    }

    /// This ownership after fencing `ranges` for `target`: `None` when they are not all owned.
    pub fn fenced(
        &self,
        ranges: &[ShardRange],
        target: GroupId,
        map_version: u64,
        voters: &[Replica],
        at: Millis,
    ) -> Option<Self> {
        if normalize(ranges)?.is_empty() {
            return None;
        }
        let owned = subtract(&self.owned, ranges)?;
        let mut moved = self.moved.clone();
        moved.push(MovedRanges {
            ranges: normalize(ranges)?,
            group: target,
            map_version,
            released: false,
            voters: voters.to_vec(),
            at,
        });
        Some(Self { owned, moved })
    }
}

impl Command {
    /// Bytes of sealed payload the command carries (what makes a raft entry big).
    pub fn payload_bytes(&self) -> usize {
        match self {
            Self::Create(c) => {
                c.parts.iter().map(|p| p.0.len()).sum::<usize>()
                    + c.manifest.as_ref().map_or(0, |m| m.0.len())
            }
            _ => 0,
        }
    }

    /// The command's name, for logs and spans.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Create(_) => "create",
            Self::Claim { .. } | Self::ClaimIn { .. } => "claim",
            Self::Adopt { .. } => "adopt",
            Self::Split { .. } => "split",
            Self::Release { .. } => "release",
            Self::PutMap { .. } => "put_map",
            Self::Delete { .. } => "delete",
            Self::Expire { .. } => "expire",
            Self::Sweep { .. } => "sweep",
            Self::PutApiKey(_) => "put_api_key",
            Self::RevokeApiKey { .. } => "revoke_api_key",
            Self::PutNode(_) => "put_node",
            Self::SetNodeState { .. } => "set_node_state",
        }
    }

    /// The logical shard whose state the command changes: the kubbi's for kubbi commands, 0
    /// for the system group's; `None` for a legacy [`Command::Claim`] (its group's own shard)
    /// and for [`Command::Sweep`], which works on every shard the group holds.
    pub fn shard(&self) -> Option<Shard> {
        match self {
            Self::Create(c) => Some(c.id.shard()),
            Self::ClaimIn { shard, .. } => Some(*shard),
            Self::Delete { id, .. } | Self::Expire { id } => Some(id.shard()),
            Self::PutApiKey(_)
            | Self::RevokeApiKey { .. }
            | Self::PutNode(_)
            | Self::SetNodeState { .. }
            | Self::PutMap { .. } => Some(0),
            Self::Claim { .. }
            | Self::Sweep { .. }
            | Self::Adopt { .. }
            | Self::Split { .. }
            | Self::Release { .. } => None,
        }
    }

    /// Whether the command reads or changes one kubbi (and so must go to the group that
    /// serves the kubbi's shard).
    pub fn is_kubbi_command(&self) -> bool {
        matches!(
            self,
            Self::Create(_)
                | Self::Claim { .. }
                | Self::ClaimIn { .. }
                | Self::Delete { .. }
                | Self::Expire { .. }
        )
    }
}

/// A command with the time stamped by the proposing leader and its request id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub request_id: RequestId,
    pub now: Millis,
    pub cmd: Command,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(req {:?})", self.cmd.name(), self.request_id)
    }
}

/// Why a command changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    NotFound,
    /// The kubbi has ended with this status.
    Ended(Status),
    /// The `Idempotency-Key` was used before with another body.
    IdempotencyConflict,
    /// The id or token is already taken (a random collision).
    Collision,
    /// A node id that is still a member with another data directory.
    IdentityMismatch,
    /// The change would leave the cluster without an active node.
    LastActiveNode,
    /// The create would take the owner past a quota.
    Quota(QuotaKind),
    /// The group neither owns nor moved the command's shard (a wrong shard map).
    NotOwned,
    /// Shard ranges that are empty or past the shard space, a fence of shards the group does
    /// not own, a first ownership of a group that has one, or a release of nothing fenced.
    BadRanges,
    /// A shard map change based on another version than the stored one.
    StaleMap,
    /// A shard map that breaks a rule (`map::ShardMap::validate`).
    BadMap,
}

/// The result of a successful claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claimed {
    /// The record after this claim.
    pub record: KubbiRecord,
    pub parts: Vec<Blob>,
    pub manifest: Option<Blob>,
    /// This claim was the last allowed one; the payload is gone.
    pub burned: bool,
    /// Answered from an `Idempotency-Key` record, not counted again.
    pub replayed: bool,
}

/// What [`apply`] decided, returned to the proposer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Created(KubbiRecord),
    /// An idempotent create seen before: the record as first created and the sealed token.
    CreateReplayed {
        record: KubbiRecord,
        #[serde(with = "serde_bytes")]
        sealed_token: Vec<u8>,
    },
    Claimed(Box<Claimed>),
    Deleted(KubbiRecord),
    Expired,
    Swept {
        processed: u32,
        /// Kubbis this sweep expired.
        expired: u32,
        more: bool,
    },
    ApiKeyStored(ApiKeyRecord),
    ApiKeyRevoked(ApiKeyRecord),
    NodeStored(NodeRecord),
    Rejected(Rejection),
    /// This request id was applied before; what it did is given without payload bytes
    /// (`Claimed` arrives with its parts removed). Never wraps another `Duplicate`.
    Duplicate(#[serde(deserialize_with = "first_outcome")] Box<Outcome>),
    /// A blank or membership entry.
    None,
    /// The command's shard was fenced for `group` (as of shard map `map_version`): nothing was
    /// done; send it there. Also the answer to a command of a released shard.
    Moved {
        group: GroupId,
        map_version: u64,
    },
    /// The group's ownership after an [`Command::Adopt`], [`Command::Split`] or
    /// [`Command::Release`] (the same when the command was a repeat).
    Ownership(Ownership),
    /// The shard map as stored by a [`Command::PutMap`].
    MapStored(Box<map::ShardMap>),
}

/// Deserializes what an [`Outcome::Duplicate`] wraps: the outcome of the request's first
/// application, which is never itself a duplicate. Refusing a nested one also bounds the
/// recursion: a few kilobytes of nested duplicates from a peer would otherwise overflow the
/// decoding thread's stack (found by the `internal_messages` fuzz target).
fn first_outcome<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Box<Outcome>, D::Error> {
    thread_local! {
        static INSIDE_DUPLICATE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            INSIDE_DUPLICATE.set(false);
        }
    }
    if INSIDE_DUPLICATE.replace(true) {
        return Err(serde::de::Error::custom(
            "a duplicate outcome inside another duplicate",
        ));
    }
    let _leave = Leave;
    Outcome::deserialize(d).map(Box::new)
}

/// Live totals of a shard, kept exact by `apply`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStats {
    /// Kubbis not yet ended.
    pub active: u64,
    /// Sealed bytes they hold.
    pub active_bytes: u64,
}

/// An entry of a shard's owner index (for listing), decoded from [`keys::owner`] keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerEntry {
    pub created_at: Millis,
    pub id: KubbiId,
    pub status: Status,
    pub expires_at: Millis,
}

impl OwnerEntry {
    /// Decodes an owner-index key and value (the key without the group prefix).
    pub fn decode(key: &[u8], value: &[u8]) -> Option<Self> {
        let (created_at, id) = keys::parse_owner(key)?;
        if value.len() != 9 {
            return None;
        }
        let status = Status::from_byte(value[0])?;
        let expires_at = u64::from_be_bytes(value[1..9].try_into().ok()?);
        Some(Self {
            created_at,
            id,
            status,
            expires_at,
        })
    }

    /// The status as seen at `now` (see [`KubbiRecord::status_at`]).
    pub fn status_at(&self, now: Millis) -> Status {
        if self.status == Status::Active && now >= self.expires_at {
            Status::Expired
        } else {
            self.status
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    #[test]
    fn a_duplicate_outcome_round_trips() {
        let o = Outcome::Duplicate(Box::new(Outcome::Rejected(Rejection::NotFound)));
        assert_eq!(
            decode::<Outcome>("outcome", &encode(&o)).expect("decodes"),
            o
        );
    }

    /// Fuzz regression (`internal_messages`): a peer reply of nested duplicates recursed once
    /// per byte and overflowed the stack.
    #[test]
    fn nested_duplicates_are_refused_without_deep_recursion() {
        let once = encode(&Outcome::Duplicate(Box::new(Outcome::None)));
        let none = encode(&Outcome::None);
        let tag = &once[..once.len() - none.len()];
        let twice = [tag, tag, &none].concat();
        assert!(decode::<Outcome>("outcome", &twice).is_err());
        let mut deep = tag.repeat(200_000);
        deep.extend_from_slice(&none);
        assert!(decode::<Outcome>("outcome", &deep).is_err());
        // A refusal leaves the thread able to decode a legitimate duplicate.
        assert_eq!(
            decode::<Outcome>("outcome", &once).expect("decodes"),
            Outcome::Duplicate(Box::new(Outcome::None))
        );
    }
}
