//! Trust in the data tier, against real `scaleout db` processes: users and
//! permissions on the API (`--auth`, rqlite's format), the identity kept
//! when a follower forwards, the cluster secret on Raft RPCs, joins that
//! need a permission, and a web server signing in.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::db::{leader_of, DbNode};
use common::{client, eventually, Proc};
use serde_json::{json, Value};

const USERS: &str = r#"[
  {"username": "ops", "password": "ops-secret", "perms": ["all"]},
  {"username": "writer", "password": "w-secret", "perms": ["execute", "query"]},
  {"username": "reader", "password": "r-secret", "perms": ["query"]},
  {"username": "replica", "password": "j-secret", "perms": ["join-read-only"]},
  {"username": "voter", "password": "v-secret", "perms": ["join"]},
  {"username": "*", "perms": ["status", "ready"]}
]"#;

const SECRET: &str = "a-cluster-secret-of-some-length";

/// Writes the users file, the cluster secret and a credentials file per
/// user into `dir`.
fn secure_files(dir: &std::path::Path) {
    std::fs::write(dir.join("users.json"), USERS).unwrap();
    std::fs::write(dir.join("secret"), SECRET).unwrap();
    for (user, password) in [
        ("ops", "ops-secret"),
        ("writer", "w-secret"),
        ("replica", "j-secret"),
        ("voter", "v-secret"),
        ("reader", "r-secret"),
    ] {
        std::fs::write(
            dir.join(format!("{user}.cred")),
            format!("{user}:{password}\n"),
        )
        .unwrap();
    }
}

fn secure_args(dir: &std::path::Path, join_as: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "--auth".to_string(),
        dir.join("users.json").display().to_string(),
        "--cluster-secret-file".to_string(),
        dir.join("secret").display().to_string(),
    ];
    if let Some(user) = join_as {
        args.push("--join-credentials".into());
        args.push(dir.join(format!("{user}.cred")).display().to_string());
    }
    args
}

fn start(id: u64, dir: &std::path::Path, args: &[String]) -> DbNode {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    DbNode::start(id, dir, &refs)
}

/// A request as `user` (None: anonymous): status and body.
async fn call(
    method: &str,
    url: &str,
    user: Option<(&str, &str)>,
    body: Option<Value>,
) -> (u16, Value, Option<String>) {
    let mut req = match method {
        "POST" => client().post(url),
        "DELETE" => client().delete(url),
        _ => client().get(url),
    };
    if let Some((u, p)) = user {
        req = req.basic_auth(u, Some(p));
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(json!({ "raw": text })),
        challenge,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_permission_is_allowed_and_denied_as_the_users_file_says() {
    let dir = tempfile::tempdir().unwrap();
    secure_files(dir.path());
    let node = start(1, dir.path(), &secure_args(dir.path(), None));
    leader_of(std::slice::from_ref(&node)).await;
    let url = |p: &str| node.url(p);
    let ops = Some(("ops", "ops-secret"));
    let writer = Some(("writer", "w-secret"));
    let reader = Some(("reader", "r-secret"));

    let (s, b, _) = call(
        "POST",
        &url("/db/execute"),
        ops,
        Some(json!(["CREATE TABLE t (x)"])),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, b, challenge) = call(
        "POST",
        &url("/db/execute"),
        None,
        Some(json!(["INSERT INTO t VALUES (1)"])),
    )
    .await;
    assert_eq!(s, 401, "{b}");
    assert_eq!(challenge.as_deref(), Some("Basic realm=\"scaleout\""));
    let (s, b, _) = call(
        "POST",
        &url("/db/execute"),
        reader,
        Some(json!(["INSERT INTO t VALUES (1)"])),
    )
    .await;
    assert_eq!(s, 403, "{b}");
    let (s, b, _) = call(
        "POST",
        &url("/db/execute"),
        writer,
        Some(json!(["INSERT INTO t VALUES (1)"])),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, b, _) = call(
        "POST",
        &url("/db/execute"),
        Some(("writer", "wrong")),
        Some(json!(["INSERT INTO t VALUES (1)"])),
    )
    .await;
    assert_eq!(s, 401, "{b}");
    let (s, b, _) = call(
        "POST",
        &url("/db/execute"),
        Some(("nobody", "w-secret")),
        Some(json!(["INSERT INTO t VALUES (1)"])),
    )
    .await;
    assert_eq!(s, 401, "{b}");

    let (s, b, _) = call(
        "GET",
        &url("/db/query?q=SELECT%20count(*)%20FROM%20t"),
        reader,
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["results"][0]["values"], json!([[1]]));
    let (s, _, _) = call("GET", &url("/db/query?q=SELECT%201"), None, None).await;
    assert_eq!(s, 401);
    let (s, b, _) = call(
        "POST",
        &url("/db/request"),
        reader,
        Some(json!(["SELECT 1"])),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, b, _) = call(
        "POST",
        &url("/db/request"),
        reader,
        Some(json!(["INSERT INTO t VALUES (2)"])),
    )
    .await;
    assert_eq!(s, 403, "a read-only user's write through /db/request: {b}");

    let (s, _, _) = call("GET", &url("/db/backup"), reader, None).await;
    assert_eq!(s, 403);
    let (s, _, _) = call("GET", &url("/db/backup?fmt=sql"), ops, None).await;
    assert_eq!(s, 200);
    let (s, _, _) = call("POST", &url("/db/load"), writer, Some(json!("x"))).await;
    assert_eq!(s, 403);
    let (s, _, _) = call("DELETE", &url("/remove"), writer, Some(json!({"id": 9}))).await;
    assert_eq!(s, 403);
    let (s, _, _) = call("DELETE", &url("/remove"), None, Some(json!({"id": 9}))).await;
    assert_eq!(s, 401);
    for open in ["/status", "/readyz", "/nodes", "/healthz"] {
        let (s, b, _) = call("GET", &url(open), None, None).await;
        assert_eq!(s, 200, "{open}: {b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_need_their_permission_and_forwarded_requests_keep_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    secure_files(dir.path());
    let first = start(1, dir.path(), &secure_args(dir.path(), None));
    leader_of(std::slice::from_ref(&first)).await;
    let join = |who: Option<&str>| {
        let mut args = secure_args(dir.path(), who);
        args.extend(["--join".to_string(), first.api.clone()]);
        args
    };
    let voter = start(2, dir.path(), &join(Some("voter")));
    let mut replica_args = join(Some("replica"));
    replica_args.push("--read-only".into());
    let replica = start(3, dir.path(), &replica_args);
    // A rogue: no credentials, then a read-replica permission asking to
    // vote. Neither gets in.
    let rogue = start(4, dir.path(), &join(None));
    let climber = start(5, dir.path(), &join(Some("replica")));
    let nodes_url = first.url("/nodes?nonvoters&ver=2");
    eventually(
        Duration::from_secs(20),
        "the voter and the replica joined",
        || {
            let url = nodes_url.clone();
            async move {
                let v: Value = common::get_json(&url).await;
                v["nodes"].as_array().is_some_and(|n| n.len() == 3)
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let listed: Value = common::get_json(&nodes_url).await;
    let ids: Vec<&str> = listed["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    assert_eq!(ids, ["1", "2", "3"], "no rogue joined: {listed}");
    drop((rogue, climber));

    // Through a follower: the caller's identity goes with the request.
    let (s, b, _) = call(
        "POST",
        &voter.url("/db/execute?raft_index"),
        Some(("ops", "ops-secret")),
        Some(json!(["CREATE TABLE t (x)"])),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let index = b["raft_index"].as_u64().unwrap();
    let (s, b, _) = call(
        "POST",
        &voter.url("/db/execute"),
        Some(("reader", "r-secret")),
        Some(json!(["INSERT INTO t VALUES (1)"])),
    )
    .await;
    assert_eq!(s, 403, "{b}");
    let (s, b, _) = call(
        "GET",
        &replica.url(&format!(
            "/db/query?level=none&min_index={index}&q=SELECT%20count(*)%20FROM%20t"
        )),
        Some(("reader", "r-secret")),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raft_rpc_without_the_cluster_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    secure_files(dir.path());
    let node = start(1, dir.path(), &secure_args(dir.path(), None));
    leader_of(std::slice::from_ref(&node)).await;
    // A forged AppendEntries with a higher term, and a vote request.
    let forged = json!({
        "vote": {"leader_id": {"term": 99, "node_id": 7}, "committed": true},
        "prev_log_id": null,
        "entries": [],
        "leader_commit": null
    });
    for (path, auth) in [
        ("append", None),
        ("append", Some("Bearer wrong-secret-of-some-length")),
        ("vote", None),
        ("log", None),
    ] {
        let url = format!("http://{}/raft/{path}", node.raft);
        let mut req = if path == "log" {
            client().get(url)
        } else {
            client().post(url).json(&forged)
        };
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} {auth:?}");
    }
    let status = node.status().await;
    assert_eq!(
        status["store"]["raft"]["term"], 1,
        "the forged term changed nothing: {status}"
    );
    assert_eq!(status["store"]["raft"]["state"], "Leader");
}

/// Without a cluster secret anyone who reaches the Raft port takes part
/// in Raft, but a term no cluster reaches (near `u64::MAX`, where the next
/// election overflows) is refused on every path, so one request cannot
/// leave every voter unable to elect again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_term_no_cluster_reaches_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let node = DbNode::start(1, dir.path(), &[]);
    leader_of(std::slice::from_ref(&node)).await;
    let vote = json!({"leader_id": {"term": u64::MAX, "node_id": 99}, "committed": true});
    let append = json!({"vote": vote, "prev_log_id": null, "entries": [], "leader_commit": null});
    let ask = json!({"vote": vote, "last_log_id": null});
    for (path, body) in [("append", &append), ("vote", &ask)] {
        let r = client()
            .post(format!("http://{}/raft/{path}", node.raft))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
        let answer: Value = r.json().await.unwrap();
        assert!(
            answer["error"].as_str().unwrap().contains("term"),
            "{answer}"
        );
    }
    // The same AppendEntries on a Raft stream: the stream is closed.
    let mut s = tokio::net::TcpStream::connect(&node.raft).await.unwrap();
    let head = format!(
        "GET /raft/stream HTTP/1.1\r\nHost: {}\r\nConnection: upgrade\r\nUpgrade: scaleout-raft\r\n\r\n",
        node.raft
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = vec![0; 1024];
    let n = s.read(&mut got).await.unwrap();
    assert!(
        String::from_utf8_lossy(&got[..n]).starts_with("HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got[..n])
    );
    let body = serde_json::to_vec(&append).unwrap();
    s.write_all(&(body.len() as u32).to_le_bytes())
        .await
        .unwrap();
    s.write_all(&body).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read(&mut got)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the stream answered: {closed:?}"
    );
    let status = node.status().await;
    assert_eq!(
        status["store"]["raft"]["term"], 1,
        "the forged term was taken: {status}"
    );
    assert_eq!(status["store"]["raft"]["state"], "Leader");
    let r = client()
        .post(node.url("/db/execute"))
        .json(&json!(["CREATE TABLE t (x)"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_server_signs_in_with_credentials_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    secure_files(dir.path());
    // The web server's user also needs status: everyone has it here.
    let node = start(1, dir.path(), &secure_args(dir.path(), None));
    leader_of(std::slice::from_ref(&node)).await;
    let cred = dir.path().join("writer.cred").display().to_string();
    let mut web = Proc::spawn(&[
        "web",
        "--listen",
        "127.0.0.1:0",
        "--db",
        &node.api,
        "--db-credentials",
        &cred,
    ]);
    let site = web.wait_ready().url;
    let r = client()
        .post(format!("{site}/api/links"))
        .json(&json!({"url": "https://example.com/signed-in"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let code = r.json::<Value>().await.unwrap()["code"]
        .as_str()
        .unwrap()
        .to_string();
    let r = client()
        .get(format!("{site}/api/links/{code}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Joins of nodes whose Raft address never answers change nothing, and
/// writes go on meanwhile (three such joins once stopped every write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_of_unreachable_nodes_change_nothing_and_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let node = DbNode::start(1, dir.path(), &[]);
    leader_of(std::slice::from_ref(&node)).await;
    let (s, b, _) = call(
        "POST",
        &node.url("/db/execute"),
        None,
        Some(json!(["CREATE TABLE t (x)"])),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let mut joins = tokio::task::JoinSet::new();
    for id in 7..10u64 {
        let url = node.url("/join");
        joins.spawn(async move {
            let body = json!({"id": id, "api_addr": "127.0.0.1:1", "addr": format!("127.0.0.1:{}", id), "voter": true});
            call("POST", &url, None, Some(body)).await
        });
    }
    for i in 0..20 {
        let (s, b, _) = call(
            "POST",
            &node.url("/db/execute"),
            None,
            Some(json!([["INSERT INTO t VALUES (?)", i]])),
        )
        .await;
        assert_eq!(s, 200, "a write during the joins: {b}");
    }
    while let Some(done) = joins.join_next().await {
        let (s, b, _) = done.unwrap();
        assert_eq!(s, 503, "{b}");
        assert!(
            b["error"].as_str().unwrap().contains("does not answer"),
            "{b}"
        );
    }
    let listed: Value = common::get_json(&node.url("/nodes?nonvoters&ver=2")).await;
    assert_eq!(listed["nodes"].as_array().unwrap().len(), 1, "{listed}");
    let (s, b, _) = call(
        "POST",
        &node.url("/db/execute"),
        None,
        Some(json!(["INSERT INTO t VALUES (99)"])),
    )
    .await;
    assert_eq!(s, 200, "{b}");
}

/// Whether the server at `addr` closes a connection that sent half a
/// request head, within `within`.
async fn cuts_a_slow_head(addr: &str, within: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(within, slow.read_to_end(&mut buf))
        .await
        .is_ok()
}

/// Slowloris on a database node and a web server: a connection that
/// dribbles its head is cut at the head timeout while others are served;
/// connections past the cap are closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_are_cut_and_connections_capped_on_db_and_web() {
    let dir = tempfile::tempdir().unwrap();
    let node = DbNode::start(
        1,
        dir.path(),
        &["--header-timeout", "500ms", "--max-connections", "40"],
    );
    leader_of(std::slice::from_ref(&node)).await;
    let api = node.api.trim_start_matches("http://").to_string();
    let slow = tokio::spawn({
        let api = api.clone();
        async move { cuts_a_slow_head(&api, Duration::from_secs(5)).await }
    });
    let (s, _, _) = call("GET", &node.url("/status"), None, None).await;
    assert_eq!(s, 200, "served beside the slow client");
    assert!(slow.await.unwrap(), "the database node cut the slow head");

    let mut web = Proc::spawn(&[
        "web",
        "--listen",
        "127.0.0.1:0",
        "--db",
        &node.api,
        "--header-timeout",
        "500ms",
        "--max-connections",
        "20",
    ]);
    let line = web.wait_for_line("scaleout web:");
    let site = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();
    let host = site.trim_start_matches("http://").to_string();
    assert!(
        cuts_a_slow_head(&host, Duration::from_secs(5)).await,
        "the web server cut the slow head"
    );
    // Hold the web server's 20 connections; the next is closed at once,
    // and once they go, it serves again.
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(tokio::net::TcpStream::connect(&host).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = client().get(format!("{site}/healthz")).send().await;
    assert!(
        refused.is_err(),
        "a 21st connection is refused: {refused:?}"
    );
    drop(held);
    common::eventually_status(
        Duration::from_secs(10),
        "the web server serves again",
        &format!("{site}/healthz"),
        200,
    )
    .await;
}
