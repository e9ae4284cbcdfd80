//! Node-to-node Raft RPCs over HTTP with JSON bodies: `POST /raft/append`,
//! `/raft/vote`, `/raft/snapshot` on each node's `--raft` listener.
//!
//! A peer that cannot be connected to is reported `Unreachable`, so
//! openraft backs off instead of spinning; any other failure is a network
//! error and retried at the next heartbeat. Each call carries openraft's
//! own deadline for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

use super::{Member, Raft, TypeConfig};

/// Connections to the other nodes (one pool shared by all peers).
#[derive(Clone)]
pub struct Network {
    client: reqwest::Client,
}

impl Network {
    pub fn new() -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .unwrap_or_default();
        Network { client }
    }
}

impl Default for Network {
    fn default() -> Self {
        Self::new()
    }
}

pub struct Peer {
    client: reqwest::Client,
    target: u64,
    base: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &Member) -> Peer {
        Peer {
            client: self.client.clone(),
            target,
            base: format!("http://{}/raft", node.raft),
        }
    }
}

type RpcResult<T, E> = Result<T, RPCError<u64, Member, RaftError<u64, E>>>;

impl Peer {
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
        let sent = self
            .client
            .post(format!("{}/{path}", self.base))
            .timeout(option.hard_ttl())
            .json(req)
            .send()
            .await
            .map_err(|e| {
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
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>, openraft::error::Infallible> {
        self.call("append", &rpc, &option).await
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
/// `freshness` on reads with `level=none`).
#[derive(Debug)]
pub struct Contact {
    started: Instant,
    /// Milliseconds since `started`, plus one (0: never).
    last: AtomicU64,
}

impl Default for Contact {
    fn default() -> Self {
        Contact {
            started: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
}

impl Contact {
    pub fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64 + 1;
        self.last.store(ms, Ordering::Relaxed);
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
struct Rpc {
    raft: Raft,
    contact: Arc<Contact>,
}

/// The RPC endpoints, for the `--raft` listener.
pub fn router(raft: Raft, contact: Arc<Contact>) -> Router {
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .layer(axum::extract::DefaultBodyLimit::max(256 * 1024 * 1024))
        .with_state(Rpc { raft, contact })
}

async fn append(
    State(rpc): State<Rpc>,
    Json(req): Json<AppendEntriesRequest<TypeConfig>>,
) -> Json<Result<AppendEntriesResponse<u64>, RaftError<u64>>> {
    let answer = rpc.raft.append_entries(req).await;
    if matches!(
        answer,
        Ok(AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_))
    ) {
        rpc.contact.touch();
    }
    Json(answer)
}

async fn vote(
    State(rpc): State<Rpc>,
    Json(req): Json<VoteRequest<u64>>,
) -> Json<Result<VoteResponse<u64>, RaftError<u64>>> {
    Json(rpc.raft.vote(req).await)
}

async fn snapshot(
    State(rpc): State<Rpc>,
    Json(req): Json<InstallSnapshotRequest<TypeConfig>>,
) -> Json<Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>> {
    let answer = rpc.raft.install_snapshot(req).await;
    if answer.is_ok() {
        rpc.contact.touch();
    }
    Json(answer)
}
