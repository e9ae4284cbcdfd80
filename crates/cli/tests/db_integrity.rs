//! Data integrity under any SQL, against clusters of real `scaleout db`
//! processes: no acknowledged write lost, every node identical, no
//! statement able to stop the cluster — whatever a careless or hostile
//! client sends. Each finding of issue 12 is a named test here; the
//! differential fuzzer at the end sends random SQL from a grammar of
//! such statements and checks the three guarantees.
//!
//! The grammar is the chaos run's hostile workload
//! (`scaleout_lab::chaos::hostile`). The fuzzer runs with a fixed seed and a bounded number of requests;
//! `SCALEOUT_FUZZ_SEED` and `SCALEOUT_FUZZ_REQUESTS` (per client) run it
//! longer by hand.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::db::{error_of, leader_of, post_json, voters, DbNode};
use common::{client, eventually, Proc};
use nix::sys::signal::Signal;
use scaleout_lab::chaos::hostile::{self, Ledger, Rng};
use serde_json::{json, Value};

/// A small budget so that runaway writes stop quickly in a debug build.
const BUDGET: &[&str] = &["--write-budget", "5000000", "--query-timeout", "2s"];

/// Three voters and a read replica; returns them with the leader first
/// in mind (index of the leader).
async fn cluster(dir: &std::path::Path) -> (Vec<DbNode>, usize) {
    let mut nodes = voters(dir, 3, BUDGET).await;
    let mut args = vec!["--join", nodes[0].api.as_str(), "--read-only"];
    args.extend_from_slice(BUDGET);
    let join = nodes[0].url("/nodes?nonvoters");
    nodes.push(DbNode::start(4, dir, &args));
    eventually(Duration::from_secs(20), "the replica joined", || {
        let url = join.clone();
        async move {
            let v: Value = common::get_json(&url).await;
            v.as_object().is_some_and(|m| m.len() == 4)
        }
    })
    .await;
    let leader = leader_of(&nodes).await;
    (nodes, leader)
}

/// One write request; `(status, answer)`.
async fn write(node: &DbNode, body: Value, transaction: bool) -> (u16, Value) {
    write_to(&node.api, body, transaction).await
}

/// One write request to the node whose API is `api`.
async fn write_to(api: &str, body: Value, transaction: bool) -> (u16, Value) {
    let path = if transaction {
        "/db/execute?transaction&raft_index"
    } else {
        "/db/execute?raft_index"
    };
    post_json(&format!("{api}{path}"), &body).await
}

/// The nodes' API URLs, for tasks (a node's process handle stays here).
fn apis(nodes: &[DbNode]) -> std::sync::Arc<Vec<String>> {
    std::sync::Arc::new(nodes.iter().map(|n| n.api.clone()).collect())
}

fn errors(answer: &Value) -> Vec<String> {
    answer["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["error"].as_str().map(String::from))
        .collect()
}

/// A write everyone must see, and the index that committed it.
async fn ok_write(node: &DbNode, body: Value) -> u64 {
    let (status, answer) = write(node, body, false).await;
    assert_eq!(status, 200, "{answer}");
    assert!(errors(&answer).is_empty(), "{answer}");
    answer["raft_index"].as_u64().unwrap()
}

/// Every node holds the same schema, rows and rowids once `index` is
/// applied everywhere.
async fn assert_identical(nodes: &[DbNode], index: u64) -> Value {
    let first = nodes[0].contents(index).await;
    for node in &nodes[1..] {
        let other = node.contents(index).await;
        assert_eq!(
            first, other,
            "node {} differs from node {}",
            node.id, nodes[0].id
        );
    }
    first
}

/// The cluster still takes writes, and every node says it is ready.
async fn assert_serving(nodes: &[DbNode], leader: usize) {
    let index = ok_write(
        &nodes[leader],
        json!([
            "CREATE TABLE IF NOT EXISTS alive (x)",
            "INSERT INTO alive VALUES (1)"
        ]),
    )
    .await;
    for node in nodes {
        node.values_at("SELECT count(*) FROM alive", index).await;
        let ready = client().get(node.url("/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 200, "node {} not ready", node.id);
    }
}

/// 8 clients insert rows while others send ROLLBACK spelled so that a
/// text filter misses it, COMMIT after a comment, and inserts that fire
/// a trigger's RAISE(ROLLBACK): every acknowledged row is on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_in_any_spelling_loses_no_other_clients_write() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, leader) = cluster(dir.path()).await;
    ok_write(
        &nodes[leader],
        json!([
            "CREATE TABLE rows (client INTEGER, seq INTEGER, PRIMARY KEY (client, seq))",
            "CREATE TABLE bad (x)",
            "CREATE TRIGGER boom AFTER INSERT ON bad BEGIN SELECT RAISE(ROLLBACK, 'boom'); END"
        ]),
    )
    .await;
    let urls = apis(&nodes);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..8u64 {
        let nodes = urls.clone();
        tasks.spawn(async move {
            let mut acked = Vec::new();
            for seq in 0..40u64 {
                let node = &nodes[((c + seq) % 4) as usize];
                let (status, answer) = write_to(
                    node,
                    json!([["INSERT INTO rows VALUES (?, ?)", c, seq]]),
                    false,
                )
                .await;
                if status == 200 && errors(&answer).is_empty() {
                    acked.push((c, seq));
                }
            }
            acked
        });
    }
    for c in 0..3u64 {
        let nodes = urls.clone();
        tasks.spawn(async move {
            let hostile = [
                json!(["/**/ROLLBACK"]),
                json!(["-- comment\nCOMMIT"]),
                json!(["INSERT INTO bad VALUES (1)"]),
            ];
            for i in 0..40u64 {
                let (status, answer) =
                    write_to(&nodes[(i % 3) as usize], hostile[c as usize].clone(), false).await;
                assert_eq!(status, 200, "{answer}");
                assert_eq!(errors(&answer).len(), 1, "refused or failed: {answer}");
            }
            Vec::new()
        });
    }
    let mut acked = Vec::new();
    while let Some(done) = tasks.join_next().await {
        acked.extend(done.unwrap());
    }
    assert!(
        acked.len() >= 300,
        "most writes acknowledged: {}",
        acked.len()
    );
    let index = ok_write(&nodes[leader], json!(["SELECT 1"])).await;
    let contents = assert_identical(&nodes, index).await;
    let stored: BTreeSet<(u64, u64)> = contents["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[1].as_u64().unwrap(), r[2].as_u64().unwrap()))
        .collect();
    for row in &acked {
        assert!(stored.contains(row), "acknowledged {row:?} lost");
    }
    assert!(
        contents.get("bad").is_some_and(Value::is_null),
        "RAISE(ROLLBACK) left nothing: {}",
        contents["bad"]
    );
}

/// Each form the old text rewriting missed stores the same value on
/// every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_deterministic_sql_stores_the_same_values_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, leader) = cluster(dir.path()).await;
    ok_write(&nodes[leader], json!(["CREATE TABLE v (what, value)"])).await;
    let forms = [
        json!(["INSERT INTO v VALUES ('randomblob', hex(randomblob(length('abcdefgh'))))"]),
        json!(["INSERT INTO v VALUES ('double quotes', strftime('%Y-%m-%d %H:%M:%f', \"now\"))"]),
        json!([[
            "INSERT INTO v VALUES ('parameter', strftime('%Y-%m-%d %H:%M:%f', ?))",
            "now"
        ]]),
        json!(["INSERT INTO v VALUES ('no time', strftime('%Y-%m-%d %H:%M:%f'))"]),
        json!(["INSERT INTO v VALUES ('concatenated', julianday('no'||'w'))"]),
        json!(["INSERT INTO v VALUES ('random', random())"]),
        json!([
            "CREATE TABLE d (x, at DEFAULT CURRENT_TIMESTAMP, r DEFAULT (random()))",
            "INSERT INTO d (x) VALUES (1)"
        ]),
        json!(["INSERT INTO v SELECT 'changes', changes()"]),
    ];
    for form in forms {
        ok_write(&nodes[leader], form).await;
    }
    let (status, answer) = write(
        &nodes[leader],
        json!(["INSERT INTO v VALUES ('total', total_changes())"]),
        false,
    )
    .await;
    assert_eq!(status, 200);
    assert!(errors(&answer)[0].contains("total_changes"), "{answer}");
    let index = ok_write(&nodes[leader], json!(["SELECT 1"])).await;
    let contents = assert_identical(&nodes, index).await;
    assert_eq!(contents["v"].as_array().unwrap().len(), 7, "{contents}");
}

/// A SQLite file holding a trigger on the node's own table: the load is
/// refused, the old data stays, the cluster goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_reaches_for_the_nodes_state_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, leader) = cluster(dir.path()).await;
    ok_write(
        &nodes[leader],
        json!(["CREATE TABLE keep (x)", "INSERT INTO keep VALUES (42)"]),
    )
    .await;
    let file = dir.path().join("evil.sqlite");
    {
        let c = rusqlite::Connection::open(&file).unwrap();
        c.execute_batch(
            "CREATE TABLE _scaleout_applied (id INTEGER PRIMARY KEY, log_index, term, leader, membership);
             CREATE TABLE other (x); INSERT INTO other VALUES (1);
             CREATE TRIGGER evil AFTER UPDATE ON _scaleout_applied BEGIN DELETE FROM other; END;",
        )
        .unwrap();
    }
    let bytes = std::fs::read(&file).unwrap();
    let r = client()
        .post(nodes[leader].url("/db/load"))
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let answer: Value = r.json().await.unwrap();
    assert_eq!(status, 400, "{answer}");
    assert!(answer.to_string().contains("reserved"), "{answer}");
    let index = ok_write(&nodes[leader], json!(["INSERT INTO keep VALUES (43)"])).await;
    let contents = assert_identical(&nodes, index).await;
    assert_eq!(contents["keep"], json!([[1, 42], [2, 43]]));
    assert!(contents.get("other").is_none());
    assert_serving(&nodes, leader).await;
}

/// A write that would spin forever stops at its budget on every node,
/// its client told so; runaway reads stop at their deadline and give
/// their connection back; ATTACH is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_statements_are_bounded_and_the_cluster_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, leader) = cluster(dir.path()).await;
    ok_write(&nodes[leader], json!(["CREATE TABLE t (x)"])).await;
    let runaway = "INSERT INTO t SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT x FROM c)";
    let (status, answer) = write(
        &nodes[leader],
        json!([runaway, "INSERT INTO t VALUES (1)"]),
        false,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(error_of(&answer, 0).contains("budget"), "{answer}");
    assert!(answer["results"][1]["error"].is_null(), "{answer}");
    // More runaway reads at once than a node has read connections.
    let read =
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c";
    let started = Instant::now();
    let mut reads = tokio::task::JoinSet::new();
    for i in 0..6 {
        let url = format!(
            "{}&db_timeout=500ms",
            nodes[i % 2 + 2].url(&format!(
                "/db/query?level=none&q={}",
                common::db::urlencode(read)
            ))
        );
        reads.spawn(async move {
            let r = client().get(url).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        });
    }
    while let Some(done) = reads.join_next().await {
        let (status, answer) = done.unwrap();
        assert!(
            status == 503
                || answer["results"][0]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("time limit")),
            "{status} {answer}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "reads held for {:?}",
        started.elapsed()
    );
    for node in &nodes {
        let (status, answer) = node.query("SELECT count(*) FROM t", "level=none").await;
        assert_eq!(status, 200, "node {} still reads: {answer}", node.id);
    }
    let attach = dir.path().join("attached.sqlite");
    let (_, answer) = write(
        &nodes[leader],
        json!([format!("ATTACH DATABASE '{}' AS x", attach.display())]),
        false,
    )
    .await;
    assert!(errors(&answer)[0].contains("ATTACH"), "{answer}");
    let (_, answer) = nodes[3]
        .query(
            &format!("ATTACH DATABASE '{}' AS x", attach.display()),
            "level=none",
        )
        .await;
    assert!(answer.to_string().contains("ATTACH"), "{answer}");
    assert!(!attach.exists(), "no file made through SQL");
    let index = ok_write(&nodes[leader], json!(["SELECT 1"])).await;
    assert_identical(&nodes, index).await;
    assert_serving(&nodes, leader).await;
}

/// One process per data directory; and SIGTERM stops a node in the
/// middle of a statement that would run for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_takes_one_node_and_sigterm_interrupts_a_statement() {
    let dir = tempfile::tempdir().unwrap();
    // The default budget: about 4 s of a debug build's steps.
    let budget = ["--write-budget", "100000000"];
    let mut node = DbNode::start(1, dir.path(), &budget);
    let mut second = Proc::spawn(&[
        "db",
        "--id",
        "2",
        "--http",
        "127.0.0.1:0",
        "--raft",
        "127.0.0.1:0",
        "--data",
        node.data.to_str().unwrap(),
    ]);
    let status = second.wait_exit(Duration::from_secs(20));
    assert!(
        !status.success(),
        "a second node on the same directory started"
    );
    leader_of(std::slice::from_ref(&node)).await;
    ok_write(&node, json!(["CREATE TABLE t (x)"])).await;
    let url = node.url("/db/execute");
    let spinning = tokio::spawn(async move {
        let body = json!(["INSERT INTO t SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT x FROM c)"]);
        client()
            .post(url)
            .json(&body)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    node.proc.signal(Signal::SIGTERM);
    // Well before the statement's budget would have stopped it.
    let status = node.proc.wait_exit(Duration::from_secs(3));
    assert!(status.code().is_some(), "exited by itself: {status:?}");
    let _ = spinning.await;
    // The interrupted entry was not half applied: on restart it runs
    // again, stops at its budget as it would have, and the node serves.
    let restarted = node.restart(dir.path(), &budget);
    leader_of(std::slice::from_ref(&restarted)).await;
    // The replay takes the statement's whole budget first: on a loaded
    // machine one attempt may outlast the client's own 10 s timeout, so
    // a timed-out attempt is tried again, within the same deadline.
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = restarted.url("/db/execute?raft_index");
    let index = loop {
        let sent = client()
            .post(&url)
            .json(&json!(["INSERT INTO t VALUES (7)"]))
            .send()
            .await;
        let answer = match sent {
            Ok(r) if r.status() == 200 => {
                let answer: Value = r.json().await.unwrap();
                assert!(errors(&answer).is_empty(), "{answer}");
                break answer["raft_index"].as_u64().unwrap();
            }
            Ok(r) => format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "no write taken after the restart: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // (A timed-out attempt may have been applied too: DISTINCT.)
    let rows = restarted.values_at("SELECT DISTINCT x FROM t", index).await;
    assert_eq!(rows, json!([[7]]), "the runaway insert left nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_fuzz_of_hostile_sql_against_a_cluster() {
    let seed: u64 = std::env::var("SCALEOUT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let per_client: u64 = std::env::var("SCALEOUT_FUZZ_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().unwrap();
    let (nodes, leader) = cluster(dir.path()).await;
    ok_write(&nodes[leader], json!(hostile::SCHEMA)).await;
    let urls = apis(&nodes);
    let attach = dir.path().join("attached.sqlite");
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..6u64 {
        let nodes = urls.clone();
        let attach = attach.display().to_string();
        clients.spawn(async move {
            let mut rng = Rng(seed.wrapping_mul(1000).wrapping_add(c));
            let mut outcomes = Vec::new();
            for seq in 0..per_client {
                let req = hostile::request(&mut rng, c, seq, &attach, true);
                let node = &nodes[rng.below(4) as usize];
                let (status, answer) = write_to(node, req.body.clone(), req.transaction).await;
                assert!(
                    status == 200 || status == 503 || status == 504,
                    "seed {seed}: {status} {answer}"
                );
                outcomes.push((c, seq, hostile::ledger_outcome(&req, status, &answer)));
                // Now and then a runaway read on some node.
                if rng.below(10) == 0 {
                    let read = common::db::urlencode(
                        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c",
                    );
                    let url = format!(
                        "{}/db/query?level=none&db_timeout=200ms&q={read}",
                        nodes[rng.below(4) as usize]
                    );
                    let r = client().get(url).send().await.unwrap();
                    let status = r.status().as_u16();
                    let answer = r.text().await.unwrap();
                    assert!(status == 200 || status == 503, "{status} {answer}");
                }
            }
            outcomes
        });
    }
    let mut outcomes = Vec::new();
    while let Some(done) = clients.join_next().await {
        outcomes.extend(done.unwrap());
    }
    let index = ok_write(&nodes[leader], json!(["SELECT 1"])).await;
    let contents = assert_identical(&nodes, index).await;
    let stored: BTreeSet<(u64, u64)> = contents["hostile_ledger"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[1].as_u64().unwrap(), r[2].as_u64().unwrap()))
        .collect();
    let (mut acknowledged, mut refused) = (0, 0);
    for (c, s, outcome) in &outcomes {
        match outcome {
            Ledger::Acknowledged => {
                acknowledged += 1;
                assert!(
                    stored.contains(&(*c, *s)),
                    "seed {seed}: acknowledged ({c}, {s}) lost"
                );
            }
            Ledger::Refused => {
                refused += 1;
                assert!(
                    !stored.contains(&(*c, *s)),
                    "seed {seed}: refused ({c}, {s}) stored"
                );
            }
            Ledger::Unknown => {}
            Ledger::Unreadable => {
                panic!("seed {seed}: ({c}, {s}) was answered 200 without readable results")
            }
        }
    }
    eprintln!(
        "fuzz seed {seed}: {} requests, {acknowledged} ledger rows acknowledged, {refused} refused, {} stored",
        outcomes.len(),
        stored.len()
    );
    assert!(
        acknowledged > 0 && refused > 0,
        "the workload exercised both"
    );
    assert!(!attach.exists(), "no file made through SQL");
    assert_serving(&nodes, leader).await;
}

/// A replica that hears no leader says it is not ready (it kept saying
/// "leader ok" about the last leader it knew, long after it was gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_hears_no_leader_is_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, _) = cluster(dir.path()).await;
    let replica = nodes.pop().unwrap();
    let ready = replica.url("/readyz");
    common::eventually_status(Duration::from_secs(10), "the replica is ready", &ready, 200).await;
    for voter in &nodes {
        voter.proc.signal(Signal::SIGKILL);
    }
    common::eventually_status(
        Duration::from_secs(15),
        "the replica says it is not ready",
        &ready,
        503,
    )
    .await;
}

/// What a write may honestly be answered while two cores apply a large
/// entry on three debug-built nodes: with the CPU that busy, a follower
/// can miss heartbeats for longer than an election takes to start, and
/// the cluster elects a leader again. Writes then get "no leader" (not
/// done: try again) or "outcome unknown" (a leader stepped aside with
/// them pending), never a wrong answer.
fn honest(status: u16, answer: &Value) -> bool {
    matches!(
        (status, answer["code"].as_str()),
        (503, Some("no_leader" | "not_leader")) | (504, Some("outcome_unknown"))
    )
}

/// One request of 10,000 statements beside concurrent writers: it is
/// applied, and the others' writes go on (a payload that could not cross
/// within openraft's heartbeat interval was sent again forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_write_is_replicated_and_the_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, leader) = cluster(dir.path()).await;
    ok_write(
        &nodes[leader],
        json!(["CREATE TABLE big (x)", "CREATE TABLE small (x)"]),
    )
    .await;
    let urls = apis(&nodes);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4u64 {
        let (urls, stop) = (urls.clone(), stop.clone());
        writers.spawn(async move {
            let (mut ok, mut other) = (0, Vec::new());
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let (status, answer) = write_to(
                    &urls[(w % 3) as usize],
                    json!([["INSERT INTO small VALUES (?)", i]]),
                    false,
                )
                .await;
                if status == 200 && errors(&answer).is_empty() {
                    ok += 1;
                } else if !honest(status, &answer) {
                    other.push(format!("{status} {answer}"));
                }
            }
            (ok, other)
        });
    }
    let statements: Vec<Value> = (0..10000)
        .map(|i| json!(["INSERT INTO big VALUES (?)", format!("{i:0>40}")]))
        .collect();
    let mut tries = 0;
    let index = loop {
        tries += 1;
        let (status, answer) =
            write_to(&urls[leader], Value::Array(statements.clone()), false).await;
        if status == 200 {
            assert!(errors(&answer).is_empty(), "{answer}");
            break answer["raft_index"].as_u64().unwrap();
        }
        // No leader for a moment, or the outcome unknown (a leader
        // stepped aside with it pending): it is all there or none of it,
        // never part; sent again only if none.
        assert!(honest(status, &answer), "{status} {answer}");
        // Asked through the log (strong), once a leader answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        let (count, seen) = loop {
            let leader = common::db::leader_of(&nodes).await;
            let (_, seen) = nodes[leader]
                .query("SELECT count(*) FROM big", "level=strong")
                .await;
            if let Some(count) = seen["results"][0]["values"][0][0].as_u64() {
                break (count, seen);
            }
            assert!(Instant::now() < deadline, "no strong read: {seen}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(
            count == 0 || count == 10000,
            "part of a write: {count} rows"
        );
        if count == 10000 {
            break seen["raft_index"].as_u64().unwrap();
        }
        assert!(tries < 3, "the large write never went in: {answer}");
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(done) = writers.join_next().await {
        let (ok, other) = done.unwrap();
        assert!(ok > 0, "a writer got nothing done: {other:?}");
        assert!(
            other.is_empty(),
            "writes failed beside the large one: {other:?}"
        );
    }
    for node in nodes.iter() {
        assert_eq!(
            node.values_at("SELECT count(*) FROM big", index).await,
            json!([[10000]])
        );
    }
}

/// A read whose `min_index` the cluster never reached is refused at
/// once, on the leader and on a replica, with a code a client can act on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_min_index_beyond_the_log_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, leader) = cluster(dir.path()).await;
    let index = ok_write(&nodes[leader], json!(["CREATE TABLE t (x)"])).await;
    for node in [&nodes[leader], &nodes[3]] {
        let started = Instant::now();
        let (status, answer) = node
            .query("SELECT 1", &format!("level=none&min_index={}", u64::MAX))
            .await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["code"], "min_index_ahead_of_log", "{answer}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        // An index a write returned is waited for, not refused.
        let (status, answer) = node
            .query("SELECT 1", &format!("level=none&min_index={index}"))
            .await;
        assert_eq!(status, 200, "{answer}");
    }
}

/// Unmounts a test's small filesystem, even when the test fails.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A node whose disk fills stops applying rather than answer as if the
/// write had failed on the client's account (another node, with room,
/// applies it), and says it is not ready. Runs where a tmpfs can be
/// mounted (root); skipped with a note elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_disk_fills_stops_applying_and_is_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a small tmpfs here");
        return;
    }
    let _unmount = Mounted(small.clone());
    let node = DbNode::start(1, &small, &[]);
    leader_of(std::slice::from_ref(&node)).await;
    ok_write(&node, json!(["CREATE TABLE t (b)"])).await;
    let mut stopped = false;
    for _ in 0..40 {
        let (status, answer) = write(
            &node,
            json!(["INSERT INTO t VALUES (zeroblob(500000))"]),
            false,
        )
        .await;
        if status != 200 || !errors(&answer).is_empty() {
            assert!(
                status >= 500,
                "a full disk is the node's fault, not an answer about the SQL: {status} {answer}"
            );
            stopped = true;
            break;
        }
    }
    assert!(stopped, "4 MiB filled");
    let ready = client().get(node.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains("stopped applying"));
}
