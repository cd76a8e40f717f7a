//! `kubbi mcp`: a Model Context Protocol server over stdio, so an agent host (Claude Desktop,
//! Cursor, ...) can hand payloads off through a kubbi node.
//!
//! The tools take the hosted kubbi MCP server's arguments (camelCase) and call this node's HTTP
//! API with `KUBBI_URL` and `KUBBI_API_KEY`. API errors come back as tool errors carrying the
//! API's error code and message, so the model can react; they are never protocol failures.

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ServerHandler, ServiceExt, schemars, tool, tool_handler, tool_router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::client::{Client, ClientError};

/// `kubbi_send` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendArgs {
    /// The content: a string, or any JSON value when contentType is application/json.
    pub content: Value,
    /// text/plain (default), application/json, text/markdown, text/csv or another text/* type.
    pub content_type: Option<String>,
    /// Seconds until it expires (default 900).
    pub ttl_seconds: Option<u64>,
    /// How many claims are allowed (default: unlimited until expiry).
    pub max_retrievals: Option<u32>,
    /// A small JSON object readable by producer and consumer.
    pub metadata: Option<Value>,
}

/// One file of `kubbi_send_files`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileArg {
    /// File name: letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// UTF-8 text, or base64 when encoding is "base64".
    pub content: String,
    /// MIME type, e.g. text/markdown or application/octet-stream.
    pub content_type: String,
    /// instructions, data, context, config or attachment.
    pub role: Option<String>,
    /// "base64" for binary content.
    pub encoding: Option<String>,
}

/// `kubbi_send_files` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendFilesArgs {
    /// The files, delivered together.
    pub files: Vec<FileArg>,
    pub ttl_seconds: Option<u64>,
    pub max_retrievals: Option<u32>,
    pub metadata: Option<Value>,
}

/// `kubbi_claim` and `kubbi_inspect` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimArgs {
    /// The claim URL (or the bare claim token).
    pub claim_url: String,
}

/// `kubbi_get` and `kubbi_delete` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct IdArgs {
    /// The kubbi's id.
    pub id: String,
}

/// The MCP server.
#[derive(Clone)]
pub struct KubbiMcp {
    client: Client,
    #[allow(dead_code, reason = "read through the tool_handler macro")]
    tool_router: ToolRouter<Self>,
}

fn answer(r: Result<Value, ClientError>) -> CallToolResult {
    match r {
        Ok(v) => CallToolResult::structured(v),
        Err(ClientError::Api {
            status,
            code,
            message,
            messages,
        }) => CallToolResult::error(vec![ContentBlock::text(
            json!({"error": code, "status": status, "message": message, "messages": messages})
                .to_string(),
        )]),
        Err(e) => CallToolResult::error(vec![ContentBlock::text(e.to_string())]),
    }
}

fn base_body(ttl: Option<u64>, max: Option<u32>, metadata: Option<Value>) -> Value {
    let mut b = json!({});
    if let Some(t) = ttl {
        b["ttl_seconds"] = t.into();
    }
    if let Some(m) = max {
        b["max_retrievals"] = m.into();
    }
    if let Some(m) = metadata {
        b["metadata"] = m;
    }
    b
}

#[tool_router]
impl KubbiMcp {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        description = "Store one piece of content with a TTL and a retrieval limit; returns a claim URL to hand to the consumer (only the URL should travel)."
    )]
    async fn kubbi_send(&self, Parameters(a): Parameters<SendArgs>) -> CallToolResult {
        let mut body = base_body(a.ttl_seconds, a.max_retrievals, a.metadata);
        body["content"] = a.content;
        body["content_type"] = a.content_type.unwrap_or_else(|| "text/plain".into()).into();
        answer(self.client.create(&body, None).await)
    }

    #[tool(
        description = "Store a package of files (e.g. config + instructions + binary) delivered atomically; returns a claim URL."
    )]
    async fn kubbi_send_files(&self, Parameters(a): Parameters<SendFilesArgs>) -> CallToolResult {
        let mut body = base_body(a.ttl_seconds, a.max_retrievals, a.metadata);
        body["files"] = a
            .files
            .into_iter()
            .map(|f| {
                let mut v =
                    json!({"name": f.name, "content": f.content, "content_type": f.content_type});
                if let Some(r) = f.role {
                    v["role"] = r.into();
                }
                if let Some(e) = f.encoding {
                    v["encoding"] = e.into();
                }
                v
            })
            .collect::<Vec<_>>()
            .into();
        answer(self.client.create(&body, None).await)
    }

    #[tool(
        description = "Claim the payload behind a claim URL. Counts as a retrieval; the last allowed claim destroys it."
    )]
    async fn kubbi_claim(&self, Parameters(a): Parameters<ClaimArgs>) -> CallToolResult {
        answer(self.client.claim(&a.claim_url, None).await)
    }

    #[tool(
        description = "See what a claim URL holds (type, files, sizes, expiry, reads left) without consuming it."
    )]
    async fn kubbi_inspect(&self, Parameters(a): Parameters<ClaimArgs>) -> CallToolResult {
        answer(self.client.inspect(&a.claim_url).await)
    }

    #[tool(description = "Status and retrieval count of a kubbi you created.")]
    async fn kubbi_get(&self, Parameters(a): Parameters<IdArgs>) -> CallToolResult {
        answer(self.client.get(&a.id).await)
    }

    #[tool(
        description = "Delete a kubbi you created before it is claimed; its payload is wiped at once."
    )]
    async fn kubbi_delete(&self, Parameters(a): Parameters<IdArgs>) -> CallToolResult {
        answer(self.client.delete(&a.id).await)
    }
}

#[tool_handler]
impl ServerHandler for KubbiMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("kubbi", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "kubbi hands a payload from one actor to another through a claim URL. \
                 Send content (kubbi_send) or files (kubbi_send_files) with a TTL and a retrieval \
                 limit and pass on only the claim URL; the receiver inspects it (kubbi_inspect, \
                 free) and claims it (kubbi_claim, counts; the last allowed claim destroys it).",
            )
    }
}

/// Serves MCP on stdin/stdout until the client disconnects.
///
/// # Errors
/// When the transport fails.
pub async fn serve_stdio(client: Client) -> anyhow::Result<()> {
    let service = KubbiMcp::new(client)
        .serve(rmcp::transport::stdio())
        .await?;
    service.waiting().await?;
    Ok(())
}
