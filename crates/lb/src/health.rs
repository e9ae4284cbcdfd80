//! Active health checks: every `interval`, `GET path` on each backend over a
//! fresh connection (as HAProxy does, so a check also proves the backend
//! still accepts connections). `rise` passes in a row bring a backend up,
//! `fall` failures in a row take it down. The verdict logic
//! ([`HealthState`]) is free of I/O; [`run`] does the checking.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, Pool};
use crate::config::HealthConfig;

/// A backend's health as the checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthState {
    pub up: bool,
    streak: u32,
}

/// A change of verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    WentUp,
    WentDown,
}

impl HealthState {
    /// Backends start up: a new backend takes traffic at once.
    pub fn new_up() -> Self {
        HealthState {
            up: true,
            streak: 0,
        }
    }

    /// Feeds one check result; `streak` counts results that disagree with
    /// the current verdict.
    pub fn observe(&mut self, passed: bool, rise: u32, fall: u32) -> Option<Transition> {
        if passed == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { fall } else { rise };
        if self.streak < needed {
            return None;
        }
        self.up = passed;
        self.streak = 0;
        Some(if passed {
            Transition::WentUp
        } else {
            Transition::WentDown
        })
    }
}

/// Checks every backend of `pool` until `shutdown`.
pub async fn run(
    pool: Arc<Pool>,
    upstream: Arc<crate::upstream::UpstreamPool>,
    cfg: HealthConfig,
    shutdown: CancellationToken,
) {
    let mut states: HashMap<u64, HealthState> = HashMap::new();
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
            let state = states.entry(backend.id).or_insert_with(HealthState::new_up);
            let passed = result.is_ok();
            backend
                .stats
                .checks_failed
                .fetch_add(u64::from(!passed), Ordering::Relaxed);
            match state.observe(passed, cfg.rise, cfg.fall) {
                Some(Transition::WentDown) => {
                    backend.up.store(false, Ordering::Relaxed);
                    let reason = result.err().unwrap_or_default();
                    tracing::warn!(backend = %backend.name, %reason, "backend is DOWN (health check)");
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

/// One check: connect, `GET path`, a 2xx or 3xx answer within the timeout.
async fn check(
    b: &Backend,
    upstream: &crate::upstream::UpstreamPool,
    cfg: &HealthConfig,
) -> Result<(), String> {
    let attempt = async {
        let stream = upstream.connect(b).await.map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::get(cfg.path.as_str())
            .header(http::header::HOST, b.authority.as_str())
            .header(http::header::USER_AGENT, "scaleout-lb health check")
            .header(http::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    };
    match tokio::time::timeout(cfg.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {:?}", cfg.timeout)),
    }
}

/// How long, at most, until a dead backend is marked down by checks alone.
pub fn worst_detection(cfg: &HealthConfig) -> Duration {
    (cfg.interval + cfg.timeout) * cfg.fall
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_and_rise_thresholds() {
        let mut s = HealthState::new_up();
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(
            s.observe(true, 2, 3),
            None,
            "a pass breaks the failing streak"
        );
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(s.observe(false, 2, 3), Some(Transition::WentDown));
        assert!(!s.up);
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(s.observe(true, 2, 3), None);
        assert_eq!(s.observe(true, 2, 3), Some(Transition::WentUp));
        assert!(s.up);
    }
}
