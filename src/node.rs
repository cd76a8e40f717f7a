//! The composition root: opens storage, starts every raft group, the actors, the sweepers and
//! the HTTP server, and stops them in order.
//!
//! ```text
//!   Config ─▶ admin token, key ring ─▶ Storage (RocksDB) ─▶ raft groups 0..shards + system
//!          ─▶ ShardActor per shard ─▶ sweeper per group ─▶ Service ─▶ axum on http_addr
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorRef};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use crate::actor::{ShardActor, ShardCtx, ShardMsg};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, read_secret_file, write_secret_file};
use crate::crypto::{self, KeyRing};
use crate::http::{AppState, router};
use crate::ids::{GroupId, RequestId, SYSTEM_GROUP};
use crate::raft::client::{self, known_leader};
use crate::raft::state_machine::ApplyObserver;
use crate::raft::{LogStore, NetworkFactory, NodeInfo, Raft, StateMachine};
use crate::service::{KeyCache, Service, ShardHandle};
use crate::state::{Command, Outcome, next_timer_due};
use crate::storage::{CF_RAFT_META, Storage, group_key};

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
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Io { what, source }
}

/// Node-level records kept beside the raft metadata (not part of any group).
const NODE_META_GROUP: GroupId = 0xfffe;

/// A running node.
pub struct NodeHandle {
    pub http_addr: SocketAddr,
    pub public_url: String,
    /// The admin token, for tools and tests that start a node in-process.
    pub admin_token: Zeroizing<String>,
    pub service: Service,
    pub clock: SystemClock,
    storage: Arc<Storage>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
    rafts: Vec<Raft>,
    actors: Vec<ActorRef<ShardMsg>>,
}

impl NodeHandle {
    /// The node's storage (tests inspect raw state through it).
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// Serves until `shutdown` resolves, then stops.
    pub async fn run_until(self, shutdown: impl std::future::Future<Output = ()>) {
        shutdown.await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }

    /// Stops HTTP, sweepers, actors and raft groups, in that order.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
        for t in self.tasks {
            let _ = t.await;
        }
        for a in &self.actors {
            a.stop(None);
        }
        for r in &self.rafts {
            let _ = r.shutdown().await;
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
             production nodes should load an operator-supplied --node-key-file"
        );
    }
    Ok(ring)
}

/// Checks (or records, on first start) which node and how many shards this data dir holds.
fn check_identity(storage: &Storage, config: &Config) -> Result<u16, NodeError> {
    let cf = storage.cf(CF_RAFT_META);
    let key = group_key(NODE_META_GROUP, b"identity");
    let db = storage.db();
    let stored = db
        .get_cf(cf, &key)
        .map_err(|e| NodeError::Storage(e.into()))?;
    match stored {
        Some(b) => {
            let (node_id, shards): (u64, u16) = crate::codec::decode("node identity", &b)
                .map_err(|e| NodeError::Config(e.to_string()))?;
            if node_id != config.node_id {
                return Err(NodeError::Config(format!(
                    "this data directory belongs to node {node_id}, not node {}",
                    config.node_id
                )));
            }
            if shards != config.shards {
                tracing::warn!(
                    stored = shards,
                    configured = config.shards,
                    "the shard count is fixed at initialisation; using the stored count"
                );
            }
            Ok(shards)
        }
        None => {
            db.put_cf(
                cf,
                &key,
                crate::codec::encode(&(config.node_id, config.shards)),
            )
            .map_err(|e| NodeError::Storage(e.into()))?;
            Ok(config.shards)
        }
    }
}

fn raft_config(config: &Config) -> Result<Arc<openraft::Config>, NodeError> {
    let c = openraft::Config {
        cluster_name: "kubbi".into(),
        heartbeat_interval: config.raft.heartbeat_ms,
        election_timeout_min: config.raft.election_timeout_min_ms,
        election_timeout_max: config.raft.election_timeout_max_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(
            config.raft.snapshot_every_entries,
        ),
        max_in_snapshot_log_to_keep: 500,
        ..Default::default()
    };
    c.validate()
        .map(Arc::new)
        .map_err(|e| NodeError::Config(e.to_string()))
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
    mut stop: watch::Receiver<bool>,
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
                        Err(e) => tracing::warn!(group, error = %e, "sweep not committed"),
                    }
                }
                Ok(Some(due)) => wait = wait.min(Duration::from_millis(due - now)),
                Ok(None) => {}
                Err(e) => tracing::error!(group, error = %e, "cannot read the timer index"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Starts a node and returns once it serves HTTP.
///
/// # Errors
/// Invalid configuration, unreadable secrets, a data directory of another node, storage or raft
/// start-up failures, or an address that cannot be bound.
pub async fn start(config: Config) -> Result<NodeHandle, NodeError> {
    config.validate().map_err(NodeError::Config)?;
    std::fs::create_dir_all(&config.data_dir).map_err(io(format!(
        "cannot create the data directory {}",
        config.data_dir.display()
    )))?;
    let admin_token = load_admin_token(&config)?;
    let keyring = load_key_ring(&config)?;
    let storage = Storage::open(&config.db_path())?;
    let shards = check_identity(&storage, &config)?;
    let clock = SystemClock::default();
    let dyn_clock: Arc<dyn Clock> = Arc::new(clock.clone());

    let listener = tokio::net::TcpListener::bind(&config.http_addr)
        .await
        .map_err(io(format!("cannot listen on {}", config.http_addr)))?;
    let http_addr = listener
        .local_addr()
        .map_err(io("cannot read the bound address"))?;
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{http_addr}"));

    let keys = KeyCache::load(storage.clone())?;
    let observer: Arc<dyn ApplyObserver> = keys.clone();
    let rcfg = raft_config(&config)?;
    let me = NodeInfo {
        http: http_addr.to_string(),
        internal: String::new(),
        zone: "local/local".into(),
    };

    let groups: Vec<GroupId> = (0..shards).chain(std::iter::once(SYSTEM_GROUP)).collect();
    let mut rafts = Vec::with_capacity(groups.len());
    for &g in &groups {
        let raft = Raft::new(
            config.node_id,
            rcfg.clone(),
            NetworkFactory::new(g),
            LogStore::new(storage.clone(), g),
            StateMachine::new(storage.clone(), g, observer.clone()),
        )
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
        if !raft
            .is_initialized()
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?
        {
            let members = BTreeMap::from([(config.node_id, me.clone())]);
            raft.initialize(members)
                .await
                .map_err(|e| NodeError::Raft(format!("group {g}: {e}")))?;
        }
        rafts.push(raft);
    }
    for (raft, g) in rafts.iter().zip(&groups) {
        raft.wait(Some(Duration::from_secs(30)))
            .current_leader(config.node_id, "leader elected")
            .await
            .map_err(|e| NodeError::Raft(format!("group {g} elected no leader: {e}")))?;
        raft.wait_for_recovery(Some(Duration::from_secs(30)))
            .await
            .map_err(|e| NodeError::Raft(format!("group {g} did not recover: {e}")))?;
    }

    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut actors = Vec::new();
    let mut handles = Vec::new();
    for (raft, &g) in rafts.iter().zip(&groups) {
        tasks.push(tokio::spawn(sweep_loop(
            config.node_id,
            g,
            raft.clone(),
            storage.clone(),
            dyn_clock.clone(),
            stop_rx.clone(),
        )));
        if g == SYSTEM_GROUP {
            continue;
        }
        let ctx = Arc::new(ShardCtx {
            group: g,
            raft: raft.clone(),
            storage: storage.clone(),
            clock: dyn_clock.clone(),
            idle: config.actor_idle,
        });
        let (actor, _) = Actor::spawn(None, ShardActor, ctx.clone())
            .await
            .map_err(|e| NodeError::Raft(format!("cannot start shard actor {g}: {e}")))?;
        actors.push(actor.clone());
        handles.push(ShardHandle {
            group: g,
            raft: raft.clone(),
            actor,
            ctx,
        });
    }
    let system = rafts
        .last()
        .cloned()
        .ok_or_else(|| NodeError::Raft("no system group".into()))?;

    let service = Service::new(
        config.node_id,
        storage.clone(),
        dyn_clock.clone(),
        config.limits.clone(),
        keyring,
        handles,
        system,
        keys,
    );
    let app = router(AppState {
        service: service.clone(),
        admin_token_hash: crypto::sha256(admin_token.as_bytes()),
        public_url: public_url.clone().into(),
    });
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(async move {
        let shutdown = async move {
            let _ = server_stop.changed().await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    let addr_file = config.data_dir.join("http.addr");
    std::fs::write(&addr_file, http_addr.to_string())
        .map_err(io(format!("cannot write {}", addr_file.display())))?;
    tracing::info!(
        node_id = config.node_id,
        %http_addr,
        %public_url,
        shards,
        data_dir = %config.data_dir.display(),
        "kubbi node serving"
    );
    Ok(NodeHandle {
        http_addr,
        public_url,
        admin_token,
        service,
        clock,
        storage,
        stop,
        server,
        tasks,
        rafts,
        actors,
    })
}
