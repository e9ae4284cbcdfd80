//! The Raft side of a node, on openraft (0.9, storage v2): what goes in
//! the log ([`Command`]), who is in the cluster ([`Member`]), the durable
//! log ([`log_store`]), the SQLite state machine with its snapshots
//! ([`state_store`]) and the node-to-node RPCs over HTTP ([`network`]).

// openraft's StorageError is large by design; its API returns it by value.
#![allow(clippy::result_large_err)]

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::{ExecOptions, WriteEnv};
use crate::request::Statement;

pub mod log_store;
pub mod network;
pub mod proposer;
pub mod state_store;
pub mod stream;

/// What a committed log entry asks every node to do. The SQL travels as
/// the client sent it, with what the leader fixed for it (`env`: the
/// moment its functions see, its budget): every node applies it on a
/// connection made deterministic (see [`crate::determinism`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    Execute {
        statements: Vec<Statement>,
        opts: ExecOptions,
        #[serde(default)]
        env: WriteEnv,
    },
    /// `/db/load`: SQL text run as one transaction; with `replace`, the
    /// database is emptied first (loading a whole SQLite file).
    Load {
        sql: String,
        replace: bool,
        #[serde(default)]
        env: WriteEnv,
    },
    /// Nothing to apply: a strong read's round trip through the log.
    Barrier,
    /// Several clients' commands in one entry (group commit, see
    /// [`proposer`]); each is applied on its own. Shared, not copied,
    /// when openraft hands the entry to each peer's replication and to
    /// the state machine (the same JSON as a list).
    Batch(std::sync::Arc<Vec<Command>>),
}

/// A node's two addresses, as the others reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The HTTP API (`host:port`).
    pub api: String,
    /// The Raft RPC listener (`host:port`).
    pub raft: String,
    /// The node's own name, where it is not its number (rqlite's ids are
    /// strings: `0`, `db-a`): what `/nodes` and `/status` show.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Member {
    /// What a node of Raft id `id` is called.
    pub fn name_of(&self, id: u64) -> String {
        self.name.clone().unwrap_or_else(|| id.to_string())
    }

    pub fn api_url(&self) -> String {
        format!("{}://{}", crate::peers::scheme(), self.api)
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "api={} raft={}", self.api, self.raft)
    }
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Command,
        R = Vec<Value>,
        NodeId = u64,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<u64>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<u64, Member>;
pub type StorageError = openraft::StorageError<u64>;
pub type WriteError =
    openraft::error::RaftError<u64, openraft::error::ClientWriteError<u64, Member>>;

/// openraft's storage error for an I/O failure of `what`.
pub(crate) fn io_error(
    subject: openraft::ErrorSubject<u64>,
    verb: openraft::ErrorVerb,
    e: impl std::fmt::Display,
) -> StorageError {
    StorageError::from(openraft::StorageIOError::new(
        subject,
        verb,
        openraft::AnyError::error(e.to_string()),
    ))
}

#[cfg(test)]
mod tests {
    use super::log_store::LogStore;
    use super::state_store::StateStore;
    use super::*;

    struct Builder;

    impl openraft::testing::StoreBuilder<TypeConfig, LogStore, StateStore, tempfile::TempDir>
        for Builder
    {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateStore), StorageError> {
            let dir = tempfile::tempdir().map_err(|e| {
                io_error(openraft::ErrorSubject::Store, openraft::ErrorVerb::Write, e)
            })?;
            let log = LogStore::open(&dir.path().join("raft"), 1, false, Default::default())?;
            // The suite applies entries it never appended: the gate on
            // this node's fsync (see log_store) has nothing to wait for.
            let durable = super::log_store::Durable::everything();
            let state =
                StateStore::open(dir.path(), Default::default(), durable, Default::default())?;
            Ok((dir, log, state))
        }
    }

    /// openraft's own conformance suite for log and state machine storage.
    #[test]
    fn the_storage_passes_openrafts_suite() {
        openraft::testing::Suite::test_all(Builder).unwrap();
    }
}
