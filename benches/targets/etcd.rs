//! etcd v3 through its JSON gRPC gateway (`POST /v3/...`, keys and values base64), with the
//! same reqwest client settings the load generator uses for kubbi.
//!
//! Operations, each one closed-loop request unless noted:
//! - create: `kv/put` with the client's lease (one lease per client, granted once, untimed);
//! - claim-once: `kv/txn` comparing `mod_revision > 0`, success = range + delete of the key;
//! - claim-n: `kv/range` of the kubbi's prefix (counter `K/n` and value `K/v`), then `kv/txn`
//!   comparing the counter's `mod_revision`, success = put `n-1` (or delete the prefix at
//!   zero); a lost compare-and-swap is retried inside the same timed operation;
//! - preview: `kv/range` of the key (linearizable, etcd's default).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub url: String,
    /// The payload, base64 (as the gateway wants it).
    pub value: Arc<String>,
    pub lease: String,
    /// Compare-and-swap retries in claim-n (lost races).
    pub conflicts: Arc<AtomicU64>,
}

impl Client {
    async fn post(&self, path: &str, body: &Value) -> Option<Value> {
        let r = self
            .http
            .post(format!("{}{}", self.url, path))
            .json(body)
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    /// A new client on `url` with its own lease of `ttl` seconds.
    pub async fn connect(
        http: reqwest::Client,
        url: &str,
        value: Arc<String>,
        ttl: u64,
        conflicts: Arc<AtomicU64>,
    ) -> Option<Self> {
        let mut c = Self {
            http,
            url: url.to_string(),
            value,
            lease: String::new(),
            conflicts,
        };
        let v = c.post("/v3/lease/grant", &json!({"TTL": ttl})).await?;
        c.lease = match &v["ID"] {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return None,
        };
        Some(c)
    }

    pub async fn create(&self, key: &str) -> bool {
        let body = json!({"key": b64(key), "value": self.value.as_str(), "lease": self.lease});
        self.post("/v3/kv/put", &body).await.is_some()
    }

    pub async fn claim(&self, key: &str) -> bool {
        let k = b64(key);
        let body = json!({
            "compare": [{"key": k, "target": "MOD", "result": "GREATER", "mod_revision": "0"}],
            "success": [{"request_range": {"key": k}}, {"request_delete_range": {"key": k}}],
        });
        match self.post("/v3/kv/txn", &body).await {
            Some(v) => {
                v["succeeded"] == Value::Bool(true)
                    && v["responses"][0]["response_range"]["kvs"][0]["value"].is_string()
            }
            None => false,
        }
    }

    pub async fn claim_n(&self, key: &str) -> bool {
        let prefix = format!("{key}/");
        let end = format!("{key}0"); // '/' + 1
        let counter = b64(&format!("{key}/n"));
        loop {
            let Some(v) = self
                .post(
                    "/v3/kv/range",
                    &json!({"key": b64(&prefix), "range_end": b64(&end)}),
                )
                .await
            else {
                return false;
            };
            let kvs = match v["kvs"].as_array() {
                Some(k) if k.len() == 2 => k,
                _ => return false, // burned or missing
            };
            // Sorted by key: K/n, then K/v.
            let (n_kv, v_kv) = (&kvs[0], &kvs[1]);
            if !v_kv["value"].is_string() {
                return false;
            }
            let n: i64 = match n_kv["value"]
                .as_str()
                .and_then(|s| B64.decode(s).ok())
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.parse().ok())
            {
                Some(n) => n,
                None => return false,
            };
            let rev = n_kv["mod_revision"].clone();
            let success = if n <= 1 {
                json!([{"request_delete_range": {"key": b64(&prefix), "range_end": b64(&end)}}])
            } else {
                json!([{"request_put": {"key": counter, "value": b64(&(n - 1).to_string()),
                                        "lease": self.lease}}])
            };
            let body = json!({
                "compare": [{"key": counter, "target": "MOD", "result": "EQUAL", "mod_revision": rev}],
                "success": success,
            });
            match self.post("/v3/kv/txn", &body).await {
                Some(t) if t["succeeded"] == Value::Bool(true) => return true,
                Some(_) => {
                    self.conflicts.fetch_add(1, Ordering::Relaxed);
                }
                None => return false,
            }
        }
    }

    pub async fn preview(&self, key: &str) -> bool {
        match self.post("/v3/kv/range", &json!({"key": b64(key)})).await {
            Some(v) => v["kvs"][0]["value"].is_string(),
            None => false,
        }
    }

    /// Untimed setup: `keys` as plain values (`reads == 1`) or as claim-n pairs
    /// (`K/n` = reads, `K/v` = payload), in transactions of up to 64 puts.
    pub async fn setup(&self, keys: &[String], reads: u32) -> bool {
        let per = if reads == 1 { 64 } else { 32 };
        for chunk in keys.chunks(per) {
            let mut ops = Vec::with_capacity(chunk.len() * 2);
            for k in chunk {
                if reads == 1 {
                    ops.push(json!({"request_put": {"key": b64(k), "value": self.value.as_str(), "lease": self.lease}}));
                } else {
                    ops.push(json!({"request_put": {"key": b64(&format!("{k}/n")),
                        "value": b64(&reads.to_string()), "lease": self.lease}}));
                    ops.push(json!({"request_put": {"key": b64(&format!("{k}/v")),
                        "value": self.value.as_str(), "lease": self.lease}}));
                }
            }
            let ok = self
                .post("/v3/kv/txn", &json!({"success": ops}))
                .await
                .is_some_and(|v| v["succeeded"] == Value::Bool(true));
            if !ok {
                return false;
            }
        }
        true
    }
}
