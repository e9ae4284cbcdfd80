//! The hyper path: requests that came over TLS or HTTP/2 (h2c), as
//! `http` types. Checked as strictly as the fast path checks bytes, then
//! the same rules ([`crate::rules`]) and the same retry loop
//! ([`crate::worker::with_retries`]); each attempt goes over the lean
//! upstream client ([`crate::upstream`]), an upgrade over hyper's.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::backend::Backend;
use crate::body::LbBody;
use crate::config::Algorithm;
use crate::conn::ConnInfo;
use crate::error::{ErrorAnswer, ProxyError};
use crate::rules::{self, strip_hop_by_hop, Hop};
use crate::spool::{Bodies, BodyWriter, RequestBody};
use crate::upstream::{self, Head, Release};
use crate::worker::{
    check_rate, record_request, take_slot, with_retries, HasStatus, InFlight, Worker,
};

static X_REQUEST_ID: HeaderName = HeaderName::from_static(rules::REQUEST_ID);

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

    let request_id = match rules::client_request_id(&parts.headers) {
        Some(id) => Bytes::copy_from_slice(id),
        None => rules::new_request_id(),
    };
    let finish = |mut resp: Response<LbBody>, backend: Option<Arc<Backend>>, attempts: u32| {
        // A request id is always a valid header value (see `rules`).
        if let Ok(id) = HeaderValue::from_maybe_shared(request_id.clone()) {
            resp.headers_mut().insert(X_REQUEST_ID.clone(), id);
        }
        (resp, backend, attempts)
    };

    if let Err(e) = check_head(&parts).and_then(|()| check_rate(shared, conn)) {
        return finish(LbBody::answer(&ErrorAnswer::from(&e)), None, 0);
    }
    let slot = match take_slot(shared, conn) {
        Ok(slot) => slot,
        Err(e) => return finish(LbBody::answer(&ErrorAnswer::from(&e)), None, 0),
    };
    let body = match read_body(body, &parts.headers, &shared.bodies).await {
        Ok(b) => b,
        Err(e) => return finish(LbBody::answer(&ErrorAnswer::from(&e)), None, 0),
    };
    let key = (shared.config.algorithm == Algorithm::Hash)
        .then(|| rules::hash_key(&shared.config.hash_on, &parts.headers, conn));
    let idempotent = rules::replayable(&parts.method, &parts.headers);
    if let Err(e) = prepare_request(&mut parts, conn, shared.scheme, upgrade, &request_id) {
        return finish(LbBody::answer(&ErrorAnswer::from(&e)), None, 0);
    }
    let outcome = if upgrade {
        let client_upgrade = Arc::new(std::sync::Mutex::new(client_upgrade.take()));
        let parts = &parts;
        let body = &body;
        let Some(body) = body.in_memory() else {
            let e = ProxyError::BadRequest("an upgrade request carries a large body".into());
            return finish(LbBody::answer(&ErrorAnswer::from(&e)), None, 0);
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
            forward(worker, &backend, parts, body, idempotent).await
        })
        .await
    };
    let resp = outcome
        .result
        .unwrap_or_else(|e| LbBody::answer(&ErrorAnswer::from(&e)));
    // The slot lives as long as the answer's body holds the backend's
    // connection.
    let resp = resp.map(|body| body.holding(slot));
    finish(resp, outcome.backend, outcome.attempts)
}

impl HasStatus for Response<LbBody> {
    fn status_code(&self) -> StatusCode {
        self.status()
    }
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

/// Turns the client's request head into the head sent upstream, by the
/// rules: hop-by-hop headers dropped, the forwarding headers written, the
/// target in origin form over HTTP/1.1.
pub(crate) fn prepare_request(
    parts: &mut http::request::Parts,
    conn: &ConnInfo,
    scheme: &'static str,
    upgrade: bool,
    request_id: &[u8],
) -> Result<(), ProxyError> {
    // The Host the client asked for: HTTP/2 carries it in the URI, and an
    // absolute-form target's authority wins over Host (RFC 9112 §3.2.2).
    if !parts.headers.contains_key(header::HOST) || parts.uri.authority().is_some() {
        if let Some(authority) = parts.uri.authority() {
            let host = HeaderValue::from_str(authority.as_str())
                .map_err(|_| ProxyError::BadRequest("invalid authority".into()))?;
            parts.headers.insert(header::HOST, host);
        }
    }
    let mut written: Vec<(&'static str, Bytes)> = Vec::with_capacity(5);
    let mut scratch = Vec::with_capacity(64);
    rules::forwarding(
        &parts.headers,
        &Hop::of(&parts.headers, upgrade),
        conn,
        scheme,
        parts.headers.get(header::HOST).map(HeaderValue::as_bytes),
        request_id,
        &mut scratch,
        |name, value| written.push((name, Bytes::copy_from_slice(value))),
    );
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers, upgrade);
    for (name, _) in &written {
        headers.remove(*name);
    }
    for (name, value) in written {
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| ProxyError::BadRequest(format!("invalid {name} header")))?;
        headers.append(HeaderName::from_static(name), value);
    }

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
    idempotent: bool,
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
        // A body cut off mid-way is the backend's failure, not an empty
        // answer: the client gets a 502 rather than a truncated 200.
        let body = body
            .collect()
            .await
            .map_err(|e| ProxyError::Exchange {
                backend: backend.name.clone(),
                reason: format!("reading the answer's body: {e}"),
            })?
            .to_bytes();
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
