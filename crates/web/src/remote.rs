//! Stages 2–4's store: the replicated database over its HTTP API, through
//! [`scaleout_client`]. Writes go to the leader, reads to the read
//! replicas; a read that must see a write carries its log index
//! (`min_index`), so a link created through one web server is found
//! through any other.

use async_trait::async_trait;
use scaleout_client::{Client, ClientError};
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
        ClientError::Unknown { node, reason } => StoreError::Unavailable { node, reason },
        ClientError::Refused { node, reason } | ClientError::AheadOfLog { node, reason } => {
            StoreError::Internal { node, reason }
        }
    }
}

/// The first result of an answer, or the error it carries.
fn first(results: &[Value], node: &str) -> Result<Value, StoreError> {
    let r = results.first().cloned().unwrap_or(Value::Null);
    match r.get("error").and_then(Value::as_str) {
        Some(e) => Err(StoreError::Internal {
            node: node.into(),
            reason: e.into(),
        }),
        None => Ok(r),
    }
}

fn links_of(result: &Value) -> Vec<Link> {
    result["values"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|row| {
                    Some(Link {
                        code: row[0].as_str()?.to_string(),
                        url: row[1].as_str()?.to_string(),
                        created_at: row[2].as_str()?.to_string(),
                        delete_hash: None,
                    })
                })
                .collect()
        })
        .unwrap_or_default()
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
        let columns = client
            .query(
                &json!(["SELECT name FROM pragma_table_info('links') WHERE name = 'delete_hash'"]),
                Some(created.raft_index),
            )
            .await
            .map_err(store_error)?;
        let has = first(&columns.results, &columns.node)?["values"]
            .as_array()
            .is_some_and(|rows| !rows.is_empty());
        if !has {
            let altered = client
                .execute(
                    &json!(["ALTER TABLE links ADD COLUMN delete_hash TEXT"]),
                    false,
                )
                .await
                .map_err(store_error)?;
            if let Err(e) = first(&altered.results, &altered.node) {
                // Another web server added it first.
                if !e.to_string().contains("duplicate column") {
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
        value: impl FnOnce(&Value) -> T,
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
            value: value(&result),
            node: answer.node,
            index: Some(answer.raft_index),
            session_reset,
        })
    }
}

#[async_trait]
impl Store for RemoteStore {
    async fn insert(&self, link: &Link) -> Result<Written<()>, StoreError> {
        let statement = json!([[
            "INSERT INTO links (code, url, created_at, delete_hash) VALUES (?, ?, ?, ?)",
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
        match first(&done.results, &done.node) {
            Ok(_) => Ok(Written {
                value: (),
                node: done.node,
                index: Some(done.raft_index),
            }),
            Err(StoreError::Internal { reason, .. }) if reason.contains("UNIQUE") => {
                Err(StoreError::Conflict {
                    code: link.code.clone(),
                })
            }
            Err(e) => Err(e),
        }
    }

    async fn get(&self, code: &str, opts: ReadOpts) -> Result<Served<Option<Link>>, StoreError> {
        self.read(
            json!([
                "SELECT code, url, created_at FROM links WHERE code = ?",
                code
            ]),
            opts,
            |result| links_of(result).into_iter().next(),
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
                let ids = result["values"].as_array().map(|rows| {
                    rows.iter()
                        .filter_map(|row| row[3].as_i64())
                        .collect::<Vec<_>>()
                });
                let rows = ids
                    .unwrap_or_default()
                    .into_iter()
                    .zip(links_of(result))
                    .collect();
                crate::store::page_of(rows, limit)
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
        let value = if result["rows_affected"].as_u64().unwrap_or(0) > 0 {
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
            .read(json!("SELECT 1"), ReadOpts::default(), |_| ())
            .await?;
        Ok(served.node)
    }
}
