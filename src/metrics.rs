//! Prometheus metrics without a global registry (several nodes may share one process).
//!
//! Names follow `kubbi_<subsystem>_<name>_<unit>`; HTTP metrics are labelled by route template
//! (never the raw path, which holds tokens and ids). Rendering happens on `/metrics` requests.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Latency buckets in seconds: 100 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A histogram with fixed buckets, updated lock-free.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new(LATENCY_BUCKETS)
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, secs: f64) {
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Appends the `_bucket`, `_sum` and `_count` series; `labels` is `k="v",...` or empty.
    pub fn render(&self, name: &str, labels: &str, out: &mut String) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {total}");
    }
}

/// Kubbi lifecycle events counted on the leader that applied them.
#[derive(Default)]
pub struct Lifecycle {
    pub created: AtomicU64,
    pub claimed: AtomicU64,
    pub burned: AtomicU64,
    pub expired: AtomicU64,
    pub deleted: AtomicU64,
}

impl crate::raft::state_machine::ApplyObserver for Lifecycle {
    fn applied(&self, _: crate::ids::GroupId, outcome: &crate::state::Outcome, here: bool) {
        use crate::state::Outcome;
        if !here {
            return; // counted once, by the leader that proposed it
        }
        let add = |c: &AtomicU64, n: u64| {
            c.fetch_add(n, Ordering::Relaxed);
        };
        match outcome {
            Outcome::Created(_) => add(&self.created, 1),
            Outcome::Claimed(c) if !c.replayed => {
                add(&self.claimed, 1);
                if c.burned {
                    add(&self.burned, 1);
                }
            }
            Outcome::Deleted(_) => add(&self.deleted, 1),
            Outcome::Expired => add(&self.expired, 1),
            Outcome::Swept { expired, .. } => add(&self.expired, u64::from(*expired)),
            _ => {}
        }
    }

    fn state_replaced(&self, _: crate::ids::GroupId) {}
}

impl Lifecycle {
    pub fn render(&self, out: &mut String) {
        out.push_str(
            "# HELP kubbi_kubbis_total Kubbi lifecycle events applied by this node as leader.
",
        );
        out.push_str(
            "# TYPE kubbi_kubbis_total counter
",
        );
        for (event, c) in [
            ("created", &self.created),
            ("claimed", &self.claimed),
            ("burned", &self.burned),
            ("expired", &self.expired),
            ("deleted", &self.deleted),
        ] {
            let _ = writeln!(
                out,
                "kubbi_kubbis_total{{event=\"{event}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
    }
}

/// Everything a node measures itself, shared by its servers and state machines.
#[derive(Default)]
pub struct Metrics {
    pub http: HttpMetrics,
    pub lifecycle: std::sync::Arc<Lifecycle>,
}

/// HTTP request metrics by route template.
#[derive(Default)]
pub struct HttpMetrics {
    requests: Mutex<BTreeMap<(String, &'static str, u16), u64>>,
    latency: Mutex<BTreeMap<String, std::sync::Arc<Histogram>>>,
}

impl HttpMetrics {
    pub fn record(&self, route: &str, method: &'static str, status: u16, secs: f64) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((route.to_string(), method, status))
            .or_insert(0) += 1;
        let h = self
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(route.to_string())
            .or_default()
            .clone();
        h.observe(secs);
    }

    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP kubbi_http_requests_total HTTP requests by route template, method and status.\n");
        out.push_str("# TYPE kubbi_http_requests_total counter\n");
        for ((route, method, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "kubbi_http_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {n}",
                label(route)
            );
        }
        out.push_str(
            "# HELP kubbi_http_request_duration_seconds HTTP request latency by route template.\n",
        );
        out.push_str("# TYPE kubbi_http_request_duration_seconds histogram\n");
        for (route, h) in self
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            h.render(
                "kubbi_http_request_duration_seconds",
                &format!("route=\"{}\"", label(route)),
                out,
            );
        }
    }
}

/// Escapes a label value.
pub fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Appends one metric family with a single unlabelled sample.
pub fn gauge(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(0.0002);
        h.observe(0.003);
        h.observe(100.0);
        let mut out = String::new();
        h.render("x", "a=\"b\"", &mut out);
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.00025\"} 1"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.005\"} 2"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 3"), "{out}");
    }

    #[test]
    fn http_metrics_use_templates() {
        let m = HttpMetrics::default();
        m.record("/r/{token}/claim", "POST", 200, 0.001);
        m.record("/r/{token}/claim", "POST", 200, 0.002);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains(
            "kubbi_http_requests_total{route=\"/r/{token}/claim\",method=\"POST\",status=\"200\"} 2"
        ));
    }
}
