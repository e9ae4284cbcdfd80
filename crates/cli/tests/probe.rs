//! `scaleout probe URL`, the image's healthcheck: exit 0 on a 2xx, 1 with
//! the cause otherwise; a password in the URL is never repeated.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::backend::Backend;

fn probe(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(common::BIN)
        .arg("probe")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_passes_on_2xx_and_says_why_otherwise() {
    let server = Backend::start("probed").await;
    let url = format!("{}/healthz", server.url());
    let u = url.clone();
    let (ok, said) = tokio::task::spawn_blocking(move || probe(&[&u]))
        .await
        .unwrap();
    assert!(ok, "{said}");
    server.set_healthy(false);
    let u = url.clone();
    let (ok, said) = tokio::task::spawn_blocking(move || probe(&[&u]))
        .await
        .unwrap();
    assert!(!ok && said.contains("503"), "{said}");
    let (ok, said) = probe(&["http://user:s3cret@127.0.0.1:9/readyz"]);
    assert!(
        !ok && said.contains("Connection refused"),
        "the cause: {said}"
    );
    assert!(!said.contains("s3cret"), "{said}");
    for (args, says) in [
        (vec!["ftp://127.0.0.1/"], "http://"),
        (vec!["--timeout", "0s", "http://127.0.0.1:9/"], "--timeout"),
    ] {
        let (ok, said) = probe(&args);
        assert!(!ok && said.contains(says), "{args:?}: {said}");
    }
}
