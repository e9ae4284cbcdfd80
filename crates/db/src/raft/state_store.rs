//! openraft's state machine over [`crate::state::StateMachine`], with
//! snapshots that are SQLite files.
//!
//! - apply: the committed entries openraft hands over in one call are
//!   applied in one SQLite transaction that also records the last one's
//!   log id and, when the batch changes it, the membership (so a restart
//!   knows both exactly).
//! - build a snapshot: `VACUUM INTO` a new file from a separate
//!   connection (a consistent read, writes go on); the file's own
//!   bookkeeping row says which entry it ends at, so the snapshot's
//!   metadata comes from the snapshot itself.
//! - install a snapshot (from the leader): the received file replaces the
//!   database's contents through SQLite's backup, which keeps the readers'
//!   connections valid.
//!
//! Reads never come here: [`Readers`] are separate read-only connections
//! to the same file (WAL lets them run beside the writer).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};

use super::log_store::Durable;
use crate::metrics::Stages;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder};
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;
use tokio::sync::{watch, Semaphore};

use super::{io_error, Command, Entry, LogId, StorageError, StoredMembership, TypeConfig};
use crate::engine::{self, ExecOptions, Guarded, ReadLimits, Rerun, Stop};
use crate::guard::Fault;
use crate::request::Statement;
use crate::state::{self, Applied, AppliedState, StateMachine};

pub const DB_FILE: &str = "db.sqlite";
const SNAPSHOTS: &str = "snapshots";
const INCOMING: &str = "incoming.sqlite";
const INSTALLING: &str = "installing.sqlite";

fn sm_error(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    io_error(ErrorSubject::StateMachine, verb, e)
}

fn snapshot_error(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    io_error(ErrorSubject::Snapshot(None), verb, e)
}

fn lock(sm: &Mutex<StateMachine>) -> std::sync::MutexGuard<'_, StateMachine> {
    sm.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn log_id_of(a: Applied) -> LogId {
    LogId::new(openraft::CommittedLeaderId::new(a.term, a.leader), a.index)
}

fn applied_of(id: &LogId) -> Applied {
    Applied {
        term: id.leader_id.term,
        leader: id.leader_id.node_id,
        index: id.index,
    }
}

/// The log id and membership a state file (or snapshot file) holds.
fn decode(state: AppliedState) -> Result<(Option<LogId>, StoredMembership), serde_json::Error> {
    let membership = match state.membership {
        Some(text) => serde_json::from_str(&text)?,
        None => StoredMembership::default(),
    };
    Ok((state.applied.map(log_id_of), membership))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| sm_error(ErrorVerb::Write, e))?
}

pub struct StateStore {
    sm: Arc<Mutex<StateMachine>>,
    dir: PathBuf,
    /// How far this node's log is on disk: nothing is applied beyond it
    /// (see [`super::log_store`]: a leader's entry may be committed
    /// before its own copy is durable).
    durable: Durable,
    stages: Arc<Stages>,
    /// The last entry applied here (for the leader's replication to read
    /// replicas, see [`super::network::Replicas`]).
    applied: Arc<watch::Sender<Option<LogId>>>,
    /// This node's id: the entries it made as leader carry it.
    me: u64,
}

impl StateStore {
    /// The store of node `me` (see [`Self::apply`]; 0 until set).
    pub fn on_node(self, me: u64) -> Self {
        StateStore { me, ..self }
    }

    /// Opens (or creates) the database in `dir`; `shutdown` set stops
    /// whatever statement the apply runs; `durable` is the log's.
    pub fn open(
        dir: &Path,
        shutdown: Arc<AtomicBool>,
        durable: Durable,
        stages: Arc<Stages>,
    ) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir.join(SNAPSHOTS)).map_err(|e| sm_error(ErrorVerb::Read, e))?;
        let mut sm = StateMachine::open_timed(&dir.join(DB_FILE), shutdown, stages.clone())
            .map_err(|e| sm_error(ErrorVerb::Read, e))?;
        // The database file is written without an fsync per commit (the
        // log is the durable record), so an OS crash can take its newest
        // commits; entries the log has since dropped are in the snapshot,
        // which is fsynced before the log is purged. Start from whichever
        // is further along.
        if let Some((meta, file)) = current_snapshot(&dir.join(SNAPSHOTS))? {
            let applied = sm.applied().map_err(|e| sm_error(ErrorVerb::Read, e))?;
            let snapshot_at = meta.last_log_id.map_or(0, |l| l.index);
            if snapshot_at > applied.index {
                tracing::warn!(
                    applied = applied.index,
                    snapshot = snapshot_at,
                    "the database is behind its snapshot; restoring the snapshot"
                );
                sm.restore(&file)
                    .map_err(|e| sm_error(ErrorVerb::Read, e))?;
            }
        }
        let applied = sm
            .state()
            .map_err(|e| sm_error(ErrorVerb::Read, e))?
            .applied
            .map(log_id_of);
        Ok(StateStore {
            sm: Arc::new(Mutex::new(sm)),
            dir: dir.to_path_buf(),
            durable,
            stages,
            applied: Arc::new(watch::Sender::new(applied)),
            me: 0,
        })
    }

    /// The last entry applied here, as it changes.
    pub fn applied_ids(&self) -> watch::Receiver<Option<LogId>> {
        self.applied.subscribe()
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.join(DB_FILE)
    }

    fn snapshots(&self) -> PathBuf {
        self.dir.join(SNAPSHOTS)
    }
}

/// Applies one entry's command (inside the state machine's transaction
/// for it); its results are the clients' answers.
fn run(db: &Guarded, entry: &Entry, rerun: &Rerun) -> Result<Vec<Value>, Stop> {
    match &entry.payload {
        EntryPayload::Normal(Command::Batch(commands)) => commands
            .iter()
            .enumerate()
            .map(|(request, c)| run_command(db, request, c, rerun).map(Value::Array))
            .collect(),
        EntryPayload::Normal(command) => run_command(db, 0, command, rerun),
        EntryPayload::Blank | EntryPayload::Membership(_) => Ok(Vec::new()),
    }
}

fn run_command(
    db: &Guarded,
    request: usize,
    command: &Command,
    rerun: &Rerun,
) -> Result<Vec<Value>, Stop> {
    match command {
        Command::Execute {
            statements,
            opts,
            env,
        } => engine::execute(db, request, statements, opts, env, rerun),
        Command::Load { sql, replace, env } => {
            engine::load(db, request, sql, *replace, env, rerun).map(|r| vec![r])
        }
        Command::Barrier => Ok(Vec::new()),
        Command::Batch(_) => Err(Stop::Fault(Fault(
            "a batch inside a batch: the leader never writes one".into(),
        ))),
    }
}

/// How long an apply may hold the async thread it is called on before it
/// moves to a blocking thread. At one client a write's apply takes tens
/// of microseconds, less than handing it to a blocking thread and back
/// (two thread wake-ups on every node for every write).
const INLINE_APPLY: std::time::Duration = std::time::Duration::from_millis(1);

impl StateStore {
    /// Applies `entries`, in order, right here until [`INLINE_APPLY`]
    /// has passed; pushes each one's results. A client's statement still
    /// running then is stopped and its entry rolled back (the rest go to
    /// a blocking thread, that one first). Nothing runs here while
    /// another thread holds the state machine (a snapshot being installed).
    fn apply_inline(
        &self,
        entries: &[Entry],
        results: &mut Vec<Vec<Value>>,
    ) -> Result<(), StorageError> {
        let mut sm = match self.sm.try_lock() {
            Ok(sm) => sm,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
        };
        let until = Instant::now() + INLINE_APPLY;
        for entry in entries {
            if Instant::now() >= until || !may_inline(entry) {
                break;
            }
            match apply_one(&mut sm, entry, Some(until))? {
                Some(out) => results.push(out),
                None => break,
            }
        }
        Ok(())
    }
}

/// The most SQL text an entry tried on an async thread may carry:
/// parsing it has no clock.
const INLINE_SQL_BYTES: usize = 16 * 1024;

/// Whether `entry` may be tried on an async thread: not a load
/// (`/db/load`: the node's own work for it, emptying the database and
/// checking every foreign key, has no clock), and not much SQL text.
fn may_inline(entry: &Entry) -> bool {
    fn bytes(command: &Command) -> Option<usize> {
        match command {
            Command::Execute { statements, .. } => {
                Some(statements.iter().map(|s| s.sql.len()).sum())
            }
            Command::Load { .. } => None,
            Command::Barrier => Some(0),
            Command::Batch(commands) => commands.iter().map(bytes).sum(),
        }
    }
    match &entry.payload {
        EntryPayload::Normal(command) => bytes(command).is_some_and(|b| b <= INLINE_SQL_BYTES),
        EntryPayload::Blank | EntryPayload::Membership(_) => true,
    }
}

/// Applies one entry; with `until`, gives up at that time (`None`,
/// nothing applied, see [`StateMachine::apply_entry_until`]).
fn apply_one(
    sm: &mut StateMachine,
    entry: &Entry,
    until: Option<Instant>,
) -> Result<Option<Vec<Value>>, StorageError> {
    // The membership is recorded with the entry that carries it.
    let membership = match &entry.payload {
        EntryPayload::Membership(m) => Some(
            serde_json::to_string(&StoredMembership::new(Some(entry.log_id), m.clone()))
                .map_err(|e| sm_error(ErrorVerb::Write, e))?,
        ),
        _ => None,
    };
    let at = applied_of(&entry.log_id);
    let work = |db: &Guarded, rerun: &Rerun| run(db, entry, rerun);
    let applied = match until {
        Some(until) => sm.apply_entry_until(at, membership.as_deref(), until, work),
        None => sm.apply_entry(at, membership.as_deref(), work).map(Some),
    };
    applied.map_err(|e| {
        tracing::error!(
            index = entry.log_id.index,
            error = %e,
            "applying an entry failed: this node stops applying"
        );
        sm_error(ErrorVerb::Write, e)
    })
}

impl RaftStateMachine<TypeConfig> for StateStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let state = lock(&self.sm)
            .state()
            .map_err(|e| sm_error(ErrorVerb::Read, e))?;
        decode(state).map_err(|e| sm_error(ErrorVerb::Read, e))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Value>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let Some(last) = entries.last() {
            let waited = Instant::now();
            self.durable
                .reach(last.log_id.index)
                .await
                .map_err(|e| sm_error(ErrorVerb::Write, e))?;
            self.stages.durable_wait.observe(waited.elapsed());
        }
        let Some(last) = entries.last().map(|e| e.log_id) else {
            return Ok(Vec::new());
        };
        if last.leader_id.node_id != self.me {
            // A follower's: its answer to the AppendEntries that brought
            // the commit index goes first (the leader waits for it; it
            // waits for nobody here). With the thread to itself, the apply
            // would run between the fsync and the answer.
            tokio::task::yield_now().await;
        }
        let applied = Instant::now();
        let mut results = Vec::with_capacity(entries.len());
        self.apply_inline(&entries, &mut results)?;
        if results.len() < entries.len() {
            let sm = self.sm.clone();
            let done = results.len();
            let rest = blocking(move || {
                let mut sm = lock(&sm);
                entries[done..]
                    .iter()
                    .map(|entry| apply_one(&mut sm, entry, None).map(Option::unwrap_or_default))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
            results.extend(rest);
            self.stages.apply_moved.observe(applied.elapsed());
        }
        self.stages.apply.observe(applied.elapsed());
        self.applied.send_replace(Some(last));
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            db: self.db_path(),
            dir: self.snapshots(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.snapshots().join(INCOMING))
            .await
            .map_err(|e| snapshot_error(ErrorVerb::Write, e))?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, super::Member>,
        mut snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        use tokio::io::AsyncSeekExt;
        let fail = |e: std::io::Error| snapshot_error(ErrorVerb::Write, e);
        // Copied from the handle, wherever it points, to a file of ours.
        let dir = self.snapshots();
        let installing = dir.join(INSTALLING);
        snapshot
            .seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(fail)?;
        let mut copy = tokio::fs::File::create(&installing).await.map_err(fail)?;
        tokio::io::copy(&mut *snapshot, &mut copy)
            .await
            .map_err(fail)?;
        copy.sync_all().await.map_err(fail)?;
        drop((copy, snapshot));
        let _ = tokio::fs::remove_file(dir.join(INCOMING)).await;
        let sm = self.sm.clone();
        let id = meta.snapshot_id.clone();
        let last = meta.last_log_id;
        let meta = meta.clone();
        blocking(move || {
            let holds = Connection::open(&installing)
                .and_then(|c| state::applied_state(&c))
                .map_err(|e| snapshot_error(ErrorVerb::Read, e))?;
            if holds.applied.map(|a| a.index) != meta.last_log_id.map(|l| l.index) {
                return Err(snapshot_error(
                    ErrorVerb::Read,
                    format!(
                        "snapshot {} says it ends at {:?} but holds {:?}",
                        meta.snapshot_id, meta.last_log_id, holds.applied
                    ),
                ));
            }
            lock(&sm)
                .restore(&installing)
                .map_err(|e| snapshot_error(ErrorVerb::Write, e))?;
            keep_as_current(&dir, &installing, &meta)
        })
        .await?;
        self.applied.send_replace(last);
        tracing::info!(snapshot = %id, "installed a snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let dir = self.snapshots();
        let current = blocking(move || current_snapshot(&dir)).await?;
        match current {
            Some((meta, path)) => {
                let file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| snapshot_error(ErrorVerb::Read, e))?;
                Ok(Some(Snapshot {
                    meta,
                    snapshot: Box::new(file),
                }))
            }
            None => Ok(None),
        }
    }
}

type Meta = SnapshotMeta<u64, super::Member>;

/// Makes `file` the current snapshot `meta` describes (and forgets older
/// ones): `<id>.sqlite` beside `<id>.json`.
fn keep_as_current(dir: &Path, file: &Path, meta: &Meta) -> Result<(), StorageError> {
    let fail = |e: &dyn std::fmt::Display| snapshot_error(ErrorVerb::Write, e);
    let id = &meta.snapshot_id;
    // Durable before anything relies on it (the log before it is purged).
    std::fs::File::open(file)
        .and_then(|f| f.sync_all())
        .map_err(|e| fail(&e))?;
    std::fs::rename(file, dir.join(format!("{id}.sqlite"))).map_err(|e| fail(&e))?;
    let text = serde_json::to_vec(meta).map_err(|e| fail(&e))?;
    let tmp = dir.join(format!("{id}.json.tmp"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(|e| fail(&e))?;
        f.write_all(&text)
            .and_then(|()| f.sync_all())
            .map_err(|e| fail(&e))?;
    }
    std::fs::rename(&tmp, dir.join(format!("{id}.json"))).map_err(|e| fail(&e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail(&e))?;
    for old in std::fs::read_dir(dir).map_err(|e| fail(&e))?.flatten() {
        let name = old.file_name().to_string_lossy().into_owned();
        let stem = name.split('.').next().unwrap_or("");
        if stem != id && !matches!(stem, "incoming" | "installing" | "building") {
            let _ = std::fs::remove_file(old.path());
        }
    }
    Ok(())
}

fn current_snapshot(dir: &Path) -> Result<Option<(Meta, PathBuf)>, StorageError> {
    let fail = |e: &dyn std::fmt::Display| snapshot_error(ErrorVerb::Read, e);
    let mut newest: Option<(Meta, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).map_err(|e| fail(&e))?.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            let bytes = std::fs::read(&path).map_err(|e| fail(&e))?;
            let meta: Meta = serde_json::from_slice(&bytes).map_err(|e| fail(&e))?;
            let file = path.with_extension("sqlite");
            if file.exists()
                && newest
                    .as_ref()
                    .is_none_or(|(m, _)| m.last_log_id < meta.last_log_id)
            {
                newest = Some((meta, file));
            }
        }
    }
    Ok(newest)
}

pub struct SnapshotBuilder {
    db: PathBuf,
    dir: PathBuf,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (db, dir) = (self.db.clone(), self.dir.clone());
        let (meta, path) = blocking(move || {
            let fail = |e: &dyn std::fmt::Display| snapshot_error(ErrorVerb::Write, e);
            let building = dir.join("building.sqlite");
            let conn = Connection::open(&db).map_err(|e| fail(&e))?;
            state::copy_to(&conn, &building).map_err(|e| fail(&e))?;
            drop(conn);
            let copy = Connection::open(&building).map_err(|e| fail(&e))?;
            let (last_log_id, last_membership) =
                decode(state::applied_state(&copy).map_err(|e| fail(&e))?).map_err(|e| fail(&e))?;
            drop(copy);
            let at = last_log_id.map_or(0, |l| l.index);
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let meta = Meta {
                last_log_id,
                last_membership,
                snapshot_id: format!("{at}-{stamp}"),
            };
            keep_as_current(&dir, &building, &meta)?;
            let path = dir.join(format!("{}.sqlite", meta.snapshot_id));
            Ok((meta, path))
        })
        .await?;
        tracing::info!(snapshot = %meta.snapshot_id, "built a snapshot");
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| snapshot_error(ErrorVerb::Read, e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}

/// Read-only connections to the state file, a few at a time, each under
/// the read rules ([`crate::guard`]).
pub struct Readers {
    conns: Mutex<Vec<Guarded>>,
    permits: Semaphore,
    count: usize,
}

/// Why a read could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("all {0} read connections stayed busy until the read's deadline; retry")]
    Busy(usize),
    #[error("{0}")]
    Internal(String),
}

impl Readers {
    pub fn open(path: &Path, count: usize, shutdown: Arc<AtomicBool>) -> rusqlite::Result<Self> {
        let conns = (0..count)
            .map(|_| {
                let conn = Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                conn.execute_batch("PRAGMA query_only=1; PRAGMA busy_timeout=5000;")?;
                conn.set_prepared_statement_cache_capacity(READ_STATEMENTS_CACHED);
                Guarded::reader(conn, shutdown.clone())
            })
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Readers {
            permits: Semaphore::new(conns.len()),
            count: conns.len(),
            conns: Mutex::new(conns),
        })
    }

    /// Runs `f` on a free connection, off the async threads; waits for
    /// one until `deadline` at most.
    pub async fn with<T: Send + 'static>(
        self: &Arc<Self>,
        deadline: Instant,
        f: impl FnOnce(&Guarded) -> T + Send + 'static,
    ) -> Result<T, ReadError> {
        let permit = tokio::time::timeout_at(deadline.into(), self.permits.acquire())
            .await
            .map_err(|_| ReadError::Busy(self.count))?
            .map_err(|e| ReadError::Internal(e.to_string()))?;
        let db = self
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
            .ok_or_else(|| ReadError::Internal("no free reader".into()))?;
        let me = self.clone();
        let out = tokio::task::spawn_blocking(move || {
            let out = f(&db);
            me.conns
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(db);
            out
        })
        .await
        .map_err(|e| ReadError::Internal(e.to_string()));
        drop(permit);
        out
    }

    /// Runs the statements in one read transaction (one snapshot of the
    /// data), and returns their results with the index of the state they
    /// saw, read in the same transaction.
    ///
    /// A read of one statement first runs right here on the async thread,
    /// if a connection is free, for at most [`INLINE`] (plus the SQLite
    /// step under way then): a point read takes tens of
    /// microseconds, far less than handing it to a blocking thread and
    /// back (measured: 19k point reads/s at 64 clients on one node, the
    /// two thread switches per read the largest cost). A read still
    /// running then is stopped and run again, whole, on a blocking
    /// thread until its own deadline (a read changes nothing, so running
    /// it again is safe).
    pub async fn query(
        self: &Arc<Self>,
        statements: Vec<Statement>,
        opts: ExecOptions,
        limits: ReadLimits,
    ) -> Result<(Vec<Value>, u64), ReadError> {
        let started = Instant::now();
        if let Some(done) = self.inline(&statements, &opts, limits) {
            return done;
        }
        // The time spent trying it here is given back: a read that fits
        // its own limit still fits it (found by review).
        let limits = ReadLimits {
            deadline: limits.deadline + started.elapsed(),
            ..limits
        };
        self.with(limits.deadline, move |db| {
            read_transaction(db, &statements, &opts, limits).map(|(r, index, _)| (r, index))
        })
        .await?
    }

    /// The read run on this thread, unless no connection is free or it
    /// needs more than [`INLINE`].
    fn inline(
        &self,
        statements: &[Statement],
        opts: &ExecOptions,
        limits: ReadLimits,
    ) -> Option<Result<(Vec<Value>, u64), ReadError>> {
        // One statement at most: the deadline is looked at between SQLite
        // steps, so several statements of a few long steps each could
        // hold this thread well past the inline time.
        if statements.len() > 1 {
            return None;
        }
        let permit = self.permits.try_acquire().ok()?;
        let db = self
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()?;
        let short = ReadLimits {
            deadline: limits.deadline.min(Instant::now() + INLINE),
            ..limits
        };
        let ran = read_transaction(&db, statements, opts, short);
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(db);
        drop(permit);
        match ran {
            Ok((_, _, true)) if short.deadline < limits.deadline => None,
            ran => Some(ran.map(|(r, index, _)| (r, index))),
        }
    }
}

/// Statements each read connection keeps prepared (by their text; each
/// small: see `engine::query_one`), so a thousand point lookups with
/// their keys written in stay prepared: at most 8 MiB per connection.
const READ_STATEMENTS_CACHED: usize = 1024;

/// How long a read may run on an async thread before it is moved to a
/// blocking one.
const INLINE: std::time::Duration = std::time::Duration::from_millis(1);

/// The statements in one read transaction: their results, the index of
/// the state they saw, and whether one was stopped at the deadline.
fn read_transaction(
    db: &Guarded,
    statements: &[Statement],
    opts: &ExecOptions,
    limits: ReadLimits,
) -> Result<(Vec<Value>, u64, bool), ReadError> {
    let own = engine::own();
    db.internal_cached(&own.begin)
        .map_err(|e| ReadError::Internal(e.to_string()))?;
    let applied = state::applied_state_by(&db.conn, &own.applied, true)
        .map_err(|e| ReadError::Internal(e.to_string()))
        .map(|s| s.applied.map_or(0, |a| a.index));
    let results = match &applied {
        Ok(_) => Ok(engine::query_until(db, statements, opts, limits)),
        Err(e) => Err(ReadError::Internal(e.to_string())),
    };
    if let Err(e) = db.internal_cached(&own.commit) {
        tracing::warn!(error = %e, "ending a read transaction failed");
    }
    let (results, stopped) = results?;
    Ok((results, applied?, stopped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::parse_statements;

    /// A state machine alone, its log durable everywhere.
    fn open_store(dir: &Path) -> StateStore {
        open_timed_store(dir).0
    }

    /// [`open_store`], with the stages it times.
    fn open_timed_store(dir: &Path) -> (StateStore, Arc<Stages>) {
        let stages = Arc::new(Stages::default());
        let store = StateStore::open(
            dir,
            Default::default(),
            Durable::everything(),
            stages.clone(),
        )
        .unwrap();
        (store, stages)
    }

    fn entry(index: u64, sql: &str) -> Entry {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::Execute {
                statements: parse_statements(sql.as_bytes()).unwrap(),
                opts: ExecOptions::default(),
                env: Default::default(),
            }),
        }
    }

    /// A follower's apply lets the tasks already waiting run first (its
    /// answer to the leader among them); the leader's own entries, whose
    /// clients wait for the apply, go at once. On one thread, a task
    /// spawned after the apply sees the entry applied or not.
    #[test]
    fn a_followers_apply_lets_waiting_tasks_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut store = open_store(dir.path()).on_node(2);
            let applied = store.applied_ids();
            let of = |leader: u64, index: u64, sql: &str| Entry {
                log_id: LogId::new(openraft::CommittedLeaderId::new(1, leader), index),
                ..entry(index, sql)
            };
            store
                .apply([of(1, 1, r#"["CREATE TABLE t(x)"]"#)])
                .await
                .unwrap();
            // Seen by a task spawned after the apply of `entry`.
            let seen = |mut store: StateStore, entry: Entry| {
                let apply = tokio::spawn(async move {
                    store.apply([entry]).await.unwrap();
                    store
                });
                let applied = applied.clone();
                let after = tokio::spawn(async move { applied.borrow().map(|a| a.index) });
                async move {
                    let seen = after.await.unwrap();
                    (apply.await.unwrap(), seen)
                }
            };
            let (store, follower) = seen(store, of(1, 2, r#"["INSERT INTO t VALUES (1)"]"#)).await;
            assert_eq!(
                follower,
                Some(1),
                "a follower's apply ran before the waiting task"
            );
            let (_, leader) = seen(store, of(2, 3, r#"["INSERT INTO t VALUES (2)"]"#)).await;
            assert_eq!(
                leader,
                Some(3),
                "the leader's own apply waited for another task"
            );
        });
    }

    /// Nothing is applied beyond this node's durable log: a leader may
    /// learn an entry is committed before its own fsync of it is done.
    #[tokio::test]
    async fn nothing_is_applied_before_the_log_holds_it_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (on_disk, durable) = tokio::sync::watch::channel(4);
        let mut store = StateStore::open(
            dir.path(),
            Default::default(),
            Durable::from(durable),
            Default::default(),
        )
        .unwrap();
        let create = entry(1, r#"["CREATE TABLE t(x)"]"#);
        store.apply([create]).await.unwrap();
        let mut apply = Box::pin(store.apply([entry(5, r#"["INSERT INTO t VALUES (1)"]"#)]));
        let early = tokio::time::timeout(std::time::Duration::from_millis(300), &mut apply).await;
        assert!(
            early.is_err(),
            "entry 5 was applied while the log was durable up to 4"
        );
        on_disk.send_replace(5);
        tokio::time::timeout(std::time::Duration::from_secs(30), apply)
            .await
            .expect("not applied once durable")
            .unwrap();
        let (applied, _) = store.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(5));
    }

    /// An apply runs where openraft calls it unless it needs more than
    /// [`INLINE_APPLY`]: then the entry that outran it is rolled back and
    /// applied again, whole, on a blocking thread, with the entries after
    /// it; every entry is applied once, in order, and answered in full.
    #[tokio::test]
    async fn an_apply_longer_than_the_inline_time_finishes_whole_on_a_blocking_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, stages) = open_timed_store(dir.path());
        store
            .apply([entry(1, r#"["CREATE TABLE t(x)"]"#)])
            .await
            .unwrap();
        // Quick ones stay here (all but one under a loaded test machine's
        // hiccups: the 1 ms is wall time).
        let moved = stages.apply_moved.count();
        store
            .apply([entry(2, r#"["INSERT INTO t VALUES (1)"]"#)])
            .await
            .unwrap();
        for index in 3..23 {
            store
                .apply([entry(index, r#"["SELECT 1"]"#)])
                .await
                .unwrap();
        }
        assert!(
            stages.apply_moved.count() - moved < 21,
            "every quick apply moved"
        );
        let moved = stages.apply_moved.count();
        let slow = r#"["INSERT INTO t WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 200000) SELECT x FROM n"]"#;
        let results = store
            .apply([
                entry(23, r#"["INSERT INTO t VALUES (2)"]"#),
                entry(24, slow),
                entry(25, r#"["INSERT INTO t VALUES (3)"]"#),
            ])
            .await
            .unwrap();
        assert_eq!(
            stages.apply_moved.count() - moved,
            1,
            "the slow apply did not move"
        );
        let changed: Vec<_> = results
            .iter()
            .map(|r| r[0]["rows_affected"].as_u64())
            .collect();
        assert_eq!(changed, [Some(1), Some(200_000), Some(1)]);
        let (applied, _) = store.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(25));
        let db = Connection::open(store.db_path()).unwrap();
        let rows: i64 = db
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 200_003, "an entry was applied twice or not at all");
    }

    /// What could hold the async thread long moves off it: statements
    /// whose few steps each handle megabytes (found by review: a thousand
    /// of them ran there for 160 ms), a statement over nested views (its
    /// preparing took seconds), `count(*)` of a table (one step), a
    /// commit failing on a deferred foreign key (its rerun checks every
    /// key in the database) and a load. Each is applied once and answered
    /// as on a blocking thread.
    #[tokio::test]
    async fn heavy_applies_move_off_the_async_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, stages) = open_timed_store(dir.path());
        let mut views = vec![
            "CREATE TABLE t(x)".to_string(),
            "CREATE TABLE p(id INTEGER PRIMARY KEY)".into(),
            "CREATE TABLE c(id INTEGER PRIMARY KEY, pid REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED)".into(),
            "CREATE VIEW v0 AS SELECT 1 a, 2 b".into(),
            "INSERT INTO t SELECT zeroblob(4000000) FROM (WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i<3) SELECT i FROM s)".into(),
        ];
        views.extend((1..=10).map(|i| {
            format!(
                "CREATE VIEW v{i} AS SELECT * FROM v{} UNION ALL SELECT * FROM v{}",
                i - 1,
                i - 1
            )
        }));
        let setup = serde_json::to_string(&views).unwrap();
        store.apply([entry(1, &setup)]).await.unwrap();
        let mut index = 1;
        let mut moves = |sql: &str| {
            index += 1;
            (entry(index, sql), stages.apply_moved.count())
        };
        for (sql, what) in [
            (r#"["UPDATE t SET x = x || x"]"#, "megabyte steps"),
            (
                r#"["INSERT INTO t SELECT nosuch FROM v10"]"#,
                "nested views",
            ),
            (r#"["INSERT INTO t SELECT count(*) FROM t"]"#, "count(*)"),
            (
                r#"["INSERT INTO c(pid) VALUES (999)"]"#,
                "a deferred key's rerun",
            ),
        ] {
            let (e, before) = moves(sql);
            let results = store.apply([e]).await.unwrap();
            assert_eq!(
                stages.apply_moved.count() - before,
                1,
                "{what} stayed on the async thread: {results:?}"
            );
        }
        let (load, before) = moves(r#"["SELECT 1"]"#);
        let load = Entry {
            payload: EntryPayload::Normal(Command::Load {
                sql: "INSERT INTO p VALUES (1);".into(),
                replace: false,
                env: Default::default(),
            }),
            ..load
        };
        store.apply([load]).await.unwrap();
        assert_eq!(
            stages.apply_moved.count() - before,
            1,
            "a load was tried inline"
        );
        let db = Connection::open(store.db_path()).unwrap();
        let counts: (i64, i64, i64, i64) = db
            .query_row(
                "SELECT (SELECT count(*) FROM t), (SELECT max(length(CAST(x AS BLOB))) FROM t), (SELECT count(*) FROM p), (SELECT count(*) FROM c)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(
            counts,
            (4, 8_000_000, 1, 0),
            "an entry was applied twice or not at all"
        );
    }

    /// A read that needs more than the inline time is not cut short:
    /// it runs again, whole, on a blocking thread, until its own
    /// deadline, which still holds.
    #[tokio::test]
    async fn a_read_longer_than_the_inline_time_runs_whole_on_a_blocking_thread() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let readers = Arc::new(Readers::open(&store.db_path(), 2, Default::default()).unwrap());
        let count = r#"["WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 300000) SELECT count(*) FROM n"]"#;
        let limits = |ms| ReadLimits {
            deadline: Instant::now() + std::time::Duration::from_millis(ms),
            max_bytes: 1 << 20,
        };
        let started = Instant::now();
        let (results, _) = readers
            .query(
                parse_statements(count.as_bytes()).unwrap(),
                ExecOptions::default(),
                limits(60_000),
            )
            .await
            .unwrap();
        assert!(
            started.elapsed() > INLINE,
            "the read took less than the inline time"
        );
        assert_eq!(
            results[0]["values"],
            serde_json::json!([[300000]]),
            "{results:?}"
        );
        let (results, _) = readers
            .query(
                parse_statements(count.replace("300000", "100000000").as_bytes()).unwrap(),
                ExecOptions::default(),
                limits(50),
            )
            .await
            .unwrap();
        let error = results[0]["error"].as_str().unwrap_or_default();
        assert!(error.contains("time limit"), "{results:?}");
    }

    /// The deadline holds between statements: many statements of a few
    /// long steps each (which the progress handler's count never reaches)
    /// are stopped once it has passed (found by review: 40 of them ran
    /// two seconds past a 100 ms limit).
    #[tokio::test]
    async fn a_read_of_many_long_statements_stops_at_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let readers = Arc::new(Readers::open(&store.db_path(), 1, Default::default()).unwrap());
        let one = r#""SELECT length(hex(zeroblob(8000000)))""#;
        let many = format!("[{}]", vec![one; 200].join(","));
        let limits = ReadLimits {
            deadline: Instant::now() + std::time::Duration::from_millis(20),
            max_bytes: 1 << 20,
        };
        let (results, _) = readers
            .query(
                parse_statements(many.as_bytes()).unwrap(),
                ExecOptions::default(),
                limits,
            )
            .await
            .unwrap();
        assert_eq!(results.len(), 200);
        let stopped = results
            .iter()
            .filter(|r| {
                r["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("time limit"))
            })
            .count();
        assert!(
            stopped > 0,
            "none of the {} statements stopped",
            results.len()
        );
        assert_eq!(
            results[0]["values"],
            serde_json::json!([[16000000]]),
            "{:?}",
            results[0]
        );
    }

    /// Reads with parameters go through each read connection's statement
    /// cache: the same
    /// text sees a changed schema (SQLite prepares it again, the read
    /// rules again), named parameters left out are not taken from the
    /// last run, and what the read rules refuse stays refused.
    #[tokio::test]
    async fn cached_reads_see_schema_changes_and_keep_the_read_rules() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open_store(dir.path());
        let readers = Arc::new(Readers::open(&store.db_path(), 1, Default::default()).unwrap());
        let read = |sql: &'static str| {
            let readers = readers.clone();
            async move {
                let limits = ReadLimits {
                    deadline: Instant::now() + std::time::Duration::from_secs(10),
                    max_bytes: 1 << 20,
                };
                let (r, _) = readers
                    .query(
                        parse_statements(sql.as_bytes()).unwrap(),
                        ExecOptions::default(),
                        limits,
                    )
                    .await
                    .unwrap();
                r[0].clone()
            }
        };
        store
            .apply(vec![entry(
                1,
                r#"["CREATE TABLE t (x)", "INSERT INTO t VALUES (1)"]"#,
            )])
            .await
            .unwrap();
        // With a parameter: the statements kept prepared.
        let all = r#"[["SELECT * FROM t WHERE 1 = ?", 1]]"#;
        assert_eq!(read(all).await["values"], serde_json::json!([[1]]));
        assert_eq!(read(all).await["values"], serde_json::json!([[1]]));
        store
            .apply(vec![entry(
                2,
                r#"["DROP TABLE t", "CREATE TABLE t (a, b)", "INSERT INTO t VALUES (7, 8)"]"#,
            )])
            .await
            .unwrap();
        let now = read(all).await;
        assert_eq!(now["columns"], serde_json::json!(["a", "b"]), "{now}");
        assert_eq!(now["values"], serde_json::json!([[7, 8]]), "{now}");
        let named = r#"[["SELECT :p", {"p": 5}]]"#;
        assert_eq!(read(named).await["values"], serde_json::json!([[5]]));
        let unbound = read(r#"[["SELECT :p", {}]]"#).await;
        assert_eq!(unbound["values"], serde_json::json!([[null]]), "{unbound}");
        for _ in 0..2 {
            let refused = read(r#"[["DELETE FROM t WHERE a = ?", 7]]"#).await;
            assert!(refused["error"].is_string(), "{refused}");
            let attach = read(r#"["ATTACH DATABASE ':memory:' AS m"]"#).await;
            assert!(attach["error"].is_string(), "{attach}");
        }
        assert_eq!(read(all).await["values"], serde_json::json!([[7, 8]]));
    }

    #[tokio::test]
    async fn a_database_behind_its_snapshot_is_restored_from_it_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = open_store(dir.path());
            let results = store
                .apply(vec![
                    entry(1, r#"["CREATE TABLE t (x)"]"#),
                    entry(
                        2,
                        r#"["INSERT INTO t VALUES (1)", "INSERT INTO t VALUES (2)"]"#,
                    ),
                ])
                .await
                .unwrap();
            assert_eq!(results[1].len(), 2, "one result per statement");
            let snapshot = store
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(2));
            let current = store.get_current_snapshot().await.unwrap().unwrap();
            assert_eq!(current.meta.snapshot_id, snapshot.meta.snapshot_id);
        }
        // An OS crash took the database file's commits (here: all of it).
        for name in [DB_FILE, "db.sqlite-wal", "db.sqlite-shm"] {
            let _ = std::fs::remove_file(dir.path().join(name));
        }
        let mut store = open_store(dir.path());
        let (applied, _) = store.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(2));
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
    }

    #[test]
    fn a_load_replaces_everything_or_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(&dir.path().join("db.sqlite"), Default::default()).unwrap();
        let mut index = 0;
        let mut load = |sql: &str, replace: bool| {
            index += 1;
            let at = Applied {
                term: 1,
                leader: 1,
                index,
            };
            sm.apply_entry(at, None, |db, rerun| {
                engine::load(db, 0, sql, replace, &Default::default(), rerun)
            })
            .unwrap()
        };
        assert!(load("CREATE TABLE old (x);", false).get("error").is_none());
        let dump = "PRAGMA foreign_keys=OFF;\nBEGIN TRANSACTION;\nCREATE TABLE b (x);\nINSERT INTO b VALUES(1);\nCREATE TRIGGER tr AFTER INSERT ON b BEGIN INSERT INTO b VALUES (NULL); END;\nCOMMIT;\n";
        let out = load(dump, true);
        assert_eq!(
            out,
            serde_json::json!({ "last_insert_id": 1, "rows_affected": 1 }),
            "PRAGMA foreign_keys skipped"
        );
        let out = load("PRAGMA writable_schema=1;", false);
        assert!(out.get("error").is_some(), "other pragmas are not: {out}");
        // A failing load changes nothing, and neither does one that
        // reaches for the node's state.
        for bad in [
            "INSERT INTO b VALUES (2); INSERT INTO nope VALUES (1);",
            "CREATE TRIGGER evil AFTER UPDATE ON _scaleout_applied BEGIN SELECT 1; END;",
            "DROP TABLE b; ATTACH '/tmp/x' AS x;",
            "INSERT INTO b VALUES (3); ROLLBACK;",
        ] {
            let out = load(bad, true);
            assert!(
                out["error"]
                    .as_str()
                    .unwrap()
                    .contains("nothing was loaded"),
                "{bad}: {out}"
            );
        }
        let q = sm.query(
            &crate::request::parse_statements(
                br#"["SELECT count(*) FROM b", "SELECT name FROM sqlite_schema ORDER BY name"]"#,
            )
            .unwrap(),
            &ExecOptions::default(),
        );
        assert_eq!(q[0]["values"], serde_json::json!([[1]]));
        assert_eq!(
            q[1]["values"],
            serde_json::json!([["_scaleout_applied"], ["b"], ["tr"]]),
            "old dropped, bookkeeping kept"
        );
    }
}
