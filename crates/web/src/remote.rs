//! Stages 2–4's store: the replicated database over its HTTP API, through
//! [`scaleout_client`]. Writes go to the leader, reads to the read
//! replicas; a read that must see a write carries its log index
//! (`min_index`), so a link created through one web server is found
//! through any other.

use async_trait::async_trait;
use scaleout_client::{Client, ClientError};
use scaleout_wire::data::{Row, ShapeError, StatementResult};
use serde_json::{json, Value};

use crate::store::{Deleted, Deleter, Link, Page, ReadOpts, Served, Store, StoreError, Written};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS links (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    code       TEXT NOT NULL UNIQUE,
    url        TEXT NOT NULL,
    created_at TEXT NOT NULL,
    delete_hash TEXT
)";

#[derive(Clone)]
pub struct RemoteStore {
    client: Client,
}

fn store_error(e: ClientError) -> StoreError {
    match e {
        ClientError::Unavailable(reason) => StoreError::Unavailable {
            node: "cluster".into(),
            reason,
        },
        ClientError::Unknown { node, reason } => StoreError::OutcomeUnknown { node, reason },
        ClientError::Refused { node, reason } | ClientError::AheadOfLog { node, reason } => {
            StoreError::Internal { node, reason }
        }
    }
}

/// The first result of an answer, or the error it carries.
fn first(results: &[StatementResult], node: &str) -> Result<StatementResult, StoreError> {
    let r = results
        .first()
        .cloned()
        .ok_or_else(|| StoreError::Internal {
            node: node.into(),
            reason: "an answer without a result for its statement".into(),
        })?;
    match &r.error {
        Some(e) => Err(StoreError::Internal {
            node: node.into(),
            reason: e.clone(),
        }),
        None => Ok(r),
    }
}

/// The rows a write changed (rqlite leaves a zero out).
fn rows_changed(result: &StatementResult, node: &str) -> Result<u64, StoreError> {
    result.rows_changed().map_err(|e| shape(e, node))
}

/// A read's rows, or why they do not have the shape the store asked for.
fn table<'a>(result: &'a StatementResult, node: &str) -> Result<Vec<Row<'a>>, StoreError> {
    result.table().map_err(|e| shape(e, node))
}

fn shape(e: ShapeError, node: &str) -> StoreError {
    StoreError::Internal {
        node: node.into(),
        reason: format!("unexpected result: {e}"),
    }
}

/// Whether the links table has its `delete_hash` column (as seen by a
/// node that has applied `index`).
async fn has_delete_hash(client: &Client, index: u64) -> Result<bool, StoreError> {
    let columns = client
        .query(
            &json!(["SELECT name FROM pragma_table_info('links') WHERE name = 'delete_hash'"]),
            Some(index),
        )
        .await
        .map_err(store_error)?;
    let result = first(&columns.results, &columns.node)?;
    Ok(!table(&result, &columns.node)?.is_empty())
}

fn link_of(row: &Row<'_>) -> Result<Link, ShapeError> {
    Ok(Link {
        code: row.text("code")?.to_string(),
        url: row.text("url")?.to_string(),
        created_at: row.text("created_at")?.to_string(),
        delete_hash: None,
    })
}

impl RemoteStore {
    /// Connects to the cluster one of `seeds` belongs to and makes sure the
    /// schema exists (waiting up to `patience` for a leader).
    pub async fn connect(
        seeds: Vec<String>,
        patience: std::time::Duration,
    ) -> Result<Self, StoreError> {
        Self::connect_as(seeds, None, patience).await
    }

    /// [`RemoteStore::connect`], signing in to the database as
    /// `credentials` (its `--auth`).
    pub async fn connect_as(
        seeds: Vec<String>,
        credentials: Option<scaleout_client::Credentials>,
        patience: std::time::Duration,
    ) -> Result<Self, StoreError> {
        Self::connect_with(seeds, credentials, None, patience).await
    }

    /// [`RemoteStore::connect_as`], over TLS to `https://` nodes.
    pub async fn connect_with(
        seeds: Vec<String>,
        credentials: Option<scaleout_client::Credentials>,
        tls: Option<&scaleout_tls::ClientTls>,
        patience: std::time::Duration,
    ) -> Result<Self, StoreError> {
        let client = Client::with_tls(seeds, credentials, tls).map_err(store_error)?;
        client.discover(patience).await.map_err(store_error)?;
        let created = client
            .execute(&json!([SCHEMA]), false)
            .await
            .map_err(store_error)?;
        first(&created.results, &created.node)?;
        // A table from before delete tokens gets their column.
        if !has_delete_hash(&client, created.raft_index).await? {
            let altered = client
                .execute(
                    &json!(["ALTER TABLE links ADD COLUMN delete_hash TEXT"]),
                    false,
                )
                .await
                .map_err(store_error)?;
            if let Err(e) = first(&altered.results, &altered.node) {
                // Fine if another web server added it first: asked of a
                // node that has seen this attempt.
                if !has_delete_hash(&client, altered.raft_index).await? {
                    return Err(e);
                }
            }
        }
        Ok(RemoteStore { client })
    }

    /// One read statement's result, served as the stored link type wants.
    async fn read<T>(
        &self,
        statement: Value,
        opts: ReadOpts,
        value: impl FnOnce(&StatementResult) -> Result<T, ShapeError>,
    ) -> Result<Served<T>, StoreError> {
        let statements = json!([statement]);
        let (answer, session_reset) = match self.client.query(&statements, opts.min_index).await {
            Ok(answer) => (answer, false),
            // The browser's cookie names a state this cluster never had:
            // serve it the data as it is, and start its session afresh.
            Err(ClientError::AheadOfLog { node, reason }) => {
                tracing::info!(%node, %reason, "a session index beyond the log; read without it");
                let answer = self
                    .client
                    .query(&statements, None)
                    .await
                    .map_err(store_error)?;
                (answer, true)
            }
            Err(e) => return Err(store_error(e)),
        };
        let result = first(&answer.results, &answer.node)?;
        Ok(Served {
            value: value(&result).map_err(|e| shape(e, &answer.node))?,
            node: answer.node,
            index: Some(answer.raft_index),
            session_reset,
        })
    }
}

#[async_trait]
impl Store for RemoteStore {
    async fn insert(&self, link: &Link) -> Result<Written<()>, StoreError> {
        // A taken code inserts nothing (no error text to interpret): the
        // answer's rows_affected says which happened.
        let statement = json!([[
            "INSERT INTO links (code, url, created_at, delete_hash) VALUES (?, ?, ?, ?) \
             ON CONFLICT (code) DO NOTHING",
            link.code,
            link.url,
            link.created_at,
            link.delete_hash
        ]]);
        let done = self
            .client
            .execute(&statement, false)
            .await
            .map_err(store_error)?;
        match rows_changed(&first(&done.results, &done.node)?, &done.node)? {
            1 => Ok(Written {
                value: (),
                node: done.node,
                index: Some(done.raft_index),
            }),
            0 => Err(StoreError::Conflict {
                code: link.code.clone(),
            }),
            other => Err(StoreError::Internal {
                node: done.node,
                reason: format!("an insert of one row affected {other:?}"),
            }),
        }
    }

    async fn get(&self, code: &str, opts: ReadOpts) -> Result<Served<Option<Link>>, StoreError> {
        self.read(
            json!([
                "SELECT code, url, created_at FROM links WHERE code = ?",
                code
            ]),
            opts,
            |result| {
                let rows = result.table()?;
                rows.first().map(link_of).transpose()
            },
        )
        .await
    }

    async fn newest(
        &self,
        limit: u32,
        before: Option<i64>,
        opts: ReadOpts,
    ) -> Result<Served<Page>, StoreError> {
        self.read(
            json!([
                "SELECT code, url, created_at, id FROM links WHERE id < ? ORDER BY id DESC LIMIT ?",
                before.unwrap_or(i64::MAX),
                limit
            ]),
            opts,
            |result| {
                let rows = result
                    .table()?
                    .iter()
                    .map(|row| Ok((row.int("id")?, link_of(row)?)))
                    .collect::<Result<Vec<_>, ShapeError>>()?;
                Ok(crate::store::page_of(rows, limit))
            },
        )
        .await
    }

    async fn delete(&self, code: &str, by: &Deleter) -> Result<Written<Deleted>, StoreError> {
        let statement = match by {
            Deleter::Admin => json!([["DELETE FROM links WHERE code = ?", code]]),
            Deleter::Owner { token_hash } => json!([[
                "DELETE FROM links WHERE code = ? AND delete_hash = ?",
                code,
                token_hash
            ]]),
        };
        let done = self
            .client
            .execute(&statement, false)
            .await
            .map_err(store_error)?;
        let result = first(&done.results, &done.node)?;
        let value = if rows_changed(&result, &done.node)? > 0 {
            Deleted::Done
        } else {
            // Nothing deleted: no such link, or not this token's. Asked of
            // a node that has seen the delete.
            let opts = ReadOpts {
                min_index: Some(done.raft_index),
            };
            match self.get(code, opts).await?.value {
                Some(_) => Deleted::WrongToken,
                None => Deleted::NoSuchLink,
            }
        };
        Ok(Written {
            value,
            node: done.node,
            index: Some(done.raft_index),
        })
    }

    async fn ping(&self) -> Result<String, StoreError> {
        let served = self
            .read(json!("SELECT 1"), ReadOpts::default(), |_| Ok(()))
            .await?;
        Ok(served.node)
    }
}
