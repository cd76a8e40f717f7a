//! The `kubbi` binary: the server (`kubbi serve`) and operator commands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kubbi::config::ServeArgs;

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
    /// Pre-register a node by id and internal address (it can also just start with --join).
    Add {
        id: u64,
        #[arg(long)]
        internal: String,
        #[arg(long, default_value = "default/default")]
        zone: String,
    },
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
    },
    /// List API keys (ids, prefixes, labels; never the keys).
    List,
    /// Revoke an API key by id.
    Revoke { id: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    kubbi::telemetry::init();
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
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kubbi: {e:#}");
            ExitCode::FAILURE
        }
    }
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
        KeyCmd::Create { label } => {
            admin_call(
                &admin,
                reqwest::Method::POST,
                "/admin/v1/api-keys",
                Some(serde_json::json!({ "label": label })),
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
            println!("groups:");
            for s in st["shards"].as_array().into_iter().flatten() {
                println!(
                    "  {:>6}  leader {:<4} replicas {:<12} learners {:<8} applied {:<8} lag {}",
                    s["id"].to_string(),
                    s["leader"].to_string(),
                    s["replicas"].to_string(),
                    s["learners"].to_string(),
                    s["applied_index"].to_string(),
                    s["replication_lag"]
                );
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
