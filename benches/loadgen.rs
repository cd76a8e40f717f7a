//! Closed-loop load generator for a kubbi node.
//!
//! Starts a fresh node (the `kubbi` binary of this build, data in a temp dir) unless `--url` is
//! given, then for each concurrency level runs each workload for `--seconds` and reports ops/s
//! and latency percentiles (HDR histograms). Optionally measures the node's RSS while it holds
//! `--rss N` active kubbis.
//!
//! ```text
//! cargo bench --bench loadgen -- --clients 1,16,64 --seconds 10 --payload 1024 --rss 100000
//! ```
//!
//! Workloads: `create` (single content of `--payload` bytes, max_retrievals 1), `claim` (claims
//! kubbis created beforehand, each once: every claim burns), `preview` (GET /r/:token),
//! `mixed` (create, preview, claim of the same kubbi in sequence).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

struct Opts {
    url: Option<String>,
    /// A cluster started by `cluster/up`: clients spread over its nodes.
    cluster: Option<PathBuf>,
    clients: Vec<usize>,
    seconds: u64,
    payload: usize,
    workloads: Vec<String>,
    rss: Option<usize>,
    out: Option<PathBuf>,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        url: None,
        cluster: None,
        clients: vec![1, 16, 64],
        seconds: 10,
        payload: 1024,
        workloads: vec!["create".into(), "claim".into(), "preview".into()],
        rss: None,
        out: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = |i: usize| args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--url" => o.url = Some(val(i)),
            "--cluster" => o.cluster = Some(PathBuf::from(val(i))),
            "--clients" => o.clients = val(i).split(',').filter_map(|c| c.parse().ok()).collect(),
            "--seconds" => o.seconds = val(i).parse().unwrap_or(10),
            "--payload" => o.payload = val(i).parse().unwrap_or(1024),
            "--workloads" => o.workloads = val(i).split(',').map(String::from).collect(),
            "--rss" => o.rss = val(i).parse().ok(),
            "--out" => o.out = Some(PathBuf::from(val(i))),
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
        let r = self
            .http
            .post(format!("{}/api/v1/kubbis", self.url))
            .bearer_auth(&self.key)
            .json(&json!({"content": self.payload, "max_retrievals": max, "ttl_seconds": ttl}))
            .send()
            .await
            .ok()?;
        if r.status().as_u16() != 201 {
            return None;
        }
        let v: Value = r.json().await.ok()?;
        v["claim_token"].as_str().map(String::from)
    }

    async fn claim(&self, token: &str) -> bool {
        match self
            .http
            .post(format!("{}/r/{token}/claim", self.url))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16() == 200 && r.bytes().await.is_ok(),
            Err(_) => false,
        }
    }

    async fn preview(&self, token: &str) -> bool {
        match self
            .http
            .get(format!("{}/r/{token}", self.url))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16() == 200 && r.bytes().await.is_ok(),
            Err(_) => false,
        }
    }
}

struct Result1 {
    workload: String,
    clients: usize,
    ops: u64,
    errors: u64,
    secs: f64,
    hist: Histogram<u64>,
}

async fn run_level(
    ctx: &Ctx,
    urls: &[String],
    workload: &str,
    clients: usize,
    seconds: u64,
) -> Result1 {
    // Claims and previews need kubbis made beforehand (not timed).
    let pool: Arc<Vec<String>> = Arc::new(match workload {
        "claim" | "preview" => {
            let want = if workload == "claim" {
                // Enough for the fastest rate we expect, capped for memory.
                (clients * 2_000).clamp(20_000, 200_000)
            } else {
                1_000
            };
            let made = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(want)));
            let next = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for _ in 0..64 {
                let ctx = ctx.clone();
                let made = made.clone();
                let next = next.clone();
                tasks.push(tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < want {
                        if let Some(t) = ctx.create(Some(1), 3600).await {
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
        _ => Vec::new(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let cursor = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        // Client c talks to node c mod n, as behind a load balancer.
        let ctx = ctx.on(&urls[c % urls.len()]);
        let stop = stop.clone();
        let pool = pool.clone();
        let cursor = cursor.clone();
        let workload = workload.to_string();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut errors = 0u64;
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let ok = match workload.as_str() {
                    "create" => ctx.create(Some(1), 3600).await.is_some(),
                    "claim" => {
                        let n = cursor.fetch_add(1, Ordering::Relaxed);
                        match pool.get(n) {
                            Some(t) => ctx.claim(t).await,
                            None => break,
                        }
                    }
                    "preview" => {
                        i += 1;
                        ctx.preview(&pool[i % pool.len()]).await
                    }
                    _ => match ctx.create(Some(1), 3600).await {
                        Some(t) => ctx.preview(&t).await && ctx.claim(&t).await,
                        None => false,
                    },
                };
                if ok {
                    let _ = h.record(t0.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            (h, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut errors = 0;
    for t in tasks {
        if let Ok((h, e)) = t.await {
            let _ = hist.add(&h);
            errors += e;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    Result1 {
        workload: workload.into(),
        clients,
        ops: hist.len(),
        errors,
        secs,
        hist,
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

#[tokio::main]
async fn main() {
    let opts = parse_opts();
    let mut urls = Vec::new();
    let node = match (&opts.url, &opts.cluster) {
        (_, Some(dir)) => {
            let state: Value = serde_json::from_slice(
                &std::fs::read(dir.join("cluster.json")).expect("cluster.json (run cluster/up)"),
            )
            .expect("cluster.json");
            for n in state["nodes"].as_array().expect("nodes") {
                urls.push(format!("http://{}", n["http"].as_str().expect("http")));
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
            admin: std::env::var("KUBBI_ADMIN_TOKEN").expect("KUBBI_ADMIN_TOKEN with --url"),
        },
        (None, None) => start_node().await,
    };
    if urls.is_empty() {
        urls.push(node.url.clone());
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    // Wait for readiness and make an API key.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = http
            .get(format!("{}/health/ready", node.url))
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
        .post(format!("{}/admin/v1/api-keys", node.url))
        .bearer_auth(&node.admin)
        .json(&json!({"label": "loadgen"}))
        .send()
        .await
        .expect("key")
        .json()
        .await
        .expect("key json");
    let ctx = Ctx {
        http,
        url: node.url.clone(),
        key: key["api_key"].as_str().expect("api key").to_string(),
        payload: "x".repeat(opts.payload),
    };

    println!(
        "kubbi loadgen: {} node(s) {} | payload {} B | {} s per level",
        urls.len(),
        urls.join(" "),
        opts.payload,
        opts.seconds
    );
    println!("| workload | clients | ops/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for w in &opts.workloads {
        for &c in &opts.clients {
            let r = run_level(&ctx, &urls, w, c, opts.seconds).await;
            let rate = r.ops as f64 / r.secs;
            println!(
                "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
                r.workload,
                r.clients,
                rate,
                ms(r.hist.value_at_quantile(0.5)),
                ms(r.hist.value_at_quantile(0.9)),
                ms(r.hist.value_at_quantile(0.99)),
                ms(r.hist.value_at_quantile(0.999)),
                r.errors
            );
            rows.push(json!({
                "workload": r.workload, "clients": r.clients, "ops": r.ops, "seconds": r.secs,
                "ops_per_sec": rate, "errors": r.errors,
                "p50_ms": ms(r.hist.value_at_quantile(0.5)), "p90_ms": ms(r.hist.value_at_quantile(0.9)),
                "p99_ms": ms(r.hist.value_at_quantile(0.99)), "p999_ms": ms(r.hist.value_at_quantile(0.999)),
            }));
        }
    }

    let mut rss = Value::Null;
    if let (Some(n), Some(pid)) = (opts.rss, node.child.as_ref().map(Child::id)) {
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
                    ctx.claim(t).await;
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
        let doc = json!({"payload_bytes": opts.payload, "seconds": opts.seconds, "results": rows, "rss": rss});
        std::fs::write(&out, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .expect("write results");
        println!("wrote {}", out.display());
    }
}
