//! The HTTP/1.1 fast path for plaintext client connections: request and
//! response heads are parsed with httparse and rewritten byte for byte —
//! no `HeaderMap`, no hyper dispatcher — the way HAProxy and nginx proxy.
//! Bodies pass through with their own framing (chunked stays chunked).
//!
//! What this path does per request, in order: read the head (within the
//! header timeout; 431 past the size limit, 400 when malformed), read the
//! body whole (413 past the limit, 408 below the minimum rate, large
//! ones spooled; `Expect: 100-continue` answered), write
//! the upstream head by the proxy rules ([`crate::rules`]: hop-by-hop
//! headers dropped, the forwarding headers added), then [`with_retries`]
//! over backends, and finally the response head and body to the client.
//! Parsing and framing are [`crate::codec`]'s. HTTP/2 (h2c) connections
//! and TLS go through hyper ([`crate::proxy`]); a `101` upgrade splices
//! the two sockets.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::codec::request::{self, RequestHead};
use crate::codec::response::ResponseHead;
use crate::codec::{
    chunked_step, invalid, push_content_length, push_decimal, push_header, take_body, Chunk,
    Framing,
};
use crate::config::Algorithm;
use crate::conn::{ConnInfo, ConnTimes};
use crate::error::{ErrorAnswer, ProxyError};
use crate::rules::{self, Hop};
use crate::spool::{Bodies, BodyWriter, RequestBody};
use crate::upstream::{self, UpstreamConn};
use crate::worker::{
    check_rate, record_request, take_slot, with_retries, HasStatus, InFlight, Worker,
};

/// A request body is read at most this much at a time.
const BODY_READ: usize = 16 * 1024;

enum HeadRead {
    Request(Box<RequestHead>),
    /// The client closed (or went quiet at shutdown) between requests.
    Closed,
    Refuse(ErrorAnswer),
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
    let mut scratch: Vec<u8> = Vec::with_capacity(128);
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
                let _ = write_error(&mut io, &mut wbuf, &e, None, true).await;
                linger(&mut io).await;
                return Ok(());
            }
            HeadRead::Request(req) => req,
        };
        let started = Instant::now();
        let request_id = rules::client_request_id(req.as_ref())
            .map_or_else(rules::new_request_id, |id| req.head.slice_ref(id));

        // The client's rate, then the body, whole.
        let slot = check_rate(&shared, &conn).and_then(|()| take_slot(&shared, &conn));
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
                let answer = ErrorAnswer::from(&e);
                let status = answer.status;
                let _ = write_error(&mut io, &mut wbuf, &answer, Some(&request_id), true).await;
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
            &mut scratch,
        );
        let key = (shared.config.algorithm == Algorithm::Hash)
            .then(|| rules::hash_key(&shared.config.hash_on, req.as_ref(), &conn));
        let idempotent = rules::replayable(&req.method, req.as_ref());
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
                let answer = ErrorAnswer::from(&e);
                write_error(&mut io, &mut wbuf, &answer, Some(&request_id), closing).await?;
                (answer.status.as_u16(), !closing)
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
            match request::parse(rbuf, max) {
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

/// Reads the request body whole (into memory or the spool, see
/// [`crate::spool`]), at the minimum rate. The outer error is the
/// connection's; the inner one an answer for the client.
async fn read_body<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    rbuf: &mut BytesMut,
    req: &RequestHead,
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
        Ok(Ok(0)) => Err(invalid("client closed inside the request body")),
        Ok(Ok(_)) => Ok(Ok(())),
        Ok(Err(e)) => Err(e),
    }
}

/// The request head as the backend gets it, by the rules: hop-by-hop
/// headers dropped, the forwarding headers added, the body's exact length.
pub(crate) fn encode_upstream_head(
    out: &mut Vec<u8>,
    req: &RequestHead,
    body: &RequestBody,
    conn: &ConnInfo,
    scheme: &str,
    request_id: &[u8],
    scratch: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.path());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let hop = Hop::of(req, req.upgrade);
    for i in 0..req.headers.len() {
        let (name, value) = (req.name(i), req.value(i));
        if !hop.drops(name) && !rules::set_by_lb(name) {
            push_header(out, name, value);
        }
    }
    if req.upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    rules::forwarding(
        req,
        &hop,
        conn,
        scheme,
        req.host(),
        request_id,
        scratch,
        |name, value| push_header(out, name.as_bytes(), value),
    );
    push_content_length(out, &req.method, body.len());
    out.extend_from_slice(b"\r\n");
}

/// A backend's answer, head read, body still on its connection.
struct Answer {
    head: ResponseHead,
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
    req: &RequestHead,
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
    push_decimal(wbuf, u64::from(head.status.as_u16()));
    wbuf.push(b' ');
    let reason = &head.head[head.reason.clone()];
    if reason.is_empty() {
        wbuf.extend_from_slice(head.status.canonical_reason().unwrap_or("").as_bytes());
    } else {
        wbuf.extend_from_slice(reason);
    }
    wbuf.extend_from_slice(b"\r\n");
    let hop = Hop::of(&head, false);
    for i in 0..head.headers.len() {
        let (name, value) = head.header(i);
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if chunked && !dechunk {
                push_header(wbuf, b"transfer-encoding", b"chunked");
            }
            continue;
        }
        if hop.drops(name) || rules::replaced_in_answer(name) {
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
            Ok(0) => return Err(invalid("backend closed the connection inside the body")),
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
    let hop = Hop::of(&head, true);
    for i in 0..head.headers.len() {
        let (name, value) = head.header(i);
        if hop.drops(name) || rules::replaced_in_answer(name) {
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

/// The load balancer's own answer ([`ErrorAnswer`]), with an exact length.
async fn write_error<S: AsyncWrite + Unpin>(
    io: &mut S,
    wbuf: &mut Vec<u8>,
    answer: &ErrorAnswer,
    request_id: Option<&Bytes>,
    close: bool,
) -> std::io::Result<()> {
    let body = answer.body();
    wbuf.clear();
    wbuf.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(wbuf, u64::from(answer.status.as_u16()));
    wbuf.push(b' ');
    wbuf.extend_from_slice(answer.status.canonical_reason().unwrap_or("").as_bytes());
    wbuf.extend_from_slice(b"\r\n");
    for (name, value) in answer.headers() {
        push_header(wbuf, name.as_bytes(), value.as_bytes());
    }
    if let Some(id) = request_id {
        push_header(wbuf, rules::REQUEST_ID.as_bytes(), id);
    }
    if close {
        wbuf.extend_from_slice(b"connection: close\r\n");
    }
    wbuf.extend_from_slice(b"content-length: ");
    push_decimal(wbuf, body.len() as u64);
    wbuf.extend_from_slice(b"\r\n\r\n");
    wbuf.extend_from_slice(&body);
    io.write_all(wbuf).await?;
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &[u8]) -> RequestHead {
        let mut buf = BytesMut::from(raw);
        request::parse(&mut buf, 32 * 1024).ok().flatten().unwrap()
    }

    #[test]
    fn upstream_heads_drop_hop_by_hop_and_add_forwarding() {
        let req = head(b"GET /x HTTP/1.1\r\nHost: www.test\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nX-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Proto: https\r\nAccept: */*\r\n\r\n");
        let conn = ConnInfo::new("10.0.0.7:1234".parse().unwrap());
        let mut out = Vec::new();
        encode_upstream_head(
            &mut out,
            &req,
            &RequestBody::empty(),
            &conn,
            "http",
            b"rid",
            &mut Vec::new(),
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
}
