//! `scaleout bench` against a server that counts what it gets: the
//! report's request count is the server's own; a fixed rate is held; a
//! dead server's requests are counted as errors; bad flags get a clear
//! message.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::backend::Backend;
use common::BIN;
use serde_json::Value;

fn bench(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(BIN)
        .arg("bench")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_counts_what_the_server_counted() {
    let backend = Backend::start("counted").await;
    let url = format!("{}/anything", backend.url());
    let report = tokio::task::spawn_blocking(move || {
        bench(&[&url, "-c", "8", "-d", "3s", "-n", "1500", "--json"])
    })
    .await
    .unwrap();
    let (ok, out, err) = report;
    assert!(ok, "{out}{err}");
    let r: Value = serde_json::from_str(out.trim()).unwrap();
    let sent = r["requests"].as_u64().unwrap();
    assert_eq!(sent, backend.hits(), "{r}");
    assert_eq!(r["statuses"]["200"].as_u64(), Some(sent), "{r}");
    assert!(sent > 0 && sent <= 1500, "{r}");
    let l = &r["latency_ms"];
    assert!(
        l["p50"].as_f64().unwrap() <= l["p99"].as_f64().unwrap(),
        "{r}"
    );
    assert!(
        l["p99"].as_f64().unwrap() <= l["max"].as_f64().unwrap(),
        "{r}"
    );
}

/// At a fixed rate the count follows the rate, not the server's speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_rate_is_held() {
    let backend = Backend::start("paced").await;
    let url = backend.url();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        bench(&[&url, "-c", "4", "--rate", "100", "-d", "2s", "--json"])
    })
    .await
    .unwrap();
    assert!(ok, "{out}{err}");
    let r: Value = serde_json::from_str(out.trim()).unwrap();
    let sent = r["requests"].as_u64().unwrap();
    assert_eq!(sent, backend.hits());
    // 100/s for 2 s: 200 due; a generous margin for a loaded machine.
    assert!((150..=205).contains(&sent), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_server_means_errors_and_bad_flags_a_message() {
    let (ok, out, err) = bench(&["http://127.0.0.1:9/", "-c", "2", "-d", "1s", "--json"]);
    assert!(ok, "{out}{err}");
    let r: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["requests"], 0, "{r}");
    assert!(r["errors"]["connect"].as_u64().unwrap() > 0, "{r}");
    for (args, says) in [
        (vec!["ftp://x/"], "http://"),
        (vec!["http://127.0.0.1:9/", "-c", "0"], "--connections"),
        (vec!["http://127.0.0.1:9/", "-d", "2h"], "--duration"),
        (vec!["http://127.0.0.1:9/", "--rate", "0"], "--rate"),
        (vec!["http://127.0.0.1:9/", "-H", "nocolon"], "Name: value"),
        (vec!["http://127.0.0.1:9/", "-m", "GE T"], "--method"),
        (vec!["http://127.0.0.1:9/", "--timeout", "1h"], "--timeout"),
        (
            vec!["http://127.0.0.1:9/", "-c", "10000", "--rate", "1e-300"],
            "--rate",
        ),
        (
            vec!["http://127.0.0.1:9/", "--links-mix", "0"],
            "--links-mix",
        ),
        (
            vec![
                "http://127.0.0.1:9/",
                "-c",
                "100",
                "--rate",
                "1",
                "-d",
                "10s",
            ],
            "after the run ends",
        ),
        (
            vec!["http://127.0.0.1:9/", "--links-mix", "2", "-m", "POST"],
            "cannot be used with",
        ),
    ] {
        let (ok, out, err) = bench(&args);
        assert!(!ok, "{args:?}: {out}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// The links mix against a real single server (stage 1's `scaleout web
/// --embedded-db`): one create in every N requests, the home page
/// otherwise, each counted by the server itself; every create made a
/// link that reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_links_mix_creates_and_reads_as_counted_by_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("links.sqlite");
    let mut web = common::Proc::spawn(&[
        "web",
        "--listen",
        "127.0.0.1:0",
        "--embedded-db",
        file.to_str().unwrap(),
        "--create-rate",
        "0",
    ]);
    let site = web.wait_ready().url;
    let url = site.clone();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        bench(&[
            &url,
            "-c",
            "4",
            "-n",
            "80",
            "-d",
            "20s",
            "--links-mix",
            "4",
            "--json",
        ])
    })
    .await
    .unwrap();
    assert!(ok, "{out}{err}");
    let r: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["requests"], 80, "{r}");
    assert_eq!(r["statuses"]["201"], 20, "one in four creates: {r}");
    assert_eq!(r["statuses"]["200"], 60, "{r}");
    let metrics = common::get_text(&format!("{site}/metrics")).await;
    let count = |route: &str, method: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with("scaleout_web_http_requests_total{"))
            .filter(|l| {
                l.contains(&format!("route=\"{route}\""))
                    && l.contains(&format!("method=\"{method}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    assert_eq!(count("/api/links", "POST"), 20, "{metrics}");
    assert_eq!(count("/", "GET"), 60, "{metrics}");
    let listed: Value = common::client()
        .get(format!("{site}/api/links?limit=100"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["links"].as_array().unwrap().len(), 20, "{listed}");
}
