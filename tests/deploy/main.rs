//! deploy/: the sample configurations parse and validate, and the compose cluster (an image
//! assembled from this build's binary, no base image) serves, and keeps serving when the
//! container of a shard leader stops.

#[path = "../common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn env_file(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .expect("env file")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `name`/`value` pairs of the container env in the Kubernetes manifest.
fn k8s_env(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path).expect("manifest");
    let mut out = BTreeMap::new();
    let mut name: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if let Some(n) = line.strip_prefix("- name: ") {
            name = Some(n.trim().to_string());
        } else if let (Some(v), Some(n)) = (line.strip_prefix("value: "), name.take()) {
            out.insert(n, v.trim().trim_matches('"').to_string());
        }
    }
    out
}

fn private(dir: &Path, name: &str, text: &str) -> String {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&p)
        .expect("secret");
    f.write_all(text.as_bytes()).expect("write");
    p.display().to_string()
}

/// Runs `kubbi serve --check-config` with exactly `env` (secret paths replaced by temp files).
fn check(env: &BTreeMap<String, String>, host: &str) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = [
        (
            "KUBBI_CLUSTER_SECRET_FILE",
            private(dir.path(), "cs", "0123456789abcdef0123456789"),
        ),
        (
            "KUBBI_ADMIN_TOKEN_FILE",
            private(dir.path(), "at", "0123456789abcdef0123456789"),
        ),
        (
            "KUBBI_NODE_KEY_FILE",
            private(
                dir.path(),
                "nk",
                r#"{"current":1,"keys":[{"id":1,"key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}]}"#,
            ),
        ),
    ];
    let mut cmd = Command::new(common::kubbi_bin());
    cmd.args(["serve", "--check-config"])
        .env_clear()
        .env("HOSTNAME", host);
    for (k, v) in env {
        cmd.env(k, v);
    }
    for (k, v) in &secrets {
        if env.contains_key(*k) {
            cmd.env(k, v);
        }
    }
    cmd.env("KUBBI_DATA_DIR", dir.path().join("data"));
    cmd.output().expect("kubbi runs")
}

#[test]
fn sample_configurations_parse_and_validate() {
    let d = root().join("deploy");
    let mut cases: Vec<(String, BTreeMap<String, String>, &str)> = Vec::new();
    for n in 1..=3 {
        let mut env = env_file(&d.join("compose/common.env"));
        env.extend(env_file(&d.join(format!("compose/node{n}.env"))));
        env.insert("KUBBI_INTERNAL_ADDR".into(), "0.0.0.0:7070".into());
        cases.push((format!("compose node{n}"), env, "node"));
    }
    cases.push(("systemd".into(), env_file(&d.join("kubbi.env")), "host"));
    let mut k8s = k8s_env(&d.join("k8s/kubbi.yaml"));
    assert!(k8s.len() > 8, "manifest env found: {k8s:?}");
    // What Kubernetes does to $(VAR) references.
    let pod = "kubbi-1".to_string();
    let zone = k8s.get("NODE_ZONE").cloned().unwrap_or_default();
    for v in k8s.values_mut() {
        *v = v
            .replace("$(POD_NAME)", &pod)
            .replace("$(NODE_ZONE)", &zone);
    }
    cases.push(("kubernetes".into(), k8s, "kubbi-1"));
    for (what, env, host) in cases {
        let out = check(&env, host);
        assert!(
            out.status.success(),
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // And a broken one is refused: bootstrap without this node.
    let mut bad = env_file(&d.join("kubbi.env"));
    bad.insert("KUBBI_NODE_ID".into(), "9".into());
    assert!(!check(&bad, "h").status.success());
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

struct Compose {
    dir: PathBuf,
    project: String,
    tag: String,
}

impl Compose {
    fn cmd(&self) -> Command {
        let mut c = Command::new("docker-compose");
        c.current_dir(&self.dir)
            .env("KUBBI_IMAGE", &self.tag)
            .args(["-p", &self.project, "-f", "docker-compose.yml"]);
        c
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        // Every container's log, for scripts/scan-test-logs.
        if let Ok(out) = self.cmd().args(["logs", "--no-color"]).output() {
            common::logscan::save_output("compose", &out.stdout);
            common::logscan::save_output("compose", &out.stderr);
        }
        let _ = self.cmd().args(["down", "-v", "--remove-orphans"]).output();
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.tag])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_cluster_serves_across_containers_and_survives_a_leader_stop() {
    let work = tempfile::tempdir().expect("tempdir");
    let deploy = work.path().join("deploy");
    run(Command::new("cp")
        .arg("-r")
        .arg(root().join("deploy"))
        .arg(&deploy));
    run(Command::new("cp")
        .arg("-r")
        .arg(root().join("scripts"))
        .arg(work.path()));
    let suffix = format!("{:08x}", rand::random::<u32>());
    let compose = Compose {
        dir: deploy.clone(),
        project: format!("kubbitest{suffix}"),
        tag: format!("kubbi:test-{suffix}"),
    };
    run(Command::new(deploy.join("build-image")).args([
        "--bin",
        &common::kubbi_bin(),
        "--tag",
        &compose.tag,
    ]));
    run(&mut Command::new(deploy.join("compose/make-secrets")));
    let secrets = deploy.join("compose/secrets");
    for (kind, file) in [
        ("cluster-secret", "cluster-secret"),
        ("admin-token", "admin-token"),
    ] {
        let text = std::fs::read_to_string(secrets.join(file)).expect("secret");
        common::logscan::record(kind, text.trim());
    }
    common::logscan::record_key_file(&secrets.join("node-keys.json"));
    run(compose.cmd().args(["up", "-d"]));
    let admin = std::fs::read_to_string(deploy.join("compose/secrets/admin-token"))
        .expect("admin token")
        .trim()
        .to_string();
    let apis: Vec<common::Api> = (1..=3)
        .map(|n| common::Api::new(format!("http://127.0.0.1:1808{n}")))
        .collect();
    // Every node, not only the first, must know a leader for every group before the test
    // sends it work (a node still starting answers 503, as it should).
    for api in &apis {
        let api = api.clone();
        common::eventually(Duration::from_secs(180), "every node ready", || {
            let api = api.clone();
            async move {
                let r = api.http.get(api.url("/health/ready")).send().await.ok()?;
                (r.status() == StatusCode::OK).then_some(())
            }
        })
        .await;
    }

    let (key, _) = apis[0].new_api_key(&admin, "compose").await;
    let c = apis[0]
        .create(
            &key,
            json!({"content": "across containers", "max_retrievals": 3}),
        )
        .await;
    assert_eq!(c.status, StatusCode::CREATED, "{:?}", c.body);
    let token = c.body["claim_token"].as_str().expect("t").to_string();
    let first = apis[1].claim(&token).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    assert_eq!(first.body["content"], "across containers");
    assert_eq!(first.body["retrieval_count"], 1);

    // Stop the container that leads this kubbi's group, then claim through a survivor.
    let shard = kubbi::ids::ClaimToken::parse(&token)
        .expect("token")
        .shard();
    let st = apis[2]
        .send(
            apis[2]
                .http
                .get(apis[2].url("/admin/v1/cluster"))
                .bearer_auth(&admin),
        )
        .await
        .body;
    let group = common::group_of_shard(&st, shard).expect("a group serves the shard");
    let leader = st["shards"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["id"] == group))
        .and_then(|s| s["leader"].as_u64())
        .expect("leader");
    run(compose.cmd().args(["stop", &format!("node{leader}")]));
    let survivor = apis[if leader == 1 { 1 } else { 0 }].clone();
    let again = common::eventually(
        Duration::from_secs(60),
        "claim after the leader stopped",
        || {
            let api = survivor.clone();
            let token = token.clone();
            async move {
                let r = api.claim(&token).await;
                (r.status == StatusCode::OK).then_some(r.body)
            }
        },
    )
    .await;
    assert_eq!(again["content"], "across containers");
    assert_eq!(again["retrieval_count"], 2);
}
