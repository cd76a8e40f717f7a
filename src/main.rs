//! The `kubbi` binary: the server (`kubbi serve`) and operator commands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kubbi::client::{Client, ClientError};
use kubbi::config::ServeArgs;

/// mimalloc instead of glibc's malloc for everything Rust allocates (RocksDB's C++ keeps its
/// own): per-request buffers, futures and messages are many small short-lived allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "kubbi", version, about = "Self-hosted claim-check service")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node (single node, data in ./kubbi-data, HTTP on 127.0.0.1:8080 by default).
    Serve(Box<ServeArgs>),
    /// Manage API keys through a node's admin API.
    Key {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Exit 0 when URL answers 200 (container health checks; the image has no curl).
    Probe { url: String },
    /// Store a payload: text, stdin, or files (a package); prints the claim URL.
    Send(Box<SendArgs>),
    /// Show what a claim URL holds, without consuming it.
    Inspect {
        #[command(flatten)]
        c: ClientArgs,
        /// Claim URL or token (a token may start with `-`).
        #[arg(allow_hyphen_values = true)]
        claim: String,
    },
    /// Claim a payload: text to stdout, package files into --out (never overwriting without --force).
    Claim {
        #[command(flatten)]
        c: ClientArgs,
        /// Claim URL or token (a token may start with `-`).
        #[arg(allow_hyphen_values = true)]
        claim: String,
        /// Directory for package files (default: the current directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
        /// Makes a retried claim return the same result and count once.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Serve the Model Context Protocol on stdio (tools kubbi_send, kubbi_send_files,
    /// kubbi_claim, kubbi_inspect, kubbi_get, kubbi_delete), using KUBBI_URL and KUBBI_API_KEY.
    Mcp {
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Show one of your kubbis.
    Get {
        #[command(flatten)]
        c: ClientArgs,
        id: String,
    },
    /// List your kubbis, newest first.
    List {
        #[command(flatten)]
        c: ClientArgs,
        #[arg(long, default_value_t = 1)]
        page: u64,
        #[arg(long, default_value_t = 20)]
        limit: u64,
        /// active, expired, burned or deleted
        #[arg(long)]
        status: Option<String>,
    },
    /// Delete one of your kubbis now; its payload is wiped.
    Delete {
        #[command(flatten)]
        c: ClientArgs,
        id: String,
    },
    /// Inspect and change cluster membership through a node's admin API.
    Cluster {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Nodes, shards, leaders, replicas and replication lag.
    Status,
    /// Drain a node (its replicas move away) and retire it.
    Remove { id: u64 },
    /// Split a data group online: the upper half of its widest shard range (or, with --at,
    /// the rest of the range from that shard on) moves to a new group on the same replicas.
    Split {
        group: u16,
        /// The first logical shard to move.
        #[arg(long)]
        at: Option<u16>,
    },
    /// Place a data group on the given nodes and pin it there (the rebalancer then only
    /// replaces a replica whose node leaves); waits until the group has them and the leader.
    Move {
        group: u16,
        /// The nodes, comma-separated: as many as the replication factor.
        #[arg(long, value_delimiter = ',', required_unless_present = "auto")]
        to: Vec<u64>,
        /// The node to lead the group (default: the first of --to).
        #[arg(long)]
        leader: Option<u64>,
        /// Give the group back to the rebalancer instead.
        #[arg(long, conflicts_with_all = ["to", "leader"])]
        auto: bool,
    },
    /// Pre-register a node by id and internal address (it can also just start with --join).
    Add {
        id: u64,
        #[arg(long)]
        internal: String,
        #[arg(long, default_value = "default/default")]
        zone: String,
    },
}

/// Where the API is and who calls it.
#[derive(clap::Args)]
struct ClientArgs {
    /// Base URL of a node.
    #[arg(long, env = "KUBBI_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// API key for producer commands (kb_...).
    #[arg(long, env = "KUBBI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print the server's JSON answer instead of a summary.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct SendArgs {
    #[command(flatten)]
    c: ClientArgs,
    /// The text to send (otherwise stdin, or --file).
    text: Option<String>,
    /// A file of a package, `PATH` or `PATH:ROLE` (role: instructions, data, context, config,
    /// attachment). Repeat for several files.
    #[arg(long = "file")]
    files: Vec<String>,
    /// Content type of the text (text/plain, application/json, text/markdown, text/csv, text/*).
    #[arg(long)]
    content_type: Option<String>,
    /// Time to live: 90s, 10m, 4h, 2d or seconds.
    #[arg(long, default_value = "15m")]
    ttl: String,
    /// How many claims are allowed (default: unlimited until expiry).
    #[arg(long)]
    max_retrievals: Option<u32>,
    /// A JSON object of metadata the producer and consumer can read.
    #[arg(long)]
    metadata: Option<String>,
    /// Makes a retried send return the first result and create nothing new.
    #[arg(long)]
    idempotency_key: Option<String>,
}

#[derive(clap::Args)]
struct AdminArgs {
    /// Base URL of a node.
    #[arg(
        long,
        env = "KUBBI_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// Admin token (default: read from <data-dir>/admin-token).
    #[arg(long, env = "KUBBI_ADMIN_TOKEN", hide_env_values = true, global = true)]
    admin_token: Option<String>,
    /// Data directory holding the admin token file.
    #[arg(
        long,
        env = "KUBBI_DATA_DIR",
        default_value = "./kubbi-data",
        global = true
    )]
    data_dir: PathBuf,
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Create an API key; it is printed once.
    Create {
        #[arg(long, default_value = "")]
        label: String,
        /// Quota: kubbis not yet ended, over the whole cluster (default: the server's).
        #[arg(long)]
        max_active: Option<u64>,
        /// Quota: sealed bytes of its active kubbis, over the whole cluster.
        #[arg(long)]
        max_bytes: Option<u64>,
        /// Quota: creates per UTC day, over the whole cluster.
        #[arg(long)]
        max_creates_per_day: Option<u64>,
        /// Rate limit: authenticated requests per second, over the whole cluster.
        #[arg(long)]
        rate: Option<u32>,
    },
    /// List API keys (ids, prefixes, labels, limits and usage; never the keys).
    List,
    /// Revoke an API key by id.
    Revoke { id: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = kubbi::telemetry::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kubbi: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.cmd {
            Cmd::Serve(args) => serve(*args).await,
            Cmd::Key { admin, cmd } => key(admin, cmd).await,
            Cmd::Cluster { admin, cmd } => cluster(admin, cmd).await,
            Cmd::Probe { url } => probe(&url).await,
            Cmd::Send(a) => send(*a).await,
            Cmd::Mcp { c } => {
                kubbi::mcp::serve_stdio(Client::new(&c.url, c.api_key.clone())?).await
            }
            Cmd::Inspect { c, claim } => inspect(c, &claim).await,
            Cmd::Claim {
                c,
                claim,
                out,
                force,
                idempotency_key,
            } => claim_cmd(c, &claim, out, force, idempotency_key.as_deref()).await,
            Cmd::Get { c, id } => print_json(client(&c)?.get(&id).await?),
            Cmd::List {
                c,
                page,
                limit,
                status,
            } => print_json(client(&c)?.list(page, limit, status.as_deref()).await?),
            Cmd::Delete { c, id } => print_json(client(&c)?.delete(&id).await?),
        }
    });
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kubbi: {e:#}");
            match e.downcast_ref::<ClientError>() {
                Some(ClientError::Api { messages, .. }) if !messages.is_empty() => {
                    for m in messages {
                        eprintln!("  - {m}");
                    }
                    ExitCode::from(6)
                }
                Some(ce) => ExitCode::from(ce.exit_code()),
                None => ExitCode::FAILURE,
            }
        }
    }
}

fn client(c: &ClientArgs) -> anyhow::Result<Client> {
    let mut cl = Client::new(&c.url, c.api_key.clone())?;
    cl.progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    Ok(cl)
}

fn print_json(v: serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

const ROLES: &[&str] = &["instructions", "data", "context", "config", "attachment"];

/// One `--file PATH[:ROLE]` as an API file entry (text as UTF-8, anything else base64).
fn file_entry(spec: &str) -> anyhow::Result<serde_json::Value> {
    use base64::Engine;
    let (path, role) = match spec.rsplit_once(':') {
        Some((p, r)) if ROLES.contains(&r) => (p, Some(r)),
        _ => (spec, None),
    };
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    let name = std::path::Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{path} has no file name"))?
        .to_string();
    let ct = kubbi::client::guess_content_type(&name);
    let textual = ct.starts_with("text/")
        || matches!(
            ct,
            "application/json"
                | "application/yaml"
                | "application/toml"
                | "application/xml"
                | "application/javascript"
        );
    let mut v = serde_json::json!({"name": name, "content_type": ct});
    match String::from_utf8(bytes) {
        Ok(text) if textual => v["content"] = text.into(),
        Ok(text) => {
            v["content"] = base64::engine::general_purpose::STANDARD
                .encode(text.as_bytes())
                .into();
            v["encoding"] = "base64".into();
        }
        Err(e) => {
            v["content"] = base64::engine::general_purpose::STANDARD
                .encode(e.as_bytes())
                .into();
            v["encoding"] = "base64".into();
        }
    }
    if let Some(r) = role {
        v["role"] = r.into();
    }
    Ok(v)
}

async fn send(a: SendArgs) -> anyhow::Result<()> {
    let ttl = kubbi::client::parse_ttl(&a.ttl).map_err(ClientError::Usage)?;
    let mut body = serde_json::json!({"ttl_seconds": ttl, "max_retrievals": a.max_retrievals});
    if let Some(m) = &a.metadata {
        body["metadata"] = serde_json::from_str(m)
            .map_err(|e| ClientError::Usage(format!("--metadata is not JSON: {e}")))?;
    }
    if !a.files.is_empty() {
        if a.text.is_some() {
            return Err(ClientError::Usage("give either text or --file, not both".into()).into());
        }
        body["files"] = a
            .files
            .iter()
            .map(|f| file_entry(f))
            .collect::<anyhow::Result<Vec<_>>>()?
            .into();
    } else {
        let text = match a.text {
            Some(t) if t != "-" => t,
            _ => {
                let mut buf = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut buf).map_err(|e| {
                    ClientError::Usage(format!(
                        "reading stdin (text only; use --file for binary): {e}"
                    ))
                })?;
                buf
            }
        };
        let ct = a
            .content_type
            .clone()
            .unwrap_or_else(|| "text/plain".into());
        body["content"] = if ct
            .split(';')
            .next()
            .is_some_and(|e| e.trim() == "application/json")
        {
            serde_json::from_str(&text)
                .map_err(|e| ClientError::Usage(format!("the content is not JSON: {e}")))?
        } else {
            text.into()
        };
        body["content_type"] = ct.into();
    }
    let r = client(&a.c)?
        .create(&body, a.idempotency_key.as_deref())
        .await?;
    if a.c.json {
        return print_json(r);
    }
    println!("{}", r["claim_url"].as_str().unwrap_or(""));
    Ok(())
}

async fn inspect(c: ClientArgs, claim: &str) -> anyhow::Result<()> {
    let r = client(&c)?.inspect(claim).await?;
    if c.json {
        return print_json(r);
    }
    let reads = match r["remaining_reads"].as_u64() {
        Some(n) => n.to_string(),
        None => "unlimited".into(),
    };
    if r["type"] == "kubbi_package" {
        println!(
            "package of {} files, {} bytes; reads left: {reads}; expires {}",
            r["file_count"],
            r["total_size_bytes"],
            r["expires_at"].as_str().unwrap_or("")
        );
        for f in r["files"].as_array().into_iter().flatten() {
            println!(
                "  {:<40} {:<28} {:>10} {}",
                f["name"].as_str().unwrap_or(""),
                f["content_type"].as_str().unwrap_or(""),
                f["size_bytes"],
                f["role"].as_str().unwrap_or("")
            );
        }
    } else {
        println!(
            "{}; reads left: {reads}; expires {}",
            r["content_type"].as_str().unwrap_or(""),
            r["expires_at"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// Where a package file goes: inside `dir`, never elsewhere.
fn target(dir: &std::path::Path, name: &str) -> anyhow::Result<PathBuf> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        bail!("refusing to write a file named {name:?}");
    }
    Ok(dir.join(name))
}

async fn claim_cmd(
    c: ClientArgs,
    claim: &str,
    out: Option<PathBuf>,
    force: bool,
    idempotency_key: Option<&str>,
) -> anyhow::Result<()> {
    use base64::Engine;
    let cl = client(&c)?;
    let dir = out.unwrap_or_else(|| PathBuf::from("."));
    // Check where package files would go before the claim consumes anything.
    let preview = cl.inspect(claim).await?;
    if preview["type"] == "kubbi_package" && !c.json {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for f in preview["files"].as_array().into_iter().flatten() {
            let t = target(&dir, f["name"].as_str().unwrap_or(""))?;
            if t.exists() && !force {
                bail!(
                    "{} exists; nothing was claimed (use --force to overwrite)",
                    t.display()
                );
            }
        }
    }
    let r = cl.claim(claim, idempotency_key).await?;
    if c.json {
        return print_json(r);
    }
    if r["type"] == "kubbi_package" {
        for f in r["files"].as_array().into_iter().flatten() {
            let t = target(&dir, f["name"].as_str().unwrap_or(""))?;
            let content = f["content"].as_str().unwrap_or("");
            let bytes = if f["encoding"] == "base64" {
                base64::engine::general_purpose::STANDARD.decode(content)?
            } else {
                content.as_bytes().to_vec()
            };
            std::fs::write(&t, &bytes).with_context(|| format!("writing {}", t.display()))?;
            println!("{}", t.display());
        }
    } else {
        match &r["content"] {
            serde_json::Value::String(s) => print!("{s}"),
            other => println!("{}", serde_json::to_string_pretty(other)?),
        }
    }
    if r["burned"] == true {
        eprintln!("kubbi: that was the last allowed read; the payload is destroyed");
    }
    Ok(())
}

async fn probe(url: &str) -> anyhow::Result<()> {
    let r = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()?
        .get(url)
        .send()
        .await?;
    if r.status().as_u16() != 200 {
        bail!("{url} answered {}", r.status());
    }
    Ok(())
}

async fn serve(mut args: ServeArgs) -> anyhow::Result<()> {
    if args.node_id_from_hostname {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .unwrap_or_default();
        args.node_id = kubbi::config::node_id_from_hostname(&host)
            .with_context(|| format!("host name {host:?} has no trailing number"))?;
    }
    let check = args.check_config;
    let config = args.into_config().map_err(anyhow::Error::msg)?;
    if check {
        config.validate().map_err(anyhow::Error::msg)?;
        for f in [&config.admin_token_file, &config.cluster.secret_file]
            .into_iter()
            .flatten()
        {
            kubbi::config::read_secret_file(f)
                .with_context(|| format!("reading {}", f.display()))?;
        }
        if let Some(f) = &config.node_key_file {
            kubbi::crypto::KeyRing::load(f)?;
        }
        if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
            kubbi::tls::load(&kubbi::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: None,
            })
            .map_err(anyhow::Error::msg)?;
        }
        if let Some(files) = config.cluster.internal_tls().map_err(anyhow::Error::msg)? {
            kubbi::tls::load(&files).map_err(|e| anyhow::anyhow!("internal TLS: {e}"))?;
        }
        println!(
            "configuration ok: node {}, data in {}",
            config.node_id,
            config.data_dir.display()
        );
        return Ok(());
    }
    let node = kubbi::node::start(config).await?;
    eprintln!(
        "kubbi serving on {} (admin token: see the data directory's admin-token file)",
        node.public_url
    );
    node.run_until(shutdown_signal()).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn admin_token(admin: &AdminArgs) -> anyhow::Result<String> {
    match &admin.admin_token {
        Some(t) => Ok(t.clone()),
        None => {
            let path = admin.data_dir.join("admin-token");
            kubbi::config::read_secret_file(&path)
                .with_context(|| format!("reading the admin token from {}", path.display()))
        }
    }
}

async fn admin_call(
    admin: &AdminArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let token = admin_token(admin)?;
    let base = admin.url.trim_end_matches('/');
    let mut req = reqwest::Client::new()
        .request(method, format!("{base}{path}"))
        .bearer_auth(&token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("contacting {base}"))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.context("reading the response")?;
    if !status.is_success() {
        bail!(
            "{} {}: {}",
            status.as_u16(),
            body["error"].as_str().unwrap_or("error"),
            body["message"].as_str().unwrap_or("")
        );
    }
    Ok(body)
}

async fn key(admin: AdminArgs, cmd: KeyCmd) -> anyhow::Result<()> {
    let body = match cmd {
        KeyCmd::Create {
            label,
            max_active,
            max_bytes,
            max_creates_per_day,
            rate,
        } => {
            let limits = serde_json::json!({
                "max_active_kubbis": max_active,
                "max_stored_bytes": max_bytes,
                "max_creates_per_day": max_creates_per_day,
                "requests_per_second": rate,
            });
            admin_call(
                &admin,
                reqwest::Method::POST,
                "/admin/v1/api-keys",
                Some(serde_json::json!({ "label": label, "limits": limits })),
            )
            .await?
        }
        KeyCmd::List => {
            admin_call(&admin, reqwest::Method::GET, "/admin/v1/api-keys", None).await?
        }
        KeyCmd::Revoke { id } => {
            admin_call(
                &admin,
                reqwest::Method::DELETE,
                &format!("/admin/v1/api-keys/{id}"),
                None,
            )
            .await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}

async fn cluster(admin: AdminArgs, cmd: ClusterCmd) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Status => {
            let st = admin_call(&admin, reqwest::Method::GET, "/admin/v1/cluster", None).await?;
            println!("nodes:");
            for n in st["nodes"].as_array().into_iter().flatten() {
                println!(
                    "  {:>3}  {:<8} http {:<22} internal {:<22} zone {}",
                    n["id"],
                    n["state"].as_str().unwrap_or(""),
                    n["http"].as_str().unwrap_or(""),
                    n["internal"].as_str().unwrap_or(""),
                    n["zone"].as_str().unwrap_or("")
                );
            }
            println!("groups (shard map version {}):", st["map_version"]);
            // Node id -> region (the part of its zone before `/`), when nodes span regions.
            let regions: std::collections::BTreeMap<String, String> = st["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| {
                    let zone = n["zone"].as_str().unwrap_or("");
                    (n["id"].to_string(), kubbi::shard::region(zone).to_string())
                })
                .collect();
            let spans_regions = regions
                .values()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                > 1;
            for s in st["shards"].as_array().into_iter().flatten() {
                let ranges: Vec<String> = s["ranges"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| format!("{}..{}", r[0], r[1]))
                    .collect();
                println!(
                    "  {:>6}  shards {:<14} leader {:<4} replicas {:<12} learners {:<8} applied {:<8} lag {}{}",
                    s["id"].to_string(),
                    if ranges.is_empty() {
                        "-".to_string()
                    } else {
                        ranges.join(",")
                    },
                    s["leader"].to_string(),
                    s["replicas"].to_string(),
                    s["learners"].to_string(),
                    s["applied_index"].to_string(),
                    s["replication_lag"],
                    if s["quiet"] == true { "  quiet" } else { "" }
                );
                let voters: std::collections::BTreeSet<String> = s["replicas"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(ToString::to_string)
                    .collect();
                let desired: std::collections::BTreeSet<String> = s["desired"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(ToString::to_string)
                    .collect();
                if spans_regions {
                    let region_of = |id: &serde_json::Value| regions.get(&id.to_string()).cloned();
                    let replicas: Vec<String> = s["replicas"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(region_of)
                        .collect();
                    println!(
                        "          regions: leader in {}, replicas in {}",
                        region_of(&s["leader"]).unwrap_or_else(|| "-".into()),
                        replicas.join(",")
                    );
                }
                if s["pinned"] == true || (!desired.is_empty() && desired != voters) {
                    println!(
                        "          {} {}",
                        if s["pinned"] == true {
                            "pinned to"
                        } else {
                            "moving to"
                        },
                        s["desired"]
                    );
                }
            }
        }
        ClusterCmd::Remove { id } => {
            let r = admin_call(
                &admin,
                reqwest::Method::DELETE,
                &format!("/admin/v1/nodes/{id}"),
                None,
            )
            .await?;
            println!(
                "node {id} is {}: its replicas move away, then it is removed",
                r["state"].as_str().unwrap_or("?")
            );
        }
        ClusterCmd::Split { group, at } => {
            let r = admin_call(
                &admin,
                reqwest::Method::POST,
                &format!("/admin/v1/groups/{group}/split"),
                Some(serde_json::json!({ "at": at })),
            )
            .await?;
            let ranges: Vec<String> = r["ranges"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| format!("{}..{}", x[0], x[1]))
                .collect();
            println!(
                "group {} split: shards {} now served by group {} (shard map version {})",
                r["source"],
                ranges.join(","),
                r["target"],
                r["map_version"]
            );
        }
        ClusterCmd::Move {
            group,
            to,
            leader,
            auto,
        } => {
            let body = if auto {
                serde_json::json!({ "auto": true })
            } else {
                serde_json::json!({ "replicas": to, "leader": leader })
            };
            let r = admin_call(
                &admin,
                reqwest::Method::POST,
                &format!("/admin/v1/groups/{group}/move"),
                Some(body),
            )
            .await?;
            if auto {
                println!(
                    "group {group} is the rebalancer's again (shard map version {})",
                    r["map_version"]
                );
            } else {
                println!(
                    "group {group} placed on {} led by {} (shard map version {})",
                    r["replicas"], r["leader"], r["map_version"]
                );
            }
        }
        ClusterCmd::Add { id, internal, zone } => {
            let r = admin_call(
                &admin,
                reqwest::Method::POST,
                "/admin/v1/nodes",
                Some(serde_json::json!({ "id": id, "internal": internal, "zone": zone })),
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
    }
    Ok(())
}
