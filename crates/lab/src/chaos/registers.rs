//! The register workload: clients write, compare-and-set and read a few
//! integer registers straight through the data API, while faults happen.
//!
//! - Writes and compare-and-sets go through `scaleout-client` (to the
//!   leader, retried only when certainly not done), so each has a known or
//!   an unknown outcome.
//! - `linearizable` and `strong` reads go to a random database node
//!   (followers forward them): these, with the writes, must be
//!   linearizable, which `linear::check` decides per register.
//! - `none` reads go to the read replicas with the client's session index
//!   as `min_index` (the highest `raft_index` it has seen): per client, the
//!   state they show must never go back — neither the index a read
//!   reports nor a register's version.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use scaleout_wire::data::{Results, StatementResult};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Rng;
use crate::linear::{self, Event, RegisterOp, Verdict};

/// The table the registers live in (created before the clients start).
pub const TABLE: &str =
    "CREATE TABLE IF NOT EXISTS registers (k INTEGER PRIMARY KEY, v INTEGER NOT NULL, ver INTEGER NOT NULL)";

const WRITE: &str = "INSERT INTO registers (k, v, ver) VALUES (?, ?, 1) \
     ON CONFLICT (k) DO UPDATE SET v = excluded.v, ver = ver + 1";
const CAS: &str = "UPDATE registers SET v = ?, ver = ver + 1 WHERE k = ? AND v = ?";
const READ: &str = "SELECT v, ver FROM registers WHERE k = ?";

/// How far the search for an order may go per register.
const MAX_STEPS: u64 = 20_000_000;

/// One register operation as the history records it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Record {
    pub key: i64,
    #[serde(flatten)]
    pub event: Event,
    /// `write`, `cas`, or the read level: `linearizable`, `strong`, `none`.
    pub how: &'static str,
    /// `ok`, `fail` (certainly not done) or `unknown`.
    pub outcome: &'static str,
    /// A read: the register's version and the index of the state seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ver: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raft_index: Option<u64>,
    pub detail: String,
}

pub type Log = Arc<Mutex<Vec<Record>>>;

/// One register client, until `stop`.
#[allow(clippy::too_many_arguments)] // one worker's whole setting
pub async fn client(
    id: usize,
    seed: u64,
    dbs: Vec<String>,
    keys: i64,
    log: Log,
    stop: CancellationToken,
    started: Instant,
    reach: super::Reach,
) {
    let Ok(db) = reach.db(dbs.clone()) else {
        return;
    };
    let Ok(http) = reach.http() else {
        tracing::error!(
            client = id,
            "no HTTP client: this register worker sends nothing"
        );
        return;
    };
    let mut rng = Rng::new(seed);
    let mut last_read: BTreeMap<i64, i64> = BTreeMap::new();
    let mut session = 0u64;
    let mut n = 0i64;
    let now = || started.elapsed().as_micros() as u64;
    while !stop.is_cancelled() {
        let key = rng.below(keys as u64) as i64;
        let dice = rng.below(10);
        let invoke_us = now();
        let cas_from = last_read
            .get(&key)
            .copied()
            .filter(|_| (3..=4).contains(&dice));
        let (how, op, outcome, ver, raft_index, detail) = if dice <= 4 {
            n += 1;
            let value = (id as i64 + 1) * 1_000_000_000 + n;
            let (how, statement) = match cas_from {
                Some(from) => ("cas", json!([[CAS, value, key, from]])),
                None => ("write", json!([[WRITE, key, value]])),
            };
            let done = db.execute(&statement, false).await;
            let (outcome, applied, index, detail) = match done {
                Ok(e) if e.results.first().is_some_and(|r| r.error.is_none()) => {
                    let applied = e.results[0].rows_changed() == Ok(1);
                    session = session.max(e.raft_index);
                    ("ok", applied, Some(e.raft_index), e.node)
                }
                Ok(e) => (
                    "fail",
                    false,
                    None,
                    serde_json::to_string(&e.results).unwrap_or_default(),
                ),
                Err(scaleout_client::ClientError::Unknown { node, reason }) => {
                    ("unknown", false, None, format!("{node}: {reason}"))
                }
                Err(e) => ("fail", false, None, e.to_string()),
            };
            let op = match cas_from {
                Some(from) => RegisterOp::Cas {
                    from,
                    to: value,
                    applied,
                },
                None => RegisterOp::Write { value },
            };
            (how, op, outcome, None, index, detail)
        } else if dice <= 7 {
            let level = if dice == 7 { "strong" } else { "linearizable" };
            let node = &dbs[rng.below(dbs.len() as u64) as usize];
            let answer = http
                .post(format!("{node}/db/query?level={level}&raft_index"))
                .json(&json!([[READ, key]]))
                .send()
                .await;
            let body = match answer {
                Ok(r) if r.status() == 200 => r.json::<Results>().await.ok(),
                _ => None,
            };
            match body
                .as_ref()
                .and_then(|b| b.results.first().and_then(row_of))
            {
                Some((value, ver)) => {
                    if let Some(v) = value {
                        last_read.insert(key, v);
                    }
                    let index = body.as_ref().map(|b| b.raft_index);
                    (
                        level,
                        RegisterOp::Read { value },
                        "ok",
                        ver,
                        index,
                        node.clone(),
                    )
                }
                None => (
                    level,
                    RegisterOp::Read { value: None },
                    "fail",
                    None,
                    None,
                    body.map(|b| serde_json::to_string(&b.results).unwrap_or_default())
                        .unwrap_or_default(),
                ),
            }
        } else {
            let answer = db.query(&json!([[READ, key]]), Some(session)).await;
            match answer {
                Ok(q) => match q.results.first().and_then(row_of) {
                    Some((value, ver)) => {
                        session = session.max(q.raft_index);
                        (
                            "none",
                            RegisterOp::Read { value },
                            "ok",
                            ver,
                            Some(q.raft_index),
                            q.node,
                        )
                    }
                    None => (
                        "none",
                        RegisterOp::Read { value: None },
                        "fail",
                        None,
                        None,
                        q.node,
                    ),
                },
                Err(e) => (
                    "none",
                    RegisterOp::Read { value: None },
                    "fail",
                    None,
                    None,
                    e.to_string(),
                ),
            }
        };
        let complete = now();
        let record = Record {
            key,
            event: Event {
                client: id,
                op,
                invoke_us,
                complete_us: (outcome == "ok").then_some(complete),
            },
            how,
            outcome,
            ver,
            raft_index,
            detail,
        };
        log.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(record);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// A register read's row: its value and version (`None, None`: no row).
fn row_of(result: &StatementResult) -> Option<(Option<i64>, Option<i64>)> {
    if result.error.is_some() {
        return None;
    }
    match result.values.as_ref().and_then(|v| v.first()) {
        None => Some((None, None)),
        Some(row) => Some((Some(row[0].as_i64()?), row[1].as_i64())),
    }
}

/// What the register checks found: violations, and notes on what could
/// not be decided.
#[derive(Debug, Default)]
pub struct Findings {
    pub violations: Vec<String>,
    pub undecided: Vec<String>,
    /// Operations the linearizability check placed (ok, or unknown writes).
    pub checked: usize,
}

/// Linearizability per register, and monotonic `none` reads per client.
pub fn check(records: &[Record]) -> Findings {
    let mut found = Findings::default();
    let mut keys: BTreeMap<i64, Vec<&Record>> = BTreeMap::new();
    for r in records {
        let placed = match r.how {
            "none" => false,
            "write" | "cas" => r.outcome != "fail",
            _ => r.outcome == "ok",
        };
        if placed {
            keys.entry(r.key).or_default().push(r);
        }
    }
    for (key, ops) in &keys {
        found.checked += ops.len();
        let events: Vec<Event> = ops.iter().map(|r| r.event.clone()).collect();
        match linear::check(&events, None, MAX_STEPS) {
            Verdict::Linearizable => {}
            Verdict::Undecided { steps } => found.undecided.push(format!(
                "register {key}: the linearizability search gave up after {steps} steps ({} operations)",
                ops.len()
            )),
            Verdict::Violation {
                stuck,
                state,
                window,
            } => {
                let mut text = format!(
                    "register {key} is not linearizable: {} cannot be placed (the register held {}); the shortest failing stretch:",
                    describe(ops[stuck]),
                    state.map_or("nothing".into(), |v| v.to_string())
                );
                for &i in window.iter().take(40) {
                    text.push_str("\n      ");
                    text.push_str(&describe(ops[i]));
                }
                found.violations.push(text);
            }
        }
    }
    // Monotonic reads: per client, in its order, no `none` read shows an
    // older state than one before it.
    let mut last: BTreeMap<(usize, i64), (i64, u64)> = BTreeMap::new();
    let mut last_index: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
    let mut reads: Vec<&Record> = records
        .iter()
        .filter(|r| r.how == "none" && r.outcome == "ok")
        .collect();
    reads.sort_by_key(|r| (r.event.client, r.event.invoke_us));
    for r in reads {
        let client = r.event.client;
        let at = r.event.invoke_us;
        if let Some(index) = r.raft_index {
            if let Some((before, when)) = last_index.get(&client) {
                if index < *before {
                    found.violations.push(format!(
                        "client {client}: a read at {} ms saw index {index}, older than the {before} a read at {} ms saw",
                        at / 1000,
                        when / 1000
                    ));
                }
            }
            last_index.insert(client, (index, at));
        }
        let Some(ver) = r.ver else { continue };
        if let Some((before, when)) = last.get(&(client, r.key)) {
            if ver < *before {
                found.violations.push(format!(
                    "client {client}: register {} went back from version {before} (read at {} ms) to {ver} (read at {} ms)",
                    r.key,
                    when / 1000,
                    at / 1000
                ));
            }
        }
        last.insert((client, r.key), (ver, at));
    }
    found
}

fn describe(r: &Record) -> String {
    let end = r
        .event
        .complete_us
        .map_or("?".to_string(), |c| format!("{:.1}", c as f64 / 1000.0));
    let op = match r.event.op {
        RegisterOp::Write { value } => format!("write {value}"),
        RegisterOp::Read { value } => format!(
            "{} read {}",
            r.how,
            value.map_or("nothing".into(), |v| v.to_string())
        ),
        RegisterOp::Cas { from, to, applied } => format!(
            "cas {from}->{to} {}",
            if r.outcome == "unknown" {
                "(outcome unknown)"
            } else if applied {
                "applied"
            } else {
                "not applied"
            }
        ),
    };
    format!(
        "client {} {op} [{:.1} .. {end} ms] {}",
        r.event.client,
        r.event.invoke_us as f64 / 1000.0,
        r.detail
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(client: usize, how: &'static str, op: RegisterOp, t: u64, ver: Option<i64>) -> Record {
        Record {
            key: 1,
            event: Event {
                client,
                op,
                invoke_us: t,
                complete_us: Some(t + 10),
            },
            how,
            outcome: "ok",
            ver,
            raft_index: ver.map(|v| v as u64),
            detail: String::new(),
        }
    }

    #[test]
    fn stale_linearizable_reads_and_replicas_going_back_are_found() {
        let w = |v| RegisterOp::Write { value: v };
        let r = |v| RegisterOp::Read { value: Some(v) };
        let good = vec![
            rec(0, "write", w(1), 0, None),
            rec(0, "write", w(2), 100, None),
            rec(1, "linearizable", r(2), 200, None),
            rec(2, "none", r(1), 300, Some(1)),
            rec(2, "none", r(2), 400, Some(2)),
        ];
        let found = check(&good);
        assert!(found.violations.is_empty(), "{:?}", found.violations);
        assert_eq!(found.checked, 3);

        let mut bad = good;
        bad.push(rec(1, "strong", r(1), 500, None));
        bad.push(rec(2, "none", r(1), 600, Some(1)));
        let found = check(&bad).violations.join("\n");
        assert!(found.contains("register 1 is not linearizable"), "{found}");
        assert!(found.contains("strong read 1"), "{found}");
        assert!(found.contains("went back from version 2"), "{found}");
        assert!(found.contains("saw index 1, older than the 2"), "{found}");
    }
}
