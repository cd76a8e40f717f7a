//! The node-pair stream: the connections that carry raft messages, forwarded operations and
//! liveness pings between two nodes, framed by hand instead of one HTTP/2 request each.
//!
//! A node keeps two of them to each peer, as it did HTTP/2 connections: one for small messages
//! and one for bodies of [`super::BULK_BODY_BYTES`] or more and replies that may be large, so a
//! vote never waits behind megabytes. A connection is authenticated once, when it opens: the
//! client's hello carries the cluster secret, the protocol version and both identities
//! (`http::internal::admit` checks them as it checks every HTTP request's headers). After that,
//! every frame is a request or its reply, matched by id, so any number are in flight at once;
//! each side writes whatever is queued in one `write` (every group's messages to that peer, a
//! burst of replies), which is what a node pays per message on HTTP/2 several times over.
//!
//! ```text
//!   client                                     server (the internal port)
//!   MAGIC | u32 len | Hello (bincode)  ──▶      admit, or refuse and close
//!                                      ◀──      reply frame id 0: 200, or status + reason
//!   u32 len | u64 id | u8 call | u16 group | u16 trace len | trace | body   ──▶
//!                                      ◀──      u32 len | u64 id | u16 status | body
//! ```
//!
//! Integers are little endian; `len` counts the bytes after it. The internal port tells a
//! stream from HTTP/2 by its first byte (plaintext: [`MAGIC`] starts with `K`, the HTTP/2
//! preface with `P`) or by ALPN under TLS ([`ALPN`]).
//!
//! A connection is dropped, failing what waits on it, when it breaks, when the peer's address
//! or incarnation changes, or when requests have waited [`SILENT_TICKS`] seconds without a
//! single frame from the peer, not even the answer to a ping (a paused or cut-off peer, which
//! TCP alone would take minutes to notice); the next request opens a new one. A request that
//! is merely slow (a create waiting for its quorum) keeps its connection: the peer answers the
//! pings sent meanwhile.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};
use zeroize::Zeroizing;

use super::{Identity, TransportError};
use crate::codec::{decode, encode};
use crate::ids::GroupId;

/// The first bytes of a plaintext stream connection.
pub const MAGIC: [u8; 8] = *b"KUBBI/S1";

/// The ALPN protocol of a stream connection under TLS.
pub const ALPN: &[u8] = b"kubbi-stream/1";

/// The largest hello accepted.
const MAX_HELLO: usize = 16 << 10;

/// The largest request frame a server reads: the HTTP body limit of the internal port, plus
/// room for the frame's header.
const MAX_REQUEST: usize = (64 << 20) + (64 << 10);

/// The largest reply frame a client reads (a forwarded claim carries a whole payload).
const MAX_REPLY: usize = 1 << 30;

/// How long a connection may take to open and be admitted.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Seconds in a row with requests waiting and no frame from the peer before the connection is
/// dropped.
const SILENT_TICKS: u32 = 6;

/// Requests one connection may have in progress on a server at once; past it, a request is
/// answered `503` at once (pings still are), so a peer cannot pile up unbounded work.
const MAX_IN_FLIGHT: usize = 1024;

/// Queued frames written in one go, up to this many bytes; a frame this large or larger is
/// written on its own, not copied.
const COALESCE_BYTES: usize = 64 << 10;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Append(GroupId),
    Vote(GroupId),
    PreVote(GroupId),
    Transfer(GroupId),
    /// One part of a snapshot.
    Snapshot(GroupId),
    /// A forwarded operation ([`super::messages::ShardOp`]).
    Shard(GroupId),
    /// The sender's liveness ping ([`super::messages::Liveness`]).
    Liveness,
}

impl Call {
    fn tag_and_group(self) -> (u8, GroupId) {
        match self {
            Self::Append(g) => (1, g),
            Self::Vote(g) => (2, g),
            Self::PreVote(g) => (3, g),
            Self::Transfer(g) => (4, g),
            Self::Snapshot(g) => (5, g),
            Self::Shard(g) => (6, g),
            Self::Liveness => (7, 0),
        }
    }

    fn from_tag(tag: u8, g: GroupId) -> Option<Self> {
        Some(match tag {
            1 => Self::Append(g),
            2 => Self::Vote(g),
            3 => Self::PreVote(g),
            4 => Self::Transfer(g),
            5 => Self::Snapshot(g),
            6 => Self::Shard(g),
            7 => Self::Liveness,
            _ => return None,
        })
    }
}

/// What a client says when it opens a connection. Its layout is fixed for [`MAGIC`]: a later
/// protocol that needs another hello changes the magic.
#[derive(Serialize, Deserialize)]
pub struct Hello {
    /// The cluster secret.
    #[serde(with = "serde_bytes")]
    pub secret: Vec<u8>,
    /// The sender's [`super::PROTOCOL`].
    pub protocol: u32,
    pub from: u64,
    pub from_incarnation: u64,
    pub to: u64,
    /// The incarnation the sender believes the receiver has (0: unknown).
    pub to_incarnation: u64,
}

impl Drop for Hello {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.secret);
    }
}

/// The sender of a connection's requests, as its hello named it.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub id: u64,
    pub incarnation: u64,
}

/// A server's answer to one request (or to a hello): an HTTP-like status and a body, the
/// encoded reply for 200 and a reason otherwise.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn ok(body: Vec<u8>) -> Self {
        Self { status: 200, body }
    }

    pub fn refuse(status: u16, why: &str) -> Self {
        Self {
            status,
            body: why.as_bytes().to_vec(),
        }
    }
}

/// The server side: what the internal port does with a connection's hello and requests.
pub trait Handler: Send + Sync + 'static {
    /// Admits a connection, or says why not (status and reason).
    ///
    /// # Errors
    /// The refusal sent back before the connection is closed.
    fn admit(&self, hello: &Hello) -> Result<(), Answer>;

    /// Answers one request. `trace` is the request's trace context, as header pairs.
    fn handle(
        self: Arc<Self>,
        peer: Peer,
        call: Call,
        trace: Vec<(String, String)>,
        body: Bytes,
    ) -> impl Future<Output = Answer> + Send + 'static;
}

fn frame_len(len: usize) -> [u8; 4] {
    u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes()
}

/// A request frame of a call's `(tag, group)` (or a [`PING`]'s).
fn request_frame(id: u64, (tag, group): (u8, GroupId), trace: &[u8], body: &[u8]) -> Vec<u8> {
    let trace_len = u16::try_from(trace.len()).unwrap_or(0);
    let trace = &trace[..usize::from(trace_len)];
    let len = 8 + 1 + 2 + 2 + trace.len() + body.len();
    let mut f = Vec::with_capacity(4 + len);
    f.extend_from_slice(&frame_len(len));
    f.extend_from_slice(&id.to_le_bytes());
    f.push(tag);
    f.extend_from_slice(&group.to_le_bytes());
    f.extend_from_slice(&trace_len.to_le_bytes());
    f.extend_from_slice(trace);
    f.extend_from_slice(body);
    f
}

/// The tag of a ping: the server answers it at once, with an empty 200 of the same id.
const PING: u8 = 0;

/// A client's ping, sent while requests wait and the peer has been silent for a second: its
/// answer shows the peer is there and reading, however long its requests take.
fn ping_frame() -> Vec<u8> {
    request_frame(0, (PING, 0), b"", b"")
}

fn reply_frame(id: u64, a: &Answer) -> Vec<u8> {
    let len = 8 + 2 + a.body.len();
    let mut f = Vec::with_capacity(4 + len);
    f.extend_from_slice(&frame_len(len));
    f.extend_from_slice(&id.to_le_bytes());
    f.extend_from_slice(&a.status.to_le_bytes());
    f.extend_from_slice(&a.body);
    f
}

/// Reads one frame's bytes (after its length), refusing one longer than `max`. `None` at a
/// clean end of the stream.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> std::io::Result<Option<Bytes>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes, over the limit of {max}"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(Some(Bytes::from(buf)))
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

/// A reply frame: id, status, body.
fn parse_reply(f: &Bytes) -> std::io::Result<(u64, u16, Bytes)> {
    if f.len() < 10 {
        return Err(invalid("a reply frame shorter than its header"));
    }
    let id = u64::from_le_bytes(f[..8].try_into().unwrap_or_default());
    let status = u16::from_le_bytes([f[8], f[9]]);
    Ok((id, status, f.slice(10..)))
}

/// A request frame: id, call tag and group, trace bytes, body.
fn parse_request(f: &Bytes) -> std::io::Result<(u64, (u8, GroupId), Bytes, Bytes)> {
    if f.len() < 13 {
        return Err(invalid("a request frame shorter than its header"));
    }
    let id = u64::from_le_bytes(f[..8].try_into().unwrap_or_default());
    let call = (f[8], u16::from_le_bytes([f[9], f[10]]));
    let trace_len = usize::from(u16::from_le_bytes([f[11], f[12]]));
    if f.len() < 13 + trace_len {
        return Err(invalid("a request frame shorter than its trace"));
    }
    Ok((
        id,
        call,
        f.slice(13..13 + trace_len),
        f.slice(13 + trace_len..),
    ))
}

/// Writes what `queue` holds, coalescing queued frames into one write, until the queue closes
/// or a write fails. `tick` is called once a second: it may end the loop with an error or
/// give a frame to write.
async fn write_loop<W: AsyncWrite + Unpin>(
    w: &mut W,
    queue: &mut mpsc::UnboundedReceiver<Vec<u8>>,
    mut tick: impl FnMut() -> Result<Option<Vec<u8>>, String>,
) -> Result<(), String> {
    let mut buf: Vec<u8> = Vec::with_capacity(COALESCE_BYTES);
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            f = queue.recv() => match f {
                Some(f) => f,
                None => return Ok(()),
            },
            _ = every.tick() => match tick()? {
                Some(f) => f,
                None => continue,
            }
        };
        let mut next = Some(first);
        while let Some(f) = next.take() {
            if f.len() >= COALESCE_BYTES {
                if !buf.is_empty() {
                    w.write_all(&buf).await.map_err(|e| e.to_string())?;
                    buf.clear();
                }
                w.write_all(&f).await.map_err(|e| e.to_string())?;
            } else {
                buf.extend_from_slice(&f);
            }
            if buf.len() < COALESCE_BYTES {
                next = queue.try_recv().ok();
            }
        }
        if !buf.is_empty() {
            w.write_all(&buf).await.map_err(|e| e.to_string())?;
            buf.clear();
        }
        w.flush().await.map_err(|e| e.to_string())?;
    }
}

/// Serves one stream connection whose first bytes (the magic) are still unread, until it ends
/// or `stop` changes.
pub async fn serve<S, H>(io: S, handler: Arc<H>, stop: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    H: Handler,
{
    serve_bounded(io, handler, stop, MAX_IN_FLIGHT).await;
}

async fn serve_bounded<S, H>(
    io: S,
    handler: Arc<H>,
    mut stop: watch::Receiver<bool>,
    max_in_flight: usize,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    H: Handler,
{
    let (rd, mut wr) = tokio::io::split(io);
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    let opened = async {
        let mut magic = [0u8; 8];
        rd.read_exact(&mut magic).await?;
        if magic != MAGIC {
            return Err(invalid("not a kubbi stream"));
        }
        let hello = read_frame(&mut rd, MAX_HELLO)
            .await?
            .ok_or_else(|| invalid("closed before its hello"))?;
        decode::<Hello>("stream hello", &hello).map_err(|e| invalid(&e.to_string()))
    };
    let hello = tokio::select! {
        h = tokio::time::timeout(HANDSHAKE_TIMEOUT, opened) => match h {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "internal stream closed before it was admitted");
                return;
            }
            Err(_) => {
                tracing::debug!("internal stream sent no hello in time");
                return;
            }
        },
        _ = stop.changed() => return,
    };
    let peer = Peer {
        id: hello.from,
        incarnation: hello.from_incarnation,
    };
    let (answer, admitted) = match handler.admit(&hello) {
        Ok(()) => (Answer::ok(Vec::new()), true),
        Err(refusal) => (refusal, false),
    };
    drop(hello);
    if wr.write_all(&reply_frame(0, &answer)).await.is_err() || wr.flush().await.is_err() {
        return;
    }
    if !admitted {
        let _ = wr.shutdown().await;
        return;
    }
    let (out, mut queue) = mpsc::unbounded_channel::<Vec<u8>>();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    let writer = async move {
        if let Err(e) = write_loop(&mut wr, &mut queue, || Ok(None)).await {
            tracing::debug!(peer = peer.id, error = %e, "internal stream write failed");
        }
    };
    let reader = async move {
        loop {
            let f = match read_frame(&mut rd, MAX_REQUEST).await {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(peer = peer.id, error = %e, "internal stream read failed");
                    return;
                }
            };
            let (id, call, trace, body) = match parse_request(&f) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(peer = peer.id, error = %e, "undecodable internal stream frame");
                    return;
                }
            };
            drop(f);
            if call.0 == PING {
                let _ = out.send(reply_frame(id, &Answer::ok(Vec::new())));
                continue;
            }
            let Some(call) = Call::from_tag(call.0, call.1) else {
                let _ = out.send(reply_frame(id, &Answer::refuse(404, "no such call")));
                continue;
            };
            let trace = if trace.is_empty() {
                Vec::new()
            } else {
                decode("trace context", &trace).unwrap_or_default()
            };
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                let busy = Answer::refuse(503, "too many requests in progress on this connection");
                let _ = out.send(reply_frame(id, &busy));
                continue;
            };
            let (handler, out) = (handler.clone(), out.clone());
            tokio::spawn(async move {
                let a = handler.handle(peer, call, trace, body).await;
                let _ = out.send(reply_frame(id, &a));
                drop(permit);
            });
        }
    };
    // The reader ends at the peer's end of stream; replies still being computed hold the
    // queue open, and the writer sends them before it ends.
    let both = async {
        tokio::join!(reader, writer);
    };
    tokio::select! {
        () = both => {}
        _ = stop.changed() => {}
    }
}

/// Why a connection failed, for every request that waited on it.
#[derive(Debug, Clone)]
enum Failure {
    /// The peer refused the hello: status and reason.
    Refused(u16, String),
    Broken(String),
}

impl Failure {
    fn error(&self, peer: u64) -> TransportError {
        match self {
            Self::Refused(status, reason) => TransportError::Refused {
                peer,
                status: *status,
                reason: reason.clone(),
            },
            Self::Broken(why) => TransportError::Unreachable(peer, why.clone()),
        }
    }
}

type Waiter = oneshot::Sender<Result<(u16, Bytes), Failure>>;

/// What a node's streams to its peers did (`/metrics`).
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Connections admitted by their peer.
    pub opened: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections that could not be opened or broke: peer unreachable or silent, an error.
    pub broken: AtomicU64,
    /// Hellos the peer refused (secret, protocol version, identity).
    pub refused: AtomicU64,
}

/// One open (or opening) connection to a peer.
struct Conn {
    addr: String,
    incarnation: u64,
    queue: mpsc::UnboundedSender<Vec<u8>>,
    pending: Mutex<HashMap<u64, Waiter>>,
    next_id: AtomicU64,
    /// Reply frames received so far (the silence check compares it from tick to tick).
    heard: AtomicU64,
    failed: OnceLock<Failure>,
    /// Set once failed: the connection's task ends.
    closed: watch::Sender<bool>,
    stats: Arc<StreamStats>,
}

impl Conn {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails the connection: every request waiting on it now, and every later one.
    fn fail(&self, f: Failure) {
        let _ = self.failed.set(f);
        let f = self
            .failed
            .get()
            .cloned()
            .unwrap_or(Failure::Broken(String::new()));
        let waiting: Vec<Waiter> = self.pending().drain().map(|(_, w)| w).collect();
        for w in waiting {
            let _ = w.send(Err(f.clone()));
        }
        self.closed.send_replace(true);
    }
}

/// The client side: a node's connections to its peers, opened on first use.
pub struct Dialer {
    me: Identity,
    secret: Arc<Zeroizing<String>>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// By (peer, bulk lane).
    conns: Mutex<HashMap<(u64, bool), Arc<Conn>>>,
    stats: Arc<StreamStats>,
}

impl Dialer {
    /// A dialer that opens plaintext connections, or mutual TLS ones with `tls` (ALPN is set
    /// here).
    pub fn new(
        me: Identity,
        secret: Arc<Zeroizing<String>>,
        tls: Option<rustls::ClientConfig>,
    ) -> Self {
        let tls = tls.map(|mut c| {
            c.alpn_protocols = vec![ALPN.to_vec()];
            Arc::new(c)
        });
        Self {
            me,
            secret,
            tls,
            conns: Mutex::default(),
            stats: Arc::default(),
        }
    }

    /// What this node's streams did so far.
    pub fn stats(&self) -> &StreamStats {
        &self.stats
    }

    fn conn(&self, to: u64, addr: &str, incarnation: u64, bulk: bool) -> Arc<Conn> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = conns.get(&(to, bulk)) {
            if c.failed.get().is_none() && c.addr == addr && c.incarnation == incarnation {
                return c.clone();
            }
            // Broken, or the peer moved or was replaced: what waits on the old one fails.
            c.fail(Failure::Broken(format!(
                "connection to {} replaced",
                c.addr
            )));
        }
        let (queue, rx) = mpsc::unbounded_channel();
        let conn = Arc::new(Conn {
            addr: addr.to_string(),
            incarnation,
            queue,
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            heard: AtomicU64::new(0),
            failed: OnceLock::new(),
            closed: watch::Sender::new(false),
            stats: self.stats.clone(),
        });
        let hello = Hello {
            secret: self.secret.as_bytes().to_vec(),
            protocol: super::PROTOCOL,
            from: self.me.node_id,
            from_incarnation: self.me.incarnation,
            to,
            to_incarnation: incarnation,
        };
        let mut opening = Zeroizing::new(MAGIC.to_vec());
        let h = Zeroizing::new(encode(&hello));
        opening.extend_from_slice(&frame_len(h.len()));
        opening.extend_from_slice(&h);
        tokio::spawn(run(conn.clone(), rx, opening, self.tls.clone()));
        conns.insert((to, bulk), conn.clone());
        conn
    }

    /// Sends one request to node `to` at `addr` (believed to have `incarnation`) and waits
    /// for its reply: status and body.
    ///
    /// # Errors
    /// The connection could not be opened, was refused or broke, or no reply came within
    /// `timeout`.
    #[allow(clippy::too_many_arguments)]
    pub async fn call(
        &self,
        to: u64,
        addr: &str,
        incarnation: u64,
        call: Call,
        trace: &[u8],
        body: &[u8],
        timeout: Duration,
        bulk: bool,
    ) -> Result<(u16, Bytes), TransportError> {
        let conn = self.conn(to, addr, incarnation, bulk);
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending().insert(id, tx);
        // `fail` marks the connection failed before it drains: a request added after the
        // drain sees the mark.
        if let Some(f) = conn.failed.get() {
            conn.pending().remove(&id);
            return Err(f.error(to));
        }
        if conn
            .queue
            .send(request_frame(id, call.tag_and_group(), trace, body))
            .is_err()
        {
            conn.pending().remove(&id);
            return Err(TransportError::Unreachable(to, "connection closed".into()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(r))) => Ok(r),
            Ok(Ok(Err(f))) => Err(f.error(to)),
            Ok(Err(_)) => Err(TransportError::Unreachable(to, "connection closed".into())),
            Err(_) => {
                conn.pending().remove(&id);
                Err(TransportError::Timeout(to))
            }
        }
    }
}

/// Opens `conn` (TCP, TLS if configured, the hello), then writes its queue and reads its
/// replies until it fails.
async fn run(
    conn: Arc<Conn>,
    queue: mpsc::UnboundedReceiver<Vec<u8>>,
    opening: Zeroizing<Vec<u8>>,
    tls: Option<Arc<rustls::ClientConfig>>,
) {
    let mut closed = conn.closed.subscribe();
    let connect = async {
        let tcp = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(conn.addr.as_str()),
        )
        .await
        .map_err(|_| Failure::Broken(format!("connecting to {} timed out", conn.addr)))?
        .map_err(|e| Failure::Broken(format!("connecting to {}: {e}", conn.addr)))?;
        let _ = tcp.set_nodelay(true);
        Ok::<_, Failure>(tcp)
    };
    let outcome = async {
        let tcp = connect.await?;
        match tls {
            None => drive(&conn, queue, &opening, tcp).await,
            Some(config) => {
                let host = host_of(&conn.addr);
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| Failure::Broken(format!("bad host name {host}: {e}")))?;
                let tls = tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    tokio_rustls::TlsConnector::from(config).connect(name, tcp),
                )
                .await
                .map_err(|_| Failure::Broken("TLS handshake timed out".into()))?
                .map_err(|e| Failure::Broken(format!("TLS handshake: {e}")))?;
                drive(&conn, queue, &opening, tls).await
            }
        }
    };
    let failure = tokio::select! {
        f = outcome => f.err().unwrap_or_else(|| Failure::Broken("connection ended".into())),
        _ = closed.wait_for(|c| *c) => Failure::Broken("connection closed".into()),
    };
    if !matches!(failure, Failure::Broken(ref w) if w == "connection closed") {
        tracing::debug!(addr = %conn.addr, failure = ?failure, "internal stream failed");
    }
    match failure {
        Failure::Refused(..) => conn.stats.refused.fetch_add(1, Ordering::Relaxed),
        Failure::Broken(_) => conn.stats.broken.fetch_add(1, Ordering::Relaxed),
    };
    conn.fail(failure);
}

/// The host part of `host:port` (brackets of an IPv6 address removed).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

async fn drive<S: AsyncRead + AsyncWrite + Send + Unpin>(
    conn: &Conn,
    mut queue: mpsc::UnboundedReceiver<Vec<u8>>,
    opening: &[u8],
    io: S,
) -> Result<(), Failure> {
    let (rd, mut wr) = tokio::io::split(io);
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    let broken = |e: std::io::Error| Failure::Broken(e.to_string());
    let admitted = async {
        wr.write_all(opening).await.map_err(broken)?;
        wr.flush().await.map_err(broken)?;
        let f = read_frame(&mut rd, MAX_HELLO)
            .await
            .map_err(broken)?
            .ok_or_else(|| Failure::Broken("closed before it answered the hello".into()))?;
        let (_, status, body) = parse_reply(&f).map_err(broken)?;
        if status == 200 {
            Ok(())
        } else {
            Err(Failure::Refused(
                status,
                String::from_utf8_lossy(&body).chars().take(200).collect(),
            ))
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, admitted)
        .await
        .map_err(|_| Failure::Broken("the peer did not answer the hello in time".into()))??;
    conn.stats.opened.fetch_add(1, Ordering::Relaxed);
    conn.stats.open.fetch_add(1, Ordering::Relaxed);
    /// Counts the connection closed however `drive` ends once it was admitted.
    struct Open<'a>(&'a StreamStats);
    impl Drop for Open<'_> {
        fn drop(&mut self) {
            self.0.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let _open = Open(&conn.stats);
    let reader = async {
        loop {
            let f = read_frame(&mut rd, MAX_REPLY)
                .await
                .map_err(broken)?
                .ok_or_else(|| Failure::Broken("the peer closed the connection".into()))?;
            let (id, status, body) = parse_reply(&f).map_err(broken)?;
            conn.heard.fetch_add(1, Ordering::Relaxed);
            let waiter = conn.pending().remove(&id);
            if let Some(w) = waiter {
                let _ = w.send(Ok((status, body)));
            }
        }
    };
    let mut last_heard = u64::MAX;
    let mut silent = 0;
    let silence = || {
        let heard = conn.heard.load(Ordering::Relaxed);
        if heard != last_heard || conn.pending().is_empty() {
            last_heard = heard;
            silent = 0;
            return Ok(None);
        }
        silent += 1;
        if silent >= SILENT_TICKS {
            return Err(format!(
                "no answer from the peer for {SILENT_TICKS} s with requests waiting"
            ));
        }
        Ok(Some(ping_frame()))
    };
    let writer = async {
        write_loop(&mut wr, &mut queue, silence)
            .await
            .map_err(Failure::Broken)?;
        Err::<(), _>(Failure::Broken("the queue closed".into()))
    };
    tokio::select! {
        r = reader => r,
        r = writer => r,
    }
}

/// The trace context of the current span as bytes for a request frame (empty when no
/// propagator injects anything).
pub fn trace_context() -> Vec<u8> {
    let pairs = crate::telemetry::inject_pairs();
    if pairs.is_empty() {
        Vec::new()
    } else {
        encode(&pairs)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn frames_round_trip_and_short_ones_are_refused() {
        let f = request_frame(7, Call::Shard(3).tag_and_group(), b"tr", b"body");
        let len = u32::from_le_bytes(f[..4].try_into().expect("4 bytes")) as usize;
        assert_eq!(len, f.len() - 4);
        let (id, call, trace, body) = parse_request(&Bytes::from(f[4..].to_vec())).expect("parses");
        assert_eq!(id, 7);
        assert_eq!(Call::from_tag(call.0, call.1), Some(Call::Shard(3)));
        assert_eq!((&trace[..], &body[..]), (&b"tr"[..], &b"body"[..]));
        for call in [
            Call::Append(1),
            Call::Vote(2),
            Call::PreVote(3),
            Call::Transfer(4),
            Call::Snapshot(5),
            Call::Shard(6),
            Call::Liveness,
        ] {
            let (tag, g) = call.tag_and_group();
            assert_eq!(Call::from_tag(tag, g), Some(call));
        }
        assert_eq!(Call::from_tag(0, 0), None);
        assert_eq!(Call::from_tag(8, 0), None);

        let r = reply_frame(9, &Answer::refuse(409, "no"));
        let (id, status, body) = parse_reply(&Bytes::from(r[4..].to_vec())).expect("parses");
        assert_eq!((id, status, &body[..]), (9, 409, &b"no"[..]));

        assert!(parse_request(&Bytes::from_static(&[0; 12])).is_err());
        let mut lying = request_frame(1, Call::Liveness.tag_and_group(), b"", b"")[4..].to_vec();
        lying[11] = 5; // a trace longer than the frame
        assert!(parse_request(&Bytes::from(lying)).is_err());
        assert!(parse_reply(&Bytes::from_static(&[0; 9])).is_err());
    }

    /// A server that answers each request with its call's tag and its body reversed, after a
    /// delay the body names (so replies come back out of order), never answers a body of
    /// `"hang"`, and admits only the secret `"s3cret"`.
    struct Echo;

    impl Handler for Echo {
        fn admit(&self, hello: &Hello) -> Result<(), Answer> {
            if hello.secret == b"s3cret" {
                Ok(())
            } else {
                Err(Answer::refuse(401, "bad cluster secret"))
            }
        }

        async fn handle(
            self: Arc<Self>,
            _peer: Peer,
            call: Call,
            _trace: Vec<(String, String)>,
            body: Bytes,
        ) -> Answer {
            if &body[..] == b"hang" {
                std::future::pending::<()>().await;
            }
            let delay = body.first().copied().unwrap_or(0) % 7;
            tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
            let mut out = vec![call.tag_and_group().0];
            out.extend(body.iter().rev());
            Answer::ok(out)
        }
    }

    /// Waits up to 10 s for `cond`, failing with `failure` if it never holds.
    async fn wait_until(failure: &str, cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "{failure}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Serves [`Echo`] on a loopback port until the returned sender is dropped or set.
    async fn echo_server() -> (String, watch::Sender<bool>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            let mut stopping = stop_rx.clone();
            loop {
                let (s, _) = tokio::select! {
                    a = l.accept() => a.expect("accept"),
                    _ = stopping.changed() => return,
                };
                // As the internal port does.
                s.set_nodelay(true).expect("nodelay");
                tokio::spawn(serve(s, Arc::new(Echo), stop_rx.clone()));
            }
        });
        (addr, stop)
    }

    fn dialer(secret: &str) -> Dialer {
        Dialer::new(
            Identity {
                node_id: 1,
                incarnation: 11,
            },
            Arc::new(Zeroizing::new(secret.to_string())),
            None,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_each_get_their_own_reply() {
        let (addr, _stop) = echo_server().await;
        let d = Arc::new(dialer("s3cret"));
        // Spawned all at once (collected), so they are in flight together.
        let calls: Vec<_> = (0..400u32)
            .map(|i| {
                let (d, addr) = (d.clone(), addr.clone());
                tokio::spawn(async move {
                    let body = format!("{}-request-{i}", i % 251).into_bytes();
                    let call = if i % 2 == 0 {
                        Call::Shard(7)
                    } else {
                        Call::Append(3)
                    };
                    // A third on the bulk lane.
                    let (status, reply) = d
                        .call(
                            2,
                            &addr,
                            22,
                            call,
                            b"",
                            &body,
                            Duration::from_secs(10),
                            i % 3 == 0,
                        )
                        .await
                        .expect("answered");
                    assert_eq!(status, 200);
                    let mut want = vec![call.tag_and_group().0];
                    want.extend(body.iter().rev());
                    assert_eq!(&reply[..], &want[..], "call {i} got another call's reply");
                })
            })
            .collect();
        for c in calls {
            c.await.expect("no panic");
        }
        // One connection per lane, reused by all of them.
        assert_eq!(d.conns.lock().expect("lock").len(), 2);
        assert_eq!(d.stats().opened.load(Ordering::Relaxed), 2);
        assert_eq!(d.stats().open.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_hello_fails_the_call_with_the_servers_reason() {
        let (addr, _stop) = echo_server().await;
        let d = dialer("wrong");
        let err = d
            .call(
                2,
                &addr,
                0,
                Call::Vote(1),
                b"",
                b"x",
                Duration::from_secs(10),
                false,
            )
            .await
            .expect_err("refused");
        assert_eq!(
            err,
            TransportError::Refused {
                peer: 2,
                status: 401,
                reason: "bad cluster secret".into()
            }
        );
        assert_eq!(d.stats().refused.load(Ordering::Relaxed), 1);
        assert_eq!(d.stats().opened.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_server_fails_waiting_calls_and_the_next_call_reconnects() {
        let (addr, stop) = echo_server().await;
        let d = Arc::new(dialer("s3cret"));
        let ok = |d: Arc<Dialer>, addr: String| async move {
            d.call(
                2,
                &addr,
                0,
                Call::Liveness,
                b"",
                b"ab",
                Duration::from_secs(10),
                false,
            )
            .await
        };
        assert_eq!(
            ok(d.clone(), addr.clone()).await.expect("up").1,
            &b"\x07ba"[..]
        );
        let waiting = {
            let (d, addr) = (d.clone(), addr.clone());
            tokio::spawn(async move {
                d.call(
                    2,
                    &addr,
                    0,
                    Call::Liveness,
                    b"",
                    b"hang",
                    Duration::from_secs(60),
                    false,
                )
                .await
            })
        };
        // The request is on the wire when its server goes away.
        let pending = || {
            d.conns
                .lock()
                .expect("lock")
                .values()
                .map(|c| c.pending().len())
                .sum::<usize>()
        };
        wait_until("the call never went out", || pending() > 0).await;
        stop.send_replace(true);
        let err = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("failed at once, not at its timeout")
            .expect("no panic")
            .expect_err("its connection broke");
        assert!(matches!(err, TransportError::Unreachable(2, _)), "{err:?}");
        assert_eq!(d.stats().broken.load(Ordering::Relaxed), 1);
        assert_eq!(d.stats().open.load(Ordering::Relaxed), 0);
        // A server on the same address again: the next call opens a new connection.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let l = loop {
            // The old listener closes when its accept loop sees the stop.
            match tokio::net::TcpListener::bind(&addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "rebind: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            serve(s, Arc::new(Echo), watch::channel(false).1).await;
        });
        assert_eq!(ok(d, addr).await.expect("reconnected").1, &b"\x07ba"[..]);
    }

    /// A peer that admits the connection and then reads nothing more (a paused process, a cut
    /// link): what waits on it fails after [`SILENT_TICKS`] seconds, not at its own timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_silent_with_requests_waiting_is_dropped() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut magic = [0u8; 8];
            s.read_exact(&mut magic).await.expect("magic");
            read_frame(&mut s, MAX_HELLO).await.expect("hello");
            s.write_all(&reply_frame(0, &Answer::ok(Vec::new())))
                .await
                .expect("admitted");
            std::future::pending::<()>().await;
            drop(s);
        });
        let started = std::time::Instant::now();
        let err = dialer("s3cret")
            .call(
                2,
                &addr,
                0,
                Call::Vote(1),
                b"",
                b"x",
                Duration::from_secs(60),
                false,
            )
            .await
            .expect_err("dropped");
        assert!(
            matches!(err, TransportError::Unreachable(2, ref w) if w.contains("no answer")),
            "{err:?}"
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(u64::from(SILENT_TICKS) - 1)
                && took < Duration::from_secs(30),
            "dropped after {took:?}"
        );
    }

    /// A request that is only slow keeps its connection: the peer answers the pings sent
    /// meanwhile, and the request ends at its own timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_request_on_a_live_peer_waits_for_its_own_timeout() {
        let (addr, _stop) = echo_server().await;
        let d = dialer("s3cret");
        let timeout = Duration::from_secs(u64::from(SILENT_TICKS) + 3);
        let err = d
            .call(2, &addr, 0, Call::Shard(1), b"", b"hang", timeout, false)
            .await
            .expect_err("never answered");
        assert_eq!(err, TransportError::Timeout(2));
        // And the connection still serves.
        let (status, _) = d
            .call(
                2,
                &addr,
                0,
                Call::Shard(1),
                b"",
                b"y",
                Duration::from_secs(10),
                false,
            )
            .await
            .expect("same connection");
        assert_eq!(status, 200);
        assert_eq!(d.conns.lock().expect("lock").len(), 1);
        assert!(
            d.conns
                .lock()
                .expect("lock")
                .values()
                .all(|c| c.failed.get().is_none()),
            "the slow request did not break its connection"
        );
    }

    /// A server full of requests in progress answers the next one `503` at once; a finished
    /// request frees its place.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_with_too_many_requests_in_progress_is_answered_busy() {
        struct Gate {
            running: AtomicUsize,
            open: tokio::sync::Semaphore,
        }
        impl Handler for Gate {
            fn admit(&self, _: &Hello) -> Result<(), Answer> {
                Ok(())
            }
            async fn handle(
                self: Arc<Self>,
                _: Peer,
                _: Call,
                _: Vec<(String, String)>,
                _: Bytes,
            ) -> Answer {
                self.running.fetch_add(1, Ordering::SeqCst);
                self.open.acquire().await.expect("open").forget();
                self.running.fetch_sub(1, Ordering::SeqCst);
                Answer::ok(b"done".to_vec())
            }
        }
        let gate = Arc::new(Gate {
            running: AtomicUsize::new(0),
            open: tokio::sync::Semaphore::new(0),
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let server = gate.clone();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            serve_bounded(s, server, watch::channel(false).1, 3).await;
        });
        let d = Arc::new(dialer("any"));
        let call = |d: Arc<Dialer>, addr: String| async move {
            d.call(
                2,
                &addr,
                0,
                Call::Shard(1),
                b"",
                b"x",
                Duration::from_secs(30),
                false,
            )
            .await
        };
        let held: Vec<_> = (0..3)
            .map(|_| tokio::spawn(call(d.clone(), addr.clone())))
            .collect();
        wait_until("the calls never started", || {
            gate.running.load(Ordering::SeqCst) == 3
        })
        .await;
        let (status, why) = call(d.clone(), addr.clone()).await.expect("answered");
        assert_eq!(status, 503, "{}", String::from_utf8_lossy(&why));
        assert_eq!(
            gate.running.load(Ordering::SeqCst),
            3,
            "the fourth never ran"
        );
        // Let one finish: its place is free again.
        gate.open.add_permits(1);
        wait_until("no call finished", || {
            held.iter().any(tokio::task::JoinHandle::is_finished)
        })
        .await;
        let next = tokio::spawn(call(d.clone(), addr.clone()));
        wait_until("the freed place was not reused", || {
            gate.running.load(Ordering::SeqCst) == 3
        })
        .await;
        gate.open.add_permits(3);
        for h in held.into_iter().chain([next]) {
            let (status, body) = h.await.expect("no panic").expect("answered");
            assert_eq!((status, &body[..]), (200, &b"done"[..]));
        }
    }

    #[test]
    fn host_of_strips_the_port_and_brackets() {
        assert_eq!(host_of("10.0.0.1:7001"), "10.0.0.1");
        assert_eq!(host_of("node-1.kubbi:7001"), "node-1.kubbi");
        assert_eq!(host_of("[::1]:7001"), "::1");
    }
}
