//! The load balancer's typed configuration: everything the flags say, and
//! more, can be said in a TOML file. Parsed and validated before any socket
//! is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// How the next backend is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// In turn, evenly (the seed's "spreads traffic evenly").
    #[default]
    RoundRobin,
    /// Smooth weighted round-robin (nginx's): in proportion to weights, interleaved.
    Weighted,
    /// The backend with the fewest requests in flight.
    LeastConn,
    /// Power of two random choices, the lower of PeakEWMA latency × load.
    P2cEwma,
    /// Consistent (rendezvous) hashing on `hash_on`: sticky sessions.
    Hash,
}

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" => Ok(Algorithm::RoundRobin),
            "weighted" => Ok(Algorithm::Weighted),
            "least-conn" => Ok(Algorithm::LeastConn),
            "p2c-ewma" => Ok(Algorithm::P2cEwma),
            "hash" => Ok(Algorithm::Hash),
            other => Err(format!(
                "unknown algorithm {other:?}: use round-robin, weighted, least-conn, p2c-ewma or hash"
            )),
        }
    }
}

/// What the `hash` algorithm hashes to pick a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    ClientIp,
    Header(http::HeaderName),
    Cookie(String),
}

impl std::str::FromStr for HashOn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "client-ip" {
            return Ok(HashOn::ClientIp);
        }
        if let Some(name) = s.strip_prefix("header:") {
            return http::HeaderName::from_bytes(name.as_bytes())
                .map(HashOn::Header)
                .map_err(|_| format!("{name:?} is not a valid header name"));
        }
        if let Some(name) = s.strip_prefix("cookie:") {
            if !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"=;,".contains(&b))
            {
                return Ok(HashOn::Cookie(name.to_string()));
            }
            return Err(format!("{name:?} is not a valid cookie name"));
        }
        Err(format!(
            "hash-on {s:?}: use client-ip, header:NAME or cookie:NAME"
        ))
    }
}

impl std::fmt::Display for HashOn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HashOn::ClientIp => write!(f, "client-ip"),
            HashOn::Header(h) => write!(f, "header:{h}"),
            HashOn::Cookie(c) => write!(f, "cookie:{c}"),
        }
    }
}

impl Serialize for HashOn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HashOn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One backend (upstream web server).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `http://host:port`; the host may be a name, resolved when added.
    pub url: String,
    /// Relative share for the `weighted` algorithm (and weighted hashing); 0 takes no new traffic.
    #[serde(default = "one")]
    pub weight: u32,
    /// Name shown in the admin API and metrics; defaults to `host:port`.
    #[serde(default)]
    pub name: Option<String>,
}

fn one() -> u32 {
    1
}

impl BackendConfig {
    pub fn new(url: impl Into<String>) -> Self {
        BackendConfig {
            url: url.into(),
            weight: 1,
            name: None,
        }
    }
}

/// Backends found by name (see `discover.rs`): every address `url`'s host
/// resolves to is a backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoverConfig {
    /// `http://NAME:PORT` (or `https://`).
    pub url: String,
    /// How often the name is resolved again (and at once when one of its
    /// backends fails its health check).
    #[serde(with = "humantime_serde", default = "two_seconds")]
    pub interval: Duration,
    /// Each found backend's weight.
    #[serde(default = "one")]
    pub weight: u32,
    /// A DNS server to ask (UDP, then TCP), as HAProxy's `resolvers`
    /// section names one; `None`: the system's resolver.
    #[serde(default)]
    pub resolver: Option<std::net::SocketAddr>,
}

fn two_seconds() -> Duration {
    Duration::from_secs(2)
}

impl DiscoverConfig {
    pub fn new(url: impl Into<String>) -> Self {
        DiscoverConfig {
            url: url.into(),
            interval: two_seconds(),
            weight: 1,
            resolver: None,
        }
    }
}

/// Active health checks: `GET path` on every backend every `interval`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    pub enabled: bool,
    pub path: String,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive passing checks that bring a down backend up.
    pub rise: u32,
    /// Consecutive failing checks that take an up backend down.
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            enabled: true,
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

/// Passive outlier detection: a backend whose requests keep failing
/// (connect errors, resets, timeouts, 5xx) is ejected for a while.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Consecutive failures that eject a backend; 0 turns detection off.
    pub consecutive_failures: u32,
    /// First ejection; each further ejection in a row doubles it.
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
    /// The largest share of the pool (percent) ejected at once: a backend
    /// that would take the ejected past it stays in rotation (Envoy's
    /// `max_ejection_percent`). A fault every backend shares, or a client
    /// whose requests fail everywhere, must not empty the pool.
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(30),
            max_ejection_percent: 50,
        }
    }
}

/// Retries on another backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Tries per request, the first included; 1 turns retries off.
    pub max_attempts: u32,
    /// Retries allowed as a share of requests (over the last 10 s)…
    pub budget_ratio: f32,
    /// …plus this many retries per second whatever the traffic.
    pub min_per_sec: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 3,
            budget_ratio: 0.2,
            min_per_sec: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP connect to a backend.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// A client must send a whole request head within this (slowloris).
    #[serde(with = "humantime_serde")]
    pub header_read: Duration,
    /// A backend must start its response within this.
    #[serde(with = "humantime_serde")]
    pub upstream_response: Duration,
    /// A client connection with no bytes moving for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// How long a shutdown waits for in-flight requests.
    #[serde(with = "humantime_serde")]
    pub drain: Duration,
    /// A request body gets this long, plus one second per
    /// `limits.min_body_rate` bytes received…
    #[serde(with = "humantime_serde")]
    pub body: Duration,
    /// …and never more than this; a body still arriving then gets 408.
    #[serde(with = "humantime_serde")]
    pub max_body: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            header_read: Duration::from_secs(10),
            upstream_response: Duration::from_secs(30),
            idle: Duration::from_secs(60),
            drain: Duration::from_secs(30),
            body: Duration::from_secs(10),
            max_body: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request head (request line + headers); 431 beyond. At least 8 KiB.
    pub max_header_bytes: usize,
    /// Largest request body; 413 beyond. Bodies are kept whole (as nginx
    /// does) so that a request can be replayed on another backend.
    pub max_body_bytes: usize,
    /// A body up to this size stays in memory; a larger one goes to the spool.
    pub body_buffer_bytes: usize,
    /// Request bodies held in memory at once, all connections together;
    /// beyond, bodies go to the spool.
    pub max_body_memory: usize,
    /// Request bodies in the spool at once; a body that finds it full gets 503.
    pub max_spool_bytes: u64,
    /// Where spooled bodies go (unnamed files); the system's temp directory
    /// when unset.
    pub spool_dir: Option<PathBuf>,
    /// The slowest a request body may arrive, in bytes per second (see
    /// `timeouts.body`).
    pub min_body_rate: u64,
    /// HTTP/2 streams a client may have open on one connection.
    pub h2_max_streams: u32,
    /// HTTP/2 flow-control windows: what a client may send ahead of the
    /// load balancer reading it, per stream and per connection.
    pub h2_stream_window: u32,
    pub h2_connection_window: u32,
    /// Requests one client address may have in flight at once, each of
    /// which holds a backend connection until its answer is taken (0: no
    /// limit). Beyond: 429. HTTP/2 lets one connection carry 100.
    pub max_in_flight_per_ip: u32,
    /// Requests per second one client address may make (0: no limit)…
    pub rate_per_ip: u32,
    /// …in bursts of this many (0: one second's worth).
    pub rate_burst: u32,
    /// Client connections open at once; beyond, new ones wait to be accepted.
    pub max_connections: usize,
    /// Idle upstream connections kept per backend.
    pub max_idle_per_backend: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 32 * 1024,
            max_body_bytes: 1024 * 1024,
            body_buffer_bytes: 64 * 1024,
            max_body_memory: 64 * 1024 * 1024,
            max_spool_bytes: 1024 * 1024 * 1024,
            spool_dir: None,
            min_body_rate: 1024,
            h2_max_streams: 100,
            h2_stream_window: 64 * 1024,
            h2_connection_window: 1024 * 1024,
            max_in_flight_per_ip: 256,
            rate_per_ip: 0,
            rate_burst: 0,
            max_connections: 10_000,
            max_idle_per_backend: 512,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain (reloaded when the file changes).
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// When set, clients must present a certificate this CA issued.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// TLS to `https://` backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// The CA the backends' certificates must chain to.
    pub ca: PathBuf,
    /// The load balancer's own certificate and key, for backends that
    /// want one (mutual TLS).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// The whole load balancer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LbConfig {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// The admin API and `/metrics`, `/healthz`; port 0 picks a free port.
    pub admin: SocketAddr,
    /// When set, the admin API wants `Authorization: Bearer <token>`
    /// (except `/healthz` and `/metrics`).
    pub admin_token: Option<String>,
    /// Threads of the load balancer's (work-stealing) runtime; 0 = one per
    /// CPU.
    pub workers: usize,
    pub algorithm: Algorithm,
    /// What `hash` hashes: `client-ip`, `header:NAME` or `cookie:NAME`.
    pub hash_on: HashOn,
    pub backends: Vec<BackendConfig>,
    /// Backends found by name, resolved again and again.
    pub discover: Vec<DiscoverConfig>,
    pub health: HealthConfig,
    pub outlier: OutlierConfig,
    pub retry: RetryConfig,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub tls: Option<TlsConfig>,
    /// TLS to the backends (their URLs say `https://`).
    pub upstream_tls: Option<UpstreamTlsConfig>,
    /// One structured log line per request (target `scaleout_lb::access`).
    pub access_log: bool,
}

impl Default for LbConfig {
    fn default() -> Self {
        LbConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_token: None,
            workers: 0,
            algorithm: Algorithm::default(),
            hash_on: HashOn::ClientIp,
            backends: Vec::new(),
            discover: Vec::new(),
            health: HealthConfig::default(),
            outlier: OutlierConfig::default(),
            retry: RetryConfig::default(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            tls: None,
            upstream_tls: None,
            access_log: false,
        }
    }
}

impl LbConfig {
    /// Reads a TOML file; unknown keys are errors.
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| ConfigError::new(format!("{}: {e}", path.display())))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError::new(msg));
        for b in &self.backends {
            let addr = crate::addr::BackendAddr::parse(&b.url)?;
            if addr.tls && self.upstream_tls.is_none() {
                return fail(format!(
                    "backend {}: https:// backends need upstream_tls (--backend-ca)",
                    b.url
                ));
            }
        }
        for d in &self.discover {
            let addr = crate::addr::BackendAddr::parse(&d.url)?;
            if addr.tls && self.upstream_tls.is_none() {
                return fail(format!(
                    "backends found by {}: https:// backends need upstream_tls (--backend-ca)",
                    d.url
                ));
            }
            if d.interval < Duration::from_millis(100) || d.interval > Duration::from_secs(3600) {
                return fail(format!(
                    "backends found by {}: the interval must be 100ms to 1h",
                    d.url
                ));
            }
        }
        let h = &self.health;
        if h.enabled {
            if !h.path.starts_with('/') {
                return fail(format!("health check path {:?} must start with /", h.path));
            }
            if h.rise == 0 || h.fall == 0 {
                return fail("health rise and fall must be at least 1".into());
            }
            if h.interval < Duration::from_millis(10) || h.timeout.is_zero() {
                return fail("health interval must be at least 10ms and timeout above 0".into());
            }
        }
        if self.outlier.max_ejection_percent > 100 {
            return fail("outlier max_ejection_percent must be 0 to 100".into());
        }
        if self.outlier.base_ejection > self.outlier.max_ejection {
            return fail("outlier base_ejection must not exceed max_ejection".into());
        }
        if self.retry.max_attempts == 0 {
            return fail("retry max_attempts must be at least 1 (1 = no retries)".into());
        }
        if !(0.0..=1000.0).contains(&self.retry.budget_ratio) {
            return fail("retry budget_ratio must be between 0 and 1000".into());
        }
        if self.limits.max_header_bytes < 8192 {
            return fail("max_header_bytes must be at least 8192".into());
        }
        if self.limits.max_connections == 0 {
            return fail("max_connections must be at least 1".into());
        }
        let l = &self.limits;
        if l.min_body_rate == 0 {
            return fail("min_body_rate must be at least 1 byte per second".into());
        }
        if l.h2_max_streams == 0 {
            return fail("h2_max_streams must be at least 1".into());
        }
        if !(65_535..=(1 << 31) - 1).contains(&l.h2_stream_window)
            || !(65_535..=(1 << 31) - 1).contains(&l.h2_connection_window)
        {
            return fail("h2 windows must be between 65535 and 2^31-1 bytes".into());
        }
        if let Some(dir) = &l.spool_dir {
            if !dir.is_dir() {
                return fail(format!("spool_dir {} is not a directory", dir.display()));
            }
        }
        let t = &self.timeouts;
        for (name, d) in [
            ("connect", t.connect),
            ("header_read", t.header_read),
            ("upstream_response", t.upstream_response),
            ("idle", t.idle),
            ("body", t.body),
        ] {
            if d.is_zero() {
                return fail(format!("timeout {name} must be above 0"));
            }
        }
        if t.max_body < t.body {
            return fail("timeout max_body must not be below body".into());
        }
        if let Some(token) = &self.admin_token {
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return fail("admin token must be non-empty printable ASCII".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_toml_file_parses() {
        let cfg: LbConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:18080"
            admin = "127.0.0.1:18090"
            admin_token = "s3cret"
            algorithm = "hash"
            hash_on = "cookie:session"
            access_log = true
            [[backends]]
            url = "http://127.0.0.1:18081"
            weight = 3
            [[backends]]
            url = "http://localhost:18082"
            name = "web-2"
            [health]
            path = "/ready"
            interval = "500ms"
            rise = 1
            [timeouts]
            header_read = "5s"
            [limits]
            max_body_bytes = 65536
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.algorithm, Algorithm::Hash);
        assert_eq!(cfg.hash_on, HashOn::Cookie("session".into()));
        assert_eq!(cfg.backends[0].weight, 3);
        assert_eq!(cfg.backends[1].weight, 1);
        assert_eq!(cfg.health.interval, Duration::from_millis(500));
        assert_eq!(cfg.health.fall, 3, "unset keys keep their defaults");
        assert_eq!(cfg.timeouts.header_read, Duration::from_secs(5));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<LbConfig>("listne = \"127.0.0.1:1\"").is_err());
        assert!(toml::from_str::<LbConfig>("algorithm = \"random\"").is_err());
        assert!(toml::from_str::<LbConfig>("hash_on = \"body\"").is_err());
        let bad = [
            LbConfig {
                backends: vec![BackendConfig::new("ftp://x:1")],
                ..Default::default()
            },
            LbConfig {
                retry: RetryConfig {
                    max_attempts: 0,
                    ..Default::default()
                },
                ..Default::default()
            },
            LbConfig {
                limits: Limits {
                    max_header_bytes: 100,
                    ..Default::default()
                },
                ..Default::default()
            },
            LbConfig {
                health: HealthConfig {
                    path: "healthz".into(),
                    ..Default::default()
                },
                ..Default::default()
            },
        ];
        for cfg in bad {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
    }

    #[test]
    fn hash_on_parses() {
        assert_eq!("client-ip".parse::<HashOn>().unwrap(), HashOn::ClientIp);
        assert_eq!(
            "header:x-user".parse::<HashOn>().unwrap(),
            HashOn::Header(http::HeaderName::from_static("x-user"))
        );
        assert!("header:bad header".parse::<HashOn>().is_err());
        assert!("cookie:".parse::<HashOn>().is_err());
    }
}
