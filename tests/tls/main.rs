//! TLS on the public port, with certificates made by `openssl` and a real client (`curl`):
//! the API over HTTPS, plaintext refused, a renewed certificate served without a restart, and a
//! key file others can read refused at start. Mutual TLS on the internal port: a 3-node cluster
//! of real processes forwarding over it, strangers refused in the handshake, partial flags and
//! open key files refused at start.

#[path = "../common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::cluster::Cluster;
use common::eventually;
use reqwest::StatusCode;
use serde_json::{Value, json};

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

/// Runs `openssl` in `dir`, asserting success.
fn openssl(dir: &Path, args: &[&str]) {
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
}

/// A CA `<ca>.pem` / `<ca>.key` in `dir`.
fn make_ca(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN=kubbi {ca}"),
        ],
    );
}

/// A node certificate `<name>.pem` / `<name>.key` (mode 0600) signed by `ca`, for the IP
/// 127.0.0.1, usable as server and as client, as SECURITY.md tells operators to make them.
fn make_node_cert(dir: &Path, ca: &str, name: &str, serial: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.new.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    std::fs::write(
        dir.join(format!("{name}.cnf")),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .expect("ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            serial,
            "-days",
            "2",
            "-extfile",
            &format!("{name}.cnf"),
            "-out",
            &format!("{name}.new.pem"),
        ],
    );
    use std::os::unix::fs::PermissionsExt;
    let key = dir.join(format!("{name}.new.key"));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::rename(&key, dir.join(format!("{name}.key"))).expect("key");
    std::fs::rename(
        dir.join(format!("{name}.new.pem")),
        dir.join(format!("{name}.pem")),
    )
    .expect("cert");
}

fn internal_tls_flags(dir: &Path, id: u64) -> Vec<String> {
    vec![
        "--internal-tls-cert".into(),
        dir.join(format!("node{id}.pem")).display().to_string(),
        "--internal-tls-key".into(),
        dir.join(format!("node{id}.key")).display().to_string(),
        "--internal-tls-ca".into(),
        dir.join("ca.pem").display().to_string(),
    ]
}

/// `curl` POSTing to the internal port over TLS, trusting only the cluster CA, with extra
/// arguments (a client certificate or none); returns (HTTP status or 0, curl's stderr).
fn curl_internal(dir: &Path, port: u16, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "/dev/null", "--cacert"])
        .arg(dir.join("ca.pem"))
        .args(["-w", "%{http_code}", "-X", "POST"])
        .args(args)
        .arg(format!("https://127.0.0.1:{port}/internal/v1/status"))
        .output()
        .expect("curl runs");
    (
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_cluster_forwards_and_refuses_peers_without_a_cluster_certificate() {
    let certs = tempfile::tempdir().expect("tempdir");
    let dir = certs.path().to_path_buf();
    make_ca(&dir, "ca");
    for id in 1..=3 {
        make_node_cert(&dir, "ca", &format!("node{id}"), &format!("0x{id}00"));
    }
    make_ca(&dir, "rogue-ca");
    make_node_cert(&dir, "rogue-ca", "rogue", "0x666");

    let c = Cluster::start_each(3, |id| internal_tls_flags(&dir, id)).await;
    // Every group formed and elected a leader over mTLS; now a create and claims through
    // nodes that do not lead the kubbi's group (forwarded over the internal port).
    let (key, _) = c.api(0).new_api_key(&c.admin, "mtls").await;
    for i in 0..3 {
        let created = c
            .api(i)
            .create(
                &key,
                json!({"content": format!("over mtls {i}"), "max_retrievals": 2}),
            )
            .await;
        assert_eq!(
            created.status,
            StatusCode::CREATED,
            "{:?}\n{}",
            created.body,
            c.logs_tail()
        );
        let id = created.body["id"].as_str().expect("id");
        let shard = u16::from_str_radix(&id[..4], 16).expect("shard bits");
        let leader = c
            .leader_of_shard(i, shard)
            .await
            .expect("the shard's group has a leader");
        let followers: Vec<usize> = (0..3).filter(|&j| c.members[j].id != leader).collect();
        assert_eq!(followers.len(), 2);
        let token = created.body["claim_token"].as_str().expect("token");
        for &f in &followers {
            let claim = c.api(f).claim(token).await;
            assert_eq!(
                claim.status,
                StatusCode::OK,
                "claim through follower {f}: {:?}\n{}",
                claim.body,
                c.logs_tail()
            );
            assert_eq!(claim.body["content"], format!("over mtls {i}"));
        }
        assert_eq!(
            c.api(followers[0]).claim(token).await.status,
            StatusCode::GONE
        );
    }

    // The internal port, seen by outsiders.
    let port = c.members[0].internal_port;
    // A client with a cluster certificate passes TLS (and verifies the node's certificate for
    // 127.0.0.1 against the CA); it then still needs the cluster secret.
    let node2 = [
        "--cert",
        &dir.join("node2.pem").display().to_string(),
        "--key",
        &dir.join("node2.key").display().to_string(),
    ]
    .map(String::from);
    let node2: Vec<&str> = node2.iter().map(String::as_str).collect();
    let (code, err) = curl_internal(&dir, port, &node2);
    assert_eq!(
        code, 401,
        "a member's certificate without the secret: {err}"
    );
    // No client certificate: refused in the handshake, before any HTTP. (curl may see the
    // alert or only the closed connection, so the node's log tells why it refused.)
    let log = c.members[0].log.clone();
    let refused_for = |why: &'static str| {
        let log = log.clone();
        move || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .ok()?
                    .lines()
                    .any(|l| l.contains("internal TLS handshake refused") && l.contains(why))
                    .then_some(())
            }
        }
    };
    let (code, err) = curl_internal(&dir, port, &[]);
    assert_eq!(code, 0, "no client certificate got an HTTP answer: {err}");
    eventually(
        Duration::from_secs(10),
        "the node logs a handshake refused for want of a certificate",
        refused_for("peer sent no certificates"),
    )
    .await;
    // A certificate from another CA: refused in the handshake.
    let rogue = [
        "--cert",
        &dir.join("rogue.pem").display().to_string(),
        "--key",
        &dir.join("rogue.key").display().to_string(),
    ]
    .map(String::from);
    let rogue: Vec<&str> = rogue.iter().map(String::as_str).collect();
    let (code, err) = curl_internal(&dir, port, &rogue);
    assert_eq!(
        code, 0,
        "another CA's certificate got an HTTP answer: {err}"
    );
    eventually(
        Duration::from_secs(10),
        "the node logs a handshake refused for an unknown issuer",
        refused_for("UnknownIssuer"),
    )
    .await;
    // Plaintext h2c to the mTLS port: no HTTP answer.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["--http2-prior-knowledge", "-X", "POST"])
        .arg(format!("http://127.0.0.1:{port}/internal/v1/status"))
        .output()
        .expect("curl runs");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "000");

    // A renewed node certificate is served on the internal port without a restart, and the
    // cluster keeps forwarding.
    assert_eq!(served_serial(&dir, port), "serial=0100");
    make_node_cert(&dir, "ca", "node1", "0x1100");
    eventually(
        Duration::from_secs(20),
        "the renewed internal certificate is served",
        || {
            let d = dir.clone();
            async move { (served_serial(&d, port) == "serial=1100").then_some(()) }
        },
    )
    .await;
    let created = c
        .api(1)
        .create(&key, json!({"content": "after renewal"}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let token = created.body["claim_token"].as_str().expect("token");
    for i in 0..3 {
        let p = c.api(i).preview(token).await;
        assert_eq!(p.status, StatusCode::OK, "preview via {i}: {:?}", p.body);
    }
}

/// Runs `kubbi` to its exit (it must exit within a minute); returns its status and stderr.
fn run_to_exit(mut cmd: Command) -> (std::process::ExitStatus, String) {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn kubbi");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            use std::io::Read;
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return (status, err);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kubbi did not exit: it should have refused its configuration");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_internal_tls_flags_and_open_internal_keys_are_refused_at_start() {
    let certs = tempfile::tempdir().expect("tempdir");
    let dir = certs.path().to_path_buf();
    make_ca(&dir, "ca");
    make_node_cert(&dir, "ca", "node1", "0x100");
    let secret = dir.join("cluster-secret");
    kubbi::config::write_secret_file(&secret, b"0123456789abcdef0123456789abcdef").expect("secret");
    let serve = |data: &Path| {
        let mut cmd = Command::new(common::kubbi_bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(data)
            .args(["--http-addr", "127.0.0.1:0"])
            .args(["--internal-addr", "127.0.0.1:0"])
            .arg("--cluster-secret-file")
            .arg(&secret)
            .env_remove("KUBBI_INTERNAL_TLS_CERT")
            .env_remove("KUBBI_INTERNAL_TLS_KEY")
            .env_remove("KUBBI_INTERNAL_TLS_CA");
        cmd
    };

    // Flags: a certificate and key without the CA.
    let data = tempfile::tempdir().expect("tempdir");
    let mut cmd = serve(data.path());
    cmd.arg("--internal-tls-cert")
        .arg(dir.join("node1.pem"))
        .arg("--internal-tls-key")
        .arg(dir.join("node1.key"));
    let (status, err) = run_to_exit(cmd);
    assert!(!status.success());
    assert!(
        err.contains("--internal-tls-cert, --internal-tls-key and --internal-tls-ca together")
            && err.contains("missing --internal-tls-ca"),
        "{err}"
    );
    // Environment: only the CA.
    let mut cmd = serve(data.path());
    cmd.env("KUBBI_INTERNAL_TLS_CA", dir.join("ca.pem"));
    let (status, err) = run_to_exit(cmd);
    assert!(!status.success());
    assert!(
        err.contains("missing --internal-tls-cert and --internal-tls-key"),
        "{err}"
    );

    // All three, but a key file group or others can read.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("node1.key"),
        std::fs::Permissions::from_mode(0o640),
    )
    .expect("chmod");
    let mut config = common::fast_config(data.path());
    config.cluster.internal_addr = Some("127.0.0.1:0".into());
    config.cluster.secret_file = Some(secret.clone());
    config.cluster.internal_tls_cert = Some(dir.join("node1.pem"));
    config.cluster.internal_tls_key = Some(dir.join("node1.key"));
    config.cluster.internal_tls_ca = Some(dir.join("ca.pem"));
    let err = kubbi::node::start(config)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("internal TLS") && err.contains("readable by group or others"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_client_accepts_only_servers_of_the_ca_under_the_name_it_dialled() {
    let certs = tempfile::tempdir().expect("tempdir");
    let dir = certs.path().to_path_buf();
    make_ca(&dir, "ca");
    make_node_cert(&dir, "ca", "node1", "0x100");
    make_node_cert(&dir, "ca", "node2", "0x200");
    make_ca(&dir, "rogue-ca");
    make_node_cert(&dir, "rogue-ca", "rogue", "0x666");
    let secret = "0123456789abcdef0123456789abcdef";

    // A one-member cluster with mTLS on its internal port.
    let data = tempfile::tempdir().expect("tempdir");
    let port = common::cluster::free_port();
    let mut config = common::fast_config(data.path());
    config.cluster.internal_addr = Some(format!("127.0.0.1:{port}"));
    config.cluster.bootstrap =
        kubbi::config::parse_bootstrap(&format!("1=127.0.0.1:{port}")).expect("bootstrap");
    config.cluster.secret = Some(zeroize::Zeroizing::new(secret.into()));
    config.cluster.internal_tls_cert = Some(dir.join("node1.pem"));
    config.cluster.internal_tls_key = Some(dir.join("node1.key"));
    config.cluster.internal_tls_ca = Some(dir.join("ca.pem"));
    let node = kubbi::node::start(config).await.expect("node starts");

    // A server with a certificate from another CA (a real TLS server: openssl s_server).
    let rogue_port = common::cluster::free_port();
    let mut rogue = Command::new("openssl")
        .args([
            "s_server",
            "-quiet",
            "-www",
            "-accept",
            &rogue_port.to_string(),
        ])
        .args(["-cert", "rogue.pem", "-key", "rogue.key"])
        .current_dir(&dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl s_server");
    eventually(
        Duration::from_secs(20),
        "openssl s_server listens",
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", rogue_port))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;

    let client_tls = kubbi::tls::ReloadingTls::new(kubbi::tls::TlsFiles {
        cert: dir.join("node2.pem"),
        key: dir.join("node2.key"),
        ca: Some(dir.join("ca.pem")),
    })
    .expect("client TLS files")
    .client_config()
    .expect("client config");
    let peers = kubbi::transport::Peers::new(
        kubbi::transport::Identity {
            node_id: 2,
            incarnation: 7,
        },
        zeroize::Zeroizing::new(secret.into()),
        std::sync::Arc::new(kubbi::transport::AddressBook::default()),
        Some(client_tls),
    );
    let status = |addr: String| {
        let peers = peers.clone();
        async move {
            peers
                .post_addr::<kubbi::transport::messages::NodeStatus>(
                    1,
                    &addr,
                    0,
                    "/internal/v1/status",
                    kubbi::codec::encode(&()),
                    Duration::from_secs(10),
                )
                .await
        }
    };
    // The node, dialled by the IP address its certificate names: answered.
    let st = status(format!("127.0.0.1:{port}"))
        .await
        .expect("a member's server is accepted");
    assert_eq!(st.node_id, 1);
    // The same node dialled as `localhost`, a name its certificate does not carry: refused.
    let err = status(format!("localhost:{port}"))
        .await
        .expect_err("wrong name")
        .to_string();
    assert!(err.contains("not valid for name"), "{err}");
    // A server whose certificate another CA signed: refused.
    let err = status(format!("127.0.0.1:{rogue_port}"))
        .await
        .expect_err("another CA")
        .to_string();
    assert!(err.contains("UnknownIssuer"), "{err}");

    // The node-pair stream's client checks the same: the node under its certificate's name
    // answers a forwarded operation, the wrong name and another CA's server are refused.
    let streamed = |addr: String| {
        let peers = peers.clone();
        async move {
            peers.book().set(1, &addr, 0);
            peers
                .call::<Result<
                    kubbi::transport::messages::ShardReply,
                    kubbi::transport::messages::ExecError,
                >>(
                    1,
                    kubbi::transport::stream::Call::Shard(0),
                    &kubbi::codec::encode(&kubbi::transport::messages::ShardOp::Status),
                    Duration::from_secs(10),
                    kubbi::transport::Lane::BySize,
                )
                .await
        }
    };
    let reply = streamed(format!("127.0.0.1:{port}"))
        .await
        .expect("a member's server is accepted");
    assert!(
        matches!(reply, Ok(kubbi::transport::messages::ShardReply::Status(_))),
        "{reply:?}"
    );
    let err = streamed(format!("localhost:{port}"))
        .await
        .expect_err("wrong name")
        .to_string();
    assert!(err.contains("not valid for name"), "{err}");
    let err = streamed(format!("127.0.0.1:{rogue_port}"))
        .await
        .expect_err("another CA")
        .to_string();
    assert!(err.contains("UnknownIssuer"), "{err}");

    let _ = rogue.kill();
    let _ = rogue.wait();
    node.shutdown().await;
}
