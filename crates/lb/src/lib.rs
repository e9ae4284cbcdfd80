//! `scaleout-lb`: the seed's load balancer — an L7 HTTP load balancer that
//! spreads traffic over the web servers, stops sending to a failed one and
//! starts sending to a new one at once (claims C6–C8).
//!
//! - [`config`]: typed config (flags and TOML say the same things).
//! - [`backend`]: backends (atomics shared by workers) and the pool.
//! - [`selection`]: round-robin, smooth weighted, least-conn, P2C-PeakEWMA,
//!   rendezvous hashing, behind the [`selection::BackendSelection`] trait.
//! - [`health`]: active checks with rise/fall; passive outlier ejection lives
//!   on [`backend::Backend`].
//! - [`fast`]: the HTTP/1.1 hot path (heads rewritten as bytes); [`proxy`]:
//!   the hyper path (h2c, TLS), and the retry loop both share;
//!   [`upstream`]: the lean HTTP/1.1 client and its connection pool.
//! - [`server`]: the accept loop, h1/h2 dispatch, TLS, timeouts,
//!   drain; [`admin`]: the admin API; [`metrics`]: Prometheus text.
//!
//! Entry points: [`bind`] (validate, resolve, bind every socket), then
//! [`BoundLb::run`] until the shutdown token is cancelled, which stops
//! accepting and drains in-flight requests.

pub mod admin;
pub mod backend;
pub mod body;
pub mod config;
pub mod error;
pub mod ewma;
pub mod fast;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod selection;
pub mod server;
pub mod spool;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use config::{Algorithm, BackendConfig, HashOn, LbConfig};
pub use error::{ConfigError, Error, ProxyError};

use std::time::Duration;

use tower::retry::budget::TpsBudget;

use crate::backend::{BackendAddr, Clock, Pool};
use crate::proxy::{Shared, Worker};
use crate::upstream::UpstreamPool;

/// Connections the admin API takes at once.
pub const ADMIN_MAX_CONNECTIONS: usize = 256;

/// A load balancer whose sockets are bound and whose backends are resolved.
pub struct BoundLb {
    config: LbConfig,
    listener: std::net::TcpListener,
    admin: tokio::net::TcpListener,
    resolved: Vec<SocketAddr>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    upstream_tls: Option<tokio_rustls::TlsConnector>,
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    pub workers: usize,
}

/// Validates the config, resolves the backends, loads TLS material and
/// binds the listeners: every error a user can fix shows up here, before
/// anything serves.
pub async fn bind(config: LbConfig) -> Result<BoundLb, Error> {
    config.validate()?;
    let mut resolved = Vec::with_capacity(config.backends.len());
    for b in &config.backends {
        resolved.push(BackendAddr::parse(&b.url)?.resolve().await?);
    }
    let tls = config.tls.as_ref().map(tls::acceptor).transpose()?;
    let upstream_tls = config
        .upstream_tls
        .as_ref()
        .map(tls::connector)
        .transpose()?;
    let listener = server::bind(config.listen)?;
    let addr = listener.local_addr()?;
    let admin = tokio::net::TcpListener::bind(config.admin)
        .await
        .map_err(|source| Error::Bind {
            addr: config.admin,
            source,
        })?;
    let admin_addr = admin.local_addr()?;
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    Ok(BoundLb {
        config,
        listener,
        admin,
        resolved,
        tls,
        upstream_tls,
        addr,
        admin_addr,
        workers,
    })
}

/// The runtime threads `workers = 0` means: one per CPU.
pub fn worker_threads(config: &LbConfig) -> usize {
    match config.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

impl BoundLb {
    /// Serves until `shutdown` is cancelled, then stops accepting, lets
    /// in-flight requests finish (up to the drain timeout) and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let BoundLb {
            config,
            listener,
            admin,
            resolved,
            tls,
            upstream_tls,
            addr,
            admin_addr,
            workers,
        } = self;
        let pool = Arc::new(Pool::new());
        for (cfg, at) in config.backends.iter().zip(resolved) {
            pool.add(cfg, at)?;
        }
        let retry = config.retry.clone();
        let upstream = UpstreamPool::new(
            config.limits.max_idle_per_backend,
            config.timeouts.connect,
            upstream_tls,
        );
        let shared = Arc::new(Shared {
            selection: selection::for_algorithm(config.algorithm),
            pool: pool.clone(),
            stats: Default::default(),
            clock: Clock::new(),
            scheme: if tls.is_some() { "https" } else { "http" },
            bodies: Arc::new(spool::Bodies::new(&config.limits, &config.timeouts)),
            rate: proxy::RateLimit::new(config.limits.rate_per_ip, config.limits.rate_burst),
            in_flight: proxy::InFlightPerIp::new(config.limits.max_in_flight_per_ip),
            config,
        });
        let worker = Arc::new(Worker {
            shared: shared.clone(),
            upstream,
            budget: TpsBudget::new(
                Duration::from_secs(10),
                retry.min_per_sec,
                retry.budget_ratio,
            ),
        });
        tracing::info!(
            %addr, %admin_addr, workers,
            algorithm = ?shared.config.algorithm,
            backends = pool.snapshot().len(),
            "load balancer listening"
        );

        let health = shared.config.health.enabled.then(|| {
            tokio::spawn(health::run(
                pool.clone(),
                worker.upstream.clone(),
                shared.config.health.clone(),
                shutdown.clone(),
            ))
        });
        // The admin API has the bounds of every other server: a head
        // timeout and a connection cap of its own, so idle sockets there
        // cannot use up the descriptors the data plane needs.
        let admin_limits = scaleout_serve::Limits {
            header_timeout: shared.config.timeouts.header_read,
            max_connections: ADMIN_MAX_CONNECTIONS,
            drain: Duration::from_secs(5),
        };
        let admin_server = scaleout_serve::serve(
            admin,
            admin::router(shared.clone()),
            admin_limits,
            Arc::default(),
            None,
            shutdown.clone(),
        );
        let admin_task = tokio::spawn(admin_server);

        let served = server::serve(listener, worker, tls, shutdown.clone()).await;
        if let Some(h) = health {
            h.abort();
        }
        let _ = admin_task.await;
        served?;
        tracing::info!("load balancer stopped");
        Ok(())
    }
}
