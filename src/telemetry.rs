//! Logging setup. `RUST_LOG` (or `KUBBI_LOG`) chooses levels; `KUBBI_LOG_FORMAT=json` switches
//! to one JSON object per line. Nothing secret is ever a field: tokens, keys and payloads are
//! wrapped in types whose `Debug` redacts, and handlers log ids and sizes only.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The default filter: our own info, dependencies' warnings.
pub const DEFAULT_FILTER: &str = "info,openraft=warn,ractor=warn";

/// Installs the global subscriber (stderr). Safe to call once per process.
pub fn init() {
    let filter = std::env::var("KUBBI_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| DEFAULT_FILTER.to_string());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let json = std::env::var("KUBBI_LOG_FORMAT").is_ok_and(|f| f == "json");
    let ansi = std::io::stderr().is_terminal();
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
    if result.is_err() {
        eprintln!("kubbi: a tracing subscriber was already installed");
    }
}
