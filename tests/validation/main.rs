//! Every limit of API.md at the limit and one past it, over real HTTP with default limits, and
//! the error envelope of each refusal. A refused request must leave nothing behind.

#[path = "../common/mod.rs"]
mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::TestNode;
use reqwest::StatusCode;
use serde_json::{Value, json};

const MIB: usize = 1 << 20;

async fn total(n: &TestNode) -> u64 {
    n.api.get(&n.key, "/api/v1/kubbis").await.body["pagination"]["total"]
        .as_u64()
        .expect("total")
}

fn assert_validation(r: &common::Resp, needle: &str) {
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert_eq!(r.err_code(), "validation_error");
    let msgs = r.body["messages"].as_array().expect("messages");
    assert!(
        msgs.iter()
            .any(|m| m.as_str().unwrap_or("").contains(needle)),
        "no message mentions {needle:?}: {msgs:?}"
    );
    assert!(r.body["message"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_limits_at_and_past() {
    let n = TestNode::start().await;
    let ok = |v: Value| {
        let api = n.api.clone();
        let key = n.key.clone();
        async move {
            let r = api.create(&key, v).await;
            assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
            r
        }
    };
    ok(json!({"content": "x", "ttl_seconds": 1})).await;
    ok(json!({"content": "x", "ttl_seconds": 604_800})).await;
    ok(json!({"content": "x", "max_retrievals": 1000})).await;
    ok(json!({"content": "x", "max_retrievals": null})).await;
    ok(json!({"content": "x", "metadata": {"k": "a".repeat(1024 - 8)}})).await;
    let created = total(&n).await;

    assert_validation(
        &n.api
            .create(&n.key, json!({"content": "x", "ttl_seconds": 0}))
            .await,
        "ttl_seconds",
    );
    assert_validation(
        &n.api
            .create(&n.key, json!({"content": "x", "ttl_seconds": 604_801}))
            .await,
        "ttl_seconds",
    );
    assert_validation(
        &n.api
            .create(&n.key, json!({"content": "x", "max_retrievals": 0}))
            .await,
        "max_retrievals",
    );
    assert_validation(
        &n.api
            .create(&n.key, json!({"content": "x", "max_retrievals": 1001}))
            .await,
        "max_retrievals",
    );
    assert_validation(
        &n.api
            .create(&n.key, json!({"content": "x", "max_retrievals": 1e300}))
            .await,
        "max_retrievals",
    );
    let meta = n
        .api
        .create(
            &n.key,
            json!({"content": "x", "metadata": {"k": "a".repeat(1024 - 7)}}),
        )
        .await;
    assert_eq!(meta.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(meta.err_code(), "payload_too_large");
    assert_validation(
        &n.api
            .create(&n.key, json!({"content": "x", "metadata": "no"}))
            .await,
        "metadata",
    );
    assert_validation(
        &n.api
            .create(&n.key, json!({"content": "x", "extra": 1}))
            .await,
        "unknown field `extra`",
    );
    assert_validation(
        &n.api.create(&n.key, json!({"content": 5})).await,
        "content must be a string",
    );
    assert_validation(
        &n.api
            .create(&n.key, json!({"content": "x", "content_type": "image/png"}))
            .await,
        "content_type",
    );
    assert_validation(&n.api.create(&n.key, json!({})).await, "required");
    assert_validation(&n.api.create(&n.key, json!([1, 2])).await, "JSON object");
    assert_eq!(total(&n).await, created, "refused requests created nothing");
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_rules_at_and_past() {
    let n = TestNode::start().await;
    let file = |i: usize| json!({"name": format!("f{i}.txt"), "content": "x", "content_type": "text/plain"});
    let sixteen: Vec<Value> = (0..16).map(file).collect();
    let r = n.api.create(&n.key, json!({"files": sixteen})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let seventeen: Vec<Value> = (0..17).map(file).collect();
    assert_validation(
        &n.api.create(&n.key, json!({"files": seventeen})).await,
        "1 to 16",
    );
    assert_validation(&n.api.create(&n.key, json!({"files": []})).await, "1 to 16");

    let name255 = format!("a{}", "b".repeat(254));
    let r = n
        .api
        .create(
            &n.key,
            json!({"files": [{"name": name255, "content": "x", "content_type": "text/plain"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let name256 = format!("a{}", "b".repeat(255));
    for bad in [
        name256.as_str(),
        "../etc/passwd",
        ".env",
        "a..b",
        "dir/file",
        "",
        "x y",
        "nul\u{0}byte",
    ] {
        let r = n
            .api
            .create(
                &n.key,
                json!({"files": [{"name": bad, "content": "x", "content_type": "text/plain"}]}),
            )
            .await;
        assert_validation(&r, "files[0].name");
    }
    let dup = n
        .api
        .create(
            &n.key,
            json!({"files": [
            {"name": "Plan.md", "content": "a", "content_type": "text/markdown"},
            {"name": "plan.md", "content": "b", "content_type": "text/markdown"}]}),
        )
        .await;
    assert_validation(&dup, "duplicates");
    let bad64 = n
        .api
        .create(&n.key, json!({"files": [{"name": "a.bin", "content": "@@@", "content_type": "application/octet-stream", "encoding": "base64"}]}))
        .await;
    assert_validation(&bad64, "base64");
    let bad_role = n
        .api
        .create(&n.key, json!({"files": [{"name": "a", "content": "x", "content_type": "text/plain", "role": "owner"}]}))
        .await;
    assert_validation(&bad_role, "role");
    let bad_enc = n
        .api
        .create(&n.key, json!({"files": [{"name": "a", "content": "x", "content_type": "text/plain", "encoding": "hex"}]}))
        .await;
    assert_validation(&bad_enc, "encoding");
    let bad_type = n
        .api
        .create(
            &n.key,
            json!({"files": [{"name": "a", "content": "x", "content_type": "plain"}]}),
        )
        .await;
    assert_validation(&bad_type, "content_type");
    assert_eq!(total(&n).await, 2);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_and_body_size_limits() {
    let n = TestNode::start().await;
    // Decoded payload: 16 MiB is accepted, one byte more is 413.
    let at = "p".repeat(16 * MIB);
    let r = n.api.create(&n.key, json!({"content": at})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let claimed = n
        .api
        .claim(r.body["claim_token"].as_str().expect("t"))
        .await;
    assert_eq!(
        claimed.body["content"].as_str().map(str::len),
        Some(16 * MIB)
    );
    let past = "p".repeat(16 * MIB + 1);
    let r = n.api.create(&n.key, json!({"content": past})).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.err_code(), "payload_too_large");
    // Across files, decoded: 8 MiB binary (about 10.7 MiB of base64) plus 8 MiB of text.
    let half = STANDARD.encode(vec![1u8; 8 * MIB]);
    let files = |extra: usize| {
        json!({"files": [
            {"name": "a.bin", "content": half, "content_type": "application/octet-stream", "encoding": "base64"},
            {"name": "b.txt", "content": "t".repeat(8 * MIB + extra), "content_type": "text/plain"}]})
    };
    assert_eq!(
        n.api.create(&n.key, files(0)).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        n.api.create(&n.key, files(1)).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );

    // Whole body: exactly 24 MiB (padded with JSON whitespace) passes, one byte more is 413.
    let mut body = serde_json::to_vec(&json!({"content": "small"})).expect("json");
    body.resize(24 * MIB, b' ');
    let body = body;
    let send = |b: Vec<u8>| {
        n.api.send(
            n.api
                .http
                .post(n.api.url("/api/v1/kubbis"))
                .bearer_auth(&n.key)
                .header("content-type", "application/json")
                .body(b),
        )
    };
    assert_eq!(send(body.clone()).await.status, StatusCode::CREATED);
    assert_eq!(total(&n).await, 3);

    // One byte more, declared: refused from the headers alone, before any body byte is read.
    let addr = n.handle().http_addr;
    let head = format!(
        "POST /api/v1/kubbis HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        n.key,
        24 * MIB + 1
    );
    let (status, resp) = raw_exchange(addr, head.as_bytes(), &[]).await;
    assert_eq!(status, 413, "{resp}");
    assert!(resp.contains("payload_too_large"));
    // A 10 GB declaration is the same quick refusal.
    let head10g = head.replace(&(24 * MIB + 1).to_string(), "10000000000");
    assert_eq!(raw_exchange(addr, head10g.as_bytes(), &[]).await.0, 413);

    // One byte more, undeclared (chunked): refused as soon as the limit is crossed.
    let head = format!(
        "POST /api/v1/kubbis HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
        n.key
    );
    let mut chunked = format!("{:x}\r\n", body.len() + 1).into_bytes();
    chunked.extend_from_slice(&body);
    chunked.push(b' ');
    chunked.extend_from_slice(b"\r\n");
    let (status, resp) = raw_exchange(addr, head.as_bytes(), &chunked).await;
    assert_eq!(status, 413, "{resp}");
    assert_eq!(total(&n).await, 3, "nothing was created by refused bodies");
    assert_eq!(n.api.get("", "/health").await.status, StatusCode::OK);
    n.stop().await;
}

/// Writes `head` then `body` on a fresh connection (stopping quietly if the server stops
/// reading), and returns the response status and text.
async fn raw_exchange(addr: std::net::SocketAddr, head: &[u8], body: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head).await.expect("head");
    for chunk in body.chunks(64 * 1024) {
        if s.write_all(chunk).await.is_err() {
            break;
        }
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_type_json_syntax_and_headers() {
    let n = TestNode::start().await;
    let post = |ct: Option<&str>, body: &'static [u8]| {
        let mut rb = n
            .api
            .http
            .post(n.api.url("/api/v1/kubbis"))
            .bearer_auth(&n.key)
            .body(body);
        if let Some(ct) = ct {
            rb = rb.header("content-type", ct);
        }
        n.api.send(rb)
    };
    let r = post(Some("text/plain"), b"{\"content\":\"x\"}").await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(r.err_code(), "unsupported_media_type");
    assert_eq!(
        post(None, b"{\"content\":\"x\"}").await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let ok = post(
        Some("application/json; charset=utf-8"),
        b"{\"content\":\"x\"}",
    )
    .await;
    assert_eq!(ok.status, StatusCode::CREATED);
    for bad in [
        &b"{\"content\": "[..],
        b"{\"content\": \"x\",}",
        b"",
        b"\xff\xfe",
        b"{\"content\": \"\\ud800\"}",
    ] {
        let r = n.api.create_raw(&n.key, bad.to_vec()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad:?} -> {:?}", r.body);
        assert_eq!(r.err_code(), "validation_error");
    }
    // Deeply nested JSON is refused, not a crash.
    let deep = format!(
        "{{\"content\":{}1{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let r = n.api.create_raw(&n.key, deep.into()).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Idempotency-Key: 255 characters at most.
    let idem = |k: String| {
        n.api.send(
            n.api
                .http
                .post(n.api.url("/api/v1/kubbis"))
                .bearer_auth(&n.key)
                .header("Idempotency-Key", k)
                .json(&json!({"content": "x"})),
        )
    };
    assert_eq!(idem("k".repeat(255)).await.status, StatusCode::CREATED);
    assert_validation(&idem("k".repeat(256)).await, "Idempotency-Key");

    // Authentication comes first and is uniform.
    for auth in ["", "Basic abc", "Bearer", "Bearer kb_unknown", "Bearer kb_"] {
        let r = n
            .api
            .send(
                n.api
                    .http
                    .post(n.api.url("/api/v1/kubbis"))
                    .header("authorization", auth)
                    .json(&json!({"content": "x"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{auth}");
        assert_eq!(
            r.headers.get("www-authenticate").map(|v| v.as_bytes()),
            Some(&b"Bearer"[..])
        );
    }
    n.stop().await;
}
