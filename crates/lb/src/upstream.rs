//! The upstream side of the hot path: a lean HTTP/1.1 client that runs
//! inside the client connection's task, over a pool of idle
//! connections to each backend.
//!
//! Why not hyper's client: its connection lives in a task of its own, so
//! every request crosses two channels and two extra task switches, and its
//! response body is a channel too. Here the request is written with one
//! `write`, the response head is parsed with httparse straight from the
//! read buffer, and a small body that arrived with the head (the common
//! case) is handed on as one `Bytes` while the connection goes back to the
//! pool at once. Larger, chunked or close-delimited bodies stream through
//! [`UpstreamBody`], which gives the connection back when the body ends.
//! Upgrades (WebSocket) still use hyper's client ([`UpstreamPool::connect_hyper`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::backend::Backend;
use crate::error::ProxyError;
use crate::spool::RequestBody;

/// Most response headers accepted from a backend.
const MAX_HEADERS: usize = 128;
/// Largest response head accepted from a backend.
const MAX_HEAD_BYTES: usize = 64 * 1024;
const READ_CHUNK: usize = 16 * 1024;
/// An idle connection older than this is checked for a close before reuse.
const PROBE_AFTER: Duration = Duration::from_millis(250);

/// One keep-alive connection to a backend.
/// A connection to a backend: plain, or TLS over it.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            UpstreamStream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            UpstreamStream::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl tokio::io::AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

pub struct UpstreamConn {
    stream: UpstreamStream,
    /// Bytes read but not yet consumed.
    pub buf: BytesMut,
    /// Request bytes being written (kept to reuse its allocation).
    wbuf: Vec<u8>,
    /// When it last went back to the pool.
    idle_since: Instant,
}

impl UpstreamConn {
    pub fn stream_mut(&mut self) -> &mut UpstreamStream {
        &mut self.stream
    }

    /// Whether the backend has closed (or sent something unasked on) this
    /// idle connection.
    fn is_stale(&self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        // Backends close idle keep-alive connections after seconds, not
        // milliseconds: a connection used just now is not worth a syscall.
        if self.idle_since.elapsed() < PROBE_AFTER {
            return false;
        }
        // A TLS connection's bytes belong to its session (a ticket may
        // arrive unasked): a closed one shows as a failed first exchange,
        // which goes again on a fresh connection.
        let UpstreamStream::Plain(tcp) = &self.stream else {
            return false;
        };
        let mut probe = [0u8; 1];
        !matches!(tcp.try_read(&mut probe), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

pub struct UpstreamPool {
    idle: Mutex<HashMap<u64, Vec<UpstreamConn>>>,
    max_idle: usize,
    connect_timeout: Duration,
    tls: Option<tokio_rustls::TlsConnector>,
}

/// A checked-out connection.
pub struct Checkout {
    pub conn: UpstreamConn,
    /// Taken from the pool rather than just made.
    pub reused: bool,
}

impl UpstreamPool {
    /// `tls`: how `https://` backends are reached.
    pub fn new(
        max_idle: usize,
        connect_timeout: Duration,
        tls: Option<tokio_rustls::TlsConnector>,
    ) -> Arc<Self> {
        Arc::new(UpstreamPool {
            idle: Mutex::new(HashMap::new()),
            max_idle,
            connect_timeout,
            tls,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<UpstreamConn>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection to the backend that is still open, else a new one.
    pub async fn checkout(&self, backend: &Backend) -> Result<Checkout, ProxyError> {
        loop {
            let popped = self.lock().get_mut(&backend.id).and_then(Vec::pop);
            let Some(conn) = popped else { break };
            if !conn.is_stale() {
                return Ok(Checkout { conn, reused: true });
            }
        }
        let stream = self.connect(backend).await?;
        Ok(Checkout {
            conn: UpstreamConn {
                stream,
                buf: BytesMut::with_capacity(READ_CHUNK),
                wbuf: Vec::with_capacity(1024),
                idle_since: Instant::now(),
            },
            reused: false,
        })
    }

    async fn connect_tcp(
        &self,
        backend_name: &str,
        addr: SocketAddr,
    ) -> Result<TcpStream, ProxyError> {
        let fail = |reason: String| ProxyError::Connect {
            backend: backend_name.to_string(),
            reason,
        };
        match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                Ok(tcp)
            }
            Ok(Err(e)) => Err(fail(e.to_string())),
            Err(_) => Err(fail(format!(
                "no connection within {:?}",
                self.connect_timeout
            ))),
        }
    }

    /// A new connection to `backend`: TCP, then TLS for `https://` ones
    /// (the certificate must name the backend's host and chain to the
    /// configured CA).
    pub async fn connect(&self, backend: &Backend) -> Result<UpstreamStream, ProxyError> {
        let tcp = self.connect_tcp(&backend.name, backend.addr).await?;
        if !backend.tls {
            return Ok(UpstreamStream::Plain(tcp));
        }
        let fail = |reason: String| ProxyError::Connect {
            backend: backend.name.clone(),
            reason,
        };
        let connector = self
            .tls
            .as_ref()
            .ok_or_else(|| fail("an https:// backend needs --backend-ca".into()))?;
        let name = rustls::pki_types::ServerName::try_from(backend.host.clone())
            .map_err(|e| fail(format!("{:?} cannot be a TLS name: {e}", backend.host)))?;
        match tokio::time::timeout(self.connect_timeout, connector.connect(name, tcp)).await {
            Ok(Ok(tls)) => Ok(UpstreamStream::Tls(Box::new(tls))),
            Ok(Err(e)) => Err(fail(format!("TLS: {e}"))),
            Err(_) => Err(fail(format!(
                "no TLS handshake within {:?}",
                self.connect_timeout
            ))),
        }
    }

    /// A hyper client connection that stays usable after `101 Switching
    /// Protocols` (for upgrades), outside the pool.
    pub async fn connect_hyper(
        &self,
        backend: &Backend,
    ) -> Result<hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>, ProxyError>
    {
        let stream = self.connect(backend).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProxyError::Connect {
                backend: backend.name.clone(),
                reason: e.to_string(),
            })?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    pub fn give_back(&self, backend_id: u64, mut conn: UpstreamConn) {
        conn.idle_since = Instant::now();
        let mut idle = self.lock();
        let list = idle.entry(backend_id).or_default();
        if list.len() < self.max_idle {
            list.push(conn);
        }
    }

    /// Drops idle connections of backends no longer in the pool.
    pub fn retain_backends(&self, alive: impl Fn(u64) -> bool) {
        self.lock().retain(|id, _| alive(*id));
    }
}

/// How an attempt ended without a response.
pub enum SendError {
    /// Nothing reached the backend in a form it could act on.
    NotSent(std::io::Error),
    /// The request was written; the exchange failed.
    Failed(std::io::Error),
    /// The backend closed a reused connection without a byte of answer: the
    /// keep-alive race; the request may or may not have been seen.
    ClosedUnanswered,
    TimedOut,
}

impl SendError {
    /// Whether the attempt deserves one more go on a fresh connection to
    /// the same backend: a pooled connection the backend had just closed
    /// processed nothing (for a close without any answer, only an
    /// idempotent request may assume so).
    pub fn worth_a_fresh_connection(&self, reused: bool, idempotent: bool) -> bool {
        reused
            && match self {
                SendError::NotSent(_) => true,
                SendError::ClosedUnanswered => idempotent,
                SendError::Failed(_) | SendError::TimedOut => false,
            }
    }

    /// The attempt's failure, as the retry loop and the client see it.
    pub fn into_proxy_error(self, backend: &str, timeout: Duration) -> ProxyError {
        let backend = backend.to_string();
        match self {
            SendError::NotSent(e) => ProxyError::NotSent {
                backend,
                reason: e.to_string(),
            },
            SendError::ClosedUnanswered => ProxyError::Exchange {
                backend,
                reason: "connection closed without a response".into(),
            },
            SendError::Failed(e) => ProxyError::Exchange {
                backend,
                reason: e.to_string(),
            },
            SendError::TimedOut => ProxyError::Timeout { backend, timeout },
        }
    }
}

/// A request head to send: everything but the body.
pub struct Head<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

/// Writes the request and reads the response head. On success the
/// connection travels inside the response body.
pub async fn exchange(
    mut conn: UpstreamConn,
    head: &Head<'_>,
    body: &RequestBody,
    timeout: Duration,
    release: Release,
) -> Result<Response<UpstreamBody>, SendError> {
    let mut encoded = Vec::with_capacity(512);
    encode_request(&mut encoded, head, body);
    let deadline = tokio::time::sleep(timeout);
    let raw = send_and_read_head(
        &mut conn,
        &encoded,
        body,
        head.method == Method::HEAD,
        deadline,
    )
    .await?;
    let (framing, keep_alive) = (raw.framing, raw.keep_alive);
    let parts = raw.into_parts().map_err(SendError::Failed)?;
    let mut body = UpstreamBody {
        conn: Some(conn),
        framing,
        keep_alive,
        release: Some(release),
        done: false,
    };
    body.finish_if_done();
    Ok(Response::from_parts(parts, body))
}

/// Sends an encoded request head and its body, then reads the response
/// head (skipping interim 1xx answers other than 101) until `deadline`.
pub async fn send_and_read_head(
    conn: &mut UpstreamConn,
    request_head: &[u8],
    body: &RequestBody,
    head_request: bool,
    deadline: impl std::future::Future<Output = ()>,
) -> Result<RawHead, SendError> {
    if let Err(e) = write_request(conn, request_head, body).await {
        return Err(SendError::NotSent(e));
    }
    tokio::select! {
        biased;
        read = read_head(conn, head_request) => match read {
            Err(ReadHeadError::Eof) => Err(SendError::ClosedUnanswered),
            Err(ReadHeadError::Io(e)) => Err(SendError::Failed(e)),
            Ok(raw) => Ok(raw),
        },
        () = deadline => Err(SendError::TimedOut),
    }
}

fn encode_request(out: &mut Vec<u8>, head: &Head<'_>, body: &RequestBody) {
    out.clear();
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in head.headers {
        if name == http::header::CONTENT_LENGTH {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    push_content_length(out, head.method, body.len());
    out.extend_from_slice(b"\r\n");
}

/// The body is kept whole, so its length is known; methods that
/// usually carry a body get an explicit 0.
pub fn push_content_length(out: &mut Vec<u8>, method: &Method, len: u64) {
    if len > 0 || matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        out.extend_from_slice(b"content-length: ");
        push_decimal(out, len);
        out.extend_from_slice(b"\r\n");
    }
}

pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

async fn write_request(
    conn: &mut UpstreamConn,
    head: &[u8],
    body: &RequestBody,
) -> std::io::Result<()> {
    body.write_after(&mut conn.stream, head, &mut conn.wbuf)
        .await
}

enum ReadHeadError {
    /// The connection ended before a single byte of response.
    Eof,
    Io(std::io::Error),
}

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked(Chunk),
    /// Until the sender closes the connection.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    Done,
}

pub fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

/// One step of chunked decoding over `buf`: the next piece of data, or
/// `None` when more bytes are needed (or the body is `Done`). Framing
/// bytes are consumed; trailers are dropped.
pub fn chunked_step(state: &mut Chunk, buf: &mut BytesMut) -> std::io::Result<Option<Bytes>> {
    loop {
        match *state {
            Chunk::Done => return Ok(None),
            Chunk::Size => {
                let Some(eol) = find_crlf(buf) else {
                    if buf.len() > 4096 {
                        return Err(invalid("chunk size line too long"));
                    }
                    return Ok(None);
                };
                let size = chunk_size(&buf[..eol])?;
                buf.advance(eol + 2);
                *state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(n) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let take = n.min(buf.len() as u64) as usize;
                *state = if n == take as u64 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(n - take as u64)
                };
                return Ok(Some(buf.split_to(take).freeze()));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(None);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(invalid("missing CRLF after chunk data"));
                }
                buf.advance(2);
                *state = Chunk::Size;
            }
            Chunk::Trailers => {
                let Some(eol) = find_crlf(buf) else {
                    if buf.len() > 16 * 1024 {
                        return Err(invalid("trailers too long"));
                    }
                    return Ok(None);
                };
                buf.advance(eol + 2);
                if eol == 0 {
                    *state = Chunk::Done;
                }
            }
        }
    }
}

/// Walks chunked framing without decoding it: how many leading bytes of
/// `buf` belong to the body (to pass them on as they are). Stops early at a
/// line that has not fully arrived.
pub fn chunked_scan(state: &mut Chunk, buf: &[u8]) -> std::io::Result<usize> {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        match *state {
            Chunk::Done => return Ok(at),
            Chunk::Size | Chunk::Trailers => {
                let Some(eol) = find_crlf(rest) else {
                    if rest.len() > 16 * 1024 {
                        return Err(invalid("chunk line too long"));
                    }
                    return Ok(at);
                };
                if *state == Chunk::Size {
                    let size = chunk_size(&rest[..eol])?;
                    *state = if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    };
                } else if eol == 0 {
                    *state = Chunk::Done;
                }
                at += eol + 2;
            }
            Chunk::Data(n) => {
                if rest.is_empty() {
                    return Ok(at);
                }
                let take = n.min(rest.len() as u64);
                *state = if n == take {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(n - take)
                };
                at += take as usize;
            }
            Chunk::DataEnd => {
                if rest.len() < 2 {
                    return Ok(at);
                }
                if &rest[..2] != b"\r\n" {
                    return Err(invalid("missing CRLF after chunk data"));
                }
                *state = Chunk::Size;
                at += 2;
            }
        }
    }
}

/// The size on a chunk-size line (hex, extensions after `;` ignored).
fn chunk_size(line: &[u8]) -> std::io::Result<u64> {
    let hex = line
        .split(|b| *b == b';')
        .next()
        .unwrap_or(b"")
        .trim_ascii();
    std::str::from_utf8(hex)
        .ok()
        .filter(|h| !h.is_empty() && h.len() <= 15)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| invalid("bad chunk size"))
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

pub async fn fill(conn: &mut UpstreamConn) -> std::io::Result<usize> {
    conn.buf.reserve(READ_CHUNK);
    std::future::poll_fn(|cx| {
        tokio_util::io::poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.buf)
    })
    .await
}

/// A response head as the backend sent it: parsed, not copied. Header
/// names and values are spans of `head`.
pub struct RawHead {
    pub status: StatusCode,
    pub version: Version,
    pub head: Bytes,
    pub reason: std::ops::Range<usize>,
    pub headers: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
    pub framing: Framing,
    /// The backend will keep the connection open after this response.
    pub keep_alive: bool,
}

impl RawHead {
    pub fn header(&self, i: usize) -> (&[u8], &[u8]) {
        let (n, v) = &self.headers[i];
        (&self.head[n.clone()], &self.head[v.clone()])
    }

    /// As `http` types, for the hyper side.
    pub fn into_parts(self) -> std::io::Result<http::response::Parts> {
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        for (n, v) in &self.headers {
            let name = HeaderName::from_bytes(&self.head[n.clone()])
                .map_err(|_| invalid("bad header name"))?;
            let value = HeaderValue::from_maybe_shared(self.head.slice(v.clone()))
                .map_err(|_| invalid("bad header value"))?;
            headers.append(name, value);
        }
        if matches!(self.framing, Framing::Chunked(_)) {
            headers.remove(http::header::CONTENT_LENGTH);
        }
        let mut parts = Response::new(()).into_parts().0;
        parts.status = self.status;
        parts.version = self.version;
        parts.headers = headers;
        Ok(parts)
    }
}

/// Offset of `part` inside `whole` (both from the same buffer).
pub fn span(whole: &[u8], part: &[u8]) -> std::ops::Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(whole.as_ptr() as usize);
    start..start + part.len()
}

async fn read_head(conn: &mut UpstreamConn, head_request: bool) -> Result<RawHead, ReadHeadError> {
    let mut got_any = false;
    loop {
        if !conn.buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&conn.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let code = resp.code.unwrap_or(0);
                    if (100..200).contains(&code) && code != 101 {
                        // Interim response (100 Continue, 103): skip it.
                        conn.buf.advance(len);
                        continue;
                    }
                    let whole: &[u8] = &conn.buf;
                    let spans: Vec<_> = resp
                        .headers
                        .iter()
                        .map(|h| (span(whole, h.name.as_bytes()), span(whole, h.value)))
                        .collect();
                    let reason = match resp.reason {
                        Some(r) => span(whole, r.as_bytes()),
                        None => 0..0,
                    };
                    let version = if resp.version == Some(0) {
                        Version::HTTP_10
                    } else {
                        Version::HTTP_11
                    };
                    let head = conn.buf.split_to(len).freeze();
                    let mut raw = RawHead {
                        status: StatusCode::from_u16(code)
                            .map_err(|_| ReadHeadError::Io(invalid("bad status code")))?,
                        version,
                        head,
                        reason,
                        headers: spans,
                        framing: Framing::Close,
                        keep_alive: false,
                    };
                    let (framing, keep_alive) =
                        response_framing(&raw, head_request).map_err(ReadHeadError::Io)?;
                    raw.framing = framing;
                    raw.keep_alive = keep_alive;
                    return Ok(raw);
                }
                Ok(httparse::Status::Partial) => {
                    if conn.buf.len() > MAX_HEAD_BYTES {
                        return Err(ReadHeadError::Io(invalid("response head too large")));
                    }
                }
                Err(e) => {
                    return Err(ReadHeadError::Io(invalid(&format!(
                        "malformed response head: {e}"
                    ))))
                }
            }
        }
        match fill(conn).await {
            Ok(0) if !got_any => return Err(ReadHeadError::Eof),
            Ok(0) => {
                return Err(ReadHeadError::Io(invalid(
                    "connection closed inside the response head",
                )))
            }
            Ok(_) => got_any = true,
            Err(e) if !got_any && e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(ReadHeadError::Eof)
            }
            Err(e) => return Err(ReadHeadError::Io(e)),
        }
    }
}

/// The body framing and connection persistence a response head says.
fn response_framing(raw: &RawHead, head_request: bool) -> std::io::Result<(Framing, bool)> {
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut keep_alive = raw.version == Version::HTTP_11;
    for i in 0..raw.headers.len() {
        let (name, value) = raw.header(i);
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| invalid("bad content-length"))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(invalid("conflicting content-length"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = value
                .split(|b| *b == b',')
                .next_back()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    let status = raw.status;
    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    Ok(if no_body {
        (Framing::Length(0), keep_alive)
    } else if chunked {
        (Framing::Chunked(Chunk::Size), keep_alive)
    } else if let Some(n) = content_length {
        (Framing::Length(n), keep_alive)
    } else {
        (Framing::Close, false)
    })
}

/// Where a connection goes when its response body has ended.
pub struct Release {
    pub pool: Arc<UpstreamPool>,
    pub backend_id: u64,
}

/// A backend's response body, read from its connection as the client
/// takes it.
pub struct UpstreamBody {
    conn: Option<UpstreamConn>,
    framing: Framing,
    keep_alive: bool,
    release: Option<Release>,
    done: bool,
}

impl UpstreamBody {
    /// Once the body has been read to its end, the connection serves the
    /// next request (when the backend keeps it alive).
    fn finish_if_done(&mut self) {
        let complete = matches!(
            self.framing,
            Framing::Length(0) | Framing::Chunked(Chunk::Done)
        );
        if !complete || self.done {
            return;
        }
        self.done = true;
        if let (Some(conn), Some(release)) = (self.conn.take(), self.release.take()) {
            if self.keep_alive && conn.buf.is_empty() {
                release.pool.give_back(release.backend_id, conn);
            }
        }
    }

    /// Takes what the framing allows out of the buffer, if anything.
    fn next_data(&mut self) -> std::io::Result<Option<Bytes>> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let (data, _) = take_body(&mut self.framing, &mut conn.buf, true)?;
        Ok((!data.is_empty()).then_some(data))
    }
}

/// The next piece of body in `buf` as the client gets it, and whether the
/// body is complete. `dechunk`: chunked framing is decoded (for hyper, or an
/// HTTP/1.0 client) rather than passed through as it is.
pub fn take_body(
    framing: &mut Framing,
    buf: &mut BytesMut,
    dechunk: bool,
) -> std::io::Result<(Bytes, bool)> {
    match framing {
        Framing::Length(n) => {
            let take = (*n).min(buf.len() as u64) as usize;
            *n -= take as u64;
            Ok((buf.split_to(take).freeze(), *n == 0))
        }
        Framing::Chunked(state) if dechunk => {
            let mut out = BytesMut::new();
            while let Some(data) = chunked_step(state, buf)? {
                out.extend_from_slice(&data);
            }
            Ok((out.freeze(), *state == Chunk::Done))
        }
        Framing::Chunked(state) => {
            let n = chunked_scan(state, buf)?;
            Ok((buf.split_to(n).freeze(), *state == Chunk::Done))
        }
        Framing::Close => Ok((buf.split().freeze(), false)),
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        loop {
            let data = match this.next_data() {
                Ok(d) => d,
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            };
            this.finish_if_done();
            if let Some(data) = data {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            conn.buf.reserve(READ_CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Ok(0)) => {
                    this.conn = None;
                    if this.framing == Framing::Close {
                        this.done = true;
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(invalid(
                        "backend closed the connection inside the body",
                    ))));
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A backend that answers each request with the next canned response.
    async fn canned(responses: Vec<&'static [u8]>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            for r in responses {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await.unwrap();
                s.write_all(r).await.unwrap();
            }
        });
        addr
    }

    async fn get(
        pool: &Arc<UpstreamPool>,
        addr: SocketAddr,
        method: &Method,
    ) -> (Response<UpstreamBody>, bool) {
        let backend = Backend::new(
            1,
            &crate::config::BackendConfig::new(format!("http://{addr}")),
            addr,
        )
        .unwrap();
        let co = pool.checkout(&backend).await.unwrap();
        let headers = HeaderMap::new();
        let head = Head {
            method,
            path: "/",
            headers: &headers,
        };
        let release = Release {
            pool: pool.clone(),
            backend_id: 1,
        };
        let resp = exchange(
            co.conn,
            &head,
            &RequestBody::empty(),
            Duration::from_secs(5),
            release,
        )
        .await
        .ok()
        .unwrap();
        (resp, co.reused)
    }

    #[tokio::test]
    async fn reads_length_chunked_and_bodyless_responses_over_one_connection() {
        let addr = canned(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nT: x\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
        ])
        .await;
        let pool = UpstreamPool::new(8, Duration::from_secs(1), None);
        let (resp, reused) = get(&pool, addr, &Method::GET).await;
        assert!(!reused);
        assert_eq!(resp.headers()["x-a"], "1");
        assert_eq!(
            resp.into_body().collect().await.unwrap().to_bytes(),
            "hello"
        );
        let (resp, reused) = get(&pool, addr, &Method::GET).await;
        assert!(reused, "the connection went back to the pool");
        assert!(!resp.headers().contains_key("content-length"));
        assert_eq!(
            resp.into_body().collect().await.unwrap().to_bytes(),
            "abcde"
        );
        let (resp, reused) = get(&pool, addr, &Method::GET).await;
        assert!(reused);
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert!(resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty());
        let (resp, reused) = get(&pool, addr, &Method::HEAD).await;
        assert!(reused);
        assert!(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .is_empty(),
            "HEAD has no body"
        );
    }

    #[tokio::test]
    async fn close_delimited_bodies_end_with_the_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.0 200 OK\r\n\r\nuntil close")
                .await
                .unwrap();
        });
        let pool = UpstreamPool::new(8, Duration::from_secs(1), None);
        let (resp, _) = get(&pool, addr, &Method::GET).await;
        assert_eq!(
            resp.into_body().collect().await.unwrap().to_bytes(),
            "until close"
        );
        assert!(
            pool.lock().get(&1).is_none_or(Vec::is_empty),
            "not reusable"
        );
    }

    #[test]
    fn requests_are_encoded_with_an_exact_length() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("h"));
        headers.insert("content-length", HeaderValue::from_static("999"));
        let mut out = Vec::new();
        let bodies = Arc::new(crate::spool::Bodies::new(
            &crate::config::Limits::default(),
            &crate::config::Timeouts::default(),
        ));
        let abc = crate::spool::BodyWriter::whole(&bodies, Bytes::from_static(b"abc")).unwrap();
        encode_request(
            &mut out,
            &Head {
                method: &Method::POST,
                path: "/p?q",
                headers: &headers,
            },
            &abc,
        );
        assert_eq!(
            out,
            b"POST /p?q HTTP/1.1\r\nhost: h\r\ncontent-length: 3\r\n\r\n"
        );
        let mut n = Vec::new();
        push_decimal(&mut n, 1234567);
        push_decimal(&mut n, 0);
        assert_eq!(n, b"12345670");
    }
}
