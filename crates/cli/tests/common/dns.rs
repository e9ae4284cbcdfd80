//! Asking a DNS server the way a client would: hickory-resolver, no cache.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::Resolver;

/// A resolver that asks only `addr`, over `protocol`, once, without a cache.
pub fn resolver(addr: SocketAddr, protocol: Protocol) -> Resolver<TokioConnectionProvider> {
    let mut config = ResolverConfig::new();
    config.add_name_server(NameServerConfig::new(addr, protocol));
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    opts.attempts = 1;
    opts.timeout = Duration::from_secs(2);
    Resolver::builder_with_config(config, TokioConnectionProvider::default())
        .with_options(opts)
        .build()
}

/// The addresses `addr` answers for `name` over UDP, sorted.
pub async fn lookup_a(addr: SocketAddr, name: &str) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = resolver(addr, Protocol::Udp)
        .lookup_ip(name)
        .await
        .unwrap()
        .iter()
        .collect();
    ips.sort();
    ips
}
