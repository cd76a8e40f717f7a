//! The actor of one live kubbi: serialises its claims and deletes, owns its wake timer.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorProcessingErr, ActorRef, MessagingErr};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{ShardCtx, ShardMsg};
use crate::ids::{ApiKeyId, KubbiId, Millis, RequestId, TokenHash};
use crate::raft::client::{self, RaftClientError};
use crate::state::{
    ClaimIdempotency, Command, KubbiRecord, Outcome, Rejection, Status, read_kubbi,
};

/// Where an actor sends the outcome of a command.
pub type KubbiReply = oneshot::Sender<Result<Outcome, RaftClientError>>;

/// Messages of a [`KubbiActor`].
pub enum KubbiMsg {
    Claim {
        request_id: RequestId,
        idempotency: Option<ClaimIdempotency>,
        reply: KubbiReply,
        /// The request's span: the proposal continues its trace.
        span: tracing::Span,
    },
    Delete {
        request_id: RequestId,
        owner: ApiKeyId,
        reply: KubbiReply,
        span: tracing::Span,
    },
    /// One of this actor's proposals finished, with what it learned (`None`: it failed).
    Done(Option<Learned>),
    /// The wake timer: expire if due, passivate if idle, otherwise re-arm.
    Wake,
    /// From the shard actor, which has forgotten this actor: hand off queued work and stop.
    Stop,
}

/// What a committed outcome says about the kubbi.
#[derive(Debug, Clone, Copy)]
pub struct Learned {
    status: Option<Status>,
    count: Option<u32>,
}

impl Learned {
    fn from_outcome(o: &Outcome) -> Self {
        match o {
            Outcome::Claimed(c) => Self {
                status: Some(c.record.status),
                count: Some(c.record.retrieval_count),
            },
            Outcome::Deleted(r) => Self {
                status: Some(r.status),
                count: Some(r.retrieval_count),
            },
            Outcome::Rejected(Rejection::Ended(s)) => Self {
                status: Some(*s),
                count: None,
            },
            Outcome::Expired => Self {
                status: Some(Status::Expired),
                count: None,
            },
            Outcome::Duplicate(inner) => Self::from_outcome(inner),
            _ => Self {
                status: None,
                count: None,
            },
        }
    }
}

/// Arguments of a [`KubbiActor`]: the record when the activator already has it (a create).
pub struct KubbiArgs {
    pub id: KubbiId,
    pub ctx: Arc<ShardCtx>,
    pub shard: ActorRef<ShardMsg>,
    pub record: Option<KubbiRecord>,
}

/// What the actor knows from committed state.
#[derive(Debug, Clone, Copy)]
struct Known {
    token_hash: TokenHash,
    status: Status,
    expires_at: Millis,
    count: u32,
    max: Option<u32>,
}

impl Known {
    fn from_record(r: &KubbiRecord) -> Self {
        Self {
            token_hash: r.token_hash,
            status: r.status,
            expires_at: r.expires_at,
            count: r.retrieval_count,
            max: r.max_retrievals,
        }
    }
}

pub struct KubbiState {
    id: KubbiId,
    ctx: Arc<ShardCtx>,
    shard: ActorRef<ShardMsg>,
    known: Option<Known>,
    in_flight: u32,
    waiting: VecDeque<(RequestId, KubbiReply, tracing::Span)>,
    last_activity: Instant,
    expire_proposed: bool,
    passivating: bool,
    /// The pending wake; aborted when re-armed or stopped, so that a stopped actor's cell
    /// (its mailboxes) is freed at once instead of when the timer would have fired.
    timer: Option<JoinHandle<Result<(), MessagingErr<KubbiMsg>>>>,
}

/// The actor of one kubbi. Stateless itself; everything lives in [`KubbiState`].
pub struct KubbiActor;

impl KubbiState {
    fn terminal(&self) -> Option<Status> {
        self.known.map(|k| k.status).filter(|s| s.is_terminal())
    }

    /// Whether another claim may be proposed now without exceeding what can still succeed.
    fn has_capacity(&self) -> bool {
        match self.known {
            Some(Known {
                max: Some(m),
                count,
                ..
            }) => count + self.in_flight < m,
            _ => true,
        }
    }

    fn learn(&mut self, l: Learned) {
        if let Some(k) = self.known.as_mut() {
            if let Some(s) = l.status
                && !k.status.is_terminal()
            {
                k.status = s;
            }
            if let Some(c) = l.count {
                k.count = k.count.max(c);
            }
        }
    }

    fn propose(
        &mut self,
        myself: &ActorRef<KubbiMsg>,
        request_id: RequestId,
        cmd: Command,
        reply: Option<KubbiReply>,
        parent: &tracing::Span,
    ) {
        self.in_flight += 1;
        let ctx = self.ctx.clone();
        let me = myself.clone();
        let span = tracing::debug_span!(parent: parent, "kubbi.actor", kubbi.id = %self.id, kubbi.in_flight = self.in_flight);
        let fut = async move {
            let r = client::propose(&ctx.raft, &*ctx.clock, request_id, cmd).await;
            let learned = r.as_ref().ok().map(Learned::from_outcome);
            if let Some(reply) = reply {
                let _ = reply.send(r);
            }
            // The actor may have stopped meanwhile; then nobody needs to learn this.
            let _ = me.send_message(KubbiMsg::Done(learned));
        };
        tokio::spawn(tracing::Instrument::instrument(fut, span));
    }

    fn propose_claim(
        &mut self,
        myself: &ActorRef<KubbiMsg>,
        k: Known,
        idempotency: Option<ClaimIdempotency>,
        request_id: RequestId,
        reply: KubbiReply,
        span: &tracing::Span,
    ) {
        let cmd = Command::ClaimIn {
            shard: self.id.shard(),
            token_hash: k.token_hash,
            idempotency,
        };
        self.propose(myself, request_id, cmd, Some(reply), span);
    }

    /// A claim of the existing kubbi `k`: proposed now, refused (ended), or queued.
    fn claim(
        &mut self,
        myself: &ActorRef<KubbiMsg>,
        k: Known,
        request_id: RequestId,
        idempotency: Option<ClaimIdempotency>,
        reply: KubbiReply,
        span: tracing::Span,
    ) {
        if idempotency.is_some() {
            // A retry must get its remembered result even after the kubbi ended.
            self.propose_claim(myself, k, idempotency, request_id, reply, &span);
        } else if let Some(s) = self.terminal() {
            let _ = reply.send(Ok(self.refusal(&request_id, s)));
        } else if self.has_capacity() && self.waiting.is_empty() {
            self.propose_claim(myself, k, None, request_id, reply, &span);
        } else {
            self.waiting.push_back((request_id, reply, span));
        }
    }

    /// The answer to a claim of the ended kubbi (`state::claim_of_ended`; the router retrying
    /// after a failover finds the claim counted, and maybe the kubbi burned by it).
    fn refusal(&self, request_id: &RequestId, s: Status) -> Outcome {
        let view = self.ctx.storage.read_view(self.ctx.group);
        // The record says where a counted claim is remembered (its claim marks or the
        // request-dedup table); a purged one is past the dedup window of its last claim.
        let rec = crate::state::read_kubbi(&view, &self.id);
        let answer = rec.and_then(|rec| {
            crate::state::claim_of_ended(&view, self.id.shard(), request_id, rec.as_ref(), s)
        });
        match answer {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "reading a request's dedup record failed");
                Outcome::Rejected(Rejection::Ended(s))
            }
        }
    }

    /// Starts queued claims while there is capacity; rejects them all once the kubbi has ended.
    fn drain(&mut self, myself: &ActorRef<KubbiMsg>) {
        while let Some((request_id, reply, span)) = self.waiting.pop_front() {
            if let Some(s) = self.terminal() {
                let _ = reply.send(Ok(self.refusal(&request_id, s)));
                continue;
            }
            if !self.has_capacity() {
                self.waiting.push_front((request_id, reply, span));
                return;
            }
            let Some(k) = self.known else {
                let _ = reply.send(Ok(Outcome::Rejected(Rejection::NotFound)));
                continue;
            };
            self.propose_claim(myself, k, None, request_id, reply, &span);
        }
    }

    /// Asks the shard to forget and stop this actor (it answers with [`KubbiMsg::Stop`]).
    fn passivate(&mut self, myself: &ActorRef<KubbiMsg>) {
        self.passivating = true;
        let _ = self.shard.send_message(ShardMsg::Passivate {
            id: self.id,
            actor: myself.get_id(),
        });
    }

    /// Whether the kubbi has ended (or does not exist) and nothing is left to answer: later
    /// requests are refused as well by a fresh actor reading the record, so this one need not
    /// wait out `idle`.
    fn done_for_good(&self) -> bool {
        (self.known.is_none() || self.terminal().is_some())
            && self.in_flight == 0
            && self.waiting.is_empty()
            && !self.passivating
    }

    fn arm(&mut self, myself: &ActorRef<KubbiMsg>) {
        let mut delay =
            (self.last_activity + self.ctx.idle).saturating_duration_since(Instant::now());
        if let Some(k) = self.known
            && k.status == Status::Active
            && !self.expire_proposed
        {
            let until_expiry = k.expires_at.saturating_sub(self.ctx.clock.now());
            delay = delay.min(Duration::from_millis(until_expiry));
        }
        if let Some(t) = self.timer.take() {
            t.abort();
        }
        self.timer =
            Some(myself.send_after(delay.max(Duration::from_millis(1)), || KubbiMsg::Wake));
    }
}

impl Actor for KubbiActor {
    type Msg = KubbiMsg;
    type State = KubbiState;
    type Arguments = KubbiArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<KubbiMsg>,
        args: KubbiArgs,
    ) -> Result<KubbiState, ActorProcessingErr> {
        let record = match args.record {
            Some(r) => Some(r),
            None => {
                let view = args.ctx.storage.read_view(args.ctx.group);
                read_kubbi(&view, &args.id)?
            }
        };
        let mut state = KubbiState {
            id: args.id,
            ctx: args.ctx,
            shard: args.shard,
            known: record.as_ref().map(Known::from_record),
            in_flight: 0,
            waiting: VecDeque::new(),
            last_activity: Instant::now(),
            expire_proposed: false,
            passivating: false,
            timer: None,
        };
        state.arm(&myself);
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<KubbiMsg>,
        st: &mut KubbiState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = st.timer.take() {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<KubbiMsg>,
        msg: KubbiMsg,
        st: &mut KubbiState,
    ) -> Result<(), ActorProcessingErr> {
        // Whether this message may leave the actor with nothing more to do.
        let may_settle = matches!(
            msg,
            KubbiMsg::Claim { .. } | KubbiMsg::Delete { .. } | KubbiMsg::Done(_)
        );
        match msg {
            KubbiMsg::Claim {
                request_id,
                idempotency,
                reply,
                span,
            } => {
                st.last_activity = Instant::now();
                if let Some(k) = st.known {
                    st.claim(&myself, k, request_id, idempotency, reply, span);
                } else {
                    let _ = reply.send(Ok(Outcome::Rejected(Rejection::NotFound)));
                }
            }
            KubbiMsg::Delete {
                request_id,
                owner,
                reply,
                span,
            } => {
                st.last_activity = Instant::now();
                let cmd = Command::Delete { id: st.id, owner };
                st.propose(&myself, request_id, cmd, Some(reply), &span);
            }
            KubbiMsg::Done(learned) => {
                st.in_flight = st.in_flight.saturating_sub(1);
                if let Some(l) = learned {
                    st.learn(l);
                }
                st.drain(&myself);
            }
            KubbiMsg::Wake => {
                if st.passivating {
                    return Ok(());
                }
                let now = st.ctx.clock.now();
                if let Some(k) = st.known
                    && k.status == Status::Active
                    && now >= k.expires_at
                    && !st.expire_proposed
                {
                    st.expire_proposed = true;
                    let span = tracing::debug_span!("kubbi.expire_timer");
                    st.propose(
                        &myself,
                        RequestId::random(),
                        Command::Expire { id: st.id },
                        None,
                        &span,
                    );
                }
                let idle = st.last_activity.elapsed() >= st.ctx.idle;
                if idle && st.in_flight == 0 && st.waiting.is_empty() {
                    st.passivate(&myself);
                } else {
                    st.arm(&myself);
                }
            }
            KubbiMsg::Stop => {
                // Queued claims still deserve an answer: propose them (the state machine decides).
                while let Some((request_id, reply, span)) = st.waiting.pop_front() {
                    match st.known {
                        Some(k) => st.propose_claim(&myself, k, None, request_id, reply, &span),
                        None => {
                            let _ = reply.send(Ok(Outcome::Rejected(Rejection::NotFound)));
                        }
                    }
                }
                myself.stop(None);
            }
        }
        if may_settle && st.done_for_good() {
            // Burned, deleted or expired: free the actor now (a burn-after-read workload would
            // otherwise keep one live actor per claim for `idle`).
            st.passivate(&myself);
        }
        Ok(())
    }
}
