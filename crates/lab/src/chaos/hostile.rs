//! Hostile SQL: what a careless or malicious client sends to the data API,
//! as a seeded grammar, and a workload that sends it while recording
//! which of its own ledger rows were acknowledged.
//!
//! The grammar (shared with the differential fuzzer in
//! `crates/cli/tests/db_integrity.rs`) holds transaction control in many
//! spellings, triggers with `RAISE(ROLLBACK|ABORT|FAIL|IGNORE)`, triggers
//! writing other tables, `OR ROLLBACK`/`OR REPLACE`, the last rowid,
//! runaway recursive queries, `ATTACH`, failing statements, schema
//! changes with non-deterministic `DEFAULT`s, pragmas, `sqlite_stat1`
//! edits, deferred foreign keys, and every spelling of the clock and of
//! randomness, with parameters. Each request holds zero or one row of
//! the client's ledger (`hostile_ledger`, keyed by client and sequence):
//! acknowledged, it must be on every node; answered as failed (or rolled
//! back with its transaction), on none.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// The tables the grammar writes; created before the workload starts.
pub const SCHEMA: [&str; 6] = [
    "CREATE TABLE IF NOT EXISTS hostile_ledger (client INTEGER, seq INTEGER, v, PRIMARY KEY (client, seq))",
    "CREATE TABLE IF NOT EXISTS p0 (a, b, c)",
    "CREATE TABLE IF NOT EXISTS p1 (a, b, c UNIQUE ON CONFLICT ROLLBACK)",
    "CREATE TABLE IF NOT EXISTS p2 (a INTEGER PRIMARY KEY, b, c)",
    "CREATE TABLE IF NOT EXISTS dad (id INTEGER PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS kid (id INTEGER PRIMARY KEY, d REFERENCES dad (id) DEFERRABLE INITIALLY DEFERRED)",
];

/// splitmix64, the lab's one generator: the same seed, the same
/// statements, the same fault schedule.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Expressions whose value differs between nodes unless the design makes
/// it the same, or that fail.
pub const EXPRESSIONS: [&str; 18] = [
    "random()",
    "randomblob(4)",
    "hex(randomblob(length('abcdefgh')))",
    "datetime('now')",
    "strftime('%Y-%m-%d %H:%M:%f', \"now\")",
    "strftime('%Y-%m-%d %H:%M:%f')",
    "julianday('no'||'w')",
    "unixepoch('now', 'subsec')",
    "CURRENT_TIMESTAMP",
    "changes()",
    "last_insert_rowid()",
    "total_changes()",
    "datetime('now', 'localtime')",
    "sqlite_version()",
    "42",
    "'text'",
    "abs(-7) * 3",
    "zeroblob(100000000)",
];

const RUNAWAY_INSERT: &str = "INSERT INTO p1 (a) SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT x FROM c)";
const RUNAWAY_UPDATE: &str = "UPDATE p2 SET c = (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c)";

/// One statement of the grammar; `attach` is a path the workload owns
/// (no file may ever appear there); `runaway` allows statements that run
/// until their budget stops them.
pub fn statement(rng: &mut Rng, attach: &str, runaway: bool) -> Value {
    let t = format!("p{}", rng.below(3));
    let u = format!("p{}", rng.below(3));
    let n = rng.below(6);
    let e = |rng: &mut Rng| rng.pick(&EXPRESSIONS).to_string();
    let sql = match rng.below(22) {
        0 => rng
            .pick(&[
                "ROLLBACK",
                "/**/ROLLBACK",
                "-- x\nCOMMIT",
                "END",
                "BEGIN",
                "BEGIN IMMEDIATE",
                "SAVEPOINT s",
                "RELEASE s",
                "ROLLBACK TO s",
                "  commit transaction ;",
            ])
            .to_string(),
        1 => format!(
            "CREATE TRIGGER IF NOT EXISTS r{n}{t} {} INSERT ON {t} WHEN new.a % 3 = {} BEGIN SELECT RAISE({}, 'boom'); END",
            rng.pick(&["BEFORE", "AFTER"]),
            rng.below(3),
            rng.pick(&["ROLLBACK", "ABORT", "FAIL", "IGNORE"])
        ),
        2 => format!(
            "CREATE TRIGGER IF NOT EXISTS w{n}{t} AFTER INSERT ON {t} BEGIN INSERT INTO {u} (a, b, c) VALUES (random(), datetime('now'), {}); END",
            e(rng)
        ),
        3 => format!("DROP TRIGGER IF EXISTS r{n}{t}"),
        4..=7 => format!(
            "INSERT INTO {t} (a, b, c) VALUES ({}, {}, {})",
            rng.below(100),
            e(rng),
            e(rng)
        ),
        8 => format!(
            "INSERT OR ROLLBACK INTO {t} (rowid, a) VALUES ({}, {})",
            rng.below(20),
            e(rng)
        ),
        9 => format!(
            "INSERT OR REPLACE INTO {t} (rowid, a, b) VALUES ({}, {}, {})",
            rng.below(20),
            rng.below(9),
            e(rng)
        ),
        10 => format!("UPDATE {t} SET b = {} WHERE a % 3 = {}", e(rng), rng.below(3)),
        11 => format!("DELETE FROM {t} WHERE rowid % 5 = {n}"),
        12 => {
            let choices: &[&str] = if runaway {
                &[
                    "INSERT INTO p0 (rowid, a) VALUES (9223372036854775807, 1)",
                    RUNAWAY_INSERT,
                    RUNAWAY_UPDATE,
                ]
            } else {
                &["INSERT INTO p0 (rowid, a) VALUES (9223372036854775807, 1)"]
            };
            rng.pick(choices).to_string()
        }
        13 => format!("ATTACH DATABASE '{attach}' AS x{n}"),
        14 => rng
            .pick(&[
                "INSERT INTO nope VALUES (1)",
                "SELECT * FROM",
                "INSERT INTO p0 (zz) VALUES (1)",
                "VACUUM",
                "CREATE TEMP TABLE tt (x)",
                "UPDATE _scaleout_applied SET log_index = 0",
                " ",
                "-- nothing\n;",
            ])
            .to_string(),
        15 => format!(
            "CREATE TABLE IF NOT EXISTS q{n} (a, b DEFAULT (random()), c DEFAULT CURRENT_TIMESTAMP, d DEFAULT ({}))",
            e(rng)
        ),
        16 => format!("INSERT INTO q{n} (a) VALUES ({})", rng.below(50)),
        17 => rng
            .pick(&[
                "CREATE INDEX IF NOT EXISTS pb ON p0 (b)",
                "ANALYZE",
                "DROP TABLE IF EXISTS q1",
                "PRAGMA foreign_keys = OFF",
                "PRAGMA recursive_triggers = 1",
                "PRAGMA user_version = 7",
                "PRAGMA case_sensitive_like = 1",
                "INSERT INTO sqlite_stat1 VALUES ('p0', 'pb', '1000000 1')",
            ])
            .to_string(),
        18 => format!("INSERT INTO kid (d) VALUES ({n})"),
        19 => format!("INSERT INTO dad (id) VALUES ({n})"),
        20 => format!("DELETE FROM dad WHERE id = {n}"),
        _ => {
            return json!([
                "INSERT INTO p0 (a, b, c) VALUES (?, strftime(?, ?), ?)",
                rng.below(100),
                "%Y-%m-%d %H:%M:%f",
                "now",
                rng.pick(&["now", "x"])
            ])
        }
    };
    Value::String(sql)
}

/// A request of the workload: a few hostile statements, perhaps with the
/// client's ledger row `(client, seq)` among them (its position), and
/// whether it runs as one transaction.
pub struct Request {
    pub body: Value,
    pub ledger_at: Option<usize>,
    pub transaction: bool,
}

pub fn request(rng: &mut Rng, client: u64, seq: u64, attach: &str, runaway: bool) -> Request {
    let mut body: Vec<Value> = (0..rng.below(4))
        .map(|_| statement(rng, attach, runaway))
        .collect();
    let ledger_at = (rng.below(5) > 0).then(|| {
        let at = rng.below(body.len() as u64 + 1) as usize;
        let v = rng.pick(&EXPRESSIONS);
        body.insert(
            at,
            json!([
                format!("INSERT INTO hostile_ledger VALUES (?, ?, {v})"),
                client,
                seq
            ]),
        );
        at
    });
    if body.is_empty() {
        body.push(statement(rng, attach, runaway));
    }
    Request {
        body: Value::Array(body),
        ledger_at,
        transaction: rng.below(3) == 0,
    }
}

/// What became of a request's ledger row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Ledger {
    /// Answered with no error for it (and no error in its transaction):
    /// it must be on every node.
    Acknowledged,
    /// Answered as failed, or rolled back with its transaction: on none.
    Refused,
    /// No answer (a fault), or no ledger row in the request.
    Unknown,
    /// A 200 answer without results a client could read: itself a
    /// failure of the data API, never taken as "unknown".
    Unreadable,
}

/// Reads the ledger row's fate from a data-API answer.
pub fn ledger_outcome(req: &Request, status: u16, answer: &Value) -> Ledger {
    if status != 200 {
        return Ledger::Unknown;
    }
    let Ok(answer) = serde_json::from_value::<scaleout_wire::data::Results<Value>>(answer.clone())
    else {
        return Ledger::Unreadable;
    };
    let Some(at) = req.ledger_at else {
        return Ledger::Unknown;
    };
    let results = &answer.results;
    let any_error = results.iter().any(|r| !r["error"].is_null());
    match results.get(at) {
        Some(r) if r["error"].is_null() && !(req.transaction && any_error) => Ledger::Acknowledged,
        _ => Ledger::Refused,
    }
}

/// One hostile request as the history records it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Op {
    pub client: usize,
    pub seq: u64,
    pub invoke_ms: u64,
    pub complete_ms: u64,
    pub status: u16,
    pub ledger: Ledger,
}

pub type Log = Arc<Mutex<Vec<Op>>>;

/// A client sending hostile requests to the database nodes (any of
/// them: followers forward writes) until `stop`.
#[allow(clippy::too_many_arguments)] // one worker's whole setting
pub async fn client(
    id: usize,
    seed: u64,
    dbs: Vec<String>,
    attach: String,
    log: Log,
    stop: CancellationToken,
    started: Instant,
    reach: super::Reach,
) {
    let Ok(http) = reach.http() else {
        tracing::error!(
            client = id,
            "no HTTP client: this hostile worker sends nothing"
        );
        return;
    };
    let mut rng = Rng(seed);
    let mut seq = 0u64;
    let now = || started.elapsed().as_millis() as u64;
    while !stop.is_cancelled() && !dbs.is_empty() {
        seq += 1;
        // Runaway statements now and then only: each holds every write
        // for its budget.
        let runaway = rng.below(20) == 0;
        let req = request(&mut rng, id as u64, seq, &attach, runaway);
        let node = &dbs[rng.below(dbs.len() as u64) as usize];
        let path = if req.transaction {
            "/db/execute?transaction&raft_index"
        } else {
            "/db/execute?raft_index"
        };
        let invoke_ms = now();
        let sent = http
            .post(format!("{node}{path}"))
            .json(&req.body)
            .send()
            .await;
        let (status, answer) = match sent {
            // An answer that is not JSON is kept as null: a 200 with it
            // is a violation (`Ledger::Unreadable`), not an unknown.
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        };
        let op = Op {
            client: id,
            seq,
            invoke_ms,
            complete_ms: now(),
            status,
            ledger: ledger_outcome(&req, status, &answer),
        };
        log.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(op);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The checker: every acknowledged ledger row on every node, no refused
/// one on any. `ledgers` is each node's `(client, seq)` rows.
pub fn check(ops: &[Op], ledgers: &BTreeMap<String, BTreeSet<(u64, u64)>>) -> Vec<String> {
    let mut violations = Vec::new();
    for (node, rows) in ledgers {
        for op in ops {
            let key = (op.client as u64, op.seq);
            match op.ledger {
                Ledger::Acknowledged if !rows.contains(&key) => violations.push(format!(
                    "{node}: hostile client {} lost its acknowledged ledger row {} (sent at {} ms)",
                    op.client, op.seq, op.invoke_ms
                )),
                Ledger::Refused if rows.contains(&key) => violations.push(format!(
                    "{node}: hostile client {}'s ledger row {} is stored, though its request was answered as failed (at {} ms)",
                    op.client, op.seq, op.complete_ms
                )),
                _ => {}
            }
        }
    }
    for op in ops.iter().filter(|o| o.ledger == Ledger::Unreadable) {
        violations.push(format!(
            "hostile client {}'s request {} was answered 200 without results a client could read (at {} ms)",
            op.client, op.seq, op.complete_ms
        ));
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(seq: u64, ledger: Ledger) -> Op {
        Op {
            client: 1,
            seq,
            invoke_ms: 0,
            complete_ms: 1,
            status: 200,
            ledger,
        }
    }

    #[test]
    fn the_checker_finds_lost_and_phantom_rows() {
        let ops = [
            op(1, Ledger::Acknowledged),
            op(2, Ledger::Refused),
            op(3, Ledger::Unknown),
        ];
        let good = BTreeMap::from([("db-1".to_string(), BTreeSet::from([(1, 1), (1, 3)]))]);
        assert!(check(&ops, &good).is_empty());
        let bad = BTreeMap::from([("db-2".to_string(), BTreeSet::from([(1, 2)]))]);
        let v = check(&ops, &bad);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].contains("lost") && v[1].contains("answered as failed"));
    }

    #[test]
    fn the_outcome_follows_the_answer() {
        let req = Request {
            body: json!([]),
            ledger_at: Some(1),
            transaction: true,
        };
        let ok = json!({"results": [{"rows_affected": 1}, {"rows_affected": 1}], "raft_index": 3});
        assert_eq!(ledger_outcome(&req, 200, &ok), Ledger::Acknowledged);
        let rolled_back = json!({"results": [{"rows_affected": 1}, {"rows_affected": 1}, {"error": "x"}], "raft_index": 3});
        assert_eq!(ledger_outcome(&req, 200, &rolled_back), Ledger::Refused);
        assert_eq!(ledger_outcome(&req, 504, &ok), Ledger::Unknown);
        // A 200 a client could not read is a failure of its own, whether
        // or not the request held a ledger row.
        assert_eq!(ledger_outcome(&req, 200, &json!({})), Ledger::Unreadable);
        assert_eq!(ledger_outcome(&req, 200, &Value::Null), Ledger::Unreadable);
        let v = check(&[op(9, Ledger::Unreadable)], &BTreeMap::new());
        assert!(v.len() == 1 && v[0].contains("without results"), "{v:?}");
        let alone = Request {
            transaction: false,
            ..req
        };
        assert_eq!(
            ledger_outcome(&alone, 200, &rolled_back),
            Ledger::Acknowledged
        );
    }

    #[test]
    fn a_seed_gives_the_same_requests() {
        let body = |seed| {
            let mut rng = Rng(seed);
            (0..20)
                .map(|i| request(&mut rng, 0, i, "/x", true).body)
                .collect::<Vec<_>>()
        };
        assert_eq!(body(3), body(3));
        assert_ne!(body(3), body(4));
    }
}
