//! A small client of the kubbi HTTP API, shared by the CLI and the MCP server.
//!
//! Consumer calls take a claim URL (or a bare token plus the base URL); producer calls need an
//! API key. Failures keep the API's error code, so callers can map them to exit codes.

use std::time::Duration;

use serde_json::Value;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with the error envelope.
    #[error("{code} ({status}): {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        messages: Vec<String>,
    },
    /// The server could not be reached or the answer was not understood.
    #[error("cannot reach {url}: {reason}")]
    Network { url: String, reason: String },
    /// A missing or malformed argument.
    #[error("{0}")]
    Usage(String),
}

impl ClientError {
    /// A process exit code a script can rely on.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Network { .. } => 8,
            Self::Api { status, .. } => match status {
                404 => 3,
                410 => 4,
                401 => 5,
                400 | 413 | 415 => 6,
                409 => 7,
                429 | 503 => 8,
                _ => 1,
            },
        }
    }
}

/// Splits a claim URL into the server's base URL and the token; a bare token uses `base`.
///
/// # Errors
/// When `input` is neither a claim URL nor a token.
pub fn parse_claim(input: &str, base: &str) -> Result<(String, String), ClientError> {
    let input = input.trim();
    if let Some(i) = input.find("/r/")
        && (input.starts_with("http://") || input.starts_with("https://"))
    {
        let origin = input[..i].to_string();
        let rest = &input[i + 3..];
        let token = rest.split(['/', '?', '#']).next().unwrap_or("").to_string();
        if token.is_empty() {
            return Err(ClientError::Usage(format!("no token in {input}")));
        }
        return Ok((origin, token));
    }
    if !input.is_empty()
        && input
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Ok((base.trim_end_matches('/').to_string(), input.to_string()));
    }
    Err(ClientError::Usage(
        "expected a claim URL (…/r/<token>) or a claim token".into(),
    ))
}

/// A client for one server (and, for producer calls, one API key).
#[derive(Clone)]
pub struct Client {
    pub base: String,
    api_key: Option<String>,
    http: reqwest::Client,
    /// Draw progress bars on stderr for transfers over 1 MiB.
    pub progress: bool,
}

/// Transfers above this size get a progress bar.
const PROGRESS_OVER: usize = 1 << 20;

/// A progress bar on stderr: `label [#####     ]  45%  5.2/11.6 MiB`.
struct Bar {
    label: &'static str,
    total: u64,
    done: u64,
    shown: u64,
}

impl Bar {
    fn advance(&mut self, n: u64) {
        use std::io::Write;
        self.done += n;
        // Redraw at most every 1% of the way.
        if self.total == 0 || (self.done - self.shown) * 100 < self.total && self.done < self.total
        {
            return;
        }
        self.shown = self.done;
        let pct = (self.done * 100 / self.total.max(1)).min(100);
        let filled = (pct / 4) as usize;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r{} [{}{}] {:>3}% {:.1}/{:.1} MiB",
            self.label,
            "#".repeat(filled),
            " ".repeat(25 - filled),
            pct,
            mib(self.done),
            mib(self.total)
        );
        if self.done >= self.total {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    }
}

impl Client {
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(base: &str, api_key: Option<String>) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            api_key,
            http,
            progress: false,
        })
    }

    fn key(&self) -> Result<&str, ClientError> {
        self.api_key.as_deref().ok_or_else(|| {
            ClientError::Usage("this needs an API key: set KUBBI_API_KEY or pass --api-key".into())
        })
    }

    async fn send(&self, req: reqwest::RequestBuilder, url: &str) -> Result<Value, ClientError> {
        let net = |e: reqwest::Error| ClientError::Network {
            url: url.to_string(),
            reason: e.to_string(),
        };
        let mut resp = req
            .header("accept", "application/json")
            .send()
            .await
            .map_err(net)?;
        let status = resp.status().as_u16();
        let len = resp.content_length().unwrap_or(0);
        let mut body = Vec::with_capacity(len as usize);
        let mut bar = (self.progress && len as usize > PROGRESS_OVER).then_some(Bar {
            label: "receiving",
            total: len,
            done: 0,
            shown: 0,
        });
        while let Some(chunk) = resp.chunk().await.map_err(net)? {
            body.extend_from_slice(&chunk);
            if let Some(b) = bar.as_mut() {
                b.advance(chunk.len() as u64);
            }
        }
        let v: Value = serde_json::from_slice(&body).map_err(|_| ClientError::Network {
            url: url.to_string(),
            reason: format!("HTTP {status} with a body that is not JSON"),
        })?;
        if (200..300).contains(&status) {
            return Ok(v);
        }
        Err(ClientError::Api {
            status,
            code: v["error"].as_str().unwrap_or("error").to_string(),
            message: v["message"].as_str().unwrap_or("").to_string(),
            messages: v["messages"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|m| m.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// `POST /api/v1/kubbis` with a request body as API.md describes it.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn create(
        &self,
        body: &Value,
        idempotency_key: Option<&str>,
    ) -> Result<Value, ClientError> {
        let url = format!("{}/api/v1/kubbis", self.base);
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Usage(e.to_string()))?;
        let mut req = self
            .http
            .post(&url)
            .bearer_auth(self.key()?)
            .header("content-type", "application/json");
        req = if self.progress && bytes.len() > PROGRESS_OVER {
            let total = bytes.len() as u64;
            let bar = std::sync::Arc::new(std::sync::Mutex::new(Bar {
                label: "sending",
                total,
                done: 0,
                shown: 0,
            }));
            let chunks: Vec<Vec<u8>> = bytes.chunks(64 * 1024).map(<[u8]>::to_vec).collect();
            let stream = futures::stream::iter(chunks.into_iter().map(move |c| {
                if let Ok(mut b) = bar.lock() {
                    b.advance(c.len() as u64);
                }
                Ok::<_, std::io::Error>(c)
            }));
            req.header("content-length", total)
                .body(reqwest::Body::wrap_stream(stream))
        } else {
            req.body(bytes)
        };
        if let Some(k) = idempotency_key {
            req = req.header("idempotency-key", k);
        }
        self.send(req, &url).await
    }

    /// `GET /api/v1/kubbis/:id`.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn get(&self, id: &str) -> Result<Value, ClientError> {
        let url = format!("{}/api/v1/kubbis/{id}", self.base);
        self.send(self.http.get(&url).bearer_auth(self.key()?), &url)
            .await
    }

    /// `GET /api/v1/kubbis`.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn list(
        &self,
        page: u64,
        limit: u64,
        status: Option<&str>,
    ) -> Result<Value, ClientError> {
        let mut url = format!("{}/api/v1/kubbis?page={page}&limit={limit}", self.base);
        if let Some(s) = status {
            url.push_str(&format!("&status={s}"));
        }
        self.send(self.http.get(&url).bearer_auth(self.key()?), &url)
            .await
    }

    /// `DELETE /api/v1/kubbis/:id`.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn delete(&self, id: &str) -> Result<Value, ClientError> {
        let url = format!("{}/api/v1/kubbis/{id}", self.base);
        self.send(self.http.delete(&url).bearer_auth(self.key()?), &url)
            .await
    }

    /// `GET /r/:token/inspect` for a claim URL or token.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn inspect(&self, claim: &str) -> Result<Value, ClientError> {
        let (base, token) = parse_claim(claim, &self.base)?;
        let url = format!("{base}/r/{token}/inspect");
        self.send(self.http.get(&url), &url).await
    }

    /// `POST /r/:token/claim` for a claim URL or token.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn claim(
        &self,
        claim: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Value, ClientError> {
        let (base, token) = parse_claim(claim, &self.base)?;
        let url = format!("{base}/r/{token}/claim");
        let mut req = self.http.post(&url);
        if let Some(k) = idempotency_key {
            req = req.header("idempotency-key", k);
        }
        self.send(req, &url).await
    }
}

/// Parses a duration like `90s`, `10m`, `4h`, `2d` or a bare number of seconds.
///
/// # Errors
/// A message when the text is not such a duration or is zero.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 90s, 10m, 4h or 2d"))?;
    let secs = n
        .checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too long"))?;
    if secs == 0 {
        return Err("a TTL must be at least 1 second".into());
    }
    Ok(secs)
}

/// A MIME type for a file name, from its extension.
pub fn guess_content_type(name: &str) -> &'static str {
    let lower = name.to_ascii_lowercase();
    let ext = if lower.ends_with(".tar.gz") || lower.ends_with(".tgz") {
        "gz"
    } else {
        lower.rsplit('.').next().unwrap_or("")
    };
    match ext {
        "txt" | "log" => "text/plain",
        "md" | "markdown" => "text/markdown",
        "csv" => "text/csv",
        "json" => "application/json",
        "yaml" | "yml" => "application/yaml",
        "toml" => "application/toml",
        "xml" => "application/xml",
        "html" | "htm" => "text/html",
        "js" => "application/javascript",
        "sh" => "text/x-shellscript",
        "py" => "text/x-python",
        "rs" => "text/x-rust",
        "pem" | "key" | "crt" => "application/x-pem-file",
        "gz" => "application/gzip",
        "zip" => "application/zip",
        "tar" => "application/x-tar",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "pdf" => "application/pdf",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_urls_and_tokens() {
        let t = "A".repeat(46);
        assert_eq!(
            parse_claim(&format!("https://k.example.com/r/{t}"), "x").expect("url"),
            ("https://k.example.com".to_string(), t.clone())
        );
        assert_eq!(
            parse_claim(&format!("http://127.0.0.1:8080/r/{t}/claim?x=1"), "x").expect("url"),
            ("http://127.0.0.1:8080".to_string(), t.clone())
        );
        assert_eq!(
            parse_claim(&t, "http://b/").expect("token"),
            ("http://b".to_string(), t.clone())
        );
        assert!(parse_claim("not a url", "x").is_err());
        assert!(parse_claim("https://k/r/", "x").is_err());
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("90s"), Ok(90));
        assert_eq!(parse_ttl("10m"), Ok(600));
        assert_eq!(parse_ttl("4h"), Ok(14_400));
        assert_eq!(parse_ttl("2d"), Ok(172_800));
        assert_eq!(parse_ttl("300"), Ok(300));
        for bad in ["", "0", "0s", "x", "10y", "-5m"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exit_codes_distinguish_outcomes() {
        let api = |status| ClientError::Api {
            status,
            code: String::new(),
            message: String::new(),
            messages: vec![],
        };
        assert_eq!(api(404).exit_code(), 3);
        assert_eq!(api(410).exit_code(), 4);
        assert_eq!(api(401).exit_code(), 5);
        assert_eq!(api(400).exit_code(), 6);
        assert_eq!(api(503).exit_code(), 8);
        assert_eq!(ClientError::Usage(String::new()).exit_code(), 2);
    }
}
