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

mod cluster;
pub mod consistency;
mod stand;
mod start;
mod transfer;
mod tuning;

pub use start::{resolve, start};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::header;
use openraft::error::{CheckIsLeaderError, ForwardToLeader, RaftError};
use openraft::ServerState;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::determinism::Moment;
use crate::engine::{self, ExecOptions, ReadLimits, WriteEnv};
use crate::error::NodeError;
use crate::http::{self, Answer, ReadOptions};
use crate::metrics::Stats;
use crate::raft::network::{self, Contact};
use crate::raft::proposer::Proposer;
use crate::raft::state_store::{ReadError, Readers};
use crate::raft::{Command, Member, Raft, WriteError};
use crate::request::Statement;

use consistency::{Before, LogView, MinIndex, View};

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
    /// stops presenting itself as the leader and answers its pending
    /// writes "outcome unknown": 1.5 election timeouts. A follower stands
    /// about one timeout after the last heartbeat (`node/stand.rs`), so a
    /// leader cut off is elected out after about that; it must give up
    /// soon after, for its clients to move on. Not much sooner: a payload
    /// of entries in flight (one large write) holds back the heartbeats
    /// behind it, and a shorter lease would give up on writes that are
    /// about to commit (measured with 2 timeouts: a cut-off leader's
    /// clients were back after 1.03 s at the median).
    lease: Duration,
    started: Instant,
    db_path: PathBuf,
    proposer: Proposer,
    /// One membership change at a time (openraft refuses overlapping ones).
    membership_change: tokio::sync::Mutex<()>,
    /// `?queue` writes: answered at once with a sequence number, proposed
    /// in the background, at most [`QUEUE_DEPTH`] at a time.
    queued: Arc<tokio::sync::Semaphore>,
    queue_seq: std::sync::atomic::AtomicU64,
}

/// How long a `freshness_strict` read on a node in touch with its leader
/// waits for the entries in its log to be applied before it is refused:
/// a follower learns a commit with the leader's next message (see
/// `raft/network.rs`, `VOTER_ECHO`), a few milliseconds at most.
const STRICT_CATCH_UP: Duration = Duration::from_millis(50);

/// Queued writes a node holds before it refuses more (`503`).
pub const QUEUE_DEPTH: usize = 4096;

/// A running node: its listeners are bound and serving.
pub struct Running {
    pub node: Arc<DbNode>,
    servers: tokio::task::JoinSet<()>,
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

/// Why openraft ended a write it was handed. Stopping Raft (a graceful
/// shutdown) ends writes that may already be in the log and committed:
/// their outcome is unknown, never a plain failure (found by review:
/// writes answered 500 "raft stopped" were in the data after a restart,
/// and a client retrying them would have written them twice).
fn refusal_of_write(e: &WriteError) -> NodeError {
    match e {
        RaftError::Fatal(_) => {
            NodeError::ForwardUnknown("this node stopped while the write was pending".into())
        }
        _ => redirect_of(e),
    }
}

/// Why a linearizable read could not confirm the leadership: a leader
/// that did not hear from a quorum knows no leader (it was answered 500,
/// with openraft's dump of the membership, found by review); a node
/// that stops leads no more.
fn refusal_of_read(e: &RaftError<u64, CheckIsLeaderError<u64, Member>>) -> NodeError {
    match e {
        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)) => NodeError::NoLeader,
        RaftError::Fatal(_) => NodeError::NotLeader { leader: None },
        _ => redirect_of(e),
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
        consistency::holds_quorum(m.millis_since_quorum_ack, self.lease)
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
        self.leads(&m)
    }

    fn leads(&self, m: &openraft::RaftMetrics<u64, Member>) -> bool {
        m.state == ServerState::Leader && m.current_leader == Some(self.id) && self.holds_quorum(m)
    }

    /// `Ok` when this node leads; else where the leader is. A node that
    /// knows no leader (an election is under way, or its winner's first
    /// message has not reached this node yet) waits up to the lease for
    /// one first, so a client is not turned away while a handover or
    /// failover leaves the cluster leaderless for a moment (found by a
    /// flaky CI run: a follower refused a request sent the moment another
    /// node had seen the new leader). A leader cut off from its quorum
    /// knows itself as leader and does not wait: it answers at once.
    async fn lead_here(&self) -> Result<(), NodeError> {
        if self.is_leader() {
            return Ok(());
        }
        if self.raft.metrics().borrow().current_leader.is_none() {
            // Timing out is an answer too: no leader is known.
            let _ = self
                .raft
                .wait(Some(self.lease))
                .metrics(|m| m.current_leader.is_some(), "a leader is known")
                .await;
            if self.is_leader() {
                return Ok(());
            }
        }
        Err(self.not_leader())
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
            Err(e) => Err(refusal_of_write(&e)),
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
        let view = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let heard = self.contact.age().is_some_and(|age| age <= self.lease);
            LogView {
                own_end: m.last_log_index.unwrap_or(0),
                confirmed_leader: m.state == ServerState::Leader
                    && m.millis_since_quorum_ack
                        .is_some_and(|ms| u128::from(ms) <= self.lease.as_millis()),
                is_leader: self.leads(&m),
                hears_another_leader: heard
                    && m.current_leader
                        .filter(|id| *id != self.id)
                        .is_some_and(|id| m.membership_config.membership().get_node(&id).is_some()),
            }
        };
        let mut decision = consistency::min_index(index, &view);
        if decision == MinIndex::AskLeader {
            // Asked twice (the remembered end, then a fresh one) before a
            // refusal: the leader's log may have grown since.
            decision = MinIndex::Wait;
            for fresh in [false, true] {
                match self.leader_log_end(fresh).await {
                    Some(end) if index <= end => return Ok(()),
                    Some(_) => {}
                    None => return Ok(()),
                }
            }
            if let MinIndex::Refuse { committed } =
                consistency::after_asking(index, self.leader_log_end(false).await)
            {
                decision = MinIndex::Refuse { committed };
            }
        }
        match decision {
            MinIndex::Refuse { committed } => Err(NodeError::AheadOfLog {
                asked: index,
                committed,
            }),
            MinIndex::Wait | MinIndex::AskLeader => Ok(()),
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
}

#[async_trait::async_trait]
impl http::DataNode for DbNode {
    async fn execute(
        &self,
        statements: Vec<Statement>,
        opts: ExecOptions,
    ) -> Result<Answer, NodeError> {
        self.lead_here().await?;
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
        Ok(http::answer(results, raft_index))
    }

    async fn query(
        &self,
        statements: Vec<Statement>,
        opts: ReadOptions,
    ) -> Result<Answer, NodeError> {
        let view = {
            // Read in place: the metrics hold the membership and every
            // follower's progress, too much to copy on every read.
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            View {
                is_leader: self.leads(&m),
                contact_age: self.contact.age(),
                applied: m.last_applied.map(|l| l.index),
                last_log: m.last_log_index,
            }
        };
        let level = consistency::effective_level(opts.level, self.read_only);
        match consistency::before_read(level, opts.freshness, opts.freshness_strict, &view) {
            Before::Serve => {}
            // Served by the leader, even if that is now this node.
            Before::NotLeader => {
                return Err(self
                    .lead_here()
                    .await
                    .err()
                    .unwrap_or_else(|| self.not_leader()))
            }
            Before::Stale => {
                // In touch with the leader but (strict) behind its own log:
                // entries not yet known committed here are committed with
                // the leader's next message, within milliseconds. Waits
                // that long for them rather than refuse.
                let in_touch = opts
                    .freshness
                    .zip(view.contact_age)
                    .is_some_and(|(limit, age)| age <= limit);
                let caught_up = match (in_touch, view.last_log, opts.freshness) {
                    (true, Some(last), Some(limit)) => {
                        let applied = self
                            .raft
                            .wait(Some(STRICT_CATCH_UP.min(limit)))
                            .applied_index_at_least(Some(last), "freshness_strict")
                            .await;
                        // Still in touch once caught up (found by review).
                        applied.is_ok() && self.contact.age().is_some_and(|age| age <= limit)
                    }
                    _ => false,
                };
                if !caught_up {
                    return Err(NodeError::Stale);
                }
            }
            Before::ConfirmLeadership => {
                // Held like any leader's request while no leader is known
                // (found by review: it alone was refused at once).
                self.lead_here().await?;
                let confirmed =
                    tokio::time::timeout(self.read_timeout, self.raft.ensure_linearizable()).await;
                match confirmed {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(refusal_of_read(&e)),
                    Err(_) => return Err(NodeError::NoLeader),
                }
            }
            Before::Barrier => {
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
        Ok(http::answer(results, raft_index))
    }

    async fn queue(
        &self,
        statements: Vec<Statement>,
        opts: ExecOptions,
        wait: bool,
    ) -> Result<u64, NodeError> {
        self.lead_here().await?;
        let slot = self.queued.clone().try_acquire_owned().map_err(|_| {
            NodeError::Busy(format!(
                "{QUEUE_DEPTH} queued writes are waiting; retry, or write without ?queue"
            ))
        })?;
        let sequence = self
            .queue_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let size = statements.iter().map(|s| s.sql.len() + 16).sum();
        let command = Command::Execute {
            statements,
            opts,
            env: self.write_env(),
        };
        // In line before the answer: a later `?queue&wait` write commits
        // after every write queued before it.
        let committed = self.proposer.submit(command, size)?;
        let write = async move {
            let done = committed.await;
            drop(slot);
            if let Err(e) = &done {
                tracing::warn!(sequence_number = sequence, error = %e, "a queued write failed");
            }
            done
        };
        if wait {
            write.await?;
        } else {
            tokio::spawn(write);
        }
        Ok(sequence)
    }

    async fn read_only(&self, statements: Vec<Statement>) -> Result<bool, NodeError> {
        self.readers
            .with(Instant::now() + self.read_timeout, move |db| {
                engine::all_read_only(db, &statements)
            })
            .await
            .map_err(|e| match e {
                ReadError::Busy(_) => NodeError::Busy(e.to_string()),
                ReadError::Internal(msg) => NodeError::Internal(msg),
            })
    }
}
