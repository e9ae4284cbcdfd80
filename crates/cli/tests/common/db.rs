//! `scaleout db` nodes as real processes, and what the tests ask of them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::{client, eventually, get_json, Proc};

/// One `scaleout db` process.
pub struct DbNode {
    pub proc: Proc,
    pub id: u64,
    /// `http://127.0.0.1:PORT`
    pub api: String,
    /// `127.0.0.1:PORT`
    pub raft: String,
    pub data: PathBuf,
}

impl DbNode {
    /// Starts node `id` on free ports with its data in `dir/n<id>`.
    pub fn start(id: u64, dir: &Path, extra: &[&str]) -> DbNode {
        Self::start_on(id, dir, "127.0.0.1:0", "127.0.0.1:0", extra)
    }

    pub fn start_on(id: u64, dir: &Path, http: &str, raft: &str, extra: &[&str]) -> DbNode {
        let data = dir.join(format!("n{id}"));
        let id_text = id.to_string();
        let data_text = data.to_str().expect("utf-8 temp path").to_string();
        let mut args = vec![
            "db", "--id", &id_text, "--http", http, "--raft", raft, "--data", &data_text,
        ];
        // A short election timeout, unless the test names its own.
        if !extra.contains(&"--election-timeout") {
            args.extend_from_slice(&["--election-timeout", "500ms"]);
        }
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn(&args);
        let ready = proc.wait_ready();
        assert_eq!((ready.role.as_str(), ready.id), ("db", Some(id)));
        let api = ready.url;
        let raft = ready
            .raft
            .expect("a db node's ready line names its Raft address");
        DbNode {
            proc,
            id,
            api,
            raft,
            data,
        }
    }

    /// The same node again, on the same addresses and data (after a kill).
    pub fn restart(&self, dir: &Path, extra: &[&str]) -> DbNode {
        let http = self.api.trim_start_matches("http://").to_string();
        Self::start_on(self.id, dir, &http, &self.raft, extra)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api)
    }

    pub async fn status(&self) -> Value {
        get_json(&self.url("/status")).await
    }

    /// This node's Raft role, if it answers.
    pub async fn role(&self) -> Option<String> {
        let answer = client().get(self.url("/status")).send().await.ok()?;
        let status: Value = answer.json().await.ok()?;
        status["store"]["raft"]["state"].as_str().map(String::from)
    }

    pub async fn applied(&self) -> u64 {
        self.status().await["store"]["raft"]["applied_index"]
            .as_u64()
            .unwrap_or(0)
    }

    /// POST /db/execute?raft_index; the whole answer.
    pub async fn execute(&self, body: Value) -> (u16, Value) {
        post_json(&self.url("/db/execute?raft_index"), &body).await
    }

    /// GET /db/query?raft_index&q=...&<params>; the first result.
    pub async fn query(&self, sql: &str, params: &str) -> (u16, Value) {
        let url = format!(
            "{}/db/query?raft_index&q={}&{params}",
            self.api,
            urlencode(sql)
        );
        let r = client().get(url).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let body: Value = serde_json::from_str(&text).unwrap_or(json!({ "raw": text }));
        (status, body)
    }

    /// The values of a read served locally once `index` is applied here.
    pub async fn values_at(&self, sql: &str, index: u64) -> Value {
        let (status, body) = self
            .query(sql, &format!("level=none&min_index={index}"))
            .await;
        assert_eq!(status, 200, "node {}: {body}", self.id);
        assert!(body["results"][0]["error"].is_null(), "{body}");
        body["results"][0]["values"].clone()
    }
}

impl DbNode {
    /// Everything this node holds once `index` is applied here: the
    /// schema, and each table's rows with their rowids, in rowid order
    /// (WITHOUT ROWID tables by their columns).
    pub async fn contents(&self, index: u64) -> Value {
        let schema = self
            .values_at(
                "SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY name",
                index,
            )
            .await;
        let mut tables = serde_json::Map::new();
        tables.insert("sqlite_schema".into(), schema.clone());
        for row in schema.as_array().into_iter().flatten() {
            let (Some("table"), Some(name)) = (row[0].as_str(), row[1].as_str()) else {
                continue;
            };
            if name.starts_with("sqlite_") || name.starts_with("_scaleout_") {
                continue;
            }
            let quoted = name.replace('"', "\"\"");
            let with_rowid = format!("SELECT _rowid_, * FROM \"{quoted}\" ORDER BY _rowid_");
            let (status, body) = self
                .query(&with_rowid, &format!("level=none&min_index={index}"))
                .await;
            let rows = if status == 200 && body["results"][0]["error"].is_null() {
                body["results"][0]["values"].clone()
            } else {
                self.values_at(&format!("SELECT * FROM \"{quoted}\" ORDER BY 1"), index)
                    .await
            };
            tables.insert(name.to_string(), rows);
        }
        Value::Object(tables)
    }
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The error of statement `i` in a data API answer (panics, showing the
/// answer, when that statement has none).
#[track_caller]
pub fn error_of(answer: &Value, i: usize) -> &str {
    answer["results"][i]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("statement {i} has no error: {answer}"))
}

pub async fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let r = client().post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap_or(json!({ "raw": text }));
    (status, body)
}

/// Starts a cluster: node 1 bootstraps, the others join it as voters;
/// returns once all are in and node 1 leads.
pub async fn voters(dir: &Path, count: u64, extra: &[&str]) -> Vec<DbNode> {
    let first = DbNode::start(1, dir, extra);
    let join = first.api.clone();
    let mut nodes = vec![first];
    for id in 2..=count {
        let mut args = vec!["--join", join.as_str()];
        args.extend_from_slice(extra);
        nodes.push(DbNode::start(id, dir, &args));
    }
    let leader = nodes[0].url("/nodes");
    eventually(Duration::from_secs(20), "every voter joined", || {
        let leader = leader.clone();
        async move {
            let Ok(r) = client().get(&leader).send().await else {
                return false;
            };
            let nodes: Value = r.json().await.unwrap_or_default();
            nodes.as_object().is_some_and(|m| m.len() as u64 == count)
        }
    })
    .await;
    nodes
}

/// The node that says it leads, waiting for one.
pub async fn leader_of(nodes: &[DbNode]) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        for (i, n) in nodes.iter().enumerate() {
            if n.role().await.as_deref() == Some("Leader") {
                return i;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Python packages from PyPI, unchanged, installed next to the build
/// (in `CARGO_TARGET_TMPDIR/<dir>`) unless `probe` already imports there;
/// returns the directory for `PYTHONPATH`.
pub fn python_packages(dir: &str, packages: &[&str], probe: &str) -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join(dir);
    let importable = std::process::Command::new("python3")
        .args(["-c", probe])
        .env("PYTHONPATH", &target)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("python3 is needed for the rqlite client tests (.ci/run installs it)");
    if !importable.success() {
        let installed = std::process::Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["--root-user-action=ignore", "--target"])
            .arg(&target)
            .args(packages)
            .status()
            .expect("pip");
        assert!(installed.success(), "pip install {packages:?} failed");
    }
    target
}

/// Runs `tests/clients/SCRIPT ARGS...` with python3 and `pythonpath`
/// (off the async threads); whether it succeeded with stdout starting
/// `OK`, and what it printed.
pub async fn python_client(script: &str, args: &[String], pythonpath: PathBuf) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let args = args.to_vec();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .args(args)
            .env("PYTHONPATH", pythonpath)
            .output()
            .expect("python3 runs")
    })
    .await
    .expect("the client's task");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let ok = out.status.success() && stdout.trim_start().starts_with("OK");
    (
        ok,
        format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)),
    )
}
