//! Stage 1's store: an SQLite file embedded in the web server's process.
//!
//! One writer connection and a few reader connections in WAL mode, so reads
//! never wait behind a write. `synchronous=FULL`: a link whose creation was
//! answered survives a crash of the process or the machine. rusqlite is
//! blocking, so every call runs on tokio's blocking pool.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};

use crate::store::{Deleted, Deleter, Link, Page, ReadOpts, Served, Store, StoreError, Written};

const READERS: usize = 4;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS links (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    code       TEXT NOT NULL UNIQUE,
    url        TEXT NOT NULL,
    created_at TEXT NOT NULL,
    delete_hash TEXT
);";

#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    node: String,
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: std::sync::atomic::AtomicUsize,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`. `node` is the
    /// name shown as "the database node that served" this read.
    pub fn open(path: &Path, node: impl Into<String>) -> Result<Self, StoreError> {
        let node = node.into();
        let fail = |e: &dyn std::fmt::Display| StoreError::Internal {
            node: node.clone(),
            reason: format!("opening {}: {e}", path.display()),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        }
        let writer = Connection::open(path).map_err(|e| fail(&e))?;
        writer
            .execute_batch(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;",
            )
            .and_then(|()| writer.execute_batch(SCHEMA))
            .and_then(|()| add_delete_hash(&writer))
            .map_err(|e| fail(&e))?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let reader = Connection::open(path).map_err(|e| fail(&e))?;
            reader
                .execute_batch("PRAGMA busy_timeout=5000; PRAGMA query_only=ON;")
                .map_err(|e| fail(&e))?;
            readers.push(Mutex::new(reader));
        }
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                node,
                path: path.to_path_buf(),
                writer: Mutex::new(writer),
                readers,
                next_reader: Default::default(),
            }),
        })
    }

    pub fn node(&self) -> &str {
        &self.inner.node
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` with the writer connection on the blocking pool.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &str) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        self.blocking(move || {
            let conn = lock(&inner.writer);
            f(&conn, &inner.node)
        })
        .await
    }

    /// Runs `f` with one of the reader connections, taken in turn.
    async fn read<T, F>(&self, f: F) -> Result<Served<T>, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &str) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        self.blocking(move || {
            let i = inner
                .next_reader
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let conn = lock(&inner.readers[i % inner.readers.len()]);
            let value = f(&conn, &inner.node)?;
            Ok(Served {
                value,
                node: inner.node.clone(),
                index: None,
                session_reset: false,
            })
        })
        .await
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| StoreError::Internal {
                node: self.inner.node.clone(),
                reason: format!("database task failed: {e}"),
            })?
    }
}

fn lock(m: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    // A poisoned lock means a panic while holding the connection; SQLite's
    // own state is still consistent (each statement is atomic), so taking
    // the connection back is safe.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn sql_error(node: &str, e: rusqlite::Error) -> StoreError {
    let busy = matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    );
    let reason = e.to_string();
    let node = node.to_string();
    if busy {
        StoreError::Unavailable { node, reason }
    } else {
        StoreError::Internal { node, reason }
    }
}

/// A file from before delete tokens gets their column.
fn add_delete_hash(conn: &Connection) -> rusqlite::Result<()> {
    let has: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('links') WHERE name = 'delete_hash'")?
        .exists([])?;
    if !has {
        conn.execute_batch("ALTER TABLE links ADD COLUMN delete_hash TEXT")?;
    }
    Ok(())
}

fn row_to_link(row: &rusqlite::Row<'_>) -> rusqlite::Result<Link> {
    Ok(Link {
        code: row.get(0)?,
        url: row.get(1)?,
        created_at: row.get(2)?,
        delete_hash: None,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert(&self, link: &Link) -> Result<Written<()>, StoreError> {
        let link = link.clone();
        self.write(move |conn, node| {
            match conn.execute(
                "INSERT INTO links (code, url, created_at, delete_hash) VALUES (?1, ?2, ?3, ?4)",
                params![link.code, link.url, link.created_at, link.delete_hash],
            ) {
                Ok(_) => Ok(Written {
                    value: (),
                    node: node.to_string(),
                    index: None,
                }),
                Err(e) if e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation) => {
                    Err(StoreError::Conflict { code: link.code })
                }
                Err(e) => Err(sql_error(node, e)),
            }
        })
        .await
    }

    async fn get(&self, code: &str, _opts: ReadOpts) -> Result<Served<Option<Link>>, StoreError> {
        let code = code.to_string();
        self.read(move |conn, node| {
            conn.prepare_cached("SELECT code, url, created_at FROM links WHERE code = ?1")
                .and_then(|mut stmt| stmt.query_row([code], row_to_link).optional())
                .map_err(|e| sql_error(node, e))
        })
        .await
    }

    async fn newest(
        &self,
        limit: u32,
        before: Option<i64>,
        _opts: ReadOpts,
    ) -> Result<Served<Page>, StoreError> {
        self.read(move |conn, node| {
            let rows: Vec<(i64, Link)> = conn
                .prepare_cached(
                    "SELECT code, url, created_at, id FROM links WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
                )
                .and_then(|mut stmt| {
                    stmt.query_map(params![before.unwrap_or(i64::MAX), limit], |row| {
                        Ok((row.get(3)?, row_to_link(row)?))
                    })?
                    .collect()
                })
                .map_err(|e| sql_error(node, e))?;
            Ok(crate::store::page_of(rows, limit))
        })
        .await
    }

    async fn delete(&self, code: &str, by: &Deleter) -> Result<Written<Deleted>, StoreError> {
        let code = code.to_string();
        let by = by.clone();
        self.write(move |conn, node| {
            let n = match &by {
                Deleter::Admin => conn.execute("DELETE FROM links WHERE code = ?1", [&code]),
                Deleter::Owner { token_hash } => conn.execute(
                    "DELETE FROM links WHERE code = ?1 AND delete_hash = ?2",
                    [&code, token_hash],
                ),
            }
            .map_err(|e| sql_error(node, e))?;
            let value = if n > 0 {
                Deleted::Done
            } else {
                let exists = conn
                    .prepare_cached("SELECT 1 FROM links WHERE code = ?1")
                    .and_then(|mut stmt| stmt.exists([&code]))
                    .map_err(|e| sql_error(node, e))?;
                if exists {
                    Deleted::WrongToken
                } else {
                    Deleted::NoSuchLink
                }
            };
            Ok(Written {
                value,
                node: node.to_string(),
                index: None,
            })
        })
        .await
    }

    async fn ping(&self) -> Result<String, StoreError> {
        let served = self
            .read(|conn, node| {
                conn.query_row("SELECT 1", [], |_| Ok(()))
                    .map_err(|e| sql_error(node, e))
            })
            .await?;
        Ok(served.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(code: &str) -> Link {
        Link {
            code: code.into(),
            url: format!("https://example.com/{code}"),
            created_at: "2026-01-01T00:00:00.000Z".into(),
            delete_hash: None,
        }
    }

    fn owned(code: &str, token: &str) -> Link {
        Link {
            delete_hash: Some(crate::links::token_hash(token)),
            ..link(code)
        }
    }

    fn owner(token: &str) -> Deleter {
        Deleter::Owner {
            token_hash: crate::links::token_hash(token),
        }
    }

    async fn newest(store: &SqliteStore, limit: u32, before: Option<i64>) -> Page {
        store
            .newest(limit, before, ReadOpts::default())
            .await
            .unwrap()
            .value
    }

    #[tokio::test]
    async fn insert_get_page_delete_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/links.sqlite");
        let store = SqliteStore::open(&path, "db-test").unwrap();
        store.insert(&owned("aaa", "ta")).await.unwrap();
        store.insert(&owned("bbb", "tb")).await.unwrap();
        store.insert(&link("ccc")).await.unwrap();
        let got = store.get("aaa", ReadOpts::default()).await.unwrap();
        assert_eq!(got.value, Some(link("aaa")), "the hash is never read back");
        assert_eq!(got.node, "db-test");
        let all = newest(&store, 10, None).await;
        assert_eq!(all.links, vec![link("ccc"), link("bbb"), link("aaa")]);
        assert_eq!(all.next, None, "one page holds them all");
        let first = newest(&store, 2, None).await;
        assert_eq!(first.links, vec![link("ccc"), link("bbb")]);
        let second = newest(&store, 2, first.next).await;
        assert_eq!(second.links, vec![link("aaa")]);
        assert_eq!(second.next, None);

        assert!(matches!(
            store.insert(&link("aaa")).await,
            Err(StoreError::Conflict { code }) if code == "aaa"
        ));
        let delete = |code: &'static str, by: Deleter| {
            let store = store.clone();
            async move { store.delete(code, &by).await.unwrap().value }
        };
        assert_eq!(delete("aaa", owner("tb")).await, Deleted::WrongToken);
        assert_eq!(
            delete("ccc", owner("")).await,
            Deleted::WrongToken,
            "no token, no owner"
        );
        assert_eq!(delete("aaa", owner("ta")).await, Deleted::Done);
        assert_eq!(delete("aaa", owner("ta")).await, Deleted::NoSuchLink);
        assert_eq!(delete("ccc", Deleter::Admin).await, Deleted::Done);
        assert_eq!(
            store.get("aaa", ReadOpts::default()).await.unwrap().value,
            None
        );
        drop(store);

        let reopened = SqliteStore::open(&path, "db-test").unwrap();
        assert_eq!(newest(&reopened, 10, None).await.links, vec![link("bbb")]);
        assert_eq!(reopened.ping().await.unwrap(), "db-test");
    }

    #[tokio::test]
    async fn a_file_from_before_delete_tokens_gets_the_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE links (id INTEGER PRIMARY KEY AUTOINCREMENT, code TEXT NOT NULL UNIQUE,
             url TEXT NOT NULL, created_at TEXT NOT NULL);
             INSERT INTO links (code, url, created_at) VALUES ('old', 'https://example.com/old', 't');",
        )
        .unwrap();
        drop(old);
        let store = SqliteStore::open(&path, "db").unwrap();
        store.insert(&owned("new", "tn")).await.unwrap();
        assert_eq!(
            store.delete("old", &owner("x")).await.unwrap().value,
            Deleted::WrongToken,
            "a link from before tokens: only an admin deletes it"
        );
        assert_eq!(
            store.delete("new", &owner("tn")).await.unwrap().value,
            Deleted::Done
        );
    }

    #[test]
    fn open_reports_an_unusable_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        // A path below a regular file cannot be created.
        let err = SqliteStore::open(&file.join("links.sqlite"), "db")
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::Internal { .. }), "{err}");
    }
}
