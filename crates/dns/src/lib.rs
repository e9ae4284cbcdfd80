//! `scaleout-dns`: step 2 of the seed's request flow — "DNS turns the name
//! into an IP address" (claim C1) — as an authoritative server for the
//! site's zone that answers only with load balancers whose health check
//! passes (DNS-level failover, as Route 53 health-checked records do).
//!
//! - [`zone`]: the answers, free of I/O (see its policy notes).
//! - [`health`]: HTTP checks of each address, rise/fall thresholds (the
//!   `scaleout-health` crate's, the load balancer's too).
//! - [`server`]: hickory-server over UDP and TCP (wire format, EDNS,
//!   truncation and TCP fallback are hickory's), metrics, `/healthz`.
//!
//! Entry points: [`bind`], then [`BoundDns::run`] until shutdown.

pub mod health;
pub mod records;
pub mod server;
pub mod zone;

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use server::{bind, BoundDns};

/// Fatal errors of the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid dns config: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Health checks of the answered addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// `http://{ip}:PORT/path`; `{ip}` is each address. None: no checks,
    /// every address is answered.
    pub url: Option<String>,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// The CA of the checked servers' certificates, for an `https://` URL.
    pub ca: Option<std::path::PathBuf>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            url: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(800),
            rise: 2,
            fall: 2,
            ca: None,
        }
    }
}

/// The whole DNS server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// UDP and TCP.
    pub listen: SocketAddr,
    /// `/metrics` and `/healthz`; port 0 picks a free port.
    pub http: SocketAddr,
    pub zone: String,
    /// `NAME=IP[,IP...]`, NAME relative to the zone (`@` for the apex).
    pub hosts: Vec<String>,
    /// Seconds.
    pub ttl: u32,
    pub health: HealthConfig,
    /// When set, `/metrics` wants `Authorization: Bearer <token>`
    /// (`/healthz` stays open for probes).
    pub http_token: Option<String>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 5353)),
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            zone: "scaleout.test".into(),
            hosts: Vec::new(),
            ttl: 5,
            health: HealthConfig::default(),
            http_token: None,
        }
    }
}

impl DnsConfig {
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// The zone these settings describe, or what to fix.
    pub fn zone(&self) -> Result<zone::Zone, Error> {
        let mut origin = std::str::FromStr::from_str(&self.zone).map_err(|e| {
            Error::Config(format!("zone {:?} is not a domain name: {e}", self.zone))
        })?;
        hickory_proto::rr::Name::set_fqdn(&mut origin, true);
        if self.hosts.is_empty() {
            return Err(Error::Config(
                "give at least one --host NAME=IP[,IP...]".into(),
            ));
        }
        let hosts = self
            .hosts
            .iter()
            .map(|h| zone::parse_host(h, &origin))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::Config)?;
        if self.ttl > 86_400 {
            return Err(Error::Config("ttl must be at most 86400 seconds".into()));
        }
        Ok(zone::Zone::new(origin, hosts, self.ttl))
    }

    pub fn validate(&self) -> Result<(), Error> {
        self.zone()?;
        let h = &self.health;
        if let Some(url) = &h.url {
            health::url_for(
                url,
                "127.0.0.1"
                    .parse()
                    .map_err(|_| Error::Config("unreachable".into()))?,
            )
            .map_err(Error::Config)?;
            if url.starts_with("https://") && h.ca.is_none() {
                return Err(Error::Config(
                    "an https:// health URL needs the CA of the servers' certificates".into(),
                ));
            }
            if h.rise == 0
                || h.fall == 0
                || h.interval < Duration::from_millis(10)
                || h.timeout.is_zero()
            {
                return Err(Error::Config(
                    "health rise/fall must be ≥ 1, interval ≥ 10ms, timeout > 0".into(),
                ));
            }
        }
        Ok(())
    }
}
