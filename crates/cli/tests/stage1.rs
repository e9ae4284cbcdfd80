//! Stage 1 black-box tests: the real binary, `scaleout up --stage 1`, every
//! route of the links app, bad inputs, and restarts that keep the data.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::time::Duration;

use common::{client, Proc, Stage1};
use nix::sys::signal::Signal;
use reqwest::header::{CONTENT_TYPE, LOCATION};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn create(c: &reqwest::Client, s: &Stage1, url: &str) -> Value {
    let resp = c
        .post(s.url("/api/links"))
        .json(&json!({ "url": url }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    resp.json().await.unwrap()
}

async fn codes(c: &reqwest::Client, s: &Stage1) -> Vec<String> {
    let body: Value = c
        .get(s.url("/api/links?limit=100"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["code"].as_str().unwrap().to_string())
        .collect()
}

/// Asserts a JSON error: the status and a non-empty `error` message that
/// mentions `mentions`.
async fn assert_json_error(resp: reqwest::Response, status: StatusCode, mentions: &str) {
    assert_eq!(resp.status(), status);
    assert!(resp.headers()[CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let body: Value = resp.json().await.unwrap();
    let msg = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {body}"));
    assert!(
        msg.contains(mentions),
        "{msg:?} does not mention {mentions:?}"
    );
}

#[tokio::test]
async fn json_api_creates_reads_lists_redirects_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Stage1::start(dir.path());
    let c = client();

    let resp = c
        .post(s.url("/api/links"))
        .json(&json!({"url": "https://example.com/a?b=c"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(resp.headers()["x-served-by"], "web-1");
    let location = resp.headers()[LOCATION].to_str().unwrap().to_string();
    let mut link: Value = resp.json().await.unwrap();
    let token = link["delete_token"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 32, "128 random bits, hex");
    // The token is shown once, at creation; reads never carry it.
    link.as_object_mut().unwrap().remove("delete_token");
    let code = link["code"].as_str().unwrap();
    assert_eq!(location, format!("/api/links/{code}"));
    assert_eq!(link["url"], "https://example.com/a?b=c");
    assert_eq!(link["short_url"], s.url(&format!("/{code}")));
    assert!(link["created_at"].as_str().unwrap().ends_with('Z'));

    let got: Value = c
        .get(s.url(&location))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got, link);

    let mut second = create(&c, &s, "http://example.org/").await;
    let second_token = second["delete_token"].as_str().unwrap().to_string();
    second.as_object_mut().unwrap().remove("delete_token");
    let list: Value = c
        .get(s.url("/api/links?limit=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        list["links"],
        json!([second]),
        "limit=1 gives the newest only"
    );
    let list: Value = c
        .get(s.url("/api/links"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["links"], json!([second, link]));

    // Redirect: the first is a cache miss, the second a hit.
    let r = c.get(s.url(&format!("/{code}"))).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(r.headers()[LOCATION], "https://example.com/a?b=c");
    assert_eq!(r.headers()["x-cache"], "miss");
    let r = c.get(s.url(&format!("/{code}"))).send().await.unwrap();
    assert_eq!(r.headers()["x-cache"], "hit");

    // Only the link's own token deletes it: none → 401, another link's → 403.
    assert_json_error(
        c.delete(s.url(&location)).send().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "delete_token",
    )
    .await;
    assert_json_error(
        c.delete(s.url(&location))
            .bearer_auth(&second_token)
            .send()
            .await
            .unwrap(),
        StatusCode::FORBIDDEN,
        "does not delete",
    )
    .await;
    assert_eq!(
        c.get(s.url(&format!("/{code}")))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::FOUND,
        "still there"
    );
    // Delete evicts the cached entry at once on this server.
    let d = c
        .delete(s.url(&location))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(d.status(), StatusCode::NO_CONTENT);
    let r = c.get(s.url(&format!("/{code}"))).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.headers()[CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(r.text().await.unwrap().contains("no link with code"));
    assert_json_error(
        c.get(s.url(&location)).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        code,
    )
    .await;
    assert_json_error(
        c.delete(s.url(&location))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        code,
    )
    .await;
    assert_eq!(codes(&c, &s).await, vec![second["code"].as_str().unwrap()]);
}

#[tokio::test]
async fn home_page_has_the_form_the_newest_links_and_names_the_servers() {
    let dir = tempfile::tempdir().unwrap();
    let s = Stage1::start(dir.path());
    let c = client();
    let mut made = Vec::new();
    for i in 0..22 {
        made.push(
            create(&c, &s, &format!("https://example.com/{i}")).await["code"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // The API pages through them all, newest first, 10 at a time.
    let mut paged = Vec::new();
    let mut next = Some("/api/links?limit=10".to_string());
    while let Some(page) = next {
        let body: Value = c
            .get(s.url(&page))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        paged.extend(
            body["links"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["code"].as_str().unwrap().to_string()),
        );
        next = body["next"].as_str().map(String::from);
        assert!(paged.len() <= 30, "paging ends");
    }
    assert_eq!(paged, made.iter().rev().cloned().collect::<Vec<_>>());

    let resp = c.get(s.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()[CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert_eq!(resp.headers()["x-served-by"], "web-1");
    let page = resp.text().await.unwrap();
    assert!(page.contains("<form method=\"post\" action=\"/links\">"));
    assert!(page.contains("name=\"viewport\""), "readable on a phone");
    assert!(page.contains("<strong id=\"web-server\">web-1</strong>"));
    assert!(page.contains("<strong id=\"db-node\">db-1 (embedded SQLite)</strong>"));
    // The 20 newest are listed, the 2 oldest not.
    for code in &made[2..] {
        assert!(
            page.contains(&format!("href=\"/{code}\"")),
            "{code} missing"
        );
    }
    for code in &made[..2] {
        assert!(
            !page.contains(&format!("href=\"/{code}\"")),
            "{code} is not among the 20 newest"
        );
    }
}

#[tokio::test]
async fn html_form_posts_redirect_back_and_bad_urls_show_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = Stage1::start(dir.path());
    let c = client();
    let resp = c
        .post(s.url("/links"))
        .form(&[("url", "https://www.rust-lang.org/learn")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let location = resp.headers()[LOCATION].to_str().unwrap().to_string();
    let code = location
        .strip_prefix("/?created=")
        .expect("redirect to the home page")
        .to_string();
    // The delete token rides to the next page in a cookie, never in the URL.
    let token_cookie = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("scaleout_delete_{code}=")))
        .expect("the delete token cookie")
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert!(!location.contains(token_cookie.split('=').nth(1).unwrap()));
    let shown = c
        .get(s.url(&location))
        .header("cookie", &token_cookie)
        .send()
        .await
        .unwrap();
    assert!(
        shown.headers().get_all("set-cookie").iter().any(|v| v
            .to_str()
            .unwrap()
            .starts_with(&format!("scaleout_delete_{code}=;"))),
        "shown once, then the cookie goes"
    );
    let page = shown.text().await.unwrap();
    assert!(page.contains(&format!(
        "Created <a href=\"{}\"",
        s.url(&format!("/{code}"))
    )));
    assert!(page.contains("https://www.rust-lang.org/learn"));
    let token = page
        .split("<code id=\"delete-token\">")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .expect("the page shows the delete token")
        .to_string();

    let resp = c
        .post(s.url("/links"))
        .form(&[("url", "javascript:alert(1)")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let page = resp.text().await.unwrap();
    assert!(page.contains("role=\"alert\">url scheme &quot;javascript&quot; is not allowed"));
    assert!(
        page.contains("value=\"javascript:alert(1)\""),
        "the typed URL is kept in the form"
    );
    assert_eq!(codes(&c, &s).await, vec![code.clone()]);
    let d = c
        .delete(s.url(&format!("/api/links/{code}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        d.status(),
        StatusCode::NO_CONTENT,
        "the shown token deletes the link"
    );
}

#[tokio::test]
async fn bad_inputs_get_clear_errors_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Stage1::start(dir.path());
    let c = client();
    let post_json = |body: String| {
        c.post(s.url("/api/links"))
            .header(CONTENT_TYPE, "application/json")
            .body(body)
    };

    let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            post_json(json!({"url": "ftp://example.com/f"}).to_string()),
            StatusCode::BAD_REQUEST,
            "scheme \"ftp\"",
        ),
        (
            post_json(json!({"url": "not a url"}).to_string()),
            StatusCode::BAD_REQUEST,
            "whitespace",
        ),
        (
            post_json(json!({"url": "example.com"}).to_string()),
            StatusCode::BAD_REQUEST,
            "not a valid URL",
        ),
        (
            post_json(
                json!({"url": format!("https://example.com/{}", "a".repeat(2048))}).to_string(),
            ),
            StatusCode::BAD_REQUEST,
            "limit is 2048",
        ),
        (
            post_json("{\"url\": ".into()),
            StatusCode::BAD_REQUEST,
            "body is not",
        ),
        (
            post_json("[1,2]".into()),
            StatusCode::BAD_REQUEST,
            "body is not",
        ),
        (
            post_json("{}".into()),
            StatusCode::BAD_REQUEST,
            "missing field `url`",
        ),
        (
            post_json(json!({"url": "https://a.b/", "x": 1}).to_string()),
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
        (
            post_json(json!({"url": 5}).to_string()),
            StatusCode::BAD_REQUEST,
            "invalid type",
        ),
        (
            c.post(s.url("/api/links"))
                .header(CONTENT_TYPE, "text/plain")
                .body("https://example.com/"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/json",
        ),
        (
            c.post(s.url("/api/links"))
                .body(json!({"url": "https://example.com/"}).to_string()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/json",
        ),
        (
            post_json(format!("{{\"url\": \"{}\"}}", "a".repeat(20_000))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "larger than",
        ),
        (
            c.get(s.url("/api/links?limit=0")),
            StatusCode::BAD_REQUEST,
            "limit must be",
        ),
        (
            c.get(s.url("/api/links?limit=abc")),
            StatusCode::BAD_REQUEST,
            "limit must be",
        ),
        (
            c.get(s.url("/api/links?limit=101")),
            StatusCode::BAD_REQUEST,
            "limit must be",
        ),
        (
            c.get(s.url("/api/links/nosuch1")),
            StatusCode::NOT_FOUND,
            "nosuch1",
        ),
        (
            c.get(s.url("/api/links/bad-code!")),
            StatusCode::NOT_FOUND,
            "bad-code!",
        ),
        (
            c.delete(s.url("/api/links/nosuch1"))
                .bearer_auth("0123456789abcdef0123456789abcdef"),
            StatusCode::NOT_FOUND,
            "nosuch1",
        ),
        (
            c.get(s.url("/api/links?before=x")),
            StatusCode::BAD_REQUEST,
            "before must be",
        ),
        (
            c.put(s.url("/api/links")),
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
        ),
        (
            c.get(s.url("/no/such/route")),
            StatusCode::NOT_FOUND,
            "no route for GET /no/such/route",
        ),
    ];
    for (req, status, mentions) in cases {
        assert_json_error(req.send().await.unwrap(), status, mentions).await;
    }

    let form_as_text = c
        .post(s.url("/links"))
        .header(CONTENT_TYPE, "text/plain")
        .body("url=https://a.b/");
    assert_eq!(
        form_as_text.send().await.unwrap().status(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let unknown = c.get(s.url("/zzzzzzz")).send().await.unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert!(unknown.text().await.unwrap().contains("<h1>Not Found</h1>"));

    assert!(
        codes(&c, &s).await.is_empty(),
        "a rejected request stored nothing"
    );
    // The server is still healthy after all that.
    assert_eq!(
        c.get(s.url("/healthz")).send().await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn health_readiness_metrics_and_request_ids() {
    let dir = tempfile::tempdir().unwrap();
    let s = Stage1::start(dir.path());
    let c = client();
    let health: Value = c
        .get(s.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health, json!({"status": "ok", "server": "web-1"}));
    let ready = c.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(
        ready.json::<Value>().await.unwrap()["db_node"],
        "db-1 (embedded SQLite)"
    );

    let code = create(&c, &s, "https://example.com/m").await["code"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..3 {
        c.get(s.url(&format!("/{code}"))).send().await.unwrap();
    }
    let resp = c
        .get(s.url("/metrics"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["x-request-id"],
        "trace-me-42",
        "a given request id is kept"
    );
    let text = resp.text().await.unwrap();
    for line in [
        r#"scaleout_web_http_requests_total{server="web-1",method="POST",route="/api/links",status="201"} 1"#,
        r#"scaleout_web_http_requests_total{server="web-1",method="GET",route="/{code}",status="302"} 3"#,
        r#"scaleout_web_http_request_duration_seconds_count{server="web-1",route="/{code}"} 3"#,
        r#"scaleout_web_cache_misses_total{server="web-1"} 1"#,
        r#"scaleout_web_cache_hits_total{server="web-1"} 2"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "metrics lack {line:?}:\n{text}"
        );
    }
    let generated = c.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(
        generated.headers()["x-request-id"].len(),
        32,
        "a request id is made when absent"
    );
}

#[tokio::test]
async fn links_survive_a_graceful_restart_and_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();

    let mut s = Stage1::start(dir.path());
    let first = create(&c, &s, "https://example.com/before-sigterm").await;
    s.proc.signal(Signal::SIGTERM);
    let status = s.proc.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "graceful shutdown exits 0, got {status}");

    let mut s = Stage1::start(dir.path());
    let got: Value = c
        .get(s.url(&format!("/api/links/{}", first["code"].as_str().unwrap())))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["url"], "https://example.com/before-sigterm");
    let second = create(&c, &s, "https://example.com/before-kill").await;
    s.proc.signal(Signal::SIGKILL);
    s.proc.wait_exit(Duration::from_secs(10));

    let s = Stage1::start(dir.path());
    let mut want = vec![
        second["code"].as_str().unwrap().to_string(),
        first["code"].as_str().unwrap().to_string(),
    ];
    want.sort();
    let mut have = codes(&c, &s).await;
    have.sort();
    assert_eq!(have, want, "an acknowledged link survives kill -9");
}

#[test]
fn cli_explains_itself_and_rejects_bad_flags() {
    let out = std::process::Command::new(common::BIN)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(
        help.contains("up") && help.contains("Run a whole stage of the seed"),
        "{help}"
    );

    for (args, says) in [
        (&["up", "--stage", "9"][..], "stage must be 1 to 5"),
        (
            &["up", "--port-base", "notaport"][..],
            "invalid value 'notaport'",
        ),
        (&["up", "--host", "nohost"][..], "invalid value 'nohost'"),
    ] {
        let out = std::process::Command::new(common::BIN)
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} must fail");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn a_taken_port_is_reported_not_panicked_on() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let mut p = Proc::spawn(&[
        "up",
        "--stage",
        "1",
        "--port-base",
        &port,
        "--data",
        dir.path().to_str().unwrap(),
    ]);
    let status = p.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1));
    // Stage 4's processes: the child that cannot listen fails the start,
    // and the lab stops the ones already running.
    let mut p = Proc::spawn(&[
        "up",
        "--stage",
        "4",
        "--port-base",
        &port,
        "--data",
        dir.path().to_str().unwrap(),
    ]);
    let status = p.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1));
}
