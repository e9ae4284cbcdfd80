//! The upstream connection pool of one worker: idle HTTP/1.1 connections to
//! each backend, reused LIFO (the warmest first). A connection goes back to
//! the pool when its response body has been read to the end ([`Returner`],
//! driven by `LbBody`); a connection whose response was abandoned is closed.
//! Each worker has its own pool, so the hot path takes only uncontended locks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::error::ProxyError;

pub type Sender = SendRequest<Full<Bytes>>;

pub struct UpstreamPool {
    idle: Mutex<HashMap<u64, Vec<Sender>>>,
    max_idle: usize,
    connect_timeout: Duration,
}

/// A checked-out connection.
pub struct Checkout {
    pub sender: Sender,
    /// Taken from the pool (it may have gone stale) rather than just made.
    pub reused: bool,
}

impl UpstreamPool {
    pub fn new(max_idle: usize, connect_timeout: Duration) -> Arc<Self> {
        Arc::new(UpstreamPool {
            idle: Mutex::new(HashMap::new()),
            max_idle,
            connect_timeout,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<Sender>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection to the backend if one is usable, else a new one.
    pub async fn checkout(
        &self,
        backend_id: u64,
        backend_name: &str,
        addr: SocketAddr,
    ) -> Result<Checkout, ProxyError> {
        loop {
            let popped = self.lock().get_mut(&backend_id).and_then(Vec::pop);
            let Some(mut sender) = popped else { break };
            if sender.is_closed() {
                continue;
            }
            if sender.is_ready() {
                return Ok(Checkout {
                    sender,
                    reused: true,
                });
            }
            // Given back as its response body ended; the connection task has
            // not yet seen the end. It will at its next turn.
            if let Ok(Ok(())) = tokio::time::timeout(self.connect_timeout, sender.ready()).await {
                return Ok(Checkout {
                    sender,
                    reused: true,
                });
            }
        }
        let sender = self.connect(backend_name, addr, false).await?;
        Ok(Checkout {
            sender,
            reused: false,
        })
    }

    /// A new connection, outside the pool; `upgrades` keeps it usable after
    /// a `101 Switching Protocols`.
    pub async fn connect(
        &self,
        backend_name: &str,
        addr: SocketAddr,
        upgrades: bool,
    ) -> Result<Sender, ProxyError> {
        let fail = |reason: String| ProxyError::Connect {
            backend: backend_name.to_string(),
            reason,
        };
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Err(_) => {
                return Err(fail(format!(
                    "no connection within {:?}",
                    self.connect_timeout
                )))
            }
        };
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| fail(e.to_string()))?;
        if upgrades {
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
        } else {
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
        Ok(sender)
    }

    pub fn give_back(&self, backend_id: u64, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        let list = idle.entry(backend_id).or_default();
        if list.len() < self.max_idle {
            list.push(sender);
        }
    }

    /// Drops idle connections of backends no longer in the pool.
    pub fn retain_backends(&self, alive: impl Fn(u64) -> bool) {
        self.lock().retain(|id, _| alive(*id));
    }

    pub fn idle_count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }
}

/// Gives a connection back to its pool once the response body has ended.
pub struct Returner {
    pool: Arc<UpstreamPool>,
    backend_id: u64,
    sender: Sender,
}

impl Returner {
    pub fn new(pool: Arc<UpstreamPool>, backend_id: u64, sender: Sender) -> Self {
        Returner {
            pool,
            backend_id,
            sender,
        }
    }

    pub fn give_back(self) {
        self.pool.give_back(self.backend_id, self.sender);
    }
}
