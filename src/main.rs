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

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.into_config().map_err(anyhow::Error::msg)?;
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

async fn key(admin: AdminArgs, cmd: KeyCmd) -> anyhow::Result<()> {
    let token = match admin.admin_token {
        Some(t) => t,
        None => {
            let path = admin.data_dir.join("admin-token");
            kubbi::config::read_secret_file(&path)
                .with_context(|| format!("reading the admin token from {}", path.display()))?
        }
    };
    let base = admin.url.trim_end_matches('/');
    let client = reqwest::Client::new();
    let resp = match cmd {
        KeyCmd::Create { label } => {
            client
                .post(format!("{base}/admin/v1/api-keys"))
                .bearer_auth(&token)
                .json(&serde_json::json!({ "label": label }))
                .send()
                .await
        }
        KeyCmd::List => {
            client
                .get(format!("{base}/admin/v1/api-keys"))
                .bearer_auth(&token)
                .send()
                .await
        }
        KeyCmd::Revoke { id } => {
            client
                .delete(format!("{base}/admin/v1/api-keys/{id}"))
                .bearer_auth(&token)
                .send()
                .await
        }
    }
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
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}
