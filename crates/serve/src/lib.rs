//! `scaleout-serve`: serves an axum router the way every scaleout HTTP
//! server must — the web servers and the database nodes alike — with its
//! resources bounded:
//!
//! - a client must send a request head within [`Limits::header_timeout`]
//!   (slowloris: a connection dribbling its head is closed, and so is one
//!   opened and left silent: its first byte must come within the same
//!   bound);
//! - a connection with no traffic either way for [`IDLE`] is closed
//!   (kept-alive HTTP/1 between requests, an HTTP/2 connection that only
//!   sent its preface, a body that stopped half-way), so idle sockets
//!   cannot hold the connection cap;
//! - at most [`Limits::max_connections`] connections at once: one more is
//!   accepted and closed at once (so the kernel's backlog does not fill
//!   with connections nobody will serve), counted and logged;
//! - graceful shutdown: on `shutdown`, no new connections, in-flight
//!   requests finish (up to [`Limits::drain`]), then everything closes.
//!
//! HTTP/1.1 and HTTP/2 (prior knowledge) through hyper-util's `auto`
//! builder, as `axum::serve` does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The bounds of one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time to send a request head (and to start the next one).
    pub header_timeout: Duration,
    /// Connections at once.
    pub max_connections: usize,
    /// How long in-flight requests may take to finish at shutdown.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            drain: Duration::from_secs(30),
        }
    }
}

/// A connection with no bytes either way for this long is closed.
pub const IDLE: Duration = Duration::from_secs(60);

/// A socket that notes when bytes last crossed it (milliseconds since
/// `started`, plus one; 0: never).
struct Watched {
    inner: Option<tokio::net::TcpStream>,
    activity: Arc<AtomicU64>,
    started: tokio::time::Instant,
}

/// How long a closed connection's unread request data is drained, and how
/// much of it, before the socket closes.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024 * 1024;

/// Closing a socket with unread data makes the kernel send a reset, which
/// can reach the client before the answer it was sent (a `413` for a body
/// refused half-way): the client sees a broken pipe instead. Like nginx's
/// lingering close, the rest of what the client sends is read and dropped
/// for a moment before the socket goes.
impl Drop for Watched {
    fn drop(&mut self) {
        let (Some(mut stream), Ok(runtime)) =
            (self.inner.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        runtime.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = stream.shutdown().await;
            let mut buf = vec![0u8; 64 * 1024];
            let mut drained = 0;
            let _ = tokio::time::timeout(LINGER, async {
                while drained < LINGER_BYTES {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => drained += n,
                    }
                }
            })
            .await;
        });
    }
}

impl Watched {
    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64 + 1;
        self.activity.store(ms, Ordering::Relaxed);
    }
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let Some(inner) = self.inner.as_mut() else {
            return std::task::Poll::Ready(Ok(()));
        };
        let polled = std::pin::Pin::new(inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let Some(inner) = self.inner.as_mut() else {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()));
        };
        let polled = std::pin::Pin::new(inner).poll_write(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => std::pin::Pin::new(inner).poll_flush(cx),
            None => std::task::Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => std::pin::Pin::new(inner).poll_shutdown(cx),
            None => std::task::Poll::Ready(Ok(())),
        }
    }
}

/// What a server refused, for its metrics.
#[derive(Debug, Default)]
pub struct Refusals {
    /// Connections closed at once because the server was full.
    pub over_capacity: AtomicU64,
}

/// A connection's stream: plain, or TLS over it.
enum Io {
    Plain(Watched),
    Tls(Box<tokio_rustls::server::TlsStream<Watched>>),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Io::Plain($s) => {
                let $s = std::pin::Pin::new($s);
                $e
            }
            Io::Tls($s) => {
                let $s = std::pin::Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl tokio::io::AsyncRead for Io {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for Io {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// Serves `router` on `listener` until `shutdown`, within `limits`; over
/// TLS when `tls` is given (the handshake, too, must finish within the
/// head timeout).
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    refusals: Arc<Refusals>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, say: wait a moment rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refusals.over_capacity.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, max = limits.max_connections, "connection refused: the server is full");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Handlers may ask who is at the other end (`ConnectInfo`), as with
        // axum's own `into_make_service_with_connect_info`.
        let service = TowerToHyperService::new(tower::ServiceExt::map_request(
            router.clone(),
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                req
            },
        ));
        let builder = builder.clone();
        let activity = Arc::new(AtomicU64::new(0));
        let started = tokio::time::Instant::now();
        let io = Watched {
            inner: Some(stream),
            activity: activity.clone(),
            started,
        };
        let watcher = graceful.watcher();
        let first_byte = limits.header_timeout;
        let tls = tls.clone();
        tokio::spawn(async move {
            let io = match tls {
                None => Io::Plain(io),
                Some(acceptor) => {
                    match tokio::time::timeout(first_byte, acceptor.accept(io)).await {
                        Ok(Ok(stream)) => Io::Tls(Box::new(stream)),
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .into_owned();
            let conn = watcher.watch(conn);
            let idle = async {
                let mut limit = first_byte;
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let last = activity.load(Ordering::Relaxed);
                    // Before the first byte, the head's bound; after, IDLE.
                    if last != 0 {
                        limit = IDLE;
                    }
                    let since = started
                        .elapsed()
                        .saturating_sub(Duration::from_millis(last));
                    if since > limit {
                        return;
                    }
                }
            };
            tokio::select! {
                done = conn => {
                    if let Err(e) = done {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                () = idle => tracing::debug!(%peer, "connection closed: no traffic"),
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(drain = ?limits.drain, "requests still in flight at the end of the drain");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server(limits: Limits) -> (std::net::SocketAddr, Arc<Refusals>, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let refusals = Arc::new(Refusals::default());
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            router,
            limits,
            refusals.clone(),
            None,
            shutdown.clone(),
        ));
        (addr, refusals, shutdown)
    }

    /// A client that dribbles its head is cut at the header timeout, while
    /// another is served.
    #[tokio::test]
    async fn a_slow_head_is_cut_and_others_are_served() {
        let limits = Limits {
            header_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, _, shutdown) = server(limits).await;
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let ok = reqwest::get(format!("http://{addr}/")).await.unwrap();
        assert_eq!(ok.text().await.unwrap(), "ok");
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "the slow connection was closed");
        shutdown.cancel();
    }

    /// A body refused half-way gets its answer, not a broken pipe: the
    /// rest of it is drained before the socket closes.
    #[tokio::test]
    async fn a_refused_body_gets_its_answer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new()
            .route(
                "/",
                axum::routing::post(|_: axum::body::Bytes| async { "ok" }),
            )
            .layer(axum::extract::DefaultBodyLimit::max(1024));
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            router,
            Limits::default(),
            Arc::default(),
            None,
            shutdown.clone(),
        ));
        for _ in 0..5 {
            let r = reqwest::Client::new()
                .post(format!("http://{addr}/"))
                .body(vec![b'x'; 8 * 1024 * 1024])
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 413);
        }
        shutdown.cancel();
    }

    /// A connection that never sends a byte is closed at the head's bound
    /// (it held a slot of the cap for good).
    #[tokio::test]
    async fn a_silent_connection_is_closed() {
        let limits = Limits {
            header_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, _, shutdown) = server(limits).await;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "closed");
        shutdown.cancel();
    }

    /// One connection more than the cap is closed at once, and counted.
    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed() {
        let limits = Limits {
            max_connections: 2,
            ..Limits::default()
        };
        let (addr, refusals, shutdown) = server(limits).await;
        let _a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "closed without an answer");
        assert_eq!(refusals.over_capacity.load(Ordering::Relaxed), 1);
        shutdown.cancel();
    }
}
