//! `scaleout-lab`: `scaleout up` — starts the topology of one of the seed's
//! stages and keeps it running until shut down.
//!
//! Stage 1 (the seed's single server) runs in this process: the links web
//! app, its embedded SQLite database and its read-through cache. Later
//! stages start each tier as its own child process and supervise them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Fatal errors of `scaleout up`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("stage {0} is not available yet; this build runs stage 1 (single server)")]
    StageNotBuilt(u8),
    #[error("stage must be 1 to 5, not {0}")]
    NoSuchStage(u8),
    #[error("cannot listen on {addr}: {source} (pick another --port-base)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] scaleout_web::StoreError),
    #[error(transparent)]
    Web(#[from] scaleout_web::Error),
}

/// What `scaleout up` should start.
#[derive(Debug, Clone)]
pub struct UpConfig {
    /// The seed's stage, 1 to 5.
    pub stage: u8,
    /// Where every node keeps its data.
    pub data_dir: PathBuf,
    /// The site listens here; other nodes take the ports after it. 0 lets
    /// the OS pick (tests).
    pub port_base: u16,
    /// Address every node binds.
    pub host: IpAddr,
}

impl Default for UpConfig {
    fn default() -> Self {
        UpConfig {
            stage: 1,
            data_dir: PathBuf::from("scaleout-data"),
            port_base: 8080,
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

impl UpConfig {
    pub fn validate(&self) -> Result<(), Error> {
        match self.stage {
            1 => Ok(()),
            2..=5 => Err(Error::StageNotBuilt(self.stage)),
            n => Err(Error::NoSuchStage(n)),
        }
    }
}

/// Runs the stage until `shutdown` is cancelled.
pub async fn up(config: UpConfig, shutdown: CancellationToken) -> Result<(), Error> {
    config.validate()?;
    stage1(config, shutdown).await
}

/// The seed's first stage: "the web app, the database and a cache can all
/// run on one server".
async fn stage1(config: UpConfig, shutdown: CancellationToken) -> Result<(), Error> {
    let db_path = config.data_dir.join("stage1").join("links.sqlite");
    let store = scaleout_web::SqliteStore::open(&db_path, "db-1 (embedded SQLite)")?;
    let addr = SocketAddr::new(config.host, config.port_base);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
    let web = scaleout_web::WebConfig::default();
    println!("scaleout stage 1: a single server (web app + database + cache in one process)");
    println!(
        "  {:<6} http://{addr}/  links app, cache TTL {:?}",
        web.name, web.cache_ttl
    );
    println!(
        "  {:<6} {}  SQLite, fsync on commit",
        "db-1",
        db_path.display()
    );
    println!();
    println!("open http://{addr}/ in a browser; Ctrl-C stops");
    scaleout_web::run(web, Arc::new(store), listener, shutdown).await?;
    Ok(())
}
