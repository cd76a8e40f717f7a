//! Durability and wiping: expiry with no traffic (also across a restart), ciphertext removed at
//! every end state, no plaintext in any file, kill -9 under load, and logs free of secrets.

#[path = "../common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ProcessNode, TestNode, contains, eventually, files_under, marker};
use kubbi::ids::KubbiId;
use kubbi::state::{StateRead, Status, Table, read_kubbi};
use kubbi::storage::{CF_BLOB, CF_STATE, Storage};
use reqwest::StatusCode;
use serde_json::json;

/// The raft group holding `id`, from the node's shard map.
fn group_of(storage: &Storage, id: &KubbiId) -> kubbi::ids::GroupId {
    kubbi::node::map::local(storage)
        .expect("reads the map")
        .and_then(|m| m.group_of(id.shard()))
        .expect("a map serving every shard")
}

fn stored_status(storage: &Storage, id: &KubbiId) -> Option<Status> {
    read_kubbi(&storage.read_view(group_of(storage, id)), id)
        .expect("reads")
        .map(|r| r.status)
}

fn blob_count(storage: &Storage, id: &KubbiId) -> usize {
    let view = storage.read_view(group_of(storage, id));
    let mut end = id.0.to_vec();
    end.extend_from_slice(&[0xff; 5]);
    view.scan(Table::Blob, &id.0, &end, usize::MAX)
        .expect("scan")
        .len()
}

/// Every value of both state column families, raw.
fn all_state_values(storage: &Storage) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for cf in [CF_STATE, CF_BLOB] {
        for item in storage
            .db()
            .iterator_cf(storage.cf(cf), rocksdb::IteratorMode::Start)
        {
            let (k, v) = item.expect("iterate");
            out.push(k.to_vec());
            out.push(v.to_vec());
        }
    }
    out
}

fn id_of(v: &serde_json::Value) -> KubbiId {
    KubbiId::parse(v["id"].as_str().expect("id")).expect("uuid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expires_with_no_traffic_and_wipes_the_payload() {
    // Actors passivate quickly, so the shard sweeper (not a live actor) must do the expiring.
    let n = TestNode::start_with(|c| c.actor_idle = Duration::from_millis(100)).await;
    let c = n
        .api
        .create(
            &n.key,
            json!({"content": marker("short-lived"), "ttl_seconds": 2}),
        )
        .await;
    assert_eq!(c.status, StatusCode::CREATED);
    let id = id_of(&c.body);
    let storage = n.handle().storage().clone();
    assert_eq!(blob_count(&storage, &id), 1);
    eventually(
        Duration::from_secs(10),
        "stored status becomes expired",
        || {
            let s = storage.clone();
            async move { (stored_status(&s, &id) == Some(Status::Expired)).then_some(()) }
        },
    )
    .await;
    assert_eq!(blob_count(&storage, &id), 0, "payload gone from the state");
    let claim = n
        .api
        .claim(c.body["claim_token"].as_str().expect("t"))
        .await;
    assert_eq!(claim.status, StatusCode::GONE);
    assert_eq!(claim.err_code(), "expired");
    assert_eq!(claim.body["status"], "expired");
    let d = n.api.get(&n.key, &format!("/api/v1/kubbis/{id}")).await;
    assert_eq!(d.body["status"], "expired");
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_happens_after_a_restart_too() {
    let mut n = TestNode::start().await;
    let c = n
        .api
        .create(&n.key, json!({"content": "x", "ttl_seconds": 3}))
        .await;
    let id = id_of(&c.body);
    n.restart(|_| {}).await;
    let storage = n.handle().storage().clone();
    assert_eq!(stored_status(&storage, &id), Some(Status::Active));
    eventually(Duration::from_secs(15), "expired after restart", || {
        let s = storage.clone();
        async move { (stored_status(&s, &id) == Some(Status::Expired)).then_some(()) }
    })
    .await;
    assert_eq!(blob_count(&storage, &id), 0);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_end_state_removes_the_ciphertext_and_no_file_holds_plaintext() {
    let n = TestNode::start().await;
    let storage = n.handle().storage().clone();
    let mut plaintexts = Vec::new();
    let mut created = Vec::new();
    for (how, body) in [
        ("burn", json!({"max_retrievals": 1})),
        ("delete", json!({})),
        ("expire", json!({"ttl_seconds": 1})),
        ("package", json!({"max_retrievals": 2})),
        // Over RocksDB's blob threshold: the ciphertext lives in a blob file.
        ("large", json!({"max_retrievals": 1})),
    ] {
        let mut secret = marker(how);
        if how == "large" {
            secret.push_str(&"L".repeat(64 * 1024));
        }
        plaintexts.push(secret.clone());
        let mut body = body;
        if how == "package" {
            let other = marker("file2");
            plaintexts.push(other.clone());
            body["files"] = json!([
                {"name": "a.txt", "content": secret, "content_type": "text/plain"},
                {"name": "b.bin", "content": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, other.as_bytes()),
                 "content_type": "application/octet-stream", "encoding": "base64"},
            ]);
        } else {
            body["content"] = json!(secret);
        }
        let c = n.api.create(&n.key, body).await;
        assert_eq!(c.status, StatusCode::CREATED, "{:?}", c.body);
        created.push((how, c.body));
    }
    // Capture each kubbi's ciphertext while it exists.
    let mut ciphertexts = Vec::new();
    for (_, body) in &created {
        let id = id_of(body);
        let view = storage.read_view(group_of(&storage, &id));
        let mut end = id.0.to_vec();
        end.extend_from_slice(&[0xff; 5]);
        for (_, v) in view
            .scan(Table::Blob, &id.0, &end, usize::MAX)
            .expect("scan")
        {
            ciphertexts.push(v);
        }
    }
    assert_eq!(
        ciphertexts.len(),
        1 + 1 + 1 + 3 + 1,
        "parts plus the package manifest"
    );

    for (how, body) in &created {
        let token = body["claim_token"].as_str().expect("t");
        match *how {
            "burn" | "large" => assert_eq!(n.api.claim(token).await.status, StatusCode::OK),
            "delete" => assert_eq!(
                n.api
                    .delete(&n.key, body["id"].as_str().expect("id"))
                    .await
                    .status,
                StatusCode::OK
            ),
            "package" => {
                assert_eq!(n.api.claim(token).await.status, StatusCode::OK);
                let last = n.api.claim(token).await;
                assert_eq!(last.body["burned"], true);
            }
            _ => {}
        }
    }
    let expired = id_of(&created[2].1);
    eventually(Duration::from_secs(10), "ttl 1 kubbi expired", || {
        let s = storage.clone();
        async move { (stored_status(&s, &expired) == Some(Status::Expired)).then_some(()) }
    })
    .await;

    let values = all_state_values(&storage);
    for ct in &ciphertexts {
        // A 32-byte window of the ciphertext cannot occur by chance.
        let probe = &ct[ct.len() - 32..];
        assert!(
            !values.iter().any(|v| contains(v, probe)),
            "ciphertext left in the state"
        );
    }
    for (_, body) in &created {
        assert_eq!(blob_count(&storage, &id_of(body)), 0);
    }

    // No file under the data directory ever held a plaintext: flush memtables so SST files
    // exist too, then read every byte of every file (WAL, SST, raft log, metadata).
    for cf in [CF_STATE, CF_BLOB, kubbi::storage::CF_RAFT_LOG] {
        storage.db().flush_cf(storage.cf(cf)).expect("flush");
    }
    let files = files_under(n.dir.path());
    assert!(files.len() > 5);
    let ciphertext_found = |ct: &[u8]| {
        files_under(n.dir.path()).into_iter().find(|f| {
            let bytes = std::fs::read(f).unwrap_or_default();
            contains(&bytes, &ct[ct.len() - 32..])
        })
    };
    for f in files {
        let bytes = std::fs::read(&f).unwrap_or_default();
        for p in &plaintexts {
            assert!(
                !contains(&bytes, p.as_bytes()),
                "plaintext found in {}",
                f.display()
            );
        }
    }
    // The ciphertext is still in files now (the raft log holds the create entries): the scan
    // below can fail.
    assert!(
        ciphertexts.iter().any(|ct| ciphertext_found(ct).is_some()),
        "the raw scan finds nothing even before compaction"
    );
    // After a snapshot, a log purge and a full compaction, no file holds any ciphertext.
    n.handle().compact().await.expect("compact");
    for ct in &ciphertexts {
        if let Some(f) = ciphertext_found(ct) {
            panic!("ciphertext of an ended kubbi found in {}", f.display());
        }
    }
    n.stop().await;
}

/// What the load clients saw before the crash.
#[derive(Default)]
struct History {
    /// id -> (token, content, max_retrievals)
    created: HashMap<String, (String, String, Option<u64>)>,
    /// token -> acknowledged successful claims
    claims_ok: HashMap<String, u64>,
    /// token -> claims with no answer (may or may not have counted)
    claims_unknown: HashMap<String, u64>,
    /// tokens a client saw burned
    burned: Vec<String>,
    acked_ops: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_acknowledged_create_and_no_count() {
    let base = tempfile::tempdir().expect("tempdir");
    let data = base.path().join("node");
    let log = base.path().join("node.log");
    let mut node = ProcessNode::start(&data, &log, &[]).await;
    let admin = node.admin_token();
    let (key, _) = node.api.new_api_key(&admin, "load").await;

    let history = Arc::new(Mutex::new(History::default()));
    let mut clients = Vec::new();
    for c in 0..16 {
        let api = node.api.clone();
        let key = key.clone();
        let h = history.clone();
        clients.push(tokio::spawn(async move {
            let mut mine: Vec<String> = Vec::new();
            for i in 0.. {
                // Alternate: create (limits 1..3 or unlimited), then claim an earlier one.
                let content = format!("client{c}-op{i}-{:016x}", rand::random::<u64>());
                let max = match i % 4 {
                    0 => json!(null),
                    m => json!(m),
                };
                let r = api
                    .http
                    .post(api.url("/api/v1/kubbis"))
                    .bearer_auth(&key)
                    .json(&json!({"content": content, "max_retrievals": max, "ttl_seconds": 3600}))
                    .send()
                    .await;
                let Ok(r) = r else { return };
                if r.status() != StatusCode::CREATED {
                    return;
                }
                let Ok(body) = r.json::<serde_json::Value>().await else {
                    return;
                };
                let token = body["claim_token"].as_str().unwrap_or_default().to_string();
                {
                    let mut h = h.lock().expect("lock");
                    h.created.insert(
                        body["id"].as_str().unwrap_or_default().to_string(),
                        (token.clone(), content, max.as_u64()),
                    );
                    h.acked_ops += 1;
                }
                mine.push(token);
                let target = mine[(i * 7) % mine.len()].clone();
                h.lock()
                    .expect("lock")
                    .claims_unknown
                    .entry(target.clone())
                    .and_modify(|n| *n += 1)
                    .or_insert(1);
                let r = api
                    .http
                    .post(api.url(&format!("/r/{target}/claim")))
                    .send()
                    .await;
                let Ok(r) = r else { return };
                let status = r.status();
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                let mut h = h.lock().expect("lock");
                if let Some(n) = h.claims_unknown.get_mut(&target) {
                    *n -= 1;
                }
                h.acked_ops += 1;
                if status == StatusCode::OK {
                    *h.claims_ok.entry(target.clone()).or_insert(0) += 1;
                    if body["burned"] == true {
                        h.burned.push(target);
                    }
                } else if status != StatusCode::GONE {
                    return;
                }
            }
        }));
    }
    let h2 = history.clone();
    eventually(Duration::from_secs(120), "load made progress", || {
        let h = h2.clone();
        async move { (h.lock().expect("lock").acked_ops >= 600).then_some(()) }
    })
    .await;
    node.kill9();
    for c in clients {
        let _ = c.await;
    }

    let node = ProcessNode::start(&data, &log, &[]).await;
    let h = std::mem::take(&mut *history.lock().expect("lock"));
    assert!(
        h.created.len() >= 200,
        "{} creates acknowledged",
        h.created.len()
    );
    let mut checked_burned = 0;
    for (id, (token, content, max)) in &h.created {
        let d = node.api.get(&key, &format!("/api/v1/kubbis/{id}")).await;
        assert_eq!(d.status, StatusCode::OK, "acknowledged create {id} lost");
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
            assert_eq!(d.body["status"], "burned", "{id} un-burned by the crash");
            assert_eq!(node.api.claim(token).await.status, StatusCode::GONE);
            checked_burned += 1;
        } else if d.body["status"] == "active" {
            let r = node.api.claim(token).await;
            assert_eq!(r.status, StatusCode::OK, "{id}: {:?}", r.body);
            assert_eq!(r.body["content"], content.as_str(), "{id}: bytes changed");
        }
    }
    assert!(checked_burned > 0, "the run burned something");
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_contain_tokens_keys_or_payload() {
    let base = tempfile::tempdir().expect("tempdir");
    let data = base.path().join("node");
    let log = base.path().join("node.log");
    let env = [("KUBBI_LOG", "debug"), ("KUBBI_ACTOR_IDLE_MS", "200")];
    let mut node = ProcessNode::start(&data, &log, &env).await;
    let admin = node.admin_token();
    let (key, key_id) = node.api.new_api_key(&admin, "logs").await;
    let mut secrets = vec![key.clone(), admin.clone()];
    let api = node.api.clone();
    for i in 0..20 {
        let payload = marker(&format!("payload{i}"));
        let meta = marker("meta");
        let body = if i % 2 == 0 {
            json!({"content": payload, "max_retrievals": 2, "metadata": {"m": meta}, "ttl_seconds": if i % 5 == 0 { 1 } else { 60 }})
        } else {
            json!({"files": [{"name": "f.txt", "content": payload, "content_type": "text/plain"}], "max_retrievals": 1})
        };
        let c = api.create(&key, body).await;
        assert_eq!(c.status, StatusCode::CREATED, "{:?}", c.body);
        let token = c.body["claim_token"].as_str().expect("t").to_string();
        api.preview(&token).await;
        api.claim(&token).await;
        api.claim_idem(&token, "idem-1").await;
        if i % 3 == 0 {
            api.delete(&key, c.body["id"].as_str().expect("id")).await;
        }
        api.claim(&token).await;
        secrets.extend([payload, meta, token]);
    }
    // Failed attempts with secrets in them must not be logged either.
    api.create(
        "kb_wrongwrongwrongwrongwrongwrongwrongwrongwro",
        json!({"content": "x"}),
    )
    .await;
    api.send(
        api.http
            .delete(api.url(&format!("/admin/v1/api-keys/{key_id}")))
            .bearer_auth(&admin),
    )
    .await;
    api.create(&key, json!({"content": "after revoke"})).await;
    // Stop the node so its log is complete.
    node.terminate();
    let text = std::fs::read(&log).expect("log");
    assert!(text.len() > 1000, "debug logging produced output");
    for s in &secrets {
        assert!(
            !contains(&text, s.as_bytes()),
            "a secret appears in the log"
        );
        // Also no long fragment of it.
        assert!(!contains(&text, &s.as_bytes()[..20.min(s.len())]) || s.len() < 20);
    }
}

/// A data directory written by kubbi before key layout 2 (`tests/fixtures/layout1`, made by
/// its `make.py` with the binary of that time) is upgraded in place at the first start, once,
/// and then serves every kubbi as before: what is left to claim, idempotent creates and claims
/// replayed, ended kubbis still ended. The node's clock is set to just after the fixture was
/// made, so its TTLs and idempotency windows still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_1_data_directory_is_upgraded_in_place_once_and_serves_everything() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/layout1");
    let f: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("fixture.json")).expect("fixture.json"),
    )
    .expect("fixture json");
    let base = tempfile::tempdir().expect("tempdir");
    let untar = std::process::Command::new("tar")
        .arg("xzf")
        .arg(fixtures.join("node.tar.gz"))
        .arg("-C")
        .arg(base.path())
        .status()
        .expect("tar runs");
    assert!(untar.success());
    let data = base.path().join("node");
    let log = base.path().join("node.log");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let made_at = f["made_at_ms"].as_i64().expect("made_at_ms");
    let offset = (made_at + 5_000 - now).to_string();
    let env = [
        ("KUBBI_CLOCK_OFFSET_MS", offset.as_str()),
        ("KUBBI_CLAIM_IDEMPOTENCY_SECONDS", "86400"),
    ];
    let mut node = ProcessNode::start(&data, &log, &env).await;
    let key = f["api_key"].as_str().expect("api key");
    common::logscan::record("api-key", key);
    let token = |name: &str| f[name]["token"].as_str().expect("token").to_string();
    let upgrades = |log: &std::path::Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("data directory upgraded")
            .count()
    };
    assert_eq!(upgrades(&log), 1, "the first start upgrades");

    // One retrieval of two was spent before the upgrade: one left, then burned.
    let p = node.api.preview(&token("alpha")).await;
    assert_eq!(p.status, StatusCode::OK, "{:?}", p.body);
    assert_eq!(p.body["remaining_reads"], 1, "{:?}", p.body);
    let c = node.api.claim(&token("alpha")).await;
    assert_eq!(c.status, StatusCode::OK, "{:?}", c.body);
    assert_eq!(
        (&c.body["content"], &c.body["burned"]),
        (&json!("alpha"), &json!(true))
    );

    // The idempotent create, retried: the same kubbi and token, not a second one.
    let again = node
        .api
        .send(
            node.api
                .http
                .post(node.api.url("/api/v1/kubbis"))
                .bearer_auth(key)
                .header("Idempotency-Key", "create-beta")
                .header("content-type", "application/json")
                .body(
                    f["beta"]["body_raw"]
                        .as_str()
                        .expect("raw body")
                        .to_string(),
                ),
        )
        .await;
    assert!(again.status.is_success(), "{:?}", again.body);
    assert_eq!(again.body["claim_token"], f["beta"]["token"]);
    assert_eq!(again.body["id"], f["beta"]["id"]);
    let c = node.api.claim(&token("beta")).await;
    assert_eq!(c.body["content"], "beta", "{:?}", c.body);

    // The claim that burned, retried with its Idempotency-Key: the payload again, counted once.
    let r = node.api.claim_idem(&token("gamma"), "claim-gamma").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["content"], "gamma");
    assert_eq!(r.body["retrieval_count"], 1);
    assert_eq!(
        node.api.claim(&token("gamma")).await.status,
        StatusCode::GONE
    );

    // Deleted stays deleted; untouched is there.
    let p = node.api.preview(&token("epsilon")).await;
    assert_eq!(p.status, StatusCode::GONE, "{:?}", p.body);
    assert_eq!(p.body["status"], "deleted", "{:?}", p.body);
    let c = node.api.claim(&token("delta")).await;
    assert_eq!(c.body["content"], "delta", "{:?}", c.body);

    // New kubbis live beside the old ones.
    let made = node
        .api
        .create(key, json!({"content": "new", "max_retrievals": 1}))
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    let c = node
        .api
        .claim(made.body["claim_token"].as_str().expect("t"))
        .await;
    assert_eq!(c.body["content"], "new");

    // A second start finds the current layout: no second upgrade, nothing lost.
    node.terminate();
    let node = ProcessNode::start(&data, &log, &env).await;
    assert_eq!(upgrades(&log), 1, "upgraded once only");
    assert_eq!(
        node.api.claim(&token("alpha")).await.status,
        StatusCode::GONE
    );
    let c = node.api.claim(&token("delta")).await;
    assert_eq!(c.body["content"], "delta", "{:?}", c.body);
}

/// Issue 22's lost claim reply, on three nodes through a leader change. Two `max_retrievals: 1`
/// kubbis are claimed through a follower, which forwards to the leader, and the replies are
/// lost (the client drops them unread); then the leader stops. A keyed retry through the third
/// node gets the same bytes with count 1 from the sealed result the claim kept; a bare retry
/// gets `410 gone` (the at-most-once answer API.md gives claims without a key). When the
/// window has passed, the keyed retry is refused too, and once every node has snapshotted,
/// purged and compacted, no file of any node (the stopped one, restarted, included) holds
/// either ciphertext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_claim_reply_is_answered_again_to_a_keyed_retry_only() {
    let mut c = common::inproc::InProcCluster::start(3).await;
    let key = c.api_key().await;
    let contents = [marker("keyed"), marker("bare")];
    let mut made = Vec::new();
    for content in &contents {
        let r = c
            .api(0)
            .create(&key, json!({"content": content, "max_retrievals": 1}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        made.push(r.body);
    }
    let leader = 0;
    let g = c.group_of(made[0]["id"].as_str().expect("id")).await;
    // Whichever node the election and the rebalancer picked, the test's leader leads the group,
    // and has applied both creates (a read through it is linearizable).
    c.lead(g, leader).await;
    assert_eq!(c.leader_seen_by(leader, g as u16), Some(c.id(leader)));
    for b in &made {
        let token = b["claim_token"].as_str().expect("token");
        assert_eq!(c.api(leader).preview(token).await.status, StatusCode::OK);
    }
    let storage = c.handle(leader).storage().clone();
    let ciphertexts: Vec<Vec<u8>> = made
        .iter()
        .map(|b| {
            let id = id_of(b);
            let view = storage.read_view(group_of(&storage, &id));
            let mut end = id.0.to_vec();
            end.extend_from_slice(&[0xff; 5]);
            let parts = view
                .scan(Table::Blob, &id.0, &end, usize::MAX)
                .expect("scan");
            assert_eq!(parts.len(), 1);
            let ct = &parts[0].1;
            ct[ct.len() - 32..].to_vec()
        })
        .collect();
    drop(storage);
    let token = |i: usize| made[i]["claim_token"].as_str().expect("token").to_string();
    let idem = marker("idem");

    // Both claims take effect; their replies never reach the client.
    drop(c.api(1).claim_idem(&token(0), &idem).await);
    drop(c.api(1).claim(&token(1)).await);
    c.stop(leader).await;
    c.wait_all_led().await;

    let keyed = c.api(2).claim_idem(&token(0), &idem).await;
    assert_eq!(keyed.status, StatusCode::OK, "{:?}", keyed.body);
    assert_eq!(keyed.body["content"], contents[0].as_str());
    assert_eq!(keyed.body["retrieval_count"], 1);
    assert_eq!(keyed.body["burned"], true);
    let bare = c.api(2).claim(&token(1)).await;
    assert_eq!((bare.status, bare.err_code()), (StatusCode::GONE, "gone"));
    // The keyed result is the one ciphertext kept past the burn (invariant 4's exception).
    let held = |c: &common::inproc::InProcCluster, i: usize, ct: &[u8]| {
        all_state_values(c.handle(i).storage())
            .iter()
            .any(|v| contains(v, ct))
    };
    for i in [1, 2] {
        assert!(
            held(&c, i, &ciphertexts[0]),
            "node {i} keeps the keyed result"
        );
        assert!(
            !held(&c, i, &ciphertexts[1]),
            "node {i} kept the bare claim's payload"
        );
    }

    // The window (60 s) passes on the running nodes; the restarted node's clock is behind.
    for i in [1, 2] {
        c.handle(i).clock.advance(61_000);
    }
    eventually(
        Duration::from_secs(20),
        "the keyed result is dropped",
        || {
            let api = c.api(1).clone();
            let (t, idem) = (token(0), idem.clone());
            async move {
                let r = api.claim_idem(&t, &idem).await;
                (r.status == StatusCode::GONE).then_some(())
            }
        },
    )
    .await;
    c.restart(leader).await;
    c.wait_all_led().await;
    eventually(
        Duration::from_secs(30),
        "every node dropped both ciphertexts",
        || {
            let gone = (0..3).all(|i| ciphertexts.iter().all(|ct| !held(&c, i, ct)));
            async move { gone.then_some(()) }
        },
    )
    .await;
    // The raft logs still hold the creates: the scan below can find a ciphertext.
    let any_file_holds = || {
        files_under(c.base.path()).into_iter().any(|f| {
            let bytes = std::fs::read(&f).unwrap_or_default();
            ciphertexts.iter().any(|ct| contains(&bytes, ct))
        })
    };
    assert!(
        any_file_holds(),
        "the raw scan finds nothing even before compaction"
    );
    for i in 0..3 {
        c.handle(i).compact().await.expect("compact");
    }
    for f in files_under(c.base.path()) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        for ct in &ciphertexts {
            assert!(
                !contains(&bytes, ct),
                "a ciphertext is left in {}",
                f.display()
            );
        }
    }
    c.shutdown().await;
}

/// A FUSE layer over a directory that holds written bytes in memory until they are fsync'd
/// (`chaos/chaoslib/lazyfs.py`); [`LazyFs::power_cut`] kills it, dropping exactly what a power
/// cut drops from the page cache. A kill -9 of the node alone never loses a byte the kernel
/// took, so without this a node that forgot to fsync would pass every crash test.
struct LazyFs {
    daemon: Option<std::process::Child>,
    backing: std::path::PathBuf,
    mnt: std::path::PathBuf,
}

fn fusermount() -> &'static str {
    if std::process::Command::new("fusermount3")
        .arg("-V")
        .output()
        .is_ok()
    {
        "fusermount3"
    } else {
        "fusermount"
    }
}

impl LazyFs {
    async fn mount(backing: &std::path::Path, mnt: &std::path::Path) -> Self {
        std::fs::create_dir_all(backing).expect("backing dir");
        std::fs::create_dir_all(mnt).expect("mount point");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/chaos/chaoslib/lazyfs.py");
        // The system Python, where Debian's python3-fusepy lives (lazyfs.py also looks there).
        let python = if std::path::Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        let daemon = std::process::Command::new(python)
            .arg(script)
            .arg(backing)
            .arg(mnt)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 runs lazyfs.py");
        let m = mnt.to_path_buf();
        eventually(Duration::from_secs(20), "lazyfs is mounted", || {
            let m = m.clone();
            async move { is_mount(&m).then_some(()) }
        })
        .await;
        Self {
            daemon: Some(daemon),
            backing: backing.to_path_buf(),
            mnt: mnt.to_path_buf(),
        }
    }

    /// The power cut: the daemon dies with every unsynced byte; the mount goes. Once only: the
    /// directory may be mounted again (by another `LazyFs`) after it.
    fn power_cut(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
            let _ = std::process::Command::new(fusermount())
                .args(["-uz"])
                .arg(&self.mnt)
                .status();
        }
    }

    /// Cuts the power and mounts the same disk again: what was fsync'd is there.
    async fn power_cycle(&mut self) {
        self.power_cut();
        *self = Self::mount(&self.backing.clone(), &self.mnt.clone()).await;
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        self.power_cut();
    }
}

fn is_mount(p: &std::path::Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let p = p.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(&*p))
}

/// Creates and claims through a node on lazyfs, cuts the power (node and page cache), starts it
/// again on what reached the disk, and returns how many acknowledged creates or counted claims
/// it lost (the node always restarts with fsync on).
async fn acknowledged_writes_lost_in_a_power_cut(skip_fsync: bool) -> usize {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (backing, mnt) = (tmp.path().join("disk"), tmp.path().join("data"));
    let log = tmp.path().join("node.log");
    let mut fs = LazyFs::mount(&backing, &mnt).await;
    let env: &[(&str, &str)] = if skip_fsync {
        &[(kubbi::storage::UNSAFE_SKIP_FSYNC_ENV, "1")]
    } else {
        &[]
    };
    let mut node = ProcessNode::start(&mnt, &log, env).await;
    let (key, _) = node.api.new_api_key(&node.admin_token(), "power").await;
    let mut made = Vec::new();
    for i in 0..60 {
        let r = node
            .api
            .create(
                &key,
                json!({"content": format!("p{i}"), "max_retrievals": 2}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        let token = r.body["claim_token"].as_str().expect("token").to_string();
        let claimed = i % 3 == 0;
        if claimed {
            assert_eq!(node.api.claim(&token).await.status, StatusCode::OK);
        }
        made.push((r.body["id"].as_str().expect("id").to_string(), claimed));
    }
    node.kill9();
    fs.power_cut();
    let mut fs = LazyFs::mount(&fs.backing.clone(), &mnt).await;
    let node = ProcessNode::start(&mnt, &log, &[]).await;
    let mut lost = 0;
    for (id, claimed) in &made {
        let d = node.api.get(&key, &format!("/api/v1/kubbis/{id}")).await;
        let count_kept = d.body["retrieval_count"].as_u64() == Some(u64::from(*claimed));
        if d.status != StatusCode::OK || !count_kept {
            lost += 1;
        }
    }
    drop(node);
    fs.power_cut();
    lost
}

/// A leader back from a power cut has its raft log (fsynced before every acknowledgement) but
/// maybe an older state (the state machine's writes are not synced: the log replays them).
/// openraft would let it lead again at once, in its old term, and answer reads from that older
/// state until its commit index caught up again: acknowledged kubbis would answer 404 for a
/// while (chaos saw it, `lost_create`). It must win an election first: the first entry of a new
/// term commits, and reads wait for it to apply, only after everything before it is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_back_from_a_power_cut_answers_no_read_from_state_older_than_its_log() {
    assert!(
        std::path::Path::new("/dev/fuse").exists(),
        "needs FUSE (/dev/fuse, fuse3 and python3-fusepy: scripts/ensure-test-deps)"
    );
    let base = tempfile::tempdir().expect("tempdir");
    let mut disks = Vec::new();
    for id in 1..=3 {
        let at = |what: &str| base.path().join(format!("{what}{id}"));
        disks.push(LazyFs::mount(&at("disk"), &at("node")).await);
    }
    // Elections take 5-10 s: the node is back long before the others would elect another.
    let slow = |_| vec!["--raft-heartbeat-ms".to_string(), "1000".to_string()];
    let mut c = common::cluster::Cluster::start_in(base, 3, slow, &[]).await;
    let (key, _) = c.api(0).new_api_key(&c.admin, "restore").await;
    let mut made = Vec::new();
    for i in 0..30 {
        let r = c
            .api(0)
            .create(
                &key,
                json!({"content": format!("r{i}"), "max_retrievals": 1}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        made.push(r.body);
    }
    let st = c.status(0).await;
    let group = |b: &serde_json::Value| common::group_of_shard(&st, id_of(b).shard());
    let g = group(&made[0]).expect("a group serves the first kubbi");
    let made: Vec<_> = made.iter().filter(|b| group(b) == Some(g)).collect();
    let leader = c.leader_of(0, g).await.expect("the group has a leader");
    let l = c.index_of(leader);
    let term_of = |st: &serde_json::Value| {
        st["shards"].as_array().and_then(|a| {
            a.iter()
                .find(|s| s["id"] == g)
                .and_then(|s| s["term"].as_u64())
        })
    };
    let term = term_of(&c.status(l).await).expect("the group's term");

    // Previews of those kubbis, through a follower (which forwards them to the group's
    // leader), without pause from before the power cut until the node is back and every kubbi
    // has answered it: a restored leader's older state would show in its first moments, before
    // its internal port has even finished starting up.
    let tokens: Vec<String> = made
        .iter()
        .map(|b| b["claim_token"].as_str().expect("token").to_string())
        .collect();
    let via = (l + 1) % 3;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let not_found = Arc::new(Mutex::new(Vec::new()));
    let mut previews = Vec::new();
    for t in 0..8 {
        let (api, tokens) = (c.api(via).clone(), tokens.clone());
        let (stop, not_found) = (stop.clone(), not_found.clone());
        previews.push(tokio::spawn(async move {
            let mut sent = 0u64;
            for token in tokens.iter().cycle().skip(t) {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let r = api.preview(token).await;
                sent += 1;
                if r.status == StatusCode::NOT_FOUND {
                    not_found.lock().expect("lock").push(r.body);
                }
            }
            sent
        }));
    }
    c.kill9(l);
    disks[l].power_cycle().await;
    c.spawn(l, false);
    c.wait_up(l).await;
    for token in &tokens {
        // Unavailable while the group elects; then a definite answer.
        let r = eventually(Duration::from_secs(60), "a definite answer", || {
            let api = c.api(l).clone();
            let token = token.clone();
            async move {
                let r = api.preview(&token).await;
                (!r.status.is_server_error()).then_some(r)
            }
        })
        .await;
        assert_eq!(
            (r.status, r.body["retrieval_count"].as_u64()),
            (StatusCode::OK, Some(0)),
            "a kubbi of group {g}, acknowledged before its leader (node {leader}) lost power: {:?}",
            r.body
        );
    }
    // Whoever leads the group now, the node back from the power cut included, was elected
    // after it: openraft did not let that node lead on in its old term.
    let st = c.status(l).await;
    assert!(
        term_of(&st).is_some_and(|t| t > term),
        "the group is led in term {:?} after its leader's power cut, as in term {term} before",
        term_of(&st)
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    for p in previews {
        sent += p.await.expect("preview task");
    }
    let not_found = not_found.lock().expect("lock").clone();
    assert!(
        not_found.is_empty(),
        "{} of {sent} previews through node {} answered 404 for kubbis acknowledged before their \
         leader (node {leader}) lost power: {:?}",
        not_found.len(),
        via + 1,
        not_found.first()
    );
    for i in 0..3 {
        c.kill9(i);
    }
    drop(disks);
}

/// Invariant 5 under a real power cut, and proof that the check can fail: the same run with a
/// node that acknowledges without fsync (a planted bug) must lose acknowledged writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_loses_no_acknowledged_write_and_catches_a_node_that_skips_fsync() {
    assert!(
        std::path::Path::new("/dev/fuse").exists(),
        "needs FUSE (/dev/fuse, fuse3 and python3-fusepy: scripts/ensure-test-deps)"
    );
    assert_eq!(acknowledged_writes_lost_in_a_power_cut(false).await, 0);
    let lost = acknowledged_writes_lost_in_a_power_cut(true).await;
    assert!(
        lost > 0,
        "a node that never fsyncs lost nothing in a power cut: the test cannot see a missing fsync"
    );
    eprintln!("without fsync, {lost} of 60 acknowledged writes were lost");
}
