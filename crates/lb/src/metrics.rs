//! Metrics as plain atomics updated on the hot path (no label lookups, no
//! locks, no allocation per request), rendered as Prometheus text when
//! scraped.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::backend::Backend;

/// Upper bounds of the latency histogram buckets, in microseconds.
const BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros() as u64;
        if let Some(i) = BUCKETS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, le) in BUCKETS_US.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{}\"}} {cumulative}",
                *le as f64 / 1e6
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Per backend: responses by status class, failures, latency.
#[derive(Default)]
pub struct BackendStats {
    /// Responses by class: 1xx .. 5xx.
    pub responses: [AtomicU64; 5],
    /// Attempts that got no response (connect error, reset, timeout).
    pub failures: AtomicU64,
    pub ejections: AtomicU64,
    /// Ejections the pool's cap (`max_ejection_percent`) held back.
    pub ejections_refused: AtomicU64,
    pub checks_failed: AtomicU64,
    pub latency: Histogram,
}

impl BackendStats {
    pub fn record_status(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    pub fn requests(&self) -> u64 {
        self.responses
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    pub fn errors(&self) -> u64 {
        self.responses[4].load(Ordering::Relaxed) + self.failures.load(Ordering::Relaxed)
    }
}

/// The load balancer as a whole.
#[derive(Default)]
pub struct LbStats {
    /// Answers to clients by status class.
    pub responses: [AtomicU64; 5],
    pub retries: AtomicU64,
    /// Retries the budget refused.
    pub retries_refused: AtomicU64,
    pub no_backend: AtomicU64,
    pub connections_open: AtomicU64,
    pub connections_total: AtomicU64,
    /// Requests refused (429) for their client's rate.
    pub rate_limited: AtomicU64,
    pub latency: Histogram,
}

impl LbStats {
    pub fn record_status(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Request bodies held: gauges of memory and spool, counters of bodies
/// spooled, refused for lack of room and cut for arriving too slowly.
pub fn render_bodies(out: &mut String, bodies: &crate::spool::Bodies) {
    for (name, help, v) in [
        (
            "scaleout_lb_body_memory_bytes",
            "Request body bytes held in memory now.",
            bodies.memory_used() as u64,
        ),
        (
            "scaleout_lb_body_spool_bytes",
            "Request body bytes in the spool now.",
            bodies.spool_used(),
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    for (name, help, v) in [
        (
            "scaleout_lb_bodies_spooled_total",
            "Request bodies written to the spool.",
            &bodies.spooled,
        ),
        (
            "scaleout_lb_bodies_spool_full_total",
            "Request bodies refused (503) because the spool was full.",
            &bodies.spool_full,
        ),
        (
            "scaleout_lb_bodies_too_slow_total",
            "Request bodies cut (408) for arriving below the minimum rate.",
            &bodies.too_slow,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
}

/// The Prometheus text exposition of the whole load balancer.
pub fn render(stats: &LbStats, backends: &[std::sync::Arc<Backend>], clock_ms: u64) -> String {
    let mut out = String::with_capacity(4096 + backends.len() * 2048);
    let classes = ["1xx", "2xx", "3xx", "4xx", "5xx"];
    let _ = writeln!(
        out,
        "# HELP scaleout_lb_responses_total Answers to clients, by status class."
    );
    let _ = writeln!(out, "# TYPE scaleout_lb_responses_total counter");
    for (i, c) in classes.iter().enumerate() {
        let _ = writeln!(
            out,
            "scaleout_lb_responses_total{{code=\"{c}\"}} {}",
            stats.responses[i].load(Ordering::Relaxed)
        );
    }
    for (name, help, v) in [
        (
            "scaleout_lb_retries_total",
            "Requests sent again to another backend.",
            &stats.retries,
        ),
        (
            "scaleout_lb_retries_refused_total",
            "Retries the retry budget refused.",
            &stats.retries_refused,
        ),
        (
            "scaleout_lb_no_backend_total",
            "Requests answered 503 because no backend was available.",
            &stats.no_backend,
        ),
        (
            "scaleout_lb_connections_total",
            "Client connections accepted.",
            &stats.connections_total,
        ),
        (
            "scaleout_lb_rate_limited_total",
            "Requests refused (429) because their client address was over its rate or had too many in flight.",
            &stats.rate_limited,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP scaleout_lb_connections_open Client connections open now.\n# TYPE scaleout_lb_connections_open gauge\nscaleout_lb_connections_open {}",
        stats.connections_open.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP scaleout_lb_request_duration_seconds Time to answer a client, retries included."
    );
    let _ = writeln!(out, "# TYPE scaleout_lb_request_duration_seconds histogram");
    stats.latency.render(
        &mut out,
        "scaleout_lb_request_duration_seconds",
        "lb=\"all\"",
    );

    let _ = writeln!(out, "# HELP scaleout_lb_backend_responses_total Backend responses, by backend and status class.");
    let _ = writeln!(out, "# TYPE scaleout_lb_backend_responses_total counter");
    for b in backends {
        let n = escape_label(&b.name);
        for (i, c) in classes.iter().enumerate() {
            let _ = writeln!(
                out,
                "scaleout_lb_backend_responses_total{{backend=\"{n}\",code=\"{c}\"}} {}",
                b.stats.responses[i].load(Ordering::Relaxed)
            );
        }
    }
    type Gauge = (
        &'static str,
        &'static str,
        &'static str,
        fn(&Backend, u64) -> u64,
    );
    let per_backend: [Gauge; 7] = [
        (
            "scaleout_lb_backend_failures_total",
            "counter",
            "Attempts that got no response (connect error, reset, timeout).",
            |b, _| b.stats.failures.load(Ordering::Relaxed),
        ),
        (
            "scaleout_lb_backend_ejections_total",
            "counter",
            "Passive outlier ejections.",
            |b, _| b.stats.ejections.load(Ordering::Relaxed),
        ),
        (
            "scaleout_lb_backend_ejections_refused_total",
            "counter",
            "Ejections held back because the pool's ejected share was at its cap.",
            |b, _| b.stats.ejections_refused.load(Ordering::Relaxed),
        ),
        (
            "scaleout_lb_backend_health_checks_failed_total",
            "counter",
            "Active health checks that failed.",
            |b, _| b.stats.checks_failed.load(Ordering::Relaxed),
        ),
        (
            "scaleout_lb_backend_up",
            "gauge",
            "1 when active health checks pass.",
            |b, _| u64::from(b.up.load(Ordering::Relaxed)),
        ),
        (
            "scaleout_lb_backend_available",
            "gauge",
            "1 when the backend takes new requests (up, not ejected, not draining, weight > 0).",
            |b, now| u64::from(b.available(now)),
        ),
        (
            "scaleout_lb_backend_in_flight",
            "gauge",
            "Requests in flight.",
            |b, _| b.in_flight(),
        ),
    ];
    for (name, kind, help, get) in per_backend {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for b in backends {
            let _ = writeln!(
                out,
                "{name}{{backend=\"{}\"}} {}",
                escape_label(&b.name),
                get(b, clock_ms)
            );
        }
    }
    let _ = writeln!(out, "# HELP scaleout_lb_backend_weight Configured weight.\n# TYPE scaleout_lb_backend_weight gauge");
    for b in backends {
        let _ = writeln!(
            out,
            "scaleout_lb_backend_weight{{backend=\"{}\"}} {}",
            escape_label(&b.name),
            b.weight()
        );
    }
    let _ = writeln!(out, "# HELP scaleout_lb_backend_ewma_seconds PeakEWMA latency estimate.\n# TYPE scaleout_lb_backend_ewma_seconds gauge");
    let now = Instant::now();
    for b in backends {
        let _ = writeln!(
            out,
            "scaleout_lb_backend_ewma_seconds{{backend=\"{}\"}} {}",
            escape_label(&b.name),
            b.ewma_estimate(now).as_secs_f64()
        );
    }
    let _ = writeln!(
        out,
        "# HELP scaleout_lb_backend_request_duration_seconds Time to a backend's response head."
    );
    let _ = writeln!(
        out,
        "# TYPE scaleout_lb_backend_request_duration_seconds histogram"
    );
    for b in backends {
        b.stats.latency.render(
            &mut out,
            "scaleout_lb_backend_request_duration_seconds",
            &format!("backend=\"{}\"", escape_label(&b.name)),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0001\"} 1\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0005\"} 2\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"10\"} 2\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_count{a=\"b\"} 3\n"));
    }
}
