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
    /// SHA-256 (hex) of the token that may delete the link; set when it is
    /// created, never read back (links created before tokens have none:
    /// only an admin deletes those).
    #[serde(skip)]
    pub delete_hash: Option<String>,
}

/// Who asks to delete a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleter {
    /// Whoever holds the token returned at creation: its SHA-256 (hex).
    Owner { token_hash: String },
    /// The web tier's admin.
    Admin,
}

/// What a delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Done,
    NoSuchLink,
    /// The link exists and the token is not its own.
    WrongToken,
}

/// One page of the newest links, and where the next page starts.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub links: Vec<Link>,
    /// The `before` of the next page; `None` on the last page.
    pub next: Option<i64>,
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
    /// The newest links first, at most `limit`, older than the link
    /// numbered `before` when given (paging).
    async fn newest(
        &self,
        limit: u32,
        before: Option<i64>,
        opts: ReadOpts,
    ) -> Result<Served<Page>, StoreError>;
    /// Deletes a link when `by` may.
    async fn delete(&self, code: &str, by: &Deleter) -> Result<Written<Deleted>, StoreError>;
    /// Checks that the database answers; returns the node that answered.
    async fn ping(&self) -> Result<String, StoreError>;
}

/// A page from up to `limit` rows `(id, link)`, newest first: a full page
/// says where the next one starts.
pub fn page_of(rows: Vec<(i64, Link)>, limit: u32) -> Page {
    let next = (rows.len() as u32 >= limit)
        .then(|| rows.last().map(|(id, _)| *id))
        .flatten();
    Page {
        links: rows.into_iter().map(|(_, link)| link).collect(),
        next,
    }
}
