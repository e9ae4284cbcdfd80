//! The hot path: one client request → a backend → the response, with
//! retries on another backend when that is safe, and the forwarding headers.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tower::retry::budget::{Budget, TpsBudget};

use crate::backend::{Backend, Clock, Pool};
use crate::body::LbBody;
use crate::config::{Algorithm, HashOn, LbConfig};
use crate::error::ProxyError;
use crate::metrics::LbStats;
use crate::selection::{hash_bytes, BackendSelection, Pick};
use crate::spool::{Bodies, BodyWriter, RequestBody};
use crate::upstream::{self, Head, Release, UpstreamPool};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// What every worker shares.
pub struct Shared {
    pub config: LbConfig,
    pub pool: Arc<Pool>,
    pub selection: Box<dyn BackendSelection>,

    pub stats: LbStats,
    pub clock: Clock,
    /// `http` or `https`: what clients used.
    pub scheme: &'static str,
    /// Request bodies held, in memory and in the spool.
    pub bodies: Arc<crate::spool::Bodies>,
    /// Requests per client address, when limited.
    pub rate: Option<RateLimit>,
    /// Requests in flight per client address, when limited.
    pub in_flight: Option<Arc<InFlightPerIp>>,
}

/// How many requests each client address has in flight: each holds a
/// backend connection until its answer is taken, so a client that never
/// reads (an HTTP/2 stream with a zero window) pins one per request.
pub struct InFlightPerIp {
    shards: Vec<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>>,
    max: u32,
}

/// One request's place in its address's count; given back on drop.
pub struct IpSlot {
    table: Arc<InFlightPerIp>,
    ip: std::net::IpAddr,
}

impl InFlightPerIp {
    pub fn new(max: u32) -> Option<Arc<Self>> {
        (max > 0).then(|| {
            Arc::new(InFlightPerIp {
                shards: (0..64).map(|_| Default::default()).collect(),
                max,
            })
        })
    }

    fn shard(
        &self,
        ip: &std::net::IpAddr,
    ) -> &std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>> {
        let h = match ip {
            std::net::IpAddr::V4(v4) => hash_bytes(&v4.octets()),
            std::net::IpAddr::V6(v6) => hash_bytes(&v6.octets()),
        };
        &self.shards[(h % self.shards.len() as u64) as usize]
    }

    /// A slot for `ip`, or `None` when it has `max` in flight already.
    pub fn acquire(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<IpSlot> {
        let mut map = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self
            .table
            .shard(&self.ip)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// A slot for this request's client, or the 429 that refuses it.
pub(crate) fn take_slot(shared: &Shared, conn: &ConnInfo) -> Result<Option<IpSlot>, ProxyError> {
    match &shared.in_flight {
        None => Ok(None),
        Some(table) => match table.acquire(conn.client.ip().to_canonical()) {
            Some(slot) => Ok(Some(slot)),
            None => {
                shared.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                Err(ProxyError::TooManyInFlight)
            }
        },
    }
}

/// A per-client-address request rate (governor's GCRA, keyed).
pub struct RateLimit {
    limiter: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
}

impl RateLimit {
    /// `None` when `per_second` is 0 (no limit).
    pub fn new(per_second: u32, burst: u32) -> Option<Self> {
        let rate = std::num::NonZeroU32::new(per_second)?;
        let burst = std::num::NonZeroU32::new(burst).unwrap_or(rate);
        let quota = governor::Quota::per_second(rate).allow_burst(burst);
        Some(RateLimit {
            limiter: governor::DefaultKeyedRateLimiter::keyed(quota),
        })
    }

    /// Whether `client` may make one more request now.
    pub fn allows(&self, client: std::net::IpAddr) -> bool {
        // Clients not seen for a while are forgotten, so the table stays
        // bounded however many addresses come by.
        if self.limiter.len() > 100_000 {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&client).is_ok()
    }
}

/// The fast path's strictness, for requests that came through hyper
/// (TLS, h2c): exactly one Host (HTTP/1.1), an `h2` host that agrees
/// with `:authority`, no transfer coding but a lone `chunked` (hyper has
/// already dropped a `Content-Length` sent with it, RFC 9112 §6.3). What a
/// stricter peer would read differently is refused rather than forwarded.
fn check_head(parts: &http::request::Parts) -> Result<(), ProxyError> {
    let bad = |m: &str| Err(ProxyError::BadRequest(m.into()));
    let hosts = parts.headers.get_all(header::HOST).iter().count();
    if hosts > 1 {
        return bad("more than one Host header");
    }
    match parts.version {
        Version::HTTP_2 | Version::HTTP_3 => {
            if let (Some(host), Some(authority)) =
                (parts.headers.get(header::HOST), parts.uri.authority())
            {
                if host.as_bytes() != authority.as_str().as_bytes() {
                    return bad("the host header differs from :authority");
                }
            }
        }
        _ => {
            if parts.version == Version::HTTP_11 && hosts == 0 {
                return bad("an HTTP/1.1 request needs a Host header");
            }
            let codings: Vec<&HeaderValue> = parts
                .headers
                .get_all(header::TRANSFER_ENCODING)
                .iter()
                .collect();
            if !codings.is_empty() {
                let lone_chunked = codings.len() == 1
                    && codings[0]
                        .as_bytes()
                        .trim_ascii()
                        .eq_ignore_ascii_case(b"chunked");
                if !lone_chunked {
                    let said = codings
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(ProxyError::UnsupportedCoding(said));
                }
            }
        }
    }
    Ok(())
}

/// Refuses a request past its client's rate.
pub(crate) fn check_rate(shared: &Shared, conn: &ConnInfo) -> Result<(), ProxyError> {
    match &shared.rate {
        Some(rate) if !rate.allows(conn.client.ip().to_canonical()) => {
            shared.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            Err(ProxyError::RateLimited)
        }
        _ => Ok(()),
    }
}

/// One client connection's constant facts, computed once.
pub struct ConnInfo {
    pub client: SocketAddr,
    pub(crate) client_ip: HeaderValue,
    /// The client as a `Forwarded: for=` value (IPv6 quoted and bracketed).
    pub(crate) forwarded_for: String,
}

impl ConnInfo {
    pub fn new(client: SocketAddr) -> Self {
        let ip = client.ip().to_canonical();
        let forwarded_for = if ip.is_ipv6() {
            format!("\"[{ip}]\"")
        } else {
            ip.to_string()
        };
        // An IP address's text is always a valid header value.
        let client_ip =
            HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        ConnInfo {
            client,
            client_ip,
            forwarded_for,
        }
    }
}

/// Per-worker context of the request handler.
pub struct Worker {
    pub shared: Arc<Shared>,
    pub upstream: Arc<UpstreamPool>,
    /// The retry budget (tower's: a share of recent requests plus a
    /// per-second minimum).
    pub budget: TpsBudget,
}

/// At most this many tries per request are tracked (and made).
const MAX_TRIED: usize = 8;

pub async fn handle(
    worker: Arc<Worker>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<LbBody>, std::convert::Infallible> {
    let start = Instant::now();
    let (resp, backend, attempts) = serve(&worker, &conn, req).await;
    let request_id = resp
        .headers()
        .get(&X_REQUEST_ID)
        .map_or(&b"-"[..], |v| v.as_bytes());
    record_request(
        &worker.shared,
        &conn,
        resp.status().as_u16(),
        start,
        backend.as_ref().map(|b| b.name.as_str()),
        attempts,
        request_id,
    );
    Ok(resp)
}

/// Counts and times one answered request, and logs it when asked to.
pub(crate) fn record_request(
    shared: &Shared,
    conn: &ConnInfo,
    status: u16,
    start: Instant,
    backend: Option<&str>,
    attempts: u32,
    request_id: &[u8],
) {
    let elapsed = start.elapsed();
    shared.stats.record_status(status);
    shared.stats.latency.observe(elapsed);
    if shared.config.access_log {
        tracing::info!(
            target: "scaleout_lb::access",
            client = %conn.client,
            status,
            backend = backend.unwrap_or("-"),
            attempts,
            micros = elapsed.as_micros() as u64,
            request_id = %std::str::from_utf8(request_id).unwrap_or("-"),
        );
    }
}

/// Methods RFC 9110 §9.2.2 calls idempotent.
pub(crate) fn idempotent_method(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn is_idempotent(method: &Method, headers: &HeaderMap) -> bool {
    idempotent_method(method) || headers.contains_key(&IDEMPOTENCY_KEY)
}

fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Serves one request; returns the answer, the backend that gave it, and
/// how many backends were tried.
async fn serve(
    worker: &Worker,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
) -> (Response<LbBody>, Option<Arc<Backend>>, u32) {
    let shared = &worker.shared;
    let upgrade = wants_upgrade(&req);
    let mut client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();

    let request_id = match parts.headers.get(&X_REQUEST_ID) {
        Some(id) if scaleout_wire::request_id::acceptable(id.as_bytes()) => id.clone(),
        _ => {
            let id = new_request_id();
            parts.headers.insert(X_REQUEST_ID.clone(), id.clone());
            id
        }
    };
    let finish = |mut resp: Response<LbBody>, backend: Option<Arc<Backend>>, attempts: u32| {
        resp.headers_mut()
            .insert(X_REQUEST_ID.clone(), request_id.clone());
        (resp, backend, attempts)
    };

    if let Err(e) = check_head(&parts).and_then(|()| check_rate(shared, conn)) {
        return finish(e.into_response(), None, 0);
    }
    let slot = match take_slot(shared, conn) {
        Ok(slot) => slot,
        Err(e) => return finish(e.into_response(), None, 0),
    };
    let body = match read_body(body, &parts.headers, &shared.bodies).await {
        Ok(b) => b,
        Err(e) => return finish(e.into_response(), None, 0),
    };
    let key = (shared.config.algorithm == Algorithm::Hash)
        .then(|| hash_key(&shared.config.hash_on, &parts.headers, conn));
    if let Err(e) = prepare_request(&mut parts, conn, shared.scheme, upgrade) {
        return finish(e.into_response(), None, 0);
    }
    let idempotent = is_idempotent(&parts.method, &parts.headers);
    let outcome = if upgrade {
        let client_upgrade = Arc::new(std::sync::Mutex::new(client_upgrade.take()));
        let parts = &parts;
        let body = &body;
        let Some(body) = body.in_memory() else {
            let e = ProxyError::BadRequest("an upgrade request carries a large body".into());
            return finish(e.into_response(), None, 0);
        };
        with_retries(worker, key, idempotent, move |backend| {
            let request = build_request(parts, body.clone());
            let client_upgrade = client_upgrade.clone();
            async move { forward_upgrade(worker, &backend, request, &client_upgrade).await }
        })
        .await
    } else {
        let parts = &parts;
        let body = &body;
        with_retries(worker, key, idempotent, move |backend| async move {
            forward(worker, &backend, parts, body).await
        })
        .await
    };
    let resp = outcome.result.unwrap_or_else(ProxyError::into_response);
    // The slot lives as long as the answer's body holds the backend's
    // connection.
    let resp = resp.map(|body| body.holding(slot));
    finish(resp, outcome.backend, outcome.attempts)
}

/// What a proxied attempt returns, as far as retries care.
pub(crate) trait HasStatus {
    fn status_code(&self) -> StatusCode;
}

impl HasStatus for Response<LbBody> {
    fn status_code(&self) -> StatusCode {
        self.status()
    }
}

/// The end of [`with_retries`]: the answer or the last error, the backend
/// that gave it and how many backends were tried.
pub(crate) struct Outcome<R> {
    pub result: Result<R, ProxyError>,
    pub backend: Option<Arc<Backend>>,
    pub attempts: u32,
}

/// Picks a backend and makes `attempt` on it; on a failure that is safe to
/// retry (see [`ProxyError::retryable`], and 502/503 answers to idempotent
/// requests) and while the retry budget allows, tries another backend.
/// Feeds passive outlier detection with every result.
pub(crate) async fn with_retries<R, F, Fut>(
    worker: &Worker,
    key: Option<u64>,
    idempotent: bool,
    mut attempt: F,
) -> Outcome<R>
where
    R: HasStatus,
    F: FnMut(Arc<Backend>) -> Fut,
    Fut: std::future::Future<Output = Result<R, ProxyError>>,
{
    let shared = &worker.shared;
    worker.budget.deposit();
    let max_attempts = (shared.config.retry.max_attempts as usize).min(MAX_TRIED);
    let mut tried = [0u64; MAX_TRIED];
    let mut n_tried = 0usize;
    let mut last_error: Option<ProxyError> = None;
    loop {
        let now = Instant::now();
        let now_ms = shared.clock.millis(now);
        let chosen = {
            let snapshot = shared.pool.snapshot();
            let already = &tried[..n_tried];
            let usable = |b: &Backend| b.available(now_ms) && !already.contains(&b.id);
            let pick = Pick {
                usable: &usable,
                key,
                now,
            };
            shared.selection.select(&snapshot, &pick).cloned()
        };
        let Some(backend) = chosen else {
            let err = last_error.unwrap_or_else(|| {
                shared.stats.no_backend.fetch_add(1, Ordering::Relaxed);
                ProxyError::NoBackend
            });
            return Outcome {
                result: Err(err),
                backend: None,
                attempts: n_tried as u32,
            };
        };
        tried[n_tried] = backend.id;
        n_tried += 1;
        let retry_allowed = n_tried < max_attempts;
        match attempt(backend.clone()).await {
            Ok(resp) => {
                let status = resp.status_code();
                if status.is_server_error() {
                    record_failure(shared, &backend, now_ms);
                } else {
                    backend.record_success();
                }
                let replayable = matches!(
                    status,
                    StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
                ) && idempotent;
                if replayable && retry_allowed && take_retry(worker) {
                    tracing::debug!(backend = %backend.name, %status, "retrying on another backend");
                    continue;
                }
                return Outcome {
                    result: Ok(resp),
                    backend: Some(backend),
                    attempts: n_tried as u32,
                };
            }
            Err(e) => {
                backend.stats.failures.fetch_add(1, Ordering::Relaxed);
                record_failure(shared, &backend, now_ms);
                tracing::debug!(backend = %backend.name, error = %e, "attempt failed");
                if e.retryable(idempotent) && retry_allowed && take_retry(worker) {
                    last_error = Some(e);
                    continue;
                }
                return Outcome {
                    result: Err(e),
                    backend: Some(backend),
                    attempts: n_tried as u32,
                };
            }
        }
    }
}

fn record_failure(shared: &Shared, backend: &Backend, now_ms: u64) {
    let may_eject = || {
        let pool = shared.pool.snapshot();
        crate::backend::may_eject_one_more(
            &pool,
            shared.config.outlier.max_ejection_percent,
            now_ms,
        )
    };
    if let Some(length) = backend.record_failure(&shared.config.outlier, now_ms, may_eject) {
        tracing::warn!(backend = %backend.name, ejected_for = ?length, "backend ejected (consecutive failures)");
    }
}

fn take_retry(worker: &Worker) -> bool {
    let shared = &worker.shared;
    if worker.budget.withdraw() {
        shared.stats.retries.fetch_add(1, Ordering::Relaxed);
        true
    } else {
        shared.stats.retries_refused.fetch_add(1, Ordering::Relaxed);
        false
    }
}

/// A new request id, as bytes.
pub(crate) fn new_request_id_bytes() -> Bytes {
    Bytes::copy_from_slice(&scaleout_wire::request_id::new())
}

pub(crate) fn new_request_id() -> HeaderValue {
    // 32 hex digits are always a valid header value.
    HeaderValue::from_bytes(&scaleout_wire::request_id::new())
        .unwrap_or(HeaderValue::from_static("-"))
}

/// The request body, whole (in memory or the spool, see [`crate::spool`]),
/// so a request can be replayed; at the minimum rate.
async fn read_body(
    mut body: Incoming,
    headers: &HeaderMap,
    bodies: &Arc<Bodies>,
) -> Result<RequestBody, ProxyError> {
    if body.is_end_stream() {
        return Ok(RequestBody::empty());
    }
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > bodies.max_body {
            return Err(bodies.too_large());
        }
    }
    let mut writer = BodyWriter::new(bodies);
    let started = tokio::time::Instant::now();
    loop {
        let deadline = bodies.deadline(started, writer.len());
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                bodies.too_slow.fetch_add(1, Ordering::Relaxed);
                return Err(ProxyError::BodyTimeout);
            }
            Ok(None) => return writer.finish(),
            Ok(Some(Err(e))) => {
                return Err(ProxyError::BadRequest(format!(
                    "reading the request body failed: {e}"
                )))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            writer.push(&data)?;
        }
    }
}

fn hash_key(on: &HashOn, headers: &HeaderMap, conn: &ConnInfo) -> u64 {
    match on {
        HashOn::ClientIp => hash_bytes(conn.client_ip.as_bytes()),
        HashOn::Header(name) => headers.get(name).map_or(0, |v| hash_bytes(v.as_bytes())),
        HashOn::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .find_map(|v| cookie_value(v.as_bytes(), name))
            .map_or(0, hash_bytes),
    }
}

/// The value of cookie `name` in one `Cookie` header value.
pub(crate) fn cookie_value<'a>(header: &'a [u8], name: &str) -> Option<&'a [u8]> {
    header.split(|b| *b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|b| *b == b'=')?;
        (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
    })
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): those the `Connection`
/// header names, and the fixed list. An upgrade keeps `Upgrade` and gets
/// `Connection: upgrade` back.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            if !(upgrade && name == header::UPGRADE) {
                headers.remove(&name);
            }
        }
        headers.remove(header::CONNECTION);
    }
    for name in [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
    ] {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Turns the client's request head into the head sent upstream.
fn prepare_request(
    parts: &mut http::request::Parts,
    conn: &ConnInfo,
    scheme: &'static str,
    upgrade: bool,
) -> Result<(), ProxyError> {
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers, upgrade);
    // The Host the client asked for: HTTP/2 carries it in the URI, and an
    // absolute-form target's authority wins over Host (RFC 9112 §3.2.2).
    if !headers.contains_key(header::HOST) || parts.uri.authority().is_some() {
        if let Some(authority) = parts.uri.authority() {
            let host = HeaderValue::from_str(authority.as_str())
                .map_err(|_| ProxyError::BadRequest("invalid authority".into()))?;
            headers.insert(header::HOST, host);
        }
    }
    let host = headers.get(header::HOST).cloned();

    match headers.get(&X_FORWARDED_FOR) {
        Some(prior) => {
            let mut v = Vec::with_capacity(prior.len() + 2 + conn.client_ip.len());
            v.extend_from_slice(prior.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(conn.client_ip.as_bytes());
            let joined = HeaderValue::from_bytes(&v)
                .map_err(|_| ProxyError::BadRequest("invalid X-Forwarded-For".into()))?;
            headers.insert(X_FORWARDED_FOR.clone(), joined);
        }
        None => {
            headers.insert(X_FORWARDED_FOR.clone(), conn.client_ip.clone());
        }
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(scheme));
    // What the load balancer saw, never what the client claims.
    headers.remove(&X_FORWARDED_HOST);
    if let Some(host) = &host {
        headers.insert(X_FORWARDED_HOST.clone(), host.clone());
    }
    let mut forwarded = String::with_capacity(64);
    if let Some(prior) = headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        forwarded.push_str(prior);
        forwarded.push_str(", ");
    }
    forwarded.push_str("for=");
    forwarded.push_str(&conn.forwarded_for);
    forwarded.push_str(";proto=");
    forwarded.push_str(scheme);
    if let Some(host) = host.as_ref().and_then(|h| h.to_str().ok()) {
        if !host.contains(['"', '\\']) {
            forwarded.push_str(";host=\"");
            forwarded.push_str(host);
            forwarded.push('"');
        }
    }
    let value = HeaderValue::from_maybe_shared(Bytes::from(forwarded))
        .map_err(|_| ProxyError::BadRequest("invalid Forwarded header".into()))?;
    headers.insert(header::FORWARDED, value);

    // Upstream requests are HTTP/1.1 in origin form.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = Uri::try_from(path)
            .map_err(|_| ProxyError::BadRequest("invalid request target".into()))?;
    }
    parts.version = Version::HTTP_11;
    Ok(())
}

fn build_request(parts: &http::request::Parts, body: Bytes) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = parts.headers.clone();
    req
}

/// One attempt on one backend over a pooled connection.
async fn forward(
    worker: &Worker,
    backend: &Arc<Backend>,
    parts: &http::request::Parts,
    body: &RequestBody,
) -> Result<Response<LbBody>, ProxyError> {
    let shared = &worker.shared;
    let timeout = shared.config.timeouts.upstream_response;
    let started = Instant::now();
    backend.in_flight.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight(backend);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let head = Head {
        method: &parts.method,
        path,
        headers: &parts.headers,
    };
    let idempotent = is_idempotent(&parts.method, &parts.headers);
    // A pooled connection the backend has just closed fails before anything
    // was processed; such a request goes once more on a fresh connection.
    let mut fresh_tried = false;
    loop {
        let checkout = worker.upstream.checkout(backend).await?;
        let release = Release {
            pool: worker.upstream.clone(),
            backend_id: backend.id,
        };
        match upstream::exchange(checkout.conn, &head, body, timeout, release).await {
            Ok(resp) => {
                let now = Instant::now();
                let rtt = now - started;
                backend.stats.latency.observe(rtt);
                backend.observe_latency(rtt, now);
                backend.stats.record_status(resp.status().as_u16());
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers, false);
                return Ok(Response::from_parts(parts, LbBody::Upstream(body)));
            }
            Err(e) if !fresh_tried && e.worth_a_fresh_connection(checkout.reused, idempotent) => {
                fresh_tried = true
            }
            Err(e) => return Err(e.into_proxy_error(&backend.name, timeout)),
        }
    }
}

/// A WebSocket (or other) upgrade: a dedicated connection; after `101` the
/// two upgraded streams are spliced together.
async fn forward_upgrade(
    worker: &Worker,
    backend: &Arc<Backend>,
    request: Request<Full<Bytes>>,
    client_upgrade: &std::sync::Mutex<Option<hyper::upgrade::OnUpgrade>>,
) -> Result<Response<LbBody>, ProxyError> {
    let timeout = worker.shared.config.timeouts.upstream_response;
    let mut sender = worker.upstream.connect_hyper(backend).await?;
    let resp = match tokio::time::timeout(timeout, sender.send_request(request)).await {
        Err(_) => {
            return Err(ProxyError::Timeout {
                backend: backend.name.clone(),
                timeout,
            })
        }
        Ok(Err(e)) => {
            return Err(ProxyError::Exchange {
                backend: backend.name.clone(),
                reason: e.to_string(),
            })
        }
        Ok(Ok(resp)) => resp,
    };
    backend.stats.record_status(resp.status().as_u16());
    let (mut parts, body) = resp.into_parts();
    if parts.status != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(&mut parts.headers, false);
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        return Ok(Response::from_parts(parts, LbBody::full(body)));
    }
    strip_hop_by_hop(&mut parts.headers, true);
    let mut upstream_resp = Response::from_parts(parts.clone(), body);
    let upstream_upgrade = hyper::upgrade::on(&mut upstream_resp);
    let name = backend.name.clone();
    let taken = client_upgrade
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(client_upgrade) = taken {
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client, upstream)) => {
                    let mut client = TokioIo::new(client);
                    let mut upstream = TokioIo::new(upstream);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                    {
                        tracing::debug!(backend = %name, error = %e, "upgraded connection ended");
                    }
                }
                Err(e) => tracing::debug!(backend = %name, error = %e, "upgrade failed"),
            }
        });
    }
    Ok(Response::from_parts(parts, LbBody::empty()))
}

pub(crate) struct InFlight<'a>(pub(crate) &'a Backend);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> ConnInfo {
        ConnInfo::new("10.1.2.3:5555".parse().unwrap())
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn upgrades_keep_upgrade_and_connection() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn forwarding_headers_are_added_and_appended() {
        let (mut parts, ()) = Request::get("http://www.example.test:8080/a?b")
            .body(())
            .unwrap()
            .into_parts();
        parts.version = Version::HTTP_2;
        parts.headers.insert(
            X_FORWARDED_FOR.clone(),
            HeaderValue::from_static("192.0.2.1"),
        );
        prepare_request(&mut parts, &conn(), "https", false).unwrap();
        assert_eq!(parts.uri, "/a?b");
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.headers[header::HOST], "www.example.test:8080");
        assert_eq!(parts.headers[&X_FORWARDED_FOR], "192.0.2.1, 10.1.2.3");
        assert_eq!(parts.headers[&X_FORWARDED_PROTO], "https");
        assert_eq!(parts.headers[&X_FORWARDED_HOST], "www.example.test:8080");
        assert_eq!(
            parts.headers[header::FORWARDED],
            "for=10.1.2.3;proto=https;host=\"www.example.test:8080\""
        );

        let (mut parts, ()) = Request::get("/")
            .header("host", "h")
            .body(())
            .unwrap()
            .into_parts();
        let v6 = ConnInfo::new("[2001:db8::1]:1".parse().unwrap());
        parts.headers.insert(
            header::FORWARDED,
            HeaderValue::from_static("for=192.0.2.60"),
        );
        prepare_request(&mut parts, &v6, "http", false).unwrap();
        assert_eq!(
            parts.headers[header::FORWARDED],
            "for=192.0.2.60, for=\"[2001:db8::1]\";proto=http;host=\"h\""
        );
    }

    #[test]
    fn idempotency_follows_rfc_9110_and_the_key() {
        let none = HeaderMap::new();
        assert!(is_idempotent(&Method::GET, &none));
        assert!(is_idempotent(&Method::PUT, &none));
        assert!(!is_idempotent(&Method::POST, &none));
        assert!(!is_idempotent(&Method::PATCH, &none));
        let mut keyed = HeaderMap::new();
        keyed.insert(IDEMPOTENCY_KEY.clone(), HeaderValue::from_static("k1"));
        assert!(is_idempotent(&Method::POST, &keyed));
    }

    #[test]
    fn hash_keys_come_from_the_chosen_source() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; session=abc; z=2"),
        );
        h.insert("x-user", HeaderValue::from_static("u1"));
        let c = conn();
        assert_eq!(
            hash_key(&HashOn::Cookie("session".into()), &h, &c),
            hash_bytes(b"abc")
        );
        assert_eq!(
            hash_key(&HashOn::Header(HeaderName::from_static("x-user")), &h, &c),
            hash_bytes(b"u1")
        );
        assert_eq!(hash_key(&HashOn::ClientIp, &h, &c), hash_bytes(b"10.1.2.3"));
        assert_eq!(hash_key(&HashOn::Cookie("none".into()), &h, &c), 0);
    }
}
