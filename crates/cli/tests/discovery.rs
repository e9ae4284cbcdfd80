//! The load balancer's backends found by name (`scaleout lb --discover`):
//! the real binary, a real DNS server (`scaleout dns`, whose records API
//! changes the answer), real backends on 127.0.0.2-4.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::backend::Backend;
use common::{client, eventually, Lb, Proc};
use serde_json::Value;

/// Backends on 127.0.0.2, .3 and .4, all on one port (DNS answers carry
/// addresses, not ports).
async fn three_on_one_port() -> (Vec<Arc<Backend>>, u16) {
    'again: for _ in 0..20 {
        let first = Backend::start_on("a", "127.0.0.2:0".parse().unwrap()).await;
        let port = first.addr.port();
        for ip in ["127.0.0.3", "127.0.0.4"] {
            match tokio::net::TcpListener::bind((ip, port)).await {
                Ok(probe) => drop(probe),
                Err(_) => continue 'again,
            }
        }
        let b = Backend::start_on("b", SocketAddr::from(([127, 0, 0, 3], port))).await;
        let c = Backend::start_on("c", SocketAddr::from(([127, 0, 0, 4], port))).await;
        return (vec![first, b, c], port);
    }
    panic!("no port free on 127.0.0.2-4");
}

/// `scaleout dns` answering `web.scaleout.test` with 127.0.0.2, editable
/// with the token; its DNS address, its HTTP base and the token.
fn dns(dir: &std::path::Path) -> (Proc, SocketAddr, String, String) {
    let token_file = dir.join("token");
    let mut dns = Proc::spawn(&[
        "dns",
        "--listen",
        "127.0.0.1:0",
        "--zone",
        "scaleout.test",
        "--host",
        "web=127.0.0.2",
        "--ttl",
        "1",
        "--http-token-file",
        token_file.to_str().unwrap(),
    ]);
    let ready = dns.wait_ready();
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    (dns, ready.url.parse().unwrap(), ready.admin.unwrap(), token)
}

async fn set_answer(http: &str, token: &str, add: &[&str], remove: &[&str]) {
    for ip in add {
        let r = client()
            .post(format!("{http}/hosts/web"))
            .bearer_auth(token)
            .json(&serde_json::json!({ "addr": ip }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }
    for ip in remove {
        let r = client()
            .delete(format!("{http}/hosts/web/{ip}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }
}

/// The backends the load balancer sends to (found, and passing their
/// health checks), by name.
async fn backends(lb: &Lb) -> Vec<String> {
    listed(lb, true).await
}

/// The backends the load balancer has, by name; only those available
/// when `available`.
async fn listed(lb: &Lb, available: bool) -> Vec<String> {
    let list: Value = client()
        .get(lb.admin_url("/backends"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut names: Vec<String> = list["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| !available || b["available"] == true)
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

fn names(port: u16, ips: &[&str]) -> Vec<String> {
    ips.iter()
        .map(|ip| format!("web.scaleout.test-{ip}:{port}"))
        .collect()
}

async fn send(lb: &Lb, n: usize) {
    for _ in 0..n {
        let r = client().get(lb.url("/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
}

/// Every interval the name is looked up again: addresses that enter the
/// answer become backends taking traffic, those that leave it are drained
/// out; a lookup that fails (the DNS server gone) keeps the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_follow_their_names_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (servers, port) = three_on_one_port().await;
    let (mut dns, dns_addr, http, token) = dns(dir.path());
    let resolver = dns_addr.to_string();
    let url = format!("http://web.scaleout.test:{port}");
    let lb = Lb::start(&[
        "--discover",
        &url,
        "--discover-resolver",
        &resolver,
        "--discover-interval",
        "200ms",
        "--health-interval",
        "100ms",
    ]);
    let pool = || backends(&lb);
    eventually(
        Duration::from_secs(10),
        "the first answer's backend",
        || async { pool().await == names(port, &["127.0.0.2"]) },
    )
    .await;
    send(&lb, 10).await;
    assert!(servers[0].hits() >= 10);

    set_answer(&http, &token, &["127.0.0.3", "127.0.0.4"], &[]).await;
    eventually(Duration::from_secs(10), "three backends", || async {
        pool().await == names(port, &["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    })
    .await;
    let before: Vec<u64> = servers.iter().map(|s| s.hits()).collect();
    send(&lb, 60).await;
    for (s, b) in servers.iter().zip(&before) {
        assert!(s.hits() >= b + 10, "{} got {} of 60", s.name, s.hits() - b);
    }

    set_answer(&http, &token, &[], &["127.0.0.2"]).await;
    eventually(Duration::from_secs(10), "127.0.0.2 drained out", || async {
        pool().await == names(port, &["127.0.0.3", "127.0.0.4"])
    })
    .await;
    let a = servers[0].hits();
    send(&lb, 30).await;
    assert_eq!(
        servers[0].hits(),
        a,
        "no request for a backend out of the answer"
    );

    // The DNS server dies: lookups fail, the pool stays and serves.
    dns.signal(nix::sys::signal::Signal::SIGKILL);
    dns.wait_exit(Duration::from_secs(10));
    let failed = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("scaleout_lb_discovery_lookups_failed_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    eventually(Duration::from_secs(20), "lookups failing", || async {
        let text = common::get_text(&lb.admin_url("/metrics")).await;
        failed(&text) >= 2
    })
    .await;
    assert_eq!(pool().await, names(port, &["127.0.0.3", "127.0.0.4"]));
    send(&lb, 10).await;
}

/// A found backend failing its health check has its name looked up at
/// once, not only on the interval: with an hour between lookups, a
/// replacement that entered the answer takes over as soon as the old one
/// fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_makes_its_name_looked_up_again() {
    let dir = tempfile::tempdir().unwrap();
    let (servers, port) = three_on_one_port().await;
    let (_dns, dns_addr, http, token) = dns(dir.path());
    let resolver = dns_addr.to_string();
    let url = format!("http://web.scaleout.test:{port}");
    let lb = Lb::start(&[
        "--discover",
        &url,
        "--discover-resolver",
        &resolver,
        "--discover-interval",
        "1h",
        "--health-interval",
        "100ms",
        "--fall",
        "2",
    ]);
    eventually(
        Duration::from_secs(10),
        "the first answer's backend",
        || async { backends(&lb).await == names(port, &["127.0.0.2"]) },
    )
    .await;
    // The replacement enters the answer; nothing looks for an hour...
    set_answer(&http, &token, &["127.0.0.3"], &[]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(backends(&lb).await, names(port, &["127.0.0.2"]));
    // ...until the first one fails.
    servers[0].set_healthy(false);
    eventually(Duration::from_secs(10), "the replacement found", || async {
        listed(&lb, false).await == names(port, &["127.0.0.2", "127.0.0.3"])
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "served by the replacement",
        || async {
            client()
                .get(lb.url("/"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
    let b = servers[1].hits();
    send(&lb, 10).await;
    assert!(servers[1].hits() >= b + 10);
}

/// Bad `--discover` flags are refused with what to fix.
#[test]
fn bad_discovery_flags_say_what_to_fix() {
    for (args, says) in [
        (vec!["--discover", "web:8081"], "http://"),
        (vec!["--discover", "http://"], "not a URL"),
        (vec!["--discover", "ftp://web:21"], "http://"),
        (vec!["--discover", "http://web:8081/path"], "no path"),
        (
            vec![
                "--discover",
                "http://web:8081",
                "--discover-interval",
                "1ms",
            ],
            "100ms to 1h",
        ),
        (vec!["--discover", "https://web:8443"], "--backend-ca"),
        (
            vec![
                "--discover",
                "http://web:8081",
                "--discover-resolver",
                "nope",
            ],
            "nope",
        ),
    ] {
        let out = std::process::Command::new(common::BIN)
            .args(["lb", "--listen", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// Without `--discover-resolver` the system's resolver answers
/// (`/etc/hosts` first, as in a container where Docker's DNS does): a
/// backend found as `localhost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systems_resolver_is_the_default() {
    let server = Backend::start("local").await;
    let port = server.addr.port();
    let url = format!("http://localhost:{port}");
    let lb = Lb::start(&["--discover", &url]);
    let found = format!("localhost-127.0.0.1:{port}");
    eventually(Duration::from_secs(10), "localhost's backend", || async {
        backends(&lb).await.contains(&found)
    })
    .await;
    eventually(Duration::from_secs(10), "served through it", || async {
        client()
            .get(lb.url("/"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(server.hits() >= 1);
}
