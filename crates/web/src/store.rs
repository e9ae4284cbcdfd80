//! The narrow interface the web app needs from its data tier.
//!
//! The web crate owns this trait (the consumer owns the interface): stage 1
//! implements it with an embedded SQLite file ([`crate::SqliteStore`]); later
//! stages implement it over the replicated data API. Every answer names the
//! database node that produced it, so pages and headers can show which
//! node served a read (the seed's "reads go to the slaves", made visible).

use async_trait::async_trait;
use serde::Serialize;

pub use crate::error::StoreError;

/// One shortened link as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Link {
    pub code: String,
    pub url: String,
    /// RFC 3339 UTC time, chosen by the web server (not by the database) so
    /// that replicas applying the same write store the same value.
    pub created_at: String,
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOpts {
    /// Serve only from a node that has applied at least this log index
    /// (read-your-writes). `None`: any node, possibly slightly stale.
    pub min_index: Option<u64>,
}

/// A read result, the database node that served it, and the log index of
/// the state it saw (`None` for an unreplicated store).
#[derive(Debug, Clone)]
pub struct Served<T> {
    pub value: T,
    pub node: String,
    pub index: Option<u64>,
    /// The `min_index` asked for was beyond the database's log (the
    /// session cookie did not come from this cluster): the read was served
    /// without it, and the session should start again from `index`.
    pub session_reset: bool,
}

/// A write result: the node that took it and the log index that committed it
/// (`None` for an unreplicated store, where every read sees every write).
#[derive(Debug, Clone)]
pub struct Written<T> {
    pub value: T,
    pub node: String,
    pub index: Option<u64>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a new link; `StoreError::Conflict` when the code is taken.
    async fn insert(&self, link: &Link) -> Result<Written<()>, StoreError>;
    /// Looks one link up by code.
    async fn get(&self, code: &str, opts: ReadOpts) -> Result<Served<Option<Link>>, StoreError>;
    /// The newest links first, at most `limit`.
    async fn newest(&self, limit: u32, opts: ReadOpts) -> Result<Served<Vec<Link>>, StoreError>;
    /// Deletes a link; `value` says whether it existed.
    async fn delete(&self, code: &str) -> Result<Written<bool>, StoreError>;
    /// Checks that the database answers; returns the node that answered.
    async fn ping(&self) -> Result<String, StoreError>;
}
