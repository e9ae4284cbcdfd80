//! `/metrics`: the figures of [`crate::stats`], of every backend and of the
//! body spool, written when scraped through `scaleout-metrics`
//! (prometheus-client's encoder, as every role).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use scaleout_metrics::{Label, Labels, Writer};

use crate::backend::Backend;
use crate::stats::LbStats;

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Backends found by name.
pub fn write_discovery(w: &mut Writer<'_>, d: &crate::discover::DiscoveryStats) -> fmt::Result {
    for (name, help, v) in [
        (
            "scaleout_lb_discovery_lookups_total",
            "Lookups of the names backends are found by.",
            &d.lookups,
        ),
        (
            "scaleout_lb_discovery_lookups_failed_total",
            "Lookups that failed or found nothing (the backends stayed).",
            &d.lookups_failed,
        ),
        (
            "scaleout_lb_discovery_added_total",
            "Backends added because their name's answer had a new address.",
            &d.added,
        ),
        (
            "scaleout_lb_discovery_removed_total",
            "Backends removed because their address left their name's answer.",
            &d.removed,
        ),
    ] {
        w.counter(name, help, v.load(Ordering::Relaxed))?;
    }
    Ok(())
}

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
