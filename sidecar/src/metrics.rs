//! The sidecar's own metrics, served at `GET /metrics` in the Prometheus text format (0.0.4): HTTP
//! requests by route and status class, usage ingestion (records accepted, duplicate, refused, of unknown
//! organizations), key resolution hits and misses, and database latency. Plain atomics; no labels that
//! carry keys or tenant data.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; 12],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            if secs <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {n}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {n}");
    }
}

#[derive(Default)]
pub struct Metrics {
    pub ingest_batches: AtomicU64,
    pub ingest_accepted: AtomicU64,
    pub ingest_duplicates: AtomicU64,
    /// Records of batches refused as invalid (the filter does not resend them: they are dropped).
    pub ingest_refused: AtomicU64,
    pub ingest_orphans: AtomicU64,
    pub resolve_hits: AtomicU64,
    pub resolve_misses: AtomicU64,
    /// Time spent in the database, by operation (`ingest`, `resolve`, `write`).
    pub db_ingest: Histogram,
    pub db_resolve: Histogram,
    pub db_write: Histogram,
    http: Mutex<BTreeMap<(String, String, u16), u64>>,
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    /// One finished HTTP request; `route` is the matched route template (never the raw path).
    pub fn http(&self, method: &str, route: &str, status: u16) {
        if let Ok(mut m) = self.http.lock() {
            *m.entry((method.to_string(), route.to_string(), status))
                .or_insert(0) += 1;
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        };
        counter(
            &mut out,
            "llmgw_sidecar_usage_batches_total",
            "Usage batches received from the filter.",
            &self.ingest_batches,
        );
        let _ = writeln!(
            out,
            "# HELP llmgw_sidecar_usage_records_total Usage records by outcome.\n\
             # TYPE llmgw_sidecar_usage_records_total counter"
        );
        for (outcome, v) in [
            ("accepted", &self.ingest_accepted),
            ("duplicate", &self.ingest_duplicates),
            ("refused", &self.ingest_refused),
            ("unknown_organization", &self.ingest_orphans),
        ] {
            let _ = writeln!(
                out,
                "llmgw_sidecar_usage_records_total{{outcome=\"{outcome}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP llmgw_sidecar_resolve_total Key resolutions by the filter, by result.\n\
             # TYPE llmgw_sidecar_resolve_total counter"
        );
        for (result, v) in [("hit", &self.resolve_hits), ("miss", &self.resolve_misses)] {
            let _ = writeln!(
                out,
                "llmgw_sidecar_resolve_total{{result=\"{result}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP llmgw_sidecar_db_duration_seconds Time spent in the database per operation.\n\
             # TYPE llmgw_sidecar_db_duration_seconds histogram"
        );
        for (op, h) in [
            ("ingest", &self.db_ingest),
            ("resolve", &self.db_resolve),
            ("write", &self.db_write),
        ] {
            h.render(
                &mut out,
                "llmgw_sidecar_db_duration_seconds",
                &format!("operation=\"{op}\""),
            );
        }
        let _ = writeln!(
            out,
            "# HELP llmgw_sidecar_http_requests_total HTTP requests by method, route and status.\n\
             # TYPE llmgw_sidecar_http_requests_total counter"
        );
        if let Ok(m) = self.http.lock() {
            for ((method, route, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "llmgw_sidecar_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        add(&m.ingest_accepted, 3);
        m.db_resolve.observe(Duration::from_millis(2));
        m.http("GET", "/v1/llm/providers", 200);
        let t = m.render();
        assert!(t.contains("llmgw_sidecar_usage_records_total{outcome=\"accepted\"} 3"));
        assert!(t.contains(
            "llmgw_sidecar_db_duration_seconds_bucket{operation=\"resolve\",le=\"0.0025\"} 1"
        ));
        assert!(t.contains(
            "llmgw_sidecar_db_duration_seconds_bucket{operation=\"resolve\",le=\"0.001\"} 0"
        ));
        assert!(t.contains("llmgw_sidecar_db_duration_seconds_count{operation=\"resolve\"} 1"));
        assert!(t.contains(
            "llmgw_sidecar_http_requests_total{method=\"GET\",route=\"/v1/llm/providers\",status=\"200\"} 1"
        ));
    }
}
