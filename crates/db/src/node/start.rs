//! Start-up: the data directory's lock, storage, Raft and both
//! listeners; a fresh node bootstraps a cluster or asks one to take it in.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{refusal_of_write, DbConfig, DbNode, Running, StartError};
use crate::metrics::Stats;
use crate::raft::log_store::LogStore;
use crate::raft::network::{self, Contact, Network, Replicas};
use crate::raft::proposer::Proposer;
use crate::raft::state_store::{Readers, StateStore};
use crate::raft::Raft;

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
    let stats = Stats::default();
    let stages = stats.stages.clone();
    let log = LogStore::open(
        &config.data.join("raft"),
        config.id,
        config.read_only,
        stages.clone(),
    )
    .map_err(|e| storage(&e))?;
    let durable = log.durable();
    let state = StateStore::open(
        &config.data,
        stopping.clone(),
        durable.clone(),
        stages.clone(),
    )
    .map_err(|e| storage(&e))?
    .on_node(config.id);
    let db_path = state.db_path();
    let readers = Arc::new(Readers::open(&db_path, 4, stopping).map_err(|e| storage(&e))?);

    let raft_config =
        super::tuning::raft_config(config.election_timeout, config.snapshot_threshold)
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
    let http_client = |e: reqwest::Error| StartError::Config(format!("HTTP client: {e}"));
    let replicas = Replicas::new(state.applied_ids());
    let network = Network::new(
        config.cluster_secret.clone(),
        durable,
        stages,
        replicas.clone(),
    )
    .map_err(http_client)?;
    let raft = Raft::new(config.id, Arc::new(raft_config), network, log, state)
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
    replicas.watch(&raft);

    let contact = Arc::new(Contact::default());
    let node = Arc::new(DbNode {
        id: config.id,
        raft: raft.clone(),
        readers,
        me: config.advertise.clone(),
        read_only: config.read_only,
        contact: contact.clone(),
        client: crate::peers::client(reqwest::Client::builder().timeout(crate::peers::TIMEOUT))
            .map_err(http_client)?,
        stats,
        read_timeout: config.read_timeout,
        query_timeout: config.query_timeout,
        max_result_bytes: config.max_result_bytes,
        write_budget: config.write_budget,
        _lock: lock,
        users: config.users.clone(),
        join_credentials: config.join_credentials.clone(),
        cluster_secret: config.cluster_secret.clone(),
        leader_end: std::sync::Mutex::new(None),
        lease: config.election_timeout * 3 / 2,
        started: Instant::now(),
        db_path,
        proposer: Proposer::start(
            raft.clone(),
            refusal_of_write,
            config.election_timeout * 3 / 2,
        ),
        queued: Arc::new(tokio::sync::Semaphore::new(super::QUEUE_DEPTH)),
        // Unique across restarts, as rqlite's (which start from the clock).
        queue_seq: std::sync::atomic::AtomicU64::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
        ),
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

    {
        let node = node.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { node.stand_when_silent(shutdown).await });
    }

    // `--join` may list several nodes (every replica of a StatefulSet, or
    // every voter of a Compose file, gets the same list, itself in it).
    let listed: Vec<String> = config
        .join
        .iter()
        .flat_map(|j| j.split(','))
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    let others: Vec<String> = listed
        .iter()
        .filter(|u| !names_itself(u, &config.advertise.api))
        .cloned()
        .collect();
    // The first node listed starts the cluster when it has no data — but
    // only when no other listed node already has one: the first node back
    // with an empty volume joins the cluster it lost, never starts a
    // second one beside it (split brain).
    let starts = fresh
        && (listed.is_empty()
            || listed
                .first()
                .is_some_and(|u| names_itself(u, &config.advertise.api))
                && !node.cluster_among(&others).await);
    if fresh {
        if starts {
            let members = BTreeMap::from([(config.id, config.advertise.clone())]);
            raft.initialize(members)
                .await
                .map_err(|e| StartError::Raft(e.to_string()))?;
            tracing::info!(id = config.id, "bootstrapped a one-node cluster");
        } else {
            let node = node.clone();
            let shutdown = shutdown.clone();
            let others = others.clone();
            tokio::spawn(async move { node.join_any(&others, shutdown).await });
        }
    } else {
        tracing::info!(id = config.id, "restarted with its data and membership");
        if let Some(url) = others.first() {
            match node.membership_at(url).await {
                // The cluster there is not this node's: its data belongs
                // elsewhere. rqlite exits here too.
                Some(nodes) if !nodes.iter().any(|n| n.id == node.me.name_of(config.id)) => {
                    shutdown.cancel();
                    let members: Vec<String> = nodes
                        .iter()
                        .map(|n| format!("{} ({})", n.id, n.addr))
                        .collect();
                    return Err(StartError::Config(format!(
                        "--join {url}: that cluster (members {}) does not have node {}, whose data is in {}; start this node without --join to rejoin its own cluster, or with an empty --data to join that one",
                        members.join(", "),
                        node.me.name_of(config.id),
                        config.data.display()
                    )));
                }
                // Known there, at other addresses (it moved): registered
                // again with the ones it has now.
                Some(nodes) => {
                    let moved = nodes.iter().any(|n| {
                        n.id == node.me.name_of(config.id)
                            && (n.addr != node.me.raft
                                || n.api_addr.split("://").last() != Some(node.me.api.as_str()))
                    });
                    if moved {
                        tracing::info!(id = config.id, %url, "its addresses changed; registering them again");
                        let node = node.clone();
                        let others = others.clone();
                        let shutdown = shutdown.clone();
                        tokio::spawn(async move { node.join_any(&others, shutdown).await });
                    }
                }
                None => {
                    tracing::warn!(%url, "--join: no answer from the cluster; going on with the membership in the data directory")
                }
            }
        }
    }
    Ok(Running { node, servers })
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

impl DbNode {
    /// The members (voters and replicas) of the cluster at `url`, as its
    /// `/nodes` lists them; `None` when it does not answer within a few
    /// seconds.
    async fn membership_at(&self, url: &str) -> Option<Vec<scaleout_wire::data::NodeStatus>> {
        let target = format!(
            "{}/nodes?nonvoters&ver=2&timeout=500ms",
            url.trim_end_matches('/')
        );
        for _ in 0..5 {
            let mut request = self.client.get(&target).timeout(Duration::from_secs(2));
            if let Some((user, password)) = &self.join_credentials {
                request = request.basic_auth(user, Some(password));
            }
            if let Ok(r) = request.send().await {
                if r.status().is_success() {
                    if let Ok(nodes) = r.json::<scaleout_wire::data::Nodes>().await {
                        return Some(nodes.nodes);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        None
    }

    /// Asks the cluster at `url` to take this node in, until it does.
    /// Whether one of `urls` belongs to a cluster that has a leader (asked
    /// for a few seconds: nodes starting together may not answer yet, and
    /// then there is no cluster to find).
    async fn cluster_among(&self, urls: &[String]) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !urls.is_empty() && tokio::time::Instant::now() < deadline {
            for url in urls {
                let asked = self
                    .client
                    .get(format!("{}/leader", url.trim_end_matches('/')))
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await;
                if asked.is_ok_and(|r| r.status().is_success()) {
                    tracing::info!(%url, "a cluster already runs there: joining it rather than starting one");
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        false
    }

    /// Joins through whichever of `urls` takes it, trying each in turn.
    async fn join_any(&self, urls: &[String], shutdown: CancellationToken) {
        let mut turn = 0;
        while !shutdown.is_cancelled() && !urls.is_empty() {
            let url = &urls[turn % urls.len()];
            turn += 1;
            if self.join_once(url).await {
                return;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// One request to join through `url`; whether it was taken.
    async fn join_once(&self, url: &str) -> bool {
        let body = scaleout_wire::data::JoinRequest {
            id: self.me.name_of(self.id).into(),
            api_addr: self.me.api.clone(),
            addr: self.me.raft.clone(),
            voter: !self.read_only,
        };
        let target = format!("{}/join", url.trim_end_matches('/'));
        let mut request = self.client.post(&target).json(&body);
        if let Some((user, password)) = &self.join_credentials {
            request = request.basic_auth(user, Some(password));
        }
        if let Some(secret) = &self.cluster_secret {
            request = request.header(network::CLUSTER_SECRET_HEADER, secret.header());
        }
        match request.send().await {
            Ok(r) if r.status().is_success() => {
                tracing::info!(%url, voter = !self.read_only, "joined the cluster");
                true
            }
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                tracing::warn!(%url, %status, answer = %text, "join refused; retrying");
                false
            }
            Err(e) => {
                tracing::warn!(%url, error = %e, "join failed; retrying");
                false
            }
        }
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

/// Whether `url` (a `--join` URL) is this node's own API address.
fn names_itself(url: &str, api: &str) -> bool {
    let authority = url.split("://").last().unwrap_or(url).trim_end_matches('/');
    authority.eq_ignore_ascii_case(api)
}

#[cfg(test)]
mod join_tests {
    #[test]
    fn a_join_url_naming_this_node_is_seen() {
        use super::names_itself;
        assert!(names_itself(
            "http://scaleout-db-0.scaleout-db:4001",
            "scaleout-db-0.scaleout-db:4001"
        ));
        assert!(names_itself("https://DB-0:4001/", "db-0:4001"));
        assert!(!names_itself("http://db-0:4001", "db-1:4001"));
        assert!(!names_itself("http://db-0:4002", "db-0:4001"));
    }
}
