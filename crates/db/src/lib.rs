//! `scaleout-db`: the seed's data tier — SQLite behind rqlite's HTTP API,
//! replicated with Raft.
//!
//! [`request`] parses rqlite's request forms (plain SQL strings,
//! `["sql", p1, ...]` positional and `["sql", {"name": v}]` named
//! parameters) and [`engine`] executes them on SQLite with rqlite's result
//! shapes, transactions that leave no partial writes, and read-only
//! enforcement for queries, every client statement under [`guard`]
//! (SQLite's authorizer and a budget of VM steps or time);
//! [`http`] serves rqlite's data API in front of
//! any [`http::Node`] and forwards what only the leader may serve;
//! [`determinism`] replaces `random()`, `randomblob(N)`, the clock and
//! `CURRENT_*` on the apply connection with functions of the moment the
//! leader fixed, so that every node applying a write gets the same state;
//! [`state`] applies committed entries exactly once (the applied log id is
//! committed with the effects); [`log`] is the durable Raft log file;
//! [`raft`] wires them into openraft (log store, state machine and
//! snapshots, RPCs, group commit); [`node`] is a running node with its
//! cluster endpoints (`/status`, `/nodes`, `/readyz`, `/leader`, `/join`,
//! `/remove`, backup and load, `/metrics`); [`dump`] writes SQL dumps.

pub mod auth;
pub mod bounded;
pub mod determinism;
pub mod dump;
pub mod engine;
pub mod error;
pub mod guard;
pub mod http;
pub mod log;
pub mod metrics;
pub mod node;
pub mod peers;
pub mod raft;
pub mod request;
pub mod state;
pub mod values;

pub use engine::{ExecOptions, WriteEnv};
pub use request::{parse_statements, Param, Params, RequestError, Statement};
