//! SQLite built-ins whose work is quadratic in their arguments, replaced
//! by linear ones with the same results.
//!
//! The budget of VM steps ([`crate::guard`]) cannot see inside one
//! function call: SQLite's `instr(X, Y)` and `replace(X, Y, Z)` compare Y
//! at every position of X, and `trim(X, Y)` compares every character of
//! Y at every position, all in one VM step. With values up to 64 MiB, one
//! such call runs for hours, past every timeout and SIGTERM. The versions
//! here search with `memchr::memmem` (linear) and look characters up in a
//! set. They keep SQLite's semantics exactly: NULL in, NULL out; text
//! positions counted in characters, blob positions in bytes; matches only
//! at character boundaries in text; non-overlapping, left to right.
//! Arguments they would have to convert the way SQLite converts numbers to
//! text go to SQLite's own function on a private connection (small
//! values, so the originals are cheap there). LIKE and GLOB patterns are
//! bounded instead ([`crate::guard::MAX_PATTERN_BYTES`]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use rusqlite::functions::{Context, FunctionFlags};
use rusqlite::types::{FromSql, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use rusqlite::Connection;

use crate::guard::MAX_VALUE_BYTES;

/// A value as SQLite holds it, owned: text as its bytes, valid UTF-8 or
/// not (SQLite never checks; rusqlite's `Value` panics on text that is
/// not, and a client can make such text with `CAST(x'ff' AS TEXT)`:
/// found by review).
#[derive(Debug, Clone, PartialEq)]
pub enum Raw {
    Null,
    Integer(i64),
    Real(f64),
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

impl From<ValueRef<'_>> for Raw {
    fn from(v: ValueRef<'_>) -> Self {
        match v {
            ValueRef::Null => Raw::Null,
            ValueRef::Integer(i) => Raw::Integer(i),
            ValueRef::Real(f) => Raw::Real(f),
            ValueRef::Text(t) => Raw::Text(t.to_vec()),
            ValueRef::Blob(b) => Raw::Blob(b.to_vec()),
        }
    }
}

impl ToSql for Raw {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Raw::Null => ValueRef::Null,
            Raw::Integer(i) => ValueRef::Integer(*i),
            Raw::Real(f) => ValueRef::Real(*f),
            Raw::Text(t) => ValueRef::Text(t),
            Raw::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

impl FromSql for Raw {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        Ok(v.into())
    }
}

/// What a call's work is charged to: the bytes it reads; an error stops
/// it (a read past its deadline).
pub type Charge = Arc<dyn Fn(usize) -> Result<(), String> + Send + Sync>;

/// Bytes one VM step stands for when a call's work is charged to the
/// write budget: a search reads about this many bytes in the time SQLite
/// takes for one step. Each call costs its inputs' bytes, the same on
/// every node, so one step that reads 16 MiB can no longer run a
/// thousand times within a budget meant for a second.
pub const BYTES_PER_STEP: usize = 8;

/// Replaces `instr`, `replace`, `trim`, `ltrim` and `rtrim` on `conn`;
/// each call pays `charge` for the bytes it reads.
pub fn install(conn: &Connection, charge: Charge) -> rusqlite::Result<()> {
    let builtin = Arc::new(Mutex::new(Connection::open_in_memory()?));
    let flags = FunctionFlags::SQLITE_UTF8
        | FunctionFlags::SQLITE_DETERMINISTIC
        | FunctionFlags::SQLITE_INNOCUOUS;
    let original = builtin.clone();
    let pay = charge.clone();
    conn.create_scalar_function("instr", 2, flags, move |ctx: &Context<'_>| {
        pay_for(&pay, ctx)?;
        match (text_or_blob(ctx.get_raw(0)), text_or_blob(ctx.get_raw(1))) {
            (Some(h), Some(n)) => Ok(Raw::Integer(instr(h, n))),
            _ if is_null(ctx, 0) || is_null(ctx, 1) => Ok(Raw::Null),
            _ => call(&original, "instr", &args(ctx)),
        }
    })?;
    let original = builtin.clone();
    let pay = charge.clone();
    conn.create_scalar_function("replace", 3, flags, move |ctx: &Context<'_>| {
        pay_for(&pay, ctx)?;
        let all = (0..3)
            .map(|i| text_of(ctx.get_raw(i)))
            .collect::<Option<Vec<&str>>>();
        match all {
            Some(a) => replace(a[0], a[1], a[2]).map(|s| Raw::Text(s.into_owned().into_bytes())),
            None if (0..3).any(|i| is_null(ctx, i)) => Ok(Raw::Null),
            None => call(&original, "replace", &args(ctx)),
        }
    })?;
    for (name, left, right) in [
        ("trim", true, true),
        ("ltrim", true, false),
        ("rtrim", false, true),
    ] {
        let original = builtin.clone();
        let pay = charge.clone();
        conn.create_scalar_function(name, 2, flags, move |ctx: &Context<'_>| {
            pay_for(&pay, ctx)?;
            match (text_of(ctx.get_raw(0)), text_of(ctx.get_raw(1))) {
                (Some(x), Some(set)) => {
                    trim(x, set, left, right).map(|s| Raw::Text(s.as_bytes().to_vec()))
                }
                _ if is_null(ctx, 0) || is_null(ctx, 1) => Ok(Raw::Null),
                _ => call(&original, name, &args(ctx)),
            }
        })?;
    }
    Ok(())
}

/// Charges a call for the bytes of its arguments.
fn pay_for(charge: &Charge, ctx: &Context<'_>) -> rusqlite::Result<()> {
    let bytes = (0..ctx.len())
        .map(|i| match ctx.get_raw(i) {
            ValueRef::Text(b) | ValueRef::Blob(b) => b.len(),
            _ => 8,
        })
        .sum();
    charge(bytes).map_err(|e| rusqlite::Error::UserFunctionError(e.into()))
}

fn is_null(ctx: &Context<'_>, i: usize) -> bool {
    matches!(ctx.get_raw(i), ValueRef::Null)
}

fn args(ctx: &Context<'_>) -> Vec<Raw> {
    (0..ctx.len()).map(|i| ctx.get_raw(i).into()).collect()
}

/// Text, or a blob (compared by its bytes).
enum Bytes<'a> {
    Text(&'a [u8]),
    Blob(&'a [u8]),
}

fn text_or_blob(v: ValueRef<'_>) -> Option<Bytes<'_>> {
    match v {
        ValueRef::Text(t) => Some(Bytes::Text(t)),
        ValueRef::Blob(b) => Some(Bytes::Blob(b)),
        _ => None,
    }
}

/// A text argument, or a blob that is valid UTF-8 text (as SQLite reads
/// it); anything else goes to the original.
fn text_of(v: ValueRef<'_>) -> Option<&str> {
    match v {
        ValueRef::Text(t) | ValueRef::Blob(t) => std::str::from_utf8(t).ok(),
        _ => None,
    }
}

fn is_continuation(b: u8) -> bool {
    b & 0xc0 == 0x80
}

/// SQLite's `instr`: the 1-based position of the first `needle` in
/// `haystack` (characters for text, bytes when both are blobs), 0 when
/// absent, 1 for an empty needle.
fn instr(haystack: Bytes<'_>, needle: Bytes<'_>) -> i64 {
    let (h, n, text) = match (haystack, needle) {
        (Bytes::Blob(h), Bytes::Blob(n)) => (h, n, false),
        (Bytes::Text(h) | Bytes::Blob(h), Bytes::Text(n) | Bytes::Blob(n)) => (h, n, true),
    };
    if n.is_empty() {
        return 1;
    }
    let found = memchr::memmem::find_iter(h, n)
        .find(|&at| !text || at == h.len() || !is_continuation(h[at]));
    match found {
        None => 0,
        Some(at) if text => 1 + h[..at].iter().filter(|b| !is_continuation(**b)).count() as i64,
        Some(at) => 1 + at as i64,
    }
}

fn too_big() -> rusqlite::Error {
    rusqlite::Error::UserFunctionError(
        format!("string or blob too big: a value may hold at most {MAX_VALUE_BYTES} bytes").into(),
    )
}

/// SQLite's `replace`: every non-overlapping `pattern`, left to right,
/// becomes `with`; an empty pattern leaves `s` as it is.
fn replace<'a>(
    s: &'a str,
    pattern: &str,
    with: &str,
) -> rusqlite::Result<std::borrow::Cow<'a, str>> {
    if pattern.is_empty() {
        return Ok(s.into());
    }
    let mut out = String::with_capacity(s.len());
    let mut from = 0;
    for at in memchr::memmem::find_iter(s.as_bytes(), pattern.as_bytes()) {
        out.push_str(&s[from..at]);
        out.push_str(with);
        from = at + pattern.len();
        if out.len() > MAX_VALUE_BYTES as usize {
            return Err(too_big());
        }
    }
    out.push_str(&s[from..]);
    if out.len() > MAX_VALUE_BYTES as usize {
        return Err(too_big());
    }
    Ok(out.into())
}

/// SQLite's two-argument `trim`/`ltrim`/`rtrim`: characters of `set`
/// removed from the chosen ends of `x`.
fn trim<'a>(x: &'a str, set: &str, left: bool, right: bool) -> rusqlite::Result<&'a str> {
    let chars: HashSet<char> = set.chars().collect();
    let mut out = x;
    if left {
        out = out.trim_start_matches(|c| chars.contains(&c));
    }
    if right {
        out = out.trim_end_matches(|c| chars.contains(&c));
    }
    Ok(out)
}

/// Calls SQLite's own `name` on `args`, on a private connection where
/// nothing replaced it (also used by [`crate::determinism`]).
pub(crate) fn call(builtin: &Mutex<Connection>, name: &str, args: &[Raw]) -> rusqlite::Result<Raw> {
    let conn = builtin
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let marks = (1..=args.len())
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut stmt = conn.prepare_cached(&format!("SELECT {name}({marks})"))?;
    stmt.query_row(rusqlite::params_from_iter(args), |r| r.get::<_, Raw>(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The replacements give what SQLite's originals give, on every kind
    /// of argument.
    #[test]
    fn the_same_results_as_sqlites_own() {
        let ours = Connection::open_in_memory().unwrap();
        install(&ours, Arc::new(|_| Ok(()))).unwrap();
        let theirs = Connection::open_in_memory().unwrap();
        let cases = [
            "instr('hello world', 'o')",
            "instr('héllo wörld', 'ö')",
            "instr('abc', '')",
            "instr('', 'a')",
            "instr(NULL, 'a')",
            "instr('a', NULL)",
            "instr(x'00010203', x'0203')",
            "instr(x'68c3a96c6c6f', 'l')",
            "instr(12345, 34)",
            "instr(1.5, '.')",
            "instr('ééé', x'a9')",
            "replace('hello world', 'o', '0')",
            "replace('aaaa', 'aa', 'b')",
            "replace('abc', '', 'x')",
            "replace('abc', 'b', NULL)",
            "replace(NULL, 'b', 'x')",
            "replace(12.5, '.', ',')",
            "replace('héé', 'é', 'e')",
            "trim('  xx  ')",
            "trim('xxhixx', 'x')",
            "ltrim('xyhixy', 'yx')",
            "rtrim('xyhixy', 'yx')",
            "trim('ééhéé', 'é')",
            "trim(123321, 13)",
            "trim('abc', NULL)",
            "trim('abc', '')",
        ];
        for case in cases {
            let sql = format!("SELECT quote({case})");
            let a: String = ours.query_row(&sql, [], |r| r.get(0)).unwrap();
            let b: String = theirs.query_row(&sql, [], |r| r.get(0)).unwrap();
            assert_eq!(a, b, "{case}");
        }
        // Text that is not UTF-8 (SQLite never checks; rusqlite's `Value`
        // panicked on it, found by review), through each path.
        for case in [
            "instr(CAST(x'ff' AS TEXT), 1)",
            "instr(CAST(x'41ff42' AS TEXT), 'B')",
            "replace(CAST(x'ff' AS TEXT), 1, 2)",
            "replace(CAST(x'ff41' AS TEXT), 'A', 'b')",
            "trim(CAST(x'ff' AS TEXT), 1)",
            "ltrim(CAST(x'ff4141' AS TEXT), CAST(x'ff' AS TEXT))",
        ] {
            let sql = format!("SELECT typeof(x) || ':' || hex(x) FROM (SELECT {case} AS x)");
            let a: String = ours.query_row(&sql, [], |r| r.get(0)).unwrap();
            let b: String = theirs.query_row(&sql, [], |r| r.get(0)).unwrap();
            assert_eq!(a, b, "{case}");
        }
    }

    /// What ran for hours as SQLite's own now takes a moment.
    #[test]
    fn long_arguments_take_linear_time() {
        let c = Connection::open_in_memory().unwrap();
        install(&c, Arc::new(|_| Ok(()))).unwrap();
        let started = std::time::Instant::now();
        let n: i64 = c
            .query_row(
                "SELECT instr(printf('%.*c', 2000000, 'a'), printf('%.*c', 1000000, 'a') || 'b')
                      + length(replace(printf('%.*c', 2000000, 'a'), printf('%.*c', 1000000, 'a') || 'b', 'x'))
                      + length(trim(printf('%.*c', 2000000, 'a'), printf('%.*c', 1000000, 'b') || 'c'))",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 4_000_000);
        // A generous bound on a shared machine: SQLite's own took minutes.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }
}
