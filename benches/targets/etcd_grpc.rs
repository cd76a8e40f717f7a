//! etcd v3 over its native gRPC API, as etcd's own clients use it: HTTP/2 (reqwest with prior
//! knowledge, one multiplexed connection per member), protobuf messages declared here with
//! prost (the subset of `rpc.proto`/`kv.proto` the load generator needs; no codegen).
//!
//! Same operations as the JSON gateway target (`etcd.rs`), without the gateway's extra hop.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeResponse {
    #[prost(message, repeated, tag = "2")]
    pub kvs: Vec<KeyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
    #[prost(int64, tag = "3")]
    pub lease: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DeleteRangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum CompareTarget {
    #[prost(int64, tag = "6")]
    ModRevision(i64),
}

/// `Compare.result`: EQUAL = 0, GREATER = 1; `Compare.target`: MOD = 2.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Compare {
    #[prost(int32, tag = "1")]
    pub result: i32,
    #[prost(int32, tag = "2")]
    pub target: i32,
    #[prost(bytes = "vec", tag = "3")]
    pub key: Vec<u8>,
    #[prost(oneof = "CompareTarget", tags = "6")]
    pub target_union: Option<CompareTarget>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Request {
    #[prost(message, tag = "1")]
    Range(RangeRequest),
    #[prost(message, tag = "2")]
    Put(PutRequest),
    #[prost(message, tag = "3")]
    DeleteRange(DeleteRangeRequest),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestOp {
    #[prost(oneof = "Request", tags = "1, 2, 3")]
    pub request: Option<Request>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Response {
    #[prost(message, tag = "1")]
    Range(RangeResponse),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseOp {
    #[prost(oneof = "Response", tags = "1")]
    pub response: Option<Response>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TxnRequest {
    #[prost(message, repeated, tag = "1")]
    pub compare: Vec<Compare>,
    #[prost(message, repeated, tag = "2")]
    pub success: Vec<RequestOp>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TxnResponse {
    #[prost(bool, tag = "2")]
    pub succeeded: bool,
    #[prost(message, repeated, tag = "3")]
    pub responses: Vec<ResponseOp>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseGrantRequest {
    #[prost(int64, tag = "1")]
    pub ttl: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseGrantResponse {
    #[prost(int64, tag = "2")]
    pub id: i64,
    #[prost(string, tag = "4")]
    pub error: String,
}

/// Any response we only need to see arrive (PutResponse).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

fn op(r: Request) -> RequestOp {
    RequestOp { request: Some(r) }
}

fn mod_cmp(key: Vec<u8>, result: i32, rev: i64) -> Compare {
    Compare {
        result,
        target: 2,
        key,
        target_union: Some(CompareTarget::ModRevision(rev)),
    }
}

#[derive(Clone)]
pub struct Client {
    /// An HTTP/2-only client (prior knowledge).
    pub http: reqwest::Client,
    pub url: String,
    pub value: Arc<Vec<u8>>,
    pub lease: i64,
    pub conflicts: Arc<AtomicU64>,
}

impl Client {
    /// One unary call: 5-byte gRPC frame header + message; the reply's first message.
    async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        req: &Req,
    ) -> Option<Resp> {
        let len = req.encoded_len();
        let mut body = Vec::with_capacity(5 + len);
        body.push(0);
        body.extend_from_slice(&(len as u32).to_be_bytes());
        req.encode(&mut body).ok()?;
        let r = self
            .http
            .post(format!("{}/{method}", self.url))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .send()
            .await
            .ok()?;
        // A failed call is usually "trailers only": grpc-status in the headers, no message.
        if !r.status().is_success()
            || r.headers()
                .get("grpc-status")
                .is_some_and(|s| s.as_bytes() != b"0")
        {
            return None;
        }
        let bytes = r.bytes().await.ok()?;
        if bytes.len() < 5 || bytes[0] != 0 {
            return None;
        }
        let n = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        Resp::decode(bytes.get(5..5 + n)?).ok()
    }

    pub async fn connect(
        http: reqwest::Client,
        url: &str,
        value: Arc<Vec<u8>>,
        ttl: i64,
        conflicts: Arc<AtomicU64>,
    ) -> Option<Self> {
        let mut c = Self {
            http,
            url: url.to_string(),
            value,
            lease: 0,
            conflicts,
        };
        let r: LeaseGrantResponse = c
            .call("etcdserverpb.Lease/LeaseGrant", &LeaseGrantRequest { ttl })
            .await?;
        if r.id == 0 || !r.error.is_empty() {
            return None;
        }
        c.lease = r.id;
        Some(c)
    }

    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> PutRequest {
        PutRequest {
            key,
            value,
            lease: self.lease,
        }
    }

    pub async fn create(&self, key: &str) -> bool {
        let req = self.put(key.as_bytes().to_vec(), self.value.to_vec());
        self.call::<_, Empty>("etcdserverpb.KV/Put", &req)
            .await
            .is_some()
    }

    pub async fn claim(&self, key: &str) -> bool {
        let k = key.as_bytes().to_vec();
        let req = TxnRequest {
            compare: vec![mod_cmp(k.clone(), 1, 0)],
            success: vec![
                op(Request::Range(RangeRequest {
                    key: k.clone(),
                    range_end: Vec::new(),
                })),
                op(Request::DeleteRange(DeleteRangeRequest {
                    key: k,
                    range_end: Vec::new(),
                })),
            ],
        };
        match self
            .call::<_, TxnResponse>("etcdserverpb.KV/Txn", &req)
            .await
        {
            Some(t) => {
                t.succeeded
                    && matches!(t.responses.first(),
                        Some(ResponseOp { response: Some(Response::Range(r)) }) if !r.kvs.is_empty())
            }
            None => false,
        }
    }

    pub async fn claim_n(&self, key: &str) -> bool {
        let prefix = format!("{key}/").into_bytes();
        let end = format!("{key}0").into_bytes(); // '/' + 1
        let counter = format!("{key}/n").into_bytes();
        loop {
            let Some(r) = self
                .call::<_, RangeResponse>(
                    "etcdserverpb.KV/Range",
                    &RangeRequest {
                        key: prefix.clone(),
                        range_end: end.clone(),
                    },
                )
                .await
            else {
                return false;
            };
            // Sorted by key: K/n, then K/v; fewer means burned or missing.
            let [n_kv, _v_kv] = r.kvs.as_slice() else {
                return false;
            };
            let Some(n) = std::str::from_utf8(&n_kv.value)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
            else {
                return false;
            };
            let success = if n <= 1 {
                op(Request::DeleteRange(DeleteRangeRequest {
                    key: prefix.clone(),
                    range_end: end.clone(),
                }))
            } else {
                op(Request::Put(
                    self.put(counter.clone(), (n - 1).to_string().into_bytes()),
                ))
            };
            let req = TxnRequest {
                compare: vec![mod_cmp(counter.clone(), 0, n_kv.mod_revision)],
                success: vec![success],
            };
            match self
                .call::<_, TxnResponse>("etcdserverpb.KV/Txn", &req)
                .await
            {
                Some(t) if t.succeeded => return true,
                Some(_) => {
                    self.conflicts.fetch_add(1, Ordering::Relaxed);
                }
                None => return false,
            }
        }
    }

    pub async fn preview(&self, key: &str) -> bool {
        let req = RangeRequest {
            key: key.as_bytes().to_vec(),
            range_end: Vec::new(),
        };
        self.call::<_, RangeResponse>("etcdserverpb.KV/Range", &req)
            .await
            .is_some_and(|r| !r.kvs.is_empty())
    }

    /// Untimed setup, as in `etcd.rs`.
    pub async fn setup(&self, keys: &[String], reads: u32) -> bool {
        let per = if reads == 1 { 64 } else { 32 };
        for chunk in keys.chunks(per) {
            let mut ops = Vec::with_capacity(chunk.len() * 2);
            for k in chunk {
                if reads == 1 {
                    ops.push(op(Request::Put(
                        self.put(k.as_bytes().to_vec(), self.value.to_vec()),
                    )));
                } else {
                    ops.push(op(Request::Put(self.put(
                        format!("{k}/n").into_bytes(),
                        reads.to_string().into_bytes(),
                    ))));
                    ops.push(op(Request::Put(
                        self.put(format!("{k}/v").into_bytes(), self.value.to_vec()),
                    )));
                }
            }
            let req = TxnRequest {
                compare: Vec::new(),
                success: ops,
            };
            if !self
                .call::<_, TxnResponse>("etcdserverpb.KV/Txn", &req)
                .await
                .is_some_and(|t| t.succeeded)
            {
                return false;
            }
        }
        true
    }
}
