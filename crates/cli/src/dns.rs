//! `scaleout dns`: flags (and an optional TOML file) → `scaleout_dns::DnsConfig`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use scaleout_dns::DnsConfig;
use tokio_util::sync::CancellationToken;

/// Flags override what the config file says.
#[derive(clap::Args)]
pub struct DnsArgs {
    /// UDP and TCP address, e.g. 127.0.0.1:5353.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The zone served, e.g. scaleout.test.
    #[arg(long)]
    zone: Option<String>,
    /// A name and its addresses: www=127.0.0.2,127.0.0.3 (`@` for the apex). Repeat for each.
    #[arg(long = "host", value_name = "NAME=IP[,IP...]")]
    hosts: Vec<String>,
    /// Health URL with {ip} for each address, e.g. http://{ip}:8080/healthz.
    #[arg(long)]
    health_url: Option<String>,
    /// The CA of the checked servers' certificates, for an https:// health URL.
    #[arg(long)]
    health_ca: Option<std::path::PathBuf>,
    /// Health check interval, e.g. 1s.
    #[arg(long, value_parser = humantime::parse_duration)]
    health_interval: Option<Duration>,
    /// Passing checks in a row that bring an address back.
    #[arg(long)]
    rise: Option<u32>,
    /// Failing checks in a row that take an address out.
    #[arg(long)]
    fall: Option<u32>,
    /// TTL of answers in seconds (default 5).
    #[arg(long)]
    ttl: Option<u32>,
    /// Address of /metrics and /healthz (default 127.0.0.1, a free port).
    #[arg(long)]
    http: Option<SocketAddr>,
    /// A file holding the bearer token /metrics wants (made, mode 0600,
    /// when missing). Bound beyond loopback without one, a token is made.
    #[arg(long)]
    http_token_file: Option<PathBuf>,
    /// TOML file with any of the settings.
    #[arg(long)]
    config: Option<PathBuf>,
}

impl DnsArgs {
    pub fn into_config(self) -> anyhow::Result<DnsConfig> {
        let mut c = match &self.config {
            Some(path) => DnsConfig::from_toml_file(path)?,
            None => DnsConfig::default(),
        };
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.zone {
            c.zone = v;
        }
        if !self.hosts.is_empty() {
            c.hosts = self.hosts;
        }
        if self.health_url.is_some() {
            c.health.url = self.health_url;
        }
        if self.health_ca.is_some() {
            c.health.ca = self.health_ca;
        }
        if let Some(v) = self.health_interval {
            c.health.interval = v;
        }
        if let Some(v) = self.rise {
            c.health.rise = v;
        }
        if let Some(v) = self.fall {
            c.health.fall = v;
        }
        if let Some(v) = self.ttl {
            c.ttl = v;
        }
        if let Some(v) = self.http {
            c.http = v;
        }
        if let Some(path) = &self.http_token_file {
            c.http_token = Some(crate::lb::token_from_file(path)?);
        }
        if c.http_token.is_none() && !c.http.ip().is_loopback() {
            let path = std::env::temp_dir().join(format!(
                "scaleout-dns-{}-{:016x}.http-token",
                std::process::id(),
                rand::random::<u64>()
            ));
            c.http_token = Some(crate::lb::token_from_file(&path)?);
            println!(
                "scaleout dns: the HTTP port listens beyond loopback ({}); the /metrics token is in {}",
                c.http,
                path.display()
            );
        }
        c.validate()?;
        Ok(c)
    }
}

pub async fn run(args: DnsArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = args.into_config()?;
    let zone = config.zone.clone();
    let dns = scaleout_dns::bind(config).await?;
    println!(
        "scaleout dns: {} (udp+tcp) for zone {zone}; metrics http://{}",
        dns.addr, dns.http_addr
    );
    scaleout_wire::ready::Ready {
        role: "dns".into(),
        url: dns.addr.to_string(),
        name: None,
        id: None,
        raft: None,
        admin: Some(format!("http://{}", dns.http_addr)),
    }
    .announce();
    dns.run(shutdown).await?;
    Ok(())
}
