//! kubbi: a self-hosted claim-check service.
//!
//! A producer stores a payload with a TTL and a retrieval limit and gets a claim URL; a consumer
//! inspects and claims it; the last allowed claim burns it. Every state change goes through a
//! raft group (one per shard) whose log and state live in RocksDB; every live kubbi has a
//! virtual ractor actor on its shard's leader. See `DESIGN.md` in the steering repository and
//! the module docs, leaves first:
//! [`ids`], [`error`], [`crypto`], [`config`], [`codec`], [`clock`] → [`state`] (the pure core)
//! → [`storage`] → [`raft`] → [`shard`] → [`actor`] → [`service`] → [`http`] → [`node`].

// The fuzz build (nightly, sanitizer coverage) computes the layout of the deepest async
// handlers past the default query depth.
#![recursion_limit = "256"]

pub mod actor;
pub mod client;
pub mod clock;
pub mod codec;
pub mod config;
pub mod crypto;
pub mod error;
pub mod http;
pub mod ids;
pub mod mcp;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod service;
pub mod shard;
pub mod state;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod transport;

/// What the cargo-fuzz targets in `fuzz/` call that is otherwise private; not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::http::extract::{bearer, idempotency_key, json_body};
}
