//! rqlite's data API over HTTP, in front of any [`Node`]: `/db/execute`,
//! `/db/query` (GET `q=` and POST), `/db/request`, with rqlite's query
//! parameters (`transaction`, `timings`, `associative`, `pretty`, `level`,
//! `freshness`, `freshness_strict`, `min_index`). Errors reach the client
//! here and only here: bad requests are `400` with `{"error": ...}`,
//! per-statement SQL errors stay inside `results` with status `200`, as
//! rqlite does; a node that cannot serve answers `503`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use crate::auth::{Caller, Denied, Perm};
use crate::engine::ExecOptions;
pub use crate::error::{denied_response, error, NodeError};
use crate::request::{parse_statements, RequestError, Statement};

/// Largest request body accepted.
pub const MAX_BODY: usize = 16 * 1024 * 1024;

/// How fresh a read must be (rqlite's `level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    None,
    Weak,
    Linearizable,
    Strong,
    Auto,
}

impl std::str::FromStr for Level {
    type Err = RequestError;
    fn from_str(s: &str) -> Result<Self, RequestError> {
        Ok(match s {
            "none" => Level::None,
            "weak" | "" => Level::Weak,
            "linearizable" => Level::Linearizable,
            "strong" => Level::Strong,
            "auto" => Level::Auto,
            other => {
                return Err(RequestError(format!(
                    "level {other:?}: use none, weak, linearizable, strong or auto"
                )))
            }
        })
    }
}

/// A read's consistency requirements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOptions {
    pub level: Level,
    /// With `none`: refuse to answer from a node whose last contact with
    /// the leader is older than this.
    pub freshness: Option<Duration>,
    pub freshness_strict: bool,
    /// Answer only once this log index is applied here (read-your-writes).
    pub min_index: Option<u64>,
    /// Stop the query after this long (rqlite's `db_timeout`; the node's
    /// `--query-timeout` bounds it).
    pub db_timeout: Option<Duration>,
    pub exec: ExecOptions,
}

/// What a node answered: the wire's results (the engine's JSON values
/// per statement) and the log index they are at.
pub type Answer = scaleout_wire::data::Results<Value>;

/// An answer without `time` (the HTTP layer adds it for `?timings`).
pub fn answer(results: Vec<Value>, raft_index: u64) -> Answer {
    Answer {
        results,
        raft_index,
        time: None,
    }
}

/// What the HTTP layer needs from a database node (the consumer owns the
/// trait: the Raft node implements it; tests use a plain SQLite file).
#[async_trait::async_trait]
pub trait DataNode: Send + Sync + 'static {
    async fn execute(
        &self,
        statements: Vec<Statement>,
        opts: ExecOptions,
    ) -> Result<Answer, NodeError>;
    async fn query(
        &self,
        statements: Vec<Statement>,
        opts: ReadOptions,
    ) -> Result<Answer, NodeError>;
    /// `?queue`: takes the write for the log and answers its sequence
    /// number at once (with `wait`, once it has committed).
    async fn queue(
        &self,
        statements: Vec<Statement>,
        opts: ExecOptions,
        wait: bool,
    ) -> Result<u64, NodeError>;
    /// Whether every statement only reads, by SQLite's own account (for
    /// `/db/request`: reads are served here, anything else goes through
    /// the log whole).
    async fn read_only(&self, statements: Vec<Statement>) -> Result<bool, NodeError>;
}

/// Marks a request a node forwarded to the leader, with the forwards so
/// far: a second is allowed (the leadership moved while it was on its
/// way, as in a handover), a third is refused (`503`: the client retries).
pub const FORWARDED: &str = "x-scaleout-forwarded";
/// Forwards one request may take (its header counts them).
const MAX_HOPS: u8 = 2;

#[derive(Clone)]
struct Api {
    node: Arc<dyn DataNode>,
    client: reqwest::Client,
}

/// `client` forwards what a follower cannot answer to the leader.
pub fn router(node: Arc<dyn DataNode>, client: reqwest::Client) -> Router {
    Router::new()
        .route("/db/execute", post(execute))
        .route("/db/query", get(query).post(query))
        .route("/db/request", post(unified))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(Api { node, client })
}

/// rqlite's flags are read by their presence, whatever their value:
/// `?transaction`, `?transaction=yes` and even `?transaction=false` all
/// ask for one, as rqlite reads them (a client written against rqlite
/// must get the same all-or-nothing it asked for).
fn flag(params: &HashMap<String, String>, name: &str) -> bool {
    params.contains_key(name)
}

/// A flag of a request's query string (for handlers that take no `Query`).
pub fn uri_flag(uri: &Uri, name: &str) -> bool {
    Query::<HashMap<String, String>>::try_from_uri(uri).is_ok_and(|q| flag(&q.0, name))
}

struct Parsed {
    render: Render,
    read: ReadOptions,
}

/// How an answer is written, from the request's flags (rqlite's).
#[derive(Debug, Clone, Copy, Default)]
pub struct Render {
    /// Indented, 4 spaces as rqlite's.
    pub pretty: bool,
    /// With the seconds the request took.
    pub timings: bool,
    /// With the log index (`?raft_index`): rqlite adds it only when
    /// asked; scaleout's own clients always ask.
    pub raft_index: bool,
}

impl Render {
    pub fn of(uri: &Uri) -> Render {
        Render {
            pretty: uri_flag(uri, "pretty"),
            timings: uri_flag(uri, "timings"),
            raft_index: uri_flag(uri, "raft_index"),
        }
    }

    /// The answer as JSON text.
    pub fn answer(&self, answer: &Answer, started: Instant) -> serde_json::Result<Vec<u8>> {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            results: &'a [Value],
            #[serde(skip_serializing_if = "Option::is_none")]
            raft_index: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            time: Option<f64>,
        }
        let out = Out {
            results: &answer.results,
            raft_index: self.raft_index.then_some(answer.raft_index),
            time: self.timings.then(|| started.elapsed().as_secs_f64()),
        };
        self.json(&out)
    }

    /// Any value as JSON text, indented when asked.
    pub fn json(&self, value: &impl serde::Serialize) -> serde_json::Result<Vec<u8>> {
        if !self.pretty {
            return serde_json::to_vec(value);
        }
        let mut out = Vec::new();
        let indent = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out, indent,
        ))?;
        Ok(out)
    }
}

fn parse_params(params: &HashMap<String, String>) -> Result<Parsed, RequestError> {
    let level = params
        .get("level")
        .map(|l| l.parse())
        .transpose()?
        .unwrap_or(Level::Weak);
    let freshness = params
        .get("freshness")
        .map(|f| {
            humantime::parse_duration(f).map_err(|e| RequestError(format!("freshness {f:?}: {e}")))
        })
        .transpose()?;
    let min_index = params
        .get("min_index")
        .map(|m| {
            m.parse::<u64>()
                .map_err(|_| RequestError(format!("min_index {m:?} is not a whole number")))
        })
        .transpose()?;
    let db_timeout = params
        .get("db_timeout")
        .map(|t| {
            humantime::parse_duration(t)
                .map_err(|e| RequestError(format!("db_timeout {t:?}: {e}; use e.g. 500ms or 2s")))
        })
        .transpose()?;
    let exec = ExecOptions {
        transaction: flag(params, "transaction"),
        timings: flag(params, "timings"),
        associative: flag(params, "associative"),
        rows: false,
    };
    Ok(Parsed {
        render: Render {
            pretty: flag(params, "pretty"),
            timings: exec.timings,
            raft_index: flag(params, "raft_index"),
        },
        read: ReadOptions {
            level,
            freshness,
            freshness_strict: flag(params, "freshness_strict"),
            min_index,
            db_timeout,
            exec,
        },
    })
}

fn respond(answer: Answer, parsed: &Parsed, started: Instant) -> Response {
    match parsed.render.answer(&answer, started) {
        Ok(t) => ([(header::CONTENT_TYPE, "application/json")], t).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// The most statements one request may hold: each is answered, and the
/// whole request is one log entry every node applies.
pub const MAX_STATEMENTS: usize = 10_000;

fn statements_from(body: &[u8]) -> Result<Vec<Statement>, RequestError> {
    if body.len() > MAX_BODY {
        return Err(RequestError(format!(
            "request body is larger than {MAX_BODY} bytes"
        )));
    }
    let statements = parse_statements(body)?;
    if statements.len() > MAX_STATEMENTS {
        return Err(RequestError(format!(
            "{} statements in one request; at most {MAX_STATEMENTS} (split them, or send a script to /db/load)",
            statements.len()
        )));
    }
    Ok(statements)
}

/// The statements of a request: the JSON body, or for `/db/query` also a
/// single `?q=`.
fn statements_of(
    params: &HashMap<String, String>,
    body: &[u8],
    allow_q: bool,
) -> Result<Vec<Statement>, RequestError> {
    match params.get("q").filter(|_| allow_q) {
        Some(q) if !q.trim().is_empty() => Ok(vec![Statement::plain(q.clone())]),
        Some(_) => Err(RequestError("q is empty".into())),
        None if body.is_empty() && allow_q => Err(RequestError(
            "give the query as ?q=... or a JSON body".into(),
        )),
        None => statements_from(body),
    }
}

#[derive(Clone, Copy)]
enum Endpoint {
    Execute,
    Query,
    /// `/db/request`: reads and writes in one list. A list of reads only is
    /// served as a query; anything that writes goes through the log whole.
    Unified,
}

/// One handler for the three endpoints: parse, send to the node, answer.
async fn serve(api: Api, endpoint: Endpoint, request: Request) -> Response {
    let started = Instant::now();
    let Request {
        params,
        body,
        uri,
        method,
        headers,
        caller,
    } = request;
    let request = parse_params(&params).and_then(|parsed| {
        let statements = statements_of(&params, &body, matches!(endpoint, Endpoint::Query))?;
        Ok((parsed, statements))
    });
    let (mut parsed, statements) = match request {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.0),
    };
    let read = match endpoint {
        Endpoint::Execute => false,
        Endpoint::Query => true,
        Endpoint::Unified => match api.node.read_only(statements.clone()).await {
            Ok(read) => read,
            Err(e) => return e.into_response(),
        },
    };
    // A mixed request's reads are answered with their rows.
    parsed.read.exec.rows = matches!(endpoint, Endpoint::Unified);
    if !read && !caller.may(Perm::Execute) {
        let denied = match &caller.user {
            None => {
                Denied::Unauthenticated("writes need a user with the execute permission".into())
            }
            Some(user) => Denied::Forbidden(format!("user {user:?} lacks the execute permission")),
        };
        return denied_response(&denied);
    }
    let answer = if read {
        api.node
            .query(statements, parsed.read)
            .await
            .map(Reply::Answer)
    } else if flag(&params, "queue") {
        let wait = flag(&params, "wait");
        api.node
            .queue(statements, parsed.read.exec, wait)
            .await
            .map(Reply::Queued)
    } else {
        api.node
            .execute(statements, parsed.read.exec)
            .await
            .map(Reply::Answer)
    };
    match answer {
        Ok(Reply::Answer(body)) => respond(body, &parsed, started),
        Ok(Reply::Queued(sequence_number)) => {
            let queued = json!({ "results": [], "sequence_number": sequence_number });
            match parsed.render.json(&queued) {
                Ok(t) => ([(header::CONTENT_TYPE, "application/json")], t).into_response(),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        Err(NodeError::NotLeader {
            leader: Some(leader),
        }) => {
            let to_leader = Forward {
                leader: &leader,
                method,
                uri: &uri,
                headers: &headers,
                body,
            };
            to_leader.send(&api.client, flag(&params, "redirect")).await
        }
        Err(e) => e.into_response(),
    }
}

/// What a node made of a data request.
enum Reply {
    Answer(Answer),
    /// A `?queue` write, taken: its sequence number.
    Queued(u64),
}

/// A request a follower cannot serve, on its way to the leader.
pub struct Forward<'a> {
    /// The leader's API base URL (`http://host:port`).
    pub leader: &'a str,
    pub method: Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
}

impl Forward<'_> {
    /// With `redirect`, a 301 to the same path on the leader (rqlite's
    /// `redirect`); else the request is sent there and the answer relayed.
    pub async fn send(self, client: &reqwest::Client, redirect: bool) -> Response {
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        let target = format!("{}{}", self.leader, path);
        if redirect {
            return (
                StatusCode::MOVED_PERMANENTLY,
                [(header::LOCATION, target)],
                axum::Json(scaleout_wire::data::ErrorBody {
                    error: "not the leader".into(),
                    code: Some(scaleout_wire::data::ErrorCode::NotLeader),
                    leader: Some(self.leader.to_string()),
                }),
            )
                .into_response();
        }
        // Hops so far: a second is allowed (the leader handed over while
        // the request was on its way), a third is a loop.
        let hops: u8 = match self.headers.get(FORWARDED) {
            None => 0,
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(MAX_HOPS),
        };
        if hops >= MAX_HOPS {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "leadership changed twice while the request was forwarded; retry",
            );
        }
        let mut request = client
            .request(self.method, &target)
            .header(FORWARDED, (hops + 1).to_string())
            .body(self.body);
        for name in [
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::HeaderName::from_static(scaleout_wire::request_id::HEADER),
            header::HeaderName::from_static(crate::raft::network::CLUSTER_SECRET_HEADER),
        ] {
            if let Some(v) = self.headers.get(&name) {
                request = request.header(name, v);
            }
        }
        match request.send().await {
            Ok(answer) => {
                let status = answer.status();
                let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
                match answer.bytes().await {
                    Ok(bytes) => {
                        let mut response = (status, bytes).into_response();
                        if let Some(ct) = content_type {
                            response.headers_mut().insert(header::CONTENT_TYPE, ct);
                        }
                        response
                    }
                    // The leader had started answering: whatever the
                    // request was, it may have been done.
                    Err(e) => NodeError::ForwardUnknown(format!(
                        "the leader {} did not finish its answer: {e}",
                        self.leader
                    ))
                    .into_response(),
                }
            }
            // Not connected: the leader never saw it, so a retry is safe.
            Err(e) if e.is_connect() => error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("the leader {} could not be reached: {e}", self.leader),
            ),
            // Sent (or partly sent) and then lost: the leader may have
            // done it. A 503 here would invite a client to send a write
            // again that may already be in (rqlite's clients retry 503s).
            Err(e) => NodeError::ForwardUnknown(format!(
                "the request to the leader {} failed after it was sent: {e}",
                self.leader
            ))
            .into_response(),
        }
    }
}

/// What a data endpoint reads from the HTTP request.
pub struct Request {
    params: HashMap<String, String>,
    body: Bytes,
    uri: Uri,
    method: Method,
    headers: HeaderMap,
    /// Who signed in (`--auth`); without it, anyone may do anything.
    caller: Caller,
}

impl<S: Send + Sync> axum::extract::FromRequest<S> for Request {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        let uri = req.uri().clone();
        let method = req.method().clone();
        let headers = req.headers().clone();
        let caller = req
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(Caller::anyone_may_do_anything);
        let params = Query::<HashMap<String, String>>::try_from_uri(&uri)
            .map(|q| q.0)
            .map_err(|e| error(StatusCode::BAD_REQUEST, &e.body_text()))?;
        let body = Bytes::from_request(req, state).await.map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                &format!("request body: {} (at most {MAX_BODY} bytes)", e.body_text()),
            )
        })?;
        Ok(Request {
            params,
            body,
            uri,
            method,
            headers,
            caller,
        })
    }
}

async fn execute(State(api): State<Api>, request: Request) -> Response {
    serve(api, Endpoint::Execute, request).await
}

async fn query(State(api): State<Api>, request: Request) -> Response {
    serve(api, Endpoint::Query, request).await
}

async fn unified(State(api): State<Api>, request: Request) -> Response {
    serve(api, Endpoint::Unified, request).await
}

/// The entry point for the fuzzer (`fuzz/`) and its regression tests: a
/// data API request's query string (up to the first newline) and body
/// (the rest), parsed as the API parses them. Panics mean a bug.
#[doc(hidden)]
#[allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // a fuzzing entry point: a panic is the finding
pub mod fuzzing {
    use super::*;

    pub fn request(data: &[u8]) {
        let (query, body) = match data.iter().position(|b| *b == b'\n') {
            Some(at) => (&data[..at], &data[at + 1..]),
            None => (&data[..0], data),
        };
        let params: HashMap<String, String> =
            url::form_urlencoded::parse(query).into_owned().collect();
        let _ = parse_params(&params);
        if let Ok(statements) = parse_statements(body) {
            assert!(
                !statements.is_empty(),
                "an accepted request has a statement"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Mutex;
    use tower::ServiceExt;

    /// One SQLite database, no replication: enough to test the API layer.
    struct LocalNode {
        sm: Mutex<crate::state::StateMachine>,
        index: Mutex<u64>,
    }

    #[async_trait::async_trait]
    impl DataNode for LocalNode {
        async fn execute(
            &self,
            statements: Vec<Statement>,
            opts: ExecOptions,
        ) -> Result<Answer, NodeError> {
            let mut sm = self
                .sm
                .lock()
                .map_err(|e| NodeError::Internal(e.to_string()))?;
            let mut index = self
                .index
                .lock()
                .map_err(|e| NodeError::Internal(e.to_string()))?;
            *index += 1;
            let at = crate::state::Applied {
                term: 1,
                leader: 1,
                index: *index,
            };
            let results = sm
                .apply(at, &statements, &opts, &crate::engine::WriteEnv::default())
                .map_err(|e| NodeError::Internal(e.to_string()))?
                .unwrap_or_default();
            Ok(answer(results, *index))
        }
        async fn query(
            &self,
            statements: Vec<Statement>,
            opts: ReadOptions,
        ) -> Result<Answer, NodeError> {
            let applied = *self
                .index
                .lock()
                .map_err(|e| NodeError::Internal(e.to_string()))?;
            if let Some(m) = opts.min_index.filter(|m| *m > applied) {
                return Err(NodeError::NotCaughtUp(m));
            }
            let sm = self
                .sm
                .lock()
                .map_err(|e| NodeError::Internal(e.to_string()))?;
            Ok(answer(sm.query(&statements, &opts.exec), applied))
        }
        async fn queue(
            &self,
            statements: Vec<Statement>,
            opts: ExecOptions,
            _wait: bool,
        ) -> Result<u64, NodeError> {
            self.execute(statements, opts).await?;
            Ok(*self
                .index
                .lock()
                .map_err(|e| NodeError::Internal(e.to_string()))?)
        }
        async fn read_only(&self, statements: Vec<Statement>) -> Result<bool, NodeError> {
            let sm = self
                .sm
                .lock()
                .map_err(|e| NodeError::Internal(e.to_string()))?;
            Ok(sm.all_read_only(&statements))
        }
    }

    fn app() -> Router {
        router(
            Arc::new(LocalNode {
                sm: Mutex::new(crate::state::StateMachine::open_in_memory().unwrap()),
                index: Mutex::new(0),
            }),
            reqwest::Client::new(),
        )
    }

    async fn call(app: &Router, method: &str, uri: &str, body: &str) -> (StatusCode, Value) {
        let req = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .body(axum::body::Body::from(body.to_string()))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn writes_reads_and_the_unified_endpoint_answer_like_rqlite() {
        let app = app();
        let (s, v) = call(
            &app,
            "POST",
            "/db/execute",
            r#"["CREATE TABLE foo (id INTEGER NOT NULL PRIMARY KEY, name TEXT)"]"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["results"], json!([{}]), "DDL reports no counters");
        let (_, v) = call(
            &app,
            "POST",
            "/db/execute?timings&raft_index",
            r#"[["INSERT INTO foo(name) VALUES(?)", "fiona"]]"#,
        )
        .await;
        assert_eq!(v["results"][0]["last_insert_id"], 1);
        assert_eq!(v["raft_index"], 2);
        assert!(v["time"].as_f64().is_some() && v["results"][0]["time"].as_f64().is_some());

        let (s, v) = call(
            &app,
            "GET",
            "/db/query?q=SELECT%20*%20FROM%20foo&level=none",
            "",
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["results"][0]["values"], json!([[1, "fiona"]]));
        let (_, v) = call(
            &app,
            "POST",
            "/db/query?associative",
            r#"["SELECT name FROM foo"]"#,
        )
        .await;
        assert_eq!(v["results"][0]["rows"], json!([{"name": "fiona"}]));
        let (_, v) = call(
            &app,
            "POST",
            "/db/request",
            r#"["INSERT INTO foo(name) VALUES('declan')", "SELECT COUNT(*) FROM foo"]"#,
        )
        .await;
        assert_eq!(
            v["results"][0]["rows_affected"], 1,
            "a list with a write goes through execute"
        );
        let (_, v) = call(
            &app,
            "POST",
            "/db/request",
            r#"["SELECT COUNT(*) AS n FROM foo"]"#,
        )
        .await;
        assert_eq!(v["results"][0]["values"], json!([[2]]));

        // Read-your-writes: min_index ahead of what is applied is refused.
        let (s, _) = call(&app, "GET", "/db/query?q=SELECT%201&min_index=99", "").await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        let (s, _) = call(&app, "GET", "/db/query?q=SELECT%201&min_index=3", "").await;
        assert_eq!(s, StatusCode::OK);
    }

    #[tokio::test]
    async fn bad_requests_are_400_with_a_reason_and_sql_errors_stay_per_statement() {
        let app = app();
        for (uri, body, says) in [
            ("/db/execute", "[1,", "invalid JSON"),
            ("/db/execute", "[]", "empty statement list"),
            (
                "/db/execute",
                r#"[["S", 1, {"a": 1}]]"#,
                "mixed parameter forms",
            ),
            (
                "/db/query?level=eventual",
                r#"["SELECT 1"]"#,
                "level \"eventual\"",
            ),
            ("/db/query?freshness=soon", r#"["SELECT 1"]"#, "freshness"),
            ("/db/query?q=", "", "q is empty"),
            ("/db/query", "", "give the query"),
        ] {
            let (s, v) = call(&app, "POST", uri, body).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{uri} {body}");
            assert!(
                v["error"].as_str().unwrap().contains(says),
                "{uri} {body}: {v}"
            );
        }
        let (s, v) = call(
            &app,
            "POST",
            "/db/execute",
            r#"["INSERT INTO nope VALUES(1)"]"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert!(v["results"][0]["error"]
            .as_str()
            .unwrap()
            .contains("no such table"));
        let (s, _) = call(&app, "DELETE", "/db/execute", "").await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    }

    /// A request forwarded to the leader and lost after it was sent may
    /// have been done there: 504 outcome unknown, never the 503 that
    /// invites a client to send it again; one that never reached the
    /// leader is a 503 (reviewer finding).
    #[tokio::test]
    async fn a_forward_lost_after_sending_is_outcome_unknown() {
        // A "leader" that reads the request and hangs up without a word.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                drop(socket);
            }
        });
        // A port nobody listens on.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let uri: Uri = "/db/execute".parse().unwrap();
        let headers = HeaderMap::new();
        let send = |leader: String| {
            let (uri, headers) = (uri.clone(), headers.clone());
            async move {
                let forward = Forward {
                    leader: &leader,
                    method: Method::POST,
                    uri: &uri,
                    headers: &headers,
                    body: Bytes::from_static(b"[\"INSERT INTO t VALUES (1)\"]"),
                };
                forward.send(&reqwest::Client::new(), false).await
            }
        };
        let lost = send(format!("http://{gone}")).await;
        assert_eq!(lost.status(), StatusCode::GATEWAY_TIMEOUT);
        let body = axum::body::to_bytes(lost.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "outcome_unknown", "{body}");
        let refused = send(format!("http://{closed}")).await;
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    /// `/db/request` asks SQLite which statements read: a mixed list goes
    /// through the log whole and its reads answer with their rows; a
    /// write that begins like a read (`WITH … INSERT`) is a write.
    #[tokio::test]
    async fn the_unified_endpoint_answers_reads_with_rows_even_beside_writes() {
        let app = app();
        call(&app, "POST", "/db/execute", r#"["CREATE TABLE t (x)"]"#).await;
        let (s, v) = call(
            &app,
            "POST",
            "/db/request",
            r#"["SELECT count(*) AS n FROM t", "INSERT INTO t VALUES (7)", "SELECT x FROM t", "WITH w AS (SELECT 8) INSERT INTO t SELECT * FROM w", "  select   max(x) AS m FROM t"]"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let r = &v["results"];
        assert_eq!(r[0]["values"], json!([[0]]), "{v}");
        assert_eq!(r[0]["types"], json!(["integer"]), "{v}");
        assert_eq!(
            r[1],
            json!({"last_insert_id": 1, "rows_affected": 1}),
            "{v}"
        );
        assert_eq!(r[2]["values"], json!([[7]]), "{v}");
        assert_eq!(
            r[3],
            json!({"last_insert_id": 2, "rows_affected": 1}),
            "{v}"
        );
        assert_eq!(r[4]["values"], json!([[8]]), "{v}");
        let (_, v) = call(
            &app,
            "POST",
            "/db/request?associative",
            r#"["WITH w AS (SELECT 9) INSERT INTO t SELECT * FROM w", "SELECT x FROM t ORDER BY x DESC LIMIT 1"]"#,
        )
        .await;
        assert_eq!(v["results"][1]["rows"], json!([{"x": 9}]), "{v}");
    }

    /// Every input the fuzzers saved (seeds and past crashes) in
    /// `fuzz/regressions/TARGET/`, replayed.
    fn replay_db(target: &str, run: fn(&[u8])) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/regressions")
            .join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("the regressions directory") {
            run(&std::fs::read(entry.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n > 0, "no inputs in {}", dir.display());
    }

    #[test]
    fn fuzz_regressions() {
        replay_db("db_request", super::fuzzing::request);
    }
}
