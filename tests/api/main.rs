//! The v1 API over real HTTP against a real node: the four scenarios of the single-node issue,
//! ownership, listing, idempotency, versions, health and key revocation.

#[path = "../common/mod.rs"]
mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::{TestNode, marker};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn token_of(created: &Value) -> String {
    created["claim_token"].as_str().expect("token").to_string()
}

/// Waits up to `within` until the node runs exactly `n` kubbi actors.
async fn until_live_actors(
    svc: &kubbi::service::Service,
    n: usize,
    within: std::time::Duration,
    what: &str,
) {
    common::eventually(within, what, || {
        let svc = svc.clone();
        async move { (svc.live_actors().await == n).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_burn_after_read() {
    let n = TestNode::start().await;
    let secret = marker("db-password");
    let c = n
        .api
        .create(
            &n.key,
            json!({"content": secret, "content_type": "text/plain", "ttl_seconds": 300, "max_retrievals": 1}),
        )
        .await;
    assert_eq!(c.status, StatusCode::CREATED, "{:?}", c.body);
    assert_eq!(c.body["status"], "active");
    assert_eq!(c.body["content_type"], "text/plain");
    assert_eq!(c.body["max_retrievals"], 1);
    let token = token_of(&c.body);
    assert_eq!(
        c.body["claim_url"].as_str().expect("url"),
        format!("{}/r/{token}", n.api.base)
    );

    // Preview shows type and expiry without consuming, as often as asked.
    for _ in 0..3 {
        let p = n.api.preview(&token).await;
        assert_eq!(p.status, StatusCode::OK, "{:?}", p.body);
        assert_eq!(p.body["content_type"], "text/plain");
        assert_eq!(p.body["expires_at"], c.body["expires_at"]);
        assert_eq!(p.body["retrieval_count"], 0);
        assert_eq!(p.body["claim"]["method"], "POST");
        assert!(p.body.get("content").is_none());
    }
    let i = n.api.inspect(&token).await;
    assert_eq!(i.status, StatusCode::OK);
    assert!(i.body.get("claim").is_none());

    let claimed = n.api.claim(&token).await;
    assert_eq!(claimed.status, StatusCode::OK, "{:?}", claimed.body);
    assert_eq!(claimed.body["content"], secret.as_str());
    assert_eq!(claimed.body["burned"], true);
    assert_eq!(claimed.body["retrieval_count"], 1);
    assert_eq!(claimed.body["remaining_reads"], 0);

    let again = n.api.claim(&token).await;
    assert_eq!(again.status, StatusCode::GONE);
    assert_eq!(again.err_code(), "gone");
    assert_eq!(again.body["status"], "burned");
    let p = n.api.preview(&token).await;
    assert_eq!(p.status, StatusCode::GONE);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_multi_read() {
    let n = TestNode::start().await;
    let c = n
        .api
        .create(
            &n.key,
            json!({"content": {"rows": 42, "path": "s3://etl/out"}, "content_type": "application/json",
                   "ttl_seconds": 3600, "max_retrievals": 3}),
        )
        .await;
    assert_eq!(c.status, StatusCode::CREATED, "{:?}", c.body);
    let token = token_of(&c.body);
    for k in 1..=3 {
        let r = n.api.claim(&token).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.body["retrieval_count"], k);
        assert_eq!(
            r.body["content"],
            json!({"rows": 42, "path": "s3://etl/out"})
        );
        assert_eq!(r.body["burned"], k == 3);
    }
    let fourth = n.api.claim(&token).await;
    assert_eq!(fourth.status, StatusCode::GONE);
    let id = c.body["id"].as_str().expect("id");
    let d = n.api.get(&n.key, &format!("/api/v1/kubbis/{id}")).await;
    assert_eq!(d.body["status"], "burned");
    assert_eq!(d.body["retrieval_count"], 3);
    assert!(d.body["first_retrieved_at"].is_string());
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_producer_cancels() {
    let n = TestNode::start().await;
    let c = n
        .api
        .create(&n.key, json!({"content": "draft", "ttl_seconds": 600}))
        .await;
    let token = token_of(&c.body);
    let id = c.body["id"].as_str().expect("id").to_string();
    let d = n.api.delete(&n.key, &id).await;
    assert_eq!(d.status, StatusCode::OK, "{:?}", d.body);
    assert_eq!(d.body["status"], "deleted");
    assert_eq!(d.body["retrieval_count"], 0);
    let claim = n.api.claim(&token).await;
    assert_eq!(claim.status, StatusCode::GONE);
    assert_eq!(claim.err_code(), "gone");
    assert_eq!(claim.body["status"], "deleted");
    let detail = n.api.get(&n.key, &format!("/api/v1/kubbis/{id}")).await;
    assert_eq!(detail.body["status"], "deleted");
    let again = n.api.delete(&n.key, &id).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_package() {
    let n = TestNode::start().await;
    let binary: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    let c = n
        .api
        .create(
            &n.key,
            json!({"files": [
                {"name": "config.json", "content": "{\"mode\":\"fast\"}", "content_type": "application/json", "role": "config"},
                {"name": "instructions.md", "content": "# Do it\nnow", "content_type": "text/markdown", "role": "instructions"},
                {"name": "artifact.tar.gz", "content": STANDARD.encode(&binary), "content_type": "application/gzip",
                 "encoding": "base64", "role": "attachment"},
            ], "ttl_seconds": 900, "max_retrievals": 1, "metadata": {"job": 7}}),
        )
        .await;
    assert_eq!(c.status, StatusCode::CREATED, "{:?}", c.body);
    assert_eq!(c.body["file_count"], 3);
    assert_eq!(c.body["total_size_bytes"], 15 + 11 + 3000);
    assert_eq!(c.body["metadata"], json!({"job": 7}));
    let token = token_of(&c.body);

    let p = n.api.preview(&token).await;
    assert_eq!(p.status, StatusCode::OK, "{:?}", p.body);
    assert_eq!(p.body["type"], "kubbi_package");
    assert_eq!(p.body["kubbi_id"], c.body["id"]);
    assert_eq!(p.body["remaining_reads"], 1);
    assert_eq!(
        p.body["files"],
        json!([
            {"name": "config.json", "content_type": "application/json", "size_bytes": 15, "role": "config"},
            {"name": "instructions.md", "content_type": "text/markdown", "size_bytes": 11, "role": "instructions"},
            {"name": "artifact.tar.gz", "content_type": "application/gzip", "size_bytes": 3000, "role": "attachment"},
        ])
    );
    assert!(p.body["claim"]["message"].is_string());

    let claim = n.api.claim(&token).await;
    assert_eq!(claim.status, StatusCode::OK, "{:?}", claim.body);
    assert_eq!(claim.body["type"], "kubbi_package");
    assert_eq!(claim.body["burned"], true);
    let files = claim.body["files"].as_array().expect("files");
    assert_eq!(files[0]["content"], "{\"mode\":\"fast\"}");
    assert!(files[0].get("encoding").is_none());
    assert_eq!(files[1]["content"], "# Do it\nnow");
    assert_eq!(files[2]["encoding"], "base64");
    let back = STANDARD
        .decode(files[2]["content"].as_str().expect("b64"))
        .expect("decodes");
    assert_eq!(back, binary);
    assert_eq!(n.api.claim(&token).await.status, StatusCode::GONE);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_keys_kubbi_is_not_found_and_lists_are_private() {
    let n = TestNode::start().await;
    let (other, _) = n.api.new_api_key(&n.admin, "other").await;
    let c = n.api.create(&n.key, json!({"content": "mine"})).await;
    let id = c.body["id"].as_str().expect("id");
    let r = n.api.get(&other, &format!("/api/v1/kubbis/{id}")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(n.api.delete(&other, id).await.status, StatusCode::NOT_FOUND);
    let list = n.api.get(&other, "/api/v1/kubbis").await;
    assert_eq!(list.body["pagination"]["total"], 0);
    // Still intact for its owner.
    let mine = n.api.get(&n.key, &format!("/api/v1/kubbis/{id}")).await;
    assert_eq!(mine.body["status"], "active");
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_is_newest_first_paginated_and_filtered() {
    let n = TestNode::start().await;
    let mut ids = Vec::new();
    for i in 0..25 {
        let c = n
            .api
            .create(&n.key, json!({"content": format!("n{i}")}))
            .await;
        assert_eq!(c.status, StatusCode::CREATED);
        ids.push(c.body["id"].as_str().expect("id").to_string());
        // Distinct creation milliseconds make "newest first" observable.
        n.handle().clock.advance(2);
    }
    n.api.delete(&n.key, &ids[3]).await;
    let p1 = n.api.get(&n.key, "/api/v1/kubbis?page=1&limit=10").await;
    assert_eq!(p1.status, StatusCode::OK, "{:?}", p1.body);
    assert_eq!(
        p1.body["pagination"],
        json!({"page": 1, "limit": 10, "total": 25, "total_pages": 3})
    );
    let got: Vec<&str> = p1.body["kubbis"]
        .as_array()
        .expect("items")
        .iter()
        .map(|k| k["id"].as_str().expect("id"))
        .collect();
    let want: Vec<&str> = ids.iter().rev().take(10).map(String::as_str).collect();
    assert_eq!(got, want);
    let p3 = n.api.get(&n.key, "/api/v1/kubbis?page=3&limit=10").await;
    assert_eq!(p3.body["kubbis"].as_array().expect("items").len(), 5);
    let deleted = n.api.get(&n.key, "/api/v1/kubbis?status=deleted").await;
    assert_eq!(deleted.body["pagination"]["total"], 1);
    assert_eq!(deleted.body["kubbis"][0]["id"], ids[3].as_str());
    let default = n.api.get(&n.key, "/api/v1/kubbis").await;
    assert_eq!(default.body["pagination"]["limit"], 20);
    for bad in [
        "limit=0",
        "limit=101",
        "page=0",
        "page=x",
        "status=gone",
        "sort=asc",
    ] {
        let r = n.api.get(&n.key, &format!("/api/v1/kubbis?{bad}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(r.err_code(), "validation_error");
    }
    let at_limit = n.api.get(&n.key, "/api/v1/kubbis?limit=100").await;
    assert_eq!(at_limit.body["kubbis"].as_array().expect("items").len(), 25);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_create_returns_the_first_response() {
    let n = TestNode::start().await;
    let body = json!({"content": "once", "max_retrievals": 2});
    let send = |b: &Value, key: &str| {
        n.api.send(
            n.api
                .http
                .post(n.api.url("/api/v1/kubbis"))
                .bearer_auth(&n.key)
                .header("Idempotency-Key", key)
                .json(b),
        )
    };
    let first = send(&body, "job-17").await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    let second = send(&body, "job-17").await;
    assert_eq!(second.status, StatusCode::CREATED);
    assert_eq!(first.body, second.body);
    let conflict = send(&json!({"content": "twice"}), "job-17").await;
    assert_eq!(conflict.status, StatusCode::CONFLICT);
    assert_eq!(conflict.err_code(), "conflict");
    // Another producer using the same key string is independent.
    let (other, _) = n.api.new_api_key(&n.admin, "other").await;
    let theirs = n
        .api
        .send(
            n.api
                .http
                .post(n.api.url("/api/v1/kubbis"))
                .bearer_auth(&other)
                .header("Idempotency-Key", "job-17")
                .json(&body),
        )
        .await;
    assert_eq!(theirs.status, StatusCode::CREATED);
    assert_ne!(theirs.body["id"], first.body["id"]);
    let list = n.api.get(&n.key, "/api/v1/kubbis").await;
    assert_eq!(
        list.body["pagination"]["total"], 1,
        "no second kubbi was created"
    );
    // The replayed token works.
    let c = n
        .api
        .claim(second.body["claim_token"].as_str().expect("t"))
        .await;
    assert_eq!(c.body["content"], "once");
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_claim_counts_once_and_replays_the_payload() {
    let n = TestNode::start().await;
    let c = n
        .api
        .create(
            &n.key,
            json!({"content": "key material", "max_retrievals": 1}),
        )
        .await;
    let token = token_of(&c.body);
    let a = n.api.claim_idem(&token, "attempt-1").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["burned"], true);
    let b = n.api.claim_idem(&token, "attempt-1").await;
    assert_eq!(b.status, StatusCode::OK, "{:?}", b.body);
    assert_eq!(b.body["content"], "key material");
    assert_eq!(b.body["retrieval_count"], 1);
    let other = n.api.claim_idem(&token, "attempt-2").await;
    assert_eq!(other.status, StatusCode::GONE);
    let plain = n.api.claim(&token).await;
    assert_eq!(plain.status, StatusCode::GONE);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_headers_and_health() {
    let n = TestNode::start().await;
    let r = n.api.get(&n.key, "/api/v1/kubbis").await;
    assert_eq!(
        r.headers.get("api-version").map(|v| v.as_bytes()),
        Some(&b"v1"[..])
    );
    let r = n.api.get("kb_nope", "/api/v1/kubbis").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers.get("api-version").map(|v| v.as_bytes()),
        Some(&b"v1"[..])
    );
    for path in ["/api/v2/kubbis", "/api/v0/kubbis/x", "/api/v2"] {
        let r = n.api.get(&n.key, path).await;
        assert_eq!(r.status, StatusCode::NOT_IMPLEMENTED, "{path}");
        assert_eq!(r.err_code(), "not_implemented");
    }
    let h = n.api.get("", "/health").await;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.body["status"], "ok");
    let now = n.handle().service.now();
    let shown = h.body["now_ms"].as_u64().expect("now_ms");
    assert!(
        shown <= now && now - shown < 60_000,
        "/health shows the node's clock: {shown} vs {now}"
    );
    assert_eq!(n.api.get("", "/health/live").await.status, StatusCode::OK);
    assert_eq!(n.api.get("", "/health/ready").await.status, StatusCode::OK);
    let unknown = n.api.get(&n.key, "/api/v1/nothing").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.err_code(), "not_found");
    let wrong_method = n
        .api
        .send(
            n.api
                .http
                .put(n.api.url("/api/v1/kubbis"))
                .bearer_auth(&n.key),
        )
        .await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_keys_stop_working_and_their_kubbis_live_on() {
    let n = TestNode::start().await;
    let (key, key_id) = n.api.new_api_key(&n.admin, "to-revoke").await;
    let c = n.api.create(&key, json!({"content": "still here"})).await;
    assert_eq!(c.status, StatusCode::CREATED);
    let listed = n
        .api
        .send(
            n.api
                .http
                .get(n.api.url("/admin/v1/api-keys"))
                .bearer_auth(&n.admin),
        )
        .await;
    let keys = listed.body["keys"].as_array().expect("keys");
    assert!(
        keys.iter()
            .any(|k| k["id"] == key_id.as_str() && k["revoked_at"].is_null())
    );
    assert!(
        !listed.body.to_string().contains(&key),
        "keys are never listed"
    );

    let r = n
        .api
        .send(
            n.api
                .http
                .delete(n.api.url(&format!("/admin/v1/api-keys/{key_id}")))
                .bearer_auth(&n.admin),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(r.body["revoked_at"].is_string());
    let denied = n.api.create(&key, json!({"content": "x"})).await;
    assert_eq!(denied.status, StatusCode::UNAUTHORIZED);
    assert_eq!(denied.err_code(), "unauthorized");
    // The consumer does not need the key: the kubbi lives on.
    let claim = n.api.claim(&token_of(&c.body)).await;
    assert_eq!(claim.body["content"], "still here");
    // Admin routes need the admin token, not an API key.
    let not_admin = n
        .api
        .send(
            n.api
                .http
                .get(n.api.url("/admin/v1/api-keys"))
                .bearer_auth(&n.key),
        )
        .await;
    assert_eq!(not_admin.status, StatusCode::UNAUTHORIZED);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_claims_on_five_reads_succeed_exactly_five_times() {
    let n = TestNode::start().await;
    let payload = marker("fanout");
    let c = n
        .api
        .create(&n.key, json!({"content": payload, "max_retrievals": 5}))
        .await;
    let token = token_of(&c.body);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let api = n.api.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move { api.claim(&token).await }));
    }
    let mut ok = Vec::new();
    let mut gone = 0;
    for t in tasks {
        let r = t.await.expect("task");
        match r.status {
            StatusCode::OK => ok.push(r.body),
            StatusCode::GONE => gone += 1,
            s => panic!("unexpected {s}: {:?}", r.body),
        }
    }
    assert_eq!(ok.len(), 5, "exactly max_retrievals claims succeed");
    assert_eq!(gone, 95);
    let mut counts: Vec<u64> = ok
        .iter()
        .map(|b| {
            assert_eq!(
                b["content"],
                payload.as_str(),
                "each success carries the created bytes"
            );
            b["retrieval_count"].as_u64().expect("count")
        })
        .collect();
    counts.sort_unstable();
    assert_eq!(counts, vec![1, 2, 3, 4, 5]);
    assert_eq!(ok.iter().filter(|b| b["burned"] == true).count(), 1);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_tokens_are_not_found() {
    let n = TestNode::start().await;
    let fresh = kubbi::ids::ClaimToken::generate(0);
    for t in [
        fresh.expose().to_string(),
        "short".into(),
        "%2e%2e".into(),
        "A".repeat(46),
    ] {
        assert_eq!(n.api.preview(&t).await.status, StatusCode::NOT_FOUND, "{t}");
        assert_eq!(n.api.claim(&t).await.status, StatusCode::NOT_FOUND, "{t}");
    }
    // A token routed to a shard that does not exist.
    let far = kubbi::ids::ClaimToken::generate(999);
    assert_eq!(
        n.api.claim(&far.expose()).await.status,
        StatusCode::NOT_FOUND
    );
    for id in ["nope", "00000000-0000-4000-8000-000000000000"] {
        let r = n.api.get(&n.key, &format!("/api/v1/kubbis/{id}")).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{id}");
    }
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_kubbis_actor_stops_without_waiting_for_idle() {
    // Idle is far away: only ending (burn, delete) may free these actors within the test.
    let n = TestNode::start_with(|c| c.actor_idle = std::time::Duration::from_secs(300)).await;
    let make = |max: u32| {
        let api = n.api.clone();
        let key = n.key.clone();
        async move {
            let c = api
                .create(
                    &key,
                    json!({"content": "v", "max_retrievals": max, "ttl_seconds": 3600}),
                )
                .await;
            assert_eq!(c.status, StatusCode::CREATED);
            (
                token_of(&c.body),
                c.body["id"].as_str().expect("id").to_string(),
            )
        }
    };
    let mut burned = Vec::new();
    for _ in 0..5 {
        let (t, _) = make(1).await;
        assert_eq!(n.api.claim(&t).await.body["burned"], true);
        burned.push(t);
    }
    for _ in 0..3 {
        let (t, _) = make(3).await;
        assert_eq!(n.api.claim(&t).await.status, StatusCode::OK);
    }
    for _ in 0..2 {
        let (t, id) = make(3).await;
        assert_eq!(n.api.claim(&t).await.status, StatusCode::OK);
        assert_eq!(n.api.delete(&n.key, &id).await.status, StatusCode::OK);
    }
    let svc = n.handle().service.clone();
    // The three multi-read kubbis keep their actors; the burned and deleted ones do not.
    until_live_actors(
        &svc,
        3,
        std::time::Duration::from_secs(10),
        "ended actors stop",
    )
    .await;
    // A later claim of a burned kubbi is still refused (without an actor, see
    // `claims_of_an_ended_kubbi_wake_no_actor`).
    for t in &burned {
        let r = n.api.claim(t).await;
        assert_eq!(r.status, StatusCode::GONE);
        assert_eq!(r.body["status"], "burned");
    }
    until_live_actors(
        &svc,
        3,
        std::time::Duration::from_secs(10),
        "refusing actors stop",
    )
    .await;
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_of_an_ended_kubbi_wake_no_actor() {
    let n = TestNode::start_with(|c| c.actor_idle = std::time::Duration::from_millis(500)).await;
    let c = n
        .api
        .create(
            &n.key,
            json!({"content": "once", "max_retrievals": 1, "ttl_seconds": 3600}),
        )
        .await;
    let token = token_of(&c.body);
    assert_eq!(n.api.claim(&token).await.status, StatusCode::OK);
    let svc = n.handle().service.clone();
    until_live_actors(
        &svc,
        0,
        std::time::Duration::from_secs(10),
        "the burned kubbi's actor passivates",
    )
    .await;
    let started = svc.actor_activations();
    assert!(started >= 1, "the claim that burned it ran in an actor");
    for _ in 0..5 {
        let r = n.api.claim(&token).await;
        assert_eq!(r.status, StatusCode::GONE);
        assert_eq!(r.err_code(), "gone");
        assert_eq!(r.body["status"], "burned");
    }
    assert_eq!(
        svc.actor_activations(),
        started,
        "a claim of an ended kubbi is answered without starting an actor"
    );
    assert_eq!(svc.live_actors().await, 0);
    n.stop().await;
}

/// A leader's clock that jumps ahead and steps back again (an NTP correction) must not make a
/// later answer contradict an earlier one: a preview that said `expired` recorded the expiry,
/// and a claim stamped by the stepped-back clock is judged at the group's time, which never
/// goes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_contradicts_an_earlier_expiry_when_the_clock_steps_back() {
    let n = TestNode::start().await;
    let make =
        |max: u32, ttl: u32| json!({"content": "x", "max_retrievals": max, "ttl_seconds": ttl});
    let seen = token_of(&n.api.create(&n.key, make(1, 60)).await.body);
    let unseen = token_of(&n.api.create(&n.key, make(1, 60)).await.body);
    let clock = n.handle().clock.clone();

    // 61 s ahead, only a preview: it says expired (and records the expiry, stamped then).
    clock.advance(61_000);
    let p = n.api.preview(&seen).await;
    assert_eq!((p.status, p.err_code()), (StatusCode::GONE, "expired"));
    // Stepped back to real time: the kubbi the preview saw expired stays expired, and so does
    // the one nobody looked at, as the group's time passed its deadline too.
    clock.advance(-61_000);
    for (token, what) in [(&seen, "the previewed kubbi"), (&unseen, "the other kubbi")] {
        let c = n.api.claim(token).await;
        assert_eq!(
            (c.status, c.err_code()),
            (StatusCode::GONE, "expired"),
            "{what} was claimed after the group's time passed its deadline: {:?}",
            c.body
        );
        let p = n.api.preview(token).await;
        assert_eq!((p.status, p.err_code()), (StatusCode::GONE, "expired"));
    }
    let ahead = n
        .api
        .metrics_text()
        .await
        .lines()
        .filter(|l| l.starts_with("kubbi_group_time_ahead_ms{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max);
    assert!(
        ahead >= 55_000.0,
        "the metric shows the group's time ahead of this node's clock: {ahead}"
    );
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actors_activate_on_demand_and_passivate_when_idle() {
    let n = TestNode::start_with(|c| c.actor_idle = std::time::Duration::from_millis(1500)).await;
    let mut tokens = Vec::new();
    for i in 0..20 {
        let c = n
            .api
            .create(
                &n.key,
                json!({"content": format!("v{i}"), "max_retrievals": 3, "ttl_seconds": 3600}),
            )
            .await;
        tokens.push(token_of(&c.body));
    }
    // A far deadline: created passive, its deadline held by the shard's timer index.
    assert_eq!(n.handle().service.live_actors().await, 0);
    for t in &tokens {
        assert_eq!(n.api.claim(t).await.status, StatusCode::OK);
    }
    let live = n.handle().service.live_actors().await;
    assert!(live > 0 && live <= 20, "{live} actors after claims");
    let svc = n.handle().service.clone();
    until_live_actors(
        &svc,
        0,
        std::time::Duration::from_secs(10),
        "actors passivate",
    )
    .await;
    // Reactivated on demand, with the right count.
    for t in &tokens {
        let r = n.api.claim(t).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body["retrieval_count"], 2);
    }
    until_live_actors(
        &svc,
        0,
        std::time::Duration::from_secs(10),
        "actors passivate again",
    )
    .await;
    // A kubbi expiring within the idle window gets its actor (and timer) at creation.
    let soon = n
        .api
        .create(&n.key, json!({"content": "soon", "ttl_seconds": 1}))
        .await;
    assert_eq!(soon.status, StatusCode::CREATED);
    let svc = n.handle().service.clone();
    until_live_actors(
        &svc,
        1,
        std::time::Duration::from_secs(5),
        "actor activated at creation",
    )
    .await;
    let detail = format!("/api/v1/kubbis/{}", soon.body["id"].as_str().expect("id"));
    common::eventually(
        std::time::Duration::from_secs(10),
        "the short kubbi expires",
        || {
            let api = n.api.clone();
            let key = n.key.clone();
            let detail = detail.clone();
            async move { (api.get(&key, &detail).await.body["status"] == "expired").then_some(()) }
        },
    )
    .await;
    until_live_actors(
        &svc,
        0,
        std::time::Duration::from_secs(10),
        "all actors gone again",
    )
    .await;
    assert_eq!(
        n.api.claim(&token_of(&soon.body)).await.err_code(),
        "expired"
    );
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_lifecycle_routes_and_raft_without_secrets() {
    let n = TestNode::start().await;
    let c = n
        .api
        .create(&n.key, json!({"content": "m", "max_retrievals": 2}))
        .await;
    let token = token_of(&c.body);
    n.api.preview(&token).await;
    n.api.claim(&token).await;
    n.api.claim(&token).await;
    let other = n.api.create(&n.key, json!({"content": "n"})).await;
    n.api
        .delete(&n.key, other.body["id"].as_str().expect("id"))
        .await;
    let active = n.api.create(&n.key, json!({"content": "still here"})).await;
    assert_eq!(active.status, StatusCode::CREATED);
    let text = n.api.metrics_text().await;
    for line in [
        "kubbi_kubbis_total{event=\"created\"} 3",
        "kubbi_kubbis_total{event=\"claimed\"} 2",
        "kubbi_kubbis_total{event=\"burned\"} 1",
        "kubbi_kubbis_total{event=\"deleted\"} 1",
        "kubbi_kubbis_active 1",
        "route=\"/r/{token}/claim\",method=\"POST\",status=\"200\"} 2",
        "route=\"/api/v1/kubbis\",method=\"POST\",status=\"201\"} 3",
        "kubbi_raft_is_leader{group=\"system\"} 1",
        "kubbi_storage_fsync_duration_seconds_count",
        "kubbi_raft_append_duration_seconds_bucket",
        // A fresh node's raft log: one segment, appended to.
        "kubbi_raft_log_segments 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    // Every series the Grafana dashboard queries exists.
    let dash = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana-dashboard.json"
    ))
    .expect("dashboard");
    for word in dash.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("kubbi_") && word.len() > 6 {
            assert!(
                text.contains(word),
                "the dashboard queries {word}, which /metrics lacks"
            );
        }
    }
    assert!(!text.contains(&token[..20]), "no token in metrics");
    assert!(!text.contains(&n.key[..20]), "no key in metrics");
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_covers_every_route_and_every_ref_resolves() {
    let n = TestNode::start().await;
    let doc = n.api.get("", "/openapi.json").await.body;
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    // Every route API.md names, with its method.
    let api_md = [
        ("post", "/api/v1/kubbis"),
        ("get", "/api/v1/kubbis"),
        ("get", "/api/v1/kubbis/{id}"),
        ("delete", "/api/v1/kubbis/{id}"),
        ("get", "/r/{token}"),
        ("get", "/r/{token}/inspect"),
        ("post", "/r/{token}/claim"),
        ("get", "/health"),
        ("get", "/health/live"),
        ("get", "/health/ready"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
        ("post", "/admin/v1/api-keys"),
        ("get", "/admin/v1/api-keys"),
        ("delete", "/admin/v1/api-keys/{id}"),
        ("get", "/admin/v1/cluster"),
    ];
    for (m, p) in api_md {
        assert!(
            paths.get(p).and_then(|i| i.get(m)).is_some(),
            "{m} {p} missing from the document"
        );
    }
    // Every documented operation exists on the server (not the fallback, not 405), and every
    // one documents its errors with the envelope.
    let mut ids = std::collections::BTreeSet::new();
    for (p, item) in paths {
        for (m, op) in item.as_object().expect("item") {
            assert!(ids.insert(op["operationId"].as_str().expect("operationId").to_string()));
            assert!(
                op["responses"]["500"]["content"]["application/json"].is_object(),
                "{m} {p}"
            );
            let url = n.api.url(
                &p.replace("{token}", &"A".repeat(46))
                    .replace("{id}", "00000000-0000-4000-8000-000000000000"),
            );
            let method = reqwest::Method::from_bytes(m.to_uppercase().as_bytes()).expect("method");
            let r = n
                .api
                .send(n.api.http.request(method, url).bearer_auth(&n.admin))
                .await;
            assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{m} {p}");
            assert_ne!(
                r.body["message"], "route not found",
                "{m} {p} is documented but not served"
            );
        }
    }
    // Every $ref resolves.
    let text = doc.to_string();
    for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = part.split('"').next().expect("name");
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "dangling $ref {name}"
        );
    }
    n.stop().await;
}

/// Creates an API key with these `limits` and returns `(key, id, response body)`.
async fn key_with_limits(n: &TestNode, limits: Value) -> (String, String, Value) {
    let r = n
        .api
        .send(
            n.api
                .http
                .post(n.api.url("/admin/v1/api-keys"))
                .bearer_auth(&n.admin)
                .json(&json!({"label": "limited", "limits": limits})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    (
        r.body["api_key"].as_str().expect("key").to_string(),
        r.body["id"].as_str().expect("id").to_string(),
        r.body,
    )
}

fn assert_quota_refused(r: &common::Resp, max_retry_after: u64) {
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.body);
    assert_eq!(r.err_code(), "quota_exceeded", "{:?}", r.body);
    let after: u64 = r.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(
        (1..=max_retry_after).contains(&after),
        "Retry-After {after}"
    );
}

async fn active_count(n: &TestNode, key: &str) -> u64 {
    let l = n
        .api
        .get(key, "/api/v1/kubbis?status=active&limit=100")
        .await;
    assert_eq!(l.status, StatusCode::OK, "{:?}", l.body);
    l.body["pagination"]["total"].as_u64().expect("total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_kubbi_quota_holds_at_the_limit_and_frees_on_every_end() {
    let n = TestNode::start().await;
    let (key, id, created) = key_with_limits(&n, json!({"max_active_kubbis": 3})).await;
    assert_eq!(created["limits"]["max_active_kubbis"], 3);
    assert!(created["limits"]["max_stored_bytes"].is_null());
    // Three kubbis land in random shards; the quota counts all of them.
    let mut made = Vec::new();
    for i in 0..3 {
        let c = n
            .api
            .create(
                &key,
                json!({"content": format!("q{i}"), "max_retrievals": 1}),
            )
            .await;
        assert_eq!(c.status, StatusCode::CREATED, "{:?}", c.body);
        made.push(c.body);
    }
    for _ in 0..5 {
        let r = n.api.create(&key, json!({"content": "one too many"})).await;
        assert_quota_refused(&r, 60);
    }
    assert_eq!(
        active_count(&n, &key).await,
        3,
        "a refused create stores nothing"
    );
    // Other keys are not limited by this one.
    assert_eq!(
        n.api
            .create(&n.key, json!({"content": "free"}))
            .await
            .status,
        StatusCode::CREATED
    );
    // Each way a kubbi ends gives its slot back: a burn, then a delete.
    assert_eq!(
        n.api.claim(&token_of(&made[0])).await.status,
        StatusCode::OK
    );
    assert_eq!(
        n.api
            .create(&key, json!({"content": "after burn"}))
            .await
            .status,
        StatusCode::CREATED
    );
    assert_quota_refused(&n.api.create(&key, json!({"content": "x"})).await, 60);
    let victim = made[1]["id"].as_str().expect("id");
    assert_eq!(n.api.delete(&key, victim).await.status, StatusCode::OK);
    let c = n
        .api
        .create(&key, json!({"content": "after delete", "ttl_seconds": 1}))
        .await;
    assert_eq!(c.status, StatusCode::CREATED, "{:?}", c.body);
    // ...and an expiry.
    common::eventually(
        std::time::Duration::from_secs(20),
        "expiry frees a slot",
        || async {
            let r = n.api.create(&key, json!({"content": "after expiry"})).await;
            (r.status == StatusCode::CREATED).then_some(())
        },
    )
    .await;
    // The operator sees the usage.
    let listed = n
        .api
        .send(
            n.api
                .http
                .get(n.api.url("/admin/v1/api-keys"))
                .bearer_auth(&n.admin),
        )
        .await;
    let k = listed.body["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["id"] == id.as_str())
        .expect("listed")
        .clone();
    assert_eq!(k["usage"]["active_kubbis"], 3, "{k}");
    assert_eq!(k["limits"]["max_active_kubbis"], 3, "{k}");
    assert!(
        k["usage"]["creates_today"].as_u64().expect("creates") >= 6,
        "{k}"
    );
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_creates_fills_the_quota_exactly() {
    let n = TestNode::start().await;
    let (key, _, _) = key_with_limits(&n, json!({"max_active_kubbis": 5})).await;
    let calls = (0..40).map(|i| {
        let api = n.api.clone();
        let key = key.clone();
        async move {
            api.create(&key, json!({"content": format!("burst {i}")}))
                .await
        }
    });
    let results = futures::future::join_all(calls).await;
    let ok = results
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .count();
    for r in results.iter().filter(|r| r.status != StatusCode::CREATED) {
        assert_quota_refused(r, 60);
    }
    // The key's kubbis live in its home shard, which counts them exactly.
    assert_eq!(ok, 5, "creates that succeeded under a quota of 5");
    assert_eq!(active_count(&n, &key).await, ok as u64);
    // Whatever the burst left free can be filled, exactly to the limit.
    for _ in ok..5 {
        let r = n.api.create(&key, json!({"content": "fill"})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    assert_quota_refused(&n.api.create(&key, json!({"content": "x"})).await, 60);
    assert_eq!(active_count(&n, &key).await, 5);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_bytes_and_daily_create_quotas() {
    let n = TestNode::start().await;
    // Sealing adds a few dozen bytes per part: two 4,000-byte payloads fit in 10,000, three
    // do not.
    let (key, _, _) = key_with_limits(&n, json!({"max_stored_bytes": 10_000})).await;
    let body = json!({"content": "b".repeat(4_000)});
    assert_eq!(
        n.api.create(&key, body.clone()).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        n.api.create(&key, body.clone()).await.status,
        StatusCode::CREATED
    );
    let r = n.api.create(&key, body.clone()).await;
    assert_quota_refused(&r, 60);
    assert!(
        r.body["message"]
            .as_str()
            .expect("message")
            .contains("10000")
    );
    // A small one still fits.
    assert_eq!(
        n.api.create(&key, json!({"content": "small"})).await.status,
        StatusCode::CREATED
    );

    // Creates per day count ended kubbis too; the wait is until the next UTC midnight.
    let (key, _, _) = key_with_limits(&n, json!({"max_creates_per_day": 2})).await;
    for _ in 0..2 {
        let c = n.api.create(&key, json!({"content": "d"})).await;
        assert_eq!(c.status, StatusCode::CREATED);
        let id = c.body["id"].as_str().expect("id");
        assert_eq!(n.api.delete(&key, id).await.status, StatusCode::OK);
    }
    assert_quota_refused(&n.api.create(&key, json!({"content": "d"})).await, 86_400);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_default_limits_apply_to_keys_without_their_own() {
    let n = TestNode::start_with(|c| {
        c.limits.key_defaults.max_active = Some(1);
    })
    .await;
    assert_eq!(
        n.api.create(&n.key, json!({"content": "1"})).await.status,
        StatusCode::CREATED
    );
    assert_quota_refused(&n.api.create(&n.key, json!({"content": "2"})).await, 60);
    // A key's own limit overrides the default.
    let (key, _, _) = key_with_limits(&n, json!({"max_active_kubbis": 2})).await;
    for _ in 0..2 {
        assert_eq!(
            n.api.create(&key, json!({"content": "x"})).await.status,
            StatusCode::CREATED
        );
    }
    assert_quota_refused(&n.api.create(&key, json!({"content": "x"})).await, 60);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_rate_limit_answers_429_with_retry_after() {
    let n = TestNode::start().await;
    // 2 per second, burst 4: the fifth request at once is refused.
    let (key, _, _) = key_with_limits(&n, json!({"requests_per_second": 2})).await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        let r = n.api.get(&key, "/api/v1/kubbis").await;
        codes.push(r.status);
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(r.err_code(), "rate_limited");
            assert!(r.headers.contains_key("retry-after"));
        }
    }
    assert!(
        codes.iter().take(4).all(|c| *c == StatusCode::OK),
        "{codes:?}"
    );
    assert_eq!(codes[5], StatusCode::TOO_MANY_REQUESTS, "{codes:?}");
    // Another key is not affected; and the key recovers as its bucket refills.
    assert_eq!(
        n.api.get(&n.key, "/api/v1/kubbis").await.status,
        StatusCode::OK
    );
    common::eventually(
        std::time::Duration::from_secs(10),
        "bucket refills",
        || async {
            (n.api.get(&key, "/api/v1/kubbis").await.status == StatusCode::OK).then_some(())
        },
    )
    .await;
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_limits_are_validated_at_and_past_their_bounds() {
    let n = TestNode::start().await;
    let post = |body: Value| {
        let api = n.api.clone();
        let admin = n.admin.clone();
        async move {
            api.send(
                api.http
                    .post(api.url("/admin/v1/api-keys"))
                    .bearer_auth(&admin)
                    .json(&body),
            )
            .await
        }
    };
    for bad in [
        json!({"limits": {"max_active_kubbis": 0}}),
        json!({"limits": {"max_active_kubbis": 4_294_967_296_u64}}),
        json!({"limits": {"max_active_kubbis": -1}}),
        json!({"limits": {"max_active_kubbis": 1.5}}),
        json!({"limits": {"max_active_kubbis": "3"}}),
        json!({"limits": {"requests_per_second": 1_000_001}}),
        json!({"limits": {"max_stored_bytes": 9_223_372_036_854_775_808_u64}}),
        json!({"limits": {"max_creates_per_day": 0}}),
        json!({"limits": {"burst": 3}}),
        json!({"limits": [1]}),
    ] {
        let r = post(bad.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad} -> {:?}", r.body);
        assert_eq!(r.err_code(), "validation_error");
    }
    for good in [
        json!({"limits": {"max_active_kubbis": 4_294_967_295_u64, "requests_per_second": 1_000_000}}),
        json!({"limits": {"max_stored_bytes": 9_223_372_036_854_775_807_u64, "max_creates_per_day": 1}}),
        json!({"limits": null}),
        json!({"limits": {}}),
    ] {
        let r = post(good.clone()).await;
        assert_eq!(r.status, StatusCode::CREATED, "{good} -> {:?}", r.body);
    }
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_by_default_and_allows_only_listed_origins() {
    const ACAO: &str = "access-control-allow-origin";
    let plain = TestNode::start().await;
    let r = plain
        .api
        .send(
            plain
                .api
                .http
                .get(plain.api.url("/api/v1/kubbis"))
                .bearer_auth(&plain.key)
                .header("origin", "https://app.example.com"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!r.headers.contains_key(ACAO), "CORS is off by default");
    plain.stop().await;

    let n = TestNode::start_with(|c| {
        c.cors_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let preflight = |origin: &'static str, path: &'static str| {
        let api = n.api.clone();
        async move {
            api.send(
                api.http
                    .request(reqwest::Method::OPTIONS, api.url(path))
                    .header("origin", origin)
                    .header("access-control-request-method", "POST")
                    .header(
                        "access-control-request-headers",
                        "authorization, content-type",
                    ),
            )
            .await
        }
    };
    let ok = preflight("https://app.example.com", "/api/v1/kubbis").await;
    assert_eq!(ok.status, StatusCode::NO_CONTENT);
    assert_eq!(ok.headers[ACAO], "https://app.example.com");
    let allowed = ok.headers["access-control-allow-headers"]
        .to_str()
        .expect("ascii");
    assert!(allowed.contains("authorization") && allowed.contains("content-type"));
    for (origin, path) in [
        ("https://evil.example.com", "/api/v1/kubbis"),
        ("https://app.example.com.evil.com", "/api/v1/kubbis"),
        ("https://app.example.com", "/admin/v1/api-keys"),
    ] {
        let r = preflight(origin, path).await;
        assert!(
            !r.headers.contains_key(ACAO),
            "{origin} {path}: {:?}",
            r.headers
        );
    }
    // Real requests from the listed origin carry the header, with Vary: Origin.
    let created = n
        .api
        .send(
            n.api
                .http
                .post(n.api.url("/api/v1/kubbis"))
                .bearer_auth(&n.key)
                .header("origin", "https://app.example.com")
                .json(&json!({"content": "cross-origin"})),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(created.headers[ACAO], "https://app.example.com");
    assert!(
        created.headers["vary"]
            .to_str()
            .expect("ascii")
            .contains("origin")
    );
    n.stop().await;
}
