//! The ready line: what a role prints on stdout once its listeners are
//! bound and it serves. People read the plain line (`scaleout lb:
//! http://127.0.0.1:8080 ...`); a supervisor (the lab, a test, a script)
//! sets `SCALEOUT_READY=json` in the child's environment and reads one
//! more line, a JSON object under the key `scaleout_ready`, with the
//! addresses it needs. A field the role does not have is absent.

use serde::{Deserialize, Serialize};

/// The environment variable that asks for the JSON ready line.
pub const ENV: &str = "SCALEOUT_READY";

/// A role, ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// `web`, `lb`, `dns` or `db`.
    pub role: String,
    /// Where it serves: `http(s)://host:port` for web, lb and a db
    /// node's API; `host:port` (UDP and TCP) for dns.
    pub url: String,
    /// A web server's name (`X-Served-By`); a database node's id as
    /// given (`--id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A database node's Raft id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// A database node's Raft address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raft: Option<String>,
    /// The load balancer's admin API, the DNS server's HTTP port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Line {
    scaleout_ready: Ready,
}

impl Ready {
    /// Whether this process was asked for the JSON line.
    pub fn wanted() -> bool {
        std::env::var(ENV).is_ok_and(|v| v == "json")
    }

    /// The JSON line (no newline).
    pub fn line(&self) -> String {
        serde_json::to_string(&Line {
            scaleout_ready: self.clone(),
        })
        .unwrap_or_default()
    }

    /// Prints the JSON line on stdout when it was asked for.
    pub fn announce(&self) {
        if Self::wanted() {
            println!("{}", self.line());
        }
    }

    /// The ready line among a child's output lines: `None` for any other
    /// line, an error for a ready line that does not parse (a child of
    /// another version, say), which a supervisor must not take for ready.
    pub fn parse(line: &str) -> Option<Result<Ready, String>> {
        let line = line.trim();
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        let ready = value.as_object()?.get("scaleout_ready")?;
        Some(Ready::deserialize(ready).map_err(|e| format!("unreadable ready line {line:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_round_trips_and_other_lines_are_not_taken_for_it() {
        let ready = Ready {
            role: "db".into(),
            url: "https://127.0.0.1:4001".into(),
            name: None,
            id: Some(2),
            raft: Some("127.0.0.1:4002".into()),
            admin: None,
        };
        assert_eq!(Ready::parse(&ready.line()), Some(Ok(ready)));
        assert_eq!(
            Ready::parse("scaleout db: node 2 http://127.0.0.1:4001"),
            None
        );
        assert!(matches!(
            Ready::parse(r#"{"scaleout_ready": {"role": "db"}}"#),
            Some(Err(e)) if e.contains("url")
        ));
    }
}
