//! Stages 2–4 as `scaleout up` runs them: every tier a real child process
//! on loopback. Writes land on the database leader, reads on the read
//! replicas; a link created through one web server is found at once
//! through the other (the read-your-writes cookie); the database leader
//! killed with SIGKILL while links are created loses none that were
//! acknowledged; a replica killed, reads go on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::db::DbNode;
use common::{client, eventually, Proc};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// A running `scaleout up --stage N` and the table it printed.
struct Stage {
    proc: Proc,
    /// name → (url, pid)
    members: BTreeMap<String, (String, i32)>,
    site: String,
    /// Stage 5's DNS server and its pid.
    dns: Option<(std::net::SocketAddr, i32)>,
}

impl Stage {
    /// `scaleout up [--stage N]` on free ports (no `--stage`: the default).
    fn start(stage: Option<u8>, data: &std::path::Path) -> Stage {
        Self::start_with(stage, data, &[])
    }

    /// `start`, with more flags for `scaleout up`.
    fn start_with(stage: Option<u8>, data: &std::path::Path, extra: &[&str]) -> Stage {
        Self::start_logging(stage, data, extra, None)
    }

    /// `start_with`, its logs (and its children's) at `log` kept for the
    /// test (`self.proc.logs()`).
    fn start_logging(
        stage: Option<u8>,
        data: &std::path::Path,
        extra: &[&str],
        log: Option<&str>,
    ) -> Stage {
        let stage = stage.map(|n| n.to_string());
        let mut args = vec!["up", "--port-base", "0", "--data", data.to_str().unwrap()];
        if let Some(n) = &stage {
            args.extend(["--stage", n.as_str()]);
        }
        args.extend_from_slice(extra);
        let mut proc = match log {
            Some(filter) => Proc::spawn_logging(&args, filter),
            None => Proc::spawn(&args),
        };
        let open = proc.wait_for_line("open http");
        let site = open
            .split_whitespace()
            .find(|w| w.starts_with("http://") || w.starts_with("https://"))
            .unwrap()
            .trim_end_matches('/')
            .to_string();
        let mut members = BTreeMap::new();
        let mut dns = None;
        for line in &proc.stdout {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.first() == Some(&"dns") && words.get(2) == Some(&"pid") {
                dns = Some((words[1].parse().unwrap(), words[3].parse().unwrap()));
            }
            if words.len() >= 4 && words[1].starts_with("http") && words[2] == "pid" {
                members.insert(
                    words[0].to_string(),
                    (words[1].to_string(), words[3].parse().unwrap()),
                );
            }
        }
        Stage {
            proc,
            members,
            site,
            dns,
        }
    }

    /// GET /api/links/CODE through the site.
    async fn lookup(&self, code: &str) -> reqwest::Response {
        read_link(&self.site, code, None).await
    }

    fn url(&self, name: &str) -> &str {
        &self.members[name].0
    }

    /// SIGTERM, and the lab stops every child before it exits.
    fn stop(mut self) {
        self.proc.signal(Signal::SIGTERM);
        assert!(self.proc.wait_exit(Duration::from_secs(30)).success());
        let dns = self
            .dns
            .iter()
            .map(|(_, pid)| ("dns".to_string(), (String::new(), *pid)));
        for (name, (_, pid)) in self.members.clone().into_iter().chain(dns) {
            let alive = kill(Pid::from_raw(pid), None).is_ok();
            assert!(!alive, "{name} (pid {pid}) outlived scaleout up");
        }
    }

    fn kill9(&self, name: &str) {
        kill(Pid::from_raw(self.members[name].1), Signal::SIGKILL).unwrap();
    }
}

async fn create(base: &str, url: &str, cookie: Option<&str>) -> reqwest::Response {
    let mut req = client()
        .post(format!("{base}/api/links"))
        .json(&json!({ "url": url }));
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    req.send().await.unwrap()
}

/// Creates a link through `base`, checks that the database leader (db-1)
/// wrote it, and returns the browser's cookie and the link's code.
async fn create_on_leader(base: &str, url: &str) -> (String, String) {
    let r = create(base, url, None).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-db-node"], "db-1");
    let cookie = cookie_of(&r);
    let code = r.json::<Value>().await.unwrap()["code"]
        .as_str()
        .unwrap()
        .to_string();
    (cookie, code)
}

/// `GET /api/links/CODE` through `base`, with the browser's cookie if any.
async fn read_link(base: &str, code: &str, cookie: Option<&str>) -> reqwest::Response {
    let mut req = client().get(format!("{base}/api/links/{code}"));
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    req.send().await.unwrap()
}

fn cookie_of(resp: &reqwest::Response) -> String {
    resp.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

/// Reads served by a database node, from its metrics.
async fn reads_on(url: &str) -> u64 {
    let text = common::get_text(&format!("{url}/metrics")).await;
    text.lines()
        .find(|l| l.starts_with("scaleout_db_requests_total{kind=\"read\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage2_runs_the_web_tier_and_the_database_apart() {
    let dir = tempfile::tempdir().unwrap();
    let stage = Stage::start(Some(2), dir.path());
    assert!(stage.members.contains_key("db-1") && stage.members.contains_key("web-1"));
    assert_eq!(stage.site, stage.url("web-1"));
    let (cookie, code) = create_on_leader(&stage.site, "https://example.com/two").await;
    let r = client()
        .get(format!("{}/{code}", stage.site))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "https://example.com/two");
    let home = client().get(&stage.site).send().await.unwrap();
    assert_eq!(home.headers()["x-db-node"], "db-1");
    assert!(home.text().await.unwrap().contains("example.com/two"));

    // Deletes through the replicated store need the link's own token.
    let made = create(&stage.site, "https://example.com/mine", None).await;
    let token = made.json::<Value>().await.unwrap();
    let (mine, token) = (
        token["code"].as_str().unwrap().to_string(),
        token["delete_token"].as_str().unwrap().to_string(),
    );
    let delete = |code: String, token: Option<String>| {
        let site = stage.site.clone();
        async move {
            let mut req = client().delete(format!("{site}/api/links/{code}"));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            req.send().await.unwrap().status().as_u16()
        }
    };
    assert_eq!(delete(code.clone(), None).await, 401);
    assert_eq!(
        delete(code.clone(), Some(token.clone())).await,
        403,
        "not this link's token"
    );
    assert_eq!(delete(mine.clone(), Some(token.clone())).await, 204);
    assert_eq!(delete(mine, Some(token)).await, 404);
    assert_eq!(read_link(&stage.site, &code, None).await.status(), 200);
    stage.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage3_balances_two_web_servers_over_one_database() {
    let dir = tempfile::tempdir().unwrap();
    let stage = Stage::start(Some(3), dir.path());
    assert_eq!(stage.site, stage.url("lb"));
    let r = create(&stage.site, "https://example.com/three", None).await;
    assert_eq!(r.status(), 201);
    let code = r.json::<Value>().await.unwrap()["code"]
        .as_str()
        .unwrap()
        .to_string();
    let mut served_by = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let r = stage.lookup(&code).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-db-node"], "db-1");
        served_by.insert(r.headers()["x-served-by"].to_str().unwrap().to_string());
    }
    assert_eq!(
        served_by.into_iter().collect::<Vec<_>>(),
        vec!["web-1", "web-2"],
        "the load balancer spreads over both web servers"
    );

    // A browser that deletes a link through one web server is not sent to
    // it by the other's cache: an entry older than its cookie is skipped.
    let r = create(&stage.site, "https://example.com/gone", None).await;
    assert_eq!(r.status(), 201);
    let made: Value = r.json().await.unwrap();
    let (gone, token) = (
        made["code"].as_str().unwrap().to_string(),
        made["delete_token"].as_str().unwrap().to_string(),
    );
    for web in ["web-1", "web-2"] {
        for expected in ["miss", "hit"] {
            let r = client()
                .get(format!("{}/{gone}", stage.url(web)))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 302, "{web}");
            assert_eq!(r.headers()["x-cache"], expected, "{web}");
        }
    }
    let r = client()
        .delete(format!("{}/api/links/{gone}", stage.url("web-1")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let cookie = cookie_of(&r);
    let r = client()
        .get(format!("{}/{gone}", stage.url("web-2")))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        404,
        "web-2's cache undid this browser's own delete"
    );

    // The lb's admin API (it can add a backend that would take real
    // users' requests) wants the token the lab made, readable by its
    // owner only.
    let line = stage
        .proc
        .stdout
        .iter()
        .find(|l| l.trim_start().starts_with("lb ") && l.contains("admin API"))
        .expect("the lb's line names its admin API")
        .clone();
    let admin = line.split_whitespace().last().unwrap().to_string();
    let token_file = dir.path().join("stage3").join("lb-admin-token");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o077,
        0,
        "the token file is the owner's alone: {mode:o}"
    );
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let add = json!({"url": "http://127.0.0.1:9", "name": "intruder"});
    let r = client()
        .post(format!("{admin}/backends"))
        .json(&add)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no token, no backend");
    let r = client()
        .post(format!("{admin}/backends"))
        .bearer_auth("not-the-token")
        .json(&add)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(format!("{admin}/backends"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.text().await.unwrap().contains("intruder"));
    stage.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage4_splits_reads_from_writes_and_survives_losing_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let stage = Stage::start(Some(4), dir.path());
    for name in [
        "lb", "web-1", "web-2", "db-1", "db-2", "db-3", "db-4", "db-5",
    ] {
        assert!(
            stage.members.contains_key(name),
            "{name} missing: {:?}",
            stage.members
        );
    }

    // Writes land on the leader; read-your-writes across web servers.
    let (cookie, code) = create_on_leader(stage.url("web-1"), "https://example.com/ryw").await;
    for _ in 0..10 {
        let r = read_link(stage.url("web-2"), &code, Some(&cookie)).await;
        assert_eq!(
            r.status(),
            200,
            "read-your-writes through the other web server"
        );
        let node = r.headers()["x-db-node"].to_str().unwrap().to_string();
        assert!(
            node == "db-4" || node == "db-5",
            "read on a replica, not {node}"
        );
    }

    // Monotonic reads: a read tells the browser which state it saw (at
    // least its write), so no later read, on any replica, shows older data;
    // a cookie already that new is left alone.
    let seen_at = |c: &str| c.split('=').nth(1).unwrap().parse::<u64>().unwrap();
    let r = read_link(stage.url("web-1"), &code, None).await;
    assert_eq!(r.status(), 200);
    let read_cookie = cookie_of(&r);
    assert!(
        seen_at(&read_cookie) >= seen_at(&cookie),
        "{read_cookie} {cookie}"
    );
    let r = read_link(stage.url("web-1"), &code, Some(&read_cookie)).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("set-cookie").is_none(), "{:?}", r.headers());

    // Reads through the load balancer spread over both replicas.
    let before: Vec<u64> = futures_reads(&stage).await;
    for _ in 0..40 {
        let r = stage.lookup(&code).await;
        assert_eq!(r.status(), 200);
    }
    let after: Vec<u64> = futures_reads(&stage).await;
    let gained: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    eprintln!("reads gained per node db-1..db-5: {gained:?}");
    assert!(
        gained[3] >= 10 && gained[4] >= 10,
        "both replicas serve reads: {gained:?}"
    );
    assert!(
        gained[0] + gained[1] + gained[2] <= 2,
        "voters serve (almost) no reads: {gained:?}"
    );

    // Kill the database leader while links are created through the lb.
    let site = stage.site.clone();
    let creator = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut failed = Vec::new();
        let started = Instant::now();
        let mut n = 0;
        while started.elapsed() < Duration::from_secs(7) {
            n += 1;
            let sent = client()
                .post(format!("{site}/api/links"))
                .json(&json!({ "url": format!("https://example.com/f{n}") }))
                .send()
                .await;
            match sent {
                Ok(r) if r.status() == 201 => {
                    let code = r.json::<Value>().await.unwrap()["code"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    acked.push((code, Instant::now()));
                }
                _ => failed.push(Instant::now()),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (acked, failed)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed_at = Instant::now();
    stage.kill9("db-1");
    let (acked, failed) = creator.await.unwrap();
    let after_kill: Vec<_> = acked.iter().filter(|(_, at)| *at > killed_at).collect();
    eprintln!(
        "{} links created, {} after the kill (first {:?} after it), {} failed",
        acked.len(),
        after_kill.len(),
        after_kill
            .first()
            .map(|(_, at)| at.duration_since(killed_at)),
        failed.len()
    );
    // Failures (5xx: a write whose outcome the leader's death left
    // unknown) only inside the failover window.
    let window_end = after_kill.first().map_or(killed_at, |(_, at)| *at);
    for at in &failed {
        assert!(
            *at >= killed_at && *at <= window_end,
            "a create failed outside the failover window"
        );
    }
    assert!(
        !after_kill.is_empty(),
        "creation works again after the failover"
    );
    assert!(
        after_kill[0].1.duration_since(killed_at) < Duration::from_secs(6),
        "creation resumed within the bound"
    );
    // Every acknowledged link exists (read back through the lb).
    for (code, _) in &acked {
        let r = stage.lookup(code).await;
        assert_eq!(r.status(), 200, "acknowledged link {code} lost");
    }

    // A replica hangs (SIGSTOP): reads go on through the other, and none
    // waits on the hung one for long (without a limit per read it would be
    // held up to the client's 10 s timeout).
    let paused = stage.members["db-5"].1;
    kill(Pid::from_raw(paused), Signal::SIGSTOP).unwrap();
    let mut slowest = Duration::ZERO;
    let mut ok = 0;
    for _ in 0..10 {
        let started = Instant::now();
        if stage.lookup(&code).await.status() == 200 {
            ok += 1;
        }
        slowest = slowest.max(started.elapsed());
    }
    kill(Pid::from_raw(paused), Signal::SIGCONT).unwrap();
    assert_eq!(ok, 10, "reads continue with one replica hung");
    assert!(
        slowest < Duration::from_secs(4),
        "a read waited {slowest:?}"
    );

    // A replica dies: reads go on through the other.
    stage.kill9("db-4");
    let mut ok = 0;
    for _ in 0..20 {
        let r = stage.lookup(&code).await;
        if r.status() == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 20, "reads continue with one replica down");
    eventually(Duration::from_secs(10), "reads settle on db-5", || async {
        let r = stage.lookup(&code).await;
        r.headers()["x-db-node"] == "db-5"
    })
    .await;

    // A replica added to the running cluster is found and takes reads.
    // It shows the lab's cluster secret, as every node of the lab does.
    let secret = dir.path().join("stage4").join("cluster-secret");
    let added = DbNode::start(
        6,
        dir.path(),
        &[
            "--join",
            stage.url("db-2"),
            "--read-only",
            "--cluster-secret-file",
            secret.to_str().unwrap(),
        ],
    );
    eventually(
        Duration::from_secs(20),
        "the new replica serves reads",
        || async {
            let r = stage.lookup(&code).await;
            r.status() == 200 && r.headers()["x-db-node"] == "db-6"
        },
    )
    .await;
    drop(added);
    stage.stop();
}

async fn futures_reads(stage: &Stage) -> Vec<u64> {
    let mut out = Vec::new();
    for name in ["db-1", "db-2", "db-3", "db-4", "db-5"] {
        out.push(reads_on(stage.url(name)).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage5_is_reached_by_name_and_survives_losing_a_load_balancer() {
    let dir = tempfile::tempdir().unwrap();
    // No --stage: stage 5 is the default.
    let stage = Stage::start(None, dir.path());
    assert_eq!(stage.site, stage.url("lb-1"));
    let (dns, _) = stage.dns.expect("the DNS server is listed");
    let port = stage.site.rsplit(':').next().unwrap().to_string();
    let ips = common::dns::lookup_a(dns, "www.scaleout.test.").await;
    assert_eq!(
        ips,
        vec![
            "127.0.0.2".parse::<std::net::IpAddr>().unwrap(),
            "127.0.0.3".parse().unwrap()
        ]
    );
    // The page, fetched from an answered address by name.
    for ip in &ips {
        let r = client()
            .get(format!("http://{ip}:{port}/"))
            .header("host", format!("www.scaleout.test:{port}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            r.text().await.unwrap().contains("web-"),
            "the links app answers"
        );
    }
    // A load balancer dies: the name stops pointing at it.
    stage.kill9("lb-1");
    eventually(
        Duration::from_secs(15),
        "lb-1 leaves the answer",
        || async move {
            common::dns::lookup_a(dns, "www.scaleout.test.").await
                == vec!["127.0.0.3".parse::<std::net::IpAddr>().unwrap()]
        },
    )
    .await;
    let r = client()
        .get(format!("http://127.0.0.3:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    stage.stop();
}

/// A browser whose cookie names a log index the cluster never reached (a
/// cookie from before a rebuild, or forged) is served at once and its
/// session starts afresh; nobody else sees an error, and the load
/// balancer keeps both web servers (the forged cookie once held each
/// request 20 s and ended in 503s that got them ejected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cookie_from_the_future_is_reset_and_hurts_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let stage = Stage::start(Some(4), dir.path());
    let (_, code) = create_on_leader(stage.url("web-1"), "https://example.com/future").await;
    let site = stage.site.clone();
    let forged = "scaleout_seen=18446744073709551615";
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let (site, code) = (site.clone(), code.clone());
        tasks.spawn(async move {
            let cookie = (i % 2 == 0).then_some(forged);
            let r = read_link(&site, &code, cookie).await;
            let status = r.status().as_u16();
            let reset = r
                .headers()
                .get("set-cookie")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            (cookie.is_some(), status, reset)
        });
    }
    while let Some(done) = tasks.join_next().await {
        let (forged_cookie, status, reset) = done.unwrap();
        assert_eq!(status, 200, "every read served");
        if forged_cookie {
            let reset = reset.expect("the forged session is reset");
            let index: u64 = reset
                .split(';')
                .next()
                .and_then(|c| c.split('=').nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap();
            assert!(index < u64::MAX && index > 0, "{reset}");
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "nothing waited for the forged index: {:?}",
        started.elapsed()
    );
    stage.stop();
}

/// `scaleout up --tls`: the seed's whole diagram over TLS. The site is
/// served over HTTPS by both load balancers (which the DNS server, checking
/// them over HTTPS, keeps in its answers), writes and reads cross every
/// hop, and plain HTTP reaches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_tls_serves_the_site_over_tls_on_every_hop() {
    let dir = tempfile::tempdir().unwrap();
    let stage = Stage::start_with(Some(5), dir.path(), &["--tls"]);
    assert!(stage.site.starts_with("https://"), "{}", stage.site);
    for (name, (url, _)) in &stage.members {
        assert!(url.starts_with("https://"), "{name} serves {url}");
    }
    let ca = dir.path().join("stage5").join("tls").join("ca.pem");
    let tls = scaleout_tls::ClientTls {
        ca: Some(ca),
        cert: None,
        key: None,
    };
    let port = stage
        .site
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let through = |lb: &str| {
        reqwest::Client::builder()
            .use_preconfigured_tls(tls.config().unwrap())
            .resolve("www.scaleout.test", format!("{lb}:{port}").parse().unwrap())
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let site = format!("https://www.scaleout.test:{port}");
    let r = through("127.0.0.2")
        .post(format!("{site}/api/links"))
        .json(&json!({"url": "https://example.com/over-tls"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let code = r.json::<Value>().await.unwrap()["code"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(
        Duration::from_secs(10),
        "the link is read back through lb-2",
        || {
            let (client, url) = (through("127.0.0.3"), format!("{site}/{code}"));
            async move {
                client.get(url).send().await.is_ok_and(|r| {
                    r.status() == 302 && r.headers()["location"] == "https://example.com/over-tls"
                })
            }
        },
    )
    .await;
    // The DNS server checks both load balancers over HTTPS (two failed
    // checks in a row, a second apart, would mark one down): both pass.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let metrics = stage
        .proc
        .stdout
        .iter()
        .find(|l| l.trim_start().starts_with("dns "))
        .and_then(|l| l.split_whitespace().last())
        .unwrap()
        .to_string();
    // The lab's DNS wants the lab's token (it edits its records with it).
    let token = std::fs::read_to_string(dir.path().join("stage5").join("lb-admin-token")).unwrap();
    let text = reqwest::Client::new()
        .get(format!("{metrics}/metrics"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for lb in ["127.0.0.2", "127.0.0.3"] {
        let line = format!("scaleout_dns_address_up{{address=\"{lb}\"}} 1");
        assert!(text.contains(&line), "{lb} is not up: {text}");
    }
    // The Raft ports take only the database nodes' certificates (their own
    // CA): a web server's or load balancer's key, the most exposed, cannot
    // speak Raft.
    let tls_dir = dir.path().join("stage5").join("tls");
    let as_who = |who: Option<&str>| {
        let tls = scaleout_tls::ClientTls {
            ca: Some(tls_dir.join("cluster-ca.pem")),
            cert: who.map(|w| tls_dir.join(format!("{w}.pem"))),
            key: who.map(|w| tls_dir.join(format!("{w}-key.pem"))),
        };
        reqwest::Client::builder()
            .use_preconfigured_tls(tls.config().unwrap())
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    };
    let nodes: Value = as_who(None)
        .get(format!("{}/nodes", stage.url("db-1")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let raft = nodes["2"]["addr"].as_str().unwrap().to_string();
    for who in ["web-1", "lb-1"] {
        let sent = as_who(Some(who))
            .get(format!("https://{raft}/raft/log"))
            .send()
            .await;
        assert!(
            sent.is_err(),
            "{who}'s certificate reached the Raft port: {sent:?}"
        );
    }
    // A node's certificate gets past the handshake, and then still needs
    // the lab's cluster secret.
    let sent = as_who(Some("db-2"))
        .get(format!("https://{raft}/raft/log"))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 401);
    // Plain HTTP reaches nothing: not the site, not a database node.
    let plain = format!("http://127.0.0.2:{port}/");
    assert!(client()
        .get(plain)
        .send()
        .await
        .map_or(true, |r| !r.status().is_success()));
    let db = stage.url("db-1").replacen("https://", "http://", 1);
    assert!(client()
        .get(format!("{db}/status"))
        .send()
        .await
        .map_or(true, |r| !r.status().is_success()));
    stage.stop();
}

/// One request id from the browser's request to the database's log: the
/// load balancer keeps a client's acceptable id (1–128 visible ASCII
/// characters) and replaces any other, the web server passes it on to
/// every database call it makes for that request, and the database node
/// logs its requests under it. Each hop answers with the id it used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_runs_from_the_load_balancer_to_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let stage = Stage::start_logging(
        Some(3),
        dir.path(),
        &[],
        Some("warn,openraft=off,scaleout_db=debug"),
    );
    let db_logged = |id: &str| {
        let needle = format!("request_id={id}");
        stage.proc.logs().iter().any(|l| l.contains(&needle))
    };
    // A client's own id, through a page that reads the database.
    let mine = "trace-7f3a.the-client's-own_id";
    let r = client()
        .get(format!("{}/api/links", stage.site))
        .header("x-request-id", mine)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], mine);
    eventually(
        Duration::from_secs(10),
        "the database logs the client's id",
        || async { db_logged(mine) },
    )
    .await;
    // An id over the length limit is replaced, and the replacement is
    // what reaches the database; so is one with a space in it.
    for unacceptable in ["x".repeat(129), "two words".to_string()] {
        let r = client()
            .post(format!("{}/api/links", stage.site))
            .header("x-request-id", &unacceptable)
            .json(&json!({ "url": "https://example.com/traced-too" }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let given = r.headers()["x-request-id"].to_str().unwrap().to_string();
        assert_ne!(given, unacceptable);
        assert!(
            scaleout_wire::request_id::acceptable(given.as_bytes()),
            "{given:?}"
        );
        eventually(
            Duration::from_secs(10),
            "the database logs the new id",
            || async { db_logged(&given) },
        )
        .await;
        assert!(!db_logged(&unacceptable));
    }
    stage.stop();
}

/// Every role's `/metrics` is one library's OpenMetrics exposition, with
/// the names the README documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_exposes_well_formed_openmetrics() {
    let dir = tempfile::tempdir().unwrap();
    let stage = Stage::start(Some(3), dir.path());
    // Something to count first.
    let r = create(&stage.site, "https://example.com/metered", None).await;
    assert_eq!(r.status(), 201);
    let admin = stage
        .proc
        .stdout
        .iter()
        .find_map(|l| l.split("admin API ").nth(1))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let token = std::fs::read_to_string(dir.path().join("stage3/lb-admin-token")).unwrap();
    let lb = common::scrape_openmetrics(&format!("{admin}/metrics"), Some(token.trim())).await;
    assert!(
        lb.contains("scaleout_lb_responses_total{code=\"2xx\"}"),
        "{lb}"
    );
    assert!(lb.contains("# TYPE scaleout_lb_backend_request_duration_seconds histogram"));
    let web = common::scrape_openmetrics(&format!("{}/metrics", stage.url("web-1")), None).await;
    assert!(web.contains("scaleout_web_http_requests_total{"), "{web}");
    let db = common::scrape_openmetrics(&format!("{}/metrics", stage.url("db-1")), None).await;
    assert!(
        db.contains("scaleout_db_requests_total{kind=\"write\"}"),
        "{db}"
    );
    assert!(db.contains("scaleout_db_role{role=\"leader\"} 1"), "{db}");
    stage.stop();
}
