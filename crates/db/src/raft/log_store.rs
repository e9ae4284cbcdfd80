//! openraft's log storage over [`crate::log::RaftLog`].
//!
//! Entries live twice: in memory (a map the readers serve from, bounded
//! by snapshots purging the prefix) and in the file, written by one
//! thread that owns it. `append` puts the entries in the map at once and
//! queues them for the writer; the writer takes every append queued since
//! its last flush, writes them and fsyncs once, then reports each batch
//! flushed. Writes arriving while a flush runs share the next one: group
//! commit. Truncation, purging and the vote queue behind earlier appends,
//! so the file sees operations in the order openraft issued them.
//!
//! **The leader's own entries overlap its fsync with replication.**
//! openraft 0.9's core waits for the leader's append to be reported
//! before it sends the entries to the followers, so reporting after the
//! fsync puts two fsyncs in a row in every write. A leader's own new
//! entries (made in its current term, not a membership change) are
//! reported once written to the kernel, before the fsync; the fsync runs
//! while the followers receive and fsync their copies. The leader then
//! counts itself in the quorum before its copy is durable, so nothing
//! may act on "committed" until it is: the log publishes how far it is
//! durable ([`LogStore::durable`]), and
//! - the state machine applies an entry only once it is durable here
//!   (clients are answered after the apply);
//! - a commit index goes to the followers only once it is durable here
//!   (they apply what they are told is committed).
//!
//! So a write is answered, or applied anywhere, only when a majority holds
//! it on disk, as Raft requires. A killed process loses nothing the kernel
//! was given; a machine that loses power loses the leader's unsynced tail,
//! which no one acted on. A follower reports its appends after the fsync
//! (its answer is its vote that the entry is durable), and so does a
//! membership change. If an fsync fails after entries were reported, the
//! process exits, as PostgreSQL does: what the disk holds is unknown.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader, Vote};
use openraft::EntryPayload;
use tokio::sync::{oneshot, watch};

use super::{io_error, Entry, LogId, StorageError, TypeConfig};
use crate::log::{self, RaftLog};
use crate::metrics::{Stages, Timed};

const PURGED_ID: &str = "purged_log_id";

#[derive(Default)]
struct Cache {
    entries: BTreeMap<u64, Entry>,
    purged: Option<LogId>,
}

enum Op {
    /// Entries, who waits for them, and whether that report may come
    /// before the fsync (the leader's own entries, see the module's text).
    Append(Vec<log::Entry>, LogFlushed<TypeConfig>, bool),
    Truncate(u64, oneshot::Sender<Result<(), String>>),
    Purge(LogId, oneshot::Sender<Result<(), String>>),
    Vote(Vec<u8>, oneshot::Sender<Result<(), String>>),
}

#[derive(Clone)]
pub struct LogStore {
    cache: Arc<Mutex<Cache>>,
    writer: mpsc::Sender<Op>,
    vote: Option<Vote<u64>>,
    /// This node's id: entries it made as leader carry it.
    me: u64,
    durable: watch::Receiver<u64>,
}

/// Reads entries from memory (never touches the file).
#[derive(Clone)]
pub struct LogReader {
    cache: Arc<Mutex<Cache>>,
}

fn lock(cache: &Mutex<Cache>) -> std::sync::MutexGuard<'_, Cache> {
    cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LogStore {
    /// Opens the log of node `me` in `dir` and starts its writer thread.
    /// `stages` times its writes and fsyncs.
    pub fn open(dir: &Path, me: u64, stages: Arc<Stages>) -> Result<Self, StorageError> {
        let fail = |e: &dyn std::fmt::Display| io_error(ErrorSubject::Logs, ErrorVerb::Read, e);
        let mut file = RaftLog::open(dir).map_err(|e| fail(&e))?;
        let purged: Option<LogId> = match file.read_meta(PURGED_ID).map_err(|e| fail(&e))? {
            Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| fail(&e))?),
            None => None,
        };
        let mut entries = BTreeMap::new();
        for stored in file.read_all().map_err(|e| fail(&e))? {
            if purged.is_some_and(|p| stored.index <= p.index) {
                continue;
            }
            let entry: Entry = serde_json::from_slice(&stored.payload).map_err(|e| fail(&e))?;
            entries.insert(stored.index, entry);
        }
        let vote = match file.read_vote().map_err(|e| fail(&e))? {
            Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| fail(&e))?),
            None => None,
        };
        // What an earlier run wrote may still be only in the kernel.
        file.sync().map_err(|e| fail(&e))?;
        let last = file.last().map_or(0, |(index, _)| index);
        let (durable_tx, durable) = watch::channel(last);
        let (writer, ops) = mpsc::channel();
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || write_loop(file, ops, durable_tx, &stages))
            .map_err(|e| fail(&e))?;
        Ok(LogStore {
            cache: Arc::new(Mutex::new(Cache { entries, purged })),
            writer,
            vote,
            me,
            durable,
        })
    }

    /// The index up to which the log is on disk (fsynced). It moves back
    /// only when a follower's log is cut back.
    pub fn durable(&self) -> Durable {
        Durable(self.durable.clone())
    }

    /// Whether `entry` is this node's own, made as leader in its current
    /// term: then its report may come before the fsync.
    fn own(&self, entry: &Entry) -> bool {
        let leader = entry.log_id.leader_id;
        let current = self.vote.is_some_and(|v| {
            v.leader_id().node_id == self.me && v.leader_id().term == leader.term
        });
        current && leader.node_id == self.me && !matches!(entry.payload, EntryPayload::Membership(_))
    }

    async fn queue(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Op,
        subject: ErrorSubject<u64>,
    ) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(op(tx))
            .map_err(|_| io_error(subject.clone(), ErrorVerb::Write, "the log writer stopped"))?;
        rx.await
            .map_err(|_| io_error(subject.clone(), ErrorVerb::Write, "the log writer stopped"))?
            .map_err(|e| io_error(subject, ErrorVerb::Write, e))
    }
}

/// How far the log is durable: see the module's text.
#[derive(Clone)]
pub struct Durable(watch::Receiver<u64>);

impl Durable {
    /// Waits until entry `index` is on disk. Fails only when the log
    /// writer stopped.
    pub async fn reach(&mut self, index: u64) -> Result<(), String> {
        if self.get() >= index {
            return Ok(());
        }
        self.0
            .wait_for(|d| *d >= index)
            .await
            .map(|_| ())
            .map_err(|_| "the log writer stopped".to_string())
    }

    pub fn get(&self) -> u64 {
        *self.0.borrow()
    }

    /// A log that is durable everywhere (for tests of the state machine
    /// alone).
    #[cfg(test)]
    pub fn everything() -> Self {
        Durable(watch::channel(u64::MAX).1)
    }
}

/// The writer thread: batches queued appends into one write and fsync.
fn write_loop(
    mut file: RaftLog,
    ops: mpsc::Receiver<Op>,
    durable: watch::Sender<u64>,
    stages: &Stages,
) {
    let mut pending: Option<Op> = None;
    loop {
        let op = match pending.take() {
            Some(op) => op,
            None => match ops.recv() {
                Ok(op) => op,
                Err(_) => return,
            },
        };
        match op {
            Op::Append(mut entries, callback, early) => {
                let mut callbacks = vec![(callback, early)];
                while let Ok(next) = ops.try_recv() {
                    match next {
                        Op::Append(more, cb, early) => {
                            entries.extend(more);
                            callbacks.push((cb, early));
                        }
                        other => {
                            pending = Some(other);
                            break;
                        }
                    }
                }
                let last = entries.last().map(|e| e.index);
                if let Some(first) = entries.first() {
                    // Entries replaced on a follower are not durable any more.
                    durable.send_if_modified(|d| {
                        let cut = *d >= first.index;
                        if cut {
                            *d = first.index - 1;
                        }
                        cut
                    });
                }
                let written = Timed(&stages.log_write, Instant::now());
                let result = overwrite(&mut file, &entries);
                drop(written);
                if let Err(e) = result {
                    let e = e.to_string();
                    for (cb, _) in callbacks {
                        cb.log_io_completed(Err(std::io::Error::other(e.clone())));
                    }
                    continue;
                }
                let mut late = Vec::with_capacity(callbacks.len());
                for (cb, early) in callbacks {
                    if early {
                        cb.log_io_completed(Ok(()));
                    } else {
                        late.push(cb);
                    }
                }
                let synced = Timed(&stages.log_fsync, Instant::now());
                let result = file.sync();
                drop(synced);
                if let Err(e) = result {
                    tracing::error!(error = %e, "fsync of the raft log failed: what the disk holds is unknown, stopping");
                    std::process::exit(70);
                }
                if let Some(last) = last {
                    durable.send_replace(last);
                }
                for cb in late {
                    cb.log_io_completed(Ok(()));
                }
            }
            Op::Truncate(from, done) => {
                let result = file.truncate(from).map_err(|e| e.to_string());
                durable.send_modify(|d| *d = (*d).min(from.saturating_sub(1)));
                let _ = done.send(result);
            }
            Op::Purge(upto, done) => {
                let result = serde_json::to_vec(&upto)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| file.save_meta(PURGED_ID, &bytes).map_err(|e| e.to_string()))
                    .and_then(|()| {
                        file.purge(upto.index, upto.leader_id.term)
                            .map_err(|e| e.to_string())
                    });
                let _ = done.send(result);
            }
            Op::Vote(bytes, done) => {
                let _ = done.send(file.save_vote(&bytes).map_err(|e| e.to_string()));
            }
        }
    }
}

/// Writes a batch (without the fsync), first cutting off any entries the
/// batch replaces (openraft truncates conflicting entries itself; this
/// keeps the file right whatever the order of calls).
fn overwrite(file: &mut RaftLog, entries: &[log::Entry]) -> Result<(), log::LogError> {
    if let (Some(first), Some((last, _))) =
        (entries.first(), file.last().filter(|_| !file.is_empty()))
    {
        if first.index <= last {
            file.truncate(first.index)?;
        }
    }
    file.write(entries)
}

fn range_of(range: &impl RangeBounds<u64>) -> (Bound<u64>, Bound<u64>) {
    (range.start_bound().cloned(), range.end_bound().cloned())
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let cache = lock(&self.cache);
        Ok(cache
            .entries
            .range(range_of(&range))
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        LogReader {
            cache: self.cache.clone(),
        }
        .try_get_log_entries(range)
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let cache = lock(&self.cache);
        let last = cache
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(cache.purged);
        Ok(LogState {
            last_purged_log_id: cache.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> LogReader {
        LogReader {
            cache: self.cache.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(vote)
            .map_err(|e| io_error(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        self.queue(|tx| Op::Vote(bytes, tx), ErrorSubject::Vote)
            .await?;
        self.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        Ok(self.vote)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut stored = Vec::new();
        let mut early = true;
        {
            let mut cache = lock(&self.cache);
            for entry in entries {
                early &= self.own(&entry);
                let payload = serde_json::to_vec(&entry)
                    .map_err(|e| io_error(ErrorSubject::Log(entry.log_id), ErrorVerb::Write, e))?;
                stored.push(log::Entry {
                    index: entry.log_id.index,
                    term: entry.log_id.leader_id.term,
                    payload,
                });
                cache.entries.insert(entry.log_id.index, entry);
            }
        }
        let early = early && !stored.is_empty();
        self.writer.send(Op::Append(stored, callback, early)).map_err(|_| {
            io_error(
                ErrorSubject::Logs,
                ErrorVerb::Write,
                "the log writer stopped",
            )
        })
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        lock(&self.cache).entries.split_off(&log_id.index);
        self.queue(|tx| Op::Truncate(log_id.index, tx), ErrorSubject::Logs)
            .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        {
            let mut cache = lock(&self.cache);
            let kept = cache.entries.split_off(&(log_id.index + 1));
            cache.entries = kept;
            cache.purged = Some(log_id);
        }
        self.queue(|tx| Op::Purge(log_id, tx), ErrorSubject::Logs)
            .await
    }
}
