//! `scaleout-client`: how a web server talks to the replicated database.
//!
//! Given one or more seed URLs, the client learns the cluster from any
//! node's `/nodes` (the leader, the voters, the read replicas) and keeps
//! that picture fresh: in the background every second, and at once when a
//! node fails it. Writes go to the leader, reads to the read replicas in
//! turn (`level=none`, with `min_index` when the caller must see its own
//! writes), falling back to the voters when no replica can serve.
//!
//! Retries never duplicate a write: a write is sent again only when it
//! certainly did not happen — the connection was refused, or the node
//! answered that it does not lead (sent with `redirect`, a follower answers
//! `301` instead of forwarding). A write whose outcome is unknown (the
//! connection broke after sending, a timeout) is reported as such.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use scaleout_wire::data::{ErrorBody, ErrorCode, Nodes, Results, StatementResult};
use serde_json::Value;

tokio::task_local! {
    static REQUEST_ID: String;
}

/// Runs `work` with `id` as its request id: every request the client
/// sends while `work` runs carries it as `X-Request-Id`, so the database
/// nodes' log lines name the same request as the web server's and the
/// load balancer's.
pub async fn with_request_id<F: std::future::Future>(id: String, work: F) -> F::Output {
    REQUEST_ID.scope(id, work).await
}

/// The request id of the work in progress, if it has one.
fn request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// How long a failover may take before a request gives up.
const FAILOVER_PATIENCE: Duration = Duration::from_secs(8);
/// How long a node that failed a read is skipped.
const SKIP_FAILED: Duration = Duration::from_secs(2);
/// How long one node may take to answer a read before the next is asked
/// (reads are safe to send again). A replica cut off from the leader
/// cannot reach a `min_index` and would otherwise hold the read for the
/// node's whole `--read-timeout`.
const READ_PATIENCE: Duration = Duration::from_secs(1);
/// A replica further behind the leader than this many log entries (each
/// holds a group of writes) serves no reads until it catches up.
pub const MAX_LAG: u64 = 256;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// No node could serve, or none answered in time; nothing was written.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A write was sent and its outcome is unknown (the connection broke
    /// or timed out after sending): it may or may not have been applied.
    #[error("database {node}: outcome of the write unknown: {reason}")]
    Unknown { node: String, reason: String },
    /// The node answered with an error for the request itself.
    #[error("database {node}: {reason}")]
    Refused { node: String, reason: String },
    /// A read's `min_index` is beyond the cluster's log: the index did not
    /// come from this cluster (a session cookie from before a rebuild, or
    /// forged). Nothing waits for it.
    #[error("database {node}: {reason}")]
    AheadOfLog { node: String, reason: String },
}

/// One database node as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    /// `http://host:port`
    pub api: String,
    pub voter: bool,
    pub leader: bool,
    /// Entries behind the leader, when the leader said.
    pub lag: Option<u64>,
}

impl NodeInfo {
    /// The name shown in pages and headers, e.g. `db-2`.
    pub fn name(&self) -> String {
        format!("db-{}", self.id)
    }
}

#[derive(Debug, Default, Clone)]
struct Topology {
    nodes: Vec<NodeInfo>,
    /// When each node last failed a read (skipped for a while).
    failed: Vec<(String, Instant)>,
}

impl Topology {
    fn leader(&self) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.leader)
    }

    fn healthy(&self, n: &NodeInfo) -> bool {
        n.lag.is_none_or(|lag| lag <= MAX_LAG)
            && !self
                .failed
                .iter()
                .any(|(id, at)| *id == n.id && at.elapsed() < SKIP_FAILED)
    }

    /// Where reads go, in order of preference: healthy replicas, then
    /// healthy voters, then anything.
    fn readers(&self) -> Vec<NodeInfo> {
        let replicas: Vec<_> = self
            .nodes
            .iter()
            .filter(|n| !n.voter && self.healthy(n))
            .cloned()
            .collect();
        if !replicas.is_empty() {
            return replicas;
        }
        let voters: Vec<_> = self
            .nodes
            .iter()
            .filter(|n| self.healthy(n))
            .cloned()
            .collect();
        if !voters.is_empty() {
            return voters;
        }
        self.nodes.clone()
    }
}

/// What a write returned.
#[derive(Debug, Clone)]
pub struct Executed {
    pub results: Vec<StatementResult>,
    /// The log index that committed the write (read-your-writes).
    pub raft_index: u64,
    pub node: String,
}

/// What a read returned.
#[derive(Debug, Clone)]
pub struct Queried {
    pub results: Vec<StatementResult>,
    /// The index of the state the read saw: pass it as `min_index` later
    /// to never see older data (monotonic reads across replicas).
    pub raft_index: u64,
    pub node: String,
}

#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// A user of the database's `--auth`: every request the client sends
/// signs in as it (HTTP Basic).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, ..)", self.user)
    }
}

impl Credentials {
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            user: user.into(),
            password: password.into(),
        }
    }

    /// From a file whose first line is `user:password` (kept out of
    /// command lines, which every user of the machine can read).
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let line = text.lines().next().unwrap_or("").trim_end();
        let (user, password) = line
            .split_once(':')
            .filter(|(u, _)| !u.is_empty())
            .ok_or_else(|| format!("{}: write user:password on its first line", path.display()))?;
        Ok(Credentials::new(user, password))
    }

    /// From the environment: `SCALEOUT_DB_CREDENTIALS` (a file, as
    /// [`Credentials::from_file`] reads), or `SCALEOUT_DB_USER` with
    /// `SCALEOUT_DB_PASSWORD`; `None` when none is set.
    pub fn from_env() -> Result<Option<Self>, String> {
        if let Some(path) = std::env::var_os("SCALEOUT_DB_CREDENTIALS") {
            return Credentials::from_file(std::path::Path::new(&path)).map(Some);
        }
        match (
            std::env::var("SCALEOUT_DB_USER"),
            std::env::var("SCALEOUT_DB_PASSWORD"),
        ) {
            (Ok(user), Ok(password)) => Ok(Some(Credentials::new(user, password))),
            (Ok(_), Err(_)) => Err("SCALEOUT_DB_USER is set without SCALEOUT_DB_PASSWORD".into()),
            _ => Ok(None),
        }
    }

    /// The pair, for a request's basic auth.
    pub fn pair(&self) -> (&str, &str) {
        (&self.user, &self.password)
    }
}

struct Inner {
    seeds: Vec<String>,
    credentials: Option<Credentials>,
    http: reqwest::Client,
    topology: RwLock<Topology>,
    next_reader: AtomicUsize,
}

impl Inner {
    /// Adds what every request carries: the credentials, the request id.
    fn sign(&self, mut request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        if let Some(id) = request_id() {
            request = request.header(scaleout_wire::request_id::HEADER, id);
        }
        match &self.credentials {
            Some(c) => request.basic_auth(&c.user, Some(&c.password)),
            None => request,
        }
    }
}

fn lock_read(t: &RwLock<Topology>) -> std::sync::RwLockReadGuard<'_, Topology> {
    t.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn lock_write(t: &RwLock<Topology>) -> std::sync::RwLockWriteGuard<'_, Topology> {
    t.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Client {
    /// A client for the cluster one of `seeds` (API URLs) belongs to. It
    /// starts a background refresh of the cluster's picture (stopped when
    /// the last clone of the client is dropped).
    pub fn new(seeds: Vec<String>) -> Result<Self, ClientError> {
        Self::with_credentials(seeds, None)
    }

    /// [`Client::new`], signing every request in as `credentials`.
    pub fn with_credentials(
        seeds: Vec<String>,
        credentials: Option<Credentials>,
    ) -> Result<Self, ClientError> {
        Self::with_tls(seeds, credentials, None)
    }

    /// [`Client::with_credentials`], reaching `https://` nodes with `tls`:
    /// the CA their certificates must chain to, and this client's own
    /// certificate when the cluster wants one.
    pub fn with_tls(
        seeds: Vec<String>,
        credentials: Option<Credentials>,
        tls: Option<&scaleout_tls::ClientTls>,
    ) -> Result<Self, ClientError> {
        Self::build(seeds, credentials, tls, |b| b)
    }

    /// [`Client::new`], resolving the nodes' names with `resolver` (a
    /// cluster whose nodes advertise names only its own network knows,
    /// such as a Compose project's services, reached from outside it).
    pub fn with_resolver<R: reqwest::dns::Resolve + 'static>(
        seeds: Vec<String>,
        resolver: Arc<R>,
    ) -> Result<Self, ClientError> {
        Self::build(seeds, None, None, move |b| b.dns_resolver(resolver))
    }

    fn build(
        seeds: Vec<String>,
        credentials: Option<Credentials>,
        tls: Option<&scaleout_tls::ClientTls>,
        more: impl FnOnce(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
    ) -> Result<Self, ClientError> {
        if seeds.is_empty() {
            return Err(ClientError::Unavailable("no database URL given".into()));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            let config = tls
                .config()
                .map_err(|e| ClientError::Unavailable(format!("TLS: {e}")))?;
            builder = builder.use_preconfigured_tls(config);
        }
        let http = more(builder)
            .build()
            .map_err(|e| ClientError::Unavailable(e.to_string()))?;
        let seeds = seeds
            .into_iter()
            .map(|s| s.trim_end_matches('/').to_string())
            .collect();
        let inner = Arc::new(Inner {
            seeds,
            credentials,
            http,
            topology: RwLock::new(Topology::default()),
            next_reader: AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some(inner) = weak.upgrade() {
                let _ = refresh(&inner).await;
                drop(inner);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Ok(Client { inner })
    }

    /// The nodes as last seen.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        lock_read(&self.inner.topology).nodes.clone()
    }

    /// Learns the cluster now (waits until some node answers, or `patience`).
    pub async fn discover(&self, patience: Duration) -> Result<(), ClientError> {
        let deadline = Instant::now() + patience;
        loop {
            match refresh(&self.inner).await {
                Ok(()) if lock_read(&self.inner.topology).leader().is_some() => return Ok(()),
                Ok(()) => {}
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Unavailable("the cluster has no leader".into()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn post(
        &self,
        node: &NodeInfo,
        path: &str,
        statements: &Value,
    ) -> reqwest::Result<reqwest::Response> {
        let request = self.inner.http.post(format!("{}{path}", node.api));
        self.inner.sign(request).json(statements).send().await
    }

    /// Runs write statements (rqlite's request form) on the leader.
    pub async fn execute(
        &self,
        statements: &Value,
        transaction: bool,
    ) -> Result<Executed, ClientError> {
        let path = if transaction {
            "/db/execute?transaction&redirect&raft_index"
        } else {
            "/db/execute?redirect&raft_index"
        };
        let deadline = Instant::now() + FAILOVER_PATIENCE;
        let mut last = String::from("no leader known");
        loop {
            let leader = lock_read(&self.inner.topology).leader().cloned();
            if let Some(node) = leader {
                let sent = self.post(&node, path, statements).await;
                match sent {
                    Ok(r) if r.status().is_success() => {
                        // Executed, but an answer without its log index
                        // would lose read-your-writes: reported as unknown.
                        let body: Results = r.json().await.map_err(|e| ClientError::Unknown {
                            node: node.name(),
                            reason: format!("unreadable answer: {e}"),
                        })?;
                        return Ok(Executed {
                            results: body.results,
                            raft_index: body.raft_index,
                            node: node.name(),
                        });
                    }
                    // Not the leader (any more): certainly not executed.
                    Ok(r)
                        if r.status() == reqwest::StatusCode::MOVED_PERMANENTLY
                            || r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE =>
                    {
                        last = format!("{} is not the leader ({})", node.name(), r.status());
                    }
                    // The request itself was refused: certainly not done.
                    Ok(r) if r.status().is_client_error() => {
                        let status = r.status();
                        let text = r.text().await.unwrap_or_default();
                        return Err(ClientError::Refused {
                            node: node.name(),
                            reason: format!("{status}: {text}"),
                        });
                    }
                    // Any other failure after sending (504: the leader lost
                    // its quorum with the write pending) may or may not
                    // have happened.
                    Ok(r) => {
                        let status = r.status();
                        let text = r.text().await.unwrap_or_default();
                        return Err(ClientError::Unknown {
                            node: node.name(),
                            reason: format!("{status}: {text}"),
                        });
                    }
                    Err(e) if e.is_connect() => {
                        last = format!("{} refused the connection", node.name());
                    }
                    Err(e) => {
                        return Err(ClientError::Unknown {
                            node: node.name(),
                            reason: e.to_string(),
                        })
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Unavailable(last));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = refresh(&self.inner).await;
        }
    }

    /// Runs read statements on a read replica (or a voter when no replica
    /// can), served once `min_index` is applied there.
    pub async fn query(
        &self,
        statements: &Value,
        min_index: Option<u64>,
    ) -> Result<Queried, ClientError> {
        let path = match min_index {
            Some(i) => format!("/db/query?level=none&raft_index&min_index={i}"),
            None => "/db/query?level=none&raft_index".to_string(),
        };
        let deadline = Instant::now() + FAILOVER_PATIENCE;
        let mut last = String::from("no node known");
        loop {
            let readers = lock_read(&self.inner.topology).readers();
            let start = self.inner.next_reader.fetch_add(1, Ordering::Relaxed);
            for k in 0..readers.len() {
                let node = &readers[(start + k) % readers.len()];
                let sent = tokio::time::timeout(READ_PATIENCE, async {
                    let r = self.post(node, &path, statements).await?;
                    let status = r.status();
                    let body = r.bytes().await?;
                    Ok::<_, reqwest::Error>((status, body))
                })
                .await;
                match sent {
                    Err(_) => last = format!("{}: no answer within {READ_PATIENCE:?}", node.name()),
                    Ok(Ok((status, body))) if status.is_success() => {
                        match serde_json::from_slice::<Results>(&body) {
                            Ok(body) => {
                                return Ok(Queried {
                                    results: body.results,
                                    raft_index: body.raft_index,
                                    node: node.name(),
                                })
                            }
                            Err(e) => last = format!("{}: unreadable answer: {e}", node.name()),
                        }
                    }
                    Ok(Ok((status, body))) if status.is_client_error() => {
                        let reason = format!("{status}: {}", String::from_utf8_lossy(&body));
                        let answer = serde_json::from_slice::<ErrorBody>(&body).ok();
                        if answer.as_ref().and_then(|a| a.code)
                            == Some(ErrorCode::MinIndexAheadOfLog)
                        {
                            return Err(ClientError::AheadOfLog {
                                node: node.name(),
                                reason: answer.map_or(reason, |a| a.error),
                            });
                        }
                        return Err(ClientError::Refused {
                            node: node.name(),
                            reason,
                        });
                    }
                    Ok(Ok((status, _))) => last = format!("{}: {status}", node.name()),
                    Ok(Err(e)) => last = format!("{}: {e}", node.name()),
                }
                lock_write(&self.inner.topology)
                    .failed
                    .push((node.id.clone(), Instant::now()));
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Unavailable(last));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = refresh(&self.inner).await;
        }
    }
}

/// Asks the seeds and the known nodes for `/nodes` until one answers.
async fn refresh(inner: &Inner) -> Result<(), ClientError> {
    let known: Vec<String> = lock_read(&inner.topology)
        .nodes
        .iter()
        .map(|n| n.api.clone())
        .collect();
    let mut last = String::from("no node answered");
    let mut leaderless = None;
    for base in known.iter().chain(inner.seeds.iter()) {
        let request = inner
            .http
            .get(format!("{base}/nodes?nonvoters&ver=2&timeout=300ms"))
            .timeout(Duration::from_secs(2));
        let answer = inner.sign(request).send().await;
        let listed: Nodes = match answer {
            Ok(r) if r.status().is_success() => match r.json().await {
                Ok(v) => v,
                Err(e) => {
                    last = format!("{base}: unreadable /nodes: {e}");
                    continue;
                }
            },
            Ok(r) => {
                last = format!("{base}: {}", r.status());
                continue;
            }
            Err(e) => {
                last = format!("{base}: {e}");
                continue;
            }
        };
        let nodes: Vec<NodeInfo> = listed
            .nodes
            .into_iter()
            .filter(|n| n.reachable)
            .map(|n| NodeInfo {
                id: n.id,
                api: n.api_addr,
                voter: n.voter,
                leader: n.leader,
                lag: n.lag,
            })
            .collect();
        if nodes.is_empty() {
            last = format!("{base}: no reachable nodes listed");
            continue;
        }
        // A node that knows no leader (cut off, or mid-election) is kept
        // only if no other node names one.
        if nodes.iter().any(|n| n.leader) {
            install(inner, nodes);
            return Ok(());
        }
        leaderless.get_or_insert(nodes);
    }
    match leaderless {
        Some(nodes) => {
            install(inner, nodes);
            Ok(())
        }
        None => Err(ClientError::Unavailable(last)),
    }
}

fn install(inner: &Inner, nodes: Vec<NodeInfo>) {
    let mut topology = lock_write(&inner.topology);
    topology.failed.retain(|(_, at)| at.elapsed() < SKIP_FAILED);
    topology.nodes = nodes;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, voter: bool, leader: bool, lag: Option<u64>) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            api: format!("http://db-{id}"),
            voter,
            leader,
            lag,
        }
    }

    #[test]
    fn reads_prefer_healthy_caught_up_replicas_then_voters() {
        let mut t = Topology {
            nodes: vec![
                node("1", true, true, Some(0)),
                node("2", true, false, Some(3)),
                node("4", false, false, Some(2)),
                node("5", false, false, Some(MAX_LAG + 1)),
            ],
            failed: Vec::new(),
        };
        let ids = |t: &Topology| t.readers().into_iter().map(|n| n.id).collect::<Vec<_>>();
        assert_eq!(ids(&t), vec!["4"], "the lagging replica is skipped");
        t.failed.push(("4".into(), Instant::now()));
        assert_eq!(ids(&t), vec!["1", "2"], "no replica left: the voters serve");
        t.failed.clear();
        t.nodes[3].lag = Some(0);
        assert_eq!(ids(&t), vec!["4", "5"], "caught up, it serves again");
        assert_eq!(t.leader().map(|n| n.id.as_str()), Some("1"));
    }

    /// A leader on a real socket that lists itself in `/nodes` and
    /// answers every write with `status` (or, with `None`, closes the
    /// connection once the request is in). Returns its URL and the count
    /// of writes it received.
    async fn leader_that_answers(
        status: Option<u16>,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let writes = std::sync::Arc::new(AtomicUsize::new(0));
        let (me, count) = (url.clone(), writes.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let (me, count) = (me.clone(), count.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // The whole request: head, then Content-Length bytes.
                    let (head_end, length) = loop {
                        let Ok(n) = conn.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (end + 4, length);
                        }
                    };
                    while buf.len() < head_end + length {
                        let Ok(n) = conn.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let (code, body) = if head.starts_with("GET /nodes") {
                        let nodes = format!(
                            r#"{{"nodes":[{{"id":"1","api_addr":"{me}","addr":"x:1","voter":true,"reachable":true,"leader":true,"time":0.0}}]}}"#
                        );
                        (200, nodes)
                    } else {
                        count.fetch_add(1, Ordering::SeqCst);
                        match status {
                            Some(code) => (code, r#"{"error":"boom"}"#.to_string()),
                            None => return, // dropped: no answer at all
                        }
                    };
                    let answer = format!(
                        "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
        (url, writes)
    }

    /// One write through a client of [`leader_that_answers`]`(status)`:
    /// its answer, and the count of writes the leader received.
    async fn one_write_to(
        status: Option<u16>,
    ) -> (
        Result<Executed, ClientError>,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let (url, writes) = leader_that_answers(status).await;
        let client = Client::new(vec![url]).unwrap();
        client.discover(Duration::from_secs(5)).await.unwrap();
        let answer = client
            .execute(&serde_json::json!(["INSERT INTO t VALUES (1)"]), false)
            .await;
        (answer, writes)
    }

    #[tokio::test]
    async fn a_write_whose_outcome_is_unknown_is_reported_never_replayed() {
        use std::sync::atomic::Ordering;
        // 500, 504 and a connection closed with the write in: each may
        // have happened, so each is Unknown after exactly one attempt.
        for status in [Some(500), Some(504), None] {
            let (answer, writes) = one_write_to(status).await;
            assert!(
                matches!(answer, Err(ClientError::Unknown { .. })),
                "{status:?}: {answer:?}"
            );
            assert_eq!(writes.load(Ordering::SeqCst), 1, "{status:?}: replayed");
        }
        // 503 (not the leader): certainly not done, so it is tried again.
        let (answer, writes) = one_write_to(Some(503)).await;
        assert!(
            matches!(answer, Err(ClientError::Unavailable(_))),
            "{answer:?}"
        );
        assert!(
            writes.load(Ordering::SeqCst) > 1,
            "a sure refusal is retried"
        );
    }
}
