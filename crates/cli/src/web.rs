//! `scaleout web`: one stateless web server of the links app over the
//! replicated database.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct WebArgs {
    /// Address to serve the app on, e.g. 127.0.0.1:8081 (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: String,
    /// The database: one or more node API URLs, comma-separated
    /// (http://127.0.0.1:4001,http://127.0.0.1:4011); the rest is discovered.
    #[arg(long, value_delimiter = ',', required_unless_present = "embedded_db")]
    db: Vec<String>,
    /// The seed's stage 1 instead: the links in this SQLite file, inside
    /// this process (web app, database and cache on one server; no --db).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["db", "db_ca", "db_credentials"])]
    embedded_db: Option<std::path::PathBuf>,
    /// This server's name, shown in X-Served-By and the page footer;
    /// `{hostname}` in it is the machine's (a container's) host name, so
    /// copies started from one spec are told apart.
    #[arg(long, default_value = "web-1")]
    name: String,
    /// Base of short URLs, e.g. https://sho.rt (default: from the request).
    #[arg(long)]
    public_url: Option<String>,
    /// How long a cached redirect may outlive its link's deletion elsewhere.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    cache_ttl: Duration,
    /// How long to wait at start for the database to have a leader.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    db_wait: Duration,
    /// A file whose first line is user:password, to sign in to a database
    /// started with --auth (or set SCALEOUT_DB_CREDENTIALS to such a file,
    /// or SCALEOUT_DB_USER and SCALEOUT_DB_PASSWORD).
    #[arg(long)]
    db_credentials: Option<std::path::PathBuf>,
    /// Time a client has to send a request head (slowloris).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    header_timeout: Duration,
    /// Connections at once; more are closed at once.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// A file whose first line is the admin token: `Authorization: Bearer`
    /// it to delete any link (or set SCALEOUT_WEB_ADMIN_TOKEN).
    #[arg(long)]
    admin_token_file: Option<std::path::PathBuf>,
    /// Links one client address may create per minute (0: no limit).
    #[arg(long, default_value_t = 60)]
    create_rate: u32,
    /// ...in bursts of this many.
    #[arg(long, default_value_t = 20)]
    create_burst: u32,
    /// A proxy (address or CIDR) whose X-Forwarded-For names the client; repeat
    /// for each (default: loopback and the private ranges).
    #[arg(long = "trusted-proxy", value_name = "CIDR")]
    trusted_proxies: Vec<String>,
    /// Serve HTTPS: this certificate chain (PEM; reloaded when it changes)…
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// …and its key.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Serve only clients (the load balancers) holding a certificate this CA issued.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// The CA of the database nodes' certificates, for https:// --db URLs.
    #[arg(long)]
    db_ca: Option<std::path::PathBuf>,
    /// This server's certificate for databases that want one (mutual TLS)…
    #[arg(long, requires = "db_client_key")]
    db_client_cert: Option<std::path::PathBuf>,
    /// …and its key.
    #[arg(long, requires = "db_client_cert")]
    db_client_key: Option<std::path::PathBuf>,
}

/// The admin token from `--admin-token-file` or `SCALEOUT_WEB_ADMIN_TOKEN`.
fn admin_token(file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    if let Some(path) = file {
        let token = crate::lb::token_from_file(path)
            .with_context(|| format!("--admin-token-file {}", path.display()))?;
        return Ok(Some(token));
    }
    Ok(std::env::var("SCALEOUT_WEB_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty()))
}

fn parse_net(text: &str) -> anyhow::Result<ipnet::IpNet> {
    if let Ok(net) = text.parse::<ipnet::IpNet>() {
        return Ok(net);
    }
    let ip: std::net::IpAddr = text.parse().map_err(|_| {
        anyhow::anyhow!("--trusted-proxy {text:?}: give an address or a CIDR, e.g. 10.0.0.0/8")
    })?;
    Ok(ipnet::IpNet::from(ip))
}

/// `--name` with `{hostname}` replaced by the host's name.
fn expand_name(name: &str) -> anyhow::Result<String> {
    if !name.contains("{hostname}") {
        return Ok(name.to_string());
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .ok_or_else(|| anyhow::anyhow!("--name {name}: this host's name cannot be read"))?;
    Ok(name.replace("{hostname}", &host))
}

pub async fn run(mut args: WebArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    args.name = expand_name(&args.name)?;
    for url in &args.db {
        if url.starts_with("https://") && args.db_ca.is_none() {
            anyhow::bail!("--db {url}: https needs --db-ca, the CA of the database's certificates");
        }
        if !url.starts_with("http://") && !url.starts_with("https://") {
            anyhow::bail!("--db {url}: give database API URLs, e.g. http://127.0.0.1:4001");
        }
    }
    let db_tls = args.db_ca.clone().map(|ca| scaleout_tls::ClientTls {
        ca: Some(ca),
        cert: args.db_client_cert.clone(),
        key: args.db_client_key.clone(),
    });
    let config = scaleout_web::WebConfig {
        name: args.name.clone(),
        public_url: args.public_url,
        cache_ttl: args.cache_ttl,
        limits: scaleout_serve::Limits {
            header_timeout: args.header_timeout,
            max_connections: args.max_connections.max(1),
            ..Default::default()
        },
        admin_token: admin_token(args.admin_token_file.as_deref())?,
        create_per_minute: args.create_rate,
        create_burst: args.create_burst,
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(scaleout_tls::ServerTls {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            }),
            _ => None,
        },
        trusted_proxies: if args.trusted_proxies.is_empty() {
            scaleout_web::abuse::default_trusted()
        } else {
            args.trusted_proxies
                .iter()
                .map(|t| parse_net(t))
                .collect::<anyhow::Result<_>>()?
        },
        ..Default::default()
    };
    config.validate()?;
    let credentials = match &args.db_credentials {
        Some(path) => {
            Some(scaleout_client::Credentials::from_file(path).map_err(anyhow::Error::msg)?)
        }
        None => scaleout_client::Credentials::from_env().map_err(anyhow::Error::msg)?,
    };
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot listen", args.listen))?;
    let addr = listener.local_addr()?;
    let (store, database): (Arc<dyn scaleout_web::Store>, String) = match &args.embedded_db {
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("--embedded-db {}", path.display()))?;
            }
            let store = scaleout_web::SqliteStore::open(path, "db-1 (embedded SQLite)")
                .with_context(|| format!("--embedded-db {}", path.display()))?;
            (
                Arc::new(store),
                format!("embedded SQLite {}", path.display()),
            )
        }
        None => tokio::select! {
            store = scaleout_web::RemoteStore::connect_with(args.db.clone(), credentials, db_tls.as_ref(), args.db_wait) => (
                Arc::new(store.with_context(|| format!("database {}", args.db.join(",")))?),
                args.db.join(","),
            ),
            () = shutdown.cancelled() => return Ok(()),
        },
    };
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!(
        "scaleout web: {} {scheme}://{addr} (database {database})",
        args.name
    );
    scaleout_wire::ready::Ready {
        role: "web".into(),
        url: format!("{scheme}://{addr}"),
        name: Some(args.name.clone()),
        id: None,
        raft: None,
        admin: None,
    }
    .announce();
    scaleout_web::run(config, store, listener, shutdown).await?;
    Ok(())
}
