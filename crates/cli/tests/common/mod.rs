//! Shared fixtures of the black-box tests: start the real `scaleout` binary
//! on free ports, find where it listens, stop it (always, even when a test
//! fails).

#![allow(dead_code)] // each test binary uses its own part of this module
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod backend;
pub mod db;
pub mod dns;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const BIN: &str = env!("CARGO_BIN_EXE_scaleout");
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `scaleout` process; killed on drop.
pub struct Proc {
    child: Child,
    /// Lines the process printed on stdout so far (collected by `wait_for_line`).
    pub stdout: Vec<String>,
    lines: mpsc::Receiver<String>,
    /// Its stderr lines, when spawned with `spawn_logging`.
    logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        Self::spawn_with(args, None)
    }

    /// `spawn`, logging at `filter` (a SCALEOUT_LOG value) into `logs()`
    /// instead of the test's stderr; its children log there too.
    pub fn spawn_logging(args: &[&str], filter: &str) -> Proc {
        Self::spawn_with(args, Some(filter))
    }

    fn spawn_with(args: &[&str], log: Option<&str>) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .env("SCALEOUT_LOG", log.map_or_else(quiet_log, str::to_string))
            .env(scaleout_wire::ready::ENV, "json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if log.is_some() {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .expect("spawn scaleout");
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            stdout: Vec::new(),
            lines,
            logs,
        }
    }

    /// What it logged so far (`spawn_logging`).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits for a stdout line containing `needle` and returns it.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        self.wait_for_line_within(needle, START_TIMEOUT)
    }

    /// Waits for the machine-readable ready line and returns what it says.
    pub fn wait_ready(&mut self) -> scaleout_wire::ready::Ready {
        let line = self.wait_for_line("scaleout_ready");
        match scaleout_wire::ready::Ready::parse(&line) {
            Some(Ok(ready)) => ready,
            other => panic!("not a ready line: {line:?} ({other:?})"),
        }
    }

    /// `wait_for_line` with its own patience.
    pub fn wait_for_line_within(&mut self, needle: &str, patience: Duration) -> String {
        let deadline = Instant::now() + patience;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.stdout.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "scaleout never printed {needle:?}; it printed: {:#?}; exit: {:?}",
                    self.stdout,
                    self.child.try_wait()
                ),
            }
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal scaleout");
    }

    /// Sends SIGSTOP and returns once every thread of the process is
    /// stopped: `kill` returns when the signal is sent, and a thread
    /// running on another CPU may go on for a moment (long enough to
    /// answer one more AppendEntries on a slow VM: a write then committed
    /// after its followers were "stopped").
    pub fn stop(&self) {
        self.signal(Signal::SIGSTOP);
        let tasks = format!("/proc/{}/task", self.pid());
        // A thread's state is the field after its command's closing ')'.
        let state = |stat: std::path::PathBuf| {
            std::fs::read_to_string(stat).ok().and_then(|s| {
                s.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.chars().next())
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let states: Vec<Option<char>> = std::fs::read_dir(&tasks)
                .expect("the process's threads")
                .filter_map(Result::ok)
                .map(|t| state(t.path().join("stat")))
                .collect();
            if states.iter().all(|s| *s == Some('T')) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{tasks}: not stopped ({states:?})"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for the process to exit, failing the test after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait scaleout") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "scaleout did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    /// SIGTERM first, so that it can clean up (children, namespaces),
    /// then SIGKILL if it lingers.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(self.pid(), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `scaleout up --stage 1` on a free port with its data in `data`.
pub struct Stage1 {
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base: String,
}

impl Stage1 {
    pub fn start(data: &Path) -> Stage1 {
        let data = data.to_str().expect("utf-8 temp path");
        let mut proc = Proc::spawn(&["up", "--stage", "1", "--port-base", "0", "--data", data]);
        let line = proc.wait_for_line("open http://");
        let base = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .expect("URL in the open line")
            .trim_end_matches('/')
            .to_string();
        Stage1 { proc, base }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// An HTTP client that does not follow redirects, so tests see them.
/// The log filter of a node a test starts without `spawn_logging`:
/// warnings, or `SCALEOUT_TEST_LOG` when set (to see what the nodes of a
/// flaky test did: `SCALEOUT_TEST_LOG=info cargo test ...`).
fn quiet_log() -> String {
    std::env::var("SCALEOUT_TEST_LOG").unwrap_or_else(|_| "warn,openraft=off".into())
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

/// GET `url` and the answer's body as JSON (the test fails on any error).
pub async fn get_json(url: &str) -> serde_json::Value {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// GET `url` and the answer's body as text.
pub async fn get_text(url: &str) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// `scaleout lb` on a free port, its admin API on another.
pub struct Lb {
    pub proc: Proc,
    /// `http://127.0.0.1:PORT` (or https), no trailing slash.
    pub base: String,
    pub addr: std::net::SocketAddr,
    pub admin: String,
}

impl Lb {
    /// Starts `scaleout lb --listen 127.0.0.1:0 --admin 127.0.0.1:0` plus `args`.
    pub fn start(args: &[&str]) -> Lb {
        let mut all = vec!["lb", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let mut proc = Proc::spawn(&all);
        let ready = proc.wait_ready();
        assert_eq!(ready.role, "lb");
        let base = ready.url;
        let admin = ready
            .admin
            .expect("the lb's ready line names its admin API");
        let addr = base.rsplit('/').next().unwrap().parse().unwrap();
        Lb {
            proc,
            base,
            addr,
            admin,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("{}{path}", self.admin)
    }

    /// The admin API's view of one backend.
    pub async fn backend(&self, name: &str) -> serde_json::Value {
        let list: serde_json::Value = client()
            .get(self.admin_url("/backends"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        list["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("no backend {name} in {list}"))
            .clone()
    }
}

/// Polls `check` every 50 ms until it holds, failing after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (up to `within`) until `GET url` answers `status`.
pub async fn eventually_status(within: Duration, what: &str, url: &str, status: u16) {
    eventually(within, what, || {
        let url = url.to_string();
        async move {
            client()
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == status)
        }
    })
    .await;
}

/// Scrapes `url` and checks it is a well-formed OpenMetrics text
/// exposition, as every role's `/metrics` must be: the OpenMetrics
/// content type, one `# TYPE` per family and before its samples, every
/// sample named after a declared family with a suffix its type allows
/// (`_total` for a counter; `_bucket`, `_sum`, `_count` for a histogram;
/// none for a gauge), a number for each value, `# EOF` last. Returns the
/// text.
#[allow(dead_code)]
pub async fn scrape_openmetrics(url: &str, token: Option<&str>) -> String {
    let mut req = client().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    let kind = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        kind.starts_with("application/openmetrics-text; version=1.0.0"),
        "{url}: {kind}"
    );
    let text = r.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{url}: no # EOF at the end");
    let mut families: std::collections::BTreeMap<String, String> = Default::default();
    let mut samples = 0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            let before = families.insert(name.to_string(), kind.to_string());
            assert!(before.is_none(), "{url}: {name} declared twice");
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        assert!(!line.starts_with('#'), "{url}: stray comment {line:?}");
        let name_end = line.find(['{', ' ']).unwrap();
        let name = &line[..name_end];
        let value = match line.rfind('}') {
            Some(close) => line[close + 1..].trim(),
            None => line[name_end..].trim(),
        };
        assert!(value.parse::<f64>().is_ok(), "{url}: value of {line:?}");
        let declared = families.iter().any(|(family, kind)| {
            let suffixes: &[&str] = match kind.as_str() {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_sum", "_count", "_created"],
                _ => &[""],
            };
            suffixes.iter().any(|s| name == format!("{family}{s}"))
        });
        assert!(declared, "{url}: sample {name} has no family before it");
        samples += 1;
    }
    assert!(samples > 0, "{url}: no samples");
    text
}

/// GETs `url` until its JSON satisfies `check` (20 s at most); that JSON.
pub async fn eventually_json(
    url: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client().get(url).send().await {
            if let Ok(v) = r.json::<serde_json::Value>().await {
                if check(&v) {
                    return v;
                }
                assert!(std::time::Instant::now() < deadline, "{url}: {v}");
            }
        }
        assert!(std::time::Instant::now() < deadline, "{url}: no answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Builds the container image `tag` from the binary under test
/// (`scripts/image.sh`); what the script said (the image's size).
pub fn build_image(tag: &str) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/image.sh");
    let built = Command::new(script)
        .args([tag, BIN])
        .output()
        .expect("run scripts/image.sh");
    assert!(
        built.status.success(),
        "image.sh: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    String::from_utf8_lossy(&built.stdout).into_owned()
}
