//! Proposing commands to a group and confirming leadership for reads.
//!
//! A proposal is stamped with the proposing leader's clock right before it enters raft, and
//! keeps its request id across retries: whatever happened to an earlier attempt (accepted,
//! discarded by a leader change, timed out), the state machine applies the request at most once.

use std::time::Duration;

use openraft::ReadPolicy;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::errors::ForwardReason;

use super::{NodeId, Raft};
use crate::clock::Clock;
use crate::ids::RequestId;
use crate::state::{Command, Outcome, Request};

/// Why a proposal or a read could not be completed here.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RaftClientError {
    /// This node does not lead the group; nothing was appended here.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    /// The command may or may not have been applied (timeout, leader change after append).
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// No quorum could be reached to confirm leadership.
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// The group has stopped (shutdown or a storage failure).
    #[error("raft group stopped: {0}")]
    Stopped(String),
}

/// How long one attempt may take before it is reported indeterminate.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to keep retrying while the group has no leader yet (elections, startup).
const LEADERLESS_PATIENCE: Duration = Duration::from_secs(3);

/// Proposes `cmd` and waits for its applied outcome.
///
/// Retries on this node while the group is between leaders; returns `NotLeader` with the known
/// leader when another node leads (the caller forwards).
///
/// # Errors
/// See [`RaftClientError`].
///
/// # Cancel safety
/// Dropping the future may leave the command applied; a retry with the same `request_id` is
/// answered from the dedup table.
pub async fn propose(
    raft: &Raft,
    clock: &dyn Clock,
    request_id: RequestId,
    cmd: Command,
) -> Result<Outcome, RaftClientError> {
    let span = tracing::debug_span!(
        "raft.propose",
        raft.command = cmd.name(),
        raft.log_index = tracing::field::Empty
    );
    tracing::Instrument::instrument(propose_inner(raft, clock, request_id, cmd), span).await
}

async fn propose_inner(
    raft: &Raft,
    clock: &dyn Clock,
    request_id: RequestId,
    cmd: Command,
) -> Result<Outcome, RaftClientError> {
    let deadline = tokio::time::Instant::now() + LEADERLESS_PATIENCE;
    let mut backoff = Duration::from_millis(10);
    let mut renewed = false;
    loop {
        let req = Request {
            request_id,
            now: clock.now(),
            cmd: cmd.clone(),
        };
        let attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, raft.client_write(req)).await;
        let err = match attempt {
            Err(_) => {
                return Err(RaftClientError::Indeterminate(
                    "no commit within the attempt timeout".into(),
                ));
            }
            Ok(Ok(resp)) => {
                tracing::Span::current().record("raft.log_index", resp.log_id.index);
                return Ok(resp.data);
            }
            Ok(Err(e)) => e,
        };
        let retry = match err {
            RaftError::Fatal(f) => return Err(RaftClientError::Stopped(f.to_string())),
            // This node leads, but no quorum acknowledged it within the lease, and openraft
            // takes writes only within it: the group was quiet (no heartbeats) or this node was
            // paused. One heartbeat round renews it, then the write goes at once.
            RaftError::APIError(ClientWriteError::ForwardToLeader(f))
                if f.reason == ForwardReason::LeaseExpired && !renewed =>
            {
                renewed = true;
                match renew_lease(raft).await {
                    Ok(()) => continue,
                    Err(e) => e,
                }
            }
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => match f.leader_id {
                Some(l) if l != *raft.node_id() => {
                    return Err(RaftClientError::NotLeader { leader: Some(l) });
                }
                // Between leaders, or this node is about to lead: wait and retry.
                _ => RaftClientError::NotLeader { leader: None },
            },
            RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => {
                RaftClientError::Indeterminate(format!("entry discarded on leader change: {f}"))
            }
            RaftError::APIError(e) => return Err(RaftClientError::Indeterminate(e.to_string())),
        };
        if tokio::time::Instant::now() + backoff > deadline {
            return Err(retry);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(200));
    }
}

/// Confirms this node leads the group and waits until its state machine has applied everything
/// committed before the call, so a following read of local state is linearizable.
///
/// A leader whose lease is valid (a quorum acknowledged it within the last maximum election
/// timeout, on its monotonic clock) confirms without a message: no other node can have been
/// elected meanwhile, because every voter that acknowledged it refuses to vote for another
/// candidate until that long after hearing from it (openraft's leader lease; wall-clock skew
/// does not matter, only the rate at which monotonic clocks advance). A leader without a valid
/// lease, or on the first error, falls back to a read-index round with a quorum.
///
/// # Errors
/// `NotLeader`, `NoQuorum` or `Stopped`.
pub async fn linearizable(raft: &Raft) -> Result<(), RaftClientError> {
    // A lease read never waits for a quorum (its wait is zero); it may wait for the local
    // apply to reach what the leader committed, which the attempt timeout bounds.
    confirm(raft, ReadPolicy::LeaseRead).await
}

/// Renews this leader's lease with a read-index round: a heartbeat that a quorum answers. A
/// leader takes writes and membership changes only within its lease, and the leader of a quiet
/// group (`raft::quiet`) sends no heartbeats, so its lease has run out when the next one comes.
///
/// # Errors
/// `NotLeader`, `NoQuorum` or `Stopped`.
pub async fn renew_lease(raft: &Raft) -> Result<(), RaftClientError> {
    confirm(raft, ReadPolicy::ReadIndex).await
}

/// Confirms leadership by `policy`, falling back from a lease read to a read index.
async fn confirm(raft: &Raft, mut policy: ReadPolicy) -> Result<(), RaftClientError> {
    let deadline = tokio::time::Instant::now() + LEADERLESS_PATIENCE;
    let mut backoff = Duration::from_millis(10);
    loop {
        let r =
            tokio::time::timeout(ATTEMPT_TIMEOUT, raft.ensure_linearizable(policy.clone())).await;
        let err = match r {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(RaftError::Fatal(f))) => return Err(RaftClientError::Stopped(f.to_string())),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))))
                if f.leader_id.as_ref().is_some_and(|l| l != raft.node_id()) =>
            {
                return Err(RaftClientError::NotLeader {
                    leader: f.leader_id,
                });
            }
            // No valid lease, or the attempt failed otherwise: a read-index round, at once.
            _ if policy == ReadPolicy::LeaseRead => {
                policy = ReadPolicy::ReadIndex;
                continue;
            }
            Err(_) => return Err(RaftClientError::NoQuorum("read index timed out".into())),
            // Between leaders, or this node is about to lead: wait and retry.
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(_)))) => {
                RaftClientError::NotLeader { leader: None }
            }
            Ok(Err(RaftError::APIError(e))) => RaftClientError::NoQuorum(e.to_string()),
        };
        if tokio::time::Instant::now() + backoff > deadline {
            return Err(err);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(200));
    }
}

/// The current leader of a group as this node knows it.
pub fn known_leader(raft: &Raft) -> Option<NodeId> {
    raft.metrics().borrow_watched().current_leader
}
