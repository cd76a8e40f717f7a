//! Failover time of a kubbi cluster: kill -9 the leader of a shard, time until a claim on that
//! shard succeeds through another node; the node is restarted between rounds.
//!
//! ```text
//! cargo bench --bench failover -- --nodes 3 --rounds 10 [--heartbeat-ms 100] [--quiet 1]
//! ```
//!
//! With `--quiet 1` each kill waits until the probe's group has gone quiet on its leader
//! (`raft::quiet`: no heartbeats, the followers watch the leader's liveness pings), so it
//! measures the failover of a quiet group; by default the probe's create has just woken it.
//!
//! Starts its own cluster with `cluster/up` (this build's `kubbi` binary) in a temp dir and
//! stops it with `cluster/down`. Reports every round and the median, min and max.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn get(http: &reqwest::Client, url: &str, admin: &str) -> Option<Value> {
    http.get(url)
        .bearer_auth(admin)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

#[tokio::main]
async fn main() {
    let nodes = arg("--nodes", 3);
    let rounds = arg("--rounds", 10);
    let heartbeat = arg("--heartbeat-ms", 100);
    let quiet = arg("--quiet", 0) != 0;
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    let up = Command::new(format!("{root}/cluster/up"))
        .arg(nodes.to_string())
        .arg("--dir")
        .arg(&run)
        .args(["--heartbeat-ms", &heartbeat.to_string()])
        .env("KUBBI_BIN", env!("CARGO_BIN_EXE_kubbi"))
        .status()
        .expect("cluster/up");
    assert!(up.success(), "cluster/up failed");
    let mut state: Value =
        serde_json::from_slice(&std::fs::read(run.join("cluster.json")).expect("state"))
            .expect("json");
    let admin = state["admin_token"].as_str().expect("admin").to_string();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let url = |state: &Value, i: usize| {
        format!(
            "http://{}",
            state["nodes"][i]["http"].as_str().unwrap_or("")
        )
    };
    let key: Value = http
        .post(format!("{}/admin/v1/api-keys", url(&state, 0)))
        .bearer_auth(&admin)
        .json(&json!({"label": "failover"}))
        .send()
        .await
        .expect("key")
        .json()
        .await
        .expect("key json");
    let key = key["api_key"].as_str().expect("api key").to_string();

    let mut times = Vec::new();
    let mut restarted = Vec::new();
    for round in 0..rounds {
        // A probe kubbi (unlimited reads), its shard and that shard's leader.
        let c: Value = http
            .post(format!("{}/api/v1/kubbis", url(&state, 0)))
            .bearer_auth(&key)
            .json(&json!({"content": "probe", "ttl_seconds": 3600}))
            .send()
            .await
            .expect("create")
            .json()
            .await
            .expect("create json");
        let token = c["claim_token"].as_str().expect("token").to_string();
        let shard = kubbi::ids::ClaimToken::parse(&token)
            .expect("token")
            .shard();
        let st = get(
            &http,
            &format!("{}/admin/v1/cluster", url(&state, 0)),
            &admin,
        )
        .await
        .expect("status");
        // The group whose shard-map ranges hold the probe's logical shard.
        let group = st["shards"]
            .as_array()
            .and_then(|gs| {
                gs.iter().find(|g| {
                    g["ranges"].as_array().is_some_and(|rs| {
                        rs.iter().any(|r| {
                            r[0].as_u64()
                                .zip(r[1].as_u64())
                                .is_some_and(|(lo, hi)| (lo..hi).contains(&u64::from(shard)))
                        })
                    })
                })
            })
            .expect("the probe's group");
        let (group_id, leader) = (
            group["id"].as_u64().expect("group id"),
            group["leader"].as_u64().expect("leader"),
        );
        if quiet {
            let series = format!("kubbi_raft_quiet{{group=\"{group_id}\"}} 1");
            let metrics = format!("{}/metrics", url(&state, (leader - 1) as usize));
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let text = match http.get(&metrics).send().await {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                if text.lines().any(|l| l == series) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "group {group_id} never went quiet"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let victim = (leader - 1) as usize;
        let survivor = (victim + 1) % nodes as usize;
        let pid = state["nodes"][victim]["pid"].as_u64().expect("pid");

        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        let killed = Instant::now();
        let claim_url = format!("{}/r/{token}/claim", url(&state, survivor));
        loop {
            if let Ok(r) = http.post(&claim_url).send().await
                && r.status().as_u16() == 200
            {
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(60),
                "no failover within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t = killed.elapsed();
        println!(
            "round {round}: shard {shard} (group {group_id}), killed node {leader}, first claim after {:.0} ms",
            t.as_secs_f64() * 1000.0
        );
        times.push(t);

        // Restart the victim from its recorded command and wait until it leads again.
        let argv: Vec<String> = state["nodes"][victim]["cmd"]
            .as_array()
            .expect("cmd")
            .iter()
            .map(|a| a.as_str().expect("arg").to_string())
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run.join(format!("node{leader}.log")))
            .expect("log");
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("restart");
        state["nodes"][victim]["pid"] = json!(child.id());
        restarted.push(child);
        std::fs::write(
            run.join("cluster.json"),
            serde_json::to_vec_pretty(&state).expect("json"),
        )
        .expect("state");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ok = get(
                &http,
                &format!("{}/admin/v1/cluster", url(&state, victim)),
                &admin,
            )
            .await
            .is_some_and(|st| {
                st["shards"].as_array().is_some_and(|s| {
                    s.iter().all(|s| s["leader"].is_u64())
                        && s.iter().any(|s| s["leader"] == json!(leader))
                })
            });
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "restarted node did not rejoin");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "\nfailover over {rounds} leader kills ({nodes} nodes, heartbeat {heartbeat} ms, {}): median {:.0} ms, min {:.0} ms, max {:.0} ms",
        if quiet {
            "quiet groups"
        } else {
            "awake groups"
        },
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(times[times.len() - 1])
    );
    let _ = Command::new(format!("{root}/cluster/down"))
        .arg("--dir")
        .arg(&run)
        .status();
}
