//! Virtual actors: one [`KubbiActor`] per live kubbi on its shard's leader, created on demand
//! and passivated when idle by its shard's [`ShardActor`].
//!
//! ```text
//!   service ──Route{id, msg}──▶ ShardActor (registry, supervisor; one per shard)
//!                                  │ spawns / finds
//!                                  ▼
//!                               KubbiActor ──propose──▶ raft group ──apply──▶ outcome ──▶ reply
//!                                  │ one wake timer: min(expiry, idle deadline)
//!                                  └─ idle ─▶ Passivate{id} ─▶ ShardActor stops it
//! ```
//!
//! An actor is an optimisation and a serialisation point, never the authority: the state
//! machine decides every claim, so two actors for one kubbi (a passivation race, a leader
//! change) cost extra proposals but can never let an extra claim succeed. What an actor knows
//! comes from committed outcomes; it rejects claims early only on a terminal status, which is
//! permanent. While no actor is alive, the shard's timer index (swept by the leader) holds the
//! kubbi's deadline, so expiry happens with no traffic and after restarts.
//!
//! Request failures travel back through the reply port; a handler returns `Err` only for a
//! broken invariant.

mod kubbi;
mod shard;

pub use kubbi::{KubbiActor, KubbiArgs, KubbiMsg, KubbiReply};
pub use shard::{ShardActor, ShardMsg};

use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;
use crate::ids::GroupId;
use crate::raft::Raft;
use crate::storage::Storage;

/// What every actor of one shard shares.
pub struct ShardCtx {
    pub group: GroupId,
    pub raft: Raft,
    pub storage: Arc<Storage>,
    pub clock: Arc<dyn Clock>,
    /// An actor with no request for this long is passivated.
    pub idle: Duration,
    /// Kubbi actors started so far (metrics: what waking actors costs is counted by it).
    pub activations: std::sync::atomic::AtomicU64,
}
