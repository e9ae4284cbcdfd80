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
//! - [`proxy`]: the hot path — body buffering, forwarding headers, retries
//!   under a budget, upgrades; [`upstream`]: the per-worker connection pool.
//! - [`server`]: worker threads with SO_REUSEPORT listeners, TLS, timeouts,
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
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use config::{Algorithm, BackendConfig, HashOn, LbConfig};
pub use error::{ConfigError, Error, ProxyError};

use crate::backend::{BackendAddr, Clock, Pool};
use crate::proxy::Shared;

/// A load balancer whose sockets are bound and whose backends are resolved.
pub struct BoundLb {
    config: LbConfig,
    listeners: Vec<std::net::TcpListener>,
    admin: tokio::net::TcpListener,
    resolved: Vec<SocketAddr>,
    tls: Option<tokio_rustls::TlsAcceptor>,
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
    let workers = match config.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let listeners = server::bind_reuseport(config.listen, workers)?;
    let addr = listeners[0].local_addr()?;
    let admin = tokio::net::TcpListener::bind(config.admin)
        .await
        .map_err(|source| Error::Bind {
            addr: config.admin,
            source,
        })?;
    let admin_addr = admin.local_addr()?;
    Ok(BoundLb {
        config,
        listeners,
        admin,
        resolved,
        tls,
        addr,
        admin_addr,
        workers,
    })
}

impl BoundLb {
    /// Serves until `shutdown` is cancelled, then stops accepting, lets
    /// in-flight requests finish (up to the drain timeout) and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let BoundLb {
            config,
            listeners,
            admin,
            resolved,
            tls,
            addr,
            admin_addr,
            workers,
        } = self;
        let pool = Arc::new(Pool::new());
        for (cfg, at) in config.backends.iter().zip(resolved) {
            pool.add(cfg, at)?;
        }
        let shared = Arc::new(Shared {
            selection: selection::for_algorithm(config.algorithm),
            pool: pool.clone(),
            stats: Default::default(),
            clock: Clock::new(),
            scheme: if tls.is_some() { "https" } else { "http" },
            config,
        });
        tracing::info!(
            %addr, %admin_addr, workers,
            algorithm = ?shared.config.algorithm,
            backends = pool.snapshot().len(),
            "load balancer listening"
        );

        let conn_limit = Arc::new(tokio::sync::Semaphore::new(
            shared.config.limits.max_connections,
        ));
        let mut threads = Vec::with_capacity(workers);
        let (peers, inboxes) = server::peers(workers);
        for (index, (listener, inbox)) in listeners.into_iter().zip(inboxes).enumerate() {
            let setup = server::WorkerSetup {
                index,
                listener,
                shared: shared.clone(),
                tls: tls.clone(),
                conn_limit: conn_limit.clone(),
                shutdown: shutdown.clone(),
                peers: peers.clone(),
                inbox,
            };
            let thread = std::thread::Builder::new()
                .name(format!("lb-worker-{index}"))
                .spawn(move || server::run_worker(setup))?;
            threads.push(thread);
        }

        let health = shared.config.health.enabled.then(|| {
            tokio::spawn(health::run(
                pool.clone(),
                shared.config.health.clone(),
                shutdown.clone(),
            ))
        });
        let admin_server = axum::serve(admin, admin::router(shared.clone()))
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let admin_task = tokio::spawn(async move { admin_server.await });

        shutdown.cancelled().await;
        tracing::info!("load balancer draining");
        let joined = tokio::task::spawn_blocking(move || {
            threads.into_iter().map(|t| t.join()).collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Error::Worker(e.to_string()))?;
        if let Some(h) = health {
            h.abort();
        }
        let _ = admin_task.await;
        for result in joined {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::Worker("a worker thread panicked".into())),
            }
        }
        tracing::info!("load balancer stopped");
        Ok(())
    }
}
