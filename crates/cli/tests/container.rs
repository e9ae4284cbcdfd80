//! The container image (`scripts/image.sh`): built here from this build,
//! pulling nothing, and a database node run from it, reached from the
//! host through a published port. Skipped, saying so, where no Docker
//! engine answers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Removes the container and the image, whatever happens.
struct Cleanup {
    container: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", "-v", &self.container])
            .output();
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.image])
            .output();
    }
}

fn docker(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_a_database_node_as_an_unprivileged_user() {
    if !Command::new("docker")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIPPED: no Docker engine answers here; the image test needs one");
        return;
    }
    let tag = format!("scaleout-test:{}", std::process::id());
    let container = format!("scaleout-test-{}", std::process::id());
    let _cleanup = Cleanup {
        container: container.clone(),
        image: tag.clone(),
    };
    let said = common::build_image(&tag);
    assert!(said.contains("MiB"), "it gives the image's size: {said}");

    // No base image, no shell: the user is the unprivileged one.
    let (_, user) = docker(&["image", "inspect", &tag, "--format", "{{.Config.User}}"]);
    assert_eq!(user.trim(), "10001:10001");
    let (has_shell, _) = docker(&["run", "--rm", "--entrypoint", "/bin/sh", &tag, "-c", "true"]);
    assert!(!has_shell, "the image has a shell");

    let (ok, out) = docker(&[
        "run",
        "-d",
        "--name",
        &container,
        "-p",
        "127.0.0.1::4001",
        &tag,
        "db",
        "--id",
        "1",
        "--http",
        "0.0.0.0:4001",
        "--raft",
        "0.0.0.0:4002",
        "--http-adv",
        "127.0.0.1:4001",
        "--raft-adv",
        "127.0.0.1:4002",
        "--data",
        "/data/db",
    ]);
    assert!(ok, "docker run: {out}");
    let (ok, port) = docker(&["port", &container, "4001/tcp"]);
    assert!(ok, "docker port: {port}");
    let base = format!("http://{}", port.lines().next().unwrap().trim());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = common::client().get(format!("{base}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        if Instant::now() > deadline {
            let (_, logs) = docker(&["logs", &container]);
            panic!("the node in the container never became ready: {logs}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body) = common::db::post_json(
        &format!("{base}/db/execute"),
        &json!([
            "CREATE TABLE t (x)",
            "INSERT INTO t VALUES ('in a container')"
        ]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let read: Value = common::get_json(&format!(
        "{base}/db/query?q=SELECT%20x%20FROM%20t&level=strong"
    ))
    .await;
    assert_eq!(
        read["results"][0]["values"],
        json!([["in a container"]]),
        "{read}"
    );
}
