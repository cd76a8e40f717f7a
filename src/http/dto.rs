//! Response bodies of the public API, shaped exactly as API.md describes.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::error::ApiError;
use crate::ids::format_millis;
use crate::service::{ClaimOutput, ClaimedContent, Created, ManifestEntry, Preview, Service};
use crate::state::{Body, KubbiRecord};

/// `201` body of a create.
#[derive(Serialize)]
pub struct CreatedResponse {
    pub id: String,
    pub claim_url: String,
    pub claim_token: String,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_size_bytes: Option<u64>,
    pub max_retrievals: Option<u32>,
    pub metadata: Option<Value>,
    pub created_at: String,
    pub expires_at: String,
}

impl CreatedResponse {
    pub fn new(c: &Created, metadata: Option<Value>, public_url: &str) -> Self {
        let token = c.token.expose();
        let (content_type, file_count, total_size_bytes) = body_fields(&c.record.body);
        Self {
            id: c.record.id.to_string(),
            claim_url: format!("{public_url}/r/{}", token.as_str()),
            claim_token: token.to_string(),
            status: "active",
            content_type,
            file_count,
            total_size_bytes,
            max_retrievals: c.record.max_retrievals,
            metadata,
            created_at: format_millis(c.record.created_at),
            expires_at: format_millis(c.record.expires_at),
        }
    }
}

fn body_fields(b: &Body) -> (Option<String>, Option<u32>, Option<u64>) {
    match b {
        Body::Single { content_type } => (Some(content_type.clone()), None, None),
        Body::Package {
            file_count,
            total_size_bytes,
        } => (None, Some(*file_count), Some(*total_size_bytes)),
    }
}

/// The item / detail shape: never content, file names or tokens.
#[derive(Serialize)]
pub struct Detail {
    pub id: String,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_size_bytes: Option<u64>,
    pub max_retrievals: Option<u32>,
    pub retrieval_count: u32,
    pub first_retrieved_at: Option<String>,
    pub last_retrieved_at: Option<String>,
    pub metadata: Option<Value>,
    pub created_at: String,
    pub expires_at: String,
}

impl Detail {
    /// # Errors
    /// When the metadata cannot be opened.
    /// `r.status` is shown as it is: reads stamp it with the leader's clock.
    pub fn new(r: &KubbiRecord, svc: &Service) -> Result<Self, ApiError> {
        let (content_type, file_count, total_size_bytes) = body_fields(&r.body);
        Ok(Self {
            id: r.id.to_string(),
            status: r.status.as_str(),
            content_type,
            file_count,
            total_size_bytes,
            max_retrievals: r.max_retrievals,
            retrieval_count: r.retrieval_count,
            first_retrieved_at: r.first_retrieved_at.map(format_millis),
            last_retrieved_at: r.last_retrieved_at.map(format_millis),
            metadata: svc.metadata(r)?,
            created_at: format_millis(r.created_at),
            expires_at: format_millis(r.expires_at),
        })
    }
}

#[derive(Serialize)]
pub struct Pagination {
    pub page: u64,
    pub limit: u64,
    pub total: u64,
    pub total_pages: u64,
}

#[derive(Serialize)]
pub struct ListResponse {
    pub kubbis: Vec<Detail>,
    pub pagination: Pagination,
}

/// How to claim, shown on a preview.
#[derive(Serialize)]
pub struct ClaimHint {
    pub url: String,
    pub method: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'static str>,
}

#[derive(Serialize)]
pub struct FileDescriptor {
    pub name: String,
    pub content_type: String,
    pub size_bytes: u64,
    pub role: Option<&'static str>,
}

impl From<&ManifestEntry> for FileDescriptor {
    fn from(e: &ManifestEntry) -> Self {
        Self {
            name: e.name.clone(),
            content_type: e.content_type.clone(),
            size_bytes: e.size_bytes,
            role: e.role.map(|r| r.as_str()),
        }
    }
}

/// A preview (`claim` present) or inspect (`claim` absent).
#[derive(Serialize)]
pub struct PreviewResponse {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubbi_id: Option<String>,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_size_bytes: Option<u64>,
    pub max_retrievals: Option<u32>,
    pub retrieval_count: u32,
    pub remaining_reads: Option<u32>,
    pub metadata: Option<Value>,
    pub created_at: String,
    pub expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<FileDescriptor>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim: Option<ClaimHint>,
}

impl PreviewResponse {
    /// # Errors
    /// When the metadata cannot be opened.
    pub fn new(p: &Preview, svc: &Service, claim_url: Option<String>) -> Result<Self, ApiError> {
        let r = &p.record;
        let (content_type, file_count, total_size_bytes) = body_fields(&r.body);
        let package = p.files.is_some();
        let claim = claim_url.map(|url| ClaimHint {
            url,
            method: "POST",
            description: (!package)
                .then_some("POST to this URL to retrieve the content; this counts as a retrieval"),
            message: package.then_some(
                "POST to this URL to retrieve all files at once; this counts as a retrieval",
            ),
        });
        Ok(Self {
            kind: package.then_some("kubbi_package"),
            kubbi_id: package.then(|| r.id.to_string()),
            status: r.status.as_str(),
            content_type,
            file_count,
            total_size_bytes,
            max_retrievals: r.max_retrievals,
            retrieval_count: r.retrieval_count,
            remaining_reads: r.remaining_reads(),
            metadata: svc.metadata(r)?,
            created_at: format_millis(r.created_at),
            expires_at: format_millis(r.expires_at),
            files: p
                .files
                .as_ref()
                .map(|f| f.iter().map(FileDescriptor::from).collect()),
            claim,
        })
    }
}

#[derive(Serialize)]
pub struct ClaimedFile {
    pub name: String,
    pub content_type: String,
    pub size_bytes: u64,
    pub role: Option<&'static str>,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoding: Option<&'static str>,
}

/// `200` body of a claim.
#[derive(Serialize)]
pub struct ClaimResponse {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<ClaimedFile>>,
    pub metadata: Option<Value>,
    pub created_at: String,
    pub expires_at: String,
    pub retrieval_count: u32,
    pub remaining_reads: Option<u32>,
    pub burned: bool,
}

impl ClaimResponse {
    /// # Errors
    /// When the metadata cannot be opened or stored JSON content does not parse.
    pub fn new(c: ClaimOutput, svc: &Service) -> Result<Self, ApiError> {
        let r = &c.record;
        let base = |kind, content, content_type, file_count, files| -> Result<Self, ApiError> {
            Ok(Self {
                kind,
                content,
                content_type,
                file_count,
                files,
                metadata: svc.metadata(r)?,
                created_at: format_millis(r.created_at),
                expires_at: format_millis(r.expires_at),
                retrieval_count: r.retrieval_count,
                remaining_reads: r.remaining_reads(),
                burned: c.burned,
            })
        };
        match (&r.body, &c.content) {
            (Body::Single { content_type }, ClaimedContent::Single(bytes)) => {
                let is_json = content_type
                    .split(';')
                    .next()
                    .is_some_and(|e| e.trim().eq_ignore_ascii_case("application/json"));
                let raw = if is_json {
                    let text =
                        String::from_utf8(bytes.to_vec()).map_err(|_| ApiError::internal())?;
                    RawValue::from_string(text).map_err(|_| ApiError::internal())?
                } else {
                    let s = std::str::from_utf8(bytes).map_err(|_| ApiError::internal())?;
                    serde_json::value::to_raw_value(s).map_err(|_| ApiError::internal())?
                };
                base(None, Some(raw), Some(content_type.clone()), None, None)
            }
            (Body::Package { file_count, .. }, ClaimedContent::Package(files)) => {
                let files = files
                    .iter()
                    .map(|(e, bytes)| {
                        let text = e.text.then(|| std::str::from_utf8(bytes).ok()).flatten();
                        ClaimedFile {
                            name: e.name.clone(),
                            content_type: e.content_type.clone(),
                            size_bytes: e.size_bytes,
                            role: e.role.map(|r| r.as_str()),
                            content: match text {
                                Some(t) => t.to_string(),
                                None => STANDARD.encode(&bytes[..]),
                            },
                            encoding: text.is_none().then_some("base64"),
                        }
                    })
                    .collect();
                base(
                    Some("kubbi_package"),
                    None,
                    None,
                    Some(*file_count),
                    Some(files),
                )
            }
            _ => Err(ApiError::internal()),
        }
    }
}
