//! `scaleout lb`: flags (and an optional TOML file) → `scaleout_lb::LbConfig`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use scaleout_lb::{Algorithm, BackendConfig, HashOn, LbConfig};
use tokio_util::sync::CancellationToken;

/// Flags override what the config file says; unset flags keep it.
#[derive(clap::Args)]
pub struct LbArgs {
    /// Address clients connect to, e.g. 127.0.0.1:18080.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// A backend web server: http://host:port, optionally ,weight=N and ,name=NAME. Repeat for each.
    #[arg(long = "backend", value_name = "URL")]
    backends: Vec<String>,
    /// Backends found by name: http://NAME:PORT, every address NAME
    /// resolves to (a Compose service, a Kubernetes headless Service),
    /// looked up again every --discover-interval and when one fails its
    /// health check; added and drained out as the answer changes. Repeat
    /// for each name.
    #[arg(long = "discover", value_name = "URL")]
    discover: Vec<String>,
    /// How often --discover names are looked up again.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    discover_interval: Duration,
    /// The DNS server --discover asks (IP:PORT; default: the system's
    /// resolver, /etc/hosts and /etc/resolv.conf).
    #[arg(long, value_name = "IP:PORT")]
    discover_resolver: Option<SocketAddr>,
    /// round-robin (default), weighted, least-conn, p2c-ewma or hash.
    #[arg(long)]
    algorithm: Option<Algorithm>,
    /// What `hash` hashes: client-ip (default), header:NAME or cookie:NAME.
    #[arg(long)]
    hash_on: Option<HashOn>,
    /// Admin API address (default 127.0.0.1, a free port).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Bearer token the admin API requires.
    #[arg(long, env = "SCALEOUT_LB_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// A file holding the admin API's bearer token; made (mode 0600, with a
    /// random token) when missing. An admin API bound beyond loopback with
    /// no token gets one made in the temp directory.
    #[arg(long, conflicts_with = "admin_token")]
    admin_token_file: Option<PathBuf>,
    /// TOML file with any of the settings (see the README).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// Health check path (default /healthz).
    #[arg(long)]
    health_path: Option<String>,
    /// Health check interval, e.g. 1s, 500ms.
    #[arg(long, value_parser = humantime::parse_duration)]
    health_interval: Option<Duration>,
    /// Health check timeout.
    #[arg(long, value_parser = humantime::parse_duration)]
    health_timeout: Option<Duration>,
    /// Passing checks in a row that bring a backend up.
    #[arg(long)]
    rise: Option<u32>,
    /// Failing checks in a row that take a backend down.
    #[arg(long)]
    fall: Option<u32>,
    /// Turn active health checks off.
    #[arg(long)]
    no_health_checks: bool,
    /// TCP connect timeout to backends.
    #[arg(long, value_parser = humantime::parse_duration)]
    connect_timeout: Option<Duration>,
    /// A client must send its request head within this.
    #[arg(long, value_parser = humantime::parse_duration)]
    header_timeout: Option<Duration>,
    /// A backend must start answering within this.
    #[arg(long, value_parser = humantime::parse_duration)]
    upstream_timeout: Option<Duration>,
    /// Close client connections idle for this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// On SIGTERM, wait this long for in-flight requests.
    #[arg(long, value_parser = humantime::parse_duration)]
    drain_timeout: Option<Duration>,
    /// Largest request head in bytes (431 beyond).
    #[arg(long)]
    max_header_bytes: Option<usize>,
    /// Largest request body in bytes (413 beyond).
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Bodies up to this many bytes stay in memory; larger ones are spooled to disk.
    #[arg(long)]
    body_buffer_bytes: Option<usize>,
    /// Request body bytes held in memory at once, all clients together (then bodies spool).
    #[arg(long)]
    max_body_memory: Option<usize>,
    /// Request body bytes in the spool at once (503 beyond).
    #[arg(long)]
    max_spool_bytes: Option<u64>,
    /// Directory for spooled request bodies (default: the system's temp directory).
    #[arg(long)]
    spool_dir: Option<PathBuf>,
    /// A request body gets this long, plus 1 s per --min-body-rate bytes received (408 after).
    #[arg(long, value_parser = humantime::parse_duration)]
    body_timeout: Option<Duration>,
    /// …but never more than this in all.
    #[arg(long, value_parser = humantime::parse_duration)]
    max_body_time: Option<Duration>,
    /// The slowest a request body may arrive, bytes per second.
    #[arg(long)]
    min_body_rate: Option<u64>,
    /// Requests one client address may have in flight at once (0: no limit; default 256).
    #[arg(long)]
    max_in_flight_per_ip: Option<u32>,
    /// Requests per second one client address may make; 429 beyond (default: no limit).
    #[arg(long)]
    rate_per_ip: Option<u32>,
    /// ...in bursts of this many (default: one second's worth).
    #[arg(long)]
    rate_burst: Option<u32>,
    /// Client connections open at once.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Tries per request, the first included (1: no retries).
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Retries allowed as a share of requests, e.g. 0.2.
    #[arg(long)]
    retry_budget: Option<f32>,
    /// TLS certificate chain (PEM); with --tls-key, clients use https and h2 via ALPN.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM). Both files are read again when they change.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve only clients holding a certificate this CA issued (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// The CA of the backends' certificates: needed for https:// backends.
    #[arg(long)]
    backend_ca: Option<PathBuf>,
    /// The load balancer's certificate for backends that want one (mutual TLS)…
    #[arg(long, requires_all = ["backend_key", "backend_ca"])]
    backend_cert: Option<PathBuf>,
    /// …and its key.
    #[arg(long, requires = "backend_cert")]
    backend_key: Option<PathBuf>,
    /// Log one line per request (target scaleout_lb::access).
    #[arg(long)]
    access_log: bool,
}

fn parse_backend(spec: &str) -> anyhow::Result<BackendConfig> {
    let mut parts = spec.split(',');
    let url = parts.next().unwrap_or_default().to_string();
    let mut cfg = BackendConfig::new(url);
    for opt in parts {
        match opt.split_once('=') {
            Some(("weight", w)) => {
                cfg.weight = w.parse().with_context(|| {
                    format!("--backend {spec}: weight {w:?} is not a whole number")
                })?
            }
            Some(("name", n)) if !n.is_empty() => cfg.name = Some(n.to_string()),
            _ => anyhow::bail!("--backend {spec}: options are weight=N and name=NAME, not {opt:?}"),
        }
    }
    Ok(cfg)
}

impl LbArgs {
    pub fn into_config(self) -> anyhow::Result<LbConfig> {
        let mut c = match &self.config {
            Some(path) => LbConfig::from_toml_file(path)?,
            None => LbConfig::default(),
        };
        if let Some(v) = self.listen {
            c.listen = v;
        } else if self.config.is_none() {
            anyhow::bail!("--listen ADDR is required (or a --config file that sets listen)");
        }
        if !self.backends.is_empty() {
            c.backends = self
                .backends
                .iter()
                .map(|s| parse_backend(s))
                .collect::<anyhow::Result<_>>()?;
        }
        if !self.discover.is_empty() {
            c.discover = self
                .discover
                .iter()
                .map(|url| scaleout_lb::config::DiscoverConfig {
                    interval: self.discover_interval,
                    resolver: self.discover_resolver,
                    ..scaleout_lb::config::DiscoverConfig::new(url.clone())
                })
                .collect();
        }
        macro_rules! set {
            ($($flag:ident => $($field:ident).+),* $(,)?) => {
                $(if let Some(v) = self.$flag { c.$($field).+ = v; })*
            };
        }
        set!(
            algorithm => algorithm, hash_on => hash_on, admin => admin, workers => workers,
            health_path => health.path, health_interval => health.interval,
            health_timeout => health.timeout, rise => health.rise, fall => health.fall,
            connect_timeout => timeouts.connect, header_timeout => timeouts.header_read,
            upstream_timeout => timeouts.upstream_response, idle_timeout => timeouts.idle,
            drain_timeout => timeouts.drain, max_header_bytes => limits.max_header_bytes,
            max_body_bytes => limits.max_body_bytes, max_connections => limits.max_connections,
            max_attempts => retry.max_attempts, retry_budget => retry.budget_ratio,
            body_buffer_bytes => limits.body_buffer_bytes, max_body_memory => limits.max_body_memory,
            max_spool_bytes => limits.max_spool_bytes, body_timeout => timeouts.body,
            max_body_time => timeouts.max_body, min_body_rate => limits.min_body_rate,
            rate_per_ip => limits.rate_per_ip, rate_burst => limits.rate_burst,
            max_in_flight_per_ip => limits.max_in_flight_per_ip,
        );
        if self.spool_dir.is_some() {
            c.limits.spool_dir = self.spool_dir;
        }
        if self.admin_token.is_some() {
            c.admin_token = self.admin_token;
        }
        if let Some(path) = &self.admin_token_file {
            c.admin_token = Some(token_from_file(path)?);
        }
        if c.admin_token.is_none() && !c.admin.ip().is_loopback() {
            // A name nobody can guess ahead (a pid can be), made with
            // create_new: a planted file is never taken for ours.
            let path = std::env::temp_dir().join(format!(
                "scaleout-lb-{}-{:016x}.admin-token",
                std::process::id(),
                rand::random::<u64>()
            ));
            c.admin_token = Some(token_from_file(&path)?);
            println!(
                "scaleout lb: the admin API listens beyond loopback ({}); its token is in {}",
                c.admin,
                path.display()
            );
        }
        if self.no_health_checks {
            c.health.enabled = false;
        }
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            c.tls = Some(scaleout_lb::config::TlsConfig {
                cert,
                key,
                client_ca: self.tls_client_ca,
            });
        }
        if let Some(ca) = self.backend_ca {
            c.upstream_tls = Some(scaleout_lb::config::UpstreamTlsConfig {
                ca,
                cert: self.backend_cert,
                key: self.backend_key,
            });
        }
        c.access_log |= self.access_log;
        c.validate()?;
        Ok(c)
    }
}

/// The token in `path`'s first line; a missing file is made, readable by
/// its owner only, with a new random token.
pub fn token_from_file(path: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(text) => {
            // A token anyone else could have written (or can read) is no
            // secret: the file must be this user's, and only this user's.
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(path)
                .with_context(|| format!("reading the token file {}", path.display()))?;
            if meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
                anyhow::bail!(
                    "{}: a token file must belong to this user and be readable by no one else (chmod 600)",
                    path.display()
                );
            }
            let token = text.lines().next().unwrap_or("").trim().to_string();
            if token.is_empty() {
                anyhow::bail!("{}: the token file is empty", path.display());
            }
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("making the directory {}", dir.display()))?;
            }
            let token = format!("{:032x}", rand::random::<u128>());
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("making the token file {}", path.display()))?;
            writeln!(file, "{token}")
                .with_context(|| format!("writing the token file {}", path.display()))?;
            Ok(token)
        }
        Err(e) => Err(e).with_context(|| format!("reading the token file {}", path.display())),
    }
}

pub async fn run(config: LbConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let lb = scaleout_lb::bind(config).await?;
    println!(
        "scaleout lb: {scheme}://{} ({} workers); admin http://{}",
        lb.addr, lb.workers, lb.admin_addr
    );
    scaleout_wire::ready::Ready {
        role: "lb".into(),
        url: format!("{scheme}://{}", lb.addr),
        name: None,
        id: None,
        raft: None,
        admin: Some(format!("http://{}", lb.admin_addr)),
    }
    .announce();
    lb.run(shutdown).await?;
    Ok(())
}
