//! Statements executed on SQLite, answered in rqlite's shapes.
//!
//! - execute: `{"last_insert_id", "rows_affected"}` per statement, or
//!   `{"error"}`. With `transaction`, all statements run in one transaction
//!   and the first error rolls it back and stops (no partial writes);
//!   without, each statement stands alone and an error does not stop the
//!   rest.
//! - query: `{"columns", "types", "values"}`, or with `associative`
//!   `{"types": {col: type}, "rows": [{col: value}]}`; a statement that
//!   would change the database is refused.
//! - `time` (seconds) per result when `timings` is asked for.

use std::time::Instant;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, ToSql};
use serde_json::{json, Map, Value};

use crate::request::{Param, Params, Statement};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExecOptions {
    pub transaction: bool,
    pub timings: bool,
    pub associative: bool,
}

impl ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value as V};
        Ok(ToSqlOutput::Owned(match self {
            Param::Null => V::Null,
            Param::Integer(i) => V::Integer(*i),
            Param::Real(f) => V::Real(*f),
            Param::Text(s) => V::Text(s.clone()),
        }))
    }
}

fn prepare<'c>(conn: &'c Connection, s: &Statement) -> Result<rusqlite::Statement<'c>, String> {
    let mut stmt = conn.prepare(&s.sql).map_err(|e| e.to_string())?;
    match &s.params {
        Params::None => {}
        Params::Positional(values) => {
            if values.len() != stmt.parameter_count() {
                return Err(format!(
                    "the statement takes {} parameters, {} given",
                    stmt.parameter_count(),
                    values.len()
                ));
            }
            for (i, v) in values.iter().enumerate() {
                stmt.raw_bind_parameter(i + 1, v)
                    .map_err(|e| e.to_string())?;
            }
        }
        Params::Named(values) => {
            for (name, v) in values {
                let index = [":", "@", "$"]
                    .iter()
                    .find_map(|p| stmt.parameter_index(&format!("{p}{name}")).ok().flatten())
                    .ok_or_else(|| format!("the statement has no parameter named {name:?}"))?;
                stmt.raw_bind_parameter(index, v)
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(stmt)
}

fn with_time(mut result: Value, started: Instant, timings: bool) -> Value {
    if timings {
        if let Some(obj) = result.as_object_mut() {
            obj.insert("time".into(), json!(started.elapsed().as_secs_f64()));
        }
    }
    result
}

fn execute_one(conn: &Connection, s: &Statement) -> Result<Value, String> {
    if let Some(why) = refused(&s.sql) {
        return Err(why);
    }
    let mut stmt = prepare(conn, s)?;
    let mut rows = stmt.raw_query();
    while rows.next().map_err(|e| e.to_string())?.is_some() {}
    drop(rows);
    Ok(json!({ "last_insert_id": conn.last_insert_rowid(), "rows_affected": conn.changes() }))
}

/// Runs write statements; one result per statement run.
pub fn execute(conn: &Connection, statements: &[Statement], opts: &ExecOptions) -> Vec<Value> {
    // A savepoint, not BEGIN: the same code runs standalone and inside the
    // state machine's own transaction (which also records the log index).
    let mut results = Vec::with_capacity(statements.len());
    if opts.transaction {
        if let Err(e) = conn.execute_batch("SAVEPOINT scaleout_tx") {
            return vec![json!({ "error": e.to_string() })];
        }
    }
    for s in statements {
        let started = Instant::now();
        match execute_one(conn, s) {
            Ok(r) => results.push(with_time(r, started, opts.timings)),
            Err(e) => {
                results.push(json!({ "error": e }));
                if opts.transaction {
                    let _ = conn.execute_batch("ROLLBACK TO scaleout_tx; RELEASE scaleout_tx");
                    return results;
                }
            }
        }
    }
    if opts.transaction {
        if let Err(e) = conn.execute_batch("RELEASE scaleout_tx") {
            let _ = conn.execute_batch("ROLLBACK TO scaleout_tx; RELEASE scaleout_tx");
            results.push(json!({ "error": e.to_string() }));
        }
    }
    results
}

/// Statements a client may not send: transaction control (use the
/// `transaction` parameter; the node owns the transactions) and the node's
/// own bookkeeping tables.
fn refused(sql: &str) -> Option<String> {
    let first = sql
        .trim_start()
        .split(|c: char| c.is_whitespace() || c == ';')
        .next()
        .unwrap_or("");
    const CONTROL: [&str; 6] = ["begin", "commit", "end", "rollback", "savepoint", "release"];
    if CONTROL.iter().any(|k| first.eq_ignore_ascii_case(k)) {
        return Some(format!(
            "{} is not allowed: send the statements with ?transaction instead",
            first.to_uppercase()
        ));
    }
    if sql.to_ascii_lowercase().contains(RESERVED_PREFIX) {
        return Some(format!(
            "names starting with {RESERVED_PREFIX} are reserved"
        ));
    }
    None
}

/// Tables of the node's own, out of clients' reach.
pub const RESERVED_PREFIX: &str = "_scaleout_";

fn json_value(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => json!(i),
        ValueRef::Real(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        ValueRef::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::String(base64(b)),
    }
}

fn query_one(conn: &Connection, s: &Statement, associative: bool) -> Result<Value, String> {
    if let Some(why) = refused(&s.sql) {
        return Err(why);
    }
    let mut stmt = prepare(conn, s)?;
    if !stmt.readonly() {
        return Err("attempt to change database via query operation".into());
    }
    let columns: Vec<String> = stmt.column_names().into_iter().map(String::from).collect();
    let types: Vec<String> = stmt
        .columns()
        .iter()
        .map(|c| c.decl_type().unwrap_or("").to_ascii_lowercase())
        .collect();
    let mut values = Vec::new();
    let mut rows = stmt.raw_query();
    while let Some(row) = rows.next().map_err(|e| e.to_string())? {
        let mut out = Vec::with_capacity(columns.len());
        for i in 0..columns.len() {
            out.push(json_value(row.get_ref(i).map_err(|e| e.to_string())?));
        }
        values.push(out);
    }
    if associative {
        let types: Map<String, Value> = columns
            .iter()
            .cloned()
            .zip(types.into_iter().map(Value::String))
            .collect();
        let rows: Vec<Value> = values
            .into_iter()
            .map(|row| Value::Object(columns.iter().cloned().zip(row).collect()))
            .collect();
        return Ok(json!({ "types": types, "rows": rows }));
    }
    let mut result = json!({ "columns": columns, "types": types });
    if !values.is_empty() {
        result["values"] = json!(values);
    }
    Ok(result)
}

/// Runs read statements; one result per statement.
pub fn query(conn: &Connection, statements: &[Statement], opts: &ExecOptions) -> Vec<Value> {
    statements
        .iter()
        .map(|s| {
            let started = Instant::now();
            match query_one(conn, s, opts.associative) {
                Ok(r) => with_time(r, started, opts.timings),
                Err(e) => json!({ "error": e }),
            }
        })
        .collect()
}

/// RFC 4648 base64, how BLOBs travel in JSON.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::parse_statements;

    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE foo (id INTEGER NOT NULL PRIMARY KEY, name TEXT, age INTEGER)",
        )
        .unwrap();
        c
    }

    fn run_exec(c: &Connection, body: &str, transaction: bool) -> Vec<Value> {
        execute(
            c,
            &parse_statements(body.as_bytes()).unwrap(),
            &ExecOptions {
                transaction,
                ..Default::default()
            },
        )
    }

    fn count(c: &Connection) -> i64 {
        c.query_row("SELECT COUNT(*) FROM foo", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn executes_with_every_parameter_form() {
        let c = db();
        let r = run_exec(
            &c,
            r#"["INSERT INTO foo(name) VALUES('fiona')", ["INSERT INTO foo(name, age) VALUES(?, ?)", "declan", 20], ["INSERT INTO foo(name, age) VALUES(:name, :age)", {"name": "aoife", "age": 30}]]"#,
            false,
        );
        assert_eq!(
            r,
            vec![
                json!({"last_insert_id": 1, "rows_affected": 1}),
                json!({"last_insert_id": 2, "rows_affected": 1}),
                json!({"last_insert_id": 3, "rows_affected": 1}),
            ]
        );
        let q = query(
            &c,
            &parse_statements(br#"["SELECT id, name, age FROM foo WHERE age > 10 ORDER BY id"]"#)
                .unwrap(),
            &ExecOptions::default(),
        );
        assert_eq!(
            q[0],
            json!({"columns": ["id", "name", "age"], "types": ["integer", "text", "integer"], "values": [[2, "declan", 20], [3, "aoife", 30]]})
        );
        let assoc = query(
            &c,
            &parse_statements(br#"[["SELECT name FROM foo WHERE id = ?", 1]]"#).unwrap(),
            &ExecOptions {
                associative: true,
                ..Default::default()
            },
        );
        assert_eq!(
            assoc[0],
            json!({"types": {"name": "text"}, "rows": [{"name": "fiona"}]})
        );
    }

    #[test]
    fn errors_are_per_statement_and_transactions_leave_nothing_behind() {
        let c = db();
        let r = run_exec(
            &c,
            r#"["INSERT INTO foo(name) VALUES('a')", "INSERT INTO nope VALUES(1)", "INSERT INTO foo(name) VALUES('b')"]"#,
            false,
        );
        assert_eq!(r.len(), 3);
        assert!(r[1]["error"]
            .as_str()
            .unwrap()
            .contains("no such table: nope"));
        assert_eq!(count(&c), 2, "without a transaction the others stand");

        let r = run_exec(
            &c,
            r#"["INSERT INTO foo(name) VALUES('c')", "INSERT INTO nope VALUES(1)", "INSERT INTO foo(name) VALUES('d')"]"#,
            true,
        );
        assert_eq!(r.len(), 2, "stops at the first error");
        assert!(r[1]["error"].is_string());
        assert_eq!(
            count(&c),
            2,
            "a failed transaction leaves no partial writes"
        );

        let r = run_exec(&c, r#"[["INSERT INTO foo(name) VALUES(?)", 1, 2]]"#, false);
        assert!(r[0]["error"]
            .as_str()
            .unwrap()
            .contains("takes 1 parameters, 2 given"));
        let r = run_exec(
            &c,
            r#"[["INSERT INTO foo(name) VALUES(:n)", {"x": 1}]]"#,
            false,
        );
        assert!(r[0]["error"]
            .as_str()
            .unwrap()
            .contains("no parameter named \"x\""));
    }

    #[test]
    fn queries_cannot_write_and_report_timings_and_blobs() {
        let c = db();
        let q = query(
            &c,
            &parse_statements(br#"["DELETE FROM foo"]"#).unwrap(),
            &ExecOptions::default(),
        );
        assert_eq!(
            q[0],
            json!({"error": "attempt to change database via query operation"})
        );
        let q = query(
            &c,
            &parse_statements(br#"["SELECT x'00ff10' AS b, 1.5 AS r, NULL AS n"]"#).unwrap(),
            &ExecOptions {
                timings: true,
                ..Default::default()
            },
        );
        assert_eq!(q[0]["values"], json!([["AP8Q", 1.5, null]]));
        assert!(q[0]["time"].as_f64().unwrap() >= 0.0);
        assert_eq!(base64(b"hello"), "aGVsbG8=");
        let empty = query(
            &c,
            &parse_statements(br#"["SELECT * FROM foo"]"#).unwrap(),
            &ExecOptions::default(),
        );
        assert!(
            empty[0].get("values").is_none(),
            "no rows: no values key, as rqlite"
        );
    }
}
