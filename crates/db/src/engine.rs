//! Statements executed on SQLite, answered in rqlite's shapes.
//!
//! - execute: `{"last_insert_id", "rows_affected"}` per statement, or
//!   `{"error"}`. With `transaction`, all statements run in one transaction
//!   and the first error rolls it back and stops (no partial writes);
//!   without, each statement stands alone and an error does not stop the
//!   rest.
//! - query: `{"columns", "types", "values"}`, or with `associative`
//!   `{"types": {col: type}, "rows": [{col: value}]}`; a statement that
//!   would change the database is refused.
//! - `time` (seconds) per result when `timings` is asked for.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rusqlite::fallible_iterator::FallibleIterator;
use rusqlite::hooks::{Action, TransactionOperation};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, ToSql};
use serde_json::{json, Map, Value};

use crate::determinism::{FixedFunctions, Moment};
use crate::guard::{Fault, Guard, Mode, Tripped};
use crate::request::{Param, Params, Statement};
use crate::values::{self, Decl};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExecOptions {
    pub transaction: bool,
    pub timings: bool,
    pub associative: bool,
    /// `/db/request`: the reads among the writes answer with their rows.
    #[serde(default)]
    pub rows: bool,
}

impl ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value as V};
        Ok(ToSqlOutput::Owned(match self {
            Param::Null => V::Null,
            Param::Integer(i) => V::Integer(*i),
            Param::Real(f) => V::Real(*f),
            Param::Text(s) => V::Text(s.clone()),
        }))
    }
}

/// Whether SQLite found no statement in the text it prepared (only
/// spaces, comments or semicolons): it then gives no statement at all,
/// and running that one is misuse (`SQLITE_MISUSE`, which the guard takes
/// for a fault of the node: one blank statement stopped every node that
/// applied it, found by review), reading its counters a panic. SQLite's
/// text of a statement it prepared is never absent; a statement with
/// parameters or columns is one.
fn holds_nothing(stmt: &rusqlite::Statement<'_>) -> bool {
    stmt.parameter_count() == 0 && stmt.column_count() == 0 && stmt.expanded_sql().is_none()
}

/// Why a statement could not be prepared: SQLite refused it (its
/// authorizer included), or the request's parameters do not fit it.
enum Prepared {
    Sqlite(rusqlite::Error),
    Request(String),
}

/// SQLite reads SQL text up to its first NUL byte: what follows would be
/// dropped without a word (found by review).
const NUL_IN_SQL: &str = "the SQL holds a NUL byte (SQLite would ignore everything after it)";

fn whole_text(s: &Statement) -> Result<(), Prepared> {
    if s.sql.contains('\0') {
        return Err(Prepared::Request(NUL_IN_SQL.into()));
    }
    Ok(())
}

fn prepare<'c>(conn: &'c Connection, s: &Statement) -> Result<rusqlite::Statement<'c>, Prepared> {
    whole_text(s)?;
    let mut stmt = conn.prepare(&s.sql).map_err(Prepared::Sqlite)?;
    bind(&mut stmt, s)?;
    Ok(stmt)
}

/// [`prepare`] through the connection's statement cache: for read
/// connections, whose statements are all prepared under the read rules
/// (a statement the authorizer refuses is never cached; one SQLite
/// prepares again after a schema change meets the authorizer again, in
/// the same mode). Parsing and planning a point query cost about as much
/// as running it. A statement whose parameters do not bind leaves the
/// cache (else any statement, however large, sent with a wrong parameter
/// would stay; the caller drops those not [`worth_keeping`]).
fn prepare_cached<'c>(
    conn: &'c Connection,
    s: &Statement,
) -> Result<rusqlite::CachedStatement<'c>, Prepared> {
    whole_text(s)?;
    let mut stmt = conn.prepare_cached(&s.sql).map_err(Prepared::Sqlite)?;
    if let Err(e) = bind(&mut stmt, s) {
        stmt.discard();
        return Err(e);
    }
    Ok(stmt)
}

/// The node's own `PRAGMA schema_version`, as it sits in a read
/// connection's statement cache: tagged with a number drawn once per
/// process, so no client's text can be the same and take it from the
/// cache without meeting the read rules.
fn schema_version_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| tag("PRAGMA schema_version"))
}

/// `sql` followed by a comment holding a number drawn once per process:
/// the node's own statements sit in a read connection's statement cache
/// under text no client can send (a client's text meets the read rules
/// when it is prepared; a cached statement would not again).
fn tag(sql: &str) -> String {
    static TAG: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let tag = TAG.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::process::id().into());
        h.finish()
    });
    format!("{sql} /* scaleout {tag:016x} */")
}

/// The node's own statements run on every read, kept prepared (see [`tag`]).
/// Those of the apply connection too: each entry's transaction and each
/// request's savepoint (parsing them cost more than the one-row INSERT
/// they wrap).
pub struct Own {
    pub begin: String,
    pub begin_immediate: String,
    pub commit: String,
    pub rollback: String,
    pub applied: String,
    pub savepoint: String,
    pub release: String,
    pub rollback_to: String,
}

pub fn own() -> &'static Own {
    static OWN: std::sync::OnceLock<Own> = std::sync::OnceLock::new();
    OWN.get_or_init(|| Own {
        begin: tag("BEGIN"),
        begin_immediate: tag("BEGIN IMMEDIATE"),
        commit: tag("COMMIT"),
        rollback: tag("ROLLBACK"),
        applied: tag(crate::state::APPLIED_SQL),
        savepoint: tag("SAVEPOINT scaleout_request"),
        release: tag("RELEASE scaleout_request"),
        rollback_to: tag("ROLLBACK TO scaleout_request"),
    })
}

/// Binds a request's parameters (all of them: a cached statement's
/// bindings were cleared when it went back to the cache).
fn bind(stmt: &mut rusqlite::Statement<'_>, s: &Statement) -> Result<(), Prepared> {
    if holds_nothing(stmt) {
        return Err(Prepared::Request(
            "empty statement: the SQL holds only spaces, comments or semicolons".into(),
        ));
    }
    match &s.params {
        Params::None => {}
        Params::Positional(values) => {
            if values.len() != stmt.parameter_count() {
                return Err(Prepared::Request(format!(
                    "the statement takes {} parameters, {} given",
                    stmt.parameter_count(),
                    values.len()
                )));
            }
            for (i, v) in values.iter().enumerate() {
                stmt.raw_bind_parameter(i + 1, v)
                    .map_err(|e| Prepared::Request(e.to_string()))?;
            }
        }
        Params::Named(values) => {
            for (name, v) in values {
                let index = [":", "@", "$"]
                    .iter()
                    .find_map(|p| stmt.parameter_index(&format!("{p}{name}")).ok().flatten())
                    .ok_or_else(|| {
                        Prepared::Request(format!("the statement has no parameter named {name:?}"))
                    })?;
                stmt.raw_bind_parameter(index, v)
                    .map_err(|e| Prepared::Request(e.to_string()))?;
            }
        }
    }
    Ok(())
}

fn with_time(mut result: Value, started: Instant, timings: bool) -> Value {
    if timings {
        if let Some(obj) = result.as_object_mut() {
            obj.insert("time".into(), json!(started.elapsed().as_secs_f64()));
        }
    }
    result
}

/// What the leader fixed for one write, carried in its log entry so that
/// every node applies it the same way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WriteEnv {
    /// The time and randomness its functions see.
    pub moment: Moment,
    /// SQLite VM steps the request may take (0: unbounded).
    pub budget: u64,
}

/// A connection with the rules for clients' SQL installed: the guard on
/// every connection, the fixed functions on the one that applies writes.
pub struct Guarded {
    pub conn: Connection,
    pub guard: Guard,
    fixed: Option<FixedFunctions>,
    /// The table in which a row took the last rowid since the statement
    /// began, as SQLite's update hook reports it (writer only).
    last_rowid: Arc<Mutex<Option<String>>>,
    /// The schema version the statement cache was filled under.
    cached_schema: std::sync::atomic::AtomicI64,
}

impl Guarded {
    /// The connection that applies the log.
    pub fn writer(conn: Connection, shutdown: Arc<AtomicBool>) -> rusqlite::Result<Self> {
        let guard = Guard::install(&conn, shutdown, crate::guard::Every::Budget)?;
        let fixed = FixedFunctions::install(&conn)?;
        // Where `last_insert_rowid()` and `changes()` are reset before
        // each write (a temporary table: nothing reaches the file).
        conn.execute_batch("CREATE TEMP TABLE IF NOT EXISTS _scaleout_reset (x)")?;
        // Every row SQLite writes passes the update hook with its rowid,
        // whatever wrote it: a statement, a trigger, a virtual table's own
        // statements. The hook sees a row take the last rowid even when
        // the same statement removes it again, which no look at the table
        // afterwards could.
        let last_rowid = Arc::new(Mutex::new(None));
        let seen = Arc::clone(&last_rowid);
        conn.update_hook(Some(
            move |action: Action, _db: &str, table: &str, rowid: i64| {
                if rowid == LAST_ROWID
                    && matches!(action, Action::SQLITE_INSERT | Action::SQLITE_UPDATE)
                {
                    *lock(&seen) = Some(table.to_string());
                }
            },
        ));
        Ok(Guarded {
            conn,
            guard,
            fixed: Some(fixed),
            last_rowid,
            cached_schema: std::sync::atomic::AtomicI64::new(i64::MIN),
        })
    }

    /// A connection that serves reads.
    pub fn reader(conn: Connection, shutdown: Arc<AtomicBool>) -> rusqlite::Result<Self> {
        let guard = Guard::install(&conn, shutdown, crate::guard::Every::Deadline)?;
        Ok(Guarded {
            conn,
            guard,
            fixed: None,
            last_rowid: Arc::default(),
            cached_schema: std::sync::atomic::AtomicI64::new(i64::MIN),
        })
    }

    /// Empties the statement cache when the schema has changed since it
    /// was filled. SQLite prepares a stale statement again only when it
    /// is stepped, and a read takes the columns before: `SELECT *` would
    /// name the old columns. Run inside the read's transaction, so the
    /// version is the one the read sees.
    fn fresh_statement_cache(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.guard.set_mode(Mode::Internal);
        let version = self
            .conn
            .prepare_cached(schema_version_sql())
            .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
            .unwrap_or(i64::MAX);
        if self.cached_schema.swap(version, Relaxed) != version {
            self.conn.flush_prepared_statement_cache();
        }
    }

    /// Runs the node's own SQL (no rules, no budget).
    pub fn internal(&self, sql: &str) -> rusqlite::Result<()> {
        self.guard.set_mode(Mode::Internal);
        self.conn.execute_batch(sql)
    }

    /// [`Self::internal`] for one statement of [`own`], kept prepared.
    pub fn internal_cached(&self, sql: &str) -> rusqlite::Result<()> {
        self.guard.set_mode(Mode::Internal);
        self.conn.prepare_cached(sql)?.execute([]).map(|_| ())
    }

    fn start_write(&self, env: &WriteEnv) -> Result<(), Fault> {
        if let Some(fixed) = &self.fixed {
            fixed.start(env.moment);
        }
        self.guard.start_write(env.budget);
        // last_insert_rowid() and changes() describe the request's own
        // statements only, on every node (the connection's history
        // differs: restarts, snapshots).
        self.guard.set_mode(Mode::Internal);
        let reset = |sql: &str| {
            self.conn
                .prepare_cached(sql)
                .and_then(|mut s| s.execute([]))
                .map_err(|e| Fault(format!("resetting the connection: {e}")))
        };
        reset("INSERT OR REPLACE INTO temp._scaleout_reset (rowid, x) VALUES (0, 0)")?;
        reset("UPDATE temp._scaleout_reset SET x = x WHERE 0")?;
        Ok(())
    }
}

/// How one statement of a write ended, when it did not succeed.
enum Failed {
    /// The client's SQL failed, the same way on every node: an answer.
    Client(String),
    /// The statement failed and took the surrounding transaction with it
    /// (`RAISE(ROLLBACK)`, `OR ROLLBACK`, an interrupted write) or left
    /// what replicas cannot reproduce: the entry is run again without it.
    Ended(String),
    Fault(Fault),
}

/// Where a write statement sits in a log entry: (request, statement).
pub type Position = (usize, usize);

/// A run of one entry's writes that had to stop: the statement at
/// `position` ended the transaction. The caller rolls back and runs the
/// entry again with that statement answered `error` and not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub position: Position,
    pub error: String,
}

/// What an earlier run of the same entry found, for the next run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rerun {
    /// Statements that ended the transaction, with their errors: answered,
    /// not run.
    pub skipped: BTreeMap<Position, String>,
    /// The entry's commit failed on a deferred foreign key: each request
    /// now checks its own, and one that leaves a violation is rolled back
    /// alone.
    pub check_deferred: bool,
    /// Requests not run at all, answered with this error for each of
    /// their statements: they ended the transaction too often.
    pub dropped: BTreeMap<usize, String>,
    /// How many times the entry has run.
    pub runs: usize,
}

/// Statements of one request that may end the transaction (each costs a
/// run of the whole entry) before the request is dropped whole.
pub const REQUEST_ENDS: usize = 8;
/// Runs of one entry after which any request that ends the transaction
/// is dropped whole: with one run per statement, a request of many
/// statements that each end it would cost runs in proportion to the
/// square of its length.
pub const ENTRY_RUNS: usize = 32;

impl Rerun {
    /// What the next run does about the statement that ended this one.
    pub fn after(&mut self, ended: Ended) {
        let (request, _) = ended.position;
        let ends = self.skipped.keys().filter(|(r, _)| *r == request).count();
        self.runs += 1;
        if ends + 1 >= REQUEST_ENDS || self.runs >= ENTRY_RUNS {
            self.dropped.insert(
                request,
                format!(
                    "the request was not applied: its statements ended the transaction {} times, the last with: {}",
                    ends + 1,
                    ended.error
                ),
            );
        } else {
            self.skipped.insert(ended.position, ended.error);
        }
    }
}

/// With [`Rerun::check_deferred`]: whether the request left a foreign key
/// violation (the database holds none before it: every commit checks).
fn violates_foreign_keys(db: &Guarded) -> Result<bool, Fault> {
    db.guard.set_mode(Mode::Internal);
    let tables: Vec<String> = db
        .conn
        .prepare_cached(
            "SELECT name FROM pragma_table_list WHERE schema = 'main' AND type = 'table'",
        )
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(|e| Fault(e.to_string()))?;
    for table in tables {
        let checked = db
            .conn
            .prepare_cached("SELECT 1 FROM pragma_foreign_key_check(?1, 'main')")
            .and_then(|mut s| s.exists([&table]));
        match checked {
            Ok(true) => return Ok(true),
            Ok(false) => {}
            // A key that cannot be checked (a "foreign key mismatch": no
            // unique index on the parent's columns) is one SQLite refuses
            // on every write that touches it; the node's own failures
            // stop the apply.
            Err(e) => {
                db.guard.classify(&e)?;
            }
        }
    }
    Ok(false)
}

const DEFERRED_VIOLATION: &str =
    "FOREIGN KEY constraint failed (a deferred key, checked at commit): nothing of this request was applied";

/// Why a write could not be applied.
#[derive(Debug)]
pub enum Stop {
    Ended(Ended),
    Fault(Fault),
}

impl From<Fault> for Stop {
    fn from(f: Fault) -> Self {
        Stop::Fault(f)
    }
}

/// The rowid after which SQLite picks new rowids at random (which no
/// replica could reproduce): no row may hold it.
const LAST_ROWID: i64 = i64::MAX;

/// `SQLITE_FULL` is the node's (its disk) unless the statement wrote an
/// `AUTOINCREMENT` table, whose counter SQLite reports full at the last
/// rowid — the same on every node — and the disk has room to spare.
fn full_is_the_clients(
    db: &Guarded,
    e: &rusqlite::Error,
    writes: &std::collections::BTreeSet<String>,
) -> bool {
    if e.sqlite_error_code() != Some(rusqlite::ErrorCode::DiskFull) {
        return false;
    }
    db.guard.set_mode(Mode::Internal);
    let autoincrement = writes.iter().any(|t| {
        db.conn
            .prepare_cached(
                "SELECT 1 FROM sqlite_schema WHERE name = ?1 AND sql LIKE '%AUTOINCREMENT%'",
            )
            .and_then(|mut s| s.exists([t]))
            .unwrap_or(false)
    });
    let room = match db.conn.path().filter(|p| !p.is_empty()) {
        // In memory: no disk to fill.
        None => true,
        Some(p) => std::path::Path::new(p)
            .parent()
            .and_then(|dir| nix::sys::statvfs::statvfs(dir).ok())
            .is_some_and(|fs| {
                fs.blocks_available().saturating_mul(fs.fragment_size()) > FULL_MARGIN
            }),
    };
    autoincrement && room
}

/// Free space below which `SQLITE_FULL` is taken for a full disk.
const FULL_MARGIN: u64 = 256 * 1024 * 1024;

/// Bytes of rows the reads of one write request may answer with (every
/// node builds the answer as it applies the entry).
const ROWS_IN_WRITE: usize = 16 * 1024 * 1024;

/// Runs one statement of a write. With `rows` (`/db/request`), a
/// statement SQLite reports as read-only is answered with its rows.
fn execute_one(
    db: &Guarded,
    s: &Statement,
    rows: Option<(bool, &mut usize)>,
) -> Result<Value, Failed> {
    let conn = &db.conn;
    let failed = |e: rusqlite::Error, writes: &std::collections::BTreeSet<String>| {
        let verdict = if full_is_the_clients(db, &e, writes) {
            Ok(e.to_string())
        } else {
            db.guard.classify(&e)
        };
        match verdict {
            Ok(msg) if conn.is_autocommit() => Failed::Ended(msg),
            Ok(msg) => Failed::Client(msg),
            Err(fault) => Failed::Fault(fault),
        }
    };
    db.guard.set_mode(Mode::Write);
    let mut stmt = prepare(conn, s).map_err(|e| match e {
        Prepared::Sqlite(e) => failed(e, &Default::default()),
        Prepared::Request(msg) => Failed::Client(msg),
    })?;
    let writes = db.guard.take_writes();
    db.watch_rowids();
    if let Some((associative, left)) = rows.filter(|_| stmt.readonly()) {
        return rows_of(&mut stmt, associative, left, ROWS_IN_WRITE).map_err(|e| match e {
            RowsError::Sqlite(e) => failed(e, &writes),
            RowsError::TooBig(msg) => Failed::Client(msg),
        });
    }
    let changes_before = conn.total_changes();
    let mut rows = stmt.raw_query();
    loop {
        match rows.next() {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                drop(rows);
                let failure = failed(e, &writes);
                return Err(match failure {
                    Failed::Client(_) => db.took_last_rowid().unwrap_or(failure),
                    other => other,
                });
            }
        }
    }
    drop(rows);
    drop(stmt);
    if let Some(ended) = db.took_last_rowid() {
        return Err(ended);
    }
    left_replayable(db)?;
    Ok(counters(conn, conn.total_changes() - changes_before))
}

/// A write's result in rqlite's shape: `last_insert_id` and
/// `rows_affected`, each left out when zero (as rqlite does), and both
/// left out for a statement that changed no row (DDL reports nothing,
/// where SQLite's `changes()` still holds an earlier statement's count).
fn counters(conn: &Connection, changed: u64) -> Value {
    let mut result = Map::new();
    if changed > 0 {
        let id = conn.last_insert_rowid();
        if id != 0 {
            result.insert("last_insert_id".into(), json!(id));
        }
        let n = conn.changes();
        if n != 0 {
            result.insert("rows_affected".into(), json!(n));
        }
    }
    Value::Object(result)
}

/// After a write statement that succeeded: whether it left what every
/// node can reproduce. It may have ended the transaction it ran in; then
/// the entry runs again without it.
fn left_replayable(db: &Guarded) -> Result<(), Failed> {
    if db.conn.is_autocommit() {
        return Err(Failed::Ended(
            "the statement ended the transaction it ran in".into(),
        ));
    }
    Ok(())
}

impl Guarded {
    /// Forgets the last rowid seen: a statement starts.
    fn watch_rowids(&self) {
        lock(&self.last_rowid).take();
    }

    /// Whether a row took the last rowid during the statement, however
    /// the statement ended: one that fails with FAIL semantics
    /// (`RAISE(FAIL)`, `OR FAIL`) keeps what it wrote before failing.
    /// After the last rowid SQLite draws new rowids from its own random
    /// generator, which no other node could reproduce, so the entry runs
    /// again without the statement.
    fn took_last_rowid(&self) -> Option<Failed> {
        lock(&self.last_rowid)
            .take()
            .map(|table| Failed::Ended(last_rowid_error(&table)))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn last_rowid_error(table: &str) -> String {
    format!(
        "rowid {LAST_ROWID} in {table:?} is not allowed: after it SQLite picks rowids at random, which replicas could not reproduce"
    )
}

/// Runs one request's write statements on the apply connection, inside
/// the caller's transaction; `request` is its place in the entry and
/// `skipped` the statements an earlier run found ending the transaction.
/// One result per statement run. With `transaction`, the request's
/// statements apply all or none: the first error rolls them back and
/// stops.
pub fn execute(
    db: &Guarded,
    request: usize,
    statements: &[Statement],
    opts: &ExecOptions,
    env: &WriteEnv,
    rerun: &Rerun,
) -> Result<Vec<Value>, Stop> {
    if let Some(error) = rerun.dropped.get(&request) {
        return Ok(statements
            .iter()
            .map(|_| json!({ "error": error }))
            .collect());
    }
    db.start_write(env)?;
    let own = own();
    let internal = |sql: &str| db.internal_cached(sql).map_err(|e| Fault(e.to_string()));
    let mut results = Vec::with_capacity(statements.len());
    let own_savepoint = opts.transaction || rerun.check_deferred;
    let mut rows_left = ROWS_IN_WRITE;
    if own_savepoint {
        internal(&own.savepoint)?;
    }
    for (k, s) in statements.iter().enumerate() {
        let started = Instant::now();
        let outcome = match rerun.skipped.get(&(request, k)) {
            Some(error) => Err(Failed::Client(error.clone())),
            None => execute_one(
                db,
                s,
                opts.rows.then_some((opts.associative, &mut rows_left)),
            ),
        };
        match outcome {
            Ok(r) => results.push(with_time(r, started, opts.timings)),
            Err(Failed::Client(e)) => {
                results.push(json!({ "error": e }));
                if opts.transaction {
                    internal(&own.rollback_to)?;
                    internal(&own.release)?;
                    return Ok(results);
                }
            }
            Err(Failed::Ended(error)) => {
                return Err(Stop::Ended(Ended {
                    position: (request, k),
                    error,
                }))
            }
            Err(Failed::Fault(f)) => return Err(Stop::Fault(f)),
        }
    }
    if rerun.check_deferred && violates_foreign_keys(db)? {
        internal(&own.rollback_to)?;
        for r in &mut results {
            if r.get("error").is_none() {
                *r = json!({ "error": DEFERRED_VIOLATION });
            }
        }
    }
    if own_savepoint {
        internal(&own.release)?;
    }
    Ok(results)
}

/// `/db/load` on the apply connection: all of `sql` or none of it; with
/// `replace`, the database is emptied first (a whole file loaded). It
/// runs under the write rules; the transaction control a dump holds
/// (`BEGIN`, `COMMIT`, as SQLite's parser reports it) is skipped, since
/// the load is one transaction already. Each statement gets the budget.
pub fn load(
    db: &Guarded,
    request: usize,
    sql: &str,
    replace: bool,
    env: &WriteEnv,
    rerun: &Rerun,
) -> Result<Value, Stop> {
    if let Some(error) = rerun
        .skipped
        .get(&(request, 0))
        .or_else(|| rerun.dropped.get(&request))
    {
        return Ok(json!({ "error": error }));
    }
    db.start_write(env)?;
    let internal = |sql: &str| db.internal(sql).map_err(|e| Fault(e.to_string()));
    internal("SAVEPOINT scaleout_load")?;
    let changes_before = db.conn.total_changes();
    // The load's keys were deferred: check them all now (switching the
    // deferral off would forget what it counted).
    let outcome = load_statements(db, sql, replace, env).and_then(|count| {
        match violates_foreign_keys(db).map_err(Failed::Fault)? {
            true => Err(Failed::Client(
                "FOREIGN KEY constraint failed: the loaded rows leave a key without its parent"
                    .into(),
            )),
            false => Ok(count),
        }
    });
    match outcome {
        Ok(count) => {
            // rqlite answers a load with an execute's result: here the
            // rows the whole load changed (with the rows a replacing load
            // removed) and the last rowid it made.
            let changed = db.conn.total_changes() - changes_before;
            let mut result = Map::new();
            let id = db.conn.last_insert_rowid();
            if changed > 0 && id != 0 {
                result.insert("last_insert_id".into(), json!(id));
            }
            if changed > 0 {
                result.insert("rows_affected".into(), json!(changed));
            }
            tracing::debug!(statements = count, rows = changed, "loaded");
            internal("RELEASE scaleout_load; PRAGMA defer_foreign_keys = OFF")?;
            Ok(Value::Object(result))
        }
        Err(Failed::Client(e)) => {
            internal(
                "ROLLBACK TO scaleout_load; RELEASE scaleout_load; PRAGMA defer_foreign_keys = OFF",
            )?;
            Ok(json!({ "error": format!("load: {e}; nothing was loaded") }))
        }
        Err(Failed::Ended(error)) => Err(Stop::Ended(Ended {
            position: (request, 0),
            error: format!("load: {error}; nothing was loaded"),
        })),
        Err(Failed::Fault(f)) => Err(Stop::Fault(f)),
    }
}

fn load_statements(
    db: &Guarded,
    sql: &str,
    replace: bool,
    env: &WriteEnv,
) -> Result<usize, Failed> {
    let conn = &db.conn;
    let failed = |e: rusqlite::Error| match db.guard.classify(&e) {
        Ok(msg) if conn.is_autocommit() => Failed::Ended(msg),
        Ok(msg) => Failed::Client(msg),
        Err(fault) => Failed::Fault(fault),
    };
    // Foreign keys are checked when the entry commits, not statement by
    // statement: a dump may insert children before parents, and emptying
    // the database drops parents before children (reset by SQLite at the
    // commit; switched off again below for the entry's other requests).
    db.guard.set_mode(Mode::Internal);
    conn.execute_batch("PRAGMA defer_foreign_keys = ON")
        .map_err(failed)?;
    if replace {
        drop_everything(conn).map_err(failed)?;
    }
    if sql.contains('\0') {
        return Err(Failed::Client(NUL_IN_SQL.into()));
    }
    let mut batch = rusqlite::Batch::new(conn, sql);
    let mut count = 0;
    loop {
        db.guard.set_mode(Mode::Load);
        db.guard.start_write(env.budget);
        let Some(mut stmt) = batch.next().map_err(failed)? else {
            break;
        };
        if db.guard.no_op_in_load() {
            continue;
        }
        match db.guard.transaction_control() {
            None => {}
            Some(TransactionOperation::Rollback) => {
                return Err(Failed::Client(
                    "the text holds a ROLLBACK (a dump of a database with errors ends so)".into(),
                ))
            }
            // BEGIN, COMMIT, END: the load is one transaction already.
            Some(_) => continue,
        }
        db.guard.take_writes();
        db.watch_rowids();
        let executed = stmt.raw_execute();
        drop(stmt);
        if let Some(ended) = db.took_last_rowid() {
            return Err(ended);
        }
        executed.map_err(failed)?;
        left_replayable(db)?;
        count += 1;
    }
    Ok(count)
}

/// Drops every table and view of the client's (the node's own state
/// stays).
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

/// Tables of the node's own, out of clients' reach.
pub const RESERVED_PREFIX: &str = "_scaleout_";

/// What bounds one read request.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// It is stopped at this moment (rqlite's `db_timeout`).
    pub deadline: Instant,
    /// Bytes of values all its results may hold together.
    pub max_bytes: usize,
}

/// The bytes a value adds to an answer as JSON (control characters,
/// quotes and backslashes escaped: up to six bytes each).
fn size_of(v: ValueRef<'_>) -> usize {
    match v {
        ValueRef::Null | ValueRef::Integer(_) | ValueRef::Real(_) => 24,
        ValueRef::Text(t) => json_text_size(t),
        ValueRef::Blob(b) => b.len() * 4 / 3 + 4,
    }
}

fn json_text_size(t: &[u8]) -> usize {
    t.len()
        + 2
        + t.iter()
            .filter(|b| **b < 0x20 || **b == b'"' || **b == b'\\')
            .count()
            * 5
}

fn query_one(
    db: &Guarded,
    s: &Statement,
    associative: bool,
    left: &mut usize,
    max_bytes: usize,
) -> Result<Value, String> {
    let failed = |e: rusqlite::Error| match db.guard.classify(&e) {
        Ok(msg) => msg,
        Err(fault) => fault.0,
    };
    db.guard.set_mode(Mode::Read);
    let prepared = |e| match e {
        Prepared::Sqlite(e) => failed(e),
        Prepared::Request(msg) => msg,
    };
    let rows = |stmt: &mut rusqlite::Statement<'_>, left: &mut usize| {
        if !stmt.readonly() {
            return Err("attempt to change database via query operation".to_string());
        }
        rows_of(stmt, associative, left, max_bytes).map_err(|e| match e {
            RowsError::Sqlite(e) => failed(e),
            RowsError::TooBig(msg) => msg,
        })
    };
    // Statements stay prepared, those with their values written in too:
    // clients send the same text again and again (a dashboard's count, a
    // page's lookup by key). One that takes more memory than
    // [`CACHED_STATEMENT_BYTES`] (a many-way join) is prepared each time,
    // so whatever clients send, the cache holds at most that much per
    // statement.
    let mut cached = prepare_cached(&db.conn, s).map_err(prepared)?;
    let answer = rows(&mut cached, left);
    if !worth_keeping(&cached) {
        cached.discard();
    }
    answer
}

/// Whether a read statement is small enough to stay prepared.
fn worth_keeping(stmt: &rusqlite::Statement<'_>) -> bool {
    stmt.get_status(rusqlite::StatementStatus::MemUsed) <= CACHED_STATEMENT_BYTES
}

/// The most memory a read statement kept prepared may take (SQLite's
/// count; a point query by key takes about 2 KiB).
const CACHED_STATEMENT_BYTES: i32 = 8 * 1024;

/// Why a statement's rows could not be read.
enum RowsError {
    Sqlite(rusqlite::Error),
    /// Past the answer's size limit (the same on every node).
    TooBig(String),
}

/// Steps a prepared statement to its end and answers its rows in
/// rqlite's shape; `left` is what the answer may still hold, in bytes.
fn rows_of(
    stmt: &mut rusqlite::Statement<'_>,
    associative: bool,
    left: &mut usize,
    max_bytes: usize,
) -> Result<Value, RowsError> {
    let columns: Vec<String> = stmt.column_names().into_iter().map(String::from).collect();
    let mut types: Vec<String> = stmt
        .columns()
        .iter()
        .map(|c| c.decl_type().unwrap_or("").to_ascii_lowercase())
        .collect();
    let decls: Vec<Decl> = types.iter().map(|t| Decl::of(t)).collect();
    // Columns that declare no type take the first row's (as rqlite does).
    let mut untyped = types.iter().any(String::is_empty);
    // With `associative`, every row repeats the column names.
    let per_row: usize = if associative {
        columns
            .iter()
            .map(|c| json_text_size(c.as_bytes()) + 1)
            .sum()
    } else {
        0
    };
    let too_big = || {
        RowsError::TooBig(format!(
            "the results are larger than {max_bytes} bytes: page through them with LIMIT and OFFSET"
        ))
    };
    *left = left
        .checked_sub(
            columns
                .iter()
                .map(|c| json_text_size(c.as_bytes()) * 2)
                .sum(),
        )
        .ok_or_else(too_big)?;
    let mut table = Vec::new();
    let mut rows = stmt.raw_query();
    while let Some(row) = rows.next().map_err(RowsError::Sqlite)? {
        *left = left.checked_sub(per_row).ok_or_else(too_big)?;
        let mut out = Vec::with_capacity(columns.len());
        for (i, decl) in decls.iter().enumerate() {
            let v = row.get_ref(i).map_err(RowsError::Sqlite)?;
            *left = left.checked_sub(size_of(v)).ok_or_else(too_big)?;
            if untyped && types[i].is_empty() {
                types[i] = values::type_of(v).to_string();
            }
            out.push(values::to_json(v, *decl));
        }
        untyped = false;
        table.push(out);
    }
    if associative {
        let types: Map<String, Value> = columns
            .iter()
            .cloned()
            .zip(types.into_iter().map(Value::String))
            .collect();
        let rows: Vec<Value> = table
            .into_iter()
            .map(|row| Value::Object(columns.iter().cloned().zip(row).collect()))
            .collect();
        return Ok(json!({ "types": types, "rows": rows }));
    }
    let mut result = json!({ "columns": columns, "types": types });
    if !table.is_empty() {
        result["values"] = json!(table);
    }
    Ok(result)
}

/// Whether every statement is a read by SQLite's own account (prepared
/// under the read rules, never run): what `/db/request` serves without
/// the log. A statement SQLite cannot prepare here counts as a write, so
/// that the log's apply answers it.
pub fn all_read_only(db: &Guarded, statements: &[Statement]) -> bool {
    db.guard.set_mode(Mode::Read);
    let read_only = statements
        .iter()
        .all(|s| prepare(&db.conn, s).is_ok_and(|stmt| stmt.readonly()));
    db.guard.set_mode(Mode::Internal);
    read_only
}

/// Runs read statements on a read connection; one result per statement.
/// Every statement is prepared under the read rules, must be read-only by
/// SQLite's own account, and stops at the limits.
pub fn query(
    db: &Guarded,
    statements: &[Statement],
    opts: &ExecOptions,
    limits: ReadLimits,
) -> Vec<Value> {
    query_until(db, statements, opts, limits).0
}

/// [`query`], and whether any statement was stopped at the deadline.
pub fn query_until(
    db: &Guarded,
    statements: &[Statement],
    opts: &ExecOptions,
    limits: ReadLimits,
) -> (Vec<Value>, bool) {
    db.fresh_statement_cache();
    db.guard.start_read(limits.deadline);
    let mut left = limits.max_bytes;
    let mut stopped = false;
    let results = statements
        .iter()
        .map(|s| {
            let started = Instant::now();
            // Between statements too: each may take few, long steps, which
            // the progress handler's count never reaches (found by review).
            if started >= limits.deadline {
                stopped = true;
                return json!({ "error": "the query ran past its time limit and was stopped" });
            }
            let result = match query_one(db, s, opts.associative, &mut left, limits.max_bytes) {
                Ok(r) => with_time(r, started, opts.timings),
                Err(e) => json!({ "error": e }),
            };
            stopped |= db.guard.tripped() == Some(Tripped::Deadline);
            result
        })
        .collect();
    db.guard.set_mode(Mode::Internal);
    db.guard.unbounded();
    (results, stopped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::parse_statements;
    use crate::state::{Applied, StateMachine};

    /// A state machine fed entries by hand, as the log would.
    struct Db {
        sm: StateMachine,
        index: u64,
        budget: u64,
    }

    fn at(index: u64) -> Applied {
        Applied {
            term: 1,
            leader: 1,
            index,
        }
    }

    impl Db {
        fn new(schema: &str) -> Db {
            let mut db = Db {
                sm: StateMachine::open_in_memory().unwrap(),
                index: 0,
                budget: 0,
            };
            if !schema.is_empty() {
                let r = db.exec(&serde_json::to_string(&vec![schema]).unwrap(), false);
                assert!(r[0].get("error").is_none(), "{r:?}");
            }
            db
        }

        /// One log entry holding these requests (group commit).
        fn batch(&mut self, requests: &[(&str, bool)]) -> Vec<Vec<Value>> {
            let parsed: Vec<(Vec<Statement>, ExecOptions)> = requests
                .iter()
                .map(|(body, transaction)| {
                    (
                        parse_statements(body.as_bytes()).unwrap(),
                        ExecOptions {
                            transaction: *transaction,
                            ..Default::default()
                        },
                    )
                })
                .collect();
            self.index += 1;
            let env = WriteEnv {
                moment: Moment {
                    unix_ms: 1_700_000_000_000,
                    seed: self.index,
                },
                budget: self.budget,
            };
            self.sm
                .apply_entry(at(self.index), None, |db, rerun| {
                    parsed
                        .iter()
                        .enumerate()
                        .map(|(i, (statements, opts))| {
                            execute(db, i, statements, opts, &env, rerun)
                        })
                        .collect()
                })
                .unwrap()
        }

        fn exec(&mut self, body: &str, transaction: bool) -> Vec<Value> {
            self.batch(&[(body, transaction)]).remove(0)
        }

        fn query(&self, body: &str) -> Vec<Value> {
            self.sm.query(
                &parse_statements(body.as_bytes()).unwrap(),
                &ExecOptions::default(),
            )
        }

        fn count(&self, table: &str) -> i64 {
            let r = self.query(&format!(r#"["SELECT count(*) FROM {table}"]"#));
            r[0]["values"][0][0].as_i64().unwrap()
        }
    }

    fn error_of(v: &Value) -> &str {
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error in {v}"))
    }

    const FOO: &str = "CREATE TABLE foo (id INTEGER NOT NULL PRIMARY KEY, name TEXT, age INTEGER)";

    #[test]
    fn executes_with_every_parameter_form() {
        let mut db = Db::new(FOO);
        let r = db.exec(
            r#"["INSERT INTO foo(name) VALUES('fiona')", ["INSERT INTO foo(name, age) VALUES(?, ?)", "declan", 20], ["INSERT INTO foo(name, age) VALUES(:name, :age)", {"name": "aoife", "age": 30}]]"#,
            false,
        );
        assert_eq!(
            r,
            vec![
                json!({"last_insert_id": 1, "rows_affected": 1}),
                json!({"last_insert_id": 2, "rows_affected": 1}),
                json!({"last_insert_id": 3, "rows_affected": 1}),
            ]
        );
        let q = db.query(r#"["SELECT id, name, age FROM foo WHERE age > 10 ORDER BY id"]"#);
        assert_eq!(
            q[0],
            json!({"columns": ["id", "name", "age"], "types": ["integer", "text", "integer"], "values": [[2, "declan", 20], [3, "aoife", 30]]})
        );
        let assoc = db.sm.query(
            &parse_statements(br#"[["SELECT name FROM foo WHERE id = ?", 1]]"#).unwrap(),
            &ExecOptions {
                associative: true,
                ..Default::default()
            },
        );
        assert_eq!(
            assoc[0],
            json!({"types": {"name": "text"}, "rows": [{"name": "fiona"}]})
        );
    }

    #[test]
    fn errors_are_per_statement_and_transactions_leave_nothing_behind() {
        let mut db = Db::new(FOO);
        let r = db.exec(
            r#"["INSERT INTO foo(name) VALUES('a')", "INSERT INTO nope VALUES(1)", "INSERT INTO foo(name) VALUES('b')"]"#,
            false,
        );
        assert_eq!(r.len(), 3);
        assert!(error_of(&r[1]).contains("no such table: nope"));
        assert_eq!(db.count("foo"), 2, "without a transaction the others stand");
        let r = db.exec(
            r#"["INSERT INTO foo(name) VALUES('c')", "INSERT INTO nope VALUES(1)", "INSERT INTO foo(name) VALUES('d')"]"#,
            true,
        );
        assert_eq!(r.len(), 2, "stops at the first error");
        assert_eq!(
            db.count("foo"),
            2,
            "a failed transaction leaves no partial writes"
        );
        let r = db.exec(r#"[["INSERT INTO foo(name) VALUES(?)", 1, 2]]"#, false);
        assert!(error_of(&r[0]).contains("takes 1 parameters, 2 given"));
        let r = db.exec(r#"[["INSERT INTO foo(name) VALUES(:n)", {"x": 1}]]"#, false);
        assert!(error_of(&r[0]).contains("no parameter named \"x\""));
    }

    #[test]
    fn queries_cannot_write_and_report_timings_and_blobs() {
        let db = Db::new(FOO);
        let q = db.query(r#"["DELETE FROM foo"]"#);
        assert_eq!(
            q[0],
            json!({"error": "attempt to change database via query operation"})
        );
        let q = db.sm.query(
            &parse_statements(br#"["SELECT x'00ff10' AS b, 1.5 AS r, NULL AS n"]"#).unwrap(),
            &ExecOptions {
                timings: true,
                ..Default::default()
            },
        );
        assert_eq!(q[0]["values"], json!([["AP8Q", 1.5, null]]));
        assert!(q[0]["time"].as_f64().unwrap() >= 0.0);
        assert_eq!(crate::values::base64(b"hello"), "aGVsbG8=");
        let empty = db.query(r#"["SELECT * FROM foo"]"#);
        assert!(
            empty[0].get("values").is_none(),
            "no rows: no values key, as rqlite"
        );
    }

    /// Issue 12's first finding: one request's SQL ended the group
    /// commit's transaction and took other clients' writes with it.
    #[test]
    fn no_request_can_end_the_transaction_other_requests_share() {
        let mut db = Db::new(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, who TEXT UNIQUE ON CONFLICT ROLLBACK)",
        );
        let r = db.exec(
            r#"["CREATE TRIGGER tr AFTER INSERT ON t WHEN new.who = 'raise' BEGIN SELECT RAISE(ROLLBACK, 'raised'); END"]"#,
            false,
        );
        assert!(r[0].get("error").is_none(), "{r:?}");
        let r = db.batch(&[
            (r#"["INSERT INTO t (who) VALUES ('a')"]"#, false),
            (r#"["/**/ROLLBACK"]"#, false),
            (r#"["-- comment\nCOMMIT"]"#, false),
            (r#"["INSERT INTO t (who) VALUES ('b')"]"#, false),
            (r#"["INSERT INTO t (who) VALUES ('raise')", "INSERT INTO t (who) VALUES ('c')"]"#, false),
            (r#"["INSERT INTO t (who) VALUES ('d')", "INSERT OR ROLLBACK INTO t (id, who) VALUES (1, 'dup')"]"#, true),
            (r#"["INSERT INTO t (who) VALUES ('a')"]"#, false),
            (r#"["END TRANSACTION", "SAVEPOINT x", "release x", "BEGIN IMMEDIATE"]"#, false),
            (r#"["INSERT INTO t (who) VALUES ('e')"]"#, false),
        ]);
        assert!(r[0][0].get("error").is_none());
        assert!(error_of(&r[1][0]).contains("transaction control"), "{r:?}");
        assert!(error_of(&r[2][0]).contains("transaction control"));
        assert_eq!(error_of(&r[4][0]), "raised");
        assert!(
            r[4][1].get("error").is_none(),
            "the request's next statement still runs"
        );
        assert_eq!(r[5].len(), 2);
        assert!(error_of(&r[5][1]).contains("UNIQUE"), "{r:?}");
        assert!(
            error_of(&r[6][0]).contains("UNIQUE"),
            "ON CONFLICT ROLLBACK in the schema"
        );
        for e in &r[7] {
            assert!(error_of(e).contains("transaction control"));
        }
        let who = db.query(r#"["SELECT who FROM t ORDER BY id"]"#);
        assert_eq!(
            who[0]["values"],
            json!([["a"], ["b"], ["c"], ["e"]]),
            "every write not refused is there, 'd' went with its transaction"
        );
    }

    #[test]
    fn a_runaway_write_stops_at_its_budget_and_the_others_commit() {
        let mut db = Db::new("CREATE TABLE t (x)");
        db.budget = 2_000_000;
        let r = db.batch(&[
            (r#"["INSERT INTO t VALUES (1)"]"#, false),
            (r#"["INSERT INTO t SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT x FROM c)"]"#, false),
            (r#"["INSERT INTO t VALUES (2)"]"#, false),
        ]);
        assert!(error_of(&r[1][0]).contains("budget of 2000000"), "{r:?}");
        assert_eq!(db.count("t"), 2);
    }

    /// A step that reads a large value costs its bytes: a few steps over
    /// megabytes no longer slip under a budget of millions (attacker
    /// finding B7).
    #[test]
    fn a_write_pays_for_the_bytes_its_searches_read() {
        let mut db = Db::new("CREATE TABLE z (v)");
        db.budget = 1_000_000;
        let r = db.exec(
            r#"["WITH RECURSIVE s(i, x) AS (SELECT 1, hex(zeroblob(50000)) UNION ALL SELECT i + 1, x FROM s WHERE i < 1000) INSERT INTO z SELECT count(*) FROM s WHERE length(replace(x, '0', '1')) > 0", "INSERT INTO z VALUES (7)"]"#,
            false,
        );
        assert!(error_of(&r[0]).contains("budget"), "{r:?}");
        assert!(r[1].get("error").is_none(), "{r:?}");
        assert_eq!(db.count("z"), 1);
    }

    /// A read's deadline holds when each step is long: the few steps of a
    /// search over large values never reached a check every thousand
    /// (attacker finding B9).
    #[test]
    fn a_read_of_few_long_steps_stops_at_its_deadline() {
        let reader =
            Guarded::reader(Connection::open_in_memory().unwrap(), Arc::default()).unwrap();
        let slow = parse_statements(
            br#"["WITH RECURSIVE s(i, x) AS (SELECT 1, hex(zeroblob(500000)) UNION ALL SELECT i + 1, x FROM s WHERE i < 400) SELECT count(*) FROM s WHERE length(replace(x, '0', '1')) > 0"]"#,
        )
        .unwrap();
        let limits = ReadLimits {
            deadline: Instant::now() + std::time::Duration::from_millis(100),
            max_bytes: 1024,
        };
        let r = query(&reader, &slow, &ExecOptions::default(), limits);
        assert!(error_of(&r[0]).contains("time limit"), "{r:?}");
    }

    #[test]
    fn a_read_stops_at_its_deadline_and_its_size_limit() {
        let db = Db::new("");
        let runaway = parse_statements(
            br#"["WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c", "SELECT 1"]"#,
        )
        .unwrap();
        let limits = ReadLimits {
            deadline: Instant::now() + std::time::Duration::from_millis(200),
            max_bytes: 1024,
        };
        let reader =
            Guarded::reader(Connection::open_in_memory().unwrap(), Arc::default()).unwrap();
        let r = query(&reader, &runaway, &ExecOptions::default(), limits);
        assert!(error_of(&r[0]).contains("time limit"), "{r:?}");
        let big = parse_statements(br#"["SELECT zeroblob(100) FROM (VALUES (1), (2), (3), (4), (5), (6), (7), (8), (9), (10))"]"#).unwrap();
        let limits = ReadLimits {
            deadline: Instant::now() + std::time::Duration::from_secs(60),
            max_bytes: 1024,
        };
        let r = query(&reader, &big, &ExecOptions::default(), limits);
        assert!(error_of(&r[0]).contains("larger than 1024 bytes"), "{r:?}");
        drop(db);
    }

    #[test]
    fn the_last_rowid_is_refused_so_sqlite_never_picks_one_at_random() {
        let mut db = Db::new("CREATE TABLE t (x)");
        let r = db.batch(&[
            (r#"["INSERT INTO t VALUES (1)"]"#, false),
            (r#"["INSERT INTO t (rowid, x) VALUES (9223372036854775807, 2)", "INSERT INTO t (x) VALUES (3)"]"#, false),
            (r#"["UPDATE t SET rowid = 9223372036854775807 WHERE x = 1"]"#, false),
        ]);
        assert!(error_of(&r[1][0]).contains("9223372036854775807"), "{r:?}");
        assert!(error_of(&r[2][0]).contains("9223372036854775807"), "{r:?}");
        assert!(r[1][1].get("error").is_none());
        assert_eq!(
            db.query(r#"["SELECT max(rowid) FROM t"]"#)[0]["values"],
            json!([[2]])
        );
    }

    /// Every rowid of `table`, in order.
    fn rowids(db: &Db, table: &str) -> Value {
        db.query(&format!(r#"["SELECT rowid FROM {table} ORDER BY rowid"]"#))[0]["values"].clone()
    }

    /// A statement that fails with FAIL semantics keeps what it did before
    /// failing (SQLite's documented `RAISE(FAIL)` and `OR FAIL`): the last
    /// rowid it stored must not outlive it, or every later insert gets a
    /// rowid drawn from this node's own randomness (found by
    /// `scaleout chaos`: replicas and voters ended with different rows).
    #[test]
    fn a_failed_statement_cannot_leave_the_last_rowid_behind() {
        let mut db = Db::new("CREATE TABLE t (a)");
        db.exec(r#"["CREATE TRIGGER f AFTER INSERT ON t WHEN new.a = 1 BEGIN SELECT RAISE(FAIL, 'boom'); END"]"#, false);
        let r = db.batch(&[
            (r#"["INSERT INTO t (rowid, a) VALUES (9223372036854775807, 1)", "INSERT INTO t (a) VALUES (2)"]"#, false),
            (r#"["INSERT OR FAIL INTO t (rowid, a) SELECT 9223372036854775807, 5 UNION ALL SELECT 9223372036854775807, 6"]"#, false),
            (r#"["INSERT INTO t (a) VALUES (3)"]"#, false),
        ]);
        assert!(error_of(&r[0][0]).contains("9223372036854775807"), "{r:?}");
        assert!(error_of(&r[1][0]).contains("9223372036854775807"), "{r:?}");
        assert_eq!(rowids(&db, "t"), json!([[1], [2]]), "{r:?}");
    }

    /// One statement can store the last rowid, make SQLite draw a random
    /// rowid for another row, and delete the last rowid again, all before
    /// it ends: no check after the statement would see it.
    /// The clock may not stand in an index or a generated column: an
    /// index on `julianday('now')` held keys no later entry could find,
    /// and every node stopped on a corrupt index (attacker finding B1). A
    /// CHECK may read it: it is evaluated as a row is written, with the
    /// entry's moment, the same on every node, and nothing keeps it.
    #[test]
    fn the_clock_stays_out_of_indexes_and_generated_columns() {
        let mut db = Db::new("CREATE TABLE g (a)");
        let r = db.exec(
            r#"["CREATE INDEX gi ON g (julianday('now'))", "CREATE TABLE g2 (a, b AS (julianday('now')))", "CREATE INDEX gc ON g (current_timestamp)", "CREATE INDEX gp ON g (a) WHERE a < unixepoch('subsec')"]"#,
            false,
        );
        for (i, result) in r.iter().enumerate() {
            assert!(error_of(result).contains("non-deterministic"), "{i}: {r:?}");
        }
        let r = db.exec(
            r#"["INSERT INTO g VALUES (1)", "DELETE FROM g WHERE a = 1", "CREATE TABLE g3 (a CHECK (a < unixepoch('subsec')))", "INSERT INTO g3 VALUES (1)"]"#,
            false,
        );
        assert!(r.iter().all(|x| x.get("error").is_none()), "{r:?}");
    }

    /// `'subsec'` as the time value reads the clock too (attacker finding
    /// B2): it gets the entry's moment, with milliseconds.
    #[test]
    fn subsec_reads_the_moment_not_the_clock() {
        let mut db = Db::new("CREATE TABLE t (v, w, x, y)");
        db.exec(
            r#"["INSERT INTO t VALUES (unixepoch('subsec'), datetime('SUBSECOND'), strftime('%f', 'subsec'), timediff('subsec', '1970-01-01'))"]"#,
            false,
        );
        let rows = db.query(r#"["SELECT v, w, x, y FROM t"]"#);
        // The moment of the entry: 1_700_000_000_000 ms (see Db::batch).
        assert_eq!(
            rows[0]["values"],
            json!([[
                1_700_000_000.0,
                "2023-11-14 22:13:20.000",
                "20.000",
                "+0053-10-13 22:13:20.000"
            ]]),
            "{rows:?}"
        );
    }

    /// Each statement that ends the transaction costs a run of the whole
    /// entry; a request of many such statements is dropped whole after a
    /// few, instead of costing runs in proportion to the square of its
    /// length (attacker finding B8). Its neighbours in the entry commit.
    #[test]
    fn a_request_that_keeps_ending_the_transaction_is_dropped_whole() {
        let mut db = Db::new("CREATE TABLE cu (k UNIQUE)");
        db.exec(r#"["INSERT INTO cu VALUES (1)"]"#, false);
        let many: Vec<&str> = (0..400)
            .map(|_| "INSERT OR ROLLBACK INTO cu (k) VALUES (1)")
            .collect();
        let many = serde_json::to_string(&many).unwrap();
        let r = db.batch(&[
            (r#"["INSERT INTO cu VALUES (2)"]"#, false),
            (&many, false),
            (r#"["INSERT INTO cu VALUES (3)"]"#, false),
        ]);
        assert!(r[0][0].get("error").is_none(), "{:?}", r[0]);
        assert_eq!(r[1].len(), 400);
        assert!(
            r[1].iter().all(|x| error_of(x).contains("not applied")),
            "{:?}",
            &r[1][..2]
        );
        assert!(r[2][0].get("error").is_none(), "{:?}", r[2]);
        assert_eq!(db.count("cu"), 3);
    }

    /// What a connection has registered differs between a node that
    /// restarted and one that did not (attacker finding B6).
    #[test]
    fn a_write_cannot_read_what_the_connection_registered() {
        let mut db = Db::new("CREATE TABLE t (v)");
        let r = db.exec(
            r#"["INSERT INTO t SELECT count(*) FROM pragma_module_list", "INSERT INTO t SELECT count(*) FROM pragma_function_list", "INSERT INTO t SELECT count(*) FROM pragma_table_list"]"#,
            false,
        );
        assert!(error_of(&r[0]).contains("module_list"), "{r:?}");
        assert!(error_of(&r[1]).contains("function_list"), "{r:?}");
        assert!(r[2].get("error").is_none(), "{r:?}");
    }

    #[test]
    fn the_last_rowid_is_refused_even_when_the_statement_removes_it_again() {
        let mut db = Db::new("CREATE TABLE t (a)");
        db.exec(r#"["CREATE TABLE log (a)", "CREATE TRIGGER g AFTER INSERT ON log BEGIN INSERT INTO t (rowid, a) VALUES (9223372036854775807, 0); INSERT INTO t (a) VALUES (new.a); DELETE FROM t WHERE rowid = 9223372036854775807; END"]"#, false);
        let r = db.batch(&[
            (r#"["INSERT INTO t (a) VALUES (1)"]"#, false),
            (r#"["INSERT INTO log VALUES (7)"]"#, false),
            (r#"["INSERT INTO t (a) VALUES (2)"]"#, false),
        ]);
        assert!(error_of(&r[1][0]).contains("9223372036854775807"), "{r:?}");
        assert_eq!(rowids(&db, "t"), json!([[1], [2]]), "{r:?}");
        assert_eq!(db.count("log"), 0);
    }

    #[test]
    fn a_deferred_foreign_key_fails_its_own_request_only() {
        let mut db = Db::new("CREATE TABLE parent (id INTEGER PRIMARY KEY)");
        db.exec(r#"["CREATE TABLE child (id INTEGER PRIMARY KEY, p REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)", "INSERT INTO parent VALUES (1)"]"#, false);
        let r = db.batch(&[
            (r#"["INSERT INTO child (p) VALUES (1)"]"#, false),
            (r#"["INSERT INTO child (p) VALUES (42)"]"#, false),
            (
                r#"["INSERT INTO child (p) VALUES (7)", "INSERT INTO parent VALUES (7)"]"#,
                true,
            ),
        ]);
        assert!(r[0][0].get("error").is_none());
        assert!(error_of(&r[1][0]).contains("FOREIGN KEY"), "{r:?}");
        assert!(
            r[2][0].get("error").is_none(),
            "resolved within its request: {r:?}"
        );
        assert_eq!(
            db.query(r#"["SELECT p FROM child ORDER BY id"]"#)[0]["values"],
            json!([[1], [7]])
        );
    }

    #[test]
    fn the_nodes_files_and_connection_state_are_out_of_reach() {
        let mut db = Db::new("CREATE TABLE t (x)");
        for sql in [
            "ATTACH DATABASE '/tmp/scaleout-attack.sqlite' AS x",
            "VACUUM INTO '/tmp/scaleout-attack.sqlite'",
            "CREATE TEMP TABLE tt (x)",
            "UPDATE _scaleout_applied SET log_index = 0",
            "CREATE TRIGGER evil AFTER UPDATE ON _scaleout_applied BEGIN SELECT 1; END",
            "PRAGMA foreign_keys = OFF",
            "PRAGMA writable_schema = 1",
            "INSERT INTO t SELECT total_changes()",
            "INSERT INTO t SELECT page_count FROM pragma_page_count",
            "INSERT INTO t SELECT rootpage FROM sqlite_schema",
            "INSERT INTO t SELECT datetime('now', 'localtime')",
        ] {
            let r = db.exec(&serde_json::to_string(&vec![sql]).unwrap(), false);
            assert!(r[0].get("error").is_some(), "{sql} was allowed");
        }
        assert!(!std::path::Path::new("/tmp/scaleout-attack.sqlite").exists());
        let r = db.exec(
            r#"["CREATE TABLE d (x DEFAULT (total_changes()))", "INSERT INTO d DEFAULT VALUES"]"#,
            false,
        );
        assert!(
            error_of(&r[1]).contains("total_changes"),
            "a DEFAULT calls the same functions: {r:?}"
        );
        for sql in [
            "ATTACH DATABASE ':memory:' AS x",
            "SELECT * FROM _scaleout_applied",
            "PRAGMA query_only = 0",
            "BEGIN",
        ] {
            let r = db.query(&serde_json::to_string(&vec![sql]).unwrap());
            assert!(r[0].get("error").is_some(), "read {sql} was allowed");
        }
        assert_eq!(db.count("t"), 0);
    }

    #[test]
    fn changes_and_last_insert_rowid_describe_the_request_alone() {
        let mut db = Db::new("CREATE TABLE t (a, b)");
        db.exec(r#"["INSERT INTO t VALUES (1, 1), (2, 2), (3, 3)"]"#, false);
        db.exec(
            r#"["INSERT INTO t SELECT last_insert_rowid(), changes()"]"#,
            false,
        );
        db.exec(
            r#"["UPDATE t SET b = b", "INSERT INTO t SELECT last_insert_rowid(), changes()"]"#,
            false,
        );
        let r = db.query(r#"["SELECT a, b FROM t WHERE rowid > 3 ORDER BY rowid"]"#);
        assert_eq!(r[0]["values"], json!([[0, 0], [0, 4]]));
    }

    // ---- the attacker's findings (issue 12's review), one test each ----

    /// F1a: a deferred key checked against a parent without a unique
    /// index ("foreign key mismatch") failed the re-run's check, taken for
    /// the node's fault: every node stopped applying.
    #[test]
    fn a_key_that_cannot_be_checked_fails_its_request_not_the_node() {
        let mut db = Db::new("CREATE TABLE fp (id INTEGER PRIMARY KEY)");
        db.exec(r#"["CREATE TABLE fc (p REFERENCES fp (id) DEFERRABLE INITIALLY DEFERRED)", "CREATE TABLE mm_p (a)", "CREATE TABLE mm_c (x REFERENCES mm_p (a))"]"#, false);
        let r = db.batch(&[
            (r#"["INSERT INTO fc VALUES (999)"]"#, false),
            (r#"["INSERT INTO fp VALUES (1)"]"#, false),
        ]);
        assert!(r[0][0].get("error").is_some(), "{r:?}");
        assert!(r[1][0].get("error").is_none(), "{r:?}");
        assert_eq!(db.count("fp"), 1);
    }

    /// F1b: an AUTOINCREMENT counter set to the last rowid made the next
    /// insert fail "database or disk is full", taken for the node's fault.
    #[test]
    fn an_autoincrement_counter_at_its_end_fails_the_request_not_the_node() {
        let mut db = Db::new("CREATE TABLE ai (id INTEGER PRIMARY KEY AUTOINCREMENT, v)");
        let r = db.exec(r#"["INSERT INTO ai (v) VALUES (1)", "UPDATE sqlite_sequence SET seq = 9223372036854775807 WHERE name = 'ai'", "INSERT INTO sqlite_sequence VALUES ('x', 1)"]"#, false);
        assert!(error_of(&r[1]).contains("sqlite_sequence"), "{r:?}");
        assert!(error_of(&r[2]).contains("sqlite_sequence"), "{r:?}");
        let r = db.batch(&[
            (
                r#"["INSERT INTO ai (id, v) VALUES (9223372036854775807, 2), (NULL, 3)"]"#,
                false,
            ),
            (r#"["INSERT INTO ai (v) VALUES (4)"]"#, false),
        ]);
        assert!(r[0][0].get("error").is_some(), "{r:?}");
        assert!(r[1][0].get("error").is_none(), "{r:?}");
        assert_eq!(db.count("ai"), 2);
    }

    /// F1c and F2: FTS5's shadow tables cannot be written (the connection
    /// is defensive); FTS5 and R*Tree tables work across requests and
    /// after a restart (their modules' own pragmas are allowed, whatever
    /// the connection prepared before).
    #[test]
    fn virtual_tables_work_across_requests_and_restarts_and_their_internals_are_out_of_reach() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let env = WriteEnv::default();
        let run = |sm: &mut StateMachine, index: u64, body: &str| {
            let statements = parse_statements(body.as_bytes()).unwrap();
            sm.apply(at(index), &statements, &ExecOptions::default(), &env)
                .unwrap()
                .unwrap()
        };
        {
            let mut sm = StateMachine::open(&path, Arc::default()).unwrap();
            let r = run(
                &mut sm,
                1,
                r#"["CREATE VIRTUAL TABLE docs USING fts5(body)", "INSERT INTO docs VALUES ('first')"]"#,
            );
            assert!(r.iter().all(|r| r.get("error").is_none()), "{r:?}");
            let r = run(&mut sm, 2, r#"["INSERT INTO docs VALUES ('second')"]"#);
            assert!(r.iter().all(|r| r.get("error").is_none()), "{r:?}");
            let r = run(
                &mut sm,
                3,
                r#"["UPDATE docs_data SET block = x'ffff' WHERE id > 1", "DELETE FROM docs_idx"]"#,
            );
            assert!(
                r.iter().all(|r| r.get("error").is_some()),
                "shadow tables are read-only: {r:?}"
            );
        }
        let mut sm = StateMachine::open(&path, Arc::default()).unwrap();
        let r = run(&mut sm, 4, r#"["INSERT INTO docs VALUES ('third')"]"#);
        assert!(r[0].get("error").is_none(), "after a restart: {r:?}");
        let q = sm.query(
            &parse_statements(
                br#"["SELECT count(*) FROM docs WHERE docs MATCH 'third OR first'"]"#,
            )
            .unwrap(),
            &ExecOptions::default(),
        );
        assert_eq!(q[0]["values"], json!([[2]]));
    }

    /// F3: a column named `_rowid_` hid the rowid from the last-rowid
    /// check when it looked at the table by name; SQLite's update hook
    /// reports the true rowid, so a table whose columns take all three
    /// names is written like any other. FTS5 writes its rows through its
    /// own statements, which pass the same hook.
    #[test]
    fn a_column_named_like_the_rowid_does_not_hide_it() {
        let mut db = Db::new("CREATE TABLE r1 (_rowid_ TEXT, v)");
        let r = db.exec(r#"["INSERT INTO r1 (rowid, _rowid_, v) VALUES (9223372036854775807, 'a', 1)", "INSERT INTO r1 (_rowid_, v) VALUES ('b', 2)"]"#, false);
        assert!(error_of(&r[0]).contains("9223372036854775807"), "{r:?}");
        assert!(r[1].get("error").is_none());
        let r = db.exec(
            r#"["CREATE TABLE r3 (rowid, oid, _rowid_)", "INSERT INTO r3 VALUES (1, 2, 3)"]"#,
            false,
        );
        assert!(r[0].get("error").is_none(), "{r:?}");
        assert!(r[1].get("error").is_none(), "{r:?}");
        let r = db.exec(
            r#"["CREATE VIRTUAL TABLE ft USING fts5(x)", "INSERT INTO ft (rowid, x) VALUES (9223372036854775807, 'a')", "INSERT INTO ft (x) VALUES ('b')"]"#,
            false,
        );
        assert!(r[0].get("error").is_none(), "{r:?}");
        assert!(error_of(&r[1]).contains("9223372036854775807"), "{r:?}");
        assert!(r[2].get("error").is_none(), "{r:?}");
        assert_eq!(rowids(&db, "ft"), json!([[1]]), "{r:?}");
    }

    /// F6: the result cap counts JSON escapes and, with `associative`,
    /// the column names every row repeats.
    #[test]
    fn the_result_cap_counts_what_the_answer_holds() {
        let reader =
            Guarded::reader(Connection::open_in_memory().unwrap(), Arc::default()).unwrap();
        let limits = || ReadLimits {
            deadline: Instant::now() + std::time::Duration::from_secs(60),
            max_bytes: 100_000,
        };
        let escapes = parse_statements(br#"["SELECT printf('%.*c', 30000, char(1))"]"#).unwrap();
        let r = query(&reader, &escapes, &ExecOptions::default(), limits());
        assert!(error_of(&r[0]).contains("larger than"), "{r:?}");
        let names = parse_statements(
            br#"["WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c LIMIT 200) SELECT NULL AS \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\" FROM c"]"#,
        )
        .unwrap();
        let assoc = ExecOptions {
            associative: true,
            ..Default::default()
        };
        let r = query(&reader, &names, &ExecOptions::default(), limits());
        assert!(
            r[0].get("error").is_none(),
            "as columns and values it fits: {r:?}"
        );
        let r = query(&reader, &names, &assoc, limits());
        assert!(error_of(&r[0]).contains("larger than"), "{r:?}");
    }

    /// F10: ALTER TABLE renames, ANALYZE of everything, and the functions
    /// that describe the build.
    #[test]
    fn ordinary_schema_changes_work_and_build_functions_are_refused() {
        let mut db = Db::new("CREATE TABLE a (x, y)");
        let r = db.exec(r#"["ALTER TABLE a RENAME TO b", "ALTER TABLE b RENAME COLUMN x TO z", "ALTER TABLE b DROP COLUMN y", "ANALYZE", "INSERT INTO b SELECT fts5_source_id()", "INSERT INTO b SELECT compile_options FROM pragma_compile_options"]"#, false);
        for ok in &r[..4] {
            assert!(ok.get("error").is_none(), "{r:?}");
        }
        assert!(error_of(&r[4]).contains("fts5_source_id"), "{r:?}");
        assert!(r[5].get("error").is_some(), "{r:?}");
        // The second review: after ANALYZE, DROP TABLE and DROP INDEX
        // delete their statistics (allowed); a client's own edit is not.
        let r = db.exec(r#"["CREATE TABLE fresh (a)", "CREATE INDEX fa ON fresh (a)", "INSERT INTO fresh VALUES (1)", "ANALYZE", "DROP INDEX fa", "DROP TABLE fresh", "DELETE FROM sqlite_stat1", "CREATE VIRTUAL TABLE r USING rtree(id, a, b)", "CREATE VIRTUAL TABLE f USING fts4(x)"]"#, false);
        for ok in &r[..6] {
            assert!(ok.get("error").is_none(), "{r:?}");
        }
        assert!(error_of(&r[6]).contains("ANALYZE only"), "{r:?}");
        assert!(error_of(&r[7]).contains("rtree"), "{r:?}");
        assert!(error_of(&r[8]).contains("fts4"), "{r:?}");
    }

    /// The second review: an error message that repeats a huge argument
    /// is cut, so an entry's answers stay small on every node.
    #[test]
    fn error_messages_are_bounded() {
        let mut db = Db::new("");
        let r = db.exec(
            r#"["SELECT json_extract('{}', printf('%.*c', 5000000, 'x'))"]"#,
            false,
        );
        let e = error_of(&r[0]);
        assert!(e.len() < 5000, "{} bytes", e.len());
        assert!(e.contains("bytes in all"), "{}", &e[e.len() - 40..]);
    }

    /// F9: a load that replaces a database holding foreign keys.
    #[test]
    fn a_load_replaces_a_database_with_foreign_keys() {
        let mut db = Db::new("CREATE TABLE parent (id INTEGER PRIMARY KEY)");
        db.exec(r#"["CREATE TABLE child (p REFERENCES parent (id))", "INSERT INTO parent VALUES (1)", "INSERT INTO child VALUES (1)"]"#, false);
        db.index += 1;
        let dump = "CREATE TABLE child (p REFERENCES parent (id)); CREATE TABLE parent (id INTEGER PRIMARY KEY); INSERT INTO child VALUES (2); INSERT INTO parent VALUES (2);";
        let out = db
            .sm
            .apply_entry(at(db.index), None, |g, rerun| {
                load(g, 0, dump, true, &WriteEnv::default(), rerun)
            })
            .unwrap();
        assert_eq!(
            out,
            json!({ "last_insert_id": 2, "rows_affected": 4 }),
            "children before parents; the two rows it replaced count"
        );
        assert_eq!(
            db.query(r#"["SELECT p FROM child"]"#)[0]["values"],
            json!([[2]])
        );
        db.index += 1;
        let broken = "INSERT INTO child VALUES (3);";
        let out = db
            .sm
            .apply_entry(at(db.index), None, |g, rerun| {
                load(g, 0, broken, false, &WriteEnv::default(), rerun)
            })
            .unwrap();
        assert!(error_of(&out).contains("FOREIGN KEY"), "{out}");
        assert_eq!(
            db.query(r#"["SELECT p FROM child"]"#)[0]["values"],
            json!([[2]])
        );
        let r = db.exec(r#"["INSERT INTO child VALUES (4)"]"#, false);
        assert!(
            error_of(&r[0]).contains("FOREIGN KEY"),
            "checked again after the load: {r:?}"
        );
    }

    /// A point query stays prepared; a many-way join, whose prepared
    /// program takes far more memory, is prepared each time (clients
    /// sending thousands of distinct ones would otherwise fill the cache
    /// with them).
    #[test]
    fn only_small_read_statements_stay_prepared() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t(x INTEGER PRIMARY KEY, a, b, c, d, e, f, g, h, i)")
            .unwrap();
        let point = conn.prepare("SELECT a FROM t WHERE x = 17").unwrap();
        assert!(worth_keeping(&point));
        let join = format!(
            "SELECT * FROM t t0{} WHERE t0.a > 0 ORDER BY t0.b",
            (1..20)
                .map(|i| format!(" JOIN t t{i} USING(x)"))
                .collect::<String>()
        );
        let join = conn.prepare(&join).unwrap();
        assert!(!worth_keeping(&join));
    }

    /// A read whose parameters do not bind leaves no statement in the
    /// cache: else a client could park any number of large statements
    /// there (up to the cache's count) by sending each with one parameter
    /// too many (found by review: 88 MB to 674 MB resident).
    #[test]
    fn a_statement_whose_parameters_fail_leaves_the_cache() {
        let conn = Connection::open_in_memory().unwrap();
        conn.set_prepared_statement_cache_capacity(1024);
        let reader = Guarded::reader(conn, Arc::default()).unwrap();
        let resident = || {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
            let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
            pages * 4096
        };
        let limits = || ReadLimits {
            deadline: Instant::now() + std::time::Duration::from_secs(60),
            max_bytes: 1024 * 1024,
        };
        let before = resident();
        for n in 0..60 {
            let sql = format!("SELECT '{}' AS k{n}", "x".repeat(400_000));
            let body = serde_json::to_vec(&json!([[sql, 1]])).unwrap();
            let statements = parse_statements(&body).unwrap();
            let r = query(&reader, &statements, &ExecOptions::default(), limits());
            assert!(error_of(&r[0]).contains("parameters"), "{r:?}");
        }
        let grown = resident().saturating_sub(before);
        assert!(
            grown < 30 * 1024 * 1024,
            "{grown} bytes kept after 60 refused reads of 400 KB"
        );
    }
}
