//! The human claim page in a real headless Chromium (driven over WebDriver by chromedriver):
//! opening the link consumes nothing, the claim button shows the text and offers the files for
//! download, link-preview bots never consume, and the page works without JavaScript.

#[path = "../common/mod.rs"]
mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::TestNode;
use reqwest::StatusCode;
use serde_json::{Value, json};

struct Driver {
    child: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Driver {
    async fn start() -> Self {
        let port = common::cluster::free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian package chromium-driver) runs");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome",
            "goog:chromeOptions": {"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                            "--disable-dev-shm-usage"]}}}});
        let session = common::eventually(Duration::from_secs(30), "chromedriver session", || {
            let http = http.clone();
            let url = format!("{base}/session");
            let caps = caps.clone();
            async move {
                let r: Value = http
                    .post(url)
                    .json(&caps)
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                r["value"]["sessionId"].as_str().map(String::from)
            }
        })
        .await;
        Self {
            child,
            base,
            session,
            http,
        }
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let r: Value = self
            .http
            .request(method, url)
            .json(&body)
            .send()
            .await
            .expect("webdriver")
            .json()
            .await
            .expect("json");
        assert!(r["value"]["error"].is_null(), "webdriver error: {r}");
        r["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", json!({"url": url}))
            .await;
    }

    async fn script(&self, js: &str) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": js, "args": []}),
        )
        .await
    }

    async fn script_async(&self, js: &str) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/async",
            json!({"script": js, "args": []}),
        )
        .await
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn count(n: &TestNode, id: &str) -> (u64, String) {
    let d = n.api.get(&n.key, &format!("/api/v1/kubbis/{id}")).await;
    (
        d.body["retrieval_count"].as_u64().expect("count"),
        d.body["status"].as_str().expect("status").to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_preview_consumes_nothing_and_the_button_claims_with_downloads() {
    let n = TestNode::start().await;
    let binary: Vec<u8> = (0..=255u8).collect();
    let c = n
        .api
        .create(
            &n.key,
            json!({"files": [
                {"name": "notes.md", "content": "# Hello <b>browser</b>\nline 2", "content_type": "text/markdown", "role": "instructions"},
                {"name": "blob.bin", "content": STANDARD.encode(&binary), "content_type": "application/octet-stream", "encoding": "base64"},
            ], "max_retrievals": 1}),
        )
        .await;
    let url = c.body["claim_url"].as_str().expect("url").to_string();
    let id = c.body["id"].as_str().expect("id").to_string();
    let d = Driver::start().await;
    for _ in 0..2 {
        d.go(&url).await;
        let text = d.script("return document.body.innerText").await;
        let text = text.as_str().expect("text");
        assert!(text.contains("Something is waiting"), "{text}");
        assert!(
            text.contains("notes.md") && text.contains("blob.bin") && text.contains("256 B"),
            "{text}"
        );
        assert!(
            !text.contains("Hello"),
            "the page shows no content before the claim"
        );
    }
    assert_eq!(
        count(&n, &id).await,
        (0, "active".into()),
        "opening the page consumed nothing"
    );

    d.script("document.querySelector('#claim button').click()")
        .await;
    let rendered = common::eventually(Duration::from_secs(20), "claim result rendered", || {
        let d = &d;
        async move {
            let v = d.script("return Array.from(document.querySelectorAll('pre.content')).map(e => e.textContent)").await;
            v.as_array().filter(|a| !a.is_empty()).cloned()
        }
    })
    .await;
    assert_eq!(
        rendered,
        vec![json!("# Hello <b>browser</b>\nline 2")],
        "text shown as text, not markup"
    );
    let links = d
        .script("return Array.from(document.querySelectorAll('a.download')).map(a => [a.download, a.href.slice(0, 5)])")
        .await;
    assert_eq!(links, json!([["notes.md", "blob:"], ["blob.bin", "blob:"]]));
    // The download link carries exactly the created bytes.
    let got = d
        .script_async(
            "const done = arguments[arguments.length - 1];
             const a = document.querySelectorAll('a.download')[1];
             fetch(a.href).then(r => r.arrayBuffer()).then(b => done(Array.from(new Uint8Array(b))));",
        )
        .await;
    let got: Vec<u8> = got
        .as_array()
        .expect("bytes")
        .iter()
        .map(|b| b.as_u64().expect("byte") as u8)
        .collect();
    assert_eq!(got, binary);
    assert_eq!(count(&n, &id).await, (1, "burned".into()));
    // Opening it again: a clear page, still nothing consumed beyond the one claim.
    d.go(&url).await;
    let text = d.script("return document.body.innerText").await;
    assert!(
        text.as_str().expect("text").contains("No longer available"),
        "{text}"
    );
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_preview_bots_never_consume_and_the_page_works_without_javascript() {
    let n = TestNode::start().await;
    let c = n
        .api
        .create(
            &n.key,
            json!({"content": "the secret <script>alert(1)</script>", "max_retrievals": 1}),
        )
        .await;
    let url = c.body["claim_url"].as_str().expect("url").to_string();
    let id = c.body["id"].as_str().expect("id").to_string();
    for ua in [
        "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
        "Mozilla/5.0 (Windows NT 10.0; Microsoft Outlook 16.0.17928; Pro)",
        "facebookexternalhit/1.1",
        "Mozilla/5.0 (compatible; Discordbot/2.0; +https://discordapp.com)",
    ] {
        for accept in ["text/html,*/*;q=0.8", "*/*"] {
            let r = n
                .api
                .http
                .get(&url)
                .header("user-agent", ua)
                .header("accept", accept)
                .send()
                .await
                .expect("get");
            assert_eq!(r.status(), StatusCode::OK);
            let csp = r
                .headers()
                .get("content-security-policy")
                .map(|v| v.to_str().unwrap_or("").to_string());
            let body = r.text().await.expect("body");
            assert!(
                !body.contains("the secret"),
                "a preview never carries content"
            );
            if accept.starts_with("text/html") {
                assert!(csp.is_some_and(|c| c.contains("default-src 'none'")));
            }
        }
    }
    assert_eq!(count(&n, &id).await, (0, "active".into()));
    // Without JavaScript the button is a form POST; the answer is a page with the content.
    let r = n
        .api
        .http
        .post(format!("{url}/claim"))
        .header("accept", "text/html")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.text().await.expect("body");
    assert!(
        body.contains("the secret &lt;script&gt;alert(1)&lt;/script&gt;"),
        "escaped content shown"
    );
    assert!(
        !body.contains("<script>alert(1)"),
        "content is never markup"
    );
    assert!(body.contains("download=\"content\""));
    assert_eq!(count(&n, &id).await, (1, "burned".into()));
    n.stop().await;
}
