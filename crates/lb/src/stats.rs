//! The load balancer's figures as plain atomics, updated on the request
//! path (no label lookups, no locks, no allocation per request);
//! [`crate::metrics`] writes them out when scraped.

use std::sync::atomic::{AtomicU64, Ordering};

pub use scaleout_metrics::Histogram;

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
