//! Closed-loop load generator for a kubbi node.
//!
//! Starts a fresh node (the `kubbi` binary of this build, data in a temp dir) unless `--url` is
//! given, then for each concurrency level runs each workload for `--seconds` and reports ops/s
//! and latency percentiles (HDR histograms). Optionally measures the node's RSS while it holds
//! `--rss N` active kubbis. `--prefill N` creates N active kubbis (untimed) before the
//! workloads, so they run against a node that holds them; `preview` then reads random ones.
//!
//! ```text
//! cargo bench --bench loadgen -- --clients 1,16,64 --seconds 10 --payload 1024 --rss 100000
//! ```
//!
//! With `--cluster DIR --region R` (a cluster started by `cluster/up --regions ...`) the clients
//! sit in region R and use that region's nodes only; whatever those nodes forward to other
//! regions crosses the simulator's links.
//!
//! Workloads: `create` (single content of `--payload` bytes, max_retrievals 1), `claim` (claims
//! kubbis created beforehand, each once: every claim burns), `claim-n` (kubbis of
//! max_retrievals 3 created beforehand, each claimed three times), `preview` (GET /r/:token),
//! `mixed` (create, preview, claim of the same kubbi in sequence).
//!
//! The same closed loop drives two reference systems for `benches/compare`:
//! `--target redis ADDR` (RESP over one TCP connection per client: SET EX, GETDEL, a Lua
//! remaining-reads script, GET) and `--target etcd URL[,URL...]` (etcd's v3 JSON gateway: put
//! with a lease, txn get+delete, range + compare-and-swap of a counter, range), or the same
//! operations over etcd's native gRPC API with `--target etcd-grpc URL[,URL...]`; see
//! `targets/`. `--server-pids` adds the CPU time the servers, the load generator and everything
//! else used during each timed window.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

#[path = "targets/etcd.rs"]
mod etcd;
#[path = "targets/etcd_grpc.rs"]
mod etcd_grpc;
#[path = "targets/redis.rs"]
mod redis;

struct Opts {
    url: Option<String>,
    /// A cluster started by `cluster/up`: clients spread over its nodes.
    cluster: Option<PathBuf>,
    /// With `--cluster` started with `--regions`: the clients sit in this region and use its
    /// nodes (`regions.R.endpoints` of cluster.json).
    region: Option<String>,
    clients: Vec<usize>,
    seconds: u64,
    payload: usize,
    workloads: Vec<String>,
    rss: Option<usize>,
    /// Active kubbis created (untimed) before the workloads run; `preview` then reads tokens
    /// drawn at random from them.
    prefill: usize,
    out: Option<PathBuf>,
    /// `kubbi` (default), `redis` or `etcd`, with the address of the latter two.
    target: String,
    target_addr: String,
    /// Untimed setup size for claim workloads (default: from the create rate measured at the
    /// same concurrency in this run).
    pool: Option<usize>,
    /// Claimable items made before a claim level, as a multiple of what the measured create
    /// rate would claim in `--seconds` (default 2.5; `benches/ab --quick` uses less).
    pool_headroom: f64,
    /// Server processes whose CPU time is reported per level.
    server_pids: Vec<u32>,
    /// Free-form label copied into the JSON output.
    label: String,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        url: None,
        cluster: None,
        region: None,
        clients: vec![1, 16, 64],
        seconds: 10,
        payload: 1024,
        workloads: vec!["create".into(), "claim".into(), "preview".into()],
        rss: None,
        prefill: 0,
        out: None,
        target: "kubbi".into(),
        target_addr: String::new(),
        pool: None,
        pool_headroom: 2.5,
        server_pids: Vec::new(),
        label: String::new(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = |i: usize| args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--url" => o.url = Some(val(i)),
            "--cluster" => o.cluster = Some(PathBuf::from(val(i))),
            "--region" => o.region = Some(val(i)),
            "--clients" => o.clients = val(i).split(',').filter_map(|c| c.parse().ok()).collect(),
            "--seconds" => o.seconds = val(i).parse().unwrap_or(10),
            "--payload" => o.payload = val(i).parse().unwrap_or(1024),
            "--workloads" => o.workloads = val(i).split(',').map(String::from).collect(),
            "--rss" => o.rss = val(i).parse().ok(),
            "--prefill" => o.prefill = val(i).parse().unwrap_or(0),
            "--out" => o.out = Some(PathBuf::from(val(i))),
            "--target" => {
                o.target = val(i);
                if o.target != "kubbi" {
                    o.target_addr = args.get(i + 2).cloned().unwrap_or_default();
                    i += 1;
                }
            }
            "--pool" => o.pool = val(i).parse().ok(),
            "--pool-headroom" => o.pool_headroom = val(i).parse().unwrap_or(2.5),
            "--server-pids" => {
                o.server_pids = val(i).split(',').filter_map(|p| p.parse().ok()).collect()
            }
            "--label" => o.label = val(i),
            // `cargo bench` passes --bench; anything else unknown is ignored too.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

struct Node {
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
    url: String,
    admin: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn start_node() -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let child = Command::new(env!("CARGO_BIN_EXE_kubbi"))
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--actor-idle-ms",
            "10000",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("KUBBI_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn kubbi");
    let addr_file = dir.path().join("http.addr");
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file)
            && !a.is_empty()
        {
            break a;
        }
        assert!(Instant::now() < deadline, "node did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let admin = std::fs::read_to_string(dir.path().join("admin-token"))
        .expect("admin token")
        .trim()
        .to_string();
    Node {
        child: Some(child),
        _dir: Some(dir),
        url: format!("http://{addr}"),
        admin,
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[derive(Clone)]
struct Ctx {
    http: reqwest::Client,
    url: String,
    key: String,
    payload: String,
}

impl Ctx {
    /// The same context aimed at another node.
    fn on(&self, url: &str) -> Self {
        Self {
            url: url.to_string(),
            ..self.clone()
        }
    }

    async fn create(&self, max: Option<u32>, ttl: u64) -> Option<String> {
        self.try_create(max, ttl).await.ok()
    }

    /// A create; on failure, what kind of failure it was (see [`failure`]).
    async fn try_create(&self, max: Option<u32>, ttl: u64) -> Result<String, String> {
        let r = self
            .http
            .post(format!("{}/api/v1/kubbis", self.url))
            .bearer_auth(&self.key)
            .json(&json!({"content": self.payload, "max_retrievals": max, "ttl_seconds": ttl}))
            .send()
            .await
            .map_err(|e| transport_failure(&e))?;
        let body = expect_status(r, 201).await?;
        let v: Value = serde_json::from_slice(&body).map_err(|_| "create: body not JSON")?;
        v["claim_token"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| "create: no claim_token".into())
    }

    async fn claim(&self, token: &str) -> Op {
        let r = self
            .http
            .post(format!("{}/r/{token}/claim", self.url))
            .send()
            .await
            .map_err(|e| transport_failure(&e))?;
        expect_status(r, 200).await.map(drop)
    }

    async fn preview(&self, token: &str) -> Op {
        let r = self
            .http
            .get(format!("{}/r/{token}", self.url))
            .send()
            .await
            .map_err(|e| transport_failure(&e))?;
        expect_status(r, 200).await.map(drop)
    }
}

/// The outcome of one timed operation: on failure, its kind (an HTTP status with the error
/// envelope's `error` code, a transport failure, or a target's own reason). Kinds are counted
/// per level, so a run shows why operations failed, not only how many.
type Op = Result<(), String>;

/// The body of a response with the expected status; otherwise the failure kind.
async fn expect_status(r: reqwest::Response, want: u16) -> Result<bytes::Bytes, String> {
    let status = r.status().as_u16();
    let body = r.bytes().await.map_err(|e| transport_failure(&e))?;
    if status == want {
        return Ok(body);
    }
    let code = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(String::from))
        .unwrap_or_else(|| "-".into());
    Err(format!("http {status} {code}"))
}

fn transport_failure(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connect".into()
    } else if e.is_body() || e.is_decode() {
        "body".into()
    } else {
        "transport".into()
    }
}

/// One Redis command, successful when `ok` accepts its reply; a failure is named after it.
async fn redis_op(conn: &mut redis::Conn, args: &[&[u8]], ok: fn(&redis::Reply) -> bool) -> Op {
    match conn.cmd(args).await {
        Ok(r) if ok(&r) => Ok(()),
        _ => Err(format!("{} failed", String::from_utf8_lossy(args[0]))),
    }
}

/// A target whose client reports success as a bool.
fn failure(ok: bool, what: &str) -> Op {
    if ok {
        Ok(())
    } else {
        Err(format!("{what} failed"))
    }
}

/// What the closed loop drives.
#[derive(Clone)]
enum Target {
    Kubbi {
        ctx: Ctx,
        urls: Vec<String>,
    },
    Redis {
        addr: String,
        payload: Arc<Vec<u8>>,
        sha: String,
    },
    Etcd {
        http: reqwest::Client,
        urls: Vec<String>,
        value: Arc<String>,
        conflicts: Arc<AtomicU64>,
    },
    EtcdGrpc {
        http: reqwest::Client,
        urls: Vec<String>,
        value: Arc<Vec<u8>>,
        conflicts: Arc<AtomicU64>,
    },
}

/// One closed-loop client's connection.
enum Client {
    Kubbi(Ctx),
    Redis {
        conn: redis::Conn,
        payload: Arc<Vec<u8>>,
        sha: String,
    },
    Etcd(etcd::Client),
    EtcdGrpc(etcd_grpc::Client),
}

fn key(run: u64, c: usize, i: u64) -> String {
    format!("kb/{run:x}/{c}/{i}")
}

impl Client {
    async fn create(&mut self, key: &str) -> Op {
        match self {
            Client::Kubbi(ctx) => ctx.try_create(Some(1), 3600).await.map(drop),
            Client::Redis { conn, payload, .. } => {
                redis_op(
                    conn,
                    &[b"SET", key.as_bytes(), payload, b"EX", b"3600"],
                    |r| matches!(r, redis::Reply::Simple(_)),
                )
                .await
            }
            Client::Etcd(e) => failure(e.create(key).await, "put"),
            Client::EtcdGrpc(e) => failure(e.create(key).await, "put"),
        }
    }

    async fn claim(&mut self, token: &str) -> Op {
        match self {
            Client::Kubbi(ctx) => ctx.claim(token).await,
            Client::Redis { conn, .. } => {
                redis_op(conn, &[b"GETDEL", token.as_bytes()], |r| {
                    matches!(r, redis::Reply::Bulk(_))
                })
                .await
            }
            Client::Etcd(e) => failure(e.claim(token).await, "txn"),
            Client::EtcdGrpc(e) => failure(e.claim(token).await, "txn"),
        }
    }

    async fn claim_n(&mut self, token: &str) -> Op {
        match self {
            Client::Kubbi(ctx) => ctx.claim(token).await,
            Client::Redis { conn, sha, .. } => {
                redis_op(
                    conn,
                    &[b"EVALSHA", sha.as_bytes(), b"1", token.as_bytes()],
                    |r| matches!(r, redis::Reply::Array(_)),
                )
                .await
            }
            Client::Etcd(e) => failure(e.claim_n(token).await, "cas"),
            Client::EtcdGrpc(e) => failure(e.claim_n(token).await, "cas"),
        }
    }

    async fn preview(&mut self, token: &str) -> Op {
        match self {
            Client::Kubbi(ctx) => ctx.preview(token).await,
            Client::Redis { conn, .. } => {
                redis_op(conn, &[b"GET", token.as_bytes()], |r| {
                    matches!(r, redis::Reply::Bulk(_))
                })
                .await
            }
            Client::Etcd(e) => failure(e.preview(token).await, "range"),
            Client::EtcdGrpc(e) => failure(e.preview(token).await, "range"),
        }
    }

    async fn mixed(&mut self) -> Op {
        match self {
            Client::Kubbi(ctx) => {
                let t = ctx.try_create(Some(1), 3600).await?;
                ctx.preview(&t).await?;
                ctx.claim(&t).await
            }
            _ => Err("mixed: kubbi only".into()),
        }
    }
}

impl Target {
    /// Lost compare-and-swap races so far (etcd claim-n).
    fn conflicts(&self) -> u64 {
        match self {
            Target::Etcd { conflicts, .. } | Target::EtcdGrpc { conflicts, .. } => {
                conflicts.load(Ordering::Relaxed)
            }
            _ => 0,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Target::Kubbi { .. } => "kubbi",
            Target::Redis { .. } => "redis",
            Target::Etcd { .. } => "etcd",
            Target::EtcdGrpc { .. } => "etcd-grpc",
        }
    }

    /// Client `c`'s connection; client c talks to node c mod n, as behind a load balancer.
    async fn client(&self, c: usize) -> Option<Client> {
        match self {
            Target::Kubbi { ctx, urls } => Some(Client::Kubbi(ctx.on(&urls[c % urls.len()]))),
            Target::Redis { addr, payload, sha } => Some(Client::Redis {
                conn: redis::Conn::connect(addr).await.ok()?,
                payload: payload.clone(),
                sha: sha.clone(),
            }),
            Target::Etcd {
                http,
                urls,
                value,
                conflicts,
            } => etcd::Client::connect(
                http.clone(),
                &urls[c % urls.len()],
                value.clone(),
                3600,
                conflicts.clone(),
            )
            .await
            .map(Client::Etcd),
            Target::EtcdGrpc {
                http,
                urls,
                value,
                conflicts,
            } => etcd_grpc::Client::connect(
                http.clone(),
                &urls[c % urls.len()],
                value.clone(),
                3600,
                conflicts.clone(),
            )
            .await
            .map(Client::EtcdGrpc),
        }
    }

    /// Untimed setup: `n` claimable items allowing `reads` claims each; their tokens or keys.
    async fn setup(&self, n: usize, reads: u32, run: u64) -> Vec<String> {
        match self {
            Target::Kubbi { ctx, urls } => {
                let made = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(n)));
                let next = Arc::new(AtomicUsize::new(0));
                let mut tasks = Vec::new();
                for t in 0..64 {
                    let ctx = ctx.on(&urls[t % urls.len()]);
                    let made = made.clone();
                    let next = next.clone();
                    tasks.push(tokio::spawn(async move {
                        while next.fetch_add(1, Ordering::Relaxed) < n {
                            if let Some(t) = ctx.create(Some(reads), 3600).await {
                                made.lock().await.push(t);
                            }
                        }
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
                Arc::try_unwrap(made)
                    .map(|m| m.into_inner())
                    .unwrap_or_default()
            }
            Target::Redis { addr, payload, .. } => {
                let keys: Vec<String> = (0..n as u64).map(|i| key(run, 0, i)).collect();
                let keys = Arc::new(keys);
                let mut tasks = Vec::new();
                let conns = 8;
                for t in 0..conns {
                    let (keys, addr, payload) = (keys.clone(), addr.clone(), payload.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut conn = redis::Conn::connect(&addr).await.ok()?;
                        let mine: Vec<&String> = keys.iter().skip(t).step_by(conns).collect();
                        let reads = reads.to_string();
                        for chunk in mine.chunks(256) {
                            for k in chunk {
                                if reads == "1" {
                                    conn.push(&[b"SET", k.as_bytes(), &payload, b"EX", b"3600"]);
                                } else {
                                    conn.push(&[
                                        b"HSET",
                                        k.as_bytes(),
                                        b"n",
                                        reads.as_bytes(),
                                        b"v",
                                        &payload,
                                    ]);
                                    conn.push(&[b"EXPIRE", k.as_bytes(), b"3600"]);
                                }
                            }
                            let replies = conn.flush().await.ok()?;
                            if replies.iter().any(|r| !r.is_value()) {
                                return None;
                            }
                        }
                        Some(())
                    }));
                }
                for t in tasks {
                    if !matches!(t.await, Ok(Some(()))) {
                        eprintln!("redis setup failed");
                        return Vec::new();
                    }
                }
                Arc::try_unwrap(keys).unwrap_or_default()
            }
            Target::Etcd { .. } | Target::EtcdGrpc { .. } => {
                let keys: Vec<String> = (0..n as u64).map(|i| key(run, 0, i)).collect();
                let keys = Arc::new(keys);
                let mut tasks = Vec::new();
                let conns = 16;
                for t in 0..conns {
                    let client = self.client(t).await;
                    let keys = keys.clone();
                    tasks.push(tokio::spawn(async move {
                        let mine: Vec<String> =
                            keys.iter().skip(t).step_by(conns).cloned().collect();
                        match client {
                            Some(Client::Etcd(c)) => c.setup(&mine, reads).await,
                            Some(Client::EtcdGrpc(c)) => c.setup(&mine, reads).await,
                            _ => false,
                        }
                    }));
                }
                for t in tasks {
                    if !matches!(t.await, Ok(true)) {
                        eprintln!("etcd setup failed");
                        return Vec::new();
                    }
                }
                Arc::try_unwrap(keys).unwrap_or_default()
            }
        }
    }
}

/// CPU time in clock ticks (USER_HZ, 100 on Linux): the given servers, this process, and the
/// whole machine (busy and total).
#[derive(Clone, Default)]
struct Cpu {
    /// Each server process's ticks, in `--server-pids` order.
    each: Vec<u64>,
    me: u64,
    busy: u64,
    total: u64,
}

fn proc_ticks(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            // Fields 14 and 15 of stat (utime, stime) are the 12th and 13th after the name.
            Some(f.get(11)? + f.get(12)?)
        })
        .unwrap_or(0)
}

fn cpu_snapshot(pids: &[u32]) -> Cpu {
    let (mut busy, mut total) = (0, 0);
    if let Ok(s) = std::fs::read_to_string("/proc/stat")
        && let Some(line) = s.lines().next()
    {
        // user nice system idle iowait irq softirq steal
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        total = f.iter().sum();
        busy = total - f.get(3).unwrap_or(&0) - f.get(4).unwrap_or(&0);
    }
    Cpu {
        each: pids.iter().map(|p| proc_ticks(&p.to_string())).collect(),
        me: proc_ticks("self"),
        busy,
        total,
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

struct Result1 {
    workload: String,
    clients: usize,
    ops: u64,
    /// Failed operations by kind (see [`Op`]).
    errors: BTreeMap<String, u64>,
    secs: f64,
    hist: Histogram<u64>,
    pool: usize,
    pool_exhausted: bool,
    setup_secs: f64,
    conflicts: u64,
    cpu: Value,
}

async fn run_level(
    target: &Target,
    workload: &str,
    clients: usize,
    seconds: u64,
    pool_n: usize,
    pids: &[u32],
    prefilled: &Arc<Vec<String>>,
) -> Result1 {
    let run: u64 = rand::random();
    // Claims and previews need items made beforehand (not timed).
    let t_setup = Instant::now();
    let pool: Arc<Vec<String>> = match workload {
        "preview" if !prefilled.is_empty() => prefilled.clone(),
        w => Arc::new(match w {
            "claim" | "claim-once" | "preview" => target.setup(pool_n, 1, run).await,
            "claim-n" => target.setup(pool_n, 3, run).await,
            _ => Vec::new(),
        }),
    };
    let setup_secs = t_setup.elapsed().as_secs_f64();
    let needs_pool = matches!(workload, "claim" | "claim-once" | "claim-n" | "preview");
    // Previews of prefilled kubbis read random ones; otherwise each client walks the pool.
    let random_preview = !prefilled.is_empty();
    let mut conns = Vec::with_capacity(clients);
    for c in 0..clients {
        conns.push(target.client(c).await);
    }
    let conflicts0 = target.conflicts();
    let stop = Arc::new(AtomicBool::new(needs_pool && pool.is_empty()));
    let exhausted = Arc::new(AtomicBool::new(false));
    let cursor = Arc::new(AtomicUsize::new(0));
    let load = loadavg();
    let cpu0 = cpu_snapshot(pids);
    // benches/profile starts sampling at this line (claim pools are made before it, untimed).
    eprintln!("loadgen: timed window starts: {workload} at {clients} clients");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (c, conn) in conns.into_iter().enumerate() {
        let stop = stop.clone();
        let exhausted = exhausted.clone();
        let pool = pool.clone();
        let cursor = cursor.clone();
        let workload = workload.to_string();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut errors = BTreeMap::<String, u64>::new();
            let Some(mut client) = conn else {
                errors.insert("no connection".into(), 1);
                return (h, errors);
            };
            let mut i = c as u64;
            let run_out = || {
                exhausted.store(true, Ordering::Relaxed);
                stop.store(true, Ordering::Relaxed);
            };
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let t0 = Instant::now();
                let r = match workload.as_str() {
                    "create" => client.create(&key(run, c, i)).await,
                    "claim" | "claim-once" => {
                        let n = cursor.fetch_add(1, Ordering::Relaxed);
                        match pool.get(n) {
                            Some(t) => client.claim(t).await,
                            None => {
                                run_out();
                                break;
                            }
                        }
                    }
                    "claim-n" => {
                        // Three passes over the pool, so one item's claims never race.
                        let n = cursor.fetch_add(1, Ordering::Relaxed);
                        if n >= pool.len() * 3 {
                            run_out();
                            break;
                        }
                        client.claim_n(&pool[n % pool.len()]).await
                    }
                    "preview" => {
                        let n = if random_preview {
                            rand::random_range(0..pool.len())
                        } else {
                            i as usize
                        };
                        client.preview(&pool[n % pool.len()]).await
                    }
                    _ => client.mixed().await,
                };
                match r {
                    Ok(()) => {
                        let _ = h.record(t0.elapsed().as_micros() as u64);
                    }
                    Err(kind) => *errors.entry(kind).or_default() += 1,
                }
            }
            (h, errors)
        }));
    }
    let deadline = started + Duration::from_secs(seconds);
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut errors = BTreeMap::<String, u64>::new();
    for t in tasks {
        if let Ok((h, e)) = t.await {
            let _ = hist.add(&h);
            for (kind, n) in e {
                *errors.entry(kind).or_default() += n;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu1 = cpu_snapshot(pids);
    let tick = |t: u64| t as f64 / 100.0;
    let each: Vec<f64> = cpu1
        .each
        .iter()
        .zip(&cpu0.each)
        .map(|(b, a)| tick(b.saturating_sub(*a)))
        .collect();
    let servers: f64 = each.iter().sum();
    let me = tick(cpu1.me.saturating_sub(cpu0.me));
    let busy = tick(cpu1.busy.saturating_sub(cpu0.busy));
    let total = tick(cpu1.total.saturating_sub(cpu0.total));
    let cpu = json!({
        "servers_cpu_s": if pids.is_empty() { Value::Null } else { json!(servers) },
        "server_cpu_s_each": each,
        "loadgen_cpu_s": me,
        "machine_busy_cpu_s": busy,
        "machine_total_cpu_s": total,
        "other_cpu_s": if pids.is_empty() { Value::Null } else { json!((busy - servers - me).max(0.0)) },
        "loadavg_before": load,
    });
    let conflicts = target.conflicts() - conflicts0;
    Result1 {
        workload: workload.into(),
        clients,
        ops: hist.len(),
        errors,
        secs,
        hist,
        pool: pool.len(),
        pool_exhausted: exhausted.load(Ordering::Relaxed),
        setup_secs,
        conflicts,
        cpu,
    }
}

/// `0`, or the count followed by each kind: `3 (http 503 unavailable: 2, timeout: 1)`.
fn error_summary(errors: &BTreeMap<String, u64>) -> String {
    let n: u64 = errors.values().sum();
    if n == 0 {
        return "0".into();
    }
    let kinds: Vec<String> = errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!("{n} ({})", kinds.join(", "))
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// How many claimable items to make before a claim level: enough for 2.5x the rate this run
/// measured for `create` (or `claim`) at the same concurrency, within memory bounds. A level
/// that still runs out stops there and reports the shorter window.
fn pool_size(
    opts: &Opts,
    rates: &std::collections::HashMap<(String, usize), f64>,
    workload: &str,
    clients: usize,
) -> usize {
    // Previews do not consume: 1,000 kubbis, or what fits in 1.5 GiB of payloads.
    if workload == "preview" {
        return ((1536usize << 20) / opts.payload.max(1)).clamp(clients.min(1_000), 1_000);
    }
    if let Some(p) = opts.pool {
        return p;
    }
    let reads = if workload == "claim-n" { 3 } else { 1 };
    let rate = |w: &str| rates.get(&(w.to_string(), clients)).copied();
    let measured = match workload {
        "claim-n" => rate("claim").or(rate("claim-once")).or(rate("create")),
        _ => rate("create"),
    };
    let ops = match measured {
        // Claims can run faster than creates: 2.5x headroom by default, at least 2,000.
        Some(r) => {
            ((r * opts.seconds as f64 * opts.pool_headroom) as usize + clients * 8).max(2_000)
        }
        None => (clients * 2_000).clamp(20_000, 200_000),
    };
    let cap = ((1536usize << 20) / opts.payload.max(1)).max(clients * 4);
    ops.div_ceil(reads).min(1_000_000).min(cap).max(clients * 4)
}

#[tokio::main]
async fn main() {
    let opts = parse_opts();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let mut urls = Vec::new();
    let mut node = None;
    let target = match opts.target.as_str() {
        "redis" => {
            let mut conn = redis::Conn::connect(&opts.target_addr)
                .await
                .expect("connect to redis");
            let sha = match conn
                .cmd(&[b"SCRIPT", b"LOAD", redis::CLAIM_N_LUA.as_bytes()])
                .await
            {
                Ok(redis::Reply::Bulk(s)) => String::from_utf8_lossy(&s).into_owned(),
                other => panic!("SCRIPT LOAD: {other:?}"),
            };
            urls.push(opts.target_addr.clone());
            Target::Redis {
                addr: opts.target_addr.clone(),
                payload: Arc::new(vec![b'x'; opts.payload]),
                sha,
            }
        }
        "etcd" => {
            urls = opts
                .target_addr
                .split(',')
                .map(|u| u.trim_end_matches('/').to_string())
                .collect();
            use base64::Engine;
            Target::Etcd {
                http: http.clone(),
                urls: urls.clone(),
                value: Arc::new(
                    base64::engine::general_purpose::STANDARD.encode(vec![b'x'; opts.payload]),
                ),
                conflicts: Arc::new(AtomicU64::new(0)),
            }
        }
        "etcd-grpc" => {
            urls = opts
                .target_addr
                .split(',')
                .map(|u| u.trim_end_matches('/').to_string())
                .collect();
            Target::EtcdGrpc {
                http: reqwest::Client::builder()
                    .http2_prior_knowledge()
                    .timeout(Duration::from_secs(30))
                    .build()
                    .expect("h2 client"),
                urls: urls.clone(),
                value: Arc::new(vec![b'x'; opts.payload]),
                conflicts: Arc::new(AtomicU64::new(0)),
            }
        }
        "kubbi" => {
            let n = match (&opts.url, &opts.cluster) {
                (_, Some(dir)) => {
                    let state: Value = serde_json::from_slice(
                        &std::fs::read(dir.join("cluster.json"))
                            .expect("cluster.json (run cluster/up)"),
                    )
                    .expect("cluster.json");
                    match &opts.region {
                        Some(r) => {
                            let eps = state["regions"][r.as_str()]["endpoints"]
                                .as_array()
                                .unwrap_or_else(|| panic!("no region {r} in cluster.json"));
                            urls.extend(eps.iter().filter_map(|u| u.as_str().map(String::from)));
                        }
                        None => {
                            for n in state["nodes"].as_array().expect("nodes") {
                                urls.push(format!("http://{}", n["http"].as_str().expect("http")));
                            }
                        }
                    }
                    Node {
                        child: None,
                        _dir: None,
                        url: urls[0].clone(),
                        admin: state["admin_token"].as_str().expect("admin").to_string(),
                    }
                }
                (Some(u), None) => Node {
                    child: None,
                    _dir: None,
                    url: u.trim_end_matches('/').to_string(),
                    admin: std::env::var("KUBBI_ADMIN_TOKEN")
                        .expect("KUBBI_ADMIN_TOKEN with --url"),
                },
                (None, None) => start_node().await,
            };
            if urls.is_empty() {
                urls.push(n.url.clone());
            }
            // Wait for readiness and make an API key.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let ok = http
                    .get(format!("{}/health/ready", n.url))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    break;
                }
                assert!(Instant::now() < deadline, "node not ready");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let key: Value = http
                .post(format!("{}/admin/v1/api-keys", n.url))
                .bearer_auth(&n.admin)
                .json(&json!({"label": "loadgen"}))
                .send()
                .await
                .expect("key")
                .json()
                .await
                .expect("key json");
            let ctx = Ctx {
                http: http.clone(),
                url: n.url.clone(),
                key: key["api_key"].as_str().expect("api key").to_string(),
                payload: "x".repeat(opts.payload),
            };
            node = Some(n);
            Target::Kubbi {
                ctx,
                urls: urls.clone(),
            }
        }
        other => panic!(
            "unknown --target {other} (kubbi, redis ADDR, etcd URL[,URL...], etcd-grpc URL[,URL...])"
        ),
    };

    println!(
        "{} loadgen: {} endpoint(s) {} | payload {} B | {} s per level",
        target.name(),
        urls.len(),
        urls.join(" "),
        opts.payload,
        opts.seconds
    );
    println!("| workload | clients | ops/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let node_pid = node.as_ref().and_then(|n| n.child.as_ref().map(Child::id));
    let mut prefill = Value::Null;
    let prefilled = Arc::new(match &target {
        Target::Kubbi { .. } if opts.prefill > 0 => {
            let before = node_pid.and_then(rss_kib);
            let t0 = Instant::now();
            let tokens = target.setup(opts.prefill, 2, 0).await;
            let secs = t0.elapsed().as_secs_f64();
            let after = node_pid.and_then(rss_kib);
            println!(
                "prefill: {} active kubbis of {} B in {:.1} s ({:.0}/s); node RSS {} -> {} MiB",
                tokens.len(),
                opts.payload,
                secs,
                tokens.len() as f64 / secs,
                before.map_or(0, |k| k / 1024),
                after.map_or(0, |k| k / 1024),
            );
            prefill = json!({"kubbis": tokens.len(), "seconds": secs,
                             "rss_before_kib": before, "rss_after_kib": after});
            tokens
        }
        _ => Vec::new(),
    });
    let mut rows = Vec::new();
    let mut rates = std::collections::HashMap::new();
    for w in &opts.workloads {
        for &c in &opts.clients {
            let pool_n = pool_size(&opts, &rates, w, c);
            let r = run_level(
                &target,
                w,
                c,
                opts.seconds,
                pool_n,
                &opts.server_pids,
                &prefilled,
            )
            .await;
            let rate = r.ops as f64 / r.secs;
            rates.insert((w.clone(), c), rate);
            println!(
                "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} |{}",
                r.workload,
                r.clients,
                rate,
                ms(r.hist.value_at_quantile(0.5)),
                ms(r.hist.value_at_quantile(0.9)),
                ms(r.hist.value_at_quantile(0.99)),
                ms(r.hist.value_at_quantile(0.999)),
                error_summary(&r.errors),
                if r.pool_exhausted {
                    format!(" pool of {} ran out after {:.1} s", r.pool, r.secs)
                } else {
                    String::new()
                }
            );
            rows.push(json!({
                "target": target.name(), "workload": r.workload, "clients": r.clients,
                "ops": r.ops, "seconds": r.secs,
                "ops_per_sec": rate, "errors": r.errors.values().sum::<u64>(), "error_kinds": r.errors,
                "p50_ms": ms(r.hist.value_at_quantile(0.5)), "p90_ms": ms(r.hist.value_at_quantile(0.9)),
                "p99_ms": ms(r.hist.value_at_quantile(0.99)), "p999_ms": ms(r.hist.value_at_quantile(0.999)),
                "max_ms": ms(r.hist.max()), "mean_ms": r.hist.mean() / 1000.0,
                "pool": r.pool, "pool_exhausted": r.pool_exhausted, "setup_seconds": r.setup_secs,
                "cas_conflicts": r.conflicts, "cpu": r.cpu,
            }));
        }
    }

    let mut rss = Value::Null;
    if let (Some(n), Some(pid), Target::Kubbi { ctx, .. }) = (opts.rss, node_pid, &target) {
        let before = rss_kib(pid);
        // Fill: n active kubbis (2 reads each, 2 h TTL). A fresh kubbi with a far deadline
        // starts passive: no actor until its first request.
        let tokens = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(n)));
        let next = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let ctx = ctx.clone();
            let tokens = tokens.clone();
            let next = next.clone();
            tasks.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    if let Some(t) = ctx.create(Some(2), 7200).await {
                        tokens.lock().await.push(t);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let fill_secs = t0.elapsed().as_secs_f64();
        let tokens = Arc::new(std::mem::take(&mut *tokens.lock().await));
        let filled = rss_kib(pid);
        // One claim each activates every kubbi's actor (1 of 2 reads: all stay active).
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let ctx = ctx.clone();
            let tokens = tokens.clone();
            let next = next.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(t) = tokens.get(i) else { break };
                    let _ = ctx.claim(t).await;
                }
            }));
        }
        let t1 = Instant::now();
        for t in tasks {
            let _ = t.await;
        }
        let activate_secs = t1.elapsed().as_secs_f64();
        let with_actors = rss_kib(pid);
        // Actors passivate after 10 s idle; freed memory may stay with the allocator.
        tokio::time::sleep(Duration::from_secs(15)).await;
        let passivated = rss_kib(pid);
        let mib = |k: Option<u64>| k.map(|k| k / 1024).unwrap_or(0);
        println!(
            "\nRSS, {} active kubbis of {} B: empty node {} MiB; filled (no actors) {} MiB; \
             every kubbi's actor live {} MiB; after passivation {} MiB. Fill {:.1} s, activation {:.1} s",
            tokens.len(),
            opts.payload,
            mib(before),
            mib(filled),
            mib(with_actors),
            mib(passivated),
            fill_secs,
            activate_secs
        );
        rss = json!({"kubbis": tokens.len(), "empty_kib": before, "filled_kib": filled,
                     "actors_live_kib": with_actors, "passivated_kib": passivated,
                     "fill_seconds": fill_secs, "activate_seconds": activate_secs});
    }

    if let Some(out) = opts.out {
        let doc = json!({"target": target.name(), "endpoints": urls, "label": opts.label,
                         "payload_bytes": opts.payload, "seconds": opts.seconds,
                         "server_pids": opts.server_pids, "results": rows, "rss": rss,
                         "prefill": prefill,
                         "rss_end_kib": node_pid.and_then(rss_kib)});
        std::fs::write(&out, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .expect("write results");
        println!("wrote {}", out.display());
    }
}
