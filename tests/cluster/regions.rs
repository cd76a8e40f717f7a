//! Nodes in regions, across the region simulator (`kubbi-netsim`): placement spans regions,
//! and a region cut off (a partition, not a kill) leaves every group served by the majority
//! that remains; when the region returns it catches up with no operator action.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{
    self,
    cluster::{Cluster, Regions},
};

fn three_regions(rtt_ms: f64) -> Regions {
    Regions {
        names: vec!["eu".into(), "us".into(), "ap".into()],
        rtt_ms,
    }
}

/// Claims `token` through `api` with Idempotency-Key `key` until the status satisfies `done`
/// (a retry of a claim that committed but timed out is answered as the first, not counted
/// again).
async fn claim_until(
    api: &common::Api,
    token: &str,
    key: &str,
    within: Duration,
    what: &str,
    done: fn(StatusCode) -> bool,
) -> common::Resp {
    common::eventually(within, what, || async move {
        let r = api.claim_idem(token, key).await;
        done(r.status).then_some(r)
    })
    .await
}

/// Any answer but "no leader right now".
fn answered(s: StatusCode) -> bool {
    s != StatusCode::SERVICE_UNAVAILABLE
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_cut_off_leaves_every_group_served_and_catches_up_when_it_returns() {
    let c = Cluster::start_regions(3, three_regions(30.0), &[]).await;
    let net = c.net.as_ref().expect("regions");
    let st = c.status(0).await;
    let zones: Vec<&str> = st["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["zone"].as_str())
        .collect();
    assert_eq!(zones, ["eu/z1", "us/z2", "ap/z3"], "{st}");
    // The CLI shows where each group leads and keeps its replicas.
    let out = std::process::Command::new(common::kubbi_bin())
        .args(["cluster", "status", "--url", &c.api(0).base])
        .env("KUBBI_ADMIN_TOKEN", &c.admin)
        .output()
        .expect("kubbi cluster status");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("regions: leader in"))
        .collect();
    assert_eq!(
        lines.len(),
        st["shards"].as_array().map_or(0, Vec::len),
        "one regions line per group:\n{text}"
    );
    assert!(
        lines.iter().all(|l| {
            let mut r: Vec<&str> = l.rsplit(' ').next().unwrap_or("").split(',').collect();
            r.sort_unstable();
            r == ["ap", "eu", "us"]
        }),
        "every group spans the three regions:\n{text}"
    );
    let (key, _) = c.api(0).new_api_key(&c.admin, "regions").await;
    // Kubbis through every region; each lands in a group its node leads.
    let mut kubbis = Vec::new();
    for via in 0..3 {
        for i in 0..6 {
            let content = format!("from {via} #{i}");
            let r = c
                .api(via)
                .create(&key, json!({"content": content, "max_retrievals": 2}))
                .await;
            assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
            let token = r.body["claim_token"].as_str().expect("token").to_string();
            let shard = kubbi::ids::ClaimToken::parse(&token)
                .expect("token")
                .shard();
            let group = common::group_of_shard(&st, shard).expect("a group");
            kubbis.push((token, group, content));
        }
    }
    // Cut off the region of a node that leads a data group holding some of them.
    let led_by = |st: &serde_json::Value, g: u64| {
        st["shards"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["id"] == g))
            .and_then(|s| s["leader"].as_u64())
    };
    let st = c.status(0).await;
    let (_, lost_group, _) = kubbis
        .iter()
        .find(|(_, g, _)| led_by(&st, *g) == Some(3))
        .or_else(|| kubbis.iter().find(|(_, g, _)| led_by(&st, *g).is_some()))
        .cloned()
        .expect("a led group");
    let victim = c.index_of(led_by(&st, lost_group).expect("its leader"));
    let region = c.zone_region(victim);
    let survivor = (victim + 1) % 3;
    net.say(&format!("cut {region}"));
    let cut_at = Instant::now();
    let (token, _, content) = kubbis
        .iter()
        .find(|(_, g, _)| *g == lost_group)
        .expect("a kubbi of the lost group");
    let first = claim_until(
        c.api(survivor),
        token,
        "cut-first",
        Duration::from_secs(60),
        "a claim of a kubbi whose leader is cut off",
        |s| s == StatusCode::OK,
    )
    .await;
    let recovered = cut_at.elapsed();
    assert_eq!(first.body["content"], content.as_str());
    eprintln!(
        "region {region} cut off: first claim of a kubbi led there served {recovered:?} after the cut"
    );
    // Every kubbi is served by the two regions left, each claim counted once.
    for (t, _, content) in &kubbis {
        let r = claim_until(
            c.api(survivor),
            t,
            "cut-all",
            Duration::from_secs(30),
            "a claim in the majority",
            answered,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.body["content"], content.as_str());
        let burned = t == token;
        assert_eq!(r.body["burned"], burned, "{:?}", r.body);
    }
    let during = c
        .api(survivor)
        .create(&key, json!({"content": "during the cut"}))
        .await;
    assert_eq!(during.status, StatusCode::CREATED, "{:?}", during.body);
    let during = during.body["claim_token"]
        .as_str()
        .expect("token")
        .to_string();
    net.say("heal");
    // The returning region catches up by itself: every group's leader sees it matched.
    let victim_id = c.members[victim].id.to_string();
    common::eventually(
        Duration::from_secs(60),
        "the returning node caught up",
        || async {
            let st = c.status(survivor).await;
            let shards = st["shards"].as_array()?.clone();
            shards
                .iter()
                .all(|s| {
                    s["leader"].is_u64()
                        && s["replication_lag"]
                            .get(&victim_id)
                            .is_none_or(|l| l.as_u64() == Some(0))
                })
                .then_some(())
        },
    )
    .await;
    // Through the returning node: what the majority did while it was away, and nothing else.
    for (t, _, _) in &kubbis {
        let r = claim_until(
            c.api(victim),
            t,
            "healed",
            Duration::from_secs(30),
            "a claim through the returned node",
            answered,
        )
        .await;
        if t == token {
            assert_eq!(
                r.status,
                StatusCode::GONE,
                "burned during the cut: {:?}",
                r.body
            );
        } else {
            assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
            assert_eq!(r.body["burned"], true, "{:?}", r.body);
        }
    }
    let p = c.api(victim).preview(&during).await;
    assert_eq!(p.status, StatusCode::OK, "{:?}", p.body);
}

/// A planned stop (SIGTERM) hands every group the node leads to a caught-up voter before the
/// process exits, so the group is led again at once instead of after an election timeout.
/// Elections here take 5-10 s (`--raft-heartbeat-ms 1000`): a new leader within 3 s of the
/// exit can only come from the hand-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_stop_hands_off_leadership_instead_of_waiting_for_an_election() {
    let mut c = Cluster::start_with(3, &["--raft-heartbeat-ms", "1000"]).await;
    let (key, _) = c.api(0).new_api_key(&c.admin, "handoff").await;
    let st = c.status(0).await;
    let led: Vec<(u64, u64)> = st["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .filter_map(|s| Some((s["id"].as_u64()?, s["leader"].as_u64()?)))
        .collect();
    // The system group's id is "system": every entry here is a data group.
    let victim_id = led.first().map(|(_, l)| *l).expect("a led data group");
    let victim = c.index_of(victim_id);
    let theirs: Vec<u64> = led
        .iter()
        .filter(|(_, l)| *l == victim_id)
        .map(|(g, _)| *g)
        .collect();
    let survivor = (victim + 1) % 3;
    let r = c
        .api(survivor)
        .create(&key, json!({"content": "kept", "max_retrievals": 5}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let token = r.body["claim_token"].as_str().expect("token").to_string();
    c.terminate(victim); // returns when the process has exited
    let stopped = Instant::now();
    common::eventually(
        Duration::from_secs(3),
        "every group the stopped node led has another leader",
        || async {
            let st = c.status(survivor).await;
            let shards = st["shards"].as_array()?.clone();
            theirs
                .iter()
                .all(|g| {
                    shards.iter().any(|s| {
                        s["id"] == *g && s["leader"].as_u64().is_some_and(|l| l != victim_id)
                    })
                })
                .then_some(())
        },
    )
    .await;
    eprintln!(
        "groups {theirs:?} led again {:?} after their leader's planned stop",
        stopped.elapsed()
    );
    let claim = c.api(survivor).claim(&token).await;
    assert_eq!(claim.status, StatusCode::OK, "{:?}", claim.body);
    assert_eq!(claim.body["content"], "kept");
}
