//! Listening and serving: worker threads, each with its own single-threaded
//! tokio runtime, its own listening socket on the same address
//! (SO_REUSEPORT: the kernel spreads connections) and its own upstream pool —
//! the thread layout of nginx and HAProxy, so a request never crosses cores.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::retry::budget::TpsBudget;

use crate::backend::Clock;
use crate::config::LbConfig;
use crate::error::Error;
use crate::proxy::{handle, ConnInfo, Shared, Worker};
use crate::upstream::UpstreamPool;

/// Binds `workers` sockets to `addr` with SO_REUSEPORT (port 0: the first
/// picks a port, the others share it).
pub fn bind_reuseport(
    addr: SocketAddr,
    workers: usize,
) -> Result<Vec<std::net::TcpListener>, Error> {
    let mut out = Vec::with_capacity(workers);
    let mut addr = addr;
    for _ in 0..workers {
        let bind_err = |source: std::io::Error| Error::Bind { addr, source };
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .map_err(bind_err)?;
        socket.set_reuse_address(true).map_err(bind_err)?;
        socket.set_reuse_port(true).map_err(bind_err)?;
        socket.set_nonblocking(true).map_err(bind_err)?;
        socket.set_tcp_nodelay(true).map_err(bind_err)?;
        socket.bind(&addr.into()).map_err(bind_err)?;
        socket.listen(4096).map_err(bind_err)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr().map_err(bind_err)?;
        out.push(listener);
    }
    Ok(out)
}

/// Everything one worker thread needs.
pub struct WorkerSetup {
    pub listener: std::net::TcpListener,
    pub shared: Arc<Shared>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub conn_limit: Arc<Semaphore>,
    pub shutdown: CancellationToken,
    /// How many workers share the load (the retry budget's minimum is split).
    pub workers: usize,
}

/// Runs one worker on the calling thread until shutdown and drain.
pub fn run_worker(setup: WorkerSetup) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(setup))
}

async fn serve(setup: WorkerSetup) -> Result<(), Error> {
    let WorkerSetup {
        listener,
        shared,
        tls,
        conn_limit,
        shutdown,
        workers,
    } = setup;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let config = &shared.config;
    let upstream = UpstreamPool::new(config.limits.max_idle_per_backend, config.timeouts.connect);
    let retry = &config.retry;
    let min_per_sec = retry.min_per_sec.div_ceil(workers.max(1) as u32);
    let budget = TpsBudget::new(Duration::from_secs(10), min_per_sec, retry.budget_ratio);
    let worker = Arc::new(Worker {
        shared: shared.clone(),
        upstream: upstream.clone(),
        budget,
    });
    let builder = Arc::new(http_builder(config));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut housekeeping = tokio::time::interval(Duration::from_secs(10));

    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = conn_limit.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, client) = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = housekeeping.tick() => {
                let pool = shared.pool.snapshot();
                upstream.retain_backends(|id| pool.iter().any(|b| b.id == id));
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        shared
            .stats
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        shared
            .stats
            .connections_open
            .fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(ConnInfo::new(client));
        let worker = worker.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let idle = config.timeouts.idle;
        let header_read = config.timeouts.header_read;
        let watcher = graceful.watcher();
        let stats_shared = shared.clone();
        tokio::spawn(async move {
            let activity = Arc::new(AtomicU64::new(
                stats_shared.clock.millis(std::time::Instant::now()),
            ));
            let io = Tracked {
                inner: tcp,
                activity: activity.clone(),
                clock: stats_shared.clock,
            };
            let service = service_fn(move |req| handle(worker.clone(), conn.clone(), req));
            let served = async {
                match tls {
                    None => {
                        let c = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                        watcher.watch(c.into_owned()).await
                    }
                    Some(acceptor) => {
                        match tokio::time::timeout(header_read, acceptor.accept(io)).await {
                            Ok(Ok(stream)) => {
                                let c = builder
                                    .serve_connection_with_upgrades(TokioIo::new(stream), service);
                                watcher.watch(c.into_owned()).await
                            }
                            Ok(Err(e)) => Err(format!("TLS handshake: {e}").into()),
                            Err(_) => Err("TLS handshake timed out".into()),
                        }
                    }
                }
            };
            tokio::select! {
                result = served => {
                    if let Err(e) = result {
                        tracing::debug!(client = %client, error = %e, "client connection ended with an error");
                    }
                }
                () = idle_watchdog(activity, stats_shared.clock, idle) => {
                    tracing::debug!(client = %client, "client connection idle, closed");
                }
            }
            stats_shared
                .stats
                .connections_open
                .fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drop(listener);
    let drain = config.timeouts.drain;
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain,
            "drain deadline passed; closing the remaining connections"
        );
    }
    Ok(())
}

fn http_builder(config: &LbConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.timeouts.header_read)
        .max_buf_size(config.limits.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(config.limits.max_header_bytes as u32)
        .keep_alive_interval(Some(config.timeouts.idle / 2))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Resolves when no byte has moved on the connection for `idle`.
async fn idle_watchdog(activity: Arc<AtomicU64>, clock: Clock, idle: Duration) {
    let idle_ms = idle.as_millis() as u64;
    let mut wait = idle;
    loop {
        tokio::time::sleep(wait).await;
        let now = clock.millis(std::time::Instant::now());
        let last = activity.load(Ordering::Relaxed);
        let quiet = now.saturating_sub(last);
        if quiet >= idle_ms {
            return;
        }
        wait = Duration::from_millis(idle_ms - quiet);
    }
}

/// A stream that notes when bytes last moved (for the idle timeout).
struct Tracked<T> {
    inner: T,
    activity: Arc<AtomicU64>,
    clock: Clock,
}

impl<T> Tracked<T> {
    fn touch(&self) {
        self.activity.store(
            self.clock.millis(std::time::Instant::now()),
            Ordering::Relaxed,
        );
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
