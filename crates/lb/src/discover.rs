//! Backends found by name: a URL whose host is a DNS name (`http://web:8081`)
//! is resolved every `interval`, and at once when one of its backends fails
//! its health check; each address in the answer is a backend (named
//! `HOST-IP:PORT`), added when it appears and drained out when it goes — as
//! HAProxy's `server-template` with `resolvers`, or nginx's `resolve`, do.
//! This is how `docker compose up --scale web=4` and a Kubernetes headless
//! Service reach the load balancer without a restart.
//!
//! With health checks on, a backend found by name takes traffic once it
//! passes them (`rise`). One removed through the admin API comes back at
//! the next lookup while its name still answers with it: to take one out
//! of rotation, drain it (`POST /backends/NAME/drain`), which discovery
//! leaves alone.
//!
//! A failed lookup or an empty answer changes nothing: a resolver that is
//! down for a moment must not empty the pool (the backends' own health
//! checks say whether they are reachable). Lookups use the system's
//! resolver (`/etc/hosts`, then the servers of `/etc/resolv.conf`, as
//! `getaddrinfo` does), each bounded by a timeout.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::Resolver;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::addr::BackendAddr;
use crate::backend::Pool;
use crate::config::{BackendConfig, DiscoverConfig};

/// How long one lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Backends one name may bring (a runaway answer cannot grow the pool
/// without bound).
pub const MAX_PER_NAME: usize = 256;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct DiscoveryStats {
    pub lookups: AtomicU64,
    pub lookups_failed: AtomicU64,
    pub added: AtomicU64,
    pub removed: AtomicU64,
}

/// The name of the backend `addr` found for `url`'s host.
pub fn backend_name(host: &str, addr: SocketAddr) -> String {
    format!("{host}-{addr}")
}

/// What one answer changes: addresses to add and backend names to take
/// out, given the names `known` (this URL's backends in the pool).
pub fn changes(
    host: &str,
    answer: &BTreeSet<SocketAddr>,
    known: &BTreeSet<String>,
) -> (Vec<SocketAddr>, Vec<String>) {
    if answer.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let wanted: BTreeSet<String> = answer.iter().map(|a| backend_name(host, *a)).collect();
    let add = answer
        .iter()
        .filter(|a| !known.contains(&backend_name(host, **a)))
        .take(MAX_PER_NAME.saturating_sub(known.len().min(MAX_PER_NAME)))
        .copied()
        .collect();
    let remove = known.difference(&wanted).cloned().collect();
    (add, remove)
}

/// Keeps `pool` in step with what `cfg.url`'s name resolves to, until
/// `shutdown`. `wake` asks for a lookup now (a backend failed).
pub async fn run(
    pool: Arc<Pool>,
    cfg: DiscoverConfig,
    wake: Arc<Notify>,
    stats: Arc<DiscoveryStats>,
    checked: bool,
    shutdown: CancellationToken,
) {
    let Ok(target) = BackendAddr::parse(&cfg.url) else {
        // `LbConfig::validate` has parsed it already.
        return;
    };
    let resolver = cfg.resolver.map(resolver_of);
    let mut known: BTreeSet<String> = BTreeSet::new();
    let mut failing = false;
    loop {
        stats.lookups.fetch_add(1, Ordering::Relaxed);
        let answer = tokio::time::timeout(
            LOOKUP_TIMEOUT,
            lookup(resolver.as_ref(), &target.host, target.port),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {LOOKUP_TIMEOUT:?}")));
        match answer {
            Ok(answer) if !answer.is_empty() => {
                if failing {
                    tracing::info!(name = %target.host, "backends' name resolves again");
                    failing = false;
                }
                // Someone may have removed one through the admin API.
                known.retain(|name| pool.find(name).is_some());
                let (add, remove) = changes(&target.host, &answer, &known);
                for addr in add {
                    let name = backend_name(&target.host, addr);
                    let backend = BackendConfig {
                        url: cfg.url.clone(),
                        weight: cfg.weight,
                        name: Some(name.clone()),
                    };
                    match pool.add(&backend, addr) {
                        Ok(added) => {
                            // With health checks on, it takes traffic once
                            // it passes them: an address that comes and
                            // goes in the answer (a flapping record, a
                            // failing server) is not trusted on sight.
                            if checked {
                                added.up.store(false, Ordering::Relaxed);
                            }
                            tracing::info!(backend = %name, %addr, "backend found by name: added");
                            stats.added.fetch_add(1, Ordering::Relaxed);
                            known.insert(name);
                        }
                        Err(e) => {
                            tracing::warn!(backend = %name, error = %e, "backend found by name not added")
                        }
                    }
                }
                for name in remove {
                    if let Some(gone) = pool.remove(&name) {
                        // In-flight requests hold it and finish.
                        gone.draining.store(true, Ordering::Relaxed);
                        tracing::info!(backend = %name, in_flight = gone.in_flight(), "backend no longer in its name's answer: removed");
                        stats.removed.fetch_add(1, Ordering::Relaxed);
                    }
                    known.remove(&name);
                }
            }
            other => {
                stats.lookups_failed.fetch_add(1, Ordering::Relaxed);
                if !failing {
                    let why = other.err().unwrap_or_else(|| "an empty answer".into());
                    tracing::warn!(name = %target.host, reason = %why, "backends' name did not resolve: keeping the backends it had");
                    failing = true;
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(cfg.interval) => {}
            () = wake.notified() => {}
        }
    }
}

/// A resolver asking only `server` (no cache: the loop is the cache).
fn resolver_of(server: SocketAddr) -> Resolver<TokioConnectionProvider> {
    let mut config = ResolverConfig::new();
    config.add_name_server(NameServerConfig::new(server, Protocol::Udp));
    config.add_name_server(NameServerConfig::new(server, Protocol::Tcp));
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(2);
    // Both families: a dual-stack name's every address is a backend.
    opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
    opts.attempts = 2;
    Resolver::builder_with_config(config, TokioConnectionProvider::default())
        .with_options(opts)
        .build()
}

/// `host`'s addresses with `port`: from `resolver`, or the system's.
async fn lookup(
    resolver: Option<&Resolver<TokioConnectionProvider>>,
    host: &str,
    port: u16,
) -> Result<BTreeSet<SocketAddr>, String> {
    match resolver {
        Some(r) => match r.lookup_ip(host).await {
            Ok(ips) => Ok(ips.iter().map(|ip| SocketAddr::new(ip, port)).collect()),
            Err(e) if e.is_no_records_found() => Ok(BTreeSet::new()),
            Err(e) => Err(e.to_string()),
        },
        None => tokio::net::lookup_host((host, port))
            .await
            .map(|a| a.collect())
            .map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> BTreeSet<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn an_answer_adds_what_is_new_and_removes_what_went() {
        let known: BTreeSet<String> = ["web-10.0.0.1:80", "web-10.0.0.2:80"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (add, remove) = changes("web", &addrs(&["10.0.0.2:80", "10.0.0.3:80"]), &known);
        assert_eq!(add, vec!["10.0.0.3:80".parse::<SocketAddr>().unwrap()]);
        assert_eq!(remove, vec!["web-10.0.0.1:80".to_string()]);
        // Nothing from an empty answer: the pool stays.
        assert_eq!(changes("web", &BTreeSet::new(), &known), (vec![], vec![]));
        // IPv6 names are distinct and stable.
        assert_eq!(
            backend_name("web", "[fd00::5]:8081".parse().unwrap()),
            "web-[fd00::5]:8081"
        );
    }

    #[test]
    fn one_name_brings_at_most_its_share() {
        let many: BTreeSet<SocketAddr> = (0..1000u32)
            .map(|i| SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8], 80)))
            .collect();
        let (add, _) = changes("web", &many, &BTreeSet::new());
        assert_eq!(add.len(), MAX_PER_NAME);
    }
}
