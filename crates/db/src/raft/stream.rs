//! AppendEntries over one long-lived connection per peer.
//!
//! Every write reaches the followers as an AppendEntries, and every
//! commit as another; over plain HTTP each one is a request through
//! reqwest's pool and connection task on the leader and a hyper
//! connection, router and middleware on the follower: most of what a
//! replicated write costs in CPU, and several thread hand-offs of its
//! latency. So the leader asks each peer once for `GET /raft/stream`
//! with `Upgrade: scaleout-raft` (through the same listener, its TLS and
//! its cluster-secret check), and then sends AppendEntries on the
//! upgraded connection as frames, one at a time, each answered in turn:
//!
//! ```text
//! frame = length (u32, little-endian) + JSON body
//! leader -> follower: AppendEntriesRequest      follower -> leader: Result<AppendEntriesResponse, RaftError>
//! ```
//!
//! Each end reads through a buffer kept with the connection: a frame's
//! length and body arrive in one read.
//!
//! A connection that fails, or whose call openraft gave up on midway, is
//! dropped, and the next call opens a new one. A peer that does not offer
//! the upgrade (an older node) is sent plain `POST /raft/append` from
//! then on; one that refuses it for now (its [`MAX_STREAMS`] are taken)
//! is sent that call so, and asked for a stream again on the next.

use std::io;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::network::Rpc;
use super::TypeConfig;
use crate::auth::ClusterSecret;

/// The protocol named in `Upgrade`.
pub const PROTOCOL: &str = "scaleout-raft";

/// The largest request frame a follower takes (the HTTP body limit of
/// `/raft/append`).
const MAX_REQUEST: usize = 256 * 1024 * 1024;
/// Streams one node serves at once (a leader holds one to each peer;
/// when they are taken, a leader sends plain HTTP).
pub const MAX_STREAMS: usize = 16;
/// A stream without a frame for this long is closed (a leader sends a
/// heartbeat many times a second).
const IDLE: Duration = Duration::from_secs(10);

/// The largest answer a leader takes (an answer is a few dozen bytes).
const MAX_ANSWER: usize = 1024 * 1024;

/// Bytes read from a stream at once: a length and the frame behind it
/// (an answer, a heartbeat, a small batch) come in one system call, not
/// one for the length and another for the rest. Kept with the stream
/// between calls, so nothing read ahead is lost.
const READ_BUFFER: usize = 8 * 1024;

fn buffered<R: AsyncRead>(io: R) -> BufReader<R> {
    BufReader::with_capacity(READ_BUFFER, io)
}

pub type Conn = BufReader<TokioIo<hyper::upgrade::Upgraded>>;
pub type ClientConn = BufReader<reqwest::Upgraded>;

pub type Answer = Result<AppendEntriesResponse<u64>, RaftError<u64>>;

/// Why a connection could not be had.
pub enum ConnectError {
    /// Nothing listens there (openraft backs off).
    Unreachable(reqwest::Error),
    /// The peer does not offer the upgrade: use plain HTTP.
    Unsupported(StatusCode),
    Other(String),
}

/// Opens a connection to the peer whose RPCs are under `base`
/// (`http://host:port/raft`).
pub async fn connect(
    client: &reqwest::Client,
    secret: Option<&ClusterSecret>,
    base: &str,
    within: Duration,
) -> Result<ClientConn, ConnectError> {
    let mut request = client
        .get(format!("{base}/stream"))
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .timeout(within);
    if let Some(secret) = secret {
        request = request.header(header::AUTHORIZATION, secret.header());
    }
    let answer = request.send().await.map_err(|e| {
        if e.is_connect() {
            ConnectError::Unreachable(e)
        } else {
            ConnectError::Other(e.to_string())
        }
    })?;
    match answer.status() {
        StatusCode::SWITCHING_PROTOCOLS => answer
            .upgrade()
            .await
            .map(buffered)
            .map_err(|e| ConnectError::Other(e.to_string())),
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => {
            Err(ConnectError::Unsupported(answer.status()))
        }
        other => Err(ConnectError::Other(format!("the peer answered {other}"))),
    }
}

/// One call: sends `req` and reads its answer. Bytes that came after the
/// answer fail the call (and so drop the stream): the peer answers each
/// request once, and anything more would be taken for the next call's
/// answer (found by review).
pub async fn call<C: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut BufReader<C>,
    req: &AppendEntriesRequest<TypeConfig>,
) -> io::Result<Answer> {
    write_frame(conn, req).await?;
    let answer = read_frame(conn, MAX_ANSWER).await?;
    if !conn.buffer().is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the peer sent more than one answer to an AppendEntries",
        ));
    }
    Ok(answer)
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, value: &impl Serialize) -> io::Result<()> {
    let mut buf = vec![0; 4];
    serde_json::to_writer(&mut buf, value)?;
    let len = u32::try_from(buf.len() - 4).map_err(|_| io::Error::other("a frame over 4 GiB"))?;
    buf[..4].copy_from_slice(&len.to_le_bytes());
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads one frame; `Ok(None)`-like end of stream is an `UnexpectedEof`.
async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    max: usize,
) -> io::Result<T> {
    let mut len = [0; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes (at most {max})"),
        ));
    }
    // Grown as the bytes arrive: a length alone reserves nothing.
    let mut body = Vec::with_capacity(len.min(64 * 1024));
    r.take(len as u64).read_to_end(&mut body).await?;
    if body.len() < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(serde_json::from_slice(&body)?)
}

/// `GET /raft/stream`: upgrades the connection and serves AppendEntries
/// on it until the leader closes it.
pub async fn accept(State(rpc): State<Rpc>, mut req: Request) -> Response {
    let asked = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(PROTOCOL));
    if !asked {
        return (
            StatusCode::UPGRADE_REQUIRED,
            [(header::UPGRADE, HeaderValue::from_static(PROTOCOL))],
            "this endpoint needs `Upgrade: scaleout-raft`\n",
        )
            .into_response();
    }
    let Ok(slot) = rpc.streams.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_STREAMS} Raft streams are open here already\n"),
        )
            .into_response();
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let _slot = slot;
        match upgrade.await {
            Ok(io) => {
                let conn = buffered(TokioIo::new(io));
                if let Err(e) = serve(rpc, conn).await {
                    if e.kind() != io::ErrorKind::UnexpectedEof {
                        tracing::debug!(error = %e, "a Raft stream ended");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "a Raft stream upgrade failed"),
        }
    });
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, HeaderValue::from_static("upgrade")),
            (header::UPGRADE, HeaderValue::from_static(PROTOCOL)),
        ],
    )
        .into_response()
}

async fn serve(rpc: Rpc, mut conn: Conn) -> io::Result<()> {
    loop {
        let req: AppendEntriesRequest<TypeConfig> =
            match tokio::time::timeout(IDLE, read_frame(&mut conn, MAX_REQUEST)).await {
                Ok(frame) => frame?,
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "an idle Raft stream",
                    ))
                }
            };
        super::network::check_term(&req.vote)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let answer = rpc.append(req).await;
        write_frame(&mut conn, &answer).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use tokio::io::ReadBuf;

    /// Counts the reads that reach the connection (each one a system
    /// call on a socket).
    struct Counting<R> {
        inner: R,
        reads: Arc<AtomicUsize>,
    }

    impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    /// A frame that arrives whole is read from the connection in one
    /// read, its length and body together, and what is read ahead of the
    /// next frame is kept for it.
    #[tokio::test]
    async fn a_frame_is_read_in_one_read_and_nothing_read_ahead_is_lost() {
        let (mut tx, rx) = tokio::io::duplex(64 * 1024);
        let reads = Arc::new(AtomicUsize::new(0));
        let mut conn = buffered(Counting {
            inner: rx,
            reads: reads.clone(),
        });
        let answers: Vec<Answer> = (0..3u64)
            .map(|i| {
                Ok(AppendEntriesResponse::PartialSuccess(Some(
                    openraft::LogId::new(openraft::CommittedLeaderId::new(i, 1), i),
                )))
            })
            .collect();
        // Two frames sent back to back, then a third on its own.
        write_frame(&mut tx, &answers[0]).await.unwrap();
        write_frame(&mut tx, &answers[1]).await.unwrap();
        let first: Answer = read_frame(&mut conn, MAX_ANSWER).await.unwrap();
        assert_eq!(
            reads.load(Ordering::Relaxed),
            1,
            "one read for the first frame"
        );
        let second: Answer = read_frame(&mut conn, MAX_ANSWER).await.unwrap();
        assert_eq!(
            reads.load(Ordering::Relaxed),
            1,
            "the second frame came with the first read"
        );
        write_frame(&mut tx, &answers[2]).await.unwrap();
        let third: Answer = read_frame(&mut conn, MAX_ANSWER).await.unwrap();
        assert_eq!(reads.load(Ordering::Relaxed), 2, "one read for the third");
        assert_eq!(vec![first, second, third], answers);
    }

    /// A peer that answers one request twice fails the call, so the
    /// stream is dropped: its second answer is never taken for the next
    /// request's.
    #[tokio::test]
    async fn a_second_answer_to_one_request_fails_the_call() {
        let (leader, mut peer) = tokio::io::duplex(64 * 1024);
        let mut conn = buffered(leader);
        let answering = tokio::spawn(async move {
            let _: AppendEntriesRequest<TypeConfig> =
                read_frame(&mut peer, MAX_REQUEST).await.unwrap();
            let answer: Answer = Ok(AppendEntriesResponse::Success);
            // Both answers in one write, so they arrive in one read.
            let mut twice = Vec::new();
            for _ in 0..2 {
                write_frame(&mut twice, &answer).await.unwrap();
            }
            peer.write_all(&twice).await.unwrap();
            peer
        });
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: openraft::Vote::new_committed(1, 1),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        };
        let called = call(&mut conn, &req).await;
        let _peer = answering.await.unwrap();
        let e = called.expect_err("a second answer was left for the next call");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }
}
