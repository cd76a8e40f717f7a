//! TLS on the public port, with certificates made by `openssl` and a real client (`curl`):
//! the API over HTTPS, plaintext refused, a renewed certificate served without a restart, and a
//! key file others can read refused at start.

#[path = "../common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::eventually;
use serde_json::Value;

/// A CA, and a certificate for 127.0.0.1 signed by it with the given serial, in `dir`.
fn make_certs(dir: &Path, serial: &str) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    if !dir.join("ca.pem").exists() {
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=kubbi test CA",
        ]);
    }
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "new.key",
        "-out",
        "new.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "new.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-set_serial",
        serial,
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "new.pem",
    ]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("new.key"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod");
    // Replace atomically, key first: the node sees either pair whole or retries.
    std::fs::rename(dir.join("new.key"), dir.join("server.key")).expect("key");
    std::fs::rename(dir.join("new.pem"), dir.join("server.pem")).expect("cert");
}

/// `curl` over HTTPS trusting only the test CA; returns (status, body).
fn curl(dir: &Path, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(dir.join("ca.pem"))
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The serial number of the certificate the server presents.
fn served_serial(dir: &Path, port: u16) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -CAfile {} </dev/null 2>/dev/null \
             | openssl x509 -noout -serial",
            dir.join("ca.pem").display()
        ))
        .output()
        .expect("openssl s_client");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_api_reload_and_key_permissions() {
    let certs = tempfile::tempdir().expect("tempdir");
    let dir = certs.path().to_path_buf();
    make_certs(&dir, "0x1001");
    let data = tempfile::tempdir().expect("tempdir");
    let mut config = common::fast_config(data.path());
    config.tls_cert = Some(dir.join("server.pem"));
    config.tls_key = Some(dir.join("server.key"));
    let key_file = config.node_key_path();
    common::logscan::init();
    let node = kubbi::node::start(config).await.expect("node starts");
    common::logscan::record_key_file(&key_file);
    common::logscan::record("admin-token", node.admin_token.as_str());
    let pem = std::fs::read_to_string(dir.join("server.key")).expect("key");
    for line in pem.lines().filter(|l| !l.starts_with("-----")) {
        common::logscan::record("tls-key", line);
    }
    let port = node.http_addr.port();
    let base = format!("https://127.0.0.1:{port}");
    assert!(node.public_url.starts_with("https://"));
    let admin = format!("authorization: Bearer {}", node.admin_token.as_str());
    let (code, body) = curl(
        &dir,
        &[
            "-H",
            &admin,
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"label":"tls"}"#,
            &format!("{base}/admin/v1/api-keys"),
        ],
    );
    assert_eq!(code, 201, "{body}");
    let key: Value = serde_json::from_str(&body).expect("json");
    let key = key["api_key"].as_str().expect("api_key").to_string();
    common::logscan::record("api-key", &key);

    // The whole API over HTTPS (HTTP/2 by ALPN, and HTTP/1.1).
    let (code, _) = curl(&dir, &[&format!("{base}/health")]);
    assert_eq!(code, 200);
    let (code, _) = curl(&dir, &["--http1.1", &format!("{base}/health")]);
    assert_eq!(code, 200);
    let auth = format!("authorization: Bearer {key}");
    let (code, body) = curl(
        &dir,
        &[
            "-H",
            &auth,
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"content":"over tls","max_retrievals":1}"#,
            &format!("{base}/api/v1/kubbis"),
        ],
    );
    assert_eq!(code, 201, "{body}");
    let created: Value = serde_json::from_str(&body).expect("json");
    let url = created["claim_url"].as_str().expect("claim_url");
    common::logscan::record_json(&created);
    common::logscan::record("payload", "over tls");
    assert!(url.starts_with(&format!("{base}/r/")), "{url}");
    let (code, body) = curl(&dir, &["-X", "POST", &format!("{url}/claim")]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("over tls"));

    // Plaintext HTTP to the TLS port gets no HTTP answer.
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/health")).await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true));

    // A renewed certificate is served without a restart.
    assert_eq!(served_serial(&dir, port), "serial=1001");
    make_certs(&dir, "0x2002");
    eventually(
        Duration::from_secs(20),
        "the renewed certificate is served",
        || {
            let d = dir.clone();
            async move { (served_serial(&d, port) == "serial=2002").then_some(()) }
        },
    )
    .await;
    let (code, _) = curl(&dir, &[&format!("{base}/health")]);
    assert_eq!(code, 200);
    node.shutdown().await;

    // A key file that group or others can read: the node refuses to start.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let data = tempfile::tempdir().expect("tempdir");
    let mut config = common::fast_config(data.path());
    config.tls_cert = Some(dir.join("server.pem"));
    config.tls_key = Some(dir.join("server.key"));
    let err = kubbi::node::start(config)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("readable by group or others"), "{err}");
}
