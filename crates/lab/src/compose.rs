//! A Compose deployment of stage 5 (`deploy/compose/compose.yaml`) driven
//! through the engine's own tools: `docker compose` (or the older
//! `docker-compose`) to bring it up, scale and take it down, and `docker`
//! to kill, pause, restart and disconnect its containers — what
//! `scaleout chaos --on compose` and the cross-container test do.
//!
//! Every command is bounded by a timeout; a project's containers, networks
//! and volumes go with [`Compose::down`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// How long one `docker` command may take (an `up` builds nothing, but
/// waits for healthchecks).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// One Compose project.
#[derive(Debug, Clone)]
pub struct Compose {
    /// `["docker", "compose"]` or `["docker-compose"]`.
    program: Vec<String>,
    pub project: String,
    pub file: PathBuf,
    /// Variables the compose file reads (image, secret, ports, subnet).
    pub env: BTreeMap<String, String>,
}

/// Runs `program args` with `env`, within the timeout; its stdout, or
/// what went wrong with its stderr.
fn run(
    program: &[String],
    args: &[&str],
    env: &BTreeMap<String, String>,
) -> Result<String, String> {
    use std::os::unix::process::CommandExt;
    let (first, rest) = program.split_first().ok_or("no program")?;
    let child = Command::new(first)
        // Its own process group: a Ctrl-C at the terminal reaches the
        // run, which finishes (or takes the project down), not a Compose
        // command half-way through making it.
        .process_group(0)
        .args(rest)
        .args(args)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{first}: {e}"))?;
    let pid = child.id();
    // Its output is read as it comes (a full pipe would stall it).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(out) => out.map_err(|e| e.to_string())?,
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            return Err(format!(
                "{} {}: no end within {COMMAND_TIMEOUT:?}",
                program.join(" "),
                args.join(" ")
            ));
        }
    };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{} {}: {}",
            program.join(" "),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The Compose this machine has: `docker compose` (v2) or
/// `docker-compose` (v1), when the engine answers; why not otherwise.
pub fn available() -> Result<Vec<String>, String> {
    let docker = vec!["docker".to_string()];
    run(
        &docker,
        &["version", "--format", "{{.Server.Version}}"],
        &BTreeMap::new(),
    )
    .map_err(|e| format!("no Docker engine answers: {e}"))?;
    let v2 = vec!["docker".to_string(), "compose".to_string()];
    if run(&v2, &["version"], &BTreeMap::new()).is_ok() {
        return Ok(v2);
    }
    let v1 = vec!["docker-compose".to_string()];
    run(&v1, &["version"], &BTreeMap::new())
        .map(|_| v1)
        .map_err(|e| format!("no docker compose nor docker-compose: {e}"))
}

fn docker(args: &[&str]) -> Result<String, String> {
    run(&["docker".to_string()], args, &BTreeMap::new())
}

impl Compose {
    pub fn new(
        program: Vec<String>,
        project: &str,
        file: PathBuf,
        env: BTreeMap<String, String>,
    ) -> Compose {
        Compose {
            program,
            project: project.into(),
            file,
            env,
        }
    }

    /// `compose -p PROJECT -f FILE args`.
    pub fn compose(&self, args: &[&str]) -> Result<String, String> {
        let file = self.file.display().to_string();
        let mut all = vec!["-p", self.project.as_str(), "-f", file.as_str()];
        all.extend_from_slice(args);
        run(&self.program, &all, &self.env)
    }

    /// `up -d` (more flags after it, e.g. `--scale web=4`).
    pub fn up(&self, more: &[&str]) -> Result<(), String> {
        let mut args = vec!["up", "-d"];
        args.extend_from_slice(more);
        self.compose(&args).map(|_| ())
    }

    /// Everything of the project gone: containers, networks, volumes.
    pub fn down(&self) -> Result<(), String> {
        self.compose(&["down", "-v", "--remove-orphans", "-t", "5"])
            .map(|_| ())
    }

    /// The containers of `service` (ids), running or not, oldest first;
    /// found by the labels both Compose versions put on them (one quick
    /// `docker ps`, not a Compose run).
    pub fn containers(&self, service: &str) -> Result<Vec<String>, String> {
        let project = format!("label=com.docker.compose.project={}", self.project);
        let service = format!("label=com.docker.compose.service={service}");
        let mut ids: Vec<String> = docker(&[
            "ps",
            "-a",
            "-q",
            "--no-trunc",
            "--filter",
            &project,
            "--filter",
            &service,
        ])?
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
        // `docker ps` lists the newest first.
        ids.reverse();
        Ok(ids)
    }

    /// Every service's address (its first container's; on the data
    /// network first, then app, then front), in one `docker inspect`.
    pub fn addresses(&self) -> Result<BTreeMap<String, IpAddr>, String> {
        let project = format!("label=com.docker.compose.project={}", self.project);
        let ids: Vec<String> = docker(&["ps", "-q", "--no-trunc", "--filter", &project])?
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        if ids.is_empty() {
            return Ok(BTreeMap::new());
        }
        let mut args = vec!["inspect"];
        args.extend(ids.iter().map(String::as_str));
        let listed: serde_json::Value =
            serde_json::from_str(&docker(&args)?).map_err(|e| format!("docker inspect: {e}"))?;
        let mut out = BTreeMap::new();
        for c in listed.as_array().into_iter().flatten() {
            let Some(service) = c["Config"]["Labels"]["com.docker.compose.service"].as_str() else {
                continue;
            };
            let ip = ["data", "app", "front"].iter().find_map(|n| {
                c["NetworkSettings"]["Networks"][self.network(n)]["IPAddress"]
                    .as_str()
                    .and_then(|ip| ip.parse::<IpAddr>().ok())
            });
            if let Some(ip) = ip {
                out.entry(service.to_string()).or_insert(ip);
            }
        }
        Ok(out)
    }

    /// The one container of `service`.
    pub fn container(&self, service: &str) -> Result<String, String> {
        self.containers(service)?
            .into_iter()
            .next()
            .ok_or_else(|| format!("{service} has no container in {}", self.project))
    }

    /// The project's network `name` as the engine calls it.
    pub fn network(&self, name: &str) -> String {
        format!("{}_{name}", self.project)
    }

    /// SIGKILL to a container (an id from [`Compose::container`]), as
    /// `docker kill` sends it.
    pub fn kill(&self, container: &str) -> Result<(), String> {
        docker(&["kill", container]).map(|_| ())
    }

    /// A container started again (after a kill), with its volume.
    pub fn start(&self, container: &str) -> Result<(), String> {
        docker(&["start", container]).map(|_| ())
    }

    pub fn pause(&self, container: &str) -> Result<(), String> {
        docker(&["pause", container]).map(|_| ())
    }

    pub fn unpause(&self, container: &str) -> Result<(), String> {
        docker(&["unpause", container]).map(|_| ())
    }

    /// A container cut off from the project's `network` (every peer on it).
    pub fn disconnect(&self, container: &str, network: &str) -> Result<(), String> {
        docker(&["network", "disconnect", &self.network(network), container]).map(|_| ())
    }

    /// A container back on the project's `network`, under its service's
    /// name `alias`.
    pub fn connect(&self, container: &str, network: &str, alias: &str) -> Result<(), String> {
        docker(&[
            "network",
            "connect",
            "--alias",
            alias,
            &self.network(network),
            container,
        ])
        .map(|_| ())
    }

    /// A container's logs (the last lines), for a failure's report.
    pub fn logs(&self, service: &str) -> String {
        self.compose(&["logs", "--no-color", "--tail", "40", service])
            .unwrap_or_else(|e| e)
    }
}
