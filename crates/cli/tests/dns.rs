//! `scaleout dns` black-box tests: the real binary, queried with
//! hickory-resolver, raw hickory-proto messages over UDP and TCP, and `dig`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use common::backend::Backend;
use common::dns::{lookup_a, resolver};
use common::{eventually, Proc};
use hickory_resolver::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RecordType};
use hickory_resolver::proto::xfer::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Dns {
    _proc: Proc,
    addr: SocketAddr,
    metrics: String,
}

fn start_dns(args: &[&str]) -> Dns {
    let mut all = vec!["dns", "--listen", "127.0.0.1:0", "--zone", "scaleout.test"];
    all.extend_from_slice(args);
    let mut proc = Proc::spawn(&all);
    let ready = proc.wait_ready();
    assert_eq!(ready.role, "dns");
    let addr = ready.url.parse().unwrap();
    let metrics = ready.admin.expect("the dns ready line names its HTTP port");
    Dns {
        _proc: proc,
        addr,
        metrics,
    }
}

/// One raw query over UDP; the whole response.
async fn query_udp(addr: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let mut msg = Message::new();
    msg.set_id(4242)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query);
    msg.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&msg.to_vec().unwrap(), addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), sock.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

/// An EDNS version the server does not speak is answered BADVERS (the
/// extended code 16: 0 in the header, 1 in the OPT record's high bits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_edns_version_is_answered_badvers() {
    let dns = start_dns(&["--host", "www=127.0.0.2"]);
    let mut msg = Message::new();
    msg.set_id(7)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query);
    msg.add_query(Query::query(
        Name::from_str("www.scaleout.test.").unwrap(),
        RecordType::A,
    ));
    msg.extensions_mut()
        .get_or_insert_with(hickory_resolver::proto::op::Edns::new)
        .set_version(1);
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&msg.to_vec().unwrap(), dns.addr)
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), sock.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let answer = Message::from_vec(&buf[..n]).unwrap();
    // 16 on the wire (hickory reads it back as BADSIG, which shares 16).
    assert_eq!(u16::from(answer.response_code()), 16, "{answer:?}");
    assert_eq!(
        answer.extensions().as_ref().map(|e| e.rcode_high()),
        Some(1)
    );
    assert!(answer.answers().is_empty());
    assert_eq!(answer.extensions().as_ref().map(|e| e.version()), Some(0));
    // Version 0 is answered as before.
    let plain = query_udp(dns.addr, "www.scaleout.test.", RecordType::A).await;
    assert_eq!(plain.response_code(), ResponseCode::NoError);
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn answers_a_soa_nxdomain_refused_over_udp_and_tcp_and_survives_garbage() {
    let dns = start_dns(&[
        "--host",
        "www=127.0.0.2,127.0.0.3",
        "--host",
        "@=127.0.0.4",
        "--ttl",
        "7",
    ]);
    assert_eq!(
        lookup_a(dns.addr, "www.scaleout.test.").await,
        vec![ip("127.0.0.2"), ip("127.0.0.3")]
    );
    let tcp: Vec<IpAddr> = resolver(dns.addr, Protocol::Tcp)
        .lookup_ip("www.scaleout.test.")
        .await
        .unwrap()
        .iter()
        .collect();
    assert_eq!(tcp.len(), 2, "TCP answers too");

    let a = query_udp(dns.addr, "www.scaleout.test.", RecordType::A).await;
    assert_eq!(a.response_code(), ResponseCode::NoError);
    assert!(a.authoritative());
    assert_eq!(a.answers()[0].ttl(), 7);
    let first = query_udp(dns.addr, "www.scaleout.test.", RecordType::A)
        .await
        .answers()[0]
        .data()
        .to_string();
    let second = query_udp(dns.addr, "www.scaleout.test.", RecordType::A)
        .await
        .answers()[0]
        .data()
        .to_string();
    assert_ne!(first, second, "answers rotate");

    let soa = query_udp(dns.addr, "scaleout.test.", RecordType::SOA).await;
    assert_eq!(soa.answers()[0].record_type(), RecordType::SOA);
    let ns = query_udp(dns.addr, "scaleout.test.", RecordType::NS).await;
    assert_eq!(ns.answers()[0].record_type(), RecordType::NS);
    let nx = query_udp(dns.addr, "nope.scaleout.test.", RecordType::A).await;
    assert_eq!(nx.response_code(), ResponseCode::NXDomain);
    assert_eq!(
        nx.name_servers()[0].record_type(),
        RecordType::SOA,
        "SOA for negative caching"
    );
    let refused = query_udp(dns.addr, "example.com.", RecordType::A).await;
    assert_eq!(refused.response_code(), ResponseCode::Refused);

    // Garbage over UDP and TCP does not stop it answering.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for junk in [
        &b""[..],
        b"\x00",
        &[0xffu8; 600][..],
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c",
    ] {
        sock.send_to(junk, dns.addr).await.unwrap();
    }
    let mut tcp = tokio::net::TcpStream::connect(dns.addr).await.unwrap();
    tcp.write_all(b"\x00\x10garbage-garbage!").await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut sink)).await;
    assert_eq!(
        lookup_a(dns.addr, "scaleout.test.").await,
        vec![ip("127.0.0.4")]
    );

    let metrics = common::scrape_openmetrics(&format!("{}/metrics", dns.metrics), None).await;
    assert!(
        metrics.contains("scaleout_dns_queries_total{type=\"A\",rcode=\"NXDOMAIN\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("scaleout_dns_queries_total{type=\"A\",rcode=\"REFUSED\"} 1"),
        "{metrics}"
    );
}

/// Two load balancers on the same port at 127.0.0.2 and 127.0.0.3 (the
/// whole 127/8 is loopback).
async fn two_health_servers() -> (Arc<Backend>, Arc<Backend>, u16) {
    for _ in 0..20 {
        let first = Backend::start_on("lb-a", "127.0.0.2:0".parse().unwrap()).await;
        let port = first.addr.port();
        if let Ok(second) = tokio::net::TcpListener::bind(("127.0.0.3", port)).await {
            drop(second);
            let second = Backend::start_on("lb-b", SocketAddr::from(([127, 0, 0, 3], port))).await;
            return (first, second, port);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

#[tokio::test]
async fn an_address_whose_load_balancer_fails_leaves_the_answer_and_comes_back() {
    let (a, b, port) = two_health_servers().await;
    let url = format!("http://{{ip}}:{port}/healthz");
    let dns = start_dns(&[
        "--host",
        "www=127.0.0.2,127.0.0.3",
        "--health-url",
        &url,
        "--health-interval",
        "100ms",
        "--rise",
        "2",
        "--fall",
        "2",
    ]);
    assert_eq!(
        lookup_a(dns.addr, "www.scaleout.test.").await,
        vec![ip("127.0.0.2"), ip("127.0.0.3")]
    );

    a.kill();
    eventually(
        Duration::from_secs(10),
        "127.0.0.2 dropped from the answer",
        || async { lookup_a(dns.addr, "www.scaleout.test.").await == vec![ip("127.0.0.3")] },
    )
    .await;
    // Both failing: fail open, answer with both.
    b.set_healthy(false);
    eventually(
        Duration::from_secs(10),
        "all answered when none is healthy",
        || async {
            let metrics = reqwest::get(format!("{}/metrics", dns.metrics))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            metrics.contains("scaleout_dns_address_up{address=\"127.0.0.3\"} 0")
        },
    )
    .await;
    assert_eq!(lookup_a(dns.addr, "www.scaleout.test.").await.len(), 2);
    // Recovery.
    b.set_healthy(true);
    let revived = Backend::start_on("lb-a", SocketAddr::from(([127, 0, 0, 2], port))).await;
    eventually(Duration::from_secs(10), "both back", || async {
        let metrics = reqwest::get(format!("{}/metrics", dns.metrics))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metrics.contains("scaleout_dns_address_up{address=\"127.0.0.2\"} 1")
            && metrics.contains("scaleout_dns_address_up{address=\"127.0.0.3\"} 1")
    })
    .await;
    assert_eq!(
        lookup_a(dns.addr, "www.scaleout.test.").await,
        vec![ip("127.0.0.2"), ip("127.0.0.3")]
    );
    drop(revived);
}

/// `dig`, the tool an operator reaches for (Debian's dnsutils; `.ci/run`
/// installs it when missing).
#[test]
fn dig_gets_the_answers() {
    let dig = std::process::Command::new("dig").arg("-v").output();
    assert!(
        dig.is_ok(),
        "dig not found: install dnsutils (`.ci/run` does)"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dns = rt.block_on(async { start_dns(&["--host", "www=127.0.0.2"]) });
    let port = dns.addr.port().to_string();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("dig")
            .args(["@127.0.0.1", "-p", &port, "+time=2", "+tries=1"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run(&["www.scaleout.test", "+short"]).trim(), "127.0.0.2");
    assert_eq!(
        run(&["www.scaleout.test", "+short", "+tcp"]).trim(),
        "127.0.0.2"
    );
    assert!(run(&["nope.scaleout.test"]).contains("status: NXDOMAIN"));
    assert!(run(&["example.com"]).contains("status: REFUSED"));
    assert!(run(&["scaleout.test", "SOA", "+short"])
        .starts_with("ns.scaleout.test. hostmaster.scaleout.test."));
    assert!(
        run(&["www.scaleout.test", "+bufsize=4096"]).contains("flags: qr aa"),
        "EDNS query, authoritative answer"
    );
}

/// The DNS server's HTTP port bound beyond loopback gets a token made for
/// `/metrics` (and says where it is); `/healthz` stays open for probes; a
/// silent connection there is closed at the head timeout.
#[tokio::test]
async fn an_http_port_beyond_loopback_gets_a_token() {
    let mut dns = Proc::spawn(&[
        "dns",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "0.0.0.0:0",
        "--host",
        "www=127.0.0.2",
    ]);
    let said = dns.wait_for_line("the /metrics token is in");
    let path = said.split_whitespace().last().unwrap().to_string();
    let ready = dns.wait_for_line("scaleout dns:");
    let port = ready.rsplit(':').next().unwrap().trim().to_string();
    let base = format!("http://127.0.0.1:{port}");
    let token = std::fs::read_to_string(&path).unwrap().trim().to_string();
    let c = common::client();
    assert_eq!(
        c.get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let r = c
        .get(format!("{base}/metrics"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(format!("{base}/metrics"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // No query yet: the family is described (OpenMetrics names a
    // counter's family without `_total`), with no samples.
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("# TYPE scaleout_dns_queries counter\n"));
    assert_eq!(
        c.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let _ = std::fs::remove_file(&path);
}

/// The records API: an address added with the token enters the answers
/// (and the health checks), one taken out leaves them; a name keeps its
/// last address; no token, a wrong one, bad names and bad bodies get a
/// JSON error; a server started without a token takes no edits at all.
#[tokio::test]
async fn addresses_are_added_and_removed_through_the_records_api() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let dns = start_dns(&[
        "--host",
        "www=127.0.0.2",
        "--http-token-file",
        token_file.to_str().unwrap(),
    ]);
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let c = common::client();
    let hosts = format!("{}/hosts", dns.metrics);
    let add = |name: &str, body: serde_json::Value, token: Option<&str>| {
        let mut r = c.post(format!("{hosts}/{name}")).json(&body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let r = add("www", serde_json::json!({"addr": "127.0.0.4"}), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = add(
        "www",
        serde_json::json!({"addr": "127.0.0.4"}),
        Some("wrong"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        lookup_a(dns.addr, "www.scaleout.test.").await,
        vec![ip("127.0.0.2")]
    );

    let r = add(
        "www",
        serde_json::json!({"addr": "127.0.0.4"}),
        Some(&token),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let r = add(
        "WWW",
        serde_json::json!({"addr": "127.0.0.4"}),
        Some(&token),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200, "there already, whatever the case");
    let mut answer = lookup_a(dns.addr, "www.scaleout.test.").await;
    answer.sort();
    assert_eq!(answer, vec![ip("127.0.0.2"), ip("127.0.0.4")]);
    // A new name, written in full.
    let r = add(
        "api.scaleout.test.",
        serde_json::json!({"addr": "127.0.0.9"}),
        Some(&token),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        lookup_a(dns.addr, "api.scaleout.test.").await,
        vec![ip("127.0.0.9")]
    );
    let listed: serde_json::Value = c
        .get(&hosts)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["hosts"].as_array().unwrap().len(), 2, "{listed}");
    assert_eq!(c.get(&hosts).send().await.unwrap().status(), 401);

    // Bad input: each a JSON error saying what is wrong.
    for (name, body) in [
        ("www", serde_json::json!({"addr": "not-an-ip"})),
        ("www", serde_json::json!({"address": "127.0.0.5"})),
        ("www.example.com.", serde_json::json!({"addr": "127.0.0.5"})),
        ("bad..name", serde_json::json!({"addr": "127.0.0.5"})),
    ] {
        let r = add(name, body.clone(), Some(&token)).await.unwrap();
        assert_eq!(r.status(), 400, "{name} {body}");
        let e: serde_json::Value = r.json().await.unwrap();
        assert!(e["error"].is_string(), "{e}");
    }
    let r = c
        .post(format!("{hosts}/www"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(vec![b' '; 10_000])
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_client_error(),
        "an oversized body: {}",
        r.status()
    );

    // Removal.
    let del = |path: &str, token: Option<&str>| {
        let mut r = c.delete(format!("{hosts}/{path}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(del("www/127.0.0.4", None).await.unwrap().status(), 401);
    assert_eq!(
        del("www/127.0.0.4", Some(&token)).await.unwrap().status(),
        200
    );
    assert_eq!(
        lookup_a(dns.addr, "www.scaleout.test.").await,
        vec![ip("127.0.0.2")]
    );
    assert_eq!(
        del("www/127.0.0.4", Some(&token)).await.unwrap().status(),
        404
    );
    assert_eq!(del("www/nope", Some(&token)).await.unwrap().status(), 400);
    let r = del("www/127.0.0.2", Some(&token)).await.unwrap();
    assert_eq!(r.status(), 409, "the last address stays");
    assert_eq!(
        lookup_a(dns.addr, "www.scaleout.test.").await,
        vec![ip("127.0.0.2")]
    );

    // Names are host names in the zone; addresses are ones a client can
    // reach; every refusal is JSON.
    for (name, addr, status) in [
        ("*", "127.0.0.5", 400),
        ("a%5C.b", "127.0.0.5", 400),
        ("caf%C3%A9", "127.0.0.5", 400),
        ("%FF", "127.0.0.5", 400),
        ("www", "0.0.0.0", 400),
        ("www", "224.0.0.1", 400),
        ("www", "255.255.255.255", 400),
    ] {
        let r = add(name, serde_json::json!({"addr": addr}), Some(&token))
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{name} {addr}");
        let e: serde_json::Value = r.json().await.unwrap();
        assert!(e["error"].is_string(), "{name}: {e}");
    }
    for (method, path) in [
        (reqwest::Method::GET, "/hosts/www"),
        (reqwest::Method::PUT, "/hosts/www"),
        (reqwest::Method::GET, "/nope"),
        (reqwest::Method::DELETE, "/hosts/www/%FF%FE"),
    ] {
        let r = c
            .request(method.clone(), format!("{}{path}", dns.metrics))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_client_error(),
            "{method} {path}: {}",
            r.status()
        );
        let e: serde_json::Value = r.json().await.unwrap();
        assert!(e["error"].is_string(), "{method} {path}: {e}");
    }
    // The zone's own name, without its final dot, and a lowercase scheme.
    let r = c
        .post(format!("{hosts}/www.scaleout.test"))
        .header("authorization", format!("bearer {token}"))
        .json(&serde_json::json!({"addr": "127.0.0.6"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mut answer = lookup_a(dns.addr, "www.scaleout.test.").await;
    answer.sort();
    assert_eq!(answer, vec![ip("127.0.0.2"), ip("127.0.0.6")]);
    assert_eq!(
        del("www/127.0.0.6", Some(&token)).await.unwrap().status(),
        200
    );
    // A name made here goes with its last address; the zone's serial
    // counts every change.
    let serial = || async {
        match query_udp(dns.addr, "scaleout.test.", RecordType::SOA)
            .await
            .answers()[0]
            .data()
        {
            hickory_resolver::proto::rr::RData::SOA(soa) => soa.serial(),
            other => panic!("{other:?}"),
        }
    };
    let before = serial().await;
    assert_eq!(
        del("api/127.0.0.9", Some(&token)).await.unwrap().status(),
        200
    );
    assert!(serial().await > before, "the serial moves");
    let gone = query_udp(dns.addr, "api.scaleout.test.", RecordType::A).await;
    assert_eq!(gone.response_code(), ResponseCode::NXDomain);

    // Over UDP an answer fits 512 bytes (no EDNS) or says it was cut.
    for i in 1..=64 {
        let r = add(
            "big",
            serde_json::json!({"addr": format!("2001:db8::{i:x}")}),
            Some(&token),
        )
        .await
        .unwrap();
        assert!(r.status().is_success(), "{i}");
    }
    let mut msg = Message::new();
    msg.set_id(7)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query);
    msg.add_query(Query::query(
        Name::from_str("big.scaleout.test.").unwrap(),
        RecordType::AAAA,
    ));
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&msg.to_vec().unwrap(), dns.addr)
        .await
        .unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_secs(3), sock.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(n <= 512, "{n} bytes over UDP without EDNS");
    let cut = Message::from_vec(&buf[..n]).unwrap();
    assert!(cut.truncated(), "the TC bit says the answer was cut");
    let whole = resolver(dns.addr, Protocol::Tcp)
        .lookup(
            Name::from_str("big.scaleout.test.").unwrap(),
            RecordType::AAAA,
        )
        .await
        .unwrap();
    assert_eq!(whole.iter().count(), 64, "all of them over TCP");

    // Without a token the server takes no edits.
    let open = start_dns(&["--host", "www=127.0.0.2"]);
    let r = c
        .post(format!("{}/hosts/www", open.metrics))
        .json(&serde_json::json!({"addr": "127.0.0.4"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        lookup_a(open.addr, "www.scaleout.test.").await,
        vec![ip("127.0.0.2")]
    );
}
