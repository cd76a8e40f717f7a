//! Spans reach a real OTLP/HTTP receiver (a small one in this test): a span per request with
//! children through router, executor, actor and raft, in one trace; and no attribute carries a
//! claim token, an API key or payload bytes.

#[path = "../common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use common::{ProcessNode, marker};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use reqwest::StatusCode;
use serde_json::json;

type Spans = Arc<Mutex<Vec<Span>>>;

async fn receiver() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut s = sink.lock().expect("lock");
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        s.extend(ss.spans);
                    }
                }
                StatusCode::OK
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    (format!("http://{addr}"), spans)
}

fn attr<'a>(s: &'a Span, k: &str) -> Option<&'a Any> {
    s.attributes
        .iter()
        .find(|a| a.key == k)?
        .value
        .as_ref()?
        .value
        .as_ref()
}

fn text(v: &Any) -> String {
    match v {
        Any::StringValue(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_and_carry_no_secrets() {
    let (endpoint, spans) = receiver().await;
    let base = tempfile::tempdir().expect("tempdir");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("KUBBI_LOG", "info"),
    ];
    let node = ProcessNode::start(&base.path().join("n"), &base.path().join("n.log"), &env).await;
    let admin = node.admin_token();
    let (key, _) = node.api.new_api_key(&admin, "otel").await;
    let payload = marker("traced-payload");
    let c = node
        .api
        .create(
            &key,
            json!({"content": payload, "max_retrievals": 1, "metadata": {"m": payload}}),
        )
        .await;
    assert_eq!(c.status, StatusCode::CREATED);
    let token = c.body["claim_token"].as_str().expect("t").to_string();
    node.api.preview(&token).await;
    assert_eq!(
        node.api.claim(&token).await.body["content"],
        payload.as_str()
    );

    let claim_trace = common::eventually(Duration::from_secs(20), "claim spans exported", || {
        let spans = spans.clone();
        async move {
            let s = spans.lock().expect("lock");
            let root = s
                .iter()
                .find(|s| attr(s, "http.route").map(text).as_deref() == Some("/r/{token}/claim"))?;
            let trace = root.trace_id.clone();
            let names: Vec<String> = s
                .iter()
                .filter(|x| x.trace_id == trace)
                .map(|x| x.name.clone())
                .collect();
            [
                "kubbi.route",
                "kubbi.execute",
                "kubbi.actor",
                "raft.propose",
            ]
            .iter()
            .all(|n| names.iter().any(|x| x == n))
            .then_some(names)
        }
    })
    .await;
    assert!(
        claim_trace.contains(&"POST /r/{token}/claim".to_string()),
        "{claim_trace:?}"
    );

    let all = spans.lock().expect("lock").clone();
    assert!(all.len() > 10);
    for s in &all {
        for a in &s.attributes {
            let v = a
                .value
                .as_ref()
                .and_then(|v| v.value.as_ref())
                .map(text)
                .unwrap_or_default();
            for secret in [&token, &key, &payload, &admin] {
                assert!(
                    !v.contains(&secret[..16]),
                    "span {} attribute {} carries a secret",
                    s.name,
                    a.key
                );
            }
        }
        assert!(!s.name.contains(&token[..16]));
    }
}

/// A claim through a node that does not lead the kubbi's group is forwarded over the node-pair
/// stream, and the leader's span for it (`kubbi.forwarded`) continues the claim's trace: the
/// trace context crosses the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_claim_continues_its_trace_on_the_leader() {
    let (endpoint, spans) = receiver().await;
    let c = common::cluster::Cluster::start_env(
        3,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let (key, _) = c.api(0).new_api_key(&c.admin, "otel").await;
    let created = c
        .api(0)
        .create(&key, json!({"content": "traced", "max_retrievals": 1}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let id = created.body["id"].as_str().expect("id");
    let shard = u16::from_str_radix(&id[..4], 16).expect("shard bits");
    let leader = c
        .leader_of_shard(0, shard)
        .await
        .expect("the shard's group has a leader");
    let follower = (0..3)
        .find(|&i| c.members[i].id != leader)
        .expect("a follower");
    let token = created.body["claim_token"].as_str().expect("token");
    let claim = c.api(follower).claim(token).await;
    assert_eq!(claim.status, StatusCode::OK, "{:?}", claim.body);

    common::eventually(
        Duration::from_secs(20),
        "the leader's forwarded span joins the claim's trace",
        || {
            let spans = spans.clone();
            async move {
                let s = spans.lock().expect("lock");
                let root = s.iter().find(|s| {
                    attr(s, "http.route").map(text).as_deref() == Some("/r/{token}/claim")
                })?;
                s.iter()
                    .any(|x| {
                        x.name == "kubbi.forwarded"
                            && x.trace_id == root.trace_id
                            && attr(x, "kubbi.op").map(text).as_deref() == Some("claim")
                    })
                    .then_some(())
            }
        },
    )
    .await;
}
