//! `scaleout-db`: the seed's data tier — SQLite behind rqlite's HTTP API,
//! replicated with Raft.
//!
//! Built in steps. This step is the part every node runs whatever its
//! role: [`request`] parses rqlite's request forms (plain SQL strings,
//! `["sql", p1, ...]` positional and `["sql", {"name": v}]` named
//! parameters) and [`engine`] executes them on SQLite with rqlite's result
//! shapes (`results` with `columns`, `types`, `values` or associative
//! `rows`, `last_insert_id`, `rows_affected`, per-statement `error`,
//! `time`), transactions that leave no partial writes, and read-only
//! enforcement for queries; [`http`] serves rqlite's data API
//! (`/db/execute`, `/db/query`, `/db/request` and their query parameters)
//! in front of any [`http::Node`]; [`determinism`] rewrites `random()`,
//! `randomblob(N)`, `'now'` and `CURRENT_*` so that every node applying a
//! write gets the same state; [`state`] is the state machine that applies
//! committed entries exactly once (the applied index is committed with the
//! effects); [`log`] is the durable Raft log (framed, CRC-checked,
//! fsynced per batch: group commit) with the vote beside it. Still to come (issue 4): the Raft node
//! (openraft) that implements `Node`, `/status`, `/nodes`, `/readyz`,
//! `/leader`, backup/load, `scaleout db`, snapshots.

pub mod determinism;
pub mod dump;
pub mod engine;
pub mod http;
pub mod log;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod request;
pub mod state;

pub use engine::{execute, query, ExecOptions};
pub use request::{parse_statements, Param, Params, RequestError, Statement};
