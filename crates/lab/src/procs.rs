//! The lab's child processes: each tier is the `scaleout` binary itself,
//! started with a role's subcommand, found ready by the JSON ready line it
//! prints when asked (`SCALEOUT_READY=json`, see `scaleout_wire::ready`), and
//! stopped with SIGTERM (then SIGKILL if it lingers) — children never
//! outlive the lab.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use scaleout_wire::ready::{self, Ready};

use crate::Error;

/// How long a child may take to print its ready line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Proc {
    pub name: String,
    /// What the child said when ready: its role and addresses.
    pub ready: Ready,
    /// How it was started (a restart uses the same).
    pub args: Vec<String>,
    /// The network namespace it runs in, if not the lab's.
    netns: Option<String>,
    child: Child,
}

impl Proc {
    /// Starts `scaleout ARGS...` and waits for its ready line.
    pub async fn start(name: &str, args: &[String]) -> Result<Proc, Error> {
        Proc::start_in(None, name, args).await
    }

    /// `start`, inside network namespace `netns` when given (through
    /// `ip netns exec`, which becomes the child: same PID, same signals).
    pub async fn start_in(netns: Option<&str>, name: &str, args: &[String]) -> Result<Proc, Error> {
        let exe = std::env::current_exe().map_err(|e| Error::Spawn {
            name: name.into(),
            reason: format!("cannot find the scaleout binary: {e}"),
        })?;
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = command
            .args(args)
            // The child stops by itself if this process dies (see the
            // binary's shutdown_on_signal).
            .env("SCALEOUT_SUPERVISED", "1")
            .env(ready::ENV, "json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::Spawn {
                name: name.into(),
                reason: e.to_string(),
            })?;
        let stdout = child.stdout.take().ok_or_else(|| Error::Spawn {
            name: name.into(),
            reason: "no stdout".into(),
        })?;
        let mut lines = BufReader::new(stdout).lines();
        let wait = async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(ready) = Ready::parse(&line) {
                    return Some(ready);
                }
            }
            None
        };
        let ready = match tokio::time::timeout(START_TIMEOUT, wait).await {
            Ok(Some(Ok(ready))) => ready,
            Ok(Some(Err(reason))) => {
                let _ = child.kill().await;
                return Err(Error::Spawn {
                    name: name.into(),
                    reason,
                });
            }
            Ok(None) => {
                let status = child
                    .wait()
                    .await
                    .map_or_else(|e| e.to_string(), |s| s.to_string());
                return Err(Error::Spawn {
                    name: name.into(),
                    reason: format!("exited before it was ready ({status}); see its log above"),
                });
            }
            Err(_) => {
                return Err(Error::Spawn {
                    name: name.into(),
                    reason: format!("not ready after {START_TIMEOUT:?}"),
                })
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Proc {
            name: name.into(),
            ready,
            args: args.to_vec(),
            netns: netns.map(String::from),
            child,
        })
    }

    /// Where it serves: a URL for web, lb and db, `host:port` for dns.
    pub fn url(&self) -> &str {
        &self.ready.url
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether the child is still running (reports an exit once).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends a signal (SIGKILL, SIGSTOP, SIGCONT, ...).
    pub fn signal(&self, signal: Signal) {
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), signal);
        }
    }

    /// How to start it again: its network namespace, name and arguments,
    /// with every address it was told to pick (`host:0`) pinned to the
    /// one it got, so it comes back where the others know it (a database
    /// node at its members' Raft address, a web server at its load
    /// balancer's backend).
    pub fn spec(&self) -> (Option<String>, String, Vec<String>) {
        let strip = |url: &str| {
            url.split("://")
                .last()
                .unwrap_or(url)
                .trim_end_matches('/')
                .to_string()
        };
        let got = |flag: &str| -> Option<String> {
            match (self.ready.role.as_str(), flag) {
                ("db", "--http") | ("web" | "lb", "--listen") => Some(strip(&self.ready.url)),
                ("db", "--raft") => self.ready.raft.clone(),
                ("lb", "--admin") | ("dns", "--http") => self.ready.admin.as_deref().map(strip),
                ("dns", "--listen") => Some(self.ready.url.clone()),
                _ => None,
            }
        };
        let mut args = self.args.clone();
        for at in 1..args.len() {
            if args[at].ends_with(":0") {
                if let Some(addr) = got(&args[at - 1]) {
                    args[at] = addr;
                }
            }
        }
        (self.netns.clone(), self.name.clone(), args)
    }

    /// SIGKILL, and its exit collected.
    pub async fn kill_now(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Starts it again with the same arguments once it has exited (killed
    /// or stopped by a fault).
    pub async fn restart(&mut self) -> Result<(), Error> {
        let _ = self.child.kill().await;
        let again = Proc::start_in(self.netns.as_deref(), &self.name, &self.args).await?;
        *self = again;
        Ok(())
    }

    /// SIGTERM, then SIGKILL after a grace period.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            if tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
            tracing::warn!(name = %self.name, "did not stop in time; killing it");
        }
        let _ = self.child.kill().await;
    }
}
