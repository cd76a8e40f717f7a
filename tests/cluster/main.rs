//! Real node processes forming a cluster: any node serves any request, failover, membership
//! changes under load, full restarts, and refusal of a node whose data directory was wiped.

#[path = "../common/mod.rs"]
mod common;

use common::cluster::Cluster;
use reqwest::StatusCode;
use serde_json::json;

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
