//! Test fixtures: a real node in this process (real RocksDB in a temp dir, real HTTP on an
//! ephemeral loopback port) or in a child process (for kill -9), plus HTTP helpers. Every
//! node's log goes to the directory [`logscan`] names, and every secret the helpers see is
//! recorded there, for `scripts/scan-test-logs`.
#![allow(dead_code)]

pub mod cluster;
pub mod inproc;
pub mod logscan;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use kubbi::config::Config;
use kubbi::node::{self, NodeHandle};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The `kubbi` binary: the one nextest names at run time (`NEXTEST_BIN_EXE_kubbi`, a private
/// copy when the tests run from an archive, safe from other builds sharing the target
/// directory), else the one cargo built with these tests.
pub fn kubbi_bin() -> String {
    std::env::var("NEXTEST_BIN_EXE_kubbi")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_kubbi").to_string())
}

/// Raft timings that make a fresh node lead within milliseconds.
pub fn fast_config(dir: &Path) -> Config {
    let mut c = Config::for_dir(dir);
    c.raft.heartbeat_ms = 50;
    c.raft.election_timeout_min_ms = 150;
    c.raft.election_timeout_max_ms = 300;
    c
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HTTP client for one node.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

/// A response: status, headers and JSON body (`Value::Null` when the body is not JSON).
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Resp {
    pub fn err_code(&self) -> &str {
        self.body["error"].as_str().unwrap_or("")
    }
}

impl Api {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: base.into(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
        }
    }

    /// Sends `req`, recording the secrets it carries (bearer credential, a claim token in the
    /// path, payloads in a JSON body) and those in the response.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        let (client, req) = req.build_split();
        let req = req.expect("request builds");
        record_request(&req);
        let r = client.execute(req).await.expect("request sent");
        let status = r.status();
        let headers = r.headers().clone();
        let bytes = r.bytes().await.expect("body read");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        logscan::record_json(&body);
        Resp {
            status,
            headers,
            body,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn create(&self, key: &str, body: Value) -> Resp {
        self.send(
            self.http
                .post(self.url("/api/v1/kubbis"))
                .bearer_auth(key)
                .json(&body),
        )
        .await
    }

    /// A create whose body is sent as these exact bytes (`application/json`).
    pub async fn create_raw(&self, key: &str, body: Vec<u8>) -> Resp {
        self.send(
            self.http
                .post(self.url("/api/v1/kubbis"))
                .bearer_auth(key)
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    /// The node's Prometheus text.
    pub async fn metrics_text(&self) -> String {
        let r = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics");
        assert_eq!(r.status(), StatusCode::OK);
        r.text().await.expect("metrics text")
    }

    pub async fn get(&self, key: &str, path: &str) -> Resp {
        self.send(self.http.get(self.url(path)).bearer_auth(key))
            .await
    }

    pub async fn delete(&self, key: &str, id: &str) -> Resp {
        self.send(
            self.http
                .delete(self.url(&format!("/api/v1/kubbis/{id}")))
                .bearer_auth(key),
        )
        .await
    }

    pub async fn preview(&self, token: &str) -> Resp {
        self.send(self.http.get(self.url(&format!("/r/{token}"))))
            .await
    }

    pub async fn inspect(&self, token: &str) -> Resp {
        self.send(self.http.get(self.url(&format!("/r/{token}/inspect"))))
            .await
    }

    pub async fn claim(&self, token: &str) -> Resp {
        self.send(self.http.post(self.url(&format!("/r/{token}/claim"))))
            .await
    }

    pub async fn claim_idem(&self, token: &str, key: &str) -> Resp {
        self.send(
            self.http
                .post(self.url(&format!("/r/{token}/claim")))
                .header("Idempotency-Key", key),
        )
        .await
    }

    pub async fn new_api_key(&self, admin: &str, label: &str) -> (String, String) {
        let r = self
            .send(
                self.http
                    .post(self.url("/admin/v1/api-keys"))
                    .bearer_auth(admin)
                    .json(&json!({ "label": label })),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        (
            r.body["api_key"].as_str().expect("key").to_string(),
            r.body["id"].as_str().expect("id").to_string(),
        )
    }
}

/// Records the secrets an outgoing request carries.
fn record_request(req: &reqwest::Request) {
    if let Some(auth) = req
        .headers()
        .get(reqwest::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        && let Some(cred) = auth.strip_prefix("Bearer ")
    {
        logscan::record_bearer(cred);
    }
    logscan::record_claim_urls(req.url().path());
    if let Some(body) = req.body().and_then(|b| b.as_bytes())
        && let Ok(v) = serde_json::from_slice::<Value>(body)
    {
        logscan::record_json(&v);
    }
}

/// A node running in this process.
pub struct TestNode {
    pub node: Option<NodeHandle>,
    pub dir: tempfile::TempDir,
    pub api: Api,
    pub admin: String,
    /// An API key created at start.
    pub key: String,
}

impl TestNode {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = fast_config(dir.path());
        tune(&mut config);
        Self::start_in(dir, config).await
    }

    pub async fn start_in(dir: tempfile::TempDir, config: Config) -> Self {
        logscan::init();
        let key_file = config.node_key_path();
        let node = node::start(config).await.expect("node starts");
        logscan::record_key_file(&key_file);
        let api = Api::new(format!("http://{}", node.http_addr));
        let admin = node.admin_token.to_string();
        logscan::record("admin-token", &admin);
        let (key, _) = api.new_api_key(&admin, "test").await;
        Self {
            node: Some(node),
            dir,
            api,
            admin,
            key,
        }
    }

    pub fn handle(&self) -> &NodeHandle {
        self.node.as_ref().expect("running")
    }

    /// Stops the node gracefully and starts it again on the same data directory.
    pub async fn restart(&mut self, tune: impl FnOnce(&mut Config)) {
        if let Some(n) = self.node.take() {
            n.shutdown().await;
        }
        let mut config = fast_config(self.dir.path());
        tune(&mut config);
        let node = node::start(config).await.expect("node restarts");
        self.api = Api::new(format!("http://{}", node.http_addr));
        self.node = Some(node);
    }

    pub async fn stop(mut self) {
        if let Some(n) = self.node.take() {
            n.shutdown().await;
        }
    }
}

/// A node in a child process, for crash tests.
pub struct ProcessNode {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub api: Api,
    pub stderr_path: PathBuf,
}

impl ProcessNode {
    /// Starts `kubbi serve` on `dir` with an ephemeral port, logging at the test level unless
    /// `env` sets `KUBBI_LOG`. Its stdout and stderr are appended to a file in the test log
    /// directory, which `log` links to (see [`logscan::link_child_log`]).
    pub async fn start(dir: &Path, log: &Path, env: &[(&str, &str)]) -> Self {
        let addr_file = dir.join("http.addr");
        let _ = std::fs::remove_file(&addr_file);
        let target = logscan::link_child_log(log, "node");
        let mut cmd = Command::new(kubbi_bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(dir)
            .arg("--http-addr")
            .arg("127.0.0.1:0")
            .env("KUBBI_LOG", logscan::level())
            .stdout(logscan::append(&target))
            .stderr(logscan::append(&target));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn kubbi");
        let addr = eventually(Duration::from_secs(60), "node writes http.addr", || {
            let f = addr_file.clone();
            async move { std::fs::read_to_string(&f).ok().filter(|s| !s.is_empty()) }
        })
        .await;
        logscan::record_key_file(&dir.join("node-keys.json"));
        if let Ok(t) = std::fs::read_to_string(dir.join("admin-token")) {
            logscan::record("admin-token", t.trim());
        }
        let api = Api::new(format!("http://{addr}"));
        let probe = api.clone();
        eventually(Duration::from_secs(60), "node ready", || {
            let probe = probe.clone();
            async move {
                let r = probe
                    .http
                    .get(probe.url("/health/ready"))
                    .send()
                    .await
                    .ok()?;
                (r.status() == StatusCode::OK).then_some(())
            }
        })
        .await;
        Self {
            child: Some(child),
            dir: dir.to_path_buf(),
            api,
            stderr_path: log.to_path_buf(),
        }
    }

    pub fn admin_token(&self) -> String {
        let t = std::fs::read_to_string(self.dir.join("admin-token"))
            .expect("admin token")
            .trim()
            .to_string();
        logscan::record("admin-token", &t);
        t
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for ProcessNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Whether `needle` occurs anywhere in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// A random printable marker that cannot occur by chance.
pub fn marker(tag: &str) -> String {
    format!("{tag}-{:032x}", rand::random::<u128>())
}

/// The raft group serving logical shard `shard`, from a `GET /admin/v1/cluster` answer (each
/// group lists the half-open shard ranges it serves).
pub fn group_of_shard(status: &serde_json::Value, shard: u16) -> Option<u64> {
    let shard = u64::from(shard);
    status["shards"].as_array()?.iter().find_map(|g| {
        let serves = g["ranges"].as_array()?.iter().any(|r| {
            r[0].as_u64()
                .zip(r[1].as_u64())
                .is_some_and(|(lo, hi)| (lo..hi).contains(&shard))
        });
        if serves { g["id"].as_u64() } else { None }
    })
}
