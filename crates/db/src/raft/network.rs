//! Node-to-node Raft RPCs over HTTP with JSON bodies: `POST /raft/append`,
//! `/raft/vote`, `/raft/snapshot` on each node's `--raft` listener.
//!
//! A peer that cannot be connected to is reported `Unreachable`, so
//! openraft backs off instead of spinning; any other failure is a network
//! error and retried at the next heartbeat. Each call carries openraft's
//! own deadline for it — except a payload of entries: openraft 0.9 gives
//! every AppendEntries the heartbeat interval and, when it runs out, sends
//! the same payload again, so a payload that takes longer to send, parse
//! and fsync (one large write) would never be replicated. Such a call is
//! kept when openraft stops waiting (it goes on whenever the peer is
//! called again), and the retry of the same payload waits for that call's
//! answer instead of starting over (bounded by [`PAYLOAD_TIMEOUT`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use sync_wrapper::SyncWrapper;

use super::log_store::Durable;
use super::stream;
use super::{LogId, Member, Raft, TypeConfig};
use crate::auth::ClusterSecret;
use crate::metrics::{Stages, Timed};
use axum::response::IntoResponse;
use openraft::EntryPayload;
use tokio::sync::watch;

/// Connections to the other nodes (one pool shared by all peers).
#[derive(Clone)]
pub struct Network {
    client: reqwest::Client,
    /// HTTP/1.1 only: it asks for [`stream`]s (an upgrade).
    stream_client: reqwest::Client,
    secret: Option<ClusterSecret>,
    durable: Durable,
    stages: Arc<Stages>,
    replicas: Replicas,
}

/// What the leader needs to send a read replica each entry once, already
/// committed, instead of twice.
///
/// openraft 0.9 sends every peer the entries, then, once they are
/// committed, a second AppendEntries only to raise the peer's commit
/// index: two messages each way per write, for each peer. A voter's
/// answer to the first is its vote that the entry is durable, so a
/// voter's entries go at once; the second, right after the voter's answer,
/// is answered here and its commit index goes with the next message to
/// the voter, or on its own [`COMMIT_LATER`] after ([`VOTER_ECHO`]). A
/// read replica's answers count for
/// nothing (it never votes, and openraft's lease counts voters only), so
/// its entries are held until this leader has applied them (bounded by
/// [`REPLICA_HOLD`]) and go with their commit index, and the second
/// AppendEntries that follows, asking nothing new of the replica, is
/// answered here, without a message, if the replica answered the entries
/// just now ([`REPLICA_ECHO`]). The replica learns each commit once the
/// leader has applied it (openraft's heartbeat would bring it right after
/// the commit, before the leader's apply); the leader saves a
/// send and an answer per write, the replica a wake-up, and the voters'
/// entries no longer wait behind the replica's on the leader's thread.
#[derive(Clone)]
pub struct Replicas {
    /// The leader's metrics: its membership says who is a learner. Set
    /// once the Raft exists; until then nobody is.
    metrics: Arc<OnceLock<watch::Receiver<openraft::RaftMetrics<u64, Member>>>>,
    /// The last entry this node applied.
    applied: watch::Receiver<Option<LogId>>,
}

/// The least time between two payloads of entries to a read replica:
/// the entries written meanwhile go together in the next (openraft sends
/// a peer one payload at a time and the next from where it left off).
/// At one client a write every few hundred microseconds reached the
/// replica as a message of its own, with a wake-up, a parse and a log
/// write each; a replica's reads already trail by up to its fsync
/// interval ([`super::log_store::LEARNER_SYNC_EVERY`]).
pub const REPLICA_EVERY: Duration = Duration::from_millis(2);
/// The longest a read replica's entries wait for their commit here.
pub const REPLICA_HOLD: Duration = Duration::from_millis(50);
/// How soon after a read replica answered entries a heartbeat asking
/// nothing new of it is answered without a message (a heartbeat later
/// than this goes, so the replica still hears from its leader).
pub const REPLICA_ECHO: Duration = Duration::from_millis(5);

/// How soon after a voter answered entries a heartbeat asking nothing
/// new of it but a higher commit index is answered here (the commit index
/// follows with the next message, or [`COMMIT_LATER`]). The answer is the
/// voter's own of just before: its log and its vote. It tells openraft
/// nothing it did not know but the time, up to this much later than the
/// voter's real answer; openraft's lease (which sets
/// `millis_since_quorum_ack`, see [`crate::node`]) is overstated by at
/// most that. A linearizable read's check goes to every voter for real:
/// openraft makes a new client for it, which has answered nothing.
pub const VOTER_ECHO: Duration = Duration::from_millis(2);
/// How long a commit index answered here waits for the next message to
/// the voter before it goes on its own.
pub const COMMIT_LATER: Duration = Duration::from_millis(2);
/// The longest a commit index sent on its own is given.
const COMMIT_LATER_TIMEOUT: Duration = Duration::from_millis(500);

impl Replicas {
    pub fn new(applied: watch::Receiver<Option<LogId>>) -> Self {
        Replicas {
            metrics: Arc::default(),
            applied,
        }
    }

    /// Gives it the Raft's metrics, once the Raft exists.
    pub fn watch(&self, raft: &Raft) {
        self.watch_metrics(raft.metrics());
    }

    fn watch_metrics(&self, metrics: watch::Receiver<openraft::RaftMetrics<u64, Member>>) {
        let _ = self.metrics.set(metrics);
    }

    /// Whether `id` is a learner (a read replica) in the membership this
    /// node knows last (joint or not: a voter of either half is a voter).
    fn is_learner(&self, id: u64) -> bool {
        self.metrics.get().is_some_and(|m| {
            m.borrow()
                .membership_config
                .membership()
                .learner_ids()
                .any(|l| l == id)
        })
    }

    /// Waits (at most `within`) until this node has applied the last of
    /// `rpc`'s entries, then sends them as committed. An entry applied
    /// here is committed. The one applied is at or past the payload's
    /// last index and was made either by the payload's last entry's
    /// leader in its term or by the leader sending this payload (in the
    /// term of its vote, whose log it was read from and which never
    /// rewrites its own log): by Raft's log matching, the payload's last
    /// entry is then the committed one at its index (a later leader's
    /// entries never match; found by review: checking the first alone
    /// held every entry of an earlier term, a replica catching up after
    /// an election, for the whole wait). A membership change is sent at
    /// once: the replica may be a voter of the next membership.
    async fn commit_first(&self, rpc: &mut AppendEntriesRequest<TypeConfig>, within: Duration) {
        let Some(last) = rpc.entries.last().map(|e| e.log_id) else {
            return;
        };
        if rpc.leader_commit >= Some(last)
            || rpc
                .entries
                .iter()
                .any(|e| matches!(e.payload, EntryPayload::Membership(_)))
        {
            return;
        }
        let sender = *rpc.vote.leader_id();
        let mut applied = self.applied.clone();
        let committed = {
            let waited = tokio::time::timeout(
                within,
                applied.wait_for(|a| {
                    a.is_some_and(|a| {
                        (a.leader_id == last.leader_id || a.leader_id == sender)
                            && a.index >= last.index
                    })
                }),
            )
            .await;
            matches!(waited, Ok(Ok(_)))
        };
        if committed {
            rpc.leader_commit = Some(last);
        }
    }
}

/// What a peer last answered entries to: whose they were, the last of
/// them, the commit index they carried, and when.
struct Answered {
    vote: openraft::Vote<u64>,
    last: Option<LogId>,
    commit: Option<LogId>,
    at: Instant,
}

impl Answered {
    /// Whether the heartbeat `rpc` asks nothing of the peer that it did
    /// not answer within `within`, but perhaps a higher commit index.
    fn covers(&self, rpc: &AppendEntriesRequest<TypeConfig>, within: Duration) -> bool {
        rpc.entries.is_empty()
            && rpc.vote == self.vote
            && rpc.prev_log_id == self.last
            && self.at.elapsed() < within
    }
}

impl Network {
    /// `secret`: what every RPC carries, when the cluster has one;
    /// `durable`: how far this node's log is on disk (a commit index goes
    /// out only once it is, see [`super::log_store`]).
    pub fn new(
        secret: Option<ClusterSecret>,
        durable: Durable,
        stages: Arc<Stages>,
        replicas: Replicas,
    ) -> Result<Self, reqwest::Error> {
        let client = crate::peers::client(
            reqwest::Client::builder()
                .connect_timeout(Duration::from_millis(500))
                .pool_idle_timeout(Duration::from_secs(30))
                .tcp_nodelay(true),
        )?;
        let stream_client = crate::peers::client(
            reqwest::Client::builder()
                .connect_timeout(Duration::from_millis(500))
                .http1_only()
                .tcp_nodelay(true),
        )?;
        Ok(Network {
            client,
            stream_client,
            secret,
            durable,
            stages,
            replicas,
        })
    }
}

/// Where a joining node shows the cluster secret (its `Authorization`
/// carries the user's credentials).
pub const CLUSTER_SECRET_HEADER: &str = "x-scaleout-cluster-secret";

/// The longest one payload of entries may take to be answered.
pub const PAYLOAD_TIMEOUT: Duration = Duration::from_secs(30);

type AppendResult = RpcResult<AppendEntriesResponse<u64>, openraft::error::Infallible>;

/// What identifies a payload across openraft's retries: the leader's
/// vote, where it starts and where it ends.
type PayloadKey = (
    openraft::Vote<u64>,
    Option<openraft::LogId<u64>>,
    Option<openraft::LogId<u64>>,
);

/// An AppendEntries under way: it owns the peer's stream while it runs and
/// gives it back with the answer.
type Flight = Pin<Box<dyn Future<Output = (Option<stream::ClientConn>, AppendResult)> + Send>>;

pub struct Peer {
    client: reqwest::Client,
    stream_client: reqwest::Client,
    secret: Option<ClusterSecret>,
    target: u64,
    base: String,
    durable: Durable,
    stages: Arc<Stages>,
    /// The open stream to the peer ([`stream`]), when idle. (openraft
    /// wants a `Sync` peer; only `&mut self` ever touches these.)
    conn: SyncWrapper<Option<stream::ClientConn>>,
    /// The peer offers no stream (an older node): plain HTTP.
    plain: Arc<AtomicBool>,
    /// The AppendEntries in flight, answered or not.
    in_flight: SyncWrapper<Option<(PayloadKey, Flight)>>,
    replicas: Replicas,
    /// The peer's last answer to entries (see [`Replicas`] and
    /// [`VOTER_ECHO`]).
    answered: Option<Answered>,
    /// Raised by every AppendEntries that goes to the peer: a commit
    /// index answered here is sent later only if nothing went meanwhile.
    sent: Arc<AtomicU64>,
    /// When entries last went to the peer (a read replica's are spaced
    /// by [`REPLICA_EVERY`]).
    entries_sent: Option<Instant>,
    /// [`REPLICA_EVERY`], [`VOTER_ECHO`] and [`COMMIT_LATER`] (other
    /// values in tests).
    replica_every: Duration,
    voter_echo: Duration,
    commit_later: Duration,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &Member) -> Peer {
        Peer {
            client: self.client.clone(),
            secret: self.secret.clone(),
            target,
            base: format!("{}://{}/raft", crate::peers::scheme(), node.raft),
            durable: self.durable.clone(),
            stages: self.stages.clone(),
            stream_client: self.stream_client.clone(),
            conn: SyncWrapper::new(None),
            plain: Arc::new(AtomicBool::new(false)),
            in_flight: SyncWrapper::new(None),
            replicas: self.replicas.clone(),
            answered: None,
            sent: Arc::default(),
            entries_sent: None,
            replica_every: REPLICA_EVERY,
            voter_echo: VOTER_ECHO,
            commit_later: COMMIT_LATER,
        }
    }
}

type RpcResult<T, E> = Result<T, RPCError<u64, Member, RaftError<u64, E>>>;

fn network_error(e: impl std::fmt::Display) -> RPCError<u64, Member, RaftError<u64>> {
    RPCError::Network(NetworkError::new(&std::io::Error::other(e.to_string())))
}

impl Peer {
    /// An AppendEntries on the peer's stream (opened first if need be),
    /// or over plain HTTP to a peer without streams.
    fn flight(&mut self, rpc: AppendEntriesRequest<TypeConfig>, within: Duration) -> Flight {
        let conn = self.conn.get_mut().take();
        let (client, stream_client) = (self.client.clone(), self.stream_client.clone());
        let (secret, base, target) = (self.secret.clone(), self.base.clone(), self.target);
        let (plain, stages) = (self.plain.clone(), self.stages.clone());
        Box::pin(async move {
            let _timed =
                (!rpc.entries.is_empty()).then(|| Timed(&stages.replicate, Instant::now()));
            let over_http = || {
                send(
                    &client,
                    secret.as_ref(),
                    &base,
                    target,
                    "append",
                    &rpc,
                    within,
                )
            };
            if plain.load(Ordering::Relaxed) {
                return (None, over_http().await);
            }
            let mut conn = match conn {
                Some(conn) => conn,
                None => match stream::connect(&stream_client, secret.as_ref(), &base, within).await
                {
                    Ok(conn) => conn,
                    Err(stream::ConnectError::Unsupported(status)) => {
                        tracing::info!(target, %status, "the peer offers no Raft stream; using plain HTTP");
                        plain.store(true, Ordering::Relaxed);
                        return (None, over_http().await);
                    }
                    Err(stream::ConnectError::Unreachable(e)) => {
                        return (None, Err(RPCError::Unreachable(Unreachable::new(&e))));
                    }
                    Err(stream::ConnectError::Other(e)) => {
                        // No stream now (this peer's are all taken, say):
                        // this call goes as plain HTTP, the next tries again.
                        tracing::debug!(target, error = %e, "no Raft stream; sending plain HTTP");
                        return (None, over_http().await);
                    }
                },
            };
            match tokio::time::timeout(within, stream::call(&mut conn, &rpc)).await {
                Ok(Ok(answer)) => (
                    Some(conn),
                    answer.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e))),
                ),
                Ok(Err(e)) => (None, Err(network_error(e))),
                Err(_) => (
                    None,
                    Err(network_error("no answer on the Raft stream in time")),
                ),
            }
        })
    }

    /// Sends `rpc`, a heartbeat raising the peer's commit index that was
    /// answered here, after [`COMMIT_LATER`] unless another AppendEntries
    /// goes to the peer first (it carries the commit index too). Its
    /// answer changes nothing here: a refusal shows in openraft's next
    /// message to the peer.
    fn send_commit_later(&self, rpc: AppendEntriesRequest<TypeConfig>) {
        let ticket = self.sent.fetch_add(1, Ordering::Relaxed) + 1;
        let sent = self.sent.clone();
        let (client, secret, base) = (self.client.clone(), self.secret.clone(), self.base.clone());
        let (target, mut durable, later) = (self.target, self.durable.clone(), self.commit_later);
        tokio::spawn(async move {
            tokio::time::sleep(later).await;
            if sent.load(Ordering::Relaxed) != ticket {
                return;
            }
            if let Some(commit) = rpc.leader_commit {
                let reached =
                    tokio::time::timeout(COMMIT_LATER_TIMEOUT, durable.reach(commit.index));
                if !matches!(reached.await, Ok(Ok(()))) {
                    return;
                }
            }
            let answer: AppendResult = send(
                &client,
                secret.as_ref(),
                &base,
                target,
                "append",
                &rpc,
                COMMIT_LATER_TIMEOUT,
            )
            .await;
            if let Err(e) = answer {
                tracing::debug!(target, error = %e, "a commit index sent later was not taken");
            }
        });
    }

    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        send(
            &self.client,
            self.secret.as_ref(),
            &self.base,
            self.target,
            path,
            req,
            option.hard_ttl(),
        )
        .await
    }
}

async fn send<Req, Resp, E>(
    client: &reqwest::Client,
    secret: Option<&ClusterSecret>,
    base: &str,
    target: u64,
    path: &str,
    req: &Req,
    timeout: Duration,
) -> RpcResult<Resp, E>
where
    Req: Serialize,
    Resp: DeserializeOwned,
    E: std::error::Error + DeserializeOwned,
{
    {
        let mut request = client.post(format!("{base}/{path}")).timeout(timeout);
        if let Some(secret) = secret {
            request = request.header(reqwest::header::AUTHORIZATION, secret.header());
        }
        let sent = request.json(req).send().await.map_err(|e| {
            if e.is_connect() {
                RPCError::Unreachable(Unreachable::new(&e))
            } else {
                RPCError::Network(NetworkError::new(&e))
            }
        })?;
        let answer: Result<Resp, RaftError<u64, E>> = sent
            .json()
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>, openraft::error::Infallible> {
        let replica = self.replicas.is_learner(self.target);
        let echo = if replica {
            REPLICA_ECHO
        } else {
            self.voter_echo
        };
        if let Some(has) = self.answered.as_ref().filter(|h| h.covers(&rpc, echo)) {
            if rpc.leader_commit <= has.commit {
                return Ok(AppendEntriesResponse::Success);
            }
            if !replica {
                self.send_commit_later(rpc);
                return Ok(AppendEntriesResponse::Success);
            }
        }
        if replica && !rpc.entries.is_empty() {
            let started = Instant::now();
            let within = REPLICA_HOLD.min(option.hard_ttl() / 2);
            if let Some(gap) = self
                .entries_sent
                .and_then(|at| self.replica_every.checked_sub(at.elapsed()))
            {
                tokio::time::sleep(gap.min(within)).await;
            }
            let left = within.saturating_sub(started.elapsed());
            self.replicas.commit_first(&mut rpc, left).await;
        }
        if !rpc.entries.is_empty() {
            self.entries_sent = Some(Instant::now());
        }
        self.sent.fetch_add(1, Ordering::Relaxed);
        // The followers apply what they are told is committed: only what
        // is durable here too (this node counted itself in the quorum
        // before its fsync). It is at most one fsync away.
        if let Some(commit) = rpc.leader_commit {
            if commit.index > self.durable.get() {
                let reached =
                    tokio::time::timeout(option.hard_ttl(), self.durable.reach(commit.index));
                if !matches!(reached.await, Ok(Ok(()))) {
                    return Err(RPCError::Network(NetworkError::new(
                        &std::io::Error::other(
                            "this node's log is not yet durable up to its commit index",
                        ),
                    )));
                }
            }
        }
        let payload = !rpc.entries.is_empty();
        let pending = self
            .in_flight
            .get_mut()
            .as_ref()
            .is_some_and(|(k, _)| k.2.is_some());
        if !payload && pending {
            // A payload is still on the stream; the heartbeat goes beside it.
            return self.call("append", &rpc, &option).await;
        }
        let key: PayloadKey = (
            rpc.vote,
            rpc.prev_log_id,
            rpc.entries.last().map(|e| e.log_id),
        );
        let commit = rpc.leader_commit;
        // Only a payload is picked up again after openraft stopped waiting
        // (a heartbeat's answer must be to the heartbeat just sent).
        let same = payload
            && self
                .in_flight
                .get_mut()
                .as_ref()
                .is_some_and(|(k, _)| *k == key);
        if !same {
            let within = if payload {
                PAYLOAD_TIMEOUT
            } else {
                option.hard_ttl()
            };
            // Replacing a flight drops it, and the stream it held.
            let flight = self.flight(rpc, within);
            *self.in_flight.get_mut() = Some((key, flight));
        }
        let Some((_, flight)) = self.in_flight.get_mut().as_mut() else {
            return Err(network_error("no AppendEntries in flight"));
        };
        // openraft may stop waiting here (its deadline); the flight stays
        // and the next call with the same payload picks its answer up.
        let (conn, answer) = flight.await;
        *self.in_flight.get_mut() = None;
        *self.conn.get_mut() = conn;
        let answered = matches!(answer, Ok(AppendEntriesResponse::Success));
        self.answered = match (answered, payload) {
            (true, true) => Some(Answered {
                vote: key.0,
                last: key.2,
                commit,
                at: Instant::now(),
            }),
            (true, false) => self.answered.take(),
            (false, _) => None,
        };
        answer
    }
    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        self.call("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>, openraft::error::Infallible> {
        self.call("vote", &rpc, &option).await
    }
}

/// When this node last heard from a leader that it accepted (for
/// `freshness` on reads with `level=none`), and the highest commit index
/// a leader has told it of (every AppendEntries carries the leader's).
#[derive(Debug)]
pub struct Contact {
    started: Instant,
    /// Milliseconds since `started`, plus one (0: never).
    last: AtomicU64,
    leader_commit: AtomicU64,
}

impl Default for Contact {
    fn default() -> Self {
        Contact {
            started: Instant::now(),
            last: AtomicU64::new(0),
            leader_commit: AtomicU64::new(0),
        }
    }
}

impl Contact {
    pub fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64 + 1;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// The highest commit index a leader has sent here.
    pub fn leader_commit(&self) -> u64 {
        self.leader_commit.load(Ordering::Relaxed)
    }

    /// How long ago, if ever.
    pub fn age(&self) -> Option<Duration> {
        match self.last.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms - 1)),
            ),
        }
    }
}

#[derive(Clone)]
pub struct Rpc {
    raft: Raft,
    contact: Arc<Contact>,
    /// Bounds the open [`stream`]s.
    pub streams: Arc<tokio::sync::Semaphore>,
}

impl Rpc {
    /// Appends what a leader sent, noting the contact when it is accepted.
    pub async fn append(&self, req: AppendEntriesRequest<TypeConfig>) -> stream::Answer {
        let commit = req.leader_commit.map_or(0, |c| c.index);
        let answer = self.raft.append_entries(req).await;
        if matches!(
            answer,
            Ok(AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_))
        ) {
            self.contact.touch();
            self.contact
                .leader_commit
                .fetch_max(commit, Ordering::Relaxed);
        }
        answer
    }
}

/// The RPC endpoints, for the `--raft` listener. With a cluster secret,
/// an RPC without it is refused (`401`) and logged: no one without the
/// secret can vote, append entries or install a snapshot here.
pub fn router(raft: Raft, contact: Arc<Contact>, secret: Option<ClusterSecret>) -> Router {
    let rpcs = Router::new()
        .route("/raft/log", axum::routing::get(log_end))
        .route("/raft/append", post(append))
        .route("/raft/stream", axum::routing::get(stream::accept))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/raft/elect", post(elect))
        .layer(axum::extract::DefaultBodyLimit::max(256 * 1024 * 1024))
        .with_state(Rpc {
            raft,
            contact,
            streams: Arc::new(tokio::sync::Semaphore::new(stream::MAX_STREAMS)),
        });
    let Some(secret) = secret else {
        return rpcs;
    };
    rpcs.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let secret = secret.clone();
            async move {
                let given = req
                    .headers()
                    .get(axum::http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok());
                if secret.admits(given) {
                    return next.run(req).await;
                }
                tracing::warn!(
                    path = req.uri().path(),
                    "a Raft RPC without the cluster secret was refused"
                );
                (
                    axum::http::StatusCode::UNAUTHORIZED,
                    "this node's Raft RPCs need the cluster secret\n",
                )
                    .into_response()
            }
        },
    ))
}

/// The highest term a request may carry. openraft adds one to a term
/// when it stands, so a term near `u64::MAX` (which no cluster reaches)
/// from a forged request would overflow in every voter that took it, and
/// stay in their saved votes.
pub const MAX_TERM: u64 = 1 << 62;

/// Refuses a request carrying a term no real cluster has.
pub fn check_term(vote: &openraft::Vote<u64>) -> Result<(), String> {
    let term = vote.leader_id().term;
    if term > MAX_TERM {
        return Err(format!(
            "term {term} is beyond any real cluster's (at most {MAX_TERM})"
        ));
    }
    Ok(())
}

fn refused(error: String) -> axum::response::Response {
    tracing::warn!(%error, "a Raft RPC was refused");
    (
        axum::http::StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": error })),
    )
        .into_response()
}

async fn append(
    State(rpc): State<Rpc>,
    Json(req): Json<AppendEntriesRequest<TypeConfig>>,
) -> axum::response::Response {
    if let Err(e) = check_term(&req.vote) {
        return refused(e);
    }
    Json(rpc.append(req).await).into_response()
}

/// Where a node's log ends (asked of the leader by a node deciding whether
/// a read's `min_index` is one the cluster has reached).
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct LogEnd {
    pub last_log_index: u64,
}

async fn log_end(State(rpc): State<Rpc>) -> Json<LogEnd> {
    let last_log_index = rpc.raft.metrics().borrow().last_log_index.unwrap_or(0);
    Json(LogEnd { last_log_index })
}

async fn vote(
    State(rpc): State<Rpc>,
    Json(req): Json<VoteRequest<u64>>,
) -> axum::response::Response {
    if let Err(e) = check_term(&req.vote) {
        return refused(e);
    }
    Json(rpc.raft.vote(req).await).into_response()
}

/// A leader's request that this node stand for election, in its term.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ElectRequest {
    pub term: u64,
}

/// The leader handing leadership over asks this node to stand now (it
/// has stopped its heartbeats and waited out their lease first). A
/// request from another term (one that waited while this node was
/// paused) is refused: the transfer it belonged to is over.
async fn elect(State(rpc): State<Rpc>, Json(req): Json<ElectRequest>) -> Json<Result<(), String>> {
    let term = rpc.raft.metrics().borrow().current_term;
    if term != req.term {
        return Json(Err(format!(
            "asked to stand in term {}, but this node is in term {term}",
            req.term
        )));
    }
    tracing::info!(term, "asked by the leader to stand for election");
    Json(rpc.raft.trigger().elect().await.map_err(|e| e.to_string()))
}

/// Asks the node at `member` to stand for election now (`/raft/elect`),
/// if it is still in `term`; `within` bounds the wait for its answer.
pub async fn ask_to_stand(
    client: &reqwest::Client,
    secret: Option<&ClusterSecret>,
    member: &Member,
    term: u64,
    within: Duration,
) -> Result<(), String> {
    let url = format!("{}://{}/raft/elect", crate::peers::scheme(), member.raft);
    let mut request = client
        .post(url)
        .json(&ElectRequest { term })
        .timeout(within);
    if let Some(secret) = secret {
        request = request.header(reqwest::header::AUTHORIZATION, secret.header());
    }
    let answer = request.send().await.map_err(|e| e.to_string())?;
    if !answer.status().is_success() {
        return Err(format!("it answered {}", answer.status()));
    }
    answer
        .json::<Result<(), String>>()
        .await
        .map_err(|e| e.to_string())?
}

async fn snapshot(
    State(rpc): State<Rpc>,
    Json(req): Json<InstallSnapshotRequest<TypeConfig>>,
) -> axum::response::Response {
    if let Err(e) = check_term(&req.vote) {
        return refused(e);
    }
    let answer = rpc.raft.install_snapshot(req).await;
    if answer.is_ok() {
        rpc.contact.touch();
    }
    Json(answer).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn request(commit: u64, entries: u64) -> AppendEntriesRequest<TypeConfig> {
        let id = |i| openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), i);
        AppendEntriesRequest {
            vote: openraft::Vote::new_committed(1, 1),
            prev_log_id: Some(id(1)),
            entries: (2..2 + entries)
                .map(|i| super::super::Entry {
                    log_id: id(i),
                    payload: openraft::EntryPayload::Blank,
                })
                .collect(),
            leader_commit: Some(id(commit)),
        }
    }

    #[track_caller]
    fn assert_success(answer: &AppendResult) {
        assert!(
            matches!(answer, Ok(AppendEntriesResponse::Success)),
            "{answer:?}"
        );
    }

    /// Answers `/raft/append` with success, counting the calls.
    fn appends(count: Arc<AtomicUsize>) -> Router {
        Router::new().route(
            "/raft/append",
            post(move || {
                let seen = count.clone();
                async move {
                    seen.fetch_add(1, Ordering::Relaxed);
                    Json(Ok::<_, RaftError<u64>>(
                        AppendEntriesResponse::<u64>::Success,
                    ))
                }
            }),
        )
    }

    async fn serve(app: Router) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// A stand-in for a node of an older version: plain `/raft/append`,
    /// no streams. Counts the appends it was sent.
    async fn older_peer() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let count = Arc::new(AtomicUsize::new(0));
        (serve(appends(count.clone())).await, count)
    }

    async fn peer(
        addr: std::net::SocketAddr,
        durable: u64,
    ) -> (Peer, tokio::sync::watch::Sender<u64>) {
        let (on_disk, rx) = tokio::sync::watch::channel(durable);
        let mut network = Network::new(
            None,
            Durable::from(rx),
            Default::default(),
            Replicas::new(watch::channel(None).1),
        )
        .unwrap();
        let member = Member {
            api: addr.to_string(),
            raft: addr.to_string(),
            name: None,
        };
        (network.new_client(2, &member).await, on_disk)
    }

    /// A peer that offers no stream is sent plain HTTP, and stays so.
    #[tokio::test]
    async fn a_peer_without_streams_gets_plain_http() {
        let (addr, count) = older_peer().await;
        let (mut peer, _on_disk) = peer(addr, 10).await;
        let option = RPCOption::new(Duration::from_secs(10));
        for n in [0, 3, 0, 2] {
            let answer = peer.append_entries(request(1, n), option.clone()).await;
            assert_success(&answer);
        }
        assert_eq!(count.load(Ordering::Relaxed), 4);
        assert!(peer.plain.load(Ordering::Relaxed));
    }

    /// A peer whose streams are all taken (`503`) is sent this call as
    /// plain HTTP, and a stream is tried again on the next: a client
    /// holding a node's streams cannot stop replication to it.
    #[tokio::test]
    async fn a_peer_without_a_free_stream_gets_plain_http() {
        let (count, tries) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let asked = tries.clone();
        let app = appends(count.clone()).route(
            "/raft/stream",
            axum::routing::get(move || {
                asked.fetch_add(1, Ordering::Relaxed);
                async { axum::http::StatusCode::SERVICE_UNAVAILABLE }
            }),
        );
        let addr = serve(app).await;
        let (mut peer, _on_disk) = peer(addr, 10).await;
        let option = RPCOption::new(Duration::from_secs(10));
        for n in [2, 0, 1] {
            let answer = peer.append_entries(request(1, n), option.clone()).await;
            assert_success(&answer);
        }
        assert_eq!(count.load(Ordering::Relaxed), 3);
        assert_eq!(
            tries.load(Ordering::Relaxed),
            3,
            "a stream was not asked for again"
        );
        assert!(!peer.plain.load(Ordering::Relaxed));
    }

    /// A peer that takes every AppendEntries and keeps each one it was
    /// sent.
    async fn recording_peer() -> (
        std::net::SocketAddr,
        Arc<std::sync::Mutex<Vec<AppendEntriesRequest<TypeConfig>>>>,
    ) {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let saw = seen.clone();
        let addr = serve(Router::new().route(
            "/raft/append",
            post(move |Json(rpc): Json<AppendEntriesRequest<TypeConfig>>| {
                saw.lock().unwrap().push(rpc);
                async {
                    Json(Ok::<_, RaftError<u64>>(
                        AppendEntriesResponse::<u64>::Success,
                    ))
                }
            }),
        ))
        .await;
        (addr, seen)
    }

    /// `count` entries of term 1 after entry `prev`, from the leader of
    /// `term` (node 1), with commit index `commit`.
    fn entries_rpc(
        term: u64,
        prev: u64,
        count: u64,
        commit: u64,
    ) -> AppendEntriesRequest<TypeConfig> {
        let id = |i| openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), i);
        AppendEntriesRequest {
            vote: openraft::Vote::new_committed(term, 1),
            prev_log_id: Some(id(prev)),
            entries: (prev + 1..=prev + count)
                .map(|i| super::super::Entry {
                    log_id: id(i),
                    payload: openraft::EntryPayload::Blank,
                })
                .collect(),
            leader_commit: Some(id(commit)),
        }
    }

    /// The network of leader 1 whose node 2, at `addr`, is a read
    /// replica; what it applied (a sender), and what must be kept alive.
    fn leader_with_replica(
        addr: std::net::SocketAddr,
    ) -> (Network, Member, watch::Sender<Option<LogId>>, impl Sized) {
        let (applied, applied_rx) = watch::channel(None);
        let replicas = Replicas::new(applied_rx);
        let mut metrics = openraft::RaftMetrics::new_initial(1);
        let member = Member {
            api: addr.to_string(),
            raft: addr.to_string(),
            name: None,
        };
        let nodes = [(1, member.clone()), (2, member.clone())];
        metrics.membership_config = Arc::new(openraft::StoredMembership::new(
            None,
            openraft::Membership::new(
                vec![[1].into()],
                nodes
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            ),
        ));
        let (metrics, metrics_rx) = watch::channel(metrics);
        replicas.watch_metrics(metrics_rx);
        let (on_disk, durable) = watch::channel(100);
        let network =
            Network::new(None, Durable::from(durable), Default::default(), replicas).unwrap();
        (network, member, applied, (metrics, on_disk))
    }

    /// A read replica's payloads of entries leave at least
    /// [`REPLICA_EVERY`] apart (40 ms here), so the writes made
    /// meanwhile go together.
    #[tokio::test]
    async fn a_read_replicas_entries_go_together() {
        let count = Arc::new(AtomicUsize::new(0));
        let addr = serve(appends(count.clone())).await;
        let (mut network, member, applied, _keep) = leader_with_replica(addr);
        applied.send_replace(Some(openraft::LogId::new(
            openraft::CommittedLeaderId::new(1, 1),
            100,
        )));
        let mut replica = network.new_client(2, &member).await;
        replica.replica_every = Duration::from_millis(40);
        let option = RPCOption::new(Duration::from_secs(10));
        let started = Instant::now();
        assert_success(&replica.append_entries(request(1, 3), option.clone()).await);
        assert_success(&replica.append_entries(request(1, 3), option.clone()).await);
        assert_eq!(count.load(Ordering::Relaxed), 2);
        assert!(
            started.elapsed() >= Duration::from_millis(40),
            "the second payload did not wait for the first's interval"
        );
        // A voter's go at once, whatever the interval.
        let mut voter = network.new_client(1, &member).await;
        voter.replica_every = Duration::from_secs(60);
        assert_success(&voter.append_entries(request(1, 3), option.clone()).await);
        assert_success(&voter.append_entries(request(1, 3), option).await);
        assert_eq!(count.load(Ordering::Relaxed), 4);
    }

    /// A read replica is sent each entry once, already committed: its
    /// entries wait for this node's apply of them and carry their commit
    /// index; the heartbeat openraft sends right after, asking nothing
    /// new, is answered without a message, and a later one goes. An entry
    /// applied under another leader commits nothing of this payload. A
    /// voter's entries go at once, as openraft gives them.
    #[tokio::test]
    async fn a_read_replica_is_sent_each_entry_once_committed() {
        let (addr, seen) = recording_peer().await;
        let sent = || {
            seen.lock()
                .unwrap()
                .iter()
                .map(|rpc| (rpc.entries.len(), rpc.leader_commit.map(|c| c.index)))
                .collect::<Vec<_>>()
        };
        let id = |term, i| openraft::LogId::new(openraft::CommittedLeaderId::new(term, 1), i);
        let payload = entries_rpc;
        let (mut network, member, applied, _keep) = leader_with_replica(addr);
        let mut replica = network.new_client(2, &member).await;
        let option = RPCOption::new(Duration::from_secs(10));

        let mut entries = Box::pin(replica.append_entries(request(1, 3), option.clone()));
        let early = tokio::time::timeout(Duration::from_millis(20), &mut entries).await;
        assert!(early.is_err(), "the replica's entries left uncommitted");
        assert!(sent().is_empty());
        applied.send_replace(Some(id(1, 4)));
        let answer = entries.await;
        assert_success(&answer);
        assert_eq!(sent(), [(3, Some(4))], "sent without its commit index");

        let heartbeat = payload(1, 4, 0, 4);
        let answer = replica
            .append_entries(heartbeat.clone(), option.clone())
            .await;
        assert_success(&answer);
        assert_eq!(sent().len(), 1, "a heartbeat asking nothing new was sent");
        tokio::time::sleep(REPLICA_ECHO * 2).await;
        let answer = replica.append_entries(heartbeat, option.clone()).await;
        assert_success(&answer);
        assert_eq!(sent().len(), 2, "a later heartbeat was not sent");

        // Applied under a later leader: nothing here is known committed.
        applied.send_replace(Some(id(2, 50)));
        let answer = replica
            .append_entries(payload(1, 4, 2, 4), option.clone())
            .await;
        assert_success(&answer);
        assert_eq!(
            sent()[2],
            (2, Some(4)),
            "another leader's entry committed this one"
        );

        // Entries of an earlier term, sent by the next leader once it has
        // applied an entry of its own past them (a replica catching up
        // after an election): committed.
        applied.send_replace(Some(id(3, 9)));
        let answer = replica
            .append_entries(payload(3, 6, 2, 6), option.clone())
            .await;
        assert_success(&answer);
        assert_eq!(
            sent()[3],
            (2, Some(8)),
            "an earlier term's entries were not sent as committed"
        );

        // Entries a held payload would be sent as committed.
        applied.send_replace(Some(id(1, 3)));
        let mut voter = network.new_client(1, &member).await;
        let answer = voter.append_entries(request(1, 2), option).await;
        assert_success(&answer);
        assert_eq!(sent()[4], (2, Some(1)), "a voter's entries were held");
    }

    /// A heartbeat that only raises a voter's commit index, right after
    /// the voter answered entries, is answered here; the commit index
    /// goes with the next message, or on its own a little later. A new
    /// client (openraft makes one to confirm its leadership) and a
    /// heartbeat past the window, of another vote or after other entries
    /// go at once.
    #[tokio::test]
    async fn a_voters_commit_index_goes_with_its_next_message() {
        let (addr, seen) = recording_peer().await;
        let sent = || {
            seen.lock()
                .unwrap()
                .iter()
                .map(|rpc| {
                    (
                        rpc.vote.leader_id().term,
                        rpc.entries.len(),
                        rpc.leader_commit.map(|c| c.index),
                    )
                })
                .collect::<Vec<_>>()
        };
        let rpc = entries_rpc;
        let (mut voter, _on_disk) = peer(addr, 100).await;
        voter.voter_echo = Duration::from_secs(60);
        voter.commit_later = Duration::from_millis(200);
        let option = RPCOption::new(Duration::from_secs(10));

        assert_success(&voter.append_entries(rpc(1, 1, 0, 1), option.clone()).await);
        assert_eq!(
            sent(),
            [(1, 0, Some(1))],
            "a new client's heartbeat was not sent"
        );
        assert_success(&voter.append_entries(rpc(1, 1, 2, 1), option.clone()).await);
        assert_success(&voter.append_entries(rpc(1, 3, 0, 3), option.clone()).await);
        assert_eq!(
            sent().len(),
            2,
            "a heartbeat raising the commit index was sent at once"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(sent()[2], (1, 0, Some(3)), "the commit index never went");

        // Followed by entries: they carry the commit index, nothing else goes.
        assert_success(&voter.append_entries(rpc(1, 3, 1, 3), option.clone()).await);
        assert_success(&voter.append_entries(rpc(1, 4, 0, 4), option.clone()).await);
        assert_success(&voter.append_entries(rpc(1, 4, 1, 4), option.clone()).await);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(sent()[3..], [(1, 1, Some(3)), (1, 1, Some(4))]);

        // Another vote's heartbeat, or one for entries not just answered.
        assert_success(&voter.append_entries(rpc(2, 5, 0, 5), option.clone()).await);
        assert_success(&voter.append_entries(rpc(1, 4, 0, 5), option.clone()).await);
        assert_eq!(sent()[5..], [(2, 0, Some(5)), (1, 0, Some(5))]);

        // Past the window.
        assert_success(&voter.append_entries(rpc(1, 5, 1, 5), option.clone()).await);
        voter.voter_echo = Duration::ZERO;
        assert_success(&voter.append_entries(rpc(1, 6, 0, 6), option).await);
        assert_eq!(
            sent()[7..],
            [(1, 1, Some(5)), (1, 0, Some(6))],
            "a heartbeat past the window was not sent"
        );
    }

    /// A commit index goes out only once this node's log is durable up
    /// to it: until then the call fails (openraft retries it) and nothing
    /// is sent.
    #[tokio::test]
    async fn no_commit_index_leaves_before_it_is_durable_here() {
        let (addr, count) = older_peer().await;
        let (mut peer, on_disk) = peer(addr, 4).await;
        let option = RPCOption::new(Duration::from_millis(300));
        let answer = peer.append_entries(request(5, 0), option.clone()).await;
        assert!(matches!(answer, Err(RPCError::Network(_))), "{answer:?}");
        assert_eq!(
            count.load(Ordering::Relaxed),
            0,
            "a commit index left before its fsync"
        );
        on_disk.send_replace(5);
        let answer = peer.append_entries(request(5, 0), option).await;
        assert_success(&answer);
        assert_eq!(count.load(Ordering::Relaxed), 1);
    }
}
