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

use crate::store::{Link, ReadOpts, Served, Store, StoreError, Written};

const READERS: usize = 4;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS links (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    code       TEXT NOT NULL UNIQUE,
    url        TEXT NOT NULL,
    created_at TEXT NOT NULL
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

fn row_to_link(row: &rusqlite::Row<'_>) -> rusqlite::Result<Link> {
    Ok(Link {
        code: row.get(0)?,
        url: row.get(1)?,
        created_at: row.get(2)?,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert(&self, link: &Link) -> Result<Written<()>, StoreError> {
        let link = link.clone();
        self.write(move |conn, node| {
            match conn.execute(
                "INSERT INTO links (code, url, created_at) VALUES (?1, ?2, ?3)",
                params![link.code, link.url, link.created_at],
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

    async fn newest(&self, limit: u32, _opts: ReadOpts) -> Result<Served<Vec<Link>>, StoreError> {
        self.read(move |conn, node| {
            conn.prepare_cached("SELECT code, url, created_at FROM links ORDER BY id DESC LIMIT ?1")
                .and_then(|mut stmt| stmt.query_map([limit], row_to_link)?.collect())
                .map_err(|e| sql_error(node, e))
        })
        .await
    }

    async fn delete(&self, code: &str) -> Result<Written<bool>, StoreError> {
        let code = code.to_string();
        self.write(move |conn, node| {
            let n = conn
                .execute("DELETE FROM links WHERE code = ?1", [code])
                .map_err(|e| sql_error(node, e))?;
            Ok(Written {
                value: n > 0,
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
        }
    }

    #[tokio::test]
    async fn insert_get_list_delete_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/links.sqlite");
        let store = SqliteStore::open(&path, "db-test").unwrap();
        store.insert(&link("aaa")).await.unwrap();
        store.insert(&link("bbb")).await.unwrap();
        let got = store.get("aaa", ReadOpts::default()).await.unwrap();
        assert_eq!(got.value, Some(link("aaa")));
        assert_eq!(got.node, "db-test");
        let newest = store.newest(10, ReadOpts::default()).await.unwrap().value;
        assert_eq!(newest, vec![link("bbb"), link("aaa")]);
        assert_eq!(
            store
                .newest(1, ReadOpts::default())
                .await
                .unwrap()
                .value
                .len(),
            1
        );

        assert!(matches!(
            store.insert(&link("aaa")).await,
            Err(StoreError::Conflict { code }) if code == "aaa"
        ));
        assert!(store.delete("aaa").await.unwrap().value);
        assert!(!store.delete("aaa").await.unwrap().value);
        assert_eq!(
            store.get("aaa", ReadOpts::default()).await.unwrap().value,
            None
        );
        drop(store);

        let reopened = SqliteStore::open(&path, "db-test").unwrap();
        let newest = reopened
            .newest(10, ReadOpts::default())
            .await
            .unwrap()
            .value;
        assert_eq!(newest, vec![link("bbb")]);
        assert_eq!(reopened.ping().await.unwrap(), "db-test");
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
