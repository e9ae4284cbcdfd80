//! How SQLite's values become the data API's JSON, as rqlite writes them.
//!
//! rqlite reads rows through Go's SQLite driver, and its clients depend
//! on what that driver does with declared types:
//! - a column declared `DATE`, `DATETIME` or `TIMESTAMP` comes back as an
//!   RFC 3339 time: text in one of SQLite's timestamp layouts is
//!   reformatted (`2004-02-14 07:15:00` → `2004-02-14T07:15:00Z`), an
//!   integer is Unix seconds (milliseconds beyond ±10¹²), and text that
//!   is no time at all is the zero time, `0001-01-01T00:00:00Z`;
//! - a column declared `BOOLEAN` holding an integer comes back as
//!   `true`/`false`;
//! - a column with no declared type (an expression, `COUNT(*)`) takes
//!   its type name from the first row's value: `integer`, `real`, `text`,
//!   `blob`, or `""` for NULL.
//!
//! Pure functions of the value and the declared type, unit-tested below.

use rusqlite::types::ValueRef;
use serde_json::{json, Value};

/// What a declared type asks of a column's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decl {
    Time,
    Boolean,
    Other,
}

impl Decl {
    /// rqlite compares the lowercased declared type as a whole.
    pub fn of(declared: &str) -> Decl {
        match declared {
            "date" | "datetime" | "timestamp" => Decl::Time,
            "boolean" => Decl::Boolean,
            _ => Decl::Other,
        }
    }
}

/// The type name of a value, for a column that declares none.
pub fn type_of(v: ValueRef<'_>) -> &'static str {
    match v {
        ValueRef::Null => "",
        ValueRef::Integer(_) => "integer",
        ValueRef::Real(_) => "real",
        ValueRef::Text(_) => "text",
        ValueRef::Blob(_) => "blob",
    }
}

/// One value as JSON, given its column's declared type.
pub fn to_json(v: ValueRef<'_>, decl: Decl) -> Value {
    match (v, decl) {
        (ValueRef::Null, _) => Value::Null,
        (ValueRef::Integer(i), Decl::Time) => {
            Value::String(unix_time(i).unwrap_or_else(|| ZERO_TIME.into()))
        }
        (ValueRef::Integer(i), Decl::Boolean) => Value::Bool(i > 0),
        (ValueRef::Integer(i), _) => json!(i),
        (ValueRef::Real(f), _) => {
            serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
        }
        (ValueRef::Text(t), Decl::Time) => Value::String(
            std::str::from_utf8(t)
                .ok()
                .and_then(sqlite_time)
                .unwrap_or_else(|| ZERO_TIME.into()),
        ),
        (ValueRef::Text(t), _) => Value::String(String::from_utf8_lossy(t).into_owned()),
        (ValueRef::Blob(b), _) => Value::String(base64(b)),
    }
}

/// What Go's zero time prints as.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// A civil date and time with an offset from UTC in minutes, as parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    nanos: u32,
    offset_minutes: i32,
}

impl Civil {
    /// RFC 3339 with the fraction's trailing zeros dropped (Go's
    /// `RFC3339Nano`), `Z` for UTC.
    fn rfc3339(&self) -> String {
        let mut out = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        );
        if self.nanos > 0 {
            let fraction = format!("{:09}", self.nanos);
            out.push('.');
            out.push_str(fraction.trim_end_matches('0'));
        }
        if self.offset_minutes == 0 {
            out.push('Z');
        } else {
            let sign = if self.offset_minutes < 0 { '-' } else { '+' };
            let m = self.offset_minutes.unsigned_abs();
            out.push_str(&format!("{sign}{:02}:{:02}", m / 60, m % 60));
        }
        out
    }
}

/// Unix seconds (milliseconds beyond ±10¹², as the Go driver guesses)
/// as RFC 3339 in UTC; `None` outside years 0–9999.
fn unix_time(value: i64) -> Option<String> {
    let (secs, nanos) = if !(-1_000_000_000_000..=1_000_000_000_000).contains(&value) {
        (
            value.div_euclid(1000),
            (value.rem_euclid(1000) * 1_000_000) as u32,
        )
    } else {
        (value, 0)
    };
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    if !(0..=9999).contains(&year) {
        return None;
    }
    Some(
        Civil {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem % 3600 / 60) as u32,
            second: (rem % 60) as u32,
            nanos,
            offset_minutes: 0,
        }
        .rfc3339(),
    )
}

/// Days since 1970-01-01 → (year, month, day) (Howard Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Text in one of the layouts the Go driver tries, in its order
/// (`YYYY-MM-DD[( |T)HH:MM[:SS[.fraction]][±HH:MM]]`, a trailing `Z`
/// dropped first), as RFC 3339.
fn sqlite_time(text: &str) -> Option<String> {
    let text = text.strip_suffix('Z').unwrap_or(text);
    let b = text.as_bytes();
    let num = |from: usize, len: usize| -> Option<u32> {
        let s = b.get(from..from + len)?;
        s.iter()
            .all(u8::is_ascii_digit)
            .then(|| s.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
    };
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    let year = i64::from(num(0, 4)?);
    if !(at(4, b'-') && at(7, b'-')) {
        return None;
    }
    let (month, day) = (num(5, 2)?, num(8, 2)?);
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let mut civil = Civil {
        year,
        month,
        day,
        hour: 0,
        minute: 0,
        second: 0,
        nanos: 0,
        offset_minutes: 0,
    };
    if b.len() == 10 {
        return Some(civil.rfc3339());
    }
    if !(at(10, b' ') || at(10, b'T')) || !at(13, b':') {
        return None;
    }
    civil.hour = num(11, 2)?;
    civil.minute = num(14, 2)?;
    let mut i = 16;
    if at(16, b':') {
        civil.second = num(17, 2)?;
        i = 19;
        if at(19, b'.') {
            let digits = b[20..].iter().take_while(|c| c.is_ascii_digit()).count();
            if digits == 0 || digits > 9 {
                return None;
            }
            civil.nanos = num(20, digits)? * 10u32.pow(9 - digits as u32);
            i = 20 + digits;
        }
        if i < b.len() {
            // Only the layouts with seconds take an offset.
            let sign = match b[i] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if b.len() != i + 6 || !at(i + 3, b':') {
                return None;
            }
            let (h, m) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if h > 23 || m > 59 {
                return None;
            }
            civil.offset_minutes = sign * (h * 60 + m) as i32;
            i = b.len();
        }
    }
    if i != b.len() || civil.hour > 23 || civil.minute > 59 || civil.second > 59 {
        return None;
    }
    Some(civil.rfc3339())
}

/// RFC 4648 base64, how BLOBs travel in JSON.
pub fn base64(bytes: &[u8]) -> String {
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

    fn time(v: ValueRef<'_>) -> Value {
        to_json(v, Decl::Time)
    }

    #[test]
    fn timestamps_in_sqlite_layouts_become_rfc3339() {
        for (text, want) in [
            ("2004-02-14 07:15:00", "2004-02-14T07:15:00Z"),
            ("2004-02-14T07:15:00Z", "2004-02-14T07:15:00Z"),
            ("2004-02-14 07:15:00.120", "2004-02-14T07:15:00.12Z"),
            ("2004-02-14 07:15:00.000", "2004-02-14T07:15:00Z"),
            (
                "2004-02-14 07:15:00.123456789",
                "2004-02-14T07:15:00.123456789Z",
            ),
            ("2004-02-14 07:15:00-07:00", "2004-02-14T07:15:00-07:00"),
            ("2004-02-14T07:15:00.5+05:30", "2004-02-14T07:15:00.5+05:30"),
            ("2004-02-14 07:15:00+00:00", "2004-02-14T07:15:00Z"),
            ("2004-02-14 07:15", "2004-02-14T07:15:00Z"),
            ("2004-02-14", "2004-02-14T00:00:00Z"),
            ("2024-02-29", "2024-02-29T00:00:00Z"),
        ] {
            assert_eq!(time(ValueRef::Text(text.as_bytes())), json!(want), "{text}");
        }
    }

    #[test]
    fn text_that_is_no_time_is_the_zero_time() {
        for text in [
            "now",
            "",
            "2004-02-30",
            "2023-02-29",
            "2004-13-01",
            "2004-02-14 25:00:00",
            "2004-02-14 07:15:00.",
            "2004-02-14 07:15:00.1234567890",
            "2004-02-14 07:15+01:00",
            "2004-02-14 07:15:00 trailing",
            "2004/02/14",
            "٢٠٠٤-02-14",
        ] {
            assert_eq!(
                time(ValueRef::Text(text.as_bytes())),
                json!(ZERO_TIME),
                "{text:?}"
            );
        }
        assert_eq!(time(ValueRef::Text(b"\xff\xfe")), json!(ZERO_TIME));
    }

    #[test]
    fn integers_are_unix_seconds_or_milliseconds() {
        assert_eq!(time(ValueRef::Integer(0)), json!("1970-01-01T00:00:00Z"));
        assert_eq!(
            time(ValueRef::Integer(1_076_742_900)),
            json!("2004-02-14T07:15:00Z")
        );
        assert_eq!(
            time(ValueRef::Integer(1_076_742_900_250)),
            json!("2004-02-14T07:15:00.25Z")
        );
        assert_eq!(time(ValueRef::Integer(-1)), json!("1969-12-31T23:59:59Z"));
        assert_eq!(time(ValueRef::Integer(i64::MAX)), json!(ZERO_TIME));
        assert_eq!(time(ValueRef::Integer(i64::MIN)), json!(ZERO_TIME));
        // Reals and NULL are left as they are.
        assert_eq!(time(ValueRef::Real(1.5)), json!(1.5));
        assert_eq!(time(ValueRef::Null), Value::Null);
    }

    #[test]
    fn booleans_and_undeclared_types() {
        assert_eq!(to_json(ValueRef::Integer(1), Decl::Boolean), json!(true));
        assert_eq!(to_json(ValueRef::Integer(0), Decl::Boolean), json!(false));
        assert_eq!(to_json(ValueRef::Text(b"yes"), Decl::Boolean), json!("yes"));
        assert_eq!(Decl::of("boolean"), Decl::Boolean);
        assert_eq!(Decl::of("datetime"), Decl::Time);
        assert_eq!(Decl::of("datetime(6)"), Decl::Other);
        assert_eq!(type_of(ValueRef::Integer(1)), "integer");
        assert_eq!(type_of(ValueRef::Real(1.0)), "real");
        assert_eq!(type_of(ValueRef::Text(b"")), "text");
        assert_eq!(type_of(ValueRef::Blob(b"")), "blob");
        assert_eq!(type_of(ValueRef::Null), "");
        assert_eq!(to_json(ValueRef::Blob(b"hi!"), Decl::Other), json!("aGkh"));
    }
}
