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
    /// `docker ARGS` (a fault: kill, start, pause, network disconnect).
    pub fn docker(&self, args: &[String]) -> Result<String, String> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&args)
    }
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

    /// `service`'s address on the project's network `network`.
    pub fn ip(&self, service: &str, network: &str) -> Result<IpAddr, String> {
        let id = self.container(service)?;
        let format = format!(
            "{{{{with index .NetworkSettings.Networks \"{}\"}}}}{{{{.IPAddress}}}}{{{{end}}}}",
            self.network(network)
        );
        let out = docker(&["inspect", "-f", &format, &id])?;
        out.trim()
            .parse()
            .map_err(|_| format!("{service} has no address on {network} ({:?})", out.trim()))
    }

    /// `service`'s address on the first of its networks (the data
    /// network first, where the database nodes are).
    pub fn ip_any(&self, service: &str) -> Result<IpAddr, String> {
        ["data", "app", "front"]
            .iter()
            .find_map(|n| self.ip(service, n).ok())
            .ok_or_else(|| format!("{service} has no address in {}", self.project))
    }

    /// SIGKILL, as `docker kill` sends it.
    pub fn kill(&self, service: &str) -> Result<(), String> {
        docker(&["kill", &self.container(service)?]).map(|_| ())
    }

    /// Started again (after a kill), with its volume.
    pub fn start(&self, service: &str) -> Result<(), String> {
        docker(&["start", &self.container(service)?]).map(|_| ())
    }

    pub fn pause(&self, service: &str) -> Result<(), String> {
        docker(&["pause", &self.container(service)?]).map(|_| ())
    }

    pub fn unpause(&self, service: &str) -> Result<(), String> {
        docker(&["unpause", &self.container(service)?]).map(|_| ())
    }

    /// Cut off from `network` (every peer on it).
    pub fn disconnect(&self, service: &str, network: &str) -> Result<(), String> {
        let id = self.container(service)?;
        docker(&["network", "disconnect", &self.network(network), &id]).map(|_| ())
    }

    /// Back on `network`, under its service's name.
    pub fn connect(&self, service: &str, network: &str) -> Result<(), String> {
        let id = self.container(service)?;
        docker(&[
            "network",
            "connect",
            "--alias",
            service,
            &self.network(network),
            &id,
        ])
        .map(|_| ())
    }

    /// Whether `service`'s container runs (not exited, not paused).
    pub fn running(&self, service: &str) -> Result<bool, String> {
        let id = self.container(service)?;
        let out = docker(&["inspect", "-f", "{{.State.Status}}", &id])?;
        Ok(out.trim() == "running")
    }

    /// A container's logs (the last lines), for a failure's report.
    pub fn logs(&self, service: &str) -> String {
        self.compose(&["logs", "--no-color", "--tail", "40", service])
            .unwrap_or_else(|e| e)
    }
}
