//! Active health checks: every `interval`, `GET path` on each backend over a
//! fresh connection (as HAProxy does, so a check also proves the backend
//! still accepts connections). `rise` passes in a row bring a backend up,
//! `fall` failures in a row take it down. What passes and the verdict are
//! `scaleout-health`'s, shared with the DNS server; [`run`] does the
//! checking over the load balancer's own connections (plain or TLS).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use scaleout_health::{Thresholds, Transition, Verdict};
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, Pool};
use crate::config::HealthConfig;

/// Checks every backend of `pool` until `shutdown`.
pub async fn run(
    pool: Arc<Pool>,
    upstream: Arc<crate::upstream::UpstreamPool>,
    cfg: HealthConfig,
    went_down: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    let thresholds = Thresholds {
        rise: cfg.rise,
        fall: cfg.fall,
    };
    let mut states: HashMap<u64, Verdict> = HashMap::new();
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let backends = pool.list();
        let mut checks = tokio::task::JoinSet::new();
        for b in backends.iter() {
            let b = b.clone();
            let cfg = cfg.clone();
            let upstream = upstream.clone();
            checks.spawn(async move {
                let result = check(&b, &upstream, &cfg).await;
                (b, result)
            });
        }
        while let Some(joined) = checks.join_next().await {
            let Ok((backend, result)) = joined else {
                continue;
            };
            // A backend starts as it was added: up, or down until it
            // passes (one found by name).
            let state = states.entry(backend.id).or_insert_with(|| {
                if backend.up.load(Ordering::Relaxed) {
                    Verdict::new_up()
                } else {
                    Verdict::new_down()
                }
            });
            let passed = result.is_ok();
            backend
                .stats
                .checks_failed
                .fetch_add(u64::from(!passed), Ordering::Relaxed);
            match state.observe(passed, thresholds) {
                Some(Transition::WentDown) => {
                    backend.up.store(false, Ordering::Relaxed);
                    let reason = result.err().unwrap_or_default();
                    tracing::warn!(backend = %backend.name, %reason, "backend is DOWN (health check)");
                    // Names are looked up again: it may have moved.
                    went_down.notify_waiters();
                }
                Some(Transition::WentUp) => {
                    backend.up.store(true, Ordering::Relaxed);
                    // Coming back after checks pass also ends a passive ejection.
                    backend.ejected_until.store(0, Ordering::Relaxed);
                    backend.record_success();
                    tracing::info!(backend = %backend.name, "backend is UP (health check)");
                }
                None => {}
            }
        }
        states.retain(|id, _| backends.iter().any(|b| b.id == *id));
    }
}

/// One check: connect, `GET path`, a passing answer within the timeout.
async fn check(
    b: &Backend,
    upstream: &crate::upstream::UpstreamPool,
    cfg: &HealthConfig,
) -> Result<(), String> {
    scaleout_health::within(cfg.timeout, async {
        let stream = upstream.connect(b).await.map_err(|e| e.to_string())?;
        scaleout_health::probe(
            stream,
            b.authority.as_str(),
            cfg.path.as_str(),
            "scaleout-lb health check",
        )
        .await
    })
    .await
}
