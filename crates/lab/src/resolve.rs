//! Names resolved the way a visitor's machine does it: the site's name
//! asked of `scaleout dns` (answers cached for their TTL), every address
//! in the answer tried in turn when a connection fails. The lab's load in
//! stage 5 goes through it, so a load balancer that dies costs only the
//! requests it held: new connections go to the other address at once,
//! and the name's answer drops the dead one after its health checks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::Resolver;

/// A `reqwest` resolver asking one DNS server.
pub struct ViaDns {
    resolver: Arc<Resolver<TokioConnectionProvider>>,
}

impl ViaDns {
    /// Asks `server` over UDP (TCP when an answer is truncated).
    pub fn new(server: SocketAddr) -> ViaDns {
        let mut config = ResolverConfig::new();
        config.add_name_server(NameServerConfig::new(server, Protocol::Udp));
        config.add_name_server(NameServerConfig::new(server, Protocol::Tcp));
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(1);
        opts.attempts = 2;
        // Answers are kept for their TTL, as a stub resolver would.
        opts.cache_size = 64;
        let resolver = Resolver::builder_with_config(config, TokioConnectionProvider::default())
            .with_options(opts)
            .build();
        ViaDns {
            resolver: Arc::new(resolver),
        }
    }
}

impl reqwest::dns::Resolve for ViaDns {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let resolver = self.resolver.clone();
        Box::pin(async move {
            let answer = resolver.lookup_ip(name.as_str()).await?;
            let addrs: Vec<SocketAddr> = answer.iter().map(|ip| SocketAddr::new(ip, 0)).collect();
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}
