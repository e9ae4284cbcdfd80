//! The data API's JSON: rqlite's shapes, and scaleout's additions to them
//! (`raft_index` on reads, `lag` in `/nodes`, `code` on errors).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The answer of `/db/execute`, `/db/query` and `/db/request`: one
/// result per statement, in order. The database fills `R` with the
/// engine's JSON values; a client reads [`StatementResult`]s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results<R = StatementResult> {
    pub results: Vec<R>,
    /// A write: the log index that committed it. A read: the index of the
    /// state it saw, which a client passes back as `min_index` to never
    /// see older data on another node. A node adds it only when the
    /// request asks (`?raft_index`, as rqlite); scaleout's clients always
    /// ask, and to them it is required: without it a client would
    /// silently lose read-your-writes.
    pub raft_index: u64,
    /// Seconds the request took (`?timings`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<f64>,
}

/// One statement's result: rows (`columns`/`types`/`values`, or `rows`
/// with `?associative`), a write's effect (`last_insert_id`,
/// `rows_affected`), or the statement's SQL error.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatementResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// A list beside `values`; an object (column → type) beside `rows`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<Vec<Value>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<Vec<Map<String, Value>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_insert_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_affected: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<f64>,
}

/// A result that does not have the shape its reader needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError(pub String);

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

impl StatementResult {
    /// The rows a write changed. rqlite leaves `rows_affected` (and
    /// `last_insert_id`) out when it is zero, so a write's result without
    /// it changed nothing; a result with an error, or a read's (with
    /// `columns`), is a [`ShapeError`], never a zero.
    pub fn rows_changed(&self) -> Result<u64, ShapeError> {
        if let Some(e) = &self.error {
            return Err(ShapeError(e.clone()));
        }
        if self.columns.is_some() || self.rows.is_some() {
            return Err(ShapeError(
                "a read's result where a write's was expected".into(),
            ));
        }
        Ok(self.rows_affected.unwrap_or(0))
    }

    /// The rows of a read, each readable by column name. A result with
    /// an error, or without `columns` and `values` (a write's), is a
    /// [`ShapeError`]; an empty table is an empty list.
    pub fn table(&self) -> Result<Vec<Row<'_>>, ShapeError> {
        if let Some(e) = &self.error {
            return Err(ShapeError(e.clone()));
        }
        let columns = self
            .columns
            .as_deref()
            .ok_or_else(|| ShapeError("a read's result without columns".into()))?;
        let values = self.values.as_deref().unwrap_or_default();
        values
            .iter()
            .map(|values| {
                if values.len() == columns.len() {
                    Ok(Row { columns, values })
                } else {
                    Err(ShapeError(format!(
                        "a row of {} values under {} columns",
                        values.len(),
                        columns.len()
                    )))
                }
            })
            .collect()
    }
}

/// One row of a read, by column name.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    columns: &'a [String],
    values: &'a [Value],
}

impl<'a> Row<'a> {
    /// The value in column `name`.
    pub fn get(&self, name: &str) -> Result<&'a Value, ShapeError> {
        self.columns
            .iter()
            .position(|c| c == name)
            .map(|i| &self.values[i])
            .ok_or_else(|| ShapeError(format!("no column {name:?} in {:?}", self.columns)))
    }

    /// Column `name` as text (NULL is an error).
    pub fn text(&self, name: &str) -> Result<&'a str, ShapeError> {
        let v = self.get(name)?;
        v.as_str()
            .ok_or_else(|| ShapeError(format!("column {name:?} is {v}, not text")))
    }

    /// Column `name` as a whole number.
    pub fn int(&self, name: &str) -> Result<i64, ShapeError> {
        let v = self.get(name)?;
        v.as_i64()
            .ok_or_else(|| ShapeError(format!("column {name:?} is {v}, not a whole number")))
    }
}

/// An error answer: rqlite's `error` (what clients show), scaleout's
/// `code` (what programs branch on), and the leader's URL where the node
/// that answered does not lead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>, code: Option<ErrorCode>) -> Self {
        ErrorBody {
            error: error.into(),
            code,
            leader: None,
        }
    }
}

/// Why a node could not serve, for programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request itself is wrong (parameters, JSON, statements).
    BadRequest,
    /// Sign in, or sign in as a user with the permission.
    Unauthorized,
    Forbidden,
    /// This node does not lead; `leader` says who does when it knows.
    NotLeader,
    /// The cluster has no leader now: nothing was written.
    NoLeader,
    /// The read's `min_index` is not applied here yet.
    NotCaughtUp,
    /// The read's `min_index` is beyond the cluster's log: it did not come
    /// from this cluster. Nothing waits for it.
    MinIndexAheadOfLog,
    /// This node's data is staler than the read's `freshness`.
    Stale,
    /// Every read connection stayed busy.
    Busy,
    /// The write was proposed and the leader lost its quorum before it
    /// committed: it may yet commit, or never.
    OutcomeUnknown,
    /// A bug or a broken node.
    Internal,
    /// A code this reader does not know (a newer node's).
    #[serde(other)]
    Other,
}

/// One node in `/nodes`: rqlite's fields, and `lag` (entries behind the
/// leader, when the leader answers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: String,
    /// `http(s)://host:port`
    pub api_addr: String,
    /// The Raft address, `host:port`.
    pub addr: String,
    pub voter: bool,
    pub reachable: bool,
    pub leader: bool,
    /// Seconds its health check took.
    pub time: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    /// Why the node is not reachable (rqlite's `error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `/nodes?ver=2`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Nodes {
    pub nodes: Vec<NodeStatus>,
}

/// `/nodes` without `ver=2`: the same, keyed by id.
pub type NodesV1 = BTreeMap<String, NodeStatus>;

/// `/leader`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderAnswer {
    pub leader: LeaderOf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderOf {
    pub id: String,
    pub api_addr: String,
    pub addr: String,
}

/// `/status`: rqlite's sections and the fields its clients read
/// (`store.ready`, `store.raft.state` as `Leader`/`Follower`/`Candidate`,
/// the indexes), and scaleout's own beside them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub node: NodeSelf,
    pub store: StoreStatus,
    pub build: Build,
    pub http: HttpStatus,
    pub runtime: Runtime,
}

/// `/status`'s `http`: where the data API listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpStatus {
    pub bind_addr: String,
    /// `enabled` when users and permissions are in force, else `disabled`.
    pub auth: String,
    pub tls: bool,
}

/// `/status`'s `runtime`: the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtime {
    pub os: String,
    pub arch: String,
    pub num_cpu: usize,
    pub version: String,
}

/// `/status`'s `store.sqlite3`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sqlite3Status {
    pub version: String,
    pub path: String,
    pub db_size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSelf {
    pub id: String,
    pub api_addr: String,
    pub raft_addr: String,
    pub read_only: bool,
    pub uptime_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreStatus {
    pub node_id: String,
    /// Whether this node serves: it applies the log and hears a leader
    /// (what `/readyz` says).
    pub ready: bool,
    pub open: bool,
    /// `null` while this node knows no leader.
    pub leader: Option<StoreLeader>,
    /// Bytes of the SQLite file.
    pub db_size: u64,
    /// The last entry applied to the state machine, and the last whose
    /// changes are in the SQLite file (the same here: both in one
    /// transaction).
    pub fsm_index: u64,
    pub db_applied_index: u64,
    pub raft: RaftStatus,
    pub sqlite3: Sqlite3Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreLeader {
    pub node_id: String,
    pub api_addr: String,
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftStatus {
    /// rqlite's: `Leader`, `Follower` (a read replica too), `Candidate`
    /// or `Shutdown`.
    pub state: String,
    pub term: u64,
    pub last_log_index: u64,
    /// The highest entry this node knows committed: on the leader, the
    /// one a quorum of voters holds; elsewhere, the last it applied.
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub last_snapshot_index: u64,
    pub purged_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub voter: bool,
    /// The leader's: how long since a quorum last acknowledged it.
    pub millis_since_quorum_ack: Option<u64>,
    /// A follower's: how long since it last heard the leader.
    pub last_contact_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    pub version: String,
    pub engine: String,
}

/// `/join`: a node asks to be taken in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// A number, or its decimal string (rqlite's clients send either).
    pub id: Value,
    #[serde(alias = "api")]
    pub api_addr: String,
    #[serde(alias = "raft")]
    pub addr: String,
    #[serde(default = "yes")]
    pub voter: bool,
}

fn yes() -> bool {
    true
}

impl JoinRequest {
    /// The node's Raft id ([`raft_id`] of its name).
    pub fn id(&self) -> Option<u64> {
        node_id(&self.id)
    }

    /// The node's name as given (a number's decimal text).
    pub fn name(&self) -> Option<String> {
        match &self.id {
            Value::Number(n) => Some(n.to_string()),
            Value::String(s) => Some(s.clone()),
            _ => None,
        }
    }
}

/// A node's Raft id from its name, given as a number or a string.
pub fn node_id(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => raft_id(&n.to_string()),
        Value::String(s) => raft_id(s),
        _ => None,
    }
}

/// The Raft id of the node rqlite-style clients call `name` (rqlite's ids
/// are strings). A whole number from 1 below 2⁶³ is itself, so numbered
/// clusters keep their ids; any other name (`0`, `db-a`, an address) is
/// a stable 64-bit FNV-1a hash of it with the top bit set, which never
/// meets a number. `None` for an empty name, one over 128 bytes, or one
/// with control characters.
pub fn raft_id(name: &str) -> Option<u64> {
    const TOP: u64 = 1 << 63;
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return None;
    }
    match name.parse::<u64>() {
        Ok(n) if (1..TOP).contains(&n) && n.to_string() == name => Some(n),
        _ => {
            let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
            for b in name.bytes() {
                hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            Some(hash | TOP)
        }
    }
}

/// Whether a node of Raft id `id` is known by a name of its own (the
/// name is not simply the number).
pub fn named(id: u64, name: &str) -> bool {
    id.to_string() != name
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn node_names_map_to_raft_ids() {
        assert_eq!(raft_id("1"), Some(1));
        assert_eq!(raft_id("42"), Some(42));
        for name in [
            "0",
            "db-a",
            "127.0.0.1:4002",
            "01",
            "+1",
            "9223372036854775808",
        ] {
            let id = raft_id(name).unwrap();
            assert!(id >= 1 << 63, "{name}");
            assert_eq!(raft_id(name), Some(id), "stable");
            assert!(named(id, name));
        }
        assert_ne!(raft_id("0"), raft_id("00"));
        assert_eq!(raft_id(""), None);
        assert_eq!(raft_id("a\nb"), None);
        assert_eq!(raft_id(&"x".repeat(129)), None);
        assert_eq!(node_id(&serde_json::json!(0)), raft_id("0"));
        assert_eq!(node_id(&serde_json::json!("7")), Some(7));
        assert!(!named(7, "7"));
    }

    #[test]
    fn a_missing_raft_index_is_an_error_not_a_zero() {
        let e = serde_json::from_value::<Results>(json!({ "results": [] })).unwrap_err();
        assert!(e.to_string().contains("raft_index"), "{e}");
        let ok: Results = serde_json::from_value(json!({
            "results": [{"last_insert_id": 1, "rows_affected": 1, "from_the_future": true}],
            "raft_index": 7,
            "extra": "tolerated",
        }))
        .unwrap();
        assert_eq!(ok.raft_index, 7);
        assert_eq!(ok.results[0].rows_affected, Some(1));
    }

    #[test]
    fn a_renamed_node_field_fails_to_parse() {
        let good = json!({"nodes": [{"id": "1", "api_addr": "http://a", "addr": "a:1",
            "voter": true, "reachable": true, "leader": true, "time": 0.001}]});
        let nodes: Nodes = serde_json::from_value(good.clone()).unwrap();
        assert_eq!(nodes.nodes[0].lag, None);
        let mut renamed = good;
        renamed["nodes"][0]["api"] = renamed["nodes"][0]["api_addr"].take();
        renamed["nodes"][0]
            .as_object_mut()
            .unwrap()
            .remove("api_addr");
        assert!(serde_json::from_value::<Nodes>(renamed).is_err());
    }

    #[test]
    fn rows_are_read_by_column_name_and_a_bad_shape_is_an_error() {
        let r: StatementResult = serde_json::from_value(json!({
            "columns": ["code", "url", "id"], "types": ["text", "text", "integer"],
            "values": [["abc", "https://x", 3]]
        }))
        .unwrap();
        let table = r.table().unwrap();
        assert_eq!(table[0].text("url").unwrap(), "https://x");
        assert_eq!(table[0].int("id").unwrap(), 3);
        assert!(table[0].text("id").is_err());
        assert!(table[0].get("nope").is_err());
        let empty: StatementResult =
            serde_json::from_value(json!({"columns": ["a"], "types": ["text"]})).unwrap();
        assert!(empty.table().unwrap().is_empty());
        let ragged: StatementResult =
            serde_json::from_value(json!({"columns": ["a"], "values": [[1, 2]]})).unwrap();
        assert!(ragged.table().is_err());
        let failed: StatementResult =
            serde_json::from_value(json!({"error": "no such table: t"})).unwrap();
        assert_eq!(failed.table().unwrap_err().0, "no such table: t");
    }

    #[test]
    fn error_codes_are_snake_case_and_unknown_ones_are_other() {
        let body: ErrorBody = serde_json::from_value(json!({
            "error": "x", "code": "min_index_ahead_of_log"
        }))
        .unwrap();
        assert_eq!(body.code, Some(ErrorCode::MinIndexAheadOfLog));
        let newer: ErrorBody =
            serde_json::from_value(json!({"error": "x", "code": "something_new"})).unwrap();
        assert_eq!(newer.code, Some(ErrorCode::Other));
        assert_eq!(
            serde_json::to_value(ErrorBody::new("y", Some(ErrorCode::OutcomeUnknown))).unwrap(),
            json!({"error": "y", "code": "outcome_unknown"})
        );
    }
}
