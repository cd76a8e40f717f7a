//! The `kubbi` command-line client against a real node: send (text, stdin, files with roles),
//! inspect, claim (stdout, files into a directory, never overwriting), get/list/delete, and the
//! exit codes scripts rely on.

#[path = "../common/mod.rs"]
mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::TestNode;

/// Records the payloads a CLI call sends (positional content of `send`, stdin, `--file`
/// contents) and the claim URLs it prints, and keeps its stderr as a log for the scan.
fn recorded(args: &[String], stdin: Option<&[u8]>, out: Output) -> Output {
    if args.first().map(String::as_str) == Some("send") {
        let mut it = args[1..].iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--json" => {}
                "--file" => {
                    let spec = it.next().expect("--file value");
                    let path = spec.rsplit_once(':').map_or(spec.as_str(), |(p, _)| p);
                    common::logscan::record("payload", std::fs::read(path).expect("file"));
                }
                f if f.starts_with("--") => {
                    it.next();
                }
                content => common::logscan::record("payload", content),
            }
        }
        if let Some(i) = stdin {
            common::logscan::record("payload", i);
        }
    }
    common::logscan::record_claim_urls(&String::from_utf8_lossy(&out.stdout));
    common::logscan::save_output("cli-stderr", &out.stderr);
    out
}

fn kubbi(n: &TestNode, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(common::kubbi_bin())
        .args(args)
        .env("KUBBI_URL", &n.api.base)
        .env("KUBBI_API_KEY", &n.key)
        .env("KUBBI_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubbi runs");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("kubbi exits");
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    recorded(&args, stdin, out)
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).expect("utf-8")
}

async fn run(n: &TestNode, args: Vec<String>, stdin: Option<Vec<u8>>) -> Output {
    let n2 = (n.api.base.clone(), n.key.clone());
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(common::kubbi_bin());
        child
            .args(&args)
            .env("KUBBI_URL", &n2.0)
            .env("KUBBI_API_KEY", &n2.1)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut c = child.spawn().expect("spawn");
        if let Some(i) = &stdin {
            c.stdin.take().expect("stdin").write_all(i).expect("write");
        }
        drop(c.stdin.take());
        let out = c.wait_with_output().expect("wait");
        recorded(&args, stdin.as_deref(), out)
    })
    .await
    .expect("join")
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_inspect_claim_text_and_stdin() {
    let n = TestNode::start().await;
    let url = ok(&run(
        &n,
        s(&[
            "send",
            "hello there",
            "--ttl",
            "10m",
            "--max-retrievals",
            "2",
        ]),
        None,
    )
    .await);
    let url = url.trim().to_string();
    assert!(url.starts_with(&format!("{}/r/", n.api.base)), "{url}");
    let info = ok(&run(&n, s(&["inspect", &url]), None).await);
    assert!(
        info.contains("text/plain") && info.contains("reads left: 2"),
        "{info}"
    );
    let json = ok(&run(&n, s(&["inspect", &url, "--json"]), None).await);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["retrieval_count"], 0);
    assert_eq!(ok(&run(&n, s(&["claim", &url]), None).await), "hello there");
    let last = run(&n, s(&["claim", &url]), None).await;
    assert_eq!(ok(&last), "hello there");
    assert!(String::from_utf8_lossy(&last.stderr).contains("last allowed read"));
    let gone = run(&n, s(&["claim", &url]), None).await;
    assert_eq!(gone.status.code(), Some(4), "410 is exit code 4");

    // stdin, JSON content, metadata, a bare token.
    let url = ok(&run(
        &n,
        s(&[
            "send",
            "--content-type",
            "application/json",
            "--metadata",
            r#"{"job":7}"#,
        ]),
        Some(br#"{"rows": 12345678901234567890}"#.to_vec()),
    )
    .await);
    let token = url.trim().rsplit('/').next().expect("token").to_string();
    let claimed = ok(&run(&n, s(&["claim", &token, "--json"]), None).await);
    let v: serde_json::Value = serde_json::from_str(&claimed).expect("json");
    assert_eq!(v["metadata"]["job"], 7);
    assert!(
        claimed.contains("12345678901234567890"),
        "digits kept: {claimed}"
    );
    // One token in 64 starts with `-`: it is a token, not an option. (This one is unknown: the
    // server's answer, not a usage error, proves it got there.)
    // (The token itself starts with `-` one time in 64: then another second character.)
    let hyphen = match token.strip_prefix('-') {
        Some(rest) => {
            let second = if rest.starts_with('A') { "B" } else { "A" };
            format!("-{second}{}", &rest[1..])
        }
        None => format!("-{}", &token[1..]),
    };
    assert_ne!(hyphen, token);
    for cmd in ["inspect", "claim"] {
        let r = run(&n, s(&[cmd, &hyphen]), None).await;
        let err = String::from_utf8_lossy(&r.stderr).to_string();
        assert!(
            !r.status.success() && !err.contains("unexpected argument"),
            "{cmd} {hyphen}: exit {:?}: {err}",
            r.status.code()
        );
    }
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_go_into_the_out_directory_and_never_overwrite() {
    let n = TestNode::start().await;
    let src = tempfile::tempdir().expect("tempdir");
    std::fs::write(src.path().join("config.json"), r#"{"mode":"fast"}"#).expect("w");
    std::fs::write(src.path().join("steps.md"), "# do it\n").expect("w");
    let big: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.path().join("artifact.tar.gz"), &big).expect("w");
    let p = |f: &str| src.path().join(f).display().to_string();
    let url = ok(&run(
        &n,
        vec![
            "send".into(),
            "--file".into(),
            format!("{}:config", p("config.json")),
            "--file".into(),
            format!("{}:instructions", p("steps.md")),
            "--file".into(),
            format!("{}:attachment", p("artifact.tar.gz")),
            "--max-retrievals".into(),
            "2".into(),
        ],
        None,
    )
    .await);
    let url = url.trim().to_string();
    let info = ok(&run(&n, s(&["inspect", &url]), None).await);
    assert!(
        info.contains("package of 3 files")
            && info.contains("steps.md")
            && info.contains("instructions"),
        "{info}"
    );

    let out = tempfile::tempdir().expect("tempdir");
    let dir = out.path().display().to_string();
    let written = ok(&run(&n, s(&["claim", &url, "--out", &dir]), None).await);
    assert_eq!(written.lines().count(), 3);
    assert_eq!(
        std::fs::read(out.path().join("artifact.tar.gz")).expect("r"),
        big
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("steps.md")).expect("r"),
        "# do it\n"
    );

    // The same names again: refused before anything is consumed.
    let refused = run(&n, s(&["claim", &url, "--out", &dir]), None).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"));
    let v: serde_json::Value =
        serde_json::from_str(&ok(&run(&n, s(&["inspect", &url, "--json"]), None).await))
            .expect("json");
    assert_eq!(
        v["retrieval_count"], 1,
        "the refused claim consumed nothing"
    );
    std::fs::write(out.path().join("steps.md"), "old").expect("w");
    ok(&run(&n, s(&["claim", &url, "--out", &dir, "--force"]), None).await);
    assert_eq!(
        std::fs::read_to_string(out.path().join("steps.md")).expect("r"),
        "# do it\n"
    );
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_commands_and_exit_codes() {
    let n = TestNode::start().await;
    let sent: serde_json::Value =
        serde_json::from_str(&ok(&run(&n, s(&["send", "x", "--json"]), None).await)).expect("json");
    let id = sent["id"].as_str().expect("id").to_string();
    let got: serde_json::Value =
        serde_json::from_str(&ok(&run(&n, s(&["get", &id]), None).await)).expect("json");
    assert_eq!(got["status"], "active");
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&run(&n, s(&["list", "--limit", "5"]), None).await))
            .expect("json");
    assert_eq!(listed["pagination"]["total"], 1);
    let deleted: serde_json::Value =
        serde_json::from_str(&ok(&run(&n, s(&["delete", &id]), None).await)).expect("json");
    assert_eq!(deleted["status"], "deleted");
    assert_eq!(
        run(&n, s(&["delete", &id]), None).await.status.code(),
        Some(7),
        "409 is 7"
    );
    assert_eq!(
        run(
            &n,
            s(&["get", "00000000-0000-4000-8000-000000000000"]),
            None
        )
        .await
        .status
        .code(),
        Some(3),
        "404 is 3"
    );
    assert_eq!(
        run(&n, s(&["send", "x", "--ttl", "0"]), None)
            .await
            .status
            .code(),
        Some(2),
        "usage is 2"
    );
    assert_eq!(
        run(&n, s(&["send", "x", "--max-retrievals", "5000"]), None)
            .await
            .status
            .code(),
        Some(6),
        "400 is 6"
    );
    let unauth = kubbi(&n, &["list", "--api-key", "kb_nope"], None);
    assert_eq!(unauth.status.code(), Some(5), "401 is 5");
    let down = Command::new(common::kubbi_bin())
        .args(["list", "--url", "http://127.0.0.1:9"])
        .env("KUBBI_API_KEY", &n.key)
        .output()
        .expect("runs");
    assert_eq!(down.status.code(), Some(8), "unreachable is 8");
    n.stop().await;
}
