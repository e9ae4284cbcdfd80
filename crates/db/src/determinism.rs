//! Determinism by construction: the same entry gives the same state on
//! every node, whatever SQL it carries.
//!
//! The leader fixes a [`Moment`] for each write (the time and a random
//! seed) and it travels in the log entry. Every node applies the entry on
//! a connection whose non-deterministic functions are replaced, by name,
//! with versions that read the moment instead of the clock or the OS's
//! randomness ([`FixedFunctions`]): `random()`, `randomblob(N)`, and
//! `date`, `time`, `datetime`, `julianday`, `unixepoch`, `strftime`,
//! `timediff` and `CURRENT_*` with `'now'` (or no time at all). SQLite
//! looks functions up by name when it compiles a statement, so the
//! replacements hold wherever a function is called from: a statement, a
//! trigger, a view, a column's `DEFAULT`, an expression built from
//! parameters (`julianday('no'||'w')`, `strftime(?, ?)` with `"now"`).
//! No SQL text is rewritten. `'localtime'` and `'utc'` are refused in
//! writes (they depend on the node's time zone). `changes()` and
//! `last_insert_rowid()` are reset before each write
//! ([`crate::engine`]), so they describe only the request's own
//! statements; the functions whose value depends on the node itself are
//! refused ([`crate::guard::NODE_FUNCTIONS`]).

use std::sync::{Arc, Mutex};

use rusqlite::functions::{Context, FunctionFlags};
use rusqlite::types::ValueRef;

use crate::bounded::Raw;
use rusqlite::Connection;

/// What the leader fixes for one write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Moment {
    /// Milliseconds since the Unix epoch.
    pub unix_ms: i64,
    /// Seed of the pseudo-random values.
    pub seed: u64,
}

/// The functions of SQLite whose value this module fixes per write.
pub const FIXED_FUNCTIONS: [&str; 14] = [
    "random",
    "randomblob",
    "date",
    "time",
    "datetime",
    "julianday",
    "unixepoch",
    "strftime",
    "timediff",
    "current_date",
    "current_time",
    "current_timestamp",
    "changes",
    "last_insert_rowid",
];

/// Date and time functions, and which argument holds the time value
/// (`None`: every argument does, as in `timediff(a, b)`).
const TIME_FUNCTIONS: [(&str, Option<usize>); 7] = [
    ("date", Some(0)),
    ("time", Some(0)),
    ("datetime", Some(0)),
    ("julianday", Some(0)),
    ("unixepoch", Some(0)),
    ("strftime", Some(1)),
    ("timediff", None),
];

/// splitmix64: the k-th random value of a seed.
pub fn random_value(seed: u64, k: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(k + 1));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `YYYY-MM-DD HH:MM:SS.SSS` in UTC (SQLite's own format).
pub fn timestamp(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{ms:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The moment of the write being applied, and how many random values it
/// has drawn.
#[derive(Debug, Default)]
struct Draws {
    moment: Moment,
    drawn: u64,
}

/// The replaced functions of one apply connection.
#[derive(Clone)]
pub struct FixedFunctions {
    draws: Arc<Mutex<Draws>>,
}

fn lock(draws: &Mutex<Draws>) -> std::sync::MutexGuard<'_, Draws> {
    draws
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn owned(v: ValueRef<'_>) -> Raw {
    v.into()
}

/// SQLite's text form of a value, for comparing arguments as SQLite does.
fn text_of(v: &Raw) -> Option<&[u8]> {
    match v {
        Raw::Text(t) | Raw::Blob(t) => Some(t),
        _ => None,
    }
}

/// A time value that makes SQLite read the clock: `'now'`, and
/// `'subsec'`/`'subsecond'` (now, to the millisecond), compared as
/// SQLite compares them (whole, any case).
fn reads_the_clock(v: &Raw) -> Option<Clock> {
    let t = text_of(v)?;
    if t.eq_ignore_ascii_case(b"now") {
        Some(Clock::Now)
    } else if t.eq_ignore_ascii_case(b"subsec") || t.eq_ignore_ascii_case(b"subsecond") {
        Some(Clock::Subsec)
    } else {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    Now,
    Subsec,
}

fn depends_on_time_zone(v: &Raw) -> bool {
    text_of(v).is_some_and(|t| {
        let t = t.trim_ascii();
        t.eq_ignore_ascii_case(b"localtime") || t.eq_ignore_ascii_case(b"utc")
    })
}

fn refuse(msg: String) -> rusqlite::Error {
    rusqlite::Error::UserFunctionError(msg.into())
}

/// `sqlite3_value_int64`'s reading of a value: numbers as they are, text
/// by its leading integer, anything else 0.
fn as_integer(v: ValueRef<'_>) -> i64 {
    match v {
        ValueRef::Integer(i) => i,
        ValueRef::Real(f) => f as i64,
        ValueRef::Text(t) | ValueRef::Blob(t) => {
            let t = String::from_utf8_lossy(t);
            let t = t.trim_start();
            let end = t
                .char_indices()
                .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && (c == '-' || c == '+'))))
                .map_or(t.len(), |(i, _)| i);
            t[..end].parse().unwrap_or(0)
        }
        ValueRef::Null => 0,
    }
}

impl FixedFunctions {
    /// Replaces the non-deterministic functions on `conn` (the apply
    /// connection).
    pub fn install(conn: &Connection) -> rusqlite::Result<FixedFunctions> {
        let fixed = FixedFunctions {
            draws: Arc::new(Mutex::new(Draws::default())),
        };
        // The originals, for the date and time functions to call once the
        // moment is in place: a private connection nothing replaced.
        let builtin = Arc::new(Mutex::new(Connection::open_in_memory()?));
        let volatile = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_INNOCUOUS;
        let draws = fixed.draws.clone();
        conn.create_scalar_function("random", 0, volatile, move |_| {
            let mut d = lock(&draws);
            let v = random_value(d.moment.seed, d.drawn) as i64;
            d.drawn += 1;
            Ok(v)
        })?;
        let draws = fixed.draws.clone();
        conn.create_scalar_function("randomblob", 1, volatile, move |ctx: &Context<'_>| {
            let n = as_integer(ctx.get_raw(0)).max(1);
            if n > i64::from(crate::guard::MAX_VALUE_BYTES) {
                return Err(refuse(format!(
                    "randomblob({n}): larger than the {} bytes a value may have",
                    crate::guard::MAX_VALUE_BYTES
                )));
            }
            let mut d = lock(&draws);
            let mut out = Vec::with_capacity(n as usize);
            while out.len() < n as usize {
                out.extend_from_slice(&random_value(d.moment.seed, d.drawn).to_le_bytes());
                d.drawn += 1;
            }
            out.truncate(n as usize);
            Ok(out)
        })?;
        // Not SQLITE_DETERMINISTIC: SQLite's own date functions may stand in
        // an index, a generated column or a CHECK, and fail there at run
        // time when they read the clock; these cannot tell where they run,
        // so SQLite keeps them out of those places altogether (an index on
        // `julianday('now')` would hold keys no later entry could find
        // again: every node would stop on a corrupt index).
        let constant = volatile;
        for (name, time_at) in TIME_FUNCTIONS {
            let (draws, builtin) = (fixed.draws.clone(), builtin.clone());
            conn.create_scalar_function(name, -1, constant, move |ctx: &Context<'_>| {
                let now = timestamp(lock(&draws).moment.unix_ms);
                let mut args: Vec<Raw> = (0..ctx.len()).map(|i| owned(ctx.get_raw(i))).collect();
                let modifiers_from = time_at.map_or(args.len(), |t| t + 1);
                if args.iter().skip(modifiers_from).any(depends_on_time_zone) {
                    return Err(refuse(format!(
                        "{name}() with 'localtime' or 'utc' is not allowed in a write: it depends on the node's time zone; store UTC and convert when reading"
                    )));
                }
                let mut subsec = false;
                for (i, arg) in args.iter_mut().enumerate() {
                    if time_at.is_none_or(|t| t == i) {
                        if let Some(clock) = reads_the_clock(arg) {
                            subsec |= clock == Clock::Subsec;
                            *arg = Raw::Text(now.clone().into_bytes());
                        }
                    }
                }
                // 'subsec' as the time value also asks for milliseconds in
                // the answer, as the modifier of that name does.
                if subsec && time_at.is_some() {
                    args.push(Raw::Text(b"subsec".to_vec()));
                }
                // No time value at all means now: date(), strftime('%s').
                if time_at == Some(args.len()) {
                    args.push(Raw::Text(now.into_bytes()));
                }
                crate::bounded::call(&builtin, name, &args)
            })?;
        }
        for (name, original) in [
            ("current_timestamp", "datetime"),
            ("current_date", "date"),
            ("current_time", "time"),
        ] {
            let (draws, builtin) = (fixed.draws.clone(), builtin.clone());
            conn.create_scalar_function(name, 0, constant, move |_| {
                let now = timestamp(lock(&draws).moment.unix_ms);
                crate::bounded::call(&builtin, original, &[Raw::Text(now.into_bytes())])
            })?;
        }
        for (name, args) in crate::guard::NODE_FUNCTIONS {
            conn.create_scalar_function(name, args, volatile, move |_| -> rusqlite::Result<i64> {
                Err(refuse(crate::guard::node_function_error(name)))
            })?;
        }
        Ok(fixed)
    }

    /// The write being applied from now on was fixed at `moment`.
    pub fn start(&self, moment: Moment) {
        let mut d = lock(&self.draws);
        d.moment = moment;
        d.drawn = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::types::Value;

    const M: Moment = Moment {
        unix_ms: 1_764_079_560_123,
        seed: 42,
    };

    #[test]
    fn timestamps_are_sqlite_format() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00.000");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29 00:00:00.000");
        assert_eq!(timestamp(M.unix_ms), "2025-11-25 14:06:00.123");
    }

    fn fixed_at(moment: Moment) -> Connection {
        let c = Connection::open_in_memory().unwrap();
        FixedFunctions::install(&c).unwrap().start(moment);
        c
    }

    fn one(c: &Connection, sql: &str) -> rusqlite::Result<Value> {
        c.query_row(sql, [], |r| r.get(0))
    }

    /// Text that is not UTF-8 (SQLite never checks) gets what SQLite's
    /// own functions give, on every path of the replacements, with no
    /// panic (rusqlite's `Value` panicked on it: found by review).
    #[test]
    fn text_that_is_not_utf8_gets_sqlites_own_answer() {
        let theirs = Connection::open_in_memory().unwrap();
        let c = fixed_at(M);
        for case in [
            "datetime(CAST(x'ff' AS TEXT))",
            "date('2000-01-01', CAST(x'c3' AS TEXT))",
            "strftime(CAST(x'ff25' AS TEXT), '2000-01-01')",
            "julianday(CAST(x'ff' AS TEXT))",
        ] {
            let sql = format!("SELECT typeof(x) || ':' || hex(x) FROM (SELECT {case} AS x)");
            let ours: Option<String> = c.query_row(&sql, [], |r| r.get(0)).unwrap();
            let own: Option<String> = theirs.query_row(&sql, [], |r| r.get(0)).unwrap();
            assert_eq!(ours, own, "{case}");
        }
    }

    /// Every spelling the text rewriter of old missed: evaluated values,
    /// not text, decide.
    #[test]
    fn every_spelling_of_now_and_randomness_is_fixed() {
        let sqls = [
            "SELECT random()",
            "SELECT hex(randomblob(length('abcdefgh')))",
            "SELECT strftime('%Y-%m-%d %H:%M:%f', \"now\")",
            "SELECT strftime('%Y-%m-%d %H:%M:%f', 'no' || 'w')",
            "SELECT strftime('%Y-%m-%d %H:%M:%f')",
            "SELECT julianday('no'||'w')",
            "SELECT date()",
            "SELECT unixepoch('NOW', 'subsec')",
            "SELECT CURRENT_TIMESTAMP",
            "SELECT current_date || ' ' || Current_Time",
            "SELECT timediff('now', '2000-01-01')",
        ];
        for sql in sqls {
            let a = one(&fixed_at(M), sql).unwrap();
            let b = one(&fixed_at(M), sql).unwrap();
            assert_eq!(a, b, "{sql}: two nodes agree");
            let other = one(
                &fixed_at(Moment {
                    unix_ms: M.unix_ms + 86_400_000,
                    seed: 7,
                }),
                sql,
            )
            .unwrap();
            assert_ne!(a, other, "{sql}: and it is the moment that decides");
        }
        let c = fixed_at(M);
        assert_eq!(
            one(&c, "SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')").unwrap(),
            Value::Text("2025-11-25 14:06:00.123".into())
        );
        let p: Value = c
            .query_row("SELECT datetime(?1)", ["now"], |r| r.get(0))
            .unwrap();
        assert_eq!(
            p,
            Value::Text("2025-11-25 14:06:00".into()),
            "a parameter too"
        );
        assert_eq!(
            one(&c, "SELECT date('2020-02-29', '+1 year')").unwrap(),
            Value::Text("2021-03-01".into()),
            "other dates are SQLite's own arithmetic"
        );
        assert_eq!(
            one(&c, "SELECT strftime('now', '2020-01-01')").unwrap(),
            Value::Text("now".into()),
            "a format is not a time"
        );
    }

    #[test]
    fn defaults_and_triggers_use_the_fixed_functions() {
        let run = || {
            let c = fixed_at(M);
            c.execute_batch(
                "CREATE TABLE t (x, at DEFAULT CURRENT_TIMESTAMP, r DEFAULT (random()));
                 CREATE TABLE log (what, at);
                 CREATE TRIGGER tr AFTER INSERT ON t BEGIN INSERT INTO log VALUES (randomblob(4), julianday()); END;
                 INSERT INTO t (x) VALUES (1);",
            )
            .unwrap();
            one(
                &c,
                "SELECT quote(at) || quote(r) || (SELECT quote(what) || quote(at) FROM log) FROM t",
            )
            .unwrap()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn the_time_zone_and_node_functions_are_refused() {
        let c = fixed_at(M);
        for sql in [
            "SELECT datetime('now', 'localtime')",
            "SELECT date('2020-01-01', ' UTC ')",
            "SELECT total_changes()",
            "SELECT sqlite_version()",
        ] {
            assert!(one(&c, sql).is_err(), "{sql}");
        }
        assert!(one(&c, "SELECT length(randomblob(1e12))").is_err());
        assert_eq!(
            one(&c, "SELECT length(randomblob(-5))").unwrap(),
            Value::Integer(1)
        );
    }
}
