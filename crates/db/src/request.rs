//! rqlite's request bodies: a JSON array of statements, each a plain SQL
//! string, or an array of the SQL and its parameters — positional values,
//! or one object of named values. Anything else is a [`RequestError`]
//! (answered 400 by the API), never a panic.

use serde_json::Value;

/// A parameter value, as SQLite stores it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Param {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Params {
    None,
    Positional(Vec<Param>),
    /// Names without their `:`/`@`/`$` prefix.
    Named(Vec<(String, Param)>),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Statement {
    pub sql: String,
    pub params: Params,
}

impl Statement {
    pub fn plain(sql: impl Into<String>) -> Self {
        Statement {
            sql: sql.into(),
            params: Params::None,
        }
    }
}

/// Why a request body is not a list of statements.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RequestError(pub String);

fn param(v: &Value, at: usize) -> Result<Param, RequestError> {
    Ok(match v {
        Value::Null => Param::Null,
        Value::Bool(b) => Param::Integer(i64::from(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Param::Integer(i),
            None => Param::Real(n.as_f64().ok_or_else(|| {
                RequestError(format!("statement {at}: number {n} is out of range"))
            })?),
        },
        Value::String(s) => Param::Text(s.clone()),
        Value::Array(_) | Value::Object(_) => {
            return Err(RequestError(format!(
                "statement {at}: a parameter must be null, a boolean, a number or a string"
            )))
        }
    })
}

/// Parses a request body: `["sql", ["sql", 1, "x"], ["sql", {"a": 1}]]`.
pub fn parse_statements(body: &[u8]) -> Result<Vec<Statement>, RequestError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| RequestError(format!("invalid JSON: {e}")))?;
    let Value::Array(items) = value else {
        return Err(RequestError(
            "the body must be a JSON array of statements".into(),
        ));
    };
    if items.is_empty() {
        return Err(RequestError("empty statement list".into()));
    }
    items
        .iter()
        .enumerate()
        .map(|(at, item)| match item {
            Value::String(sql) => Ok(Statement::plain(sql.clone())),
            Value::Array(parts) => {
                let Some(Value::String(sql)) = parts.first() else {
                    return Err(RequestError(format!("statement {at}: the first element must be the SQL string")));
                };
                let rest = &parts[1..];
                let params = match rest {
                    [] => Params::None,
                    [Value::Object(named)] => Params::Named(
                        named
                            .iter()
                            .map(|(k, v)| Ok((k.trim_start_matches([':', '@', '$']).to_string(), param(v, at)?)))
                            .collect::<Result<_, RequestError>>()?,
                    ),
                    _ if rest.iter().any(Value::is_object) => {
                        return Err(RequestError(format!(
                            "statement {at}: mixed parameter forms: give positional values or one object of named values"
                        )))
                    }
                    _ => Params::Positional(rest.iter().map(|v| param(v, at)).collect::<Result<_, _>>()?),
                };
                Ok(Statement { sql: sql.clone(), params })
            }
            _ => Err(RequestError(format!("statement {at}: must be a SQL string or an array [\"sql\", params...]"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_three_forms_parse() {
        let got = parse_statements(br#"["SELECT 1", ["INSERT INTO t VALUES(?, ?)", 1, "x"], ["INSERT INTO t VALUES(:a)", {"a": 2.5}], ["X", true, null]]"#).unwrap();
        assert_eq!(got[0], Statement::plain("SELECT 1"));
        assert_eq!(
            got[1].params,
            Params::Positional(vec![Param::Integer(1), Param::Text("x".into())])
        );
        assert_eq!(
            got[2].params,
            Params::Named(vec![("a".into(), Param::Real(2.5))])
        );
        assert_eq!(
            got[3].params,
            Params::Positional(vec![Param::Integer(1), Param::Null])
        );
    }

    #[test]
    fn bad_bodies_say_what_is_wrong() {
        for (body, says) in [
            (&b"[1,"[..], "invalid JSON"),
            (b"{}", "JSON array"),
            (b"[]", "empty statement list"),
            (b"[5]", "must be a SQL string"),
            (b"[[1, 2]]", "first element"),
            (br#"[["S", 1, {"a": 1}]]"#, "mixed parameter forms"),
            (br#"[["S", [1]]]"#, "a parameter must be"),
        ] {
            let err = parse_statements(body).unwrap_err();
            assert!(
                err.0.contains(says),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
