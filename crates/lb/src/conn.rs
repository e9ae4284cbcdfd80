//! One client connection: its constant facts ([`ConnInfo`]), and its
//! clocks ([`ConnTimes`]) with the watchdog that keeps the idle, header and
//! upstream-response timeouts without a timer per request.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How often the coarse clock the connections read is refreshed.
pub(crate) const COARSE_TICK: Duration = Duration::from_millis(100);

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

/// A client connection's clocks, read by its watchdog: when bytes last
/// moved, and since when the fast path has been waiting for a request head.
/// All in coarse `Clock` millis, so the I/O path never asks the OS for the
/// time and a request costs no timer of its own.
pub struct ConnTimes {
    now: Arc<AtomicU64>,
    activity: AtomicU64,
    /// 0 while not waiting for a head.
    head_since: AtomicU64,
    /// 0 while not waiting for a backend's response head.
    upstream_since: AtomicU64,
    /// Woken by the watchdog when the backend took too long.
    upstream_late: tokio::sync::Notify,
}

impl ConnTimes {
    pub(crate) fn new(now: Arc<AtomicU64>) -> Self {
        let at = now.load(Ordering::Relaxed);
        ConnTimes {
            now,
            activity: AtomicU64::new(at),
            head_since: AtomicU64::new(0),
            upstream_since: AtomicU64::new(0),
            upstream_late: tokio::sync::Notify::new(),
        }
    }

    fn touch(&self) {
        self.activity
            .store(self.now.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// The header timeout starts (between requests, it is also the
    /// keep-alive timeout, as in hyper).
    pub fn waiting_for_head(&self) {
        self.head_since
            .store(self.now.load(Ordering::Relaxed).max(1), Ordering::Relaxed);
    }

    pub fn head_received(&self) {
        self.head_since.store(0, Ordering::Relaxed);
    }

    /// The upstream response timeout starts.
    pub fn waiting_for_upstream(&self) {
        self.upstream_since
            .store(self.now.load(Ordering::Relaxed).max(1), Ordering::Relaxed);
    }

    pub fn upstream_answered(&self) {
        self.upstream_since.store(0, Ordering::Relaxed);
    }

    /// Resolves when the watchdog finds the backend late.
    pub async fn upstream_expired(&self) {
        self.upstream_late.notified().await;
    }
}

/// Resolves when the connection has been quiet for `idle`, or has waited
/// `header` for a request head; wakes the fast path when a backend has
/// taken `upstream` to answer. Checks at least every quarter of the
/// shortest timeout, so each fires within that much of its setting.
pub(crate) async fn watchdog(
    times: &ConnTimes,
    idle: Duration,
    header: Duration,
    upstream: Duration,
) -> &'static str {
    let ms = |d: Duration| d.as_millis() as u64;
    let (idle_ms, header_ms, upstream_ms) = (ms(idle), ms(header), ms(upstream));
    let check_every = (idle_ms.min(header_ms).min(upstream_ms) / 4).max(ms(COARSE_TICK));
    let mut wait = check_every;
    loop {
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let now = times.now.load(Ordering::Relaxed);
        let quiet = now.saturating_sub(times.activity.load(Ordering::Relaxed));
        let since_upstream = times.upstream_since.load(Ordering::Relaxed);
        if quiet >= idle_ms && since_upstream == 0 {
            return "idle";
        }
        let since_head = times.head_since.load(Ordering::Relaxed);
        if since_head != 0 && now.saturating_sub(since_head) >= header_ms {
            return "no request head within the header timeout";
        }
        if since_upstream != 0 && now.saturating_sub(since_upstream) >= upstream_ms {
            // The fast path answers 504 (or retries); checked again next tick
            // in case it was not listening yet.
            times.upstream_late.notify_waiters();
        }
        wait = check_every;
    }
}

/// A stream that notes when bytes last moved (for the idle timeout).
pub(crate) struct Tracked<T> {
    inner: T,
    times: Arc<ConnTimes>,
}

impl<T> Tracked<T> {
    pub(crate) fn new(inner: T, times: Arc<ConnTimes>) -> Self {
        Tracked { inner, times }
    }

    pub(crate) fn inner(&self) -> &T {
        &self.inner
    }

    fn touch(&self) {
        self.times.touch();
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
