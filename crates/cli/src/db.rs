//! `scaleout db`: flags → `scaleout_db::node::DbConfig`, the two listeners
//! bound (so port 0 works and the printed addresses are the real ones).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use scaleout_db::node::{self, DbConfig};
use scaleout_db::raft::Member;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct DbArgs {
    /// This node's id, unique in the cluster: as in rqlite, any name
    /// (`1`, `0`, `db-a`); a whole number from 1 is also its Raft id,
    /// any other name is hashed to one (ARCHITECTURE.md).
    #[arg(long)]
    id: String,
    /// The HTTP API address (rqlite's API), host:port; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:4001")]
    http: String,
    /// The Raft address the other nodes connect to, host:port.
    #[arg(long, default_value = "127.0.0.1:4002")]
    raft: String,
    /// The data directory (Raft log, vote, SQLite database, snapshots).
    #[arg(long)]
    data: PathBuf,
    /// An existing node's API URL (http://host:port): join its cluster.
    /// Or a comma-separated list of the cluster's nodes, this one among
    /// them (the same flags for every node): the first one listed starts
    /// the cluster when it has no data and no other listed node has a
    /// cluster; the others join through whichever answers.
    #[arg(long)]
    join: Option<String>,
    /// Join as a read replica (a non-voting Raft learner).
    #[arg(long)]
    read_only: bool,
    /// The API address others should use, if not --http (e.g. behind NAT).
    #[arg(long)]
    http_adv: Option<String>,
    /// The Raft address others should use, if not --raft.
    #[arg(long)]
    raft_adv: Option<String>,
    /// The leader's lease: time without a heartbeat before a voter asks
    /// the others whether the leader is gone, and the one with the
    /// longest log stands for election. The default resumes writes about
    /// 0.6 s after the leader is lost.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "500ms")]
    election_timeout: Duration,
    /// Applied entries between snapshots (the log before a snapshot is dropped).
    #[arg(long, default_value_t = 8192)]
    snapshot_threshold: u64,
    /// How long a read waits for min_index or for the leader's confirmation.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    read_timeout: Duration,
    /// The longest a query may run before it is stopped (a request's
    /// ?db_timeout= may only shorten it).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    query_timeout: Duration,
    /// Bytes of values one query's results may hold.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    max_result_bytes: usize,
    /// SQLite VM steps one write request may take before it is stopped
    /// (about 1 s per 100 million here). The leader's value travels with
    /// each write, so every node reaches the same verdict.
    #[arg(long, default_value_t = scaleout_db::guard::DEFAULT_WRITE_BUDGET)]
    write_budget: u64,
    /// Users and permissions for the API, in rqlite's format (a JSON list
    /// of {"username", "password" (plain or bcrypt), "perms"}; "*" is
    /// everyone). Without it the API is open, as rqlite's.
    #[arg(long)]
    auth: Option<PathBuf>,
    /// A file holding the secret every Raft RPC between the nodes must
    /// carry (the same on every node; or set SCALEOUT_CLUSTER_SECRET).
    /// Without one, anyone who reaches --raft can take part in Raft.
    #[arg(long)]
    cluster_secret_file: Option<PathBuf>,
    /// A file whose first line is user:password, to sign in when joining
    /// a cluster with --auth (or SCALEOUT_DB_CREDENTIALS, or
    /// SCALEOUT_DB_USER and SCALEOUT_DB_PASSWORD).
    #[arg(long)]
    join_credentials: Option<PathBuf>,
    /// Time a client has to send a request head (slowloris).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    header_timeout: Duration,
    /// Connections at once on each listener; more are closed at once.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// TLS on both ports and to every peer: this node's certificate chain
    /// (PEM; reloaded when it changes)…
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// …its key…
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// …and the cluster's CA: the Raft port takes only peers with a
    /// certificate it issued (mutual TLS), and peers' must chain to it.
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Serve the API only to clients holding a certificate this CA issued.
    #[arg(long, requires = "tls_cert")]
    tls_api_client_ca: Option<PathBuf>,
    /// Worker threads of the node's runtime (default: one per CPU).
    /// Nodes that share a machine's cores do better with fewer: a write
    /// passes between tasks many times, and each pass from one thread to
    /// another wakes a parked thread (README, "Performance").
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
}

impl DbArgs {
    /// The runtime's worker threads, when set.
    pub fn threads(&self) -> Option<usize> {
        self.threads.map(usize::from)
    }
}

async fn bind(what: &str, addr: &str) -> anyhow::Result<(TcpListener, String)> {
    let resolved = node::resolve(addr)
        .await
        .with_context(|| format!("--{what}"))?;
    let listener = TcpListener::bind(resolved)
        .await
        .with_context(|| format!("--{what} {addr}: cannot listen"))?;
    let port = listener.local_addr()?.port();
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    Ok((listener, format!("{host}:{port}")))
}

pub async fn run(args: DbArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Some(raft_id) = scaleout_wire::data::raft_id(&args.id) else {
        anyhow::bail!(
            "--id {:?}: give a name of 1 to 128 characters without control characters",
            args.id
        );
    };
    let scheme = if args.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    for url in args.join.iter().flat_map(|j| j.split(',')) {
        if !url.trim().starts_with(&format!("{scheme}://")) {
            anyhow::bail!(
                "--join {url}: give the API URL of a node, e.g. {scheme}://127.0.0.1:4001 (a cluster is TLS throughout or not at all)"
            );
        }
    }
    if args.election_timeout < Duration::from_millis(50) {
        anyhow::bail!("--election-timeout must be at least 50ms");
    }
    let (api, api_addr) = bind("http", &args.http).await?;
    let (raft, raft_addr) = bind("raft", &args.raft).await?;
    let advertise = Member {
        api: args.http_adv.unwrap_or(api_addr),
        raft: args.raft_adv.unwrap_or(raft_addr),
        name: scaleout_wire::data::named(raft_id, &args.id).then(|| args.id.clone()),
    };
    let mut config = DbConfig::new(raft_id, advertise.clone(), args.data.clone());
    config.join = args.join;
    config.read_only = args.read_only;
    config.election_timeout = args.election_timeout;
    config.snapshot_threshold = args.snapshot_threshold.max(1);
    config.read_timeout = args.read_timeout;
    if args.query_timeout.is_zero() || args.write_budget < scaleout_db::guard::STEPS_PER_CHECK {
        anyhow::bail!(
            "--query-timeout must be more than 0 and --write-budget at least {}",
            scaleout_db::guard::STEPS_PER_CHECK
        );
    }
    config.users = match &args.auth {
        Some(path) => Some(std::sync::Arc::new(
            scaleout_db::auth::Users::load(path).map_err(|e| anyhow::anyhow!("--auth {e}"))?,
        )),
        None => None,
    };
    config.cluster_secret = match (
        &args.cluster_secret_file,
        std::env::var("SCALEOUT_CLUSTER_SECRET"),
    ) {
        (Some(path), _) => Some(
            scaleout_db::auth::ClusterSecret::load(path)
                .map_err(|e| anyhow::anyhow!("--cluster-secret-file {e}"))?,
        ),
        (None, Ok(secret)) => Some(
            scaleout_db::auth::ClusterSecret::new(secret.trim())
                .map_err(|e| anyhow::anyhow!("SCALEOUT_CLUSTER_SECRET: {e}"))?,
        ),
        (None, Err(_)) => None,
    };
    let credentials = match &args.join_credentials {
        Some(path) => {
            Some(scaleout_client::Credentials::from_file(path).map_err(anyhow::Error::msg)?)
        }
        None => scaleout_client::Credentials::from_env().map_err(anyhow::Error::msg)?,
    };
    config.join_credentials = credentials.map(|c| {
        let (user, password) = c.pair();
        (user.to_string(), password.to_string())
    });
    config.limits = scaleout_serve::Limits {
        header_timeout: args.header_timeout,
        max_connections: args.max_connections.max(1),
        ..Default::default()
    };
    config.query_timeout = args.query_timeout;
    config.max_result_bytes = args.max_result_bytes;
    config.write_budget = args.write_budget;
    if let (Some(cert), Some(key), Some(ca)) = (args.tls_cert, args.tls_key, args.tls_ca) {
        config.tls = Some(scaleout_db::peers::DbTls {
            cert,
            key,
            ca,
            api_client_ca: args.tls_api_client_ca,
        });
    }
    let running = node::start(config, api, raft, shutdown.clone()).await?;
    println!(
        "scaleout db: node {} {scheme}://{} raft {} data {}",
        args.id,
        advertise.api,
        advertise.raft,
        args.data.display()
    );
    scaleout_wire::ready::Ready {
        role: "db".into(),
        url: format!("{scheme}://{}", advertise.api),
        name: Some(args.id.clone()),
        id: Some(raft_id),
        raft: Some(advertise.raft.to_string()),
        admin: None,
    }
    .announce();
    running.run(shutdown).await;
    Ok(())
}
