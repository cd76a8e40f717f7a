//! Real node processes forming a cluster: any node serves any request, failover, membership
//! changes under load, full restarts, and refusal of a node whose data directory was wiped.

#[path = "../common/mod.rs"]
mod common;
mod regions;

use common::cluster::Cluster;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_on_one_node_preview_and_claim_on_another_at_once() {
    let c = Cluster::start(3).await;
    let (key, _) = c.api(0).new_api_key(&c.admin, "x").await;
    for i in 0..20 {
        let created = c
            .api(0)
            .create(
                &key,
                json!({"content": format!("payload {i}"), "max_retrievals": 2}),
            )
            .await;
        assert_eq!(
            created.status,
            StatusCode::CREATED,
            "{:?}\n{}",
            created.body,
            c.logs_tail()
        );
        let token = created.body["claim_token"].as_str().expect("token");
        // Right away, through other nodes: never a false 404.
        let p = c.api(2).preview(token).await;
        assert_eq!(p.status, StatusCode::OK, "{:?}", p.body);
        let p = c.api(1).inspect(token).await;
        assert_eq!(p.status, StatusCode::OK, "{:?}", p.body);
        let claim = c.api(2).claim(token).await;
        assert_eq!(claim.status, StatusCode::OK, "{:?}", claim.body);
        assert_eq!(claim.body["content"], format!("payload {i}"));
        let claim = c.api(1).claim(token).await;
        assert_eq!(claim.body["burned"], true);
        assert_eq!(c.api(0).claim(token).await.status, StatusCode::GONE);
        let id = created.body["id"].as_str().expect("id");
        let d = c.api(1).get(&key, &format!("/api/v1/kubbis/{id}")).await;
        assert_eq!(d.body["status"], "burned");
    }
    let list = c.api(2).get(&key, "/api/v1/kubbis?limit=100").await;
    assert_eq!(list.body["pagination"]["total"], 20);
    let st = c.status(1).await;
    assert_eq!(st["nodes"].as_array().map(Vec::len), Some(3), "{st}");
    for s in st["shards"].as_array().expect("shards") {
        assert_eq!(s["replicas"].as_array().map(Vec::len), Some(3), "{s}");
    }
}

/// A new cluster has one data group per node, each led by a different node, and their ranges
/// cover the 65,536 logical shards exactly; every node routes by the same stored map, which a
/// restart without `--bootstrap` reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_has_one_group_per_node_over_the_whole_shard_space() {
    let mut c = Cluster::start(3).await;
    type Spread = (Vec<u64>, Vec<(u64, u64)>);
    let spread = |st: &Value| -> Option<Spread> {
        let mut leaders = Vec::new();
        let mut ranges = Vec::new();
        for s in st["shards"].as_array()? {
            if !s["id"].is_u64() {
                continue;
            }
            leaders.push(s["leader"].as_u64()?);
            for r in s["ranges"].as_array()? {
                ranges.push((r[0].as_u64()?, r[1].as_u64()?));
            }
        }
        leaders.sort_unstable();
        ranges.sort_unstable();
        Some((leaders, ranges))
    };
    let (leaders, ranges) = common::eventually(
        Duration::from_secs(60),
        "each node leads one data group",
        || {
            let st = c.status(0);
            async move {
                let st = st.await;
                spread(&st).filter(|(l, _)| l == &[1, 2, 3])
            }
        },
    )
    .await;
    assert_eq!(leaders, [1, 2, 3]);
    let mut at = 0;
    for (lo, hi) in &ranges {
        assert_eq!(*lo, at, "ranges leave a gap or overlap: {ranges:?}");
        at = *hi;
    }
    assert_eq!(at, 65_536, "{ranges:?}");
    for i in 0..3 {
        let st = c.status(i).await;
        assert_eq!(st["map_version"], 1, "node {i}: {st}");
        assert_eq!(
            st["shards"].as_array().map(Vec::len),
            Some(4),
            "node {i}: {st}"
        );
    }
    // Kubbis land in every group: a plain create picks a group this node leads.
    let (key, _) = c.api(0).new_api_key(&c.admin, "x").await;
    let mut groups = std::collections::BTreeSet::new();
    for i in 0..12 {
        let r = c.api(i % 3).create(&key, json!({"content": "x"})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        let id = r.body["id"].as_str().expect("id").replace('-', "");
        let shard = u64::from_str_radix(&id[..4], 16).expect("hex");
        let group = ranges
            .iter()
            .position(|(lo, hi)| (*lo..*hi).contains(&shard));
        groups.insert(group.expect("in a range"));
    }
    assert_eq!(
        groups.len(),
        3,
        "creates through every node reach every group"
    );
    // The map is stored: a restart without --bootstrap starts the same groups.
    c.kill9(2);
    c.spawn(2, false);
    c.wait_up(2).await;
    c.wait_all_led().await;
    let st = c.status(2).await;
    assert_eq!(st["shards"].as_array().map(Vec::len), Some(4), "{st}");
    let log = std::fs::read_to_string(&c.members[0].log).unwrap_or_default()
        + &std::fs::read_to_string(&c.members[1].log).unwrap_or_default()
        + &std::fs::read_to_string(&c.members[2].log).unwrap_or_default();
    assert!(
        log.contains("stored the cluster's shard map"),
        "no node stored the map"
    );
    assert!(
        !log.contains("differ from the cluster's shard map"),
        "a node disagrees"
    );
}

/// What load clients saw: acknowledged creates and claims, and claims left unanswered.
#[derive(Default)]
struct History {
    created: std::collections::HashMap<String, (String, String, Option<u64>)>,
    claims_ok: std::collections::HashMap<String, u64>,
    claims_unknown: std::collections::HashMap<String, u64>,
    burned: Vec<String>,
    errors: Vec<String>,
    acked: u64,
    /// Every acknowledged kubbi, (token, content), in the order acknowledged: every client
    /// claims among the newest, so clients race on the same kubbis.
    pool: Vec<(String, String)>,
    /// Claims in flight per token, and claims started while another of the same kubbi was.
    in_flight: std::collections::HashMap<String, u32>,
    overlapping: u64,
}

/// Claims pick among this many newest kubbis.
const RACE_WINDOW: usize = 8;

type Shared = std::sync::Arc<std::sync::Mutex<History>>;

/// `clients` closed-loop clients that create and claim through random live nodes until `stop`;
/// each claims one of the [`RACE_WINDOW`] newest kubbis of any client, so claims of one kubbi
/// overlap (counted in `overlapping`).
fn load(
    apis: Vec<common::Api>,
    key: String,
    clients: usize,
    history: Shared,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    use std::sync::atomic::Ordering;
    (0..clients)
        .map(|c| {
            let apis = apis.clone();
            let key = key.clone();
            let h = history.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let api = &apis[(c + i) % apis.len()];
                    let content = format!("c{c}-{i}-{:016x}", rand::random::<u64>());
                    let max = if i.is_multiple_of(3) {
                        None
                    } else {
                        Some((i % 4 + 1) as u64)
                    };
                    let r = api
                        .http
                        .post(api.url("/api/v1/kubbis"))
                        .bearer_auth(&key)
                        .json(&json!({"content": content, "max_retrievals": max}))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == StatusCode::CREATED => {
                            let b: serde_json::Value = r.json().await.unwrap_or_default();
                            let token = b["claim_token"].as_str().unwrap_or_default().to_string();
                            let mut h = h.lock().expect("lock");
                            h.created.insert(
                                b["id"].as_str().unwrap_or_default().to_string(),
                                (token.clone(), content.clone(), max),
                            );
                            h.acked += 1;
                            h.pool.push((token, content));
                        }
                        Ok(r) => {
                            let s = r.status();
                            let retry = r.headers().get("retry-after").is_some();
                            if s != StatusCode::SERVICE_UNAVAILABLE || !retry {
                                h.lock().expect("lock").errors.push(format!("create: {s}"));
                            }
                        }
                        Err(_) => {} // a killed node: may or may not have created; not acknowledged
                    }
                    let (target, content) = {
                        let mut h = h.lock().expect("lock");
                        if h.pool.is_empty() {
                            continue;
                        }
                        let back = rand::random_range(0..h.pool.len().min(RACE_WINDOW));
                        let (target, content) = h.pool[h.pool.len() - 1 - back].clone();
                        *h.claims_unknown.entry(target.clone()).or_insert(0) += 1;
                        let n = h.in_flight.entry(target.clone()).or_insert(0);
                        *n += 1;
                        if *n > 1 {
                            h.overlapping += 1;
                        }
                        (target, content)
                    };
                    let done = |h: &mut History| {
                        if let Some(n) = h.in_flight.get_mut(&target) {
                            *n -= 1;
                        }
                    };
                    let api = &apis[(c + i + 1) % apis.len()];
                    let r = api
                        .http
                        .post(api.url(&format!("/r/{target}/claim")))
                        .send()
                        .await;
                    let Ok(r) = r else {
                        done(&mut h.lock().expect("lock"));
                        continue;
                    };
                    let status = r.status();
                    let retry = r.headers().get("retry-after").is_some();
                    let body: serde_json::Value = r.json().await.unwrap_or_default();
                    let mut h = h.lock().expect("lock");
                    done(&mut h);
                    if status == StatusCode::SERVICE_UNAVAILABLE && retry {
                        continue; // indeterminate: stays counted as unknown
                    }
                    if let Some(n) = h.claims_unknown.get_mut(&target) {
                        *n -= 1;
                    }
                    h.acked += 1;
                    if status == StatusCode::OK {
                        if body["content"] != content.as_str() {
                            h.errors.push(format!("claim of {target}: other bytes"));
                        }
                        *h.claims_ok.entry(target.clone()).or_insert(0) += 1;
                        if body["burned"] == true {
                            h.burned.push(target);
                        }
                    } else if status != StatusCode::GONE {
                        h.errors.push(format!("claim: {status} {body}"));
                    }
                }
            })
        })
        .collect()
}

/// Every acknowledged create is there with an exact count, burned stays burned, and active
/// kubbis return the created bytes.
async fn verify(api: &common::Api, key: &str, h: &History) {
    assert!(
        h.created.len() > 50,
        "only {} creates acknowledged",
        h.created.len()
    );
    for (id, (token, content, max)) in &h.created {
        let d = api.get(key, &format!("/api/v1/kubbis/{id}")).await;
        assert_eq!(
            d.status,
            StatusCode::OK,
            "acknowledged create {id} lost: {:?}",
            d.body
        );
        let count = d.body["retrieval_count"].as_u64().expect("count");
        let ok = h.claims_ok.get(token).copied().unwrap_or(0);
        let unknown = h.claims_unknown.get(token).copied().unwrap_or(0);
        assert!(
            count >= ok && count <= ok + unknown,
            "{id}: count {count}, acknowledged {ok}, unanswered {unknown}"
        );
        if let Some(m) = max {
            assert!(count <= *m, "{id}: {count} claims over max {m}");
        }
        if h.burned.contains(token) {
            assert_eq!(d.body["status"], "burned", "{id} un-burned");
        } else if d.body["status"] == "active" {
            let r = api.claim(token).await;
            assert_eq!(r.status, StatusCode::OK, "{id}: {:?}", r.body);
            assert_eq!(r.body["content"], content.as_str(), "{id}: bytes changed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_9_under_load_loses_nothing_and_fails_over() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut c = Cluster::start(3).await;
    let (key, _) = c.api(0).new_api_key(&c.admin, "load").await;
    // A kubbi to probe the availability of its group, whose leader is the victim. (A plain
    // create lands in a group the receiving node leads, so the group is whichever that is.)
    let created = c.api(0).create(&key, json!({"content": "probe"})).await;
    assert_eq!(
        created.status,
        StatusCode::CREATED,
        "{:?}\n{}",
        created.body,
        c.logs_tail()
    );
    let probe = created.body["claim_token"].as_str().expect("t").to_string();
    let shard = kubbi::ids::ClaimToken::parse(&probe)
        .expect("token")
        .shard();
    let group = common::group_of_shard(&c.status(0).await, shard).expect("a group");
    let victim_id = c
        .leader_of(0, group)
        .await
        .expect("the probe's group has a leader");
    let victim = c.index_of(victim_id);
    let survivors: Vec<common::Api> = (0..3)
        .filter(|i| *i != victim)
        .map(|i| c.api(i).clone())
        .collect();
    let all: Vec<common::Api> = (0..3).map(|i| c.api(i).clone()).collect();

    let history: Shared = Default::default();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let clients = load(all, key.clone(), 16, history.clone(), stop.clone());
    let h2 = history.clone();
    common::eventually(std::time::Duration::from_secs(60), "load running", || {
        let h = h2.clone();
        async move { (h.lock().expect("lock").acked > 300).then_some(()) }
    })
    .await;

    c.kill9(victim);
    let killed = std::time::Instant::now();
    let probe_api = survivors[0].clone();
    common::eventually(
        std::time::Duration::from_secs(30),
        "the probe's group serves a claim again",
        || {
            let api = probe_api.clone();
            let t = probe.clone();
            async move { (api.claim(&t).await.status == StatusCode::OK).then_some(()) }
        },
    )
    .await;
    let failover = killed.elapsed();
    eprintln!("failover of group {group} (leader kill to first successful claim): {failover:?}");

    // More load on the survivors, then bring the victim back.
    let h2 = history.clone();
    let before = h2.lock().expect("lock").acked;
    common::eventually(std::time::Duration::from_secs(60), "load continues", || {
        let h = h2.clone();
        async move { (h.lock().expect("lock").acked > before + 200).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        let _ = t.await;
    }
    c.spawn(victim, true);
    c.wait_up(victim).await;
    c.wait_all_led().await;
    let h = std::mem::take(&mut *history.lock().expect("lock"));
    assert!(
        h.errors.is_empty(),
        "non-retriable errors: {:?}",
        &h.errors[..h.errors.len().min(5)]
    );
    verify(c.api(victim), &key, &h).await;
    assert!(
        h.overlapping >= 20,
        "only {} claims overlapped another claim of the same kubbi",
        h.overlapping
    );
    eprintln!(
        "{} claims overlapped another claim of the same kubbi",
        h.overlapping
    );
    assert!(
        failover < std::time::Duration::from_secs(10),
        "failover took {failover:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_every_node_and_starting_again_keeps_everything() {
    let mut c = Cluster::start(3).await;
    let (key, _) = c.api(0).new_api_key(&c.admin, "x").await;
    let mut made = Vec::new();
    for i in 0..30 {
        let r = c
            .api(i % 3)
            .create(
                &key,
                json!({"content": format!("v{i}"), "max_retrievals": 2, "metadata": {"i": i}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
        made.push(r.body);
    }
    let first = made[0]["claim_token"].as_str().expect("t").to_string();
    assert_eq!(c.api(1).claim(&first).await.status, StatusCode::OK);
    for i in 0..3 {
        c.terminate(i);
    }
    for i in 0..3 {
        c.spawn(i, true);
    }
    for i in 0..3 {
        c.wait_up(i).await;
    }
    c.wait_all_led().await;
    // The key works everywhere; every kubbi is intact with its count and metadata.
    for (i, b) in made.iter().enumerate() {
        let api = c.api(i % 3);
        let d = api
            .get(
                &key,
                &format!("/api/v1/kubbis/{}", b["id"].as_str().expect("id")),
            )
            .await;
        assert_eq!(d.status, StatusCode::OK, "{:?}", d.body);
        assert_eq!(d.body["retrieval_count"], if i == 0 { 1 } else { 0 });
        assert_eq!(d.body["metadata"]["i"], i);
        let claim = api.claim(b["claim_token"].as_str().expect("t")).await;
        assert_eq!(claim.body["content"], format!("v{i}"));
        assert_eq!(
            claim.body["burned"],
            i == 0,
            "the first was claimed before the restart"
        );
    }
    assert_eq!(c.api(2).claim(&first).await.status, StatusCode::GONE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_wiped_data_dir_is_refused_until_removed_and_added_again() {
    let mut c = Cluster::start(3).await;
    let (key, _) = c.api(0).new_api_key(&c.admin, "x").await;
    let kept = c
        .api(0)
        .create(&key, json!({"content": "kept", "max_retrievals": 3}))
        .await;
    c.kill9(2);
    std::fs::remove_dir_all(&c.members[2].dir).expect("wipe");
    // Same id, same flags, empty data directory: refused, the process exits.
    c.spawn(2, true);
    let mut child = c.members[2].child.take().expect("child");
    let status = common::eventually(
        std::time::Duration::from_secs(60),
        "the wiped node exits",
        || {
            let done = child.try_wait().ok().flatten();
            async move { done }
        },
    )
    .await;
    assert!(!status.success());
    let log = std::fs::read_to_string(&c.members[2].log).expect("log");
    assert!(
        log.contains("remove it first"),
        "the refusal says what to do"
    );
    // The cluster still serves (two of three replicas).
    let t = kept.body["claim_token"].as_str().expect("t");
    assert_eq!(c.api(0).claim(t).await.status, StatusCode::OK);

    // Remove node 3, wait until it is drained out of every group, then join it again.
    let api = c.api(0).clone();
    let r = api
        .send(
            api.http
                .delete(api.url("/admin/v1/nodes/3"))
                .bearer_auth(&c.admin),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let admin = c.admin.clone();
    common::eventually(std::time::Duration::from_secs(90), "node 3 removed", || {
        let api = api.clone();
        let admin = admin.clone();
        async move {
            let st = api.get(&admin, "/admin/v1/cluster").await.body;
            let removed = st["nodes"]
                .as_array()?
                .iter()
                .any(|n| n["id"] == 3 && n["state"] == "removed");
            let out = st["shards"].as_array()?.iter().all(|s| {
                !s["replicas"]
                    .as_array()
                    .is_some_and(|r| r.contains(&json!(3)))
                    && !s["learners"]
                        .as_array()
                        .is_some_and(|r| r.contains(&json!(3)))
            });
            (removed && out).then_some(())
        }
    })
    .await;
    c.members[2].extra = vec![
        "--join".into(),
        format!("127.0.0.1:{}", c.members[0].internal_port),
    ];
    c.spawn(2, false);
    c.wait_up(2).await;
    let api = c.api(0).clone();
    let admin = c.admin.clone();
    common::eventually(
        std::time::Duration::from_secs(120),
        "node 3 back in every shard",
        || {
            let api = api.clone();
            let admin = admin.clone();
            async move {
                let st = api.get(&admin, "/admin/v1/cluster").await.body;
                let shards = st["shards"].as_array()?;
                shards
                    .iter()
                    .all(|s| {
                        s["replicas"]
                            .as_array()
                            .is_some_and(|r| r.contains(&json!(3)))
                    })
                    .then_some(())
            }
        },
    )
    .await;
    assert_eq!(c.api(2).claim(t).await.body["retrieval_count"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_fourth_node_and_removing_an_old_one_under_load() {
    use std::sync::atomic::{AtomicBool, Ordering};
    // Sixteen groups, so the new node gets replicas of many (a new cluster has one per node,
    // and until groups split a joining node only takes replicas of the existing ones).
    let mut c = Cluster::start_with(3, &["--initial-groups", "16"]).await;
    let (key, _) = c.api(0).new_api_key(&c.admin, "load").await;
    let history: Shared = Default::default();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    // Clients use nodes 1 and 3; node 2 is the one that leaves.
    let apis = vec![c.api(0).clone(), c.api(2).clone()];
    let clients = load(apis, key.clone(), 16, history.clone(), stop.clone());

    let status = |c: &Cluster| {
        let api = c.api(0).clone();
        let admin = c.admin.clone();
        async move { api.get(&admin, "/admin/v1/cluster").await.body }
    };
    let fourth = c.add_member(0).await;
    assert_eq!(c.members[fourth].id, 4);
    let s = status(&c);
    drop(s);
    common::eventually(
        std::time::Duration::from_secs(120),
        "node 4 holds replicas",
        || {
            let st = status(&c);
            async move {
                let st = st.await;
                let shards = st["shards"].as_array()?;
                let with4 = shards
                    .iter()
                    .filter(|s| {
                        s["replicas"]
                            .as_array()
                            .is_some_and(|r| r.contains(&json!(4)))
                    })
                    .count();
                let full = shards
                    .iter()
                    .filter(|s| s["id"].is_u64())
                    .all(|s| s["replicas"].as_array().is_some_and(|r| r.len() == 3));
                if !(with4 >= 8 && full) {
                    let brief: Vec<String> = shards
                        .iter()
                        .map(|s| {
                            format!(
                                "{}:{}:{}",
                                s["id"],
                                s["replicas"],
                                s.get("error").unwrap_or(&json!(""))
                            )
                        })
                        .collect();
                    eprintln!("waiting: with4={with4} full={full} {brief:?}");
                }
                (with4 >= 8 && full).then_some(())
            }
        },
    )
    .await;

    let api = c.api(0).clone();
    let r = api
        .send(
            api.http
                .delete(api.url("/admin/v1/nodes/2"))
                .bearer_auth(&c.admin),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    common::eventually(
        std::time::Duration::from_secs(120),
        "node 2 drained and removed",
        || {
            let st = status(&c);
            async move {
                let st = st.await;
                let removed = st["nodes"]
                    .as_array()?
                    .iter()
                    .any(|n| n["id"] == 2 && n["state"] == "removed");
                let shards = st["shards"].as_array()?;
                let out = shards.iter().all(|s| {
                    s["replicas"].as_array().is_some_and(|r| {
                        !r.contains(&json!(2)) && (r.len() == 3 || !s["id"].is_u64())
                    })
                });
                (removed && out).then_some(())
            }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        let _ = t.await;
    }
    c.terminate(1);
    let h = std::mem::take(&mut *history.lock().expect("lock"));
    assert!(
        h.errors.is_empty(),
        "only retriable 503s are allowed: {:?}",
        &h.errors[..h.errors.len().min(5)]
    );
    assert!(
        h.acked > 500,
        "load ran throughout ({} acknowledged)",
        h.acked
    );
    verify(c.api(fourth), &key, &h).await;
}

/// Runs `cluster/down` on a run directory still holding a `cluster.json` when dropped.
struct DownOnDrop(String, std::path::PathBuf);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        if self.1.join("cluster.json").exists() {
            let _ = std::process::Command::new(&self.0)
                .arg("--dir")
                .arg(&self.1)
                .output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_up_and_down_scripts_and_the_status_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    let root = env!("CARGO_MANIFEST_DIR");
    let bin = common::kubbi_bin();
    let bin = bin.as_str();
    let up = std::process::Command::new(format!("{root}/cluster/up"))
        .arg("3")
        .arg("--dir")
        .arg(&run)
        .env("KUBBI_BIN", bin)
        .env("KUBBI_LOG", common::logscan::cluster_level())
        .output()
        .expect("cluster/up runs");
    // A failed assertion below must not leave the nodes running (they would load the machine
    // and hold ports for the rest of the suite).
    let _down = DownOnDrop(format!("{root}/cluster/down"), run.clone());
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("cluster.json")).expect("cluster.json"))
            .expect("json");
    let nodes = state["nodes"].as_array().expect("nodes").clone();
    assert_eq!(nodes.len(), 3);
    for k in ["id", "http", "internal", "pid", "data_dir", "cmd"] {
        assert!(nodes[0].get(k).is_some(), "cluster.json lacks {k}");
    }
    let admin = state["admin_token"].as_str().expect("admin").to_string();
    common::logscan::record("admin-token", &admin);
    let secret = std::fs::read_to_string(run.join("cluster-secret")).expect("secret");
    common::logscan::record("cluster-secret", secret.trim());
    common::logscan::record_key_file(&run.join("node-keys.json"));
    let api = |i: usize| {
        common::Api::new(format!(
            "http://{}",
            nodes[i]["http"].as_str().expect("http")
        ))
    };
    let (key, _) = api(0).new_api_key(&admin, "scripts").await;
    let c = api(1).create(&key, json!({"content": "via scripts"})).await;
    assert_eq!(c.status, StatusCode::CREATED, "{:?}", c.body);

    // Restart node 3 from its recorded command line after kill -9.
    let pid = nodes[2]["pid"].as_u64().expect("pid");
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    let argv: Vec<String> = nodes[2]["cmd"]
        .as_array()
        .expect("cmd")
        .iter()
        .map(|a| a.as_str().expect("arg").to_string())
        .collect();
    let again_log = common::logscan::child_log("cluster-up-node3");
    // The killed process lets go of its data directory's lock only when its last thread has
    // exited (later than it shows as a zombie on a loaded machine): a restart that finds the
    // lock still held exits at once, and is tried again.
    let api3 = api(2);
    let mut again = None;
    for _ in 0..40 {
        let mut child = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env("KUBBI_LOG", common::logscan::cluster_level())
            .stdout(common::logscan::append(&again_log))
            .stderr(common::logscan::append(&again_log))
            .spawn()
            .expect("restart");
        // Up (its port answers) or gone (the lock was still held).
        let up = common::eventually(
            std::time::Duration::from_secs(30),
            "node 3 up or exited",
            || {
                let api3 = api3.clone();
                let exited = child.try_wait().expect("try_wait").is_some();
                async move {
                    if exited {
                        return Some(false);
                    }
                    let r = api3.http.get(api3.url("/health/live")).send().await.ok()?;
                    r.status().is_success().then_some(true)
                }
            },
        )
        .await;
        if up {
            again = Some(child);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let mut again = again.expect("node 3 restarts once the old process has let go");
    let token = c.body["claim_token"].as_str().expect("t").to_string();
    let claimed = common::eventually(
        std::time::Duration::from_secs(60),
        "restarted node serves",
        || {
            let api3 = api3.clone();
            let token = token.clone();
            async move {
                let r = api3
                    .http
                    .post(api3.url(&format!("/r/{token}/claim")))
                    .send()
                    .await
                    .ok()?;
                (r.status() == StatusCode::OK).then_some(())
            }
        },
    )
    .await;
    let () = claimed;

    let status = std::process::Command::new(bin)
        .args([
            "cluster",
            "status",
            "--url",
            &format!("http://{}", nodes[0]["http"].as_str().expect("h")),
        ])
        .env("KUBBI_ADMIN_TOKEN", &admin)
        .output()
        .expect("kubbi cluster status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        text.contains("nodes:")
            && text.contains("groups (shard map version 1):")
            && text.contains("shards 0..21845 ")
            && text.contains("shards 43690..65536 ")
            && text.contains("system"),
        "{text}"
    );

    // An online split through the CLI, then a refused one (a shard the group does not serve).
    let url = format!("http://{}", nodes[0]["http"].as_str().expect("h"));
    let cli = |args: &[&str]| {
        std::process::Command::new(bin)
            .args(args)
            .args(["--url", &url])
            .env("KUBBI_ADMIN_TOKEN", &admin)
            .output()
            .expect("kubbi cluster")
    };
    let split = cli(&["cluster", "split", "2", "--at", "50000"]);
    let text = String::from_utf8_lossy(&split.stdout);
    assert!(
        split.status.success(),
        "{}",
        String::from_utf8_lossy(&split.stderr)
    );
    assert!(
        text.contains(
            "group 2 split: shards 50000..65536 now served by group 3 (shard map version 3)"
        ),
        "{text}"
    );
    let refused = cli(&["cluster", "split", "2", "--at", "100"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("409") && err.contains("no range to split at shard 100"),
        "{err}"
    );
    let status = cli(&["cluster", "status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("groups (shard map version 3):")
            && text.contains("shards 43690..50000 ")
            && text.contains("shards 50000..65536 "),
        "{text}"
    );
    // A move through the CLI: the new group's leadership to node 1, pinned there; then a
    // refused one (too few replicas), and the group given back to the rebalancer.
    let moved = cli(&["cluster", "move", "3", "--to", "2,3,1", "--leader", "1"]);
    let text = String::from_utf8_lossy(&moved.stdout);
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    assert!(
        text.contains("group 3 placed on [1,2,3] led by 1 (shard map version 4)"),
        "{text}"
    );
    let status = cli(&["cluster", "status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("pinned to [1,2,3]"), "{text}");
    let refused = cli(&["cluster", "move", "3", "--to", "1,2"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("400") && err.contains("replicas must name 3 nodes"),
        "{err}"
    );
    let auto = cli(&["cluster", "move", "3", "--auto"]);
    let text = String::from_utf8_lossy(&auto.stdout);
    assert!(
        text.contains("group 3 is the rebalancer's again (shard map version 5)"),
        "{text} {}",
        String::from_utf8_lossy(&auto.stderr)
    );

    let _ = again.kill();
    let _ = again.wait();
    // cluster/down removes the run directory: keep its node logs for the scan.
    for id in 1..=3 {
        let log = std::fs::read(run.join(format!("node{id}.log"))).unwrap_or_default();
        common::logscan::save_output(&format!("cluster-up-node{id}"), &log);
    }
    let down = std::process::Command::new(format!("{root}/cluster/down"))
        .arg("--dir")
        .arg(&run)
        .output()
        .expect("cluster/down runs");
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    for n in &nodes[..2] {
        let pid = n["pid"].as_u64().expect("pid");
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ");
        assert!(!alive, "node {pid} still running");
    }
    assert!(!run.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_catches_up_from_snapshots_and_restarts_on_them() {
    // Snapshots every 20 entries: logs are purged, so the new node needs snapshots. Twelve
    // groups, so the new node comes to lead some of them.
    let mut c = Cluster::start_with(
        3,
        &["--initial-groups", "12", "--raft-snapshot-every", "20"],
    )
    .await;
    let (key, _) = c.api(0).new_api_key(&c.admin, "x").await;
    let mut made = Vec::new();
    for i in 0..300 {
        let r = c
            .api(i % 3)
            .create(
                &key,
                json!({"content": format!("snap {i}"), "max_retrievals": 3}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
        made.push(r.body);
    }
    let fourth = c.add_member(0).await;
    let api = c.api(0).clone();
    let admin = c.admin.clone();
    common::eventually(
        std::time::Duration::from_secs(120),
        "node 4 leads shards",
        || {
            let api = api.clone();
            let admin = admin.clone();
            async move {
                let st = api.get(&admin, "/admin/v1/cluster").await.body;
                let led = st["shards"]
                    .as_array()?
                    .iter()
                    .filter(|s| s["leader"] == 4)
                    .count();
                (led >= 3).then_some(())
            }
        },
    )
    .await;
    // Node 4 started the cluster's twelve groups from its seed's map (it has no --bootstrap).
    let st = c.status(fourth).await;
    assert_eq!(st["shards"].as_array().map(Vec::len), Some(13), "{st}");
    let log = std::fs::read_to_string(&c.members[fourth].log).expect("log");
    assert!(
        log.contains("installing a snapshot from the leader"),
        "node 4 caught up without a snapshot"
    );
    // Restart node 4 on its data (it recovers from its own snapshots), then read everything
    // through it: shards it leads answer from state it installed from snapshots.
    c.kill9(fourth);
    c.spawn(fourth, false);
    c.wait_up(fourth).await;
    c.wait_all_led().await;
    for (i, b) in made.iter().enumerate() {
        let r = c
            .api(fourth)
            .claim(b["claim_token"].as_str().expect("t"))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{i}: {:?}", r.body);
        assert_eq!(r.body["content"], format!("snap {i}"));
        assert_eq!(r.body["retrieval_count"], 1);
    }
}

/// Each node's digest of each replica it holds: once writes stop and replication catches up,
/// every replica of a group is at the same applied index with the same digest; a write to a
/// group changes its digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_digests_agree_at_equal_applied_index() {
    let c = Cluster::start(3).await;
    let (key, _) = c.api(0).new_api_key(&c.admin, "x").await;
    for i in 0..30 {
        let r = c
            .api(i % 3)
            .create(
                &key,
                json!({"content": format!("d{i}"), "max_retrievals": 2}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
        if i % 2 == 0 {
            let t = r.body["claim_token"].as_str().expect("token");
            assert_eq!(c.api((i + 1) % 3).claim(t).await.status, StatusCode::OK);
        }
    }
    // group -> [(applied_index, digest)] over the nodes.
    let snapshot = || async {
        let mut per: std::collections::BTreeMap<String, Vec<(Value, String)>> = Default::default();
        for i in 0..c.members.len() {
            let r = c.api(i).get(&c.admin, "/admin/v1/digest").await;
            assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
            for g in r.body["groups"].as_array().expect("groups") {
                per.entry(g["id"].to_string()).or_default().push((
                    g["applied_index"].clone(),
                    g["digest"].as_str().expect("digest").to_string(),
                ));
            }
        }
        per
    };
    let agreed = common::eventually(
        std::time::Duration::from_secs(30),
        "every group's replicas at one applied index",
        || async {
            let per = snapshot().await;
            per.values()
                .all(|rows| rows.len() == 3 && rows.iter().all(|r| r.0 == rows[0].0))
                .then_some(per)
        },
    )
    .await;
    for (g, rows) in &agreed {
        assert!(
            rows.iter().all(|r| r.1 == rows[0].1),
            "group {g}: replicas at one index disagree: {rows:?}"
        );
    }
    // A write changes the digest of its group.
    let r = c.api(0).create(&key, json!({"content": "one more"})).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let after = snapshot().await;
    let changed = agreed
        .iter()
        .filter(|(g, rows)| after[*g].iter().any(|r| r.1 != rows[0].1))
        .count();
    assert!(changed >= 1, "no digest moved after a write");
}

/// Sends `sig` (`STOP` or `CONT`) to node `i`'s process.
fn signal(c: &Cluster, i: usize, sig: &str) {
    let pid = c.members[i].child.as_ref().expect("running").id();
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

async fn revoke(c: &Cluster, via: usize, key_id: &str) -> common::Resp {
    let api = c.api(via);
    api.send(
        api.http
            .delete(api.url(&format!("/admin/v1/api-keys/{key_id}")))
            .bearer_auth(&c.admin),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_refused_by_every_node_when_the_revoke_returns() {
    let c = Cluster::start(3).await;
    let (key, key_id) = c.api(0).new_api_key(&c.admin, "leaving").await;
    for i in 0..3 {
        common::eventually(
            Duration::from_secs(20),
            "every node accepts the key",
            || async {
                (c.api(i).get(&key, "/api/v1/kubbis").await.status == StatusCode::OK).then_some(())
            },
        )
        .await;
    }
    let r = revoke(&c, 1, &key_id).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    // No waiting: the answer came back only once every node had re-read the key table.
    for i in 0..3 {
        let r = c.api(i).get(&key, "/api/v1/kubbis").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "node {i}: {:?}", r.body);
    }

    // A paused node cannot confirm: the revoke waits out its key lease, so the moment it
    // wakes it refuses the key too (it never serves it from what it knew before).
    // The paused node is one that does not lead the system group, so the revoke can commit.
    let st = c.status(0).await;
    let system_leader = st["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .find(|s| s["id"] == "system")
        .and_then(|s| s["leader"].as_u64())
        .expect("the system group has a leader");
    let paused = (0..3)
        .find(|i| c.members[*i].id != system_leader)
        .expect("a follower");
    let via = (0..3).find(|i| *i != paused).expect("another node");
    let (key, key_id) = c.api(via).new_api_key(&c.admin, "paused").await;
    common::eventually(
        Duration::from_secs(20),
        "the node accepts the key",
        || async {
            (c.api(paused).get(&key, "/api/v1/kubbis").await.status == StatusCode::OK).then_some(())
        },
    )
    .await;
    signal(&c, paused, "STOP");
    let r = revoke(&c, via, &key_id).await;
    signal(&c, paused, "CONT");
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let after = c.api(paused).get(&key, "/api/v1/kubbis").await;
    assert_ne!(after.status, StatusCode::OK, "{:?}", after.body);
    assert!(
        [StatusCode::UNAUTHORIZED, StatusCode::SERVICE_UNAVAILABLE].contains(&after.status),
        "{:?}",
        after.body
    );
    // And once it has renewed, it is the plain 401 of a revoked key.
    common::eventually(
        Duration::from_secs(20),
        "the node renews its lease",
        || async {
            (c.api(paused).get(&key, "/api/v1/kubbis").await.status == StatusCode::UNAUTHORIZED)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_holds_across_nodes_under_concurrent_creates() {
    let c = Cluster::start(3).await;
    let r = c
        .api(0)
        .send(
            c.api(0)
                .http
                .post(c.api(0).url("/admin/v1/api-keys"))
                .bearer_auth(&c.admin)
                .json(&json!({"label": "tenant", "limits": {"max_active_kubbis": 4}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let key = r.body["api_key"].as_str().expect("key").to_string();
    for i in 0..3 {
        common::eventually(
            Duration::from_secs(20),
            "every node accepts the key",
            || async {
                (c.api(i).get(&key, "/api/v1/kubbis").await.status == StatusCode::OK).then_some(())
            },
        )
        .await;
    }
    let calls = (0..30).map(|i| {
        let api = c.api(i % 3).clone();
        let key = key.clone();
        async move { api.create(&key, json!({"content": format!("t{i}")})).await }
    });
    let results = futures::future::join_all(calls).await;
    let created = results
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .count();
    for r in &results {
        assert!(
            r.status == StatusCode::CREATED || r.err_code() == "quota_exceeded",
            "{:?}",
            r.body
        );
    }
    assert_eq!(
        created, 4,
        "creates accepted under a quota of 4 through 3 nodes"
    );
    let listed = c.api(1).get(&key, "/api/v1/kubbis?status=active").await;
    assert_eq!(listed.body["pagination"]["total"], 4);
}

/// The value of a sample line `name{labels} value` in a node's metrics text.
fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// openraft snapshots by entry count (20,000 by default); large payloads must not pile up
/// gigabytes of log before that. With a 1 MiB byte budget, a handful of 400 KiB creates makes
/// every replica snapshot and purge its log, and everything still claims intact afterwards,
/// through every node, including a replica restarted (kill -9) on its purged log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raft_log_is_purged_by_bytes_as_well_as_by_entries() {
    let mut c = Cluster::start_with(
        3,
        &[
            "--initial-groups",
            "1",
            "--auto-split",
            "false",
            "--raft-snapshot-every-mib",
            "1",
        ],
    )
    .await;
    let (key, _) = c.api(0).new_api_key(&c.admin, "x").await;
    let content = |i: usize| format!("{i}:{}", "x".repeat(400 << 10));
    let mut tokens = Vec::new();
    for i in 0..8 {
        let r = c
            .api(i % 3)
            .create(&key, json!({"content": content(i), "max_retrievals": 2}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        tokens.push(r.body["claim_token"].as_str().expect("token").to_string());
    }
    for i in 0..3 {
        let api = c.api(i).clone();
        common::eventually(
            Duration::from_secs(30),
            &format!("node {} purges shard 0's log", i + 1),
            || {
                let api = api.clone();
                async move {
                    let m = api.metrics_text().await;
                    (sample(&m, "kubbi_raft_purged_index{group=\"0\"}")? > 0).then_some(())
                }
            },
        )
        .await;
    }
    c.kill9(2);
    c.spawn(2, false);
    c.wait_up(2).await;
    c.wait_all_led().await;
    for (i, t) in tokens.iter().enumerate() {
        for node in [2, i % 2] {
            let r = c.api(node).claim(t).await;
            assert_eq!(r.status, StatusCode::OK, "{i} via {node}: {:?}", r.body);
            assert!(
                r.body["content"] == content(i),
                "{i} via {node}: content differs"
            );
        }
    }
}

/// Whether every data group in a `GET /admin/v1/cluster` answer is led by its preferred
/// leader (the first of the replicas the shard map wants it on), so the rebalancer moves no
/// leadership.
fn leaders_at_rest(st: &Value) -> bool {
    let p = placement_of(st);
    !p.is_empty()
        && p.values()
            .all(|(leader, _, desired, _)| leader.is_some() && *leader == desired.first().copied())
}

/// Terms of the groups led by a node other than `not`, as member `i` sees them.
async fn terms_not_led_by(c: &Cluster, i: usize, not: u64) -> Vec<(Value, u64)> {
    let st = c.status(i).await;
    let mut out: Vec<(Value, u64)> = st["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .filter(|s| s["leader"].as_u64().is_some_and(|l| l != not))
        .map(|s| (s["id"].clone(), s["term"].as_u64().expect("term")))
        .collect();
    out.sort_by_key(|(id, _)| id.to_string());
    out
}

/// A follower frozen past its election timeout (SIGSTOP: a long GC-like pause, or a raft core
/// that fell behind) wakes with every election timer expired. With Pre-Vote it first asks
/// whether it could win, the others still hear from their leaders and say no, and no group it
/// did not lead changes term or leader. The groups are quiet when it freezes, so it also
/// counts its leaders' silence from when it resumed, not from before the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_waking_from_a_pause_does_not_depose_healthy_leaders() {
    let c = Cluster::start(3).await;
    c.wait_all_led().await;
    let frozen = 2;
    let frozen_id = c.members[frozen].id;
    // Leadership settles first: every data group led by its preferred node, where the
    // rebalancer moves it, so the rebalancer has nothing left to move.
    common::eventually(
        Duration::from_secs(60),
        "leaders on their preferred nodes",
        || {
            let c = &c;
            async move { leaders_at_rest(&c.status(0).await).then_some(()) }
        },
    )
    .await;
    // And they have gone quiet (`raft::quiet`, after 2 s by default): no heartbeat renews any
    // follower's lease, so what says no to the woken node's pre-votes is the liveness pings.
    wait_all_quiet(&c, "before the pause").await;
    let before = terms_not_led_by(&c, 0, frozen_id).await;
    assert!(!before.is_empty());
    let pid = c.members[frozen]
        .child
        .as_ref()
        .expect("child")
        .id()
        .to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    // Three election timeouts (1 s at most each) frozen: every timer of the node expires.
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal("-CONT");
    // Awake and following again: it reports the same leader as member 0 for every group.
    common::eventually(Duration::from_secs(60), "the woken node follows", || {
        let c = &c;
        async move {
            let mine = c.status(frozen).await;
            let theirs = c.status(0).await;
            let leaders = |v: &Value| -> Option<Vec<Value>> {
                Some(
                    v["shards"]
                        .as_array()?
                        .iter()
                        .map(|s| s["leader"].clone())
                        .collect(),
                )
            };
            let (m, t) = (leaders(&mine)?, leaders(&theirs)?);
            (m == t && m.iter().all(Value::is_u64)).then_some(())
        }
    })
    .await;
    let after = terms_not_led_by(&c, 0, frozen_id).await;
    for (id, term) in &before {
        let now = after.iter().find(|(g, _)| g == id).map(|(_, t)| *t);
        assert_eq!(
            now,
            Some(*term),
            "group {id} changed term or leader after node {frozen_id} woke\n{}",
            c.logs_tail()
        );
    }
}

/// A node refuses internal requests of another protocol version (a peer left on an older
/// build) with 426 and says why in its log, after the cluster secret was checked, and serves
/// its own version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_speaking_another_internal_protocol_is_refused() {
    let c = Cluster::start(1).await;
    let http = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let url = format!(
        "http://127.0.0.1:{}/internal/v1/status",
        c.members[0].internal_port
    );
    let secret = c.secret();
    let status = |secret: String, proto: Option<&'static str>| {
        let mut r = http
            .post(&url)
            .bearer_auth(secret)
            .header(kubbi::transport::H_TO, "1")
            .header(kubbi::transport::H_FROM, "9");
        if let Some(p) = proto {
            r = r.header(kubbi::transport::H_PROTOCOL, p);
        }
        async move { r.send().await.expect("internal port answers").status() }
    };
    let current = kubbi::transport::PROTOCOL.to_string().leak();
    assert_eq!(status(secret.clone(), Some(current)).await, StatusCode::OK);
    // Version 1 sent no header; a later one sends a number this build does not speak.
    assert_eq!(
        status(secret.clone(), None).await,
        StatusCode::UPGRADE_REQUIRED
    );
    let previous = (kubbi::transport::PROTOCOL - 1).to_string().leak();
    let next = (kubbi::transport::PROTOCOL + 1).to_string().leak();
    for other in [previous, next] {
        assert_eq!(
            status(secret.clone(), Some(other)).await,
            StatusCode::UPGRADE_REQUIRED
        );
    }
    // Without the secret nothing else is revealed.
    assert_eq!(status("wrong".into(), None).await, StatusCode::UNAUTHORIZED);
    let log = c.members[0].log.clone();
    common::eventually(
        Duration::from_secs(10),
        "the node logs the refused protocol",
        || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .ok()?
                    .contains("refused a peer that speaks another internal protocol")
                    .then_some(())
            }
        },
    )
    .await;
}

/// A node-pair stream is admitted at its hello by the same rules as an HTTP request: the
/// secret first, then the protocol version, then the identities; a refused hello gets the
/// status and reason and the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_hello_is_refused_like_an_internal_request() {
    use kubbi::transport::stream::{Hello, MAGIC};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = Cluster::start(1).await;
    let port = c.members[0].internal_port;
    let incarnation = kubbi::transport::Peers::new(
        kubbi::transport::Identity {
            node_id: 9,
            incarnation: 99,
        },
        zeroize::Zeroizing::new(c.secret()),
        std::sync::Arc::new(kubbi::transport::AddressBook::default()),
        None,
    )
    .post_addr::<kubbi::transport::messages::NodeStatus>(
        1,
        &format!("127.0.0.1:{port}"),
        0,
        "/internal/v1/status",
        kubbi::codec::encode(&()),
        Duration::from_secs(10),
    )
    .await
    .expect("status")
    .incarnation;
    let hello = |secret: &str, protocol: u32, to: u64, to_incarnation: u64| {
        let h = kubbi::codec::encode(&Hello {
            secret: secret.as_bytes().to_vec(),
            protocol,
            from: 9,
            from_incarnation: 99,
            to,
            to_incarnation,
        });
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&u32::try_from(h.len()).expect("small").to_le_bytes());
        out.extend_from_slice(&h);
        async move {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            s.write_all(&out).await.expect("hello");
            let mut len = [0u8; 4];
            s.read_exact(&mut len).await.expect("an answer");
            let mut f = vec![0u8; u32::from_le_bytes(len) as usize];
            s.read_exact(&mut f).await.expect("the whole answer");
            let status = u16::from_le_bytes([f[8], f[9]]);
            let reason = String::from_utf8_lossy(&f[10..]).to_string();
            // A refused stream is closed; an admitted one stays open.
            let mut rest = [0u8; 1];
            let closed = tokio::time::timeout(Duration::from_millis(500), s.read(&mut rest))
                .await
                .is_ok_and(|r| matches!(r, Ok(0)));
            (status, reason, closed)
        }
    };
    let secret = c.secret();
    let now = kubbi::transport::PROTOCOL;
    let (status, _, closed) = hello(&secret, now, 1, incarnation).await;
    assert_eq!((status, closed), (200, false));
    let (status, reason, closed) = hello("wrong", now + 1, 2, 5).await;
    assert_eq!(
        (status, reason.as_str(), closed),
        (401, "bad cluster secret", true)
    );
    for other in [now - 1, now + 1] {
        let (status, reason, closed) = hello(&secret, other, 1, incarnation).await;
        assert_eq!(status, 426, "{reason}");
        assert!(closed);
    }
    let (status, _, closed) = hello(&secret, now, 2, 0).await;
    assert_eq!((status, closed), (421, true), "a hello for another node");
    let (status, _, closed) = hello(&secret, now, 1, incarnation + 1).await;
    assert_eq!(
        (status, closed),
        (409, true),
        "a hello for another data directory of this node"
    );
}

/// Issue 22's expiry hole on three nodes: a group led for a moment by a node whose clock runs
/// 61 s ahead answers a preview `expired`; back under a leader with the right time, no claim of
/// that kubbi (the read recorded the expiry) nor of another one of the same deadline (the
/// group's time never goes back) succeeds, through any node. The fast clock is stepped back
/// right after the preview, before that leader's sweeper looks at its timers, so the sweeper
/// does not do the recording for the read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_seen_through_a_fast_leader_holds_under_the_next_one() {
    let c = common::inproc::InProcCluster::start(3).await;
    let key = c.api_key().await;
    let body = json!({"content": "x", "max_retrievals": 1, "ttl_seconds": 60});
    let mut made = Vec::new();
    for _ in 0..2 {
        let r = c.api(0).create(&key, body.clone()).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        made.push(r.body);
    }
    let g = c.group_of(made[0]["id"].as_str().expect("id")).await;
    assert_eq!(c.group_of(made[1]["id"].as_str().expect("id")).await, g);
    let token = |i: usize| made[i]["claim_token"].as_str().expect("token").to_string();
    let (seen, unseen) = (token(0), token(1));

    let fast = 2;
    let mut said_expired = false;
    for _ in 0..10 {
        c.lead(g, fast).await;
        c.handle(fast).clock.advance(61_000);
        let p = c.api(fast).preview(&seen).await;
        c.handle(fast).clock.advance(-61_000);
        if (p.status, p.err_code()) == (StatusCode::GONE, "expired") {
            said_expired = true;
            break;
        }
        // The rebalancer took the group back before the preview: it was judged elsewhere.
        assert_eq!(p.status, StatusCode::OK, "{:?}", p.body);
    }
    assert!(said_expired, "the fast leader never answered the preview");

    c.lead(g, 0).await;
    for i in 0..3 {
        for (t, what) in [(&seen, "the previewed kubbi"), (&unseen, "the other kubbi")] {
            let r = c.api(i).claim(t).await;
            assert_eq!(
                (r.status, r.err_code()),
                (StatusCode::GONE, "expired"),
                "{what} claimed through node {} after the group saw it expire: {:?}",
                c.id(i),
                r.body
            );
        }
    }
    c.shutdown().await;
}

/// A list filtered by status judges each kubbi at its group's time, as claims and previews do,
/// not by the clock of the node that was asked: through a node whose clock runs 61 s ahead, a
/// kubbi of 60 s that its group's leader still lets be claimed is listed as active, not expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_through_a_fast_node_judges_status_at_the_groups_time() {
    let c = common::inproc::InProcCluster::start(3).await;
    let key = c.api_key().await;
    let r = c
        .api(0)
        .create(&key, json!({"content": "x", "ttl_seconds": 60}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let g = c.group_of(r.body["id"].as_str().expect("id")).await;
    let fast = 2;
    let total = |r: &common::Resp| r.body["pagination"]["total"].as_u64();
    let mut judged = None;
    for _ in 0..10 {
        c.lead(g, 0).await;
        c.handle(fast).clock.advance(61_000);
        let active = c.api(fast).get(&key, "/api/v1/kubbis?status=active").await;
        let expired = c.api(fast).get(&key, "/api/v1/kubbis?status=expired").await;
        c.handle(fast).clock.advance(-61_000);
        // The rebalancer may have handed the group to the fast node meanwhile: then its clock is
        // the group's, and the kubbi is expired indeed. Again.
        if c.leader_seen_by(fast, g as u16) != Some(c.id(fast)) {
            judged = Some((total(&active), total(&expired)));
            break;
        }
    }
    assert_eq!(
        judged,
        Some((Some(1), Some(0))),
        "(active, expired) listed through the fast node"
    );
    c.shutdown().await;
}

/// Whether every group's replica on member `i` is quiet (`kubbi_raft_quiet` of each group 1).
async fn all_quiet(c: &Cluster, i: usize) -> bool {
    let m = c.api(i).metrics_text().await;
    let quiet: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("kubbi_raft_quiet{"))
        .collect();
    // The system group and one data group per node.
    quiet.len() == c.members.len() + 1 && quiet.iter().all(|l| l.ends_with(" 1"))
}

async fn wait_all_quiet(c: &Cluster, what: &str) {
    for i in 0..c.members.len() {
        if c.members[i].child.is_none() {
            continue;
        }
        common::eventually(
            Duration::from_secs(30),
            &format!("{what}: every group quiet on member {i}"),
            || async move { all_quiet(c, i).await.then_some(()) },
        )
        .await;
    }
}

/// Groups with nothing to do go quiet on every replica (no ticks, heartbeats or election
/// timers; a liveness ping per node pair instead). A write through any node wakes its group,
/// which goes quiet again without an election, and when the leader of a quiet group dies
/// (kill -9: no ping any more), its followers notice and elect a new one that serves what was
/// written before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_go_quiet_wake_on_a_write_and_fail_over_when_their_leader_dies() {
    let mut c = Cluster::start_with(3, &["--raft-quiet-after-ms", "300"]).await;
    let (key, _) = c.api(0).new_api_key(&c.admin, "x").await;
    wait_all_quiet(&c, "after start").await;
    // `GET /admin/v1/cluster` (and `kubbi cluster status`) says so, from each group's leader.
    common::eventually(
        Duration::from_secs(10),
        "status shows every group quiet",
        || {
            let c = &c;
            async move {
                let st = c.status(1).await;
                let groups = st["shards"].as_array()?;
                (groups.len() == 4 && groups.iter().all(|g| g["quiet"] == true)).then_some(())
            }
        },
    )
    .await;
    let terms = terms_not_led_by(&c, 0, 0).await;
    // Raft RPCs that carry entries, sent by every node (`kubbi_raft_rpcs_total`).
    let appends = || async {
        let mut n = 0;
        for i in 0..3 {
            let m = c.api(i).metrics_text().await;
            n += sample(&m, "kubbi_raft_rpcs_total{kind=\"append\"}").unwrap_or(0);
        }
        n
    };
    let appended_before = appends().await;
    // Still quiet right before the write (on a loaded machine a late liveness ping can wake a
    // group meanwhile, and then no follower would wake on the write's entries).
    wait_all_quiet(&c, "before the write").await;

    // A write wakes its group; a claim through another node (a forward) is answered.
    let body = json!({"content": "quiet", "max_retrievals": 2});
    let (token, group) = create_probe(&c, &key, 1, body).await;
    let claim = c.api(2).claim(&token).await;
    assert_eq!(claim.status, StatusCode::OK, "{:?}", claim.body);
    assert_eq!(claim.body["content"], "quiet");
    let woke: u64 = {
        let mut n = 0;
        for i in 0..3 {
            let m = c.api(i).metrics_text().await;
            n += sample(&m, "kubbi_raft_quiet_wakes_total{reason=\"message\"}").unwrap_or(0);
        }
        n
    };
    assert!(woke >= 1, "a follower woke on the write's entries");
    assert!(
        appends().await > appended_before,
        "the write's entries were sent (kubbi_raft_rpcs_total{{kind=\"append\"}})"
    );
    // Every node talks to its peers over streams it opened, none refused.
    for i in 0..3 {
        let m = c.api(i).metrics_text().await;
        let opened = sample(&m, "kubbi_internal_streams_opened_total").unwrap_or(0);
        let open = sample(&m, "kubbi_internal_streams_open").unwrap_or(0);
        assert!(
            opened >= 2 && open >= 2,
            "node {i}: {opened} opened, {open} open"
        );
        assert_eq!(
            sample(
                &m,
                "kubbi_internal_streams_failed_total{reason=\"refused\"}"
            ),
            Some(0),
            "node {i}"
        );
    }
    wait_all_quiet(&c, "after the write").await;
    // Quiet groups send no entries: the count stands still (heartbeats of the system group's
    // read-index rounds go on, under another kind).
    common::eventually(
        Duration::from_secs(15),
        "no appends while quiet",
        || async {
            let a = appends().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            (appends().await == a).then_some(())
        },
    )
    .await;
    assert_eq!(
        terms_not_led_by(&c, 0, 0).await,
        terms,
        "going quiet and waking changed no term or leader\n{}",
        c.logs_tail()
    );

    // The quiet leader of the kubbi's group dies; the others notice its silence.
    let leader = c.leader_of(0, group).await.expect("a leader");
    let dead = c.index_of(leader);
    c.kill9(dead);
    let survivor = (dead + 1) % 3;
    let what = "a claim through a survivor after the quiet leader died";
    let claim = claim_through(&c, survivor, &token, what).await;
    assert_eq!(claim.body["content"], "quiet");
    assert_eq!(claim.body["burned"], true, "the second of two claims");
    let new_leader = c.leader_of(survivor, group).await;
    assert!(
        new_leader.is_some_and(|l| l != leader),
        "group {group} led by {new_leader:?} after node {leader} died"
    );
    // The first survivor to notice the silence stands; the other may wake on its vote.
    let mut wakes = String::new();
    let mut silent = 0;
    for i in (0..3).filter(|&i| i != dead) {
        let m = c.api(i).metrics_text().await;
        silent += sample(&m, "kubbi_raft_quiet_wakes_total{reason=\"silence\"}").unwrap_or(0);
        for l in m
            .lines()
            .filter(|l| l.starts_with("kubbi_raft_quiet_wakes_total"))
        {
            wakes.push_str(&format!("member {i}: {l}\n"));
        }
    }
    assert!(
        silent >= 1,
        "a survivor woke on the leader's silence\n{wakes}"
    );
}

/// Creates a kubbi through member `via`: its claim token and the raft group that holds it.
async fn create_probe(c: &Cluster, key: &str, via: usize, body: Value) -> (String, u64) {
    let created = c.api(via).create(key, body).await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let token = created.body["claim_token"]
        .as_str()
        .expect("token")
        .to_string();
    let shard = kubbi::ids::ClaimToken::parse(&token)
        .expect("token")
        .shard();
    let group = common::group_of_shard(&c.status(0).await, shard).expect("a group");
    (token, group)
}

/// A quiet cluster with a kubbi that has 100 reads (content "probe"): its token, its group and
/// that group's leader.
async fn quiet_cluster_with_a_probe() -> (Cluster, String, u64, u64) {
    let c = Cluster::start_with(3, &["--raft-quiet-after-ms", "300"]).await;
    let (key, _) = c.api(0).new_api_key(&c.admin, "x").await;
    let body = json!({"content": "probe", "max_retrievals": 100});
    let (token, group) = create_probe(&c, &key, 0, body).await;
    wait_all_quiet(&c, "before the fault").await;
    let leader = c.leader_of(0, group).await.expect("a leader");
    (c, token, group, leader)
}

/// Claims `token` through member `via` until one succeeds (30 s at most).
async fn claim_through(c: &Cluster, via: usize, token: &str, what: &str) -> common::Resp {
    common::eventually(Duration::from_secs(30), what, || {
        let (api, token) = (c.api(via).clone(), token.to_string());
        async move {
            let r = api.claim(&token).await;
            (r.status == StatusCode::OK).then_some(r)
        }
    })
    .await
}

/// [`claim_through`] of the probe of [`quiet_cluster_with_a_probe`].
async fn claim_probe(c: &Cluster, via: usize, token: &str, what: &str) {
    let r = claim_through(c, via, token, what).await;
    assert_eq!(r.body["content"], "probe");
}

/// The leader of a quiet group freezes (SIGSTOP): its pings stop, the others elect a leader
/// and serve the group; when it thaws it follows the new leader and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_quiet_leader_is_replaced_and_follows_when_it_thaws() {
    let (c, token, group, leader) = quiet_cluster_with_a_probe().await;
    let frozen = c.index_of(leader);
    let via = (frozen + 1) % 3;
    signal(&c, frozen, "STOP");
    claim_probe(&c, via, &token, "a claim while the quiet leader is frozen").await;
    let new_leader = c.leader_of(via, group).await;
    signal(&c, frozen, "CONT");
    assert!(
        new_leader.is_some_and(|l| l != leader),
        "group {group} led by {new_leader:?} with node {leader} frozen"
    );
    // Thawed, it learns the new term and reports the same leader as the others.
    common::eventually(Duration::from_secs(30), "the thawed node follows", || {
        let c = &c;
        async move {
            let theirs = c.leader_of(via, group).await?;
            let mine = c.leader_of(frozen, group).await?;
            (mine == theirs && theirs != leader).then_some(())
        }
    })
    .await;
    claim_probe(&c, frozen, &token, "a claim through the thawed node").await;
}

/// The leader of a quiet group is killed and restarted at once, back within its followers'
/// silence bound (2 s) while they still follow it quietly. Whether it takes its group back at its
/// old term or the followers elect another (they wake when its pings stop listing the group, or
/// on silence), the group is led again, every node sees one leader, and it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_leader_restarted_at_once_gets_its_group_led_again() {
    let (mut c, token, group, leader) = quiet_cluster_with_a_probe().await;
    let i = c.index_of(leader);
    c.kill9(i);
    c.spawn(i, false);
    c.wait_up(i).await;
    claim_through(
        &c,
        (i + 1) % 3,
        &token,
        "a claim after the leader's restart",
    )
    .await;
    claim_probe(&c, i, &token, "a claim through the restarted node").await;
    common::eventually(Duration::from_secs(30), "one leader seen by all", || {
        let c = &c;
        async move {
            let mut seen = Vec::new();
            for m in 0..3 {
                seen.push(c.leader_of(m, group).await?);
            }
            seen.windows(2).all(|w| w[0] == w[1]).then_some(())
        }
    })
    .await;
}

/// The logical shard of a kubbi id (its first two bytes).
fn shard_of_id(id: &str) -> u16 {
    u16::from_str_radix(&id[..4], 16).expect("hex id")
}

fn post_idem(
    api: &common::Api,
    key: &str,
    path: &str,
    idem: &str,
    body: &Value,
) -> reqwest::RequestBuilder {
    api.http
        .post(api.url(path))
        .bearer_auth(key)
        .header("Idempotency-Key", idem)
        .json(body)
}

/// A split under create/claim load through every node loses and doubles nothing: every
/// acknowledged create is there with its exact count, an idempotent create retried across the
/// split returns its first kubbi, a claim retried with its key across the split replays its
/// payload and counts once, the new group serves the moved range, the map partitions the shard
/// space, and every group's replicas agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_under_load_loses_and_doubles_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let c = Cluster::start(3).await;
    let (key, _) = c.api(0).new_api_key(&c.admin, "split").await;
    let before = c.status(0).await;
    let source = before["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .find(|s| s["id"] != "system")
        .expect("a data group")
        .clone();
    let g = source["id"].as_u64().expect("group id");
    let (lo, hi) = (
        source["ranges"][0][0].as_u64().expect("lo"),
        source["ranges"][0][1].as_u64().expect("hi"),
    );
    let mid = lo + (hi - lo) / 2;
    let moves = |id: &str| (mid..hi).contains(&u64::from(shard_of_id(id)));

    // Idempotent creates (their shard comes from the key's hash) and keyed claims, before.
    let mut idem_creates = Vec::new();
    for i in 0..60 {
        let body = json!({"content": format!("idem {i}"), "max_retrievals": 3});
        let r = c
            .api(i % 3)
            .send(post_idem(
                c.api(i % 3),
                &key,
                "/api/v1/kubbis",
                &format!("job-{i}"),
                &body,
            ))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        idem_creates.push((format!("job-{i}"), body, r.body));
    }
    let moving: Vec<_> = idem_creates
        .iter()
        .filter(|(_, _, b)| moves(b["id"].as_str().expect("id")))
        .cloned()
        .collect();
    assert!(
        !moving.is_empty(),
        "no idempotent create landed in the range that moves (60 tries)"
    );
    let mut keyed_claims = Vec::new();
    for (i, (_, _, b)) in moving.iter().enumerate() {
        let token = b["claim_token"].as_str().expect("token");
        let r = c
            .api(i % 3)
            .send(
                c.api(i % 3)
                    .http
                    .post(c.api(i % 3).url(&format!("/r/{token}/claim")))
                    .header("Idempotency-Key", format!("claim-{i}")),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        keyed_claims.push((token.to_string(), format!("claim-{i}"), r.body));
    }

    let history: Shared = Default::default();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let apis: Vec<common::Api> = (0..3).map(|i| c.api(i).clone()).collect();
    let clients = load(apis, key.clone(), 12, history.clone(), stop.clone());
    common::eventually(Duration::from_secs(30), "load running", || async {
        (history.lock().expect("lock").acked > 100).then_some(())
    })
    .await;

    let split = c
        .api(1)
        .send(
            c.api(1)
                .http
                .post(c.api(1).url(&format!("/admin/v1/groups/{g}/split")))
                .bearer_auth(&c.admin)
                .json(&json!({})),
        )
        .await;
    assert_eq!(
        split.status,
        StatusCode::OK,
        "{:?}\n{}",
        split.body,
        c.logs_tail()
    );
    let target = split.body["target"].as_u64().expect("target");
    assert_eq!(split.body["source"], g);
    assert_eq!(split.body["ranges"], json!([[mid, hi]]));
    let acked_at_split = history.lock().expect("lock").acked;
    common::eventually(Duration::from_secs(30), "load after the split", || async {
        (history.lock().expect("lock").acked > acked_at_split + 200).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.await.expect("client");
    }
    let h = std::mem::take(&mut *history.lock().expect("lock"));
    assert!(h.errors.is_empty(), "errors under load: {:?}", h.errors);
    verify(c.api(2), &key, &h).await;
    let in_target = h.created.keys().filter(|id| moves(id)).count();
    assert!(
        in_target > 0,
        "no create of the load landed in the moved range"
    );

    // Every node routes by a map where the target serves the range, and the ranges partition
    // the shard space.
    for i in 0..3 {
        let st = common::eventually(
            Duration::from_secs(10),
            "the new map everywhere",
            || async {
                let st = c.status(i).await;
                (st["map_version"] == split.body["map_version"]).then_some(st)
            },
        )
        .await;
        let mut ranges: Vec<(u64, u64, u64)> = st["shards"]
            .as_array()
            .expect("shards")
            .iter()
            .filter(|s| s["id"] != "system")
            .flat_map(|s| {
                let id = s["id"].as_u64().expect("id");
                s["ranges"]
                    .as_array()
                    .expect("ranges")
                    .iter()
                    .map(move |r| (r[0].as_u64().expect("lo"), r[1].as_u64().expect("hi"), id))
                    .collect::<Vec<_>>()
            })
            .collect();
        ranges.sort_unstable();
        assert_eq!(ranges.first().map(|r| r.0), Some(0), "{st}");
        assert_eq!(ranges.last().map(|r| r.1), Some(65_536), "{st}");
        assert!(ranges.windows(2).all(|w| w[0].1 == w[1].0), "{st}");
        assert!(ranges.contains(&(mid, hi, target)), "{st}");
        assert!(ranges.contains(&(lo, mid, g)), "{st}");
    }

    // Retries across the split are answered once.
    for (i, (idem, body, first)) in moving.iter().enumerate() {
        let again = c
            .api(i % 3)
            .send(post_idem(c.api(i % 3), &key, "/api/v1/kubbis", idem, body))
            .await;
        assert_eq!(again.status, StatusCode::CREATED, "{:?}", again.body);
        // The same kubbi (the claim URL names the node asked, which may differ).
        for field in ["id", "claim_token", "created_at", "expires_at"] {
            assert_eq!(
                again.body[field], first[field],
                "an idempotent create retried across the split: {field}"
            );
        }
    }
    for (i, (token, idem, first)) in keyed_claims.iter().enumerate() {
        let again = c
            .api((i + 1) % 3)
            .send(
                c.api((i + 1) % 3)
                    .http
                    .post(c.api((i + 1) % 3).url(&format!("/r/{token}/claim")))
                    .header("Idempotency-Key", idem),
            )
            .await;
        assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
        assert_eq!(again.body["content"], first["content"], "replayed payload");
        let p = c.api(i % 3).preview(token).await;
        assert_eq!(p.status, StatusCode::OK, "{:?}", p.body);
        assert_eq!(
            p.body["retrieval_count"], 1,
            "a keyed claim counted twice: {:?}",
            p.body
        );
    }
    // The list shows each kubbi once (the source no longer lists the moved range): no id
    // twice over all pages, and every acknowledged one there.
    let mut listed = std::collections::HashSet::new();
    for page in 1.. {
        let list = c
            .api(page % 3)
            .get(&key, &format!("/api/v1/kubbis?limit=100&page={page}"))
            .await;
        assert_eq!(list.status, StatusCode::OK, "{:?}", list.body);
        let items = list.body["kubbis"].as_array().expect("kubbis").clone();
        if items.is_empty() {
            break;
        }
        for it in items {
            let id = it["id"].as_str().expect("id").to_string();
            assert!(listed.insert(id.clone()), "{id} listed twice");
        }
    }
    for id in h.created.keys() {
        assert!(listed.contains(id), "{id} not listed");
    }

    // Every group's replicas, the new one included, agree at one applied index.
    common::eventually(Duration::from_secs(30), "replicas agree", || async {
        let mut per: std::collections::BTreeMap<String, Vec<(Value, String)>> = Default::default();
        for i in 0..3 {
            let r = c.api(i).get(&c.admin, "/admin/v1/digest").await;
            for d in r.body["groups"].as_array().into_iter().flatten() {
                per.entry(d["id"].to_string())
                    .or_default()
                    .push((d["applied_index"].clone(), d["digest"].to_string()));
            }
        }
        (per.len() == 5
            && per
                .values()
                .all(|rows| rows.len() == 3 && rows.iter().all(|r| *r == rows[0])))
        .then_some(())
    })
    .await;
}

/// A data group in a cluster status: (leader, voters, desired replicas, pinned).
type Placement = (Option<u64>, Vec<u64>, Vec<u64>, bool);

/// The data groups of a cluster status, by id.
fn placement_of(st: &Value) -> std::collections::BTreeMap<u64, Placement> {
    let ids = |v: &Value| -> Vec<u64> {
        let mut ids: Vec<u64> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_u64)
            .collect();
        ids.sort_unstable();
        ids
    };
    st["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            Some((
                s["id"].as_u64()?,
                (
                    s["leader"].as_u64(),
                    ids(&s["replicas"]),
                    s["desired"]
                        .as_array()
                        .map(|d| d.iter().filter_map(Value::as_u64).collect())
                        .unwrap_or_default(),
                    s["pinned"] == true,
                ),
            ))
        })
        .collect()
}

/// Whether every data group has the voters and leader the map wants for it, and every node
/// holds `per_node` replicas.
fn placed_evenly(st: &Value, nodes: &[u64], per_node: usize) -> bool {
    let p = placement_of(st);
    let settled = p.values().all(|(leader, voters, desired, _)| {
        let mut d = desired.clone();
        d.sort_unstable();
        *voters == d && *leader == desired.first().copied()
    });
    settled
        && nodes.iter().all(|n| {
            p.values()
                .filter(|(_, voters, _, _)| voters.contains(n))
                .count()
                == per_node
        })
}

/// A node that joins a 3-node cluster under load gets a group of its own (a split, then that
/// group's leadership) and its share of replicas; a group moved by the operator goes where it is
/// told and stays pinned while the rebalancer evens out the others around it; the replica a
/// move took away is collected (its node keeps no key of the group); nothing acknowledged is
/// lost or counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_gets_a_group_and_a_moved_group_leaves_nothing_behind() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut c = Cluster::start(3).await;
    let (key, _) = c.api(0).new_api_key(&c.admin, "moves").await;
    let history: Shared = Default::default();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let apis: Vec<common::Api> = (0..3).map(|i| c.api(i).clone()).collect();
    let clients = load(apis, key.clone(), 8, history.clone(), stop.clone());
    common::eventually(Duration::from_secs(30), "load running", || async {
        (history.lock().expect("lock").acked > 100).then_some(())
    })
    .await;

    let fourth = c.add_member(0).await;
    let st = common::eventually(
        Duration::from_secs(120),
        "four groups, one led by each node, three replicas on each",
        || async {
            let st = c.status(0).await;
            let p = placement_of(&st);
            let leaders: std::collections::BTreeSet<u64> =
                p.values().filter_map(|(l, ..)| *l).collect();
            (p.len() == 4 && leaders.len() == 4 && placed_evenly(&st, &[1, 2, 3, 4], 3))
                .then_some(st)
        },
    )
    .await;

    // Refusals first: each names its problem and changes nothing.
    let post_move = |via: usize, g: &str, body: Value| {
        let api = c.api(via).clone();
        let admin = c.admin.clone();
        let path = format!("/admin/v1/groups/{g}/move");
        async move {
            api.send(
                api.http
                    .post(api.url(&path))
                    .bearer_auth(&admin)
                    .json(&body),
            )
            .await
        }
    };
    let version = st["map_version"].clone();
    for (g, body, status, says) in [
        (
            "0",
            json!({"replicas": [1, 2]}),
            400,
            "replicas must name 3 nodes",
        ),
        ("0", json!({"replicas": [1, 1, 2]}), 400, "distinct"),
        (
            "0",
            json!({"replicas": [1, 2, 9]}),
            400,
            "node 9 is not an active member",
        ),
        (
            "0",
            json!({"replicas": [1, 2, 3], "leader": 4}),
            400,
            "leader 4 is not one of the replicas",
        ),
        (
            "0",
            json!({"replicas": [1, 2, 3], "auto": true}),
            400,
            "auto",
        ),
        ("0", json!({"to": [1, 2, 3]}), 400, "unknown field `to`"),
        ("0", json!({}), 400, "replicas is required"),
        ("0", json!([1, 2, 3]), 400, "JSON object"),
        ("999", json!({"replicas": [1, 2, 3]}), 404, "not found"),
        ("system", json!({"replicas": [1, 2, 3]}), 404, "not found"),
    ] {
        let r = post_move(1, g, body.clone()).await;
        assert_eq!(r.status.as_u16(), status, "{g} {body}: {:?}", r.body);
        assert!(
            r.body
                .to_string()
                .to_lowercase()
                .contains(&says.to_lowercase()),
            "{g} {body}: {:?}",
            r.body
        );
    }
    assert_eq!(
        c.status(0).await["map_version"],
        version,
        "a refused move changed the map"
    );

    // The move: a group to the node it lacks, led there, without one of its followers.
    let p = placement_of(&st);
    let (&g, (leader, voters, ..)) = p.iter().next().expect("a group");
    let leader = leader.expect("led");
    let lacking = (1..=4u64)
        .find(|n| !voters.contains(n))
        .expect("a node without it");
    let dropped = *voters.iter().find(|n| **n != leader).expect("a follower");
    let mut to: Vec<u64> = voters.iter().copied().filter(|n| *n != dropped).collect();
    to.push(lacking);
    let r = post_move(
        2,
        &g.to_string(),
        json!({"replicas": to, "leader": lacking}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}\n{}", r.body, c.logs_tail());
    assert_eq!(r.body["leader"], lacking);
    assert_eq!(r.body["pinned"], true);
    to.sort_unstable();
    // Pinned where it was put, and the other groups evened out around it: three each again.
    common::eventually(
        Duration::from_secs(120),
        "the moved group in place and the others evened out",
        || async {
            let st = c.status(3).await;
            let p = placement_of(&st);
            let (l, v, _, pinned) = p.get(&g)?;
            (*l == Some(lacking) && *v == to && *pinned && placed_evenly(&st, &[1, 2, 3, 4], 3))
                .then_some(())
        },
    )
    .await;
    // The replica the move took away is collected: its node no longer runs the group.
    let dropped_at = c.index_of(dropped);
    common::eventually(
        Duration::from_secs(60),
        "the dropped replica collected",
        || async {
            let d = c.api(dropped_at).get(&c.admin, "/admin/v1/digest").await;
            let groups = d.body["groups"].as_array()?.clone();
            (!groups.iter().any(|x| x["id"] == g)).then_some(())
        },
    )
    .await;
    let auto = post_move(0, &g.to_string(), json!({"auto": true})).await;
    assert_eq!(auto.status, StatusCode::OK, "{:?}", auto.body);
    assert_eq!(auto.body["pinned"], false);

    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.await.expect("client");
    }
    let h = std::mem::take(&mut *history.lock().expect("lock"));
    assert!(h.errors.is_empty(), "errors under load: {:?}", h.errors);
    verify(c.api(fourth), &key, &h).await;

    // Its data directory keeps no key of the group, in any column family.
    let dir = c.members[dropped_at].dir.join("db");
    c.terminate(dropped_at);
    let storage = kubbi::storage::Storage::open(&dir).expect("open the stopped node's db");
    let prefix = kubbi::storage::group_key(g as u16, &[]);
    for cf in [
        kubbi::storage::CF_STATE,
        kubbi::storage::CF_BLOB,
        kubbi::storage::CF_RAFT_LOG,
        kubbi::storage::CF_RAFT_META,
    ] {
        let left = storage
            .db()
            .prefix_iterator_cf(storage.cf(cf), &prefix)
            .filter_map(Result::ok)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .count();
        assert_eq!(left, 0, "{left} keys of group {g} left in {cf}");
    }
}
