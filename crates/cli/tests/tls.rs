//! TLS on every hop: client → lb → web → db and db ↔ db, with good, wrong
//! and missing certificates; certificates reloaded without a restart; and
//! `scaleout up --tls` serving the site.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::db::DbNode;
use common::{eventually, Proc};
use scaleout_tls::{ClientTls, LocalCa};
use serde_json::{json, Value};

/// A CA's files in `dir`: `NAME-ca.pem`, and per issued `WHO`:
/// `WHO.pem`, `WHO-key.pem`.
struct Pki {
    dir: PathBuf,
    ca: LocalCa,
    name: String,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let ca = LocalCa::new(name).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), ca.cert_pem()).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            ca,
            name: name.into(),
        }
    }

    fn ca(&self) -> String {
        self.path(&format!("{}-ca.pem", self.name))
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_str().unwrap().to_string()
    }

    /// Issues a certificate for 127.0.0.1 and localhost; returns (cert, key).
    fn issue(&self, who: &str) -> (String, String) {
        let issued = self
            .ca
            .issue(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        let (cert, key) = (format!("{who}.pem"), format!("{who}-key.pem"));
        std::fs::write(self.dir.join(&cert), issued.cert_pem).unwrap();
        std::fs::write(self.dir.join(&key), issued.key_pem).unwrap();
        (self.path(&cert), self.path(&key))
    }

    /// A client trusting this CA, showing `who`'s certificate if given.
    fn client(&self, who: Option<&str>) -> reqwest::Client {
        let tls = ClientTls {
            ca: Some(self.ca().into()),
            cert: who.map(|w| self.path(&format!("{w}.pem")).into()),
            key: who.map(|w| self.path(&format!("{w}-key.pem")).into()),
        };
        reqwest::Client::builder()
            .use_preconfigured_tls(tls.config().unwrap())
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }
}

fn tls_args<'a>(cert: &'a str, key: &'a str, ca: &'a str) -> Vec<&'a str> {
    vec!["--tls-cert", cert, "--tls-key", key, "--tls-ca", ca]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hop_speaks_tls_and_refuses_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "cluster");
    let rogue = Pki::new(dir.path(), "rogue");
    let (c1, k1) = pki.issue("db-1");
    let (c2, k2) = pki.issue("db-2");
    let (rc, rk) = rogue.issue("intruder");
    let ca = pki.ca();

    // db ↔ db: a two-node cluster over mutual TLS.
    let db1 = DbNode::start(1, dir.path(), &tls_args(&c1, &k1, &ca));
    assert!(db1.api.starts_with("https://"), "{}", db1.api);
    let mut args = vec!["--join", db1.api.as_str()];
    args.extend(tls_args(&c2, &k2, &ca));
    let db2 = DbNode::start(2, dir.path(), &args);
    let good = pki.client(None);
    eventually(Duration::from_secs(20), "db-2 joined over TLS", || {
        let (good, url) = (good.clone(), db1.url("/nodes"));
        async move {
            match good.get(url).send().await {
                Ok(r) => r.json::<Value>().await.is_ok_and(|n| {
                    n.as_object().is_some_and(|m| {
                        m.len() == 2 && m.values().all(|v| v["reachable"] == json!(true))
                    })
                }),
                Err(_) => false,
            }
        }
    })
    .await;
    let r = good
        .post(db1.url("/db/execute?raft_index"))
        .json(&json!(["CREATE TABLE t (x)", "INSERT INTO t VALUES (1)"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let raft_index = r.json::<Value>().await.unwrap()["raft_index"].as_u64();
    assert!(raft_index.is_some());
    // Replicated to db-2 over the TLS Raft port.
    eventually(Duration::from_secs(10), "db-2 applied the write", || {
        let (good, url) = (
            good.clone(),
            db2.url("/db/query?level=none&q=SELECT%20count(*)%20FROM%20t"),
        );
        async move {
            let Ok(r) = good.get(url).send().await else {
                return false;
            };
            r.json::<Value>()
                .await
                .is_ok_and(|v| v["results"][0]["values"] == json!([[1]]))
        }
    })
    .await;

    // The API: plain HTTP gets nothing; a client trusting another CA refuses
    // the node; one that trusts the cluster's CA is served.
    let plain = common::client()
        .get(db1.url("/status").replacen("https://", "http://", 1))
        .send()
        .await;
    assert!(
        plain.map_or(true, |r| !r.status().is_success()),
        "no plain HTTP on a TLS port"
    );
    assert!(rogue
        .client(None)
        .get(db1.url("/status"))
        .send()
        .await
        .is_err());
    assert_eq!(
        good.get(db1.url("/status")).send().await.unwrap().status(),
        200
    );

    // The Raft port: a forged RPC with no client certificate, or with one
    // from another CA, never gets past the handshake.
    let raft = format!("https://{}/raft/append", db1.raft);
    let forged = json!({"vote": {"leader_id": {"term": 999, "node_id": 9}, "committed": true}});
    for (who, client) in [
        ("no certificate", pki.client(None)),
        ("a rogue certificate", {
            let tls = ClientTls {
                ca: Some(ca.clone().into()),
                cert: Some(rc.clone().into()),
                key: Some(rk.clone().into()),
            };
            reqwest::Client::builder()
                .use_preconfigured_tls(tls.config().unwrap())
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap()
        }),
    ] {
        let sent = client.post(&raft).json(&forged).send().await;
        assert!(
            sent.is_err(),
            "{who}: the Raft port must refuse the handshake, got {sent:?}"
        );
    }

    // A rogue node (certificate from another CA) cannot join.
    let mut args = vec!["--join", db1.api.as_str()];
    let rogue_ca = rogue.ca();
    args.extend(tls_args(&rc, &rk, &rogue_ca));
    let _intruder = DbNode::start(3, dir.path(), &args);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let nodes: Value = good
        .get(db1.url("/nodes"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        nodes.as_object().unwrap().len(),
        2,
        "the intruder is not a member: {nodes}"
    );

    // web → db over TLS, lb → web over mutual TLS, client → lb over TLS.
    let (wc, wk) = pki.issue("web-1");
    let (lc, lk) = pki.issue("lb");
    let mut web = Proc::spawn(&[
        "web",
        "--listen",
        "127.0.0.1:0",
        "--db",
        &db1.api,
        "--db-ca",
        &ca,
        "--tls-cert",
        &wc,
        "--tls-key",
        &wk,
        "--tls-client-ca",
        &ca,
        "--name",
        "web-1",
    ]);
    let ready = web.wait_ready();
    assert_eq!(
        (ready.role.as_str(), ready.name.as_deref()),
        ("web", Some("web-1"))
    );
    let web_url = ready.url;
    assert!(web_url.starts_with("https://"), "{web_url}");
    // The web server takes only the load balancer (a cluster certificate).
    assert!(pki
        .client(None)
        .get(format!("{web_url}/healthz"))
        .send()
        .await
        .is_err());
    assert_eq!(
        pki.client(Some("lb"))
            .get(format!("{web_url}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let mut lb = Proc::spawn(&[
        "lb",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--backend",
        &web_url,
        "--backend-ca",
        &ca,
        "--backend-cert",
        &lc,
        "--backend-key",
        &lk,
        "--tls-cert",
        &lc,
        "--tls-key",
        &lk,
    ]);
    let line = lb.wait_for_line("scaleout lb:");
    let site = line
        .split_whitespace()
        .find(|w| w.starts_with("https://"))
        .unwrap()
        .to_string();
    let r = good
        .post(format!("{site}/api/links"))
        .json(&json!({"url": "https://example.com/tls"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let r = good.get(format!("{site}/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("example.com/tls"));
    // A load balancer without a client certificate is refused by the web
    // server: its backend goes down, and the site answers 502/503.
    refused_by_the_web_server(&web_url, &["--backend-ca", &ca]).await;
    // A load balancer showing a certificate from another CA is refused
    // by the web server just the same.
    refused_by_the_web_server(
        &web_url,
        &[
            "--backend-ca",
            &ca,
            "--backend-cert",
            &rc,
            "--backend-key",
            &rk,
        ],
    )
    .await;
    // A load balancer that trusts another CA refuses the web server.
    refused_by_the_web_server(
        &web_url,
        &[
            "--backend-ca",
            &rogue_ca,
            "--backend-cert",
            &lc,
            "--backend-key",
            &lk,
        ],
    )
    .await;

    // web → db: a web server that trusts another CA never reaches the
    // database, and says so.
    let out = tokio::process::Command::new(common::BIN)
        .args([
            "web",
            "--listen",
            "127.0.0.1:0",
            "--db",
            &db1.api,
            "--db-ca",
            &rogue_ca,
            "--db-wait",
            "2s",
        ])
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("database"), "{err}");
    // https without a CA is refused before anything starts.
    let out = std::process::Command::new(common::BIN)
        .args(["web", "--listen", "127.0.0.1:0", "--db", &db1.api])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--db-ca"));
    drop((lb, web));
}

/// client → lb with `--tls-client-ca`: only clients holding a certificate
/// that CA issued are served.
#[tokio::test]
async fn a_load_balancer_can_take_only_clients_with_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "site");
    let rogue = Pki::new(dir.path(), "rogue");
    let (cert, key) = pki.issue("lb");
    pki.issue("alice");
    rogue.issue("mallory");
    let backend = common::backend::Backend::start("a").await;
    let ca = pki.ca();
    let mut lb = Proc::spawn(&[
        "lb",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--backend",
        &backend.url(),
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
    ]);
    let line = lb.wait_for_line("scaleout lb:");
    let site = line
        .split_whitespace()
        .find(|w| w.starts_with("https://"))
        .unwrap()
        .to_string();
    assert_eq!(
        pki.client(Some("alice"))
            .get(format!("{site}/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        pki.client(None)
            .get(format!("{site}/"))
            .send()
            .await
            .is_err(),
        "no certificate"
    );
    let mallory = ClientTls {
        ca: Some(ca.clone().into()),
        cert: Some(rogue.path("mallory.pem").into()),
        key: Some(rogue.path("mallory-key.pem").into()),
    };
    let mallory = reqwest::Client::builder()
        .use_preconfigured_tls(mallory.config().unwrap())
        .build()
        .unwrap();
    assert!(
        mallory.get(format!("{site}/")).send().await.is_err(),
        "another CA's certificate"
    );
    assert_eq!(
        backend.hits(),
        1,
        "only alice's request reached the backend"
    );
    drop(lb);
}

/// A plaintext load balancer in front of the TLS web server at `web_url`,
/// with `tls` as its backend TLS flags: the handshake fails, so its site
/// answers 5xx.
async fn refused_by_the_web_server(web_url: &str, tls: &[&str]) {
    let mut args = vec![
        "lb",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--backend",
        web_url,
        "--max-attempts",
        "1",
    ];
    args.extend_from_slice(tls);
    let mut lb = Proc::spawn(&args);
    let line = lb.wait_for_line("scaleout lb:");
    let site = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();
    let r = common::client()
        .get(format!("{site}/"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "{tls:?}: {}", r.status());
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "site");
    let (cert, key) = pki.issue("lb");
    let backend = common::backend::Backend::start("a").await;
    let mut lb = Proc::spawn(&[
        "lb",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--backend",
        &backend.url(),
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    let line = lb.wait_for_line("scaleout lb:");
    let site = line
        .split_whitespace()
        .find(|w| w.starts_with("https://"))
        .unwrap()
        .to_string();
    let site = site.replacen("127.0.0.1", "localhost", 1);
    let port: u16 = site.rsplit(':').next().unwrap().parse().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(
        pki.client(None)
            .get(format!("{site}/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Renew with a certificate from a new CA: clients of the old CA now
    // refuse, clients of the new one are served, with the same process.
    let renewed = Pki::new(dir.path(), "renewed");
    let issued = renewed.ca.issue(&["localhost".into()]).unwrap();
    std::fs::write(&key, issued.key_pem).unwrap();
    std::fs::write(&cert, issued.cert_pem).unwrap();
    eventually(
        Duration::from_secs(10),
        "the renewed certificate is served",
        || {
            let client = reqwest::Client::builder()
                .use_preconfigured_tls(
                    ClientTls {
                        ca: Some(renewed.ca().into()),
                        cert: None,
                        key: None,
                    }
                    .config()
                    .unwrap(),
                )
                .resolve("localhost", addr)
                .build()
                .unwrap();
            let url = format!("{site}/");
            async move {
                client
                    .get(url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
            }
        },
    )
    .await;
    assert!(pki
        .client(None)
        .get(format!("{site}/"))
        .send()
        .await
        .is_err());
    assert!(lb.pid().as_raw() > 0);
}

/// The plaintext fast path's strictness holds for requests that come over
/// TLS too (hyper's path): one Host, no transfer coding but a lone
/// chunked, an HTTP/1.1 request with a Host. (A request with both a coding
/// and a length is read as chunked there, hyper dropping the length as
/// RFC 9112 §6.3 allows; the fast path refuses it.)
#[tokio::test]
async fn strict_parsing_holds_over_tls() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "site");
    let (cert, key) = pki.issue("lb");
    let backend = common::backend::Backend::start("a").await;
    let mut lb = Proc::spawn(&[
        "lb",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--backend",
        &backend.url(),
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    let line = lb.wait_for_line("scaleout lb:");
    let site = line
        .split_whitespace()
        .find(|w| w.starts_with("https://"))
        .unwrap()
        .to_string();
    let addr: std::net::SocketAddr = site.trim_start_matches("https://").parse().unwrap();
    let connector = ClientTls {
        ca: Some(pki.ca().into()),
        cert: None,
        key: None,
    }
    .connector()
    .unwrap();
    let exchange = |raw: &'static [u8]| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            tls.write_all(raw).await.unwrap();
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    for (raw, status) in [
        (&b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n"[..], "400"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n0\r\n\r\n", "501"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n", "501"),
        (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", "200"),
    ] {
        let answer = exchange(raw).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{:?}: {answer}",
            String::from_utf8_lossy(raw)
        );
    }
    assert_eq!(
        backend.hits(),
        1,
        "only the well-formed request reached the backend"
    );
    drop(lb);
}
