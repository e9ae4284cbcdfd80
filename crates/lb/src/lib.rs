//! `scaleout-lb`: the seed's load balancer — an L7 HTTP load balancer that
//! spreads traffic over the web servers, stops sending to a failed one and
//! starts sending to a new one at once (claims C6–C8).
//!
//! The modules, each using only those listed before it (a test keeps it so):
//!
//! - [`error`], [`addr`], [`config`]: errors, backend addresses, typed
//!   config (flags and TOML say the same things).
//! - [`stats`], [`ewma`], [`backend`]: figures as atomics; backends
//!   (shared by every connection) and the pool; passive outlier ejection.
//! - [`selection`]: round-robin, smooth weighted, least-conn, P2C-PeakEWMA,
//!   rendezvous hashing, behind the [`selection::BackendSelection`] trait.
//! - [`limits`], [`spool`], [`conn`]: per-client limits, bounded request
//!   bodies, a connection's facts and timeouts.
//! - [`codec`]: HTTP/1.1 as bytes (heads, framing, chunked), no I/O.
//! - [`rules`]: the proxy rules both paths apply — hop-by-hop headers,
//!   forwarding headers, the request id, replay safety, the hash key.
//! - [`upstream`]: the lean HTTP/1.1 client and its connection pool;
//!   [`body`]: the hyper path's response body; [`health`]: active checks.
//! - [`worker`]: admission, the retry loop and the access log, shared by
//!   [`fast`] (plaintext HTTP/1.1 as bytes, where most requests go) and
//!   [`proxy`] (TLS and h2c through hyper).
//! - [`server`]: the accept loop, h1/h2 dispatch, TLS, drain; [`admin`]:
//!   the admin API; [`metrics`]: `/metrics`.
//!
//! Entry points: [`bind`] (validate, resolve, bind every socket), then
//! [`BoundLb::run`] until the shutdown token is cancelled, which stops
//! accepting and drains in-flight requests.

pub mod addr;
pub mod admin;
pub mod backend;
pub mod body;
pub mod codec;
pub mod config;
pub mod conn;
pub mod discover;
pub mod error;
pub mod ewma;
pub mod fast;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod rules;
pub mod selection;
pub mod server;
pub mod spool;
pub mod stats;
pub mod tls;
pub mod upstream;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use config::{Algorithm, BackendConfig, HashOn, LbConfig};
pub use error::{ConfigError, Error, ProxyError};

use std::time::Duration;

use tower::retry::budget::TpsBudget;

use crate::addr::BackendAddr;
use crate::backend::{Clock, Pool};
use crate::upstream::UpstreamPool;
use crate::worker::{Shared, Worker};

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
            rate: crate::limits::RateLimit::new(
                config.limits.rate_per_ip,
                config.limits.rate_burst,
            ),
            in_flight: crate::limits::InFlightPerIp::new(config.limits.max_in_flight_per_ip),
            discovery: Arc::default(),
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

        // A backend found by name that fails its checks has its name
        // looked up again at once.
        let looked_up_again = Arc::new(tokio::sync::Notify::new());
        let health = shared.config.health.enabled.then(|| {
            tokio::spawn(health::run(
                pool.clone(),
                worker.upstream.clone(),
                shared.config.health.clone(),
                looked_up_again.clone(),
                shutdown.clone(),
            ))
        });
        let discovery: Vec<_> = shared
            .config
            .discover
            .iter()
            .map(|d| {
                tokio::spawn(discover::run(
                    pool.clone(),
                    d.clone(),
                    looked_up_again.clone(),
                    shared.discovery.clone(),
                    shared.config.health.enabled,
                    shutdown.clone(),
                ))
            })
            .collect();
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
        for d in discovery {
            d.abort();
        }
        let _ = admin_task.await;
        served?;
        tracing::info!("load balancer stopped");
        Ok(())
    }
}

#[cfg(test)]
mod layering {
    use std::collections::{BTreeMap, BTreeSet};

    /// The modules this crate's code (not its tests or docs) names.
    fn imports() -> BTreeMap<String, BTreeSet<String>> {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                for inner in std::fs::read_dir(&path).unwrap() {
                    files.push(inner.unwrap().path());
                }
            } else {
                files.push(path);
            }
        }
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in files {
            let rel = file.strip_prefix(&src).unwrap();
            let module = rel.iter().next().unwrap().to_str().unwrap();
            let module = module.trim_end_matches(".rs").to_string();
            let text = std::fs::read_to_string(&file).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap();
            let code: String = code
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join(" ");
            let deps = graph.entry(module.clone()).or_default();
            for name in named_after(&code, "crate::") {
                if name != module {
                    deps.insert(name);
                }
            }
        }
        graph
    }

    /// The first path segment of every path after `prefix`, groups
    /// included: `crate::a::x`, `crate::{b, c::{d}}` name a, b and c.
    fn named_after(code: &str, prefix: &str) -> Vec<String> {
        let ident = |s: &str| -> String {
            s.trim_start()
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        };
        let mut names = Vec::new();
        for (at, _) in code.match_indices(prefix) {
            let rest = &code[at + prefix.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // The group's top-level items, up to its closing brace.
                let (mut depth, mut item) = (0, String::new());
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            names.push(ident(&item));
                            item.clear();
                            continue;
                        }
                        _ => {}
                    }
                    if depth == 0 || c != '{' {
                        item.push(c);
                    }
                }
                names.push(ident(&item));
            } else {
                names.push(ident(rest));
            }
        }
        names.retain(|n| !n.is_empty());
        names
    }

    #[test]
    fn grouped_imports_are_seen() {
        assert_eq!(named_after("use crate::fast::X;", "crate::"), ["fast"]);
        assert_eq!(
            named_after("use crate::{fast, rules::{A, B}, conn::C};", "crate::"),
            ["fast", "rules", "conn"]
        );
        assert_eq!(named_after("use crate::{ fast };", "crate::"), ["fast"]);
    }

    #[test]
    fn no_module_imports_one_that_imports_it_back() {
        let graph = imports();
        assert!(
            graph.len() > 15 && graph["fast"].contains("rules"),
            "{graph:?}"
        );
        // Depth-first: a module met again on the current path closes a circle.
        fn visit(
            graph: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            circles: &mut BTreeSet<Vec<String>>,
        ) {
            let here = path.last().unwrap().clone();
            for next in graph.get(&here).into_iter().flatten() {
                if next == "lib" {
                    continue;
                }
                if let Some(at) = path.iter().position(|m| m == next) {
                    circles.insert(path[at..].to_vec());
                } else {
                    path.push(next.clone());
                    visit(graph, path, circles);
                    path.pop();
                }
            }
        }
        let mut circles = BTreeSet::new();
        for module in graph.keys().filter(|m| *m != "lib") {
            visit(&graph, &mut vec![module.clone()], &mut circles);
        }
        assert!(circles.is_empty(), "import circles: {circles:?}");
    }
}
