//! Logging and tracing.
//!
//! `RUST_LOG` (or `KUBBI_LOG`) chooses levels; `KUBBI_LOG_FORMAT=json` switches to one JSON
//! object per line. When `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans are also exported over
//! OTLP/HTTP (protobuf) by a batch exporter: one span per request, with child spans through the
//! router, the shard executor, the kubbi actor and the raft proposal, and trace context
//! carried across forwards to other nodes (W3C `traceparent`).
//!
//! kubbi's own spans are at `debug`: with the default filter they are not even created (a span
//! costs its fields' formatting and an entry and exit per poll, on every request, for a log
//! that shows them only as context), unless an exporter is on, whose layer takes them whatever
//! the log filter says. `KUBBI_LOG=kubbi=debug` shows them in the log too.
//!
//! Nothing secret is ever a field or attribute: tokens, keys and payloads are wrapped in types
//! whose `Debug` redacts, and spans carry route templates, group ids and node ids only. Libraries
//! that log whole messages are capped whatever the filter asks for ([`SECRET_BEARING`]): rmcp
//! prints every MCP request and result (claim URLs, payloads) at debug and trace.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{FilterExt as _, LevelFilter, Targets, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The default filter: our own info, dependencies' warnings, except openraft's heartbeat
/// warnings. openraft gives a heartbeat one heartbeat interval (100 ms) and a follower answers
/// it only after its fsync, so under megabyte payloads every heartbeat "fails" (hundreds of
/// lines a second per node) while the cluster is healthy; a peer that is really unreachable
/// shows in replication and vote warnings, which stay.
pub const DEFAULT_FILTER: &str =
    "info,openraft=warn,openraft::core::heartbeat=error,ractor=warn,h2=warn,hyper=warn";

/// Targets whose verbose events carry whole messages, and the most they may log.
pub const SECRET_BEARING: &[(&str, tracing::Level)] = &[("rmcp", tracing::Level::ERROR)];

/// A layer that holds [`SECRET_BEARING`] targets to their levels whatever the operator's filter
/// enables (a more specific directive such as `rmcp::service=trace` included); install it beside
/// the filter.
pub fn secret_cap() -> Targets {
    SECRET_BEARING.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |t, (target, level)| t.with_target(*target, *level),
    )
}

/// Keeps the span exporter alive; [`Telemetry::shutdown`] flushes it.
#[derive(Default)]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops span export (call before the process exits).
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("kubbi: flushing spans failed: {e}");
        }
    }
}

fn otlp() -> Option<opentelemetry_sdk::trace::SdkTracerProvider> {
    std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())?;
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("kubbi: OTLP export disabled: {e}");
            return None;
        }
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("kubbi")
        .build();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    Some(
        opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    )
}

/// What an exporter takes: whatever the log filter `log` passes, and kubbi's own spans (at
/// `debug`) whatever it says.
fn exported<S>(log: EnvFilter) -> impl tracing_subscriber::layer::Filter<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    log.or(filter_fn(|m| {
        m.is_span() && m.target().starts_with("kubbi") && *m.level() <= tracing::Level::DEBUG
    }))
}

/// The log on stderr: one JSON object per line, or text.
fn log_layer<S>(json: bool, ansi: bool) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        Box::new(layer.json())
    } else {
        Box::new(layer.with_ansi(ansi))
    }
}

/// Installs the global subscriber (stderr, plus OTLP when configured). Call once per process.
pub fn init() -> Telemetry {
    let spec = std::env::var("KUBBI_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| DEFAULT_FILTER.to_string());
    let filter = || EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let json = std::env::var("KUBBI_LOG_FORMAT").is_ok_and(|f| f == "json");
    let ansi = std::io::stderr().is_terminal();
    let provider = otlp();
    let registry = tracing_subscriber::registry().with(secret_cap());
    let result = match provider.as_ref() {
        // One global filter, as before: with per-layer filters only (no exporter), three
        // nodes spent 1.18x the CPU per create and 1.25x idle (benches/README.md, "Spans at
        // debug"); a callsite a global filter disables is skipped at its static check.
        None => registry
            .with(filter())
            .with(log_layer(json, ansi))
            .try_init(),
        Some(p) => registry
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(p.tracer("kubbi"))
                    .with_filter(exported(filter())),
            )
            .with(log_layer(json, ansi).with_filter(filter()))
            .try_init(),
    };
    if result.is_err() {
        eprintln!("kubbi: a tracing subscriber was already installed");
    }
    Telemetry { provider }
}

/// Writes the current span's trace context into outgoing internal request headers.
pub fn inject(headers: &mut reqwest::header::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut opentelemetry_http::HeaderInjector(headers));
    });
}

/// The current span's trace context as header pairs, for a request that has no HTTP headers
/// (the internal stream's); empty when no propagator is installed.
pub fn inject_pairs() -> Vec<(String, String)> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    let mut pairs = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut pairs));
    pairs.into_iter().collect()
}

/// Makes `span` continue the trace named by `pairs` (from [`inject_pairs`]), if any.
pub fn continue_trace_pairs(span: &tracing::Span, pairs: Vec<(String, String)>) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if pairs.is_empty() {
        return;
    }
    let pairs: std::collections::HashMap<String, String> = pairs.into_iter().collect();
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&pairs));
    let _ = span.set_parent(cx);
}

/// Makes `span` continue the trace named by incoming request headers, if any.
pub fn continue_trace(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&opentelemetry_http::HeaderExtractor(headers))
    });
    let _ = span.set_parent(cx);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether an event of `target` at `level` passes the filter `spec` with the cap.
    fn passes(spec: &str, target: &'static str, level: tracing::Level) -> bool {
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new(spec))
            .with(secret_cap());
        tracing::subscriber::with_default(subscriber, || {
            let meta = tracing::Metadata::new(
                "event",
                target,
                level,
                None,
                None,
                None,
                tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CALLSITE)),
                tracing::metadata::Kind::EVENT,
            );
            tracing::dispatcher::get_default(|d| d.enabled(&meta))
        })
    }

    struct Callsite;
    impl tracing::callsite::Callsite for Callsite {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &tracing::Metadata<'_> {
            &CALLSITE_META
        }
    }
    static CALLSITE: Callsite = Callsite;
    /// What the callsite reports of itself; `passes` builds the metadata it asks about.
    static CALLSITE_META: tracing::Metadata<'static> = tracing::Metadata::new(
        "event",
        "kubbi::telemetry::tests",
        tracing::Level::TRACE,
        None,
        None,
        None,
        tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CALLSITE)),
        tracing::metadata::Kind::EVENT,
    );

    #[test]
    fn message_logging_libraries_stay_quiet_at_trace() {
        // rmcp logs every MCP request and result (claim URLs, payloads) at debug and trace.
        for spec in ["trace", "debug", "rmcp=trace", "info,rmcp::service=trace"] {
            for level in [tracing::Level::WARN, tracing::Level::DEBUG] {
                assert!(!passes(spec, "rmcp::service", level), "{spec} {level}");
            }
            assert!(
                passes(spec, "rmcp::service", tracing::Level::ERROR),
                "{spec}"
            );
        }
        assert!(passes("trace", "kubbi::node", tracing::Level::TRACE));
        assert!(passes("trace", "openraft::core", tracing::Level::TRACE));
    }

    #[test]
    fn kubbi_spans_are_not_created_for_the_log_alone_but_reach_an_exporter() {
        // Each check in a thread of its own: per-layer filters keep per-thread state.
        fn check(
            subscriber: impl tracing::Subscriber + Send + Sync + 'static,
        ) -> (bool, bool, bool) {
            std::thread::spawn(move || {
                tracing::subscriber::with_default(subscriber, || {
                    (
                        !tracing::info_span!("kubbi.test").is_disabled(),
                        !tracing::debug_span!("kubbi.test").is_disabled(),
                        !tracing::trace_span!("kubbi.test").is_disabled(),
                    )
                })
            })
            .join()
            .expect("check thread")
        }
        let log = || EnvFilter::new(DEFAULT_FILTER);
        let plain = tracing_subscriber::registry()
            .with(log())
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::sink));
        assert_eq!(check(plain), (true, false, false));
        let exporting = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::sink)
                    .with_filter(exported(log())),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::sink)
                    .with_filter(log()),
            );
        assert_eq!(check(exporting), (true, true, false));
    }

    #[test]
    fn the_default_filter_drops_heartbeat_noise_but_keeps_replication_warnings() {
        let hb = "openraft::core::heartbeat::worker";
        assert!(!passes(DEFAULT_FILTER, hb, tracing::Level::WARN));
        assert!(passes(DEFAULT_FILTER, hb, tracing::Level::ERROR));
        assert!(passes(
            DEFAULT_FILTER,
            "openraft::replication",
            tracing::Level::WARN
        ));
        assert!(passes(
            DEFAULT_FILTER,
            "openraft::core::raft_core",
            tracing::Level::WARN
        ));
        assert!(!passes(
            DEFAULT_FILTER,
            "openraft::core::raft_core",
            tracing::Level::INFO
        ));
        assert!(passes(DEFAULT_FILTER, "kubbi::node", tracing::Level::INFO));
    }
}
