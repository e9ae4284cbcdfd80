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
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder};
use rusqlite::fallible_iterator::FallibleIterator;
use rusqlite::Connection;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use super::{io_error, Command, Entry, LogId, StorageError, StoredMembership, TypeConfig};
use crate::engine::{self, ExecOptions, RESERVED_PREFIX};
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
}

impl StateStore {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir.join(SNAPSHOTS)).map_err(|e| sm_error(ErrorVerb::Read, e))?;
        let mut sm =
            StateMachine::open(&dir.join(DB_FILE)).map_err(|e| sm_error(ErrorVerb::Read, e))?;
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
        Ok(StateStore {
            sm: Arc::new(Mutex::new(sm)),
            dir: dir.to_path_buf(),
        })
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.join(DB_FILE)
    }

    fn snapshots(&self) -> PathBuf {
        self.dir.join(SNAPSHOTS)
    }
}

/// Applies one entry; its results are the client's answer.
fn run(conn: &Connection, entry: &Entry) -> Vec<Value> {
    match &entry.payload {
        EntryPayload::Normal(command) => run_command(conn, command),
        EntryPayload::Blank | EntryPayload::Membership(_) => Vec::new(),
    }
}

fn run_command(conn: &Connection, command: &Command) -> Vec<Value> {
    match command {
        Command::Execute { statements, opts } => engine::execute(conn, statements, opts),
        Command::Load { sql, replace } => vec![load(conn, sql, *replace)],
        Command::Barrier => Vec::new(),
        Command::Batch(commands) => commands
            .iter()
            .map(|c| Value::Array(run_command(conn, c)))
            .collect(),
    }
}

/// `/db/load`: all of `sql` or none of it; with `replace`, the database
/// is emptied first. Transaction control in the text (as in a `.dump`) is
/// skipped: the load is one transaction already.
fn load(conn: &Connection, sql: &str, replace: bool) -> Value {
    let outcome = (|| -> rusqlite::Result<usize> {
        conn.execute_batch("SAVEPOINT scaleout_load")?;
        if replace {
            drop_everything(conn)?;
        }
        let mut batch = rusqlite::Batch::new(conn, sql);
        let mut count = 0;
        while let Some(mut stmt) = batch.next()? {
            let text = stmt.expanded_sql().unwrap_or_default();
            let first = text
                .split(|c: char| c.is_whitespace() || c == ';')
                .find(|w| !w.is_empty())
                .unwrap_or("")
                .to_ascii_lowercase();
            if matches!(first.as_str(), "begin" | "commit" | "end" | "rollback") {
                continue;
            }
            stmt.raw_execute()?;
            count += 1;
        }
        conn.execute_batch("RELEASE scaleout_load")?;
        Ok(count)
    })();
    match outcome {
        Ok(count) => json!({ "statements": count }),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO scaleout_load; RELEASE scaleout_load");
            json!({ "error": e.to_string() })
        }
    }
}

fn drop_everything(conn: &Connection) -> rusqlite::Result<()> {
    let objects: Vec<(String, String)> = conn
        .prepare(
            "SELECT type, name FROM sqlite_schema
             WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%'",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (kind, name) in objects {
        if name.starts_with(RESERVED_PREFIX) {
            continue;
        }
        let quoted = name.replace('"', "\"\"");
        conn.execute_batch(&format!(
            "DROP {} IF EXISTS \"{quoted}\"",
            kind.to_uppercase()
        ))?;
    }
    Ok(())
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
        let Some(last) = entries.last().map(|e| e.log_id) else {
            return Ok(Vec::new());
        };
        let membership = entries
            .iter()
            .rev()
            .find_map(|e| match &e.payload {
                EntryPayload::Membership(m) => {
                    Some(StoredMembership::new(Some(e.log_id), m.clone()))
                }
                _ => None,
            })
            .map(|m| serde_json::to_string(&m))
            .transpose()
            .map_err(|e| sm_error(ErrorVerb::Write, e))?;
        let sm = self.sm.clone();
        blocking(move || {
            lock(&sm)
                .apply_batch(applied_of(&last), membership.as_deref(), |conn| {
                    entries.iter().map(|e| run(conn, e)).collect()
                })
                .map_err(|e| sm_error(ErrorVerb::Write, e))
        })
        .await
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

/// Read-only connections to the state file, a few at a time.
pub struct Readers {
    conns: Mutex<Vec<Connection>>,
    permits: Semaphore,
}

impl Readers {
    pub fn open(path: &Path, count: usize) -> rusqlite::Result<Self> {
        let conns = (0..count)
            .map(|_| {
                let conn = Connection::open(path)?;
                conn.execute_batch("PRAGMA query_only=1; PRAGMA busy_timeout=5000;")?;
                Ok(conn)
            })
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Readers {
            permits: Semaphore::new(conns.len()),
            conns: Mutex::new(conns),
        })
    }

    /// Runs `f` on a free connection, off the async threads.
    pub async fn with<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Connection) -> T + Send + 'static,
    ) -> Result<T, String> {
        let _permit = self.permits.acquire().await.map_err(|e| e.to_string())?;
        let conn = self
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
            .ok_or("no free reader")?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let out = f(&conn);
            me.conns
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(conn);
            out
        })
        .await
        .map_err(|e| e.to_string())
    }

    /// Runs the statements in one read transaction (one snapshot of the
    /// data), and returns their results with the index of the state they
    /// saw, read in the same transaction.
    pub async fn query(
        self: &Arc<Self>,
        statements: Vec<Statement>,
        opts: ExecOptions,
    ) -> Result<(Vec<Value>, u64), String> {
        self.with(move |conn| {
            let snapshot = conn.unchecked_transaction().map_err(|e| e.to_string())?;
            let applied = state::applied_state(conn)
                .map_err(|e| e.to_string())?
                .applied
                .map_or(0, |a| a.index);
            let results = engine::query(conn, &statements, &opts);
            drop(snapshot);
            Ok((results, applied))
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::parse_statements;

    fn entry(index: u64, sql: &str) -> Entry {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::Execute {
                statements: parse_statements(sql.as_bytes()).unwrap(),
                opts: ExecOptions::default(),
            }),
        }
    }

    #[tokio::test]
    async fn a_database_behind_its_snapshot_is_restored_from_it_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = StateStore::open(dir.path()).unwrap();
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
        let mut store = StateStore::open(dir.path()).unwrap();
        let (applied, _) = store.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(2));
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
    }

    fn in_tx(conn: &mut Connection, f: impl FnOnce(&Connection) -> Value) -> Value {
        let tx = conn.transaction().unwrap();
        let out = f(&tx);
        tx.commit().unwrap();
        out
    }

    #[test]
    fn a_load_runs_a_dump_inside_the_callers_transaction() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE old (x); CREATE TABLE _scaleout_applied (id);")
            .unwrap();
        let dump = "PRAGMA foreign_keys=OFF;\nBEGIN TRANSACTION;\nCREATE TABLE b (x);\nINSERT INTO b VALUES(1);\nCREATE TRIGGER tr AFTER INSERT ON b BEGIN INSERT INTO b VALUES (NULL); END;\nCOMMIT;\n";
        let out = in_tx(&mut conn, |c| load(c, dump, true));
        assert_eq!(out, json!({ "statements": 4 }));
        let names: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_schema ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            names,
            vec!["_scaleout_applied", "b", "tr"],
            "old dropped, bookkeeping kept"
        );
        // A failing load changes nothing.
        let out = in_tx(&mut conn, |c| {
            load(
                c,
                "INSERT INTO b VALUES (2); INSERT INTO nope VALUES (1);",
                false,
            )
        });
        assert!(out["error"].as_str().unwrap().contains("no such table"));
        let n: i64 = conn
            .query_row("SELECT count(*) FROM b", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }
}
