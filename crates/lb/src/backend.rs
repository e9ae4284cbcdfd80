//! Backends and the pool: what the load balancer knows about each upstream
//! web server, shared by the workers (atomics; no lock on the hot path), and
//! the pool itself, swapped whole when the admin API changes it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::addr::BackendAddr;
use crate::config::{BackendConfig, OutlierConfig};
use crate::error::ConfigError;
use crate::ewma::PeakEwma;
use crate::stats::BackendStats;

/// Time as milliseconds since the load balancer started: fits an atomic.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            start: Instant::now(),
        }
    }

    pub fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_millis() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// One upstream web server.
pub struct Backend {
    /// Unique for the life of the process (never reused after removal).
    pub id: u64,
    pub name: String,
    pub url: String,
    pub addr: SocketAddr,
    /// `host:port` as configured, sent as `Host` by health checks.
    pub authority: String,
    /// The host as configured: the name its TLS certificate must carry.
    pub host: String,
    /// Reached over TLS (`https://`).
    pub tls: bool,
    pub weight: AtomicU32,
    /// Active health check verdict (true until checks say otherwise).
    pub up: AtomicBool,
    /// Set through the admin API: no new requests, in-flight ones finish.
    pub draining: AtomicBool,
    pub in_flight: AtomicU64,
    /// Passive outlier detection state.
    pub consecutive_failures: AtomicU32,
    pub ejections_in_a_row: AtomicU32,
    /// `Clock` millis until which the backend is ejected (0: not ejected).
    pub ejected_until: AtomicU64,
    pub ewma: Mutex<PeakEwma>,
    pub stats: BackendStats,
}

impl Backend {
    pub fn new(id: u64, cfg: &BackendConfig, addr: SocketAddr) -> Result<Self, ConfigError> {
        let parsed = BackendAddr::parse(&cfg.url)?;
        let authority = parsed.authority();
        Ok(Backend {
            id,
            name: cfg.name.clone().unwrap_or_else(|| authority.clone()),
            url: format!(
                "{}://{authority}",
                if parsed.tls { "https" } else { "http" }
            ),
            addr,
            authority,
            host: parsed.host,
            tls: parsed.tls,
            weight: AtomicU32::new(cfg.weight),
            up: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections_in_a_row: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ewma: Mutex::new(PeakEwma::new(Duration::from_millis(1), Instant::now())),
            stats: BackendStats::default(),
        })
    }

    /// May this backend take a new request at `now_ms`?
    pub fn available(&self, now_ms: u64) -> bool {
        self.up.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
            && self.weight.load(Ordering::Relaxed) > 0
            && self.ejected_until.load(Ordering::Relaxed) <= now_ms
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn ewma_estimate(&self, now: Instant) -> Duration {
        self.ewma
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .estimate(now)
    }

    /// Feeds the latency estimate. Never waits: when another thread holds
    /// the estimate, this sample is skipped (an estimate loses nothing by it).
    pub fn observe_latency(&self, rtt: Duration, now: Instant) {
        if let Ok(mut e) = self.ewma.try_lock() {
            e.observe(rtt, now);
        }
    }

    /// A request to this backend succeeded: the failure streak ends.
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.ejections_in_a_row.load(Ordering::Relaxed) != 0 {
            self.ejections_in_a_row.store(0, Ordering::Relaxed);
        }
    }

    /// A request to this backend failed; ejects it when the streak reaches
    /// the threshold and `may_eject` agrees (the pool's ejection cap).
    /// Returns the ejection, if one started.
    pub fn record_failure(
        &self,
        cfg: &OutlierConfig,
        now_ms: u64,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<Duration> {
        if cfg.consecutive_failures == 0 {
            return None;
        }
        let streak = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if streak < cfg.consecutive_failures {
            return None;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if !may_eject() {
            self.stats.ejections_refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let n = self.ejections_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        let length = ejection_length(cfg, n);
        self.ejected_until
            .store(now_ms + length.as_millis() as u64, Ordering::Relaxed);
        self.stats.ejections.fetch_add(1, Ordering::Relaxed);
        Some(length)
    }
}

/// Whether one more of `pool` may be ejected at `now_ms` without the
/// ejected exceeding `max_percent` of it.
pub fn may_eject_one_more(pool: &[Arc<Backend>], max_percent: u32, now_ms: u64) -> bool {
    let ejected = pool
        .iter()
        .filter(|b| b.ejected_until.load(Ordering::Relaxed) > now_ms)
        .count() as u64;
    (ejected + 1) * 100 <= pool.len() as u64 * u64::from(max_percent)
}

/// The n-th ejection in a row lasts base × 2^(n-1), at most max.
pub fn ejection_length(cfg: &OutlierConfig, n: u32) -> Duration {
    let factor = 1u32
        .checked_shl(n.saturating_sub(1).min(31))
        .unwrap_or(u32::MAX);
    cfg.base_ejection
        .saturating_mul(factor)
        .min(cfg.max_ejection)
}

/// The current set of backends. Readers take a snapshot (`load`) per
/// request; the admin API replaces the whole list.
pub struct Pool {
    backends: ArcSwap<Vec<Arc<Backend>>>,
    next_id: AtomicU64,
    changes: Mutex<()>,
}

impl Pool {
    pub fn new() -> Self {
        Pool {
            backends: ArcSwap::from_pointee(Vec::new()),
            next_id: AtomicU64::new(1),
            changes: Mutex::new(()),
        }
    }

    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Vec<Arc<Backend>>>> {
        self.backends.load()
    }

    pub fn list(&self) -> Arc<Vec<Arc<Backend>>> {
        self.backends.load_full()
    }

    pub fn find(&self, name: &str) -> Option<Arc<Backend>> {
        self.backends
            .load()
            .iter()
            .find(|b| b.name == name)
            .cloned()
    }

    /// Adds a backend; its name must be new.
    pub fn add(&self, cfg: &BackendConfig, addr: SocketAddr) -> Result<Arc<Backend>, ConfigError> {
        let _guard = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let backend = Arc::new(Backend::new(id, cfg, addr)?);
        let current = self.backends.load_full();
        if current.iter().any(|b| b.name == backend.name) {
            return Err(ConfigError::new(format!(
                "a backend named {:?} is already in the pool",
                backend.name
            )));
        }
        let mut next = Vec::with_capacity(current.len() + 1);
        next.extend(current.iter().cloned());
        next.push(backend.clone());
        self.backends.store(Arc::new(next));
        Ok(backend)
    }

    /// Takes a backend out of the pool; requests in flight on it finish.
    pub fn remove(&self, name: &str) -> Option<Arc<Backend>> {
        let _guard = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.backends.load_full();
        let gone = current.iter().find(|b| b.name == name).cloned()?;
        let next: Vec<_> = current
            .iter()
            .filter(|b| b.id != gone.id)
            .cloned()
            .collect();
        self.backends.store(Arc::new(next));
        Some(gone)
    }
}

impl Default for Pool {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> Backend {
        let cfg = BackendConfig::new("http://127.0.0.1:9");
        Backend::new(1, &cfg, "127.0.0.1:9".parse().unwrap()).unwrap()
    }

    #[test]
    fn consecutive_failures_eject_with_a_growing_back_off() {
        let cfg = OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(5),
            max_ejection_percent: 100,
        };
        let b = backend();
        assert!(b.available(0));
        assert_eq!(b.record_failure(&cfg, 0, || true), None);
        assert_eq!(b.record_failure(&cfg, 0, || true), None);
        assert_eq!(
            b.record_failure(&cfg, 0, || true),
            Some(Duration::from_secs(1))
        );
        assert!(!b.available(999));
        assert!(b.available(1000));
        // Still failing after the ejection: the next one is twice as long.
        for _ in 0..2 {
            b.record_failure(&cfg, 1000, || true);
        }
        assert_eq!(
            b.record_failure(&cfg, 1000, || true),
            Some(Duration::from_secs(2))
        );
        assert!(!b.available(2999));
        // A success resets both streaks.
        b.record_success();
        for _ in 0..2 {
            b.record_failure(&cfg, 5000, || true);
        }
        assert_eq!(
            b.record_failure(&cfg, 5000, || true),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            ejection_length(&cfg, 10),
            Duration::from_secs(5),
            "capped at max"
        );
        assert_eq!(ejection_length(&cfg, 100), Duration::from_secs(5));
    }

    /// The pool's cap: with half the pool at most, two of four backends
    /// may be out at once, never the third; an ejection that is over
    /// makes room again.
    #[test]
    fn no_more_than_the_cap_is_ejected_at_once() {
        let cfg = OutlierConfig {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(5),
            max_ejection_percent: 50,
        };
        let pool: Vec<Arc<Backend>> = (0..4).map(|_| Arc::new(backend())).collect();
        let fail = |i: usize, now: u64| {
            pool[i].record_failure(&cfg, now, || {
                may_eject_one_more(&pool, cfg.max_ejection_percent, now)
            })
        };
        assert!(fail(0, 0).is_some());
        assert!(fail(1, 0).is_some());
        assert!(fail(2, 0).is_none(), "a third would leave less than half");
        assert!(pool[2].available(0));
        assert_eq!(pool[2].stats.ejections_refused.load(Ordering::Relaxed), 1);
        assert!(fail(2, 1000).is_some(), "the first two are back at 1000 ms");
        assert!(
            !may_eject_one_more(&pool[..1], 50, 0),
            "a pool of one keeps its backend"
        );
    }

    #[test]
    fn pool_adds_finds_and_removes_by_name() {
        let pool = Pool::new();
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        pool.add(&BackendConfig::new("http://127.0.0.1:9"), addr)
            .unwrap();
        assert!(
            pool.add(&BackendConfig::new("http://127.0.0.1:9"), addr)
                .is_err(),
            "duplicate name"
        );
        let named = BackendConfig {
            name: Some("web-2".into()),
            ..BackendConfig::new("http://127.0.0.1:10")
        };
        let b = pool.add(&named, addr).unwrap();
        assert_eq!(pool.find("web-2").unwrap().id, b.id);
        assert_eq!(pool.snapshot().len(), 2);
        assert!(pool.remove("web-2").is_some());
        assert!(pool.remove("web-2").is_none());
        assert_eq!(pool.snapshot().len(), 1);
    }
}
