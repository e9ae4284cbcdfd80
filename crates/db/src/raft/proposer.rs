//! Group commit in front of openraft: concurrent writes become one log
//! entry.
//!
//! openraft 0.9's core appends one client write at a time and waits for
//! that append's fsync before taking the next, so without help every write
//! costs its own fsync (measured: one `fdatasync` per request at 64
//! concurrent clients). The proposer queues writes; whenever a slot is free
//! it takes everything queued (up to a size bound) and proposes it as one
//! [`Command::Batch`] entry. While a batch is being made durable and
//! replicated the next one fills up, so the busier the node, the more
//! writes share an fsync and a replication round trip.
//!
//! Each write in a batch is applied on its own (its own results, its own
//! `transaction` savepoint): batching changes how many writes one entry
//! carries, never what any of them does. All share the entry's index.
//!
//! A leader cut off from its quorum cannot commit, and openraft keeps its
//! pending writes until it hears from the others again. Once the leader
//! has not heard from a quorum for the lease (the election timeout), the
//! proposer answers its pending writes "outcome unknown" (each may still
//! be committed by the next leader) instead of holding their clients.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::{Command, Raft, TypeConfig, WriteError};

type Written = openraft::raft::ClientWriteResponse<TypeConfig>;
use crate::error::NodeError;

/// Batches proposed at once: one, proposed by the batching task itself.
/// Each entry has a fixed cost (an fsync on each voter, a replication
/// round trip, task hops) far above a write's, so fewer, fuller entries
/// win. Measured with 3 voters + 1 replica, 64 clients, once the leader's
/// fsync overlapped replication: 1 in flight 21.1-22.1k writes/s, 2 in
/// flight 18.0-18.2k/s. (Before that, with the core waiting for each
/// fsync: 1 in flight 8.2-8.6k, 2 7.8-9.3k, 8 5.8k.)
const IN_FLIGHT: usize = 1;
/// Bounds of one batch.
const MAX_WRITES: usize = 512;
const MAX_BYTES: usize = 8 * 1024 * 1024;

type Reply = oneshot::Sender<Result<(u64, Vec<Value>), NodeError>>;

#[derive(Clone)]
pub struct Proposer {
    queue: mpsc::UnboundedSender<(Command, usize, Reply)>,
    /// The batches that may be in flight at once; holding all of them
    /// holds every write back (see [`Self::hold`]).
    slots: Arc<Semaphore>,
    pub counts: Arc<Counts>,
}

/// How well group commit works: writes per proposed entry.
#[derive(Debug, Default)]
pub struct Counts {
    pub entries: AtomicU64,
    pub writes: AtomicU64,
}

impl Proposer {
    /// Starts the batching task; `reject` maps openraft's refusal (not the
    /// leader) to what the client is told.
    pub fn start(
        raft: Raft,
        reject: impl Fn(&WriteError) -> NodeError + Send + Sync + 'static,
        lease: Duration,
    ) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let counts = Arc::new(Counts::default());
        let lease = Lease { raft, lease };
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        tokio::spawn(batch_loop(
            lease,
            rx,
            Arc::new(reject),
            counts.clone(),
            slots.clone(),
        ));
        Proposer {
            queue,
            slots,
            counts,
        }
    }

    /// Waits until no batch is in flight and keeps it so while the permit
    /// is held: writes queue up behind it (a leadership transfer needs the
    /// log to stand still). `None` once the node is shutting down.
    pub async fn hold(&self) -> Option<OwnedSemaphorePermit> {
        self.slots
            .clone()
            .acquire_many_owned(IN_FLIGHT as u32)
            .await
            .ok()
    }

    /// Proposes `command` (of about `size` bytes); resolves once it is
    /// committed and applied, with its index and results.
    pub async fn propose(
        &self,
        command: Command,
        size: usize,
    ) -> Result<(u64, Vec<Value>), NodeError> {
        self.submit(command, size)?.await
    }

    /// Puts `command` in line now (commands are proposed in the order
    /// they are submitted); the future resolves as [`Self::propose`] does.
    pub fn submit(
        &self,
        command: Command,
        size: usize,
    ) -> Result<impl std::future::Future<Output = Result<(u64, Vec<Value>), NodeError>>, NodeError>
    {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send((command, size, tx))
            .map_err(|_| NodeError::Internal("the node is shutting down".into()))?;
        Ok(async move {
            rx.await
                .map_err(|_| NodeError::Internal("the node is shutting down".into()))?
        })
    }
}

type Reject = Arc<dyn Fn(&WriteError) -> NodeError + Send + Sync>;

/// The raft handle and how long its leadership holds without a quorum.
#[derive(Clone)]
struct Lease {
    raft: Raft,
    lease: Duration,
}

impl Lease {
    /// Resolves when this node leads but has not heard from a quorum for
    /// longer than the lease. Looked at on a short timer (a write that
    /// commits in a millisecond never sees it fire), not at every change
    /// of openraft's metrics: those change several times during every
    /// write, and each change would wake every write. (A quarter of the
    /// lease was tried: a cut-off leader's clients then waited up to 190
    /// ms longer, and partition-leader's median down time went from 840
    /// ms to 1,040.)
    async fn lost(&self) {
        let every = (self.lease / 64).clamp(Duration::from_millis(5), Duration::from_millis(20));
        loop {
            tokio::time::sleep(every).await;
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            if m.state == ServerState::Leader
                && m.millis_since_quorum_ack
                    .is_some_and(|ms| u128::from(ms) > self.lease.as_millis())
            {
                return;
            }
        }
    }

    /// `client_write`, or `OutcomeUnknown` once the lease is lost.
    async fn write(&self, command: Command) -> Result<Result<Written, WriteError>, NodeError> {
        tokio::select! {
            written = self.raft.client_write(command) => Ok(written),
            () = self.lost() => Err(NodeError::OutcomeUnknown),
        }
    }
}

async fn batch_loop(
    raft: Lease,
    mut rx: mpsc::UnboundedReceiver<(Command, usize, Reply)>,
    reject: Reject,
    counts: Arc<Counts>,
    slots: Arc<Semaphore>,
) {
    while let Some(first) = rx.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.1;
        let mut batch = vec![first];
        while batch.len() < MAX_WRITES && bytes < MAX_BYTES {
            match rx.try_recv() {
                Ok(next) => {
                    bytes += next.1;
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        counts.entries.fetch_add(1, Ordering::Relaxed);
        counts
            .writes
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        // One batch at a time, proposed from here: no task per batch.
        propose(&raft, batch, &*reject).await;
        drop(slot);
    }
}

async fn propose(
    raft: &Lease,
    mut batch: Vec<(Command, usize, Reply)>,
    reject: &(dyn Fn(&WriteError) -> NodeError + Send + Sync),
) {
    if batch.len() == 1 {
        if let Some((command, _, reply)) = batch.pop() {
            let answer = match raft.write(command).await {
                Ok(written) => written
                    .map(|w| (w.log_id.index, w.data))
                    .map_err(|e| reject(&e)),
                Err(unknown) => Err(unknown),
            };
            let _ = reply.send(answer);
        }
        return;
    }
    let (commands, replies): (Vec<Command>, Vec<Reply>) =
        batch.into_iter().map(|(c, _, r)| (c, r)).unzip();
    let written = match raft.write(Command::Batch(Arc::new(commands))).await {
        Ok(written) => written.map_err(|e| reject(&e)),
        Err(unknown) => Err(unknown),
    };
    match written {
        Ok(written) => {
            let index = written.log_id.index;
            let mut results = written.data.into_iter();
            for reply in replies {
                let mine = match results.next() {
                    Some(Value::Array(values)) => Ok((index, values)),
                    _ => Err(NodeError::Internal(
                        "a batched write lost its results".into(),
                    )),
                };
                let _ = reply.send(mine);
            }
        }
        Err(refusal) => {
            for reply in replies {
                let _ = reply.send(Err(refusal.clone()));
            }
        }
    }
}
