//! What both request paths share once a request is parsed: admission (the
//! client's rate and in-flight slots), [`with_retries`] (pick a backend,
//! try it, retry elsewhere when that is safe and the budget allows, feed
//! outlier detection), and [`record_request`] (figures and the access
//! log). The paths differ only in how they read and write HTTP: bytes in
//! [`crate::fast`], hyper's types in [`crate::proxy`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use http::StatusCode;
use tower::retry::budget::{Budget, TpsBudget};

use crate::backend::{Backend, Clock, Pool};
use crate::config::LbConfig;
use crate::conn::ConnInfo;
use crate::error::ProxyError;
use crate::limits::{InFlightPerIp, IpSlot, RateLimit};
use crate::selection::{BackendSelection, Pick};
use crate::spool::Bodies;
use crate::stats::LbStats;
use crate::upstream::UpstreamPool;

/// What the request path reads: configuration, the pool, the figures.
pub struct Shared {
    pub config: LbConfig,
    pub pool: Arc<Pool>,
    pub selection: Box<dyn BackendSelection>,

    pub stats: LbStats,
    pub clock: Clock,
    /// `http` or `https`: what clients used.
    pub scheme: &'static str,
    /// Request bodies held, in memory and in the spool.
    pub bodies: Arc<Bodies>,
    /// Requests per client address, when limited.
    pub rate: Option<RateLimit>,
    /// Requests in flight per client address, when limited.
    pub in_flight: Option<Arc<InFlightPerIp>>,
    /// Backends found by name: lookups, additions, removals.
    pub discovery: Arc<crate::discover::DiscoveryStats>,
}

/// The request handler's context: one for the whole load balancer,
/// shared by every connection task.
pub struct Worker {
    pub shared: Arc<Shared>,
    pub upstream: Arc<UpstreamPool>,
    /// The retry budget (tower's: a share of recent requests plus a
    /// per-second minimum).
    pub budget: TpsBudget,
}

/// At most this many tries per request are tracked (and made).
const MAX_TRIED: usize = 8;

/// A slot for this request's client, or the 429 that refuses it.
pub(crate) fn take_slot(shared: &Shared, conn: &ConnInfo) -> Result<Option<IpSlot>, ProxyError> {
    match &shared.in_flight {
        None => Ok(None),
        Some(table) => match table.acquire(conn.client.ip().to_canonical()) {
            Some(slot) => Ok(Some(slot)),
            None => {
                shared.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                Err(ProxyError::TooManyInFlight)
            }
        },
    }
}

/// Refuses a request past its client's rate.
pub(crate) fn check_rate(shared: &Shared, conn: &ConnInfo) -> Result<(), ProxyError> {
    match &shared.rate {
        Some(rate) if !rate.allows(conn.client.ip().to_canonical()) => {
            shared.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            Err(ProxyError::RateLimited)
        }
        _ => Ok(()),
    }
}

/// Counts and times one answered request, and logs it when asked to.
pub(crate) fn record_request(
    shared: &Shared,
    conn: &ConnInfo,
    status: u16,
    start: Instant,
    backend: Option<&str>,
    attempts: u32,
    request_id: &[u8],
) {
    let elapsed = start.elapsed();
    shared.stats.record_status(status);
    shared.stats.latency.observe(elapsed);
    if shared.config.access_log {
        tracing::info!(
            target: "scaleout_lb::access",
            client = %conn.client,
            status,
            backend = backend.unwrap_or("-"),
            attempts,
            micros = elapsed.as_micros() as u64,
            request_id = %std::str::from_utf8(request_id).unwrap_or("-"),
        );
    }
}

/// What a proxied attempt returns, as far as retries care.
pub(crate) trait HasStatus {
    fn status_code(&self) -> StatusCode;
}

/// The end of [`with_retries`]: the answer or the last error, the backend
/// that gave it and how many backends were tried.
pub(crate) struct Outcome<R> {
    pub result: Result<R, ProxyError>,
    pub backend: Option<Arc<Backend>>,
    pub attempts: u32,
}

/// Picks a backend and makes `attempt` on it; on a failure that is safe to
/// retry (see [`ProxyError::retryable`], and 502/503 answers to idempotent
/// requests) and while the retry budget allows, tries another backend.
/// Feeds passive outlier detection with every result.
pub(crate) async fn with_retries<R, F, Fut>(
    worker: &Worker,
    key: Option<u64>,
    idempotent: bool,
    mut attempt: F,
) -> Outcome<R>
where
    R: HasStatus,
    F: FnMut(Arc<Backend>) -> Fut,
    Fut: std::future::Future<Output = Result<R, ProxyError>>,
{
    let shared = &worker.shared;
    worker.budget.deposit();
    let max_attempts = (shared.config.retry.max_attempts as usize).min(MAX_TRIED);
    let mut tried = [0u64; MAX_TRIED];
    let mut n_tried = 0usize;
    let mut last_error: Option<ProxyError> = None;
    loop {
        let now = Instant::now();
        let now_ms = shared.clock.millis(now);
        let chosen = {
            let snapshot = shared.pool.snapshot();
            let already = &tried[..n_tried];
            let usable = |b: &Backend| b.available(now_ms) && !already.contains(&b.id);
            let pick = Pick {
                usable: &usable,
                key,
                now,
            };
            shared.selection.select(&snapshot, &pick).cloned()
        };
        let Some(backend) = chosen else {
            let err = last_error.unwrap_or_else(|| {
                shared.stats.no_backend.fetch_add(1, Ordering::Relaxed);
                ProxyError::NoBackend
            });
            return Outcome {
                result: Err(err),
                backend: None,
                attempts: n_tried as u32,
            };
        };
        tried[n_tried] = backend.id;
        n_tried += 1;
        let retry_allowed = n_tried < max_attempts;
        match attempt(backend.clone()).await {
            Ok(resp) => {
                let status = resp.status_code();
                if status.is_server_error() {
                    record_failure(shared, &backend, now_ms);
                } else {
                    backend.record_success();
                }
                let replayable = matches!(
                    status,
                    StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
                ) && idempotent;
                if replayable && retry_allowed && take_retry(worker) {
                    tracing::debug!(backend = %backend.name, %status, "retrying on another backend");
                    continue;
                }
                return Outcome {
                    result: Ok(resp),
                    backend: Some(backend),
                    attempts: n_tried as u32,
                };
            }
            Err(e) => {
                backend.stats.failures.fetch_add(1, Ordering::Relaxed);
                record_failure(shared, &backend, now_ms);
                tracing::debug!(backend = %backend.name, error = %e, "attempt failed");
                if e.retryable(idempotent) && retry_allowed && take_retry(worker) {
                    last_error = Some(e);
                    continue;
                }
                return Outcome {
                    result: Err(e),
                    backend: Some(backend),
                    attempts: n_tried as u32,
                };
            }
        }
    }
}

fn record_failure(shared: &Shared, backend: &Backend, now_ms: u64) {
    let may_eject = || {
        let pool = shared.pool.snapshot();
        crate::backend::may_eject_one_more(
            &pool,
            shared.config.outlier.max_ejection_percent,
            now_ms,
        )
    };
    if let Some(length) = backend.record_failure(&shared.config.outlier, now_ms, may_eject) {
        tracing::warn!(backend = %backend.name, ejected_for = ?length, "backend ejected (consecutive failures)");
    }
}

fn take_retry(worker: &Worker) -> bool {
    let shared = &worker.shared;
    if worker.budget.withdraw() {
        shared.stats.retries.fetch_add(1, Ordering::Relaxed);
        true
    } else {
        shared.stats.retries_refused.fetch_add(1, Ordering::Relaxed);
        false
    }
}

pub(crate) struct InFlight<'a>(pub(crate) &'a Backend);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
