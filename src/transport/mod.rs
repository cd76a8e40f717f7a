//! Node-to-node RPC with bincode bodies, plaintext or mutual TLS when the node has
//! `--internal-tls-*` (see `tls`). Raft messages, forwarded operations and liveness pings go
//! over node-pair streams ([`Peers::call`], see [`stream`]), authenticated once per connection;
//! joins, status, the shard map and key refreshes are HTTP/2 requests ([`Peers::post`]). Each
//! peer gets two connections of each: one for small messages (votes, heartbeats, appends of
//! small entries, forwarded operations) and one for bodies of [`BULK_BODY_BYTES`] or more
//! (appends of large payloads, snapshot chunks) and replies that may be large, so a vote or
//! heartbeat never queues in a TCP buffer behind megabytes of payload.
//!
//! ```text
//!   node A                                   node B (internal port)
//!   Peers::call ──stream (hello once)───▶    [mTLS: client cert chains to the CA]
//!   Peers::post ──POST /internal/v1/...──▶   auth: cluster secret (constant-time)
//!     hello / headers: from,                      identity: to == B, to-incarnation == B's
//!       from-incarnation, to, to-incarnation      ▼
//!                                            raft group / shard executor
//! ```
//!
//! Every request names the node it is meant for and the data directory (incarnation) the
//! sender believes that node has; a node restarted on a wiped data directory has another
//! incarnation and refuses, so it can never vote or accept entries as the old node. The server
//! side lives in `http::internal`.

pub mod messages;
pub mod raft_network;
pub mod stream;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use crate::codec::{decode, encode};

pub const H_FROM: &str = "x-kubbi-from";
pub const H_FROM_INCARNATION: &str = "x-kubbi-from-incarnation";
pub const H_TO: &str = "x-kubbi-to";
pub const H_TO_INCARNATION: &str = "x-kubbi-to-incarnation";
pub const H_PROTOCOL: &str = "x-kubbi-proto";

/// The version of the internal protocol (raft messages, forwarded operations, their encoding).
/// Peers must speak the same one: a node refuses requests of any other (`http::internal`), so
/// a node left on an older build is told so instead of feeding messages it cannot decode.
/// Version 1 sent no header; 2 added the logical shard to claims and token reads; 3 applies
/// creates differently (a retried create is answered from its kubbi record, which keeps no
/// request-dedup record and is purged no earlier than the dedup window), so replicas of builds
/// 2 and 3 would hold different state for the same log. 4 applies every entry at the group's
/// time (never before an earlier entry that changed state, key `m`), so 3 and 4 would decide
/// expiry differently for the same log. 5 adds liveness pings that stand in for the heartbeats
/// of quiet groups (`raft::quiet`): a node of 4 would take a quiet leader's silence for its
/// death and depose it. 6 adds the split's fence with its voters and the `Moved`/`NotOwned`
/// answers of a forwarded operation. 7 adds the shard map's pinned groups
/// (`GroupState::Placed`), which a node of 6 cannot decode from the system group's log, and
/// runs a data group only where the map places it (a node of 6 runs every group everywhere).
/// 8 applies creates and claims in key layout 3 (no token index entry for an id the token
/// names, claims remembered in the record), so replicas of 7 and 8 would hold different state.
/// 9 carries raft messages, forwarded operations and liveness pings on node-pair streams
/// (`stream`) instead of HTTP/2 requests, which a node of 8 does not serve.
pub const PROTOCOL: u32 = 9;

/// Asks a node to re-read the key table from the system group's leader now (after a
/// revocation); the reply is `true` once it has.
pub const KEYS_REFRESH_PATH: &str = "/internal/v1/keys/refresh";

/// Bodies this large or larger go over the peer's bulk connection.
pub const BULK_BODY_BYTES: usize = 256 << 10;

/// Which of a peer's two connections a request takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// The bulk connection for a body of [`BULK_BODY_BYTES`] or more, else the other.
    BySize,
    /// The bulk connection: for a request whose reply may be large.
    Bulk,
}

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
    /// Peers dialed somewhere else than the address they advertise (`--peer-routes`).
    routes: BTreeMap<u64, String>,
}

impl AddressBook {
    /// A book that dials the peers in `routes` at the address given there, whatever address
    /// they advertise (a proxy on the path: the region simulator's links).
    pub fn with_routes(routes: BTreeMap<u64, String>) -> Self {
        Self {
            routes,
            ..Self::default()
        }
    }

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
            .filter(|(a, _)| !a.is_empty())
            .map(|(a, inc)| (self.routes.get(&id).unwrap_or(a).clone(), *inc))
    }

    /// The incarnation known for node `id` (0: not yet known), as [`AddressBook::get`] has
    /// it, without copying the address.
    pub fn incarnation(&self, id: u64) -> Option<u64> {
        self.nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .filter(|(a, _)| !a.is_empty())
            .map(|(_, inc)| *inc)
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

/// The HTTP/2 client of the internal port: plaintext (prior knowledge) or mutual TLS.
#[derive(Clone)]
enum Http {
    Plain(Client<HttpConnector, Full<Bytes>>),
    Tls(Client<HttpsConnector<HttpConnector>, Full<Bytes>>),
}

impl Http {
    fn new(tls: Option<rustls::ClientConfig>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_nodelay(true);
        connector.enforce_http(tls.is_none());
        let mut b = Client::builder(TokioExecutor::new());
        b.http2_only(true)
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_keep_alive_interval(Duration::from_secs(5))
            .http2_keep_alive_timeout(Duration::from_secs(5))
            .http2_keep_alive_while_idle(true);
        match tls {
            None => Self::Plain(b.build(connector)),
            Some(config) => Self::Tls(
                b.build(
                    hyper_rustls::HttpsConnectorBuilder::new()
                        .with_tls_config(config)
                        .https_only()
                        .enable_http2()
                        .wrap_connector(connector),
                ),
            ),
        }
    }

    fn scheme(&self) -> &'static str {
        match self {
            Self::Plain(_) => "http",
            Self::Tls(_) => "https",
        }
    }

    async fn request(
        &self,
        req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        match self {
            Self::Plain(c) => c.request(req).await,
            Self::Tls(c) => c.request(req).await,
        }
    }
}

/// An error with its causes, `a: b: c` (hyper's own message alone says little).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// The client side: sends requests to peers.
#[derive(Clone)]
pub struct Peers {
    http: Http,
    /// A second client, so a second connection per peer: for bodies of [`BULK_BODY_BYTES`] or
    /// more.
    bulk: Http,
    secret: Arc<Zeroizing<String>>,
    me: Identity,
    book: Arc<AddressBook>,
    rpcs: Arc<RaftRpcCounts>,
    /// The node-pair streams: raft messages, forwarded operations, liveness pings.
    streams: Arc<stream::Dialer>,
}

/// Raft RPCs this node has sent, by kind (`kubbi_raft_rpcs_total{kind}`): what quiet groups
/// and batching save is counted here.
#[derive(Debug, Default)]
pub struct RaftRpcCounts {
    counts: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl RaftRpcCounts {
    pub fn count(&self, kind: &'static str) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind)
            .or_insert(0) += 1;
    }

    /// Every kind sent so far, with its count.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, n)| (*k, *n))
            .collect()
    }
}

impl Peers {
    /// A client that speaks h2c, or, with `tls` (see `tls::ReloadingTls::client_config`),
    /// HTTP/2 over mutual TLS.
    pub fn new(
        me: Identity,
        secret: Zeroizing<String>,
        book: Arc<AddressBook>,
        tls: Option<rustls::ClientConfig>,
    ) -> Self {
        let secret = Arc::new(secret);
        Self {
            bulk: Http::new(tls.clone()),
            streams: Arc::new(stream::Dialer::new(me.clone(), secret.clone(), tls.clone())),
            http: Http::new(tls),
            secret,
            me,
            book,
            rpcs: Arc::default(),
        }
    }

    pub fn book(&self) -> &Arc<AddressBook> {
        &self.book
    }

    /// What this node's node-pair streams did.
    pub fn stream_stats(&self) -> &stream::StreamStats {
        self.streams.stats()
    }

    /// The raft RPCs sent through this client, by kind.
    pub fn raft_rpcs(&self) -> &Arc<RaftRpcCounts> {
        &self.rpcs
    }

    pub fn me(&self) -> &Identity {
        &self.me
    }

    /// Sends `body` (encoded) to node `to` as `call` over the node-pair stream, on the
    /// connection `lane` picks, and decodes the reply.
    ///
    /// # Errors
    /// See [`TransportError`].
    pub async fn call<Resp: DeserializeOwned>(
        &self,
        to: u64,
        call: stream::Call,
        body: &[u8],
        timeout: Duration,
        lane: Lane,
    ) -> Result<Resp, TransportError> {
        let (addr, incarnation) = self.book.get(to).ok_or(TransportError::NoAddress(to))?;
        let bulk = lane == Lane::Bulk || body.len() >= BULK_BODY_BYTES;
        // Only a forwarded operation has a span on the other side to continue.
        let trace = if matches!(call, stream::Call::Shard(_)) {
            stream::trace_context()
        } else {
            Vec::new()
        };
        let (status, bytes) = self
            .streams
            .call(to, &addr, incarnation, call, &trace, body, timeout, bulk)
            .await?;
        answer(to, status, &bytes)
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
        self.post_bytes(to, path, encode(body), timeout, Lane::BySize)
            .await
    }

    /// Like [`Peers::post`] with a body already encoded (retries reuse it), over the connection
    /// `lane` picks.
    ///
    /// # Errors
    /// See [`TransportError`].
    pub async fn post_bytes<Resp: DeserializeOwned>(
        &self,
        to: u64,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
        lane: Lane,
    ) -> Result<Resp, TransportError> {
        let (addr, incarnation) = self.book.get(to).ok_or(TransportError::NoAddress(to))?;
        self.send(to, &addr, incarnation, path, body, timeout, lane)
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
        self.send(to, addr, incarnation, path, body, timeout, Lane::BySize)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn send<Resp: DeserializeOwned>(
        &self,
        to: u64,
        addr: &str,
        incarnation: u64,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
        lane: Lane,
    ) -> Result<Resp, TransportError> {
        let client = if lane == Lane::Bulk || body.len() >= BULK_BODY_BYTES {
            &self.bulk
        } else {
            &self.http
        };
        let mut req = http::Request::post(format!("{}://{addr}{path}", client.scheme()))
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.secret.as_str()),
            )
            .header(H_FROM, self.me.node_id)
            .header(H_FROM_INCARNATION, self.me.incarnation)
            .header(H_TO, to)
            .header(H_TO_INCARNATION, incarnation)
            .header(H_PROTOCOL, PROTOCOL)
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| TransportError::Unreachable(to, format!("bad address {addr}: {e}")))?;
        crate::telemetry::inject(req.headers_mut());
        let exchange = async {
            let resp = client
                .request(req)
                .await
                .map_err(|e| TransportError::Unreachable(to, chain(&e)))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| TransportError::Unreachable(to, chain(&e)))?
                .to_bytes();
            Ok::<_, TransportError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| TransportError::Timeout(to))??;
        answer(to, status.as_u16(), &bytes)
    }
}

/// A peer's answer, HTTP or stream: the decoded reply of a 2xx, else its refusal with the
/// start of its reason.
fn answer<Resp: DeserializeOwned>(
    to: u64,
    status: u16,
    bytes: &[u8],
) -> Result<Resp, TransportError> {
    if !(200..300).contains(&status) {
        return Err(TransportError::Refused {
            peer: to,
            status,
            reason: String::from_utf8_lossy(bytes).chars().take(200).collect(),
        });
    }
    decode("peer reply", bytes).map_err(|e| TransportError::Decode(to, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_routed_peer_is_dialed_at_its_route_and_keeps_its_incarnation() {
        let book = AddressBook::with_routes(BTreeMap::from([(2, "127.0.0.1:7801".to_string())]));
        assert_eq!(
            book.get(2),
            None,
            "a route alone does not make a peer known"
        );
        book.set(2, "10.0.0.2:7070", 5);
        book.set(3, "10.0.0.3:7070", 6);
        assert_eq!(book.get(2), Some(("127.0.0.1:7801".into(), 5)));
        assert_eq!(book.get(3), Some(("10.0.0.3:7070".into(), 6)));
        assert_eq!(book.incarnation(2), Some(5));
    }
}
