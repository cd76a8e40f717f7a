//! Real clients, unchanged, against a real node: the published Python package `kubbi` 0.1.0
//! installed from PyPI into a temporary virtualenv.

#[path = "../common/mod.rs"]
mod common;

use std::process::Command;

use common::TestNode;

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_python_client_works_unchanged() {
    let venv = tempfile::tempdir().expect("tempdir");
    run(Command::new("python3")
        .args(["-m", "venv"])
        .arg(venv.path()));
    let py = venv.path().join("bin/python");
    run(Command::new(&py).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "kubbi==0.1.0",
    ]));
    let n = TestNode::start().await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/kubbi_client_check.py"
    );
    let base = n.api.base.clone();
    let key = n.key.clone();
    let out = tokio::task::spawn_blocking(move || {
        // The script records the payloads and claim tokens it handles beside ours.
        let secrets = common::logscan::dir().join(format!("secrets-{}-py.txt", std::process::id()));
        run(Command::new(&py)
            .arg(script)
            .arg(&base)
            .arg(&key)
            .env("KUBBI_TEST_SECRETS", secrets))
    })
    .await
    .expect("script");
    assert!(String::from_utf8_lossy(&out.stdout).contains("python client ok"));
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_passes_an_independent_validator() {
    let venv = tempfile::tempdir().expect("tempdir");
    run(Command::new("python3")
        .args(["-m", "venv"])
        .arg(venv.path()));
    run(Command::new(venv.path().join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "openapi-spec-validator==0.7.1",
    ]));
    let n = TestNode::start().await;
    let doc = n
        .api
        .http
        .get(n.api.url("/openapi.json"))
        .send()
        .await
        .expect("get")
        .bytes()
        .await
        .expect("body");
    let file = venv.path().join("openapi.json");
    std::fs::write(&file, &doc).expect("write");
    let out = run(Command::new(venv.path().join("bin/openapi-spec-validator")).arg(&file));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
    n.stop().await;
}
