//! The web server's Prometheus metrics, one registry per server instance (so
//! several web servers in one process keep separate counts).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

pub struct WebMetrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<RouteLabels, Histogram>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub rate_limited: Counter,
}

impl WebMetrics {
    pub fn new(server: &str) -> Self {
        let mut registry = Registry::with_labels(std::iter::once((
            "server".into(),
            server.to_string().into(),
        )));
        let requests = Family::<RequestLabels, Counter>::default();
        // 100 µs .. ~3.3 s in 16 doublings.
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 16))
        });
        let cache_hits = Counter::default();
        let cache_misses = Counter::default();
        registry.register(
            "scaleout_web_http_requests",
            "HTTP requests answered, by method, route and status",
            requests.clone(),
        );
        registry.register(
            "scaleout_web_http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            latency.clone(),
        );
        registry.register(
            "scaleout_web_cache_hits",
            "Code lookups answered from the read-through cache",
            cache_hits.clone(),
        );
        registry.register(
            "scaleout_web_cache_misses",
            "Code lookups that went to the database",
            cache_misses.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "scaleout_web_creations_rate_limited",
            "Link creations refused (429) because the client was over its rate",
            rate_limited.clone(),
        );
        WebMetrics {
            registry,
            requests,
            latency,
            cache_hits,
            cache_misses,
            rate_limited,
        }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn render(&self) -> String {
        scaleout_metrics::render(&self.registry)
    }
}
