//! The HTTP/1.1 fast path for plaintext client connections: request and
//! response heads are parsed with httparse and rewritten byte for byte —
//! no `HeaderMap`, no hyper dispatcher — the way HAProxy and nginx proxy.
//! Bodies pass through with their own framing (chunked stays chunked).
//!
//! What this path does per request, in order: read the head (within the
//! header timeout; 431 past the size limit, 400 when malformed), read the
//! body whole (413 past the limit, 408 below the minimum rate, large
//! ones spooled; `Expect: 100-continue` answered), write
//! the upstream head with hop-by-hop headers dropped and the forwarding
//! headers added, then [`with_retries`] over backends, and finally the
//! response head and body to the client. HTTP/2 (h2c) connections and TLS
//! go through hyper (`proxy.rs`); a `101` upgrade splices the two sockets.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::config::{Algorithm, HashOn};
use crate::error::ProxyError;
use crate::proxy::{self, record_request, with_retries, ConnInfo, HasStatus, InFlight, Worker};
use crate::selection::hash_bytes;
use crate::server::ConnTimes;
use crate::spool::{Bodies, BodyWriter, RequestBody};
use crate::upstream::{self, chunked_step, take_body, Chunk, Framing, RawHead, UpstreamConn};

const MAX_REQUEST_HEADERS: usize = 100;

/// A request body is read at most this much at a time.
const BODY_READ: usize = 16 * 1024;

/// Hop-by-hop request and response headers (RFC 9110 §7.6.1), plus the
/// ones this path always writes itself.
fn is_hop_by_hop(name: &[u8]) -> bool {
    const NAMES: [&[u8]; 7] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ];
    NAMES.iter().any(|n| name.eq_ignore_ascii_case(n))
}

fn named_in(tokens: &[Range<usize>], head: &[u8], name: &[u8]) -> bool {
    tokens
        .iter()
        .any(|t| head[t.clone()].eq_ignore_ascii_case(name))
}

/// A parsed client request head; spans index into `head`.
struct Request {
    head: Bytes,
    method: Method,
    path: Range<usize>,
    http10: bool,
    headers: Vec<(Range<usize>, Range<usize>)>,
    /// Header names listed in `Connection` (hop-by-hop too).
    connection_tokens: Vec<Range<usize>>,
    keep_alive: bool,
    upgrade: bool,
    expect_continue: bool,
    framing: Framing,
    host: Option<Range<usize>>,
    request_id: Option<Range<usize>>,
    idempotency_key: bool,
}

impl Request {
    fn name(&self, i: usize) -> &[u8] {
        &self.head[self.headers[i].0.clone()]
    }

    fn value(&self, i: usize) -> &[u8] {
        &self.head[self.headers[i].1.clone()]
    }

    fn find(&self, name: &[u8]) -> Option<&[u8]> {
        (0..self.headers.len())
            .find(|i| self.name(*i).eq_ignore_ascii_case(name))
            .map(|i| self.value(i))
    }
}

/// Why a client connection must end with an error answer.
struct ClientError {
    status: StatusCode,
    message: String,
}

fn client_error(status: StatusCode, message: impl Into<String>) -> ClientError {
    ClientError {
        status,
        message: message.into(),
    }
}

enum HeadRead {
    Request(Box<Request>),
    /// The client closed (or went quiet at shutdown) between requests.
    Closed,
    Refuse(ClientError),
}

/// Serves one plaintext HTTP/1.x client connection until it closes.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    worker: Arc<Worker>,
    conn: Arc<ConnInfo>,
    mut io: S,
    times: Arc<ConnTimes>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let shared = worker.shared.clone();
    let limits = &shared.config.limits;
    let mut rbuf = BytesMut::with_capacity(8 * 1024);
    let mut wbuf: Vec<u8> = Vec::with_capacity(4 * 1024);
    let mut upstream_head: Vec<u8> = Vec::with_capacity(1024);
    // One wait on the shared token for the connection's life: a wait made
    // per request would lock the token's waiter list twice per request.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    loop {
        times.waiting_for_head();
        let read = tokio::select! {
            biased;
            r = read_head(&mut io, &mut rbuf, limits.max_header_bytes) => r?,
            () = &mut cancelled, if rbuf.is_empty() => return Ok(()),
        };
        times.head_received();
        let req = match read {
            HeadRead::Closed => return Ok(()),
            HeadRead::Refuse(e) => {
                let _ = write_error(&mut io, &mut wbuf, e.status, &e.message, None, true).await;
                linger(&mut io).await;
                return Ok(());
            }
            HeadRead::Request(req) => req,
        };
        let started = Instant::now();
        let request_id = req
            .request_id
            .clone()
            .map_or_else(proxy::new_request_id_bytes, |r| req.head.slice(r));

        // The client's rate, then the body, whole.
        let slot =
            proxy::check_rate(&shared, &conn).and_then(|()| proxy::take_slot(&shared, &conn));
        let (body, _slot) = match slot {
            Err(e) => (Err(e), None),
            Ok(slot) => (
                read_body(&mut io, &mut rbuf, &req, &shared.bodies).await?,
                slot,
            ),
        };
        let body = match body {
            Ok(body) => body,
            Err(e) => {
                let status = e.status();
                let _ = write_error(
                    &mut io,
                    &mut wbuf,
                    status,
                    &e.to_string(),
                    Some(&request_id),
                    true,
                )
                .await;
                record_request(
                    &shared,
                    &conn,
                    status.as_u16(),
                    started,
                    None,
                    0,
                    &request_id,
                );
                linger(&mut io).await;
                return Ok(());
            }
        };

        encode_upstream_head(
            &mut upstream_head,
            &req,
            &body,
            &conn,
            shared.scheme,
            &request_id,
        );
        let key = (shared.config.algorithm == Algorithm::Hash)
            .then(|| hash_key(&shared.config.hash_on, &req, &conn));
        let idempotent = proxy::idempotent_method(&req.method) || req.idempotency_key;
        let head_request = req.method == Method::HEAD;
        let outcome = with_retries(&worker, key, idempotent, |backend| {
            forward(
                &worker,
                &times,
                backend,
                &upstream_head,
                &body,
                head_request,
                idempotent,
            )
        })
        .await;

        let closing = !req.keep_alive || shutdown.is_cancelled();
        let (status, keep) = match outcome.result {
            Err(e) => {
                let status = e.status();
                write_error(
                    &mut io,
                    &mut wbuf,
                    status,
                    &e.to_string(),
                    Some(&request_id),
                    closing,
                )
                .await?;
                (status.as_u16(), !closing)
            }
            Ok(resp) if resp.head.status == StatusCode::SWITCHING_PROTOCOLS && req.upgrade => {
                let status = resp.head.status.as_u16();
                record_request(
                    &shared,
                    &conn,
                    status,
                    started,
                    outcome.backend.as_ref().map(|b| b.name.as_str()),
                    outcome.attempts,
                    &request_id,
                );
                return splice(io, rbuf, wbuf, resp, &request_id).await;
            }
            Ok(resp) => {
                let status = resp.head.status.as_u16();
                let keep = relay(&mut io, &mut wbuf, resp, &req, closing, &request_id).await?;
                (status, keep)
            }
        };
        record_request(
            &shared,
            &conn,
            status,
            started,
            outcome.backend.as_ref().map(|b| b.name.as_str()),
            outcome.attempts,
            &request_id,
        );
        if !keep {
            let _ = io.shutdown().await;
            return Ok(());
        }
    }
}

/// Reads until a whole request head is buffered, then parses it.
async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    rbuf: &mut BytesMut,
    max: usize,
) -> std::io::Result<HeadRead> {
    loop {
        if !rbuf.is_empty() {
            match parse_head(rbuf, max) {
                Ok(Some(req)) => return Ok(HeadRead::Request(Box::new(req))),
                Ok(None) => {}
                Err(e) => return Ok(HeadRead::Refuse(e)),
            }
        }
        rbuf.reserve(8 * 1024);
        if io.read_buf(rbuf).await? == 0 {
            return Ok(HeadRead::Closed);
        }
    }
}

/// `Ok(None)`: not a whole head yet.
fn parse_head(rbuf: &mut BytesMut, max: usize) -> Result<Option<Request>, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(rbuf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            if rbuf.len() >= max {
                return Err(client_error(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    format!("request head is larger than {max} bytes"),
                ));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(client_error(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("more than {MAX_REQUEST_HEADERS} request headers"),
            ))
        }
        Err(e) => {
            return Err(client_error(
                StatusCode::BAD_REQUEST,
                format!("malformed request: {e}"),
            ))
        }
    };
    if len > max {
        return Err(client_error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("request head is larger than {max} bytes"),
        ));
    }
    let whole: &[u8] = rbuf;
    let method = Method::from_bytes(parsed.method.unwrap_or("").as_bytes())
        .map_err(|_| client_error(StatusCode::BAD_REQUEST, "malformed request method"))?;
    let raw_path = parsed.path.unwrap_or("");
    if !raw_path.starts_with('/') {
        // Absolute form and `*` are for proxies and OPTIONS; a reverse
        // proxy wants origin form.
        if !(method == Method::OPTIONS && raw_path == "*") {
            return Err(client_error(
                StatusCode::BAD_REQUEST,
                "request target must be a path (origin form)",
            ));
        }
    }
    let path = upstream::span(whole, raw_path.as_bytes());
    let http10 = parsed.version == Some(0);
    let spans: Vec<_> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                upstream::span(whole, h.name.as_bytes()),
                upstream::span(whole, h.value),
            )
        })
        .collect();
    let head = rbuf.split_to(len).freeze();

    let mut req = Request {
        head,
        method,
        path,
        http10,
        headers: spans,
        connection_tokens: Vec::new(),
        keep_alive: !http10,
        upgrade: false,
        expect_continue: false,
        framing: Framing::Length(0),
        host: None,
        request_id: None,
        idempotency_key: false,
    };
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut seen_request_id = false;
    let mut has_upgrade_header = false;
    let mut connection_upgrade = false;
    for i in 0..req.headers.len() {
        let (n, v) = req.headers[i].clone();
        let (name, value) = (&req.head[n.clone()], &req.head[v.clone()]);
        if name.eq_ignore_ascii_case(b"content-length") {
            // Digits only (RFC 9110 §8.6): no sign, no spaces inside, no
            // list; a value a stricter peer would read otherwise is refused.
            let digits = value.trim_ascii();
            let parsed =
                (!digits.is_empty() && digits.len() <= 19 && digits.iter().all(u8::is_ascii_digit))
                    .then(|| std::str::from_utf8(digits).ok()?.parse::<u64>().ok())
                    .flatten();
            match (parsed, content_length) {
                (None, _) => {
                    return Err(client_error(
                        StatusCode::BAD_REQUEST,
                        "invalid Content-Length",
                    ))
                }
                (Some(a), Some(b)) if a != b => {
                    return Err(client_error(
                        StatusCode::BAD_REQUEST,
                        "conflicting Content-Length headers",
                    ))
                }
                (Some(a), _) => content_length = Some(a),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Exactly one coding, chunked, over all the request's
            // Transfer-Encoding headers: forwarding `gzip, chunked` as
            // chunked would drop a coding; RFC 9112 §6.1 answers 501.
            if chunked || !value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(client_error(
                    StatusCode::NOT_IMPLEMENTED,
                    "only the chunked transfer-coding, alone, is supported",
                ));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    req.keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    req.keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    connection_upgrade = true;
                } else if !token.is_empty() {
                    req.connection_tokens.push(upstream::span(&req.head, token));
                }
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            has_upgrade_header = true;
        } else if name.eq_ignore_ascii_case(b"expect") {
            req.expect_continue = value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case(b"host") {
            if req.host.is_some() {
                return Err(client_error(
                    StatusCode::BAD_REQUEST,
                    "more than one Host header",
                ));
            }
            req.host = Some(v.clone());
        } else if name.eq_ignore_ascii_case(b"x-request-id") {
            // The first one decides, as on the hyper path.
            if !seen_request_id && scaleout_wire::request_id::acceptable(value) {
                req.request_id = Some(v.clone());
            }
            seen_request_id = true;
        } else if name.eq_ignore_ascii_case(b"idempotency-key") {
            req.idempotency_key = true;
        }
    }
    if chunked && content_length.is_some() {
        // Both framings at once: the classic request-smuggling shape.
        return Err(client_error(
            StatusCode::BAD_REQUEST,
            "both Transfer-Encoding and Content-Length",
        ));
    }
    if http10 && req.host.is_none() {
        // HTTP/1.0 without Host: fine, the backend sees none either.
    } else if req.host.is_none() {
        return Err(client_error(StatusCode::BAD_REQUEST, "missing Host header"));
    }
    req.upgrade = !http10 && has_upgrade_header && connection_upgrade;
    req.framing = if chunked {
        Framing::Chunked(Chunk::Size)
    } else {
        Framing::Length(content_length.unwrap_or(0))
    };
    Ok(Some(req))
}

/// Reads the request body whole (into memory or the spool, see
/// [`crate::spool`]), at the minimum rate. The outer error is the
/// connection's; the inner one an answer for the client.
async fn read_body<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    rbuf: &mut BytesMut,
    req: &Request,
    bodies: &Arc<Bodies>,
) -> std::io::Result<Result<RequestBody, ProxyError>> {
    match req.framing {
        Framing::Length(0) | Framing::Close => Ok(Ok(RequestBody::empty())),
        Framing::Length(n) => {
            if n > bodies.max_body {
                return Ok(Err(bodies.too_large()));
            }
            let n = n as usize;
            if rbuf.len() >= n {
                return Ok(BodyWriter::whole(bodies, rbuf.split_to(n).freeze()));
            }
            if req.expect_continue {
                io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
            }
            let mut body = BodyWriter::new(bodies);
            let started = tokio::time::Instant::now();
            loop {
                let take = rbuf.len().min(n - body.len() as usize);
                if let Err(e) = body.push(&rbuf[..take]) {
                    return Ok(Err(e));
                }
                rbuf.advance(take);
                if body.len() as usize == n {
                    return Ok(body.finish());
                }
                if let Err(e) = read_more(io, rbuf, bodies, started, body.len()).await? {
                    return Ok(Err(e));
                }
            }
        }
        Framing::Chunked(mut state) => {
            if req.expect_continue && rbuf.is_empty() {
                io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
            }
            let mut body = BodyWriter::new(bodies);
            let started = tokio::time::Instant::now();
            loop {
                let step = chunked_step(&mut state, rbuf);
                // A chunk announced larger than the limit is refused at
                // once, before a byte of it is read.
                if let Chunk::Data(left) = state {
                    let taken = match &step {
                        Ok(Some(data)) => data.len() as u64,
                        _ => 0,
                    };
                    if body.len() + taken + left > bodies.max_body {
                        return Ok(Err(bodies.too_large()));
                    }
                }
                match step {
                    Ok(Some(data)) => {
                        if let Err(e) = body.push(&data) {
                            return Ok(Err(e));
                        }
                        continue;
                    }
                    Ok(None) if state == Chunk::Done => return Ok(body.finish()),
                    Ok(None) => {}
                    Err(e) => {
                        return Ok(Err(ProxyError::BadRequest(format!(
                            "malformed chunked body: {e}"
                        ))))
                    }
                }
                if let Err(e) = read_more(io, rbuf, bodies, started, body.len()).await? {
                    return Ok(Err(e));
                }
            }
        }
    }
}

/// How long, and how much of, what a client still sends after a refusal
/// is read and dropped before its connection closes.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024 * 1024;

/// A lingering close (nginx's): closing a socket with unread bytes makes
/// the kernel send a reset, which can overtake the refusal just written
/// (a 413, a 429): the client would read a broken pipe instead. The write
/// side is shut, and what the client still sends is drained for a moment.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    let _ = io.shutdown().await;
    let mut buf = vec![0u8; 16 * 1024];
    let mut drained = 0;
    let _ = tokio::time::timeout(LINGER, async {
        while drained < LINGER_BYTES {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// Reads more of a request body into `rbuf`, by the body's deadline.
async fn read_more<S: AsyncRead + Unpin>(
    io: &mut S,
    rbuf: &mut BytesMut,
    bodies: &Bodies,
    started: tokio::time::Instant,
    received: u64,
) -> std::io::Result<Result<(), ProxyError>> {
    rbuf.reserve(BODY_READ);
    let deadline = bodies.deadline(started, received);
    match tokio::time::timeout_at(deadline, io.read_buf(rbuf)).await {
        Err(_) => {
            bodies.too_slow.fetch_add(1, Ordering::Relaxed);
            Ok(Err(ProxyError::BodyTimeout))
        }
        Ok(Ok(0)) => Err(upstream::invalid("client closed inside the request body")),
        Ok(Ok(_)) => Ok(Ok(())),
        Ok(Err(e)) => Err(e),
    }
}

/// The request head as the backend gets it: hop-by-hop headers dropped,
/// forwarding headers added, the body's exact length.
fn encode_upstream_head(
    out: &mut Vec<u8>,
    req: &Request,
    body: &RequestBody,
    conn: &ConnInfo,
    scheme: &str,
    request_id: &Bytes,
) {
    out.clear();
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(&req.head[req.path.clone()]);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut prior_xff: Option<&[u8]> = None;
    let mut prior_forwarded: Option<&[u8]> = None;
    for i in 0..req.headers.len() {
        let (name, value) = (req.name(i), req.value(i));
        if is_hop_by_hop(name) || named_in(&req.connection_tokens, &req.head, name) {
            if req.upgrade && name.eq_ignore_ascii_case(b"upgrade") {
                push_header(out, b"upgrade", value);
            }
            continue;
        }
        // The load balancer says what it saw: a client's own
        // X-Forwarded-Proto or -Host (which would steer the links app's
        // short URLs) is replaced, not passed on.
        // The request id is the one chosen (a client's acceptable
        // one, else a new one), written once below.
        if name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"x-request-id")
            || name.eq_ignore_ascii_case(b"x-forwarded-proto")
            || name.eq_ignore_ascii_case(b"x-forwarded-host")
        {
            continue;
        }
        if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            prior_xff = Some(value);
            continue;
        }
        if name.eq_ignore_ascii_case(b"forwarded") {
            prior_forwarded = Some(value);
            continue;
        }
        push_header(out, name, value);
    }
    if req.upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    push_header(out, b"x-request-id", request_id);
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prior) = prior_xff {
        out.extend_from_slice(prior);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(conn.client_ip.as_bytes());
    out.extend_from_slice(b"\r\nx-forwarded-proto: ");
    out.extend_from_slice(scheme.as_bytes());
    out.extend_from_slice(b"\r\n");
    let host = req.host.clone().map(|h| &req.head[h]);
    if let Some(host) = host {
        push_header(out, b"x-forwarded-host", host);
    }
    out.extend_from_slice(b"forwarded: ");
    if let Some(prior) = prior_forwarded {
        out.extend_from_slice(prior);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(b"for=");
    out.extend_from_slice(conn.forwarded_for.as_bytes());
    out.extend_from_slice(b";proto=");
    out.extend_from_slice(scheme.as_bytes());
    if let Some(host) = host.filter(|h| !h.iter().any(|b| *b == b'"' || *b == b'\\')) {
        out.extend_from_slice(b";host=\"");
        out.extend_from_slice(host);
        out.push(b'"');
    }
    out.extend_from_slice(b"\r\n");
    upstream::push_content_length(out, &req.method, body.len());
    out.extend_from_slice(b"\r\n");
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn hash_key(on: &HashOn, req: &Request, conn: &ConnInfo) -> u64 {
    match on {
        HashOn::ClientIp => hash_bytes(conn.client_ip.as_bytes()),
        HashOn::Header(name) => req.find(name.as_str().as_bytes()).map_or(0, hash_bytes),
        HashOn::Cookie(name) => (0..req.headers.len())
            .filter(|i| req.name(*i).eq_ignore_ascii_case(b"cookie"))
            .find_map(|i| proxy::cookie_value(req.value(i), name))
            .map_or(0, hash_bytes),
    }
}

/// A backend's answer, head read, body still on its connection.
struct Answer {
    head: RawHead,
    conn: UpstreamConn,
    worker: Arc<Worker>,
    backend: Arc<Backend>,
}

impl HasStatus for Answer {
    fn status_code(&self) -> StatusCode {
        self.head.status
    }
}

/// One attempt on one backend. Its response timeout is kept by the
/// connection's watchdog (see `ConnTimes`), not by a timer of its own.
async fn forward(
    worker: &Arc<Worker>,
    times: &ConnTimes,
    backend: Arc<Backend>,
    head: &[u8],
    body: &RequestBody,
    head_request: bool,
    idempotent: bool,
) -> Result<Answer, ProxyError> {
    let timeout = worker.shared.config.timeouts.upstream_response;
    let started = Instant::now();
    backend.in_flight.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight(&backend);
    let mut fresh_tried = false;
    loop {
        let checkout = worker.upstream.checkout(&backend).await?;
        let mut conn = checkout.conn;
        times.waiting_for_upstream();
        let answered = upstream::send_and_read_head(
            &mut conn,
            head,
            body,
            head_request,
            times.upstream_expired(),
        )
        .await;
        times.upstream_answered();
        match answered {
            Ok(raw) => {
                let now = Instant::now();
                let rtt = now - started;
                backend.stats.latency.observe(rtt);
                backend.observe_latency(rtt, now);
                backend.stats.record_status(raw.status.as_u16());
                return Ok(Answer {
                    head: raw,
                    conn,
                    worker: worker.clone(),
                    backend: backend.clone(),
                });
            }
            Err(e) if !fresh_tried && e.worth_a_fresh_connection(checkout.reused, idempotent) => {
                fresh_tried = true
            }
            Err(e) => return Err(e.into_proxy_error(&backend.name, timeout)),
        }
    }
}

/// Writes the answer's head and streams its body to the client. Returns
/// whether the client connection stays open.
async fn relay<S: AsyncWrite + Unpin>(
    io: &mut S,
    wbuf: &mut Vec<u8>,
    answer: Answer,
    req: &Request,
    closing: bool,
    request_id: &Bytes,
) -> std::io::Result<bool> {
    let Answer {
        head,
        mut conn,
        worker,
        backend,
    } = answer;
    let chunked = matches!(head.framing, Framing::Chunked(_));
    // A chunked body to an HTTP/1.0 client is sent decoded, ended by close.
    let dechunk = chunked && req.http10;
    let keep = !closing && head.framing != Framing::Close && !dechunk;
    wbuf.clear();
    wbuf.extend_from_slice(b"HTTP/1.1 ");
    upstream::push_decimal(wbuf, u64::from(head.status.as_u16()));
    wbuf.push(b' ');
    let reason = &head.head[head.reason.clone()];
    if reason.is_empty() {
        wbuf.extend_from_slice(head.status.canonical_reason().unwrap_or("").as_bytes());
    } else {
        wbuf.extend_from_slice(reason);
    }
    wbuf.extend_from_slice(b"\r\n");
    let tokens = connection_tokens(&head);
    for i in 0..head.headers.len() {
        let (name, value) = head.header(i);
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if chunked && !dechunk {
                push_header(wbuf, b"transfer-encoding", b"chunked");
            }
            continue;
        }
        if is_hop_by_hop(name)
            || named_in(&tokens, &head.head, name)
            || name.eq_ignore_ascii_case(b"x-request-id")
        {
            continue;
        }
        if chunked && name.eq_ignore_ascii_case(b"content-length") {
            continue;
        }
        push_header(wbuf, name, value);
    }
    push_header(wbuf, b"x-request-id", request_id);
    if !keep {
        wbuf.extend_from_slice(b"connection: close\r\n");
    } else if req.http10 {
        wbuf.extend_from_slice(b"connection: keep-alive\r\n");
    }
    wbuf.extend_from_slice(b"\r\n");

    // Body: what came with the head goes out with it, in one write.
    let mut framing = head.framing;
    let mut first = true;
    let complete = loop {
        let (chunk, done) = take_body(&mut framing, &mut conn.buf, dechunk)?;
        if first {
            wbuf.extend_from_slice(&chunk);
            io.write_all(wbuf).await?;
            first = false;
        } else if !chunk.is_empty() {
            io.write_all(&chunk).await?;
        }
        if done {
            break true;
        }
        match upstream::fill(&mut conn).await {
            Ok(0) if framing == Framing::Close => break false,
            Ok(0) => {
                return Err(upstream::invalid(
                    "backend closed the connection inside the body",
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(e),
        }
    };
    if complete && head.keep_alive && conn.buf.is_empty() {
        worker.upstream.give_back(backend.id, conn);
    }
    if !keep {
        io.flush().await?;
    }
    Ok(keep)
}

fn connection_tokens(head: &RawHead) -> Vec<Range<usize>> {
    let mut tokens = Vec::new();
    for i in 0..head.headers.len() {
        let (name, value) = head.header(i);
        if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if !token.is_empty() {
                    tokens.push(upstream::span(&head.head, token));
                }
            }
        }
    }
    tokens
}

/// After `101 Switching Protocols`: the head to the client, then bytes
/// both ways until either side closes.
async fn splice<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    mut rbuf: BytesMut,
    mut wbuf: Vec<u8>,
    answer: Answer,
    request_id: &Bytes,
) -> std::io::Result<()> {
    let Answer { head, mut conn, .. } = answer;
    wbuf.clear();
    wbuf.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
    for i in 0..head.headers.len() {
        let (name, value) = head.header(i);
        if name.eq_ignore_ascii_case(b"connection") || name.eq_ignore_ascii_case(b"keep-alive") {
            continue;
        }
        push_header(&mut wbuf, name, value);
    }
    push_header(&mut wbuf, b"x-request-id", request_id);
    wbuf.extend_from_slice(b"connection: upgrade\r\n\r\n");
    wbuf.extend_from_slice(&conn.buf);
    conn.buf.clear();
    io.write_all(&wbuf).await?;
    if !rbuf.is_empty() {
        conn.stream_mut().write_all(&rbuf).await?;
        rbuf.advance(rbuf.len());
    }
    let _ = tokio::io::copy_bidirectional(&mut io, conn.stream_mut()).await;
    Ok(())
}

/// An answer made by the load balancer itself: JSON with an exact length.
async fn write_error<S: AsyncWrite + Unpin>(
    io: &mut S,
    wbuf: &mut Vec<u8>,
    status: StatusCode,
    message: &str,
    request_id: Option<&Bytes>,
    close: bool,
) -> std::io::Result<()> {
    let body = serde_json::json!({ "error": message }).to_string();
    wbuf.clear();
    wbuf.extend_from_slice(b"HTTP/1.1 ");
    upstream::push_decimal(wbuf, u64::from(status.as_u16()));
    wbuf.push(b' ');
    wbuf.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    wbuf.extend_from_slice(b"\r\ncontent-type: application/json\r\n");
    if let Some(id) = request_id {
        push_header(wbuf, b"x-request-id", id);
    }
    if close {
        wbuf.extend_from_slice(b"connection: close\r\n");
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        wbuf.extend_from_slice(b"retry-after: 1\r\n");
    }
    wbuf.extend_from_slice(b"content-length: ");
    upstream::push_decimal(wbuf, body.len() as u64);
    wbuf.extend_from_slice(b"\r\n\r\n");
    wbuf.extend_from_slice(body.as_bytes());
    io.write_all(wbuf).await?;
    io.flush().await
}

/// Entry points for the fuzzers (`fuzz/`) and their regression tests: the
/// request-head parser and the chunked decoder on arbitrary bytes, with
/// the properties they must keep. Panics mean a bug.
#[doc(hidden)]
#[allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // a fuzzing entry point: a panic is the finding
pub mod fuzzing {
    use super::*;

    /// Parses `data` as a request head (fed in two pieces, as a socket
    /// might), then decodes what follows as the body its framing says.
    pub fn request(data: &[u8]) {
        let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
        let mut rbuf = BytesMut::from(&data[..split]);
        let first = parse_head(&mut rbuf, 8192);
        let req = match first {
            Ok(None) => {
                rbuf.extend_from_slice(&data[split..]);
                parse_head(&mut rbuf, 8192)
            }
            other => {
                rbuf.extend_from_slice(&data[split..]);
                other
            }
        };
        let Ok(Some(req)) = req else { return };
        assert!(
            req.head.len() <= data.len(),
            "a head is never longer than its bytes"
        );
        for i in 0..req.headers.len() {
            // Every header range lies inside the head.
            let _ = (req.name(i), req.value(i));
        }
        if let Framing::Chunked(mut state) = req.framing {
            let before = rbuf.len();
            let mut data_bytes = 0usize;
            while let Ok(Some(chunk)) = chunked_step(&mut state, &mut rbuf) {
                data_bytes += chunk.len();
            }
            assert!(data_bytes <= before, "no more body than bytes");
        }
    }

    /// Encodes `data` as a chunked body (chunk sizes from the data itself)
    /// and decodes it a few bytes at a time: the body comes back whole.
    pub fn chunked_round_trip(data: &[u8]) {
        let mut encoded = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let n = (usize::from(rest[0]) % 17 + 1).min(rest.len());
            encoded.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            encoded.extend_from_slice(&rest[..n]);
            encoded.extend_from_slice(b"\r\n");
            rest = &rest[n..];
        }
        encoded.extend_from_slice(b"0\r\n\r\n");
        let step = data.first().map_or(1, |b| usize::from(*b % 7) + 1);
        let mut state = Chunk::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in encoded.chunks(step) {
            buf.extend_from_slice(piece);
            while let Some(chunk) = chunked_step(&mut state, &mut buf).expect("valid chunked") {
                out.extend_from_slice(&chunk);
            }
        }
        assert_eq!(state, Chunk::Done);
        assert_eq!(out, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<Request>, ClientError> {
        let mut buf = BytesMut::from(raw);
        parse_head(&mut buf, 32 * 1024)
    }

    #[test]
    fn parses_heads_and_refuses_bad_ones() {
        let req = parse(b"POST /a?b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nConnection: close, x-hop\r\n\r\nabc").ok().flatten().unwrap();
        assert_eq!(req.method, Method::POST);
        assert_eq!(&req.head[req.path.clone()], b"/a?b");
        assert_eq!(req.framing, Framing::Length(3));
        assert!(!req.keep_alive);
        assert!(named_in(&req.connection_tokens, &req.head, b"X-Hop"));
        assert!(
            parse(b"GET / HTTP/1.1\r\nHost: h\r\n")
                .ok()
                .flatten()
                .is_none(),
            "partial"
        );

        for (raw, status) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], StatusCode::BAD_REQUEST),
            (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", StatusCode::NOT_IMPLEMENTED),
            (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", StatusCode::NOT_IMPLEMENTED),
            (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", StatusCode::NOT_IMPLEMENTED),
            (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +1\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1 1\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1,1\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"GET http://x/ HTTP/1.1\r\nHost: h\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"G\x01T / HTTP/1.1\r\n\r\n", StatusCode::BAD_REQUEST),
        ] {
            let err = parse(raw).err().unwrap_or_else(|| panic!("{:?} accepted", String::from_utf8_lossy(raw)));
            assert_eq!(err.status, status, "{:?}: {}", String::from_utf8_lossy(raw), err.message);
        }
        let big = format!(
            "GET / HTTP/1.1\r\nHost: h\r\nX: {}\r\n\r\n",
            "a".repeat(40_000)
        );
        assert_eq!(
            parse(big.as_bytes()).err().unwrap().status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }

    #[test]
    fn upstream_heads_drop_hop_by_hop_and_add_forwarding() {
        let req = parse(b"GET /x HTTP/1.1\r\nHost: www.test\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nX-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Proto: https\r\nAccept: */*\r\n\r\n").ok().flatten().unwrap();
        let conn = ConnInfo::new("10.0.0.7:1234".parse().unwrap());
        let mut out = Vec::new();
        encode_upstream_head(
            &mut out,
            &req,
            &RequestBody::empty(),
            &conn,
            "http",
            &Bytes::from_static(b"rid"),
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("GET /x HTTP/1.1\r\nHost: www.test\r\nAccept: */*\r\n"),
            "{text}"
        );
        assert!(!text.to_lowercase().contains("x-hop"), "{text}");
        assert!(!text.to_lowercase().contains("keep-alive"), "{text}");
        assert!(text.contains("x-request-id: rid\r\n"));
        assert!(text.contains("x-forwarded-for: 192.0.2.1, 10.0.0.7\r\n"));
        assert!(text.contains("x-forwarded-proto: http\r\n") && !text.contains("https"));
        assert!(text.contains("x-forwarded-host: www.test\r\n"));
        assert!(text.contains("forwarded: for=10.0.0.7;proto=http;host=\"www.test\"\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn chunked_bodies_pass_through_or_decode() {
        let mut framing = Framing::Chunked(Chunk::Size);
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n0\r\n\r\nNEXT"[..]);
        let (out, done) = take_body(&mut framing, &mut buf, false).unwrap();
        assert_eq!(&out[..], b"3\r\nabc\r\n0\r\n\r\n");
        assert!(done);
        assert_eq!(&buf[..], b"NEXT", "the next response is left alone");

        let mut framing = Framing::Chunked(Chunk::Size);
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n2\r"[..]);
        let (out, done) = take_body(&mut framing, &mut buf, true).unwrap();
        assert_eq!(&out[..], b"abc");
        assert!(!done);
        buf.extend_from_slice(b"\nde\r\n0\r\n\r\n");
        let (out, done) = take_body(&mut framing, &mut buf, true).unwrap();
        assert_eq!(&out[..], b"de");
        assert!(done);
    }

    /// Every input the fuzzers saved (seeds and past crashes) in
    /// `fuzz/regressions/TARGET/`, replayed.
    fn replay_lb(target: &str, run: fn(&[u8])) {
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
        replay_lb("lb_request", super::fuzzing::request);
        replay_lb("lb_chunked", super::fuzzing::chunked_round_trip);
    }
}
