//! Metrics as plain atomics updated on the hot path (no label lookups, no
//! locks, no allocation per request), written when scraped through
//! `scaleout-metrics` (prometheus-client's encoder, as every role).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use scaleout_metrics::Histogram;
use scaleout_metrics::{Label, Labels, Writer};

use crate::backend::Backend;

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

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The whole load balancer's figures, as read now.
pub fn write(
    w: &mut Writer<'_>,
    stats: &LbStats,
    backends: &[Arc<Backend>],
    bodies: &crate::spool::Bodies,
    clock_ms: u64,
) -> fmt::Result {
    w.counters(
        "scaleout_lb_responses_total",
        "Answers to clients, by status class.",
        CLASSES
            .iter()
            .zip(&stats.responses)
            .map(|(c, n)| (Labels([Label("code", c)]), n.load(Ordering::Relaxed))),
    )?;
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
        w.counter(name, help, v.load(Ordering::Relaxed))?;
    }
    w.gauge(
        "scaleout_lb_connections_open",
        "Client connections open now.",
        stats.connections_open.load(Ordering::Relaxed),
    )?;
    w.gauge(
        "scaleout_lb_body_memory_bytes",
        "Request body bytes held in memory now.",
        bodies.memory_used() as u64,
    )?;
    w.gauge(
        "scaleout_lb_body_spool_bytes",
        "Request body bytes in the spool now.",
        bodies.spool_used(),
    )?;
    w.histograms(
        "scaleout_lb_request_duration_seconds",
        "Time to answer a client, retries included.",
        [(Labels([Label("lb", "all")]), &stats.latency)],
    )?;

    w.counters(
        "scaleout_lb_backend_responses_total",
        "Backend responses, by backend and status class.",
        backends.iter().flat_map(|b| {
            CLASSES.iter().zip(&b.stats.responses).map(|(c, n)| {
                (
                    Labels([Label("backend", &b.name), Label("code", c)]),
                    n.load(Ordering::Relaxed),
                )
            })
        }),
    )?;
    let each = |get: fn(&Backend) -> &AtomicU64| {
        backends.iter().map(move |b| {
            (
                Labels([Label("backend", &b.name)]),
                get(b).load(Ordering::Relaxed),
            )
        })
    };
    w.counters(
        "scaleout_lb_backend_failures_total",
        "Attempts that got no response (connect error, reset, timeout).",
        each(|b| &b.stats.failures),
    )?;
    w.counters(
        "scaleout_lb_backend_ejections_total",
        "Passive outlier ejections.",
        each(|b| &b.stats.ejections),
    )?;
    w.counters(
        "scaleout_lb_backend_ejections_refused_total",
        "Ejections held back because the pool's ejected share was at its cap.",
        each(|b| &b.stats.ejections_refused),
    )?;
    w.counters(
        "scaleout_lb_backend_health_checks_failed_total",
        "Active health checks that failed.",
        each(|b| &b.stats.checks_failed),
    )?;
    let gauge = |get: &dyn Fn(&Backend) -> u64| -> Vec<_> {
        backends
            .iter()
            .map(|b| (Labels([Label("backend", &b.name)]), get(b)))
            .collect()
    };
    w.gauges(
        "scaleout_lb_backend_up",
        "1 when active health checks pass.",
        gauge(&|b| u64::from(b.up.load(Ordering::Relaxed))),
    )?;
    w.gauges(
        "scaleout_lb_backend_available",
        "1 when the backend takes new requests (up, not ejected, not draining, weight > 0).",
        gauge(&|b| u64::from(b.available(clock_ms))),
    )?;
    w.gauges(
        "scaleout_lb_backend_in_flight",
        "Requests in flight.",
        gauge(&|b| b.in_flight()),
    )?;
    w.gauges(
        "scaleout_lb_backend_weight",
        "Configured weight.",
        gauge(&|b| u64::from(b.weight())),
    )?;
    let now = Instant::now();
    w.gauges(
        "scaleout_lb_backend_ewma_seconds",
        "PeakEWMA latency estimate.",
        backends.iter().map(|b| {
            (
                Labels([Label("backend", &b.name)]),
                b.ewma_estimate(now).as_secs_f64(),
            )
        }),
    )?;
    w.histograms(
        "scaleout_lb_backend_request_duration_seconds",
        "Time to a backend's response head.",
        backends
            .iter()
            .map(|b| (Labels([Label("backend", &b.name)]), &b.stats.latency)),
    )
}
