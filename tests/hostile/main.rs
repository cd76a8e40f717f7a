//! Hostile input over real sockets: slow and silent clients, connection floods, malformed
//! bytes where text is expected, traversal in names and paths, numbers past every range. Each
//! gets its documented error (or the connection is closed), the node stays healthy, and what was
//! stored before is still there, byte for byte.

#[path = "../common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::TestNode;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
const BODY_TIMEOUT: Duration = Duration::from_secs(2);

async fn node() -> TestNode {
    TestNode::start_with(|c| {
        c.limits.header_timeout = HEADER_TIMEOUT;
        c.limits.body_timeout = BODY_TIMEOUT;
    })
    .await
}

/// Kubbis stored before the attack, to check afterwards that nothing was lost or altered.
struct Witnesses(Vec<(String, String)>);

impl Witnesses {
    async fn plant(n: &TestNode) -> Self {
        let mut v = Vec::new();
        for i in 0..3 {
            let content = common::marker(&format!("witness{i}"));
            let r = n
                .api
                .create(&n.key, json!({"content": content, "max_retrievals": 1}))
                .await;
            assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
            v.push((
                r.body["claim_token"].as_str().expect("t").to_string(),
                content,
            ));
        }
        Self(v)
    }

    /// The node is healthy, exactly `extra` kubbis were added, and every witness claims intact.
    async fn check(self, n: &TestNode, extra: u64) {
        assert_eq!(n.api.get("", "/health").await.status, StatusCode::OK);
        let total = n.api.get(&n.key, "/api/v1/kubbis").await.body["pagination"]["total"]
            .as_u64()
            .expect("total");
        assert_eq!(total, 3 + extra, "refused requests left nothing behind");
        for (token, content) in self.0 {
            let r = n.api.claim(&token).await;
            assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
            assert_eq!(r.body["content"].as_str(), Some(content.as_str()));
        }
    }
}

/// Reads until the peer closes the connection (or `limit` passes); returns what was read and
/// whether the connection closed.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(limit, s.read_to_end(&mut buf))
        .await
        .is_ok();
    (String::from_utf8_lossy(&buf).to_string(), closed)
}

fn status_of(resp: &str) -> u16 {
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn create_head(key: &str, len: usize) -> String {
    format!(
        "POST /api/v1/kubbis HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {len}\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_clients_are_cut_off() {
    let n = node().await;
    let w = Witnesses::plant(&n).await;
    let addr: SocketAddr = n.handle().http_addr;

    // A body trickled one byte per second: 408 once the body timeout passes, nothing stored.
    let body = br#"{"content":"trickled","ttl_seconds":60}"#;
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(create_head(&n.key, body.len()).as_bytes())
        .await
        .expect("head");
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        for b in body {
            if wr.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        wr
    });
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(BODY_TIMEOUT * 5, rd.read_to_end(&mut buf)).await;
    let answered_after = started.elapsed();
    trickle.abort();
    let text = String::from_utf8_lossy(&buf).to_string();
    assert_eq!(status_of(&text), 408, "{text}");
    assert!(text.contains("\"error\":\"request_timeout\""), "{text}");
    assert!(
        answered_after < Duration::from_secs(body.len() as u64),
        "answered only after the whole body arrived ({answered_after:?})"
    );

    // Headers that never finish (slowloris): the connection is closed after the header timeout.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"POST /api/v1/kubbis HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .expect("partial head");
    let (_, closed) = read_until_closed(&mut s, HEADER_TIMEOUT * 5).await;
    assert!(closed, "a never-ending header block keeps its connection");

    // A connection that sends nothing at all, and an idle keep-alive connection after one
    // request, are both closed.
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let (_, closed) = read_until_closed(&mut silent, HEADER_TIMEOUT * 5).await;
    assert!(closed, "a silent connection stays open");
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("request");
    let (text, closed) = read_until_closed(&mut idle, HEADER_TIMEOUT * 5).await;
    assert_eq!(status_of(&text), 200, "{text}");
    assert!(closed, "an idle keep-alive connection stays open");

    w.check(&n, 0).await;
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_do_not_block_others() {
    let n = node().await;
    let w = Witnesses::plant(&n).await;
    let addr = n.handle().http_addr;
    // 200 connections each holding a half-sent request.
    let mut stalled = Vec::new();
    for i in 0..200 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let head = if i % 2 == 0 {
            create_head(&n.key, 1000)
        } else {
            "GET /r/abc HTTP/1.1\r\nhost: x\r\n".to_string()
        };
        s.write_all(head.as_bytes()).await.expect("head");
        stalled.push(s);
    }
    // Meanwhile ordinary requests are served.
    for _ in 0..20 {
        let r = n
            .api
            .create(&n.key, json!({"content": "ordinary", "ttl_seconds": 60}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    // And every stalled connection is eventually closed by the server.
    for mut s in stalled {
        let (_, closed) = read_until_closed(&mut s, BODY_TIMEOUT * 10).await;
        assert!(closed, "a stalled connection outlived the timeouts");
    }
    w.check(&n, 20).await;
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_validation_errors_and_store_nothing() {
    let n = node().await;
    let w = Witnesses::plant(&n).await;
    let file = |name: &str| json!({"files": [{"name": name, "content": "x", "content_type": "text/plain"}]});
    let mut bodies: Vec<(&str, Vec<u8>)> = vec![
        // Numbers past every range, in the raw text so no client library rounds them first.
        (
            "u64 overflow",
            br#"{"content":"x","ttl_seconds":18446744073709551616}"#.to_vec(),
        ),
        ("1e400", br#"{"content":"x","ttl_seconds":1e400}"#.to_vec()),
        (
            "negative",
            br#"{"content":"x","max_retrievals":-1}"#.to_vec(),
        ),
        (
            "fraction",
            br#"{"content":"x","ttl_seconds":60.5}"#.to_vec(),
        ),
        (
            "huge exponent",
            br#"{"content":"x","max_retrievals":1e999999}"#.to_vec(),
        ),
        (
            "string number",
            br#"{"content":"x","ttl_seconds":"60"}"#.to_vec(),
        ),
        ("bool content", br#"{"content":true}"#.to_vec()),
        ("array content", br#"{"content":["x"]}"#.to_vec()),
        ("null content", br#"{"content":null}"#.to_vec()),
        ("both forms", br#"{"content":"x","files":[]}"#.to_vec()),
        (
            "duplicate key",
            br#"{"content":"x","content":"y"}"#.to_vec(),
        ),
        (
            "unknown field",
            br#"{"content":"x","owner":"root"}"#.to_vec(),
        ),
        ("invalid utf-8", b"{\"content\":\"\xc3\x28\"}".to_vec()),
        ("lone surrogate", br#"{"content":"\udc00"}"#.to_vec()),
        (
            "NUL in content type",
            br#"{"content":"x","content_type":"text/plain\u0000"}"#.to_vec(),
        ),
        (
            "newline in content type",
            br#"{"content":"x","content_type":"text/plain\r\nx-evil: 1"}"#.to_vec(),
        ),
        (
            "trailing garbage",
            br#"{"content":"x"} {"content":"y"}"#.to_vec(),
        ),
        (
            "deep metadata",
            format!(
                r#"{{"content":"x","metadata":{}{}}}"#,
                "{\"a\":".repeat(5000),
                "1".to_string() + &"}".repeat(5000)
            )
            .into_bytes(),
        ),
        (
            "deep array",
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
        ),
    ];
    for name in [
        "../etc/passwd",
        "..",
        ".",
        "a/b",
        "a\\b",
        "/abs",
        "a\u{0}b",
        "nul\u{0}",
        "con\r\nx",
        "%2e%2e%2fx",
        "\u{202e}gpj.exe",
        "",
    ] {
        bodies.push(("file name", serde_json::to_vec(&file(name)).expect("json")));
    }
    bodies.push((
        "duplicate names",
        serde_json::to_vec(&json!({"files": [
            {"name": "a.txt", "content": "1", "content_type": "text/plain"},
            {"name": "a.txt", "content": "2", "content_type": "text/plain"}]}))
        .expect("json"),
    ));
    for b64 in ["@@@@", "QUJD=", "QU JD", "QUJD\u{0}"] {
        bodies.push((
            "bad base64",
            serde_json::to_vec(&json!({"files": [{"name": "a.bin", "content": b64,
                "content_type": "application/octet-stream", "encoding": "base64"}]}))
            .expect("json"),
        ));
    }
    for (what, body) in bodies {
        let r = n.api.create_raw(&n.key, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}: {:?}", r.body);
        assert_eq!(r.err_code(), "validation_error", "{what}");
        let msgs = r.body["messages"].as_array().expect("messages");
        assert!(!msgs.is_empty(), "{what}: no message says what is wrong");
    }
    w.check(&n, 0).await;
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_bytes_in_payloads_round_trip_exactly() {
    let n = node().await;
    // NUL and other control bytes are payload like any other: stored and returned exactly.
    let content = "a\u{0}b\u{1}c\u{7f}\u{feff}\u{202e}end";
    let r = n.api.create(&n.key, json!({"content": content})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let got = n
        .api
        .claim(r.body["claim_token"].as_str().expect("t"))
        .await;
    assert_eq!(got.body["content"].as_str(), Some(content));
    // Binary with every byte value, through base64.
    let all: Vec<u8> = (0..=255u8).collect();
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &all);
    let r = n
        .api
        .create(
            &n.key,
            json!({"files": [{"name": "all.bin", "content": b64,
                "content_type": "application/octet-stream", "encoding": "base64"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let got = n
        .api
        .claim(r.body["claim_token"].as_str().expect("t"))
        .await;
    assert_eq!(got.body["files"][0]["content"].as_str(), Some(b64.as_str()));
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_paths_and_headers_get_envelopes_not_crashes() {
    let n = node().await;
    let w = Witnesses::plant(&n).await;
    let addr = n.handle().http_addr;
    let long = "A".repeat(8000);
    // Tokens and ids that are not: traversal, encoded bytes, overlong, empty segments.
    for path in [
        "/r/..%2f..%2fadmin%2fv1%2fapi-keys".to_string(),
        "/r/%FF%FE".to_string(),
        "/r/%00".to_string(),
        format!("/r/{long}"),
        "/r/abc/claim/../../admin/v1/api-keys".to_string(),
        "/api/v1/kubbis/..%2F..%2Fadmin".to_string(),
        "/api/v1/kubbis/%00".to_string(),
    ] {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\nconnection: close\r\n\r\n",
            n.key
        );
        s.write_all(req.as_bytes()).await.expect("request");
        let (text, _) = read_until_closed(&mut s, Duration::from_secs(10)).await;
        let status = status_of(&text);
        assert!(
            matches!(status, 400 | 404),
            "{path}: status {status}: {text}"
        );
        let body: Value = text
            .split("\r\n\r\n")
            .nth(1)
            .and_then(|b| serde_json::from_str(b).ok())
            .unwrap_or(Value::Null);
        assert!(
            body["error"].is_string(),
            "{path}: no error envelope: {text}"
        );
        assert!(!text.contains(&n.key), "{path}: the key was echoed");
    }
    // Authorization headers that are not text, or absurdly long: 401, never 500.
    for auth in [
        b"Bearer kb_\xff\xfe".to_vec(),
        format!("Bearer kb_{}", "x".repeat(16_000)).into_bytes(),
        b"Bearer \x01\x02".to_vec(),
    ] {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut req =
            b"GET /api/v1/kubbis HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: "
                .to_vec();
        req.extend_from_slice(&auth);
        req.extend_from_slice(b"\r\n\r\n");
        s.write_all(&req).await.expect("request");
        let (text, _) = read_until_closed(&mut s, Duration::from_secs(10)).await;
        let status = status_of(&text);
        assert!(matches!(status, 400 | 401 | 431), "status {status}: {text}");
    }
    // A header block far over any sane size is refused at the connection (431 or closed).
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let huge = format!(
        "GET /health HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "b".repeat(1 << 20)
    );
    let _ = s.write_all(huge.as_bytes()).await;
    let (text, closed) = read_until_closed(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "a 1 MiB header block kept its connection");
    assert_ne!(status_of(&text), 200, "{text}");
    w.check(&n, 0).await;
    n.stop().await;
}

/// A node process logging at the most verbose level, driven through every operation (including
/// failures that echo input back): its log never holds a token, an API key, the admin token or
/// a payload byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_at_trace_level_never_carry_secrets() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let log = tmp.path().join("node.log");
    let mut node = common::ProcessNode::start(&data, &log, &[("KUBBI_LOG", "trace")]).await;
    let api = node.api.clone();
    let admin = node.admin_token();
    let (key, _) = api.new_api_key(&admin, "log-scan").await;
    let mut secrets = vec![admin.clone(), key.clone()];
    let single = common::marker("logged-single");
    let file_text = common::marker("logged-file");
    let meta = common::marker("logged-meta");
    let r = api
        .create(
            &key,
            json!({"content": single, "max_retrievals": 2, "metadata": {"m": meta}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let t1 = r.body["claim_token"].as_str().expect("t").to_string();
    let id1 = r.body["id"].as_str().expect("id").to_string();
    let r = api
        .create(
            &key,
            json!({"files": [{"name": "secret.txt", "content": file_text, "content_type": "text/plain"}],
                   "max_retrievals": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let t2 = r.body["claim_token"].as_str().expect("t").to_string();
    assert_eq!(api.preview(&t1).await.status, StatusCode::OK);
    assert_eq!(api.claim_idem(&t1, "idem-1").await.status, StatusCode::OK);
    assert_eq!(api.claim_idem(&t1, "idem-1").await.status, StatusCode::OK);
    assert_eq!(api.claim(&t2).await.status, StatusCode::OK);
    assert_eq!(api.claim(&t2).await.status, StatusCode::GONE);
    assert_eq!(
        api.get(&key, &format!("/api/v1/kubbis/{id1}")).await.status,
        StatusCode::OK
    );
    // Failures with secrets in the request: a wrong key that looks real, a wrong admin token,
    // a token with one character changed, a body that fails validation around a payload.
    // One character changed (to one it is not).
    let change_last = |s: &str| {
        let last = if s.ends_with('x') { 'y' } else { 'x' };
        format!("{}{last}", &s[..s.len() - 1])
    };
    let wrong_key = change_last(&key);
    let wrong_token = change_last(&t1);
    let wrong_admin = format!("{admin}zz");
    assert_eq!(
        api.get(&wrong_key, "/api/v1/kubbis").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        api.get(&wrong_admin, "/admin/v1/api-keys").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(api.claim(&wrong_token).await.status, StatusCode::NOT_FOUND);
    let invalid = common::marker("logged-invalid");
    let r = api
        .create(&key, json!({"content": invalid, "ttl_seconds": 0}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        !r.body.to_string().contains(&invalid),
        "a validation error echoed the payload"
    );
    assert_eq!(api.delete(&key, &id1).await.status, StatusCode::OK);
    node.terminate();

    secrets.extend([t1, t2, wrong_key, wrong_token, wrong_admin]);
    secrets.extend([single, file_text, meta, invalid]);
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.lines().count() > 50,
        "trace logging produced too little to prove anything"
    );
    for s in &secrets {
        assert!(!text.contains(s.as_str()), "a secret appeared in the log");
        // A distinctive slice too, in case something logs a prefix.
        let tail = &s[s.len() - 16..];
        assert!(!text.contains(tail), "part of a secret appeared in the log");
    }
}

/// Per-client limits, with the node behind a "proxy" (loopback, trusted) naming clients in
/// `X-Forwarded-For`: one client past its burst gets `429 rate_limited` with `Retry-After`
/// while another is served; a client that keeps failing authentication is refused even with a
/// valid key, and others are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_rate_limits_on_links_and_failed_authentication() {
    let n = TestNode::start_with(|c| {
        c.client_limits = kubbi::config::ClientLimits {
            link_rate: 0.5,
            link_burst: 5.0,
            auth_failures_per_minute: 1.0,
            auth_failure_burst: 3.0,
            trusted_proxies: vec!["127.0.0.1".parse().expect("cidr")],
        };
    })
    .await;
    let get = |path: &str, client: &str, key: Option<&str>| {
        let mut rb = n
            .api
            .http
            .get(n.api.url(path))
            .header("x-forwarded-for", format!("{client}, 127.0.0.1"));
        if let Some(k) = key {
            rb = rb.bearer_auth(k);
        }
        n.api.send(rb)
    };
    let unknown = "/r/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    for i in 0..5 {
        let r = get(unknown, "198.51.100.1", None).await;
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "request {i} within the burst"
        );
    }
    let r = get(unknown, "198.51.100.1", None).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.err_code(), "rate_limited");
    let retry: u64 = r.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=3).contains(&retry), "retry-after {retry}");
    assert_eq!(
        get(unknown, "198.51.100.2", None).await.status,
        StatusCode::NOT_FOUND,
        "another client is not limited"
    );
    // Producer routes are not link requests.
    assert_eq!(
        get("/api/v1/kubbis", "198.51.100.1", Some(&n.key))
            .await
            .status,
        StatusCode::OK
    );

    // Three failed authentications spend the burst; then even the right key is refused.
    for _ in 0..3 {
        let r = get("/api/v1/kubbis", "203.0.113.5", Some("kb_wrong")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let r = get("/api/v1/kubbis", "203.0.113.5", Some(&n.key)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.body);
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(
        get("/api/v1/kubbis", "203.0.113.6", Some(&n.key))
            .await
            .status,
        StatusCode::OK
    );
    // A client address that is not a trusted proxy cannot choose its identity: the header from
    // an untrusted peer is ignored (covered by the unit tests of `client_addr`), and metrics
    // count the refusals under their route.
    let text = n.api.metrics_text().await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("kubbi_http_requests_total") && l.contains("status=\"429\"")),
        "429s are not counted"
    );
    n.stop().await;
}
