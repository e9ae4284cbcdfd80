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

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use crate::engine::{self, ExecOptions};
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
    conn.query_row(
        "SELECT term, leader, log_index, membership FROM _scaleout_applied WHERE id = 1",
        [],
        |r| {
            Ok(AppliedState {
                applied: Some(Applied {
                    term: r.get::<_, i64>(0)? as u64,
                    leader: r.get::<_, i64>(1)? as u64,
                    index: r.get::<_, i64>(2)? as u64,
                }),
                membership: r.get(3)?,
            })
        },
    )
    .optional()
    .map(Option::unwrap_or_default)
}

pub struct StateMachine {
    conn: Connection,
}

impl StateMachine {
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;",
        )?;
        conn.execute_batch(META)?;
        Ok(StateMachine { conn })
    }

    pub fn open_in_memory() -> rusqlite::Result<Self> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(META)?;
        Ok(StateMachine { conn })
    }

    /// The last entry whose effects are in the file.
    pub fn applied(&self) -> rusqlite::Result<Applied> {
        Ok(applied_state(&self.conn)?.applied.unwrap_or_default())
    }

    pub fn state(&self) -> rusqlite::Result<AppliedState> {
        applied_state(&self.conn)
    }

    /// Applies one committed entry; `None` when it was applied before (a
    /// replay after a crash), else the per-statement results. Statement
    /// errors are results, not failures: the entry still counts as applied,
    /// as on every other node.
    pub fn apply(
        &mut self,
        at: Applied,
        statements: &[Statement],
        opts: &ExecOptions,
    ) -> rusqlite::Result<Option<Vec<Value>>> {
        if at.index <= self.applied()?.index {
            return Ok(None);
        }
        self.apply_batch(at, None, |tx| engine::execute(tx, statements, opts))
            .map(Some)
    }

    /// Runs `work` and records `last` (and the membership, when it
    /// changed) in one transaction: several committed entries share one
    /// commit, and the file never holds part of a batch.
    pub fn apply_batch<T>(
        &mut self,
        last: Applied,
        membership: Option<&str>,
        work: impl FnOnce(&Connection) -> T,
    ) -> rusqlite::Result<T> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let out = work(&tx);
        if tx.is_autocommit() {
            // The SQL ended the transaction itself (a trigger's
            // RAISE(ROLLBACK), say): record the position on its own rather
            // than stop the node; that entry's effects were not atomic.
            tracing::warn!(
                index = last.index,
                "an entry's SQL ended the apply transaction"
            );
        }
        tx.execute(
            "INSERT INTO _scaleout_applied (id, log_index, term, leader, membership)
             VALUES (1, ?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET log_index = excluded.log_index,
                term = excluded.term, leader = excluded.leader,
                membership = coalesce(excluded.membership, membership)",
            params![
                last.index as i64,
                last.term as i64,
                last.leader as i64,
                membership
            ],
        )?;
        if tx.is_autocommit() {
            drop(tx);
        } else {
            tx.commit()?;
        }
        Ok(out)
    }

    /// Replaces the whole file's contents with another SQLite file's (a
    /// snapshot), through SQLite's backup so open readers stay valid.
    pub fn restore(&mut self, from: &Path) -> rusqlite::Result<()> {
        self.conn.restore(
            rusqlite::MAIN_DB,
            from,
            None::<fn(rusqlite::backup::Progress)>,
        )
    }

    /// Reads (never through the log).
    pub fn query(&self, statements: &[Statement], opts: &ExecOptions) -> Vec<Value> {
        engine::query(&self.conn, statements, opts)
    }
}

/// `VACUUM INTO`: a consistent, compact copy of a live file.
pub fn copy_to(conn: &Connection, to: &Path) -> rusqlite::Result<()> {
    let _ = std::fs::remove_file(to);
    conn.execute("VACUUM INTO ?1", [to.to_string_lossy()])
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::parse_statements;
    use serde_json::json;

    fn stmts(body: &str) -> Vec<Statement> {
        parse_statements(body.as_bytes()).unwrap()
    }

    #[test]
    fn entries_apply_once_and_the_index_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let opts = ExecOptions::default();
        {
            let mut sm = StateMachine::open(&path).unwrap();
            assert_eq!(sm.applied().unwrap(), Applied::default());
            sm.apply(
                Applied {
                    term: 1,
                    leader: 1,
                    index: 1,
                },
                &stmts(r#"["CREATE TABLE t (x)"]"#),
                &opts,
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
                    &opts
                )
                .unwrap(),
                None,
                "replayed entry skipped"
            );
        }
        let mut sm = StateMachine::open(&path).unwrap();
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
                &opts
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
