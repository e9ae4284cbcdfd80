//! The rules a client's SQL runs under, decided by SQLite itself.
//!
//! Every statement a client sends is prepared under SQLite's authorizer
//! (called by SQLite's own parser with what the statement will do, not
//! its text) and runs under a progress handler that bounds its work. The
//! text is never inspected: `/**/ROLLBACK`, `-- x\nCOMMIT` and a
//! trigger's body all reach the authorizer as the same action.
//!
//! - [`policy`] is the decision, a pure function of the mode and the
//!   action (unit-tested below): transaction control, `ATTACH`/`DETACH`,
//!   temporary objects, the node's `_scaleout_*` tables, pragmas outside
//!   an allow-list, and, in the replicated write path, whatever exposes
//!   one node's file layout (`dbstat`, `sqlite_schema.rootpage`) are
//!   refused.
//! - The budget: the write path counts SQLite VM steps (the same count on
//!   every node, so the same verdict everywhere, unlike a clock); reads
//!   get a wall-clock deadline. Shutdown stops any statement within a
//!   thousand steps.
//! - [`Guard::classify`] sorts a failed statement into an error the
//!   client caused (the same on every node: an answer) and one the node
//!   suffered (I/O, memory, shutdown: the apply must stop, not answer).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rusqlite::hooks::{AuthAction, AuthContext, Authorization, TransactionOperation};
use rusqlite::limits::Limit;
use rusqlite::{Connection, ErrorCode};

use crate::engine::RESERVED_PREFIX;

/// VM steps between two calls of the progress handler: the budget's
/// granularity.
pub const STEPS_PER_CHECK: u64 = 1000;
/// The largest string or blob any statement may make (SQLite's
/// `SQLITE_LIMIT_LENGTH`, the same constant on every node).
pub const MAX_VALUE_BYTES: i32 = 16 * 1024 * 1024;
/// The longest LIKE or GLOB pattern (SQLite's default is 50,000): a match
/// costs up to the value's length times the pattern's, in one VM step.
pub const MAX_PATTERN_BYTES: i32 = 100;
/// VM steps between two looks at a read's deadline: a read has no
/// budget to keep in step with other nodes, and some steps are long (a
/// function over a 16 MiB value), so it looks often.
pub const READ_STEPS_PER_CHECK: u64 = 64;

/// How often a connection's progress handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Every {
    /// Every [`STEPS_PER_CHECK`] steps: the write budget's granularity,
    /// the same on every node.
    Budget,
    /// Every [`READ_STEPS_PER_CHECK`] steps: reads.
    Deadline,
}

/// Default VM steps one write request may take (about a second on this
/// machine's cores): a runaway write fails the same way on every node.
pub const DEFAULT_WRITE_BUDGET: u64 = 100_000_000;

/// Whose statement is being prepared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The node's own statements (savepoints, bookkeeping): no rules.
    Internal,
    /// A client's statement in the replicated write path.
    Write,
    /// A statement of a `/db/load`: the write rules, except that
    /// transaction control is noted (the load skips it) rather than refused.
    Load,
    /// A client's read.
    Read,
}

/// What the authorizer saw that the caller must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Noted {
    /// Allowed as it is.
    Nothing,
    /// A table the statement may insert into or update (for the rowid check).
    Writes,
    /// Transaction control in a load.
    TransactionControl(TransactionOperation),
    /// `PRAGMA foreign_keys` in a load (a dump starts with one): a no-op
    /// inside a transaction, which a load is; skipped.
    NoOpInLoad,
}

/// Why a statement was stopped by the progress handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tripped {
    /// The write request used up its budget of VM steps (deterministic).
    Budget(u64),
    /// The read passed its deadline.
    Deadline,
    /// The node is shutting down.
    Shutdown,
    /// The apply passed the time it may hold an async thread (see
    /// [`Guard::inline_until`]): it is rolled back and run again, whole,
    /// elsewhere. The node's doing, never the client's.
    Yield,
}

const TRANSACTION_CONTROL: &str = "transaction control (BEGIN, COMMIT, END, ROLLBACK, SAVEPOINT, RELEASE) is not allowed: the node owns the transactions; send the statements with ?transaction to run them as one";

/// Pragmas a write may run, with or without a value: settings kept in
/// the database file itself, the same on every node.
const WRITE_PRAGMAS: [&str; 2] = ["user_version", "application_id"];
/// Pragmas a write may read (no value): the virtual table modules run
/// them inside a client's statement (FTS5 `data_version`, FTS3 and
/// R*Tree `page_size`), and their values are the same on every node (one
/// writer per file; the page size is the file's own).
const WRITE_READ_PRAGMAS: [&str; 2] = ["data_version", "page_size"];
/// Pragmas that only describe the schema or check it: allowed everywhere
/// (`compile_options` in reads only: it describes the build).
const INTROSPECTION_PRAGMAS: [&str; 12] = [
    "table_info",
    "table_xinfo",
    "table_list",
    "index_info",
    "index_xinfo",
    "index_list",
    "foreign_key_list",
    "foreign_key_check",
    "integrity_check",
    "quick_check",
    "collation_list",
    "pragma_list",
];
/// Settings a read may look at (without a value: setting one would
/// change a pooled connection for whoever uses it next). ORMs read some
/// of them on connecting (SQLAlchemy's SQLite dialect asks for
/// `read_uncommitted`).
const READ_PRAGMAS: [&str; 40] = [
    // What one connection has registered: the apply connection registers
    // the `pragma_*` tables as they are first used, so the lists differ
    // between a node that restarted and one that did not (reads only).
    "function_list",
    "module_list",
    "read_uncommitted",
    "cache_size",
    "synchronous",
    "temp_store",
    "locking_mode",
    "busy_timeout",
    "query_only",
    "automatic_index",
    "cache_spill",
    "cell_size_check",
    "legacy_alter_table",
    "reverse_unordered_selects",
    "secure_delete",
    "trusted_schema",
    "mmap_size",
    "max_page_count",
    "wal_autocheckpoint",
    "ignore_check_constraints",
    "analysis_limit",
    "threads",
    "checkpoint_fullfsync",
    "fullfsync",
    "soft_heap_limit",
    "hard_heap_limit",
    "compile_options",
    "user_version",
    "application_id",
    "schema_version",
    "data_version",
    "foreign_keys",
    "encoding",
    "page_size",
    "page_count",
    "freelist_count",
    "journal_mode",
    "auto_vacuum",
    "recursive_triggers",
    "defer_foreign_keys",
];
/// Virtual table modules a write may create: FTS5, which keeps its data
/// and its settings in ordinary tables, the same on every node. Not FTS3/4
/// (an `automerge` setting outlives the rollback that undid it, in one
/// connection's memory) nor R*Tree (it reads its row estimate from
/// `sqlite_stat1` once per connection, so a restarted node plans, and
/// orders rows, differently).
const WRITE_MODULES: [&str; 1] = ["fts5"];

/// Functions refused in writes: their value depends on the node (its
/// connection's history, its build), not on the data. SQLite's own
/// `pragma_function_list` flags these as not deterministic; the ones it
/// flags so that are deterministic by construction here (random, time,
/// `changes()`, `last_insert_rowid()`) are in [`crate::determinism`].
pub const NODE_FUNCTIONS: [(&str, i32); 10] = [
    ("fts5_source_id", 0),
    ("total_changes", 0),
    ("sqlite_version", 0),
    ("sqlite_source_id", 0),
    ("sqlite_compileoption_get", 1),
    ("sqlite_compileoption_used", 1),
    ("load_extension", 1),
    ("load_extension", 2),
    ("fts3_tokenizer", 1),
    ("fts3_tokenizer", 2),
];

fn reserved(name: &str) -> bool {
    name.len() >= RESERVED_PREFIX.len()
        && name[..RESERVED_PREFIX.len()].eq_ignore_ascii_case(RESERVED_PREFIX)
}

fn is_schema_table(name: &str) -> bool {
    [
        "sqlite_master",
        "sqlite_schema",
        "sqlite_temp_master",
        "sqlite_temp_schema",
    ]
    .iter()
    .any(|t| name.eq_ignore_ascii_case(t))
}

fn is_statistics(name: &str) -> bool {
    name.len() == 12 && name[..11].eq_ignore_ascii_case("sqlite_stat")
}

/// The decision for one action of a statement being prepared: `Ok` with
/// what to note, or `Err` with the reason the client is told.
pub fn policy(
    mode: Mode,
    action: &AuthAction<'_>,
    database: Option<&str>,
) -> Result<Noted, String> {
    policy_in(mode, action, database, false)
}

/// [`policy`], for an action of a statement that drops a table or an
/// index (`dropping`): SQLite deletes their statistics as part of it.
pub fn policy_in(
    mode: Mode,
    action: &AuthAction<'_>,
    database: Option<&str>,
    dropping: bool,
) -> Result<Noted, String> {
    use AuthAction as A;
    if mode == Mode::Internal {
        return Ok(Noted::Nothing);
    }
    let writing = matches!(mode, Mode::Write | Mode::Load);
    // Every name the action touches, for the reserved-prefix rule.
    let names: [Option<&str>; 2] = match *action {
        A::CreateIndex {
            index_name,
            table_name,
        }
        | A::DropIndex {
            index_name,
            table_name,
        }
        | A::CreateTempIndex {
            index_name,
            table_name,
        }
        | A::DropTempIndex {
            index_name,
            table_name,
        } => [Some(index_name), Some(table_name)],
        A::CreateTrigger {
            trigger_name,
            table_name,
        }
        | A::DropTrigger {
            trigger_name,
            table_name,
        }
        | A::CreateTempTrigger {
            trigger_name,
            table_name,
        }
        | A::DropTempTrigger {
            trigger_name,
            table_name,
        } => [Some(trigger_name), Some(table_name)],
        A::CreateTable { table_name }
        | A::CreateTempTable { table_name }
        | A::DropTable { table_name }
        | A::DropTempTable { table_name }
        | A::Delete { table_name }
        | A::Insert { table_name }
        | A::Analyze { table_name }
        | A::AlterTable { table_name, .. }
        | A::Read { table_name, .. }
        | A::Update { table_name, .. }
        | A::CreateVtable { table_name, .. }
        | A::DropVtable { table_name, .. } => [Some(table_name), None],
        A::CreateView { view_name }
        | A::DropView { view_name }
        | A::CreateTempView { view_name }
        | A::DropTempView { view_name } => [Some(view_name), None],
        A::Reindex { index_name } => [Some(index_name), None],
        _ => [None, None],
    };
    // ANALYZE of every table takes in the node's own (one row, the same
    // on every node): harmless, and refusing it would refuse ANALYZE.
    let analyze = matches!(action, A::Analyze { .. });
    if !analyze && names.iter().flatten().any(|n| reserved(n)) {
        return Err(format!(
            "names starting with {RESERVED_PREFIX} are reserved for the node's own state"
        ));
    }
    match *action {
        A::Transaction { operation } | A::Savepoint { operation, .. } => {
            if mode == Mode::Load && matches!(*action, A::Transaction { .. }) {
                Ok(Noted::TransactionControl(operation))
            } else {
                Err(TRANSACTION_CONTROL.into())
            }
        }
        A::Attach { .. } | A::Detach { .. } => Err(
            "ATTACH, DETACH and VACUUM INTO are not allowed: the node's files are out of clients' reach"
                .into(),
        ),
        A::CreateTempIndex { .. }
        | A::CreateTempTable { .. }
        | A::CreateTempTrigger { .. }
        | A::CreateTempView { .. }
        | A::DropTempIndex { .. }
        | A::DropTempTable { .. }
        | A::DropTempTrigger { .. }
        | A::DropTempView { .. } => Err(
            "temporary tables, views, triggers and indexes are not allowed: they would live in one node's connection, not in the replicated database"
                .into(),
        ),
        A::Insert { table_name } | A::Update { table_name, .. } | A::Delete { table_name }
            if database.is_some_and(|d| d.eq_ignore_ascii_case("temp"))
                && !is_schema_table(table_name) =>
        {
            Err("the temp database is not replicated: write to main".into())
        }
        A::Pragma { pragma_name, .. }
            if mode == Mode::Load && pragma_name.eq_ignore_ascii_case("foreign_keys") =>
        {
            Ok(Noted::NoOpInLoad)
        }
        A::Pragma { pragma_name, pragma_value } => {
            let name = pragma_name.to_ascii_lowercase();
            let allowed = INTROSPECTION_PRAGMAS.contains(&name.as_str())
                || (writing && WRITE_PRAGMAS.contains(&name.as_str()))
                || (writing
                    && pragma_value.is_none()
                    && WRITE_READ_PRAGMAS.contains(&name.as_str()))
                || (!writing && pragma_value.is_none() && READ_PRAGMAS.contains(&name.as_str()));
            if allowed {
                Ok(Noted::Nothing)
            } else if writing {
                Err(format!(
                    "PRAGMA {name} is not allowed in a write: it sets one connection's state or reads one node's file layout; allowed: {}, and {}",
                    WRITE_PRAGMAS.join(", "),
                    INTROSPECTION_PRAGMAS.join(", ")
                ))
            } else {
                Err(format!(
                    "PRAGMA {name}{} is not allowed in a read: reads may look at {} and run {}",
                    if pragma_value.is_some() { " with a value" } else { "" },
                    READ_PRAGMAS.join(", "),
                    INTROSPECTION_PRAGMAS.join(", ")
                ))
            }
        }
        A::Read { table_name, .. } if writing && table_name.eq_ignore_ascii_case("dbstat") => Err(
            "dbstat is not allowed in a write: it describes one node's file layout".into(),
        ),
        // DROP reads the root pages it frees: it lays out nothing.
        A::Read { table_name, column_name }
            if writing
                && !dropping
                && is_schema_table(table_name)
                && column_name.eq_ignore_ascii_case("rootpage") =>
        {
            Err("sqlite_schema.rootpage is not allowed in a write: it describes one node's file layout".into())
        }
        // DROP TABLE and DROP INDEX delete their statistics themselves;
        // any other change to them is refused.
        A::Insert { table_name } | A::Update { table_name, .. } | A::DropTable { table_name }
            if writing && is_statistics(table_name) =>
        {
            Err(format!(
                "{table_name} is written by ANALYZE only: a node plans with the statistics it loaded, so edits would make nodes plan (and order rows) differently"
            ))
        }
        A::Insert { table_name } | A::Update { table_name, .. }
            if writing && table_name.eq_ignore_ascii_case("sqlite_sequence") =>
        {
            Err("sqlite_sequence is AUTOINCREMENT's own: setting a counter could make inserts fail as if the disk were full (deleting a row resets it)".into())
        }
        A::Delete { table_name } if writing && is_statistics(table_name) && !dropping => Err(format!(
            "{table_name} is written by ANALYZE only: a node plans with the statistics it loaded, so edits would make nodes plan (and order rows) differently"
        )),
        A::CreateVtable { module_name, .. }
            if !WRITE_MODULES.iter().any(|m| m.eq_ignore_ascii_case(module_name)) =>
        {
            Err(format!(
                "virtual tables using {module_name} are not allowed; allowed modules: {}",
                WRITE_MODULES.join(", ")
            ))
        }
        A::Function { function_name }
            if NODE_FUNCTIONS
                .iter()
                .any(|(f, _)| f.eq_ignore_ascii_case(function_name))
                && (writing || function_name.eq_ignore_ascii_case("load_extension")
                    || function_name.eq_ignore_ascii_case("fts3_tokenizer")) =>
        {
            Err(node_function_error(function_name))
        }
        A::Insert { table_name } | A::Update { table_name, .. }
            if writing && !is_schema_table(table_name) =>
        {
            Ok(Noted::Writes)
        }
        _ => Ok(Noted::Nothing),
    }
}

/// Actions after which a connection's query planner may hold statistics
/// a freshly opened one would not (ANALYZE, even rolled back, leaves its
/// figures loaded; a dropped or renamed index or table leaves rows in
/// `sqlite_stat1` that only a fresh connection reads).
fn changes_the_planner(action: &AuthAction<'_>) -> bool {
    use AuthAction as A;
    matches!(
        action,
        A::Analyze { .. }
            | A::CreateIndex { .. }
            | A::DropIndex { .. }
            | A::CreateTable { .. }
            | A::DropTable { .. }
            | A::AlterTable { .. }
            | A::Reindex { .. }
            | A::CreateVtable { .. }
            | A::DropVtable { .. }
    )
}

pub fn node_function_error(name: &str) -> String {
    format!(
        "{name}() is not allowed here: its value depends on the node (its connection or build), so replicas would differ"
    )
}

/// The per-connection state the hooks share with the code running
/// statements.
#[derive(Debug)]
struct State {
    mode: Mode,
    /// The first refusal while preparing the current statement.
    refusal: Option<String>,
    /// Tables the statement may insert into or update.
    writes: BTreeSet<String>,
    transaction_control: Option<TransactionOperation>,
    no_op: bool,
    /// The statement drops a table or an index (whose statistics SQLite
    /// then deletes).
    dropping: bool,
    /// A client's statement changed the schema or ran ANALYZE since the
    /// last look: the query planner's statistics in this connection's
    /// memory may no longer be what a fresh connection would read.
    planner_touched: bool,
    /// Progress-handler calls left for this request (writes).
    checks_left: Option<u64>,
    budget: u64,
    deadline: Option<Instant>,
    tripped: Option<Tripped>,
    /// When a client's statement in an apply must give up its thread.
    yield_at: Option<Instant>,
    /// A client's steps since the request began, while tried on an async
    /// thread (counted by [`INLINE_STEPS_PER_CHECK`]).
    inline_steps: u64,
    /// Set when a statement gave it up; stays set until the next
    /// [`Guard::inline_until`], whatever runs in between.
    yielded: bool,
}

/// VM steps between two calls of the progress handler while an apply is
/// tried on an async thread ([`Guard::inline_until`]): that thread is held
/// at most this many steps past its time (a step may handle a 16 MiB
/// value: found by review, a thousand such steps held it for 160 ms).
pub const INLINE_STEPS_PER_CHECK: u64 = 8;

/// What a client's statement may do and still be tried on an async
/// thread: insert, update and read columns (a plain `INSERT ... VALUES`,
/// an `UPDATE ... WHERE`). Anything else (a `SELECT`, a subquery, a
/// view, a function, a `DELETE`, a schema change) may hold the thread in
/// one step or in its preparing, and moves before it runs.
fn stays_inline(action: &AuthAction<'_>) -> bool {
    matches!(
        action,
        AuthAction::Insert { .. } | AuthAction::Update { .. } | AuthAction::Read { .. }
    )
}

/// The progress handler: stops a statement at shutdown, at the end of a
/// write's budget or a read's deadline, and an apply tried on an async
/// thread at its time.
fn progress(state: Arc<Mutex<State>>, stop: Arc<AtomicBool>) -> impl FnMut() -> bool {
    move || {
        let mut s = lock(&state);
        if stop.load(Ordering::Relaxed) {
            s.tripped = Some(Tripped::Shutdown);
            return true;
        }
        // The node's own statements do not spend a client's budget.
        let counted = matches!(s.mode, Mode::Write | Mode::Load);
        if s.yield_at.is_some() {
            // Tried on an async thread: only the clock stops it, never
            // the budget, whose verdict must be the same on every node.
            // A request that might reach its budget moves (and meets it
            // there, counted as always).
            if counted {
                s.inline_steps += INLINE_STEPS_PER_CHECK;
                let near_budget = s.checks_left.is_some_and(|left| {
                    left.saturating_mul(STEPS_PER_CHECK) <= s.inline_steps + 2 * STEPS_PER_CHECK
                });
                if near_budget || s.yield_at.is_some_and(|y| Instant::now() >= y) {
                    s.tripped = Some(Tripped::Yield);
                    s.yielded = true;
                    return true;
                }
            }
            return false;
        }
        if let Some(left) = s.checks_left.as_mut().filter(|_| counted) {
            if *left == 0 {
                s.tripped = Some(Tripped::Budget(s.budget));
                return true;
            }
            *left -= 1;
        }
        if s.deadline.is_some_and(|d| Instant::now() >= d) {
            s.tripped = Some(Tripped::Deadline);
            return true;
        }
        false
    }
}

/// The hooks installed on one connection, and their state.
pub struct Guard {
    state: Arc<Mutex<State>>,
    shutdown: Arc<AtomicBool>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Guard {
    /// Installs the authorizer, the progress handler and the limits on
    /// `conn`. `shutdown` set stops whatever runs on it.
    pub fn install(
        conn: &Connection,
        shutdown: Arc<AtomicBool>,
        every: Every,
    ) -> rusqlite::Result<Guard> {
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Internal,
            refusal: None,
            writes: BTreeSet::new(),
            transaction_control: None,
            no_op: false,
            dropping: false,
            planner_touched: false,
            checks_left: None,
            budget: 0,
            deadline: None,
            tripped: None,
            yield_at: None,
            inline_steps: 0,
            yielded: false,
        }));
        let hooked = state.clone();
        conn.authorizer(Some(move |ctx: AuthContext<'_>| {
            let mut s = lock(&hooked);
            if s.yield_at.is_some() && !matches!(s.mode, Mode::Internal) {
                // Tried on an async thread: only what no single step or
                // its preparing can make long stays (found by review: a
                // statement over nested views took seconds to prepare,
                // `count(*)` of a big table is one step), and nothing is
                // prepared past the time.
                let late = s.yield_at.is_some_and(|y| Instant::now() >= y);
                if late || !stays_inline(&ctx.action) {
                    s.tripped = Some(Tripped::Yield);
                    s.yielded = true;
                    return Authorization::Deny;
                }
            }
            if matches!(
                ctx.action,
                AuthAction::DropTable { .. }
                    | AuthAction::DropIndex { .. }
                    | AuthAction::DropVtable { .. }
            ) {
                s.dropping = true;
            }
            if matches!(s.mode, Mode::Write | Mode::Load) && changes_the_planner(&ctx.action) {
                s.planner_touched = true;
            }
            match policy_in(s.mode, &ctx.action, ctx.database_name, s.dropping) {
                Ok(Noted::Nothing) => Authorization::Allow,
                Ok(Noted::Writes) => {
                    if let AuthAction::Insert { table_name }
                    | AuthAction::Update { table_name, .. } = ctx.action
                    {
                        if ctx
                            .database_name
                            .is_none_or(|d| d.eq_ignore_ascii_case("main"))
                        {
                            s.writes.insert(table_name.to_string());
                        }
                    }
                    Authorization::Allow
                }
                Ok(Noted::TransactionControl(op)) => {
                    s.transaction_control = Some(op);
                    Authorization::Allow
                }
                Ok(Noted::NoOpInLoad) => {
                    s.no_op = true;
                    Authorization::Allow
                }
                Err(why) => {
                    s.refusal.get_or_insert(why);
                    Authorization::Deny
                }
            }
        }));
        conn.progress_handler(
            match every {
                Every::Budget => STEPS_PER_CHECK as i32,
                Every::Deadline => READ_STEPS_PER_CHECK as i32,
            },
            Some(progress(state.clone(), shutdown.clone())),
        );
        conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)?;
        conn.set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)?;
        // LIKE and GLOB compare in time proportional to the value times
        // the pattern, all inside one VM step: keep patterns short.
        conn.set_limit(Limit::SQLITE_LIMIT_LIKE_PATTERN_LENGTH, MAX_PATTERN_BYTES)?;
        // No SQL may write the file's structures directly (writable
        // schema, shadow tables of FTS and R*Tree).
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
        let charged = state.clone();
        let charge: crate::bounded::Charge = Arc::new(move |bytes: usize| {
            let mut s = lock(&charged);
            if matches!(s.mode, Mode::Write | Mode::Load) {
                let checks = (bytes / crate::bounded::BYTES_PER_STEP) as u64 / STEPS_PER_CHECK;
                if let Some(left) = s.checks_left.as_mut() {
                    // Spent: the next check (within a thousand steps, the
                    // same on every node) stops the statement.
                    *left = left.saturating_sub(checks);
                }
            }
            if s.deadline.is_some_and(|d| Instant::now() >= d) {
                s.tripped = Some(Tripped::Deadline);
                return Err("the read ran past its time limit".into());
            }
            Ok(())
        });
        crate::bounded::install(conn, charge)?;
        Ok(Guard { state, shutdown })
    }

    /// Whose statements are prepared from now on; clears what the last
    /// statement noted.
    pub fn set_mode(&self, mode: Mode) {
        let mut s = lock(&self.state);
        s.mode = mode;
        s.refusal = None;
        s.writes.clear();
        s.transaction_control = None;
        s.no_op = false;
        s.dropping = false;
    }

    /// A write request starts: `budget` VM steps for all its statements
    /// (0: unbounded, for entries written before budgets existed).
    pub fn start_write(&self, budget: u64) {
        let mut s = lock(&self.state);
        s.budget = budget;
        s.checks_left = (budget > 0).then_some(budget / STEPS_PER_CHECK);
        s.deadline = None;
        s.tripped = None;
        s.inline_steps = 0;
    }

    /// A read starts: it must end by `deadline`.
    pub fn start_read(&self, deadline: Instant) {
        let mut s = lock(&self.state);
        s.checks_left = None;
        s.deadline = Some(deadline);
        s.tripped = None;
    }

    /// From now on (on `conn`, the connection this guards) a client's
    /// statement that is still running at `until` is stopped (`None`:
    /// never; back to the budget alone), and the caller learns it from
    /// [`Self::yielded`]: the apply tried on an async thread moves to a
    /// blocking one. Until then the handler runs every
    /// [`INLINE_STEPS_PER_CHECK`] steps and decides nothing by the budget.
    /// Unlike the budget this depends on the clock, so whatever ran is
    /// rolled back and run again whole: only a run that was not stopped is
    /// kept.
    pub fn inline_until(&self, conn: &Connection, until: Option<Instant>) {
        {
            let mut s = lock(&self.state);
            s.yield_at = until;
            s.yielded = false;
            s.inline_steps = 0;
        }
        let every = match until {
            Some(_) => INLINE_STEPS_PER_CHECK,
            None => STEPS_PER_CHECK,
        };
        conn.progress_handler(
            every as i32,
            Some(progress(self.state.clone(), self.shutdown.clone())),
        );
    }

    /// Whether an apply is being tried on an async thread.
    pub fn inline(&self) -> bool {
        lock(&self.state).yield_at.is_some()
    }

    /// Whether a statement was stopped at the time set by
    /// [`Self::inline_until`] since it was set.
    pub fn yielded(&self) -> bool {
        lock(&self.state).yielded
    }

    /// No bound (the node's own work).
    pub fn unbounded(&self) {
        let mut s = lock(&self.state);
        s.checks_left = None;
        s.deadline = None;
        s.tripped = None;
    }

    /// Why the last statement was refused while being prepared, if it was.
    pub fn refusal(&self) -> Option<String> {
        lock(&self.state).refusal.clone()
    }

    /// Whether a client's statement prepared since the last call changed
    /// the schema or ran ANALYZE.
    pub fn take_planner_touched(&self) -> bool {
        std::mem::take(&mut lock(&self.state).planner_touched)
    }

    pub fn take_writes(&self) -> BTreeSet<String> {
        std::mem::take(&mut lock(&self.state).writes)
    }

    pub fn transaction_control(&self) -> Option<TransactionOperation> {
        lock(&self.state).transaction_control
    }

    /// The statement just prepared in a load does nothing there.
    pub fn no_op_in_load(&self) -> bool {
        lock(&self.state).no_op
    }

    pub fn tripped(&self) -> Option<Tripped> {
        lock(&self.state).tripped
    }

    pub fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    /// Sorts a statement's failure: `Ok(message)` when the client's SQL
    /// caused it (every node fails it the same way), `Err` when the node
    /// did (its disk, memory, shutdown).
    pub fn classify(&self, e: &rusqlite::Error) -> Result<String, Fault> {
        self.classify_whole(e)
            .map(bounded_message)
            .map_err(|f| Fault(bounded_message(f.0)))
    }

    fn classify_whole(&self, e: &rusqlite::Error) -> Result<String, Fault> {
        match self.tripped() {
            Some(Tripped::Budget(steps)) => {
                return Ok(format!(
                    "the statement ran past its budget of {steps} SQLite steps and was stopped (the same on every node); nothing of it was applied"
                ))
            }
            Some(Tripped::Deadline) => {
                return Ok("the query ran past its time limit and was stopped".into())
            }
            Some(Tripped::Shutdown) => return Err(Fault("the node is shutting down".into())),
            Some(Tripped::Yield) => {
                return Err(Fault(
                    "the apply moved off the async thread; it runs again".into(),
                ))
            }
            None => {}
        }
        if self.shutting_down() {
            return Err(Fault("the node is shutting down".into()));
        }
        let Some(code) = e.sqlite_error_code() else {
            // rusqlite's own checks (parameters, types): about the request.
            return Ok(e.to_string());
        };
        match code {
            ErrorCode::ConstraintViolation
            | ErrorCode::TypeMismatch
            | ErrorCode::TooBig
            | ErrorCode::ParameterOutOfRange
            | ErrorCode::AuthorizationForStatementDenied
            | ErrorCode::Unknown => Ok(match (code, self.refusal()) {
                (ErrorCode::AuthorizationForStatementDenied, Some(why)) => why,
                _ => e.to_string(),
            }),
            // A virtual table's own index found inconsistent with its
            // data (an FTS5 'delete' given wrong values): the same data,
            // the same error, on every node. The file itself cannot be
            // corrupted by SQL (the connection is defensive).
            ErrorCode::DatabaseCorrupt if extended_code(e) == Some(SQLITE_CORRUPT_VTAB) => {
                Ok(e.to_string())
            }
            _ => Err(Fault(e.to_string())),
        }
    }
}

const SQLITE_CORRUPT_VTAB: i32 = 267;

/// The longest error message kept: SQLite may repeat a whole argument in
/// one (`json_extract`'s path), and an entry's answers are held in memory
/// on every node.
pub const MAX_ERROR_BYTES: usize = 4096;

/// `msg`, cut to [`MAX_ERROR_BYTES`] at a character boundary.
pub fn bounded_message(msg: String) -> String {
    if msg.len() <= MAX_ERROR_BYTES {
        return msg;
    }
    let mut end = MAX_ERROR_BYTES;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &msg[..end], msg.len())
}

fn extended_code(e: &rusqlite::Error) -> Option<i32> {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => Some(f.extended_code),
        _ => None,
    }
}

/// A failure of the node, not of the client's SQL: the apply must stop
/// rather than answer (another node would not fail the same way).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Fault(pub String);

#[cfg(test)]
mod tests {
    use super::*;
    use AuthAction as A;

    #[test]
    fn transaction_control_is_refused_in_every_spelling_sqlite_parses() {
        for mode in [Mode::Write, Mode::Read] {
            for op in [
                TransactionOperation::Begin,
                TransactionOperation::Rollback,
                TransactionOperation::Unknown,
            ] {
                assert!(policy(mode, &A::Transaction { operation: op }, None).is_err());
                assert!(policy(
                    mode,
                    &A::Savepoint {
                        operation: op,
                        savepoint_name: "s"
                    },
                    None
                )
                .is_err());
            }
        }
        assert_eq!(
            policy(
                Mode::Load,
                &A::Transaction {
                    operation: TransactionOperation::Begin
                },
                None
            ),
            Ok(Noted::TransactionControl(TransactionOperation::Begin))
        );
        assert!(policy(
            Mode::Load,
            &A::Savepoint {
                operation: TransactionOperation::Begin,
                savepoint_name: "s"
            },
            None
        )
        .is_err());
        assert_eq!(
            policy(
                Mode::Internal,
                &A::Transaction {
                    operation: TransactionOperation::Begin
                },
                None
            ),
            Ok(Noted::Nothing)
        );
    }

    #[test]
    fn the_nodes_files_and_state_are_out_of_reach() {
        for mode in [Mode::Write, Mode::Load, Mode::Read] {
            assert!(policy(mode, &A::Attach { filename: "/etc/x" }, None).is_err());
            assert!(policy(mode, &A::Detach { database_name: "x" }, None).is_err());
            assert!(policy(
                mode,
                &A::Read {
                    table_name: "_SCALEOUT_applied",
                    column_name: "log_index"
                },
                Some("main")
            )
            .is_err());
            assert!(policy(
                mode,
                &A::CreateTrigger {
                    trigger_name: "t",
                    table_name: "_scaleout_applied"
                },
                Some("main")
            )
            .is_err());
            assert!(policy(mode, &A::CreateTempTable { table_name: "t" }, Some("temp")).is_err());
        }
    }

    #[test]
    fn writes_may_only_use_what_is_the_same_on_every_node() {
        let w = Mode::Write;
        assert!(policy(
            w,
            &A::Function {
                function_name: "total_changes"
            },
            None
        )
        .is_err());
        assert!(policy(
            w,
            &A::Function {
                function_name: "SQLITE_VERSION"
            },
            None
        )
        .is_err());
        assert_eq!(
            policy(
                w,
                &A::Function {
                    function_name: "abs"
                },
                None
            ),
            Ok(Noted::Nothing)
        );
        assert_eq!(
            policy(
                Mode::Read,
                &A::Function {
                    function_name: "total_changes"
                },
                None
            ),
            Ok(Noted::Nothing),
            "reads are not replicated"
        );
        let pragma = |name, value| A::Pragma {
            pragma_name: name,
            pragma_value: value,
        };
        assert!(policy(w, &pragma("user_version", Some("3")), None).is_ok());
        assert!(policy(w, &pragma("table_info", Some("t")), None).is_ok());
        for bad in [
            "foreign_keys",
            "writable_schema",
            "page_count",
            "journal_mode",
            "optimize",
        ] {
            assert!(policy(w, &pragma(bad, None), None).is_err(), "{bad}");
        }
        assert!(policy(Mode::Read, &pragma("page_count", None), None).is_ok());
        assert!(policy(Mode::Read, &pragma("foreign_keys", Some("0")), None).is_err());
        assert!(policy(Mode::Read, &pragma("query_only", Some("0")), None).is_err());
        assert!(policy(
            w,
            &A::Read {
                table_name: "dbstat",
                column_name: "pageno"
            },
            Some("main")
        )
        .is_err());
        assert!(policy(
            w,
            &A::Read {
                table_name: "sqlite_master",
                column_name: "rootpage"
            },
            Some("main")
        )
        .is_err());
        assert!(policy(
            w,
            &A::Read {
                table_name: "sqlite_master",
                column_name: "name"
            },
            Some("main")
        )
        .is_ok());
        assert!(policy(
            w,
            &A::CreateVtable {
                table_name: "s",
                module_name: "dbstat"
            },
            Some("main")
        )
        .is_err());
        assert!(policy(
            w,
            &A::CreateVtable {
                table_name: "s",
                module_name: "FTS5"
            },
            Some("main")
        )
        .is_ok());
        assert_eq!(
            policy(w, &A::Insert { table_name: "t" }, Some("main")),
            Ok(Noted::Writes)
        );
        assert!(policy(w, &A::Insert { table_name: "t" }, Some("temp")).is_err());
        assert!(policy(
            w,
            &A::Insert {
                table_name: "sqlite_stat1"
            },
            Some("main")
        )
        .is_err());
        assert!(policy(
            w,
            &A::DropTable {
                table_name: "SQLITE_STAT4"
            },
            Some("main")
        )
        .is_err());
        assert!(policy(
            Mode::Read,
            &A::Read {
                table_name: "sqlite_stat1",
                column_name: "stat"
            },
            Some("main")
        )
        .is_ok());
    }

    /// Every function SQLite itself flags as not deterministic is either
    /// made deterministic here or refused: a new SQLite with a new such
    /// function fails this test instead of slipping through.
    #[test]
    fn every_non_deterministic_builtin_is_covered() {
        let c = Connection::open_in_memory().unwrap();
        let mut st = c
            .prepare("SELECT DISTINCT name FROM pragma_function_list WHERE builtin = 1 AND type = 's' AND (flags & 0x800) = 0")
            .unwrap();
        let names: Vec<String> = st
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(!names.is_empty());
        for name in names {
            let covered = NODE_FUNCTIONS.iter().any(|(f, _)| *f == name)
                || crate::determinism::FIXED_FUNCTIONS.contains(&name.as_str());
            assert!(covered, "{name}() is neither fixed nor refused");
        }
    }
}
