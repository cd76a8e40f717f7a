//! `kubbi mcp` driven by a real MCP client (rmcp) over stdio against a real node: the tools,
//! their camelCase arguments, and errors reported as tool errors.

#[path = "../common/mod.rs"]
mod common;

use common::TestNode;
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use serde_json::{Value, json};

fn args(v: Value) -> rmcp::model::JsonObject {
    v.as_object().cloned().expect("object")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_client_hands_off_and_claims_through_kubbi() {
    let n = TestNode::start().await;
    let base = n.api.base.clone();
    let key = n.key.clone();
    let log = common::logscan::child_log("mcp");
    let (transport, _) = TokioChildProcess::builder(
        tokio::process::Command::new(common::kubbi_bin()).configure(|cmd| {
            cmd.arg("mcp")
                .env("KUBBI_URL", &base)
                .env("KUBBI_API_KEY", &key)
                .env("KUBBI_LOG", common::logscan::level());
        }),
    )
    .stderr(common::logscan::append(&log))
    .spawn()
    .expect("spawn kubbi mcp");
    let client = ().serve(transport).await.expect("MCP handshake");
    let info = client.peer_info().expect("server info");
    assert_eq!(
        info.server_info.as_ref().map(|s| s.name.as_str()),
        Some("kubbi")
    );
    let tools = client.list_all_tools().await.expect("tools");
    let mut names: Vec<String> = tools.iter().map(|t| t.name.to_string()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "kubbi_claim",
            "kubbi_delete",
            "kubbi_get",
            "kubbi_inspect",
            "kubbi_send",
            "kubbi_send_files"
        ]
    );
    let send = tools.iter().find(|t| t.name == "kubbi_send").expect("send");
    let props = send.input_schema.get("properties").expect("schema");
    for p in [
        "content",
        "contentType",
        "ttlSeconds",
        "maxRetrievals",
        "metadata",
    ] {
        assert!(props.get(p).is_some(), "kubbi_send lacks {p}: {props}");
    }

    // Tool calls and results carry payloads and claim URLs past the `Api` helper.
    let call = |name: &'static str, a: Value| {
        let client = &client;
        async move {
            common::logscan::record_json(&a);
            let r = client
                .call_tool(CallToolRequestParams::new(name).with_arguments(args(a)))
                .await
                .expect("tool call");
            if let Some(s) = &r.structured_content {
                common::logscan::record_json(s);
            }
            r
        }
    };
    let sent = call("kubbi_send", json!({"content": "api-token-42", "contentType": "text/plain", "ttlSeconds": 300, "maxRetrievals": 1, "metadata": {"for": "agent-b"}})).await;
    assert_eq!(sent.is_error, Some(false), "{sent:?}");
    let sent = sent.structured_content.expect("structured");
    let url = sent["claim_url"].as_str().expect("url").to_string();
    let id = sent["id"].as_str().expect("id").to_string();

    let inspected = call("kubbi_inspect", json!({"claimUrl": url}))
        .await
        .structured_content
        .expect("s");
    assert_eq!(inspected["retrieval_count"], 0);
    assert_eq!(inspected["metadata"]["for"], "agent-b");
    let got = call("kubbi_get", json!({"id": id}))
        .await
        .structured_content
        .expect("s");
    assert_eq!(got["status"], "active");
    let claimed = call("kubbi_claim", json!({"claimUrl": url}))
        .await
        .structured_content
        .expect("s");
    assert_eq!(claimed["content"], "api-token-42");
    assert_eq!(claimed["burned"], true);
    // A second claim is a tool error with the API's code, not a protocol failure.
    let again = call("kubbi_claim", json!({"claimUrl": url})).await;
    assert_eq!(again.is_error, Some(true));
    let text = format!("{:?}", again.content);
    assert!(text.contains("gone"), "{text}");

    let files = call("kubbi_send_files", json!({"files": [
        {"name": "plan.md", "content": "# plan", "contentType": "text/markdown", "role": "instructions"},
        {"name": "data.bin", "content": "AAEC", "contentType": "application/octet-stream", "encoding": "base64"}
    ], "maxRetrievals": 2})).await.structured_content.expect("s");
    assert_eq!(files["file_count"], 2);
    let pkg_id = files["id"].as_str().expect("id").to_string();
    let pkg = call("kubbi_claim", json!({"claimUrl": files["claim_url"]}))
        .await
        .structured_content
        .expect("s");
    assert_eq!(pkg["files"][1]["content"], "AAEC");
    let deleted = call("kubbi_delete", json!({"id": pkg_id}))
        .await
        .structured_content
        .expect("s");
    assert_eq!(deleted["status"], "deleted");
    let bad = call("kubbi_send", json!({"content": "x", "ttlSeconds": 0})).await;
    assert_eq!(bad.is_error, Some(true));
    assert!(format!("{:?}", bad.content).contains("ttl_seconds"));
    client.cancel().await.expect("close");
    n.stop().await;
    // `kubbi mcp` ran at the test log level (trace): no claim URL or payload in its log, though
    // rmcp prints every message at debug.
    let text = std::fs::read_to_string(&log).expect("mcp log");
    assert!(
        !text.is_empty() || common::logscan::level() == "off",
        "kubbi mcp logged nothing, which proves nothing"
    );
    for secret in [url.as_str(), "api-token-42"] {
        assert!(!text.contains(secret), "kubbi mcp logged a secret");
    }
}
