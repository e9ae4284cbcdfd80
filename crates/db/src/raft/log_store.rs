//! openraft's log storage over [`crate::log::RaftLog`].
//!
//! Entries live twice: in memory (a map the readers serve from, bounded
//! by snapshots purging the prefix) and in the file, written by one
//! thread that owns it. `append` puts the entries in the map at once and
//! queues them for the writer; the writer takes every append queued since
//! its last flush, writes them and fsyncs once, then reports each batch
//! flushed (openraft acknowledges nothing before that report). Writes
//! arriving while a flush runs share the next one: group commit.
//! Truncation, purging and the vote queue behind earlier appends, so the
//! file sees operations in the order openraft issued them.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader, Vote};
use tokio::sync::oneshot;

use super::{io_error, Entry, LogId, StorageError, TypeConfig};
use crate::log::{self, RaftLog};

const PURGED_ID: &str = "purged_log_id";

#[derive(Default)]
struct Cache {
    entries: BTreeMap<u64, Entry>,
    purged: Option<LogId>,
}

enum Op {
    Append(Vec<log::Entry>, LogFlushed<TypeConfig>),
    Truncate(u64, oneshot::Sender<Result<(), String>>),
    Purge(LogId, oneshot::Sender<Result<(), String>>),
    Vote(Vec<u8>, oneshot::Sender<Result<(), String>>),
}

#[derive(Clone)]
pub struct LogStore {
    cache: Arc<Mutex<Cache>>,
    writer: mpsc::Sender<Op>,
    vote: Option<Vote<u64>>,
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
    /// Opens the log in `dir` and starts its writer thread.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
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
        let (writer, ops) = mpsc::channel();
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || write_loop(file, ops))
            .map_err(|e| fail(&e))?;
        Ok(LogStore {
            cache: Arc::new(Mutex::new(Cache { entries, purged })),
            writer,
            vote,
        })
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

/// The writer thread: batches queued appends into one write and fsync.
fn write_loop(mut file: RaftLog, ops: mpsc::Receiver<Op>) {
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
            Op::Append(mut entries, callback) => {
                let mut callbacks = vec![callback];
                while let Ok(next) = ops.try_recv() {
                    match next {
                        Op::Append(more, cb) => {
                            entries.extend(more);
                            callbacks.push(cb);
                        }
                        other => {
                            pending = Some(other);
                            break;
                        }
                    }
                }
                let result = overwrite(&mut file, &entries).map_err(|e| e.to_string());
                for cb in callbacks {
                    cb.log_io_completed(
                        result.clone().map_err(|e| std::io::Error::other(e.clone())),
                    );
                }
            }
            Op::Truncate(from, done) => {
                let _ = done.send(file.truncate(from).map_err(|e| e.to_string()));
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

/// Appends, first cutting off any entries the batch replaces (openraft
/// truncates conflicting entries itself; this keeps the file right
/// whatever the order of calls).
fn overwrite(file: &mut RaftLog, entries: &[log::Entry]) -> Result<(), log::LogError> {
    if let (Some(first), Some((last, _))) =
        (entries.first(), file.last().filter(|_| !file.is_empty()))
    {
        if first.index <= last {
            file.truncate(first.index)?;
        }
    }
    file.append(entries)
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
        {
            let mut cache = lock(&self.cache);
            for entry in entries {
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
        self.writer.send(Op::Append(stored, callback)).map_err(|_| {
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
