//! openraft's log storage over [`crate::log::RaftLog`].
//!
//! Entries live twice: in memory (a map the readers serve from, bounded
//! by snapshots purging the prefix) and in the file. `append` puts the
//! entries in the map and writes them to the file where it is called
//! (openraft awaits each call, so truncation, purging and the vote reach
//! the file in the order openraft issued them). A follower's append then
//! fsyncs there and is reported; the leader's is reported at once and
//! fsynced by the log's sync thread, which takes every write made since
//! its last fsync in one (group commit).
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
use openraft::EntryPayload;
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader, Vote};
use tokio::sync::watch;

use super::{io_error, Entry, LogId, StorageError, TypeConfig};
use crate::log::{self, RaftLog};
use crate::metrics::{Stages, Timed};

const PURGED_ID: &str = "purged_log_id";

#[derive(Default)]
struct Cache {
    entries: BTreeMap<u64, Entry>,
    purged: Option<LogId>,
}

/// The file, shared by the async side (writes, truncations) and the
/// syncer thread (the leader's fsyncs).
struct Disk {
    file: RaftLog,
    /// Truncations so far: an fsync that began before one must not
    /// publish what it cut.
    cuts: u64,
}

#[derive(Clone)]
pub struct LogStore {
    cache: Arc<Mutex<Cache>>,
    disk: Arc<Mutex<Disk>>,
    /// Wakes the syncer thread: the leader's entries were written.
    syncer: mpsc::Sender<()>,
    vote: Option<Vote<u64>>,
    /// This node's id: entries it made as leader carry it.
    me: u64,
    /// A read replica: it never votes, so its appends never count towards
    /// a commit and are reported before the fsync (see [`Self::open`]).
    learner: bool,
    durable: Arc<watch::Sender<u64>>,
    stages: Arc<Stages>,
}

/// Reads entries from memory (never touches the file).
#[derive(Clone)]
pub struct LogReader {
    cache: Arc<Mutex<Cache>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LogStore {
    /// Opens the log of node `me` in `dir` and starts its sync thread.
    /// `stages` times its writes and fsyncs.
    ///
    /// A `learner` (a read replica, never a voter) reports every append
    /// once written and fsyncs in the background, at most once per
    /// [`LEARNER_SYNC_EVERY`]: its answers never count towards a commit,
    /// and on one disk shared with the voters its fsyncs would otherwise
    /// queue beside theirs on every write. What it applies still waits
    /// for its fsync, so its database is never ahead of its log; after a
    /// power loss it is sent again what it lost.
    pub fn open(
        dir: &Path,
        me: u64,
        learner: bool,
        stages: Arc<Stages>,
    ) -> Result<Self, StorageError> {
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
        let durable = Arc::new(watch::Sender::new(last));
        let disk = Arc::new(Mutex::new(Disk { file, cuts: 0 }));
        let (syncer, wakes) = mpsc::channel();
        {
            let (disk, durable, stages) = (disk.clone(), durable.clone(), stages.clone());
            std::thread::Builder::new()
                .name("raft-log-sync".into())
                .spawn(move || sync_loop(&disk, &wakes, &durable, &stages, learner))
                .map_err(|e| fail(&e))?;
        }
        Ok(LogStore {
            cache: Arc::new(Mutex::new(Cache { entries, purged })),
            disk,
            syncer,
            vote,
            me,
            learner,
            durable,
            stages,
        })
    }

    /// The index up to which the log is on disk (fsynced). It moves back
    /// only when a follower's log is cut back.
    pub fn durable(&self) -> Durable {
        Durable(self.durable.subscribe())
    }

    /// Whether `entry` is this node's own, made as leader in its current
    /// term (or anything a learner appends): then its report may come before
    /// the fsync.
    fn own(&self, entry: &Entry) -> bool {
        if self.learner {
            return true;
        }
        let leader = entry.log_id.leader_id;
        let current = self
            .vote
            .is_some_and(|v| v.leader_id().node_id == self.me && v.leader_id().term == leader.term);
        current
            && leader.node_id == self.me
            && !matches!(entry.payload, EntryPayload::Membership(_))
    }

    /// Runs `op` on the file on a blocking thread (openraft awaits each
    /// call, so they reach the file in its order).
    async fn on_disk(
        &self,
        subject: ErrorSubject<u64>,
        op: impl FnOnce(&mut Disk, &watch::Sender<u64>) -> Result<(), log::LogError> + Send + 'static,
    ) -> Result<(), StorageError> {
        let (disk, durable) = (self.disk.clone(), self.durable.clone());
        tokio::task::spawn_blocking(move || op(&mut lock(&disk), &durable))
            .await
            .map_err(|e| io_error(subject.clone(), ErrorVerb::Write, e))?
            .map_err(|e| io_error(subject, ErrorVerb::Write, e))
    }
}

/// How far the log is durable: see the module's text.
#[derive(Clone)]
pub struct Durable(watch::Receiver<u64>);

impl Durable {
    /// Waits until entry `index` is on disk. Fails only when the log is
    /// closed.
    pub async fn reach(&mut self, index: u64) -> Result<(), String> {
        if self.get() >= index {
            return Ok(());
        }
        self.0
            .wait_for(|d| *d >= index)
            .await
            .map(|_| ())
            .map_err(|_| "the raft log is closed".to_string())
    }

    pub fn get(&self) -> u64 {
        *self.0.borrow()
    }

    #[cfg(test)]
    pub fn from(durable: watch::Receiver<u64>) -> Self {
        Durable(durable)
    }

    /// A log that is durable everywhere (for tests of the state machine
    /// alone).
    #[cfg(test)]
    pub fn everything() -> Self {
        Durable(watch::channel(u64::MAX).1)
    }
}

/// How often a read replica's log is fsynced at most.
pub const LEARNER_SYNC_EVERY: std::time::Duration = std::time::Duration::from_millis(5);

/// The syncer thread: after the leader's writes, one fsync for all that
/// were written by the time it starts (group commit), then publishes how
/// far the log is durable.
fn sync_loop(
    disk: &Mutex<Disk>,
    wakes: &mpsc::Receiver<()>,
    durable: &watch::Sender<u64>,
    stages: &Stages,
    learner: bool,
) {
    while wakes.recv().is_ok() {
        if learner {
            std::thread::sleep(LEARNER_SYNC_EVERY);
        }
        while wakes.try_recv().is_ok() {}
        let (handle, last, cuts) = {
            let d = lock(disk);
            (d.file.handle(), d.file.last().map_or(0, |(i, _)| i), d.cuts)
        };
        let synced = Timed(&stages.log_fsync, Instant::now());
        if let Err(e) = handle.sync_data() {
            fatal(&e);
        }
        drop(synced);
        let d = lock(disk);
        if d.cuts == cuts {
            raise(durable, last);
        }
    }
}

/// The fsync of entries already reported failed: what the disk holds is
/// unknown, so the node stops (as PostgreSQL does) rather than go on.
fn fatal(e: &dyn std::fmt::Display) -> ! {
    tracing::error!(error = %e, "fsync of the raft log failed: what the disk holds is unknown, stopping");
    std::process::exit(70)
}

fn raise(durable: &watch::Sender<u64>, to: u64) {
    durable.send_if_modified(|d| {
        let higher = to > *d;
        if higher {
            *d = to;
        }
        higher
    });
}

fn lower(durable: &watch::Sender<u64>, to: u64) {
    durable.send_if_modified(|d| {
        let lower = to < *d;
        if lower {
            *d = to;
        }
        lower
    });
}

/// Writes a batch (without the fsync), first cutting off any entries the
/// batch replaces (openraft truncates conflicting entries itself; this
/// keeps the file right whatever the order of calls).
fn overwrite(
    disk: &mut Disk,
    durable: &watch::Sender<u64>,
    entries: &[log::Entry],
) -> Result<(), log::LogError> {
    let file = &mut disk.file;
    if let (Some(first), Some((last, _))) =
        (entries.first(), file.last().filter(|_| !file.is_empty()))
    {
        if first.index <= last {
            disk.cuts += 1;
            file.truncate(first.index)?;
            lower(durable, first.index - 1);
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
        self.on_disk(ErrorSubject::Vote, move |disk, _| {
            disk.file.save_vote(&bytes)
        })
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
        let Some(last) = stored.last().map(|e| e.index) else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        let mut disk = lock(&self.disk);
        let written = Timed(&self.stages.log_write, Instant::now());
        let result = overwrite(&mut disk, &self.durable, &stored);
        drop(written);
        if let Err(e) = result {
            callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
            return Ok(());
        }
        if early {
            drop(disk);
            // The fsync starts as soon as possible: the write waits for it.
            let _ = self.syncer.send(());
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        // A follower's answer waits for this fsync (openraft 0.9's core
        // waits for it anyway), so it runs here, without a thread hop.
        let synced = Timed(&self.stages.log_fsync, Instant::now());
        if let Err(e) = disk.file.sync() {
            fatal(&e);
        }
        drop(synced);
        raise(&self.durable, last);
        drop(disk);
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        lock(&self.cache).entries.split_off(&log_id.index);
        let from = log_id.index;
        self.on_disk(ErrorSubject::Logs, move |disk, durable| {
            disk.cuts += 1;
            let result = disk.file.truncate(from);
            lower(durable, from.saturating_sub(1));
            result
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        {
            let mut cache = lock(&self.cache);
            let kept = cache.entries.split_off(&(log_id.index + 1));
            cache.entries = kept;
            cache.purged = Some(log_id);
        }
        self.on_disk(ErrorSubject::Logs, move |disk, _| {
            let bytes = serde_json::to_vec(&log_id).map_err(std::io::Error::other)?;
            disk.file.save_meta(PURGED_ID, &bytes)?;
            disk.file.purge(log_id.index, log_id.leader_id.term)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::storage::RaftLogStorageExt;
    use openraft::{CommittedLeaderId, Membership};

    fn entry(leader: u64, term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, leader), index),
            payload: EntryPayload::Blank,
        }
    }

    fn store(me: u64, learner: bool) -> (tempfile::TempDir, LogStore) {
        let dir = tempfile::tempdir().unwrap();
        let store =
            LogStore::open(&dir.path().join("raft"), me, learner, Default::default()).unwrap();
        (dir, store)
    }

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(30), f)
            .await
            .expect("no answer in 30 s")
    }

    /// A follower's append is its vote that the entries are durable: it
    /// is reported only once they are fsynced.
    #[tokio::test]
    async fn a_followers_appends_are_durable_when_reported() {
        let (_dir, mut log) = store(1, false);
        log.save_vote(&Vote::new_committed(1, 2)).await.unwrap();
        let durable = log.durable();
        within(log.blocking_append((1..=3).map(|i| entry(2, 1, i))))
            .await
            .unwrap();
        assert_eq!(durable.get(), 3, "reported before its fsync");
        // Entries this node made as leader in an earlier term, sent back
        // by the new leader, are a follower's too.
        within(log.blocking_append([entry(1, 1, 4)])).await.unwrap();
        assert_eq!(durable.get(), 4);
        // Cutting entries off makes them not durable any more.
        within(log.truncate(LogId::new(CommittedLeaderId::new(1, 2), 3)))
            .await
            .unwrap();
        assert_eq!(durable.get(), 2);
    }

    /// The leader's own entries are fsynced after they are reported,
    /// and the log says when; a membership change is fsynced first.
    #[tokio::test]
    async fn a_leaders_own_entries_become_durable_after_the_report() {
        let (_dir, mut log) = store(1, false);
        log.save_vote(&Vote::new_committed(2, 1)).await.unwrap();
        let mut durable = log.durable();
        within(log.blocking_append((1..=5).map(|i| entry(1, 2, i))))
            .await
            .unwrap();
        within(durable.reach(5)).await.unwrap();
        let change = Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, 1), 6),
            payload: EntryPayload::Membership(Membership::new(vec![[1, 2, 3].into()], None)),
        };
        within(log.blocking_append([change])).await.unwrap();
        assert_eq!(
            durable.get(),
            6,
            "a membership change was reported before its fsync"
        );
        assert!(
            !log.own(&entry(1, 1, 7)),
            "an entry of an earlier term counts as this leader's"
        );
        assert!(
            !log.own(&entry(2, 2, 7)),
            "another node's entry counts as this leader's"
        );
        assert!(log.own(&entry(1, 2, 7)));
    }

    /// A read replica's appends are reported at once and fsynced soon
    /// after; nothing is durable before that.
    #[tokio::test]
    async fn a_learner_fsyncs_behind_its_reports() {
        let (dir, mut log) = store(4, true);
        log.save_vote(&Vote::new_committed(1, 2)).await.unwrap();
        let mut durable = log.durable();
        assert!(log.own(&entry(2, 1, 1)));
        within(log.blocking_append((1..=3).map(|i| entry(2, 1, i))))
            .await
            .unwrap();
        within(durable.reach(3)).await.unwrap();
        drop(log);
        // What it reported survives the process.
        let mut log =
            LogStore::open(&dir.path().join("raft"), 4, true, Default::default()).unwrap();
        assert_eq!(
            log.get_log_state()
                .await
                .unwrap()
                .last_log_id
                .map(|l| l.index),
            Some(3)
        );
    }
}
