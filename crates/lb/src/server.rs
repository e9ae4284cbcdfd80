//! Listening and serving: one accept loop, each client connection a task
//! on the (multi-threaded, work-stealing) tokio runtime the load balancer
//! runs on. Measured here against one single-threaded runtime per core
//! (nginx's layout): equal throughput, but work stealing keeps the tail
//! short when a core is busy with something else — a worker that loses its
//! CPU no longer stalls every connection it owns.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::LbConfig;
use crate::conn::{watchdog, ConnInfo, ConnTimes, Tracked, COARSE_TICK};
use crate::error::Error;
use crate::proxy::handle;
use crate::worker::Worker;

/// Binds the client listener (with a long backlog).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
    let bind_err = |source: std::io::Error| Error::Bind { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(bind_err)?;
    socket.set_reuse_address(true).map_err(bind_err)?;
    socket.set_nonblocking(true).map_err(bind_err)?;
    socket.set_tcp_nodelay(true).map_err(bind_err)?;
    socket.bind(&addr.into()).map_err(bind_err)?;
    socket.listen(4096).map_err(bind_err)?;
    Ok(socket.into())
}

/// The connection-serving state.
struct Serving {
    worker: Arc<Worker>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    graceful: hyper_util::server::graceful::GracefulShutdown,
    /// Coarse time (Clock millis), refreshed by a ticker: what the idle
    /// timeout reads, so the I/O path never asks the OS for the time.
    coarse_now: Arc<AtomicU64>,
    shutdown: CancellationToken,
    /// Every connection task, so a drain can wait for them all.
    tracker: tokio_util::task::TaskTracker,
}

/// Accepts and serves client connections until `shutdown`, then stops
/// accepting and drains.
pub async fn serve(
    listener: std::net::TcpListener,
    worker: Arc<Worker>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let shared = worker.shared.clone();
    let config = &shared.config;
    let conn_limit = Arc::new(Semaphore::new(config.limits.max_connections));
    let coarse_now = Arc::new(AtomicU64::new(shared.clock.millis(Instant::now())));
    let serving = Serving {
        worker: worker.clone(),
        builder: Arc::new(http_builder(config)),
        tls,
        graceful: hyper_util::server::graceful::GracefulShutdown::new(),
        coarse_now: coarse_now.clone(),
        shutdown: shutdown.clone(),
        tracker: tokio_util::task::TaskTracker::new(),
    };
    let mut housekeeping = tokio::time::interval(Duration::from_secs(10));
    let mut ticker = tokio::time::interval(COARSE_TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = conn_limit.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, client) = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return drain(serving, config.timeouts.drain).await,
                _ = ticker.tick() => coarse_now.store(shared.clock.millis(Instant::now()), Ordering::Relaxed),
                _ = housekeeping.tick() => {
                    let pool = shared.pool.snapshot();
                    worker.upstream.retain_backends(|id| pool.iter().any(|b| b.id == id));
                }
                accepted = listener.accept() => match accepted {
                    Ok(a) => break a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        };
        shared
            .stats
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        serving.spawn(tcp, client, permit);
    }
    drain(serving, config.timeouts.drain).await
}

/// Stops accepting and waits (up to `deadline`) for open connections to
/// finish their in-flight requests.
async fn drain(serving: Serving, deadline: Duration) -> Result<(), Error> {
    serving.tracker.close();
    let all_done = async {
        serving.graceful.shutdown().await;
        serving.tracker.wait().await;
    };
    if tokio::time::timeout(deadline, all_done).await.is_err() {
        tracing::warn!(
            ?deadline,
            "drain deadline passed; closing the remaining connections"
        );
    }
    Ok(())
}

impl Serving {
    fn spawn(&self, tcp: tokio::net::TcpStream, client: SocketAddr, permit: OwnedSemaphorePermit) {
        let _ = tcp.set_nodelay(true);
        let shared = self.worker.shared.clone();
        shared
            .stats
            .connections_open
            .fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(ConnInfo::new(client));
        let worker = self.worker.clone();
        let builder = self.builder.clone();
        let tls = self.tls.clone();
        let idle = shared.config.timeouts.idle;
        let header_read = shared.config.timeouts.header_read;
        let upstream_timeout = shared.config.timeouts.upstream_response;
        let watcher = self.graceful.watcher();
        let coarse_now = self.coarse_now.clone();
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            let times = Arc::new(ConnTimes::new(coarse_now));
            let io = Tracked::new(tcp, times.clone());
            let served = async {
                match tls {
                    None => {
                        // HTTP/2 with prior knowledge goes to hyper; HTTP/1 takes the fast path.
                        match tokio::time::timeout(header_read, starts_with_h2_preface(io.inner())).await {
                            Ok(Ok(true)) => {
                                let service = service_fn(move |req| handle(worker.clone(), conn.clone(), req));
                                let c = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                                watcher.watch(c.into_owned()).await
                            }
                            Ok(Ok(false)) => {
                                crate::fast::serve(worker, conn, io, times.clone(), shutdown).await.map_err(Into::into)
                            }
                            Ok(Err(e)) => Err(e.into()),
                            Err(_) => Err("no request within the header timeout".into()),
                        }
                    }
                    Some(acceptor) => match tokio::time::timeout(header_read, acceptor.accept(io)).await {
                        Ok(Ok(stream)) => {
                            let service = service_fn(move |req| handle(worker.clone(), conn.clone(), req));
                            let c = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                            watcher.watch(c.into_owned()).await
                        }
                        Ok(Err(e)) => Err(format!("TLS handshake: {e}").into()),
                        Err(_) => Err("TLS handshake timed out".into()),
                    },
                }
            };
            tokio::select! {
                result = served => {
                    if let Err(e) = result {
                        tracing::debug!(client = %client, error = %e, "client connection ended with an error");
                    }
                }
                why = watchdog(&times, idle, header_read, upstream_timeout) => {
                    tracing::debug!(client = %client, why, "client connection closed");
                }
            }
            shared
                .stats
                .connections_open
                .fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
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
        // What one connection may make the load balancer hold: its streams,
        // and what each may send ahead of being read (bodies read are
        // bounded by the spool's rules).
        .max_concurrent_streams(config.limits.h2_max_streams)
        .initial_stream_window_size(config.limits.h2_stream_window)
        .initial_connection_window_size(config.limits.h2_connection_window)
        .max_send_buf_size(256 * 1024)
        .max_pending_accept_reset_streams(Some(64))
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Some(config.timeouts.idle / 2))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Whether the client opens with the HTTP/2 connection preface (h2c with
/// prior knowledge). Peeks, so the bytes stay for whoever serves it.
async fn starts_with_h2_preface(tcp: &tokio::net::TcpStream) -> std::io::Result<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";
    let mut buf = [0u8; 16];
    loop {
        tcp.readable().await?;
        let n = match tcp.peek(&mut buf).await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(false);
        }
        if buf[..n] != PREFACE[..n] {
            return Ok(false);
        }
        if n == PREFACE.len() {
            return Ok(true);
        }
        // A prefix of the preface: wait for more bytes.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
