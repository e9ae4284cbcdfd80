//! The cluster's endpoints beside the data API: `/status`, `/nodes`,
//! `/readyz`, `/leader`, `/metrics`, `/join`, `/remove`, `/db/backup`,
//! `/db/load`, and the sign-in every request passes (`--auth`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use openraft::{ChangeMembers, ServerState};
use serde::Deserialize;
use serde_json::{json, Value};

use scaleout_wire::data::{
    node_id, Build, HttpStatus, JoinRequest, LeaderAnswer, LeaderOf, NodeSelf, NodeStatus, Nodes,
    NodesV1, RaftStatus, Runtime, Sqlite3Status, Status, StoreLeader, StoreStatus,
};

use super::DbNode;
use crate::auth::Caller;
use crate::http::{self, error, Forward, NodeError};
use crate::raft::network::{self};
use crate::raft::{Command, Member};

impl DbNode {
    pub(super) fn router(self: Arc<Self>) -> Router {
        let cluster = Router::new()
            .route("/status", get(status))
            .route("/nodes", get(nodes))
            .route("/readyz", get(readyz))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/leader", get(leader).post(step_down))
            .route("/metrics", get(metrics))
            .route("/debug/vars", get(debug_vars))
            .route("/join", post(join))
            .route("/remove", delete(remove))
            .route("/db/backup", get(backup))
            .route("/db/load", post(load))
            .layer(axum::extract::DefaultBodyLimit::max(http::MAX_BODY * 8))
            .with_state(self.clone());
        let stats = self.clone();
        let users = self.users.clone();
        let client = self.client.clone();
        let mut api = http::router(self, client).merge(cluster);
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
        .layer(axum::middleware::from_fn(traced))
    }
}

/// Runs a request inside a span named by its `X-Request-Id` (the web
/// server's, kept under the one rule every tier applies; else a new one),
/// and answers with the id.
async fn traced(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use scaleout_wire::request_id;
    let id = req
        .headers()
        .get(request_id::HEADER)
        .filter(|v| request_id::acceptable(v.as_bytes()))
        .cloned()
        .unwrap_or_else(|| {
            axum::http::HeaderValue::from_bytes(&request_id::new())
                .unwrap_or(axum::http::HeaderValue::from_static("-"))
        });
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = req.uri().path(),
        request_id = %id.to_str().unwrap_or("-"),
    );
    let started = Instant::now();
    let mut resp = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    let status = resp.status().as_u16();
    span.in_scope(|| {
        tracing::debug!(
            status,
            micros = started.elapsed().as_micros() as u64,
            "served"
        );
    });
    resp.headers_mut().insert(request_id::HEADER, id);
    resp
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

/// The node, as the handlers take it.
type This = State<Arc<DbNode>>;

/// rqlite's names (Hashicorp Raft's): a read replica is a `Follower`.
fn role(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "Leader",
        ServerState::Follower | ServerState::Learner => "Follower",
        ServerState::Candidate => "Candidate",
        ServerState::Shutdown => "Shutdown",
    }
}

/// On the leader, the highest index a quorum of voters holds (the
/// leader's own log counts as its match); elsewhere, the last applied.
fn commit_index(m: &openraft::RaftMetrics<u64, Member>, voters: &BTreeSet<u64>) -> u64 {
    let applied = m.last_applied.map_or(0, |l| l.index);
    let Some(replication) = m
        .replication
        .as_ref()
        .filter(|_| m.state == ServerState::Leader)
    else {
        return applied;
    };
    let mut matched: Vec<u64> = voters
        .iter()
        .map(|id| {
            if *id == m.id {
                m.last_log_index.unwrap_or(0)
            } else {
                replication
                    .get(id)
                    .copied()
                    .flatten()
                    .map_or(0, |l| l.index)
            }
        })
        .collect();
    matched.sort_unstable_by(|a, b| b.cmp(a));
    matched
        .get(voters.len() / 2)
        .copied()
        .unwrap_or(0)
        .max(applied)
}

async fn status(State(node): This) -> Response {
    let m = node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let learners: Vec<u64> = membership.learner_ids().collect();
    let leader = node.leader();
    let db_size = std::fs::metadata(&node.db_path).map_or(0, |m| m.len());
    let applied = m.last_applied.map_or(0, |l| l.index);
    let commit = commit_index(&m, &voters);
    let ready = node.applying().is_ok() && leader.is_some() && node.hears_leader();
    axum::Json(Status {
        node: NodeSelf {
            id: node.me.name_of(node.id),
            api_addr: node.me.api_url(),
            raft_addr: node.me.raft.clone(),
            read_only: node.read_only,
            uptime_seconds: node.started.elapsed().as_secs_f64(),
        },
        store: StoreStatus {
            node_id: node.me.name_of(node.id),
            leader: leader.map(|(id, n)| StoreLeader {
                node_id: n.name_of(id),
                api_addr: n.api_url(),
                addr: n.raft,
            }),
            ready,
            open: true,
            db_size,
            fsm_index: applied,
            db_applied_index: applied,
            sqlite3: Sqlite3Status {
                version: rusqlite::version().to_string(),
                path: node.db_path.display().to_string(),
                db_size,
            },
            raft: RaftStatus {
                state: role(m.state).into(),
                term: m.current_term,
                last_log_index: m.last_log_index.unwrap_or(0),
                commit_index: commit,
                applied_index: applied,
                snapshot_index: m.snapshot.map_or(0, |l| l.index),
                last_snapshot_index: m.snapshot.map_or(0, |l| l.index),
                purged_index: m.purged.map_or(0, |l| l.index),
                voter: voters.contains(&node.id),
                voters: voters.into_iter().collect(),
                learners,
                millis_since_quorum_ack: m.millis_since_quorum_ack,
                last_contact_ms: node.contact.age().map(|a| a.as_millis() as u64),
            },
        },
        build: Build {
            version: env!("CARGO_PKG_VERSION").into(),
            engine: "scaleout".into(),
        },
        http: HttpStatus {
            bind_addr: node.me.api.clone(),
            auth: if node.users.is_some() {
                "enabled"
            } else {
                "disabled"
            }
            .into(),
            tls: crate::peers::scheme() == "https",
        },
        runtime: Runtime {
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            num_cpu: std::thread::available_parallelism().map_or(1, |n| n.get()),
            version: concat!("scaleout ", env!("CARGO_PKG_VERSION")).into(),
        },
    })
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

async fn nodes(State(node): This, Query(params): Query<NodesParams>) -> Response {
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
            let answer = client
                .get(format!("{}/healthz", member.api_url()))
                .timeout(patience)
                .send()
                .await;
            // Why a node is not reachable, as rqlite says it.
            let error = match answer {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(format!("its health check answered {}", r.status())),
                Err(e) if e.is_timeout() => Some(format!(
                    "no answer to its health check within {}",
                    humantime::format_duration(patience)
                )),
                Err(e) => Some(format!("its health check failed: {}", error_chain(&e))),
            };
            (id, member, voter, error, started.elapsed(), lag)
        });
    }
    let mut listed = Vec::new();
    while let Some(Ok((id, member, voter, error, took, lag))) = checks.join_next().await {
        listed.push((
            id,
            NodeStatus {
                id: member.name_of(id),
                api_addr: member.api_url(),
                addr: member.raft,
                voter,
                reachable: error.is_none(),
                leader: leader == Some(id),
                time: took.as_secs_f64(),
                lag,
                error,
            },
        ));
    }
    listed.sort_by_key(|(id, _)| *id);
    let nodes = listed.into_iter().map(|(_, n)| n);
    if params.ver.as_deref() == Some("2") {
        axum::Json(Nodes {
            nodes: nodes.collect(),
        })
        .into_response()
    } else {
        let by_id: NodesV1 = nodes.map(|n| (n.id.clone(), n)).collect();
        axum::Json(by_id).into_response()
    }
}

async fn readyz(State(node): This, Query(params): Query<BTreeMap<String, String>>) -> Response {
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

async fn leader(State(node): This) -> Response {
    match node.leader() {
        Some((id, member)) => axum::Json(LeaderAnswer {
            leader: LeaderOf {
                id: member.name_of(id),
                api_addr: member.api_url(),
                addr: member.raft,
            },
        })
        .into_response(),
        None => NodeError::NoLeader.into_response(),
    }
}

/// A request's `id`, its key matched without regard to case as rqlite's
/// (Go's) JSON decoder matches it: `{"ID": "2"}` names node 2.
fn id_field(v: &Value) -> Option<&Value> {
    v.as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("id"))
        .map(|(_, v)| v)
}

/// rqlite's `POST /leader`: the leader hands its role to the voter
/// `{"id": N}` names, or to the voter furthest along without one. With
/// `?wait` the answer comes once the new leader leads (the new leader,
/// as `GET /leader` shows it); without, once the transfer has started.
/// A follower forwards it to the leader.
async fn step_down(
    State(node): This,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let to = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let asked = serde_json::from_slice::<Value>(&body)
            .ok()
            .filter(Value::is_object);
        match asked.as_ref().map(|v| id_field(v).map(node_id)) {
            Some(None) => None,
            Some(Some(Some(id))) => Some(id),
            Some(Some(None)) | None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "leader: send {\"id\": \"N\"} (a node's id) or no body",
                )
            }
        }
    };
    if let Some(forwarded) = on_leader(&node, method, &uri, &headers, body).await {
        return forwarded;
    }
    let transfer = match node.plan_transfer(to) {
        Ok(t) => t,
        Err(refused) => return error(refused.status, &format!("leader: {}", refused.why)),
    };
    let target = transfer.target();
    if !http::uri_flag(&uri, "wait") {
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(refused) = node.transfer(transfer).await {
                tracing::warn!(target, why = %refused.why, "leadership transfer did not land");
            }
        });
        return axum::Json(json!({})).into_response();
    }
    match node.transfer(transfer).await {
        Ok(()) => leader(State(node)).await,
        Err(refused) => error(refused.status, &format!("leader: {}", refused.why)),
    }
}

/// rqlite's `/debug/vars` (Go's expvar): the command line and the
/// node's counters as JSON (the same figures as `/metrics`).
async fn debug_vars(State(node): This) -> Response {
    let m = node.raft.metrics().borrow().clone();
    let counts = &node.proposer.counts;
    axum::Json(json!({
        "cmdline": std::env::args().collect::<Vec<_>>(),
        "uptime_seconds": node.started.elapsed().as_secs_f64(),
        "http": node.stats.vars(),
        "store": {
            "term": m.current_term,
            "last_log_index": m.last_log_index.unwrap_or(0),
            "applied_index": m.last_applied.map_or(0, |l| l.index),
            "snapshot_index": m.snapshot.map_or(0, |l| l.index),
            "proposed_entries": counts.entries.load(std::sync::atomic::Ordering::Relaxed),
            "proposed_writes": counts.writes.load(std::sync::atomic::Ordering::Relaxed),
        },
    }))
    .into_response()
}

async fn metrics(State(node): This) -> Response {
    let registry = scaleout_metrics::Scrape(move |w: &mut scaleout_metrics::Writer<'_>| {
        let m = node.raft.metrics().borrow().clone();
        node.stats.write(w, &m, &node.proposer.counts)
    })
    .registry();
    (
        [(header::CONTENT_TYPE, scaleout_metrics::CONTENT_TYPE)],
        scaleout_metrics::render(&registry),
    )
        .into_response()
}

/// Requests only the leader may serve: a follower forwards them.
async fn on_leader(
    node: &DbNode,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Option<Response> {
    let leader = match node.lead_here().await {
        Ok(()) => return None,
        Err(NodeError::NotLeader {
            leader: Some(leader),
        }) => leader,
        Err(e) => return Some(e.into_response()),
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

async fn join(
    State(node): This,
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
    let Some(id) = request.id() else {
        return error(
            StatusCode::BAD_REQUEST,
            "join: id must be a name of 1 to 128 characters (or a number)",
        );
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
        name: request
            .name()
            .filter(|name| scaleout_wire::data::named(id, name)),
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
    // A member back at new addresses (restarted elsewhere): its entry is
    // replaced, so the leader sends to where it is now.
    if known.as_ref().is_some_and(|k| *k != member) {
        let change = ChangeMembers::SetNodes(BTreeMap::from([(id, member.clone())]));
        if let Err(e) = node.raft.change_membership(change, false).await {
            return error(StatusCode::SERVICE_UNAVAILABLE, &format!("join: {e}"));
        }
        tracing::info!(id, %member, "a member's addresses changed");
        if is_voter == request.voter {
            return axum::Json(json!({ "joined": id, "moved": true })).into_response();
        }
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
    State(node): This,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let id = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| id_field(&v).and_then(node_id));
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
    State(node): This,
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
    State(node): This,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = std::time::Instant::now();
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
            match http::Render::of(&uri).answer(&http::answer(results, raft_index), started) {
                Ok(text) => (
                    status,
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    text,
                )
                    .into_response(),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        Err(e) => e.into_response(),
    }
}

/// An error with its causes (reqwest's own text leaves out why a
/// connection failed).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
