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

use bytes::{Bytes, BytesMut};
use http::header::HeaderMap;
use http::{Method, Response};
use http_body::{Frame, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::backend::Backend;
use crate::codec::response::{self, ResponseHead};
use crate::codec::{invalid, request, take_body, Chunk, Framing};
use crate::error::ProxyError;
use crate::spool::RequestBody;

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
    request::encode(
        &mut encoded,
        head.method,
        head.path,
        head.headers,
        body.len(),
    );
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
) -> Result<ResponseHead, SendError> {
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

pub async fn fill(conn: &mut UpstreamConn) -> std::io::Result<usize> {
    conn.buf.reserve(READ_CHUNK);
    std::future::poll_fn(|cx| {
        tokio_util::io::poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.buf)
    })
    .await
}

async fn read_head(
    conn: &mut UpstreamConn,
    head_request: bool,
) -> Result<ResponseHead, ReadHeadError> {
    let mut got_any = false;
    loop {
        if !conn.buf.is_empty() {
            match response::parse(&mut conn.buf, head_request) {
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(e) => return Err(ReadHeadError::Io(e)),
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
    use http::StatusCode;
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
}
