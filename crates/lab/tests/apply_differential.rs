//! The state machine, differentially: the hostile grammar's requests
//! applied as log entries to three state files in one process, and every
//! file and every answer compared.
//!
//! - `a` applies every entry on one connection, as a node that never
//!   restarts;
//! - `b` is closed and opened again now and then, as a node that restarts
//!   (a fresh connection: schema, statistics and statements read anew);
//! - `c` now and then replaces its contents with a consistent copy of
//!   `a`'s file, as a node that installs a snapshot, and goes on from it.
//!
//! The three share SQLite's own random generator (one per process), so
//! anything an entry takes from it — a rowid drawn at random after the
//! last rowid, say — differs between them and shows up here. No network,
//! no timing: a failing seed fails every time (`SCALEOUT_APPLY_SEED`,
//! `SCALEOUT_APPLY_ENTRIES` to explore).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use rusqlite::Connection;
use scaleout_db::determinism::Moment;
use scaleout_db::engine;
use scaleout_db::state::{self, Applied, StateMachine};
use scaleout_db::{parse_statements, ExecOptions, Statement, WriteEnv};
use scaleout_lab::chaos::hostile::{self, Rng};
use serde_json::Value;

/// One log entry: the requests group commit put in it.
type Entry = Vec<(Vec<Statement>, ExecOptions)>;

fn entries(seed: u64, count: usize, attach: &str) -> Vec<Entry> {
    let mut rng = Rng::new(seed);
    let schema = serde_json::to_vec(&hostile::SCHEMA).unwrap();
    let mut out = vec![vec![(
        parse_statements(&schema).unwrap(),
        ExecOptions::default(),
    )]];
    let mut seq = 0;
    while out.len() < count {
        let requests = 1 + rng.below(3);
        let entry = (0..requests)
            .filter_map(|_| {
                seq += 1;
                let client = rng.below(4);
                let runaway = rng.below(25) == 0;
                let req = hostile::request(&mut rng, client, seq, attach, runaway);
                let body = serde_json::to_vec(&req.body).unwrap();
                // A request the data API would refuse as malformed never
                // reaches the log.
                let statements = parse_statements(&body).ok()?;
                Some((
                    statements,
                    ExecOptions {
                        transaction: req.transaction,
                        ..Default::default()
                    },
                ))
            })
            .collect::<Entry>();
        if !entry.is_empty() {
            out.push(entry);
        }
    }
    out
}

fn apply(sm: &mut StateMachine, index: u64, entry: &Entry, seed: u64) -> Vec<Vec<Value>> {
    let env = WriteEnv {
        moment: Moment {
            unix_ms: 1_764_000_000_000 + index as i64 * 7,
            seed: seed ^ index,
        },
        budget: 1_000_000,
    };
    let at = Applied {
        term: 1,
        leader: 1,
        index,
    };
    sm.apply_entry(at, None, |db, rerun| {
        entry
            .iter()
            .enumerate()
            .map(|(i, (statements, opts))| engine::execute(db, i, statements, opts, &env, rerun))
            .collect()
    })
    .unwrap_or_else(|e| panic!("seed {seed}: entry {index} could not be applied: {e}"))
}

/// An answer without what may differ between nodes by design: the time
/// a statement took.
fn answers(mut results: Vec<Vec<Value>>) -> Vec<Vec<Value>> {
    for r in results.iter_mut().flatten() {
        if let Some(o) = r.as_object_mut() {
            o.remove("time");
        }
    }
    results
}

fn dump(path: &Path) -> String {
    scaleout_db::dump::dump(&Connection::open(path).unwrap()).unwrap()
}

fn first_difference(a: &str, b: &str) -> String {
    a.lines()
        .zip(b.lines())
        .enumerate()
        .find(|(_, (x, y))| x != y)
        .map(|(n, (x, y))| format!("line {n}:\n  {x}\n  {y}"))
        .unwrap_or_else(|| format!("{} vs {} lines", a.lines().count(), b.lines().count()))
}

fn run(seed: u64, count: usize) {
    let dir = tempfile::tempdir().unwrap();
    let attach = dir.path().join("attached.sqlite");
    let path = |name: &str| dir.path().join(format!("{name}.sqlite"));
    let open = |name: &str| StateMachine::open(&path(name), Default::default()).unwrap();
    let (mut a, mut b, mut c) = (open("a"), open("b"), open("c"));
    let entries = entries(seed, count, &attach.display().to_string());
    for (k, entry) in entries.iter().enumerate() {
        let index = k as u64 + 1;
        let from_a = answers(apply(&mut a, index, entry, seed));
        let from_b = answers(apply(&mut b, index, entry, seed));
        let from_c = answers(apply(&mut c, index, entry, seed));
        assert_eq!(
            from_a, from_b,
            "seed {seed}: entry {index} answered differently after a restart"
        );
        assert_eq!(
            from_a, from_c,
            "seed {seed}: entry {index} answered differently after a snapshot"
        );
        if index.is_multiple_of(37) {
            drop(b);
            b = open("b");
        }
        if index.is_multiple_of(53) {
            let copy = dir.path().join("snapshot.sqlite");
            state::copy_to(&Connection::open(path("a")).unwrap(), &copy).unwrap();
            c.restore(&copy).unwrap();
        }
    }
    let (da, db, dc) = (dump(&path("a")), dump(&path("b")), dump(&path("c")));
    assert!(
        da == db,
        "seed {seed}: a restarted node diverged: {}",
        first_difference(&da, &db)
    );
    assert!(
        da == dc,
        "seed {seed}: a node from a snapshot diverged: {}",
        first_difference(&da, &dc)
    );
    assert!(!attach.exists(), "seed {seed}: a file was made through SQL");
    let rows = da.lines().filter(|l| l.starts_with("INSERT INTO")).count();
    assert!(
        rows > 50,
        "seed {seed}: the workload wrote {rows} rows; it should write more"
    );
}

#[test]
fn hostile_entries_leave_every_node_identical() {
    let count = std::env::var("SCALEOUT_APPLY_ENTRIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    match std::env::var("SCALEOUT_APPLY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => run(seed, count),
        None => (1..=6).for_each(|seed| run(seed, count)),
    }
}
