//! The composition root: opens storage, starts every raft group, the actors, the servers and
//! the background loops, and stops them in order.
//!
//! ```text
//!   Config ─▶ secrets, key ring ─▶ Storage (RocksDB) ─▶ shard map (`map`) ─▶ its groups + system
//!          ─▶ initialise (single node / bootstrap) ─▶ executor, router, service
//!          ─▶ public HTTP + internal port ─▶ register in the member table (or join)
//!          ─▶ sweepers, leadership watchers, directory poller, rebalancer
//! ```
//!
//! A single node (no `--internal-addr`) is a one-member cluster on the same code path.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use ractor::ActorRef;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

mod groups;
pub mod map;

use crate::actor::ShardMsg;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, read_secret_file, write_secret_file};
use crate::crypto::{self, KeyRing};
use crate::http::internal::{InternalState, internal_router};
use crate::http::{AppState, router};
use crate::ids::{GroupId, RequestId, SYSTEM_GROUP};
use crate::raft::client::{self, known_leader};
use crate::raft::quiet::{self, Quiet, QuietTiming};
use crate::raft::state_machine::ApplyObserver;
use crate::raft::{NodeInfo, Raft};
use crate::service::placement::{Members, Step};
use crate::service::{Directory, Executor, KeyCache, Router, Service};
use crate::shard::{Candidate, replicas};
use crate::state::{Command, NodeRecord, NodeState, Outcome, next_timer_due, read_nodes};
use crate::storage::{CF_RAFT_META, Storage, group_key};
use crate::transport::messages::{Liveness, NodeStatus, ShardOp};
use crate::transport::stream::Call;
use crate::transport::{AddressBook, Identity, Lane, Peers};

/// Starting a node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    KeyRing(#[from] crypto::KeyRingError),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("state: {0}")]
    State(#[from] crate::state::StoreError),
    #[error("cluster: {0}")]
    Cluster(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Io { what, source }
}

/// How long a stopping node waits for the groups it leads to take a new leader.
const HAND_OFF_PATIENCE: Duration = Duration::from_secs(3);
/// How often a stopping node asks again for a group it still leads to move.
const HAND_OFF_RETRY: Duration = Duration::from_millis(150);

/// Node-level records kept beside the raft metadata (not part of any group).
const NODE_META_GROUP: GroupId = 0xfffe;

/// A running node.
pub struct NodeHandle {
    pub http_addr: SocketAddr,
    pub internal_addr: Option<SocketAddr>,
    pub public_url: String,
    /// The admin token, for tools and tests that start a node in-process.
    pub admin_token: Zeroizing<String>,
    pub service: Service,
    pub clock: SystemClock,
    pub incarnation: u64,
    storage: Arc<Storage>,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    /// Every group this node runs (more start while it runs).
    exec: Arc<Executor>,
}

impl NodeHandle {
    /// The node's storage (tests inspect raw state through it).
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// Snapshots every raft group of this node, purges each log up to its snapshot, then flushes
    /// and fully compacts the database: afterwards no file under the data directory holds
    /// anything of a kubbi that ended before the call (its record's retention aside). Operators
    /// run it before taking a backup; the wiping tests prove the claim with it.
    ///
    /// # Errors
    /// When a group cannot snapshot or purge within 30 s, or RocksDB fails.
    pub async fn compact(&self) -> Result<(), NodeError> {
        for lg in self.exec.groups() {
            snapshot_and_purge(&lg.raft, Duration::from_secs(30), true).await?;
        }
        // The snapshots just built pin views from before their purges; release them (and any
        // other unread pin) so the compaction may drop what was deleted.
        self.storage.release_unused_pins(Duration::ZERO);
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || storage.compact_fully())
            .await
            .map_err(|e| NodeError::Cluster(format!("compaction task: {e}")))??;
        Ok(())
    }

    /// Serves until `shutdown` resolves, then hands off the leadership of every group it leads
    /// ([`NodeHandle::hand_off_leadership`]) and stops.
    pub async fn run_until(self, shutdown: impl std::future::Future<Output = ()>) {
        shutdown.await;
        tracing::info!("shutting down");
        let moved = self.hand_off_leadership(HAND_OFF_PATIENCE).await;
        if moved > 0 {
            tracing::info!(groups = moved, "leadership handed off before stopping");
        }
        self.shutdown().await;
    }

    /// A planned stop costs no election: every group this node leads is handed to a voter that
    /// has its whole log (openraft's leader transfer: the target campaigns at once, and the
    /// voters grant it without waiting out this leader's lease). Groups whose voters lag, or
    /// that do not move within `patience`, are left to the election that follows the stop.
    /// Returns how many groups moved. The node keeps serving meanwhile; once a group moved,
    /// its requests are forwarded to the new leader.
    pub async fn hand_off_leadership(&self, patience: Duration) -> usize {
        self.exec.set_stopping();
        let me = self.exec.node_id();
        let moves = self.exec.groups().into_iter().filter_map(|lg| {
            let target = |m: &openraft::RaftMetrics<crate::raft::TypeConfig>| {
                if m.current_leader != Some(me) {
                    return None;
                }
                let last = m.last_log_index?;
                // The voter that has the most of the log, if it has all of it.
                m.membership_config
                    .membership()
                    .voter_ids()
                    .filter(|v| *v != me)
                    .filter_map(|v| {
                        let matched = m.replication.as_ref()?.get(&v)?.as_ref()?.index;
                        (matched >= last).then_some((matched, v))
                    })
                    .max()
                    .map(|(_, v)| v)
            };
            target(&lg.raft.metrics().borrow_watched())?;
            Some(async move {
                let deadline = tokio::time::Instant::now() + patience;
                // The target ignores a transfer naming a log it does not have yet (writes
                // that raced the first attempt): ask again until it moves.
                loop {
                    let m = lg.raft.metrics().borrow_watched().clone();
                    if m.current_leader.is_some_and(|l| l != me) {
                        return true;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return false;
                    }
                    if let Some(to) = target(&m) {
                        let _ = tokio::time::timeout(
                            HAND_OFF_RETRY,
                            lg.raft.trigger().transfer_leader(to),
                        )
                        .await;
                    }
                    let _ = lg
                        .raft
                        .wait(Some(HAND_OFF_RETRY))
                        .metrics(
                            |m| m.current_leader.is_some_and(|l| l != me),
                            "another leader",
                        )
                        .await;
                }
            })
        });
        futures::future::join_all(moves)
            .await
            .into_iter()
            .filter(|moved| *moved)
            .count()
    }

    /// Stops the servers, background loops, actors and raft groups, in that order.
    /// Returns once the database is closed, so the data directory can be opened again.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for s in self.servers {
            let _ = s.await;
        }
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        let groups = self.exec.groups();
        for lg in &groups {
            for t in &lg.tasks {
                t.abort();
            }
        }
        for lg in &groups {
            if let Some(a) = &lg.actor {
                let _ = a.stop_and_wait(None, Some(Duration::from_secs(5))).await;
            }
        }
        for lg in &groups {
            let _ = lg.raft.shutdown().await;
        }
        drop(groups);
        drop(self.exec);
        drop(self.service);
        // In-flight work (a proposal task, a snapshot reader) may still hold the database for a
        // moment; wait for it so the data directory is free when this returns.
        let storage = self.storage;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&storage) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if Arc::strong_count(&storage) > 1 {
            tracing::warn!("shutdown: the database is still referenced; it closes when they end");
        }
    }
}

fn load_admin_token(config: &Config) -> Result<Zeroizing<String>, NodeError> {
    if let Some(t) = &config.admin_token
        && !t.is_empty()
    {
        return Ok(t.clone());
    }
    let path = config.admin_token_path();
    if config.admin_token_file.is_some() || path.exists() {
        let t = Zeroizing::new(read_secret_file(&path).map_err(io(format!(
            "cannot read the admin token file {}",
            path.display()
        )))?);
        if t.len() < 16 {
            return Err(NodeError::Config(format!(
                "the admin token in {} is shorter than 16 characters",
                path.display()
            )));
        }
        return Ok(t);
    }
    let token = crypto::random_b64(32);
    write_secret_file(&path, format!("{}\n", token.as_str()).as_bytes()).map_err(io(format!(
        "cannot write the admin token file {}",
        path.display()
    )))?;
    tracing::info!(path = %path.display(), "generated an admin token (mode 0600)");
    Ok(token)
}

fn load_cluster_secret(config: &Config) -> Result<Option<Zeroizing<String>>, NodeError> {
    let c = &config.cluster;
    if c.internal_addr.is_none() {
        return Ok(None);
    }
    let secret = match (&c.secret, &c.secret_file) {
        (Some(s), _) => s.clone(),
        (None, Some(p)) => Zeroizing::new(read_secret_file(p).map_err(io(format!(
            "cannot read the cluster secret file {}",
            p.display()
        )))?),
        (None, None) => return Err(NodeError::Config("no cluster secret".into())),
    };
    if secret.len() < 16 {
        return Err(NodeError::Config(
            "the cluster secret must be at least 16 characters".into(),
        ));
    }
    Ok(Some(secret))
}

fn load_key_ring(config: &Config) -> Result<KeyRing, NodeError> {
    let path = config.node_key_path();
    if config.node_key_file.is_some() {
        return Ok(KeyRing::load(&path)?);
    }
    let (ring, created) = KeyRing::load_or_create(&path)?;
    if created {
        tracing::warn!(
            path = %path.display(),
            "dev mode: generated a node key ring in the data directory; \
             production nodes (and every node of a cluster) load an operator-supplied --node-key-file"
        );
    }
    Ok(ring)
}

/// This data directory's identity: node id, the group count of the fixed-shard layout (0 for
/// a directory whose groups come from the shard map), and a random incarnation. Returns the
/// fixed count, if any, and the incarnation.
fn check_identity(storage: &Storage, config: &Config) -> Result<(Option<u16>, u64), NodeError> {
    let cf = storage.cf(CF_RAFT_META);
    let key = group_key(NODE_META_GROUP, b"identity");
    let db = storage.db();
    let stored = db
        .get_cf(cf, &key)
        .map_err(|e| NodeError::Storage(e.into()))?;
    match stored {
        Some(b) => {
            use crate::storage::layout::{LAYOUT, upgrade_to_v2};
            // (node id, shard count, incarnation, key layout); layout 1 wrote no layout field.
            let (node_id, shards, incarnation, layout) =
                match crate::codec::decode::<(u64, u16, u64, u32)>("node identity", &b) {
                    Ok(v) => v,
                    Err(e) => crate::codec::decode::<(u64, u16, u64)>("node identity", &b)
                        .map(|(n, s, i)| (n, s, i, 1))
                        .map_err(|_| NodeError::Config(e.to_string()))?,
                };
            if layout > LAYOUT {
                return Err(NodeError::Config(format!(
                    "this data directory has key layout {layout}, written by a newer kubbi; \
                     this build reads layout {LAYOUT} and older"
                )));
            }
            if node_id != config.node_id {
                return Err(NodeError::Config(format!(
                    "this data directory belongs to node {node_id}, not node {}",
                    config.node_id
                )));
            }
            if layout < LAYOUT {
                tracing::info!(
                    from = layout,
                    to = LAYOUT,
                    "upgrading the data directory's key layout (once; every node of the \
                     cluster must run this build before it serves again)"
                );
                let started = std::time::Instant::now();
                // Layout 3 reads layout 2's keys as they are.
                let keys = if layout < 2 {
                    upgrade_to_v2(storage).map_err(|e| NodeError::Storage(e.into()))?
                } else {
                    0
                };
                db.put_cf(
                    cf,
                    &key,
                    crate::codec::encode(&(node_id, shards, incarnation, LAYOUT)),
                )
                .and_then(|()| db.flush_wal(true))
                .map_err(|e| NodeError::Storage(e.into()))?;
                tracing::info!(
                    keys,
                    ms = started.elapsed().as_millis() as u64,
                    "data directory upgraded"
                );
            }
            Ok(((shards != 0).then_some(shards), incarnation))
        }
        None => {
            let incarnation = rand::random::<u64>().max(1);
            db.put_cf(
                cf,
                &key,
                crate::codec::encode(&(
                    config.node_id,
                    0u16,
                    incarnation,
                    crate::storage::layout::LAYOUT,
                )),
            )
            .map_err(|e| NodeError::Storage(e.into()))?;
            Ok((None, incarnation))
        }
    }
}

/// openraft's `heartbeat_min_interval`: one heartbeat interval, if a heartbeat delayed by it
/// (plus one tick) still arrives before the shortest election timeout.
fn heartbeat_suppression(config: &Config) -> Option<u64> {
    let hb = config.raft.heartbeat_ms;
    let tick = hb * 13 / 64 + 1;
    (hb + hb + tick < config.raft.election_timeout_min_ms).then_some(hb)
}

fn raft_config(config: &Config) -> Result<Arc<openraft::Config>, NodeError> {
    let c = openraft::Config {
        cluster_name: "kubbi".into(),
        heartbeat_interval: config.raft.heartbeat_ms,
        election_timeout_min: config.raft.election_timeout_min_ms,
        election_timeout_max: config.raft.election_timeout_max_ms,
        // Under load, replication already proves the leader alive: no separate heartbeat to a
        // follower that acknowledged an RPC within the last interval (when the election timeout
        // leaves room for it; see openraft's rule for this setting).
        heartbeat_min_interval: heartbeat_suppression(config),
        // A node whose election timer fired asks first whether it could win: while the others
        // still hear from a leader (a node that was partitioned, paused, or whose own raft
        // core fell behind), it does not raise the term and depose that leader.
        enable_pre_vote: Some(true),
        // A node that led before a restart wins an election like any other instead of leading
        // again at once in its old term. After a power cut its state can be older than its log
        // (the state machine's writes are not synced; the log replays them), and the committed
        // index is not persisted: a restored leader would take its applied index for the
        // committed one and answer reads from the older state until replication caught up (an
        // acknowledged kubbi answering 404). A new term's first entry commits, and reads wait for
        // it to apply, only after every entry before it (docs/design-notes.md, Durability).
        enable_leader_restore: Some(false),
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(
            config.raft.snapshot_every_entries,
        ),
        // Keep a quarter of a snapshot interval of log behind each snapshot, so a briefly
        // lagging follower catches up from the log instead of a full snapshot.
        max_in_snapshot_log_to_keep: (config.raft.snapshot_every_entries / 4).max(1),
        ..Default::default()
    };
    c.validate()
        .map(Arc::new)
        .map_err(|e| NodeError::Config(e.to_string()))
}

/// Tells several observers about every apply.
struct Observers(Vec<Arc<dyn ApplyObserver>>);

impl ApplyObserver for Observers {
    fn applied(&self, group: GroupId, outcome: &Outcome, here: bool) {
        for o in &self.0 {
            o.applied(group, outcome, here);
        }
    }
    fn state_replaced(&self, group: GroupId) {
        for o in &self.0 {
            o.state_replaced(group);
        }
    }
}

/// Mirrors the member table into the address book as the system group applies it.
struct MemberObserver {
    book: Arc<AddressBook>,
    me: u64,
}

impl ApplyObserver for MemberObserver {
    fn applied(&self, group: GroupId, outcome: &Outcome, _here: bool) {
        if group != SYSTEM_GROUP {
            return;
        }
        match outcome {
            Outcome::NodeStored(n) if n.id != self.me => {
                self.book.set(n.id, &n.internal, n.incarnation);
            }
            Outcome::Duplicate(inner) => self.applied(group, inner, false),
            _ => {}
        }
    }
    fn state_replaced(&self, _: GroupId) {}
}

/// How often a sweeper looks at its timer index when nothing is due sooner.
const SWEEP_IDLE: Duration = Duration::from_millis(500);
/// Timers processed per sweep entry.
const SWEEP_BATCH: u32 = 512;

async fn sweep_loop(
    node_id: u64,
    group: GroupId,
    raft: Raft,
    storage: Arc<Storage>,
    clock: Arc<dyn Clock>,
) {
    loop {
        let mut wait = SWEEP_IDLE;
        if known_leader(&raft) == Some(node_id) {
            let now = clock.now();
            match next_timer_due(&storage.read_view(group)) {
                Ok(Some(due)) if due <= now => {
                    let cmd = Command::Sweep { max: SWEEP_BATCH };
                    match client::propose(&raft, &*clock, RequestId::random(), cmd).await {
                        Ok(Outcome::Swept { .. }) => continue,
                        Ok(other) => {
                            tracing::warn!(group, outcome = ?other, "unexpected sweep outcome")
                        }
                        Err(e) => tracing::debug!(group, error = %e, "sweep not committed"),
                    }
                }
                Ok(Some(due)) => wait = wait.min(Duration::from_millis(due - now)),
                Ok(None) => {}
                Err(e) => tracing::error!(group, error = %e, "cannot read the timer index"),
            }
        }
        tokio::time::sleep(wait).await;
    }
}

/// Stops a shard's kubbi actors when this node stops leading it.
async fn leadership_watch(node_id: u64, raft: Raft, actor: ActorRef<ShardMsg>) {
    let mut rx = raft.metrics();
    let mut was_leader = false;
    loop {
        let is_leader = {
            let m = rx.borrow_watched();
            m.state.is_leader() && m.current_leader == Some(node_id)
        };
        if was_leader && !is_leader {
            let _ = actor.send_message(ShardMsg::StopAll);
        }
        was_leader = is_leader;
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Keeps the directory (members, leaders) and the address book fresh: the member table from
/// the system group, leaders from every peer's status.
async fn directory_loop(service: Service, storage: Arc<Storage>, peers: Peers, me: u64) {
    let directory = service.router().directory().clone();
    loop {
        let mut nodes = read_nodes(&storage.read_view(SYSTEM_GROUP)).unwrap_or_default();
        if nodes.is_empty()
            && let Ok((_, n)) = service.read_system().await
        {
            nodes = n;
        }
        if !nodes.is_empty() {
            for n in &nodes {
                if n.id != me && n.state != NodeState::Removed {
                    peers.book().set(n.id, &n.internal, n.incarnation);
                }
            }
            directory.set_nodes(nodes.clone());
        }
        let polls = nodes
            .iter()
            .filter(|n| n.id != me && n.state != NodeState::Removed)
            .map(|n| {
                let peers = peers.clone();
                let id = n.id;
                async move {
                    peers
                        .post::<(), NodeStatus>(
                            id,
                            "/internal/v1/status",
                            &(),
                            Duration::from_secs(1),
                        )
                        .await
                }
            });
        let mut best: BTreeMap<GroupId, (u64, u64)> = BTreeMap::new();
        for st in futures::future::join_all(polls).await.into_iter().flatten() {
            for (g, leader, term) in st.groups {
                if let Some(l) = leader
                    && best.get(&g).is_none_or(|(_, t)| term > *t)
                {
                    best.insert(g, (l, term));
                }
            }
        }
        for (g, (l, _)) in best {
            directory.set_leader(g, l);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Renews this node's API key lease from the system group's leader (see
/// `service::keys::KEY_LEASE`): a node that cannot renew stops accepting API keys.
async fn key_lease_loop(service: Service) {
    loop {
        if let Err(e) = service.refresh_keys().await {
            tracing::debug!(error = %e, "cannot renew the API key lease");
        }
        tokio::time::sleep(crate::service::keys::KEY_RENEW_EVERY).await;
    }
}

/// Snapshots a group up to what it applied, then purges its log up to there, waiting at most
/// `patience` for each step. A leader purges only what no replication still reads, so without
/// `wait_for_purge` the purge is scheduled rather than waited for.
async fn snapshot_and_purge(
    r: &Raft,
    patience: Duration,
    wait_for_purge: bool,
) -> Result<(), NodeError> {
    let timeout = Some(patience);
    let applied = r.metrics().borrow_watched().last_applied;
    let Some(applied) = applied else {
        return Ok(());
    };
    r.trigger()
        .snapshot()
        .await
        .map_err(|e| NodeError::Cluster(format!("snapshot: {e}")))?;
    r.wait(timeout)
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= applied.index),
            "snapshot covers what was applied",
        )
        .await
        .map_err(|e| NodeError::Cluster(format!("snapshot: {e}")))?;
    r.trigger()
        .purge_log(applied.index)
        .await
        .map_err(|e| NodeError::Cluster(format!("purge: {e}")))?;
    if !wait_for_purge {
        return Ok(());
    }
    r.wait(timeout)
        .metrics(
            |m| m.purged.is_some_and(|p| p.index >= applied.index),
            "log purged up to the snapshot",
        )
        .await
        .map_err(|e| NodeError::Cluster(format!("purge: {e}")))?;
    Ok(())
}

/// Bounds each group's raft log by bytes as well as by entries (openraft's policy): a group
/// whose log took in `budget` bytes since its last compaction here is snapshotted and purged.
/// A follower that still needed the purged entries catches up from the snapshot.
async fn log_budget_loop(exec: Arc<Executor>, budget: u64) {
    let mut marks: BTreeMap<GroupId, u64> = BTreeMap::new();
    loop {
        tokio::time::sleep(LOG_BUDGET_CHECK_EVERY).await;
        for lg in exec.groups() {
            let g = &lg.group;
            let mark = marks.entry(lg.group).or_insert(0);
            let now = lg.log_bytes.load(Ordering::Relaxed);
            if now.saturating_sub(*mark) < budget {
                continue;
            }
            match snapshot_and_purge(&lg.raft, Duration::from_secs(30), false).await {
                Ok(()) => {
                    *mark = now;
                    tracing::debug!(
                        group = g,
                        bytes = now,
                        "raft log over its byte budget: snapshotted and purged"
                    );
                }
                Err(e) => {
                    tracing::warn!(group = g, error = %e, "cannot compact a raft log over its byte budget")
                }
            }
        }
    }
}

/// How often [`log_budget_loop`] looks at the logs.
const LOG_BUDGET_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Moves every group's quiet state on (`raft::quiet`) and tells every peer, once per
/// `ping_every`, which groups this node leads, quiet and awake: that ping is the quiet groups'
/// heartbeat.
///
/// A single node (no peers) parks its groups' tickers the same way: a single voter needs no
/// heartbeat and no election timer.
async fn quiet_loop(quiet: Arc<Quiet>, peers: Option<Peers>) {
    let every = quiet.timing().ping_every;
    let mut next_ping = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(quiet::CHECK_EVERY.min(every)).await;
        let beat = quiet.check(std::time::Instant::now());
        let now = tokio::time::Instant::now();
        let Some(peers) = &peers else { continue };
        if now < next_ping {
            continue;
        }
        next_ping = now + every;
        let body = crate::codec::encode::<Liveness>(&beat);
        for id in peers.book().ids() {
            let (peers, body) = (peers.clone(), body.clone());
            // Fire and forget: a ping that does not arrive is what the peer watches for.
            tokio::spawn(async move {
                let r: Result<(), _> = peers
                    .call(id, Call::Liveness, &body, every * 2, Lane::BySize)
                    .await;
                if let Err(e) = r {
                    tracing::debug!(peer = id, error = %e, "liveness ping not delivered");
                }
            });
        }
    }
}

/// Releases raft snapshot pins nobody reads from: a pinned RocksDB snapshot keeps deleted
/// ciphertext of every group in the files (see `raft::snapshot`).
async fn release_pins_loop(storage: Arc<Storage>) {
    let after = crate::raft::snapshot::RELEASE_UNUSED_PIN_AFTER;
    loop {
        tokio::time::sleep(after / 2).await;
        storage.release_unused_pins(after);
    }
}

/// On the system group's leader: keeps the system group on up to five members, grows and
/// places the data groups (`service::placement`) and moves them toward their placement, one
/// membership change per round, and retires drained members.
async fn rebalance_loop(service: Service, storage: Arc<Storage>, me: u64, auto_split: bool) {
    let exec = service.router().executor().clone();
    let mut pause = Duration::from_secs(2);
    loop {
        tokio::time::sleep(pause).await;
        pause = Duration::from_secs(2);
        let leads_system = exec
            .group(SYSTEM_GROUP)
            .is_some_and(|g| known_leader(&g.raft) == Some(me));
        if !leads_system {
            continue;
        }
        match rebalance_once(&service, &storage, auto_split).await {
            // More may be pending: go on soon.
            Ok(true) => pause = Duration::from_millis(200),
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e.message, "rebalance round incomplete"),
        }
    }
}

/// One round; `Ok(true)` when it changed a membership.
async fn rebalance_once(
    service: &Service,
    storage: &Storage,
    auto_split: bool,
) -> Result<bool, crate::error::ApiError> {
    let exec = service.router().executor().clone();
    let nodes = read_nodes(&storage.read_view(SYSTEM_GROUP)).map_err(|e| {
        tracing::error!(error = %e, "cannot read the member table");
        crate::error::ApiError::internal()
    })?;
    let active: Vec<&NodeRecord> = nodes
        .iter()
        .filter(|n| n.state == NodeState::Active)
        .collect();
    if active.is_empty() {
        return Ok(false);
    }
    let candidates: Vec<Candidate> = active
        .iter()
        .map(|n| Candidate {
            id: n.id,
            zone: n.zone.clone(),
        })
        .collect();
    let members = Members::new(&nodes);

    // The system group: up to five voters, every other member a learner (so every node has
    // the member table and the API keys).
    let mut statuses = Vec::new();
    if let Some(st) = exec.status(SYSTEM_GROUP) {
        let current: BTreeSet<u64> = st.voters.iter().chain(&st.learners).copied().collect();
        let target_voters = replicas(SYSTEM_GROUP, &candidates, 5);
        let voters = members.pick(&target_voters, &current);
        let learners_ids: Vec<u64> = active
            .iter()
            .map(|n| n.id)
            .filter(|id| !target_voters.contains(id))
            .collect();
        let learners = members.pick(&learners_ids, &current);
        let same = st.voters.iter().copied().collect::<BTreeSet<_>>()
            == voters.keys().copied().collect()
            && st.learners.iter().copied().collect::<BTreeSet<_>>()
                == learners.keys().copied().collect();
        if !same && !voters.is_empty() {
            tracing::info!(?voters, ?learners, "reconfiguring the system group");
            exec.execute(SYSTEM_GROUP, ShardOp::Reconfigure { voters, learners })
                .await
                .map_err(|e| crate::error::ApiError::unavailable(e.to_string()))?;
            return Ok(true);
        }
        statuses.push(st);
    }

    // Splits left half-way (their driver's node failed, or it gave up waiting) are finished
    // first: until then their source serves nothing of the range.
    if service
        .shard_map()
        .groups
        .values()
        .any(|e| matches!(e.state, crate::state::map::GroupState::Splitting { .. }))
    {
        let done = service.finish_splits().await?;
        if !done.is_empty() {
            tracing::info!(splits = done.len(), "finished splits left under way");
            return Ok(true);
        }
    }
    // A node that joined gets a group of its own (a split), then its share of replicas and
    // leaders (the map's desired placement), which the groups then follow.
    if (auto_split && service.grow(&members).await?) || service.place(&members).await? {
        return Ok(true);
    }
    let groups = service.data_groups();
    let mut changed = false;
    for &g in &groups {
        // One replica move per round: each copies a group's state.
        let (step, st) = service.converge_group(g, &members, !changed).await?;
        changed |= step == Step::Reconfigured;
        statuses.push(st);
    }

    // Drained members: out of every group, then retired.
    for n in nodes.iter().filter(|n| n.state == NodeState::Leaving) {
        let still = statuses
            .iter()
            .any(|s| s.voters.contains(&n.id) || s.learners.contains(&n.id));
        if !still && statuses.len() == groups.len() + 1 {
            tracing::info!(node = n.id, "member drained; marking it removed");
            service
                .put_node(Command::SetNodeState {
                    id: n.id,
                    state: NodeState::Removed,
                })
                .await?;
        }
    }
    Ok(changed)
}

/// Registers this node in the member table (creating it at bootstrap), retrying until the
/// system group answers. A data directory the cluster does not know is refused for good.
async fn register(
    service: &Service,
    me: &NodeRecord,
    join: Option<(&Peers, &str)>,
) -> Result<NodeRecord, NodeError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let attempt = match join {
            Some((peers, seed)) => peers
                .post_addr::<Result<NodeRecord, String>>(
                    0,
                    seed,
                    0,
                    "/internal/v1/join",
                    crate::codec::encode(me),
                    Duration::from_secs(15),
                )
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r),
            None => service
                .put_node(Command::PutNode(me.clone()))
                .await
                .map_err(|e| format!("{}: {}", e.code.as_str(), e.message)),
        };
        match attempt {
            Ok(r) => return Ok(r),
            Err(e) if e.starts_with("conflict") => {
                return Err(NodeError::Cluster(format!(
                    "node {} is still a member of this cluster with another data directory; \
                     remove it first (DELETE /admin/v1/nodes/{} or `kubbi cluster remove {}`), \
                     then start it again to join: {e}",
                    me.id, me.id, me.id
                )));
            }
            Err(e) => {
                if tokio::time::Instant::now() > deadline {
                    return Err(NodeError::Cluster(format!(
                        "cannot register with the cluster: {e}"
                    )));
                }
                tracing::info!(error = %e, "waiting for the cluster to register this node");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Whether any reachable replica of `g` reports the group as already formed.
async fn formed_elsewhere(peers: &Peers, g: GroupId, replicas: &[u64], me: u64) -> bool {
    for id in replicas.iter().filter(|id| **id != me) {
        if let Ok(st) = peers
            .post::<(), NodeStatus>(*id, "/internal/v1/status", &(), Duration::from_secs(1))
            .await
            && st.groups.iter().any(|(gg, _, _)| *gg == g)
        {
            return true;
        }
    }
    false
}

/// Starts a node and returns once it serves HTTP and is registered in its cluster.
///
/// # Errors
/// Invalid configuration, unreadable secrets, a data directory of another node or one the
/// cluster refuses, storage or raft start-up failures, or an address that cannot be bound.
pub fn start(config: Config) -> futures::future::BoxFuture<'static, Result<NodeHandle, NodeError>> {
    // Boxed: this future nests raft's start-up, the shard map's and the groups' ones; callers
    // awaiting it inside their own futures would otherwise need a higher recursion limit to
    // compute its layout.
    Box::pin(start_node(config))
}

async fn start_node(config: Config) -> Result<NodeHandle, NodeError> {
    config.validate().map_err(NodeError::Config)?;
    std::fs::create_dir_all(&config.data_dir).map_err(io(format!(
        "cannot create the data directory {}",
        config.data_dir.display()
    )))?;
    let admin_token = load_admin_token(&config)?;
    let cluster_secret = load_cluster_secret(&config)?;
    let keyring = load_key_ring(&config)?;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => Some(
            crate::tls::ReloadingTls::new(crate::tls::TlsFiles {
                cert: c.clone(),
                key: k.clone(),
                ca: None,
            })
            .map_err(NodeError::Config)?,
        ),
        (None, None) => None,
        _ => {
            return Err(NodeError::Config(
                "--tls-cert and --tls-key go together".into(),
            ));
        }
    };
    let internal_tls = match config.cluster.internal_tls().map_err(NodeError::Config)? {
        Some(files) => Some(
            crate::tls::ReloadingTls::new(files)
                .map_err(|e| NodeError::Config(format!("internal TLS: {e}")))?,
        ),
        None => None,
    };
    let internal_client_tls = match &internal_tls {
        Some(t) => Some(
            t.client_config()
                .map_err(|e| NodeError::Config(format!("internal TLS: {e}")))?,
        ),
        None => None,
    };
    let storage = Storage::open(&config.db_path())?;
    let (legacy_shards, incarnation) = check_identity(&storage, &config)?;
    let clock = SystemClock::default();
    if config.clock_offset_ms != 0 {
        tracing::warn!(
            offset_ms = config.clock_offset_ms,
            "this node's clock is shifted (--clock-offset-ms): for tests only"
        );
        clock.advance(config.clock_offset_ms);
    }
    let dyn_clock: Arc<dyn Clock> = Arc::new(clock.clone());
    let cc = &config.cluster;

    let listener = tokio::net::TcpListener::bind(&config.http_addr)
        .await
        .map_err(io(format!("cannot listen on {}", config.http_addr)))?;
    let http_addr = listener
        .local_addr()
        .map_err(io("cannot read the bound address"))?;
    let public_url = config.public_url.clone().unwrap_or_else(|| {
        let scheme = if tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{http_addr}")
    });
    let internal_listener = match &cc.internal_addr {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(io(format!("cannot listen on {a}")))?,
        ),
        None => None,
    };
    let internal_addr = match &internal_listener {
        Some(l) => Some(
            l.local_addr()
                .map_err(io("cannot read the bound address"))?,
        ),
        None => None,
    };

    let me = NodeRecord {
        id: config.node_id,
        http: cc
            .advertise_http
            .clone()
            .unwrap_or_else(|| http_addr.to_string()),
        internal: cc
            .advertise_internal
            .clone()
            .or_else(|| internal_addr.map(|a| a.to_string()))
            .unwrap_or_default(),
        zone: cc.zone.clone(),
        incarnation,
        state: NodeState::Active,
        updated_at: 0,
    };
    let my_info = NodeInfo::from(&me);
    let book = Arc::new(AddressBook::with_routes(cc.peer_routes.clone()));
    for m in &cc.bootstrap {
        if m.id != config.node_id {
            book.set(m.id, &m.internal, 0);
        }
    }
    let peers = cluster_secret.map(|secret| {
        Peers::new(
            Identity {
                node_id: config.node_id,
                incarnation,
            },
            secret,
            book.clone(),
            internal_client_tls,
        )
    });

    let keys = KeyCache::load(storage.clone())?;
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let rcfg = raft_config(&config)?;

    let bootstrap: Vec<Candidate> = if cc.internal_addr.is_none() {
        vec![Candidate {
            id: config.node_id,
            zone: cc.zone.clone(),
        }]
    } else {
        cc.bootstrap
            .iter()
            .map(|m| Candidate {
                id: m.id,
                zone: m.zone.clone(),
            })
            .collect()
    };
    let shard_map = Arc::new(
        map::resolve(map::Sources {
            storage: &storage,
            legacy: legacy_shards,
            join: match (&cc.join, &peers) {
                (Some(seed), Some(p)) => Some((p, seed.as_str())),
                _ => None,
            },
            bootstrap: &bootstrap,
            initial_groups: config.initial_groups,
            rf: cc.replication_factor,
            me: config.node_id,
        })
        .await?,
    );
    let map_cache = crate::service::MapCache::new(shard_map.clone(), storage.clone());
    let observer: Arc<dyn ApplyObserver> = Arc::new(Observers(vec![
        keys.clone(),
        metrics.lifecycle.clone(),
        Arc::new(MemberObserver {
            book: book.clone(),
            me: config.node_id,
        }),
        map_cache.clone(),
    ]));
    let quiet = Arc::new(Quiet::new(
        config.node_id,
        QuietTiming::new(
            Duration::from_millis(config.raft.quiet_after_ms),
            Duration::from_millis(config.raft.election_timeout_min_ms),
            Duration::from_millis(config.raft.election_timeout_max_ms),
        ),
        std::iter::empty(),
    ));
    let exec = Arc::new(Executor::new(
        config.node_id,
        storage.clone(),
        dyn_clock.clone(),
        Vec::new(),
        quiet.clone(),
    ));
    let starter = groups::GroupStarter {
        me: config.node_id,
        rcfg: rcfg.clone(),
        storage: storage.clone(),
        peers: peers.clone(),
        observer: observer.clone(),
        clock: dyn_clock.clone(),
        actor_idle: config.actor_idle,
        quiet: quiet.clone(),
        exec: exec.clone(),
        registry: Default::default(),
    };
    // The map's groups that can start now (a split's target waits for its fence, see
    // `groups`), then the system group.
    for (g, plan) in groups::pending(&starter, &shard_map)? {
        groups::carry_out(&starter, g, plan).await?;
    }
    starter.start(SYSTEM_GROUP).await?;
    let data_groups: Vec<GroupId> = exec
        .groups()
        .iter()
        .map(|lg| lg.group)
        .filter(|g| *g != SYSTEM_GROUP)
        .collect();
    let groups: Vec<GroupId> = data_groups
        .iter()
        .copied()
        .chain(std::iter::once(SYSTEM_GROUP))
        .collect();
    let rafts: Vec<Raft> = groups
        .iter()
        .filter_map(|g| exec.group(*g).map(|lg| lg.raft.clone()))
        .collect();

    // Form the groups of a new cluster, each by its preferred leader.
    let mut initialised_system = false;
    if !bootstrap.is_empty() {
        let info_of = |id: u64| -> NodeInfo {
            if id == config.node_id {
                return my_info.clone();
            }
            cc.bootstrap
                .iter()
                .find(|m| m.id == id)
                .map(|m| NodeInfo {
                    http: String::new(),
                    internal: m.internal.clone(),
                    zone: m.zone.clone(),
                })
                .unwrap_or_default()
        };
        for (raft, &g) in rafts.iter().zip(&groups) {
            let voters = if g == SYSTEM_GROUP {
                replicas(SYSTEM_GROUP, &bootstrap, 5)
            } else {
                shard_map
                    .groups
                    .get(&g)
                    .map(|e| e.replicas.clone())
                    .unwrap_or_default()
            };
            // The preferred leader forms the group: it campaigns first and usually wins, so
            // leaders start out spread.
            if voters.first() != Some(&config.node_id)
                || raft
                    .is_initialized()
                    .await
                    .map_err(|e| NodeError::Raft(e.to_string()))?
            {
                continue;
            }
            if let Some(p) = &peers
                && formed_elsewhere(p, g, &voters, config.node_id).await
            {
                continue;
            }
            let members: BTreeMap<u64, NodeInfo> =
                voters.iter().map(|id| (*id, info_of(*id))).collect();
            raft.initialize(members)
                .await
                .map_err(|e| NodeError::Raft(format!("group {g}: {e}")))?;
            if g == SYSTEM_GROUP {
                initialised_system = true;
            }
        }
    }
    if cc.internal_addr.is_none() {
        // A single node is its own cluster: its state machines catch up with its log here. In a
        // cluster this needs the peers; there every read is served by a leader after a read
        // index, which never sees a reverted state.
        for (raft, g) in rafts.iter().zip(&groups) {
            raft.wait_for_recovery(Some(Duration::from_secs(30)))
                .await
                .map_err(|e| NodeError::Raft(format!("group {g} did not recover: {e}")))?;
        }
    }

    let mut tasks = Vec::new();
    let directory = Arc::new(Directory::default());
    if let Ok(nodes) = read_nodes(&storage.read_view(SYSTEM_GROUP))
        && !nodes.is_empty()
    {
        for n in &nodes {
            if n.id != config.node_id && n.state != NodeState::Removed {
                book.set(n.id, &n.internal, n.incarnation);
            }
        }
        directory.set_nodes(nodes);
    } else if cc.internal_addr.is_some() {
        directory.set_nodes(
            cc.bootstrap
                .iter()
                .map(|m| NodeRecord {
                    id: m.id,
                    http: String::new(),
                    internal: m.internal.clone(),
                    zone: m.zone.clone(),
                    incarnation: 0,
                    state: NodeState::Active,
                    updated_at: 0,
                })
                .collect(),
        );
    }
    let router_ = Arc::new(Router::new(
        exec.clone(),
        peers.clone(),
        directory,
        map_cache.clone(),
        cc.replication_factor,
    ));
    let service = Service::new(
        dyn_clock.clone(),
        config.limits.clone(),
        keyring,
        map_cache.clone(),
        router_,
        keys,
    );

    let (stop, stop_rx) = watch::channel(false);
    let mut servers = Vec::new();
    let app = router(AppState {
        service: service.clone(),
        metrics: metrics.clone(),
        storage: storage.clone(),
        admin_token_hash: crypto::sha256(admin_token.as_bytes()),
        public_url: public_url.clone().into(),
        cors_origins: config.cors_origins.clone().into(),
        client_limits: Arc::new(crate::http::ratelimit::IpLimits::new(
            crate::http::ratelimit::Rate {
                per_second: config.client_limits.link_rate,
                burst: config.client_limits.link_burst,
            },
            crate::http::ratelimit::Rate {
                per_second: config.client_limits.auth_failures_per_minute / 60.0,
                burst: config.client_limits.auth_failure_burst,
            },
            config.client_limits.trusted_proxies.clone(),
        )),
    });
    if let Some(t) = &tls {
        servers.push(t.clone().watch(stop_rx.clone()));
    }
    servers.push(crate::http::server::serve_public(
        listener,
        app,
        stop_rx.clone(),
        crate::http::server::Timeouts {
            header: config.limits.header_timeout,
            idle: config.limits.header_timeout.max(config.limits.body_timeout),
        },
        tls,
    ));
    if let (Some(l), Some(p)) = (internal_listener, &peers) {
        let secret_hash = {
            // The secret is only in `Peers`; hash what it presents.
            let s = load_cluster_secret(&config)?.unwrap_or_default();
            crypto::sha256(s.as_bytes())
        };
        let st = Arc::new(InternalState {
            exec: exec.clone(),
            service: service.clone(),
            me: p.me().clone(),
            http: me.http.clone(),
            zone: me.zone.clone(),
            book: book.clone(),
            secret_hash,
            uploads: Mutex::new(Default::default()),
        });
        if let Some(t) = &internal_tls {
            servers.push(t.clone().watch(stop_rx.clone()));
        }
        servers.push(serve_internal(
            l,
            internal_router(st.clone()),
            st,
            stop_rx.clone(),
            internal_tls,
        ));
    }

    // Single node: wait for the groups to lead before answering (fast, local).
    if cc.internal_addr.is_none() {
        for (raft, g) in rafts.iter().zip(&groups) {
            raft.wait(Some(Duration::from_secs(30)))
                .current_leader(config.node_id, "leader elected")
                .await
                .map_err(|e| NodeError::Raft(format!("group {g} elected no leader: {e}")))?;
        }
    }

    // Join the member table: the system group's founder records every bootstrap member; every
    // node registers itself with its data directory's incarnation.
    if initialised_system {
        for m in cc.bootstrap.iter().filter(|m| m.id != config.node_id) {
            let rec = NodeRecord {
                id: m.id,
                http: String::new(),
                internal: m.internal.clone(),
                zone: m.zone.clone(),
                incarnation: 0,
                state: NodeState::Active,
                updated_at: 0,
            };
            register(&service, &rec, None).await?;
        }
    }
    let join = match (&cc.join, &peers) {
        (Some(seed), Some(p)) => Some((p, seed.as_str())),
        _ => None,
    };
    let registered = register(&service, &me, join).await?;
    tracing::info!(
        node = registered.id,
        state = registered.state.as_str(),
        "registered in the member table"
    );

    if let Some(p) = &peers {
        tasks.push(tokio::spawn(directory_loop(
            service.clone(),
            storage.clone(),
            p.clone(),
            config.node_id,
        )));
    }
    if quiet.timing().enabled() {
        tasks.push(tokio::spawn(quiet_loop(quiet.clone(), peers.clone())));
    }
    tasks.push(tokio::spawn(release_pins_loop(storage.clone())));
    tasks.push(tokio::spawn(log_budget_loop(
        exec.clone(),
        config.raft.snapshot_every_bytes,
    )));
    let starter = Arc::new(starter);
    tasks.push(tokio::spawn(groups::groups_loop(
        starter.clone(),
        map_cache.clone(),
    )));
    tasks.push(tokio::spawn(groups::collect_loop(service.clone(), starter)));
    tasks.push(tokio::spawn(key_lease_loop(service.clone())));
    tasks.push(tokio::spawn(map::keep(service.clone(), storage.clone())));
    tasks.push(tokio::spawn(rebalance_loop(
        service.clone(),
        storage.clone(),
        config.node_id,
        cc.auto_split,
    )));

    let addr_file = config.data_dir.join("http.addr");
    std::fs::write(&addr_file, http_addr.to_string())
        .map_err(io(format!("cannot write {}", addr_file.display())))?;
    if let Some(a) = internal_addr {
        let f = config.data_dir.join("internal.addr");
        std::fs::write(&f, a.to_string()).map_err(io(format!("cannot write {}", f.display())))?;
    }
    tracing::info!(
        node_id = config.node_id,
        %http_addr,
        internal = ?internal_addr,
        %public_url,
        groups = data_groups.len(),
        map_version = shard_map.version,
        data_dir = %config.data_dir.display(),
        "kubbi node serving"
    );
    Ok(NodeHandle {
        http_addr,
        internal_addr,
        public_url,
        admin_token,
        service,
        clock,
        incarnation,
        storage,
        stop,
        servers,
        tasks,
        exec,
    })
}

/// How long a peer may take to complete the internal port's TLS handshake.
const INTERNAL_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 flow-control windows and frame size of the internal port.
const INTERNAL_STREAM_WINDOW: u32 = 16 << 20;
const INTERNAL_CONNECTION_WINDOW: u32 = 64 << 20;
const INTERNAL_MAX_FRAME: u32 = 1 << 20;

/// TCP keepalive of the internal port's connections: probes after 30 s of silence, every 10 s,
/// and the connection is closed after 3 unanswered ones.
const INTERNAL_KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(30))
    .with_interval(Duration::from_secs(10))
    .with_retries(3);

/// The internal port: node-pair streams (`transport::stream`) and HTTP/2, plaintext or (with
/// `tls`) mutual TLS. A stream is told from HTTP/2 by its first byte, or under TLS by the ALPN
/// protocol the peer chose. HTTP/2 is tuned for many multiplexed streams per peer (a peer's
/// timed-out requests reset their streams; hyper's default tolerance of 20 pending resets would
/// drop the whole connection under load). A connection whose client presents no certificate
/// chaining to the CA ends in the handshake, before anything else is read.
fn serve_internal(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    streams: Arc<InternalState>,
    mut stop: watch::Receiver<bool>,
    tls: Option<Arc<crate::tls::ReloadingTls>>,
) -> JoinHandle<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "internal accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            let _ = stream.set_nodelay(true);
            // A peer that vanished without closing (power cut, cut link) is noticed by the
            // kernel's probes, so its connection and the work queued on it do not stay forever.
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&INTERNAL_KEEPALIVE);
            let svc = TowerToHyperService::new(app.clone());
            let mut conn_stop = stop.clone();
            let acceptor = tls.as_ref().map(|t| t.acceptor());
            let streams = streams.clone();
            tokio::spawn(async move {
                let mut b = Builder::new(TokioExecutor::new());
                // Windows sized for payload bodies (hyper's default is 1 MiB for the whole
                // connection, which turns an 8 MiB append into eight round trips of window
                // updates); peers are authenticated and a body is capped at 64 MiB anyway.
                b.http2()
                    .max_pending_accept_reset_streams(Some(4096))
                    .max_concurrent_streams(Some(4096))
                    .initial_stream_window_size(Some(INTERNAL_STREAM_WINDOW))
                    .initial_connection_window_size(Some(INTERNAL_CONNECTION_WINDOW))
                    .max_frame_size(Some(INTERNAL_MAX_FRAME));
                let r = match acceptor {
                    None => {
                        let mut first = [0u8; 1];
                        let peeked = tokio::time::timeout(
                            INTERNAL_HANDSHAKE_TIMEOUT,
                            stream.peek(&mut first),
                        );
                        let is_stream = tokio::select! {
                            p = peeked => matches!(p, Ok(Ok(1))) && first[0] == crate::transport::stream::MAGIC[0],
                            _ = conn_stop.changed() => return,
                        };
                        if is_stream {
                            crate::transport::stream::serve(stream, streams, conn_stop).await;
                            return;
                        }
                        tokio::select! {
                            r = b.serve_connection(TokioIo::new(stream), svc) => r,
                            _ = conn_stop.changed() => return,
                        }
                    }
                    Some(acceptor) => {
                        let handshake = tokio::time::timeout(
                            INTERNAL_HANDSHAKE_TIMEOUT,
                            acceptor.accept(stream),
                        );
                        let stream = tokio::select! {
                            h = handshake => match h {
                                Ok(Ok(s)) => s,
                                // A peer's certificate refused: worth an operator's eye. A
                                // peer that hung up mid-handshake (its request was dropped
                                // by a timeout) is not.
                                Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                                    tracing::warn!(error = %e, "internal TLS handshake refused");
                                    return;
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "internal TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::warn!("internal TLS handshake timed out");
                                    return;
                                }
                            },
                            _ = conn_stop.changed() => return,
                        };
                        if stream.get_ref().1.alpn_protocol()
                            == Some(crate::transport::stream::ALPN)
                        {
                            crate::transport::stream::serve(stream, streams, conn_stop).await;
                            return;
                        }
                        tokio::select! {
                            r = b.serve_connection(TokioIo::new(stream), svc) => r,
                            _ = conn_stop.changed() => return,
                        }
                    }
                };
                if let Err(e) = r {
                    tracing::debug!(error = %e, "internal connection ended");
                }
            });
        }
    })
}
