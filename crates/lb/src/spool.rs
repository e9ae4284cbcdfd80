//! Request bodies, bounded: kept whole so a request can be replayed on
//! another backend, but never more than a small buffer of each in memory.
//! A body past `body_buffer_bytes` — or any body once the load balancer's
//! in-memory total reaches `max_body_memory` — goes to an unnamed file in
//! the spool directory (as nginx's `client_body_temp_path`), itself bounded
//! by `max_spool_bytes`. A body must also keep arriving: it gets
//! `body_timeout`, one more second per `min_body_rate` bytes received, and
//! never more than `max_body_time` (Apache's `mod_reqtimeout` rule).
//!
//! So what clients can make the load balancer hold is bounded by
//! configuration, not by how many of them stall half-way.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::config::Limits;
use crate::error::ProxyError;

/// Spooled bodies are read back, and written upstream, this much at a time.
const SPOOL_CHUNK: usize = 64 * 1024;

/// The load balancer's body accounting, shared by every connection.
pub struct Bodies {
    pub max_body: u64,
    buffer: usize,
    max_memory: usize,
    max_spool: u64,
    dir: PathBuf,
    pub timeout: Duration,
    pub min_rate: u64,
    pub max_time: Duration,
    memory: AtomicUsize,
    spool: AtomicU64,
    /// Bodies that went to the spool.
    pub spooled: AtomicU64,
    /// Bodies refused because the spool was full.
    pub spool_full: AtomicU64,
    /// Bodies cut because they arrived too slowly.
    pub too_slow: AtomicU64,
}

impl Bodies {
    pub fn new(limits: &Limits, timeouts: &crate::config::Timeouts) -> Self {
        Bodies {
            max_body: limits.max_body_bytes as u64,
            buffer: limits.body_buffer_bytes,
            max_memory: limits.max_body_memory,
            max_spool: limits.max_spool_bytes,
            dir: limits.spool_dir.clone().unwrap_or_else(std::env::temp_dir),
            timeout: timeouts.body,
            min_rate: limits.min_body_rate.max(1),
            max_time: timeouts.max_body,
            memory: AtomicUsize::new(0),
            spool: AtomicU64::new(0),
            spooled: AtomicU64::new(0),
            spool_full: AtomicU64::new(0),
            too_slow: AtomicU64::new(0),
        }
    }

    /// Bytes of request bodies held in memory now.
    pub fn memory_used(&self) -> usize {
        self.memory.load(Ordering::Relaxed)
    }

    /// Bytes of request bodies in the spool now.
    pub fn spool_used(&self) -> u64 {
        self.spool.load(Ordering::Relaxed)
    }

    fn reserve_memory(&self, n: usize) -> bool {
        self.memory
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                (used + n <= self.max_memory).then_some(used + n)
            })
            .is_ok()
    }

    fn reserve_spool(&self, n: u64) -> bool {
        self.spool
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                (used + n <= self.max_spool).then_some(used + n)
            })
            .is_ok()
    }

    /// When a body that started arriving at `started` with `received`
    /// bytes so far must have sent its next byte.
    pub fn deadline(&self, started: Instant, received: u64) -> Instant {
        let credit = Duration::from_secs_f64(received as f64 / self.min_rate as f64);
        started + (self.timeout + credit).min(self.max_time)
    }

    pub fn too_large(&self) -> ProxyError {
        ProxyError::BodyTooLarge {
            limit: self.max_body as usize,
        }
    }
}

/// A body being received: in memory while it is small and memory allows,
/// then in a spool file.
pub struct BodyWriter {
    bodies: Arc<Bodies>,
    memory: BytesMut,
    file: Option<File>,
    len: u64,
    hold: Hold,
}

impl BodyWriter {
    pub fn new(bodies: &Arc<Bodies>) -> Self {
        BodyWriter {
            bodies: bodies.clone(),
            memory: BytesMut::new(),
            file: None,
            len: 0,
            hold: Hold {
                bodies: bodies.clone(),
                memory: 0,
                spool: 0,
            },
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds received bytes. Refuses a body past `max_body_bytes` (413) or
    /// one the spool has no room for (503).
    pub fn push(&mut self, data: &[u8]) -> Result<(), ProxyError> {
        let bodies = self.bodies.clone();
        let n = data.len();
        if self.len + n as u64 > bodies.max_body {
            return Err(bodies.too_large());
        }
        if self.file.is_none() {
            let fits = self.memory.len() + n <= bodies.buffer;
            if fits && bodies.reserve_memory(n) {
                self.hold.memory += n;
                self.memory.extend_from_slice(data);
                self.len += n as u64;
                return Ok(());
            }
            self.spill()?;
        }
        if !bodies.reserve_spool(n as u64) {
            bodies.spool_full.fetch_add(1, Ordering::Relaxed);
            return Err(ProxyError::SpoolFull);
        }
        self.hold.spool += n as u64;
        let file = self.file.as_mut().ok_or(ProxyError::SpoolFull)?;
        file.write_all(data).map_err(spool_error)?;
        self.len += n as u64;
        Ok(())
    }

    /// Moves what is in memory to a new spool file.
    fn spill(&mut self) -> Result<(), ProxyError> {
        let bodies = self.bodies.clone();
        let mut file = tempfile::tempfile_in(&bodies.dir).map_err(spool_error)?;
        let held = self.memory.len() as u64;
        if !bodies.reserve_spool(held) {
            bodies.spool_full.fetch_add(1, Ordering::Relaxed);
            return Err(ProxyError::SpoolFull);
        }
        self.hold.spool += held;
        file.write_all(&self.memory).map_err(spool_error)?;
        bodies.memory.fetch_sub(self.hold.memory, Ordering::AcqRel);
        self.hold.memory = 0;
        self.memory = BytesMut::new();
        self.file = Some(file);
        bodies.spooled.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A body that arrived whole with its head: kept as it is, without a
    /// copy, when it fits in memory.
    pub fn whole(bodies: &Arc<Bodies>, bytes: Bytes) -> Result<RequestBody, ProxyError> {
        let n = bytes.len();
        if n <= bodies.buffer && bodies.reserve_memory(n) {
            return Ok(RequestBody {
                data: Data::Memory(bytes),
                _hold: Some(Arc::new(Hold {
                    bodies: bodies.clone(),
                    memory: n,
                    spool: 0,
                })),
            });
        }
        let mut writer = BodyWriter::new(bodies);
        writer.push(&bytes)?;
        writer.finish()
    }

    pub fn finish(self) -> Result<RequestBody, ProxyError> {
        let data = match self.file {
            None => Data::Memory(self.memory.freeze()),
            Some(file) => Data::Spooled {
                file: Arc::new(file),
                len: self.len,
            },
        };
        Ok(RequestBody {
            data,
            _hold: Some(Arc::new(self.hold)),
        })
    }
}

fn spool_error(e: std::io::Error) -> ProxyError {
    tracing::warn!(error = %e, "writing a request body to the spool failed");
    ProxyError::SpoolFull
}

/// What a body holds of the budgets; given back when the last copy of the
/// body is dropped.
struct Hold {
    bodies: Arc<Bodies>,
    memory: usize,
    spool: u64,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.bodies.memory.fetch_sub(self.memory, Ordering::AcqRel);
        self.bodies.spool.fetch_sub(self.spool, Ordering::AcqRel);
    }
}

/// A whole request body, ready to be sent (and sent again on a retry).
#[derive(Clone)]
pub struct RequestBody {
    data: Data,
    _hold: Option<Arc<Hold>>,
}

#[derive(Clone)]
enum Data {
    Memory(Bytes),
    Spooled { file: Arc<File>, len: u64 },
}

impl RequestBody {
    pub fn empty() -> Self {
        RequestBody {
            data: Data::Memory(Bytes::new()),
            _hold: None,
        }
    }

    pub fn len(&self) -> u64 {
        match &self.data {
            Data::Memory(b) => b.len() as u64,
            Data::Spooled { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The body, when it is in memory.
    pub fn in_memory(&self) -> Option<&Bytes> {
        match &self.data {
            Data::Memory(b) => Some(b),
            Data::Spooled { .. } => None,
        }
    }

    /// Writes `head` then the body. Small bodies go in one write with the
    /// head; spooled ones are read back a chunk at a time (from the page
    /// cache, as nginx does, with plain reads).
    pub async fn write_after<W: AsyncWrite + Unpin>(
        &self,
        out: &mut W,
        head: &[u8],
        scratch: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        match &self.data {
            Data::Memory(body) if body.len() <= 16 * 1024 => {
                scratch.clear();
                scratch.extend_from_slice(head);
                scratch.extend_from_slice(body);
                out.write_all(scratch).await
            }
            Data::Memory(body) => {
                out.write_all(head).await?;
                out.write_all(body).await
            }
            Data::Spooled { file, len } => {
                out.write_all(head).await?;
                let mut chunk = vec![0u8; SPOOL_CHUNK];
                let mut at = 0u64;
                while at < *len {
                    let want = ((*len - at) as usize).min(SPOOL_CHUNK);
                    file.read_exact_at(&mut chunk[..want], at)?;
                    out.write_all(&chunk[..want]).await?;
                    at += want as u64;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Limits, Timeouts};

    fn bodies(buffer: usize, memory: usize, spool: u64) -> Arc<Bodies> {
        let limits = Limits {
            max_body_bytes: 1000,
            body_buffer_bytes: buffer,
            max_body_memory: memory,
            max_spool_bytes: spool,
            ..Limits::default()
        };
        Arc::new(Bodies::new(&limits, &Timeouts::default()))
    }

    async fn sent(body: &RequestBody) -> Vec<u8> {
        let mut out = Vec::new();
        body.write_after(&mut out, b"H", &mut Vec::new())
            .await
            .unwrap();
        out
    }

    #[tokio::test]
    async fn small_bodies_stay_in_memory_large_ones_spool_and_both_are_given_back() {
        let b = bodies(10, 100, 1000);
        let mut w = BodyWriter::new(&b);
        w.push(b"hello").unwrap();
        let small = w.finish().unwrap();
        assert!(small.in_memory().is_some());
        assert_eq!(b.memory_used(), 5);

        let mut w = BodyWriter::new(&b);
        w.push(b"0123456").unwrap();
        w.push(b"789abcdef").unwrap();
        let large = w.finish().unwrap();
        assert!(large.in_memory().is_none(), "past the buffer it spools");
        assert_eq!(b.memory_used(), 5, "the spilled part's memory came back");
        assert_eq!(b.spool_used(), 16);
        assert_eq!(sent(&large).await, b"H0123456789abcdef");
        let again = large.clone();
        drop(large);
        assert_eq!(b.spool_used(), 16, "a copy for a retry still holds it");
        assert_eq!(sent(&again).await, b"H0123456789abcdef");
        drop(again);
        drop(small);
        assert_eq!((b.memory_used(), b.spool_used()), (0, 0));
    }

    #[tokio::test]
    async fn a_full_memory_budget_sends_even_small_bodies_to_the_spool() {
        let b = bodies(10, 8, 1000);
        let first = BodyWriter::whole(&b, Bytes::from_static(b"12345678")).unwrap();
        assert!(first.in_memory().is_some());
        let second = BodyWriter::whole(&b, Bytes::from_static(b"abc")).unwrap();
        assert!(second.in_memory().is_none());
        assert_eq!(sent(&second).await, b"Habc");
        assert_eq!(b.memory_used(), 8);
    }

    #[test]
    fn the_limits_refuse_with_the_right_answer() {
        let b = bodies(4, 100, 10);
        let mut w = BodyWriter::new(&b);
        w.push(&[0; 8]).unwrap();
        let err = w.push(&[0; 8]).unwrap_err();
        assert!(matches!(err, ProxyError::SpoolFull), "{err}");
        drop(w);
        assert_eq!(b.spool_used(), 0, "a refused body gives its room back");
        let mut w = BodyWriter::new(&b);
        let err = w.push(&[0; 1001]).unwrap_err();
        assert!(matches!(err, ProxyError::BodyTooLarge { .. }), "{err}");
    }

    #[test]
    fn slow_bodies_earn_time_up_to_the_cap() {
        let limits = Limits {
            min_body_rate: 1000,
            ..Limits::default()
        };
        let timeouts = Timeouts {
            body: Duration::from_secs(10),
            max_body: Duration::from_secs(60),
            ..Timeouts::default()
        };
        let b = Bodies::new(&limits, &timeouts);
        let t0 = Instant::now();
        assert_eq!(b.deadline(t0, 0), t0 + Duration::from_secs(10));
        assert_eq!(b.deadline(t0, 5000), t0 + Duration::from_secs(15));
        assert_eq!(b.deadline(t0, 10_000_000), t0 + Duration::from_secs(60));
    }
}
