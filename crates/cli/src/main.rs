//! `scaleout`: the one binary. Parses flags, sets up logging and the
//! runtime, and calls the role's library entry point.

mod bench;
mod chaos;
mod db;
mod dns;
mod lab;
mod lb;
mod probe;
mod web;

/// mimalloc: measurably faster than glibc malloc on the proxy's hot path
/// (many small, short-lived allocations across worker threads).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

/// The seed's scale-out web architecture — DNS, load balancer, stateless web
/// servers, replicated database — every tier in one binary.
#[derive(Parser)]
#[command(name = "scaleout", version, propagate_version = true)]
struct Cli {
    /// Log format on stderr. The level comes from SCALEOUT_LOG (e.g. `debug`,
    /// `scaleout_web=debug`), default `info,openraft=error` (openraft logs routine elections at info and warn).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole stage of the seed on this machine (1: one server; 2-5: each tier its own process; default 5), with its dashboard.
    Up(UpArgs),
    /// Run the load balancer: spread HTTP traffic over web servers, with health checks, retries and draining.
    Lb(Box<lb::LbArgs>),
    /// Run the site's DNS: an authoritative zone that answers with healthy load balancers only.
    Dns(Box<dns::DnsArgs>),
    /// Run stage 4 under a seeded schedule of faults (kills, pauses) while clients work, then check the history.
    Chaos(Box<chaos::ChaosArgs>),
    /// Run one stateless web server of the links app over the replicated database.
    Web(Box<web::WebArgs>),
    /// Run a database node: SQLite replicated with Raft behind rqlite's HTTP API (leader, voter or read replica).
    Db(Box<db::DbArgs>),
    /// Control a running lab (`scaleout up`): status, kill, stop, pause, resume, restart.
    Lab(lab::LabArgs),
    /// Load an HTTP server: fixed concurrency or a fixed rate, latencies in HDR histograms.
    Bench(Box<bench::BenchArgs>),
    /// GET a URL and exit 0 on a 2xx answer, 1 otherwise: a container
    /// healthcheck in an image with no shell and no curl.
    Probe(probe::ProbeArgs),
}

#[derive(clap::Args)]
struct UpArgs {
    /// Which stage of the seed to run: 1 = a single server; 2 = web and database apart; 3 = + load balancer and two web servers; 4 = + replicated database (3 voters, 2 read replicas); 5 = + DNS and a second load balancer (the seed's final diagram).
    #[arg(long, default_value_t = 5)]
    stage: u8,
    /// Directory for the nodes' data; it survives restarts.
    #[arg(long, default_value = "scaleout-data")]
    data: PathBuf,
    /// Port of the site; other nodes take the ports after it. 0: any free port.
    #[arg(long, default_value_t = 8080)]
    port_base: u16,
    /// Address to bind. Loopback unless you mean to expose it.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Every hop over TLS (client → lb → web → db, db ↔ db), with a CA
    /// made for the lab in <data>/stageN/tls.
    #[arg(long)]
    tls: bool,
    /// Where the lab's dashboard and its API listen; port 0
    /// picks a free one, printed at start.
    #[arg(long, default_value = "127.0.0.1:0")]
    dashboard: std::net::SocketAddr,
    /// Run each database node in a network namespace of its own (needs
    /// root and iproute2), so the lab can cut the network between them:
    /// the partition-leader scenario.
    #[arg(long)]
    netns: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match start(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scaleout: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Settles what sizes the runtime (the load balancer's or the database
/// node's worker threads), builds it, and runs the command on it.
fn start(command: Command) -> anyhow::Result<()> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let command = match command {
        Command::Lb(args) => {
            let config = args.into_config().context("scaleout lb")?;
            builder.worker_threads(scaleout_lb::worker_threads(&config));
            Ready::Lb(Box::new(config))
        }
        Command::Db(args) => {
            if let Some(threads) = args.threads() {
                builder.worker_threads(threads);
            }
            Ready::Other(Command::Db(args))
        }
        other => Ready::Other(other),
    };
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        match command {
            Ready::Lb(config) => lb::run(*config, shutdown_on_signal())
                .await
                .context("scaleout lb"),
            Ready::Other(command) => run(command).await,
        }
    })
}

/// A command whose settings are parsed.
enum Ready {
    Lb(Box<scaleout_lb::LbConfig>),
    Other(Command),
}

async fn run(command: Command) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signal();
    match command {
        Command::Up(args) => {
            let config = scaleout_lab::UpConfig {
                stage: args.stage,
                data_dir: args.data,
                port_base: args.port_base,
                host: args.host,
                tls: args.tls,
                dashboard: args.dashboard,
                netns: args.netns,
            };
            scaleout_lab::up(config, shutdown)
                .await
                .context("scaleout up")
        }
        Command::Dns(args) => dns::run(*args, shutdown).await.context("scaleout dns"),
        Command::Db(args) => db::run(*args, shutdown).await.context("scaleout db"),
        Command::Web(args) => web::run(*args, shutdown).await.context("scaleout web"),
        Command::Chaos(args) => chaos::run(*args, shutdown).await,
        Command::Lab(args) => lab::run(args).await,
        Command::Bench(args) => bench::run(*args, shutdown).await,
        Command::Probe(args) => probe::run(args).await,
        // Settled (and run) by start(), which sizes the runtime first.
        Command::Lb(_) => anyhow::bail!("scaleout lb is started by start()"),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SCALEOUT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Set by `scaleout up` on the processes it starts.
const SUPERVISED: &str = "SCALEOUT_SUPERVISED";

/// A token cancelled at the first SIGINT or SIGTERM (graceful shutdown); a
/// second signal exits at once.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    if std::env::var_os(SUPERVISED).is_some() {
        // Started by `scaleout up`: never outlive it, even when it is
        // killed with SIGKILL and cannot stop its children itself.
        let parent = nix::unistd::getppid();
        let cancel = token.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                if nix::unistd::getppid() != parent {
                    tracing::warn!("the supervising scaleout up is gone; shutting down");
                    cancel.cancel();
                    return;
                }
            }
        });
    }
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down (signal again to exit at once)");
        cancel.cancel();
        wait_for_signal().await;
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
