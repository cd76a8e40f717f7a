//! Node-to-node RPC: raft messages and forwarded operations, over HTTP/2 without TLS (h2c,
//! one multiplexed connection per peer) with bincode bodies.
//!
//! ```text
//!   node A                                   node B (internal port)
//!   Peers::post ──POST /internal/v1/...──▶   auth: cluster secret (constant-time)
//!     headers: from, from-incarnation,            identity: to == B, to-incarnation == B's
//!              to, to-incarnation                 ▼
//!                                            raft group / shard executor
//! ```
//!
//! Every request names the node it is meant for and the data directory (incarnation) the
//! sender believes that node has; a node restarted on a wiped data directory has another
//! incarnation and refuses, so it can never vote or accept entries as the old node. The server
//! side lives in `http::internal`.

pub mod messages;
pub mod raft_network;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use crate::codec::{decode, encode};

pub const H_FROM: &str = "x-kubbi-from";
pub const H_FROM_INCARNATION: &str = "x-kubbi-from-incarnation";
pub const H_TO: &str = "x-kubbi-to";
pub const H_TO_INCARNATION: &str = "x-kubbi-to-incarnation";

/// Asks a node to re-read the key table from the system group's leader now (after a
/// revocation); the reply is `true` once it has.
pub const KEYS_REFRESH_PATH: &str = "/internal/v1/keys/refresh";

/// Why a request to a peer failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TransportError {
    #[error("peer {0} unreachable: {1}")]
    Unreachable(u64, String),
    #[error("peer {0} timed out")]
    Timeout(u64),
    #[error("peer {peer} refused: HTTP {status}: {reason}")]
    Refused {
        peer: u64,
        status: u16,
        reason: String,
    },
    #[error("peer {0} sent an undecodable reply: {1}")]
    Decode(u64, String),
    #[error("no address known for node {0}")]
    NoAddress(u64),
}

/// What a node knows about its peers: internal address and incarnation.
#[derive(Default)]
pub struct AddressBook {
    nodes: RwLock<BTreeMap<u64, (String, u64)>>,
}

impl AddressBook {
    pub fn set(&self, id: u64, addr: &str, incarnation: u64) {
        let mut n = self.nodes.write().unwrap_or_else(|p| p.into_inner());
        let e = n.entry(id).or_insert_with(|| (String::new(), 0));
        if !addr.is_empty() {
            e.0 = addr.to_string();
        }
        if incarnation != 0 {
            e.1 = incarnation;
        }
    }

    pub fn get(&self, id: u64) -> Option<(String, u64)> {
        self.nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
            .filter(|(a, _)| !a.is_empty())
    }

    pub fn remove(&self, id: u64) {
        self.nodes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }
}

/// This node's identity on the internal network.
#[derive(Clone)]
pub struct Identity {
    pub node_id: u64,
    pub incarnation: u64,
}

/// The client side: sends requests to peers.
#[derive(Clone)]
pub struct Peers {
    http: reqwest::Client,
    secret: Arc<Zeroizing<String>>,
    me: Identity,
    book: Arc<AddressBook>,
}

impl Peers {
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(
        me: Identity,
        secret: Zeroizing<String>,
        book: Arc<AddressBook>,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .http2_prior_knowledge()
            .http2_keep_alive_interval(Duration::from_secs(5))
            .http2_keep_alive_timeout(Duration::from_secs(5))
            .http2_keep_alive_while_idle(true)
            .connect_timeout(Duration::from_secs(2))
            .no_proxy()
            .build()?;
        Ok(Self {
            http,
            secret: Arc::new(secret),
            me,
            book,
        })
    }

    pub fn book(&self) -> &Arc<AddressBook> {
        &self.book
    }

    pub fn me(&self) -> &Identity {
        &self.me
    }

    /// POSTs `body` to `path` on node `to` and decodes the reply.
    ///
    /// # Errors
    /// See [`TransportError`].
    pub async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        to: u64,
        path: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, TransportError> {
        self.post_bytes(to, path, encode(body), timeout).await
    }

    /// Like [`Peers::post`] with a body already encoded (retries reuse it).
    ///
    /// # Errors
    /// See [`TransportError`].
    pub async fn post_bytes<Resp: DeserializeOwned>(
        &self,
        to: u64,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Resp, TransportError> {
        let (addr, incarnation) = self.book.get(to).ok_or(TransportError::NoAddress(to))?;
        self.post_addr(to, &addr, incarnation, path, body, timeout)
            .await
    }

    /// POSTs to an explicit address (joining a cluster through a seed).
    ///
    /// # Errors
    /// See [`TransportError`].
    pub async fn post_addr<Resp: DeserializeOwned>(
        &self,
        to: u64,
        addr: &str,
        incarnation: u64,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Resp, TransportError> {
        let mut trace = reqwest::header::HeaderMap::new();
        crate::telemetry::inject(&mut trace);
        let resp = self
            .http
            .post(format!("http://{addr}{path}"))
            .headers(trace)
            .bearer_auth(self.secret.as_str())
            .header(H_FROM, self.me.node_id)
            .header(H_FROM_INCARNATION, self.me.incarnation)
            .header(H_TO, to)
            .header(H_TO_INCARNATION, incarnation)
            .header("content-type", "application/octet-stream")
            .body(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    TransportError::Timeout(to)
                } else {
                    TransportError::Unreachable(to, e.to_string())
                }
            })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| {
            if e.is_timeout() {
                TransportError::Timeout(to)
            } else {
                TransportError::Unreachable(to, e.to_string())
            }
        })?;
        if !status.is_success() {
            return Err(TransportError::Refused {
                peer: to,
                status: status.as_u16(),
                reason: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            });
        }
        decode("peer reply", &bytes).map_err(|e| TransportError::Decode(to, e.to_string()))
    }
}
