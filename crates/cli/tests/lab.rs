//! The lab's control room as a user drives it: `scaleout up` prints its
//! dashboard's URL; the API shows every process and who leads; killing
//! the leader through `scaleout lab` shows on the timeline as the leader
//! lost and another elected; the killed node comes back with `restart`;
//! pause and resume; bad controls get a clear error; cross-site requests
//! are refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{client, Proc, BIN};
use serde_json::Value;

/// Runs `scaleout lab ARGS` against the lab at `url`; its status and output.
fn lab(url: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(BIN)
        .arg("lab")
        .args(args)
        .args(["--lab", url])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The lab's address and token, from the URL `scaleout up` printed
/// (`http://HOST:PORT/?token=T`).
fn split(url: &str) -> (&str, &str) {
    url.split_once("/?token=")
        .expect("the dashboard's URL holds its token")
}

/// A request to the lab at `url`, with its token.
fn call(url: &str, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    let (base, token) = split(url);
    client()
        .request(method, format!("{base}{path}"))
        .bearer_auth(token)
}

async fn state(url: &str) -> Value {
    call(url, reqwest::Method::GET, "/api/state")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits (30 s at most) until the state satisfies `check`.
async fn until(url: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = state(url).await;
        if check(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `scaleout up --stage N` on free ports, and its dashboard's URL.
fn lab_up(stage: &str, dir: &std::path::Path) -> (Proc, String) {
    let mut up = Proc::spawn(&[
        "up",
        "--stage",
        stage,
        "--port-base",
        "0",
        "--data",
        dir.to_str().unwrap(),
    ]);
    let line = up.wait_for_line_within("dashboard: ", Duration::from_secs(120));
    let url = line.trim().trim_start_matches("dashboard: ").to_string();
    (up, url)
}

fn stage4(dir: &std::path::Path) -> (Proc, String) {
    lab_up("4", dir)
}

/// `scaleout bench` sends `requests` to `site`'s `/healthz` over
/// `connections` connections, and must succeed.
async fn load_through(site: &str, connections: u32, requests: u32) {
    let args = [
        "bench".to_string(),
        format!("{site}/healthz"),
        "-c".into(),
        connections.to_string(),
        "-n".into(),
        requests.to_string(),
        "-d".into(),
        "20s".into(),
    ];
    let load = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN).args(args).output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );
}

fn proc_of<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["procs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_stage_and_its_controls_work() {
    let dir = tempfile::tempdir().unwrap();
    let (mut up, url) = stage4(dir.path());
    let (base, token) = split(&url);
    assert_eq!(token.len(), 32, "{url}");

    // Loopback is every local user's: nothing without the lab's token.
    for path in ["/", "/api/state", "/api/events"] {
        let r = client().get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = client()
        .post(format!("{base}/api/procs/web-1/kill"))
        .header("content-type", "application/json")
        .bearer_auth("0".repeat(32))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Another name for this address (a rebound DNS name) is refused.
    let r = call(&url, reqwest::Method::GET, "/api/state")
        .header("host", "evil.example:80")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // The printed URL gives a browser a cookie and leaves the address
    // bar; the page may not be framed.
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirects.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().unwrap().to_string();

    // The page is served from the binary, with no other request needed.
    let page = client()
        .get(format!("{base}/"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    let html = page.text().await.unwrap();
    assert!(
        html.contains("EventSource(\"/api/events\")"),
        "the page follows the events"
    );

    // Every process, and one leader among three voters and two replicas.
    let s = until(&url, "a leader", |s| s["leader"].is_string()).await;
    let procs = s["procs"].as_array().unwrap();
    assert_eq!(procs.len(), 8, "{s}");
    let kinds = |s: &Value, kind: &str| {
        s["procs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["db"]["kind"] == kind)
            .count()
    };
    let s = until(&url, "3 voters and 2 replicas seen", |s| {
        kinds(s, "leader") == 1 && kinds(s, "voter") == 2 && kinds(s, "replica") == 2
    })
    .await;
    let leader = s["leader"].as_str().unwrap().to_string();
    assert!(
        procs
            .iter()
            .all(|p| p["state"] == "up" && p["pid"].is_u64()),
        "{s}"
    );

    // Traffic through the load balancer shows on both web servers, each
    // counted from its own /metrics, spread about evenly (the seed's C6).
    let site = s["site"].as_str().unwrap().to_string();
    let before = |s: &Value, name: &str| proc_of(s, name)["requests"].as_u64().unwrap_or(0);
    let (w1, w2) = (before(&s, "web-1"), before(&s, "web-2"));
    load_through(&site, 4, 400).await;
    // The state is the watcher's last look (twice a second): wait for
    // one taken after the load.
    let s = until(&url, "the load counted on both web servers", |s| {
        before(s, "web-1") >= w1 + 150 && before(s, "web-2") >= w2 + 150 && before(s, "lb") >= 400
    })
    .await;
    let (d1, d2) = (before(&s, "web-1") - w1, before(&s, "web-2") - w2);
    assert!(
        d1 + d2 <= 400 + 100,
        "{d1} + {d2}: more than was sent (health checks aside)"
    );

    // The same from a terminal, found through the data directory.
    let status = std::process::Command::new(BIN)
        .args(["lab", "status", "--data", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{printed}");
    assert!(
        printed.contains(&leader) && printed.contains("leader"),
        "{printed}"
    );

    // Kill the leader: it exits, another is elected, the timeline says so.
    let (ok, said) = lab(&url, &["kill", &leader]);
    assert!(ok, "{said}");
    let s = until(&url, "a new leader", |s| {
        s["leader"].as_str().is_some_and(|l| l != leader)
            && proc_of(s, &leader)["state"] == "exited"
    })
    .await;
    let new_leader = s["leader"].as_str().unwrap().to_string();
    let timeline: Vec<Value> = call(&url, reqwest::Method::GET, "/api/timeline")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let at = |kind: &str, name: &str| {
        timeline
            .iter()
            .find(|e| e["kind"] == kind && e["name"] == name)
            .and_then(|e| e["at_ms"].as_u64())
            .unwrap_or_else(|| panic!("no {kind} of {name} in {timeline:?}"))
    };
    let killed = at("exited", &leader);
    let elected = at("leader_elected", &new_leader);
    assert!(elected >= killed, "elected after the kill: {timeline:?}");

    // Back with restart, as a voter that follows.
    let (ok, said) = lab(&url, &["restart", &leader]);
    assert!(ok, "{said}");
    // At its old address (the lab pins what port 0 gave it), so it
    // catches up with the others, in the new leader's term.
    until(&url, "the old leader back as a caught-up voter", |s| {
        let p = proc_of(s, &leader);
        let now = proc_of(s, &new_leader);
        p["state"] == "up"
            && p["db"]["kind"] == "voter"
            && p["db"]["term"] == now["db"]["term"]
            && p["db"]["applied_index"].as_u64() >= now["db"]["applied_index"].as_u64()
    })
    .await;

    // Pause and resume a web server.
    let (ok, said) = lab(&url, &["pause", "web-1"]);
    assert!(ok, "{said}");
    until(&url, "web-1 paused", |s| {
        proc_of(s, "web-1")["state"] == "paused"
    })
    .await;
    let (ok, said) = lab(&url, &["resume", "web-1"]);
    assert!(ok, "{said}");
    until(&url, "web-1 up", |s| proc_of(s, "web-1")["state"] == "up").await;

    // Scale out (the seed's C8): a web server added takes traffic through
    // the load balancer at once; a read replica joins and catches up.
    let (ok, said) = lab(&url, &["add", "web"]);
    assert!(ok && said.contains("added web-3"), "{said}");
    let s = until(&url, "web-3 up", |s| {
        s["procs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "web-3" && p["state"] == "up")
    })
    .await;
    let w3 = proc_of(&s, "web-3")["requests"].as_u64().unwrap_or(0);
    let site = s["site"].as_str().unwrap().to_string();
    load_through(&site, 3, 300).await;
    until(&url, "web-3 takes a share", |s| {
        proc_of(s, "web-3")["requests"].as_u64().unwrap_or(0) >= w3 + 60
    })
    .await;
    let (ok, said) = lab(&url, &["add", "replica"]);
    assert!(ok && said.contains("added db-6"), "{said}");
    until(&url, "db-6 a caught-up replica", |s| {
        let leader_applied = s["procs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["db"]["kind"] == "leader")
            .and_then(|p| p["db"]["applied_index"].as_u64())
            .unwrap_or(u64::MAX);
        s["procs"].as_array().unwrap().iter().any(|p| {
            p["name"] == "db-6"
                && p["db"]["kind"] == "replica"
                && p["db"]["applied_index"].as_u64() >= Some(leader_applied)
        })
    })
    .await;
    // The timeline says when each caught up: the replica added, and the
    // old leader restarted (a new pid).
    for name in ["db-6", leader.as_str()] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while events(&url, "caught_up", name).await.is_empty() {
            assert!(Instant::now() < deadline, "no caught_up event for {name}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let (ok, said) = lab(&url, &["add", "lb"]);
    assert!(
        !ok && said.contains("no DNS"),
        "stage 4 has one load balancer: {said}"
    );
    let (ok, said) = lab(&url, &["add", "dns"]);
    assert!(!ok && said.contains("add web, replica or lb"), "{said}");

    // The dashboard's own load: started once, counted, stopped once.
    let post = |path: &str| {
        call(&url, reqwest::Method::POST, path)
            .header("content-type", "application/json")
            .body("{}")
            .send()
    };
    assert_eq!(post("/api/load/start").await.unwrap().status(), 200);
    assert_eq!(post("/api/load/start").await.unwrap().status(), 409);
    until(&url, "the load answered", |s| {
        s["load"]["running"] == true && s["load"]["ok"].as_u64() >= Some(20)
    })
    .await;
    // Each process's latency over the last look and its errors, from its
    // own metrics; each database node's lag behind the most applied.
    let s = until(&url, "web-1 shows its latency", |s| {
        proc_of(s, "web-1")["p99_ms"].as_f64().is_some()
    })
    .await;
    let web = proc_of(&s, "web-1");
    assert!(
        web["p50_ms"].as_f64().unwrap() <= web["p99_ms"].as_f64().unwrap(),
        "{web}"
    );
    assert_eq!(web["errors"], 0, "{web}");
    for p in s["procs"].as_array().unwrap() {
        if p["role"] == "db" && p["state"] == "up" {
            assert!(p["db"]["lag"].as_u64().is_some(), "{p}");
        }
    }
    assert_eq!(post("/api/load/stop").await.unwrap().status(), 200);
    assert_eq!(post("/api/load/stop").await.unwrap().status(), 409);
    assert_eq!(post("/api/load/faster").await.unwrap().status(), 400);
    let s = until(&url, "the load stopped", |s| s["load"]["running"] == false).await;
    assert_eq!(s["load"]["errors"], 0, "no fault meanwhile: {s}");
    // Its shape: scaleout bench's links mix at a fixed rate, latencies
    // counted from when each request was due; bad shapes are refused.
    let start = |body: &'static str| {
        call(&url, reqwest::Method::POST, "/api/load/start")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for bad in [
        r#"{"connections":0}"#,
        r#"{"rate":-1}"#,
        r#"{"write_every":0}"#,
        r#"{"bogus":1}"#,
        "not json",
    ] {
        let r = start(bad).await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        assert!(
            r.text().await.unwrap().contains("the load's shape"),
            "{bad}"
        );
    }
    let r = start(r#"{"connections":2,"rate":40,"write_every":2}"#)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let s = until(&url, "the paced load shows its latency", |s| {
        s["load"]["shape"]["rate"] == 40.0
            && s["load"]["running"] == true
            && s["load"]["p99_ms"].as_f64().is_some()
            && s["load"]["ok"].as_u64() >= Some(40)
    })
    .await;
    let rps = s["load"]["rps"].as_f64().unwrap();
    assert!(rps < 80.0, "held to its rate, about 40/s: {rps}");
    assert_eq!(post("/api/load/stop").await.unwrap().status(), 200);

    // Bad controls: a clear error, nothing done.
    let (ok, said) = lab(&url, &["kill", "db-99"]);
    assert!(!ok && said.contains("no process named"), "{said}");
    let r = call(&url, reqwest::Method::POST, "/api/procs/web-1/explode")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("the controls are"));
    // A cross-site form post (no JSON content type) is refused.
    let r = call(&url, reqwest::Method::POST, "/api/procs/web-1/kill")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("x=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(proc_of(&state(&url).await, "web-1")["state"], "up");

    // The seed's C13 as a scenario with a report: the leader killed
    // under the lab's load; detected, another elected, writes back, and
    // every acknowledged create still there.
    let r = post("/api/scenario/kill-leader").await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        post("/api/scenario/kill-leader").await.unwrap().status(),
        409
    );
    assert_eq!(post("/api/scenario/nothing").await.unwrap().status(), 400);
    let deadline = Instant::now() + Duration::from_secs(90);
    let report = loop {
        let s = state(&url).await;
        if s["scenario"]["done"] == true {
            break s["scenario"].clone();
        }
        assert!(Instant::now() < deadline, "the scenario never ended: {s}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    eprintln!("kill-leader scenario: {report}");
    assert!(report["error"].is_null(), "{report}");
    assert_ne!(report["new_leader"], report["killed"], "{report}");
    assert!(
        report["acknowledged_writes"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(report["lost_writes"], 0, "{report}");
    for field in ["detected_ms", "elected_ms", "writes_resumed_ms"] {
        assert!(report[field].as_u64().is_some(), "{field}: {report}");
    }

    // The other scenarios, from the CLI, each ending in a report: a web
    // server and a replica killed under load (seen, traffic moved,
    // nothing lost), a web server added (it serves).
    let (ok, said) = lab(&url, &["scenario", "kill-everything"]);
    assert!(!ok && said.contains("the scenarios are"), "{said}");
    for (name, field) in [
        ("kill-web", "killed"),
        ("kill-replica", "killed"),
        ("add-web", "added"),
    ] {
        let (ok, said) = lab(&url, &["scenario", name, "--json"]);
        assert!(ok, "{name}: {said}");
        let report: Value = serde_json::from_str(said.trim()).unwrap();
        eprintln!("{name} scenario: {report}");
        assert_eq!(report["name"], name, "{report}");
        assert!(report[field].as_str().is_some(), "{report}");
        assert!(report["detected_ms"].as_u64().is_some(), "{report}");
        assert!(report["traffic_moved_ms"].as_u64().is_some(), "{report}");
        assert!(
            report["acknowledged_writes"].as_u64().unwrap() > 0,
            "{report}"
        );
        assert_eq!(report["lost_writes"], 0, "{report}");
        let target = report[field].as_str().unwrap();
        let s = state(&url).await;
        let want = if field == "killed" { "exited" } else { "up" };
        assert_eq!(proc_of(&s, target)["state"], want, "{s}");
    }

    // Scale in: a web server drained and removed, a replica taken out of
    // the cluster; voters and load balancers are not removed here.
    let s = state(&url).await;
    let web = s["procs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["role"] == "web" && p["state"] == "up")
        .map(|p| p["name"].as_str().unwrap().to_string())
        .next_back()
        .unwrap();
    let replica = s["procs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["db"]["kind"] == "replica" && p["state"] == "up")
        .map(|p| p["name"].as_str().unwrap().to_string())
        .unwrap();
    let voter = s["procs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["db"]["kind"] == "voter")
        .map(|p| p["name"].as_str().unwrap().to_string())
        .unwrap();
    for gone in [&web, &replica] {
        let (ok, said) = lab(&url, &["remove", gone]);
        assert!(ok, "remove {gone}: {said}");
        let s = until(&url, "it left the lab", |s| {
            s["procs"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["name"] != gone.as_str())
        })
        .await;
        let timeline = call(&url, reqwest::Method::GET, "/api/timeline")
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap();
        assert!(
            timeline
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["kind"] == "removed" && e["name"] == gone.as_str()),
            "{timeline}"
        );
        let _ = s;
    }
    let listed: Value = client()
        .get(format!(
            "{}/nodes?nonvoters&ver=2",
            proc_of(&state(&url).await, &voter)["url"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let replica_id = replica.trim_start_matches("db-");
    assert!(
        listed["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["id"] != replica_id),
        "the replica left the cluster: {listed}"
    );
    let (ok, said) = lab(&url, &["remove", &voter]);
    assert!(
        !ok && said.contains("only web servers, read replicas and load balancers"),
        "{said}"
    );
    // Stage 4's one load balancer has no DNS answer to leave.
    let (ok, said) = lab(&url, &["remove", "lb"]);
    assert!(!ok && said.contains("no DNS"), "{said}");
    load_through(&site, 4, 200).await;

    // The events stream starts with the state.
    let mut events = call(&url, reqwest::Method::GET, "/api/events")
        .send()
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), events.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let first = String::from_utf8_lossy(&first);
    assert!(first.starts_with("event: state"), "{first}");
    drop(events);

    up.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(up.wait_exit(Duration::from_secs(60)).success());
    assert!(
        !scaleout_lab::lab_url_file(dir.path()).exists(),
        "the lab forgets its URL when it stops"
    );
}

/// The dashboard in a real browser: Debian's chromium, headless, driven
/// by selenium (from PyPI, installed next to the build). It presses "kill"
/// on the leader the page draws and sees another leader, the exit and the
/// election on the timeline; restarts the old leader with its button; and
/// fits a phone's width. Screenshots go to `target/tmp/dashboard/`.
/// What would break the site or wedge the lab is refused or undone:
/// two removals at once never take the last web server; a load balancer
/// is not killed when the other cannot take its visitors; a removal one
/// load balancer refuses leaves the web server in rotation everywhere; a
/// load balancer DNS cannot take is not added, and a DNS server restarted
/// gets the lab's load balancers back in its answer; a removed replica's
/// name and data are not reused; loads that cannot be scheduled, bad
/// paths, bad content types and a wrong token get a clear refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lab_refuses_or_undoes_what_would_break_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut up, url) = lab_up("5", dir.path());
    until(&url, "both load balancers in DNS", |s| {
        proc_or_null(s, "lb-1")["in_dns"] == true && proc_or_null(s, "lb-2")["in_dns"] == true
    })
    .await;

    // Both web servers removed at once: one of the two is refused.
    let (u1, u2) = (url.clone(), url.clone());
    let first = tokio::task::spawn_blocking(move || lab(&u1, &["remove", "web-1"]));
    let second = tokio::task::spawn_blocking(move || lab(&u2, &["remove", "web-2"]));
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert!(
        first.0 != second.0,
        "exactly one removed: {first:?} {second:?}"
    );
    let refused = if first.0 { &second.1 } else { &first.1 };
    assert!(refused.contains("last web server"), "{refused}");
    let kept = if first.0 { "web-2" } else { "web-1" };

    // A load balancer paused: the other is not killed, and a web server
    // removal that it cannot drain is undone on the other one.
    let (ok, said) = lab(&url, &["add", "web"]);
    assert!(ok, "{said}");
    let added = said.trim().rsplit(' ').next().unwrap().to_string();
    until(&url, "the added web server in rotation", |s| {
        proc_or_null(s, &added)["state"] == "up" && proc_or_null(s, &added)["ejected_by"].is_null()
    })
    .await;
    let (ok, said) = lab(&url, &["pause", "lb-2"]);
    assert!(ok, "{said}");
    let (ok, said) = lab(&url, &["scenario", "kill-lb", "--json"]);
    assert!(!ok && said.contains("needs another one up"), "{said}");
    let (ok, said) = lab(&url, &["remove", &added]);
    assert!(!ok && said.contains("did not drain"), "{said}");
    let (ok, said) = lab(&url, &["resume", "lb-2"]);
    assert!(ok, "{said}");
    until(&url, "the web server still in rotation on both", |s| {
        proc_or_null(s, &added)["state"] == "up"
            && proc_or_null(s, &added)["ejected_by"].is_null()
            && proc_or_null(s, "lb-2")["state"] == "up"
    })
    .await;
    let (ok, said) = lab(&url, &["remove", &added]);
    assert!(ok, "after the resume it goes: {said}");

    // DNS down: a new load balancer cannot enter the answer, so it is not
    // added; restarted, DNS answers with the lab's load balancers again,
    // the one added since included.
    let (ok, said) = lab(&url, &["kill", "dns"]);
    assert!(ok, "{said}");
    until(&url, "dns exited", |s| {
        proc_or_null(s, "dns")["state"] == "exited"
    })
    .await;
    let (ok, said) = lab(&url, &["add", "lb"]);
    assert!(!ok && said.contains("DNS did not answer"), "{said}");
    let s = state(&url).await;
    assert!(proc_or_null(&s, "lb-3").is_null(), "{s}");
    let (ok, said) = lab(&url, &["restart", "dns"]);
    assert!(ok, "{said}");
    let (ok, said) = lab(&url, &["add", "lb"]);
    assert!(ok, "{said}");
    let new_lb = said.trim().rsplit(' ').next().unwrap().to_string();
    assert_ne!(new_lb, "lb-3", "a name is never given twice");
    until(&url, "the new load balancer in DNS", |s| {
        proc_or_null(s, &new_lb)["in_dns"] == true
    })
    .await;
    let (ok, said) = lab(&url, &["restart", "dns"]);
    assert!(ok, "{said}");
    until(&url, "still in DNS after DNS restarted", |s| {
        proc_or_null(s, "dns")["state"] == "up"
            && proc_or_null(s, &new_lb)["in_dns"] == true
            && proc_or_null(s, "lb-1")["in_dns"] == true
    })
    .await;

    // A removed replica's name and data are not reused.
    let (ok, said) = lab(&url, &["remove", "db-5"]);
    assert!(ok, "{said}");
    let (ok, said) = lab(&url, &["add", "replica"]);
    assert!(ok && said.contains("added db-6"), "{said}");
    until(&url, "db-6 a replica", |s| {
        proc_or_null(s, "db-6")["db"]["kind"] == "replica"
    })
    .await;

    // Clear refusals.
    let post = |path: &str, content_type: &str, body: &'static str| {
        call(&url, reqwest::Method::POST, path)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    for (path, content_type, body, status) in [
        (
            "/api/load/start",
            "application/json",
            r#"{"connections":256,"rate":1.7e-17}"#,
            400,
        ),
        (
            "/api/load/start",
            "application/json",
            r#"{"connections":100,"rate":2}"#,
            400,
        ),
        ("/api/procs/%FF/kill", "application/json", "{}", 400),
        ("/api/procs/web-1/kill", "application/jsonx", "{}", 403),
    ] {
        let r = post(path, content_type, body).await.unwrap();
        assert_eq!(r.status(), status, "{path} {body}");
        let e: Value = r.json().await.unwrap();
        assert!(e["error"].is_string(), "{path}: {e}");
    }
    let big = call(&url, reqwest::Method::POST, "/api/load/start")
        .header("content-type", "application/json")
        .body(vec![b' '; 200_000])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
    assert!(big.json::<Value>().await.unwrap()["error"].is_string());
    let (base, _) = split(&url);
    let wrong = format!("{base}/?token={}", "0".repeat(32));
    let (ok, said) = lab(&wrong, &["status"]);
    assert!(!ok && said.contains("401"), "{said}");
    let s = state(&url).await;
    assert_eq!(proc_or_null(&s, kept)["state"], "up", "{s}");
    up.signal(nix::sys::signal::Signal::SIGINT);
    assert!(up.wait_exit(Duration::from_secs(60)).success());
}

/// Stage 1 in the control room: one process, the single server (app,
/// SQLite and cache), killed and restarted from the lab with its links
/// kept in its file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_1_is_one_server_the_lab_can_kill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut up, url) = lab_up("1", dir.path());
    let s = until(&url, "the single server up", |s| {
        proc_or_null(s, "web-1")["state"] == "up"
    })
    .await;
    assert_eq!(s["stage"], 1);
    assert_eq!(s["procs"].as_array().unwrap().len(), 1, "{s}");
    assert!(s["leader"].is_null() && s["site_name"].is_null(), "{s}");
    let site = s["site"].as_str().unwrap().to_string();
    let made = client()
        .post(format!("{site}/api/links"))
        .json(&serde_json::json!({"url": "https://example.com/kept"}))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), 201);
    let code = made.json::<Value>().await.unwrap()["code"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(dir.path().join("stage1").join("links.sqlite").exists());

    let (ok, said) = lab(&url, &["kill", "web-1"]);
    assert!(ok, "{said}");
    until(&url, "the server exited", |s| {
        proc_or_null(s, "web-1")["state"] == "exited"
    })
    .await;
    assert!(client().get(format!("{site}/{code}")).send().await.is_err());
    let (ok, said) = lab(&url, &["restart", "web-1"]);
    assert!(ok, "{said}");
    until(&url, "the server back", |s| {
        proc_or_null(s, "web-1")["state"] == "up"
    })
    .await;
    let r = client().get(format!("{site}/{code}")).send().await.unwrap();
    assert_eq!(
        r.status(),
        302,
        "the link outlived the kill in its SQLite file"
    );
    // SIGTERM: it drains and exits cleanly; then back again.
    let (ok, said) = lab(&url, &["stop", "web-1"]);
    assert!(ok, "{said}");
    let s = until(&url, "the server stopped", |s| {
        proc_or_null(s, "web-1")["state"] == "exited"
    })
    .await;
    assert!(
        proc_or_null(&s, "web-1")["exit"]
            .as_str()
            .unwrap()
            .contains("exit status: 0"),
        "{s}"
    );
    let (ok, said) = lab(&url, &["restart", "web-1"]);
    assert!(ok, "{said}");
    until(&url, "the server back again", |s| {
        proc_or_null(s, "web-1")["state"] == "up"
    })
    .await;
    // Nothing to scale in stage 1's diagram but the server itself.
    let (ok, said) = lab(&url, &["add", "lb"]);
    assert!(!ok && said.contains("no lb to copy"), "{said}");
    up.signal(nix::sys::signal::Signal::SIGINT);
    assert!(up.wait_exit(Duration::from_secs(30)).success());
}

/// The leader cut off from the other database nodes (`up --netns`: each
/// in a network namespace of its own): another is elected, writes
/// resume, nothing acknowledged is lost, and once healed the old leader
/// follows the new one in its term. Where namespaces cannot be made (not
/// root, no `ip`), `up --netns` must say so and fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_scenario_cuts_the_leader_off_and_heals() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Proc::spawn_logging(
        &[
            "up",
            "--stage",
            "4",
            "--netns",
            "--port-base",
            "0",
            "--data",
            dir.path().to_str().unwrap(),
        ],
        "warn,openraft=off",
    );
    let can = std::process::Command::new("ip")
        .args(["netns", "add", "scaleout-probe-can"])
        .status()
        .is_ok_and(|s| s.success());
    if !can {
        let status = up.wait_exit(Duration::from_secs(30));
        assert!(!status.success());
        let logs = up.logs();
        assert!(
            logs.iter().any(|l| l.contains("--netns needs root")),
            "{logs:?}"
        );
        eprintln!("skipped: no network namespaces here");
        return;
    }
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", "scaleout-probe-can"])
        .status();
    let line = up.wait_for_line_within("dashboard: ", Duration::from_secs(120));
    let url = line.trim().trim_start_matches("dashboard: ").to_string();
    until(&url, "a leader", |s| s["leader"].is_string()).await;
    // Database nodes are at their namespaces' addresses, not loopback.
    let s = state(&url).await;
    assert!(
        proc_or_null(&s, "db-1")["url"]
            .as_str()
            .unwrap()
            .starts_with("http://10."),
        "{s}"
    );

    let (ok, said) = lab(&url, &["scenario", "partition-leader", "--json"]);
    assert!(ok, "{said}");
    let report: Value = serde_json::from_str(said.lines().last().unwrap()).unwrap();
    eprintln!("partition-leader: {report}");
    let cut = report["cut_off"].as_str().unwrap().to_string();
    let new_leader = report["new_leader"].as_str().unwrap().to_string();
    assert_ne!(cut, new_leader, "{report}");
    assert!(report["writes_resumed_ms"].is_u64(), "{report}");
    assert!(report["healed_ms"].is_u64(), "{report}");
    assert_eq!(report["lost_writes"], 0, "{report}");
    assert!(
        report["acknowledged_writes"].as_u64().unwrap() > 0,
        "{report}"
    );
    for kind in ["partition", "healed"] {
        assert!(
            !events(&url, kind, &cut).await.is_empty(),
            "no {kind} event"
        );
    }
    until(&url, "the old leader follows in the new term", |s| {
        let old = proc_or_null(s, &cut);
        let now = proc_or_null(s, &new_leader);
        s["leader"] == new_leader.as_str()
            && old["db"]["kind"] == "voter"
            && old["db"]["term"] == now["db"]["term"]
    })
    .await;
    up.signal(nix::sys::signal::Signal::SIGINT);
    assert!(up.wait_exit(Duration::from_secs(60)).success());
    // Its namespaces went with it.
    let left = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let pid = up.pid().as_raw();
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains(&format!("scaleout-{pid}-")),
        "namespaces left behind"
    );
}

/// Process `name` in the state, or null while the state lacks it.
fn proc_or_null(s: &Value, name: &str) -> Value {
    s["procs"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Events of `kind` about `name` on the lab's timeline.
async fn events(url: &str, kind: &str, name: &str) -> Vec<Value> {
    let timeline: Vec<Value> = call(url, reqwest::Method::GET, "/api/timeline")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    timeline
        .into_iter()
        .filter(|e| e["kind"] == kind && e["name"] == name)
        .collect()
}

/// Stage 5, where visitors find the site through DNS: the lab's load asks
/// the lab's DNS for the name; a load balancer killed under it leaves the
/// answer and the load goes on through the other, losing no write; one
/// restarted comes back into the answer; one added enters it and takes
/// traffic, one removed leaves it; a web server killed shows as ejected
/// by both load balancers. Each change is on the timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_5_moves_visitors_between_load_balancers_through_dns() {
    let dir = tempfile::tempdir().unwrap();
    let (mut up, url) = lab_up("5", dir.path());
    let s = until(&url, "both load balancers in the DNS answer", |s| {
        proc_or_null(s, "lb-1")["in_dns"] == true && proc_or_null(s, "lb-2")["in_dns"] == true
    })
    .await;
    assert!(
        s["site_name"]
            .as_str()
            .unwrap()
            .starts_with("http://www.scaleout.test:"),
        "{s}"
    );

    let (ok, said) = lab(&url, &["scenario", "kill-lb", "--json"]);
    assert!(ok, "{said}");
    let report: Value = serde_json::from_str(said.lines().last().unwrap()).unwrap();
    eprintln!("kill-lb: {report}");
    let killed = report["killed"].as_str().unwrap().to_string();
    assert!(killed.starts_with("lb-"), "{report}");
    assert!(report["detected_ms"].is_u64(), "DNS left it out: {report}");
    assert_eq!(report["lost_writes"], 0, "{report}");
    assert!(
        report["acknowledged_writes"].as_u64().unwrap() > 0,
        "{report}"
    );
    // The load went on after the kill: through the other load balancer.
    let errors = report["errors"].as_u64().unwrap();
    let served = report["served"].as_u64().unwrap();
    assert!(served > 20 * (errors + 1), "{report}");
    let s = state(&url).await;
    assert_eq!(proc_or_null(&s, &killed)["in_dns"], false, "{s}");
    let left = events(&url, "dns", &killed).await;
    assert!(
        left.iter()
            .any(|e| e["detail"].as_str().unwrap().starts_with("left out")),
        "{left:?}"
    );

    // Restarted, it passes its checks and is answered again.
    let (ok, said) = lab(&url, &["restart", &killed]);
    assert!(ok, "{said}");
    until(&url, "the restarted load balancer back in DNS", |s| {
        proc_or_null(s, &killed)["in_dns"] == true
    })
    .await;
    assert!(events(&url, "dns", &killed)
        .await
        .iter()
        .any(|e| e["detail"].as_str().unwrap().starts_with("back in")));

    // Scale out the front: a third load balancer enters the answer and
    // takes a share of the load (which resolves the name as it goes).
    let (ok, said) = lab(&url, &["add", "lb"]);
    assert!(ok && said.contains("added lb-3"), "{said}");
    until(&url, "lb-3 in the DNS answer", |s| {
        proc_or_null(s, "lb-3")["in_dns"] == true
    })
    .await;
    let r = call(&url, reqwest::Method::POST, "/api/load/start")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    until(&url, "lb-3 takes requests", |s| {
        proc_or_null(s, "lb-3")["requests"].as_u64().unwrap_or(0) > 10
    })
    .await;

    // A web server killed: both load balancers stop sending to it.
    let (ok, said) = lab(&url, &["kill", "web-1"]);
    assert!(ok, "{said}");
    until(&url, "web-1 ejected by the load balancers", |s| {
        let by = proc_or_null(s, "web-1")["ejected_by"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        ["lb-1", "lb-2", "lb-3"]
            .iter()
            .all(|lb| by.iter().any(|b| b == lb))
    })
    .await;
    assert!(!events(&url, "ejected", "web-1").await.is_empty());

    // Scale in the front: lb-3 leaves the answer, then stops.
    let (ok, said) = lab(&url, &["remove", "lb-3"]);
    assert!(ok, "{said}");
    until(&url, "lb-3 gone", |s| {
        s["procs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["name"] != "lb-3")
    })
    .await;
    // The last one in the answer stays.
    let (ok, said) = lab(&url, &["kill", "lb-1"]);
    assert!(ok, "{said}");
    until(&url, "lb-1 out of DNS", |s| {
        proc_or_null(s, "lb-1")["in_dns"] == false
    })
    .await;
    let (ok, said) = lab(&url, &["remove", "lb-2"]);
    assert!(!ok && said.contains("last load balancer"), "{said}");
    up.signal(nix::sys::signal::Signal::SIGINT);
    assert!(up.wait_exit(Duration::from_secs(60)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_in_a_real_browser() {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            std::path::Path::new(tool).exists(),
            "{tool} is missing: install Debian's chromium and chromium-driver (.ci/run does)"
        );
    }
    let path = common::db::python_packages("selenium", &["selenium"], "import selenium");
    let dir = tempfile::tempdir().unwrap();
    let (mut up, url) = stage4(dir.path());
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    let args = [url, shots.display().to_string()];
    let (ok, said) = common::db::python_client("dashboard_check.py", &args, path).await;
    assert!(ok, "the browser: {said}");
    up.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(up.wait_exit(Duration::from_secs(60)).success());
}
