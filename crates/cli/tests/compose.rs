//! Across containers: the image built here (`scripts/image.sh`, this
//! build's binary), `deploy/compose/compose.yaml` brought up as it is
//! shipped (one container per server, three networks), and the seed's
//! claims checked from the host: DNS answers with both load balancers; a
//! link created through one is read through the other; `--scale web=3`
//! puts the new web servers into rotation through discovery; the leader's
//! container killed under writes, writes resume and no acknowledged one
//! is lost. Everything goes at the end: containers, networks, volumes and
//! the image. Skipped, saying so, where no Docker engine with Compose
//! answers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use scaleout_lab::compose::{self, Compose};
use serde_json::Value;

/// Takes the project and the image down, whatever happens.
struct Cleanup {
    compose: Compose,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = self.compose.down() {
            eprintln!("compose down: {e}");
        }
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.image])
            .output();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn until<F, Fut>(within: Duration, what: &str, compose: &Compose, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        if Instant::now() > deadline {
            let logs: Vec<String> = ["db-1", "web", "lb-1", "dns"]
                .iter()
                .map(|s| compose.logs(s))
                .collect();
            panic!("not within {within:?}: {what}\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One deployment at a time on this machine's two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_5_runs_across_containers() {
    let _one = ONE_AT_A_TIME.lock().await;
    let program = match compose::available() {
        Ok(p) => p,
        Err(why) => {
            eprintln!(
                "SKIPPED: {why}; the cross-container test needs a Docker engine with Compose"
            );
            return;
        }
    };
    let pid = std::process::id();
    let image = format!("scaleout-compose-test:{pid}");
    common::build_image(&image);
    let (lb1, lb2, dns) = (free_port(), free_port(), free_port());
    // The front network's /24, away from the chaos namespaces' 10.200-249.
    let front = format!("10.78.{}", pid % 250 + 1);
    let env: BTreeMap<String, String> = [
        ("SCALEOUT_IMAGE", image.clone()),
        ("SCALEOUT_CLUSTER_SECRET", format!("{:032x}", rand_u128())),
        ("SCALEOUT_FRONT", front.clone()),
        ("SCALEOUT_PORT_LB1", lb1.to_string()),
        ("SCALEOUT_PORT_LB2", lb2.to_string()),
        ("SCALEOUT_PORT_DNS", dns.to_string()),
        ("SCALEOUT_CREATE_RATE", "0".into()),
        ("SCALEOUT_LOG", "warn,openraft=off".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/compose/compose.yaml");
    let project = Compose::new(program, &format!("scaleout-test-{pid}"), file, env);
    let _cleanup = Cleanup {
        compose: project.clone(),
        image,
    };
    let up = {
        let project = project.clone();
        tokio::task::spawn_blocking(move || project.up(&[]))
    };
    up.await.unwrap().expect("compose up");
    let site1 = format!("http://127.0.0.1:{lb1}");
    let site2 = format!("http://127.0.0.1:{lb2}");
    let http = common::client();
    until(
        Duration::from_secs(120),
        "the site through lb-1",
        &project,
        || {
            let r = http.get(format!("{site1}/")).send();
            async move { r.await.is_ok_and(|r| r.status() == 200) }
        },
    )
    .await;

    // DNS, from the host through its published port: both load balancers.
    let dns_addr: std::net::SocketAddr = format!("127.0.0.1:{dns}").parse().unwrap();
    until(
        Duration::from_secs(30),
        "both load balancers in DNS",
        &project,
        || {
            let want = vec![
                format!("{front}.11").parse::<std::net::IpAddr>().unwrap(),
                format!("{front}.12").parse().unwrap(),
            ];
            async move { common::dns::lookup_a(dns_addr, "www.scaleout.test.").await == want }
        },
    )
    .await;

    // Created through one load balancer, read through the other.
    let made: Value = http
        .post(format!("{site1}/api/links"))
        .json(&serde_json::json!({"url": "https://example.com/across"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let code = made["code"].as_str().unwrap().to_string();
    until(
        Duration::from_secs(10),
        "read through lb-2",
        &project,
        || {
            let r = http.get(format!("{site2}/api/links/{code}")).send();
            async move { r.await.is_ok_and(|r| r.status() == 200) }
        },
    )
    .await;

    // Three web servers: the load balancers find the new ones by name.
    let scaled = {
        let project = project.clone();
        tokio::task::spawn_blocking(move || project.up(&["--scale", "web=3"]))
    };
    scaled.await.unwrap().expect("compose up --scale web=3");
    let served = Arc::new(Mutex::new(BTreeSet::new()));
    until(
        Duration::from_secs(60),
        "three web servers serving",
        &project,
        || {
            let (http, site, served) = (http.clone(), site1.clone(), served.clone());
            async move {
                for _ in 0..12 {
                    if let Ok(r) = http.get(format!("{site}/")).send().await {
                        if let Some(by) = r.headers().get("x-served-by") {
                            served
                                .lock()
                                .unwrap()
                                .insert(by.to_str().unwrap_or("").to_string());
                        }
                    }
                }
                served.lock().unwrap().len() >= 3
            }
        },
    )
    .await;

    // The leader's container killed under writes.
    let leader = leader_service(&project).await;
    let acknowledged = Arc::new(Mutex::new(Vec::<(Instant, String)>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (http, site, acknowledged, stop) = (
            http.clone(),
            site1.clone(),
            acknowledged.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let r = http
                    .post(format!("{site}/api/links"))
                    .json(&serde_json::json!({"url": format!("https://example.com/w/{n}")}))
                    .send()
                    .await;
                if let Ok(r) = r {
                    if r.status() == 201 {
                        if let Ok(v) = r.json::<Value>().await {
                            let code = v["code"].as_str().unwrap_or("").to_string();
                            acknowledged.lock().unwrap().push((Instant::now(), code));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed_at = Instant::now();
    let leader_container = project.container(&leader).expect("the leader's container");
    project.kill(&leader_container).expect("docker kill");
    until(
        Duration::from_secs(30),
        "writes acknowledged after the kill",
        &project,
        || {
            let acknowledged = acknowledged.clone();
            async move {
                acknowledged
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(at, _)| *at > killed_at + Duration::from_secs(1))
                    .count()
                    >= 5
            }
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    // The outage the writer saw: the longest time between two
    // acknowledged writes from the kill on.
    let times: Vec<Instant> = acknowledged
        .lock()
        .unwrap()
        .iter()
        .map(|(at, _)| *at)
        .collect();
    let outage = times
        .windows(2)
        .filter(|w| w[1] > killed_at)
        .map(|w| w[1].duration_since(w[0].max(killed_at)))
        .max()
        .unwrap_or_default();
    eprintln!(
        "killed {leader}'s container: writes stopped for at most {outage:?}; {} acknowledged in all",
        times.len()
    );
    // Back, with its volume; then every acknowledged write is there.
    project.start(&leader_container).expect("docker start");
    let codes: Vec<String> = acknowledged
        .lock()
        .unwrap()
        .iter()
        .map(|(_, c)| c.clone())
        .collect();
    assert!(codes.len() > 20, "writes went through: {}", codes.len());
    let mut lost = Vec::new();
    for code in &codes {
        let mut found = false;
        for _ in 0..3 {
            let r = http.get(format!("{site2}/api/links/{code}")).send().await;
            if r.is_ok_and(|r| r.status() == 200) {
                found = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if !found {
            lost.push(code.clone());
        }
    }
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}

/// The service whose database node leads, asked of any node through
/// `scaleout probe` in its container (the data network is the tier's own).
async fn leader_service(project: &Compose) -> String {
    for _ in 0..60 {
        for node in ["db-1", "db-2", "db-3"] {
            let Ok(id) = project.container(node) else {
                continue;
            };
            let out = Command::new("docker")
                .args([
                    "exec",
                    &id,
                    "/usr/local/bin/scaleout",
                    "probe",
                    "--print",
                    "http://127.0.0.1:4001/leader",
                ])
                .output()
                .unwrap();
            let said: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if let Some(id) = said["leader"]["id"].as_str() {
                return format!("db-{id}");
            }
            if let Some(id) = said["leader"]["id"].as_u64() {
                return format!("db-{id}");
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("no database node says who leads");
}

fn rand_u128() -> u128 {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .unwrap();
    u128::from_le_bytes(bytes)
}

/// `scaleout chaos --on compose`: the same workloads, faults and checker
/// against the Compose deployment, faults through the engine (docker
/// kill and start, pause, network disconnect); nothing lost, nothing
/// duplicated, every node identical, registers linearizable; the project
/// gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chaos_checker_runs_across_containers() {
    let _one = ONE_AT_A_TIME.lock().await;
    if let Err(why) = compose::available() {
        eprintln!("SKIPPED: {why}; chaos --on compose needs a Docker engine with Compose");
        return;
    }
    let image = format!("scaleout-chaos-test:{}", std::process::id());
    common::build_image(&image);
    struct Image(String);
    impl Drop for Image {
        fn drop(&mut self) {
            let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
        }
    }
    let _image = Image(image.clone());
    let dir = tempfile::tempdir().unwrap();
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/compose/compose.yaml");
    let history = dir.path().join("history.jsonl");
    let args = [
        "chaos".to_string(),
        "--on".into(),
        "compose".into(),
        "--compose-file".into(),
        file.display().to_string(),
        "--image".into(),
        image.clone(),
        "--seed".into(),
        "5".into(),
        "--duration".into(),
        "45s".into(),
        "--fault-every".into(),
        "6s".into(),
        "--faults".into(),
        "kill-leader,pause-db,kill-web,partition-leader".into(),
        "--data".into(),
        dir.path().display().to_string(),
        "--history".into(),
        history.display().to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_scaleout"))
            .args(args)
            .env("SCALEOUT_LOG", "warn")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{said}");
    assert!(out.status.success(), "{said}");
    assert!(said.contains(", 0 violations"), "{said}");
    for kind in ["kill-leader", "pause-db", "kill-web", "partition-leader"] {
        assert!(
            said.contains(&format!("ms {kind}")),
            "no {kind} made: {said}"
        );
    }
    assert!(history.exists());
    // Taken down: no container of a chaos project is left.
    let left = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!(
                "label=com.docker.compose.project=scaleout-chaos-{}",
                out_pid(&said)
            ),
        ])
        .output()
        .unwrap();
    assert!(left.stdout.is_empty(), "containers left behind");
}

/// The chaos run's pid, from its "as project scaleout-chaos-PID" line.
fn out_pid(said: &str) -> String {
    said.split("scaleout-chaos-")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("none")
        .to_string()
}
