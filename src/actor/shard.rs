//! The registry and supervisor of one shard's kubbi actors.

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::oneshot;

use super::{KubbiActor, KubbiArgs, KubbiMsg, ShardCtx};
use crate::ids::KubbiId;
use crate::state::KubbiRecord;

/// Messages of a [`ShardActor`].
pub enum ShardMsg {
    /// Deliver `msg` to the actor of `id`, activating it if needed. `record`: the kubbi as
    /// the router just read it from this replica, so that a fresh actor need not read it again.
    Route {
        id: KubbiId,
        msg: KubbiMsg,
        record: Option<KubbiRecord>,
    },
    /// A kubbi was just created: activate its actor with the record in hand.
    Activate { record: KubbiRecord },
    /// The actor `actor` of `id` has been idle: forget it and stop it.
    Passivate { id: KubbiId, actor: ActorId },
    /// How many kubbi actors are alive (metrics, tests).
    LiveActors(oneshot::Sender<usize>),
    /// Stop every kubbi actor (leadership lost, shutdown).
    StopAll,
}

pub struct ShardState {
    ctx: Arc<ShardCtx>,
    live: HashMap<KubbiId, ActorRef<KubbiMsg>>,
    by_actor: HashMap<ActorId, KubbiId>,
}

/// One per shard on its leader. See the module docs of [`crate::actor`].
pub struct ShardActor;

impl ShardState {
    fn spawn(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        id: KubbiId,
        record: Option<KubbiRecord>,
    ) -> Result<ActorRef<KubbiMsg>, ActorProcessingErr> {
        let args = KubbiArgs {
            id,
            ctx: self.ctx.clone(),
            shard: myself.clone(),
            record,
        };
        // Not awaiting pre_start: messages queue up meanwhile, and this shard keeps routing.
        let (actor, _starting) =
            ractor::ActorRuntime::spawn_linked_instant(None, KubbiActor, args, myself.get_cell())?;
        self.by_actor.insert(actor.get_id(), id);
        self.live.insert(id, actor.clone());
        self.ctx
            .activations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(actor)
    }

    fn forget(&mut self, id: &KubbiId, actor: ActorId) -> Option<ActorRef<KubbiMsg>> {
        if self.live.get(id).is_some_and(|a| a.get_id() == actor) {
            self.by_actor.remove(&actor);
            return self.live.remove(id);
        }
        None
    }
}

impl Actor for ShardActor {
    type Msg = ShardMsg;
    type State = ShardState;
    type Arguments = Arc<ShardCtx>;

    async fn pre_start(
        &self,
        _myself: ActorRef<ShardMsg>,
        ctx: Arc<ShardCtx>,
    ) -> Result<ShardState, ActorProcessingErr> {
        Ok(ShardState {
            ctx,
            live: HashMap::new(),
            by_actor: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ShardMsg>,
        msg: ShardMsg,
        st: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Route { id, msg, record } => {
                let (actor, record) = match st.live.get(&id) {
                    Some(a) => (a.clone(), record),
                    None => (st.spawn(&myself, id, record)?, None),
                };
                if let Err(ractor::MessagingErr::SendErr(msg)) = actor.send_message(msg) {
                    // It stopped before its termination reached us: replace it.
                    st.forget(&id, actor.get_id());
                    let fresh = st.spawn(&myself, id, record)?;
                    if fresh.send_message(msg).is_err() {
                        tracing::warn!(
                            shard = st.ctx.group,
                            "a fresh kubbi actor refused a message"
                        );
                    }
                }
            }
            ShardMsg::Activate { record } => {
                if !st.live.contains_key(&record.id) {
                    st.spawn(&myself, record.id, Some(record))?;
                }
            }
            ShardMsg::Passivate { id, actor } => {
                if let Some(a) = st.forget(&id, actor) {
                    // FIFO from this sender: everything routed to it before arrives first.
                    let _ = a.send_message(KubbiMsg::Stop);
                }
            }
            ShardMsg::LiveActors(reply) => {
                let _ = reply.send(st.live.len());
            }
            ShardMsg::StopAll => {
                for (_, a) in st.live.drain() {
                    let _ = a.send_message(KubbiMsg::Stop);
                }
                st.by_actor.clear();
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<ShardMsg>,
        evt: SupervisionEvent,
        st: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        // A kubbi actor ending never stops its shard: all of its state is in raft.
        match evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if let Some(id) = st.by_actor.get(&cell.get_id()).copied() {
                    st.forget(&id, cell.get_id());
                }
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                tracing::error!(shard = st.ctx.group, error = %err, "kubbi actor failed");
                if let Some(id) = st.by_actor.get(&cell.get_id()).copied() {
                    st.forget(&id, cell.get_id());
                }
            }
            _ => {}
        }
        Ok(())
    }
}
