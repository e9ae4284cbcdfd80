//! The replicated state machine: a SQLite file to which committed log
//! entries are applied, in order, exactly once.
//!
//! Invariant: the index of the last applied entry is written in the same
//! SQLite transaction as the entry's effects, so after any crash the file
//! says precisely which entries it holds — replay starts right after, never
//! applying one twice or skipping one. The file itself may use
//! `synchronous=NORMAL`: durability comes from the Raft log (fsynced);
//! a transaction lost to power failure is lost together with its index and
//! simply applied again.
//!
//! SQLite's WAL is copied back into the file by a thread of the state
//! machine's own ([`Checkpointer`]), not inside an apply: a checkpoint
//! fsyncs the WAL and the file, tens of milliseconds on a slow disk, and
//! SQLite's autocheckpoint would run it inside the commit that crossed
//! its threshold, holding that entry's client and every write behind it.
//! But a checkpoint beside a writer never copies the frames committed
//! while it ran, and SQLite starts the WAL over only once every frame
//! was copied: under writes without a pause the WAL would grow without
//! end (found by review: 688 MB in 20 s). So past [`WAL_CAP_PAGES`] the
//! commit checkpoints itself, as autocheckpoint does, with nothing
//! written beside it; what is left for it is what the thread has not yet
//! copied, little when the thread keeps up.

use std::cell::Cell;
use std::os::raw::c_int;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde_json::Value;

use crate::engine::{self, ExecOptions, Guarded, ReadLimits, Rerun, Stop, WriteEnv};
use crate::guard::{Fault, Mode};
use crate::metrics::Stages;
use crate::request::Statement;

/// Where the applied index lives (reserved: clients cannot touch it).
const META: &str = "CREATE TABLE IF NOT EXISTS _scaleout_applied (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    log_index INTEGER NOT NULL,
    term INTEGER NOT NULL,
    leader INTEGER NOT NULL DEFAULT 0,
    membership TEXT
)";

/// A log position: the entry's index, and the term and node that led
/// when it was written (Raft's log id).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub term: u64,
    pub leader: u64,
    pub index: u64,
}

/// What the file says it holds: the last applied entry and the last
/// cluster membership seen in the log (opaque text to this module).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppliedState {
    pub applied: Option<Applied>,
    pub membership: Option<String>,
}

/// Reads the bookkeeping row of any state file (also a snapshot's).
pub fn applied_state(conn: &Connection) -> rusqlite::Result<AppliedState> {
    applied_state_by(conn, APPLIED_SQL, false)
}

/// The bookkeeping row's query.
pub const APPLIED_SQL: &str =
    "SELECT term, leader, log_index, membership FROM _scaleout_applied WHERE id = 1";

/// [`applied_state`] with the query's text `sql` (tagged, to keep it
/// prepared: see [`crate::engine::own`]).
pub fn applied_state_by(
    conn: &Connection,
    sql: &str,
    cached: bool,
) -> rusqlite::Result<AppliedState> {
    let read = |r: &rusqlite::Row<'_>| {
        Ok(AppliedState {
            applied: Some(Applied {
                term: r.get::<_, i64>(0)? as u64,
                leader: r.get::<_, i64>(1)? as u64,
                index: r.get::<_, i64>(2)? as u64,
            }),
            membership: r.get(3)?,
        })
    };
    let row = if cached {
        conn.prepare_cached(sql)?.query_row([], read)
    } else {
        conn.query_row(sql, [], read)
    };
    row.optional().map(Option::unwrap_or_default)
}

pub struct StateMachine {
    db: Guarded,
    /// Where the file is, to open it afresh (`None`: in memory).
    path: Option<std::path::PathBuf>,
    shutdown: Arc<AtomicBool>,
    /// Copies the WAL back into the file (`None`: in memory). Kept when
    /// the connection is opened afresh.
    checkpointer: Option<Arc<Checkpointer>>,
    /// The WAL's pages when the checkpointer was last woken (0: not since
    /// the WAL started over).
    woken_at: c_int,
}

/// Pages in the WAL after a commit at which the checkpointer is woken
/// (SQLite's own autocheckpoint threshold).
pub const CHECKPOINT_PAGES: c_int = 1000;
/// Past it, the checkpointer is woken again each time the WAL has grown
/// by this much (not at every commit: each checkpoint costs two fsyncs).
const WAKE_EVERY_PAGES: c_int = CHECKPOINT_PAGES / 4;
/// Pages in the WAL after a commit at which the commit checkpoints
/// itself (see the module's text): the WAL's bound, in pages.
pub const WAL_CAP_PAGES: c_int = 4 * CHECKPOINT_PAGES;

thread_local! {
    /// Pages in the WAL after the last commit on this thread: set by the
    /// apply connection's WAL hook, which SQLite runs inside the commit,
    /// on the committing thread, and read right after it.
    static WAL_PAGES: Cell<c_int> = const { Cell::new(0) };
}

/// The apply connection's WAL hook. Registering it turns SQLite's
/// autocheckpoint off for that connection (both are WAL hooks); past
/// [`WAL_CAP_PAGES`] it checkpoints as autocheckpoint would. The commit
/// has happened whatever this returns.
fn note_wal_pages(wal: &rusqlite::hooks::Wal, pages: c_int) -> rusqlite::Result<()> {
    WAL_PAGES.with(|p| p.set(pages));
    if pages >= WAL_CAP_PAGES {
        // Busy when the checkpointer is at it: the next commit tries again.
        if let Err(e) = wal.checkpoint_v2(rusqlite::hooks::CheckpointMode::PASSIVE) {
            tracing::debug!(error = %e, pages, "the apply's own checkpoint did not run");
        }
    }
    Ok(())
}

/// A thread that copies the WAL back into the database file when woken,
/// with a PASSIVE checkpoint on a connection of its own: it takes no
/// lock the apply or the readers wait for, and copies what no reader
/// still needs (the rest on a later wake). Ends when the state machine
/// (every copy of this handle) is dropped.
pub struct Checkpointer {
    wake: mpsc::SyncSender<()>,
}

impl Checkpointer {
    fn start(path: &Path, stages: Arc<Stages>) -> std::io::Result<Arc<Self>> {
        // One pending wake is enough: a checkpoint copies all there is.
        let (wake, wakes) = mpsc::sync_channel(1);
        let path = path.to_path_buf();
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(&path, &wakes, &stages))?;
        Ok(Arc::new(Checkpointer { wake }))
    }

    fn wake(&self) {
        let _ = self.wake.try_send(());
    }
}

fn checkpoint_loop(path: &Path, wakes: &mpsc::Receiver<()>, stages: &Stages) {
    let mut conn: Option<Connection> = None;
    while wakes.recv().is_ok() {
        if conn.is_none() {
            let opened = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .and_then(|c| c.execute_batch("PRAGMA synchronous=NORMAL").map(|()| c));
            match opened {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "opening the database to checkpoint its WAL failed; trying again at the next wake");
                    continue;
                }
            }
        }
        let Some(c) = &conn else { continue };
        let started = Instant::now();
        let done = c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        });
        match done {
            Ok((frames, copied)) => {
                stages.checkpoint.observe(started.elapsed());
                tracing::debug!(frames, copied, "checkpointed the WAL");
            }
            Err(e) => {
                tracing::warn!(error = %e, "checkpointing the WAL failed; trying again at the next wake");
                conn = None;
            }
        }
    }
}

/// Why an entry could not be applied: the node's fault (its disk, its
/// memory, its shutdown), never the client's SQL. The node must stop
/// applying rather than go on differently from the others.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Fault(#[from] Fault),
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Stopped at the time set for it ([`StateMachine::apply_entry_until`])
    /// and rolled back: nothing of the entry is applied.
    #[error("the apply was stopped to run again off the async thread")]
    Yielded,
}

impl StateMachine {
    /// Opens the state file; `shutdown` set stops a statement that runs.
    pub fn open(path: &Path, shutdown: Arc<AtomicBool>) -> rusqlite::Result<Self> {
        Self::open_timed(path, shutdown, Arc::default())
    }

    /// [`Self::open`], with the checkpoints timed in `stages`.
    pub fn open_timed(
        path: &Path,
        shutdown: Arc<AtomicBool>,
        stages: Arc<Stages>,
    ) -> rusqlite::Result<Self> {
        let checkpointer = Checkpointer::start(path, stages).map_err(|e| {
            rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some(format!("starting the checkpoint thread: {e}")),
            )
        })?;
        Self::open_with(path, shutdown, checkpointer)
    }

    fn open_with(
        path: &Path,
        shutdown: Arc<AtomicBool>,
        checkpointer: Arc<Checkpointer>,
    ) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;",
        )?;
        // Replaces SQLite's autocheckpoint: see the module's text.
        conn.wal_hook(Some(note_wal_pages));
        conn.execute_batch(META)?;
        Ok(StateMachine {
            db: Guarded::writer(conn, shutdown.clone())?,
            path: Some(path.to_path_buf()),
            shutdown,
            checkpointer: Some(checkpointer),
            woken_at: 0,
        })
    }

    pub fn open_in_memory() -> rusqlite::Result<Self> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(META)?;
        Ok(StateMachine {
            db: Guarded::writer(conn, Arc::default())?,
            path: None,
            shutdown: Arc::default(),
            checkpointer: None,
            woken_at: 0,
        })
    }

    /// Opens the file again on a new connection: one whose query planner
    /// knows only what the file says, as a node that restarts or installs
    /// a snapshot knows it.
    ///
    /// Invariant: at every entry boundary the apply connection plans as a
    /// freshly opened one would. SQLite keeps ANALYZE's figures in memory
    /// even when the ANALYZE is rolled back, and reads leftover
    /// `sqlite_stat1` rows of a dropped or renamed index only when a
    /// connection loads the schema; a plan decides the order rows are
    /// visited (and so rowids, and random values per row) and the steps a
    /// statement takes (and so its budget's verdict). After any entry that
    /// changed the schema or ran ANALYZE, the connection is replaced.
    fn reopen(&mut self) -> rusqlite::Result<()> {
        if let (Some(path), Some(checkpointer)) = (self.path.clone(), self.checkpointer.clone()) {
            *self = StateMachine::open_with(&path, self.shutdown.clone(), checkpointer)?;
        }
        Ok(())
    }

    /// After a commit on the apply connection: wakes the checkpointer
    /// once the WAL has grown past [`CHECKPOINT_PAGES`], and again at
    /// every [`WAKE_EVERY_PAGES`] it grows by while it does not start over.
    fn committed(&mut self) {
        let pages = WAL_PAGES.with(|p| p.replace(0));
        if pages < self.woken_at {
            self.woken_at = 0;
        }
        if pages >= CHECKPOINT_PAGES && pages >= self.woken_at + WAKE_EVERY_PAGES {
            self.woken_at = pages;
            self.wake_checkpointer();
        }
    }

    fn wake_checkpointer(&self) {
        if let Some(c) = &self.checkpointer {
            c.wake();
        }
    }

    /// The last entry whose effects are in the file.
    pub fn applied(&self) -> rusqlite::Result<Applied> {
        Ok(self.state()?.applied.unwrap_or_default())
    }

    pub fn state(&self) -> rusqlite::Result<AppliedState> {
        self.db.guard.set_mode(Mode::Internal);
        applied_state(&self.db.conn)
    }

    /// Applies one committed write entry; `None` when it was applied
    /// before (a replay after a crash), else the per-statement results.
    /// Statement errors are results, not failures: the entry still counts
    /// as applied, as on every other node.
    pub fn apply(
        &mut self,
        at: Applied,
        statements: &[Statement],
        opts: &ExecOptions,
        env: &WriteEnv,
    ) -> Result<Option<Vec<Value>>, ApplyError> {
        if at.index <= self.applied()?.index {
            return Ok(None);
        }
        self.apply_entry(at, None, |db, rerun| {
            engine::execute(db, 0, statements, opts, env, rerun)
        })
        .map(Some)
    }

    /// Runs one entry's `work` and records `at` (and the membership, when
    /// it changed) in one transaction: the file never holds part of an
    /// entry, and says exactly which entries it holds.
    ///
    /// A statement of a client's can end the transaction it runs in
    /// (`RAISE(ROLLBACK)` in a trigger, `INSERT OR ROLLBACK`, a write
    /// stopped by its budget), which would take the entry's other writes
    /// with it. Then the entry runs again from the start, with that
    /// statement answered by its error and not run. Each run depends only
    /// on the state before the entry, the same on every node, so every
    /// node skips the same statements and ends with the same data.
    ///
    /// A commit can also fail on the client's account: a foreign key
    /// declared `DEFERRABLE INITIALLY DEFERRED` is checked only then.
    /// The entry then runs again with each request checking its own keys
    /// ([`Rerun::check_deferred`]), and the one that breaks them is
    /// rolled back alone.
    pub fn apply_entry<T>(
        &mut self,
        at: Applied,
        membership: Option<&str>,
        mut work: impl FnMut(&Guarded, &Rerun) -> Result<T, Stop>,
    ) -> Result<T, ApplyError> {
        let mut rerun = Rerun::default();
        loop {
            self.db.internal_cached(&engine::own().begin_immediate)?;
            let outcome = work(&self.db, &rerun);
            // A run stopped by the clock is never kept, whatever the
            // stopped statement made of its error.
            if self.db.guard.yielded() {
                self.roll_back();
                return Err(ApplyError::Yielded);
            }
            match outcome {
                Ok(out) => {
                    self.db.guard.set_mode(Mode::Internal);
                    self.db.guard.unbounded();
                    let recorded = self
                        .record(at, membership)
                        .and_then(|()| self.db.internal_cached(&engine::own().commit));
                    match recorded {
                        Ok(()) => {
                            self.committed();
                            if self.db.guard.take_planner_touched() {
                                self.reopen()?;
                            }
                            return Ok(out);
                        }
                        Err(e)
                            if !rerun.check_deferred
                                && e.sqlite_error_code()
                                    == Some(rusqlite::ErrorCode::ConstraintViolation) =>
                        {
                            self.roll_back();
                            if self.db.guard.inline() {
                                // The rerun scans every foreign key, as
                                // long as the database is big: not here.
                                return Err(ApplyError::Yielded);
                            }
                            tracing::debug!(index = at.index, error = %e, "the entry's commit failed on a deferred key; running it again with each request checked");
                            rerun.check_deferred = true;
                        }
                        Err(e) => {
                            self.roll_back();
                            return Err(e.into());
                        }
                    }
                }
                Err(Stop::Ended(ended)) => {
                    self.roll_back();
                    tracing::debug!(
                        index = at.index,
                        position = ?ended.position,
                        error = %ended.error,
                        "a statement ended the apply transaction; running the entry again without it"
                    );
                    rerun.after(ended);
                }
                Err(Stop::Fault(fault)) => {
                    self.roll_back();
                    return Err(fault.into());
                }
            }
        }
    }

    /// [`Self::apply_entry`] on a thread that must not be held long (an
    /// async one): if a client's statement is still running at `until`,
    /// it is stopped and the entry rolled back, `Ok(None)`, to be applied
    /// again whole elsewhere. The clock decides only where an entry is
    /// applied, never what it does: a stopped run leaves nothing behind.
    pub fn apply_entry_until<T>(
        &mut self,
        at: Applied,
        membership: Option<&str>,
        until: Instant,
        work: impl FnMut(&Guarded, &Rerun) -> Result<T, Stop>,
    ) -> Result<Option<T>, ApplyError> {
        self.db.guard.inline_until(&self.db.conn, Some(until));
        let out = self.apply_entry(at, membership, work);
        self.db.guard.inline_until(&self.db.conn, None);
        match out {
            Err(ApplyError::Yielded) => Ok(None),
            out => out.map(Some),
        }
    }

    fn record(&self, last: Applied, membership: Option<&str>) -> rusqlite::Result<()> {
        self.db
            .conn
            .prepare_cached(
                "INSERT INTO _scaleout_applied (id, log_index, term, leader, membership)
                 VALUES (1, ?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET log_index = excluded.log_index,
                    term = excluded.term, leader = excluded.leader,
                    membership = coalesce(excluded.membership, membership)",
            )?
            .execute(params![
                last.index as i64,
                last.term as i64,
                last.leader as i64,
                membership
            ])
            .map(|_| ())
    }

    fn roll_back(&self) {
        self.db.guard.set_mode(Mode::Internal);
        self.db.guard.unbounded();
        if !self.db.conn.is_autocommit() {
            if let Err(e) = self.db.internal_cached(&engine::own().rollback) {
                tracing::error!(error = %e, "rolling back an apply transaction failed");
            }
        }
    }

    /// Replaces the whole file's contents with another SQLite file's (a
    /// snapshot), through SQLite's backup so open readers stay valid.
    pub fn restore(&mut self, from: &Path) -> rusqlite::Result<()> {
        self.db.guard.set_mode(Mode::Internal);
        self.db.conn.restore(
            rusqlite::MAIN_DB,
            from,
            None::<fn(rusqlite::backup::Progress)>,
        )?;
        // The whole file went through the WAL, past any commit's hook.
        self.wake_checkpointer();
        self.reopen()
    }

    /// Whether the statements only read, by SQLite's account.
    pub fn all_read_only(&self, statements: &[Statement]) -> bool {
        engine::all_read_only(&self.db, statements)
    }

    /// Reads (never through the log), under the read rules.
    pub fn query(&self, statements: &[Statement], opts: &ExecOptions) -> Vec<Value> {
        let limits = ReadLimits {
            deadline: std::time::Instant::now() + std::time::Duration::from_secs(60),
            max_bytes: usize::MAX,
        };
        engine::query(&self.db, statements, opts, limits)
    }
}

/// A consistent copy of a live file, page for page (SQLite's backup in
/// one step, under one read transaction): the copy holds the same rows
/// with the same rowids, unlike `VACUUM INTO`, which may renumber the
/// rowids of tables without an `INTEGER PRIMARY KEY`.
pub fn copy_to(conn: &Connection, to: &Path) -> rusqlite::Result<()> {
    let _ = std::fs::remove_file(to);
    let mut copy = Connection::open(to)?;
    let backup = rusqlite::backup::Backup::new(conn, &mut copy)?;
    match backup.step(-1)? {
        rusqlite::backup::StepResult::Done => Ok(()),
        // One step copies every page unless the source is busy or locked.
        _ => Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("the copy did not finish in one step".into()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::parse_statements;
    use serde_json::json;

    fn stmts(body: &str) -> Vec<Statement> {
        parse_statements(body.as_bytes()).unwrap()
    }

    /// Applies `body` as entry `index` (term 1, leader 1); its results.
    fn apply(sm: &mut StateMachine, index: u64, body: &str, transaction: bool) -> Vec<Value> {
        let opts = ExecOptions {
            transaction,
            ..Default::default()
        };
        let at = Applied {
            term: 1,
            leader: 1,
            index,
        };
        sm.apply(at, &stmts(body), &opts, &WriteEnv::default())
            .unwrap()
            .unwrap()
    }

    /// Two nodes on files: `running` applies every entry on one
    /// connection; `restarted` is opened again just before the last entry.
    /// Both must answer it alike and end with the same rows.
    fn a_restart_changes_nothing(setup: &[(&str, bool)], last: &str, check: &str) {
        let dir = tempfile::tempdir().unwrap();
        let open =
            |name: &str| StateMachine::open(&dir.path().join(name), Default::default()).unwrap();
        let (mut running, mut restarted) = (open("a.sqlite"), open("b.sqlite"));
        for (i, (body, transaction)) in setup.iter().enumerate() {
            let a = apply(&mut running, i as u64 + 1, body, *transaction);
            let b = apply(&mut restarted, i as u64 + 1, body, *transaction);
            assert_eq!(a, b, "{body}");
        }
        drop(restarted);
        let mut restarted = open("b.sqlite");
        let index = setup.len() as u64 + 1;
        let a = apply(&mut running, index, last, false);
        let b = apply(&mut restarted, index, last, false);
        assert_eq!(a, b, "the answers of {last}");
        let (a, b) = (
            running.query(&stmts(check), &ExecOptions::default()),
            restarted.query(&stmts(check), &ExecOptions::default()),
        );
        assert_eq!(a, b, "the rows after {last}");
    }

    /// An apply stopped at its time (on an async thread) leaves nothing
    /// behind, whatever it had done, and the entry run again whole answers
    /// and writes as on a node that never stopped it: the clock decides
    /// where an entry runs, never what it does. The statement stopped here
    /// runs in a trigger, after a write of the same request and before a
    /// failing one.
    #[test]
    fn an_apply_stopped_at_its_time_leaves_nothing_and_runs_again_alike() {
        let dir = tempfile::tempdir().unwrap();
        let open =
            |name: &str| StateMachine::open(&dir.path().join(name), Default::default()).unwrap();
        let (mut stopped, mut whole) = (open("a.sqlite"), open("b.sqlite"));
        let setup = r#"["CREATE TABLE t (x INTEGER)", "CREATE TABLE log (n INTEGER)",
            "CREATE TRIGGER slow AFTER INSERT ON log BEGIN INSERT INTO t WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000) SELECT x FROM c; END"]"#;
        assert_eq!(
            apply(&mut stopped, 1, setup, false),
            apply(&mut whole, 1, setup, false)
        );
        let body = r#"["INSERT INTO t VALUES (0)", "INSERT INTO log VALUES (1)", "INSERT INTO nowhere VALUES (1)"]"#;
        let statements = stmts(body);
        let (opts, env) = (ExecOptions::default(), WriteEnv::default());
        let at = Applied {
            term: 1,
            leader: 1,
            index: 2,
        };
        let out = stopped
            .apply_entry_until(at, None, Instant::now(), |db, rerun| {
                engine::execute(db, 0, &statements, &opts, &env, rerun)
            })
            .unwrap();
        assert_eq!(out, None, "the apply was not stopped");
        assert_eq!(stopped.applied().unwrap().index, 1);
        let count = r#"["SELECT count(*) FROM t"]"#;
        let rows = |sm: &StateMachine| sm.query(&stmts(count), &ExecOptions::default());
        assert_eq!(
            rows(&stopped)[0]["values"],
            json!([[0]]),
            "a stopped apply left rows behind"
        );
        let (a, b) = (
            apply(&mut stopped, 2, body, false),
            apply(&mut whole, 2, body, false),
        );
        assert_eq!(a, b, "the answers differ");
        assert_eq!(rows(&stopped), rows(&whole));
        assert_eq!(rows(&whole)[0]["values"], json!([[100_001]]));
        // A stop set and cleared leaves the next applies alone.
        let c = r#"["INSERT INTO log VALUES (2)"]"#;
        assert_eq!(
            apply(&mut stopped, 3, c, false),
            apply(&mut whole, 3, c, false)
        );
    }

    /// The WAL goes back into the file on the checkpointer's thread, not
    /// inside a commit (where SQLite's autocheckpoint would put it): after
    /// enough applies, the checkpointer has run, and the file holds the
    /// rows without anyone else checkpointing. The `CREATE TABLE` also
    /// opens the apply connection afresh, which keeps the checkpointer.
    #[test]
    fn the_wal_is_checkpointed_beside_the_applies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let stages = Arc::new(Stages::default());
        let mut sm = StateMachine::open_timed(&path, Default::default(), stages.clone()).unwrap();
        apply(&mut sm, 1, r#"["CREATE TABLE t (v BLOB)"]"#, false);
        // Each row is two pages and more: 600 rows pass the threshold.
        for index in 2..=601 {
            apply(
                &mut sm,
                index,
                r#"["INSERT INTO t VALUES (zeroblob(8000))"]"#,
                false,
            );
        }
        let file_len = || std::fs::metadata(&path).unwrap().len();
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        while (stages.checkpoint.count() == 0 || file_len() < 600 * 8000)
            && Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(stages.checkpoint.count() > 0, "the checkpointer never ran");
        assert!(
            file_len() >= 600 * 8000,
            "the rows never reached the file: {} bytes",
            file_len()
        );
        assert_eq!(
            sm.query(
                &stmts(r#"["SELECT count(*) FROM t"]"#),
                &ExecOptions::default()
            ),
            vec![json!({"columns": ["count(*)"], "types": ["integer"], "values": [[600]]})]
        );
    }

    /// Under writes without a pause the checkpointer never copies the
    /// frames committed while it runs, so the WAL would never start over
    /// and would grow without end (found by review: 688 MB in 20 s). Past
    /// its cap the commit checkpoints itself: the WAL stays bounded.
    #[test]
    fn the_wal_stays_bounded_under_writes_without_a_pause() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let wal = dir.path().join("db.sqlite-wal");
        let mut sm = StateMachine::open(&path, Default::default()).unwrap();
        apply(&mut sm, 1, r#"["CREATE TABLE t (v BLOB)"]"#, false);
        // Two frames a commit (the row's page, the bookkeeping row's):
        // 6,000 commits are three times the cap.
        let mut largest = 0;
        for index in 2..=6001 {
            apply(
                &mut sm,
                index,
                r#"["INSERT INTO t VALUES (zeroblob(3000))"]"#,
                false,
            );
            largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
        }
        // A frame is a page and its 24-byte header; a little room for the
        // commits that find the checkpointer at work.
        let bound = (WAL_CAP_PAGES as u64 + 200) * (4096 + 24);
        assert!(
            largest <= bound,
            "the WAL grew to {largest} bytes (bound {bound})"
        );
    }

    /// SQLite keeps a rolled-back ANALYZE's figures in the connection's
    /// memory: the running node planned with statistics no file held, and
    /// visited rows in another order than a restarted one (attacker
    /// finding B3).
    #[test]
    fn a_rolled_back_analyze_plans_as_a_fresh_connection_would() {
        a_restart_changes_nothing(
            &[
                (
                    r#"["CREATE TABLE s1 (id INTEGER PRIMARY KEY, a, b, x, y)", "CREATE INDEX i1 ON s1 (a, x)", "CREATE INDEX i2 ON s1 (b, y)", "CREATE TABLE out (id INTEGER PRIMARY KEY, v)"]"#,
                    false,
                ),
                (
                    r#"["WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < 1999) INSERT INTO s1 SELECT i, CASE WHEN i % 100 = 0 THEN 1 ELSE i END, 1, (i * 7) % 2000, 2000 - i FROM s"]"#,
                    false,
                ),
                (r#"["ANALYZE"]"#, false),
                (
                    r#"["UPDATE s1 SET a = 1, b = CASE WHEN id % 100 = 0 THEN 1 ELSE id END"]"#,
                    false,
                ),
                (r#"["ANALYZE", "INSERT INTO nosuch VALUES (1)"]"#, true),
            ],
            r#"["INSERT INTO out (v) SELECT id FROM s1 WHERE a = 1 AND b = 1"]"#,
            r#"["SELECT id, v FROM out ORDER BY id"]"#,
        );
    }

    /// Rows of `sqlite_stat1` a dropped index leaves are read by a fresh
    /// connection only (attacker finding B4).
    #[test]
    fn statistics_left_by_a_dropped_index_are_read_alike() {
        a_restart_changes_nothing(
            &[
                (
                    r#"["CREATE TABLE t (a, c)", "CREATE INDEX ta ON t (a)", "CREATE TABLE w (b, d)", "CREATE TABLE o (id INTEGER PRIMARY KEY, a, d)"]"#,
                    false,
                ),
                (
                    r#"["WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 10) INSERT INTO t SELECT i, i FROM s", "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < 1999) INSERT INTO w SELECT (i * 7) % 2000, i FROM s"]"#,
                    false,
                ),
                (r#"["ANALYZE"]"#, false),
                (r#"["DROP INDEX ta"]"#, false),
            ],
            r#"["INSERT INTO o (a, d) SELECT t.a, w.d FROM t, w WHERE w.b = t.c"]"#,
            r#"["SELECT id, a, d FROM o ORDER BY id"]"#,
        );
    }

    #[test]
    fn entries_apply_once_and_the_index_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let opts = ExecOptions::default();
        {
            let mut sm = StateMachine::open(&path, Default::default()).unwrap();
            assert_eq!(sm.applied().unwrap(), Applied::default());
            sm.apply(
                Applied {
                    term: 1,
                    leader: 1,
                    index: 1,
                },
                &stmts(r#"["CREATE TABLE t (x)"]"#),
                &opts,
                &WriteEnv::default(),
            )
            .unwrap()
            .unwrap();
            let r = sm
                .apply(
                    Applied {
                        term: 1,
                        leader: 1,
                        index: 2,
                    },
                    &stmts(r#"["INSERT INTO t VALUES (1)"]"#),
                    &opts,
                    &WriteEnv::default(),
                )
                .unwrap()
                .unwrap();
            assert_eq!(r, vec![json!({"last_insert_id": 1, "rows_affected": 1})]);
            assert_eq!(
                sm.apply(
                    Applied {
                        term: 1,
                        leader: 1,
                        index: 2
                    },
                    &stmts(r#"["INSERT INTO t VALUES (1)"]"#),
                    &opts,
                    &WriteEnv::default()
                )
                .unwrap(),
                None,
                "replayed entry skipped"
            );
        }
        let mut sm = StateMachine::open(&path, Default::default()).unwrap();
        assert_eq!(
            sm.applied().unwrap(),
            Applied {
                term: 1,
                leader: 1,
                index: 2
            }
        );
        assert_eq!(
            sm.apply(
                Applied {
                    term: 1,
                    leader: 1,
                    index: 1
                },
                &stmts(r#"["INSERT INTO t VALUES (9)"]"#),
                &opts,
                &WriteEnv::default()
            )
            .unwrap(),
            None
        );
        let q = sm.query(&stmts(r#"["SELECT COUNT(*) FROM t"]"#), &opts);
        assert_eq!(q[0]["values"], json!([[1]]), "applied exactly once");
    }

    #[test]
    fn a_failed_transaction_still_advances_the_index_and_leaves_no_rows() {
        let mut sm = StateMachine::open_in_memory().unwrap();
        let tx = ExecOptions {
            transaction: true,
            ..Default::default()
        };
        sm.apply(
            Applied {
                term: 1,
                leader: 1,
                index: 1,
            },
            &stmts(r#"["CREATE TABLE t (x)"]"#),
            &tx,
            &WriteEnv::default(),
        )
        .unwrap();
        let r = sm
            .apply(
                Applied {
                    term: 1,
                    leader: 1,
                    index: 2,
                },
                &stmts(r#"["INSERT INTO t VALUES (1)", "INSERT INTO nope VALUES (2)"]"#),
                &tx,
                &WriteEnv::default(),
            )
            .unwrap()
            .unwrap();
        assert!(r[1]["error"].is_string());
        assert_eq!(
            sm.applied().unwrap().index,
            2,
            "the entry counts as applied on every node"
        );
        assert_eq!(
            sm.query(&stmts(r#"["SELECT COUNT(*) FROM t"]"#), &tx)[0]["values"],
            json!([[0]]),
            "no partial writes"
        );
    }

    #[test]
    fn clients_cannot_touch_transactions_or_the_bookkeeping() {
        let mut sm = StateMachine::open_in_memory().unwrap();
        let opts = ExecOptions::default();
        let r = sm
            .apply(
                Applied {
                    term: 1,
                    leader: 1,
                    index: 1,
                },
                &stmts(r#"["BEGIN", "UPDATE _scaleout_applied SET log_index = 0", "commit"]"#),
                &opts,
                &WriteEnv::default(),
            )
            .unwrap()
            .unwrap();
        assert!(r[0]["error"].as_str().unwrap().contains("?transaction"));
        assert!(r[1]["error"].as_str().unwrap().contains("reserved"));
        assert!(r[2]["error"].as_str().unwrap().contains("?transaction"));
        assert_eq!(sm.applied().unwrap().index, 1);
        let q = sm.query(&stmts(r#"["SELECT * FROM _scaleout_applied"]"#), &opts);
        assert!(q[0]["error"].as_str().unwrap().contains("reserved"));
    }
}
