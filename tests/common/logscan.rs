//! Every node log of every test, and every secret the tests see, in one directory, so that
//! `scripts/scan-test-logs` can check after a full run that no token, key or payload byte
//! reached a log (DESIGN.md, "Keys and encryption").
//!
//! ```text
//!   in-process nodes ──tracing──▶ <dir>/<binary>.<test>.<pid>.log
//!   child processes ──stderr───▶ <dir>/<binary>.<test>.<pid>.<what>-<n>.log
//!   Api / fixtures ──record()──▶ <dir>/secrets-<pid>.txt   ("<kind> <hex>" per line)
//! ```
//!
//! The directory is `$KUBBI_TEST_LOG_DIR`, else `$CARGO_TARGET_DIR/test-logs`, else
//! `target/test-logs`. The level is `$KUBBI_TEST_LOG` (an env filter), `trace` by default, for
//! in-process nodes and for child nodes whose test does not choose one; multi-process clusters
//! use `$KUBBI_TEST_CLUSTER_LOG`, by default trace for kubbi and debug for its dependencies but
//! openraft and h2 (at trace, or with those two at debug, a 3-node cluster of 16 groups writes
//! 1.5-3 MB/s per node and misses the tests' deadlines on a busy 2-core machine).
#![allow(dead_code)]

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine;
use serde_json::Value;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The log level (env filter) tests run nodes at.
pub fn level() -> String {
    std::env::var("KUBBI_TEST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "trace".to_string())
}

/// The log level (env filter) of the nodes of a multi-process cluster.
pub fn cluster_level() -> String {
    std::env::var("KUBBI_TEST_CLUSTER_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "debug,kubbi=trace,openraft=info,h2=info".to_string())
}

/// The directory every log and secret list goes to (created on first use).
pub fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::var_os("KUBBI_TEST_LOG_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("CARGO_TARGET_DIR").map(|t| PathBuf::from(t).join("test-logs"))
            })
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-logs"));
        std::fs::create_dir_all(&d).expect("test log directory");
        d
    })
}

/// `<binary>.<test>.<pid>`: names this process's files. Under nextest a process runs one test,
/// named in its arguments (`--exact <name>`); under `cargo test` the process runs them all.
fn tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let test = args
            .iter()
            .find(|a| !a.starts_with('-'))
            .filter(|_| args.iter().any(|a| a == "--exact"))
            .cloned()
            .unwrap_or_else(|| "all".to_string());
        let test: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{}.{test}.{}", env!("CARGO_CRATE_NAME"), std::process::id())
    })
}

/// Installs (once per process) a tracing subscriber that writes every in-process node's events
/// to this process's log file in the directory.
pub fn init() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let path = dir().join(format!("{}.log", tag()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("test log file");
        let filter = tracing_subscriber::EnvFilter::try_new(level())
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("trace"));
        // The same cap as `kubbi serve` (which also quiets the test's own MCP client).
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(kubbi::telemetry::secret_cap())
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(Arc::new(file)),
            )
            .try_init();
    });
}

/// A fresh file in the directory for a child process's output, `what` saying which.
pub fn child_log(what: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    dir().join(format!("{}.{what}-{n}.log", tag()))
}

/// Opens `path` for appending, as a child process's stdout or stderr.
pub fn append(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("child log file")
}

/// Makes the log path a test chose (`wanted`) a link to a file in the directory and returns
/// that file, so the test reads what the scan reads and the file outlives the test's temp dir.
/// A path that is already such a link (a restart) keeps its file.
pub fn link_child_log(wanted: &Path, what: &str) -> PathBuf {
    if let Ok(target) = std::fs::read_link(wanted) {
        return target;
    }
    let target = child_log(what);
    drop(append(&target));
    if wanted.exists() {
        // Something was written there before: keep it in the scanned file.
        let before = std::fs::read(wanted).expect("earlier log");
        append(&target).write_all(&before).expect("copy log");
        std::fs::remove_file(wanted).expect("replace log");
    }
    std::os::unix::fs::symlink(&target, wanted).expect("log link");
    target
}

/// Writes bytes a test produced (a child's captured stderr, say) as a log in the directory.
pub fn save_output(what: &str, bytes: &[u8]) {
    if !bytes.is_empty() {
        append(&child_log(what))
            .write_all(bytes)
            .expect("save output");
    }
}

struct Secrets {
    seen: HashSet<(String, Vec<u8>)>,
    file: Option<std::fs::File>,
}

/// Whether `b` could match a log by chance: shorter than 8 bytes, or fewer than 4 distinct
/// byte values (`xxxxxxxx`, `AAAA…`).
fn generic(b: &[u8]) -> bool {
    let distinct: HashSet<u8> = b.iter().copied().collect();
    b.len() < 8 || distinct.len() < 4
}

/// Records a secret of `kind` (`api-key`, `admin-token`, `claim-token`, `cluster-secret`,
/// `node-key`, `payload`, `metadata`) for the scan. Generic values are skipped; a long
/// payload is recorded as three 64-byte windows (start, middle, end), which any logged slice of
/// it long enough to matter would share.
pub fn record(kind: &str, secret: impl AsRef<[u8]>) {
    let b = secret.as_ref();
    if b.len() > 256 {
        let mid = b.len() / 2 - 32;
        for w in [&b[..64], &b[mid..mid + 64], &b[b.len() - 64..]] {
            record(kind, w);
        }
        return;
    }
    if generic(b) {
        return;
    }
    static SECRETS: OnceLock<Mutex<Secrets>> = OnceLock::new();
    let mut s = SECRETS
        .get_or_init(|| {
            Mutex::new(Secrets {
                seen: HashSet::new(),
                file: None,
            })
        })
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if !s.seen.insert((kind.to_string(), b.to_vec())) {
        return;
    }
    let file = s
        .file
        .get_or_insert_with(|| append(&dir().join(format!("secrets-{}.txt", std::process::id()))));
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    file.write_all(format!("{kind} {hex}\n").as_bytes())
        .expect("record secret");
}

/// Records the claim token of every `/r/<token>` in `text` (claim URLs in CLI output, say).
pub fn record_claim_urls(text: &str) {
    for part in text.split("/r/").skip(1) {
        let token: String = part
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect();
        record("claim-token", token);
    }
}

/// Records a bearer credential: an API key when it has the key prefix, else an admin token.
pub fn record_bearer(value: &str) {
    let kind = if value.starts_with("kb_") {
        "api-key"
    } else {
        "admin-token"
    };
    record(kind, value);
}

/// Records the secrets in a JSON body, request or response: claim tokens and URLs, API keys,
/// single contents and file contents (decoded too when base64), and metadata strings.
pub fn record_json(v: &Value) {
    match v {
        Value::Object(m) => {
            let base64 = m.get("encoding").and_then(Value::as_str) == Some("base64");
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("claim_token", Value::String(s)) => record("claim-token", s),
                    ("claim_url" | "claimUrl", Value::String(s)) => record_claim_urls(s),
                    ("api_key", Value::String(s)) => record("api-key", s),
                    ("content", Value::String(s)) => {
                        record("payload", s);
                        if base64 && let Ok(b) = base64::engine::general_purpose::STANDARD.decode(s)
                        {
                            record("payload", b);
                        }
                    }
                    ("metadata", m) => record_strings("metadata", m),
                    _ => record_json(x),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(record_json),
        _ => {}
    }
}

fn record_strings(kind: &str, v: &Value) {
    match v {
        Value::String(s) => record(kind, s),
        Value::Array(a) => a.iter().for_each(|x| record_strings(kind, x)),
        Value::Object(m) => m.values().for_each(|x| record_strings(kind, x)),
        _ => {}
    }
}

/// Records the keys of a node key ring file (`{"keys": [{"key": "<base64>"}]}`), both as
/// written and decoded.
pub fn record_key_file(path: &Path) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let Ok(v) = serde_json::from_str::<Value>(&text) else {
        return;
    };
    for k in v["keys"].as_array().into_iter().flatten() {
        if let Some(s) = k["key"].as_str() {
            record("node-key", s);
            if let Ok(b) = base64::engine::general_purpose::STANDARD.decode(s) {
                record("node-key", b);
            }
        }
    }
}
