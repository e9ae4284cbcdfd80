//! Backups and loads: the database as a SQLite file or as SQL text (like
//! the `sqlite3` shell's `.dump`), always without the node's own
//! bookkeeping, so a backup loads into any cluster (or plain `sqlite3`).

use rusqlite::Connection;

use crate::engine::RESERVED_PREFIX;

fn quote_name(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn user_object(name: &str) -> bool {
    !name.starts_with("sqlite_") && !name.starts_with(RESERVED_PREFIX)
}

/// The whole database as SQL text that recreates it, read in one read
/// transaction (one consistent state, however writes go on meanwhile).
/// Virtual tables are recreated by their `CREATE VIRTUAL TABLE` and their
/// rows; their shadow tables (FTS5's `_data`, `_idx`, ...), which the
/// module makes and fills itself, are left out.
pub fn dump(conn: &Connection) -> rusqlite::Result<String> {
    let tx = conn.unchecked_transaction()?;
    let out = dump_in(&tx);
    tx.finish()?;
    out
}

/// Shadow tables of virtual tables, as SQLite reports them.
fn shadow_tables(conn: &Connection) -> rusqlite::Result<std::collections::HashSet<String>> {
    conn.prepare("SELECT name FROM pragma_table_list WHERE schema = 'main' AND type = 'shadow'")?
        .query_map([], |r| r.get(0))?
        .collect()
}

fn dump_in(conn: &Connection) -> rusqlite::Result<String> {
    let shadow = shadow_tables(conn)?;
    let mut out = String::from("PRAGMA foreign_keys=OFF;\nBEGIN TRANSACTION;\n");
    let tables: Vec<(String, String)> = conn
        .prepare(
            "SELECT name, sql FROM sqlite_schema WHERE type = 'table' AND sql IS NOT NULL ORDER BY rowid",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (name, sql) in tables
        .iter()
        .filter(|(n, _)| user_object(n) && !shadow.contains(n))
    {
        out.push_str(sql);
        out.push_str(";\n");
        let columns: Vec<String> = conn
            .prepare(&format!("PRAGMA table_info({})", quote_name(name)))?
            .query_map([], |r| r.get::<_, String>(1))?
            .collect::<rusqlite::Result<_>>()?;
        if columns.is_empty() {
            continue;
        }
        let values = columns
            .iter()
            .map(|c| format!("quote({})", quote_name(c)))
            .collect::<Vec<_>>()
            .join(" || ',' || ");
        let mut rows = conn.prepare(&format!("SELECT {values} FROM {}", quote_name(name)))?;
        let mut rows = rows.query([])?;
        while let Some(row) = rows.next()? {
            let row: String = row.get(0)?;
            out.push_str(&format!(
                "INSERT INTO {} VALUES({row});\n",
                quote_name(name)
            ));
        }
    }
    let others: Vec<(String, String)> = conn
        .prepare(
            "SELECT name, sql FROM sqlite_schema
             WHERE type IN ('index', 'trigger', 'view') AND sql IS NOT NULL ORDER BY rowid",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (_, sql) in others.iter().filter(|(n, _)| user_object(n)) {
        out.push_str(sql);
        out.push_str(";\n");
    }
    out.push_str("COMMIT;\n");
    Ok(out)
}

/// The database as a SQLite file's bytes (a consistent copy).
pub fn file_copy(conn: &Connection) -> rusqlite::Result<Vec<u8>> {
    let dir = tempfile::tempdir().map_err(|e| io(&e))?;
    let path = dir.path().join("backup.sqlite");
    crate::state::copy_to(conn, &path)?;
    {
        let copy = Connection::open(&path)?;
        copy.execute_batch(&format!(
            "DROP TABLE IF EXISTS {RESERVED_PREFIX}applied; VACUUM;"
        ))?;
    }
    std::fs::read(&path).map_err(|e| io(&e))
}

/// A SQLite file's bytes as SQL text (for `/db/load` of a file).
pub fn dump_file(bytes: &[u8]) -> rusqlite::Result<String> {
    let dir = tempfile::tempdir().map_err(|e| io(&e))?;
    let path = dir.path().join("load.sqlite");
    std::fs::write(&path, bytes).map_err(|e| io(&e))?;
    let conn = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    // A file from a client: its schema's functions do not run, and the
    // whole dump is bounded in time and in the size of any value.
    conn.execute_batch("PRAGMA trusted_schema=OFF")?;
    let guarded = crate::engine::Guarded::reader(conn, Default::default())?;
    guarded
        .guard
        .start_read(std::time::Instant::now() + LOAD_FILE_TIME);
    let conn = &guarded.conn;
    conn.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
        .and_then(|ok| {
            if ok == "ok" {
                Ok(())
            } else {
                Err(rusqlite::Error::InvalidParameterName(format!(
                    "integrity check: {ok}"
                )))
            }
        })?;
    dump(conn)
}

/// How long reading an uploaded SQLite file may take.
const LOAD_FILE_TIME: std::time::Duration = std::time::Duration::from_secs(60);

fn io(e: &std::io::Error) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(std::io::Error::new(e.kind(), e.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_recreates_the_database_without_bookkeeping() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, score REAL, pic BLOB);
             INSERT INTO t VALUES (1, 'it''s', 1.5, x'00ff'), (2, NULL, -3.25, NULL);
             CREATE INDEX t_name ON t (name);
             CREATE VIEW v AS SELECT name FROM t;
             CREATE TABLE _scaleout_applied (id INTEGER);",
        )
        .unwrap();
        let sql = dump(&conn).unwrap();
        assert!(!sql.contains("_scaleout_"), "{sql}");
        let copy = Connection::open_in_memory().unwrap();
        copy.execute_batch(&sql).unwrap();
        type Row = (i64, Option<String>, f64, Option<Vec<u8>>);
        let rows: Vec<Row> = copy
            .prepare("SELECT id, name, score, pic FROM t ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            rows,
            vec![
                (1, Some("it's".into()), 1.5, Some(vec![0, 255])),
                (2, None, -3.25, None)
            ]
        );
        let view: i64 = copy
            .query_row("SELECT count(*) FROM v", [], |r| r.get(0))
            .unwrap();
        assert_eq!(view, 2);
    }

    #[test]
    fn a_file_copy_loads_back() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE t (x); INSERT INTO t VALUES (42); CREATE TABLE _scaleout_applied (id);",
        )
        .unwrap();
        let bytes = file_copy(&conn).unwrap();
        assert!(bytes.starts_with(b"SQLite format 3\0"));
        let sql = dump_file(&bytes).unwrap();
        assert!(sql.contains("INSERT INTO \"t\" VALUES(42);"), "{sql}");
        assert!(!sql.contains("_scaleout_"));
        assert!(dump_file(b"SQLite format 3\0 but garbage after").is_err());
    }

    /// F9: a dump of a database with an FTS5 table loads back (its
    /// shadow tables are the module's to make).
    #[test]
    fn a_dump_with_a_full_text_table_loads_back() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE VIRTUAL TABLE ft USING fts5(body); INSERT INTO ft VALUES ('hello world'), ('hello again');",
        )
        .unwrap();
        let sql = dump(&conn).unwrap();
        assert!(!sql.contains("ft_data"), "{sql}");
        let copy = Connection::open_in_memory().unwrap();
        copy.execute_batch(&sql).unwrap();
        let n: i64 = copy
            .query_row("SELECT count(*) FROM ft WHERE ft MATCH 'hello'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(n, 2);
    }
}
