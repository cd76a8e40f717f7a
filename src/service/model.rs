//! What the service takes and returns: validated inputs and opened results.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::ids::ClaimToken;
use crate::state::KubbiRecord;

/// The role of a file in a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Instructions,
    Data,
    Context,
    Config,
    Attachment,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Instructions => "instructions",
            Self::Data => "data",
            Self::Context => "context",
            Self::Config => "config",
            Self::Attachment => "attachment",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "instructions" => Self::Instructions,
            "data" => Self::Data,
            "context" => Self::Context,
            "config" => Self::Config,
            "attachment" => Self::Attachment,
            _ => return None,
        })
    }
}

/// One file of a validated package.
pub struct FileInput {
    pub name: String,
    pub content_type: String,
    pub role: Option<Role>,
    pub content: Zeroizing<Vec<u8>>,
    /// Returned as UTF-8 text on claim (else base64).
    pub text: bool,
}

/// The payload of a validated create.
pub enum CreateBody {
    Single {
        content_type: String,
        /// UTF-8 text, or the JSON text for `application/json`.
        content: Zeroizing<Vec<u8>>,
    },
    Package {
        files: Vec<FileInput>,
    },
}

/// A validated create request.
pub struct CreateInput {
    pub ttl_seconds: u64,
    pub max_retrievals: Option<u32>,
    /// The `metadata` object serialized as JSON.
    pub metadata_json: Option<Vec<u8>>,
    pub body: CreateBody,
}

/// An `Idempotency-Key` on a create, with the hash of the body it came with.
pub struct CreateIdempotencyInput {
    pub key: String,
    pub body_hash: [u8; 32],
}

/// A kubbi as created (or as first created, for a replayed idempotent create).
pub struct Created {
    pub record: KubbiRecord,
    pub token: ClaimToken,
    pub replayed: bool,
}

/// One entry of a package's sealed manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub name: String,
    pub content_type: String,
    pub size_bytes: u64,
    pub role: Option<Role>,
    pub text: bool,
}

/// What a consumer may see without claiming.
pub struct Preview {
    pub record: KubbiRecord,
    /// The opened manifest of a package.
    pub files: Option<Vec<ManifestEntry>>,
}

/// The opened payload of a claim.
pub enum ClaimedContent {
    Single(Zeroizing<Vec<u8>>),
    Package(Vec<(ManifestEntry, Zeroizing<Vec<u8>>)>),
}

/// A successful claim, opened.
pub struct ClaimOutput {
    /// The record after this claim.
    pub record: KubbiRecord,
    pub content: ClaimedContent,
    pub burned: bool,
}

/// A page of a producer's kubbis.
pub struct ListPage {
    pub items: Vec<KubbiRecord>,
    pub total: u64,
}
