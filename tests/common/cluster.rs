//! A cluster of real `kubbi` processes on loopback, each with its own data directory and ports.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use super::{Api, eventually, logscan};

/// Picks a loopback port that is free now, for a node to bind a moment later.
///
/// The port comes from below the kernel's ephemeral range (32768 and up on Linux): a port the
/// kernel handed out for `bind(0)` is soon handed out again as the source port of one of the
/// suite's many outgoing connections, and a node that then finds it taken never comes up.
pub fn free_port() -> u16 {
    const LOW: u16 = 20_000;
    const HIGH: u16 = 32_000;
    for _ in 0..1_000 {
        let port = LOW + rand::random::<u16>() % (HIGH - LOW);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{HIGH}");
}

/// The last `n` lines of a node's log.
fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn write_private(path: &Path, contents: &str) {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).expect("secret file");
    f.write_all(contents.as_bytes()).expect("write");
}

pub struct Member {
    pub id: u64,
    pub internal_port: u16,
    pub dir: PathBuf,
    /// The node's stdout and stderr, across restarts, in the test log directory.
    pub log: PathBuf,
    pub child: Option<Child>,
    pub api: Option<Api>,
    pub zone: String,
    pub extra: Vec<String>,
    /// Extra environment variables of the node's process.
    pub env: Vec<(String, String)>,
    /// `--peer-routes` of the node (the region simulator's links), if any.
    pub routes: Option<String>,
}

/// A running cluster.
pub struct Cluster {
    pub base: tempfile::TempDir,
    pub members: Vec<Member>,
    pub admin: String,
    secret_file: PathBuf,
    keys_file: PathBuf,
    admin_file: PathBuf,
    bootstrap: String,
    /// The region simulator between the members, when they are in regions.
    pub net: Option<Netsim>,
}

/// Regions for a test cluster: member `id` is in `names[(id - 1) % len]`, and every pair of
/// regions is `rtt_ms` apart (a `kubbi-netsim` link per directed pair of members).
#[derive(Clone)]
pub struct Regions {
    pub names: Vec<String>,
    pub rtt_ms: f64,
}

impl Regions {
    pub fn of(&self, id: u64) -> &str {
        &self.names[((id - 1) as usize) % self.names.len()]
    }
}

/// A running `kubbi-netsim` (cluster/netsim/main.rs) and its control port.
pub struct Netsim {
    child: Child,
    control: String,
}

impl Netsim {
    /// Starts the simulator with one link per directed pair of members in different regions;
    /// returns it and each member's `--peer-routes`.
    fn start(dir: &Path, members: &[Member], regions: &Regions) -> (Self, Vec<String>) {
        let mut links = Vec::new();
        // Per member: (peer id, index of the link it dials that peer through).
        let mut dials: Vec<Vec<(u64, usize)>> = Vec::new();
        for m in members {
            let mut d = Vec::new();
            for peer in members {
                let (from, to) = (regions.of(m.id), regions.of(peer.id));
                if from == to {
                    continue;
                }
                d.push((peer.id, links.len()));
                links.push(serde_json::json!({
                    "listen": "127.0.0.1:0",
                    "target": format!("127.0.0.1:{}", peer.internal_port),
                    "from": from, "to": to, "delay_ms": regions.rtt_ms / 2.0,
                }));
            }
            dials.push(d);
        }
        let config = dir.join("netsim.json");
        std::fs::write(
            &config,
            serde_json::json!({"control": "127.0.0.1:0", "links": links}).to_string(),
        )
        .expect("netsim config");
        let mut child = Command::new(netsim_bin())
            .arg("--config")
            .arg(&config)
            .stdout(std::process::Stdio::piped())
            .stderr(logscan::append(&logscan::child_log("netsim")))
            .spawn()
            .expect("spawn kubbi-netsim");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("kubbi-netsim output");
        let bound: serde_json::Value = line
            .strip_prefix("ready ")
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_else(|| panic!("kubbi-netsim did not start: {line}"));
        let addr = |i: usize| {
            bound["links"][i]
                .as_str()
                .expect("a bound link")
                .to_string()
        };
        let routes = dials
            .iter()
            .map(|d| {
                d.iter()
                    .map(|(peer, i)| format!("{peer}={}", addr(*i)))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        let control = bound["control"].as_str().expect("control").to_string();
        (Self { child, control }, routes)
    }

    /// Sends one control command (`cut eu`, `heal`, ...) and returns the answer.
    pub fn say(&self, command: &str) -> String {
        use std::io::{BufRead, Write};
        let mut s = std::net::TcpStream::connect(&self.control).expect("netsim control");
        s.write_all(format!("{command}\n").as_bytes())
            .expect("write");
        let mut line = String::new();
        std::io::BufReader::new(s)
            .read_line(&mut line)
            .expect("answer");
        assert!(line.starts_with("ok"), "netsim `{command}`: {line}");
        line.trim().to_string()
    }
}

impl Drop for Netsim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn netsim_bin() -> String {
    std::env::var("NEXTEST_BIN_EXE_kubbi-netsim")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_kubbi-netsim").to_string())
}

impl Cluster {
    /// Starts `n` nodes that bootstrap a new cluster together and waits until every group has
    /// a leader.
    pub async fn start(n: u64) -> Self {
        Self::start_with(n, &[]).await
    }

    /// Like [`Cluster::start`], with extra `kubbi serve` flags for every node.
    pub async fn start_with(n: u64, extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::start_each(n, |_| extra.clone()).await
    }

    /// Like [`Cluster::start`], with extra `kubbi serve` flags per node id.
    pub async fn start_each(n: u64, extra: impl Fn(u64) -> Vec<String>) -> Self {
        Self::start_in(tempfile::tempdir().expect("tempdir"), n, extra, &[]).await
    }

    /// Like [`Cluster::start`], with extra environment variables for every node.
    pub async fn start_env(n: u64, env: &[(&str, &str)]) -> Self {
        Self::start_in(
            tempfile::tempdir().expect("tempdir"),
            n,
            |_| Vec::new(),
            env,
        )
        .await
    }

    /// Like [`Cluster::start`], in `base`, where member `i`'s data directory is `node{i}` (the
    /// caller may have mounted a file system there), with extra flags per node id and extra
    /// environment variables for every node.
    pub async fn start_in(
        base: tempfile::TempDir,
        n: u64,
        extra: impl Fn(u64) -> Vec<String>,
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_placed(base, n, extra, env, None).await
    }

    /// Like [`Cluster::start`], with the members in `regions` (node `id` in region
    /// `regions.of(id)`, zone `region/z{id}`), talking across the region simulator.
    pub async fn start_regions(n: u64, regions: Regions, extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let base = tempfile::tempdir().expect("tempdir");
        Self::start_placed(base, n, |_| extra.clone(), &[], Some(regions)).await
    }

    async fn start_placed(
        base: tempfile::TempDir,
        n: u64,
        extra: impl Fn(u64) -> Vec<String>,
        env: &[(&str, &str)],
        regions: Option<Regions>,
    ) -> Self {
        let secret_file = base.path().join("cluster-secret");
        let secret = format!("{:032x}", rand::random::<u128>());
        logscan::record("cluster-secret", &secret);
        write_private(&secret_file, &secret);
        let keys_file = base.path().join("node-keys.json");
        let key = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            rand::random::<[u8; 32]>(),
        );
        write_private(
            &keys_file,
            &format!(r#"{{"current":1,"keys":[{{"id":1,"key":"{key}"}}]}}"#),
        );
        logscan::record_key_file(&keys_file);
        let admin = format!("{:032x}", rand::random::<u128>());
        logscan::record("admin-token", &admin);
        let admin_file = base.path().join("admin-token");
        write_private(&admin_file, &admin);
        let mut members = Vec::new();
        for id in 1..=n {
            members.push(Member {
                id,
                internal_port: free_port(),
                dir: base.path().join(format!("node{id}")),
                log: logscan::child_log(&format!("cluster-node{id}")),
                child: None,
                api: None,
                zone: match &regions {
                    Some(r) => format!("{}/z{id}", r.of(id)),
                    None => format!("local/z{id}"),
                },
                extra: extra(id),
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                routes: None,
            });
        }
        let bootstrap = members
            .iter()
            .map(|m| format!("{}=127.0.0.1:{}@{}", m.id, m.internal_port, m.zone))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Self {
            base,
            members,
            admin,
            secret_file,
            keys_file,
            admin_file,
            bootstrap,
            net: None,
        };
        // A port free when it was picked can be taken by the time a node binds it (another
        // test process picked it too): then every node starts again on fresh ports.
        for attempt in 1.. {
            if let Some(r) = &regions {
                c.net = None; // the links of the last attempt's ports
                let (net, routes) = Netsim::start(c.base.path(), &c.members, r);
                for (m, routes) in c.members.iter_mut().zip(routes) {
                    m.routes = Some(routes).filter(|r| !r.is_empty());
                }
                c.net = Some(net);
            }
            for i in 0..c.members.len() {
                c.spawn(i, true);
            }
            let mut port_taken = false;
            for i in 0..c.members.len() {
                port_taken |= !c.wait_up_or_port_taken(i).await;
            }
            if !port_taken {
                break;
            }
            assert!(attempt < 5, "internal ports taken at every attempt");
            for i in 0..c.members.len() {
                c.kill9(i);
                let _ = std::fs::remove_dir_all(&c.members[i].dir);
                c.members[i].internal_port = free_port();
            }
            c.bootstrap = c
                .members
                .iter()
                .map(|m| format!("{}=127.0.0.1:{}@{}", m.id, m.internal_port, m.zone))
                .collect::<Vec<_>>()
                .join(",");
        }
        c.wait_all_led().await;
        c
    }

    /// Like [`Cluster::wait_up`], but `false` when the node exited because a port it was to
    /// listen on was taken.
    async fn wait_up_or_port_taken(&mut self, i: usize) -> bool {
        let f = self.members[i].dir.join("http.addr");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        while tokio::time::Instant::now() < deadline
            && !std::fs::read_to_string(&f).is_ok_and(|s| !s.is_empty())
        {
            let m = &mut self.members[i];
            if m.child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .is_some()
            {
                // The last words of a node that could not bind (its log spans restarts).
                if log_tail(&m.log, 3).contains("Address already in use") {
                    m.child = None;
                    return false;
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.wait_up(i).await;
        true
    }

    /// The cluster secret every member presents on the internal port.
    pub fn secret(&self) -> String {
        std::fs::read_to_string(&self.secret_file)
            .expect("cluster secret")
            .trim()
            .to_string()
    }

    fn command(&self, m: &Member, bootstrap: bool) -> Command {
        let mut cmd = Command::new(super::kubbi_bin());
        cmd.arg("serve")
            .args(["--node-id", &m.id.to_string()])
            .arg("--data-dir")
            .arg(&m.dir)
            .args(["--http-addr", "127.0.0.1:0"])
            .args(["--internal-addr", &format!("127.0.0.1:{}", m.internal_port)])
            .args(["--zone", &m.zone])
            .arg("--cluster-secret-file")
            .arg(&self.secret_file)
            .arg("--node-key-file")
            .arg(&self.keys_file)
            .arg("--admin-token-file")
            .arg(&self.admin_file)
            .args(
                // Fast elections unless the test asked for its own timing.
                if m.extra.iter().any(|a| a == "--raft-heartbeat-ms") {
                    &[][..]
                } else {
                    &["--raft-heartbeat-ms", "100"][..]
                },
            )
            .args(&m.extra)
            .args(m.routes.iter().flat_map(|r| ["--peer-routes", r.as_str()]))
            .env("KUBBI_LOG", logscan::cluster_level())
            .envs(m.env.iter().map(|(k, v)| (k, v)));
        if bootstrap {
            cmd.args(["--bootstrap", &self.bootstrap]);
        }
        cmd
    }

    /// Starts member `i` (again) on its data directory.
    pub fn spawn(&mut self, i: usize, bootstrap: bool) {
        let m = &self.members[i];
        let _ = std::fs::create_dir_all(&m.dir);
        let _ = std::fs::remove_file(m.dir.join("http.addr"));
        let child = self
            .command(m, bootstrap)
            .stdout(logscan::append(&m.log))
            .stderr(logscan::append(&m.log))
            .spawn()
            .expect("spawn kubbi");
        self.members[i].child = Some(child);
    }

    /// Adds a member that joins through member `seed`.
    pub async fn add_member(&mut self, seed: usize) -> usize {
        let id = self.members.iter().map(|m| m.id).max().unwrap_or(0) + 1;
        let mut m = Member {
            id,
            internal_port: free_port(),
            dir: self.base.path().join(format!("node{id}")),
            log: logscan::child_log(&format!("cluster-node{id}")),
            child: None,
            api: None,
            zone: format!("local/z{id}"),
            extra: Vec::new(),
            env: self.members[seed].env.clone(),
            routes: None,
        };
        m.extra = self.members[seed]
            .extra
            .iter()
            .filter(|a| !a.starts_with("127.0.0.1:"))
            .cloned()
            .collect();
        m.extra.retain(|a| a != "--join");
        m.extra.extend([
            "--join".into(),
            format!("127.0.0.1:{}", self.members[seed].internal_port),
        ]);
        self.members.push(m);
        let i = self.members.len() - 1;
        self.spawn(i, false);
        self.wait_up(i).await;
        i
    }

    /// Waits until member `i` serves HTTP (it has registered in the member table).
    pub async fn wait_up(&mut self, i: usize) {
        let f = self.members[i].dir.join("http.addr");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        let addr = loop {
            if let Some(a) = std::fs::read_to_string(&f).ok().filter(|s| !s.is_empty()) {
                break a;
            }
            let m = &mut self.members[i];
            if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "node {} exited with {status} before serving; its log ends:\n{}",
                    m.id,
                    log_tail(&m.log, 40)
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {} wrote no http.addr in 90 s; its log ends:\n{}",
                m.id,
                log_tail(&m.log, 40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.members[i].api = Some(Api::new(format!("http://{addr}")));
    }

    pub fn api(&self, i: usize) -> &Api {
        self.members[i].api.as_ref().expect("member is up")
    }

    /// `GET /admin/v1/cluster` on member `i`.
    pub async fn status(&self, i: usize) -> Value {
        let api = self.api(i);
        let r = api.get(&self.admin, "/admin/v1/cluster").await;
        r.body
    }

    /// Waits until, seen from a live member, every group has a leader.
    pub async fn wait_all_led(&self) {
        let i = self
            .members
            .iter()
            .position(|m| m.child.is_some())
            .expect("a live member");
        let api = self.api(i).clone();
        let admin = self.admin.clone();
        eventually(Duration::from_secs(90), "every group has a leader", || {
            let api = api.clone();
            let admin = admin.clone();
            async move {
                let r = api.get(&admin, "/admin/v1/cluster").await;
                let shards = r.body["shards"].as_array()?.clone();
                (r.status == StatusCode::OK
                    && !shards.is_empty()
                    && shards.iter().all(|s| s["leader"].is_u64()))
                .then_some(())
            }
        })
        .await;
    }

    /// The leader of raft group `g`, as member `i` reports it.
    pub async fn leader_of(&self, i: usize, g: u64) -> Option<u64> {
        let st = self.status(i).await;
        st["shards"].as_array()?.iter().find(|s| s["id"] == g)?["leader"].as_u64()
    }

    /// The leader of the raft group serving logical shard `shard`, as member `i` reports it.
    pub async fn leader_of_shard(&self, i: usize, shard: u16) -> Option<u64> {
        let st = self.status(i).await;
        let g = super::group_of_shard(&st, shard)?;
        st["shards"].as_array()?.iter().find(|s| s["id"] == g)?["leader"].as_u64()
    }

    /// The region of member `i` (the part of its zone before `/`).
    pub fn zone_region(&self, i: usize) -> &str {
        let z = &self.members[i].zone;
        z.split_once('/').map_or(z.as_str(), |(r, _)| r)
    }

    pub fn index_of(&self, id: u64) -> usize {
        self.members
            .iter()
            .position(|m| m.id == id)
            .expect("member")
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn terminate(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    /// Output of every member's log, for failure messages.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            out.push_str(&format!("--- node {} ---\n", m.id));
            out.push_str(&log_tail(&m.log, 15));
            out.push('\n');
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill9(i);
        }
        if std::thread::panicking() {
            // Keep what a failure needs for diagnosis.
            let keep = std::env::temp_dir().join(format!("kubbi-failed-{}", std::process::id()));
            let _ = std::fs::create_dir_all(&keep);
            for m in &self.members {
                let _ = std::fs::copy(&m.log, keep.join(format!("node{}.log", m.id)));
            }
            eprintln!("cluster logs kept in {}", keep.display());
        }
    }
}
