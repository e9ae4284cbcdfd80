//! `scaleout-web`: the seed's stateless web server, running the reference
//! app "links" (a URL shortener — the classic read-heavy web app).
//!
//! - [`app`]: routes, handlers and the per-response middleware.
//! - [`store`]: the narrow [`Store`] trait the app needs from its data tier;
//!   [`sqlite`] is stage 1's embedded implementation, [`remote`] the
//!   replicated database's (stages 2–4), with read-your-writes carried by
//!   a cookie.
//! - [`cache`]: the read-through code → URL cache and its staleness bound.
//! - [`links`]: URL validation and code generation, free of I/O.
//! - [`html`]: the server-rendered pages; [`metrics`]: Prometheus metrics.
//!
//! Entry point: [`run`], given a config, a store, a bound listener and a
//! shutdown token — the same call serves the single-process stage 1, the
//! `scaleout web` process of later stages, and the tests.

pub mod abuse;
pub mod app;
pub mod cache;
mod error;
pub mod html;
pub mod links;
pub mod metrics;
pub mod remote;
pub mod sqlite;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::{AppError, StoreError};
pub use remote::RemoteStore;
pub use sqlite::SqliteStore;
pub use store::{Link, ReadOpts, Served, Store, Written};

/// Fatal errors of a web server (per-request errors are [`AppError`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid web config: {0}")]
    Config(String),
    #[error("serving HTTP failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// One web server's settings.
#[derive(Debug, Clone)]
pub struct WebConfig {
    /// Shown in `X-Served-By` and the page footer.
    pub name: String,
    /// Most code → URL entries the cache keeps.
    pub cache_capacity: u64,
    /// How long a cached entry lives: the staleness bound of a redirect after
    /// the link was deleted through another web server.
    pub cache_ttl: Duration,
    /// Base of short URLs (e.g. `https://sho.rt`); when `None`, built from the
    /// request's `X-Forwarded-Host`/`Host`.
    pub public_url: Option<String>,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Request-head timeout and connection cap.
    pub limits: scaleout_serve::Limits,
    /// Deletes any link (`Authorization: Bearer` it); `None`: only the
    /// links' own delete tokens do.
    pub admin_token: Option<String>,
    /// Links one client address may create per minute (0: no limit)…
    pub create_per_minute: u32,
    /// …in bursts of this many.
    pub create_burst: u32,
    /// Peers whose `X-Forwarded-For` names the client (the load balancers).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Serve HTTPS with these files (and, with a client CA, only to
    /// clients holding a certificate it issued: the load balancers).
    pub tls: Option<scaleout_tls::ServerTls>,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            name: "web-1".into(),
            cache_capacity: 100_000,
            cache_ttl: Duration::from_secs(5),
            public_url: None,
            max_body_bytes: 16 * 1024,
            limits: scaleout_serve::Limits::default(),
            admin_token: None,
            create_per_minute: 60,
            create_burst: 20,
            trusted_proxies: abuse::default_trusted(),
            tls: None,
        }
    }
}

impl WebConfig {
    pub fn validate(&self) -> Result<(), Error> {
        if self.name.is_empty() || !self.name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Config(format!(
                "server name {:?} must be non-empty printable ASCII without spaces",
                self.name
            )));
        }
        if self.cache_capacity == 0 {
            return Err(Error::Config("cache capacity must be at least 1".into()));
        }
        if self.max_body_bytes < 64 {
            return Err(Error::Config(
                "max body size must be at least 64 bytes".into(),
            ));
        }
        if let Some(token) = &self.admin_token {
            if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Error::Config(
                    "the admin token must be at least 16 printable ASCII characters".into(),
                ));
            }
        }
        if let Some(public) = &self.public_url {
            let ok = url::Url::parse(public)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
            if !ok {
                return Err(Error::Config(format!(
                    "public URL {public:?} must be an http(s) URL"
                )));
            }
        }
        Ok(())
    }
}

/// Serves the links app on `listener` until `shutdown` is cancelled, then
/// finishes in-flight requests and returns.
pub async fn run(
    config: WebConfig,
    store: Arc<dyn Store>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let app = Arc::new(app::App::new(config, store)?);
    let addr = listener.local_addr()?;
    tracing::info!(server = %app.config.name, %addr, "web server listening");
    let limits = app.config.limits;
    let tls = match &app.config.tls {
        Some(files) => Some(
            files
                .acceptor(&[b"h2", b"http/1.1"])
                .map_err(|e| Error::Config(format!("TLS: {e}")))?,
        ),
        None => None,
    };
    scaleout_serve::serve(
        listener,
        app::router(app.clone()),
        limits,
        Arc::default(),
        tls,
        shutdown,
    )
    .await?;
    tracing::info!(server = %app.config.name, "web server stopped");
    Ok(())
}
