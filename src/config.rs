//! The node's configuration: one typed tree built from flags and `KUBBI_*` environment
//! variables (see `kubbi serve --help`), then checked by [`Config::validate`].

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use zeroize::Zeroizing;

use crate::ids::Millis;

const MIB: usize = 1 << 20;

/// Request limits of API.md. Every one is enforced and tested at and just past the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most files in one package.
    pub max_files: usize,
    /// Largest `ttl_seconds` accepted.
    pub max_ttl_seconds: u64,
    /// `ttl_seconds` when the request has none.
    pub default_ttl_seconds: u64,
    /// Largest `max_retrievals` accepted.
    pub max_retrievals_limit: u32,
    /// Largest serialized `metadata` object, in bytes.
    pub max_metadata_bytes: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest decoded payload (single content, or the sum of all files), in bytes.
    pub max_payload_bytes: usize,
    /// How long an ended kubbi stays visible to its producer.
    pub retention: Duration,
    /// How long a claim's `Idempotency-Key` answers retries with the same result.
    pub claim_idempotency_window: Duration,
    /// How long a create's `Idempotency-Key` answers retries with the first response.
    pub create_idempotency_window: Duration,
    /// Longest wait for a request's headers, and for the next request on an idle keep-alive
    /// connection (slowloris protection).
    pub header_timeout: Duration,
    /// Longest time a request body may take to arrive in full (`408` after it).
    pub body_timeout: Duration,
    /// Limits of API keys that do not set their own (all unlimited by default).
    pub key_defaults: crate::state::KeyLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_files: 16,
            max_ttl_seconds: 7 * 86_400,
            default_ttl_seconds: 900,
            max_retrievals_limit: 1000,
            max_metadata_bytes: 1024,
            max_body_bytes: 24 * MIB,
            max_payload_bytes: 16 * MIB,
            retention: Duration::from_secs(7 * 86_400),
            claim_idempotency_window: Duration::from_secs(60),
            create_idempotency_window: Duration::from_secs(86_400),
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            key_defaults: crate::state::KeyLimits::default(),
        }
    }
}

/// Raft timing of every group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftTuning {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and purge the log behind it) after this many entries.
    pub snapshot_every_entries: u64,
    /// ... or after a group's log took in this many bytes, whichever comes first: 20,000
    /// entries of 1 MiB payloads would hold 20 GB of log.
    pub snapshot_every_bytes: u64,
    /// A group idle this long goes quiet (`raft::quiet`); 0: never.
    pub quiet_after_ms: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_every_entries: 20_000,
            snapshot_every_bytes: 128 << 20,
            quiet_after_ms: 2000,
        }
    }
}

/// One member of the initial cluster, from `--bootstrap`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapMember {
    pub id: u64,
    /// Internal address `host:port`.
    pub internal: String,
    /// Locality label `region/zone`.
    pub zone: String,
}

/// Splits one `id=...` entry of a node list (`what` and `form` name it in errors): the node id
/// (a positive integer) and what follows the `=`.
fn id_entry<'a>(item: &'a str, what: &str, form: &str) -> Result<(u64, &'a str), String> {
    let (id, rest) = item
        .split_once('=')
        .ok_or_else(|| format!("{what} `{item}` is not {form}"))?;
    let id = id
        .trim()
        .parse()
        .ok()
        .filter(|i| *i > 0)
        .ok_or_else(|| format!("{what} `{item}`: the id must be a positive integer"))?;
    Ok((id, rest))
}

/// Parses `1=10.0.0.1:7070@eu/a,2=10.0.0.2:7070@eu/b,...` (the `@zone` part is optional).
///
/// # Errors
/// A message naming the malformed entry.
pub fn parse_bootstrap(s: &str) -> Result<Vec<BootstrapMember>, String> {
    let mut out: Vec<BootstrapMember> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (id, rest) = id_entry(item, "bootstrap entry", "id=host:port[@zone]")?;
        let (internal, zone) = match rest.split_once('@') {
            Some((a, z)) => (a.trim(), z.trim()),
            None => (rest.trim(), DEFAULT_ZONE),
        };
        if !internal.contains(':') {
            return Err(format!(
                "bootstrap entry `{item}`: the address must be host:port"
            ));
        }
        if out.iter().any(|m| m.id == id) {
            return Err(format!("bootstrap lists node {id} twice"));
        }
        out.push(BootstrapMember {
            id,
            internal: internal.to_string(),
            zone: zone.to_string(),
        });
    }
    Ok(out)
}

/// Parses `2=127.0.0.1:7801,3=127.0.0.1:7802` (`--peer-routes`).
///
/// # Errors
/// An entry that is not `id=host:port`, or a node named twice.
pub fn parse_peer_routes(s: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut out = BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (id, addr) = id_entry(item, "peer route", "id=host:port")?;
        let addr = addr.trim();
        if addr
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(format!(
                "peer route `{item}`: the address must be host:port"
            ));
        }
        if out.insert(id, addr.to_string()).is_some() {
            return Err(format!("peer routes name node {id} twice"));
        }
    }
    Ok(out)
}

/// The zone of a node that names none.
pub const DEFAULT_ZONE: &str = "default/default";

/// How a node takes part in a cluster. All empty: a single node with no internal port.
#[derive(Debug, Clone, Default)]
pub struct ClusterConfig {
    /// Internal (node-to-node) listen address; `None` runs a single node.
    pub internal_addr: Option<String>,
    /// The internal address peers use to reach this node (default: the bound address).
    pub advertise_internal: Option<String>,
    /// The public HTTP address other nodes and tools show for this node (default: bound).
    pub advertise_http: Option<String>,
    /// Locality label, `region/zone`.
    pub zone: String,
    /// Where this node dials some peers instead of the address they advertise (node id →
    /// `host:port`): a proxy on the path, such as the region simulator's links.
    pub peer_routes: BTreeMap<u64, String>,
    /// The initial members (first start of a new cluster; harmless on restarts).
    pub bootstrap: Vec<BootstrapMember>,
    /// The internal address of any member, to join an existing cluster.
    pub join: Option<String>,
    /// The shared secret of the internal port.
    pub secret: Option<Zeroizing<String>>,
    /// File holding the shared secret (mode 0600).
    pub secret_file: Option<PathBuf>,
    /// Replicas per shard (capped by the number of nodes).
    pub replication_factor: usize,
    /// Split data groups while there are fewer of them than active nodes (so a node that joins
    /// gets a group to lead). Read on the system group's leader.
    pub auto_split: bool,
    /// Mutual TLS on the internal port: this node's certificate chain (PEM). All three of
    /// `internal_tls_cert`, `internal_tls_key`, `internal_tls_ca` or none.
    pub internal_tls_cert: Option<PathBuf>,
    /// This node's private key for the internal port (PEM, mode 0600).
    pub internal_tls_key: Option<PathBuf>,
    /// The CA bundle (PEM) that signs every node's internal certificate.
    pub internal_tls_ca: Option<PathBuf>,
}

impl ClusterConfig {
    /// The internal port's mutual TLS files: all three flags, or none (plaintext h2c).
    ///
    /// # Errors
    /// Some of the three flags but not all, naming the missing ones.
    pub fn internal_tls(&self) -> Result<Option<crate::tls::TlsFiles>, String> {
        match (
            &self.internal_tls_cert,
            &self.internal_tls_key,
            &self.internal_tls_ca,
        ) {
            (Some(cert), Some(key), Some(ca)) => Ok(Some(crate::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: Some(ca.clone()),
            })),
            (None, None, None) => Ok(None),
            (cert, key, ca) => {
                let missing: Vec<&str> = [
                    (cert.is_none(), "--internal-tls-cert"),
                    (key.is_none(), "--internal-tls-key"),
                    (ca.is_none(), "--internal-tls-ca"),
                ]
                .into_iter()
                .filter_map(|(m, name)| m.then_some(name))
                .collect();
                Err(format!(
                    "mutual TLS on the internal port needs --internal-tls-cert, \
                     --internal-tls-key and --internal-tls-ca together; missing {}",
                    missing.join(" and ")
                ))
            }
        }
    }
}

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's raft id; stable for the life of its data directory.
    pub node_id: u64,
    /// Where the database, admin token and dev key ring live.
    pub data_dir: PathBuf,
    /// Public HTTP listen address (`host:port`; port 0 picks a free port).
    pub http_addr: String,
    /// Base of claim URLs; `None` means `http://<bound http address>`.
    pub public_url: Option<String>,
    /// File holding the admin token; `None` means `<data-dir>/admin-token`, created on first start.
    pub admin_token_file: Option<PathBuf>,
    /// The admin token itself (from `KUBBI_ADMIN_TOKEN`); takes precedence over the file.
    pub admin_token: Option<Zeroizing<String>>,
    /// The node key ring file; `None` means `<data-dir>/node-keys.json`, created on first start
    /// (dev mode, with a warning).
    pub node_key_file: Option<PathBuf>,
    /// Data raft groups of a new cluster; 0 means one per bootstrap member. Read only when the
    /// cluster is formed: afterwards the shard map in the system group decides.
    pub initial_groups: u16,
    pub limits: Limits,
    /// An idle kubbi actor is passivated after this long.
    pub actor_idle: Duration,
    pub raft: RaftTuning,
    pub cluster: ClusterConfig,
    /// Per-client rate limits of the public port.
    pub client_limits: ClientLimits,
    /// Browser origins allowed to call the producer and consumer routes (CORS); empty: off.
    pub cors_origins: Vec<String>,
    /// TLS certificate chain and private key (PEM) of the public port; both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Milliseconds added to this node's wall clock. For tests only: data made at another
    /// time (a fixture of an older data directory) can be served as if no time had passed.
    pub clock_offset_ms: i64,
}

/// Per-client-address rate limits (see `http::ratelimit`). Loopback peers are not limited
/// unless they are trusted proxies (then the forwarded client is).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientLimits {
    /// Requests to `/r/*` per second per client, and the burst; 0 turns the limit off.
    pub link_rate: f64,
    pub link_burst: f64,
    /// Failed authentications per minute per client, and the burst; 0 turns the limit off.
    pub auth_failures_per_minute: f64,
    pub auth_failure_burst: f64,
    /// Reverse proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<crate::http::ratelimit::Cidr>,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            link_rate: 100.0,
            link_burst: 500.0,
            auth_failures_per_minute: 10.0,
            auth_failure_burst: 20.0,
            trusted_proxies: Vec::new(),
        }
    }
}

impl Config {
    /// A configuration with every default, data in `data_dir`, HTTP on an ephemeral loopback port.
    pub fn for_dir(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            node_id: 1,
            data_dir: data_dir.into(),
            http_addr: "127.0.0.1:0".into(),
            public_url: None,
            admin_token_file: None,
            admin_token: None,
            node_key_file: None,
            initial_groups: 0,
            limits: Limits::default(),
            actor_idle: Duration::from_secs(10),
            raft: RaftTuning::default(),
            client_limits: ClientLimits::default(),
            cors_origins: Vec::new(),
            tls_cert: None,
            tls_key: None,
            clock_offset_ms: 0,
            cluster: ClusterConfig {
                zone: DEFAULT_ZONE.into(),
                replication_factor: 3,
                auto_split: true,
                ..ClusterConfig::default()
            },
        }
    }

    /// Checks values that flags alone cannot.
    ///
    /// # Errors
    /// A message naming the offending setting.
    pub fn validate(&self) -> Result<(), String> {
        let l = &self.limits;
        if self.node_id == 0 {
            return Err("node id must be at least 1".into());
        }
        if self.initial_groups > 4096 {
            return Err("initial groups must be at most 4096".into());
        }
        if l.max_files == 0 {
            return Err("max files must be at least 1".into());
        }
        if l.max_ttl_seconds == 0 || l.default_ttl_seconds == 0 {
            return Err("ttl limits must be at least 1 second".into());
        }
        if l.default_ttl_seconds > l.max_ttl_seconds {
            return Err("the default ttl exceeds the maximum ttl".into());
        }
        if l.max_retrievals_limit == 0 {
            return Err("max retrievals limit must be at least 1".into());
        }
        if l.max_payload_bytes > l.max_body_bytes {
            return Err("the payload limit exceeds the body limit".into());
        }
        if let Some(u) = &self.public_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err("public url must start with http:// or https://".into());
        }
        let c = &self.cluster;
        if c.internal_addr.is_none() && (c.join.is_some() || !c.bootstrap.is_empty()) {
            return Err("--bootstrap and --join need --internal-addr".into());
        }
        if c.join.is_some() && !c.bootstrap.is_empty() {
            return Err(
                "give either --bootstrap (a new cluster) or --join (an existing one)".into(),
            );
        }
        if !c.bootstrap.is_empty() && !c.bootstrap.iter().any(|m| m.id == self.node_id) {
            return Err(format!(
                "--bootstrap does not list this node ({})",
                self.node_id
            ));
        }
        if c.internal_addr.is_some() && c.secret.is_none() && c.secret_file.is_none() {
            return Err("the internal port needs a cluster secret (--cluster-secret-file or KUBBI_CLUSTER_SECRET)".into());
        }
        if c.internal_tls()?.is_some() && c.internal_addr.is_none() {
            return Err("--internal-tls-* need --internal-addr".into());
        }
        if c.replication_factor == 0 {
            return Err("the replication factor must be at least 1".into());
        }
        if self.raft.election_timeout_min_ms <= self.raft.heartbeat_ms
            || self.raft.election_timeout_max_ms <= self.raft.election_timeout_min_ms
        {
            return Err("raft timing: need heartbeat < election min < election max".into());
        }
        Ok(())
    }

    pub fn admin_token_path(&self) -> PathBuf {
        self.admin_token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin-token"))
    }

    pub fn node_key_path(&self) -> PathBuf {
        self.node_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("node-keys.json"))
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("db")
    }
}

/// `kubbi serve` flags. Each is also read from `KUBBI_<NAME>`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Data directory (database, admin token, dev key ring).
    #[arg(long, env = "KUBBI_DATA_DIR", default_value = "./kubbi-data")]
    pub data_dir: PathBuf,
    /// Public HTTP address. Port 0 picks a free port (written to <data-dir>/http.addr).
    #[arg(long, env = "KUBBI_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: String,
    /// Base URL of claim URLs, e.g. https://kubbi.example.com (default http://<http-addr>).
    #[arg(long, env = "KUBBI_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// File with the admin token (must not be readable by group or others).
    #[arg(long, env = "KUBBI_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The admin token itself (prefer the file; a flag would show in process listings).
    #[arg(long, env = "KUBBI_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Node key ring file (JSON). Default: <data-dir>/node-keys.json, generated in dev mode.
    #[arg(long, env = "KUBBI_NODE_KEY_FILE")]
    pub node_key_file: Option<PathBuf>,
    /// This node's id (stable for its data directory).
    #[arg(long, env = "KUBBI_NODE_ID", default_value_t = 1)]
    pub node_id: u64,
    /// Take the node id from the host name's trailing number plus one (StatefulSet pod
    /// `kubbi-2` is node 3).
    #[arg(long, env = "KUBBI_NODE_ID_FROM_HOSTNAME")]
    pub node_id_from_hostname: bool,
    /// Check the configuration (flags, environment, secret files) and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Data raft groups of a new cluster (0: one per bootstrap member); read only when the
    /// cluster is formed. `--shards` is its old name.
    #[arg(
        long = "initial-groups",
        alias = "shards",
        env = "KUBBI_INITIAL_GROUPS",
        default_value_t = 0
    )]
    pub initial_groups: u16,
    /// Most files in a package.
    #[arg(long, env = "KUBBI_MAX_FILES", default_value_t = 16)]
    pub max_files: usize,
    /// Largest ttl_seconds accepted.
    #[arg(long, env = "KUBBI_MAX_TTL_SECONDS", default_value_t = 604_800)]
    pub max_ttl_seconds: u64,
    /// Largest max_retrievals accepted.
    #[arg(long, env = "KUBBI_MAX_RETRIEVALS_LIMIT", default_value_t = 1000)]
    pub max_retrievals_limit: u32,
    /// Largest request body in bytes.
    #[arg(long, env = "KUBBI_MAX_BODY_BYTES", default_value_t = 24 * MIB)]
    pub max_body_bytes: usize,
    /// Largest decoded payload in bytes.
    #[arg(long, env = "KUBBI_MAX_PAYLOAD_BYTES", default_value_t = 16 * MIB)]
    pub max_payload_bytes: usize,
    /// How long ended kubbis stay visible, in seconds.
    #[arg(long, env = "KUBBI_RETENTION_SECONDS", default_value_t = 604_800)]
    pub retention_seconds: u64,
    /// Claim Idempotency-Key window, in seconds.
    #[arg(long, env = "KUBBI_CLAIM_IDEMPOTENCY_SECONDS", default_value_t = 60)]
    pub claim_idempotency_seconds: u64,
    /// Longest wait for request headers, and for the next request on an idle connection.
    #[arg(long, env = "KUBBI_HEADER_TIMEOUT_SECONDS", default_value_t = 30)]
    pub header_timeout_seconds: u64,
    /// Longest time a request body may take to arrive (408 request_timeout after it).
    #[arg(long, env = "KUBBI_BODY_TIMEOUT_SECONDS", default_value_t = 60)]
    pub body_timeout_seconds: u64,
    /// Requests to claim links (/r/*) per second per client address; 0 turns the limit off.
    #[arg(long, env = "KUBBI_IP_LINK_RATE", default_value_t = 100.0)]
    pub ip_link_rate: f64,
    /// Burst of requests to claim links per client address.
    #[arg(long, env = "KUBBI_IP_LINK_BURST", default_value_t = 500.0)]
    pub ip_link_burst: f64,
    /// Failed authentications per minute per client address before its authenticated requests
    /// get 429 (burst 2x); 0 turns the limit off.
    #[arg(
        long,
        env = "KUBBI_IP_AUTH_FAILURES_PER_MINUTE",
        default_value_t = 10.0
    )]
    pub ip_auth_failures_per_minute: f64,
    /// Default quota of an API key: kubbis not yet ended, over the whole cluster (0 = none).
    #[arg(long, env = "KUBBI_KEY_MAX_ACTIVE", default_value_t = 0)]
    pub key_max_active: u64,
    /// Default quota of an API key: sealed bytes of its active kubbis, cluster-wide (0 = none).
    #[arg(long, env = "KUBBI_KEY_MAX_BYTES", default_value_t = 0)]
    pub key_max_bytes: u64,
    /// Default quota of an API key: creates per UTC day, cluster-wide (0 = none).
    #[arg(long, env = "KUBBI_KEY_MAX_CREATES_PER_DAY", default_value_t = 0)]
    pub key_max_creates_per_day: u64,
    /// Default rate limit of an API key: authenticated requests per second, cluster-wide
    /// (each of N active nodes allows 1/N of it, burst 2 s worth; 0 = none).
    #[arg(long, env = "KUBBI_KEY_RATE", default_value_t = 0)]
    pub key_rate: u32,
    /// Browser origins (`https://app.example.com`, comma-separated or repeated) allowed to
    /// call /api/* and /r/* cross-origin; none by default (CORS off). Never /admin/*.
    #[arg(long, env = "KUBBI_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origin: Vec<String>,
    /// Reverse proxy addresses or CIDR blocks whose X-Forwarded-For names the client
    /// (comma-separated or repeated).
    #[arg(long, env = "KUBBI_TRUSTED_PROXY", value_delimiter = ',')]
    pub trusted_proxy: Vec<String>,
    /// TLS certificate chain (PEM) for the public port; reloaded when the file changes.
    #[arg(long, env = "KUBBI_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM, mode 0600) for the public port.
    #[arg(long, env = "KUBBI_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Idle time after which a kubbi actor is passivated, in milliseconds.
    #[arg(long, env = "KUBBI_ACTOR_IDLE_MS", default_value_t = 10_000)]
    pub actor_idle_ms: u64,
    /// Shifts this node's wall clock by this many milliseconds (tests only).
    #[arg(
        long,
        env = "KUBBI_CLOCK_OFFSET_MS",
        default_value_t = 0,
        allow_hyphen_values = true,
        hide = true
    )]
    pub clock_offset_ms: i64,
    /// Internal (node-to-node) listen address; enables cluster mode.
    #[arg(long, env = "KUBBI_INTERNAL_ADDR")]
    pub internal_addr: Option<String>,
    /// Internal address peers should use (default: the bound internal address).
    #[arg(long, env = "KUBBI_ADVERTISE_INTERNAL")]
    pub advertise_internal: Option<String>,
    /// Public HTTP address shown to peers and tools (default: the bound HTTP address).
    #[arg(long, env = "KUBBI_ADVERTISE_HTTP")]
    pub advertise_http: Option<String>,
    /// Locality label `region/zone`; replicas of a shard go to distinct zones when possible.
    #[arg(long, env = "KUBBI_ZONE", default_value = DEFAULT_ZONE)]
    pub zone: String,
    /// Dial these peers here instead of at the internal address they advertise:
    /// `2=host:port,3=host:port` (a proxy on the path, e.g. `kubbi-netsim` between regions).
    /// With internal mTLS the peer's certificate must name the route's host.
    #[arg(long, env = "KUBBI_PEER_ROUTES")]
    pub peer_routes: Option<String>,
    /// Initial members of a new cluster: `1=host:port@region/zone,2=...` (internal addresses).
    #[arg(long, env = "KUBBI_BOOTSTRAP")]
    pub bootstrap: Option<String>,
    /// Internal address of any member of an existing cluster to join.
    #[arg(long, env = "KUBBI_JOIN")]
    pub join: Option<String>,
    /// File with the cluster secret shared by all nodes (mode 0600).
    #[arg(long, env = "KUBBI_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// The cluster secret itself (prefer the file).
    #[arg(long, env = "KUBBI_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// Replicas per shard, capped by the number of nodes.
    #[arg(long, env = "KUBBI_REPLICATION_FACTOR", default_value_t = 3)]
    pub replication_factor: usize,
    /// Split data groups online while there are fewer of them than active nodes, so a node
    /// that joins gets a group to lead (`false`: the groups stay as they are unless an operator
    /// splits them). Read on the system group's leader.
    #[arg(long, env = "KUBBI_AUTO_SPLIT", default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_split: bool,
    /// Mutual TLS on the internal port: this node's certificate chain (PEM), signed by the
    /// --internal-tls-ca and naming the host of its internal address (DNS or IP SAN).
    /// Give all three --internal-tls-* or none; reloaded when the files change.
    #[arg(long, env = "KUBBI_INTERNAL_TLS_CERT")]
    pub internal_tls_cert: Option<PathBuf>,
    /// This node's private key for the internal port (PEM, mode 0600).
    #[arg(long, env = "KUBBI_INTERNAL_TLS_KEY")]
    pub internal_tls_key: Option<PathBuf>,
    /// CA bundle (PEM) that signs every node's internal certificate; peers must present a
    /// certificate chaining to it.
    #[arg(long, env = "KUBBI_INTERNAL_TLS_CA")]
    pub internal_tls_ca: Option<PathBuf>,
    /// Raft heartbeat interval in milliseconds (election timeouts are 5 to 10 heartbeats).
    #[arg(long, env = "KUBBI_RAFT_HEARTBEAT_MS", default_value_t = 100)]
    pub raft_heartbeat_ms: u64,
    /// Build a snapshot of a group (and purge its log behind it) every this many entries.
    #[arg(long, env = "KUBBI_RAFT_SNAPSHOT_EVERY", default_value_t = 20_000)]
    pub raft_snapshot_every: u64,
    /// ... or once its log took in this many MiB, whichever comes first.
    #[arg(long, env = "KUBBI_RAFT_SNAPSHOT_EVERY_MIB", default_value_t = 128)]
    pub raft_snapshot_every_mib: u64,
    /// A raft group with no writes for this many milliseconds, applied and with every replica
    /// caught up, goes quiet: no heartbeats, no election timers; one liveness ping per node
    /// pair watches its leader instead, and any write wakes it. 0 keeps every group ticking.
    #[arg(long, env = "KUBBI_RAFT_QUIET_AFTER_MS", default_value_t = 2000)]
    pub raft_quiet_after_ms: u64,
}

impl ServeArgs {
    /// Builds the configuration (pure: no file is read here).
    ///
    /// # Errors
    /// A malformed `--bootstrap` list.
    pub fn into_config(self) -> Result<Config, String> {
        let mut c = Config::for_dir(self.data_dir);
        c.node_id = self.node_id;
        c.http_addr = self.http_addr;
        c.public_url = self.public_url.map(|u| u.trim_end_matches('/').to_string());
        c.admin_token_file = self.admin_token_file;
        c.admin_token = self.admin_token.map(Zeroizing::new);
        c.node_key_file = self.node_key_file;
        c.initial_groups = self.initial_groups;
        c.limits.max_files = self.max_files;
        c.limits.max_ttl_seconds = self.max_ttl_seconds;
        c.limits.default_ttl_seconds = c.limits.default_ttl_seconds.min(self.max_ttl_seconds);
        c.limits.max_retrievals_limit = self.max_retrievals_limit;
        c.limits.max_body_bytes = self.max_body_bytes;
        c.limits.max_payload_bytes = self.max_payload_bytes;
        c.limits.retention = Duration::from_secs(self.retention_seconds);
        c.limits.claim_idempotency_window = Duration::from_secs(self.claim_idempotency_seconds);
        c.limits.header_timeout = Duration::from_secs(self.header_timeout_seconds.max(1));
        c.limits.body_timeout = Duration::from_secs(self.body_timeout_seconds.max(1));
        let rate = |v: f64, what: &str| {
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(format!("{what} must be a number >= 0"))
            }
        };
        let unless_zero = |v: u64| (v > 0).then_some(v);
        c.limits.key_defaults = crate::state::KeyLimits {
            max_active: unless_zero(self.key_max_active),
            max_bytes: unless_zero(self.key_max_bytes),
            max_creates_per_day: unless_zero(self.key_max_creates_per_day),
            rate_per_second: (self.key_rate > 0).then_some(self.key_rate),
        };
        c.cors_origins = self
            .cors_origin
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| crate::http::cors::parse_origin(s))
            .collect::<Result<_, String>>()?;
        c.tls_cert = self.tls_cert;
        c.tls_key = self.tls_key;
        c.clock_offset_ms = self.clock_offset_ms;
        c.client_limits = ClientLimits {
            link_rate: rate(self.ip_link_rate, "--ip-link-rate")?,
            link_burst: rate(self.ip_link_burst, "--ip-link-burst")?.max(1.0),
            auth_failures_per_minute: rate(
                self.ip_auth_failures_per_minute,
                "--ip-auth-failures-per-minute",
            )?,
            auth_failure_burst: (self.ip_auth_failures_per_minute * 2.0).max(1.0),
            trusted_proxies: self
                .trusted_proxy
                .iter()
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.parse())
                .collect::<Result<_, String>>()?,
        };
        c.actor_idle = Duration::from_millis(self.actor_idle_ms);
        c.raft.heartbeat_ms = self.raft_heartbeat_ms;
        c.raft.election_timeout_min_ms = self.raft_heartbeat_ms * 5;
        c.raft.election_timeout_max_ms = self.raft_heartbeat_ms * 10;
        c.raft.snapshot_every_entries = self.raft_snapshot_every.max(1);
        c.raft.snapshot_every_bytes = self.raft_snapshot_every_mib.max(1).saturating_mul(1 << 20);
        c.raft.quiet_after_ms = self.raft_quiet_after_ms;
        c.cluster = ClusterConfig {
            internal_addr: self.internal_addr,
            advertise_internal: self.advertise_internal,
            advertise_http: self.advertise_http,
            zone: self.zone,
            peer_routes: match self.peer_routes {
                Some(r) => parse_peer_routes(&r)?,
                None => BTreeMap::new(),
            },
            bootstrap: match self.bootstrap {
                Some(b) => parse_bootstrap(&b)?,
                None => Vec::new(),
            },
            join: self.join,
            secret: self.cluster_secret.map(Zeroizing::new),
            secret_file: self.cluster_secret_file,
            replication_factor: self.replication_factor,
            auto_split: self.auto_split,
            internal_tls_cert: self.internal_tls_cert,
            internal_tls_key: self.internal_tls_key,
            internal_tls_ca: self.internal_tls_ca,
        };
        Ok(c)
    }
}

/// The node id of a StatefulSet-style host name: its trailing number plus one.
pub fn node_id_from_hostname(host: &str) -> Option<u64> {
    let host = host.trim().split('.').next().unwrap_or("");
    let digits: String = host
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits.parse::<u64>().ok().map(|n| n + 1)
}

/// Milliseconds of a duration, saturating.
pub fn millis(d: Duration) -> Millis {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Writes a new secret file readable only by its owner.
///
/// # Errors
/// When the file exists already or cannot be written.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// Reads a secret file, refusing one that group or others can read.
///
/// # Errors
/// When the file cannot be read or its permissions are too open.
pub fn read_secret_file(path: &Path) -> std::io::Result<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} is readable by group or others (mode {:o}); chmod 600 it",
                    path.display(),
                    mode & 0o777
                ),
            ));
        }
    }
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_api_md() {
        let c = Config::for_dir("/tmp/x");
        c.validate().expect("valid");
        assert_eq!(c.limits.max_files, 16);
        assert_eq!(c.limits.max_ttl_seconds, 604_800);
        assert_eq!(c.limits.default_ttl_seconds, 900);
        assert_eq!(c.limits.max_retrievals_limit, 1000);
        assert_eq!(c.limits.max_metadata_bytes, 1024);
        assert_eq!(c.limits.max_body_bytes, 24 * MIB);
        assert_eq!(c.limits.max_payload_bytes, 16 * MIB);
    }

    #[test]
    fn validate_rejects_inconsistent_settings() {
        let mut c = Config::for_dir("/tmp/x");
        c.limits.max_payload_bytes = c.limits.max_body_bytes + 1;
        assert!(c.validate().is_err());
        let mut c = Config::for_dir("/tmp/x");
        c.initial_groups = 4097;
        assert!(c.validate().is_err());
        let mut c = Config::for_dir("/tmp/x");
        c.public_url = Some("ftp://x".into());
        assert!(c.validate().is_err());
    }

    #[test]
    fn node_ids_from_host_names() {
        assert_eq!(node_id_from_hostname("kubbi-0"), Some(1));
        assert_eq!(
            node_id_from_hostname("kubbi-12.kubbi-internal.default.svc"),
            Some(13)
        );
        assert_eq!(node_id_from_hostname("kubbi"), None);
    }

    #[test]
    fn peer_routes_parse_and_refuse_what_is_not_id_host_port() {
        let r = parse_peer_routes("2=127.0.0.1:7801, 3=proxy.eu:9000,").expect("parses");
        assert_eq!(r.len(), 2);
        assert_eq!(r[&2], "127.0.0.1:7801");
        assert_eq!(r[&3], "proxy.eu:9000");
        for bad in [
            "2",
            "0=h:1",
            "x=h:1",
            "2=h",
            "2=:1",
            "2=h:99999",
            "2=h:1,2=h:2",
        ] {
            assert!(parse_peer_routes(bad).is_err(), "{bad} is refused");
        }
        assert!(parse_peer_routes("").expect("empty").is_empty());
    }

    #[test]
    fn bootstrap_lists_parse() {
        let m = parse_bootstrap("1=10.0.0.1:7070@eu/a, 2=h2:7070").expect("parses");
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].zone, "eu/a");
        assert_eq!(m[1].zone, DEFAULT_ZONE);
        for bad in ["x=1:2", "0=a:1", "1=nohost", "1=a:1,1=b:2", "1"] {
            assert!(parse_bootstrap(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cluster_flags_are_checked() {
        let mut c = Config::for_dir("/tmp/x");
        c.cluster.join = Some("a:1".into());
        assert!(c.validate().is_err(), "join without an internal address");
        c.cluster.internal_addr = Some("127.0.0.1:0".into());
        assert!(c.validate().is_err(), "no secret");
        c.cluster.secret = Some(Zeroizing::new("s".repeat(32)));
        c.validate().expect("valid");
        c.cluster.bootstrap = parse_bootstrap("2=a:1").expect("parses");
        assert!(c.validate().is_err(), "both join and bootstrap");
        c.cluster.join = None;
        assert!(c.validate().is_err(), "bootstrap without this node");
    }

    #[test]
    fn internal_tls_flags_go_together() {
        let mut c = Config::for_dir("/tmp/x");
        c.cluster.internal_addr = Some("127.0.0.1:0".into());
        c.cluster.secret = Some(Zeroizing::new("s".repeat(32)));
        c.cluster.internal_tls_cert = Some("/c.pem".into());
        let err = c.validate().expect_err("partial");
        assert!(
            err.contains("missing --internal-tls-key and --internal-tls-ca"),
            "{err}"
        );
        c.cluster.internal_tls_key = Some("/k.pem".into());
        let err = c.validate().expect_err("partial");
        assert!(err.contains("missing --internal-tls-ca"), "{err}");
        c.cluster.internal_tls_ca = Some("/ca.pem".into());
        c.validate().expect("all three");
        assert_eq!(
            c.cluster.internal_tls().expect("valid"),
            Some(crate::tls::TlsFiles {
                cert: "/c.pem".into(),
                key: "/k.pem".into(),
                ca: Some("/ca.pem".into()),
            })
        );
        c.cluster.internal_addr = None;
        assert!(c.validate().is_err(), "mTLS without an internal port");
    }

    #[test]
    fn secret_files_are_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s");
        write_secret_file(&p, b"hunter2\n").expect("writes");
        assert_eq!(read_secret_file(&p).expect("reads"), "hunter2");
        assert!(write_secret_file(&p, b"again").is_err(), "never overwrites");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            assert!(read_secret_file(&p).is_err());
        }
    }
}
