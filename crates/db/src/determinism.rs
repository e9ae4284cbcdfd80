//! The same SQL must give the same state on every node. SQLite's
//! non-deterministic functions are made deterministic by the leader before
//! a write enters the log, with the time and randomness of that moment
//! passed in (no I/O, no clock here):
//! - `random()` becomes an integer literal;
//! - `randomblob(N)` with a literal `N` becomes a blob literal;
//! - `'now'` as an argument of `date`, `time`, `datetime`, `julianday`,
//!   `unixepoch`, `strftime` or `timediff` becomes that moment's timestamp;
//! - `CURRENT_TIMESTAMP`, `CURRENT_DATE`, `CURRENT_TIME` become literals.
//!
//! A small lexer keeps string literals, quoted identifiers and comments
//! intact, so `'random()'` in a string stays text. Not covered (as in
//! rqlite): a column `DEFAULT CURRENT_TIMESTAMP` evaluated inside an insert
//! that does not name the column.

/// What the leader fixes for one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moment {
    /// Milliseconds since the Unix epoch.
    pub unix_ms: i64,
    /// Seed of the pseudo-random values.
    pub seed: u64,
}

const TIME_FUNCTIONS: [&str; 7] = [
    "date",
    "time",
    "datetime",
    "julianday",
    "unixepoch",
    "strftime",
    "timediff",
];

/// splitmix64: the k-th random value of a seed.
fn random_value(seed: u64, k: u64) -> u64 {
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

#[derive(Debug, PartialEq)]
enum Token<'a> {
    /// Anything kept as it is: whitespace, punctuation, numbers, quoted
    /// identifiers, comments.
    Other(&'a str),
    Word(&'a str),
    Str(&'a str),
}

fn lex(sql: &str) -> Vec<Token<'_>> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        let b = bytes[i];
        let quoted = |close: u8, i: &mut usize| {
            *i += 1;
            while *i < bytes.len() {
                if bytes[*i] == close {
                    if close != b']' && bytes.get(*i + 1) == Some(&close) {
                        *i += 2;
                        continue;
                    }
                    *i += 1;
                    return;
                }
                *i += 1;
            }
        };
        match b {
            b'\'' => {
                quoted(b'\'', &mut i);
                out.push(Token::Str(&sql[start..i]));
            }
            b'"' | b'`' => {
                quoted(b, &mut i);
                out.push(Token::Other(&sql[start..i]));
            }
            b'[' => {
                quoted(b']', &mut i);
                out.push(Token::Other(&sql[start..i]));
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                out.push(Token::Other(&sql[start..i]));
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i = (i + 2).min(bytes.len());
                out.push(Token::Other(&sql[start..i]));
            }
            b if b.is_ascii_alphabetic() || b == b'_' => {
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b'$')
                {
                    i += 1;
                }
                out.push(Token::Word(&sql[start..i]));
            }
            b if b.is_ascii_digit() => {
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'.') {
                    i += 1;
                }
                out.push(Token::Other(&sql[start..i]));
            }
            _ => {
                // One character (a whole UTF-8 sequence).
                i += sql[i..].chars().next().map_or(1, char::len_utf8);
                out.push(Token::Other(&sql[start..i]));
            }
        }
    }
    out
}

fn is_space(t: &Token<'_>) -> bool {
    matches!(t, Token::Other(s) if s.trim().is_empty() || s.starts_with("--") || s.starts_with("/*"))
}

/// The statement with its non-deterministic parts fixed to `moment`.
pub fn rewrite(sql: &str, moment: Moment) -> String {
    let tokens = lex(sql);
    let now = timestamp(moment.unix_ms);
    let mut out = String::with_capacity(sql.len() + 32);
    let mut k = 0u64;
    // Paren depth at which each open call to a time function sits.
    let mut depth = 0usize;
    let mut time_call_depths: Vec<usize> = Vec::new();
    let next_open = |from: usize| {
        (from..tokens.len())
            .find(|j| !is_space(&tokens[*j]))
            .filter(|j| tokens[*j] == Token::Other("("))
    };
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Word(w) if w.eq_ignore_ascii_case("random") => {
                if let Some(open) = next_open(i + 1) {
                    if let Some(close) = (open + 1..tokens.len())
                        .find(|j| !is_space(&tokens[*j]))
                        .filter(|j| tokens[*j] == Token::Other(")"))
                    {
                        out.push_str(&(random_value(moment.seed, k) as i64).to_string());
                        k += 1;
                        i = close + 1;
                        continue;
                    }
                }
                out.push_str(w);
            }
            Token::Word(w) if w.eq_ignore_ascii_case("randomblob") => {
                // randomblob(<integer literal>) only; anything else is kept.
                let parts: Vec<usize> = (i + 1..tokens.len())
                    .filter(|j| !is_space(&tokens[*j]))
                    .take(3)
                    .collect();
                let n = parts.get(1).and_then(|j| match &tokens[*j] {
                    Token::Other(d) => d.parse::<usize>().ok(),
                    _ => None,
                });
                let literal_arg = parts.len() == 3
                    && tokens[parts[0]] == Token::Other("(")
                    && tokens[parts[2]] == Token::Other(")");
                match (n, literal_arg) {
                    (Some(n), true) if n <= 1024 * 1024 => {
                        out.push_str("X'");
                        for b in 0..n.max(1) {
                            out.push_str(&format!(
                                "{:02X}",
                                random_value(moment.seed, k + b as u64) as u8
                            ));
                        }
                        out.push('\'');
                        k += n as u64;
                        i = parts[2] + 1;
                        continue;
                    }
                    _ => out.push_str(w),
                }
            }
            Token::Word(w) if w.eq_ignore_ascii_case("current_timestamp") => {
                out.push_str(&format!("'{}'", &now[..19]))
            }
            Token::Word(w) if w.eq_ignore_ascii_case("current_date") => {
                out.push_str(&format!("'{}'", &now[..10]))
            }
            Token::Word(w) if w.eq_ignore_ascii_case("current_time") => {
                out.push_str(&format!("'{}'", &now[11..19]))
            }
            Token::Word(w)
                if TIME_FUNCTIONS.iter().any(|f| w.eq_ignore_ascii_case(f))
                    && next_open(i + 1).is_some() =>
            {
                time_call_depths.push(depth + 1);
                out.push_str(w);
            }
            Token::Other("(") => {
                depth += 1;
                out.push('(');
            }
            Token::Other(")") => {
                if time_call_depths.last() == Some(&depth) {
                    time_call_depths.pop();
                }
                depth = depth.saturating_sub(1);
                out.push(')');
            }
            Token::Str(s)
                if time_call_depths.last() == Some(&depth) && s.eq_ignore_ascii_case("'now'") =>
            {
                out.push('\'');
                out.push_str(&now);
                out.push('\'');
            }
            Token::Str(s) | Token::Other(s) | Token::Word(s) => out.push_str(s),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn random_and_time_are_fixed_but_text_is_not_touched() {
        let sql = "INSERT INTO t VALUES (random(), RANDOM ( ), datetime('now'), strftime('%s', 'NOW'), 'now', 'random()', CURRENT_TIMESTAMP, date('now', '-1 day'), randomblob(4), randomblob(16)) -- random()";
        let out = rewrite(sql, M);
        assert_eq!(
            out.to_lowercase().matches("random").count(),
            2,
            "only the string and the comment keep it: {out}"
        );
        let first = out
            .trim_start_matches("INSERT INTO t VALUES (")
            .split(',')
            .next()
            .unwrap();
        assert!(
            first.parse::<i64>().is_ok(),
            "random() became an integer: {out}"
        );
        assert!(out.contains("datetime('2025-11-25 14:06:00.123')"), "{out}");
        assert!(
            out.contains("strftime('%s', '2025-11-25 14:06:00.123')"),
            "{out}"
        );
        assert!(
            out.contains(", 'now',"),
            "a plain 'now' string stays: {out}"
        );
        assert!(out.contains("'random()'"), "text stays: {out}");
        assert!(out.contains("'2025-11-25 14:06:00'"), "{out}");
        assert!(
            out.contains("date('2025-11-25 14:06:00.123', '-1 day')"),
            "{out}"
        );
        assert_eq!(out.matches("X'").count(), 2, "both blobs fixed: {out}");
        assert!(!out.contains("randomblob"), "{out}");
        assert!(out.ends_with("-- random()"), "comments stay: {out}");
        assert_eq!(rewrite(sql, M), out, "the same moment gives the same SQL");
        assert_ne!(
            rewrite(sql, Moment { seed: 43, ..M }),
            out,
            "another seed, other values"
        );
    }

    #[test]
    fn rewritten_sql_runs_identically_on_two_databases() {
        let sql = "CREATE TABLE t (a, b, c, d); INSERT INTO t VALUES (random(), datetime('now'), randomblob(8), CURRENT_DATE)";
        let dump = |s: &str| {
            let c = rusqlite::Connection::open_in_memory().unwrap();
            c.execute_batch(s).unwrap();
            c.query_row(
                "SELECT quote(a) || quote(b) || quote(c) || quote(d) FROM t",
                [],
                |r| r.get::<_, String>(0),
            )
            .unwrap()
        };
        let fixed = rewrite(sql, M);
        assert_eq!(dump(&fixed), dump(&fixed));
        assert_ne!(dump(sql), dump(sql), "unrewritten, two nodes would differ");
    }
}
