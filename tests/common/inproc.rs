//! A cluster of real nodes inside the test process: real RocksDB in temp dirs, real raft groups,
//! real HTTP (public and internal) over loopback. What it adds over [`super::cluster`] (node
//! processes) is reach: each node's clock seam, storage and executor, so a test can move one
//! leader's clock at run time, hand a group's leadership to a chosen node, or read a replica's
//! raw state. Crashes need processes; this cluster stops nodes gracefully.
#![allow(dead_code)]

use std::time::Duration;

use kubbi::config::{Config, parse_bootstrap};
use kubbi::ids::GroupId;
use kubbi::node::{self, NodeHandle};
use kubbi::transport::messages::ShardOp;
use reqwest::StatusCode;
use serde_json::Value;
use zeroize::Zeroizing;

use super::cluster::free_port;
use super::{Api, eventually, fast_config, logscan};

pub struct InProcCluster {
    pub base: tempfile::TempDir,
    configs: Vec<Config>,
    nodes: Vec<Option<NodeHandle>>,
    apis: Vec<Api>,
    pub admin: String,
}

impl InProcCluster {
    /// Starts `n` nodes (ids `1..=n`) that bootstrap a new cluster together, and waits until
    /// every group has a leader.
    pub async fn start(n: u64) -> Self {
        logscan::init();
        let base = tempfile::tempdir().expect("tempdir");
        let secret = format!("{:032x}", rand::random::<u128>());
        logscan::record("cluster-secret", &secret);
        let admin = format!("{:032x}", rand::random::<u128>());
        logscan::record("admin-token", &admin);
        let keys_file = base.path().join("node-keys.json");
        let key = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            rand::random::<[u8; 32]>(),
        );
        std::fs::write(
            &keys_file,
            format!(r#"{{"current":1,"keys":[{{"id":1,"key":"{key}"}}]}}"#),
        )
        .expect("key file");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&keys_file, std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
        }
        logscan::record_key_file(&keys_file);
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let bootstrap = parse_bootstrap(
            &(1..=n)
                .map(|id| format!("{id}=127.0.0.1:{}@local/z{id}", ports[id as usize - 1]))
                .collect::<Vec<_>>()
                .join(","),
        )
        .expect("bootstrap");
        let configs: Vec<Config> = (1..=n)
            .map(|id| {
                let mut c = fast_config(&base.path().join(format!("node{id}")));
                c.node_id = id;
                c.node_key_file = Some(keys_file.clone());
                c.admin_token = Some(Zeroizing::new(admin.clone()));
                c.cluster.internal_addr = Some(format!("127.0.0.1:{}", ports[id as usize - 1]));
                c.cluster.zone = format!("local/z{id}");
                c.cluster.bootstrap = bootstrap.clone();
                c.cluster.secret = Some(Zeroizing::new(secret.clone()));
                c
            })
            .collect();
        let started = futures::future::join_all(configs.iter().cloned().map(node::start)).await;
        let nodes: Vec<Option<NodeHandle>> = started
            .into_iter()
            .map(|r| Some(r.expect("node starts")))
            .collect();
        let apis = nodes
            .iter()
            .map(|h| Api::new(format!("http://{}", h.as_ref().expect("up").http_addr)))
            .collect();
        let c = Self {
            base,
            configs,
            nodes,
            apis,
            admin,
        };
        c.wait_all_led().await;
        c
    }

    pub fn api(&self, i: usize) -> &Api {
        &self.apis[i]
    }

    pub fn handle(&self, i: usize) -> &NodeHandle {
        self.nodes[i].as_ref().expect("node is running")
    }

    pub fn id(&self, i: usize) -> u64 {
        self.configs[i].node_id
    }

    /// A fresh API key, once the system group takes writes.
    pub async fn api_key(&self) -> String {
        let api = self.api(0).clone();
        let admin = self.admin.clone();
        eventually(Duration::from_secs(30), "an API key is created", || {
            let api = api.clone();
            let admin = admin.clone();
            async move {
                let r = api
                    .send(
                        api.http
                            .post(api.url("/admin/v1/api-keys"))
                            .bearer_auth(&admin)
                            .json(&serde_json::json!({ "label": "inproc" })),
                    )
                    .await;
                (r.status == StatusCode::CREATED)
                    .then(|| r.body["api_key"].as_str().map(str::to_string))
                    .flatten()
            }
        })
        .await
    }

    /// `GET /admin/v1/cluster` through the first running node.
    pub async fn status(&self) -> Value {
        let i = self.running().next().expect("a running node");
        self.api(i).get(&self.admin, "/admin/v1/cluster").await.body
    }

    fn running(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].is_some())
    }

    /// Waits until every group has a leader among the running nodes.
    pub async fn wait_all_led(&self) {
        eventually(
            Duration::from_secs(60),
            "every group has a leader",
            || async {
                let st = self.status().await;
                let shards = st["shards"].as_array()?.clone();
                let up: Vec<u64> = self.running().map(|i| self.id(i)).collect();
                (!shards.is_empty()
                    && shards
                        .iter()
                        .all(|s| s["leader"].as_u64().is_some_and(|l| up.contains(&l))))
                .then_some(())
            },
        )
        .await;
    }

    /// The raft group serving the kubbi with id `id` (a UUID string).
    pub async fn group_of(&self, id: &str) -> u64 {
        let hex: String = id.chars().filter(|c| *c != '-').take(4).collect();
        let shard = u16::from_str_radix(&hex, 16).expect("id starts with its shard");
        super::group_of_shard(&self.status().await, shard).expect("a group serves the shard")
    }

    /// The leader of group `g` as node `i`'s raft sees it.
    pub fn leader_seen_by(&self, i: usize, g: GroupId) -> Option<u64> {
        self.handle(i).service.router().executor().status(g)?.leader
    }

    /// Hands group `g`'s leadership to node `i` and waits until `i` leads it. The rebalancer
    /// may hand it back to the group's preferred leader at any time afterwards.
    pub async fn lead(&self, g: u64, i: usize) {
        let to = self.id(i);
        let g = g as GroupId;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::time::Instant::now() < deadline {
            if self.leader_seen_by(i, g) == Some(to) {
                return;
            }
            let from = self.running().next().expect("a running node");
            let _ = self
                .handle(from)
                .service
                .router()
                .call(g, ShardOp::TransferLeader { to })
                .await;
            let wait = tokio::time::Instant::now() + Duration::from_secs(2);
            while tokio::time::Instant::now() < wait && self.leader_seen_by(i, g) != Some(to) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        panic!("node {to} did not take over group {g} within 60 s");
    }

    /// Stops node `i` gracefully (its groups elect other leaders).
    pub async fn stop(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.shutdown().await;
        }
    }

    /// Starts node `i` again on its data directory.
    pub async fn restart(&mut self, i: usize) {
        let n = node::start(self.configs[i].clone())
            .await
            .expect("node restarts");
        self.apis[i] = Api::new(format!("http://{}", n.http_addr));
        self.nodes[i] = Some(n);
    }

    pub async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i).await;
        }
    }
}
