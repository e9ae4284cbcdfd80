//! A database node: openraft over the durable log and the SQLite state
//! machine, serving rqlite's HTTP API.
//!
//! Writes go through the log on the leader (a follower's HTTP layer
//! forwards them there); the answer carries the index that committed
//! them. Reads are served from local read-only connections once the
//! requested consistency holds: `none` at once (optionally no staler than
//! `freshness`), `weak` if this node believes it leads, `linearizable`
//! after the leader confirms its leadership with a quorum (and has applied
//! up to that point), `strong` after a round trip through the log; with
//! `min_index=N` only once N is applied here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use openraft::error::{ForwardToLeader, RaftError};
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Caller;
use crate::determinism::Moment;
use crate::engine::{ExecOptions, ReadLimits, WriteEnv};
use crate::http::{self, error, Answer, Forward, Level, NodeError, ReadOptions};
use crate::metrics::Stats;
use crate::raft::log_store::LogStore;
use crate::raft::network::{self, Contact, Network};
use crate::raft::proposer::Proposer;
use crate::raft::state_store::{ReadError, Readers, StateStore};
use crate::raft::{Command, Member, Raft};
use crate::request::Statement;

/// How a node runs.
#[derive(Debug, Clone)]
pub struct DbConfig {
    pub id: u64,
    /// The addresses the other nodes and clients use to reach this one.
    pub advertise: Member,
    pub data: PathBuf,
    /// An existing node's API URL, to join its cluster.
    pub join: Option<String>,
    /// Join as a non-voting read replica (a Raft learner).
    pub read_only: bool,
    /// A follower that hears no leader for this long (up to twice it)
    /// starts an election.
    pub election_timeout: Duration,
    /// Entries applied since the last snapshot that trigger a new one.
    pub snapshot_threshold: u64,
    /// How long a read waits for `min_index` or a leader's confirmation.
    pub read_timeout: Duration,
    /// The longest a query may run (rqlite's `db_timeout`; a request's
    /// own `db_timeout` may only shorten it).
    pub query_timeout: Duration,
    /// Bytes of values one read's results may hold.
    pub max_result_bytes: usize,
    /// SQLite VM steps one write request may take, the same verdict on
    /// every node (it travels in the log entry).
    pub write_budget: u64,
    /// Users and permissions on the API (`--auth`); `None`: open, as
    /// rqlite without `-auth`.
    pub users: Option<Arc<crate::auth::Users>>,
    /// What this node signs in with when it joins (`user`, `password`).
    pub join_credentials: Option<(String, String)>,
    /// The secret every Raft RPC must carry; `None`: none needed.
    pub cluster_secret: Option<crate::auth::ClusterSecret>,
    /// Request-head timeout and connection cap of both listeners.
    pub limits: scaleout_serve::Limits,
    /// TLS on both ports and to every peer; `None`: plain HTTP.
    pub tls: Option<crate::peers::DbTls>,
}

impl DbConfig {
    pub fn new(id: u64, advertise: Member, data: PathBuf) -> Self {
        DbConfig {
            id,
            advertise,
            data,
            join: None,
            read_only: false,
            election_timeout: Duration::from_millis(500),
            snapshot_threshold: 8192,
            read_timeout: Duration::from_secs(5),
            query_timeout: Duration::from_secs(5),
            max_result_bytes: 64 * 1024 * 1024,
            write_budget: crate::guard::DEFAULT_WRITE_BUDGET,
            users: None,
            join_credentials: None,
            cluster_secret: None,
            limits: scaleout_serve::Limits::default(),
            tls: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("data directory {0}: {1}")]
    Storage(PathBuf, String),
    #[error("raft: {0}")]
    Raft(String),
}

pub struct DbNode {
    id: u64,
    raft: Raft,
    readers: Arc<Readers>,
    me: Member,
    read_only: bool,
    contact: Arc<Contact>,
    client: reqwest::Client,
    stats: Stats,
    read_timeout: Duration,
    query_timeout: Duration,
    max_result_bytes: usize,
    write_budget: u64,
    /// Held for the node's life: one process per data directory.
    _lock: std::fs::File,
    users: Option<Arc<crate::auth::Users>>,
    join_credentials: Option<(String, String)>,
    cluster_secret: Option<crate::auth::ClusterSecret>,
    /// Where the leader's log ended, and when it said so.
    leader_end: std::sync::Mutex<Option<(Instant, u64)>>,
    /// How long a leader may go without hearing from a quorum before it
    /// stops presenting itself as the leader: twice the election timeout.
    /// Followers stand 3-4 election timeouts after the last heartbeat, and
    /// a payload of entries in flight (one large write) holds back the
    /// heartbeats behind it, so a shorter lease would give up on writes
    /// that are about to commit.
    lease: Duration,
    started: Instant,
    db_path: PathBuf,
    proposer: Proposer,
    /// One membership change at a time (openraft refuses overlapping ones).
    membership_change: tokio::sync::Mutex<()>,
}

/// A running node: its listeners are bound and serving.
pub struct Running {
    pub node: Arc<DbNode>,
    servers: tokio::task::JoinSet<()>,
}

/// Takes the data directory's lock (`LOCK`, an exclusive `flock` held
/// for the process's life): a second node on the same directory would
/// write the same files.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File, StartError> {
    let fail = |e: &dyn std::fmt::Display| StartError::Storage(dir.to_path_buf(), e.to_string());
    std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))
        .map_err(|e| fail(&e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartError::Storage(
            dir.to_path_buf(),
            "another scaleout db process is using this data directory (it holds LOCK); stop it or give another --data".into(),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(fail(&e)),
    }
}

fn fresh_data_dir(dir: &Path) -> bool {
    !dir.join("raft").join("log").exists() && !dir.join("raft").join("vote").exists()
}

/// Opens the node's storage, starts Raft and serves both listeners; with
/// an empty data directory, bootstraps a one-node cluster or (with
/// `join`) asks an existing one to take this node in.
pub async fn start(
    config: DbConfig,
    api: TcpListener,
    raft_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<Running, StartError> {
    let storage =
        |e: &dyn std::fmt::Display| StartError::Storage(config.data.clone(), e.to_string());
    let lock = lock_data_dir(&config.data)?;
    let fresh = fresh_data_dir(&config.data);
    // Set on shutdown: whatever statement runs stops within a thousand
    // SQLite steps, so SIGTERM is never held by a runaway query.
    let stopping = Arc::new(AtomicBool::new(false));
    {
        let (stopping, shutdown) = (stopping.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            stopping.store(true, Ordering::Relaxed);
        });
    }
    let log = LogStore::open(&config.data.join("raft")).map_err(|e| storage(&e))?;
    let state = StateStore::open(&config.data, stopping.clone()).map_err(|e| storage(&e))?;
    let db_path = state.db_path();
    let readers = Arc::new(Readers::open(&db_path, 4, stopping).map_err(|e| storage(&e))?);

    // openraft 0.9 makes a follower that knew a leader wait out a lease of
    // `election_timeout_max` and then a random timeout between min and max
    // before it stands: 3-4 T after the last heartbeat. Tried: min = T/2,
    // max = 3T/4 (1.25-1.5 T); failover then took 0.8-1.1 s when it went
    // well, but 5-7 s or more in 4 of 10 leader kills under the chaos load
    // on 2 cores (elections that kept failing), against a steady 1.8-4.2 s
    // with these values.
    let election = config.election_timeout.as_millis() as u64;
    let raft_config = openraft::Config {
        cluster_name: "scaleout".into(),
        // openraft 0.9 gives every AppendEntries (a heartbeat or a payload
        // of entries) the heartbeat interval to complete, and sends the
        // same payload again when it does not: a payload that cannot cross
        // in time is never replicated. Two fifths of the election timeout
        // leaves a follower two heartbeats before it may stand, and a
        // payload 200 ms (by default) to be sent, parsed and fsynced.
        heartbeat_interval: (election * 2 / 5).max(20),
        election_timeout_min: election,
        election_timeout_max: election * 2,
        install_snapshot_timeout: 10_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_threshold),
        max_in_snapshot_log_to_keep: (config.snapshot_threshold / 2).min(1000),
        snapshot_max_chunk_size: 1024 * 1024,
        // Small payloads, so that catching up goes in steps that each
        // cross well within the interval above.
        max_payload_entries: 64,
        ..Default::default()
    }
    .validate()
    .map_err(|e| StartError::Config(e.to_string()))?;
    crate::peers::init(config.tls.as_ref()).map_err(|e| StartError::Config(format!("TLS: {e}")))?;
    let acceptors = match &config.tls {
        None => (None, None),
        Some(tls) => {
            let alpn: &[&[u8]] = &[b"h2", b"http/1.1"];
            let raft = tls.raft_server().acceptor(alpn);
            let api = tls.api_server().acceptor(alpn);
            match (raft, api) {
                (Ok(r), Ok(a)) => (Some(r), Some(a)),
                (Err(e), _) | (_, Err(e)) => return Err(StartError::Config(format!("TLS: {e}"))),
            }
        }
    };
    let network = Network::new(config.cluster_secret.clone());
    let raft = Raft::new(config.id, Arc::new(raft_config), network, log, state)
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;

    let contact = Arc::new(Contact::default());
    let node = Arc::new(DbNode {
        id: config.id,
        raft: raft.clone(),
        readers,
        me: config.advertise.clone(),
        read_only: config.read_only,
        contact: contact.clone(),
        client: crate::peers::client(reqwest::Client::builder().timeout(crate::peers::TIMEOUT)),
        stats: Stats::default(),
        read_timeout: config.read_timeout,
        query_timeout: config.query_timeout,
        max_result_bytes: config.max_result_bytes,
        write_budget: config.write_budget,
        _lock: lock,
        users: config.users.clone(),
        join_credentials: config.join_credentials.clone(),
        cluster_secret: config.cluster_secret.clone(),
        leader_end: std::sync::Mutex::new(None),
        lease: config.election_timeout * 2,
        started: Instant::now(),
        db_path,
        proposer: Proposer::start(raft.clone(), redirect_of, config.election_timeout * 2),
        membership_change: tokio::sync::Mutex::new(()),
    });

    let mut servers = tokio::task::JoinSet::new();
    let rpc = network::router(raft.clone(), contact, config.cluster_secret.clone());
    servers.spawn(serve(
        raft_listener,
        rpc,
        config.limits,
        acceptors.0,
        shutdown.clone(),
    ));
    servers.spawn(serve(
        api,
        node.clone().router(),
        config.limits,
        acceptors.1,
        shutdown.clone(),
    ));

    if fresh {
        match &config.join {
            None => {
                let members = BTreeMap::from([(config.id, config.advertise.clone())]);
                raft.initialize(members)
                    .await
                    .map_err(|e| StartError::Raft(e.to_string()))?;
                tracing::info!(id = config.id, "bootstrapped a one-node cluster");
            }
            Some(url) => {
                let node = node.clone();
                let url = url.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move { node.join(&url, shutdown).await });
            }
        }
    } else {
        tracing::info!(id = config.id, "restarted with its data and membership");
    }
    Ok(Running { node, servers })
}

impl Running {
    /// Serves until `shutdown`, then stops Raft and the listeners.
    pub async fn run(mut self, shutdown: CancellationToken) {
        shutdown.cancelled().await;
        if let Err(e) = self.node.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not stop cleanly");
        }
        while self.servers.join_next().await.is_some() {}
    }
}

async fn serve(
    listener: TcpListener,
    router: Router,
    limits: scaleout_serve::Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let refusals = Arc::default();
    let served = scaleout_serve::serve(listener, router, limits, refusals, tls, shutdown).await;
    if let Err(e) = served {
        tracing::error!(error = %e, "server stopped");
    }
}

/// Where a non-leader sends a client.
fn redirect_of<E>(e: &RaftError<u64, E>) -> NodeError
where
    E: openraft::TryAsRef<ForwardToLeader<u64, Member>> + std::fmt::Debug + std::fmt::Display,
{
    match e.forward_to_leader() {
        Some(ForwardToLeader {
            leader_node: Some(node),
            ..
        }) => NodeError::NotLeader {
            leader: Some(node.api_url()),
        },
        Some(_) => NodeError::NoLeader,
        None => NodeError::Internal(e.to_string()),
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl DbNode {
    /// The leader as this node knows it. Itself only while it has heard
    /// from a quorum within the election timeout: a leader cut off from
    /// the others (the rest may have elected another meanwhile) says it
    /// knows no leader, so clients look elsewhere instead of waiting on
    /// writes it cannot commit.
    fn leader(&self) -> Option<(u64, Member)> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let id = m.current_leader?;
        if id == self.id && !self.holds_quorum(&m) {
            return None;
        }
        let node = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, node))
    }

    fn holds_quorum(&self, m: &openraft::RaftMetrics<u64, Member>) -> bool {
        m.millis_since_quorum_ack
            .is_none_or(|ms| u128::from(ms) <= self.lease.as_millis())
    }

    /// Whether this node leads, or has heard from its leader lately (a
    /// follower or replica keeps the last leader it knew long after that
    /// leader is gone).
    fn hears_leader(&self) -> bool {
        self.is_leader() || self.contact.age().is_some_and(|age| age <= self.lease * 2)
    }

    fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.id) && self.holds_quorum(&m)
    }

    fn not_leader(&self) -> NodeError {
        match self.leader() {
            Some((_, node)) => NodeError::NotLeader {
                leader: Some(node.api_url()),
            },
            None => NodeError::NoLeader,
        }
    }

    /// What the leader fixes for a write it takes: the moment its
    /// functions see and its budget.
    fn write_env(&self) -> WriteEnv {
        WriteEnv {
            moment: Moment {
                unix_ms: unix_ms(),
                seed: rand::random(),
            },
            budget: self.write_budget,
        }
    }

    /// Whether this node still applies the log (an apply that failed on
    /// the node's own account, a full disk say, stops its Raft core).
    fn applying(&self) -> Result<(), String> {
        match &self.raft.metrics().borrow().running_state {
            Ok(()) => Ok(()),
            Err(fatal) => Err(fatal.to_string()),
        }
    }

    async fn write(&self, command: Command) -> Result<(u64, Vec<Value>), NodeError> {
        match self.raft.client_write(command).await {
            Ok(written) => Ok((written.log_id.index, written.data)),
            Err(e) => Err(redirect_of(&e)),
        }
    }

    /// Refuses at once a `min_index` the cluster has not reached, rather
    /// than make the read wait for it. The leader knows its own log (an
    /// index a write returned is committed, so it is there). A follower or
    /// replica whose own log is short of the index asks the leader where
    /// its log ends (remembered for a moment, asked again before
    /// refusing). A node that cannot reach the leader cannot tell, and
    /// waits as before.
    async fn refuse_beyond_the_log(&self, index: u64) -> Result<(), NodeError> {
        let own_end = || self.raft.metrics().borrow().last_log_index.unwrap_or(0);
        let ahead = |end: u64| NodeError::AheadOfLog {
            asked: index,
            committed: end,
        };
        if index <= own_end() {
            return Ok(());
        }
        // A leader a quorum has confirmed lately knows the log (one that
        // just restarted may still call itself the leader of its old term).
        let confirmed = {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.state == ServerState::Leader
                && m.millis_since_quorum_ack
                    .is_some_and(|ms| u128::from(ms) <= self.lease.as_millis())
        };
        if confirmed {
            return Err(ahead(own_end()));
        }
        if self.is_leader() {
            return Ok(());
        }
        // Only a leader this node hears from now can tell (after a
        // restart, the leader it remembers may be itself, or gone).
        let heard = self.contact.age().is_some_and(|age| age <= self.lease);
        if !heard || self.leader().is_none_or(|(id, _)| id == self.id) {
            return Ok(());
        }
        for fresh in [false, true] {
            match self.leader_log_end(fresh).await {
                Some(end) if index <= end => return Ok(()),
                Some(_) => {}
                None => return Ok(()),
            }
        }
        match self.leader_log_end(false).await {
            Some(end) if index > end => Err(ahead(end)),
            _ => Ok(()),
        }
    }

    /// Where the leader's log ends, as the leader says (`GET /raft/log`
    /// on its Raft listener); remembered for 200 ms unless `fresh`.
    async fn leader_log_end(&self, fresh: bool) -> Option<u64> {
        let now = Instant::now();
        if !fresh {
            let known = *self
                .leader_end
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((at, end)) = known {
                if now.duration_since(at) < Duration::from_millis(200) {
                    return Some(end);
                }
            }
        }
        let (_, leader) = self.leader()?;
        let mut request = self
            .client
            .get(format!(
                "{}://{}/raft/log",
                crate::peers::scheme(),
                leader.raft
            ))
            .timeout(self.lease);
        if let Some(secret) = &self.cluster_secret {
            request = request.header(header::AUTHORIZATION, secret.header());
        }
        let answer: network::LogEnd = request.send().await.ok()?.json().await.ok()?;
        *self
            .leader_end
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((now, answer.last_log_index));
        Some(answer.last_log_index)
    }

    async fn wait_applied(&self, index: u64) -> Result<(), NodeError> {
        self.raft
            .wait(Some(self.read_timeout))
            .applied_index_at_least(Some(index), "min_index")
            .await
            .map(|_| ())
            .map_err(|_| NodeError::NotCaughtUp(index))
    }

    /// Asks the cluster at `url` to take this node in, until it does.
    async fn join(&self, url: &str, shutdown: CancellationToken) {
        let body = json!({
            "id": self.id,
            "api_addr": self.me.api,
            "addr": self.me.raft,
            "voter": !self.read_only,
        });
        let target = format!("{}/join", url.trim_end_matches('/'));
        loop {
            let mut request = self.client.post(&target).json(&body);
            if let Some((user, password)) = &self.join_credentials {
                request = request.basic_auth(user, Some(password));
            }
            if let Some(secret) = &self.cluster_secret {
                request = request.header(network::CLUSTER_SECRET_HEADER, secret.header());
            }
            let sent = request.send().await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    tracing::info!(%url, voter = !self.read_only, "joined the cluster");
                    return;
                }
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    tracing::warn!(%url, %status, answer = %text, "join refused; retrying");
                }
                Err(e) => tracing::warn!(%url, error = %e, "join failed; retrying"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    fn router(self: Arc<Self>) -> Router {
        let cluster = Router::new()
            .route("/status", get(status))
            .route("/nodes", get(nodes))
            .route("/readyz", get(readyz))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/leader", get(leader))
            .route("/metrics", get(metrics))
            .route("/join", post(join))
            .route("/remove", delete(remove))
            .route("/db/backup", get(backup))
            .route("/db/load", post(load))
            .layer(axum::extract::DefaultBodyLimit::max(http::MAX_BODY * 8))
            .with_state(self.clone());
        let stats = self.clone();
        let users = self.users.clone();
        let mut api = http::router(self).merge(cluster);
        if let Some(users) = users {
            api = api.layer(axum::middleware::from_fn(move |req, next| {
                let users = users.clone();
                async move { sign_in(users, req, next).await }
            }));
        }
        api.layer(axum::middleware::from_fn(move |req, next| {
            let stats = stats.clone();
            async move { stats.stats.observe(req, next).await }
        }))
    }
}

#[async_trait::async_trait]
impl http::Node for DbNode {
    async fn execute(
        &self,
        statements: Vec<Statement>,
        opts: ExecOptions,
    ) -> Result<Answer, NodeError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let env = self.write_env();
        let size: usize = statements
            .iter()
            .map(|s: &Statement| s.sql.len() + 16)
            .sum();
        let (raft_index, results) = self
            .proposer
            .propose(
                Command::Execute {
                    statements,
                    opts,
                    env,
                },
                size,
            )
            .await?;
        Ok(Answer {
            results,
            raft_index,
        })
    }

    async fn query(
        &self,
        statements: Vec<Statement>,
        opts: ReadOptions,
    ) -> Result<Answer, NodeError> {
        let level = match opts.level {
            Level::Auto if self.read_only => Level::None,
            Level::Auto => Level::Weak,
            level => level,
        };
        match level {
            Level::None => {
                if let Some(limit) = opts.freshness.filter(|_| !self.is_leader()) {
                    match self.contact.age() {
                        Some(age) if age <= limit => {}
                        _ => return Err(NodeError::Stale),
                    }
                    if opts.freshness_strict {
                        let m = self.raft.metrics().borrow().clone();
                        if m.last_applied.map(|l| l.index) < m.last_log_index {
                            return Err(NodeError::Stale);
                        }
                    }
                }
            }
            Level::Weak | Level::Auto => {
                if !self.is_leader() {
                    return Err(self.not_leader());
                }
            }
            Level::Linearizable => {
                let confirmed =
                    tokio::time::timeout(self.read_timeout, self.raft.ensure_linearizable()).await;
                match confirmed {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(redirect_of(&e)),
                    Err(_) => return Err(NodeError::NoLeader),
                }
            }
            Level::Strong => {
                if !self.is_leader() {
                    return Err(self.not_leader());
                }
                self.proposer.propose(Command::Barrier, 0).await?;
            }
        }
        if let Some(index) = opts.min_index {
            self.refuse_beyond_the_log(index).await?;
            self.wait_applied(index).await?;
        }
        let timeout = opts
            .db_timeout
            .map_or(self.query_timeout, |t| t.min(self.query_timeout));
        let limits = ReadLimits {
            deadline: Instant::now() + timeout,
            max_bytes: self.max_result_bytes,
        };
        let (results, raft_index) = self
            .readers
            .query(statements, opts.exec, limits)
            .await
            .map_err(|e| match e {
                ReadError::Busy(_) => NodeError::Busy(e.to_string()),
                ReadError::Internal(msg) => NodeError::Internal(msg),
            })?;
        Ok(Answer {
            results,
            raft_index,
        })
    }
}

/// Signs a request in (`--auth`) and lets it through if its user may do
/// what its endpoint does; handlers that need more look at the [`Caller`]
/// it leaves in the request.
async fn sign_in(
    users: Arc<crate::auth::Users>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(need) = crate::auth::needs(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    // bcrypt takes a fifth of a second: never on the async threads.
    let checked = tokio::task::spawn_blocking(move || users.check(header.as_deref(), need)).await;
    let checked = match checked {
        Ok(c) => c,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("sign-in: {e}")),
    };
    match checked {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(denied) => {
            tracing::info!(path = req.uri().path(), %denied, "request refused");
            http::denied_response(&denied)
        }
    }
}

// ---- cluster endpoints ----

type Node = State<Arc<DbNode>>;

fn role(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

async fn status(State(node): Node) -> Response {
    let m = node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let learners: Vec<u64> = membership.learner_ids().collect();
    let leader = node.leader();
    let db_size = std::fs::metadata(&node.db_path).map_or(0, |m| m.len());
    axum::Json(json!({
        "node": {
            "id": node.id.to_string(),
            "api_addr": node.me.api_url(),
            "raft_addr": node.me.raft,
            "read_only": node.read_only,
            "uptime_seconds": node.started.elapsed().as_secs_f64(),
        },
        "store": {
            "node_id": node.id.to_string(),
            "leader": leader.as_ref().map(|(id, n)| json!({"node_id": id.to_string(), "api_addr": n.api_url(), "addr": n.raft})),
            "db_size": db_size,
            "raft": {
                "state": role(m.state),
                "term": m.current_term,
                "last_log_index": m.last_log_index.unwrap_or(0),
                "applied_index": m.last_applied.map_or(0, |l| l.index),
                "snapshot_index": m.snapshot.map_or(0, |l| l.index),
                "purged_index": m.purged.map_or(0, |l| l.index),
                "voters": voters,
                "learners": learners,
                "voter": voters.contains(&node.id),
                "millis_since_quorum_ack": m.millis_since_quorum_ack,
                "last_contact_ms": node.contact.age().map(|a| a.as_millis() as u64),
            },
        },
        "build": { "version": env!("CARGO_PKG_VERSION"), "engine": "scaleout" },
    }))
    .into_response()
}

#[derive(Deserialize, Default)]
struct NodesParams {
    nonvoters: Option<String>,
    ver: Option<String>,
    /// How long to wait for each node's answer (rqlite's `timeout`, e.g.
    /// `500ms`, `2s`); 1 s by default.
    timeout: Option<String>,
}

async fn nodes(State(node): Node, Query(params): Query<NodesParams>) -> Response {
    let patience = match params.timeout.as_deref().map(humantime::parse_duration) {
        None => Duration::from_secs(1),
        Some(Ok(d)) if d > Duration::ZERO => d.min(Duration::from_secs(30)),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "timeout must be a duration such as 500ms or 2s",
            )
        }
    };
    let m = node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership().clone();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let with_nonvoters = params.nonvoters.is_some();
    let leader = node.leader().map(|(id, _)| id);
    // On the leader: how many entries each node still lacks.
    let last = m.last_log_index.unwrap_or(0);
    let lag_of = |id: u64| -> Option<u64> {
        if id == node.id && m.state == ServerState::Leader {
            return Some(0);
        }
        let matched = m.replication.as_ref()?.get(&id)?;
        Some(last.saturating_sub(matched.map_or(0, |l| l.index)))
    };
    let mut checks = tokio::task::JoinSet::new();
    for (id, member) in membership.nodes() {
        let voter = voters.contains(id);
        if !voter && !with_nonvoters {
            continue;
        }
        let (id, member, client) = (*id, member.clone(), node.client.clone());
        let lag = lag_of(id);
        checks.spawn(async move {
            let started = Instant::now();
            let reachable = client
                .get(format!("{}/healthz", member.api_url()))
                .timeout(patience)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            (id, member, voter, reachable, started.elapsed(), lag)
        });
    }
    let mut listed = Vec::new();
    while let Some(Ok((id, member, voter, reachable, took, lag))) = checks.join_next().await {
        let mut entry = json!({
            "id": id.to_string(),
            "api_addr": member.api_url(),
            "addr": member.raft,
            "voter": voter,
            "reachable": reachable,
            "leader": leader == Some(id),
            "time": took.as_secs_f64(),
        });
        if let Some(lag) = lag {
            // Ours, beyond rqlite's fields: entries behind the leader.
            entry["lag"] = json!(lag);
        }
        listed.push(entry);
    }
    listed.sort_by_key(|n| n["id"].as_str().and_then(|s| s.parse::<u64>().ok()));
    let body = if params.ver.as_deref() == Some("2") {
        json!({ "nodes": listed })
    } else {
        Value::Object(
            listed
                .into_iter()
                .map(|n| (n["id"].as_str().unwrap_or_default().to_string(), n))
                .collect(),
        )
    };
    axum::Json(body).into_response()
}

async fn readyz(State(node): Node, Query(params): Query<BTreeMap<String, String>>) -> Response {
    if let Err(why) = node.applying() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("[+]node ok\n[-]store stopped applying the log: {why}\n"),
        )
            .into_response();
    }
    if params.contains_key("noleader") || (node.leader().is_some() && node.hears_leader()) {
        (StatusCode::OK, "[+]node ok\n[+]leader ok\n[+]store ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "[+]node ok\n[-]leader not contactable\n",
        )
            .into_response()
    }
}

async fn leader(State(node): Node) -> Response {
    match node.leader() {
        Some((id, member)) => axum::Json(json!({
            "leader": { "id": id.to_string(), "api_addr": member.api_url(), "addr": member.raft }
        }))
        .into_response(),
        None => error(StatusCode::SERVICE_UNAVAILABLE, "no leader"),
    }
}

async fn metrics(State(node): Node) -> Response {
    let m = node.raft.metrics().borrow().clone();
    let text = node.stats.render(&m, &node.proposer.counts);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Requests only the leader may serve: a follower forwards them.
async fn on_leader(
    node: &DbNode,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Option<Response> {
    if node.is_leader() {
        return None;
    }
    let NodeError::NotLeader {
        leader: Some(leader),
    } = node.not_leader()
    else {
        return Some(error(StatusCode::SERVICE_UNAVAILABLE, "no leader"));
    };
    let forward = Forward {
        leader: &leader,
        method,
        uri,
        headers,
        body,
    };
    Some(
        forward
            .send(&node.client, http::uri_flag(uri, "redirect"))
            .await,
    )
}

#[derive(Deserialize)]
struct JoinRequest {
    id: serde_json::Value,
    #[serde(alias = "api")]
    api_addr: String,
    #[serde(alias = "raft")]
    addr: String,
    #[serde(default = "yes")]
    voter: bool,
}

fn yes() -> bool {
    true
}

fn node_id(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

async fn join(
    State(node): Node,
    caller: Option<axum::Extension<Caller>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: JoinRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("join: {e}; send {{\"id\": N, \"api_addr\": \"host:port\", \"addr\": \"host:port\", \"voter\": true}}"),
            )
        }
    };
    let Some(id) = node_id(&request.id) else {
        return error(StatusCode::BAD_REQUEST, "join: id must be a whole number");
    };
    if let Some(axum::Extension(caller)) = &caller {
        if request.voter && !caller.may(crate::auth::Perm::Join) {
            return http::denied_response(&crate::auth::Denied::Forbidden(
                "joining as a voter needs the join permission (join-read-only allows a read replica)".into(),
            ));
        }
    }
    // With a cluster secret, a joining node proves it holds it: the
    // leader is about to send it the whole log, and the secret with every
    // RPC.
    if let Some(secret) = &node.cluster_secret {
        let given = headers
            .get(network::CLUSTER_SECRET_HEADER)
            .and_then(|v| v.to_str().ok());
        if !secret.admits(given) {
            tracing::warn!(id, "a join without the cluster secret was refused");
            return error(
                StatusCode::UNAUTHORIZED,
                "join: this cluster needs its secret from a joining node (--cluster-secret-file)",
            );
        }
    }
    if let Some(forwarded) = on_leader(&node, method, &uri, &headers, body).await {
        return forwarded;
    }
    let member = Member {
        api: request
            .api_addr
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .to_string(),
        raft: request.addr,
    };
    // One node per address: another id on a member's address would give
    // that node two votes (or a node its own leader as a learner).
    let taken = node
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .nodes()
        .find(|(other, m)| **other != id && (m.raft == member.raft || m.api == member.api))
        .map(|(other, _)| *other);
    if let Some(other) = taken {
        return error(
            StatusCode::CONFLICT,
            &format!("join: node {other} already has the address {member}; nothing was changed"),
        );
    }
    // A node whose Raft address does not answer is not added: added, it
    // would hold the membership (and, as a voter, the quorum) hostage.
    if !node.answers_raft(&member).await {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "join: node {id}'s Raft address {} does not answer; nothing was changed",
                member.raft
            ),
        );
    }
    let _one_at_a_time = node.membership_change.lock().await;
    let membership = node.raft.metrics().borrow().membership_config.clone();
    let known = membership.membership().get_node(&id).cloned();
    let is_voter = membership.membership().voter_ids().any(|v| v == id);
    if known.as_ref() == Some(&member) && is_voter == request.voter {
        return axum::Json(json!({ "joined": id, "already": true })).into_response();
    }
    match tokio::time::timeout(
        JOIN_CATCH_UP,
        node.raft.add_learner(id, member.clone(), true),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return error(StatusCode::SERVICE_UNAVAILABLE, &format!("join: {e}")),
        Err(_) => {
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                &format!("join: node {id} is still catching up as a learner; ask again to go on"),
            )
        }
    }
    if request.voter {
        let change = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
        if let Err(e) = node.raft.change_membership(change, false).await {
            return error(StatusCode::SERVICE_UNAVAILABLE, &format!("join: {e}"));
        }
    }
    tracing::info!(id, %member, voter = request.voter, "node joined");
    axum::Json(json!({ "joined": id })).into_response()
}

/// How long a join waits for the new node to catch up before answering
/// (the node asks again, and the join goes on from where it is).
const JOIN_CATCH_UP: Duration = Duration::from_secs(30);

impl DbNode {
    /// Whether `member`'s Raft listener answers at all (within 5 s).
    async fn answers_raft(&self, member: &Member) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // No secret goes with the probe: the address is the joiner's
            // word, and a secured node answers 401, which is an answer.
            let request = self
                .client
                .get(format!(
                    "{}://{}/raft/log",
                    crate::peers::scheme(),
                    member.raft
                ))
                .timeout(Duration::from_secs(1));
            if request.send().await.is_ok() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

async fn remove(
    State(node): Node,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let id = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| node_id(&v["id"]));
    let Some(id) = id else {
        return error(StatusCode::BAD_REQUEST, "remove: send {\"id\": N}");
    };
    if let Some(forwarded) = on_leader(&node, method, &uri, &headers, body).await {
        return forwarded;
    }
    let _one_at_a_time = node.membership_change.lock().await;
    let membership = node.raft.metrics().borrow().membership_config.clone();
    if membership.membership().get_node(&id).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            &format!("remove: node {id} is not in the cluster"),
        );
    }
    let voters: BTreeSet<u64> = membership.membership().voter_ids().collect();
    let change = if voters.contains(&id) {
        ChangeMembers::RemoveVoters(BTreeSet::from([id]))
    } else {
        ChangeMembers::RemoveNodes(BTreeSet::from([id]))
    };
    match node.raft.change_membership(change, false).await {
        Ok(_) => {
            if voters.contains(&id) {
                // A removed voter stays a learner: take it out entirely.
                let _ = node
                    .raft
                    .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                    .await;
            }
            tracing::info!(id, "node removed");
            axum::Json(json!({ "removed": id })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("remove: {e}")),
    }
}

#[derive(Deserialize, Default)]
struct BackupParams {
    fmt: Option<String>,
}

async fn backup(
    State(node): Node,
    Query(params): Query<BackupParams>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let local = http::uri_flag(&uri, "noleader");
    if !local {
        if let Some(forwarded) = on_leader(&node, method, &uri, &headers, Bytes::new()).await {
            return forwarded;
        }
    }
    let sql = match params.fmt.as_deref() {
        None | Some("binary") | Some("") => false,
        Some("sql") => true,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("fmt {other:?}: use sql, or leave it out for the SQLite file"),
            )
        }
    };
    // Its own connection: VACUUM INTO writes (the copy), which the
    // query-only readers refuse.
    let path = node.db_path.clone();
    let made = tokio::task::spawn_blocking(move || {
        let conn = rusqlite::Connection::open(&path)?;
        if sql {
            crate::dump::dump(&conn).map(String::into_bytes)
        } else {
            crate::dump::file_copy(&conn)
        }
    })
    .await
    .map_err(|e| e.to_string());
    match made {
        Ok(Ok(bytes)) => {
            let content_type = if sql {
                "application/sql"
            } else {
                "application/octet-stream"
            };
            ([(header::CONTENT_TYPE, content_type)], bytes).into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("backup: {e}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("backup: {e}")),
    }
}

async fn load(
    State(node): Node,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if body.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "load: send a SQLite file or SQL text",
        );
    }
    if let Some(forwarded) = on_leader(&node, method, &uri, &headers, body.clone()).await {
        return forwarded;
    }
    let command = if body.starts_with(b"SQLite format 3\0") {
        let bytes = body.to_vec();
        match tokio::task::spawn_blocking(move || crate::dump::dump_file(&bytes)).await {
            Ok(Ok(sql)) => Command::Load {
                sql,
                replace: true,
                env: node.write_env(),
            },
            Ok(Err(e)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("load: not a usable SQLite file: {e}"),
                )
            }
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("load: {e}")),
        }
    } else {
        let Ok(sql) = String::from_utf8(body.to_vec()) else {
            return error(
                StatusCode::BAD_REQUEST,
                "load: the body is neither a SQLite file nor UTF-8 SQL text",
            );
        };
        Command::Load {
            sql,
            replace: false,
            env: node.write_env(),
        }
    };
    match node.write(command).await {
        Ok((raft_index, results)) => {
            let failed = results.iter().any(|r| r.get("error").is_some());
            let status = if failed {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::OK
            };
            (
                status,
                axum::Json(json!({ "results": results, "raft_index": raft_index })),
            )
                .into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// The listening address a `host:port` names (the first it resolves to).
pub async fn resolve(addr: &str) -> Result<SocketAddr, StartError> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| StartError::Config(format!("{addr}: {e}")))?
        .next()
        .ok_or_else(|| StartError::Config(format!("{addr}: resolves to no address")))
}
