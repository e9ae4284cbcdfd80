//! rqlite's documented behaviour, one test per difference a client of
//! rqlite would trip over, against a real `scaleout db` node (the
//! differences were found by running rqlite's own clients: issue 15).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::client;
use common::db::{leader_of, urlencode, voters, DbNode};
use serde_json::{json, Value};

async fn one_node() -> (tempfile::TempDir, DbNode) {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = voters(dir.path(), 1, &[]).await;
    leader_of(&nodes).await;
    (dir, nodes.remove(0))
}

/// POST `body` to `path`; the status and the raw text.
async fn post_text(node: &DbNode, path: &str, body: &str) -> (u16, String) {
    let r = client()
        .post(node.url(path))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn post(node: &DbNode, path: &str, body: Value) -> Value {
    let (status, text) = post_text(node, path, &body.to_string()).await;
    assert_eq!(status, 200, "{path}: {text}");
    serde_json::from_str(&text).unwrap()
}

async fn get(node: &DbNode, path: &str) -> Value {
    let r = client().get(node.url(path)).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

/// rqlite reads its flags by presence: `?transaction=yes` is a
/// transaction (read by value, it was none, and the first INSERT of a
/// failing pair stayed: a data hazard), and so on for the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_are_read_by_their_presence_whatever_their_value() {
    let (_dir, node) = one_node().await;
    post(&node, "/db/execute", json!(["CREATE TABLE t (x UNIQUE)"])).await;
    for value in ["yes", "false", "0", ""] {
        let answer = post(
            &node,
            &format!("/db/execute?transaction={value}"),
            json!(["INSERT INTO t VALUES (1)", "INSERT INTO t VALUES (1)"]),
        )
        .await;
        assert!(answer["results"][1]["error"].is_string(), "{answer}");
    }
    let count = get(&node, "/db/query?q=SELECT%20count(*)%20FROM%20t").await;
    assert_eq!(
        count["results"][0]["values"],
        json!([[0]]),
        "all or nothing"
    );

    let (_, pretty) = post_text(&node, "/db/query?pretty=no", r#"["SELECT 1 AS one"]"#).await;
    assert!(
        pretty.contains("\n    \"results\": ["),
        "indented 4 spaces: {pretty}"
    );
    let assoc = post(&node, "/db/query?associative=1", json!(["SELECT 1 AS one"])).await;
    assert_eq!(assoc["results"][0]["rows"], json!([{"one": 1}]), "{assoc}");
    let timed = post(&node, "/db/query?timings=on", json!(["SELECT 1"])).await;
    assert!(timed["time"].is_f64(), "{timed}");
}

/// `raft_index` is in an answer only when the request asks for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raft_index_comes_only_when_asked() {
    let (_dir, node) = one_node().await;
    let plain = post(&node, "/db/execute", json!(["CREATE TABLE t (x)"])).await;
    assert!(plain.get("raft_index").is_none(), "{plain}");
    let asked = post(
        &node,
        "/db/execute?raft_index",
        json!(["INSERT INTO t VALUES (1)"]),
    )
    .await;
    let index = asked["raft_index"].as_u64().expect("asked for");
    let read = get(&node, "/db/query?q=SELECT%201").await;
    assert!(read.get("raft_index").is_none(), "{read}");
    let read = get(&node, "/db/query?raft_index&q=SELECT%201").await;
    assert!(read["raft_index"].as_u64().unwrap() >= index, "{read}");
    let mixed = post(&node, "/db/request", json!(["SELECT 1"])).await;
    assert!(mixed.get("raft_index").is_none(), "{mixed}");
}

/// Results carry what the statement did, nothing left over: DDL answers
/// `{}`, zeros are left out as rqlite leaves them out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_reports_no_counters_and_zeros_are_left_out() {
    let (_dir, node) = one_node().await;
    post(&node, "/db/execute", json!(["CREATE TABLE t (x)"])).await;
    let six: Vec<String> = (1..=6)
        .map(|i| format!("INSERT INTO t VALUES ({i})"))
        .collect();
    post(&node, "/db/execute", json!(six)).await;
    let update = post(&node, "/db/execute", json!(["UPDATE t SET x = x + 1"])).await;
    assert_eq!(update["results"][0]["rows_affected"], 6, "{update}");
    let ddl = post(
        &node,
        "/db/execute",
        json!(["CREATE TABLE u (y)", "UPDATE t SET x = 0 WHERE 0"]),
    )
    .await;
    assert_eq!(ddl["results"], json!([{}, {}]), "{ddl}");
    let insert = post(&node, "/db/execute", json!(["INSERT INTO u VALUES (1)"])).await;
    assert_eq!(
        insert["results"],
        json!([{"last_insert_id": 1, "rows_affected": 1}])
    );
}

/// Columns without a declared type take the first row's value's type;
/// `DATE`, `DATETIME` and `TIMESTAMP` columns come back in RFC 3339,
/// `BOOLEAN` ones as booleans (what rqlite's Go driver does, and what
/// pyrqlite's converters expect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_come_from_values_and_times_are_rfc3339() {
    let (_dir, node) = one_node().await;
    let q = urlencode("SELECT COUNT(*), 1.5, 'a', x'00', NULL");
    let r = get(&node, &format!("/db/query?q={q}")).await;
    assert_eq!(
        r["results"][0]["types"],
        json!(["integer", "real", "text", "blob", ""]),
        "{r}"
    );
    post(
        &node,
        "/db/execute",
        json!([
            "CREATE TABLE e (d DATE, dt DATETIME, ts TIMESTAMP, b BOOLEAN, t TEXT)",
            "INSERT INTO e VALUES ('2004-02-14', '2004-02-14 07:15:00', 1076742900, 1, '2004-02-14 07:15:00')",
            "INSERT INTO e VALUES (NULL, 'not a time', '2004-02-14T07:15:00.5+01:00', 0, NULL)"
        ]),
    )
    .await;
    let r = get(&node, "/db/query?q=SELECT%20*%20FROM%20e").await;
    assert_eq!(
        r["results"][0]["types"],
        json!(["date", "datetime", "timestamp", "boolean", "text"])
    );
    assert_eq!(
        r["results"][0]["values"],
        json!([
            [
                "2004-02-14T00:00:00Z",
                "2004-02-14T07:15:00Z",
                "2004-02-14T07:15:00Z",
                true,
                "2004-02-14 07:15:00"
            ],
            [
                null,
                "0001-01-01T00:00:00Z",
                "2004-02-14T07:15:00.5+01:00",
                false,
                null
            ]
        ]),
        "{r}"
    );
}

/// `/db/request` with reads among writes: the reads keep their rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_request_answers_its_reads_with_rows() {
    let (_dir, node) = one_node().await;
    post(&node, "/db/execute", json!(["CREATE TABLE t (x)"])).await;
    let r = post(
        &node,
        "/db/request",
        json!([
            "SELECT count(*) FROM t",
            "INSERT INTO t VALUES (5)",
            "SELECT x FROM t"
        ]),
    )
    .await;
    assert_eq!(r["results"][0]["values"], json!([[0]]), "{r}");
    assert_eq!(r["results"][1]["rows_affected"], 1, "{r}");
    assert_eq!(r["results"][2]["values"], json!([[5]]), "{r}");
}

/// `/db/load` with SQL text answers like an execute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_of_sql_answers_like_an_execute() {
    let (_dir, node) = one_node().await;
    let (status, text) = post_text(
        &node,
        "/db/load",
        "CREATE TABLE t (x); INSERT INTO t VALUES (1); INSERT INTO t VALUES (2);",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        answer["results"],
        json!([{"last_insert_id": 2, "rows_affected": 2}]),
        "{answer}"
    );
}

/// `/status` has what rqlite's clients read: `store.ready` (rqlite-js
/// waits on it), the Raft state in rqlite's words, the indexes, and the
/// `http`, `runtime` and `sqlite3` sections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_has_the_fields_rqlite_clients_read() {
    let (_dir, node) = one_node().await;
    let w = post(
        &node,
        "/db/execute?raft_index",
        json!(["CREATE TABLE t (x)"]),
    )
    .await;
    let index = w["raft_index"].as_u64().unwrap();
    let s = node.status().await;
    let store = &s["store"];
    assert_eq!(store["ready"], true, "{s}");
    assert_eq!(store["raft"]["state"], "Leader", "{s}");
    for field in ["commit_index", "applied_index", "last_log_index"] {
        assert!(
            store["raft"][field].as_u64().unwrap() >= index,
            "{field}: {s}"
        );
    }
    assert!(store["raft"]["last_snapshot_index"].is_u64(), "{s}");
    assert!(store["fsm_index"].as_u64().unwrap() >= index, "{s}");
    assert!(store["db_applied_index"].as_u64().unwrap() >= index, "{s}");
    assert!(
        store["sqlite3"]["version"]
            .as_str()
            .unwrap()
            .starts_with('3'),
        "{s}"
    );
    assert_eq!(s["http"]["auth"], "disabled", "{s}");
    assert!(s["http"]["bind_addr"].is_string(), "{s}");
    assert!(s["runtime"]["num_cpu"].as_u64().unwrap() >= 1, "{s}");
}

/// A second rqlite client beside pyrqlite: SQLAlchemy's ORM through the
/// rqlite dialect (`sqlalchemy-rqlite` and its `pyrqlite`, unchanged from
/// PyPI), through a follower. It failed on connecting while reads of
/// settings such as `PRAGMA read_uncommitted` were refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlalchemy_through_the_rqlite_dialect_works_through_a_follower() {
    let path = common::db::python_packages(
        "sqlalchemy-rqlite",
        &["sqlalchemy-rqlite"],
        "import sqlalchemy_rqlite, sqlalchemy.orm",
    );
    let dir = tempfile::tempdir().unwrap();
    let nodes = voters(dir.path(), 2, &[]).await;
    leader_of(&nodes).await;
    let follower = nodes[1].api.trim_start_matches("http://").to_string();
    let (host, port) = follower.rsplit_once(':').unwrap();
    let args = [host.to_string(), port.to_string()];
    let (ok, said) = common::db::python_client("sqlalchemy_check.py", &args, path).await;
    assert!(ok, "sqlalchemy: {said}");
}

/// `/nodes` says why a node is unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_say_why_a_node_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = voters(dir.path(), 3, &[]).await;
    leader_of(&nodes).await;
    let mut gone = nodes.remove(2);
    gone.proc.signal(nix::sys::signal::Signal::SIGKILL);
    gone.proc.wait_exit(std::time::Duration::from_secs(5));
    let listed = get(&nodes[0], "/nodes?ver=2&timeout=500ms").await;
    let all = listed["nodes"].as_array().unwrap();
    for n in all {
        if n["id"] == "3" {
            assert_eq!(n["reachable"], false, "{listed}");
            let why = n["error"]
                .as_str()
                .unwrap_or_else(|| panic!("no error: {listed}"));
            assert!(why.contains("health check"), "{why}");
        } else {
            assert_eq!(n["reachable"], true, "{listed}");
            assert!(n.get("error").is_none(), "{listed}");
        }
    }
    assert_eq!(all.len(), 3, "{listed}");
}

/// `?queue`: answered at once with a sequence number, written soon after;
/// `?queue&wait` answers once the write is in. Sequence numbers grow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_writes_answer_a_sequence_number_and_land() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = voters(dir.path(), 2, &[]).await;
    leader_of(&nodes).await;
    post(&nodes[0], "/db/execute", json!(["CREATE TABLE q (x)"])).await;
    let mut last = 0;
    for i in 0..20 {
        // Through the follower too: it forwards to the leader.
        let node = &nodes[i % 2];
        let a = post(
            node,
            "/db/execute?queue",
            json!([["INSERT INTO q VALUES (?)", i]]),
        )
        .await;
        assert_eq!(a["results"], json!([]), "{a}");
        let seq = a["sequence_number"].as_u64().expect("a sequence number");
        assert!(seq > last, "{seq} after {last}");
        last = seq;
    }
    let a = post(
        &nodes[0],
        "/db/execute?queue&wait",
        json!(["INSERT INTO q VALUES (99)"]),
    )
    .await;
    assert!(a["sequence_number"].as_u64().unwrap() > last, "{a}");
    let count = get(
        &nodes[0],
        "/db/query?level=strong&q=SELECT%20count(*)%20FROM%20q",
    )
    .await;
    assert_eq!(count["results"][0]["values"], json!([[21]]), "{count}");
}

/// `/debug/vars`: the command line and the node's counters as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_vars_are_json() {
    let (_dir, node) = one_node().await;
    post(&node, "/db/execute", json!(["CREATE TABLE t (x)"])).await;
    let vars = get(&node, "/debug/vars").await;
    assert!(
        vars["cmdline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "db"),
        "{vars}"
    );
    assert!(
        vars["http"]["write"]["requests"].as_u64().unwrap() >= 1,
        "{vars}"
    );
    assert!(
        vars["store"]["applied_index"].as_u64().unwrap() >= 1,
        "{vars}"
    );
}

/// A node restarted on its data with `--join` to a cluster that is not
/// its own exits with an error saying so (as rqlite does), instead of
/// running on beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_joining_another_cluster_exits_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut ours = voters(dir.path(), 2, &[]).await;
    leader_of(&ours).await;
    let other_dir = tempfile::tempdir().unwrap();
    let theirs = DbNode::start(7, other_dir.path(), &[]);
    leader_of(std::slice::from_ref(&theirs)).await;
    let mut second = ours.remove(1);
    second.proc.signal(nix::sys::signal::Signal::SIGTERM);
    second.proc.wait_exit(std::time::Duration::from_secs(10));
    let data = second.data.to_str().unwrap().to_string();
    let mut restarted = common::Proc::spawn_logging(
        &[
            "db",
            "--id",
            "2",
            "--http",
            "127.0.0.1:0",
            "--raft",
            "127.0.0.1:0",
            "--data",
            &data,
            "--join",
            &theirs.api,
        ],
        "error",
    );
    let status = restarted.wait_exit(std::time::Duration::from_secs(30));
    assert!(!status.success(), "it ran on");
    let said = restarted.logs().join("\n");
    assert!(said.contains("does not have node 2"), "{said}");
    // The other cluster is untouched.
    let listed = get(&theirs, "/nodes?nonvoters&ver=2").await;
    assert_eq!(listed["nodes"].as_array().unwrap().len(), 1, "{listed}");
}

/// A node restarted with its data on new addresses and `--join` is
/// registered again: the leader sends to where it is now, and it catches
/// up and votes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_new_addresses_registers_them_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = voters(dir.path(), 3, &[]).await;
    leader_of(&nodes).await;
    post(&nodes[0], "/db/execute", json!(["CREATE TABLE t (x)"])).await;
    let mut third = nodes.remove(2);
    third.proc.signal(nix::sys::signal::Signal::SIGTERM);
    third.proc.wait_exit(std::time::Duration::from_secs(10));
    let w = post(
        &nodes[0],
        "/db/execute?raft_index",
        json!(["INSERT INTO t VALUES (1)"]),
    )
    .await;
    let index = w["raft_index"].as_u64().unwrap();
    // Back on other ports (0: the OS picks new ones).
    let moved = DbNode::start(3, dir.path(), &["--join", &nodes[0].api]);
    assert_ne!(moved.raft, third.raft);
    let rows = moved.values_at("SELECT x FROM t", index).await;
    assert_eq!(rows, json!([[1]]));
    let listed = get(&nodes[0], "/nodes?ver=2").await;
    let me = listed["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "3")
        .cloned()
        .unwrap();
    assert_eq!(me["addr"], moved.raft, "{listed}");
    assert_eq!(me["reachable"], true, "{listed}");
    // It votes: with the old third gone, a quorum needs it.
    let mut first = nodes.remove(0);
    first.proc.signal(nix::sys::signal::Signal::SIGKILL);
    first.proc.wait_exit(std::time::Duration::from_secs(5));
    let survivors = [nodes.remove(0), moved];
    let leader = leader_of(&survivors).await;
    let w = post(
        &survivors[leader],
        "/db/execute",
        json!(["INSERT INTO t VALUES (2)"]),
    )
    .await;
    assert!(w["results"][0].get("error").is_none(), "{w}");
}

/// Node ids are names, as rqlite's: `0` and `db-b` work, and `/status`,
/// `/nodes`, `/leader` and `/remove` use them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ids_are_names_as_in_rqlite() {
    let dir = tempfile::tempdir().unwrap();
    let data = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let (d0, db) = (data("n0"), data("nb"));
    let args = |id: &'static str, data: &str, join: Option<&str>| {
        let mut a: Vec<String> = [
            "db",
            "--id",
            id,
            "--http",
            "127.0.0.1:0",
            "--raft",
            "127.0.0.1:0",
            "--data",
            data,
            "--election-timeout",
            "500ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(j) = join {
            a.extend(["--join".to_string(), j.to_string()]);
        }
        a
    };
    let start = |a: Vec<String>| {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let mut p = common::Proc::spawn(&refs);
        let ready = p.wait_ready();
        (p, ready.url, ready.name)
    };
    let (_p0, url0, name0) = start(args("0", &d0, None));
    assert_eq!(name0.as_deref(), Some("0"));
    let (_pb, _urlb, _) = start(args("db-b", &db, Some(&url0)));
    let listed = common::eventually_json(&format!("{url0}/nodes?ver=2"), |v| {
        v["nodes"].as_array().is_some_and(|n| n.len() == 2)
    })
    .await;
    let mut ids: Vec<&str> = listed["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["0", "db-b"], "{listed}");
    let status: Value = common::get_json(&format!("{url0}/status")).await;
    assert_eq!(status["node"]["id"], "0", "{status}");
    assert_eq!(status["store"]["leader"]["node_id"], "0", "{status}");
    let leader: Value = common::get_json(&format!("{url0}/leader")).await;
    assert_eq!(leader["leader"]["id"], "0", "{leader}");
    let removed = client()
        .delete(format!("{url0}/remove"))
        .json(&json!({"id": "db-b"}))
        .send()
        .await
        .unwrap();
    assert!(
        removed.status().is_success(),
        "{}",
        removed.text().await.unwrap()
    );
    let listed: Value = common::get_json(&format!("{url0}/nodes?ver=2&nonvoters")).await;
    assert_eq!(listed["nodes"].as_array().unwrap().len(), 1, "{listed}");
}

/// rqlite's `POST /leader`: `{"id": N}` hands the leadership to that
/// voter (sent to a follower, it is forwarded), `?wait` answers once it
/// leads; writes sent meanwhile are held and then served by the new
/// leader, none lost. Without an id, another voter takes over. The
/// leader itself, an unknown node, a read replica or a malformed body
/// are refused with a JSON error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_is_handed_to_the_voter_named() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = voters(dir.path(), 3, &[]).await;
    let replica = DbNode::start(4, dir.path(), &["--join", &nodes[0].api, "--read-only"]);
    common::eventually_json(&nodes[0].url("/nodes?nonvoters&ver=2"), |v| {
        v["nodes"].as_array().is_some_and(|n| n.len() == 4)
    })
    .await;
    let old = leader_of(&nodes).await;
    let target = (old + 1) % 3;
    let asked = (old + 2) % 3;
    let target_id = (target + 1).to_string();
    post(
        &nodes[old],
        "/db/execute",
        json!(["CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"]),
    )
    .await;

    // Writes go on through the node asked, while it hands over.
    let writer_url = nodes[asked].url("/db/execute");
    let writes = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0..40 {
            let r = client()
                .post(&writer_url)
                .json(&json!([["INSERT INTO t (v) VALUES (?)", format!("w{i}")]]))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap();
            // Held while the leadership moves, then served (forwarded a
            // second time when the leader it reached handed over).
            assert_eq!(status, 200, "{body}");
            assert!(body["results"][0].get("error").is_none(), "{body}");
            acked.push(format!("w{i}"));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        acked
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let (status, text) = post_text(
        &nodes[asked],
        "/leader?wait",
        &json!({ "id": target_id }).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["leader"]["id"], target_id.as_str(), "{answer}");
    for n in nodes.iter().chain([&replica]) {
        common::eventually_json(&n.url("/leader"), |v| {
            v["leader"]["id"] == target_id.as_str()
        })
        .await;
    }
    assert_eq!(nodes[target].role().await.as_deref(), Some("Leader"));
    let acked = writes.await.unwrap();
    let stored = post(
        &nodes[target],
        "/db/query?level=strong",
        json!(["SELECT v FROM t"]),
    )
    .await;
    let stored: Vec<&str> = stored["results"][0]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row[0].as_str().unwrap())
        .collect();
    for v in &acked {
        assert!(
            stored.contains(&v.as_str()),
            "{v} acknowledged but lost: {stored:?}"
        );
    }

    // Refusals, each with a JSON error.
    for (body, want) in [
        (json!({ "id": target_id }).to_string(), 400),
        (json!({ "id": "99" }).to_string(), 404),
        (json!({ "id": "4" }).to_string(), 400),
        ("{\"id\": [1]}".to_string(), 400),
        ("not json".to_string(), 400),
    ] {
        let (status, text) = post_text(&nodes[old], "/leader?wait", &body).await;
        assert_eq!(status, want, "{body}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap();
        assert!(
            error["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{text}"
        );
    }
    assert_eq!(nodes[target].role().await.as_deref(), Some("Leader"));

    // Handed to every voter in turn, whatever its id against the
    // others' (the lowest id does not take it instead), the key in any
    // case as rqlite's decoder reads it.
    let mut leader_id = target_id.clone();
    for next in ["1", "3", "2", "1", "2", "3"] {
        if next == leader_id {
            continue;
        }
        let (status, text) = post_text(
            &nodes[0],
            "/leader?wait",
            &json!({ "ID": next }).to_string(),
        )
        .await;
        assert_eq!(status, 200, "to {next}: {text}");
        let answer: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(answer["leader"]["id"], next, "{answer}");
        leader_id = next.to_string();
    }
    // A request to stand from another term (one that waited) is refused.
    let follower = nodes
        .iter()
        .find(|n| n.id.to_string() != leader_id)
        .unwrap();
    let r = client()
        .post(format!("http://{}/raft/elect", follower.raft))
        .json(&json!({ "term": 1 }))
        .send()
        .await
        .unwrap();
    let refused: Value = r.json().await.unwrap();
    assert!(
        refused["Err"].as_str().is_some_and(|e| e.contains("term")),
        "{refused}"
    );
    let target_id = leader_id;
    let target = nodes
        .iter()
        .position(|n| n.id.to_string() == target_id)
        .unwrap();

    // No id, no wait: answered at once, and another voter soon leads.
    let (status, text) = post_text(&nodes[target], "/leader", "").await;
    assert_eq!(status, 200, "{text}");
    let moved = common::eventually_json(&nodes[target].url("/leader"), |v| {
        v["leader"]["id"]
            .as_str()
            .is_some_and(|id| id != target_id && id != "4")
    })
    .await;
    assert_ne!(moved["leader"]["id"], target_id.as_str(), "{moved}");
}
